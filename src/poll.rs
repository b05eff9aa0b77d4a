//! Subscribe requests over HTTP (docs/api.md, "Subscribing"): admit a
//! parsed request ([`crate::subscription`]; admission and refusals in
//! [`crate::admission`]), ask the hub, hold, and write the answer as a JSON
//! envelope or a raw message (an SSE stream: [`crate::sse`]).
//!
//! A held poll waits for the first of: its wake-up from the hub, its timeout
//! (a tokio timer), the client going away (detected by
//! reading the idle connection), or draining.

use crate::admission::Admission;
use crate::answer::{Answer, Format};
use crate::authorize::{Authorize, Authorizer, Decision};
use crate::config::Cors;
use crate::error::RequestError;
use crate::hub::{Held, Hub, HubError, Polled};
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Outcome, Refusal};
use crate::respond;
use crate::routes::SubscribeRoute;
use crate::subscription::{header_str, Request, SubscribeHead};
use crate::target::RequestTarget;
use crate::template::Params;
use crate::waiter::{Answerer, Wake};
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves subscribe routes.
pub struct Poller {
    pub hub: Arc<Hub>,
    pub life: Arc<Lifecycle>,
    /// Whether a new held request may start.
    pub admission: Admission,
    pub cors: Cors,
    pub authorizer: Authorizer,
    /// Longest a client may accept no bytes of an answer.
    pub write_timeout: Duration,
}

/// What ended a hold.
pub enum Ending {
    Woken(Arc<Answer>),
    /// The hub asks for the poll to be redone (its channel was resynced).
    Repoll,
    Timeout,
    Drain,
    Gone,
}

/// The connection a poll is held on.
pub trait Client {
    /// Resolves when the client has left (closed its connection).
    fn gone(&mut self) -> impl Future<Output = ()> + Send;

    /// What may write the poll's answer straight from the delivering task
    /// (None: the poll's task writes it).
    fn answerer(&self) -> Option<Arc<dyn Answerer>> {
        None
    }
}

impl Client for Session {
    async fn gone(&mut self) {
        let _ = self.read_body_or_idle(true).await;
    }
}

/// How a poll ended.
pub enum Waited {
    /// Write this answer.
    Reply(Reply),
    /// The hub could not serve the poll: answer 503.
    Failed(HubError),
    /// The client left (counted): nothing to write.
    Gone,
}

/// An answer to write, and how to count it.
pub struct Reply {
    pub answer: Arc<Answer>,
    pub outcome: Outcome,
    /// Answered by a message that arrived while the poll was held (its
    /// delivery latency is measured).
    pub live: bool,
    /// The connection closes after it (draining).
    pub close: bool,
}

impl Reply {
    fn new(answer: Arc<Answer>, outcome: Outcome, live: bool) -> Reply {
        Reply {
            answer,
            outcome,
            live,
            close: false,
        }
    }
}

/// The error that ends a request whose client left.
pub fn gone() -> Result<()> {
    Error::e_explain(ErrorType::ConnectionClosed, "client left a held poll")
        .map_err(|e| e.into_down())
}

impl Poller {
    /// Answers one subscribe request for `target` on `route`, whose path
    /// captured `params`, on a Pingora session (HTTP/2, and HTTP/1 requests
    /// that authorize, stream SSE or carry a body; the others are served by
    /// [`crate::h1`]).
    pub async fn serve(
        &self,
        session: &mut Session,
        target: &RequestTarget,
        route: &SubscribeRoute,
        params: &Params<'_>,
    ) -> Result<()> {
        let req = match SubscribeHead::of(session.req_header(), target).parse(route, params) {
            Ok(r) => r,
            Err(e) => return self.refuse(session, e).await,
        };
        let _admitted = match self
            .admission
            .admit(|| self.admission.clients.of_session(session))
        {
            Ok(admitted) => admitted,
            Err(refused) => return self.refuse(session, RequestError::Admission(refused)).await,
        };
        if let Some(authorize) = &route.authorize {
            if !Box::pin(self.authorized(session, target, authorize)).await? {
                return Ok(());
            }
        }
        if req.format == Format::Sse {
            // Boxed: SSE is rare, and its state would enlarge every poll.
            return Box::pin(crate::sse::stream(self, session, route, req)).await;
        }
        match self.wait(session, &req, route).await {
            Waited::Reply(reply) => {
                if reply.close {
                    session.set_keepalive(None);
                }
                self.answer(session, &reply.answer, reply.outcome, reply.live)
                    .await
            }
            Waited::Failed(e) => self.refuse(session, RequestError::Hub(e)).await,
            Waited::Gone => gone(),
        }
    }

    /// Runs a parsed, admitted poll to its end: an answer at once, or a hold
    /// until a message, the timeout, draining or the client leaving.
    pub async fn wait(
        &self,
        client: &mut impl Client,
        req: &Request,
        route: &SubscribeRoute,
    ) -> Waited {
        let deadline = tokio::time::Instant::now() + jitter(req.timeout);
        let mut cursor = req.cursor.clone();
        let answerer = client.answerer();
        loop {
            // Held at once as a rule; the whole poll (boxed, so that its
            // state is not carried while the poll is held) otherwise.
            let now = cursor.as_ref().and_then(|c| {
                self.hub
                    .hold_now(&req.channels, c, req.format, answerer.as_ref())
            });
            let polled = match now {
                Some(held) => Ok(Polled::Held(held)),
                None => {
                    let hub = &self.hub;
                    let (first, format, answerer) = (route.first, req.format, answerer.clone());
                    let poll = hub.poll_answered_by(&req.channels, cursor, first, format, answerer);
                    Box::pin(poll).await
                }
            };
            let held = match polled {
                Ok(Polled::Ready(answer)) => {
                    let outcome = if answer.gap {
                        Outcome::Gap
                    } else {
                        Outcome::Message
                    };
                    return Waited::Reply(Reply::new(answer, outcome, false));
                }
                Ok(Polled::Held(held)) => held,
                Err(e) => return Waited::Failed(e),
            };
            let current = held.cursor.clone();
            let empty = || Arc::new(Answer::build(req.format, &current, false, &[]));
            return match self.hold(client, held, deadline).await {
                Ending::Woken(answer) => Waited::Reply(Reply::new(answer, Outcome::Message, true)),
                Ending::Repoll => {
                    cursor = Some(current);
                    continue;
                }
                Ending::Timeout => Waited::Reply(Reply::new(empty(), Outcome::Timeout, false)),
                Ending::Drain => {
                    let mut reply = Reply::new(empty(), Outcome::Timeout, false);
                    reply.close = true;
                    Waited::Reply(reply)
                }
                Ending::Gone => {
                    Outcome::Disconnected.count();
                    Waited::Gone
                }
            };
        }
    }

    /// Answers `e` (with the CORS headers), counting it ([`count_refused`]).
    pub async fn refuse(&self, session: &mut Session, e: RequestError) -> Result<()> {
        count_refused(&e);
        let extra = self.cors_headers(session);
        self.write(respond::refusal(session, &e, &extra)).await
    }

    /// Asks the route's authorize upstream. Returns false when the client
    /// was answered (denied, or the upstream failed).
    pub async fn authorized(
        &self,
        session: &mut Session,
        target: &RequestTarget,
        authorize: &Authorize,
    ) -> Result<bool> {
        let peer = crate::upstream::Peer::of(session);
        match self
            .authorizer
            .check(session.req_header(), target, &peer, authorize)
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
                let detail = format!("authorization upstream {}: {e}", authorize.upstream);
                self.refuse(session, RequestError::upstream(&e, detail))
                    .await?;
                Ok(false)
            }
        }
    }

    /// Runs a write to the client, giving up (and counting it) when the
    /// client accepts no bytes for `write_timeout`.
    pub async fn write<T>(&self, write: impl Future<Output = Result<T>>) -> Result<T> {
        match pingora_timeout::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => {
                Refusal::WriteTimeout.count();
                Error::e_explain(ErrorType::WriteTimedout, "the client stopped reading")
                    .map_err(|e| e.into_down())
            }
        }
    }

    /// Waits for the first event that ends a held poll (its timeout is
    /// `deadline`). A wake-up that came meanwhile wins over the timeout,
    /// draining and the client leaving (its answer may be with the client
    /// already, or in part).
    pub async fn hold(
        &self,
        client: &mut impl Client,
        mut held: Held,
        deadline: tokio::time::Instant,
    ) -> Ending {
        // Down again when this future ends, or is dropped while it waits.
        let _held = metrics::GaugeGuard::up(&metrics::HELD);
        // A drain wakes the held polls through the hub, but for one
        // registered after the hub released them (`Hub::release_all`).
        let mut ending = if self.life.is_draining() {
            Ending::Drain
        } else {
            tokio::select! {
                biased;
                woken = held.woken() => woken_by(woken),
                _ = tokio::time::sleep_until(deadline) => Ending::Timeout,
                _ = client.gone() => Ending::Gone,
            }
        };
        // A wake-up that came meanwhile wins: its answer may be on the
        // wire already (written by the delivering task), and a client that
        // read it and closed at once was answered, not gone.
        if !matches!(ending, Ending::Woken(_) | Ending::Repoll) {
            if let Some(wake) = held.stop() {
                ending = woken_by(wake);
            }
        }
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
        let mut h = respond::header(answer.status(), answer.content_type(), answer.body.len())?;
        for (name, value) in answer.fields() {
            h.insert_header(name, value)?;
        }
        if session.get_keepalive().is_none() {
            h.insert_header("Connection", "close")?;
        }
        for (k, v) in self.cors_headers(session) {
            h.insert_header(k, v)?;
        }
        self.write(respond::send(session, h, answer.body.clone()))
            .await?;
        count_answered(answer, outcome, live);
        Ok(())
    }

    /// CORS headers for the request's Origin, per `cors.allow_origins`.
    pub(crate) fn cors_headers(&self, session: &Session) -> Vec<(&'static str, String)> {
        cors_headers(&self.cors, header_str(session.req_header(), "Origin"))
    }
}

/// CORS headers for an allowed Origin (none when CORS is off or the origin
/// is not listed).
pub fn cors_headers(cors: &Cors, origin: Option<&str>) -> Vec<(&'static str, String)> {
    let Some(origin) = origin else {
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

pub(crate) fn woken_by(wake: Wake) -> Ending {
    match wake {
        Wake::Answer(answer) => Ending::Woken(answer),
        Wake::Drain => Ending::Drain,
        Wake::Repoll => Ending::Repoll,
    }
}

/// Counts a poll answered with the error `e`: a refusal (429, 503) as
/// `rejected`, with its reason unless the layer that refused counted it;
/// any other error as `error`.
pub fn count_refused(e: &RequestError) {
    if !matches!(e.status(), 429 | 503) {
        return Outcome::Error.count();
    }
    if let Some(refusal) = e.counted_as() {
        refusal.count();
    }
    Outcome::Rejected.count();
}

/// Counts an answer written: its outcome and its messages (and, when
/// `live`, their delivery latency).
pub fn count_answered(answer: &Answer, outcome: Outcome, live: bool) {
    outcome.count();
    count_delivered(answer, live);
}

pub(crate) fn count_delivered(answer: &Answer, live: bool) {
    metrics::DELIVERED.inc_by(answer.messages.len() as u64);
    if live {
        let now = Instant::now();
        for m in &answer.messages {
            metrics::DELIVERY_LATENCY.observe(now.duration_since(m.received_at).as_secs_f64());
        }
    }
}

/// Up to 10% shorter, so that reconnects spread (drawn in whole
/// microseconds, without floats or 128-bit divisions: this runs once per
/// poll).
pub fn jitter(timeout: Duration) -> Duration {
    let tenth = u64::try_from((timeout / 10).as_micros()).unwrap_or(u64::MAX);
    timeout.saturating_sub(Duration::from_micros(fastrand::u64(..=tenth)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::First;
    use crate::upstream::Upstreams;

    /// A client that never leaves.
    struct Staying;

    impl Client for Staying {
        async fn gone(&mut self) {
            std::future::pending::<()>().await
        }
    }

    fn poller() -> Poller {
        let broker = Arc::new(MemoryBroker::new(100, Duration::from_secs(60), 1000));
        Poller {
            hub: Hub::new(
                broker.clone(),
                100,
                Duration::from_secs(30),
                1000,
                crate::hub::DELIVERY_QUEUE,
            ),
            life: Arc::new(Lifecycle::default()),
            admission: Admission {
                held: crate::admission::HeldSlots::new(10),
                clients: Arc::new(crate::fairness::Clients::unlimited()),
                broker,
            },
            cors: Cors::default(),
            authorizer: Authorizer::new(Arc::new(Upstreams::new(&Default::default()))),
            write_timeout: Duration::from_secs(5),
        }
    }

    /// A poll's task cancelled while it is held (its future dropped at the
    /// `.await` inside `Poller::hold`) takes itself off
    /// `pollgate_held_requests`. (The only test of this process that holds
    /// a poll, so the gauge moves for it alone.)
    #[tokio::test]
    async fn a_hold_dropped_while_waiting_is_no_longer_counted_as_held() {
        let poller = poller();
        let names = vec!["gauge".to_string()];
        let polled = poller
            .hub
            .poll(&names, None, First::Newest, Format::Envelope);
        let Ok(Polled::Held(held)) = polled.await else {
            panic!("an empty channel holds");
        };
        let before = metrics::HELD.get();
        let mut client = Staying;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut hold = Box::pin(poller.hold(&mut client, held, deadline));
        let waited = tokio::time::timeout(Duration::from_millis(20), hold.as_mut()).await;
        assert!(waited.is_err(), "still held");
        assert_eq!(metrics::HELD.get(), before + 1, "counted while held");
        drop(hold);
        assert_eq!(metrics::HELD.get(), before, "the dropped hold still counts");
    }

    #[test]
    fn jitter_is_at_most_a_tenth_shorter_and_spreads() {
        let t = Duration::from_secs(30);
        let drawn: Vec<Duration> = (0..1000).map(|_| jitter(t)).collect();
        assert!(drawn.iter().all(|d| *d <= t && *d >= t - t / 10));
        let (min, max) = (drawn.iter().min().unwrap(), drawn.iter().max().unwrap());
        assert!(*max - *min > t / 20, "spread {min:?}..{max:?}");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        let huge = Duration::MAX;
        assert!(jitter(huge) >= huge - huge / 10);
    }
}
