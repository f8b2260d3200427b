//! Diffs on their way out of a table: to its subscribers, as parts in the
//! [`Outbox`], and in cluster mode to the other nodes, as this node's
//! changes in the pending delta ([`Outgoing`]).
//!
//! Both backends keep one beside their registry (the NIF's table resource,
//! the sidecar's store), so that the rules of delivery are written once:
//!
//! * a take waits for the outbox to empty: parts of an earlier take go
//!   first, so that subscribers see every topic's diffs in order;
//! * while replicating, the take records this node's own changes for the
//!   other nodes, as its subscribers are told of them: joins that cancelled
//!   out within a window never cross the network;
//! * a part leaves the outbox only when acknowledged (at least once).
//!
//! Taking diffs from the registry is the caller's: the NIF does it under
//! the registry's lock and queues them after letting it go.

use crate::delta::Outgoing;
use crate::diff::TopicDiff;
use crate::outbox::{Outbox, OutboxPart};
use crate::presence::{Bytes, Presence};

#[derive(Debug)]
pub struct Delivery<O, M> {
    outbox: Outbox<O, M>,
    outgoing: Outgoing,
    replicating: bool,
}

impl<O: Clone, M: Clone + AsRef<[u8]>> Delivery<O, M> {
    /// Part ids start at `first_part_id` (see [`Outbox::new`]).
    pub fn new(first_part_id: u64) -> Self {
        Self {
            outbox: Outbox::new(first_part_id),
            outgoing: Outgoing::default(),
            replicating: false,
        }
    }

    /// Whether a take may take diffs now: no part of an earlier one waits.
    pub fn wants_diffs(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Queues diffs just taken, cut into parts, after recording this node's
    /// changes among them for the other nodes while replicating. Returns
    /// whether those changes are the first to wait: the replicator is then
    /// to be told.
    pub fn queue(&mut self, diffs: &[TopicDiff<O, M>]) -> bool {
        let delta_started = self.replicating && self.outgoing.record(diffs);
        for diff in diffs {
            self.outbox.push_diff(diff);
        }
        delta_started
    }

    /// Queues leaves of `topic` that come from no diff (owed after a
    /// sidecar's restart).
    pub fn queue_leaves(&mut self, topic: &Bytes, leaves: &[Presence<O, M>]) {
        self.outbox.push_leaves(topic, leaves);
    }

    /// The oldest part not acknowledged yet.
    pub fn next_part(&self) -> Option<&OutboxPart<O, M>> {
        self.outbox.front()
    }

    /// The parts not acknowledged yet, oldest first.
    pub fn parts(&self) -> impl Iterator<Item = &OutboxPart<O, M>> {
        self.outbox.iter()
    }

    /// Drops part `id`, handed to the broadcast, if it is the oldest.
    pub fn ack(&mut self, id: u64) {
        self.outbox.ack(id);
    }

    /// Parts not acknowledged yet.
    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Switches replication on or off; off forgets the pending changes.
    pub fn set_replicating(&mut self, on: bool) {
        if !on {
            self.outgoing.discard();
        }
        self.replicating = on;
    }

    pub fn is_replicating(&self) -> bool {
        self.replicating
    }

    /// The number of the last delta handed out.
    pub fn delta_seq(&self) -> u64 {
        self.outgoing.seq()
    }

    /// This node's changes since the last delta, as the next numbered one.
    pub fn take_delta(&mut self) -> Option<(u64, Vec<u8>)> {
        self.outgoing.take()
    }

    /// Numbers deltas on from `seq` at least (see [`Outgoing::resume_after`]).
    pub fn resume_deltas_after(&mut self, seq: u64) {
        self.outgoing.resume_after(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    type Reg = Registry<u32, Bytes, ()>;

    fn meta() -> Bytes {
        // term_to_binary(%{a: 1})
        Bytes::from(&[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 1][..])
    }

    #[test]
    fn a_take_waits_for_the_outbox_and_records_only_while_replicating() {
        let mut reg = Reg::new(1);
        let mut delivery: Delivery<u32, Bytes> = Delivery::new(0);
        reg.track(1, b"t", b"a", meta(), || Some(())).unwrap();
        assert!(delivery.wants_diffs());
        assert!(!delivery.queue(&reg.take_diffs(10, usize::MAX)));
        assert_eq!(
            delivery.take_delta(),
            None,
            "not replicating: nothing recorded"
        );
        assert!(!delivery.wants_diffs());

        delivery.set_replicating(true);
        let id = delivery.next_part().unwrap().id;
        delivery.ack(id);
        reg.track(2, b"t", b"b", meta(), || Some(())).unwrap();
        assert!(delivery.queue(&reg.take_diffs(10, usize::MAX)));
        assert_eq!(delivery.take_delta().map(|(seq, _)| seq), Some(1));
        assert_eq!(delivery.delta_seq(), 1);
        assert_eq!(delivery.queued(), 1);
    }
}
