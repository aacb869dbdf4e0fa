//! One connection (TCP, or a Unix socket on the same host) to one shard endpoint,
//! multiplexing pipelined requests by request id. A reader task matches replies to waiting callers. A request is written to the socket by
//! its caller when the socket is free (no task to wake, no copy of the payload); what the
//! socket does not take at once waits in the outbox, which a writer task drains, so frames
//! that pile up while the socket is busy go out in few writes. When the connection breaks
//! every waiting call fails with `ConnectionLost` and the connection reports itself closed.
//! A caller may instead give a reply handler (`send_then`) that the reader task runs with
//! the reply: no task to wake between the reply and what it settles. A reply that does not
//! come within the connection's answer timeout (a frozen peer, a lost answer) gives the
//! connection up: the call fails with `Timeout`, every other waiting one with
//! `ConnectionLost`, and callers retry on a new connection.

use crate::error::ClientError;
use bytes::Bytes;
use sluice_net::constants::FRAME_BYTES_MAX_DEFAULT;
use sluice_net::frame::{FrameDecoder, encode_frame_head};
use sluice_net::messages::{Control, ErrorReply, Hello, HelloReply, Kind};
use sluice_net::socket::{UNIX_SCHEME, widen_send_buffer};
use sluice_net::{ErrorCode, Frame, ProtocolError};
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, oneshot};

/// The socket's write half: TCP, or a Unix socket for a server on this host.
enum WriteHalf {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
}

impl WriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            WriteHalf::Tcp(s) => s.try_write_vectored(bufs),
            WriteHalf::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    async fn writable(&self) -> std::io::Result<()> {
        match self {
            WriteHalf::Tcp(s) => s.writable().await,
            WriteHalf::Unix(s) => s.writable().await,
        }
    }
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;

/// Opens the socket `addr` names (`unix:PATH` or `host:port`) and splits it.
async fn open(addr: &str) -> std::io::Result<(ReadHalf, WriteHalf)> {
    if let Some(path) = addr.strip_prefix(UNIX_SCHEME) {
        let stream = UnixStream::connect(path).await?;
        if !widen_send_buffer(std::os::fd::AsRawFd::as_raw_fd(&stream)) {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot widen a unix socket's send buffer");
        }
        let (rd, wr) = stream.into_split();
        return Ok((Box::new(rd), WriteHalf::Unix(wr)));
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    Ok((Box::new(rd), WriteHalf::Tcp(wr)))
}

type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

/// What a reply is handed to when the connection's reader task gets it.
enum Waiter {
    /// A caller awaiting the reply future of `send`.
    Channel(oneshot::Sender<Frame>),
    /// A function called by the reader task (`send_then`); with `ConnectionLost` if the
    /// connection breaks first.
    Call(OnReply),
}

/// Most pieces (frame heads and payload pieces) `Connection::send_many_then` writes in one
/// system call (the kernel takes at most 1024).
const SEND_MANY_PIECES_MAX: usize = 512;

/// A reply handler of `Connection::send_then`.
pub type OnReply = Box<dyn FnOnce(Result<Frame, ClientError>) + Send>;

/// The write side. One writer at a time owns the socket: a caller that finds it free writes
/// its frame itself, then whatever others appended to the outbox meanwhile; a caller that
/// finds it taken appends and returns. What the socket does not take at once is handed to the
/// writer task, which owns the socket until the outbox is empty. The lock is never held
/// across a system call, so callers never sleep on it.
struct Wire {
    sock: WriteHalf,
    outbox: Mutex<Outbox>,
    /// Wakes the writer task when the socket is handed to it.
    drain: Notify,
}

#[derive(Default, PartialEq)]
enum Owner {
    #[default]
    Free,
    /// A caller, inside `Wire::send`.
    Caller,
    /// The writer task, until the outbox is empty.
    Task,
}

#[derive(Default)]
struct Outbox {
    /// Bytes of whole frames not on the socket yet (the first frame possibly begun), in order.
    bytes: Vec<u8>,
    /// Who writes to the socket now.
    owner: Owner,
    /// A write failed: the connection is finished.
    broken: bool,
    /// The connection was dropped: the writer task ends once the outbox is empty.
    dropped: bool,
}

/// How much of a non-blocking write went out; `None` when the socket failed.
fn write_now(sock: &WriteHalf, bufs: &[IoSlice<'_>]) -> Option<usize> {
    match sock.try_write_vectored(bufs) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(0),
        Err(_) => None,
    }
}

impl Wire {
    /// Queues whole frames (`parts`: their pieces, in order) for the socket, in one write
    /// when it is free. `false` once the connection is broken.
    fn send(&self, parts: &[&[u8]]) -> bool {
        {
            let mut out = self.outbox.lock().expect("lock");
            if out.broken {
                return false;
            }
            if out.owner != Owner::Free {
                parts.iter().for_each(|p| out.bytes.extend_from_slice(p));
                return true;
            }
            out.owner = Owner::Caller;
        }
        // The socket is this caller's until it gives it up.
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let Some(mut n) = write_now(&self.sock, &slices) else {
            return self.fail();
        };
        let mut rest = Vec::new();
        for p in parts {
            // What the write did not take, from the first piece it did not finish.
            rest.extend_from_slice(p.get(n..).unwrap_or_default());
            n = n.saturating_sub(p.len());
        }
        let mut taken = Vec::new();
        loop {
            {
                let mut out = self.outbox.lock().expect("lock");
                if !rest.is_empty() {
                    // The socket is full: what is left goes before what others appended, and
                    // the writer task takes over.
                    rest.append(&mut out.bytes);
                    out.bytes = rest;
                    out.owner = Owner::Task;
                    drop(out);
                    self.drain.notify_one();
                    return true;
                }
                if out.bytes.is_empty() {
                    out.owner = Owner::Free;
                    return true;
                }
                std::mem::swap(&mut taken, &mut out.bytes);
            }
            // Frames others appended while this caller wrote.
            let Some(n) = write_now(&self.sock, &[IoSlice::new(&taken)]) else {
                return self.fail();
            };
            if n < taken.len() {
                rest = taken.split_off(n);
            }
            taken.clear();
        }
    }

    /// A caller's write failed: the connection is broken (the writer task ends).
    fn fail(&self) -> bool {
        self.outbox.lock().expect("lock").broken = true;
        self.drain.notify_one();
        false
    }

    /// The writer task: owns the socket from each hand-over until the outbox is empty; ends
    /// when a write fails or the connection was dropped and everything is written.
    async fn drain_loop(self: Arc<Self>) {
        let mut chunk = Vec::new();
        'outer: loop {
            self.drain.notified().await;
            loop {
                {
                    let mut out = self.outbox.lock().expect("lock");
                    if out.broken {
                        break 'outer;
                    }
                    match out.owner {
                        // Woken for `dropped` (or a wake-up left over): not the task's turn.
                        Owner::Caller => break,
                        Owner::Task if !out.bytes.is_empty() => {}
                        Owner::Task | Owner::Free => {
                            out.owner = Owner::Free;
                            if out.dropped {
                                return;
                            }
                            break;
                        }
                    }
                    chunk.clear();
                    std::mem::swap(&mut chunk, &mut out.bytes);
                }
                let mut at = 0;
                while at < chunk.len() {
                    if self.sock.writable().await.is_err() {
                        break 'outer;
                    }
                    match write_now(&self.sock, &[IoSlice::new(&chunk[at..])]) {
                        Some(n) => at += n,
                        None => break 'outer,
                    }
                }
            }
        }
        self.outbox.lock().expect("lock").broken = true;
    }
}

impl Drop for Connection {
    /// The writer task writes what is left in the outbox and ends; the socket's write side
    /// is shut down when it does.
    fn drop(&mut self) {
        self.wire.outbox.lock().expect("lock").dropped = true;
        self.wire.drain.notify_one();
    }
}

pub struct Connection {
    addr: String,
    wire: Arc<Wire>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    /// How long a reply to `send` may take (beyond a read's own wait at the tail).
    answer_timeout: Duration,
}

/// Gives a connection up: it reports itself closed, refuses new requests, and every waiting
/// call fails with `ConnectionLost` now.
fn give_up(addr: &str, wire: &Wire, pending: &Pending, closed: &AtomicBool) {
    closed.store(true, Ordering::SeqCst);
    wire.fail();
    let waiting = pending.lock().expect("lock").take().unwrap_or_default();
    for w in waiting.into_values() {
        if let Waiter::Call(f) = w {
            f(Err(ClientError::ConnectionLost(addr.to_string())));
        }
    }
}

/// Refuses a handshake reply the client could not route by (a server never sends one; a
/// broken or foreign peer might): no container, no shard, or a container map of another
/// length than the container count.
fn check_hello(h: &HelloReply) -> Result<(), String> {
    if h.container_count == 0 || h.shards.is_empty() {
        return Err(format!("the handshake names {} containers and {} shards", h.container_count, h.shards.len()));
    }
    if !h.containers.is_empty() && h.containers.len() != h.container_count as usize {
        return Err(format!(
            "the handshake maps {} containers' endpoints for a count of {}",
            h.containers.len(),
            h.container_count
        ));
    }
    Ok(())
}

/// Turns a reply frame into `T`, or the server's typed error.
pub fn expect<T: Control>(frame: Frame) -> Result<T, ClientError> {
    if frame.kind == Kind::ErrorReply {
        return Err(server_error(frame.decode()?));
    }
    Ok(frame.decode()?)
}

/// The client error for the server's typed error `e`.
pub fn server_error(e: ErrorReply) -> ClientError {
    match ErrorCode::from_u16(e.code) {
        Some(code) => ClientError::Server { code, message: e.message, endpoint: e.endpoint, offset: e.offset },
        None => ClientError::UnknownServerError(e.code, e.message),
    }
}

impl Connection {
    /// Connects and performs the handshake, within `timeout` for each. Replies to `send`
    /// and `call` must then come within `answer_timeout` (see `send_waiting`).
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        answer_timeout: Duration,
    ) -> Result<(Arc<Connection>, HelloReply), ClientError> {
        let cerr = |reason: String| ClientError::Connect { addr: addr.to_string(), reason };
        let (mut rd, wr) = tokio::time::timeout(timeout, open(addr))
            .await
            .map_err(|_| cerr("timed out".into()))?
            .map_err(|e| cerr(e.to_string()))?;
        let wire = Arc::new(Wire { sock: wr, outbox: Mutex::new(Outbox::default()), drain: Notify::new() });
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let closed = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Connection {
            addr: addr.to_string(),
            wire: wire.clone(),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
            answer_timeout,
        });
        let writer_closed = closed.clone();
        tokio::spawn(async move {
            wire.drain_loop().await;
            writer_closed.store(true, Ordering::SeqCst);
        });
        let reader_closed = closed.clone();
        let reader_pending = pending.clone();
        let (hello_tx, hello_rx) = oneshot::channel::<Frame>();
        pending.lock().expect("lock").as_mut().expect("open").insert(0, Waiter::Channel(hello_tx));
        let reader_addr = addr.to_string();
        tokio::spawn(async move {
            let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
            let mut buf = vec![0u8; 256 << 10];
            'outer: loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.extend(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(frame)) => {
                            let waiter =
                                reader_pending.lock().expect("lock").as_mut().and_then(|m| m.remove(&frame.request_id));
                            match waiter {
                                Some(Waiter::Channel(w)) => {
                                    let _ = w.send(frame);
                                }
                                Some(Waiter::Call(f)) => f(Ok(frame)),
                                None => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "bad frame from server; closing connection");
                            break 'outer;
                        }
                    }
                }
            }
            reader_closed.store(true, Ordering::SeqCst);
            // Dropping the senders fails every waiting call; handlers are told.
            let waiting = reader_pending.lock().expect("lock").take().unwrap_or_default();
            for w in waiting.into_values() {
                if let Waiter::Call(f) = w {
                    f(Err(ClientError::ConnectionLost(reader_addr.clone())));
                }
            }
        });
        if !conn.wire.send(&[&encode_frame_head(0, &Hello::current("sluice-client"), 0)]) {
            return Err(cerr("closed during handshake".into()));
        }
        let frame = tokio::time::timeout(timeout, hello_rx)
            .await
            .map_err(|_| cerr("handshake timed out".into()))?
            .map_err(|_| cerr("closed during handshake".into()))?;
        let reply: HelloReply = expect(frame)?;
        check_hello(&reply).map_err(|reason| ProtocolError::InvalidArchive { kind: Kind::HelloReply, reason })?;
        Ok((conn, reply))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Gives the connection up (no answer came in time): it reports itself closed, refuses
    /// new requests, and every waiting call fails with `ConnectionLost` now. The socket is
    /// shut once the connection is dropped (the server then sees it closed).
    pub fn abort(&self) {
        give_up(&self.addr, &self.wire, &self.pending, &self.closed);
    }

    /// Sends a request now and returns a future for its reply frame, which must come within
    /// the connection's answer timeout (`send_waiting`). The request is on the wire queue
    /// when this returns, so calls made in order are sent in order.
    pub fn send<T: Control>(
        &self,
        msg: &T,
        payload: Bytes,
    ) -> impl Future<Output = Result<Frame, ClientError>> + Send + 'static {
        self.send_waiting(msg, payload, Some(Duration::ZERO))
    }

    /// `send` for a request the server may hold `wait` before it answers (a read's wait at
    /// the tail; `None`: as long as it takes, e.g. a paced scrub): its reply must come
    /// within the answer timeout after that. A reply that does not gives the connection up
    /// (`abort`: the peer is frozen, or an answer got lost) and fails with `Timeout`.
    pub fn send_waiting<T: Control>(
        &self,
        msg: &T,
        payload: Bytes,
        wait: Option<Duration>,
    ) -> impl Future<Output = Result<Frame, ClientError>> + Send + 'static {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let registered = match self.pending.lock().expect("lock").as_mut() {
            Some(map) => {
                map.insert(id, Waiter::Channel(tx));
                true
            }
            None => false,
        };
        let sent = registered && self.wire.send(&[&encode_frame_head(id, msg, payload.len()), &payload]);
        let addr = self.addr.clone();
        let limit = wait.map(|w| w.saturating_add(self.answer_timeout));
        let (wire, pending, closed) = (self.wire.clone(), self.pending.clone(), self.closed.clone());
        let kind = T::KIND;
        async move {
            if !sent {
                return Err(ClientError::ConnectionLost(addr));
            }
            let Some(limit) = limit else {
                return rx.await.map_err(|_| ClientError::ConnectionLost(addr));
            };
            match tokio::time::timeout(limit, rx).await {
                Ok(reply) => reply.map_err(|_| ClientError::ConnectionLost(addr)),
                Err(_) => {
                    tracing::warn!(%addr, ?limit, ?kind, "no answer in time; giving the connection up");
                    give_up(&addr, &wire, &pending, &closed);
                    Err(ClientError::Timeout(format!("no answer from {addr} to a {kind:?} request within {limit:?}")))
                }
            }
        }
    }

    /// Sends a request now; the connection's reader task calls `on_reply` with its reply (or
    /// with `ConnectionLost` if the connection breaks first). `false`, and `on_reply` dropped
    /// uncalled, if the connection is already broken. Calls made in order are sent in order.
    /// `on_reply` runs on the reader task: it must be short and must not block.
    pub fn send_then<T: Control>(&self, msg: &T, payload: &[u8], on_reply: OnReply) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match self.pending.lock().expect("lock").as_mut() {
            Some(map) => map.insert(id, Waiter::Call(on_reply)),
            None => return false,
        };
        if self.wire.send(&[&encode_frame_head(id, msg, payload.len()), payload]) {
            return true;
        }
        // Taken back (dropped uncalled) unless the reader task has already answered it.
        let taken = self.pending.lock().expect("lock").as_mut().and_then(|m| m.remove(&id));
        taken.is_none()
    }

    /// `send_then` for several requests at once, written to the socket together (one
    /// system call, one wake-up of the server, when the socket is free). A request's payload
    /// is given in pieces, sent one after another. Returns, for each request in order, what
    /// `send_then` would have.
    pub fn send_many_then<T: Control>(&self, requests: Vec<(T, Vec<Bytes>, OnReply)>) -> Vec<bool> {
        let mut sent = Vec::with_capacity(requests.len());
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            // A bounded number of pieces per write (the kernel takes at most IOV_MAX): whole
            // requests, at least one.
            let mut chunk = Vec::new();
            let mut pieces = 0;
            while let Some((_, payload, _)) = requests.peek() {
                if !chunk.is_empty() && pieces + 1 + payload.len() > SEND_MANY_PIECES_MAX {
                    break;
                }
                pieces += 1 + payload.len();
                chunk.push(requests.next().expect("peeked"));
            }
            let mut ids = Vec::with_capacity(chunk.len());
            let mut heads = Vec::with_capacity(chunk.len());
            let mut payloads = Vec::with_capacity(chunk.len());
            {
                let mut pending = self.pending.lock().expect("lock");
                let Some(map) = pending.as_mut() else {
                    sent.extend(std::iter::repeat_n(false, chunk.len()));
                    continue;
                };
                for (msg, payload, on_reply) in chunk {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    map.insert(id, Waiter::Call(on_reply));
                    heads.push(encode_frame_head(id, &msg, payload.iter().map(Bytes::len).sum()));
                    payloads.push(payload);
                    ids.push(id);
                }
            }
            let mut parts: Vec<&[u8]> = Vec::with_capacity(pieces);
            for (h, p) in heads.iter().zip(&payloads) {
                parts.push(h);
                parts.extend(p.iter().map(|b| &b[..]));
            }
            if self.wire.send(&parts) {
                sent.extend(std::iter::repeat_n(true, ids.len()));
                continue;
            }
            let mut pending = self.pending.lock().expect("lock");
            sent.extend(ids.iter().map(|id| pending.as_mut().and_then(|m| m.remove(id)).is_none()));
        }
        sent
    }

    /// Sends a request and decodes its reply as `R` (within the answer timeout, as `send`).
    pub async fn call<T: Control, R: Control>(&self, msg: &T, payload: Bytes) -> Result<R, ClientError> {
        expect(self.send(msg, payload).await?)
    }

    /// `call` for a request the server may take as long as it needs for (a paced scrub).
    pub async fn call_untimed<T: Control, R: Control>(&self, msg: &T, payload: Bytes) -> Result<R, ClientError> {
        expect(self.send_waiting(msg, payload, None).await?)
    }
}

/// Whether a Sluice server at `addr` answers the protocol handshake within `timeout` (to
/// connect, and again to answer). Blocking, no runtime needed: for start-up checks. A bare
/// TCP connect is not enough: a node binds its ports before its shards serve, and a killed
/// server's listening socket can outlive it for a moment.
pub fn answers_handshake(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else { return false };
    let _ = s.set_read_timeout(Some(timeout));
    let mut head = [0u8; sluice_net::constants::FRAME_HEADER_BYTES];
    s.write_all(&encode_frame_head(0, &Hello::current("probe"), 0)).is_ok()
        && s.read_exact(&mut head).is_ok()
        && u16::from_le_bytes([head[4], head[5]]) == Kind::HelloReply as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A wire on a real loopback socket with a small send buffer (partial writes are common),
    /// the writer task running, and the peer's socket.
    async fn wire_pair() -> (Arc<Wire>, TcpStream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(8192).expect("send buffer");
        let client = socket.connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (peer, _) = listener.accept().await.expect("accept");
        let (rd, wr) = client.into_split();
        // The read half is not needed; the socket stays open while the wire holds its write half.
        std::mem::forget(rd);
        let wire =
            Arc::new(Wire { sock: WriteHalf::Tcp(wr), outbox: Mutex::new(Outbox::default()), drain: Notify::new() });
        let task = tokio::spawn(wire.clone().drain_loop());
        (wire, peer, task)
    }

    fn frame(sender: u32, seq: u32) -> (Vec<u8>, Vec<u8>) {
        // Mostly small frames, some larger than the socket's buffer.
        let len = [3usize, 700, 20, 12_000, 1500, 0, 9000][(seq as usize * 3 + sender as usize) % 7];
        let mut head = Vec::new();
        head.extend_from_slice(&sender.to_le_bytes());
        head.extend_from_slice(&seq.to_le_bytes());
        head.extend_from_slice(&(len as u64).to_le_bytes());
        (head, vec![(sender * 31 + seq) as u8; len])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_keep_each_ones_frames_whole_and_in_order() {
        const SENDERS: u32 = 8;
        const FRAMES: u32 = 500;
        let (wire, mut peer, task) = wire_pair().await;
        // The peer reads in small pieces with pauses, so the socket is full, then free, often.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match peer.read(&mut buf).await.expect("read") {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
                if got.len() % 3 == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            let wire = wire.clone();
            senders.push(std::thread::spawn(move || {
                // Sender s writes 1 + s % 3 frames per call (as `send_many_then` does).
                let per_call = 1 + s % 3;
                let mut q = 0;
                while q < FRAMES {
                    let frames: Vec<_> = (q..(q + per_call).min(FRAMES)).map(|q| frame(s, q)).collect();
                    let parts: Vec<&[u8]> = frames.iter().flat_map(|(h, p)| [&h[..], &p[..]]).collect();
                    assert!(wire.send(&parts));
                    q += per_call;
                }
            }));
        }
        for s in senders {
            s.join().expect("sender");
        }
        // Drop the wire's last user: the task writes the rest, then ends and the socket closes.
        wire.outbox.lock().expect("lock").dropped = true;
        wire.drain.notify_one();
        drop(wire);
        let got = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("the writer task ends and the socket closes")
            .expect("reader");
        task.await.expect("writer task");
        let mut next = vec![0u32; SENDERS as usize];
        let mut at = 0;
        while at < got.len() {
            let s = u32::from_le_bytes(got[at..at + 4].try_into().expect("4"));
            let q = u32::from_le_bytes(got[at + 4..at + 8].try_into().expect("4"));
            let len = u64::from_le_bytes(got[at + 8..at + 16].try_into().expect("8")) as usize;
            assert!(s < SENDERS, "a frame head at byte {at} is damaged (sender {s})");
            assert_eq!(q, next[s as usize], "sender {s}: frame {q} out of order");
            next[s as usize] += 1;
            let (_, payload) = frame(s, q);
            assert_eq!(&got[at + 16..at + 16 + len], &payload[..], "sender {s} frame {q}: payload damaged");
            at += 16 + len;
        }
        assert_eq!(next, vec![FRAMES; SENDERS as usize], "every frame arrived once");
    }

    #[tokio::test]
    async fn a_broken_socket_refuses_further_frames() {
        let (wire, peer, task) = wire_pair().await;
        drop(peer);
        // Writes to a socket whose peer is gone fail within a few tries (reset by the peer).
        let mut refused = false;
        for _ in 0..1000 {
            if !wire.send(&[b"head", &[0u8; 1000]]) {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(refused, "sends to a closed peer are refused");
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the writer task ends").expect("task");
        assert!(!wire.send(&[b"head", b"body"]), "a broken wire stays broken");
    }

    /// A peer whose handshake reply names no container, no shard, or a container map of
    /// another length: the connection is refused with a protocol error (the client used to
    /// panic routing by it), not retried as if the server were down.
    #[tokio::test]
    async fn a_handshake_the_client_cannot_route_by_is_refused() {
        use sluice_net::frame::encode_frame;
        use sluice_net::messages::ShardEndpoint;
        let shard = ShardEndpoint { shard: 0, address: "127.0.0.1:1".into() };
        let good = HelloReply {
            version: sluice_net::constants::PROTOCOL_VERSION,
            node: "n".into(),
            container_count: 2,
            shards: vec![shard],
            containers: Vec::new(),
            append_bytes_max: 1 << 20,
            placement: 2,
        };
        let cases = [
            HelloReply { container_count: 0, ..good.clone() },
            HelloReply { shards: Vec::new(), ..good.clone() },
            HelloReply { containers: vec!["127.0.0.1:1".into(); 3], ..good.clone() },
            good,
        ];
        for (i, reply) in cases.into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let peer = tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.expect("accept");
                let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
                let mut buf = vec![0u8; 4096];
                let hello = loop {
                    let n = sock.read(&mut buf).await.expect("read");
                    assert!(n > 0, "the client's hello");
                    dec.extend(&buf[..n]);
                    if let Some(f) = dec.next_frame().expect("a frame") {
                        break f;
                    }
                };
                let mut out = Vec::new();
                encode_frame(&mut out, hello.request_id, &reply, b"");
                tokio::io::AsyncWriteExt::write_all(&mut sock, &out).await.expect("write");
                // Held open until the client is done with it.
                let _ = sock.read(&mut buf).await;
            });
            let outcome = Connection::connect(&addr, Duration::from_secs(5), Duration::from_secs(5)).await;
            if i < 3 {
                match outcome {
                    Err(e @ ClientError::Protocol(ProtocolError::InvalidArchive { .. })) => {
                        assert!(!e.is_retryable(), "{e}");
                        assert!(e.to_string().contains("handshake"), "{e}");
                    }
                    Err(e) => panic!("case {i}: {e}"),
                    Ok(_) => panic!("case {i}: a handshake to refuse was taken"),
                }
            } else {
                let (conn, hello) = outcome.expect("a sound handshake");
                assert_eq!(hello.container_count, 2);
                conn.abort();
            }
            peer.abort();
        }
    }
}
