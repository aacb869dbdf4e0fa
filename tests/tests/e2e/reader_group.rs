//! Reader groups against the real server: exactly-once delivery across readers joining and
//! leaving, per-key order, checkpoints and reset, typed errors.

use sluice_client::{Client, ClientError, GroupItem, ReaderGroupConfig};
use sluice_tests::{Harness, Server, TempDir, free_ports};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EVENTS: u64 = 100_000;
const KEYS: u64 = 64;

async fn write_events(c: &Client, stream: &str, n: u64) {
    let w = c.event_writer(stream).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..n {
        let k = i % KEYS;
        acks.push(w.write_event(format!("k{k}").as_bytes(), format!("{k}:{}", i / KEYS).into_bytes()));
        if acks.len() >= 5000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// (global delivery order, key, seq)
type Log = Arc<Mutex<Vec<(u64, u64, u64)>>>;

fn parse(p: &[u8]) -> (u64, u64) {
    let s = std::str::from_utf8(p).unwrap();
    let (k, q) = s.split_once(':').unwrap();
    (k.parse().unwrap(), q.parse().unwrap())
}

/// Reads until `stop` says so; returns the reader's final positions.
fn spawn_reader(
    group: sluice_client::ReaderGroup,
    id: &str,
    log: Log,
    order: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
    stop_at: u64,
) -> tokio::task::JoinHandle<BTreeMap<String, u64>> {
    let id = id.to_string();
    tokio::spawn(async move {
        let mut r = group.create_reader(&id).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while order.load(Ordering::SeqCst) < stop_at && stop.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "reader {id} timed out");
            if let Some(GroupItem::Event(ev)) = r.read_next(Duration::from_millis(50)).await.unwrap() {
                let (k, q) = parse(&ev.payload);
                let n = order.fetch_add(1, Ordering::SeqCst);
                log.lock().unwrap().push((n, k, q));
            }
        }
        r.positions()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_join_and_leave_and_every_event_is_delivered_once() {
    let h = Harness::with_stream("rg", "s", 6).await;
    let c = h.client.clone();
    write_events(&c, "rg/s", EVENTS).await;

    let group = c.create_reader_group("rg", "g", ReaderGroupConfig::stream("rg/s")).await.unwrap();
    assert!(matches!(
        c.create_reader_group("rg", "g", ReaderGroupConfig::stream("rg/s")).await,
        Err(ClientError::GroupExists(_))
    ));
    let log: Log = Arc::default();
    let order = Arc::new(AtomicU64::new(0));
    let never = Arc::new(AtomicU64::new(0));
    let r1_stop = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in ["r2", "r3"] {
        tasks.push(spawn_reader(group.clone(), id, log.clone(), order.clone(), never.clone(), EVENTS));
    }
    let r1 = spawn_reader(group.clone(), "r1", log.clone(), order.clone(), r1_stop.clone(), EVENTS);

    // A fourth reader joins a third of the way in.
    while order.load(Ordering::SeqCst) < EVENTS / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(group.create_reader("r2").await, Err(ClientError::AlreadyInGroup { .. })));
    tasks.push(spawn_reader(group.clone(), "r4", log.clone(), order.clone(), never.clone(), EVENTS));
    // Reader 1 stops two thirds of the way in; its segments go to the others from where it was.
    while order.load(Ordering::SeqCst) < EVENTS * 2 / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r1_stop.store(1, Ordering::SeqCst);
    let r1_positions = r1.await.unwrap();
    group.reader_offline("r1", Some(r1_positions)).await.unwrap();
    assert!(matches!(group.reader_offline("r1", None).await, Err(ClientError::NotInGroup { .. })));
    for t in tasks {
        t.await.unwrap();
    }

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len() as u64, EVENTS, "delivered count");
    let mut seen = HashSet::new();
    let mut by_key: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    for &(n, k, q) in log.iter() {
        assert!(seen.insert((k, q)), "event {k}:{q} delivered twice");
        by_key.entry(k).or_default().push((n, q));
    }
    for (k, mut v) in by_key {
        v.sort();
        assert!(v.windows(2).all(|w| w[0].1 < w[1].1), "key {k} out of order");
        let written = EVENTS / KEYS + u64::from(k < EVENTS % KEYS);
        assert_eq!(v.len() as u64, written, "key {k}");
    }
    let state = group.state().await.unwrap();
    assert!(!state.readers.contains_key("r1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_then_reset_rereads_exactly_what_came_after() {
    let h = Harness::with_stream("cp", "s", 3).await;
    let c = h.client.clone();
    let total = 40_000;
    write_events(&c, "cp/s", total).await;
    let group = c.create_reader_group("cp", "g", ReaderGroupConfig::stream("cp/s")).await.unwrap();

    let delivered = Arc::new(AtomicU64::new(0));
    let after: Arc<Mutex<HashSet<(u64, u64)>>> = Arc::default();
    let mut tasks = Vec::new();
    for id in ["a", "b"] {
        let (group, delivered, after) = (group.clone(), delivered.clone(), after.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = group.create_reader(id).await.unwrap();
            let mut passed = false;
            let deadline = Instant::now() + Duration::from_secs(120);
            while delivered.load(Ordering::SeqCst) < total {
                assert!(Instant::now() < deadline);
                match r.read_next(Duration::from_millis(50)).await.unwrap() {
                    Some(GroupItem::Event(ev)) => {
                        if passed {
                            after.lock().unwrap().insert(parse(&ev.payload));
                        }
                        // Read slowly, so the checkpoint lands in the middle of the stream.
                        if delivered.fetch_add(1, Ordering::SeqCst) % 50 == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Some(GroupItem::Checkpoint(name)) => {
                        assert_eq!(name, "cp1");
                        passed = true;
                    }
                    None => {}
                }
            }
            // Keep answering the group until the checkpoint is surely complete, then leave.
            for _ in 0..5 {
                let _ = r.read_next(Duration::from_millis(20)).await.unwrap();
            }
            r.close().await.unwrap();
        }));
    }
    while delivered.load(Ordering::SeqCst) < total / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cp = group.initiate_checkpoint("cp1", Duration::from_secs(60)).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let after = after.lock().unwrap().clone();
    assert!(!after.is_empty() && (after.len() as u64) < total);
    assert_eq!(cp.cuts.len(), 1);

    // Reset to the checkpoint: a fresh reader gets exactly the events after it.
    group.reset(&cp.cuts).await.unwrap();
    let mut r = group.create_reader("c").await.unwrap();
    let mut again = HashSet::new();
    while let Some(item) = r.read_next(Duration::from_secs(2)).await.unwrap() {
        if let GroupItem::Event(ev) = item {
            assert!(again.insert(parse(&ev.payload)), "duplicate after reset");
        }
    }
    assert_eq!(again.len(), after.len(), "re-read count");
    assert!(again == after, "re-read set differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_cut_stops_readers_and_marks_segments_finished() {
    let h = Harness::with_stream("e", "s", 3).await;
    let c = h.client.clone();
    write_events(&c, "e/s", 3000).await;
    let end = c.stream_cut("e/s", sluice_client::CutAt::Tail).await.unwrap();
    write_events(&c, "e/s", 1000).await;
    let mut config = ReaderGroupConfig::stream("e/s");
    config.streams[0].to = Some(end);
    let group = c.create_reader_group("e", "g", config).await.unwrap();
    let mut r = group.create_reader("only").await.unwrap();
    let mut n = 0;
    let first = r.read_next(Duration::from_secs(5)).await.unwrap();
    n += u32::from(matches!(first, Some(GroupItem::Event(_))));
    // Events already fetched come without any time to wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = r.read_next(Duration::ZERO).await.unwrap();
    assert!(matches!(ready, Some(GroupItem::Event(_))), "an event already fetched: {ready:?}");
    n += 1;
    while let Some(item) = r.read_next(Duration::from_secs(1)).await.unwrap() {
        if let GroupItem::Event(_) = item {
            n += 1;
        }
    }
    // 3000 events before the cut, 1000 after it: exactly the first 3000 are read.
    assert_eq!(n, 3000, "exactly the events before the end cut");
    let state = group.state().await.unwrap();
    assert_eq!(state.finished.len(), 3, "every segment finished at the cut");
    assert!(state.readers["only"].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_survive_a_server_kill() {
    let dir = TempDir::new("rgkill");
    let server = Arc::new(Mutex::new(Server::start(&dir.0.join("data"), free_ports(2), 2)));
    let url = server.lock().unwrap().url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("k").await.unwrap();
    c.create_stream("k", "s", 4).await.unwrap();
    let total = 20_000;
    write_events(&c, "k/s", total).await;
    // The readers compact the group state every 100 ms, so the kill also lands around
    // compactions (a snapshot appended, its truncation not yet sent, or sent and lost).
    let mut config = ReaderGroupConfig::stream("k/s");
    config.compact_state_every = Duration::from_millis(100);
    let group = c.create_reader_group("k", "g", config).await.unwrap();
    let log: Log = Arc::default();
    let order = Arc::new(AtomicU64::new(0));
    let never = Arc::new(AtomicU64::new(0));
    let _ = never;
    let tasks: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|id| {
            let (group, log, order) = (group.clone(), log.clone(), order.clone());
            tokio::spawn(async move {
                let mut r = group.create_reader(id).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                while order.load(Ordering::SeqCst) < total {
                    assert!(Instant::now() < deadline, "reader {id} timed out");
                    if let Some(GroupItem::Event(ev)) = r.read_next(Duration::from_millis(50)).await.unwrap() {
                        let (k, q) = parse(&ev.payload);
                        let n = order.fetch_add(1, Ordering::SeqCst);
                        log.lock().unwrap().push((n, k, q));
                        // Slow enough that the kill lands mid-stream.
                        if n % 20 == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            })
        })
        .collect();
    while order.load(Ordering::SeqCst) < total / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = server.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = s.lock().unwrap();
        s.kill();
        s.restart();
    })
    .await
    .unwrap();
    let at_restart = order.load(Ordering::SeqCst);
    assert!(at_restart < total, "the kill came after the readers were done");
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let unique: HashSet<(u64, u64)> = log.iter().map(|&(_, k, q)| (k, q)).collect();
    assert_eq!(unique.len() as u64, total, "every event delivered");
    assert_eq!(log.len() as u64, total, "none delivered twice");
    let state = c.segment_info("k/_rg_g/0").await.unwrap();
    assert!(state.start_offset > 0, "the state was compacted: {state:?}");
}

/// (start offset, bytes held) of a reader group's state segment.
async fn state_segment(c: &Client, scope: &str, group: &str) -> (u64, u64) {
    let si = c.segment_info(&format!("{scope}/_rg_{group}/0")).await.unwrap();
    (si.start_offset, si.length - si.start_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_readers_keep_their_group_state_compacted() {
    let h = Harness::with_stream("rgc", "s", 4).await;
    let c = h.client.clone();
    let total = 20_000;
    write_events(&c, "rgc/s", total).await;
    let mut config = ReaderGroupConfig::stream("rgc/s");
    config.compact_state_every = Duration::from_millis(300);
    let fast = c.create_reader_group("rgc", "fast", config).await.unwrap();
    // The same readers with the default (10 s): not compacted within this test.
    let slow = c.create_reader_group("rgc", "slow", ReaderGroupConfig::stream("rgc/s")).await.unwrap();
    let stop = Arc::new(AtomicU64::new(0));
    let mut runs = Vec::new();
    for group in [&fast, &slow] {
        let (log, order): (Log, _) = (Arc::default(), Arc::new(AtomicU64::new(0)));
        let readers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|id| spawn_reader(group.clone(), id, log.clone(), order.clone(), stop.clone(), u64::MAX))
            .collect();
        runs.push((log, order, readers));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while runs.iter().any(|(_, order, _)| order.load(Ordering::SeqCst) < total) {
        assert!(Instant::now() < deadline, "the readers did not read everything");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Readers at the end keep refreshing: positions reported (once a second), state compacted;
    // a checkpoint taken meanwhile (its pending state in the snapshots) ends at the tails.
    let mut lengths = BTreeMap::new();
    for n in 0..4 {
        let name = format!("rgc/s/{n}");
        lengths.insert(name.clone(), c.segment_info(&name).await.unwrap().length);
    }
    let waited = Instant::now();
    let cp = fast.initiate_checkpoint("cp", Duration::from_secs(10)).await.unwrap();
    let at: BTreeMap<String, u64> = cp.cuts[0].positions.iter().map(|(&n, &o)| (format!("rgc/s/{n}"), o)).collect();
    assert_eq!(at, lengths, "the checkpoint is at the tails");
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(waited.elapsed())).await;
    stop.store(1, Ordering::SeqCst);
    for (log, _, readers) in runs {
        for r in readers {
            r.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let unique: HashSet<(u64, u64)> = log.iter().map(|&(_, k, q)| (k, q)).collect();
        assert_eq!((unique.len() as u64, log.len() as u64), (total, total), "every event once");
        let mut last: HashMap<u64, u64> = HashMap::new();
        for (_, k, q) in log {
            assert!(last.insert(k, q).is_none_or(|p| p < q), "key {k} out of order");
        }
    }
    let (fast_start, fast_held) = state_segment(&c, "rgc", "fast").await;
    let (slow_start, slow_held) = state_segment(&c, "rgc", "slow").await;
    eprintln!(
        "state segments: compacted every 300 ms from {fast_start}, {fast_held} bytes; default from {slow_start}, {slow_held} bytes"
    );
    assert_eq!(slow_start, 0, "not compacted within 10 s");
    assert!(fast_start > 0, "compacted while the readers ran");
    assert!(fast_held < slow_held, "a snapshot and the few updates since ({fast_held} against {slow_held} bytes)");
    // The compacted state is the same: both readers hold the four segments, reported at
    // their ends; a newcomer joins from it and takes its share once the others give theirs up.
    for group in [&fast, &slow] {
        let state = group.state().await.unwrap();
        let held: BTreeMap<String, u64> = state.readers.values().flatten().map(|(s, &o)| (s.clone(), o)).collect();
        assert_eq!(held, lengths, "{}: every segment held and reported at its end", group.name());
        assert_eq!(state.completed.iter().any(|cp| cp.name == "cp"), group.name() == "rgc/fast");
    }
    let mut late = fast.create_reader("c").await.unwrap();
    assert!(late.read_next(Duration::from_millis(300)).await.unwrap().is_none(), "nothing left to read");
    fast.reader_offline("a", None).await.unwrap();
    fast.reader_offline("b", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while late.positions() != lengths {
        assert!(Instant::now() < deadline, "the newcomer took {:?}", late.positions());
        assert!(late.read_next(Duration::from_millis(50)).await.unwrap().is_none(), "no event read twice");
    }
}
