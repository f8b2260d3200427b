//! Replies, as the sidecar writes them and the BEAM reads them.

use bytes::{BufMut, Bytes, BytesMut};

use super::fields::{put_refs, put_str, read_refs, Reader};
use super::{FrameError, Header, Op, Status};

/// A reply: the request's op and header, a status, and a body whose shape
/// depends on both (see [`Body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub op: u8,
    pub header: Header,
    pub status: Status,
    pub body: Bytes,
}

impl Reply {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(18 + self.body.len());
        out.put_u8(self.op);
        out.put_u64(self.header.id);
        out.put_u64(self.header.reply_to);
        out.put_u8(self.status as u8);
        out.put_slice(&self.body);
        out.freeze()
    }

    pub fn decode(frame: Bytes) -> Result<Reply, FrameError> {
        let mut r = Reader::new(frame);
        let op = r.u8()?;
        let header = Header {
            id: r.u64()?,
            reply_to: r.u64()?,
        };
        let status_byte = r.u8()?;
        let status = Status::from_u8(status_byte).ok_or(FrameError::UnknownStatus(status_byte))?;
        Ok(Reply {
            op,
            header,
            status,
            body: r.rest(),
        })
    }
}

/// Flags of a replication write's reply, read by the port owner.
pub mod flags {
    /// The first pending diff appeared: tell the dispatcher.
    pub const WAKE: u8 = 2;
}

/// The body of a successful reply, per op. Local writes (track, untrack,
/// update, exit) have none: they are not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Hello {
        version: u16,
    },
    /// Configure, RecoveryLeaves: nothing to say.
    Empty,
    SetDispatcher {
        pending: bool,
    },
    Counts {
        users: u64,
        connections: u64,
    },
    /// List and GetByKey: one chunk, `%{key => %{metas: [...]}}` in external
    /// format (or `[]` for GetByKey of nothing). `continues` says its first
    /// key is the previous chunk's last, split for size.
    Chunk {
        continues: bool,
        term: Bytes,
    },
    /// `delta_started`: this take made this node's (empty) delta pending;
    /// the BEAM tells the replicator, as the NIF does itself.
    TakeDiffs {
        queued: u64,
        pending: u64,
        delta_started: bool,
        delivered: Vec<u64>,
    },
    /// NextPart: the oldest parts, none when the outbox is empty.
    Parts(Vec<PartBody>),
    /// `delivered`: refs of removed presences whose leaves no subscriber
    /// can still be owed (see `Store::take_diffs`).
    AckPart {
        outbox_empty: bool,
        delivered: Vec<u64>,
    },
    Stats(Stats),
    /// DeltaSeq: the seq of the last delta handed out; LocalState's last
    /// reply: the seq the state follows.
    Seq {
        seq: u64,
    },
    /// TakeDelta: `None` when nothing is pending.
    Delta(Option<(u64, Bytes)>),
    /// LocalState's `More` replies: one chunk of full state (a delta).
    StateChunk {
        chunk: Bytes,
    },
    /// ApplyDelta, SyncReplica, DropReplica, ForgetReplica.
    Replica(ReplicaBody),
}

/// What a replication write did: `flags` (`WAKE`), presences dropped (a
/// drop or forget), and the net change of each `(topic, key)`'s presences.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaBody {
    pub flags: u8,
    pub dropped: u64,
    pub changes: Vec<CountChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountChange {
    pub topic: Bytes,
    pub key: Bytes,
    pub change: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartBody {
    pub part: u64,
    /// Microseconds since its oldest change, when the reply was made.
    pub age_us: u64,
    pub topic: Bytes,
    pub joins: Bytes,
    pub leaves: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub presences: u64,
    pub owners: u64,
    pub topics: u64,
    pub pending_topics: u64,
    pub queued_parts: u64,
    pub max_meta_bytes: u64,
    pub heap_bytes: u64,
    pub replicas: u64,
}

impl Body {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Body::Hello { version } => out.put_u16(*version),
            Body::Empty => {}
            Body::SetDispatcher { pending } => out.put_u8(*pending as u8),
            Body::Counts { users, connections } => {
                out.put_u64(*users);
                out.put_u64(*connections);
            }
            Body::Chunk { continues, term } => {
                out.put_u8(*continues as u8);
                out.put_slice(term);
            }
            Body::TakeDiffs {
                queued,
                pending,
                delta_started,
                delivered,
            } => {
                out.put_u64(*queued);
                out.put_u64(*pending);
                out.put_u8(u8::from(*delta_started));
                put_refs(&mut out, delivered);
            }
            Body::Parts(parts) => {
                out.put_u32(parts.len() as u32);
                for p in parts {
                    out.put_u64(p.part);
                    out.put_u64(p.age_us);
                    put_str(&mut out, &p.topic);
                    put_str(&mut out, &p.joins);
                    put_str(&mut out, &p.leaves);
                }
            }
            Body::AckPart {
                outbox_empty,
                delivered,
            } => {
                out.put_u8(*outbox_empty as u8);
                put_refs(&mut out, delivered);
            }
            Body::Stats(s) => {
                for v in [
                    s.presences,
                    s.owners,
                    s.topics,
                    s.pending_topics,
                    s.queued_parts,
                    s.max_meta_bytes,
                    s.heap_bytes,
                    s.replicas,
                ] {
                    out.put_u64(v);
                }
            }
            Body::Seq { seq } => out.put_u64(*seq),
            Body::Delta(None) => out.put_u8(0),
            Body::Delta(Some((seq, delta))) => {
                out.reserve(9 + delta.len());
                out.put_u8(1);
                out.put_u64(*seq);
                out.put_slice(delta);
            }
            Body::StateChunk { chunk } => out.put_slice(chunk),
            Body::Replica(body) => {
                out.put_u8(body.flags);
                out.put_u64(body.dropped);
                out.put_u32(body.changes.len() as u32);
                for c in &body.changes {
                    put_str(&mut out, &c.topic);
                    put_str(&mut out, &c.key);
                    out.put_i64(c.change);
                }
            }
        }
        out.freeze()
    }

    /// Reads the body of a `More` reply to `op`: a listing's chunk, or one
    /// chunk of a local state.
    pub fn decode_more(op: Op, body: Bytes) -> Result<Body, FrameError> {
        match op {
            Op::LocalState => Ok(Body::StateChunk { chunk: body }),
            other => Body::decode(other, body),
        }
    }

    /// Reads the body of a successful (`Ok` or `More`) reply to `op`.
    pub fn decode(op: Op, body: Bytes) -> Result<Body, FrameError> {
        let mut r = Reader::new(body);
        let body = match op {
            Op::Hello => Body::Hello { version: r.u16()? },
            Op::Configure | Op::RecoveryLeaves => Body::Empty,
            Op::SetDispatcher => Body::SetDispatcher {
                pending: r.u8()? != 0,
            },
            // Writes are not answered; a reply to one is a bad frame's.
            Op::Track | Op::Untrack | Op::Update | Op::Exit | Op::Wake | Op::Replay => Body::Empty,
            Op::Counts => Body::Counts {
                users: r.u64()?,
                connections: r.u64()?,
            },
            Op::List | Op::GetByKey => Body::Chunk {
                continues: r.u8()? != 0,
                term: r.rest(),
            },
            Op::TakeDiffs => Body::TakeDiffs {
                queued: r.u64()?,
                pending: r.u64()?,
                delta_started: r.u8()? != 0,
                delivered: read_refs(&mut r)?,
            },
            Op::NextPart => {
                let n = r.count(8 + 8 + 4 + 4 + 4)?;
                let mut parts = Vec::with_capacity(n);
                for _ in 0..n {
                    parts.push(PartBody {
                        part: r.u64()?,
                        age_us: r.u64()?,
                        topic: r.str()?,
                        joins: r.str()?,
                        leaves: r.str()?,
                    });
                }
                Body::Parts(parts)
            }
            Op::AckPart => Body::AckPart {
                outbox_empty: r.u8()? != 0,
                delivered: read_refs(&mut r)?,
            },
            Op::Stats => Body::Stats(Stats {
                presences: r.u64()?,
                owners: r.u64()?,
                topics: r.u64()?,
                pending_topics: r.u64()?,
                queued_parts: r.u64()?,
                max_meta_bytes: r.u64()?,
                heap_bytes: r.u64()?,
                replicas: r.u64()?,
            }),
            Op::SetReplicator => Body::Empty,
            Op::DeltaSeq => Body::Seq { seq: r.u64()? },
            Op::TakeDelta => match r.u8()? {
                0 => Body::Delta(None),
                _ => Body::Delta(Some((r.u64()?, r.rest()))),
            },
            Op::ApplyDelta | Op::SyncReplica | Op::DropReplica | Op::ForgetReplica => {
                let flags = r.u8()?;
                let dropped = r.u64()?;
                let n = r.count(4 + 4 + 8)?;
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    changes.push(CountChange {
                        topic: r.str()?,
                        key: r.str()?,
                        change: r.u64()? as i64,
                    });
                }
                Body::Replica(ReplicaBody {
                    flags,
                    dropped,
                    changes,
                })
            }
            // The last reply; the chunks before it are `More` (decode_more).
            Op::LocalState => Body::Seq { seq: r.u64()? },
        };
        r.finish()?;
        Ok(body)
    }
}
