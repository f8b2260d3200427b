//! Listings are written in external term format by `presence_core::etf`,
//! spliced from the stored meta bytes, then decoded in one
//! `enif_binary_to_term` call: far cheaper than building each term through
//! the NIF API. Large listings do both on a dirty scheduler, so that building
//! a map of 100k keys never holds up a normal one.

use presence_core::{encode_ref, etf, Presence, Ref};
use rustler::types::NewBinary;
use rustler::{Env, LocalPid, Term};

use crate::table::Meta;

pub type Entry = Presence<LocalPid, Meta>;

pub fn bytes_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut binary = NewBinary::new(env, bytes.len());
    binary.as_mut_slice().copy_from_slice(bytes);
    binary.into()
}

pub fn ref_term<'a>(env: Env<'a>, r: Ref) -> Term<'a> {
    bytes_term(env, &encode_ref(r))
}

/// `%{key => %{metas: [...]}}` of `presences`.
pub fn grouped<'a, 'p>(env: Env<'a>, presences: impl Iterator<Item = &'p Entry>) -> Term<'a> {
    let mut out = Vec::new();
    etf::write_grouped(&mut out, presences).expect("stored metas are checked maps");
    decode(env, &out)
}

/// One meta with `phx_ref` (and `phx_ref_prev`).
pub fn meta<'a>(env: Env<'a>, presence: &Entry) -> Term<'a> {
    let mut out = Vec::new();
    etf::write_meta_term(&mut out, presence).expect("stored metas are checked maps");
    decode(env, &out)
}

fn decode<'a>(env: Env<'a>, etf: &[u8]) -> Term<'a> {
    let (term, _read) = env
        .binary_to_term(etf)
        .expect("presence_core::etf writes valid external terms");
    term
}
