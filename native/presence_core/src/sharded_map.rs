//! A hash map whose growth never moves more than a slice of it at once.
//!
//! A `HashMap` doubles by rehashing every entry; at a million presences
//! that is tens of milliseconds with the table lock held, and every
//! scheduler waiting on the lock stalls with it. Past [`SPLIT_AT`] entries
//! this map spreads its entries over [`SHARDS`] maps, each of which grows
//! on its own, so one growth step moves at most about 1/64 of the entries.
//! Small maps (most topics) stay a single map, with no overhead.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Entries a map holds before it is split into shards.
pub const SPLIT_AT: usize = 16_384;
/// Shards of a split map: a power of two.
pub const SHARDS: usize = 64;
/// Capacity a shard keeps however empty it gets.
const MIN_KEPT_CAPACITY: usize = 64;
/// Entries below which a split map becomes one map again: far enough
/// below [`SPLIT_AT`] that a map hovering around it does not flip.
const MERGE_AT: usize = SPLIT_AT / 4;

#[derive(Debug, Clone)]
pub struct ShardedMap<K, V, S = RandomState> {
    shards: Vec<HashMap<K, V, S>>,
    hasher: S,
    len: usize,
}

impl<K, V, S: Default> Default for ShardedMap<K, V, S> {
    fn default() -> Self {
        Self {
            shards: vec![HashMap::with_hasher(S::default())],
            hasher: S::default(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq, V, S: BuildHasher + Clone> ShardedMap<K, V, S> {
    pub fn len(&self) -> usize {
        self.len
    }

    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        // The top bits: the shard's own table indexes with the low ones.
        (self.hasher.hash_one(key) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get_key_value(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        self.shards[shard].get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.shards.len() == 1 && self.len >= SPLIT_AT {
            self.split();
        }
        let shard = self.shard_of(&key);
        let old = self.shards[shard].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        let removed = self.shards[shard].remove(key)?;
        self.len -= 1;
        if self.shards.len() > 1 && self.len < MERGE_AT {
            self.merge();
            return Some(removed);
        }
        // Give memory back after a peak: shrinking when a quarter full
        // costs one rehash of the (bounded) shard per halving, O(1)
        // amortized, and never thrashes with growth.
        let map = &mut self.shards[shard];
        if map.capacity() > MIN_KEPT_CAPACITY && map.len() < map.capacity() / 4 {
            map.shrink_to(map.len() * 2);
        }
        Some(removed)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.shards.iter_mut().flat_map(|shard| shard.iter_mut())
    }

    /// Back to one map after a peak: 64 shards at their kept capacity
    /// would hold room for 4,096 entries however few are left.
    fn merge(&mut self) {
        let mut single = HashMap::with_capacity_and_hasher(self.len, self.hasher.clone());
        for shard in std::mem::take(&mut self.shards) {
            single.extend(shard);
        }
        self.shards = vec![single];
    }

    fn split(&mut self) {
        let single = std::mem::take(&mut self.shards).pop().expect("one shard");
        self.shards = (0..SHARDS)
            .map(|_| HashMap::with_hasher(self.hasher.clone()))
            .collect();
        for (key, value) in single {
            let shard = self.shard_of(&key);
            self.shards[shard].insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map_across_the_split() {
        let mut map: ShardedMap<u64, u64> = ShardedMap::default();
        let n = (SPLIT_AT * 3) as u64;
        for i in 0..n {
            assert_eq!(map.insert(i, i * 2), None);
        }
        assert_eq!(map.shards.len(), SHARDS);
        assert_eq!(map.len(), n as usize);
        assert_eq!(map.insert(7, 0), Some(14));
        assert_eq!(map.get(&7), Some(&0));
        *map.get_mut(&8).unwrap() = 1;
        assert_eq!(map.get_key_value(&8), Some((&8, &1)));
        for i in (0..n).step_by(2) {
            assert!(map.remove(&i).is_some());
        }
        assert_eq!(map.remove(&0), None);
        assert_eq!(map.len(), (n / 2) as usize);
        assert_eq!(map.iter().count(), (n / 2) as usize);
        assert!(map.iter().all(|(_, v)| *v % 2 == 0));
        assert!(map.shards.iter().all(|s| s.len() < SPLIT_AT));
        for i in 0..n {
            map.remove(&i);
        }
        assert_eq!(map.shards.len(), 1, "merged back after the peak");
        assert!(map.shards[0].capacity() <= 2 * MIN_KEPT_CAPACITY);
    }
}
