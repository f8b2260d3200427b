//! How large a meta would be encoded, found without encoding it.
//!
//! `term_to_binary/1` of a 100 MB binary, a 5M-element list or a 2M-deep
//! nesting holds a normal scheduler for tens of milliseconds, only for the
//! result to be refused as too large. [`exceeds`] answers first, walking at
//! most about `limit` subterms, and needs no recursion, so no nesting depth
//! can overflow its stack.

use rustler::sys::{enif_get_tuple, ErlNifTerm};
use rustler::{Binary, MapIterator, Term, TermType};

/// Header bytes of a map, list, tuple or binary in the external format,
/// at the least (`SMALL_TUPLE_EXT` and `STRING_EXT` are shorter, but the
/// bound only has to be a bound).
const CONTAINER: usize = 2;
/// The smallest encoding of any term is one tag and one byte.
const SCALAR: usize = 2;

/// Whether `term` certainly encodes to more than `limit` bytes. Every
/// subterm counts at least what its encoding takes, so a `true` is exact;
/// a `false` means "not found larger", and the caller still checks the
/// real encoded size.
pub fn exceeds(term: Term, limit: usize) -> bool {
    let mut total = 1; // the version byte
    let mut stack = vec![term];
    while let Some(term) = stack.pop() {
        total += match term.get_type() {
            TermType::Binary => Binary::from_term(term).map_or(SCALAR, |b| 5 + b.len()),
            TermType::Map => {
                for (key, value) in MapIterator::new(term).into_iter().flatten() {
                    stack.extend([key, value]);
                    total += 2 * SCALAR;
                    if total > limit {
                        return true;
                    }
                }
                CONTAINER
            }
            TermType::List => {
                for element in term.into_list_iterator().into_iter().flatten() {
                    stack.push(element);
                    // A list of bytes is a STRING_EXT: one byte an element.
                    total += 1;
                    if total > limit {
                        return true;
                    }
                }
                CONTAINER
            }
            TermType::Tuple => {
                for element in tuple_elements(term) {
                    stack.push(element);
                    total += SCALAR;
                    if total > limit {
                        return true;
                    }
                }
                CONTAINER
            }
            _ => SCALAR,
        };
        if total > limit {
            return true;
        }
    }
    false
}

/// The elements of a tuple, read in place: rustler's `get_tuple` would
/// copy all of a 5M-element tuple before the first is looked at.
fn tuple_elements(tuple: Term) -> impl Iterator<Item = Term> {
    let env = tuple.get_env();
    let mut arity = 0;
    let mut elements: *const ErlNifTerm = std::ptr::null();
    // SAFETY: `tuple` is a tuple term of `env` (checked by the caller's
    // `get_type`); on success `elements` points at `arity` terms that live
    // as long as the tuple, i.e. as long as `env`.
    let ok = unsafe { enif_get_tuple(env.as_c_arg(), tuple.as_c_arg(), &mut arity, &mut elements) };
    let arity = if ok == 0 { 0 } else { arity as usize };
    (0..arity).map(move |i| unsafe { Term::new(env, *elements.add(i)) })
}
