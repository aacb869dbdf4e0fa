//! The `MetaStore` contract: get, put, compare-and-swap on versions, delete, prefix range,
//! watches and leases. Versions start at 1 for a new key and grow by one per change;
//! "absent" is version 0. A key put under a lease vanishes when the lease expires or is
//! revoked (a delete that watchers see).

use std::future::Future;
use std::time::Duration;

/// A change seen by a watch: a put (`value` is `Some`) or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub version: u64,
}

/// The changes under a prefix from the moment the watch was created, in order.
pub struct Watch {
    rx: futures::channel::mpsc::UnboundedReceiver<Result<WatchEvent, MetaError>>,
    /// Keeps the backend's side of the watch alive.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Watch {
    pub fn new(
        rx: futures::channel::mpsc::UnboundedReceiver<Result<WatchEvent, MetaError>>,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Self { rx, _guard: guard }
    }

    /// The next change (`None` when the store closed the watch).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, MetaError>> {
        futures::StreamExt::next(&mut self.rx).await
    }
}

/// Id of a lease.
pub type LeaseId = i64;

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put `value`; with a lease, the key lives as long as the lease.
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// An all-or-nothing change of several keys: every compare (key, expected version; 0:
/// absent) must hold, then every op applies, atomically (one etcd transaction; one record
/// of the embedded store's log). A key appears in at most one op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaTxn {
    pub compares: Vec<(String, u64)>,
    pub ops: Vec<TxnOp>,
}

impl MetaTxn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires `key` to be at `version` (0: absent).
    pub fn compare(mut self, key: impl Into<String>, version: u64) -> Self {
        self.compares.push((key.into(), version));
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(TxnOp::Put { key: key.into(), value, lease: None });
        self
    }

    pub fn put_leased(mut self, key: impl Into<String>, value: Vec<u8>, lease: LeaseId) -> Self {
        self.ops.push(TxnOp::Put { key: key.into(), value, lease: Some(lease) });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(TxnOp::Delete { key: key.into() });
        self
    }
}

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
    /// The disk is full: the change was not made (the store keeps working).
    #[error("no space left for metadata: {0}")]
    NoSpace(String),
    /// The store refuses a value this large (etcd: `--max-request-bytes`, 1.5 MiB by default).
    #[error("metadata record too large: {0}")]
    TooLarge(String),
    /// The store cannot be reached or did not answer in time (etcd down or restarting); a
    /// change may or may not have been made.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("metadata store is closed")]
    Closed,
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
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
    /// One page of `range`: keys starting with `prefix` and after `after` (`""`: from the
    /// first), at most `limit` of them, in key order. The last key returned is the next
    /// page's `after`; fewer than `limit` means there is no next page.
    fn range_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(String, Versioned)>, MetaError>> + Send;
    /// Changes to keys starting with `prefix` from now on.
    fn watch(&self, prefix: &str) -> impl Future<Output = Result<Watch, MetaError>> + Send;
    /// A lease that expires unless kept alive within `ttl` (backends may round it up to
    /// their minimum, e.g. whole seconds).
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, MetaError>> + Send;
    /// Renews a lease for another `ttl`; `LeaseNotFound` once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), MetaError>> + Send;
    /// Ends a lease now; its keys are deleted.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), MetaError>> + Send;
    /// Unconditional write of a key that lives as long as `lease`; returns the new version.
    fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> impl Future<Output = Result<u64, MetaError>> + Send;
    /// Applies `txn` if all its compares hold; `Conflict` names the first compare that did
    /// not (nothing applied), `LeaseNotFound` a put under a dead lease (nothing applied).
    fn txn(&self, txn: MetaTxn) -> impl Future<Output = Result<(), MetaError>> + Send;
}
