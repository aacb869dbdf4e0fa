//! One TCP connection to one shard endpoint, multiplexing pipelined requests by request id.
//! A reader task matches replies to waiting callers; a writer task batches outgoing frames
//! into few socket writes. When the connection breaks every waiting call fails with
//! `ConnectionLost` and the connection reports itself closed.

use crate::error::ClientError;
use bytes::Bytes;
use sluice_net::constants::{FRAME_BYTES_MAX_DEFAULT, HELLO_MAGIC, PROTOCOL_VERSION};
use sluice_net::frame::{FrameDecoder, encode_frame_head};
use sluice_net::messages::{Control, ErrorReply, Hello, HelloReply, Kind};
use sluice_net::{ErrorCode, Frame};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>>;

pub struct Connection {
    addr: String,
    tx: mpsc::UnboundedSender<(Vec<u8>, Bytes)>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

/// Turns a reply frame into `T`, or the server's typed error.
pub fn expect<T: Control>(frame: Frame) -> Result<T, ClientError> {
    if frame.kind == Kind::ErrorReply {
        let e: ErrorReply = frame.decode()?;
        return Err(match ErrorCode::from_u16(e.code) {
            Some(code) => ClientError::Server { code, message: e.message, endpoint: e.endpoint, offset: e.offset },
            None => ClientError::UnknownServerError(e.code, e.message),
        });
    }
    Ok(frame.decode()?)
}

impl Connection {
    /// Connects and performs the handshake.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<(Arc<Connection>, HelloReply), ClientError> {
        let cerr = |reason: String| ClientError::Connect { addr: addr.to_string(), reason };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| cerr("timed out".into()))?
            .map_err(|e| cerr(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| cerr(e.to_string()))?;
        let (mut rd, wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Bytes)>();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let closed = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Connection {
            addr: addr.to_string(),
            tx,
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
        });
        let writer_closed = closed.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(256 << 10, wr);
            'outer: while let Some((head, payload)) = rx.recv().await {
                let mut item = Some((head, payload));
                while let Some((head, payload)) = item.take() {
                    if w.write_all(&head).await.is_err() || w.write_all(&payload).await.is_err() {
                        break 'outer;
                    }
                    item = rx.try_recv().ok();
                }
                if w.flush().await.is_err() {
                    break;
                }
            }
            writer_closed.store(true, Ordering::SeqCst);
            let _ = w.shutdown().await;
        });
        let reader_closed = closed.clone();
        let reader_pending = pending.clone();
        let (hello_tx, hello_rx) = oneshot::channel::<Frame>();
        pending.lock().expect("lock").as_mut().expect("open").insert(0, hello_tx);
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
                            if let Some(w) = waiter {
                                let _ = w.send(frame);
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
            // Dropping the senders fails every waiting call.
            reader_pending.lock().expect("lock").take();
        });
        let hello = Hello {
            magic: HELLO_MAGIC,
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: "sluice-client".into(),
        };
        conn.tx
            .send((encode_frame_head(0, &hello, 0), Bytes::new()))
            .map_err(|_| cerr("closed during handshake".into()))?;
        let frame = tokio::time::timeout(timeout, hello_rx)
            .await
            .map_err(|_| cerr("handshake timed out".into()))?
            .map_err(|_| cerr("closed during handshake".into()))?;
        let reply: HelloReply = expect(frame)?;
        Ok((conn, reply))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sends a request now and returns a future for its reply frame. The request is on the
    /// wire queue when this returns, so calls made in order are sent in order.
    pub fn send<T: Control>(
        &self,
        msg: &T,
        payload: Bytes,
    ) -> impl Future<Output = Result<Frame, ClientError>> + Send + 'static {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let registered = match self.pending.lock().expect("lock").as_mut() {
            Some(map) => {
                map.insert(id, tx);
                true
            }
            None => false,
        };
        let sent = registered && self.tx.send((encode_frame_head(id, msg, payload.len()), payload)).is_ok();
        let addr = self.addr.clone();
        async move {
            if !sent {
                return Err(ClientError::ConnectionLost(addr));
            }
            rx.await.map_err(|_| ClientError::ConnectionLost(addr))
        }
    }

    /// Sends a request and decodes its reply as `R`.
    pub async fn call<T: Control, R: Control>(&self, msg: &T, payload: Bytes) -> Result<R, ClientError> {
        expect(self.send(msg, payload).await?)
    }
}
