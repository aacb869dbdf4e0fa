//! Two log flushes in flight per container (`IoPacer::with_flush_depth(2)`, real glommio
//! I/O): writers keep appending in small bursts while flushes are written, so flushes begin
//! beside the one in flight (records in blocks of their own, after zeros) across log file
//! rolls; every append is answered in order at its offset, reads served while the writes go
//! on take the records on both sides of the zeros, and after a reopen (recovery scans the
//! files) every event reads back in order.

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
const WRITERS: u64 = 4;
const PER_WRITER: u64 = 1500;

async fn open(dir: &Path) -> Rc<Container> {
    // Files of 1 MiB: the ~6 MB written roll through several.
    let pacer = IoPacer::new(0, Duration::ZERO).with_flush_depth(2);
    Container::open(core_cfg(1, 1 << 20), dir.to_path_buf(), Rc::new(pacer), None).await.unwrap()
}

fn payload(w: u64, n: u64) -> String {
    let mut p = format!("{w}:{n}:");
    p.push_str(&"x".repeat(700 + (n as usize * 37) % 400));
    p
}

/// Reads the whole segment and returns its events as (writer, number), in order.
async fn read_events(c: &Rc<Container>) -> Vec<(u64, u64)> {
    let bytes = read_segment(c, SEGMENT).await;
    let (mut buf, mut out) = (&bytes[..], Vec::new());
    while !buf.is_empty() {
        let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        let text = std::str::from_utf8(&buf[4..4 + n]).unwrap();
        let mut f = text.split(':');
        let (w, k): (u64, u64) = (f.next().unwrap().parse().unwrap(), f.next().unwrap().parse().unwrap());
        assert_eq!(text, payload(w, k));
        out.push((w, k));
        buf = &buf[4 + n..];
    }
    out
}

#[test]
fn flushes_begun_beside_others_keep_every_append_in_order_across_a_reopen() {
    let guard = Dir::new("two-in-flight");
    let root = guard.0.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            first_open(&root).await;
            let dir = root.join("c");
            let c = open(&dir).await;
            c.submit(Request::Create { name: SEGMENT.into() }).unwrap().await.unwrap();
            let mut tasks = Vec::new();
            for w in 0..WRITERS {
                let c = c.clone();
                tasks.push(glommio::spawn_local(async move {
                    // Bursts of 1 to 4 appends, a short pause between: many land while a
                    // flush is being written. Each answer is checked in order.
                    let mut answers = Vec::new();
                    let mut n = 1;
                    while n <= PER_WRITER {
                        for _ in 0..(n % 4 + 1).min(PER_WRITER + 1 - n) {
                            let mut data = Vec::new();
                            encode_event(&mut data, payload(w, n).as_bytes());
                            let req = Request::Append {
                                name: SEGMENT.into(),
                                writer: u128::from(w + 1),
                                first_event_number: n,
                                event_count: 1,
                                expected_offset: None,
                                data: Bytes::from(data),
                            };
                            answers.push(c.submit(req).unwrap());
                            n += 1;
                        }
                        glommio::timer::sleep(Duration::from_micros(30)).await;
                        if answers.len() > 64 {
                            for a in answers.drain(..32) {
                                assert!(matches!(a.await, Ok(OpResult::Appended { duplicate: false, .. })));
                            }
                        }
                    }
                    for a in answers {
                        assert!(matches!(a.await, Ok(OpResult::Appended { duplicate: false, .. })));
                    }
                }));
            }
            // Reads while the writes go on span the zeros before records of their own blocks.
            let reader = {
                let c = c.clone();
                glommio::spawn_local(async move {
                    let mut reads = 0;
                    while c.status(SEGMENT).unwrap().length < 4 << 20 {
                        read_events(&c).await;
                        reads += 1;
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                    reads
                })
            };
            for t in tasks {
                t.await;
            }
            let reads = reader.await;
            let beside = c.flushes_begun_beside();
            eprintln!("{beside} flushes begun beside another, {reads} reads during the writes");
            assert!(beside >= 50, "only {beside} flushes began beside another");
            assert!(reads >= 5, "only {reads} reads during the writes");
            let check = |events: &[(u64, u64)]| {
                assert_eq!(events.len() as u64, WRITERS * PER_WRITER);
                let mut next = vec![1u64; WRITERS as usize];
                for &(w, n) in events {
                    assert_eq!(n, next[w as usize], "writer {w}: event {n} out of order");
                    next[w as usize] += 1;
                }
            };
            check(&read_events(&c).await);
            let files = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
                .count();
            assert!(files >= 4, "the log rolled through {files} files");
            let len = c.status(SEGMENT).unwrap().length;
            c.stop_with("test: closing".into());
            drop(c);
            // Recovery scans every record after the zeros; nothing is cut.
            let c = open(&dir).await;
            assert_eq!(c.status(SEGMENT).unwrap().length, len);
            check(&read_events(&c).await);
            c.stop_with("test: done".into());
        })
        .unwrap()
        .join()
        .unwrap();
}
