//! A channel's retained messages and the rule that decides whether a cursor
//! position can be answered without loss.
//!
//! Both the memory broker's store and the hub's per-channel window are a
//! [`History`], so the two cannot disagree on what "newer than", "gap" and
//! "unknown" mean.

use crate::message::{Message, MessageId};
use std::collections::VecDeque;
use std::sync::Arc;

/// The newest `cap` messages of a channel, oldest first.
///
/// Every message with an id greater than `floor` is retained: `floor` is the
/// id of the newest message trimmed away (or [`MessageId::ZERO`] while nothing
/// has been trimmed).
#[derive(Debug, Clone, Default)]
pub struct History {
    messages: VecDeque<Arc<Message>>,
    floor: MessageId,
    cap: usize,
}

/// What a history says about a cursor position.
#[derive(Debug)]
pub enum Lookup {
    /// The position is the newest one: nothing to send, hold the poll.
    UpToDate,
    /// Messages newer than the position (oldest first, at most the limit).
    Newer(Vec<Arc<Message>>),
    /// The position is older than what is retained, or was never an id of
    /// this channel: the client missed messages. Carries the oldest retained
    /// messages (at most the limit).
    Gap(Vec<Arc<Message>>),
    /// The position is newer than anything this history holds: another
    /// source (the broker) may know it.
    Ahead,
}

impl Lookup {
    /// The same messages reported as a gap (for a position found unknown).
    pub fn into_gap(self) -> Lookup {
        match self {
            Lookup::Newer(v) | Lookup::Gap(v) => Lookup::Gap(v),
            Lookup::UpToDate | Lookup::Ahead => Lookup::Gap(Vec::new()),
        }
    }
}

impl History {
    /// An empty history that keeps at most `cap` messages.
    pub fn new(cap: usize) -> History {
        History {
            messages: VecDeque::with_capacity(cap.min(16)),
            floor: MessageId::ZERO,
            cap: cap.max(1),
        }
    }

    /// A history holding `messages` (oldest first, ids increasing) of which
    /// everything newer than `floor` is complete.
    pub fn from_parts(cap: usize, floor: MessageId, messages: Vec<Arc<Message>>) -> History {
        let mut h = History::new(cap);
        h.floor = floor;
        for m in messages {
            h.push(m);
        }
        h
    }

    /// Appends a message, trimming the oldest past the cap. Returns false
    /// (and keeps nothing) when its id is not newer than the last one, so a
    /// message delivered twice is stored once.
    pub fn push(&mut self, message: Arc<Message>) -> bool {
        if message.id <= self.last_id() {
            return false;
        }
        self.messages.push_back(message);
        while self.messages.len() > self.cap {
            if let Some(old) = self.messages.pop_front() {
                self.floor = old.id;
            }
        }
        true
    }

    /// The newest id of the channel (its floor when no message is retained).
    pub fn last_id(&self) -> MessageId {
        self.messages.back().map_or(self.floor, |m| m.id)
    }

    /// The id of the newest message trimmed away.
    pub fn floor(&self) -> MessageId {
        self.floor
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no message is retained.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// True when the message `id` is retained.
    pub fn contains(&self, id: MessageId) -> bool {
        self.messages.binary_search_by(|m| m.id.cmp(&id)).is_ok()
    }

    /// All retained messages, oldest first.
    pub fn messages(&self) -> Vec<Arc<Message>> {
        self.messages.iter().cloned().collect()
    }

    /// Decides what a client at `position` gets, returning at most `limit`
    /// messages.
    pub fn lookup(&self, position: MessageId, limit: usize) -> Lookup {
        let last = self.last_id();
        if position == last {
            return Lookup::UpToDate;
        }
        if position > last {
            return Lookup::Ahead;
        }
        let take = |from: usize| {
            self.messages
                .iter()
                .skip(from)
                .take(limit)
                .cloned()
                .collect()
        };
        if position == self.floor {
            return Lookup::Newer(take(0));
        }
        match self.messages.binary_search_by(|m| m.id.cmp(&position)) {
            Ok(i) => Lookup::Newer(take(i + 1)),
            // Older than the floor, or between ids: never a position we
            // gave out, or a write a Redis failover lost.
            Err(_) => Lookup::Gap(take(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(ms: u64) -> Arc<Message> {
        Arc::new(Message::new(
            MessageId { ms, seq: 0 },
            "c".into(),
            "text/plain".into(),
            Bytes::from_static(b"x"),
        ))
    }

    fn ids(v: &[Arc<Message>]) -> Vec<u64> {
        v.iter().map(|m| m.id.ms).collect()
    }

    #[test]
    fn answers_newer_gap_and_ahead() {
        let mut h = History::new(3);
        assert!(matches!(h.lookup(MessageId::ZERO, 10), Lookup::UpToDate));
        for ms in 1..=5 {
            assert!(h.push(msg(ms)));
        }
        assert!(!h.push(msg(5)), "duplicates are dropped");
        assert_eq!(h.floor().ms, 2);
        match h.lookup(MessageId { ms: 3, seq: 0 }, 10) {
            Lookup::Newer(v) => assert_eq!(ids(&v), [4, 5]),
            other => panic!("{other:?}"),
        }
        match h.lookup(MessageId { ms: 2, seq: 0 }, 2) {
            Lookup::Newer(v) => assert_eq!(ids(&v), [3, 4]),
            other => panic!("{other:?}"),
        }
        for stale in [0, 1] {
            match h.lookup(MessageId { ms: stale, seq: 0 }, 10) {
                Lookup::Gap(v) => assert_eq!(ids(&v), [3, 4, 5]),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            h.lookup(MessageId { ms: 4, seq: 9 }, 10),
            Lookup::Gap(_)
        ));
        assert!(matches!(
            h.lookup(MessageId { ms: 5, seq: 0 }, 10),
            Lookup::UpToDate
        ));
        assert!(matches!(
            h.lookup(MessageId { ms: 9, seq: 0 }, 10),
            Lookup::Ahead
        ));
    }
}
