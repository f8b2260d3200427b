//! The table NIFs, called by `Drab.Presence.Backend.NIF`.
//!
//! Writes and small reads run on the caller's (normal) scheduler, never
//! wait for the lock there (`:busy`: the caller yields and calls again),
//! and charge the caller for their time. Large lists and diff batches take
//! a copy-on-write snapshot under the lock and build their terms on a dirty
//! CPU scheduler, so writers are never held up by a reader.

use parking_lot::MutexGuard;
use presence_core::outbox::{listed_size, OutboxPart, PART_LIMITS};
use presence_core::{Change, CoreError, Delivery, Meta, Snapshot, Update};
use rustler::{Binary, Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::encode::{self, ref_term, Entry};
use crate::error::NifError;
use crate::listing::{self, Mode};
use crate::resource::{State, Table};
use crate::schedule::{charge_for_bytes, Charge};

/// `get_by_key/2` of a key with more presences than this goes to a dirty
/// scheduler without collecting them under the lock; so does one of more
/// bytes than this, after collecting them (a few 60 KB metas are
/// milliseconds to decode).
const INLINE_KEY_PRESENCES: usize = 64;
const INLINE_KEY_BYTES: usize = 64 * 1024;

/// Taking diffs looks for joins among the presences written since the
/// last take, and copies them into parts: up to this many (a few hundred
/// microseconds) are done on the dispatcher's scheduler, more go dirty.
const INLINE_TAKE_WORK: usize = 2_000;

#[rustler::nif]
fn table_new(max_meta_bytes: usize) -> ResourceArc<Table> {
    Table::new(max_meta_bytes)
}

/// Applies options that may change while the table lives (a restart of
/// its presence module with new ones).
#[rustler::nif]
fn table_configure(table: ResourceArc<Table>, max_meta_bytes: usize) -> rustler::Atom {
    table.set_max_meta_bytes(max_meta_bytes);
    atoms::ok()
}

/// `true` for `diff_window: 0`: each operation becomes a diff of its own,
/// in order, nothing cancelled or merged (Phoenix.Presence's diffs);
/// `false` coalesces a topic's changes until the dispatcher takes them.
/// Switching on with diffs pending walks those topics once: it runs when a
/// presence module starts, not on a hot path.
#[rustler::nif]
fn table_set_diff_per_operation(table: ResourceArc<Table>, on: bool) -> rustler::Atom {
    table.lock().registry.set_diff_per_operation(on);
    atoms::ok()
}

/// Makes `pid` the process told about pending diffs. Returns whether diffs
/// are pending or unacknowledged, so a restarted dispatcher sends them at
/// once.
#[rustler::nif]
fn table_set_dispatcher(table: ResourceArc<Table>, pid: LocalPid) -> bool {
    let queued = !table.delivery.lock().wants_diffs();
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

/// The grouped presences of a topic (see `listing.rs`), `:too_large`
/// when the listing belongs on a dirty scheduler (`table_list_dirty`), or
/// `:busy`.
#[rustler::nif]
fn table_list<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    listing::list(env, &table, &topic, Mode::Inline).unwrap_or_else(|refused| refused.encode(env))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_list_dirty<'a>(env: Env<'a>, table: ResourceArc<Table>, topic: Binary) -> Term<'a> {
    listing::list(env, &table, &topic, Mode::Dirty).unwrap_or_else(|refused| refused.encode(env))
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
    let snapshot: Option<Snapshot<Entry>> = listing::observed(&mut table.lock(), &topic);
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
    if bytes > INLINE_KEY_BYTES {
        return atoms::too_large().encode(env);
    }
    charge_for_bytes(env, bytes);
    encode::grouped(env, presences())
}

/// Takes the pending diffs of up to `max_topics` topics, unless parts of
/// an earlier take still wait (see `presence_core::Delivery`), and tells
/// the replicator if they started this node's delta. Returns
/// `{parts_queued, topics_still_pending}`, `:too_large` when the next diff
/// belongs on a dirty scheduler (`table_take_diffs_dirty`), or `:busy`.
#[rustler::nif]
fn table_take_diffs(env: Env, table: ResourceArc<Table>, max_topics: usize) -> Term {
    let Some(mut delivery) = table.try_lock_delivery() else {
        return atoms::busy().encode(env);
    };
    let Some(state) = table.try_lock() else {
        return atoms::busy().encode(env);
    };
    if delivery.wants_diffs() && state.registry.next_diff_work() > INLINE_TAKE_WORK {
        return atoms::too_large().encode(env);
    }
    let taken = take_diffs(
        env,
        &table,
        &mut delivery,
        state,
        max_topics,
        INLINE_TAKE_WORK,
    );
    drop(delivery);
    // The dispatcher takes diffs steadily: idle kept listings go even
    // when nobody lists any more.
    listing::sweep_if_due(&table, Mode::Inline);
    taken.encode(env)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_take_diffs_dirty(
    env: Env,
    table: ResourceArc<Table>,
    max_topics: usize,
) -> (usize, usize) {
    let mut delivery = table.delivery.lock();
    let state = table.lock();
    let taken = take_diffs(env, &table, &mut delivery, state, max_topics, usize::MAX);
    drop(delivery);
    listing::sweep_if_due(&table, Mode::Dirty);
    taken
}

/// Takes diffs with `state` locked (lock order: delivery, then state), and
/// queues them once it is let go.
fn take_diffs(
    env: Env,
    table: &Table,
    delivery: &mut Delivery<LocalPid, Meta>,
    mut state: MutexGuard<'_, State>,
    max_topics: usize,
    max_work: usize,
) -> (usize, usize) {
    let diffs = if delivery.wants_diffs() {
        state.registry.take_diffs(max_topics, max_work)
    } else {
        Vec::new()
    };
    let still_pending = state.registry.pending_topics();
    drop(state);
    if delivery.queue(&diffs) {
        crate::replication::wake_replicator(env, table);
    }
    (delivery.queued(), still_pending)
}

/// The oldest unacknowledged part as `{id, topic, joins, leaves, age_us}`
/// (grouped like `list`; `age_us`: microseconds since its oldest change),
/// `:none`, or `:too_large` for `table_next_part_dirty`. It stays in the
/// outbox until `table_ack_part/2`.
#[rustler::nif]
fn table_next_part(env: Env, table: ResourceArc<Table>) -> Term {
    let Some(delivery) = table.try_lock_delivery() else {
        return atoms::busy().encode(env);
    };
    match delivery.next_part() {
        Some(part) if part.bytes > PART_LIMITS.weight => atoms::too_large().encode(env),
        Some(part) => {
            charge_for_bytes(env, part.bytes);
            part_term(env, Some(part))
        }
        None => part_term(env, None),
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn table_next_part_dirty(env: Env, table: ResourceArc<Table>) -> Term {
    part_term(env, table.delivery.lock().next_part())
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

/// Drops part `id`: it was handed to the broadcast.
#[rustler::nif]
fn table_ack_part(table: ResourceArc<Table>, id: u64) -> rustler::Atom {
    table.delivery.lock().ack(id);
    atoms::ok()
}

/// Sizes of the table, for stats and tests. `nif_heap_bytes` covers every
/// table of the library, not only this one.
#[rustler::nif]
fn table_stats(env: Env, table: ResourceArc<Table>) -> NifResult<Term> {
    // Before `state`: the lock order is delivery, then state.
    let queued_parts = table.delivery.lock().queued();
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
                table.max_meta_bytes().encode(env),
            ),
            (
                atoms::nif_heap_bytes().encode(env),
                presence_core::heap::held_bytes().encode(env),
            ),
        ],
    )
}
