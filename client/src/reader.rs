//! Event reader over every segment of a stream, from the head or the tail. One task per
//! segment reads raw segment bytes (long-polling at the tail), cuts them into events, and
//! feeds one channel. Events of one segment (and so of one routing key) arrive in order.

use crate::client::Client;
use crate::error::ClientError;
use bytes::{Bytes, BytesMut};
use sluice_net::event::split_whole_events;
use sluice_net::messages::SegmentRange;
use sluice_net::{ScopedStream, SegmentNumber};
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
    pub segment: String,
    /// Offset of the event's frame in the segment.
    pub offset: u64,
    pub payload: Bytes,
}

pub struct EventReader {
    rx: mpsc::Receiver<Result<Event, ClientError>>,
    tasks: Vec<JoinHandle<()>>,
}

const READ_CHUNK_BYTES: u32 = 1 << 20;
const TAIL_WAIT: Duration = Duration::from_millis(500);

impl EventReader {
    pub(crate) async fn start(
        client: Client,
        stream: ScopedStream,
        segments: Vec<SegmentRange>,
        from: ReadFrom,
    ) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::channel(4096);
        let mut tasks = Vec::new();
        for s in segments {
            let name = stream.segment_name(SegmentNumber(s.number));
            let info = client.segment_info(&name).await?;
            let start = if from == ReadFrom::Head { info.start_offset } else { info.length };
            tasks.push(tokio::spawn(read_segment(client.clone(), name, start, tx.clone())));
        }
        Ok(Self { rx, tasks })
    }

    /// The next event, or `None` when `timeout` passes without one or every segment ended
    /// (sealed and read to the end).
    pub async fn read_next(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(r)) => r.map(Some),
            Ok(None) | Err(_) => Ok(None),
        }
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn read_segment(client: Client, segment: String, mut offset: u64, tx: mpsc::Sender<Result<Event, ClientError>>) {
    let mut pending = BytesMut::new();
    let mut pending_offset = offset;
    loop {
        let (reply, data) = match client.read_segment(&segment, offset, READ_CHUNK_BYTES, TAIL_WAIT).await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        offset += data.len() as u64;
        pending.extend_from_slice(&data);
        let (ranges, used) = match split_whole_events(&pending) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(Err(ClientError::InvalidArgument(format!("segment {segment} at {pending_offset}: {e}"))))
                    .await;
                return;
            }
        };
        let whole = pending.split_to(used).freeze();
        for r in ranges {
            let ev = Event {
                segment: segment.clone(),
                offset: pending_offset + r.start as u64 - 4,
                payload: whole.slice(r),
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        pending_offset += used as u64;
        if reply.end_of_segment && pending.is_empty() {
            return;
        }
    }
}
