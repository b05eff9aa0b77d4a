//! The in-process broker behind `memory://`: one instance, no dependencies.
//!
//! Channels live in a sharded map so that publishes to different channels do
//! not contend. A publish assigns the id, appends to the history and hands the
//! message to the sink while holding its channel's lock, so announcements of
//! one channel leave in id order. Before that, it waits for room in the
//! sink's bounded queue ([`Sink::room`]): publishers faster than delivery
//! are slowed down, and no message is dropped.

use super::{Broker, BrokerError, Sink};
use crate::cursor::Epoch;
use crate::history::History;
use crate::message::{Message, MessageId};
use crate::shards::ShardedMap;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Stream {
    name: Arc<str>,
    history: History,
    last_publish: Instant,
}

/// The memory broker. Histories keep `history` messages each and vanish
/// `history_ttl` after their last publish.
pub struct MemoryBroker {
    streams: ShardedMap<Arc<Mutex<Stream>>>,
    sink: OnceLock<Arc<dyn Sink>>,
    history: usize,
    history_ttl: Duration,
    /// This process's start (ms since the Unix epoch): its history's epoch.
    epoch: Epoch,
}

impl MemoryBroker {
    /// A broker keeping `history` messages per channel for `history_ttl`.
    pub fn new(history: usize, history_ttl: Duration) -> MemoryBroker {
        MemoryBroker {
            streams: ShardedMap::default(),
            sink: OnceLock::new(),
            history,
            history_ttl,
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as Epoch),
        }
    }

    fn stream(&self, channel: &str) -> Option<Arc<Mutex<Stream>>> {
        self.streams.get(channel)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    async fn publish(
        &self,
        channel: &str,
        content_type: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError> {
        let stream = self.streams.get_or_insert_with(channel, |name| {
            Arc::new(Mutex::new(Stream {
                name: name.clone(),
                history: History::new(self.history),
                last_publish: Instant::now(),
            }))
        });
        // Room in the hub's delivery queue first, outside the lock: a
        // publish faster than delivery waits here, so nothing queues
        // without bound and nothing is refused.
        let room = match self.sink.get() {
            Some(sink) => Some(sink.room().await),
            None => None,
        };
        let mut s = stream.lock();
        let id = s.history.last_id().next_after();
        let message = Arc::new(Message::new(id, s.name.clone(), content_type, data));
        s.history.push(message.clone());
        s.last_publish = Instant::now();
        if let Some(room) = room {
            room.deliver(message.clone());
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
        let expired =
            |s: &Arc<Mutex<Stream>>| now.duration_since(s.lock().last_publish) >= self.history_ttl;
        self.streams.remove_where(expired, |_, s| expired(s));
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
