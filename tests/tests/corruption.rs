//! Damage to acknowledged data in a container log: the real server must refuse to start and
//! name the file and offset; a torn tail (garbage after the last record) must be cut.

use sluice_client::{Client, ReadFrom};
use sluice_tests::{TempDir, free_ports, sluice_bin};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Log files that hold at least `n` records, with their record positions.
fn files_with_records(data: &Path, n: usize) -> Vec<(PathBuf, Vec<usize>)> {
    let mut out = Vec::new();
    for c in std::fs::read_dir(data.join("containers")).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for f in std::fs::read_dir(c.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            let recs: Vec<usize> = (4096..bytes.len()).step_by(4096).filter(|&p| &bytes[p..p + 4] == b"SLRC").collect();
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

    // A torn tail: garbage in the block after the last record. The server starts and cuts it.
    let (file, recs) = files_with_records(&data, 5).pop().expect("a log file with records");
    let mut bytes = std::fs::read(&file).unwrap();
    let end = recs.last().unwrap() + 4096;
    bytes[end..end + 300].fill(0x77);
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
    assert!(bytes[end..end + 300].iter().all(|&b| b == 0), "torn bytes were cleared");

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
/// record positions (found by magic at block boundaries).
fn container_files(container: &Path) -> Vec<(PathBuf, Vec<usize>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(container).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            let recs = (4096..bytes.len()).step_by(4096).filter(|&p| &bytes[p..p + 4] == b"SLRC").collect();
            (f, recs)
        })
        .filter(|(_, recs): &(PathBuf, Vec<usize>)| !recs.is_empty())
        .collect()
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
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
