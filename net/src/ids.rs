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
}

impl fmt::Display for ScopedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.stream)
    }
}
