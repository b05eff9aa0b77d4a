//! Asking the CPU for memory that is about to be read ([`arc`], [`Warm`]).
//!
//! A delivery wakes thousands of held polls, each with its own waiter and
//! writer somewhere in the heap, and the system call that sends one poll's
//! answer pushes the next poll's memory out of the near caches. Fetched a
//! poll or two ahead, that memory arrives while the answer before is sent,
//! instead of the loop stalling on a chain of cache misses per poll. A
//! connection's task, woken by its client's next request after thousands
//! of others ran, finds its own state out of the caches likewise: [`Warm`]
//! asks for all of it at once, before the task reads any (docs/benchmarks.md,
//! "Performance work").

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Size of a cache line on the machines pollgate runs on.
const LINE: usize = 64;

/// Starts fetching the allocation of `arc` (its counts and its value) into
/// the caches, and returns at once: a hint, which reads nothing.
#[inline(always)]
pub fn arc<T: ?Sized>(arc: &Arc<T>) {
    // The counts sit just before the value (two words).
    let counts = 2 * size_of::<usize>();
    let start = (Arc::as_ptr(arc) as *const u8).wrapping_sub(counts);
    bytes(start, counts + size_of_val(&**arc));
}

/// Starts fetching the cache lines of `len` bytes at `start`.
#[inline(always)]
fn bytes(start: *const u8, len: usize) {
    let first = start.wrapping_sub(start as usize % LINE);
    let lines = (start as usize % LINE + len).div_ceil(LINE);
    for line in 0..lines {
        line_at(first.wrapping_add(line * LINE));
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn line_at(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch reads nothing the program sees and cannot fault,
    // whatever the address (Intel SDM, PREFETCHh).
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn line_at(_: *const u8) {}

pin_project_lite::pin_project! {
    /// A future that fetches its whole state into the caches each time it
    /// is polled, before it runs: the misses on it are then taken side by
    /// side, not one after another as the future reads its fields. For a
    /// connection's task, woken once per request.
    pub struct Warm<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Warm<F> {
    /// `inner`, warmed on each poll.
    pub fn new(inner: F) -> Warm<F> {
        Warm { inner }
    }
}

impl<F: Future> Future for Warm<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        bytes(&*self as *const Self as *const u8, size_of::<Self>());
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warmed future is the same future: its output, its wake-ups.
    #[tokio::test]
    async fn a_warmed_future_answers_as_its_own() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(Warm::new(async move { rx.await.unwrap() + 1 }));
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "pending until woken");
        tx.send(41).unwrap();
        assert_eq!(task.await.unwrap(), 42);
        assert_eq!(Warm::new(async { "now" }).await, "now");
    }
}
