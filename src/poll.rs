//! Subscribe requests over HTTP (docs/api.md, "Subscribing"): parse the request, ask the hub,
//! hold, and write the answer as a JSON envelope, a raw message or an SSE
//! stream.
//!
//! A held poll waits for the first of: its wake-up from the hub, its timeout
//! (on Pingora's shared coarse timer), the client going away (detected by
//! reading the idle connection), or draining.

use crate::answer::{Answer, Format};
use crate::authorize::{Authorizer, Decision};
use crate::broker::BrokerError;
use crate::config::Cors;
use crate::cursor::Cursor;
use crate::hub::{Held, Hub, HubError, Poll, Wake};
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Outcome, Refusal};
use crate::respond;
use crate::routes::{Params, SubscribeRoute};
use crate::target::Target;
use bytes::Bytes;
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType, Result};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    pub held: HeldSlots,
    pub cors: Cors,
    pub authorizer: Authorizer,
    /// Longest a client may accept no bytes of an answer.
    pub write_timeout: Duration,
}

/// Subscribe requests in progress, counted against `limits.max_held`
/// atomically: a slot is taken before anything else is done for a poll,
/// and given back when its [`Slot`] drops. (`pollgate_held_requests`
/// counts the polls actually waiting for a message.)
pub struct HeldSlots {
    taken: AtomicUsize,
    max: usize,
}

/// One taken slot of [`HeldSlots`].
pub struct Slot<'a>(&'a HeldSlots);

impl HeldSlots {
    /// Room for `max` polls at once.
    pub fn new(max: usize) -> HeldSlots {
        HeldSlots {
            taken: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a slot; None when all `max` are taken.
    fn take(&self) -> Option<Slot<'_>> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
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
    /// Answers one subscribe request for `target` on `route`, whose path
    /// captured `params`.
    pub async fn serve(
        &self,
        session: &mut Session,
        target: &Target,
        route: &SubscribeRoute,
        params: &Params,
    ) -> Result<()> {
        let req = match parse(session, target, route, params) {
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
        let _slot = match self.admit() {
            Ok(slot) => slot,
            Err((refusal, why)) => {
                return self
                    .refuse(session, Some(refusal), "unavailable", why)
                    .await
            }
        };
        if let Some(upstream) = &route.authorize {
            let cache = route.authorize_cache.as_deref();
            if !Box::pin(self.authorized(session, target, upstream, cache)).await? {
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
                Err(e) => return self.hub_failed(session, e).await,
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

    /// Answers 503 + Retry-After for a refusal, counting it (unless the
    /// layer that refused has).
    async fn refuse(
        &self,
        session: &mut Session,
        refusal: Option<Refusal>,
        error: &str,
        detail: &str,
    ) -> Result<()> {
        if let Some(refusal) = refusal {
            refusal.count();
        }
        Outcome::Rejected.count();
        let mut extra = self.cors_headers(session);
        extra.push(("Retry-After", RETRY_AFTER.into()));
        self.write(respond::error(session, 503, error, detail, &extra))
            .await
    }

    /// Answers a poll the hub could not serve (503).
    async fn hub_failed(&self, session: &mut Session, e: HubError) -> Result<()> {
        let (refusal, error) = match &e {
            HubError::TooManyChannels(_) => (Some(Refusal::MaxActiveChannels), "unavailable"),
            // Counted by the broker, which refused it.
            HubError::Broker(BrokerError::Busy(_)) => (None, "broker_busy"),
            HubError::Broker(BrokerError::Unavailable(_)) => {
                (Some(Refusal::BrokerDown), "broker_unavailable")
            }
        };
        self.refuse(session, refusal, error, &e.to_string()).await
    }

    /// Asks the route's authorize upstream. Returns false when the client
    /// was answered (denied, or the upstream failed).
    async fn authorized(
        &self,
        session: &mut Session,
        target: &Target,
        upstream: &str,
        cache: Option<&crate::authorize::AuthCache>,
    ) -> Result<bool> {
        let peer = crate::upstream::Peer::of(session);
        match self
            .authorizer
            .check(session.req_header(), target, &peer, upstream, cache)
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
                self.write(respond::send(session, h, denial.body.clone()))
                    .await?;
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
                let cors = self.cors_headers(session);
                self.write(respond::error(session, status, kind, &detail, &cors))
                    .await?;
                Ok(false)
            }
        }
    }

    /// Takes a held-poll slot, or says why a new poll is refused now
    /// (draining, broker down, max_held).
    fn admit(&self) -> Result<Slot<'_>, (Refusal, &'static str)> {
        if self.life.is_draining() {
            return Err((
                Refusal::Draining,
                "this instance is shutting down; reconnect",
            ));
        }
        if !self.hub.broker().is_up() {
            return Err((Refusal::BrokerDown, "the broker is unreachable"));
        }
        self.held.take().ok_or((
            Refusal::MaxHeld,
            "too many held polls on this instance (limits.max_held)",
        ))
    }

    /// Runs a write to the client, giving up (and counting it) when the
    /// client accepts no bytes for `write_timeout`.
    async fn write<T>(&self, write: impl Future<Output = Result<T>>) -> Result<T> {
        match pingora_timeout::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => {
                Refusal::WriteTimeout.count();
                Error::e_explain(ErrorType::WriteTimedout, "the client stopped reading")
                    .map_err(|e| e.into_down())
            }
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
        self.write(respond::send(session, h, answer.body.clone()))
            .await?;
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
        self.write(session.write_response_header(Box::new(h)))
            .await?;
        let hello = Bytes::from_static(b": pollgate\n\n");
        self.write(session.write_response_body(hello, false))
            .await?;
        let mut cursor = req.cursor;
        loop {
            let poll = self
                .hub
                .poll(&req.channels, cursor.clone(), route.first, Format::Sse)
                .await;
            let mut held = match poll {
                Ok(Poll::Ready(answer)) => {
                    self.write(session.write_response_body(answer.body.clone(), false))
                        .await?;
                    count_delivered(&answer, false);
                    cursor = Some(answer.cursor.clone());
                    continue;
                }
                Ok(Poll::Held(held)) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "SSE stream ends");
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
                if self
                    .write(session.write_response_body(ping, false))
                    .await
                    .is_err()
                {
                    break Ending::Gone;
                }
            };
            metrics::HELD.dec();
            match ending {
                Ending::Woken(answer) => {
                    self.write(session.write_response_body(answer.body.clone(), false))
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
        self.write(session.finish_body()).await
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
    target: &Target,
    route: &SubscribeRoute,
    params: &Params,
) -> Result<Request, BadRequest> {
    let req = session.req_header();
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
    let cursor_text = target
        .query_param("cursor")
        .or_else(|| header("Last-Event-ID"))
        .or_else(|| header("If-None-Match"));
    let cursor = match cursor_text {
        Some(t) if !t.is_empty() => {
            Some(Cursor::parse(&t, channels.len()).map_err(|e| BadRequest(e.0))?)
        }
        _ => None,
    };
    let timeout = match target.query_param("timeout") {
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
    let format = match target.query_param("format").as_deref() {
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
