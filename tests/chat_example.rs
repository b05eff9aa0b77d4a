//! The chat walk-through of docs/chat-example.md, as written: the legacy
//! backend example, pollgate on conf/examples/chat.yaml, two listeners and
//! a poster.

mod support;

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use support::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_pollgate"));
    bin.parent().unwrap().join("examples").join("chat-backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_long_poll_a_room_while_a_third_posts() {
    let backend_port = free_port();
    let _backend = Killed(
        Command::new(example_binary())
            .arg(format!("127.0.0.1:{backend_port}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("cargo builds examples for tests"),
    );
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/examples/chat.yaml"
    ))
    .unwrap();
    let conf: String = conf
        .lines()
        .filter(|l| !l.starts_with("listen:") && !l.starts_with("admin_listen:"))
        .map(|l| l.replace("127.0.0.1:3000", &format!("127.0.0.1:{backend_port}")) + "\n")
        .collect();
    let pg = Pollgate::start(&conf);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", backend_port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

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
