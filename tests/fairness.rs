//! Fairness per client: `limits.max_held_per_client` (polls, SSE streams,
//! HTTP/2 streams and watch requests held by one address), and
//! `limits.polls_per_client` (new polls a second), answered with `429` and
//! `Retry-After`; the client found through `trusted_proxies` and
//! `X-Forwarded-For`. Clients connect from 127.0.0.1 and 127.0.0.2 (both
//! loopback) to be two addresses.

mod support;

use bytes::Bytes;
use h2::client::SendRequest;
use std::net::IpAddr;
use std::time::Duration;
use support::legacy::Legacy;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HELD: &str = "pollgate_held_requests ";
const OVER_HELD: &str = "pollgate_refused_total{reason=\"max_held_per_client\"}";
const OVER_RATE: &str = "pollgate_refused_total{reason=\"polls_per_client\"}";

/// A TCP connection to `pg`'s client listener from the address `from`.
async fn connect_from(pg: &Pollgate, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let to = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends a GET of `path` with `headers` on `s`.
async fn send(s: &mut TcpStream, path: &str, headers: &[(&str, &str)]) {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
}

/// An answer: status, headers (names lowercased) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(k, _)| k == name);
        found.map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads the head of one answer on `s` (its body left unread).
async fn head(s: &mut TcpStream) -> Answer {
    let read = async {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert!(
                s.read(&mut byte).await.unwrap() > 0,
                "closed before an answer"
            );
            buf.push(byte[0]);
        }
        let text = String::from_utf8(buf).unwrap();
        let mut lines = text.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Answer {
            status: status.parse().unwrap(),
            headers,
            body: Vec::new(),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .expect("no answer within 3 s (held?)")
}

/// Reads one whole answer (by its Content-Length) on `s`, within 3 s.
async fn answer(s: &mut TcpStream) -> Answer {
    let mut a = head(s).await;
    let len: usize = a.header("content-length").unwrap().parse().unwrap();
    a.body = vec![0; len];
    s.read_exact(&mut a.body).await.unwrap();
    a
}

/// Whether nothing is answered on `s` for 300 ms.
async fn still_held(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(300), s.read(&mut byte))
        .await
        .is_err()
}

/// A held poll (or an answer to it): a GET of `path` from `from`.
async fn poll_from(pg: &Pollgate, from: &str, path: &str, headers: &[(&str, &str)]) -> TcpStream {
    let mut s = connect_from(pg, from).await;
    send(&mut s, path, headers).await;
    s
}

/// Asserts a 429 refusal with Retry-After and the JSON error `error`.
fn assert_refused(a: &Answer, error: &str) {
    assert_eq!(a.status, 429, "{:?}", a.headers);
    let retry: u64 = a
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After: {retry}");
    assert_eq!(a.json()["error"], error, "{}", a.json());
    assert!(a.json()["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

/// An HTTP/2 connection (prior knowledge) from the address `from`.
async fn h2_from(pg: &Pollgate, from: &str) -> SendRequest<Bytes> {
    let tcp = connect_from(pg, from).await;
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// An HTTP/2 answer that must come within 3 s.
async fn h2_answer(response: h2::client::ResponseFuture) -> (u16, http::HeaderMap, Vec<u8>) {
    let within = tokio::time::timeout(Duration::from_secs(3), h2c::answer(response));
    within.await.expect("no HTTP/2 answer within 3 s (held?)")
}

fn limits(limits: &str) -> String {
    format!("limits:\n{limits}{ROUTES}")
}

#[tokio::test]
async fn one_client_cannot_take_every_held_slot() {
    let pg = Pollgate::start(&limits("  max_held_per_client: 2\n"));
    let mut a1 = poll_from(&pg, "127.0.0.1", "/sub/a", &[]).await;
    let a2 = poll_from(&pg, "127.0.0.1", "/sub/b", &[]).await;
    pg.wait_metric(HELD, 2.0).await;

    // A third from the same address is refused; another address is served.
    let mut a3 = poll_from(&pg, "127.0.0.1", "/sub/c", &[]).await;
    assert_refused(&answer(&mut a3).await, "too_many_held");
    assert_eq!(pg.metric(OVER_HELD).await, 1.0);
    let mut b1 = poll_from(&pg, "127.0.0.2", "/sub/c", &[]).await;
    pg.wait_metric(HELD, 3.0).await;
    assert!(still_held(&mut b1).await);

    // One answered: its slot is given back, the next poll is held.
    pg.publish("a", "text/plain", "hi").await;
    assert_eq!(answer(&mut a1).await.status, 200);
    send(&mut a1, "/sub/c", &[]).await;
    pg.wait_metric(HELD, 3.0).await;
    assert!(still_held(&mut a1).await);
    // And a client that leaves gives its slot back too.
    drop(a2);
    pg.wait_metric(HELD, 2.0).await;
    let mut a4 = poll_from(&pg, "127.0.0.1", "/sub/d", &[]).await;
    pg.wait_metric(HELD, 3.0).await;
    assert!(still_held(&mut a4).await);
    // Full again.
    send(&mut a3, "/sub/e", &[]).await;
    assert_refused(&answer(&mut a3).await, "too_many_held");
    assert_eq!(pg.metric(OVER_HELD).await, 2.0);

    pg.publish("c", "text/plain", "all").await;
    assert_eq!(answer(&mut a1).await.status, 200);
    assert_eq!(answer(&mut b1).await.status, 200);
}

#[tokio::test]
async fn sse_streams_and_http2_streams_count_too() {
    let pg = Pollgate::start(&limits("  max_held_per_client: 2\n"));
    let sse = [("Accept", "text/event-stream")];
    let mut stream = poll_from(&pg, "127.0.0.1", "/sub/a", &sse).await;
    assert_eq!(head(&mut stream).await.status, 200);
    let mut h2 = h2_from(&pg, "127.0.0.1").await;
    let (held, _keep) = h2c::get(&mut h2, "/sub/b", &[]).await;
    pg.wait_metric(HELD, 2.0).await;

    // Over the limit, on an HTTP/2 stream and on HTTP/1.1.
    let (refused, _s) = h2c::get(&mut h2, "/sub/c", &[]).await;
    let (status, headers, body) = h2_answer(refused).await;
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "too_many_held");
    let mut lean = poll_from(&pg, "127.0.0.1", "/sub/c", &[]).await;
    assert_refused(&answer(&mut lean).await, "too_many_held");
    let mut sse2 = poll_from(&pg, "127.0.0.1", "/sub/c", &sse).await;
    assert_refused(&answer(&mut sse2).await, "too_many_held");
    assert_eq!(pg.metric(OVER_HELD).await, 3.0);

    // Another address over HTTP/2 is served.
    let mut other = h2_from(&pg, "127.0.0.2").await;
    let (other_held, _keep2) = h2c::get(&mut other, "/sub/c", &[]).await;
    pg.wait_metric(HELD, 3.0).await;

    // The SSE stream ends: its slot is given back.
    drop(stream);
    pg.wait_metric(HELD, 2.0).await;
    let (again, _keep3) = h2c::get(&mut h2, "/sub/d", &[]).await;
    pg.wait_metric(HELD, 3.0).await;

    pg.publish("b", "text/plain", "x").await;
    assert_eq!(h2_answer(held).await.0, 200);
    pg.publish("c", "text/plain", "x").await;
    assert_eq!(h2_answer(other_held).await.0, 200);
    pg.publish("d", "text/plain", "x").await;
    assert_eq!(h2_answer(again).await.0, 200);
}

#[tokio::test]
async fn held_watch_requests_count_too() {
    let legacy = Legacy::start(true).await;
    legacy.set("1", r#"{"id":1}"#);
    let config = format!(
        "limits:\n  max_held_per_client: 1\nupstreams:\n  shop:\n    addrs: [\"127.0.0.1:{}\"]\n\
         routes:\n  - path: \"/orders/{{id}}\"\n    methods: [GET]\n    upstream: shop\n    \
         watch:\n      channels: [\"order:{{id}}\"]\n      timeout: 10s\n",
        legacy.port
    );
    let pg = Pollgate::start(&config);
    // Answered at once: admitted, then given back.
    let mut s = poll_from(&pg, "127.0.0.1", "/orders/1", &[]).await;
    let first = answer(&mut s).await;
    assert_eq!(first.status, 200);
    let etag = first.header("etag").unwrap().to_string();
    let inm = [("If-None-Match", etag.as_str())];
    let mut held = poll_from(&pg, "127.0.0.1", "/orders/1", &inm).await;
    pg.wait_metric("pollgate_held_watchers ", 1.0).await;
    let mut over = poll_from(&pg, "127.0.0.1", "/orders/1", &inm).await;
    assert_refused(&answer(&mut over).await, "too_many_held");
    // Another address, with reqwest bound to it.
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let url = pg.url("/orders/1");
    let watch = other.get(url).header("If-None-Match", &etag).send();
    let watching = tokio::spawn(watch);
    pg.wait_metric("pollgate_held_watchers ", 2.0).await;
    assert!(still_held(&mut held).await);
    assert!(!watching.is_finished());
}

#[tokio::test]
async fn a_burst_over_polls_per_client_is_refused() {
    let pg = Pollgate::start(&limits("  polls_per_client: 2\n"));
    let mut s = connect_from(&pg, "127.0.0.1").await;
    let mut statuses = Vec::new();
    let mut first_refusal = None;
    for _ in 0..6 {
        send(&mut s, "/sub/a?timeout=0", &[]).await;
        let a = answer(&mut s).await;
        statuses.push(a.status);
        if a.status == 429 && first_refusal.is_none() {
            first_refusal = Some(a);
        }
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 2, "{statuses:?}");
    assert_refused(&first_refusal.unwrap(), "too_many_polls");
    assert_eq!(pg.metric(OVER_RATE).await, refused as f64);
    assert_eq!(pg.metric(OVER_HELD).await, 0.0);

    // Another address has its own bucket, on HTTP/2 too.
    let mut other = poll_from(&pg, "127.0.0.2", "/sub/a?timeout=0", &[]).await;
    assert_eq!(answer(&mut other).await.status, 200);
    let mut h2 = h2_from(&pg, "127.0.0.2").await;
    let mut h2_statuses = Vec::new();
    for _ in 0..4 {
        let (r, _s) = h2c::get(&mut h2, "/sub/a?timeout=0", &[]).await;
        h2_statuses.push(h2_answer(r).await.0);
    }
    assert!(h2_statuses.contains(&429), "{h2_statuses:?}");

    // The bucket fills again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&mut s, "/sub/a?timeout=0", &[]).await;
    assert_eq!(answer(&mut s).await.status, 200);
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_in_x_forwarded_for() {
    let pg = Pollgate::start(&format!(
        "trusted_proxies: [\"127.0.0.1/32\"]\n{}",
        limits("  max_held_per_client: 1\n")
    ));
    let xff = |v: &'static str| [("X-Forwarded-For", v)];
    // Two clients behind the trusted proxy: a budget each.
    let mut c1 = poll_from(&pg, "127.0.0.1", "/sub/a", &xff("198.51.100.1")).await;
    let mut c2 = poll_from(&pg, "127.0.0.1", "/sub/a", &xff("198.51.100.2")).await;
    pg.wait_metric(HELD, 2.0).await;
    assert!(still_held(&mut c1).await && still_held(&mut c2).await);
    // What the client put in front of the proxy's entry changes nothing.
    let spoofed = xff("203.0.113.7, 198.51.100.1");
    let mut c1_again = poll_from(&pg, "127.0.0.1", "/sub/a", &spoofed).await;
    assert_refused(&answer(&mut c1_again).await, "too_many_held");
    // The same on a Pingora session (HTTP/2).
    let mut h2 = h2_from(&pg, "127.0.0.1").await;
    let (r, _s) = h2c::get(&mut h2, "/sub/a", &xff("198.51.100.1")).await;
    assert_eq!(h2_answer(r).await.0, 429);
    let (c3, _keep) = h2c::get(&mut h2, "/sub/a", &xff("198.51.100.3")).await;
    pg.wait_metric(HELD, 3.0).await;
    // The proxy's own requests (no X-Forwarded-For) are its own.
    let mut proxy = poll_from(&pg, "127.0.0.1", "/sub/a", &[]).await;
    pg.wait_metric(HELD, 4.0).await;
    // A peer that is not trusted cannot pick its identity.
    let mut u1 = poll_from(&pg, "127.0.0.2", "/sub/a", &xff("198.51.100.8")).await;
    pg.wait_metric(HELD, 5.0).await;
    let mut u2 = poll_from(&pg, "127.0.0.2", "/sub/a", &xff("198.51.100.9")).await;
    assert_refused(&answer(&mut u2).await, "too_many_held");
    assert_eq!(pg.metric(OVER_HELD).await, 3.0);

    pg.publish("a", "text/plain", "x").await;
    for s in [&mut c1, &mut c2, &mut proxy, &mut u1] {
        assert_eq!(answer(s).await.status, 200);
    }
    assert_eq!(h2_answer(c3).await.0, 200);
}

#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored() {
    let pg = Pollgate::start(&limits("  max_held_per_client: 1\n"));
    let xff = |v: &'static str| [("X-Forwarded-For", v)];
    let mut held = poll_from(&pg, "127.0.0.1", "/sub/a", &xff("198.51.100.1")).await;
    pg.wait_metric(HELD, 1.0).await;
    let mut spoof = poll_from(&pg, "127.0.0.1", "/sub/a", &xff("198.51.100.2")).await;
    assert_refused(&answer(&mut spoof).await, "too_many_held");
    let mut h2 = h2_from(&pg, "127.0.0.1").await;
    let (r, _s) = h2c::get(&mut h2, "/sub/a", &xff("198.51.100.3")).await;
    assert_eq!(h2_answer(r).await.0, 429);
    assert!(still_held(&mut held).await);
}

#[test]
fn check_reads_the_new_keys_and_names_a_bad_cidr() {
    let good = temp_file(
        "fair.yaml",
        "limits: {max_held_per_client: 100, polls_per_client: 20}\n\
         trusted_proxies: [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.1\"]\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let bad = temp_file(
        "unfair.yaml",
        "trusted_proxies: [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("trusted_proxies[1]: '10.0.0.0/40'"), "{err}");
}
