//! A tiny "legacy" chat backend that knows nothing of pollgate: it stores
//! messages per room in memory and answers plain HTTP. pollgate, in front of
//! it with `conf/examples/chat.yaml`, adds long-polling without a line of
//! this file changing. See docs/chat-example.md.
//!
//! ```text
//! cargo run --example chat-backend -- 127.0.0.1:3000
//! curl -s -X POST -H 'Content-Type: application/json' \
//!      -d '{"user":"ann","text":"hi"}' http://127.0.0.1:3000/rooms/1/messages
//! ```
//!
//! - `POST /rooms/{room}/messages` `{"user","text"}` → 201 with the stored message
//! - `GET /rooms/{room}/messages` → 200 with the room's messages
//! - `GET /rooms/{room}/events` → 200 for `Authorization: Bearer <name>`,
//!   else 401 (the check pollgate's `authorize:` asks before holding a poll)
//! - `GET /` → the chat page (examples/chat-page/index.html) and
//!   `GET /pollgate.js` → the browser client it uses (clients/js), as any
//!   web application serves its own front end

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::Server;
use pingora::services::listening::Service;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
struct Chat {
    rooms: Mutex<HashMap<String, Vec<Value>>>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .body(body)
        .unwrap_or_default()
}

fn answer(status: u16, body: Value) -> Response<Vec<u8>> {
    reply(
        status,
        "application/json",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// The chat page and the browser client, built into the binary.
const PAGE: &str = include_str!("chat-page/index.html");
const CLIENT: &str = include_str!("../clients/js/pollgate.js");

fn asset(content_type: &str, body: &str) -> Response<Vec<u8>> {
    let mut r = reply(200, content_type, body.as_bytes().to_vec());
    r.headers_mut()
        .insert("Cache-Control", http::HeaderValue::from_static("no-cache"));
    r
}

impl Chat {
    fn post(&self, room: &str, body: &[u8]) -> Response<Vec<u8>> {
        let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let (Some(user), Some(text)) = (input["user"].as_str(), input["text"].as_str()) else {
            return answer(400, json!({"error": "send {\"user\": ..., \"text\": ...}"}));
        };
        let mut rooms = self.rooms.lock().unwrap();
        let messages = rooms.entry(room.to_string()).or_default();
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let message =
            json!({"id": messages.len() + 1, "room": room, "user": user, "text": text, "at": at});
        messages.push(message.clone());
        answer(201, message)
    }

    fn list(&self, room: &str) -> Response<Vec<u8>> {
        let rooms = self.rooms.lock().unwrap();
        answer(200, json!(rooms.get(room).cloned().unwrap_or_default()))
    }

    fn may_listen(&self, authorization: Option<&str>) -> Response<Vec<u8>> {
        match authorization.and_then(|a| a.strip_prefix("Bearer ")) {
            Some(name) if !name.trim().is_empty() => answer(200, json!({"ok": true})),
            _ => {
                let mut r = answer(
                    401,
                    json!({"error": "log in first: Authorization: Bearer <your name>"}),
                );
                r.headers_mut()
                    .insert("WWW-Authenticate", "Bearer realm=\"chat\"".parse().unwrap());
                r
            }
        }
    }
}

#[async_trait]
impl ServeHttp for Chat {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.to_string();
        let path = session.req_header().uri.path().to_string();
        let authorization = session
            .req_header()
            .headers
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", ["rooms", room, "messages"]) => self.post(room, &body),
            ("GET", ["rooms", room, "messages"]) => self.list(room),
            ("GET", ["rooms", _, "events"]) => self.may_listen(authorization.as_deref()),
            ("GET", [""]) => asset("text/html; charset=utf-8", PAGE),
            ("GET", ["pollgate.js"]) => asset("text/javascript; charset=utf-8", CLIENT),
            _ => answer(404, json!({"error": format!("no {method} {path}")})),
        }
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let mut server = Server::new(None).expect("pingora server");
    server.bootstrap();
    let mut service = Service::new("chat backend".to_string(), Chat::default());
    service.add_tcp(&addr);
    server.add_service(service);
    eprintln!("chat backend on http://{addr}");
    server.run_forever();
}
