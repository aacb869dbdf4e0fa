//! Engine errors. Operating errors are typed; each maps to a wire code a client can act on.

use sluice_net::ErrorCode;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("no such segment: {0}")]
    NoSuchSegment(String),
    #[error("segment {0} already exists")]
    SegmentExists(String),
    #[error("segment {0} is sealed")]
    Sealed(String),
    #[error("offset {offset} is below the start offset {start} of segment {segment}")]
    Truncated { segment: String, offset: u64, start: u64 },
    #[error("conditional append failed: segment {segment} has length {actual}, expected {expected}")]
    ConditionalCheckFailed { segment: String, expected: u64, actual: u64 },
    #[error("{0}")]
    TooLarge(String),
    #[error("container {container} is poisoned after an I/O failure: {reason}")]
    Poisoned { container: u32, reason: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The log reached its budget because tier-2 is behind or unavailable.
    #[error("tier-2 unavailable or behind: {0}")]
    LogFull(String),
    /// The disk is full: the next log file cannot be created.
    #[error("no space left for the log: {0}")]
    NoSpace(String),
    /// A read from tier-2 failed.
    #[error("tier-2 read failed: {0}")]
    Tier2(String),
    /// Bytes read back failed their checksum.
    #[error("damaged data: {0}")]
    DataCorrupt(String),
    /// A damaged log record holds the data read; the segment's sound data resumes at
    /// `resume` (its length if nothing follows).
    #[error("damaged data: {message}")]
    DamagedLog { message: String, resume: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("invalid event number: {0}")]
    InvalidEventNumber(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// The container is not (or no longer) served here: it moved, or this node was fenced.
    #[error("container {container} is not served here: {reason}")]
    NotOwner { container: u32, reason: String },
    /// Another node did not answer a node-to-node call.
    #[error("node unreachable: {0}")]
    Unreachable(String),
}

impl EngineError {
    /// Wire code and the optional offset detail.
    pub fn code(&self) -> (ErrorCode, Option<u64>) {
        match self {
            EngineError::NoSuchSegment(_) => (ErrorCode::NoSuchSegment, None),
            EngineError::SegmentExists(_) => (ErrorCode::AlreadyExists, None),
            EngineError::Sealed(_) => (ErrorCode::Sealed, None),
            EngineError::Truncated { start, .. } => (ErrorCode::Truncated, Some(*start)),
            EngineError::ConditionalCheckFailed { actual, .. } => (ErrorCode::ConditionalCheckFailed, Some(*actual)),
            EngineError::TooLarge(_) => (ErrorCode::TooLarge, None),
            EngineError::Poisoned { .. } => (ErrorCode::ContainerPoisoned, None),
            EngineError::Overloaded(_) => (ErrorCode::Overloaded, None),
            EngineError::LogFull(_) | EngineError::Tier2(_) => (ErrorCode::Tier2Unavailable, None),
            EngineError::NoSpace(_) => (ErrorCode::NoSpace, None),
            EngineError::DataCorrupt(_) => (ErrorCode::DataCorrupt, None),
            EngineError::DamagedLog { resume, .. } => (ErrorCode::DataCorrupt, Some(*resume)),
            EngineError::BadRequest(_) => (ErrorCode::BadRequest, None),
            EngineError::InvalidEventNumber(_) => (ErrorCode::InvalidEventNumber, None),
            EngineError::Io(_) => (ErrorCode::Internal, None),
            EngineError::NotOwner { .. } => (ErrorCode::WrongHost, None),
            EngineError::Unreachable(_) => (ErrorCode::Internal, None),
        }
    }
}

/// Why a container log cannot be recovered. Recovery refuses to start rather than lose
/// acknowledged data.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "corrupt log {file}: invalid record at byte {offset} is followed by a valid record at byte {valid_at}; \
         this is damage to acknowledged data, not a torn write. Refusing to start; inspect with `sluice log dump`, \
         or start with --salvage-damaged-log to serve every sound record (the damaged ones are lost)"
    )]
    Corrupt { file: PathBuf, offset: u64, valid_at: u64 },
    #[error("log {file}: {reason}")]
    Invalid { file: PathBuf, reason: String },
    #[error("I/O error on {file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
}
