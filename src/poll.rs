//! Subscribe requests over HTTP (SPEC 3): parse the request, ask the hub,
//! hold, and write the answer as a JSON envelope, a raw message or an SSE
//! stream.
//!
//! A held poll waits for the first of: its wake-up from the hub, its timeout
//! (on Pingora's shared coarse timer), the client going away (detected by
//! reading the idle connection), or draining.

use crate::answer::{Answer, Format};
use crate::authorize::{Authorizer, Decision};
use crate::config::Cors;
use crate::cursor::Cursor;
use crate::hub::{Held, Hub, Poll, Wake};
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Outcome};
use crate::respond;
use crate::routes::{Params, SubscribeRoute};
use bytes::Bytes;
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Interval of SSE keep-alive comments.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// Retry-After (seconds) of 503 answers.
const RETRY_AFTER: &str = "1";

/// Serves subscribe routes.
pub struct Poller {
    pub hub: Arc<Hub>,
    pub life: Arc<Lifecycle>,
    pub max_held: usize,
    pub cors: Cors,
    pub authorizer: Authorizer,
}

/// What ended a hold.
enum Ending {
    Woken(Arc<Answer>),
    /// The hub asks for the poll to be redone (its channel was resynced).
    Repoll,
    Timeout,
    Drain,
    Gone,
}

/// A bad request: its 400 detail.
struct BadRequest(String);

/// The parsed parts of a subscribe request.
struct Request {
    channels: Vec<String>,
    cursor: Option<Cursor>,
    timeout: Duration,
    format: Format,
}

impl Poller {
    /// Answers one subscribe request on `route` with the path `params`.
    pub async fn serve(
        &self,
        session: &mut Session,
        route: &SubscribeRoute,
        params: &Params,
    ) -> Result<()> {
        let req = match parse(session, route, params) {
            Ok(r) => r,
            Err(BadRequest(detail)) => {
                Outcome::Error.count();
                return respond::error(
                    session,
                    400,
                    "bad_request",
                    &detail,
                    &self.cors_headers(session),
                )
                .await;
            }
        };
        if let Some(why) = self.refusal() {
            Outcome::Rejected.count();
            let mut extra = self.cors_headers(session);
            extra.push(("Retry-After", RETRY_AFTER.into()));
            return respond::error(session, 503, "unavailable", why, &extra).await;
        }
        if let Some(upstream) = &route.authorize {
            if !Box::pin(self.authorized(session, upstream, route.authorize_cache)).await? {
                return Ok(());
            }
        }
        if req.format == Format::Sse {
            // Boxed: SSE is rare, and its state would enlarge every poll.
            return Box::pin(self.stream(session, route, req)).await;
        }
        let deadline = Instant::now() + jitter(req.timeout);
        let mut cursor = req.cursor;
        loop {
            // Boxed so that its state is not carried while the poll is held.
            let poll = Box::pin(
                self.hub
                    .poll(&req.channels, cursor, route.first, req.format),
            );
            let held = match poll.await {
                Ok(Poll::Ready(answer)) => {
                    let outcome = if answer.gap {
                        Outcome::Gap
                    } else {
                        Outcome::Message
                    };
                    return self.answer(session, &answer, outcome, false).await;
                }
                Ok(Poll::Held(held)) => held,
                Err(e) => {
                    Outcome::Error.count();
                    let mut extra = self.cors_headers(session);
                    extra.push(("Retry-After", RETRY_AFTER.into()));
                    let detail = e.to_string();
                    return respond::error(session, 503, "broker_unavailable", &detail, &extra)
                        .await;
                }
            };
            let current = held.cursor.clone();
            let left = deadline.saturating_duration_since(Instant::now());
            let ending = self.hold(session, held, left).await;
            let empty = || Answer::build(req.format, &current, false, &[]);
            return match ending {
                Ending::Woken(answer) => {
                    self.answer(session, &answer, Outcome::Message, true).await
                }
                Ending::Repoll => {
                    cursor = Some(current);
                    continue;
                }
                Ending::Timeout => {
                    self.answer(session, &empty(), Outcome::Timeout, false)
                        .await
                }
                Ending::Drain => {
                    session.set_keepalive(None);
                    self.answer(session, &empty(), Outcome::Timeout, false)
                        .await
                }
                Ending::Gone => {
                    Outcome::Disconnected.count();
                    Error::e_explain(ErrorType::ConnectionClosed, "client left a held poll")
                        .map_err(|e| e.into_down())
                }
            };
        }
    }

    /// Asks the route's authorize upstream. Returns false when the client
    /// was answered (denied, or the upstream failed).
    async fn authorized(
        &self,
        session: &mut Session,
        upstream: &str,
        cache: Duration,
    ) -> Result<bool> {
        let ip = crate::upstream::client_ip(session.client_addr());
        match self
            .authorizer
            .check(session.req_header(), ip, upstream, cache)
            .await
        {
            Ok(Decision::Allow) => Ok(true),
            Ok(Decision::Deny(denial)) => {
                Outcome::Rejected.count();
                let mut h = pingora::http::ResponseHeader::build(
                    denial.status,
                    Some(denial.headers.len() + 4),
                )?;
                for (k, v) in &denial.headers {
                    h.append_header(k.clone(), v.as_str())?;
                }
                h.insert_header("Content-Length", denial.body.len().to_string())?;
                h.insert_header("Cache-Control", "no-store")?;
                for (k, v) in self.cors_headers(session) {
                    h.insert_header(k, v)?;
                }
                respond::send(session, h, denial.body.clone()).await?;
                Ok(false)
            }
            Err(e) => {
                Outcome::Error.count();
                let status = crate::upstream::error_status(&e);
                let kind = if status == 504 {
                    "gateway_timeout"
                } else {
                    "bad_gateway"
                };
                let detail = format!("authorization upstream {upstream}: {e}");
                respond::error(session, status, kind, &detail, &self.cors_headers(session)).await?;
                Ok(false)
            }
        }
    }

    /// Why a new poll is refused now (draining, broker down, max_held).
    fn refusal(&self) -> Option<&'static str> {
        if self.life.is_draining() {
            Some("this instance is shutting down; reconnect")
        } else if !self.hub.broker().is_up() {
            Some("the broker is unreachable")
        } else if metrics::HELD.get() >= self.max_held as i64 {
            Some("too many held polls on this instance (limits.max_held)")
        } else {
            None
        }
    }

    /// Waits for the first event that ends a held poll.
    async fn hold(&self, session: &mut Session, mut held: Held, timeout: Duration) -> Ending {
        metrics::HELD.inc();
        let ending = tokio::select! {
            woken = &mut held.wake => woken_by(woken),
            _ = sleep(timeout) => Ending::Timeout,
            _ = self.life.drained() => Ending::Drain,
            _ = session.read_body_or_idle(true) => Ending::Gone,
        };
        metrics::HELD.dec();
        ending
    }

    /// Writes an answer in its format and counts it.
    async fn answer(
        &self,
        session: &mut Session,
        answer: &Answer,
        outcome: Outcome,
        live: bool,
    ) -> Result<()> {
        let raw = answer.format == Format::Raw;
        let (status, content_type) = match (raw, answer.messages.first()) {
            (true, Some(m)) => (200, m.content_type.as_str()),
            (true, None) => (204, ""),
            (false, _) => (200, "application/json"),
        };
        let mut h = respond::header(status, content_type, answer.body.len())?;
        h.insert_header("Cache-Control", "no-store")?;
        h.insert_header("Pollgate-Cursor", answer.cursor_text.as_str())?;
        if raw {
            h.insert_header("ETag", format!("\"{}\"", answer.cursor_text))?;
        }
        if answer.gap {
            h.insert_header("Pollgate-Gap", "1")?;
        }
        if session.get_keepalive().is_none() {
            h.insert_header("Connection", "close")?;
        }
        for (k, v) in self.cors_headers(session) {
            h.insert_header(k, v)?;
        }
        respond::send(session, h, answer.body.clone()).await?;
        outcome.count();
        count_delivered(answer, live);
        Ok(())
    }

    /// Streams Server-Sent Events until the client leaves or draining.
    async fn stream(
        &self,
        session: &mut Session,
        route: &SubscribeRoute,
        req: Request,
    ) -> Result<()> {
        let mut h = pingora::http::ResponseHeader::build_no_case(200, Some(6))?;
        h.insert_header("Content-Type", "text/event-stream")?;
        h.insert_header("Cache-Control", "no-store")?;
        h.insert_header("Transfer-Encoding", "chunked")?;
        for (k, v) in self.cors_headers(session) {
            h.insert_header(k, v)?;
        }
        session.set_keepalive(None);
        session.write_response_header(Box::new(h)).await?;
        session
            .write_response_body(Bytes::from_static(b": pollgate\n\n"), false)
            .await?;
        let mut cursor = req.cursor;
        loop {
            let poll = self
                .hub
                .poll(&req.channels, cursor.clone(), route.first, Format::Sse)
                .await;
            let mut held = match poll {
                Ok(Poll::Ready(answer)) => {
                    session
                        .write_response_body(answer.body.clone(), false)
                        .await?;
                    count_delivered(&answer, false);
                    cursor = Some(answer.cursor.clone());
                    continue;
                }
                Ok(Poll::Held(held)) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "SSE stream ends: broker unavailable");
                    break;
                }
            };
            metrics::HELD.inc();
            let ending = loop {
                let ending = tokio::select! {
                    woken = &mut held.wake => woken_by(woken),
                    _ = sleep(SSE_KEEPALIVE) => Ending::Timeout,
                    _ = self.life.drained() => Ending::Drain,
                    _ = session.read_body_or_idle(true) => Ending::Gone,
                };
                if !matches!(ending, Ending::Timeout) {
                    break ending;
                }
                let ping = Bytes::from_static(b": keep-alive\n\n");
                if session.write_response_body(ping, false).await.is_err() {
                    break Ending::Gone;
                }
            };
            metrics::HELD.dec();
            match ending {
                Ending::Woken(answer) => {
                    session
                        .write_response_body(answer.body.clone(), false)
                        .await?;
                    count_delivered(&answer, true);
                    cursor = Some(answer.cursor.clone());
                }
                Ending::Repoll => {}
                Ending::Gone => {
                    Outcome::Disconnected.count();
                    return Error::e_explain(ErrorType::ConnectionClosed, "SSE client left")
                        .map_err(|e| e.into_down());
                }
                Ending::Drain | Ending::Timeout => break,
            }
        }
        Outcome::Timeout.count();
        session.finish_body().await
    }

    /// CORS headers for the request's Origin, per `cors.allow_origins`.
    fn cors_headers(&self, session: &Session) -> Vec<(&'static str, String)> {
        cors_headers(&self.cors, session.req_header())
    }
}

/// CORS headers for an allowed Origin (none when CORS is off or the origin
/// is not listed).
pub fn cors_headers(
    cors: &Cors,
    request: &pingora::http::RequestHeader,
) -> Vec<(&'static str, String)> {
    let Some(origin) = request.headers.get("Origin").and_then(|o| o.to_str().ok()) else {
        return Vec::new();
    };
    let any = cors.allow_origins.iter().any(|o| o == "*");
    if !any && !cors.allow_origins.iter().any(|o| o == origin) {
        return Vec::new();
    }
    vec![
        (
            "Access-Control-Allow-Origin",
            if any { "*".into() } else { origin.to_string() },
        ),
        (
            "Access-Control-Expose-Headers",
            "Pollgate-Cursor, Pollgate-Gap, ETag".into(),
        ),
        ("Vary", "Origin".into()),
    ]
}

fn woken_by(wake: Result<Wake, tokio::sync::oneshot::error::RecvError>) -> Ending {
    match wake {
        Ok(Wake::Answer(answer)) => Ending::Woken(answer),
        // A waiter is only dropped unfired when its channel is reset.
        Ok(Wake::Repoll) | Err(_) => Ending::Repoll,
    }
}

fn count_delivered(answer: &Answer, live: bool) {
    metrics::DELIVERED.inc_by(answer.messages.len() as u64);
    if live {
        let now = Instant::now();
        for m in &answer.messages {
            metrics::DELIVERY_LATENCY.observe(now.duration_since(m.received_at).as_secs_f64());
        }
    }
}

/// Sleeps on Pingora's shared coarse timer (cheap at tens of thousands of
/// held polls). Under 1 ms returns at once: `fast_sleep(0)` overflows.
async fn sleep(d: Duration) {
    if d >= Duration::from_millis(1) {
        pingora_timeout::fast_timeout::fast_sleep(d).await;
    }
}

/// Up to 10% shorter, so that reconnects spread.
fn jitter(timeout: Duration) -> Duration {
    timeout.mul_f64(1.0 - fastrand::f64() * 0.1)
}

fn parse(
    session: &Session,
    route: &SubscribeRoute,
    params: &Params,
) -> Result<Request, BadRequest> {
    let req = session.req_header();
    let query = req.uri.query().unwrap_or("");
    let mut channels = Vec::with_capacity(route.channels.len());
    for t in &route.channels {
        let name = t.render(params).map_err(BadRequest)?;
        if !channels.contains(&name) {
            channels.push(name);
        }
    }
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let cursor_text = query_param(query, "cursor")
        .or_else(|| header("Last-Event-ID"))
        .or_else(|| header("If-None-Match"));
    let cursor = match cursor_text {
        Some(t) if !t.is_empty() => {
            Some(Cursor::parse(&t, channels.len()).map_err(|e| BadRequest(e.0))?)
        }
        _ => None,
    };
    let timeout = match query_param(query, "timeout") {
        None => route.timeout,
        Some(t) => {
            let secs: f64 = t
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| BadRequest(format!("timeout '{t}' is not a number of seconds")))?;
            Duration::from_secs_f64(secs.min(route.timeout.as_secs_f64()))
        }
    };
    let sse = header("Accept").is_some_and(|a| a.contains("text/event-stream"));
    let format = match query_param(query, "format").as_deref() {
        _ if sse => Format::Sse,
        None => {
            if route.raw {
                Format::Raw
            } else {
                Format::Envelope
            }
        }
        Some("raw") => Format::Raw,
        Some("json") => Format::Envelope,
        Some(other) => return Err(BadRequest(format!("format '{other}' is not json or raw"))),
    };
    Ok(Request {
        channels,
        cursor,
        timeout,
        format,
    })
}

/// The first value of `name` in a query string, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
