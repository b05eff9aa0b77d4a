//! Proxy routes that publish (docs/api.md, "Publish-through"): `publish:` (publish-through) and
//! `publish_from_header: true` (header-directed). The request is read whole
//! (at most `limits.max_body`, else 413 before anything happens), sent to
//! the upstream, and its whole answer read; a 2xx answer is published
//! before the client's answer is written, with `Pollgate-Message-Id` (or
//! `Pollgate-Publish-Error`) added. Plain proxy routes do not come here:
//! they stream through Pingora.

use crate::broker::BrokerError;
use crate::config::BodySource;
use crate::hub::Hub;
use crate::message::{content_type_problem, OCTET_STREAM};
use crate::metrics;
use crate::respond;
use crate::routes::ProxyRoute;
use crate::template::{channel_problem, Params};
use crate::upstream::{client_header, error_status, forwarded_copy, Peer, Upstreams};
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;
use std::sync::Arc;

/// The publishing side of the proxy.
pub struct Relay {
    pub upstreams: Arc<Upstreams>,
    pub hub: Arc<Hub>,
    pub max_body: u64,
}

/// A body that is too big; answered 413.
struct TooBig;

impl Relay {
    /// Proxies one request on a publishing route and answers the client.
    pub async fn serve(
        &self,
        session: &mut Session,
        route: &ProxyRoute,
        params: &Params<'_>,
    ) -> Result<()> {
        let channel = match &route.publish {
            Some((template, _)) => match template.render(params) {
                Ok(c) => Some(c),
                Err(detail) => {
                    return respond::error(session, 400, "bad_request", &detail, &[]).await
                }
            },
            None => None,
        };
        let Some(pool) = self.upstreams.get(&route.upstream) else {
            return respond::error(session, 500, "error", "route has no upstream", &[]).await;
        };
        let body = match self.read_body(session).await? {
            Ok(b) => b,
            Err(TooBig) => {
                let detail = format!(
                    "request body is larger than limits.max_body ({} bytes)",
                    self.max_body
                );
                session.set_keepalive(None);
                return respond::error(session, 413, "payload_too_large", &detail, &[]).await;
            }
        };
        if let Some((_, BodySource::Request)) = &route.publish {
            // Refused before the upstream sees the write it would publish.
            if let Err(why) = content_type(&session.req_header().headers) {
                return respond::error(session, 400, "bad_content_type", &why, &[]).await;
            }
        }
        let request = upstream_request(session, body.len())?;
        let answer = match self
            .upstreams
            .exchange(pool, &request, body.clone(), self.max_body)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                let status = error_status(&e);
                let kind = if status == 504 {
                    "gateway_timeout"
                } else {
                    "bad_gateway"
                };
                return respond::error(session, status, kind, &e.to_string(), &[]).await;
            }
        };
        let mut header = client_header(&answer.header)?;
        let ok = answer.header.status.is_success();
        let mut targets: Vec<(String, Bytes, ContentType)> = Vec::new();
        if let (Some(channel), Some((_, source))) = (channel, &route.publish) {
            let (data, ct) = match source {
                BodySource::Response => (answer.body.clone(), content_type(&answer.header.headers)),
                BodySource::Request => (body.clone(), content_type(&session.req_header().headers)),
                BodySource::None => (Bytes::new(), Ok(OCTET_STREAM.to_string())),
            };
            targets.push((channel.into(), data, ct));
        }
        if route.publish_from_header {
            if let Some(list) = header.remove_header("Pollgate-Publish") {
                for ch in list
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                {
                    targets.push((
                        ch.to_string(),
                        answer.body.clone(),
                        content_type(&answer.header.headers),
                    ));
                }
            }
        }
        if ok && !targets.is_empty() {
            self.publish(&mut header, targets).await?;
        }
        let len = answer.body.len();
        header.insert_header("Content-Length", len.to_string())?;
        respond::send(session, header, answer.body).await
    }

    /// Publishes each target, adding the ids or the failure to `header`.
    async fn publish(
        &self,
        header: &mut ResponseHeader,
        targets: Vec<(String, Bytes, ContentType)>,
    ) -> Result<()> {
        let mut ids = Vec::new();
        let mut failures = Vec::new();
        for (channel, data, ct) in targets {
            let result = match (channel_problem(&channel), ct) {
                (Some(why), _) => Err(format!("channel '{}': {why}", channel.escape_default())),
                (None, Err(why)) => Err(format!("bad_content_type: {why}")),
                (None, Ok(ct)) => {
                    self.hub
                        .broker()
                        .publish(&channel, ct, data)
                        .await
                        .map_err(|e| match e {
                            BrokerError::TooManyChannels(_) => format!("too_many_channels: {e}"),
                            BrokerError::NotReplicated(why) => format!("not_replicated: {why}"),
                            e => e.to_string(),
                        })
                }
            };
            match result {
                Ok(m) => {
                    metrics::PUBLISHED.inc();
                    metrics::PUBLISH_THROUGH.with_label_values(&["ok"]).inc();
                    ids.push(m.id.to_string());
                }
                Err(why) => {
                    metrics::PUBLISH_THROUGH
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::warn!(%channel, error = %why, "publish after a 2xx upstream answer failed");
                    failures.push(why);
                }
            }
        }
        if !ids.is_empty() {
            header.insert_header("Pollgate-Message-Id", ids.join(", "))?;
        }
        if !failures.is_empty() {
            let text: String = failures
                .join("; ")
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            header.insert_header("Pollgate-Publish-Error", text)?;
        }
        Ok(())
    }

    /// Reads the whole request body, refusing more than `max_body`.
    async fn read_body(&self, session: &mut Session) -> Result<std::result::Result<Bytes, TooBig>> {
        let req = session.req_header();
        let declared = req
            .headers
            .get("Content-Length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Ok(Err(TooBig));
        }
        let expects_continue = req
            .headers
            .get("Expect")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            session.downstream_session.write_continue_response().await?;
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = session.downstream_session.read_request_body().await? {
            if (body.len() + chunk.len()) as u64 > self.max_body {
                return Ok(Err(TooBig));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Ok(body.freeze()))
    }
}

/// The client's request as sent upstream: same method, path, query and
/// headers (but hop-by-hop ones), a Content-Length, and `X-Forwarded-*`.
fn upstream_request(session: &Session, body_len: usize) -> Result<RequestHeader> {
    let client = session.req_header();
    let path = client.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = forwarded_copy(client, client.method.clone(), path, &Peer::of(session))?;
    if body_len > 0
        || !matches!(
            client.method.as_str(),
            "GET" | "HEAD" | "DELETE" | "OPTIONS"
        )
    {
        request.insert_header("Content-Length", body_len.to_string())?;
    }
    Ok(request)
}

/// A message's content type, or why the one given cannot be.
type ContentType = std::result::Result<String, String>;

/// The content type of a body with `headers` as a message's (without
/// one: `application/octet-stream`), or why it cannot be one.
fn content_type(headers: &http::HeaderMap) -> ContentType {
    let Some(value) = headers.get("Content-Type") else {
        return Ok(OCTET_STREAM.to_string());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    match content_type_problem(&text) {
        None => Ok(text.into_owned()),
        Some(why) => Err(why),
    }
}
