//! SIGKILL the real server under load, three times, and restart it: every acknowledged event
//! must be read back exactly once, with per-key order kept for every writer. Run once on
//! the log alone and once with tier-2, where a small log budget and small chunks keep the
//! mover uploading (and the log freeing files) at every kill.

use futures_lite::JoinSet;
use sluice_client::{Client, ReadFrom};
use sluice_tests::{Server, TempDir, free_ports};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
    sigkill_under_load(&dir, &[], 0).await;
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
    sigkill_under_load(&dir, &args, 200).await;
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

/// Events carry `pad` extra bytes.
async fn sigkill_under_load(dir: &TempDir, extra: &[&str], pad: usize) {
    let port = free_ports(2);
    let server = Arc::new(Mutex::new(Server::start_with(&dir.0.join("data"), port, 2, extra)));
    let url = server.lock().unwrap().url();
    let admin = Client::connect(&url).await.unwrap();
    admin.create_scope("crash").await.unwrap();
    admin.create_stream("crash", "events", 4).await.unwrap();

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
            for i in 0..PER_WRITER {
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

    // Kill the server mid-stream, three times.
    let total = WRITERS * PER_WRITER;
    let started = Instant::now();
    for n in 1..=KILLS {
        while acked.load(Ordering::Relaxed) < total * n / (KILLS + 2) {
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
    let mut missing: Vec<_> = acked_events.difference(&seen).collect();
    missing.sort();
    eprintln!("{} missing: {:?}", missing.len(), &missing[..missing.len().min(20)]);
    assert!(missing.is_empty(), "acknowledged events lost, e.g. {missing:?}");
    assert_eq!(seen.len() as u64, total, "events read that were never written");
    assert!(server.lock().unwrap().is_running());
}
