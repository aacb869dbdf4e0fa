//! A node whose scopes and streams live in a real etcd instead of the embedded store: the
//! same client operations work, and the records are visible in etcd. An etcd whose
//! database reached its quota refuses metadata changes with the typed `NoSpace`, and the
//! node takes changes again once an operator freed the space.

use sluice_client::{Client, ReadFrom};
use sluice_meta::{EtcdStore, MetaStore};
use sluice_net::routing::Placement;
use sluice_tests::{Etcd, TempDir, cli, free_ports};
use std::time::Duration;

/// A node (2 shards, not pinned, 8 MiB log files) keeping its metadata in `etcd` under
/// cluster name `cluster`: the node, its store, its URL and its directory (`dir_name`).
fn node_on(etcd: &Etcd, dir_name: &str, cluster: &str) -> (sluice_engine::shard::Node, EtcdStore, String, TempDir) {
    let dir = TempDir::new(dir_name);
    let url = format!("127.0.0.1:{}", free_ports(2));
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), cluster).unwrap();
    let mut cfg = sluice_engine::EngineConfig::new(dir.0.join("data"), url.parse().unwrap(), 2);
    cfg.pin = false;
    cfg.log_file_bytes = 8 << 20;
    let node = sluice_engine::shard::Node::start_with_store(cfg, store.clone()).unwrap();
    (node, store, url, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_etcd_metadata() {
    let etcd = Etcd::start();
    let (node, store, url, _dir) = node_on(&etcd, "etcdnode", "test");

    let c = Client::connect(&url).await.unwrap();
    c.create_scope("etcd").await.unwrap();
    c.create_stream("etcd", "s", 3).await.unwrap();
    let w = c.event_writer("etcd/s").await.unwrap();
    for i in 0..1000 {
        w.write_event(format!("k{}", i % 7).as_bytes(), format!("e{i}").into_bytes());
    }
    w.flush().await.unwrap();
    let mut r = c.event_reader("etcd/s", ReadFrom::Head).await.unwrap();
    let mut n = 0;
    while r.read_next(Duration::from_millis(500)).await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 1000);
    let records = store.range("streams/etcd/").await.unwrap();
    assert_eq!(records.len(), 1, "the stream record lives in etcd");
    assert!(store.get("scopes/etcd").await.unwrap().is_some());
    tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_settings_are_fixed_and_shown() {
    use sluice_meta::cluster::{ClusterError, NodeInfo, ensure_cluster, register_node};
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "c1").unwrap();
    let first = ensure_cluster(&store, "c1", 12, Placement::Spread).await.unwrap();
    assert_eq!((first.containers, first.placement), (12, Placement::Spread));
    // A later node agrees, and takes the cluster's placement whatever it would have chosen.
    let later = ensure_cluster(&store, "c1", 12, Placement::Hashed).await.unwrap();
    assert_eq!((later.containers, later.placement), (12, Placement::Spread), "a second node agrees");
    match ensure_cluster(&store, "c1", 8, Placement::Spread).await {
        Err(e @ ClusterError::ContainerCountMismatch { have: 12, want: 8, .. }) => {
            assert!(e.to_string().contains("created with 12 containers"), "{e}");
        }
        other => panic!("a node with another container count joined: {other:?}"),
    }
    let info = NodeInfo {
        node_id: "n1".into(),
        endpoints: vec!["127.0.0.1:7001".into()],
        started_unix_ms: 0,
        draining: false,
        lease: 0,
    };
    let reg = register_node(&store, &info, Duration::from_secs(5)).await.unwrap();

    let (ok, out, err) =
        sluice_tests::cli("", &["cluster", "status", "--etcd", &etcd.endpoint, "--cluster", "c1"], None);
    assert!(ok, "{err}");
    assert!(out.contains("cluster c1: 12 containers") && out.contains("1 live node") && out.contains("n1"), "{out}");
    let (ok, out, _) =
        sluice_tests::cli("", &["cluster", "status", "--etcd", &etcd.endpoint, "--cluster", "none"], None);
    assert!(ok && out.contains("not created"), "{out}");
    reg.leave().await.unwrap();

    // An unreachable etcd: a clear error, in bounded time, no panic.
    let started = std::time::Instant::now();
    let (ok, _, err) = sluice_tests::cli("", &["cluster", "status", "--etcd", "http://127.0.0.1:1"], None);
    assert!(!ok && err.contains("etcd"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_at_its_quota_refuses_changes_with_no_space_until_freed() {
    use sluice_client::ErrorCode;
    use sluice_meta::MetaError;
    let etcd = Etcd::start_with(&["--quota-backend-bytes", "4194304"]);
    let (node, store, url, _dir) = node_on(&etcd, "etcdfull", "full");
    // NoSpace is retryable: calls retry it for their window (a minute by default).
    let config = sluice_client::ClientConfig { retry_for: Duration::from_secs(1), ..Default::default() };
    let c = Client::connect_with(&url, config).await.unwrap();
    c.create_scope("before").await.unwrap();

    // Something else fills etcd to its quota: etcd raises its NOSPACE alarm. etcd 3.4 checks
    // the quota against its database's size as of its last backend commit (every 100 ms),
    // so puts faster than that all pass: they are paced, and go on until one is refused.
    let mut filled = 0;
    let filling = std::time::Instant::now();
    let refusal = loop {
        assert!(
            filled < 256 && filling.elapsed() < Duration::from_secs(30),
            "a 4 MiB quota never filled ({filled} puts of 256 KiB)"
        );
        match store.put(&format!("filler/{filled}"), vec![b'x'; 256 << 10]).await {
            Ok(_) => filled += 1,
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(refusal, MetaError::NoSpace(_)), "etcd at its quota: {refusal:?}");
    assert!(refusal.to_string().contains("quota"), "{refusal}");

    // A metadata change through the node: the typed error, naming etcd; reads still work.
    let e = c.create_scope("during").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    assert!(e.to_string().contains("etcd"), "{e}");
    assert!(c.list_scopes().await.unwrap().iter().any(|s| s == "before"));
    // The CLI warns what it waits for, then fails with the error after --retry-for.
    tokio::task::spawn_blocking(sluice_tests::sluice_bin).await.unwrap(); // built on first use
    let started = std::time::Instant::now();
    let url2 = url.clone();
    let (ok, _, stderr) =
        tokio::task::spawn_blocking(move || cli(&url2, &["scope", "create", "during", "--retry-for", "3"], None))
            .await
            .unwrap();
    assert!(!ok && stderr.contains("NoSpace") && stderr.contains("quota"), "{stderr}");
    assert!(stderr.contains("still retrying"), "a warning while it waits: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "--retry-for 3 took {:?}", started.elapsed());

    // The operator frees space: delete, compact, defragment, disarm. Changes work again.
    for i in 0..filled {
        store.delete(&format!("filler/{i}"), None).await.unwrap();
    }
    let mut admin = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    let revision = admin.get("x", None).await.unwrap().header().unwrap().revision();
    admin.compact(revision, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    admin.defragment().await.unwrap();
    let raised = admin.alarm(etcd_client::AlarmAction::Get, etcd_client::AlarmType::None, None).await.unwrap();
    assert!(!raised.alarms().is_empty(), "etcd raised its NOSPACE alarm");
    for alarm in raised.alarms() {
        let mut member = etcd_client::AlarmOptions::new();
        member.with_member(alarm.member_id());
        admin.alarm(etcd_client::AlarmAction::Deactivate, alarm.alarm(), Some(member)).await.unwrap();
    }
    c.create_scope("after").await.unwrap();
    tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
}

/// A stream's history lives in one record per epoch, so scalings never grow the stream
/// record: with etcd's request size limit set to 64 KiB, a 256-segment stream takes 80
/// scalings (the first layout, the whole history in the record, was refused at the 51st
/// with a 128 KiB limit)
/// and its history reads back whole. A single scaling too large for etcd (one segment split
/// 769 ways) is refused with `TooLarge`, saying why, and undone: the stream stays as it was
/// and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scalings_do_not_grow_the_stream_record_and_one_too_large_is_refused_clearly() {
    use sluice_client::ErrorCode;
    const SCALINGS: u64 = 80;
    let etcd = Etcd::start_with(&["--max-request-bytes", "65536"]);
    let (node, store, url, _dir) = node_on(&etcd, "etcdbig", "big");
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("w").await.unwrap();
    c.create_stream("w", "s", 256).await.unwrap();
    let record_bytes = || async { store.get("streams/w/s").await.unwrap().unwrap().value.len() };
    let before = record_bytes().await;
    for i in 0..SCALINGS {
        let first: Vec<u64> = c.get_stream("w", "s").await.unwrap().segments.iter().take(2).map(|s| s.number).collect();
        let r = if i % 2 == 0 {
            c.merge_segments("w", "s", &first).await
        } else {
            c.split_segment("w", "s", first[0], 2).await
        };
        r.unwrap_or_else(|e| panic!("scaling {i}: {e}"));
    }
    let after = record_bytes().await;
    eprintln!("stream record: {before} bytes at creation, {after} after {SCALINGS} scalings");
    assert!(after < before + 1024, "the record grew from {before} to {after} bytes");
    let history = c.stream_history("w", "s").await.unwrap();
    assert_eq!(history.epochs.len() as u64, SCALINGS + 1);
    assert_eq!(history.segments.len() as u64, 256 + SCALINGS / 2 * 3);
    assert_eq!(history.segments.iter().filter(|s| s.sealed_epoch.is_none()).count(), 256);

    let info = c.get_stream("w", "s").await.unwrap();
    let first = &info.segments[0];
    let ranges = sluice_net::KeyRange { low: first.key_low, high: first.key_high }.split(769);
    let e = c.scale_stream("w", "s", &[first.number], &ranges).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{e}");
    assert!(e.to_string().contains("max-request-bytes"), "{e}");
    eprintln!("the 769-way split refused: {e}");
    // Undone, not left half done: the stream is as it was, and the same request again is
    // refused the same way (not "another scaling is in progress").
    let now = c.get_stream("w", "s").await.unwrap();
    assert_eq!((now.epoch, now.segments.len()), (info.epoch, info.segments.len()));
    let again = c.scale_stream("w", "s", &[first.number], &ranges).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::TooLarge), "{again}");
    let w = c.event_writer("w/s").await.unwrap();
    w.write_event(b"k", b"still writable".to_vec()).await.unwrap();
    c.split_segment("w", "s", info.segments[0].number, 2).await.unwrap();
    tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
}
