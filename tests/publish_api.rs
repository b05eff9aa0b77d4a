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
        json!({"channel": "info", "last_id": id, "history": 1, "subscribers": 1})
    );
    pg.publish("info", "text/plain", "y").await;
    held.await.unwrap();
    let (_, _, v) = get_json(&pg.admin("/v1/channels/never")).await;
    assert_eq!(
        v,
        json!({"channel": "never", "last_id": "0-0", "history": 0, "subscribers": 0})
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
