//! Fleet-wide presence on Redis: each instance applies its own presence
//! changes (it has clients on a channel, or a given subscriber, or no
//! longer) to the channel's three hashes in one script, which says whether
//! the fleet's presence changed with it, so that a channel becomes occupied
//! or vacant, and a subscriber joins or leaves, once for the whole fleet.
//!
//! For channel `C` (one Cluster slot, `{C}`):
//! - `NS:{C}:here`: field `<instance>` (it has clients on `C`) and
//!   `<instance>\t<subscriber>` (it has that subscriber), value: since when;
//! - `NS:{C}:refs`: per subscriber, on how many instances it is present
//!   (the field `""`: how many instances have clients);
//! - `NS:{C}:present`: per subscriber present anywhere, since when (Unix ms);
//! - `NS:{C}:order`: the channel's fleet-wide order of changes: `next`
//!   (the last place given), `done` (every place up to it was sent or never
//!   will be) and, per place not yet sent, the instance that sends it.
//!   An instance sends a channel's change only once `done` reaches the one
//!   before ([`TURN_SCRIPT`]), so that the receiver gets a channel's events
//!   in order whichever instances decided them; a place whose instance
//!   died, or that was dropped, is passed over.
//!
//! An instance that dies leaves nothing behind for long: every instance
//! with presence is in `NS:instances` and lists its channels in
//! `NS:instance:<id>:channels`; the instances alive find those whose
//! heartbeat (`NS:instance:<id>`, `occupancy.rs`) expired and drop their
//! fields, channel by channel ([`DROP_SCRIPT`]; whichever instance runs it
//! first gets the changes, so each is reported once).

use super::{unavailable, RedisBroker};
use crate::broker::{BrokerError, PresenceChange, PresenceSweep};
use redis::Script;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

/// Applies presence changes of one channel, in order. Returns, per change,
/// its place in the channel's order when it changed the fleet's presence
/// (the first instance to have the subscriber or any client there, or the
/// last one to stop), else 0.
pub const APPLY_SCRIPT: &str = r#"
-- KEYS[1] here, KEYS[2] present, KEYS[3] refs, KEYS[4] order
-- ARGV: per change, 4 values: '+' or '-', instance, subscriber ('' for
-- the instance's clients of any kind), at (Unix ms)
local out = {}
for i = 1, #ARGV, 4 do
  local op, inst, sub, at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local field = inst
  if sub ~= '' then field = inst .. '\t' .. sub end
  local changed = 0
  if op == '+' then
    if redis.call('HSETNX', KEYS[1], field, at) == 1 then
      if redis.call('HINCRBY', KEYS[3], sub, 1) == 1 then
        changed = 1
        if sub ~= '' then redis.call('HSET', KEYS[2], sub, at) end
      end
    end
  elseif redis.call('HDEL', KEYS[1], field) == 1 then
    if redis.call('HINCRBY', KEYS[3], sub, -1) <= 0 then
      changed = 1
      redis.call('HDEL', KEYS[3], sub)
      if sub ~= '' then redis.call('HDEL', KEYS[2], sub) end
    end
  end
  if changed == 1 then
    changed = redis.call('HINCRBY', KEYS[4], 'next', 1)
    redis.call('HSET', KEYS[4], changed, inst)
    redis.call('PEXPIRE', KEYS[4], 86400000)
  end
  out[#out + 1] = changed
end
return out
"#;

/// Drops a dead instance's presence on one channel. Returns the
/// subscribers who are now present nowhere, then `''` when no instance has
/// clients there any more (the channel became vacant), each followed by
/// its place in the channel's order (sent by the instance sweeping).
pub const DROP_SCRIPT: &str = r#"
-- KEYS[1] here, KEYS[2] present, KEYS[3] refs, KEYS[4] order
-- ARGV[1] the dead instance, ARGV[2] the instance sweeping
local prefix = ARGV[1] .. '\t'
local out = {}
local whole = false
local function place()
  local p = redis.call('HINCRBY', KEYS[4], 'next', 1)
  redis.call('HSET', KEYS[4], p, ARGV[2])
  redis.call('PEXPIRE', KEYS[4], 86400000)
  return p
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if f == ARGV[1] then
    whole = true
  elseif string.sub(f, 1, #prefix) == prefix then
    local sub = string.sub(f, #prefix + 1)
    redis.call('HDEL', KEYS[1], f)
    if redis.call('HINCRBY', KEYS[3], sub, -1) <= 0 then
      redis.call('HDEL', KEYS[3], sub)
      redis.call('HDEL', KEYS[2], sub)
      out[#out + 1] = sub
      out[#out + 1] = place()
    end
  end
end
if whole then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HINCRBY', KEYS[3], '', -1) <= 0 then
    redis.call('HDEL', KEYS[3], '')
    out[#out + 1] = ''
    out[#out + 1] = place()
  end
end
return out
"#;

/// Whether place `ARGV[1]` of a channel's order may be sent: `''` when
/// every earlier place is done; else the instance that sends the place
/// after `done`. A place with no instance (dropped) is passed over, as is
/// one of the instance `ARGV[2]` (found dead by the caller).
pub const TURN_SCRIPT: &str = r#"
-- KEYS[1] order; ARGV[1] place, ARGV[2] a dead instance, or ''
local place = tonumber(ARGV[1])
while true do
  local done = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
  if done >= place - 1 then return '' end
  local owner = redis.call('HGET', KEYS[1], done + 1)
  if owner and owner ~= ARGV[2] then return owner end
  redis.call('HDEL', KEYS[1], done + 1)
  redis.call('HSET', KEYS[1], 'done', done + 1)
end
"#;

/// Place `ARGV[1]` of a channel's order was sent (`ARGV[2]` = 1: `done`
/// moves up to it), or dropped (0: it is only passed over).
pub const SENT_SCRIPT: &str = r#"
-- KEYS[1] order; ARGV[1] place, ARGV[2] 1 sent, 0 dropped
redis.call('HDEL', KEYS[1], ARGV[1])
local done = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
if ARGV[2] == '1' and done < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'done', ARGV[1])
end
return 1
"#;

static APPLY: LazyLock<Script> = LazyLock::new(|| Script::new(APPLY_SCRIPT));
static DROP: LazyLock<Script> = LazyLock::new(|| Script::new(DROP_SCRIPT));
static TURN: LazyLock<Script> = LazyLock::new(|| Script::new(TURN_SCRIPT));
static SENT: LazyLock<Script> = LazyLock::new(|| Script::new(SENT_SCRIPT));

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisBroker {
    /// Applies `changes` (this instance's, in order): one script call per
    /// channel, all sent at once. The channel list of this instance gets
    /// a channel before its first change and loses it after its last, so
    /// that a sweep after this instance's death finds every field.
    pub(super) async fn apply(
        &self,
        changes: &[PresenceChange],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        let conn = self.connection()?;
        let mut by_channel: HashMap<&Arc<str>, Vec<usize>> = HashMap::new();
        for (i, c) in changes.iter().enumerate() {
            by_channel.entry(&c.channel).or_default().push(i);
        }
        // Channels where this instance begins having clients, and those
        // where its last word is that it has none.
        let occupancy = |i: &usize| changes[*i].subscriber.is_none();
        let entered: Vec<&str> = by_channel
            .iter()
            .filter(|(_, ix)| ix.iter().any(|i| occupancy(i) && changes[*i].present))
            .map(|(c, _)| &***c)
            .collect();
        let vacated: Vec<&str> = by_channel
            .iter()
            .filter(|(_, ix)| {
                ix.iter()
                    .rev()
                    .find(|i| occupancy(i))
                    .is_some_and(|i| !changes[*i].present)
            })
            .map(|(c, _)| &***c)
            .collect();
        let list = self.layout.instance_channels_key(&self.instance);
        if !entered.is_empty() {
            let mut c = conn.clone();
            redis::cmd("SADD")
                .arg(&list)
                .arg(&entered)
                .query_async::<()>(&mut c)
                .await
                .map_err(unavailable)?;
        }
        let calls = by_channel.iter().map(|(channel, ix)| {
            let mut c = conn.clone();
            let mut invocation = APPLY.prepare_invoke();
            for key in self.layout.presence_keys(channel) {
                invocation.key(key);
            }
            for i in ix {
                let change = &changes[*i];
                invocation
                    .arg(if change.present { "+" } else { "-" })
                    .arg(&self.instance)
                    .arg(change.subscriber.as_deref().unwrap_or(""))
                    .arg(change.at);
            }
            async move {
                let places: Vec<u64> = invocation.invoke_async(&mut c).await?;
                Ok::<_, redis::RedisError>((ix, places))
            }
        });
        let mut out = vec![None; changes.len()];
        for answer in futures_util::future::join_all(calls).await {
            let (ix, places) = answer.map_err(unavailable)?;
            for (i, place) in ix.iter().zip(places) {
                out[*i] = (place > 0).then_some(place);
            }
        }
        if !vacated.is_empty() {
            let mut c = conn.clone();
            redis::cmd("SREM")
                .arg(&list)
                .arg(&vacated)
                .query_async::<()>(&mut c)
                .await
                .map_err(unavailable)?;
        }
        Ok(out)
    }

    /// The subscribers present on `channel` anywhere, with since when.
    pub(super) async fn present(&self, channel: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        let mut conn = self.connection()?;
        let [_, present, ..] = self.layout.presence_keys(channel);
        let all: Vec<(String, u64)> = redis::cmd("HGETALL")
            .arg(present)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(all)
    }

    /// Renews this instance's heartbeat and place among the instances with
    /// presence (noticing when it had been dropped), then drops the
    /// presence of every instance whose heartbeat expired.
    pub(super) async fn sweep(&self) -> Result<PresenceSweep, BrokerError> {
        let mut conn = self.connection()?;
        self.beat(&mut conn).await.map_err(unavailable)?;
        let instances = self.layout.instances_key();
        let added: u32 = redis::cmd("SADD")
            .arg(&instances)
            .arg(&self.instance)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // Not there although it was put there: dropped as dead (or the
        // dataset was lost).
        let was_in = self.in_presence.swap(true, Ordering::Relaxed);
        let mut sweep = PresenceSweep {
            forgotten: added == 1 && was_in,
            left: Vec::new(),
        };
        let members: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(&instances)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        for id in members.iter().filter(|id| **id != self.instance) {
            if !self.alive(&mut conn, id).await.map_err(unavailable)? {
                self.drop_instance(id, &mut sweep.left).await?;
            }
        }
        Ok(sweep)
    }

    /// Whether place `place` of `channel`'s order may be sent now (see
    /// [`TURN_SCRIPT`]): the places before it of instances found dead are
    /// passed over.
    pub(super) async fn turn(&self, channel: &str, place: u64) -> Result<bool, BrokerError> {
        let mut conn = self.connection()?;
        let [.., order] = self.layout.presence_keys(channel);
        let mut dead = String::new();
        loop {
            let owner: String = TURN
                .key(&order)
                .arg(place)
                .arg(&dead)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if owner.is_empty() {
                return Ok(true);
            }
            if owner == self.instance {
                return Ok(false);
            }
            if self.alive(&mut conn, &owner).await.map_err(unavailable)? {
                return Ok(false);
            }
            dead = owner;
        }
    }

    /// Place `place` of `channel`'s order was sent (`sent`) or dropped.
    pub(super) async fn sent(
        &self,
        channel: &str,
        place: u64,
        sent: bool,
    ) -> Result<(), BrokerError> {
        let mut conn = self.connection()?;
        let [.., order] = self.layout.presence_keys(channel);
        SENT.key(&order)
            .arg(place)
            .arg(u8::from(sent))
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Drops the presence of instance `id` (dead) everywhere; the changes
    /// of the fleet's presence it makes go to `left`.
    async fn drop_instance(
        &self,
        id: &str,
        left: &mut Vec<(PresenceChange, u64)>,
    ) -> Result<(), BrokerError> {
        let mut conn = self.connection()?;
        let list = self.layout.instance_channels_key(id);
        let channels: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&list)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        tracing::warn!(
            instance = id,
            channels = channels.len(),
            "presence: an instance's heartbeat expired; its subscribers leave"
        );
        let at = now_ms();
        for channel in channels {
            let mut invocation = DROP.prepare_invoke();
            for key in self.layout.presence_keys(&channel) {
                invocation.key(key);
            }
            let gone: Vec<(String, u64)> = invocation
                .arg(id)
                .arg(&self.instance)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let channel: Arc<str> = channel.into();
            left.extend(gone.into_iter().map(|(sub, place)| {
                let change = PresenceChange {
                    channel: channel.clone(),
                    subscriber: (!sub.is_empty()).then(|| sub.into()),
                    present: false,
                    at,
                };
                (change, place)
            }));
        }
        redis::cmd("DEL")
            .arg(&list)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        redis::cmd("SREM")
            .arg(self.layout.instances_key())
            .arg(id)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
