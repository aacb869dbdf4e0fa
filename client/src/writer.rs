//! Event writer: routes each event by its routing key to a segment, batches events per
//! segment, keeps many batches in flight, and resolves each event's future when its batch is
//! durable (or, for `write_events`, one future for many events once all are durable). A
//! `write_event` future is a ticket on its segment task's board (`acks.rs`), not a channel.
//! Acknowledgements are settled by the connection's reader task (a reply handler per
//! append, `Flight`), so the segment task wakes only for new input or trouble.
//! Every writer has a random id and numbers its events; when a connection breaks (server
//! restart, redirect, shed load) the writer reconnects and resends every unacknowledged
//! batch in order, and the server drops what it already has. So a restart under load
//! neither loses nor duplicates events, and per-key order holds.
//!
//! Scaling: a segment's task that gets `Sealed` learns the stream's current segments, and,
//! holding the routing table's lock, points its key ranges at them and hands them its
//! refused events in order, then whatever was queued behind them. No new event reaches the
//! sealed segment's queue after that, so a key's events keep their order across the move.
//! The new segments number the events afresh (the server tracks numbers per segment).

use crate::acks::{Board, Look};
use crate::client::{Client, warn_long_retry};
use crate::connection::{Connection, expect};
use crate::error::ClientError;
use bytes::{Bytes, BytesMut};
use sluice_net::ErrorCode;
use sluice_net::ScopedStream;
use sluice_net::constants::EVENT_BYTES_MAX;
use sluice_net::event::{framed_len, split_whole_events};
use sluice_net::messages::{Append, AppendAck, SegmentRange};
use sluice_net::routing::key_point;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug)]
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

/// Who waits for an event: a ticket on its lane's board (`write_event`), a ticket on the
/// board of the lane it was first queued in (moved here by a scaling), or a future shared by
/// the events of one `write_events` call.
enum Ack {
    Own(u64),
    Moved(Moved),
    Shared(Arc<SharedAck>),
}

impl Ack {
    /// Settles the ack; `own` is the board of the lane the event is in.
    fn send(self, own: &Board, r: Result<(), ClientError>) {
        match self {
            Ack::Own(t) => own.settle(t, &r),
            Ack::Moved(m) => m.settle(r),
            Ack::Shared(s) => s.done(r),
        }
    }

    /// The ack as it travels to another lane.
    fn moved(self, own: &Arc<Board>) -> Ack {
        match self {
            Ack::Own(ticket) => Ack::Moved(Moved { board: Some(own.clone()), ticket }),
            other => other,
        }
    }
}

/// A ticket of another lane's board; settled with "writer stopped" if dropped unsettled.
struct Moved {
    board: Option<Arc<Board>>,
    ticket: u64,
}

impl Moved {
    fn settle(mut self, r: Result<(), ClientError>) {
        if let Some(b) = self.board.take() {
            b.settle(self.ticket, &r);
        }
    }
}

impl Drop for Moved {
    fn drop(&mut self) {
        if let Some(b) = self.board.take() {
            b.settle(self.ticket, &Err(stopped()));
        }
    }
}

/// Settles a batch's acks, the lane's own tickets in contiguous runs.
fn settle_all(acks: Vec<Ack>, own: &Board, r: &Result<(), ClientError>) {
    let mut run: Option<(u64, u64)> = None;
    for a in acks {
        match a {
            Ack::Own(t) => match &mut run {
                Some((_, end)) if *end == t => *end += 1,
                _ => {
                    if let Some((first, end)) = run.replace((t, t + 1)) {
                        own.settle_range(first, end, r);
                    }
                }
            },
            other => other.send(own, r.clone()),
        }
    }
    if let Some((first, end)) = run {
        own.settle_range(first, end, r);
    }
}

/// The future of a `write_events` call: resolves when the last of its events is settled,
/// with the first error any of them got.
struct SharedAck {
    remaining: AtomicUsize,
    error: Mutex<Option<ClientError>>,
    tx: Mutex<Option<AckTx>>,
}

impl SharedAck {
    fn done(&self, r: Result<(), ClientError>) {
        if let Err(e) = r {
            self.error.lock().expect("lock").get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let r = self.error.lock().expect("lock").take().map_or(Ok(()), Err);
            if let Some(tx) = self.tx.lock().expect("lock").take() {
                let _ = tx.send(r);
            }
        }
    }
}

enum Cmd {
    /// An event: its routing-key point, its payload, who waits for it.
    Event(f64, Bytes, Ack),
    Flush(AckTx),
}

/// Resolves when the event is durable (or failed).
pub struct AckFuture(AckInner);

enum AckInner {
    /// A `write_event`: its ticket on its lane's board (`None` once answered).
    Ticket(Option<Arc<Board>>, u64),
    Waiting(oneshot::Receiver<Result<(), ClientError>>),
    Failed(Option<ClientError>),
}

impl Future for AckFuture {
    type Output = Result<(), ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            AckInner::Ticket(board, ticket) => {
                let b = board.as_ref().expect("polled after completion");
                match b.look(*ticket, cx.waker()) {
                    Look::Pending => Poll::Pending,
                    Look::Done(r) => {
                        *board = None;
                        Poll::Ready(r)
                    }
                }
            }
            AckInner::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or_else(|_| Err(stopped()))),
            AckInner::Failed(e) => Poll::Ready(Err(e.take().expect("polled after completion"))),
        }
    }
}

impl Drop for AckFuture {
    fn drop(&mut self) {
        if let AckInner::Ticket(Some(b), ticket) = &self.0 {
            b.forget(*ticket);
        }
    }
}

pub struct EventWriter {
    shared: Arc<Shared>,
}

/// What the writer and its segment tasks share.
struct Shared {
    client: Client,
    stream: ScopedStream,
    writer_id: u128,
    numbers: AtomicU64,
    config: WriterConfig,
    routes: Mutex<Routes>,
}

/// A key range [low, high) and the segment its events go to.
#[derive(Clone, Copy, Debug)]
struct Route {
    low: f64,
    high: f64,
    segment: u64,
}

/// A segment task's input. Callers append commands under a lock; the task takes all that
/// is queued at once (one lock per batch on its side) and is woken only when it waits for
/// input, so a busy task costs its callers no atomic operations or wake-ups per event (a
/// channel did both for every event).
struct Queue {
    state: Mutex<QueueState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    cmds: Vec<Cmd>,
    /// The task waits for input: the next command wakes it.
    idle: bool,
    /// No more input (the writer dropped the lane): the task ends once it has taken all.
    closed: bool,
    /// The task is gone: nothing is taken any more.
    gone: bool,
}

/// The caller side of a `Queue`; dropping it closes the queue.
struct QueueTx(Arc<Queue>);

impl QueueTx {
    /// Queues `cmd`, or gives it back if the task is gone.
    fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        let wake = {
            let mut st = self.0.state.lock().expect("lock");
            if st.gone {
                return Err(cmd);
            }
            st.cmds.push(cmd);
            std::mem::take(&mut st.idle)
        };
        if wake {
            self.0.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        self.0.state.lock().expect("lock").closed = true;
        self.0.wake.notify_one();
    }
}

/// The task side of a `Queue`.
struct QueueRx {
    queue: Arc<Queue>,
    /// Taken from the queue, not yet handed out (in reverse order: popped from the back).
    taken: Vec<Cmd>,
}

impl QueueRx {
    fn try_recv(&mut self) -> Option<Cmd> {
        self.take_queued();
        self.taken.pop()
    }

    /// Takes what callers queued, if nothing taken is left.
    fn take_queued(&mut self) {
        if self.taken.is_empty() {
            let mut st = self.queue.state.lock().expect("lock");
            std::mem::swap(&mut self.taken, &mut st.cmds);
            drop(st);
            self.taken.reverse();
        }
    }

    /// The framed bytes and the count of the events taken and next in line, up to the first
    /// flush or `max` bytes: what a batch starting now will hold, without waiting for more.
    fn ready(&mut self, max: usize) -> (usize, usize) {
        self.take_queued();
        let (mut bytes, mut count) = (0, 0);
        for cmd in self.taken.iter().rev() {
            match cmd {
                Cmd::Event(_, p, _) if bytes + framed_len(p.len()) <= max => {
                    bytes += framed_len(p.len());
                    count += 1;
                }
                _ => break,
            }
        }
        (bytes, count)
    }

    /// The next command; `None` once the queue is closed and empty.
    async fn recv(&mut self) -> Option<Cmd> {
        loop {
            if let Some(c) = self.try_recv() {
                return Some(c);
            }
            {
                let mut st = self.queue.state.lock().expect("lock");
                if !st.cmds.is_empty() {
                    continue;
                }
                if st.closed {
                    return None;
                }
                st.idle = true;
            }
            // A wake-up sent before this wait starts is kept as a permit: none is lost.
            self.queue.wake.notified().await;
        }
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.queue.state.lock().expect("lock").gone = true;
    }
}

struct Routes {
    /// Sorted by `low`; covers [0, 1).
    table: Vec<Route>,
    /// Every segment task's queue and board.
    queues: HashMap<u64, Lane>,
    /// Set when the writer can write no more (the stream is sealed): new events fail with it.
    closed: Option<ClientError>,
    /// The `EventWriter` is gone: tasks finish what they have and stop.
    dropped: bool,
}

/// A segment task as the writer sees it.
struct Lane {
    tx: QueueTx,
    board: Arc<Board>,
    /// The ticket the next event queued here takes.
    next_ticket: u64,
}

impl Lane {
    /// Queues an event of `write_event`; its future, or the error if the task is gone.
    fn queue_event(&mut self, point: f64, payload: Bytes) -> AckFuture {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if self.tx.send(Cmd::Event(point, payload, Ack::Own(ticket))).is_err() {
            self.board.settle(ticket, &Ok(()));
            return AckFuture(AckInner::Failed(Some(stopped())));
        }
        AckFuture(AckInner::Ticket(Some(self.board.clone()), ticket))
    }
}

impl Routes {
    fn lookup(&self, point: f64) -> u64 {
        let i = self.table.partition_point(|r| r.low <= point).saturating_sub(1);
        self.table[i].segment
    }

    /// The lane of `segment`, starting its task if there is none.
    fn lane(&mut self, shared: &Arc<Shared>, segment: u64) -> &mut Lane {
        self.queues.entry(segment).or_insert_with(|| {
            let queue = Arc::new(Queue { state: Mutex::new(QueueState::default()), wake: tokio::sync::Notify::new() });
            let (tx, rx) = (QueueTx(queue.clone()), QueueRx { queue, taken: Vec::new() });
            let board = Arc::new(Board::new());
            let flight = Arc::new(Flight {
                state: Mutex::new(FlightState::default()),
                wake: tokio::sync::Notify::new(),
                board: board.clone(),
                window: shared.config.inflight_batches_max.max(1),
            });
            let task = SegmentWriter {
                shared: shared.clone(),
                number: segment,
                segment: shared.stream.segment_name(sluice_net::SegmentNumber(segment)),
                flight,
                conn: None,
                finished: false,
                retrying: None,
            };
            tokio::spawn(task.run(rx));
            Lane { tx, board, next_ticket: 0 }
        })
    }

    /// Queues an event (moved from a sealed segment) for the segment that owns its key.
    fn forward(&mut self, shared: &Arc<Shared>, cmd: Cmd) {
        let Cmd::Event(point, ..) = &cmd else { unreachable!("only events are routed by key") };
        let lane = self.lane(shared, self.lookup(*point));
        if let Err(Cmd::Event(_, _, ack)) = lane.tx.send(cmd) {
            ack.send(&lane.board, Err(stopped()));
        }
    }
}

fn stopped() -> ClientError {
    ClientError::ConnectionLost("writer stopped".into())
}

impl EventWriter {
    pub(crate) fn new(client: Client, stream: ScopedStream, segments: Vec<SegmentRange>, config: WriterConfig) -> Self {
        let writer_id = loop {
            let id: u128 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let table = segments.iter().map(|s| Route { low: s.key_low, high: s.key_high, segment: s.number }).collect();
        let shared = Arc::new(Shared {
            client,
            stream,
            writer_id,
            numbers: AtomicU64::new(1),
            config,
            routes: Mutex::new(Routes { table, queues: HashMap::new(), closed: None, dropped: false }),
        });
        {
            let mut routes = shared.routes.lock().expect("lock");
            for s in &segments {
                routes.lane(&shared, s.number);
            }
        }
        Self { shared }
    }

    pub fn writer_id(&self) -> u128 {
        self.shared.writer_id
    }

    pub fn stream(&self) -> &ScopedStream {
        &self.shared.stream
    }

    /// Number of the segment a routing key maps to now.
    pub fn segment_for_key(&self, key: &[u8]) -> u64 {
        self.shared.routes.lock().expect("lock").lookup(key_point(key))
    }

    /// Queues an event; the returned future resolves once it is durable. Events with the
    /// same routing key are written in the order of these calls, across scalings.
    pub fn write_event(&self, routing_key: &[u8], payload: impl Into<Bytes>) -> AckFuture {
        let payload = payload.into();
        if payload.len() > EVENT_BYTES_MAX {
            return AckFuture(AckInner::Failed(Some(ClientError::InvalidArgument(format!(
                "event of {} bytes exceeds the {EVENT_BYTES_MAX}-byte limit",
                payload.len()
            )))));
        }
        let point = key_point(routing_key);
        let mut routes = self.shared.routes.lock().expect("lock");
        if let Some(e) = &routes.closed {
            return AckFuture(AckInner::Failed(Some(e.clone())));
        }
        let segment = routes.lookup(point);
        routes.lane(&self.shared, segment).queue_event(point, payload)
    }

    /// Queues many events with one future for all: it resolves once every one of them is
    /// durable, or with the first error any of them got. Cheaper per event than
    /// `write_event` (no future and channel each); order and routing are the same as
    /// calling `write_event` for each in turn. An oversized event refuses the whole call
    /// before anything is queued.
    pub fn write_events<K, P>(&self, events: impl IntoIterator<Item = (K, P)>) -> AckFuture
    where
        K: AsRef<[u8]>,
        P: Into<Bytes>,
    {
        let mut queued = Vec::new();
        for (key, payload) in events {
            let payload = payload.into();
            if payload.len() > EVENT_BYTES_MAX {
                return AckFuture(AckInner::Failed(Some(ClientError::InvalidArgument(format!(
                    "event {} of the batch has {} bytes, over the {EVENT_BYTES_MAX}-byte limit: nothing written",
                    queued.len(),
                    payload.len()
                )))));
            }
            queued.push((key_point(key.as_ref()), payload));
        }
        let (tx, rx) = oneshot::channel();
        if queued.is_empty() {
            let _ = tx.send(Ok(()));
            return AckFuture(AckInner::Waiting(rx));
        }
        let shared = Arc::new(SharedAck {
            remaining: AtomicUsize::new(queued.len()),
            error: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
        });
        let mut routes = self.shared.routes.lock().expect("lock");
        if let Some(e) = &routes.closed {
            return AckFuture(AckInner::Failed(Some(e.clone())));
        }
        for (point, payload) in queued {
            let segment = routes.lookup(point);
            let lane = routes.lane(&self.shared, segment);
            if let Err(Cmd::Event(_, _, ack)) = lane.tx.send(Cmd::Event(point, payload, Ack::Shared(shared.clone()))) {
                ack.send(&lane.board, Err(stopped()));
            }
        }
        AckFuture(AckInner::Waiting(rx))
    }

    /// Waits until every event written so far is durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut waits = Vec::new();
        {
            let routes = self.shared.routes.lock().expect("lock");
            if let Some(e) = &routes.closed {
                return Err(e.clone());
            }
            for lane in routes.queues.values() {
                let (tx, rx) = oneshot::channel();
                if lane.tx.send(Cmd::Flush(tx)).is_ok() {
                    waits.push(rx);
                }
            }
        }
        for w in waits {
            w.await.unwrap_or_else(|_| Err(stopped()))?;
        }
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // The tasks finish what is queued (their futures may still be awaited) and stop.
        let mut routes = self.shared.routes.lock().expect("lock");
        routes.dropped = true;
        routes.queues.clear();
    }
}

struct Batch {
    first: u64,
    count: u32,
    /// The events, framed.
    payload: Bytes,
    /// Routing-key point of each event (to send them elsewhere after a scaling).
    points: Vec<f64>,
    acks: Vec<Ack>,
    flushes: Vec<AckTx>,
    /// The server's answer to its latest sending, kept until the batches before it are
    /// answered too (answers are handled in the order the batches were sent).
    reply: Option<Result<(), ClientError>>,
}

impl Batch {
    fn finish(self, own: &Board, r: Result<(), ClientError>) {
        settle_all(self.acks, own, &r);
        for f in self.flushes {
            let _ = f.send(r.clone());
        }
    }
}

/// A lane's batches in flight, shared by its segment task and the reply handlers that the
/// connection's reader task runs. A handler settles acknowledged batches itself, in order,
/// so an acknowledgement reaches the waiting futures without waking the segment task; the
/// task is woken only when it has something to do: an error at the front (resend, redirect
/// or fail), room in a full window, batches left with no answer coming, or the last batch
/// answered once its input has ended.
struct Flight {
    state: Mutex<FlightState>,
    wake: tokio::sync::Notify,
    /// This lane's tickets.
    board: Arc<Board>,
    window: usize,
}

#[derive(Default)]
struct FlightState {
    batches: VecDeque<Batch>,
    /// Sendings of the current round that have not been answered.
    pending: usize,
    /// The round of sending: bumped when everything is resent or given up, so answers to
    /// older sendings are ignored.
    round: u64,
    /// Batches acknowledged so far (a retry episode ends with the next one).
    acked: u64,
    /// The task's input has ended: it waits for the last batch.
    closing: bool,
}

impl FlightState {
    /// The acknowledged batches at the front.
    fn take_done(&mut self) -> Vec<Batch> {
        let mut done = Vec::new();
        while self.batches.front().is_some_and(|b| matches!(b.reply, Some(Ok(())))) {
            done.push(self.batches.pop_front().expect("front"));
        }
        self.acked += done.len() as u64;
        done
    }

    /// Whether the segment task has something to do.
    fn needs_task(&self) -> bool {
        match self.batches.front() {
            Some(b) => matches!(b.reply, Some(Err(_))) || self.pending == 0,
            None => self.closing,
        }
    }
}

impl Flight {
    /// An answer to the sending of batch `first` in round `round`.
    fn answer(&self, round: u64, first: u64, r: Result<(), ClientError>) {
        let (done, wake) = {
            let mut st = self.state.lock().expect("lock");
            if st.round != round {
                return;
            }
            st.pending -= 1;
            let full = st.batches.len() >= self.window;
            if let Some(b) = st.batches.iter_mut().find(|b| b.first == first) {
                b.reply = Some(r);
            }
            let done = st.take_done();
            let wake = st.needs_task() || (full && !done.is_empty());
            (done, wake)
        };
        for b in done {
            b.finish(&self.board, Ok(()));
        }
        if wake {
            self.wake.notify_one();
        }
    }

    /// A sending that never reached the connection (it was broken): no answer will come.
    fn unsent(&self, round: u64) {
        let wake = {
            let mut st = self.state.lock().expect("lock");
            if st.round != round {
                return;
            }
            st.pending -= 1;
            st.needs_task()
        };
        if wake {
            self.wake.notify_one();
        }
    }
}

struct SegmentWriter {
    shared: Arc<Shared>,
    number: u64,
    segment: String,
    flight: Arc<Flight>,
    /// The one connection this segment's appends go over. Appends of one writer must reach
    /// the server in order, and two connections give no order between them: a new batch on
    /// a new connection could overtake a resent older one, which the server would then drop
    /// as a duplicate. So the writer switches connections only when resending everything.
    conn: Option<Arc<Connection>>,
    /// The task ended on one of its own paths: every ticket it took is settled or moved on.
    finished: bool,
    /// Since when appends have failed with retryable errors and nothing was acknowledged,
    /// and the next pause: the retry window spans the episode, not one attempt, or a server
    /// that answers every resend with a retryable error (a poisoned container on a single
    /// node) would be retried forever. With the count of acknowledged batches when it began.
    retrying: Option<(Retrying, u64)>,
}

/// A retry episode of a writer: since when, the next pause, whether a warning was given.
#[derive(Clone, Copy)]
struct Retrying {
    since: Instant,
    backoff: Duration,
    warned: bool,
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Cancelled (its runtime is gone): nobody will settle what it held.
            self.flight.board.close(stopped());
        }
    }
}

/// What the segment task must do about the front of its flight.
enum Todo {
    Nothing,
    /// The front batch was refused with this error.
    Refused(ClientError),
    /// Batches are in flight and no answer is coming (their connection broke).
    Resend,
    /// Input ended and every batch is answered.
    Finish,
}

impl SegmentWriter {
    /// Sends one batch (in round `round`) on `conn`; if the connection is broken, tells the
    /// flight that no answer will come.
    fn send(&self, conn: &Connection, round: u64, first: u64, count: u32, payload: &Bytes) {
        let msg = Append {
            segment: self.segment.clone(),
            writer_id: self.shared.writer_id,
            first_event_number: first,
            event_count: count,
            expected_offset: None,
        };
        let flight = self.flight.clone();
        let on_reply: crate::connection::OnReply = Box::new(move |reply| {
            let r = reply.and_then(expect::<AppendAck>).map(|_| ());
            flight.answer(round, first, r);
        });
        if !conn.send_then(&msg, payload, on_reply) {
            self.flight.unsent(round);
        }
    }

    /// Starts a new round: every batch in flight unanswered and unsent. Returns what to send.
    fn new_round(&self) -> (u64, Vec<(u64, u32, Bytes)>) {
        let mut st = self.flight.state.lock().expect("lock");
        st.round += 1;
        for b in st.batches.iter_mut() {
            b.reply = None;
        }
        let sends: Vec<_> = st.batches.iter().map(|b| (b.first, b.count, b.payload.clone())).collect();
        st.pending = sends.len();
        (st.round, sends)
    }

    /// Takes every batch in flight out; answers still coming are ignored.
    fn take_all(&self) -> Vec<Batch> {
        let mut st = self.flight.state.lock().expect("lock");
        st.round += 1;
        st.pending = 0;
        st.batches.drain(..).collect()
    }

    /// After a retryable failure: reconnect and resend every unacknowledged batch in order.
    async fn resend(&mut self, mut err: ClientError) {
        let acked = self.flight.state.lock().expect("lock").acked;
        // A batch acknowledged since the episode began ends it.
        if self.retrying.is_some_and(|(_, at)| at != acked) {
            self.retrying = None;
        }
        let fresh = Retrying { since: Instant::now(), backoff: Duration::from_millis(20), warned: false };
        let (Retrying { since, mut backoff, mut warned }, _) = *self.retrying.get_or_insert((fresh, acked));
        let retry_for = self.shared.client.config().retry_for;
        let deadline = since + retry_for;
        loop {
            warn_long_retry(&mut warned, since, retry_for, Some(&self.segment), &err);
            if Instant::now() >= deadline {
                for b in self.take_all() {
                    b.finish(&self.flight.board, Err(err.clone()));
                }
                // What is sent from now on gets a window of its own.
                self.retrying = None;
                return;
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            self.retrying = Some((Retrying { since, backoff, warned }, acked));
            if err.map_may_be_stale() {
                let _ = self.shared.client.refresh().await;
            }
            match self.shared.client.segment_connection(&self.segment).await {
                Ok(conn) => {
                    let (round, sends) = self.new_round();
                    for (first, count, payload) in sends {
                        self.send(&conn, round, first, count, &payload);
                    }
                    self.conn = Some(conn);
                    return;
                }
                Err(e) => err = e,
            }
        }
    }

    /// What the front of the flight asks of the task, and whether the window has room.
    fn todo(&self, input_open: bool) -> (Todo, bool) {
        let mut st = self.flight.state.lock().expect("lock");
        st.closing = !input_open;
        let room = st.batches.len() < self.flight.window;
        let todo = match st.batches.front() {
            Some(Batch { reply: Some(Err(e)), .. }) => Todo::Refused(e.clone()),
            Some(_) if st.pending == 0 => Todo::Resend,
            Some(_) => Todo::Nothing,
            None if !input_open => Todo::Finish,
            None => Todo::Nothing,
        };
        (todo, room)
    }

    async fn run(mut self, mut rx: QueueRx) {
        let mut input_open = true;
        let mut carry: Option<Cmd> = None;
        loop {
            let (todo, room) = self.todo(input_open || carry.is_some());
            match todo {
                Todo::Finish => {
                    self.finished = true;
                    return;
                }
                Todo::Refused(e) if e.code() == Some(ErrorCode::Sealed) => {
                    self.redirect(rx, carry.take(), e).await;
                    return;
                }
                Todo::Refused(e) if e.is_retryable() => {
                    self.resend(e).await;
                    continue;
                }
                Todo::Refused(e) => {
                    // This batch fails; those after it go on (acknowledged ones settle now).
                    let (failed, done) = {
                        let mut st = self.flight.state.lock().expect("lock");
                        (st.batches.pop_front().expect("the refused batch"), st.take_done())
                    };
                    failed.finish(&self.flight.board, Err(e));
                    for b in done {
                        b.finish(&self.flight.board, Ok(()));
                    }
                    continue;
                }
                // Batches held back after their connection broke, with nothing left in
                // flight to fail: resend them now.
                Todo::Resend => {
                    self.resend(ClientError::ConnectionLost(self.segment.clone())).await;
                    continue;
                }
                Todo::Nothing => {}
            }
            let can_send = room && (input_open || carry.is_some());
            tokio::select! {
                biased;
                _ = self.flight.wake.notified() => {}
                cmd = async { match carry.take() { Some(c) => Some(c), None => rx.recv().await } }, if can_send => {
                    let Some(first) = cmd else {
                        input_open = false;
                        continue;
                    };
                    carry = self.collect(first, &mut rx).await;
                }
            }
        }
    }

    /// The segment is sealed: every batch in flight was refused (appends after a seal all
    /// are; one accepted before it is answered as a duplicate). Sends the refused events,
    /// then everything queued, to the segments that now own their keys, and stops.
    async fn redirect(mut self, mut rx: QueueRx, carry: Option<Cmd>, sealed: ClientError) {
        let refused: Vec<Batch> = self.take_all();
        let s = &self.shared.stream;
        let now = match self.shared.client.get_stream(&s.scope, &s.stream).await {
            Ok(info) if info.sealed => Err(ClientError::Server {
                code: ErrorCode::Sealed,
                message: format!("stream {s} is sealed"),
                endpoint: None,
                offset: None,
            }),
            // Sealed on its own, not by a scaling: nowhere to go.
            Ok(info) if info.segments.iter().any(|x| x.number == self.number) => Err(sealed),
            Ok(info) => Ok(info.segments),
            Err(e) => Err(e),
        };
        let shared = self.shared.clone();
        let mut routes = shared.routes.lock().expect("lock");
        routes.queues.remove(&self.number);
        // From here on every event this lane holds travels with its ticket (or fails).
        self.finished = true;
        let board = self.flight.board.clone();
        let moved = |c: Cmd| match c {
            Cmd::Event(point, payload, ack) => Cmd::Event(point, payload, ack.moved(&board)),
            flush => flush,
        };
        let mut cmds: Vec<Cmd> = Vec::new();
        for b in refused {
            let (ranges, _) = split_whole_events(&b.payload).expect("the writer framed these events");
            for ((range, point), ack) in ranges.into_iter().zip(b.points).zip(b.acks) {
                cmds.push(Cmd::Event(point, b.payload.slice(range), ack.moved(&board)));
            }
            cmds.extend(b.flushes.into_iter().map(Cmd::Flush));
        }
        cmds.extend(carry.map(moved));
        while let Some(c) = rx.try_recv() {
            cmds.push(moved(c));
        }
        let segments = match now {
            Ok(segments) => segments,
            Err(e) => {
                // The writer can write no more: fail everything, now and later.
                for c in cmds {
                    match c {
                        Cmd::Event(_, _, ack) => ack.send(&board, Err(e.clone())),
                        Cmd::Flush(tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
                routes.closed = Some(e);
                return;
            }
        };
        let mut table = Vec::with_capacity(routes.table.len() + segments.len());
        let mut successors = Vec::new();
        for r in &routes.table {
            if r.segment != self.number {
                table.push(*r);
                continue;
            }
            for n in &segments {
                let (low, high) = (r.low.max(n.key_low), r.high.min(n.key_high));
                if low < high {
                    table.push(Route { low, high, segment: n.number });
                    if !successors.contains(&n.number) {
                        successors.push(n.number);
                    }
                }
            }
        }
        table.sort_by(|a, b| a.low.total_cmp(&b.low));
        routes.table = table;
        tracing::debug!(segment = %self.segment, ?successors, "segment sealed; writing to its successors");
        for c in cmds {
            match c {
                Cmd::Event(..) => routes.forward(&shared, c),
                Cmd::Flush(tx) => {
                    // Done when every successor has written what it got before it.
                    let waits: Vec<_> = successors
                        .iter()
                        .filter_map(|&n| {
                            let (t, r) = oneshot::channel();
                            routes.lane(&shared, n).tx.send(Cmd::Flush(t)).ok().map(|_| r)
                        })
                        .collect();
                    tokio::spawn(async move {
                        let mut result = Ok(());
                        for w in waits {
                            if let Err(e) = w.await.unwrap_or_else(|_| Err(stopped())) {
                                result = Err(e);
                            }
                        }
                        let _ = tx.send(result);
                    });
                }
            }
        }
        if routes.dropped {
            // No `EventWriter` will queue more: the successors' tasks end once they are done.
            routes.queues.clear();
        }
    }

    /// Builds a batch starting with `first` and sends it. Returns a command that did not fit.
    async fn collect(&mut self, first: Cmd, rx: &mut QueueRx) -> Option<Cmd> {
        let linger_until = Instant::now() + self.shared.config.linger;
        // A node with small log files takes smaller appends.
        let batch_max = self.shared.config.batch_bytes_max.min(self.shared.client.append_bytes_max());
        // Sized for what is queued already: a buffer grown event by event was copied again at
        // every doubling (a tenth of a 1 KB producer's CPU went to those copies).
        let (first_bytes, (queued_bytes, queued)) = match &first {
            Cmd::Event(_, p, _) => (framed_len(p.len()), rx.ready(batch_max.saturating_sub(framed_len(p.len())))),
            // A flush alone is no batch.
            Cmd::Flush(_) => (0, (0, 0)),
        };
        let mut payload = BytesMut::with_capacity(first_bytes + queued_bytes);
        let mut acks = Vec::with_capacity(queued + 1);
        let mut points = Vec::with_capacity(queued + 1);
        let mut flushes = Vec::new();
        let mut next = Some(first);
        let mut leftover = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Some(c) => c,
                    None if !self.shared.config.linger.is_zero() && Instant::now() < linger_until => {
                        match tokio::time::timeout_at(linger_until.into(), rx.recv()).await {
                            Ok(Some(c)) => c,
                            _ => break,
                        }
                    }
                    None => break,
                },
            };
            match cmd {
                Cmd::Event(point, p, ack) => {
                    if !acks.is_empty() && payload.len() + framed_len(p.len()) > batch_max {
                        leftover = Some(Cmd::Event(point, p, ack));
                        break;
                    }
                    payload.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    payload.extend_from_slice(&p);
                    points.push(point);
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
            {
                let mut st = self.flight.state.lock().expect("lock");
                if let Some(b) = st.batches.back_mut() {
                    b.flushes.append(&mut flushes);
                }
            }
            flushes.into_iter().for_each(|f| {
                let _ = f.send(Ok(()));
            });
            return leftover;
        }
        let count = acks.len() as u32;
        let first = self.shared.numbers.fetch_add(u64::from(count), Ordering::Relaxed);
        let batch = Batch { first, count, payload: payload.freeze(), points, acks, flushes, reply: None };
        let usable = self.conn.as_ref().filter(|c| !c.is_closed()).cloned();
        let (conn, batch) = match usable {
            Some(c) => (c, batch),
            None => {
                let held = {
                    let mut st = self.flight.state.lock().expect("lock");
                    if st.batches.is_empty() {
                        Some(batch)
                    } else {
                        // The connection broke with batches in flight: their failures (or, if
                        // none is coming, the task) resend everything in order, this one too.
                        st.batches.push_back(batch);
                        None
                    }
                };
                let Some(batch) = held else { return leftover };
                match self.shared.client.segment_connection(&self.segment).await {
                    Ok(c) => {
                        self.conn = Some(c.clone());
                        (c, batch)
                    }
                    Err(e) => {
                        self.flight.state.lock().expect("lock").batches.push_back(batch);
                        self.resend(e).await;
                        return leftover;
                    }
                }
            }
        };
        let payload = batch.payload.clone();
        let round = {
            let mut st = self.flight.state.lock().expect("lock");
            st.batches.push_back(batch);
            st.pending += 1;
            st.round
        };
        self.send(&conn, round, first, count, &payload);
        leftover
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (QueueTx, QueueRx) {
        let q = Arc::new(Queue { state: Mutex::new(QueueState::default()), wake: tokio::sync::Notify::new() });
        (QueueTx(q.clone()), QueueRx { queue: q, taken: Vec::new() })
    }

    fn event(n: u8) -> Cmd {
        Cmd::Event(0.5, Bytes::from(vec![n]), Ack::Own(u64::from(n)))
    }

    fn number(c: Option<Cmd>) -> Option<u8> {
        match c {
            Some(Cmd::Event(_, p, _)) => Some(p[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_queue_hands_commands_over_in_order_wakes_a_waiting_task_and_closes() {
        let (tx, mut rx) = queue();
        assert!(rx.try_recv().is_none());
        for n in 0..3 {
            assert!(tx.send(event(n)).is_ok());
        }
        assert_eq!(number(rx.try_recv()), Some(0));
        assert!(tx.send(event(3)).is_ok());
        assert_eq!(number(rx.recv().await), Some(1));
        assert_eq!(number(rx.recv().await), Some(2));
        assert_eq!(number(rx.recv().await), Some(3));
        // The task waits; a command from another task wakes it.
        let waiter = tokio::spawn(async move {
            let first = number(rx.recv().await);
            let end = rx.recv().await.is_none();
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx.send(event(4)).is_ok());
        drop(tx); // closed: the task gets what was queued, then the end
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!((first, end), (Some(4), true));
        // A queue whose task is gone gives commands back.
        let (tx, rx) = queue();
        drop(rx);
        assert_eq!(number(tx.send(event(9)).err()), Some(9));
    }

    #[test]
    fn what_is_ready_counts_queued_events_up_to_a_flush_or_the_batch_limit() {
        let (tx, mut rx) = queue();
        assert_eq!(rx.ready(1 << 20), (0, 0));
        for n in 0..3 {
            assert!(tx.send(event(n)).is_ok());
        }
        let (flush, _) = oneshot::channel();
        assert!(tx.send(Cmd::Flush(flush)).is_ok());
        assert!(tx.send(event(3)).is_ok());
        let one = framed_len(1);
        assert_eq!(rx.ready(1 << 20), (3 * one, 3), "up to the flush");
        assert_eq!(rx.ready(2 * one + 1), (2 * one, 2), "up to the limit");
        // Counting takes nothing.
        assert_eq!(number(rx.try_recv()), Some(0));
        assert_eq!(rx.ready(1 << 20), (2 * one, 2));
    }

    /// A flight of `n` one-event batches (numbers 10, 20, ...; tickets 0..n), all sent in
    /// round 0, and the board their tickets are on.
    fn flight(n: u64, window: usize) -> (Arc<Flight>, Arc<Board>) {
        let board = Arc::new(Board::new());
        let mut st = FlightState::default();
        for t in 0..n {
            st.batches.push_back(Batch {
                first: 10 * (t + 1),
                count: 1,
                payload: Bytes::new(),
                points: vec![0.5],
                acks: vec![Ack::Own(t)],
                flushes: Vec::new(),
                reply: None,
            });
        }
        st.pending = n as usize;
        let f = Flight { state: Mutex::new(st), wake: tokio::sync::Notify::new(), board: board.clone(), window };
        (Arc::new(f), board)
    }

    fn settled(board: &Board, ticket: u64) -> Option<Result<(), ClientError>> {
        let waker = futures::task::noop_waker();
        match board.look(ticket, &waker) {
            Look::Pending => None,
            Look::Done(r) => Some(r),
        }
    }

    /// Whether the task was woken (takes the permit).
    async fn woken(f: &Flight) -> bool {
        tokio::time::timeout(Duration::from_millis(20), f.wake.notified()).await.is_ok()
    }

    #[tokio::test]
    async fn answers_settle_batches_in_order_without_the_task() {
        let (f, board) = flight(3, 64);
        // The second batch answered first: nothing settles until the first is.
        f.answer(0, 20, Ok(()));
        assert!(settled(&board, 1).is_none());
        f.answer(0, 10, Ok(()));
        assert!(matches!(settled(&board, 0), Some(Ok(()))));
        assert!(matches!(settled(&board, 1), Some(Ok(()))));
        assert!(settled(&board, 2).is_none());
        assert!(!woken(&f).await, "acknowledgements do not wake the task");
        // An answer of an older round (a connection given up) is ignored.
        f.state.lock().unwrap().round = 1;
        f.answer(0, 30, Ok(()));
        assert!(settled(&board, 2).is_none());
        assert_eq!(f.state.lock().unwrap().batches.len(), 1);
    }

    #[tokio::test]
    async fn the_task_is_woken_for_errors_a_freed_window_a_silent_flight_and_its_end() {
        // A refused batch at the front: the task must decide (it stays there).
        let (f, board) = flight(2, 64);
        f.answer(0, 10, Err(ClientError::ConnectionLost("x".into())));
        assert!(woken(&f).await);
        assert!(settled(&board, 0).is_none(), "the task settles refused batches");
        // A full window that frees up.
        let (f, _) = flight(2, 2);
        f.answer(0, 10, Ok(()));
        assert!(woken(&f).await);
        // A send that never went out, the last one pending: no answer will come.
        let (f, _) = flight(2, 64);
        f.answer(0, 10, Ok(()));
        assert!(!woken(&f).await);
        f.unsent(0);
        assert!(woken(&f).await);
        // Input ended: the last answer wakes the task to finish; before that, none does.
        let (f, _) = flight(2, 64);
        f.state.lock().unwrap().closing = true;
        f.answer(0, 10, Ok(()));
        assert!(!woken(&f).await);
        f.answer(0, 20, Ok(()));
        assert!(woken(&f).await);
    }
}
