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
