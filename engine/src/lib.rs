//! Sluice storage engine. A node runs one glommio executor per core ("shard"); each shard
//! owns a fixed set of segment containers and serves their segments over its own port.
//! Each container keeps a durable log of direct-IO files with group commit; an operation is
//! acknowledged only once the write that carries it is durable (O_DIRECT | O_DSYNC).
//!
//! - `log`: on-disk format, entries, checkpoints, file scanning (pure)
//! - `container`: the container state machine, cache, indexes, and its glommio I/O driver
//! - `shard`: executors, container placement, cross-shard messages, the node handle
//! - `server`: per-connection protocol handling on each shard
//! - `cluster`: cluster mode: the node agent (membership, container ownership, fencing)
//!   and the routes shards redirect by
//! - `remote`: node-to-node segment calls
//! - `stats`: each shard's own append and flush latencies (`GetStats`)

pub mod cluster;
pub mod config;
pub mod constants;
pub mod container;
pub mod error;
pub mod log;
pub mod remote;
pub mod server;
pub mod shard;
pub mod stats;

pub use config::EngineConfig;
pub use error::{EngineError, RecoveryError};
