//! Holding a parsed, admitted poll until it has its answer ([`Holder`]):
//! at once from the hub's window, or when the first of a message, its
//! timeout, draining or the client leaving comes. Both HTTP paths (the lean
//! one, `h1.rs`, and a Pingora session, `poll.rs`), SSE streams and watch
//! requests hold through it; what the answer is written to is theirs.

use crate::answer::Answer;
use crate::cursor::Cursor;
use crate::hub::{Held, Hub, HubError, Polled};
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Outcome};
use crate::presence::{Presence, Seat};
use crate::routes::SubscribeRoute;
use crate::subscription::Request;
use crate::waiter::{Answerer, Wake};
use pingora::protocols::http::ServerSession as Session;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Holds polls against the hub, until the instance drains, and writes
/// their answers within the write timeout.
pub struct Holder {
    pub hub: Arc<Hub>,
    pub life: Arc<Lifecycle>,
    /// Longest a client may accept no bytes of an answer.
    pub write_timeout: Duration,
    /// Where polls count as present (when presence is tracked).
    pub presence: Option<Arc<Presence>>,
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
pub trait Client: Send {
    /// Resolves when the client has left (closed its connection).
    fn gone(&mut self) -> impl Future<Output = ()> + Send;

    /// `timeout` up to a tenth shorter ([`jitter`]). A connection that
    /// keeps one timer for its polls ([`Client::until`]) draws its share
    /// once, so that each poll's deadline comes after the one before.
    fn jittered(&mut self, timeout: Duration) -> Duration {
        jitter(timeout)
    }

    /// Resolves with [`Ending::Timeout`] at `deadline`, or with
    /// [`Ending::Gone`] when the client leaves first. This sets a timer for
    /// the one poll; a connection that serves poll after poll keeps one
    /// timer for them all (`h1.rs`).
    fn until(&mut self, deadline: tokio::time::Instant) -> impl Future<Output = Ending> + Send {
        async move {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => Ending::Timeout,
                _ = self.gone() => Ending::Gone,
            }
        }
    }

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

impl Holder {
    /// Runs a write to the client, giving up (and counting it) when the
    /// client accepts no bytes for `write_timeout` ([`crate::respond::within`]).
    pub async fn write<T>(
        &self,
        write: impl Future<Output = pingora::Result<T>>,
    ) -> pingora::Result<T> {
        crate::respond::within(self.write_timeout, write).await
    }

    /// Counts `req`'s client as present on its channels until the seat is
    /// dropped (None when presence is not tracked).
    pub fn seat(&self, req: &Request) -> Option<Seat> {
        let presence = self.presence.as_ref()?;
        Some(presence.enter(&req.channels, req.subscriber.clone()))
    }

    /// Runs a parsed, admitted poll to its end: an answer at once, or a hold
    /// until a message, the timeout, draining or the client leaving.
    pub async fn wait(
        &self,
        client: &mut impl Client,
        req: &Request,
        route: &SubscribeRoute,
    ) -> Waited {
        // Present on its channels until it ends, then for the linger.
        let _seat = self.seat(req);
        let deadline = tokio::time::Instant::now() + client.jittered(req.timeout);
        // The cursor to poll from again after a resync (the request's
        // before).
        let mut repoll: Option<Cursor> = None;
        let answerer = client.answerer();
        loop {
            let cursor = repoll.as_ref().or(req.cursor.as_ref());
            // Held at once as a rule; the whole poll (boxed, so that its
            // state is not carried while the poll is held) otherwise.
            let now = cursor.and_then(|c| {
                self.hub
                    .hold_now(&req.channels, c, req.format, answerer.as_ref())
            });
            let polled = match now {
                Some(held) => Ok(Polled::Held(held)),
                None => {
                    let hub = &self.hub;
                    let (first, format, answerer) = (route.first, req.format, answerer.clone());
                    let cursor = cursor.cloned();
                    let poll = hub.poll_answered_by(&req.channels, cursor, first, format, answerer);
                    Box::pin(poll).await
                }
            };
            let mut held = match polled {
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
            let ending = self.hold(client, &mut held, deadline).await;
            let empty = || Arc::new(Answer::build(req.format, held.cursor(), false, &[]));
            return match ending {
                Ending::Woken(answer) => Waited::Reply(Reply::new(answer, Outcome::Message, true)),
                Ending::Repoll => {
                    repoll = Some(held.cursor().clone());
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

    /// Waits for the first event that ends a held poll (its timeout is
    /// `deadline`). A wake-up that came meanwhile wins over the timeout,
    /// draining and the client leaving (its answer may be with the client
    /// already, or in part).
    pub async fn hold(
        &self,
        client: &mut impl Client,
        held: &mut Held,
        deadline: tokio::time::Instant,
    ) -> Ending {
        // Down again when `held` drops, or when its answer is settled from
        // the delivering task.
        held.count_held();
        // A drain wakes the held polls through the hub, but for one
        // registered after the hub released them (`Hub::release_all`).
        let mut ending = if self.life.is_draining() {
            Ending::Drain
        } else {
            tokio::select! {
                biased;
                woken = held.woken() => woken_by(woken),
                ending = client.until(deadline) => ending,
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
}

pub(crate) fn woken_by(wake: Wake) -> Ending {
    match wake {
        Wake::Answer(answer) => Ending::Woken(answer),
        Wake::Drain => Ending::Drain,
        Wake::Repoll => Ending::Repoll,
    }
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

/// Up to 10% shorter, so that reconnects spread ([`shorten`] by a share
/// drawn now).
pub fn jitter(timeout: Duration) -> Duration {
    shorten(timeout, fastrand::u16(..))
}

/// `timeout` shorter by `share` 65 536ths of a tenth of it (in whole
/// microseconds, without floats or 128-bit divisions: this runs once per
/// poll).
pub fn shorten(timeout: Duration, share: u16) -> Duration {
    let tenth = u64::try_from((timeout / 10).as_micros()).unwrap_or(u64::MAX);
    let share = u64::from(share);
    let off = (tenth >> 16) * share + (((tenth & 0xffff) * share) >> 16);
    timeout.saturating_sub(Duration::from_micros(off))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Format;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::First;

    /// A client that never leaves.
    struct Staying;

    impl Client for Staying {
        async fn gone(&mut self) {
            std::future::pending::<()>().await
        }
    }

    fn holder() -> Holder {
        let broker = Arc::new(MemoryBroker::new(100, Duration::from_secs(60), 1000));
        Holder {
            hub: Hub::new(
                broker,
                100,
                Duration::from_secs(30),
                1000,
                crate::hub::DELIVERY_QUEUE,
            ),
            life: Arc::new(Lifecycle::default()),
            write_timeout: Duration::from_secs(5),
            presence: None,
        }
    }

    /// A poll's task cancelled while it is held (its future dropped at the
    /// `.await` inside `Holder::hold`) takes itself off
    /// `pollgate_held_requests`. (The only test of this process that holds
    /// a poll, so the gauge moves for it alone.)
    #[tokio::test]
    async fn a_hold_dropped_while_waiting_is_no_longer_counted_as_held() {
        let holder = holder();
        let names = vec!["gauge".to_string()];
        let polled = holder
            .hub
            .poll(&names, None, First::Newest, Format::Envelope);
        let Ok(Polled::Held(held)) = polled.await else {
            panic!("an empty channel holds");
        };
        let before = metrics::HELD.get();
        let mut client = Staying;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let holder = &holder;
        // As a poll's task holds it: the `Held` in the future.
        let mut hold = Box::pin(async move {
            let mut held = held;
            holder.hold(&mut client, &mut held, deadline).await
        });
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
