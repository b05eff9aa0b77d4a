//! A map from channel name to shared state, split over independently locked
//! shards so that work on different channels does not contend. Used by the
//! hub and the memory broker.

use ahash::RandomState;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

const SHARDS: usize = 64;

/// Channel name → `V` (usually an `Arc`), sharded.
pub struct ShardedMap<V> {
    shards: Vec<RwLock<HashMap<Arc<str>, V, RandomState>>>,
    /// Picks the shard; keyed per process, as each shard's own hasher, so
    /// that names cannot be chosen to land in one shard or bucket.
    hasher: RandomState,
}

impl<V: Clone> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<V: Clone> ShardedMap<V> {
    fn shard(&self, key: &str) -> &RwLock<HashMap<Arc<str>, V, RandomState>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// The value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<V> {
        self.shard(key).read().get(key).cloned()
    }

    /// The value for `key`, inserting `make(key)` when absent.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce(&Arc<str>) -> V) -> V {
        if let Some(v) = self.get(key) {
            return v;
        }
        let mut map = self.shard(key).write();
        if let Some(v) = map.get(key) {
            return v.clone();
        }
        let name: Arc<str> = key.into();
        let v = make(&name);
        map.insert(name, v.clone());
        v
    }

    /// Removes `key` when its value passes `remove`. Returns whether it did.
    pub fn remove_if(&self, key: &str, remove: impl FnOnce(&V) -> bool) -> bool {
        let mut map = self.shard(key).write();
        match map.get(key) {
            Some(v) if remove(v) => map.remove(key).is_some(),
            _ => false,
        }
    }

    /// Every value, shard by shard (each shard read-locked in turn).
    pub fn values(&self) -> Vec<V> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(shard.read().values().cloned());
        }
        all
    }

    /// Removes the entries for which `remove` returns true. Shards with no
    /// candidate (by the cheaper `candidate` check under a read lock) are not
    /// write-locked at all.
    pub fn remove_where(
        &self,
        candidate: impl Fn(&V) -> bool,
        mut remove: impl FnMut(&Arc<str>, &V) -> bool,
    ) {
        for shard in &self.shards {
            if shard.read().values().any(&candidate) {
                shard.write().retain(|k, v| !remove(k, v));
            }
        }
    }
}
