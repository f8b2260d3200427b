//! What the registry knows of each owner: how it is watched, and where its
//! presences are, so that its exit removes them without a scan.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::presence::Ref;
use crate::ref_hash::RefHasher;
use crate::replica::ReplicaPresence;
use crate::topic::{Location, TopicId};

/// An owner's locations, by ref. Most owners (channel processes) are present
/// on one topic, so that case lives inline; an owner with many presences
/// finds, changes and drops any of them in O(1).
///
/// 16 bytes: the one handle's fields are the variant's own (not a
/// `Location` inside it), so that the tag fits beside the topic id, and the
/// map is boxed (inline, it would make every owner 40 bytes larger).
#[derive(Debug)]
#[allow(clippy::box_collection)]
enum Locations {
    One { topic: TopicId, phx_ref: Ref },
    Many(Box<HashMap<Ref, TopicId, BuildHasherDefault<RefHasher>>>),
}

#[derive(Debug)]
pub(crate) struct OwnerEntry<W> {
    pub(crate) watch: W,
    locations: Locations,
}

impl<W> OwnerEntry<W> {
    pub(crate) fn new(watch: W, first: Location) -> Self {
        Self {
            watch,
            locations: Locations::One {
                topic: first.topic,
                phx_ref: first.phx_ref,
            },
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.locations {
            Locations::One { .. } => 1,
            Locations::Many(by_ref) => by_ref.len(),
        }
    }

    pub(crate) fn add(&mut self, handle: Location) {
        match &mut self.locations {
            Locations::Many(by_ref) => {
                by_ref.insert(handle.phx_ref, handle.topic);
            }
            Locations::One { topic, phx_ref } => {
                let mut by_ref = HashMap::default();
                by_ref.insert(*phx_ref, *topic);
                by_ref.insert(handle.phx_ref, handle.topic);
                self.locations = Locations::Many(Box::new(by_ref));
            }
        }
    }

    /// Drops the handle of `phx_ref`; returns true when it was the last.
    pub(crate) fn remove(&mut self, phx_ref: Ref) -> bool {
        match &mut self.locations {
            Locations::One { phx_ref: only, .. } => *only == phx_ref,
            Locations::Many(by_ref) => {
                by_ref.remove(&phx_ref);
                if by_ref.len() == 1 {
                    let (&phx_ref, &topic) = by_ref.iter().next().expect("one left");
                    self.locations = Locations::One { topic, phx_ref };
                }
                false
            }
        }
    }

    /// Follows a presence to its new ref after an update.
    pub(crate) fn rename(&mut self, old: Ref, new: Ref) {
        match &mut self.locations {
            Locations::One { phx_ref, .. } => *phx_ref = new,
            Locations::Many(by_ref) => {
                if let Some(topic) = by_ref.remove(&old) {
                    by_ref.insert(new, topic);
                }
            }
        }
    }

    /// The watch, and the locations as a [`Departure`]: O(1), so that it can
    /// happen under the table lock whatever the owner's presences.
    pub(crate) fn depart(self) -> (W, Departure) {
        let remaining = self.len();
        let locations = match self.locations {
            Locations::One { topic, phx_ref } => Departing::One(Some(Location { topic, phx_ref })),
            Locations::Many(by_ref) => Departing::Many((*by_ref).into_iter()),
        };
        (
            self.watch,
            Departure {
                locations,
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
/// Walking the departed owner's map hands out its locations without first
/// copying them: the walk, and freeing the map, happen a chunk at a time.
#[derive(Debug)]
pub struct Departure {
    locations: Departing,
    remaining: usize,
    /// Groups its leaves into one op per topic (`diff_window: 0`); given on
    /// its first removal, 0 until then.
    pub(crate) group: u64,
}

#[derive(Debug)]
enum Departing {
    One(Option<Location>),
    Many(std::collections::hash_map::IntoIter<Ref, TopicId>),
    Locations(std::vec::IntoIter<Location>),
    Replica(std::collections::hash_map::IntoIter<Ref, ReplicaPresence>),
}

impl Departure {
    /// Presences at `locations`, removed like a departed owner's.
    pub(crate) fn of_locations(locations: Vec<Location>) -> Self {
        Self {
            remaining: locations.len(),
            locations: Departing::Locations(locations.into_iter()),
            group: 0,
        }
    }

    /// A dropped replica's presences, walked a chunk at a time like a
    /// departed owner's map.
    pub(crate) fn of_replica(presences: HashMap<Ref, ReplicaPresence>) -> Self {
        Self {
            remaining: presences.len(),
            locations: Departing::Replica(presences.into_iter()),
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

    pub(crate) fn take(&mut self, max: usize) -> Vec<Location> {
        let taken: Vec<Location> = match &mut self.locations {
            Departing::One(only) => only.take().into_iter().collect(),
            Departing::Many(by_ref) => by_ref
                .take(max)
                .map(|(phx_ref, topic)| Location { topic, phx_ref })
                .collect(),
            Departing::Locations(locations) => locations.take(max).collect(),
            Departing::Replica(presences) => presences
                .take(max)
                .map(|(_, remote)| Location {
                    topic: remote.topic,
                    phx_ref: remote.local_ref,
                })
                .collect(),
        };
        self.remaining -= taken.len();
        taken
    }
}
