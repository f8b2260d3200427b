//! Other nodes' presences, as held here: one [`ReplicaSet`] per other
//! node (per incarnation of it), the presences that node reported, by the
//! ref they have there.
//!
//! Each node is the only writer of its own presences, so a cluster's state
//! is the union of per-node sets and nothing ever conflicts. The presences
//! themselves live in the same topics as local ones, held by
//! [`crate::Holder::Replica`], so counts, lists and diffs cover them with
//! no extra work; the registry applies other nodes' changes (see
//! `Registry::replica_join` and the others), and this module only keeps
//! which of them each replica holds.
//!
//! Replication is idempotent: a join of a ref already held and a leave of a
//! ref not held change nothing. That lets a full state and the deltas
//! around it overlap, and a delta arrive twice, without harm.

use std::collections::HashMap;

use crate::presence::Ref;
use crate::topic::{Location, TopicId};

/// Where a replicated presence lives here.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaPresence {
    pub(crate) topic: TopicId,
    /// Its ref in this registry: the one topics index it by.
    pub(crate) local_ref: Ref,
    /// The sync it was last confirmed by (see [`ReplicaSet::end_sync`]).
    generation: u32,
}

impl ReplicaPresence {
    pub(crate) fn location(&self) -> Location {
        Location {
            topic: self.topic,
            phx_ref: self.local_ref,
        }
    }
}

/// One other node's presences, by the ref each has on that node.
#[derive(Debug, Default)]
pub(crate) struct ReplicaSet {
    presences: HashMap<Ref, ReplicaPresence>,
    generation: u32,
}

impl ReplicaSet {
    pub(crate) fn len(&self) -> usize {
        self.presences.len()
    }

    /// Marks the presence `origin_ref` confirmed by the sync under way, if
    /// the set holds it; returns whether it does.
    pub(crate) fn confirm(&mut self, origin_ref: Ref) -> bool {
        let generation = self.generation;
        match self.presences.get_mut(&origin_ref) {
            Some(held) => {
                held.generation = generation;
                true
            }
            None => false,
        }
    }

    /// Holds the presence `origin_ref`, stored here under `local_ref`.
    pub(crate) fn insert(&mut self, origin_ref: Ref, topic: TopicId, local_ref: Ref) {
        let generation = self.generation;
        self.presences.insert(
            origin_ref,
            ReplicaPresence {
                topic,
                local_ref,
                generation,
            },
        );
    }

    pub(crate) fn remove(&mut self, origin_ref: Ref) -> Option<ReplicaPresence> {
        self.presences.remove(&origin_ref)
    }

    /// Starts a full sync: what it does not confirm goes at its end.
    pub(crate) fn begin_sync(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Ends a full sync: takes out the presences it did not confirm.
    pub(crate) fn end_sync(&mut self) -> Vec<Location> {
        let generation = self.generation;
        let mut stale = Vec::new();
        self.presences.retain(|_, held| {
            let confirmed = held.generation == generation;
            if !confirmed {
                stale.push(held.location());
            }
            confirmed
        });
        stale
    }

    /// Every presence, to remove a dropped replica's a chunk at a time.
    pub(crate) fn into_presences(self) -> HashMap<Ref, ReplicaPresence> {
        self.presences
    }
}
