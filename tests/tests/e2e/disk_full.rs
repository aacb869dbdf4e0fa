//! A full disk, for real: the data directory sits on a small ext4 file system of its own (a
//! loop mount, which needs root and a loop device; the test says SKIPPED without them).
//! Writes that find no room for the next log file get the typed `NoSpace` error and nothing
//! acknowledged is lost; the server starts and serves reads on the full disk; once space is
//! freed, writes resume without a restart (also when the space comes from truncating the
//! stream, on a node without tier-2); after SIGKILL every acknowledged event is there
//! once, in per-key order. A current log file with unallocated blocks (as older builds
//! could leave one) on a full disk gets writes refused with `NoSpace`, not a failed write.
//! The server's own output goes to the full disk too: lines are lost, the server is not.
//! The file-system tier-2 store on a full disk fails an append without leaving part of it
//! behind, so the mover's retry succeeds once space is freed; a node whose tier-2 fills
//! holds writes back (`Tier2Unavailable`) and resumes once tier-2 has room.

use sluice_client::{Client, ClientConfig, ClientError, ReadFrom};
use sluice_net::ErrorCode;
use sluice_tests::{Server, TempDir, free_ports};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KEYS: u64 = 4;
const EVENT_BYTES: usize = 1000;

/// A file system image mounted on a directory; unmounted and removed on drop.
struct LoopMount {
    dir: PathBuf,
    image: PathBuf,
}

impl LoopMount {
    fn new(base: &Path, mib: u64) -> Result<LoopMount, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let image = base.join("fs.img");
        let dir = base.join("mnt");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).map_err(|e| e.to_string())?;
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        // No blocks reserved for root (the test runs as root): full means full.
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image))?;
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir))?;
        Ok(LoopMount { dir, image })
    }
}

impl LoopMount {
    /// `new`, or `None` after saying the test is skipped and why.
    fn or_skip(base: &Path, mib: u64) -> Option<LoopMount> {
        LoopMount::new(base, mib)
            .map_err(|why| {
                eprintln!("SKIPPED: a full disk needs a file system of its own (root and a loop device): {why}")
            })
            .ok()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A file holding `mib` MiB of allocated blocks.
fn filler(path: &Path, mib: u64) {
    assert!(allocate(path, mib << 20), "fallocate {}: {}", path.display(), std::io::Error::last_os_error());
}

fn allocate(path: &Path, bytes: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(path).unwrap();
    // SAFETY: fallocate on a descriptor we own, for the duration of the call.
    unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) == 0 }
}

/// Takes whatever room is left on the file system of `path`'s directory.
fn fill_up(path: &Path) {
    let dir = std::ffi::CString::new(path.parent().unwrap().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(dir.as_ptr(), &mut st) }, 0);
    let mut bytes = st.f_bavail * st.f_frsize;
    // The file's own extent blocks take a little: shrink until it fits, then take the
    // crumbs left by the coarse steps, block by block.
    while bytes > 0 && !allocate(path, bytes) {
        bytes = bytes.saturating_sub(64 << 10);
    }
    let crumbs = path.with_extension("crumbs");
    let mut bytes = 64u64 << 10;
    while bytes > 0 && !allocate(&crumbs, bytes) {
        bytes = bytes.saturating_sub(4 << 10);
    }
}

/// Frees the blocks of the newest log file of container 0 from just past its last written
/// byte (rounded up to 64 KiB) to its end, as a log file made by an older build could be
/// left when its `fallocate` failed. Returns how many bytes are now a hole.
fn punch_tail_of_current_log(data: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let dir = data.join("containers").join("0000");
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .expect("a log file");
    let bytes = std::fs::read(&newest).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
    let from = used.div_ceil(64 << 10) * (64 << 10);
    let len = (bytes.len() as u64).saturating_sub(from);
    let f = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own, for the duration of the call.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, from as libc::off_t, len as libc::off_t) };
    assert_eq!(rc, 0, "punching {}: {}", newest.display(), std::io::Error::last_os_error());
    len
}

/// Writes events over every key, 256 in flight, until one is refused (a disk filled up);
/// returns that error, with every acknowledged event in `acked`.
async fn write_until_refused(
    writer: &sluice_client::EventWriter,
    seq: &mut [u64],
    acked: &mut HashSet<(u64, u64)>,
) -> ClientError {
    let mut refusal = None;
    let mut inflight = std::collections::VecDeque::new();
    let started = Instant::now();
    for i in 0..200_000u64 {
        assert!(started.elapsed() < Duration::from_secs(120), "the disk never filled");
        let k = i % KEYS;
        let s = seq[k as usize];
        seq[k as usize] += 1;
        inflight.push_back(((k, s), writer.write_event(&k.to_le_bytes(), payload(k, s))));
        if inflight.len() >= 256 {
            let (ks, ack) = inflight.pop_front().unwrap();
            match ack.await {
                Ok(()) => {
                    acked.insert(ks);
                }
                Err(e) => {
                    refusal = Some(e);
                    break;
                }
            }
        }
    }
    for (ks, ack) in inflight {
        match ack.await {
            Ok(()) => {
                acked.insert(ks);
            }
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    refusal.expect("the disk filled up")
}

/// Writes key 0's next event until one is acknowledged (space was just freed: the server
/// notices within a second or so; until then writes get `refused`), then 2,000 more over
/// every key, all acknowledged.
async fn writes_resume(
    writer: &sluice_client::EventWriter,
    refused: ErrorCode,
    seq: &mut [u64],
    acked: &mut HashSet<(u64, u64)>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let k = 0u64;
        let s = seq[0];
        seq[0] += 1;
        match writer.write_event(&k.to_le_bytes(), payload(k, s)).await {
            Ok(()) => {
                acked.insert((k, s));
                break;
            }
            Err(e) if e.code() == Some(refused) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes did not resume after space was freed: {e}"),
        }
    }
    let mut acks = Vec::new();
    for i in 0..2_000u64 {
        let k = i % KEYS;
        let s = seq[k as usize];
        seq[k as usize] += 1;
        acks.push(((k, s), writer.write_event(&k.to_le_bytes(), payload(k, s))));
    }
    for (ks, ack) in acks {
        ack.await.expect("writes resumed");
        acked.insert(ks);
    }
}

fn payload(k: u64, s: u64) -> Vec<u8> {
    let mut p = format!("{k}:{s}:").into_bytes();
    p.resize(EVENT_BYTES, b'.');
    p
}

/// Every event of the stream as (key, sequence), checking that none repeats and that each
/// key's sequence only grows.
async fn read_all(url: &str) -> HashSet<(u64, u64)> {
    let client = Client::connect(url).await.unwrap();
    let mut reader = client.event_reader("full/events", ReadFrom::Head).await.unwrap();
    let mut seen = HashSet::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(2)).await.unwrap() {
        let text = std::str::from_utf8(&ev.payload[..20]).unwrap();
        let mut f = text.split(':').map(|x| x.parse::<u64>());
        let (k, s) = (f.next().unwrap().unwrap(), f.next().unwrap().unwrap());
        assert!(seen.insert((k, s)), "event {k}:{s} read twice");
        if let Some(prev) = last.insert(k, s) {
            assert!(s > prev, "per-key order broken for key {k}: {s} after {prev}");
        }
    }
    seen
}

/// SIGKILL, restart, and the stream holds exactly the acknowledged events.
async fn read_after_kill(server: &mut Server, url: &str, acked: &HashSet<(u64, u64)>) {
    server.kill();
    server.restart();
    read_exactly(url, acked).await;
}

/// The stream holds exactly the acknowledged events, each once, in per-key order.
async fn read_exactly(url: &str, acked: &HashSet<(u64, u64)>) {
    let seen = read_all(url).await;
    let missing: Vec<_> = acked.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        missing.len(),
        &missing[..5.min(missing.len())]
    );
    assert_eq!(seen.len(), acked.len(), "events read that were never acknowledged");
}

/// A client whose calls and writers give up on a refused write after 2 s of retries (a
/// minute by default), and the stream `full/events` (one segment).
async fn client_with_stream(url: &str) -> (Client, ClientConfig) {
    let config = ClientConfig { retry_for: Duration::from_secs(2), ..ClientConfig::default() };
    let client = Client::connect_with(url, config.clone()).await.unwrap();
    client.create_scope("full").await.unwrap();
    client.create_stream("full", "events", 1).await.unwrap();
    (client, config)
}

fn is_no_space(e: &ClientError) -> bool {
    e.code() == Some(ErrorCode::NoSpace)
}

/// A node on a full disk; fields drop in order (the server before the unmount).
struct FullDisk {
    server: Server,
    url: String,
    client: Client,
    config: ClientConfig,
    /// Acknowledged events, and each key's next sequence number.
    acked: HashSet<(u64, u64)>,
    seq: [u64; KEYS as usize],
    /// The write that found the disk full.
    refusal: ClientError,
    mnt: LoopMount,
    _base: TempDir,
}

/// A node without tier-2 on a 96 MiB file system of its own with a 24 MiB filler, one
/// container with 8 MiB log files (the disk fills after a few of them), written until an
/// append gets `NoSpace`; `None` when the test is skipped (no root or loop device).
async fn fill_a_disk(tag: &str) -> Option<FullDisk> {
    let base = TempDir::new(tag);
    let mnt = LoopMount::or_skip(&base.0, 96)?;
    filler(&mnt.dir.join("filler"), 24);
    let extra = ["--containers-per-core", "1", "--log-file-mb", "8"];
    // The server's output goes to the full disk too (`data.log` beside the data directory):
    // log lines that find no room are lost, the server goes on.
    let server = Server::start_with(&mnt.dir.join("data"), free_ports(1), 1, &extra);
    let url = server.url();
    let (client, config) = client_with_stream(&url).await;
    let writer = client.event_writer("full/events").await.unwrap();
    let (mut acked, mut seq) = (HashSet::new(), [0u64; KEYS as usize]);
    let refusal = write_until_refused(&writer, &mut seq, &mut acked).await;
    assert!(is_no_space(&refusal), "a full disk gives NoSpace, not {refusal}");
    Some(FullDisk { server, url, client, config, acked, seq, refusal, mnt, _base: base })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers_when_space_is_freed() {
    // Write until the disk is full.
    // Bound in this order, the server is dropped first, the mount after it.
    let Some(FullDisk { _base, mnt, refusal, mut seq, mut acked, config, client, url, mut server }) =
        fill_a_disk("disk-full").await
    else {
        return;
    };
    assert!(refusal.to_string().contains("No space left on device"), "{refusal}");
    eprintln!("disk full after {} acknowledged events: {refusal}", acked.len());
    assert!(acked.len() > 10_000, "only {} events fit", acked.len());

    // Still full: a new write is refused with the same typed error.
    let writer = client.event_writer("full/events").await.unwrap();
    let e = writer.write_event(b"late", payload(99, 0)).await.unwrap_err();
    assert!(is_no_space(&e), "{e}");
    drop(writer);

    // Metadata changes: refused with the same error once the disk has no byte left (the log
    // files need more than what a removed half-made one left), and the metadata store keeps
    // working (checked once space is back).
    fill_up(&mnt.dir.join("filler2"));
    let mut meta_refused = None;
    for i in 0..2_000 {
        match client.create_scope(&format!("s{i:04}-{}", "x".repeat(40))).await {
            Ok(()) => {}
            Err(e) => {
                meta_refused = Some(e);
                break;
            }
        }
    }
    let meta_refused = meta_refused.expect("metadata writes fill the disk too");
    assert!(is_no_space(&meta_refused), "{meta_refused}");

    // SIGKILL and restart on the full disk: it starts, and serves every acknowledged event.
    read_after_kill(&mut server, &url, &acked).await;

    // Free space: writes resume without a restart (the server tries again every second).
    std::fs::remove_file(mnt.dir.join("filler")).unwrap();
    std::fs::remove_file(mnt.dir.join("filler2")).unwrap();
    std::fs::remove_file(mnt.dir.join("filler2.crumbs")).unwrap();
    let client = Client::connect_with(&url, config.clone()).await.unwrap();
    let writer = client.event_writer("full/events").await.unwrap();
    writes_resume(&writer, ErrorCode::NoSpace, &mut seq, &mut acked).await;
    drop(writer);

    // The metadata store took changes again without a restart.
    client.create_scope("after").await.unwrap();
    client.create_stream("after", "s", 2).await.unwrap();

    // And all of it survives a SIGKILL.
    read_after_kill(&mut server, &url, &acked).await;

    // A current log file with unallocated blocks (older builds left one when `fallocate`
    // failed) on a full disk: the restarted server must not write into the hole (the write
    // would fail and poison the container) but refuse with NoSpace, and resume once space
    // is freed.
    server.kill();
    let hole = punch_tail_of_current_log(&mnt.dir.join("data"));
    assert!(hole >= 1 << 20, "only {hole} bytes of the current log file were unused");
    fill_up(&mnt.dir.join("filler3"));
    server.restart();
    let client = Client::connect_with(&url, config).await.unwrap();
    let writer = client.event_writer("full/events").await.unwrap();
    let e = writer.write_event(b"hole", payload(98, 0)).await.unwrap_err();
    assert!(is_no_space(&e), "a write facing an unallocated log file on a full disk: {e}");
    std::fs::remove_file(mnt.dir.join("filler3")).unwrap();
    std::fs::remove_file(mnt.dir.join("filler3.crumbs")).unwrap();
    writes_resume(&writer, ErrorCode::NoSpace, &mut seq, &mut acked).await;
    drop(writer);
    read_after_kill(&mut server, &url, &acked).await;
    drop(server);
}

/// Without tier-2, truncating a stream gives a full disk its space back: the log files
/// below the cut are freed and writes resume without a restart; what is kept reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_without_tier2_recovers_when_its_stream_is_truncated() {
    let Some(FullDisk { _base, mnt: _mnt, mut seq, acked, client, url, server, .. }) =
        fill_a_disk("disk-full-trunc").await
    else {
        return;
    };

    // Everything written so far is truncated away: its files are freed.
    let cut = client.stream_cut("full/events", sluice_client::CutAt::Tail).await.unwrap();
    client.truncate_stream(&cut).await.expect("a truncation is taken on a full disk");
    let writer = client.event_writer("full/events").await.unwrap();
    let mut kept = HashSet::new();
    writes_resume(&writer, ErrorCode::NoSpace, &mut seq, &mut kept).await;
    drop(writer);
    eprintln!("{} events truncated on the full disk; {} written after", acked.len(), kept.len());
    read_exactly(&url, &kept).await;
    drop(server);
}

/// The file-system tier-2 store on a full disk: an append that finds no room fails with
/// `Unavailable` and leaves the chunk as it was (a partial write is cut off again), so the
/// mover's retry at the same offset succeeds once space is freed instead of finding extra
/// bytes and being refused for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tier2_file_system_fails_appends_cleanly_and_takes_them_once_freed() {
    use sluice_tier2::ChunkStore;
    use sluice_tier2::fs::FsChunkStore;
    let base = TempDir::new("t2-full");
    let Some(mnt) = LoopMount::or_skip(&base.0, 32) else { return };
    let store = FsChunkStore::open(&mnt.dir.join("tier2"), 2).unwrap();
    store.create("c/0").await.unwrap();
    let piece = bytes::Bytes::from(vec![7u8; 8 << 20]);
    store.append("c/0", 0, piece.clone()).await.unwrap();
    const PIECE: u64 = 8 << 20;
    // Leave room for part of the next piece only: the write gets some way, then fails.
    assert!(allocate(&mnt.dir.join("room"), 4 << 20));
    fill_up(&mnt.dir.join("filler"));
    std::fs::remove_file(mnt.dir.join("room")).unwrap();
    let e = store.append("c/0", PIECE, piece.clone()).await.unwrap_err();
    assert!(matches!(e, sluice_tier2::ChunkError::Unavailable(_)), "a full tier-2 disk: {e:?}");
    assert_eq!(store.size("c/0").await.unwrap(), PIECE, "the failed append left no bytes behind");
    std::fs::remove_file(mnt.dir.join("filler")).unwrap();
    std::fs::remove_file(mnt.dir.join("filler.crumbs")).unwrap();
    store.append("c/0", PIECE, piece.clone()).await.expect("the same append, retried once space is freed");
    assert_eq!(store.size("c/0").await.unwrap(), 2 * PIECE);
    assert_eq!(store.read("c/0", PIECE - 4, 8).await.unwrap(), bytes::Bytes::from(vec![7u8; 8]));
}

/// The whole node with its tier-2 on a file system that fills up: the mover cannot upload,
/// the log reaches its budget, and appends are refused with `Tier2Unavailable` (nothing
/// acknowledged is lost); once tier-2 has room again the mover catches up and writes
/// resume without a restart; after SIGKILL every acknowledged event is read once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tier2_holds_writes_back_until_freed() {
    let base = TempDir::new("t2-full-node");
    let Some(mnt) = LoopMount::or_skip(&base.0, 48) else { return };
    filler(&mnt.dir.join("filler"), 36);
    let tier2 = format!("fs:{}", mnt.dir.join("tier2").display());
    let mut extra = sluice_tests::small_log_with_tier2(&tier2);
    extra.extend(["--containers-per-core".to_string(), "1".to_string()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut server = Server::start_with(&base.0.join("data"), free_ports(1), 1, &extra);
    let url = server.url();
    let (client, _) = client_with_stream(&url).await;
    let writer = client.event_writer("full/events").await.unwrap();
    let mut acked: HashSet<(u64, u64)> = HashSet::new();
    let mut seq = [0u64; KEYS as usize];
    let refusal = write_until_refused(&writer, &mut seq, &mut acked).await;
    assert_eq!(refusal.code(), Some(ErrorCode::Tier2Unavailable), "{refusal}");
    eprintln!("tier-2 full after {} acknowledged events: {refusal}", acked.len());
    drop(writer);

    std::fs::remove_file(mnt.dir.join("filler")).unwrap();
    let writer = client.event_writer("full/events").await.unwrap();
    writes_resume(&writer, ErrorCode::Tier2Unavailable, &mut seq, &mut acked).await;
    drop(writer);
    read_after_kill(&mut server, &url, &acked).await;
    drop(server);
}
