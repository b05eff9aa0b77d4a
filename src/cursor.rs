//! Cursors: the opaque position a client sends back to resume without loss.
//!
//! A cursor holds one message id per channel of the subscription, in the
//! order of the route's channel list, and the epoch of the history those
//! ids belong to: `<id>_<epoch>` or `<id>.<id>..._<epoch>`. The epoch
//! names the broker's history (the memory broker's start, the Redis
//! dataset's creation), so that a cursor from another history, the empty
//! channel's `0-0` included, is answered with a gap instead of being read
//! as a position in this one. A cursor without an epoch (issued before
//! epochs existed) still parses; it is checked by its ids alone.

use crate::malformed::Malformed;
use crate::message::MessageId;
use smallvec::SmallVec;
use std::fmt;

/// Positions of a subscription, one per channel (held inline up to two:
/// a cursor is copied several times per poll), and the epoch of their
/// history (None: a cursor issued before epochs, never by this version).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Cursor(pub Positions, pub Option<Epoch>);

/// The history a cursor's positions belong to: a number that changes when
/// the broker's history starts over (a memory broker's process start, a
/// Redis dataset created anew).
pub type Epoch = u64;

/// A plain copy of the positions (smallvec's own `Clone` goes through its
/// generic `extend`).
impl Clone for Cursor {
    fn clone(&self) -> Cursor {
        Cursor(Positions::from_slice(&self.0), self.1)
    }
}

/// The positions of a [`Cursor`].
pub type Positions = SmallVec<[MessageId; 2]>;

impl Cursor {
    /// Parses what a client sent for a subscription to `channels` channels.
    /// Surrounding quotes and a weak-ETag prefix (`W/"..."`) are accepted, as
    /// `If-None-Match` carries them.
    pub fn parse(text: &str, channels: usize) -> Result<Cursor, Malformed> {
        match Cursor::parse_plain(text.as_bytes(), channels) {
            Some(cursor) => Ok(cursor),
            // Quoted, spaced, or not a cursor: the whole parse (with its
            // error).
            None => Cursor::parse_any(text, channels),
        }
    }

    /// A cursor exactly as pollgate issues it, for `channels` channels,
    /// in one pass (every poll sends one); None for anything else.
    fn parse_plain(t: &[u8], channels: usize) -> Option<Cursor> {
        if t.len() > 64 * channels.max(1) {
            return None;
        }
        let mut ids = Positions::new();
        let mut at = 0;
        loop {
            let ms = digits(t, &mut at)?;
            (t.get(at) == Some(&b'-')).then_some(())?;
            at += 1;
            let seq = digits(t, &mut at)?;
            ids.push(MessageId { ms, seq });
            match t.get(at) {
                Some(b'.') => at += 1,
                Some(b'_') => {
                    at += 1;
                    let epoch = digits(t, &mut at)?;
                    return (at == t.len() && ids.len() == channels)
                        .then(|| Cursor(ids, Some(epoch)));
                }
                None => return (ids.len() == channels).then(|| Cursor(ids, None)),
                Some(_) => return None,
            }
        }
    }

    /// [`Cursor::parse`] of any text: quotes, a weak-ETag prefix and
    /// spaces around it taken off; the error says what is wrong.
    fn parse_any(text: &str, channels: usize) -> Result<Cursor, Malformed> {
        let t = text.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        let t = t
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(t);
        if t.len() > 64 * channels.max(1) {
            return Err(Malformed("cursor is too long".into()));
        }
        let last_underscore = memchr::memrchr(b'_', t.as_bytes());
        let (t, epoch) = match last_underscore.map(|at| (&t[..at], &t[at + 1..])) {
            Some((ids, epoch)) => match epoch.parse::<Epoch>() {
                Ok(e) if !epoch.starts_with('+') => (ids, Some(e)),
                _ => {
                    let shown = shorten(text.trim());
                    return Err(Malformed(format!(
                        "'{shown}' is not a cursor pollgate issued"
                    )));
                }
            },
            None => (t, None),
        };
        let mut ids = Positions::new();
        let mut rest = t;
        loop {
            let end = memchr::memchr(b'.', rest.as_bytes());
            match rest[..end.unwrap_or(rest.len())].parse::<MessageId>() {
                Ok(id) => ids.push(id),
                Err(_) => {
                    let shown = shorten(t);
                    return Err(Malformed(format!(
                        "'{shown}' is not a cursor pollgate issued"
                    )));
                }
            }
            match end {
                Some(end) => rest = &rest[end + 1..],
                None => break,
            }
        }
        if ids.len() != channels {
            return Err(Malformed(format!(
                "cursor has {} position(s), this subscription has {} channel(s)",
                ids.len(),
                channels
            )));
        }
        Ok(Cursor(ids, epoch))
    }

    /// The same cursor with position `index` moved to `id`.
    pub fn with(&self, index: usize, id: MessageId) -> Cursor {
        let mut c = self.clone();
        c.0[index] = id;
        c
    }
}

/// The decimal number at `*at` in `t` (at least one digit, no sign), and
/// `*at` moved past it; None when there is none or it overflows.
fn digits(t: &[u8], at: &mut usize) -> Option<u64> {
    let start = *at;
    let mut n: u64 = 0;
    while let Some(d) = t.get(*at).map(|b| b.wrapping_sub(b'0')).filter(|d| *d < 10) {
        n = n.checked_mul(10)?.checked_add(u64::from(d))?;
        *at += 1;
    }
    (*at > start).then_some(n)
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            fmt::Display::fmt(id, f)?;
        }
        if let Some(epoch) = self.1 {
            f.write_str("_")?;
            f.write_str(itoa::Buffer::new().format(epoch))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass parse takes what the whole parse takes the same way,
    /// and leaves it everything else.
    #[test]
    fn the_one_pass_parse_agrees_with_the_whole_parse() {
        let alphabet = b"0123456789-._W\" +";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50_000 {
            let len = rng.usize(0..24);
            let text: String = (0..len)
                .map(|_| char::from(alphabet[rng.usize(..alphabet.len())]))
                .collect();
            for channels in 1..3 {
                if let Some(fast) = Cursor::parse_plain(text.as_bytes(), channels) {
                    assert_eq!(
                        Cursor::parse_any(&text, channels).ok(),
                        Some(fast),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn round_trips_and_rejects() {
        let c = Cursor::parse("\"1-2.3-4_77\"", 2).unwrap();
        assert_eq!(c.to_string(), "1-2.3-4_77");
        assert_eq!(c.1, Some(77));
        // Issued before epochs: still a cursor, without one.
        let legacy = Cursor::parse("1-2.3-4", 2).unwrap();
        assert_eq!((legacy.to_string().as_str(), legacy.1), ("1-2.3-4", None));
        for bad in ["1-2_", "1-2_x", "1-2_+5", "1-2_-5", "_5", "1-2_5_5"] {
            assert!(Cursor::parse(bad, 1).is_err(), "{bad}");
        }
        assert_eq!(Cursor::parse("W/\"5-0\"", 1).unwrap().to_string(), "5-0");
        assert!(Cursor::parse("1-2", 2).is_err());
        assert!(Cursor::parse("garbage", 1).is_err());
        assert!(Cursor::parse("", 1).is_err());
        // Past u64, in an id or the epoch.
        assert!(Cursor::parse("18446744073709551616-0_1", 1).is_err());
        assert!(Cursor::parse("1-0_18446744073709551616", 1).is_err());
        assert_eq!(
            Cursor::parse("18446744073709551615-0_18446744073709551615", 1).unwrap(),
            Cursor(
                smallvec::smallvec![MessageId {
                    ms: u64::MAX,
                    seq: 0
                }],
                Some(u64::MAX)
            )
        );
        for bad in [
            "1-", "-1", "1--2", "1-2.", "1-2..3-4", "1-2_3.4", "1-2_3x", "+1-2",
        ] {
            assert!(
                Cursor::parse(bad, 1).is_err() && Cursor::parse(bad, 2).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            c.with(1, MessageId { ms: 9, seq: 0 }).to_string(),
            "1-2.9-0_77"
        );
    }
}
