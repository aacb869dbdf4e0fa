//! Cluster membership: a node registers itself under a lease (`nodes/<id>`) and keeps the
//! lease alive from its own thread; when the node dies the key vanishes with the lease.
//! Works on any `MetaStore` (etcd in clusters; the embedded store for tests and tools).

use crate::store::{LeaseId, MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What a node publishes about itself.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    /// Client endpoints, one per shard.
    pub endpoints: Vec<String>,
    pub started_unix_ms: u64,
}

fn node_key(id: &str) -> String {
    format!("nodes/{id}")
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node id {0} is already registered by a live node")]
    NodeIdTaken(String),
    #[error("invalid node id: {0}")]
    InvalidNodeId(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// A live registration; dropping it stops the keep-alive (the key expires after the TTL),
/// `leave` removes it at once.
pub struct Registration<S: MetaStore> {
    store: S,
    lease: LeaseId,
    stop: Arc<AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// Registers `info` under a lease of `ttl`, renewed every third of it.
pub async fn register_node<S: MetaStore>(
    store: &S,
    info: &NodeInfo,
    ttl: Duration,
) -> Result<Registration<S>, ClusterError> {
    crate::names::validate("node", &info.node_id).map_err(ClusterError::InvalidNodeId)?;
    if store.get(&node_key(&info.node_id)).await?.is_some() {
        return Err(ClusterError::NodeIdTaken(info.node_id.clone()));
    }
    let lease = store.grant_lease(ttl).await?;
    let value = rkyv::to_bytes::<rkyv::rancor::Error>(info).expect("serializing node info").to_vec();
    store.put_with_lease(&node_key(&info.node_id), value, lease).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (store.clone(), stop.clone());
    let period = ttl / 3;
    let keeper = std::thread::Builder::new()
        .name("sluice-lease".into())
        .spawn(move || {
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(period);
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Err(e) = futures::executor::block_on(s.keep_alive(lease)) {
                    tracing::error!(error = %e, "node lease lost");
                    break;
                }
            }
        })
        .map_err(|e| MetaError::Io(e.to_string()))?;
    Ok(Registration { store: store.clone(), lease, stop, keeper: Some(keeper) })
}

impl<S: MetaStore> Registration<S> {
    /// Leaves the cluster now: the registration key is deleted with its lease.
    pub async fn leave(mut self) -> Result<(), MetaError> {
        self.stop_keeper();
        self.store.revoke_lease(self.lease).await
    }

    fn stop_keeper(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

impl<S: MetaStore> Drop for Registration<S> {
    fn drop(&mut self) {
        self.stop_keeper();
    }
}

/// The live nodes, by id.
pub async fn list_nodes<S: MetaStore>(store: &S) -> Result<Vec<NodeInfo>, MetaError> {
    store
        .range("nodes/")
        .await?
        .into_iter()
        .map(|(k, v)| {
            rkyv::from_bytes::<NodeInfo, rkyv::rancor::Error>(&v.value)
                .map_err(|e| MetaError::Corrupt(format!("{k}: {e}")))
        })
        .collect()
}
