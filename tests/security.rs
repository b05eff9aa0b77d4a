//! Trust at the edge (docs/security.md), tried as an attacker and an
//! operator would, against a real pollgate: authorization keyed on every
//! credential, one parse of the request target, secrets never printed, no
//! open publish API, and a clear refusal for every bound.

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::backend::Backend;
use support::redis::RedisServer;
use support::*;

/// Routes with authorization (cached and not) in front of `backend`.
fn authorized(backend: &Backend) -> String {
    format!(
        r#"
upstreams:
  app:
    addrs: ["{}"]
    connect_timeout: 1s
    read_timeout: 2s
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
      timeout: 5s
      authorize: app
      authorize_cache: 30s
  - path: "/"
    upstream: app
"#,
        backend.addr()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_query_is_a_credential_of_its_own() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&authorized(&backend));
    let (status, _, _) = get_json(&pg.url("/cached/1/events?access_token=good&timeout=0")).await;
    assert_eq!(status, 200, "the token is accepted");
    let (status, _, v) = get_json(&pg.url("/cached/1/events?timeout=0")).await;
    assert_eq!(
        status, 401,
        "an anonymous poll is not served from its cache: {v}"
    );
    let (status, _, _) = get_json(&pg.url("/cached/1/events?access_token=bad&timeout=0")).await;
    assert_eq!(status, 401);
    let calls = backend.seen().len();
    assert_eq!(calls, 3, "each credential asked once");
    // The next polls of the token (new cursor, new timeout) use the cache.
    let (status, _, v) = get_json(&pg.url("/cached/1/events?access_token=good&timeout=0")).await;
    assert_eq!(status, 200);
    let cursor = v["cursor"].as_str().unwrap().to_string();
    let url = format!("/cached/1/events?access_token=good&timeout=0.1&cursor={cursor}");
    assert_eq!(get_json(&pg.url(&url)).await.0, 200);
    assert_eq!(backend.seen().len(), calls, "cached: no new backend call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorized_path_is_the_subscribed_path() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&authorized(&backend));
    // Percent-encoded: routed, authorized and subscribed as one target.
    let url = pg.url("/r%6Foms/a%2Fb/events");
    let poll = tokio::spawn(async move {
        client()
            .get(url)
            .header("Authorization", "Bearer good")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    assert_eq!(backend.seen()[0].path_and_query, "/rooms/a%2Fb/events");
    pg.publish("room:a/b", "text/plain", "for a/b").await;
    let v = poll.await.unwrap();
    assert_eq!(v["messages"][0]["channel"], "room:a/b");

    // Absolute-form: the path of the URL, never a 500.
    let absolute =
        "GET http://gw.example/rooms/2/events?timeout=0 HTTP/1.1\r\nHost: gw.example\r\n";
    let (status, _) = pg.raw(&format!("{absolute}Authorization: Bearer good\r\n\r\n"));
    assert_eq!(status, 200);
    let seen = backend.seen().last().unwrap().path_and_query.clone();
    assert_eq!(seen, "/rooms/2/events?timeout=0");
    let (status, _) = pg.raw(&format!("{absolute}\r\n"));
    assert_eq!(status, 401, "and authorized like any other");
    let elsewhere = "GET http://elsewhere/rooms/2/events HTTP/1.1\r\nHost: gw.example\r\n\r\n";
    assert_eq!(pg.raw(elsewhere).0, 400, "its authority must be the Host");

    // Dot segments and bad escapes are refused, on every kind of route.
    let before = backend.seen().len();
    for target in [
        "/rooms/../rooms/3/events",
        "/rooms/%2e%2E/rooms/3/events",
        "/rooms/3/./events",
        "/rooms/%zz/events",
        "/x/../etc/passwd",
        "*",
    ] {
        let (status, v) = pg.raw(&format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{target}: {v}"
        );
    }
    assert_eq!(backend.seen().len(), before, "nothing reached the backend");
    assert!(
        pg.metric("pollgate_refused_total{reason=\"bad_target\"}")
            .await
            >= 7.0
    );
}

#[test]
fn secrets_are_never_printed() {
    let dead = free_port();
    let (port, admin) = (free_port(), free_port());
    let config = temp_file(
        "secret.yaml",
        &format!(
            "listen: \"127.0.0.1:{port}\"\nadmin_listen: \"127.0.0.1:{admin}\"\n\
             broker:\n  url: \"redis://:hunter2@127.0.0.1:{dead}/0\"\n\
             publish:\n  token: \"tok-s3cret\"\n"
        ),
    );
    let (code, out, err) = run_cli(&["check", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(":***@127.0.0.1") && out.contains("'***'"),
        "{out}"
    );
    // Serving at the most verbose level, failing to connect over and over.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollgate"))
        .args([
            "serve",
            "-c",
            config.to_str().unwrap(),
            "--log-level",
            "trace",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr) + String::from_utf8_lossy(&output.stdout);
    assert!(logs.contains("redis"), "the broker is logged: {logs}");
    for secret in ["hunter2", "tok-s3cret"] {
        assert!(!logs.contains(secret), "{secret} printed:\n{logs}");
    }
}

#[tokio::test]
async fn the_publish_api_is_never_open_to_the_network_by_accident() {
    let open = format!("admin_listen: \"0.0.0.0:{}\"\n", free_port());
    let f = temp_file("open.yaml", &open);
    let (code, _, err) = run_cli(&["serve", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "refused: {err}");
    assert!(
        err.contains("publish.token") && err.contains("allow_unauthenticated"),
        "{err}"
    );
    let f = temp_file(
        "open.yaml",
        &format!("{open}publish:\n  allow_unauthenticated: true\n"),
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "an explicit choice is allowed: {err}");

    let pg = Pollgate::start("publish:\n  token: \"t0k\"\n");
    let publish = |auth: &'static str| {
        client()
            .post(pg.admin("/v1/publish/news"))
            .header("Authorization", auth)
            .body("x")
            .send()
    };
    assert_eq!(
        publish("bearer t0k").await.unwrap().status(),
        200,
        "scheme in any case"
    );
    assert_eq!(publish("BEARER t0k").await.unwrap().status(), 200);
    for wrong in ["Bearer t0", "Bearer t0kk", "Basic t0k", "t0k"] {
        assert_eq!(publish(wrong).await.unwrap().status(), 401, "{wrong}");
    }
}

#[tokio::test]
async fn request_heads_are_bounded_in_size_and_time() {
    let pg = Pollgate::start(&format!(
        "limits:\n  max_head: 2KiB\n  header_timeout: 500ms\n{ROUTES}"
    ));
    let head =
        |headers: String| format!("GET /sub/x?timeout=0 HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
    // Over max_head, and more header lines than the parser has room for.
    for large in [
        head(format!("X-Pad: {}\r\n", "a".repeat(3000))),
        head("A: b\r\n".repeat(300)),
    ] {
        let (status, v) = pg.raw(&large);
        assert_eq!(
            (status, v["error"].as_str()),
            (431, Some("header_too_large"))
        );
    }
    assert_eq!(pg.raw(&head("X-Pad: ok\r\n".into())).0, 200);

    // A head that drips in is cut at the header timeout.
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    s.write_all(b"GET /sub/x HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (status, _, body) = read_answer(&mut s);
    assert!(status.contains("408"), "{status}");
    assert!(String::from_utf8_lossy(&body).contains("header_timeout"));
    assert!(started.elapsed() < Duration::from_secs(3));
    // A connection that says nothing is closed.
    let mut idle = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.read(&mut [0u8; 16]).unwrap(), 0, "closed");
    assert_eq!(
        pg.metric("pollgate_refused_total{reason=\"header_too_large\"}")
            .await,
        2.0
    );
    assert_eq!(
        pg.metric("pollgate_refused_total{reason=\"header_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_released() {
    let pg = Pollgate::start(&format!("limits:\n  write_timeout: 500ms\n{ROUTES}"));
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    s.write_all(b"GET /sub/firehose HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    // ...and never reads again, while messages pile up.
    let chunk = "x".repeat(512 * 1024);
    for _ in 0..64 {
        client()
            .post(pg.admin("/v1/publish/firehose"))
            .body(chunk.clone())
            .send()
            .await
            .unwrap();
        if pg
            .metric("pollgate_refused_total{reason=\"write_timeout\"}")
            .await
            > 0.0
        {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pg
        .metric("pollgate_refused_total{reason=\"write_timeout\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stalled reader was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.wait_metric("pollgate_held_requests", 0.0).await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_held_is_exact_under_a_burst() {
    let pg = Pollgate::start(&format!("limits:\n  max_held: 5\n{ROUTES}"));
    let polls: Vec<_> = (0..30)
        .map(|i| {
            let url = pg.url(&format!("/sub/burst{}?timeout=2", i % 3));
            tokio::spawn(async move { client().get(url).send().await.unwrap() })
        })
        .collect();
    let (mut held, mut refused) = (0, 0);
    for p in polls {
        let r = p.await.unwrap();
        match r.status().as_u16() {
            200 => held += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((held, refused), (5, 25), "never more than max_held at once");
    assert_eq!(
        pg.metric("pollgate_refused_total{reason=\"max_held\"}")
            .await,
        25.0
    );
}

#[tokio::test]
async fn active_channels_are_capped_per_instance() {
    let pg = Pollgate::start(&format!("limits:\n  max_active_channels: 3\n{ROUTES}"));
    let mut held = Vec::new();
    for name in ["a", "b", "c"] {
        let url = pg.url(&format!("/sub/{name}?timeout=3"));
        held.push(tokio::spawn(async move { get_json(&url).await }));
    }
    pg.wait_metric("pollgate_held_requests", 3.0).await;
    let (status, headers, v) = get_json(&pg.url("/sub/d?timeout=0")).await;
    assert_eq!((status, v["error"].as_str()), (503, Some("unavailable")));
    assert!(v["detail"]
        .as_str()
        .unwrap()
        .contains("max_active_channels"));
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        get_json(&pg.url("/sub/a?timeout=0")).await.0,
        200,
        "known ones serve"
    );
    assert_eq!(pg.metric("pollgate_channels_active").await, 3.0);
    for h in held {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_broker_pushes_back_instead_of_queueing_without_end() {
    let redis = RedisServer::start();
    let pg = Pollgate::start(&with_broker("broker:\n  max_pending: 1\n", &redis.url()));
    pg.wait_ready();
    // Redis stops answering for a while.
    redis.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let publishes: Vec<_> = (0..4)
        .map(|i| {
            let url = pg.admin(&format!("/v1/publish/busy{i}"));
            tokio::spawn(async move { client().post(url).body("x").send().await.unwrap() })
        })
        .collect();
    let mut busy = 0;
    for p in publishes {
        let r = p.await.unwrap();
        assert_eq!(r.status(), 503, "refused, never silently dropped");
        let v: Value = r.json().await.unwrap();
        busy += v["detail"].as_str().unwrap().contains("busy") as usize;
    }
    assert!(busy >= 1, "some were refused for want of room");
    let counted = pg
        .metric("pollgate_refused_total{reason=\"broker_busy\"}")
        .await;
    assert_eq!(counted, busy as f64);
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client()
            .post(pg.admin("/v1/publish/after"))
            .body("x")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break; // and the broker serves again
        }
        assert!(Instant::now() < deadline, "the broker never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
