//! A vector stored as reference-counted chunks, so a snapshot costs one
//! `Arc` clone per chunk instead of one clone per element.
//!
//! Writers keep going while a reader walks a snapshot: the first write to a
//! chunk that a snapshot still holds copies that chunk alone
//! (`Arc::make_mut`). A 100k-entry topic is about 200 chunks, so taking a
//! snapshot under the table lock stays in the microseconds.

use std::sync::Arc;

/// Elements per chunk. Small enough that a copy-on-write costs a few
/// microseconds, large enough that a snapshot of 1M elements is ~2k `Arc`s.
pub const CHUNK_LEN: usize = 512;
const _: () = assert!(CHUNK_LEN.is_power_of_two());

#[derive(Debug)]
pub struct CowChunks<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
    /// Chunks written since [`CowChunks::snapshot_written`], a bit each:
    /// what was added or changed since is in those chunks alone.
    written: Vec<u64>,
}

/// A consistent, immutable view of a [`CowChunks`] at one point in time.
#[derive(Debug, Clone)]
pub struct Snapshot<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for CowChunks<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            written: Vec::new(),
        }
    }
}

impl<T> CowChunks<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        self.chunks[index / CHUNK_LEN].get(index % CHUNK_LEN)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }
}

impl<T: Clone> CowChunks<T> {
    /// Appends `value` and returns its index.
    pub fn push(&mut self, value: T) -> usize {
        let needs_chunk = self.chunks.last().is_none_or(|c| c.len() == CHUNK_LEN);
        if needs_chunk {
            // Grown by doubling, not allocated whole: a topic of ten
            // presences must not hold room for 512. CHUNK_LEN is a power of
            // two, so a full chunk has no spare capacity either.
            self.chunks.push(Arc::new(Vec::new()));
        }
        let last = self.chunks.last_mut().expect("a chunk was just ensured");
        Arc::make_mut(last).push(value);
        self.len += 1;
        self.mark_written(self.len - 1);
        self.len - 1
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        if index >= self.len {
            return None;
        }
        self.mark_written(index);
        Arc::make_mut(&mut self.chunks[index / CHUNK_LEN]).get_mut(index % CHUNK_LEN)
    }

    fn mark_written(&mut self, index: usize) {
        let chunk = index / CHUNK_LEN;
        if self.written.len() <= chunk / 64 {
            self.written.resize(chunk / 64 + 1, 0);
        }
        self.written[chunk / 64] |= 1 << (chunk % 64);
    }

    /// The chunks written since the last call (or ever), as a snapshot: an
    /// element added or changed since is in it, whatever moved where.
    pub fn snapshot_written(&mut self) -> Snapshot<T> {
        let chunks: Vec<Arc<Vec<T>>> = self
            .chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                self.written
                    .get(i / 64)
                    .is_some_and(|w| w & (1 << (i % 64)) != 0)
            })
            .map(|(_, chunk)| Arc::clone(chunk))
            .collect();
        self.written.clear();
        Snapshot {
            len: chunks.iter().map(|chunk| chunk.len()).sum(),
            chunks,
        }
    }

    /// Elements in the chunks written since the last snapshot of them.
    pub fn written_len(&self) -> usize {
        let chunks: usize = self.written.iter().map(|w| w.count_ones() as usize).sum();
        (chunks * CHUNK_LEN).min(self.len)
    }

    /// Forgets which chunks were written.
    pub fn clear_written(&mut self) {
        self.written.clear();
    }

    /// Removes the element at `index` by moving the last element into its
    /// place, as `Vec::swap_remove` does. Returns the removed element; the
    /// element that used to be last now lives at `index` (if `index` was not
    /// the last one).
    pub fn swap_remove(&mut self, index: usize) -> Option<T> {
        if index >= self.len {
            return None;
        }
        let last_chunk = self
            .chunks
            .last_mut()
            .expect("len > 0 means a chunk exists");
        let last = Arc::make_mut(last_chunk)
            .pop()
            .expect("chunks are never left empty");
        if last_chunk.is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if index == self.len {
            return Some(last);
        }
        self.mark_written(index);
        let slot = &mut Arc::make_mut(&mut self.chunks[index / CHUNK_LEN])[index % CHUNK_LEN];
        Some(std::mem::replace(slot, last))
    }

    pub fn snapshot(&self) -> Snapshot<T> {
        Snapshot {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T> Snapshot<T> {
    /// A snapshot of values copied out, for collections too small to share
    /// chunks.
    pub fn owned(values: Vec<T>) -> Self {
        Snapshot {
            len: values.len(),
            chunks: if values.is_empty() {
                Vec::new()
            } else {
                Vec::from([Arc::new(values)])
            },
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_and_swap_remove_across_chunks() {
        let mut v = CowChunks::default();
        for i in 0..(CHUNK_LEN * 2 + 3) {
            assert_eq!(v.push(i), i);
        }
        assert_eq!(v.swap_remove(1), Some(1));
        assert_eq!(v.get(1), Some(&(CHUNK_LEN * 2 + 2)));
        assert_eq!(v.len(), CHUNK_LEN * 2 + 2);
        while !v.is_empty() {
            v.swap_remove(0);
        }
        assert!(v.chunks.is_empty());
        assert_eq!(v.swap_remove(0), None);
    }

    #[test]
    fn small_vectors_hold_little_and_full_chunks_no_spare_room() {
        let mut v = CowChunks::default();
        for i in 0..3 {
            v.push(i);
        }
        assert!(v.chunks[0].capacity() < 16);
        for i in 3..CHUNK_LEN + 1 {
            v.push(i);
        }
        assert_eq!(v.chunks[0].capacity(), CHUNK_LEN);
    }

    #[test]
    fn a_snapshot_of_written_chunks_holds_every_element_changed_since() {
        let mut v = CowChunks::default();
        for i in 0..CHUNK_LEN * 4 {
            v.push(i);
        }
        assert_eq!(v.snapshot_written().len(), CHUNK_LEN * 4);
        assert_eq!(v.written_len(), 0);
        *v.get_mut(3).unwrap() = 1_000_000;
        v.swap_remove(CHUNK_LEN + 1);
        v.push(2_000_000);
        let written: Vec<usize> = v.snapshot_written().iter().copied().collect();
        assert!(written.contains(&1_000_000) && written.contains(&2_000_000));
        // The last element, moved into the second chunk, is there too.
        assert!(written.contains(&(CHUNK_LEN * 4 - 1)));
        assert_eq!(written.len(), CHUNK_LEN * 3);
        assert_eq!(v.snapshot_written().len(), 0);
    }

    #[test]
    fn snapshot_is_unaffected_by_later_writes() {
        let mut v = CowChunks::default();
        for i in 0..1000 {
            v.push(i);
        }
        let snap = v.snapshot();
        *v.get_mut(0).unwrap() = 42;
        v.swap_remove(10);
        v.push(7);
        let seen: Vec<_> = snap.iter().copied().collect();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert_eq!(snap.len(), 1000);
        assert_eq!(v.get(0), Some(&42));
    }
}
