//! Cluster mode: this node's changes out as deltas, other nodes' deltas
//! and full states in as replicas (`presence_core::delta` is the format).
//!
//! Applying is chunked: at most `APPLY_CHUNK` records per hold of the
//! table lock, so a 100k-presence state from a joining node never holds up
//! local writers for more than a fraction of a millisecond at a time.
//! This node's changes are recorded by `presence_core::Delivery`, as the
//! dispatcher takes diffs.

use parking_lot::MutexGuard;
use presence_core::delta::{self, DeltaError, DeltaReader, Record, APPLY_CHUNK};
use presence_core::{Meta, RemoteJoin, ReplicaId};
use rustler::types::Binary;
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};

use crate::atoms;
use crate::encode::bytes_term;
use crate::resource::{State, Table};

/// A delta with more records than this is applied on a dirty scheduler.
const INLINE_APPLY_RECORDS: usize = APPLY_CHUNK;

/// Tells the replicator that this node's changes started waiting.
pub(crate) fn wake_replicator(env: Env, table: &Table) {
    if let Some(replicator) = table.replication.lock().replicator {
        // A dead replicator is fine: its successor takes the delta on start.
        let _ = env.send(&replicator, atoms::drab_presence_delta());
    }
}

/// Makes `pid` the process that sends this node's deltas (cluster mode on),
/// or, with `nil`, stops recording them. Returns this table's incarnation:
/// a UUID made with the table, naming this node's replica on the others.
#[rustler::nif]
fn replication_set_replicator<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    pid: Option<LocalPid>,
) -> Term<'a> {
    // Lock order: delivery, then replication (as a take does).
    let mut delivery = table.delivery.lock();
    delivery.set_replicating(pid.is_some());
    table.replication.lock().replicator = pid;
    drop(delivery);
    bytes_term(env, table.incarnation.hyphenated().to_string().as_bytes())
}

/// The seq of the last delta handed out: heartbeats carry it, so that a
/// peer notices a lost delta even when no other follows.
/// Or `:busy` (see `Shared::try_lock`), as the next two.
#[rustler::nif]
fn replication_delta_seq(env: Env, table: ResourceArc<Table>) -> Term {
    match table.try_lock_delivery() {
        Some(delivery) => delivery.delta_seq().encode(env),
        None => atoms::busy().encode(env),
    }
}

/// This node's changes since the last delta, as `{seq, delta}`, or `:none`.
#[rustler::nif]
fn replication_take_delta(env: Env, table: ResourceArc<Table>) -> Term {
    let Some(mut delivery) = table.try_lock_delivery() else {
        return atoms::busy().encode(env);
    };
    let taken = delivery.take_delta();
    drop(delivery);
    match taken {
        Some((seq, delta)) => (seq, bytes_term(env, &delta)).encode(env),
        None => atoms::none().encode(env),
    }
}

/// Every presence of this node's processes, as `{seq, [delta]}`: applied
/// after the deltas up to `seq` and before the later ones (which may repeat
/// some of it, harmlessly), it gives another node this node's set.
#[rustler::nif(schedule = "DirtyCpu")]
fn replication_local_state(env: Env, table: ResourceArc<Table>) -> Term {
    let (seq, snapshots) = {
        // Changes are taken from the registry before they are recorded:
        // holding the delivery across the snapshot orders it against every
        // delta handed out.
        let delivery = table.delivery.lock();
        let snapshots = table.lock().registry.observed_snapshots();
        (delivery.delta_seq(), snapshots)
    };
    let chunks: Vec<Term> = delta::state_chunks(&snapshots, delta::STATE_CHUNK_BYTES)
        .iter()
        .map(|chunk| bytes_term(env, chunk))
        .collect();
    (seq, chunks).encode(env)
}

/// Applies a delta from `replica`: `:ok`, `{:error, :bad_delta}` (nothing
/// applied), `:too_large` for `replication_apply_delta_dirty`, or `:busy`
/// (nothing applied).
#[rustler::nif]
fn replication_apply_delta<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    replica: ReplicaId,
    delta: Binary,
) -> Term<'a> {
    match delta::validate(&delta) {
        Err(error) => bad_delta(env, error),
        Ok(records) if records > INLINE_APPLY_RECORDS => atoms::too_large().encode(env),
        Ok(_) => match table.try_lock() {
            // One chunk at most: applied in this one hold of the lock.
            Some(state) => {
                apply_chunks(env, state, || Some(table.lock()), replica, &delta, false);
                atoms::ok().encode(env)
            }
            None => atoms::busy().encode(env),
        },
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn replication_apply_delta_dirty<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    replica: ReplicaId,
    delta: Binary,
) -> Term<'a> {
    apply_checked(env, &table, replica, &delta, usize::MAX)
}

/// Validates the whole delta, then applies it if it has at most
/// `max_records` changes.
fn apply_checked<'a>(
    env: Env<'a>,
    table: &Table,
    replica: ReplicaId,
    delta: &[u8],
    max_records: usize,
) -> Term<'a> {
    match delta::validate(delta) {
        Err(error) => bad_delta(env, error),
        Ok(records) if records > max_records => atoms::too_large().encode(env),
        Ok(_) => {
            apply(env, table, replica, delta, false);
            atoms::ok().encode(env)
        }
    }
}

fn apply(env: Env, table: &Table, replica: ReplicaId, delta: &[u8], syncing: bool) {
    apply_chunks(
        env,
        table.lock(),
        || Some(table.lock()),
        replica,
        delta,
        syncing,
    );
}

/// Replaces what `replica` holds here with its full state `chunks`: what
/// it already held and still has stays (no diff), the rest joins or leaves.
#[rustler::nif(schedule = "DirtyCpu")]
fn replication_sync_replica<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    replica: ReplicaId,
    chunks: Vec<Binary<'a>>,
) -> Term<'a> {
    for chunk in &chunks {
        if let Err(error) = delta::validate(chunk) {
            return bad_delta(env, error);
        }
    }
    table.lock().registry.replica_begin_sync(replica);
    for chunk in &chunks {
        apply(env, &table, replica, chunk, true);
    }
    let stale = table.lock().registry.replica_end_sync(replica);
    table.remove_detached(env, stale);
    atoms::ok().encode(env)
}

/// Removes every presence of `replica` (its node left, died, or restarted);
/// returns how many. A large replica goes a chunk at a time from a thread
/// of its own, as an exited owner's presences do.
#[rustler::nif]
fn replication_drop_replica(env: Env, table: ResourceArc<Table>, replica: ReplicaId) -> usize {
    drop_replica(env, &table, replica)
}

fn drop_replica(env: Env, table: &Table, replica: ReplicaId) -> usize {
    let departure = table.lock().registry.drop_replica(replica);
    let Some(departure) = departure else { return 0 };
    let count = departure.remaining();
    table.remove_detached(env, departure);
    count
}

/// The replica id of the peer named `name`, made on first use. Ids live
/// as long as the table: a restarted replicator gets the same ones back.
#[rustler::nif]
fn replication_replica_id(table: ResourceArc<Table>, name: Binary) -> ReplicaId {
    let mut replication = table.replication.lock();
    if let Some(&id) = replication.replica_ids.get(name.as_slice()) {
        return id;
    }
    replication.last_replica_id += 1;
    let id = replication.last_replica_id;
    replication.replica_ids.insert(name.to_vec(), id);
    id
}

/// Every peer with a replica id, as `[{name, id}]`.
#[rustler::nif]
fn replication_replica_ids<'a>(env: Env<'a>, table: ResourceArc<Table>) -> Term<'a> {
    let replication = table.replication.lock();
    let ids: Vec<(Term<'a>, ReplicaId)> = replication
        .replica_ids
        .iter()
        .map(|(name, &id)| (crate::encode::bytes_term(env, name), id))
        .collect();
    ids.encode(env)
}

/// Drops `replica`'s presences and forgets its id, for a peer gone for good.
#[rustler::nif]
fn replication_forget_replica(env: Env, table: ResourceArc<Table>, replica: ReplicaId) -> usize {
    table
        .replication
        .lock()
        .replica_ids
        .retain(|_, &mut id| id != replica);
    drop_replica(env, &table, replica)
}

/// Presences `replica` holds here.
#[rustler::nif]
fn replication_replica_len(table: ResourceArc<Table>, replica: ReplicaId) -> usize {
    table.lock().registry.replica_len(replica)
}

/// Applies `delta`'s records, [`APPLY_CHUNK`] per hold of the lock: the
/// first under `first`, the next under `relock`'s, the lock handed fairly
/// to waiting writers between chunks.
fn apply_chunks<'t>(
    env: Env,
    first: MutexGuard<'t, State>,
    relock: impl Fn() -> Option<MutexGuard<'t, State>>,
    replica: ReplicaId,
    delta: &[u8],
    syncing: bool,
) {
    let records = DeltaReader::new(delta).expect("validated by the caller");
    let mut records = records
        .map(|r| r.expect("validated by the caller"))
        .peekable();
    let mut next = Some(first);
    while let Some(mut state) = next.take() {
        let mut wake = false;
        let mut applied = 0;
        for record in records.by_ref() {
            wake |= match record {
                Record::Join(join) => state.registry.replica_join(replica, owned(join)),
                Record::Leave(phx_ref) => {
                    // A full state only has joins; a leave there is not ours
                    // to act on.
                    !syncing && state.registry.replica_leave(replica, phx_ref)
                }
            };
            applied += 1;
            if applied == APPLY_CHUNK {
                break;
            }
        }
        let dispatcher = state.dispatcher;
        MutexGuard::unlock_fair(state);
        if let (true, Some(pid)) = (wake, dispatcher) {
            let _ = env.send(&pid, atoms::drab_presence_pending());
        }
        if records.peek().is_some() {
            next = relock();
        }
    }
}

fn owned<'a>(join: RemoteJoin<'a, &'a [u8]>) -> RemoteJoin<'a, Meta> {
    RemoteJoin {
        topic: join.topic,
        key: join.key,
        meta: Meta::from(join.meta),
        phx_ref: join.phx_ref,
        prev_ref: join.prev_ref,
    }
}

/// A malformed delta is refused whole, as `{:error, :bad_delta}`: which
/// way it is malformed is no use to the sender, who simply resyncs.
fn bad_delta(env: Env, _error: DeltaError) -> Term {
    (atoms::error(), atoms::bad_delta()).encode(env)
}
