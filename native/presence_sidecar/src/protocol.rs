//! The sidecar's wire protocol, version [`VERSION`].
//!
//! Every message is one `{:packet, 4}` frame: a big-endian `u32` length,
//! then that many bytes (tokio-util's `LengthDelimitedCodec` on this side).
//! Integers are big-endian; a byte string (`str`) is a `u32` length and the
//! bytes. Metas travel as `term_to_binary/1` of a map and are never decoded
//! here: listings splice them (`presence_core::etf`).
//!
//! ```text
//! request = op:u8 id:u64 reply_to:u64 body
//! reply   = op:u8 id:u64 reply_to:u64 status:u8 body
//! ```
//!
//! `id` is the caller's request id, `reply_to` names the process the reply
//! is for (a local pid as `serial << 32 | number`; 0 for the port owner
//! itself). Both are echoed untouched, so the BEAM routes a reply without
//! keeping any table of requests. A request the sidecar cannot read gets a
//! reply with status [`Status::BadFrame`] (op and ids zero when even the
//! header is short) and a message; nothing it reads can make it panic.
//!
//! The first frame must be `Hello` with this [`VERSION`]; any other version
//! is answered with [`Status::Refused`] and a message, and the sidecar exits.
//!
//! Version 2 (cluster mode) appends the replication ops (`SetReplicator`
//! .. `ForgetReplica`, 40..47) and the [`Status::BadDelta`] status, and
//! adds a field at the end of two replies: `TakeDiffs` says whether this
//! node's delta started pending, `Stats` counts replicas. Library and
//! sidecar are built together, so the version is bumped rather than the
//! old replies kept: a stale binary is refused at start, with a message.
//!
//! ```text
//! SetReplicator  on:u8 seq:u64        recording deltas on/off; seq: the last
//!                                     handed out is at least this (a restarted
//!                                     sidecar skips one, so peers resync)
//! DeltaSeq                            -> seq:u64
//! TakeDelta                           -> 0 | 1 seq:u64 delta:rest
//! LocalState                          -> More chunk:rest ... then Ok seq:u64
//! ApplyDelta     replica:u64 delta:rest          -> replica body | BadDelta
//! SyncReplica    replica:u64 n:u32 str(chunk)*n  -> replica body | BadDelta
//! DropReplica    replica:u64                     -> replica body
//! ForgetReplica  replica:u64                     -> replica body
//! replica body = flags:u8 dropped:u64 n:u32 (str(topic) str(key) change:i64)*n
//! ```
//!
//! A replica body's changes are the presences each (topic, key) gained or
//! lost: the BEAM keeps counts in ETS, and replicated presences count too.
//!
//! Version 3: the BEAM decides local writes and the sidecar applies them
//! without a reply. A caller takes a lock on the owner in ETS, checks and
//! journals the write, makes its ref, writes it to the port and lets go:
//! nobody waits for the sidecar, and one owner's writes reach the pipe in
//! the order they were decided in. Removals name the refs they remove, so
//! the sidecar can tell the BEAM which leaves it no longer owes.
//! Op 18 (`Lookup`) is gone: lookups read the BEAM-side journal.
//!
//! ```text
//! Track    owner:u64 str(topic) str(key) ref:u64 meta:rest
//! Untrack  owner:u64 str(topic) str(key) ref:u64
//! Update   owner:u64 str(topic) str(key) old_ref:u64 new_ref:u64 meta:rest
//! Exit     n:u32 (owner:u64 m:u32 ref:u64*m)*n   owners gone, each with the
//!          refs the journal held for it (a monitor sends a burst at once)
//! Wake     (from the sidecar, ids 0) a diff became pending: wake the dispatcher
//! Replay   n:u32 (owner:u64 str(topic) str(key) old_ref:u64 new_ref:u64 str(meta))*n
//! NextPart max:u32 -> n:u32 (part:u64 str(topic) str(joins) str(leaves))*n
//!          the oldest parts not acknowledged, up to max and about 256 KB
//!          (at least one): a window's diffs in one round trip, not one
//!          each
//! TakeDiffs, AckPart replies end with n:u32 ref:u64*n: removed presences
//!          whose leaves subscribers have been told (or never needed), so
//!          the BEAM stops owing them
//! ```
//!
//! Version 4: each part of a `NextPart` reply carries its age, the
//! microseconds since the oldest change it holds (read from the sidecar's
//! clock as the reply is made), so that the BEAM can report a diff's
//! latency from the change to its broadcast without comparing clocks.
//!
//! ```text
//! NextPart max:u32 -> n:u32 (part:u64 age_us:u64 str(topic) str(joins) str(leaves))*n
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version this sidecar speaks.
pub const VERSION: u16 = 4;
/// First bytes of a `Hello` body.
pub const MAGIC: &[u8; 4] = b"DRPS";
/// The largest frame read: a meta of the largest `max_meta_bytes` (1 GiB)
/// with its header. A longer length prefix cannot be skipped safely, so it
/// ends the sidecar (the BEAM restarts and replays it).
pub const MAX_FRAME: usize = (1 << 30) + 64 * 1024;

/// Request kinds, echoed in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Configure = 2,
    SetDispatcher = 3,
    /// Sent by the sidecar, never to it.
    Wake = 4,
    Track = 16,
    Untrack = 17,
    Update = 19,
    Exit = 20,
    Counts = 21,
    List = 22,
    GetByKey = 23,
    TakeDiffs = 24,
    NextPart = 25,
    AckPart = 26,
    Stats = 27,
    Replay = 32,
    RecoveryLeaves = 33,
    SetReplicator = 40,
    DeltaSeq = 41,
    TakeDelta = 42,
    LocalState = 43,
    ApplyDelta = 44,
    SyncReplica = 45,
    DropReplica = 46,
    ForgetReplica = 47,
}

impl Op {
    pub const ALL: [Op; 25] = [
        Op::Hello,
        Op::Configure,
        Op::SetDispatcher,
        Op::Wake,
        Op::Track,
        Op::Untrack,
        Op::Update,
        Op::Exit,
        Op::Counts,
        Op::List,
        Op::GetByKey,
        Op::TakeDiffs,
        Op::NextPart,
        Op::AckPart,
        Op::Stats,
        Op::Replay,
        Op::RecoveryLeaves,
        Op::SetReplicator,
        Op::DeltaSeq,
        Op::TakeDelta,
        Op::LocalState,
        Op::ApplyDelta,
        Op::SyncReplica,
        Op::DropReplica,
        Op::ForgetReplica,
    ];

    pub fn from_u8(byte: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == byte)
    }
}

/// Outcome of a request. Errors map one to one onto the NIF's atoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    AlreadyTracked = 1,
    NotTracked = 2,
    Noproc = 3,
    Stale = 4,
    MetaTooLarge = 5,
    /// The request could not be read; the body is a UTF-8 message.
    BadFrame = 6,
    /// One chunk of a streamed listing; more follow, the last has `Ok`.
    More = 7,
    /// `Hello` with a version this sidecar does not speak; it exits next.
    Refused = 8,
    /// A delta or full state that does not decode: nothing was applied.
    BadDelta = 9,
}

impl Status {
    pub fn from_u8(byte: u8) -> Option<Status> {
        use Status::*;
        [
            Ok,
            AlreadyTracked,
            NotTracked,
            Noproc,
            Stale,
            MetaTooLarge,
            BadFrame,
            More,
            Refused,
            BadDelta,
        ]
        .into_iter()
        .find(|s| *s as u8 == byte)
    }
}

/// What was wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame ended before a field did.
    Truncated,
    /// Bytes left over after the last field.
    Trailing(usize),
    UnknownOp(u8),
    UnknownStatus(u8),
    BadMagic,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => f.write_str("truncated frame"),
            FrameError::Trailing(n) => write!(f, "{n} trailing bytes after the last field"),
            FrameError::UnknownOp(op) => write!(f, "unknown op {op}"),
            FrameError::UnknownStatus(s) => write!(f, "unknown status {s}"),
            FrameError::BadMagic => f.write_str("hello without the DRPS magic"),
        }
    }
}

impl std::error::Error for FrameError {}

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
    /// `exact`: `diff_window: 0`, one diff per operation.
    Configure {
        max_meta_bytes: u64,
        exact: bool,
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

/// Who a message is from and for: echoed from request to reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u64,
    pub reply_to: u64,
}

/// A frame's header and request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub header: Header,
    pub request: Request,
}

/// Reads fields off a frame, refusing (never panicking on) short input.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    pub fn str(&mut self) -> Result<Bytes, FrameError> {
        let len = self.u32()? as usize;
        self.bytes(len)
    }

    /// Everything left.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.remaining() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }

    /// A count of entries that each take at least `min_size` bytes: a
    /// garbage count cannot make us reserve more than the frame could hold.
    fn count(&mut self, min_size: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.remaining() {
            return Err(FrameError::Truncated);
        }
        Ok(n)
    }
}

fn put_refs(out: &mut BytesMut, refs: &[u64]) {
    out.put_u32(refs.len() as u32);
    for r in refs {
        out.put_u64(*r);
    }
}

fn read_refs(r: &mut Reader) -> Result<Vec<u64>, FrameError> {
    let n = r.count(8)?;
    let mut refs = Vec::with_capacity(n);
    for _ in 0..n {
        refs.push(r.u64()?);
    }
    Ok(refs)
}

pub fn put_str(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
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
                exact: r.u8()? != 0,
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
                exact,
            } => {
                out.put_u64(*max_meta_bytes);
                out.put_u8(u8::from(*exact));
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
