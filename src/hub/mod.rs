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
//! publishes to different channels never contend. The broker's side
//! (announcements, delivery, resync) is in `hub/delivery.rs`.

use crate::answer::{Answer, Format};
use crate::broker::{Broker, BrokerError};
use crate::cursor::Cursor;
use crate::history::{History, Lookup};
use crate::message::{Message, MessageId};
use crate::metrics;
use crate::shards::ShardedMap;
use crate::waiter::{Answerer, Waiter, Wake};
use delivery::{Announcement, HubSink};
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OnceCell, Semaphore};

/// What a poll without a cursor starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    /// Hold for the next message.
    Newest,
    /// Answer with the retained history first.
    Oldest,
}

/// How long a broker read that confirmed a cursor ahead of a channel is
/// reused for other such cursors, so that made-up cursors cost at most one
/// broker read per channel per this period.
const AHEAD_CHECK_REUSE: Duration = Duration::from_secs(1);

/// Announcements waiting for the delivery task, at most, by default
/// (`broker.delivery_queue`): as many as the Redis broker's own queue of
/// pushes, so that an instance holds at most twice that between Redis and
/// its waiters.
pub const DELIVERY_QUEUE: usize = 8192;

/// Why the hub could not serve a poll (a 503 for the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// The broker failed or is saturated.
    Broker(BrokerError),
    /// Opening one more channel would pass `limits.max_active_channels`
    /// (the limit).
    TooManyChannels(usize),
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubError::Broker(e) => e.fmt(f),
            HubError::TooManyChannels(max) => write!(
                f,
                "this instance already has {max} active channels (limits.max_active_channels)"
            ),
        }
    }
}

impl std::error::Error for HubError {}

impl From<BrokerError> for HubError {
    fn from(e: BrokerError) -> Self {
        HubError::Broker(e)
    }
}

/// The result of a poll.
pub enum Polled {
    /// Messages (or a gap) to answer with at once.
    Ready(Arc<Answer>),
    /// Nothing new: the poll is registered and waits.
    Held(Held),
}

/// A registered poll. Dropping it deregisters the waiter (and stops it).
pub struct Held {
    registration: Registration,
}

impl Held {
    /// The subscription's cursor while it waits (the timeout answer's
    /// cursor).
    pub fn cursor(&self) -> &Cursor {
        &self.registration.waiter().cursor
    }

    /// Resolves with the poll's wake-up: a message arrived, the poll must
    /// be redone, or the instance drains. Resolves once: await it again
    /// after that and it never does.
    pub fn woken(&mut self) -> impl Future<Output = Wake> + Send + '_ {
        self.registration.waiter().woken()
    }

    /// Stops the poll's wake-up: once this returns, no answer is written
    /// for it ([`Answerer::answer`]). Returns the wake-up that came first,
    /// if one did and was not taken by [`Held::woken`]; one being handed
    /// over (its answer being written, without blocking) is waited out.
    /// Dropping a `Held` stops it too.
    pub fn stop(&mut self) -> Option<Wake> {
        self.registration.waiter().stop()
    }

    /// Counts the poll in `pollgate_held_requests` until it is dropped, or
    /// its answer is settled from the delivering task ([`Answerer::answer`]).
    pub fn count_held(&self) {
        self.registration.waiter().count_held();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop();
        self.registration.waiter().uncount_held();
    }
}

/// Removes a waiter from its channels when the poll ends (and gives it
/// back for the thread's next poll, [`Waiter::recycle`]).
struct Registration {
    /// Taken only when the registration drops.
    waiter: Option<Arc<Waiter>>,
    channels: Channels,
}

impl Registration {
    fn waiter(&self) -> &Waiter {
        self.waiter
            .as_deref()
            .expect("a registration's waiter is taken when it drops")
    }
}

/// The channels of one poll (one, as a rule).
type Channels = SmallVec<[Arc<Channel>; 1]>;

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        // A single-channel waiter that fired was already taken off its channel.
        if !(self.channels.len() == 1 && waiter.fired.load(Ordering::Relaxed)) {
            for ch in &self.channels {
                ch.state.lock().remove_waiter(waiter.id);
            }
        }
        Waiter::recycle(waiter);
    }
}

struct Channel {
    name: Arc<str>,
    ready: OnceCell<()>,
    state: Mutex<ChannelState>,
    /// The last broker read made for a cursor ahead of the window, shared
    /// by such polls for [`AHEAD_CHECK_REUSE`].
    ahead_check: Mutex<Option<(Instant, Arc<OnceCell<History>>)>>,
}

/// A channel's held waiters by id, with their index in the waiter's
/// channel list.
type Waiters = HashMap<u64, (Arc<Waiter>, usize), ahash::RandomState>;

/// Wakes every one of `waiters` (taken from their channel, whose lock is
/// no longer held) with what `wake` makes.
fn fire_all(waiters: Waiters, wake: impl Fn() -> Wake) {
    for (waiter, _) in waiters.into_values() {
        waiter.fire(wake());
    }
}

struct ChannelState {
    window: History,
    /// Messages announced before the window was loaded.
    early: Vec<Arc<Message>>,
    synced: bool,
    removed: bool,
    waiters: Waiters,
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
    channels: ShardedMap<Arc<Channel>>,
    /// Room for more channels: `max_channels` permits, one taken (and
    /// forgotten) per channel in `channels`, added back when it is removed.
    room: Semaphore,
    max_channels: usize,
    broker: Arc<dyn Broker>,
    history: usize,
    linger: Duration,
    next_waiter: AtomicU64,
    /// Where the broker's announcements go once [`Hub::run_deliveries`]
    /// runs (before that, they are handled on the broker's task).
    deliveries: OnceLock<mpsc::Sender<Announcement>>,
    /// Most announcements waiting in `deliveries` (`broker.delivery_queue`).
    delivery_queue: usize,
    /// Runs once between a poll's lookup and its registration (tests).
    #[cfg(test)]
    before_register: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Test hook: runs after a poll's waiter joined its first channel.
    #[cfg(test)]
    between_channels: Mutex<Option<WaiterHook>>,
}

/// Information about one channel (the publish API's channel info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub last_id: MessageId,
    pub history: usize,
    pub subscribers: usize,
    /// Across the fleet (this instance's count on a broker without one).
    pub subscribers_total: usize,
}

impl Hub {
    /// A hub over `broker`, keeping windows of `history` messages,
    /// forgetting a channel `linger` after its last waiter left, and holding
    /// at most `max_channels` channels, with at most `delivery_queue`
    /// announcements waiting for its delivery task. The hub registers
    /// itself as the broker's sink. Returns the hub, shared.
    pub fn new(
        broker: Arc<dyn Broker>,
        history: usize,
        linger: Duration,
        max_channels: usize,
        delivery_queue: usize,
    ) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            channels: ShardedMap::default(),
            room: Semaphore::new(max_channels.min(Semaphore::MAX_PERMITS)),
            max_channels: max_channels.min(Semaphore::MAX_PERMITS),
            broker: broker.clone(),
            history,
            linger,
            next_waiter: AtomicU64::new(1),
            deliveries: OnceLock::new(),
            delivery_queue,
            #[cfg(test)]
            before_register: Mutex::new(None),
            #[cfg(test)]
            between_channels: Mutex::new(None),
        });
        broker.set_sink(Arc::new(HubSink(Arc::downgrade(&hub))));
        hub
    }

    /// Wakes every held poll with [`Wake::Drain`], once the instance
    /// drains. A poll registered after its channel was swept here must see
    /// the drain itself: it checks [`Lifecycle::is_draining`] after
    /// registering, and the drain sets that flag before calling this, so
    /// each poll is released by one or the other.
    ///
    /// [`Lifecycle::is_draining`]: crate::lifecycle::Lifecycle::is_draining
    pub fn release_all(&self) {
        for ch in self.channels.values() {
            let waiters = std::mem::take(&mut ch.state.lock().waiters);
            fire_all(waiters, || Wake::Drain);
        }
    }

    /// The broker this hub serves from.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Whether the broker has been reached at least once since start.
    pub fn broker_reached(&self) -> bool {
        self.broker.reached()
    }

    fn lookup_channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels.get(name)
    }

    /// Returns the channel, creating it (within `max_channels`) and loading
    /// its window on first use.
    async fn channel(&self, name: &str) -> Result<Arc<Channel>, HubError> {
        let ch = match self.channels.get(name) {
            Some(ch) => ch,
            None => {
                // Room is taken before creating, so that racing polls cannot
                // pass the limit; given back when another poll created it.
                let permit = self
                    .room
                    .try_acquire()
                    .map_err(|_| HubError::TooManyChannels(self.max_channels))?;
                let mut created = false;
                let ch = self.channels.get_or_insert_with(name, |name| {
                    created = true;
                    Arc::new(Channel {
                        name: name.clone(),
                        ready: OnceCell::new(),
                        state: Mutex::new(ChannelState {
                            window: History::new(self.history),
                            early: Vec::new(),
                            synced: false,
                            removed: false,
                            waiters: Waiters::default(),
                            idle_since: Instant::now(),
                        }),
                        ahead_check: Mutex::new(None),
                    })
                });
                if created {
                    permit.forget();
                    metrics::CHANNELS_ACTIVE.inc();
                }
                ch
            }
        };
        ch.ready
            .get_or_try_init(|| async {
                self.broker.watch(&ch.name).await?;
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

    /// The broker's history of `ch`, read for a cursor ahead of its window:
    /// concurrent and later callers within [`AHEAD_CHECK_REUSE`] share one
    /// read.
    async fn ahead_check(&self, ch: &Channel) -> Result<History, BrokerError> {
        let cell = {
            let mut check = ch.ahead_check.lock();
            match &*check {
                Some((at, cell)) if at.elapsed() < AHEAD_CHECK_REUSE => cell.clone(),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    *check = Some((Instant::now(), cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| self.broker.history(&ch.name))
            .await
            .cloned()
    }

    /// Answers a poll on `names` from `cursor` (or `first` without one):
    /// at once when there is something to send, else by registering a waiter.
    pub async fn poll(
        &self,
        names: &[impl AsRef<str> + Sync],
        cursor: Option<Cursor>,
        first: First,
        format: Format,
    ) -> Result<Polled, HubError> {
        self.poll_answered_by(names, cursor, first, format, None)
            .await
    }

    /// Holds a poll on `names` at `cursor` without awaiting anything, in
    /// the common case: every channel is known and synced here and the
    /// cursor is at each one's newest message. None when the poll needs
    /// more (a channel to load, messages to answer with, a broker check):
    /// [`Hub::poll_answered_by`] then serves it.
    pub fn hold_now(
        &self,
        names: &[impl AsRef<str>],
        cursor: &Cursor,
        format: Format,
        answerer: Option<&Arc<dyn Answerer>>,
    ) -> Option<Held> {
        if cursor.1 != Some(self.broker.epoch()) {
            return None; // another history's, or issued before epochs
        }
        let mut channels = Channels::with_capacity(names.len());
        for name in names {
            let ch = self.channels.get(name.as_ref())?;
            ch.ready.get()?;
            channels.push(ch);
        }
        // Registering checks that the cursor is at the newest message.
        self.register(channels, cursor.clone(), format, answerer.cloned())
    }

    /// [`Hub::poll`], with the answer of a held poll written by `answerer`
    /// from the delivering task when it can.
    pub async fn poll_answered_by(
        &self,
        names: &[impl AsRef<str> + Sync],
        cursor: Option<Cursor>,
        first: First,
        format: Format,
        answerer: Option<Arc<dyn Answerer>>,
    ) -> Result<Polled, HubError> {
        let limit = format.limit();
        let mut cursor = cursor;
        // A cursor of another history: every position is lost.
        let mut other_history = false;
        loop {
            let mut channels = Channels::with_capacity(names.len());
            for name in names {
                channels.push(self.channel(name.as_ref()).await?);
            }
            let epoch = self.broker.epoch();
            let mut start = match &cursor {
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
                    Some(epoch),
                ),
            };
            if start.1.is_some_and(|e| e != epoch) {
                // Answered from each channel's floor: what is retained.
                other_history = true;
                for (i, ch) in channels.iter().enumerate() {
                    start.0[i] = ch.state.lock().window.floor();
                }
            }
            start.1 = Some(epoch);
            // Tried again (a message came meanwhile), a poll without cursor
            // goes on from this start: what came is for it.
            cursor = Some(start.clone());
            let (start, gap, found) = self.collect(&channels, start, limit).await?;
            let gap = gap || other_history;
            if gap || !found.is_empty() {
                return Ok(Polled::Ready(Arc::new(Answer::build(
                    format, &start, gap, &found,
                ))));
            }
            #[cfg(test)]
            if let Some(hook) = self.before_register.lock().take() {
                hook();
            }
            if let Some(held) = self.register(channels, start, format, answerer.clone()) {
                return Ok(Polled::Held(held));
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
    ) -> Result<(Cursor, bool, Vec<(usize, Arc<Message>)>), HubError> {
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
                    let h = self.ahead_check(ch).await?;
                    self.catch_up_window(ch, &h);
                    match h.lookup(start.0[i], limit) {
                        // Unknown to the broker too: a gap, from what is retained.
                        Lookup::Ahead => (h.lookup(h.floor(), limit).into_gap(), h.floor()),
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

    /// Delivers what the broker's history `h` holds past the channel's
    /// window (published elsewhere, not announced here yet).
    fn catch_up_window(&self, ch: &Channel, h: &History) {
        let last = ch.state.lock().window.last_id();
        if let Lookup::Newer(missed) = h.lookup(last, usize::MAX) {
            for m in missed {
                self.deliver(m);
            }
        }
    }

    /// Registers a waiter on every channel at `cursor`. Returns None when a
    /// channel moved past the cursor meanwhile (poll again).
    fn register(
        &self,
        channels: Channels,
        cursor: Cursor,
        format: Format,
        answerer: Option<Arc<dyn Answerer>>,
    ) -> Option<Held> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter::shared(id, cursor, format, answerer);
        let mut registration = Registration {
            waiter: Some(waiter.clone()),
            channels: Channels::with_capacity(channels.len()),
        };
        for (i, ch) in channels.into_iter().enumerate() {
            let moved = {
                let mut st = ch.state.lock();
                let moved = st.removed || st.window.last_id() != waiter.cursor.0[i];
                if !moved {
                    st.waiters.insert(waiter.id, (waiter.clone(), i));
                }
                moved
            };
            if moved {
                // A delivery may have taken the waiter from a channel
                // registered before: then its wake-up is the answer (and
                // may be on the wire already), not a poll started over.
                if waiter.withdraw() {
                    return None; // `registration` drops and deregisters
                }
                break;
            }
            registration.channels.push(ch);
            #[cfg(test)]
            if let Some(hook) = self.between_channels.lock().take() {
                hook(&waiter);
            }
        }
        Some(Held { registration })
    }

    /// Returns true while a poll is held on `name` here (its channel has
    /// waiters).
    pub fn holds(&self, name: &str) -> bool {
        self.lookup_channel(name)
            .is_some_and(|ch| !ch.state.lock().waiters.is_empty())
    }

    /// Channels active on this instance now.
    pub fn active_channels(&self) -> usize {
        self.max_channels - self.room.available_permits()
    }

    /// Channel facts for the publish API.
    pub async fn info(&self, name: &str) -> Result<ChannelInfo, BrokerError> {
        let history = self.broker.history(name).await?;
        let subscribers = self
            .lookup_channel(name)
            .map_or(0, |ch| ch.state.lock().waiters.len());
        // This instance's own count as it is now, not as last shared.
        let subscribers_total = subscribers + self.broker.others_occupancy(name).await?;
        Ok(ChannelInfo {
            last_id: history.last_id(),
            history: history.len(),
            subscribers,
            subscribers_total,
        })
    }

    /// Each channel of this instance with its subscribers (held polls and
    /// SSE streams) now.
    pub fn occupancy(&self) -> Vec<(Arc<str>, usize)> {
        self.channels
            .values()
            .into_iter()
            .map(|ch| (ch.name.clone(), ch.state.lock().waiters.len()))
            .collect()
    }

    /// Shares this instance's subscriber counts with the fleet
    /// ([`Broker::report_occupancy`]): those that changed since `last` (the
    /// counts shared before, updated), or, when `all`, every channel with
    /// subscribers. Given up after a second: the next call tries again.
    pub async fn share_occupancy(&self, last: &mut HashMap<Arc<str>, usize>, all: bool) {
        let now: HashMap<Arc<str>, usize> = self.occupancy().into_iter().collect();
        let mut changed: Vec<(Arc<str>, usize)> = now
            .iter()
            .filter(|(name, n)| (all && **n > 0) || last.get(*name).copied().unwrap_or(0) != **n)
            .map(|(name, n)| (name.clone(), *n))
            .collect();
        for (name, n) in last.iter() {
            if *n > 0 && !now.contains_key(name) {
                changed.push((name.clone(), 0));
            }
        }
        let report = self.broker.report_occupancy(&changed);
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), report).await {
            *last = now.into_iter().filter(|(_, n)| *n > 0).collect();
        }
    }

    /// Forgets channels that have had no waiter for `linger`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let stale = |st: &ChannelState| {
            st.waiters.is_empty() && now.duration_since(st.idle_since) >= self.linger
        };
        self.channels.remove_where(
            |ch| stale(&ch.state.lock()),
            |name, ch| {
                // Checked and marked under one lock, so no waiter slips in.
                let mut st = ch.state.lock();
                if !stale(&st) {
                    return false;
                }
                st.removed = true;
                self.broker.unwatch(name);
                self.room.add_permits(1);
                metrics::CHANNELS_ACTIVE.dec();
                true
            },
        );
    }
}

/// A test hook given a poll's waiter.
#[cfg(test)]
type WaiterHook = Box<dyn FnOnce(&Arc<Waiter>) + Send>;

mod delivery;

#[cfg(test)]
mod tests;
