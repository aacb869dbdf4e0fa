//! Tier-2 (long-term storage) interface. This crate holds only the `ChunkStore` contract
//! for now; the filesystem and HDFS backends and the mover arrive with the tier-2 issue.
//! Nothing in the engine calls it yet: until then all data stays in the container logs.

use bytes::Bytes;
use std::future::Future;

/// Failures of a chunk store, typed so the mover can decide what to retry.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0} not found")]
    NotFound(String),
    #[error("chunk {0} already exists")]
    AlreadyExists(String),
    #[error("chunk {name} belongs to epoch {owner}, above ours")]
    Fenced { name: String, owner: u64 },
    #[error("tier-2 unavailable: {0}")]
    Unavailable(String),
    #[error("tier-2 I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A store of named, append-only chunks (a filesystem directory, HDFS, ...).
pub trait ChunkStore {
    fn create(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>>;
    /// Writes `data` at `offset`, which must equal the chunk's current size.
    fn append(&self, name: &str, offset: u64, data: Bytes) -> impl Future<Output = Result<(), ChunkError>>;
    fn read(&self, name: &str, offset: u64, len: usize) -> impl Future<Output = Result<Bytes, ChunkError>>;
    fn seal(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>>;
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), ChunkError>>;
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, ChunkError>>;
    fn size(&self, name: &str) -> impl Future<Output = Result<u64, ChunkError>>;
}
