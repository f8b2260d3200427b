//! Bytes the registry holds per presence, counted by the allocator, in the
//! two shapes apps use: many presences on one topic, and a topic of its
//! own for each (per-user topics). Memory is deterministic, unlike time:
//! these bounds are checked on every run.

use presence_core::heap::{held_bytes, CountingAllocator};
use presence_core::{Bytes, Registry};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The NIF's watch is an `ErlNifMonitor`: 32 bytes.
type Watch = [u64; 4];

/// `term_to_binary(%{online_at: 1_700_000_000})` on OTP 25: Drab's meta.
const DRAB_META: &[u8] = b"\x83t\x00\x00\x00\x01d\x00\x09online_atb\x65\x53\xf1\x00";

/// Bytes per presence once `n` presences of as many owners are tracked
/// over `topics` topics, and their diffs taken.
fn per_presence(n: usize, topics: usize) -> f64 {
    let mut reg: Registry<u64, Bytes, Watch> = Registry::new(7);
    let before = held_bytes();
    for i in 0..n {
        let topic = format!("user:{}", i % topics);
        let key = format!("user:{i}");
        reg.track(
            i as u64,
            topic.as_bytes(),
            key.as_bytes(),
            Bytes::from(DRAB_META),
            || Some([0; 4]),
        )
        .unwrap();
    }
    drop(reg.take_diffs(usize::MAX, usize::MAX));
    let bytes = (held_bytes() - before) as f64 / n as f64;
    drop(reg);
    bytes
}

// One test: the allocator's count is global to the test binary, and tests
// run on threads of their own.
#[test]
fn a_presence_costs_at_most_225_bytes_in_either_shape() {
    assert_eq!(DRAB_META.len(), 23);
    let one_topic = per_presence(100_000, 1);
    let topic_each = per_presence(100_000, 100_000);
    println!(
        "100k presences: {one_topic:.0} B each on one topic, {topic_each:.0} B on a topic each"
    );
    assert!(
        one_topic <= 225.0,
        "{one_topic:.0} B per presence on one topic"
    );
    assert!(
        topic_each <= 225.0,
        "{topic_each:.0} B per presence on a topic each"
    );
}
