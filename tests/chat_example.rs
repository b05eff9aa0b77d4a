//! The chat walk-through of docs/chat-example.md, as written: the legacy
//! backend example, pollgate on conf/examples/chat.yaml, two listeners and
//! a poster.

mod support;

use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_long_poll_a_room_while_a_third_posts() {
    let example = support::example::Example::start("chat-backend", "chat.yaml", "127.0.0.1:3000");
    let pg = &example.pg;

    let listen = |who: &'static str| {
        let url = pg.url("/rooms/1/events");
        tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("Authorization", format!("Bearer {who}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let ann = listen("ann");
    let bob = listen("bob");
    pg.wait_metric("pollgate_held_requests", 2.0).await;

    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .header("Content-Type", "application/json")
        .body(r#"{"user":"cat","text":"hello room 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("pollgate-message-id"));

    for poll in [ann, bob] {
        let (status, v) = poll.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["messages"][0]["data"]["text"], "hello room 1");
        assert_eq!(v["messages"][0]["data"]["user"], "cat");
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
