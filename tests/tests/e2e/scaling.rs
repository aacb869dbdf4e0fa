//! Stream scaling against the real server: writers follow splits and merges while they
//! write, a reader group reads every acknowledged event exactly once in per-key order
//! across ten scalings; bad scaling requests get typed errors; history, cuts and batch
//! slices walk the epochs.

use sluice_client::{Client, ClientError, CutAt, GroupItem, ReaderGroupConfig};
use sluice_net::{ErrorCode, KeyRange};
use sluice_tests::{Harness, cli, keyed_writer, stop_keyed_writers};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITERS: u64 = 4;
const KEYS: u64 = 16;
const SCALINGS: usize = 10;

/// (delivery order, writer, key, seq) of every event read.
type Log = Arc<Mutex<Vec<(u64, u64, u64, u64)>>>;

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    r.expect_err("expected an error").code().expect("a server error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_and_down_under_load_keeps_every_event_once_and_in_key_order() {
    let h = Harness::with_stream("sc", "s", 2).await;
    let c = h.client.clone();
    let t0 = Instant::now();
    let group = c.create_reader_group("sc", "g", ReaderGroupConfig::stream("sc/s")).await.unwrap();

    // Two readers read while the writers write and the stream scales.
    let log: Log = Arc::default();
    let order = Arc::new(AtomicU64::new(0));
    let readers_done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for id in ["r1", "r2"] {
        let (group, log, order, done) = (group.clone(), log.clone(), order.clone(), readers_done.clone());
        readers.push(tokio::spawn(async move {
            let mut r = group.create_reader(id).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "reader {id} timed out");
                if let Some(GroupItem::Event(ev)) = r.read_next(Duration::from_millis(50)).await.unwrap() {
                    let s = std::str::from_utf8(&ev.payload).unwrap();
                    let v: Vec<u64> = s.split(':').map(|x| x.parse().unwrap()).collect();
                    let n = order.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().push((n, v[0], v[1], v[2]));
                }
            }
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(keyed_writer(c.clone(), "sc/s", w, KEYS, stop.clone()))).collect();

    // Up and down ten times: split the widest segment, then merge the two narrowest
    // neighbours, with writes flowing in between.
    let mut epochs = Vec::new();
    for i in 0..SCALINGS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let info = c.get_stream("sc", "s").await.unwrap();
        let segs = info.segments.clone();
        let started = Instant::now();
        let next = if i % 2 == 0 {
            let widest = segs.iter().max_by(|a, b| (a.key_high - a.key_low).total_cmp(&(b.key_high - b.key_low)));
            c.split_segment("sc", "s", widest.unwrap().number, 2 + (i as u32 / 2) % 2).await.unwrap()
        } else {
            let pair = segs
                .windows(2)
                .min_by(|a, b| (a[1].key_high - a[0].key_low).total_cmp(&(b[1].key_high - b[0].key_low)))
                .unwrap();
            c.merge_segments("sc", "s", &[pair[0].number, pair[1].number]).await.unwrap()
        };
        assert_eq!(next.epoch, info.epoch + 1);
        epochs.push((next.segments.len(), started.elapsed()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = stop_keyed_writers(&stop, writers).await;
    let total: u64 = written.values().sum();
    let t_written = t0.elapsed();
    // Sealing the stream lets the readers finish every segment.
    c.seal_stream("sc", "s").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while order.load(Ordering::SeqCst) < total {
        assert!(Instant::now() < deadline, "read {} of {total} events", order.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_read = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    readers_done.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }

    let log = log.lock().unwrap().clone();
    let mut seen = HashSet::new();
    let mut by_key: HashMap<(u64, u64), Vec<(u64, u64)>> = HashMap::new();
    for &(n, w, k, q) in &log {
        assert!(seen.insert((w, k, q)), "event {w}:{k}:{q} delivered twice");
        by_key.entry((w, k)).or_default().push((n, q));
    }
    for (wk, n) in &written {
        let mut got = by_key.remove(wk).unwrap_or_default();
        got.sort();
        let seqs: Vec<u64> = got.iter().map(|x| x.1).collect();
        assert_eq!(seqs, (0..*n).collect::<Vec<_>>(), "writer/key {wk:?}: every event once, in order");
    }
    assert!(by_key.is_empty(), "events nobody wrote: {:?}", by_key.keys());
    let history = c.stream_history("sc", "s").await.unwrap();
    assert_eq!(history.epochs.len(), SCALINGS + 1);
    // The group forgot each finished segment once its successors were in: what stays is the
    // last epoch's segments (the sealed stream's ends), not every segment ever read.
    let state = group.state().await.unwrap();
    let last = history.epochs.last().unwrap().segments.iter().map(|n| format!("sc/s/{n}")).collect::<HashSet<_>>();
    assert_eq!(state.finished.keys().cloned().collect::<HashSet<_>>(), last, "finished: {:?}", state.finished);
    assert!(state.awaiting.is_empty(), "{:?}", state.awaiting);
    eprintln!(
        "scaling under load: {total} events, {} segments over {} epochs; scale times {:?}; \
         writers done at {t_written:?}, all read at {t_read:?}",
        history.segments.len(),
        history.epochs.len(),
        epochs.iter().map(|e| e.1).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_scalings_are_refused_and_history_cuts_and_slices_walk_the_epochs() {
    let h = Harness::with_stream("sb", "s", 2).await;
    let c = h.client.clone();
    let w = c.event_writer("sb/s").await.unwrap();
    for i in 0..100u32 {
        w.write_event(format!("k{i}").as_bytes(), format!("a{i}").into_bytes()).await.unwrap();
    }
    let head = c.stream_cut("sb/s", CutAt::Head).await.unwrap();

    // Typed errors for requests that make no sense.
    assert_eq!(code(c.scale_stream("sb", "s", &[5], &[KeyRange { low: 0.0, high: 0.5 }]).await), ErrorCode::BadRequest);
    assert_eq!(code(c.scale_stream("sb", "s", &[0], &[KeyRange { low: 0.0, high: 0.4 }]).await), ErrorCode::BadRequest);
    assert_eq!(
        code(c.scale_stream("sb", "nope", &[0], &[KeyRange { low: 0.0, high: 0.5 }]).await),
        ErrorCode::NoSuchStream
    );
    assert!(matches!(c.split_segment("sb", "s", 0, 1).await, Err(ClientError::InvalidArgument(_))));

    // 0 → 2, 3; then 3 + 1 → 4.
    let info = c.split_segment("sb", "s", 0, 2).await.unwrap();
    assert_eq!((info.epoch, info.segments.iter().map(|s| s.number).collect::<Vec<_>>()), (1, vec![2, 3, 1]));
    for i in 100..200u32 {
        w.write_event(format!("k{i}").as_bytes(), format!("a{i}").into_bytes()).await.unwrap();
    }
    // Segment 2 and 1 are not neighbours.
    assert_eq!(code(c.merge_segments("sb", "s", &[2, 1]).await), ErrorCode::BadRequest);
    let info = c.merge_segments("sb", "s", &[3, 1]).await.unwrap();
    assert_eq!(info.segments.iter().map(|s| s.number).collect::<Vec<_>>(), vec![2, 4]);
    for i in 200..300u32 {
        w.write_event(format!("k{i}").as_bytes(), format!("a{i}").into_bytes()).await.unwrap();
    }
    let history = c.stream_history("sb", "s").await.unwrap();
    assert_eq!(
        history.epochs.iter().map(|e| e.segments.clone()).collect::<Vec<_>>(),
        vec![vec![0, 1], vec![2, 3, 1], vec![2, 4]]
    );
    assert_eq!(history.segment(4).unwrap().predecessors, vec![3, 1]);

    // A head cut from before the scalings still validates; one that leaves keys uncovered does not.
    c.validate_cut(&head).await.unwrap();
    let mut partial = head.clone();
    partial.positions.remove(&1);
    assert!(matches!(c.validate_cut(&partial).await, Err(ClientError::InvalidStreamCut(_))));

    // Batch slices from the head to the tail walk all five segments and hold all 300 events.
    let slices = c.segment_slices("sb/s", Some(&head), None).await.unwrap();
    let mut names: Vec<&str> = slices.iter().map(|s| s.segment.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["sb/s/0", "sb/s/1", "sb/s/2", "sb/s/3", "sb/s/4"]);
    let mut events = HashSet::new();
    for s in slices {
        let mut r = c.read_slice(s);
        while let Some(ev) = r.next_event().await.unwrap() {
            assert!(events.insert(ev.payload));
        }
    }
    assert_eq!(events.len(), 300);

    // A plain reader from the head sees every event once, and each key's in order.
    let mut reader = c.event_reader("sb/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut got = Vec::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(2)).await.unwrap() {
        got.push(String::from_utf8(ev.payload.to_vec()).unwrap());
        if got.len() == 300 {
            break;
        }
    }
    assert_eq!(got.len(), 300);

    // The CLI shows the epochs and scales by hand.
    let url = h.server.url();
    let (ok, out, err) = cli(&url, &["stream", "describe", "sb/s"], None);
    assert!(ok, "{err}");
    assert!(out.contains("sealed 3 1 -> created 4"), "{out}");
    let (ok, out, err) = cli(&url, &["stream", "scale", "sb/s", "--split", "4:3"], None);
    assert!(ok, "{err}");
    assert!(out.contains("epoch 3, segments 2 5 6 7"), "{out}");
    let (ok, _, err) = cli(&url, &["stream", "scale", "sb/s", "--merge", "2,7"], None);
    assert!(!ok && err.contains("not adjacent"), "{err}");
    // The client kept the history it read; reading it again brings in the new epoch.
    let later = c.stream_history("sb", "s").await.unwrap();
    assert_eq!(later.epochs.len(), 4);
    assert_eq!(later.epochs[..3], history.epochs[..]);
    assert_eq!(later.segment(4).unwrap().sealed_epoch, Some(3));
    assert_eq!(later, c.stream_history("sb", "s").await.unwrap());

    // Sealed streams scale no more; deleting one removes every segment it ever had.
    c.seal_stream("sb", "s").await.unwrap();
    assert_eq!(code(c.split_segment("sb", "s", 2, 2).await), ErrorCode::Sealed);
    c.delete_stream("sb", "s").await.unwrap();
    assert_eq!(code(c.segment_info("sb/s/0").await), ErrorCode::NoSuchSegment);
    assert_eq!(code(c.stream_history("sb", "s").await), ErrorCode::NoSuchStream);
    // A stream created again under the name has a history of its own, not the one kept.
    c.create_stream("sb", "s", 3).await.unwrap();
    let fresh = c.stream_history("sb", "s").await.unwrap();
    assert_eq!(fresh.epochs.iter().map(|e| e.segments.clone()).collect::<Vec<_>>(), vec![vec![0, 1, 2]]);
    assert_eq!(fresh.segments.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_scaling_splits_a_hot_stream_and_merges_it_back_when_the_load_stops() {
    use sluice_net::ScalingPolicy;
    use sluice_tests::{Server, TempDir, free_ports};
    let dir = TempDir::new("auto");
    // Short test thresholds: 1 s rate window (5 s long), a look every 200 ms, 1 s cooldown.
    let args = ["--rate-window-s", "1", "--autoscale-interval-ms", "200", "--scale-cooldown-s", "1"];
    let server = Server::start_with(&dir.0.join("data"), free_ports(2), 2, &args);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("au").await.unwrap();
    let policy = ScalingPolicy::ByEventRate { events_per_s: 500, factor: 2, min_segments: 1 };
    c.create_stream_policies("au", "s", 1, sluice_net::Retention::None, policy).await.unwrap();
    let info = c.get_stream("au", "s").await.unwrap();
    assert_eq!((info.segments.len(), info.scaling), (1, policy));

    // About 2,000 events/s over 64 keys until the stream has split (at most 20 s).
    let w = c.event_writer("au/s").await.unwrap();
    let started = Instant::now();
    let mut most = 1;
    let mut i = 0u64;
    while most < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "no split after 20 s of 2,000 events/s");
        let mut acks = Vec::new();
        for _ in 0..100 {
            acks.push(w.write_event(format!("k{}", i % 64).as_bytes(), vec![b'x'; 100]));
            i += 1;
        }
        for a in acks {
            a.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        most = most.max(c.get_stream("au", "s").await.unwrap().segments.len());
    }
    let split_after = started.elapsed();
    // Quiet: the segments cool down and merge back to the minimum (at most 60 s).
    let quiet = Instant::now();
    loop {
        let n = c.get_stream("au", "s").await.unwrap().segments.len();
        if n == 1 {
            break;
        }
        assert!(quiet.elapsed() < Duration::from_secs(60), "still {n} segments after 60 s without load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = c.stream_history("au", "s").await.unwrap();
    eprintln!(
        "auto-scaling: split after {split_after:?} of load, back to 1 segment {:?} after it stopped, {} epochs",
        quiet.elapsed(),
        history.epochs.len()
    );
    assert!(history.epochs.len() >= 3, "a split and a merge: {:?}", history.epochs);
    // Every event written is still there, once.
    let mut r = c.event_reader("au/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut n = 0;
    while r.read_next(Duration::from_secs(1)).await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, i);

    // update_stream: back to fixed keeps the current segments; the policy is validated.
    c.update_stream("au", "s", None, Some(ScalingPolicy::Fixed { segments: 9 })).await.unwrap();
    assert_eq!(c.get_stream("au", "s").await.unwrap().scaling, ScalingPolicy::Fixed { segments: 1 });
    let bad = ScalingPolicy::ByEventRate { events_per_s: 0, factor: 2, min_segments: 1 };
    assert_eq!(code(c.update_stream("au", "s", None, Some(bad)).await), ErrorCode::BadRequest);
}

/// A wide stream scaled many times: its history comes in pages and the client puts them
/// together, so readers, cuts and batch slices keep working. (With the whole history in
/// one answer, a 1024-segment stream's history passed the 1 MiB control limit after about
/// 120 scalings, and every reader of it failed with `TooLarge`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_stream_scaled_often_keeps_its_history_readable() {
    const SCALINGS: u64 = 140;
    let h = Harness::with_stream("wd", "s", 1024).await;
    let c = h.client.clone();
    let w = c.event_writer("wd/s").await.unwrap();
    let head = c.stream_cut("wd/s", CutAt::Head).await.unwrap();
    let started = Instant::now();
    for i in 0..SCALINGS {
        w.write_event(format!("k{i}").as_bytes(), format!("e{i}").into_bytes()).await.unwrap();
        let segs = c.get_stream("wd", "s").await.unwrap().segments;
        sluice_tests::split_or_merge(&c, "wd", "s", &segs, i % 2 == 1).await.unwrap();
    }
    eprintln!("{SCALINGS} scalings of a 1024-segment stream in {:?}", started.elapsed());
    let first = c.stream_history_page("wd", "s", 0, 0).await.unwrap();
    assert!(first.next.is_some(), "the history fits one page: {} epochs", first.epochs.len());
    let history = c.stream_history("wd", "s").await.unwrap();
    eprintln!(
        "history: {} epochs, {} segments, first page {} epochs",
        history.epochs.len(),
        history.segments.len(),
        first.epochs.len()
    );
    assert_eq!(history.epochs.len() as u64, SCALINGS + 1);
    assert!(history.epochs.windows(2).all(|p| p[1].epoch == p[0].epoch + 1));
    assert_eq!(history.segments.iter().filter(|s| s.sealed_epoch.is_none()).count(), 1024);
    assert_eq!(history.segments.iter().filter(|s| s.sealed_epoch.is_some()).count() as u64, SCALINGS / 2 * 3);

    // Cuts, slices and a reader all walk the whole history.
    c.validate_cut(&head).await.unwrap();
    let mut events = HashSet::new();
    for s in c.segment_slices("wd/s", Some(&head), None).await.unwrap() {
        let mut r = c.read_slice(s);
        while let Some(ev) = r.next_event().await.unwrap() {
            assert!(events.insert(ev.payload));
        }
    }
    assert_eq!(events.len() as u64, SCALINGS);
    let mut reader = c.event_reader("wd/s", sluice_client::ReadFrom::Head).await.unwrap();
    let mut read = 0;
    while read < SCALINGS && reader.read_next(Duration::from_secs(5)).await.unwrap().is_some() {
        read += 1;
    }
    assert_eq!(read, SCALINGS);
}
