//! What a message carries reaches subscribers only as what it claims to be
//! (docs/api.md, "Content types"): a content type is a media type on every
//! way in, or `application/octet-stream` when a writer straight into Redis
//! gave a bad one, and JSON is JSON, UTF-8 included. Tried as an attacker
//! would: header injection through a content type, bytes that poison a
//! channel's JSON answers.

mod support;

use serde_json::{json, Value};
use support::backend::Backend;
use support::redis::RedisServer;
use support::*;

/// A publish-through route keeping the request body, a subscribe route and
/// a raw one, in front of `backend`.
fn routes(backend: &Backend) -> String {
    format!(
        r#"
upstreams:
  app:
    addrs: ["{}"]
routes:
  - path: "/inbox/{{user}}"
    methods: [PUT]
    upstream: app
    publish:
      channel: "inbox:{{user}}"
      body: request
{}"#,
        backend.addr(),
        ROUTES.trim_start_matches("\nroutes:\n")
    )
}

/// Status and JSON of a POST of `body` as `content_type` to the admin `path`.
async fn post(pg: &Pollgate, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(pg.admin(path))
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_is_a_media_type_on_every_way_in() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    // Single publish: a header can hold no line break, but it can hold
    // something that is not a media type.
    let (status, v) = post(&pg, "/v1/publish/c", "plain", b"x".to_vec()).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_content_type"))
    );
    // Batch: the content type is a JSON string, line breaks included.
    let batch = json!({"messages": [
        {"channel": "c", "data": "fine", "content_type": "text/plain"},
        {"channel": "c", "content_type": "text/plain\r\nSet-Cookie: session=stolen", "data": "x"}
    ]});
    let body = serde_json::to_vec(&batch).unwrap();
    let (status, v) = post(&pg, "/v1/publish", "application/json", body).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_content_type")),
        "{v}"
    );
    assert!(
        v["detail"].as_str().unwrap().starts_with("messages[1]"),
        "{v}"
    );
    let (_, _, info) = get_json(&pg.admin("/v1/channels/c")).await;
    assert_eq!(
        info["last_id"], "0-0",
        "nothing of a refused batch is published"
    );
    // Publish-through of the request body: refused before the backend
    // takes the write.
    let r = client()
        .put(pg.url("/inbox/ann"))
        .header("Content-Type", "text/plain; charset")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_content_type");
    assert!(backend.seen().is_empty(), "the backend never saw the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_checked_as_json_utf8_included() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let poison = b"{\"a\":\"\xff\xfe\"}".to_vec();
    let (status, v) = post(&pg, "/v1/publish/c", "application/json", poison.clone()).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_json")),
        "{v}"
    );
    // Through a backend that took it: published, and served as base64, so
    // that every answer carrying it is still JSON a strict client reads.
    let r = client()
        .put(pg.url("/inbox/bob"))
        .header("Content-Type", "application/json")
        .body(poison.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(pg.url("/oldest/inbox:bob"))
        .send()
        .await
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    assert!(std::str::from_utf8(&bytes).is_ok(), "the answer is UTF-8");
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["messages"][0]["encoding"], "base64");
    assert_eq!(v["messages"][0]["data"], "eyJhIjoi//4ifQ==");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_from_redis_never_reaches_a_header_line() {
    let redis = RedisServer::start();
    let pg = Pollgate::start(&with_broker(ROUTES, &redis.url()));
    pg.wait_ready();
    let url = pg.url("/raw/inj");
    let held = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    redis.publish_raw(
        "pollgate",
        "inj",
        "text/plain\r\nSet-Cookie: session=stolen",
        "x",
    );
    let r = held.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_none(), "{:?}", r.headers());
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.text().await.unwrap(), "x", "the data is the data");
    // An announcement of another writer, whose content type only the
    // gateway checks.
    let url = pg.url("/raw/inj2");
    let held = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let payload = "9999999999999-0\ntext/plain\rSet-Cookie: session=stolen\ny";
    redis.cli(&["PUBLISH", "pollgate:{inj2}", payload]);
    let r = held.await.unwrap();
    assert!(r.headers().get("set-cookie").is_none(), "{:?}", r.headers());
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.text().await.unwrap(), "y");
    assert_eq!(pg.metric("pollgate_bad_content_types_total").await, 1.0);
    // Over HTTP/2 too.
    let mut h2 = support::h2c::connect(&pg).await;
    let (status, headers, body) =
        support::h2c::answer(support::h2c::get(&mut h2, "/oldest/inj", &[]).await.0).await;
    assert_eq!(status, 200);
    assert!(headers.get("set-cookie").is_none());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["messages"][0]["content_type"], "application/octet-stream");
}
