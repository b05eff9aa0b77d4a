//! The publish API and admin endpoints (docs/api.md) on a real pollgate.
//! Every test runs on both brokers (memory and a real redis-server), so
//! their semantics cannot drift.

mod support;

use serde_json::{json, Value};
use support::*;

const WITH_TOKEN: &str = "publish:\n  token: \"${TEST_TOKEN}\"\nlimits:\n  max_body: 1KiB\n";

async fn single_publish_keeps_the_content_type_and_returns_the_id(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let r = client()
        .post(pg.admin("/v1/publish/room:1"))
        .header("Content-Type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["channel"], "room:1");
    let id = v["id"].as_str().unwrap();
    let (ms, seq) = id.split_once('-').unwrap();
    assert!(ms.parse::<u64>().unwrap() > 1_700_000_000_000 && seq.parse::<u64>().is_ok());
    let (_, _, env) = get_json(&pg.url("/oldest/room:1")).await;
    assert_eq!(env["messages"][0]["content_type"], "text/csv");
    assert_eq!(env["messages"][0]["data"], "a,b");
    assert_eq!(pg.metric("pollgate_messages_published_total").await, 1.0);
}

async fn a_batch_is_published_in_order(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let batch = json!({"messages": [
        {"channel": "b", "data": {"n": 1}},
        {"channel": "other", "data": "x", "content_type": "text/plain"},
        {"channel": "b", "data": "two", "content_type": "text/plain"},
        {"channel": "b", "data": [3]}
    ]});
    let r = client()
        .post(pg.admin("/v1/publish"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let ids: Vec<&str> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    let (_, _, env) = get_json(&pg.url("/oldest/b")).await;
    let got: Vec<&str> = env["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[0], ids[2], ids[3]]);
    assert_eq!(env["messages"][0]["data"]["n"], 1);
    assert_eq!(env["messages"][1]["data"], "two");
    assert_eq!(env["messages"][2]["data"], json!([3]));
}

async fn bad_batches_are_refused_whole(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    for (body, error) in [
        ("not json", "bad_json"),
        ("{\"messages\": [{\"channel\": \"a\"}]}", "bad_json"),
        ("{\"messages\": [{\"channel\": \"ok\", \"data\": 1}, {\"channel\": \"no way\", \"data\": 1}]}", "bad_channel"),
        ("{\"messages\": [{\"channel\": \"a\", \"data\": {}, \"content_type\": \"text/plain\"}]}", "bad_message"),
    ] {
        let r = client().post(pg.admin("/v1/publish")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], error, "{body}");
        assert!(!v["detail"].as_str().unwrap().is_empty());
    }
    let (_, _, info) = get_json(&pg.admin("/v1/channels/ok")).await;
    assert_eq!(
        info["history"], 0,
        "nothing of a refused batch is published"
    );
}

async fn channel_info_reports_history_and_local_subscribers(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let id = pg.publish("info", "text/plain", "x").await;
    let url = pg.url(&format!("/sub/info?cursor={id}"));
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let (status, _, v) = get_json(&pg.admin("/v1/channels/info")).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"channel": "info", "last_id": id, "history": 1, "subscribers": 1, "subscribers_total": 1})
    );
    pg.publish("info", "text/plain", "y").await;
    held.await.unwrap();
    let (_, _, v) = get_json(&pg.admin("/v1/channels/never")).await;
    assert_eq!(
        v,
        json!({"channel": "never", "last_id": "0-0", "history": 0, "subscribers": 0, "subscribers_total": 0})
    );
}

#[tokio::test]
async fn the_token_is_required_when_set() {
    let pg = Pollgate::start_with_env(
        &format!("{WITH_TOKEN}{ROUTES}"),
        &[("TEST_TOKEN", "s3cret")],
    );
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = client().post(pg.admin("/v1/publish/a")).body("x");
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "unauthorized");
    }
    let r = client()
        .post(pg.admin("/v1/publish/a"))
        .header("Authorization", "Bearer s3cret")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health and metrics stay open for probes and scrapers.
    let r = client().get(pg.admin("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn bad_channels_and_big_bodies_are_refused() {
    let pg = Pollgate::start_with_env(&format!("{WITH_TOKEN}{ROUTES}"), &[("TEST_TOKEN", "t")]);
    let post = |path: &str, body: Vec<u8>| {
        client()
            .post(pg.admin(path))
            .header("Authorization", "Bearer t")
            .body(body)
            .send()
    };
    let r = post("/v1/publish/has%20space", b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_channel");
    let long = format!("/v1/publish/{}", "c".repeat(257));
    assert_eq!(post(&long, b"x".to_vec()).await.unwrap().status(), 400);
    let r = post("/v1/publish/big", vec![b'x'; 1025]).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );
    assert_eq!(
        post("/v1/publish/big", vec![b'x'; 1024])
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client()
        .post(pg.admin("/v1/publish/j"))
        .header("Authorization", "Bearer t")
        .header("Content-Type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_json");
}

async fn health_readiness_and_metrics(backend: Backend) {
    let pg = Pollgate::start_on(backend, ROUTES);
    let (status, _, _) = get_json(&pg.admin("/healthz")).await;
    assert_eq!(status, 200);
    let (status, _, v) = get_json(&pg.admin("/readyz")).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")));
    assert_eq!(v["broker"], "up");
    let address = v["broker_address"].as_str().unwrap_or_default();
    assert!(
        address == "memory://" || address.starts_with("redis://127.0.0.1:"),
        "{v}"
    );
    let (status, _, _) = get_json(&pg.admin("/readyz?broker=required")).await;
    assert_eq!(status, 200);
    let text = get_text(&pg.admin("/metrics")).await;
    for name in [
        "pollgate_held_requests",
        "pollgate_subscribe_requests_total",
        "pollgate_messages_published_total",
        "pollgate_messages_delivered_total",
        "pollgate_delivery_latency_seconds_bucket",
        "pollgate_channels_active",
        "pollgate_broker_up 1",
        "pollgate_broker_reconnects_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let (status, _, v) = get_json(&pg.admin("/nope")).await;
    assert_eq!((status, v["error"].as_str()), (404, Some("not_found")));
    // channels_active follows the channels this instance serves.
    get_json(&pg.url("/sub/one?timeout=0")).await;
    get_json(&pg.url("/sub/two?timeout=0")).await;
    assert_eq!(pg.metric("pollgate_channels_active").await, 2.0);
}

on_both_brokers!(
    single_publish_keeps_the_content_type_and_returns_the_id,
    a_batch_is_published_in_order,
    bad_batches_are_refused_whole,
    channel_info_reports_history_and_local_subscribers,
    health_readiness_and_metrics,
);

/// The text of field `key` in a JSON answer's body.
fn field(body: &[u8], key: &str) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v[key].as_str().unwrap_or_default().to_string()
}

/// Reads answers off a raw admin connection until it closes; true when it
/// closed (read 0) within a second.
fn closes(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .unwrap();
    matches!(s.read(&mut [0u8; 64]), Ok(0))
}

#[tokio::test]
async fn an_admin_connection_serves_pipelined_chunked_and_split_requests_in_order() {
    use std::io::Write;
    let pg = Pollgate::start(&format!("limits:\n  max_body: 1KiB\n{ROUTES}"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.admin_port)).unwrap();
    // Two publishes and a probe in one write: three answers, in order.
    let publish = |body: &str| {
        format!(
            "POST /v1/publish/p HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let pipelined = format!(
        "{}{}GET /healthz HTTP/1.1\r\n\r\n",
        publish("one"),
        publish("two")
    );
    s.write_all(pipelined.as_bytes()).unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, _, body) = read_answer(&mut s);
        assert!(status.contains("200"), "{status}");
        ids.push(field(&body, "id"));
    }
    let (status, _, body) = read_answer(&mut s);
    assert!(status.contains("200") && body.starts_with(b"{\"status\""));
    // A chunked body (left to Pingora's HTTP/1 server), with a request
    // pipelined behind it: its end is found, the connection kept, and the
    // request behind it answered.
    let chunked = "POST /v1/publish/p HTTP/1.1\r\nContent-Type: text/plain\r\n\
                   Transfer-Encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n\
                   GET /healthz HTTP/1.1\r\n\r\n";
    let (status, headers, body) = raw_exchange(&mut s, chunked);
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains(&("connection".into(), "keep-alive".into())));
    ids.push(field(&body, "id"));
    let (status, _, body) = read_answer(&mut s);
    assert!(status.contains("200") && body.starts_with(b"{\"status\""));
    // Then, on a new connection, a body that arrives in two parts.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.admin_port)).unwrap();
    let split = publish("four");
    let (head, tail) = split.split_at(split.len() - 2);
    s.write_all(head.as_bytes()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, headers, body) = raw_exchange(&mut s, tail);
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains(&("connection".into(), "keep-alive".into())));
    ids.push(field(&body, "id"));
    let (_, _, env) = get_json(&pg.url("/oldest/p")).await;
    let got: Vec<&str> = env["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["one", "two", "three", "four"]);
    assert_eq!(support::ids(&env), ids);
}

#[tokio::test]
async fn an_admin_body_left_unread_or_late_closes_the_connection() {
    use std::io::Write;
    let config = format!("limits:\n  max_body: 1KiB\n  header_timeout: 1s\n{ROUTES}");
    let pg = Pollgate::start_with_env(
        &format!("publish:\n  token: \"${{TEST_TOKEN}}\"\n{config}"),
        &[("TEST_TOKEN", "t")],
    );
    let connect = || std::net::TcpStream::connect(("127.0.0.1", pg.admin_port)).unwrap();
    // Refused before its body is read: the body must not be taken for a
    // request, so the connection closes after the answer.
    for (request, status, error) in [
        (
            "POST /v1/publish/p HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /",
            401,
            "unauthorized",
        ),
        (
            "POST /v1/publish/p HTTP/1.1\r\nAuthorization: Bearer t\r\n\
             Content-Length: 2000\r\n\r\nxx",
            413,
            "payload_too_large",
        ),
    ] {
        let mut s = connect();
        let (line, headers, body) = raw_exchange(&mut s, request);
        assert!(line.contains(&status.to_string()), "{line}");
        assert_eq!(field(&body, "error"), error);
        assert!(headers.contains(&("connection".into(), "close".into())));
        assert!(closes(&mut s), "{error}: closed after the answer");
    }
    // A body that stops short is given up after limits.header_timeout.
    let mut s = connect();
    s.write_all(
        b"POST /v1/publish/p HTTP/1.1\r\nAuthorization: Bearer t\r\nContent-Length: 10\r\n\r\nabc",
    )
    .unwrap();
    let (line, _, body) = read_answer(&mut s);
    assert!(line.contains("408"), "{line}");
    assert_eq!(field(&body, "error"), "body_timeout");
    assert!(closes(&mut s));
    let (_, _, v) = get_json(&pg.admin("/v1/channels/p")).await;
    assert_eq!(
        v["error"], "unauthorized",
        "the token still guards channel info"
    );
    assert_eq!(pg.metric("pollgate_messages_published_total").await, 0.0);
}

#[tokio::test]
async fn admin_heads_are_bounded_and_parsed_as_client_heads() {
    use std::io::Write;
    let pg = Pollgate::start(&format!(
        "limits:\n  max_head: 1KiB\n  header_timeout: 1s\n{ROUTES}"
    ));
    let connect = || std::net::TcpStream::connect(("127.0.0.1", pg.admin_port)).unwrap();
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "x".repeat(2000)
    );
    for (request, status, error) in [
        (huge.as_str(), 431, "header_too_large"),
        (
            "POST /v1/publish/a%zz HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            400,
            "bad_request",
        ),
        (
            "POST /v1/publish/../a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            400,
            "bad_request",
        ),
    ] {
        let mut s = connect();
        let (line, _, body) = raw_exchange(&mut s, request);
        assert!(line.contains(&status.to_string()), "{line}");
        assert_eq!(field(&body, "error"), error);
        assert!(closes(&mut s), "{error}: closed");
    }
    // A head that stops halfway is given up after limits.header_timeout.
    let mut s = connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    let (line, _, body) = read_answer(&mut s);
    assert!(line.contains("408"), "{line}");
    assert_eq!(field(&body, "error"), "header_timeout");
    assert_eq!(pg.metric("pollgate_messages_published_total").await, 0.0);
    let (status, _, _) = get_json(&pg.admin("/healthz")).await;
    assert_eq!(status, 200, "and the listener serves on");
}
