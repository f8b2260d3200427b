//! Hash tables whose growth never moves more than a few thousand entries
//! at once.
//!
//! A hash table doubles by rehashing every entry: at a million presences
//! that is tens of milliseconds with the table lock held, and every
//! scheduler waiting on the lock stalls with it. Even split into a fixed 64
//! shards, a shard of 16k entries took 5 to 10 ms to grow, and the three
//! indexes of a topic of one presence per owner grew at the same insert.
//!
//! So the entries are spread over shards by extendible hashing: a shard
//! that reaches [`SHARD_MAX`] entries splits in two, moving about half of
//! them, and a directory of shards (indexed by bits of the hash that the
//! shards' own tables do not use) doubles when a split needs a bit more.
//! No step rehashes more than [`SHARD_MAX`] entries. A small table is one
//! shard, with no overhead; a table that empties after a peak is one shard
//! again.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

/// Entries a shard holds before it splits: a split or a growth of its table
/// rehashes at most this many (well under a millisecond).
pub const SHARD_MAX: usize = 2_048;
/// Capacity a shard's table keeps however empty it gets.
const MIN_KEPT_CAPACITY: usize = 64;
/// Entries below which a table of several shards becomes one again: far
/// enough below [`SHARD_MAX`] that a table hovering around it does not
/// flip.
const MERGE_AT: usize = SHARD_MAX / 4;
/// The lowest bit of a hash the directory uses: not the low bits, which
/// place an entry in its shard's table, nor the top seven, the tag that
/// table compares before the entry itself.
const DIRECTORY_SHIFT: u32 = 32;
/// The directory's most bits: 2^20 shards of [`SHARD_MAX`] entries.
const MAX_DEPTH: u32 = 20;

/// A hash table of values that carry their own key, hashed and compared
/// by the caller (`hashbrown::HashTable`), in shards (see the module doc).
/// Values can be as small as an index into storage held elsewhere: the
/// table then costs a few bytes an entry instead of a copy of each key.
#[derive(Debug)]
pub struct ShardedTable<T> {
    /// The shard of each value of the hash's directory bits.
    directory: Vec<u32>,
    /// Bits of the hash the directory uses.
    depth: u32,
    shards: Vec<Shard<T>>,
    len: usize,
}

#[derive(Debug)]
struct Shard<T> {
    table: HashTable<T>,
    /// Bits of the hash its values share.
    depth: u32,
}

impl<T> Default for ShardedTable<T> {
    fn default() -> Self {
        Self {
            directory: vec![0],
            depth: 0,
            shards: vec![Shard {
                table: HashTable::new(),
                depth: 0,
            }],
            len: 0,
        }
    }
}

fn directory_bits(hash: u64, depth: u32) -> usize {
    ((hash >> DIRECTORY_SHIFT) & ((1 << depth) - 1)) as usize
}

impl<T> ShardedTable<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    fn shard(&self, hash: u64) -> usize {
        self.directory[directory_bits(hash, self.depth)] as usize
    }

    pub fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.shards[self.shard(hash)].table.find(hash, eq)
    }

    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&mut T> {
        let shard = self.shard(hash);
        self.shards[shard].table.find_mut(hash, eq)
    }

    /// Adds `value`, which no entry equals. `hasher` rehashes entries as
    /// a shard grows, or splits.
    pub fn insert_unique(&mut self, hash: u64, value: T, hasher: impl Fn(&T) -> u64) {
        let mut shard = self.shard(hash);
        if self.shards[shard].table.len() >= SHARD_MAX && self.shards[shard].depth < MAX_DEPTH {
            self.split(shard, &hasher);
            shard = self.shard(hash);
        }
        self.shards[shard].table.insert_unique(hash, value, hasher);
        self.len += 1;
    }

    pub fn remove(
        &mut self,
        hash: u64,
        eq: impl FnMut(&T) -> bool,
        hasher: impl Fn(&T) -> u64,
    ) -> Option<T> {
        let shard = self.shard(hash);
        let (removed, _) = self.shards[shard].table.find_entry(hash, eq).ok()?.remove();
        self.len -= 1;
        if self.shards.len() > 1 && self.len < MERGE_AT {
            self.merge(&hasher);
            return Some(removed);
        }
        // Memory back after a peak: shrinking when a quarter full costs
        // one rehash of the (bounded) shard per halving, O(1) amortized,
        // and never thrashes with growth.
        let table = &mut self.shards[shard].table;
        if table.capacity() > MIN_KEPT_CAPACITY && table.len() < table.capacity() / 4 {
            table.shrink_to(table.len() * 2, hasher);
        }
        Some(removed)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.shards
            .iter_mut()
            .flat_map(|shard| shard.table.iter_mut())
    }

    /// Splits a full shard in two by its next bit, doubling the directory
    /// first if that bit is new to it.
    fn split(&mut self, shard: usize, hasher: &impl Fn(&T) -> u64) {
        let bit = self.shards[shard].depth;
        if bit == self.depth {
            self.directory.extend_from_within(..);
            self.depth += 1;
        }
        let mut stays = HashTable::with_capacity(SHARD_MAX / 2);
        let mut moves = HashTable::with_capacity(SHARD_MAX / 2);
        for value in self.shards[shard].table.drain() {
            let hash = hasher(&value);
            let half = if (hash >> (DIRECTORY_SHIFT + bit)) & 1 == 0 {
                &mut stays
            } else {
                &mut moves
            };
            half.insert_unique(hash, value, hasher);
        }
        let new_shard = self.shards.len() as u32;
        self.shards[shard] = Shard {
            table: stays,
            depth: bit + 1,
        };
        self.shards.push(Shard {
            table: moves,
            depth: bit + 1,
        });
        for (bits, entry) in self.directory.iter_mut().enumerate() {
            if *entry as usize == shard && (bits >> bit) & 1 == 1 {
                *entry = new_shard;
            }
        }
    }

    /// Back to one shard after a peak: many shards at their kept capacity
    /// would hold room for far more entries than are left.
    fn merge(&mut self, hasher: &impl Fn(&T) -> u64) {
        let mut single = HashTable::with_capacity(self.len);
        for shard in std::mem::take(&mut self.shards) {
            for value in shard.table {
                single.insert_unique(hasher(&value), value, hasher);
            }
        }
        self.shards = vec![Shard {
            table: single,
            depth: 0,
        }];
        self.directory = vec![0];
        self.depth = 0;
    }
}

/// A hash map over a [`ShardedTable`] of its pairs, hashed by `S`.
#[derive(Debug)]
pub struct ShardedMap<K, V, S = RandomState> {
    table: ShardedTable<(K, V)>,
    hasher: S,
}

impl<K, V, S: Default> Default for ShardedMap<K, V, S> {
    fn default() -> Self {
        Self {
            table: ShardedTable::default(),
            hasher: S::default(),
        }
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> ShardedMap<K, V, S> {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.table
            .find(self.hasher.hash_one(key), |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.table
            .find_mut(self.hasher.hash_one(key), |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let hash = self.hasher.hash_one(&key);
        if let Some((_, old)) = self.table.find_mut(hash, |(k, _)| *k == key) {
            return Some(std::mem::replace(old, value));
        }
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash, (key, value), |(k, _)| hasher.hash_one(k));
        None
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hasher = &self.hasher;
        self.table
            .remove(
                hasher.hash_one(key),
                |(k, _)| k.borrow() == key,
                |(k, _)| hasher.hash_one(k),
            )
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_behaves_as_a_map_across_splits_and_merges() {
        let mut map: ShardedMap<u64, u64> = ShardedMap::default();
        let n = (SHARD_MAX * 40) as u64;
        for i in 0..n {
            assert_eq!(map.insert(i, i * 2), None);
        }
        assert!(map.table.shards.len() >= 32);
        assert!(map.table.shards.iter().all(|s| s.table.len() <= SHARD_MAX));
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
        for i in 0..n {
            map.remove(&i);
        }
        assert_eq!(map.table.shards.len(), 1, "merged back after the peak");
        assert!(map.table.shards[0].table.capacity() <= 2 * MIN_KEPT_CAPACITY);
    }

    #[test]
    fn a_table_finds_what_it_holds_across_splits() {
        let hasher = RandomState::new();
        let hash = |v: &u64| hasher.hash_one(v);
        let mut table: ShardedTable<u64> = ShardedTable::default();
        let n = (SHARD_MAX * 40) as u64;
        for i in 0..n {
            table.insert_unique(hash(&i), i, hash);
        }
        assert_eq!(table.len(), n as usize);
        // Each directory slot names the shard its hashes are in.
        for (bits, &shard) in table.directory.iter().enumerate() {
            let depth = table.shards[shard as usize].depth;
            assert!(depth <= table.depth);
            for value in table.shards[shard as usize].table.iter() {
                let mask = (1 << depth) - 1;
                assert_eq!(directory_bits(hash(value), depth) & mask, bits & mask);
            }
        }
        for i in (0..n).step_by(2) {
            assert_eq!(table.remove(hash(&i), |v| *v == i, hash), Some(i));
        }
        assert_eq!(table.find(hash(&0), |v| *v == 0), None);
        assert_eq!(table.find(hash(&1), |v| *v == 1), Some(&1));
        *table.find_mut(hash(&3), |v| *v == 3).unwrap() = 3;
        assert_eq!(table.len(), (n / 2) as usize);
        for i in 0..n {
            table.remove(hash(&i), |v| *v == i, hash);
        }
        assert_eq!(table.shards.len(), 1, "merged back after the peak");
    }
}
