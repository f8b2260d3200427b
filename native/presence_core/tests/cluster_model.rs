//! Random operations on random nodes of a simulated cluster, with lost
//! deltas, partitions and heals, replicated the way `Drab.Presence.Cluster`
//! does it: each node's own changes leave as a delta when its diffs are
//! taken; a split drops each side's replica of the other; a heal, or a peer
//! that noticed a lost delta, syncs the full state.
//!
//! After a quiet period (everything healed, every diff taken and every
//! delta delivered), every node lists exactly the union of the live local
//! presences of all nodes, with the refs they have on their own node, and
//! each node's subscribers, having applied that node's diffs, see the same.

use std::collections::{BTreeMap, BTreeSet};

use presence_core::delta::{DeltaReader, DeltaWriter, Record};
use presence_core::{PartLimits, Ref, Registry, RemoteJoin};
use proptest::prelude::*;

const NODES: usize = 3;
const TOPICS: [&[u8]; 2] = [b"lobby", b"room"];
const KEYS: [&[u8]; 3] = [b"alice", b"bob", b"carol"];

type Meta = Vec<u8>;
type Reg = Registry<u8, Meta, ()>;

/// A meta the delta format accepts: the head of `term_to_binary` of a map,
/// then one byte that tells metas apart.
fn meta(m: u8) -> Meta {
    vec![131, 116, 0, 0, 0, 0, m]
}

#[derive(Debug, Clone)]
enum Op {
    Track(usize, u8, usize, usize, u8),
    Untrack(usize, u8, usize, usize),
    Update(usize, u8, usize, usize, u8),
    Exit(usize, u8),
    /// A node takes its diffs; its delta reaches the peers it is connected to.
    Tick(usize),
    /// A node takes its diffs, and the network loses its delta.
    LoseDelta(usize),
    Split(usize, usize),
    Heal(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    let owner = 0u8..4;
    let topic = 0..TOPICS.len();
    let key = 0..KEYS.len();
    let m = 0u8..3;
    prop_oneof![
        5 => (node.clone(), owner.clone(), topic.clone(), key.clone(), m.clone())
            .prop_map(|(n, o, t, k, m)| Op::Track(n, o, t, k, m)),
        2 => (node.clone(), owner.clone(), topic.clone(), key.clone())
            .prop_map(|(n, o, t, k)| Op::Untrack(n, o, t, k)),
        2 => (node.clone(), owner.clone(), topic, key, m)
            .prop_map(|(n, o, t, k, m)| Op::Update(n, o, t, k, m)),
        1 => (node.clone(), owner).prop_map(|(n, o)| Op::Exit(n, o)),
        4 => node.clone().prop_map(Op::Tick),
        1 => node.clone().prop_map(Op::LoseDelta),
        1 => (node.clone(), node.clone()).prop_map(|(a, b)| Op::Split(a, b)),
        1 => (node.clone(), node).prop_map(|(a, b)| Op::Heal(a, b)),
    ]
}

/// What a subscriber of one topic on one node believes: ref -> (key, meta).
type View = BTreeMap<Ref, (Vec<u8>, Meta)>;

struct Cluster {
    nodes: Vec<Reg>,
    /// Subscribers' views, by node and topic.
    views: Vec<Vec<View>>,
    connected: BTreeSet<(usize, usize)>,
    /// (receiver, sender) pairs where the receiver missed a delta and will
    /// resync (a heartbeat announces the gap).
    gaps: BTreeSet<(usize, usize)>,
}

/// The replica of `sender` on any node.
fn replica_of(sender: usize) -> u32 {
    sender as u32 + 1
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Cluster {
    fn new() -> Self {
        let mut connected = BTreeSet::new();
        for a in 0..NODES {
            for b in a + 1..NODES {
                connected.insert((a, b));
            }
        }
        Self {
            nodes: (0..NODES).map(|n| Reg::new(1_000_000 * n as u64)).collect(),
            views: vec![vec![View::new(); TOPICS.len()]; NODES],
            connected,
            gaps: BTreeSet::new(),
        }
    }

    /// Takes `node`'s diffs: its subscribers apply them, and its own
    /// changes come back as a delta.
    fn take(&mut self, node: usize) -> Vec<u8> {
        let mut delta = DeltaWriter::new();
        for diff in self.nodes[node].take_diffs(usize::MAX, usize::MAX) {
            delta.diff(&diff);
            let topic = TOPICS.iter().position(|t| *t == &*diff.topic).unwrap();
            let view = &mut self.views[node][topic];
            // As phoenix.js applies a diff: its joins, then its leaves. These
            // subscribers never list, so they hear each ref join once
            // before it leaves, across netsplits and heals too.
            for (joins, leaves) in diff.parts(PartLimits::UNLIMITED, |_| 1) {
                for join in joins {
                    let joined = (join.key.to_vec(), join.meta.clone());
                    let before = view.insert(join.shown_ref(), joined);
                    assert_eq!(
                        before,
                        None,
                        "node {node} heard {} join twice",
                        join.shown_ref()
                    );
                }
                for leave in leaves {
                    let left = view.remove(&leave.shown_ref());
                    assert!(
                        left.is_some(),
                        "node {node} heard {} leave unjoined",
                        leave.shown_ref()
                    );
                }
            }
        }
        delta.take()
    }

    fn tick(&mut self, node: usize, lost: bool) {
        let delta = self.take(node);
        for peer in 0..NODES {
            if peer == node || !self.connected.contains(&pair(node, peer)) {
                continue;
            }
            if lost {
                self.gaps.insert((peer, node));
            } else if !self.gaps.contains(&(peer, node)) {
                apply(&mut self.nodes[peer], replica_of(node), &delta);
            }
        }
    }

    fn split(&mut self, a: usize, b: usize) {
        if a == b || !self.connected.remove(&pair(a, b)) {
            return;
        }
        for (node, gone) in [(a, b), (b, a)] {
            if let Some(mut departure) = self.nodes[node].drop_replica(replica_of(gone)) {
                self.nodes[node].remove_departed(&mut departure, 2);
                self.nodes[node].remove_departed(&mut departure, usize::MAX);
            }
            self.gaps.remove(&(node, gone));
        }
    }

    fn heal(&mut self, a: usize, b: usize) {
        if a == b || !self.connected.insert(pair(a, b)) {
            return;
        }
        self.sync(a, b);
        self.sync(b, a);
    }

    /// `receiver` replaces what it holds of `sender` with its full state.
    fn sync(&mut self, receiver: usize, sender: usize) {
        let mut state = DeltaWriter::new();
        for (topic, snapshot) in self.nodes[sender].observed_snapshots() {
            for presence in snapshot.iter().filter(|p| p.is_local()) {
                state.join(&topic, presence);
            }
        }
        let state = state.take();
        let reg = &mut self.nodes[receiver];
        reg.replica_begin_sync(replica_of(sender));
        apply(reg, replica_of(sender), &state);
        let mut stale = reg.replica_end_sync(replica_of(sender));
        reg.remove_departed(&mut stale, usize::MAX);
        self.gaps.remove(&(receiver, sender));
    }

    fn quiesce(&mut self) {
        for a in 0..NODES {
            for b in a + 1..NODES {
                self.heal(a, b);
            }
        }
        for node in 0..NODES {
            self.tick(node, false);
        }
        for (receiver, sender) in std::mem::take(&mut self.gaps) {
            self.sync(receiver, sender);
        }
        // Applying deltas and syncs made diffs on the receivers.
        for node in 0..NODES {
            let delta = self.take(node);
            assert!(delta.is_empty(), "only replicas changed: nothing to send");
        }
    }
}

fn apply(reg: &mut Reg, replica: u32, delta: &[u8]) {
    for record in DeltaReader::new(delta).unwrap() {
        match record.unwrap() {
            Record::Join(join) => {
                reg.replica_join(
                    replica,
                    RemoteJoin {
                        topic: join.topic,
                        key: join.key,
                        meta: join.meta.to_vec(),
                        phx_ref: join.phx_ref,
                        prev_ref: join.prev_ref,
                    },
                );
            }
            Record::Leave(phx_ref) => {
                reg.replica_leave(replica, phx_ref);
            }
        }
    }
}

fn listed(reg: &Reg, topic: usize) -> View {
    reg.snapshot(TOPICS[topic])
        .map(|snap| {
            snap.iter()
                .map(|p| (p.shown_ref(), (p.key.to_vec(), p.meta.clone())))
                .collect()
        })
        .unwrap_or_default()
}

fn local(reg: &Reg, topic: usize) -> View {
    reg.snapshot(TOPICS[topic])
        .map(|snap| {
            snap.iter()
                .filter(|p| p.is_local())
                .map(|p| (p.shown_ref(), (p.key.to_vec(), p.meta.clone())))
                .collect()
        })
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_node_converges_on_the_union_of_local_presences(ops in proptest::collection::vec(op(), 1..120)) {
        let mut cluster = Cluster::new();
        for op in ops {
            match op {
                Op::Track(n, o, t, k, m) => {
                    let _ = cluster.nodes[n].track(o, TOPICS[t], KEYS[k], meta(m), || Some(()));
                }
                Op::Untrack(n, o, t, k) => {
                    cluster.nodes[n].untrack(o, TOPICS[t], KEYS[k]);
                }
                Op::Update(n, o, t, k, m) => {
                    let _ = cluster.nodes[n].update(o, TOPICS[t], KEYS[k], meta(m), None);
                }
                Op::Exit(n, o) => {
                    cluster.nodes[n].untrack_owner(o);
                }
                Op::Tick(n) => cluster.tick(n, false),
                Op::LoseDelta(n) => cluster.tick(n, true),
                Op::Split(a, b) => cluster.split(a, b),
                Op::Heal(a, b) => cluster.heal(a, b),
            }
        }
        cluster.quiesce();

        for (topic, name) in TOPICS.iter().enumerate() {
            let mut union = View::new();
            for reg in &cluster.nodes {
                union.extend(local(reg, topic));
            }
            for node in 0..NODES {
                let listed = listed(&cluster.nodes[node], topic);
                prop_assert_eq!(&listed, &union, "node {} lists topic {}", node, topic);
                prop_assert_eq!(&cluster.views[node][topic], &union, "node {}'s subscribers", node);
                let users: BTreeSet<&Vec<u8>> = union.values().map(|(k, _)| k).collect();
                let counts = cluster.nodes[node].counts(name);
                prop_assert_eq!((counts.users, counts.connections), (users.len(), union.len()));
            }
        }
    }
}
