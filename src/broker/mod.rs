//! The broker: where messages are stored and announced.
//!
//! A [`Broker`] keeps each channel's history and announces every publish to
//! every gateway instance through the [`Sink`] it was given (the hub). The
//! in-process [`memory::MemoryBroker`] serves a single instance; the Redis
//! broker implements the same trait for several.

pub mod memory;
pub mod redis;

use crate::cursor::Epoch;
use crate::history::History;
use crate::message::{Message, MessageId};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// A broker URL (`broker.url`) that cannot be used: its text names the key
/// and the problem, without secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker.url: {0}")]
pub struct UrlError(pub String);

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker cannot be reached or refused the command: retry later (503).
    Unavailable(String),
    /// Too many commands are already waiting for the broker: retry later (503).
    Busy(String),
    /// A publish to a new channel while the broker already keeps its most
    /// channels (`limits.max_channels_kept`, the number carried) and every
    /// one of them has held polls: retry later (503).
    TooManyChannels(usize),
    /// The message was stored and announced, but fewer Redis replicas than
    /// `publish.replicas` confirmed it in time (503 `not_replicated`): a
    /// failover may lose it, or it may still be delivered.
    NotReplicated(String),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerError::Unavailable(why) => write!(f, "broker unavailable: {why}"),
            BrokerError::Busy(why) => write!(f, "broker busy: {why}"),
            BrokerError::NotReplicated(why) => write!(f, "not replicated: {why}"),
            BrokerError::TooManyChannels(max) => write!(
                f,
                "this instance already keeps {max} channels, each with held polls (limits.max_channels_kept)"
            ),
        }
    }
}

impl std::error::Error for BrokerError {}

/// Receives every message the broker announces, in publish order per channel.
///
/// The sink (the hub) has a bounded queue. A broker that cannot wait (the
/// Redis broker's connection) hands messages over with [`Sink::deliver`]
/// and, when it is refused, recovers them with [`Sink::resync`]; one that
/// can (the memory broker's publish) takes [`Sink::room`] first.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Hands over one announced message, without waiting. Returns false
    /// when the sink has no room for it: the message was not taken, and
    /// the broker must hand over no later message of this connection;
    /// it catches up instead, with [`Sink::resync`] of every channel.
    fn deliver(&self, message: Arc<Message>) -> bool;

    /// Waits for room for one announcement; returns it, to be filled (once
    /// the message exists) with [`Room::deliver`], which is never refused.
    async fn room(&self) -> Box<dyn Room>;

    /// Called after the broker reconnected, with the channel's stored history,
    /// so that messages announced while disconnected (or refused by
    /// [`Sink::deliver`]) are caught up, or a lost history is noticed.
    /// Waits for room in the sink; returns once the history was taken.
    async fn resync(&self, channel: &str, history: History);

    /// The newest position of `channel` this instance has seen (its window's
    /// last id), or None when it keeps no window of it. After a failover,
    /// a position the new master does not have is a write it lost.
    fn position(&self, _channel: &str) -> Option<MessageId> {
        None
    }

    /// Returns true while this instance holds polls on `channel`: a broker
    /// that must drop a channel to make room never drops such a one.
    fn is_held(&self, _channel: &str) -> bool {
        false
    }
}

/// One instance's presence on a channel beginning or ending: the instance
/// has (or no longer has) a client there (`subscriber` None), or has a given
/// subscriber there (see [`Broker::apply_presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub channel: Arc<str>,
    /// The subscriber's identity; None for the instance's occupancy.
    pub subscriber: Option<Arc<str>>,
    /// True: present from now on; false: no longer present.
    pub present: bool,
    /// When, in Unix milliseconds.
    pub at: u64,
}

/// What the broker's presence sweep found ([`Broker::sweep_presence`]).
#[derive(Debug, Default)]
pub struct PresenceSweep {
    /// Leaves of instances whose heartbeat expired that changed the fleet's
    /// presence (a subscriber left everywhere, a channel became vacant), in
    /// order per channel, each with its place in the channel's order (see
    /// [`Broker::apply_presence`]).
    pub left: Vec<(PresenceChange, u64)>,
    /// This instance's own presence was dropped from the fleet's (its
    /// heartbeat had expired: a stall, or a broker that lost its data): it
    /// must be told again in full.
    pub forgotten: bool,
}

/// Room for one announcement in a [`Sink`], taken by [`Sink::room`].
pub trait Room: Send {
    /// Announces `message` in this room; never refused.
    fn deliver(self: Box<Self>, message: Arc<Message>);
}

/// Storage and announcement of messages.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Stores the message in the channel's history and announces it.
    /// Returns the stored message (with its id) only once both are done, so
    /// that an `Ok` means every subscriber will get it.
    async fn publish(
        &self,
        channel: &str,
        content_type: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError>;

    /// Returns the channel's retained history (empty when the channel is
    /// unknown or expired).
    async fn history(&self, channel: &str) -> Result<History, BrokerError>;

    /// The epoch of the history this broker serves now: cursors of another
    /// epoch belong to a history that is gone (a memory broker that
    /// restarted, a Redis that lost or flushed its data), and get a gap.
    fn epoch(&self) -> Epoch;

    /// Sets the receiver of announcements. Called once, before serving.
    fn set_sink(&self, sink: Arc<dyn Sink>);

    /// Tells the broker this instance now needs announcements for
    /// `channel`; returns once they are flowing (so that a history read
    /// after it misses nothing).
    async fn watch(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Tells the broker this instance no longer needs `channel`.
    fn unwatch(&self, _channel: &str) {}

    /// Where the broker is, for `/readyz` and logs, without secrets:
    /// `memory://`, or the Redis URL with its password as `***` (behind
    /// Sentinel, with the master in use).
    fn address(&self) -> String;

    /// True while the broker is reachable.
    fn is_up(&self) -> bool {
        true
    }

    /// Resolves once the broker is reachable (at once for brokers that
    /// always are).
    async fn until_up(&self) {}

    /// True once the broker has been reachable at least once since start,
    /// however briefly (readiness: an outage after that does not make the
    /// instance unready).
    fn reached(&self) -> bool {
        true
    }

    /// Shares this instance's subscriber counts (`counts`: channel and
    /// count, a 0 for a channel it no longer holds) with the fleet, and
    /// says the instance is alive; called about once a second (with the
    /// counts that changed, and now and then all of them). Brokers without
    /// a fleet do nothing.
    async fn report_occupancy(&self, _counts: &[(Arc<str>, usize)]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The subscribers of `channel` on the other instances of the fleet,
    /// as those alive reported them (0 for a broker without a fleet).
    async fn others_occupancy(&self, _channel: &str) -> Result<usize, BrokerError> {
        Ok(0)
    }

    /// Applies this instance's presence changes to the fleet's, in order.
    /// Returns, for each, None when it did not change the fleet's presence,
    /// or the place of the change in the channel's fleet-wide order when
    /// it did (a channel became occupied or vacant, a subscriber joined or
    /// left, present nowhere else): its events are sent in that order
    /// ([`Broker::presence_turn`]). Brokers without a fleet: every change
    /// is the fleet's, and the order is this instance's (place 0).
    async fn apply_presence(
        &self,
        changes: &[PresenceChange],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        Ok(vec![Some(0); changes.len()])
    }

    /// Returns true once the change at `place` of `channel`'s order may be
    /// sent: every earlier one was sent ([`Broker::presence_sent`]), or
    /// never will be (dropped, or held by an instance that died).
    async fn presence_turn(&self, _channel: &str, _place: u64) -> Result<bool, BrokerError> {
        Ok(true)
    }

    /// Records that the change at `place` of `channel`'s order was sent
    /// (or needed no sending): the next one's turn comes.
    async fn presence_sent(&self, _channel: &str, _place: u64) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Records that the change at `place` of `channel`'s order will never
    /// be sent (dropped): the next ones do not wait for it.
    async fn presence_dropped(&self, _channel: &str, _place: u64) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The identified subscribers present on `channel` across the fleet,
    /// each with when it joined (Unix ms); None for a broker without a
    /// fleet (this instance's own list is the whole list).
    async fn presence(&self, _channel: &str) -> Result<Option<Vec<(String, u64)>>, BrokerError> {
        Ok(None)
    }

    /// Renews this instance's place in the fleet's presence and makes the
    /// instances whose heartbeat expired leave; called about once a second
    /// while presence is tracked. Brokers without a fleet find nothing.
    async fn sweep_presence(&self) -> Result<PresenceSweep, BrokerError> {
        Ok(PresenceSweep::default())
    }

    /// This instance's id in the fleet (random, per process).
    fn instance(&self) -> &str;

    /// Periodic housekeeping (expiring histories); called about once a second.
    fn maintain(&self) {}

    /// The broker's connection work (connect, announce, reconnect), run
    /// until `shutdown` turns true. Brokers without any return at once.
    async fn run(&self, _shutdown: tokio::sync::watch::Receiver<bool>) {}
}
