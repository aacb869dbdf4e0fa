//! Log files freed after the mover copied their data to tier-2 (real glommio I/O, a real
//! filesystem tier-2): each is renamed `.free`, cut from its end in steps and unlinked,
//! while a reader keeps reading the segment from its head (reads of freed data go to
//! tier-2, and no file is cut under a read in flight); a `.free` file a crash left behind is
//! deleted when the container opens again, and everything still reads back. With spare
//! files, freed files are reused as later ones, and nothing they held before is ever read,
//! across reopens. Without tier-2, truncated and deleted data frees its files too (a small
//! segment that alone still needs a file is copied into the current one first), and files
//! waiting to be cut become later log files.

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_engine::container::core::{CoreConfig, Request};
use sluice_engine::container::io::{Container, IoPacer};
use sluice_net::event::encode_event;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const FILE_BYTES: u64 = 4 << 20;
const EVENTS: u64 = 16_000;
const SEGMENT: &str = "s/t/0";

mod common;
use common::{Dir, core_cfg, first_open, tier2};

async fn open(dir: &Path, t2: &Path) -> Rc<Container> {
    let cfg = core_cfg(1, FILE_BYTES);
    Container::open(cfg, dir.to_path_buf(), Rc::new(IoPacer::new(0, Duration::ZERO)), Some(tier2(t2, 2 << 20)))
        .await
        .unwrap()
}

fn payload(n: u64) -> String {
    let mut p = format!("event-{n}-");
    p.push_str(&"x".repeat(1000 - p.len()));
    p
}

/// Reads the segment from its head to `len` and checks that it holds events 1, 2, ... in
/// order with their payloads; returns how many.
async fn read_all(c: &Rc<Container>, len: u64) -> u64 {
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < len {
        let d = c.read(SEGMENT, bytes.len() as u64, 256 << 10, Duration::ZERO).await.unwrap();
        assert!(!d.is_empty(), "a read at {} below the length {len} returns data", bytes.len());
        bytes.extend_from_slice(&d.to_bytes());
    }
    let (mut buf, mut events) = (&bytes[..len as usize], 0);
    while !buf.is_empty() {
        let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        events += 1;
        assert_eq!(std::str::from_utf8(&buf[4..4 + n]).unwrap(), payload(events), "event {events}");
        buf = &buf[4 + n..];
    }
    events
}

/// A thread that looks at a directory every 300 µs while a test runs, keeping what it finds
/// in a `T`.
struct Watcher<T> {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<T>,
}

impl<T: Send + 'static> Watcher<T> {
    fn start(dir: PathBuf, mut found: T, look: impl Fn(&Path, &mut T) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = stop.clone();
        let thread = std::thread::spawn(move || {
            while !seen.load(Ordering::Relaxed) {
                if dir.exists() {
                    look(&dir, &mut found);
                }
                std::thread::sleep(Duration::from_micros(300));
            }
            found
        });
        Self { stop, thread }
    }

    /// Stops the thread; what it found.
    fn stop(self) -> T {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Names in `dir` ending in `.ext`.
fn with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let rd = std::fs::read_dir(dir).unwrap();
    rd.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect()
}

#[test]
fn log_files_are_freed_in_steps_under_reads_and_leftovers_go_at_open() {
    let guard = Dir::new("freeing");
    let root = guard.0.clone();
    let (dir, t2) = (root.join("node"), root.join("tier2"));

    // Watches the log directory for a `.free` file cut shorter than a log file.
    let watcher = Watcher::start(dir.clone(), false, |dir, cut_seen| {
        *cut_seen |= with_ext(dir, "free")
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0 && m.len() < FILE_BYTES));
    });

    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;

            let c = open(&dir, &t2).await;
            c.submit(Request::Create { name: SEGMENT.into() }).unwrap().await.unwrap();

            // A reader reads the segment from its head over and over while the log rolls
            // and its older files are freed.
            let writing = Rc::new(Cell::new(true));
            let reader = {
                let (c, writing) = (c.clone(), writing.clone());
                glommio::spawn_local(async move {
                    let mut rounds = 0u64;
                    while writing.get() {
                        let len = c.status(SEGMENT).unwrap().length;
                        read_all(&c, len).await;
                        rounds += 1;
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                    rounds
                })
            };
            append_events(&c, 1, EVENTS).await;
            let len = c.status(SEGMENT).unwrap().length;

            // The mover catches up: everything in tier-2, the older files freed and gone.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let st = c.status(SEGMENT).unwrap();
                let (logs, freeing) = (with_ext(&dir, "log").len(), with_ext(&dir, "free").len());
                if st.tier2_end == len && logs <= 2 && freeing == 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "not freed: tier-2 end {} of {len}, {logs} logs, {freeing} .free",
                    st.tier2_end
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            writing.set(false);
            let rounds = reader.await;
            assert!(rounds >= 2, "the reader read the segment while files were freed ({rounds} rounds)");
            assert_eq!(read_all(&c, len).await, EVENTS);

            // A crash while a file was being cut leaves a `.free` file: the next open
            // deletes it and recovers from the log files as ever.
            c.stop_with("test: closing".into());
            drop(c);
            let log = with_ext(&dir, "log").into_iter().min().unwrap();
            let leftover = log.with_file_name("0000000000000000.free");
            std::fs::write(&leftover, vec![0xA5u8; 1 << 20]).unwrap();
            let c = open(&dir, &t2).await;
            assert!(!leftover.exists(), "the leftover .free file was deleted at open");
            assert_eq!(c.status(SEGMENT).unwrap().length, len);
            assert_eq!(read_all(&c, len).await, EVENTS, "every event reads back after the reopen");
            c.stop_with("test: done".into());
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(watcher.stop(), "a freed log file was seen cut short before it was unlinked");
}

/// Log files of 1 MiB for the reuse test: many rolls, each prepared from a spare once the
/// mover frees files.
const SMALL_FILE_BYTES: u64 = 1 << 20;

async fn open_reusing(dir: &Path, t2: &Path) -> Rc<Container> {
    let cfg = CoreConfig { spare_files: 2, ..core_cfg(1, SMALL_FILE_BYTES) };
    Container::open(cfg, dir.to_path_buf(), Rc::new(IoPacer::new(0, Duration::ZERO)), Some(tier2(t2, 2 << 20)))
        .await
        .unwrap()
}

/// Appends events `from..=to` to the segment, 64 at a time.
async fn append_events(c: &Rc<Container>, from: u64, to: u64) {
    for first in (from..=to).step_by(64) {
        let acks: Vec<_> = (first..(first + 64).min(to + 1))
            .map(|n| {
                let mut data = Vec::new();
                encode_event(&mut data, payload(n).as_bytes());
                let req = Request::Append {
                    name: SEGMENT.into(),
                    writer: 7,
                    first_event_number: n,
                    event_count: 1,
                    expected_offset: None,
                    data: Bytes::from(data),
                };
                c.submit(req).unwrap()
            })
            .collect();
        for ack in futures::future::join_all(acks).await {
            ack.unwrap();
        }
    }
}

/// Waits until the mover has moved the whole segment and at most two log files are left.
async fn caught_up(c: &Rc<Container>, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.status(SEGMENT).unwrap();
        let logs = with_ext(dir, "log").len();
        if st.tier2_end == st.length && logs <= 2 {
            return;
        }
        assert!(Instant::now() < deadline, "not freed: tier-2 end {} of {}, {logs} logs", st.tier2_end, st.length);
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn freed_log_files_are_reused_and_what_they_held_is_never_read() {
    let guard = Dir::new("reuse");
    let root = guard.0.clone();
    let (dir, t2) = (root.join("node"), root.join("tier2"));

    let (half, all) = (EVENTS / 2, EVENTS);
    let reused = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let mut reused = 0;
            let c = open_reusing(&dir, &t2).await;
            c.submit(Request::Create { name: SEGMENT.into() }).unwrap().await.unwrap();
            // A reader checks every event's payload while files are freed and reused.
            let writing = Rc::new(Cell::new(true));
            let reader = {
                let (c, writing) = (c.clone(), writing.clone());
                glommio::spawn_local(async move {
                    while writing.get() {
                        let len = c.status(SEGMENT).unwrap().length;
                        read_all(&c, len).await;
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                })
            };
            // In steps of about two log files, each time until the mover has moved
            // everything and freed the older files (kept as spares for the next steps).
            for first in (1..=half).step_by(2000) {
                append_events(&c, first, (first + 1999).min(half)).await;
                caught_up(&c, &dir).await;
            }
            writing.set(false);
            reader.await;
            let len = c.status(SEGMENT).unwrap().length;
            assert_eq!(read_all(&c, len).await, half);

            // Reopened (the current file is a reused one, its earlier records after the new
            // ones), everything reads back and appends go on; spares left are deleted.
            reused += c.log_files_reused();
            c.stop_with("test: closing".into());
            drop(c);
            let c = open_reusing(&dir, &t2).await;
            assert!(with_ext(&dir, "spare").is_empty(), "spare files are deleted at open");
            assert_eq!(c.status(SEGMENT).unwrap().length, len);
            assert_eq!(read_all(&c, len).await, half);
            append_events(&c, half + 1, all).await;
            let len = c.status(SEGMENT).unwrap().length;
            reused += c.log_files_reused();
            c.stop_with("test: closing".into());
            drop(c);
            let c = open_reusing(&dir, &t2).await;
            assert_eq!(read_all(&c, len).await, all, "every event reads back after the second reopen");
            reused += c.log_files_reused();
            c.stop_with("test: done".into());
            reused
        })
        .unwrap()
        .join()
        .unwrap();
    // Each name after an inode's first is one reuse (the same files come round again).
    eprintln!("log files reused {reused} times");
    assert!(reused >= 3, "log files were reused only {reused} times");
}

/// A container without tier-2, with log files of 1 MiB and one spare.
async fn open_without_tier2(dir: &Path) -> Rc<Container> {
    let cfg = CoreConfig { spare_files: 1, ..core_cfg(1, SMALL_FILE_BYTES) };
    Container::open(cfg, dir.to_path_buf(), Rc::new(IoPacer::new(0, Duration::ZERO)), None).await.unwrap()
}

/// Bytes of one event of `payload` (length prefix and 1000 bytes).
const EVENT_BYTES: u64 = 4 + 1000;

/// Reads the segment from `from` (the start of event `first`) to its length and checks that
/// it holds events `first`, `first + 1`, ... in order; returns how many.
async fn read_events_from(c: &Rc<Container>, from: u64, first: u64) -> u64 {
    let len = c.status(SEGMENT).unwrap().length;
    let mut bytes = Vec::new();
    while from + (bytes.len() as u64) < len {
        let d = c.read(SEGMENT, from + bytes.len() as u64, 256 << 10, Duration::ZERO).await.unwrap();
        assert!(!d.is_empty(), "a read at {} below the length {len} returns data", from + bytes.len() as u64);
        bytes.extend_from_slice(&d.to_bytes());
    }
    let (mut buf, mut n) = (&bytes[..], first);
    while !buf.is_empty() {
        let size = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(std::str::from_utf8(&buf[4..4 + size]).unwrap(), payload(n), "event {n}");
        buf = &buf[4 + size..];
        n += 1;
    }
    n - first
}

#[test]
fn without_tier2_truncated_and_deleted_data_gives_its_log_files_back() {
    const OTHER: &str = "s/t/1";
    let guard = Dir::new("free-no-t2");
    let root = guard.0.clone();
    let dir = root.join("node");
    // Watches for more spare files than the container may keep.
    let watcher = Watcher::start(dir.clone(), 0usize, |dir, most| *most = (*most).max(with_ext(dir, "spare").len()));

    let reused = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let c = open_without_tier2(&dir).await;
            for name in [SEGMENT, OTHER] {
                c.submit(Request::Create { name: name.into() }).unwrap().await.unwrap();
            }
            // A few bytes of another segment in the first file, then ~6 MiB of ours.
            let data = Bytes::from_static(b"\x05\x00\x00\x00other");
            let req = Request::Append {
                name: OTHER.into(),
                writer: 9,
                first_event_number: 1,
                event_count: 1,
                expected_offset: None,
                data,
            };
            c.submit(req).unwrap().await.unwrap();
            append_events(&c, 1, 6000).await;
            let files_before = with_ext(&dir, "log");
            let logs_before = files_before.len();
            assert!(logs_before >= 4, "the events fill several log files ({logs_before})");

            // Truncated up to event 5500: the other segment alone still needs the first file.
            // It is small, so the freeing task copies it into the current file, and every file
            // below the one holding the cut is freed (one kept as a spare, the rest cut and
            // unlinked). Left: that file, the current one and the next, created ahead.
            let cut = 5499 * EVENT_BYTES;
            c.submit(Request::Truncate { name: SEGMENT.into(), offset: cut }).unwrap().await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (logs, freeing) = (with_ext(&dir, "log").len(), with_ext(&dir, "free").len());
                if logs <= 3 && freeing == 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "not freed: {logs} logs, {freeing} .free of {logs_before} logs");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            assert!(!files_before[0].exists(), "the first file, which only the other segment needed, is gone");
            assert_eq!(c.log_relocations(), 1, "the other segment was copied once");
            assert_eq!(c.health().log_held_by, None);
            let other = c.read(OTHER, 0, 4096, Duration::ZERO).await.unwrap().to_bytes();
            assert_eq!(&other[..], b"\x05\x00\x00\x00other", "the copied segment reads back");
            let err = c.read(SEGMENT, 0, 4096, Duration::ZERO).await.unwrap_err();
            assert!(matches!(err, sluice_engine::EngineError::Truncated { .. }), "{err:?}");
            assert_eq!(read_events_from(&c, cut, 5500).await, 501, "what is left reads back");

            // Appends go on (the next file made from the spare), and a reopen finds the same:
            // the copy is replayed from the log (or taken from a checkpoint).
            append_events(&c, 6001, 8000).await;
            assert_eq!(read_events_from(&c, cut, 5500).await, 2501);
            let (st, reused) = (c.status(SEGMENT).unwrap(), c.log_files_reused());
            c.stop_with("test: closing".into());
            drop(c);
            let c = open_without_tier2(&dir).await;
            let again = c.status(SEGMENT).unwrap();
            assert_eq!((again.start_offset, again.length), (st.start_offset, st.length));
            assert_eq!(read_events_from(&c, cut, 5500).await, 2501, "everything kept reads back after a reopen");
            let other = c.read(OTHER, 0, 4096, Duration::ZERO).await.unwrap().to_bytes();
            assert_eq!(&other[..], b"\x05\x00\x00\x00other", "the copy reads back after a reopen");

            // Deleted, the other segment stays deleted across a reopen.
            c.submit(Request::Delete { name: OTHER.into() }).unwrap().await.unwrap();
            c.stop_with("test: closing".into());
            drop(c);
            let c = open_without_tier2(&dir).await;
            assert!(c.status(OTHER).is_err(), "the deleted segment stays deleted");
            assert_eq!(read_events_from(&c, cut, 5500).await, 2501);

            // Untruncated, the segment's data spans more and more files: the container's
            // health names it as what keeps them (from the cut on), with how many.
            append_events(&c, 8001, 12000).await;
            let held = c.health().log_held_by.expect("the segment is named as what keeps the log");
            assert_eq!((held.segment.as_str(), held.from), (SEGMENT, cut), "{held}");
            assert!(held.files >= 4, "{held}");
            c.stop_with("test: done".into());
            reused
        })
        .unwrap()
        .join()
        .unwrap();
    let most = watcher.stop();
    assert!(most <= 1, "at most one spare file at a time ({most})");
    assert!(reused >= 1, "a freed log file was made a later one ({reused} reuses)");
}

/// Without tier-2, a truncation that frees many files at once has them cut in steps (not
/// unlinked whole), and the log files made meanwhile come from those still whole (no spare
/// files here: every reuse is of a file waiting to be cut).
#[test]
fn without_tier2_files_waiting_to_be_cut_become_later_log_files() {
    let guard = Dir::new("free-pool");
    let root = guard.0.clone();
    let dir = root.join("node");
    let reused = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let open = || async {
                // No budget without tier-2 (as a node sets it).
                let cfg = CoreConfig { log_bytes_max: u64::MAX, ..core_cfg(1, FILE_BYTES) };
                Container::open(cfg, dir.to_path_buf(), Rc::new(IoPacer::new(0, Duration::ZERO)), None).await.unwrap()
            };
            let c = open().await;
            c.submit(Request::Create { name: SEGMENT.into() }).unwrap().await.unwrap();
            append_events(&c, 1, 64_000).await;
            let cut = 62_999 * EVENT_BYTES;
            c.submit(Request::Truncate { name: SEGMENT.into(), offset: cut }).unwrap().await.unwrap();
            append_events(&c, 64_001, 80_000).await;
            assert_eq!(read_events_from(&c, cut, 63_000).await, 17_001);
            let (st, reused) = (c.status(SEGMENT).unwrap(), c.log_files_reused());
            c.stop_with("test: closing".into());
            drop(c);
            let c = open().await;
            assert_eq!(c.status(SEGMENT).unwrap().length, st.length);
            assert_eq!(read_events_from(&c, cut, 63_000).await, 17_001, "everything kept reads back after a reopen");
            c.stop_with("test: done".into());
            reused
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!("{reused} log files made from files waiting to be cut");
    assert!(reused >= 1, "no file waiting to be cut was made a later log file");
}
