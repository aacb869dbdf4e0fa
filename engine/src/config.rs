//! Node configuration.

use crate::constants::*;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Shard k listens on this address with port + k.
    pub listen: SocketAddr,
    /// Number of shards (executors), one per core.
    pub shards: u32,
    /// Pin shard k to CPU k.
    pub pin: bool,
    pub containers_per_shard: u32,
    pub log_file_bytes: u64,
    pub flush_bytes_max: usize,
    pub cache_bytes_max: usize,
    pub pending_bytes_max: usize,
    pub frame_bytes_max: usize,
    pub node_name: String,
    /// The node's log flushes per second (split evenly over shards; 0: unlimited).
    pub flushes_per_second: u64,
}

impl EngineConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, shards: u32) -> Self {
        Self {
            data_dir,
            listen,
            shards,
            pin: true,
            containers_per_shard: CONTAINERS_PER_SHARD_DEFAULT,
            log_file_bytes: LOG_FILE_BYTES_DEFAULT,
            flush_bytes_max: FLUSH_BYTES_MAX_DEFAULT,
            cache_bytes_max: CACHE_BYTES_MAX_DEFAULT,
            pending_bytes_max: PENDING_BYTES_MAX_DEFAULT,
            frame_bytes_max: sluice_net::constants::FRAME_BYTES_MAX_DEFAULT,
            node_name: "standalone".into(),
            flushes_per_second: 0,
        }
    }

    pub fn container_count(&self) -> u32 {
        self.shards * self.containers_per_shard
    }

    /// Checks the combination of sizes.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.containers_per_shard == 0 {
            return Err("need at least one shard and one container per shard".into());
        }
        if self.log_file_bytes < LOG_FILE_BYTES_MIN || !self.log_file_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(format!(
                "log file size must be a multiple of {BLOCK_BYTES} and at least {LOG_FILE_BYTES_MIN} bytes"
            ));
        }
        if self.listen.port().checked_add(self.shards as u16 - 1).is_none() {
            return Err("listen port + shard count overflows".into());
        }
        Ok(())
    }
}
