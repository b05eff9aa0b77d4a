//! The admin listener: the publish API (docs/api.md, "Publishing"), channel info, `/metrics`,
//! `/healthz` and `/readyz` (docs/api.md, "Admin endpoints").

use crate::error::RequestError;
use crate::http1::{self, BodyError, Head, Http1App, Plan, Raw};
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::message::{content_type_problem, is_json, is_json_type, OCTET_STREAM};
use crate::metrics;
use crate::presence::Presence;
use crate::respond;
use crate::target::RequestTarget;
use crate::template::channel_problem;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::apps::{HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::future::Future;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The admin application.
pub struct Admin {
    pub hub: Arc<Hub>,
    pub life: Arc<Lifecycle>,
    /// Bearer token; empty = open.
    pub token: String,
    pub max_body: u64,
    /// This instance's presence, when tracked (`webhooks:`).
    pub presence: Option<Arc<Presence>>,
}

/// An admin call, as read from its head (on the raw connection or on a
/// Pingora session).
pub struct Call {
    method: Method,
    target: RequestTarget,
    /// The bearer token matched (or none is required).
    authorized: bool,
    content_type: Option<String>,
    /// The body's declared length.
    content_length: Option<u64>,
    /// The client keeps the connection after the answer.
    keepalive: bool,
}

/// An admin answer: always whole, with `Cache-Control: no-store`.
pub struct AdminReply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// One more header field (`Retry-After`, `WWW-Authenticate`, `Allow`).
    extra: Option<(&'static str, String)>,
}

impl AdminReply {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> AdminReply {
        AdminReply {
            status,
            content_type,
            body,
            extra: None,
        }
    }

    fn json(status: u16, value: &impl Serialize) -> AdminReply {
        let body = serde_json::to_vec(value).unwrap_or_default();
        AdminReply::new(status, "application/json", body)
    }

    /// The answer to `e`.
    fn refused(e: RequestError) -> AdminReply {
        AdminReply {
            extra: e.field(),
            ..AdminReply::new(e.status(), "application/json", e.json())
        }
    }

    /// The answer's bytes on an HTTP/1 connection.
    fn h1(&self, keepalive: bool) -> Vec<u8> {
        let mut head = respond::status_head(self.status, self.content_type, self.body.len());
        head.extend_from_slice(b"Cache-Control: no-store\r\n");
        if let Some((name, value)) = &self.extra {
            respond::push_field(&mut head, name, value);
        }
        respond::assemble(&head, &[], &self.body, keepalive)
    }

    /// The answer for Pingora's `ServeHttp`.
    fn into_response(self) -> Response<Vec<u8>> {
        let len = self.body.len();
        let mut r = Response::new(self.body);
        *r.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = r.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(self.content_type),
        );
        headers.insert(http::header::CONTENT_LENGTH, len.into());
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        if let Some((name, value)) = self.extra {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        r
    }
}

/// Where an admin call's body comes from.
trait ReadBody: Send {
    /// The whole body, of at most `max` bytes (`declared` when the head
    /// says). Err is the answer: 413 past `max`, 400 or 408 when it cannot
    /// be read.
    fn read_body(
        &mut self,
        declared: Option<u64>,
        max: u64,
    ) -> impl Future<Output = Result<Bytes, AdminReply>> + Send;
}

/// The body of `call` from `body`, refused (413) at once when its declared
/// length is over `max`.
async fn body_of(call: &Call, max: u64, body: &mut impl ReadBody) -> Result<Bytes, AdminReply> {
    if call.content_length.is_some_and(|n| n > max) {
        return Err(too_big(max));
    }
    body.read_body(call.content_length, max).await
}

/// The 413 answer for a body over `max`.
fn too_big(max: u64) -> AdminReply {
    let detail = format!("body is larger than limits.max_body ({max} bytes)");
    AdminReply::refused(RequestError::PayloadTooLarge(detail))
}

impl ReadBody for ServerSession {
    async fn read_body(&mut self, _declared: Option<u64>, max: u64) -> Result<Bytes, AdminReply> {
        let mut body = BytesMut::new();
        loop {
            match self.read_request_body().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > max {
                        return Err(too_big(max));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    let detail = format!("cannot read body: {e}");
                    return Err(AdminReply::refused(RequestError::BadRequest(detail)));
                }
            }
        }
    }
}

impl ReadBody for Raw<'_> {
    async fn read_body(&mut self, declared: Option<u64>, max: u64) -> Result<Bytes, AdminReply> {
        // The head framed the body with one Content-Length (or none: empty).
        let len = match declared {
            None | Some(0) => return Ok(Bytes::new()),
            Some(n) if n > max => return Err(too_big(max)),
            Some(n) => n as usize,
        };
        self.body(len).await.map_err(|e| match e {
            BodyError::Closed => {
                AdminReply::refused(RequestError::BadRequest("cannot read body: closed".into()))
            }
            BodyError::TooSlow => AdminReply::refused(RequestError::BodyTimeout(
                "the body did not arrive within limits.header_timeout".into(),
            )),
        })
    }
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

/// A batch publish's body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    messages: Vec<BatchMessage>,
}

/// The answer to a single publish: the message's id and its channel.
#[derive(Serialize)]
struct Published<'a> {
    id: String,
    channel: &'a str,
}

impl Admin {
    /// Whether an `Authorization` header value (if any) passes.
    fn authorized(&self, header: Option<&[u8]>) -> bool {
        self.token.is_empty() || bearer_matches(header.unwrap_or_default(), self.token.as_bytes())
    }

    /// Answers `call`, reading its body from `body` when the endpoint
    /// takes one.
    async fn answer(&self, call: &Call, body: &mut impl ReadBody) -> AdminReply {
        let path: SmallVec<[&str; 4]> = call.target.segments().collect();
        if path.len() >= 2 && path[0] == "v1" && !call.authorized {
            let detail = "this publish API needs Authorization: Bearer <token>";
            return AdminReply::refused(RequestError::Unauthorized(detail.into()));
        }
        let method = &call.method;
        match (method, path.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                AdminReply::new(200, "text/plain; version=0.0.4", metrics::render())
            }
            (&Method::GET, ["healthz"]) => {
                AdminReply::json(200, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::GET, ["readyz"]) => self.readiness(call.target.query()),
            (&Method::POST, ["v1", "publish"]) => match body_of(call, self.max_body, body).await {
                Ok(body) => self.publish_batch(body).await,
                Err(reply) => reply,
            },
            (&Method::POST, ["v1", "publish", channel @ ..]) => {
                let channel = channel.join("/");
                if let Some(why) = channel_problem(&channel) {
                    return AdminReply::refused(RequestError::BadChannel(why));
                }
                match body_of(call, self.max_body, body).await {
                    Ok(body) => {
                        self.publish_one(&channel, call.content_type.as_deref(), body)
                            .await
                    }
                    Err(reply) => reply,
                }
            }
            (&Method::GET, ["v1", "channels", channel @ ..]) => {
                self.channel_info(&channel.join("/")).await
            }
            (&Method::GET, ["v1", "presence", channel @ ..]) => {
                self.presence(&channel.join("/")).await
            }
            (_, ["metrics"] | ["healthz"] | ["readyz"] | ["v1", "publish"]) => {
                let path = call.target.path();
                let allow = if path == "/v1/publish" { "POST" } else { "GET" };
                AdminReply::refused(RequestError::MethodNotAllowed {
                    detail: format!("{method} is not allowed on {path}"),
                    allow: allow.into(),
                })
            }
            _ => {
                let detail = format!("no admin endpoint {method} {}", call.target.path());
                AdminReply::refused(RequestError::NotFound(detail))
            }
        }
    }

    /// `/readyz`: a broker outage shared by every instance must not empty
    /// the Service, so ready once the broker was reached, unless asked
    /// strictly (`?broker=required`).
    fn readiness(&self, query: Option<&str>) -> AdminReply {
        let strict = query == Some("broker=required");
        let up = self.hub.broker().is_up();
        if self.life.is_draining() {
            AdminReply::refused(RequestError::Draining)
        } else if !up && (strict || !self.hub.broker_reached()) {
            AdminReply::refused(RequestError::BrokerDown)
        } else {
            let broker = if up { "up" } else { "down" };
            let address = self.hub.broker().address();
            let ready = serde_json::json!({ "status": "ready", "broker": broker, "broker_address": address });
            AdminReply::json(200, &ready)
        }
    }

    async fn publish_one(
        &self,
        channel: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> AdminReply {
        let content_type = content_type.unwrap_or(OCTET_STREAM);
        if let Some(why) = content_type_problem(content_type) {
            return AdminReply::refused(RequestError::BadContentType(why));
        }
        if is_json_type(content_type) && !is_json(&body) {
            let detail = "Content-Type says JSON but the body is not valid JSON (UTF-8)";
            return AdminReply::refused(RequestError::BadJson(detail.into()));
        }
        let broker = self.hub.broker();
        match broker
            .publish(channel, content_type.to_string(), body)
            .await
        {
            Ok(m) => {
                metrics::PUBLISHED.inc();
                subscribers_first().await;
                let id = m.id.to_string();
                AdminReply::json(200, &Published { id, channel })
            }
            Err(e) => AdminReply::refused(RequestError::broker(e)),
        }
    }

    async fn publish_batch(&self, body: Bytes) -> AdminReply {
        let batch: Batch = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                let detail = format!("expected {{\"messages\": [...]}}: {e}");
                return AdminReply::refused(RequestError::BadJson(detail));
            }
        };
        let mut prepared = Vec::with_capacity(batch.messages.len());
        for (i, m) in batch.messages.into_iter().enumerate() {
            if let Some(why) = channel_problem(&m.channel) {
                let detail = format!("messages[{i}]: {why}");
                return AdminReply::refused(RequestError::BadChannel(detail));
            }
            let content_type = m.content_type.unwrap_or_else(|| "application/json".into());
            if let Some(why) = content_type_problem(&content_type) {
                let detail = format!("messages[{i}]: {why}");
                return AdminReply::refused(RequestError::BadContentType(detail));
            }
            let data = match (&m.data, is_json_type(&content_type)) {
                (_, true) => serde_json::to_vec(&m.data).unwrap_or_default(),
                (serde_json::Value::String(s), false) => s.clone().into_bytes(),
                (_, false) => {
                    let detail = format!(
                        "messages[{i}]: data must be a string when content_type is not JSON"
                    );
                    return AdminReply::refused(RequestError::BadMessage(detail));
                }
            };
            if data.len() as u64 > self.max_body {
                let detail = format!("messages[{i}] is larger than limits.max_body");
                return AdminReply::refused(RequestError::PayloadTooLarge(detail));
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
                    return AdminReply::refused(RequestError::Broker { cause: e, detail });
                }
            }
        }
        subscribers_first().await;
        AdminReply::json(200, &serde_json::json!({ "ids": ids }))
    }

    async fn channel_info(&self, channel: &str) -> AdminReply {
        if let Some(why) = channel_problem(channel) {
            return AdminReply::refused(RequestError::BadChannel(why));
        }
        match self.hub.info(channel).await {
            Ok(info) => AdminReply::json(
                200,
                &serde_json::json!({
                    "channel": channel,
                    "last_id": info.last_id.to_string(),
                    "history": info.history,
                    "subscribers": info.subscribers,
                    "subscribers_total": info.subscribers_total,
                }),
            ),
            Err(e) => AdminReply::refused(RequestError::broker(e)),
        }
    }
}

impl Admin {
    /// `GET /v1/presence/{channel}`: the identified subscribers present
    /// across the fleet, oldest first.
    async fn presence(&self, channel: &str) -> AdminReply {
        if let Some(why) = channel_problem(channel) {
            return AdminReply::refused(RequestError::BadChannel(why));
        }
        let Some(presence) = &self.presence else {
            let detail = "presence is not tracked: it needs `webhooks:` in the config";
            return AdminReply::refused(RequestError::NotFound(detail.into()));
        };
        let mut list = match self.hub.broker().presence(channel).await {
            Ok(Some(fleet)) => fleet,
            Ok(None) => presence.list(channel),
            Err(e) => return AdminReply::refused(RequestError::broker(e)),
        };
        list.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let subscribers: Vec<serde_json::Value> = list
            .into_iter()
            .map(|(id, since)| serde_json::json!({ "subscriber": id, "since": since }))
            .collect();
        AdminReply::json(
            200,
            &serde_json::json!({ "channel": channel, "subscribers": subscribers }),
        )
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

/// Admin calls are served on the raw connection, but for those whose body
/// is not framed by one `Content-Length` (chunked, `Expect: 100-continue`)
/// and `HEAD` requests: those go to Pingora's HTTP/1 server.
impl Http1App for Admin {
    type Lean<'a> = Call;
    type Handoff<'a> = ();
    type Kept = ();

    fn plan(&self, head: Head<'_>, last: bool, _: &mut ()) -> Plan<Call, ()> {
        let target = match RequestTarget::parse(head.target) {
            Ok(target) => target,
            Err(e) => return Plan::Refused(e.into()),
        };
        let method = match Method::from_bytes(head.method.as_bytes()) {
            Ok(m) if head.framed && m != Method::HEAD => m,
            _ => return Plan::Session(()),
        };
        Plan::Lean(Call {
            method,
            authorized: self.authorized(head.authorization),
            content_type: head.content_type.map(str::to_owned),
            content_length: head.content_length,
            keepalive: head.keepalive && !last,
            target,
        })
    }

    async fn serve_lean(&self, call: &mut Call, raw: &mut Raw<'_>, _: &mut ()) -> bool {
        let reply = self.answer(call, raw).await;
        // A body left unread would be taken for the next request.
        let keepalive =
            call.keepalive && raw.body_consumed(call.content_length) && !self.life.is_draining();
        raw.write(&reply.h1(keepalive)).await && keepalive
    }

    async fn serve_session<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        _: (),
        shutdown: &'a ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.process_new_http(session, shutdown).await
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // A chunked body or an upgrade ends the connection (`Gate`): the
        // answer says so.
        if let Some(secs) = session.get_keepalive() {
            session.set_keepalive(http1::keepalive(session, secs, false));
        }
        let req = session.req_header();
        let target = std::str::from_utf8(req.raw_path())
            .map_err(|_| RequestError::BadRequest("the request target is not UTF-8".into()))
            .and_then(|raw| Ok(RequestTarget::parse(raw)?));
        let target = match target {
            Ok(target) => target,
            Err(e) => return AdminReply::refused(e).into_response(),
        };
        let header = |name| req.headers.get(name).map(|v| v.as_bytes());
        let call = Call {
            method: req.method.clone(),
            target,
            authorized: self.authorized(header(http::header::AUTHORIZATION)),
            content_type: header(http::header::CONTENT_TYPE)
                .and_then(http1::text)
                .map(str::to_owned),
            content_length: header(http::header::CONTENT_LENGTH)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()),
            keepalive: true,
        };
        self.answer(&call, session).await.into_response()
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
