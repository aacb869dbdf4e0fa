//! Batch reads: the segment ranges of a stream between two stream cuts, and a reader for
//! one range, so a job can read ranges in parallel (the shape Spark and Flink batch
//! readers need).

use crate::client::Client;
use crate::cut::{CutAt, StreamCut};
use crate::error::ClientError;
use crate::reader::{Event, EventCutter, READ_CHUNK_BYTES, ReadAhead};
use std::collections::VecDeque;
use std::time::Duration;

/// Bytes [start, end) of one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSlice {
    pub segment: String,
    pub start: u64,
    pub end: u64,
}

impl Client {
    /// The slices of `stream` between `from` (default: head) and `to` (default: tail),
    /// across scalings: the segments of `from`, and their successors up to those of `to`.
    pub async fn segment_slices(
        &self,
        stream: &str,
        from: Option<&StreamCut>,
        to: Option<&StreamCut>,
    ) -> Result<Vec<SegmentSlice>, ClientError> {
        let from = match from {
            Some(c) => c.clone(),
            None => self.stream_cut(stream, CutAt::Head).await?,
        };
        let to = match to {
            Some(c) => c.clone(),
            None => self.stream_cut(stream, CutAt::Tail).await?,
        };
        let s = crate::client::parse_stream(stream)?;
        for cut in [&from, &to] {
            if cut.stream != s {
                return Err(ClientError::InvalidStreamCut(format!("the cut is for {}, not {s}", cut.stream)));
            }
            self.validate_cut(cut).await?;
        }
        // Walk from `from` through the successors of every segment that ends before `to`;
        // a successor joins once all of its predecessors are in the walk.
        let history = self.stream_history(&s.scope, &s.stream).await?;
        let mut walk: Vec<(u64, u64)> = from.positions.iter().map(|(&seg, &off)| (seg, off)).collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < walk.len() {
            let (seg, start) = walk[i];
            i += 1;
            let name = s.segment_name(sluice_net::SegmentNumber(seg));
            let end = match to.positions.get(&seg) {
                Some(&end) => end,
                None => self.segment_info(&name).await?.length,
            };
            if start > end {
                return Err(ClientError::InvalidStreamCut(format!("segment {seg}: start {start} is after end {end}")));
            }
            out.push(SegmentSlice { segment: name, start, end });
            if to.positions.contains_key(&seg) {
                continue;
            }
            for succ in history.successors(seg) {
                let walked = |n: &u64| walk.iter().any(|(w, _)| w == n);
                if !walked(&succ.number) && succ.predecessors.iter().all(walked) {
                    let start = self.segment_info(&s.segment_name(sluice_net::SegmentNumber(succ.number))).await?;
                    walk.push((succ.number, start.start_offset));
                }
            }
        }
        Ok(out)
    }

    /// A reader of the events in one slice.
    pub fn read_slice(&self, slice: SegmentSlice) -> SliceReader {
        SliceReader {
            client: self.clone(),
            cut: EventCutter::new(slice.segment.clone(), slice.start),
            slice,
            ready: VecDeque::new(),
            ahead: ReadAhead::default(),
        }
    }
}

pub struct SliceReader {
    client: Client,
    slice: SegmentSlice,
    cut: EventCutter,
    ready: VecDeque<Event>,
    /// The next read, sent while this one's events are handed out.
    ahead: ReadAhead,
}

impl SliceReader {
    /// The next event of the slice, or `None` at its end.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(Some(ev));
            }
            let at = self.cut.read_offset();
            if at >= self.slice.end {
                if self.cut.has_partial() {
                    return Err(ClientError::InvalidStreamCut(format!(
                        "{} ends inside an event at {}",
                        self.slice.segment, self.slice.end
                    )));
                }
                return Ok(None);
            }
            let want = |at: u64| (self.slice.end - at).min(u64::from(READ_CHUNK_BYTES)) as u32;
            let wait = Duration::from_secs(1);
            let (_, data) = self.ahead.read(&self.client, &self.slice.segment, at, want(at), wait).await?;
            let data = data.slice(..data.len().min(want(at) as usize));
            let next = at + data.len() as u64;
            if !data.is_empty() && next < self.slice.end {
                self.ahead.send(&self.client, &self.slice.segment, next, want(next), wait);
            }
            let events = self.cut.push(data).map_err(|e| match e {
                ClientError::InvalidArgument(m) => ClientError::InvalidStreamCut(m),
                other => other,
            })?;
            self.ready.extend(events.into_iter().map(|(ev, _)| ev));
        }
    }
}
