//! Diff parts waiting for delivery, for both backends (the NIF's table and
//! the sidecar's store).
//!
//! A part leaves the outbox only when the dispatcher acknowledges it after
//! handing it to the broadcast: one that dies mid-delivery leaves it to its
//! successor, which sends it again (at least once). Parts go out in the
//! order they were queued, so subscribers see every topic's diffs in order.

use std::collections::VecDeque;
use std::time::Instant;

use crate::diff::{cut, PartLimits, TopicDiff};
use crate::presence::{Bytes, Presence};

/// What one `presence_diff` carries at most. Sending a message copies it
/// into every receiver on the sender's scheduler, and a part this size is
/// also decoded on the dispatcher's own scheduler in well under a
/// millisecond: a dirty-scheduler round trip per part costs more than that
/// on a busy node, enough to let diffs fall behind their window. Only a
/// part that one large meta pushes past the limit goes dirty.
pub const PART_LIMITS: PartLimits = PartLimits {
    presences: 500,
    weight: 128 * 1024,
};

/// About how many bytes `presence` takes in a listing: what parts are
/// weighed by.
pub fn listed_size<O, M: AsRef<[u8]>>(presence: &Presence<O, M>) -> usize {
    presence.meta.as_ref().len() + presence.key.len() + 64
}

/// One part of one topic's diff.
#[derive(Debug)]
pub struct OutboxPart<O, M> {
    pub id: u64,
    pub topic: Bytes,
    pub joins: Vec<Presence<O, M>>,
    pub leaves: Vec<Presence<O, M>>,
    /// Their [`listed_size`], summed.
    pub bytes: usize,
    /// When the oldest change it carries was made (its diff's
    /// [`TopicDiff::since`]).
    pub since: Instant,
}

impl<O, M> OutboxPart<O, M> {
    /// Microseconds since its oldest change. Reported as an age, not a
    /// time: the reader's clock (the VM's, or the other side of a pipe)
    /// is not this one.
    pub fn age_us(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug)]
pub struct Outbox<O, M> {
    parts: VecDeque<OutboxPart<O, M>>,
    next_id: u64,
}

impl<O: Clone, M: Clone + AsRef<[u8]>> Outbox<O, M> {
    /// Part ids start at `first_id`: a sidecar restarted under the same
    /// dispatcher starts elsewhere, so that an old id never acknowledges a
    /// new part.
    pub fn new(first_id: u64) -> Self {
        Outbox {
            parts: VecDeque::new(),
            next_id: first_id,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Queues `diff`, cut into parts within [`PART_LIMITS`].
    pub fn push_diff(&mut self, diff: &TopicDiff<O, M>) {
        for (joins, leaves) in diff.parts(PART_LIMITS, listed_size) {
            self.push(&diff.topic, joins, leaves, diff.since);
        }
    }

    /// Queues leaves of `topic` that come from no diff (owed after a
    /// restart, dated from now), cut into parts within [`PART_LIMITS`].
    pub fn push_leaves(&mut self, topic: &Bytes, leaves: &[Presence<O, M>]) {
        let now = Instant::now();
        for (joins, leaves) in cut(
            Vec::new(),
            leaves.iter().collect(),
            PART_LIMITS,
            &listed_size,
        ) {
            self.push(topic, joins, leaves, now);
        }
    }

    fn push(
        &mut self,
        topic: &Bytes,
        joins: Vec<&Presence<O, M>>,
        leaves: Vec<&Presence<O, M>>,
        since: Instant,
    ) {
        let bytes = joins.iter().chain(&leaves).map(|p| listed_size(p)).sum();
        let id = self.next_id;
        self.next_id += 1;
        self.parts.push_back(OutboxPart {
            id,
            topic: topic.clone(),
            joins: joins.into_iter().cloned().collect(),
            leaves: leaves.into_iter().cloned().collect(),
            bytes,
            since,
        });
    }

    /// The oldest part not acknowledged yet.
    pub fn front(&self) -> Option<&OutboxPart<O, M>> {
        self.parts.front()
    }

    /// The parts not acknowledged yet, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &OutboxPart<O, M>> {
        self.parts.iter()
    }

    /// Drops part `id`, if it is the oldest (an id acknowledged twice, or
    /// out of turn, changes nothing).
    pub fn ack(&mut self, id: u64) {
        if self.parts.front().is_some_and(|part| part.id == id) {
            self.parts.pop_front();
            if self.parts.is_empty() && self.parts.capacity() > 64 {
                self.parts.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Holder;

    fn leave(key: &str, phx_ref: u64) -> Presence<u32, Vec<u8>> {
        Presence {
            owner: Holder::Local(1),
            key: Bytes::from(key),
            meta: vec![0; 100],
            phx_ref,
            prev_ref: None,
            seq: 0,
        }
    }

    #[test]
    fn parts_go_in_order_and_leave_only_when_the_oldest_is_acknowledged() {
        let mut outbox = Outbox::new(10);
        let topic = Bytes::from("t");
        let leaves: Vec<_> = (0..1_200).map(|i| leave(&format!("k{i}"), i)).collect();
        outbox.push_leaves(&topic, &leaves);
        assert_eq!(outbox.len(), 3, "500 presences a part at most");

        let first = outbox.front().unwrap();
        assert_eq!((first.id, first.leaves.len()), (10, 500));
        assert_eq!(
            first.bytes,
            leaves[..500].iter().map(listed_size).sum::<usize>()
        );

        outbox.ack(11);
        assert_eq!(outbox.front().unwrap().id, 10, "not the oldest: kept");
        outbox.ack(10);
        outbox.ack(10);
        assert_eq!(outbox.front().unwrap().id, 11);
        outbox.ack(11);
        outbox.ack(12);
        assert!(outbox.is_empty());

        outbox.push_leaves(&topic, &[]);
        assert!(outbox.is_empty(), "no leaves, no part");
    }

    #[test]
    fn a_part_s_age_counts_from_its_oldest_change() {
        let mut outbox = Outbox::new(0);
        let topic = Bytes::from("t");
        outbox.push_leaves(&topic, &[leave("k", 1)]);
        std::thread::sleep(std::time::Duration::from_millis(3));
        let part = outbox.front().unwrap();
        assert!(part.age_us() >= 3_000, "{} us", part.age_us());
        assert!(part.age_us() < 60_000_000);
    }
}
