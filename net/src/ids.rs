//! Newtypes for the ids and positions that cross the wire.

use std::fmt;

/// Segment container index within a node or cluster (0..container_count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(pub u32);

/// Container epoch: grows every time a container is (re)opened; a fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

/// Log sequence number of a record in a container log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

/// Byte offset inside a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Offset(pub u64);

/// Id of an idempotent writer (random, chosen by the client). Zero means "no writer".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WriterId(pub u128);

/// Number a writer gives its events; strictly increasing per writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventNumber(pub u64);

/// A segment's number inside its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentNumber(pub u64);

/// `scope/stream`, validated by the metadata layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedStream {
    pub scope: String,
    pub stream: String,
}

impl ScopedStream {
    pub fn new(scope: impl Into<String>, stream: impl Into<String>) -> Self {
        Self { scope: scope.into(), stream: stream.into() }
    }

    /// Parses `scope/stream`.
    pub fn parse(s: &str) -> Option<Self> {
        let (scope, stream) = s.split_once('/')?;
        if scope.is_empty() || stream.is_empty() || stream.contains('/') {
            return None;
        }
        Some(Self::new(scope, stream))
    }

    /// Qualified name of one of this stream's segments: `scope/stream/number`.
    pub fn segment_name(&self, number: SegmentNumber) -> String {
        format!("{}/{}/{}", self.scope, self.stream, number.0)
    }

    /// The stream and number of the segment named `scope/stream/number` (`segment_name`'s
    /// inverse); `None` for any other name.
    pub fn of_segment(name: &str) -> Option<(Self, SegmentNumber)> {
        let (stream, number) = split_segment_name(name)?;
        Some((Self::parse(stream)?, number))
    }
}

/// Splits a segment's name `scope/stream/number` into `scope/stream` (not checked further)
/// and the number; `None` if it does not end in `/` and a number of digits only (a
/// transaction's shadow segment, `scope/stream/N#txn.<id>`, included).
pub fn split_segment_name(name: &str) -> Option<(&str, SegmentNumber)> {
    let (stream, number) = name.rsplit_once('/')?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stream, SegmentNumber(number.parse().ok()?)))
}

impl fmt::Display for ScopedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_split_into_stream_and_number() {
        let s = ScopedStream::new("sc", "st");
        let name = s.segment_name(SegmentNumber(42));
        assert_eq!(split_segment_name(&name), Some(("sc/st", SegmentNumber(42))));
        assert_eq!(ScopedStream::of_segment(&name), Some((s, SegmentNumber(42))));
        let shadow = crate::txn::shadow_segment_name("sc", "st", 42, 7);
        for other in ["sc/st", "sc/st/", "sc/st/+4", "sc/st/4x", "42", &shadow, "sc/st/99999999999999999999"] {
            assert_eq!(split_segment_name(other), None, "{other}");
        }
        // The stream part is checked by `of_segment` only.
        assert_eq!(split_segment_name("a/b/c/1"), Some(("a/b/c", SegmentNumber(1))));
        assert_eq!(ScopedStream::of_segment("a/b/c/1"), None);
    }
}
