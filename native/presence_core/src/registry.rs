//! The presence table: topics, owners and replicas, and the order of
//! changes that diffs are cut from.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::cow_chunks::Snapshot;
use crate::delta::RemoteJoin;
use crate::diff::{PendingDiff, TopicDiff};
use crate::error::CoreError;
use crate::listing::{ListingChanges, ListingWatches, WatchId};
use crate::owner::{Departure, OwnerEntry};
use crate::phx_ref::RefGen;
use crate::presence::{
    prev_ref, Bytes, Change, Counts, Holder, Presence, Ref, Removed, ReplicaId, Update,
};
use crate::replica::ReplicaSet;
use crate::sharded_map::ShardedMap;
use crate::topic::{Location, Topic, TopicId};
use crate::topics::Topics;

/// Capacity the dirty queue keeps however empty it gets.
const MIN_KEPT_DIRTY: usize = 64;

/// The presence table.
///
/// * `O` identifies an owner (a process).
/// * `M` is a meta; equality decides whether an update is a no-op.
/// * `W` is what watches a live owner (a monitor); one per owner, created on
///   its first presence and handed back when its last one goes.
///
/// Every operation on one presence is O(1), whatever the size of its topic
/// or the number of presences its owner has.
#[derive(Debug)]
pub struct Registry<O, M, W> {
    pub(crate) topics: Topics<O, M>,
    owners: ShardedMap<O, OwnerEntry<W>>,
    /// Other nodes' presences, by replica (see `replica.rs`).
    replicas: HashMap<ReplicaId, ReplicaSet>,
    /// Topics with a pending diff, in the order they first changed.
    dirty: VecDeque<TopicId>,
    pub(crate) refs: RefGen,
    pub(crate) presences: usize,
    /// Topics with presences: a counter, so that stats never walk them
    /// under the lock.
    pub(crate) occupied_topics: usize,
    /// `diff_window: 0`: every operation is recorded as a diff of its own
    /// instead of being coalesced (see [`Registry::set_diff_per_operation`]).
    pub(crate) diff_per_operation: bool,
    /// The last group handed to a departure (see [`crate::diff::Op`]).
    last_group: u64,
    /// Topics whose listing the caller keeps a copy of (see `listing.rs`).
    listings: ListingWatches,
}

impl<O, M, W> Registry<O, M, W>
where
    O: Copy + Eq + Hash,
    M: Clone + PartialEq,
{
    /// `ref_seed` should be random, so refs from different registries differ.
    pub fn new(ref_seed: u64) -> Self {
        Self {
            topics: Topics::default(),
            owners: ShardedMap::default(),
            replicas: HashMap::new(),
            dirty: VecDeque::new(),
            refs: RefGen::new(ref_seed),
            presences: 0,
            occupied_topics: 0,
            diff_per_operation: false,
            last_group: 0,
            listings: ListingWatches::default(),
        }
    }

    /// Switches between coalescing a topic's changes until its diff is
    /// taken (the default) and recording each operation as a diff of its
    /// own, in order, with nothing cancelled or merged (Phoenix.Presence's
    /// behaviour, `diff_window: 0`). Switching on with diffs pending turns
    /// each pending diff into one operation first: O(presences of those
    /// topics), once.
    pub fn set_diff_per_operation(&mut self, on: bool) {
        if on && !self.diff_per_operation {
            let next_seq = self.refs.next_seq();
            for &id in &self.dirty {
                if let Some(topic) = self.topics.get_mut(id) {
                    topic.seal(next_seq);
                }
            }
        }
        self.diff_per_operation = on;
    }

    /// Whether each operation is its own diff (see [`Registry::set_diff_per_operation`]).
    pub fn diff_per_operation(&self) -> bool {
        self.diff_per_operation
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
        self.track_as(owner, topic, key, meta, None, watch)
    }

    /// [`Registry::track`], with the ref made by the caller when it is
    /// `Some`: a sidecar whose callers decide their writes before it applies
    /// them hands out refs itself. Such a ref must be unique among the
    /// registry's presences; the registry's own start from a random seed.
    pub fn track_as(
        &mut self,
        owner: O,
        topic: &[u8],
        key: &[u8],
        meta: M,
        phx_ref: Option<Ref>,
        watch: impl FnOnce() -> Option<W>,
    ) -> Result<Change, CoreError> {
        if self.find(&owner, topic, key).is_some() {
            return Err(CoreError::AlreadyTracked);
        }
        let new_watch = match self.owners.get(&owner) {
            Some(_) => None,
            None => Some(watch().ok_or(CoreError::OwnerGone)?),
        };

        let id = self.topics.intern(topic);
        let wake = self.begin_change(id);
        let (phx_ref, seq) = self.refs.next(phx_ref);
        let next_seq = self.refs.next_seq();
        let entry = self.topics.get_mut(id).expect("interned above");
        let key = entry.shared_key(key);
        self.occupied_topics += usize::from(entry.is_empty());
        self.listings.note(id, &key);
        let position = entry.insert(Presence {
            owner: Holder::Local(owner),
            key,
            meta,
            phx_ref,
            prev_ref: None,
            seq,
        });
        entry.record_join(position, self.diff_per_operation, next_seq);
        self.presences += 1;
        let location = Location { topic: id, phx_ref };
        match new_watch {
            Some(watch) => {
                self.owners.insert(owner, OwnerEntry::new(watch, location));
            }
            None => self
                .owners
                .get_mut(&owner)
                .expect("checked above")
                .add(location),
        }
        Ok(Change { phx_ref, wake })
    }

    /// A track of an owner that is already gone, answered as Phoenix
    /// answers it: with a ref, the presence leaving at once. Nothing is
    /// kept, so nothing is listed or counted. Coalescing, the join and its
    /// leave cancel out; with single operations, both are sent, as
    /// Phoenix sends them.
    pub fn track_gone(&mut self, owner: O, topic: &[u8], key: &[u8], meta: M) -> Change {
        if !self.diff_per_operation {
            let (phx_ref, _) = self.refs.next(None);
            return Change {
                phx_ref,
                wake: false,
            };
        }
        let id = self.topics.intern(topic);
        let wake = self.begin_change(id);
        let (phx_ref, seq) = self.refs.next(None);
        let next_seq = self.refs.next_seq();
        let entry = self.topics.get_mut(id).expect("interned above");
        let presence = Presence {
            owner: Holder::Local(owner),
            key: entry.shared_key(key),
            meta,
            phx_ref,
            prev_ref: None,
            seq,
        };
        let pending = entry.pending();
        pending.push_op(0, Vec::from([presence.clone()]), Vec::new());
        pending.push_op(0, Vec::new(), Vec::from([presence]));
        pending.joins_from_seq = next_seq;
        Change { phx_ref, wake }
    }

    /// Removes the presence of `owner` under `key` on `topic`, if any.
    pub fn untrack(&mut self, owner: O, topic: &[u8], key: &[u8]) -> Removed<W> {
        let Some((id, phx_ref, _)) = self.find(&owner, topic, key) else {
            return Removed::nothing();
        };
        // A departed owner's presences are still listed until their chunk
        // is removed; they are the departure's to remove.
        let Some(owner_entry) = self.owners.get_mut(&owner) else {
            return Removed::nothing();
        };
        let released_watch = if owner_entry.remove(phx_ref) {
            self.owners.remove(&owner).map(|last| last.watch)
        } else {
            None
        };
        let wake = self.remove_presence(id, phx_ref);
        Removed {
            removed: 1,
            wake,
            released_watch,
        }
    }

    /// Detaches every presence of `owner` (it exited, or is untracked
    /// everywhere), returning its watch and a [`Departure`] to remove them
    /// with [`Registry::remove_departed`]. O(1).
    ///
    /// Until removed, the presences are still listed and counted, but no
    /// longer the owner's: they can be neither updated nor untracked one by
    /// one.
    pub fn depart(&mut self, owner: O) -> Option<(W, Departure)> {
        Some(self.owners.remove(&owner)?.depart())
    }

    /// Removes up to `max` presences of `departure`; returns what it removed.
    pub fn remove_departed(&mut self, departure: &mut Departure, max: usize) -> Removed<W> {
        let mut removed = Removed::nothing();
        if departure.group == 0 {
            self.last_group += 1;
            departure.group = self.last_group;
        }
        for location in departure.take(max) {
            if self.topic_has(location.topic, location.phx_ref) {
                removed.wake |=
                    self.remove_presence_in(location.topic, location.phx_ref, departure.group);
                removed.removed += 1;
            }
        }
        removed
    }

    /// Removes every presence of `owner` at once: `depart` and
    /// `remove_departed` in one step.
    pub fn untrack_owner(&mut self, owner: O) -> Removed<W> {
        let Some((watch, mut departure)) = self.depart(owner) else {
            return Removed::nothing();
        };
        let mut removed = self.remove_departed(&mut departure, usize::MAX);
        removed.released_watch = Some(watch);
        removed
    }

    /// The presence of `owner` under `key` on `topic`, for read-modify-write
    /// updates.
    pub fn lookup(&self, owner: O, topic: &[u8], key: &[u8]) -> Option<&Presence<O, M>> {
        let entry = self.topics.named(topic)?;
        entry.get(entry.find(&Holder::Local(owner), key)?)
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
        self.update_as(owner, topic, key, meta, expected_ref, None)
    }

    /// [`Registry::update`], with the new ref made by the caller when it is
    /// `Some` (see [`Registry::track_as`]).
    pub fn update_as(
        &mut self,
        owner: O,
        topic: &[u8],
        key: &[u8],
        meta: M,
        expected_ref: Option<Ref>,
        new_ref: Option<Ref>,
    ) -> Result<Update, CoreError> {
        let (id, old_ref, position) = self.find(&owner, topic, key).ok_or(CoreError::NotTracked)?;
        if self.owners.get(&owner).is_none() {
            return Err(CoreError::NotTracked);
        }
        if expected_ref.is_some_and(|expected| expected != old_ref) {
            return Err(CoreError::Stale);
        }
        let entry = self.topics.get(id).expect("found above");
        if entry.get(position).expect("found above").meta == meta {
            return Ok(Update::Unchanged(old_ref));
        }

        let wake = self.begin_change(id);
        let (new_ref, seq) = self.refs.next(new_ref);
        let next_seq = self.refs.next_seq();
        let entry = self.topics.get_mut(id).expect("found above");
        let before = entry.replace(position, meta, new_ref, seq);
        self.listings.note(id, &before.key);
        if self.diff_per_operation {
            // Phoenix's update: the old meta leaves, the new one joins, in
            // one diff.
            let after = entry.get(position).expect("replaced above").clone();
            let pending = entry.pending();
            pending.push_op(0, Vec::from([after]), Vec::from([before]));
            pending.joins_from_seq = next_seq;
        } else {
            let pending = entry.pending();
            pending.record_leave(before);
            pending.coalesced_joins = true;
        }
        self.owners
            .get_mut(&owner)
            .expect("checked above")
            .rename(old_ref, new_ref);
        Ok(Update::Changed(Change {
            phx_ref: new_ref,
            wake,
        }))
    }

    /// Users and connections on `topic`, from counters: O(1).
    pub fn counts(&self, topic: &[u8]) -> Counts {
        self.topics
            .named(topic)
            .map_or(Counts::default(), |t| Counts {
                users: t.users(),
                connections: t.len(),
            })
    }

    /// A consistent view of every presence on `topic`, taken in
    /// O(entries / CHUNK_LEN); walking it needs no lock on the registry.
    pub fn snapshot(&self, topic: &[u8]) -> Option<Snapshot<Presence<O, M>>> {
        self.topics
            .named(topic)
            .filter(|t| !t.is_empty())
            .map(|t| t.snapshot())
    }

    /// Starts recording which listed keys of `topic` change, for a copy of
    /// its listing made now (see `listing.rs`). `None` when the topic is
    /// empty.
    pub fn watch_listing(&mut self, topic: &[u8]) -> Option<WatchId> {
        let t = self.topics.named(topic).filter(|t| !t.is_empty())?;
        let id = t.id;
        Some(self.listings.watch(id))
    }

    /// Stops recording for `watch`, whose copy was dropped.
    pub fn unwatch_listing(&mut self, topic: &[u8], watch: WatchId) {
        if let Some(t) = self.topics.named(topic) {
            let id = t.id;
            self.listings.unwatch(id, watch);
        }
    }

    /// Whether a copy of `topic`'s listing is being kept up to date.
    pub fn is_listing_watched(&self, topic: &[u8]) -> bool {
        self.topics
            .named(topic)
            .is_some_and(|t| self.listings.is_watched(t.id))
    }

    /// Changes recorded for `watch` so far (a key changed twice counts
    /// twice), `None` when the watch is lost; takes nothing.
    pub fn listing_changes_pending(&self, topic: &[u8], watch: WatchId) -> Option<usize> {
        let t = self.topics.named(topic)?;
        self.listings.pending(t.id, watch)
    }

    /// The keys of `topic` whose presences changed since `watch` started or
    /// was last asked, each once; [`ListingChanges::Lost`] when the copy
    /// must be built again.
    pub fn take_listing_changes(&mut self, topic: &[u8], watch: WatchId) -> ListingChanges {
        match self.topics.named(topic) {
            Some(t) => {
                let id = t.id;
                self.listings.take(id, watch)
            }
            None => ListingChanges::Lost,
        }
    }

    /// The presences listed under each of `listed` (strings, as
    /// [`ListingChanges::Keys`] gives them), in that order: for a topic
    /// whose keys are all binaries, one lookup a key; otherwise one pass
    /// over the topic, since term keys are not indexed by their string.
    pub fn listed_under(
        &self,
        topic: &[u8],
        listed: Vec<Bytes>,
    ) -> Vec<(Bytes, Vec<Presence<O, M>>)> {
        let Some(t) = self.topics.named(topic) else {
            return listed.into_iter().map(|key| (key, Vec::new())).collect();
        };
        if !t.has_term_keys() {
            return listed
                .into_iter()
                .map(|key| {
                    let presences = t.by_key(&key);
                    (key, presences)
                })
                .collect();
        }
        let index: HashMap<Bytes, usize> = listed
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect();
        let mut grouped: Vec<(Bytes, Vec<Presence<O, M>>)> =
            listed.into_iter().map(|key| (key, Vec::new())).collect();
        for presence in t.iter() {
            if let Some(&i) = index.get(crate::key::listed_key(&presence.key)) {
                grouped[i].1.push(presence.clone());
            }
        }
        grouped
    }

    /// Presences on `topic`: O(1).
    pub fn topic_len(&self, topic: &[u8]) -> usize {
        self.topics.named(topic).map_or(0, |t| t.len())
    }

    /// Notes that `topic` is being listed (or a key of it read): a client
    /// may sync from what it shows, so every presence on it now must have
    /// its leave sent, even one whose join has not been sent yet. Call it
    /// with the snapshot or lookup, under the same lock. O(1).
    pub fn observe(&mut self, topic: &[u8]) {
        let next_seq = self.refs.next_seq();
        if let Some(pending) = self
            .topics
            .named_mut(topic)
            .and_then(|t| t.pending.as_mut())
        {
            pending.observed_before_seq = next_seq;
        }
    }

    /// How many presences `key` has on `topic`: O(1).
    pub fn key_len(&self, topic: &[u8], key: &[u8]) -> usize {
        self.topics.named(topic).map_or(0, |t| t.key_len(key))
    }

    /// The presences under `key` on `topic`: O(presences under the key).
    pub fn get_by_key(&self, topic: &[u8], key: &[u8]) -> Vec<Presence<O, M>> {
        self.topics
            .named(topic)
            .map_or_else(Vec::new, |t| t.by_key(key))
    }

    /// The work of taking the oldest pending diff: presences its joins are
    /// looked for among, and its leaves.
    pub fn next_diff_work(&self) -> usize {
        self.dirty
            .front()
            .and_then(|&id| self.topics.get(id))
            .map_or(0, Topic::diff_work)
    }

    /// Takes the pending diffs of up to `max_topics` topics, oldest first,
    /// stopping before `max_work` (see [`Registry::next_diff_work`]) is
    /// passed, though always taking one. Under the lock this only moves the
    /// leaves and snapshots the topic; finding the joins is left to the
    /// caller, off the lock.
    pub fn take_diffs(&mut self, max_topics: usize, max_work: usize) -> Vec<TopicDiff<O, M>> {
        let mut diffs = Vec::new();
        let mut work = 0;
        while diffs.len() < max_topics {
            let Some(&id) = self.dirty.front() else {
                break;
            };
            let Some(topic) = self.topics.get_mut(id) else {
                self.dirty.pop_front();
                continue;
            };
            work += topic.diff_work();
            if work > max_work && !diffs.is_empty() {
                break;
            }
            self.dirty.pop_front();
            diffs.extend(topic.take_diff());
            if topic.is_empty() {
                self.topics.remove(id);
                self.listings.topic_removed(id);
            }
        }
        // Give memory back after a peak of changed topics.
        let capacity = self.dirty.capacity();
        if capacity > MIN_KEPT_DIRTY && self.dirty.len() < capacity / 4 {
            self.dirty.shrink_to(self.dirty.len() * 2);
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

    /// Owners with presences (departed ones not counted).
    pub fn owner_count(&self) -> usize {
        self.owners.len()
    }

    /// Presences of `owner` (0 for one that departed).
    pub fn owner_presences(&self, owner: &O) -> usize {
        self.owners.get(owner).map_or(0, |o| o.len())
    }

    /// Topics with presences: O(1).
    pub fn topic_count(&self) -> usize {
        self.occupied_topics
    }

    // --- other nodes' presences (cluster mode; see `replica.rs`) ----------

    /// Adds a presence `replica` reports, unless it holds it already.
    /// Returns whether the dispatcher must be woken.
    pub fn replica_join(&mut self, replica: ReplicaId, join: RemoteJoin<'_, M>) -> bool {
        let set = self.replicas.entry(replica).or_default();
        if set.confirm(join.phx_ref) {
            return false;
        }
        let id = self.topics.intern(join.topic);
        let wake = self.begin_change(id);
        let (local_ref, seq) = self.refs.next(None);
        let next_seq = self.refs.next_seq();
        let entry = self.topics.get_mut(id).expect("interned above");
        let owner = Holder::Replica(replica, join.phx_ref);
        // Dropped and synced back within one window: subscribers still
        // have it, under the same ref, as long as its leave is not sent.
        let seq = entry
            .pending()
            .withdraw_leave(&owner, join.key, &join.meta)
            .unwrap_or(seq);
        let key = entry.shared_key(join.key);
        self.listings.note(id, &key);
        self.occupied_topics += usize::from(entry.is_empty());
        let position = entry.insert(Presence {
            owner,
            key,
            meta: join.meta,
            phx_ref: local_ref,
            prev_ref: prev_ref(join.prev_ref),
            seq,
        });
        entry.record_join(position, self.diff_per_operation, next_seq);
        self.presences += 1;
        self.replicas
            .get_mut(&replica)
            .expect("created above")
            .insert(join.phx_ref, id, local_ref);
        wake
    }

    /// Removes the presence `replica` holds under `phx_ref` (its ref there),
    /// if any. Returns whether the dispatcher must be woken.
    pub fn replica_leave(&mut self, replica: ReplicaId, phx_ref: Ref) -> bool {
        let Some(held) = self
            .replicas
            .get_mut(&replica)
            .and_then(|set| set.remove(phx_ref))
        else {
            return false;
        };
        self.remove_presence(held.topic, held.local_ref)
    }

    /// Starts a full sync of `replica`: joins from now on confirm what it
    /// holds, and [`Registry::replica_end_sync`] removes what they did not.
    pub fn replica_begin_sync(&mut self, replica: ReplicaId) {
        self.replicas.entry(replica).or_default().begin_sync();
    }

    /// Ends a full sync: the presences of `replica` that no join confirmed
    /// since [`Registry::replica_begin_sync`] are detached, for
    /// [`Registry::remove_departed`] to remove. O(presences of the replica).
    pub fn replica_end_sync(&mut self, replica: ReplicaId) -> Departure {
        let stale = self
            .replicas
            .get_mut(&replica)
            .map_or_else(Vec::new, ReplicaSet::end_sync);
        Departure::of_locations(stale)
    }

    /// Detaches every presence of `replica` in O(1), for
    /// [`Registry::remove_departed`] to remove a chunk at a time. They stay
    /// listed until removed, but no replication reaches them any more.
    pub fn drop_replica(&mut self, replica: ReplicaId) -> Option<Departure> {
        let set = self.replicas.remove(&replica)?;
        Some(Departure::of_replica(set.into_presences()))
    }

    /// Presences `replica` holds here.
    pub fn replica_len(&self, replica: ReplicaId) -> usize {
        self.replicas.get(&replica).map_or(0, ReplicaSet::len)
    }

    /// Replicas with a set here, emptied ones included until dropped.
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// Every presence on this node, topic by topic, as snapshots for a full
    /// state: O(topics) under the lock, walked after it.
    ///
    /// Another node syncs from what they show, as a client does from a
    /// list, so every topic is marked observed: a presence whose join was
    /// still pending has its leave sent, or the other node would keep it.
    pub fn observed_snapshots(&mut self) -> Vec<(Bytes, Snapshot<Presence<O, M>>)> {
        let next_seq = self.refs.next_seq();
        self.topics
            .iter_mut()
            .filter(|topic| !topic.is_empty())
            .map(|topic| {
                if let Some(pending) = &mut topic.pending {
                    pending.observed_before_seq = next_seq;
                }
                (topic.name.clone(), topic.snapshot())
            })
            .collect()
    }

    /// `owner`'s presence under `key` on `topic`: the topic's id, the
    /// presence's ref and its position.
    fn find(&self, owner: &O, topic: &[u8], key: &[u8]) -> Option<(TopicId, Ref, usize)> {
        let entry = self.topics.named(topic)?;
        let position = entry.find(&Holder::Local(*owner), key)?;
        Some((entry.id, entry.get(position)?.phx_ref, position))
    }

    pub(crate) fn topic_has(&self, id: TopicId, phx_ref: Ref) -> bool {
        self.topics
            .get(id)
            .is_some_and(|t| t.position_of(phx_ref).is_some())
    }

    /// Opens topic `id`'s pending diff for a change about to be made (before
    /// the change takes its seq), queueing the topic if this is its first
    /// change since its last diff. Returns whether the dispatcher must be
    /// woken: the topic is the first with a pending diff.
    pub(crate) fn begin_change(&mut self, id: TopicId) -> bool {
        let next_seq = self.refs.next_seq();
        let topic = self.topics.get_mut(id).expect("changed topics exist");
        if topic.pending.is_some() {
            return false;
        }
        topic.pending = Some(Box::new(PendingDiff::new(next_seq)));
        let wake = self.dirty.is_empty();
        self.dirty.push_back(id);
        wake
    }

    /// Removes the presence `phx_ref` from topic `id`, records the leave,
    /// and returns whether the dispatcher must be woken.
    pub(crate) fn remove_presence(&mut self, id: TopicId, phx_ref: Ref) -> bool {
        self.remove_presence_in(id, phx_ref, 0)
    }

    /// [`Registry::remove_presence`], the leave recorded as part of the
    /// operation `group` (0: an operation of its own).
    fn remove_presence_in(&mut self, id: TopicId, phx_ref: Ref, group: u64) -> bool {
        let wake = self.begin_change(id);
        let topic = self
            .topics
            .get_mut(id)
            .expect("handles point at live topics");
        let position = topic
            .position_of(phx_ref)
            .expect("handles point at live refs");
        let removed = topic.remove(position).expect("found above");
        self.listings.note(id, &removed.key);
        self.occupied_topics -= usize::from(topic.is_empty());
        if self.diff_per_operation {
            topic
                .pending()
                .push_op(group, Vec::new(), Vec::from([removed]));
        } else {
            topic.pending().record_leave(removed);
        }
        self.presences -= 1;
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PartLimits;
    use std::time::Instant;

    fn limit(presences: usize) -> PartLimits {
        PartLimits {
            presences,
            weight: usize::MAX,
        }
    }

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
    fn refs_made_outside_keep_the_order_of_changes_whatever_their_values() {
        let mut r = reg();
        // Given refs count down, so their values say nothing of the order
        // the presences joined in: coalescing must go by that order.
        r.track_as(1, b"t", b"a", "a", Some(900), watch).unwrap();
        assert_eq!(r.take_diffs(usize::MAX, usize::MAX)[0].joins().count(), 1);
        let change = r.track_as(2, b"t", b"b", "b", Some(800), watch).unwrap();
        assert_eq!(change.phx_ref, 800);
        r.update_as(1, b"t", b"a", "a2", Some(900), Some(700))
            .unwrap();
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let mut joins: Vec<(Ref, Option<Ref>)> = diffs[0]
            .joins()
            .map(|p| (p.phx_ref, p.prev_ref()))
            .collect();
        joins.sort();
        assert_eq!(joins, [(700, Some(900)), (800, None)]);
        let leaves: Vec<Ref> = diffs[0].leaves().map(|p| p.phx_ref).collect();
        assert_eq!(leaves, [900]);
        // A presence joined and gone within one diff is never sent.
        r.track_as(3, b"t", b"c", "c", Some(5), watch).unwrap();
        r.untrack(3, b"t", b"c");
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        assert!(diffs
            .iter()
            .all(|d| d.joins().count() == 0 && d.leaves().len() == 0));
        assert_eq!(r.lookup(1, b"t", b"a").map(|p| p.phx_ref), Some(700));
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
        let gone = r.track_gone(1, b"t", b"k", "a");
        let next = r.track(2, b"t", b"k", "a", watch).unwrap();
        assert_ne!(
            gone.phx_ref, next.phx_ref,
            "a gone owner's ref is never reused"
        );
        assert_eq!(r.len(), 1);
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
            (p.meta, p.phx_ref, p.prev_ref()),
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
        assert_eq!((p.meta, p.prev_ref()), ("b", Some(first)));
        assert!(r.lookup(1, b"t", b"other").is_none());
    }

    #[test]
    fn changes_in_one_window_coalesce_into_one_diff() {
        let mut r = reg();
        assert!(r.track(1, b"t", b"a", "x", watch).unwrap().wake);
        assert!(!r.track(2, b"t", b"b", "x", watch).unwrap().wake);
        assert!(!r.track(3, b"u", b"c", "x", watch).unwrap().wake);
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        assert_eq!(diffs.len(), 2);
        assert_eq!(diffs[0].topic.as_ref(), b"t");
        assert_eq!(diffs[0].joins().count(), 2);
        assert!(r.take_diffs(usize::MAX, usize::MAX).is_empty());
        assert!(r.untrack(1, b"t", b"a").wake);
    }

    #[test]
    fn join_then_leave_in_one_window_sends_nothing() {
        let mut r = reg();
        r.track(1, b"t", b"a", "x", watch).unwrap();
        r.update(1, b"t", b"a", "y", None).unwrap();
        r.untrack_owner(1);
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        assert!(diffs
            .iter()
            .all(|d| d.parts(PartLimits::UNLIMITED, |_| 1).is_empty()));
        assert_eq!(r.topic_count(), 0);
        assert_eq!(r.pending_topics(), 0);
    }

    #[test]
    fn a_listed_join_is_sent_with_its_leave() {
        let mut r = reg();
        let stays = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        let listed_ref = r.track(2, b"t", b"b", "x", watch).unwrap().phx_ref;
        r.observe(b"t");
        let unlisted = r.track(3, b"t", b"c", "x", watch).unwrap().phx_ref;
        r.untrack_owner(2);
        r.untrack_owner(3);
        // A client that listed has the listed one and must hear it leave;
        // one that did not must hear it join first, in the same diff. The
        // unlisted one cancels out.
        assert_eq!(
            sent(&mut r),
            vec![(sorted(vec![stays, listed_ref]), vec![listed_ref])]
        );
        assert_ne!(unlisted, listed_ref);
    }

    #[test]
    fn a_listed_presence_updated_then_gone_is_sent_whole() {
        let mut r = reg();
        let first = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        r.observe(b"t");
        let Update::Changed(second) = r.update(1, b"t", b"a", "y", None).unwrap() else {
            panic!("meta changed")
        };
        // The update's new ref was never listed: its leave cancels its join.
        r.untrack(1, b"t", b"a");
        assert_eq!(sent(&mut r), vec![(vec![first], vec![first])]);
        assert_ne!(second.phx_ref, first);
    }

    fn sorted(mut refs: Vec<Ref>) -> Vec<Ref> {
        refs.sort();
        refs
    }

    #[test]
    fn update_after_a_sent_join_is_a_leave_and_a_join() {
        let mut r = reg();
        let old = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        r.take_diffs(usize::MAX, usize::MAX);
        r.update(1, b"t", b"a", "y", None).unwrap();
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let leave = diffs[0].leaves().next().unwrap();
        let join = diffs[0].joins().next().unwrap();
        assert_eq!((leave.phx_ref, leave.meta), (old, "x"));
        assert_eq!((join.meta, join.prev_ref()), ("y", Some(old)));
    }

    /// Each part as (joined refs, left refs).
    fn sent(r: &mut Reg) -> Vec<(Vec<Ref>, Vec<Ref>)> {
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        diffs
            .iter()
            .flat_map(|d| d.parts(PartLimits::UNLIMITED, |_| 1))
            .map(|(j, l)| {
                let mut j: Vec<Ref> = j.iter().map(|p| p.phx_ref).collect();
                let mut l: Vec<Ref> = l.iter().map(|p| p.phx_ref).collect();
                j.sort();
                l.sort();
                (j, l)
            })
            .collect()
    }

    #[test]
    fn diff_per_operation_sends_each_operation_in_order() {
        let mut r = reg();
        r.set_diff_per_operation(true);
        let a = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        let Update::Changed(b) = r.update(1, b"t", b"a", "y", None).unwrap() else {
            panic!("meta changed")
        };
        assert!(matches!(
            r.update(1, b"t", b"a", "y", None),
            Ok(Update::Unchanged(_))
        ));
        r.untrack(1, b"t", b"a");
        let gone = r.track_gone(2, b"t", b"g", "z").phx_ref;
        assert_eq!(
            sent(&mut r),
            vec![
                (vec![a], vec![]),
                (vec![b.phx_ref], vec![a]),
                (vec![], vec![b.phx_ref]),
                (vec![gone], vec![]),
                (vec![], vec![gone]),
            ]
        );
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn diff_per_operation_sends_an_exit_as_one_leave_per_topic_unless_interleaved() {
        let mut r = reg();
        r.set_diff_per_operation(true);
        let mut on_t = Vec::new();
        for key in 0..6u32 {
            let k = key.to_string();
            on_t.push(r.track(1, b"t", k.as_bytes(), "m", watch).unwrap().phx_ref);
            r.track(1, b"u", k.as_bytes(), "m", watch).unwrap();
        }
        r.take_diffs(usize::MAX, usize::MAX);
        let (_, mut departure) = r.depart(1).unwrap();
        while !departure.is_done() {
            r.remove_departed(&mut departure, 4);
        }
        let parts = sent(&mut r);
        on_t.sort();
        assert_eq!(parts.len(), 2, "one diff per topic: {parts:?}");
        assert!(parts.contains(&(vec![], on_t)));

        // Another operation on the topic between two chunks splits it.
        for key in 0..4u32 {
            r.track(1, b"t", key.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        r.take_diffs(usize::MAX, usize::MAX);
        let (_, mut departure) = r.depart(1).unwrap();
        r.remove_departed(&mut departure, 2);
        let other = r.track(2, b"t", b"other", "m", watch).unwrap().phx_ref;
        r.remove_departed(&mut departure, 2);
        let parts = sent(&mut r);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], (vec![other], vec![]));
    }

    #[test]
    fn switching_to_diff_per_operation_sends_what_was_coalesced_first() {
        let mut r = reg();
        let a = r.track(1, b"t", b"a", "x", watch).unwrap().phx_ref;
        let b = r.track(2, b"t", b"b", "x", watch).unwrap().phx_ref;
        r.set_diff_per_operation(true);
        r.untrack(1, b"t", b"a");
        // The coalesced joins, then the leave on its own: nothing cancelled.
        assert_eq!(sent(&mut r), vec![(vec![a, b], vec![]), (vec![], vec![a])]);
        r.set_diff_per_operation(false);
        let c = r.track(3, b"t", b"c", "x", watch).unwrap().phx_ref;
        r.untrack(3, b"t", b"c");
        assert!(sent(&mut r).is_empty(), "coalescing again: {c} cancels");
    }

    #[test]
    fn a_large_diff_comes_in_bounded_parts_that_cover_it_once() {
        let mut r = reg();
        for owner in 0..10u32 {
            r.track(owner, b"t", owner.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        r.take_diffs(usize::MAX, usize::MAX);
        for owner in 0..3u32 {
            r.untrack_owner(owner);
        }
        for owner in 10..14u32 {
            r.track(owner, b"t", owner.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let parts = diffs[0].parts(limit(3), |_| 1);
        assert_eq!(
            parts
                .iter()
                .map(|(j, l)| j.len() + l.len())
                .collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let local = |p: &&Presence<u32, &str>| match p.owner {
            Holder::Local(owner) => owner,
            Holder::Replica(..) => unreachable!("no replicas here"),
        };
        let mut joined: Vec<u32> = parts
            .iter()
            .flat_map(|(j, _)| j.iter().map(local))
            .collect();
        let mut left: Vec<u32> = parts
            .iter()
            .flat_map(|(_, l)| l.iter().map(local))
            .collect();
        joined.sort();
        left.sort();
        assert_eq!((joined, left), (vec![10, 11, 12, 13], vec![0, 1, 2]));
        assert_eq!(diffs[0].parts(limit(100), |_| 1).len(), 1);
    }

    #[test]
    fn take_diffs_respects_the_work_budget_but_takes_one() {
        let mut r = reg();
        for owner in 0..10u32 {
            r.track(owner, b"big", owner.to_string().as_bytes(), "m", watch)
                .unwrap();
        }
        r.track(10, b"small", b"k", "m", watch).unwrap();
        assert_eq!(r.next_diff_work(), 10);
        assert_eq!(r.take_diffs(10, 5).len(), 1, "one, however large");
        assert_eq!(r.next_diff_work(), 1);
        assert_eq!(r.take_diffs(10, 5).len(), 1);
        assert_eq!(r.next_diff_work(), 0);
    }

    #[test]
    fn a_diff_is_dated_by_its_topic_s_first_change() {
        let mut r = reg();
        let before = Instant::now();
        r.track(1, b"t", b"a", "m", watch).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let later = Instant::now();
        r.track(2, b"t", b"b", "m", watch).unwrap();
        r.track(3, b"u", b"c", "m", watch).unwrap();
        let diffs = r.take_diffs(10, usize::MAX);
        assert!(
            diffs[0].since >= before && diffs[0].since < later,
            "its first change"
        );
        assert!(diffs[1].since >= later);

        // Dated anew once taken.
        r.track(4, b"t", b"d", "m", watch).unwrap();
        assert!(r.take_diffs(10, usize::MAX)[0].since >= later);
    }

    #[test]
    fn take_diffs_respects_the_topic_budget() {
        let mut r = reg();
        for owner in 0..5u32 {
            r.track(owner, owner.to_string().as_bytes(), b"k", "m", watch)
                .unwrap();
        }
        assert_eq!(r.take_diffs(2, usize::MAX).len(), 2);
        assert_eq!(r.pending_topics(), 3);
        assert_eq!(r.take_diffs(10, usize::MAX).len(), 3);
    }

    #[test]
    fn an_update_travels_with_its_key_when_a_diff_is_cut() {
        let mut r: Registry<u32, u32, ()> = Registry::new(7);
        for owner in 0..3_000u32 {
            r.track(owner, b"t", owner.to_string().as_bytes(), 0, watch)
                .unwrap();
        }
        r.take_diffs(usize::MAX, usize::MAX);
        for owner in 0..3_000u32 {
            r.update(owner, b"t", owner.to_string().as_bytes(), 1, None)
                .unwrap();
        }
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let parts = diffs[0].parts(limit(2_000), |_| 1);
        assert_eq!(parts.len(), 3);
        for (joins, leaves) in &parts {
            assert!(joins.len() + leaves.len() <= 2_000);
            let mut joined: Vec<&[u8]> = joins.iter().map(|p| &*p.key).collect();
            let mut left: Vec<&[u8]> = leaves.iter().map(|p| &*p.key).collect();
            joined.sort();
            left.sort();
            assert_eq!(joined, left, "each key's leave and join share a part");
        }
    }

    #[test]
    fn a_join_storm_is_cut_as_it_comes_a_shared_key_across_parts() {
        let mut r: Registry<u32, u32, ()> = Registry::new(7);
        for owner in 0..7u32 {
            r.track(owner, b"t", b"same", 0, watch).unwrap();
        }
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let parts = diffs[0].parts(limit(3), |_| 1);
        // Joins only: nobody can appear to leave, so no key waits for room.
        let sizes: Vec<(usize, usize)> = parts.iter().map(|(j, l)| (j.len(), l.len())).collect();
        assert_eq!(sizes, [(3, 0), (3, 0), (1, 0)]);
    }

    #[test]
    fn parts_respect_the_weight_limit_and_split_big_keys_joins_first() {
        let mut r: Registry<u32, u32, ()> = Registry::new(7);
        for owner in 0..4u32 {
            r.track(owner, b"t", b"same", 0, watch).unwrap();
        }
        r.take_diffs(usize::MAX, usize::MAX);
        for owner in 0..4u32 {
            r.update(owner, b"t", b"same", 1, None).unwrap();
        }
        let diffs = r.take_diffs(usize::MAX, usize::MAX);
        let limits = PartLimits {
            presences: 100,
            weight: 30,
        };
        let parts = diffs[0].parts(limits, |_| 10);
        assert!(parts.iter().all(|(j, l)| (j.len() + l.len()) * 10 <= 30));
        // All four joins go out before the first leave.
        let order: Vec<bool> = parts
            .iter()
            .flat_map(|(j, l)| j.iter().map(|_| true).chain(l.iter().map(|_| false)))
            .collect();
        assert_eq!(order, [true, true, true, true, false, false, false, false]);
    }

    #[test]
    fn a_departed_owner_is_removed_in_chunks() {
        let mut r = reg();
        for topic in 0..10u32 {
            r.track(1, topic.to_string().as_bytes(), b"k", "m", watch)
                .unwrap();
        }
        r.track(2, b"0", b"k", "m", watch).unwrap();
        let (_, mut departure) = r.depart(1).unwrap();
        assert_eq!(r.owner_count(), 1);
        assert_eq!(r.len(), 11);
        // Not the owner's any more: no single untrack or update reaches it.
        assert_eq!(r.untrack(1, b"3", b"k").removed, 0);
        assert_eq!(
            r.update(1, b"3", b"k", "n", None),
            Err(CoreError::NotTracked)
        );
        let mut chunks = 0;
        while !departure.is_done() {
            assert!(r.remove_departed(&mut departure, 4).removed <= 4);
            chunks += 1;
        }
        assert_eq!(chunks, 3);
        assert_eq!(r.len(), 1);
        assert_eq!(r.counts(b"0").connections, 1);
        assert!(r.depart(1).is_none());
    }

    #[test]
    fn an_owner_with_many_presences_changes_each_on_its_own() {
        let mut r = reg();
        for i in 0..1_000u32 {
            r.track(1, b"t", i.to_string().as_bytes(), "a", watch)
                .unwrap();
        }
        for i in (0..1_000u32).step_by(2) {
            assert_eq!(r.untrack(1, b"t", i.to_string().as_bytes()).removed, 1);
        }
        for i in (1..1_000u32).step_by(2) {
            let key = i.to_string();
            assert!(matches!(
                r.update(1, b"t", key.as_bytes(), "b", None),
                Ok(Update::Changed(_))
            ));
            assert_eq!(r.lookup(1, b"t", key.as_bytes()).unwrap().meta, "b");
        }
        assert_eq!(r.counts(b"t").connections, 500);
        assert_eq!(r.untrack_owner(1).removed, 500);
        assert!(r.is_empty());
    }

    #[test]
    fn a_shared_key_finds_each_owner() {
        let mut r = reg();
        for owner in 0..5u32 {
            r.track(owner, b"t", b"k", "a", watch).unwrap();
        }
        assert_eq!(r.key_len(b"t", b"k"), 5);
        assert_eq!(
            r.track(3, b"t", b"k", "a", watch),
            Err(CoreError::AlreadyTracked)
        );
        for owner in [4, 0, 2, 1] {
            assert_eq!(r.untrack(owner, b"t", b"k").removed, 1);
            assert!(r.lookup(owner, b"t", b"k").is_none());
        }
        assert_eq!(r.lookup(3, b"t", b"k").unwrap().owner, Holder::Local(3));
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 1,
                connections: 1
            }
        );
    }
}

#[cfg(test)]
mod replica_tests {
    use super::*;
    use crate::delta::RemoteJoin;
    use crate::{Counts, PartLimits};

    type Reg = Registry<u32, &'static str, ()>;

    fn join<'a>(
        topic: &'a str,
        key: &'a str,
        meta: &'static str,
        r: Ref,
    ) -> RemoteJoin<'a, &'static str> {
        RemoteJoin {
            topic: topic.as_bytes(),
            key: key.as_bytes(),
            meta,
            phx_ref: r,
            prev_ref: None,
        }
    }

    fn drain(r: &mut Reg) -> (Vec<Ref>, Vec<Ref>) {
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for diff in r.take_diffs(usize::MAX, usize::MAX) {
            for (j, l) in diff.parts(PartLimits::UNLIMITED, |_| 1) {
                joins.extend(j.iter().map(|p| p.shown_ref()));
                leaves.extend(l.iter().map(|p| p.shown_ref()));
            }
        }
        joins.sort();
        leaves.sort();
        (joins, leaves)
    }

    #[test]
    fn replicated_presences_count_list_and_diff_like_local_ones() {
        let mut r = Reg::new(1_000);
        r.track(1, b"t", b"alice", "a", || Some(())).unwrap();
        assert!(!r.replica_join(7, join("t", "alice", "b", 42)));
        r.replica_join(7, join("t", "bob", "c", 43));
        assert_eq!(
            r.counts(b"t"),
            Counts {
                users: 2,
                connections: 3
            }
        );
        let (joins, _) = drain(&mut r);
        assert!(joins.contains(&42) && joins.contains(&43));
        assert!(r
            .get_by_key(b"t", b"alice")
            .iter()
            .any(|p| p.shown_ref() == 42));
        r.replica_leave(7, 42);
        assert_eq!(drain(&mut r), (vec![], vec![42]));
        assert_eq!(r.replica_len(7), 1);
    }

    #[test]
    fn joins_and_leaves_are_idempotent() {
        let mut r = Reg::new(0);
        r.replica_join(1, join("t", "k", "m", 5));
        r.replica_join(1, join("t", "k", "m", 5));
        assert_eq!(r.len(), 1);
        r.replica_leave(1, 5);
        r.replica_leave(1, 5);
        r.replica_leave(2, 5);
        assert!(r.is_empty());
    }

    #[test]
    fn two_replicas_may_share_a_ref_and_a_key() {
        let mut r = Reg::new(0);
        r.replica_join(1, join("t", "k", "m", 5));
        r.replica_join(2, join("t", "k", "m", 5));
        assert_eq!(r.counts(b"t").connections, 2);
        r.replica_leave(1, 5);
        assert_eq!(r.get_by_key(b"t", b"k")[0].owner, Holder::Replica(2, 5));
    }

    #[test]
    fn a_sync_keeps_confirmed_presences_and_removes_the_rest() {
        let mut r = Reg::new(0);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            r.replica_join(1, join("t", key, "m", i as Ref));
        }
        drain(&mut r);
        r.replica_begin_sync(1);
        r.replica_join(1, join("t", "a", "m", 0));
        r.replica_join(1, join("t", "d", "m", 9));
        let mut stale = r.replica_end_sync(1);
        assert_eq!(stale.remaining(), 2);
        r.remove_departed(&mut stale, usize::MAX);
        assert_eq!(r.counts(b"t").connections, 2);
        // Only what changed is sent: d joins, b and c leave, a stays.
        assert_eq!(drain(&mut r), (vec![9], vec![1, 2]));
    }

    #[test]
    fn a_dropped_replica_goes_in_chunks_and_hears_nothing_more() {
        let mut r = Reg::new(0);
        for i in 0..10 {
            r.replica_join(3, join("t", &i.to_string(), "m", i));
        }
        r.track(1, b"t", b"local", "m", || Some(())).unwrap();
        let mut departure = r.drop_replica(3).unwrap();
        assert_eq!(r.remove_departed(&mut departure, 4).removed, 4);
        r.replica_leave(3, 9);
        r.remove_departed(&mut departure, usize::MAX);
        assert!(departure.is_done());
        assert_eq!(r.counts(b"t").connections, 1);
        assert_eq!(r.replica_count(), 0);
    }

    #[test]
    fn a_presence_dropped_and_synced_back_in_one_window_is_not_sent_again() {
        let mut r = Reg::new(0);
        r.replica_join(3, join("t", "k", "m", 5));
        r.replica_join(3, join("t", "gone", "m", 6));
        drain(&mut r);
        // A netsplit drops the replica, the heal syncs it back: both
        // presences keep their refs, and one of them left meanwhile.
        let mut departure = r.drop_replica(3).unwrap();
        r.remove_departed(&mut departure, usize::MAX);
        r.replica_begin_sync(3);
        r.replica_join(3, join("t", "k", "m", 5));
        r.replica_end_sync(3);
        // Subscribers still have 5: its leave and join under the same ref
        // in one diff would lose it (joins are applied first).
        assert_eq!(drain(&mut r), (vec![], vec![6]));
        assert_eq!(r.counts(b"t").connections, 1);
        r.replica_leave(3, 5);
        assert_eq!(drain(&mut r), (vec![], vec![5]));
    }

    #[test]
    fn a_listed_presence_dropped_and_synced_back_joins_once() {
        let mut r = Reg::new(0);
        r.replica_join(3, join("t", "k", "m", 5));
        r.observe(b"t");
        let mut departure = r.drop_replica(3).unwrap();
        r.remove_departed(&mut departure, usize::MAX);
        r.replica_join(3, join("t", "k", "m", 5));
        assert_eq!(drain(&mut r), (vec![5], vec![]));
    }

    #[test]
    fn observed_snapshots_list_every_topic() {
        let mut r = Reg::new(0);
        r.track(1, b"a", b"k", "m", || Some(())).unwrap();
        r.track(1, b"b", b"k", "m", || Some(())).unwrap();
        r.replica_join(2, join("c", "k", "m", 1));
        let snapshots = r.observed_snapshots();
        let local: usize = snapshots
            .iter()
            .map(|(_, s)| s.iter().filter(|p| p.is_local()).count())
            .sum();
        assert_eq!((snapshots.len(), local), (3, 2));
    }
}
