//! The admin listener: the publish API (docs/api.md, "Publishing"), channel info, `/metrics`,
//! `/healthz` and `/readyz` (docs/api.md, "Admin endpoints").

use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::message::is_json_type;
use crate::metrics;
use crate::respond::error_json;
use crate::routes::channel_problem;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The admin application.
pub struct Admin {
    pub hub: Arc<Hub>,
    pub life: Arc<Lifecycle>,
    /// Bearer token; empty = open.
    pub token: String,
    pub max_body: u64,
}

type AdminResponse = Response<Vec<u8>>;

fn json(status: u16, value: serde_json::Value) -> AdminResponse {
    let body = serde_json::to_vec(&value).unwrap_or_default();
    respond(status, "application/json", body)
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> AdminResponse {
    let len = body.len();
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = r.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    headers.insert(http::header::CONTENT_LENGTH, len.into());
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: u16, error: &str, detail: &str) -> AdminResponse {
    let mut r = respond(status, "application/json", error_json(error, detail));
    if status == 503 {
        r.headers_mut().insert(http::header::RETRY_AFTER, 1.into());
    }
    if status == 401 {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// One message of a batch publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchMessage {
    channel: String,
    data: serde_json::Value,
    #[serde(default)]
    content_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    messages: Vec<BatchMessage>,
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> bool {
        if self.token.is_empty() {
            return true;
        }
        let header = session
            .req_header()
            .headers
            .get("Authorization")
            .map_or(&b""[..], |v| v.as_bytes());
        bearer_matches(header, self.token.as_bytes())
    }

    /// Reads the whole body; Err is the answer (413) when it is too big.
    async fn body(&self, session: &mut ServerSession) -> Result<Bytes, AdminResponse> {
        let too_big = || {
            error(
                413,
                "payload_too_large",
                &format!(
                    "body is larger than limits.max_body ({} bytes)",
                    self.max_body
                ),
            )
        };
        let declared = session
            .req_header()
            .headers
            .get("Content-Length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(too_big());
        }
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > self.max_body {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => return Err(error(400, "bad_request", &format!("cannot read body: {e}"))),
            }
        }
    }

    async fn publish_one(&self, session: &mut ServerSession, channel: &str) -> AdminResponse {
        if let Some(why) = channel_problem(channel) {
            return error(400, "bad_channel", &why);
        }
        let content_type = session
            .req_header()
            .headers
            .get("Content-Type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let body = match self.body(session).await {
            Ok(b) => b,
            Err(answer) => return answer,
        };
        if is_json_type(&content_type)
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
        {
            return error(
                400,
                "bad_json",
                "Content-Type says JSON but the body is not valid JSON",
            );
        }
        match self.hub.broker().publish(channel, content_type, body).await {
            Ok(m) => {
                metrics::PUBLISHED.inc();
                subscribers_first().await;
                json(
                    200,
                    serde_json::json!({ "id": m.id.to_string(), "channel": channel }),
                )
            }
            Err(e) => error(503, "broker_unavailable", &e.to_string()),
        }
    }

    async fn publish_batch(&self, session: &mut ServerSession) -> AdminResponse {
        let body = match self.body(session).await {
            Ok(b) => b,
            Err(answer) => return answer,
        };
        let batch: Batch = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    400,
                    "bad_json",
                    &format!("expected {{\"messages\": [...]}}: {e}"),
                )
            }
        };
        let mut prepared = Vec::with_capacity(batch.messages.len());
        for (i, m) in batch.messages.into_iter().enumerate() {
            if let Some(why) = channel_problem(&m.channel) {
                return error(400, "bad_channel", &format!("messages[{i}]: {why}"));
            }
            let content_type = m.content_type.unwrap_or_else(|| "application/json".into());
            let data = match (&m.data, is_json_type(&content_type)) {
                (_, true) => serde_json::to_vec(&m.data).unwrap_or_default(),
                (serde_json::Value::String(s), false) => s.clone().into_bytes(),
                (_, false) => {
                    return error(
                        400,
                        "bad_message",
                        &format!(
                            "messages[{i}]: data must be a string when content_type is not JSON"
                        ),
                    )
                }
            };
            if data.len() as u64 > self.max_body {
                return error(
                    413,
                    "payload_too_large",
                    &format!("messages[{i}] is larger than limits.max_body"),
                );
            }
            prepared.push((m.channel, content_type, Bytes::from(data)));
        }
        let mut ids = Vec::with_capacity(prepared.len());
        for (channel, content_type, data) in prepared {
            match self
                .hub
                .broker()
                .publish(&channel, content_type, data)
                .await
            {
                Ok(m) => {
                    metrics::PUBLISHED.inc();
                    ids.push(m.id.to_string());
                }
                Err(e) => {
                    let detail = format!("{e}; published {} of the batch: {:?}", ids.len(), ids);
                    return error(503, "broker_unavailable", &detail);
                }
            }
        }
        subscribers_first().await;
        json(200, serde_json::json!({ "ids": ids }))
    }

    async fn channel_info(&self, channel: &str) -> AdminResponse {
        if let Some(why) = channel_problem(channel) {
            return error(400, "bad_channel", &why);
        }
        match self.hub.info(channel).await {
            Ok(info) => json(
                200,
                serde_json::json!({
                    "channel": channel,
                    "last_id": info.last_id.to_string(),
                    "history": info.history,
                    "subscribers": info.subscribers,
                }),
            ),
            Err(e) => error(503, "broker_unavailable", &e.to_string()),
        }
    }
}

/// Lets the hub's delivery task, which runs on this runtime, answer the
/// held polls of what was just published before the publisher gets its own
/// answer: their clients are the ones waiting (the publisher's answer is
/// one more send, about a tenth of a millisecond of latency for every
/// subscriber behind it, as measured in docs/benchmarks.md).
async fn subscribers_first() {
    tokio::task::yield_now().await;
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.as_str().to_string();
        let path = session.req_header().uri.path().to_string();
        let is_api = path.starts_with("/v1/");
        if is_api && !self.authorized(session) {
            return error(
                401,
                "unauthorized",
                "this publish API needs Authorization: Bearer <token>",
            );
        }
        let decoded = |p: &str| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => respond(200, "text/plain; version=0.0.4", metrics::render()),
            ("GET", "/healthz") => json(200, serde_json::json!({ "status": "ok" })),
            ("GET", "/readyz") => {
                // A broker outage shared by every instance must not empty the
                // Service: ready once the broker was reached, unless asked
                // strictly (`?broker=required`).
                let strict = session.req_header().uri.query() == Some("broker=required");
                let up = self.hub.broker().is_up();
                if self.life.is_draining() {
                    error(503, "draining", "this instance is shutting down")
                } else if !up && (strict || !self.hub.broker_reached()) {
                    error(503, "broker_down", "the broker is unreachable")
                } else {
                    let broker = if up { "up" } else { "down" };
                    json(
                        200,
                        serde_json::json!({ "status": "ready", "broker": broker }),
                    )
                }
            }
            ("POST", "/v1/publish") => self.publish_batch(session).await,
            ("POST", p) if p.starts_with("/v1/publish/") => {
                match decoded(&p["/v1/publish/".len()..]) {
                    Some(ch) => self.publish_one(session, &ch).await,
                    None => error(
                        400,
                        "bad_channel",
                        "the channel is not valid percent-encoded UTF-8",
                    ),
                }
            }
            ("GET", p) if p.starts_with("/v1/channels/") => {
                match decoded(&p["/v1/channels/".len()..]) {
                    Some(ch) => self.channel_info(&ch).await,
                    None => error(
                        400,
                        "bad_channel",
                        "the channel is not valid percent-encoded UTF-8",
                    ),
                }
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/v1/publish") => {
                let allow = if path == "/v1/publish" { "POST" } else { "GET" };
                let mut r = error(
                    405,
                    "method_not_allowed",
                    &format!("{method} is not allowed on {path}"),
                );
                r.headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
                r
            }
            _ => error(
                404,
                "not_found",
                &format!("no admin endpoint {method} {path}"),
            ),
        }
    }
}

/// True when an `Authorization` header value carries `token` as a Bearer
/// credential: the scheme is case-insensitive (RFC 7235), the token is
/// compared in constant time.
fn bearer_matches(header: &[u8], token: &[u8]) -> bool {
    let Some((scheme, given)) = header
        .iter()
        .position(|b| *b == b' ')
        .map(|i| header.split_at(i))
    else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer") && bool::from(given.trim_ascii().ct_eq(token))
}

#[cfg(test)]
mod tests {
    use super::bearer_matches;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for ok in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "bEaReR t0k"] {
            assert!(bearer_matches(ok.as_bytes(), b"t0k"), "{ok}");
        }
        for bad in [
            "Bearer t0",
            "Bearer t0kk",
            "Basic t0k",
            "t0k",
            "",
            "Bearer",
            "Bearer ",
        ] {
            assert!(!bearer_matches(bad.as_bytes(), b"t0k"), "{bad}");
        }
    }
}
