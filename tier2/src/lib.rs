//! Tier-2 (long-term storage): the `ChunkStore` contract, the filesystem backend, the
//! conformance suite every backend must pass, the chunk layout (`layout`), and `DynStore`,
//! the object-safe handle the engine's mover holds. The mover itself lives in the engine
//! (it runs on the shard that owns the container).
//!
//! Thread model: a store handle is `Send + Sync + Clone` and its futures complete from the
//! store's own threads, so shard executors (glommio) and tokio tasks can both await them
//! without blocking.

pub mod conformance;
pub mod fs;
pub mod hdfs;
pub mod layout;
pub mod sums;

use bytes::Bytes;
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;

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

/// An object-safe view of a `ChunkStore`, so a container can hold any backend.
pub trait DynChunkStore: Send + Sync {
    fn create<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>>;
    fn append<'a>(&'a self, name: &'a str, offset: u64, data: Bytes) -> BoxFuture<'a, Result<(), ChunkError>>;
    fn read<'a>(&'a self, name: &'a str, offset: u64, len: usize) -> BoxFuture<'a, Result<Bytes, ChunkError>>;
    fn seal<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>>;
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>>;
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, ChunkError>>;
    fn size<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, ChunkError>>;
    /// Where the store is, for messages (`fs:/data/tier2`).
    fn describe(&self) -> String;
}

/// A shared handle to some chunk store.
pub type DynStore = Arc<dyn DynChunkStore>;

macro_rules! dyn_store {
    ($t:ty, $describe:expr) => {
        impl DynChunkStore for $t {
            fn create<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>> {
                Box::pin(ChunkStore::create(self, name))
            }
            fn append<'a>(&'a self, name: &'a str, offset: u64, data: Bytes) -> BoxFuture<'a, Result<(), ChunkError>> {
                Box::pin(ChunkStore::append(self, name, offset, data))
            }
            fn read<'a>(&'a self, name: &'a str, offset: u64, len: usize) -> BoxFuture<'a, Result<Bytes, ChunkError>> {
                Box::pin(ChunkStore::read(self, name, offset, len))
            }
            fn seal<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>> {
                Box::pin(ChunkStore::seal(self, name))
            }
            fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ChunkError>> {
                Box::pin(ChunkStore::delete(self, name))
            }
            fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, ChunkError>> {
                Box::pin(ChunkStore::list(self, prefix))
            }
            fn size<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, ChunkError>> {
                Box::pin(ChunkStore::size(self, name))
            }
            fn describe(&self) -> String {
                let f: fn(&$t) -> String = $describe;
                f(self)
            }
        }
    };
}

dyn_store!(fs::FsChunkStore, |s| format!("fs:{}", s.root().display()));
dyn_store!(hdfs::HdfsChunkStore, |s| s.url().to_string());

/// Opens a store from its URL: `fs:DIR` (or a plain path), or `hdfs://namenode:port/path`.
pub fn open_url(url: &str) -> Result<DynStore, ChunkError> {
    if url.starts_with("hdfs://") {
        return Ok(Arc::new(hdfs::HdfsChunkStore::open(url)?));
    }
    let dir = url.strip_prefix("fs:").unwrap_or(url);
    if dir.is_empty() {
        return Err(ChunkError::Unavailable("empty tier-2 directory".into()));
    }
    Ok(Arc::new(fs::FsChunkStore::open(std::path::Path::new(dir), 4)?))
}
