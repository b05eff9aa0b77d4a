//! A tiny "legacy" order service that knows nothing of pollgate: it keeps
//! orders in memory and answers plain REST, without ETags. pollgate, in front
//! of it with `conf/examples/watch.yaml`, lets clients wait for an order to
//! change without a line of this file changing. See docs/watch.md.
//!
//! ```text
//! cargo run --example orders-backend -- 127.0.0.1:3001
//! curl -s -X PUT -H 'Content-Type: application/json' \
//!      -d '{"id":42,"status":"new"}' http://127.0.0.1:3001/orders/42
//! ```
//!
//! - `GET /orders/{id}` → 200 with the order as JSON, or 404
//! - `PUT` (or `PATCH`, which replaces too) `/orders/{id}` with a JSON body → stores it, 200 with it (400 when
//!   the body is not JSON)
//! - `DELETE /orders/{id}` → 204

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::Server;
use pingora::services::listening::Service;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct Orders {
    orders: Mutex<HashMap<String, Value>>,
}

fn answer(status: u16, body: Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(&body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("Content-Type", "application/json")
        .header("Content-Length", body.len())
        .body(body)
        .unwrap_or_default()
}

impl Orders {
    fn get(&self, id: &str) -> Response<Vec<u8>> {
        let orders = self.orders.lock().unwrap();
        match orders.get(id) {
            Some(order) => answer(200, order.clone()),
            None => answer(404, json!({"error": format!("no order {id}")})),
        }
    }

    fn put(&self, id: &str, body: &[u8]) -> Response<Vec<u8>> {
        let Ok(order) = serde_json::from_slice::<Value>(body) else {
            return answer(400, json!({"error": "send the order as JSON"}));
        };
        let mut orders = self.orders.lock().unwrap();
        orders.insert(id.to_string(), order.clone());
        answer(200, order)
    }

    fn delete(&self, id: &str) -> Response<Vec<u8>> {
        self.orders.lock().unwrap().remove(id);
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Vec::new())
            .unwrap_or_default()
    }
}

#[async_trait]
impl ServeHttp for Orders {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.to_string();
        let path = session.req_header().uri.path().to_string();
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["orders", id]) => self.get(id),
            ("PUT" | "PATCH", ["orders", id]) => self.put(id, &body),
            ("DELETE", ["orders", id]) => self.delete(id),
            _ => answer(404, json!({"error": format!("no {method} {path}")})),
        }
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3001".into());
    let mut server = Server::new(None).expect("pingora server");
    server.bootstrap();
    let mut service = Service::new("orders backend".to_string(), Orders::default());
    service.add_tcp(&addr);
    server.add_service(service);
    eprintln!("orders backend on http://{addr}");
    server.run_forever();
}
