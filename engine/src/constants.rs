//! Engine limits and defaults, units last.

/// Log block size: every flush writes whole blocks (the partly used last block of the log
/// again, with its earlier bytes unchanged, when a record starts inside it).
pub const BLOCK_BYTES: u64 = 4096;
/// Records are packed: each starts at the next multiple of this after the one before.
pub const RECORD_ALIGN_BYTES: u64 = 8;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Bytes of a log file header (one block).
pub const FILE_HEADER_BYTES: u64 = BLOCK_BYTES;
/// Default size of one preallocated log file.
pub const LOG_FILE_BYTES_DEFAULT: u64 = 64 << 20;
/// Freed log files a container keeps to reuse (`--log-spare-files`).
pub const LOG_SPARE_FILES_DEFAULT: usize = 2;
/// Smallest allowed log file (tests use small files to exercise rolling).
pub const LOG_FILE_BYTES_MIN: u64 = 64 << 10;
/// Default cap on the bytes one group-commit flush takes (a single larger append still goes alone).
pub const FLUSH_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Default read-cache budget per container.
pub const CACHE_BYTES_MAX_DEFAULT: usize = 32 << 20;
/// Default number of containers per shard (a cluster node; engine tests).
pub const CONTAINERS_PER_SHARD_DEFAULT: u32 = 4;
/// Containers per shard of a new standalone data directory: one log per core, so a shard's
/// appends share its flushes (fewer, larger durable writes than four logs issue).
pub const STANDALONE_CONTAINERS_PER_SHARD: u32 = 1;
/// The read cache a shard's containers share by default, in MiB (`--cache-mb` unset): what
/// the default number of containers per shard has at the per-container default (128).
pub const SHARD_CACHE_MB_DEFAULT: u64 = (CACHE_BYTES_MAX_DEFAULT as u64 >> 20) * CONTAINERS_PER_SHARD_DEFAULT as u64;
/// With tier-2, the log space a shard's containers share by default, in MiB
/// (`--log-budget-mb` unset), likewise (4096).
pub const SHARD_LOG_BUDGET_MB_DEFAULT: u64 = (LOG_BYTES_MAX_DEFAULT >> 20) * CONTAINERS_PER_SHARD_DEFAULT as u64;
/// Parsed file indexes kept per container for reads that miss the cache.
pub const FILE_INDEXES_CACHED_MAX: usize = 4;
/// Bytes per write while zero-filling a new log file.
pub const PREFILL_CHUNK_BYTES: usize = 1 << 20;
/// Longest wait a reader may ask for at the tail.
pub const READ_WAIT_MS_MAX: u32 = 60_000;
/// Largest read reply payload.
pub const READ_BYTES_MAX: u32 = 8 << 20;
/// Bytes appended but not yet durable, per container, above which appends are refused (overloaded).
pub const PENDING_BYTES_MAX_DEFAULT: usize = 256 << 20;

/// Default per-container budget for log files when tier-2 is configured.
pub const LOG_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default tier-2 chunk size.
pub const CHUNK_BYTES_DEFAULT: u64 = 64 << 20;
/// Default amount of a segment's data gathered in the current log file before it is moved.
pub const MOVE_BYTES_MIN_DEFAULT: u64 = 1 << 20;
/// Pause between mover rounds with nothing to do.
pub const MOVE_INTERVAL_MS: u64 = 100;
/// Without tier-2: how often a container looks for log files it can free (their data
/// truncated or deleted).
pub const LOG_FREE_INTERVAL_MS: u64 = 1000;
/// The end of each log file kept for records that add no data (truncations, deletions,
/// seals, tier-2 bookkeeping): on a full disk, where the next file cannot be made, the
/// truncation or deletion that would free space still has room in the current one. At
/// most a sixteenth of the file.
pub const CONTROL_RESERVE_BYTES: u64 = 16 * BLOCK_BYTES;

/// Rounds up to the block size.
pub fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// `v` rounded down to a block boundary.
pub fn align_down(v: u64) -> u64 {
    v / BLOCK_BYTES * BLOCK_BYTES
}

/// Default TTL of a cluster node's etcd lease (seconds).
pub const NODE_LEASE_TTL_S: u64 = 6;
/// Default pause between the cluster agent's rounds (milliseconds).
pub const AGENT_POLL_MS: u64 = 200;
/// Window of the short append-rate average, in seconds (auto-scaling looks at it).
pub const RATE_WINDOW_S_DEFAULT: u64 = 120;
/// Bytes a merge reads from a transaction's shadow segment at a time.
pub const MERGE_READ_BYTES: u64 = 1 << 20;
/// Default idle time after which an idempotent writer is forgotten by a segment, in seconds
/// (one day, like Kafka's `producer.id.expiration.ms`).
pub const WRITER_IDLE_S_DEFAULT: u64 = 24 * 3600;
/// Default pace of a scheduled log scrub (`--scrub-rate-mb`), MB per second per shard.
pub const SCRUB_RATE_MB_DEFAULT: u64 = 50;
/// Images of whole log files a shard keeps to serve reads of them (see `container::io`):
/// with 64 MiB files, 128 MiB per shard.
pub const FILE_IMAGES_PER_SHARD: usize = 2;
