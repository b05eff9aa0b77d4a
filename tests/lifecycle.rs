//! Limits and lifecycle (docs/api.md: errors and lifecycle): max_held, draining on
//! SIGTERM, grace period, threads.

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test]
async fn over_max_held_is_503_with_retry_after() {
    let pg = Pollgate::start(&format!("limits:\n  max_held: 2\n{ROUTES}"));
    let mut held = Vec::new();
    for _ in 0..2 {
        let url = pg.url("/sub/full?timeout=5");
        held.push(tokio::spawn(async move { get_json(&url).await }));
    }
    pg.wait_metric("pollgate_held_requests", 2.0).await;
    let (status, headers, v) = get_json(&pg.url("/sub/full")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(v["error"], "unavailable");
    assert!(v["detail"].as_str().unwrap().contains("max_held"));
    assert_eq!(
        pg.metric("pollgate_subscribe_requests_total{outcome=\"rejected\"}")
            .await,
        1.0
    );
    pg.publish("full", "text/plain", "x").await;
    for h in held {
        assert_eq!(h.await.unwrap().0, 200);
    }
    let (status, _, _) = get_json(&pg.url("/sub/full?timeout=0")).await;
    assert_eq!(status, 200, "room again once polls are answered");
}

/// Sends a GET on a fresh connection; returns the stream to read later.
fn open_poll(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    s
}

/// A poll answered straight from the publish (plain HTTP/1.1, keep-alive)
/// is no longer held once its answer is written, though its client has not
/// asked again; and a drain closes that idle connection at once.
#[tokio::test]
async fn an_answered_poll_is_no_longer_held_and_a_drain_closes_its_idle_connection() {
    let mut pg = Pollgate::start(&format!("grace_period: 5s\n{ROUTES}"));
    let mut s = open_poll(pg.port, "/sub/settled");
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    pg.publish("settled", "text/plain", "x").await;
    let (status, headers, body) = read_answer(&mut s);
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains(&("connection".into(), "keep-alive".into())),
        "{headers:?}"
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["messages"][0]["data"], "x");
    pg.wait_metric("pollgate_held_requests", 0.0).await;
    let answered = "pollgate_subscribe_requests_total{outcome=\"message\"}";
    assert_eq!(pg.metric(answered).await, 1.0);
    let started = Instant::now();
    pg.signal("-TERM");
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let mut rest = [0u8; 64];
    assert_eq!(s.read(&mut rest).unwrap(), 0, "closed, nothing more sent");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed at once, not at the poll's timeout or the grace period's end"
    );
    let status = pg.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigterm_answers_every_held_poll_with_its_cursor_and_exits_0() {
    let mut pg = Pollgate::start(&format!("grace_period: 5s\n{ROUTES}"));
    let id = pg.publish("d", "text/plain", "x").await;
    let mut single = open_poll(pg.port, &format!("/sub/d?cursor={id}"));
    let mut fresh = open_poll(pg.port, "/sub/empty");
    let mut multi = open_poll(pg.port, "/multi/1/2");
    pg.wait_metric("pollgate_held_requests", 3.0).await;
    let started = Instant::now();
    pg.signal("-TERM");
    for (s, cursor) in [
        (&mut single, id.as_str()),
        (&mut fresh, "0-0"),
        (&mut multi, "0-0.0-0"),
    ] {
        let (status, headers, body) = read_answer(s);
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains(&("connection".into(), "close".into())),
            "{headers:?}"
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["messages"], serde_json::json!([]));
        assert_eq!(position(v["cursor"].as_str().unwrap()), cursor);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once"
    );
    let status = pg
        .wait_exit(Duration::from_secs(5))
        .expect("exits within grace_period");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_poll_that_arrives_during_the_drain_is_answered_not_refused() {
    // A client that connected just before the drain sends its request just
    // after: it gets what is already there (its messages, or its cursor at
    // once) with `Connection: close`, never a refusal, and the instance
    // waits for it before exiting.
    let mut pg = Pollgate::start(&format!("grace_period: 5s\n{ROUTES}"));
    let first = pg.publish("late", "text/plain", "one").await;
    let second = pg.publish("late", "text/plain", "two").await;
    let mut behind = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    let mut current = TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // accepted by now
    pg.signal("-TERM");
    std::thread::sleep(Duration::from_millis(300)); // draining by now
    let ask = |s: &mut TcpStream, cursor: &str| {
        let head = format!("GET /sub/late?cursor={cursor}&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let (status, headers, body) = read_answer(s);
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains(&("connection".into(), "close".into())),
            "{headers:?}"
        );
        serde_json::from_slice::<Value>(&body).unwrap()
    };
    let v = ask(&mut behind, &first);
    assert_eq!(ids(&v), [second.as_str()], "its message: {v}");
    let v = ask(&mut current, &second);
    assert_eq!(
        position(v["cursor"].as_str().unwrap()),
        second.as_str(),
        "the drain answer: {v}"
    );
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
    let status = pg.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// A backend that answers every request after `delay`, once.
fn slow_backend(delay: Duration) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                std::thread::sleep(delay);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndone",
                );
            });
        }
    });
    port
}

fn proxy_config(backend: u16, grace: &str) -> String {
    format!(
        "grace_period: {grace}\nupstreams:\n  app:\n    addrs: [\"127.0.0.1:{backend}\"]\nroutes:\n  - path: /\n    upstream: app\n"
    )
}

#[tokio::test]
async fn sigterm_lets_proxied_requests_finish_within_the_grace_period() {
    let backend = slow_backend(Duration::from_millis(800));
    let mut pg = Pollgate::start(&proxy_config(backend, "5s"));
    let mut s = open_poll(pg.port, "/slow");
    std::thread::sleep(Duration::from_millis(200));
    pg.signal("-TERM");
    let (status, _, body) = read_answer(&mut s);
    assert!(status.contains("200"));
    assert_eq!(body, b"done");
    let status = pg
        .wait_exit(Duration::from_secs(3))
        .expect("exits once drained");
    assert!(status.success());
}

#[tokio::test]
async fn the_grace_period_bounds_the_drain() {
    let backend = slow_backend(Duration::from_secs(30));
    let mut pg = Pollgate::start(&proxy_config(backend, "1s"));
    let _s = open_poll(pg.port, "/stuck");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    pg.signal("-TERM");
    let status = pg
        .wait_exit(Duration::from_secs(5))
        .expect("exits after grace_period");
    assert!(status.success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn threads_sets_the_gateway_worker_count() {
    let pg = Pollgate::start(&format!("threads: 3\n{ROUTES}"));
    assert_eq!(gateway_threads(&pg), 3);
}

fn gateway_threads(pg: &Pollgate) -> usize {
    // Find the pollgate process listening on pg.port via its config path.
    let needle = pg.config.to_str().unwrap().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        return std::fs::read_dir(entry.path().join("task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim_end().starts_with("pollgate gatew"))
            })
            .count();
    }
    panic!("pollgate process not found");
}
