//! A map from channel name to shared state, split over independently locked
//! shards so that work on different channels does not contend (a
//! `DashMap` of 64 shards, keyed per process so that names cannot be chosen
//! to land in one shard or bucket). Used by the hub and the memory broker.

use ahash::RandomState;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::sync::Arc;

/// Channel name → `V` (usually an `Arc`), sharded.
pub struct ShardedMap<V> {
    map: DashMap<Arc<str>, V, RandomState>,
}

impl<V: Clone> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            map: DashMap::with_hasher_and_shard_amount(RandomState::new(), 64),
        }
    }
}

impl<V: Clone> ShardedMap<V> {
    /// The value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<V> {
        self.map.get(key).map(|r| r.value().clone())
    }

    /// The value for `key`, inserting `make(key)` when absent.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce(&Arc<str>) -> V) -> V {
        if let Some(v) = self.get(key) {
            return v;
        }
        match self.map.entry(key.into()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                let name = e.key().clone();
                let v = make(&name);
                e.insert(v.clone());
                v
            }
        }
    }

    /// Removes `key` when its value passes `remove`. Returns whether it did.
    pub fn remove_if(&self, key: &str, remove: impl FnOnce(&V) -> bool) -> bool {
        self.map.remove_if(key, |_, v| remove(v)).is_some()
    }

    /// Every value.
    pub fn values(&self) -> Vec<V> {
        self.map.iter().map(|r| r.value().clone()).collect()
    }

    /// Removes the entries for which `remove` returns true.
    pub fn remove_where(
        &self,
        candidate: impl Fn(&V) -> bool,
        mut remove: impl FnMut(&Arc<str>, &V) -> bool,
    ) {
        self.map.retain(|k, v| !(candidate(v) && remove(k, v)));
    }
}
