//! Presence and its webhooks, as a user sees them: real pollgate processes
//! (one on the memory broker, two on a real redis-server), real clients
//! that long-poll again and again, an authorize upstream naming each
//! subscriber (`Pollgate-Subscriber`), and a webhook receiver that checks
//! every signature, taken down and brought back.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::hooks::{Identities, Receiver};
use support::redis::RedisServer;
use support::{client, get_json, run_cli, temp_file, with_broker, Pollgate};
use tokio::sync::watch;

const SECRET: &str = "s3cret";

/// The config: `/rooms/{room}/events` asks `who` (the subscriber is the
/// client's `X-User`), `/open/{room}` asks nobody; events go to `hooks`.
fn config(identities: &Identities, receiver: &Receiver, linger: &str) -> String {
    format!(
        r#"
upstreams:
  who:
    addrs: ["{who}"]
  hooks:
    addrs: ["{hooks}"]
    connect_timeout: 1s
    read_timeout: 2s
webhooks:
  upstream: hooks
  path: /pollgate/events
  linger: {linger}
  secret: "{SECRET}"
routes:
  - path: "/rooms/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 10s
      authorize: who
      authorize_credentials: [X-User]
  - path: "/open/{{room}}"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 10s
"#,
        who = identities.addr(),
        hooks = receiver.addr(),
    )
}

/// A browser-like client: polls `/rooms/<room>/events` as `user` with
/// `?timeout=1` on whichever instance `at` names, again and again with
/// its cursor, until dropped.
struct Poller {
    at: watch::Sender<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Poller {
    fn start(port: u16, room: &str, user: &str) -> Poller {
        let (at, mut rx) = watch::channel(port);
        let (room, user) = (room.to_string(), user.to_string());
        let task = tokio::spawn(async move {
            let http = client();
            let mut cursor = String::new();
            loop {
                let port = *rx.borrow_and_update();
                let url = format!("http://127.0.0.1:{port}/rooms/{room}/events?timeout=1{cursor}");
                let answer = http.get(url).header("X-User", &user).send().await;
                let Ok(answer) = answer else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                assert_eq!(answer.status(), 200);
                let v: Value = answer.json().await.unwrap();
                cursor = format!("&cursor={}", v["cursor"].as_str().unwrap());
            }
        });
        Poller { at, task }
    }

    /// Polls on the instance at `port` from its next poll on.
    fn move_to(&self, port: u16) {
        self.at.send_replace(port);
    }
}

/// `(event, subscriber)` of each event, for comparing sequences.
fn names(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let who = e["subscriber"].as_str().unwrap_or("").to_string();
            (e["event"].as_str().unwrap().to_string(), who)
        })
        .collect()
}

/// The events of a room that ann alone entered and left, once each.
fn ann_came_and_went() -> Vec<(String, String)> {
    vec![
        pair("channel_occupied", ""),
        pair("subscriber_joined", "ann"),
        pair("subscriber_left", "ann"),
        pair("channel_vacated", ""),
    ]
}

fn pair(event: &str, who: &str) -> (String, String) {
    (event.to_string(), who.to_string())
}

/// Asserts each event is well-formed: a distinct id, the channel, a time.
fn well_formed(events: &[Value], channel: &str) {
    let mut ids = std::collections::HashSet::new();
    for e in events {
        assert!(ids.insert(e["id"].as_str().unwrap().to_string()), "{e}");
        assert_eq!(e["channel"], channel, "{e}");
        assert!(e["at"].as_u64().unwrap() > 1_700_000_000_000, "{e}");
    }
}

async fn presence(pg: &Pollgate, channel: &str) -> Vec<String> {
    let (status, _, v) = get_json(&pg.admin(&format!("/v1/presence/{channel}"))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["channel"], channel);
    v["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["since"].as_u64().unwrap() > 1_700_000_000_000, "{s}");
            s["subscriber"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_subscriber_who_polls_again_within_linger_joins_once_and_leaves_once() {
    let (who, hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let pg = Pollgate::start(&config(&who, &hooks, "1s"));
    let ann = Poller::start(pg.port, "1", "ann");
    // Four polls answered by their timeout, each followed by the next: ann
    // stays present throughout.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(presence(&pg, "room:1").await, ["ann"]);
    assert_eq!(names(&hooks.events()), ann_came_and_went()[..2]);
    // Gone: a held poll closed and no other comes.
    drop(ann);
    let events = hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 4)
        .await;
    assert_eq!(names(&events), ann_came_and_went());
    well_formed(&events, "room:1");
    assert!(presence(&pg, "room:1").await.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hooks.events().len(), 4, "nothing more");
    // An anonymous client occupies the room without joining it.
    let (status, _, v) = get_json(&pg.url("/open/1?timeout=1")).await;
    assert_eq!(status, 200, "{v}");
    let events = hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 6)
        .await;
    assert_eq!(
        names(&events[4..]),
        [pair("channel_occupied", ""), pair("channel_vacated", "")]
    );
    assert_eq!(
        pg.metric("pollgate_webhook_events_sent_total{event=\"subscriber_joined\"}")
            .await,
        1.0
    );
}

/// A poll answered by a publish, whose client keeps its connection but
/// does not poll again, leaves `linger` after the answer, not after the
/// poll's own timeout (10 s).
#[tokio::test]
async fn a_client_answered_by_a_publish_that_does_not_poll_again_leaves_after_linger() {
    use std::io::{Read, Write};
    let (who, hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let pg = Pollgate::start(&config(&who, &hooks, "1s"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    s.write_all(b"GET /open/7 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    hooks
        .wait_for(Duration::from_secs(10), |e| !e.is_empty())
        .await;
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    pg.publish("room:7", "text/plain", "x").await;
    let answered = Instant::now();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "an answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let events = hooks
        .wait_for(Duration::from_secs(8), |e| e.len() >= 2)
        .await;
    assert_eq!(
        names(&events),
        [pair("channel_occupied", ""), pair("channel_vacated", "")]
    );
    assert!(
        answered.elapsed() < Duration::from_secs(5),
        "vacated a linger after the answer: {:?}",
        answered.elapsed()
    );
    drop(s);
}

#[tokio::test]
async fn an_sse_stream_is_present_until_it_closes_then_for_linger() {
    let (who, hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let pg = Pollgate::start(&config(&who, &hooks, "1s"));
    let stream = client()
        .get(pg.url("/rooms/2/events"))
        .header("Accept", "text/event-stream")
        .header("X-User", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Open for three lingers: present, never left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(presence(&pg, "room:2").await, ["bob"]);
    assert_eq!(names(&hooks.events()).len(), 2, "{:?}", hooks.events());
    let closed = Instant::now();
    drop(stream);
    let events = hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 4)
        .await;
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "left after its linger"
    );
    assert_eq!(
        names(&events)[2..],
        [pair("subscriber_left", "bob"), pair("channel_vacated", "")]
    );
}

/// Two instances on one redis-server, with the receiver and identities.
async fn fleet(linger: &str) -> (RedisServer, Identities, Receiver, Vec<Pollgate>) {
    let redis = RedisServer::start();
    let (who, hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let body = with_broker(&config(&who, &hooks, linger), &redis.url());
    let gw: Vec<Pollgate> = (0..2)
        .map(|_| {
            let pg = Pollgate::start(&body);
            pg.wait_ready();
            pg
        })
        .collect();
    (redis, who, hooks, gw)
}

#[tokio::test]
async fn a_client_moving_between_instances_stays_present_and_the_fleet_reports_once() {
    let (_redis, _who, hooks, gw) = fleet("1s").await;
    let ann = Poller::start(gw[0].port, "3", "ann");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Both instances list the fleet's presence.
    assert_eq!(presence(&gw[1], "room:3").await, ["ann"]);
    ann.move_to(gw[1].port);
    // Instance 0's linger of ann ends while instance 1 holds her: the
    // fleet sees no change.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(presence(&gw[0], "room:3").await, ["ann"]);
    assert_eq!(names(&hooks.events()), ann_came_and_went()[..2]);
    drop(ann);
    let events = hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 4)
        .await;
    assert_eq!(names(&events), ann_came_and_went());
    well_formed(&events, "room:3");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        hooks.events().len(),
        4,
        "once for the fleet, not per instance"
    );
    assert!(presence(&gw[1], "room:3").await.is_empty());
}

#[tokio::test]
async fn the_subscribers_of_a_killed_instance_leave_when_its_heartbeat_expires() {
    let (_redis, _who, hooks, mut gw) = fleet("1s").await;
    let _ann = Poller::start(gw[0].port, "4", "ann");
    let _bob = Poller::start(gw[1].port, "4", "bob");
    hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 3)
        .await;
    assert_eq!(presence(&gw[0], "room:4").await.len(), 2);
    let killed = Instant::now();
    gw[1].kill();
    // Bob's client finds no instance (its port is closed) and retries.
    let events = hooks
        .wait_for(Duration::from_secs(15), |e| e.len() >= 4)
        .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "left once the heartbeat expired ({took:?})"
    );
    assert_eq!(names(&events)[3], pair("subscriber_left", "bob"));
    assert_eq!(presence(&gw[0], "room:4").await, ["ann"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hooks.events().len(),
        4,
        "ann stays, the room stays occupied"
    );
}

#[tokio::test]
async fn with_the_receiver_down_for_ten_seconds_every_event_arrives_afterwards() {
    let (_redis, _who, mut hooks, gw) = fleet("500ms").await;
    hooks.stop();
    let down = Instant::now();
    // Three subscribers come and go, on both instances, while the
    // receiver is down.
    for (i, user) in ["ann", "bob", "cid"].iter().enumerate() {
        let p = Poller::start(gw[i % 2].port, "5", user);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(p);
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    hooks.up().await;
    let events = hooks
        .wait_for(Duration::from_secs(20), |e| {
            let ids: std::collections::HashSet<&str> =
                e.iter().map(|e| e["id"].as_str().unwrap()).collect();
            ids.len() >= 8
        })
        .await;
    // At least once: a repeat carries the same id and the same event.
    let mut first: Vec<Value> = Vec::new();
    for e in &events {
        match first.iter().find(|f| f["id"] == e["id"]) {
            Some(f) => assert_eq!(f, e, "a repeat is the same event"),
            None => first.push(e.clone()),
        }
    }
    well_formed(&first, "room:5");
    let got = names(&first);
    assert_eq!(got.len(), 8, "{got:?}");
    // In order per channel: occupied first, vacated last, each one's join
    // before their leave.
    assert_eq!(got[0], pair("channel_occupied", ""));
    assert_eq!(got[7], pair("channel_vacated", ""));
    for user in ["ann", "bob", "cid"] {
        let joined = got
            .iter()
            .position(|g| *g == pair("subscriber_joined", user));
        let left = got.iter().position(|g| *g == pair("subscriber_left", user));
        assert!(joined.unwrap() < left.unwrap(), "{got:?}");
    }
    let retried: f64 = gw[0].metric("pollgate_webhook_retries_total").await
        + gw[1].metric("pollgate_webhook_retries_total").await;
    assert!(retried >= 1.0);
    assert_eq!(
        gw[0].metric("pollgate_webhook_events_dropped_total").await,
        0.0
    );
}

#[tokio::test]
async fn presence_is_off_without_webhooks_and_a_bad_identity_is_a_502() {
    let pg = Pollgate::start(support::ROUTES);
    let (status, _, v) = get_json(&pg.admin("/v1/presence/x")).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("webhooks"), "{v}");

    let (who, hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let pg = Pollgate::start(&config(&who, &hooks, "1s"));
    let r = client()
        .get(pg.url("/rooms/6/events?timeout=1"))
        .header("X-User", "!bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("Pollgate-Subscriber"),
        "{v}"
    );
    let (status, _, v) = get_json(&pg.admin("/v1/presence/bad%20name")).await;
    assert_eq!(status, 400, "{v}");
}

#[test]
fn check_names_each_webhooks_problem() {
    let f = temp_file(
        "hooks.yaml",
        r#"
upstreams:
  app:
    addrs: ["127.0.0.1:3000"]
webhooks:
  upstream: nowhere
  path: "no-slash"
  events: [channel_occupied, channel_occupied]
  linger: 10ms
"#,
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    for needle in [
        ": webhooks.upstream: no upstream named 'nowhere'",
        ": webhooks.path: 'no-slash' is not a path",
        ": webhooks.events[1]: 'channel_occupied' is listed twice",
        ": webhooks.linger: must be at least 100ms",
        ": webhooks.secret: is empty",
    ] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
    // A good block is shown by `check`, its secret as ***.
    let f = temp_file(
        "hooks-ok.yaml",
        "upstreams:\n  app:\n    addrs: [\"127.0.0.1:3000\"]\n\
         webhooks:\n  upstream: app\n  linger: 2s\n  secret: \"${HOOK_SECRET}\"\n",
    );
    let (code, out, err) = run_cli(
        &["check", "-c", f.to_str().unwrap()],
        &[("HOOK_SECRET", "do-not-print")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("linger: 2s") && out.contains("secret: '***'"),
        "{out}"
    );
    assert!(!out.contains("do-not-print") && !err.contains("do-not-print"));
    let f = temp_file("hooks2.yaml", "webhooks:\n  events: [channel_opened]\n");
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("webhooks.events") && err.contains("channel_opened"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_sends_what_it_queued_before_it_exits() {
    let (who, mut hooks) = (Identities::start().await, Receiver::start(SECRET).await);
    let mut pg = Pollgate::start(&format!(
        "grace_period: 10s\n{}",
        config(&who, &hooks, "300ms")
    ));
    hooks.stop();
    let ann = Poller::start(pg.port, "7", "ann");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(ann);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Four events wait for a receiver that is down; the instance is told
    // to stop meanwhile, and comes back 2 s later.
    pg.signal("-TERM");
    tokio::time::sleep(Duration::from_secs(2)).await;
    hooks.up().await;
    let events = hooks
        .wait_for(Duration::from_secs(10), |e| e.len() >= 4)
        .await;
    assert_eq!(names(&events).len(), 4, "{events:?}");
    let status = tokio::task::block_in_place(|| pg.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
}
