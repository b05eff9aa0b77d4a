//! `limits.max_channels_kept` (docs/configuration.md, docs/security.md):
//! the channels an instance on the memory broker keeps, those created by
//! publishing included, are bounded; the least recently published one
//! without held polls is evicted, and a cursor into it gets a gap; a publish
//! when every kept channel is held gets `503 too_many_channels`.

mod support;

use serde_json::Value;
use support::backend::Backend;
use support::*;

/// `limits.max_channels_kept: max` on the usual routes, with a publishing
/// route to upstream `app` on `upstream` when given.
fn config(max: usize, upstream: Option<&str>) -> String {
    let publish = upstream.map_or(String::new(), |addr| {
        format!(
            r#"upstreams:
  app:
    addrs: ["{addr}"]
    connect_timeout: 1s
    read_timeout: 1s
"#
        )
    });
    let route = if upstream.is_some() {
        r#"
  - path: "/rooms/{room}/messages"
    methods: [POST]
    upstream: app
    publish:
      channel: "room:{room}"
      body: request
"#
    } else {
        ""
    };
    format!("limits:\n  max_channels_kept: {max}\n{publish}{ROUTES}{route}")
}

/// The epoch of this instance's cursors (from a poll of another channel).
async fn epoch(pg: &Pollgate) -> String {
    let (_, _, v) = get_json(&pg.url("/sub/probe?timeout=0")).await;
    let cursor = v["cursor"].as_str().unwrap();
    cursor.rsplit_once('_').unwrap().1.to_string()
}

#[tokio::test]
async fn publishing_past_the_limit_evicts_the_oldest_and_its_cursors_get_a_gap() {
    let pg = Pollgate::start(&config(4, None));
    let epoch = epoch(&pg).await;
    let first = pg.publish("room:0", "text/plain", "a").await;
    let newest = pg.publish("room:0", "text/plain", "b").await;
    for i in 1..=10 {
        pg.publish(&format!("room:{i}"), "text/plain", "x").await;
        assert!(pg.metric("pollgate_channels_kept ").await <= 4.0);
    }
    assert_eq!(pg.metric("pollgate_channels_kept ").await, 4.0);
    assert_eq!(pg.metric("pollgate_channels_evicted_total").await, 7.0);
    assert_eq!(pg.metric("pollgate_messages_published_total").await, 12.0);
    // The newest channels are kept whole.
    let (_, _, v) = get_json(&pg.url("/oldest/room:10?timeout=0")).await;
    assert_eq!((v["gap"].as_bool(), ids(&v).len()), (Some(false), 1));
    // room:0 is gone: its history is empty, and every cursor that missed
    // something gets a gap, `0-0` of this epoch included; the cursor at its
    // newest message missed nothing. (Its floor is its newest id, unless
    // its slot in the table of floors is shared with a channel evicted
    // later, by chance: then that one's, and every older cursor a gap.)
    let (status, _, info) = get_json(&pg.admin("/v1/channels/room:0")).await;
    assert_eq!((status, info["history"].as_u64()), (200, Some(0)));
    let floor = info["last_id"].as_str().unwrap().to_string();
    let id = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    assert!(id(&floor) >= id(&newest), "{floor} {newest}");
    let shared = floor != newest;
    for (cursor, gap) in [
        (format!("0-0_{epoch}"), true),
        (format!("{first}_{epoch}"), true),
        (format!("{newest}_{epoch}"), shared),
    ] {
        let (status, _, v) =
            get_json(&pg.url(&format!("/sub/room:0?cursor={cursor}&timeout=0"))).await;
        assert_eq!(status, 200, "{cursor}");
        assert_eq!(v["gap"].as_bool(), Some(gap), "{cursor}: {v}");
        assert_eq!(position(v["cursor"].as_str().unwrap()), floor, "{cursor}");
    }
    // Published again, it goes on after its old ids.
    let again = pg.publish("room:0", "text/plain", "c").await;
    let (_, _, v) = get_json(&pg.url(&format!("/sub/room:0?cursor={floor}_{epoch}"))).await;
    assert_eq!((ids(&v), v["gap"].as_bool()), (vec![again], Some(false)));
    assert!(pg.metric("pollgate_channels_kept ").await <= 4.0);
}

#[tokio::test]
async fn with_every_kept_channel_held_a_new_channel_is_refused_with_503() {
    let pg = Pollgate::start(&config(3, None));
    for room in ["a", "b", "c"] {
        pg.publish(room, "text/plain", "x").await;
    }
    let mut polls = Vec::new();
    for room in ["a", "b", "c"] {
        let url = pg.url(&format!("/sub/{room}"));
        polls.push(tokio::spawn(async move { get_json(&url).await }));
    }
    pg.wait_metric("pollgate_held_requests", 3.0).await;
    let refused = "pollgate_refused_total{reason=\"max_channels_kept\"}";
    assert_eq!(pg.metric(refused).await, 0.0);
    let r = client()
        .post(pg.admin("/v1/publish/d"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "too_many_channels", "{v}");
    assert!(v["detail"]
        .as_str()
        .unwrap()
        .contains("limits.max_channels_kept"));
    assert_eq!(pg.metric(refused).await, 1.0);
    // So is one in a batch, which says what it published before.
    let r = client()
        .post(pg.admin("/v1/publish"))
        .json(&serde_json::json!({"messages": [{"channel": "d", "data": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "too_many_channels"
    );
    assert_eq!(pg.metric(refused).await, 2.0);
    assert_eq!(pg.metric("pollgate_channels_evicted_total").await, 0.0);
    // A kept channel still takes publishes; once its poll is answered it is
    // no longer held, and the new channel takes its place.
    let id = pg.publish("a", "text/plain", "y").await;
    let (_, _, v) = polls.remove(0).await.unwrap();
    assert_eq!(ids(&v), [id]);
    pg.publish("d", "text/plain", "x").await;
    assert_eq!(pg.metric("pollgate_channels_evicted_total").await, 1.0);
    assert_eq!(pg.metric("pollgate_channels_kept ").await, 3.0);
    let (_, _, info) = get_json(&pg.admin("/v1/channels/a")).await;
    assert_eq!(info["history"], 0, "a was evicted: {info}");
    // The held polls were not disturbed.
    assert_eq!(pg.metric("pollgate_held_requests").await, 2.0);
    let id = pg.publish("b", "text/plain", "z").await;
    let (_, _, v) = polls.remove(0).await.unwrap();
    assert_eq!(ids(&v), [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_through_to_distinct_rooms_keeps_memory_bounded() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(20, Some(&backend.addr())));
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", pg.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    };
    let body = "x".repeat(60_000);
    // Warm up (the first few allocations of every path), then measure.
    for room in 0..20 {
        let r = client()
            .post(pg.url(&format!("/rooms/w{room}/messages")))
            .header("Content-Type", "text/plain")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let before = rss();
    for room in 0..600 {
        let r = client()
            .post(pg.url(&format!("/rooms/{room}/messages")))
            .header("Content-Type", "text/plain")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "room {room}");
        assert!(r.headers().contains_key("pollgate-message-id"));
        assert!(!r.headers().contains_key("pollgate-publish-error"));
    }
    let grown = rss().saturating_sub(before);
    // 600 rooms of 60 KB kept would be 36 MB: 20 of them are 1.2 MB.
    assert!(grown < 20, "RSS grew by {grown} MiB");
    assert_eq!(pg.metric("pollgate_channels_kept ").await, 20.0);
    assert_eq!(pg.metric("pollgate_channels_evicted_total").await, 600.0);
    // The newest room is there, whole.
    let (_, _, v) = get_json(&pg.url("/oldest/room:599?timeout=0")).await;
    assert_eq!(
        v["messages"][0]["data"].as_str().map(str::len),
        Some(60_000)
    );
}
