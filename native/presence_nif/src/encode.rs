//! Building the Erlang terms Phoenix.Presence returns:
//! `%{key => %{metas: [%{phx_ref: ref, ...meta}]}}`.

use std::collections::HashMap;

use presence_core::{encode_ref, Presence, Ref};
use rustler::types::{map::map_new, NewBinary};
use rustler::{Encoder, Env, LocalPid, NifResult, Term};

use crate::error::{metas, phx_ref, phx_ref_prev};
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

/// The stored meta with `phx_ref` (and `phx_ref_prev` after an update).
pub fn meta_term<'a>(env: Env<'a>, presence: &Entry) -> NifResult<Term<'a>> {
    let (meta, _) = env
        .binary_to_term(&presence.meta)
        .ok_or(rustler::Error::BadArg)?;
    let meta = meta.map_put(phx_ref(), ref_term(env, presence.phx_ref))?;
    match presence.prev_ref {
        Some(prev) => meta.map_put(phx_ref_prev(), ref_term(env, prev)),
        None => Ok(meta),
    }
}

/// Groups presences by key as Phoenix.Presence does. A key's metas come in
/// pid order, as Phoenix.Tracker's ordered table returns them.
pub fn grouped<'a, 'p>(
    env: Env<'a>,
    presences: impl Iterator<Item = &'p Entry>,
) -> NifResult<Term<'a>> {
    let mut by_key: HashMap<&'p [u8], Vec<&'p Entry>> = HashMap::new();
    for presence in presences {
        by_key.entry(&presence.key).or_default().push(presence);
    }
    let mut keys = Vec::with_capacity(by_key.len());
    let mut values = Vec::with_capacity(by_key.len());
    let metas_key = metas().encode(env);
    for (key, mut entries) in by_key {
        entries.sort_by(|a, b| a.owner.cmp(&b.owner));
        let key_metas = entries
            .into_iter()
            .map(|presence| meta_term(env, presence))
            .collect::<NifResult<Vec<_>>>()?;
        keys.push(bytes_term(env, key));
        values.push(map_new(env).map_put(metas_key, key_metas)?);
    }
    Term::map_from_arrays(env, &keys, &values)
}
