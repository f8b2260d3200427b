//! `diff_window: 0` (`Registry::set_diff_per_operation`): random track, track of a gone
//! owner, untrack, update, exit and draining. The diffs drained, topic by
//! topic, must be exactly the model's single-operation diffs, in order:
//! a track is its join, an untrack its leave, an update the leave of the
//! old meta with the join of the new (`phx_ref_prev`), an exit one diff of
//! leaves per topic, a gone owner's track a join then a leave; a no-op
//! update nothing. And with the mode switched back and forth at random, a
//! subscriber applying every diff still ends up with exactly the list.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use presence_core::{CoreError, PartLimits, Presence, Ref, Registry, Update};
use proptest::prelude::*;

type Owner = u8;
type Meta = u8;
type Reg = Registry<Owner, Meta, ()>;

const TOPICS: [&[u8]; 3] = [b"lobby", b"room:1", b"room:2"];
const KEYS: [&[u8]; 3] = [b"alice", b"bob", b"carol"];
/// An owner that is never alive: tracking it is `track_gone`.
const GONE: Owner = 99;

#[derive(Debug, Clone)]
enum Op {
    Track(Owner, usize, usize, Meta),
    TrackGone(usize, usize, Meta),
    Untrack(Owner, usize, usize),
    Update(Owner, usize, usize, Meta),
    Exit(Owner),
    Drain(usize),
    /// Only in the switching property.
    DiffPerOperation(bool),
}

fn op(switching: bool) -> impl Strategy<Value = Op> {
    let owner = 0u8..5;
    let topic = 0..TOPICS.len();
    let key = 0..KEYS.len();
    let meta = 0u8..3;
    prop_oneof![
        4 => (owner.clone(), topic.clone(), key.clone(), meta.clone())
            .prop_map(|(o, t, k, m)| Op::Track(o, t, k, m)),
        1 => (topic.clone(), key.clone(), meta.clone()).prop_map(|(t, k, m)| Op::TrackGone(t, k, m)),
        2 => (owner.clone(), topic.clone(), key.clone()).prop_map(|(o, t, k)| Op::Untrack(o, t, k)),
        3 => (owner.clone(), topic, key, meta).prop_map(|(o, t, k, m)| Op::Update(o, t, k, m)),
        1 => owner.prop_map(Op::Exit),
        2 => (1usize..4).prop_map(Op::Drain),
        if switching { 1 } else { 0 } => any::<bool>().prop_map(Op::DiffPerOperation),
    ]
}

/// A presence as a diff shows it: ref, key, meta, previous ref.
type Shown = (Ref, Vec<u8>, Meta, Option<Ref>);
/// One diff: joins and leaves, each sorted.
type Diff = (Vec<Shown>, Vec<Shown>);

fn shown(p: &Presence<Owner, Meta>) -> Shown {
    (p.phx_ref, p.key.to_vec(), p.meta, p.prev_ref())
}

fn diff(mut joins: Vec<Shown>, mut leaves: Vec<Shown>) -> Diff {
    joins.sort();
    leaves.sort();
    (joins, leaves)
}

/// (owner, topic, key) -> (meta, ref, prev ref)
type Model = BTreeMap<(Owner, usize, usize), (Meta, Ref, Option<Ref>)>;

/// Takes diffs as the dispatcher does (`max_topics` at a time, until none
/// is left), appending each part to its topic's sequence.
fn drain(reg: &mut Reg, got: &mut [Vec<Diff>], max_topics: usize) {
    loop {
        let diffs = reg.take_diffs(max_topics, usize::MAX);
        if diffs.is_empty() {
            return;
        }
        for topic_diff in diffs {
            let t = TOPICS
                .iter()
                .position(|t| *t == &*topic_diff.topic)
                .unwrap();
            for (joins, leaves) in topic_diff.parts(PartLimits::UNLIMITED, |_| 1) {
                got[t].push(diff(
                    joins.into_iter().map(shown).collect(),
                    leaves.into_iter().map(shown).collect(),
                ));
            }
        }
    }
}

/// Runs `op` on the registry and the model; returns the single-operation
/// diffs the model expects from it, by topic.
fn run(reg: &mut Reg, model: &mut Model, op: &Op) -> Result<Vec<(usize, Diff)>, TestCaseError> {
    let key = |k: usize| KEYS[k].to_vec();
    Ok(match *op {
        Op::Track(o, t, k, m) => {
            let result = reg.track(o, TOPICS[t], KEYS[k], m, || Some(()));
            match model.entry((o, t, k)) {
                Entry::Occupied(_) => {
                    prop_assert_eq!(result, Err(CoreError::AlreadyTracked));
                    vec![]
                }
                Entry::Vacant(slot) => {
                    let r = result.unwrap().phx_ref;
                    slot.insert((m, r, None));
                    vec![(t, diff(vec![(r, key(k), m, None)], vec![]))]
                }
            }
        }
        Op::TrackGone(t, k, m) => {
            prop_assert_eq!(
                reg.track(GONE, TOPICS[t], KEYS[k], m, || None),
                Err(CoreError::OwnerGone)
            );
            let r = reg.track_gone(GONE, TOPICS[t], KEYS[k], m).phx_ref;
            let presence = (r, key(k), m, None);
            vec![
                (t, diff(vec![presence.clone()], vec![])),
                (t, diff(vec![], vec![presence])),
            ]
        }
        Op::Untrack(o, t, k) => {
            let removed = reg.untrack(o, TOPICS[t], KEYS[k]).removed;
            match model.remove(&(o, t, k)) {
                None => {
                    prop_assert_eq!(removed, 0);
                    vec![]
                }
                Some((m, r, prev)) => {
                    prop_assert_eq!(removed, 1);
                    vec![(t, diff(vec![], vec![(r, key(k), m, prev)]))]
                }
            }
        }
        Op::Update(o, t, k, m) => {
            let result = reg.update(o, TOPICS[t], KEYS[k], m, None);
            match (model.get_mut(&(o, t, k)), result) {
                (None, result) => {
                    prop_assert_eq!(result, Err(CoreError::NotTracked));
                    vec![]
                }
                (Some((old, r, _)), Ok(Update::Unchanged(same))) => {
                    prop_assert_eq!((*old, *r), (m, same));
                    vec![]
                }
                (Some(entry), Ok(Update::Changed(change))) => {
                    let (old_meta, old_ref, old_prev) = *entry;
                    *entry = (m, change.phx_ref, Some(old_ref));
                    let joined = (change.phx_ref, key(k), m, Some(old_ref));
                    let left = (old_ref, key(k), old_meta, old_prev);
                    vec![(t, diff(vec![joined], vec![left]))]
                }
                (Some(_), Err(e)) => return Err(TestCaseError::fail(format!("update: {e}"))),
            }
        }
        Op::Exit(o) => {
            let mut leaves: BTreeMap<usize, Vec<Shown>> = BTreeMap::new();
            model.retain(|&(owner, t, k), &mut (m, r, prev)| {
                if owner == o {
                    leaves.entry(t).or_default().push((r, key(k), m, prev));
                }
                owner != o
            });
            // Removed two at a time, as the NIF removes a large owner's
            // presences a chunk at a time: still one diff per topic.
            if let Some((_, mut departure)) = reg.depart(o) {
                while !departure.is_done() {
                    reg.remove_departed(&mut departure, 2);
                }
            }
            leaves
                .into_iter()
                .map(|(t, left)| (t, diff(vec![], left)))
                .collect()
        }
        Op::Drain(_) | Op::DiffPerOperation(_) => vec![],
    })
}

/// Applies a diff as phoenix.js does, to a view of ref -> (key, meta).
fn apply(view: &mut BTreeMap<Ref, (Vec<u8>, Meta)>, (joins, leaves): &Diff) {
    for (r, ..) in leaves {
        view.remove(r);
    }
    for (r, k, m, _) in joins {
        view.insert(*r, (k.clone(), *m));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn single_operation_diffs_in_order(ops in proptest::collection::vec(op(false), 1..120)) {
        let mut reg = Reg::new(7);
        reg.set_diff_per_operation(true);
        let mut model = Model::new();
        let mut expected = vec![Vec::new(); TOPICS.len()];
        let mut got = vec![Vec::new(); TOPICS.len()];
        for op in &ops {
            for (t, d) in run(&mut reg, &mut model, op)? {
                expected[t].push(d);
            }
            if let Op::Drain(max_topics) = op {
                drain(&mut reg, &mut got, *max_topics);
                prop_assert_eq!(&got, &expected);
            }
        }
        drain(&mut reg, &mut got, usize::MAX);
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(reg.pending_topics(), 0);
    }

    #[test]
    fn switching_modes_loses_and_repeats_nothing(ops in proptest::collection::vec(op(true), 1..120)) {
        let mut reg = Reg::new(7);
        let mut model = Model::new();
        let mut got = vec![Vec::new(); TOPICS.len()];
        for op in &ops {
            run(&mut reg, &mut model, op)?;
            match op {
                Op::Drain(max_topics) => drain(&mut reg, &mut got, *max_topics),
                Op::DiffPerOperation(on) => reg.set_diff_per_operation(*on),
                _ => {}
            }
        }
        drain(&mut reg, &mut got, usize::MAX);
        for (t, diffs) in got.iter().enumerate() {
            let mut view = BTreeMap::new();
            for d in diffs {
                // A ref joins at most once and leaves at most once, and
                // never leaves before it joined.
                for (r, ..) in &d.1 {
                    prop_assert!(view.contains_key(r), "leave of {} before its join", r);
                }
                apply(&mut view, d);
            }
            let listed: BTreeMap<Ref, (Vec<u8>, Meta)> = model
                .iter()
                .filter(|((_, topic, _), _)| *topic == t)
                .map(|((_, _, k), (m, r, _))| (*r, (KEYS[*k].to_vec(), *m)))
                .collect();
            prop_assert_eq!(&view, &listed, "subscriber view of topic {}", t);
        }
    }
}
