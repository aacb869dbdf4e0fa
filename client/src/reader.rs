//! Event reader over every segment of a stream, from the head or the tail. One task per
//! segment reads raw segment bytes (long-polling at the tail), cuts them into events, and
//! feeds one channel. Events of one segment (and so of one routing key) arrive in order.
//! When a segment ends (sealed by a scaling and read to its end), each successor starts
//! once all of its predecessors have ended, so a key's order holds across scalings.

use crate::client::{Client, read_reply};
use crate::cut::CutAt;
use crate::error::ClientError;
use bytes::{Bytes, BytesMut};
use sluice_net::event::split_whole_events;
use sluice_net::messages::ReadReply;
use sluice_net::{ErrorCode, Frame, ScopedStream, SegmentNumber};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Where a reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    Head,
    Tail,
}

#[derive(Clone, Debug)]
pub struct Event {
    /// Qualified segment name.
    pub segment: Arc<str>,
    /// Offset of the event's frame in the segment.
    pub offset: u64,
    pub payload: Bytes,
}

pub struct EventReader {
    client: Client,
    stream: ScopedStream,
    tx: mpsc::Sender<Item>,
    rx: mpsc::Receiver<Item>,
    /// Events of the last read taken from the channel, not returned yet.
    ready: VecDeque<Event>,
    /// Running segment tasks, by segment number.
    tasks: HashMap<u64, JoinHandle<()>>,
    /// Segments started (running or ended).
    started: HashSet<u64>,
    ended: HashSet<u64>,
}

/// What a segment task reports.
enum Item {
    /// The events of one read.
    Events(Vec<(Event, u64)>),
    Error(ClientError),
    /// The segment is sealed and read to its end.
    End(u64),
    /// The task stopped on an error it reported.
    Stopped(u64),
}

/// Bytes a segment reader asks for at a time.
pub(crate) const READ_CHUNK_BYTES: u32 = 1 << 20;
const TAIL_WAIT: Duration = Duration::from_millis(500);

impl EventReader {
    pub(crate) async fn start(client: Client, stream: ScopedStream, from: ReadFrom) -> Result<Self, ClientError> {
        let at = match from {
            ReadFrom::Head => CutAt::Head,
            ReadFrom::Tail => CutAt::Tail,
        };
        let cut = client.stream_cut(&stream.to_string(), at).await?;
        // Messages carry the events of one read (at most `READ_CHUNK_BYTES`).
        let (tx, rx) = mpsc::channel(16);
        let mut reader = Self {
            client,
            stream,
            tx,
            rx,
            ready: VecDeque::new(),
            tasks: HashMap::new(),
            started: HashSet::new(),
            ended: HashSet::new(),
        };
        for (seg, off) in cut.positions {
            reader.spawn(seg, off);
        }
        Ok(reader)
    }

    fn spawn(&mut self, number: u64, offset: u64) {
        let name = self.stream.segment_name(SegmentNumber(number));
        self.started.insert(number);
        let task = tokio::spawn(read_segment(self.client.clone(), number, name, offset, self.tx.clone()));
        self.tasks.insert(number, task);
    }

    /// Starts the successors of `ended` whose predecessors have all ended.
    async fn start_successors(&mut self, ended: u64) -> Result<(), ClientError> {
        let history = self.client.stream_history(&self.stream.scope, &self.stream.stream).await?;
        for s in history.successors(ended) {
            if !self.started.contains(&s.number) && s.predecessors.iter().all(|p| self.ended.contains(p)) {
                let info = self.client.segment_info(&self.stream.segment_name(SegmentNumber(s.number))).await?;
                self.spawn(s.number, info.start_offset);
            }
        }
        Ok(())
    }

    /// The next event, or `None` when `timeout` passes without one or every segment ended
    /// (the stream is sealed and read to the end). If a truncation (or retention) removes
    /// data this reader has not read yet, one call returns a `Truncated` error (its offset
    /// is the segment's new start) and reading goes on from there.
    pub async fn read_next(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Some(e) = self.ready.pop_front() {
            return Ok(Some(e));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.tasks.is_empty() {
                return Ok(None);
            }
            let next = match self.rx.try_recv() {
                Ok(item) => Ok(Some(item)),
                Err(_) => tokio::time::timeout_at(deadline, self.rx.recv()).await,
            };
            match next {
                Ok(Some(Item::Events(events))) => {
                    self.ready.extend(events.into_iter().map(|(e, _)| e));
                    if let Some(e) = self.ready.pop_front() {
                        return Ok(Some(e));
                    }
                }
                Ok(Some(Item::Error(e))) => return Err(e),
                Ok(Some(Item::End(n))) => {
                    self.tasks.remove(&n);
                    self.ended.insert(n);
                    self.start_successors(n).await?;
                }
                Ok(Some(Item::Stopped(n))) => {
                    self.tasks.remove(&n);
                }
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

/// Cuts raw segment bytes, arriving in chunks of any size, into whole events with their
/// offsets. Shared by every reader (stream, group, batch slice).
pub(crate) struct EventCutter {
    /// Shared by every event cut (no copy of the name per event).
    segment: Arc<str>,
    pending: BytesMut,
    /// Offset of `pending[0]`: the first event not yet cut.
    offset: u64,
}

impl EventCutter {
    pub(crate) fn new(segment: String, offset: u64) -> Self {
        Self { segment: segment.into(), pending: BytesMut::new(), offset }
    }

    pub(crate) fn segment(&self) -> &str {
        &self.segment
    }

    /// Offset just after the last whole event cut.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset of the next byte to read.
    pub(crate) fn read_offset(&self) -> u64 {
        self.offset + self.pending.len() as u64
    }

    /// A partial event is waiting for its remaining bytes.
    pub(crate) fn has_partial(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Adds bytes read at `read_offset()`; returns the events now whole, each with the
    /// offset just after it. Bytes that begin at an event are cut where they are (no copy).
    pub(crate) fn push(&mut self, data: Bytes) -> Result<Vec<(Event, u64)>, ClientError> {
        let bad = |e, at| ClientError::InvalidArgument(format!("segment {} at {at}: {e}", self.segment));
        let (ranges, whole) = if self.pending.is_empty() {
            let (ranges, used) = split_whole_events(&data).map_err(|e| bad(e, self.offset))?;
            self.pending.extend_from_slice(&data[used..]);
            (ranges, data.slice(..used))
        } else {
            self.pending.extend_from_slice(&data);
            let (ranges, used) = split_whole_events(&self.pending).map_err(|e| bad(e, self.offset))?;
            (ranges, self.pending.split_to(used).freeze())
        };
        let used = whole.len();
        let base = self.offset;
        self.offset += used as u64;
        Ok(ranges
            .into_iter()
            .map(|r| {
                let next = base + r.end as u64;
                let offset = base + r.start as u64 - 4;
                (Event { segment: self.segment.clone(), offset, payload: whole.slice(r) }, next)
            })
            .collect())
    }
}

async fn read_segment(client: Client, number: u64, segment: String, offset: u64, tx: mpsc::Sender<Item>) {
    let mut cut = EventCutter::new(segment, offset);
    let mut ahead = ReadAhead::default();
    loop {
        let at = cut.read_offset();
        let read = ahead.read(&client, cut.segment(), at, READ_CHUNK_BYTES, TAIL_WAIT).await;
        if let Ok((reply, data)) = &read
            && !data.is_empty()
            && !reply.end_of_segment
        {
            ahead.send(&client, cut.segment(), at + data.len() as u64, READ_CHUNK_BYTES, TAIL_WAIT);
        }
        let events = read.and_then(|(reply, data)| Ok((reply, cut.push(data)?)));
        let (reply, events) = match events {
            Ok(r) => r,
            // Retention or a truncation overtook this reader: tell the application (the
            // error carries the new start offset), then go on from the segment's new start.
            Err(e @ ClientError::Server { code: ErrorCode::Truncated, offset: Some(start), .. }) => {
                if tx.send(Item::Error(e)).await.is_err() {
                    return;
                }
                cut = EventCutter::new(cut.segment().to_string(), start);
                continue;
            }
            Err(e) => {
                let _ = tx.send(Item::Error(e)).await;
                let _ = tx.send(Item::Stopped(number)).await;
                return;
            }
        };
        if !events.is_empty() && tx.send(Item::Events(events)).await.is_err() {
            return;
        }
        if reply.end_of_segment && !cut.has_partial() {
            let _ = tx.send(Item::End(number)).await;
            return;
        }
    }
}

/// The next read of a segment, sent ahead while the last one's events are handed over: a
/// reader catching up then overlaps the server's disk reads with the application's work.
/// Dropping it cancels the read in flight.
#[derive(Default)]
pub(crate) struct ReadAhead(Option<(u64, Ahead)>);

type ReadResult = Result<(ReadReply, Bytes), ClientError>;

/// A read sent ahead: straight on the segment's open connection (its reply future, polled
/// by the reading task itself: no task between the connection's reader and it), or, when
/// there is no open connection yet, by a task that connects and sends it.
enum Ahead {
    Sent(Pin<Box<dyn Future<Output = Result<Frame, ClientError>> + Send>>),
    Task(JoinHandle<ReadResult>),
}

impl ReadAhead {
    /// The read at `at`: the one sent ahead if it was for `at`, else a new one.
    pub(crate) async fn read(
        &mut self,
        client: &Client,
        segment: &str,
        at: u64,
        max: u32,
        wait: Duration,
    ) -> ReadResult {
        match self.0.take() {
            Some((offset, Ahead::Sent(reply))) if offset == at => {
                let got = reply.await.and_then(read_reply);
                match got {
                    // A broken connection, a moved container...: again, with the client's retries.
                    Err(e) if e.is_retryable() => client.read_segment(segment, at, max, wait).await,
                    other => other,
                }
            }
            Some((offset, Ahead::Task(h))) if offset == at => {
                h.await.unwrap_or_else(|e| Err(ClientError::ConnectionLost(format!("read of {segment}: {e}"))))
            }
            other => {
                if let Some((_, Ahead::Task(h))) = other {
                    h.abort();
                }
                client.read_segment(segment, at, max, wait).await
            }
        }
    }

    /// Sends the read at `at` ahead.
    pub(crate) fn send(&mut self, client: &Client, segment: &str, at: u64, max: u32, wait: Duration) {
        if let Some((_, Ahead::Task(h))) = self.0.take() {
            h.abort();
        }
        let ahead = match client.open_segment_connection(segment) {
            Some(conn) => {
                let read = Client::read_request(segment, at, max, wait);
                Ahead::Sent(Box::pin(conn.send_waiting(&read, Bytes::new(), Some(wait))))
            }
            None => {
                let (client, segment) = (client.clone(), segment.to_string());
                Ahead::Task(tokio::spawn(async move { client.read_segment(&segment, at, max, wait).await }))
            }
        };
        self.0 = Some((at, ahead));
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some((_, Ahead::Task(h))) = &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(events: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            sluice_net::event::encode_event(&mut out, e);
        }
        out
    }

    #[test]
    fn events_are_cut_across_reads_with_their_offsets() {
        let bytes = framed(&[b"one", b"two!", b"", b"three"]);
        let mut cut = EventCutter::new("s/t/0".into(), 100);
        // Whole events in one read, then an event split over three reads.
        let first = cut.push(Bytes::copy_from_slice(&bytes[..15])).expect("cut");
        let got: Vec<_> = first.iter().map(|(e, n)| (&e.payload[..], e.offset, *n)).collect();
        assert_eq!(got, vec![(&b"one"[..], 100, 107), (&b"two!"[..], 107, 115)]);
        assert!(!cut.has_partial());
        assert!(cut.push(Bytes::copy_from_slice(&bytes[15..17])).expect("cut").is_empty());
        let rest = cut.push(Bytes::copy_from_slice(&bytes[17..22])).expect("cut");
        assert_eq!(rest.len(), 1, "the empty event");
        assert!(cut.has_partial());
        let last = cut.push(Bytes::copy_from_slice(&bytes[22..])).expect("cut");
        let got: Vec<_> = last.iter().map(|(e, n)| (&e.payload[..], e.offset, *n, &*e.segment)).collect();
        assert_eq!(got, vec![(&b"three"[..], 119, 128, "s/t/0")]);
        assert_eq!((cut.offset(), cut.read_offset()), (128, 128));
    }
}
