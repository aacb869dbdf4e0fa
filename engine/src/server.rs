//! Protocol handling for one client connection, on the shard that accepted it.
//!
//! The reader loop decodes frames one at a time (length checked before the body is
//! allocated; control archives validated before use) and dispatches them. Appends are
//! queued in their container *before* the next frame is read, so a connection's appends
//! keep their order; their answers (and those of every other request) are sent by a
//! writer task as they complete, matched by request id (pipelining). A broken frame gets an
//! error reply and the connection is closed; an unknown kind or invalid archive gets an
//! error reply and the connection goes on. Nothing a client sends can panic the shard.

use crate::container::core::{OpResult, Request};
use crate::container::io::RefusalNotice;
use crate::error::EngineError;
use crate::shard::{Owner, Shard};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use futures::{FutureExt, StreamExt};
use glommio::sync::{Semaphore, StaticPermit};
use sluice_meta::controller::ControllerError;
use sluice_meta::controller::{PendingScale, StreamRecord, TxnRecord};
use sluice_meta::{MetaError, MetaStore, StreamState};
use sluice_net::constants::{
    APPEND_PARTS_MAX, CONTROL_BYTES_MAX, FRAME_HEADER_BYTES, HELLO_MAGIC, HISTORY_PAGE_MAX, LENGTHS_PAGE_MAX,
    NAMES_PAGE_MAX, PROTOCOL_VERSION, TXN_PAGE_MAX,
};
use sluice_net::frame::{Frame, FrameHeader, encode_frame_head};
use sluice_net::messages::*;
use sluice_net::txn::shadow_segment_name;
use sluice_net::{ErrorCode, ProtocolError, Retention, ScalingPolicy, TxnState};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Requests a connection may have in flight before the server stops reading from it.
const CONNECTION_REQUESTS_MAX: u64 = 4096;

/// A reply: header+control, then its raw payload in pieces (none for most replies).
type Reply = (Vec<u8>, Vec<Bytes>);

/// Payload pieces at least this large skip the connection's write buffer (one copy less).
const DIRECT_WRITE_BYTES: usize = 32 << 10;

/// Why a connection ends after a refused append (`Started::Now(_, true)` and the like).
const REFUSED_CLOSE: &str = "closed after a refused append";

/// After a refused append ends a connection, how long the requests taken up before it may
/// take to be answered before the connection closes anyway. Appends are answered within a
/// flush; a read waiting at a segment's tail (up to `READ_WAIT_MS_MAX`) is not waited for:
/// the client, not told that nothing more is read, would go on sending on the connection
/// and wait for answers that never come.
const REFUSED_CLOSE_GRACE: Duration = Duration::from_millis(200);

/// A reply on its way to the socket, with the request slot it frees once written: a client
/// that sends without reading cannot pile up more than `CONNECTION_REQUESTS_MAX` replies.
type Outgoing = (Reply, Option<StaticPermit>);

fn reply<T: Control>(request_id: u64, msg: &T) -> Reply {
    let head = encode_frame_head(request_id, msg, 0);
    let control = head.len() - FRAME_HEADER_BYTES;
    if control > CONTROL_BYTES_MAX {
        // A client would refuse the frame and drop the connection: say what happened instead.
        let message = format!(
            "the answer ({:?}, {control} bytes) exceeds the {CONTROL_BYTES_MAX}-byte limit of a control section",
            T::KIND
        );
        tracing::warn!(%message, "answer too large");
        return error_reply(request_id, ErrorCode::TooLarge, message, None, None);
    }
    (head, Vec::new())
}

fn error_reply(
    request_id: u64,
    code: ErrorCode,
    message: String,
    endpoint: Option<String>,
    offset: Option<u64>,
) -> Reply {
    reply(request_id, &ErrorReply { code: code as u16, message, endpoint, offset })
}

fn engine_error(request_id: u64, e: &EngineError) -> Reply {
    reply(request_id, &engine_error_message(e))
}

fn engine_error_message(e: &EngineError) -> ErrorReply {
    let (code, offset) = e.code();
    ErrorReply { code: code as u16, message: e.to_string(), endpoint: None, offset }
}

fn controller_error(request_id: u64, e: &ControllerError) -> Reply {
    error_reply(request_id, e.code(), e.to_string(), None, None)
}

/// A list page's size: as asked, at most `max` (0: `max`).
fn page_limit(asked: u32, max: u32) -> usize {
    (if asked == 0 { max } else { asked.min(max) }) as usize
}

/// The reply to a controller call.
fn ctl_reply<T: Control>(request_id: u64, r: Result<T, ControllerError>) -> Reply {
    match r {
        Ok(msg) => reply(request_id, &msg),
        Err(e) => controller_error(request_id, &e),
    }
}

fn protocol_error(request_id: u64, e: &ProtocolError) -> Reply {
    error_reply(request_id, ErrorCode::BadRequest, e.to_string(), None, None)
}

/// How a client reached the server; the endpoints it is told are of the same kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcp,
    /// A Unix socket (a client on the same host).
    Unix,
}

/// The `WrongHost` answer for a segment served elsewhere (`owner` is not `Local`).
fn wrong_host<S: MetaStore>(shard: &Shard<S>, via: Via, request_id: u64, segment: &str, owner: Owner) -> Reply {
    reply(request_id, &wrong_host_error(shard, via, segment, owner))
}

fn wrong_host_error<S: MetaStore>(shard: &Shard<S>, via: Via, segment: &str, owner: Owner) -> ErrorReply {
    let (message, endpoint) = match owner {
        Owner::Remote(s) => {
            let ep = shard.endpoints_via(via).get(s as usize).map(|e| e.address.clone()).unwrap_or_default();
            (format!("segment {segment} is served by shard {s} at {ep}"), Some(ep))
        }
        Owner::Node(c, Some(ep)) => {
            (format!("segment {segment} (container {c}) is served by the node at {ep}"), Some(ep))
        }
        Owner::Node(c, None) => (format!("segment {segment}: container {c} is moving between nodes; retry"), None),
        Owner::Local(_) => unreachable!("a local segment is not redirected"),
    };
    ErrorReply { code: ErrorCode::WrongHost as u16, message, endpoint, offset: None }
}

/// Serves one connection until it closes or breaks.
/// `peer` names the client in the server's log.
pub async fn serve_connection<S, T>(shard: Rc<Shard<S>>, stream: T, via: Via, peer: String)
where
    S: MetaStore,
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    let (read_half, write_half) = stream.split();
    let (tx, mut rx) = mpsc::unbounded::<Outgoing>();
    let writer = glommio::spawn_local(async move {
        let mut w = BufWriter::with_capacity(256 << 10, write_half);
        while let Some(first) = rx.next().await {
            let mut batch = Some(first);
            while let Some(((head, pieces), permit)) = batch.take() {
                if w.write_all(&head).await.is_err() {
                    return;
                }
                for p in &pieces {
                    let sent = if p.len() >= DIRECT_WRITE_BYTES {
                        // Large pieces (slices of a log file image) go straight to the
                        // socket after what is buffered, not through the buffer.
                        w.flush().await.is_ok() && w.get_mut().write_all(p).await.is_ok()
                    } else {
                        w.write_all(p).await.is_ok()
                    };
                    if !sent {
                        return;
                    }
                }
                drop(permit);
                if let Ok(next) = rx.try_recv() {
                    batch = Some(next);
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.close().await;
    })
    .detach();
    let mut reader = BufReader::with_capacity(256 << 10, read_half);
    let ended = read_loop(&shard, via, &mut reader, &tx).await;
    drop(tx);
    match ended {
        Err(e) if e == REFUSED_CLOSE => {
            let mut writer = writer;
            let grace = glommio::timer::sleep(REFUSED_CLOSE_GRACE);
            futures::pin_mut!(grace);
            if let futures::future::Either::Right(_) = futures::future::select(&mut writer, grace).await {
                // Answers still pending are dropped (the client resends what it wrote); the
                // socket closes with the writer's half and the reader's.
                writer.cancel();
            }
            tracing::debug!(%peer, "connection closed after a refused append");
        }
        ended => {
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            let _ = writer.await;
        }
    }
}

/// Reads one frame's header and body: `None` at a clean end of stream. The length is checked
/// before the body is allocated; a bad header cannot be skipped, so it is answered and the
/// connection ends.
async fn read_frame<R: futures::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    send: &impl Fn(Reply),
) -> Result<Option<(FrameHeader, Bytes)>, String> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    match r.read_exact(&mut head).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let header = match FrameHeader::parse(&head, max) {
        Ok(h) => h,
        Err(e) => {
            send(protocol_error(u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")), &e));
            return Err(e.to_string());
        }
    };
    // Copied out of the read buffer into memory that is never zeroed first (a zeroed body
    // cost a memset of every byte received, in memory long out of the cache).
    let len = header.body_len as usize;
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let buffered = r.fill_buf().await.map_err(|e| e.to_string())?;
        if buffered.is_empty() {
            return Err(format!("connection closed {} bytes into a {len}-byte frame body", body.len()));
        }
        let take = buffered.len().min(len - body.len());
        body.extend_from_slice(&buffered[..take]);
        std::pin::Pin::new(&mut *r).consume(take);
    }
    Ok(Some((header, Bytes::from(body))))
}

async fn read_loop<S: MetaStore, R: futures::AsyncBufRead + Unpin>(
    shard: &Rc<Shard<S>>,
    via: Via,
    r: &mut R,
    tx: &mpsc::UnboundedSender<Outgoing>,
) -> Result<(), String> {
    let max = shard.cfg.frame_bytes_max;
    let send = |rep: Reply| {
        let _ = tx.unbounded_send((rep, None));
    };
    // Handshake.
    let Some((header, body)) = read_frame(r, max, &send).await? else { return Ok(()) };
    let hello = Frame::from_parts(&header, body).and_then(|f| f.decode::<Hello>());
    let hello = match hello {
        Ok(h) if h.magic == HELLO_MAGIC => h,
        Ok(_) => {
            send(error_reply(header.request_id, ErrorCode::BadRequest, "bad handshake magic".into(), None, None));
            return Err("bad handshake magic".into());
        }
        Err(e) => {
            send(error_reply(
                header.request_id,
                ErrorCode::BadRequest,
                format!("expected Hello first: {e}"),
                None,
                None,
            ));
            return Err(e.to_string());
        }
    };
    if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
        let msg =
            format!("client speaks versions {}..={}, server {PROTOCOL_VERSION}", hello.min_version, hello.max_version);
        send(error_reply(header.request_id, ErrorCode::UnsupportedVersion, msg.clone(), None, None));
        return Err(msg);
    }
    send(reply(
        header.request_id,
        &HelloReply {
            version: PROTOCOL_VERSION,
            node: shard.cfg.node_name.clone(),
            container_count: shard.cfg.container_count(),
            shards: shard.endpoints_via(via).to_vec(),
            containers: shard
                .cfg
                .cluster
                .as_ref()
                .map(|r| r.endpoints(shard.cfg.container_count()))
                .unwrap_or_default(),
            append_bytes_max: crate::container::core::append_bytes_max(shard.cfg.log_file_bytes) as u64,
            placement: shard.cfg.placement.as_u8(),
        },
    ));
    let limit = Rc::new(Semaphore::new(CONNECTION_REQUESTS_MAX));
    let refused = Rc::new(Cell::new(false));
    // Resolves when this function returns (the connection ends): its sender is dropped then.
    let (_connected, gone) = futures::channel::oneshot::channel::<()>();
    let gone = gone.shared();
    loop {
        let Some((header, body)) = read_frame(r, max, &send).await? else { return Ok(()) };
        let permit = Some(limit.clone().acquire_static_permit(1).await.map_err(|e| e.to_string())?);
        // Checked after the last wait before the request is started: an append of this
        // connection refused after it was queued raises `refused` at once (the container
        // sets it as it refuses), so no later request overtakes that refusal.
        if refused.get() {
            return Err(REFUSED_CLOSE.into());
        }
        crate::stats::record_request();
        let frame = match Frame::from_parts(&header, body) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.unbounded_send((protocol_error(header.request_id, &e), permit));
                continue;
            }
        };
        let id = frame.request_id;
        match dispatch(shard, via, frame, &refused) {
            Ok(Dispatched::Now(rep)) => {
                let _ = tx.unbounded_send((rep, permit));
            }
            Ok(Dispatched::Close(rep)) => {
                send(rep);
                return Err(REFUSED_CLOSE.into());
            }
            Ok(Dispatched::Later(fut)) => {
                let tx = tx.clone();
                glommio::spawn_local(async move {
                    let _ = tx.unbounded_send((fut.await, permit));
                })
                .detach();
            }
            Ok(Dispatched::CloseAfter(fut)) => {
                let tx = tx.clone();
                glommio::spawn_local(async move {
                    let _ = tx.unbounded_send((fut.await, permit));
                })
                .detach();
                return Err(REFUSED_CLOSE.into());
            }
            Ok(Dispatched::WhileConnected(what, fut)) => {
                let (tx, gone) = (tx.clone(), gone.clone());
                glommio::spawn_local(async move {
                    match futures::future::select(fut, gone).await {
                        futures::future::Either::Left((rep, _)) => {
                            let _ = tx.unbounded_send((rep, permit));
                        }
                        futures::future::Either::Right(_) => {
                            tracing::info!(request = what, "stopped: its client disconnected");
                        }
                    }
                })
                .detach();
            }
            Err(e) => {
                let _ = tx.unbounded_send((protocol_error(id, &e), permit));
            }
        }
    }
}

enum Dispatched {
    Now(Reply),
    /// Answer, then close the connection.
    Close(Reply),
    /// Answer later. An append refused after it was queued (a full disk, its container
    /// stopped or poisoned) raises the connection's refusal notice as it is refused, and
    /// the read loop takes no further request.
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Reply>>>),
    /// Answer later and read no further request (an `Appends` part was refused at once).
    CloseAfter(std::pin::Pin<Box<dyn std::future::Future<Output = Reply>>>),
    /// Answer later, unless the connection ends first: then the work (named) is dropped.
    /// Only for work that changes nothing and that no one else waits for (a scrub).
    WhileConnected(&'static str, std::pin::Pin<Box<dyn std::future::Future<Output = Reply>>>),
}

fn later(f: impl std::future::Future<Output = Reply> + 'static) -> Dispatched {
    Dispatched::Later(Box::pin(f))
}

/// A queued segment request's result.
type QueuedOp = std::pin::Pin<Box<dyn std::future::Future<Output = Result<OpResult, EngineError>>>>;

/// A segment request started: queued in its local container, or answered at once.
enum Started {
    /// Answered now (refused, or `WrongHost`); `true`: the connection takes no further
    /// request (a refused append must not be followed by later appends of the same writer
    /// on this connection: the client resends them all, in order, on a new one).
    Now(ErrorReply, bool),
    /// Queued in its container.
    Queued(QueuedOp),
}

/// Routes a segment request to its local container (counting append rates for
/// auto-scaling, where the append is served), or answers `WrongHost`.
///
/// An append refused with a transient error (`ErrorCode::is_transient`: `WrongHost`, a
/// stopped or overloaded container, a full disk, ...) ends its connection: its writer sends
/// it again, and every append it sent after it, in order, on a new connection. Were a later
/// append of the same writer read from this connection and accepted (its container opened
/// here meanwhile, a full disk got room), the resend of the refused one would be taken for a
/// duplicate (its event numbers are below the accepted ones) and its events lost. An append
/// refused after it was queued raises `refused` (the connection's notice) at that moment,
/// before its answer is sent: the read loop checks it before starting each request, so a
/// later append read in between is not started either.
fn start_segment_op<S: MetaStore>(
    shard: &Shard<S>,
    via: Via,
    segment: &str,
    req: Request,
    refused: &RefusalNotice,
) -> Started {
    let append = matches!(req, Request::Append { .. });
    let ends = move |code: ErrorCode| append && code.is_transient();
    match shard.owner(segment) {
        Owner::Local(c) => {
            let notice = append.then(|| refused.clone());
            let fut = match shard.submit_local_noting(&c, segment, req, notice) {
                Ok(f) => f,
                Err(
                    e @ (EngineError::Overloaded(_)
                    | EngineError::LogFull(_)
                    | EngineError::NoSpace(_)
                    | EngineError::Poisoned { .. }),
                ) => return Started::Now(engine_error_message(&e), true),
                Err(e) => return Started::Now(engine_error_message(&e), ends(e.code().0)),
            };
            let read_at = Instant::now();
            Started::Queued(Box::pin(async move {
                let result = fut.await;
                if matches!(result, Ok(OpResult::Appended { .. })) {
                    crate::stats::record_append(read_at.elapsed());
                }
                result
            }))
        }
        other => {
            let close = ends(ErrorCode::WrongHost);
            let e = wrong_host_error(shard, via, segment, other);
            Started::Now(e, close)
        }
    }
}

/// The answer to a segment request's result.
fn op_reply(id: u64, result: Result<OpResult, EngineError>) -> Reply {
    match result {
        Ok(OpResult::Appended { offset, length, last_event_number, duplicate }) => {
            reply(id, &AppendAck { offset, length, last_event_number, duplicate })
        }
        Ok(OpResult::Done) => reply(id, &Done {}),
        Ok(OpResult::Status { .. }) => {
            engine_error(id, &EngineError::BadRequest("a status is asked with GetSegmentInfo".into()))
        }
        Err(e) => engine_error(id, &e),
    }
}

/// Routes a segment request to its local container, or answers `WrongHost`.
fn local_segment_op<S: MetaStore>(
    shard: &Shard<S>,
    via: Via,
    id: u64,
    segment: String,
    req: Request,
    refused: &RefusalNotice,
) -> Dispatched {
    match start_segment_op(shard, via, &segment, req, refused) {
        Started::Now(e, true) => Dispatched::Close(reply(id, &e)),
        Started::Now(e, false) => Dispatched::Now(reply(id, &e)),
        Started::Queued(fut) => Dispatched::Later(Box::pin(async move { op_reply(id, fut.await) })),
    }
}

/// The parts of an `Appends` frame, each queued as an append of its own, in order; one
/// answer once all are done. After a part refused at once in a way that closes the
/// connection, the later parts are not queued (one of them may be the same writer's next
/// batch) and get the same refusal; the connection reads no further frame.
fn appends<S: MetaStore>(
    shard: &Shard<S>,
    via: Via,
    id: u64,
    a: Appends,
    payload: Bytes,
    notice: &RefusalNotice,
) -> Dispatched {
    let total: u64 = a.parts.iter().map(|p| u64::from(p.data_bytes)).sum();
    if a.parts.is_empty() || a.parts.len() > APPEND_PARTS_MAX || total != payload.len() as u64 {
        let message = format!(
            "an Appends frame needs 1 to {APPEND_PARTS_MAX} parts whose data_bytes add up to its payload: {} parts, \
             {total} bytes named, {} bytes sent",
            a.parts.len(),
            payload.len()
        );
        return Dispatched::Now(error_reply(id, ErrorCode::BadRequest, message, None, None));
    }
    let mut started = Vec::with_capacity(a.parts.len());
    let mut refused: Option<ErrorReply> = None;
    let mut at = 0;
    for part in a.parts {
        let data = payload.slice(at..at + part.data_bytes as usize);
        at += part.data_bytes as usize;
        if let Some(r) = &refused {
            let message = format!("not queued: an earlier part of the same frame was refused ({})", r.message);
            started.push(Started::Now(ErrorReply { message, ..r.clone() }, true));
            continue;
        }
        let req = Request::Append {
            name: part.segment.clone(),
            writer: part.writer_id,
            first_event_number: part.first_event_number,
            event_count: part.event_count,
            expected_offset: None,
            data,
        };
        let s = start_segment_op(shard, via, &part.segment, req, notice);
        if let Started::Now(e, true) = &s {
            refused = Some(e.clone());
        }
        started.push(s);
    }
    let answer = Box::pin(async move {
        let mut outcomes = Vec::with_capacity(started.len());
        for s in started {
            let outcome = match s {
                Started::Now(e, _) => AppendOutcome::Failed(e),
                Started::Queued(fut) => match fut.await {
                    Ok(OpResult::Appended { offset, length, last_event_number, duplicate }) => {
                        AppendOutcome::Acked(AppendAck { offset, length, last_event_number, duplicate })
                    }
                    Ok(_) => AppendOutcome::Failed(engine_error_message(&EngineError::BadRequest(
                        "an append answered without an offset".into(),
                    ))),
                    Err(e) => AppendOutcome::Failed(engine_error_message(&e)),
                },
            };
            outcomes.push(outcome);
        }
        reply(id, &AppendsReply { outcomes })
    });
    if refused.is_some() { Dispatched::CloseAfter(answer) } else { Dispatched::Later(answer) }
}

/// Moves a committed transaction's shadow into its segment (same container: a shadow hashes
/// like its segment), counting the events for auto-scaling like appends.
fn merge_segment<S: MetaStore>(shard: &Rc<Shard<S>>, via: Via, id: u64, m: MergeSegment) -> Dispatched {
    if m.source.split_once(sluice_net::txn::TXN_NAME_MARK).is_none_or(|(base, _)| base != m.segment) {
        let msg = format!("{} is not a shadow segment of {}", m.source, m.segment);
        return Dispatched::Now(error_reply(id, ErrorCode::BadRequest, msg, None, None));
    }
    let c = match shard.owner(&m.segment) {
        Owner::Local(c) => c,
        other => return Dispatched::Now(wrong_host(shard, via, id, &m.segment, other)),
    };
    let shard = shard.clone();
    let read_at = Instant::now();
    later(async move {
        let result = c.merge(m.segment.clone(), m.source, m.source_length).await;
        if result.is_ok() {
            crate::stats::record_append(read_at.elapsed());
        }
        match result {
            Ok((OpResult::Appended { offset, length, .. }, events)) => {
                if events > 0 {
                    let now = std::time::Instant::now();
                    let bytes = length - offset;
                    shard.rates.borrow_mut().record(&m.segment, events, bytes, now);
                }
                reply(id, &AppendAck { offset, length, last_event_number: 0, duplicate: false })
            }
            // Merged before: answered like a duplicate append.
            Ok(_) => {
                let length = c.status(&m.segment).map_or(0, |s| s.length);
                reply(id, &AppendAck { offset: 0, length, last_event_number: 0, duplicate: true })
            }
            Err(e) => engine_error(id, &e),
        }
    })
}

/// Starts one request of a connection; `refused`: the connection's refusal notice (see
/// `start_segment_op`).
fn dispatch<S: MetaStore>(
    shard: &Rc<Shard<S>>,
    via: Via,
    frame: Frame,
    refused: &RefusalNotice,
) -> Result<Dispatched, ProtocolError> {
    let id = frame.request_id;
    Ok(match frame.kind {
        Kind::Append => {
            let a: Append = frame.decode()?;
            let req = Request::Append {
                name: a.segment.clone(),
                writer: a.writer_id,
                first_event_number: a.first_event_number,
                event_count: a.event_count,
                expected_offset: a.expected_offset,
                data: frame.payload,
            };
            local_segment_op(shard, via, id, a.segment, req, refused)
        }
        Kind::Appends => {
            let a: Appends = frame.decode()?;
            appends(shard, via, id, a, frame.payload, refused)
        }
        Kind::Read => {
            let rd: Read = frame.decode()?;
            match shard.owner(&rd.segment) {
                Owner::Local(c) => later(async move {
                    let max = rd.max_bytes.clamp(1, crate::constants::READ_BYTES_MAX) as usize;
                    let wait = Duration::from_millis(u64::from(rd.wait_ms.min(crate::constants::READ_WAIT_MS_MAX)));
                    match c.read(&rd.segment, rd.offset, max, wait).await {
                        Ok(d) => {
                            let len = d.len();
                            let end = d.status.sealed && rd.offset + len as u64 >= d.status.length;
                            let msg = ReadReply {
                                offset: rd.offset,
                                length: d.status.length,
                                sealed: d.status.sealed,
                                end_of_segment: end,
                            };
                            (encode_frame_head(id, &msg, len), d.pieces)
                        }
                        Err(e) => engine_error(id, &e),
                    }
                }),
                other => Dispatched::Now(wrong_host(shard, via, id, &rd.segment, other)),
            }
        }
        Kind::GetStats => {
            let g: GetStats = frame.decode()?;
            let mut stats = crate::stats::snapshot(shard.index, g.reset);
            let mut containers: Vec<_> = shard.containers.borrow().values().map(|c| c.health()).collect();
            containers.sort_by_key(|h| h.container);
            stats.containers = containers;
            stats.node = shard.cfg.node_name.clone();
            Dispatched::Now(reply(id, &stats))
        }
        Kind::ListSegmentLengths => {
            let g: ListSegmentLengths = frame.decode()?;
            // Each container's first page, then the shard's: the work is a selection over the
            // open segments, and only a page's names are copied (this runs on the shard).
            let limit = page_limit(g.limit, LENGTHS_PAGE_MAX);
            let (mut segments, mut more) = (Vec::new(), false);
            for c in shard.containers.borrow().values() {
                let (first, after_them) = c.open_lengths(&g.after, limit);
                segments.extend(first);
                more |= after_them;
            }
            more |= crate::container::core::keep_first(&mut segments, limit);
            let next = more.then(|| segments.last().map(|(name, _)| name.clone())).flatten();
            Dispatched::Now(reply(id, &SegmentLengths { segments, next }))
        }
        Kind::ScrubLog => {
            let g: ScrubLog = frame.decode()?;
            let mut mine: Vec<_> = {
                let containers = shard.containers.borrow();
                g.containers.iter().filter_map(|c| containers.get(c).cloned()).collect()
            };
            mine.sort_by_key(|c| c.id());
            let index = shard.index;
            // Nobody else waits for a scrub: it stops when its client leaves.
            Dispatched::WhileConnected(
                "log scrub",
                Box::pin(async move {
                    let mut containers = Vec::with_capacity(mine.len());
                    for c in mine {
                        containers.push(c.scrub(g.bytes_per_sec).await);
                    }
                    reply(id, &ScrubReport { shard: index, containers })
                }),
            )
        }
        Kind::GetSegmentInfo => {
            let g: GetSegmentInfo = frame.decode()?;
            match shard.owner(&g.segment) {
                Owner::Local(c) => Dispatched::Now(match c.status(&g.segment) {
                    Ok(s) => reply(
                        id,
                        &SegmentInfo {
                            segment: s.name,
                            start_offset: s.start_offset,
                            length: s.length,
                            sealed: s.sealed,
                            writers: s
                                .writers
                                .into_iter()
                                .map(|(w, n)| WriterState { writer_id: w, event_number: n })
                                .collect(),
                            tier2_end: s.tier2_end,
                            rates: {
                                let r = shard.rates.borrow_mut().rates(&g.segment, std::time::Instant::now());
                                AppendRates {
                                    events_per_s: r.events_fast,
                                    bytes_per_s: r.bytes_fast,
                                    events_per_s_long: r.events_slow,
                                    bytes_per_s_long: r.bytes_slow,
                                    window_ms: shard.cfg.rate_window.as_millis() as u64,
                                    measured_ms: r.measured.as_millis() as u64,
                                }
                            },
                        },
                    ),
                    Err(e) => engine_error(id, &e),
                }),
                other => Dispatched::Now(wrong_host(shard, via, id, &g.segment, other)),
            }
        }
        Kind::CreateSegment => {
            let m: CreateSegment = frame.decode()?;
            local_segment_op(shard, via, id, m.segment.clone(), Request::Create { name: m.segment }, refused)
        }
        Kind::SealSegment => {
            let m: SealSegment = frame.decode()?;
            local_segment_op(shard, via, id, m.segment.clone(), Request::Seal { name: m.segment }, refused)
        }
        Kind::TruncateSegment => {
            let m: TruncateSegment = frame.decode()?;
            local_segment_op(
                shard,
                via,
                id,
                m.segment.clone(),
                Request::Truncate { name: m.segment, offset: m.offset },
                refused,
            )
        }
        Kind::DeleteSegment => {
            let m: DeleteSegment = frame.decode()?;
            local_segment_op(shard, via, id, m.segment.clone(), Request::Delete { name: m.segment }, refused)
        }
        Kind::MergeSegment => merge_segment(shard, via, id, frame.decode()?),
        Kind::CreateScope => {
            let m: CreateScope = frame.decode()?;
            let shard = shard.clone();
            later(async move { ctl_reply(id, shard.controller.create_scope(&m.scope).await.map(|()| Done {})) })
        }
        Kind::DeleteScope => {
            let m: DeleteScope = frame.decode()?;
            let shard = shard.clone();
            later(async move { ctl_reply(id, shard.controller.delete_scope(&m.scope).await.map(|()| Done {})) })
        }
        Kind::ListScopes => {
            let m: ListScopes = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.list_scopes_page(&m.after, page_limit(m.limit, NAMES_PAGE_MAX)).await;
                ctl_reply(id, r.map(|(scopes, next)| ScopeList { scopes, next: next.unwrap_or_default() }))
            })
        }
        Kind::ListStreams => {
            let m: ListStreams = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let limit = page_limit(m.limit, NAMES_PAGE_MAX);
                let r = shard.controller.list_stream_entries_page(&m.scope, &m.after, limit).await;
                ctl_reply(id, r.map(|(streams, next)| StreamList { streams, next: next.unwrap_or_default() }))
            })
        }
        Kind::GetStream => {
            let m: GetStream = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match current_stream(&shard, &m.scope, &m.stream).await {
                    Ok(r) => reply(id, &stream_info(m.scope, m.stream, &r)),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::GetStreamHistory => {
            let m: GetStreamHistory = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let current = match current_stream(&shard, &m.scope, &m.stream).await {
                    Ok(r) => r.epoch(),
                    Err(e) => return e.into_reply(id),
                };
                let limit = page_limit(m.limit, HISTORY_PAGE_MAX);
                // Wire entries are larger than the stored ones (epochs on each segment).
                let bytes = CONTROL_BYTES_MAX / 4;
                let page =
                    shard.controller.history_page(&m.scope, &m.stream, current, m.from_epoch, limit, bytes).await;
                ctl_reply(id, page)
            })
        }
        Kind::ScaleStream => {
            let m: ScaleStream = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match scale_stream(&shard, &m).await {
                    Ok(r) => reply(id, &stream_info(m.scope, m.stream, &r)),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::CreateStream => {
            let m: CreateStream = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                stream_admin(&shard, id, StreamAdmin::Create(m.segments, m.retention, m.scaling), &m.scope, &m.stream)
                    .await
            })
        }
        Kind::UpdateStream => {
            let m: UpdateStream = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.set_policies(&m.scope, &m.stream, m.retention, m.scaling).await;
                ctl_reply(id, r.map(|_| Done {}))
            })
        }
        Kind::SealStream => {
            let m: SealStream = frame.decode()?;
            let shard = shard.clone();
            later(async move { stream_admin(&shard, id, StreamAdmin::Seal, &m.scope, &m.stream).await })
        }
        Kind::DeleteStream => {
            let m: DeleteStream = frame.decode()?;
            let shard = shard.clone();
            later(async move { stream_admin(&shard, id, StreamAdmin::Delete, &m.scope, &m.stream).await })
        }
        Kind::BeginTxn => {
            let m: BeginTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match begin_txn(&shard, &m).await {
                    Ok(t) => reply(id, &txn_info(m.scope, m.stream, &t)),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::GetTxn => {
            let m: GetTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.get_txn(&m.scope, &m.stream, m.txn).await;
                ctl_reply(id, r.map(|t| txn_info(m.scope, m.stream, &t)))
            })
        }
        Kind::ListTxns => {
            let m: ListTxns = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let limit = page_limit(m.limit, TXN_PAGE_MAX);
                // Half the control limit for the records leaves room for the names around them.
                let bytes = CONTROL_BYTES_MAX / 2;
                let r = shard.controller.list_txns_page(&m.scope, &m.stream, &m.after, limit, bytes).await;
                ctl_reply(
                    id,
                    r.map(|(page, next)| TxnList {
                        txns: page.into_iter().map(|(sc, st, t)| txn_info(sc, st, &t)).collect(),
                        next: next.unwrap_or_default(),
                    }),
                )
            })
        }
        Kind::PingTxn => {
            let m: PingTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.ping_txn(&m.scope, &m.stream, m.txn, m.lease_ms).await;
                ctl_reply(id, r.map(|t| txn_info(m.scope, m.stream, &t)))
            })
        }
        Kind::CommitTxn => {
            let m: CommitTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match commit_txn(&shard, &m.scope, &m.stream, m.txn, &m.lengths).await {
                    Ok(t) => reply(id, &txn_info(m.scope, m.stream, &t)),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::FinishCommit => {
            let m: FinishCommit = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.end_commit(&m.scope, &m.stream, m.txn).await;
                ctl_reply(id, r.map(|t| txn_info(m.scope, m.stream, &t)))
            })
        }
        Kind::AbortTxn => {
            let m: AbortTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match abort_txn(&shard, &m.scope, &m.stream, m.txn).await {
                    Ok(t) => reply(id, &txn_info(m.scope, m.stream, &t)),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::ForgetTxn => {
            let m: ForgetTxn = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                match forget_txn(&shard, &m.scope, &m.stream, m.txn).await {
                    Ok(()) => reply(id, &Done {}),
                    Err(e) => e.into_reply(id),
                }
            })
        }
        Kind::AddSubscriber => {
            let m: AddSubscriber = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                ctl_reply(id, shard.controller.add_subscriber(&m.scope, &m.stream, &m.group).await.map(|()| Done {}))
            })
        }
        Kind::RemoveSubscriber => {
            let m: RemoveSubscriber = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                ctl_reply(id, shard.controller.remove_subscriber(&m.scope, &m.stream, &m.group).await.map(|()| Done {}))
            })
        }
        Kind::UpdateSubscriber => {
            let m: UpdateSubscriber = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let positions = m.positions.iter().map(|p| (p.segment, p.offset)).collect();
                let r = shard.controller.update_subscriber(&m.scope, &m.stream, &m.group, positions).await;
                ctl_reply(id, r.map(|_| Done {}))
            })
        }
        Kind::ListSubscribers => {
            let m: ListSubscribers = frame.decode()?;
            let shard = shard.clone();
            later(async move {
                let r = shard.controller.list_subscribers(&m.scope, &m.stream).await;
                ctl_reply(
                    id,
                    r.map(|all| SubscriberList {
                        subscribers: all
                            .into_iter()
                            .map(|(group, r)| SubscriberInfo {
                                group,
                                positions: r.positions.map(|p| {
                                    p.into_iter().map(|(segment, offset)| SegmentOffset { segment, offset }).collect()
                                }),
                                updated_unix_ms: r.updated_unix_ms,
                            })
                            .collect(),
                    }),
                )
            })
        }
        Kind::Hello => {
            Dispatched::Now(error_reply(id, ErrorCode::BadRequest, "handshake already done".into(), None, None))
        }
        other => {
            Dispatched::Now(error_reply(id, ErrorCode::BadRequest, format!("{other:?} is not a request"), None, None))
        }
    })
}

/// A failed step of a stream operation: a controller or an engine error.
enum AdminError {
    Controller(ControllerError),
    Engine(EngineError),
}

impl AdminError {
    fn into_reply(self, id: u64) -> Reply {
        match self {
            AdminError::Controller(e) => controller_error(id, &e),
            AdminError::Engine(e) => engine_error(id, &e),
        }
    }
}

impl From<ControllerError> for AdminError {
    fn from(e: ControllerError) -> Self {
        AdminError::Controller(e)
    }
}

impl From<EngineError> for AdminError {
    fn from(e: EngineError) -> Self {
        AdminError::Engine(e)
    }
}

fn stream_info(scope: String, stream: String, r: &StreamRecord) -> StreamInfo {
    StreamInfo {
        scope,
        stream,
        sealed: matches!(r.state, StreamState::Sealed | StreamState::Sealing),
        segments: r.ranges(),
        retention: r.retention,
        scaling: r.scaling,
        epoch: r.epoch(),
    }
}

/// A stream's record, with any scaling left unfinished (by a crash or a lost connection)
/// finished first: nobody sees a stream whose replaced segments are still writable.
async fn current_stream<S: MetaStore>(shard: &Shard<S>, scope: &str, stream: &str) -> Result<StreamRecord, AdminError> {
    let r = shard.controller.get_stream(scope, stream).await?;
    if r.state == StreamState::Creating {
        return Err(ControllerError::NoSuchStream(format!("{scope}/{stream} (still being created)")).into());
    }
    match r.scale.clone() {
        Some(p) => finish_scale(shard, scope, stream, p).await,
        None => Ok(r),
    }
}

/// Scaling: record it, create the new segments, make them current, seal the old ones,
/// clear the record's pending scale. Every step tolerates having been done, so any call
/// that finds the scale pending finishes it.
async fn scale_stream<S: MetaStore>(shard: &Shard<S>, m: &ScaleStream) -> Result<StreamRecord, AdminError> {
    current_stream(shard, &m.scope, &m.stream).await?;
    match shard.controller.begin_scale(&m.scope, &m.stream, &m.seal, &m.ranges).await? {
        Some(p) => finish_scale(shard, &m.scope, &m.stream, p).await,
        // Done before (a retry of a call whose answer was lost): the same answer again.
        None => current_stream(shard, &m.scope, &m.stream).await,
    }
}

async fn finish_scale<S: MetaStore>(
    shard: &Shard<S>,
    scope: &str,
    stream: &str,
    p: PendingScale,
) -> Result<StreamRecord, AdminError> {
    let name = |n: u64| format!("{scope}/{stream}/{n}");
    if !p.committed {
        for s in &p.create {
            match shard.segment_op(name(s.number), Request::Create { name: name(s.number) }).await {
                Ok(_) | Err(EngineError::SegmentExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Err(e) = shard.controller.commit_scale(scope, stream, p.epoch).await {
            if matches!(e, ControllerError::Meta(MetaError::TooLarge(_))) {
                // The record cannot take another epoch (etcd's size limit): undo the scaling,
                // or every later look at the stream would try to finish it and fail too.
                tracing::warn!(stream = %format!("{scope}/{stream}"), error = %e, "scaling undone");
                shard.controller.cancel_scale(scope, stream, p.epoch).await?;
                for s in &p.create {
                    let _ = shard.segment_op(name(s.number), Request::Delete { name: name(s.number) }).await;
                }
            }
            return Err(e.into());
        }
    }
    for &n in &p.seal {
        match shard.segment_op(name(n), Request::Seal { name: name(n) }).await {
            Ok(_) | Err(EngineError::NoSuchSegment(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(shard.controller.end_scale(scope, stream, p.epoch).await?)
}

fn txn_info(scope: String, stream: String, t: &TxnRecord) -> TxnInfo {
    TxnInfo {
        scope,
        stream,
        txn: t.id,
        state: t.state,
        epoch: t.epoch,
        segments: t
            .segments
            .iter()
            .map(|s| SegmentRange { number: s.number, key_low: s.key_low, key_high: s.key_high })
            .collect(),
        lease_ms: t.lease_ms,
        lease_expires_unix_ms: t.lease_expires_unix_ms,
        created_unix_ms: t.created_unix_ms,
        finished_unix_ms: t.finished_unix_ms,
        lengths: t.lengths.clone(),
    }
}

/// Opens a transaction: its record (on the current epoch, with any pending scaling
/// finished first), then one shadow segment per segment of that epoch.
async fn begin_txn<S: MetaStore>(shard: &Shard<S>, m: &BeginTxn) -> Result<TxnRecord, AdminError> {
    if m.txn == 0 {
        return Err(ControllerError::Invalid("a transaction id is not zero".into()).into());
    }
    current_stream(shard, &m.scope, &m.stream).await?;
    let id = m.txn;
    let t = shard.controller.begin_txn(&m.scope, &m.stream, id, m.lease_ms).await?;
    let creates = t.segments.iter().map(|s| {
        let name = shadow_segment_name(&m.scope, &m.stream, s.number, id);
        shard.segment_op(name.clone(), Request::Create { name })
    });
    for r in futures::future::join_all(creates).await {
        match r {
            Ok(_) | Err(EngineError::SegmentExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(t)
}

/// Decides a commit. With `lengths` (what the client wrote into each shadow), every shadow
/// must hold exactly that many durable bytes (else `InvalidArgument`, and the transaction
/// stays open); the record keeps them and the movers move exactly those bytes, so nothing
/// is sealed and the decision is one metadata write. Without, the shadows are sealed so
/// nothing more enters them, beside the decision (one durable step, not two): a
/// transaction whose commit is refused can only abort, so sealing its shadows costs
/// nothing. Either way the caller moves the events into the stream, then sends
/// `FinishCommit`. An open transaction whose lease ran out is aborted instead (and the
/// commit refused).
async fn commit_txn<S: MetaStore>(
    shard: &Shard<S>,
    scope: &str,
    stream: &str,
    txn: u128,
    lengths: &[u64],
) -> Result<TxnRecord, AdminError> {
    let t = shard.controller.get_txn(scope, stream, txn).await?;
    let decided = if lengths.is_empty() {
        let seals = t.segments.iter().map(|s| {
            let name = shadow_segment_name(scope, stream, s.number, txn);
            shard.segment_op(name.clone(), Request::Seal { name })
        });
        let (decided, sealed) =
            futures::join!(shard.controller.begin_commit(scope, stream, txn, &[]), futures::future::join_all(seals));
        // A refused decision is answered as such below, whatever the seals did.
        if decided.is_ok() {
            for r in sealed {
                match r {
                    // Gone: its events were moved already.
                    Ok(_) | Err(EngineError::NoSuchSegment(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        decided
    } else {
        check_shadow_lengths(shard, scope, stream, &t, lengths).await?;
        shard.controller.begin_commit(scope, stream, txn, lengths).await
    };
    match decided {
        Ok(t) => Ok(t),
        Err(e @ ControllerError::TxnNotOpen(_)) => {
            let t = shard.controller.get_txn(scope, stream, txn).await?;
            if t.state == TxnState::Open || t.state == TxnState::Aborting {
                abort_txn(shard, scope, stream, txn).await?;
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// One length per segment of `t`, and, while `t` is open, every shadow holds exactly that many
/// durable bytes (in `t.segments` order) and is not sealed; else `BadRequest`. (A decided
/// transaction keeps its recorded lengths.)
async fn check_shadow_lengths<S: MetaStore>(
    shard: &Shard<S>,
    scope: &str,
    stream: &str,
    t: &TxnRecord,
    lengths: &[u64],
) -> Result<(), AdminError> {
    if lengths.len() != t.segments.len() {
        let msg = format!("{} shadow lengths for a transaction of {} segments", lengths.len(), t.segments.len());
        return Err(ControllerError::Invalid(msg).into());
    }
    if t.state != TxnState::Open {
        return Ok(());
    }
    let statuses = t.segments.iter().map(|s| {
        let name = shadow_segment_name(scope, stream, s.number, t.id);
        shard.segment_op(name.clone(), Request::Status { name })
    });
    let statuses = futures::future::join_all(statuses).await;
    for ((s, r), &want) in t.segments.iter().zip(statuses).zip(lengths) {
        match r? {
            OpResult::Status { length, sealed: false } if length == want => {}
            OpResult::Status { length, sealed } => {
                return Err(ControllerError::Invalid(format!(
                    "the shadow of segment {} holds {length} bytes{}, the commit names {want}: writes still in flight?",
                    s.number,
                    if sealed { " and is sealed" } else { "" }
                ))
                .into());
            }
            other => return Err(EngineError::Io(format!("unexpected status answer {other:?}")).into()),
        }
    }
    Ok(())
}

/// Aborts: decided in the record, then the shadows deleted, then recorded as done.
async fn abort_txn<S: MetaStore>(
    shard: &Shard<S>,
    scope: &str,
    stream: &str,
    txn: u128,
) -> Result<TxnRecord, AdminError> {
    let t = shard.controller.begin_abort(scope, stream, txn).await?;
    if t.state == TxnState::Aborted {
        return Ok(t);
    }
    delete_shadows(shard, scope, stream, &t).await?;
    Ok(shard.controller.end_abort(scope, stream, txn).await?)
}

/// Forgets a committed or aborted transaction, deleting any shadow its commit left behind.
async fn forget_txn<S: MetaStore>(shard: &Shard<S>, scope: &str, stream: &str, txn: u128) -> Result<(), AdminError> {
    let t = shard.controller.get_txn(scope, stream, txn).await?;
    if t.state.is_final() {
        delete_shadows(shard, scope, stream, &t).await?;
    }
    Ok(shard.controller.forget_txn(scope, stream, txn, false).await?)
}

async fn delete_shadows<S: MetaStore>(
    shard: &Shard<S>,
    scope: &str,
    stream: &str,
    t: &TxnRecord,
) -> Result<(), EngineError> {
    let deletes = t.segments.iter().map(|s| {
        let name = shadow_segment_name(scope, stream, s.number, t.id);
        shard.segment_op(name.clone(), Request::Delete { name })
    });
    for r in futures::future::join_all(deletes).await {
        match r {
            Ok(_) | Err(EngineError::NoSuchSegment(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Before a stream's segments are sealed: its open transactions abort, and committing ones
/// are given `TXN_SETTLE_WAIT` to finish (their committer, or the controller's transaction
/// service, is moving their events in); after that the seal is refused (`Conflict`, retry).
async fn settle_txns<S: MetaStore>(shard: &Shard<S>, scope: &str, stream: &str) -> Result<(), AdminError> {
    let deadline = std::time::Instant::now() + TXN_SETTLE_WAIT;
    loop {
        let mut committing = 0;
        for (_, _, t) in shard.controller.list_txns(scope, stream).await? {
            match t.state {
                TxnState::Open | TxnState::Aborting => match abort_txn(shard, scope, stream, t.id).await {
                    // It moved on to committing meanwhile: wait for it like the others.
                    Ok(_) | Err(AdminError::Controller(ControllerError::TxnNotOpen(_))) => {}
                    Err(e) => return Err(e),
                },
                TxnState::Committing => committing += 1,
                TxnState::Committed | TxnState::Aborted => {}
            }
        }
        if committing == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(ControllerError::Busy(format!(
                "{scope}/{stream} has {committing} transaction(s) still committing; retry the seal"
            ))
            .into());
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
}

/// How long sealing a stream waits for its committing transactions.
const TXN_SETTLE_WAIT: Duration = Duration::from_secs(10);

enum StreamAdmin {
    Create(u32, Retention, ScalingPolicy),
    Seal,
    Delete,
}

/// Stream lifecycle: record first, then the segments on their shards, then the record's
/// final state. Each step tolerates having been done before, so a retry finishes the work.
async fn stream_admin<S: MetaStore>(shard: &Shard<S>, id: u64, op: StreamAdmin, scope: &str, stream: &str) -> Reply {
    let ctl = &shard.controller;
    let name = |n: u64| format!("{scope}/{stream}/{n}");
    let result: Result<(), Reply> = async {
        match op {
            StreamAdmin::Create(n, retention, scaling) => {
                let record = ctl
                    .begin_create_stream(scope, stream, n, retention, scaling)
                    .await
                    .map_err(|e| controller_error(id, &e))?;
                for s in &record.segments {
                    match shard.segment_op(name(s.number), Request::Create { name: name(s.number) }).await {
                        Ok(_) | Err(EngineError::SegmentExists(_)) => {}
                        Err(e) => return Err(engine_error(id, &e)),
                    }
                }
                ctl.set_state(scope, stream, StreamState::Active).await.map_err(|e| controller_error(id, &e))?;
            }
            StreamAdmin::Seal => {
                let record = current_stream(shard, scope, stream).await.map_err(|e| e.into_reply(id))?;
                if record.state != StreamState::Sealed {
                    ctl.set_state(scope, stream, StreamState::Sealing).await.map_err(|e| controller_error(id, &e))?;
                    settle_txns(shard, scope, stream).await.map_err(|e| e.into_reply(id))?;
                    for s in &record.segments {
                        match shard.segment_op(name(s.number), Request::Seal { name: name(s.number) }).await {
                            Ok(_) | Err(EngineError::NoSuchSegment(_)) => {}
                            Err(e) => return Err(engine_error(id, &e)),
                        }
                    }
                    ctl.set_state(scope, stream, StreamState::Sealed).await.map_err(|e| controller_error(id, &e))?;
                }
            }
            StreamAdmin::Delete => {
                let record = ctl.get_stream(scope, stream).await.map_err(|e| controller_error(id, &e))?;
                if record.state != StreamState::Sealed {
                    return Err(controller_error(id, &ControllerError::NotSealed(format!("{scope}/{stream}"))));
                }
                // Transactions first (their shadows, then their records), then every
                // segment the stream ever had, not only the current epoch's.
                for (_, _, t) in ctl.list_txns(scope, stream).await.map_err(|e| controller_error(id, &e))? {
                    delete_shadows(shard, scope, stream, &t).await.map_err(|e| engine_error(id, &e))?;
                    ctl.forget_txn(scope, stream, t.id, true).await.map_err(|e| controller_error(id, &e))?;
                }
                let all =
                    ctl.all_segments(scope, stream, record.epoch()).await.map_err(|e| controller_error(id, &e))?;
                for n in all {
                    match shard.segment_op(name(n), Request::Delete { name: name(n) }).await {
                        Ok(_) | Err(EngineError::NoSuchSegment(_)) => {}
                        Err(e) => return Err(engine_error(id, &e)),
                    }
                }
                ctl.remove_subscribers(scope, stream).await.map_err(|e| controller_error(id, &e))?;
                ctl.delete_stream_record(scope, stream).await.map_err(|e| controller_error(id, &e))?;
            }
        }
        Ok(())
    }
    .await;
    result.map_or_else(|r| r, |()| reply(id, &Done {}))
}
