//! The watch walk-through of docs/watch.md, as written: the legacy order
//! service example, pollgate on conf/examples/watch.yaml, a client waiting
//! for an order to change while another client changes it. (The 304 after
//! the route's 30 s is checked with a shorter timeout in tests/watch.rs.)

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::*;

/// `curl -s -X PUT -H 'Content-Type: application/json' -d ORDER URL`
async fn put(pg: &Pollgate, path: &str, order: &Value) -> reqwest::Response {
    client()
        .put(pg.url(path))
        .header("Content-Type", "application/json")
        .body(order.to_string())
        .send()
        .await
        .unwrap()
}

/// `curl -si -H 'If-None-Match: ETAG' URL &`: (status, ETag, JSON body or
/// Null) once answered.
fn watch(url: String, etag: &str) -> tokio::task::JoinHandle<(u16, String, Value)> {
    let etag = etag.to_string();
    tokio::spawn(async move {
        let r = client()
            .get(url)
            .header("If-None-Match", etag)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = r.bytes().await.unwrap();
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, etag, v)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_get_answers_when_another_client_changes_the_order() {
    let example =
        support::example::Example::start("orders-backend", "watch.yaml", "127.0.0.1:3001");
    let pg = &example.pg;

    // 1. Store order 42 through pollgate: the backend answers it as is.
    let new = json!({"id": 42, "item": "tea", "status": "new"});
    let r = put(pg, "/orders/42", &new).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("pollgate-message-id"));
    assert_eq!(r.json::<Value>().await.unwrap(), new);

    // 2. GET it: the order, with the ETag pollgate made (the backend sends none).
    let (status, headers, order) = get_json(&pg.url("/orders/42")).await;
    assert_eq!(status, 200);
    assert_eq!(order, new);
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with("\"pg-"), "a hash of the answer: {etag}");

    // 3. A GET with that ETag in If-None-Match is held: nothing changed.
    let held = watch(pg.url("/orders/42"), &etag);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "an unchanged order is held");
    pg.wait_metric("pollgate_held_watchers", 1.0).await;

    // 4. Another client changes the order: the held GET answers with it.
    let paid = json!({"id": 42, "item": "tea", "status": "paid"});
    let r = put(pg, "/orders/42", &paid).await;
    assert_eq!(r.status(), 200);
    let (status, paid_etag, order) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the PUT answers the held GET")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(order, paid);
    assert!(paid_etag.starts_with("\"pg-"), "{paid_etag}");
    assert_ne!(paid_etag, etag, "a new body, a new ETag");

    // 5. A change notice that changes nothing keeps the GET held...
    let held = watch(pg.url("/orders/42"), &paid_etag);
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    let gets = "pollgate_upstream_requests_total{status=\"200\",upstream=\"shop\"}";
    let before = pg.metric(gets).await;
    pg.publish("order:42", "application/x-www-form-urlencoded", "")
        .await;
    pg.wait_metric(gets, before + 1.0).await;
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    assert!(!held.is_finished(), "the same order: still held");

    // ...and deleting the order answers it with the backend's 404.
    let r = client().delete(pg.url("/orders/42")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, gone_etag, body) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the DELETE answers the held GET")
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no order 42");
    assert!(gone_etag.starts_with("\"pg-") && gone_etag != paid_etag);
}
