//! Draining: the one signal that SIGTERM (or a graceful upgrade) flips,
//! threaded explicitly to every part that holds requests, and the tracker
//! of the requests in flight that the process waits for before it exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};

/// Whether the instance is draining, and which requests are in flight.
// Not tokio-util's `CancellationToken`: its `is_cancelled` locks a Mutex, and every poll asks.
pub struct Lifecycle {
    /// Wakes everything waiting in [`Lifecycle::drained`] (every held
    /// request registers with it: a plain list entry, no channel receiver).
    draining: Notify,
    flag: AtomicBool,
    in_flight: TaskTracker,
}

/// Counts one request as in flight until dropped.
pub type InFlight = TaskTrackerToken;

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: Notify::new(),
            flag: AtomicBool::new(false),
            in_flight: TaskTracker::new(),
        }
    }
}

impl Lifecycle {
    /// Starts draining: every held request is told at once, the client
    /// listeners stop accepting, idle connections close.
    pub fn drain(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.draining.notify_waiters();
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn drained(&self) {
        let notified = self.draining.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a drain in between still
        // wakes it.
        notified.as_mut().enable();
        if !self.is_draining() {
            notified.await;
        }
    }

    /// Marks a request in flight for as long as the guard lives.
    pub fn enter(&self) -> InFlight {
        self.in_flight.token()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Waits until nothing is in flight, or `limit` passed. Returns true
    /// when everything finished. Call after [`Lifecycle::drain`].
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        self.in_flight.close();
        tokio::time::timeout(limit, self.in_flight.wait())
            .await
            .is_ok()
    }
}
