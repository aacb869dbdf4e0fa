//! Node configuration.

use crate::constants::*;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Shard k listens on this address with port + k.
    pub listen: SocketAddr,
    /// Also listen on Unix sockets for clients on the same host: shard 0 on this path,
    /// shard k on `PATH.k` (standalone only).
    pub unix_socket: Option<PathBuf>,
    /// Permission bits of the Unix sockets (`None`: as the umask leaves them).
    pub unix_socket_mode: Option<u32>,
    /// Number of shards (executors), one per core.
    pub shards: u32,
    /// Pin shard k to CPU k.
    pub pin: bool,
    /// How long a shard with nothing to do keeps polling for work before it sleeps (zero:
    /// sleeps at once). Polling saves the wake-up of a sleeping core on the next request or
    /// I/O completion, at the price of CPU time while idle.
    pub idle_spin: std::time::Duration,
    /// Nice value each shard thread sets for itself at start (0: left alone).
    pub shard_nice: i32,
    pub containers_per_shard: u32,
    /// How segments are laid over containers. Standalone: read from (or, for a new data
    /// directory, written to) `containers/PLACEMENT` at start; cluster: the cluster's.
    pub placement: sluice_net::routing::Placement,
    pub log_file_bytes: u64,
    /// How new log files are prepared (zero-filled or only allocated).
    pub log_prefill: crate::container::core::Prefill,
    /// Freed log files each container keeps to reuse as later ones (with tier-2).
    pub log_spare_files: usize,
    pub flush_bytes_max: usize,
    pub cache_bytes_max: usize,
    pub pending_bytes_max: usize,
    pub frame_bytes_max: usize,
    pub node_name: String,
    /// The node's log flushes per second (split evenly over shards; 0: unlimited).
    pub flushes_per_second: u64,
    /// How long a container that is flushing small batches back to back waits before the
    /// next one, so that it carries more (zero: never waits).
    pub flush_linger: std::time::Duration,
    /// Log flushes a container may have in flight at once (1 or 2; see `IoPacer::with_flush_depth`).
    pub flush_depth: usize,
    /// Tier-2 store URL (`fs:DIR`); without one, log files are never freed.
    pub tier2: Option<String>,
    /// Per-container budget for log files on disk (with tier-2 only).
    pub log_bytes_max: u64,
    /// Size at which a tier-2 chunk is closed and the next one starts.
    pub chunk_bytes: u64,
    /// Data gathered in the current log file before the mover copies it.
    pub move_bytes_min: u64,
    /// Cluster mode: containers open as this node acquires them, and requests for other
    /// nodes' containers are redirected along these routes. `None`: standalone.
    pub cluster: Option<std::sync::Arc<crate::cluster::Routes>>,
    /// Window of the short append-rate average (the long one is five of them).
    pub rate_window: std::time::Duration,
    /// A segment forgets an idempotent writer idle this long (zero: never).
    pub writer_idle: std::time::Duration,
    /// Each shard scrubs its containers' logs this often (`None`: only when asked).
    pub scrub_every: Option<std::time::Duration>,
    /// Pace of a scheduled scrub, bytes per second per shard (0: unpaced).
    pub scrub_bytes_per_sec: u64,
    /// Recovery replays past damaged records of a current log file instead of refusing to
    /// start (see `CoreConfig::salvage`).
    pub salvage_damaged_log: bool,
}

impl EngineConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, shards: u32) -> Self {
        Self {
            data_dir,
            listen,
            unix_socket: None,
            unix_socket_mode: None,
            shards,
            pin: true,
            idle_spin: std::time::Duration::ZERO,
            shard_nice: 0,
            containers_per_shard: CONTAINERS_PER_SHARD_DEFAULT,
            placement: sluice_net::routing::Placement::Spread,
            log_file_bytes: LOG_FILE_BYTES_DEFAULT,
            log_prefill: Default::default(),
            log_spare_files: LOG_SPARE_FILES_DEFAULT,
            flush_bytes_max: FLUSH_BYTES_MAX_DEFAULT,
            cache_bytes_max: CACHE_BYTES_MAX_DEFAULT,
            pending_bytes_max: PENDING_BYTES_MAX_DEFAULT,
            frame_bytes_max: sluice_net::constants::FRAME_BYTES_MAX_DEFAULT,
            node_name: "standalone".into(),
            flushes_per_second: 0,
            flush_linger: std::time::Duration::ZERO,
            flush_depth: 2,
            tier2: None,
            log_bytes_max: LOG_BYTES_MAX_DEFAULT,
            chunk_bytes: CHUNK_BYTES_DEFAULT,
            move_bytes_min: MOVE_BYTES_MIN_DEFAULT,
            cluster: None,
            rate_window: std::time::Duration::from_secs(RATE_WINDOW_S_DEFAULT),
            writer_idle: std::time::Duration::from_secs(WRITER_IDLE_S_DEFAULT),
            scrub_every: None,
            scrub_bytes_per_sec: SCRUB_RATE_MB_DEFAULT * 1_000_000,
            salvage_damaged_log: false,
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
        if self.tier2.is_some() && self.log_bytes_max < 4 * self.log_file_bytes {
            return Err(format!(
                "the log budget ({} bytes) must hold at least 4 log files of {} bytes",
                self.log_bytes_max, self.log_file_bytes
            ));
        }
        if self.cluster.is_some() && self.tier2.is_none() {
            return Err("cluster mode needs a tier-2 store shared by all nodes (--tier2)".into());
        }
        if self.cluster.is_some() && self.unix_socket.is_some() {
            return Err("a Unix socket is for a standalone server (a cluster's clients reach every node by TCP)".into());
        }
        if self.chunk_bytes == 0 {
            return Err("the chunk size must be above zero".into());
        }
        if self.listen.port().checked_add(self.shards as u16 - 1).is_none() {
            return Err("listen port + shard count overflows".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EngineConfig {
        EngineConfig::new(PathBuf::from("d"), "127.0.0.1:9090".parse().unwrap(), 2)
    }

    #[test]
    fn a_unix_socket_is_for_a_standalone_server() {
        let mut c = cfg();
        c.unix_socket = Some(PathBuf::from("/tmp/s.sock"));
        assert!(c.validate().is_ok());
        c.tier2 = Some("fs:/tmp/t2".into());
        c.cluster = Some(std::sync::Arc::new(crate::cluster::Routes::new()));
        let e = c.validate().unwrap_err();
        assert!(e.contains("standalone"), "{e}");
        c.unix_socket = None;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_last_shard_port_must_exist() {
        let mut c = cfg();
        c.listen = "127.0.0.1:65535".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("overflows"));
    }
}
