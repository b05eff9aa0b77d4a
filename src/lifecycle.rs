//! Draining: the one signal that SIGTERM flips, threaded explicitly to every
//! part that holds requests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Whether the instance is draining, and how many requests are in flight.
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    flag: AtomicBool,
    in_flight: AtomicUsize,
}

/// Counts one request as in flight until dropped.
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::Sender::new(false),
            flag: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Lifecycle {
    /// Starts draining: every held request is told at once.
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
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Blocks the calling thread until nothing is in flight or `limit` passed.
    /// Returns true when everything finished.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.in_flight() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.in_flight() == 0
    }
}
