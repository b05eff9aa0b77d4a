//! Draining: the one signal that SIGTERM (or a graceful upgrade) flips,
//! threaded explicitly to every part that holds requests, and the tracker
//! of the requests in flight that the process waits for before it exits;
//! and the failure that stops the process instead (a listener that cannot
//! serve), which takes the same way out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
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
    /// Why the instance cannot go on serving, once something said so.
    failure: OnceLock<String>,
    failed: Notify,
}

/// Counts one request as in flight until dropped.
pub type InFlight = TaskTrackerToken;

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: Notify::new(),
            flag: AtomicBool::new(false),
            in_flight: TaskTracker::new(),
            failure: OnceLock::new(),
            failed: Notify::new(),
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

    /// Stops the instance: it cannot go on serving, for `reason` (the
    /// first reason given is kept). The signal handler stops the server
    /// at once, and `server::run` returns the reason as its error.
    pub fn fail(&self, reason: String) {
        let _ = self.failure.set(reason);
        self.failed.notify_one();
    }

    /// Resolves when [`Lifecycle::fail`] is called; returns the reason.
    pub async fn failed(&self) -> &str {
        loop {
            if let Some(reason) = self.failure.get() {
                return reason;
            }
            self.failed.notified().await;
        }
    }

    /// Why the instance stopped, if it failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
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
