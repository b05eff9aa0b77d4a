//! The hub's side that faces the broker: announced messages are appended
//! to their channel's window and wake every waiter of the channel at once,
//! waiters sharing a cursor sharing one encoded [`Answer`]; a resync after
//! a reconnect delivers what was missed. Announcements are handled in
//! order on one task on the runtime of the held polls
//! ([`Hub::run_deliveries`]): no wake-up across runtimes per poll.

use super::{fire_all, Hub, Waiters};
use crate::answer::{Answer, Format};
use crate::broker::Sink;
use crate::cursor::Cursor;
use crate::history::{History, Lookup};
use crate::message::{Message, MessageId};
use crate::waiter::Wake;
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
        let mut answers: HashMap<Key, Arc<Answer>> = HashMap::new();
        for (waiter, index) in waiters.values() {
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
    pub async fn run_deliveries(self: Arc<Self>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        if self.deliveries.set(tx).is_err() {
            return; // already running
        }
        let hub = Arc::downgrade(&self);
        drop(self);
        while let Some(announcement) = rx.recv().await {
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

    /// Handles an announcement: on [`Hub::run_deliveries`]'s task when it
    /// runs, else here.
    fn announce(&self, announcement: Announcement) {
        let announcement = match self.deliveries.get() {
            Some(tx) => match tx.send(announcement) {
                Ok(()) => return,
                Err(mpsc::error::SendError(a)) => a,
            },
            None => announcement,
        };
        self.handle(announcement);
    }
}

/// The hub as the broker's sink; weak so that the two do not keep each other.
pub(super) struct HubSink(pub(super) Weak<Hub>);

impl Sink for HubSink {
    fn deliver(&self, message: Arc<Message>) {
        if let Some(hub) = self.0.upgrade() {
            hub.announce(Announcement::Message(message));
        }
    }

    fn resync(&self, channel: &str, history: History) {
        if let Some(hub) = self.0.upgrade() {
            hub.announce(Announcement::Resync(channel.to_string(), history));
        }
    }

    fn is_held(&self, channel: &str) -> bool {
        self.0.upgrade().is_some_and(|hub| hub.holds(channel))
    }
}
