//! Every topic with presences or a pending diff, by name and by id.
//!
//! An owner's handles name a topic by id (4 bytes) rather than by name
//! (24): with a million per-user topics, that and a topic that is one
//! allocation of its own are most of what a presence costs beyond itself.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};

use crate::presence::Bytes;
use crate::ref_hash::hash_ref;
use crate::sharded_map::ShardedTable;
use crate::topic::{Topic, TopicId};

#[derive(Debug)]
pub(crate) struct Topics<O, M> {
    by_id: ShardedTable<Box<Topic<O, M>>>,
    /// Ids, hashed by name and found through `by_id`.
    by_name: ShardedTable<TopicId>,
    /// Names come from clients: hashed with a random key (SipHash).
    name_hasher: RandomState,
    next_id: TopicId,
}

impl<O, M> Default for Topics<O, M> {
    fn default() -> Self {
        Self {
            by_id: ShardedTable::default(),
            by_name: ShardedTable::default(),
            name_hasher: RandomState::new(),
            next_id: 0,
        }
    }
}

fn id_hash(id: TopicId) -> u64 {
    hash_ref(u64::from(id))
}

impl<O, M> Topics<O, M>
where
    O: Copy + Eq + Hash,
    M: Clone,
{
    pub(crate) fn get(&self, id: TopicId) -> Option<&Topic<O, M>> {
        self.by_id
            .find(id_hash(id), |topic| topic.id == id)
            .map(|topic| &**topic)
    }

    pub(crate) fn get_mut(&mut self, id: TopicId) -> Option<&mut Topic<O, M>> {
        self.by_id
            .find_mut(id_hash(id), |topic| topic.id == id)
            .map(|topic| &mut **topic)
    }

    pub(crate) fn id_of(&self, name: &[u8]) -> Option<TopicId> {
        let by_id = &self.by_id;
        self.by_name
            .find(self.name_hasher.hash_one(name), |&id| {
                by_id
                    .find(id_hash(id), |topic| topic.id == id)
                    .is_some_and(|topic| *topic.name == *name)
            })
            .copied()
    }

    pub(crate) fn named(&self, name: &[u8]) -> Option<&Topic<O, M>> {
        self.get(self.id_of(name)?)
    }

    pub(crate) fn named_mut(&mut self, name: &[u8]) -> Option<&mut Topic<O, M>> {
        let id = self.id_of(name)?;
        self.get_mut(id)
    }

    /// The id of topic `name`, created empty if there is none.
    pub(crate) fn intern(&mut self, name: &[u8]) -> TopicId {
        if let Some(id) = self.id_of(name) {
            return id;
        }
        let id = self.free_id();
        let topic = Box::new(Topic::new(id, Bytes::from(name)));
        let Topics {
            by_id,
            by_name,
            name_hasher,
            ..
        } = self;
        by_id.insert_unique(id_hash(id), topic, |topic| id_hash(topic.id));
        by_name.insert_unique(name_hasher.hash_one(name), id, |&id| {
            let topic = by_id.find(id_hash(id), |t| t.id == id).expect("named");
            name_hasher.hash_one(&*topic.name)
        });
        id
    }

    /// An id no live topic has. Ids count up and wrap: after 2^32
    /// topics, the few still alive from long ago are stepped over.
    fn free_id(&mut self) -> TopicId {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if self.get(id).is_none() {
                return id;
            }
        }
    }

    pub(crate) fn remove(&mut self, id: TopicId) -> Option<Box<Topic<O, M>>> {
        let topic = self.by_id.remove(
            id_hash(id),
            |topic| topic.id == id,
            |topic| id_hash(topic.id),
        )?;
        let Topics {
            by_id,
            by_name,
            name_hasher,
            ..
        } = self;
        by_name.remove(
            name_hasher.hash_one(&*topic.name),
            |&other| other == id,
            |&id| {
                let topic = by_id.find(id_hash(id), |t| t.id == id).expect("named");
                name_hasher.hash_one(&*topic.name)
            },
        );
        Some(topic)
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Topic<O, M>> {
        self.by_id.iter_mut().map(|topic| &mut **topic)
    }
}
