//! Subscribing (docs/api.md): hold, wake, cursors, gaps, formats, keep-alive and
//! disconnects, against a real pollgate over HTTP.
//! Every test runs on both brokers (memory and a real redis-server), so
//! their semantics cannot drift.

mod support;

use serde_json::Value;
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

async fn a_held_poll_is_answered_by_a_publish(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let url = pg.url("/sub/news");
    let poll = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let started = Instant::now();
    let id = pg
        .publish("news", "application/json", r#"{"text":"hi"}"#)
        .await;
    let (status, headers, body) = poll.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(
        position(headers["pollgate-cursor"].to_str().unwrap()),
        id.as_str()
    );
    assert_eq!(position(body["cursor"].as_str().unwrap()), id.as_str());
    assert_eq!(body["gap"], false);
    assert_eq!(body["messages"][0]["id"], id.as_str());
    assert_eq!(body["messages"][0]["channel"], "news");
    assert_eq!(body["messages"][0]["content_type"], "application/json");
    assert_eq!(body["messages"][0]["data"]["text"], "hi");
    // Counted by the poll's task just after its answer left.
    pg.wait_metric(
        "pollgate_subscribe_requests_total{outcome=\"message\"}",
        1.0,
    )
    .await;
    pg.wait_metric("pollgate_messages_delivered_total", 1.0)
        .await;
    pg.wait_metric("pollgate_delivery_latency_seconds_count", 1.0)
        .await;
}

async fn a_timeout_answers_empty_with_the_cursor_unchanged_and_jitter(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let id = pg.publish("t", "text/plain", "one").await;
    let started = Instant::now();
    let (status, headers, body) = get_json(&pg.url(&format!("/sub/t?cursor={id}&timeout=1"))).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(took <= Duration::from_millis(1100), "{took:?}");
    assert!(
        took >= Duration::from_millis(880),
        "jitter is at most 10%: {took:?}"
    );
    assert_eq!(body["messages"], serde_json::json!([]));
    assert_eq!(position(body["cursor"].as_str().unwrap()), id.as_str());
    assert_eq!(
        position(headers["pollgate-cursor"].to_str().unwrap()),
        id.as_str()
    );
    // ?timeout= cannot exceed the route's 10s; 0 answers at once.
    let (_, _, body) = get_json(&pg.url(&format!("/sub/t?cursor={id}&timeout=0"))).await;
    assert_eq!(position(body["cursor"].as_str().unwrap()), id.as_str());
    pg.wait_metric(
        "pollgate_subscribe_requests_total{outcome=\"timeout\"}",
        2.0,
    )
    .await;
}

async fn a_poll_without_cursor_gets_the_current_cursor_so_nothing_is_missed(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    pg.publish("c", "text/plain", "old").await;
    let (_, _, first) = get_json(&pg.url("/sub/c?timeout=0")).await;
    assert_eq!(
        first["messages"],
        serde_json::json!([]),
        "first: newest skips the past"
    );
    let cursor = first["cursor"].as_str().unwrap().to_string();
    // Published while the client is not polling:
    let a = pg.publish("c", "text/plain", "a").await;
    let b = pg.publish("c", "text/plain", "b").await;
    let c = pg.publish("c", "text/plain", "c").await;
    let (_, _, next) = get_json(&pg.url(&format!("/sub/c?cursor={cursor}"))).await;
    assert_eq!(ids(&next), [a, b, c.clone()]);
    assert_eq!(next["messages"][0]["data"], "a");
    assert_eq!(position(next["cursor"].as_str().unwrap()), c.as_str());
}

async fn cursors_also_come_from_last_event_id_and_if_none_match(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let a = pg.publish("h", "text/plain", "a").await;
    let b = pg.publish("h", "text/plain", "b").await;
    for (name, value) in [
        ("Last-Event-ID", a.clone()),
        ("If-None-Match", format!("\"{a}\"")),
    ] {
        let r = client()
            .get(pg.url("/sub/h"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(ids(&v), std::slice::from_ref(&b), "{name}");
    }
}

async fn first_oldest_returns_the_retained_history(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let a = pg.publish("o", "text/plain", "a").await;
    let b = pg.publish("o", "text/plain", "b").await;
    let (_, _, v) = get_json(&pg.url("/oldest/o")).await;
    assert_eq!(ids(&v), [a, b]);
    assert_eq!(v["gap"], false);
}

async fn answers_carry_at_most_100_messages_oldest_first(backend: Backend) {
    let pg = Pollgate::start_on(backend, &format!("broker:\n  history: 300\n{ROUTES}"));
    let mut published = Vec::new();
    for i in 0..150 {
        published.push(pg.publish("many", "text/plain", &i.to_string()).await);
    }
    let (_, _, first) = get_json(&pg.url("/oldest/many")).await;
    assert_eq!(ids(&first), published[..100]);
    let (_, _, rest) = get_json(&pg.url(&format!(
        "/oldest/many?cursor={}",
        first["cursor"].as_str().unwrap()
    )))
    .await;
    assert_eq!(ids(&rest), published[100..]);
}

async fn a_cursor_older_than_history_or_unknown_is_a_gap(backend: Backend) {
    let pg = Pollgate::start_on(backend, &format!("broker:\n  history: 3\n{ROUTES}"));
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(pg.publish("g", "text/plain", &i.to_string()).await);
    }
    let (status, headers, v) = get_json(&pg.url(&format!("/sub/g?cursor={}", published[0]))).await;
    assert_eq!(status, 200);
    assert_eq!(v["gap"], true);
    assert_eq!(headers["pollgate-gap"], "1");
    assert_eq!(ids(&v), published[2..], "what is retained");
    assert_eq!(
        position(v["cursor"].as_str().unwrap()),
        published[4].as_str()
    );
    // An id this channel never had (e.g. after a flush) is a gap too.
    let (_, _, v) = get_json(&pg.url("/sub/g?cursor=99999999999999-0")).await;
    assert_eq!(v["gap"], true);
    let (_, _, v) = get_json(&pg.url("/sub/g?cursor=1-0")).await;
    assert_eq!(v["gap"], true);
    assert_eq!(ids(&v), published[2..]);
    // The fresh cursor then resumes normally.
    let (_, headers, v) =
        get_json(&pg.url(&format!("/sub/g?cursor={}&timeout=0", published[4]))).await;
    assert_eq!(v["gap"], false);
    assert!(!headers.contains_key("pollgate-gap"));
    pg.wait_metric("pollgate_subscribe_requests_total{outcome=\"gap\"}", 3.0)
        .await;
}

async fn one_cursor_covers_every_channel_of_a_multi_channel_route(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let (_, _, v) = get_json(&pg.url("/multi/1/2?timeout=0")).await;
    let start = v["cursor"].as_str().unwrap().to_string();
    let x = pg.publish("a:1", "text/plain", "x").await;
    let y = pg.publish("b:2", "text/plain", "y").await;
    pg.publish("a:9", "text/plain", "not mine").await;
    let (_, _, v) = get_json(&pg.url(&format!("/multi/1/2?cursor={start}"))).await;
    assert_eq!(ids(&v), [x, y]);
    assert_eq!(v["messages"][0]["channel"], "a:1");
    assert_eq!(v["messages"][1]["channel"], "b:2");
    let cursor = v["cursor"].as_str().unwrap().to_string();
    // Held on both channels: a publish on the second wakes it.
    let url = pg.url(&format!("/multi/1/2?cursor={cursor}"));
    let poll = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let z = pg.publish("b:2", "text/plain", "z").await;
    let (_, _, v) = poll.await.unwrap();
    assert_eq!(ids(&v), [z]);
    // A single-channel cursor does not fit a two-channel route.
    let (status, _, v) = get_json(&pg.url(&format!("/multi/1/2?cursor={}", ids(&v)[0]))).await;
    assert_eq!(status, 400);
    assert!(v["detail"].as_str().unwrap().contains("2 channel"));
}

async fn raw_mode_answers_one_message_with_its_own_bytes(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let a = pg.publish("r", "image/svg+xml", "<svg/>").await;
    let b = pg.publish("r", "text/plain", "second").await;
    let r = client()
        .get(pg.url("/raw/r?cursor=0-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert_eq!(
        position(r.headers()["pollgate-cursor"].to_str().unwrap()),
        a.as_str()
    );
    assert!(r.headers()["etag"]
        .to_str()
        .unwrap()
        .starts_with(&format!("\"{a}_")));
    assert_eq!(r.text().await.unwrap(), "<svg/>");
    // ETag round trip through If-None-Match, like a legacy client does.
    let r = client()
        .get(pg.url("/raw/r"))
        .header("If-None-Match", format!("\"{a}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "second");
    // ?format=raw on an envelope route; a timeout is 204.
    let r = client()
        .get(pg.url(&format!("/sub/r?format=raw&cursor={b}&timeout=0.2")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        position(r.headers()["pollgate-cursor"].to_str().unwrap()),
        b.as_str()
    );
}

async fn non_utf8_bodies_are_base64_in_the_envelope(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let r = client()
        .post(pg.admin("/v1/publish/bin"))
        .header("Content-Type", "application/octet-stream")
        .body(vec![0xffu8, 0x00, 0x01])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, _, v) = get_json(&pg.url("/oldest/bin")).await;
    assert_eq!(v["messages"][0]["data"], "/wAB");
    assert_eq!(v["messages"][0]["encoding"], "base64");
}

async fn keep_alive_between_polls(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let id = pg.publish("k", "text/plain", "x").await;
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    for _ in 0..3 {
        let req = "GET /sub/k?cursor=0-0 HTTP/1.1\r\nHost: x\r\n\r\n";
        let (status, headers, body) = raw_exchange(&mut s, req);
        assert!(status.contains("200"), "{status}");
        assert!(headers.iter().any(|(k, _)| k == "content-length"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(position(v["cursor"].as_str().unwrap()), id.as_str());
    }
    // A timed-out poll keeps the connection too.
    let req = format!("GET /sub/k?cursor={id}&timeout=0.1 HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, _) = raw_exchange(&mut s, &req);
    assert!(status.contains("200"));
    let (status, _, _) = raw_exchange(&mut s, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains("404"));
    // Another path on the same connection is its own channel, and back.
    pg.publish("k2", "text/plain", "y").await;
    for (path, channel, data) in [("/sub/k2", "k2", "y"), ("/sub/k", "k", "x")] {
        let req = format!("GET {path}?cursor=0-0 HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, _, body) = raw_exchange(&mut s, &req);
        assert!(status.contains("200"), "{status}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["messages"][0]["channel"], channel);
        assert_eq!(v["messages"][0]["data"], data);
    }
    // A target that does not parse is refused there too.
    let bad = "GET /sub/%zz?cursor=0-0 HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, _, body) = raw_exchange(&mut s, bad);
    assert!(status.contains("400"), "{status}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "bad_request", "{v}");
}

async fn pipelined_requests_and_connection_close_are_honoured(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    // A second request sent behind a held poll waits for it, then is served.
    let held = "GET /sub/pipe HTTP/1.1\r\nHost: x\r\n\r\n";
    let next = "GET /sub/pipe?cursor=0-0 HTTP/1.1\r\nHost: x\r\n\r\n";
    std::io::Write::write_all(&mut s, format!("{held}{next}").as_bytes()).unwrap();
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let id = pg.publish("pipe", "text/plain", "p").await;
    for _ in 0..2 {
        let (status, _, body) = read_answer(&mut s);
        assert!(status.contains("200"), "{status}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(position(v["cursor"].as_str().unwrap()), id.as_str());
        assert_eq!(v["messages"][0]["data"], "p");
    }
    // Connection: close, and HTTP/1.0 without keep-alive, close after the answer.
    for req in [
        "GET /sub/pipe?cursor=0-0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /sub/pipe?cursor=0-0 HTTP/1.0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
        let (status, headers, _) = raw_exchange(&mut s, req);
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains(&("connection".into(), "close".into())),
            "{headers:?}"
        );
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after the answer");
    }
}

async fn an_answer_larger_than_the_socket_takes_is_written_whole(backend: Backend) {
    // The delivering task writes what the socket takes at once; the poll's
    // own task must finish the rest, and the connection stay usable.
    // The 6 MB publish must not meet the body's timeout on a loaded CI.
    let limits = "limits:\n  max_body: 8388608\n  header_timeout: 60s\n";
    let pg = Pollgate::start_on(backend, &format!("{ROUTES}{limits}"));
    let s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(65536)
        .unwrap();
    let mut s = s;
    let req = "GET /sub/big?format=raw HTTP/1.1\r\nHost: x\r\n\r\n";
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let big: String = (0..6_000_000u32)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let id = pg.publish("big", "text/plain", &big).await;
    std::thread::sleep(Duration::from_millis(300)); // let the socket fill up
    let (status, headers, body) = read_answer(&mut s);
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.len(), big.len());
    assert!(
        body == big.as_bytes(),
        "the bytes arrive whole and in order"
    );
    let cursor = headers
        .iter()
        .find(|(k, _)| k == "pollgate-cursor")
        .unwrap();
    assert_eq!(position(&cursor.1), id);
    let next = pg.publish("big", "text/plain", "small").await;
    let req = format!("GET /sub/big?format=raw&cursor={id} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = raw_exchange(&mut s, &req);
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, b"small", "then {next}");
}

async fn a_client_that_leaves_is_released_at_once(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /sub/gone HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    drop(s);
    pg.wait_metric("pollgate_held_requests", 0.0).await;
    pg.wait_metric(
        "pollgate_subscribe_requests_total{outcome=\"disconnected\"}",
        1.0,
    )
    .await;
    let (_, _, info) = get_json(&pg.admin("/v1/channels/gone")).await;
    assert_eq!(info["subscribers"], 0);
}

async fn server_sent_events_stream_and_resume(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let a = pg.publish("s", "text/plain", "a").await;
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    let req = format!(
        "GET /sub/s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nLast-Event-ID: {a}\r\n\r\n"
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let b = pg.publish("s", "application/json", "{\"n\":2}").await;
    let text = read_until(&mut s, &format!("id: {b}"), Duration::from_secs(5));
    assert!(
        text.contains("content-type: text/event-stream")
            || text.contains("Content-Type: text/event-stream"),
        "{text}"
    );
    let c = pg.publish("s", "text/plain", "c").await;
    let text = read_until(&mut s, &format!("id: {c}"), Duration::from_secs(5));
    assert!(text.contains("\"data\":\"c\""), "{text}");
    // A keep-alive comment every 15 s.
    let text = read_until(&mut s, ": keep-alive", Duration::from_secs(17));
    assert!(text.contains(": keep-alive"));
}

/// Reads from `s` until `needle` shows up; returns what was read.
fn read_until(s: &mut TcpStream, needle: &str, limit: Duration) -> String {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let n = s.read(&mut buf).expect("stream ended");
        assert!(n > 0, "stream closed");
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(needle) {
            break;
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

async fn bad_input_is_a_json_400_never_a_crash(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    for (path, word) in [
        ("/sub/x?cursor=garbage", "cursor"),
        ("/sub/x?cursor=1-2.3-4", "channel"),
        ("/sub/x?timeout=soon", "timeout"),
        ("/sub/x?timeout=-1", "timeout"),
        ("/sub/x?format=xml", "format"),
        ("/sub/bad%20channel", "channel"),
        ("/sub/%FF", "UTF-8"),
    ] {
        let (status, headers, v) = get_json(&pg.url(path)).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(v["error"], "bad_request", "{path}");
        assert!(v["detail"].as_str().unwrap().contains(word), "{path}: {v}");
    }
    let long = "x".repeat(300);
    let (status, _, _) = get_json(&pg.url(&format!("/sub/{long}"))).await;
    assert_eq!(status, 400);
    let (status, _, v) = get_json(&pg.url("/nowhere")).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"], "not_found");
    let r = client().post(pg.url("/sub/x")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // Still serving after all that.
    let (status, _, _) = get_json(&pg.url("/sub/x?timeout=0")).await;
    assert_eq!(status, 200);
}

/// An answer's header field (the names are read in lower case).
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Sends a long-poll on `s`, publishes on `channel` once it is held, and
/// gives back the connection with the answer.
async fn answered_by_a_publish(
    pg: &Pollgate,
    s: TcpStream,
    req: String,
    channel: &str,
) -> (TcpStream, (String, Vec<(String, String)>, Vec<u8>)) {
    let poll = tokio::task::spawn_blocking(move || {
        let mut s = s;
        let answer = raw_exchange(&mut s, &req);
        (s, answer)
    });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    pg.publish(channel, "text/plain", "m").await;
    poll.await.unwrap()
}

async fn cors_headers_follow_each_poll_on_one_connection(backend: Backend) {
    let origin = "https://app.example";
    let config = format!("cors:\n  allow_origins: [\"{origin}\"]\n{ROUTES}");
    let pg = Pollgate::start_on(backend, &config);
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    let preflight = format!(
        "OPTIONS /sub/c HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: GET\r\n\r\n"
    );
    let (status, h, _) = raw_exchange(&mut s, &preflight);
    assert!(status.contains("204"), "{status}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(origin));
    assert!(header(&h, "access-control-allow-methods").is_some());
    let poll = |cursor: &str, from: Option<&str>| {
        let origin = from.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        format!("GET /sub/c?cursor={cursor} HTTP/1.1\r\nHost: x\r\n{origin}\r\n")
    };
    let mut id = pg.publish("c", "text/plain", "0").await;
    // On one kept connection, each held poll's answer (written by the task
    // that delivers the message) carries what its own Origin calls for.
    for (from, allowed) in [
        (Some(origin), true),
        (None, false),
        (Some("https://elsewhere.example"), false),
        (Some(origin), true),
    ] {
        let (back, (status, h, _)) = answered_by_a_publish(&pg, s, poll(&id, from), "c").await;
        s = back;
        assert!(status.contains("200"), "{status}");
        let expected = allowed.then_some(origin);
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            expected,
            "{from:?}"
        );
        assert_eq!(header(&h, "vary"), allowed.then_some("Origin"), "{from:?}");
        id = header(&h, "pollgate-cursor").unwrap().to_string();
    }
    // A timeout answer too.
    let (status, h, _) = raw_exchange(&mut s, &poll(&format!("{id}&timeout=0.1"), Some(origin)));
    assert!(status.contains("200"), "{status}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(origin));
    assert_eq!(header(&h, "pollgate-cursor"), Some(id.as_str()));
}

on_both_brokers!(
    a_held_poll_is_answered_by_a_publish,
    a_timeout_answers_empty_with_the_cursor_unchanged_and_jitter,
    a_poll_without_cursor_gets_the_current_cursor_so_nothing_is_missed,
    cursors_also_come_from_last_event_id_and_if_none_match,
    first_oldest_returns_the_retained_history,
    answers_carry_at_most_100_messages_oldest_first,
    a_cursor_older_than_history_or_unknown_is_a_gap,
    one_cursor_covers_every_channel_of_a_multi_channel_route,
    raw_mode_answers_one_message_with_its_own_bytes,
    non_utf8_bodies_are_base64_in_the_envelope,
    keep_alive_between_polls,
    pipelined_requests_and_connection_close_are_honoured,
    an_answer_larger_than_the_socket_takes_is_written_whole,
    a_client_that_leaves_is_released_at_once,
    server_sent_events_stream_and_resume,
    bad_input_is_a_json_400_never_a_crash,
    cors_headers_follow_each_poll_on_one_connection,
);

/// Polls timing out while messages arrive: a poll's wake-up and its
/// timeout race (pollgate runs two worker threads here), and an answer
/// written straight from the delivering task must never land on the
/// connection's next poll. Each client checks that ids only grow, that no
/// message comes twice, and that nothing is left on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_racing_publishes_never_answer_a_poll_twice() {
    let pg = Pollgate::start(ROUTES);
    let first = pg.publish("race", "text/plain", "0").await;
    let port = pg.port;
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let first = first.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut cursor, mut seen) = (first, Vec::<String>::new());
                for _ in 0..60 {
                    let req = format!(
                        "GET /sub/race?cursor={cursor}&timeout=0.01 HTTP/1.1\r\nHost: x\r\n\r\n"
                    );
                    let (status, _, body) = raw_exchange(&mut s, &req);
                    assert!(status.contains("200"), "{status}");
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    for m in v["messages"].as_array().unwrap() {
                        let id = m["id"].as_str().unwrap().to_string();
                        assert!(!seen.contains(&id), "{id} came twice");
                        seen.push(id);
                    }
                    cursor = v["cursor"].as_str().unwrap().to_string();
                }
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut extra = [0u8; 64];
                match s.read(&mut extra) {
                    Ok(0) => {}
                    Ok(n) => panic!("left on the connection: {:?}", &extra[..n]),
                    Err(e) => assert!(
                        matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ),
                        "{e}"
                    ),
                }
                seen.len()
            })
        })
        .collect();
    let publishing = async {
        while !clients.iter().all(|c| c.is_finished()) {
            pg.publish("race", "text/plain", "m").await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    publishing.await;
    let delivered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(delivered > 0, "messages reached the clients");
}
