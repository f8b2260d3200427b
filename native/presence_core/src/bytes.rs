//! Byte strings as the table stores them: topics, keys and metas.
//!
//! Most are short: `"user:42"`, `"room:lobby"`, and Drab's own meta,
//! `term_to_binary(%{online_at: 1700000000})`, is 23 bytes (on OTP 25 and
//! older). Up to [`INLINE`] bytes live inside the value itself, with no
//! allocation and no reference count; longer ones share one allocation
//! between their copies. Either way a `Bytes` is 24 bytes, a third of
//! the cost of a presence with three small strings behind `Arc`s.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// The longest byte string stored inline.
pub const INLINE: usize = 23;

/// An immutable byte string: inline up to [`INLINE`] bytes, else shared.
/// Compares, hashes and orders as the `[u8]` it holds.
#[derive(Clone)]
pub struct Bytes(Repr);

#[derive(Clone)]
enum Repr {
    // `len` last, and an enum of its valid values: the spare values of that
    // byte tell the two variants apart, so the whole is 24 bytes.
    Inline { data: [u8; INLINE], len: InlineLen },
    Shared(Arc<[u8]>),
}

/// A length `0..=INLINE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[rustfmt::skip]
enum InlineLen {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
    L16, L17, L18, L19, L20, L21, L22, L23,
}

#[rustfmt::skip]
const LENS: [InlineLen; INLINE + 1] = {
    use InlineLen::*;
    [L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
     L16, L17, L18, L19, L20, L21, L22, L23]
};

impl Bytes {
    /// The empty string.
    pub const fn new() -> Self {
        Bytes(Repr::Inline {
            data: [0; INLINE],
            len: InlineLen::L0,
        })
    }

    /// Whether the bytes live in an allocation of their own.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Repr::Shared(_))
    }
}

impl Default for Bytes {
    fn default() -> Self {
        Self::new()
    }
}

impl From<&[u8]> for Bytes {
    fn from(bytes: &[u8]) -> Self {
        match LENS.get(bytes.len()) {
            Some(&len) => {
                let mut data = [0; INLINE];
                data[..bytes.len()].copy_from_slice(bytes);
                Bytes(Repr::Inline { data, len })
            }
            None => Bytes(Repr::Shared(Arc::from(bytes))),
        }
    }
}

impl<const N: usize> From<&[u8; N]> for Bytes {
    fn from(bytes: &[u8; N]) -> Self {
        Self::from(&bytes[..])
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from(bytes.as_slice())
    }
}

impl From<&str> for Bytes {
    fn from(s: &str) -> Self {
        Self::from(s.as_bytes())
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { data, len } => &data[..*len as usize],
            Repr::Shared(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Borrow<[u8]> for Bytes {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Bytes {}

impl PartialEq<[u8]> for Bytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialOrd for Bytes {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bytes {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for Bytes {
    // As `[u8]` hashes, so that maps keyed by `Bytes` find `&[u8]` keys.
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{:?}", &**self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;

    #[test]
    fn is_as_large_as_a_slice_pointer_and_a_word() {
        assert_eq!(std::mem::size_of::<Bytes>(), 24);
        assert_eq!(std::mem::size_of::<Option<Bytes>>(), 24);
    }

    #[test]
    fn short_strings_are_inline_and_long_ones_shared() {
        for len in 0..=INLINE {
            let source: Vec<u8> = (0..len as u8).collect();
            let bytes = Bytes::from(source.as_slice());
            assert!(!bytes.is_shared());
            assert_eq!(&*bytes, source.as_slice());
        }
        let long = vec![7u8; INLINE + 1];
        let bytes = Bytes::from(long.as_slice());
        assert!(bytes.is_shared());
        assert_eq!(&*bytes.clone(), long.as_slice());
    }

    #[test]
    fn compares_and_hashes_as_its_bytes() {
        let hasher = RandomState::new();
        for s in [&b""[..], b"user:42", &[9u8; 40][..]] {
            let bytes = Bytes::from(s);
            assert_eq!(hasher.hash_one(&bytes), hasher.hash_one(s));
            assert_eq!(bytes, Bytes::from(s.to_vec()));
        }
        assert!(Bytes::from("a") < Bytes::from("b"));
        let long = Bytes::from(&[1u8; 30][..]);
        let short = Bytes::from("\x01");
        assert!(long > short);
    }
}
