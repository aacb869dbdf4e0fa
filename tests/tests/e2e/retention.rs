//! Retention policies over scaled streams and with subscribers, against the real server's
//! retention service: a size policy truncates across epochs (sealed segments wholly before
//! the cut are emptied); a subscriber reader group holds truncation back until it
//! checkpoints, and then bounds it by its checkpoint. Without tier-2, retention gives the
//! log's disk space back.

use sluice_client::{Checkpoint, Client, GroupItem, GroupReader, ReadFrom, ReaderGroup, ReaderGroupConfig};
use sluice_net::{ErrorCode, Retention};
use sluice_tests::{Server, TempDir, cli, free_ports, log_bytes_under};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;

fn server(dir: &TempDir) -> Server {
    Server::start_with(&dir.0.join("data"), free_ports(2), 2, &["--retention-interval-ms", "100"])
}

/// `n` events of `size` bytes over 8 keys; the payload starts with "key:seq:".
async fn write(c: &Client, stream: &str, from: u64, n: u64, size: usize) {
    let w = c.event_writer(stream).await.unwrap();
    for i in from..from + n {
        let (key, payload) = event(i, size);
        w.write_event(&key, payload).await.unwrap();
    }
}

/// Event `i` of `size` bytes: its key (one of eight) and its payload.
fn event(i: u64, size: usize) -> ([u8; 8], Vec<u8>) {
    let mut p = format!("{}:{i}:", i % 8).into_bytes();
    p.resize(size, b'.');
    ((i % 8).to_le_bytes(), p)
}

/// `write` with every event in flight at once, their acknowledgements awaited after: as
/// fast as the server takes them, whatever one sync costs.
async fn write_pipelined(c: &Client, stream: &str, from: u64, n: u64, size: usize) {
    let w = c.event_writer(stream).await.unwrap();
    let acks: Vec<_> = (from..from + n)
        .map(|i| {
            let (key, payload) = event(i, size);
            w.write_event(&key, payload)
        })
        .collect();
    for a in acks {
        a.await.unwrap();
    }
}

/// (bytes held, (segment, start, length)) over every segment the stream ever had.
async fn held(c: &Client, scope: &str, stream: &str) -> (u64, Vec<(u64, u64, u64)>) {
    let h = c.stream_history(scope, stream).await.unwrap();
    let mut total = 0;
    let mut segs = Vec::new();
    for s in &h.segments {
        let si = c.segment_info(&format!("{scope}/{stream}/{}", s.number)).await.unwrap();
        total += si.length - si.start_offset;
        segs.push((s.number, si.start_offset, si.length));
    }
    (total, segs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_retention_truncates_across_epochs() {
    let dir = TempDir::new("ret-scaled");
    let s = server(&dir);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("rs").await.unwrap();
    c.create_stream_with("rs", "s", 2, Retention::parse("size:256K,512K").unwrap()).await.unwrap();
    // 8 steps of 128 KiB with a scaling after each of the first three.
    let mut n = 0;
    for step in 0..8 {
        write(&c, "rs/s", n, 128, 1020).await;
        n += 128;
        match step {
            0 => drop(c.split_segment("rs", "s", 0, 2).await.unwrap()),
            1 => drop(c.merge_segments("rs", "s", &[2, 3]).await.unwrap()),
            2 => drop(c.split_segment("rs", "s", 1, 2).await.unwrap()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (kept, segs) = loop {
        let (h, segs) = held(&c, "rs", "s").await;
        if h <= 512 * KIB {
            break (h, segs);
        }
        assert!(Instant::now() < deadline, "retention did not bring {h} bytes under 512 KiB: {segs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("size retention over 4 epochs kept {kept} bytes: (segment, start, length) {segs:?}");
    assert!(kept >= 256 * KIB, "keeps at least the min ({kept})");
    // The first epoch's segments are sealed and wholly before the cut: emptied.
    for (seg, start, len) in &segs {
        if *seg <= 1 {
            assert_eq!(start, len, "segment {seg} is emptied");
        }
    }
    assert_eq!(c.read_segment("rs/s/0", 0, 1024, Duration::ZERO).await.unwrap_err().code(), Some(ErrorCode::Truncated));
    // A reader from the head reads exactly the kept events, each key in order.
    let mut r = c.event_reader("rs/s", ReadFrom::Head).await.unwrap();
    let (mut count, mut last) = (0u64, [None::<u64>; 8]);
    while let Some(ev) = r.read_next(Duration::from_millis(500)).await.unwrap() {
        let text = String::from_utf8_lossy(&ev.payload);
        let mut f = text.split(':');
        let (k, i): (usize, u64) = (f.next().unwrap().parse().unwrap(), f.next().unwrap().parse().unwrap());
        assert!(last[k].is_none_or(|l| l < i), "key {k}: {i} after {:?}", last[k]);
        last[k] = Some(i);
        count += 1;
    }
    assert_eq!(count * (1020 + 4), kept, "the reader reads exactly the kept events");
}

/// A one-core server whose retention interval is 30 s, and the stream `scope/s` of
/// `segments` under `size:1M,2M`.
async fn long_interval_server(dir: &TempDir, scope: &str, segments: u32) -> (Server, Client) {
    let s = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &["--retention-interval-ms", "30000"]);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope(scope).await.unwrap();
    c.create_stream_with(scope, "s", segments, Retention::parse("size:1M,2M").unwrap()).await.unwrap();
    (s, c)
}

/// With the default interval (30 s: every stream looked at once in that time), a stream that
/// writes fast under a size policy is looked at every 100 ms, its pauses between bursts too:
/// it is cut back while it is being written, not half a minute later (at 1 GB/s that was
/// 30 GB past its MAX), and its marks are close enough together (closer than MAX − MIN)
/// that it ends between MIN and MAX. (With looks every second, marks 2.5 MiB apart left it
/// at 2.03 MiB for good once: no mark lay between 1 and 2 MiB before the tail.) The bursts
/// are a quarter of MAX − MIN: marks are taken at looks, at most one a burst while a look
/// in a pause sees nothing new, and bursts as large as MAX − MIN (1 MiB, as this test
/// first wrote) left marks that far apart, so a burst's phase against the looks could leave
/// the stream a few KiB above MAX once it stopped (2,100,224 bytes: the module doc of
/// `tools/src/retention.rs` says when marks are close enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_stream_is_held_to_its_size_policy_between_intervals() {
    const MIB: u64 = 1 << 20;
    let dir = TempDir::new("ret-fast");
    let (s, c) = long_interval_server(&dir, "rf", 2).await;
    let started = Instant::now();
    // 12 MiB in steps of 256 KiB, a pause after each (over 3.6 s in all).
    let mut most = 0;
    for step in 0..48 {
        write(&c, "rf/s", step * 256, 256, 1020).await;
        tokio::time::sleep(Duration::from_millis(75)).await;
        most = most.max(held(&c, "rf", "s").await.0);
    }
    let written = started.elapsed();
    let (at_end, _) = held(&c, "rf", "s").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let kept = loop {
        let (h, segs) = held(&c, "rf", "s").await;
        if h <= 2 * MIB {
            break h;
        }
        assert!(Instant::now() < deadline, "still {h} bytes held {:?} after the writes: {segs:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "12 MiB written in {written:?} under size:1M,2M (interval 30 s): held at most {most} bytes after a step, \
         {at_end} when the writes ended, {kept} kept {:?} after the start",
        started.elapsed()
    );
    assert!(kept >= MIB, "keeps at least the min ({kept})");
    // Cut back while the writes went on, not only after them: at most MAX and a step or two.
    assert!(most <= 4 * MIB && at_end <= 4 * MIB, "held {most} bytes at most, {at_end} at the end");
    drop(s);
}

/// A slow stream that turns fast is cut back within seconds, not at the next interval (30 s
/// here): every second the service reads the open segments' lengths (a request per shard)
/// and looks at once at a size policy's stream that grew by its share. Before, a look that
/// saw the stream writing slowly set the next one an interval later, and a batch job starting
/// on it put up to an interval's writes past MAX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_that_turns_fast_is_cut_back_within_seconds() {
    const MIB: u64 = 1 << 20;
    let dir = TempDir::new("ret-turns-fast");
    let (s, c) = long_interval_server(&dir, "rt", 1).await;
    // A trickle for 3 s: a small event every half second (the service's looks see a slow
    // stream, whose next look was an interval away before).
    for i in 0..6 {
        write(&c, "rt/s", i, 1, 30).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then fast for about 9 s: 54 steps of 256 events of 1 KiB (13.5 MiB), one every 170 ms
    // (about 1.5 MiB/s), each step's events in flight together. (Written one at a time, as
    // the trickle is, the steps took as long as the disk's syncs: too slow on a slow disk
    // under a loaded CI machine to tell, 10.7 MiB in 9 s.)
    const STEPS: u64 = 54;
    let fast = Instant::now();
    let (mut from, mut back_at) = (6, None);
    let mut most = 0;
    for step in 0..STEPS {
        tokio::time::sleep_until(tokio::time::Instant::from_std(fast + Duration::from_millis(170 * step))).await;
        write_pipelined(&c, "rt/s", from, 256, 1020).await;
        from += 256;
        let h = held(&c, "rt", "s").await.0;
        most = most.max(h);
        if back_at.is_none() && h > 4 * MIB {
            back_at = Some(None);
        } else if back_at == Some(None) && h <= 3 * MIB {
            back_at = Some(Some(fast.elapsed()));
        }
    }
    let (at_end, segs) = held(&c, "rt", "s").await;
    eprintln!(
        "{} MiB written fast for {:?} after a trickle (interval 30 s): held at most {most} bytes, cut back under \
         3 MiB at {back_at:?}, {at_end} bytes at the end",
        (from - 6) * 1020 / MIB,
        fast.elapsed()
    );
    assert!(fast.elapsed() < Duration::from_secs(15), "the fast writes came too slowly to tell ({:?})", fast.elapsed());
    // Cut back within about 5 s (the longest gap between looks) of turning fast, and held
    // near the policy from then on.
    assert!(at_end <= 3 * MIB, "{at_end} bytes held 9 s into fast writes under size:1M,2M: {segs:?}");
    drop(s);
}

/// A policy changed on an idle stream is applied within seconds, not at the next full
/// round (30 s here): the service lists every stream with its policy each second, and a
/// stream listed with another policy than its last look found is looked at at once. (Before,
/// every full round looked at every stream to see its policy; an idle stream's look is now
/// put off in full rounds too, so without the listing a change would wait for its writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_changed_on_an_idle_stream_is_applied_within_seconds() {
    const MIB: u64 = 1 << 20;
    let dir = TempDir::new("ret-policy-change");
    let s = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &["--retention-interval-ms", "30000"]);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("rp").await.unwrap();
    c.create_stream_with("rp", "s", 1, Retention::parse("size:8M,16M").unwrap()).await.unwrap();
    // 6 MiB in steps (the service's looks take marks meanwhile), then idle for 3 s.
    for step in 0..24 {
        write(&c, "rp/s", step * 256, 256, 1020).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (before, _) = held(&c, "rp", "s").await;
    assert!(before > 5 * MIB, "nothing is cut under size:8M,16M ({before} bytes held)");
    c.update_stream("rp", "s", Some(Retention::parse("size:1M,2M").unwrap()), None).await.unwrap();
    let changed = Instant::now();
    let kept = loop {
        let (h, segs) = held(&c, "rp", "s").await;
        if h <= 2 * MIB {
            break h;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "{h} bytes held {:?} after the change: {segs:?}",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "{before} bytes held under size:8M,16M; {kept} kept {:?} after the change to size:1M,2M",
        changed.elapsed()
    );
    assert!(kept >= MIB, "keeps at least the new MIN ({kept})");
    drop(s);
}

/// A node without tier-2: a size policy's truncations free the log files behind them (the
/// stream is the only one in its log), so the log stays near the policy's size however much
/// is written, freed files become later log files (`sluice stats` counts them), and a
/// reader from the head reads exactly what is kept.
/// A one-core server without tier-2, 1 MiB log files, retention every 100 ms, and the stream
/// `scope/s` under `size:256K,512K`.
async fn small_log_server(dir: &TempDir, scope: &str) -> (Server, Client) {
    let s = Server::start_with(
        &dir.0.join("data"),
        free_ports(1),
        1,
        &["--retention-interval-ms", "100", "--log-file-mb", "1"],
    );
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope(scope).await.unwrap();
    c.create_stream_with(scope, "s", 1, Retention::parse("size:256K,512K").unwrap()).await.unwrap();
    (s, c)
}

/// Writes 12 MiB to `stream` in steps of 512 KiB, looking at the log after each, then
/// waits for retention and freeing to catch up: (the most the log held, what it holds).
async fn write_12_mib_and_wait_for_the_log(c: &Client, stream: &str, data: &std::path::Path) -> (u64, u64) {
    const MIB: u64 = 1 << 20;
    let mut most = 0;
    let w = c.event_writer(stream).await.unwrap();
    for step in 0..24u64 {
        let acks: Vec<_> = (step * 512..(step + 1) * 512)
            .map(|i| {
                let (key, payload) = event(i, 1020);
                w.write_event(&key, payload)
            })
            .collect();
        for ack in acks {
            ack.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        most = most.max(log_bytes_under(data));
    }
    // Once retention and freeing catch up: the file holding the cut, the current one and
    // the next (created ahead), and the metadata store's small `meta.log`.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = log_bytes_under(data);
        if left <= 3 * MIB + 64 * KIB {
            return (most, left);
        }
        assert!(Instant::now() < deadline, "the log still holds {left} bytes after 12 MiB written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tier2_retention_gives_the_log_space_back() {
    const MIB: u64 = 1 << 20;
    let dir = TempDir::new("ret-no-t2");
    let data = dir.0.join("data");
    let (_s, c) = small_log_server(&dir, "rn").await;
    // A small stream without retention in the same log: copied forward as the log moves on,
    // it does not keep the files the other stream's retention lets go.
    c.create_stream("rn", "keep", 1).await.unwrap();
    let keep = c.event_writer("rn/keep").await.unwrap();
    for i in 0..3 {
        keep.write_event(b"k", format!("kept-{i}").into_bytes()).await.unwrap();
    }
    let (most, left) = write_12_mib_and_wait_for_the_log(&c, "rn/s", &data).await;
    let mut r = c.event_reader("rn/keep", ReadFrom::Head).await.unwrap();
    for i in 0..3 {
        let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("a kept event");
        assert_eq!(e.payload, format!("kept-{i}").into_bytes());
    }
    assert!(r.read_next(Duration::from_millis(200)).await.unwrap().is_none());
    let stats = c.shard_stats(false).await.unwrap();
    let h = &stats[0].containers[0];
    eprintln!(
        "12 MiB written under size:256K,512K: log files at most {most} bytes, {left} at the end; {} spare bytes, {} files reused",
        h.spare_bytes, h.files_reused
    );
    assert!(h.files_reused >= 4, "freed files become later log files ({} did)", h.files_reused);
    assert!(h.segments_copied >= 1, "the small stream was copied forward ({} copies)", h.segments_copied);
    assert!(h.spare_bytes <= 2 * MIB, "at most the default two spares of 1 MiB ({} bytes)", h.spare_bytes);
    assert!(most <= 6 * MIB, "the log grew to {most} bytes while the stream held at most ~512 KiB");
    let (kept, _) = held(&c, "rn", "s").await;
    assert!((256 * KIB..=512 * KIB + 64 * KIB).contains(&kept), "kept {kept} bytes");
    let mut r = c.event_reader("rn/s", ReadFrom::Head).await.unwrap();
    let mut count = 0u64;
    while r.read_next(Duration::from_millis(500)).await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count * (1020 + 4), kept, "the reader reads exactly the kept events");
}

/// A reader group's state lives in a segment of the same log. Uncompacted, it kept every
/// log file from its first record on; now a running group's readers compact it, and the
/// retention service compacts an idle group's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tier2_reader_groups_do_not_hold_the_log() {
    let dir = TempDir::new("ret-no-t2-rg");
    let data = dir.0.join("data");
    let (_s, c) = small_log_server(&dir, "rg").await;
    // Idle: a reader came and left before the writes.
    let idle = c.create_reader_group("rg", "idle", ReaderGroupConfig::stream("rg/s")).await.unwrap();
    idle.create_reader("x").await.unwrap().close().await.unwrap();
    // Running: a reader follows the writes, compacting every 200 ms.
    let mut config = ReaderGroupConfig::stream("rg/s");
    config.compact_state_every = Duration::from_millis(200);
    let running = c.create_reader_group("rg", "running", config).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (running, stop) = (running.clone(), stop.clone());
        tokio::spawn(async move {
            let mut r = running.create_reader("r").await.unwrap();
            let (mut events, mut truncated) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match r.read_next(Duration::from_millis(50)).await {
                    Ok(Some(GroupItem::Event(_))) => events += 1,
                    Ok(_) => {}
                    // Retention passed the reader: it goes on from the new start.
                    Err(e) if e.code() == Some(ErrorCode::Truncated) => truncated += 1,
                    Err(e) => panic!("reader: {e}"),
                }
            }
            (events, truncated)
        })
    };
    let (most, left) = write_12_mib_and_wait_for_the_log(&c, "rg/s", &data).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (events, truncated) = reader.await.unwrap();
    let starts = [
        c.segment_info("rg/_rg_idle/0").await.unwrap().start_offset,
        c.segment_info("rg/_rg_running/0").await.unwrap().start_offset,
    ];
    eprintln!(
        "12 MiB under size:256K,512K with two reader groups: log at most {most} bytes, {left} at the end; \
         the reader took {events} events ({truncated} truncations passed it); state segments start at {starts:?}"
    );
    assert!(starts.iter().all(|&s| s > 0), "both groups' states were compacted: {starts:?}");
    assert!(events > 0);
    // The idle group's compacted state is what it was: no readers, the segment at 0.
    let state = idle.state().await.unwrap();
    assert!(state.readers.is_empty());
    assert_eq!(state.unassigned.into_iter().collect::<Vec<_>>(), vec![("rg/s/0".to_string(), 0)]);
}

/// The retention service keeps its marks (`_system/_retention`): after a restart a size
/// policy truncates at once. With marks in memory only, the first mark after the restart was
/// the tail, and nothing could be cut until MIN more bytes had come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_marks_survive_a_restart() {
    let dir = TempDir::new("ret-restart");
    let mut s = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &["--retention-interval-ms", "1000"]);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("rr").await.unwrap();
    c.create_stream_with("rr", "s", 1, Retention::parse("size:100K,200K").unwrap()).await.unwrap();
    // ~164 KiB in four steps, a round (and a mark) after each.
    for step in 0..4 {
        write(&c, "rr/s", step * 40, 40, 1020).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    drop(c);
    let s = tokio::task::spawn_blocking(move || {
        s.kill();
        s.restart();
        s
    })
    .await
    .unwrap();
    let c = Client::connect(&s.url()).await.unwrap();
    // At once, ~82 KiB more: 246 KiB held, over the MAX, before the first round.
    write(&c, "rr/s", 160, 80, 1020).await;
    let kept = cut_back_within(&c, "after the restart", Duration::from_secs(10)).await;
    eprintln!("after the restart the stream was truncated to {kept} bytes");
    // Deleted and created again: its old marks (of more bytes than it has) are forgotten, and
    // the new stream is held to its policy from its own marks.
    c.seal_stream("rr", "s").await.unwrap();
    c.delete_stream("rr", "s").await.unwrap();
    c.create_stream_with("rr", "s", 1, Retention::parse("size:100K,200K").unwrap()).await.unwrap();
    for step in 0..5 {
        write(&c, "rr/s", step * 50, 50, 1020).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // 250 KiB: cut back within a few rounds (with the old marks, no new one was taken until
    // the stream passed their bytes, and none of them could serve).
    cut_back_within(&c, "created again", Duration::from_secs(4)).await;
}

/// Waits up to `limit` until `rr/s` (under `size:100K,200K`) holds at most its MAX, and
/// checks it keeps at least its MIN; returns the bytes kept.
async fn cut_back_within(c: &Client, when: &str, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let (kept, segs) = held(c, "rr", "s").await;
        if kept <= 200 * KIB {
            assert!(kept >= 100 * KIB, "{when}: kept {kept} bytes: {segs:?}");
            return kept;
        }
        assert!(Instant::now() < deadline, "{when}: still {kept} bytes held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes a checkpoint while `reader` (which has read everything there is) passes it.
async fn checkpoint(group: &ReaderGroup, reader: &mut GroupReader, name: &str) -> Checkpoint {
    let (g, name) = (group.clone(), name.to_string());
    let cp = tokio::spawn(async move { g.initiate_checkpoint(&name, Duration::from_secs(10)).await });
    while !cp.is_finished() {
        let item = reader.read_next(Duration::from_millis(20)).await.unwrap();
        assert!(item.is_none_or(|i| !matches!(i, GroupItem::Event(_))), "no events after the ones written");
    }
    cp.await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_group_holds_truncation_until_it_checkpoints() {
    let dir = TempDir::new("ret-sub");
    let s = server(&dir);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("rb").await.unwrap();
    c.create_stream_with("rb", "s", 1, Retention::parse("size:100K,200K").unwrap()).await.unwrap();
    let group = c.create_reader_group("rb", "g", ReaderGroupConfig::stream("rb/s").subscribing()).await.unwrap();
    let subs = c.list_subscribers("rb/s").await.unwrap();
    assert_eq!((subs.len(), subs[0].group.as_str(), subs[0].positions.is_none()), (1, "rb/g", true));
    // 400 KiB in four steps (retention marks in between), over the 200 KiB max.
    for step in 0..4 {
        write(&c, "rb/s", step * 100, 100, 1020).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (h, segs) = held(&c, "rb", "s").await;
    assert_eq!(segs[0].1, 0, "nothing truncated before the subscriber's first checkpoint ({h} held)");

    // The reader reads those 400 events and checkpoints there.
    let mut reader = group.create_reader("r").await.unwrap();
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while read < 400 {
        assert!(Instant::now() < deadline, "reading stalled at {read}");
        if let Some(GroupItem::Event(_)) = reader.read_next(Duration::from_millis(100)).await.unwrap() {
            read += 1;
        }
    }
    let first = checkpoint(&group, &mut reader, "cp1").await;
    let at = first.cuts[0].positions[&0];
    assert_eq!(at, 400 * (1020 + 4));
    // 600 KiB more: the policy would keep only the last 100-200 KiB, the subscriber holds
    // truncation at its checkpoint.
    for step in 4..10 {
        write(&c, "rb/s", step * 100, 100, 1020).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, segs) = held(&c, "rb", "s").await;
        if segs[0].1 > 0 {
            eprintln!("after a checkpoint at {at}: truncated at {}", segs[0].1);
            assert_eq!(segs[0].1, at, "truncation stops exactly at the subscriber's checkpoint");
            break;
        }
        assert!(Instant::now() < deadline, "no truncation after the subscriber checkpointed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The group reads the rest from where it is (nothing it had not read is gone), then
    // checkpoints at the end: the policy takes over again (kept: between min and max).
    while let Some(item) = reader.read_next(Duration::from_millis(500)).await.unwrap() {
        if let GroupItem::Event(_) = item {
            read += 1;
        }
    }
    assert_eq!(read, 1000, "the subscriber read every event");
    checkpoint(&group, &mut reader, "cp2").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (h, segs) = held(&c, "rb", "s").await;
        if h <= 200 * KIB {
            eprintln!("after the final checkpoint: {h} bytes held (start {})", segs[0].1);
            assert!(h >= 100 * KIB, "the policy's min is kept ({h})");
            break;
        }
        assert!(Instant::now() < deadline, "retention stuck at {h} bytes after the last checkpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deleting the group ends its subscription.
    drop(reader);
    group.delete().await.unwrap();
    assert!(c.list_subscribers("rb/s").await.unwrap().is_empty());

    // The CLI makes subscribers and shows them on the stream.
    let url = s.url();
    let (ok, out, err) = cli(&url, &["rg", "create", "rb/g2", "rb/s", "--subscriber"], None);
    assert!(ok && out.contains("subscriber"), "{out} {err}");
    let (ok, out, err) = cli(&url, &["stream", "describe", "rb/s"], None);
    assert!(ok && out.contains("subscriber rb/g2: no checkpoint yet"), "{out} {err}");
}
