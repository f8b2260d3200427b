//! Requests, as the BEAM writes them and the sidecar reads them.

use bytes::{BufMut, Bytes, BytesMut};

use super::fields::{put_refs, put_str, read_refs, Reader};
use super::{FrameError, Header, Op, MAGIC};

/// A presence replayed into a restarted sidecar: the ref it had, whose
/// leave subscribers are owed, and its new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayEntry {
    pub owner: u64,
    pub topic: Bytes,
    pub key: Bytes,
    pub old_ref: u64,
    pub new_ref: u64,
    pub meta: Bytes,
}

/// An owner whose presences all go, with the refs the journal held for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departed {
    pub owner: u64,
    pub refs: Vec<u64>,
}

/// A presence subscribers may still show, to be sent as a leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveEntry {
    pub topic: Bytes,
    pub key: Bytes,
    pub phx_ref: u64,
    pub meta: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        version: u16,
    },
    /// `diff_per_operation`: `diff_window: 0`.
    Configure {
        max_meta_bytes: u64,
        diff_per_operation: bool,
    },
    SetDispatcher {
        dispatcher: u64,
    },
    /// Only the sidecar sends it; received, it is a bad frame.
    Wake,
    Track {
        owner: u64,
        topic: Bytes,
        key: Bytes,
        phx_ref: u64,
        meta: Bytes,
    },
    /// Removes the presence `phx_ref`, which the BEAM journaled for it.
    Untrack {
        owner: u64,
        topic: Bytes,
        key: Bytes,
        phx_ref: u64,
    },
    Update {
        owner: u64,
        topic: Bytes,
        key: Bytes,
        old_ref: u64,
        new_ref: u64,
        meta: Bytes,
    },
    /// Every presence of each owner goes: its process is gone (told by
    /// the BEAM's monitor pool), or the BEAM resyncs it.
    Exit {
        exits: Vec<Departed>,
    },
    Counts {
        topic: Bytes,
    },
    List {
        topic: Bytes,
    },
    GetByKey {
        topic: Bytes,
        key: Bytes,
    },
    TakeDiffs {
        max_topics: u32,
    },
    NextPart {
        max: u32,
    },
    AckPart {
        part: u64,
    },
    Stats,
    Replay {
        entries: Vec<ReplayEntry>,
    },
    RecoveryLeaves {
        entries: Vec<LeaveEntry>,
    },
    /// Cluster mode: record this node's changes as deltas (`on`) or stop;
    /// the seq of the last delta handed out becomes at least `seq`.
    SetReplicator {
        on: bool,
        seq: u64,
    },
    DeltaSeq,
    TakeDelta,
    LocalState,
    ApplyDelta {
        replica: u64,
        delta: Bytes,
    },
    SyncReplica {
        replica: u64,
        chunks: Vec<Bytes>,
    },
    DropReplica {
        replica: u64,
    },
    ForgetReplica {
        replica: u64,
    },
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::Hello,
            Request::Wake => Op::Wake,
            Request::Configure { .. } => Op::Configure,
            Request::SetDispatcher { .. } => Op::SetDispatcher,
            Request::Track { .. } => Op::Track,
            Request::Untrack { .. } => Op::Untrack,
            Request::Update { .. } => Op::Update,
            Request::Exit { .. } => Op::Exit,
            Request::Counts { .. } => Op::Counts,
            Request::List { .. } => Op::List,
            Request::GetByKey { .. } => Op::GetByKey,
            Request::TakeDiffs { .. } => Op::TakeDiffs,
            Request::NextPart { .. } => Op::NextPart,
            Request::AckPart { .. } => Op::AckPart,
            Request::Stats => Op::Stats,
            Request::Replay { .. } => Op::Replay,
            Request::RecoveryLeaves { .. } => Op::RecoveryLeaves,
            Request::SetReplicator { .. } => Op::SetReplicator,
            Request::DeltaSeq => Op::DeltaSeq,
            Request::TakeDelta => Op::TakeDelta,
            Request::LocalState => Op::LocalState,
            Request::ApplyDelta { .. } => Op::ApplyDelta,
            Request::SyncReplica { .. } => Op::SyncReplica,
            Request::DropReplica { .. } => Op::DropReplica,
            Request::ForgetReplica { .. } => Op::ForgetReplica,
        }
    }
}

/// A frame's header and request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub header: Header,
    pub request: Request,
}

/// Reads a request frame's header alone, so that a frame whose body is bad
/// can still be answered to its sender.
pub fn decode_header(frame: &[u8]) -> Option<(u8, Header)> {
    let mut r = Reader::new(Bytes::copy_from_slice(frame.get(..17)?));
    let op = r.u8().ok()?;
    let id = r.u64().ok()?;
    let reply_to = r.u64().ok()?;
    Some((op, Header { id, reply_to }))
}

impl Envelope {
    pub fn decode(frame: Bytes) -> Result<Envelope, FrameError> {
        let mut r = Reader::new(frame);
        let op_byte = r.u8()?;
        let op = Op::from_u8(op_byte).ok_or(FrameError::UnknownOp(op_byte))?;
        let header = Header {
            id: r.u64()?,
            reply_to: r.u64()?,
        };
        let request = match op {
            Op::Hello => {
                if r.bytes(4)? != MAGIC[..] {
                    return Err(FrameError::BadMagic);
                }
                Request::Hello { version: r.u16()? }
            }
            Op::Configure => Request::Configure {
                max_meta_bytes: r.u64()?,
                diff_per_operation: r.u8()? != 0,
            },
            Op::SetDispatcher => Request::SetDispatcher {
                dispatcher: r.u64()?,
            },
            Op::Wake => Request::Wake,
            Op::Track => Request::Track {
                owner: r.u64()?,
                topic: r.str()?,
                key: r.str()?,
                phx_ref: r.u64()?,
                meta: r.rest(),
            },
            Op::Untrack => Request::Untrack {
                owner: r.u64()?,
                topic: r.str()?,
                key: r.str()?,
                phx_ref: r.u64()?,
            },
            Op::Update => Request::Update {
                owner: r.u64()?,
                topic: r.str()?,
                key: r.str()?,
                old_ref: r.u64()?,
                new_ref: r.u64()?,
                meta: r.rest(),
            },
            Op::Exit => {
                let n = r.count(8 + 4)?;
                let mut exits = Vec::with_capacity(n);
                for _ in 0..n {
                    exits.push(Departed {
                        owner: r.u64()?,
                        refs: read_refs(&mut r)?,
                    });
                }
                Request::Exit { exits }
            }
            Op::Counts => Request::Counts { topic: r.str()? },
            Op::List => Request::List { topic: r.str()? },
            Op::GetByKey => Request::GetByKey {
                topic: r.str()?,
                key: r.str()?,
            },
            Op::TakeDiffs => Request::TakeDiffs {
                max_topics: r.u32()?,
            },
            Op::NextPart => Request::NextPart { max: r.u32()? },
            Op::AckPart => Request::AckPart { part: r.u64()? },
            Op::Stats => Request::Stats,
            Op::Replay => {
                let n = r.count(8 + 4 + 4 + 8 + 8 + 4)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(ReplayEntry {
                        owner: r.u64()?,
                        topic: r.str()?,
                        key: r.str()?,
                        old_ref: r.u64()?,
                        new_ref: r.u64()?,
                        meta: r.str()?,
                    });
                }
                Request::Replay { entries }
            }
            Op::RecoveryLeaves => {
                let n = r.count(4 + 4 + 8 + 4)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(LeaveEntry {
                        topic: r.str()?,
                        key: r.str()?,
                        phx_ref: r.u64()?,
                        meta: r.str()?,
                    });
                }
                Request::RecoveryLeaves { entries }
            }
            Op::SetReplicator => Request::SetReplicator {
                on: r.u8()? != 0,
                seq: r.u64()?,
            },
            Op::DeltaSeq => Request::DeltaSeq,
            Op::TakeDelta => Request::TakeDelta,
            Op::LocalState => Request::LocalState,
            Op::ApplyDelta => Request::ApplyDelta {
                replica: r.u64()?,
                delta: r.rest(),
            },
            Op::SyncReplica => {
                let replica = r.u64()?;
                let n = r.count(4)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.str()?);
                }
                Request::SyncReplica { replica, chunks }
            }
            Op::DropReplica => Request::DropReplica { replica: r.u64()? },
            Op::ForgetReplica => Request::ForgetReplica { replica: r.u64()? },
        };
        r.finish()?;
        Ok(Envelope { header, request })
    }

    /// The frame body (without the length prefix), as the BEAM writes it.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_u8(self.request.op() as u8);
        out.put_u64(self.header.id);
        out.put_u64(self.header.reply_to);
        match &self.request {
            Request::Hello { version } => {
                out.put_slice(MAGIC);
                out.put_u16(*version);
            }
            Request::Configure {
                max_meta_bytes,
                diff_per_operation,
            } => {
                out.put_u64(*max_meta_bytes);
                out.put_u8(u8::from(*diff_per_operation));
            }
            Request::SetDispatcher { dispatcher } => out.put_u64(*dispatcher),
            Request::Wake => {}
            Request::Track {
                owner,
                topic,
                key,
                phx_ref,
                meta,
            } => {
                out.put_u64(*owner);
                put_str(&mut out, topic);
                put_str(&mut out, key);
                out.put_u64(*phx_ref);
                out.put_slice(meta);
            }
            Request::Untrack {
                owner,
                topic,
                key,
                phx_ref,
            } => {
                out.put_u64(*owner);
                put_str(&mut out, topic);
                put_str(&mut out, key);
                out.put_u64(*phx_ref);
            }
            Request::Update {
                owner,
                topic,
                key,
                old_ref,
                new_ref,
                meta,
            } => {
                out.put_u64(*owner);
                put_str(&mut out, topic);
                put_str(&mut out, key);
                out.put_u64(*old_ref);
                out.put_u64(*new_ref);
                out.put_slice(meta);
            }
            Request::Exit { exits } => {
                out.put_u32(exits.len() as u32);
                for e in exits {
                    out.put_u64(e.owner);
                    put_refs(&mut out, &e.refs);
                }
            }
            Request::Counts { topic } | Request::List { topic } => put_str(&mut out, topic),
            Request::GetByKey { topic, key } => {
                put_str(&mut out, topic);
                put_str(&mut out, key);
            }
            Request::TakeDiffs { max_topics } => out.put_u32(*max_topics),
            Request::NextPart { max } => out.put_u32(*max),
            Request::Stats | Request::DeltaSeq | Request::TakeDelta | Request::LocalState => {}
            Request::AckPart { part } => out.put_u64(*part),
            Request::Replay { entries } => {
                out.put_u32(entries.len() as u32);
                for e in entries {
                    out.put_u64(e.owner);
                    put_str(&mut out, &e.topic);
                    put_str(&mut out, &e.key);
                    out.put_u64(e.old_ref);
                    out.put_u64(e.new_ref);
                    put_str(&mut out, &e.meta);
                }
            }
            Request::RecoveryLeaves { entries } => {
                out.put_u32(entries.len() as u32);
                for e in entries {
                    put_str(&mut out, &e.topic);
                    put_str(&mut out, &e.key);
                    out.put_u64(e.phx_ref);
                    put_str(&mut out, &e.meta);
                }
            }
            Request::SetReplicator { on, seq } => {
                out.put_u8(u8::from(*on));
                out.put_u64(*seq);
            }
            Request::ApplyDelta { replica, delta } => {
                out.put_u64(*replica);
                out.put_slice(delta);
            }
            Request::SyncReplica { replica, chunks } => {
                out.put_u64(*replica);
                out.put_u32(chunks.len() as u32);
                for chunk in chunks {
                    put_str(&mut out, chunk);
                }
            }
            Request::DropReplica { replica } | Request::ForgetReplica { replica } => {
                out.put_u64(*replica)
            }
        }
        out.freeze()
    }
}
