//! The presence table of a sidecar: `presence_core::Registry` and
//! `presence_core::Delivery`, as the NIF's table resource holds them, the
//! meta size limit, and what is the sidecar's own: leaves owed to
//! subscribers after a restart, and the removals whose leaves the BEAM side
//! must owe until they are delivered.

use std::collections::HashMap;

use bytes::Bytes;
use presence_core::outbox::listed_size;
use presence_core::{etf, CoreError, Delivery, Holder, Registry, Snapshot, Update};

use crate::protocol::{Body, Departed, LeaveEntry, PartBody, ReplayEntry, Stats, Status};

mod replication;
pub use replication::Job;

pub use presence_core::Meta;
/// A presence as the sidecar holds it: owners are the BEAM side's u64s.
pub type Entry = presence_core::Entry<u64>;

/// Presences per listing chunk, and bytes: a chunk is one frame, small
/// enough that replies queued behind it wait microseconds, not a whole
/// listing.
pub const CHUNK_PRESENCES: usize = 1_000;
pub const CHUNK_BYTES: usize = 256 * 1024;

pub struct Store {
    registry: Registry<u64, Meta, ()>,
    delivery: Delivery<u64, Meta>,
    max_meta_bytes: usize,
    /// Leaves of presences a restarted sidecar's subscribers may still
    /// show, by topic: sent as parts of their own after the topic's next
    /// diff, so a client sees the replayed joins before the old refs go.
    recovery_leaves: HashMap<presence_core::Bytes, Vec<Entry>>,
    /// Cluster mode (see `replication.rs`).
    replication: replication::Replication,
    /// A write made a diff pending; the server sends `Wake`.
    woke: bool,
    /// Refs of presences removed since the last take that left nothing
    /// pending: the BEAM owes their leaves after a restart until they are
    /// known delivered. `taken`: those a take has moved to the parts.
    removed: Vec<u64>,
    taken: Vec<u64>,
}

/// What a request did, for the server to send.
pub enum Outcome {
    /// A write: nothing to answer.
    Applied,
    Reply(Status, Body),
    /// A listing: the registry's snapshot to encode off the request loop,
    /// or `None` for an empty one.
    Listing(Listing),
    /// A local state: the seq it follows and every topic's snapshot, for
    /// the server to write out as chunks off the request loop.
    State(u64, Vec<(presence_core::Bytes, Snapshot<Entry>)>),
}

pub enum Listing {
    Topic(Option<Snapshot<Entry>>),
    Key(Vec<Entry>),
}

impl Store {
    pub fn new(ref_seed: u64, max_meta_bytes: usize) -> Self {
        Store {
            registry: Registry::new(ref_seed),
            // Part ids differ between sidecars: an acknowledgement retried
            // after a restart must not remove the new sidecar's part that
            // happens to have the same number.
            delivery: Delivery::new(ref_seed >> 1),
            max_meta_bytes,
            recovery_leaves: HashMap::new(),
            replication: Default::default(),
            woke: false,
            removed: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// A meta of a write the BEAM side decided, size limit included (it
    /// checks the encoded meta against the same `max_meta_bytes`, which may
    /// have changed since the meta was stored): refusing one here would
    /// leave the journal holding what the sidecar does not. Only bytes that
    /// are not a map's, never from our BEAM side, are refused.
    fn check_meta(&self, meta: &[u8]) -> Result<Meta, Status> {
        etf::check_meta(meta).map_err(|_| Status::BadFrame)?;
        Ok(Meta::from(meta))
    }

    pub fn configure(&mut self, max_meta_bytes: u64, diff_per_operation: bool) -> Outcome {
        self.max_meta_bytes = usize::try_from(max_meta_bytes).unwrap_or(usize::MAX);
        self.registry.set_diff_per_operation(diff_per_operation);
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    /// The BEAM's port owner wakes the dispatcher; it only asks whether
    /// anything is pending already.
    pub fn set_dispatcher(&mut self) -> Outcome {
        let pending = !self.delivery.wants_diffs()
            || self.registry.pending_topics() > 0
            || !self.recovery_leaves.is_empty();
        Outcome::Reply(Status::Ok, Body::SetDispatcher { pending })
    }

    /// Adds the presence the BEAM journaled under `phx_ref`. One the
    /// sidecar still holds under the same key can only be what a caller
    /// killed between its journal and the port left behind: it goes.
    pub fn track(
        &mut self,
        owner: u64,
        topic: &[u8],
        key: &[u8],
        phx_ref: u64,
        meta: Bytes,
    ) -> Outcome {
        let stored = match self.check_meta(&meta) {
            Ok(m) => m,
            Err(status) => return Outcome::Reply(status, Body::Empty),
        };
        self.place(owner, topic, key, phx_ref, stored);
        Outcome::Applied
    }

    fn place(&mut self, owner: u64, topic: &[u8], key: &[u8], phx_ref: u64, meta: Meta) {
        if self.registry.lookup(owner, topic, key).is_some() {
            self.woke |= self.registry.untrack(owner, topic, key).wake;
        }
        // Absent (made so above), and an owner's watch here is `()`: the
        // registry cannot refuse it.
        if let Ok(change) = self
            .registry
            .track_as(owner, topic, key, meta, Some(phx_ref), || Some(()))
        {
            self.woke |= change.wake;
        }
    }

    /// Removes the presence `phx_ref`, if the sidecar has it.
    pub fn untrack(&mut self, owner: u64, topic: &[u8], key: &[u8], phx_ref: u64) -> Outcome {
        if self.registry.lookup(owner, topic, key).map(|p| p.phx_ref) == Some(phx_ref) {
            self.woke |= self.registry.untrack(owner, topic, key).wake;
        }
        self.removed.push(phx_ref);
        Outcome::Applied
    }

    /// Gives the presence `old_ref` a new meta under `new_ref`, as the BEAM
    /// decided; without it (left behind by a killed caller), `new_ref` is
    /// placed all the same, so that the sidecar holds what the journal does.
    pub fn update(
        &mut self,
        owner: u64,
        topic: &[u8],
        key: &[u8],
        old_ref: u64,
        new_ref: u64,
        meta: Bytes,
    ) -> Outcome {
        let stored = match self.check_meta(&meta) {
            Ok(m) => m,
            Err(status) => return Outcome::Reply(status, Body::Empty),
        };
        self.removed.push(old_ref);
        let updated = if self.registry.lookup(owner, topic, key).map(|p| p.phx_ref) == Some(old_ref)
        {
            self.registry.update_as(
                owner,
                topic,
                key,
                stored.clone(),
                Some(old_ref),
                Some(new_ref),
            )
        } else {
            Err(CoreError::NotTracked)
        };
        match updated {
            Ok(Update::Changed(change)) => self.woke |= change.wake,
            // The BEAM sends an update only for another meta; the ref must
            // change all the same, as the caller was told it did.
            Ok(Update::Unchanged(_)) | Err(_) => self.place(owner, topic, key, new_ref, stored),
        }
        Outcome::Applied
    }

    /// Every presence of each owner at once: the BEAM told us they exited,
    /// or resyncs them. Each comes with the refs its journal held.
    pub fn exit(&mut self, exits: Vec<Departed>) -> Outcome {
        for e in exits {
            self.woke |= self.registry.untrack_owner(e.owner).wake;
            self.removed.extend(e.refs);
        }
        Outcome::Applied
    }

    /// Whether a write made a diff pending since the last call: the server
    /// then tells the BEAM, which wakes the dispatcher.
    pub fn take_woke(&mut self) -> bool {
        std::mem::take(&mut self.woke)
    }

    pub fn counts(&self, topic: &[u8]) -> Outcome {
        let c = self.registry.counts(topic);
        Outcome::Reply(
            Status::Ok,
            Body::Counts {
                users: c.users as u64,
                connections: c.connections as u64,
            },
        )
    }

    /// Marks the topic observed (a client may sync from this listing) and
    /// snapshots it; the caller encodes it.
    pub fn list(&mut self, topic: &[u8]) -> Outcome {
        self.registry.observe(topic);
        Outcome::Listing(Listing::Topic(self.registry.snapshot(topic)))
    }

    pub fn get_by_key(&mut self, topic: &[u8], key: &[u8]) -> Outcome {
        self.registry.observe(topic);
        Outcome::Listing(Listing::Key(self.registry.get_by_key(topic, key)))
    }

    /// Takes up to `max_topics` pending diffs, unless earlier parts still
    /// wait (see `presence_core::Delivery`); then the recovery leaves of
    /// those topics, and of topics with no diff of their own.
    pub fn take_diffs(&mut self, max_topics: u32) -> Outcome {
        let mut delta_started = false;
        if self.delivery.wants_diffs() {
            let diffs = self
                .registry
                .take_diffs(max_topics.max(1) as usize, usize::MAX);
            delta_started = self.delivery.queue(&diffs);
            for diff in &diffs {
                if let Some(owed) = self.recovery_leaves.remove(&*diff.topic) {
                    self.delivery.queue_leaves(&diff.topic, &owed);
                }
            }
            if self.registry.pending_topics() == 0 {
                for (topic, owed) in self.recovery_leaves.drain() {
                    self.delivery.queue_leaves(&topic, &owed);
                }
                // Every removal so far is in the outbox now, or needed no
                // leave (its join was never sent).
                self.taken.append(&mut self.removed);
            }
        }
        Outcome::Reply(
            Status::Ok,
            Body::TakeDiffs {
                queued: self.delivery.queued() as u64,
                pending: self.registry.pending_topics() as u64,
                delta_started,
                delivered: self.delivered(),
            },
        )
    }

    /// The oldest parts, up to `max` and about `CHUNK_BYTES` (at least one
    /// when there is any): the dispatcher takes a window's diffs in one
    /// round trip, not one per part, so that writes queued in the pipe ahead
    /// of it hold it up once.
    pub fn next_parts(&self, max: u32) -> Outcome {
        let mut parts = Vec::new();
        let mut bytes = 0;
        for part in self.delivery.parts().take(max.max(1) as usize) {
            if !parts.is_empty() && bytes >= CHUNK_BYTES {
                break;
            }
            let mut joins = Vec::new();
            let mut leaves = Vec::new();
            let written = etf::write_grouped(&mut joins, part.joins.iter())
                .and_then(|()| etf::write_grouped(&mut leaves, part.leaves.iter()));
            if written.is_err() {
                return Outcome::Reply(Status::BadFrame, Body::Empty);
            }
            bytes += joins.len() + leaves.len();
            parts.push(PartBody {
                part: part.id,
                age_us: part.age_us(),
                topic: Bytes::copy_from_slice(&part.topic),
                joins: joins.into(),
                leaves: leaves.into(),
            });
        }
        Outcome::Reply(Status::Ok, Body::Parts(parts))
    }

    pub fn ack_part(&mut self, id: u64) -> Outcome {
        self.delivery.ack(id);
        Outcome::Reply(
            Status::Ok,
            Body::AckPart {
                outbox_empty: self.delivery.wants_diffs(),
                delivered: self.delivered(),
            },
        )
    }

    /// Removals whose leaves are delivered: those taken, once the outbox
    /// they went to is empty.
    fn delivered(&mut self) -> Vec<u64> {
        if self.delivery.wants_diffs() {
            std::mem::take(&mut self.taken)
        } else {
            Vec::new()
        }
    }

    pub fn stats(&self, heap_bytes: u64) -> Outcome {
        let r = &self.registry;
        Outcome::Reply(
            Status::Ok,
            Body::Stats(Stats {
                presences: r.len() as u64,
                owners: r.owner_count() as u64,
                topics: r.topic_count() as u64,
                pending_topics: r.pending_topics() as u64,
                queued_parts: self.delivery.queued() as u64,
                max_meta_bytes: self.max_meta_bytes as u64,
                heap_bytes,
                replicas: r.replica_count() as u64,
            }),
        )
    }

    /// Tracks presences a crashed sidecar held, under the new refs the
    /// BEAM made, each owing subscribers the leave of its old ref once its
    /// new join is out. An entry with a bad meta is skipped.
    pub fn replay(&mut self, entries: Vec<ReplayEntry>) -> Outcome {
        for e in entries {
            let Ok(meta) = self.check_meta(&e.meta) else {
                continue;
            };
            let old = Entry {
                owner: Holder::Local(e.owner),
                key: presence_core::Bytes::from(&*e.key),
                meta: meta.clone(),
                phx_ref: e.old_ref,
                prev_ref: None,
                seq: 0,
            };
            self.place(e.owner, &e.topic, &e.key, e.new_ref, meta);
            self.removed.push(e.old_ref);
            self.recovery_leaves
                .entry(presence_core::Bytes::from(&*e.topic))
                .or_default()
                .push(old);
        }
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    /// Records leaves owed for presences that went while their leave was
    /// not yet delivered when the previous sidecar died.
    pub fn recovery_leaves(&mut self, entries: Vec<LeaveEntry>) -> Outcome {
        for e in entries {
            if etf::check_meta(&e.meta).is_err() {
                continue;
            }
            self.recovery_leaves
                .entry(presence_core::Bytes::from(&*e.topic))
                .or_default()
                .push(Entry {
                    owner: Holder::Local(0),
                    key: presence_core::Bytes::from(&*e.key),
                    meta: Meta::from(&*e.meta),
                    phx_ref: e.phx_ref,
                    prev_ref: None,
                    seq: 0,
                });
            self.removed.push(e.phx_ref);
        }
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    /// Whether a recovery left leaves to send: the dispatcher must hear of it.
    pub fn owes_leaves(&self) -> bool {
        !self.recovery_leaves.is_empty()
    }
}

/// Cuts a listing into chunks of whole listed keys (a key larger than a
/// chunk is split, the later chunks marked as continuing it), each written
/// as one `%{key => %{metas: [...]}}` term. Keys are grouped as listed:
/// `42` and `"42"` are one entry, which the BEAM side merges whole only
/// when it is marked as continuing.
pub fn listing_chunks<'p>(presences: impl Iterator<Item = &'p Entry>) -> Vec<(bool, Vec<u8>)> {
    let mut chunks = Vec::new();
    // Whole groups, and the part of one that did not fit the last chunk.
    let mut chunk: Vec<Vec<&Entry>> = Vec::new();
    let mut in_chunk = 0;
    let mut bytes = 0;
    let mut continues = false;
    let flush = |chunk: &mut Vec<Vec<&Entry>>, continues: bool, chunks: &mut Vec<_>| {
        let mut out = Vec::new();
        // Stored metas were checked as maps when they were written.
        if etf::write_groups(&mut out, chunk).is_ok() {
            chunks.push((continues, out));
        }
        chunk.clear();
    };
    for group in etf::group_by_listed_key(presences) {
        let sizes: Vec<usize> = group.iter().map(|p| listed_size(p)).collect();
        let group_bytes: usize = sizes.iter().sum();
        if in_chunk > 0
            && (in_chunk + group.len() > CHUNK_PRESENCES || bytes + group_bytes > CHUNK_BYTES)
        {
            flush(&mut chunk, continues, &mut chunks);
            (continues, in_chunk, bytes) = (false, 0, 0);
        }
        let mut part: Vec<&Entry> = Vec::new();
        for (p, size) in group.into_iter().zip(sizes) {
            if in_chunk > 0 && (in_chunk == CHUNK_PRESENCES || bytes + size > CHUNK_BYTES) {
                if !part.is_empty() {
                    chunk.push(std::mem::take(&mut part));
                }
                flush(&mut chunk, continues, &mut chunks);
                // The rest of this key continues the chunk just sent.
                (continues, in_chunk, bytes) = (true, 0, 0);
            }
            bytes += size;
            in_chunk += 1;
            part.push(p);
        }
        chunk.push(part);
    }
    if !chunk.is_empty() || chunks.is_empty() {
        flush(&mut chunk, continues, &mut chunks);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence_core::key::term_key;

    fn entry(owner: u64, key: &[u8], phx_ref: u64) -> Entry {
        Entry {
            owner: Holder::Local(owner),
            key: key.into(),
            // term_to_binary(%{})
            meta: vec![131, 116, 0, 0, 0, 0].into(),
            phx_ref,
            prev_ref: None,
            seq: phx_ref,
        }
    }

    /// How often the binary key `"42"` is written in a chunk.
    fn forty_twos(chunk: &[u8]) -> usize {
        let key = [109, 0, 0, 0, 2, b'4', b'2'];
        chunk.windows(key.len()).filter(|w| *w == key).count()
    }

    #[test]
    fn a_term_key_and_the_string_it_prints_as_are_one_entry_of_one_chunk() {
        // "42" first, then enough other keys to fill the chunk, then the
        // integer 42: a chunk of whole stored keys would cut them apart.
        let integer_42 = term_key(b"42", &[131, 97, 42]);
        let mut presences = vec![entry(1, b"42", 1)];
        for i in 0..CHUNK_PRESENCES as u64 - 1 {
            presences.push(entry(2, format!("k{i}").as_bytes(), 10 + i));
        }
        presences.push(entry(3, &integer_42, 5_000));
        let chunks = listing_chunks(presences.iter());
        assert_eq!(chunks.len(), 2);
        let forty_twos: Vec<usize> = chunks.iter().map(|(_, c)| forty_twos(c)).collect();
        assert_eq!(
            forty_twos,
            [1, 0],
            "\"42\" and 42 are one entry of the first chunk"
        );
        assert!(chunks.iter().all(|(continues, _)| !continues));
    }
}
