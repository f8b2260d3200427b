//! The presence table behind `Drab.Presence`.
//!
//! A [`Registry`] holds who is present on which topic, keeps per-topic
//! counters up to date as entries change (so counting never walks a topic),
//! and accumulates the joins and leaves of each topic until a dispatcher
//! drains them as one coalesced diff.
//!
//! This crate knows nothing of Erlang. Owners (processes), metas and the
//! handle that watches an owner are type parameters: the NIF instantiates
//! them with pids, encoded terms and monitors; tests use integers. [`etf`]
//! writes listings in Erlang's external term format from stored meta bytes.

mod bytes;
mod cow_chunks;
mod delivery;
pub mod delta;
mod diff;
mod error;
pub mod etf;
pub mod heap;
pub mod key;
pub mod listing;
pub mod outbox;
mod owner;
mod phx_ref;
mod presence;
mod ref_hash;
mod registry;
mod replica;
mod sharded_map;
mod topic;
mod topics;

pub use bytes::Bytes;
pub use cow_chunks::{CowChunks, Snapshot, CHUNK_LEN};
pub use delivery::Delivery;
pub use delta::RemoteJoin;
pub use diff::{Op, Part, PartLimits, TopicDiff};
pub use error::CoreError;
pub use owner::Departure;
pub use phx_ref::{encode_ref, random_seed, RefGen};
pub use presence::{
    prev_ref, Change, Counts, Entry, Holder, Meta, Presence, Ref, Removed, ReplicaId, Update,
};
pub use registry::Registry;
