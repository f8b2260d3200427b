use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::cow_chunks::{CowChunks, Snapshot};
use crate::error::CoreError;
use crate::phx_ref::RefGen;
use crate::ref_hash::{RefSet, ShardedRefMap};
use crate::sharded_map::ShardedMap;

/// A presence ref (rendered as `phx_ref` by [`crate::encode_ref`]).
pub type Ref = u64;

/// Topics and keys are byte strings: Erlang binaries need not be UTF-8.
pub type Bytes = Arc<[u8]>;

/// One tracked presence: an owner under a key on a topic, with its meta.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence<O, M> {
    pub owner: O,
    pub key: Bytes,
    pub meta: M,
    pub phx_ref: Ref,
    /// The ref this presence had before its last update, as `phx_ref_prev`.
    pub prev_ref: Option<Ref>,
}

/// What one topic's subscribers have not been told yet.
///
/// Leaves were recorded as they happened; joins are the presences of the
/// topic whose refs were handed out since the previous diff, found in a
/// snapshot taken with the diff. Taking it is a move and a snapshot, under
/// the lock; walking, encoding and dropping it happen after the lock is gone.
#[derive(Debug)]
pub struct TopicDiff<O, M> {
    pub topic: Bytes,
    leaves: Vec<Presence<O, M>>,
    entries: Option<Snapshot<Presence<O, M>>>,
    refs: RefGen,
    joins_from_seq: u64,
}

impl<O, M> TopicDiff<O, M> {
    pub fn joins(&self) -> impl Iterator<Item = &Presence<O, M>> {
        self.entries
            .iter()
            .flat_map(|snapshot| snapshot.iter())
            .filter(|p| self.refs.seq(p.phx_ref) >= self.joins_from_seq)
    }

    pub fn leaves(&self) -> impl ExactSizeIterator<Item = &Presence<O, M>> {
        self.leaves.iter()
    }

    /// The diff cut into consecutive diffs of at most `max_presences`
    /// presences each (joins plus leaves), so that no single broadcast
    /// copies an unbounded payload into every subscriber. Applied in order,
    /// the parts have the same effect as the whole: no ref is in both joins
    /// and leaves, so the parts touch disjoint presences. A diff whose joins
    /// and leaves all cancelled out has no parts.
    #[allow(clippy::type_complexity)]
    pub fn parts(&self, max_presences: usize) -> Vec<(Vec<&Presence<O, M>>, Vec<&Presence<O, M>>)> {
        let max = max_presences.max(1);
        let mut parts = Vec::new();
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for (is_join, presence) in self
            .leaves()
            .map(|p| (false, p))
            .chain(self.joins().map(|p| (true, p)))
        {
            if joins.len() + leaves.len() == max {
                parts.push((std::mem::take(&mut joins), std::mem::take(&mut leaves)));
            }
            if is_join {
                joins.push(presence)
            } else {
                leaves.push(presence)
            }
        }
        if !joins.is_empty() || !leaves.is_empty() {
            parts.push((joins, leaves));
        }
        parts
    }
}

/// The result of a write that changed the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub phx_ref: Ref,
    /// The first pending diff appeared: the dispatcher must be told.
    pub wake: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Changed(Change),
    /// The new meta equals the old one: nothing changed, nothing to send.
    Unchanged(Ref),
}

/// What an untrack, or an owner's exit, removed.
#[derive(Debug)]
pub struct Removed<W> {
    pub removed: usize,
    pub wake: bool,
    /// The owner's watch handle, returned once its last presence is gone so
    /// the caller can release it (demonitor).
    pub released_watch: Option<W>,
}

impl<W> Removed<W> {
    /// Nothing was removed.
    pub fn nothing() -> Self {
        Self {
            removed: 0,
            wake: false,
            released_watch: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Distinct keys (Drab: users, or browsers).
    pub users: usize,
    /// Presences (Drab: connections).
    pub connections: usize,
}

/// The refs under one key in one topic. Most keys have one connection, so
/// that case needs no allocation; a key shared by many (one user with many
/// tabs, or a topic keyed by a constant) stays O(1) to change.
#[derive(Debug)]
enum KeyRefs {
    One(Ref),
    Many(Box<RefSet>),
}

impl KeyRefs {
    fn iter(&self) -> impl Iterator<Item = &Ref> {
        let (one, many) = match self {
            KeyRefs::One(r) => (Some(r), None),
            KeyRefs::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn add(&mut self, phx_ref: Ref) {
        match self {
            KeyRefs::One(first) => {
                *self = KeyRefs::Many(Box::new(RefSet::from_iter([*first, phx_ref])))
            }
            KeyRefs::Many(set) => {
                set.insert(phx_ref);
            }
        }
    }

    /// Removes `phx_ref`; returns true when no ref is left.
    fn remove(&mut self, phx_ref: Ref) -> bool {
        match self {
            KeyRefs::One(r) => *r == phx_ref,
            KeyRefs::Many(set) => {
                set.remove(&phx_ref);
                if set.len() == 1 {
                    let only = *set.iter().next().expect("one left");
                    *self = KeyRefs::One(only);
                }
                false
            }
        }
    }

    fn replace(&mut self, old: Ref, new: Ref) {
        match self {
            KeyRefs::One(r) => *r = new,
            KeyRefs::Many(set) => {
                set.remove(&old);
                set.insert(new);
            }
        }
    }
}

#[derive(Debug)]
struct Topic<O, M> {
    entries: CowChunks<Presence<O, M>>,
    position: ShardedRefMap<u32>,
    keys: ShardedMap<Bytes, KeyRefs>,
    /// Presences with a ref at or after this seq joined after the last
    /// diff: their join is pending. A leave of one of them cancels that
    /// join instead of being recorded.
    joins_from_seq: u64,
    /// Leaves of presences whose join subscribers have seen.
    pending_leaves: Vec<Presence<O, M>>,
    /// In `Registry::dirty`, waiting for `take_diffs`.
    dirty: bool,
}

impl<O, M> Topic<O, M> {
    /// A topic created when refs up to `next_seq` are already handed out.
    fn new(next_seq: u64) -> Self {
        Self {
            entries: CowChunks::default(),
            position: ShardedRefMap::default(),
            keys: ShardedMap::default(),
            joins_from_seq: next_seq,
            pending_leaves: Vec::new(),
            dirty: false,
        }
    }
}

/// Where one presence of an owner lives, to find it without a topic scan.
/// Its key is the entry's: keeping it here too would cost 16 bytes a presence.
#[derive(Debug)]
struct Handle {
    topic: Bytes,
    phx_ref: Ref,
}

/// An owner's handles. Most owners (channel processes) are present on one
/// topic, so that case lives inline.
#[derive(Debug)]
enum Handles {
    One(Handle),
    Many(Vec<Handle>),
}

impl Handles {
    fn as_slice(&self) -> &[Handle] {
        match self {
            Handles::One(h) => std::slice::from_ref(h),
            Handles::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Handle] {
        match self {
            Handles::One(h) => std::slice::from_mut(h),
            Handles::Many(v) => v,
        }
    }

    fn push(&mut self, handle: Handle) {
        match std::mem::replace(self, Handles::Many(Vec::new())) {
            Handles::One(first) => *self = Handles::Many(vec![first, handle]),
            Handles::Many(mut v) => {
                v.push(handle);
                *self = Handles::Many(v);
            }
        }
    }

    /// Removes the handle at `index`; `None` means it was the last one and
    /// the owner should go.
    fn remove(&mut self, index: usize) -> Option<Handle> {
        match self {
            Handles::One(_) => None,
            Handles::Many(v) => {
                let removed = v.swap_remove(index);
                if v.len() == 1 {
                    *self = Handles::One(v.pop().expect("one left"));
                }
                Some(removed)
            }
        }
    }
}

#[derive(Debug)]
struct Owner<W> {
    watch: W,
    handles: Handles,
}

/// The presence table.
///
/// * `O` identifies an owner (a process).
/// * `M` is a meta; equality decides whether an update is a no-op.
/// * `W` is what watches a live owner (a monitor); one per owner, created on
///   its first presence and handed back when its last one goes.
#[derive(Debug)]
pub struct Registry<O, M, W> {
    topics: HashMap<Bytes, Topic<O, M>>,
    owners: ShardedMap<O, Owner<W>>,
    /// Topics with a pending diff, in the order they first changed.
    dirty: Vec<Bytes>,
    refs: RefGen,
    presences: usize,
}

impl<O, M, W> Registry<O, M, W>
where
    O: Copy + Eq + Hash,
    M: Clone + PartialEq,
{
    /// `ref_seed` should be random, so refs from different registries differ.
    pub fn new(ref_seed: u64) -> Self {
        Self {
            topics: HashMap::new(),
            owners: ShardedMap::default(),
            dirty: Vec::new(),
            refs: RefGen::new(ref_seed),
            presences: 0,
        }
    }

    /// Adds a presence of `owner` under `key` on `topic`.
    ///
    /// `watch` runs only when `owner` has no presence yet; it returns `None`
    /// when the owner cannot be watched (it is gone), and then nothing is
    /// added.
    pub fn track(
        &mut self,
        owner: O,
        topic: &[u8],
        key: &[u8],
        meta: M,
        watch: impl FnOnce() -> Option<W>,
    ) -> Result<Change, CoreError> {
        let new_watch = match self.owners.get(&owner) {
            Some(existing) if self.find_handle(existing, topic, key).is_some() => {
                return Err(CoreError::AlreadyTracked)
            }
            Some(_) => None,
            None => Some(watch().ok_or(CoreError::OwnerGone)?),
        };

        let topic_name = self.intern_topic(topic);
        let phx_ref = self.refs.next_ref();
        let topic_entry = self.topics.get_mut(&topic_name).expect("interned above");
        let key = match topic_entry.keys.get_key_value(key) {
            Some((existing, _)) => existing.clone(),
            None => Bytes::from(key),
        };
        let presence = Presence {
            owner,
            key,
            meta,
            phx_ref,
            prev_ref: None,
        };
        insert_presence(topic_entry, presence);
        self.presences += 1;
        let handle = Handle {
            topic: topic_name.clone(),
            phx_ref,
        };
        match new_watch {
            Some(watch) => {
                self.owners.insert(
                    owner,
                    Owner {
                        watch,
                        handles: Handles::One(handle),
                    },
                );
            }
            None => self
                .owners
                .get_mut(&owner)
                .expect("checked above")
                .handles
                .push(handle),
        }
        let wake = self.mark_dirty(&topic_name);
        Ok(Change { phx_ref, wake })
    }

    /// Removes the presence of `owner` under `key` on `topic`, if any.
    pub fn untrack(&mut self, owner: O, topic: &[u8], key: &[u8]) -> Removed<W> {
        let Some(owner_entry) = self.owners.get(&owner) else {
            return Removed::nothing();
        };
        let Some(index) = self.find_handle(owner_entry, topic, key) else {
            return Removed::nothing();
        };
        let owner_entry = self.owners.get_mut(&owner).expect("found above");
        let (handle, released_watch) = match owner_entry.handles.remove(index) {
            Some(handle) => (handle, None),
            None => {
                let last = self.owners.remove(&owner).expect("found above");
                let Handles::One(handle) = last.handles else {
                    unreachable!("only a single handle is left for removal")
                };
                (handle, Some(last.watch))
            }
        };
        let wake = self.remove_presence(&handle.topic, handle.phx_ref);
        Removed {
            removed: 1,
            wake,
            released_watch,
        }
    }

    /// Removes every presence of `owner`: `untrack(pid)`, or the owner exited.
    pub fn untrack_owner(&mut self, owner: O) -> Removed<W> {
        let Some(owner_entry) = self.owners.remove(&owner) else {
            return Removed::nothing();
        };
        let mut wake = false;
        for handle in owner_entry.handles.as_slice() {
            wake |= self.remove_presence(&handle.topic, handle.phx_ref);
        }
        Removed {
            removed: owner_entry.handles.as_slice().len(),
            wake,
            released_watch: Some(owner_entry.watch),
        }
    }

    /// The presence of `owner` under `key` on `topic`, for read-modify-write
    /// updates.
    pub fn lookup(&self, owner: O, topic: &[u8], key: &[u8]) -> Option<&Presence<O, M>> {
        let handle = self.handle(owner, topic, key)?;
        let topic = self.topics.get(&*handle.topic)?;
        topic
            .entries
            .get(*topic.position.get(&handle.phx_ref)? as usize)
    }

    /// What watches `owner`, while it has presences.
    pub fn watch(&self, owner: &O) -> Option<&W> {
        self.owners.get(owner).map(|o| &o.watch)
    }

    /// Replaces the meta of a presence. The presence gets a new ref and
    /// remembers the old one, unless `meta` equals the current meta.
    ///
    /// With `expected_ref`, the update is refused with [`CoreError::Stale`]
    /// when the presence no longer has that ref, so that a caller computing
    /// the new meta from the old one never overwrites a concurrent update.
    pub fn update(
        &mut self,
        owner: O,
        topic: &[u8],
        key: &[u8],
        meta: M,
        expected_ref: Option<Ref>,
    ) -> Result<Update, CoreError> {
        let (topic_name, old_ref) = {
            let handle = self
                .handle(owner, topic, key)
                .ok_or(CoreError::NotTracked)?;
            (handle.topic.clone(), handle.phx_ref)
        };
        if expected_ref.is_some_and(|expected| expected != old_ref) {
            return Err(CoreError::Stale);
        }
        let topic_entry = self
            .topics
            .get_mut(&topic_name)
            .expect("handles point at live topics");
        let index = *topic_entry
            .position
            .get(&old_ref)
            .expect("handles point at live refs") as usize;
        if topic_entry
            .entries
            .get(index)
            .expect("positions are in bounds")
            .meta
            == meta
        {
            return Ok(Update::Unchanged(old_ref));
        }

        let new_ref = self.refs.next_ref();
        let slot = topic_entry
            .entries
            .get_mut(index)
            .expect("positions are in bounds");
        let before = slot.clone();
        slot.meta = meta;
        slot.phx_ref = new_ref;
        slot.prev_ref = Some(old_ref);
        let after = slot.clone();
        topic_entry.position.remove(&old_ref);
        topic_entry.position.insert(new_ref, index as u32);
        topic_entry
            .keys
            .get_mut(&after.key)
            .expect("every entry's key is indexed")
            .replace(old_ref, new_ref);
        let owner_entry = self.owners.get_mut(&owner).expect("handle found above");
        let handle = owner_entry
            .handles
            .as_mut_slice()
            .iter_mut()
            .find(|h| h.phx_ref == old_ref)
            .expect("handle found above");
        handle.phx_ref = new_ref;

        self.record_leave(&topic_name, before);
        let wake = self.mark_dirty(&topic_name);
        Ok(Update::Changed(Change {
            phx_ref: new_ref,
            wake,
        }))
    }

    /// Users and connections on `topic`, from counters: O(1).
    pub fn counts(&self, topic: &[u8]) -> Counts {
        self.topics
            .get(topic)
            .map_or(Counts::default(), |t| Counts {
                users: t.keys.len(),
                connections: t.entries.len(),
            })
    }

    /// A consistent view of every presence on `topic`, taken in
    /// O(entries / CHUNK_LEN); walking it needs no lock on the registry.
    pub fn snapshot(&self, topic: &[u8]) -> Option<Snapshot<Presence<O, M>>> {
        self.topics
            .get(topic)
            .filter(|t| !t.entries.is_empty())
            .map(|t| t.entries.snapshot())
    }

    /// The presences under `key` on `topic`.
    pub fn get_by_key(&self, topic: &[u8], key: &[u8]) -> Vec<Presence<O, M>> {
        let Some(topic) = self.topics.get(topic) else {
            return Vec::new();
        };
        let Some(refs) = topic.keys.get(key) else {
            return Vec::new();
        };
        refs.iter()
            .filter_map(|r| topic.entries.get(*topic.position.get(r)? as usize))
            .cloned()
            .collect()
    }

    /// Takes the pending diffs of up to `max_topics` topics, oldest first.
    /// Under the lock this only moves the leaves and snapshots the topic;
    /// finding the joins is left to the caller, off the lock.
    pub fn take_diffs(&mut self, max_topics: usize) -> Vec<TopicDiff<O, M>> {
        let take = max_topics.min(self.dirty.len());
        let next_seq = self.refs.next_seq();
        let mut diffs = Vec::with_capacity(take);
        for topic_name in self.dirty.drain(..take) {
            let Some(topic) = self.topics.get_mut(&topic_name) else {
                continue;
            };
            let diff = TopicDiff {
                topic: topic_name.clone(),
                leaves: std::mem::take(&mut topic.pending_leaves),
                entries: (!topic.entries.is_empty()).then(|| topic.entries.snapshot()),
                refs: self.refs.clone(),
                joins_from_seq: topic.joins_from_seq,
            };
            topic.joins_from_seq = next_seq;
            topic.dirty = false;
            if topic.entries.is_empty() {
                self.topics.remove(&topic_name);
            }
            diffs.push(diff);
        }
        diffs
    }

    /// Topics with a diff not yet taken.
    pub fn pending_topics(&self) -> usize {
        self.dirty.len()
    }

    /// Presences across all topics.
    pub fn len(&self) -> usize {
        self.presences
    }

    pub fn is_empty(&self) -> bool {
        self.presences == 0
    }

    pub fn owner_count(&self) -> usize {
        self.owners.len()
    }

    pub fn topic_count(&self) -> usize {
        self.topics
            .values()
            .filter(|t| !t.entries.is_empty())
            .count()
    }

    /// The watch handles of every owner, e.g. to release them on shutdown.
    pub fn watches(&self) -> impl Iterator<Item = (&O, &W)> {
        self.owners
            .iter()
            .map(|(owner, entry)| (owner, &entry.watch))
    }

    fn handle(&self, owner: O, topic: &[u8], key: &[u8]) -> Option<&Handle> {
        let owner_entry = self.owners.get(&owner)?;
        let index = self.find_handle(owner_entry, topic, key)?;
        owner_entry.handles.as_slice().get(index)
    }

    /// The index of `owner_entry`'s handle for `key` on `topic`.
    fn find_handle(&self, owner_entry: &Owner<W>, topic: &[u8], key: &[u8]) -> Option<usize> {
        owner_entry.handles.as_slice().iter().position(|h| {
            &*h.topic == topic && {
                let t = &self.topics[&h.topic];
                let index = *t
                    .position
                    .get(&h.phx_ref)
                    .expect("handles point at live refs") as usize;
                &*t.entries.get(index).expect("positions are in bounds").key == key
            }
        })
    }

    fn intern_topic(&mut self, topic: &[u8]) -> Bytes {
        if let Some((name, _)) = self.topics.get_key_value(topic) {
            return name.clone();
        }
        let name = Bytes::from(topic);
        self.topics
            .insert(name.clone(), Topic::new(self.refs.next_seq()));
        name
    }

    /// Removes the presence `phx_ref` from `topic_name`, records the leave,
    /// and returns whether the dispatcher must be woken.
    fn remove_presence(&mut self, topic_name: &Bytes, phx_ref: Ref) -> bool {
        let topic = self
            .topics
            .get_mut(topic_name)
            .expect("handles point at live topics");
        let index = topic
            .position
            .remove(&phx_ref)
            .expect("handles point at live refs") as usize;
        let removed = topic
            .entries
            .swap_remove(index)
            .expect("positions are in bounds");
        if let Some(moved) = topic.entries.get(index) {
            topic.position.insert(moved.phx_ref, index as u32);
        }
        let key_empty = topic
            .keys
            .get_mut(&removed.key)
            .expect("every entry's key is indexed")
            .remove(phx_ref);
        if key_empty {
            topic.keys.remove(&removed.key);
        }
        self.presences -= 1;
        self.record_leave(topic_name, removed);
        self.mark_dirty(topic_name)
    }

    /// A leave cancels a join that subscribers have not seen yet; any other
    /// is recorded for the next diff.
    fn record_leave(&mut self, topic_name: &Bytes, presence: Presence<O, M>) {
        let topic = self
            .topics
            .get_mut(topic_name)
            .expect("recorded topics exist");
        if self.refs.seq(presence.phx_ref) < topic.joins_from_seq {
            topic.pending_leaves.push(presence);
        }
    }

    /// Marks `topic_name` as having a pending diff. Returns true when it is
    /// the first dirty topic, i.e. the dispatcher is idle and must be woken.
    fn mark_dirty(&mut self, topic_name: &Bytes) -> bool {
        let topic = self
            .topics
            .get_mut(topic_name)
            .expect("recorded topics exist");
        if topic.dirty {
            return false;
        }
        topic.dirty = true;
        let wake = self.dirty.is_empty();
        self.dirty.push(topic_name.clone());
        wake
    }
}

fn insert_presence<O: Clone, M: Clone>(topic: &mut Topic<O, M>, presence: Presence<O, M>) {
    let phx_ref = presence.phx_ref;
    match topic.keys.get_mut(&presence.key) {
        Some(refs) => refs.add(phx_ref),
        None => {
            topic
                .keys
                .insert(presence.key.clone(), KeyRefs::One(phx_ref));
        }
    }
    let index = topic.entries.push(presence);
    topic.position.insert(phx_ref, index as u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reg = Registry<u32, &'static str, ()>;

    fn reg() -> Reg {
        Registry::new(1)
    }

    fn watch() -> Option<()> {
        Some(())
    }

    #[test]
    fn counts_users_and_connections() {
        let mut r = reg();
        r.track(1, b"t", b"alice", "a", watch).unwrap();
        r.track(2, b"t", b"alice", "b", watch).unwrap();
        r.track(3, b"t", b"bob", "c", watch).unwrap();
        r.track(3, b"other", b"bob", "c", watch).unwrap();
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 2,
                connections: 3
            }
        );
        r.untrack(1, b"t", b"alice");
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 2,
                connections: 2
            }
        );
        r.untrack_owner(2);
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 1,
                connections: 1
            }
        );
        assert_eq!(r.counts(b"none"), Counts::default());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn tracking_twice_is_refused_and_changes_nothing() {
        let mut r = reg();
        r.track(1, b"t", b"k", "a", watch).unwrap();
        assert_eq!(
            r.track(1, b"t", b"k", "b", watch),
            Err(CoreError::AlreadyTracked)
        );
        assert_eq!(r.get_by_key(b"t", b"k").len(), 1);
    }

    #[test]
    fn an_owner_that_cannot_be_watched_is_not_tracked() {
        let mut r = reg();
        assert_eq!(
            r.track(1, b"t", b"k", "a", || None),
            Err(CoreError::OwnerGone)
        );
        assert!(r.is_empty());
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn watch_is_created_once_and_released_with_the_last_presence() {
        let mut r: Registry<u32, &str, u32> = Registry::new(0);
        let mut created = 0;
        r.track(1, b"a", b"k", "m", || {
            created += 1;
            Some(7)
        })
        .unwrap();
        r.track(1, b"b", b"k", "m", || panic!("watched already"))
            .unwrap();
        assert_eq!(created, 1);
        assert_eq!(r.untrack(1, b"a", b"k").released_watch, None);
        assert_eq!(r.untrack(1, b"b", b"k").released_watch, Some(7));
        assert_eq!(r.owner_count(), 0);
    }

    #[test]
    fn update_sets_new_ref_and_prev_ref() {
        let mut r = reg();
        let first = r.track(1, b"t", b"k", "a", watch).unwrap().phx_ref;
        let Update::Changed(change) = r.update(1, b"t", b"k", "b", None).unwrap() else {
            panic!("meta changed")
        };
        assert_ne!(change.phx_ref, first);
        let [p] = &r.get_by_key(b"t", b"k")[..] else {
            panic!()
        };
        assert_eq!(
            (p.meta, p.phx_ref, p.prev_ref),
            ("b", change.phx_ref, Some(first))
        );
        assert_eq!(
            r.update(1, b"t", b"k", "b", None),
            Ok(Update::Unchanged(change.phx_ref))
        );
        assert_eq!(
            r.update(1, b"t", b"k", "c", Some(first)),
            Err(CoreError::Stale)
        );
        assert_eq!(
            r.update(2, b"t", b"k", "c", None),
            Err(CoreError::NotTracked)
        );
        let p = r.lookup(1, b"t", b"k").unwrap();
        assert_eq!((p.meta, p.prev_ref), ("b", Some(first)));
        assert!(r.lookup(1, b"t", b"other").is_none());
    }

    #[test]
    fn changes_in_one_window_coalesce_into_one_diff() {
        let mut r = reg();
        assert!(r.track(1, b"t", b"a", "x", watch).unwrap().wake);
        assert!(!r.track(2, b"t", b"b", "x", watch).unwrap().wake);
        assert!(!r.track(3, b"u", b"c", "x", watch).unwrap().wake);
        let diffs = r.take_diffs(usize::MAX);
        assert_eq!(diffs.len(), 2);
        assert_eq!(diffs[0].topic.as_ref(), b"t");
        assert_eq!(diffs[0].joins().count(), 2);
        assert!(r.take_diffs(usize::MAX).is_empty());
        assert!(r.untrack(1, b"t", b"a").wake);
    }

    #[test]
    fn join_then_leave_in_one_window_sends_nothing() {
        let mut r = reg();
        r.track(1, b"t", b"a", "x", watch).unwrap();
        r.update(1, b"t", b"a", "y", None).unwrap();
        r.untrack_owner(1);
        let diffs = r.take_diffs(usize::MAX);
        assert!(diffs.iter().all(|d| d.parts(usize::MAX).is_empty()));
        assert_eq!(r.topic_count(), 0);
        assert_eq!(r.pending_topics(), 0);
    }

    #[test]
    fn update_after_a_sent_join_is_a_leave_and_a_join() {
        let mut r = reg();
        let old = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        r.take_diffs(usize::MAX);
        r.update(1, b"t", b"a", "y", None).unwrap();
        let diffs = r.take_diffs(usize::MAX);
        let leave = diffs[0].leaves().next().unwrap();
        let join = diffs[0].joins().next().unwrap();
        assert_eq!((leave.phx_ref, leave.meta), (old, "x"));
        assert_eq!((join.meta, join.prev_ref), ("y", Some(old)));
    }

    #[test]
    fn a_large_diff_comes_in_bounded_parts_that_cover_it_once() {
        let mut r = reg();
        for owner in 0..10u32 {
            r.track(owner, b"t", owner.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        r.take_diffs(usize::MAX);
        for owner in 0..3u32 {
            r.untrack_owner(owner);
        }
        for owner in 10..14u32 {
            r.track(owner, b"t", owner.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        let diffs = r.take_diffs(usize::MAX);
        let parts = diffs[0].parts(3);
        assert_eq!(
            parts
                .iter()
                .map(|(j, l)| j.len() + l.len())
                .collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let mut joined: Vec<u32> = parts
            .iter()
            .flat_map(|(j, _)| j.iter().map(|p| p.owner))
            .collect();
        let mut left: Vec<u32> = parts
            .iter()
            .flat_map(|(_, l)| l.iter().map(|p| p.owner))
            .collect();
        joined.sort();
        left.sort();
        assert_eq!((joined, left), (vec![10, 11, 12, 13], vec![0, 1, 2]));
        assert_eq!(diffs[0].parts(100).len(), 1);
    }

    #[test]
    fn take_diffs_respects_the_topic_budget() {
        let mut r = reg();
        for owner in 0..5u32 {
            r.track(owner, owner.to_string().as_bytes(), b"k", "m", watch)
                .unwrap();
        }
        assert_eq!(r.take_diffs(2).len(), 2);
        assert_eq!(r.pending_topics(), 3);
        assert_eq!(r.take_diffs(10).len(), 3);
    }
}
