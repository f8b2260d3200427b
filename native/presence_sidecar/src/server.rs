//! The request loop: frames in, replies out.
//!
//! One task owns the [`Store`] and applies requests in arrival order: the
//! order the BEAM side decided each owner's writes in (they are not
//! answered; a `Wake` goes out when one makes a diff pending). Replies go
//! through a channel to a
//! writer task that flushes stdout once the channel is drained, so a burst
//! of requests costs one write. A large listing is encoded on a blocking
//! thread from a copy-on-write snapshot and streamed in chunks, so replies
//! to other callers are not held up behind it.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use presence_core::delta;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::protocol::{
    decode_header, Body, Envelope, Header, Op, Reply, Request, Status, MAX_FRAME, VERSION,
};
use crate::store::{listing_chunks, Entry, Job, Listing, Outcome, Store, CHUNK_PRESENCES};

/// Replication writes in progress, oldest first, with whom to answer.
type Jobs = VecDeque<(Op, Header, Job)>;

/// Why the sidecar stopped other than by stdin closing.
#[derive(Debug)]
pub enum ServerError {
    /// The first frame was not a `Hello` of our version.
    Handshake(String),
    /// A frame could not be read (oversized, or stdin failed): the stream
    /// cannot be resynchronised.
    Input(std::io::Error),
    /// stdout failed: the BEAM is gone or closed the port.
    Output(std::io::Error),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Handshake(m) => write!(f, "handshake refused: {m}"),
            ServerError::Input(e) => write!(f, "cannot read a frame from stdin: {e}"),
            ServerError::Output(e) => write!(f, "cannot write to stdout: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    /// Exit status: 2 for a refused handshake, 3 for bad input, 4 for output.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServerError::Handshake(_) => 2,
            ServerError::Input(_) => 3,
            ServerError::Output(_) => 4,
        }
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn reply(op: u8, header: Header, status: Status, body: Bytes) -> Bytes {
    Reply {
        op,
        header,
        status,
        body,
    }
    .encode()
}

fn bad_frame(frame: &[u8], message: &str) -> Bytes {
    let (op, header) = decode_header(frame).unwrap_or_default();
    reply(
        op,
        header,
        Status::BadFrame,
        Bytes::from(message.to_owned()),
    )
}

/// Serves requests from `input` until it closes (`Ok`), or until a frame
/// cannot be read or `output` fails (`Err`). Replies written before the
/// end are flushed first.
pub async fn run<R, W>(input: R, output: W) -> Result<(), ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(write_replies(output, rx));
    let served = serve(FramedRead::new(input, codec()), &tx).await;
    drop(tx);
    let written = writer.await.unwrap_or(Ok(()));
    served?;
    match written {
        // The BEAM closed the port (its reading end) as it closed stdin:
        // nobody is left to read what we had to say.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(ServerError::Output),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    output: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut sink = FramedWrite::new(output, codec());
    while let Some(frame) = rx.recv().await {
        sink.feed(frame).await?;
        while let Ok(frame) = rx.try_recv() {
            sink.feed(frame).await?;
        }
        SinkExt::<Bytes>::flush(&mut sink).await?;
    }
    SinkExt::<Bytes>::flush(&mut sink).await
}

async fn serve<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, LengthDelimitedCodec>,
    tx: &mpsc::UnboundedSender<Bytes>,
) -> Result<(), ServerError> {
    // The handshake: the first frame must be a Hello of our version.
    let Some(first) = frames.next().await else {
        return Ok(());
    };
    let first = first.map_err(ServerError::Input)?.freeze();
    let mut store = match Envelope::decode(first.clone()) {
        Ok(Envelope {
            header,
            request: Request::Hello { version },
        }) if version == VERSION => {
            let body = Body::Hello { version: VERSION }.encode();
            let _ = tx.send(reply(Op::Hello as u8, header, Status::Ok, body));
            Store::new(presence_core::random_seed(), 65_536)
        }
        other => {
            let message = match other {
                Ok(Envelope {
                    request: Request::Hello { version },
                    ..
                }) => format!(
                    "protocol version {version} is not supported: this presence_sidecar \
                     speaks version {VERSION}; rebuild the sidecar and the library together"
                ),
                Ok(_) => "the first frame must be a hello".to_owned(),
                Err(e) => format!("unreadable hello: {e}"),
            };
            let (op, header) = decode_header(&first).unwrap_or_default();
            let _ = tx.send(reply(op, header, Status::Refused, message.clone().into()));
            return Err(ServerError::Handshake(message));
        }
    };

    let mut jobs = Jobs::new();
    loop {
        let frame = if jobs.is_empty() {
            match frames.next().await {
                Some(frame) => frame,
                None => break,
            }
        } else {
            // A step of the oldest replication write, then a frame if one
            // came meanwhile: a large state from a joining node never holds
            // up the other requests for more than a step.
            step_jobs(&mut store, &mut jobs, tx);
            tokio::task::yield_now().await;
            match frames.next().now_or_never() {
                Some(Some(frame)) => frame,
                Some(None) => break,
                None => continue,
            }
        };
        let frame = match frame {
            Ok(frame) => frame.freeze(),
            Err(e) => {
                let message = format!("unreadable frame, stopping: {e}");
                let _ = tx.send(reply(
                    0,
                    Header::default(),
                    Status::BadFrame,
                    message.into(),
                ));
                return Err(ServerError::Input(e));
            }
        };
        match Envelope::decode(frame.clone()) {
            Ok(envelope) => handle(&mut store, envelope, tx, &mut jobs),
            Err(e) => {
                eprintln!("presence_sidecar: bad frame ({} bytes): {e}", frame.len());
                let _ = tx.send(bad_frame(&frame, &e.to_string()));
            }
        }
    }
    Ok(())
}

fn step_jobs(store: &mut Store, jobs: &mut Jobs, tx: &mpsc::UnboundedSender<Bytes>) {
    if let Some((op, header, job)) = jobs.front_mut() {
        if let Some(outcome) = store.step(job) {
            let (op, header) = (*op, *header);
            jobs.pop_front();
            send_outcome(op, header, outcome, tx);
        }
    }
}

/// Queues a replication write behind those in progress; one that fits in
/// a step and waits behind none is answered at once.
fn start_job(
    store: &mut Store,
    op: Op,
    header: Header,
    job: Result<Job, Outcome>,
    jobs: &mut Jobs,
) -> Option<Outcome> {
    match job {
        Err(outcome) => Some(outcome),
        Ok(mut job) if jobs.is_empty() => match store.step(&mut job) {
            Some(outcome) => Some(outcome),
            None => {
                jobs.push_back((op, header, job));
                None
            }
        },
        Ok(job) => {
            jobs.push_back((op, header, job));
            None
        }
    }
}

fn handle(
    store: &mut Store,
    envelope: Envelope,
    tx: &mpsc::UnboundedSender<Bytes>,
    jobs: &mut Jobs,
) {
    let Envelope { header, request } = envelope;
    let op = request.op();
    let outcome = match request {
        Request::Hello { .. } => Outcome::Reply(Status::Ok, Body::Hello { version: VERSION }),
        Request::Configure {
            max_meta_bytes,
            diff_per_operation,
        } => store.configure(max_meta_bytes, diff_per_operation),
        Request::SetDispatcher { .. } => store.set_dispatcher(),
        Request::Wake => Outcome::Reply(Status::BadFrame, Body::Empty),
        Request::Track {
            owner,
            topic,
            key,
            phx_ref,
            meta,
        } => store.track(owner, &topic, &key, phx_ref, meta),
        Request::Untrack {
            owner,
            topic,
            key,
            phx_ref,
        } => store.untrack(owner, &topic, &key, phx_ref),
        Request::Update {
            owner,
            topic,
            key,
            old_ref,
            new_ref,
            meta,
        } => store.update(owner, &topic, &key, old_ref, new_ref, meta),
        Request::Exit { exits } => store.exit(exits),
        Request::Counts { topic } => store.counts(&topic),
        Request::List { topic } => store.list(&topic),
        Request::GetByKey { topic, key } => store.get_by_key(&topic, &key),
        Request::TakeDiffs { max_topics } => store.take_diffs(max_topics),
        Request::NextPart { max } => store.next_parts(max),
        Request::AckPart { part } => store.ack_part(part),
        Request::Stats => store.stats(presence_core::heap::held_bytes() as u64),
        Request::Replay { entries } => store.replay(entries),
        Request::RecoveryLeaves { entries } => store.recovery_leaves(entries),
        Request::SetReplicator { on, seq } => store.set_replicator(on, seq),
        Request::DeltaSeq => store.delta_seq(),
        Request::TakeDelta => store.take_delta(),
        Request::LocalState => store.local_state(),
        Request::ApplyDelta { replica, delta } => {
            let job = store.apply_delta(replica, delta);
            match start_job(store, op, header, job, jobs) {
                Some(outcome) => outcome,
                None => return,
            }
        }
        Request::SyncReplica { replica, chunks } => {
            let job = store.sync_replica(replica, chunks);
            match start_job(store, op, header, job, jobs) {
                Some(outcome) => outcome,
                None => return,
            }
        }
        Request::DropReplica { replica } | Request::ForgetReplica { replica } => {
            let job = store.drop_replica(replica);
            match start_job(store, op, header, job, jobs) {
                Some(outcome) => outcome,
                None => return,
            }
        }
    };
    send_outcome(op, header, outcome, tx);
    if store.take_woke() {
        let _ = tx.send(reply(
            Op::Wake as u8,
            Header::default(),
            Status::Ok,
            Bytes::new(),
        ));
    }
}

fn send_outcome(op: Op, header: Header, outcome: Outcome, tx: &mpsc::UnboundedSender<Bytes>) {
    match outcome {
        Outcome::Applied => {}
        Outcome::Reply(Status::Ok, body) => {
            let _ = tx.send(reply(op as u8, header, Status::Ok, body.encode()));
        }
        Outcome::Reply(status, body) => {
            let _ = tx.send(reply(op as u8, header, status, body.encode()));
        }
        Outcome::Listing(Listing::Key(presences)) if presences.is_empty() => {
            // `[]`, as Phoenix.Presence.get_by_key/2 answers for no presence.
            let body = Body::Chunk {
                continues: false,
                term: Bytes::from_static(&[131, 106]),
            };
            let _ = tx.send(reply(op as u8, header, Status::Ok, body.encode()));
        }
        Outcome::Listing(Listing::Key(presences)) => {
            send_listing(op, header, tx, presences.iter());
        }
        Outcome::Listing(Listing::Topic(None)) => {
            send_listing(op, header, tx, std::iter::empty());
        }
        Outcome::Listing(Listing::Topic(Some(snapshot))) if snapshot.len() <= CHUNK_PRESENCES => {
            send_listing(op, header, tx, snapshot.iter());
        }
        Outcome::Listing(Listing::Topic(Some(snapshot))) => {
            // Encoded off the request loop: writes keep being applied (and
            // answered) while a large topic is written out.
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || send_listing(op, header, &tx, snapshot.iter()));
        }
        Outcome::State(seq, snapshots) => {
            let presences: usize = snapshots.iter().map(|(_, s)| s.len()).sum();
            if presences <= CHUNK_PRESENCES {
                send_state(op, header, tx, seq, &snapshots);
            } else {
                // As a large listing: written off the request loop.
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || send_state(op, header, &tx, seq, &snapshots));
            }
        }
    }
}

/// A local state: each chunk as a `More` reply, then the seq as `Ok`.
fn send_state(
    op: Op,
    header: Header,
    tx: &mpsc::UnboundedSender<Bytes>,
    seq: u64,
    snapshots: &[(presence_core::Bytes, presence_core::Snapshot<Entry>)],
) {
    for chunk in delta::state_chunks(snapshots, delta::STATE_CHUNK_BYTES) {
        let body = Body::StateChunk {
            chunk: chunk.into(),
        };
        let _ = tx.send(reply(op as u8, header, Status::More, body.encode()));
    }
    let body = Body::Seq { seq }.encode();
    let _ = tx.send(reply(op as u8, header, Status::Ok, body));
}

fn send_listing<'p>(
    op: Op,
    header: Header,
    tx: &mpsc::UnboundedSender<Bytes>,
    presences: impl Iterator<Item = &'p Entry>,
) {
    let chunks = listing_chunks(presences);
    let last = chunks.len().saturating_sub(1);
    for (i, (continues, term)) in chunks.into_iter().enumerate() {
        let status = if i == last { Status::Ok } else { Status::More };
        let body = Body::Chunk {
            continues,
            term: term.into(),
        };
        let _ = tx.send(reply(op as u8, header, status, body.encode()));
    }
}
