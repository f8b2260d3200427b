//! Rustler bindings of `presence_core` for `Drab.Presence.Native`.
//!
//! One file per area; NIF names carry the file's prefix (`table_*`).
//! Errors cross as atoms (see `error.rs`, `atoms.rs`); shaping them into Phoenix's
//! return values happens once, in Elixir.

mod atoms;
mod departure;
mod encode;
mod error;
mod kept;
mod listing;
mod replication;
mod resource;
mod schedule;
mod size;
mod spin;
mod table;
#[cfg(feature = "test-hooks")]
mod test_hooks;

#[global_allocator]
static ALLOCATOR: presence_core::heap::CountingAllocator = presence_core::heap::CountingAllocator;

rustler::init!("Elixir.Drab.Presence.Native");
