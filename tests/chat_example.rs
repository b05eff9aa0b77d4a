//! The chat walk-through of docs/chat-example.md, as written: the legacy
//! backend example, pollgate on conf/examples/chat.yaml, two listeners and
//! a poster; then who is in the room, from pollgate's presence webhooks.

mod support;

use pollgate::presence::webhooks::signature;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

/// One poll of room 1 as `who` (`curl -s -H 'Authorization: Bearer WHO'
/// .../rooms/1/events?cursor=C`): (status, JSON envelope or Null).
async fn poll(pg: &Pollgate, who: &str, query: &str) -> (u16, Value) {
    poll_url(pg.url(&format!("/rooms/1/events{query}")), who).await
}

async fn poll_url(url: String, who: &str) -> (u16, Value) {
    let r = client()
        .get(url)
        .header("Authorization", format!("Bearer {who}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `follow WHO &`: polls room 1 again and again from the last answer's
/// cursor, until a chat message (one with a `text`) arrives. Returns the
/// data of every message seen, in order.
fn follow(pg: &Pollgate, who: &'static str) -> tokio::task::JoinHandle<Vec<Value>> {
    let events = pg.url("/rooms/1/events");
    tokio::spawn(async move {
        let (mut seen, mut cursor) = (Vec::new(), String::new());
        while !seen.iter().any(|m: &Value| m.get("text").is_some()) {
            let (status, v) = poll_url(format!("{events}{cursor}"), who).await;
            assert_eq!(status, 200, "{who}: {v}");
            cursor = format!("?cursor={}", v["cursor"].as_str().unwrap());
            seen.extend(
                v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["data"].clone()),
            );
        }
        seen
    })
}

/// `curl -s .../rooms/1/members`: the members the backend knows.
async fn members(pg: &Pollgate) -> Value {
    get_json(&pg.url("/rooms/1/members")).await.2["members"].clone()
}

/// Asks `members` until it is `want` (or panics after `within`).
async fn wait_members(pg: &Pollgate, want: Value, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = members(pg).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "members are {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_long_poll_a_room_while_a_third_posts() {
    let example = support::example::Example::start("chat-backend", "chat.yaml", "127.0.0.1:3000");
    let pg = &example.pg;

    let ann = follow(pg, "ann");
    let bob = follow(pg, "bob");
    wait_members(pg, json!(["ann", "bob"]), Duration::from_secs(10)).await;

    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .header("Content-Type", "application/json")
        .body(r#"{"user":"cat","text":"hello room 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("pollgate-message-id"));

    for listener in [ann, bob] {
        let seen = listener.await.unwrap();
        let (said, news) = seen.split_last().unwrap();
        assert_eq!(said["text"], "hello room 1");
        assert_eq!(said["user"], "cat");
        // Before it, only the room's presence news.
        assert!(news.iter().all(|m| m["type"] == "presence"), "{seen:?}");
    }
    // The backend still serves its own reads through the proxy...
    let (_, _, list) = get_json(&pg.url("/rooms/1/messages")).await;
    assert_eq!(list[0]["text"], "hello room 1");
    // ...and says who may listen.
    let r = client()
        .get(pg.url("/rooms/1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("log in first"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_is_in_the_room_follows_the_webhooks() {
    let example = support::example::Example::start("chat-backend", "chat.yaml", "127.0.0.1:3000");
    let pg = &example.pg;

    // Ann's first poll (timeout=0, to take the room's position) makes her
    // present: the backend hears it from pollgate, and so does the admin API.
    let (status, v) = poll(pg, "ann", "?timeout=0").await;
    assert_eq!(status, 200);
    let mut cursor = v["cursor"].as_str().unwrap().to_string();
    wait_members(pg, json!(["ann"]), Duration::from_secs(10)).await;
    let (_, _, here) = get_json(&pg.admin("/v1/presence/room:1")).await;
    assert_eq!(here["subscribers"][0]["subscriber"], "ann");

    // Her next poll gets the backend's presence message, published to the room.
    let (_, v) = poll(pg, "ann", &format!("?cursor={cursor}")).await;
    let news = &v["messages"][0]["data"];
    assert_eq!(news["type"], "presence");
    assert_eq!(news["event"], "joined");
    assert_eq!(news["subscriber"], "ann");
    assert_eq!(news["members"], json!(["ann"]));
    let (_, _, snapshot) = get_json(&pg.url("/rooms/1/members")).await;
    assert_eq!(snapshot["version"], news["version"]);
    cursor = v["cursor"].as_str().unwrap().to_string();

    // She stops polling: once `linger` (5 s) has passed, she is gone.
    let stopped = Instant::now();
    wait_members(pg, json!([]), Duration::from_secs(15)).await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(4),
        "left before the linger"
    );
    let (_, _, here) = get_json(&pg.admin("/v1/presence/room:1")).await;
    assert_eq!(here["subscribers"], json!([]));
    // Whoever follows the room from there hears that she left.
    let (_, v) = poll(pg, "bob", &format!("?cursor={cursor}")).await;
    let news = &v["messages"][0]["data"];
    assert_eq!(
        (&news["event"], &news["subscriber"]),
        (&json!("left"), &json!("ann"))
    );
    assert_eq!(news["members"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_takes_signed_webhooks_once_per_id() {
    let example = support::example::Example::start("chat-backend", "chat.yaml", "127.0.0.1:3000");
    let pg = &example.pg;
    let hook = |event: &str, id: &str, key: &[u8]| {
        let body =
            json!({"id": id, "event": event, "channel": "room:1", "subscriber": "zed", "at": 1})
                .to_string();
        client()
            .post(pg.url("/pollgate/events")) // through the catch-all route
            .header("Content-Type", "application/json")
            .header("Pollgate-Signature", signature(key, body.as_bytes()))
            .body(body)
            .send()
    };
    let signed = |event: &str, id: &str| hook(event, id, b"chat-demo-secret");

    // Unsigned, or signed with another secret: refused, nothing changes.
    let r = client().post(pg.url("/pollgate/events")).body("{}").send();
    assert_eq!(r.await.unwrap().status(), 401);
    let r = hook("subscriber_joined", "x-1", b"guess").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(members(pg).await, json!([]));

    let r = signed("subscriber_joined", "x-1").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(members(pg).await, json!(["zed"]));
    // Another event under an id already taken is a repeat: ignored.
    let r = signed("subscriber_left", "x-1").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(members(pg).await, json!(["zed"]));
    signed("subscriber_left", "x-2").await.unwrap();
    assert_eq!(members(pg).await, json!([]));
}
