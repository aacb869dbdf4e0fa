//! Tier-2 (long-term storage): the `ChunkStore` contract, the filesystem backend, and the
//! conformance suite every backend must pass. The mover that streams sealed log data into
//! chunks, the layout of chunks per segment, and the HDFS backend come with the rest of the
//! tier-2 issue; nothing in the engine calls this crate yet.
//!
//! Thread model: a store handle is `Send + Sync + Clone` and its futures complete from the
//! store's own threads, so shard executors (glommio) and tokio tasks can both await them
//! without blocking.

pub mod conformance;
pub mod fs;

use bytes::Bytes;
use std::future::Future;

/// Failures of a chunk store, typed so the mover can decide what to retry.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk {0} not found")]
    NotFound(String),
    #[error("chunk {0} already exists")]
    AlreadyExists(String),
    /// An append at an offset other than the chunk's size, or to a sealed chunk: someone
    /// else wrote it (a newer owner), or the caller lost track.
    #[error("chunk {name}: {reason}")]
    Fenced { name: String, reason: String },
    #[error("invalid chunk name {0:?}")]
    InvalidName(String),
    #[error("tier-2 unavailable: {0}")]
    Unavailable(String),
    #[error("tier-2 I/O error: {0}")]
    Io(String),
}

/// A store of named, append-only chunks (a filesystem directory, HDFS, ...). Names are
/// relative paths of `/`-separated components of `[A-Za-z0-9._-]`, none `.` or `..`.
pub trait ChunkStore: Send + Sync + Clone + 'static {
    /// Creates an empty chunk; fails with `AlreadyExists` if the name is taken (exclusive,
    /// so two writers can never both own a chunk).
    fn create(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>> + Send;
    /// Appends `data` at `offset`, which must equal the chunk's size; durable on return.
    fn append(&self, name: &str, offset: u64, data: Bytes) -> impl Future<Output = Result<(), ChunkError>> + Send;
    /// Reads up to `len` bytes from `offset` (fewer at the end).
    fn read(&self, name: &str, offset: u64, len: usize) -> impl Future<Output = Result<Bytes, ChunkError>> + Send;
    /// Makes the chunk read-only; later appends fail with `Fenced`.
    fn seal(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>> + Send;
    fn is_sealed(&self, name: &str) -> impl Future<Output = Result<bool, ChunkError>> + Send;
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>> + Send;
    /// Names starting with `prefix`, sorted.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, ChunkError>> + Send;
    fn size(&self, name: &str) -> impl Future<Output = Result<u64, ChunkError>> + Send;
    fn exists(&self, name: &str) -> impl Future<Output = Result<bool, ChunkError>> + Send;
}

/// Checks a chunk name.
pub fn validate_name(name: &str) -> Result<(), ChunkError> {
    let ok = !name.is_empty()
        && name.len() <= 1024
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        });
    if ok { Ok(()) } else { Err(ChunkError::InvalidName(name.to_string())) }
}
