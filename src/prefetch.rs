//! Asking the CPU for memory a loop will read soon ([`arc`]).
//!
//! A delivery wakes thousands of held polls, each with its own waiter and
//! writer somewhere in the heap, and the system call that sends one poll's
//! answer pushes the next poll's memory out of the near caches. Fetched a
//! poll or two ahead, that memory arrives while the answer before is sent,
//! instead of the loop stalling on a chain of cache misses per poll
//! (docs/benchmarks.md, "Performance work").

use std::sync::Arc;

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
