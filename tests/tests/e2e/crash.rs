//! SIGKILL the real server under load, three times, and restart it: every acknowledged event
//! must be read back exactly once, with per-key order kept for every writer. Run once on
//! the log alone with one flush in flight per container (`--flush-depth 1`; the other runs
//! have the default two, where a kill may leave a torn record and the one written beside
//! it), once with tier-2, where a small log budget and small chunks keep the
//! mover uploading (and the log freeing files) at every kill, and once without tier-2 with
//! the stream truncated every 50 ms (at its tail of 100 ms before), so that truncated data
//! frees log files at every kill: there every acknowledged event from the first one read of
//! its key on must read back.

use futures_lite::JoinSet;
use sluice_client::{Client, CutAt, ReadFrom};
use sluice_tests::{Server, TempDir, free_ports};
use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod futures_lite {
    pub use tokio::task::JoinSet;
}

const WRITERS: u64 = 4;
const KEYS: u64 = 8;
const PER_WRITER: u64 = 30_000;
const INFLIGHT: usize = 2_000;
const KILLS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing() {
    let dir = TempDir::new("crash");
    sigkill_under_load(&dir, &["--flush-depth", "1"], 0, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_truncations_free_the_log_loses_nothing_kept() {
    let dir = TempDir::new("crash-truncating");
    let kept = sigkill_under_load(&dir, &["--log-file-mb", "1"], 200, true).await;
    let files = walk_files(&dir.0.join("data").join("containers"));
    let logs = files.iter().filter(|p| p.extension().is_some_and(|x| x == "log")).count() as u64;
    // ~110 MB written in 1 MiB files over two containers; what is kept (events of ~220
    // bytes) and, per container, the file holding its oldest data, the current and the next.
    let bound = kept * 256 / (1 << 20) + 2 * 4;
    assert!(logs <= bound, "{logs} log files for {kept} events kept: truncated data freed its files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_tier2_uploads_loses_nothing() {
    let dir = TempDir::new("crash-tier2");
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    // Log files only allocated, never zero-filled: records go into unwritten extents across
    // many file rolls (`--log-prefill auto` under heavy load).
    let mut args = sluice_tests::small_log_with_tier2(&tier2);
    args.extend(["--log-prefill".to_string(), "never".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sigkill_under_load(&dir, &args, 200, false).await;
    let chunks = walk_files(&dir.0.join("tier2"));
    eprintln!("{} chunk files on tier-2", chunks.len());
    assert!(chunks.len() > 8, "the mover uploaded chunks: {chunks:?}");
    let files = walk_files(&dir.0.join("data").join("containers"));
    let with_ext = |ext: &str| files.iter().filter(|p| p.extension().is_some_and(|x| x == ext)).count();
    let (logs, spares) = (with_ext("log"), with_ext("spare"));
    // 4 containers, each within its 8 MiB budget of 1 MiB files, and up to 2 spares each.
    assert!(logs <= 4 * 8 + 1, "{logs} log files: the mover freed the log");
    assert!(spares <= 4 * 2, "{spares} spare files");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out
}

/// Takes a tail cut of the stream every 50 ms and truncates it at the cut of two rounds
/// before, until `stop`, counting the truncations in `done`. Calls that meet a restart wait
/// for the server (the client's retry window).
async fn truncate_behind_the_tail(url: String, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let c = Client::connect(&url).await.unwrap();
    let mut cuts = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(cut) = c.stream_cut("crash/events", CutAt::Tail).await {
            cuts.push_back(cut);
        }
        if cuts.len() > 2 {
            let cut = cuts.pop_front().unwrap();
            if c.truncate_stream(&cut).await.is_ok() {
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events carry `pad` extra bytes. With `truncating`, the stream is truncated behind its
/// tail meanwhile (`truncate_behind_the_tail`): each key loses a prefix of its events.
/// Returns how many events were read back.
async fn sigkill_under_load(dir: &TempDir, extra: &[&str], pad: usize, truncating: bool) -> u64 {
    // Truncating, the writers write longer, so that truncations go on between the kills.
    let per_writer = if truncating { 4 * PER_WRITER } else { PER_WRITER };
    let port = free_ports(2);
    let server = Arc::new(Mutex::new(Server::start_with(&dir.0.join("data"), port, 2, extra)));
    let url = server.lock().unwrap().url();
    let admin = Client::connect(&url).await.unwrap();
    admin.create_scope("crash").await.unwrap();
    admin.create_stream("crash", "events", 4).await.unwrap();
    let (stop_truncating, truncations) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    // On a thread of its own: the writers' tasks keep the test's runtime busy.
    let truncator = truncating.then(|| {
        let (url, stop, done) = (url.clone(), stop_truncating.clone(), truncations.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(truncate_behind_the_tail(url, stop, done))
        })
    });

    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let (url, acked) = (url.clone(), acked.clone());
        writers.spawn(async move {
            let client = Client::connect(&url).await.unwrap();
            let writer = client.event_writer("crash/events").await.unwrap();
            let mut inflight = JoinSet::new();
            let mut done: Vec<(u64, u64, u64)> = Vec::new();
            let mut seq = [0u64; KEYS as usize];
            for i in 0..per_writer {
                let k = (i * 7 + w) % KEYS;
                let s = seq[k as usize];
                seq[k as usize] += 1;
                let ack = writer.write_event(
                    format!("key-{k}").as_bytes(),
                    format!("{w}:{k}:{s}:payload{}", "p".repeat(pad)).into_bytes(),
                );
                inflight.spawn(async move { ack.await.map(|_| (w, k, s)) });
                while inflight.len() >= INFLIGHT {
                    let r = inflight.join_next().await.unwrap().unwrap();
                    done.push(r.expect("every write is eventually acknowledged"));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(r) = inflight.join_next().await {
                done.push(r.unwrap().expect("every write is eventually acknowledged"));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            done
        });
    }

    // Kill the server mid-stream, three times (truncating, each after two more truncations).
    let total = WRITERS * per_writer;
    let started = Instant::now();
    let truncated = |n: u64| !truncating || truncations.load(Ordering::Relaxed) >= 2 * n;
    for n in 1..=KILLS {
        while acked.load(Ordering::Relaxed) < total * n / (KILLS + 2) || !truncated(n) {
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "writers stalled at {}",
                acked.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at = acked.load(Ordering::Relaxed);
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = server.lock().unwrap();
            s.kill();
            std::thread::sleep(Duration::from_millis(200));
            s.restart();
        })
        .await
        .unwrap();
        eprintln!("kill {n}: SIGKILL after {at} acknowledged events; restarted");
    }

    let mut acked_events: HashSet<(u64, u64, u64)> = HashSet::new();
    while let Some(r) = writers.join_next().await {
        acked_events.extend(r.unwrap());
    }
    assert_eq!(acked_events.len() as u64, total);
    if let Some(t) = truncator {
        stop_truncating.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || t.join().unwrap()).await.unwrap();
        eprintln!("{} truncations", truncations.load(Ordering::Relaxed));
    }

    // Read everything back.
    let client = Client::connect(&url).await.unwrap();
    let mut reader = client.event_reader("crash/events", ReadFrom::Head).await.unwrap();
    let mut seen: HashSet<(u64, u64, u64)> = HashSet::new();
    let mut last: HashMap<(u64, u64), u64> = HashMap::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(3)).await.unwrap() {
        let text = std::str::from_utf8(&ev.payload).unwrap();
        let mut f = text.split(':').map(|x| x.parse::<u64>());
        let (w, k, s) = (f.next().unwrap().unwrap(), f.next().unwrap().unwrap(), f.next().unwrap().unwrap());
        assert!(seen.insert((w, k, s)), "event {w}:{k}:{s} read twice");
        if let Some(prev) = last.insert((w, k), s) {
            assert!(s > prev, "per-key order broken for writer {w} key {k}: {s} after {prev}");
        }
    }
    // Truncated, a key loses a prefix: everything from its first event read on is kept.
    let mut first: HashMap<(u64, u64), u64> = HashMap::new();
    for &(w, k, s) in &seen {
        let f = first.entry((w, k)).or_insert(s);
        *f = (*f).min(s);
    }
    let kept = |&&(w, k, s): &&(u64, u64, u64)| !truncating || first.get(&(w, k)).is_some_and(|&f| s >= f);
    let mut missing: Vec<_> = acked_events.difference(&seen).filter(kept).collect();
    missing.sort();
    eprintln!("{} missing: {:?}", missing.len(), &missing[..missing.len().min(20)]);
    assert!(missing.is_empty(), "acknowledged events lost, e.g. {missing:?}");
    assert!(seen.is_subset(&acked_events), "events read that were never written");
    if truncating {
        let gone = total - seen.len() as u64;
        eprintln!("{gone} of {total} events truncated away; {} read back", seen.len());
        assert!(gone > total / 4, "much of the stream was truncated ({gone} of {total} events)");
        assert!(!seen.is_empty(), "the last truncation kept the newest events");
    } else {
        assert_eq!(seen.len() as u64, total, "every event read back");
    }
    assert!(server.lock().unwrap().is_running());
    seen.len() as u64
}
