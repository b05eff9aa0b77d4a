//! How to subscribe to and publish on each server under test.
//!
//! - pollgate: `GET /sub/<ch>?cursor=<c>` (JSON envelope, cursor resumes
//!   without loss), publish `POST <admin>/v1/publish/<ch>`.
//! - Nchan: `GET /sub/<ch>` echoing `Last-Modified`/`Etag` as
//!   `If-Modified-Since`/`If-None-Match`, publish `POST /pub?id=<ch>`.
//! - Pushpin: `GET /sub/<ch>` held by a GRIP backend; no cursor, so a
//!   message published between two polls is lost (and counted as lost).
//!   Publish `POST <control>/publish/` with an `http-response` item.

use crate::http::{request, Response};
use serde_json::Value;

/// The servers the harness knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    Pollgate,
    Nchan,
    Pushpin,
}

/// What a subscriber remembers between polls.
#[derive(Default, Clone)]
pub struct Position {
    cursor: Option<String>,
    last_modified: Option<String>,
    etag: Option<String>,
}

/// A received message: the publisher's sequence number and send time (ns).
#[derive(Clone, Copy, Debug)]
pub struct Payload {
    pub seq: u64,
    pub sent_ns: u64,
}

fn payload(v: &Value) -> Option<Payload> {
    Some(Payload {
        seq: v["s"].as_u64()?,
        sent_ns: v["t"].as_u64()?,
    })
}

impl Server {
    /// The next poll of `channel` from `pos`.
    pub fn poll(self, channel: &str, pos: &Position) -> Vec<u8> {
        match self {
            Server::Pollgate => {
                let path = match &pos.cursor {
                    Some(c) => format!("/sub/{channel}?cursor={c}"),
                    None => format!("/sub/{channel}"),
                };
                request("GET", &path, &[], b"")
            }
            Server::Nchan => {
                let mut h = Vec::new();
                if let Some(lm) = &pos.last_modified {
                    h.push(("If-Modified-Since", lm.as_str()));
                }
                if let Some(e) = &pos.etag {
                    h.push(("If-None-Match", e.as_str()));
                }
                request("GET", &format!("/sub/{channel}"), &h, b"")
            }
            Server::Pushpin => request("GET", &format!("/sub/{channel}"), &[], b""),
        }
    }

    /// Reads an answer: the messages it carries; moves `pos` on.
    pub fn read(self, answer: &Response, pos: &mut Position) -> Vec<Payload> {
        match self {
            Server::Pollgate => {
                let Ok(v) = serde_json::from_slice::<Value>(&answer.body) else {
                    return Vec::new();
                };
                if let Some(c) = v["cursor"].as_str() {
                    pos.cursor = Some(c.to_string());
                }
                v["messages"]
                    .as_array()
                    .map(|ms| ms.iter().filter_map(|m| payload(&m["data"])).collect())
                    .unwrap_or_default()
            }
            Server::Nchan | Server::Pushpin => {
                if answer.status != 200 {
                    return Vec::new();
                }
                if let Some(lm) = answer.header("last-modified") {
                    pos.last_modified = Some(lm.to_string());
                }
                if let Some(e) = answer.header("etag") {
                    pos.etag = Some(e.to_string());
                }
                serde_json::from_slice::<Value>(&answer.body)
                    .ok()
                    .and_then(|v| payload(&v))
                    .into_iter()
                    .collect()
            }
        }
    }

    /// A publish of `body` on `channel`, sent to the publish address.
    pub fn publish(self, channel: &str, body: &str) -> Vec<u8> {
        let json = [("Content-Type", "application/json")];
        match self {
            Server::Pollgate => request(
                "POST",
                &format!("/v1/publish/{channel}"),
                &json,
                body.as_bytes(),
            ),
            Server::Nchan => request(
                "POST",
                &format!("/pub?id={channel}"),
                &json,
                body.as_bytes(),
            ),
            Server::Pushpin => {
                let item = serde_json::json!({"items": [{"channel": channel, "formats": {"http-response": {"body": body}}}]});
                request("POST", "/publish/", &json, item.to_string().as_bytes())
            }
        }
    }
}
