//! What the registry knows of each owner: how it is watched, and where its
//! presences are, so that its exit removes them without a scan.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::presence::Ref;
use crate::ref_hash::RefHasher;
use crate::replica::RemoteHandle;
use crate::topic::TopicId;

/// Where one presence of an owner lives: 16 bytes. Its key is the
/// presence's: keeping it here too would cost 24 more.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handle {
    pub(crate) topic: TopicId,
    pub(crate) phx_ref: Ref,
}

/// An owner's handles, by ref. Most owners (channel processes) are present
/// on one topic, so that case lives inline; an owner with many presences
/// finds, changes and drops any of them in O(1).
///
/// 16 bytes: the one handle's fields are the variant's own (not a
/// `Handle` inside it), so that the tag fits beside the topic id, and the
/// map is boxed (inline, it would make every owner 40 bytes larger).
#[derive(Debug)]
#[allow(clippy::box_collection)]
enum Handles {
    One { topic: TopicId, phx_ref: Ref },
    Many(Box<HashMap<Ref, TopicId, BuildHasherDefault<RefHasher>>>),
}

#[derive(Debug)]
pub(crate) struct Owner<W> {
    pub(crate) watch: W,
    handles: Handles,
}

impl<W> Owner<W> {
    pub(crate) fn new(watch: W, first: Handle) -> Self {
        Self {
            watch,
            handles: Handles::One {
                topic: first.topic,
                phx_ref: first.phx_ref,
            },
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.handles {
            Handles::One { .. } => 1,
            Handles::Many(by_ref) => by_ref.len(),
        }
    }

    pub(crate) fn add(&mut self, handle: Handle) {
        match &mut self.handles {
            Handles::Many(by_ref) => {
                by_ref.insert(handle.phx_ref, handle.topic);
            }
            Handles::One { topic, phx_ref } => {
                let mut by_ref = HashMap::default();
                by_ref.insert(*phx_ref, *topic);
                by_ref.insert(handle.phx_ref, handle.topic);
                self.handles = Handles::Many(Box::new(by_ref));
            }
        }
    }

    /// Drops the handle of `phx_ref`; returns true when it was the last.
    pub(crate) fn remove(&mut self, phx_ref: Ref) -> bool {
        match &mut self.handles {
            Handles::One { phx_ref: only, .. } => *only == phx_ref,
            Handles::Many(by_ref) => {
                by_ref.remove(&phx_ref);
                if by_ref.len() == 1 {
                    let (&phx_ref, &topic) = by_ref.iter().next().expect("one left");
                    self.handles = Handles::One { topic, phx_ref };
                }
                false
            }
        }
    }

    /// Follows a presence to its new ref after an update.
    pub(crate) fn rename(&mut self, old: Ref, new: Ref) {
        match &mut self.handles {
            Handles::One { phx_ref, .. } => *phx_ref = new,
            Handles::Many(by_ref) => {
                if let Some(topic) = by_ref.remove(&old) {
                    by_ref.insert(new, topic);
                }
            }
        }
    }

    /// The watch, and the handles as a [`Departure`]: O(1), so that it can
    /// happen under the table lock whatever the owner's presences.
    pub(crate) fn depart(self) -> (W, Departure) {
        let remaining = self.len();
        let handles = match self.handles {
            Handles::One { topic, phx_ref } => Departing::One(Some(Handle { topic, phx_ref })),
            Handles::Many(by_ref) => Departing::Many((*by_ref).into_iter()),
        };
        (
            self.watch,
            Departure {
                handles,
                remaining,
                group: 0,
            },
        )
    }
}

/// The presences of an owner that has gone, detached from it in O(1) and
/// removed a chunk at a time ([`crate::Registry::remove_departed`]), so
/// that an owner with 100k presences never holds the table for the whole of
/// its removal.
/// Walking the departed owner's map hands out its handles without first
/// copying them: the walk, and freeing the map, happen a chunk at a time.
#[derive(Debug)]
pub struct Departure {
    handles: Departing,
    remaining: usize,
    /// Groups its leaves into one op per topic (`diff_window: 0`); given on
    /// its first removal, 0 until then.
    pub(crate) group: u64,
}

#[derive(Debug)]
enum Departing {
    One(Option<Handle>),
    Many(std::collections::hash_map::IntoIter<Ref, TopicId>),
    Handles(std::vec::IntoIter<Handle>),
    Replica(std::collections::hash_map::IntoIter<Ref, RemoteHandle>),
}

impl Departure {
    /// Presences at `handles`, removed like a departed owner's.
    pub(crate) fn of_handles(handles: Vec<Handle>) -> Self {
        Self {
            remaining: handles.len(),
            handles: Departing::Handles(handles.into_iter()),
            group: 0,
        }
    }

    /// A dropped replica's presences, walked a chunk at a time like a
    /// departed owner's map.
    pub(crate) fn of_replica(presences: HashMap<Ref, RemoteHandle>) -> Self {
        Self {
            remaining: presences.len(),
            handles: Departing::Replica(presences.into_iter()),
            group: 0,
        }
    }

    /// Presences not removed yet.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    pub(crate) fn take(&mut self, max: usize) -> Vec<Handle> {
        let taken: Vec<Handle> = match &mut self.handles {
            Departing::One(only) => only.take().into_iter().collect(),
            Departing::Many(by_ref) => by_ref
                .take(max)
                .map(|(phx_ref, topic)| Handle { topic, phx_ref })
                .collect(),
            Departing::Handles(handles) => handles.take(max).collect(),
            Departing::Replica(presences) => presences
                .take(max)
                .map(|(_, remote)| Handle {
                    topic: remote.topic,
                    phx_ref: remote.local_ref,
                })
                .collect(),
        };
        self.remaining -= taken.len();
        taken
    }
}
