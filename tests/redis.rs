//! The Redis broker (issue [2]): several instances as one, resume anywhere,
//! outages without loss, raw-Redis publishing, Redis Cluster. Every test
//! starts its own redis-server processes.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::redis::{RedisCluster, RedisServer};
use support::*;

/// `n` gateways sharing `redis`, ready.
fn gateways(redis_url: &str, n: usize, extra: &str) -> Vec<Pollgate> {
    (0..n)
        .map(|_| {
            let pg = Pollgate::start(&with_broker(&format!("{extra}{ROUTES}"), redis_url));
            pg.wait_ready();
            pg
        })
        .collect()
}

#[tokio::test]
async fn a_publish_on_one_instance_answers_polls_held_on_the_others() {
    let redis = RedisServer::start();
    let gw = gateways(&redis.url(), 3, "");
    let mut polls = Vec::new();
    for pg in &gw[1..] {
        let url = pg.url("/sub/shared");
        polls.push(tokio::spawn(async move { get_json(&url).await }));
        pg.wait_metric("pollgate_held_requests", 1.0).await;
    }
    let id = gw[0]
        .publish("shared", "application/json", "{\"n\":1}")
        .await;
    for p in polls {
        let (status, _, v) = p.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["gap"], false);
        assert_eq!(ids(&v), vec![id.clone()]);
        assert_eq!(v["messages"][0]["data"]["n"], 1);
    }
    // Each instance received one announcement, whatever its number of waiters.
    gw[1]
        .wait_metric("pollgate_messages_delivered_total", 1.0)
        .await;
}

/// Publishing keeps nothing on an instance on Redis: the histories are in
/// Redis, and a publish creates no channel in the hub (only a poll does),
/// so `limits.max_channels_kept` (the memory broker's) never evicts there.
#[tokio::test]
async fn publishing_to_many_channels_keeps_no_channel_on_the_instance() {
    let redis = RedisServer::start();
    let gw = gateways(&redis.url(), 1, "limits:\n  max_channels_kept: 2\n");
    let pg = &gw[0];
    let first = pg.publish("many:0", "text/plain", "x").await;
    for i in 1..20 {
        pg.publish(&format!("many:{i}"), "text/plain", "x").await;
    }
    assert_eq!(pg.metric("pollgate_channels_active").await, 0.0);
    assert_eq!(pg.metric("pollgate_channels_kept ").await, 0.0);
    assert_eq!(pg.metric("pollgate_channels_evicted_total").await, 0.0);
    let (_, _, info) = get_json(&pg.admin("/v1/channels/many:0")).await;
    assert_eq!(
        (info["history"].as_u64(), info["last_id"].as_str()),
        (Some(1), Some(first.as_str()))
    );
    // A poll is what makes a channel active here.
    let (_, _, v) = get_json(&pg.url("/oldest/many:0?timeout=0")).await;
    assert_eq!(ids(&v), [first]);
    assert_eq!(pg.metric("pollgate_channels_active").await, 1.0);
}

#[tokio::test]
async fn twenty_channels_published_round_robin_arrive_complete_and_in_order_everywhere() {
    let redis = RedisServer::start();
    let gw = gateways(&redis.url(), 3, "");
    let mut readers = Vec::new();
    for pg in &gw {
        for ch in 0..20 {
            // Take the current cursor first, then follow the channel.
            let base = pg.url(&format!("/sub/rr{ch}"));
            let (_, _, first) = get_json(&format!("{base}?timeout=0")).await;
            let mut cursor = first["cursor"].as_str().unwrap().to_string();
            readers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 10 {
                    let (status, _, v) =
                        get_json(&format!("{base}?cursor={cursor}&timeout=5")).await;
                    assert_eq!(status, 200);
                    assert_eq!(v["gap"], false);
                    for m in v["messages"].as_array().unwrap() {
                        got.push(m["data"].as_str().unwrap().to_string());
                    }
                    cursor = v["cursor"].as_str().unwrap().to_string();
                    assert!(
                        !v["messages"].as_array().unwrap().is_empty(),
                        "timed out with {got:?}"
                    );
                }
                got
            }));
        }
    }
    let mut k = 0;
    for i in 0..10 {
        for ch in 0..20 {
            gw[k % 3]
                .publish(&format!("rr{ch}"), "text/plain", &format!("{ch}:{i}"))
                .await;
            k += 1;
        }
    }
    for (n, r) in readers.into_iter().enumerate() {
        let ch = n % 20;
        let want: Vec<String> = (0..10).map(|i| format!("{ch}:{i}")).collect();
        assert_eq!(r.await.unwrap(), want, "instance {} channel rr{ch}", n / 20);
    }
}

#[tokio::test]
async fn a_cursor_resumes_on_another_instance_and_after_a_restart() {
    let redis = RedisServer::start();
    let mut gw = gateways(&redis.url(), 2, "");
    let a = gw[0].publish("resume", "text/plain", "a").await;
    let b = gw[1].publish("resume", "text/plain", "b").await;
    let c = gw[0].publish("resume", "text/plain", "c").await;
    let (_, _, v) = get_json(&gw[1].url(&format!("/sub/resume?cursor={a}"))).await;
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), [b.clone(), c.clone()]);
    // A new instance that never saw the channel resumes from Redis.
    gw[1].kill();
    let fresh = gateways(&redis.url(), 1, "").remove(0);
    let (_, _, v) = get_json(&fresh.url(&format!("/sub/resume?cursor={b}"))).await;
    assert_eq!(ids(&v), vec![c.clone()]);
    assert_eq!(v["gap"], false);
    let url = fresh.url(&format!("/sub/resume?cursor={c}"));
    let held = tokio::spawn(async move { get_json(&url).await });
    fresh.wait_metric("pollgate_held_requests", 1.0).await;
    let d = gw[0].publish("resume", "text/plain", "d").await;
    let (_, _, v) = held.await.unwrap();
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), [d]);
}

#[tokio::test]
async fn a_redis_outage_loses_nothing_for_clients_holding_a_cursor() {
    let mut redis = RedisServer::start_persistent();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let before = pg.publish("out", "text/plain", "before").await;
    let url = pg.url(&format!("/sub/out?cursor={before}"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;

    redis.kill();
    pg.wait_metric("pollgate_broker_up", 0.0).await;
    // Still ready (every instance shares the outage; proxied routes work),
    // saying so; the strict variant is not.
    let (status, _, v) = get_json(&pg.admin("/readyz")).await;
    assert_eq!((status, v["broker"].as_str()), (200, Some("down")));
    let (status, headers, v) = get_json(&pg.admin("/readyz?broker=required")).await;
    assert_eq!((status, v["error"].as_str()), (503, Some("broker_down")));
    assert!(headers.contains_key("retry-after"));
    let r = client()
        .post(pg.admin("/v1/publish/out"))
        .body("lost?")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "never a silent drop");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "broker_unavailable"
    );
    let (status, headers, _) = get_json(&pg.url("/sub/other")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        pg.metric("pollgate_held_requests").await,
        1.0,
        "held polls stay held"
    );

    redis.restart();
    pg.wait_metric("pollgate_broker_up", 1.0).await;
    pg.wait_ready();
    assert!(pg.metric("pollgate_broker_reconnects_total").await >= 1.0);
    let after = pg.publish("out", "text/plain", "after").await;
    let (status, _, v) = held.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), vec![after.clone()]);
    // The history survived: a client at the old cursor gets everything.
    let (_, _, v) = get_json(&pg.url(&format!("/sub/out?cursor={before}"))).await;
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), [after]);
}

#[tokio::test]
async fn messages_published_while_an_instance_is_disconnected_are_caught_up() {
    let mut redis = RedisServer::start_persistent();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let first = pg.publish("cu", "text/plain", "first").await;
    let url = pg.url(&format!("/sub/cu?cursor={first}&timeout=10"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    redis.kill();
    pg.wait_metric("pollgate_broker_up", 0.0).await;
    // Let the reconnect backoff grow, then publish straight into Redis the
    // moment it is back, most likely before pollgate has resubscribed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    let id = redis.publish_raw("pollgate", "cu", "text/plain", "during");
    let (status, _, v) = held.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["gap"], false, "caught up, nothing missed");
    assert_eq!(ids(&v), [id]);
    assert_eq!(v["messages"][0]["data"], "during");
}

#[tokio::test]
async fn an_empty_restart_answers_gap_not_silence() {
    let mut redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let id = pg.publish("flush", "text/plain", "x").await;
    let url = pg.url(&format!("/sub/flush?cursor={id}"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    redis.restart();
    let (status, headers, v) = tokio::time::timeout(Duration::from_secs(8), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["gap"], true);
    assert_eq!(headers["pollgate-gap"], "1");
    // A new poll with the old cursor says the same.
    let (_, _, v) = get_json(&pg.url(&format!("/sub/flush?cursor={id}"))).await;
    assert_eq!(v["gap"], true);
    assert_eq!(position(v["cursor"].as_str().unwrap()), "0-0");
}

#[tokio::test]
async fn a_backend_can_publish_straight_into_redis() {
    let redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let url = pg.url("/sub/direct");
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let id = redis.publish_raw(
        "pollgate",
        "direct",
        "application/json",
        "{\"from\":\"redis-cli\"}",
    );
    let (_, _, v) = held.await.unwrap();
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), vec![id.clone()]);
    assert_eq!(v["messages"][0]["data"]["from"], "redis-cli");
    let (_, _, info) = get_json(&pg.admin("/v1/channels/direct")).await;
    assert_eq!(info["last_id"], id.as_str());
}

#[tokio::test]
async fn keys_are_namespaced_hash_tagged_trimmed_and_expiring() {
    let redis = RedisServer::start();
    let pg = Pollgate::start(&with_broker(
        &format!("broker:\n  namespace: app1\n  history: 2\n  history_ttl: 1m\n{ROUTES}"),
        &redis.url(),
    ));
    pg.wait_ready();
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(pg.publish("room:7", "text/plain", &i.to_string()).await);
    }
    let mut keys: Vec<String> = redis
        .cli(&["KEYS", "*"])
        .lines()
        .map(str::to_string)
        .collect();
    keys.sort();
    // The instance's heartbeat (docs/redis.md), once housekeeping has run.
    let (beats, keys): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .partition(|k| k.starts_with("app1:instance:"));
    assert!(beats.len() <= 1, "{beats:?}");
    assert_eq!(keys, ["app1:epoch", "app1:{room:7}:h"]);
    // Trimmed in whole stream nodes (100 entries): not yet.
    assert_eq!(redis.cli(&["XLEN", "app1:{room:7}:h"]).trim(), "3");
    let ttl: i64 = redis
        .cli(&["PTTL", "app1:{room:7}:h"])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
    let (_, _, v) = get_json(&pg.url(&format!("/sub/room:7?cursor={}", published[0]))).await;
    assert_eq!(v["gap"], false, "the floor is a valid position");
    assert_eq!(ids(&v), published[1..]);
    // One entry per node: the stream is trimmed to exactly the history,
    // and the trimmed message's id is not known any more. A cursor from
    // before the kept ones is a gap, never silence.
    redis.cli(&["CONFIG", "SET", "stream-node-max-entries", "1"]);
    let mut exact = Vec::new();
    for i in 0..3 {
        exact.push(pg.publish("room:8", "text/plain", &i.to_string()).await);
    }
    assert_eq!(redis.cli(&["XLEN", "app1:{room:8}:h"]).trim(), "2");
    for cursor in ["0-0", exact[0].as_str()] {
        let (_, _, v) = get_json(&pg.url(&format!("/sub/room:8?cursor={cursor}"))).await;
        assert_eq!(
            (v["gap"].as_bool(), ids(&v)),
            (Some(true), exact[1..].to_vec()),
            "{cursor}"
        );
    }
    let (_, _, v) = get_json(&pg.url(&format!("/sub/room:8?cursor={}", exact[1]))).await;
    assert_eq!(
        (v["gap"].as_bool(), ids(&v)),
        (Some(false), exact[2..].to_vec())
    );
}

/// A poll in flight: its answer's status, headers and JSON body.
type HeldPoll = tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap, Value)>;

/// A poll held on each of `channels` (no cursor), once all are held.
async fn hold_each(pg: &Pollgate, channels: &[String]) -> Vec<HeldPoll> {
    let polls = channels
        .iter()
        .map(|ch| {
            let url = pg.url(&format!("/sub/{ch}"));
            tokio::spawn(async move { get_json(&url).await })
        })
        .collect();
    pg.wait_metric("pollgate_held_requests", channels.len() as f64)
        .await;
    polls
}

/// Publishes one message on each of `channels`; each of `polls` (from
/// [`hold_each`]) must be answered with its channel's message, no gap.
async fn publish_each_to_its_poll(pg: &Pollgate, channels: &[String], polls: Vec<HeldPoll>) {
    let mut want = Vec::new();
    for ch in channels {
        want.push(pg.publish(ch, "text/plain", ch).await);
    }
    for (p, id) in polls.into_iter().zip(want) {
        let (status, _, v) = p.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["gap"], false);
        assert_eq!(ids(&v), [id]);
    }
}

#[tokio::test]
async fn a_redis_cluster_serves_channels_on_every_slot() {
    let cluster = RedisCluster::start();
    let pg = Pollgate::start(&with_broker(ROUTES, &cluster.url()));
    pg.wait_ready();
    let channels: Vec<String> = (0..24).map(|i| format!("c{i}")).collect();
    let polls = hold_each(&pg, &channels).await;
    publish_each_to_its_poll(&pg, &channels, polls).await;
    for node in &cluster.nodes {
        let n: u64 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(n > 0, "node {} holds some channels", node.port);
    }
    // Resume from stored history through the cluster.
    let (_, _, v) = get_json(&pg.url("/oldest/c5")).await;
    assert_eq!(v["messages"][0]["data"], "c5");
}

/// The nodes close pollgate's shard subscription connections (`CLIENT
/// KILL`); a message published before it subscribes again reaches the
/// held polls all the same (caught up from the stream on the node where it
/// subscribed again), and every subscription is back on its slot's master.
#[tokio::test]
async fn cluster_shard_subscriptions_closed_by_the_nodes_are_made_again_and_caught_up() {
    let cluster = RedisCluster::start();
    let pg = Pollgate::start(&with_broker(ROUTES, &cluster.url()));
    pg.wait_ready();
    let channels: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let polls = hold_each(&pg, &channels).await;
    let mut killed = 0;
    for node in &cluster.nodes {
        for line in node.cli(&["CLIENT", "LIST"]).lines() {
            if line.contains(" ssub=0 ") || !line.contains(" ssub=") {
                continue;
            }
            let id = line.split(' ').next().unwrap().trim_start_matches("id=");
            node.cli(&["CLIENT", "KILL", "ID", id]);
            killed += 1;
        }
    }
    assert_eq!(killed, 3, "one subscription connection per master");
    publish_each_to_its_poll(&pg, &channels, polls).await;
    let subscribed = |ch: &str| -> u64 {
        let name = format!("pollgate:{{{ch}}}");
        cluster
            .nodes
            .iter()
            .map(|n| {
                let out = n.cli(&["PUBSUB", "SHARDNUMSUB", &name]);
                out.lines()
                    .nth(1)
                    .unwrap_or("0")
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .sum()
    };
    for ch in &channels {
        assert_eq!(subscribed(ch), 1, "{ch} subscribed again, once");
    }
}

#[tokio::test]
async fn a_channel_is_subscribed_while_it_has_waiters_and_unsubscribed_after_the_linger() {
    let redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let numsub = || {
        let out = redis.cli(&["PUBSUB", "NUMSUB", "pollgate:{linger}"]);
        out.lines().nth(1).unwrap_or("").trim().to_string()
    };
    assert_eq!(numsub(), "0");
    let url = pg.url("/sub/linger");
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    assert_eq!(numsub(), "1");
    pg.publish("linger", "text/plain", "x").await;
    held.await.unwrap();
    assert_eq!(numsub(), "1", "kept for re-polls");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while numsub() != "0" {
        assert!(std::time::Instant::now() < deadline, "never unsubscribed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(pg.metric("pollgate_channels_active").await, 0.0);
}

#[tokio::test]
async fn a_failed_catch_up_is_retried_and_never_skips_what_was_missed() {
    let redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let first = pg.publish("cu2", "text/plain", "first").await;
    let url = pg.url(&format!("/sub/cu2?cursor={first}&timeout=20"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    // Stored but never announced to pollgate: it must be caught up.
    let missed = redis.cli(&[
        "XADD",
        "pollgate:{cu2}:h",
        "*",
        "ct",
        "text/plain",
        "d",
        "missed",
    ]);
    // The catch-up read of the channel fails (its floor key is unreadable)...
    redis.cli(&["LPUSH", "pollgate:{cu2}:f", "not a floor"]);
    // ...when pollgate reconnects.
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg.metric("pollgate_broker_reconnects_total").await < 2.0 {
        assert!(std::time::Instant::now() < deadline, "no reconnect attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A message announced meanwhile must not let the window jump past `missed`.
    let live = redis.publish_raw("pollgate", "cu2", "text/plain", "live");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "nothing answered while the catch-up fails"
    );
    // The channel becomes readable: the next attempt catches up.
    redis.cli(&["DEL", "pollgate:{cu2}:f"]);
    let (status, _, v) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("answered once caught up")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["gap"], false);
    let missed = missed.trim().to_string();
    assert_eq!(
        ids(&v),
        std::slice::from_ref(&missed),
        "the missed message first"
    );
    let (_, _, v) = get_json(&pg.url(&format!("/sub/cu2?cursor={missed}"))).await;
    assert_eq!(v["gap"], false);
    assert_eq!(ids(&v), [live], "then the live one");
}

#[tokio::test]
async fn a_channel_begun_again_with_lower_ids_wakes_held_polls_with_a_gap() {
    let redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let first = pg.publish("again", "text/plain", "first").await;
    let url = pg.url(&format!("/sub/again?cursor={first}&timeout=20"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    // The channel's keys are deleted and a writer starts it again, its ids
    // lower than before (another clock, or ids of its own).
    redis.cli(&["DEL", "pollgate:{again}:h", "pollgate:{again}:f"]);
    redis.cli(&[
        "XADD",
        "pollgate:{again}:h",
        "1-1",
        "ct",
        "text/plain",
        "d",
        "anew",
    ]);
    redis.cli(&["PUBLISH", "pollgate:{again}", "1-1\ntext/plain\nanew"]);
    let (status, headers, v) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("woken, not left waiting")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        (
            v["gap"].as_bool(),
            headers["pollgate-gap"].to_str().unwrap()
        ),
        (Some(true), "1")
    );
    assert_eq!(ids(&v), ["1-1"]);
    assert_eq!(position(v["cursor"].as_str().unwrap()), "1-1");
}

/// Writes a failover lost (simulated: the message is deleted from the
/// stream while both instances are disconnected) are announced: each
/// instance had seen the message, finds it missing when it catches up, and
/// one loss notice is appended; every cursor from before it, and the
/// cursor of the lost message itself, is answered `gap: true` once, and a
/// poll held at the lost message is woken with it.
#[tokio::test]
async fn writes_a_failover_lost_are_told_to_every_cursor_from_before_them() {
    let redis = RedisServer::start();
    let gw = gateways(&redis.url(), 2, "");
    let kept = gw[0].publish("lost", "text/plain", "kept").await;
    // Both instances follow the channel, and see the message to be lost.
    let polls: Vec<_> = gw
        .iter()
        .map(|pg| {
            let url = pg.url(&format!("/sub/lost?cursor={kept}&timeout=20"));
            tokio::spawn(async move { get_json(&url).await })
        })
        .collect();
    for pg in &gw {
        pg.wait_metric("pollgate_held_requests", 1.0).await;
    }
    let lost = gw[0].publish("lost", "text/plain", "lost").await;
    for poll in polls {
        let (_, _, v) = poll.await.unwrap();
        assert_eq!(ids(&v), std::slice::from_ref(&lost));
    }
    // A poll held at the lost message, then the loss and the reconnect.
    let url = gw[1].url(&format!("/sub/lost?cursor={lost}&timeout=20"));
    let held = tokio::spawn(async move { get_json(&url).await });
    gw[1].wait_metric("pollgate_held_requests", 1.0).await;
    redis.cli(&["XDEL", "pollgate:{lost}:h", &lost]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let (status, headers, v) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held poll is told")
        .unwrap();
    assert_eq!((status, v["gap"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(headers["pollgate-gap"], "1");
    // As with any gap: the retained history, without the notice.
    assert_eq!(ids(&v), std::slice::from_ref(&kept), "{v}");
    let past = v["cursor"].as_str().unwrap().to_string();
    // A cursor from before the loss, on either instance: a gap, once
    // (once that instance has caught up: the other may still be at it).
    for pg in &gw {
        let from_before = pg.url(&format!("/sub/lost?cursor={kept}&timeout=0"));
        let mut v = get_json(&from_before).await.2;
        let caught_up = Instant::now() + Duration::from_secs(5);
        while v["gap"] != true && Instant::now() < caught_up {
            tokio::time::sleep(Duration::from_millis(50)).await;
            v = get_json(&from_before).await.2;
        }
        assert_eq!(v["gap"], true, "{v}");
        assert_eq!(position(v["cursor"].as_str().unwrap()), position(&past));
        let (_, _, v) = get_json(&pg.url(&format!("/sub/lost?cursor={past}&timeout=0"))).await;
        assert_eq!((v["gap"].as_bool(), ids(&v).len()), (Some(false), 0), "{v}");
    }
    // One notice, however many instances saw the loss.
    let entries = redis.cli(&["XRANGE", "pollgate:{lost}:h", "-", "+"]);
    assert_eq!(
        entries.lines().filter(|l| *l == "lost").count(),
        1,
        "{entries}"
    );
    let mut notices = 0.0;
    for pg in &gw {
        notices += pg.metric("pollgate_loss_notices_total").await;
    }
    assert_eq!(notices, 1.0);
    // And on it goes.
    let next = gw[1].publish("lost", "text/plain", "next").await;
    let (_, _, v) = get_json(&gw[0].url(&format!("/sub/lost?cursor={past}"))).await;
    assert_eq!((v["gap"].as_bool(), ids(&v)), (Some(false), vec![next]));
}

#[tokio::test]
async fn an_instance_is_not_ready_until_it_has_reached_its_broker() {
    let dead = format!("redis://127.0.0.1:{}/0", free_port());
    let pg = Pollgate::start(&with_broker(ROUTES, &dead));
    let (status, _, v) = get_json(&pg.admin("/readyz")).await;
    assert_eq!((status, v["error"].as_str()), (503, Some("broker_down")));
    let (status, _, _) = get_json(&pg.admin("/healthz")).await;
    assert_eq!(status, 200, "alive all the same");
}

/// An instance holding 1 000 channels recovers from a lost Redis
/// connection at once: every channel resubscribed (500 names per
/// SUBSCRIBE) and caught up (64 reads in flight on the one connection, not
/// one round trip after the other), each held poll answered with the
/// message stored meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_holding_a_thousand_channels_recovers_from_a_reconnect_at_once() {
    const CHANNELS: usize = 1000;
    let redis = RedisServer::start();
    let pg = gateways(&redis.url(), 1, "").remove(0);
    let channels: Vec<String> = (0..CHANNELS).map(|i| format!("many{i}")).collect();
    let polls = hold_each(&pg, &channels).await;
    // Stored and never announced: only the catch-up can deliver them.
    let script = format!(
        "for ch = 0, {} do\n\
         redis.call('XADD', 'pollgate:{{many' .. ch .. '}}:h', '*', 'ct', 'text/plain', 'd', 'm' .. ch)\n\
         end\nreturn 'ok'",
        CHANNELS - 1
    );
    assert_eq!(redis.cli(&["EVAL", &script, "0"]).trim(), "ok");
    let cut = std::time::Instant::now();
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for (i, poll) in polls.into_iter().enumerate() {
        let (status, _, v) = tokio::time::timeout(Duration::from_secs(10), poll)
            .await
            .expect("answered after the reconnect")
            .unwrap();
        assert_eq!(
            (status, &v["messages"][0]["data"]),
            (200, &Value::from(format!("m{i}")))
        );
    }
    let took = cut.elapsed();
    println!("{CHANNELS} channels caught up {took:?} after the cut");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(pg.metric("pollgate_broker_reconnects_total").await, 1.0);
}

/// Publishes `per_channel` messages (`"<ch>:<i>"`, round robin over
/// `channels` channels `burst<ch>`) in one script, with the documented
/// publish script: Redis then pushes every announcement at once.
fn burst(redis: &RedisServer, channels: usize, per_channel: usize) {
    let script = format!(
        "local function publish(KEYS, ARGV)\n{}\nend\n\
         for i = 0, {last} do\n  for ch = 0, {top} do\n\
         local c = 'pollgate:{{burst' .. ch .. '}}'\n\
         publish({{c .. ':h', c .. ':f'}}, {{c, '1000', '3600000', 'text/plain', ch .. ':' .. i, 'PUBLISH'}})\n\
         end\nend\nreturn 'ok'",
        support::redis::documented_script(),
        last = per_channel - 1,
        top = channels - 1,
    );
    let out = redis.cli(&["EVAL", &script, "0"]);
    assert_eq!(out.trim(), "ok", "the burst script answered {out:?}");
}

/// Trust, round 2: the hub's delivery queue is bounded
/// (`broker.delivery_queue`). A burst of announcements faster than the
/// delivery task (every message wakes held polls) fills it; the broker
/// then reconnects and catches up from the streams instead of queueing
/// more, and every subscriber still gets every message, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_past_the_delivery_queue_catches_up_in_order_without_loss() {
    const CHANNELS: usize = 10;
    const POLLS: usize = 20;
    const MESSAGES: usize = 150;
    const BOUND: f64 = 4.0;
    let redis = RedisServer::start();
    let extra = "threads: 2\nbroker:\n  history: 1000\n  delivery_queue: 4\n";
    let pg = gateways(&redis.url(), 1, extra).remove(0);
    let mut readers = Vec::new();
    for ch in 0..CHANNELS {
        for _ in 0..POLLS {
            let base = pg.url(&format!("/sub/burst{ch}"));
            readers.push(tokio::spawn(async move {
                let (_, _, first) = get_json(&format!("{base}?timeout=0")).await;
                let mut cursor = first["cursor"].as_str().unwrap().to_string();
                let mut got = Vec::new();
                while got.len() < MESSAGES {
                    let (status, _, v) =
                        get_json(&format!("{base}?cursor={cursor}&timeout=10")).await;
                    if status == 503 {
                        // Reconnecting to catch up: retried, as clients do.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    assert_eq!(status, 200, "{v}");
                    assert_eq!(v["gap"], false, "{v}");
                    let messages = v["messages"].as_array().unwrap();
                    assert!(!messages.is_empty(), "timed out with {got:?}");
                    for m in messages {
                        got.push(m["data"].as_str().unwrap().to_string());
                    }
                    cursor = v["cursor"].as_str().unwrap().to_string();
                }
                got
            }));
        }
    }
    pg.wait_metric("pollgate_held_requests", (CHANNELS * POLLS) as f64)
        .await;
    // The queue's length, watched while the burst is delivered.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (watching, metrics) = (watching.clone(), pg.admin("/metrics"));
        tokio::spawn(async move {
            let mut most: f64 = 0.0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let text = get_text(&metrics).await;
                let queued = text
                    .lines()
                    .find_map(|l| l.strip_prefix("pollgate_delivery_queue "))
                    .and_then(|v| v.parse::<f64>().ok())
                    .expect("pollgate_delivery_queue is listed");
                most = most.max(queued);
            }
            most
        })
    };
    let redis = std::sync::Arc::new(redis);
    let publisher = redis.clone();
    tokio::task::spawn_blocking(move || burst(&publisher, CHANNELS, MESSAGES))
        .await
        .unwrap();
    for (n, r) in readers.into_iter().enumerate() {
        let ch = n / POLLS;
        let want: Vec<String> = (0..MESSAGES).map(|i| format!("{ch}:{i}")).collect();
        let got = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .unwrap_or_else(|_| panic!("subscriber {n} of burst{ch} still waiting"))
            .unwrap();
        assert_eq!(got, want, "subscriber {n} of burst{ch}");
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.await.unwrap();
    let overflows = pg.metric("pollgate_delivery_queue_overflows_total").await;
    assert!(
        overflows >= 1.0,
        "the burst never overflowed a queue of {BOUND} (its length reached {most}): the queue is not bounded"
    );
    assert!(
        most <= BOUND,
        "the delivery queue reached {most}, over {BOUND}"
    );
    assert!(pg.metric("pollgate_broker_reconnects_total").await >= 1.0);
    pg.assert_no_panic();
}

/// `publish.replicas: 1`: with its replica up, a publish (single and batch)
/// answers 200; with the replica stopped, `WAIT` times out and the publish
/// answers `503 not_replicated` after about `publish.replica_timeout`.
#[tokio::test]
async fn publishes_wait_for_replicas_or_answer_not_replicated() {
    let master = RedisServer::start();
    let port = master.port.to_string();
    let replica = RedisServer::spawn(
        free_port(),
        &["--appendonly", "no", "--replicaof", "127.0.0.1", &port],
        "waitreplica",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:up")
    {
        assert!(std::time::Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let extra = "publish:\n  replicas: 1\n  replica_timeout: 300ms\n";
    let pg = &gateways(&master.url(), 1, extra)[0];
    let id = pg.publish("w", "text/plain", "kept").await;
    assert!(id.contains('-'));
    let batch = client()
        .post(pg.admin("/v1/publish"))
        .json(&serde_json::json!({"messages": [{"channel": "w", "data": {"n": 1}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 200);

    replica.signal("-STOP");
    let started = std::time::Instant::now();
    let r = client()
        .post(pg.admin("/v1/publish/w"))
        .body("maybe")
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    replica.signal("-CONT");
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_replicated", "{v}");
    assert!(took >= Duration::from_millis(250), "WAIT waited: {took:?}");
    // The message may still exist: it was stored on the master.
    let h = master.cli(&["XLEN", "pollgate:{w}:h"]);
    assert_eq!(h.trim(), "3", "{h}");
}

/// `subscribers_total` of `channel` on `pg`'s admin API once it equals
/// `want`, or what it last was after `limit`.
async fn total_once(pg: &Pollgate, channel: &str, want: u64, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (_, _, info) = get_json(&pg.admin(&format!("/v1/channels/{channel}"))).await;
        if info["subscribers_total"] == want || tokio::time::Instant::now() > deadline {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn subscribers_total_counts_every_instance_and_forgets_a_dead_one() {
    let redis = RedisServer::start();
    let mut gw = gateways(&redis.url(), 2, "");
    let mut held = Vec::new();
    for (i, n) in [(0, 1), (1, 2)] {
        for _ in 0..n {
            let url = gw[i].url("/sub/occ?timeout=60");
            held.push(tokio::spawn(async move { get_json(&url).await }));
        }
        gw[i].wait_metric("pollgate_held_requests", n as f64).await;
    }
    // Each instance counts its own; both add up to the fleet's.
    let info = total_once(&gw[0], "occ", 3, Duration::from_secs(5)).await;
    assert_eq!(
        (
            info["subscribers"].as_u64(),
            info["subscribers_total"].as_u64()
        ),
        (Some(1), Some(3)),
        "{info}"
    );
    let info = total_once(&gw[1], "occ", 3, Duration::from_secs(5)).await;
    assert_eq!(info["subscribers"], 2, "{info}");
    // An instance SIGKILLed says nothing more: its heartbeat expires and
    // its subscribers stop counting.
    gw[1].kill();
    let info = total_once(&gw[0], "occ", 1, Duration::from_secs(10)).await;
    assert_eq!(info["subscribers_total"], 1, "{info}");
    // A poll answered and not renewed: the count goes down by itself.
    gw[0].publish("occ", "text/plain", "bye").await;
    let info = total_once(&gw[0], "occ", 0, Duration::from_secs(5)).await;
    assert_eq!(
        (
            info["subscribers"].as_u64(),
            info["subscribers_total"].as_u64()
        ),
        (Some(0), Some(0)),
        "{info}"
    );
    for h in held {
        let _ = h.await;
    }
}
