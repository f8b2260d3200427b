//! What the registry knows of each owner: how it is watched, and where its
//! presences are, so that its exit removes them without a scan.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::ref_hash::RefHasher;
use crate::registry::{Bytes, Ref};

/// Where one presence of an owner lives. Its key is the entry's: keeping it
/// here too would cost 16 bytes a presence.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    pub(crate) topic: Bytes,
    pub(crate) phx_ref: Ref,
}

/// An owner's handles, by ref. Most owners (channel processes) are present
/// on one topic, so that case lives inline; an owner with many presences
/// finds, changes and drops any of them in O(1).
#[derive(Debug)]
enum Handles {
    One(Handle),
    Many(HashMap<Ref, Bytes, BuildHasherDefault<RefHasher>>),
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
            handles: Handles::One(first),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.handles {
            Handles::One(_) => 1,
            Handles::Many(by_ref) => by_ref.len(),
        }
    }

    pub(crate) fn add(&mut self, handle: Handle) {
        match &mut self.handles {
            Handles::Many(by_ref) => {
                by_ref.insert(handle.phx_ref, handle.topic);
            }
            Handles::One(first) => {
                let mut by_ref = HashMap::default();
                by_ref.insert(first.phx_ref, first.topic.clone());
                by_ref.insert(handle.phx_ref, handle.topic);
                self.handles = Handles::Many(by_ref);
            }
        }
    }

    /// Drops the handle of `phx_ref`; returns true when it was the last.
    pub(crate) fn remove(&mut self, phx_ref: Ref) -> bool {
        match &mut self.handles {
            Handles::One(only) => only.phx_ref == phx_ref,
            Handles::Many(by_ref) => {
                by_ref.remove(&phx_ref);
                if by_ref.len() == 1 {
                    let (&phx_ref, topic) = by_ref.iter().next().expect("one left");
                    let topic = topic.clone();
                    self.handles = Handles::One(Handle { topic, phx_ref });
                }
                false
            }
        }
    }

    /// Follows a presence to its new ref after an update.
    pub(crate) fn rename(&mut self, old: Ref, new: Ref) {
        match &mut self.handles {
            Handles::One(only) => only.phx_ref = new,
            Handles::Many(by_ref) => {
                if let Some(topic) = by_ref.remove(&old) {
                    by_ref.insert(new, topic);
                }
            }
        }
    }

    pub(crate) fn into_parts(self) -> (W, Vec<Handle>) {
        let handles = match self.handles {
            Handles::One(only) => vec![only],
            Handles::Many(by_ref) => by_ref
                .into_iter()
                .map(|(phx_ref, topic)| Handle { topic, phx_ref })
                .collect(),
        };
        (self.watch, handles)
    }
}

/// The presences of an owner that has gone, detached from it in O(1) and
/// removed a chunk at a time ([`crate::Registry::remove_departed`]), so
/// that an owner with 100k presences never holds the table for the whole of
/// its removal.
#[derive(Debug)]
pub struct Departure {
    handles: Vec<Handle>,
}

impl Departure {
    pub(crate) fn new(handles: Vec<Handle>) -> Self {
        Self { handles }
    }

    /// Presences not removed yet.
    pub fn remaining(&self) -> usize {
        self.handles.len()
    }

    pub fn is_done(&self) -> bool {
        self.handles.is_empty()
    }

    pub(crate) fn take(&mut self, max: usize) -> impl Iterator<Item = Handle> + '_ {
        let keep = self.handles.len().saturating_sub(max);
        self.handles.drain(keep..)
    }
}
