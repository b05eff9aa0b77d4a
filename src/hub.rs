//! The hub: this instance's channels, their held waiters and local windows.
//!
//! Each channel the instance serves has a window (a [`History`] mirroring the
//! broker's) and the waiters held on it. A poll is answered from the window
//! when it can be; otherwise its waiter is registered on every channel of the
//! subscription. A message announced by the broker is appended to the window
//! and wakes all of the channel's waiters at once: waiters sharing a cursor
//! share one encoded [`Answer`], and no broker call is made per waiter.
//!
//! Channels are spread over sharded maps and each has its own lock, so
//! publishes to different channels never contend.

use crate::answer::{Answer, Format};
use crate::broker::{Broker, BrokerError, Sink};
use crate::cursor::Cursor;
use crate::history::{History, Lookup};
use crate::message::{Message, MessageId};
use crate::metrics;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OnceCell};

const SHARDS: usize = 64;

/// What a poll without a cursor starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    /// Hold for the next message.
    Newest,
    /// Answer with the retained history first.
    Oldest,
}

/// The result of a poll.
pub enum Poll {
    /// Messages (or a gap) to answer with at once.
    Ready(Arc<Answer>),
    /// Nothing new: the poll is registered and waits.
    Held(Held),
}

/// A registered poll. Dropping it deregisters the waiter.
pub struct Held {
    /// Resolves with the answer when a message arrives.
    pub wake: oneshot::Receiver<Arc<Answer>>,
    /// The subscription's cursor while it waits (the timeout answer's cursor).
    pub cursor: Cursor,
    _registration: Registration,
}

struct Waiter {
    id: u64,
    cursor: Cursor,
    format: Format,
    fired: AtomicBool,
    tx: Mutex<Option<oneshot::Sender<Arc<Answer>>>>,
}

impl Waiter {
    /// Hands the answer over; false when another channel was faster.
    fn fire(&self, answer: Arc<Answer>) -> bool {
        self.fired.store(true, Ordering::Relaxed);
        match self.tx.lock().take() {
            Some(tx) => tx.send(answer).is_ok(),
            None => false,
        }
    }
}

/// Removes a waiter from its channels when the poll ends.
struct Registration {
    waiter: Arc<Waiter>,
    channels: Vec<Arc<Channel>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A single-channel waiter that fired was already taken off its channel.
        if self.channels.len() == 1 && self.waiter.fired.load(Ordering::Relaxed) {
            return;
        }
        for ch in &self.channels {
            ch.state.lock().remove_waiter(self.waiter.id);
        }
    }
}

struct Channel {
    name: Arc<str>,
    ready: OnceCell<()>,
    state: Mutex<ChannelState>,
}

struct ChannelState {
    window: History,
    /// Messages announced before the window was loaded.
    early: Vec<Arc<Message>>,
    synced: bool,
    removed: bool,
    waiters: HashMap<u64, (Arc<Waiter>, usize)>,
    idle_since: Instant,
}

impl ChannelState {
    fn remove_waiter(&mut self, id: u64) {
        if self.waiters.remove(&id).is_some() && self.waiters.is_empty() {
            self.idle_since = Instant::now();
        }
    }
}

/// Per-instance registry of channels and held polls.
pub struct Hub {
    shards: Vec<RwLock<HashMap<Arc<str>, Arc<Channel>>>>,
    hasher: RandomState,
    broker: Arc<dyn Broker>,
    history: usize,
    linger: Duration,
    next_waiter: AtomicU64,
}

/// Information about one channel (the publish API's channel info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub last_id: MessageId,
    pub history: usize,
    pub subscribers: usize,
}

impl Hub {
    /// A hub over `broker`, keeping windows of `history` messages and
    /// forgetting a channel `linger` after its last waiter left. The hub
    /// registers itself as the broker's sink.
    pub fn new(broker: Arc<dyn Broker>, history: usize, linger: Duration) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            broker: broker.clone(),
            history,
            linger,
            next_waiter: AtomicU64::new(1),
        });
        broker.set_sink(Arc::new(HubSink(Arc::downgrade(&hub))));
        hub
    }

    /// The broker this hub serves from.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    fn shard(&self, name: &str) -> &RwLock<HashMap<Arc<str>, Arc<Channel>>> {
        &self.shards[self.hasher.hash_one(name) as usize % SHARDS]
    }

    fn lookup_channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.shard(name).read().get(name).cloned()
    }

    /// Returns the channel, creating it and loading its window on first use.
    async fn channel(&self, name: &str) -> Result<Arc<Channel>, BrokerError> {
        let ch = match self.lookup_channel(name) {
            Some(ch) => ch,
            None => {
                let mut map = self.shard(name).write();
                map.entry(name.into())
                    .or_insert_with(|| {
                        metrics::CHANNELS_ACTIVE.inc();
                        self.broker.watch(name);
                        Arc::new(Channel {
                            name: name.into(),
                            ready: OnceCell::new(),
                            state: Mutex::new(ChannelState {
                                window: History::new(self.history),
                                early: Vec::new(),
                                synced: false,
                                removed: false,
                                waiters: HashMap::new(),
                                idle_since: Instant::now(),
                            }),
                        })
                    })
                    .clone()
            }
        };
        ch.ready
            .get_or_try_init(|| async {
                let history = self.broker.history(&ch.name).await?;
                let mut st = ch.state.lock();
                st.window = history;
                for m in std::mem::take(&mut st.early) {
                    st.window.push(m);
                }
                st.synced = true;
                Ok::<(), BrokerError>(())
            })
            .await?;
        Ok(ch)
    }

    /// Answers a poll on `names` from `cursor` (or `first` without one):
    /// at once when there is something to send, else by registering a waiter.
    pub async fn poll(
        &self,
        names: &[String],
        cursor: Option<Cursor>,
        first: First,
        format: Format,
    ) -> Result<Poll, BrokerError> {
        let limit = format.limit();
        loop {
            let mut channels = Vec::with_capacity(names.len());
            for name in names {
                channels.push(self.channel(name).await?);
            }
            let start = match &cursor {
                Some(c) => c.clone(),
                None => Cursor(
                    channels
                        .iter()
                        .map(|ch| {
                            let st = ch.state.lock();
                            match first {
                                First::Newest => st.window.last_id(),
                                First::Oldest => st.window.floor(),
                            }
                        })
                        .collect(),
                ),
            };
            let (start, gap, found) = self.collect(&channels, start, limit).await?;
            if gap || !found.is_empty() {
                return Ok(Poll::Ready(Arc::new(Answer::build(
                    format, &start, gap, &found,
                ))));
            }
            if let Some(held) = self.register(channels, start, format) {
                return Ok(Poll::Held(held));
            }
        }
    }

    /// Gathers messages newer than `start` over all channels, oldest first
    /// and at most `limit`. Returns the start cursor with lost positions
    /// reset, whether any was lost, and the messages with their channel index.
    async fn collect(
        &self,
        channels: &[Arc<Channel>],
        mut start: Cursor,
        limit: usize,
    ) -> Result<(Cursor, bool, Vec<(usize, Arc<Message>)>), BrokerError> {
        let mut gap = false;
        let mut found = Vec::new();
        for (i, ch) in channels.iter().enumerate() {
            let (lookup, floor) = {
                let st = ch.state.lock();
                (st.window.lookup(start.0[i], limit), st.window.floor())
            };
            let (lookup, floor) = match lookup {
                // Possibly published elsewhere and not yet announced here.
                Lookup::Ahead => {
                    let h = self.broker.history(&ch.name).await?;
                    match h.lookup(start.0[i], limit) {
                        Lookup::Ahead => {
                            gap = true;
                            start.0[i] = h.last_id();
                            continue;
                        }
                        other => (other, h.floor()),
                    }
                }
                other => (other, floor),
            };
            match lookup {
                Lookup::UpToDate | Lookup::Ahead => {}
                Lookup::Newer(v) => found.extend(v.into_iter().map(|m| (i, m))),
                Lookup::Gap(v) => {
                    gap = true;
                    start.0[i] = floor;
                    found.extend(v.into_iter().map(|m| (i, m)));
                }
            }
        }
        if channels.len() > 1 {
            found.sort_by_key(|(_, m)| m.id);
        }
        found.truncate(limit);
        Ok((start, gap, found))
    }

    /// Registers a waiter on every channel at `cursor`. Returns None when a
    /// channel moved past the cursor meanwhile (poll again).
    fn register(
        &self,
        channels: Vec<Arc<Channel>>,
        cursor: Cursor,
        format: Format,
    ) -> Option<Held> {
        let (tx, rx) = oneshot::channel();
        let waiter = Arc::new(Waiter {
            id: self.next_waiter.fetch_add(1, Ordering::Relaxed),
            cursor: cursor.clone(),
            format,
            fired: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
        });
        let mut registration = Registration {
            waiter: waiter.clone(),
            channels: Vec::with_capacity(channels.len()),
        };
        for (i, ch) in channels.into_iter().enumerate() {
            {
                let mut st = ch.state.lock();
                if st.removed || st.window.last_id() != cursor.0[i] {
                    return None; // `registration` drops and deregisters
                }
                st.waiters.insert(waiter.id, (waiter.clone(), i));
            }
            registration.channels.push(ch);
        }
        Some(Held {
            wake: rx,
            cursor,
            _registration: registration,
        })
    }

    /// Appends an announced message to its channel's window and wakes every
    /// waiter of the channel. Messages of channels nobody polls here are
    /// ignored (the broker keeps them).
    pub fn deliver(&self, message: Arc<Message>) {
        let Some(ch) = self.lookup_channel(&message.channel) else {
            return;
        };
        let waiters = {
            let mut st = ch.state.lock();
            if !st.synced {
                st.early.push(message);
                return;
            }
            if !st.window.push(message.clone()) {
                return;
            }
            st.idle_since = Instant::now();
            std::mem::take(&mut st.waiters)
        };
        let mut answers: HashMap<(Format, usize, &Cursor), Arc<Answer>> = HashMap::new();
        for (waiter, index) in waiters.values() {
            let answer = answers
                .entry((waiter.format, *index, &waiter.cursor))
                .or_insert_with(|| {
                    Arc::new(Answer::build(
                        waiter.format,
                        &waiter.cursor,
                        false,
                        &[(*index, message.clone())],
                    ))
                })
                .clone();
            waiter.fire(answer);
        }
    }

    /// Channel facts for the publish API.
    pub async fn info(&self, name: &str) -> Result<ChannelInfo, BrokerError> {
        let history = self.broker.history(name).await?;
        let subscribers = self
            .lookup_channel(name)
            .map_or(0, |ch| ch.state.lock().waiters.len());
        Ok(ChannelInfo {
            last_id: history.last_id(),
            history: history.len(),
            subscribers,
        })
    }

    /// Forgets channels that have had no waiter for `linger`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let stale = |st: &ChannelState| {
            st.synced && st.waiters.is_empty() && now.duration_since(st.idle_since) >= self.linger
        };
        for shard in &self.shards {
            if !shard.read().values().any(|ch| stale(&ch.state.lock())) {
                continue;
            }
            shard.write().retain(|name, ch| {
                // Checked and marked under one lock, so no waiter slips in.
                let mut st = ch.state.lock();
                if !stale(&st) {
                    return true;
                }
                st.removed = true;
                self.broker.unwatch(name);
                metrics::CHANNELS_ACTIVE.dec();
                false
            });
        }
    }
}

/// The hub as the broker's sink; weak so that the two do not keep each other.
struct HubSink(Weak<Hub>);

impl Sink for HubSink {
    fn deliver(&self, message: Arc<Message>) {
        if let Some(hub) = self.0.upgrade() {
            hub.deliver(message);
        }
    }
}
