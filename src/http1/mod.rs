//! One HTTP/1 connection, request after request, shared by the client and
//! admin listeners: each request head is read and parsed once (httparse)
//! into a [`Head`]; the app ([`Http1App`]) then serves the request on the
//! raw connection when it can (the lean path: long-polls, admin calls), or
//! has it served on a Pingora HTTP/1 session, which gets the bytes already
//! read and hands the connection back for the next request.
//!
//! Why: Pingora's session costs tens of thousands of instructions per
//! request and kilobytes per connection; the requests pollgate serves most
//! (a long-poll, a publish) need a head, sometimes a short body, and one
//! write.
//!
//! Here: the loop ([`serve`]) and the raw connection's body and answer
//! ([`Raw`]); the head's parse in `head.rs`; the Pingora session's
//! `Gate` and `pingora_refusal` in `gate.rs`.

use crate::error::RequestError;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::Refusal;
use bytes::{Bytes, BytesMut};
use pingora::apps::ReusedHttpStream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod buffers;
mod chunked;
mod gate;
mod head;
mod timer;

use gate::{pingora_refusal, Gate, Rest};
use head::head_end;
pub use head::{content_length, declared_length, parse_head, text, Head};
pub use timer::ConnTimer;

/// Bounds on reading a request.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Largest head (request line and headers), in bytes: 431 past it.
    pub max_head: usize,
    /// Time for a whole head to arrive once its first byte has (and for the
    /// first byte of a connection's first request): 408 past it. A body
    /// read on the lean path must arrive within it too.
    pub header_timeout: Duration,
    /// Time allowed to write an answer or a refusal to a client.
    pub write_timeout: Duration,
}

/// How a connection's requests are served.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub limits: HeadLimits,
    /// Seconds an idle connection is kept between requests.
    pub keepalive_secs: u64,
    /// Most requests per connection; 0 for no limit.
    pub request_limit: u32,
    /// An HTTP/1.1 request without `Host` is a 400 (RFC 9112 §3.2): on the
    /// client listeners, whose requests go on to backends.
    pub require_host: bool,
}

/// What an app does with a request whose head was read.
pub enum Plan<L, S> {
    /// Serve it on the raw connection ([`Http1App::serve_lean`]).
    Lean(L),
    /// Serve it on a Pingora session ([`Http1App::serve_session`]).
    Session(S),
    /// Refuse it (a target that does not parse), and close.
    Refused(RequestError),
}

/// An app served by [`serve`].
pub trait Http1App: Send + Sync + 'static {
    /// What [`Http1App::plan`] hands to the lean path.
    type Lean<'a>: Send
    where
        Self: 'a;
    /// What [`Http1App::plan`] hands to the session path.
    type Handoff<'a>: Send
    where
        Self: 'a;
    /// What the lean path keeps for a connection from one request to the
    /// next.
    type Kept: Default + Send;

    /// Decides how to serve the request of `head` (its target not parsed
    /// yet); `last` when the connection closes after it
    /// (`listener.keepalive_request_limit`). `kept` is what the lean path
    /// kept of the connection's earlier requests.
    fn plan<'a>(
        &'a self,
        head: Head<'_>,
        last: bool,
        kept: &mut Self::Kept,
    ) -> Plan<Self::Lean<'a>, Self::Handoff<'a>>;

    /// Serves a request on the raw connection. Returns whether the
    /// connection can serve another request. (`work` by reference: the
    /// loop keeps it, and the future of a lean request stays small.)
    fn serve_lean<'a>(
        &'a self,
        work: &mut Self::Lean<'a>,
        raw: &mut Raw<'_>,
        kept: &mut Self::Kept,
    ) -> impl Future<Output = bool> + Send;

    /// Serves a request on a Pingora session (its head buffered, not yet
    /// read). Returns the connection when it can serve another request.
    fn serve_session<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        handoff: Self::Handoff<'a>,
        shutdown: &'a ShutdownWatch,
    ) -> impl Future<Output = Option<ReusedHttpStream>> + Send;
}

/// Why no request head was read.
#[derive(Debug, PartialEq, Eq)]
enum NoHead {
    /// Closed, idle past the keep-alive, or shutdown: close quietly.
    Closed,
    /// Larger than `max_head`.
    TooLarge,
    /// Started but not finished within `header_timeout`.
    TooSlow,
}

/// Reads until a whole request head is in `buf` (which may hold bytes of
/// it already, and may end up holding more: a pipelined body or request).
/// Returns the head's length, or None when what was first read ends with
/// a blank line (a whole head, as a rule: the parse finds where it ends,
/// without a search for it first). Waits up to `idle` for the first byte, then
/// `limits.header_timeout` for the rest, on the connection's `timer`
/// (their bounds need not be exact: [`ConnTimer::not_before`]). A
/// connection idle between two
/// requests (`between`) is closed when the instance drains; a new one is
/// not: its first request is on its way (perhaps already in the socket,
/// where closing would reset it), and is served.
async fn read_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    timer: &mut ConnTimer,
    idle: Duration,
    limits: HeadLimits,
    mut drained: Pin<&mut (dyn Future<Output = ()> + Send)>,
    between: bool,
) -> Result<Option<usize>, NoHead> {
    // The header timeout runs from the head's first byte.
    let mut started = !buf.is_empty();
    let wait = if started { limits.header_timeout } else { idle };
    // Set when a read first has to wait.
    let mut deadline = None;
    let mut scanned = 0;
    loop {
        let blank_line_last = buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n");
        if scanned == 0 && blank_line_last && buf.len() <= limits.max_head {
            return Ok(None);
        }
        if let Some(end) = head_end(buf, scanned) {
            return if end > limits.max_head {
                Err(NoHead::TooLarge)
            } else {
                Ok(Some(end))
            };
        }
        if buf.len() > limits.max_head {
            return Err(NoHead::TooLarge);
        }
        if !started && !buf.is_empty() {
            started = true;
            deadline = Some(tokio::time::Instant::now() + limits.header_timeout);
        }
        scanned = buf.len();
        if buf.capacity() == 0 {
            *buf = buffers::take();
        } else if buf.capacity() - buf.len() < 256 {
            buf.reserve(buffers::SIZE);
        }
        let empty = buf.is_empty();
        let mut read = std::pin::pin!(stream.read_buf(buf));
        // A request already in the socket (the usual case right after an
        // answer) is read without setting up a timer.
        let tried = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        let read = match tried {
            Poll::Ready(read) => read,
            Poll::Pending => {
                let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                tokio::select! {
                    biased;
                    read = read => read,
                    _ = drained.as_mut(), if between && empty => return Err(NoHead::Closed),
                    _ = timer.not_before(deadline) => {
                        return Err(if empty { NoHead::Closed } else { NoHead::TooSlow });
                    }
                }
            }
        };
        if read.map_err(|_| NoHead::Closed)? == 0 {
            return Err(NoHead::Closed);
        }
    }
}

/// A request being served on the raw connection.
pub struct Raw<'c> {
    pub stream: &'c mut Stream,
    /// The connection's timer, for the waits of a request served lean.
    pub timer: &'c mut ConnTimer,
    /// Resolves when the instance drains (then the connection closes).
    pub drained: Pin<&'c mut (dyn Future<Output = ()> + Send)>,
    /// The connection's read buffer: the request's head, then whatever
    /// arrived after it (its body, a pipelined request).
    pub buf: &'c mut BytesMut,
    pub limits: HeadLimits,
    head_len: usize,
    /// Bytes after the head that belong to this request.
    body_len: usize,
}

/// Why a request body could not be read on the raw connection.
#[derive(Debug)]
pub enum BodyError {
    /// The client closed or failed.
    Closed,
    /// Not all of it within `limits.header_timeout`.
    TooSlow,
}

impl Raw<'_> {
    /// Reads the request's body of `len` bytes (its `Content-Length`),
    /// which must arrive within `limits.header_timeout`. The caller bounds
    /// `len`.
    pub async fn body(&mut self, len: usize) -> Result<Bytes, BodyError> {
        let end = self.head_len + len;
        let read = async {
            while self.buf.len() < end {
                self.buf.reserve(end - self.buf.len());
                match self.stream.read_buf(self.buf).await {
                    Ok(0) | Err(_) => return Err(BodyError::Closed),
                    Ok(_) => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.limits.header_timeout, read)
            .await
            .map_err(|_| BodyError::TooSlow)??;
        self.body_len = len;
        Ok(Bytes::copy_from_slice(&self.buf[self.head_len..end]))
    }

    /// Drops a request without a body from the buffer once nothing more is
    /// read of it (a long-poll, before it is held); a buffer left empty is
    /// given up (to be recycled), so that a held poll keeps no read buffer
    /// (what the client sends meanwhile is read into a new one).
    pub fn release(&mut self) {
        if self.body_len != 0 {
            return;
        }
        bytes::Buf::advance(self.buf, self.head_len);
        self.head_len = 0;
        if self.buf.is_empty() {
            buffers::give(std::mem::take(self.buf));
        }
    }

    /// Whether the body that `declared` announces was read (or there is
    /// none): otherwise the connection cannot carry another request.
    pub fn body_consumed(&self, declared: Option<u64>) -> bool {
        self.body_len as u64 == declared.unwrap_or(0)
    }

    /// Writes `whole`, one answer's bytes, within `limits.write_timeout`.
    /// Returns whether all of it was written.
    pub async fn write(&mut self, whole: &[u8]) -> bool {
        write_within(self.stream, whole, self.limits.write_timeout).await
    }
}

/// Writes `whole` and flushes, within `limit`. Returns whether it was.
async fn write_within(stream: &mut Stream, whole: &[u8], limit: Duration) -> bool {
    let write = async {
        stream.write_all(whole).await?;
        stream.flush().await
    };
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

/// Writes the answer to `e` straight to the connection and closes it.
async fn refuse(stream: &mut Stream, e: &RequestError, limits: HeadLimits) {
    let answer = crate::error::refusal_answer(e, &[], &[], false);
    if write_within(stream, &answer, limits.write_timeout).await {
        let _ = tokio::time::timeout(limits.write_timeout, stream.shutdown()).await;
    }
}

/// Serves one HTTP/1 connection for `app`, request after request: the
/// first must start within the header timeout, later ones within the
/// keep-alive; at most `settings.request_limit` requests when it is not 0.
/// A request the app plans lean is served on the raw connection; any other
/// gets a Pingora session. The connection counts as in flight until its
/// first request is answered, from `accepted` when the listener counted it
/// from its accept (through a TLS handshake) and from now otherwise.
pub async fn serve<A: Http1App>(
    app: Arc<A>,
    mut stream: Stream,
    settings: Settings,
    life: &Lifecycle,
    mut accepted: Option<InFlight>,
    shutdown: &ShutdownWatch,
) {
    let limits = settings.limits;
    let request_limit = settings.request_limit;
    let mut buf = buffers::take();
    let mut timer = ConnTimer::default();
    // The keep-alive the previous answer set (None before the first).
    let mut keepalive: Option<u64> = None;
    let mut served: u32 = 0;
    // Registered once for the connection, not once per wait between
    // requests (it resolves once: the connection then closes).
    let mut drained: Pin<&mut (dyn Future<Output = ()> + Send)> = std::pin::pin!(life.drained());
    let mut kept = A::Kept::default();
    loop {
        let idle = keepalive.map_or(limits.header_timeout, Duration::from_secs);
        let between = keepalive.is_some();
        // A new connection counts as in flight until its first request
        // is answered, so that a drain waits for the request it is
        // about to send (see `read_head`) instead of exiting under it.
        let _first = (!between).then(|| accepted.take().unwrap_or_else(|| life.enter()));
        let head_end = match read_head(
            &mut stream,
            &mut buf,
            &mut timer,
            idle,
            limits,
            drained.as_mut(),
            between,
        )
        .await
        {
            Ok(end) => end,
            Err(NoHead::Closed) => return,
            Err(NoHead::TooLarge) => {
                Refusal::HeaderTooLarge.count();
                let detail = format!(
                    "the request head is larger than limits.max_head ({} bytes)",
                    limits.max_head
                );
                refuse(&mut stream, &RequestError::HeaderTooLarge(detail), limits).await;
                return;
            }
            Err(NoHead::TooSlow) => {
                Refusal::HeaderTimeout.count();
                let detail = "the request head did not arrive within limits.header_timeout";
                let e = RequestError::HeaderTimeout(detail.into());
                refuse(&mut stream, &e, limits).await;
                return;
            }
        };
        served += 1;
        let last = request_limit > 0 && served >= request_limit;
        let head = &buf[..head_end.unwrap_or(buf.len())];
        let head = match parse_head(head, settings.require_host) {
            Ok(head) => head,
            Err(e) => {
                match e {
                    RequestError::HeaderTooLarge(_) => Refusal::HeaderTooLarge.count(),
                    _ => Refusal::BadTarget.count(),
                }
                refuse(&mut stream, &e, limits).await;
                return;
            }
        };
        let head_len = head.len;
        // A Pingora session gets the bytes of its request and no more (see
        // `Gate`).
        let rest = match head.ends {
            head::Ends::AtLength => Rest::Bytes(head.content_length.unwrap_or(0)),
            head::Ends::Chunked => Rest::Chunked(Default::default()),
            head::Ends::Unknown => Rest::Open,
        };
        // The lean path's work is taken out of the plan before it is
        // awaited, so that a held poll does not also carry the plan.
        let mut work = match app.plan(head, last, &mut kept) {
            Plan::Lean(work) => work,
            Plan::Refused(e) => {
                Refusal::BadTarget.count();
                refuse(&mut stream, &e, limits).await;
                return;
            }
            Plan::Session(handoff) => {
                let turn = Turn {
                    head_len,
                    rest,
                    keepalive,
                    reuses: (request_limit > 0).then(|| request_limit - served),
                    last,
                };
                // Boxed: a held poll then carries only the lean path.
                let on_session = Box::pin(on_session(
                    &app, handoff, stream, &mut buf, turn, limits, shutdown,
                ));
                match on_session.await {
                    Some((next, kept_alive)) => (stream, keepalive) = (next, kept_alive),
                    None => return,
                }
                continue;
            }
        };
        let _in_flight = life.enter();
        let mut raw = Raw {
            stream: &mut stream,
            timer: &mut timer,
            drained: drained.as_mut(),
            buf: &mut buf,
            limits,
            head_len,
            body_len: 0,
        };
        if !app.serve_lean(&mut work, &mut raw, &mut kept).await {
            return;
        }
        let used = raw.head_len + raw.body_len;
        bytes::Buf::advance(&mut buf, used);
        keepalive = Some(settings.keepalive_secs);
    }
}

/// What a request handed to a Pingora session needs of the loop.
struct Turn {
    head_len: usize,
    /// What follows its head.
    rest: Rest,
    /// The keep-alive the previous answer set.
    keepalive: Option<u64>,
    /// Requests the connection may still serve (None: no limit).
    reuses: Option<u32>,
    /// The connection's last request.
    last: bool,
}

/// Serves a request whose head is in `buf` on a Pingora session. Returns
/// the connection to read the next request from, with the keep-alive its
/// answer set, or None when the connection ends.
async fn on_session<'a, A: Http1App>(
    app: &'a Arc<A>,
    handoff: A::Handoff<'a>,
    stream: Stream,
    buf: &mut BytesMut,
    turn: Turn,
    limits: HeadLimits,
    shutdown: &'a ShutdownWatch,
) -> Option<(Stream, Option<u64>)> {
    let (head_len, mut stream) = (turn.head_len, stream);
    // What Pingora's parser refuses (with a bare 400) is refused here
    // with the JSON one.
    if let Err(e) = pingora_refusal(&buf[..head_len]).await {
        Refusal::BadTarget.count();
        refuse(&mut stream, &e, limits).await;
        return None;
    }
    let (prefix, gate) = match turn.rest.after(&buf[head_len..]) {
        Err(body) => (
            buf.split_to(head_len + body),
            Gate::new(stream, Rest::Bytes(0), limits.max_head),
        ),
        Ok(rest) => (buf.split(), Gate::new(stream, rest, limits.max_head)),
    };
    let mut session = ServerSession::new_http1(Box::new(gate));
    session.set_keepalive(turn.keepalive);
    if turn.reuses.is_some() {
        session.set_keepalive_reuses_remaining(turn.reuses);
    }
    session.set_pipelined_prefix(prefix);
    let reused = app.serve_session(session, handoff, shutdown).await;
    let (next, settings) = reused.map(|r| r.consume())?;
    if turn.last {
        return None;
    }
    let mut session = ServerSession::new_http1(next);
    if let Some(settings) = settings {
        settings.apply_to_session(&mut session);
    }
    let keepalive = session.get_keepalive();
    let ServerSession::H1(h1) = session else {
        return None;
    };
    let gate = h1.into_inner().into_any().downcast::<Gate>().ok()?;
    // The bytes read while the session served (a pipelined request)
    // come after those the session was not given.
    let (inner, kept) = gate.release()?;
    buf.extend_from_slice(&kept);
    Some((inner, keepalive))
}

/// The keep-alive to set on `session` before answering its request:
/// `secs`, or None (the answer says `Connection: close` and the connection
/// closes after it) while the instance drains, when the client does not
/// keep its connection (HTTP/1.0 without `Connection: keep-alive`, or
/// `Connection: close`, as Pingora read the head), or when the request's
/// end is not known (an upgrade: see `Gate`). HTTP/2 has no keep-alive of
/// its own: None there.
pub fn keepalive(session: &ServerSession, secs: u64, draining: bool) -> Option<u64> {
    if draining || session.is_http2() || session.get_keepalive().is_none() {
        return None;
    }
    let headers = &session.req_header().headers;
    (!headers.contains_key(http::header::UPGRADE)).then_some(secs)
}
