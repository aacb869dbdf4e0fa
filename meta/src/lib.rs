//! Metadata: the `MetaStore` trait (a small versioned key-value store), the embedded
//! durable backend used in standalone mode, the etcd backend for clusters, the conformance
//! suite both pass, name rules, and the controller functions that keep scope and stream
//! records (segments, key ranges, state) in a store.
//!
//! Thread model: a store handle is `Send + Sync + Clone`; its futures complete from the
//! store's own thread, so shard executors can await them without blocking.

/// Decodes (validating) an rkyv record read from key `$key`; a bad one is `MetaError::Corrupt`.
macro_rules! decode_record {
    ($t:ty, $key:expr, $bytes:expr) => {
        rkyv::from_bytes::<$t, rkyv::rancor::Error>($bytes)
            .map_err(|e| $crate::store::MetaError::Corrupt(format!("{}: {e}", $key)))
    };
}

pub mod cluster;
pub mod conformance;
pub mod controller;
pub mod embedded;
pub mod etcd;
pub mod names;
pub mod ownership;
pub mod store;

pub use controller::{Controller, StreamRecord, StreamState};
pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;
pub use store::{LeaseId, MetaError, MetaStore, MetaTxn, TxnOp, Versioned, Watch, WatchEvent};
