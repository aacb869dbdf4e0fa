//! The conformance suite every `ChunkStore` backend must pass, run by each backend's tests
//! (the filesystem always; HDFS when a cluster is configured). Each check works under its
//! own `prefix`, so runs can share a store.

use crate::{ChunkError, ChunkStore};
use bytes::Bytes;

fn fail(what: &str, detail: impl std::fmt::Debug) -> String {
    format!("{what}: {detail:?}")
}

macro_rules! check {
    ($cond:expr, $what:expr) => {
        if !$cond {
            return Err(format!("check failed: {}", $what));
        }
    };
}

/// Runs every check; returns the first failure.
pub async fn run<S: ChunkStore>(store: &S, prefix: &str) -> Result<(), String> {
    let name = |n: &str| format!("{prefix}/seg-0/{n}");
    let a = name("0.1.chunk");

    // Create is exclusive.
    check!(!store.exists(&a).await.map_err(|e| fail("exists", e))?, "a new name does not exist");
    store.create(&a).await.map_err(|e| fail("create", e))?;
    check!(store.exists(&a).await.map_err(|e| fail("exists", e))?, "created chunk exists");
    check!(
        matches!(store.create(&a).await, Err(ChunkError::AlreadyExists(_))),
        "second create fails with AlreadyExists"
    );
    check!(store.size(&a).await == Ok(0), "new chunk is empty");

    // Appends go exactly at the end.
    store.append(&a, 0, Bytes::from_static(b"hello ")).await.map_err(|e| fail("append", e))?;
    store.append(&a, 6, Bytes::from_static(b"world")).await.map_err(|e| fail("append", e))?;
    check!(store.size(&a).await == Ok(11), "size after appends");
    check!(
        matches!(store.append(&a, 3, Bytes::from_static(b"x")).await, Err(ChunkError::Fenced { .. })),
        "append before the end is fenced"
    );
    check!(
        matches!(store.append(&a, 20, Bytes::from_static(b"x")).await, Err(ChunkError::Fenced { .. })),
        "append past the end is fenced"
    );
    check!(store.size(&a).await == Ok(11), "a refused append changes nothing");

    // Reads.
    check!(
        store.read(&a, 0, 100).await.map_err(|e| fail("read", e))? == Bytes::from_static(b"hello world"),
        "read all"
    );
    check!(store.read(&a, 6, 3).await.map_err(|e| fail("read", e))? == Bytes::from_static(b"wor"), "read a range");
    check!(store.read(&a, 11, 10).await.map_err(|e| fail("read", e))?.is_empty(), "read at the end is empty");
    // The mover reads a chunk's sums file, which may not exist.
    check!(
        matches!(store.read(&name("none.chunk.sum"), 0, 100).await, Err(ChunkError::NotFound(_))),
        "a read of a missing name fails with NotFound"
    );

    // A larger chunk in pieces.
    let big = name("11.1.chunk");
    store.create(&big).await.map_err(|e| fail("create", e))?;
    let piece: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    for k in 0..4u64 {
        store.append(&big, k << 20, Bytes::from(piece.clone())).await.map_err(|e| fail("append big", e))?;
    }
    let back = store.read(&big, (3 << 20) + 17, 1000).await.map_err(|e| fail("read big", e))?;
    check!(back[..] == piece[17..1017], "big chunk bytes");
    // Every byte of every piece, wherever a store splits its writes.
    for k in 0..4u64 {
        let back = store.read(&big, k << 20, 1 << 20).await.map_err(|e| fail("read big", e))?;
        check!(back[..] == piece[..], format!("big chunk piece {k}"));
    }

    // Seal.
    check!(store.is_sealed(&a).await == Ok(false), "not sealed yet");
    store.seal(&a).await.map_err(|e| fail("seal", e))?;
    check!(store.is_sealed(&a).await == Ok(true), "sealed");
    check!(
        matches!(store.append(&a, 11, Bytes::from_static(b"!")).await, Err(ChunkError::Fenced { .. })),
        "append to a sealed chunk is fenced"
    );
    check!(
        store.read(&a, 0, 5).await.map_err(|e| fail("read sealed", e))? == Bytes::from_static(b"hello"),
        "sealed chunk readable"
    );

    // List by prefix, sorted; other prefixes excluded.
    let other = format!("{prefix}-other/seg-0/0.1.chunk");
    store.create(&other).await.map_err(|e| fail("create other", e))?;
    let listed = store.list(&format!("{prefix}/")).await.map_err(|e| fail("list", e))?;
    check!(listed == vec![a.clone(), big.clone()], format!("list gives {listed:?}"));
    check!(store.list(&name("1")).await.map_err(|e| fail("list", e))? == vec![big.clone()], "list by partial name");

    // Missing chunks and bad names.
    let missing = name("missing.chunk");
    check!(matches!(store.read(&missing, 0, 1).await, Err(ChunkError::NotFound(_))), "read missing");
    check!(matches!(store.append(&missing, 0, Bytes::new()).await, Err(ChunkError::NotFound(_))), "append missing");
    check!(matches!(store.size(&missing).await, Err(ChunkError::NotFound(_))), "size missing");
    check!(matches!(store.delete(&missing).await, Err(ChunkError::NotFound(_))), "delete missing");
    for bad in ["", "../escape", "a//b", "a/./b", "a b", "/abs"] {
        check!(matches!(store.create(bad).await, Err(ChunkError::InvalidName(_))), format!("invalid name {bad:?}"));
    }

    // Delete.
    store.delete(&big).await.map_err(|e| fail("delete", e))?;
    check!(!store.exists(&big).await.map_err(|e| fail("exists", e))?, "deleted chunk is gone");
    store.delete(&other).await.map_err(|e| fail("delete other", e))?;
    check!(
        store.list(&format!("{prefix}/")).await.map_err(|e| fail("list", e))? == vec![a.clone()],
        "list after delete"
    );

    // Concurrent exclusive creates: exactly one wins.
    let contested = name("contested.chunk");
    let results = futures::future::join_all((0..8).map(|_| store.create(&contested))).await;
    check!(results.iter().filter(|r| r.is_ok()).count() == 1, "one of eight concurrent creates wins");
    check!(
        results.iter().all(|r| r.is_ok() || matches!(r, Err(ChunkError::AlreadyExists(_)))),
        "the others see AlreadyExists"
    );
    Ok(())
}
