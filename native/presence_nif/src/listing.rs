//! `list/1`: small topics decoded on each call, large ones kept as terms.
//!
//! Decoding a listing (`binary_to_term` of what `presence_core::etf`
//! writes) costs about five times what building the same map from ready
//! pairs does, while copying a map that already exists costs about as much
//! as that floor. So a topic listed with at least [`KEEP_MIN`] presences
//! keeps its listing as a term in a process-independent environment, and
//! each list copies it into the caller after refreshing the keys that
//! changed since (`presence_core::listing` records them as writes happen).
//!
//! Locks: a kept listing has its own, taken before the table's `state`
//! and held while the listing is refreshed and copied, so that two lists of
//! one topic apply changes in the order they were taken. Writers never
//! take it. On a normal scheduler neither lock is waited for (`:busy`).
//!
//! Memory: a kept listing holds a map as large as the one `list/1` returns
//! (about 250 bytes a presence with small metas), and the garbage its
//! refreshes leave, up to as much again before it is compacted. One not
//! listed for [`IDLE_DROP`] is dropped at the next list or diff take, and
//! at most [`MAX_KEPT`] are kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use presence_core::listing::{ListingChanges, WatchId};
use presence_core::outbox::listed_size;
use presence_core::{etf, Bytes, Snapshot};
use rustler::env::{OwnedEnv, SavedTerm};
use rustler::{Encoder, Env, Term};

use crate::atoms;
use crate::encode::{self, bytes_term, Entry};
use crate::resource::{spin_lock, State, Table};
use crate::schedule::{charge_for_bytes, Charge};

/// Topics with fewer presences are decoded on each list: keeping them
/// would save little and cost memory for each of what may be many.
pub(crate) const KEEP_MIN: usize = 128;

/// A kept listing not listed for this long is dropped.
const IDLE_DROP: Duration = Duration::from_secs(10);

/// Kept listings at most; past it, the least recently listed goes.
const MAX_KEPT: usize = 64;

/// How often kept listings are looked over for idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Listings decoded on the calling scheduler: up to this many presences
/// and bytes (about a quarter of a millisecond); larger ones go dirty.
/// Bytes decide as much as presences: a thousand 60 KB metas are 60 MB.
const INLINE_DECODE_PRESENCES: usize = 1_000;
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// Kept listings copied on the calling scheduler: up to this many keys
/// (a copy takes about 0.1 µs a key), after refreshing up to this many.
const INLINE_COPY_KEYS: usize = 4_000;
const INLINE_REFRESH_KEYS: usize = 64;

/// Where a list runs: on the caller's scheduler, where nothing is waited
/// for and large work is refused, or on a dirty one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Inline,
    Dirty,
}

/// What a list could not do where it runs.
pub(crate) enum Refused {
    /// A lock is taken: the caller yields and calls again.
    Busy,
    /// The work belongs on a dirty scheduler.
    TooLarge,
}

impl Refused {
    pub(crate) fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self {
            Refused::Busy => atoms::busy().encode(env),
            Refused::TooLarge => atoms::too_large().encode(env),
        }
    }
}

/// The kept listings of one table, by topic.
#[derive(Default)]
pub(crate) struct Listings {
    kept: Mutex<HashMap<Vec<u8>, Arc<Mutex<Kept>>>>,
    /// Whether `kept` may hold anything: lets a diff take skip the sweep
    /// without a lock.
    any: AtomicBool,
    last_sweep: Mutex<Option<Instant>>,
}

struct Kept {
    copy: Option<Copy>,
    last_read: Instant,
}

/// A listing as a term, and the watch that says what changed since.
struct Copy {
    env: OwnedEnv,
    map: SavedTerm,
    watch: WatchId,
    keys: usize,
    /// Estimates, in bytes of external format: a key's entry, when the map
    /// was built, and the garbage refreshes left in `env`.
    bytes_per_key: usize,
    garbage_bytes: usize,
}

/// The listing of `topic` for a caller in `env`: a map, or why it could
/// not be made where it runs.
pub(crate) fn list<'a>(
    env: Env<'a>,
    table: &Table,
    topic: &[u8],
    mode: Mode,
) -> Result<Term<'a>, Refused> {
    let mut state = lock(table, mode)?;
    let len = state.registry.topic_len(topic);
    if len == 0 {
        return Ok(rustler::types::map::map_new(env));
    }
    if len < KEEP_MIN && !state.registry.is_listing_watched(topic) {
        let snapshot = observed(&mut state, topic);
        drop(state);
        return decoded(env, snapshot, mode);
    }
    drop(state);

    let slot = table.listings.slot(topic, mode)?;
    let mut kept = match mode {
        Mode::Inline => spin_lock(&slot).ok_or(Refused::Busy)?,
        Mode::Dirty => slot.lock(),
    };
    let listed = kept_listing(env, table, topic, mode, &mut kept);
    kept.last_read = Instant::now();
    drop(kept);
    table.listings.sweep_if_due(table, mode);
    listed
}

/// [`list`] of a topic that may have a kept listing, with its lock held.
fn kept_listing<'a>(
    env: Env<'a>,
    table: &Table,
    topic: &[u8],
    mode: Mode,
    kept: &mut Kept,
) -> Result<Term<'a>, Refused> {
    let mut state = lock(table, mode)?;
    state.registry.observe(topic);
    if let Some(copy) = &kept.copy {
        let refresh = state
            .registry
            .listing_changes_pending(topic, copy.watch)
            .filter(|changes| *changes <= copy.keys / 4 + 16);
        if let Some(changes) = refresh {
            if mode == Mode::Inline
                && (copy.keys > INLINE_COPY_KEYS || changes > INLINE_REFRESH_KEYS)
            {
                return Err(Refused::TooLarge);
            }
            let ListingChanges::Keys(keys) = state.registry.take_listing_changes(topic, copy.watch)
            else {
                unreachable!("pending changes were counted under this lock");
            };
            let changed = state.registry.listed_under(topic, keys);
            drop(state);
            let _charge = (mode == Mode::Inline).then(|| Charge::start(env));
            let copy = kept.copy.as_mut().expect("checked above");
            copy.refresh(&changed);
            return Ok(copy.copy_into(env));
        }
    }

    // No listing kept, or refreshing it would cost more than building it.
    if let Some(old) = kept.copy.take() {
        state.registry.unwatch_listing(topic, old.watch);
    }
    let snapshot = match observed(&mut state, topic) {
        Some(snapshot) if snapshot.len() >= KEEP_MIN / 2 => snapshot,
        small_or_none => {
            drop(state);
            return decoded(env, small_or_none, mode);
        }
    };
    if mode == Mode::Inline && too_large_inline(&snapshot) {
        return Err(Refused::TooLarge);
    }
    let watch = state
        .registry
        .watch_listing(topic)
        .expect("the topic has presences: the snapshot has");
    drop(state);
    let _charge = (mode == Mode::Inline).then(|| Charge::start(env));
    let copy = kept.copy.insert(Copy::build(&snapshot, watch));
    Ok(copy.copy_into(env))
}

/// A snapshot of `topic` for a listing, which a client may sync from:
/// the registry must then send the leave of anything in it.
pub(crate) fn observed(state: &mut State, topic: &[u8]) -> Option<Snapshot<Entry>> {
    state.registry.observe(topic);
    state.registry.snapshot(topic)
}

/// A listing decoded into the caller's heap, on each call.
fn decoded<'a>(
    env: Env<'a>,
    snapshot: Option<Snapshot<Entry>>,
    mode: Mode,
) -> Result<Term<'a>, Refused> {
    let Some(snapshot) = snapshot else {
        return Ok(rustler::types::map::map_new(env));
    };
    if mode == Mode::Inline {
        if too_large_inline(&snapshot) {
            return Err(Refused::TooLarge);
        }
        charge_for_bytes(env, snapshot.iter().map(listed_size).sum());
    }
    Ok(encode::grouped(env, snapshot.iter()))
}

fn too_large_inline(snapshot: &Snapshot<Entry>) -> bool {
    snapshot.len() > INLINE_DECODE_PRESENCES
        || snapshot.iter().map(listed_size).sum::<usize>() > INLINE_DECODE_BYTES
}

fn lock(table: &Table, mode: Mode) -> Result<MutexGuard<'_, State>, Refused> {
    match mode {
        Mode::Inline => table.try_lock().ok_or(Refused::Busy),
        Mode::Dirty => Ok(table.lock()),
    }
}

impl Copy {
    fn build(snapshot: &Snapshot<Entry>, watch: WatchId) -> Copy {
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
    fn refresh(&mut self, changed: &[(Bytes, Vec<Entry>)]) {
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

    fn copy_into<'a>(&self, env: Env<'a>) -> Term<'a> {
        self.env.run(|e| self.map.load(e).in_env(env))
    }
}

impl Listings {
    /// The slot of `topic`'s kept listing, made empty if there is none. A
    /// sweep may drop it from the table before the caller locks it: the
    /// caller then lists as usual, and what it keeps goes with the slot.
    fn slot(&self, topic: &[u8], mode: Mode) -> Result<Arc<Mutex<Kept>>, Refused> {
        let mut kept = match mode {
            Mode::Inline => spin_lock(&self.kept).ok_or(Refused::Busy)?,
            Mode::Dirty => self.kept.lock(),
        };
        self.any.store(true, Ordering::Relaxed);
        if let Some(slot) = kept.get(topic) {
            return Ok(slot.clone());
        }
        let slot = Arc::new(Mutex::new(Kept {
            copy: None,
            last_read: Instant::now(),
        }));
        kept.insert(topic.to_vec(), slot.clone());
        Ok(slot)
    }

    /// Drops the listings not listed for [`IDLE_DROP`], and the least
    /// recently listed past [`MAX_KEPT`]; at most once a [`SWEEP_EVERY`].
    /// One being listed right now is skipped.
    pub(crate) fn sweep_if_due(&self, table: &Table, mode: Mode) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        {
            let Some(mut last) = self.last_sweep.try_lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let dropped = self.take_idle();
        if dropped.is_empty() {
            return;
        }
        // Without the table lock the watches stay, and lose themselves
        // after a bounded number of changes.
        if let Ok(mut state) = lock(table, mode) {
            for (topic, watch) in &dropped {
                state.registry.unwatch_listing(topic, *watch);
            }
        }
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
