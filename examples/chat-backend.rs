//! A tiny "legacy" chat backend: it stores messages per room in memory and
//! answers plain HTTP, knowing nothing of long-polling. pollgate, in front
//! of it with `conf/examples/chat.yaml`, adds long-polling without a line of
//! the chat routes changing. To show who is in a room, it also takes
//! pollgate's presence webhooks (docs/presence.md) and announces each
//! arrival and departure in the room through pollgate's publish API. See
//! docs/chat-example.md.
//!
//! ```text
//! cargo run --example chat-backend -- 127.0.0.1:3000
//! curl -s -X POST -H 'Content-Type: application/json' \
//!      -d '{"user":"ann","text":"hi"}' http://127.0.0.1:3000/rooms/1/messages
//! curl -s http://127.0.0.1:3000/rooms/1/members
//! ```
//!
//! - `POST /rooms/{room}/messages` `{"user","text"}` → 201 with the stored message
//! - `GET /rooms/{room}/messages` → 200 with the room's messages
//! - `GET /rooms/{room}/events` → 200 with `Pollgate-Subscriber: <name>` for
//!   `Authorization: Bearer <name>`, else 401 (the check pollgate's
//!   `authorize:` asks before holding a poll; the header names who polls)
//! - `POST /pollgate/events` → 204: pollgate's presence webhook, signed with
//!   `POLLGATE_WEBHOOK_SECRET` (default `chat-demo-secret`, as in the demo
//!   config; 401 when the signature does not match). A subscriber joining or
//!   leaving channel `room:{room}` changes the room's members, and the
//!   change is published to that channel (`POST $POLLGATE_ADMIN/v1/publish/
//!   room:{room}`, default admin `http://127.0.0.1:9090`, with
//!   `POLLGATE_PUBLISH_TOKEN` when set) as `{"type":"presence","event":
//!   "joined"|"left","subscriber","members","version","at"}`; chat messages
//!   have no `type`
//! - `GET /rooms/{room}/members` → 200 with `{"room","members","version"}`:
//!   who is in the room now; `version` grows with each change, and a
//!   presence message with a `version` not above it is older news
//! - `GET /` → the chat page (examples/chat-page/index.html) and
//!   `GET /pollgate.js` → the browser client it uses (clients/js), as any
//!   web application serves its own front end

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::Server;
use pingora::services::listening::Service;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Webhook event ids remembered, to drop the repeats of at-least-once
/// delivery.
const SEEN_IDS: usize = 4096;

struct Chat {
    rooms: Mutex<HashMap<String, Vec<Value>>>,
    presence: Mutex<Presence>,
    /// The webhooks' signing key.
    secret: Vec<u8>,
    /// Presence messages to publish: (room, message), in order.
    publish: mpsc::Sender<(String, Value)>,
}

/// Who is in each room, from pollgate's presence webhooks.
#[derive(Default)]
struct Presence {
    rooms: HashMap<String, Members>,
    /// The ids of the events taken, oldest first (at most [`SEEN_IDS`]).
    seen: VecDeque<String>,
    seen_ids: HashSet<String>,
}

#[derive(Default, Clone)]
struct Members {
    names: BTreeSet<String>,
    /// Grows with each change: the time in Unix ms, or one more than the
    /// last version when that is not later (so it grows across restarts).
    version: u64,
}

impl Presence {
    /// Takes one webhook event. Returns the room and the presence message
    /// to publish there when the room's members changed; None for a repeat
    /// (an id seen before), another event or another channel.
    fn take(&mut self, event: &Value) -> Option<(String, Value)> {
        if !self.first_time(event["id"].as_str()?) {
            return None;
        }
        let room = event["channel"].as_str()?.strip_prefix("room:")?;
        let who = event["subscriber"].as_str()?;
        let members = self.rooms.entry(room.to_string()).or_default();
        let (changed, word) = match event["event"].as_str()? {
            "subscriber_joined" => (members.names.insert(who.to_string()), "joined"),
            "subscriber_left" => (members.names.remove(who), "left"),
            _ => return None,
        };
        if !changed {
            return None;
        }
        members.version = (members.version + 1).max(unix_ms());
        let message = json!({
            "type": "presence", "event": word, "subscriber": who,
            "members": members.names, "version": members.version, "at": event["at"],
        });
        Some((room.to_string(), message))
    }

    /// Remembers `id`; false when it was seen already.
    fn first_time(&mut self, id: &str) -> bool {
        if !self.seen_ids.insert(id.to_string()) {
            return false;
        }
        self.seen.push_back(id.to_string());
        if self.seen.len() > SEEN_IDS {
            if let Some(oldest) = self.seen.pop_front() {
                self.seen_ids.remove(&oldest);
            }
        }
        true
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `header` is `sha256=<hex>` of the HMAC-SHA256 of `body` under
/// `secret`, compared in constant time (`verify_slice`).
fn signed(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    let Some(given) = header
        .and_then(|h| h.strip_prefix("sha256="))
        .and_then(unhex)
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Starts the thread that publishes presence messages to their room's
/// channel through pollgate's publish API, one at a time and in order,
/// away from the webhook's answer. A failure is logged, not retried: the
/// next change carries the whole member list again.
fn publisher() -> mpsc::Sender<(String, Value)> {
    let admin = std::env::var("POLLGATE_ADMIN").unwrap_or_else(|_| "http://127.0.0.1:9090".into());
    let admin = admin.trim_end_matches('/').to_string();
    let token = std::env::var("POLLGATE_PUBLISH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let (send, queue) = mpsc::channel::<(String, Value)>();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        for (room, message) in queue {
            let url = format!("{admin}/v1/publish/room:{room}");
            let mut request = agent.post(&url).header("Content-Type", "application/json");
            if let Some(token) = &token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            match request.send(message.to_string()) {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => eprintln!("publishing presence to {url}: HTTP {}", r.status()),
                Err(e) => eprintln!("publishing presence to {url}: {e}"),
            }
        }
    });
    send
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
        let message = json!({
            "id": messages.len() + 1, "room": room, "user": user, "text": text, "at": unix_ms(),
        });
        messages.push(message.clone());
        answer(201, message)
    }

    fn list(&self, room: &str) -> Response<Vec<u8>> {
        let rooms = self.rooms.lock().unwrap();
        answer(200, json!(rooms.get(room).cloned().unwrap_or_default()))
    }

    fn may_listen(&self, authorization: Option<&str>) -> Response<Vec<u8>> {
        match authorization.and_then(|a| a.strip_prefix("Bearer ")) {
            Some(name) if !name.trim().is_empty() => {
                let mut r = answer(200, json!({"ok": true}));
                if let Ok(name) = name.trim().parse() {
                    r.headers_mut().insert("Pollgate-Subscriber", name);
                }
                r
            }
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

    /// pollgate's presence webhook: verified, taken once per id, answered
    /// at once; a change of members is published by the publisher thread.
    fn webhook(&self, signature: Option<&str>, body: &[u8]) -> Response<Vec<u8>> {
        if !signed(&self.secret, signature, body) {
            return answer(401, json!({"error": "bad or missing Pollgate-Signature"}));
        }
        let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let news = self.presence.lock().unwrap().take(&event);
        if let Some(news) = news {
            let _ = self.publish.send(news);
        }
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Vec::new())
            .unwrap_or_default()
    }

    fn members(&self, room: &str) -> Response<Vec<u8>> {
        let presence = self.presence.lock().unwrap();
        let members = presence.rooms.get(room).cloned().unwrap_or_default();
        answer(
            200,
            json!({"room": room, "members": members.names, "version": members.version}),
        )
    }
}

#[async_trait]
impl ServeHttp for Chat {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.to_string();
        let path = session.req_header().uri.path().to_string();
        let header = |name: &str| {
            let value = session.req_header().headers.get(name);
            value.and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let authorization = header("Authorization");
        let signature = header("Pollgate-Signature");
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", ["rooms", room, "messages"]) => self.post(room, &body),
            ("GET", ["rooms", room, "messages"]) => self.list(room),
            ("GET", ["rooms", _, "events"]) => self.may_listen(authorization.as_deref()),
            ("GET", ["rooms", room, "members"]) => self.members(room),
            ("POST", ["pollgate", "events"]) => self.webhook(signature.as_deref(), &body),
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
    let secret =
        std::env::var("POLLGATE_WEBHOOK_SECRET").unwrap_or_else(|_| "chat-demo-secret".into());
    let chat = Chat {
        rooms: Mutex::default(),
        presence: Mutex::default(),
        secret: secret.into_bytes(),
        publish: publisher(),
    };
    let mut service = Service::new("chat backend".to_string(), chat);
    service.add_tcp(&addr);
    server.add_service(service);
    eprintln!("chat backend on http://{addr}");
    server.run_forever();
}
