//! The presence table of a sidecar: `presence_core::Registry` plus what
//! the NIF's table resource adds around it (the core's outbox of diff
//! parts, with the NIF's "a take waits for the outbox to empty" rule; the
//! meta size limit), and one thing of its own: leaves owed to subscribers
//! after a restart.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use presence_core::outbox::{listed_size, Outbox};
use presence_core::{etf, CoreError, Holder, Presence, Registry, Snapshot, Update};

use crate::protocol::{flags, Body, LeaveEntry, PartBody, ReplayEntry, Stats, Status};

mod replication;
pub use replication::{Job, APPLY_CHUNK};

/// A meta as `term_to_binary/1` encoded it.
pub type Meta = Arc<[u8]>;
pub type Entry = Presence<u64, Meta>;

/// Presences per listing chunk, and bytes: a chunk is one frame, small
/// enough that replies queued behind it wait microseconds, not a whole
/// listing.
pub const CHUNK_PRESENCES: usize = 1_000;
pub const CHUNK_BYTES: usize = 256 * 1024;

pub struct Store {
    registry: Registry<u64, Meta, ()>,
    outbox: Outbox<u64, Meta>,
    max_meta_bytes: usize,
    dispatcher: Option<u64>,
    /// Leaves of presences a restarted sidecar's subscribers may still
    /// show, by topic: sent as parts of their own after the topic's next
    /// diff, so a client sees the replayed joins before the old refs go.
    recovery_leaves: HashMap<presence_core::Bytes, Vec<Entry>>,
    /// Cluster mode (see `replication.rs`).
    replication: replication::Replication,
}

/// What a request did, for the server to send.
pub enum Outcome {
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

fn error_status(e: CoreError) -> Status {
    match e {
        CoreError::AlreadyTracked => Status::AlreadyTracked,
        CoreError::NotTracked => Status::NotTracked,
        CoreError::OwnerGone => Status::Noproc,
        CoreError::Stale => Status::Stale,
    }
}

impl Store {
    pub fn new(ref_seed: u64, max_meta_bytes: usize) -> Self {
        Store {
            registry: Registry::new(ref_seed),
            // Part ids differ between sidecars: an acknowledgement retried
            // after a restart must not remove the new sidecar's part that
            // happens to have the same number.
            outbox: Outbox::new(ref_seed >> 1),
            max_meta_bytes,
            dispatcher: None,
            recovery_leaves: HashMap::new(),
            replication: Default::default(),
        }
    }

    fn check_meta(&self, meta: &[u8]) -> Result<Meta, Status> {
        if meta.len() > self.max_meta_bytes {
            return Err(Status::MetaTooLarge);
        }
        etf::check_meta(meta).map_err(|_| Status::BadFrame)?;
        Ok(Arc::from(meta))
    }

    pub fn configure(&mut self, max_meta_bytes: u64, exact: bool) -> Outcome {
        self.max_meta_bytes = usize::try_from(max_meta_bytes).unwrap_or(usize::MAX);
        self.registry.set_exact(exact);
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    pub fn set_dispatcher(&mut self, dispatcher: u64) -> Outcome {
        self.dispatcher = Some(dispatcher);
        let pending = !self.outbox.is_empty()
            || self.registry.pending_topics() > 0
            || !self.recovery_leaves.is_empty();
        Outcome::Reply(Status::Ok, Body::SetDispatcher { pending })
    }

    pub fn track(&mut self, owner: u64, topic: Bytes, key: Bytes, meta: Bytes) -> Outcome {
        let stored = match self.check_meta(&meta) {
            Ok(m) => m,
            Err(status) => return Outcome::Reply(status, Body::Empty),
        };
        let mut new_owner = false;
        let result = self.registry.track(owner, &topic, &key, stored, || {
            new_owner = true;
            Some(())
        });
        match result {
            Ok(change) => {
                let mut f = 0;
                if new_owner {
                    f |= flags::NEW_OWNER;
                }
                if change.wake {
                    f |= flags::WAKE;
                }
                Outcome::Reply(
                    Status::Ok,
                    Body::Track {
                        phx_ref: change.phx_ref,
                        flags: f,
                        owner,
                        topic,
                        key,
                        meta,
                    },
                )
            }
            Err(e) => Outcome::Reply(error_status(e), Body::Empty),
        }
    }

    pub fn untrack(&mut self, owner: u64, topic: Bytes, key: Bytes) -> Outcome {
        let removed = self.registry.untrack(owner, &topic, &key);
        let mut f = 0;
        if removed.released_watch.is_some() {
            f |= flags::RELEASED;
        }
        if removed.wake {
            f |= flags::WAKE;
        }
        if removed.removed > 0 {
            f |= flags::CHANGED;
        }
        Outcome::Reply(
            Status::Ok,
            Body::Untrack {
                flags: f,
                owner,
                topic,
                key,
            },
        )
    }

    pub fn lookup(&mut self, owner: u64, topic: &[u8], key: &[u8]) -> Outcome {
        match self.registry.lookup(owner, topic, key) {
            None => Outcome::Reply(Status::NotTracked, Body::Empty),
            Some(p) => {
                let mut out = Vec::new();
                match etf::write_meta_term(&mut out, p) {
                    Ok(()) => Outcome::Reply(
                        Status::Ok,
                        Body::Lookup {
                            phx_ref: p.phx_ref,
                            meta_term: out.into(),
                        },
                    ),
                    Err(_) => Outcome::Reply(Status::BadFrame, Body::Empty),
                }
            }
        }
    }

    pub fn update(
        &mut self,
        owner: u64,
        topic: Bytes,
        key: Bytes,
        expected_ref: Option<u64>,
        meta: Bytes,
    ) -> Outcome {
        let stored = match self.check_meta(&meta) {
            Ok(m) => m,
            Err(status) => return Outcome::Reply(status, Body::Empty),
        };
        match self
            .registry
            .update(owner, &topic, &key, stored, expected_ref)
        {
            Ok(Update::Unchanged(phx_ref)) => Outcome::Reply(
                Status::Ok,
                Body::Update {
                    phx_ref,
                    flags: 0,
                    owner,
                    topic,
                    key,
                    meta: Bytes::new(),
                },
            ),
            Ok(Update::Changed(change)) => {
                let wake = if change.wake { flags::WAKE } else { 0 };
                Outcome::Reply(
                    Status::Ok,
                    Body::Update {
                        phx_ref: change.phx_ref,
                        flags: flags::CHANGED | wake,
                        owner,
                        topic,
                        key,
                        meta,
                    },
                )
            }
            Err(e) => Outcome::Reply(error_status(e), Body::Empty),
        }
    }

    /// Every presence of `owner` at once: the BEAM told us it exited.
    pub fn exit(&mut self, owner: u64) -> Outcome {
        let removed = self.registry.untrack_owner(owner);
        Outcome::Reply(
            Status::Ok,
            Body::Exit {
                flags: if removed.wake { flags::WAKE } else { 0 },
                owner,
                removed: removed.removed as u64,
            },
        )
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

    /// Moves up to `max_topics` pending diffs into the outbox, cut into
    /// parts, unless earlier parts still wait there; then the recovery
    /// leaves of those topics, and of topics with no diff of their own.
    pub fn take_diffs(&mut self, max_topics: u32) -> Outcome {
        let mut delta_started = false;
        if self.outbox.is_empty() {
            let diffs = self
                .registry
                .take_diffs(max_topics.max(1) as usize, usize::MAX);
            // Cluster mode: this node's changes go to the other nodes as
            // its subscribers are told of them, as the NIF does.
            delta_started = self.record_delta(&diffs);
            for diff in &diffs {
                self.outbox.push_diff(diff);
                if let Some(owed) = self.recovery_leaves.remove(&*diff.topic) {
                    self.outbox.push_leaves(&diff.topic, &owed);
                }
            }
            if self.registry.pending_topics() == 0 {
                for (topic, owed) in self.recovery_leaves.drain() {
                    self.outbox.push_leaves(&topic, &owed);
                }
            }
        }
        Outcome::Reply(
            Status::Ok,
            Body::TakeDiffs {
                queued: self.outbox.len() as u64,
                pending: self.registry.pending_topics() as u64,
                delta_started,
            },
        )
    }

    pub fn next_part(&self) -> Outcome {
        let body = match self.outbox.front() {
            None => Body::Part(None),
            Some(part) => {
                let mut joins = Vec::new();
                let mut leaves = Vec::new();
                let written = etf::write_grouped(&mut joins, part.joins.iter())
                    .and_then(|()| etf::write_grouped(&mut leaves, part.leaves.iter()));
                if written.is_err() {
                    return Outcome::Reply(Status::BadFrame, Body::Empty);
                }
                Body::Part(Some(PartBody {
                    part: part.id,
                    topic: Bytes::copy_from_slice(&part.topic),
                    joins: joins.into(),
                    leaves: leaves.into(),
                }))
            }
        };
        Outcome::Reply(Status::Ok, body)
    }

    pub fn ack_part(&mut self, id: u64) -> Outcome {
        self.outbox.ack(id);
        Outcome::Reply(
            Status::Ok,
            Body::AckPart {
                outbox_empty: self.outbox.is_empty(),
            },
        )
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
                queued_parts: self.outbox.len() as u64,
                max_meta_bytes: self.max_meta_bytes as u64,
                heap_bytes,
                replicas: r.replica_count() as u64,
            }),
        )
    }

    /// Tracks presences a crashed sidecar held, each owing subscribers the
    /// leave of its old ref once its new join is out. Returns the new refs
    /// in order (0 for an entry refused, e.g. a bad meta).
    pub fn replay(&mut self, entries: Vec<ReplayEntry>) -> Outcome {
        let mut refs = Vec::with_capacity(entries.len());
        let mut wake = false;
        for e in entries {
            let Ok(meta) = self.check_meta(&e.meta) else {
                refs.push(0);
                continue;
            };
            let old = Entry {
                owner: Holder::Local(e.owner),
                key: Arc::from(&*e.key),
                meta: meta.clone(),
                phx_ref: e.old_ref,
                prev_ref: None,
            };
            match self
                .registry
                .track(e.owner, &e.topic, &e.key, meta, || Some(()))
            {
                Ok(change) => {
                    wake |= change.wake;
                    refs.push(change.phx_ref);
                    self.recovery_leaves
                        .entry(Arc::from(&*e.topic))
                        .or_default()
                        .push(old);
                }
                Err(_) => refs.push(0),
            }
        }
        let f = if wake { flags::WAKE } else { 0 };
        Outcome::Reply(Status::Ok, Body::Replay { flags: f, refs })
    }

    /// Records leaves owed for presences that went while their leave was
    /// not yet delivered when the previous sidecar died.
    pub fn recovery_leaves(&mut self, entries: Vec<LeaveEntry>) -> Outcome {
        for e in entries {
            if etf::check_meta(&e.meta).is_err() {
                continue;
            }
            self.recovery_leaves
                .entry(Arc::from(&*e.topic))
                .or_default()
                .push(Entry {
                    owner: Holder::Local(0),
                    key: Arc::from(&*e.key),
                    meta: Arc::from(&*e.meta),
                    phx_ref: e.phx_ref,
                    prev_ref: None,
                });
        }
        Outcome::Reply(Status::Ok, Body::Empty)
    }

    /// Whether a recovery left leaves to send: the dispatcher must hear of it.
    pub fn owes_leaves(&self) -> bool {
        !self.recovery_leaves.is_empty()
    }
}

/// Cuts a listing into chunks of whole keys (a key larger than a chunk is
/// split, the later chunks marked as continuing it), each written as one
/// `%{key => %{metas: [...]}}` term.
pub fn listing_chunks<'p>(presences: impl Iterator<Item = &'p Entry>) -> Vec<(bool, Vec<u8>)> {
    let mut index: HashMap<&'p [u8], usize> = HashMap::new();
    let mut groups: Vec<Vec<&'p Entry>> = Vec::new();
    for p in presences {
        match index.get(&*p.key) {
            Some(&i) => groups[i].push(p),
            None => {
                index.insert(&p.key, groups.len());
                groups.push(vec![p]);
            }
        }
    }
    let mut chunks = Vec::new();
    let mut chunk: Vec<&Entry> = Vec::new();
    let mut bytes = 0;
    let mut continues = false;
    let flush = |chunk: &mut Vec<&Entry>, continues: bool, chunks: &mut Vec<(bool, Vec<u8>)>| {
        let mut out = Vec::new();
        // Stored metas were checked as maps when they were written.
        if etf::write_grouped(&mut out, chunk.drain(..)).is_ok() {
            chunks.push((continues, out));
        }
    };
    for mut group in groups {
        if group.len() > 1 {
            group.sort_by_key(|p| p.owner);
        }
        let group_bytes: usize = group.iter().map(|p| listed_size(p)).sum();
        if !chunk.is_empty()
            && (chunk.len() + group.len() > CHUNK_PRESENCES || bytes + group_bytes > CHUNK_BYTES)
        {
            flush(&mut chunk, continues, &mut chunks);
            continues = false;
            bytes = 0;
        }
        for p in group.iter() {
            let size = listed_size(p);
            if !chunk.is_empty() && (chunk.len() == CHUNK_PRESENCES || bytes + size > CHUNK_BYTES) {
                flush(&mut chunk, continues, &mut chunks);
                // The rest of this key continues the chunk just sent.
                continues = true;
                bytes = 0;
            }
            bytes += size;
            chunk.push(p);
        }
    }
    if !chunk.is_empty() || chunks.is_empty() {
        flush(&mut chunk, continues, &mut chunks);
    }
    chunks
}
