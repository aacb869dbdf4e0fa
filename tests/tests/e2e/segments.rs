//! Segment operations through the real server: conditional appends, seal, truncate, tail
//! long-poll, and reads served from the log files (no cache) across several log files and a
//! restart (cold file indexes).

use bytes::Bytes;
use sluice_client::{Client, ClientError, ReadFrom};
use sluice_net::ErrorCode;
use sluice_tests::{Harness, Server, TempDir, free_ports};
use std::time::{Duration, Instant};

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    r.expect_err("expected an error").code().expect("a server error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_operations() {
    let h = Harness::with_stream("seg", "raw", 1).await;
    let c = h.client.clone();
    let seg = "seg/raw/0";

    // Conditional appends: only at the expected length.
    let a = c.append_raw(seg, Bytes::from_static(b"hello"), Some(0)).await.unwrap();
    assert_eq!((a.offset, a.length), (0, 5));
    assert_eq!(code(c.append_raw(seg, Bytes::from_static(b"x"), Some(0)).await), ErrorCode::ConditionalCheckFailed);
    c.append_raw(seg, Bytes::from_static(b" world"), Some(5)).await.unwrap();

    // A reader waiting at the tail wakes when data arrives.
    let (c2, seg2) = (c.clone(), seg.to_string());
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let (reply, data) = c2.read_segment(&seg2, 11, 1024, Duration::from_secs(10)).await.unwrap();
        (reply.offset, data, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.append_raw(seg, Bytes::from_static(b"!"), None).await.unwrap();
    let (off, data, waited) = waiter.await.unwrap();
    assert_eq!((off, &data[..]), (11, &b"!"[..]));
    assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(5), "waited {waited:?}");

    // A tail read with nothing to come returns empty after its wait.
    let (reply, data) = c.read_segment(seg, 12, 1024, Duration::from_millis(100)).await.unwrap();
    assert!(data.is_empty() && !reply.end_of_segment && reply.length == 12);

    // Truncate, then reads below the start are refused with the start offset.
    c.truncate_segment(seg, 6).await.unwrap();
    match c.read_segment(seg, 0, 100, Duration::ZERO).await {
        Err(ClientError::Server { code: ErrorCode::Truncated, offset: Some(6), .. }) => {}
        other => panic!("expected truncated(6), got {other:?}"),
    }
    let (_, data) = c.read_segment(seg, 6, 100, Duration::ZERO).await.unwrap();
    assert_eq!(&data[..], b"world!");
    let info = c.segment_info(seg).await.unwrap();
    assert_eq!((info.start_offset, info.length, info.sealed), (6, 12, false));

    // Seal: appends refused, readers see the end.
    c.seal_stream("seg", "raw").await.unwrap();
    assert_eq!(code(c.append_raw(seg, Bytes::from_static(b"late"), None).await), ErrorCode::Sealed);
    let (reply, _) = c.read_segment(seg, 12, 100, Duration::from_secs(5)).await.unwrap();
    assert!(reply.end_of_segment);
    assert!(c.event_writer("seg/raw").await.err().unwrap().to_string().contains("sealed"));

    // Stream lifecycle errors are typed.
    assert_eq!(code(c.create_stream("seg", "raw", 1).await), ErrorCode::AlreadyExists);
    assert_eq!(code(c.create_stream("seg", "bad name", 1).await), ErrorCode::InvalidName);
    assert_eq!(code(c.create_stream("nope", "x", 1).await), ErrorCode::NoSuchScope);
    assert_eq!(code(c.delete_scope("seg").await), ErrorCode::NotEmpty);
    c.create_stream("seg", "live", 1).await.unwrap();
    assert_eq!(code(c.delete_stream("seg", "live").await), ErrorCode::StreamNotSealed);
    c.delete_stream("seg", "raw").await.unwrap();
    assert_eq!(code(c.get_stream("seg", "raw").await), ErrorCode::NoSuchStream);
    assert_eq!(code(c.segment_info(seg).await), ErrorCode::NoSuchSegment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_log_files_across_rolls_and_restart() {
    let dir = TempDir::new("coldread");
    // No read cache: every read is served from the log files (8 MiB each).
    let mut server =
        Server::start_with(&dir.0.join("data"), free_ports(1), 1, &["--cache-mb", "0", "--containers-per-core", "1"]);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("cold").await.unwrap();
    c.create_stream("cold", "s", 2).await.unwrap();
    let w = c.event_writer("cold/s").await.unwrap();
    let n = 6_000u32;
    for i in 0..n {
        let mut p = format!("{i}:").into_bytes();
        p.resize(4000, b'a' + (i % 26) as u8);
        w.write_event(format!("k{}", i % 4).as_bytes(), p);
    }
    w.flush().await.unwrap();
    let files = std::fs::read_dir(dir.0.join("data/containers/0000")).unwrap().count();
    assert!(files >= 3, "expected several log files, found {files}");

    let check = |c: Client| async move {
        let mut r = c.event_reader("cold/s", ReadFrom::Head).await.unwrap();
        let mut seen = vec![false; n as usize];
        while let Some(ev) = r.read_next(Duration::from_secs(2)).await.unwrap() {
            let s = std::str::from_utf8(&ev.payload).unwrap();
            let i: usize = s.split(':').next().unwrap().parse().unwrap();
            assert_eq!(ev.payload.len(), 4000);
            assert!(ev.payload[ev.payload.len() - 1] == b'a' + (i % 26) as u8, "event {i} damaged");
            assert!(!seen[i], "event {i} twice");
            seen[i] = true;
        }
        assert!(seen.iter().all(|&s| s), "events missing");
    };
    check(c.clone()).await;
    server.kill();
    server.restart();
    check(Client::connect(&server.url()).await.unwrap()).await;
}

/// A new data directory records the spread placement (a stream's segments on consecutive
/// containers, so on both shards alike); one made before placements were recorded (a
/// container count only) keeps the hashed placement across restarts, and its data stays
/// readable; an unknown placement stops the server with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directories_keep_their_placement() {
    use sluice_net::routing::Placement;
    let dir = TempDir::new("placement");
    let fresh = Server::start(&dir.0.join("new"), free_ports(2), 2);
    let c = Client::connect(&fresh.url()).await.unwrap();
    assert_eq!(c.placement(), Placement::Spread);
    assert_eq!(std::fs::read_to_string(dir.0.join("new/containers/PLACEMENT")).unwrap().trim(), "spread");
    c.create_scope("pl").await.unwrap();
    c.create_stream("pl", "s", 4).await.unwrap();
    let endpoints: Vec<String> = (0..4).map(|n| c.endpoint_of(&format!("pl/s/{n}"))).collect();
    let first = endpoints.iter().filter(|e| **e == endpoints[0]).count();
    assert_eq!(first, 2, "four segments, two per shard: {endpoints:?}");
    drop(c);
    drop(fresh);

    // An older directory: its count, no placement file.
    let old = dir.0.join("old");
    std::fs::create_dir_all(old.join("containers")).unwrap();
    std::fs::write(old.join("containers/COUNT"), "8\n").unwrap();
    let mut server = Server::start(&old, free_ports(2), 2);
    let c = Client::connect(&server.url()).await.unwrap();
    assert_eq!(c.placement(), Placement::Hashed);
    c.create_scope("pl").await.unwrap();
    c.create_stream("pl", "s", 4).await.unwrap();
    let w = c.event_writer("pl/s").await.unwrap();
    for i in 0..200u32 {
        w.write_event(format!("k{}", i % 16).as_bytes(), i.to_le_bytes().to_vec());
    }
    w.flush().await.unwrap();
    drop((w, c));
    server.kill();
    server.restart();
    let c = Client::connect(&server.url()).await.unwrap();
    assert_eq!(c.placement(), Placement::Hashed, "kept across a restart");
    assert!(!old.join("containers/PLACEMENT").exists());
    let mut r = c.event_reader("pl/s", ReadFrom::Head).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    while let Some(e) = r.read_next(Duration::from_millis(300)).await.unwrap() {
        seen.insert(u32::from_le_bytes(e.payload[..4].try_into().unwrap()));
    }
    assert_eq!(seen.len(), 200);
    drop((r, c));
    drop(server);

    let bad = dir.0.join("bad");
    std::fs::create_dir_all(bad.join("containers")).unwrap();
    std::fs::write(bad.join("containers/COUNT"), "8\n").unwrap();
    std::fs::write(bad.join("containers/PLACEMENT"), "sideways\n").unwrap();
    let port = free_ports(2);
    let out = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["standalone", "--cores", "2", "--no-pin", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown placement \"sideways\""), "{err}");
}
