//! One topic's presences: the entries, their indexes, and what its
//! subscribers have not been told yet.

use std::collections::HashMap;
use std::hash::Hash;

use crate::cow_chunks::{CowChunks, Snapshot};
use crate::key::{is_term_key, listed_key};
use crate::owner::Holder;
use crate::phx_ref::RefGen;
use crate::ref_hash::ShardedRefMap;
use crate::registry::{Bytes, Presence, Ref};
use crate::sharded_map::ShardedMap;

/// One operation's changes to a topic, kept whole for `diff_window: 0`:
/// sent as one diff of its own, in the order operations happened.
#[derive(Debug)]
pub struct Op<O, M> {
    /// Leaves recorded under the same group (an exit's, a dropped
    /// replica's) and nothing between them go out as one op.
    pub(crate) group: u64,
    pub joins: Vec<Presence<O, M>>,
    pub leaves: Vec<Presence<O, M>>,
}

/// The refs under one key in one topic, by owner: an owner has at most one
/// presence under a key on a topic. Most keys have one connection, so that
/// case is a bare ref (its owner is the entry's); a key shared by many (one
/// user with many tabs, or a topic keyed by a constant) stays O(1) to look
/// up and change.
#[derive(Debug)]
// Boxed: a bare map would make every single-ref key six times larger.
#[allow(clippy::box_collection)]
enum KeyRefs<O> {
    One(Ref),
    Many(Box<HashMap<Holder<O>, Ref>>),
}

/// What counting users takes when some keys are not binaries: those are
/// listed by their string, which a binary key or another term may share
/// (`42`, `"42"` and `:"42"` are one user, as `list/1` shows them).
#[derive(Debug, Default)]
struct TermKeys {
    /// Distinct term keys present.
    keys: usize,
    /// Distinct term keys present, by the string they are listed under.
    by_listed: HashMap<Bytes, usize>,
    /// Strings in `by_listed` that a binary key present is also listed
    /// under: counted once.
    shared: usize,
}

/// A pending leave of another node's presence.
#[derive(Debug)]
pub(crate) struct ReplicaLeave<O, M> {
    presence: Presence<O, M>,
    /// Only a listing showed it: its join goes with its leave.
    join_unsent: bool,
}

/// A topic's leaves since its last diff (see [`Topic::take_leaves`]).
pub(crate) struct TakenLeaves<O, M> {
    pub(crate) gone_joins: Vec<Presence<O, M>>,
    pub(crate) leaves: Vec<Presence<O, M>>,
}

#[derive(Debug)]
pub(crate) struct Topic<O, M> {
    entries: CowChunks<Presence<O, M>>,
    position: ShardedRefMap<u32>,
    keys: ShardedMap<Bytes, KeyRefs<O>>,
    /// `None` while every key is a binary: the common case pays nothing.
    term_keys: Option<Box<TermKeys>>,
    /// Presences with a ref at or after this seq joined after the last
    /// diff: their join is pending. A leave of one of them cancels that
    /// join instead of being recorded.
    pub(crate) joins_from_seq: u64,
    /// Presences with a ref before this seq may have been seen in a list
    /// or `get_by_key` while their join was still pending: a client that
    /// synced from that list must hear of their leave, so it is recorded
    /// instead of cancelling the join.
    pub(crate) observed_before_seq: u64,
    /// Leaves of presences whose join subscribers have seen, or may have:
    /// a listing showed it (see `gone_joins`).
    pub(crate) pending_leaves: Vec<Presence<O, M>>,
    /// Joins of presences that a listing showed while their join was
    /// pending, and that left before the diff: a subscriber that did not
    /// list must hear the join before the leave, in the same diff, rather
    /// than the leave of a ref it never had.
    pub(crate) gone_joins: Vec<Presence<O, M>>,
    /// Leaves of other nodes' presences, by holder, kept apart from the
    /// others: such a presence keeps its node's ref, so one dropped in a
    /// netsplit and synced back within one window would leave and join
    /// under one ref in one diff, which phoenix.js applies joins first:
    /// gone. Its return withdraws the leave instead (`withdraw_leave`).
    pub(crate) replica_leaves: HashMap<Holder<O>, ReplicaLeave<O, M>>,
    /// Some presence joined since the last diff while coalescing: taking
    /// the diff must look for joins among the entries. Without it (leaves
    /// only, or single operations) taking a diff never walks the topic.
    pub(crate) coalesced_joins: bool,
    /// Single operations not yet taken (`diff_window: 0`), oldest first;
    /// they go out before the coalesced joins and leaves.
    pub(crate) ops: Vec<Op<O, M>>,
    /// In `Registry::dirty`, waiting for `take_diffs`.
    pub(crate) dirty: bool,
}

impl<O, M> Topic<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    /// A topic created when refs up to `next_seq` are already handed out.
    pub(crate) fn new(next_seq: u64) -> Self {
        Self {
            entries: CowChunks::default(),
            position: ShardedRefMap::default(),
            keys: ShardedMap::default(),
            term_keys: None,
            joins_from_seq: next_seq,
            observed_before_seq: 0,
            pending_leaves: Vec::new(),
            gone_joins: Vec::new(),
            replica_leaves: HashMap::new(),
            coalesced_joins: false,
            ops: Vec::new(),
            dirty: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What taking this topic's diff costs: its joins are found among all
    /// its presences, and its leaves are moved.
    pub(crate) fn diff_work(&self) -> usize {
        let joins = if self.coalesced_joins { self.len() } else { 0 };
        let ops: usize = self
            .ops
            .iter()
            .map(|op| op.joins.len() + op.leaves.len())
            .sum();
        joins + self.gone_joins.len() + self.pending_leaves.len() + self.replica_leaves.len() + ops
    }

    /// Distinct keys as listed: Drab's `count_users/1` on Phoenix counts
    /// the keys of `list/1`, strings.
    pub(crate) fn users(&self) -> usize {
        match &self.term_keys {
            None => self.keys.len(),
            Some(t) => self.keys.len() - t.keys + t.by_listed.len() - t.shared,
        }
    }

    /// Counts `key`, which has just got its first presence here.
    fn key_added(&mut self, key: &Bytes) {
        if is_term_key(key) {
            let listed = listed_key(key);
            let binary_there = self.keys.get(listed).is_some();
            let terms = self.term_keys.get_or_insert_with(Box::default);
            terms.keys += 1;
            let same = terms.by_listed.entry(Bytes::from(listed)).or_insert(0);
            *same += 1;
            if *same == 1 && binary_there {
                terms.shared += 1;
            }
        } else if let Some(terms) = &mut self.term_keys {
            if terms.by_listed.contains_key(&**key) {
                terms.shared += 1;
            }
        }
    }

    /// Uncounts `key`, whose last presence here has just gone.
    fn key_removed(&mut self, key: &Bytes) {
        if is_term_key(key) {
            let listed = listed_key(key);
            let binary_there = self.keys.get(listed).is_some();
            let terms = self.term_keys.as_mut().expect("counted when added");
            terms.keys -= 1;
            let same = terms.by_listed.get_mut(listed).expect("counted when added");
            *same -= 1;
            if *same == 0 {
                terms.by_listed.remove(listed);
                if binary_there {
                    terms.shared -= 1;
                }
            }
            if terms.keys == 0 {
                self.term_keys = None;
            }
        } else if let Some(terms) = &mut self.term_keys {
            if terms.by_listed.contains_key(&**key) {
                terms.shared -= 1;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot<Presence<O, M>> {
        self.entries.snapshot()
    }

    /// The ref and position of `owner`'s presence under `key`: O(1).
    pub(crate) fn find(&self, owner: &Holder<O>, key: &[u8]) -> Option<(Ref, usize)> {
        let phx_ref = match self.keys.get(key)? {
            KeyRefs::One(r) => *r,
            KeyRefs::Many(by_owner) => *by_owner.get(owner)?,
        };
        let index = *self.position.get(&phx_ref)? as usize;
        (self.entries.get(index)?.owner == *owner).then_some((phx_ref, index))
    }

    pub(crate) fn get(&self, index: usize) -> Option<&Presence<O, M>> {
        self.entries.get(index)
    }

    /// The presence with `phx_ref`, if it is still on this topic.
    pub(crate) fn by_ref(&self, phx_ref: Ref) -> Option<&Presence<O, M>> {
        self.entries.get(*self.position.get(&phx_ref)? as usize)
    }

    /// How many presences `key` has here.
    pub(crate) fn key_len(&self, key: &[u8]) -> usize {
        match self.keys.get(key) {
            None => 0,
            Some(KeyRefs::One(_)) => 1,
            Some(KeyRefs::Many(by_owner)) => by_owner.len(),
        }
    }

    /// The presences under `key`, cloned.
    pub(crate) fn by_key(&self, key: &[u8]) -> Vec<Presence<O, M>> {
        let refs: Vec<Ref> = match self.keys.get(key) {
            None => return Vec::new(),
            Some(KeyRefs::One(r)) => vec![*r],
            Some(KeyRefs::Many(by_owner)) => by_owner.values().copied().collect(),
        };
        refs.into_iter()
            .filter_map(|r| self.by_ref(r).cloned())
            .collect()
    }

    /// The interned copy of `key`, if some presence has it, so that every
    /// presence under one key shares one allocation.
    pub(crate) fn interned_key(&self, key: &[u8]) -> Bytes {
        match self.keys.get_key_value(key) {
            Some((existing, _)) => existing.clone(),
            None => Bytes::from(key),
        }
    }

    /// Adds `presence`; returns its position.
    pub(crate) fn insert(&mut self, presence: Presence<O, M>) -> usize {
        let phx_ref = presence.phx_ref;
        let owner = presence.owner;
        let refs = match self.keys.get_mut(&presence.key) {
            None => Some(KeyRefs::One(phx_ref)),
            Some(KeyRefs::Many(by_owner)) => {
                by_owner.insert(owner, phx_ref);
                None
            }
            Some(KeyRefs::One(first)) => {
                let first = *first;
                let first_owner = self.by_ref(first).expect("indexed refs are live").owner;
                let by_owner = HashMap::from([(first_owner, first), (owner, phx_ref)]);
                Some(KeyRefs::Many(Box::new(by_owner)))
            }
        };
        let new_key = matches!(refs, Some(KeyRefs::One(_)));
        if let Some(refs) = refs {
            self.keys.insert(presence.key.clone(), refs);
        }
        if new_key {
            self.key_added(&presence.key);
        }
        let index = self.entries.push(presence);
        self.position.insert(phx_ref, index as u32);
        index
    }

    /// Removes the presence `phx_ref`, if it is here.
    pub(crate) fn remove(&mut self, phx_ref: Ref) -> Option<Presence<O, M>> {
        let index = self.position.remove(&phx_ref)? as usize;
        let removed = self
            .entries
            .swap_remove(index)
            .expect("positions are in bounds");
        if let Some(moved) = self.entries.get(index) {
            self.position.insert(moved.phx_ref, index as u32);
        }
        match self.keys.get_mut(&removed.key) {
            Some(KeyRefs::Many(by_owner)) if by_owner.len() > 2 => {
                by_owner.remove(&removed.owner);
            }
            Some(KeyRefs::Many(by_owner)) => {
                by_owner.remove(&removed.owner);
                let only = *by_owner.values().next().expect("one of two left");
                self.keys.insert(removed.key.clone(), KeyRefs::One(only));
            }
            Some(KeyRefs::One(_)) => {
                self.keys.remove(&removed.key);
                self.key_removed(&removed.key);
            }
            None => {}
        }
        Some(removed)
    }

    /// Gives the presence at `index` a new meta and ref, remembering the old
    /// ref; returns it as it was before.
    pub(crate) fn replace(
        &mut self,
        index: usize,
        meta: M,
        new_ref: Ref,
        seq: u64,
    ) -> Presence<O, M> {
        let slot = self
            .entries
            .get_mut(index)
            .expect("positions are in bounds");
        let old_ref = slot.phx_ref;
        let before = slot.clone();
        slot.meta = meta;
        slot.phx_ref = new_ref;
        slot.prev_ref = Some(old_ref);
        slot.seq = seq;
        let (owner, key) = (slot.owner, slot.key.clone());
        self.position.remove(&old_ref);
        self.position.insert(new_ref, index as u32);
        match self
            .keys
            .get_mut(&key)
            .expect("every entry's key is indexed")
        {
            KeyRefs::One(r) => *r = new_ref,
            KeyRefs::Many(by_owner) => {
                by_owner.insert(owner, new_ref);
            }
        }
        before
    }

    /// A leave cancels a join that nobody can have seen yet, neither in a
    /// diff nor in a listing. Any other is recorded for the next diff; when
    /// only a listing showed the presence, with its join: every subscriber
    /// then hears of a ref's join before its leave, listed or not.
    pub(crate) fn record_leave(&mut self, presence: Presence<O, M>) {
        let join_unsent = presence.seq >= self.joins_from_seq;
        if join_unsent && presence.seq >= self.observed_before_seq {
            return;
        }
        match presence.owner {
            Holder::Replica(..) => {
                let leave = ReplicaLeave {
                    presence,
                    join_unsent,
                };
                self.replica_leaves.insert(leave.presence.owner, leave);
            }
            Holder::Local(_) => {
                if join_unsent {
                    self.gone_joins.push(presence.clone());
                }
                self.pending_leaves.push(presence);
            }
        }
    }

    /// Withdraws the pending leave of `holder`'s presence, which comes back
    /// as it left (see `replica_leaves`), and returns the seq it had: it
    /// stands where it stood for subscribers, its join sent or not.
    pub(crate) fn withdraw_leave(&mut self, holder: &Holder<O>, key: &[u8], meta: &M) -> Option<u64>
    where
        M: PartialEq,
    {
        let left = &self.replica_leaves.get(holder)?.presence;
        if *left.key != *key || left.meta != *meta {
            return None;
        }
        let left = self.replica_leaves.remove(holder).expect("found above");
        Some(left.presence.seq)
    }

    /// The leaves recorded since the last diff, with the joins of those
    /// gone since a listing showed them.
    pub(crate) fn take_leaves(&mut self) -> TakenLeaves<O, M> {
        let mut gone_joins = std::mem::take(&mut self.gone_joins);
        let mut leaves = std::mem::take(&mut self.pending_leaves);
        for (_, left) in self.replica_leaves.drain() {
            if left.join_unsent {
                gone_joins.push(left.presence.clone());
            }
            leaves.push(left.presence);
        }
        TakenLeaves { gone_joins, leaves }
    }

    /// Notes the join of the presence at `index`, made by an operation of
    /// its own (`exact`) or to be found when the diff is taken.
    pub(crate) fn record_join(&mut self, refs: &RefGen, index: usize, exact: bool) {
        if !exact {
            self.coalesced_joins = true;
            return;
        }
        let presence = self.entries.get(index).expect("joined above").clone();
        self.push_op(0, Vec::from([presence]), Vec::new());
        // Sent with its op: coalescing, were it switched on before the
        // next take, must neither send it again nor cancel its leave.
        self.joins_from_seq = refs.next_seq();
    }

    /// Adds an operation's changes, after every earlier one. A group other
    /// than 0 continues the last op if that op is of the same group.
    pub(crate) fn push_op(
        &mut self,
        group: u64,
        joins: Vec<Presence<O, M>>,
        leaves: Vec<Presence<O, M>>,
    ) {
        match self.ops.last_mut() {
            Some(last) if group != 0 && last.group == group => {
                last.joins.extend(joins);
                last.leaves.extend(leaves);
            }
            _ => self.ops.push(Op {
                group,
                joins,
                leaves,
            }),
        }
    }

    /// Turns what coalescing gathered so far into one op, before the
    /// single operations to come: O(entries), once, when `diff_window: 0`
    /// is switched on with a diff pending.
    pub(crate) fn seal(&mut self, refs: &RefGen) {
        let TakenLeaves {
            gone_joins: mut joins,
            leaves,
        } = self.take_leaves();
        if self.coalesced_joins {
            let from = self.joins_from_seq;
            joins.extend(self.entries.iter().filter(|p| p.seq >= from).cloned());
        }
        // After any ops of an earlier spell of single operations: those
        // happened before what coalescing gathered since.
        if !joins.is_empty() || !leaves.is_empty() {
            self.push_op(0, joins, leaves);
        }
        self.coalesced_joins = false;
        self.joins_from_seq = refs.next_seq();
    }
}
