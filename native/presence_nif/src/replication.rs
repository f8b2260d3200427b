//! Cluster mode: this node's changes out as deltas, other nodes' deltas
//! and full states in as replicas (`presence_core::delta` is the format).
//!
//! Applying is chunked: at most `APPLY_CHUNK` records per hold of the
//! table lock, so a 100k-presence state from a joining node never holds up
//! local writers for more than a fraction of a millisecond at a time.

use parking_lot::MutexGuard;
use presence_core::delta::{self, DeltaError, DeltaReader, Record};
use presence_core::{RemoteJoin, ReplicaId, TopicDiff};
use rustler::types::Binary;
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};

use crate::atoms;
use crate::encode::bytes_term;
use crate::table::{Meta, Table};

/// Records applied per hold of the lock (tens of microseconds).
const APPLY_CHUNK: usize = 256;

/// A delta with more records than this is applied on a dirty scheduler.
const INLINE_APPLY_RECORDS: usize = APPLY_CHUNK;

/// Adds this node's changes in `diffs` to the pending delta, in cluster
/// mode, and tells the replicator when they are the first to wait.
pub(crate) fn record(env: Env, table: &Table, diffs: &[TopicDiff<LocalPid, Meta>]) {
    let mut replication = table.replication.lock();
    let Some(replicator) = replication.replicator else {
        return;
    };
    if replication.outgoing.record(diffs) {
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
    let mut replication = table.replication.lock();
    if pid.is_none() {
        replication.outgoing.discard();
    }
    replication.replicator = pid;
    bytes_term(env, table.incarnation.hyphenated().to_string().as_bytes())
}

/// The seq of the last delta handed out: heartbeats carry it, so that a
/// peer notices a lost delta even when no other follows.
#[rustler::nif]
fn replication_delta_seq(table: ResourceArc<Table>) -> u64 {
    table.replication.lock().outgoing.seq()
}

/// This node's changes since the last delta, as `{seq, delta}`, or `:none`.
#[rustler::nif]
fn replication_take_delta(env: Env, table: ResourceArc<Table>) -> Term {
    let taken = table.replication.lock().outgoing.take();
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
        // holding the replication lock across the snapshot orders it
        // against every delta handed out.
        let replication = table.replication.lock();
        let snapshots = table.lock().registry.observed_snapshots();
        (replication.outgoing.seq(), snapshots)
    };
    let chunks: Vec<Term> = delta::state_chunks(&snapshots, delta::STATE_CHUNK_BYTES)
        .iter()
        .map(|chunk| bytes_term(env, chunk))
        .collect();
    (seq, chunks).encode(env)
}

/// Applies a delta from `replica`: `:ok`, `{:error, :bad_delta}` (nothing
/// applied), or `:too_large` for `replication_apply_delta_dirty`.
#[rustler::nif]
fn replication_apply_delta<'a>(
    env: Env<'a>,
    table: ResourceArc<Table>,
    replica: ReplicaId,
    delta: Binary,
) -> Term<'a> {
    apply_checked(env, &table, replica, &delta, INLINE_APPLY_RECORDS)
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

fn apply(env: Env, table: &Table, replica: ReplicaId, delta: &[u8], syncing: bool) {
    let records = DeltaReader::new(delta).expect("validated by the caller");
    let mut records = records.map(|r| r.expect("validated by the caller"));
    loop {
        let mut state = table.lock();
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
        if applied < APPLY_CHUNK {
            break;
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
