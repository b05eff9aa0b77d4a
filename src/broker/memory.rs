//! The in-process broker behind `memory://`: one instance, no dependencies.
//!
//! Channels live in a sharded map so that publishes to different channels do
//! not contend. A publish assigns the id, appends to the history and hands the
//! message to the sink while holding its channel's lock, so announcements of
//! one channel leave in id order.
//!
//! At most `limits.max_channels_kept` channels are kept: a new one past it
//! evicts the least recently published one without held polls here (see
//! "Memory of channels" in docs/architecture.md), whose newest id stays
//! behind as a floor so that its old cursors get a gap.
//!
//! A publish first waits for room in the sink's bounded queue
//! ([`Sink::room`]): publishers faster than delivery are slowed down, and
//! no message is dropped.

use super::{Broker, BrokerError, Sink};
use crate::cursor::Epoch;
use crate::history::History;
use crate::message::{Message, MessageId};
use crate::metrics::{self, Refusal};
use crate::shards::ShardedMap;
use ahash::RandomState;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Stream {
    name: Arc<str>,
    history: History,
    last_publish: Instant,
    /// Publishes so far: eviction tells by it a stream published since it
    /// was last looked at.
    publishes: u64,
    /// The stream left the map (evicted or expired): a publish that found
    /// it before must look again.
    gone: bool,
}

type Shared = Arc<Mutex<Stream>>;

/// What bounds the streams: their count, their order for eviction, and
/// the floors of those dropped. Locked only to create or drop a stream (and
/// to read a floor for a channel without one), never per publish to a
/// kept channel.
struct Keeper {
    /// Streams in the map.
    kept: usize,
    /// Every stream in the map once (and some gone ones, skipped), each with
    /// its publish count when queued: the front is the least recently
    /// published, but for those published since (moved to the back when
    /// met: a second chance, as in the CLOCK algorithm).
    order: VecDeque<(Shared, u64)>,
    /// Per slot of a channel name's hash, the newest id of the dropped
    /// streams of that slot: a stream created again starts from it, so
    /// that every cursor older than it (`0-0` included) gets a gap, and one
    /// at it (nothing missed) does not.
    floors: Box<[MessageId]>,
}

/// The memory broker. Histories keep `history` messages each and vanish
/// `history_ttl` after their last publish; at most `max_kept` are kept.
pub struct MemoryBroker {
    streams: ShardedMap<Shared>,
    keeper: Mutex<Keeper>,
    /// Picks a channel's slot in [`Keeper::floors`].
    slots: RandomState,
    sink: OnceLock<Arc<dyn Sink>>,
    history: usize,
    history_ttl: Duration,
    max_kept: usize,
    /// This process's start (ms since the Unix epoch): its history's epoch.
    epoch: Epoch,
    /// This process's id (webhook event ids).
    instance: String,
}

impl MemoryBroker {
    /// A broker keeping `history` messages per channel for `history_ttl`,
    /// for at most `max_kept` channels (`limits.max_channels_kept`).
    pub fn new(history: usize, history_ttl: Duration, max_kept: usize) -> MemoryBroker {
        // Twice the channels kept, so that dropped ones rarely share a slot
        // (16 bytes a slot: 512 KiB for 10 000 channels), at most 2^20.
        let slots = (max_kept.max(1) * 2)
            .next_power_of_two()
            .clamp(1024, 1 << 20);
        MemoryBroker {
            streams: ShardedMap::default(),
            keeper: Mutex::new(Keeper {
                kept: 0,
                order: VecDeque::new(),
                floors: vec![MessageId::ZERO; slots].into_boxed_slice(),
            }),
            slots: RandomState::new(),
            sink: OnceLock::new(),
            history,
            history_ttl,
            max_kept: max_kept.max(1),
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as Epoch),
            instance: format!("{:016x}", fastrand::u64(..)),
        }
    }

    fn stream(&self, channel: &str) -> Option<Shared> {
        self.streams.get(channel)
    }

    /// The index of `channel`'s slot in `floors`.
    fn slot(&self, channel: &str, floors: &[MessageId]) -> usize {
        self.slots.hash_one(channel) as usize & (floors.len() - 1)
    }

    /// Returns `channel`'s stream, creating it when there is none; to make
    /// room, drops the least recently published stream without held polls.
    /// Err when every kept stream has held polls.
    fn stream_or_create(&self, channel: &str) -> Result<Shared, BrokerError> {
        let mut keeper = self.keeper.lock();
        // Streams leave the map only under this lock: one found is live.
        if let Some(s) = self.streams.get(channel) {
            return Ok(s);
        }
        if keeper.kept >= self.max_kept && !self.evict_one(&mut keeper) {
            Refusal::MaxChannelsKept.count();
            return Err(BrokerError::TooManyChannels(self.max_kept));
        }
        let floor = keeper.floors[self.slot(channel, &keeper.floors)];
        let stream = self.streams.get_or_insert_with(channel, |name| {
            Arc::new(Mutex::new(Stream {
                name: name.clone(),
                history: History::from_parts(self.history, floor, Vec::new()),
                last_publish: Instant::now(),
                publishes: 0,
                gone: false,
            }))
        });
        keeper.kept += 1;
        // Queued as published once: by the publish that creates it.
        keeper.order.push_back((stream.clone(), 1));
        metrics::CHANNELS_KEPT.set(keeper.kept as i64);
        Ok(stream)
    }

    /// Drops the least recently published stream that has no held poll
    /// here. Returns false when every one has.
    fn evict_one(&self, keeper: &mut Keeper) -> bool {
        let sink = self.sink.get();
        // Twice round: a stream published since it was queued gets a
        // second chance, and is met again after the others.
        for _ in 0..keeper.order.len() * 2 {
            let Some((stream, seen)) = keeper.order.pop_front() else {
                return false;
            };
            let (name, last) = {
                let mut s = stream.lock();
                if s.gone {
                    continue;
                }
                let held = sink.is_some_and(|sink| sink.is_held(&s.name));
                if s.publishes != seen || held {
                    let publishes = s.publishes;
                    drop(s);
                    keeper.order.push_back((stream, publishes));
                    continue;
                }
                s.gone = true;
                (s.name.clone(), s.history.last_id())
            };
            // The stream's lock is released first: the map's is taken before
            // a stream's elsewhere.
            self.streams.remove_if(&name, |v| Arc::ptr_eq(v, &stream));
            self.forget(keeper, &name, last);
            metrics::CHANNELS_EVICTED.inc();
            return true;
        }
        false
    }

    /// Counts a stream gone and records its newest id as its slot's floor.
    fn forget(&self, keeper: &mut Keeper, name: &str, last: MessageId) {
        let slot = self.slot(name, &keeper.floors);
        keeper.floors[slot] = keeper.floors[slot].max(last);
        keeper.kept -= 1;
        metrics::CHANNELS_KEPT.set(keeper.kept as i64);
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn address(&self) -> String {
        "memory://".into()
    }

    fn instance(&self) -> &str {
        &self.instance
    }

    async fn publish(
        &self,
        channel: &str,
        content_type: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError> {
        let mut stream = match self.stream(channel) {
            Some(s) => s,
            None => self.stream_or_create(channel)?,
        };
        // Room in the hub's delivery queue first, outside the lock: a
        // publish faster than delivery waits here, so nothing queues
        // without bound and nothing is refused.
        let room = match self.sink.get() {
            Some(sink) => Some(sink.room().await),
            None => None,
        };
        let mut s = stream.lock();
        while s.gone {
            // Dropped meanwhile: published to the one that replaces it.
            drop(s);
            stream = self.stream_or_create(channel)?;
            s = stream.lock();
        }
        let id = s.history.last_id().next_after();
        let message = Arc::new(Message::new(id, s.name.clone(), content_type, data));
        s.history.push(message.clone());
        s.last_publish = Instant::now();
        s.publishes += 1;
        if let Some(room) = room {
            room.deliver(message.clone());
        }
        Ok(message)
    }

    async fn history(&self, channel: &str) -> Result<History, BrokerError> {
        if let Some(s) = self.stream(channel) {
            return Ok(s.lock().history.clone());
        }
        // None kept: empty, from the floor of the dropped ones of its slot.
        let keeper = self.keeper.lock();
        match self.streams.get(channel) {
            Some(s) => Ok(s.lock().history.clone()),
            None => {
                let floor = keeper.floors[self.slot(channel, &keeper.floors)];
                Ok(History::from_parts(self.history, floor, Vec::new()))
            }
        }
    }

    fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    fn maintain(&self) {
        let now = Instant::now();
        let expired = |s: &Shared| now.duration_since(s.lock().last_publish) >= self.history_ttl;
        let mut keeper = self.keeper.lock();
        let mut dropped = Vec::new();
        self.streams.remove_where(expired, |name, stream| {
            let mut s = stream.lock();
            if now.duration_since(s.last_publish) < self.history_ttl {
                return false;
            }
            s.gone = true;
            dropped.push((name.clone(), s.history.last_id()));
            true
        });
        if !dropped.is_empty() {
            for (name, last) in dropped {
                self.forget(&mut keeper, &name, last);
            }
            keeper.order.retain(|(s, _)| !s.lock().gone);
        }
    }
}

impl MemoryBroker {
    /// The newest id of `channel` ([`MessageId::ZERO`] when unknown).
    pub fn last_id(&self, channel: &str) -> MessageId {
        self.stream(channel)
            .map_or(MessageId::ZERO, |s| s.lock().history.last_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Lookup;

    #[tokio::test]
    async fn publishes_in_order_and_expires() {
        let b = MemoryBroker::new(2, Duration::from_millis(50), 10);
        let mut ids = Vec::new();
        for i in 0..3 {
            let m = b
                .publish("a", "text/plain".into(), Bytes::from(format!("{i}")))
                .await
                .unwrap();
            ids.push(m.id);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let h = b.history("a").await.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.floor(), ids[0]);
        assert_eq!(b.last_id("a"), ids[2]);
        tokio::time::sleep(Duration::from_millis(60)).await;
        b.maintain();
        assert!(b.history("a").await.unwrap().is_empty());
        assert_eq!(b.last_id("a"), MessageId::ZERO);
    }

    /// A sink that says every channel in its list is held.
    struct Holding(Mutex<Vec<String>>);

    /// Room that takes a message and does nothing with it.
    struct Nowhere;

    impl crate::broker::Room for Nowhere {
        fn deliver(self: Box<Self>, _: Arc<Message>) {}
    }

    #[async_trait]
    impl Sink for Holding {
        fn deliver(&self, _: Arc<Message>) -> bool {
            true
        }
        async fn room(&self) -> Box<dyn crate::broker::Room> {
            Box::new(Nowhere)
        }
        async fn resync(&self, _: &str, _: History) {}
        fn is_held(&self, channel: &str) -> bool {
            self.0.lock().iter().any(|c| c == channel)
        }
    }

    async fn put(b: &MemoryBroker, channel: &str) -> Result<MessageId, BrokerError> {
        let m = b
            .publish(channel, "text/plain".into(), Bytes::new())
            .await?;
        Ok(m.id)
    }

    #[tokio::test]
    async fn keeps_at_most_max_kept_evicting_the_least_recently_published_unheld() {
        let b = MemoryBroker::new(5, Duration::from_secs(60), 3);
        let held = Arc::new(Holding(Mutex::new(vec!["a".into()])));
        b.set_sink(held.clone());
        let a = put(&b, "a").await.unwrap();
        let b1 = put(&b, "b").await.unwrap();
        let c1 = put(&b, "c").await.unwrap();
        put(&b, "b").await.unwrap(); // b is now more recent than c
        put(&b, "d").await.unwrap(); // a is held: c goes
        assert_eq!(b.keeper.lock().kept, 3);
        assert_eq!(b.last_id("c"), MessageId::ZERO);
        assert_eq!(b.last_id("a"), a);
        assert!(b.last_id("b") > b1);
        // The dropped channel starts again from its newest id: 0-0 is a gap.
        let c = b.history("c").await.unwrap();
        assert_eq!(c.floor(), c1);
        assert!(matches!(c.lookup(MessageId::ZERO, 10), Lookup::Gap(_)));
        assert!(matches!(c.lookup(c.floor(), 10), Lookup::UpToDate));
        // Every kept channel held: refused, nothing dropped.
        held.0.lock().extend(["b".into(), "d".into()]);
        assert_eq!(put(&b, "e").await, Err(BrokerError::TooManyChannels(3)));
        assert_eq!(b.keeper.lock().kept, 3);
        // Published again, c's ids go on past its floor.
        held.0.lock().clear();
        let c2 = put(&b, "c").await.unwrap();
        assert!(c2 > c.floor());
        assert_eq!(b.keeper.lock().kept, 3);
    }
}
