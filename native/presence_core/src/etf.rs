//! Presences written as Erlang's external term format, ready for
//! `binary_to_term/1`: `%{key => %{metas: [%{phx_ref: ref, ...meta}]}}`.
//!
//! Metas are stored as the bytes `term_to_binary/1` made of them, so a list
//! or diff is assembled by splicing those bytes, never by decoding and
//! re-encoding terms one by one. The receiving side decodes the whole thing
//! in one `binary_to_term/1`, which yields to other processes as it goes.
//! The NIF and the sidecar share this code.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::key::listed_key;
use crate::phx_ref::encode_ref;
use crate::presence::Presence;

const VERSION: u8 = 131;
const MAP_EXT: u8 = 116;
const BINARY_EXT: u8 = 109;
const LIST_EXT: u8 = 108;
const NIL_EXT: u8 = 106;
const SMALL_ATOM_UTF8_EXT: u8 = 119;

/// Why stored bytes could not be spliced into a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtfError {
    /// The bytes are not `term_to_binary/1` of a map.
    NotAMap,
}

impl std::fmt::Display for EtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("meta is not the external term format of a map")
    }
}

impl std::error::Error for EtfError {}

/// Checks that `meta` is `term_to_binary/1` of a map (uncompressed), the
/// only shape [`write_grouped`] can splice.
pub fn check_meta(meta: &[u8]) -> Result<(), EtfError> {
    match meta {
        [VERSION, MAP_EXT, _, _, _, _, ..] => Ok(()),
        _ => Err(EtfError::NotAMap),
    }
}

/// Writes `presences` grouped by the string their key is listed under
/// (`42` and `"42"` together, as Phoenix groups them), each key's metas in
/// owner order (as Phoenix.Tracker lists them), as one external-format term.
pub fn write_grouped<'p, O, M>(
    out: &mut Vec<u8>,
    presences: impl Iterator<Item = &'p Presence<O, M>>,
) -> Result<(), EtfError>
where
    O: Ord + 'p,
    M: AsRef<[u8]> + 'p,
{
    write_groups(out, &group_by_listed_key(presences))
}

/// Writes groups made by [`group_by_listed_key`] (or slices of them), each
/// one key of the map, as one external-format term.
pub fn write_groups<O, M: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    groups: &[Vec<&Presence<O, M>>],
) -> Result<(), EtfError> {
    let bytes: usize = groups
        .iter()
        .map(|g| listed_key(&g[0].key).len() + 32 + g.iter().map(|p| meta_size(p)).sum::<usize>())
        .sum();
    out.reserve(bytes + 6);
    out.push(VERSION);
    write_map_header(out, groups.len());
    for group in groups {
        write_binary(out, listed_key(&group[0].key));
        write_metas(out, group)?;
    }
    Ok(())
}

/// Writes one key's entry of a listing, `%{metas: [...]}`, as a term of
/// its own, the metas in owner order: what a kept copy of a listing
/// refreshes a changed key with. `presences` are all listed under that
/// key's string.
pub fn write_key_entry<O, M>(
    out: &mut Vec<u8>,
    presences: &mut [&Presence<O, M>],
) -> Result<(), EtfError>
where
    O: Ord,
    M: AsRef<[u8]>,
{
    presences.sort_by(listing_order);
    out.push(VERSION);
    write_metas(out, presences)
}

fn write_metas<O, M: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    presences: &[&Presence<O, M>],
) -> Result<(), EtfError> {
    write_map_header(out, 1);
    write_atom(out, "metas");
    out.push(LIST_EXT);
    out.extend_from_slice(&(presences.len() as u32).to_be_bytes());
    for presence in presences {
        write_meta(out, presence)?;
    }
    out.push(NIL_EXT);
    Ok(())
}

/// The order of one key's metas in a listing: by owner, as Phoenix.Tracker
/// lists them, then by ref (one owner may have `42` and `"42"`). Every
/// writer of listings (whole, one key, the sidecar's chunks) uses it.
pub fn listing_order<O: Ord, M>(a: &&Presence<O, M>, b: &&Presence<O, M>) -> Ordering {
    (&a.owner, a.phx_ref).cmp(&(&b.owner, b.phx_ref))
}

/// `presences` grouped by the string their key is listed under, each
/// group in [`listing_order`], groups in the order their keys first came.
pub fn group_by_listed_key<'p, O: Ord, M>(
    presences: impl Iterator<Item = &'p Presence<O, M>>,
) -> Vec<Vec<&'p Presence<O, M>>> {
    // Most keys have one presence: index them once, and only give a key its
    // own vector when a second presence shows up.
    let mut index: HashMap<&'p [u8], usize> = HashMap::new();
    let mut groups: Vec<Vec<&'p Presence<O, M>>> = Vec::new();
    for presence in presences {
        let listed = listed_key(&presence.key);
        match index.get(listed) {
            Some(&i) => groups[i].push(presence),
            None => {
                index.insert(listed, groups.len());
                groups.push(vec![presence]);
            }
        }
    }
    for group in &mut groups {
        if group.len() > 1 {
            group.sort_by(listing_order);
        }
    }
    groups
}

fn meta_size<O, M: AsRef<[u8]>>(presence: &Presence<O, M>) -> usize {
    let refs = if presence.prev_ref.is_some() { 2 } else { 1 };
    presence.meta.as_ref().len() + refs * 30
}

/// Writes one meta with its refs, as an update function receives it.
pub fn write_meta_term<O, M: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    presence: &Presence<O, M>,
) -> Result<(), EtfError> {
    out.push(VERSION);
    write_meta(out, presence)
}

fn write_meta<O, M: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    presence: &Presence<O, M>,
) -> Result<(), EtfError> {
    let meta = presence.meta.as_ref();
    check_meta(meta)?;
    let arity = u32::from_be_bytes([meta[2], meta[3], meta[4], meta[5]]) as usize;
    write_map_header(out, arity + 1 + usize::from(presence.prev_ref.is_some()));
    out.extend_from_slice(&meta[6..]);
    write_atom(out, "phx_ref");
    write_binary(out, &encode_ref(presence.shown_ref()));
    if let Some(prev) = presence.prev_ref() {
        write_atom(out, "phx_ref_prev");
        write_binary(out, &encode_ref(prev));
    }
    Ok(())
}

fn write_map_header(out: &mut Vec<u8>, arity: usize) {
    out.push(MAP_EXT);
    out.extend_from_slice(&(arity as u32).to_be_bytes());
}

fn write_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(BINARY_EXT);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn write_atom(out: &mut Vec<u8>, name: &str) {
    out.push(SMALL_ATOM_UTF8_EXT);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `term_to_binary(%{a: 1})`
    const META_A1: &[u8] = &[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 1];

    fn presence(owner: u32, key: &str, prev_ref: Option<u64>) -> Presence<u32, Vec<u8>> {
        Presence {
            owner: crate::Holder::Local(owner),
            key: crate::Bytes::from(key),
            meta: META_A1.to_vec(),
            phx_ref: 1,
            prev_ref: crate::prev_ref(prev_ref),
            seq: 0,
        }
    }

    #[test]
    fn splices_the_meta_and_adds_refs() {
        let mut out = Vec::new();
        write_grouped(&mut out, [presence(1, "k", Some(5))].iter()).unwrap();
        let mut expected = vec![131, 116, 0, 0, 0, 1, 109, 0, 0, 0, 1, b'k', 116, 0, 0, 0, 1];
        expected.extend_from_slice(&[119, 5]);
        expected.extend_from_slice(b"metas");
        expected.extend_from_slice(&[108, 0, 0, 0, 1, 116, 0, 0, 0, 3, 100, 0, 1, 97, 97, 1]);
        expected.extend_from_slice(&[119, 7]);
        expected.extend_from_slice(b"phx_ref");
        expected.extend_from_slice(&[109, 0, 0, 0, 11]);
        expected.extend_from_slice(&encode_ref(1));
        expected.extend_from_slice(&[119, 12]);
        expected.extend_from_slice(b"phx_ref_prev");
        expected.extend_from_slice(&[109, 0, 0, 0, 11]);
        expected.extend_from_slice(&encode_ref(5));
        expected.push(106);
        assert_eq!(out, expected);
    }

    #[test]
    fn groups_by_key_in_owner_order() {
        let mut out = Vec::new();
        let presences = [presence(9, "k", None), presence(2, "k", None)];
        write_grouped(&mut out, presences.iter()).unwrap();
        // One key, two metas.
        assert_eq!(&out[..6], &[131, 116, 0, 0, 0, 1]);
        let list_at = out.iter().position(|b| *b == 108).unwrap();
        assert_eq!(&out[list_at + 1..list_at + 5], &[0, 0, 0, 2]);
    }

    #[test]
    fn a_key_entry_is_the_value_a_listing_holds_under_that_key() {
        let presences = [presence(9, "k", None), presence(2, "k", Some(5))];
        let mut listing = Vec::new();
        write_grouped(&mut listing, presences.iter()).unwrap();
        let mut entry = Vec::new();
        write_key_entry(&mut entry, &mut presences.iter().collect::<Vec<_>>()).unwrap();
        // The listing is 131, a map of one key ("k": 6 bytes), its entry.
        assert_eq!(entry[0], VERSION);
        assert_eq!(&entry[1..], &listing[6 + 6..]);
    }

    #[test]
    fn refuses_bytes_that_are_not_a_map() {
        let mut bad = presence(1, "k", None);
        bad.meta = vec![131, 97, 1];
        assert_eq!(
            write_grouped(&mut Vec::new(), [bad].iter()),
            Err(EtfError::NotAMap)
        );
    }
}
