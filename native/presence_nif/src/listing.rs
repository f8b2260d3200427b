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
//! The kept listings themselves, and their memory, are `kept.rs`'s.

use std::time::Instant;

use parking_lot::MutexGuard;
use presence_core::listing::ListingChanges;
use presence_core::outbox::listed_size;
use presence_core::Snapshot;
use rustler::{Encoder, Env, Term};

use crate::atoms;
use crate::encode::{self, Entry};
use crate::kept::{Copy, Kept};
use crate::resource::{State, Table};
use crate::schedule::{charge_for_bytes, Charge};
use crate::spin::spin_lock;

/// Topics with fewer presences are decoded on each list: keeping them
/// would save little and cost memory for each of what may be many.
pub(crate) const KEEP_MIN: usize = 128;

/// Listings decoded on the calling scheduler: up to this many presences
/// and bytes (about a quarter of a millisecond); larger ones go dirty.
/// Bytes decide as much as presences: a thousand 60 KB metas are 60 MB.
const INLINE_DECODE_PRESENCES: usize = 1_000;
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// Kept listings copied on the calling scheduler: up to this many
/// presences and bytes of external format (a copy of 4,000 small presences
/// takes about 0.35 ms), after refreshing up to this many keys and bytes.
/// Presences and bytes decide, not keys: one key may hold thousands.
const INLINE_COPY_PRESENCES: usize = 4_000;
const INLINE_COPY_BYTES: usize = 256 * 1024;
const INLINE_REFRESH_KEYS: usize = 64;
const INLINE_REFRESH_BYTES: usize = 16 * 1024;

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

    let slot = table
        .listings
        .slot(topic, mode == Mode::Dirty)
        .ok_or(Refused::Busy)?;
    let mut kept = match mode {
        Mode::Inline => spin_lock(&slot).ok_or(Refused::Busy)?,
        Mode::Dirty => slot.lock(),
    };
    let listed = kept_listing(env, table, topic, mode, &mut kept);
    kept.last_read = Instant::now();
    drop(kept);
    sweep_if_due(table, mode);
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
            let presences = state.registry.topic_len(topic);
            if mode == Mode::Inline
                && (presences > INLINE_COPY_PRESENCES
                    || copy.estimated_bytes() > INLINE_COPY_BYTES
                    || changes > INLINE_REFRESH_KEYS
                    || changes * copy.bytes_per_key() > INLINE_REFRESH_BYTES)
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
    // Observed above.
    let snapshot = match state.registry.snapshot(topic) {
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

/// Drops idle kept listings (see `Listings::take_idle_if_due`) and ends
/// their watches.
pub(crate) fn sweep_if_due(table: &Table, mode: Mode) {
    let dropped = table.listings.take_idle_if_due();
    if dropped.is_empty() {
        return;
    }
    // Without the table lock the watches stay, and lose themselves after a
    // bounded number of changes.
    if let Ok(mut state) = lock(table, mode) {
        for (topic, watch) in &dropped {
            state.registry.unwatch_listing(topic, *watch);
        }
    }
}
