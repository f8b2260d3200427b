//! The vocabulary every part of the core shares: presences, who holds
//! them, and what a write reports. It depends on nothing else here.

use std::num::NonZeroU64;

pub use crate::bytes::Bytes;

/// A presence ref (rendered as `phx_ref` by [`crate::encode_ref`]). Refs
/// handed out here are never 0, so that a presence's previous ref fits in
/// 8 bytes ([`Presence::prev_ref`]).
pub type Ref = u64;

/// A meta as `term_to_binary/1` encodes it: compact, compared by bytes to
/// detect no-op updates, held inline when short (Drab's own meta is), and
/// spliced into listings without being decoded. Both backends store these.
pub type Meta = Bytes;

/// A presence as both backends store it.
pub type Entry<O> = Presence<O, Meta>;

/// A node's replica of another node's presences, as numbered by the node
/// holding the copy.
pub type ReplicaId = u32;

/// What holds a presence: a process of this node, or another node, whose
/// copy of it arrived by replication. A replica is an owner like any
/// other, except that its presences are addressed by the ref they have on
/// their own node, and that it goes away as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder<O> {
    Local(O),
    /// The replica, and the presence's ref on its own node: that ref, not
    /// ours, is the `phx_ref` clients see, so that it is the same on every
    /// node.
    Replica(ReplicaId, Ref),
}

/// One tracked presence: an owner under a key on a topic, with its meta.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence<O, M> {
    pub owner: Holder<O>,
    pub key: Bytes,
    pub meta: M,
    pub phx_ref: Ref,
    /// The ref this presence had before its last update, as `phx_ref_prev`.
    pub prev_ref: Option<NonZeroU64>,
    /// Where its last join or update stands in the registry's order of
    /// changes: what coalescing compares, kept apart from the ref because a
    /// ref may be made outside the registry (see
    /// [`crate::Registry::track_as`]).
    pub seq: u64,
}

impl<O, M> Presence<O, M> {
    /// The `phx_ref` clients see: a replicated presence keeps the ref it
    /// has on its own node, so that every node shows the same one.
    pub fn shown_ref(&self) -> Ref {
        match self.owner {
            Holder::Local(_) => self.phx_ref,
            Holder::Replica(_, origin_ref) => origin_ref,
        }
    }

    /// The ref it had before its last update, if any.
    pub fn prev_ref(&self) -> Option<Ref> {
        self.prev_ref.map(NonZeroU64::get)
    }

    /// Whether a process of this node holds it (it is not a replica's).
    pub fn is_local(&self) -> bool {
        matches!(self.owner, Holder::Local(_))
    }
}

/// A previous ref as stored: a ref of 0 (never handed out here) reads as
/// none.
pub fn prev_ref(phx_ref: Option<Ref>) -> Option<NonZeroU64> {
    phx_ref.and_then(NonZeroU64::new)
}

/// The result of a write that changed the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub phx_ref: Ref,
    /// The first pending diff appeared: the dispatcher must be told.
    pub wake: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Changed(Change),
    /// The new meta equals the old one: nothing changed, nothing to send.
    Unchanged(Ref),
}

/// What an untrack, or an owner's exit, removed.
#[derive(Debug)]
pub struct Removed<W> {
    pub removed: usize,
    pub wake: bool,
    /// The owner's watch handle, returned once its last presence is gone so
    /// the caller can release it (demonitor).
    pub released_watch: Option<W>,
}

impl<W> Removed<W> {
    /// Nothing was removed.
    pub fn nothing() -> Self {
        Self {
            removed: 0,
            wake: false,
            released_watch: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Distinct keys as listed (Drab: users, or browsers).
    pub users: usize,
    /// Presences (Drab: connections).
    pub connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_with_short_key_and_meta_takes_88_bytes() {
        assert_eq!(std::mem::size_of::<Presence<u64, Bytes>>(), 88);
    }
}
