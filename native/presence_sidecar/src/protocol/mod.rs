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

mod fields;
mod reply;
mod request;

pub use fields::{put_str, Reader};
pub use reply::{flags, Body, CountChange, PartBody, ReplicaBody, Reply, Stats};
pub use request::{decode_header, Departed, Envelope, LeaveEntry, ReplayEntry, Request};

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

/// Who a message is from and for: echoed from request to reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u64,
    pub reply_to: u64,
}
