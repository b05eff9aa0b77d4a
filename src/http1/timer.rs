//! One timer for every wait of an HTTP/1 connection ([`ConnTimer`]): the
//! wait for its next request head and the timeout of each poll it holds.
//!
//! Why: a timer of its own per wait is registered in the runtime's timer
//! wheel when the wait starts and taken out when it ends, under the
//! wheel's lock, twice per long-poll. One timer moved later is one atomic
//! operation (tokio extends a registered deadline in place), and the waits
//! of a connection that polls again and again come one after the other.

use std::pin::Pin;
use tokio::time::{Instant, Sleep};

/// The timer of one connection, made when it first waits.
#[derive(Default)]
pub struct ConnTimer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ConnTimer {
    /// Resolves at `deadline` (a poll's timeout).
    pub async fn at(&mut self, deadline: Instant) {
        set(&mut self.sleep, deadline).await
    }

    /// Resolves at `deadline`, or a little later (the wait for a request
    /// head, whose bound need not be exact): a timer due earlier is left
    /// as it is, and moved to `deadline` only if it fires first. The next
    /// poll's timeout, later than the one before, then moves it later
    /// again at the cost of one atomic operation.
    pub async fn not_before(&mut self, deadline: Instant) {
        let sleep = match &mut self.sleep {
            Some(sleep) if sleep.deadline() <= deadline => sleep,
            slot => set(slot, deadline),
        };
        loop {
            sleep.as_mut().await;
            if sleep.deadline() >= deadline {
                return;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// The timer in `slot`, due at `deadline` (made when there is none).
fn set(slot: &mut Option<Pin<Box<Sleep>>>, deadline: Instant) -> &mut Pin<Box<Sleep>> {
    match slot {
        Some(sleep) => {
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            sleep
        }
        none => none.insert(Box::pin(tokio::time::sleep_until(deadline))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Each wait ends at its own deadline, whether the timer moves later
    /// (the next poll's timeout), earlier, or is left due earlier by
    /// `not_before` and moved when it fires.
    #[tokio::test(start_paused = true)]
    async fn each_wait_ends_at_its_deadline() {
        let mut timer = ConnTimer::default();
        let start = Instant::now();
        let s = Duration::from_secs;
        timer.at(start + s(10)).await;
        assert_eq!(Instant::now(), start + s(10));
        // Later than the timer fired: due again.
        timer.at(start + s(30)).await;
        assert_eq!(Instant::now(), start + s(30));
        // Moved later while pending, then earlier while pending.
        let waited = tokio::time::timeout(s(5), timer.at(start + s(60))).await;
        assert!(waited.is_err(), "not yet at 35 s");
        timer.at(start + s(50)).await;
        assert_eq!(Instant::now(), start + s(50));
        // A timer due earlier than a head's wait is moved when it fires.
        let pending = tokio::time::timeout(s(1), timer.at(start + s(70))).await;
        assert!(pending.is_err());
        timer.not_before(start + s(100)).await;
        assert_eq!(Instant::now(), start + s(100));
        // Due later than a head's wait: moved earlier at once.
        let pending = tokio::time::timeout(s(1), timer.at(start + s(200))).await;
        assert!(pending.is_err());
        timer.not_before(start + s(120)).await;
        assert_eq!(Instant::now(), start + s(120));
    }
}
