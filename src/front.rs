//! The client listener's front door: long-polls are served here on a lean
//! HTTP session; every other request goes to Pingora's proxy (the
//! [`Gateway`](crate::gateway::Gateway)).
//!
//! Why: a connection that enters Pingora's proxy carries its per-request
//! machinery (a ~13 KiB future, the proxy session, cache and module state)
//! for as long as the request lasts. A held poll lasts seconds to minutes,
//! and there are tens of thousands of them. So this app reads the request
//! head itself, and only when the route is not a subscribe route hands the
//! connection (with the bytes already read) to the proxy.

use crate::gateway::Gateway;
use crate::h1;
use crate::lifecycle::Lifecycle;
use crate::metrics::Refusal;
use crate::poll::{cors_headers, Poller, SubscribeHead};
use crate::respond;
use crate::routes::{Action, Match, Params, RouteTable, SubscribeRoute, WatchRoute};
use crate::target::Target;
use crate::watch::Watcher;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most header lines in a request head (as Pingora allows).
const MAX_HEADERS: usize = 256;

/// The app behind the client listener.
pub struct Front {
    pub proxy: Arc<HttpProxy<Gateway>>,
    pub routes: Arc<RouteTable>,
    pub poller: Poller,
    pub watcher: Watcher,
    pub life: Arc<Lifecycle>,
    pub limits: HeadLimits,
    /// Seconds an idle connection is kept between requests.
    pub keepalive_secs: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// HTTP/2 with prior knowledge is served on plaintext connections.
    pub options: HttpServerOptions,
}

/// What the front door holds a request on.
#[derive(Clone, Copy)]
enum Holds<'a> {
    Subscribe(&'a SubscribeRoute),
    Watch(&'a WatchRoute),
}

/// Bounds on reading a request head.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Largest head (request line and headers), in bytes: 431 past it.
    pub max_head: usize,
    /// Time for a whole head to arrive once its first byte has (and for the
    /// first byte of a connection's first request): 408 past it.
    pub header_timeout: Duration,
    /// Time allowed to write a refusal to a client.
    pub write_timeout: Duration,
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
    let mut at = start;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        let after = at + i + 1;
        match &buf[after..] {
            [b'\n', ..] => return Some(after + 1),
            [b'\r', b'\n', ..] => return Some(after + 2),
            _ => at = after,
        }
    }
    None
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
    life: &Lifecycle,
    between: bool,
) -> Result<usize, NoHead> {
    let mut deadline = tokio::time::Instant::now() + idle;
    if !buf.is_empty() {
        deadline = tokio::time::Instant::now() + limits.header_timeout;
    }
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
        scanned = buf.len();
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        // Biased to the read: a request already in the socket (the usual
        // case right after an answer) is read without setting up the rest.
        let read = tokio::select! {
            biased;
            r = stream.read_buf(buf) => r.map_err(|_| NoHead::Closed)?,
            _ = life.drained(), if between && buf.is_empty() => return Err(NoHead::Closed),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(if buf.is_empty() { NoHead::Closed } else { NoHead::TooSlow });
            }
        };
        if read == 0 {
            return Err(NoHead::Closed);
        }
        if scanned == 0 {
            deadline = tokio::time::Instant::now() + limits.header_timeout;
        }
    }
}

/// What the front door reads of a request head.
#[derive(Debug)]
struct Head<'a> {
    method: &'a str,
    target: Target,
    /// The client keeps the connection after the answer (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 with `Connection: keep-alive`).
    keepalive: bool,
    /// Nothing follows the head: no body, no upgrade, no 100-continue.
    bare: bool,
    last_event_id: Option<&'a str>,
    if_none_match: Option<&'a str>,
    accept: Option<&'a str>,
    origin: Option<&'a str>,
}

impl<'a> Head<'a> {
    /// The facts a subscribe request is parsed from.
    fn subscribe(&self) -> SubscribeHead<'_> {
        SubscribeHead {
            target: &self.target,
            last_event_id: self.last_event_id,
            if_none_match: self.if_none_match,
            accept: self.accept,
        }
    }
}

/// A header value as text: visible ASCII and spaces only, as Pingora's
/// `to_str` (None otherwise).
fn text(value: &[u8]) -> Option<&str> {
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

/// The [`Head`] of a whole request head, by the same parser (httparse)
/// Pingora uses. The error is the refusal to answer with.
fn parse_head(head: &[u8]) -> Result<Head<'_>, (u16, &'static str, String)> {
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
    let target = Target::parse(req.path.unwrap_or_default())
        .map_err(|e| (400, "bad_request", e.to_string()))?;
    let http11 = req.version == Some(1);
    let mut parsed = Head {
        method: req.method.unwrap_or_default(),
        target,
        keepalive: http11,
        bare: true,
        last_event_id: None,
        if_none_match: None,
        accept: None,
        origin: None,
    };
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
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
            parsed.bare &= h.value == b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            parsed.bare = false;
        } else if name.eq_ignore_ascii_case("last-event-id") {
            parsed.last_event_id = parsed.last_event_id.or(text(h.value));
        } else if name.eq_ignore_ascii_case("if-none-match") {
            parsed.if_none_match = parsed.if_none_match.or(text(h.value));
        } else if name.eq_ignore_ascii_case("accept") {
            parsed.accept = parsed.accept.or(text(h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            parsed.origin = parsed.origin.or(text(h.value));
        }
    }
    // Several Host headers are Pingora's to refuse.
    parsed.bare &= hosts <= 1;
    Ok(parsed)
}

/// Writes a JSON error answer straight to the connection and closes it.
async fn refuse(stream: &mut Stream, status: u16, error: &str, detail: &str, limits: HeadLimits) {
    let body = respond::error_json(error, detail);
    let mut head = h1::status_head(status, "application/json", body.len());
    head.extend_from_slice(b"Cache-Control: no-store\r\n");
    let answer = h1::assemble(&head, &[], &body, false);
    let write = async {
        stream.write_all(&answer).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(limits.write_timeout, write).await;
}

impl Front {
    /// The route of this request when the front door holds it (a
    /// subscribe request, or a GET on a watch route).
    fn held_route(&self, method: &str, target: &Target) -> Option<(Holds<'_>, Params)> {
        if method == "OPTIONS" {
            return None; // CORS preflight: the gateway answers it
        }
        match self.routes.find(method, target) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(sub) => Some((Holds::Subscribe(sub), params)),
                Action::Watch(watch) if method == "GET" => Some((Holds::Watch(watch), params)),
                Action::Watch(_) | Action::Proxy(_) => None,
            },
            _ => None,
        }
    }

    /// Serves one HTTP/2 stream, whose request Pingora has read: a
    /// subscribe request here, anything else through the proxy (which
    /// refuses a bad target as the HTTP/1 path does).
    async fn serve_h2(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let req = session.req_header();
        let target = std::str::from_utf8(req.raw_path())
            .ok()
            .and_then(|raw| Target::parse(raw).ok());
        let method = req.method.as_str();
        match target.and_then(|t| Some((self.held_route(method, &t)?, t))) {
            Some(((route, params), target)) => self.hold(session, target, route, params).await,
            None => self.proxy.process_new_http(session, shutdown).await,
        }
    }

    /// Serves one long-poll or watch request on `session` (whose head is
    /// buffered).
    async fn hold(
        &self,
        mut session: ServerSession,
        target: Target,
        route: Holds<'_>,
        params: Params,
    ) -> Option<ReusedHttpStream> {
        let _in_flight = self.life.enter();
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let draining = self.life.is_draining();
        session.set_keepalive((!draining).then_some(self.keepalive_secs));
        let served = match route {
            Holds::Subscribe(route) => {
                self.poller
                    .serve(&mut session, &target, route, &params)
                    .await
            }
            Holds::Watch(route) => {
                let request = (&target, route, &params);
                let watching = self.watcher.serve(&self.poller, &mut session, request);
                Box::pin(watching).await
            }
        };
        if served.is_err() {
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        // Boxed: finishing is a large future and would enlarge every held poll.
        match Box::pin(session.finish()).await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, persistent)),
            _ => None,
        }
    }
}

impl Front {
    /// Serves one HTTP/1 connection, request after request: the first must
    /// start within the header timeout, later ones within the keep-alive;
    /// at most `request_limit` requests when it is not 0. Long-polls are
    /// served on the lean path ([`h1`]); other requests get a Pingora
    /// session (the proxy, or a poll that authorizes, streams or has a body).
    pub async fn serve_h1(
        self: Arc<Self>,
        mut stream: Stream,
        request_limit: u32,
        shutdown: ShutdownWatch,
    ) {
        let limits = self.limits;
        let mut buf = BytesMut::with_capacity(1024);
        // The keep-alive the previous answer set (None before the first).
        let mut keepalive: Option<u64> = None;
        let mut served: u32 = 0;
        loop {
            let idle = keepalive.map_or(limits.header_timeout, Duration::from_secs);
            let between = keepalive.is_some();
            // A new connection counts as in flight until its first request
            // is answered, so that a drain waits for the request it is
            // about to send (see `read_head`) instead of exiting under it.
            let _first = (!between).then(|| self.life.enter());
            let head_len =
                match read_head(&mut stream, &mut buf, idle, limits, &self.life, between).await {
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
            let head = match parse_head(&buf[..head_len]) {
                Ok(head) => head,
                Err((status, error, detail)) => {
                    Refusal::BadTarget.count();
                    refuse(&mut stream, status, error, &detail, limits).await;
                    return;
                }
            };
            let route = self.held_route(head.method, &head.target);
            if let Some((Holds::Subscribe(route), params)) = &route {
                if head.bare && route.authorize.is_none() && !head.subscribe().wants_sse() {
                    let _in_flight = self.life.enter();
                    let req = head.subscribe().parse(route, params);
                    let manner = h1::Manner {
                        keepalive: head.keepalive && !last && !self.life.is_draining(),
                        cors: cors_headers(&self.poller.cors, head.origin),
                    };
                    let mut client = h1::Exchange::new(&mut stream, &mut buf, limits.max_head);
                    if !h1::serve(&self.poller, &mut client, req, route, manner).await {
                        return;
                    }
                    bytes::Buf::advance(&mut buf, head_len);
                    keepalive = Some(self.keepalive_secs);
                    continue;
                }
            }
            let target = head.target;
            let mut session = ServerSession::new_http1(stream);
            session.set_keepalive(keepalive);
            if request_limit > 0 {
                session.set_keepalive_reuses_remaining(Some(request_limit - served));
            }
            session.set_pipelined_prefix(buf.split());
            let reused = match route {
                // Boxed: an idle connection then carries only the head reader.
                Some((route, params)) => Box::pin(self.hold(session, target, route, params)).await,
                None => self.proxy.process_new_http(session, &shutdown).await,
            };
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
            stream = h1.into_inner();
        }
    }
}

#[async_trait]
impl HttpServerApp for Front {
    /// Serves one HTTP/2 stream (HTTP/1 connections are served by
    /// [`Front::serve_h1`]).
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session {
            ServerSession::H1(h1) => {
                Box::pin(self.clone().serve_h1(h1.into_inner(), 0, shutdown.clone())).await;
                None
            }
            // Boxed: an HTTP/1 connection's task must not carry its state.
            session => Box::pin(self.serve_h2(session, shutdown)).await,
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    fn h2_options(&self) -> Option<H2Options> {
        let mut options = pingora::protocols::http::v2::server::default_h2_options();
        options.max_concurrent_streams(self.h2_max_streams);
        Some(options)
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
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
        let head =
            parse_head(b"GET http://h/sub/a?cursor=1-0 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!((head.method, head.target.path()), ("GET", "/sub/a"));
        assert!(head.keepalive && head.bare);
        let other_host = b"GET http://h/sub/a HTTP/1.1\r\nHost: elsewhere\r\n\r\n";
        assert_eq!(parse_head(other_host).unwrap_err().0, 400);
        assert_eq!(
            parse_head(b"GET /a/../b HTTP/1.1\r\n\r\n").unwrap_err().0,
            400
        );
        assert_eq!(parse_head(b"garbage\r\n\r\n").unwrap_err().0, 400);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(300));
        assert_eq!(parse_head(many.as_bytes()).unwrap_err().0, 431);
    }

    #[test]
    fn reads_what_a_long_poll_needs_from_the_head() {
        let head = parse_head(
            b"GET /sub/a HTTP/1.1\r\nLast-Event-ID: 3-0\r\nlast-event-id: 4-0\r\n\
              Origin: https://x\r\nAccept: text/event-stream\r\nConnection: Close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.last_event_id, Some("3-0"), "the first of two");
        assert_eq!(head.origin, Some("https://x"));
        assert!(head.subscribe().wants_sse());
        assert!(!head.keepalive);
        let old = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive, x\r\n\r\n").unwrap();
        assert!(old.keepalive);
        assert!(!parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().keepalive);
        // Anything that makes more than a head is left to Pingora's session.
        for extra in [
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "Host: a\r\nHost: b",
        ] {
            let text = format!("GET / HTTP/1.1\r\n{extra}\r\n\r\n");
            assert!(!parse_head(text.as_bytes()).unwrap().bare, "{extra}");
        }
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .bare
        );
        // Not visible ASCII: as if absent.
        let odd = parse_head(b"GET / HTTP/1.1\r\nIf-None-Match: \xff\r\n\r\n").unwrap();
        assert_eq!(odd.if_none_match, None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Any bytes: no panic, and the incremental search agrees with a
        /// whole scan however the bytes were split into reads.
        #[test]
        fn head_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..300) {
            let _ = parse_head(&bytes);
            let split = split.min(bytes.len());
            let whole = head_end(&bytes, 0);
            let incremental = head_end(&bytes[..split], 0).or_else(|| head_end(&bytes, split));
            prop_assert_eq!(whole, incremental);
        }
    }
}
