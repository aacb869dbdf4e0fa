//! Stream cuts: a consistent position in a stream, {segment → offset}. Serializable to
//! bytes and to printable text (URL-safe base64), validated against the stream.
//!
//! Byte form (little-endian): magic `SCUT`, version u8 (1), scope_len u16, scope,
//! stream_len u16, stream, count u32, then count × (segment number u64, offset u64).

use crate::client::Client;
use crate::error::ClientError;
use base64::Engine;
use sluice_net::{ScopedStream, SegmentNumber};
use std::collections::BTreeMap;
use std::fmt;

const MAGIC: &[u8; 4] = b"SCUT";
const VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCut {
    pub stream: ScopedStream,
    /// Segment number → offset.
    pub positions: BTreeMap<u64, u64>,
}

fn bad(reason: impl Into<String>) -> ClientError {
    ClientError::InvalidStreamCut(reason.into())
}

impl StreamCut {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.positions.len() * 16);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        for name in [&self.stream.scope, &self.stream.stream] {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&(self.positions.len() as u32).to_le_bytes());
        for (seg, off) in &self.positions {
            out.extend_from_slice(&seg.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ClientError> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], ClientError> {
            let s = b.get(pos..pos + n).ok_or_else(|| bad("cut short"))?;
            pos += n;
            Ok(s)
        };
        if take(4)? != MAGIC {
            return Err(bad("not a stream cut (bad magic)"));
        }
        let version = take(1)?[0];
        if version != VERSION {
            return Err(bad(format!("unsupported version {version}")));
        }
        let mut names = Vec::new();
        for _ in 0..2 {
            let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
            names.push(String::from_utf8(take(len)?.to_vec()).map_err(|_| bad("name is not UTF-8"))?);
        }
        let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let mut positions = BTreeMap::new();
        for _ in 0..count {
            let seg = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            let off = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            if positions.insert(seg, off).is_some() {
                return Err(bad(format!("segment {seg} appears twice")));
            }
        }
        if pos != b.len() {
            return Err(bad("trailing bytes"));
        }
        let stream = names.pop().expect("two names");
        let scope = names.pop().expect("two names");
        Ok(Self { stream: ScopedStream::new(scope, stream), positions })
    }

    /// Printable form (URL-safe base64 without padding).
    pub fn to_text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.to_bytes())
    }

    pub fn from_text(s: &str) -> Result<Self, ClientError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| bad(format!("not base64: {e}")))?;
        Self::from_bytes(&bytes)
    }

    pub fn segment_name(&self, number: u64) -> String {
        self.stream.segment_name(SegmentNumber(number))
    }
}

impl fmt::Display for StreamCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Where a cut is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutAt {
    /// The oldest readable position of every segment.
    Head,
    /// The current end of every segment.
    Tail,
}

impl Client {
    /// A cut of `scope/stream` at its head (the first epoch's segments at their start
    /// offsets: reading from there walks every later epoch) or its tail (the current
    /// segments at their lengths).
    pub async fn stream_cut(&self, stream: &str, at: CutAt) -> Result<StreamCut, ClientError> {
        let s = crate::client::parse_stream(stream)?;
        let segments: Vec<u64> = match at {
            CutAt::Head => {
                self.stream_history(&s.scope, &s.stream).await?.first_epoch().iter().map(|h| h.number).collect()
            }
            CutAt::Tail => self.get_stream(&s.scope, &s.stream).await?.segments.iter().map(|r| r.number).collect(),
        };
        let mut positions = BTreeMap::new();
        for seg in segments {
            let si = self.segment_info(&s.segment_name(SegmentNumber(seg))).await?;
            positions.insert(seg, if at == CutAt::Head { si.start_offset } else { si.length });
        }
        Ok(StreamCut { stream: s, positions })
    }

    /// Checks that `cut` names segments of its stream (of any epoch) whose key ranges
    /// together cover every routing key, at offsets that exist.
    pub async fn validate_cut(&self, cut: &StreamCut) -> Result<(), ClientError> {
        let history = self.stream_history(&cut.stream.scope, &cut.stream.stream).await?;
        let mut ranges = Vec::new();
        for &seg in cut.positions.keys() {
            let h =
                history.segment(seg).ok_or_else(|| bad(format!("segment {seg} is not a segment of {}", cut.stream)))?;
            ranges.push((h.key_low, h.key_high));
        }
        ranges.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut covered = 0.0f64;
        for (low, high) in ranges {
            if low > covered {
                break;
            }
            covered = covered.max(high);
        }
        if covered < 1.0 {
            return Err(bad(format!(
                "the cut's segments do not cover the key space of {} from {covered} on",
                cut.stream
            )));
        }
        for (&seg, &off) in &cut.positions {
            let si = self.segment_info(&cut.segment_name(seg)).await?;
            if off > si.length {
                return Err(bad(format!("offset {off} is beyond the end ({}) of segment {seg}", si.length)));
            }
        }
        Ok(())
    }

    /// The reader groups subscribed to a stream, with their last checkpoint cuts.
    pub async fn list_subscribers(&self, stream: &str) -> Result<Vec<sluice_net::SubscriberInfo>, ClientError> {
        let s = crate::client::parse_stream(stream)?;
        let msg = sluice_net::ListSubscribers { scope: s.scope, stream: s.stream };
        Ok(self.admin::<_, sluice_net::SubscriberList>(msg).await?.subscribers)
    }

    /// Truncates the stream at `cut`: data before it is deleted (from the log and tier-2)
    /// and reads below it fail with `Truncated`. Positions at or below a segment's start
    /// offset change nothing. Segments of earlier epochs that lie wholly before the cut (the
    /// sealed ancestors of its segments) are truncated whole.
    pub async fn truncate_stream(&self, cut: &StreamCut) -> Result<(), ClientError> {
        self.validate_cut(cut).await?;
        let history = self.stream_history(&cut.stream.scope, &cut.stream.stream).await?;
        for seg in ancestors(&history, cut) {
            let si = match self.segment_info(&cut.segment_name(seg)).await {
                Ok(si) => si,
                Err(e) if e.code() == Some(sluice_net::ErrorCode::NoSuchSegment) => continue,
                Err(e) => return Err(e),
            };
            if si.sealed && si.start_offset < si.length {
                self.truncate_segment(&cut.segment_name(seg), si.length).await?;
            }
        }
        for (&seg, &off) in &cut.positions {
            self.truncate_segment(&cut.segment_name(seg), off).await?;
        }
        Ok(())
    }
}

/// Segments wholly before `cut`: every (transitive) predecessor of its segments that is
/// not itself in the cut.
pub fn ancestors(history: &sluice_net::StreamHistory, cut: &StreamCut) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut todo: Vec<u64> = cut.positions.keys().copied().collect();
    while let Some(n) = todo.pop() {
        for &p in history.segment(n).map(|h| h.predecessors.as_slice()).unwrap_or_default() {
            if !cut.positions.contains_key(&p) && !out.contains(&p) {
                out.push(p);
                todo.push(p);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_text_roundtrip_and_damage() {
        let cut = StreamCut { stream: ScopedStream::new("s", "t"), positions: [(0, 10), (1, 0), (7, 99)].into() };
        assert_eq!(StreamCut::from_bytes(&cut.to_bytes()).unwrap(), cut);
        assert_eq!(StreamCut::from_text(&cut.to_text()).unwrap(), cut);
        assert!(matches!(StreamCut::from_text("!!!"), Err(ClientError::InvalidStreamCut(_))));
        let b = cut.to_bytes();
        for n in 0..b.len() {
            assert!(StreamCut::from_bytes(&b[..n]).is_err());
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(StreamCut::from_bytes(&extra).is_err());
        let mut wrong = b;
        wrong[0] = b'X';
        assert!(StreamCut::from_bytes(&wrong).is_err());
    }
}
