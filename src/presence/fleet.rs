//! The presence task: ends lingers, applies this instance's presence
//! changes to the fleet's through the broker (in order; kept and retried
//! while the broker is away), renews the instance's place in the fleet's
//! presence and makes dead instances leave, and hands every change of the
//! fleet's presence to the webhooks.

use super::webhooks::Webhooks;
use super::Presence;
use crate::broker::{Broker, BrokerError, PresenceChange};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often lingers are checked.
const TICK: Duration = Duration::from_millis(250);
/// How often the fleet's presence is swept for dead instances.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the broker; the work is retried on the next tick.
const BROKER_WAIT: Duration = Duration::from_secs(2);

/// Runs until `shutdown` changes.
pub async fn run(
    presence: Arc<Presence>,
    broker: Arc<dyn Broker>,
    hooks: Option<Arc<Webhooks>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fleet = Fleet {
        presence,
        broker,
        hooks,
        pending: Vec::new(),
        passed: Vec::new(),
        swept: None,
        failing: false,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fleet.presence.changed() => {}
            _ = shutdown.changed() => return,
        }
        fleet.turn().await;
    }
}

/// The presence task's state between its turns.
struct Fleet {
    presence: Arc<Presence>,
    broker: Arc<dyn Broker>,
    hooks: Option<Arc<Webhooks>>,
    /// This instance's changes not yet applied to the fleet's, in order.
    pending: Vec<PresenceChange>,
    /// Places of the fleet's changes sent as no event, not yet passed
    /// over in their channel's order.
    passed: Vec<(Arc<str>, u64)>,
    /// When the fleet's presence was last swept (None: never, and this
    /// instance is not registered in it yet).
    swept: Option<Instant>,
    /// The broker failed the last turn (warned once).
    failing: bool,
}

/// Why a turn could not tell the broker everything (retried next turn).
type Untold = Result<(), String>;

impl Fleet {
    /// One turn: ends lingers, then (each step only once the one before
    /// went through) registers and sweeps when due, applies the pending
    /// changes, passes over the changes sent as no event.
    async fn turn(&mut self) {
        self.presence.sweep(Instant::now());
        self.pending.extend(self.presence.take());
        // Registered (its heartbeat written) before any change of its own
        // is applied, so that no instance takes it for dead meanwhile.
        let due = self.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
        let mut told = if due { self.sweep().await } else { Ok(()) };
        if told.is_ok() {
            told = self.apply().await;
        }
        if told.is_ok() {
            told = self.pass_over().await;
        }
        match told {
            // Not reached yet at start: not worth a warning.
            Err(why) if !self.failing && self.broker.reached() => {
                let pending = self.pending.len();
                tracing::warn!(%why, pending, "presence: the broker cannot be told now; retrying");
                self.failing = true;
            }
            Ok(()) if self.failing => {
                tracing::info!("presence: the broker is told again");
                self.failing = false;
            }
            _ => {}
        }
    }

    /// Renews this instance's place in the fleet's presence and makes the
    /// dead instances leave ([`Broker::sweep_presence`]).
    async fn sweep(&mut self) -> Untold {
        let sweep = within(self.broker.sweep_presence()).await?;
        self.swept = Some(Instant::now());
        for (change, place) in &sweep.left {
            self.emit(change, *place);
        }
        if sweep.forgotten {
            tracing::warn!(
                "presence: this instance was taken for dead; telling the fleet its presence again"
            );
            self.pending = self.presence.all();
        }
        Ok(())
    }

    /// Applies the pending changes ([`Broker::apply_presence`]); those that
    /// changed the fleet's presence are emitted.
    async fn apply(&mut self) -> Untold {
        if self.pending.is_empty() {
            return Ok(());
        }
        let places = within(self.broker.apply_presence(&self.pending)).await?;
        let pending = std::mem::take(&mut self.pending);
        for (change, place) in pending.iter().zip(places) {
            if let Some(place) = place {
                self.emit(change, place);
            }
        }
        Ok(())
    }

    /// A change of the fleet's presence, at `place` of its channel's
    /// order: sent as an event, or to be passed over in the order.
    fn emit(&mut self, change: &PresenceChange, place: u64) {
        tracing::debug!(channel = %change.channel, subscriber = change.subscriber.as_deref(), present = change.present, "fleet presence changed");
        match &self.hooks {
            Some(hooks) if hooks.wants(change) => hooks.send(change, place),
            _ => self.passed.push((change.channel.clone(), place)),
        }
    }

    /// Passes over the places of the changes sent as no event, so that the
    /// next events of their channels do not wait for them.
    async fn pass_over(&mut self) -> Untold {
        if self.passed.is_empty() {
            return Ok(());
        }
        let over = self
            .passed
            .iter()
            .map(|(c, p)| self.broker.presence_dropped(c, *p));
        let over = futures_util::future::try_join_all(over);
        within(over).await?;
        self.passed.clear();
        Ok(())
    }
}

/// `work`, given up after [`BROKER_WAIT`].
async fn within<T>(work: impl Future<Output = Result<T, BrokerError>>) -> Result<T, String> {
    match tokio::time::timeout(BROKER_WAIT, work).await {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer in {BROKER_WAIT:?}")),
    }
}
