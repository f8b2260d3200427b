//! Listings are written in external term format by `presence_core::etf`,
//! spliced from the stored meta bytes, then decoded in one
//! `enif_binary_to_term` call: far cheaper than building each term through
//! the NIF API. Large listings do both on a dirty scheduler, so that building
//! a map of 100k keys never holds up a normal one.

use presence_core::{encode_ref, etf, Ref};
use rustler::types::NewBinary;
use rustler::{Env, LocalPid, Term};

/// A presence as the NIF's table holds it.
pub type Entry = presence_core::Entry<LocalPid>;

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

/// Decodes a listing we wrote. Not `binary_to_term/2`'s `[:safe]`: that
/// refuses to create atoms, and a VM where no module has mentioned
/// `:metas` yet has no such atom. Every byte is ours or a stored
/// `term_to_binary/1` of a live term, so the unchecked decode is sound.
pub(crate) fn decode<'a>(env: Env<'a>, etf: &[u8]) -> Term<'a> {
    // SAFETY: `etf` is a complete external term written by presence_core::etf
    // from validated meta encodings (see above).
    let decoded = unsafe { env.binary_to_term_trusted(etf) };
    let (term, _read) = decoded.expect("presence_core::etf writes valid external terms");
    term
}
