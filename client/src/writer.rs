//! Event writer: routes each event by its routing key to a segment, batches events per
//! segment, keeps many batches in flight, and resolves each event's future when its batch is
//! durable. Every writer has a random id and numbers its events; when a connection breaks
//! (server restart, redirect, shed load) the writer reconnects and resends every
//! unacknowledged batch in order, and the server drops what it already has. So a restart
//! under load neither loses nor duplicates events, and per-key order holds.

use crate::client::Client;
use crate::connection::{Connection, expect};
use crate::error::ClientError;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_net::ScopedStream;
use sluice_net::constants::EVENT_BYTES_MAX;
use sluice_net::event::framed_len;
use sluice_net::messages::{Append, AppendAck, SegmentRange};
use sluice_net::routing::key_point;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Largest batch (bytes of framed events) sent in one append.
    pub batch_bytes_max: usize,
    /// Batches in flight per segment before the writer waits for acknowledgements.
    pub inflight_batches_max: usize,
    /// How long a batch waits for more events before it is sent (0: send as soon as the
    /// previous batch is on its way; batches still grow under load).
    pub linger: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self { batch_bytes_max: 512 << 10, inflight_batches_max: 64, linger: Duration::ZERO }
    }
}

type AckTx = oneshot::Sender<Result<(), ClientError>>;

enum Cmd {
    Event(Bytes, AckTx),
    Flush(AckTx),
}

/// Resolves when the event is durable (or failed).
pub struct AckFuture(AckInner);

enum AckInner {
    Waiting(oneshot::Receiver<Result<(), ClientError>>),
    Failed(Option<ClientError>),
}

impl Future for AckFuture {
    type Output = Result<(), ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            AckInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(ClientError::ConnectionLost("writer stopped".into())))),
            AckInner::Failed(e) => Poll::Ready(Err(e.take().expect("polled after completion"))),
        }
    }
}

pub struct EventWriter {
    stream: ScopedStream,
    segments: Vec<SegmentRange>,
    queues: Vec<mpsc::UnboundedSender<Cmd>>,
    writer_id: u128,
}

impl EventWriter {
    pub(crate) fn new(client: Client, stream: ScopedStream, segments: Vec<SegmentRange>, config: WriterConfig) -> Self {
        let writer_id = loop {
            let id: u128 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let numbers = Arc::new(AtomicU64::new(1));
        let queues = segments
            .iter()
            .map(|s| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = SegmentWriter {
                    client: client.clone(),
                    segment: stream.segment_name(sluice_net::SegmentNumber(s.number)),
                    writer_id,
                    numbers: numbers.clone(),
                    config: config.clone(),
                    inflight: VecDeque::new(),
                    acks: FuturesOrdered::new(),
                    conn: None,
                };
                tokio::spawn(task.run(rx));
                tx
            })
            .collect();
        Self { stream, segments, queues, writer_id }
    }

    pub fn writer_id(&self) -> u128 {
        self.writer_id
    }

    pub fn stream(&self) -> &ScopedStream {
        &self.stream
    }

    /// Index of the segment a routing key maps to.
    pub fn segment_for_key(&self, key: &[u8]) -> usize {
        let p = key_point(key);
        self.segments.iter().position(|s| p >= s.key_low && p < s.key_high).unwrap_or(self.segments.len() - 1)
    }

    /// Queues an event; the returned future resolves once it is durable. Events with the
    /// same routing key are written in the order of these calls.
    pub fn write_event(&self, routing_key: &[u8], payload: impl Into<Bytes>) -> AckFuture {
        let payload = payload.into();
        if payload.len() > EVENT_BYTES_MAX {
            return AckFuture(AckInner::Failed(Some(ClientError::InvalidArgument(format!(
                "event of {} bytes exceeds the {EVENT_BYTES_MAX}-byte limit",
                payload.len()
            )))));
        }
        let (tx, rx) = oneshot::channel();
        let idx = self.segment_for_key(routing_key);
        if self.queues[idx].send(Cmd::Event(payload, tx)).is_err() {
            return AckFuture(AckInner::Failed(Some(ClientError::ConnectionLost("writer stopped".into()))));
        }
        AckFuture(AckInner::Waiting(rx))
    }

    /// Waits until every event written so far is durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut waits = Vec::new();
        for q in &self.queues {
            let (tx, rx) = oneshot::channel();
            if q.send(Cmd::Flush(tx)).is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            w.await.unwrap_or_else(|_| Err(ClientError::ConnectionLost("writer stopped".into())))?;
        }
        Ok(())
    }
}

struct Batch {
    first: u64,
    count: u32,
    payload: Bytes,
    acks: Vec<AckTx>,
    flushes: Vec<AckTx>,
}

impl Batch {
    fn finish(self, r: Result<(), ClientError>) {
        for a in self.acks.into_iter().chain(self.flushes) {
            let _ = a.send(r.clone());
        }
    }
}

type AckFut = Pin<Box<dyn Future<Output = Result<AppendAck, ClientError>> + Send>>;

struct SegmentWriter {
    client: Client,
    segment: String,
    writer_id: u128,
    numbers: Arc<AtomicU64>,
    config: WriterConfig,
    inflight: VecDeque<Batch>,
    acks: FuturesOrdered<AckFut>,
    /// The one connection this segment's appends go over. Appends of one writer must reach
    /// the server in order, and two connections give no order between them: a new batch on
    /// a new connection could overtake a resent older one, which the server would then drop
    /// as a duplicate. So the writer switches connections only when resending everything.
    conn: Option<Arc<Connection>>,
}

impl SegmentWriter {
    fn send(&self, conn: &Connection, b: &Batch) -> AckFut {
        let msg = Append {
            segment: self.segment.clone(),
            writer_id: self.writer_id,
            first_event_number: b.first,
            event_count: b.count,
            expected_offset: None,
        };
        let fut = conn.send(&msg, b.payload.clone());
        Box::pin(async move { expect::<AppendAck>(fut.await?) })
    }

    /// After a retryable failure: reconnect and resend every unacknowledged batch in order.
    async fn resend(&mut self, mut err: ClientError) {
        let deadline = Instant::now() + self.client.config().retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            if Instant::now() >= deadline {
                for b in self.inflight.drain(..) {
                    b.finish(Err(err.clone()));
                }
                self.acks = FuturesOrdered::new();
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            if err.code() == Some(sluice_net::ErrorCode::WrongHost) {
                let _ = self.client.refresh().await;
            }
            match self.client.segment_connection(&self.segment).await {
                Ok(conn) => {
                    self.acks = self.inflight.iter().map(|b| self.send(&conn, b)).collect();
                    self.conn = Some(conn);
                    return;
                }
                Err(e) => err = e,
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut input_open = true;
        let mut carry: Option<Cmd> = None;
        loop {
            if !input_open && self.inflight.is_empty() && carry.is_none() {
                return;
            }
            if self.acks.is_empty() && !self.inflight.is_empty() {
                // Batches held back after their connection broke, with nothing left in
                // flight to fail and trigger the resend: resend them now.
                self.resend(ClientError::ConnectionLost(self.segment.clone())).await;
                continue;
            }
            let can_send = self.inflight.len() < self.config.inflight_batches_max;
            tokio::select! {
                biased;
                Some(res) = self.acks.next(), if !self.acks.is_empty() => match res {
                    Ok(_) => self.inflight.pop_front().expect("a batch per ack").finish(Ok(())),
                    Err(e) if e.is_retryable() => self.resend(e).await,
                    Err(e) => self.inflight.pop_front().expect("a batch per ack").finish(Err(e)),
                },
                cmd = async { match carry.take() { Some(c) => Some(c), None => rx.recv().await } }, if input_open && can_send => {
                    let Some(first) = cmd else {
                        input_open = false;
                        continue;
                    };
                    carry = self.collect(first, &mut rx).await;
                }
            }
        }
    }

    /// Builds a batch starting with `first` and sends it. Returns a command that did not fit.
    async fn collect(&mut self, first: Cmd, rx: &mut mpsc::UnboundedReceiver<Cmd>) -> Option<Cmd> {
        let mut payload = BytesMut::new();
        let mut acks = Vec::new();
        let mut flushes = Vec::new();
        let linger_until = Instant::now() + self.config.linger;
        let mut next = Some(first);
        let mut leftover = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) if !self.config.linger.is_zero() && Instant::now() < linger_until => {
                        match tokio::time::timeout_at(linger_until.into(), rx.recv()).await {
                            Ok(Some(c)) => c,
                            _ => break,
                        }
                    }
                    Err(_) => break,
                },
            };
            match cmd {
                Cmd::Event(p, ack) => {
                    if !acks.is_empty() && payload.len() + framed_len(p.len()) > self.config.batch_bytes_max {
                        leftover = Some(Cmd::Event(p, ack));
                        break;
                    }
                    payload.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    payload.extend_from_slice(&p);
                    acks.push(ack);
                }
                Cmd::Flush(tx) => {
                    flushes.push(tx);
                    break;
                }
            }
        }
        if acks.is_empty() {
            // A flush alone: it waits for the last batch in flight, or is done now.
            match self.inflight.back_mut() {
                Some(b) => b.flushes.append(&mut flushes),
                None => flushes.into_iter().for_each(|f| {
                    let _ = f.send(Ok(()));
                }),
            }
            return leftover;
        }
        let count = acks.len() as u32;
        let first = self.numbers.fetch_add(u64::from(count), Ordering::Relaxed);
        let batch = Batch { first, count, payload: payload.freeze(), acks, flushes };
        let usable = self.conn.as_ref().filter(|c| !c.is_closed()).cloned();
        let conn = match usable {
            Some(c) => c,
            // The connection broke with batches in flight: their failures are on their way
            // and will resend everything in order, this batch included.
            None if !self.inflight.is_empty() => {
                self.inflight.push_back(batch);
                return leftover;
            }
            None => match self.client.segment_connection(&self.segment).await {
                Ok(c) => {
                    self.conn = Some(c.clone());
                    c
                }
                Err(e) => {
                    self.inflight.push_back(batch);
                    self.acks = FuturesOrdered::new();
                    self.resend(e).await;
                    return leftover;
                }
            },
        };
        let fut = self.send(&conn, &batch);
        self.inflight.push_back(batch);
        self.acks.push_back(fut);
        leftover
    }
}
