//! Writing whole answers, on a plain HTTP session (long-polls) or inside
//! Pingora's proxy (proxy routes).
//!
//! Every answer has a Content-Length, so the connection stays reusable
//! (Pingora's `respond_error*` would turn keep-alive off), and every error is
//! JSON `{"error","detail"}`.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::Result;

/// Something an answer can be written to.
#[async_trait]
pub trait Respond: Send {
    /// Writes the header; `end` when no body follows.
    async fn head(&mut self, header: Box<ResponseHeader>, end: bool) -> Result<()>;
    /// Writes (part of) the body; `end` on the last part.
    async fn body(&mut self, body: Bytes, end: bool) -> Result<()>;
}

#[async_trait]
impl Respond for Session {
    async fn head(&mut self, header: Box<ResponseHeader>, end: bool) -> Result<()> {
        self.write_response_header(header, end).await
    }
    async fn body(&mut self, body: Bytes, end: bool) -> Result<()> {
        self.write_response_body(Some(body), end).await
    }
}

#[async_trait]
impl Respond for ServerSession {
    async fn head(&mut self, header: Box<ResponseHeader>, _end: bool) -> Result<()> {
        self.write_response_header(header).await
    }
    async fn body(&mut self, body: Bytes, end: bool) -> Result<()> {
        self.write_response_body(body, end).await
    }
}

/// The JSON body of an error answer.
pub fn error_json(error: &str, detail: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": error, "detail": detail })).unwrap_or_default()
}

/// A response header with status, content type and length set.
pub fn header(status: u16, content_type: &str, len: usize) -> Result<ResponseHeader> {
    // No case map: one allocation less per header, on every answer.
    let mut h = ResponseHeader::build_no_case(status, Some(6))?;
    if !content_type.is_empty() {
        h.insert_header("Content-Type", content_type)?;
    }
    h.insert_header("Content-Length", len.to_string())?;
    Ok(h)
}

/// Writes `header` and `body` as the whole answer.
pub async fn send(to: &mut impl Respond, header: ResponseHeader, body: Bytes) -> Result<()> {
    let empty = body.is_empty();
    to.head(Box::new(header), empty).await?;
    if !empty {
        to.body(body, true).await?;
    }
    Ok(())
}

/// Writes a JSON error answer with optional extra headers.
pub async fn error(
    to: &mut impl Respond,
    status: u16,
    error: &str,
    detail: &str,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let body = error_json(error, detail);
    let mut h = header(status, "application/json", body.len())?;
    h.insert_header("Cache-Control", "no-store")?;
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    send(to, h, Bytes::from(body)).await
}
