//! Upstreams that send 1xx answers (`100 Continue`, `103 Early Hints`)
//! before their final one: on publish-through routes, authorization calls,
//! watch fetches and plain proxy routes, the client gets the final answer
//! and the process does not panic. The backend is a raw socket that writes
//! its answers byte for byte.

mod support;

use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the raw backend read it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// A raw HTTP/1.1 backend: every request gets the `interim` heads (1xx),
/// each written and flushed apart, then a final `200` whose body is
/// `{"path": <path>, "body": <request body>}`, with `ETag: "v1"`.
struct RawBackend {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `100 Continue`, then `103 Early Hints` with a `Link` field.
const INTERIM: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
];

impl RawBackend {
    async fn start(interim: &'static [&'static str]) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(serve(stream, interim, record.clone()));
            }
        });
        RawBackend { port, seen, task }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves requests on one connection until it closes.
async fn serve(mut stream: TcpStream, interim: &[&str], record: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[end..end + length].to_vec();
        buf.drain(..end + length);
        record.lock().unwrap().push(Seen {
            method,
            path: path.clone(),
            body: body.clone(),
        });
        for head in interim {
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let answer = serde_json::json!({
            "path": path,
            "body": String::from_utf8_lossy(&body),
        })
        .to_string();
        let last = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"v1\"\r\nX-Final: yes\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if stream.write_all(last.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A gateway whose upstream `app` is `backend`, with one route of each kind.
fn start(backend: &RawBackend) -> Pollgate {
    let pg = Pollgate::start_logged(&format!(
        r#"limits:
  max_body: 1MiB
upstreams:
  app:
    addrs: ["{addr}"]
    connect_timeout: 1s
    read_timeout: 2s
routes:
  - path: "/rooms/{{room}}/messages"
    methods: [POST]
    upstream: app
    publish:
      channel: "room-{{room}}"
  - path: "/rooms/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room-{{room}}"]
      first: oldest
      timeout: 5s
  - path: "/guarded/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room-{{room}}"]
      first: oldest
      timeout: 5s
      authorize: app
  - path: "/orders/{{id}}"
    methods: [GET]
    upstream: app
    watch:
      channels: ["order-{{id}}"]
      timeout: 5s
  - path: "/"
    upstream: app
"#,
        addr = backend.addr()
    ));
    pg.wait_ready();
    pg
}

/// A client that gives up after 5 s (a connection closed without an answer
/// is an error, not a hang).
fn patient() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_through_route_skips_1xx_and_publishes_the_final_answer() {
    let backend = RawBackend::start(INTERIM).await;
    let pg = start(&backend);
    let r = patient()
        .post(pg.url("/rooms/r1/messages"))
        .header("Content-Type", "application/json")
        .body(r#"{"text":"hi"}"#)
        .send()
        .await
        .expect("the client gets an answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-final"], "yes");
    let id = r
        .headers()
        .get("pollgate-message-id")
        .expect("the final answer was published")
        .to_str()
        .unwrap()
        .to_string();
    let sent: Value = r.json().await.unwrap();
    assert_eq!(sent["path"], "/rooms/r1/messages");
    assert_eq!(sent["body"], r#"{"text":"hi"}"#);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, br#"{"text":"hi"}"#);

    // A subscriber gets the upstream's final answer as the message.
    let (status, _, v) = get_json(&pg.url("/rooms/r1/events")).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&v), vec![id]);
    assert_eq!(v["messages"][0]["data"]["path"], "/rooms/r1/messages");
    pg.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorize_call_skips_1xx_and_admits_the_poll() {
    let backend = RawBackend::start(INTERIM).await;
    let pg = start(&backend);
    let id = pg.publish("room-r2", "text/plain", "hello").await;
    let r = patient()
        .get(pg.url("/guarded/r2/events"))
        .header("Authorization", "Bearer any")
        .send()
        .await
        .expect("the client gets an answer");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(ids(&v), vec![id]);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "one authorization call");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/guarded/r2/events");
    pg.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_fetch_skips_1xx_and_answers_the_final_representation() {
    let backend = RawBackend::start(INTERIM).await;
    let pg = start(&backend);
    let r = patient()
        .get(pg.url("/orders/7"))
        .send()
        .await
        .expect("the client gets an answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"v1\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/orders/7");
    pg.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_proxy_route_answers_the_final_answer_over_h1_and_h2() {
    let backend = RawBackend::start(INTERIM).await;
    let pg = start(&backend);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for (client, path) in [(patient(), "/api/h1"), (h2, "/api/h2")] {
        let r = client
            .get(pg.url(path))
            .send()
            .await
            .expect("the client gets an answer");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-final"], "yes");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], path);
    }

    // On the raw connection: the 1xx heads may be passed on, but the final
    // answer follows them, and the connection stays usable.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..2 {
        std::io::Write::write_all(&mut s, b"GET /api/raw HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut status;
        loop {
            let (line, _, _) = read_answer(&mut s);
            status = line;
            if !status
                .split_whitespace()
                .nth(1)
                .is_some_and(|c| c.starts_with('1'))
            {
                break;
            }
        }
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    pg.assert_no_panic();
}
