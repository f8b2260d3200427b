//! Large topics' listings kept as terms between lists (see `listing.rs`
//! for when they are used): the copy, how it is refreshed and compacted,
//! and which are dropped.
//!
//! Memory: a kept listing holds a map as large as the one `list/1` returns
//! (about 220 bytes a presence with small metas), and the garbage its
//! refreshes leave, up to as much again before it is compacted. One not
//! listed for [`IDLE_DROP`] is dropped at the next list or diff take, and
//! at most [`MAX_KEPT`] are kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use presence_core::listing::WatchId;
use presence_core::{etf, Bytes, Snapshot};
use rustler::env::{OwnedEnv, SavedTerm};
use rustler::{Env, Term};

use crate::encode::{self, bytes_term, Entry};
use crate::spin::spin_lock;

/// A kept listing not listed for this long is dropped.
const IDLE_DROP: Duration = Duration::from_secs(10);

/// Kept listings at most; past it, the least recently listed goes.
const MAX_KEPT: usize = 64;

/// How often kept listings are looked over for idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The kept listings of one table, by topic.
#[derive(Default)]
pub(crate) struct Listings {
    kept: Mutex<HashMap<Vec<u8>, Arc<Mutex<Kept>>>>,
    /// Whether `kept` may hold anything: lets a diff take skip the sweep
    /// without a lock.
    any: AtomicBool,
    last_sweep: Mutex<Option<Instant>>,
}

pub(crate) struct Kept {
    pub(crate) copy: Option<Copy>,
    pub(crate) last_read: Instant,
}

/// A listing as a term, and the watch that says what changed since.
pub(crate) struct Copy {
    env: OwnedEnv,
    map: SavedTerm,
    pub(crate) watch: WatchId,
    pub(crate) keys: usize,
    /// Estimates, in bytes of external format: a key's entry (from the
    /// build, raised by larger refreshes), and the garbage refreshes left
    /// in `env`.
    bytes_per_key: usize,
    garbage_bytes: usize,
}

impl Copy {
    pub(crate) fn build(snapshot: &Snapshot<Entry>, watch: WatchId) -> Copy {
        let mut listing = Vec::new();
        etf::write_grouped(&mut listing, snapshot.iter()).expect("stored metas are checked maps");
        let env = OwnedEnv::new();
        let (map, keys) = env.run(|e| {
            let map = encode::decode(e, &listing);
            (env.save(map), map.map_size().expect("a listing is a map"))
        });
        let mut copy = Copy {
            env,
            map,
            watch,
            keys,
            bytes_per_key: listing.len() / keys.max(1),
            garbage_bytes: 0,
        };
        // Decoding a large map leaves its nodes scattered among the
        // decoder's scratch terms; copied out once, they lie in the order a
        // copy walks them, and each later copy into a caller is about 4×
        // faster at 100k keys (17 ms against 70).
        copy.compact();
        copy
    }

    /// Puts each changed key's presences in the map, or takes the key out
    /// when it has none left.
    pub(crate) fn refresh(&mut self, changed: &[(Bytes, Vec<Entry>)]) {
        let mut entry = Vec::new();
        let (map, keys, written) = self.env.run(|e| {
            let mut map = self.map.load(e);
            let mut written = 0;
            for (key, presences) in changed {
                let key_term = bytes_term(e, key);
                map = if presences.is_empty() {
                    map.map_remove(key_term)
                } else {
                    entry.clear();
                    let mut presences: Vec<&Entry> = presences.iter().collect();
                    etf::write_key_entry(&mut entry, &mut presences)
                        .expect("stored metas are checked maps");
                    written += entry.len() + key.len();
                    map.map_put(key_term, encode::decode(e, &entry))
                }
                .expect("a listing is a map");
            }
            let keys = map.map_size().expect("a listing is a map");
            (self.env.save(map), keys, written)
        });
        self.map = map;
        // A put copies the key's path through the map as well: count the
        // entry twice and a bit.
        self.garbage_bytes += 2 * written + 64 * changed.len();
        self.keys = keys;
        // Metas may grow after the build: the estimate that bounds the work
        // done on a normal scheduler only ever rises with what refreshes
        // write, so it errs towards a dirty scheduler.
        let put = changed.iter().filter(|(_, p)| !p.is_empty()).count();
        if let Some(per_key) = written.checked_div(put) {
            self.bytes_per_key = self.bytes_per_key.max(per_key);
        }
        if self.garbage_bytes > self.keys * self.bytes_per_key + 64 * 1024 {
            self.compact();
        }
    }

    /// Moves the map into a fresh environment, leaving behind the garbage
    /// of its refreshes, and laying it out in the order a copy reads it.
    fn compact(&mut self) {
        let fresh = OwnedEnv::new();
        let map = fresh.run(|into| {
            let copied = self.env.run(|from| self.map.load(from).in_env(into));
            fresh.save(copied)
        });
        self.env = fresh;
        self.map = map;
        self.garbage_bytes = 0;
    }

    /// The map's size in external format, estimated (see `bytes_per_key`).
    pub(crate) fn estimated_bytes(&self) -> usize {
        self.keys * self.bytes_per_key
    }

    /// A key's entry in external format, on average when the map was built.
    pub(crate) fn bytes_per_key(&self) -> usize {
        self.bytes_per_key
    }

    pub(crate) fn copy_into<'a>(&self, env: Env<'a>) -> Term<'a> {
        self.env.run(|e| self.map.load(e).in_env(env))
    }
}

impl Listings {
    /// The slot of `topic`'s kept listing, made empty if there is none. A
    /// sweep may drop it from the table before the caller locks it: the
    /// caller then lists as usual, and what it keeps goes with the slot.
    /// `None` when `wait` is false and the lock is taken.
    pub(crate) fn slot(&self, topic: &[u8], wait: bool) -> Option<Arc<Mutex<Kept>>> {
        let mut kept = if wait {
            self.kept.lock()
        } else {
            spin_lock(&self.kept)?
        };
        self.any.store(true, Ordering::Relaxed);
        if let Some(slot) = kept.get(topic) {
            return Some(slot.clone());
        }
        let slot = Arc::new(Mutex::new(Kept {
            copy: None,
            last_read: Instant::now(),
        }));
        kept.insert(topic.to_vec(), slot.clone());
        Some(slot)
    }

    /// Drops the listings not listed for [`IDLE_DROP`], and the least
    /// recently listed past [`MAX_KEPT`], at most once a [`SWEEP_EVERY`]
    /// (one being listed right now is skipped); returns the watches the
    /// caller must end in the registry.
    pub(crate) fn take_idle_if_due(&self) -> Vec<(Vec<u8>, WatchId)> {
        if !self.any.load(Ordering::Relaxed) {
            return Vec::new();
        }
        {
            let Some(mut last) = self.last_sweep.try_lock() else {
                return Vec::new();
            };
            if last.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return Vec::new();
            }
            *last = Some(Instant::now());
        }
        self.take_idle()
    }

    fn take_idle(&self) -> Vec<(Vec<u8>, WatchId)> {
        let Some(mut kept) = spin_lock(&self.kept) else {
            return Vec::new();
        };
        let mut idle: Vec<(Instant, Vec<u8>)> = Vec::new();
        let mut busy = 0;
        for (topic, slot) in kept.iter() {
            match slot.try_lock() {
                Some(k) => idle.push((k.last_read, topic.clone())),
                None => busy += 1,
            }
        }
        idle.sort();
        let over = (idle.len() + busy).saturating_sub(MAX_KEPT);
        let mut dropped = Vec::new();
        for (i, (last_read, topic)) in idle.into_iter().enumerate() {
            if i >= over && last_read.elapsed() < IDLE_DROP {
                break;
            }
            let Some(slot) = kept.get(&topic) else {
                continue;
            };
            // Taken since the look above: being listed, so not idle.
            let Some(mut listing) = slot.try_lock() else {
                continue;
            };
            if let Some(copy) = listing.copy.take() {
                dropped.push((topic.clone(), copy.watch));
            }
            drop(listing);
            kept.remove(&topic);
        }
        self.any.store(!kept.is_empty(), Ordering::Relaxed);
        dropped
    }
}
