//! What a topic's subscribers have not been told yet: recorded as changes
//! happen ([`PendingDiff`]), taken as a [`TopicDiff`], and cut into parts.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::Instant;

use crate::cow_chunks::Snapshot;
use crate::presence::{Bytes, Holder, Presence};

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

/// Presences joining, or leaving.
type Changes<O, M> = Vec<Presence<O, M>>;

/// A pending leave of another node's presence.
#[derive(Debug)]
struct ReplicaLeave<O, M> {
    presence: Presence<O, M>,
    /// Only a listing showed it: its join goes with its leave.
    join_unsent: bool,
}

/// A topic's changes since its last diff. It exists only while the topic
/// has some: a topic nobody changes carries no diff state at all.
#[derive(Debug)]
pub(crate) struct PendingDiff<O, M> {
    /// When it was opened, by the topic's first change since its last
    /// diff: its subscribers have waited since then (a diff's latency).
    since: Instant,
    /// Presences with a seq at or after this one joined (or changed) since
    /// the last diff: their join is pending. A leave of one of them cancels
    /// that join instead of being recorded.
    pub(crate) joins_from_seq: u64,
    /// Presences with a seq before this one may have been seen in a list or
    /// `get_by_key` while their join was still pending: a client that
    /// synced from that list must hear of their leave, so it is recorded
    /// instead of cancelling the join.
    pub(crate) observed_before_seq: u64,
    /// Some presence joined while coalescing: taking the diff must look for
    /// joins among the topic's presences. Without it (leaves only, or
    /// single operations) taking a diff never walks the topic.
    pub(crate) coalesced_joins: bool,
    /// Leaves of presences whose join subscribers have seen, or may have:
    /// a listing showed it (see `gone_joins`).
    leaves: Vec<Presence<O, M>>,
    /// Joins of presences that a listing showed while their join was
    /// pending, and that left before the diff: a subscriber that did not
    /// list must hear the join before the leave, in the same diff, rather
    /// than the leave of a ref it never had.
    gone_joins: Vec<Presence<O, M>>,
    /// Leaves of other nodes' presences, by holder, kept apart from the
    /// others: such a presence keeps its node's ref, so one dropped in a
    /// netsplit and synced back within one window would leave and join
    /// under one ref in one diff, which phoenix.js applies joins first:
    /// gone. Its return withdraws the leave instead (`withdraw_leave`).
    replica_leaves: HashMap<Holder<O>, ReplicaLeave<O, M>>,
    /// Single operations not yet taken (`diff_window: 0`), oldest first;
    /// they go out before the coalesced joins and leaves.
    pub(crate) ops: Vec<Op<O, M>>,
}

impl<O, M> PendingDiff<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    /// A diff opened by a change whose seq will be `next_seq` or later:
    /// every presence already on the topic was told of in an earlier diff.
    pub(crate) fn new(next_seq: u64) -> Self {
        Self {
            since: Instant::now(),
            joins_from_seq: next_seq,
            observed_before_seq: 0,
            coalesced_joins: false,
            leaves: Vec::new(),
            gone_joins: Vec::new(),
            replica_leaves: HashMap::new(),
            ops: Vec::new(),
        }
    }

    /// What taking it costs, for a topic of `topic_len` presences: its
    /// joins are found among them, and its leaves are moved.
    pub(crate) fn work(&self, topic_len: usize) -> usize {
        let joins = if self.coalesced_joins { topic_len } else { 0 };
        let ops: usize = self
            .ops
            .iter()
            .map(|op| op.joins.len() + op.leaves.len())
            .sum();
        joins + self.gone_joins.len() + self.leaves.len() + self.replica_leaves.len() + ops
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
                self.leaves.push(presence);
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
    /// single operations to come: O(presences), once, when `diff_window: 0`
    /// is switched on with a diff pending. `presences` are the topic's, and
    /// `next_seq` the seq the next change will have.
    pub(crate) fn seal<'p>(
        &mut self,
        presences: impl Iterator<Item = &'p Presence<O, M>>,
        next_seq: u64,
    ) where
        O: 'p,
        M: 'p,
    {
        let (mut joins, leaves) = self.take_gone_joins_and_leaves();
        if self.coalesced_joins {
            let from = self.joins_from_seq;
            joins.extend(presences.filter(|p| p.seq >= from).cloned());
        }
        // After any ops of an earlier spell of single operations: those
        // happened before what coalescing gathered since.
        if !joins.is_empty() || !leaves.is_empty() {
            self.push_op(0, joins, leaves);
        }
        self.coalesced_joins = false;
        self.joins_from_seq = next_seq;
    }

    fn take_gone_joins_and_leaves(&mut self) -> (Changes<O, M>, Changes<O, M>) {
        let mut gone_joins = std::mem::take(&mut self.gone_joins);
        let mut leaves = std::mem::take(&mut self.leaves);
        for (_, left) in self.replica_leaves.drain() {
            if left.join_unsent {
                gone_joins.push(left.presence.clone());
            }
            leaves.push(left.presence);
        }
        (gone_joins, leaves)
    }

    /// The diff to send: what was recorded, and `entries`, a snapshot of
    /// the topic's presences among which its coalesced joins are (taken
    /// only when there are some).
    pub(crate) fn into_diff(
        mut self,
        topic: Bytes,
        entries: Option<Snapshot<Presence<O, M>>>,
    ) -> TopicDiff<O, M> {
        let (gone_joins, leaves) = self.take_gone_joins_and_leaves();
        TopicDiff {
            topic,
            since: self.since,
            ops: self.ops,
            gone_joins,
            leaves,
            entries,
            joins_from_seq: self.joins_from_seq,
        }
    }
}

/// What one topic's subscribers have not been told yet.
///
/// First the single operations recorded with `diff_window: 0`, each its
/// own diff, in order. Then what coalescing gathered: leaves recorded as
/// they happened, and joins, the presences of the topic that joined or
/// were updated since the previous diff, found in a snapshot taken with the
/// diff. Taking it is a move and a snapshot, under the lock; walking,
/// encoding and dropping it happen after the lock is gone.
#[derive(Debug)]
pub struct TopicDiff<O, M> {
    pub topic: Bytes,
    /// When the topic's first change since the previous diff was made: its
    /// subscribers have waited since then.
    pub since: Instant,
    pub(crate) ops: Vec<Op<O, M>>,
    /// Joins of presences gone since, sent because a listing showed them
    /// (see `Topic::record_leave`): to subscribers only, with their leaves.
    pub(crate) gone_joins: Vec<Presence<O, M>>,
    pub(crate) leaves: Vec<Presence<O, M>>,
    pub(crate) entries: Option<Snapshot<Presence<O, M>>>,
    pub(crate) joins_from_seq: u64,
}

/// One part of a diff: presences that join and that leave.
pub type Part<'d, O, M> = (Vec<&'d Presence<O, M>>, Vec<&'d Presence<O, M>>);

/// How much a part may carry.
#[derive(Debug, Clone, Copy)]
pub struct PartLimits {
    /// Presences, joins plus leaves.
    pub presences: usize,
    /// Weight, as the caller measures a presence (e.g. encoded bytes).
    pub weight: usize,
}

impl PartLimits {
    pub const UNLIMITED: PartLimits = PartLimits {
        presences: usize::MAX,
        weight: usize::MAX,
    };
}

impl<O, M> TopicDiff<O, M> {
    /// The single operations (`diff_window: 0`), in the order they happened.
    pub fn ops(&self) -> &[Op<O, M>] {
        &self.ops
    }

    /// The coalesced joins (those of single operations are in [`Self::ops`]):
    /// presences that joined or changed since the last diff, and those
    /// among them that a listing showed and that left since (their leaves
    /// are in [`Self::leaves`]).
    pub fn joins(&self) -> impl Iterator<Item = &Presence<O, M>> {
        self.gone_joins.iter().chain(self.present_joins())
    }

    /// The coalesced joins of presences still on the topic.
    pub(crate) fn present_joins(&self) -> impl Iterator<Item = &Presence<O, M>> {
        self.entries
            .iter()
            .flat_map(|snapshot| snapshot.iter())
            .filter(|p| p.seq >= self.joins_from_seq)
    }

    /// The coalesced leaves (those of single operations are in [`Self::ops`]).
    pub fn leaves(&self) -> impl ExactSizeIterator<Item = &Presence<O, M>> {
        self.leaves.iter()
    }

    /// The diff as consecutive diffs: each single operation on its own, in
    /// order, then the coalesced changes; each cut within `limits`, so that
    /// no single broadcast copies an unbounded payload into every
    /// subscriber (only an operation larger than a part, an exit with
    /// hundreds of presences on one topic, is ever cut).
    ///
    /// Applied in order, the parts have the same effect as the whole.
    pub fn parts(
        &self,
        limits: PartLimits,
        weight: impl Fn(&Presence<O, M>) -> usize,
    ) -> Vec<Part<'_, O, M>> {
        let mut parts = Vec::new();
        for op in &self.ops {
            let joins = op.joins.iter().collect();
            let leaves = op.leaves.iter().collect();
            parts.extend(cut(joins, leaves, limits, &weight));
        }
        parts.extend(cut(
            self.joins().collect(),
            self.leaves().collect(),
            limits,
            &weight,
        ));
        parts
    }
}

/// One diff cut into parts within `limits`.
///
/// Applied in order, the parts have the same effect as the whole: a ref in
/// both joins and leaves (a presence listed mid-window, then gone) has its
/// join in the same part as its leave or an earlier one. A key that both
/// joins and leaves has its changes travel in one part whenever they fit
/// in one, so that an update (the leave of the old meta, the join of the
/// new) never shows a client a user who left and came back; one too large
/// for a part has its joins sent before its leaves: the key is never empty
/// in between unless it is empty at the end. Other changes (a join storm,
/// a mass disconnect: most large diffs) are cut as they come, with no
/// grouping to pay for. A diff whose joins and leaves all cancelled out
/// has no parts.
pub(crate) fn cut<'d, O, M>(
    joins: Vec<&'d Presence<O, M>>,
    leaves: Vec<&'d Presence<O, M>>,
    limits: PartLimits,
    weight: &impl Fn(&Presence<O, M>) -> usize,
) -> Vec<Part<'d, O, M>> {
    if joins.is_empty() && leaves.is_empty() {
        return Vec::new();
    }
    let total_weight: usize = joins.iter().chain(&leaves).map(|p| weight(p)).sum();
    if joins.len() + leaves.len() <= limits.presences && total_weight <= limits.weight {
        return vec![(joins, leaves)];
    }
    let joined = joins.len();
    let changes: Vec<(bool, &'d Presence<O, M>)> = joins
        .into_iter()
        .map(|p| (true, p))
        .chain(leaves.into_iter().map(|p| (false, p)))
        .collect();
    let mut parts = PartCutter::new(limits);
    match key_groups(&changes, joined) {
        None => {
            for &(is_join, presence) in &changes {
                parts.add(is_join, presence, weight(presence));
            }
        }
        Some(next_of_key) => {
            // Each key's changes from its first one on, joins first (they
            // come first in `changes`), keys in the order they appear.
            let mut taken = vec![false; changes.len()];
            for first in 0..changes.len() {
                if taken[first] {
                    continue;
                }
                let mut group = Vec::new();
                let mut at = Some(first);
                while let Some(i) = at {
                    taken[i] = true;
                    group.push(changes[i]);
                    at = next_of_key[i];
                }
                let group_weight: usize = group.iter().map(|(_, p)| weight(p)).sum();
                parts.start_group(group.len(), group_weight);
                for (is_join, presence) in group {
                    parts.add(is_join, presence, weight(presence));
                }
            }
        }
    }
    parts.finish()
}

/// For each change, the next change of the same key, when some key both
/// joins and leaves (`changes` holds the `joined` joins, then the leaves);
/// `None` when none does, and no change needs another's company.
fn key_groups<O, M>(
    changes: &[(bool, &Presence<O, M>)],
    joined: usize,
) -> Option<Vec<Option<usize>>> {
    if joined == 0 || joined == changes.len() {
        return None;
    }
    let leaving: HashSet<&[u8]> = changes[joined..].iter().map(|(_, p)| &*p.key).collect();
    if !changes[..joined]
        .iter()
        .any(|(_, p)| leaving.contains(&*p.key))
    {
        return None;
    }
    let mut last_of_key: HashMap<&[u8], usize> = HashMap::with_capacity(changes.len());
    let mut next = vec![None; changes.len()];
    for (i, (_, presence)) in changes.iter().enumerate() {
        if let Some(previous) = last_of_key.insert(&presence.key, i) {
            next[previous] = Some(i);
        }
    }
    Some(next)
}

/// Fills parts in turn within limits.
struct PartCutter<'d, O, M> {
    limits: PartLimits,
    max_presences: usize,
    parts: Vec<Part<'d, O, M>>,
    part: Part<'d, O, M>,
    weight: usize,
}

impl<'d, O, M> PartCutter<'d, O, M> {
    fn new(limits: PartLimits) -> Self {
        Self {
            limits,
            max_presences: limits.presences.max(1),
            parts: Vec::new(),
            part: (Vec::new(), Vec::new()),
            weight: 0,
        }
    }

    fn len(&self) -> usize {
        self.part.0.len() + self.part.1.len()
    }

    fn close_part(&mut self) {
        self.parts.push(std::mem::take(&mut self.part));
        self.weight = 0;
    }

    /// A group of changes that should share a part: a new part begins
    /// unless it fits in the current one.
    fn start_group(&mut self, presences: usize, weight: usize) {
        let len = self.len();
        if len > 0
            && (len + presences > self.max_presences || self.weight + weight > self.limits.weight)
        {
            self.close_part();
        }
    }

    fn add(&mut self, is_join: bool, presence: &'d Presence<O, M>, weight: usize) {
        let len = self.len();
        if len > 0 && (len == self.max_presences || self.weight + weight > self.limits.weight) {
            self.close_part();
        }
        self.weight += weight;
        if is_join {
            self.part.0.push(presence)
        } else {
            self.part.1.push(presence)
        }
    }

    fn finish(mut self) -> Vec<Part<'d, O, M>> {
        if self.len() > 0 {
            self.close_part();
        }
        self.parts
    }
}
