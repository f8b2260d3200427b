//! `server::run` in a task, raw frames in, replies out.

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use presence_sidecar::protocol::{Body, Envelope, Header, Op, Reply, Request, Status, VERSION};
use presence_sidecar::server;
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const META: &[u8] = &[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 1];

struct Client {
    io: Framed<DuplexStream, LengthDelimitedCodec>,
    next_id: u64,
    /// `Wake` frames seen (skipped by `recv`).
    wakes: usize,
}

impl Client {
    async fn send_raw(&mut self, frame: Bytes) {
        self.io.send(frame).await.unwrap();
    }

    async fn send(&mut self, request: Request) -> u64 {
        self.next_id += 1;
        let frame = Envelope {
            header: Header {
                id: self.next_id,
                reply_to: 42,
            },
            request,
        }
        .encode();
        self.send_raw(frame).await;
        self.next_id
    }

    /// The next reply; `Wake` frames (a diff became pending) are counted.
    async fn recv(&mut self) -> Reply {
        loop {
            let frame = self.io.next().await.expect("a reply").unwrap();
            let reply = Reply::decode(frame.freeze()).unwrap();
            if reply.op == Op::Wake as u8 {
                assert_eq!(reply.header, Header::default());
                self.wakes += 1;
                continue;
            }
            return reply;
        }
    }

    /// A write: not answered.
    async fn write(&mut self, request: Request) {
        self.send(request).await;
    }

    async fn call(&mut self, request: Request) -> Reply {
        let id = self.send(request).await;
        let reply = self.recv().await;
        assert_eq!(reply.header.id, id);
        assert_eq!(reply.header.reply_to, 42);
        reply
    }
}

fn start() -> (
    Client,
    tokio::task::JoinHandle<Result<(), server::ServerError>>,
) {
    let (ours, theirs) = duplex(1 << 20);
    let (read, write) = tokio::io::split(theirs);
    let task = tokio::spawn(server::run(read, write));
    let client = Client {
        io: Framed::new(ours, LengthDelimitedCodec::new()),
        next_id: 0,
        wakes: 0,
    };
    (client, task)
}

async fn started() -> (
    Client,
    tokio::task::JoinHandle<Result<(), server::ServerError>>,
) {
    let (mut client, task) = start();
    let reply = client.call(Request::Hello { version: VERSION }).await;
    assert_eq!(reply.status, Status::Ok);
    (client, task)
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn track_request(owner: u64, topic: &str, key: &str, phx_ref: u64) -> Request {
    Request::Track {
        owner,
        topic: b(topic),
        key: b(key),
        phx_ref,
        meta: Bytes::from_static(META),
    }
}

/// The oldest diff part, if any.
async fn next_part(c: &mut Client) -> Option<presence_sidecar::protocol::PartBody> {
    let reply = c.call(Request::NextPart { max: 1 }).await;
    let Body::Parts(parts) = Body::decode(Op::NextPart, reply.body).unwrap() else {
        panic!()
    };
    assert!(parts.len() <= 1);
    parts.into_iter().next()
}

async fn stats(c: &mut Client) -> presence_sidecar::protocol::Stats {
    let reply = c.call(Request::Stats).await;
    let Body::Stats(s) = Body::decode(Op::Stats, reply.body).unwrap() else {
        panic!()
    };
    s
}

#[tokio::test]
async fn track_count_list_and_closing_stdin_ends_the_server() {
    let (mut c, task) = started().await;
    c.write(track_request(1, "t", "ann", 500)).await;
    // What a writer killed between the journal and the port can leave: the
    // next write of the same presence replaces it.
    c.write(track_request(1, "t", "ann", 501)).await;
    assert_eq!(counts(&mut c, "t").await, (1, 1));
    let list = c.call(Request::List { topic: b("t") }).await;
    assert_eq!(list.status, Status::Ok);
    assert_eq!(
        c.wakes, 1,
        "one wake: the diff was pending from the first write on"
    );

    drop(c);
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test]
async fn writes_apply_the_refs_the_beam_made() {
    let (mut c, _task) = started().await;
    c.write(track_request(1, "t", "ann", 10)).await;
    // An update names the ref it replaces.
    c.write(Request::Update {
        owner: 1,
        topic: b("t"),
        key: b("ann"),
        old_ref: 10,
        new_ref: 11,
        meta: Bytes::from_static(&[131, 116, 0, 0, 0, 1, 100, 0, 1, 97, 97, 2]),
    })
    .await;
    // An untrack of a ref the sidecar does not hold changes nothing.
    c.write(Request::Untrack {
        owner: 1,
        topic: b("t"),
        key: b("ann"),
        phx_ref: 10,
    })
    .await;
    assert_eq!(counts(&mut c, "t").await, (1, 1));
    // An update of a presence the sidecar lacks places the new one.
    c.write(Request::Update {
        owner: 2,
        topic: b("t"),
        key: b("bob"),
        old_ref: 20,
        new_ref: 21,
        meta: Bytes::from_static(META),
    })
    .await;
    assert_eq!(counts(&mut c, "t").await, (2, 2));
    c.write(Request::Untrack {
        owner: 1,
        topic: b("t"),
        key: b("ann"),
        phx_ref: 11,
    })
    .await;
    c.write(Request::Exit {
        exits: vec![presence_sidecar::protocol::Departed {
            owner: 2,
            refs: vec![21],
        }],
    })
    .await;
    assert_eq!(counts(&mut c, "t").await, (0, 0));
    assert_eq!(stats(&mut c).await.owners, 0);

    // Every removal's leave is delivered (or was never needed) once a take
    // left nothing pending and its parts are acknowledged.
    let take = c.call(Request::TakeDiffs { max_topics: 10 }).await;
    let Body::TakeDiffs { delivered, .. } = Body::decode(Op::TakeDiffs, take.body).unwrap() else {
        panic!()
    };
    // Nothing was listed, so nothing went out: every join was cancelled by
    // its leave, and no leave is owed.
    let mut all = delivered;
    while let Some(p) = next_part(&mut c).await {
        let ack = c.call(Request::AckPart { part: p.part }).await;
        let Body::AckPart { delivered, .. } = Body::decode(Op::AckPart, ack.body).unwrap() else {
            panic!()
        };
        all.extend(delivered);
    }
    all.sort_unstable();
    assert_eq!(all, [10, 10, 11, 20, 21]);
}

#[tokio::test]
async fn a_part_carries_its_age_since_the_oldest_change() {
    let (mut c, _task) = started().await;
    c.write(track_request(1, "t", "ann", 10)).await;
    // Applied (replies come in order), then 5 ms on the sidecar's clock.
    assert_eq!(counts(&mut c, "t").await, (1, 1));
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    c.write(track_request(2, "t", "bob", 11)).await;
    c.call(Request::TakeDiffs { max_topics: 10 }).await;
    let part = next_part(&mut c).await.expect("a part");
    assert!(
        part.age_us >= 5_000,
        "counted from ann's track: {} us",
        part.age_us
    );
    assert!(part.age_us < 60_000_000);
}

#[tokio::test]
async fn a_large_listing_streams_in_chunks() {
    let (mut c, _task) = started().await;
    for i in 0..2_500u64 {
        c.write(track_request(i, "big", &format!("k{i}"), 1_000 + i))
            .await;
    }
    let id = c.send(Request::List { topic: b("big") }).await;
    let mut chunks = 0;
    loop {
        let r = c.recv().await;
        assert_eq!(r.header.id, id);
        chunks += 1;
        if r.status == Status::Ok {
            break;
        }
        assert_eq!(r.status, Status::More);
    }
    assert_eq!(chunks, 3);
}

#[tokio::test]
async fn garbage_gets_an_error_reply_and_the_server_goes_on() {
    let (mut c, _task) = started().await;
    // Truncated track, unknown op, empty frame.
    let mut truncated = BytesMut::new();
    truncated.put_u8(Op::Track as u8);
    truncated.put_u64(5);
    truncated.put_u64(42);
    truncated.put_u32(1);
    c.send_raw(truncated.freeze()).await;
    let r = c.recv().await;
    assert_eq!((r.status, r.header.id), (Status::BadFrame, 5));
    c.send_raw(Bytes::from_static(&[200, 1, 2, 3])).await;
    assert_eq!(c.recv().await.status, Status::BadFrame);
    c.send_raw(Bytes::new()).await;
    assert_eq!(c.recv().await.status, Status::BadFrame);
    // A meta that is not a map is refused, not stored: a write is
    // answered only when it is refused.
    let r = c
        .call(Request::Track {
            owner: 1,
            topic: b("t"),
            key: b("k"),
            phx_ref: 1,
            meta: Bytes::from_static(&[131, 97, 1]),
        })
        .await;
    assert_eq!(r.status, Status::BadFrame);
    assert_eq!(stats(&mut c).await.presences, 0);
}

#[tokio::test]
async fn an_oversized_length_ends_the_server_with_an_error() {
    let (mut c, task) = started().await;
    c.io.get_mut()
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    let r = c.recv().await;
    assert_eq!(r.status, Status::BadFrame);
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.exit_code(), 3);
}

#[tokio::test]
async fn an_unknown_version_is_refused_clearly() {
    let (mut c, task) = start();
    let r = c.call(Request::Hello { version: 99 }).await;
    assert_eq!(r.status, Status::Refused);
    let message = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(message.contains("protocol version 99"), "{message}");
    assert_eq!(task.await.unwrap().unwrap_err().exit_code(), 2);
}

#[tokio::test]
async fn exit_diffs_and_replay_owe_leaves_after_joins() {
    let (mut c, _task) = started().await;
    let r = c
        .call(Request::Replay {
            entries: vec![presence_sidecar::protocol::ReplayEntry {
                owner: 3,
                topic: b("t"),
                key: b("k"),
                old_ref: 12345,
                new_ref: 12346,
                meta: Bytes::from_static(META),
            }],
        })
        .await;
    assert_eq!(r.status, Status::Ok);
    let r = c.call(Request::TakeDiffs { max_topics: 10 }).await;
    assert_eq!(
        Body::decode(Op::TakeDiffs, r.body).unwrap(),
        Body::TakeDiffs {
            queued: 2,
            pending: 0,
            delta_started: false,
            delivered: vec![],
        }
    );
    // The join first, then the owed leave of the old ref: both parts in
    // one round trip, oldest first.
    let r = c.call(Request::NextPart { max: 64 }).await;
    let Body::Parts(parts) = Body::decode(Op::NextPart, r.body).unwrap() else {
        panic!()
    };
    let mut delivered = Vec::new();
    for p in &parts {
        let ack = c.call(Request::AckPart { part: p.part }).await;
        let Body::AckPart { delivered: d, .. } = Body::decode(Op::AckPart, ack.body).unwrap()
        else {
            panic!()
        };
        delivered.extend(d);
    }
    assert!(next_part(&mut c).await.is_none());
    assert_eq!(parts.len(), 2);
    assert_eq!(&parts[0].leaves[..], &[131, 116, 0, 0, 0, 0]);
    assert_eq!(&parts[1].joins[..], &[131, 116, 0, 0, 0, 0]);
    // The old ref's leave went out: the BEAM owes it no more.
    assert_eq!(delivered, [12345]);
    let wakes = c.wakes;
    c.write(Request::Exit {
        exits: vec![presence_sidecar::protocol::Departed {
            owner: 3,
            refs: vec![12346],
        }],
    })
    .await;
    assert_eq!(stats(&mut c).await.presences, 0);
    assert_eq!(c.wakes, wakes + 1, "the exit made a diff pending");
}

// Cluster mode: one sidecar's deltas and state applied by another, as two
// nodes' cluster processes would hand them over.

async fn track(c: &mut Client, owner: u64, topic: &str, key: &str) {
    c.next_id += 1;
    let phx_ref = 1_000_000 + c.next_id;
    c.write(track_request(owner, topic, key, phx_ref)).await;
}

fn replica_body(reply: Reply) -> presence_sidecar::protocol::ReplicaBody {
    assert_eq!(reply.status, Status::Ok);
    let op = Op::from_u8(reply.op).unwrap();
    let Body::Replica(body) = Body::decode(op, reply.body).unwrap() else {
        panic!()
    };
    body
}

fn net(body: &presence_sidecar::protocol::ReplicaBody) -> i64 {
    body.changes.iter().map(|c| c.change).sum()
}

async fn take_delta(c: &mut Client) -> Option<(u64, Bytes)> {
    let taken = c.call(Request::TakeDiffs { max_topics: 1_000 }).await;
    let Body::TakeDiffs { delta_started, .. } = Body::decode(Op::TakeDiffs, taken.body).unwrap()
    else {
        panic!()
    };
    let reply = c.call(Request::TakeDelta).await;
    let Body::Delta(delta) = Body::decode(Op::TakeDelta, reply.body).unwrap() else {
        panic!()
    };
    assert_eq!(delta_started, delta.is_some());
    // Acknowledge the diff parts, so the next take moves on.
    while let Some(p) = next_part(c).await {
        c.call(Request::AckPart { part: p.part }).await;
    }
    delta
}

async fn local_state(c: &mut Client) -> (u64, Vec<Bytes>) {
    let id = c.send(Request::LocalState).await;
    let mut chunks = Vec::new();
    loop {
        let reply = c.recv().await;
        assert_eq!(reply.header.id, id);
        match reply.status {
            Status::More => {
                let Body::StateChunk { chunk } =
                    Body::decode_more(Op::LocalState, reply.body).unwrap()
                else {
                    panic!()
                };
                chunks.push(chunk);
            }
            Status::Ok => {
                let Body::Seq { seq } = Body::decode(Op::LocalState, reply.body).unwrap() else {
                    panic!()
                };
                return (seq, chunks);
            }
            other => panic!("{other:?}"),
        }
    }
}

async fn counts(c: &mut Client, topic: &str) -> (u64, u64) {
    let reply = c.call(Request::Counts { topic: b(topic) }).await;
    match Body::decode(Op::Counts, reply.body).unwrap() {
        Body::Counts { users, connections } => (users, connections),
        _ => panic!(),
    }
}

#[tokio::test]
async fn deltas_and_states_replicate_between_two_sidecars() {
    let (mut a, _ta) = started().await;
    let (mut b_, _tb) = started().await;

    // No replicator: nothing is recorded.
    track(&mut a, 1, "t", "before").await;
    assert_eq!(take_delta(&mut a).await, None);

    a.call(Request::SetReplicator { on: true, seq: 0 }).await;
    track(&mut a, 1, "t", "ann").await;
    track(&mut a, 2, "t", "bob").await;
    let (seq, delta) = take_delta(&mut a).await.expect("a delta");
    assert_eq!(seq, 1);
    let seq_reply = a.call(Request::DeltaSeq).await;
    assert_eq!(
        Body::decode(Op::DeltaSeq, seq_reply.body).unwrap(),
        Body::Seq { seq: 1 }
    );

    // Garbage is refused whole.
    let bad = b_
        .call(Request::ApplyDelta {
            replica: 1,
            delta: Bytes::from_static(&[1, 2, 0, 0]),
        })
        .await;
    assert_eq!(bad.status, Status::BadDelta);
    assert_eq!(counts(&mut b_, "t").await, (0, 0));

    let applied = replica_body(
        b_.call(Request::ApplyDelta {
            replica: 1,
            delta: delta.clone(),
        })
        .await,
    );
    assert_eq!(net(&applied), 2);
    assert_eq!(applied.flags & 2, 2, "wakes the dispatcher");
    // Idempotent: the same delta again changes nothing.
    let again = replica_body(b_.call(Request::ApplyDelta { replica: 1, delta }).await);
    assert!(again.changes.is_empty());
    assert_eq!(counts(&mut b_, "t").await, (2, 2));

    // An exit on A, and a full state: the differences only.
    a.write(Request::Exit {
        exits: vec![presence_sidecar::protocol::Departed {
            owner: 2,
            refs: vec![],
        }],
    })
    .await;
    track(&mut a, 3, "u", "cid").await;
    let (state_seq, chunks) = local_state(&mut a).await;
    assert_eq!(state_seq, 1);
    let synced = replica_body(b_.call(Request::SyncReplica { replica: 1, chunks }).await);
    // `before` joins (it is in A's state), bob leaves, cid joins.
    assert_eq!(net(&synced), 1);
    assert_eq!(counts(&mut b_, "t").await, (2, 2));
    assert_eq!(counts(&mut b_, "u").await, (1, 1));

    let dropped = replica_body(b_.call(Request::DropReplica { replica: 1 }).await);
    assert_eq!((dropped.dropped, net(&dropped)), (3, -3));
    assert_eq!(counts(&mut b_, "t").await, (0, 0));
    let stats = b_.call(Request::Stats).await;
    let Body::Stats(s) = Body::decode(Op::Stats, stats.body).unwrap() else {
        panic!()
    };
    assert_eq!((s.presences, s.replicas), (0, 0));

    // A restarted sidecar resumes past the last seq: the next is later.
    a.call(Request::SetReplicator { on: true, seq: 10 }).await;
    track(&mut a, 1, "t", "later").await;
    assert_eq!(take_delta(&mut a).await.unwrap().0, 11);
    // Off: pending changes are dropped, nothing more is recorded.
    track(&mut a, 1, "t", "off").await;
    a.call(Request::SetReplicator { on: false, seq: 0 }).await;
    assert_eq!(take_delta(&mut a).await, None);
}

#[tokio::test]
async fn a_large_state_is_applied_in_steps_with_other_requests_between() {
    let (mut a, _ta) = started().await;
    let (mut b_, _tb) = started().await;
    for i in 0..5_000u64 {
        track(&mut a, i + 1, "big", &format!("k{i}")).await;
    }
    let (_, chunks) = local_state(&mut a).await;
    let sync = b_.send(Request::SyncReplica { replica: 4, chunks }).await;
    let count = b_.send(Request::Counts { topic: b("big") }).await;
    let first = b_.recv().await;
    let second = b_.recv().await;
    // The count was answered while the state was still being applied.
    assert_eq!((first.header.id, second.header.id), (count, sync));
    assert_eq!(net(&replica_body(second)), 5_000);
    assert_eq!(counts(&mut b_, "big").await, (5_000, 5_000));

    // A bad chunk among good ones: nothing applied at all.
    let (_, mut chunks) = local_state(&mut a).await;
    chunks.push(Bytes::from_static(&[1, 9]));
    let bad = b_.call(Request::SyncReplica { replica: 5, chunks }).await;
    assert_eq!(bad.status, Status::BadDelta);
    assert_eq!(counts(&mut b_, "big").await, (5_000, 5_000));
}
