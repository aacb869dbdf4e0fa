//! Client building blocks against the real server: the state synchronizer (concurrent
//! updaters in tasks and in separate processes, with compaction, and across SIGKILLs),
//! stream cuts, batch reads
//! between cuts, and byte streams.

use bytes::Bytes;
use sluice_client::{Client, ClientError, CutAt, StreamCut, Synchronized};
use sluice_tests::{Harness, Server, TempDir, free_ports};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A counter whose update is "set to v", computed from the value seen: a lost update would
/// show as a final count below the number of increments.
#[derive(Clone, Debug)]
struct Counter(u64);

impl Synchronized for Counter {
    type Update = u64;
    fn encode(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(Counter(u64::from_le_bytes(b.try_into().map_err(|_| "bad counter")?)))
    }
    fn encode_update(u: &u64) -> Vec<u8> {
        u.to_le_bytes().to_vec()
    }
    fn decode_update(b: &[u8]) -> Result<u64, String> {
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "bad update")?))
    }
    fn apply(&mut self, u: &u64) {
        self.0 = *u;
    }
}

const K: u64 = 40;

async fn increment(url: &str, times: u64, compact_every: Option<u64>) {
    let c = Client::connect(url).await.unwrap();
    let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
    sync.initialize(Counter(0)).await.unwrap();
    for i in 0..times {
        sync.update_state(|s| vec![s.0 + 1]).await.unwrap();
        if compact_every.is_some_and(|n| i % n == n - 1) {
            sync.compact().await.unwrap();
        }
    }
}

/// Child-process half of the synchronizer test (does nothing unless spawned by it).
#[tokio::test]
async fn child_increment() {
    if let Ok(url) = std::env::var("SLUICE_SYNC_CHILD_URL") {
        increment(&url, K, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronizer_counter_has_no_lost_updates() {
    let dir = TempDir::new("sync");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let url = server.url();
    Client::connect(&url).await.unwrap().create_scope("sync").await.unwrap();
    let exe = std::env::current_exe().unwrap();
    // The child test's full name in this binary (the module path without the crate's name).
    let child = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::child_increment"),
        None => "child_increment".into(),
    };
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([child.as_str(), "--exact", "--quiet"])
                .env("SLUICE_SYNC_CHILD_URL", &url)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let url = url.clone();
            tokio::spawn(async move { increment(&url, K, (t == 0).then_some(15)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for ch in children {
        let out = tokio::task::spawn_blocking(move || ch.wait_with_output().unwrap()).await.unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        // A name that matched no test would pass without incrementing anything.
        assert!(out.status.success() && said.contains("1 passed"), "child {child}: {said}");
    }
    let c = Client::connect(&url).await.unwrap();
    let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
    sync.fetch_updates().await.unwrap();
    assert_eq!(sync.state().unwrap().0, 6 * K, "6 updaters x {K} increments");
    // Compaction really truncated: the segment starts past 0 and a fresh reader still agrees.
    assert!(c.segment_info("sync/counter/0").await.unwrap().start_offset > 0);
}

/// SIGKILL while updaters increment: an update whose append was durable but whose answer
/// the kill lost is resent after the restart; it must count once (the resend is recognized
/// as a duplicate), not fail its check against itself and be applied again on the re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronizer_counts_each_update_once_across_kills() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const TASKS: u64 = 4;
    const EACH: u64 = 400;
    let dir = TempDir::new("synckill");
    let mut server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let url = server.url();
    Client::connect(&url).await.unwrap().create_scope("sync").await.unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (url, done) = (url.clone(), done.clone());
            tokio::spawn(async move {
                let c = Client::connect(&url).await.unwrap();
                let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
                sync.initialize(Counter(0)).await.unwrap();
                for i in 0..EACH {
                    sync.update_state(|s| vec![s.0 + 1]).await.unwrap();
                    if t == 0 && i % 100 == 99 {
                        sync.compact().await.unwrap();
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let mut kills = 0;
    for at in [TASKS * EACH / 5, TASKS * EACH / 2, TASKS * EACH * 4 / 5] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::SeqCst) < at {
            assert!(std::time::Instant::now() < deadline, "updates stalled at {}", done.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        server.kill();
        server.restart();
        kills += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = Client::connect(&url).await.unwrap();
    let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
    sync.fetch_updates().await.unwrap();
    assert_eq!(sync.state().unwrap().0, TASKS * EACH, "{TASKS} updaters x {EACH} increments, {kills} kills");
}

/// A slow disk (flushes paced at 20/s) keeps the winner of a race accepted but not durable
/// for up to 50 ms. The loser's retries must wait for those bytes instead of failing again at
/// once: with 20 attempts each, two updaters of 10 increments each never run out (each can
/// lose at most 10 times in a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronizer_retries_wait_for_the_winner_on_a_slow_disk() {
    let dir = TempDir::new("syncslow");
    let server = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &["--iops-limit", "20"]);
    let url = server.url();
    Client::connect(&url).await.unwrap().create_scope("sync").await.unwrap();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = Client::connect(&url).await.unwrap();
                let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
                sync.max_attempts = 20;
                sync.initialize(Counter(0)).await.unwrap();
                for _ in 0..10 {
                    sync.update_state(|s| vec![s.0 + 1]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let c = Client::connect(&url).await.unwrap();
    let mut sync = c.state_synchronizer::<Counter>("sync", "counter").await.unwrap();
    sync.fetch_updates().await.unwrap();
    assert_eq!(sync.state().unwrap().0, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_batch_reads_and_byte_streams() {
    let h = Harness::with_stream("b", "s", 4).await;
    let c = h.client.clone();
    let w = c.event_writer("b/s").await.unwrap();
    for i in 0..1000 {
        w.write_event(format!("k{}", i % 10).as_bytes(), format!("before-{i}").into_bytes());
    }
    w.flush().await.unwrap();
    let from = c.stream_cut("b/s", CutAt::Tail).await.unwrap();
    // 2 KiB each: several 1 MiB reads per slice (the slice reader reads ahead).
    for i in 0..3000 {
        w.write_event(format!("k{}", i % 10).as_bytes(), format!("between-{i}-{}", "x".repeat(2048)).into_bytes());
    }
    w.flush().await.unwrap();
    let to = c.stream_cut("b/s", CutAt::Tail).await.unwrap();
    for i in 0..500 {
        w.write_event(format!("k{}", i % 10).as_bytes(), format!("after-{i}").into_bytes());
    }
    w.flush().await.unwrap();

    // Cuts survive their text form; bad ones get typed errors.
    let text = from.to_text();
    assert_eq!(StreamCut::from_text(&text).unwrap(), from);
    assert!(matches!(StreamCut::from_text("bm90IGEgY3V0"), Err(ClientError::InvalidStreamCut(_))));
    let mut foreign = from.clone();
    foreign.stream = sluice_net::ScopedStream::new("b", "other");
    assert!(matches!(c.segment_slices("b/s", Some(&foreign), Some(&to)).await, Err(ClientError::InvalidStreamCut(_))));
    let mut beyond = to.clone();
    *beyond.positions.get_mut(&0).unwrap() += 1_000_000;
    assert!(matches!(c.validate_cut(&beyond).await, Err(ClientError::InvalidStreamCut(_))));
    let mut unknown = to.clone();
    unknown.positions.insert(99, 0);
    assert!(matches!(c.validate_cut(&unknown).await, Err(ClientError::InvalidStreamCut(_))));

    // Batch: all slices read in parallel give exactly the events between the cuts.
    let slices = c.segment_slices("b/s", Some(&from), Some(&to)).await.unwrap();
    assert_eq!(slices.len(), 4);
    let mut jobs = Vec::new();
    for s in slices {
        let c = c.clone();
        jobs.push(tokio::spawn(async move {
            let mut r = c.read_slice(s);
            let mut out = Vec::new();
            while let Some(ev) = r.next_event().await.unwrap() {
                out.push(String::from_utf8(ev.payload.to_vec()).unwrap());
            }
            out
        }));
    }
    let mut got = HashSet::new();
    for j in jobs {
        for e in j.await.unwrap() {
            assert!(e.starts_with("between-") && e.ends_with('x'), "{e:.40} is outside the cuts or cut short");
            assert!(got.insert(e));
        }
    }
    assert_eq!(got.len(), 3000);

    // Byte streams: write, read with seek and available, truncate, seal.
    c.create_byte_stream("b", "bytes").await.unwrap();
    let mut bw = c.byte_writer("b/bytes").await.unwrap();
    assert_eq!(bw.write(Bytes::from_static(b"hello ")).await.unwrap(), 0);
    assert_eq!(bw.write(Bytes::from_static(b"world")).await.unwrap(), 6);
    bw.flush().await.unwrap();
    let mut br = c.byte_reader("b/bytes").await.unwrap();
    assert_eq!(br.available().await.unwrap(), 11);
    assert_eq!(&br.read(5, Duration::ZERO).await.unwrap()[..], b"hello");
    br.seek(6);
    assert_eq!(&br.read(100, Duration::ZERO).await.unwrap()[..], b"world");
    assert_eq!(br.available().await.unwrap(), 0);
    bw.truncate_before(6).await.unwrap();
    br.seek(0);
    assert_eq!(br.read(10, Duration::ZERO).await.unwrap_err().code(), Some(sluice_net::ErrorCode::Truncated));
    bw.seal().await.unwrap();
    assert_eq!(bw.write(Bytes::from_static(b"!")).await.unwrap_err().code(), Some(sluice_net::ErrorCode::Sealed));
    br.seek(11);
    assert!(br.read(10, Duration::from_secs(2)).await.unwrap().is_empty());
}

/// `write_events`: one future per call, order per key as with `write_event`, also while a
/// split redirects the calls in flight; an oversized event refuses the whole call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_keep_order_across_a_split_and_refuse_whole() {
    let dir = TempDir::new("batched");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("bw").await.unwrap();
    c.create_stream("bw", "s", 2).await.unwrap();
    let w = c.event_writer("bw/s").await.unwrap();
    const KEYS: u64 = 8;
    const CALLS: u64 = 40;
    const PER_CALL: u64 = 100;
    let mut acks = Vec::new();
    for call in 0..CALLS {
        let events = (0..PER_CALL).map(|i| {
            let n = call * PER_CALL + i;
            (format!("key-{}", n % KEYS), Bytes::from(format!("{}:{}", n % KEYS, n / KEYS)))
        });
        acks.push(w.write_events(events));
        if call == CALLS / 2 {
            c.split_segment("bw", "s", 0, 2).await.unwrap();
        }
    }
    let too_big =
        vec![(b"key-0".to_vec(), Bytes::from_static(b"never")), (b"key-1".to_vec(), Bytes::from(vec![0u8; 9 << 20]))];
    let err = w.write_events(too_big).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err:?}");
    assert!(w.write_events(Vec::<(&[u8], Bytes)>::new()).await.is_ok(), "an empty call is done at once");
    for a in acks {
        a.await.unwrap();
    }
    c.seal_stream("bw", "s").await.unwrap();
    let mut r = c.event_reader("bw/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut next = vec![0u64; KEYS as usize];
    let mut total = 0;
    while let Some(e) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        let text = String::from_utf8(e.payload.to_vec()).unwrap();
        assert_ne!(text, "never", "an event of the refused call was written");
        let (k, i) = text.split_once(':').unwrap();
        let (k, i): (usize, u64) = (k.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[k], "key {k}: events out of order or duplicated");
        next[k] += 1;
        total += 1;
    }
    assert_eq!(total, CALLS * PER_CALL, "every event exactly once");
}

/// Shards that poll before they sleep (`--idle-spin-us`) serve writes and tail reads as
/// usual, and the node stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_that_poll_before_sleeping_serve_as_usual() {
    let dir = TempDir::new("spin");
    let mut server = Server::start_with(&dir.0.join("data"), free_ports(2), 2, &["--idle-spin-us", "500"]);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("sp").await.unwrap();
    c.create_stream("sp", "s", 2).await.unwrap();
    let w = c.event_writer("sp/s").await.unwrap();
    let mut r = c.event_reader("sp/s", sluice_client::ReadFrom::Head).await.unwrap();
    for i in 0..200u32 {
        // One event in flight, read back at the tail each time.
        w.write_event(b"k", i.to_le_bytes().to_vec()).await.unwrap();
        let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("the event just written");
        assert_eq!(e.payload.as_ref(), i.to_le_bytes());
    }
    assert!(server.terminate(Duration::from_secs(10)), "the node stops on SIGTERM");
}

/// `--flush-linger-us`: a container busy with small appends waits before each flush that
/// follows another, so that flushes carry more (about one per linger while busy); an
/// append that finds the container idle is flushed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_container_lingers_before_small_flushes_and_an_idle_one_does_not() {
    // Short enough that a linger's worth of the writer's batches stays within its window of
    // batches in flight (else it holds events back until acknowledgements come).
    const LINGER_MS: u64 = 5;
    let dir = TempDir::new("linger");
    let linger = (LINGER_MS * 1000).to_string();
    let mut server = Server::start_with(
        &dir.0.join("data"),
        free_ports(1),
        1,
        &["--containers-per-core", "1", "--flush-linger-us", &linger],
    );
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("li").await.unwrap();
    c.create_stream("li", "s", 1).await.unwrap();
    let w = c.event_writer("li/s").await.unwrap();
    // Idle: one event in flight, so each append finds the container idle and never waits
    // (were it to wait, even the fastest of them would take the linger).
    let mut fastest = Duration::MAX;
    for i in 0..30u32 {
        let started = std::time::Instant::now();
        w.write_event(b"k", i.to_le_bytes().to_vec()).await.unwrap();
        fastest = fastest.min(started.elapsed());
    }
    assert!(
        fastest < Duration::from_millis(LINGER_MS),
        "the fastest of 30 appends one at a time took {fastest:?}: appends to an idle container must not linger"
    );
    // Busy: a small event every 100 µs from a thread, without waiting for acknowledgements
    // (open loop), so events arrive while flushes run (a linger's worth stays under the
    // 64 KiB that is flushed without waiting).
    c.shard_stats(true).await.unwrap();
    let started = std::time::Instant::now();
    let acks = tokio::task::spawn_blocking(move || {
        let mut acks = Vec::new();
        for i in 0..15_000u32 {
            let due = started + Duration::from_micros(100) * i;
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            acks.push(w.write_event(b"k", i.to_le_bytes().to_vec()));
        }
        acks
    })
    .await
    .unwrap();
    for a in acks {
        a.await.unwrap();
    }
    let busy = started.elapsed();
    let flushes = c.shard_stats(false).await.unwrap()[0].flushes.count;
    // A pause of the writer longer than a flush ends the busy spell (the next flush does not
    // wait): on a loaded machine that happens now and then, hence three times the ideal
    // count (twice was exceeded once on a fresh CI machine: 674 flushes in 1.5 s against 620).
    // Without lingering there are thousands (8,174 in one run).
    let bound = 3 * busy.as_millis() as u64 / LINGER_MS + 20;
    println!("{flushes} flushes in {busy:?} (at most {bound})");
    assert!(flushes <= bound, "{flushes} flushes in {busy:?}: a busy container flushes about once per linger");
    // Every event is there once, in order.
    let mut r = c.event_reader("li/s", sluice_client::ReadFrom::Head).await.unwrap();
    for i in (0..30u32).chain(0..15_000) {
        let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("every event");
        assert_eq!(e.payload.as_ref(), i.to_le_bytes());
    }
    assert!(server.terminate(Duration::from_secs(10)), "the node stops on SIGTERM");
}

/// A container whose log can no longer be written (its directory removed under the running
/// server) refuses appends with a retryable error for as long as the node runs. A writer
/// gives up after its retry window (here 2 s) instead of resending forever: each resend
/// reached the server and failed again, and the window used to start over each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_poisoned_container_fail_after_the_retry_window() {
    let dir = TempDir::new("poison");
    let data = dir.0.join("data");
    let server = Server::start_with(&data, free_ports(1), 1, &["--log-file-mb", "1", "--containers-per-core", "1"]);
    let cfg = sluice_client::ClientConfig { retry_for: Duration::from_secs(2), ..Default::default() };
    let c = Client::connect_with(&server.url(), cfg).await.unwrap();
    c.create_scope("po").await.unwrap();
    c.create_stream("po", "s", 1).await.unwrap();
    let w = c.event_writer("po/s").await.unwrap();
    w.write_event(b"k", vec![1u8; 100]).await.unwrap();
    std::fs::remove_dir_all(data.join("containers")).unwrap();
    // 6 MiB: past the files prepared in advance, so the log must create one.
    let acks: Vec<_> = (0..6 * 1024).map(|_| w.write_event(b"k", vec![0u8; 1024])).collect();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        let mut failed = None;
        for a in acks {
            if let Err(e) = a.await {
                failed.get_or_insert(e);
            }
        }
        failed
    })
    .await
    .expect("every write settled within the retry window, none hung");
    let e = outcome.expect("writes into a container that cannot write its log fail");
    assert_eq!(e.code(), Some(sluice_net::ErrorCode::ContainerPoisoned), "{e}");
}

/// Scope and stream lists come a page at a time (a scope with tens of thousands of streams
/// does not fit one answer); the plain calls and `sluice stream list` add the pages up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_and_stream_lists_come_in_pages() {
    let h = Harness::with_stream("pg", "s00", 1).await;
    let c = &h.client;
    for i in 1..12 {
        c.create_stream("pg", &format!("s{i:02}"), 1).await.unwrap();
    }
    c.create_scope("pg2").await.unwrap();
    let mut sizes = Vec::new();
    let mut after = String::new();
    let mut paged = Vec::new();
    loop {
        let (page, next) = c.list_streams_page("pg", &after, 5).await.unwrap();
        sizes.push(page.len());
        paged.extend(page);
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    let want: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
    assert_eq!((paged, sizes), (want.clone(), vec![5, 5, 2]));
    assert_eq!(c.list_streams("pg").await.unwrap(), want);
    let (scopes, next) = c.list_scopes_page("", 1).await.unwrap();
    assert_eq!((scopes, next.as_deref()), (vec!["pg".to_string()], Some("pg")));
    assert_eq!(c.list_scopes().await.unwrap(), vec!["pg".to_string(), "pg2".into()]);
    let (ok, out, err) = sluice_tests::cli(&h.server.url(), &["stream", "list", "pg"], None);
    assert!(ok, "{err}");
    assert!(want.iter().all(|s| out.contains(s.as_str())), "{out}");
}

/// Writers with and without a linger (a lingering writer's lanes send from their own tasks;
/// the others' from the writer's one sender task) deliver every event once, in order per key,
/// across a split, and `flush` waits for what was written before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_with_and_without_a_linger_keep_every_key_in_order() {
    let h = sluice_tests::Harness::with_stream("lw", "s", 4).await;
    let c = &h.client;
    const KEYS: u64 = 16;
    const EVENTS: u64 = 3000;
    for (w, linger_us) in [(0u64, 0u64), (1, 2000)] {
        let config = sluice_client::WriterConfig {
            linger: Duration::from_micros(linger_us),
            ..sluice_client::WriterConfig::default()
        };
        let writer = c.event_writer_with("lw/s", config).await.unwrap();
        let mut acks = Vec::new();
        for n in 0..EVENTS {
            let k = n % KEYS;
            acks.push(writer.write_event(format!("key-{k}").as_bytes(), format!("{w}:{k}:{}", n / KEYS).into_bytes()));
            if n == EVENTS / 2 {
                writer.flush().await.unwrap();
                // Everything before a flush is durable when it returns.
                for a in acks.drain(..) {
                    let settled = tokio::time::timeout(Duration::from_millis(1), a).await;
                    assert!(matches!(settled, Ok(Ok(()))), "an event written before a flush was not durable after it");
                }
                if w == 0 {
                    c.split_segment("lw", "s", 0, 2).await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    c.seal_stream("lw", "s").await.unwrap();
    let mut r = c.event_reader("lw/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut next: std::collections::HashMap<(u64, u64), u64> = std::collections::HashMap::new();
    let mut total = 0;
    while let Some(e) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        let text = String::from_utf8(e.payload.to_vec()).unwrap();
        let mut parts = text.split(':').map(|p| p.parse::<u64>().unwrap());
        let (w, k, i) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let want = next.entry((w, k)).or_insert(0);
        assert_eq!(i, *want, "writer {w}, key {k}: events out of order or duplicated");
        *want += 1;
        total += 1;
    }
    assert_eq!(total, 2 * EVENTS, "every event exactly once");
}

/// Events written inside a burst leave when the (outermost) burst ends, from the thread that
/// ends it; until then none of them is acknowledged, afterwards all are, in order per key.
/// Bursts ended on several threads at once, over a stream of 16 segments (several lanes
/// per connection, sent together and racing for the same lanes), beside writes outside any
/// burst: every event lands once, each key's in the order written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_on_several_threads_keep_every_key_in_order() {
    const THREADS: u32 = 4;
    const ROUNDS: u32 = 30;
    const PER_BURST: u32 = 40;
    let h = sluice_tests::Harness::with_stream("bt", "s", 16).await;
    let c = &h.client;
    let writer = c.event_writer("bt/s").await.unwrap();
    let runtime = tokio::runtime::Handle::current();
    let acks = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..=THREADS)
            .map(|t| {
                let (writer, runtime) = (&writer, runtime.clone());
                scope.spawn(move || {
                    let _context = runtime.enter();
                    let mut acks = Vec::new();
                    for round in 0..ROUNDS {
                        // The last thread writes outside bursts (the sender task sends those).
                        let burst = (t < THREADS).then(|| writer.burst());
                        for i in 0..PER_BURST {
                            let n = round * PER_BURST + i;
                            let key = format!("t{t}-k{}", i % 8);
                            acks.push(writer.write_event(key.as_bytes(), [t.to_le_bytes(), n.to_le_bytes()].concat()));
                        }
                        drop(burst);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    acks
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().expect("writer thread")).collect::<Vec<_>>()
    });
    for a in acks {
        tokio::time::timeout(Duration::from_secs(20), a).await.expect("acknowledged").unwrap();
    }
    c.seal_stream("bt", "s").await.unwrap();
    let mut r = c.event_reader("bt/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut last: std::collections::HashMap<(u32, u32), u32> = std::collections::HashMap::new();
    let mut total = 0;
    while let Some(e) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        let t = u32::from_le_bytes(e.payload[..4].try_into().unwrap());
        let n = u32::from_le_bytes(e.payload[4..8].try_into().unwrap());
        let key = (t, (n % PER_BURST) % 8);
        if let Some(prev) = last.insert(key, n) {
            assert!(prev < n, "thread {t} key {}: {n} after {prev}", key.1);
        }
        total += 1;
    }
    assert_eq!(total, (THREADS + 1) * ROUNDS * PER_BURST, "every event once");
}

/// Callers that need a connection to the same shard at once (a new writer's lanes, one per
/// segment) wait for one and share it, instead of each opening its own: a writer's batches
/// for a shard can then go out together. Callers of an address nothing listens at all get
/// the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_connecting_at_once_share_one_connection() {
    let h = sluice_tests::Harness::with_stream("cc", "s", 16).await;
    let c = &h.client;
    let addrs: HashSet<String> = (0..16).map(|n| c.endpoint_of(&format!("cc/s/{n}"))).collect();
    assert_eq!(addrs.len(), 2, "the stream's segments are on both shards: {addrs:?}");
    for addr in addrs {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (c, addr) = (c.clone(), addr.clone());
                tokio::spawn(async move { c.connection(&addr).await.unwrap() })
            })
            .collect();
        let mut conns = Vec::new();
        for call in calls {
            conns.push(call.await.unwrap());
        }
        assert!(conns.iter().all(|x| Arc::ptr_eq(x, &conns[0])), "{addr}: more than one connection opened");
    }
    // Nothing listens there: every caller gets the failure.
    let nowhere = format!("127.0.0.1:{}", free_ports(1));
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (c, addr) = (c.clone(), nowhere.clone());
            tokio::spawn(async move { c.connection(&addr).await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().err().expect("nothing listens there");
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }
}

/// Small batches: one burst over 16 segments makes about a thousand `Appends` frames, each
/// connection's sent in several writes (a write takes a bounded number of pieces). Every
/// event lands once, each key's in the order written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_many_small_batches_keeps_every_key_in_order() {
    const EVENTS: u32 = 8000;
    const KEYS: u32 = 64;
    let h = sluice_tests::Harness::with_stream("bm", "s", 16).await;
    let c = &h.client;
    let config = sluice_client::WriterConfig { batch_bytes_max: 64, inflight_batches_max: 4096, ..Default::default() };
    let writer = c.event_writer_with("bm/s", config).await.unwrap();
    // Every lane connected first, so the burst's batches all go out together.
    for k in 0..KEYS {
        writer.write_event(format!("key-{k}").as_bytes(), b"warm".to_vec());
    }
    writer.flush().await.unwrap();
    let burst = writer.burst();
    let acks: Vec<_> = (0..EVENTS)
        .map(|n| writer.write_event(format!("key-{}", n % KEYS).as_bytes(), n.to_le_bytes().to_vec()))
        .collect();
    drop(burst);
    for a in acks {
        tokio::time::timeout(Duration::from_secs(20), a).await.expect("acknowledged").unwrap();
    }
    c.seal_stream("bm", "s").await.unwrap();
    let mut r = c.event_reader("bm/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut last: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut total = 0;
    while let Some(e) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        if e.payload.as_ref() == b"warm" {
            continue;
        }
        let n = u32::from_le_bytes(e.payload[..4].try_into().unwrap());
        if let Some(prev) = last.insert(n % KEYS, n) {
            assert!(prev < n, "key {}: {n} after {prev}", n % KEYS);
        }
        total += 1;
    }
    assert_eq!(total, EVENTS, "every event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_sends_its_events_when_it_ends() {
    let h = sluice_tests::Harness::with_stream("bu", "s", 4).await;
    let c = &h.client;
    let writer = c.event_writer("bu/s").await.unwrap();
    // Connected first: lanes then need nothing but sending.
    writer.write_event(b"warm", b"up".to_vec()).await.unwrap();
    writer.flush().await.unwrap();
    let outer = writer.burst();
    let mut acks = Vec::new();
    {
        let _inner = writer.burst();
        for n in 0..400u32 {
            acks.push(writer.write_event(format!("key-{}", n % 8).as_bytes(), n.to_le_bytes().to_vec()));
        }
    }
    // The inner burst ended inside the outer one: still nothing sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = acks.remove(0);
    let pending = tokio::time::timeout(Duration::from_millis(1), first).await;
    assert!(pending.is_err(), "an event of a burst was acknowledged before the burst ended");
    drop(outer);
    for a in acks {
        tokio::time::timeout(Duration::from_secs(10), a).await.expect("acknowledged once the burst ended").unwrap();
    }
    c.seal_stream("bu", "s").await.unwrap();
    let mut r = c.event_reader("bu/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut last: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut total = 0;
    while let Some(e) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        if e.payload.as_ref() == b"up" {
            continue;
        }
        let n = u32::from_le_bytes(e.payload.as_ref().try_into().unwrap());
        if let Some(prev) = last.insert(n % 8, n) {
            assert!(prev < n, "key {}: {n} after {prev}", n % 8);
        }
        total += 1;
    }
    assert_eq!(total, 400, "every event of the burst once (the first's future was dropped, not its event)");
}

/// A client that measures its appends' round trips counts one per append request, each
/// within the time the writes took, and starts over once they are taken; one that does not
/// has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_measures_its_append_round_trips_when_asked() {
    let h = sluice_tests::Harness::with_stream("rt", "s", 4).await;
    assert!(h.client.take_append_round_trips().is_none(), "not measured unless asked");
    let config = sluice_client::ClientConfig { measure_append_round_trips: true, ..Default::default() };
    let c = Client::connect_with(&h.server.url(), config).await.unwrap();
    let w = c.event_writer("rt/s").await.unwrap();
    let started = std::time::Instant::now();
    // One at a time (each its own append, sent by the lane) ...
    for i in 0..20u32 {
        w.write_event(&i.to_le_bytes(), vec![7u8; 100]).await.unwrap();
    }
    // ... and bursts over every segment (gathered into `Appends` frames).
    for round in 0..10u32 {
        let acks: Vec<_> = {
            let _burst = w.burst();
            (0..64u32).map(|k| w.write_event(&(round * 64 + k).to_le_bytes(), vec![9u8; 100])).collect()
        };
        for a in acks {
            a.await.unwrap();
        }
    }
    let took = started.elapsed().as_micros() as u64;
    let rt = c.take_append_round_trips().expect("measured").latencies();
    // 20 lone appends, and at least one request per burst.
    assert!(rt.count >= 30 && rt.count <= 20 + 10 * 64, "{rt:?}");
    assert!(rt.p50_us >= 1 && rt.p50_us <= rt.p99_us && rt.p99_us <= rt.max_us && rt.max_us <= took, "{rt:?}");
    assert_eq!(c.take_append_round_trips().expect("measured").latencies().count, 0, "counting starts over");
}

/// A server that stops answering while the connection stays open (a host gone without
/// closing it; here the server process is stopped with SIGSTOP): a writer waits at most its
/// `append_answer_timeout` for an append's answer, then gives the connection up and sends
/// again on a new one, which the server answers once it runs again. The event is there once
/// (the server drops the copy it already had). Before, the writer waited on the silent
/// connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_gives_up_a_silent_connection_and_sends_again() {
    let dir = TempDir::new("silent");
    let s = Server::start(&dir.0.join("data"), free_ports(1), 1);
    let config = sluice_client::ClientConfig {
        append_answer_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let c = Client::connect_with(&s.url(), config).await.unwrap();
    c.create_scope("q").await.unwrap();
    c.create_stream("q", "s", 1).await.unwrap();
    let w = c.event_writer("q/s").await.unwrap();
    w.write_event(b"k", Bytes::from_static(b"before")).await.unwrap();
    let before = c.segment_connection("q/s/0").await.unwrap();
    // Idle for longer than the answer timeout first: the lane's task then waits with nothing
    // outstanding, and the writer's sender (not the task) sends the next event. The task
    // looked at no answer then, and the writer waited for ever (this test failed now and
    // then, when the first look came late; every time with this pause).
    tokio::time::sleep(Duration::from_millis(700)).await;

    s.signal(libc::SIGSTOP);
    let ack = w.write_event(b"k", Bytes::from_static(b"while stopped"));
    // Past the timeout: the silent connection is given up (its new ones cannot answer yet).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let given_up = before.is_closed();
    s.signal(libc::SIGCONT);
    tokio::time::timeout(Duration::from_secs(20), ack)
        .await
        .expect("acknowledged once the server runs again")
        .expect("written");
    assert!(given_up, "the silent connection was given up while the server was stopped");
    let after = c.segment_connection("q/s/0").await.unwrap();
    assert!(!Arc::ptr_eq(&before, &after), "the writer sent again on a new connection");

    let mut r = c.event_reader("q/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut got = Vec::new();
    while let Some(e) = r.read_next(Duration::from_millis(300)).await.unwrap() {
        got.push(String::from_utf8_lossy(&e.payload).into_owned());
    }
    assert_eq!(got, ["before", "while stopped"], "each event once, in order");
}

/// Any other call to a server that stopped answering (SIGSTOP: its connections stay open)
/// fails with a timeout once `request_timeout` and the retries are past, instead of waiting
/// for ever; a read that waits at the tail may take its wait on top. Once the server runs
/// again, the same client's calls succeed on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_silent_server_times_out_instead_of_waiting_for_ever() {
    let dir = TempDir::new("silent-call");
    let s = Server::start(&dir.0.join("data"), free_ports(1), 1);
    let config = sluice_client::ClientConfig {
        request_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        retry_for: Duration::from_secs(1),
        ..Default::default()
    };
    let c = Client::connect_with(&s.url(), config).await.unwrap();
    c.create_scope("q").await.unwrap();
    c.create_stream("q", "s", 1).await.unwrap();
    // A read at the tail waits longer than the request timeout, and is answered.
    let began = Instant::now();
    let (reply, data) = c.read_segment("q/s/0", 0, 1024, Duration::from_millis(1200)).await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(1100), "the read waited at the tail: {:?}", began.elapsed());
    assert!(data.is_empty() && !reply.end_of_segment);

    let before = c.segment_connection("q/s/0").await.unwrap();
    s.signal(libc::SIGSTOP);
    let began = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), c.get_stream("q", "s")).await;
    let took = began.elapsed();
    s.signal(libc::SIGCONT);
    match outcome {
        Err(_) => panic!("a call to a stopped server still waits after 20 s"),
        Ok(Ok(_)) => panic!("a stopped server answered"),
        Ok(Err(e)) => assert!(matches!(e, ClientError::Timeout(_) | ClientError::Connect { .. }), "{e}"),
    }
    assert!(took < Duration::from_secs(5), "given up after its retries, not later: {took:?}");
    assert!(before.is_closed(), "the silent connection was given up");
    c.get_stream("q", "s").await.expect("answered once the server runs again");
}

/// The length of every open segment of every shard, a request (a page) per shard: what the
/// retention service reads each second to see which streams grew. Sealed segments are left
/// out; pages of one name at a time give the same list as one whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_segment_lengths_lists_every_open_segment_of_every_shard() {
    use sluice_net::messages::{ListSegmentLengths, SegmentLengths};
    let dir = TempDir::new("open-lengths");
    let port = free_ports(2);
    let s = Server::start(&dir.0.join("data"), port, 2);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("ol").await.unwrap();
    c.create_stream("ol", "a", 3).await.unwrap();
    c.create_stream("ol", "b", 2).await.unwrap();
    c.create_stream("ol", "c", 1).await.unwrap();
    let w = c.event_writer("ol/a").await.unwrap();
    for i in 0..30u32 {
        w.write_event(&i.to_le_bytes(), Bytes::from(vec![b'x'; 100 + i as usize])).await.unwrap();
    }
    c.seal_stream("ol", "b").await.unwrap();
    let mut got = c.open_segment_lengths().await.unwrap();
    got.retain(|(name, _)| name.starts_with("ol/"));
    got.sort();
    let mut want = Vec::new();
    for name in ["ol/a/0", "ol/a/1", "ol/a/2", "ol/c/0"] {
        want.push((name.to_string(), c.segment_info(name).await.unwrap().length));
    }
    assert_eq!(got, want);
    assert!(want.iter().map(|(_, l)| l).sum::<u64>() > 30 * 100, "{want:?}");
    // Each shard in pages of one name.
    for shard in 0..2 {
        let conn = c.connection(&format!("127.0.0.1:{}", port + shard)).await.unwrap();
        let whole: SegmentLengths =
            conn.call(&ListSegmentLengths { after: String::new(), limit: 0 }, Bytes::new()).await.unwrap();
        assert_eq!(whole.next, None);
        let (mut paged, mut after) = (Vec::new(), String::new());
        for _ in 0..100 {
            let page: SegmentLengths = conn.call(&ListSegmentLengths { after, limit: 1 }, Bytes::new()).await.unwrap();
            assert!(page.segments.len() <= 1);
            paged.extend(page.segments);
            match page.next {
                Some(n) => after = n,
                None => break,
            }
        }
        assert_eq!(paged, whole.segments, "shard {shard}");
        assert!(!whole.segments.is_empty(), "shard {shard} serves some of them");
    }
    drop(s);
}
