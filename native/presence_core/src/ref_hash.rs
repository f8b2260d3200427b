//! A hasher for maps keyed by [`Ref`](crate::Ref).
//!
//! Refs are handed out by the registry itself, never chosen by a client, so
//! there is no flooding to defend against and SipHash's cost buys nothing.
//! A multiply-and-rotate (as rustc's FxHash) spreads sequential refs well.

use std::hash::Hasher;

#[derive(Default, Clone, Copy)]
pub struct RefHasher(u64);

impl Hasher for RefHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(SEED);
    }
}

/// A ref's hash, as [`RefHasher`] makes it: for tables that hash their
/// entries themselves.
pub(crate) fn hash_ref(phx_ref: crate::Ref) -> u64 {
    let mut hasher = RefHasher::default();
    hasher.write_u64(phx_ref);
    hasher.finish()
}
