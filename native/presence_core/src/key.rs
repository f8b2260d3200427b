//! Presence keys as the core stores them: opaque byte strings that keep
//! the term a key was tracked with, and the string it is listed under.
//!
//! Phoenix keeps keys as terms (`42` and `"42"` are two presences) and
//! lists them by `to_string/1` (both under `"42"`). A binary key is stored
//! as its own bytes, at no cost. Any other key, and a binary starting with
//! [`TERM_KEY`] (which no UTF-8 string does), is stored tagged:
//!
//! ```text
//! term key := 131 u32-be(len) listed(len bytes) term_to_binary(key)
//! ```
//!
//! Equal terms encode alike, so byte equality is key equality. Only the
//! Elixir side builds these (it alone can call `to_string/1`); the core,
//! the NIF and replication read the listed form and carry the rest.

/// The first byte of a tagged key (`term_to_binary/1`'s version byte).
pub const TERM_KEY: u8 = 131;

/// Whether `key` is a tagged, non-binary (or escaped binary) key.
pub fn is_term_key(key: &[u8]) -> bool {
    key.first() == Some(&TERM_KEY)
}

/// The string `key` is listed and counted under. A malformed tagged key
/// (never built by us) is listed as its bytes.
pub fn listed_key(key: &[u8]) -> &[u8] {
    match key {
        [TERM_KEY, a, b, c, d, rest @ ..] => {
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            rest.get(..len).unwrap_or(key)
        }
        _ => key,
    }
}

/// Builds a tagged key, as the Elixir side does (for tests and tools).
pub fn term_key(listed: &[u8], term: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + listed.len() + term.len());
    key.push(TERM_KEY);
    key.extend_from_slice(&(listed.len() as u32).to_be_bytes());
    key.extend_from_slice(listed);
    key.extend_from_slice(term);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_list_as_themselves_and_terms_as_their_string() {
        assert_eq!(listed_key(b"42"), b"42");
        assert!(!is_term_key(b"42"));
        // term_to_binary(42)
        let tagged = term_key(b"42", &[131, 97, 42]);
        assert!(is_term_key(&tagged));
        assert_eq!(listed_key(&tagged), b"42");
        assert_ne!(tagged.as_slice(), b"42");
        assert_eq!(listed_key(&[]), b"");
        assert_eq!(
            listed_key(&[TERM_KEY, 0, 0, 0, 9, 1]),
            &[TERM_KEY, 0, 0, 0, 9, 1]
        );
    }
}
