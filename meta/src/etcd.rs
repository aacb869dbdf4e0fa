//! etcd backend of `MetaStore` (etcd-client). etcd-client runs on tokio, so the store owns
//! a small tokio runtime on its own thread; calls are spawned onto it and answered through
//! futures oneshots, so shard executors can await them without blocking.
//!
//! Every key lives under `/sluice/<cluster>/`. The `MetaStore` version of a key is etcd's
//! per-key version (1 on creation, +1 per change, 0 when absent), and every conditional
//! change is one etcd transaction comparing it.

use crate::store::{MetaError, MetaStore, Versioned};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use futures::channel::oneshot;
use std::sync::Arc;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: Arc<String>,
    runtime: Arc<tokio::runtime::Runtime>,
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
    MetaError::Io(format!("etcd: {e}"))
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
        let client = runtime.block_on(async move {
            let opts = etcd_client::ConnectOptions::new().with_connect_timeout(std::time::Duration::from_secs(5));
            Client::connect(eps, Some(opts)).await
        });
        let client = client.map_err(|e| MetaError::Io(format!("connecting to etcd at {endpoints:?}: {e}")))?;
        Ok(Self { client, prefix: Arc::new(format!("/sluice/{cluster}/")), runtime: Arc::new(runtime) })
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
        self.runtime.spawn(async move {
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

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetaError> {
        let full = self.key(prefix);
        let strip = self.prefix.len();
        self.run(move |mut c| async move {
            let resp = c.get(full, Some(GetOptions::new().with_prefix())).await.map_err(err)?;
            resp.kvs()
                .iter()
                .map(|kv| {
                    let k = std::str::from_utf8(kv.key()).map_err(|_| MetaError::Corrupt("non-UTF-8 key".into()))?;
                    Ok((k[strip..].to_string(), Versioned { value: kv.value().to_vec(), version: kv.version() as u64 }))
                })
                .collect()
        })
        .await
    }
}
