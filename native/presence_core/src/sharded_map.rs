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

use hashbrown::HashTable;

/// Entries a map holds before it is split into shards.
pub const SPLIT_AT: usize = 16_384;
/// Shards of a split map: a power of two.
pub const SHARDS: usize = 64;
/// Capacity a shard keeps however empty it gets.
const MIN_KEPT_CAPACITY: usize = 64;
/// The shard of an entry, from the hash its shard's table also uses: not
/// its low bits, which place the entry in that table, nor its top seven,
/// the tag the table compares before the entry itself (were they fixed
/// within a shard, a lookup would compare most of the entries it probes).
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

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
        shard_of(self.hasher.hash_one(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
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

/// A hash table of values that carry their own key, hashed and compared
/// by the caller (`hashbrown::HashTable`), split into shards past
/// [`SPLIT_AT`] entries like [`ShardedMap`]. Values can be as small as an
/// index into storage held elsewhere: the table then costs a few bytes an
/// entry instead of a copy of each key.
#[derive(Debug)]
pub struct ShardedTable<T> {
    shards: Vec<HashTable<T>>,
    len: usize,
}

impl<T> Default for ShardedTable<T> {
    fn default() -> Self {
        Self {
            shards: vec![HashTable::new()],
            len: 0,
        }
    }
}

impl<T> ShardedTable<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    fn shard(&self, hash: u64) -> usize {
        if self.shards.len() == 1 {
            0
        } else {
            shard_of(hash)
        }
    }

    pub fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.shards[self.shard(hash)].find(hash, eq)
    }

    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&mut T> {
        let shard = self.shard(hash);
        self.shards[shard].find_mut(hash, eq)
    }

    /// Adds `value`, which no entry equals. `hasher` rehashes entries as
    /// the table grows, or splits.
    pub fn insert_unique(&mut self, hash: u64, value: T, hasher: impl Fn(&T) -> u64) {
        if self.shards.len() == 1 && self.len >= SPLIT_AT {
            self.split(&hasher);
        }
        let shard = self.shard(hash);
        self.shards[shard].insert_unique(hash, value, hasher);
        self.len += 1;
    }

    pub fn remove(
        &mut self,
        hash: u64,
        eq: impl FnMut(&T) -> bool,
        hasher: impl Fn(&T) -> u64,
    ) -> Option<T> {
        let shard = self.shard(hash);
        let (removed, _) = self.shards[shard].find_entry(hash, eq).ok()?.remove();
        self.len -= 1;
        if self.shards.len() > 1 && self.len < MERGE_AT {
            self.merge(&hasher);
            return Some(removed);
        }
        // As ShardedMap::remove: memory back after a peak.
        let table = &mut self.shards[shard];
        if table.capacity() > MIN_KEPT_CAPACITY && table.len() < table.capacity() / 4 {
            table.shrink_to(table.len() * 2, hasher);
        }
        Some(removed)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.shards.iter_mut().flat_map(|shard| shard.iter_mut())
    }

    fn merge(&mut self, hasher: &impl Fn(&T) -> u64) {
        let mut single = HashTable::with_capacity(self.len);
        for shard in std::mem::take(&mut self.shards) {
            for value in shard {
                single.insert_unique(hasher(&value), value, hasher);
            }
        }
        self.shards = vec![single];
    }

    fn split(&mut self, hasher: &impl Fn(&T) -> u64) {
        let single = std::mem::take(&mut self.shards).pop().expect("one shard");
        self.shards = (0..SHARDS).map(|_| HashTable::new()).collect();
        for value in single {
            let hash = hasher(&value);
            self.shards[shard_of(hash)].insert_unique(hash, value, hasher);
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
        assert_eq!(map.get(&8), Some(&1));
        for i in (0..n).step_by(2) {
            assert!(map.remove(&i).is_some());
        }
        assert_eq!(map.remove(&0), None);
        assert_eq!(map.len(), (n / 2) as usize);
        assert!((0..n).all(|i| map.get(&i).is_none_or(|v| *v % 2 == 0)));
        assert!(map.shards.iter().all(|s| s.len() < SPLIT_AT));
        for i in 0..n {
            map.remove(&i);
        }
        assert_eq!(map.shards.len(), 1, "merged back after the peak");
        assert!(map.shards[0].capacity() <= 2 * MIN_KEPT_CAPACITY);
    }

    #[test]
    fn a_table_finds_what_it_holds_across_the_split() {
        let hasher = RandomState::new();
        let hash = |v: &u64| hasher.hash_one(v);
        let mut table: ShardedTable<u64> = ShardedTable::default();
        let n = (SPLIT_AT * 3) as u64;
        for i in 0..n {
            table.insert_unique(hash(&i), i, hash);
        }
        assert_eq!((table.shards.len(), table.len()), (SHARDS, n as usize));
        assert!(table.shards.iter().all(|s| s.len() < SPLIT_AT));
        for i in (0..n).step_by(2) {
            assert_eq!(table.remove(hash(&i), |v| *v == i, hash), Some(i));
        }
        assert_eq!(table.find(hash(&0), |v| *v == 0), None);
        assert_eq!(table.find(hash(&1), |v| *v == 1), Some(&1));
        *table.find_mut(hash(&3), |v| *v == 3).unwrap() = 3;
        assert_eq!(table.iter().count(), (n / 2) as usize);
        for i in 0..n {
            table.remove(hash(&i), |v| *v == i, hash);
        }
        assert_eq!(table.shards.len(), 1, "merged back after the peak");
        assert!(table.shards[0].capacity() <= 2 * MIN_KEPT_CAPACITY);
    }
}
