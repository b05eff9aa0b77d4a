//! The hub's side that faces the broker: announced messages are appended
//! to their channel's window and wake every waiter of the channel at once,
//! waiters sharing a cursor sharing one encoded [`Answer`]; a resync after
//! a reconnect delivers what was missed. Announcements are handled in
//! order on one task on the runtime of the held polls
//! ([`Hub::run_deliveries`]): no wake-up across runtimes per poll.

use super::{fire_all, Hub, Waiters};
use crate::answer::{Answer, Format};
use crate::broker::{Room, Sink};
use crate::cursor::Cursor;
use crate::history::{History, Lookup};
use crate::message::{Message, MessageId};
use crate::metrics;
use crate::prefetch;
use crate::waiter::Wake;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;
use tokio::sync::mpsc;

impl Hub {
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
                if st.window.contains(message.id) {
                    return; // delivered twice: nothing new
                }
                // An id below the newest: the channel's history was deleted
                // and started again. Start the window again from this
                // message and send every waiter back to poll: their cursors
                // are now unknown, which they will be told as a gap.
                st.window = History::from_parts(self.history, MessageId::ZERO, vec![message]);
                *ch.ahead_check.lock() = None;
                let waiters = std::mem::take(&mut st.waiters);
                drop(st);
                fire_all(waiters, || Wake::Repoll);
                return;
            }
            if !st.waiters.is_empty() {
                // The waiters leave now: the linger starts.
                st.idle_since = Instant::now();
            }
            // As many will be back at once: room for them, no regrowth.
            let room = Waiters::with_capacity_and_hasher(st.waiters.len(), Default::default());
            std::mem::replace(&mut st.waiters, room)
        };
        // One answer per distinct (format, channel index, cursor). Waiters
        // on one key usually come in a row (all were at the newest message):
        // the last key is checked before the map.
        type Key<'a> = (Format, usize, &'a Cursor);
        let mut last: Option<(Key, Arc<Answer>)> = None;
        let mut answers: HashMap<Key, Arc<Answer>, ahash::RandomState> = HashMap::default();
        // Each answer's send pushes the next polls' memory out of the near
        // caches: the waiter two ahead and the answerer of the next one
        // are fetched while this one is sent (`crate::prefetch`).
        let mut next = waiters.values().map(|(waiter, _)| waiter).skip(1);
        let mut after = next.clone().skip(1);
        for (waiter, index) in waiters.values() {
            if let Some(waiter) = after.next() {
                prefetch::arc(waiter);
            }
            if let Some(waiter) = next.next() {
                waiter.prefetch_answerer();
            }
            let key = (waiter.format, *index, &waiter.cursor);
            let answer = match &last {
                Some((k, answer)) if *k == key => answer.clone(),
                _ => {
                    let answer = answers
                        .entry(key)
                        .or_insert_with(|| {
                            Arc::new(Answer::build(
                                waiter.format,
                                &waiter.cursor,
                                false,
                                &[(*index, message.clone())],
                            ))
                        })
                        .clone();
                    last = Some((key, answer.clone()));
                    answer
                }
            };
            waiter.fire(Wake::Answer(answer));
        }
    }

    /// Brings a channel's window up to the broker's `history` after a
    /// reconnect: missed messages are delivered as if announced; a history
    /// that no longer contains the window's position (the broker lost it)
    /// replaces the window and sends every waiter back to poll, which then
    /// reports the gap.
    pub fn resync(&self, name: &str, history: History) {
        let Some(ch) = self.lookup_channel(name) else {
            return;
        };
        let missed = {
            let mut st = ch.state.lock();
            if !st.synced {
                return;
            }
            match history.lookup(st.window.last_id(), usize::MAX) {
                Lookup::UpToDate => return,
                Lookup::Newer(missed) => missed,
                Lookup::Gap(_) | Lookup::Ahead => {
                    st.window = history;
                    let waiters = std::mem::take(&mut st.waiters);
                    drop(st);
                    fire_all(waiters, || Wake::Repoll);
                    return;
                }
            }
        };
        for m in missed {
            self.deliver(m);
        }
    }
}

/// What the broker announces to the hub.
pub(super) enum Announcement {
    Message(Arc<Message>),
    Resync(String, History),
}

impl Hub {
    /// Handles the broker's announcements on the calling task, in order,
    /// from now on (until the hub is dropped). Run on the runtime of the
    /// held polls, it wakes them (and writes their answers) without a
    /// wake-up across threads per poll.
    ///
    /// The queue in front of it holds at most `broker.delivery_queue`
    /// announcements (the hub's `delivery_queue`). When it is full, a
    /// message from the Redis broker is refused ([`Sink::deliver`]), and
    /// the broker reconnects and catches up; a memory publish waits for
    /// room ([`Sink::room`]); a catch-up waits for room too. Returns when
    /// the hub is dropped.
    pub async fn run_deliveries(self: Arc<Self>) {
        let (tx, mut rx) = mpsc::channel(self.delivery_queue);
        if self.deliveries.set(tx).is_err() {
            return; // already running
        }
        let hub = Arc::downgrade(&self);
        drop(self);
        while let Some(announcement) = rx.recv().await {
            metrics::DELIVERY_QUEUE.set(rx.len() as i64);
            let Some(hub) = hub.upgrade() else { return };
            hub.handle(announcement);
        }
    }

    fn handle(&self, announcement: Announcement) {
        match announcement {
            Announcement::Message(message) => self.deliver(message),
            Announcement::Resync(channel, history) => self.resync(&channel, history),
        }
    }

    /// Queues an announcement for [`Hub::run_deliveries`]'s task without
    /// waiting (or handles it here, before that task runs). Returns false
    /// when the queue is full: the announcement was dropped, and counted.
    fn offer(&self, announcement: Announcement) -> bool {
        use mpsc::error::TrySendError;
        let Some(tx) = self.deliveries.get() else {
            self.handle(announcement);
            return true;
        };
        match tx.try_send(announcement) {
            Ok(()) => {
                queued(tx);
                true
            }
            Err(TrySendError::Full(_)) => {
                metrics::DELIVERY_OVERFLOWS.inc();
                false
            }
            Err(TrySendError::Closed(announcement)) => {
                self.handle(announcement);
                true
            }
        }
    }

    /// Queues an announcement, waiting for room (or handles it here,
    /// before [`Hub::run_deliveries`] runs).
    async fn announce(&self, announcement: Announcement) {
        let announcement = match self.deliveries.get() {
            Some(tx) => match tx.send(announcement).await {
                Ok(()) => return queued(tx),
                Err(mpsc::error::SendError(a)) => a,
            },
            None => announcement,
        };
        self.handle(announcement);
    }

    /// Waits for room for one announcement; returns it.
    async fn room(self: Arc<Self>) -> Box<dyn Room> {
        if let Some(tx) = self.deliveries.get() {
            if let Ok(permit) = tx.clone().reserve_owned().await {
                return Box::new(Queued(permit));
            }
        }
        Box::new(Inline(Arc::downgrade(&self)))
    }
}

/// Notes the queue's length after an announcement went in.
fn queued(tx: &mpsc::Sender<Announcement>) {
    metrics::DELIVERY_QUEUE.set((tx.max_capacity() - tx.capacity()) as i64);
}

/// Room taken in the delivery queue.
struct Queued(mpsc::OwnedPermit<Announcement>);

impl Room for Queued {
    fn deliver(self: Box<Self>, message: Arc<Message>) {
        let tx = self.0.send(Announcement::Message(message));
        queued(&tx);
    }
}

/// Room before the delivery task runs (or after it ended): the message is
/// handled by the caller.
struct Inline(Weak<Hub>);

impl Room for Inline {
    fn deliver(self: Box<Self>, message: Arc<Message>) {
        if let Some(hub) = self.0.upgrade() {
            hub.handle(Announcement::Message(message));
        }
    }
}

/// The hub as the broker's sink; weak so that the two do not keep each other.
pub(super) struct HubSink(pub(super) Weak<Hub>);

#[async_trait]
impl Sink for HubSink {
    fn deliver(&self, message: Arc<Message>) -> bool {
        match self.0.upgrade() {
            Some(hub) => hub.offer(Announcement::Message(message)),
            None => true,
        }
    }

    async fn room(&self) -> Box<dyn Room> {
        match self.0.upgrade() {
            Some(hub) => hub.room().await,
            None => Box::new(Inline(Weak::new())),
        }
    }

    async fn resync(&self, channel: &str, history: History) {
        if let Some(hub) = self.0.upgrade() {
            hub.announce(Announcement::Resync(channel.to_string(), history))
                .await;
        }
    }

    fn is_held(&self, channel: &str) -> bool {
        self.0.upgrade().is_some_and(|hub| hub.holds(channel))
    }

    fn position(&self, channel: &str) -> Option<MessageId> {
        let hub = self.0.upgrade()?;
        let ch = hub.lookup_channel(channel)?;
        let st = ch.state.lock();
        st.synced.then(|| st.window.last_id())
    }
}
