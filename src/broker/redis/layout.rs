//! What pollgate keeps in Redis and how: key names, the publish and read
//! scripts, and the announcement payload. `docs/redis.md` documents the same
//! for backends that publish straight into Redis.
//!
//! For channel `C` under namespace `NS`:
//! - `NS:{C}:h` — Stream of the retained messages, fields `ct` (content
//!   type) and `d` (data); the stream id is the message id. An entry with
//!   the field `lost` instead is a loss notice ([`LOSS_SCRIPT`]).
//! - `NS:{C}:f` — the id of the newest message trimmed from the stream, as
//!   earlier versions wrote it (read, no longer written: [`READ_SCRIPT`]).
//! - `NS:{C}` — the pub/sub (or sharded pub/sub) name announcements go to,
//!   with the payload `<id>\n<content type>\n<data>` (a loss notice:
//!   `<id>\n!lost\n<lost id>`).
//!
//! - `NS:{C}:occ` — a hash of each instance's subscribers of the channel
//!   (field: the instance's id), expiring [`OCCUPANCY_TTL`] after its last
//!   write (`occupancy.rs`).
//!
//! - `NS:{C}:here`, `NS:{C}:present`, `NS:{C}:refs`, `NS:{C}:order` —
//!   presence, while it is tracked (`webhooks:`): which instance has
//!   clients and which subscribers there, who is present fleet-wide since
//!   when, on how many instances, and the order of the channel's events
//!   (`presence.rs`).
//!
//! The `{C}` hash tag keeps all of them on one Cluster slot. And per
//! instance, `NS:instance:<id>`: its heartbeat, expiring
//! [`HEARTBEAT_TTL`] after the last one (a dead instance's counts are then
//! no longer added up); with presence, `NS:instances` (the set of instance
//! ids that have presence) and `NS:instance:<id>:channels` (the channels
//! where instance `<id>` has presence), read when it dies.

use super::conn::Conn;
use crate::history::History;
use crate::message::{Message, MessageId};
use bytes::Bytes;
use redis::{RedisResult, Script, Value};
use std::sync::Arc;
use std::time::Duration;

/// Appends to the history, trims it (approximately: whole stream nodes,
/// never below the history length), refreshes the TTL and announces,
/// atomically. Returns the message id. Three commands: the floor is not
/// written (see [`READ_SCRIPT`]); `KEYS[2]` is kept for callers of the
/// earlier script, which wrote it.
pub const PUBLISH_SCRIPT: &str = r#"
-- KEYS[1] history stream, KEYS[2] floor (no longer written)
-- ARGV[1] announce name, ARGV[2] history length, ARGV[3] TTL (ms),
-- ARGV[4] content type, ARGV[5] data, ARGV[6] PUBLISH or SPUBLISH
local ct = ARGV[4]
if string.find(ct, '%c') then ct = 'application/octet-stream' end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'ct', ct, 'd', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[6], ARGV[1], id .. '\n' .. ct .. '\n' .. ARGV[5])
return id
"#;

/// Appends a loss notice: after a failover, this instance had seen message
/// `lost` (ARGV[4]) of the channel, and the new master does not have it.
/// Nothing is done when the stream has it after all (it was written after
/// the caller's read), or when a notice that covers it is there already
/// (another instance saw the same loss). Trims, expires and announces as
/// the publish script does. Returns the notice's id, or false.
pub const LOSS_SCRIPT: &str = r#"
-- KEYS[1] history stream
-- ARGV[1] announce name, ARGV[2] history length, ARGV[3] TTL (ms),
-- ARGV[4] the lost id, ARGV[5] PUBLISH or SPUBLISH
if #redis.call('XRANGE', KEYS[1], ARGV[4], ARGV[4]) > 0 then return false end
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local lms, lseq = parts(ARGV[4])
local keep = tonumber(ARGV[2])
for _, e in ipairs(redis.call('XREVRANGE', KEYS[1], '+', ARGV[4], 'COUNT', keep)) do
  if e[2][1] == 'lost' then
    local ms, seq = parts(e[2][2])
    if ms > lms or (ms == lms and seq >= lseq) then return false end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', keep, '*', 'lost', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[5], ARGV[1], id .. '\n!lost\n' .. ARGV[4])
return id
"#;

/// The content-type line of a loss notice's announcement: not a media
/// type, so no message can carry it.
const LOST: &str = "!lost";

/// Reads the newest `history` entries (newest first) and the floor, the
/// id of the newest message no longer among them, in one atomic step.
/// When the stream holds more (it is trimmed in whole nodes, so it usually
/// does), the floor is the entry just before them. Otherwise, when entries
/// were trimmed (`XINFO STREAM`: more entries added than kept; on Redis 6,
/// which does not count, whenever the stream is full), the id just below
/// the oldest kept stands for it: a cursor older than every kept entry is
/// then a gap, never silence (one exactly at the trimmed entry may get a
/// gap it did not need). Else the floor key earlier versions wrote, if any.
pub const READ_SCRIPT: &str = r#"
-- KEYS[1] history stream, KEYS[2] floor (of earlier versions); ARGV[1] history length
local keep = tonumber(ARGV[1])
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', keep + 1)
local floor = redis.call('GET', KEYS[2]) or ''
if #entries > keep then
  floor = entries[#entries][1]
  entries[#entries] = nil
elseif #entries > 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local added, length
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then added = info[i + 1] end
    if info[i] == 'length' then length = info[i + 1] end
  end
  if (added and added > length) or (not added and #entries == keep) then
    local ms, seq = string.match(entries[#entries][1], '^(%d+)-(%d+)$')
    if tonumber(seq) > 0 then
      floor = ms .. '-' .. string.format('%d', tonumber(seq) - 1)
    else
      floor = string.format('%d', tonumber(ms) - 1) .. '-18446744073709551615'
    end
  end
end
return {floor, entries}
"#;

/// Reads the namespace's dataset epoch, creating it when missing: a
/// Redis that lost or flushed its data has none, and gets a new one.
pub const EPOCH_SCRIPT: &str = r#"
-- KEYS[1] epoch key; ARGV[1] a new epoch (now, in ms)
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// How long an instance's heartbeat lasts: it is renewed every second.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);
/// How long a channel's occupancy hash lasts after its last write: the
/// counts of every channel with subscribers are written again more often.
pub const OCCUPANCY_TTL: Duration = Duration::from_secs(60);

/// Key and name scheme of one namespace.
pub struct Layout {
    namespace: String,
    history: usize,
    ttl_ms: u64,
    publish: Script,
    read: Script,
    epoch: Script,
    loss: Script,
}

impl Layout {
    pub fn new(namespace: &str, history: usize, ttl: Duration) -> Layout {
        Layout {
            namespace: namespace.to_string(),
            history,
            ttl_ms: ttl.as_millis().max(1) as u64,
            publish: Script::new(PUBLISH_SCRIPT),
            read: Script::new(READ_SCRIPT),
            epoch: Script::new(EPOCH_SCRIPT),
            loss: Script::new(LOSS_SCRIPT),
        }
    }

    /// The pub/sub name of `channel`'s announcements.
    pub fn announce(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}", self.namespace)
    }

    fn history_key(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:h", self.namespace)
    }

    /// The hash of `channel`'s subscribers per instance.
    pub fn occupancy_key(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:occ", self.namespace)
    }

    /// The presence hashes of `channel`: `here`, `present`, `refs`
    /// (`presence.rs`).
    pub fn presence_keys(&self, channel: &str) -> [String; 4] {
        ["here", "present", "refs", "order"]
            .map(|k| format!("{}:{{{channel}}}:{k}", self.namespace))
    }

    /// The set of instances that have presence.
    pub fn instances_key(&self) -> String {
        format!("{}:instances", self.namespace)
    }

    /// The set of the channels where instance `id` has presence.
    pub fn instance_channels_key(&self, id: &str) -> String {
        format!("{}:instance:{id}:channels", self.namespace)
    }

    /// The heartbeat key of instance `id`.
    pub fn instance_key(&self, id: &str) -> String {
        format!("{}:instance:{id}", self.namespace)
    }

    fn floor_key(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:f", self.namespace)
    }

    /// The channel an announcement name belongs to.
    pub fn channel_of(&self, name: &[u8]) -> Option<String> {
        let name = std::str::from_utf8(name).ok()?;
        let inner = name
            .strip_prefix(self.namespace.as_str())?
            .strip_prefix(":{")?;
        Some(inner.strip_suffix('}')?.to_string())
    }

    /// The namespace's dataset epoch (`NS:epoch`), created now when Redis
    /// has none.
    pub async fn epoch(&self, conn: &mut Conn) -> RedisResult<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let epoch: String = self
            .epoch
            .key(format!("{}:epoch", self.namespace))
            .arg(now)
            .invoke_async(conn)
            .await?;
        epoch
            .parse()
            .map_err(|_| (redis::ErrorKind::TypeError, "the epoch key holds no number").into())
    }

    /// Runs the publish script; returns the new id.
    pub async fn publish(
        &self,
        conn: &mut Conn,
        channel: &str,
        content_type: &str,
        data: &[u8],
    ) -> RedisResult<MessageId> {
        let command = publish_command(conn);
        let id: String = self
            .publish
            .key(self.history_key(channel))
            .key(self.floor_key(channel))
            .arg(self.announce(channel))
            .arg(self.history)
            .arg(self.ttl_ms)
            .arg(content_type)
            .arg(data)
            .arg(command)
            .invoke_async(conn)
            .await?;
        id.parse().map_err(|_| {
            (
                redis::ErrorKind::TypeError,
                "XADD returned an unexpected id",
            )
                .into()
        })
    }

    /// Runs the loss script ([`LOSS_SCRIPT`]) for message `lost` of
    /// `channel`, announcing with SPUBLISH when `sharded`. True when a
    /// notice was appended.
    pub async fn mark_lost(
        &self,
        conn: &mut Conn,
        channel: &str,
        lost: MessageId,
        sharded: bool,
    ) -> RedisResult<bool> {
        let id: Option<String> = self
            .loss
            .key(self.history_key(channel))
            .arg(self.announce(channel))
            .arg(self.history)
            .arg(self.ttl_ms)
            .arg(lost.to_string())
            .arg(if sharded { "SPUBLISH" } else { "PUBLISH" })
            .invoke_async(conn)
            .await?;
        Ok(id.is_some())
    }

    /// Reads a channel's retained history.
    pub async fn read(&self, conn: &mut Conn, channel: &str) -> RedisResult<History> {
        let reply: Value = self
            .read
            .key(self.history_key(channel))
            .key(self.floor_key(channel))
            .arg(self.history)
            .invoke_async(conn)
            .await?;
        let bad =
            || redis::RedisError::from((redis::ErrorKind::TypeError, "unexpected history reply"));
        let Value::Array(parts) = reply else {
            return Err(bad());
        };
        let [floor, Value::Array(entries)] = parts.as_slice() else {
            return Err(bad());
        };
        let floor = match floor {
            Value::BulkString(b) if !b.is_empty() => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?,
            _ => MessageId::ZERO,
        };
        let channel: Arc<str> = channel.into();
        let mut messages = Vec::with_capacity(entries.len());
        for e in entries.iter().rev() {
            messages.push(Arc::new(decode_entry(&channel, e).ok_or_else(bad)?));
        }
        Ok(History::from_parts(self.history, floor, messages))
    }
}

/// The command that announces on `conn`'s kind of Redis.
fn publish_command(conn: &Conn) -> &'static str {
    if conn.sharded() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// One XRANGE entry `[id, [field, value, ...]]` as a message.
fn decode_entry(channel: &Arc<str>, entry: &Value) -> Option<Message> {
    let Value::Array(pair) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = pair.as_slice() else {
        return None;
    };
    let id: MessageId = std::str::from_utf8(bytes_of(id)?).ok()?.parse().ok()?;
    let mut content_type = String::new();
    let mut data = Bytes::new();
    for kv in fields.chunks(2) {
        let [k, v] = kv else { return None };
        match bytes_of(k)? {
            b"ct" => content_type = String::from_utf8_lossy(bytes_of(v)?).into_owned(),
            b"d" => data = Bytes::copy_from_slice(bytes_of(v)?),
            b"lost" => return Some(Message::loss_notice(id, channel.clone())),
            _ => {}
        }
    }
    Some(Message::new(id, channel.clone(), content_type, data))
}

/// An announcement payload `<id>\n<content type>\n<data>` as a message.
pub fn decode_payload(channel: &str, payload: &[u8]) -> Option<Message> {
    let first = payload.iter().position(|b| *b == b'\n')?;
    let rest = &payload[first + 1..];
    let second = rest.iter().position(|b| *b == b'\n')?;
    let id: MessageId = std::str::from_utf8(&payload[..first]).ok()?.parse().ok()?;
    let content_type = std::str::from_utf8(&rest[..second]).ok()?.to_string();
    if content_type == LOST {
        return Some(Message::loss_notice(id, channel.into()));
    }
    let data = Bytes::copy_from_slice(&rest[second + 1..]);
    Some(Message::new(id, channel.into(), content_type, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Announcements come from anyone who can write to Redis: any bytes
        /// decode to a message or to nothing, never a panic; a well-formed
        /// payload keeps its id, type and data exactly.
        #[test]
        fn payloads_decode_or_are_refused(
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            ms in any::<u64>(), seq in any::<u64>(),
            ct in "[a-z]{1,8}/[a-z+.-]{1,12}", data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode_payload("c", &junk);
            let mut payload = format!("{ms}-{seq}\n{ct}\n").into_bytes();
            payload.extend_from_slice(&data);
            let m = decode_payload("c", &payload).unwrap();
            prop_assert_eq!(m.id, MessageId { ms, seq });
            prop_assert_eq!(&m.content_type, &ct);
            prop_assert_eq!(&m.data[..], &data[..]);
        }
    }

    #[test]
    fn names_and_payloads() {
        let l = Layout::new("pg", 10, Duration::from_secs(1));
        assert_eq!(l.announce("room:1"), "pg:{room:1}");
        assert_eq!(l.history_key("room:1"), "pg:{room:1}:h");
        assert_eq!(l.channel_of(b"pg:{room:1}").as_deref(), Some("room:1"));
        assert_eq!(l.channel_of(b"other:{room:1}"), None);
        let m = decode_payload("c", b"5-1\ntext/plain\nhello\nworld").unwrap();
        assert_eq!(m.id, MessageId { ms: 5, seq: 1 });
        assert_eq!(m.content_type, "text/plain");
        assert_eq!(&m.data[..], b"hello\nworld");
        assert!(decode_payload("c", b"garbage").is_none());
    }
}

#[cfg(test)]
mod doc_tests {
    /// docs/redis.md shows backends the very script pollgate runs.
    #[test]
    fn the_documented_script_is_the_one_in_use() {
        let doc = include_str!("../../../docs/redis.md");
        let start = doc.find("```lua\n").unwrap() + 7;
        let end = start + doc[start..].find("```").unwrap();
        assert_eq!(doc[start..end].trim(), super::PUBLISH_SCRIPT.trim());
    }
}
