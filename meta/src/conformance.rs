//! The conformance suite every `MetaStore` backend passes (embedded and etcd), so the
//! controller behaves the same in standalone and cluster mode. Each run works under its own
//! key prefix.

use crate::store::{MetaError, MetaStore, Versioned};

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
