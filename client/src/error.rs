//! Client errors.

use sluice_net::{ErrorCode, ProtocolError};

#[derive(Debug, thiserror::Error, Clone)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to {0} lost")]
    ConnectionLost(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String, endpoint: Option<String>, offset: Option<u64> },
    #[error("unknown server error code {0}: {1}")]
    UnknownServerError(u16, String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid stream cut: {0}")]
    InvalidStreamCut(String),
    #[error("state synchronizer {name}: update still conflicting after {attempts} attempts")]
    SyncConflict { name: String, attempts: u32 },
    #[error("reader group {0} already exists")]
    GroupExists(String),
    #[error("no reader group {0}")]
    NoSuchGroup(String),
    #[error("reader {reader} is not in reader group {group}")]
    NotInGroup { group: String, reader: String },
    #[error("reader {reader} is already in reader group {group}")]
    AlreadyInGroup { group: String, reader: String },
    #[error("corrupt synchronizer state in {name}: {reason}")]
    SyncCorrupt { name: String, reason: String },
}

impl ClientError {
    /// The server error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The client's map of who serves what may be out of date: the node said so
    /// (`WrongHost`), or the node it names cannot be reached (it may be gone for good, its
    /// containers served elsewhere). Retries refresh the map first.
    pub fn map_may_be_stale(&self) -> bool {
        matches!(self, ClientError::Connect { .. }) || self.code() == Some(ErrorCode::WrongHost)
    }

    /// Worth retrying after reconnecting (the server may be restarting or shedding load).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::ConnectionLost(_) | ClientError::Timeout(_) => true,
            ClientError::Server { code, .. } => code.is_transient(),
            _ => false,
        }
    }
}
