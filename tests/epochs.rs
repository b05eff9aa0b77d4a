//! Cursors name the history they belong to (docs/api.md, "Cursors"): a
//! cursor from another history, the empty channel's `0-0` included, is
//! answered with `gap: true`, never read as a position in this one. On the
//! memory broker a history is a process's life; on Redis, a dataset's
//! (one that lost or flushed its data starts another).

mod support;

use support::redis::RedisServer;
use support::*;

/// The cursor of an empty channel `c` on `pg` (a poll that times out at once).
async fn empty_cursor(pg: &Pollgate, c: &str) -> String {
    let (status, _, v) = get_json(&pg.url(&format!("/sub/{c}?timeout=0"))).await;
    assert_eq!(status, 200);
    let cursor = v["cursor"].as_str().unwrap().to_string();
    assert_eq!(position(&cursor), "0-0", "{v}");
    cursor
}

#[tokio::test]
async fn the_empty_channels_cursor_of_a_restarted_memory_broker_is_a_gap() {
    let before = Pollgate::start(ROUTES);
    let cursor = empty_cursor(&before, "news").await;
    // Published to the first process, lost with it.
    before.publish("news", "text/plain", "lost").await;
    drop(before);
    let after = Pollgate::start(ROUTES);
    let kept = after.publish("news", "text/plain", "kept").await;
    let (status, headers, v) = get_json(&after.url(&format!("/sub/news?cursor={cursor}"))).await;
    assert_eq!(status, 200);
    assert_eq!(v["gap"], true, "{v}");
    assert_eq!(headers["pollgate-gap"], "1");
    assert_eq!(ids(&v), [kept]);
    // The new cursor belongs to this history: read as a position again.
    let fresh = v["cursor"].as_str().unwrap();
    assert_ne!(fresh, cursor);
    let url = after.url(&format!("/sub/news?cursor={fresh}&timeout=0"));
    let (_, _, v) = get_json(&url).await;
    assert_eq!((v["gap"].as_bool(), ids(&v).len()), (Some(false), 0));
    // A cursor issued before epochs (ids alone) still works.
    let legacy = position(fresh).to_string();
    let (status, _, v) =
        get_json(&after.url(&format!("/sub/news?cursor={legacy}&timeout=0"))).await;
    assert_eq!((status, v["gap"].as_bool()), (200, Some(false)), "{v}");
    // A malformed epoch is refused like any bad cursor.
    let (status, _, v) = get_json(&after.url("/sub/news?cursor=0-0_x")).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn a_redis_that_lost_its_data_starts_another_history() {
    let mut redis = RedisServer::start();
    let pg = Pollgate::start(&with_broker(ROUTES, &redis.url()));
    pg.wait_ready();
    let cursor = empty_cursor(&pg, "room").await;
    // A second gateway on the same Redis reads the same history.
    let other = Pollgate::start(&with_broker(ROUTES, &redis.url()));
    other.wait_ready();
    let url = other.url(&format!("/sub/room?cursor={cursor}&timeout=0"));
    let (_, _, v) = get_json(&url).await;
    assert_eq!(v["gap"], false, "one Redis, one history: {v}");
    pg.publish("room", "text/plain", "lost").await;
    redis.restart(); // comes back empty
    pg.wait_metric("pollgate_broker_reconnects_total", 1.0)
        .await;
    other
        .wait_metric("pollgate_broker_reconnects_total", 1.0)
        .await;
    let kept = pg.publish("room", "text/plain", "kept").await;
    for g in [&pg, &other] {
        let (status, _, v) = get_json(&g.url(&format!("/sub/room?cursor={cursor}"))).await;
        assert_eq!(status, 200);
        assert_eq!(v["gap"], true, "{v}");
        assert_eq!(ids(&v), std::slice::from_ref(&kept));
    }
}
