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

    async fn recv(&mut self) -> Reply {
        let frame = self.io.next().await.expect("a reply").unwrap();
        Reply::decode(frame.freeze()).unwrap()
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

#[tokio::test]
async fn track_count_list_and_closing_stdin_ends_the_server() {
    let (mut c, task) = started().await;
    let reply = c
        .call(Request::Track {
            owner: 1,
            topic: b("t"),
            key: b("ann"),
            meta: Bytes::from_static(META),
        })
        .await;
    assert_eq!(reply.status, Status::Ok);
    let Body::Track { flags, .. } = Body::decode(Op::Track, reply.body).unwrap() else {
        panic!()
    };
    assert_eq!(flags & 1, 1, "a new owner");
    let again = c
        .call(Request::Track {
            owner: 1,
            topic: b("t"),
            key: b("ann"),
            meta: Bytes::from_static(META),
        })
        .await;
    assert_eq!(again.status, Status::AlreadyTracked);
    let counts = c.call(Request::Counts { topic: b("t") }).await;
    assert_eq!(
        Body::decode(Op::Counts, counts.body).unwrap(),
        Body::Counts {
            users: 1,
            connections: 1
        }
    );
    let list = c.call(Request::List { topic: b("t") }).await;
    assert_eq!(list.status, Status::Ok);

    drop(c);
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_large_listing_streams_in_chunks() {
    let (mut c, _task) = started().await;
    for i in 0..2_500u64 {
        let r = c
            .call(Request::Track {
                owner: i,
                topic: b("big"),
                key: Bytes::from(format!("k{i}")),
                meta: Bytes::from_static(META),
            })
            .await;
        assert_eq!(r.status, Status::Ok);
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
    // A meta that is not a map is refused, not stored.
    let r = c
        .call(Request::Track {
            owner: 1,
            topic: b("t"),
            key: b("k"),
            meta: Bytes::from_static(&[131, 97, 1]),
        })
        .await;
    assert_eq!(r.status, Status::BadFrame);
    let stats = c.call(Request::Stats).await;
    let Body::Stats(s) = Body::decode(Op::Stats, stats.body).unwrap() else {
        panic!()
    };
    assert_eq!(s.presences, 0);
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
            pending: 0
        }
    );
    // The join first, then the owed leave of the old ref.
    let mut parts = Vec::new();
    loop {
        let r = c.call(Request::NextPart).await;
        match Body::decode(Op::NextPart, r.body).unwrap() {
            Body::Part(None) => break,
            Body::Part(Some(p)) => {
                c.call(Request::AckPart { part: p.part }).await;
                parts.push(p);
            }
            _ => panic!(),
        }
    }
    assert_eq!(parts.len(), 2);
    assert_eq!(&parts[0].leaves[..], &[131, 116, 0, 0, 0, 0]);
    assert_eq!(&parts[1].joins[..], &[131, 116, 0, 0, 0, 0]);
    let r = c.call(Request::Exit { owner: 3 }).await;
    assert_eq!(
        Body::decode(Op::Exit, r.body).unwrap(),
        Body::Exit {
            flags: 2,
            owner: 3,
            removed: 1
        }
    );
}
