//! The presence table resource and its NIFs.
//!
//! Writes and small reads run on normal schedulers and hold the lock for
//! microseconds. Large lists and diff batches take a copy-on-write snapshot
//! under the lock and build their terms on a dirty CPU scheduler, so writers
//! are never held up by a reader.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use presence_core::{etf, Change, CoreError, Registry, Removed, Update};
use rustler::{Binary, Encoder, Env, LocalPid, Monitor, NifResult, Resource, ResourceArc, Term};

use crate::atoms;
use crate::encode::{self, ref_term};
use crate::error::NifError;

/// A meta as `term_to_binary/1` encodes it: compact, and compared by bytes
/// to detect no-op updates.
pub type Meta = Arc<[u8]>;

/// Lists of up to this many presences are built on the calling scheduler
/// (well under 1 ms); larger ones go to `table_list_dirty`.
const INLINE_LIST_LIMIT: usize = 1_000;

/// The most presences (joins plus leaves) one `presence_diff` carries.
/// Sending a message copies it into the receiver on the sender's
/// scheduler; 2,000 presences copy in well under a millisecond, where a
/// 100k-join diff would hold a scheduler for tens.
const MAX_PRESENCES_PER_DIFF: usize = 2_000;

struct State {
    registry: Registry<LocalPid, Meta, Monitor>,
    /// Told (`:drab_presence_pending`) when the first pending diff appears.
    dispatcher: Option<LocalPid>,
}

pub struct Table {
    state: Mutex<State>,
    max_meta_bytes: usize,
}

#[rustler::resource_impl]
impl Resource for Table {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, monitor: Monitor) {
        self.write(env, |registry| {
            // Only the monitor that watches the owner now may remove it: a
            // down message of an earlier, released monitor must not.
            if registry.watch(&pid) == Some(&monitor) {
                registry.untrack_owner(pid)
            } else {
                Removed::nothing()
            }
        });
    }
}

/// What a write did that may call for the dispatcher.
trait WakesDispatcher {
    fn wakes_dispatcher(&self) -> bool;
}

impl WakesDispatcher for Change {
    fn wakes_dispatcher(&self) -> bool {
        self.wake
    }
}

impl WakesDispatcher for Update {
    fn wakes_dispatcher(&self) -> bool {
        matches!(self, Update::Changed(change) if change.wake)
    }
}

impl<W> WakesDispatcher for Removed<W> {
    fn wakes_dispatcher(&self) -> bool {
        self.wake
    }
}

impl<T: WakesDispatcher, E> WakesDispatcher for Result<T, E> {
    fn wakes_dispatcher(&self) -> bool {
        self.as_ref().is_ok_and(T::wakes_dispatcher)
    }
}

/// Locks `mutex`, poisoned or not. A panic while one of our locks was held
/// cannot leave its data half written (core operations do not panic
/// mid-change, and a diff queue only pops), so the data is safe to reuse.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs `change` under the lock, then, with the lock released, tells
    /// the dispatcher if this change made the first pending diff.
    fn write<T: WakesDispatcher>(
        &self,
        env: Env,
        change: impl FnOnce(&mut Registry<LocalPid, Meta, Monitor>) -> T,
    ) -> T {
        let (result, dispatcher) = {
            let mut state = self.lock();
            (change(&mut state.registry), state.dispatcher)
        };
        if result.wakes_dispatcher() {
            if let Some(pid) = dispatcher {
                // A dead dispatcher is fine: its successor drains on start.
                let _ = env.send(&pid, atoms::drab_presence_pending());
            }
        }
        result
    }

    /// Encodes a meta with `term_to_binary/1`. A non-map is a caller bug
    /// (Elixir checks first) and raises badarg; an oversized one is refused.
    fn encode_meta(&self, meta: Term) -> NifResult<Result<Meta, NifError>> {
        if !meta.is_map() {
            return Err(rustler::Error::BadArg);
        }
        let encoded = meta.to_binary();
        if encoded.len() > self.max_meta_bytes {
            return Ok(Err(NifError::MetaTooLarge));
        }
        etf::check_meta(&encoded).map_err(|_| rustler::Error::BadArg)?;
        Ok(Ok(Arc::from(encoded.as_slice())))
    }
}

fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[rustler::nif]
fn table_new(max_meta_bytes: usize) -> ResourceArc<Table> {
    ResourceArc::new(Table {
        state: Mutex::new(State {
            registry: Registry::new(random_seed()),
            dispatcher: None,
        }),
        max_meta_bytes,
    })
}

/// Makes `pid` the process told about pending diffs. Returns whether diffs
/// are already pending, so a restarted dispatcher drains them at once.
#[rustler::nif]
fn table_set_dispatcher(table: ResourceArc<Table>, pid: LocalPid) -> bool {
    let mut state = table.lock();
    state.dispatcher = Some(pid);
    state.registry.pending_topics() > 0
}

#[rustler::nif]
fn table_track<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
    meta: Term<'a>,
) -> NifResult<Result<Term<'a>, NifError>> {
    Ok(table.encode_meta(meta)?.and_then(|meta| {
        let change = table.write(env, |registry| {
            registry.track(pid, &topic, &key, meta, || env.monitor(&table, &pid))
        })?;
        Ok(ref_term(env, change.phx_ref))
    }))
}

#[rustler::nif]
fn table_untrack(
    env: Env,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
) -> rustler::Atom {
    let removed = table.write(env, |registry| registry.untrack(pid, &topic, &key));
    if let Some(monitor) = &removed.released_watch {
        env.demonitor(&table, monitor);
    }
    atoms::ok()
}

/// The current meta (with `phx_ref`) and its raw ref, for update functions.
#[rustler::nif]
fn table_lookup<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
) -> Result<(Term<'a>, u64), NifError> {
    let found = table.lock().registry.lookup(pid, &topic, &key).cloned();
    let presence = found.ok_or(NifError::Core(CoreError::NotTracked))?;
    Ok((encode::meta(env, &presence), presence.phx_ref))
}

/// Replaces a meta. `expected_ref` (or `nil`) guards a read-modify-write
/// against a concurrent update: a mismatch returns `{:error, :stale}`.
#[rustler::nif]
fn table_update<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
    meta: Term<'a>,
    expected_ref: Option<u64>,
) -> NifResult<Result<Term<'a>, NifError>> {
    Ok(table.encode_meta(meta)?.and_then(|meta| {
        let update = table.write(env, |registry| {
            registry.update(pid, &topic, &key, meta, expected_ref)
        })?;
        let (Update::Unchanged(phx_ref) | Update::Changed(Change { phx_ref, .. })) = update;
        Ok(ref_term(env, phx_ref))
    }))
}

/// `{users, connections}` on `topic`, from counters.
#[rustler::nif]
fn table_counts(table: ResourceArc<Table>, topic: Binary) -> (usize, usize) {
    let counts = table.lock().registry.counts(&topic);
    (counts.users, counts.connections)
}

/// The grouped presences of a topic, or `:too_large`
/// when the topic is large enough that the list belongs on a dirty scheduler.
#[rustler::nif]
fn table_list<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    list(env, &table, &topic, INLINE_LIST_LIMIT)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_list_dirty<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    list(env, &table, &topic, usize::MAX)
}

/// Lists `topic` from a snapshot (the lock is held only to take it), or
/// answers `:too_large` past `max_presences`.
fn list<'a>(env: Env<'a>, table: &Table, topic: &[u8], max_presences: usize) -> Term<'a> {
    let snapshot = table.lock().registry.snapshot(topic);
    match snapshot {
        None => rustler::types::map::map_new(env),
        Some(s) if s.len() > max_presences => atoms::too_large().encode(env),
        Some(s) => encode::grouped(env, s.iter()),
    }
}

/// The presences under one key, grouped like a list, or `[]` when there
/// are none, as Phoenix.Presence.get_by_key/2 distinguishes them.
#[rustler::nif]
fn table_get_by_key<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    topic: Binary,
    key: Binary,
) -> Term<'a> {
    let presences = table.lock().registry.get_by_key(&topic, &key);
    if presences.is_empty() {
        return Vec::<Term>::new().encode(env);
    }
    encode::grouped(env, presences.iter())
}

/// Diffs taken from a table, waiting to be encoded and sent a part at a
/// time: the dispatcher never holds more than one part's terms, so its
/// garbage collections stay small however large the diff.
pub struct DiffQueue {
    parts: Mutex<VecDeque<DiffPart>>,
}

struct DiffPart {
    topic: presence_core::Bytes,
    joins: Vec<encode::Entry>,
    leaves: Vec<encode::Entry>,
}

#[rustler::resource_impl]
impl Resource for DiffQueue {}

/// Takes the pending diffs of up to `max_topics` topics, cut into parts of
/// at most `MAX_PRESENCES_PER_DIFF` presences, as
/// `{queue, topics_still_pending}`; `diff_queue_next/1` hands out the parts.
#[rustler::nif(schedule = "DirtyCpu")]
fn table_take_diffs(
    table: ResourceArc<Table>,
    max_topics: usize,
) -> (ResourceArc<DiffQueue>, usize) {
    let (diffs, still_pending) = {
        let mut state = table.lock();
        let diffs = state.registry.take_diffs(max_topics);
        (diffs, state.registry.pending_topics())
    };
    let mut parts = VecDeque::new();
    for diff in &diffs {
        for (joins, leaves) in diff.parts(MAX_PRESENCES_PER_DIFF) {
            parts.push_back(DiffPart {
                topic: diff.topic.clone(),
                joins: joins.into_iter().cloned().collect(),
                leaves: leaves.into_iter().cloned().collect(),
            });
        }
    }
    let queue = DiffQueue {
        parts: Mutex::new(parts),
    };
    (ResourceArc::new(queue), still_pending)
}

/// The next part of a taken diff as `{topic, joins, leaves}` (grouped like
/// `list`), or `:done`.
#[rustler::nif(schedule = "DirtyCpu")]
fn diff_queue_next(env: Env, queue: ResourceArc<DiffQueue>) -> Term {
    let part = lock(&queue.parts).pop_front();
    match part {
        None => atoms::done().encode(env),
        Some(part) => (
            encode::bytes_term(env, &part.topic),
            encode::grouped(env, part.joins.iter()),
            encode::grouped(env, part.leaves.iter()),
        )
            .encode(env),
    }
}

/// Sizes of the table, for stats and tests. `nif_heap_bytes` covers every
/// table of the library, not only this one.
#[rustler::nif]
fn table_stats(env: Env, table: ResourceArc<Table>) -> NifResult<Term> {
    let state = table.lock();
    let registry = &state.registry;
    Term::map_from_pairs(
        env,
        &[
            (atoms::presences().encode(env), registry.len().encode(env)),
            (
                atoms::owners().encode(env),
                registry.owner_count().encode(env),
            ),
            (
                atoms::topics().encode(env),
                registry.topic_count().encode(env),
            ),
            (
                atoms::pending_topics().encode(env),
                registry.pending_topics().encode(env),
            ),
            (
                atoms::nif_heap_bytes().encode(env),
                crate::alloc::held_bytes().encode(env),
            ),
        ],
    )
}
