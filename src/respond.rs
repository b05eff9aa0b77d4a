//! Whole answers: written on a Pingora session (long-polls held there) or
//! inside Pingora's proxy (proxy routes), or encoded as the bytes of one
//! HTTP/1.1 answer for the raw connection (`status_head`, `push_field`,
//! `assemble`; an [`Answer`](crate::answer::Answer)'s shared head is
//! written with the same `push_status_head` and `push_field`).
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

/// Runs `write` to the client, giving up (and counting it) when the client
/// accepts no bytes for `timeout`.
pub async fn within<T>(
    timeout: std::time::Duration,
    write: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match pingora_timeout::timeout(timeout, write).await {
        Ok(result) => result,
        Err(_) => {
            crate::metrics::Refusal::WriteTimeout.count();
            pingora::Error::e_explain(
                pingora::ErrorType::WriteTimedout,
                "the client stopped reading",
            )
            .map_err(|e| e.into_down())
        }
    }
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

/// A status line with Content-Type (unless empty) and Content-Length.
pub fn status_head(status: u16, content_type: &str, len: usize) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut head = Vec::with_capacity(256);
    push_status_head(&mut head, (status, reason), content_type, len);
    head
}

/// Appends the status line (`status` with its `reason`), then Content-Type
/// (unless empty) and Content-Length, to `head`. Numbers are written with
/// `itoa`: this runs for every answer a publish makes.
pub fn push_status_head(
    head: &mut Vec<u8>,
    (status, reason): (u16, &str),
    content_type: &str,
    len: usize,
) {
    let mut number = itoa::Buffer::new();
    for part in [
        b"HTTP/1.1 ".as_slice(),
        number.format(status).as_bytes(),
        b" ",
        reason.as_bytes(),
        b"\r\n",
    ] {
        head.extend_from_slice(part);
    }
    if !content_type.is_empty() {
        push_field(head, "Content-Type", content_type);
    }
    push_field(head, "Content-Length", number.format(len));
}

/// Appends the header line `name: value` to `head`.
pub fn push_field(head: &mut Vec<u8>, name: &str, value: &str) {
    for part in [name, ": ", value, "\r\n"] {
        head.extend_from_slice(part.as_bytes());
    }
}

/// The bytes of a whole answer: `head` (status line and header lines),
/// `fields`, Date and Connection, the blank line and `body`.
pub fn assemble(
    head: &[u8],
    fields: &[(&'static str, String)],
    body: &[u8],
    keepalive: bool,
) -> Vec<u8> {
    let date = pingora::protocols::http::date::get_cached_date();
    let connection: &[u8] = if keepalive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    };
    let fields_len: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut whole =
        Vec::with_capacity(head.len() + fields_len + 40 + connection.len() + body.len());
    whole.extend_from_slice(head);
    for (name, value) in fields {
        push_field(&mut whole, name, value);
    }
    whole.extend_from_slice(b"Date: ");
    whole.extend_from_slice(date.as_bytes());
    whole.extend_from_slice(b"\r\n");
    whole.extend_from_slice(connection);
    whole.extend_from_slice(body);
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_status_line_type_length_then_fields() {
        let mut head = status_head(404, "application/json", 12);
        push_field(&mut head, "Allow", "GET");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
             Content-Length: 12\r\nAllow: GET\r\n"
        );
        let head = status_head(204, "", 0);
        assert_eq!(head, b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n");
        let whole = assemble(&head, &[("Vary", "Origin".into())], b"", false);
        let whole = String::from_utf8(whole).unwrap();
        assert!(whole
            .starts_with("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nVary: Origin\r\nDate: "));
        assert!(whole.ends_with("\r\nConnection: close\r\n\r\n"), "{whole}");
    }
}
