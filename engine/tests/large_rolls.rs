//! A flush that rolls into a new log file and fills more than half of it (a large append
//! into small files, or a large checkpoint) prepares the next file before it is complete.
//! Each file's records must still carry the tag its header names: a build that chose the
//! tags again at that moment wrote records the scrub called damaged and recovery would not
//! take for the file's own (the acknowledged appends after them lost at a restart). Real
//! glommio I/O: 200 segments (a checkpoint of some KiB), appends of 500 KiB (about the
//! largest a 1 MiB file takes) and of 20 KiB, a scrub, a reopen.

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_engine::container::core::{OpResult, Request};
use sluice_engine::container::io::{Container, IoPacer};
use sluice_net::event::encode_event;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

// This test has no tier-2: the shared helper for one goes unused here.
#[allow(dead_code)]
mod common;
use common::{Dir, core_cfg, first_open, read_segment};

const SEGMENT: &str = "s/t/0";
const EVENTS: u64 = 16;

async fn open(dir: &Path) -> Rc<Container> {
    let pacer = IoPacer::new(0, Duration::ZERO);
    Container::open(core_cfg(1, 1 << 20), dir.to_path_buf(), Rc::new(pacer), None).await.unwrap()
}

/// Event `n`: 500 KiB every other one (with the checkpoint, a roll past half a file), else
/// 20 KiB.
fn event(n: u64) -> Vec<u8> {
    let len = if n.is_multiple_of(2) { 500 << 10 } else { 20 << 10 };
    (0..len).map(|i| (i as u64 * 7 + n) as u8).collect()
}

#[test]
fn rolls_that_fill_half_a_file_keep_every_file_s_tag() {
    let guard = Dir::new("large-rolls");
    let root = guard.0.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let dir = root.join("c");
            let c = open(&dir).await;
            c.submit(Request::Create { name: SEGMENT.into() }).unwrap().await.unwrap();
            // Segments enough for a checkpoint of some KiB in each file.
            for n in 1..=200 {
                let name = format!("s/t/{n}");
                c.submit(Request::Create { name }).unwrap().await.unwrap();
            }
            let mut expected = Vec::new();
            for n in 0..EVENTS {
                let mut data = Vec::new();
                encode_event(&mut data, &event(n));
                expected.extend_from_slice(&data);
                let req = Request::Append {
                    name: SEGMENT.into(),
                    writer: 1,
                    first_event_number: n + 1,
                    event_count: 1,
                    expected_offset: None,
                    data: Bytes::from(data),
                };
                // One at a time: each append its own flush, every other one a roll.
                let answer = c.submit(req).unwrap().await;
                assert!(matches!(answer, Ok(OpResult::Appended { duplicate: false, .. })), "{answer:?}");
            }
            let files = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
                .count();
            assert!(files >= 6, "the log rolled through {files} files");
            let scrub = c.scrub(0).await;
            assert!(scrub.damage.is_empty(), "the scrub found: {:?}", scrub.damage);
            assert_eq!(read_segment(&c, SEGMENT).await, expected);
            c.stop_with("test: closing".into());
            drop(c);
            // Recovery takes every record for its file's own: nothing is cut.
            let c = open(&dir).await;
            assert_eq!(read_segment(&c, SEGMENT).await, expected, "every acknowledged append after a reopen");
            c.stop_with("test: done".into());
        })
        .unwrap()
        .join()
        .unwrap();
}
