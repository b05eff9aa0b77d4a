//! Proxy routes that publish (docs/api.md, "Publish-through"): `publish:` (publish-through) and
//! `publish_from_header: true` (header-directed). The request is read whole
//! (at most `limits.max_body`, else 413 before anything happens), sent to
//! the upstream, and its whole answer read; a 2xx answer is published
//! before the client's answer is written, with `Pollgate-Message-Id` (or
//! `Pollgate-Publish-Error`) added. Plain proxy routes do not come here:
//! they stream through Pingora.

use crate::broker::BrokerError;
use crate::config::BodySource;
use crate::error::RequestError;
use crate::hub::Hub;
use crate::message::{content_type_problem, OCTET_STREAM};
use crate::metrics;
use crate::respond;
use crate::routes::ProxyRoute;
use crate::template::{channel_problem, Params};
use crate::upstream::{client_header, forwarded_copy, Peer, Upstreams};
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
                Err(e) => {
                    let e = RequestError::BadRequest(e.to_string());
                    return crate::error::refusal(session, &e, &[]).await;
                }
            },
            None => None,
        };
        let Some(pool) = self.upstreams.get(&route.upstream) else {
            let e = RequestError::Internal("route has no upstream".into());
            return crate::error::refusal(session, &e, &[]).await;
        };
        let body = match self.read_body(session).await? {
            Ok(b) => b,
            Err(TooBig) => {
                let e = RequestError::PayloadTooLarge(format!(
                    "request body is larger than limits.max_body ({} bytes)",
                    self.max_body
                ));
                session.set_keepalive(None);
                return crate::error::refusal(session, &e, &[]).await;
            }
        };
        if let Some((_, BodySource::Request)) = &route.publish {
            // Refused before the upstream sees the write it would publish.
            if let Err(NotPublished::BadContentType(why)) =
                content_type(&session.req_header().headers)
            {
                let e = RequestError::BadContentType(why);
                return crate::error::refusal(session, &e, &[]).await;
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
                let e = RequestError::upstream(&e, e.to_string());
                return crate::error::refusal(session, &e, &[]).await;
            }
        };
        let mut header = client_header(&answer.header)?;
        let ok = answer.header.status.is_success();
        // The message is the bytes the upstream meant: a gzip answer (sent
        // although identity was asked for) is decoded; another coding is
        // not published.
        let (answer_body, meant) =
            match decoded(&answer.header.headers, &answer.body, self.max_body) {
                Decoded::Identity => (answer.body.clone(), Ok(())),
                Decoded::Gzip(plain) => {
                    header.remove_header(&http::header::CONTENT_ENCODING);
                    // The upstream's strong ETag named the gzip bytes: the
                    // decoded ones are the same representation, weakly.
                    weaken_etag(&mut header)?;
                    (plain, Ok(()))
                }
                Decoded::Not(why) => (answer.body.clone(), Err(why)),
            };
        let answer_type = || match &meant {
            Ok(()) => content_type(&answer.header.headers),
            Err(why) => Err(why.clone()),
        };
        let mut targets: Vec<(String, Bytes, ContentType)> = Vec::new();
        if let (Some(channel), Some((_, source))) = (channel, &route.publish) {
            let (data, ct) = match source {
                BodySource::Response => (answer_body.clone(), answer_type()),
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
                    targets.push((ch.to_string(), answer_body.clone(), answer_type()));
                }
            }
        }
        if ok && !targets.is_empty() {
            self.publish(&mut header, targets).await?;
        }
        let mut out = answer_body;
        if meant.is_ok() && !out.is_empty() {
            let wanted = session
                .req_header()
                .headers
                .get_all(http::header::ACCEPT_ENCODING);
            if let Some(gzipped) = gzip_for(wanted, &out) {
                header.insert_header(http::header::CONTENT_ENCODING, "gzip")?;
                header.append_header(http::header::VARY, "Accept-Encoding")?;
                out = gzipped;
            }
        }
        header.insert_header("Content-Length", out.len().to_string())?;
        respond::send(session, header, out).await
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
                (None, Err(why)) => Err(why.to_string()),
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
        let declared = crate::http1::declared_length(&req.headers);
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
    // The answer may become a message: asked for as the bytes themselves.
    request.remove_header(&http::header::ACCEPT_ENCODING);
    request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
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

/// Why a body is not published: its `Display` is the text of
/// `Pollgate-Publish-Error`.
#[derive(Debug, Clone, thiserror::Error)]
enum NotPublished {
    /// A content type that is not a media type.
    #[error("bad_content_type: {0}")]
    BadContentType(String),
    /// An answer in a content coding that is not decoded, or gzip that does
    /// not decode within `limits.max_body`.
    #[error("encoded_answer: {0}")]
    EncodedAnswer(String),
}

/// A message's content type, or why the body is not published.
type ContentType = std::result::Result<String, NotPublished>;

/// The content type of a body with `headers` as a message's (without
/// one: `application/octet-stream`), or why it cannot be one.
fn content_type(headers: &http::HeaderMap) -> ContentType {
    let Some(value) = headers.get("Content-Type") else {
        return Ok(OCTET_STREAM.to_string());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    match content_type_problem(&text) {
        None => Ok(text.into_owned()),
        Some(why) => Err(NotPublished::BadContentType(why)),
    }
}

/// An upstream answer's body as the upstream meant it.
enum Decoded {
    /// No content coding: the body as it came.
    Identity,
    /// A gzip body, decoded.
    Gzip(Bytes),
    /// A coding pollgate does not decode, or a gzip body that does not
    /// decode (within `limits.max_body`): why it is not published.
    Not(NotPublished),
}

/// Makes a strong `ETag` of `header` weak (`W/"..."`), as a body decoded
/// from its content coding is no longer the bytes it named.
fn weaken_etag(header: &mut ResponseHeader) -> Result<()> {
    let strong = header
        .headers
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with('"'))
        .map(|v| format!("W/{v}"));
    if let Some(weak) = strong {
        header.insert_header(http::header::ETAG, weak)?;
    }
    Ok(())
}

/// The body `body` of an answer with `headers`, decoded from its
/// `Content-Encoding` (gzip, the one an upstream is likely to send although
/// asked for identity); at most `max` bytes once decoded.
fn decoded(headers: &http::HeaderMap, body: &[u8], max: u64) -> Decoded {
    use std::io::Read;
    let codings: Vec<String> = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    match codings.as_slice() {
        [] => Decoded::Identity,
        [gzip] if gzip == "gzip" || gzip == "x-gzip" => {
            let mut plain = Vec::new();
            let read = flate2::read::MultiGzDecoder::new(body)
                .take(max + 1)
                .read_to_end(&mut plain);
            match read {
                Ok(n) if n as u64 <= max => Decoded::Gzip(Bytes::from(plain)),
                Ok(_) => Decoded::Not(NotPublished::EncodedAnswer(
                    "the upstream's gzip answer is larger than limits.max_body once decoded".into(),
                )),
                Err(e) => Decoded::Not(NotPublished::EncodedAnswer(format!(
                    "the upstream's gzip answer does not decode ({e})"
                ))),
            }
        }
        _ => Decoded::Not(NotPublished::EncodedAnswer(format!(
            "the upstream answered in the content coding '{}', which is not decoded",
            codings.join(", ").escape_default()
        ))),
    }
}

/// The weight a client's `Accept-Encoding` fields give `coding` (RFC 9110
/// §12.5.3): its own entry's, else `*`'s; None when neither is listed.
fn weight<'a>(fields: impl Iterator<Item = &'a http::HeaderValue>, coding: &str) -> Option<f32> {
    let mut star = None;
    for entry in fields.flat_map(|v| v.as_bytes().split(|&b| b == b',')) {
        let mut parts = entry.split(|&b| b == b';');
        let name = parts.next().unwrap_or_default().trim_ascii();
        let q = parts
            .filter_map(|p| p.trim_ascii().strip_prefix(b"q="))
            .filter_map(|q| std::str::from_utf8(q).ok()?.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        if name.eq_ignore_ascii_case(coding.as_bytes()) {
            return Some(q);
        }
        if name == b"*" {
            star = Some(q);
        }
    }
    star
}

/// `body` gzipped, when the client's `Accept-Encoding` fields (`wanted`)
/// refuse identity (`identity;q=0`, or `*;q=0` without identity) and
/// accept gzip; None otherwise: the answer goes as it is (identity, also
/// when the client accepts nothing pollgate can make).
fn gzip_for(wanted: http::header::GetAll<'_, http::HeaderValue>, body: &[u8]) -> Option<Bytes> {
    use std::io::Write;
    let refuses_identity = weight(wanted.iter(), "identity") == Some(0.0);
    let accepts_gzip = weight(wanted.iter(), "gzip").is_some_and(|q| q > 0.0);
    if !(refuses_identity && accepts_gzip) {
        return None;
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(body).ok()?;
    encoder.finish().ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(values: &[&'static str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static(v),
            );
        }
        h
    }

    #[test]
    fn identity_unless_the_client_refuses_it_and_takes_gzip() {
        let get = |h: &http::HeaderMap| gzip_for(h.get_all(http::header::ACCEPT_ENCODING), b"hi");
        assert!(get(&fields(&[])).is_none());
        assert!(get(&fields(&["gzip, br"])).is_none());
        assert!(get(&fields(&["identity;q=0"])).is_none(), "no gzip either");
        let gz = get(&fields(&["gzip", "identity;q=0"])).unwrap();
        assert!(matches!(decoded(&gzip_headers(), &gz, 10), Decoded::Gzip(b) if b == "hi"));
        assert!(get(&fields(&["*;q=0, gzip"])).is_some());
        assert!(get(&fields(&["*;q=0, identity"])).is_none());
    }

    fn gzip_headers() -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        h
    }

    #[test]
    fn a_decoded_answer_keeps_its_etag_weakly() {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.insert_header("ETag", "\"v1\"").unwrap();
        weaken_etag(&mut h).unwrap();
        assert_eq!(h.headers["etag"], "W/\"v1\"");
        weaken_etag(&mut h).unwrap();
        assert_eq!(h.headers["etag"], "W/\"v1\"", "already weak: as it was");
    }

    #[test]
    fn only_gzip_is_decoded_and_within_max_body() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &[b'a'; 100]).unwrap();
        let gz = encoder.finish().unwrap();
        assert!(matches!(decoded(&gzip_headers(), &gz, 100), Decoded::Gzip(b) if b.len() == 100));
        assert!(matches!(decoded(&gzip_headers(), &gz, 99), Decoded::Not(_)));
        assert!(matches!(
            decoded(&gzip_headers(), b"not gzip", 99),
            Decoded::Not(_)
        ));
        let mut br = http::HeaderMap::new();
        br.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("br"),
        );
        assert!(
            matches!(decoded(&br, b"x", 9), Decoded::Not(why) if why.to_string().contains("br"))
        );
        assert!(matches!(
            decoded(&http::HeaderMap::new(), b"x", 9),
            Decoded::Identity
        ));
    }
}
