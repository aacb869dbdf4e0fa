//! Event writer: routes each event by its routing key to a segment, batches events per
//! segment, keeps many batches in flight, and resolves each event's future when its batch is
//! durable (or, for `write_events`, one future for many events once all are durable). A
//! `write_event` future is a ticket on its lane's board (`acks.rs`), not a channel.
//! One sender task per writer (`Driver`) builds and sends the batches of every lane that got
//! input, so a burst of events over many segments costs one wake-up; each segment's task
//! does the rest (connecting, resending, following a scaling, lingering), holding its lane
//! meanwhile. Acknowledgements are settled by the connection's reader task (a reply handler
//! per append, `Flight`), so no task wakes for them unless there is trouble.
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
use crate::connection::{Connection, expect, server_error};
use crate::error::ClientError;
use crate::stats::RoundTrips;
use bytes::{Bytes, BytesMut};
use sluice_net::ErrorCode;
use sluice_net::ScopedStream;
use sluice_net::constants::{APPEND_PARTS_MAX, CONTROL_BYTES_MAX, EVENT_BYTES_MAX, FRAME_BYTES_MAX_DEFAULT};
use sluice_net::event::{framed_len, split_whole_events};
use sluice_net::messages::{Append, AppendAck, AppendOutcome, AppendPart, Appends, AppendsReply, SegmentRange};
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
    /// The writer's sender (none with a linger: each lane's task sends for it).
    driver: Option<Arc<Driver>>,
}

impl Shared {
    /// The largest batch to send: the writer's limit, or less for a node with small log
    /// files (it takes smaller appends).
    fn batch_max(&self) -> usize {
        self.config.batch_bytes_max.min(self.client.append_bytes_max())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.close();
        }
    }
}

/// A key range [low, high) and the segment its events go to.
#[derive(Clone, Copy, Debug)]
struct Route {
    low: f64,
    high: f64,
    segment: u64,
}

/// A lane's input. Callers append commands under a lock; whoever sends for the lane takes
/// all that is queued at once (one lock per batch on its side), so a busy lane costs its
/// callers no atomic operations or wake-ups per event (a channel did both for every event).
/// A command that finds the queue idle (nobody will look at it unless told) tells the
/// writer's sender (`Driver`), or, for a writer that lingers, the lane's task.
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the lane's task.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    cmds: Vec<Cmd>,
    /// Nobody looks at the queue until told: the next command tells the sender or the task.
    idle: bool,
    /// No more input (the writer dropped the lane): the task ends once it has taken all.
    closed: bool,
    /// The task is gone: nothing is taken any more.
    gone: bool,
}

/// The caller side of a lane's queue; dropping it closes the queue.
struct QueueTx(Arc<LaneCore>);

impl QueueTx {
    /// Queues `cmd`, or gives it back if the task is gone.
    fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        let wake = {
            let mut st = self.0.queue.state.lock().expect("lock");
            if st.gone {
                return Err(cmd);
            }
            st.cmds.push(cmd);
            std::mem::take(&mut st.idle)
        };
        if wake {
            match &self.0.driver {
                Some(d) => d.mark(&self.0),
                None => self.0.queue.wake.notify_one(),
            }
        }
        Ok(())
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        self.0.queue.state.lock().expect("lock").closed = true;
        self.0.queue.wake.notify_one();
    }
}

/// The taking side of a lane's queue: what was taken and not yet handed out.
#[derive(Default)]
struct QueueRx {
    /// In reverse order: popped from the back.
    taken: Vec<Cmd>,
}

impl QueueRx {
    fn try_recv(&mut self, q: &Queue) -> Option<Cmd> {
        self.take_queued(q);
        self.taken.pop()
    }

    /// The next command, or `None` with the queue marked idle (the next command will tell).
    fn next_or_idle(&mut self, q: &Queue) -> Option<Cmd> {
        if let Some(c) = self.taken.pop() {
            return Some(c);
        }
        let mut st = q.state.lock().expect("lock");
        if st.cmds.is_empty() {
            st.idle = true;
            return None;
        }
        std::mem::swap(&mut self.taken, &mut st.cmds);
        drop(st);
        self.taken.reverse();
        self.taken.pop()
    }

    /// Takes what callers queued, if nothing taken is left.
    fn take_queued(&mut self, q: &Queue) {
        if self.taken.is_empty() {
            let mut st = q.state.lock().expect("lock");
            std::mem::swap(&mut self.taken, &mut st.cmds);
            drop(st);
            self.taken.reverse();
        }
    }

    /// The framed bytes and the count of the events taken and next in line, up to the first
    /// flush or `max` bytes: what a batch starting now will hold, without waiting for more;
    /// and whether that batch is complete (it stops at a flush or at the limit).
    fn ready(&mut self, q: &Queue, max: usize) -> (usize, usize, bool) {
        self.take_queued(q);
        let (mut bytes, mut count) = (0, 0);
        for cmd in self.taken.iter().rev() {
            match cmd {
                Cmd::Event(_, p, _) if bytes + framed_len(p.len()) <= max => {
                    bytes += framed_len(p.len());
                    count += 1;
                }
                _ => return (bytes, count, true),
            }
        }
        (bytes, count, false)
    }
}

/// The writer's sender: one task that sends for every lane whose queue was idle when events
/// came, so a burst of events over many segments wakes one task, not one per segment (at
/// 470k events/s over 16 segments a task per segment cost the client a tenth more CPU, and
/// its tail ack latency was 1.2-2.8x longer). A lane it cannot serve (no connection yet,
/// trouble in its flight) is handed to the lane's task.
struct Driver {
    state: Mutex<DriverState>,
    wake: tokio::sync::Notify,
}

struct DriverState {
    /// Lanes with new input.
    lanes: Vec<Arc<LaneCore>>,
    /// The sender waits: the next lane marked wakes it.
    waiting: bool,
    /// The writer is gone.
    closed: bool,
    /// Callers inside a `Burst`: lanes marked meanwhile are sent when the last one ends,
    /// from its thread, and the sender task is not woken for them.
    bursts: usize,
}

impl Driver {
    fn new() -> Self {
        Self {
            state: Mutex::new(DriverState { lanes: Vec::new(), waiting: true, closed: false, bursts: 0 }),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// `lane` has new input.
    fn mark(&self, lane: &Arc<LaneCore>) {
        let wake = {
            let mut st = self.state.lock().expect("lock");
            st.lanes.push(lane.clone());
            st.bursts == 0 && std::mem::take(&mut st.waiting)
        };
        if wake {
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.state.lock().expect("lock").closed = true;
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>, shared: std::sync::Weak<Shared>) {
        loop {
            let lanes = {
                let mut st = self.state.lock().expect("lock");
                if st.closed {
                    return;
                }
                st.waiting = st.lanes.is_empty();
                std::mem::take(&mut st.lanes)
            };
            if lanes.is_empty() {
                // A wake-up sent before this wait starts is kept as a permit: none is lost.
                self.wake.notified().await;
                continue;
            }
            let Some(shared) = shared.upgrade() else { return };
            send_lanes(&shared, lanes);
        }
    }
}

/// Sends what `lanes` hold (each as far as it can; a lane that needs its task gets it).
/// The batches of lanes that share a connection go out in one write: the lanes' pumps stay
/// locked until it is done, so no later batch of a lane can overtake one gathered here.
fn send_lanes(shared: &Shared, lanes: Vec<Arc<LaneCore>>) {
    // A frame of several parts stays within a node's frame limit, whatever the writer's
    // batch limit (a part alone is as large as its batch).
    let mut gather = Gather::new(
        shared.batch_max().min(FRAME_BYTES_MAX_DEFAULT - CONTROL_BYTES_MAX),
        shared.client.round_trips().cloned(),
    );
    let mut locked = Vec::with_capacity(lanes.len());
    for lane in &lanes {
        // Never wait for a pump while holding others (whoever holds it may be waiting for
        // one of ours): send what is gathered and let them go first.
        let mut p = match lane.pump.try_lock() {
            Ok(p) => p,
            Err(std::sync::TryLockError::WouldBlock) => {
                gather.send();
                locked.clear();
                lane.pump.lock().expect("lock")
            }
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("a lane's pump lock is poisoned: {e}"),
        };
        if matches!(lane.pump(shared, &mut p, Some(&mut gather)), Pumped::Task) {
            lane.queue.wake.notify_one();
        }
        locked.push(p);
    }
    gather.send();
}

/// Batches pumped for several lanes, waiting to be sent together, per connection: in
/// `Appends` frames (several segments' batches in one request and one answer), all of a
/// connection's frames in one write.
struct Gather {
    conns: Vec<GatheredConn>,
    /// Most payload bytes in one `Appends` frame of several parts (the writer's batch limit,
    /// within a node's frame limit).
    frame_bytes_max: usize,
    /// Where the round trips go, when the client measures them.
    round_trips: Option<Arc<RoundTrips>>,
}

struct GatheredConn {
    conn: Arc<Connection>,
    parts: Vec<GatheredPart>,
}

/// One batch in a gathering: its part of an `Appends` frame, its data, and the flight (and
/// round) told its outcome.
struct GatheredPart {
    part: AppendPart,
    data: Bytes,
    flight: Arc<Flight>,
    round: u64,
}

impl Gather {
    fn new(frame_bytes_max: usize, round_trips: Option<Arc<RoundTrips>>) -> Self {
        Self { conns: Vec::new(), frame_bytes_max, round_trips }
    }

    fn add(&mut self, conn: &Arc<Connection>, part: GatheredPart) {
        let i = match self.conns.iter().position(|g| Arc::ptr_eq(&g.conn, conn)) {
            Some(i) => i,
            None => {
                self.conns.push(GatheredConn { conn: conn.clone(), parts: Vec::new() });
                self.conns.len() - 1
            }
        };
        self.conns[i].parts.push(part);
    }

    /// Sends everything gathered: one write per connection, of as few `Appends` frames as
    /// the limits allow (parts in the order gathered).
    fn send(&mut self) {
        for g in self.conns.drain(..) {
            let sizes: Vec<usize> = g.parts.iter().map(|p| p.data.len()).collect();
            let mut parts = g.parts.into_iter();
            let mut frames = Vec::new();
            let mut tells = Vec::new();
            for n in frame_sizes(&sizes, self.frame_bytes_max, APPEND_PARTS_MAX) {
                let (mut msg, mut data, mut told) =
                    (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
                for p in parts.by_ref().take(n) {
                    told.push((p.flight, p.round, p.part.first_event_number));
                    msg.push(p.part);
                    data.push(p.data);
                }
                let rounds: Vec<_> = told.iter().map(|(f, round, _)| (f.clone(), *round)).collect();
                frames.push((Appends { parts: msg }, data, timed(self.round_trips.as_ref(), appends_answered(told))));
                tells.push(rounds);
            }
            let sent = g.conn.send_many_then(frames);
            for (ok, rounds) in sent.into_iter().zip(tells) {
                if !ok {
                    for (flight, round) in rounds {
                        flight.unsent(round);
                    }
                }
            }
        }
    }
}

/// `on_reply`, measuring the round trip from now (just before its request is written) when
/// the client measures them: requests answered only (not those whose connection broke).
fn timed(round_trips: Option<&Arc<RoundTrips>>, on_reply: crate::connection::OnReply) -> crate::connection::OnReply {
    match round_trips {
        None => on_reply,
        Some(rt) => {
            let (rt, sent) = (rt.clone(), Instant::now());
            Box::new(move |reply| {
                if reply.is_ok() {
                    rt.record(sent.elapsed());
                }
                on_reply(reply)
            })
        }
    }
}

/// How many parts of `sizes` (each part's data bytes, in order) each frame takes: at most
/// `parts_max` parts and `bytes_max` bytes a frame, at least one part (a part alone may be
/// larger: a batch is within the node's limit by itself).
fn frame_sizes(sizes: &[usize], bytes_max: usize, parts_max: usize) -> Vec<usize> {
    let mut frames = Vec::new();
    let (mut parts, mut bytes) = (0, 0);
    for &size in sizes {
        if parts > 0 && (parts == parts_max || bytes + size > bytes_max) {
            frames.push(parts);
            (parts, bytes) = (0, 0);
        }
        parts += 1;
        bytes += size;
    }
    if parts > 0 {
        frames.push(parts);
    }
    frames
}

/// The handler of an `Appends` frame's answer: each part's flight is told its outcome (all
/// of them the error, if the frame as a whole failed).
fn appends_answered(told: Vec<(Arc<Flight>, u64, u64)>) -> crate::connection::OnReply {
    Box::new(move |reply| {
        let outcomes = reply.and_then(expect::<AppendsReply>).and_then(|r| {
            if r.outcomes.len() == told.len() {
                Ok(r.outcomes)
            } else {
                Err(ClientError::Protocol(sluice_net::ProtocolError::InvalidArchive {
                    kind: sluice_net::Kind::AppendsReply,
                    reason: format!("{} outcomes for {} parts", r.outcomes.len(), told.len()),
                }))
            }
        });
        match outcomes {
            Ok(outcomes) => {
                for ((flight, round, first), outcome) in told.into_iter().zip(outcomes) {
                    let r = match outcome {
                        AppendOutcome::Acked(_) => Ok(()),
                        AppendOutcome::Failed(e) => Err(server_error(e)),
                    };
                    flight.answer(round, first, r);
                }
            }
            Err(e) => {
                for (flight, round, first) in told {
                    flight.answer(round, first, Err(e.clone()));
                }
            }
        }
    })
}

/// A burst of writes (`EventWriter::burst`): the events written while it lives are sent
/// from this thread when it is dropped, without waking the writer's sender task.
pub struct Burst<'a> {
    writer: &'a EventWriter,
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        let shared = &self.writer.shared;
        let Some(d) = &shared.driver else { return };
        let lanes = {
            let mut st = d.state.lock().expect("lock");
            st.bursts -= 1;
            if st.bursts > 0 {
                return;
            }
            std::mem::take(&mut st.lanes)
        };
        send_lanes(shared, lanes);
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

/// A segment's lane as the writer sees it.
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
            let board = Arc::new(Board::new());
            let flight = Arc::new(Flight {
                state: Mutex::new(FlightState::default()),
                wake: tokio::sync::Notify::new(),
                board: board.clone(),
                window: shared.config.inflight_batches_max.max(1),
            });
            let core = Arc::new(LaneCore {
                segment: shared.stream.segment_name(sluice_net::SegmentNumber(segment)),
                queue: Queue { state: Mutex::new(QueueState::default()), wake: tokio::sync::Notify::new() },
                pump: Mutex::new(Pump::default()),
                flight,
                driver: shared.driver.clone(),
            });
            let task = SegmentWriter {
                shared: shared.clone(),
                number: segment,
                core: core.clone(),
                finished: false,
                retrying: None,
            };
            tokio::spawn(task.run());
            Lane { tx: QueueTx(core), board, next_ticket: 0 }
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
            driver: config.linger.is_zero().then(|| Arc::new(Driver::new())),
        });
        if let Some(d) = &shared.driver {
            tokio::spawn(d.clone().run(Arc::downgrade(&shared)));
        }
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

    /// Starts a burst of writes: events written (by anyone) until the returned guard is
    /// dropped are sent then, from the dropping thread, in as few appends as they make (the
    /// appends for one server in one write), instead of by the writer's sender task, which
    /// is not woken for them. For a caller that writes several events at once from a thread
    /// that is awake anyway (an open-loop schedule): it saves a task wake-up per burst. Drop
    /// it before waiting for any of its events. A writer with a linger sends as usual.
    pub fn burst(&self) -> Burst<'_> {
        if let Some(d) = &self.shared.driver {
            d.state.lock().expect("lock").bursts += 1;
        }
        Burst { writer: self }
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
    /// When it was last sent (for `ClientConfig::append_answer_timeout`).
    sent: Instant,
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
    /// The task waits for the last batch to be answered before it connects again: its
    /// connection broke (or the server closed it, say after refusing another lane's append
    /// on it) after those batches went out, and events wait unsent. Their answers may all
    /// be acknowledgements (sent before the close), which wake nobody otherwise: the lane
    /// then sat until the answer timeout (30 s) with its events unsent.
    reconnect: bool,
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
            None => self.closing || self.reconnect,
        }
    }
}

impl Flight {
    /// Whether `st` (this flight's state) has a full window.
    fn full(&self, st: &FlightState) -> bool {
        st.batches.len() >= self.window
    }

    /// An answer to the sending of batch `first` in round `round`.
    fn answer(&self, round: u64, first: u64, r: Result<(), ClientError>) {
        let (done, wake) = {
            let mut st = self.state.lock().expect("lock");
            if st.round != round {
                return;
            }
            st.pending -= 1;
            let full = self.full(&st);
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

/// What a lane's sending side shares between the writer's sender and the lane's task.
struct LaneCore {
    segment: String,
    queue: Queue,
    /// Whoever sends for the lane holds this: one at a time numbers and sends its batches.
    pump: Mutex<Pump>,
    flight: Arc<Flight>,
    /// The writer's sender; `None` when the writer lingers (its lanes' tasks send).
    driver: Option<Arc<Driver>>,
}

#[derive(Default)]
struct Pump {
    rx: QueueRx,
    /// A command taken that did not fit the last batch (or found no connection).
    carry: Option<Cmd>,
    /// The one connection this segment's appends go over. Appends of one writer must reach
    /// the server in order, and two connections give no order between them: a new batch on
    /// a new connection could overtake a resent older one, which the server would then drop
    /// as a duplicate. So the writer switches connections only when resending everything.
    conn: Option<Arc<Connection>>,
    /// The lane's task is at work (resending, connecting, redirecting) or gone: the sender
    /// leaves the lane alone.
    held: bool,
}

/// What a round of pumping left.
enum Pumped {
    /// Everything queued is sent; the queue is idle.
    Idle,
    /// The window is full or the task holds the lane: whoever frees it sends the rest.
    Held,
    /// The lane needs its task (no connection, or trouble in the flight).
    Task,
}

impl LaneCore {
    /// Sends what is queued, batch after batch, while the window has room, the flight needs
    /// nothing of the task and the lane has a working connection. Called with `p` (the
    /// lane's pump) locked.
    /// With `gather`, the batches are left there to be sent with other lanes' (the caller
    /// keeps `p` locked until they are).
    fn pump(&self, shared: &Shared, p: &mut Pump, mut gather: Option<&mut Gather>) -> Pumped {
        let batch_max = shared.batch_max();
        loop {
            if p.held {
                return Pumped::Held;
            }
            {
                let st = self.flight.state.lock().expect("lock");
                // Trouble at the front (an error, or no answer coming).
                if !st.batches.is_empty() && st.needs_task() {
                    return Pumped::Task;
                }
                if self.flight.full(&st) {
                    return Pumped::Held;
                }
            }
            let first = match p.carry.take() {
                Some(c) => c,
                None => match p.rx.next_or_idle(&self.queue) {
                    Some(c) => c,
                    None => return Pumped::Idle,
                },
            };
            let Some(conn) = p.conn.as_ref().filter(|c| !c.is_closed()).cloned() else {
                p.carry = Some(first);
                return Pumped::Task;
            };
            let (batch, leftover) = self.build(shared, first, &mut p.rx, batch_max);
            p.carry = leftover;
            if let Some(batch) = batch {
                self.launch(shared, &conn, batch, gather.as_deref_mut());
            }
        }
    }

    /// Builds a batch starting with `first` from what is queued, numbering its events.
    /// Returns the batch (none for a flush alone, which waits for the last batch in flight
    /// or is done now) and a command that did not fit.
    fn build(&self, shared: &Shared, first: Cmd, rx: &mut QueueRx, batch_max: usize) -> (Option<Batch>, Option<Cmd>) {
        // Sized for what is queued already: a buffer grown event by event was copied again at
        // every doubling (a tenth of a 1 KB producer's CPU went to those copies).
        let (first_bytes, (queued_bytes, queued, _)) = match &first {
            Cmd::Event(_, p, _) => {
                (framed_len(p.len()), rx.ready(&self.queue, batch_max.saturating_sub(framed_len(p.len()))))
            }
            // A flush alone is no batch.
            Cmd::Flush(_) => (0, (0, 0, true)),
        };
        let mut payload = BytesMut::with_capacity(first_bytes + queued_bytes);
        let mut acks = Vec::with_capacity(queued + 1);
        let mut points = Vec::with_capacity(queued + 1);
        let mut flushes = Vec::new();
        let mut next = Some(first);
        let mut leftover = None;
        while let Some(cmd) = next.take().or_else(|| rx.try_recv(&self.queue)) {
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
            {
                let mut st = self.flight.state.lock().expect("lock");
                if let Some(b) = st.batches.back_mut() {
                    b.flushes.append(&mut flushes);
                }
            }
            flushes.into_iter().for_each(|f| {
                let _ = f.send(Ok(()));
            });
            return (None, leftover);
        }
        let count = acks.len() as u32;
        let first = shared.numbers.fetch_add(u64::from(count), Ordering::Relaxed);
        let batch =
            Batch { first, count, payload: payload.freeze(), points, acks, flushes, reply: None, sent: Instant::now() };
        (Some(batch), leftover)
    }

    /// Puts `batch` in flight and sends it on `conn` (or leaves it in `gather`).
    fn launch(&self, shared: &Shared, conn: &Arc<Connection>, batch: Batch, gather: Option<&mut Gather>) {
        let (first, count, payload) = (batch.first, batch.count, batch.payload.clone());
        let round = {
            let mut st = self.flight.state.lock().expect("lock");
            st.batches.push_back(batch);
            st.pending += 1;
            st.round
        };
        match gather {
            Some(g) => {
                let part = AppendPart {
                    segment: self.segment.clone(),
                    writer_id: shared.writer_id,
                    first_event_number: first,
                    event_count: count,
                    data_bytes: payload.len() as u32,
                };
                g.add(conn, GatheredPart { part, data: payload, flight: self.flight.clone(), round });
            }
            None => self.send(shared, conn, round, first, count, &payload),
        }
    }

    /// The append of one batch (in round `round`) and what to do with its reply.
    fn request(&self, shared: &Shared, round: u64, first: u64, count: u32) -> (Append, crate::connection::OnReply) {
        let msg = Append {
            segment: self.segment.clone(),
            writer_id: shared.writer_id,
            first_event_number: first,
            event_count: count,
            expected_offset: None,
        };
        let flight = self.flight.clone();
        let on_reply: crate::connection::OnReply = Box::new(move |reply| {
            let r = reply.and_then(expect::<AppendAck>).map(|_| ());
            flight.answer(round, first, r);
        });
        (msg, on_reply)
    }

    /// Sends one batch (in round `round`) on `conn`; if the connection is broken, tells the
    /// flight that no answer will come.
    fn send(&self, shared: &Shared, conn: &Connection, round: u64, first: u64, count: u32, payload: &Bytes) {
        let (msg, on_reply) = self.request(shared, round, first, count);
        if !conn.send_then(&msg, payload, timed(shared.client.round_trips(), on_reply)) {
            self.flight.unsent(round);
        }
    }

    /// Whether input may still come: the queue is open, or commands are left in it.
    fn input_open(&self) -> bool {
        self.has_input() || !self.queue.state.lock().expect("lock").closed
    }

    /// Whether events or a flush wait in the lane, not yet sent.
    fn has_input(&self) -> bool {
        let p = self.pump.lock().expect("lock");
        p.carry.is_some() || !p.rx.taken.is_empty() || !self.queue.state.lock().expect("lock").cmds.is_empty()
    }

    fn hold(&self, held: bool) {
        self.pump.lock().expect("lock").held = held;
    }
}

/// A segment's task: what its lane needs beyond sending (connecting, resending, failing,
/// following a scaling, lingering). While it works on that it holds the lane.
struct SegmentWriter {
    shared: Arc<Shared>,
    number: u64,
    core: Arc<LaneCore>,
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
        // Nothing is taken or sent for the lane from now on.
        self.core.hold(true);
        self.core.queue.state.lock().expect("lock").gone = true;
        if !self.finished {
            // Cancelled (its runtime is gone): nobody will settle what it held.
            self.core.flight.board.close(stopped());
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
    /// Starts a new round: every batch in flight unanswered and unsent. Returns what to send.
    fn new_round(&self) -> (u64, Vec<(u64, u32, Bytes)>) {
        let mut st = self.core.flight.state.lock().expect("lock");
        st.round += 1;
        st.reconnect = false;
        let now = Instant::now();
        for b in st.batches.iter_mut() {
            b.reply = None;
            b.sent = now;
        }
        let sends: Vec<_> = st.batches.iter().map(|b| (b.first, b.count, b.payload.clone())).collect();
        st.pending = sends.len();
        (st.round, sends)
    }

    /// Takes every batch in flight out; answers still coming are ignored.
    fn take_all(&self) -> Vec<Batch> {
        let mut st = self.core.flight.state.lock().expect("lock");
        st.round += 1;
        st.pending = 0;
        st.batches.drain(..).collect()
    }

    /// After a retryable failure: reconnect and resend every unacknowledged batch in order,
    /// holding the lane meanwhile (nothing new is sent on the old connection).
    async fn resend(&mut self, err: ClientError) {
        self.core.hold(true);
        self.resend_held(err).await;
        self.core.hold(false);
    }

    async fn resend_held(&mut self, mut err: ClientError) {
        let acked = self.core.flight.state.lock().expect("lock").acked;
        // A batch acknowledged since the episode began ends it.
        if self.retrying.is_some_and(|(_, at)| at != acked) {
            self.retrying = None;
        }
        let fresh = Retrying { since: Instant::now(), backoff: Duration::from_millis(20), warned: false };
        let (Retrying { since, mut backoff, mut warned }, _) = *self.retrying.get_or_insert((fresh, acked));
        let retry_for = self.shared.client.config().retry_for;
        let deadline = since + retry_for;
        loop {
            warn_long_retry(&mut warned, since, retry_for, Some(&self.core.segment), &err);
            if Instant::now() >= deadline {
                for b in self.take_all() {
                    b.finish(&self.core.flight.board, Err(err.clone()));
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
            match self.shared.client.segment_connection(&self.core.segment).await {
                Ok(conn) => {
                    let (round, sends) = self.new_round();
                    for (first, count, payload) in sends {
                        self.core.send(&self.shared, &conn, round, first, count, &payload);
                    }
                    self.core.pump.lock().expect("lock").conn = Some(conn);
                    return;
                }
                Err(e) => err = e,
            }
        }
    }

    /// What the front of the flight asks of the task.
    fn todo(&self, input_open: bool) -> Todo {
        let mut st = self.core.flight.state.lock().expect("lock");
        st.closing = !input_open;
        match st.batches.front() {
            Some(Batch { reply: Some(Err(e)), .. }) => Todo::Refused(e.clone()),
            Some(_) if st.pending == 0 => Todo::Resend,
            Some(_) => Todo::Nothing,
            None if !input_open => Todo::Finish,
            None => Todo::Nothing,
        }
    }

    async fn run(mut self) {
        loop {
            match self.todo(self.core.input_open()) {
                Todo::Finish => {
                    self.finished = true;
                    return;
                }
                Todo::Refused(e) if e.code() == Some(ErrorCode::Sealed) => {
                    self.redirect(e).await;
                    return;
                }
                Todo::Refused(e) if e.is_retryable() => {
                    self.resend(e).await;
                    continue;
                }
                Todo::Refused(e) => {
                    // This batch fails; those after it go on (acknowledged ones settle now).
                    let (failed, done) = {
                        let mut st = self.core.flight.state.lock().expect("lock");
                        (st.batches.pop_front().expect("the refused batch"), st.take_done())
                    };
                    failed.finish(&self.core.flight.board, Err(e));
                    for b in done {
                        b.finish(&self.core.flight.board, Ok(()));
                    }
                    continue;
                }
                // Batches held back after their connection broke, with nothing left in
                // flight to fail: resend them now.
                Todo::Resend => {
                    self.resend(ClientError::ConnectionLost(self.core.segment.clone())).await;
                    continue;
                }
                Todo::Nothing => {}
            }
            self.linger().await;
            let pumped = {
                let mut p = self.core.pump.lock().expect("lock");
                self.core.pump(&self.shared, &mut p, None)
            };
            if matches!(pumped, Pumped::Task) && self.connect().await {
                continue;
            }
            // A look again at the oldest unanswered append's deadline, else after the answer
            // timeout: the writer's sender (`Driver`) launches batches without waking this
            // task, so one it sent while this task waited with nothing outstanding is looked
            // at within two timeouts (before, such a batch on a silent connection was waited
            // for for ever); and input nobody sent would be a lost wake-up.
            let timeout = self.shared.client.config().append_answer_timeout;
            let due = self.answer_due();
            // Whether anything was outstanding as this wait began (only then is input found
            // unsent at its end a lost wake-up, not input that came just now).
            let outstanding = due.is_some() || self.core.has_input();
            let look_at = due.unwrap_or_else(|| Instant::now() + timeout);
            tokio::select! {
                biased;
                _ = self.core.flight.wake.notified() => {}
                _ = self.core.queue.wake.notified() => {}
                _ = tokio::time::sleep_until(look_at.into()) => {
                    // Input unsent with nothing in flight is a lost wake-up, whichever the
                    // look was for (the last answer came meanwhile and woke nobody).
                    if self.answer_due().is_some() {
                        self.give_up_silent_connection();
                    } else if outstanding && self.core.has_input() {
                        tracing::warn!(segment = %self.core.segment, "a writer's lane held unsent events for {timeout:?}: sending them now");
                    }
                }
            }
        }
    }

    /// When the oldest unanswered sending of the flight is overdue, if one waits.
    fn answer_due(&self) -> Option<Instant> {
        let st = self.core.flight.state.lock().expect("lock");
        if st.pending == 0 {
            return None;
        }
        let oldest = st.batches.iter().find(|b| b.reply.is_none())?;
        Some(oldest.sent + self.shared.client.config().append_answer_timeout)
    }

    /// An append went unanswered for `append_answer_timeout`: the connection is given up,
    /// which fails what waits on it and brings the lane's resend on a new one.
    fn give_up_silent_connection(&self) {
        if self.answer_due().is_none_or(|due| due > Instant::now()) {
            return;
        }
        let conn = self.core.pump.lock().expect("lock").conn.clone();
        if let Some(conn) = conn {
            tracing::warn!(
                segment = %self.core.segment,
                addr = conn.addr(),
                timeout = ?self.shared.client.config().append_answer_timeout,
                "no answer to an append: giving the connection up and sending again on a new one"
            );
            conn.abort();
        }
    }

    /// With a linger: once there is input to send and room to send it, waits up to the
    /// linger for a batch's worth (or a flush) before it goes.
    async fn linger(&self) {
        let linger = self.shared.config.linger;
        if linger.is_zero() {
            return;
        }
        let batch_max = self.shared.batch_max();
        let until = Instant::now() + linger;
        loop {
            {
                let full = {
                    let f = &self.core.flight;
                    f.full(&f.state.lock().expect("lock"))
                };
                let mut p = self.core.pump.lock().expect("lock");
                if full || p.carry.is_some() {
                    return;
                }
                // Nothing queued, or a batch complete already (a flush, the size limit).
                let (_, count, complete) = p.rx.ready(&self.core.queue, batch_max);
                if count == 0 || complete {
                    return;
                }
                // Told of the next command (this task is the lane's only sender).
                self.core.queue.state.lock().expect("lock").idle = true;
            }
            if tokio::time::timeout_at(until.into(), self.core.queue.wake.notified()).await.is_err() {
                return;
            }
        }
    }

    /// The lane has input but no working connection. With batches in flight, their failures
    /// (or, if none is coming, the task) resend everything in order, what is queued after
    /// them; with none, connects. Returns whether anything changed.
    async fn connect(&mut self) -> bool {
        {
            let mut st = self.core.flight.state.lock().expect("lock");
            // Not while batches are in flight on the old connection (a new one could take
            // later batches before they are answered): the last answer wakes the task.
            st.reconnect = !st.batches.is_empty();
            if st.reconnect {
                return false;
            }
        }
        self.core.hold(true);
        match self.shared.client.segment_connection(&self.core.segment).await {
            Ok(c) => self.core.pump.lock().expect("lock").conn = Some(c),
            Err(e) => {
                // The first batch waits in the flight for the retries, and fails with them.
                let batch = {
                    let mut p = self.core.pump.lock().expect("lock");
                    match p.carry.take() {
                        Some(first) => {
                            let (batch, leftover) =
                                self.core.build(&self.shared, first, &mut p.rx, self.shared.batch_max());
                            p.carry = leftover;
                            batch
                        }
                        None => None,
                    }
                };
                if let Some(b) = batch {
                    self.core.flight.state.lock().expect("lock").batches.push_back(b);
                }
                self.resend_held(e).await;
            }
        }
        self.core.hold(false);
        true
    }

    /// The segment is sealed: every batch in flight was refused (appends after a seal all
    /// are; one accepted before it is answered as a duplicate). Sends the refused events,
    /// then everything queued, to the segments that now own their keys, and stops.
    async fn redirect(mut self, sealed: ClientError) {
        // The lane is this task's until it ends.
        self.core.hold(true);
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
        let board = self.core.flight.board.clone();
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
        {
            let mut p = self.core.pump.lock().expect("lock");
            cmds.extend(p.carry.take().map(moved));
            while let Some(c) = p.rx.try_recv(&self.core.queue) {
                cmds.push(moved(c));
            }
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
        tracing::debug!(segment = %self.core.segment, ?successors, "segment sealed; writing to its successors");
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_batches_fill_frames_up_to_both_limits_in_order() {
        // Bytes: 100 + 200 fit 300, the next 50 would not.
        assert_eq!(frame_sizes(&[100, 200, 50, 50], 300, 10), vec![2, 2]);
        // A part over the byte limit goes alone; nothing is left out.
        assert_eq!(frame_sizes(&[10, 500, 10], 300, 10), vec![1, 1, 1]);
        // Parts: at most three a frame.
        assert_eq!(frame_sizes(&[1; 7], 1000, 3), vec![3, 3, 1]);
        assert_eq!(frame_sizes(&[], 1000, 3), Vec::<usize>::new());
        // The protocol's limit: 600 small batches make three frames.
        let sizes = frame_sizes(&[100; 600], 512 << 10, APPEND_PARTS_MAX);
        assert_eq!(sizes, vec![256, 256, 88]);
    }

    /// A lane (no task) told of input through `driver`, or, without one, through its task's wake-up.
    fn lane(driver: Option<Arc<Driver>>) -> (QueueTx, Arc<LaneCore>) {
        let board = Arc::new(Board::new());
        let flight = Flight { state: Mutex::default(), wake: tokio::sync::Notify::new(), board, window: 4 };
        let core = Arc::new(LaneCore {
            segment: "s/t/0".into(),
            queue: Queue { state: Mutex::default(), wake: tokio::sync::Notify::new() },
            pump: Mutex::default(),
            flight: Arc::new(flight),
            driver,
        });
        (QueueTx(core.clone()), core)
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
    async fn a_queue_hands_commands_over_in_order_and_tells_of_input_once_it_went_idle() {
        let (tx, core) = lane(None);
        let mut rx = QueueRx::default();
        assert!(rx.try_recv(&core.queue).is_none());
        for n in 0..3 {
            assert!(tx.send(event(n)).is_ok());
        }
        assert_eq!(number(rx.try_recv(&core.queue)), Some(0));
        assert!(tx.send(event(3)).is_ok());
        for n in 1..4 {
            assert_eq!(number(rx.next_or_idle(&core.queue)), Some(n));
        }
        // Nothing was idle so far: nobody was woken.
        let woken = |q: &Arc<LaneCore>| {
            let q = q.clone();
            async move { tokio::time::timeout(Duration::from_millis(20), q.queue.wake.notified()).await.is_ok() }
        };
        assert!(!woken(&core).await);
        // Drained, the queue is idle: the next command wakes the task, the one after does not.
        assert!(rx.next_or_idle(&core.queue).is_none());
        assert!(tx.send(event(4)).is_ok());
        assert!(tx.send(event(5)).is_ok());
        assert!(woken(&core).await);
        assert!(!woken(&core).await);
        assert_eq!(number(rx.next_or_idle(&core.queue)), Some(4));
        // With a sender, the first command after idle marks the lane for it instead, once.
        let driver = Arc::new(Driver::new());
        let (tx2, core2) = lane(Some(driver.clone()));
        assert!(QueueRx::default().next_or_idle(&core2.queue).is_none());
        assert!(tx2.send(event(7)).is_ok());
        assert!(tx2.send(event(8)).is_ok());
        assert_eq!(driver.state.lock().unwrap().lanes.len(), 1);
        assert!(!woken(&core2).await, "the lane's task is not woken");
        // Closing wakes the task; a queue whose task is gone gives commands back.
        drop(tx);
        assert!(woken(&core).await);
        assert!(core.queue.state.lock().unwrap().closed);
        core2.queue.state.lock().unwrap().gone = true;
        assert_eq!(number(tx2.send(event(9)).err()), Some(9));
    }

    #[test]
    fn what_is_ready_counts_queued_events_up_to_a_flush_or_the_batch_limit() {
        let (tx, core) = lane(None);
        let q = &core.queue;
        let mut rx = QueueRx::default();
        assert_eq!(rx.ready(q, 1 << 20), (0, 0, false));
        for n in 0..3 {
            assert!(tx.send(event(n)).is_ok());
        }
        assert_eq!(rx.ready(q, 1 << 20), (3 * framed_len(1), 3, false), "all, and more may come");
        let (flush, _) = oneshot::channel();
        assert!(tx.send(Cmd::Flush(flush)).is_ok());
        assert!(tx.send(event(3)).is_ok());
        let one = framed_len(1);
        assert_eq!(rx.ready(q, 1 << 20), (3 * one, 3, false), "taken before the flush was queued");
        assert_eq!(number(rx.try_recv(q)), Some(0));
        assert_eq!(number(rx.try_recv(q)), Some(1));
        assert_eq!(number(rx.try_recv(q)), Some(2));
        assert_eq!(rx.ready(q, 1 << 20), (0, 0, true), "a flush first");
        assert!(matches!(rx.try_recv(q), Some(Cmd::Flush(_))));
        assert_eq!(number(rx.try_recv(q)), Some(3));
        for n in 4..7 {
            assert!(tx.send(event(n)).is_ok());
        }
        assert_eq!(rx.ready(q, 2 * one + 1), (2 * one, 2, true), "up to the limit");
        // Counting takes nothing.
        assert_eq!(number(rx.try_recv(q)), Some(4));
        assert_eq!(rx.ready(q, 1 << 20), (2 * one, 2, false));
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
                sent: Instant::now(),
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
        // The connection broke with events waiting to be sent: the last acknowledgement
        // wakes the task to connect again (nothing did: the lane waited for the 30 s answer
        // timeout, two of ~250 runs of the cluster move test).
        let (f, _) = flight(2, 64);
        f.state.lock().unwrap().reconnect = true;
        f.answer(0, 10, Ok(()));
        assert!(!woken(&f).await);
        f.answer(0, 20, Ok(()));
        assert!(woken(&f).await);
    }
}
