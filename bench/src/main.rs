//! `sluice-bench`: load generator for a running Sluice node. Workloads so far:
//! - `produce`: closed loop; P producers, each its own connection and idempotent writer,
//!   a bounded number of events in flight;
//! - `end-to-end`: an open-loop producer at a fixed rate and a reader group tailing the
//!   stream; latency from each event's *scheduled* send time to its delivery (so a stall is
//!   not hidden by coordinated omission);
//! - `consume`: C readers in a group catching up on a stream from its head;
//! - `scale`: the time of splits and merges, idle and under an open-loop producer, and the
//!   producer's latency spikes around each scaling (`scale`).
//!
//! Every run prints its figures and, with `--json FILE`, appends one JSON object per run to
//! FILE (for history and comparisons), and with `--plot FILE` saves an HDR percentile plot
//! of its latencies as FILE.svg and FILE.png (`plot`). `compare` runs the produce
//! workload against Sluice, Redis Streams and NATS JetStream in turn (`peers`).

mod inflight;
mod peers;
mod plot;
mod scale;
mod schedule;
mod txn;

use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use sluice_client::Client;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Throughput and latency of a Sluice node")]
struct Cli {
    /// Append the run's results as one JSON line to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// Save an HDR percentile plot of the run's latencies as FILE.svg and FILE.png.
    #[arg(long, global = true, value_name = "FILE")]
    plot: Option<std::path::PathBuf>,
    /// Tokio worker threads for the client and the workload's loops (default: one per core
    /// plus one per producer or reader loop). On few cores `--threads 1` is the fastest for
    /// small events and for one event in flight: a reply then wakes no idle worker (tokio
    /// wakes one to look for work each time its I/O driver returns).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Also show the server's own figures for the timed part of the run (`sluice stats`):
    /// its append and flush latencies, reset as the warm-up ends (produce, end-to-end), or
    /// over each Sluice round (compare). With produce and compare, also the client's append
    /// round trips (from just before a request is written to the socket until its reply is
    /// read; all producers' together): what they add to the server's figures is the socket
    /// and both sides' scheduling, the rest of an ack's latency is the client's queueing.
    #[arg(long, global = true)]
    server_stats: bool,
    /// Microseconds a Sluice writer waits for more events before it sends a batch (the
    /// client's `WriterConfig::linger`; produce, end-to-end and compare). 0, the default, sends
    /// at once: the lowest latency while cores are free. When the client shares two cores with
    /// the server, a few hundred microseconds make fewer, larger appends and leave CPU idle
    /// (1 KB at 480k events/s: the server's CPU 0.95 -> 0.53 of a core with 1000).
    #[arg(long, global = true, value_name = "US", default_value_t = 0)]
    linger_us: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Write generated events as fast as acknowledgements allow.
    Produce {
        /// Server address: `HOST:PORT`, or `unix:PATH` for a server started with `--unix-socket PATH`.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// scope/stream (created with --segments if missing).
        #[arg(long, default_value = "bench/produce")]
        stream: String,
        #[arg(long, default_value_t = 4)]
        segments: u32,
        /// The retention policy of the stream when this run creates it (as `sluice stream
        /// create --retention`): e.g. size:8G,10G keeps a long run at 1 GB/s within a bounded
        /// data directory, the server freeing and reusing log files as it goes (start the
        /// server with --retention-interval-ms 1000 so it checks often enough).
        #[arg(long, default_value = "none", value_parser = sluice_net::Retention::parse)]
        retention: sluice_net::Retention,
        /// Concurrent producers (each its own connection and writer).
        #[arg(long, default_value_t = 1)]
        producers: u32,
        /// Events per producer (default 1,000,000; with --seconds, no limit but the time).
        #[arg(long)]
        count: Option<u64>,
        /// Send for this many seconds after the warm-up (instead of, or as well as, --count).
        #[arg(long)]
        seconds: Option<f64>,
        /// Seconds at the start whose events are sent but neither timed nor counted in the
        /// throughput (caches, log files and connections warm up).
        #[arg(long, default_value_t = 0.0)]
        warmup_s: f64,
        /// Event payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Routing keys per producer, used in turn.
        #[arg(long, default_value_t = 64)]
        keys: u32,
        /// Events awaiting acknowledgement per producer.
        #[arg(long, default_value_t = 10_000)]
        inflight: usize,
        /// Events per write call: 1 uses `write_event` (a future per event, the latency of
        /// each event); N > 1 uses `write_events` (one future per N events: the latency
        /// recorded for each event is its call's, until the last of the N is durable).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Produce at a fixed rate while a reader group tails the stream. Prints the latency of
    /// acknowledgements and of delivery to a reader, both from each event's scheduled time,
    /// and the send lateness: how late the harness itself wrote each event (the part of
    /// both that is the load generator's, on a busy machine).
    EndToEnd {
        /// Server address: `HOST:PORT`, or `unix:PATH` for a server started with `--unix-socket PATH`.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// Target events per second (open loop).
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        /// Measured seconds (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Readers in the group.
        #[arg(long, default_value_t = 2)]
        readers: u32,
        #[arg(long, default_value_t = 4)]
        segments: u32,
        /// Event payload size in bytes (at least 16).
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// The produce workload against Sluice and its peers (Redis Streams, NATS JetStream) at
    /// their strongest durability, in alternating rounds on this machine; prints ratios. With
    /// --rate, also each target's send lateness: how late the harness itself sent after each
    /// due time, which every latency of the open loop includes.
    Compare {
        /// Targets, in order (alternated each round).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "sluice,redis,nats")]
        targets: Vec<peers::Target>,
        /// Start each server on 127.0.0.1 with a fresh temporary directory for every run
        /// (sluice from this build, redis-server, nats-server 2.10+ or NATS_SERVER_BIN).
        #[arg(long)]
        spawn: bool,
        /// With --spawn: clients reach the servers over Unix sockets where the server has them
        /// (Sluice `--unix-socket`, Redis `unixsocket`; NATS has none and stays on TCP), the
        /// fastest same-host transport of each. Without --spawn, give such URLs instead
        /// (`unix:PATH`, `redis+unix:///PATH`).
        #[arg(long, requires = "spawn")]
        unix: bool,
        /// Sluice's address: `HOST:PORT`, or `unix:PATH` (`--unix-socket PATH`).
        #[arg(long, default_value = "127.0.0.1:9090")]
        sluice_url: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Events per run.
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Event payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Events awaiting acknowledgement at once (the same window for every target).
        #[arg(long, default_value_t = 1000)]
        inflight: usize,
        /// Runs per target.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        /// Offer events at this rate (open loop, the same offered load for every target;
        /// latency from the scheduled send time) instead of as fast as acks allow.
        #[arg(long)]
        rate: Option<u64>,
        /// Events per send, each target batching its own way: Sluice `write_events` (one
        /// future for the batch), Redis a pipeline of XADDs (one round trip), NATS the
        /// publishes sent before their acks are awaited. Each event's latency is its batch's.
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// Segments of Sluice's stream. 1, the default, is one ordered log like the peers'
        /// streams (a Redis stream, a JetStream stream); more split the events in flight among
        /// as many writers' batches (at 1000 in flight over 4 segments: batches a quarter the
        /// size, ~3x the appends, and ~30% fewer events/s on two cores).
        #[arg(long, default_value_t = 1)]
        segments: u32,
        /// Extra `sluice standalone` argument for a spawned Sluice (repeat it), e.g.
        /// `--sluice-arg=--iops-limit --sluice-arg=2000`.
        #[arg(long, allow_hyphen_values = true)]
        sluice_arg: Vec<String>,
    },
    /// Time splits and merges of a fresh stream, idle and while one open-loop producer
    /// writes; report the producer's latency spikes around each scaling.
    Scale {
        /// Server address: `HOST:PORT`, or `unix:PATH` for a server started with `--unix-socket PATH`.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// Segments of the stream at the start.
        #[arg(long, default_value_t = 2)]
        segments: u32,
        /// Scalings in each phase (alternately a split of the widest segment and a merge
        /// of the narrowest neighbours).
        #[arg(long, default_value_t = 20)]
        scalings: u32,
        /// Producer rate (events per second, open loop) in the loaded phase.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// Milliseconds between scalings in the loaded phase.
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
        /// Event payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Time transaction commits: each round writes EVENTS events over every segment into a
    /// transaction, flushes, and commits (the events are readable when the commit returns).
    Txn {
        /// Server address: `HOST:PORT`, or `unix:PATH` for a server started with `--unix-socket PATH`.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// Segments of the stream (a transaction has one shadow per segment).
        #[arg(long, default_value_t = 4)]
        segments: u32,
        /// Events per transaction (over 64 keys, so every segment gets some).
        #[arg(long, default_value_t = 1000)]
        events: u32,
        /// Event payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Transactions to time (after one warm-up).
        #[arg(long, default_value_t = 200)]
        rounds: u32,
        /// Time the commit until the record says `Committed` too (`Client::commit_txn`),
        /// not only until the events are in (`Transaction::commit`, which records it after
        /// returning).
        #[arg(long)]
        await_record: bool,
    },
    /// Read a whole stream from its head with a reader group of C readers.
    Consume {
        /// Server address: `HOST:PORT`, or `unix:PATH` for a server started with `--unix-socket PATH`.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// scope/stream to read (e.g. one written by `produce`).
        #[arg(long, default_value = "bench/produce")]
        stream: String,
        #[arg(long, default_value_t = 1)]
        readers: u32,
        /// Stop after this long without an event.
        #[arg(long, default_value_t = 1000)]
        idle_ms: u64,
    },
}

/// Prints a progress line to stderr every second (only when stderr is a terminal).
async fn progress_line(done: std::sync::Arc<std::sync::atomic::AtomicU64>, total: u64) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let start = Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let n = done.load(std::sync::atomic::Ordering::Relaxed);
        let rate = n as f64 / start.elapsed().as_secs_f64();
        if total == 0 {
            eprint!("\r{n} acknowledged, {rate:.0} events/s   ");
        } else {
            eprint!("\r{n}/{total} acknowledged, {rate:.0} events/s   ");
        }
    }
}

/// Latency percentiles as JSON.
/// A histogram of microseconds, 1 µs to a minute, 3 significant digits: every latency the
/// bench records.
pub(crate) fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub(crate) fn hist_json(hist: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50_us": hist.value_at_quantile(0.5), "p90_us": hist.value_at_quantile(0.9),
        "p99_us": hist.value_at_quantile(0.99), "p999_us": hist.value_at_quantile(0.999),
        "p9999_us": hist.value_at_quantile(0.9999), "max_us": hist.max(), "count": hist.len(),
    })
}

/// Appends one result line to the JSON file, with the time of the run.
fn write_json(path: &Option<std::path::PathBuf>, mut result: serde_json::Value) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    result["unix_time"] = unix.into();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    use std::io::Write;
    writeln!(f, "{result}").map_err(|e| format!("{}: {e}", path.display()))
}

async fn consume(url: String, stream: String, readers: u32, idle_ms: u64) -> Result<serde_json::Value, String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let e = |e: sluice_client::ClientError| e.to_string();
    let c = Client::connect(&url).await.map_err(e)?;
    let (scope, _) = stream.split_once('/').ok_or("--stream must be scope/stream")?;
    let group_name = format!("consume{}", std::process::id());
    let group = c
        .create_reader_group(scope, &group_name, sluice_client::ReaderGroupConfig::stream(&stream))
        .await
        .map_err(|err| match err.code() {
            Some(sluice_client::ErrorCode::NoSuchStream | sluice_client::ErrorCode::NoSuchScope) => format!(
                "{stream} does not exist: write it first (`sluice-bench produce --stream {stream}`) or name another with --stream"
            ),
            _ => err.to_string(),
        })?;
    let (events, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for r in 0..readers {
        let (group, events, bytes) = (group.clone(), events.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut reader = group.create_reader(&format!("r{r}")).await.map_err(e)?;
            let mut last = Instant::now();
            while let Some(item) = reader.read_next(std::time::Duration::from_millis(idle_ms)).await.map_err(e)? {
                if let sluice_client::GroupItem::Event(ev) = item {
                    events.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(ev.payload.len() as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
            }
            reader.close().await.map_err(e)?;
            Ok::<Instant, String>(last)
        }));
    }
    let mut end = start;
    for t in tasks {
        end = end.max(t.await.map_err(|e| e.to_string())??);
    }
    let _ = group.delete().await;
    let secs = (end - start).as_secs_f64().max(1e-9);
    let (n, b) = (events.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
    println!(
        "consume: {n} events, {b} payload bytes, {readers} reader(s): {:.0} events/s, {:.1} MB/s",
        n as f64 / secs,
        b as f64 / secs / 1e6
    );
    Ok(serde_json::json!({"workload": "consume", "stream": stream, "readers": readers, "events": n, "bytes": b,
        "seconds": secs, "events_per_s": n as f64 / secs, "mb_per_s": b as f64 / secs / 1e6}))
}

const WARMUP_S: u64 = 2;

/// The clients' append round trips (`--server-stats`), one line.
fn round_trips_line(rt: &sluice_client::stats::Latencies) -> String {
    format!(
        "the client's append round trips ({} requests): p50 {} p90 {} p99 {} p99.9 {} max {} us",
        rt.count, rt.p50_us, rt.p90_us, rt.p99_us, rt.p999_us, rt.max_us
    )
}

pub(crate) fn report(name: &str, hist: &Histogram<u64>) {
    println!(
        "{name} latency (us): p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.value_at_quantile(0.9999),
        hist.max()
    );
}

async fn end_to_end(
    url: String,
    rate: u64,
    seconds: u64,
    readers: u32,
    segments: u32,
    size: usize,
    writer_config: sluice_client::WriterConfig,
) -> RunResult {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let e = |e: sluice_client::ClientError| e.to_string();
    let admin = Client::connect(&url).await.map_err(e)?;
    let run = format!("e2e{}", std::process::id());
    let _ = admin.create_scope("bench").await;
    admin.create_stream("bench", &run, segments).await.map_err(e)?;
    let stream = format!("bench/{run}");
    let mut config = sluice_client::ReaderGroupConfig::stream(&stream);
    config.streams[0].from = Some(admin.stream_cut(&stream, sluice_client::CutAt::Tail).await.map_err(e)?);
    let group = admin.create_reader_group("bench", &format!("{run}g"), config).await.map_err(e)?;
    let start = std::time::Instant::now();
    let total = rate * (seconds + WARMUP_S);
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for r in 0..readers {
        let (group, done, received) = (group.clone(), done.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut reader = group.create_reader(&format!("r{r}")).await.map_err(e)?;
            let mut hist = micros_histogram();
            while !done.load(Ordering::Relaxed) {
                if let Some(sluice_client::GroupItem::Event(ev)) =
                    reader.read_next(std::time::Duration::from_millis(100)).await.map_err(e)?
                {
                    let now = start.elapsed().as_micros() as u64;
                    let sent = u64::from_le_bytes(ev.payload[..8].try_into().expect("8 bytes"));
                    if sent >= WARMUP_S * 1_000_000 {
                        hist.saturating_record(now.saturating_sub(sent).max(1));
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            reader.close().await.map_err(e)?;
            Ok::<_, String>(hist)
        }));
    }
    let client = Client::connect(&url).await.map_err(e)?;
    let writer = client.event_writer_with(&stream, writer_config).await.map_err(e)?;
    // The schedule's thread writes each event as it falls due (timed from its due time, the
    // payload carries it for the readers) and passes the acknowledgements here.
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(sluice_client::AckFuture, u64, usize)>>();
    // Acknowledgements are awaited per segment (`KeyedAcks`: the oldest unsettled event of
    // each only); keys are mapped to segments once: the stream does not scale in the run.
    let mut segment_numbers: Vec<u64> = Vec::new();
    let key_lane: Vec<usize> = (0..1024u64)
        .map(|k| {
            let n = writer.segment_for_key(&k.to_le_bytes());
            segment_numbers.iter().position(|&x| x == n).unwrap_or_else(|| {
                segment_numbers.push(n);
                segment_numbers.len() - 1
            })
        })
        .collect();
    let mut acks = inflight::KeyedAcks::new(segment_numbers.len());
    let lateness = Arc::new(std::sync::Mutex::new(micros_histogram()));
    let late = lateness.clone();
    let send = move |due: std::ops::Range<u64>| {
        let mut sent = Vec::with_capacity(due.end.saturating_sub(due.start) as usize);
        let mut late = late.lock().expect("lateness lock");
        // This tick's events leave from this thread, together, when the burst ends.
        let burst = writer.burst();
        for i in due {
            let due = schedule::due_after(i, rate as f64).as_micros() as u64;
            let now = start.elapsed().as_micros() as u64;
            if due >= WARMUP_S * 1_000_000 {
                late.saturating_record(now.saturating_sub(due).max(1));
            }
            let mut payload = vec![b'.'; size.max(16)];
            payload[..8].copy_from_slice(&due.to_le_bytes());
            payload[8..16].copy_from_slice(&i.to_le_bytes());
            sent.push((writer.write_event(&(i % 1024).to_le_bytes(), payload), due, key_lane[(i % 1024) as usize]));
        }
        drop(burst);
        let _ = acks_tx.send(sent);
    };
    let schedule = schedule::Schedule::start_sending(start, rate, total, tokio::runtime::Handle::current(), send)?;
    let mut ack_hist = micros_histogram();
    let mut last_report = std::time::Instant::now();
    let mut sending = true;
    loop {
        tokio::select! {
            sent = acks_rx.recv(), if sending => match sent {
                Some(sent) => {
                    for (ack, due, lane) in sent {
                        let timed = due >= WARMUP_S * 1_000_000;
                        acks.push(lane, ack, timed.then(|| start + std::time::Duration::from_micros(due)));
                    }
                }
                // Every event is written (the schedule's thread dropped its sender).
                None => sending = false,
            },
            settled = acks.next_ready(&mut ack_hist), if acks.len() > 0 => {
                settled?;
            }
            else => break,
        }
        if last_report.elapsed() > std::time::Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            eprint!("\r{} sent, {} received   ", schedule.due_count(), received.load(Ordering::Relaxed));
        }
    }
    drop(schedule);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < total && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    done.store(true, Ordering::Relaxed);
    let mut hist = micros_histogram();
    for t in tasks {
        hist.add(t.await.map_err(|e| e.to_string())??).map_err(|e| e.to_string())?;
    }
    eprintln!();
    println!(
        "end-to-end: {rate} events/s x {size} B for {seconds} s (+{WARMUP_S} s warm-up), {segments} segments, {readers} readers: sent {total}, received {}",
        received.load(Ordering::Relaxed)
    );
    report("ack", &ack_hist);
    report("end-to-end", &hist);
    let lateness = lateness.lock().expect("lateness lock").clone();
    report("send lateness", &lateness);
    let _ = group.delete().await;
    let _ = admin.seal_stream("bench", &run).await;
    let _ = admin.delete_stream("bench", &run).await;
    let json = serde_json::json!({"workload": "end-to-end", "rate": rate, "seconds": seconds, "warmup_s": WARMUP_S,
        "linger_us": writer_config.linger.as_micros() as u64,
        "readers": readers, "segments": segments, "size": size, "sent": total,
        "received": received.load(Ordering::Relaxed), "ack": hist_json(&ack_hist), "end_to_end": hist_json(&hist),
        "send_lateness": hist_json(&lateness)});
    Ok((json, vec![("ack".to_string(), ack_hist), ("end-to-end".to_string(), hist)]))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let cli = Cli::parse();
    // Producer and reader loops each keep a thread busy; the client's connection and segment
    // tasks need threads of their own beside them, or they starve and latency explodes.
    let loops = match &cli.cmd {
        Cmd::Produce { producers, .. } => *producers as usize,
        Cmd::Consume { readers, .. } => *readers as usize,
        Cmd::EndToEnd { readers, .. } => *readers as usize + 1,
        Cmd::Compare { .. } | Cmd::Scale { .. } | Cmd::Txn { .. } => 1,
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match cli.threads {
            Some(0) => return Err("--threads must be at least 1".into()),
            Some(n) => n,
            None => cores + loops,
        })
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    if let Some(base) = &cli.plot {
        // Fail before the run, not after it, when plots cannot be drawn.
        let dir = base.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(format!("--plot {}: directory {} does not exist", base.display(), dir.display()));
        }
        plot::ensure_font()?;
    }
    // The server's statistics start over as the timed part of the run begins.
    // (`compare` takes them itself, around each Sluice round.)
    let server_stats = if cli.server_stats && !matches!(cli.cmd, Cmd::Compare { .. }) {
        let (url, warmup) = match &cli.cmd {
            Cmd::Produce { url, warmup_s, .. } => (url.clone(), *warmup_s),
            Cmd::EndToEnd { url, .. } => (url.clone(), WARMUP_S as f64),
            _ => return Err("--server-stats works with produce, end-to-end and compare".into()),
        };
        let c = rt.block_on(Client::connect(&url)).map_err(|e| e.to_string())?;
        Some(rt.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(warmup.max(0.0))).await;
            c.shard_stats(true).await.map(|_| c)
        }))
    } else {
        None
    };
    let writer_config = sluice_client::WriterConfig {
        linger: std::time::Duration::from_micros(cli.linger_us),
        ..sluice_client::WriterConfig::default()
    };
    if cli.linger_us > 0 && !matches!(cli.cmd, Cmd::Produce { .. } | Cmd::EndToEnd { .. } | Cmd::Compare { .. }) {
        return Err("--linger-us works with produce, end-to-end and compare".into());
    }
    let (mut result, series) = match cli.cmd {
        Cmd::EndToEnd { url, rate, seconds, readers, segments, size } => {
            rt.block_on(end_to_end(url, rate.max(1), seconds, readers, segments, size, writer_config))?
        }
        Cmd::Scale { url, segments, scalings, rate, every_ms, size } => {
            let load =
                scale::ScaleLoad { segments, scalings, rate, every: std::time::Duration::from_millis(every_ms), size };
            rt.block_on(scale::run(url, load))?
        }
        Cmd::Txn { url, segments, events, size, rounds, await_record } => {
            rt.block_on(txn::run(url, txn::TxnLoad { segments, events, size, rounds, await_record }))?
        }
        Cmd::Consume { url, stream, readers, idle_ms } => {
            (rt.block_on(consume(url, stream, readers.max(1), idle_ms))?, Vec::new())
        }
        Cmd::Produce {
            url,
            stream,
            segments,
            retention,
            producers,
            count,
            seconds,
            warmup_s,
            size,
            keys,
            inflight,
            batch,
        } => {
            let mut load =
                ProduceLoad::new(stream, segments, producers, count, seconds, warmup_s, size, keys, inflight, batch)?;
            load.writer = writer_config;
            load.retention = retention;
            load.round_trips = cli.server_stats;
            rt.block_on(produce(url, load))?
        }
        Cmd::Compare {
            targets,
            spawn,
            unix,
            sluice_url,
            redis_url,
            nats_url,
            count,
            size,
            inflight,
            rounds,
            rate,
            batch,
            segments,
            sluice_arg,
        } => {
            let urls = [sluice_url, redis_url, nats_url];
            if segments == 0 {
                return Err("--segments must be at least 1".into());
            }
            let load = peers::Load { count, inflight, rate, batch: batch.max(1), writer: writer_config, segments };
            let spawn = spawn.then_some(Spawn { sluice_extra: &sluice_arg, unix });
            compare(&rt, &targets, spawn, &urls, load, size, rounds.max(1), cli.server_stats)?
        }
    };
    if let Some(reset) = server_stats {
        let c = rt.block_on(reset).map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let stats = rt.block_on(c.shard_stats(false)).map_err(|e| e.to_string())?;
        println!("server (per shard; latencies in microseconds):");
        print!("{}", sluice_client::stats::table(&stats));
        result["server"] = sluice_client::stats::json(&stats);
    }
    write_json(&cli.json, result.clone())?;
    if let Some(base) = &cli.plot {
        if series.is_empty() {
            eprintln!("--plot: this workload records no latencies; nothing plotted");
        } else {
            let title = result["workload"].as_str().unwrap_or("run").to_string();
            for f in plot::hdr_plot(base, &format!("sluice {title}"), &series)? {
                println!("plot: {}", f.display());
            }
        }
    }
    Ok(())
}

/// Runs the produce workload on each target `rounds` times, alternating the order.
#[allow(clippy::too_many_arguments)]
fn compare(
    rt: &tokio::runtime::Runtime,
    targets: &[peers::Target],
    // With `--spawn`: how the servers are started.
    spawn: Option<Spawn<'_>>,
    urls: &[String; 3],
    load: peers::Load,
    size: usize,
    rounds: u32,
    // The Sluice server's own figures (`--server-stats`) over each Sluice round.
    server_stats: bool,
) -> RunResult {
    let peers::Load { count, inflight, rate, batch, writer, segments } = load;
    let mut server_rounds = Vec::new();
    use peers::Target;
    let base = std::env::temp_dir().join(format!("sluice-compare-{}", std::process::id()));
    /// Every run of one target.
    struct Runs {
        target: Target,
        rates: Vec<f64>,
        hist: Histogram<u64>,
        /// Open loop: how late the harness sent, over every round.
        late: Histogram<u64>,
        version: String,
        /// `tcp` or `unix`, as the last run reached it.
        transport: &'static str,
    }
    let mut results: Vec<Runs> = targets
        .iter()
        .map(|&target| Runs {
            target,
            rates: Vec::new(),
            hist: micros_histogram(),
            late: micros_histogram(),
            version: String::new(),
            transport: "tcp",
        })
        .collect();
    for round in 0..rounds {
        let order: Vec<usize> =
            if round % 2 == 0 { (0..targets.len()).collect() } else { (0..targets.len()).rev().collect() };
        for i in order {
            let target = targets[i];
            let server = match spawn {
                Some(how) => Some(peers::spawn(target, &base, how.sluice_extra, how.unix)?),
                None => None,
            };
            let url = match &server {
                Some(s) => s.url.clone(),
                None => urls[target as usize].clone(),
            };
            let stats = match server_stats && target == Target::Sluice {
                true => {
                    let c = rt.block_on(Client::connect(&url)).map_err(|e| format!("--server-stats: {e}"))?;
                    rt.block_on(c.shard_stats(true)).map_err(|e| format!("--server-stats: {e}"))?;
                    Some(c)
                }
                false => None,
            };
            let out = rt.block_on(peers::produce(target, &url, load, size))?;
            let late = match rate {
                Some(_) => format!(" (send lateness p99 {} us)", out.lateness.value_at_quantile(0.99)),
                None => String::new(),
            };
            println!(
                "round {}: {target:?}: {:.0} events/s, ack p50 {} us, p99 {} us{late}",
                round + 1,
                out.events_per_s,
                out.hist.value_at_quantile(0.5),
                out.hist.value_at_quantile(0.99)
            );
            if let Some(c) = stats {
                let stats = rt.block_on(c.shard_stats(false)).map_err(|e| format!("--server-stats: {e}"))?;
                println!("round {}: the Sluice server (per shard; latencies in microseconds):", round + 1);
                print!("{}", sluice_client::stats::table(&stats));
                let mut entry = serde_json::json!({"round": round + 1, "shards": sluice_client::stats::json(&stats)});
                if let Some(rt) = &out.round_trips {
                    println!("round {}: {}", round + 1, round_trips_line(rt));
                    entry["client_round_trips"] = sluice_client::stats::latencies_json(rt);
                }
                server_rounds.push(entry);
            }
            let r = &mut results[i];
            r.rates.push(out.events_per_s);
            r.hist.add(&out.hist).map_err(|e| e.to_string())?;
            r.late.add(&out.lateness).map_err(|e| e.to_string())?;
            r.transport = peers::transport_of(&url);
            if let Some(s) = &server {
                r.version = s.version.clone();
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let sluice =
        results.iter().find(|r| r.target == Target::Sluice).map(|r| (mean(&r.rates), r.hist.value_at_quantile(0.99)));
    let rate_given = rate.is_some();
    let offered = match rate {
        Some(r) => format!("offered at {r} events/s (open loop, at most {inflight} in flight)"),
        None => format!("{inflight} in flight (closed loop)"),
    };
    let shape = match (results.iter().any(|r| r.target == Target::Sluice), segments) {
        (false, _) => String::new(),
        (true, 1) => ", Sluice's stream of 1 segment".to_string(),
        (true, n) => format!(", Sluice's stream of {n} segments"),
    };
    println!("\n{count} events x {size} B per run, {offered}{shape}, {rounds} round(s) each:");
    println!(
        "{:<8} {:>5} {:>12} {:>9} {:>9} {:>10}  {:>14} {:>14}  durability",
        "target", "via", "events/s", "p50 us", "p99 us", "p99.9 us", "sluice thrpt x", "sluice p99 x"
    );
    let mut json = Vec::new();
    for Runs { target: t, rates, hist: h, late, version, transport } in &results {
        let rate = mean(rates);
        let p99 = h.value_at_quantile(0.99);
        let (ratio, p99_ratio) = match sluice {
            Some((s_rate, s_p99)) => {
                (format!("{:.2}x", s_rate / rate), format!("{:.2}x", s_p99 as f64 / p99.max(1) as f64))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<8} {:>5} {:>12.0} {:>9} {:>9} {:>10}  {:>14} {:>14}  {}{}",
            format!("{t:?}").to_lowercase(),
            transport,
            rate,
            h.value_at_quantile(0.5),
            p99,
            h.value_at_quantile(0.999),
            ratio,
            p99_ratio,
            t.durability(),
            if version.is_empty() { String::new() } else { format!(" [{version}]") }
        );
        let mut entry = serde_json::json!({"target": format!("{t:?}").to_lowercase(), "version": version,
            "transport": transport, "durability": t.durability(), "events_per_s": rates, "mean_events_per_s": rate,
            "ack": hist_json(h)});
        if rate_given {
            entry["send_lateness"] = hist_json(late);
        }
        json.push(entry);
    }
    if rate_given {
        println!("send lateness (how late the harness itself sent each event; part of every latency above):");
        for Runs { target: t, late, .. } in &results {
            println!(
                "{:<8} p50 {} us, p99 {} us, p99.9 {} us, max {} us",
                format!("{t:?}").to_lowercase(),
                late.value_at_quantile(0.5),
                late.value_at_quantile(0.99),
                late.value_at_quantile(0.999),
                late.max()
            );
        }
    }
    let series = results.into_iter().map(|r| (format!("{:?}", r.target).to_lowercase(), r.hist)).collect();
    let mut result = serde_json::json!({"workload": "compare", "count": count, "size": size, "inflight": inflight,
        "rate": rate, "batch": batch, "rounds": rounds, "linger_us": writer.linger.as_micros() as u64, "segments": segments,
        "targets": json});
    if server_stats {
        result["server"] = serde_json::Value::Array(server_rounds);
    }
    Ok((result, series))
}

/// How `compare --spawn` starts the servers.
#[derive(Clone, Copy)]
struct Spawn<'a> {
    /// More `sluice standalone` arguments.
    sluice_extra: &'a [String],
    /// Unix sockets where the server has them.
    unix: bool,
}

/// A run's JSON result and its latency histograms (for plots).
pub(crate) type RunResult = Result<(serde_json::Value, Vec<(String, Histogram<u64>)>), String>;

/// The `produce` workload's knobs (see `Cmd::Produce`).
struct ProduceLoad {
    stream: String,
    segments: u32,
    producers: u32,
    /// Events per producer (`u64::MAX`: until the time is up).
    count: u64,
    /// Sending stops this long after the start (warm-up included).
    duration: Option<std::time::Duration>,
    warmup: std::time::Duration,
    size: usize,
    keys: u32,
    inflight: usize,
    batch: usize,
    /// How its writers batch (`--linger-us`).
    writer: sluice_client::WriterConfig,
    /// Whether the clients time their append round trips (`--server-stats`).
    round_trips: bool,
    /// The stream's retention policy, if this run creates it.
    retention: sluice_net::Retention,
}

impl ProduceLoad {
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: String,
        segments: u32,
        producers: u32,
        count: Option<u64>,
        seconds: Option<f64>,
        warmup_s: f64,
        size: usize,
        keys: u32,
        inflight: usize,
        batch: usize,
    ) -> Result<Self, String> {
        let secs = |what: &str, v: f64| {
            std::time::Duration::try_from_secs_f64(v).map_err(|_| format!("{what} {v}: not a number of seconds"))
        };
        let warmup = secs("--warmup-s", warmup_s)?;
        let duration = match seconds {
            Some(s) if s <= 0.0 => return Err(format!("--seconds {s}: must be above 0")),
            Some(s) => Some(warmup + secs("--seconds", s)?),
            None => None,
        };
        if keys == 0 {
            return Err("--keys 0: a producer needs at least one routing key".into());
        }
        let count = count.unwrap_or(if duration.is_some() { u64::MAX } else { 1_000_000 });
        let writer = sluice_client::WriterConfig::default();
        let (round_trips, retention) = (false, sluice_net::Retention::None);
        Ok(Self {
            stream,
            segments,
            producers,
            count,
            duration,
            warmup,
            size,
            keys,
            inflight,
            batch,
            writer,
            round_trips,
            retention,
        })
    }
}

async fn produce(url: String, load: ProduceLoad) -> RunResult {
    let ProduceLoad {
        stream,
        segments,
        producers,
        count,
        duration,
        warmup,
        size,
        keys,
        inflight,
        batch,
        writer,
        round_trips,
        retention,
    } = load;
    let batch = batch.max(1) as u64;
    let admin = Client::connect(&url).await.map_err(|e| e.to_string())?;
    let (scope, name) = stream.split_once('/').ok_or("--stream must be scope/stream")?;
    let _ = admin.create_scope(scope).await;
    let fixed = sluice_net::ScalingPolicy::Fixed { segments };
    let created = admin.create_stream_policies(scope, name, segments, retention, fixed).await;
    if created.is_err()
        && retention != sluice_net::Retention::None
        && let Ok(info) = admin.get_stream(scope, name).await
        && info.retention != retention
    {
        eprintln!(
            "note: {stream} exists with retention {}; --retention {retention} applies to a new stream",
            info.retention
        );
    }
    let start = Instant::now();
    // Events sent before this are neither timed nor counted.
    let measured_from = start + warmup;
    let deadline = duration.map(|d| start + d);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = if count == u64::MAX { 0 } else { count * u64::from(producers) };
    let progress = tokio::spawn(progress_line(acked.clone(), total));
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (url, stream, acked) = (url.clone(), stream.clone(), acked.clone());
        // Unconstrained: tokio's cooperative budget would make a FuturesUnordered of thousands of
        // acknowledgements yield over and over, which throttles the producer (6x here).
        tasks.push(tokio::spawn(tokio::task::unconstrained(async move {
            let config = sluice_client::ClientConfig { measure_append_round_trips: round_trips, ..Default::default() };
            let client = Client::connect_with(&url, config).await.map_err(|e| e.to_string())?;
            let writer = client.event_writer_with(&stream, writer).await.map_err(|e| e.to_string())?;
            if round_trips {
                // The warm-up's round trips are not counted either.
                let c = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(measured_from.into()).await;
                    c.take_append_round_trips()
                });
            }
            let mut hist = micros_histogram();
            let payload = bytes::Bytes::from(vec![b'x'; size]);
            // Keys made once: the bench shares the cores with the server.
            let keys: Vec<String> = (0..keys).map(|k| format!("{p}-{k}")).collect();
            let timed = |sent: Instant| (sent >= measured_from).then_some(sent);
            let mut i = 0;
            if batch == 1 {
                // One future per event: awaited per key (see `inflight`).
                let mut outstanding = inflight::KeyedAcks::new(keys.len());
                while i < count {
                    let sent = Instant::now();
                    if deadline.is_some_and(|d| sent >= d) {
                        break;
                    }
                    let key = (i % keys.len() as u64) as usize;
                    outstanding.push(key, writer.write_event(keys[key].as_bytes(), payload.clone()), timed(sent));
                    i += 1;
                    while outstanding.len() >= inflight.max(1) {
                        let n = outstanding.next_ready(&mut hist).await?;
                        acked.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                while outstanding.len() > 0 {
                    outstanding.next_ready(&mut hist).await?;
                }
            } else {
                let mut pending = FuturesUnordered::new();
                let record = |hist: &mut Histogram<u64>, sent: Option<Instant>, n: u64| {
                    if let Some(sent) = sent {
                        hist.saturating_record_n(sent.elapsed().as_micros() as u64, n);
                    }
                };
                while i < count {
                    let sent = Instant::now();
                    if deadline.is_some_and(|d| sent >= d) {
                        break;
                    }
                    let n = batch.min(count - i);
                    let ack = peers::sluice_send(&writer, &keys, i, n, &payload);
                    i += n;
                    let sent = timed(sent);
                    pending.push(async move { (ack.await, sent, n) });
                    while pending.len() as u64 * batch >= inflight.max(1) as u64 {
                        let (r, sent, n) = pending.next().await.expect("non-empty");
                        r.map_err(|e| e.to_string())?;
                        record(&mut hist, sent, n);
                        acked.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                while let Some((r, sent, n)) = pending.next().await {
                    r.map_err(|e| e.to_string())?;
                    record(&mut hist, sent, n);
                }
            }
            Ok::<_, String>((hist, client.take_append_round_trips()))
        })));
    }
    let mut hist = micros_histogram();
    let mut trips: Option<sluice_client::stats::RoundTripHistogram> = None;
    for t in tasks {
        let (h, t) = t.await.map_err(|e| e.to_string())??;
        hist.add(h).map_err(|e| e.to_string())?;
        match (&mut trips, t) {
            (Some(all), Some(t)) => all.merge(&t),
            (None, t) => trips = t,
            (Some(_), None) => {}
        }
    }
    progress.abort();
    // The measured events: those sent after the warm-up, until the last acknowledgement.
    let secs = Instant::now().saturating_duration_since(measured_from).as_secs_f64().max(1e-9);
    let events = hist.len();
    if events == 0 {
        return Err(format!("no event was sent after the {:.1} s warm-up", warmup.as_secs_f64()));
    }
    let warm =
        if warmup.is_zero() { String::new() } else { format!(" (after a {:.1} s warm-up)", warmup.as_secs_f64()) };
    println!(
        "produce: {events} events x {size} B, {producers} producer(s), {:.1} s{warm}: {:.0} events/s, {:.1} MB/s",
        secs,
        events as f64 / secs,
        events as f64 * size as f64 / secs / 1e6
    );
    report("ack", &hist);
    let trips = trips.map(|t| t.latencies());
    if let Some(rt) = &trips {
        println!("{}", round_trips_line(rt));
    }
    let mut json = serde_json::json!({"workload": "produce", "stream": stream, "producers": producers, "events": events,
        "size": size, "keys": keys, "inflight": inflight, "batch": batch, "warmup_s": warmup.as_secs_f64(),
        "retention": retention.to_string(),
        "linger_us": writer.linger.as_micros() as u64,
        "seconds": secs, "events_per_s": events as f64 / secs,
        "mb_per_s": events as f64 * size as f64 / secs / 1e6, "ack": hist_json(&hist)});
    if let Some(rt) = &trips {
        json["client_round_trips"] = sluice_client::stats::latencies_json(rt);
    }
    Ok((json, vec![("ack".to_string(), hist)]))
}
