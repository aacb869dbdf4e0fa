//! etcd backend of `MetaStore` (etcd-client). etcd-client runs on tokio, so the store owns
//! a small tokio runtime on its own thread; calls are spawned onto it and answered through
//! futures oneshots, so shard executors can await them without blocking.
//!
//! Every key lives under `/sluice/<cluster>/`. The `MetaStore` version of a key is etcd's
//! per-key version (1 on creation, +1 per change, 0 when absent), and every conditional
//! change is one etcd transaction comparing it.

use crate::store::{LeaseId, MetaError, MetaStore, MetaTxn, Versioned, Watch, WatchEvent};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::channel::oneshot;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: Arc<String>,
    runtime: Arc<OwnedRuntime>,
}

/// The store's tokio runtime. Shut down in the background when the last handle goes, so a
/// store may be dropped anywhere, even inside another runtime.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Cancels the watch task when the `Watch` is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The key's version from the transaction's get (0: absent).
fn read_version(resp: &etcd_client::TxnResponse) -> u64 {
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.version() as u64)),
            _ => None,
        })
        .unwrap_or(0)
}

fn err(e: etcd_client::Error) -> MetaError {
    use etcd_client::Error::{GRpcStatus, IoError, TransportError};
    let unavailable = match &e {
        GRpcStatus(status) => {
            let (code, message) = (status.code(), status.message());
            // etcd refuses every change once its database reached its quota (the NOSPACE
            // alarm, gRPC `ResourceExhausted`, "mvcc: database space exceeded"), until an
            // operator compacts, defragments and disarms the alarm: for clients, a full disk.
            if code == tonic::Code::ResourceExhausted || message.contains("database space exceeded") {
                return MetaError::NoSpace(format!(
                    "etcd: {message}: its database reached its quota (--quota-backend-bytes); compact and \
                     defragment it, then disarm the NOSPACE alarm (etcdctl alarm disarm)"
                ));
            }
            if message.contains("request is too large") {
                return MetaError::TooLarge(format!(
                    "etcd: {message}: a change reached etcd's request size limit (--max-request-bytes, 1.5 MiB \
                     by default); a scaling writes the stream's record and its new epoch together, both as \
                     large as the stream is wide"
                ));
            }
            matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
                || message.contains("transport error")
        }
        TransportError(_) | IoError(_) => true,
        _ => false,
    };
    // etcd down, restarting or partitioned away: transient, worth retrying.
    if unavailable { MetaError::Unavailable(format!("etcd: {e}")) } else { MetaError::Io(format!("etcd: {e}")) }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`) for cluster `cluster`.
    pub fn connect(endpoints: &[String], cluster: &str) -> Result<Self, MetaError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-etcd")
            .enable_all()
            .build()
            .map_err(|e| MetaError::Io(e.to_string()))?;
        let eps = endpoints.to_vec();
        // Connect on a plain thread: the caller may itself be inside a tokio runtime.
        let client = std::thread::scope(|s| {
            s.spawn(|| {
                runtime.block_on(async move {
                    // Every request is bounded, so a vanished etcd gives errors, not hangs.
                    let opts = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(std::time::Duration::from_secs(5))
                        .with_timeout(std::time::Duration::from_secs(10));
                    Client::connect(eps, Some(opts)).await
                })
            })
            .join()
        })
        .map_err(|_| MetaError::Io("etcd connect thread panicked".into()))?;
        let client = client.map_err(|e| MetaError::Io(format!("connecting to etcd at {endpoints:?}: {e}")))?;
        Ok(Self {
            client,
            prefix: Arc::new(format!("/sluice/{cluster}/")),
            runtime: Arc::new(OwnedRuntime(Some(runtime))),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `f` on the store's runtime and waits for it from any executor.
    async fn run<T: Send + 'static, F>(&self, f: impl FnOnce(Client) -> F + Send + 'static) -> Result<T, MetaError>
    where
        F: Future<Output = Result<T, MetaError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let client = self.client.clone();
        self.runtime.get().spawn(async move {
            let _ = tx.send(f(client).await);
        });
        rx.await.map_err(|_| MetaError::Closed)?
    }

    /// A conditional put: `expected` None means unconditional. Returns the new version or
    /// the actual version on conflict.
    async fn put_if(&self, key: &str, expected: Option<u64>, value: Vec<u8>) -> Result<Result<u64, u64>, MetaError> {
        let full = self.key(key);
        self.run(move |mut c| async move {
            let compares = match expected {
                Some(v) => vec![Compare::version(full.clone(), CompareOp::Equal, v as i64)],
                None => vec![],
            };
            let txn = Txn::new()
                .when(compares)
                .and_then(vec![TxnOp::put(full.clone(), value, None), TxnOp::get(full.clone(), None)])
                .or_else(vec![TxnOp::get(full.clone(), None)]);
            let resp = c.txn(txn).await.map_err(err)?;
            let version = read_version(&resp);
            Ok(if resp.succeeded() { Ok(version) } else { Err(version) })
        })
        .await
    }
}

/// Keys (without the store's prefix, `strip` bytes) and values of a range answer.
fn key_values(kvs: &[etcd_client::KeyValue], strip: usize) -> Result<Vec<(String, Versioned)>, MetaError> {
    kvs.iter()
        .map(|kv| {
            let k = std::str::from_utf8(kv.key()).map_err(|_| MetaError::Corrupt("non-UTF-8 key".into()))?;
            Ok((k[strip..].to_string(), Versioned { value: kv.value().to_vec(), version: kv.version() as u64 }))
        })
        .collect()
}

/// The end of the key range of every key starting with `prefix` (etcd's convention: the
/// prefix with its last byte below 0xff incremented; `[0]`, the end of the key space, if
/// there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, MetaError> {
        let full = self.key(key);
        self.run(move |mut c| async move {
            let resp = c.get(full, None).await.map_err(err)?;
            Ok(resp.kvs().first().map(|kv| Versioned { value: kv.value().to_vec(), version: kv.version() as u64 }))
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, MetaError> {
        match self.put_if(key, None, value).await? {
            Ok(v) => Ok(v),
            Err(actual) => Err(MetaError::Conflict { key: key.into(), expected: 0, actual }),
        }
    }

    async fn compare_and_swap(&self, key: &str, expected: u64, value: Vec<u8>) -> Result<u64, MetaError> {
        self.put_if(key, Some(expected), value).await?.map_err(|actual| MetaError::Conflict {
            key: key.into(),
            expected,
            actual,
        })
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, MetaError> {
        let full = self.key(key);
        let key = key.to_string();
        self.run(move |mut c| async move {
            let mut compares = vec![];
            if let Some(v) = expected {
                compares.push(Compare::version(full.clone(), CompareOp::Equal, v as i64));
            }
            let txn = Txn::new()
                .when(compares)
                .and_then(vec![TxnOp::delete(full.clone(), None)])
                .or_else(vec![TxnOp::get(full.clone(), None)]);
            let resp = c.txn(txn).await.map_err(err)?;
            if resp.succeeded() {
                let deleted =
                    resp.op_responses().into_iter().any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0));
                return Ok(deleted);
            }
            Err(MetaError::Conflict { key, expected: expected.unwrap_or(0), actual: read_version(&resp) })
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, MetaError> {
        let full = self.key(prefix);
        let strip = self.prefix.len();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        // Created on the runtime; the task then forwards events until the Watch is dropped.
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), MetaError>>();
        let mut client = self.client.clone();
        let task = self.runtime.get().spawn(async move {
            let mut stream = match client.watch(full, Some(WatchOptions::new().with_prefix())).await {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(err(e)));
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Ok(k) = std::str::from_utf8(kv.key()) else { continue };
                            let value = (ev.event_type() == EventType::Put).then(|| kv.value().to_vec());
                            let we = WatchEvent { key: k[strip..].to_string(), value, version: kv.version() as u64 };
                            if tx.unbounded_send(Ok(we)).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.unbounded_send(Err(err(e)));
                        return;
                    }
                }
            }
        });
        ready_rx.await.map_err(|_| MetaError::Closed)??;
        Ok(Watch::new(rx, Some(Box::new(AbortOnDrop(task)))))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        self.run(move |mut c| async move { Ok(c.lease_grant(secs, None).await.map_err(err)?.id()) }).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        let lease_err = move |e: etcd_client::Error| {
            if e.to_string().contains("not found") { MetaError::LeaseNotFound(lease) } else { err(e) }
        };
        self.run(move |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.map_err(lease_err)?;
            keeper.keep_alive().await.map_err(lease_err)?;
            match stream.message().await.map_err(lease_err)? {
                Some(resp) if resp.ttl() > 0 => Ok(()),
                _ => Err(MetaError::LeaseNotFound(lease)),
            }
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.run(move |mut c| async move {
            match c.lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("not found") => Err(MetaError::LeaseNotFound(lease)),
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<u64, MetaError> {
        let full = self.key(key);
        self.run(move |mut c| async move {
            let txn = Txn::new().and_then(vec![
                TxnOp::put(full.clone(), value, Some(PutOptions::new().with_lease(lease))),
                TxnOp::get(full.clone(), None),
            ]);
            match c.txn(txn).await {
                Ok(resp) => Ok(read_version(&resp)),
                Err(e) if e.to_string().contains("not found") => Err(MetaError::LeaseNotFound(lease)),
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    async fn txn(&self, txn: MetaTxn) -> Result<(), MetaError> {
        let lease = txn.ops.iter().find_map(|op| match op {
            crate::store::TxnOp::Put { lease, .. } => *lease,
            _ => None,
        });
        let compares: Vec<(String, String, u64)> =
            txn.compares.iter().map(|(k, v)| (k.clone(), self.key(k), *v)).collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                crate::store::TxnOp::Put { key, value, lease } => {
                    TxnOp::put(self.key(&key), value, lease.map(|l| PutOptions::new().with_lease(l)))
                }
                crate::store::TxnOp::Delete { key } => TxnOp::delete(self.key(&key), None),
            })
            .collect();
        self.run(move |mut c| async move {
            let t = Txn::new()
                .when(
                    compares
                        .iter()
                        .map(|(_, full, v)| Compare::version(full.clone(), CompareOp::Equal, *v as i64))
                        .collect::<Vec<_>>(),
                )
                .and_then(ops)
                .or_else(compares.iter().map(|(_, full, _)| TxnOp::get(full.clone(), None)).collect::<Vec<_>>());
            let resp = match c.txn(t).await {
                Ok(r) => r,
                Err(e) if e.to_string().contains("not found") && lease.is_some() => {
                    return Err(MetaError::LeaseNotFound(lease.unwrap_or_default()));
                }
                Err(e) => return Err(err(e)),
            };
            if resp.succeeded() {
                return Ok(());
            }
            let actual: Vec<u64> = resp
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().map_or(0, |kv| kv.version() as u64),
                    _ => 0,
                })
                .collect();
            let (key, expected, actual) = compares
                .iter()
                .zip(actual)
                .find(|((_, _, v), a)| v != a)
                .map(|((k, _, v), a)| (k.clone(), *v, a))
                .unwrap_or_else(|| (compares.first().map(|c| c.0.clone()).unwrap_or_default(), 0, 0));
            Err(MetaError::Conflict { key, expected, actual })
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetaError> {
        let full = self.key(prefix);
        let strip = self.prefix.len();
        self.run(move |mut c| async move {
            let resp = c.get(full, Some(GetOptions::new().with_prefix())).await.map_err(err)?;
            key_values(resp.kvs(), strip)
        })
        .await
    }

    async fn range_page(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<(String, Versioned)>, MetaError> {
        let full = self.key(prefix);
        let end = prefix_end(full.as_bytes());
        // The first key after `after`: `after` followed by the smallest byte.
        let start = if after > prefix { format!("{}\0", self.key(after)) } else { full };
        let strip = self.prefix.len();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |mut c| async move {
            let resp = c.get(start, Some(GetOptions::new().with_range(end).with_limit(limit))).await.map_err(err)?;
            key_values(resp.kvs(), strip)
        })
        .await
    }
}
