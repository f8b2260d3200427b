//! Which keys of a topic changed since a copy of its listing was last
//! brought up to date.
//!
//! A listing of a large topic is expensive to build and cheap to copy, so
//! the NIF keeps one per often-listed topic as a term and, on the next
//! list, refreshes only the keys that changed. The registry records those
//! keys here as presences come and go; it knows nothing of the copy.
//!
//! Keys are recorded as listed: a key that is not a binary (Drab's user
//! ids are often integers) is listed under its string, maybe with others
//! (`42` and `"42"`), and the copy refreshes that string's entry.
//!
//! A watch is lost, and the copy must be built again, when its topic is
//! removed, or when more keys changed than [`MAX_CHANGED_KEYS`]
//! (refreshing them would cost more than rebuilding).

use std::collections::HashMap;

use crate::key::{is_term_key, listed_key};
use crate::presence::Bytes;
use crate::topic::TopicId;

/// Keys a watch records before it gives up and reports itself lost.
pub const MAX_CHANGED_KEYS: usize = 1_024;

/// Names one watch of one topic: a topic removed and created again under
/// the same name is not watched by the old copy's watch.
pub type WatchId = u64;

/// What changed on a watched topic since the last call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingChanges {
    /// The listed keys whose presences changed, each once, in no set
    /// order.
    Keys(Vec<Bytes>),
    /// The watch is gone: the copy must be built from the topic again.
    Lost,
}

#[derive(Debug, Default)]
pub(crate) struct ListingWatches {
    last_id: WatchId,
    by_topic: HashMap<TopicId, Watch>,
}

#[derive(Debug)]
struct Watch {
    id: WatchId,
    /// `None` once lost.
    changed: Option<Vec<Bytes>>,
}

impl ListingWatches {
    /// Starts watching `topic` afresh (a watch already there is replaced).
    pub(crate) fn watch(&mut self, topic: TopicId) -> WatchId {
        self.last_id += 1;
        let watch = Watch {
            id: self.last_id,
            changed: Some(Vec::new()),
        };
        self.by_topic.insert(topic, watch);
        self.last_id
    }

    pub(crate) fn unwatch(&mut self, topic: TopicId, id: WatchId) {
        if self.by_topic.get(&topic).is_some_and(|w| w.id == id) {
            self.by_topic.remove(&topic);
        }
        if self.by_topic.is_empty() {
            self.by_topic.shrink_to_fit();
        }
    }

    pub(crate) fn is_watched(&self, topic: TopicId) -> bool {
        self.by_topic.contains_key(&topic)
    }

    /// Notes that the presences under stored `key` on `topic` changed. The
    /// common case, no topic watched, costs one comparison.
    #[inline]
    pub(crate) fn note(&mut self, topic: TopicId, key: &Bytes) {
        if self.by_topic.is_empty() {
            return;
        }
        let Some(watch) = self.by_topic.get_mut(&topic) else {
            return;
        };
        let Some(changed) = &mut watch.changed else {
            return;
        };
        if changed.len() >= MAX_CHANGED_KEYS {
            watch.changed = None;
        } else if is_term_key(key) {
            changed.push(Bytes::from(listed_key(key)));
        } else {
            changed.push(key.clone());
        }
    }

    /// How many changes are recorded for watch `id` of `topic` (repeats of
    /// a key included), or `None` if it is lost.
    pub(crate) fn pending(&self, topic: TopicId, id: WatchId) -> Option<usize> {
        let watch = self.by_topic.get(&topic).filter(|w| w.id == id)?;
        watch.changed.as_ref().map(Vec::len)
    }

    /// Takes the listed keys changed since the last call. A lost watch is
    /// removed.
    pub(crate) fn take(&mut self, topic: TopicId, id: WatchId) -> ListingChanges {
        let Some(watch) = self.by_topic.get_mut(&topic).filter(|w| w.id == id) else {
            return ListingChanges::Lost;
        };
        match watch.changed.as_mut() {
            Some(changed) => {
                let mut keys = std::mem::take(changed);
                keys.sort_unstable();
                keys.dedup();
                ListingChanges::Keys(keys)
            }
            None => {
                self.by_topic.remove(&topic);
                ListingChanges::Lost
            }
        }
    }

    /// `topic` is gone: so is its watch.
    pub(crate) fn topic_removed(&mut self, topic: TopicId) {
        if !self.by_topic.is_empty() {
            self.by_topic.remove(&topic);
        }
    }
}
