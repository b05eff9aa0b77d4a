//! Watch routes against a legacy order service that knows nothing of
//! pollgate: a GET with the current ETag is held until the order changes.

mod support;

use reqwest::StatusCode;
use std::time::Duration;
use support::legacy::Legacy;
use support::*;

fn config(legacy: &Legacy, timeout: &str) -> String {
    format!(
        r#"upstreams:
  shop:
    addrs: ["127.0.0.1:{port}"]
routes:
  - path: "/orders/{{id}}"
    methods: [GET]
    upstream: shop
    watch:
      channels: ["order:{{id}}"]
      timeout: {timeout}
  - path: "/orders/{{id}}"
    methods: [PUT, PATCH, DELETE]
    upstream: shop
    publish:
      channel: "order:{{id}}"
      body: none
"#,
        port = legacy.port
    )
}

/// GETs `path` with `If-None-Match: etag` (when given) and `auth`.
async fn watch(pg: &Pollgate, path: &str, etag: Option<&str>, auth: &str) -> reqwest::Response {
    let mut req = client().get(pg.url(path)).header("Authorization", auth);
    if let Some(etag) = etag {
        req = req.header("If-None-Match", etag);
    }
    req.send().await.unwrap()
}

/// A GET of `path` held with `If-None-Match: etag`, answered in the background.
fn hold(
    pg: &Pollgate,
    path: &str,
    etag: &str,
    auth: &'static str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let (url, etag) = (pg.url(path), etag.to_string());
    tokio::spawn(async move {
        client()
            .get(url)
            .header("Authorization", auth)
            .header("If-None-Match", etag)
            .send()
            .await
            .unwrap()
    })
}

fn etag_of(r: &reqwest::Response) -> String {
    let etag = r.headers().get("etag");
    let etag =
        etag.unwrap_or_else(|| panic!("no ETag on a {} answer: {:?}", r.status(), r.headers()));
    etag.to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_held_get_is_answered_by_a_put_through_the_gateway() {
    for etags in [false, true] {
        let legacy = Legacy::start(etags).await;
        legacy.set("42", r#"{"id":42,"status":"new"}"#);
        let pg = Pollgate::start(&config(&legacy, "30s"));
        let first = watch(&pg, "/orders/42", None, "Bearer a").await;
        assert_eq!(first.status(), 200);
        let etag = etag_of(&first);
        if etags {
            assert_eq!(etag, "\"v1\"", "the upstream's own ETag is kept");
        } else {
            assert!(
                etag.starts_with("\"pg-"),
                "a strong ETag of the body: {etag}"
            );
        }
        assert_eq!(first.text().await.unwrap(), r#"{"id":42,"status":"new"}"#);

        let held = hold(&pg, "/orders/42", &etag, "Bearer a");
        pg.wait_metric("pollgate_held_watchers", 1.0).await;
        let put = client()
            .put(pg.url("/orders/42"))
            .body(r#"{"id":42,"status":"paid"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 200);
        assert!(put.headers().contains_key("pollgate-message-id"));
        let answer = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("the held GET is answered by the PUT")
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_ne!(etag_of(&answer), etag);
        assert_eq!(answer.text().await.unwrap(), r#"{"id":42,"status":"paid"}"#);
    }
}

#[tokio::test]
async fn an_unchanged_resource_stays_held_then_times_out_with_304() {
    let legacy = Legacy::start(false).await;
    legacy.set("7", r#"{"id":7}"#);
    let pg = Pollgate::start(&config(&legacy, "2s"));
    let etag = etag_of(&watch(&pg, "/orders/7", None, "Bearer a").await);
    let started = std::time::Instant::now();
    let held = hold(&pg, "/orders/7", &etag, "Bearer a");
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    // A notice without a change: fetched again, still the same, held on.
    pg.publish("order:7", "text/plain", "").await;
    pg.wait_metric("pollgate_watch_fetches_total{outcome=\"ok\"}", 2.0)
        .await;
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    let answer = held.await.unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag_of(&answer), etag);
    assert!(
        started.elapsed() >= Duration::from_millis(1700),
        "held to the timeout (jitter ≤ 10 %)"
    );
}

#[tokio::test]
async fn a_client_timeout_shortens_the_hold_and_a_bad_one_is_refused() {
    let legacy = Legacy::start(false).await;
    legacy.set("8", r#"{"id":8}"#);
    let pg = Pollgate::start(&config(&legacy, "30s"));
    let etag = etag_of(&watch(&pg, "/orders/8", None, "Bearer a").await);
    // Below the route's 30 s: held for about 0.5 s, then 304.
    let started = std::time::Instant::now();
    let answer = watch(&pg, "/orders/8?timeout=0.5", Some(&etag), "Bearer a").await;
    assert_eq!(answer.status(), StatusCode::NOT_MODIFIED);
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(400) && held < Duration::from_secs(5),
        "held {held:?}"
    );
    // No ETag and no hold: the representation at once.
    let fresh = watch(&pg, "/orders/8?timeout=0", None, "Bearer a").await;
    assert_eq!(fresh.status(), StatusCode::OK);
    let bad = watch(&pg, "/orders/8?timeout=soon", Some(&etag), "Bearer a").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(v["error"], "bad_request");
    assert!(
        v["detail"].as_str().unwrap().contains("timeout 'soon'"),
        "{v}"
    );
}

#[tokio::test]
async fn watchers_share_one_fetch_per_change_but_never_across_credentials() {
    let legacy = Legacy::start(true).await;
    legacy.set("1", r#"{"id":1}"#);
    let pg = Pollgate::start(&config(&legacy, "30s"));
    let etag = etag_of(&watch(&pg, "/orders/1", None, "Bearer a").await);
    let mut held = Vec::new();
    for i in 0..40 {
        let (url, etag) = (pg.url("/orders/1"), etag.clone());
        let auth = if i % 2 == 0 { "Bearer a" } else { "Bearer b" };
        held.push(tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("If-None-Match", etag)
                .header("Authorization", auth)
                .send()
                .await
                .unwrap();
            (auth, r.status(), r.text().await.unwrap())
        }));
    }
    pg.wait_metric("pollgate_held_watchers", 40.0).await;
    let before = legacy.gets();
    legacy.set("1", r#"{"id":1,"v":2}"#);
    pg.publish("order:1", "text/plain", "").await;
    for h in held {
        let (_, status, body) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, r#"{"id":1,"v":2}"#));
    }
    // One GET per credentials, not one per watcher.
    assert_eq!(legacy.gets() - before, 2);
}

#[tokio::test]
async fn upstream_trouble_while_refetching_is_answered_not_hung() {
    let legacy = Legacy::start(true).await;
    legacy.set("5", r#"{"id":5}"#);
    let pg = Pollgate::start(&config(&legacy, "30s"));
    let etag = etag_of(&watch(&pg, "/orders/5", None, "Bearer a").await);
    let held = hold(&pg, "/orders/5", &etag, "Bearer a");
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    legacy
        .store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    pg.publish("order:5", "text/plain", "").await;
    let answer = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 500, "the upstream's status");
    // With the upstream gone altogether: 502 JSON.
    let held = hold(&pg, "/orders/5", &etag_of(&answer), "Bearer a");
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    drop(legacy);
    tokio::time::sleep(Duration::from_millis(100)).await;
    pg.publish("order:5", "text/plain", "").await;
    let answer = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 502);
    let v: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(v["error"], "bad_gateway");
    assert!(
        pg.metric("pollgate_watch_fetches_total{outcome=\"error\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_write_through_one_instance_wakes_watchers_on_another_over_redis() {
    let redis = support::redis::RedisServer::start();
    let legacy = Legacy::start(false).await;
    legacy.set("3", r#"{"id":3}"#);
    let body = with_broker(&config(&legacy, "30s"), &redis.url());
    let (a, b) = (Pollgate::start(&body), Pollgate::start(&body));
    a.wait_ready();
    b.wait_ready();
    let etag = etag_of(&watch(&a, "/orders/3", None, "Bearer a").await);
    let held = hold(&a, "/orders/3", &etag, "Bearer a");
    a.wait_metric("pollgate_held_watchers", 1.0).await;
    let put = client()
        .put(b.url("/orders/3"))
        .body(r#"{"id":3,"status":"shipped"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let answer = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the watcher on the other instance is answered")
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        r#"{"id":3,"status":"shipped"}"#
    );
}

#[tokio::test]
async fn the_upstream_decides_who_sees_what_and_limits_apply_to_watchers() {
    let legacy = Legacy::start(true).await;
    legacy.set("8", r#"{"id":8,"secret":true}"#);
    *legacy.store.token.lock().unwrap() = Some("good".into());
    let pg = Pollgate::start(&format!(
        "{}limits:\n  max_held: 2\n",
        config(&legacy, "30s")
    ));
    // The credentials go upstream with every fetch: a stranger gets the
    // upstream's 401, never the answer fetched for someone else.
    let good = watch(&pg, "/orders/8", None, "Bearer good").await;
    assert_eq!(good.status(), 200);
    let etag = etag_of(&good);
    let bad = watch(&pg, "/orders/8", Some(&etag), "Bearer bad").await;
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.text().await.unwrap(), r#"{"error":"who are you"}"#);
    // limits.max_held counts watchers: the third is refused with 503.
    let first = hold(&pg, "/orders/8", &etag, "Bearer good");
    let second = hold(&pg, "/orders/8", &etag, "Bearer good");
    pg.wait_metric("pollgate_held_watchers", 2.0).await;
    let third = watch(&pg, "/orders/8", Some(&etag), "Bearer good").await;
    assert_eq!(third.status(), 503);
    assert!(third.headers().contains_key("retry-after"));
    // A watcher that leaves is released at once.
    first.abort();
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    drop(second);
}

#[tokio::test]
async fn a_draining_instance_answers_its_watchers_304() {
    let legacy = Legacy::start(true).await;
    legacy.set("4", r#"{"id":4}"#);
    let mut pg = Pollgate::start(&config(&legacy, "30s"));
    let etag = etag_of(&watch(&pg, "/orders/4", None, "Bearer a").await);
    let held = hold(&pg, "/orders/4", &etag, "Bearer a");
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    pg.signal("-TERM");
    let answer = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("answered on drain")
        .unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag_of(&answer), etag);
    assert!(pg.wait_exit(Duration::from_secs(10)).is_some());
}

#[tokio::test]
async fn a_burst_of_changes_during_a_fetch_costs_one_more_fetch_and_a_slow_upstream_504() {
    let legacy = Legacy::start(true).await;
    legacy.set("6", r#"{"id":6}"#);
    let conf = config(&legacy, "30s").replace(
        &format!("addrs: [\"127.0.0.1:{}\"]", legacy.port),
        &format!(
            "addrs: [\"127.0.0.1:{}\"]\n    read_timeout: 1s",
            legacy.port
        ),
    );
    let pg = Pollgate::start(&conf);
    let etag = etag_of(&watch(&pg, "/orders/6", None, "Bearer a").await);
    let held: Vec<_> = (0..10)
        .map(|_| hold(&pg, "/orders/6", &etag, "Bearer a"))
        .collect();
    pg.wait_metric("pollgate_held_watchers", 10.0).await;
    let before = legacy.gets();
    legacy
        .store
        .delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    // Five notices, the last four while the first one's fetch is in flight;
    // the order does not change, so the watchers stay held.
    for _ in 0..5 {
        pg.publish("order:6", "text/plain", "").await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fetches = legacy.gets() - before;
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} fetches for a burst of 5"
    );
    assert_eq!(pg.metric("pollgate_held_watchers").await, 10.0);
    // An upstream slower than its read_timeout: the watchers get 504 JSON.
    legacy
        .store
        .delay_ms
        .store(3000, std::sync::atomic::Ordering::SeqCst);
    legacy.set("6", r#"{"id":6,"v":2}"#);
    pg.publish("order:6", "text/plain", "").await;
    for h in held {
        let answer = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.status(), 504);
        let v: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(v["error"], "gateway_timeout");
    }
}

#[tokio::test]
async fn an_authorize_upstream_is_asked_before_a_watcher_is_served() {
    let legacy = Legacy::start(true).await;
    legacy.set("2", r#"{"id":2}"#);
    let conf = config(&legacy, "30s").replace(
        "      timeout: 30s\n",
        "      timeout: 30s\n      authorize: shop\n      authorize_cache: 10s\n",
    );
    assert!(conf.contains("authorize: shop"));
    let pg = Pollgate::start(&conf);
    *legacy.store.token.lock().unwrap() = Some("good".into());
    let before = legacy.gets();
    for _ in 0..2 {
        let denied = watch(&pg, "/orders/2", None, "Bearer bad").await;
        assert_eq!(denied.status(), 401);
        assert_eq!(denied.text().await.unwrap(), r#"{"error":"who are you"}"#);
    }
    // The denial was asked once (then remembered), and nothing was fetched.
    assert_eq!(legacy.gets() - before, 1);
    let allowed = watch(&pg, "/orders/2", None, "Bearer good").await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(etag_of(&allowed), "\"v1\"");
}

/// A watch GET and an SSE stream held on HTTP/1.1 (both on a Pingora
/// session), whose clients close their connections, are taken off
/// `pollgate_held_watchers` and `pollgate_held_requests`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_and_sse_streams_whose_clients_leave_are_no_longer_counted_as_held() {
    use tokio::io::AsyncWriteExt;
    let legacy = Legacy::start(true).await;
    legacy.set("8", r#"{"id":8}"#);
    let sse_route =
        "  - path: \"/events/{channel}\"\n    subscribe:\n      channels: [\"{channel}\"]\n";
    let pg = Pollgate::start(&format!("{}{sse_route}", config(&legacy, "30s")));
    let mut clients = Vec::new();
    for head in [
        "GET /orders/8 HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"v1\"\r\n\r\n",
        "GET /events/left HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", pg.port))
            .await
            .unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        clients.push(tcp);
    }
    pg.wait_metric("pollgate_held_requests", 2.0).await;
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    drop(clients);
    pg.wait_metric("pollgate_held_requests", 0.0).await;
    pg.wait_metric("pollgate_held_watchers", 0.0).await;
}

#[tokio::test]
async fn watchers_share_a_fetch_only_with_every_credential_the_route_names() {
    let legacy = Legacy::start(true).await;
    legacy.set("3", r#"{"id":3}"#);
    let keyed = config(&legacy, "30s").replace(
        "      timeout: 30s\n",
        "      timeout: 30s\n      authorize_credentials: [X-Api-Key]\n",
    );
    let pg = Pollgate::start(&keyed);
    let etag = etag_of(&watch(&pg, "/orders/3", None, "Bearer same").await);
    let mut held = Vec::new();
    for i in 0..20 {
        let (url, etag) = (pg.url("/orders/3"), etag.clone());
        let key = if i % 2 == 0 { "tenant-a" } else { "tenant-b" };
        held.push(tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("If-None-Match", etag)
                .header("Authorization", "Bearer same")
                .header("X-Api-Key", key)
                .send()
                .await
                .unwrap();
            r.status()
        }));
    }
    pg.wait_metric("pollgate_held_watchers", 20.0).await;
    let before = legacy.gets();
    legacy.set("3", r#"{"id":3,"v":2}"#);
    pg.publish("order:3", "text/plain", "").await;
    for h in held {
        let status = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.as_u16(), 200);
    }
    // One GET per X-Api-Key: never one shared across keys.
    assert_eq!(legacy.gets() - before, 2);
}
