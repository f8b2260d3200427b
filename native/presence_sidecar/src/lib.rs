//! `presence_core` in its own OS process, spoken to as an Erlang port.
//!
//! The BEAM opens the `presence_sidecar` binary with `{:packet, 4}`; each
//! frame is one request or reply of the [`protocol`]. [`server::run`]
//! applies requests to a [`store::Store`] in order and writes replies in
//! batches. The core knows nothing of ports: this crate is the adapter.

pub mod pipe;
pub mod protocol;
pub mod server;
pub mod store;
