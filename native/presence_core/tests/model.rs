//! Random sequences of track, untrack, update, owner exit and diff draining,
//! checked against a plain model after every step:
//! counts, lists and `get_by_key` agree with the model; a subscriber that
//! applies every drained diff to the last list it saw ends up with exactly
//! the current list; and one that never lists hears each ref join once,
//! before its leave, however the other lists.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use presence_core::key::listed_key;
use presence_core::{CoreError, Counts, PartLimits, Ref, Registry, Update};
use proptest::prelude::*;

type Owner = u8;
type Meta = u8;
type Reg = Registry<Owner, Meta, ()>;

const TOPICS: [&[u8]; 3] = [b"lobby", b"room:1", b"room:2"];
/// Binary keys, and tagged term keys (`presence_core::key`): two listed
/// as "bob" like the binary, one as "dan" alone.
const KEYS: [&[u8]; 6] = [
    b"alice",
    b"bob",
    b"carol",
    b"\x83\x00\x00\x00\x03bob\x83\x61\x01",
    b"\x83\x00\x00\x00\x03bob\x83\x61\x02",
    b"\x83\x00\x00\x00\x03dan\x83\x61\x03",
];

#[derive(Debug, Clone)]
enum Op {
    Track(Owner, usize, usize, Meta),
    Untrack(Owner, usize, usize),
    Update(Owner, usize, usize, Meta),
    Exit(Owner),
    Drain(usize),
    /// A subscriber of a topic syncs from `list/1`, as a (re)joining
    /// client does from `presence_state`.
    Resync(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let owner = 0u8..5;
    let topic = 0..TOPICS.len();
    let key = 0..KEYS.len();
    let meta = 0u8..3;
    prop_oneof![
        4 => (owner.clone(), topic.clone(), key.clone(), meta.clone())
            .prop_map(|(o, t, k, m)| Op::Track(o, t, k, m)),
        2 => (owner.clone(), topic.clone(), key.clone()).prop_map(|(o, t, k)| Op::Untrack(o, t, k)),
        2 => (owner.clone(), topic, key, meta).prop_map(|(o, t, k, m)| Op::Update(o, t, k, m)),
        1 => owner.prop_map(Op::Exit),
        2 => (1usize..4).prop_map(Op::Drain),
        1 => (0..TOPICS.len()).prop_map(Op::Resync),
    ]
}

/// (owner, topic, key) -> (meta, ref)
type Model = BTreeMap<(Owner, usize, usize), (Meta, Ref)>;
/// What a subscriber of a topic believes: ref -> (key, meta)
type View = BTreeMap<Ref, (Vec<u8>, Meta)>;

fn listed(reg: &Reg, topic: usize) -> View {
    reg.snapshot(TOPICS[topic])
        .map(|snap| {
            snap.iter()
                .map(|p| (p.phx_ref, (p.key.to_vec(), p.meta)))
                .collect()
        })
        .unwrap_or_default()
}

fn modelled(model: &Model, topic: usize) -> View {
    model
        .iter()
        .filter(|((_, t, _), _)| *t == topic)
        .map(|((_, _, k), (m, r))| (*r, (KEYS[*k].to_vec(), *m)))
        .collect()
}

/// What the subscribers of each topic believe: one that lists now and then
/// (`Resync`), and one that never lists and knows only what diffs told it.
#[derive(Default, Clone)]
struct Views {
    listing: View,
    pure: View,
}

/// Applies drained diffs as phoenix.js does, in parts of at most two
/// presences, as the NIF cuts large diffs: each part's joins, then its
/// leaves.
fn apply_diffs(reg: &mut Reg, views: &mut [Views], max_topics: usize) {
    for diff in reg.take_diffs(max_topics, usize::MAX) {
        let topic = TOPICS.iter().position(|t| *t == &*diff.topic).unwrap();
        for (joins, leaves) in diff.parts(
            PartLimits {
                presences: 2,
                weight: usize::MAX,
            },
            |_| 1,
        ) {
            let views = &mut views[topic];
            for join in joins {
                let joined = (join.key.to_vec(), join.meta);
                // A join of a ref the listing view has (from its own
                // listing) replaces it; a subscriber that never listed
                // hears of each ref's join once.
                views.listing.insert(join.phx_ref, joined.clone());
                let before = views.pure.insert(join.phx_ref, joined);
                assert_eq!(
                    before, None,
                    "a second join of {} for a subscriber",
                    join.phx_ref
                );
            }
            for leave in leaves {
                let left = (leave.key.to_vec(), leave.meta);
                // A leave of a ref the listing view never had (one listed
                // to another client) is ignored, as phoenix.js ignores it.
                if let Some(seen) = views.listing.remove(&leave.phx_ref) {
                    assert_eq!(seen, left, "leave of another meta");
                }
                let seen = views.pure.remove(&leave.phx_ref);
                assert_eq!(
                    seen,
                    Some(left),
                    "a subscriber that never listed hears {} leave",
                    leave.phx_ref
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn registry_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut reg = Reg::new(1000);
        let mut model = Model::new();
        let mut views = vec![Views::default(); TOPICS.len()];

        for op in ops {
            match op {
                Op::Track(o, t, k, m) => {
                    let result = reg.track(o, TOPICS[t], KEYS[k], m, || Some(()));
                    match model.entry((o, t, k)) {
                        Entry::Occupied(_) => prop_assert_eq!(result, Err(CoreError::AlreadyTracked)),
                        Entry::Vacant(slot) => {
                            slot.insert((m, result.unwrap().phx_ref));
                        }
                    }
                }
                Op::Untrack(o, t, k) => {
                    let removed = reg.untrack(o, TOPICS[t], KEYS[k]).removed;
                    prop_assert_eq!(removed, model.remove(&(o, t, k)).map_or(0, |_| 1));
                }
                Op::Update(o, t, k, m) => {
                    let result = reg.update(o, TOPICS[t], KEYS[k], m, None);
                    match (model.get_mut(&(o, t, k)), result) {
                        (None, result) => prop_assert_eq!(result, Err(CoreError::NotTracked)),
                        (Some((old, r)), Ok(Update::Unchanged(same))) => {
                            prop_assert_eq!(*old, m);
                            prop_assert_eq!(*r, same);
                        }
                        (Some((old, r)), Ok(Update::Changed(change))) => {
                            prop_assert_ne!(*old, m);
                            prop_assert_ne!(*r, change.phx_ref);
                            *old = m;
                            *r = change.phx_ref;
                        }
                        (Some(_), Err(e)) => prop_assert!(false, "update failed: {e}"),
                    }
                }
                Op::Exit(o) => {
                    let expected = model.keys().filter(|(owner, _, _)| *owner == o).count();
                    model.retain(|(owner, _, _), _| *owner != o);
                    // Departures are removed in chunks of two, as the NIF
                    // removes a large owner's presences.
                    let mut removed = 0;
                    if let Some((_, mut departure)) = reg.depart(o) {
                        while !departure.is_done() {
                            removed += reg.remove_departed(&mut departure, 2).removed;
                        }
                    }
                    prop_assert_eq!(removed, expected);
                }
                Op::Drain(max_topics) => apply_diffs(&mut reg, &mut views, max_topics),
                Op::Resync(t) => {
                    reg.observe(TOPICS[t]);
                    views[t].listing = listed(&reg, t);
                }
            }

            for (t, topic) in TOPICS.iter().enumerate() {
                let expected = modelled(&model, t);
                prop_assert_eq!(&listed(&reg, t), &expected);
                // Users are keys as listed: 42 and "42" are one.
                let users: BTreeSet<_> = expected.values().map(|(k, _)| listed_key(k).to_vec()).collect();
                prop_assert_eq!(reg.counts(topic), Counts { users: users.len(), connections: expected.len() });
                for key in KEYS {
                    let mut by_key: Vec<_> = reg.get_by_key(topic, key).iter().map(|p| p.phx_ref).collect();
                    by_key.sort();
                    let want: Vec<_> = expected.iter().filter(|(_, (k, _))| k == key).map(|(r, _)| *r).collect();
                    prop_assert_eq!(by_key, want);
                }
            }
            prop_assert_eq!(reg.len(), model.len());
            let occupied: BTreeSet<usize> = model.keys().map(|(_, t, _)| *t).collect();
            prop_assert_eq!(reg.topic_count(), occupied.len());
        }

        apply_diffs(&mut reg, &mut views, usize::MAX);
        for (t, view) in views.iter().enumerate() {
            prop_assert_eq!(&view.listing, &modelled(&model, t), "listing view of topic {}", t);
            prop_assert_eq!(&view.pure, &modelled(&model, t), "pure view of topic {}", t);
        }
        prop_assert_eq!(reg.pending_topics(), 0);
        prop_assert!(reg.take_diffs(usize::MAX, usize::MAX).is_empty());
    }
}
