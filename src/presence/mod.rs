//! Presence (docs/presence.md): who is on a channel, as long-poll clients
//! come and go. A client is present on a channel from its first poll until
//! no poll of its has been held or answered for `linger` (an SSE client:
//! until its stream closes, plus `linger`), so that re-polling is never
//! "left, then joined".
//!
//! [`Presence`] keeps this instance's part: per channel, how many polls
//! are held now and when the last one ended, for clients of any kind (the
//! channel's occupancy) and per identified subscriber (the authorize
//! upstream's `Pollgate-Subscriber`); a poll's [`Seat`] keeps its
//! channels' entries, so that its end costs no lookup. Each change of it, the first poll
//! of a channel or a subscriber here and the end of its linger, is queued
//! in order; [`fleet::run`] applies the queue to the fleet's presence in
//! the broker, which says which changes are the fleet's (a channel
//! occupied or vacated, a subscriber joined or left anywhere), and those
//! become [`webhooks`] events.

pub mod fleet;
pub mod webhooks;

use crate::broker::PresenceChange;
use ahash::RandomState;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Longest subscriber identity, in bytes.
pub const MAX_SUBSCRIBER: usize = 256;

/// A subscriber identity as the authorize upstream gave it
/// (`Pollgate-Subscriber`), when it is one: 1 to [`MAX_SUBSCRIBER`] bytes
/// of UTF-8 without control characters.
pub fn subscriber_id(value: &[u8]) -> Option<Arc<str>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let fits = !text.is_empty() && text.len() <= MAX_SUBSCRIBER;
    (fits && !text.chars().any(char::is_control)).then(|| text.into())
}

/// Unix time now, in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Polls of one client (or of all, for a channel's occupancy) on one
/// channel of this instance.
#[derive(Debug)]
struct Polls {
    /// Held (or being answered) now.
    held: u32,
    /// When the last one ended.
    last: Instant,
    /// When the first came (Unix ms).
    since: u64,
}

impl Polls {
    fn new() -> Polls {
        Polls {
            held: 0,
            last: Instant::now(),
            since: unix_ms(),
        }
    }

    /// No poll is held, and the last ended `linger` or longer before `now`.
    fn gone(&self, now: Instant, linger: Duration) -> bool {
        self.held == 0 && now.saturating_duration_since(self.last) >= linger
    }
}

/// One channel's presence on this instance.
#[derive(Debug)]
struct Local {
    /// Polls of every client.
    all: Polls,
    /// Polls per identified subscriber.
    subscribers: HashMap<Arc<str>, Polls>,
    /// Swept (its linger ended): no longer in the map; a poll that finds
    /// it takes the channel's new one.
    removed: bool,
}

type Shared = Arc<Mutex<Local>>;

/// This instance's presence, and the changes to it not yet applied to the
/// fleet's.
pub struct Presence {
    linger: Duration,
    channels: DashMap<Arc<str>, Shared, RandomState>,
    /// Changes in the order they happened (per channel: pushed under the
    /// channel's lock).
    changes: Mutex<Vec<PresenceChange>>,
    /// Woken when a change is queued.
    queued: Notify,
}

/// A poll (or an SSE stream) counted as present on its channels until it
/// is dropped, when its linger starts.
pub struct Seat {
    /// The channels it holds a place in (one, as a rule).
    held: smallvec::SmallVec<[Shared; 1]>,
    subscriber: Option<Arc<str>>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let now = Instant::now();
        let end = |polls: &mut Polls| {
            polls.held = polls.held.saturating_sub(1);
            polls.last = now;
        };
        for local in &self.held {
            let mut local = local.lock();
            end(&mut local.all);
            let id = self.subscriber.as_ref();
            if let Some(polls) = id.and_then(|id| local.subscribers.get_mut(id)) {
                end(polls);
            }
        }
    }
}

impl Presence {
    /// Presence with `linger` (`webhooks.linger`).
    pub fn new(linger: Duration) -> Presence {
        Presence {
            linger,
            channels: DashMap::with_hasher_and_shard_amount(RandomState::new(), 64),
            changes: Mutex::new(Vec::new()),
            queued: Notify::new(),
        }
    }

    /// How long a client stays present after its last poll ended.
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Counts a poll of `subscriber` (None: not identified) on `channels`
    /// as held until the returned seat is dropped.
    pub fn enter(
        &self,
        channels: &[compact_str::CompactString],
        subscriber: Option<Arc<str>>,
    ) -> Seat {
        let mut held = smallvec::SmallVec::new();
        for name in channels {
            loop {
                let local = match self.channels.get(name.as_str()) {
                    Some(local) => local.clone(),
                    None => {
                        let entry = self.channels.entry(Arc::from(name.as_str()));
                        entry
                            .or_insert_with(|| {
                                self.queue(name.as_str().into(), None, true);
                                Arc::new(Mutex::new(Local {
                                    all: Polls::new(),
                                    subscribers: HashMap::new(),
                                    removed: false,
                                }))
                            })
                            .clone()
                    }
                };
                let mut seated = local.lock();
                if seated.removed {
                    continue;
                }
                seated.all.held += 1;
                if let Some(id) = &subscriber {
                    let polls = seated.subscribers.entry(id.clone()).or_insert_with(|| {
                        self.queue(name.as_str().into(), Some(id.clone()), true);
                        Polls::new()
                    });
                    polls.held += 1;
                }
                drop(seated);
                held.push(local);
                break;
            }
        }
        Seat { held, subscriber }
    }

    fn queue(&self, channel: Arc<str>, subscriber: Option<Arc<str>>, present: bool) {
        self.changes.lock().push(PresenceChange {
            channel,
            subscriber,
            present,
            at: unix_ms(),
        });
        self.queued.notify_one();
    }

    /// Ends the presence of every client whose linger has passed at `now`
    /// (subscribers before their channel's occupancy).
    pub fn sweep(&self, now: Instant) {
        let linger = self.linger;
        self.channels.retain(|name, local| {
            let mut local = local.lock();
            local.subscribers.retain(|id, polls| {
                let gone = polls.gone(now, linger);
                if gone {
                    self.queue(name.clone(), Some(id.clone()), false);
                }
                !gone
            });
            let gone = local.subscribers.is_empty() && local.all.gone(now, linger);
            if gone {
                local.removed = true;
                self.queue(name.clone(), None, false);
            }
            !gone
        });
    }

    /// Takes the changes queued so far, in order.
    pub fn take(&self) -> Vec<PresenceChange> {
        std::mem::take(&mut *self.changes.lock())
    }

    /// Resolves when a change may have been queued.
    pub async fn changed(&self) {
        self.queued.notified().await
    }

    /// This instance's whole presence, as changes that would make it from
    /// nothing (each channel's occupancy before its subscribers).
    pub fn all(&self) -> Vec<PresenceChange> {
        let mut all = Vec::new();
        for entry in self.channels.iter() {
            let (name, local) = entry.pair();
            let local = local.lock();
            let change = |subscriber, at| PresenceChange {
                channel: name.clone(),
                subscriber,
                present: true,
                at,
            };
            all.push(change(None, local.all.since));
            for (id, polls) in &local.subscribers {
                all.push(change(Some(id.clone()), polls.since));
            }
        }
        all
    }

    /// The identified subscribers present on `channel` here, with since
    /// when (Unix ms), oldest first.
    pub fn list(&self, channel: &str) -> Vec<(String, u64)> {
        let mut list: Vec<(String, u64)> = match self.channels.get(channel) {
            Some(local) => {
                let local = local.lock();
                let subs = local.subscribers.iter();
                subs.map(|(id, p)| (id.to_string(), p.since)).collect()
            }
            None => Vec::new(),
        };
        list.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<compact_str::CompactString> {
        n.iter().map(|s| (*s).into()).collect()
    }

    fn shown(changes: &[PresenceChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                let sign = if c.present { '+' } else { '-' };
                format!(
                    "{sign}{}/{}",
                    c.channel,
                    c.subscriber.as_deref().unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn a_client_that_polls_again_within_linger_never_leaves() {
        let p = Presence::new(Duration::from_secs(10));
        let room = names(&["room"]);
        let ann: Option<Arc<str>> = Some("ann".into());
        drop(p.enter(&room, ann.clone()));
        let start = Instant::now();
        p.sweep(start + Duration::from_secs(9));
        // Polls again, held: no linger runs while held.
        let seat = p.enter(&room, ann.clone());
        p.sweep(start + Duration::from_secs(60));
        assert_eq!(shown(&p.take()), ["+room/", "+room/ann"]);
        drop(seat);
        p.sweep(Instant::now() + Duration::from_secs(9));
        assert!(p.take().is_empty());
        p.sweep(Instant::now() + Duration::from_secs(10));
        assert_eq!(shown(&p.take()), ["-room/ann", "-room/"]);
        assert!(p.all().is_empty());
    }

    #[test]
    fn an_anonymous_client_occupies_the_channel_and_is_not_listed() {
        let p = Presence::new(Duration::from_secs(1));
        let two = names(&["a", "b"]);
        let bob: Option<Arc<str>> = Some("bob".into());
        let seat = p.enter(&two, None);
        let bobs = p.enter(&two[1..], bob);
        assert_eq!(shown(&p.take()), ["+a/", "+b/", "+b/bob"]);
        assert_eq!(p.list("b").len(), 1);
        assert!(p.list("a").is_empty());
        drop(bobs);
        // Bob's linger passes; the anonymous poll still holds b.
        p.sweep(Instant::now() + Duration::from_secs(2));
        assert_eq!(shown(&p.take()), ["-b/bob"]);
        let mut all = shown(&p.all());
        all.sort();
        assert_eq!(all, ["+a/", "+b/"]);
        drop(seat);
    }

    #[test]
    fn identities_are_visible_utf8_of_at_most_256_bytes() {
        assert_eq!(subscriber_id(b" ann ").as_deref(), Some("ann"));
        assert_eq!(
            subscriber_id("zoë@example".as_bytes()).as_deref(),
            Some("zoë@example")
        );
        for bad in [&b""[..], b"  ", b"a\tb", b"a\x00", b"\xff"] {
            assert_eq!(subscriber_id(bad), None, "{bad:?}");
        }
        assert!(subscriber_id(&[b'x'; 256]).is_some());
        assert!(subscriber_id(&[b'x'; 257]).is_none());
    }
}
