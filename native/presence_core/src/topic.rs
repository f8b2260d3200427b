//! One topic: its presences, indexed for O(1) lookups, and what its
//! subscribers have not been told yet.
//!
//! Most topics are small: a per-user topic (`"user:42"`) holds one or a
//! few presences, and there may be a million of them. Such a topic holds
//! its presences in place and finds one by looking at each, with no index
//! to pay for; only past [`FEW`] presences does it grow indexes (by ref,
//! and by key) over copy-on-write chunks that listings snapshot.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use crate::cow_chunks::{CowChunks, Snapshot};
use crate::diff::{PendingDiff, TopicDiff};
use crate::key::{is_term_key, listed_key};
use crate::presence::{Bytes, Holder, Presence, Ref};
use crate::ref_hash::hash_ref;
use crate::sharded_map::ShardedTable;

/// Names a topic for as long as it lives: what an owner's locations point
/// at, 4 bytes instead of a copy of the name.
pub(crate) type TopicId = u32;

/// Where one presence lives: its topic and its ref there, 16 bytes. Its key
/// is the presence's: keeping it here too would cost 24 more.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Location {
    pub(crate) topic: TopicId,
    pub(crate) phx_ref: Ref,
}

/// Presences a topic holds without indexes. Finding one among them
/// compares at most this many keys; a topic that grows past it indexes its
/// presences, and one that shrinks to half of it drops the indexes again.
pub(crate) const FEW: usize = 8;

#[derive(Debug)]
pub(crate) struct Topic<O, M> {
    pub(crate) id: TopicId,
    pub(crate) name: Bytes,
    presences: Presences<O, M>,
    /// What subscribers have not been told yet; `Some` exactly while the
    /// topic waits in the registry's dirty queue.
    pub(crate) pending: Option<Box<PendingDiff<O, M>>>,
}

/// A topic's presences. A position names a presence until the next
/// insert or removal (a removal moves the last presence into its place).
#[derive(Debug)]
enum Presences<O, M> {
    None,
    One(Presence<O, M>),
    /// 2 to [`FEW`] presences, in a vector with no spare capacity.
    Few(Vec<Presence<O, M>>),
    Many(Box<Indexed<O, M>>),
}

/// The presences of a large topic, with their indexes. Index entries are
/// positions in `entries`, hashed and compared through the presence they
/// point at: 4 bytes an entry, no copy of a key or ref.
#[derive(Debug)]
struct Indexed<O, M> {
    entries: CowChunks<Presence<O, M>>,
    by_ref: ShardedTable<u32>,
    by_key: ShardedTable<KeySlot<O>>,
    /// Keys come from clients: hashed with a random key (SipHash).
    key_hasher: RandomState,
    /// `None` while every key is a binary: the common case pays nothing.
    term_keys: Option<Box<TermKeys>>,
}

/// The presences under one key, by owner: an owner has at most one
/// presence under a key on a topic. Most keys have one (one tab of one
/// user); a key shared by many (one user with many tabs, or a topic keyed
/// by a constant) stays O(1) to look up and change.
#[derive(Debug)]
// Boxed: inline, the map would make every key's slot 40 bytes larger.
#[allow(clippy::box_collection)]
enum KeySlot<O> {
    One(u32),
    Shared(Box<HashMap<Holder<O>, u32>>),
}

impl<O> KeySlot<O> {
    /// A position under this key, to read the key from.
    fn any(&self) -> u32 {
        match self {
            KeySlot::One(position) => *position,
            KeySlot::Shared(by_owner) => *by_owner.values().next().expect("never empty"),
        }
    }
}

/// What counting users takes when some keys are not binaries: those are
/// listed by their string, which a binary key or another term may share
/// (`42`, `"42"` and `:"42"` are one user, as `list/1` shows them).
#[derive(Debug, Default)]
struct TermKeys {
    /// Distinct term keys present.
    keys: usize,
    /// Distinct term keys present, by the string they are listed under.
    by_listed: HashMap<Bytes, usize>,
    /// Strings in `by_listed` that a binary key present is also listed
    /// under: counted once.
    shared: usize,
}

impl<O, M> Topic<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    pub(crate) fn new(id: TopicId, name: Bytes) -> Self {
        Self {
            id,
            name,
            presences: Presences::None,
            pending: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.presences {
            Presences::None => 0,
            Presences::One(_) => 1,
            Presences::Few(few) => few.len(),
            Presences::Many(many) => many.entries.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self.presences, Presences::None)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Presence<O, M>> {
        self.presences.iter()
    }

    fn few(&self) -> &[Presence<O, M>] {
        self.presences.few()
    }

    /// The pending diff, which the change under way opened (see
    /// `Registry::begin_change`).
    pub(crate) fn pending(&mut self) -> &mut PendingDiff<O, M> {
        self.pending
            .as_mut()
            .expect("a change opens the pending diff first")
    }

    /// Notes the join of the presence at `position`: as a diff of its own
    /// (`own_diff`, `diff_window: 0`) or to be found when the diff is taken.
    /// `next_seq` is the seq the next change will have.
    pub(crate) fn record_join(&mut self, position: usize, own_diff: bool, next_seq: u64) {
        if !own_diff {
            self.pending().coalesced_joins = true;
            return;
        }
        let presence = self.get(position).expect("joined above").clone();
        let pending = self.pending();
        pending.push_op(0, Vec::from([presence]), Vec::new());
        // Sent with its op: coalescing, were it switched on before the
        // next take, must neither send it again nor cancel its leave.
        pending.joins_from_seq = next_seq;
    }

    /// See [`PendingDiff::seal`].
    pub(crate) fn seal(&mut self, next_seq: u64) {
        if let Some(pending) = &mut self.pending {
            pending.seal(self.presences.iter(), next_seq);
        }
    }

    /// What taking this topic's diff costs (see [`PendingDiff::work`]).
    pub(crate) fn diff_work(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |p| p.work(self.changed_len()))
    }

    /// The presences among which those that joined since the last diff
    /// are: a large topic's chunks written since, a small one's all.
    fn changed_len(&self) -> usize {
        match &self.presences {
            Presences::Many(many) => many.entries.written_len(),
            _ => self.len(),
        }
    }

    /// Takes the pending diff: moves what was recorded, and snapshots the
    /// presences among which its joins are, if it has some: for a large
    /// topic, only the chunks written since the last diff.
    pub(crate) fn take_diff(&mut self) -> Option<TopicDiff<O, M>> {
        let pending = self.pending.take()?;
        let wanted = pending.coalesced_joins;
        let entries = match &mut self.presences {
            Presences::Many(many) if wanted => Some(many.entries.snapshot_written()),
            Presences::Many(many) => {
                many.entries.clear_written();
                None
            }
            Presences::None => None,
            few => wanted.then(|| Snapshot::owned(few.iter().cloned().collect())),
        };
        Some(pending.into_diff(self.name.clone(), entries))
    }

    /// A consistent view of the presences, to walk without the registry's
    /// lock: chunks shared with the topic when it is large, a copy of its
    /// few presences otherwise.
    pub(crate) fn snapshot(&self) -> Snapshot<Presence<O, M>> {
        match &self.presences {
            Presences::Many(many) => many.entries.snapshot(),
            _ => Snapshot::owned(self.iter().cloned().collect()),
        }
    }

    /// Distinct keys as listed: Drab's `count_users/1` on Phoenix counts
    /// the keys of `list/1`, strings. O(1) for a large topic; a small one
    /// compares its few keys.
    pub(crate) fn users(&self) -> usize {
        match &self.presences {
            Presences::None => 0,
            Presences::One(_) => 1,
            Presences::Few(few) => few
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    let listed = listed_key(&p.key);
                    !few[..*i].iter().any(|q| listed_key(&q.key) == listed)
                })
                .count(),
            Presences::Many(many) => many.users(),
        }
    }

    pub(crate) fn get(&self, position: usize) -> Option<&Presence<O, M>> {
        match &self.presences {
            Presences::None => None,
            Presences::One(only) => (position == 0).then_some(only),
            Presences::Few(few) => few.get(position),
            Presences::Many(many) => many.entries.get(position),
        }
    }

    /// The position of `owner`'s presence under `key`: O(1).
    pub(crate) fn find(&self, owner: &Holder<O>, key: &[u8]) -> Option<usize> {
        match &self.presences {
            Presences::Many(many) => many.find(owner, key),
            _ => self
                .few()
                .iter()
                .position(|p| p.owner == *owner && *p.key == *key),
        }
    }

    /// The position of the presence with `phx_ref`, if it is on this topic.
    pub(crate) fn position_of(&self, phx_ref: Ref) -> Option<usize> {
        match &self.presences {
            Presences::Many(many) => many.position_of(phx_ref),
            _ => self.few().iter().position(|p| p.phx_ref == phx_ref),
        }
    }

    /// Whether a key here is not a binary (listed under its string, maybe
    /// with others).
    pub(crate) fn has_term_keys(&self) -> bool {
        match &self.presences {
            Presences::Many(many) => many.term_keys.is_some(),
            _ => self.few().iter().any(|p| is_term_key(&p.key)),
        }
    }

    /// How many presences `key` has here.
    pub(crate) fn key_len(&self, key: &[u8]) -> usize {
        match &self.presences {
            Presences::Many(many) => match many.slot(key) {
                None => 0,
                Some(KeySlot::One(_)) => 1,
                Some(KeySlot::Shared(by_owner)) => by_owner.len(),
            },
            _ => self.few().iter().filter(|p| *p.key == *key).count(),
        }
    }

    /// The presences under `key`, cloned.
    pub(crate) fn by_key(&self, key: &[u8]) -> Vec<Presence<O, M>> {
        match &self.presences {
            Presences::Many(many) => {
                let positions: Vec<u32> = match many.slot(key) {
                    None => Vec::new(),
                    Some(KeySlot::One(position)) => vec![*position],
                    Some(KeySlot::Shared(by_owner)) => by_owner.values().copied().collect(),
                };
                positions
                    .into_iter()
                    .filter_map(|position| many.entries.get(position as usize).cloned())
                    .collect()
            }
            _ => self
                .few()
                .iter()
                .filter(|p| *p.key == *key)
                .cloned()
                .collect(),
        }
    }

    /// `key` as a presence here already holds it, so that the presences
    /// of one key share one allocation when the key is too long to be
    /// held inline.
    pub(crate) fn shared_key(&self, key: &[u8]) -> Bytes {
        let existing = match &self.presences {
            Presences::Many(many) => many
                .slot(key)
                .and_then(|slot| many.entries.get(slot.any() as usize)),
            _ => self.few().iter().find(|p| *p.key == *key),
        };
        existing.map_or_else(|| Bytes::from(key), |p| p.key.clone())
    }

    /// Adds `presence`; returns its position.
    pub(crate) fn insert(&mut self, presence: Presence<O, M>) -> usize {
        match std::mem::replace(&mut self.presences, Presences::None) {
            Presences::None => {
                self.presences = Presences::One(presence);
                0
            }
            Presences::One(only) => {
                self.presences = Presences::Few(vec![only, presence]);
                1
            }
            Presences::Few(mut few) if few.len() < FEW => {
                few.reserve_exact(1);
                few.push(presence);
                self.presences = Presences::Few(few);
                self.len() - 1
            }
            Presences::Few(few) => {
                let mut many = Indexed::from(few);
                let position = many.insert(presence);
                self.presences = Presences::Many(Box::new(many));
                position
            }
            Presences::Many(mut many) => {
                let position = many.insert(presence);
                self.presences = Presences::Many(many);
                position
            }
        }
    }

    /// Removes the presence at `position`, moving the last one into it.
    pub(crate) fn remove(&mut self, position: usize) -> Option<Presence<O, M>> {
        if position >= self.len() {
            return None;
        }
        let removed = match std::mem::replace(&mut self.presences, Presences::None) {
            Presences::None => unreachable!("checked above"),
            Presences::One(only) => only,
            Presences::Few(mut few) => {
                let removed = few.swap_remove(position);
                self.presences = Presences::from(few);
                removed
            }
            Presences::Many(mut many) => {
                let removed = many.remove(position);
                self.presences = if many.entries.len() <= FEW / 2 {
                    Presences::from(many.entries.iter().cloned().collect::<Vec<_>>())
                } else {
                    Presences::Many(many)
                };
                removed
            }
        };
        Some(removed)
    }

    /// Gives the presence at `position` a new meta and ref, remembering the
    /// old ref; returns it as it was before.
    pub(crate) fn replace(
        &mut self,
        position: usize,
        meta: M,
        new_ref: Ref,
        seq: u64,
    ) -> Presence<O, M> {
        let before = self.get(position).expect("positions are in bounds").clone();
        let slot = match &mut self.presences {
            Presences::None => unreachable!("positions are in bounds"),
            Presences::One(only) => only,
            Presences::Few(few) => &mut few[position],
            Presences::Many(many) => many.rename(position, before.phx_ref, new_ref),
        };
        slot.meta = meta;
        slot.phx_ref = new_ref;
        slot.prev_ref = crate::presence::prev_ref(Some(before.phx_ref));
        slot.seq = seq;
        before
    }
}

impl<O, M> Presences<O, M> {
    fn iter(&self) -> impl Iterator<Item = &Presence<O, M>> {
        let many = match self {
            Presences::Many(many) => Some(many),
            _ => None,
        };
        self.few()
            .iter()
            .chain(many.into_iter().flat_map(|many| many.entries.iter()))
    }

    /// The presences of a topic without indexes (none for one with them).
    fn few(&self) -> &[Presence<O, M>] {
        match self {
            Presences::One(only) => std::slice::from_ref(only),
            Presences::Few(few) => few,
            Presences::None | Presences::Many(_) => &[],
        }
    }
}

impl<O, M> From<Vec<Presence<O, M>>> for Presences<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    /// Held as their number calls for, with no spare capacity.
    fn from(mut presences: Vec<Presence<O, M>>) -> Self {
        match presences.len() {
            0 => Presences::None,
            1 => Presences::One(presences.pop().expect("one")),
            n if n <= FEW => {
                presences.shrink_to_fit();
                Presences::Few(presences)
            }
            _ => Presences::Many(Box::new(Indexed::from(presences))),
        }
    }
}

impl<O, M> From<Vec<Presence<O, M>>> for Indexed<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    fn from(presences: Vec<Presence<O, M>>) -> Self {
        let mut many = Indexed {
            entries: CowChunks::default(),
            by_ref: ShardedTable::default(),
            by_key: ShardedTable::default(),
            key_hasher: RandomState::new(),
            term_keys: None,
        };
        for presence in presences {
            many.insert(presence);
        }
        many
    }
}

impl<O, M> Indexed<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    fn key_hash(&self, key: &[u8]) -> u64 {
        self.key_hasher.hash_one(key)
    }

    fn slot(&self, key: &[u8]) -> Option<&KeySlot<O>> {
        let entries = &self.entries;
        self.by_key.find(self.key_hash(key), |slot| {
            *entries.get(slot.any() as usize).expect("indexed").key == *key
        })
    }

    fn find(&self, owner: &Holder<O>, key: &[u8]) -> Option<usize> {
        let position = match self.slot(key)? {
            KeySlot::One(position) => *position,
            KeySlot::Shared(by_owner) => *by_owner.get(owner)?,
        };
        let position = position as usize;
        (self.entries.get(position)?.owner == *owner).then_some(position)
    }

    fn position_of(&self, phx_ref: Ref) -> Option<usize> {
        let entries = &self.entries;
        self.by_ref
            .find(hash_ref(phx_ref), |&position| {
                entries.get(position as usize).expect("indexed").phx_ref == phx_ref
            })
            .map(|&position| position as usize)
    }

    fn users(&self) -> usize {
        match &self.term_keys {
            None => self.by_key.len(),
            Some(t) => self.by_key.len() - t.keys + t.by_listed.len() - t.shared,
        }
    }

    fn insert(&mut self, presence: Presence<O, M>) -> usize {
        let key_hash = self.key_hash(&presence.key);
        let (phx_ref, owner, key) = (presence.phx_ref, presence.owner, presence.key.clone());
        let position = self.entries.push(presence);
        let at = position as u32;
        let Indexed {
            entries,
            by_ref,
            by_key,
            key_hasher,
            ..
        } = self;
        by_ref.insert_unique(hash_ref(phx_ref), at, |&p| {
            hash_ref(entries.get(p as usize).expect("indexed").phx_ref)
        });
        let slot = by_key.find_mut(key_hash, |slot| {
            *entries.get(slot.any() as usize).expect("indexed").key == *key
        });
        match slot {
            Some(KeySlot::Shared(by_owner)) => {
                by_owner.insert(owner, at);
            }
            Some(slot) => {
                let KeySlot::One(first) = *slot else {
                    unreachable!("matched above")
                };
                let first_owner = entries.get(first as usize).expect("indexed").owner;
                *slot =
                    KeySlot::Shared(Box::new(HashMap::from([(first_owner, first), (owner, at)])));
            }
            None => {
                by_key.insert_unique(key_hash, KeySlot::One(at), |slot| {
                    let key = &entries.get(slot.any() as usize).expect("indexed").key;
                    key_hasher.hash_one(&**key)
                });
                self.key_added(&key);
            }
        }
        position
    }

    fn remove(&mut self, position: usize) -> Presence<O, M> {
        let at = position as u32;
        let (phx_ref, owner, key) = {
            let p = self.entries.get(position).expect("positions are in bounds");
            (p.phx_ref, p.owner, p.key.clone())
        };
        let key_hash = self.key_hash(&key);
        let Indexed {
            entries,
            by_ref,
            by_key,
            key_hasher,
            ..
        } = self;
        by_ref.remove(
            hash_ref(phx_ref),
            |&p| p == at,
            |&p| hash_ref(entries.get(p as usize).expect("indexed").phx_ref),
        );
        let key_of = |slot: &KeySlot<O>| {
            let key = &entries.get(slot.any() as usize).expect("indexed").key;
            key_hasher.hash_one(&**key)
        };
        let matches_key =
            |slot: &KeySlot<O>| *entries.get(slot.any() as usize).expect("indexed").key == *key;
        let slot = by_key
            .find_mut(key_hash, matches_key)
            .expect("every entry's key is indexed");
        let key_gone = match slot {
            KeySlot::Shared(by_owner) => {
                by_owner.remove(&owner);
                if by_owner.len() == 1 {
                    let only = *by_owner.values().next().expect("one left");
                    *slot = KeySlot::One(only);
                }
                false
            }
            KeySlot::One(_) => {
                by_key.remove(key_hash, matches_key, key_of);
                true
            }
        };
        if key_gone {
            self.key_removed(&key);
        }
        let removed = self
            .entries
            .swap_remove(position)
            .expect("positions are in bounds");
        if position < self.entries.len() {
            self.moved(self.entries.len() as u32, at);
        }
        removed
    }

    /// The presence at position `from` (the last) now stands at `to`.
    fn moved(&mut self, from: u32, to: u32) {
        let (phx_ref, owner, key) = {
            let p = self.entries.get(to as usize).expect("just moved");
            (p.phx_ref, p.owner, p.key.clone())
        };
        let key_hash = self.key_hash(&key);
        // The index entries still name `from`, which no longer exists:
        // they are found by position, never by reading the presence.
        let by_ref = self
            .by_ref
            .find_mut(hash_ref(phx_ref), |&p| p == from)
            .expect("every entry's ref is indexed");
        *by_ref = to;
        // Positions are unique across slots: the one naming `from` is it.
        let slot = self
            .by_key
            .find_mut(key_hash, |slot| match slot {
                KeySlot::One(p) => *p == from,
                KeySlot::Shared(by_owner) => by_owner.get(&owner) == Some(&from),
            })
            .expect("every entry's key is indexed");
        match slot {
            KeySlot::One(p) => *p = to,
            KeySlot::Shared(by_owner) => {
                by_owner.insert(owner, to);
            }
        }
    }

    /// The presence at `position` takes `new_ref`: its ref index follows.
    fn rename(&mut self, position: usize, old_ref: Ref, new_ref: Ref) -> &mut Presence<O, M> {
        let at = position as u32;
        let entries = &self.entries;
        let rehash = |&p: &u32| hash_ref(entries.get(p as usize).expect("indexed").phx_ref);
        self.by_ref.remove(hash_ref(old_ref), |&p| p == at, rehash);
        let presence = self
            .entries
            .get_mut(position)
            .expect("positions are in bounds");
        presence.phx_ref = new_ref;
        let entries = &self.entries;
        self.by_ref.insert_unique(hash_ref(new_ref), at, |&p| {
            hash_ref(entries.get(p as usize).expect("indexed").phx_ref)
        });
        self.entries
            .get_mut(position)
            .expect("positions are in bounds")
    }

    /// Counts `key`, which has just got its first presence here.
    fn key_added(&mut self, key: &Bytes) {
        if is_term_key(key) {
            let listed = listed_key(key);
            let binary_there = self.slot(listed).is_some();
            let terms = self.term_keys.get_or_insert_with(Box::default);
            terms.keys += 1;
            let same = terms.by_listed.entry(Bytes::from(listed)).or_insert(0);
            *same += 1;
            if *same == 1 && binary_there {
                terms.shared += 1;
            }
        } else if let Some(terms) = &mut self.term_keys {
            if terms.by_listed.contains_key(&**key) {
                terms.shared += 1;
            }
        }
    }

    /// Uncounts `key`, whose last presence here has just gone.
    fn key_removed(&mut self, key: &Bytes) {
        if is_term_key(key) {
            let listed = listed_key(key);
            let binary_there = self.slot(listed).is_some();
            let terms = self.term_keys.as_mut().expect("counted when added");
            terms.keys -= 1;
            let same = terms.by_listed.get_mut(listed).expect("counted when added");
            *same -= 1;
            if *same == 0 {
                terms.by_listed.remove(listed);
                if binary_there {
                    terms.shared -= 1;
                }
            }
            if terms.keys == 0 {
                self.term_keys = None;
            }
        } else if let Some(terms) = &mut self.term_keys {
            if terms.by_listed.contains_key(&**key) {
                terms.shared -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::term_key;
    use proptest::prelude::*;

    type T = Topic<u8, u8>;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, usize, u8),
        Remove(usize),
        Replace(usize, u8),
    }

    fn keys() -> Vec<Vec<u8>> {
        vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"a-long-key-of-more-than-23-bytes".to_vec(),
            term_key(b"a", b"\x83a\x01"),
            term_key(b"c", b"\x83a\x02"),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..12, 0..5usize, 0u8..3).prop_map(|(o, k, m)| Op::Insert(o, k, m)),
            3 => (0..64usize).prop_map(Op::Remove),
            2 => (0..64usize, 0u8..3).prop_map(|(i, m)| Op::Replace(i, m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Through every size and its changes of representation (one, a
        /// few, indexed, and back), lookups agree with a plain list.
        #[test]
        fn a_topic_agrees_with_a_list(ops in proptest::collection::vec(op(), 1..200)) {
            let keys = keys();
            let mut topic = T::new(0, Bytes::from("t"));
            let mut model: Vec<(u8, usize, Ref, u8)> = Vec::new();
            let mut next_ref: Ref = 1;
            for op in ops {
                match op {
                    Op::Insert(o, k, m) => {
                        if model.iter().any(|e| e.0 == o && e.1 == k) {
                            continue;
                        }
                        next_ref += 1;
                        let key = topic.shared_key(&keys[k]);
                        topic.insert(Presence {
                            owner: Holder::Local(o),
                            key,
                            meta: m,
                            phx_ref: next_ref,
                            prev_ref: None,
                            seq: next_ref,
                        });
                        model.push((o, k, next_ref, m));
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (_, _, r, _) = model.remove(i % model.len());
                        let at = topic.position_of(r).expect("present");
                        prop_assert_eq!(topic.remove(at).map(|p| p.phx_ref), Some(r));
                    }
                    Op::Replace(i, m) if !model.is_empty() => {
                        let entry = i % model.len();
                        let (o, k, r, _) = model[entry];
                        next_ref += 1;
                        let at = topic.find(&Holder::Local(o), &keys[k]).expect("present");
                        let before = topic.replace(at, m, next_ref, next_ref);
                        prop_assert_eq!(before.phx_ref, r);
                        model[entry] = (o, k, next_ref, m);
                    }
                    _ => continue,
                }
                prop_assert_eq!(topic.len(), model.len());
                prop_assert_eq!(topic.iter().count(), model.len());
                prop_assert_eq!(topic.snapshot().len(), model.len());
                for &(o, k, r, m) in &model {
                    let at = topic.find(&Holder::Local(o), &keys[k]).expect("found by owner and key");
                    let p = topic.get(at).unwrap();
                    prop_assert_eq!((p.phx_ref, p.meta), (r, m));
                    prop_assert_eq!(topic.position_of(r), Some(at));
                }
                for (k, key) in keys.iter().enumerate() {
                    let mut want: Vec<Ref> = model.iter().filter(|e| e.1 == k).map(|e| e.2).collect();
                    let mut got: Vec<Ref> = topic.by_key(key).iter().map(|p| p.phx_ref).collect();
                    want.sort();
                    got.sort();
                    prop_assert_eq!(topic.key_len(key), want.len());
                    prop_assert_eq!(got, want);
                }
                let users: std::collections::BTreeSet<&[u8]> =
                    model.iter().map(|e| listed_key(&keys[e.1])).collect();
                prop_assert_eq!(topic.users(), users.len());
            }
        }
    }

    #[test]
    fn presences_of_one_long_key_share_its_bytes() {
        let mut topic = T::new(0, Bytes::from("t"));
        let key = b"a-long-key-of-more-than-23-bytes";
        for owner in 0..12u8 {
            let shared = topic.shared_key(key);
            topic.insert(Presence {
                owner: Holder::Local(owner),
                key: shared,
                meta: 0,
                phx_ref: u64::from(owner) + 1,
                prev_ref: None,
                seq: 0,
            });
        }
        let first = topic.get(0).unwrap().key.as_ptr();
        assert!(topic.iter().all(|p| p.key.as_ptr() == first));
    }
}
