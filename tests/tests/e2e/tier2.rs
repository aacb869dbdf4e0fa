//! Tier-2 end to end with the real binary and the filesystem store: a stream far larger than
//! the log budget is written and read back from its first byte; tier-2 going away stops
//! writes with the typed error once the log is full, and nothing is lost when it returns.

use sluice_client::{Client, ClientConfig, ReadFrom};
use sluice_net::ErrorCode;
use sluice_tests::{Server, TempDir, bytes_of_files_under, free_ports, log_bytes_under};
use sluice_tier2::sums::ChunkSums;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

fn bytes_under(dir: &Path) -> u64 {
    bytes_of_files_under(dir, |_| true)
}

/// Samples the size of the log files under `dir` until stopped; returns the largest.
fn watch_size(dir: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            max = max.max(log_bytes_under(&dir));
            std::thread::sleep(Duration::from_millis(20));
        }
        max.max(log_bytes_under(&dir))
    })
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_through_a_small_log_reads_back_from_the_head() {
    const CONTAINERS: u64 = 2;
    const BUDGET_MIB: u64 = 24;
    const WRITERS: u64 = 4;
    const KEYS: u64 = 4;
    const EVENT_BYTES: usize = 1024;
    const PER_WRITER: u64 = (1 << 30) / EVENT_BYTES as u64 / WRITERS;

    // The trace of a hang this test once met (see the bound below).
    sluice_tests::show_client_warnings();
    let dir = TempDir::new("tier2-gib");
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let budget = BUDGET_MIB.to_string();
    let args = ["--tier2", &tier2, "--log-file-mb", "4", "--log-budget-mb", &budget, "--containers-per-core", "2"];
    let server = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &args);
    let url = server.url();
    let admin = Client::connect(&url).await.unwrap();
    admin.create_scope("big").await.unwrap();
    admin.create_stream("big", "events", 4).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_size(dir.0.join("data").join("containers"), stop.clone());
    let started = Instant::now();
    let mut writers = JoinSet::new();
    // Events acknowledged per writer, for the report if acknowledgements stop coming.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    for w in 0..WRITERS {
        let url = url.clone();
        let acked = acked.clone();
        writers.spawn(async move {
            let client = Client::connect(&url).await.unwrap();
            let writer = client.event_writer("big/events").await.unwrap();
            let mut inflight = JoinSet::new();
            for i in 0..PER_WRITER {
                let k = (i + w) % KEYS;
                let mut payload = format!("{w}:{k}:{i}:").into_bytes();
                payload.resize(EVENT_BYTES, b'x');
                let ack = writer.write_event(format!("key-{k}").as_bytes(), payload);
                inflight.spawn(ack);
                while inflight.len() >= 512 {
                    inflight.join_next().await.unwrap().unwrap().expect("write acknowledged");
                    acked[w as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(r) = inflight.join_next().await {
                r.unwrap().expect("write acknowledged");
                acked[w as usize].fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Bounded: at the slowest seen (~100 MB/s) the writes take ~10 s.
    let all = async {
        while let Some(r) = writers.join_next().await {
            r.unwrap();
        }
    };
    if tokio::time::timeout(Duration::from_secs(300), all).await.is_err() {
        let counts: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        stop.store(true, Ordering::Relaxed);
        panic!(
            "acknowledgements stopped coming: events acknowledged per writer {counts:?} of {PER_WRITER} each; \
             the server says: {}",
            sluice_tests::cli(&url, &["stats"], None).1
        );
    }
    let wrote = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let max_log = watcher.join().unwrap();
    let total = WRITERS * PER_WRITER * EVENT_BYTES as u64;
    eprintln!(
        "wrote {} MiB in {wrote:.1?} ({:.0} MB/s); the log peaked at {} MiB",
        total / MIB,
        total as f64 / wrote.as_secs_f64() / 1e6,
        max_log / MIB
    );
    assert!(
        max_log <= CONTAINERS * BUDGET_MIB * MIB,
        "the log grew to {max_log} bytes, beyond {CONTAINERS} x {BUDGET_MIB} MiB"
    );
    assert!(bytes_under(&dir.0.join("tier2")) >= total * 9 / 10, "tier-2 holds most of the data by now");

    // Read everything back from the head: most of it comes from tier-2.
    let started = Instant::now();
    let mut reader = admin.event_reader("big/events", ReadFrom::Head).await.unwrap();
    let mut next: HashMap<(u64, u64), u64> = HashMap::new();
    let mut count = 0u64;
    while let Some(ev) = reader.read_next(Duration::from_secs(5)).await.unwrap() {
        assert_eq!(ev.payload.len(), EVENT_BYTES);
        let head = std::str::from_utf8(&ev.payload[..ev.payload.iter().position(|&b| b == b'x').unwrap()]).unwrap();
        let mut f = head.split(':').map(|x| x.parse::<u64>().unwrap_or(u64::MAX));
        let (w, k, i) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let expect = next.entry((w, k)).or_insert(k.wrapping_sub(w).rem_euclid(KEYS));
        // Writer w sends key k at i = k - w (mod KEYS), k - w + KEYS, ...
        assert_eq!(i, *expect, "writer {w} key {k}: event {i} out of order or missing (expected {expect})");
        *expect += KEYS;
        count += 1;
    }
    let read = started.elapsed();
    eprintln!("read {count} events in {read:.1?} ({:.0} MB/s)", total as f64 / read.as_secs_f64() / 1e6);
    assert_eq!(count, WRITERS * PER_WRITER, "every event read back exactly once");
}

/// A one-shard server with tier-2 in `<dir>/tier2`, 1 MiB log files and 64 KiB moves.
fn tier2_server(tag: &str, extra: &[&str]) -> (TempDir, std::path::PathBuf, Server) {
    let dir = TempDir::new(tag);
    let t2dir = dir.0.join("tier2");
    let tier2 = format!("fs:{}", t2dir.display());
    let mut args = vec!["--tier2", &tier2, "--log-file-mb", "1", "--move-min-kb", "64"];
    args.extend_from_slice(extra);
    let server = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &args);
    (dir, t2dir, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier2_outage_fills_the_log_then_refuses_and_loses_nothing() {
    let (dir, t2dir, server) = tier2_server("tier2-outage", &["--log-budget-mb", "6", "--containers-per-core", "1"]);
    // No client-side retries: the test wants to see the server's answer.
    let config = ClientConfig { retry_for: Duration::ZERO, ..ClientConfig::default() };
    let client = Client::connect_with(&server.url(), config).await.unwrap();
    client.create_scope("o").await.unwrap();
    client.create_stream("o", "s", 1).await.unwrap();
    let segment = "o/s/0";
    let block = bytes::Bytes::from(vec![b'a'; 64 << 10]);
    let acked = AtomicU64::new(0);
    let append = |n: u64| {
        let client = &client;
        let block = block.clone();
        let acked = &acked;
        async move {
            for _ in 0..n {
                client.append_raw(segment, block.clone(), None).await?;
                acked.fetch_add(block.len() as u64, Ordering::Relaxed);
            }
            Ok::<(), sluice_client::ClientError>(())
        }
    };
    // While tier-2 works, a writer faster than the mover may briefly meet the budget too.
    let append_patiently = |n: u64| {
        let append = &append;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for _ in 0..n {
                loop {
                    match append(1).await {
                        Ok(()) => break,
                        // The server closes a connection after refusing an append; the next
                        // call on it finds it lost (nothing on it was processed).
                        Err(e) if e.is_retryable() && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("append failed while tier-2 works: {e}"),
                    }
                }
            }
        }
    };
    let t0 = Instant::now();
    append_patiently(32).await;
    eprintln!("before the outage: {:?}", t0.elapsed());

    // Take tier-2 away: the directory is replaced by a plain file.
    let aside = dir.0.join("tier2-away");
    std::fs::rename(&t2dir, &aside).unwrap();
    std::fs::write(&t2dir, b"not a directory").unwrap();
    let before = acked.load(Ordering::Relaxed);
    let err = append(4096).await.expect_err("the log fills up without tier-2");
    assert_eq!(err.code(), Some(ErrorCode::Tier2Unavailable), "typed error, got {err}");
    let during = acked.load(Ordering::Relaxed) - before;
    eprintln!("{during} bytes acknowledged while tier-2 was away, then: {err}");
    assert!(during >= MIB, "writes kept succeeding for a while ({during} bytes)");
    assert!(during <= 6 * MIB, "the budget bounds the log ({during} bytes)");
    assert!(log_bytes_under(&dir.0.join("data").join("containers")) <= 6 * MIB + 4096);

    // Tier-2 returns: the mover catches up and writes are accepted again.
    std::fs::remove_file(&t2dir).unwrap();
    std::fs::rename(&aside, &t2dir).unwrap();
    let t0 = Instant::now();
    append_patiently(96).await;
    eprintln!("after the outage: {:?}", t0.elapsed());

    // Every acknowledged byte reads back, from tier-2 and the log.
    let length = acked.load(Ordering::Relaxed);
    let info = client.segment_info(segment).await.unwrap();
    assert_eq!(info.length, length);
    let mut offset = 0;
    while offset < length {
        let (_, data) = client.read_segment(segment, offset, 1 << 20, Duration::ZERO).await.unwrap();
        assert!(!data.is_empty(), "no data at {offset} of {length}");
        assert!(data.iter().all(|&b| b == b'a'), "bytes at {offset} are intact");
        offset += data.len() as u64;
    }
    assert_eq!(offset, length);
}

/// Writes `n` keyed events of `size` bytes ("i:" then padding) over 8 routing keys.
async fn write_events(client: &Client, stream: &str, n: u64, size: usize) {
    write_keyed_events(client, stream, n, size, 8).await;
}

/// `write_events` over `keys` routing keys, 256 in flight.
pub(crate) async fn write_keyed_events(client: &Client, stream: &str, n: u64, size: usize, keys: u64) {
    let writer = client.event_writer(stream).await.unwrap();
    let mut acks = JoinSet::new();
    for i in 0..n {
        let mut payload = format!("{i}:").into_bytes();
        payload.resize(size, b'r');
        acks.spawn(writer.write_event(format!("k{}", i % keys).as_bytes(), payload));
        while acks.len() >= 256 {
            acks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = acks.join_next().await {
        r.unwrap().unwrap();
    }
}

/// Reads `n` events of `size` bytes from the head of `stream`.
async fn read_back_events(client: &Client, stream: &str, n: u64, size: usize) {
    let mut reader = client.event_reader(stream, ReadFrom::Head).await.unwrap();
    for i in 0..n {
        let ev = reader.read_next(Duration::from_secs(5)).await.unwrap();
        assert!(ev.is_some_and(|e| e.payload.len() == size), "event {i}");
    }
}

/// (bytes held, start offsets) of a stream's segments.
async fn held(client: &Client, scope: &str, stream: &str, segments: u64) -> (u64, Vec<u64>) {
    let mut total = 0;
    let mut starts = Vec::new();
    for s in 0..segments {
        let si = client.segment_info(&format!("{scope}/{stream}/{s}")).await.unwrap();
        total += si.length - si.start_offset;
        starts.push(si.start_offset);
    }
    (total, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_and_time_truncates_and_frees_space() {
    let (_dir, t2dir, server) =
        tier2_server("tier2-retention", &["--log-budget-mb", "8", "--chunk-mb", "1", "--retention-interval-ms", "200"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("r").await.unwrap();
    let size = sluice_net::Retention::parse("size:2M,4M").unwrap();
    client.create_stream_with("r", "bysize", 2, size).await.unwrap();
    client.create_stream("r", "bytime", 1).await.unwrap();

    // By size: 12 MiB written in 1 MiB steps (a retention mark between steps), 2 to 4 MiB kept.
    for _ in 0..12 {
        write_events(&client, "r/bysize", 1024, 1024).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (kept, starts) = loop {
        let (h, starts) = held(&client, "r", "bysize", 2).await;
        if h <= 4 * MIB || Instant::now() > deadline {
            break (h, starts);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("size retention kept {kept} bytes, start offsets {starts:?}");
    assert!(kept <= 4 * MIB, "retention brought the stream under its max ({kept} bytes held)");
    assert!(kept >= 2 * MIB, "retention keeps at least the min ({kept} bytes held)");
    // Tier-2 space is freed too (chunks wholly below the start offsets are deleted).
    let deadline = Instant::now() + Duration::from_secs(10);
    while bytes_under(&t2dir.join("r").join("bysize")) > kept + 2 * 2 * MIB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_tier2 = bytes_under(&t2dir.join("r").join("bysize"));
    assert!(on_tier2 <= kept + 4 * MIB, "tier-2 holds {on_tier2} bytes for a stream of {kept} bytes");
    // Reads below the start get the typed error with the start offset; the head reads whole events.
    let err = client.read_segment("r/bysize/0", 0, 1024, Duration::ZERO).await.expect_err("truncated");
    assert_eq!(err.code(), Some(ErrorCode::Truncated));
    let mut reader = client.event_reader("r/bysize", ReadFrom::Head).await.unwrap();
    let mut count = 0u64;
    while let Some(ev) = reader.read_next(Duration::from_millis(500)).await.unwrap() {
        assert_eq!(ev.payload.len(), 1024);
        assert!(ev.payload.ends_with(b"rrrr"));
        count += 1;
    }
    // Each event is framed with a 4-byte length.
    assert_eq!(count * (1024 + 4), kept, "the reader reads exactly the kept events");

    // By time: a policy set on a live stream; data older than a second goes.
    write_events(&client, "r/bytime", 1024, 1024).await;
    client.update_retention("r", "bytime", sluice_net::Retention::parse("time:1s").unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_events(&client, "r/bytime", 16, 1024).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (h, starts) = held(&client, "r", "bytime", 1).await;
        if starts[0] >= MIB {
            eprintln!("time retention: start offset {}, {h} bytes held", starts[0]);
            break;
        }
        assert!(Instant::now() < deadline, "time retention did not truncate (start {starts:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = client.get_stream("r", "bytime").await.unwrap();
    assert_eq!(info.retention, sluice_net::Retention::Time { min_ms: 1000, max_ms: 1000 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_and_created_again_keeps_its_new_data() {
    let (_dir, t2dir, mut server) = tier2_server("tier2-recreate", &["--containers-per-core", "1"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("re").await.unwrap();
    let wait_moved = |client: Client, len: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let si = client.segment_info("re/s/0").await.unwrap();
            if si.tier2_end >= len {
                return;
            }
            assert!(Instant::now() < deadline, "data not moved to tier-2 ({} of {len})", si.tier2_end);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    client.create_stream("re", "other", 1).await.unwrap();
    for round in 0..2u64 {
        client.create_stream("re", "s", 1).await.unwrap();
        write_events(&client, "re/s", 512 * (round + 1), 1024).await;
        let len = client.segment_info("re/s/0").await.unwrap().length;
        // Roll the log past the stream's last file: a tail under `--move-min-kb` in the
        // current file waits there for more (if a mover round split the writes).
        write_events(&client, "re/other", 1500, 1024).await;
        let t = Instant::now();
        wait_moved(client.clone(), len).await;
        eprintln!("round {round}: moved in {:?}", t.elapsed());
        if round == 0 {
            client.seal_stream("re", "s").await.unwrap();
            client.delete_stream("re", "s").await.unwrap();
        }
    }
    // The second incarnation's chunks (same names as the first's) survive garbage
    // collection and a restart that replays the deletion.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    server.restart();
    let client = Client::connect(&server.url()).await.unwrap();
    let mut reader = client.event_reader("re/s", ReadFrom::Head).await.unwrap();
    let mut n = 0;
    while let Some(ev) = reader.read_next(Duration::from_millis(500)).await.unwrap() {
        assert_eq!(ev.payload.len(), 1024);
        n += 1;
    }
    assert_eq!(n, 1024, "every event of the new stream reads back");
    assert!(bytes_under(&t2dir.join("re").join("s")) >= 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_overtaken_by_truncation_is_told_and_goes_on() {
    let (_dir, _t2dir, server) = tier2_server("tier2-overtaken", &["--containers-per-core", "1"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("ov").await.unwrap();
    client.create_stream("ov", "s", 1).await.unwrap();
    let t = Instant::now();
    write_events(&client, "ov/s", 20_000, 1024).await;
    eprintln!("wrote in {:?}", t.elapsed());
    // The reader's task fills its buffer (4096 events) and waits; then the head goes.
    let mut reader = client.event_reader("ov/s", ReadFrom::Head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = client.stream_cut("ov/s", sluice_client::CutAt::Tail).await.unwrap();
    client.truncate_stream(&cut).await.unwrap();
    let mut before = 0;
    let err = loop {
        match reader.read_next(Duration::from_secs(5)).await {
            Ok(Some(_)) => before += 1,
            Ok(None) => panic!("the reader ended without hearing of the truncation"),
            Err(e) => break e,
        }
    };
    eprintln!("error after {before} events at {:?}", t.elapsed());
    assert_eq!(err.code(), Some(ErrorCode::Truncated), "{err}");
    assert!((1..20_000).contains(&before), "{before} events read before the truncation");
    let writer = client.event_writer("ov/s").await.unwrap();
    for i in 0..10 {
        writer.write_event(b"k", format!("after-{i}").into_bytes());
    }
    writer.flush().await.unwrap();
    for i in 0..10 {
        let ev = reader.read_next(Duration::from_secs(5)).await.unwrap().expect("events after the cut");
        assert_eq!(&ev.payload[..], format!("after-{i}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reader_overtaken_by_truncation_is_told_and_goes_on() {
    use sluice_client::{GroupItem, ReaderGroupConfig};
    let (_dir, _t2dir, server) = tier2_server("tier2-rg-overtaken", &["--containers-per-core", "1"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("og").await.unwrap();
    client.create_stream("og", "s", 1).await.unwrap();
    write_events(&client, "og/s", 20_000, 1024).await;
    let group = client.create_reader_group("og", "g", ReaderGroupConfig::stream("og/s")).await.unwrap();
    let mut r = group.create_reader("r1").await.unwrap();
    // Take the segment and a few events, then lose the head.
    let mut before = 0;
    while before < 10 {
        if let Some(GroupItem::Event(_)) = r.read_next(Duration::from_secs(5)).await.unwrap() {
            before += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = client.stream_cut("og/s", sluice_client::CutAt::Tail).await.unwrap();
    client.truncate_stream(&cut).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        assert!(Instant::now() < deadline, "no truncation error");
        match r.read_next(Duration::from_secs(1)).await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(ErrorCode::Truncated), "{err}");
    let writer = client.event_writer("og/s").await.unwrap();
    for i in 0..10 {
        writer.write_event(b"k", format!("after-{i}").into_bytes());
    }
    writer.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        assert!(Instant::now() < deadline, "events after the cut did not arrive: {got:?}");
        if let Some(GroupItem::Event(ev)) = r.read_next(Duration::from_secs(1)).await.unwrap() {
            got.push(String::from_utf8(ev.payload.to_vec()).unwrap());
        }
    }
    assert_eq!(got, (0..10).map(|i| format!("after-{i}")).collect::<Vec<_>>());
}

/// Flips one byte of a file, whatever its mode (sealed chunks are read-only).
fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let mode = std::fs::metadata(path).unwrap().permissions();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    f.sync_all().unwrap();
    std::fs::set_permissions(path, mode).unwrap();
}

/// A byte damaged in a tier-2 chunk is found by the chunk's checksums: the read fails with
/// `DataCorrupt`, naming the chunk, instead of handing out the bytes. Both for a closed
/// chunk (checked against its `.sum` file, also after a restart) and for the chunk the mover
/// is still filling (checked against the sums it keeps, and after a restart against the sums
/// file the mover wrote for it when it had nothing else to do); undamaged chunks read on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_tier2_chunk_is_refused_not_read() {
    const MIB: u64 = 1 << 20;
    let (_dir, t2dir, mut server) =
        tier2_server("tier2-damage", &["--containers-per-core", "1", "--chunk-mb", "2", "--cache-mb", "0"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("dm").await.unwrap();
    client.create_stream("dm", "s", 1).await.unwrap();
    client.create_stream("dm", "other", 1).await.unwrap();
    write_events(&client, "dm/s", 5400, 1024).await;
    let length = client.segment_info("dm/s/0").await.unwrap().length;
    // More writes elsewhere (about 5 MiB) roll the log on, so the segment's log files are
    // freed and its reads come from tier-2.
    write_events(&client, "dm/other", 5000, 1024).await;
    let seg_dir = t2dir.join("dm/s/0");
    let deadline = Instant::now() + Duration::from_secs(30);
    let chunks = loop {
        let si = client.segment_info("dm/s/0").await.unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&seg_dir)
            .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        names.sort();
        let sums = names.iter().filter(|n| n.ends_with(".chunk.sum")).count();
        // At most four 1 MiB log files left: the newest, which hold only the other stream's.
        if si.tier2_end == length && sums >= 3 && log_bytes_under(&_dir.0.join("data/containers")) < 5 * MIB {
            break names;
        }
        assert!(Instant::now() < deadline, "not moved: tier-2 end {} of {length}, files {names:?}", si.tier2_end);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let chunk_files: Vec<&String> = chunks.iter().filter(|n| n.ends_with(".chunk")).collect();
    assert_eq!(chunk_files.len(), 3, "{chunks:?}");
    assert!(chunks.contains(&format!("{}.sum", chunk_files[0])), "a closed chunk has sums: {chunks:?}");
    assert!(chunks.contains(&format!("{}.sum", chunk_files[2])), "the open one too, once idle: {chunks:?}");

    // Damage the second MiB of the first chunk, and the first MiB of the open one.
    flip_byte(&seg_dir.join(chunk_files[0]), MIB + MIB / 2);
    flip_byte(&seg_dir.join(chunk_files[2]), 100);
    let read = |offset: u64| client.read_segment("dm/s/0", offset, 64 << 10, Duration::ZERO);
    let damaged = |e: sluice_client::ClientError| {
        assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
        e.to_string()
    };
    let e = damaged(read(0).await.expect_err("damaged bytes are not handed out"));
    assert!(e.contains(chunk_files[0].as_str()), "{e}");
    eprintln!("closed chunk: {e}");
    let e = damaged(read(4 * MIB + 10).await.expect_err("damaged bytes are not handed out"));
    assert!(e.contains(chunk_files[2].as_str()), "{e}");
    eprintln!("open chunk: {e}");
    let (_, data) = read(2 * MIB).await.unwrap();
    assert!(!data.is_empty());
    let mut reader = client.event_reader("dm/s", ReadFrom::Head).await.unwrap();
    let e = reader.read_next(Duration::from_secs(2)).await.expect_err("the reader is told");
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    // `sluice stream verify` reports both damaged chunks and fails; the other stream is fine.
    let (ok, out, err) = sluice_tests::cli(&server.url(), &["stream", "verify", "dm/s"], None);
    eprintln!("{out}{err}");
    assert!(!ok, "damage fails the verification");
    assert!(out.contains("segment 0 (active)") && out.contains("DAMAGED"), "{out}");
    for chunk in [chunk_files[0], chunk_files[2]] {
        assert!(out.contains(chunk.as_str()), "{chunk} not reported: {out}");
    }
    assert!(err.contains("1 of 1 segments of dm/s are damaged"), "{err}");
    let (ok, out, err) = sluice_tests::cli(&server.url(), &["stream", "verify", "dm/other"], None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("5000 events: ok") && out.contains("no damage found"), "{out}");

    // After a restart the sums files still find the damage, the open chunk's too.
    server.kill();
    server.restart();
    let client = Client::connect(&server.url()).await.unwrap();
    for at in [0, 4 * MIB + 10] {
        let e = client.read_segment("dm/s/0", at, 64 << 10, Duration::ZERO).await.expect_err("still refused");
        assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    }
    let (_, data) = client.read_segment("dm/s/0", 2 * MIB, 64 << 10, Duration::ZERO).await.unwrap();
    assert!(!data.is_empty());
    // A chunk shorter than its recorded length is damage too (told at once, not retried as
    // an outage).
    let first = seg_dir.join(chunk_files[0]);
    let mode = std::fs::metadata(&first).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(MIB).unwrap();
    std::fs::set_permissions(&first, mode).unwrap();
    let started = Instant::now();
    let e = client.read_segment("dm/s/0", 0, 64 << 10, Duration::ZERO).await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    assert!(e.to_string().contains("shorter than recorded"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "told at once, not retried");
}

/// The chunk's sums file as it is now, if it decodes.
fn sums_of(chunk: &Path) -> Option<ChunkSums> {
    let name = format!("{}.sum", chunk.file_name()?.to_str()?);
    ChunkSums::decode(&std::fs::read(chunk.with_file_name(name)).ok()?).ok()
}

/// Waits until the sums file of the segment's only chunk covers all of it; returns the chunk.
async fn wait_for_whole_sums(seg_dir: &Path) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let chunk = std::fs::read_dir(seg_dir)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "chunk"));
        if let Some(chunk) = chunk {
            let size = std::fs::metadata(&chunk).unwrap().len();
            if size > 0 && sums_of(&chunk).is_some_and(|s| s.len() == size) {
                return chunk;
            }
        }
        assert!(Instant::now() < deadline, "no sums file covers the chunk in {}", seg_dir.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A crash that leaves a chunk open with a sums file covering only part of it (the mover
/// writes an open chunk's sums as it grows, so a crash can come between): the next owner
/// completes the sums from the chunk's bytes when it closes the chunk, so damage anywhere in
/// it is found afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_left_open_by_a_crash_gets_whole_sums() {
    const MIB: u64 = 1 << 20;
    let (dir, t2dir, mut server) = tier2_server("tier2-opensums", &["--containers-per-core", "1", "--cache-mb", "0"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("os").await.unwrap();
    client.create_stream("os", "s", 1).await.unwrap();
    client.create_stream("os", "other", 1).await.unwrap();
    let seg_dir = t2dir.join("os/s/0");
    // A first part moved and summed while the chunk stays open (64 MiB chunks)...
    write_events(&client, "os/s", 1200, 1024).await;
    let chunk = wait_for_whole_sums(&seg_dir).await;
    let sums_file = chunk.with_file_name(format!("{}.sum", chunk.file_name().unwrap().to_str().unwrap()));
    let early = std::fs::read(&sums_file).unwrap();
    let early_len = ChunkSums::decode(&early).unwrap().len();
    // ... then more, and the log rolled on so that reads come from tier-2.
    write_events(&client, "os/s", 2400, 1024).await;
    write_events(&client, "os/other", 5000, 1024).await;
    let length = client.segment_info("os/s/0").await.unwrap().length;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.segment_info("os/s/0").await.unwrap().tier2_end < length
        || log_bytes_under(&dir.0.join("data/containers")) > 5 * MIB
    {
        assert!(Instant::now() < deadline, "not moved to tier-2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(wait_for_whole_sums(&seg_dir).await, chunk, "one chunk");
    let size = std::fs::metadata(&chunk).unwrap().len();
    assert!(early_len < size && size >= 3 * MIB, "sums of {early_len} bytes, chunk of {size}");
    // The crash came before the mover's last sums write: the older file is what is left.
    server.kill();
    std::fs::remove_file(&sums_file).unwrap();
    std::fs::write(&sums_file, &early).unwrap();
    server.restart();
    assert_eq!(wait_for_whole_sums(&seg_dir).await, chunk);
    // Damage in the part the old file covered and in the part summed again: both found (a
    // failed read is not cached; the first damaged MiB is named, then the next once mended).
    let client = Client::connect(&server.url()).await.unwrap();
    let damage = [early_len / 2, early_len + (size - early_len) / 2];
    for at in damage {
        flip_byte(&chunk, at);
    }
    for at in damage {
        let block = at / MIB * MIB;
        let e = client.read_segment("os/s/0", block, 64 << 10, Duration::ZERO).await.expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "damage at {at}: {e}");
        assert!(e.to_string().contains(&format!("chunk offset {block} ")), "damage at {at}: {e}");
        flip_byte(&chunk, at);
    }
    let (_, data) = client.read_segment("os/s/0", 0, 64 << 10, Duration::ZERO).await.unwrap();
    assert!(!data.is_empty(), "mended, it reads again");
}

/// A segment with many tier-2 chunks across several ownership terms: the checkpoint at the
/// head of each log file keeps them as a few runs (its size does not grow with the data in
/// tier-2), and reads find every chunk after restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_many_chunks_as_a_few_runs() {
    let (dir, _t2dir, mut server) =
        tier2_server("tier2-runs", &["--containers-per-core", "1", "--chunk-mb", "1", "--cache-mb", "0"]);
    let mut written = 0;
    for term in 0..3 {
        let client = Client::connect(&server.url()).await.unwrap();
        if term == 0 {
            client.create_scope("rn").await.unwrap();
            client.create_stream("rn", "s", 1).await.unwrap();
            client.create_stream("rn", "other", 1).await.unwrap();
        }
        write_events(&client, "rn/s", 30_000, 1024).await;
        written += 30_000;
        write_events(&client, "rn/other", 3000, 1024).await;
        let length = client.segment_info("rn/s/0").await.unwrap().length;
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.segment_info("rn/s/0").await.unwrap().tier2_end < length {
            assert!(Instant::now() < deadline, "term {term}: not moved to tier-2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.kill();
        server.restart();
    }
    // One more log file, so that a checkpoint holds all three terms' chunks.
    let client = Client::connect(&server.url()).await.unwrap();
    write_events(&client, "rn/other", 2000, 1024).await;
    let (ok, out, err) =
        sluice_tests::cli(&server.url(), &["log", "dump", "--entries", dir.0.join("data").to_str().unwrap()], None);
    assert!(ok, "{err}");
    let newest = out
        .lines()
        .filter(|l| l.contains(" checkpoint "))
        .filter_map(|l| {
            let chunks: u64 = l.split(", ").find(|p| p.ends_with("runs)"))?.split(' ').next()?.parse().ok()?;
            let runs: u64 = l.rsplit(" in ").next()?.split(' ').next()?.parse().ok()?;
            let bytes: u64 = l.split(" bytes").next()?.rsplit(' ').next()?.parse().ok()?;
            Some((chunks, runs, bytes))
        })
        .max()
        .expect("checkpoint lines");
    let (chunks, runs, bytes) = newest;
    eprintln!("newest checkpoint: {chunks} chunks in {runs} runs, {bytes} bytes");
    assert!(chunks >= 90, "{out}");
    // Per segment (two) and term (four, the last moving only the other stream's): the full
    // chunks, and the partial last one (the next term starts a new chunk).
    assert!(runs <= 16, "{chunks} chunks in {runs} runs: {out}");
    assert!(bytes < 2048, "a checkpoint of {bytes} bytes for {chunks} chunks");
    // Every event reads back from the head, across all the chunks.
    let mut reader = client.event_reader("rn/s", ReadFrom::Head).await.unwrap();
    let mut n = 0;
    while n < written {
        let ev = reader.read_next(Duration::from_secs(5)).await.unwrap().expect("an event");
        assert_eq!(ev.payload.len(), 1024);
        n += 1;
    }
}

/// The server's log so far, without terminal colours.
fn server_log(dir: &TempDir) -> String {
    let raw = std::fs::read_to_string(dir.0.join("data").with_extension("log")).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A sealed stream whose bytes are all in closed tier-2 chunks is recorded so
/// (`ChunksClosed`): a restart skips its segments when it reconciles tier-2, and they read
/// as before. So is a sealed stream truncated to its end (by the first restart's
/// reconciliation, which looks for partial uploads once more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_segments_in_tier2_are_not_reconciled_again() {
    let (dir, _t2dir, mut server) = tier2_server("tier2-closed", &["--containers-per-core", "1"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("cl").await.unwrap();
    client.create_stream("cl", "s", 2).await.unwrap();
    client.create_stream("cl", "other", 1).await.unwrap();
    client.create_stream("cl", "e", 1).await.unwrap();
    write_events(&client, "cl/s", 2000, 1024).await;
    client.seal_stream("cl", "s").await.unwrap();
    write_events(&client, "cl/e", 200, 1024).await;
    client.seal_stream("cl", "e").await.unwrap();
    let tail = client.stream_cut("cl/e", sluice_client::CutAt::Tail).await.unwrap();
    client.truncate_stream(&tail).await.unwrap();
    write_events(&client, "cl/other", 3000, 1024).await;
    let data = dir.0.join("data");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) =
            sluice_tests::cli(&server.url(), &["log", "dump", "--entries", data.to_str().unwrap()], None);
        assert!(ok, "{err}");
        if out.matches("ChunksClosed").count() >= 2 || out.matches("chunks closed").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the sealed segments were never recorded closed:\n{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.env.push(("RUST_LOG".into(), "warn,sluice_engine::container::mover=info".into()));
    let mut line = String::new();
    for restart in 0..2 {
        server.kill();
        server.restart();
        line = reconciled_line(&dir, restart).await;
        eprintln!("restart {restart}: {line}");
    }
    // Only the other stream's segment, still written to, is looked at.
    assert!(line.contains("checked=1") && line.contains("closed=3"), "{line}");
    let client = Client::connect(&server.url()).await.unwrap();
    read_back_events(&client, "cl/s", 2000, 1024).await;
}

/// A stream deleted and created again reuses its chunks' names (same segment, start and
/// epoch); reads of the new stream from tier-2 never meet the old one's bytes, even those
/// the container still holds in its tier-2 read cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_never_reads_the_old_streams_bytes() {
    const EVENTS: usize = 2048;
    let (dir, _t2dir, server) = tier2_server("tier2-stale", &["--containers-per-core", "1", "--cache-mb", "0"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("st").await.unwrap();
    client.create_stream("st", "other", 1).await.unwrap();
    for round in 0..2u8 {
        client.create_stream("st", "s", 1).await.unwrap();
        let fill = b'a' + round;
        let writer = client.event_writer("st/s").await.unwrap();
        let mut acks = JoinSet::new();
        for i in 0..EVENTS {
            acks.spawn(writer.write_event(format!("k{i}").as_bytes(), vec![fill; 1024]));
        }
        while let Some(r) = acks.join_next().await {
            r.unwrap().unwrap();
        }
        // Roll the log on (about 5 MiB) so the stream's files are freed and its reads go to
        // tier-2: at most three 1 MiB files stay, all the other stream's.
        write_events(&client, "st/other", 5000, 1024).await;
        let length = client.segment_info("st/s/0").await.unwrap().length;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.segment_info("st/s/0").await.unwrap().tier2_end < length
            || log_bytes_under(&dir.0.join("data/containers")) > 4 << 20
        {
            assert!(Instant::now() < deadline, "round {round}: not moved to tier-2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut reader = client.event_reader("st/s", ReadFrom::Head).await.unwrap();
        let mut n = 0;
        while n < EVENTS {
            let ev = reader.read_next(Duration::from_secs(5)).await.unwrap().expect("an event");
            assert!(ev.payload.iter().all(|&b| b == fill), "round {round}: event {n} holds another stream's bytes");
            n += 1;
        }
        if round == 0 {
            client.seal_stream("st", "s").await.unwrap();
            client.delete_stream("st", "s").await.unwrap();
        }
    }
}

/// Rewrites the checkpoint opening each container's newest log file in the second layout
/// (tag `SLCK 02`, no `creations_recorded`), as a build from before chunk creations were
/// recorded wrote it.
fn checkpoints_back_to_layout_2(containers: &Path) {
    use sluice_engine::log::checkpoint::{CheckpointState, CheckpointStateV2};
    use sluice_engine::log::format::{RecordHeader, RecordKind, RecordLayout, RecordMeta, encode_record};
    for c in std::fs::read_dir(containers).unwrap() {
        let c = c.unwrap().path();
        if !c.is_dir() {
            continue;
        }
        let mut logs: Vec<_> = std::fs::read_dir(&c).unwrap().map(|e| e.unwrap().path()).collect();
        logs.sort();
        // The newest file with records (a file prepared ahead has none yet).
        let Some((newest, mut bytes, scan)) = logs.iter().rev().find_map(|path| {
            let bytes = std::fs::read(path).unwrap();
            let scan = sluice_engine::log::scan::scan_file(&bytes::Bytes::from(bytes.clone()));
            (!scan.records.is_empty()).then_some((path, bytes, scan))
        }) else {
            continue;
        };
        let first = &scan.records[0];
        let ck = CheckpointState::decode(&first.payload).unwrap();
        assert!(ck.creations_recorded, "a container this build created records creations");
        let v2 = CheckpointStateV2 {
            container: ck.container,
            epoch: ck.epoch,
            next_segment_id: ck.next_segment_id,
            segments: ck.segments,
            garbage: ck.garbage,
        };
        let mut payload = b"SLCK\x02\0\0\0".to_vec();
        payload.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(&v2).unwrap());
        let disk_len = RecordHeader::packed_len(payload.len()) as usize;
        assert_eq!(disk_len as u64, first.header.disk_len(), "the same length on disk");
        let at = first.pos as usize;
        let out = &mut bytes[at..at + disk_len];
        let h = first.header;
        let meta = RecordMeta {
            layout: RecordLayout::Packed,
            kind: RecordKind::Checkpoint,
            epoch: h.epoch,
            lsn: h.lsn,
            tag: h.tag,
        };
        encode_record(out, meta, payload.len(), |p| p.copy_from_slice(&payload));
        std::fs::write(newest, &bytes).unwrap();
    }
}

/// The "tier-2 reconciled" line of the `n`th reconciliation in the server's log.
async fn reconciled_line(dir: &TempDir, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = server_log(dir);
        if let Some(l) = log.lines().filter(|l| l.contains("tier-2 reconciled")).nth(n) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no reconciliation number {n}:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Chunks are recorded in the log before they are created in tier-2, so a restart finds no
/// chunk the metadata does not name and lists no tier-2 directory. A data directory written
/// by an older build (checkpoint layout 2, chunks created before they were recorded) has its
/// segments' directories listed once, by its first restart, which deletes a partial upload
/// found there and records that creations are recorded; later restarts list nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_list_tier2_only_for_data_from_older_builds() {
    let (dir, t2dir, mut server) = tier2_server("tier2-listed", &["--containers-per-core", "1"]);
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("ls").await.unwrap();
    client.create_stream("ls", "s", 1).await.unwrap();
    write_events(&client, "ls/s", 3000, 1024).await;
    // Moved but for the last piece (under 64 KiB, it waits in the log for more).
    let length = client.segment_info("ls/s/0").await.unwrap().length;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.segment_info("ls/s/0").await.unwrap().tier2_end + (64 << 10) < length {
        assert!(Instant::now() < deadline, "not moved to tier-2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.env.push(("RUST_LOG".into(), "warn,sluice_engine::container::mover=info".into()));
    server.kill();
    server.restart();
    let line = reconciled_line(&dir, 0).await;
    eprintln!("restart 1: {line}");
    assert!(line.contains("checked=1") && line.contains("listed=0"), "{line}");
    // An older build's directory, with a partial upload of an older epoch.
    server.kill();
    let data = dir.0.join("data");
    checkpoints_back_to_layout_2(&data.join("containers"));
    let partial = t2dir.join(sluice_tier2::layout::chunk_name("ls/s/0", 1 << 40, 1));
    std::fs::write(&partial, b"left by an upload that was never recorded").unwrap();
    server.restart();
    let line = reconciled_line(&dir, 1).await;
    eprintln!("restart 2: {line}");
    assert!(line.contains("checked=1") && line.contains("listed=1"), "{line}");
    assert!(!partial.exists(), "the partial upload is deleted");
    let (ok, out, err) = sluice_tests::cli(&server.url(), &["log", "dump", "--entries", data.to_str().unwrap()], None);
    assert!(ok && out.contains("CreationsRecorded"), "{err}\n{out}");
    server.kill();
    server.restart();
    let line = reconciled_line(&dir, 2).await;
    eprintln!("restart 3: {line}");
    assert!(line.contains("checked=1") && line.contains("listed=0"), "{line}");
    let client = Client::connect(&server.url()).await.unwrap();
    read_back_events(&client, "ls/s", 3000, 1024).await;
}
