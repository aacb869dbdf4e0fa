//! The conformance suite every `MetaStore` backend passes (embedded and etcd), so the
//! controller behaves the same in standalone and cluster mode. Each run works under its own
//! key prefix.

use crate::store::{MetaError, MetaStore, MetaTxn, Versioned, Watch, WatchEvent};
use std::time::{Duration, Instant};

macro_rules! check {
    ($cond:expr, $what:expr) => {
        if !$cond {
            return Err(format!("check failed: {}", $what));
        }
    };
}

fn e(what: &str, err: MetaError) -> String {
    format!("{what}: {err}")
}

/// Runs every check sequentially, then `tasks` concurrent compare-and-swap incrementers
/// (spawned by `spawn`, K increments each) and checks that no update was lost.
pub async fn run<S: MetaStore>(store: &S, prefix: &str) -> Result<(), String> {
    let k = |n: &str| format!("{prefix}/{n}");
    check!(store.get(&k("a")).await.map_err(|x| e("get", x))?.is_none(), "absent key");
    check!(store.compare_and_swap(&k("a"), 0, b"1".to_vec()).await == Ok(1), "create with version 0 gives version 1");
    check!(
        matches!(store.compare_and_swap(&k("a"), 0, b"x".to_vec()).await, Err(MetaError::Conflict { actual: 1, .. })),
        "create over an existing key conflicts"
    );
    check!(store.compare_and_swap(&k("a"), 1, b"2".to_vec()).await == Ok(2), "swap at the right version");
    check!(
        matches!(
            store.compare_and_swap(&k("a"), 1, b"x".to_vec()).await,
            Err(MetaError::Conflict { expected: 1, actual: 2, .. })
        ),
        "swap at a stale version conflicts"
    );
    check!(store.get(&k("a")).await == Ok(Some(Versioned { value: b"2".to_vec(), version: 2 })), "value and version");
    check!(store.put(&k("a"), b"3".to_vec()).await == Ok(3), "unconditional put bumps the version");
    check!(store.put(&k("b"), vec![0, 255]).await == Ok(1), "put creates");
    check!(store.put(&k("c/d"), vec![]).await == Ok(1), "empty value");
    check!(store.put(&format!("{prefix}x/other"), vec![1]).await == Ok(1), "a key outside the prefix");

    let r = store.range(&format!("{prefix}/")).await.map_err(|x| e("range", x))?;
    let keys: Vec<&str> = r.iter().map(|(key, _)| key.as_str()).collect();
    check!(keys == vec![k("a").as_str(), k("b").as_str(), k("c/d").as_str()], format!("range in key order: {keys:?}"));
    check!(r[1].1 == Versioned { value: vec![0, 255], version: 1 }, "range carries values and versions");
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = store.range_page(&format!("{prefix}/"), &after, 2).await.map_err(|x| e("range_page", x))?;
        let more = page.len() == 2;
        if let Some((last, _)) = page.last() {
            after = last.clone();
        }
        paged.extend(page);
        if !more {
            break;
        }
    }
    check!(paged == r, format!("pages of 2 add up to the range: {paged:?}"));
    let rest = store.range_page(&format!("{prefix}/"), &k("a"), 10).await.map_err(|x| e("range_page", x))?;
    check!(rest.len() == 2 && rest[0].0 == k("b"), "a page starts after its key");

    check!(
        matches!(store.delete(&k("a"), Some(1)).await, Err(MetaError::Conflict { actual: 3, .. })),
        "delete at a stale version conflicts"
    );
    check!(store.delete(&k("a"), Some(3)).await == Ok(true), "delete at the right version");
    check!(store.delete(&k("a"), None).await == Ok(false), "delete of an absent key");
    check!(store.get(&k("a")).await == Ok(None), "deleted");
    check!(store.compare_and_swap(&k("a"), 0, b"again".to_vec()).await == Ok(1), "a recreated key starts at version 1");
    check!(store.delete(&k("b"), None).await == Ok(true), "unconditional delete");
    check!(store.delete(&format!("{prefix}x/other"), None).await == Ok(true), "cleanup");

    // Transactions: all or nothing.
    let t = MetaTxn::new().compare(k("t1"), 0).compare(k("a"), 1).put(k("t1"), b"x".to_vec()).delete(k("a"));
    check!(store.txn(t).await.is_ok(), "a transaction whose compares hold");
    check!(store.get(&k("t1")).await.map_err(|x| e("get", x))?.map(|v| v.version) == Some(1), "txn put");
    check!(store.get(&k("a")).await == Ok(None), "txn delete");
    let t = MetaTxn::new().compare(k("t1"), 1).compare(k("t2"), 5).put(k("t1"), b"y".to_vec()).put(k("t2"), vec![]);
    check!(
        matches!(store.txn(t).await, Err(MetaError::Conflict { ref key, expected: 5, actual: 0 }) if *key == k("t2")),
        "a failed compare names its key"
    );
    check!(
        store.get(&k("t1")).await == Ok(Some(Versioned { value: b"x".to_vec(), version: 1 })),
        "nothing of a failed transaction applies"
    );
    let lease = store.grant_lease(Duration::from_secs(30)).await.map_err(|x| e("grant", x))?;
    let t = MetaTxn::new().compare(k("t1"), 1).put(k("t1"), b"z".to_vec()).put_leased(k("t3"), vec![7], lease);
    check!(store.txn(t).await.is_ok(), "a transaction with a leased put");
    store.revoke_lease(lease).await.map_err(|x| e("revoke", x))?;
    check!(store.get(&k("t3")).await == Ok(None), "a leased key of a transaction goes with its lease");
    check!(store.get(&k("t1")).await.map_err(|x| e("get", x))?.map(|v| v.version) == Some(2), "the rest stays");
    let t = MetaTxn::new().put_leased(k("t4"), vec![], lease).put(k("t5"), vec![]);
    check!(matches!(store.txn(t).await, Err(MetaError::LeaseNotFound(_))), "a put under a revoked lease");
    check!(store.get(&k("t5")).await == Ok(None), "nothing applies with a dead lease");
    for key in ["t1", "a", "c/d"] {
        store.delete(&k(key), None).await.map_err(|x| e("delete", x))?;
    }
    Ok(())
}

/// `tasks` updaters each increment a counter `k` times by compare-and-swap; returns the
/// final value (must be `tasks * k`).
pub async fn concurrent_increments<S: MetaStore>(store: &S, key: &str, tasks: u64, k: u64) -> Result<u64, String> {
    let one = |store: S, key: String| async move {
        for _ in 0..k {
            loop {
                let cur = store.get(&key).await.map_err(|x| e("get", x))?;
                let (value, version) =
                    cur.map_or((0u64, 0), |v| (u64::from_le_bytes(v.value.try_into().unwrap_or([0; 8])), v.version));
                match store.compare_and_swap(&key, version, (value + 1).to_le_bytes().to_vec()).await {
                    Ok(_) => break,
                    Err(MetaError::Conflict { .. }) => continue,
                    Err(x) => return Err(e("cas", x)),
                }
            }
        }
        Ok::<(), String>(())
    };
    let results = futures::future::join_all((0..tasks).map(|_| one(store.clone(), key.to_string()))).await;
    for r in results {
        r?;
    }
    let v = store.get(key).await.map_err(|x| e("get", x))?.ok_or("counter missing")?;
    Ok(u64::from_le_bytes(v.value.try_into().map_err(|_| "bad counter")?))
}

async fn next_event(w: &mut Watch, timeout: Duration) -> Result<WatchEvent, String> {
    let deadline = Instant::now() + timeout;
    let next = w.next();
    futures::pin_mut!(next);
    // Poll with a bounded wait (executor-agnostic: a thread sleeps for the deadline).
    let timer = async {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            let _ = tx.send(());
        });
        let _ = rx.await;
    };
    futures::pin_mut!(timer);
    match futures::future::select(next, timer).await {
        futures::future::Either::Left((Some(Ok(ev)), _)) => Ok(ev),
        futures::future::Either::Left((Some(Err(x)), _)) => Err(e("watch", x)),
        futures::future::Either::Left((None, _)) => Err("watch closed".into()),
        futures::future::Either::Right(_) => Err("no watch event in time".into()),
    }
}

/// Watches and leases: a watch sees puts and deletes under its prefix in order; a key put
/// under a lease goes away when the lease is revoked or expires, and watchers see it go.
pub async fn run_watch_and_leases<S: MetaStore>(store: &S, prefix: &str) -> Result<(), String> {
    let k = |n: &str| format!("{prefix}/{n}");
    let t = Duration::from_secs(10);
    let mut w = store.watch(&format!("{prefix}/")).await.map_err(|x| e("watch", x))?;
    store.put(&format!("{prefix}-outside"), vec![9]).await.map_err(|x| e("put", x))?;
    store.put(&k("w1"), b"a".to_vec()).await.map_err(|x| e("put", x))?;
    store.compare_and_swap(&k("w1"), 1, b"b".to_vec()).await.map_err(|x| e("cas", x))?;
    store.delete(&k("w1"), None).await.map_err(|x| e("delete", x))?;
    let evs = [next_event(&mut w, t).await?, next_event(&mut w, t).await?, next_event(&mut w, t).await?];
    check!(
        evs[0] == WatchEvent { key: k("w1"), value: Some(b"a".to_vec()), version: 1 },
        format!("first event {:?}", evs[0])
    );
    check!(
        evs[1] == WatchEvent { key: k("w1"), value: Some(b"b".to_vec()), version: 2 },
        format!("second event {:?}", evs[1])
    );
    check!(evs[2].key == k("w1") && evs[2].value.is_none(), format!("delete event {:?}", evs[2]));

    // Revoking a lease deletes its keys.
    let lease = store.grant_lease(Duration::from_secs(30)).await.map_err(|x| e("grant", x))?;
    check!(store.put_with_lease(&k("node-1"), b"up".to_vec(), lease).await == Ok(1), "leased put");
    check!(next_event(&mut w, t).await?.value == Some(b"up".to_vec()), "watch sees the leased put");
    store.keep_alive(lease).await.map_err(|x| e("keep alive", x))?;
    store.revoke_lease(lease).await.map_err(|x| e("revoke", x))?;
    let gone = next_event(&mut w, t).await?;
    check!(gone.key == k("node-1") && gone.value.is_none(), format!("watch sees the revoked key go: {gone:?}"));
    check!(store.get(&k("node-1")).await == Ok(None), "revoked key is gone");
    let ka = store.keep_alive(lease).await;
    check!(matches!(ka, Err(MetaError::LeaseNotFound(_))), format!("keep-alive of a revoked lease: {ka:?}"));
    check!(
        matches!(store.put_with_lease(&k("x"), vec![], lease).await, Err(MetaError::LeaseNotFound(_))),
        "put under a revoked lease"
    );

    // An expired lease deletes its keys too; a kept-alive one keeps them.
    let short = store.grant_lease(Duration::from_secs(2)).await.map_err(|x| e("grant", x))?;
    let kept = store.grant_lease(Duration::from_secs(2)).await.map_err(|x| e("grant", x))?;
    store.put_with_lease(&k("node-2"), b"up".to_vec(), short).await.map_err(|x| e("leased put", x))?;
    store.put_with_lease(&k("node-3"), b"up".to_vec(), kept).await.map_err(|x| e("leased put", x))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        store.keep_alive(kept).await.map_err(|x| e("keep alive", x))?;
        if store.get(&k("node-2")).await.map_err(|x| e("get", x))?.is_none() {
            break;
        }
        check!(Instant::now() < deadline, "an unrenewed lease expired within 15 s");
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let _ = tx.send(());
        });
        let _ = rx.await;
    }
    check!(store.get(&k("node-3")).await.map_err(|x| e("get", x))?.is_some(), "a renewed lease keeps its key");
    store.revoke_lease(kept).await.map_err(|x| e("revoke", x))?;
    store.delete(&format!("{prefix}-outside"), None).await.map_err(|x| e("delete", x))?;
    Ok(())
}
