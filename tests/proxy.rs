//! Legacy backends unchanged (issue [3]): reverse proxy, publish-through,
//! header-directed publish and subscriber authorization, against a real
//! HTTP backend started by each test. (Multi-threaded runtimes: some tests
//! block on raw sockets while the backend runs.)

mod support;

use serde_json::Value;
use std::time::Duration;
use support::backend::Backend;
use support::redis::RedisServer;
use support::*;

/// A config with upstream `app` on `addrs` and the chat-like routes.
fn config(addrs: &[String], extra: &str) -> String {
    let addrs: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"{extra}
limits:
  max_body: 2MiB
upstreams:
  app:
    addrs: [{}]
    connect_timeout: 1s
    read_timeout: 1s
routes:
  - path: "/rooms/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 5s
      authorize: app
  - path: "/cached/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 1s
      authorize: app
      authorize_cache: 10s
  - path: "/rooms/{{room}}/messages"
    methods: [POST]
    upstream: app
    publish:
      channel: "room:{{room}}"
  - path: "/rooms/{{room}}/messages"
    methods: [GET]
    upstream: app
  - path: "/inbox/{{user}}"
    methods: [PUT]
    upstream: app
    publish:
      channel: "inbox:{{user}}"
      body: request
  - path: "/status/{{code}}"
    methods: [POST]
    upstream: app
    publish:
      channel: "never"
  - path: "/publish-to/"
    upstream: app
    publish_from_header: true
  - path: "/sub/{{channel}}"
    subscribe:
      channels: ["{{channel}}"]
      timeout: 5s
  - path: "/"
    upstream: app
"#,
        addrs.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_passes_through_unchanged_with_forwarded_headers() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = client()
            .request(m, pg.url("/api/thing?x=1&y=%20"))
            .header("X-Request-Thing", "abc")
            .header("Cookie", "session=s1")
            .body(format!("body of {method}"))
            .send()
            .await
            .unwrap();
        let want = if method == "POST" { 201 } else { 200 };
        assert_eq!(r.status(), want, "{method}");
        assert_eq!(r.headers()["x-custom"], "kept");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["method"], method);
        assert_eq!(v["path"], "/api/thing?x=1&y=%20");
        assert_eq!(v["body"], format!("body of {method}"));
    }
    let r = client().head(pg.url("/api/head")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = backend.seen();
    let first = &seen[0];
    assert_eq!(first.header("x-request-thing"), Some("abc"));
    assert_eq!(first.header("cookie"), Some("session=s1"));
    assert_eq!(first.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(first.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        first.header("x-forwarded-host"),
        Some(format!("127.0.0.1:{}", pg.port).as_str())
    );
    assert_eq!(
        first.header("host"),
        Some(format!("127.0.0.1:{}", pg.port).as_str()),
        "Host unchanged"
    );
    assert_eq!(
        pg.metric("pollgate_upstream_requests_total{status=\"200\",upstream=\"app\"}")
            .await,
        6.0
    );
    assert!(
        pg.metric("pollgate_upstream_latency_seconds_count{upstream=\"app\"}")
            .await
            >= 7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_and_chunked_bodies_arrive_whole() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let r = client()
        .post(pg.url("/upload"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A chunked upload, written by hand: 64 chunks of 1000 bytes.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    let mut req =
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for i in 0..64u8 {
        req.extend_from_slice(b"3e8\r\n");
        req.extend_from_slice(&[b'a' + i % 26; 1000]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    std::io::Write::write_all(&mut s, &req).unwrap();
    let (status, _, _) = read_answer(&mut s);
    assert!(status.contains("201"), "{status}");
    let seen = backend.seen();
    assert_eq!(seen[0].body, big);
    assert_eq!(seen[1].body.len(), 64_000);
    assert_eq!(seen[1].header("transfer-encoding"), Some("chunked"));
    // The same 1 MiB through a publishing route reaches the backend whole too.
    let r = client()
        .put(pg.url("/inbox/bob"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.seen()[2].body, big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_answer_is_published_before_the_client_gets_it() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let url = pg.url("/sub/room:1");
    let held = tokio::spawn(async move { get_json(&url).await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .header("Content-Type", "application/json")
        .body("{\"text\":\"hi\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.headers()["pollgate-message-id"]
        .to_str()
        .unwrap()
        .to_string();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["method"], "POST", "the upstream's answer, unchanged");
    // Published before the answer completed: the channel already has it.
    let (_, _, info) = get_json(&pg.admin("/v1/channels/room:1")).await;
    assert_eq!(info["last_id"], id.as_str());
    let (_, _, v) = held.await.unwrap();
    assert_eq!(ids(&v), [id]);
    assert_eq!(
        v["messages"][0]["data"]["method"], "POST",
        "the response body"
    );
    assert_eq!(
        pg.metric("pollgate_publish_through_total{result=\"ok\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_request_publishes_what_the_client_sent() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let r = client()
        .put(pg.url("/inbox/ann"))
        .header("Content-Type", "text/plain")
        .body("note to ann")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("pollgate-message-id"));
    let (_, _, v) = get_json(&pg.url("/sub/inbox:ann?cursor=0-0")).await;
    assert_eq!(v["messages"][0]["data"], "note to ann");
    assert_eq!(v["messages"][0]["content_type"], "text/plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_are_not_published() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    for code in [400, 404, 500, 503] {
        let r = client()
            .post(pg.url(&format!("/status/{code}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code);
        assert!(!r.headers().contains_key("pollgate-message-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], code, "the upstream's own body");
    }
    let (_, _, info) = get_json(&pg.admin("/v1/channels/never")).await;
    assert_eq!(info["history"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_keeps_the_upstream_answer() {
    let backend = Backend::start().await;
    let mut redis = RedisServer::start();
    let pg = Pollgate::start(&with_broker(&config(&[backend.addr()], ""), &redis.url()));
    pg.wait_ready();
    redis.kill();
    pg.wait_metric("pollgate_broker_up", 0.0).await;
    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the backend accepted it");
    assert!(!r.headers().contains_key("pollgate-message-id"));
    let why = r.headers()["pollgate-publish-error"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(why.contains("unavailable"), "{why}");
    assert_eq!(r.json::<Value>().await.unwrap()["method"], "POST");
    assert_eq!(
        pg.metric("pollgate_publish_through_total{result=\"failed\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_directed_publish_goes_to_the_named_channels_and_is_stripped() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let r = client()
        .post(pg.url("/publish-to/a:1,%20b:2"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("pollgate-publish"), "stripped");
    let ids_header = r.headers()["pollgate-message-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(ids_header.split(", ").count(), 2);
    for ch in ["a:1", "b:2"] {
        let (_, _, v) = get_json(&pg.url(&format!("/sub/{ch}?cursor=0-0"))).await;
        assert_eq!(v["messages"][0]["data"]["via"], "header", "{ch}");
    }
    // A channel name the gateway refuses is reported, the answer kept.
    let r = client()
        .post(pg.url("/publish-to/bad%20name"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["pollgate-publish-error"]
        .to_str()
        .unwrap()
        .contains("not allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413_before_anything_is_published() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let big = vec![b'x'; (2 << 20) + 1];
    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );
    // Refused from its Content-Length, before any body byte is read.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    let head = format!(
        "POST /plain/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    let (status, headers, _) = raw_exchange(&mut s, &head);
    assert!(status.contains("413"), "{status}");
    assert!(headers.contains(&("connection".into(), "close".into())));
    assert!(backend.seen().is_empty(), "the backend saw nothing");
    let (_, _, info) = get_json(&pg.admin("/v1/channels/room:1")).await;
    assert_eq!(info["history"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_or_passes_the_denial_through() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let r = client()
        .get(pg.url("/rooms/7/events?timeout=0.2"))
        .header("Authorization", "Bearer bad")
        .header("Cookie", "sid=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"chat\"");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "who are you?");
    let r = client()
        .get(pg.url("/rooms/7/events?timeout=0.2"))
        .header("Authorization", "Bearer good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("pollgate-cursor"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path_and_query, "/rooms/7/events?timeout=0.2");
    assert_eq!(seen[0].header("authorization"), Some("Bearer bad"));
    assert_eq!(seen[0].header("cookie"), Some("sid=1"));
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        pg.metric("pollgate_subscribe_requests_total{outcome=\"rejected\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_cache_cuts_backend_calls() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let poll = |auth: &'static str| {
        client()
            .get(pg.url("/cached/3/events?timeout=0"))
            .header("Authorization", auth)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(poll("Bearer good").await.unwrap().status(), 200);
    }
    assert_eq!(backend.seen().len(), 1, "three polls, one backend call");
    for _ in 0..2 {
        assert_eq!(poll("Bearer other").await.unwrap().status(), 401);
    }
    assert_eq!(
        backend.seen().len(),
        2,
        "denials are cached per credentials too"
    );
    // Concurrent polls share one call.
    let polls: Vec<_> = (0..5).map(|_| poll("Bearer new")).collect();
    for p in polls {
        p.await.unwrap();
    }
    assert_eq!(backend.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_and_the_gateway_keeps_serving() {
    let dead = free_port();
    let pg = Pollgate::start(&config(&[format!("127.0.0.1:{dead}")], ""));
    let r = client().get(pg.url("/anything")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_gateway");
    let r = client()
        .post(pg.url("/rooms/1/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "publishing routes too");
    let (status, _, _) = get_json(&pg.url("/sub/still?timeout=0")).await;
    assert_eq!(status, 200, "polls still work");
    assert!(
        pg.metric("pollgate_upstream_requests_total{status=\"error\",upstream=\"app\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_504() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&config(&[backend.addr()], ""));
    let r = client().get(pg.url("/slow")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "gateway_timeout");
}

/// Sends `n` GETs through `pg` (each must succeed) and counts which
/// backend port answered each.
async fn spread(pg: &Pollgate, n: usize) -> std::collections::HashMap<String, usize> {
    let mut served = std::collections::HashMap::new();
    for _ in 0..n {
        let r = client().get(pg.url("/who")).send().await.unwrap();
        assert_eq!(r.status(), 200, "a dead address is retried on the next one");
        let port = r.headers()["x-backend"].to_str().unwrap().to_string();
        *served.entry(port).or_insert(0) += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_back_up_is_used_again_after_its_next_health_check() {
    let a = Backend::start().await;
    let late = free_port();
    let addrs = [a.addr(), format!("127.0.0.1:{late}")];
    let body = config(&addrs, "").replace(
        "    read_timeout: 1s\n",
        "    read_timeout: 1s\n    health_check_interval: 200ms\n",
    );
    let pg = Pollgate::start(&body);
    // Down: every request is answered by the other address.
    let served = spread(&pg, 6).await;
    assert_eq!(served.keys().collect::<Vec<_>>(), [&a.port.to_string()]);
    // Up again: back in the rotation within a check or two (a failed
    // request alone would set it aside for 10 s).
    let _b = Backend::start_on(late).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let served = spread(&pg, 10).await;
    assert!(
        served.get(&late.to_string()).is_some_and(|n| *n >= 3),
        "the address back up takes its share: {served:?}"
    );
}

/// Waits (at most 10 s) until `backend` has received `n` health checks.
async fn checked(backend: &Backend, n: usize) {
    for _ in 0..1000 {
        if backend.count("/healthz") >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} health checks of {} in 10 s",
        backend.count("/healthz"),
        backend.addr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_failing_its_http_health_check_gets_requests_again_once_it_passes() {
    let well = Backend::start().await;
    let sick = Backend::start().await;
    sick.set_health(503);
    let body = config(&[well.addr(), sick.addr()], "").replace(
        "    read_timeout: 1s\n",
        "    read_timeout: 1s\n    health_check: {path: /healthz, interval: 200ms}\n",
    );
    let pg = Pollgate::start_logged(&body);
    // A check has ended once the next one has begun.
    checked(&sick, 2).await;
    let served = spread(&pg, 8).await;
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        [&well.port.to_string()],
        "the address answering 503 is skipped"
    );
    assert_eq!(sick.count("/who"), 0);
    let probe = sick
        .seen()
        .into_iter()
        .find(|s| s.path_and_query == "/healthz");
    let probe = probe.unwrap();
    assert_eq!(probe.method, "GET");
    assert_eq!(probe.header("host"), Some(sick.addr().as_str()));

    // Answering 200: back in the rotation after its next check.
    sick.set_health(200);
    checked(&sick, sick.count("/healthz") + 2).await;
    let served = spread(&pg, 10).await;
    assert!(
        served.get(&sick.port.to_string()).is_some_and(|n| *n >= 4),
        "both addresses share the load again: {served:?}"
    );
    let logs = pg.logs();
    let failed = format!("addr={}", sick.addr());
    assert!(
        logs.lines()
            .any(|l| l.contains("upstream address failed its health check") && l.contains(&failed)),
        "{logs}"
    );
    assert!(
        !logs.contains("becomes unhealthy"),
        "one line per change: {logs}"
    );
    pg.assert_no_panic();
}

#[test]
fn health_check_has_two_spellings_but_takes_one() {
    let check = |upstream: &str| {
        let f = temp_file(
            "health.yaml",
            &format!("upstreams:\n  app:\n    addrs: [\"127.0.0.1:3000\"]\n{upstream}"),
        );
        run_cli(&["check", "-c", f.to_str().unwrap()], &[])
    };
    let (code, out, err) = check("    health_check: {path: /healthz, interval: 5s}\n");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("path: /healthz") && out.contains("interval: 5s"),
        "{out}"
    );
    // The old key: a TCP check, printed in the new spelling.
    let (code, out, err) = check("    health_check_interval: 2s\n");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("interval: 2s") && !out.contains("path:"),
        "{out}"
    );
    assert!(!out.contains("health_check_interval"), "{out}");
    let (code, _, err) = check("    health_check_interval: 2s\n    health_check: {interval: 5s}\n");
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "upstreams.app.health_check_interval: cannot be given with \
             upstreams.app.health_check"
        ),
        "{err}"
    );
    let (code, _, err) = check("    health_check: {path: healthz}\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("upstreams.app.health_check.path: 'healthz' is not a path like /healthz"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_an_address_that_is_down() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let pg = Pollgate::start(&config(&[a.addr(), dead, b.addr()], ""));
    let served = spread(&pg, 12).await;
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(
        served.values().all(|n| *n >= 4),
        "both live addresses share the load: {served:?}"
    );
}
