//! The replication wire format: what a node sends the others about its own
//! presences, as deltas and as full states.
//!
//! ```text
//! delta  := VERSION record*
//! record := 0x01 bytes                        the topic of the joins after it
//!         | 0x02 ref prev bytes(key) bytes(meta)   a join
//!         | 0x03 ref                          a leave
//! prev   := 0x00 | 0x01 ref
//! ref    := u64, big-endian (the presence's ref on its own node)
//! bytes  := varint length, then that many bytes
//! ```
//!
//! Metas travel as the `term_to_binary/1` bytes they are stored as. A full
//! state is a delta of joins only. Records stand alone (a join needs only
//! the topic record before it), so a long delta is applied a chunk at a
//! time, and writing one never needs to know how much will follow.
//!
//! Decoding never panics: anything malformed is a [`DeltaError`], found by
//! [`validate`] before a single record is applied.

use crate::diff::TopicDiff;
use crate::etf;
use crate::presence::{Bytes, Presence, Ref};
use crate::Snapshot;

pub const VERSION: u8 = 1;

/// Bytes of full state per chunk: a joining node applies one while the
/// next is still on the wire.
pub const STATE_CHUNK_BYTES: usize = 256 * 1024;

const TOPIC: u8 = 1;
const JOIN: u8 = 2;
const LEAVE: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaError {
    /// Not a delta of this version.
    Version,
    /// Ends in the middle of a record.
    Truncated,
    /// A record of unknown kind, a join before any topic, or a meta that is
    /// not a map.
    Malformed,
}

impl std::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeltaError::Version => "not a presence delta of a known version",
            DeltaError::Truncated => "presence delta is truncated",
            DeltaError::Malformed => "presence delta is malformed",
        })
    }
}

impl std::error::Error for DeltaError {}

/// Builds a delta record by record. Consecutive joins on one topic name it
/// once.
#[derive(Debug, Default)]
pub struct DeltaWriter {
    out: Vec<u8>,
    topic: Vec<u8>,
    records: usize,
}

/// Records of another node's delta or state applied per hold of the table
/// lock (the NIF) or per step between other requests (the sidecar): tens of
/// microseconds, so that a 100k-presence state never holds up local writers.
pub const APPLY_CHUNK: usize = 256;

/// A presence as another node reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteJoin<'a, M> {
    pub topic: &'a [u8],
    pub key: &'a [u8],
    pub meta: M,
    /// Its ref on its own node.
    pub phx_ref: Ref,
    pub prev_ref: Option<Ref>,
}

impl DeltaWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the changes this node's own processes made in `diff`, for
    /// the other nodes: replicas' presences are theirs to report.
    pub fn diff<O, M: AsRef<[u8]>>(&mut self, diff: &TopicDiff<O, M>) {
        // In operation order: a presence may join in one op and leave in
        // a later one, and a replica applies records in turn.
        for op in diff.ops() {
            for leave in op.leaves.iter().filter(|p| p.is_local()) {
                self.leave(leave.phx_ref);
            }
            for join in op.joins.iter().filter(|p| p.is_local()) {
                self.join(&diff.topic, join);
            }
        }
        for leave in diff.leaves().filter(|p| p.is_local()) {
            self.leave(leave.phx_ref);
        }
        // Not the gone joins: the other nodes never listed this node's
        // table mid-window (a full state is taken as a list, and its leaves
        // are sent), and a join there after its leave would stay.
        for join in diff.present_joins().filter(|p| p.is_local()) {
            self.join(&diff.topic, join);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Records written so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn join<O, M: AsRef<[u8]>>(&mut self, topic: &[u8], presence: &Presence<O, M>) {
        self.start_record();
        if self.records == 1 || self.topic != topic {
            self.out.push(TOPIC);
            write_bytes(&mut self.out, topic);
            self.topic.clear();
            self.topic.extend_from_slice(topic);
        }
        self.out.push(JOIN);
        self.out
            .extend_from_slice(&presence.shown_ref().to_be_bytes());
        match presence.prev_ref() {
            None => self.out.push(0),
            Some(prev) => {
                self.out.push(1);
                self.out.extend_from_slice(&prev.to_be_bytes());
            }
        }
        write_bytes(&mut self.out, &presence.key);
        write_bytes(&mut self.out, presence.meta.as_ref());
    }

    pub fn leave(&mut self, phx_ref: Ref) {
        self.start_record();
        self.out.push(LEAVE);
        self.out.extend_from_slice(&phx_ref.to_be_bytes());
    }

    /// The delta written so far; the writer starts over, empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.records = 0;
        self.topic.clear();
        std::mem::take(&mut self.out)
    }

    fn start_record(&mut self) {
        if self.records == 0 {
            self.out.push(VERSION);
        }
        self.records += 1;
    }
}

/// This node's side of replication: its changes waiting to go out as the
/// next delta, and the number of the last delta handed out. Both backends
/// keep one with their table.
#[derive(Debug, Default)]
pub struct Outgoing {
    pending: DeltaWriter,
    seq: u64,
}

impl Outgoing {
    /// Adds this node's changes among `diffs` (in their operation order).
    /// Returns whether they are the first to wait: the replicator is then
    /// told to take them.
    pub fn record<O, M: AsRef<[u8]>>(&mut self, diffs: &[TopicDiff<O, M>]) -> bool {
        let was_empty = self.pending.is_empty();
        for diff in diffs {
            self.pending.diff(diff);
        }
        was_empty && !self.pending.is_empty()
    }

    /// The changes recorded since the last take, as the next numbered
    /// delta, or `None` when there are none.
    pub fn take(&mut self) -> Option<(u64, Vec<u8>)> {
        if self.pending.is_empty() {
            return None;
        }
        self.seq += 1;
        Some((self.seq, self.pending.take()))
    }

    /// Forgets what is pending (replication switched off).
    pub fn discard(&mut self) {
        self.pending.take();
    }

    /// The number of the last delta handed out.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Numbers deltas on from `seq` at least: a table that replaces a dead
    /// one (the sidecar's) goes on where its predecessor stopped.
    pub fn resume_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }
}

/// The local presences of `snapshots` (replicas' are theirs to send), as
/// deltas of joins of about `max_bytes` each: a full state, in chunks.
pub fn state_chunks<O, M: AsRef<[u8]>>(
    snapshots: &[(Bytes, Snapshot<Presence<O, M>>)],
    max_bytes: usize,
) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut writer = DeltaWriter::new();
    for (topic, snapshot) in snapshots {
        for presence in snapshot.iter().filter(|p| p.is_local()) {
            writer.join(topic, presence);
            if writer.len() >= max_bytes {
                chunks.push(writer.take());
            }
        }
    }
    if !writer.is_empty() {
        chunks.push(writer.take());
    }
    chunks
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push((len as u8) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
}

/// One record of a delta.
#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    Join(RemoteJoin<'a, &'a [u8]>),
    Leave(Ref),
}

/// Reads the records of a delta, in order.
#[derive(Debug, Clone)]
pub struct DeltaReader<'a> {
    rest: &'a [u8],
    topic: Option<&'a [u8]>,
    failed: bool,
}

impl<'a> DeltaReader<'a> {
    pub fn new(delta: &'a [u8]) -> Result<Self, DeltaError> {
        match delta {
            [] => Ok(Self {
                rest: &[],
                topic: None,
                failed: false,
            }),
            [VERSION, rest @ ..] => Ok(Self {
                rest,
                topic: None,
                failed: false,
            }),
            _ => Err(DeltaError::Version),
        }
    }

    fn record(&mut self) -> Result<Record<'a>, DeltaError> {
        loop {
            let kind = self.byte()?;
            match kind {
                TOPIC => self.topic = Some(self.bytes()?),
                JOIN => {
                    let topic = self.topic.ok_or(DeltaError::Malformed)?;
                    let phx_ref = self.u64()?;
                    let prev_ref = match self.byte()? {
                        0 => None,
                        1 => Some(self.u64()?),
                        _ => return Err(DeltaError::Malformed),
                    };
                    let key = self.bytes()?;
                    let meta = self.bytes()?;
                    etf::check_meta(meta).map_err(|_| DeltaError::Malformed)?;
                    return Ok(Record::Join(RemoteJoin {
                        topic,
                        key,
                        meta,
                        phx_ref,
                        prev_ref,
                    }));
                }
                LEAVE => return Ok(Record::Leave(self.u64()?)),
                _ => return Err(DeltaError::Malformed),
            }
        }
    }

    fn byte(&mut self) -> Result<u8, DeltaError> {
        let (&first, rest) = self.rest.split_first().ok_or(DeltaError::Truncated)?;
        self.rest = rest;
        Ok(first)
    }

    fn u64(&mut self) -> Result<u64, DeltaError> {
        if self.rest.len() < 8 {
            return Err(DeltaError::Truncated);
        }
        let (bytes, rest) = self.rest.split_at(8);
        self.rest = rest;
        Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DeltaError> {
        let mut len: usize = 0;
        let mut shift = 0;
        loop {
            let byte = self.byte()?;
            if shift > 28 {
                return Err(DeltaError::Malformed);
            }
            len |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        if self.rest.len() < len {
            return Err(DeltaError::Truncated);
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(bytes)
    }
}

impl<'a> Iterator for DeltaReader<'a> {
    type Item = Result<Record<'a>, DeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let record = self.record();
        self.failed = record.is_err();
        Some(record)
    }
}

/// Checks a whole delta, so that a bad one is refused before any of it is
/// applied. Returns how many records it has.
pub fn validate(delta: &[u8]) -> Result<usize, DeltaError> {
    let mut records = 0;
    for record in DeltaReader::new(delta)? {
        record?;
        records += 1;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Holder;
    use proptest::prelude::*;

    /// `term_to_binary(%{a: 1})`
    const META: &[u8] = &[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 1];

    fn presence(key: &str, phx_ref: Ref, prev_ref: Option<Ref>) -> Presence<u32, Vec<u8>> {
        Presence {
            owner: Holder::Local(1),
            key: Bytes::from(key),
            meta: META.to_vec(),
            phx_ref,
            prev_ref: crate::prev_ref(prev_ref),
            seq: 0,
        }
    }

    type TestRegistry = crate::Registry<u32, Vec<u8>, ()>;

    fn joined_keys(delta: &[u8]) -> Vec<Vec<u8>> {
        DeltaReader::new(delta)
            .unwrap()
            .filter_map(|record| match record.unwrap() {
                Record::Join(join) => Some(join.key.to_vec()),
                Record::Leave(_) => None,
            })
            .collect()
    }

    #[test]
    fn outgoing_numbers_each_delta_and_says_when_changes_start_waiting() {
        let mut registry = TestRegistry::new(7);
        let mut outgoing = Outgoing::default();
        assert_eq!(outgoing.take(), None);

        registry
            .track(1, b"t", b"a", META.to_vec(), || Some(()))
            .unwrap();
        assert!(outgoing.record(&registry.take_diffs(usize::MAX, usize::MAX)));
        registry
            .track(1, b"t", b"b", META.to_vec(), || Some(()))
            .unwrap();
        assert!(!outgoing.record(&registry.take_diffs(usize::MAX, usize::MAX)));

        let (seq, delta) = outgoing.take().unwrap();
        assert_eq!((seq, outgoing.seq()), (1, 1));
        assert_eq!(joined_keys(&delta), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(outgoing.take(), None, "nothing twice");

        // A replica's presence is not this node's to send.
        registry.replica_join(
            3,
            RemoteJoin {
                topic: b"t",
                key: b"r",
                meta: META.to_vec(),
                phx_ref: 99,
                prev_ref: None,
            },
        );
        assert!(!outgoing.record(&registry.take_diffs(usize::MAX, usize::MAX)));

        registry
            .track(2, b"t", b"c", META.to_vec(), || Some(()))
            .unwrap();
        outgoing.record(&registry.take_diffs(usize::MAX, usize::MAX));
        outgoing.discard();
        assert_eq!(outgoing.take(), None);

        outgoing.resume_after(41);
        outgoing.resume_after(5);
        registry.untrack(2, b"t", b"c");
        assert!(outgoing.record(&registry.take_diffs(usize::MAX, usize::MAX)));
        assert_eq!(outgoing.take().map(|(seq, _)| seq), Some(42));
    }

    #[test]
    fn state_chunks_hold_every_local_presence_once_in_bounded_chunks() {
        let mut registry = TestRegistry::new(7);
        for i in 0..300u32 {
            let topic = format!("t{}", i % 3);
            let key = format!("k{i}");
            registry
                .track(i, topic.as_bytes(), key.as_bytes(), META.to_vec(), || {
                    Some(())
                })
                .unwrap();
        }
        registry.replica_join(
            3,
            RemoteJoin {
                topic: b"t0",
                key: b"remote",
                meta: META.to_vec(),
                phx_ref: 99,
                prev_ref: None,
            },
        );
        let snapshots = registry.observed_snapshots();

        let chunks = state_chunks(&snapshots, 1_000);
        assert!(chunks.len() > 1);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for chunk in &chunks {
            // A chunk ends with the join that took it past the bound.
            assert!(chunk.len() < 1_000 + 64, "chunk of {} bytes", chunk.len());
            assert!(validate(chunk).is_ok());
            keys.extend(joined_keys(chunk));
        }
        keys.sort();
        let mut expected: Vec<Vec<u8>> = (0..300).map(|i| format!("k{i}").into_bytes()).collect();
        expected.sort();
        assert_eq!(keys, expected);

        assert_eq!(state_chunks(&snapshots, usize::MAX).len(), 1);
        assert!(state_chunks::<u32, Vec<u8>>(&[], 1_000).is_empty());
    }

    #[test]
    fn round_trips_joins_and_leaves_in_order() {
        let mut w = DeltaWriter::new();
        w.join(b"t1", &presence("a", 1, None));
        w.join(b"t1", &presence(&"k".repeat(300), 2, Some(1)));
        w.leave(7);
        w.join(b"t2", &presence("b", 3, None));
        assert_eq!(w.records(), 4);
        let delta = w.take();
        assert!(w.is_empty());
        assert_eq!(validate(&delta), Ok(4));
        let records: Vec<Record> = DeltaReader::new(&delta)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = "k".repeat(300);
        assert_eq!(
            records,
            vec![
                Record::Join(RemoteJoin {
                    topic: b"t1",
                    key: b"a",
                    meta: META,
                    phx_ref: 1,
                    prev_ref: None
                }),
                Record::Join(RemoteJoin {
                    topic: b"t1",
                    key: key.as_bytes(),
                    meta: META,
                    phx_ref: 2,
                    prev_ref: Some(1)
                }),
                Record::Leave(7),
                Record::Join(RemoteJoin {
                    topic: b"t2",
                    key: b"b",
                    meta: META,
                    phx_ref: 3,
                    prev_ref: None
                }),
            ]
        );
    }

    #[test]
    fn a_topic_is_named_once_for_consecutive_joins() {
        let mut w = DeltaWriter::new();
        for i in 0..10 {
            w.join(b"a-long-topic-name", &presence("k", i, None));
        }
        let delta = w.take();
        let named = delta
            .windows(17)
            .filter(|w| *w == b"a-long-topic-name")
            .count();
        assert_eq!(named, 1);
    }

    #[test]
    fn refuses_bad_deltas() {
        assert_eq!(validate(&[]), Ok(0));
        assert_eq!(validate(&[9, 3]).unwrap_err(), DeltaError::Version);
        assert_eq!(validate(&[VERSION, 3, 0]), Err(DeltaError::Truncated));
        assert_eq!(validate(&[VERSION, 9]), Err(DeltaError::Malformed));
        // A join before any topic.
        let mut join = vec![VERSION, JOIN];
        join.extend_from_slice(&[0; 9]);
        assert_eq!(validate(&join), Err(DeltaError::Malformed));
        // A meta that is not a map.
        let mut w = DeltaWriter::new();
        let mut bad = presence("k", 1, None);
        bad.meta = vec![131, 97, 1];
        w.join(b"t", &bad);
        assert_eq!(validate(&w.take()), Err(DeltaError::Malformed));
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = validate(&bytes);
            let mut with_version = vec![VERSION];
            with_version.extend_from_slice(&bytes);
            let _ = validate(&with_version);
        }

        #[test]
        fn any_prefix_of_a_delta_is_refused_or_a_prefix_of_its_records(cut in 0usize..200) {
            let mut w = DeltaWriter::new();
            for i in 0..5 {
                w.join(format!("topic{}", i % 2).as_bytes(), &presence("key", i, Some(i)));
                w.leave(i);
            }
            let delta = w.take();
            let cut = cut.min(delta.len());
            if let Ok(n) = validate(&delta[..cut]) {
                prop_assert!(n <= 10);
            }
        }
    }
}
