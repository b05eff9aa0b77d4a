//! Writing whole answers on the client-facing listener.
//!
//! Every answer has a Content-Length, so the connection stays reusable
//! (Pingora's `respond_error*` would turn keep-alive off), and every error is
//! JSON `{"error","detail"}`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// The JSON body of an error answer.
pub fn error_json(error: &str, detail: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": error, "detail": detail })).unwrap_or_default()
}

/// A response header with status, content type and length set.
pub fn header(status: u16, content_type: &str, len: usize) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6))?;
    if !content_type.is_empty() {
        h.insert_header("Content-Type", content_type)?;
    }
    h.insert_header("Content-Length", len.to_string())?;
    Ok(h)
}

/// Writes `header` and `body` as the whole answer.
pub async fn send(session: &mut Session, header: ResponseHeader, body: Bytes) -> Result<()> {
    let empty = body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Writes a JSON error answer with optional extra headers.
pub async fn error(
    session: &mut Session,
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
    send(session, h, Bytes::from(body)).await
}
