//! SIGKILL in the middle of scalings, under keyed load: a scaling is recorded, its new
//! segments created, made current, the old ones sealed and the record cleared, each step in
//! its own write; a kill between any two must leave a stream that the next call finishes
//! (`current_stream`), and writers that resend across the restart and the redirect must
//! neither lose nor duplicate an acknowledged event. Read back from the head, every event
//! is there once, in per-key order across all the epochs. A scaling or a scope creation
//! or stream creation whose answer a kill lost succeeds when retried (it finds its work
//! done, or resumes it), instead of failing with "not an active segment" or "already
//! exists"; the streams then take writes.

use sluice_client::ReadFrom;
use sluice_tests::{Harness, keyed_writer, stop_keyed_writers};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const WRITERS: u64 = 4;
const KEYS: u64 = 16;
const SCALINGS: usize = 9;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_scalings_loses_and_duplicates_nothing() {
    let mut h = Harness::with_stream("kc", "s", 2).await;
    let c = h.client.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(keyed_writer(c.clone(), "kc/s", w, KEYS, stop.clone()))).collect();

    let mut kills = 0;
    for i in 0..SCALINGS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let info = c.get_stream("kc", "s").await.unwrap();
        let segs = info.segments.clone();
        let c2 = c.clone();
        let started = Instant::now();
        let scale = tokio::spawn(async move { sluice_tests::split_or_merge(&c2, "kc", "s", &segs, i % 2 == 0).await });
        // Every third scaling: SIGKILL while it runs (a scaling takes a few milliseconds;
        // the delay moves the kill across its steps), then restart.
        // Scopes created back to back meanwhile: a create whose answer the kill lost is
        // retried, finds the scope there, and succeeds.
        if i % 3 == 1 {
            let c3 = c.clone();
            let creates = tokio::spawn(async move {
                for j in 0..20 {
                    c3.create_scope(&format!("kc{i}-{j}")).await.unwrap_or_else(|e| panic!("create kc{i}-{j}: {e}"));
                    // A stream is created in steps (recorded, segments made, active).
                    c3.create_stream(&format!("kc{i}-{j}"), "t", 3)
                        .await
                        .unwrap_or_else(|e| panic!("create kc{i}-{j}/t: {e}"));
                }
            });
            tokio::time::sleep(Duration::from_micros(500 + 1500 * kills)).await;
            h.server.kill();
            h.server.restart();
            kills += 1;
            creates.await.unwrap();
            let scopes = c.list_scopes().await.unwrap();
            assert!((0..20).all(|j| scopes.contains(&format!("kc{i}-{j}"))), "{scopes:?}");
            for j in 0..20 {
                let t = c.get_stream(&format!("kc{i}-{j}"), "t").await.unwrap();
                assert_eq!(t.segments.len(), 3, "kc{i}-{j}/t");
                let w = c.event_writer(&format!("kc{i}-{j}/t")).await.unwrap();
                w.write_event(b"k", b"after the kill".to_vec()).await.expect("the stream takes writes");
            }
        }
        // The scaling either finished, or was finished by the retried call after the restart.
        let done = scale.await.unwrap().unwrap_or_else(|e| panic!("scaling {i}: {e}"));
        if i % 3 == 1 {
            eprintln!("scaling {i}, killed while it ran: done after {:?}", started.elapsed());
        }
        assert_eq!(done.epoch, info.epoch + 1, "scaling {i}");
        let now = c.get_stream("kc", "s").await.unwrap();
        assert_eq!(now.epoch, info.epoch + 1, "scaling {i}");
        assert!(c.stream_history("kc", "s").await.unwrap().epochs.len() == now.epoch as usize + 1);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = stop_keyed_writers(&stop, writers).await;
    let total: u64 = written.values().sum();

    // One more kill with everything written, then read it all from the head.
    h.server.kill();
    h.server.restart();
    c.seal_stream("kc", "s").await.unwrap();
    let mut reader = c.event_reader("kc/s", ReadFrom::Head).await.unwrap();
    let mut next: HashMap<(u64, u64), u64> = HashMap::new();
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(ev) = reader.read_next(Duration::from_secs(5)).await.unwrap() {
        assert!(Instant::now() < deadline, "reading took too long");
        let s = std::str::from_utf8(&ev.payload).unwrap();
        let v: Vec<u64> = s.split(':').map(|x| x.parse().unwrap()).collect();
        let expected = next.entry((v[0], v[1])).or_default();
        assert_eq!(
            v[2], *expected,
            "writer {} key {}: got seq {} after {} (lost, repeated or reordered)",
            v[0], v[1], v[2], *expected
        );
        *expected += 1;
        read += 1;
    }
    assert_eq!(read, total, "events read against events acknowledged");
    for (wk, n) in &written {
        assert_eq!(next.get(wk).copied().unwrap_or(0), *n, "writer/key {wk:?}");
    }
    let history = c.stream_history("kc", "s").await.unwrap();
    assert_eq!(history.epochs.len(), SCALINGS + 1);
    eprintln!(
        "{total} events over {} segments, {SCALINGS} scalings, {} kills: each read once, in key order",
        history.segments.len(),
        kills + 1
    );
}
