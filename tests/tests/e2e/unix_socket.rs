//! Clients on the server's host over Unix sockets (`--unix-socket`, `unix:PATH`): every
//! shard listens on its own socket and tells such clients the other shards' sockets; the
//! data path works as over TCP; a socket left by a SIGKILLed server is replaced at restart,
//! one a live server holds (or a file that is not a socket) is refused, and a clean stop
//! removes them.

use bytes::Bytes;
use sluice_client::{Client, ClientError, ReadFrom};
use sluice_net::ErrorCode;
use sluice_net::messages::{Read, ReadReply};
use sluice_tests::{Server, TempDir, cli, free_ports};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn socket_arg(path: &Path) -> String {
    format!("--unix-socket={}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_the_unix_socket_writes_and_reads_through_every_shard() {
    let dir = TempDir::new("unix");
    let sock = dir.0.join("s.sock");
    let mut server =
        Server::start_with(&dir.0.join("data"), free_ports(2), 2, &[&socket_arg(&sock), "--unix-socket-mode=660"]);
    for s in [sock.clone(), dir.0.join("s.sock.1")] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&s).expect("one socket per shard").permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{}: --unix-socket-mode", s.display());
    }
    let url = format!("unix:{}", sock.display());
    let c = Client::connect(&url).await.unwrap();
    assert_eq!(c.shard_count(), 2);
    c.create_scope("u").await.unwrap();
    c.create_stream("u", "t", 4).await.unwrap();

    // Segments on both shards are reached through their sockets, not TCP.
    let info = c.get_stream("u", "t").await.unwrap();
    let segments: Vec<String> = info.segments.iter().map(|s| format!("u/t/{}", s.number)).collect();
    let endpoints: Vec<String> = segments.iter().map(|s| c.endpoint_of(s)).collect();
    assert!(endpoints.iter().all(|e| e.starts_with("unix:")), "{endpoints:?}");
    assert!(endpoints.contains(&format!("unix:{}.1", sock.display())), "shard 1's socket is used: {endpoints:?}");

    let w = c.event_writer("u/t").await.unwrap();
    let mut acks = Vec::new();
    for i in 0..2000u32 {
        acks.push(w.write_event(format!("k{}", i % 16).as_bytes(), format!("{}:{i}", i % 16)));
    }
    for a in acks {
        a.await.unwrap();
    }
    let mut r = c.event_reader("u/t", ReadFrom::Head).await.unwrap();
    let mut last: HashMap<String, u32> = HashMap::new();
    let mut n = 0;
    while n < 2000 {
        let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("every event comes back");
        let text = String::from_utf8(e.payload.to_vec()).unwrap();
        let (key, i) = text.split_once(':').unwrap();
        let i: u32 = i.parse().unwrap();
        if let Some(prev) = last.insert(key.to_string(), i) {
            assert!(i > prev, "per-key order: {i} after {prev}");
        }
        n += 1;
    }

    // A request sent to the wrong shard is redirected to the right shard's socket.
    let on_shard_1 = segments.iter().find(|s| c.endpoint_of(s).ends_with(".1")).unwrap();
    let shard_0 = c.connection(&url).await.unwrap();
    let read = Read { segment: on_shard_1.clone(), offset: 0, max_bytes: 1024, wait_ms: 0 };
    match shard_0.call::<Read, ReadReply>(&read, Bytes::new()).await {
        Err(ClientError::Server { code: ErrorCode::WrongHost, endpoint, .. }) => {
            assert_eq!(endpoint, Some(format!("unix:{}.1", sock.display())));
        }
        other => panic!("expected WrongHost to shard 1's socket, got {other:?}"),
    }

    // The CLI takes `--url unix:PATH` like any address.
    let (ok, out, err) = cli(&url, &["stream", "list", "u"], None);
    assert!(ok && out.contains('t'), "{out} {err}");

    // A clean stop removes the sockets.
    drop(c);
    assert!(server.terminate(Duration::from_secs(10)), "clean exit");
    assert!(!sock.exists() && !dir.0.join("s.sock.1").exists(), "sockets removed at stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_left_by_a_killed_server_are_replaced_and_live_ones_kept() {
    let dir = TempDir::new("unix-stale");
    let sock = dir.0.join("s.sock");
    let mut server = Server::start_with(&dir.0.join("data"), free_ports(2), 2, &[&socket_arg(&sock)]);
    let url = format!("unix:{}", sock.display());
    {
        let c = Client::connect(&url).await.unwrap();
        c.create_scope("u").await.unwrap();
        c.create_stream("u", "t", 2).await.unwrap();
        c.event_writer("u/t").await.unwrap().write_event(b"k", "before").await.unwrap();
    }

    // Another server (its own data directory) may not take a socket a live server holds.
    let other = start_expecting_failure(&dir.0.join("other"), &[&socket_arg(&sock)]);
    assert!(other.contains("is in use"), "{other}");
    let c = Client::connect(&url).await.unwrap();
    assert_eq!(c.list_scopes().await.unwrap(), vec!["u".to_string()], "the live server still answers there");
    drop(c);

    // SIGKILL leaves the socket files behind; the restart replaces them.
    server.kill();
    assert!(sock.exists(), "a killed server cannot remove its socket");
    server.restart();
    let c = Client::connect(&url).await.unwrap();
    let mut r = c.event_reader("u/t", ReadFrom::Head).await.unwrap();
    let e = r.read_next(Duration::from_secs(5)).await.unwrap().expect("the acknowledged event");
    assert_eq!(&e.payload[..], b"before");
    drop(server);

    // Anything that is not a socket is never removed.
    let plain = dir.0.join("plain");
    std::fs::write(&plain, "keep me").unwrap();
    let out = start_expecting_failure(&dir.0.join("third"), &[&socket_arg(&plain)]);
    assert!(out.contains("is not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");

    // A mode that is not octal permission bits is refused before anything starts.
    let out = start_expecting_failure(&dir.0.join("fifth"), &[&socket_arg(&sock), "--unix-socket-mode=999"]);
    assert!(out.contains("not a permission mode"), "{out}");

    // A path longer than a Unix socket takes is named as such.
    let long = dir.0.join("x".repeat(120));
    let out = start_expecting_failure(&dir.0.join("fourth"), &[&socket_arg(&long)]);
    assert!(out.contains("at most 107"), "{out}");
}

/// Runs `sluice standalone` that must fail at start-up; returns what it printed.
fn start_expecting_failure(data_dir: &Path, extra: &[&str]) -> String {
    let port = free_ports(2).to_string();
    let mut child = Command::new(sluice_tests::sluice_bin())
        .args(["standalone", "--cores", "2", "--no-pin", "--log-file-mb", "8", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the server should have refused to start");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
