//! Containers owned under a cluster epoch (real glommio I/O, a real filesystem tier-2):
//! a hand-off through tier-2 carries every segment (data, seals, writer event numbers) to
//! the next owner; the log refuses to open under an epoch older than its records; a
//! deposed owner stops serving once a newer owner announces itself in tier-2, and can no
//! longer write a hand-off; a container taken back while its earlier instance still
//! prepared a log file rolls on past that file.

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_engine::EngineError;
use sluice_engine::container::core::{OpResult, Request};
use sluice_engine::container::handoff;
use sluice_engine::container::io::{Container, IoPacer, OpenSource};
use sluice_net::event::encode_event;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

mod common;
use common::{Dir, core_cfg, first_open, tier2};

async fn open(dir: &Path, t2: &Path, epoch: u64, source: OpenSource) -> Result<Rc<Container>, String> {
    Container::open_owned(
        core_cfg(3, 1 << 20),
        dir.to_path_buf(),
        Rc::new(IoPacer::new(0, std::time::Duration::ZERO)),
        tier2(t2, 256 << 10),
        epoch,
        source,
    )
    .await
}

async fn append(c: &Rc<Container>, seg: &str, writer: u128, n: u64, text: &str) -> Result<OpResult, EngineError> {
    let mut data = Vec::new();
    encode_event(&mut data, text.as_bytes());
    let req = Request::Append {
        name: seg.into(),
        writer,
        first_event_number: n,
        event_count: 1,
        expected_offset: None,
        data: Bytes::from(data),
    };
    c.submit(req)?.await
}

#[test]
fn handoff_stale_log_and_tier2_fencing() {
    let guard = Dir::new("own");
    let root = guard.0.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;

            let (t2, a, b) = (root.join("tier2"), root.join("node-a"), root.join("node-b"));
            // Node a owns the container at epoch 5 and writes.
            let c = open(&a, &t2, 5, OpenSource::Fresh).await.unwrap();
            c.submit(Request::Create { name: "s/t/0".into() }).unwrap().await.unwrap();
            c.submit(Request::Create { name: "s/t/1".into() }).unwrap().await.unwrap();
            for n in 1..=200u64 {
                append(&c, "s/t/0", 7, n, &format!("event-{n}-{}", "x".repeat(500))).await.unwrap();
            }
            append(&c, "s/t/1", 7, 1, "sealed soon").await.unwrap();
            c.submit(Request::Seal { name: "s/t/1".into() }).unwrap().await.unwrap();
            let len0 = c.status("s/t/0").unwrap().length;

            // The log refuses an older epoch than its records; a newer one is fine.
            c.stop_with("test: closing".into());
            drop(c);
            let stale = open(&a, &t2, 4, OpenSource::Local).await.map(|_| ()).unwrap_err();
            assert!(stale.contains("stale epoch"), "{stale}");
            let c = open(&a, &t2, 6, OpenSource::Local).await.unwrap();
            assert_eq!(c.status("s/t/0").unwrap().length, len0, "recovered from the local log");

            // Hand off at epoch 6; node b takes over at 7 from tier-2 alone.
            c.hand_off().await.unwrap();
            assert!(matches!(append(&c, "s/t/0", 7, 201, "late").await, Err(EngineError::NotOwner { .. })));
            let b1 = open(&b, &t2, 7, OpenSource::Handoff).await.unwrap();
            let st = b1.status("s/t/0").unwrap();
            assert_eq!((st.length, st.tier2_end), (len0, len0), "every byte was in tier-2");
            assert!(b1.status("s/t/1").unwrap().sealed, "the seal moved");
            let replay = append(&b1, "s/t/0", 7, 200, "replayed").await.unwrap();
            assert!(
                matches!(replay, OpResult::Appended { duplicate: true, .. }),
                "writer event numbers moved: {replay:?}"
            );
            let mut bytes = Vec::new();
            while (bytes.len() as u64) < len0 {
                let d = b1.read("s/t/0", bytes.len() as u64, 64 << 10, Duration::ZERO).await.unwrap();
                bytes.extend_from_slice(&d.to_bytes());
            }
            let (mut buf, mut events) = (&bytes[..], 0);
            while !buf.is_empty() {
                let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                assert!(std::str::from_utf8(&buf[4..4 + n]).unwrap().starts_with(&format!("event-{}-", events + 1)));
                buf = &buf[4 + n..];
                events += 1;
            }
            assert_eq!(events, 200, "node b reads every event from tier-2");
            append(&b1, "s/t/0", 7, 201, "after the move").await.unwrap();

            // A newer owner (epoch 9) announces itself: b's mover stops the container and
            // b can no longer write a hand-off.
            let store = tier2(&t2, 256 << 10).store;
            handoff::claim(&store, 3, 9).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match append(&b1, "s/t/0", 7, 300, "while deposed").await {
                    Err(EngineError::NotOwner { reason, .. }) => {
                        assert!(reason.contains("fenced"), "{reason}");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("unexpected error {e}"),
                }
                assert!(Instant::now() < deadline, "the deposed owner kept accepting writes");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            let ck = sluice_engine::log::checkpoint::CheckpointState::default();
            let refused = handoff::write(&store, 3, 7, &ck).await.unwrap_err();
            assert!(refused.contains("fenced"), "{refused}");
        })
        .unwrap()
        .join()
        .unwrap();
}

/// A container stopped while it prepares its next log file (a node that lost it), then
/// opened again from its local log (the node took it back): the opening waits for the
/// earlier instance's preparation, so it sees that file (and drops it, empty) rather than
/// creating it again on its next roll. Before, the roll failed with `EEXIST` and poisoned
/// the container.
#[test]
fn a_container_opened_again_while_its_next_file_was_prepared_rolls_on() {
    let guard = Dir::new("own-prep");
    let root = guard.0.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let (t2, dir) = (root.join("tier2"), root.join("node"));
            let open = |epoch, source| {
                let pacer = Rc::new(IoPacer::new(0, Duration::ZERO));
                Container::open_owned(core_cfg(3, 1 << 20), dir.clone(), pacer, tier2(&t2, 256 << 10), epoch, source)
            };
            let mut c = open(1, OpenSource::Fresh).await.unwrap();
            c.submit(Request::Create { name: "s/t/0".into() }).unwrap().await.unwrap();
            let text = "x".repeat(4000);
            let mut n = 1u64;
            // Past half of the first 1 MiB file.
            while n < 150 {
                append(&c, "s/t/0", 7, n, &text).await.unwrap();
                n += 1;
            }
            // Taken back at once: its first write prepares the next file (the current one is
            // past half), and it is lost again at once.
            let mut epoch = 1;
            for _ in 0..2 {
                c.stop_with("test: the node lost it".into());
                drop(c);
                epoch += 1;
                c = open(epoch, OpenSource::Local).await.unwrap();
                append(&c, "s/t/0", 7, n, &text).await.unwrap();
                n += 1;
            }
            // Three more files' worth: every roll creates its file.
            while n < 900 {
                append(&c, "s/t/0", 7, n, &text).await.unwrap_or_else(|e| panic!("event {n}: {e}"));
                n += 1;
            }
            let length = c.status("s/t/0").unwrap().length;
            assert_eq!(length, (n - 1) * (4 + 4000), "every event is in the segment");
            c.stop_with("test: done".into());
        })
        .unwrap()
        .join()
        .unwrap();
}
