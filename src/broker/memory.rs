//! The in-process broker behind `memory://`: one instance, no dependencies.
//!
//! Channels live in a sharded map so that publishes to different channels do
//! not contend. A publish assigns the id, appends to the history and hands the
//! message to the sink while holding its channel's lock, so announcements of
//! one channel leave in id order.

use super::{Broker, BrokerError, Sink};
use crate::history::History;
use crate::message::{Message, MessageId};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;

struct Stream {
    history: History,
    last_publish: Instant,
}

/// The memory broker. Histories keep `history` messages each and vanish
/// `history_ttl` after their last publish.
pub struct MemoryBroker {
    shards: Vec<RwLock<HashMap<Arc<str>, Arc<Mutex<Stream>>>>>,
    hasher: RandomState,
    sink: OnceLock<Arc<dyn Sink>>,
    history: usize,
    history_ttl: Duration,
}

impl MemoryBroker {
    /// A broker keeping `history` messages per channel for `history_ttl`.
    pub fn new(history: usize, history_ttl: Duration) -> MemoryBroker {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            sink: OnceLock::new(),
            history,
            history_ttl,
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<Arc<str>, Arc<Mutex<Stream>>>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    fn stream(&self, channel: &str) -> Option<Arc<Mutex<Stream>>> {
        self.shard(channel).read().get(channel).cloned()
    }

    fn stream_or_create(&self, channel: &str) -> (Arc<str>, Arc<Mutex<Stream>>) {
        let shard = self.shard(channel);
        if let Some((name, s)) = shard.read().get_key_value(channel) {
            return (name.clone(), s.clone());
        }
        let mut map = shard.write();
        if let Some((name, s)) = map.get_key_value(channel) {
            return (name.clone(), s.clone());
        }
        let name: Arc<str> = channel.into();
        let stream = Arc::new(Mutex::new(Stream {
            history: History::new(self.history),
            last_publish: Instant::now(),
        }));
        map.insert(name.clone(), stream.clone());
        (name, stream)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(
        &self,
        channel: &str,
        content_type: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError> {
        let (name, stream) = self.stream_or_create(channel);
        let mut s = stream.lock();
        let id = s.history.last_id().next_after();
        let message = Arc::new(Message::new(id, name, content_type, data));
        s.history.push(message.clone());
        s.last_publish = Instant::now();
        if let Some(sink) = self.sink.get() {
            sink.deliver(message.clone());
        }
        Ok(message)
    }

    async fn history(&self, channel: &str) -> Result<History, BrokerError> {
        Ok(match self.stream(channel) {
            Some(s) => s.lock().history.clone(),
            None => History::new(self.history),
        })
    }

    fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    fn maintain(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let expired = |s: &Arc<Mutex<Stream>>| {
                now.duration_since(s.lock().last_publish) >= self.history_ttl
            };
            if shard.read().values().any(expired) {
                shard.write().retain(|_, s| !expired(s));
            }
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

    #[tokio::test]
    async fn publishes_in_order_and_expires() {
        let b = MemoryBroker::new(2, Duration::from_millis(50));
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
}
