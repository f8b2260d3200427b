//! Cluster mode in the sidecar: the same semantics as `presence_nif`'s
//! `replication.rs`, on the sidecar's single-threaded store.
//!
//! * This node's own changes are written to a pending delta as diffs are
//!   taken (only while a replicator is set), and handed out numbered: the
//!   store's `presence_core::Delivery` does it, as the NIF's does.
//! * Other nodes' deltas and full states are validated whole, then applied
//!   as a [`Job`] of [`APPLY_CHUNK`] records per step: the request loop
//!   serves other requests between steps, as the NIF releases its lock.
//! * Replica ids are the BEAM's (it keeps them by name, with the journal,
//!   so they outlive a sidecar); the sidecar only holds presences by id.
//!
//! The BEAM counts presences in ETS, from replies. Replicated presences
//! count too, so every replication write answers with the net change of
//! each `(topic, key)` it touched; to know the topic and key of a replica
//! leave (or of a dropped replica's presences), the store keeps a mirror
//! of each replica's refs.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use presence_core::delta::{self, DeltaReader, Record, APPLY_CHUNK};
use presence_core::{Departure, RemoteJoin, ReplicaId};

use super::{Outcome, Store};
use crate::protocol::{flags, Body, CountChange, ReplicaBody, Status};

/// This node's side of cluster mode, and the replicas' mirror.
#[derive(Default)]
pub struct Replication {
    /// Each replica's presences here, by their ref on their node: the
    /// topic and key to count them under.
    remote: HashMap<ReplicaId, HashMap<u64, (Bytes, Bytes)>>,
}

#[derive(Clone, Copy)]
enum Start {
    Sync,
    Drop,
}

/// A record of a delta, owned, so a job can outlive its request frame.
enum Owned {
    Join {
        topic: Bytes,
        key: Bytes,
        meta: Bytes,
        phx_ref: u64,
        prev_ref: Option<u64>,
    },
    Leave(u64),
}

/// A replication write in progress: its records, then (a sync's stale or
/// a dropped replica's) presences to remove.
pub struct Job {
    replica: ReplicaId,
    /// What the first step does before any record: a job may wait behind
    /// another, and must not touch the replica before that one is done.
    start: Option<Start>,
    records: std::vec::IntoIter<Owned>,
    /// A full sync: refs confirmed so far, and whether it has ended.
    sync: Option<(HashSet<u64>, bool)>,
    departure: Option<Departure>,
    wake: bool,
    dropped: u64,
    changes: HashMap<(Bytes, Bytes), i64>,
}

impl Job {
    fn new(replica: ReplicaId, records: Vec<Owned>, sync: bool) -> Job {
        Job {
            replica,
            start: None,
            records: records.into_iter(),
            sync: sync.then(|| (HashSet::new(), false)),
            departure: None,
            wake: false,
            dropped: 0,
            changes: HashMap::new(),
        }
    }

    fn count(&mut self, topic: &Bytes, key: &Bytes, change: i64) {
        *self
            .changes
            .entry((topic.clone(), key.clone()))
            .or_default() += change;
    }

    fn reply(self) -> Outcome {
        let changes = self
            .changes
            .into_iter()
            .filter(|(_, change)| *change != 0)
            .map(|((topic, key), change)| CountChange { topic, key, change })
            .collect();
        Outcome::Reply(
            Status::Ok,
            Body::Replica(ReplicaBody {
                flags: if self.wake { flags::WAKE } else { 0 },
                dropped: self.dropped,
                changes,
            }),
        )
    }
}

/// A request's replica id: the BEAM's are u32, as the core's.
pub fn replica_id(replica: u64) -> Result<ReplicaId, Outcome> {
    ReplicaId::try_from(replica).map_err(|_| Outcome::Reply(Status::BadFrame, Body::Empty))
}

/// Decodes a whole delta (or state chunk) before anything is applied.
fn parse(delta: &Bytes, out: &mut Vec<Owned>) -> Result<(), delta::DeltaError> {
    for record in DeltaReader::new(delta)? {
        out.push(match record? {
            Record::Join(join) => Owned::Join {
                topic: delta.slice_ref(join.topic),
                key: delta.slice_ref(join.key),
                meta: delta.slice_ref(join.meta),
                phx_ref: join.phx_ref,
                prev_ref: join.prev_ref,
            },
            Record::Leave(phx_ref) => Owned::Leave(phx_ref),
        });
    }
    Ok(())
}

fn bad_delta() -> Outcome {
    Outcome::Reply(Status::BadDelta, Body::Empty)
}

impl Store {
    pub fn set_replicator(&mut self, on: bool, seq: u64) -> Outcome {
        self.delivery.set_replicating(on);
        self.delivery.resume_deltas_after(seq);
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    pub fn delta_seq(&self) -> Outcome {
        Outcome::Reply(
            Status::Ok,
            Body::Seq {
                seq: self.delivery.delta_seq(),
            },
        )
    }

    pub fn take_delta(&mut self) -> Outcome {
        let taken = self.delivery.take_delta();
        Outcome::Reply(
            Status::Ok,
            Body::Delta(taken.map(|(seq, delta)| (seq, delta.into()))),
        )
    }

    /// Every topic's snapshot, marked observed (a peer syncs from it as a
    /// client from a list), with the seq it follows: the server writes the
    /// local presences out as state chunks.
    pub fn local_state(&mut self) -> Outcome {
        Outcome::State(
            self.delivery.delta_seq(),
            self.registry.observed_snapshots(),
        )
    }

    pub fn apply_delta(&mut self, replica: u64, delta: Bytes) -> Result<Job, Outcome> {
        let replica = replica_id(replica)?;
        let mut records = Vec::new();
        parse(&delta, &mut records).map_err(|_| bad_delta())?;
        Ok(Job::new(replica, records, false))
    }

    pub fn sync_replica(&mut self, replica: u64, chunks: Vec<Bytes>) -> Result<Job, Outcome> {
        let replica = replica_id(replica)?;
        let mut records = Vec::new();
        for chunk in &chunks {
            parse(chunk, &mut records).map_err(|_| bad_delta())?;
        }
        let mut job = Job::new(replica, records, true);
        job.start = Some(Start::Sync);
        Ok(job)
    }

    /// Drops (or, `forget`, the same: ids are the BEAM's) every presence of
    /// `replica`, a chunk per step.
    pub fn drop_replica(&mut self, replica: u64) -> Result<Job, Outcome> {
        let mut job = Job::new(replica_id(replica)?, Vec::new(), false);
        job.start = Some(Start::Drop);
        Ok(job)
    }

    /// One step of `job`: its reply when it is done.
    pub fn step(&mut self, job: &mut Job) -> Option<Outcome> {
        match job.start.take() {
            Some(Start::Sync) => self.registry.replica_begin_sync(job.replica),
            Some(Start::Drop) => {
                if let Some(departure) = self.registry.drop_replica(job.replica) {
                    job.dropped = departure.remaining() as u64;
                    job.departure = Some(departure);
                }
                let mirror = self.replication.remote.remove(&job.replica);
                for (_, (topic, key)) in mirror.unwrap_or_default() {
                    job.count(&topic, &key, -1);
                }
            }
            None => {}
        }
        let mut budget = APPLY_CHUNK;
        while budget > 0 {
            let Some(record) = job.records.next() else {
                break;
            };
            budget -= 1;
            self.apply_record(job, record);
        }
        if budget > 0 {
            if let Some((confirmed, ended @ false)) = &mut job.sync {
                *ended = true;
                let confirmed = std::mem::take(confirmed);
                let mirror = self.replication.remote.entry(job.replica).or_default();
                let mut stale = Vec::new();
                mirror.retain(|phx_ref, held| {
                    let keep = confirmed.contains(phx_ref);
                    if !keep {
                        stale.push(held.clone());
                    }
                    keep
                });
                for (topic, key) in stale {
                    job.count(&topic, &key, -1);
                }
                let departure = self.registry.replica_end_sync(job.replica);
                job.departure = Some(departure);
            }
        }
        if let Some(departure) = &mut job.departure {
            if budget > 0 && !departure.is_done() {
                job.wake |= self.registry.remove_departed(departure, budget).wake;
            }
        }
        let records_done = job.records.len() == 0;
        let sync_done = job.sync.as_ref().is_none_or(|(_, ended)| *ended);
        let departed = job.departure.as_ref().is_none_or(Departure::is_done);
        if records_done && sync_done && departed {
            let done = std::mem::replace(job, Job::new(job.replica, Vec::new(), false));
            Some(done.reply())
        } else {
            None
        }
    }

    fn apply_record(&mut self, job: &mut Job, record: Owned) {
        let replica = job.replica;
        match record {
            Owned::Join {
                topic,
                key,
                meta,
                phx_ref,
                prev_ref,
            } => {
                if let Some((confirmed, _)) = &mut job.sync {
                    confirmed.insert(phx_ref);
                }
                let before = self.registry.replica_len(replica);
                job.wake |= self.registry.replica_join(
                    replica,
                    RemoteJoin {
                        topic: &topic,
                        key: &key,
                        meta: super::Meta::from(&*meta),
                        phx_ref,
                        prev_ref,
                    },
                );
                if self.registry.replica_len(replica) > before {
                    // Copied: a slice would keep the whole frame alive.
                    let (topic, key) =
                        (Bytes::copy_from_slice(&topic), Bytes::copy_from_slice(&key));
                    job.count(&topic, &key, 1);
                    self.replication
                        .remote
                        .entry(replica)
                        .or_default()
                        .insert(phx_ref, (topic, key));
                }
            }
            // A full state only has joins; a leave there is not ours to
            // act on (as the NIF).
            Owned::Leave(_) if job.sync.is_some() => {}
            Owned::Leave(phx_ref) => {
                job.wake |= self.registry.replica_leave(replica, phx_ref);
                let held = self
                    .replication
                    .remote
                    .get_mut(&replica)
                    .and_then(|mirror| mirror.remove(&phx_ref));
                if let Some((topic, key)) = held {
                    job.count(&topic, &key, -1);
                }
            }
        }
    }
}
