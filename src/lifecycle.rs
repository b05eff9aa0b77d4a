//! Draining: the one signal that SIGTERM (or a graceful upgrade) flips,
//! threaded explicitly to every part that holds requests, and the tracker
//! of the requests in flight that the process waits for before it exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};

/// Whether the instance is draining, and which requests are in flight.
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    flag: AtomicBool,
    in_flight: TaskTracker,
}

/// Counts one request as in flight until dropped.
pub type InFlight = TaskTrackerToken;

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::Sender::new(false),
            flag: AtomicBool::new(false),
            in_flight: TaskTracker::new(),
        }
    }
}

impl Lifecycle {
    /// Starts draining: every held request is told at once, the client
    /// listeners stop accepting, idle connections close.
    pub fn drain(&self) {
        self.flag.store(true, Ordering::Release);
        self.draining.send_replace(true);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn drained(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
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
