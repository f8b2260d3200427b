//! A topic's pending diff, and how a large one is cut into parts.

use std::collections::HashMap;

use crate::cow_chunks::Snapshot;
use crate::delta::DeltaWriter;
use crate::phx_ref::RefGen;
use crate::registry::{Bytes, Presence};

/// What one topic's subscribers have not been told yet.
///
/// Leaves were recorded as they happened; joins are the presences of the
/// topic whose refs were handed out since the previous diff, found in a
/// snapshot taken with the diff. Taking it is a move and a snapshot, under
/// the lock; walking, encoding and dropping it happen after the lock is gone.
#[derive(Debug)]
pub struct TopicDiff<O, M> {
    pub topic: Bytes,
    pub(crate) leaves: Vec<Presence<O, M>>,
    pub(crate) entries: Option<Snapshot<Presence<O, M>>>,
    pub(crate) refs: RefGen,
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
        for leave in self.leaves().filter(|p| p.is_local()) {
            delta.leave(leave.phx_ref);
        }
        for join in self.joins().filter(|p| p.is_local()) {
            delta.join(&self.topic, join);
        }
    }

    pub fn joins(&self) -> impl Iterator<Item = &Presence<O, M>> {
        self.entries
            .iter()
            .flat_map(|snapshot| snapshot.iter())
            .filter(|p| self.refs.seq(p.phx_ref) >= self.joins_from_seq)
    }

    pub fn leaves(&self) -> impl ExactSizeIterator<Item = &Presence<O, M>> {
        self.leaves.iter()
    }

    /// The diff cut into consecutive diffs within `limits`, so that no
    /// single broadcast copies an unbounded payload into every subscriber.
    ///
    /// Applied in order, the parts have the same effect as the whole: no
    /// ref is in both joins and leaves, so parts touch disjoint presences.
    /// A key's joins and leaves travel in one part whenever they fit in
    /// one, so that an update (the leave of the old meta, the join of the
    /// new) never shows a client a user who left and came back. A key too
    /// large for one part has its joins sent before its leaves: the key is
    /// never empty in between unless it is empty at the end. A diff whose
    /// joins and leaves all cancelled out has no parts.
    pub fn parts(
        &self,
        limits: PartLimits,
        weight: impl Fn(&Presence<O, M>) -> usize,
    ) -> Vec<Part<'_, O, M>> {
        let joins: Vec<&Presence<O, M>> = self.joins().collect();
        let leaves: Vec<&Presence<O, M>> = self.leaves().collect();
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
}
