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

use crate::lifecycle::Lifecycle;
use crate::metrics::Refusal;
use crate::respond;
use crate::target::RequestTarget;
use bytes::{Bytes, BytesMut};
use pingora::apps::ReusedHttpStream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{self as proto, Stream};
use pingora::server::ShutdownWatch;
use smallvec::SmallVec;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most header lines in a request head (as Pingora allows).
const MAX_HEADERS: usize = 256;

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

    /// Decides how to serve the request of `head`; `last` when the
    /// connection closes after it (`listener.keepalive_request_limit`).
    fn plan<'a>(&'a self, head: Head<'_>, last: bool) -> Plan<Self::Lean<'a>, Self::Handoff<'a>>;

    /// Serves a request on the raw connection. Returns whether the
    /// connection can serve another request.
    fn serve_lean<'a>(
        &'a self,
        work: Self::Lean<'a>,
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

/// Where the head ends in `buf` (just past its blank line), searching only
/// from `from` on (minus the 3 bytes a split terminator can reach back), so
/// that a head arriving byte by byte is not scanned again on every read.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    // Every line ends in '\n': look only after each one for the blank line
    // ("\n" or "\r\n") that ends the head.
    let start = from.saturating_sub(3);
    memchr::memchr_iter(b'\n', &buf[start..]).find_map(|i| {
        let after = start + i + 1;
        match &buf[after..] {
            [b'\n', ..] => Some(after + 1),
            [b'\r', b'\n', ..] => Some(after + 2),
            _ => None,
        }
    })
}

/// Reads until a whole request head is in `buf` (which may hold bytes of
/// it already, and may end up holding more: a pipelined body or request).
/// Returns the head's length. Waits up to `idle` for the first byte, then
/// `limits.header_timeout` for the rest. A connection idle between two
/// requests (`between`) is closed when the instance drains; a new one is
/// not: its first request is on its way (perhaps already in the socket,
/// where closing would reset it), and is served.
async fn read_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    idle: Duration,
    limits: HeadLimits,
    drained: &mut Pin<&mut impl Future<Output = ()>>,
    between: bool,
) -> Result<usize, NoHead> {
    // The header timeout runs from the head's first byte.
    let mut started = !buf.is_empty();
    let wait = if started { limits.header_timeout } else { idle };
    let mut deadline = tokio::time::Instant::now() + wait;
    let mut scanned = 0;
    loop {
        if let Some(end) = head_end(buf, scanned) {
            return if end > limits.max_head {
                Err(NoHead::TooLarge)
            } else {
                Ok(end)
            };
        }
        if buf.len() > limits.max_head {
            return Err(NoHead::TooLarge);
        }
        if !started && !buf.is_empty() {
            started = true;
            deadline = tokio::time::Instant::now() + limits.header_timeout;
        }
        scanned = buf.len();
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        // Biased to the read: a request already in the socket (the usual
        // case right after an answer) is read without setting up the rest.
        let read = tokio::select! {
            biased;
            r = stream.read_buf(buf) => r.map_err(|_| NoHead::Closed)?,
            _ = drained.as_mut(), if between && buf.is_empty() => return Err(NoHead::Closed),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(if buf.is_empty() { NoHead::Closed } else { NoHead::TooSlow });
            }
        };
        if read == 0 {
            return Err(NoHead::Closed);
        }
    }
}

/// What is read of a request head, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Head<'a> {
    pub method: &'a str,
    pub target: RequestTarget,
    /// The client keeps the connection after the answer (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 with `Connection: keep-alive`).
    pub keepalive: bool,
    /// The request ends with its head or with `content_length` bytes of
    /// body: no `Transfer-Encoding`, upgrade or 100-continue, at most one
    /// `Host` and one valid `Content-Length`.
    pub framed: bool,
    /// The body's length, when the head declares one.
    pub content_length: Option<u64>,
    /// Where the request ends is known from its head (its `Content-Length`,
    /// or no body): no `Transfer-Encoding`, no `Upgrade`.
    pub delimited: bool,
    pub last_event_id: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub accept: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub authorization: Option<&'a [u8]>,
    /// The values of every `X-Forwarded-For` field, in order.
    pub forwarded_for: SmallVec<[&'a [u8]; 2]>,
}

impl Head<'_> {
    /// Nothing follows the head: [`Head::framed`] without a body.
    pub fn bare(&self) -> bool {
        self.framed && self.content_length.unwrap_or(0) == 0
    }
}

/// A header value as text: visible ASCII and spaces only, as Pingora's
/// `to_str` (None otherwise).
pub fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether a `Connection` header value lists `token`.
fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The one parse of `Content-Length`, for every path (the HTTP/1 head, the
/// gateway's `max_body`, the relay's body). Returns the one length that
/// every field names (None without a field; a field may list the same value
/// several times, RFC 9110 §8.6), or why the fields are refused: a value
/// that is not a number, or values that disagree.
pub fn content_length<'a>(
    fields: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in fields.into_iter().flat_map(|f| f.split(|&b| b == b',')) {
        let n = length_value(value.trim_ascii()).ok_or("a Content-Length that is not a number")?;
        if length.is_some_and(|l| l != n) {
            return Err("Content-Length fields that disagree");
        }
        length = Some(n);
    }
    Ok(length)
}

/// The `Content-Length` of a Pingora request head ([`content_length`]);
/// None without one, or when it is refused.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    let fields = headers.get_all(http::header::CONTENT_LENGTH);
    content_length(fields.iter().map(|v| v.as_bytes()))
        .ok()
        .flatten()
}

/// Whether a `Host` value is an authority a backend can take: host and
/// optional port, no user information, nothing else.
fn valid_host(value: &[u8]) -> bool {
    !value.is_empty()
        && !value.contains(&b'@')
        && http::uri::Authority::try_from(value).is_ok_and(|a| a.as_str().len() == value.len())
}

/// A `Content-Length` value: 1 to 19 digits (no sign, no spaces).
fn length_value(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The [`Head`] of a whole request head, by the same parser (httparse)
/// Pingora uses. The error is the refusal to answer with.
pub fn parse_head(
    head: &[u8],
    require_host: bool,
) -> Result<Head<'_>, (u16, &'static str, String)> {
    // Uninitialized: zeroing room for MAX_HEADERS headers would cost more
    // than parsing the few a long-poll has.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                431,
                "header_too_large",
                format!("more than {MAX_HEADERS} header lines"),
            ))
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err((400, "bad_request", "malformed request head".into()))
        }
    }
    let target = RequestTarget::parse(req.path.unwrap_or_default())
        .map_err(|e| (400, "bad_request", e.to_string()))?;
    let http11 = req.version == Some(1);
    let mut parsed = Head {
        method: req.method.unwrap_or_default(),
        target,
        keepalive: http11,
        framed: true,
        content_length: None,
        delimited: true,
        last_event_id: None,
        if_none_match: None,
        accept: None,
        origin: None,
        content_type: None,
        authorization: None,
        forwarded_for: SmallVec::new(),
    };
    let bad = |detail: &str| Err((400, "bad_request", detail.to_string()));
    let mut hosts = 0;
    let mut lengths: SmallVec<[&[u8]; 1]> = SmallVec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if hosts > 1 {
                return bad("several Host headers");
            }
            if !valid_host(h.value) {
                return bad("the Host header is not a host and port");
            }
            if let Some(authority) = parsed.target.authority() {
                // An absolute-form target names the host itself: it must
                // agree with the Host header (as Pingora requires too).
                if !h.value.eq_ignore_ascii_case(authority.as_bytes()) {
                    let detail = "the Host header differs from the request target's authority";
                    return Err((400, "bad_request", detail.into()));
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if lists(h.value, "close") {
                parsed.keepalive = false;
            } else if !http11 && lists(h.value, "keep-alive") {
                parsed.keepalive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
        {
            parsed.framed = false;
            parsed.delimited = false;
        } else if name.eq_ignore_ascii_case("expect") {
            parsed.framed = false;
        } else if name.eq_ignore_ascii_case("last-event-id") {
            parsed.last_event_id = parsed.last_event_id.or(text(h.value));
        } else if name.eq_ignore_ascii_case("if-none-match") {
            parsed.if_none_match = parsed.if_none_match.or(text(h.value));
        } else if name.eq_ignore_ascii_case("accept") {
            parsed.accept = parsed.accept.or(text(h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            parsed.origin = parsed.origin.or(text(h.value));
        } else if name.eq_ignore_ascii_case("content-type") {
            parsed.content_type = parsed.content_type.or(text(h.value));
        } else if name.eq_ignore_ascii_case("authorization") {
            parsed.authorization = parsed.authorization.or(Some(h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            parsed.forwarded_for.push(h.value);
        }
    }
    if hosts == 0 && http11 && require_host {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    parsed.content_length = match content_length(lengths.iter().copied()) {
        Ok(length) => length,
        Err(detail) => return bad(detail),
    };
    // Several Content-Length fields of one value go through Pingora, and
    // reach a backend as one.
    parsed.framed &= lengths.len() <= 1;
    Ok(parsed)
}

/// A request being served on the raw connection.
pub struct Raw<'c> {
    pub stream: &'c mut Stream,
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

/// Writes a JSON error answer straight to the connection and closes it.
async fn refuse(stream: &mut Stream, status: u16, error: &str, detail: &str, limits: HeadLimits) {
    let answer = respond::error_answer(status, (error, detail), &[], &[], false);
    if write_within(stream, &answer, limits.write_timeout).await {
        let _ = tokio::time::timeout(limits.write_timeout, stream.shutdown()).await;
    }
}

/// Serves one HTTP/1 connection for `app`, request after request: the
/// first must start within the header timeout, later ones within the
/// keep-alive; at most `settings.request_limit` requests when it is not 0.
/// A request the app plans lean is served on the raw connection; any other
/// gets a Pingora session.
pub async fn serve<A: Http1App>(
    app: Arc<A>,
    mut stream: Stream,
    settings: Settings,
    life: &Lifecycle,
    shutdown: &ShutdownWatch,
) {
    let limits = settings.limits;
    let request_limit = settings.request_limit;
    let mut buf = BytesMut::with_capacity(1024);
    // The keep-alive the previous answer set (None before the first).
    let mut keepalive: Option<u64> = None;
    let mut served: u32 = 0;
    // Registered once for the connection, not once per wait between
    // requests (it resolves once: the connection then closes).
    let mut drained = std::pin::pin!(life.drained());
    let mut kept = A::Kept::default();
    loop {
        let idle = keepalive.map_or(limits.header_timeout, Duration::from_secs);
        let between = keepalive.is_some();
        // A new connection counts as in flight until its first request
        // is answered, so that a drain waits for the request it is
        // about to send (see `read_head`) instead of exiting under it.
        let _first = (!between).then(|| life.enter());
        let head_len =
            match read_head(&mut stream, &mut buf, idle, limits, &mut drained, between).await {
                Ok(len) => len,
                Err(NoHead::Closed) => return,
                Err(NoHead::TooLarge) => {
                    Refusal::HeaderTooLarge.count();
                    let detail = format!(
                        "the request head is larger than limits.max_head ({} bytes)",
                        limits.max_head
                    );
                    refuse(&mut stream, 431, "header_too_large", &detail, limits).await;
                    return;
                }
                Err(NoHead::TooSlow) => {
                    Refusal::HeaderTimeout.count();
                    let detail = "the request head did not arrive within limits.header_timeout";
                    refuse(&mut stream, 408, "header_timeout", detail, limits).await;
                    return;
                }
            };
        served += 1;
        let last = request_limit > 0 && served >= request_limit;
        let head = match parse_head(&buf[..head_len], settings.require_host) {
            Ok(head) => head,
            Err((status, error, detail)) => {
                match status {
                    431 => Refusal::HeaderTooLarge.count(),
                    _ => Refusal::BadTarget.count(),
                }
                refuse(&mut stream, status, error, &detail, limits).await;
                return;
            }
        };
        // A request whose end the head tells: a Pingora session gets its
        // bytes and no more (see `Gate`).
        let length = head.delimited.then(|| head.content_length.unwrap_or(0));
        let handoff = match app.plan(head, last) {
            Plan::Lean(work) => {
                let _in_flight = life.enter();
                let mut raw = Raw {
                    stream: &mut stream,
                    buf: &mut buf,
                    limits,
                    head_len,
                    body_len: 0,
                };
                if !app.serve_lean(work, &mut raw, &mut kept).await {
                    return;
                }
                let used = head_len + raw.body_len;
                bytes::Buf::advance(&mut buf, used);
                keepalive = Some(settings.keepalive_secs);
                continue;
            }
            Plan::Session(handoff) => handoff,
        };
        // What Pingora's parser refuses (with a bare 400) is refused here
        // with the JSON one.
        if let Err(detail) = pingora_refusal(&buf[..head_len]).await {
            Refusal::BadTarget.count();
            refuse(&mut stream, 400, "bad_request", &detail, limits).await;
            return;
        }
        let (prefix, gate) = match length {
            Some(length) => {
                let here =
                    (buf.len() - head_len).min(usize::try_from(length).unwrap_or(usize::MAX));
                let prefix = buf.split_to(head_len + here);
                (
                    prefix,
                    Gate::new(stream, Some(length - here as u64), limits.max_head),
                )
            }
            None => (buf.split(), Gate::new(stream, None, limits.max_head)),
        };
        let mut session = ServerSession::new_http1(Box::new(gate));
        session.set_keepalive(keepalive);
        if request_limit > 0 {
            session.set_keepalive_reuses_remaining(Some(request_limit - served));
        }
        session.set_pipelined_prefix(prefix);
        let reused = app.serve_session(session, handoff, shutdown).await;
        let Some((next, settings)) = reused.map(|r| r.consume()) else {
            return;
        };
        if last {
            return;
        }
        let mut session = ServerSession::new_http1(next);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        keepalive = session.get_keepalive();
        let ServerSession::H1(h1) = session else {
            return;
        };
        let Ok(gate) = h1.into_inner().into_any().downcast::<Gate>() else {
            return;
        };
        // The bytes read while the session served (a pipelined request)
        // come after those the session was not given.
        match gate.release() {
            Some((inner, kept)) => {
                buf.extend_from_slice(&kept);
                stream = inner;
            }
            None => return,
        }
    }
}

/// Why Pingora's HTTP/1 parser would refuse the request head `head` (it
/// answers such a head with a 400 without a body), or Ok when it takes it.
/// Run on the heads served on a Pingora session only: the lean path never
/// hands a head to Pingora.
async fn pingora_refusal(head: &[u8]) -> Result<(), String> {
    let probe: Stream = Box::new(std::io::Cursor::new(head.to_vec()));
    let mut session = ServerSession::new_http1(probe);
    match session.read_request().await {
        Ok(true) => Ok(()),
        Ok(false) => Err("malformed request head".into()),
        Err(e) => Err(match e.context.as_ref().map(ToString::to_string) {
            // The context of a parse error quotes the head itself.
            Some(why) if !why.starts_with("buf:") => why,
            _ => "malformed request head".into(),
        }),
    }
}

/// A client connection as a Pingora session reads it: once the session has
/// read the request it was given (`allowed`, the bytes of its body not yet
/// read), what the client sends next (a pipelined request) is kept aside,
/// for the next request of [`serve`], instead of reaching the session (which
/// would take it for more of this request's body, or drop the connection).
/// A close is passed on, so that a session holding a poll sees the client
/// leave. `allowed: None` when the request's end is not known from its head
/// (a chunked body, an upgrade): everything is passed on, and the connection
/// is not kept after the answer (see [`keepalive`]).
#[derive(Debug)]
struct Gate {
    inner: Stream,
    allowed: Option<u64>,
    kept: BytesMut,
    /// Most bytes kept aside: past it, the client counts as gone.
    max_kept: usize,
}

impl Gate {
    fn new(inner: Stream, allowed: Option<u64>, max_kept: usize) -> Gate {
        Gate {
            inner,
            allowed,
            kept: BytesMut::new(),
            max_kept,
        }
    }

    /// The connection and the bytes kept aside, when the session read all
    /// of its request (otherwise the connection cannot serve another).
    fn release(self) -> Option<(Stream, BytesMut)> {
        matches!(self.allowed, Some(0)).then_some((self.inner, self.kept))
    }
}

impl tokio::io::AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match this.allowed {
            None => Pin::new(&mut this.inner).poll_read(cx, buf),
            Some(allowed) if allowed > 0 => {
                // At most the rest of this request's body.
                let room = buf
                    .remaining()
                    .min(usize::try_from(allowed).unwrap_or(usize::MAX));
                let mut part = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(room));
                let read = Pin::new(&mut this.inner).poll_read(cx, &mut part);
                let n = part.filled().len();
                if let Poll::Ready(Ok(())) = read {
                    buf.advance(n);
                    this.allowed = Some(allowed - n as u64);
                }
                read
            }
            Some(_) => loop {
                // The request is read: keep what comes, report only a close.
                if this.kept.len() > this.max_kept {
                    let e = std::io::Error::other("more than limits.max_head after a request");
                    return Poll::Ready(Err(e));
                }
                this.kept.reserve(1024);
                let spare = this.kept.spare_capacity_mut();
                let mut part = tokio::io::ReadBuf::uninit(spare);
                match Pin::new(&mut this.inner).poll_read(cx, &mut part) {
                    Poll::Ready(Ok(())) => {
                        let n = part.filled().len();
                        if n == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        // SAFETY: `n` bytes of the spare capacity were
                        // initialized by the read.
                        unsafe { this.kept.set_len(this.kept.len() + n) };
                    }
                    other => return other,
                }
            },
        }
    }
}

impl tokio::io::AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl proto::Shutdown for Gate {
    async fn shutdown(&mut self) {
        proto::Shutdown::shutdown(&mut *self.inner).await
    }
}

impl proto::UniqueID for Gate {
    fn id(&self) -> proto::UniqueIDType {
        self.inner.id()
    }
}

impl proto::Ssl for Gate {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

#[async_trait::async_trait]
impl proto::Peek for Gate {}

impl proto::GetTimingDigest for Gate {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl proto::GetProxyDigest for Gate {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl proto::GetSocketDigest for Gate {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

/// The keep-alive to set on `session` before answering its request:
/// `secs`, or None (the answer says `Connection: close` and the connection
/// closes after it) while the instance drains, when the client does not
/// keep its connection (HTTP/1.0 without `Connection: keep-alive`, or
/// `Connection: close`, as Pingora read the head), or when the request's
/// end was not known from its head (a chunked body, an upgrade: see
/// `Gate`). HTTP/2 has no keep-alive of its own: None there.
pub fn keepalive(session: &ServerSession, secs: u64, draining: bool) -> Option<u64> {
    if draining || session.is_http2() || session.get_keepalive().is_none() {
        return None;
    }
    let headers = &session.req_header().headers;
    let undelimited = headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers.contains_key(http::header::UPGRADE);
    (!undelimited).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_end_at_the_first_blank_line_found_incrementally() {
        let head = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        // Found when the last read brought only the final "\n".
        assert_eq!(head_end(head, 27), Some(head.len() - 4));
        assert_eq!(head_end(b"GET /a HTTP/1.1\nHost: x\n\n", 0), Some(25));
        assert_eq!(head_end(b"GET /a HTTP/1.1\r\nHost: x\r\n", 0), None);
    }

    #[test]
    fn parses_method_and_target_or_refuses() {
        let head = parse_head(
            b"GET http://h/sub/a?cursor=1-0 HTTP/1.1\r\nHost: h\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((head.method, head.target.path()), ("GET", "/sub/a"));
        assert!(head.keepalive && head.bare());
        let other_host = b"GET http://h/sub/a HTTP/1.1\r\nHost: elsewhere\r\n\r\n";
        assert_eq!(parse_head(other_host, false).unwrap_err().0, 400);
        assert_eq!(
            parse_head(b"GET /a/../b HTTP/1.1\r\n\r\n", false)
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(parse_head(b"garbage\r\n\r\n", false).unwrap_err().0, 400);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(300));
        assert_eq!(parse_head(many.as_bytes(), false).unwrap_err().0, 431);
    }

    #[test]
    fn reads_what_a_long_poll_needs_from_the_head() {
        let head = parse_head(
            b"GET /sub/a HTTP/1.1\r\nLast-Event-ID: 3-0\r\nlast-event-id: 4-0\r\n\
              Origin: https://x\r\nAccept: text/event-stream\r\nConnection: Close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(head.last_event_id, Some("3-0"), "the first of two");
        assert_eq!(head.origin, Some("https://x"));
        assert_eq!(head.accept, Some("text/event-stream"));
        assert!(!head.keepalive);
        let old = parse_head(
            b"GET / HTTP/1.0\r\nConnection: keep-alive, x\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(old.keepalive);
        assert!(
            !parse_head(b"GET / HTTP/1.0\r\n\r\n", false)
                .unwrap()
                .keepalive
        );
        // Not visible ASCII: as if absent.
        let odd = parse_head(b"GET / HTTP/1.1\r\nIf-None-Match: \xff\r\n\r\n", false).unwrap();
        assert_eq!(odd.if_none_match, None);
    }

    #[test]
    fn a_body_is_framed_by_one_valid_content_length_only() {
        let head = parse_head(
            b"POST /v1/publish/a HTTP/1.1\r\nContent-Length: 12\r\n\
              Content-Type: application/json\r\nAuthorization: Bearer t\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(head.framed && !head.bare());
        assert_eq!(head.content_length, Some(12));
        assert_eq!(head.content_type, Some("application/json"));
        assert_eq!(head.authorization, Some(&b"Bearer t"[..]));
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", false)
                .unwrap()
                .bare()
        );
        // Anything else that makes more than a head is left to Pingora.
        for extra in [
            "Transfer-Encoding: chunked",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "Content-Length: 5\r\nContent-Length: 5",
        ] {
            let text = format!("POST / HTTP/1.1\r\n{extra}\r\n\r\n");
            let head = parse_head(text.as_bytes(), false).unwrap();
            assert!(!head.framed && !head.bare(), "{extra}");
        }
        // One length, however many times it is said.
        let twice = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", false);
        assert_eq!(twice.unwrap().content_length, Some(5));
    }

    #[test]
    fn heads_a_backend_would_choke_on_are_refused_with_a_reason() {
        for (extra, why) in [
            ("Host: a\r\nHost: b", "several Host"),
            ("Host: a@b", "not a host"),
            ("Host: a b", "not a host"),
            ("Host: ", "not a host"),
            (
                "Host: a\r\nContent-Length: 5\r\nContent-Length: 6",
                "disagree",
            ),
            ("Host: a\r\nContent-Length: 5, 6", "disagree"),
            ("Host: a\r\nContent-Length: +5", "not a number"),
            (
                "Host: a\r\nContent-Length: 99999999999999999999",
                "not a number",
            ),
            ("Host: a\r\nContent-Length:", "not a number"),
            ("X: y", "needs a Host"),
        ] {
            let text = format!("POST / HTTP/1.1\r\n{extra}\r\n\r\n");
            let (status, _, detail) = parse_head(text.as_bytes(), true).unwrap_err();
            assert_eq!(status, 400, "{extra}");
            assert!(detail.contains(why), "{extra}: {detail}");
        }
        // HTTP/1.0 may leave Host out; the admin listener does not ask.
        assert!(parse_head(b"GET / HTTP/1.0\r\n\r\n", true).is_ok());
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", false).is_ok());
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", true).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Any bytes: no panic, and the incremental search agrees with a
        /// whole scan however the bytes were split into reads.
        #[test]
        fn head_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..300) {
            let _ = parse_head(&bytes, true);
            let split = split.min(bytes.len());
            let whole = head_end(&bytes, 0);
            let incremental = head_end(&bytes[..split], 0).or_else(|| head_end(&bytes, split));
            prop_assert_eq!(whole, incremental);
        }
    }
}
