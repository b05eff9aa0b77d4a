//! The presence task: ends lingers, applies this instance's presence
//! changes to the fleet's through the broker (in order; kept and retried
//! while the broker is away), renews the instance's place in the fleet's
//! presence and makes dead instances leave, and hands every change of the
//! fleet's presence to the webhooks.

use super::webhooks::Webhooks;
use super::Presence;
use crate::broker::{Broker, PresenceChange};
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
    // Changes not yet applied to the fleet's presence, in order.
    let mut pending: Vec<PresenceChange> = Vec::new();
    let mut swept = Instant::now() - SWEEP_EVERY;
    let (mut failing, mut registered) = (false, false);
    // Places of changes sent as no event, not yet passed over.
    let mut passed: Vec<(Arc<str>, u64)> = Vec::new();
    // A change of the fleet's presence, at `place` of its channel's order:
    // sent as an event, or passed over in the order.
    let emit = |change: &PresenceChange, place: u64| {
        tracing::debug!(channel = %change.channel, subscriber = change.subscriber.as_deref(), present = change.present, "fleet presence changed");
        match &hooks {
            Some(hooks) if hooks.wants(change) => {
                hooks.send(change, place);
                None
            }
            _ => Some((change.channel.clone(), place)),
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = presence.changed() => {}
            _ = shutdown.changed() => return,
        }
        presence.sweep(Instant::now());
        pending.extend(presence.take());
        let mut result = Ok(());
        // The instance is in the fleet's presence (its heartbeat written)
        // before any change of its own is applied, so that others never
        // take it for dead while it has presence.
        if !registered || swept.elapsed() >= SWEEP_EVERY {
            match tokio::time::timeout(BROKER_WAIT, broker.sweep_presence()).await {
                Ok(Ok(sweep)) => {
                    (registered, swept) = (true, Instant::now());
                    let left = sweep.left.iter();
                    passed.extend(left.filter_map(|(change, place)| emit(change, *place)));
                    if sweep.forgotten {
                        tracing::warn!("presence: this instance was taken for dead; telling the fleet its presence again");
                        pending = presence.all();
                    }
                }
                Ok(Err(e)) => result = Err(e.to_string()),
                Err(_) => result = Err("no answer in 2s".into()),
            }
        }
        if result.is_ok() && !pending.is_empty() {
            match tokio::time::timeout(BROKER_WAIT, broker.apply_presence(&pending)).await {
                Ok(Ok(places)) => {
                    let changed = pending.iter().zip(places);
                    let fleet = changed.filter_map(|(change, place)| Some((change, place?)));
                    passed.extend(fleet.filter_map(|(change, place)| emit(change, place)));
                    pending.clear();
                }
                Ok(Err(e)) => result = Err(e.to_string()),
                Err(_) => result = Err("no answer in 2s".into()),
            }
        }
        if result.is_ok() && !passed.is_empty() {
            let over = passed.iter().map(|(c, p)| broker.presence_dropped(c, *p));
            let over = futures_util::future::join_all(over);
            match tokio::time::timeout(BROKER_WAIT, over).await {
                Ok(done) if done.iter().all(Result::is_ok) => passed.clear(),
                _ => result = Err("could not pass over the changes sent as no event".into()),
            }
        }
        match result {
            // Not reached yet at start: not worth a warning.
            Err(why) if !failing && broker.reached() => {
                tracing::warn!(%why, pending = pending.len(), "presence: the broker cannot be told now; retrying");
                failing = true;
            }
            Ok(()) if failing => {
                tracing::info!("presence: the broker is told again");
                failing = false;
            }
            _ => {}
        }
    }
}
