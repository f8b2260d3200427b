//! `phx_ref` values: unique per registry, and unlikely to collide across
//! registries (nodes, restarts) because each one starts from a random seed.

use crate::Ref;

/// Hands out presence refs. Starting from a random seed keeps refs from two
/// registries (two nodes, or one node before and after a restart) apart
/// without any coordination.
///
/// Underneath, changes count up from zero: each presence keeps its count
/// (`Presence::seq`), so "joined after X" is a comparison, with no
/// wrap-around to mind, whoever made its ref.
#[derive(Debug, Clone)]
pub struct RefGen {
    seed: u64,
    next_seq: u64,
}

impl RefGen {
    pub fn new(seed: u64) -> Self {
        Self { seed, next_seq: 0 }
    }

    pub fn next_ref(&mut self) -> Ref {
        self.next(None).0
    }

    /// A ref and its place in the order of changes: the next of ours, or
    /// `given` (made elsewhere) at the next place.
    pub fn next(&mut self, given: Option<Ref>) -> (Ref, u64) {
        loop {
            let seq = self.next_seq;
            self.next_seq += 1;
            // Never 0, which a previous ref cannot hold (see `Ref`).
            match given.unwrap_or(self.seed.wrapping_add(seq)) {
                0 => continue,
                phx_ref => return (phx_ref, seq),
            }
        }
    }

    /// The seq the next ref will have: every ref handed out so far is below.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// A random 64-bit seed for a table's refs, from the OS's randomness (as
/// `std`'s hash maps seed themselves): no two tables start alike.
pub fn random_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    RandomState::new().build_hasher().finish()
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Renders a ref as 11 URL-safe base64 characters (the big-endian bytes of
/// the ref), the same kind of opaque string Phoenix.Tracker hands out.
pub fn encode_ref(phx_ref: Ref) -> [u8; 11] {
    let mut out = [0u8; 11];
    // 64 bits in 6-bit groups, most significant first: 10 full groups + 4 bits.
    for (i, byte) in out.iter_mut().enumerate() {
        let shift = 64i32 - 6 * (i as i32 + 1);
        let group = if shift >= 0 {
            (phx_ref >> shift) & 0x3f
        } else {
            (phx_ref << (-shift)) & 0x3f
        };
        *byte = ALPHABET[group as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn encoded_refs_are_distinct_for_distinct_refs() {
        let mut seen = HashSet::new();
        let mut gen = RefGen::new(u64::MAX - 500);
        for _ in 0..1000 {
            assert!(seen.insert(encode_ref(gen.next_ref())));
        }
        assert_eq!(&encode_ref(0), b"AAAAAAAAAAA");
        assert_eq!(&encode_ref(u64::MAX), b"__________8");
        assert_ne!(encode_ref(1), encode_ref(16));
    }
}
