//! A topic's pending diff, and how a large one is cut into parts.

use std::collections::HashMap;

use crate::cow_chunks::Snapshot;
use crate::delta::DeltaWriter;
use crate::registry::{Bytes, Presence};
use crate::topic::Op;

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
    /// Writes the changes this node's own processes made, for the other
    /// nodes: replicas' presences are theirs to report.
    pub fn write_delta(&self, delta: &mut DeltaWriter)
    where
        M: AsRef<[u8]>,
    {
        // In operation order: a presence may join in one op and leave in
        // a later one, and a replica applies records in turn.
        for op in &self.ops {
            for leave in op.leaves.iter().filter(|p| p.is_local()) {
                delta.leave(leave.phx_ref);
            }
            for join in op.joins.iter().filter(|p| p.is_local()) {
                delta.join(&self.topic, join);
            }
        }
        for leave in self.leaves().filter(|p| p.is_local()) {
            delta.leave(leave.phx_ref);
        }
        // Not the gone joins: the other nodes never listed this node's
        // table mid-window (a full state is taken as a list, and its leaves
        // are sent), and a join there after its leave would stay.
        for join in self.present_joins().filter(|p| p.is_local()) {
            delta.join(&self.topic, join);
        }
    }

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
    fn present_joins(&self) -> impl Iterator<Item = &Presence<O, M>> {
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
/// join in the same part as its leave or an earlier one. A key's
/// joins and leaves travel in one part whenever they fit in one, so that
/// an update (the leave of the old meta, the join of the new) never shows
/// a client a user who left and came back. A key too large for one part
/// has its joins sent before its leaves: the key is never empty in between
/// unless it is empty at the end. A diff whose joins and leaves all
/// cancelled out has no parts.
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

    // Each key's changes, joins first, keys in the order they appear.
    let mut by_key: HashMap<&[u8], usize> = HashMap::new();
    let mut groups: Vec<Vec<(bool, &Presence<O, M>)>> = Vec::new();
    for (is_join, presence) in joins
        .into_iter()
        .map(|p| (true, p))
        .chain(leaves.into_iter().map(|p| (false, p)))
    {
        let group = *by_key.entry(&presence.key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push((is_join, presence));
    }

    let max_presences = limits.presences.max(1);
    let mut parts = Vec::new();
    let mut part: Part<'_, O, M> = (Vec::new(), Vec::new());
    let mut part_weight = 0;
    for group in groups {
        let group_weight: usize = group.iter().map(|(_, p)| weight(p)).sum();
        let part_len = part.0.len() + part.1.len();
        if part_len > 0
            && (part_len + group.len() > max_presences
                || part_weight + group_weight > limits.weight)
        {
            parts.push(std::mem::take(&mut part));
            part_weight = 0;
        }
        for (is_join, presence) in group {
            let presence_weight = weight(presence);
            let part_len = part.0.len() + part.1.len();
            if part_len > 0
                && (part_len == max_presences || part_weight + presence_weight > limits.weight)
            {
                parts.push(std::mem::take(&mut part));
                part_weight = 0;
            }
            part_weight += presence_weight;
            if is_join {
                part.0.push(presence)
            } else {
                part.1.push(presence)
            }
        }
    }
    if !part.0.is_empty() || !part.1.is_empty() {
        parts.push(part);
    }
    parts
}
