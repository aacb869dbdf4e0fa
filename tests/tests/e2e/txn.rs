//! Transactions against the real server: a thousand transactions with random commit or
//! abort next to plain writes and scalings (committed ones visible once and contiguous per
//! key, aborted ones never); SIGKILL during commits (each transaction wholly visible or
//! wholly absent, as its commit said); lease timeouts; commit across scalings; typed errors;
//! the `sluice txn` CLI.

use rand::{Rng, SeedableRng};
use sluice_client::{Client, ClientConfig, ClientError, ReadFrom, TxnConfig};
use sluice_net::{ErrorCode, TxnState};
use sluice_tests::{Server, TempDir, cli, free_ports};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEYS: u64 = 16;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    r.expect_err("expected an error").code().expect("a server error")
}

/// A server whose transaction service looks every 100 ms.
fn server(dir: &TempDir) -> Server {
    Server::start_with(&dir.0.join("data"), free_ports(2), 2, &["--txn-interval-ms", "100"])
}

/// Every event of a sealed stream, in the order a reader from the head delivers them.
async fn read_all(c: &Client, stream: &str) -> Vec<String> {
    let mut r = c.event_reader(stream, ReadFrom::Head).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(ev) = r.read_next(Duration::from_secs(5)).await.unwrap() {
        assert!(Instant::now() < deadline, "reading took too long");
        out.push(String::from_utf8(ev.payload.to_vec()).unwrap());
    }
    out
}

/// Events are "P:w:key:seq" (plain) or "T:txn:key:i" (transaction `txn`, its i-th event).
/// Checks: plain events once each and in order per (writer, key); each transaction in
/// `visible` has exactly its events, once, in order and contiguous per key; no event of any
/// other transaction shows up. `plain` = acknowledged plain events per (writer, key).
fn check(events: &[String], plain: &HashMap<(u64, u64), u64>, visible: &HashMap<u64, Vec<(u64, u64)>>) {
    let mut by_key: HashMap<u64, Vec<&str>> = HashMap::new();
    let mut seen = HashSet::new();
    for e in events {
        assert!(seen.insert(e.clone()), "event {e} delivered twice");
        let key: u64 = e.split(':').nth(2).unwrap().parse().unwrap();
        by_key.entry(key).or_default().push(e);
    }
    // Plain: per (writer, key) exactly 0..n in order.
    let mut got_plain: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
    // Transactions: per (txn, key) the positions in the key's sequence and the indexes.
    let mut got_txn: HashMap<(u64, u64), Vec<(usize, u64)>> = HashMap::new();
    for (key, seq) in &by_key {
        for (pos, e) in seq.iter().enumerate() {
            let f: Vec<&str> = e.split(':').collect();
            let (a, b): (u64, u64) = (f[1].parse().unwrap(), f[3].parse().unwrap());
            if f[0] == "P" {
                got_plain.entry((a, *key)).or_default().push(b);
            } else {
                got_txn.entry((a, *key)).or_default().push((pos, b));
            }
        }
    }
    for (wk, n) in plain {
        assert_eq!(got_plain.remove(wk).unwrap_or_default(), (0..*n).collect::<Vec<_>>(), "plain events of {wk:?}");
    }
    assert!(got_plain.is_empty(), "plain events nobody acknowledged: {:?}", got_plain.keys());
    for (txn, evs) in visible {
        let mut want: HashMap<u64, Vec<u64>> = HashMap::new();
        for &(key, i) in evs {
            want.entry(key).or_default().push(i);
        }
        for (key, idx) in want {
            let got = got_txn.remove(&(*txn, key)).unwrap_or_else(|| panic!("transaction {txn} key {key} missing"));
            let positions: Vec<usize> = got.iter().map(|g| g.0).collect();
            assert!(
                positions.windows(2).all(|w| w[1] == w[0] + 1),
                "transaction {txn} key {key}: not contiguous: {positions:?}"
            );
            assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), idx, "transaction {txn} key {key}: order");
        }
    }
    assert!(got_txn.is_empty(), "events of transactions that must not be visible: {:?}", got_txn.keys());
}

/// Writes "P:w:key:seq" until `stop`; returns acknowledged events per (writer, key).
async fn plain_writer(c: Client, stream: &'static str, w: u64, stop: Arc<AtomicBool>) -> HashMap<(u64, u64), u64> {
    let wr = c.event_writer(stream).await.unwrap();
    let mut seq: HashMap<(u64, u64), u64> = HashMap::new();
    let mut acks = Vec::new();
    let mut i = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "plain writer ran too long");
        let k = (i * 7 + w) % KEYS;
        i += 1;
        let q = seq.entry((w, k)).or_default();
        acks.push(wr.write_event(&k.to_le_bytes(), format!("P:{w}:{k}:{q}").into_bytes()));
        *q += 1;
        if acks.len() >= 100 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    seq
}

/// Runs transaction `n`: 1..=20 events over random keys, then commit or abort (by the
/// seeded coin). Returns (n, committed, events as (key, index)).
async fn one_txn(
    c: &Client,
    stream: &str,
    n: u64,
    commit: bool,
    rng: &mut rand::rngs::StdRng,
) -> (u64, bool, Vec<(u64, u64)>) {
    let mut t = c.begin_txn(stream).await.unwrap();
    let count = rng.random_range(1..=20u64);
    let mut evs = Vec::new();
    for i in 0..count {
        let k = rng.random_range(0..KEYS);
        t.write_event(&k.to_le_bytes(), format!("T:{n}:{k}:{i}").as_bytes()).await.unwrap();
        evs.push((k, i));
    }
    if commit {
        let info = t.commit().await.unwrap();
        assert_eq!(info.state, TxnState::Committed);
    } else {
        assert_eq!(t.abort().await.unwrap().state, TxnState::Aborted);
    }
    (n, commit, evs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_transactions_next_to_plain_writes_and_scalings_are_all_or_nothing() {
    const TXNS: u64 = 1000;
    const WORKERS: u64 = 8;
    let dir = TempDir::new("txn-many");
    let s = server(&dir);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("tx").await.unwrap();
    c.create_stream("tx", "s", 4).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let plain: Vec<_> = (0..2).map(|w| tokio::spawn(plain_writer(c.clone(), "tx/s", w, stop.clone()))).collect();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (c, next) = (c.clone(), next.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut out = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= TXNS {
                        return out;
                    }
                    let commit = rng.random_bool(0.7);
                    out.push(one_txn(&c, "tx/s", n, commit, &mut rng).await);
                }
            })
        })
        .collect();
    // Two scalings while transactions are open: some commit into successors.
    for at in [TXNS / 3, 2 * TXNS / 3] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while next.load(Ordering::SeqCst) < at {
            assert!(Instant::now() < deadline, "transactions stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let info = c.get_stream("tx", "s").await.unwrap();
        c.split_segment("tx", "s", info.segments[0].number, 2).await.unwrap();
    }
    let mut visible = HashMap::new();
    let (mut committed, mut aborted) = (0, 0);
    for w in workers {
        for (n, commit, evs) in w.await.unwrap() {
            if commit {
                committed += 1;
                visible.insert(n, evs);
            } else {
                aborted += 1;
            }
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut acked = HashMap::new();
    for p in plain {
        acked.extend(p.await.unwrap());
    }
    assert_eq!(committed + aborted, TXNS);
    // Every transaction is settled; none is left open or half-way. (A commit returns once
    // its events are in; its record says `Committed` a moment later.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let txns = c.list_txns("tx", "s").await.unwrap();
        assert_eq!(txns.len() as u64, TXNS);
        if txns.iter().all(|t| t.state.is_final()) {
            break;
        }
        let open = txns.iter().filter(|t| t.state == TxnState::Open).count();
        assert_eq!(open, 0, "transactions left open after their commit or abort returned");
        assert!(Instant::now() < deadline, "unsettled transactions after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Commits merge the shadows on the server: a segment that was never sealed names no
    // writer but the two plain ones (moves by the client, each with its own writer id,
    // happen only into the successors of a sealed segment).
    let info = c.get_stream("tx", "s").await.unwrap();
    let unsplit: Vec<u64> = info.segments.iter().map(|r| r.number).filter(|&n| n < 4).collect();
    assert!(!unsplit.is_empty(), "two splits leave first-epoch segments");
    for n in unsplit {
        let writers = c.segment_info(&format!("tx/s/{n}")).await.unwrap().writers;
        assert!(writers.len() <= 2, "segment {n} keeps {} writer entries: {writers:?}", writers.len());
    }
    c.seal_stream("tx", "s").await.unwrap();
    let events = read_all(&c, "tx/s").await;
    check(&events, &acked, &visible);
    eprintln!(
        "{TXNS} transactions ({committed} committed, {aborted} aborted) in {took:.2?} next to {} plain events; {} events read",
        acked.values().sum::<u64>(),
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_commits_leaves_each_transaction_whole_or_absent() {
    const TXNS: u64 = 120;
    let dir = TempDir::new("txn-kill");
    let s = Arc::new(std::sync::Mutex::new(server(&dir)));
    let url = s.lock().unwrap().url();
    let c = Client::connect(&url).await.unwrap();
    c.create_scope("tk").await.unwrap();
    c.create_stream("tk", "s", 4).await.unwrap();

    // Each task opens a transaction of 50 events and commits it; some commits straddle a kill.
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let (url, next, done) = (url.clone(), next.clone(), done.clone());
            tokio::spawn(async move {
                let config = ClientConfig { retry_for: Duration::from_secs(30), ..ClientConfig::default() };
                let c = Client::connect_with(&url, config).await.unwrap();
                let mut out = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= TXNS {
                        return out;
                    }
                    let r = async {
                        let mut t = c
                            .begin_txn_with("tk/s", TxnConfig { lease: Duration::from_secs(3), auto_ping: true })
                            .await?;
                        let id = t.id();
                        let mut evs = Vec::new();
                        for i in 0..50u64 {
                            let k = (i * 5 + n + w) % KEYS;
                            t.write_event(&k.to_le_bytes(), format!("T:{n}:{k}:{i}").as_bytes()).await?;
                            evs.push((k, i));
                        }
                        t.flush().await?;
                        Ok::<_, ClientError>((id, evs, t))
                    }
                    .await;
                    match r {
                        Ok((id, evs, t)) => {
                            let committed = t.commit().await.map(|i| i.state);
                            out.push((n, Some(id), evs, committed));
                        }
                        // Failed before the commit was asked for: never committed.
                        Err(e) => out.push((n, None, Vec::new(), Err(e))),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for kill in 1..=2u64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.load(Ordering::SeqCst) < kill * TXNS / 3 {
            assert!(Instant::now() < deadline, "transactions stalled at {}", done.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = s.lock().unwrap();
            s.kill();
            std::thread::sleep(Duration::from_millis(200));
            s.restart();
        })
        .await
        .unwrap();
        eprintln!("SIGKILL {kill} after {} transactions; restarted", done.load(Ordering::SeqCst));
    }
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await.unwrap());
    }
    // The transaction service settles what the kills interrupted (expired leases abort,
    // decided commits finish).
    let c = Client::connect(&url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let states: HashMap<u128, TxnState> = loop {
        let txns = c.list_txns("tk", "s").await.unwrap();
        if txns.iter().all(|t| t.state.is_final()) {
            break txns.into_iter().map(|t| (t.txn, t.state)).collect();
        }
        assert!(
            Instant::now() < deadline,
            "transactions not settled: {:?}",
            txns.iter().map(|t| t.state).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut visible = HashMap::new();
    let (mut ok, mut failed) = (0, 0);
    for (n, id, evs, committed) in results {
        let Some(id) = id else {
            failed += 1;
            continue;
        };
        let state = states[&id];
        match committed {
            Ok(st) => {
                ok += 1;
                assert_eq!(st, TxnState::Committed);
                assert_eq!(state, TxnState::Committed, "transaction {n}: commit returned Ok");
            }
            Err(e) => {
                failed += 1;
                eprintln!("transaction {n}: commit failed ({e}); it ended {state}");
            }
        }
        if state == TxnState::Committed {
            visible.insert(n, evs);
        }
    }
    c.seal_stream("tk", "s").await.unwrap();
    let events = read_all(&c, "tk/s").await;
    check(&events, &HashMap::new(), &visible);
    eprintln!(
        "{ok} commits acknowledged, {failed} failed across 2 SIGKILLs; {} transactions visible whole",
        visible.len()
    );
    assert!(ok > TXNS / 2, "most commits succeed across restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_timeouts_scalings_errors_and_the_cli() {
    let dir = TempDir::new("txn-misc");
    let s = server(&dir);
    let c = Client::connect(&s.url()).await.unwrap();
    c.create_scope("tm").await.unwrap();
    c.create_stream("tm", "s", 2).await.unwrap();
    let no_ping = |ms| TxnConfig { lease: Duration::from_millis(ms), auto_ping: false };

    // An unpinged transaction aborts once its lease runs out; a pinged one lives on.
    let mut lapsed = c.begin_txn_with("tm/s", no_ping(300)).await.unwrap();
    lapsed.write_event(b"k", b"lost").await.unwrap();
    lapsed.flush().await.unwrap();
    let mut pinged =
        c.begin_txn_with("tm/s", TxnConfig { lease: Duration::from_millis(300), auto_ping: true }).await.unwrap();
    pinged.write_event(&0u64.to_le_bytes(), b"T:0:0:0").await.unwrap();
    let lapse_started = Instant::now();
    let deadline = lapse_started + Duration::from_secs(10);
    while lapsed.status().await.unwrap() != TxnState::Aborted {
        assert!(Instant::now() < deadline, "the unpinged transaction never aborted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("an unpinged 300 ms lease aborted after {:.2?}", lapse_started.elapsed());
    assert_eq!(pinged.status().await.unwrap(), TxnState::Open);
    assert_eq!(code(lapsed.commit().await), ErrorCode::TxnNotOpen);
    let pinged_id = pinged.id();
    assert_eq!(pinged.commit().await.unwrap().state, TxnState::Committed);
    // The record's last step and the shadows' deletion follow the commit in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.get_txn("tm", "s", pinged_id).await.unwrap().state != TxnState::Committed {
        assert!(Instant::now() < deadline, "the committed transaction's record never said so");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..2 {
        let shadow = sluice_net::txn::shadow_segment_name("tm", "s", n, pinged_id);
        while c.segment_info(&shadow).await.err().and_then(|e| e.code()) != Some(ErrorCode::NoSuchSegment) {
            assert!(Instant::now() < deadline, "the spent shadow {shadow} was never deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // commit_recorded returns once the record says so too.
    c.create_stream("tm", "r", 1).await.unwrap();
    let mut recorded = c.begin_txn("tm/r").await.unwrap();
    recorded.write_event(b"k", b"recorded").await.unwrap();
    let recorded_id = recorded.id();
    assert_eq!(recorded.commit_recorded().await.unwrap().state, TxnState::Committed);
    assert_eq!(c.get_txn("tm", "r", recorded_id).await.unwrap().state, TxnState::Committed);

    // A transaction opened before two scalings commits into the successors, after the plain
    // events written before its commit and before those written after.
    let w = c.event_writer("tm/s").await.unwrap();
    let mut t = c.begin_txn("tm/s").await.unwrap();
    for k in 0..KEYS {
        w.write_event(&k.to_le_bytes(), format!("P:0:{k}:0").into_bytes()).await.unwrap();
        for i in 0..3 {
            t.write_event(&k.to_le_bytes(), format!("T:1:{k}:{i}").as_bytes()).await.unwrap();
        }
    }
    c.split_segment("tm", "s", 0, 2).await.unwrap();
    c.split_segment("tm", "s", 1, 3).await.unwrap();
    c.merge_segments("tm", "s", &[2, 3]).await.unwrap();
    for k in 0..KEYS {
        w.write_event(&k.to_le_bytes(), format!("P:0:{k}:1").into_bytes()).await.unwrap();
    }
    assert_eq!(t.info().epoch, 0);
    t.commit().await.unwrap();
    for k in 0..KEYS {
        w.write_event(&k.to_le_bytes(), format!("P:0:{k}:2").into_bytes()).await.unwrap();
    }
    // A transaction left open when the stream is sealed is aborted by the seal.
    let mut open = c.begin_txn("tm/s").await.unwrap();
    open.write_event(b"x", b"never").await.unwrap();
    open.flush().await.unwrap();
    let open_id = open.id();
    drop(w);
    c.seal_stream("tm", "s").await.unwrap();
    assert_eq!(c.get_txn("tm", "s", open_id).await.unwrap().state, TxnState::Aborted);
    let events = read_all(&c, "tm/s").await;
    let plain: HashMap<(u64, u64), u64> = (0..KEYS).map(|k| ((0, k), 3)).collect();
    let mut visible = HashMap::new();
    visible.insert(0, vec![(0, 0)]);
    visible.insert(1, (0..KEYS).flat_map(|k| (0..3).map(move |i| (k, i))).collect());
    check(&events, &plain, &visible);
    for k in 0..KEYS {
        let seq: Vec<&String> = events.iter().filter(|e| e.split(':').nth(2) == Some(&k.to_string())).collect();
        let kinds: String = seq.iter().map(|e| if e.starts_with('P') { 'P' } else { 'T' }).collect();
        if k == 0 {
            // Key 0 also holds the pinged transaction's event, committed before any of these.
            assert_eq!(kinds, "TPPTTTP", "key {k}");
        } else {
            assert_eq!(kinds, "PPTTTP", "key {k}: plain before, the transaction, plain after");
        }
    }

    // Typed errors.
    c.create_stream("tm", "e", 1).await.unwrap();
    assert_eq!(code(c.get_txn("tm", "e", 42).await), ErrorCode::NoSuchTxn);
    assert_eq!(code(c.commit_txn("tm", "e", 42).await), ErrorCode::NoSuchTxn);
    assert_eq!(code(c.begin_txn("tm/nope").await), ErrorCode::NoSuchStream);
    assert_eq!(code(c.begin_txn_with("tm/e", no_ping(0)).await), ErrorCode::BadRequest);
    assert_eq!(code(c.begin_txn("tm/s").await), ErrorCode::Sealed);
    let t = c.begin_txn("tm/e").await.unwrap();
    let id = t.id();
    t.abort().await.unwrap();
    assert_eq!(code(c.commit_txn("tm", "e", id).await), ErrorCode::TxnNotOpen);
    assert_eq!(code(c.ping_txn("tm", "e", id, 1000).await), ErrorCode::TxnNotOpen);
    let mut t = c.begin_txn("tm/e").await.unwrap();
    t.write_event(b"k", b"one").await.unwrap();
    let id = t.id();
    t.commit().await.unwrap();
    assert_eq!(code(c.abort_txn("tm", "e", id).await), ErrorCode::TxnNotOpen);
    // A transaction holds at most 8 MiB per segment.
    let mut big = c.begin_txn("tm/e").await.unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut refused = None;
    for i in 0..10 {
        if let Err(e) = big.write_event(b"k", &chunk).await {
            refused = Some((i, e));
            break;
        }
    }
    // The client stops it at 8 MiB; a server whose log files are small (8 MiB here: one
    // append of at most ~4 MiB) refuses earlier.
    let (at, e) = refused.expect("a full transaction refuses more");
    assert!(
        (3..=7).contains(&at) && (e.to_string().contains("is full") || e.code() == Some(ErrorCode::TooLarge)),
        "{at}: {e}"
    );
    assert_eq!(code(big.flush().await), ErrorCode::TooLarge);
    big.abort().await.unwrap();
    // A shadow segment refuses appends beyond the limit on the server too.
    let shadow = sluice_net::txn::shadow_segment_name("tm", "e", 0, c.begin_txn("tm/e").await.unwrap().id());
    let nine = bytes::Bytes::from(vec![0u8; 9 << 20]);
    assert_eq!(code(c.append_raw(&shadow, nine, None).await), ErrorCode::TooLarge);
    // Shadow segments are not counted in the append rates (auto-scaling looks at the stream).
    c.append_raw(&shadow, bytes::Bytes::from_static(b"raw"), None).await.unwrap();
    let rates = c.segment_info(&shadow).await.unwrap().rates;
    assert_eq!((rates.events_per_s, rates.bytes_per_s, rates.measured_ms), (0.0, 0.0, 0));

    // The CLI: write one from stdin, list, describe, abort; the record is kept for listing.
    let url = s.url();
    let (ok, out, err) = cli(&url, &["txn", "write", "tm/e", "--key", "a"], Some("one\ntwo\n"));
    assert!(ok && out.contains("2 event(s), committed"), "{out} {err}");
    let (ok, out, err) = cli(&url, &["txn", "write", "tm/e", "--abort"], Some("gone\n"));
    assert!(ok && out.contains("1 event(s), aborted"), "{out} {err}");
    let (ok, out, err) = cli(&url, &["txn", "list", "tm/e"], None);
    assert!(ok && out.contains("committed") && out.contains("aborted") && out.contains("open"), "{out} {err}");
    let open = c.begin_txn("tm/e").await.unwrap();
    let id = sluice_net::txn::txn_id_text(open.id());
    let (ok, out, err) = cli(&url, &["txn", "describe", "tm/e", &id], None);
    assert!(ok && out.contains("state:    open") && out.contains("#txn."), "{out} {err}");
    let (ok, out, err) = cli(&url, &["txn", "abort", "tm/e", &id], None);
    assert!(ok && out.contains("aborted"), "{out} {err}");
    let mut open = c.begin_txn("tm/e").await.unwrap();
    open.write_event(b"k", b"by the cli").await.unwrap();
    open.flush().await.unwrap();
    let id = sluice_net::txn::txn_id_text(open.id());
    let (ok, out, err) = cli(&url, &["txn", "commit", "tm/e", &id], None);
    assert!(ok && out.contains("committed"), "{out} {err}");
    let (ok, _, err) = cli(&url, &["txn", "commit", "tm/e", &id], None);
    assert!(ok, "committing twice is answered as committed: {err}");
    let (ok, _, err) = cli(&url, &["txn", "describe", "tm/e", "xyz"], None);
    assert!(!ok && err.contains("not a transaction id"), "{err}");
    let (ok, _, err) = cli(&url, &["txn", "describe", "tm/e", "abc"], None);
    assert!(!ok && err.contains("no such transaction"), "{err}");

    // Deleting a stream removes its transactions and their shadows.
    c.seal_stream("tm", "e").await.unwrap();
    c.delete_stream("tm", "e").await.unwrap();
    assert!(c.list_txns("tm", "e").await.unwrap().is_empty());
    assert_eq!(code(c.segment_info(&shadow).await), ErrorCode::NoSuchSegment);
}

/// More transactions than fit one list page: `list_txns` adds the pages up, a page can be
/// asked for by cursor, and the transaction service pages through them all (every expired
/// one is aborted, not only the first page's). Before pages, a list this long did not fit
/// one answer: the client dropped the connection and the service stopped working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_transactions_are_listed_and_settled_a_page_at_a_time() {
    const N: u64 = 4_000;
    let dir = TempDir::new("txn-pages");
    let s = server(&dir);
    let c = Client::connect(&s.url()).await.unwrap();
    // Long names (they come with every listed transaction): 4000 are over 1 MiB together.
    let (scope, stream) = ("tp".repeat(30), "s".repeat(60));
    let name = format!("{scope}/{stream}");
    c.create_scope(&scope).await.unwrap();
    c.create_stream(&scope, &stream, 3).await.unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let openers: Vec<_> = (0..16)
        .map(|_| {
            let (c, next, name) = (c.clone(), next.clone(), name.clone());
            tokio::spawn(async move {
                let config = TxnConfig { lease: Duration::from_millis(1500), auto_ping: false };
                while next.fetch_add(1, Ordering::SeqCst) < N {
                    c.begin_txn_with(&name, config.clone()).await.unwrap();
                }
            })
        })
        .collect();
    let started = Instant::now();
    for o in openers {
        o.await.unwrap();
    }
    eprintln!("{N} transactions opened in {:?}", started.elapsed());

    let all = c.list_txns(&scope, &stream).await.unwrap();
    assert_eq!(all.len() as u64, N, "every transaction listed once across the pages");
    assert_eq!(all.iter().map(|t| t.txn).collect::<HashSet<_>>().len() as u64, N);
    let (page, cursor) = c.list_txns_page(&scope, &stream, "", 100).await.unwrap();
    assert_eq!(page.len(), 100);
    let (second, _) = c.list_txns_page(&scope, &stream, &cursor.expect("more pages"), 100).await.unwrap();
    assert!(second[0].txn > page[99].txn, "the next page starts after the cursor");
    let e = c.list_txns_page(&scope, &stream, "not-a-cursor", 0).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");

    // Their leases run out; the service aborts every one.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let txns = c.list_txns(&scope, &stream).await.unwrap();
        let open = txns.iter().filter(|t| t.state != TxnState::Aborted).count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} of {N} transactions still not aborted after 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("all {N} aborted by the transaction service {:?} after the first was opened", started.elapsed());
}
