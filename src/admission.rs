//! Admission of held requests (polls, SSE streams, watch GETs): the
//! instance's `limits.max_held` slots ([`HeldSlots`]), the client's own
//! limits (through [`crate::fairness`]), the broker being up; and the
//! refusal ([`Refused`]: 429 or 503, with `Retry-After`) when one says no.

use crate::broker::Broker;
use crate::fairness::{ClientSlot, Clients, OverLimit};
use crate::metrics::Refusal;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Subscribe requests in progress, counted against `limits.max_held`
/// atomically: a slot is taken before anything else is done for a poll,
/// and given back when its [`Slot`] drops. (`pollgate_held_requests`
/// counts the polls actually waiting for a message.)
// Not tokio's `Semaphore`: dropping its permit locks its waiter list, a Mutex per poll.
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

/// What an admitted request holds until it is answered: a slot of
/// `limits.max_held`, and one of its client's `max_held_per_client`.
pub struct Admitted<'a> {
    _slot: Slot<'a>,
    _client: ClientSlot<'a>,
}

/// Why a new poll or watch request is refused now ([`Admission::admit`]).
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    /// The reason counted in `pollgate_refused_total`.
    pub refusal: Refusal,
    /// The `detail` of the JSON answer.
    pub detail: &'static str,
    /// Seconds in `Retry-After`.
    pub retry_after: u64,
}

impl Refused {
    fn unavailable(refusal: Refusal, detail: &'static str) -> Refused {
        Refused {
            refusal,
            detail,
            retry_after: 1,
        }
    }

    /// The status to answer with: 429 over a per-client limit, else 503.
    pub fn status(&self) -> u16 {
        match self.refusal {
            Refusal::MaxHeldPerClient | Refusal::PollsPerClient => 429,
            _ => 503,
        }
    }

    /// The `error` of the JSON answer: `too_many_held`, `too_many_polls`,
    /// or `unavailable`.
    pub fn error(&self) -> &'static str {
        match self.refusal {
            Refusal::MaxHeldPerClient => "too_many_held",
            Refusal::PollsPerClient => "too_many_polls",
            _ => "unavailable",
        }
    }

    /// The `Retry-After` value, in whole seconds.
    pub fn retry_after(&self) -> String {
        self.retry_after.to_string()
    }
}

impl From<OverLimit> for Refused {
    fn from(over: OverLimit) -> Refused {
        let detail = match over.refusal {
            Refusal::PollsPerClient => {
                "too many new polls from this client address (limits.polls_per_client)"
            }
            _ => "too many requests held for this client address (limits.max_held_per_client)",
        };
        Refused {
            refusal: over.refusal,
            detail,
            retry_after: over.retry_after,
        }
    }
}

/// What decides whether a held request may start: the instance's slots,
/// the per-client limits and the broker.
pub struct Admission {
    /// `limits.max_held`.
    pub held: HeldSlots,
    /// The per-client limits (`limits.max_held_per_client`,
    /// `limits.polls_per_client`), shared with housekeeping.
    pub clients: Arc<Clients>,
    pub broker: Arc<dyn Broker>,
}

impl Admission {
    /// Admits a new poll, SSE stream or watch request: takes a slot of
    /// its client (found by `client` only when a per-client limit is on;
    /// None: no per-client limit applies) and a held-poll slot. Returns
    /// them, or why the request is refused now (broker down, the client's
    /// `max_held_per_client` or `polls_per_client`, `max_held`). A
    /// draining instance admits requests: they get what is already there,
    /// or their cursor at once (the drain answer), never a refusal.
    pub fn admit(
        &self,
        client: impl FnOnce() -> Option<IpAddr>,
    ) -> std::result::Result<Admitted<'_>, Refused> {
        if !self.broker.is_up() {
            return Err(Refused::unavailable(
                Refusal::BrokerDown,
                "the broker is unreachable",
            ));
        }
        // One branch when no per-client limit is on.
        let client_slot = match self.clients.enabled().then(client).flatten() {
            Some(ip) => self.clients.admit(ip)?,
            None => ClientSlot::none(),
        };
        let slot = self.held.take().ok_or(Refused::unavailable(
            Refusal::MaxHeld,
            "too many held polls on this instance (limits.max_held)",
        ))?;
        Ok(Admitted {
            _slot: slot,
            _client: client_slot,
        })
    }
}
