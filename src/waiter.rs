//! A held poll's waiter: where the hub leaves the poll's wake-up (a
//! message, a redo, a drain), and the order between the task that
//! delivers a message and the poll's own task (docs/architecture.md,
//! "Fanning out a publish").
//!
//! The wake-up slot goes `Waiting` → `Fired` (the delivering task writes
//! the answer through the poll's [`Answerer`], if it has one, under the
//! slot's lock) → `Done` (taken by the poll's task). An answer the
//! answerer settled wholly does not wake the poll's task: the task takes
//! it when it next runs for its own reasons (the client's next request,
//! its leaving, the poll's timeout, a drain), which saves a wake-up and a
//! read that would wait, per delivery. The poll's task may
//! also stop a slot that is still `Waiting` ([`Waiter::stop`]): no answer
//! is written for the poll after that, so its connection can go on to the
//! next request, or close, without a write arriving from elsewhere.

use crate::answer::{Answer, Format};
use crate::cursor::Cursor;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

/// Most waiters of ended polls a thread keeps for its next polls.
pub const SPARES: usize = 64;

thread_local! {
    /// The waiters of ended polls kept by this thread ([`Waiter::recycle`]).
    static SPARE: std::cell::RefCell<Vec<Arc<Waiter>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Why a held poll wakes up.
#[derive(Debug)]
pub enum Wake {
    /// A message arrived: write this answer.
    Answer(Arc<Answer>),
    /// The channel's history was replaced (the broker lost it): poll again.
    Repoll,
    /// The instance drains: answer now, and close (see
    /// [`Hub::release_all`](crate::hub::Hub::release_all)).
    Drain,
}

/// Writes an answer to a held poll's client straight from the task that
/// delivers the message, instead of waking the poll's own task to write it.
pub trait Answerer: Send + Sync {
    /// Tries to write `answer` now, without waiting. Returns true when it
    /// is settled: written whole, counted, and the connection goes on as
    /// it is, so the poll's task need not be woken for it (nor counted as
    /// held any longer). False when the poll's task has to go on at once:
    /// to write the answer or its rest, or to close the connection. Called
    /// at most once per held poll, and never after it stopped
    /// ([`Waiter::stop`]).
    fn answer(&self, answer: &Arc<Answer>) -> bool;
}

/// A held poll, as the channels it waits on know it.
pub struct Waiter {
    pub id: u64,
    /// Where the poll is: the answer is built from it.
    pub cursor: Cursor,
    pub format: Format,
    /// Set by the first [`Waiter::fire`] (read without the slot's lock).
    pub fired: AtomicBool,
    /// Counted in `pollgate_held_requests` ([`Waiter::count_held`]).
    held: AtomicBool,
    /// The poll's wake-up, in the waiter itself (no channel of its own).
    slot: Mutex<WakeSlot>,
    answerer: Option<Arc<dyn Answerer>>,
}

/// Where [`Waiter::fire`] leaves the wake-up for [`Waiter::woken`].
#[derive(Default)]
struct WakeSlot {
    phase: Phase,
    /// The poll's task, once it waits.
    waker: Option<Waker>,
}

/// Where a held poll's wake-up is.
#[derive(Default)]
enum Phase {
    /// Nothing came yet.
    #[default]
    Waiting,
    /// The wake-up of the first `fire` (a waiter on several channels fires
    /// once), for the poll's task to take.
    Fired(Wake),
    /// Taken, or stopped.
    Done,
}

impl Waiter {
    /// The waiter of poll `id` at `cursor`, answered in `format` (and
    /// written by `answerer` from the delivering task, when given).
    pub fn new(
        id: u64,
        cursor: Cursor,
        format: Format,
        answerer: Option<Arc<dyn Answerer>>,
    ) -> Waiter {
        Waiter {
            id,
            cursor,
            format,
            fired: AtomicBool::new(false),
            held: AtomicBool::new(false),
            slot: Mutex::new(WakeSlot::default()),
            answerer,
        }
    }

    /// [`Waiter::new`], shared: in the allocation of a waiter whose poll
    /// ended on this thread ([`Waiter::recycle`]) when there is one, so
    /// that a poll after poll allocates and frees nothing for its waiter.
    pub fn shared(
        id: u64,
        cursor: Cursor,
        format: Format,
        answerer: Option<Arc<dyn Answerer>>,
    ) -> Arc<Waiter> {
        let waiter = Waiter::new(id, cursor, format, answerer);
        if let Some(mut spare) = SPARE.with_borrow_mut(Vec::pop) {
            if let Some(slot) = Arc::get_mut(&mut spare) {
                *slot = waiter;
                return spare;
            }
        }
        Arc::new(waiter)
    }

    /// Keeps the waiter of an ended poll for this thread's next
    /// [`Waiter::shared`] (at most [`SPARES`]), when nothing else holds it
    /// any longer. What it held (its answer, its answerer and so its
    /// connection's socket) is let go now.
    pub fn recycle(mut waiter: Arc<Waiter>) {
        let Some(ended) = Arc::get_mut(&mut waiter) else {
            return;
        };
        ended.answerer = None;
        *ended.slot.get_mut() = WakeSlot::default();
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARES {
                spare.push(waiter);
            }
        });
    }

    /// Starts fetching what [`Waiter::fire`] will read of the answerer
    /// ([`crate::prefetch`]), where the waiter's own memory is already
    /// here: a delivery loop calls it a poll ahead.
    pub fn prefetch_answerer(&self) {
        if let Some(answerer) = &self.answerer {
            crate::prefetch::arc(answerer);
        }
    }

    /// Wakes the poll (after writing its answer, when it has an
    /// [`Answerer`]); false when another channel was faster, or the poll
    /// stopped.
    pub fn fire(&self, wake: Wake) -> bool {
        self.fired.store(true, Ordering::Relaxed);
        let waker = {
            let mut slot = self.slot.lock();
            if !matches!(slot.phase, Phase::Waiting) {
                return false;
            }
            // Under the lock: `stop` waits out this write (one write that
            // does not block) on the lock itself, instead of spinning.
            let settled = match (&wake, &self.answerer) {
                (Wake::Answer(answer), Some(answerer)) => answerer.answer(answer),
                _ => false,
            };
            slot.phase = Phase::Fired(wake);
            if settled {
                self.uncount_held();
                None
            } else {
                slot.waker.take()
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Counts the poll in `pollgate_held_requests` until it ends
    /// ([`Waiter::uncount_held`]) or its answer is settled by its answerer,
    /// whichever comes first.
    pub fn count_held(&self) {
        if !self.held.swap(true, Ordering::Relaxed) {
            crate::metrics::HELD.inc();
        }
    }

    /// No longer counts the poll as held (once, whoever calls it first).
    pub fn uncount_held(&self) {
        if self.held.swap(false, Ordering::Relaxed) {
            crate::metrics::HELD.dec();
        }
    }

    /// Resolves with the wake-up, once (see [`crate::hub::Held::woken`]).
    pub fn woken(&self) -> impl Future<Output = Wake> + Send + '_ {
        std::future::poll_fn(move |cx| {
            let mut slot = self.slot.lock();
            match std::mem::replace(&mut slot.phase, Phase::Done) {
                Phase::Fired(wake) => return Poll::Ready(wake),
                other => slot.phase = other,
            }
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Stops the wake-up: once this returns, no answer is written for the
    /// poll. Returns the wake-up that came first, if one did and was not
    /// taken by [`Waiter::woken`]; one being handed over (its answer being
    /// written, without blocking) is waited out on the slot's lock.
    pub fn stop(&self) -> Option<Wake> {
        match std::mem::replace(&mut self.slot.lock().phase, Phase::Done) {
            Phase::Waiting | Phase::Done => None,
            Phase::Fired(wake) => Some(wake),
        }
    }

    /// Withdraws the waiter of a registration that failed part-way (a
    /// channel moved past the cursor). True when nothing came: it is
    /// stopped, and no answer will be written for it. False when a
    /// delivery on a channel registered before fired it first: that
    /// wake-up (its answer perhaps written already) is the poll's, left
    /// for [`Waiter::woken`].
    pub fn withdraw(&self) -> bool {
        let mut slot = self.slot.lock();
        if matches!(slot.phase, Phase::Fired(_)) {
            return false;
        }
        slot.phase = Phase::Done;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;

    struct Unwritable;

    impl Answerer for Unwritable {
        fn answer(&self, _: &Arc<Answer>) -> bool {
            false
        }
    }

    fn at_start() -> Cursor {
        Cursor(smallvec::smallvec![MessageId::ZERO], Some(1))
    }

    /// An ended poll's waiter is the next poll's, fresh, and holds nothing
    /// of the old poll meanwhile; one still held elsewhere is not reused.
    #[test]
    fn an_ended_waiter_is_reused_fresh_and_holds_nothing_meanwhile() {
        let answerer: Arc<dyn Answerer> = Arc::new(Unwritable);
        let gone = Arc::downgrade(&answerer);
        let first = Waiter::shared(1, at_start(), Format::Envelope, Some(answerer));
        assert!(first.fire(Wake::Repoll));
        let place = Arc::as_ptr(&first);
        Waiter::recycle(first);
        assert!(
            gone.upgrade().is_none(),
            "the answerer (its socket) is let go"
        );
        let second = Waiter::shared(2, at_start(), Format::Raw, None);
        assert_eq!(Arc::as_ptr(&second), place, "the same allocation");
        assert_eq!((second.id, second.format), (2, Format::Raw));
        assert!(!second.fired.load(Ordering::Relaxed));
        assert!(second.stop().is_none(), "nothing fired for the new poll");
        let elsewhere = second.clone();
        Waiter::recycle(second);
        let third = Waiter::shared(3, at_start(), Format::Envelope, None);
        assert_ne!(Arc::as_ptr(&third), Arc::as_ptr(&elsewhere));
    }
}
