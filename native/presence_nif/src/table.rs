//! The presence table resource and its NIFs.
//!
//! Writes and small reads run on normal schedulers and hold the lock for
//! microseconds. Large lists and diff batches take a copy-on-write snapshot
//! under the lock and build their terms on a dirty CPU scheduler, so writers
//! are never held up by a reader.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use presence_core::delta::Outgoing;
use presence_core::outbox::{listed_size, Outbox, OutboxPart, PART_LIMITS};
use presence_core::{etf, Change, CoreError, Registry, Removed, Snapshot, Update};
use rustler::{
    Binary, Encoder, Env, LocalPid, Monitor, NifResult, OwnedEnv, Resource, ResourceArc, Term,
};

use crate::atoms;
use crate::encode::{self, ref_term, Entry};
use crate::error::NifError;
use crate::size;
#[cfg(feature = "test-hooks")]
use crate::test_hooks::ExitHold;

/// Without the test hooks, timing an exit's lock holds costs nothing.
#[cfg(not(feature = "test-hooks"))]
struct ExitHold;

#[cfg(not(feature = "test-hooks"))]
impl ExitHold {
    fn start() -> Self {
        ExitHold
    }
}

/// A meta as `term_to_binary/1` encodes it: compact, compared by bytes to
/// detect no-op updates, and held inline when short (Drab's own is).
pub type Meta = presence_core::Bytes;

/// Listings of up to this many presences, and this many bytes, are built
/// on the calling scheduler (about a quarter of a millisecond); larger ones
/// go to a dirty scheduler. Bytes decide as much as presences: a thousand
/// 60 KB metas are 60 MB to decode.
const INLINE_LIST_PRESENCES: usize = 1_000;
const INLINE_LIST_BYTES: usize = 64 * 1024;

/// Bytes of listing decoded in about one timeslice (1 ms), to charge the
/// caller's reductions in proportion to the work a list does inline.
const BYTES_PER_TIMESLICE: usize = 256 * 1024;

/// `get_by_key/2` of a key with more presences than this goes to a dirty
/// scheduler without collecting them under the lock.
const INLINE_KEY_PRESENCES: usize = 64;

/// Taking diffs looks for joins among every presence of each topic taken,
/// and copies them into parts: up to this many (a few hundred
/// microseconds) are done on the dispatcher's scheduler, more go dirty.
const INLINE_TAKE_WORK: usize = 2_000;

/// A timeslice, as `enif_consume_timeslice` counts it: 1 ms.
const TIMESLICE_US: u128 = 1_000;

/// How long a NIF on a normal scheduler spins for the table lock before
/// it answers `:busy` (see [`Shared::try_lock`]): a few times the longest
/// a writer holds it.
const LOCK_SPIN: Duration = Duration::from_micros(20);

/// Presences of an exited owner removed per hold of the lock (tens of
/// microseconds). An owner with more is removed by a thread of its own, a
/// chunk at a time: a `down` callback cannot yield, and removing 40k
/// presences in one would hold its scheduler for tens of milliseconds.
const DEPART_CHUNK: usize = 64;

pub(crate) struct State {
    pub(crate) registry: Registry<LocalPid, Meta, Monitor>,
    /// Told (`:drab_presence_pending`) when the first pending diff appears.
    pub(crate) dispatcher: Option<LocalPid>,
}

/// A presence table: the resource handed to Elixir. Its contents live
/// behind an `Arc` so that a thread removing a large exited owner can hold
/// them without holding the resource.
pub struct Table(Arc<Shared>);

pub struct Shared {
    pub(crate) state: Mutex<State>,
    /// Diff parts taken from the registry and not yet acknowledged as
    /// broadcast. Writers never take this lock, so they never wait on a
    /// delivery. Lock order: `outbox`, then `state`; never `outbox` while
    /// `state` is held (taking diffs holds both, in that order).
    outbox: Mutex<Outbox<LocalPid, Meta>>,
    /// This node's changes for the other nodes (cluster mode). Lock order:
    /// after `outbox`, before `state`.
    pub(crate) replication: Mutex<Replication>,
    /// Names this table's replica on other nodes: a node that restarts gets
    /// a new one, so what others held of its previous life is dropped.
    pub(crate) incarnation: uuid::Uuid,
    max_meta_bytes: AtomicUsize,
}

// A panic in a NIF (caught by rustler) may unwind while a lock is held.
// parking_lot does not poison, so the next caller sees the data as the
// panic left it: core operations check before they change anything, and
// the outbox only pushes and pops whole parts, so that is a consistent
// state.
impl std::panic::RefUnwindSafe for Shared {}

impl std::ops::Deref for Table {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// This node's changes not yet sent to the other nodes, and how many
/// deltas went out before them.
#[derive(Default)]
pub(crate) struct Replication {
    /// Told (`:drab_presence_delta`) when changes start waiting; `None`
    /// outside cluster mode, when no delta is recorded at all.
    pub(crate) replicator: Option<LocalPid>,
    pub(crate) outgoing: Outgoing,
    /// The replica id of each peer (by its name, as the replicator encodes
    /// it), kept with the table so that a restarted replicator finds which
    /// presences are whose.
    pub(crate) replica_ids: std::collections::HashMap<Vec<u8>, presence_core::ReplicaId>,
    pub(crate) last_replica_id: presence_core::ReplicaId,
}

#[rustler::resource_impl]
impl Resource for Table {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, monitor: Monitor) {
        let departure = {
            let mut state = self.lock();
            let _hold = ExitHold::start();
            // Only the monitor that watches the owner now may remove it: a
            // down message of an earlier, released monitor must not.
            if state.registry.watch(&pid) != Some(&monitor) {
                return;
            }
            state
                .registry
                .depart(pid)
                .map(|(_monitor, departure)| departure)
        };
        if let Some(departure) = departure {
            self.remove_detached(env, departure);
        }
    }
}

impl Table {
    /// Removes detached presences (an exited owner's, a dropped replica's):
    /// inline when they fit in one chunk, else a chunk at a time from a
    /// short-lived thread, handing the lock to writers between chunks.
    pub(crate) fn remove_detached(&self, env: Env, mut departure: presence_core::Departure) {
        if departure.remaining() <= DEPART_CHUNK {
            self.write(env, |registry| {
                let _hold = ExitHold::start();
                registry.remove_departed(&mut departure, DEPART_CHUNK)
            });
            return;
        }
        // Through a slot, so that a thread that cannot be spawned hands the
        // departure back instead of dropping it with its closure.
        let slot = Arc::new(Mutex::new(Some(departure)));
        let (shared, for_thread) = (Arc::clone(&self.0), Arc::clone(&slot));
        let spawned = std::thread::Builder::new()
            .name("presence-departure".into())
            .spawn(move || {
                if let Some(departure) = for_thread.lock().take() {
                    shared.remove_departure(departure);
                }
            });
        if spawned.is_err() {
            if let Some(departure) = slot.lock().take() {
                self.remove_departure(departure);
            }
        }
    }
}

/// What a write did that may call for the dispatcher.
pub(crate) trait WakesDispatcher {
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

/// Tells the dispatcher about the first pending diff, if `change` made it.
/// Called with the lock released.
fn wake_if_needed(env: Env, change: &impl WakesDispatcher, dispatcher: Option<LocalPid>) {
    if let (true, Some(pid)) = (change.wakes_dispatcher(), dispatcher) {
        // A dead dispatcher is fine: its successor drains on start.
        let _ = env.send(&pid, atoms::drab_presence_pending());
    }
}

impl Shared {
    /// The registry lock. parking_lot's: it can be handed over fairly, and
    /// a panic under it (caught by rustler) leaves no poison behind; core
    /// operations do not panic mid-change, so the data is safe to reuse.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// The lock for a NIF on a normal scheduler: taken if it is free, or
    /// comes free within a few microseconds; otherwise `None`, and the NIF
    /// answers `:busy` for its caller to yield and call again. Waiting in
    /// the lock would park the scheduler's thread, and with it every
    /// process queued on that scheduler, until the OS runs it again: with
    /// four writers on two cores, that was up to 20 ms at a time.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        if let Some(state) = self.state.try_lock() {
            return Some(state);
        }
        let started = Instant::now();
        while started.elapsed() < LOCK_SPIN {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if let Some(state) = self.state.try_lock() {
                return Some(state);
            }
        }
        None
    }

    /// [`Shared::write`] for a NIF on a normal scheduler: `None`, having
    /// changed nothing, when the lock is busy (see [`Shared::try_lock`]).
    pub(crate) fn try_write<T: WakesDispatcher>(
        &self,
        env: Env,
        change: impl FnOnce(&mut Registry<LocalPid, Meta, Monitor>) -> T,
    ) -> Option<T> {
        let (result, dispatcher) = {
            let mut state = self.try_lock()?;
            (change(&mut state.registry), state.dispatcher)
        };
        wake_if_needed(env, &result, dispatcher);
        Some(result)
    }

    /// Runs `change` under the lock, then, with the lock released, tells
    /// the dispatcher if this change made the first pending diff. Off the
    /// normal schedulers only (a thread of ours, a `down` callback).
    pub(crate) fn write<T: WakesDispatcher>(
        &self,
        env: Env,
        change: impl FnOnce(&mut Registry<LocalPid, Meta, Monitor>) -> T,
    ) -> T {
        let (result, dispatcher) = {
            let mut state = self.lock();
            (change(&mut state.registry), state.dispatcher)
        };
        wake_if_needed(env, &result, dispatcher);
        result
    }

    /// A snapshot of `topic` for a listing, which a client may sync from:
    /// the registry must then send the leave of anything in it.
    fn observed_snapshot(&self, topic: &[u8]) -> Option<Snapshot<Entry>> {
        observed(&mut self.lock(), topic)
    }

    /// Removes a departed owner's presences a chunk at a time, handing the
    /// lock to waiting writers between chunks. Runs off the schedulers (in
    /// its own thread), so it wakes the dispatcher from a process-less env.
    fn remove_departure(&self, mut departure: presence_core::Departure) {
        while !departure.is_done() {
            let mut state = self.lock();
            let (removed, dispatcher) = {
                let _hold = ExitHold::start();
                let removed = state.registry.remove_departed(&mut departure, DEPART_CHUNK);
                (removed, state.dispatcher)
            };
            // Taking the lock straight back would keep every other writer
            // waiting for the whole departure.
            MutexGuard::unlock_fair(state);
            if let (true, Some(pid)) = (removed.wakes_dispatcher(), dispatcher) {
                let _ = OwnedEnv::new().send_and_clear(&pid, |_env| atoms::drab_presence_pending());
            }
        }
    }

    /// Encodes a meta with `term_to_binary/1`. A non-map is a caller bug
    /// (Elixir checks first) and raises badarg; an oversized one is refused,
    /// before it is encoded when its size shows without encoding.
    fn encode_meta(&self, meta: Term) -> NifResult<Result<Meta, NifError>> {
        if !meta.is_map() {
            return Err(rustler::Error::BadArg);
        }
        let max_meta_bytes = self.max_meta_bytes.load(Ordering::Relaxed);
        if size::exceeds(meta, max_meta_bytes) {
            return Ok(Err(NifError::MetaTooLarge));
        }
        let encoded = meta.to_binary();
        if encoded.len() > max_meta_bytes {
            return Ok(Err(NifError::MetaTooLarge));
        }
        etf::check_meta(&encoded).map_err(|_| rustler::Error::BadArg)?;
        Ok(Ok(Meta::from(encoded.as_slice())))
    }
}

fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[rustler::nif]
fn table_new(max_meta_bytes: usize) -> ResourceArc<Table> {
    ResourceArc::new(Table(Arc::new(Shared {
        state: Mutex::new(State {
            registry: Registry::new(random_seed()),
            dispatcher: None,
        }),
        outbox: Mutex::new(Outbox::new(0)),
        replication: Mutex::new(Replication::default()),
        incarnation: uuid::Uuid::new_v4(),
        max_meta_bytes: AtomicUsize::new(max_meta_bytes),
    })))
}

/// Applies options that may change while the table lives (a restart of
/// its presence module with new ones).
#[rustler::nif]
fn table_configure(table: ResourceArc<Table>, max_meta_bytes: usize) -> rustler::Atom {
    table
        .max_meta_bytes
        .store(max_meta_bytes, Ordering::Relaxed);
    atoms::ok()
}

/// `true` for `diff_window: 0`: each operation becomes a diff of its own,
/// in order, nothing cancelled or merged (Phoenix.Presence's diffs);
/// `false` coalesces a topic's changes until the dispatcher takes them.
/// Switching on with diffs pending walks those topics once: it runs when a
/// presence module starts, not on a hot path.
#[rustler::nif]
fn table_set_exact(table: ResourceArc<Table>, exact: bool) -> rustler::Atom {
    table.lock().registry.set_exact(exact);
    atoms::ok()
}

/// Makes `pid` the process told about pending diffs. Returns whether diffs
/// are pending or unacknowledged, so a restarted dispatcher sends them at
/// once.
#[rustler::nif]
fn table_set_dispatcher(table: ResourceArc<Table>, pid: LocalPid) -> bool {
    let queued = !table.outbox.lock().is_empty();
    let mut state = table.lock();
    state.dispatcher = Some(pid);
    queued || state.registry.pending_topics() > 0
}

#[rustler::nif]
fn table_track<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
    meta: Term<'a>,
) -> NifResult<Term<'a>> {
    let _charge = Charge::start(env);
    let meta = match table.encode_meta(meta)? {
        Ok(meta) => meta,
        Err(refused) => return Ok(error_term(env, refused)),
    };
    let tracked = table.try_write(env, |registry| {
        let tracked = registry.track(pid, &topic, &key, meta.clone(), || {
            env.monitor(&table, &pid)
        });
        match tracked {
            // A channel that tracks itself while it is dying must not
            // crash on it: Phoenix answers {:ok, ref} there too.
            Err(CoreError::OwnerGone) => Ok(registry.track_gone(pid, &topic, &key, meta)),
            other => other,
        }
    });
    Ok(match tracked {
        None => atoms::busy().encode(env),
        Some(Ok(change)) => ok_ref(env, change.phx_ref),
        Some(Err(e)) => error_term(env, e.into()),
    })
}

#[rustler::nif]
fn table_untrack(
    env: Env,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
) -> rustler::Atom {
    let _charge = Charge::start(env);
    let Some(removed) = table.try_write(env, |registry| registry.untrack(pid, &topic, &key)) else {
        return atoms::busy();
    };
    if let Some(monitor) = &removed.released_watch {
        env.demonitor(&table, monitor);
    }
    atoms::ok()
}

/// `{:ok, {meta, ref}}`: the current meta (with `phx_ref`) and its raw
/// ref, for update functions.
#[rustler::nif]
fn table_lookup<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: LocalPid,
    topic: Binary,
    key: Binary,
) -> Term<'a> {
    let Some(state) = table.try_lock() else {
        return atoms::busy().encode(env);
    };
    let found = state.registry.lookup(pid, &topic, &key).cloned();
    drop(state);
    match found {
        Some(presence) => {
            let found = (encode::meta(env, &presence), presence.phx_ref);
            (atoms::ok(), found).encode(env)
        }
        None => error_term(env, NifError::Core(CoreError::NotTracked)),
    }
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
) -> NifResult<Term<'a>> {
    let _charge = Charge::start(env);
    let meta = match table.encode_meta(meta)? {
        Ok(meta) => meta,
        Err(refused) => return Ok(error_term(env, refused)),
    };
    let updated = table.try_write(env, |registry| {
        registry.update(pid, &topic, &key, meta, expected_ref)
    });
    Ok(match updated {
        None => atoms::busy().encode(env),
        Some(Ok(Update::Unchanged(phx_ref) | Update::Changed(Change { phx_ref, .. }))) => {
            ok_ref(env, phx_ref)
        }
        Some(Err(e)) => error_term(env, e.into()),
    })
}

/// `{:ok, phx_ref}`: a write's answer, beside `:busy` and `{:error, reason}`.
fn ok_ref(env: Env, phx_ref: u64) -> Term {
    (atoms::ok(), ref_term(env, phx_ref)).encode(env)
}

fn error_term(env: Env, reason: NifError) -> Term {
    (atoms::error(), reason).encode(env)
}

/// `{users, connections}` on `topic`, from counters.
#[rustler::nif]
fn table_counts<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    match table.try_lock() {
        Some(state) => {
            let counts = state.registry.counts(&topic);
            (counts.users, counts.connections).encode(env)
        }
        None => atoms::busy().encode(env),
    }
}

/// A snapshot of `topic` for a listing, which a client may sync from:
/// the registry must then send the leave of anything in it.
fn observed(state: &mut State, topic: &[u8]) -> Option<Snapshot<Entry>> {
    state.registry.observe(topic);
    state.registry.snapshot(topic)
}

/// The grouped presences of a topic, `:too_large` when the listing is
/// large enough to belong on a dirty scheduler (`table_list_dirty`), or
/// `:busy`.
#[rustler::nif]
fn table_list<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    let Some(mut state) = table.try_lock() else {
        return atoms::busy().encode(env);
    };
    let snapshot = observed(&mut state, &topic);
    drop(state);
    match snapshot {
        None => rustler::types::map::map_new(env),
        Some(s) if s.len() > INLINE_LIST_PRESENCES => atoms::too_large().encode(env),
        Some(s) => inline_grouped(env, || s.iter()),
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_list_dirty<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    let snapshot = table.observed_snapshot(&topic);
    match snapshot {
        None => rustler::types::map::map_new(env),
        Some(s) => encode::grouped(env, s.iter()),
    }
}

/// The presences under one key, grouped like a list, or `[]` when there
/// are none, as Phoenix.Presence.get_by_key/2 distinguishes them; or
/// `:too_large` for `table_get_by_key_dirty`; or `:busy`.
#[rustler::nif]
fn table_get_by_key<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    topic: Binary,
    key: Binary,
) -> Term<'a> {
    let presences = {
        let Some(mut state) = table.try_lock() else {
            return atoms::busy().encode(env);
        };
        if state.registry.key_len(&topic, &key) > INLINE_KEY_PRESENCES {
            return atoms::too_large().encode(env);
        }
        state.registry.observe(&topic);
        state.registry.get_by_key(&topic, &key)
    };
    if presences.is_empty() {
        return Vec::<Term>::new().encode(env);
    }
    inline_grouped(env, || presences.iter())
}

/// A key's presences found in a snapshot of its topic, off the lock.
#[rustler::nif(schedule = "DirtyCpu")]
fn table_get_by_key_dirty<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    topic: Binary,
    key: Binary,
) -> Term<'a> {
    let snapshot: Option<Snapshot<Entry>> = table.observed_snapshot(&topic);
    let mut presences = snapshot
        .iter()
        .flat_map(|s| s.iter())
        .filter(|p| *p.key == *key)
        .peekable();
    if presences.peek().is_none() {
        return Vec::<Term>::new().encode(env);
    }
    encode::grouped(env, presences)
}

/// Encodes `presences` on this (normal) scheduler when they are small
/// enough, charging the caller for the work; else answers `:too_large`.
fn inline_grouped<'a, 'p, I>(env: Env<'a>, presences: impl Fn() -> I) -> Term<'a>
where
    I: Iterator<Item = &'p Entry>,
{
    let bytes: usize = presences().map(listed_size).sum();
    if bytes > INLINE_LIST_BYTES {
        return atoms::too_large().encode(env);
    }
    charge_for(env, bytes);
    encode::grouped(env, presences())
}

/// Charges the calling process's reductions for a write's time in the NIF
/// when it returns, at least 1% of a timeslice: a NIF call counts as one
/// reduction otherwise, so a process writing in a loop would run for many
/// milliseconds between preemptions, and a process waiting on its
/// scheduler (a ticker, a channel) would wait that long.
struct Charge<'a> {
    env: Env<'a>,
    started: Instant,
}

impl<'a> Charge<'a> {
    fn start(env: Env<'a>) -> Self {
        Charge {
            env,
            started: Instant::now(),
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        let micros = self.started.elapsed().as_micros();
        let percent = (micros * 100).div_ceil(TIMESLICE_US).clamp(1, 100);
        rustler::schedule::consume_timeslice(self.env, percent as i32);
    }
}

/// Charges the calling process's reductions for decoding `bytes` of
/// listing on its scheduler, so that a busy caller is preempted in time.
fn charge_for(env: Env, bytes: usize) {
    let percent = (bytes * 100).div_ceil(BYTES_PER_TIMESLICE).clamp(1, 100);
    rustler::schedule::consume_timeslice(env, percent as i32);
}

/// Takes the pending diffs of up to `max_topics` topics into the outbox,
/// cut into parts of at most `PART_LIMITS`, unless parts from an earlier
/// take still wait there: those go first, so that subscribers see every
/// topic's diffs in order. Returns `{parts_queued, topics_still_pending}`,
/// `:too_large` when the next diff belongs on a dirty scheduler
/// (`table_take_diffs_dirty`), or `:busy`.
#[rustler::nif]
fn table_take_diffs(env: Env, table: ResourceArc<Table>, max_topics: usize) -> Term {
    // Only the dispatcher takes the outbox lock: it is never contended.
    let mut outbox = table.outbox.lock();
    let Some(state) = table.try_lock() else {
        return atoms::busy().encode(env);
    };
    if outbox.is_empty() && state.registry.next_diff_work() > INLINE_TAKE_WORK {
        return atoms::too_large().encode(env);
    }
    take_diffs(
        env,
        &table,
        &mut outbox,
        state,
        max_topics,
        INLINE_TAKE_WORK,
    )
    .encode(env)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_take_diffs_dirty(
    env: Env,
    table: ResourceArc<Table>,
    max_topics: usize,
) -> (usize, usize) {
    let mut outbox = table.outbox.lock();
    let state = table.lock();
    take_diffs(env, &table, &mut outbox, state, max_topics, usize::MAX)
}

/// Takes diffs into `outbox` with `state` locked (lock order: outbox, then
/// state), unless parts wait there already. Also records, in cluster mode,
/// this node's own changes among the diffs for the other nodes: each node
/// replicates what its subscribers are told, so joins that cancelled out
/// within a window never cross the network.
fn take_diffs(
    env: Env,
    table: &Table,
    outbox: &mut Outbox<LocalPid, Meta>,
    mut state: MutexGuard<'_, State>,
    max_topics: usize,
    max_work: usize,
) -> (usize, usize) {
    let diffs = if outbox.is_empty() {
        state.registry.take_diffs(max_topics, max_work)
    } else {
        Vec::new()
    };
    let still_pending = state.registry.pending_topics();
    drop(state);
    crate::replication::record(env, table, &diffs);
    for diff in &diffs {
        outbox.push_diff(diff);
    }
    (outbox.len(), still_pending)
}

/// The oldest unacknowledged part as `{id, topic, joins, leaves, age_us}`
/// (grouped like `list`; `age_us`: microseconds since its oldest change),
/// `:none`, or `:too_large` for `table_next_part_dirty`. It stays in the
/// outbox until `table_ack_part/2`.
#[rustler::nif]
fn table_next_part(env: Env, table: ResourceArc<Table>) -> Term {
    let outbox = table.outbox.lock();
    match outbox.front() {
        Some(part) if part.bytes > PART_LIMITS.weight => atoms::too_large().encode(env),
        Some(part) => {
            charge_for(env, part.bytes);
            part_term(env, Some(part))
        }
        None => part_term(env, None),
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_next_part_dirty(env: Env, table: ResourceArc<Table>) -> Term {
    part_term(env, table.outbox.lock().front())
}

fn part_term<'a>(env: Env<'a>, part: Option<&OutboxPart<LocalPid, Meta>>) -> Term<'a> {
    match part {
        None => atoms::none().encode(env),
        Some(part) => (
            part.id,
            encode::bytes_term(env, &part.topic),
            encode::grouped(env, part.joins.iter()),
            encode::grouped(env, part.leaves.iter()),
            part.age_us(),
        )
            .encode(env),
    }
}

/// Drops part `id` from the outbox: it was handed to the broadcast.
#[rustler::nif]
fn table_ack_part(table: ResourceArc<Table>, id: u64) -> rustler::Atom {
    table.outbox.lock().ack(id);
    atoms::ok()
}

/// Sizes of the table, for stats and tests. `nif_heap_bytes` covers every
/// table of the library, not only this one.
#[rustler::nif]
fn table_stats(env: Env, table: ResourceArc<Table>) -> NifResult<Term> {
    // Before `state`: the lock order is outbox, then state (see `Shared`).
    let queued_parts = table.outbox.lock().len();
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
            (atoms::queued_parts().encode(env), queued_parts.encode(env)),
            (
                atoms::replicas().encode(env),
                registry.replica_count().encode(env),
            ),
            (
                atoms::max_meta_bytes().encode(env),
                table.max_meta_bytes.load(Ordering::Relaxed).encode(env),
            ),
            (
                atoms::nif_heap_bytes().encode(env),
                presence_core::heap::held_bytes().encode(env),
            ),
        ],
    )
}
