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
use crate::lifecycle::Lifecycle;
use crate::metrics::Refusal;
use crate::poll::Poller;
use crate::respond;
use crate::routes::{Action, Match, Params, RouteTable, SubscribeRoute};
use crate::target::Target;
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
    pub life: Arc<Lifecycle>,
    pub limits: HeadLimits,
    /// Seconds an idle connection is kept between requests.
    pub keepalive_secs: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// HTTP/2 with prior knowledge is served on plaintext connections.
    pub options: HttpServerOptions,
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
    let start = from.saturating_sub(3);
    let tail = &buf[start..];
    let crlf = tail
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = tail.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(start + a.min(b)),
        (a, b) => a.or(b).map(|i| start + i),
    }
}

/// Reads until a whole request head is buffered (the buffer may hold more:
/// a pipelined body). Waits up to `idle` for the first byte, then
/// `limits.header_timeout` for the rest.
async fn read_head(
    stream: &mut Stream,
    idle: Duration,
    limits: HeadLimits,
    life: &Lifecycle,
) -> Result<BytesMut, NoHead> {
    let mut buf = BytesMut::with_capacity(512);
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut scanned = 0;
    loop {
        if let Some(end) = head_end(&buf, scanned) {
            return if end > limits.max_head {
                Err(NoHead::TooLarge)
            } else {
                Ok(buf)
            };
        }
        if buf.len() > limits.max_head {
            return Err(NoHead::TooLarge);
        }
        scanned = buf.len();
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        let read = tokio::select! {
            r = stream.read_buf(&mut buf) => r.map_err(|_| NoHead::Closed)?,
            _ = life.drained(), if buf.is_empty() => return Err(NoHead::Closed),
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

/// The method and [`Target`] of a whole request head, by the same parser
/// (httparse) Pingora uses. The error is the refusal to answer with.
fn parse_head(head: &[u8]) -> Result<(String, Target), (u16, &'static str, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
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
    let method = req.method.unwrap_or_default().to_string();
    let target = Target::parse(req.path.unwrap_or_default())
        .map_err(|e| (400, "bad_request", e.to_string()))?;
    if let Some(authority) = target.authority() {
        // An absolute-form target names the host itself: it must agree
        // with the Host header (as Pingora requires too).
        let mut hosts = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"));
        if hosts.any(|h| !h.value.eq_ignore_ascii_case(authority.as_bytes())) {
            let detail = "the Host header differs from the request target's authority";
            return Err((400, "bad_request", detail.into()));
        }
    }
    Ok((method, target))
}

/// Writes a JSON error answer straight to the connection and closes it.
async fn refuse(stream: &mut Stream, status: u16, error: &str, detail: &str, limits: HeadLimits) {
    let body = respond::error_json(error, detail);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let write = async {
        stream.write_all(&answer).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(limits.write_timeout, write).await;
}

impl Front {
    /// The subscribe route for this request, if it is one.
    fn subscribe_route(&self, method: &str, target: &Target) -> Option<(&SubscribeRoute, Params)> {
        if method == "OPTIONS" {
            return None; // CORS preflight: the gateway answers it
        }
        match self.routes.find(method, target) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(sub) => Some((sub, params)),
                Action::Proxy(_) => None,
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
        match target.and_then(|t| Some((self.subscribe_route(method, &t)?, t))) {
            Some(((route, params), target)) => self.poll(session, target, route, params).await,
            None => self.proxy.process_new_http(session, shutdown).await,
        }
    }

    /// Serves one long-poll on `session` (whose head is buffered).
    async fn poll(
        &self,
        mut session: ServerSession,
        target: Target,
        route: &SubscribeRoute,
        params: Params,
    ) -> Option<ReusedHttpStream> {
        let _in_flight = self.life.enter();
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let draining = self.life.is_draining();
        session.set_keepalive((!draining).then_some(self.keepalive_secs));
        if self
            .poller
            .serve(&mut session, &target, route, &params)
            .await
            .is_err()
        {
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

#[async_trait]
impl HttpServerApp for Front {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let keepalive = session.get_keepalive();
        let reuses = session.get_keepalive_reuses_remaining();
        let ServerSession::H1(h1) = session else {
            // Boxed: an HTTP/1 connection's task must not carry its state.
            return Box::pin(self.serve_h2(session, shutdown)).await;
        };
        // A connection's first request (no keep-alive set yet) must start
        // within the header timeout; later ones within the keep-alive of
        // the previous answer.
        let limits = self.limits;
        let idle = keepalive.map_or(limits.header_timeout, Duration::from_secs);
        let mut stream = h1.into_inner();
        let head = match read_head(&mut stream, idle, limits, &self.life).await {
            Ok(head) => head,
            Err(NoHead::Closed) => return None,
            Err(NoHead::TooLarge) => {
                Refusal::HeaderTooLarge.count();
                let detail = format!(
                    "the request head is larger than limits.max_head ({} bytes)",
                    limits.max_head
                );
                refuse(&mut stream, 431, "header_too_large", &detail, limits).await;
                return None;
            }
            Err(NoHead::TooSlow) => {
                Refusal::HeaderTimeout.count();
                let detail = "the request head did not arrive within limits.header_timeout";
                refuse(&mut stream, 408, "header_timeout", detail, limits).await;
                return None;
            }
        };
        let (method, target) = match parse_head(&head) {
            Ok(parsed) => parsed,
            Err((status, error, detail)) => {
                Refusal::BadTarget.count();
                refuse(&mut stream, status, error, &detail, limits).await;
                return None;
            }
        };
        let route = self.subscribe_route(&method, &target);
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(keepalive);
        session.set_keepalive_reuses_remaining(reuses);
        session.set_pipelined_prefix(head);
        match route {
            // Boxed: an idle connection then carries only the head reader.
            Some((route, params)) => Box::pin(self.poll(session, target, route, params)).await,
            None => self.proxy.process_new_http(session, shutdown).await,
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
        let (m, t) =
            parse_head(b"GET http://h/sub/a?cursor=1-0 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!((m.as_str(), t.path()), ("GET", "/sub/a"));
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
