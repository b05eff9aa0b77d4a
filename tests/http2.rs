//! HTTP/2 on the client listener (docs/api.md, "HTTP/2"): h2c with prior
//! knowledge on `listen`; subscribe (JSON, raw, SSE) and proxied routes over
//! it; many held polls on one connection; a stream reset by the client
//! releases its poll at once, and every kind of held request (poll, SSE,
//! watch) abandoned by a reset or a closed connection is taken off the
//! held gauges; the concurrent-stream limit; a connection
//! that sends no request within `limits.header_timeout` is closed, an
//! established one is not.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::backend::Backend;
use support::h2c::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_held_polls_share_one_connection_and_all_get_the_message() {
    let pg = Pollgate::start(ROUTES);
    let mut client = connect(&pg).await;
    let mut polls = Vec::new();
    for _ in 0..50 {
        let (response, _) = get(&mut client, "/sub/h2news", &[]).await;
        polls.push(tokio::spawn(answer(response)));
    }
    pg.wait_metric("pollgate_held_requests", 50.0).await;
    let id = pg.publish("h2news", "application/json", "{\"n\":1}").await;
    for p in polls {
        let (status, headers, body) = p.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            position(headers["pollgate-cursor"].to_str().unwrap()),
            id.as_str()
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["messages"][0]["data"]["n"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_sse_and_proxied_routes_answer_over_h2() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&format!(
        "upstreams:\n  app:\n    addrs: [\"{}\"]\n{}\n  - path: \"/\"\n    upstream: app\n",
        backend.addr(),
        ROUTES.trim_end()
    ));
    let mut client = connect(&pg).await;
    // Raw: the message's own bytes and type.
    let (raw, _) = get(&mut client, "/raw/h2raw", &[]).await;
    let raw = tokio::spawn(answer(raw));
    // SSE: a stream of events on one HTTP/2 stream.
    let (sse, _) = get(
        &mut client,
        "/sub/h2raw",
        &[("accept", "text/event-stream")],
    )
    .await;
    pg.wait_metric("pollgate_held_requests", 2.0).await;
    let id = pg.publish("h2raw", "text/plain", "plain words").await;
    let (status, headers, body) = raw.await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"plain words"[..]));
    assert_eq!(headers["content-type"], "text/plain");
    let mut sse = sse.await.unwrap().into_body();
    let mut seen = String::new();
    while !seen.contains("plain words") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), sse.data())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        let _ = sse.flow_control().release_capacity(chunk.len());
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&format!("id: {id}_")), "{seen}");
    // A proxied route.
    let (proxied, _) = get(&mut client, "/legacy/thing?x=1", &[]).await;
    let (status, _, body) = answer(proxied).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["path"], "/legacy/thing?x=1");
    // And a subscribe request with a bad target is refused there too.
    let (bad, _) = get(&mut client, "/sub/%zz", &[]).await;
    assert_eq!(answer(bad).await.0, 400);
    let refused = "pollgate_refused_total{reason=\"bad_target\"}";
    assert_eq!(pg.metric(refused).await, 1.0, "counted as on HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_by_the_client_releases_its_poll_at_once() {
    let pg = Pollgate::start(ROUTES);
    let mut client = connect(&pg).await;
    let (keep, _) = get(&mut client, "/sub/reset", &[]).await;
    let (_, mut gone) = get(&mut client, "/sub/reset", &[]).await;
    pg.wait_metric("pollgate_held_requests", 2.0).await;
    gone.send_reset(h2::Reason::CANCEL);
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let disconnected = "pollgate_subscribe_requests_total{outcome=\"disconnected\"}";
    pg.wait_metric(disconnected, 1.0).await;
    // The other stream of the same connection is still held, and answered.
    pg.publish("reset", "text/plain", "still here").await;
    assert_eq!(answer(keep).await.0, 200);
}

/// An HTTP/2 connection (prior knowledge) to `pg` whose socket is closed
/// when the returned task is aborted.
async fn connect_abortable(
    pg: &Pollgate,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(("127.0.0.1", pg.port)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_gauges_come_back_to_zero_when_held_streams_are_abandoned() {
    const HELD: &str = "pollgate_held_requests";
    const WATCHERS: &str = "pollgate_held_watchers";
    let legacy = support::legacy::Legacy::start(true).await;
    legacy.set("5", r#"{"id":5}"#);
    let pg = Pollgate::start(&format!(
        "upstreams:\n  shop:\n    addrs: [\"127.0.0.1:{}\"]\n{}\n  - path: \"/orders/{{id}}\"\n    \
         upstream: shop\n    watch:\n      channels: [\"order:{{id}}\"]\n",
        legacy.port,
        ROUTES.trim_end()
    ));
    let sse = [("accept", "text/event-stream")];
    let unchanged = [("if-none-match", "\"v1\"")];
    // A poll, an SSE stream and a watch, each reset by the client.
    let (mut client, _connection) = connect_abortable(&pg).await;
    let (_a, mut poll) = get(&mut client, "/sub/abandoned", &[]).await;
    let (_b, mut stream) = get(&mut client, "/sub/abandoned", &sse).await;
    let (_c, mut watch) = get(&mut client, "/orders/5", &unchanged).await;
    pg.wait_metric(HELD, 3.0).await;
    pg.wait_metric(WATCHERS, 1.0).await;
    for s in [&mut poll, &mut stream, &mut watch] {
        s.send_reset(h2::Reason::CANCEL);
    }
    pg.wait_metric(HELD, 0.0).await;
    pg.wait_metric(WATCHERS, 0.0).await;
    // The same three held on a connection that the client closes.
    let (mut client, connection) = connect_abortable(&pg).await;
    let _held = [
        get(&mut client, "/sub/abandoned", &[]).await,
        get(&mut client, "/sub/abandoned", &sse).await,
        get(&mut client, "/orders/5", &unchanged).await,
    ];
    pg.wait_metric(HELD, 3.0).await;
    pg.wait_metric(WATCHERS, 1.0).await;
    connection.abort();
    pg.wait_metric(HELD, 0.0).await;
    pg.wait_metric(WATCHERS, 0.0).await;
    // Nothing was answered: every one of them counts as disconnected.
    let disconnected = "pollgate_subscribe_requests_total{outcome=\"disconnected\"}";
    assert_eq!(pg.metric(disconnected).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_capped() {
    let pg = Pollgate::start(&format!(
        "listener:\n  h2_max_concurrent_streams: 3\n{ROUTES}"
    ));
    let mut client = connect(&pg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(get(&mut client, "/sub/capped?timeout=2", &[]).await.0);
    }
    pg.wait_metric("pollgate_held_requests", 3.0).await;
    // A fourth stream waits for one of the three to end.
    let (fourth, _) = get(&mut client, "/sub/capped?timeout=0", &[]).await;
    let fourth = tokio::spawn(answer(fourth));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fourth.is_finished(),
        "the server allows only 3 streams at once"
    );
    assert_eq!(pg.metric("pollgate_held_requests").await, 3.0);
    for h in held {
        assert_eq!(answer(h).await.0, 200);
    }
    assert_eq!(fourth.await.unwrap().0, 200, "served once there is room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_route_holds_and_answers_over_h2() {
    let legacy = support::legacy::Legacy::start(true).await;
    legacy.set("9", r#"{"id":9}"#);
    let pg = Pollgate::start(&format!(
        "upstreams:\n  shop:\n    addrs: [\"127.0.0.1:{}\"]\nroutes:\n  - path: \"/orders/{{id}}\"\n    \
         upstream: shop\n    watch:\n      channels: [\"order:{{id}}\"]\n",
        legacy.port
    ));
    let mut client = connect(&pg).await;
    let (first, _) = get(&mut client, "/orders/9", &[]).await;
    let (status, headers, _) = answer(first).await;
    assert_eq!((status, headers["etag"].to_str().unwrap()), (200, "\"v1\""));
    let (held, _) = get(&mut client, "/orders/9", &[("if-none-match", "\"v1\"")]).await;
    let held = tokio::spawn(answer(held));
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    legacy.set("9", r#"{"id":9,"v":2}"#);
    pg.publish("order:9", "text/plain", "").await;
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status, headers["etag"].to_str().unwrap()), (200, "\"v2\""));
    assert_eq!(body, br#"{"id":9,"v":2}"#);
}

/// The whole HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads (and drops) what `pg` sends on `tcp` until it closes the
/// connection; returns how long that took, or None if it is still open
/// after `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let reading = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(limit, reading).await.ok()?;
    Some(started.elapsed())
}

/// A gateway with a 1 s `limits.header_timeout`.
fn quick() -> Pollgate {
    Pollgate::start(&format!("limits:\n  header_timeout: 1s\n{ROUTES}"))
}

const HEADER_TIMEOUTS: &str = "pollgate_refused_total{reason=\"header_timeout\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_h2_preface_is_closed_at_the_header_timeout() {
    let pg = quick();
    let mut tcp = TcpStream::connect(("127.0.0.1", pg.port)).await.unwrap();
    tcp.write_all(b"PRI").await.unwrap();
    let took = closed_within(&mut tcp, Duration::from_secs(6))
        .await
        .expect("the connection is closed");
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    pg.wait_metric(HEADER_TIMEOUTS, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_without_a_request_is_closed_at_the_header_timeout() {
    let pg = quick();
    // The whole preface; then the preface and the client's SETTINGS (an
    // empty frame), but no HEADERS.
    let settings: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    for (n, opening) in [PREFACE.to_vec(), [PREFACE, settings].concat()]
        .into_iter()
        .enumerate()
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", pg.port)).await.unwrap();
        tcp.write_all(&opening).await.unwrap();
        let took = closed_within(&mut tcp, Duration::from_secs(6))
            .await
            .expect("the connection is closed");
        assert!(took < Duration::from_millis(2500), "closed after {took:?}");
        pg.wait_metric(HEADER_TIMEOUTS, n as f64 + 1.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_established_h2_connection_outlives_the_header_timeout() {
    let pg = quick();
    let mut client = connect(&pg).await;
    // A poll held for longer than the header timeout is answered.
    let (held, _) = get(&mut client, "/sub/outlive", &[]).await;
    let held = tokio::spawn(answer(held));
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let id = pg.publish("outlive", "text/plain", "late").await;
    let (status, headers, _) = held.await.unwrap();
    assert_eq!(
        (
            status,
            position(headers["pollgate-cursor"].to_str().unwrap())
        ),
        (200, id.as_str())
    );
    // Idle longer than the header timeout, the connection still serves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (again, _) = get(&mut client, "/sub/outlive?timeout=0", &[]).await;
    assert_eq!(answer(again).await.0, 200);
    // And reqwest's h2c client is served as ever.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c
        .get(pg.url("/sub/outlive?timeout=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, http::Version::HTTP_2)
    );
    assert_eq!(pg.metric(HEADER_TIMEOUTS).await, 0.0);
}
