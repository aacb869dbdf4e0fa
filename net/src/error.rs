//! Typed errors: wire error codes a client can act on, and codec failures.

use thiserror::Error;

/// Error codes carried by an `ErrorReply`. Each one names something a client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request reached a shard or node that does not own the container; `endpoint` says where to go.
    WrongHost = 1,
    NoSuchSegment = 2,
    NoSuchStream = 3,
    NoSuchScope = 4,
    /// The segment is sealed: no more appends.
    Sealed = 5,
    /// The read offset is below the segment's start offset (given in `offset`).
    Truncated = 6,
    /// A conditional append found another length (given in `offset`).
    ConditionalCheckFailed = 7,
    /// An event or request above the size limits.
    TooLarge = 8,
    /// The container hit an I/O failure and stopped accepting work until it is recovered.
    ContainerPoisoned = 9,
    /// The server sheds load; retry later.
    Overloaded = 10,
    /// Malformed request.
    BadRequest = 11,
    AlreadyExists = 12,
    InvalidName = 13,
    /// A scope that still has streams cannot be deleted.
    NotEmpty = 14,
    /// A stream must be sealed before it is deleted.
    StreamNotSealed = 15,
    /// Event numbers overlap in a way the server cannot reconcile.
    InvalidEventNumber = 16,
    UnsupportedVersion = 17,
    Internal = 18,
    /// The container's log is at its budget because tier-2 is behind or unavailable; retry later.
    Tier2Unavailable = 19,
    /// Another change of the same stream (a scaling) is in progress; retry when it is done.
    Conflict = 20,
    /// No transaction with that id on that stream (never opened, or forgotten).
    NoSuchTxn = 21,
    /// The transaction is not in a state that allows the request (committed, aborted,
    /// expired); the message says which.
    TxnNotOpen = 22,
    /// The node's disk is full: the container cannot create its next log file. Writes
    /// already queued wait; new ones are refused until space is freed; retry later.
    NoSpace = 23,
    /// The metadata store (etcd) cannot be reached or did not answer in time; the change may
    /// or may not have been made. Retry with backoff.
    MetadataUnavailable = 24,
    /// Stored data failed its checksum (a damaged tier-2 chunk): the bytes are not handed
    /// out. The message names the chunk and offset; the server logs them too.
    DataCorrupt = 25,
}

impl ErrorCode {
    /// A refusal that may pass if the request is sent again later (elsewhere, after a
    /// pause): writers resend what was refused with it. The server closes a connection after
    /// refusing an append with it, so that no later append sent on that connection is
    /// accepted before the resend (the resend would then be taken for a duplicate).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::WrongHost
                | ErrorCode::Overloaded
                | ErrorCode::Tier2Unavailable
                | ErrorCode::NoSpace
                | ErrorCode::MetadataUnavailable
                | ErrorCode::ContainerPoisoned
        )
    }

    pub fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => WrongHost,
            2 => NoSuchSegment,
            3 => NoSuchStream,
            4 => NoSuchScope,
            5 => Sealed,
            6 => Truncated,
            7 => ConditionalCheckFailed,
            8 => TooLarge,
            9 => ContainerPoisoned,
            10 => Overloaded,
            11 => BadRequest,
            12 => AlreadyExists,
            13 => InvalidName,
            14 => NotEmpty,
            15 => StreamNotSealed,
            16 => InvalidEventNumber,
            17 => UnsupportedVersion,
            18 => Internal,
            19 => Tier2Unavailable,
            20 => Conflict,
            21 => NoSuchTxn,
            22 => TxnNotOpen,
            23 => NoSpace,
            24 => MetadataUnavailable,
            25 => DataCorrupt,
            _ => return None,
        })
    }
}

/// Failures decoding frames or control archives.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame length {len} is shorter than the header")]
    FrameTooShort { len: usize },
    #[error("control section of {control} bytes does not fit a frame of {len} bytes")]
    ControlOverrun { control: usize, len: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: crate::messages::Kind, got: crate::messages::Kind },
    #[error("invalid control archive for {kind:?}: {reason}")]
    InvalidArchive { kind: crate::messages::Kind, reason: String },
    #[error("frame is cut short")]
    Truncated,
}
