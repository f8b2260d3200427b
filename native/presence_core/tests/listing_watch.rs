//! A copy of a topic's listing kept up to date from the registry's listing
//! watch (as the NIF keeps one as a term) always equals a listing made
//! from scratch: random tracks, untracks, updates, owner exits, other
//! nodes' joins, leaves and drops, diff draining (which removes emptied
//! topics) and keys that are not binaries (listed under their string with
//! a binary key), with the copy refreshed now and then from the changed
//! listed keys alone, and built again when the watch is lost.

use std::collections::BTreeMap;

use presence_core::key::listed_key;
use presence_core::listing::{ListingChanges, WatchId, MAX_CHANGED_KEYS};
use presence_core::{Ref, Registry, RemoteJoin};
use proptest::prelude::*;

type Reg = Registry<u8, u8, ()>;

const TOPIC: &[u8] = b"lobby";
/// Binary keys, and one tagged term key listed as "bob" like the binary.
const KEYS: [&[u8]; 4] = [
    b"alice",
    b"bob",
    b"carol",
    b"\x83\x00\x00\x00\x03bob\x83\x61\x01",
];

/// listed key -> its presences as (owner order, ref, meta): what list/1
/// shows of a topic.
type Listing = BTreeMap<Vec<u8>, Vec<(Ref, u8)>>;

#[derive(Debug, Clone)]
enum Op {
    Track(u8, usize, u8),
    Untrack(u8, usize),
    Update(u8, usize, u8),
    Exit(u8),
    ReplicaJoin(u32, Ref, usize, u8),
    ReplicaLeave(u32, Ref),
    DropReplica(u32),
    Drain,
    /// A list: the copy is refreshed (or built) and compared.
    List,
}

fn op(term_keys: bool) -> impl Strategy<Value = Op> {
    let keys = if term_keys {
        KEYS.len()
    } else {
        KEYS.len() - 1
    };
    let owner = 0u8..6;
    let key = 0..keys;
    let meta = 0u8..3;
    prop_oneof![
        4 => (owner.clone(), key.clone(), meta.clone()).prop_map(|(o, k, m)| Op::Track(o, k, m)),
        2 => (owner.clone(), key.clone()).prop_map(|(o, k)| Op::Untrack(o, k)),
        2 => (owner.clone(), key.clone(), meta.clone()).prop_map(|(o, k, m)| Op::Update(o, k, m)),
        1 => owner.prop_map(Op::Exit),
        2 => (1u32..3, 1u64..6, key, meta).prop_map(|(r, p, k, m)| Op::ReplicaJoin(r, p, k, m)),
        1 => (1u32..3, 1u64..6).prop_map(|(r, p)| Op::ReplicaLeave(r, p)),
        1 => (1u32..3).prop_map(Op::DropReplica),
        1 => Just(Op::Drain),
        3 => Just(Op::List),
    ]
}

fn group<'a>(presences: impl Iterator<Item = &'a presence_core::Presence<u8, u8>>) -> Listing {
    let mut by_key: BTreeMap<Vec<u8>, Vec<_>> = BTreeMap::new();
    for p in presences {
        by_key
            .entry(listed_key(&p.key).to_vec())
            .or_default()
            .push((p.owner, p.phx_ref, p.meta));
    }
    by_key
        .into_iter()
        .map(|(k, mut ps)| {
            ps.sort_by_key(|a| (a.0, a.1));
            (k, ps.into_iter().map(|(_, r, m)| (r, m)).collect())
        })
        .collect()
}

fn from_scratch(reg: &Reg) -> Listing {
    reg.snapshot(TOPIC)
        .map(|s| group(s.iter()))
        .unwrap_or_default()
}

/// The copy and the watch that keeps it, as the NIF holds them.
#[derive(Default)]
struct Copy {
    kept: Option<(WatchId, Listing)>,
    rebuilds: usize,
    refreshes: usize,
}

impl Copy {
    fn list(&mut self, reg: &mut Reg) -> Listing {
        if let Some((watch, listing)) = &mut self.kept {
            match reg.take_listing_changes(TOPIC, *watch) {
                ListingChanges::Keys(keys) => {
                    for (key, presences) in reg.listed_under(TOPIC, keys) {
                        match group(presences.iter()).remove(&key[..]) {
                            Some(now) => listing.insert(key.to_vec(), now),
                            None => listing.remove(&key[..]),
                        };
                    }
                    self.refreshes += 1;
                    return listing.clone();
                }
                ListingChanges::Lost => self.kept = None,
            }
        }
        let listing = from_scratch(reg);
        if let Some(watch) = reg.watch_listing(TOPIC) {
            self.rebuilds += 1;
            self.kept = Some((watch, listing.clone()));
        }
        listing
    }
}

fn run(ops: &[Op]) -> Copy {
    let mut reg = Reg::new(7);
    let mut copy = Copy::default();
    for op in ops {
        match *op {
            Op::Track(o, k, m) => {
                let _ = reg.track(o, TOPIC, KEYS[k], m, || Some(()));
            }
            Op::Untrack(o, k) => {
                reg.untrack(o, TOPIC, KEYS[k]);
            }
            Op::Update(o, k, m) => {
                let _ = reg.update(o, TOPIC, KEYS[k], m, None);
            }
            Op::Exit(o) => {
                reg.untrack_owner(o);
            }
            Op::ReplicaJoin(replica, phx_ref, k, m) => {
                reg.replica_join(
                    replica,
                    RemoteJoin {
                        topic: TOPIC,
                        key: KEYS[k],
                        meta: m,
                        phx_ref,
                        prev_ref: None,
                    },
                );
            }
            Op::ReplicaLeave(replica, phx_ref) => {
                reg.replica_leave(replica, phx_ref);
            }
            Op::DropReplica(replica) => {
                if let Some(mut departure) = reg.drop_replica(replica) {
                    reg.remove_departed(&mut departure, usize::MAX);
                }
            }
            Op::Drain => {
                reg.take_diffs(usize::MAX, usize::MAX);
            }
            Op::List => {
                assert_eq!(copy.list(&mut reg), from_scratch(&reg), "after {ops:?}");
            }
        }
    }
    assert_eq!(copy.list(&mut reg), from_scratch(&reg));
    copy
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_copy_refreshed_from_changed_keys_equals_the_listing(
        ops in proptest::collection::vec(op(false), 1..120)
    ) {
        run(&ops);
    }

    #[test]
    fn keys_that_are_not_binaries_are_refreshed_under_their_string(
        ops in proptest::collection::vec(op(true), 1..120)
    ) {
        run(&ops);
    }
}

#[test]
fn refreshes_are_the_common_case_and_a_burst_of_changes_loses_the_watch() {
    let mut reg = Reg::new(7);
    let mut copy = Copy::default();
    for owner in 0..100u8 {
        reg.track(owner, TOPIC, &[b'k', owner], 0, || Some(()))
            .unwrap();
    }
    copy.list(&mut reg);
    for owner in 0..10u8 {
        reg.update(owner, TOPIC, &[b'k', owner], 1, None).unwrap();
        assert_eq!(copy.list(&mut reg), from_scratch(&reg));
    }
    assert_eq!((copy.rebuilds, copy.refreshes), (1, 10));

    let watch = copy.kept.as_ref().unwrap().0;
    for round in 0..=MAX_CHANGED_KEYS / 100 {
        for owner in 0..100u8 {
            let meta = 2 + (round % 2) as u8;
            reg.update(owner, TOPIC, &[b'k', owner], meta, None)
                .unwrap();
        }
    }
    assert_eq!(reg.listing_changes_pending(TOPIC, watch), None);
    assert_eq!(copy.list(&mut reg), from_scratch(&reg));
    assert_eq!(copy.rebuilds, 2);
}

#[test]
fn an_emptied_topic_loses_its_watch_when_removed() {
    let mut reg = Reg::new(7);
    let mut copy = Copy::default();
    reg.track(1, TOPIC, b"alice", 0, || Some(())).unwrap();
    copy.list(&mut reg);
    assert!(reg.is_listing_watched(TOPIC));
    reg.untrack_owner(1);
    reg.take_diffs(usize::MAX, usize::MAX);
    assert!(!reg.is_listing_watched(TOPIC));
    reg.track(2, TOPIC, b"bob", 0, || Some(())).unwrap();
    assert_eq!(copy.list(&mut reg), from_scratch(&reg));
    assert_eq!(copy.rebuilds, 2);
}
