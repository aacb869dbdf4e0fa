//! The `sluice` binary: `standalone` runs a single node (engine shards + embedded metadata
//! store); every other subcommand is a client of a running node (admin, write, read), except
//! `log dump`, which reads a container log directory offline.

mod autoscale;
mod dump;
mod io;
mod retention;
mod rg;
mod scrub;
mod stats;
mod txn;
mod txns;
mod verify;

use clap::{Parser, Subcommand};
use sluice_client::{Client, ClientError};
use sluice_net::{Retention, ScalingPolicy, ScopedStream};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: durable, ordered event streams", long_about = None)]
struct Cli {
    /// Server address (any shard of the node): `HOST:PORT`, or `unix:PATH` for a server on
    /// this host started with `--unix-socket PATH` (no TCP stack on the way: less CPU and
    /// latency per request).
    #[arg(long, global = true, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
    url: String,
    /// How long a command keeps retrying while the server is unreachable, restarting or out
    /// of disk space (seconds; after 2 s a warning says what it is waiting for).
    #[arg(long, global = true, env = "SLUICE_RETRY_FOR", default_value_t = 60, value_name = "SECS")]
    retry_for: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a single node with an embedded metadata store.
    Standalone(StandaloneArgs),
    /// Run a node of a cluster: metadata and container ownership in etcd, data handed
    /// between nodes through a tier-2 store they all share (--tier2 is required).
    Node(NodeArgs),
    /// Manage scopes.
    #[command(subcommand)]
    Scope(ScopeCmd),
    /// Manage streams.
    #[command(subcommand)]
    Stream(StreamCmd),
    /// Write events: one per stdin line, or generated with --count.
    Write(io::WriteArgs),
    /// Read events and print one per line.
    Read(io::ReadArgs),
    /// Reader groups: readers sharing a stream, with checkpoints.
    #[command(subcommand)]
    Rg(rg::RgCmd),
    /// Transactions: list, describe, commit or abort them; write one from stdin.
    #[command(subcommand)]
    Txn(txn::TxnCmd),
    /// Container logs: check them on a running node (scrub), or list them offline (dump).
    #[command(subcommand)]
    Log(LogCmd),
    /// Cluster metadata in etcd.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Each shard's own latency figures since they were last reset: appends (from the shard
    /// taking the request up until its acknowledgement is ready: the wait for the flush in
    /// flight, then its own) and log flushes (write and sync). A client's latency minus
    /// these is the network and the client's own scheduling. Then each container's state:
    /// its log's size and anything wrong (stopped, disk full, tier-2 mover failing, reads
    /// refused on damaged data, damage found by its last log scrub, what a start with
    /// --salvage-damaged-log lost). In a cluster: every node serving containers, whichever
    /// node --url names.
    Stats(stats::StatsArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Show a cluster's settings and live nodes, as recorded in etcd.
    Status {
        /// etcd endpoint(s), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
        etcd: Vec<String>,
        /// Cluster name (its keys live under /sluice/NAME/).
        #[arg(long, default_value = "default")]
        cluster: String,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// etcd endpoint(s), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    /// Cluster name (its keys live under /sluice/NAME/). The first node fixes the cluster's
    /// container count (cores x --containers-per-core); a node with another count refuses
    /// to join.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// This node's id, unique in the cluster and stable across restarts (a node takes back
    /// the containers it served before a crash).
    #[arg(long)]
    node_id: String,
    /// TTL of the node's etcd lease, in seconds. A node that cannot renew its lease for
    /// two thirds of this stops serving its containers.
    #[arg(long, default_value_t = sluice_engine::constants::NODE_LEASE_TTL_S)]
    lease_ttl_s: u64,
    /// At start, how long to keep retrying an unreachable etcd before giving up, in seconds.
    #[arg(long, default_value_t = 60)]
    etcd_wait_s: u64,
    #[command(flatten)]
    engine: StandaloneArgs,
}

#[derive(clap::Args)]
struct StandaloneArgs {
    /// Where logs and metadata live.
    #[arg(long, default_value = "sluice-data")]
    data_dir: PathBuf,
    /// Address of shard 0; shard k listens on port + k.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Also listen on Unix sockets, for clients on this host (`--url unix:PATH`): shard 0 on
    /// PATH, shard k on PATH.k. A socket left by a server that died is replaced; one a live
    /// server listens on is not. Who may connect follows the socket's mode (the umask) and
    /// its directory's permissions (see --unix-socket-mode). Standalone only.
    #[arg(long, value_name = "PATH")]
    unix_socket: Option<PathBuf>,
    /// With --unix-socket: the sockets' permission bits, in octal (e.g. 660 lets the
    /// server's group connect; connecting needs write permission). Default: as the umask
    /// leaves them (0755 with umask 022: only the server's user).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode, requires = "unix_socket")]
    unix_socket_mode: Option<u32>,
    /// Number of shards (one pinned executor per core). Default: all cores.
    #[arg(long)]
    cores: Option<u32>,
    /// Segment containers per shard, each with its own log. Fixed for the life of the data
    /// directory: by default, what the directory was created with. A new directory gets 1
    /// for `standalone` (one log per core: fewer, larger durable writes; at 470k x 1 KB
    /// events/s over 16 segments the ack p99 was a third of four containers') and 4 for a
    /// cluster `node` (containers are what nodes hand between them).
    #[arg(long)]
    containers_per_core: Option<u32>,
    /// Size of each preallocated log file, in MiB.
    #[arg(long, default_value_t = 64)]
    log_file_mb: u64,
    /// How new log files are prepared. `always`: zero-filled, so durable writes into them
    /// need no file-system metadata write (lowest latency for small writes, but under
    /// sustained load the disk writes every byte twice); `never`: only allocated; `auto`:
    /// zero-filled at light load (flushes averaging under 128 KiB while the shard writes
    /// under 32 MiB/s to its logs), only allocated otherwise. Where the file system and device zero blocks without
    /// moving data (Linux 6.17+ FALLOC_FL_WRITE_ZEROES), zero-filling is free and used.
    #[arg(long, default_value = "auto", value_parser = sluice_engine::container::core::Prefill::parse)]
    log_prefill: sluice_engine::container::core::Prefill,
    /// Freed log files (their data moved to tier-2, or truncated or deleted) each container
    /// keeps to reuse as its next ones, instead of deleting them and creating new files. A
    /// reused file's blocks are written already, so durable writes into it need no
    /// file-system metadata write (as in a zero-filled file) and nothing is zero-filled; its
    /// old records stay behind the new ones until overwritten. Each spare is a whole log
    /// file on disk (beyond --log-budget-mb with tier-2). 0 turns reuse off.
    #[arg(long, default_value_t = sluice_engine::constants::LOG_SPARE_FILES_DEFAULT)]
    log_spare_files: usize,
    /// Read cache per container, in MiB. Default: 128 per shard, shared by its containers
    /// (128 with one container per core, 32 with four).
    #[arg(long)]
    cache_mb: Option<usize>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Microseconds a shard with nothing to do keeps polling before it sleeps (0: sleep at
    /// once). With cores to spare, 100–1000 saves the wake-up of a sleeping core on each
    /// request and disk completion at light load (one event in flight: p50 about 40 µs lower
    /// here), but a shard then burns CPU while idle, which a client on the same cores feels.
    #[arg(long, default_value_t = 0)]
    idle_spin_us: u64,
    /// Nice value of the shard threads (-20 to 19; 0 leaves them as started). On a host
    /// whose clients keep the cores busy, a negative value lets a shard run as soon as its
    /// disk write or request arrives instead of after a client's time slice: 470k x 1 KB
    /// events/s over 16 segments with the client on the same two cores, -5 gave ack p99
    /// 5.4–6.7 ms against 7.0–14.2 ms. Below 0 needs CAP_SYS_NICE (root) or a fitting
    /// RLIMIT_NICE; a start that cannot set it fails.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    shard_nice: i32,
    /// Hours after which a segment forgets an idempotent writer that stopped appending to
    /// it (0: never). Writers resend only within their retry window (a minute by default;
    /// keep this above it), so a day is ample; forgetting keeps memory and checkpoints from
    /// growing with every writer that ever wrote.
    #[arg(long, default_value_t = sluice_engine::constants::WRITER_IDLE_S_DEFAULT / 3600)]
    writer_idle_hours: u64,
    /// Scrub the log on a schedule: every shard reads its containers' log files back from
    /// the disk and checks every record this often (e.g. `7d`, `12h`, `30m`, `90s`), so that
    /// damage is found before a reader or a restart needs the bytes; findings go to the
    /// server's log as errors. Off by default; `sluice log scrub` runs one at any time.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_interval)]
    scrub_every: Option<Duration>,
    /// Start even if a container's current log file has damaged records with sound ones
    /// after them (acknowledged data was damaged; without this flag the node refuses to
    /// start and names the file and byte). Every sound record is replayed; each segment that
    /// lost appends keeps a hole where they were (reads there fail as damaged data and say
    /// where the data resumes); what was lost is logged as errors and shown by `sluice stats`
    /// until the node restarts. The damaged bytes stay in the file for inspection (`sluice
    /// log dump`). Appends whose segment had no later append are lost without a hole; the
    /// report names the open segments with no entry after the lost records, and those of
    /// them the controller has sealed (a seal lost too) are sealed again; a stream's segment
    /// whose creation was lost is created again, empty. With --tier2,
    /// the mover likewise moves past damaged log data (found at start or later) instead of
    /// stopping there, so the log is freed; the skipped bytes read as damage. The same for
    /// the standalone metadata log (`meta/meta.log`) damaged before later durable changes: it
    /// is kept whole as `meta.log.damaged` and cut at the damage (the changes after it are
    /// lost).
    #[arg(long)]
    salvage_damaged_log: bool,
    /// Most MB a scheduled scrub reads per second on each shard (0: as fast as the disk goes).
    #[arg(long, default_value_t = sluice_engine::constants::SCRUB_RATE_MB_DEFAULT, value_name = "MB")]
    scrub_rate_mb: u64,
    /// Log flushes per second for the whole node (0: unlimited). Under load each flush then
    /// carries more events, so the I/O rate stays within a device's budget: set it below the
    /// IOPS a rate-limited volume allows, or its throttling adds whole refill periods to
    /// latency.
    #[arg(long, default_value_t = 0)]
    iops_limit: u64,
    /// Microseconds a container busy with small appends waits before each flush, so that
    /// the flush carries more events (0: flush as soon as the previous one is done). Only a
    /// flush that follows another at once waits, and only for a batch under 64 KiB: light
    /// load and large batches never wait. On a disk whose synchronous writes are the limit
    /// (many small events, few cores), 100–300 trades that much median latency for fewer
    /// writes and a lower tail; see docs/BENCHMARKS.md.
    #[arg(long, default_value_t = 0)]
    flush_linger_us: u64,
    /// Log flushes a container may have in flight at once: 2 lets a flush begin while the
    /// one before it is being written (its record starts a block of its own), so an append
    /// waits for one write rather than for the rest of the write in flight and then its own;
    /// 1 writes one flush at a time (fewer, larger writes: for a disk that serves two writes
    /// at once no faster than one after the other). On the 2-core VM of docs/BENCHMARKS.md, 2
    /// lowered the server's append latency and the clients' median p99 at half load, at the
    /// same top rate. With --iops-limit or --flush-linger-us it is always 1.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=2))]
    flush_depth: u64,
    /// Long-term storage (tier-2): `fs:DIR` (a local or NFS directory) or
    /// `hdfs://namenode:port/path`. The mover copies segment data there and frees log files,
    /// so streams can outgrow the local disk and are read seamlessly from either tier.
    /// Without it, log files are never freed.
    #[arg(long, value_name = "fs:DIR|hdfs://HOST:PORT/PATH")]
    tier2: Option<String>,
    /// With --tier2: log space per container, in MiB. When tier-2 is down or slow and the
    /// log reaches it, appends fail with `tier2 unavailable` until the mover catches up.
    /// Default: 4096 per shard, shared by its containers (4096 with one container per core,
    /// 1024 with four), and at least four log files.
    #[arg(long)]
    log_budget_mb: Option<u64>,
    /// With --tier2: size of a tier-2 chunk file, in MiB.
    #[arg(long, default_value_t = 64)]
    chunk_mb: u64,
    /// With --tier2: a segment's data in the current log file is moved once this many KiB
    /// have gathered (older log files and sealed segments are moved at once).
    #[arg(long, default_value_t = 1024)]
    move_min_kb: u64,
    /// How often the retention service looks at every stream with a policy, in ms (an idle
    /// stream under a size policy, with nothing to cut, is not looked at again until it
    /// writes or its policy changes). A stream is looked at sooner when it needs it (a size
    /// policy's once it may have written a 64th of its MAX, or half its MAX − MIN, at its last
    /// rate; a time policy's every 128th of its MAX; at most every 100 ms, or once an interval
    /// if that is shorter), so a fast stream outgrows its MAX by about 100 ms of writes; and
    /// every second the service lists the streams with their policies and reads the open
    /// segments' lengths (a request per shard), so a new policy, or a slow or idle stream that
    /// starts writing fast, is seen within a second, not at its next look.
    #[arg(long, default_value_t = 30_000)]
    retention_interval_ms: u64,
    /// How often the auto-scaler looks at streams with an automatic scaling policy, in ms.
    #[arg(long, default_value_t = 10_000)]
    autoscale_interval_ms: u64,
    /// Window of the short append-rate average, in seconds (the long one is five windows).
    /// Auto-scaling splits on the short average and merges when both are low.
    #[arg(long, default_value_t = 120)]
    rate_window_s: u64,
    /// Least time between two automatic scalings of a stream, in seconds.
    #[arg(long, default_value_t = 300)]
    scale_cooldown_s: u64,
    /// How often the transaction service aborts expired transactions and finishes stalled
    /// commits, in ms.
    #[arg(long, default_value_t = 1_000)]
    txn_interval_ms: u64,
    /// How long committed and aborted transactions stay listed (`sluice txn list`), in seconds.
    #[arg(long, default_value_t = 3_600)]
    txn_keep_s: u64,
}

#[derive(Subcommand)]
enum ScopeCmd {
    /// Create a scope.
    Create { scope: String },
    /// Delete an empty scope.
    Delete { scope: String },
    /// List scopes.
    List,
}

#[derive(Subcommand)]
enum StreamCmd {
    /// Create a stream with a fixed number of segments.
    Create {
        /// scope/stream
        stream: String,
        #[arg(long, default_value_t = 1)]
        segments: u32,
        /// none, time:MIN[,MAX] (e.g. time:7d or time:12h,1d) or size:MIN[,MAX] (e.g.
        /// size:10G,12G): keep at least MIN; once more than MAX (default MIN) is held, the
        /// server truncates the stream back to about MIN. Without --tier2 the disk space
        /// comes back once no stream of the same log still needs the oldest log files
        /// (streams without retention keep theirs: give those a tier-2).
        #[arg(long, default_value = "none", value_parser = parse_retention)]
        retention: Retention,
        /// fixed:N, events:RATE,FACTOR,MIN or bytes:KBPS,FACTOR,MIN. Automatic policies
        /// split a segment above RATE events/s (or KBPS KiB/s) into up to FACTOR parts and
        /// merge cold neighbours, never below MIN segments. Default: fixed at --segments.
        #[arg(long, value_parser = ScalingPolicy::parse)]
        scaling: Option<ScalingPolicy>,
    },
    /// Change a live stream's retention and/or scaling policy.
    Update {
        /// scope/stream
        stream: String,
        /// none, time:MIN[,MAX] or size:MIN[,MAX], as for `stream create`.
        #[arg(long, value_parser = parse_retention)]
        retention: Option<Retention>,
        /// fixed (keep the current segments), events:RATE,FACTOR,MIN or bytes:KBPS,FACTOR,MIN.
        #[arg(long, value_parser = parse_scaling_update)]
        scaling: Option<ScalingPolicy>,
    },
    /// Delete everything before a stream cut (from `sluice stream cut` or a reader-group
    /// checkpoint), or one segment's bytes before an offset (`--segment N --offset O`);
    /// reads below it then fail with `truncated`. The second form is the remedy for a
    /// damaged log record that holds the tier-2 mover: truncate the segment at the offset
    /// where its sound data resumes (the mover's error in `sluice stats` names both).
    #[command(group(clap::ArgGroup::new("where").required(true).args(["at", "segment"])))]
    Truncate {
        /// scope/stream
        stream: String,
        /// The cut, as text.
        #[arg(long)]
        at: Option<String>,
        /// The segment's number (the last part of its name, `scope/stream/N`).
        #[arg(long, requires = "offset")]
        segment: Option<u64>,
        /// With --segment: the offset the segment keeps its bytes from.
        #[arg(long, requires = "segment")]
        offset: Option<u64>,
    },
    /// List the streams of a scope, a name a line.
    List {
        scope: String,
        /// Also show each stream's state, retention policy and scaling policy (columns).
        #[arg(long, short = 'l')]
        long: bool,
    },
    /// Show a stream's segments, key ranges, lengths and state, and its epoch history.
    Describe { stream: String },
    /// Scale a stream by hand: split one segment into equal key ranges, or merge adjacent
    /// segments into one. Writers follow on their own; readers finish the old segments
    /// before they read the new ones, so per-key order holds.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["split", "merge"])))]
    Scale {
        /// scope/stream
        stream: String,
        /// SEG[:N]: split active segment SEG into N (default 2, at most 64) equal ranges.
        #[arg(long, value_parser = parse_split)]
        split: Option<(u64, u32)>,
        /// SEG,SEG[,...]: merge adjacent active segments into one.
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        merge: Option<Vec<u64>>,
    },
    /// Seal a stream: no more writes.
    Seal { stream: String },
    /// Delete a sealed stream and its data.
    Delete { stream: String },
    /// Read every byte of a stream, in every segment it ever had, to find damage before a
    /// reader does: tier-2 data is checked against its chunks' checksums by the server (each
    /// damaged MiB is reported; two in one 4 MiB block show as the first), event framing by
    /// this command. Exits non-zero when anything is damaged. Log data is checked when the
    /// server scans a log file (recovery, first read of an older file), not here.
    Verify(verify::VerifyArgs),
    /// Print a stream cut (a position in every segment) as text.
    Cut {
        stream: String,
        #[arg(long, value_enum, default_value = "tail")]
        at: CutPos,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CutPos {
    Head,
    Tail,
}

#[derive(Subcommand)]
enum LogCmd {
    /// Have the running node read every container's log files back from the disk and check
    /// every record (checksums, the record chain across files, the acknowledged tail), so
    /// that damage is found before a reader or a restart needs the bytes. In a cluster,
    /// each container is scrubbed on the node serving it. Exit status 1 on damage.
    Scrub(scrub::ScrubArgs),
    /// List the records of a container log (a container directory, or a data directory).
    Dump {
        dir: PathBuf,
        /// Also list every entry of every batch.
        #[arg(long)]
        entries: bool,
    },
}

/// `sluice cluster status`: settings and live nodes from etcd.
fn cluster_status(etcd: &[String], cluster: &str) -> Result<(), String> {
    use sluice_meta::cluster::cluster_config;
    let store = sluice_meta::EtcdStore::connect(etcd, cluster).map_err(|e| e.to_string())?;
    let (config, view, controller) = futures::executor::block_on(async {
        let config = cluster_config(&store).await.map_err(|e| e.to_string())?;
        let view = sluice_meta::ownership::OwnershipView::read(&store).await.map_err(|e| e.to_string())?;
        let controller = sluice_meta::ownership::controller(&store).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((config, view, controller))
    })
    .map_err(|e| format!("cluster {cluster} at etcd {}: {e}", etcd.join(",")))?;
    let count = match config {
        None => {
            println!("cluster {cluster}: not created (no node has joined it)");
            0
        }
        Some(c) => {
            println!("cluster {cluster}: {} containers, {} placement", c.containers, c.placement.name());
            c.containers
        }
    };
    println!("controller: {}", controller.map_or("none elected".to_string(), |c| c.node));
    println!("{} live node(s)", view.nodes.len());
    for n in &view.nodes {
        let serving = view.owners.values().filter(|o| o.node == n.node_id).count();
        let state = if n.draining { ", draining" } else { "" };
        println!("  {}  {}  ({serving} containers{state})", n.node_id, n.endpoints.join(", "));
    }
    if count > 0 {
        println!("{:>9}  {:>6}  {:<16}  state", "container", "epoch", "owner");
        for c in 0..count {
            let (epoch, owner, state) = match (view.records.get(&c), view.owners.get(&c)) {
                (_, Some(o)) => (o.epoch.to_string(), o.node.clone(), "serving"),
                (Some((r, _)), None) if r.released => (r.epoch.to_string(), r.owner.clone(), "released (moving)"),
                (Some((r, _)), None) => (r.epoch.to_string(), r.owner.clone(), "owner down: waiting for it"),
                (None, None) => ("-".into(), "-".into(), "never assigned"),
            };
            println!("{c:>9}  {epoch:>6}  {owner:<16}  {state}");
        }
    }
    Ok(())
}

fn parse_retention(s: &str) -> Result<Retention, String> {
    Retention::parse(s)
}

fn parse_stream(s: &str) -> Result<ScopedStream, String> {
    ScopedStream::parse(s).ok_or_else(|| format!("'{s}' is not a stream name; expected scope/stream"))
}

/// An interval: a number with a unit, `s`, `m`, `h` or `d` (at least a second).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("'{s}' is not an interval: expected e.g. 7d, 12h, 30m or 90s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        "" => return Err(format!("'{s}' needs a unit: s, m, h or d (e.g. {s}h)")),
        other => return Err(format!("'{other}' is not a unit of time: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("the interval must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

/// `--unix-socket-mode`: octal permission bits, at most 777.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{s}' is not a permission mode: give octal digits up to 777, e.g. 660")),
    }
}

/// Containers per shard: as given, else as the data directory was created, else
/// `new_default` (a new directory).
fn containers_per_core(a: &StandaloneArgs, cores: u32, new_default: u32) -> Result<u32, String> {
    if let Some(n) = a.containers_per_core {
        return Ok(n);
    }
    match sluice_engine::shard::recorded_container_count(&a.data_dir)? {
        None => Ok(new_default),
        Some(have) if cores > 0 && have % cores == 0 => Ok(have / cores),
        Some(have) => Err(format!(
            "{} was created with {have} containers, which {cores} shards cannot share evenly; \
             restart with --cores and --containers-per-core whose product is {have}",
            a.data_dir.display()
        )),
    }
}

fn engine_config(a: &StandaloneArgs, containers_default: u32) -> Result<sluice_engine::EngineConfig, String> {
    let cores = a.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let mut cfg = sluice_engine::EngineConfig::new(a.data_dir.clone(), a.listen, cores);
    cfg.unix_socket = a.unix_socket.clone();
    cfg.unix_socket_mode = a.unix_socket_mode;
    cfg.containers_per_shard = containers_per_core(a, cores, containers_default)?;
    cfg.log_file_bytes = a.log_file_mb << 20;
    cfg.log_prefill = a.log_prefill;
    cfg.log_spare_files = a.log_spare_files;
    let per_container = |shard_mb: u64| (shard_mb / u64::from(cfg.containers_per_shard.max(1))).max(1);
    let cache_mb =
        a.cache_mb.unwrap_or_else(|| per_container(sluice_engine::constants::SHARD_CACHE_MB_DEFAULT) as usize);
    cfg.cache_bytes_max = cache_mb << 20;
    cfg.pin = !a.no_pin;
    cfg.idle_spin = Duration::from_micros(a.idle_spin_us);
    cfg.shard_nice = a.shard_nice;
    cfg.flushes_per_second = a.iops_limit;
    cfg.flush_linger = Duration::from_micros(a.flush_linger_us);
    cfg.flush_depth = a.flush_depth as usize;
    cfg.tier2 = a.tier2.clone();
    // By default at least the four log files a container's log needs (many containers per core).
    let budget = || per_container(sluice_engine::constants::SHARD_LOG_BUDGET_MB_DEFAULT).max(4 * a.log_file_mb);
    cfg.log_bytes_max = a.log_budget_mb.unwrap_or_else(budget) << 20;
    cfg.chunk_bytes = a.chunk_mb << 20;
    cfg.move_bytes_min = a.move_min_kb << 10;
    cfg.rate_window = Duration::from_secs(a.rate_window_s.max(1));
    cfg.writer_idle = Duration::from_secs(a.writer_idle_hours.saturating_mul(3600));
    cfg.scrub_every = a.scrub_every;
    cfg.scrub_bytes_per_sec = a.scrub_rate_mb.saturating_mul(1_000_000);
    cfg.salvage_damaged_log = a.salvage_damaged_log;
    Ok(cfg)
}

/// The cluster's duties, run while `active()`: retention and auto-scaling (one thread).
fn spawn_duties(
    url: String,
    a: &StandaloneArgs,
    active: impl Fn() -> bool + Clone + Send + 'static,
) -> Result<(), String> {
    let retention_every = Duration::from_millis(a.retention_interval_ms.max(10));
    let autoscale_every = Duration::from_millis(a.autoscale_interval_ms.max(10));
    let cooldown = Duration::from_secs(a.scale_cooldown_s);
    let txn_every = Duration::from_millis(a.txn_interval_ms.max(10));
    let txn_keep = Duration::from_secs(a.txn_keep_s);
    std::thread::Builder::new()
        .name("sluice-duties".into())
        .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(async {
                tokio::join!(
                    retention::run(url.clone(), retention_every, active.clone()),
                    autoscale::run(url.clone(), autoscale_every, cooldown, active.clone()),
                    txns::run(url, txn_every, txn_keep, active)
                );
            }),
            Err(e) => tracing::error!(error = %e, "cannot start the retention, auto-scaling and transaction services"),
        })
        .map(|_| ())
        .map_err(|e| format!("starting the retention, auto-scaling and transaction services: {e}"))
}

/// Connects to etcd and checks the cluster's container count (creating the cluster with
/// `placement` if it is new), retrying an unreachable etcd for `--etcd-wait-s` (a mismatched
/// count is final).
fn join_cluster(
    a: &NodeArgs,
    containers: u32,
    placement: sluice_net::routing::Placement,
) -> Result<sluice_meta::EtcdStore, String> {
    use sluice_meta::cluster::{ClusterError, ensure_cluster};
    let deadline = std::time::Instant::now() + Duration::from_secs(a.etcd_wait_s);
    let etcd = a.etcd.join(",");
    loop {
        let attempt = sluice_meta::EtcdStore::connect(&a.etcd, &a.cluster).map_err(ClusterError::from).and_then(|s| {
            futures::executor::block_on(ensure_cluster(&s, &a.cluster, containers, placement)).map(|_| s)
        });
        match attempt {
            Ok(store) => return Ok(store),
            Err(e @ ClusterError::ContainerCountMismatch { .. }) => return Err(e.to_string()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(format!("etcd at {etcd} is unreachable, gave up after {} s: {e}", a.etcd_wait_s));
            }
            Err(e) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now()).as_secs();
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr(),
                    format_args!("etcd at {etcd} is unreachable ({e}); retrying for {left} more s\n"),
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A running server's status line on stdout. Unlike `println!`, it never panics: a server
/// whose output goes to a full disk or a closed pipe keeps serving.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A standalone server's stop has nothing to hand off: one taking longer than this is stuck.
const STANDALONE_STOP_BOUND: Duration = Duration::from_secs(30);

/// Blocks until SIGINT or SIGTERM. From then on a second signal, or `bound` passing before
/// the stop is done, ends the process at once: everything acknowledged is already durable,
/// so a forced exit only skips the graceful part (a cluster node's hand-off: its containers
/// then wait for it to come back, as after a crash).
fn await_stop_signal(mut signals: signal_hook::iterator::Signals, what: &str, bound: Option<Duration>) {
    if let Some(sig) = signals.forever().next() {
        say!("signal {sig}: {what} (a second signal exits at once)");
    }
    let started = std::time::Instant::now();
    let watch = move || {
        loop {
            if let Some(sig) = signals.pending().next() {
                say!("signal {sig} again: exiting now");
                std::process::exit(1);
            }
            if let Some(b) = bound
                && started.elapsed() > b
            {
                say!("the stop did not finish within {b:?}: exiting now");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    if let Err(e) = std::thread::Builder::new().name("sluice-stop-watch".into()).spawn(watch) {
        tracing::warn!(error = %e, "cannot watch the stop; a second signal will not force the exit");
    }
}

fn node(a: NodeArgs) -> Result<(), String> {
    if a.engine.tier2.is_none() {
        return Err(
            "a cluster node needs --tier2: the tier-2 store all nodes share (containers move through it)".into()
        );
    }
    let cfg = engine_config(&a.engine, sluice_engine::constants::CONTAINERS_PER_SHARD_DEFAULT)?;
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let started = std::time::Instant::now();
    let store = join_cluster(&a, cfg.container_count(), cfg.placement)?;
    let mut opts = sluice_engine::cluster::ClusterOptions::new(&a.cluster, &a.node_id);
    opts.lease_ttl = Duration::from_secs(a.lease_ttl_s.max(1));
    let node = sluice_engine::cluster::ClusterNode::start(cfg.clone(), store, opts)?;
    let (url, active) = (node.endpoints[0].address.clone(), node.controller_flag());
    spawn_duties(url, &a.engine, active)?;
    let ports: Vec<&str> = node.endpoints.iter().map(|e| e.address.as_str()).collect();
    say!(
        "sluice node {} of cluster {} ready in {:.2?}: {} shards on {}, {} containers in the cluster, tier-2 {}",
        a.node_id,
        a.cluster,
        started.elapsed(),
        cfg.shards,
        ports.join(", "),
        cfg.container_count(),
        a.engine.tier2.as_deref().unwrap_or("off")
    );
    await_stop_signal(signals, "handing containers off and leaving the cluster", None);
    let t = std::time::Instant::now();
    node.shutdown();
    say!("stopped in {:.2?}", t.elapsed());
    Ok(())
}

fn standalone(a: StandaloneArgs) -> Result<(), String> {
    let cfg = engine_config(&a, sluice_engine::constants::STANDALONE_CONTAINERS_PER_SHARD)?;
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let started = std::time::Instant::now();
    let node = sluice_engine::shard::Node::start(cfg.clone())?;
    let ports: Vec<&str> = node.endpoints.iter().chain(&node.unix_endpoints).map(|e| e.address.as_str()).collect();
    say!(
        "sluice standalone ready in {:.2?}: {} shards on {}, {} containers, data in {}, tier-2 {}",
        started.elapsed(),
        cfg.shards,
        ports.join(", "),
        cfg.container_count(),
        a.data_dir.display(),
        a.tier2.as_deref().unwrap_or("off")
    );
    let url = node.endpoints[0].address.clone();
    spawn_duties(url, &a, || true)?;
    say!("try:  sluice scope create demo && sluice stream create demo/events --segments 4");
    say!("      echo hello | sluice write demo/events --key k1 && sluice read demo/events --timeout-ms 1000");
    await_stop_signal(signals, "stopping", Some(STANDALONE_STOP_BOUND));
    node.stop();
    Ok(())
}

async fn client(url: &str, retry_for: Duration) -> Result<Client, String> {
    let config = sluice_client::ClientConfig { retry_for, ..Default::default() };
    Client::connect_with(url, config)
        .await
        .map_err(|e| format!("{e} (is `sluice standalone` running? set --url or SLUICE_URL)"))
}

fn err(e: ClientError) -> String {
    e.to_string()
}

/// `--scaling` of `stream update`: `fixed` alone keeps the current segments.
fn parse_scaling_update(s: &str) -> Result<ScalingPolicy, String> {
    if s == "fixed" { Ok(ScalingPolicy::Fixed { segments: 1 }) } else { ScalingPolicy::parse(s) }
}

/// `SEG[:N]` of `stream scale --split`.
fn parse_split(s: &str) -> Result<(u64, u32), String> {
    let (seg, n) = s.split_once(':').unwrap_or((s, "2"));
    let seg = seg.parse().map_err(|_| format!("'{seg}' is not a segment number"))?;
    let n = n.parse().map_err(|_| format!("'{n}' is not a number of parts"))?;
    Ok((seg, n))
}

/// A stream's epochs, one line each, with what each scaling sealed and created.
fn print_epochs(history: &sluice_net::StreamHistory) {
    println!("epochs:");
    let mut previous: &[u64] = &[];
    for e in &history.epochs {
        let list = |v: Vec<&u64>| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
        let change = if previous.is_empty() {
            "created".to_string()
        } else {
            let sealed = list(previous.iter().filter(|n| !e.segments.contains(n)).collect());
            let created = list(e.segments.iter().filter(|n| !previous.contains(n)).collect());
            format!("sealed {sealed} -> created {created}")
        };
        let at = i64::try_from(e.created_unix_ms)
            .ok()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or_else(|| format!("{} ms", e.created_unix_ms), |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string());
        println!("{:>6}  at {at}  segments {:<24}  {change}", e.epoch, list(e.segments.iter().collect()));
        previous = &e.segments;
    }
}

async fn admin(url: &str, retry_for: Duration, cmd: Cmd) -> Result<(), String> {
    let c = client(url, retry_for).await?;
    match cmd {
        Cmd::Log(LogCmd::Scrub(a)) => scrub::run(&c, a).await?,
        Cmd::Scope(ScopeCmd::Create { scope }) => {
            c.create_scope(&scope).await.map_err(err)?;
            println!("created scope {scope}");
        }
        Cmd::Scope(ScopeCmd::Delete { scope }) => {
            c.delete_scope(&scope).await.map_err(err)?;
            println!("deleted scope {scope}");
        }
        Cmd::Scope(ScopeCmd::List) => {
            for s in c.list_scopes().await.map_err(err)? {
                println!("{s}");
            }
        }
        Cmd::Stream(StreamCmd::Create { stream, segments, retention, scaling }) => {
            let s = parse_stream(&stream)?;
            let scaling = scaling.unwrap_or(ScalingPolicy::Fixed { segments });
            let segments = match scaling {
                ScalingPolicy::Fixed { segments } => segments,
                auto => segments.max(auto.initial_segments()),
            };
            c.create_stream_policies(&s.scope, &s.stream, segments, retention, scaling).await.map_err(|e| {
                match e.code() {
                    Some(sluice_net::ErrorCode::NoSuchScope) => {
                        format!("{e} (create it first: sluice scope create {})", s.scope)
                    }
                    _ => err(e),
                }
            })?;
            println!("created stream {s} with {segments} segment(s), retention {retention}, scaling {scaling}");
        }
        Cmd::Stream(StreamCmd::Update { stream, retention, scaling }) => {
            let s = parse_stream(&stream)?;
            if retention.is_none() && scaling.is_none() {
                return Err("nothing to change: give --retention and/or --scaling".into());
            }
            c.update_stream(&s.scope, &s.stream, retention, scaling).await.map_err(err)?;
            let info = c.get_stream(&s.scope, &s.stream).await.map_err(err)?;
            println!("stream {s}: retention {}, scaling {}", info.retention, info.scaling);
        }
        Cmd::Stream(StreamCmd::Truncate { stream, at, segment, offset }) => {
            let s = parse_stream(&stream)?;
            if let (Some(n), Some(offset)) = (segment, offset) {
                let name = s.segment_name(sluice_net::SegmentNumber(n));
                c.truncate_segment(&name, offset).await.map_err(err)?;
                let si = c.segment_info(&name).await.map_err(err)?;
                println!("truncated segment {name}: it keeps bytes {}..{}", si.start_offset, si.length);
            } else {
                let at = at.expect("clap requires --at or --segment");
                let cut = sluice_client::StreamCut::from_text(&at).map_err(err)?;
                if cut.stream != s {
                    return Err(format!("the cut is for stream {}, not {s}", cut.stream));
                }
                c.truncate_stream(&cut).await.map_err(err)?;
                println!("truncated stream {s} at {at}");
            }
        }
        Cmd::Stream(StreamCmd::List { scope, long: false }) => {
            for s in c.list_streams(&scope).await.map_err(err)? {
                println!("{s}");
            }
        }
        Cmd::Stream(StreamCmd::List { scope, long: true }) => {
            let streams = c.list_stream_entries(&scope).await.map_err(err)?;
            let width = streams.iter().map(|s| s.name.len()).max().unwrap_or(0).max("stream".len());
            println!("{:<width$}  {:<10}  {:<20}  scaling", "stream", "state", "retention");
            for s in streams {
                let state = if s.unreadable {
                    // Its record is damaged: `stream describe` shows the error.
                    "unreadable"
                } else if s.creating {
                    "creating"
                } else if s.sealed {
                    "sealed"
                } else {
                    "active"
                };
                let (retention, scaling) = match s.unreadable {
                    true => ("?".to_string(), "?".to_string()),
                    false => (s.retention.to_string(), s.scaling.to_string()),
                };
                println!("{:<width$}  {state:<10}  {retention:<20}  {scaling}", s.name);
            }
        }
        Cmd::Stream(StreamCmd::Describe { stream }) => {
            let s = parse_stream(&stream)?;
            let info = c.get_stream(&s.scope, &s.stream).await.map_err(err)?;
            println!(
                "stream {s}: {}, retention {}, scaling {}, epoch {}",
                if info.sealed { "sealed" } else { "active" },
                info.retention,
                info.scaling,
                info.epoch
            );
            println!(
                "{:>8}  {:>19}  {:>12}  {:>14}  {:>12}  {:>14}  {:>7}  {:>7}  {:>9}  served by",
                "segment", "key range", "start", "length", "tier-1 only", "in tier-2", "sealed", "writers", "container"
            );
            for seg in &info.segments {
                let name = s.segment_name(sluice_net::SegmentNumber(seg.number));
                let si = c.segment_info(&name).await.map_err(err)?;
                let tiered = si.tier2_end.max(si.start_offset);
                println!(
                    "{:>8}  [{:.6}, {:.6})  {:>12}  {:>14}  {:>12}  {:>14}  {:>7}  {:>7}  {:>9}  {}",
                    seg.number,
                    seg.key_low,
                    seg.key_high,
                    si.start_offset,
                    si.length,
                    si.length - tiered.min(si.length),
                    tiered - si.start_offset,
                    si.sealed,
                    si.writers.len(),
                    c.container_of(&name),
                    c.endpoint_of(&name)
                );
            }
            print_epochs(&c.stream_history(&s.scope, &s.stream).await.map_err(err)?);
            for sub in c.list_subscribers(&stream).await.map_err(err)? {
                let at = match &sub.positions {
                    Some(p) => p.iter().map(|x| format!("{}@{}", x.segment, x.offset)).collect::<Vec<_>>().join(" "),
                    None => "no checkpoint yet (holds all truncation)".into(),
                };
                println!("subscriber {}: {at}", sub.group);
            }
            let open = c.list_txns(&s.scope, &s.stream).await.map_err(err)?;
            let open = open.iter().filter(|t| !t.state.is_final()).count();
            if open > 0 {
                println!("{open} transaction(s) open or settling (sluice txn list {s})");
            }
        }
        Cmd::Stream(StreamCmd::Scale { stream, split, merge }) => {
            let s = parse_stream(&stream)?;
            let info = match (split, merge) {
                (Some((seg, parts)), _) => c.split_segment(&s.scope, &s.stream, seg, parts).await,
                (None, Some(segs)) => c.merge_segments(&s.scope, &s.stream, &segs).await,
                (None, None) => unreachable!("clap requires --split or --merge"),
            }
            .map_err(err)?;
            let list: Vec<String> = info.segments.iter().map(|r| r.number.to_string()).collect();
            println!("stream {s}: epoch {}, segments {}", info.epoch, list.join(" "));
        }
        Cmd::Stream(StreamCmd::Seal { stream }) => {
            let s = parse_stream(&stream)?;
            c.seal_stream(&s.scope, &s.stream).await.map_err(err)?;
            println!("sealed stream {s}");
        }
        Cmd::Stream(StreamCmd::Delete { stream }) => {
            let s = parse_stream(&stream)?;
            c.delete_stream(&s.scope, &s.stream).await.map_err(err)?;
            println!("deleted stream {s}");
        }
        Cmd::Stream(StreamCmd::Verify(a)) => verify::run(&c, a).await?,
        Cmd::Stream(StreamCmd::Cut { stream, at }) => {
            let at = match at {
                CutPos::Head => sluice_client::CutAt::Head,
                CutPos::Tail => sluice_client::CutAt::Tail,
            };
            println!("{}", c.stream_cut(&stream, at).await.map_err(err)?);
        }
        Cmd::Rg(cmd) => rg::run(&c, cmd).await?,
        Cmd::Txn(cmd) => txn::run(&c, cmd).await?,
        Cmd::Write(a) => io::write(&c, a).await?,
        Cmd::Read(a) => io::read(&c, a).await?,
        Cmd::Stats(a) => stats::run(&c, a).await?,
        Cmd::Standalone(_) | Cmd::Node(_) | Cmd::Log(_) | Cmd::Cluster(_) => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

/// Client commands end quietly when their output pipe closes (`sluice read ... | head`),
/// like other command-line tools. The server keeps Rust's default (SIGPIPE ignored).
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to its default before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Standard error for log lines, never failing: a line that cannot be written (stderr
/// redirected to a full disk) is dropped. tracing-subscriber reports a failed write with
/// `eprintln!`, which panics when stderr fails too, and a panic stops the server.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn main() -> ExitCode {
    // A panic is a broken invariant: stop the whole process (a node recovers from its logs
    // on restart) rather than leave a shard thread dead inside a live server. Done with a
    // hook, not `panic = "abort"`, so tests and this binary share one build of the deps.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(|| LossyStderr)
        .init();
    let result = match cli.cmd {
        Cmd::Standalone(a) => standalone(a),
        Cmd::Node(a) => node(a),
        Cmd::Log(LogCmd::Dump { dir, entries }) => {
            restore_sigpipe();
            dump::dump(&dir, entries)
        }
        Cmd::Cluster(ClusterCmd::Status { etcd, cluster }) => {
            restore_sigpipe();
            cluster_status(&etcd, &cluster)
        }
        cmd => {
            restore_sigpipe();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(admin(&cli.url, Duration::from_secs(cli.retry_for), cmd))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_interval;
    use std::time::Duration;

    #[test]
    fn intervals_need_a_number_and_a_unit() {
        assert_eq!(parse_interval("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_interval("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_interval("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_interval("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_interval("12").unwrap_err().contains("needs a unit"));
        assert!(parse_interval("3w").unwrap_err().contains("'w' is not a unit"));
        assert!(parse_interval("h").unwrap_err().contains("not an interval"));
        assert!(parse_interval("0s").unwrap_err().contains("at least 1s"));
    }
}
