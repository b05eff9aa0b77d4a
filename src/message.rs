//! Messages and their ids: what a publish stores and what a poll answers with.
//!
//! A [`Message`] is immutable once published and shared by `Arc` between the
//! broker's history, the hub's local window and every answer that carries it.
//! Its JSON form (the object inside an envelope's `messages` list) is encoded
//! once, when the message is built, so fan-out never re-encodes a payload.

use base64::Engine;
use bytes::Bytes;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A message id, `<ms>-<seq>`: milliseconds since the epoch and a sequence
/// number within that millisecond. Ids grow strictly within a channel (the
/// same scheme as Redis stream ids) and compare across channels by time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// The position before any message: what a cursor holds for a channel
    /// that had no messages when it was handed out.
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };

    /// Returns the next id after `self` for a message published now: the
    /// current time, or `self` with its sequence bumped when the clock has not
    /// moved past `self` (so ids never go backwards).
    pub fn next_after(self) -> MessageId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if now > self.ms {
            MessageId { ms: now, seq: 0 }
        } else {
            MessageId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }

    /// Appends the id as text (`<ms>-<seq>`) to `out`, as `Display` writes
    /// it, without the formatting machinery (this runs for every message).
    pub fn push_text(&self, out: &mut Vec<u8>) {
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(number.format(self.ms).as_bytes());
        out.push(b'-');
        out.extend_from_slice(number.format(self.seq).as_bytes());
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut number = itoa::Buffer::new();
        f.write_str(number.format(self.ms))?;
        f.write_str("-")?;
        f.write_str(number.format(self.seq))
    }
}

/// Why a string is not a message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadId;

impl FromStr for MessageId {
    type Err = BadId;

    /// Parses `<ms>-<seq>`, both plain decimal numbers.
    fn from_str(s: &str) -> Result<Self, BadId> {
        let s = s.as_bytes();
        let dash = s.iter().position(|&b| b == b'-').ok_or(BadId)?;
        let num = |t: &[u8]| -> Result<u64, BadId> {
            if t.is_empty() {
                return Err(BadId);
            }
            t.iter().try_fold(0u64, |n, &b| match b {
                b'0'..=b'9' => n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                    .ok_or(BadId),
                _ => Err(BadId),
            })
        };
        Ok(MessageId {
            ms: num(&s[..dash])?,
            seq: num(&s[dash + 1..])?,
        })
    }
}

/// One published message.
#[derive(Debug)]
pub struct Message {
    pub id: MessageId,
    pub channel: Arc<str>,
    pub content_type: String,
    pub data: Bytes,
    /// When this instance accepted or received the message; the start of
    /// `pollgate_delivery_latency_seconds`.
    pub received_at: Instant,
    /// The message as a JSON object, compact and on one line (so it also
    /// serves as an SSE `data:` line).
    json: Bytes,
    /// A loss notice (see [`Message::loss_notice`]), not a message.
    loss_notice: bool,
}

impl Message {
    /// Builds a message and encodes its JSON form once. A content type that
    /// is not a valid media type (only a writer straight into Redis can
    /// give one: every publish path refuses it) becomes
    /// `application/octet-stream`, counted and logged once per channel, so
    /// that no byte of it reaches a header line.
    pub fn new(id: MessageId, channel: Arc<str>, content_type: String, data: Bytes) -> Message {
        let content_type = match content_type_problem(&content_type) {
            None => content_type,
            Some(why) => {
                replaced_content_type(&channel, &why);
                OCTET_STREAM.to_string()
            }
        };
        let json = encode_json(id, &channel, &content_type, &data);
        Message {
            id,
            channel,
            content_type,
            data,
            received_at: Instant::now(),
            json,
            loss_notice: false,
        }
    }

    /// A loss notice at position `id` of `channel`: not a message, but the
    /// mark a Redis failover's lost writes leave in the channel's history
    /// (see `docs/redis.md`, "Writes a failover lost"). A cursor that
    /// passes it is answered `gap: true`; it is never sent as a message.
    pub fn loss_notice(id: MessageId, channel: Arc<str>) -> Message {
        Message {
            id,
            channel,
            content_type: String::new(),
            data: Bytes::new(),
            received_at: Instant::now(),
            json: Bytes::new(),
            loss_notice: true,
        }
    }

    /// True for a loss notice ([`Message::loss_notice`]).
    pub fn is_loss_notice(&self) -> bool {
        self.loss_notice
    }

    /// The message as the JSON object that envelopes and SSE events carry.
    pub fn json(&self) -> &Bytes {
        &self.json
    }
}

/// The content type of a message published without one, and of one whose
/// content type was not valid.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Why `content_type` cannot be a message's (None when it can): it must be
/// a media type, `type/subtype` with optional parameters (RFC 9110 §8.3.1),
/// without control bytes, at most 256 bytes.
pub fn content_type_problem(content_type: &str) -> Option<String> {
    let shown = || content_type.escape_default().to_string();
    if content_type.len() > 256 {
        return Some("a content type is at most 256 bytes".into());
    }
    if content_type
        .bytes()
        .any(|b| b.is_ascii_control() || b >= 0x80)
    {
        return Some(format!("'{}' has control or non-ASCII bytes", shown()));
    }
    // The common case, `type/subtype` of token characters and no
    // parameters, needs no parser (this runs for every publish).
    const TCHAR: [bool; 256] = crate::ascii::alphanumeric_and(b"!#$%&'*+-.^_`|~");
    if let Some((kind, sub)) = content_type.split_once('/') {
        let token = |t: &str| !t.is_empty() && crate::ascii::all_in(t.as_bytes(), &TCHAR);
        if token(kind) && token(sub) {
            return None;
        }
    }
    match content_type.parse::<mime::Mime>() {
        Ok(m) if m.subtype().as_str().is_empty() => Some(format!("'{}' has no subtype", shown())),
        Ok(_) => None,
        Err(e) => Some(format!("'{}' is not a media type: {e}", shown())),
    }
}

/// Counts a content type replaced on arrival, and logs it the first time
/// for `channel` (of the last 1024 channels that had one).
fn replaced_content_type(channel: &Arc<str>, why: &str) {
    static LOGGED: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashSet<Arc<str>>>> =
        std::sync::LazyLock::new(Default::default);
    crate::metrics::BAD_CONTENT_TYPES.inc();
    let mut logged = LOGGED.lock();
    if logged.len() >= 1024 {
        logged.clear();
    }
    if logged.insert(channel.clone()) {
        tracing::warn!(%channel, "a message arrived with an invalid content type, served as {OCTET_STREAM}: {why}");
    }
}

/// True when `content_type` names JSON (`application/json`, `*/*+json`).
pub fn is_json_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let suffix = essence.len().checked_sub(5).and_then(|i| essence.get(i..));
    essence.eq_ignore_ascii_case("application/json")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

/// True when `data` is one JSON value, UTF-8 included (serde_json skips
/// strings it ignores without checking their bytes).
pub fn is_json(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

fn encode_json(id: MessageId, channel: &str, content_type: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + channel.len() + content_type.len() + 80);
    out.extend_from_slice(b"{\"id\":\"");
    id.push_text(&mut out);
    out.extend_from_slice(b"\",\"channel\":");
    let _ = serde_json::to_writer(&mut out, channel);
    out.extend_from_slice(b",\"content_type\":");
    let _ = serde_json::to_writer(&mut out, content_type);
    out.extend_from_slice(b",\"data\":");
    let json = is_json_type(content_type) && is_json(data);
    match (json, std::str::from_utf8(data)) {
        // Valid JSON on one line goes as sent (a raw line break can only
        // be whitespace between tokens: inside a string it is invalid).
        (true, _) if !data.iter().any(|&b| b == b'\n' || b == b'\r') => {
            out.extend_from_slice(data.trim_ascii())
        }
        // Re-encoded on one line, as SSE's `data:` lines need.
        (true, text) => match serde_json::from_slice::<serde_json::Value>(data) {
            Ok(value) => {
                let _ = serde_json::to_writer(&mut out, &value);
            }
            // Not expected (it was valid above): then as text.
            Err(_) => {
                let _ = serde_json::to_writer(&mut out, &text.unwrap_or_default());
            }
        },
        (false, Ok(text)) => {
            let _ = serde_json::to_writer(&mut out, text);
        }
        (false, Err(_)) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .as_bytes(),
            );
            out.extend_from_slice(b"\",\"encoding\":\"base64\"");
        }
    }
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(ct: &str, data: &[u8]) -> serde_json::Value {
        let m = Message::new(
            MessageId { ms: 5, seq: 1 },
            "a".into(),
            ct.into(),
            Bytes::copy_from_slice(data),
        );
        serde_json::from_slice(m.json()).unwrap()
    }

    #[test]
    fn ids_parse_and_print() {
        let id: MessageId = "1732400000000-7".parse().unwrap();
        assert_eq!(
            id,
            MessageId {
                ms: 1732400000000,
                seq: 7
            }
        );
        assert_eq!(id.to_string(), "1732400000000-7");
        let mut text = b"id ".to_vec();
        id.push_text(&mut text);
        assert_eq!(text, b"id 1732400000000-7");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-1-1",
            "+1-2",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn next_ids_grow() {
        let far = MessageId {
            ms: u64::MAX / 2,
            seq: 3,
        };
        assert_eq!(far.next_after(), MessageId { ms: far.ms, seq: 4 });
        assert!(MessageId::ZERO.next_after() > MessageId::ZERO);
    }

    #[test]
    fn data_is_json_text_or_base64() {
        let v = json_of("application/json", b"{\"text\":\n\"hi\"}");
        assert_eq!(v["data"]["text"], "hi");
        assert_eq!(json_of("text/plain", b"hi")["data"], "hi");
        assert_eq!(json_of("application/json", b"not json")["data"], "not json");
        let b = json_of("application/octet-stream", &[0xff, 0x00]);
        assert_eq!(b["data"], "/wA=");
        assert_eq!(b["encoding"], "base64");
        assert!(is_json_type("Application/JSON; charset=utf-8"));
        assert!(is_json_type("application/vnd.api+JSON"));
        assert!(!is_json_type("json") && !is_json_type("text/plain"));
    }

    #[test]
    fn json_that_is_not_utf8_is_base64() {
        let v = json_of("application/json", b"{\"a\":\"\xff\xfe\"}");
        assert_eq!(v["encoding"], "base64", "{v}");
        assert!(!is_json(b"{\"a\":\"\xff\"}"));
        assert!(is_json("{\"a\":\"é\"}".as_bytes()));
    }

    #[test]
    fn content_types_are_media_types_or_octet_stream() {
        for good in [
            "text/plain",
            "application/json; charset=utf-8",
            "a/b+json;x=\"y z\"",
        ] {
            assert_eq!(content_type_problem(good), None, "{good}");
        }
        for bad in [
            "text/plain\r\nSet-Cookie: session=stolen",
            "text/plain\n",
            "plain",
            "",
            "text/",
            "text/plain; é=1",
            "a/b\u{7f}",
        ] {
            assert!(content_type_problem(bad).is_some(), "{bad:?}");
        }
        let m = Message::new(
            MessageId::ZERO,
            "a".into(),
            "text/plain\r\nSet-Cookie: x=1".into(),
            Bytes::from_static(b"hi"),
        );
        assert_eq!(m.content_type, OCTET_STREAM);
    }

    #[test]
    fn json_data_goes_as_sent_on_one_line() {
        let encoded = |data: &[u8]| {
            let m = Message::new(
                MessageId::ZERO,
                "a".into(),
                "application/json".into(),
                Bytes::copy_from_slice(data),
            );
            String::from_utf8(m.json().to_vec()).unwrap()
        };
        // One line: the publisher's bytes (trimmed).
        assert!(encoded(b" {\"a\": [1, 2]} ").ends_with(r#""data":{"a": [1, 2]}}"#));
        // Several lines: re-encoded on one, as SSE needs.
        let pretty = encoded(b"{\r\n  \"a\": \"x\"\n}");
        assert!(pretty.ends_with(r#""data":{"a":"x"}}"#), "{pretty}");
        assert!(!pretty.contains(['\n', '\r']));
    }
}
