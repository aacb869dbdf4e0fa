//! Damage to acknowledged data in a container log: the real server must refuse to start and
//! name the file and offset (or, when told to salvage, start and serve every sound record);
//! a torn tail (garbage after the last record) must be cut.

use sluice_client::{Client, ReadFrom};
use sluice_tests::{TempDir, free_ports, sluice_bin};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The positions of a log file's records (the chain a scan finds), and where it ends.
fn records_of(file: &Path) -> (Vec<usize>, usize) {
    let scan = sluice_engine::log::scan::scan_file(&bytes::Bytes::from(std::fs::read(file).unwrap()));
    (scan.records.iter().map(|r| r.pos as usize).collect(), scan.end as usize)
}

/// Log files that hold at least `n` records, with their record positions.
fn files_with_records(data: &Path, n: usize) -> Vec<(PathBuf, Vec<usize>)> {
    let mut out = Vec::new();
    for c in std::fs::read_dir(data.join("containers")).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for f in std::fs::read_dir(c.path()).unwrap().flatten() {
            let recs = records_of(&f.path()).0;
            if recs.len() >= n {
                out.push((f.path(), recs));
            }
        }
    }
    out
}

fn start(data: &Path, port: u16) -> std::process::Child {
    Command::new(sluice_bin())
        .args(["standalone", "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--cores", "1", "--no-pin", "--log-file-mb", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_refuses_start_and_torn_tail_is_cut() {
    let dir = TempDir::new("corrupt");
    let data = dir.0.join("data");
    let port = free_ports(1);
    let mut server = start(&data, port);
    let url = format!("127.0.0.1:{port}");
    assert!((0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        sluice_tests::handshake(url.parse().unwrap())
    }));
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("x").await.unwrap();
    c.create_stream("x", "s", 1).await.unwrap();
    let w = c.event_writer("x/s").await.unwrap();
    for i in 0..20 {
        // One flush per event: many records.
        w.write_event(b"k", format!("event-{i}").into_bytes()).await.unwrap();
    }
    server.kill().unwrap();
    server.wait().unwrap();

    // A torn tail: garbage right after the last record (in its block and the next). The
    // server starts and cuts it.
    let (file, recs) = files_with_records(&data, 5).pop().expect("a log file with records");
    let end = records_of(&file).1;
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(!end.is_multiple_of(4096) && recs.windows(2).any(|w| w[1] - w[0] < 4096), "records share blocks");
    bytes[end..end + 5000].fill(0x77);
    std::fs::write(&file, &bytes).unwrap();
    let mut server = start(&data, port);
    assert!((0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        sluice_tests::handshake(url.parse().unwrap())
    }));
    let mut r = Client::connect(&url).await.unwrap().event_reader("x/s", ReadFrom::Head).await.unwrap();
    let mut n = 0;
    while r.read_next(Duration::from_millis(500)).await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 20);
    server.kill().unwrap();
    server.wait().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes[end..end + 5000].iter().all(|&b| b == 0), "torn bytes were cleared");
    assert_eq!(records_of(&file).0[..recs.len()], recs[..], "the records before them stay");

    // Damage inside an acknowledged record in the middle: refuse to start, naming the file.
    let mut bytes = bytes;
    let victim = recs[recs.len() / 2];
    bytes[victim + 60] ^= 0xFF;
    std::fs::write(&file, &bytes).unwrap();
    let out = start(&data, port).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "server started on a corrupt log");
    assert!(stderr.contains("corrupt log") && stderr.contains(&format!("byte {victim}")), "{stderr}");
    assert!(stderr.contains(file.file_name().unwrap().to_str().unwrap()), "{stderr}");
}

/// The log files of a container directory that hold records, oldest first, with their
/// record positions.
fn container_files(container: &Path) -> Vec<(PathBuf, Vec<usize>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(container).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let recs = records_of(&f).0;
            (f, recs)
        })
        .filter(|(_, recs): &(PathBuf, Vec<usize>)| !recs.is_empty())
        .collect()
}

/// Writes `rounds` rounds of 50 events of 2,000 bytes (`fill(round)` each) to `stream`,
/// one stream of one segment, waiting for each round's acknowledgements.
async fn write_rounds(c: &Client, stream: &str, rounds: u8, fill: impl Fn(u8) -> u8) {
    let w = c.event_writer(stream).await.unwrap();
    for round in 0..rounds {
        let acks: Vec<_> = (0..50).map(|_| w.write_event(b"k", vec![fill(round); 2000])).collect();
        for a in acks {
            a.await.unwrap();
        }
    }
}

/// Waits (up to 20 s) until the server's log `log` says `what`.
async fn wait_for_log(log: &Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log).unwrap_or_default().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never said '{what}': {}",
            std::fs::read_to_string(log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a node on `data` that must refuse to start (its log damaged); its error output.
fn refused_start(data: &Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new(sluice_bin())
        .args(["standalone", "--data-dir"])
        .arg(data)
        .args(["--listen", url, "--cores", "1", "--no-pin", "--log-file-mb", "8"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started on a damaged log: {stderr}");
    stderr
}

/// Flips one byte in place (the server may hold the file open).
fn flip_byte(path: &Path, at: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at as u64).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at as u64).unwrap();
    f.sync_all().unwrap();
}

/// `sluice log scrub` reads every container's log back from the disk while the server runs:
/// a sound log passes; a record damaged in an older file (a valid one after it), the last
/// record of another older file damaged (found by the LSN chain to the next file) and the
/// last acknowledged record of the current file damaged (a restart would take it for a torn
/// write and cut it) are each reported by file and position, with exit status 1, and the
/// server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_scrub_finds_damage_while_the_server_runs() {
    let dir = TempDir::new("scrub");
    let data = dir.0.join("data");
    let server = sluice_tests::Server::start_with(
        &data,
        free_ports(1),
        1,
        &["--log-file-mb", "1", "--containers-per-core", "2"],
    );
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("sc").await.unwrap();
    c.create_stream("sc", "s", 1).await.unwrap();
    let w = c.event_writer("sc/s").await.unwrap();
    for round in 0..30 {
        let acks: Vec<_> = (0..100).map(|i| w.write_event(b"k", vec![b'a' + (round % 26) as u8; 1000 + i])).collect();
        for a in acks {
            a.await.unwrap();
        }
    }
    let (ok, out, err) = sluice_tests::cli(&url, &["log", "scrub"], None);
    eprintln!("{out}{err}");
    assert!(ok && out.contains("no damage found"), "{out}{err}");
    assert!(out.contains("scrubbed 2 of 2 container logs"), "{out}");

    let container = std::fs::read_dir(data.join("containers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && container_files(p).len() >= 3)
        .expect("a container with several log files");
    let files = container_files(&container);
    let (current, current_recs) = files.last().unwrap();
    // A record of an older file with a valid one after it, and a payload past its first
    // block (a byte flipped there is inside the payload, not in the padding).
    let (older, damaged_at) = files[..files.len() - 1]
        .iter()
        .find_map(|(f, r)| r.windows(2).skip(1).find(|w| w[1] - w[0] >= 8192).map(|w| (f, w[0])))
        .expect("an older file with a large record followed by another");
    flip_byte(older, damaged_at + 5000);
    // The last record of another older file: a scan alone takes it for a torn tail; the
    // LSN chain to the next file tells.
    let (tail_file, tail_recs) = files[..files.len() - 1].iter().find(|(f, _)| f != older).expect("another older file");
    flip_byte(tail_file, tail_recs.last().unwrap() + 45);
    // The current file's last record: a byte just past its 40-byte header.
    let last = *current_recs.last().unwrap();
    flip_byte(current, last + 45);

    let (ok, out, err) = sluice_tests::cli(&url, &["log", "scrub", "--rate-mb", "0"], None);
    eprintln!("{out}{err}");
    assert!(!ok && out.contains("DAMAGED") && err.contains("damage found in 1 container logs"), "{out}{err}");
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    assert!(out.contains(&format!("file {}: the record at byte {damaged_at} is damaged", name(older))), "{out}");
    assert!(
        out.contains(&format!("file {}: the record at byte {last} ", name(current)))
            && out.contains("were acknowledged"),
        "{out}"
    );
    assert!(out.contains(&format!("file {} ends at LSN", name(tail_file))), "{out}");
    // Only the container asked for; the other one is sound.
    let other: u32 = if container.ends_with("0000") { 1 } else { 0 };
    let (ok, out, _) = sluice_tests::cli(&url, &["log", "scrub", "--containers", &other.to_string()], None);
    assert!(ok && out.contains("scrubbed 1 of 1 container logs"), "{out}");
    let (ok, _, err) = sluice_tests::cli(&url, &["log", "scrub", "--containers", "7"], None);
    assert!(!ok && err.contains("there is no container 7"), "{err}");
    assert!(sluice_tests::handshake(url.parse().unwrap()), "the server still serves");
}

/// A byte damaged under data the read cache does not hold, in the log file being written: the
/// read that would take it fails with `DataCorrupt`, naming the file and the record, instead
/// of handing the bytes out (the engine reads whole records and checks their checksums);
/// reads of sound records before and after it go on, an event reader is told, `sluice
/// stream verify` reports it, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_in_the_current_log_file_is_refused_not_read() {
    use sluice_net::ErrorCode;
    let dir = TempDir::new("logdamage");
    let data = dir.0.join("data");
    // No read cache: every read goes to the log file.
    let server =
        sluice_tests::Server::start_with(&data, free_ports(1), 1, &["--cache-mb", "0", "--containers-per-core", "1"]);
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("ld").await.unwrap();
    c.create_stream("ld", "s", 1).await.unwrap();
    write_rounds(&c, "ld/s", 20, |round| b'a' + round).await;
    let length = c.segment_info("ld/s/0").await.unwrap().length;
    let read = |offset: u64| c.read_segment("ld/s/0", offset, 64 << 10, Duration::ZERO);
    // Sound, every byte of it comes back from the log.
    let mut at = 0;
    while at < length {
        let (_, d) = read(at).await.unwrap();
        assert!(!d.is_empty());
        at += d.len() as u64;
    }

    let files = files_with_records(&data, 6);
    assert_eq!(files.len(), 1, "one log file: {files:?}");
    let (file, recs) = &files[0];
    // A byte inside the payload of a batch record in the middle (records of these batches
    // are at least a block long; the first holds the checkpoint).
    let damaged_at = recs[recs.len() / 2];
    flip_byte(file, damaged_at + 200);
    let name = file.file_name().unwrap().to_str().unwrap().to_string();

    let mut at = 0;
    let e = loop {
        match read(at).await {
            Ok((_, d)) => {
                assert!(!d.is_empty() && at < length, "read past the damage: at {at} of {length}");
                at += d.len() as u64;
            }
            Err(e) => break e,
        }
    };
    eprintln!("refused at offset {at}: {e}");
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    // Everything before the damaged record is served: whole events (2,000 bytes and a
    // 4-byte header each), up to the record's first.
    const EVENT: u64 = 2004;
    assert!(at > 0 && at < length && at % EVENT == 0, "sound records before the damage are read: {at} of {length}");
    assert!(
        e.to_string().contains(&format!("log file {name}: the record at byte {damaged_at} fails its checksum")),
        "{e}"
    );
    // The answer says where the sound data resumes: at an event in the next record.
    let sluice_client::ClientError::Server { offset: Some(resume), .. } = e else { panic!("no offset in {e:?}") };
    assert!(resume > at && resume < length && resume % EVENT == 0, "resumes at {resume} ({at}..{length})");
    let (_, d) = read(resume).await.unwrap();
    assert!(d.len() >= 2000 && d[4..2004].iter().all(|&b| b == d[4]), "an event begins there");
    // The last events are in sound records after it.
    let (_, d) = read(length - 2000).await.unwrap();
    assert!(d.len() >= 2000 && d[d.len() - 1] == b'a' + 19, "the last event reads");
    let mut reader = c.event_reader("ld/s", ReadFrom::Head).await.unwrap();
    let mut events = 0u64;
    let told = loop {
        match reader.read_next(Duration::from_secs(2)).await {
            Ok(Some(_)) => events += 1,
            Ok(None) => panic!("the reader reached the end without hearing of the damage"),
            Err(e) => break e,
        }
    };
    assert_eq!(told.code(), Some(ErrorCode::DataCorrupt), "{told}");
    assert_eq!(events, at / EVENT, "the reader gets every event before the damage");
    let (ok, out, err) = sluice_tests::cli(&url, &["stream", "verify", "ld/s"], None);
    eprintln!("{out}{err}");
    assert!(!ok && out.contains("DAMAGED") && out.contains(&format!("the record at byte {damaged_at}")), "{out}{err}");
    // It reads on where the sound data resumes: every event but the damaged record's.
    let sound = at / EVENT + (length - resume) / EVENT;
    assert!(out.contains(&format!("{sound} events: DAMAGED ({} bytes unreadable", resume - at)), "{out}");
    assert!(sluice_tests::handshake(url.parse().unwrap()), "the server still serves");
}

/// `sluice stats` tells an operator what is wrong with a container without reading the
/// server's log: a damaged record that the tier-2 mover stops at (it moves nothing damaged
/// and retries, while the container's other segments move on), that reads are refused on,
/// and that a scrub finds; `--check` makes it the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_shows_in_stats() {
    let dir = TempDir::new("damagestats");
    let data = dir.0.join("data");
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    // No read cache (reads go to the file); nothing is moved before the stream is sealed.
    let args = ["--cache-mb", "0", "--containers-per-core", "1", "--tier2", &tier2, "--move-min-kb", "1000000"];
    let server = sluice_tests::Server::start_with(&data, free_ports(1), 1, &args);
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("hs").await.unwrap();
    c.create_stream("hs", "s", 1).await.unwrap();
    write_rounds(&c, "hs/s", 20, |round| b'a' + round).await;
    // Another stream in the same (only) container.
    c.create_stream("hs", "t", 1).await.unwrap();
    write_rounds(&c, "hs/t", 2, |_| b'z').await;
    let stats = |args: &[&str]| sluice_tests::cli(&url, &[&["stats"], args].concat(), None);
    let (ok, out, err) = stats(&["--check"]);
    assert!(ok && out.contains("containers: 1, ") && out.contains("; no problems"), "{out}{err}");

    let files = files_with_records(&data, 6);
    let (file, recs) = &files[0];
    let damaged_at = recs[recs.len() / 2];
    flip_byte(file, damaged_at + 200);
    // Sealed, the segments are moved at once: the damaged one up to the damaged record, where
    // the mover stops, the other one whole.
    c.seal_stream("hs", "s").await.unwrap();
    c.seal_stream("hs", "t").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let out = loop {
        let (_, out, _) = stats(&[]);
        if out.contains("tier-2 mover failing") || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{out}");
    let mover = out.lines().find(|l| l.contains("tier-2 mover failing")).unwrap_or_else(|| panic!("{out}"));
    assert!(mover.starts_with("  container 0 (shard 0): tier-2 mover failing for "), "{out}");
    assert!(mover.contains(&format!("the record at byte {damaged_at} fails its checksum")), "{out}");
    // The mover's reads are among those refused.
    assert!(out.contains("reads refused on damaged data since the node started; the last: "), "{out}");
    assert!(out.contains("containers: 1, ") && out.contains("; 1 with problems:"), "{out}");
    // The other segment of the container is not held back by the damaged one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let info = c.segment_info("hs/t/0").await.unwrap();
        if info.tier2_end == info.length {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "hs/t/0 not moved: {} of {}", info.tier2_end, info.length);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A scrub names the damage, and stats keeps it.
    let (ok, scrub, _) = sluice_tests::cli(&url, &["log", "scrub"], None);
    assert!(!ok, "{scrub}");
    let (ok, out, err) = stats(&["--check"]);
    eprintln!("{out}{err}");
    assert!(!ok && err.contains("1 container has problems"), "{out}{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, js, err) = stats(&["--check", "--json"]);
    assert!(!ok, "{js}{err}");
    let v: serde_json::Value = serde_json::from_str(js.trim()).unwrap_or_else(|e| panic!("{e}: {js}"));
    assert_eq!(v["containers_with_problems"], 1, "{js}");
    let h = &v["shards"][0]["containers"][0];
    // The mover retries the damaged record every round (at most 2 s apart, and 3 s passed
    // before this look): counted once, and failing since the first round that met it.
    assert!(h["mover_failing_ms"].as_u64().is_some_and(|ms| ms >= 3000), "{js}");
    assert_eq!(h["damaged_reads"].as_u64(), Some(1), "{js}");
    assert_eq!(h["scrub_damage"].as_array().map(Vec::len), Some(2), "{js}");
    assert!(h["problems"].as_array().is_some_and(|p| p.len() >= 4), "{js}");
    let found = out.lines().find(|l| l.contains("the last log scrub (")).unwrap_or_else(|| panic!("{out}"));
    assert!(found.contains(&format!("the record at byte {damaged_at} is damaged")), "{out}");
    assert!(out.contains("1 of them scrubbed since the node started"), "{out}");
    assert!(sluice_tests::handshake(url.parse().unwrap()), "the server still serves");
}

/// The same in an older log file: while the server runs its index is still in memory and
/// the read checks the records it takes; after a restart the file is read whole and indexed
/// by a scan that skips the damaged record and indexes the sound ones after it, so the data
/// in it is refused with `DataCorrupt` (not taken for a missing range) and resumes at the
/// same offset as before. What precedes the damage is served both times, and what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_in_an_older_log_file_is_refused_not_read() {
    use sluice_net::ErrorCode;
    let dir = TempDir::new("olddamage");
    let data = dir.0.join("data");
    let mut server = sluice_tests::Server::start_with(
        &data,
        free_ports(1),
        1,
        &["--cache-mb", "0", "--containers-per-core", "1", "--log-file-mb", "1"],
    );
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("od").await.unwrap();
    c.create_stream("od", "s", 1).await.unwrap();
    write_rounds(&c, "od/s", 30, |round| b'a' + round % 26).await;
    let length = c.segment_info("od/s/0").await.unwrap().length;
    let mut files = files_with_records(&data, 1);
    files.sort();
    assert!(files.len() >= 3, "the log rolled: {files:?}");
    // A batch record of the first file with sound records before and after it (the first
    // record is the checkpoint, the next ones hold the stream's creation and first events).
    let (file, recs) = &files[0];
    assert!(recs.len() >= 5, "{recs:?}");
    let damaged_at = recs[3];
    flip_byte(file, damaged_at + 200);
    let name = file.file_name().unwrap().to_str().unwrap().to_string();

    /// Reads from offset 0 until a read fails: the offset reached and the error.
    async fn read_to_damage(c: &Client, length: u64) -> (u64, sluice_client::ClientError) {
        let mut at = 0;
        loop {
            match c.read_segment("od/s/0", at, 64 << 10, Duration::ZERO).await {
                Ok((_, d)) => {
                    assert!(!d.is_empty() && at < length, "read past the damage: at {at} of {length}");
                    at += d.len() as u64;
                }
                Err(e) => return (at, e),
            }
        }
    }
    let (at, e) = read_to_damage(&c, length).await;
    eprintln!("index in memory: refused at offset {at}: {e}");
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    assert!(at > 0 && at % 2004 == 0, "the events before it are read, whole: {at}");
    assert!(e.to_string().contains(&format!("log file {name}: the record at byte {damaged_at} fails")), "{e}");
    let sluice_client::ClientError::Server { offset: Some(resume_before), .. } = e else {
        panic!("no offset in {e:?}")
    };
    let (_, d) = c.read_segment("od/s/0", length - 2000, 64 << 10, Duration::ZERO).await.unwrap();
    assert!(d.len() >= 2000, "the last event reads");

    server.kill();
    server.restart();
    let c = Client::connect(&server.url()).await.unwrap();
    let (at_again, e) = read_to_damage(&c, length).await;
    eprintln!("after a restart: refused at offset {at_again}: {e}");
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    assert_eq!(at_again, at, "the same events are served");
    assert!(e.to_string().contains(&format!("log file {name}: no sound record holds offset {at}")), "{e}");
    // The scan went on past the damaged record: the data resumes where it did before, at an
    // event of the next record in the same file.
    let sluice_client::ClientError::Server { offset: Some(resume), .. } = e else { panic!("no offset in {e:?}") };
    assert_eq!(resume, resume_before, "resumes at the same offset ({at}..{length})");
    assert!(resume > at && resume < length && resume % 2004 == 0, "resumes at {resume} ({at}..{length})");
    let (_, d) = c.read_segment("od/s/0", resume, 64 << 10, Duration::ZERO).await.unwrap();
    assert!(d.len() >= 2004 && d[4..2004].iter().all(|&b| b == d[4]), "an event begins there");
    let (_, d) = c.read_segment("od/s/0", length - 2000, 64 << 10, Duration::ZERO).await.unwrap();
    assert!(d.len() >= 2000, "the last event reads");
}

/// A scrub whose client leaves stops reading (nobody would hear its report): `sluice log
/// scrub` paced to 1 MB/s over an 8 MiB log is killed after a second; the server says the
/// scrub stopped, and no container's scrub completes after that. A scrub that is waited
/// for still runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_stops_when_its_client_leaves() {
    let dir = TempDir::new("scrubleave");
    let data = dir.0.join("data");
    // The scrub's and the connection's info lines are what this test watches.
    let server = sluice_tests::Server::start_with_env(
        &data,
        free_ports(1),
        1,
        &["--log-file-mb", "1", "--containers-per-core", "1"],
        &[("RUST_LOG", "warn,sluice_engine::server=info,sluice_engine::container::scrub=info")],
    );
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("sl").await.unwrap();
    c.create_stream("sl", "s", 1).await.unwrap();
    write_rounds(&c, "sl/s", 80, |_| b'x').await;
    let log = data.with_extension("log");
    let said = |what: &str| std::fs::read_to_string(&log).unwrap_or_default().matches(what).count();
    let mut scrub = Command::new(sluice_bin())
        .args(["log", "scrub", "--rate-mb", "1"])
        .env("SLUICE_URL", &url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    scrub.kill().unwrap();
    scrub.wait().unwrap();
    wait_for_log(&log, "stopped: its client disconnected").await;
    // Paced to 1 MB/s the 8 MiB would take 8 s: had it gone on, it would finish by now.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(said("log scrubbed"), 0, "the scrub went on after its client left");
    let (ok, out, err) = sluice_tests::cli(&url, &["log", "scrub", "--rate-mb", "0"], None);
    assert!(ok && out.contains("no damage found"), "{out}{err}");
    assert_eq!(said("log scrubbed: sound"), 1, "the waited-for scrub completes");
}

/// `--scrub-every`: each shard scrubs its containers' logs on a schedule; a sound log is
/// reported sound, and a byte later flipped in an older file is found by the next round and
/// named in the server's log (file and record), while the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_scrub_finds_damage() {
    let dir = TempDir::new("scrubsched");
    let data = dir.0.join("data");
    let server = sluice_tests::Server::start_with_env(
        &data,
        free_ports(1),
        1,
        &["--log-file-mb", "1", "--containers-per-core", "1", "--scrub-every", "1s", "--scrub-rate-mb", "0"],
        &[("RUST_LOG", "warn,sluice_engine::shard=info")],
    );
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("sc").await.unwrap();
    c.create_stream("sc", "s", 1).await.unwrap();
    write_rounds(&c, "sc/s", 30, |round| b'a' + round % 26).await;
    let log = data.with_extension("log");
    wait_for_log(&log, "scheduled log scrub: sound").await;
    let mut files = files_with_records(&data, 4);
    files.sort();
    let (file, recs) = &files[0];
    flip_byte(file, recs[2] + 200);
    wait_for_log(&log, "scheduled log scrub found damage").await;
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("file {name}: the record at byte {} is damaged", recs[2])), "{text}");
    assert!(sluice_tests::handshake(url.parse().unwrap()), "the server still serves");
}

/// A small log, no read cache, one container.
const SMALL_LOG: [&str; 6] = ["--cache-mb", "0", "--containers-per-core", "1", "--log-file-mb", "1"];

/// Writes 30 rounds of events to `SCOPE/s` (one segment) on a server with `SMALL_LOG` and no
/// tier-2 (so the data is still in the log when the damage comes), stops it, and damages
/// record `victim` of the oldest log file (2: the segment's first events; 3: a later
/// record). The data directory, the damaged file and the segment's length.
async fn damaged_older_log(dir: &TempDir, scope: &str, victim: usize) -> (PathBuf, PathBuf, u64) {
    let data = dir.0.join("data");
    let server = sluice_tests::Server::start_with(&data, free_ports(1), 1, &SMALL_LOG);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope(scope).await.unwrap();
    c.create_stream(scope, "s", 1).await.unwrap();
    let stream = format!("{scope}/s");
    write_rounds(&c, &stream, 30, |round| b'a' + round % 26).await;
    let written = c.segment_info(&format!("{stream}/0")).await.unwrap().length;
    drop(c);
    drop(server);
    let mut files = files_with_records(&data, 1);
    files.sort();
    let (file, recs) = &files[0];
    assert!(files.len() >= 3 && recs.len() >= 5, "the log rolled: {files:?}");
    flip_byte(file, recs[victim] + 200);
    (data, file.clone(), written)
}

/// A damaged record of data not yet in tier-2 stops the mover for its segment there (it
/// never copies damaged bytes), so the log files from there on cannot be freed: the log
/// fills its budget and appends are refused with `tier2 unavailable`. The operator's remedy
/// is to give up the segment's data up to where its sound data resumes (the offset the
/// mover's error in the stats and a read's `DataCorrupt` name): `sluice stream truncate
/// S/T --segment N --offset O`, as the mover's error spells it, lets the mover go on from
/// the new start; the log files are freed, appends are taken again, and everything from
/// the new start reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_holds_the_mover_until_the_segment_is_truncated_past_it() {
    use sluice_net::ErrorCode;
    let dir = TempDir::new("damage-tier2");
    let (data, _, _) = damaged_older_log(&dir, "dt", 3).await;

    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let mut args = SMALL_LOG.to_vec();
    args.extend(["--tier2", &tier2, "--log-budget-mb", "6", "--move-min-kb", "64"]);
    let server = sluice_tests::Server::start_with(&data, free_ports(1), 1, &args);
    // Appends refused for a full log are retried for `retry_for`, then fail.
    let config = sluice_client::ClientConfig { retry_for: Duration::from_secs(2), ..Default::default() };
    let c = Client::connect_with(&server.url(), config).await.unwrap();
    let w = c.event_writer("dt/s").await.unwrap();
    // The mover cannot pass the damage: the log fills and appends are refused.
    let mut refused = None;
    for _ in 0..2_000 {
        if let Err(e) = w.write_event(b"k", vec![b'z'; 2000]).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the log filled up behind the damaged record");
    assert_eq!(refused.code(), Some(ErrorCode::Tier2Unavailable), "{refused}");
    let stats = c.shard_stats(false).await.unwrap();
    let health = stats.iter().flat_map(|s| s.containers.iter()).find(|h| h.mover_error.is_some());
    let mover_error = health.and_then(|h| h.mover_error.clone()).expect("the mover reports its failure");
    assert!(mover_error.contains("damaged data"), "{mover_error}");

    // Where the segment's sound data resumes, from the refused read.
    let (mut at, length) = (0, c.segment_info("dt/s/0").await.unwrap().length);
    let e = loop {
        match c.read_segment("dt/s/0", at, 64 << 10, Duration::ZERO).await {
            Ok((_, d)) => at += d.len() as u64,
            Err(e) => break e,
        }
        assert!(at < length, "no damage found");
    };
    assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{e}");
    let sluice_client::ClientError::Server { offset: Some(resume), .. } = e else { panic!("no offset in {e:?}") };
    // The mover's error names the way out, and the CLI takes it.
    let remedy = format!("sluice stream truncate dt/s --segment 0 --offset {resume}");
    assert!(mover_error.contains(&remedy), "{mover_error}");
    let (ok, out, err) = sluice_tests::cli(
        &server.url(),
        &["stream", "truncate", "dt/s", "--segment", "0", "--offset", &resume.to_string()],
        None,
    );
    assert!(ok && out.contains(&format!("truncated segment dt/s/0: it keeps bytes {resume}..")), "{out}{err}");

    // The mover goes on from the new start: the log is freed and appends are taken again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let w = c.event_writer("dt/s").await.unwrap();
    loop {
        match w.write_event(b"k", vec![b'y'; 2000]).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::Tier2Unavailable) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("appends were not taken again after the truncation: {e}"),
        }
    }
    // The mover's error clears at the end of its first whole round.
    loop {
        let stats = c.shard_stats(false).await.unwrap();
        if stats.iter().flat_map(|s| s.containers.iter()).all(|h| h.mover_error.is_none()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the mover still fails: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let length = c.segment_info("dt/s/0").await.unwrap().length;
    let (mut at, mut events) = (resume, 0);
    while at < length {
        let (_, d) = c.read_segment("dt/s/0", at, 64 << 10, Duration::ZERO).await.unwrap();
        assert!(!d.is_empty());
        at += d.len() as u64;
        events += d.len() / 2004;
    }
    assert_eq!(at, length, "everything from the new start reads back");
    eprintln!("resumed at {resume}; {events} events read back to {length}");
}

/// Reads all of `segment`, going on past damage: the bytes read (whole events where the
/// damage took whole records), and each (offset, resume offset) where a read failed on
/// damage. At most two damaged stretches are expected.
async fn read_past_damage(c: &Client, segment: &str) -> (Vec<u8>, Vec<(u64, u64)>) {
    use sluice_net::ErrorCode;
    let length = c.segment_info(segment).await.unwrap().length;
    let (mut at, mut bytes, mut holes) = (0, Vec::new(), Vec::new());
    while at < length {
        match c.read_segment(segment, at, 64 << 10, Duration::ZERO).await {
            Ok((_, d)) => {
                assert!(!d.is_empty(), "{segment}: nothing at {at} of {length}");
                bytes.extend_from_slice(&d);
                at += d.len() as u64;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::DataCorrupt), "{segment} at {at}: {e}");
                let sluice_client::ClientError::Server { offset: Some(resume), .. } = e else {
                    panic!("no offset in {e:?}")
                };
                assert!(resume > at && holes.len() < 2, "{segment}: resume {resume} at {at}");
                holes.push((at, resume));
                at = resume;
            }
        }
    }
    (bytes, holes)
}

/// A record damaged in the middle of the current log file (sound records after it): the
/// node refuses to start and names the way out; with `--salvage-damaged-log` it starts and
/// serves every sound record. The segment whose event was in the damaged record reads up to
/// it, then fails with `DataCorrupt` saying where its data resumes, and reads on from there;
/// the other segment reads whole; `sluice stats --check` names what was lost. Appends go on,
/// and after another kill and a salvaging restart everything reads the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_current_log_file_is_salvaged_on_request() {
    use sluice_net::event::EventIter;
    let dir = TempDir::new("salvage");
    let data = dir.0.join("data");
    let port = free_ports(1);
    let base = ["--cache-mb", "0", "--containers-per-core", "1"];
    let mut server = sluice_tests::Server::start_with(&data, port, 1, &base);
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("sv").await.unwrap();
    for s in ["s", "t"] {
        c.create_stream("sv", s, 1).await.unwrap();
    }
    let (ws, wt) = (c.event_writer("sv/s").await.unwrap(), c.event_writer("sv/t").await.unwrap());
    for i in 0..20 {
        // One record per event.
        ws.write_event(b"k", format!("s-{i}").into_bytes()).await.unwrap();
        wt.write_event(b"k", format!("t-{i}").into_bytes()).await.unwrap();
    }
    server.kill();
    let (file, recs) = files_with_records(&data, 40).pop().expect("the current log file");
    let victim = recs[recs.len() / 2];
    flip_byte(&file, victim + 60);

    let stderr = refused_start(&data, &url, &base);
    assert!(stderr.contains(&format!("byte {victim}")) && stderr.contains("--salvage-damaged-log"), "{stderr}");

    // The offline listing shows the damage and the sound records after it.
    let (ok, dump, err) = sluice_tests::cli(&url, &["log", "dump", data.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let damaged = dump.lines().position(|l| l.contains(&format!("DAMAGED at {victim}: "))).expect(&dump);
    assert!(dump.lines().skip(damaged).filter(|l| l.contains(" batch ")).count() >= 10, "{dump}");
    // With the entries: what the damaged record (its header intact) says it held, unverified.
    let (ok, dump, err) = sluice_tests::cli(&url, &["log", "dump", "--entries", data.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let after: Vec<&str> = dump.lines().skip_while(|l| !l.contains(&format!("DAMAGED at {victim}: "))).collect();
    assert!(after[1].ends_with("header intact; its entries, unverified:"), "{dump}");
    assert!(after[2].trim_start().starts_with("append segment "), "{dump}");

    let salvage = [&base[..], &["--salvage-damaged-log"]].concat();
    let mut server = sluice_tests::Server::start_with(&data, port, 1, &salvage);
    assert!(server.output().contains("recovery salvaged past damage"), "{}", server.output());

    let check = |c: Client, more: usize| async move {
        let events = |d: Vec<u8>| -> Vec<String> {
            EventIter::new(&d).map(|e| String::from_utf8(e.unwrap().to_vec()).unwrap()).collect()
        };
        let ((s, s_holes), (t, t_holes)) = (read_past_damage(&c, "sv/s/0").await, read_past_damage(&c, "sv/t/0").await);
        let (s, t) = (events(s), events(t));
        // The damaged record held one event of one segment: that segment has a hole there.
        let (damaged, whole, holes, prefix) =
            if s_holes.is_empty() { (t, s, t_holes, "t") } else { (s, t, s_holes, "s") };
        assert_eq!(holes.len(), 1, "{holes:?}");
        let expected = |p: &str, n: usize| (0..n).map(|i| format!("{p}-{i}")).collect::<Vec<_>>();
        assert_eq!(whole, expected(if prefix == "s" { "t" } else { "s" }, 20), "the other segment reads whole");
        let mut all = expected(prefix, 20 + more);
        let lost = all.iter().position(|e| !damaged.contains(e)).expect("one event lost");
        all.remove(lost);
        assert_eq!(damaged, all, "every other event, in order ({} lost)", expected(prefix, 20)[lost]);
        prefix.to_string()
    };
    let damaged = check(Client::connect(&url).await.unwrap(), 0).await;
    let (ok, out, err) = sluice_tests::cli(&url, &["stats", "--check"], None);
    eprintln!("{out}");
    assert!(!ok, "{out}{err}");
    let line = |needle: &str| out.lines().any(|l| l.contains("started past damaged log records") && l.contains(needle));
    assert!(line(&format!("damaged records at bytes {victim}..")) && line("1 record lost"), "{out}");
    assert!(line(&format!("by their intact headers they held (unverified): sv/{damaged}/0 bytes ")), "{out}");
    assert!(line(&format!("sv/{damaged}/0: bytes ")), "{out}");

    // Appends go on after the last sound record; a kill and a salvaging restart keep all.
    let w = c.event_writer(&format!("sv/{damaged}")).await.unwrap();
    for i in 20..25 {
        w.write_event(b"k", format!("{damaged}-{i}").into_bytes()).await.unwrap();
    }
    server.kill();
    server.restart();
    assert_eq!(check(Client::connect(&url).await.unwrap(), 5).await, damaged);
}

/// A one-shard node on a fresh data directory (`extra` flags), with stream `stream` (one
/// segment; its scope made too) and a writer to it.
async fn node_with_stream(
    tag: &str,
    stream: &str,
    extra: &[&str],
) -> (TempDir, PathBuf, u16, sluice_tests::Server, sluice_client::EventWriter) {
    let dir = TempDir::new(tag);
    let data = dir.0.join("data");
    let port = free_ports(1);
    let server = sluice_tests::Server::start_with(&data, port, 1, extra);
    let c = Client::connect(&server.url()).await.unwrap();
    let (scope, name) = stream.split_once('/').expect("scope/stream");
    c.create_scope(scope).await.unwrap();
    c.create_stream(scope, name, 1).await.unwrap();
    let w = c.event_writer(stream).await.unwrap();
    (dir, data, port, server, w)
}

/// The current log file's header block damaged (its records sound): the node refuses to
/// start and says why; with `--salvage-damaged-log` it writes the header again from the
/// file's name and its opening checkpoint, says so, and serves every event; appends go on,
/// and the next start needs no salvage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_file_header_is_written_again_when_salvaging() {
    let base = ["--containers-per-core", "1"];
    let (_dir, data, port, mut server, w) = node_with_stream("salvage-header", "sh/s", &base).await;
    let url = server.url();
    for i in 0..20 {
        w.write_event(b"k", format!("e-{i}").into_bytes()).await.unwrap();
    }
    server.kill();
    let (file, _) = files_with_records(&data, 20).pop().expect("the current log file");
    // The file's sequence number, inside the checksummed part of the header.
    flip_byte(&file, 17);

    let stderr = refused_start(&data, &url, &base);
    assert!(stderr.contains("damaged file header") && stderr.contains("--salvage-damaged-log"), "{stderr}");

    let salvage = [&base[..], &["--salvage-damaged-log"]].concat();
    let mut server = sluice_tests::Server::start_with(&data, port, 1, &salvage);
    assert!(server.output().contains("was written again from the file's name"), "{}", server.output());
    let read_all = |c: Client| async move {
        let mut r = c.event_reader("sh/s", ReadFrom::Head).await.unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.read_next(Duration::from_secs(2)).await.unwrap() {
            got.push(String::from_utf8(e.payload.to_vec()).unwrap());
        }
        got
    };
    let expected = |n: usize| (0..n).map(|i| format!("e-{i}")).collect::<Vec<_>>();
    assert_eq!(read_all(Client::connect(&url).await.unwrap()).await, expected(20));
    let c = Client::connect(&url).await.unwrap();
    let w = c.event_writer("sh/s").await.unwrap();
    for i in 20..25 {
        w.write_event(b"k", format!("e-{i}").into_bytes()).await.unwrap();
    }
    server.kill();
    drop(server);

    // Without salvage now: the header was written again.
    let server = sluice_tests::Server::start_with(&data, port, 1, &base);
    assert!(!server.output().contains("salvaged"), "{}", server.output());
    assert_eq!(read_all(Client::connect(&url).await.unwrap()).await, expected(25));
}

/// An older log file's header block damaged: recovery does not need it (the newest file's
/// checkpoint covers it) and reads of the records in that file do not either, so the node
/// starts without salvage and serves every event; the scrub reports the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_header_of_an_older_log_file_stops_nothing() {
    let base = ["--containers-per-core", "1", "--cache-mb", "0"];
    let (_dir, data, _, mut server, w) = node_with_stream("older-header", "oh/s", &base).await;
    let url = server.url();
    // 12 MiB over 8 MiB log files: two files at least.
    let event = |i: u8| vec![i; 1 << 20];
    for i in 0..12u8 {
        w.write_event(b"k", event(i)).await.unwrap();
    }
    server.kill();
    let mut files: Vec<PathBuf> = files_with_records(&data, 1).into_iter().map(|(f, _)| f).collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    flip_byte(&files[0], 17);
    server.restart();
    let c = Client::connect(&url).await.unwrap();
    let mut r = c.event_reader("oh/s", ReadFrom::Head).await.unwrap();
    for i in 0..12u8 {
        let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("every event");
        assert_eq!(e.payload.as_ref(), &event(i)[..], "event {i}");
    }
    let (ok, out, err) = sluice_tests::cli(&url, &["log", "scrub"], None);
    assert!(!ok && out.contains("bad file header"), "{out}{err}");
}

/// With tier-2 and `--salvage-damaged-log`, the mover does not stop at a damaged record: it
/// closes the chunk before the damage, starts the next where the sound data resumes and goes
/// on, so the log is freed and appends keep being taken (without salvage the log fills:
/// the test above). The gap between the chunks reads as damage, with the offset to resume
/// at, once the damaged log file is gone too, and after a restart; `sluice stats` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvaging_lets_the_mover_skip_a_damaged_record() {
    mover_skips_damage(3).await;
}

/// The same with the segment's first events damaged: the mover meets the damage in the
/// chunk it has just created, before any byte is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvaging_lets_the_mover_skip_a_damaged_first_record() {
    mover_skips_damage(2).await;
}

/// Damages record `victim` of the oldest log file (see `damaged_older_log`), then runs the
/// scenario above.
async fn mover_skips_damage(victim: usize) {
    let dir = TempDir::new(&format!("damage-skip{victim}"));
    let (data, file, written) = damaged_older_log(&dir, "ds", victim).await;

    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let mut args = SMALL_LOG.to_vec();
    args.extend(["--tier2", &tier2, "--log-budget-mb", "6", "--move-min-kb", "64", "--salvage-damaged-log"]);
    let mut server = sluice_tests::Server::start_with(&data, free_ports(1), 1, &args);
    let c = Client::connect(&server.url()).await.unwrap();
    // Twice the log budget: taken only if the mover moves past the damage and frees the log.
    let w = c.event_writer("ds/s").await.unwrap();
    for _ in 0..6 {
        let acks: Vec<_> = (0..1000).map(|_| w.write_event(b"k", vec![b'z'; 2000])).collect();
        for a in acks {
            a.await.unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while file.exists() {
        assert!(std::time::Instant::now() < deadline, "the damaged log file was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, err) = sluice_tests::cli(&server.url(), &["stats", "--check"], None);
    eprintln!("{out}");
    assert!(!ok && out.contains("ds/s/0: bytes ") && out.contains("skipped by the tier-2 mover"), "{out}{err}");

    let (bytes, holes) = read_past_damage(&c, "ds/s/0").await;
    let read = bytes.len() as u64;
    eprintln!("read {read} bytes around {holes:?}");
    assert_eq!(holes.len(), 1, "{holes:?}");
    let (from, to) = holes[0];
    assert!(
        (from > 0) == (victim > 2) && to < written && (to - from) % 2004 == 0,
        "one damaged record of whole events: {holes:?}"
    );
    let length = c.segment_info("ds/s/0").await.unwrap().length;
    assert_eq!(read, length - (to - from), "every byte but the damaged ones");
    server.kill();
    server.restart();
    let c = Client::connect(&server.url()).await.unwrap();
    assert_eq!(read_past_damage(&c, "ds/s/0").await, (bytes, holes), "the same after a restart");
}

/// The log records holding `Create` and `Seal` entries, from `sluice log dump --entries`:
/// per `Create NAME` and `Seal NAME`, the record's file and position.
fn seal_and_create_records(url: &str, data: &Path) -> std::collections::HashMap<String, (PathBuf, usize)> {
    let (ok, dump, err) = sluice_tests::cli(url, &["log", "dump", "--entries", data.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let (mut dir, mut file, mut pos) = (PathBuf::new(), PathBuf::new(), 0);
    let mut names = std::collections::HashMap::new();
    let mut seals = std::collections::HashMap::new();
    for line in dump.lines() {
        let t = line.trim();
        if let Some(d) = line.strip_prefix("container log ") {
            dir = PathBuf::from(d);
        } else if let Some(f) = line.strip_prefix("  file ") {
            file = dir.join(f.split_whitespace().next().unwrap());
        } else if let Some(p) = t.strip_prefix('@') {
            pos = p.split_whitespace().next().unwrap().parse().unwrap();
        } else if let Some(rest) = t.strip_prefix("Create { segment: ") {
            let (id, name) = rest.split_once(", name: \"").unwrap();
            let name = name.trim_end_matches("\" }").to_string();
            seals.insert(format!("Create {name}"), (file.clone(), pos));
            names.insert(id.to_string(), name);
        } else if let Some(id) = t.strip_prefix("Seal { segment: ") {
            let name = names[id.trim_end_matches(" }")].clone();
            seals.insert(format!("Seal {name}"), (file.clone(), pos));
        }
    }
    seals
}

/// A salvage that loses the record sealing a segment would leave the segment open to
/// appends. The node asks the controller about every open segment with no entry after the
/// loss and seals again those it has sealed (a sealed stream's, one a scaling replaced); it
/// says so in `sluice stats`, and leaves the others open. A segment whose creation was lost
/// would be missing for good (its stream unreadable and unwritable): it is created again,
/// empty, and its stream reads and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_lost_to_a_salvage_are_made_again_from_the_controller() {
    let dir = TempDir::new("reseal");
    let data = dir.0.join("data");
    let port = free_ports(1);
    let base = ["--containers-per-core", "1"];
    let mut server = sluice_tests::Server::start_with(&data, port, 1, &base);
    let url = server.url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("rs").await.unwrap();
    let streams = ["gone", "sealed", "split", "open"];
    for s in streams {
        c.create_stream("rs", s, 1).await.unwrap();
        let w = c.event_writer(&format!("rs/{s}")).await.unwrap();
        for i in 0..5 {
            w.write_event(b"k", format!("{s}-{i}").into_bytes()).await.unwrap();
        }
    }
    c.seal_stream("rs", "sealed").await.unwrap();
    c.split_segment("rs", "split", 0, 2).await.unwrap();
    // Sound records after the seals, so that a salvage is what gets past them.
    let w = c.event_writer("rs/open").await.unwrap();
    for i in 5..10 {
        w.write_event(b"k", format!("open-{i}").into_bytes()).await.unwrap();
    }
    drop((w, c));
    server.kill();

    let records = seal_and_create_records(&url, &data);
    for r in ["Seal rs/sealed/0", "Seal rs/split/0", "Create rs/gone/0"] {
        let (file, pos) = &records.get(r).unwrap_or_else(|| panic!("no record for {r}: {records:?}"));
        flip_byte(file, pos + 40);
    }
    let salvage = [&base[..], &["--salvage-damaged-log"]].concat();
    drop(server); // (its drop removes the log file the next one writes)
    let server = sluice_tests::Server::start_with(&data, port, 1, &salvage);
    let c = Client::connect(&url).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let sealed = |s: &'static str| {
        let c = &c;
        async move { c.segment_info(s).await.unwrap().sealed }
    };
    while !(sealed("rs/sealed/0").await && sealed("rs/split/0").await) {
        assert!(std::time::Instant::now() < deadline, "never sealed again: {}", server.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in ["rs/split/1", "rs/split/2", "rs/open/0", "rs/gone/0"] {
        assert!(!sealed(s).await, "{s} is current: it stays open");
    }
    // The segment whose creation was lost is back, empty (its events are lost), and its
    // stream takes writes and reads them back.
    assert_eq!(c.segment_info("rs/gone/0").await.unwrap().length, 0);
    let w = c.event_writer("rs/gone").await.unwrap();
    w.write_event(b"k", b"gone-again".to_vec()).await.unwrap();
    let mut r = c.event_reader("rs/gone", ReadFrom::Head).await.unwrap();
    let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("the new event");
    assert_eq!(&e.payload[..], b"gone-again");
    // Appends to a segment sealed again are refused; the others' data is all there.
    let late = c.append_raw("rs/sealed/0", bytes::Bytes::from_static(b"late"), None).await;
    assert_eq!(late.unwrap_err().code(), Some(sluice_net::ErrorCode::Sealed));
    for s in ["sealed", "split", "open"] {
        assert!(c.segment_info(&format!("rs/{s}/0")).await.unwrap().length > 0, "{s}");
    }
    let (ok, out, err) = sluice_tests::cli(&url, &["stats", "--check"], None);
    assert!(!ok, "{out}{err}");
    assert!(
        out.lines().any(|l| l.contains("sealed again") && l.contains("rs/sealed/0") && l.contains("rs/split/0")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.contains("created again, empty") && l.contains("rs/gone/0")), "{out}");
    assert!(server.output().contains("after salvage: sealed again"), "{}", server.output());
}

/// The LSN of the look-alike records in `crafted_event`: above any real one.
const LOOK_ALIKE_LSN: u64 = 1 << 62;

/// An event of about 60 KiB tiled with look-alike log records: each sound in itself (both
/// checksums), LSN and epoch `LOOK_ALIKE_LSN`, tag 0 (a user's guess; they cannot know the
/// file's), one at each of the eight 8-byte alignments in every 456 bytes, so that wherever
/// the event lands in a log file some start at 8-byte boundaries of the file.
fn crafted_event() -> Vec<u8> {
    use sluice_engine::log::format::{RecordKind, RecordLayout, RecordMeta, encode_record};
    let mut fake = vec![0u8; RecordLayout::Packed.disk_len(16) as usize];
    let (lsn, epoch) = (LOOK_ALIKE_LSN, LOOK_ALIKE_LSN);
    let meta = RecordMeta { layout: RecordLayout::Packed, kind: RecordKind::Batch, epoch, lsn, tag: 0 };
    encode_record(&mut fake, meta, 16, |p| p.fill(0x42));
    assert_eq!(fake.len(), 56);
    let mut tile = vec![0u8; 8 * 57];
    for j in 0..8 {
        tile[57 * j..57 * j + 56].copy_from_slice(&fake);
    }
    tile.repeat(134)
}

/// Whether one of the two newest log files of a container under `data` (the current one, and
/// the next one prepared ahead) holds look-alikes of `crafted_event` at 8-byte boundaries
/// after the end of its own records: a reused file's earlier use, where recovery searches
/// for records of this use.
fn look_alikes_after_the_end(data: &Path) -> bool {
    use sluice_engine::log::format::RecordHeader;
    let containers = std::fs::read_dir(data.join("containers")).unwrap().flatten().filter(|e| e.path().is_dir());
    containers.into_iter().any(|c| {
        let mut logs: Vec<(u64, PathBuf)> = std::fs::read_dir(c.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| Some((sluice_engine::log::parse_file_name(p.file_name()?.to_str()?)?, p)))
            .collect();
        logs.sort();
        logs.iter().rev().take(2).any(|(_, file)| {
            let bytes = bytes::Bytes::from(std::fs::read(file).unwrap());
            let end = sluice_engine::log::scan::scan_file(&bytes).end as usize;
            (end..bytes.len().min(end + (64 << 10)).saturating_sub(40))
                .step_by(8)
                .any(|p| RecordHeader::decode(&bytes[p..]).is_ok_and(|h| h.lsn == LOOK_ALIKE_LSN))
        })
    })
}

/// A user cannot stop restarts with events crafted to look like log records. Retention frees
/// 1 MiB log files that become later ones, so after each SIGKILL the newest file's own
/// records end inside events of its earlier use: bytes recovery searches for records of this
/// use (the rest of a record its new records partly overwrote counts as torn). The events
/// hold sound look-alike records with a later LSN there; before records carried their file's
/// tag, recovery took one for acknowledged data after damage and refused to start. Now every
/// restart starts and reads every kept event whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_crafted_to_look_like_log_records_do_not_stop_a_restart() {
    use sluice_net::Retention;
    let dir = TempDir::new("look-alike");
    let data = dir.0.join("data");
    let extra = ["--retention-interval-ms", "100", "--log-file-mb", "1"];
    let mut server = sluice_tests::Server::start_with(&data, free_ports(1), 1, &extra);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("la").await.unwrap();
    c.create_stream_with("la", "s", 1, Retention::parse("size:256K,512K").unwrap()).await.unwrap();
    let event = crafted_event();
    let mut tried = 0;
    for round in 0..8 {
        let c = Client::connect(&server.url()).await.unwrap();
        let w = c.event_writer("la/s").await.unwrap();
        for _ in 0..30 + round {
            w.write_event(b"k", event.clone()).await.unwrap();
        }
        server.kill();
        if look_alikes_after_the_end(&data) {
            tried += 1;
        }
        // Panics if recovery refuses to start.
        server.restart();
        let c = Client::connect(&server.url()).await.unwrap();
        let mut r = c.event_reader("la/s", ReadFrom::Head).await.unwrap();
        let mut n = 0;
        loop {
            match r.read_next(Duration::from_millis(500)).await {
                Ok(Some(e)) => assert!(e.payload == event, "a kept event read back whole"),
                Ok(None) => break,
                // Retention cut the head meanwhile: the reader goes on from the new start.
                Err(e) if e.code() == Some(sluice_net::ErrorCode::Truncated) => continue,
                Err(e) => panic!("round {round}: {e}"),
            }
            n += 1;
        }
        assert!(n > 0, "round {round}: the stream keeps events");
        if tried >= 3 {
            break;
        }
    }
    assert!(tried > 0, "no restart met look-alikes after the end of a reused log file");
    eprintln!("restarts that met look-alikes after the end of a reused log file: {tried}");
}

/// The standalone metadata log damaged before later durable changes (a scope created long
/// ago, bit rot): the server refuses to start and says why and what to do, instead of
/// cutting the log there and losing every scope and stream made after it; with
/// `--salvage-damaged-log` it starts with the changes before the damage and keeps the whole
/// file as `meta.log.damaged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_metadata_log_refuses_start_instead_of_losing_later_changes() {
    let dir = TempDir::new("meta-damage");
    let data = dir.0.join("data");
    let port = free_ports(1);
    let mut server = sluice_tests::Server::start(&data, port, 1);
    let c = Client::connect(&server.url()).await.unwrap();
    for i in 0..5 {
        c.create_scope(&format!("s{i}")).await.unwrap();
    }
    server.kill();
    let meta = data.join("meta").join("meta.log");
    let at = std::fs::read(&meta).unwrap().windows(9).position(|w| w == b"scopes/s0").expect("scope s0's record");
    flip_byte(&meta, at + 8);
    let err = refused_start(&data, &server.url(), &[]);
    assert!(
        err.contains("metadata log") && err.contains("damaged at byte") && err.contains("--salvage-damaged-log"),
        "{err}"
    );
    let server = sluice_tests::Server::start_with(&data, port, 1, &["--salvage-damaged-log"]);
    assert!(data.join("meta").join("meta.log.damaged").exists());
    let c = Client::connect(&server.url()).await.unwrap();
    let scopes = c.list_scopes().await.unwrap();
    assert!(!scopes.iter().any(|s| s.starts_with('s')), "the changes from the damage on are gone: {scopes:?}");
    c.create_scope("after").await.unwrap();
}
