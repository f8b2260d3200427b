//! Other nodes' presences, held as replicas.
//!
//! Each node is the only writer of its own presences, so a cluster's state
//! is the union of per-node sets and nothing ever conflicts. A node keeps
//! one [`ReplicaSet`] per other node (per incarnation of it): the presences
//! that node reported, by the ref they have there. They live in the same
//! topics as local ones, held by [`Holder::Replica`], so counts, lists and
//! diffs cover them with no extra work.
//!
//! Replication is idempotent: a join of a ref already held and a leave of a
//! ref not held change nothing. That lets a full state and the deltas
//! around it overlap, and a delta arrive twice, without harm.

use std::collections::HashMap;
use std::hash::Hash;

use crate::owner::Departure;
use crate::presence::{prev_ref, Bytes, Holder, Presence, Ref, ReplicaId};
use crate::registry::Registry;
use crate::topic::TopicId;

/// Where a replicated presence lives here.
#[derive(Debug, Clone)]
pub(crate) struct RemoteHandle {
    pub(crate) topic: TopicId,
    /// Its ref in this registry: the one topics index it by.
    pub(crate) local_ref: Ref,
    /// The sync it was last confirmed by (see [`Registry::replica_end_sync`]).
    generation: u32,
}

/// One other node's presences, by the ref each has on that node.
#[derive(Debug, Default)]
pub(crate) struct ReplicaSet {
    presences: HashMap<Ref, RemoteHandle>,
    generation: u32,
}

/// A presence as another node reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteJoin<'a, M> {
    pub topic: &'a [u8],
    pub key: &'a [u8],
    pub meta: M,
    /// Its ref on its own node.
    pub phx_ref: Ref,
    pub prev_ref: Option<Ref>,
}

impl<O, M, W> Registry<O, M, W>
where
    O: Copy + Eq + Hash,
    M: Clone + PartialEq,
{
    /// Adds a presence `replica` reports, unless it holds it already.
    /// Returns whether the dispatcher must be woken.
    pub fn replica_join(&mut self, replica: ReplicaId, join: RemoteJoin<'_, M>) -> bool {
        let set = self.replicas.entry(replica).or_default();
        let generation = set.generation;
        if let Some(held) = set.presences.get_mut(&join.phx_ref) {
            held.generation = generation;
            return false;
        }
        let id = self.topics.intern(join.topic);
        let wake = self.begin_change(id);
        let (local_ref, seq) = self.refs.next(None);
        let next_seq = self.refs.next_seq();
        let entry = self.topics.get_mut(id).expect("interned above");
        let owner = Holder::Replica(replica, join.phx_ref);
        // Dropped and synced back within one window: subscribers still
        // have it, under the same ref, as long as its leave is not sent.
        let seq = entry
            .pending()
            .withdraw_leave(&owner, join.key, &join.meta)
            .unwrap_or(seq);
        let key = entry.shared_key(join.key);
        self.occupied_topics += usize::from(entry.is_empty());
        let position = entry.insert(Presence {
            owner,
            key,
            meta: join.meta,
            phx_ref: local_ref,
            prev_ref: prev_ref(join.prev_ref),
            seq,
        });
        entry.record_join(position, self.exact, next_seq);
        self.presences += 1;
        let handle = RemoteHandle {
            topic: id,
            local_ref,
            generation,
        };
        self.replicas
            .get_mut(&replica)
            .expect("created above")
            .presences
            .insert(join.phx_ref, handle);
        wake
    }

    /// Removes the presence `replica` holds under `phx_ref` (its ref there),
    /// if any. Returns whether the dispatcher must be woken.
    pub fn replica_leave(&mut self, replica: ReplicaId, phx_ref: Ref) -> bool {
        let Some(handle) = self
            .replicas
            .get_mut(&replica)
            .and_then(|set| set.presences.remove(&phx_ref))
        else {
            return false;
        };
        self.remove_presence(handle.topic, handle.local_ref)
    }

    /// Starts a full sync of `replica`: joins from now on confirm what it
    /// holds, and [`Registry::replica_end_sync`] removes what they did not.
    pub fn replica_begin_sync(&mut self, replica: ReplicaId) {
        let set = self.replicas.entry(replica).or_default();
        set.generation = set.generation.wrapping_add(1);
    }

    /// Ends a full sync: the presences of `replica` that no join confirmed
    /// since [`Registry::replica_begin_sync`] are detached, for
    /// [`Registry::remove_departed`] to remove. O(presences of the replica).
    pub fn replica_end_sync(&mut self, replica: ReplicaId) -> Departure {
        let Some(set) = self.replicas.get_mut(&replica) else {
            return Departure::of_handles(Vec::new());
        };
        let generation = set.generation;
        let mut stale = Vec::new();
        set.presences.retain(|_, held| {
            let confirmed = held.generation == generation;
            if !confirmed {
                stale.push(crate::owner::Handle {
                    topic: held.topic,
                    phx_ref: held.local_ref,
                });
            }
            confirmed
        });
        Departure::of_handles(stale)
    }

    /// Detaches every presence of `replica` in O(1), for
    /// [`Registry::remove_departed`] to remove a chunk at a time. They stay
    /// listed until removed, but no replication reaches them any more.
    pub fn drop_replica(&mut self, replica: ReplicaId) -> Option<Departure> {
        let set = self.replicas.remove(&replica)?;
        Some(Departure::of_replica(set.presences))
    }

    /// Presences `replica` holds here.
    pub fn replica_len(&self, replica: ReplicaId) -> usize {
        self.replicas.get(&replica).map_or(0, |s| s.presences.len())
    }

    /// Replicas with a set here, emptied ones included until dropped.
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// Every presence on this node, topic by topic, as snapshots for a full
    /// state: O(topics) under the lock, walked after it.
    ///
    /// Another node syncs from what they show, as a client does from a
    /// list, so every topic is marked observed: a presence whose join was
    /// still pending has its leave sent, or the other node would keep it.
    pub fn observed_snapshots(&mut self) -> Vec<(Bytes, crate::Snapshot<Presence<O, M>>)> {
        let next_seq = self.refs.next_seq();
        self.topics
            .iter_mut()
            .filter(|topic| !topic.is_empty())
            .map(|topic| {
                if let Some(pending) = &mut topic.pending {
                    pending.observed_before_seq = next_seq;
                }
                (topic.name.clone(), topic.snapshot())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Counts, PartLimits};

    type Reg = Registry<u32, &'static str, ()>;

    fn join<'a>(
        topic: &'a str,
        key: &'a str,
        meta: &'static str,
        r: Ref,
    ) -> RemoteJoin<'a, &'static str> {
        RemoteJoin {
            topic: topic.as_bytes(),
            key: key.as_bytes(),
            meta,
            phx_ref: r,
            prev_ref: None,
        }
    }

    fn drain(r: &mut Reg) -> (Vec<Ref>, Vec<Ref>) {
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for diff in r.take_diffs(usize::MAX, usize::MAX) {
            for (j, l) in diff.parts(PartLimits::UNLIMITED, |_| 1) {
                joins.extend(j.iter().map(|p| p.shown_ref()));
                leaves.extend(l.iter().map(|p| p.shown_ref()));
            }
        }
        joins.sort();
        leaves.sort();
        (joins, leaves)
    }

    #[test]
    fn replicated_presences_count_list_and_diff_like_local_ones() {
        let mut r = Reg::new(1_000);
        r.track(1, b"t", b"alice", "a", || Some(())).unwrap();
        assert!(!r.replica_join(7, join("t", "alice", "b", 42)));
        r.replica_join(7, join("t", "bob", "c", 43));
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 2,
                connections: 3
            }
        );
        let (joins, _) = drain(&mut r);
        assert!(joins.contains(&42) && joins.contains(&43));
        assert!(r
            .get_by_key(b"t", b"alice")
            .iter()
            .any(|p| p.shown_ref() == 42));
        r.replica_leave(7, 42);
        assert_eq!(drain(&mut r), (vec![], vec![42]));
        assert_eq!(r.replica_len(7), 1);
    }

    #[test]
    fn joins_and_leaves_are_idempotent() {
        let mut r = Reg::new(0);
        r.replica_join(1, join("t", "k", "m", 5));
        r.replica_join(1, join("t", "k", "m", 5));
        assert_eq!(r.len(), 1);
        r.replica_leave(1, 5);
        r.replica_leave(1, 5);
        r.replica_leave(2, 5);
        assert!(r.is_empty());
    }

    #[test]
    fn two_replicas_may_share_a_ref_and_a_key() {
        let mut r = Reg::new(0);
        r.replica_join(1, join("t", "k", "m", 5));
        r.replica_join(2, join("t", "k", "m", 5));
        assert_eq!(r.counts(b"t").connections, 2);
        r.replica_leave(1, 5);
        assert_eq!(r.get_by_key(b"t", b"k")[0].owner, Holder::Replica(2, 5));
    }

    #[test]
    fn a_sync_keeps_confirmed_presences_and_removes_the_rest() {
        let mut r = Reg::new(0);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            r.replica_join(1, join("t", key, "m", i as Ref));
        }
        drain(&mut r);
        r.replica_begin_sync(1);
        r.replica_join(1, join("t", "a", "m", 0));
        r.replica_join(1, join("t", "d", "m", 9));
        let mut stale = r.replica_end_sync(1);
        assert_eq!(stale.remaining(), 2);
        r.remove_departed(&mut stale, usize::MAX);
        assert_eq!(r.counts(b"t").connections, 2);
        // Only what changed is sent: d joins, b and c leave, a stays.
        assert_eq!(drain(&mut r), (vec![9], vec![1, 2]));
    }

    #[test]
    fn a_dropped_replica_goes_in_chunks_and_hears_nothing_more() {
        let mut r = Reg::new(0);
        for i in 0..10 {
            r.replica_join(3, join("t", &i.to_string(), "m", i));
        }
        r.track(1, b"t", b"local", "m", || Some(())).unwrap();
        let mut departure = r.drop_replica(3).unwrap();
        assert_eq!(r.remove_departed(&mut departure, 4).removed, 4);
        r.replica_leave(3, 9);
        r.remove_departed(&mut departure, usize::MAX);
        assert!(departure.is_done());
        assert_eq!(r.counts(b"t").connections, 1);
        assert_eq!(r.replica_count(), 0);
    }

    #[test]
    fn a_presence_dropped_and_synced_back_in_one_window_is_not_sent_again() {
        let mut r = Reg::new(0);
        r.replica_join(3, join("t", "k", "m", 5));
        r.replica_join(3, join("t", "gone", "m", 6));
        drain(&mut r);
        // A netsplit drops the replica, the heal syncs it back: both
        // presences keep their refs, and one of them left meanwhile.
        let mut departure = r.drop_replica(3).unwrap();
        r.remove_departed(&mut departure, usize::MAX);
        r.replica_begin_sync(3);
        r.replica_join(3, join("t", "k", "m", 5));
        r.replica_end_sync(3);
        // Subscribers still have 5: its leave and join under the same ref
        // in one diff would lose it (joins are applied first).
        assert_eq!(drain(&mut r), (vec![], vec![6]));
        assert_eq!(r.counts(b"t").connections, 1);
        r.replica_leave(3, 5);
        assert_eq!(drain(&mut r), (vec![], vec![5]));
    }

    #[test]
    fn a_listed_presence_dropped_and_synced_back_joins_once() {
        let mut r = Reg::new(0);
        r.replica_join(3, join("t", "k", "m", 5));
        r.observe(b"t");
        let mut departure = r.drop_replica(3).unwrap();
        r.remove_departed(&mut departure, usize::MAX);
        r.replica_join(3, join("t", "k", "m", 5));
        assert_eq!(drain(&mut r), (vec![5], vec![]));
    }

    #[test]
    fn observed_snapshots_list_every_topic() {
        let mut r = Reg::new(0);
        r.track(1, b"a", b"k", "m", || Some(())).unwrap();
        r.track(1, b"b", b"k", "m", || Some(())).unwrap();
        r.replica_join(2, join("c", "k", "m", 1));
        let snapshots = r.observed_snapshots();
        let local: usize = snapshots
            .iter()
            .map(|(_, s)| s.iter().filter(|p| p.is_local()).count())
            .sum();
        assert_eq!((snapshots.len(), local), (3, 2));
    }
}
