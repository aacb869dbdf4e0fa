//! The `MetaStore` contract: get, put, compare-and-swap on versions, delete, prefix range.
//! Versions start at 1 for a new key and grow by one per change; "absent" is version 0.

use std::future::Future;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MetaError {
    #[error("version conflict on {key}: expected {expected}, found {actual}")]
    Conflict { key: String, expected: u64, actual: u64 },
    #[error("metadata store I/O error: {0}")]
    Io(String),
    #[error("metadata store is closed")]
    Closed,
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}

pub trait MetaStore: Send + Sync + Clone + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, MetaError>> + Send;
    /// Unconditional write; returns the new version.
    fn put(&self, key: &str, value: Vec<u8>) -> impl Future<Output = Result<u64, MetaError>> + Send;
    /// Writes only if the key's version is `expected` (0: the key must be absent).
    fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<u64, MetaError>> + Send;
    /// Deletes if the version is `expected` (`None`: whatever it is). Returns whether a key was removed.
    fn delete(&self, key: &str, expected: Option<u64>) -> impl Future<Output = Result<bool, MetaError>> + Send;
    /// All keys starting with `prefix`, in key order.
    fn range(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, Versioned)>, MetaError>> + Send;
}
