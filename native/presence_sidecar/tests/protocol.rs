//! Every message round-trips; no byte string makes decoding panic.

use bytes::Bytes;
use presence_sidecar::protocol::{
    Body, CountChange, Departed, Envelope, Header, LeaveEntry, Op, PartBody, ReplayEntry,
    ReplicaBody, Reply, Request, Stats, Status,
};
use proptest::prelude::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// `term_to_binary(%{a: 1})`
const META: &[u8] = &[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 1];

fn every_request() -> Vec<Request> {
    vec![
        Request::Hello { version: 1 },
        Request::Configure {
            max_meta_bytes: 65_536,
            diff_per_operation: true,
        },
        Request::SetDispatcher { dispatcher: 7 },
        Request::Wake,
        Request::Track {
            owner: 1 << 40 | 9,
            topic: b("room:1"),
            key: b("ann"),
            phx_ref: u64::MAX,
            meta: Bytes::from_static(META),
        },
        Request::Untrack {
            owner: 3,
            topic: b("t"),
            key: b(""),
            phx_ref: 1,
        },
        Request::Update {
            owner: 3,
            topic: b("t"),
            key: b("k"),
            old_ref: u64::MAX,
            new_ref: 0,
            meta: Bytes::from_static(META),
        },
        Request::Exit { exits: vec![] },
        Request::Exit {
            exits: vec![
                Departed {
                    owner: 12,
                    refs: vec![],
                },
                Departed {
                    owner: u64::MAX,
                    refs: vec![1, u64::MAX, 3],
                },
            ],
        },
        Request::Counts { topic: b("t") },
        Request::List { topic: b("t") },
        Request::GetByKey {
            topic: b("t"),
            key: b("k"),
        },
        Request::TakeDiffs { max_topics: 256 },
        Request::NextPart { max: 64 },
        Request::AckPart { part: 4 },
        Request::Stats,
        Request::Replay {
            entries: vec![
                ReplayEntry {
                    owner: 1,
                    topic: b("t"),
                    key: b("k"),
                    old_ref: 99,
                    new_ref: 100,
                    meta: Bytes::from_static(META),
                };
                3
            ],
        },
        Request::RecoveryLeaves {
            entries: vec![LeaveEntry {
                topic: b("t"),
                key: b("k"),
                phx_ref: 5,
                meta: Bytes::from_static(META),
            }],
        },
        Request::SetReplicator {
            on: true,
            seq: u64::MAX,
        },
        Request::SetReplicator { on: false, seq: 0 },
        Request::DeltaSeq,
        Request::TakeDelta,
        Request::LocalState,
        Request::ApplyDelta {
            replica: 3,
            delta: Bytes::from_static(&[1, 3, 0, 0, 0, 0, 0, 0, 0, 9]),
        },
        Request::ApplyDelta {
            replica: 3,
            delta: Bytes::new(),
        },
        Request::SyncReplica {
            replica: u32::MAX as u64,
            chunks: vec![b("chunk one"), Bytes::new(), b("two")],
        },
        Request::SyncReplica {
            replica: 1,
            chunks: vec![],
        },
        Request::DropReplica { replica: 7 },
        Request::ForgetReplica { replica: 8 },
    ]
}

#[test]
fn every_request_round_trips() {
    let requests = every_request();
    // Every op is covered.
    for op in Op::ALL {
        assert!(requests.iter().any(|r| r.op() == op), "{op:?} not covered");
    }
    for (i, request) in requests.into_iter().enumerate() {
        let envelope = Envelope {
            header: Header {
                id: i as u64 + 1,
                reply_to: u64::MAX - i as u64,
            },
            request,
        };
        assert_eq!(Envelope::decode(envelope.encode()).unwrap(), envelope);
    }
}

fn every_body() -> Vec<(Op, Body)> {
    vec![
        (Op::Hello, Body::Hello { version: 1 }),
        (Op::Configure, Body::Empty),
        (Op::RecoveryLeaves, Body::Empty),
        // Sent unprompted when a diff became pending.
        (Op::Wake, Body::Empty),
        // Writes are answered only when refused, with a message.
        (Op::Track, Body::Empty),
        (Op::Untrack, Body::Empty),
        (Op::Update, Body::Empty),
        (Op::Exit, Body::Empty),
        (Op::SetDispatcher, Body::SetDispatcher { pending: true }),
        (
            Op::Counts,
            Body::Counts {
                users: 2,
                connections: 3,
            },
        ),
        (
            Op::List,
            Body::Chunk {
                continues: true,
                term: Bytes::from_static(&[131, 116, 0, 0, 0, 0]),
            },
        ),
        (
            Op::GetByKey,
            Body::Chunk {
                continues: false,
                term: Bytes::from_static(&[131, 106]),
            },
        ),
        (
            Op::TakeDiffs,
            Body::TakeDiffs {
                queued: 3,
                pending: 0,
                delta_started: true,
                delivered: vec![7, 8],
            },
        ),
        (Op::NextPart, Body::Parts(vec![])),
        (
            Op::NextPart,
            Body::Parts(vec![
                PartBody {
                    part: 9,
                    age_us: 51_234,
                    topic: b("t"),
                    joins: Bytes::from_static(&[131, 116, 0, 0, 0, 0]),
                    leaves: Bytes::from_static(&[131, 116, 0, 0, 0, 0]),
                };
                2
            ]),
        ),
        (
            Op::AckPart,
            Body::AckPart {
                outbox_empty: true,
                delivered: vec![],
            },
        ),
        (
            Op::AckPart,
            Body::AckPart {
                outbox_empty: false,
                delivered: vec![u64::MAX],
            },
        ),
        (
            Op::Stats,
            Body::Stats(Stats {
                presences: 1,
                owners: 2,
                topics: 3,
                pending_topics: 4,
                queued_parts: 5,
                max_meta_bytes: 6,
                heap_bytes: 7,
                replicas: 8,
            }),
        ),
        (Op::Replay, Body::Empty),
        (Op::SetReplicator, Body::Empty),
        (Op::DeltaSeq, Body::Seq { seq: 42 }),
        (Op::LocalState, Body::Seq { seq: 0 }),
        (Op::TakeDelta, Body::Delta(None)),
        (Op::TakeDelta, Body::Delta(Some((5, b("delta bytes"))))),
        (Op::ApplyDelta, Body::Replica(ReplicaBody::default())),
        (
            Op::SyncReplica,
            Body::Replica(ReplicaBody {
                flags: 2,
                dropped: 0,
                changes: vec![
                    CountChange {
                        topic: b("t"),
                        key: b("k"),
                        change: -3,
                    },
                    CountChange {
                        topic: b("t"),
                        key: b(""),
                        change: i64::MAX,
                    },
                ],
            }),
        ),
        (
            Op::DropReplica,
            Body::Replica(ReplicaBody {
                flags: 0,
                dropped: 12,
                changes: vec![CountChange {
                    topic: b("t"),
                    key: b("k"),
                    change: -12,
                }],
            }),
        ),
        (Op::ForgetReplica, Body::Replica(ReplicaBody::default())),
    ]
}

#[test]
fn a_local_state_chunk_round_trips_as_more() {
    let body = Body::StateChunk {
        chunk: b("a delta"),
    };
    assert_eq!(
        Body::decode_more(Op::LocalState, body.encode()).unwrap(),
        body
    );
    let chunk = Body::Chunk {
        continues: true,
        term: Bytes::from_static(&[131, 106]),
    };
    assert_eq!(Body::decode_more(Op::List, chunk.encode()).unwrap(), chunk);
}

#[test]
fn a_huge_change_count_is_refused_without_allocating_it() {
    let mut body = vec![0u8; 9];
    body.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(Body::decode(Op::ApplyDelta, body.into()).is_err());
    let mut frame = vec![Op::SyncReplica as u8];
    frame.extend_from_slice(&[0; 24]);
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(Envelope::decode(frame.into()).is_err());
}

#[test]
fn every_reply_round_trips() {
    let bodies = every_body();
    for op in Op::ALL {
        assert!(bodies.iter().any(|(o, _)| *o == op), "{op:?} not covered");
    }
    for (op, body) in bodies {
        let reply = Reply {
            op: op as u8,
            header: Header { id: 1, reply_to: 2 },
            status: Status::Ok,
            body: body.encode(),
        };
        let decoded = Reply::decode(reply.encode()).unwrap();
        assert_eq!(decoded, reply);
        assert_eq!(Body::decode(op, decoded.body).unwrap(), body);
    }
}

#[test]
fn short_and_long_frames_are_errors() {
    for request in every_request() {
        let frame = Envelope {
            header: Header::default(),
            request,
        }
        .encode();
        // Every strict prefix is refused, except where the tail is a
        // free-length meta (a shorter meta is still a frame).
        for len in 0..frame.len() {
            let _ = Envelope::decode(frame.slice(..len));
        }
        assert!(Envelope::decode(frame.slice(..16)).is_err());
    }
    let mut long = Envelope {
        header: Header::default(),
        request: Request::Stats,
    }
    .encode()
    .to_vec();
    long.push(0);
    assert!(Envelope::decode(long.into()).is_err());
}

#[test]
fn a_huge_entry_count_is_refused_without_allocating_it() {
    let mut frame = vec![Op::Replay as u8];
    frame.extend_from_slice(&[0; 16]);
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(Envelope::decode(frame.into()).is_err());
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let frame = Bytes::from(bytes);
        let _ = Envelope::decode(frame.clone());
        if let Ok(reply) = Reply::decode(frame) {
            for op in Op::ALL {
                let _ = Body::decode(op, reply.body.clone());
                let _ = Body::decode_more(op, reply.body.clone());
            }
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        i in 0usize..64,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let requests = every_request();
        let request = requests[i % requests.len()].clone();
        let mut frame = Envelope { header: Header::default(), request }.encode().to_vec();
        for (at, byte) in flips {
            let len = frame.len();
            frame[at % len] = byte;
        }
        let cut = cut % (frame.len() + 1);
        let _ = Envelope::decode(Bytes::from(frame[..cut].to_vec()));
        let _ = Envelope::decode(Bytes::from(frame));
    }
}
