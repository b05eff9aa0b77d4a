//! Long-polls served straight on an HTTP/1 connection, without a Pingora
//! session: the front door has parsed the head once, the poll is held on the
//! raw stream, and the answer leaves in one write, its status line and own
//! headers encoded once per [`Answer`] for every waiter it reaches.
//!
//! This is the path of nearly every long-poll (a GET without body,
//! authorization or SSE); the rest go through [`Poller::serve`] on a
//! Pingora session. Both share the parse ([`SubscribeHead::parse`]), the
//! admission and the hold ([`Poller::wait`]).

use crate::answer::Answer;
use crate::metrics::Outcome;
use crate::poll::{self, BadRequest, Client, Poller, Request, Waited};
use crate::respond;
use crate::routes::SubscribeRoute;
use bytes::BytesMut;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use std::io::{IoSlice, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The connection of a poll held on the lean path.
pub struct Exchange<'a> {
    pub stream: &'a mut Stream,
    /// The connection's read buffer: what arrives while the poll is held
    /// (a pipelined request) is kept for the next turn.
    pub buf: &'a mut BytesMut,
    /// Most bytes kept that way before the client counts as gone.
    pub max_buffered: usize,
}

impl Client for Exchange<'_> {
    async fn gone(&mut self) {
        while self.buf.len() <= self.max_buffered {
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(1024);
            }
            match self.stream.read_buf(self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// What the lean path needs of a request besides its subscription.
pub struct Manner {
    /// The client keeps the connection open after the answer.
    pub keepalive: bool,
    /// CORS headers for its Origin.
    pub cors: Vec<(&'static str, String)>,
}

/// Serves one long-poll parsed as `req` (or refused with its 400 detail)
/// on `route`. Returns whether the connection can serve another request.
pub async fn serve(
    poller: &Poller,
    client: &mut Exchange<'_>,
    req: Result<Request, BadRequest>,
    route: &SubscribeRoute,
    manner: Manner,
) -> bool {
    let req = match req {
        Ok(req) => req,
        Err(BadRequest(detail)) => {
            Outcome::Error.count();
            let error = ("bad_request", detail.as_str());
            return write_error(poller, client, 400, error, &manner, &[]).await;
        }
    };
    let _slot = match poller.admit() {
        Ok(slot) => slot,
        Err((refusal, why)) => {
            poll::count_refused(Some(refusal));
            return unavailable(poller, client, "unavailable", why, manner).await;
        }
    };
    match poller.wait(client, &req, route).await {
        Waited::Reply(reply) => {
            let keepalive = manner.keepalive && !reply.close;
            let written =
                write_answer(poller, client, &reply.answer, &manner.cors, keepalive).await;
            if written {
                poll::count_answered(&reply.answer, reply.outcome, reply.live);
            }
            written && keepalive
        }
        Waited::Failed(e) => {
            let (refusal, error) = poll::hub_refusal(&e);
            poll::count_refused(refusal);
            unavailable(poller, client, error, &e.to_string(), manner).await
        }
        Waited::Gone => false,
    }
}

/// Answers 503 with Retry-After.
async fn unavailable(
    poller: &Poller,
    client: &mut Exchange<'_>,
    error: &str,
    detail: &str,
    manner: Manner,
) -> bool {
    let retry = [("Retry-After", poll::RETRY_AFTER)];
    write_error(poller, client, 503, (error, detail), &manner, &retry).await
}

/// Writes `answer`; false when the client could not take it.
async fn write_answer(
    poller: &Poller,
    client: &mut Exchange<'_>,
    answer: &Answer,
    cors: &[(&'static str, String)],
    keepalive: bool,
) -> bool {
    let whole = assemble(answer.h1_head(), cors, &answer.body, keepalive);
    write_whole(poller, client, &whole).await
}

/// Answers a JSON error; false when the client could not take it.
async fn write_error(
    poller: &Poller,
    client: &mut Exchange<'_>,
    status: u16,
    (error, detail): (&str, &str),
    manner: &Manner,
    extra: &[(&str, &str)],
) -> bool {
    let body = respond::error_json(error, detail);
    let mut head = status_head(status, "application/json", body.len());
    head.extend_from_slice(b"Cache-Control: no-store\r\n");
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let whole = assemble(&head, &manner.cors, &body, manner.keepalive);
    write_whole(poller, client, &whole).await && manner.keepalive
}

/// A status line with Content-Type (unless empty) and Content-Length.
pub fn status_head(status: u16, content_type: &str, len: usize) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut head = Vec::with_capacity(256);
    let _ = write!(head, "HTTP/1.1 {status} {reason}\r\n");
    if !content_type.is_empty() {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(head, "Content-Length: {len}\r\n");
    head
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
        let _ = write!(whole, "{name}: {value}\r\n");
    }
    whole.extend_from_slice(b"Date: ");
    whole.extend_from_slice(date.as_bytes());
    whole.extend_from_slice(b"\r\n");
    whole.extend_from_slice(connection);
    whole.extend_from_slice(body);
    whole
}

/// Writes `whole` straight to the socket (one write, as a rule) within the
/// write timeout; returns whether it was written.
async fn write_whole(poller: &Poller, client: &mut Exchange<'_>, whole: &[u8]) -> bool {
    let stream = &mut *client.stream;
    let write = async {
        let mut rest = whole;
        while !rest.is_empty() {
            // Vectored: the listener's connection then skips its gathering.
            match stream.write_vectored(&[IoSlice::new(rest)]).await {
                Ok(0) => return Error::e_explain(ErrorType::WriteError, "connection closed"),
                Ok(n) => rest = &rest[n..],
                Err(e) => return Error::e_because(ErrorType::WriteError, "writing an answer", e),
            }
        }
        stream
            .flush()
            .await
            .or_else(|e| Error::e_because(ErrorType::WriteError, "writing an answer", e))
    };
    poller.write(write).await.is_ok()
}
