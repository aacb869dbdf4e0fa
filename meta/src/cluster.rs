//! Cluster membership: a node registers itself under a lease (`nodes/<id>`) and keeps the
//! lease alive from its own thread; when the node dies the key vanishes with the lease.
//! The cluster's fixed settings (`cluster`: the container count and the segment placement,
//! set once when the first node creates the cluster) are checked by every node that joins.
//! Works on any `MetaStore` (etcd in clusters; the embedded store for tests and tools).

use crate::store::{LeaseId, MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::routing::Placement;
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
    /// Shutting down: handing its containers to other nodes, taking none.
    pub draining: bool,
    /// The etcd lease the node lives under (0 when not known), for operators and tests.
    pub lease: i64,
}

fn node_key(id: &str) -> String {
    format!("nodes/{id}")
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node id {0} is already registered by a live node (or its lease has not expired yet)")]
    NodeIdTaken(String),
    #[error("invalid node id: {0}")]
    InvalidNodeId(String),
    #[error(
        "cluster {cluster} was created with {have} containers, this node is configured for {want}; \
         start it with a shard count and --containers-per-core whose product is {have}"
    )]
    ContainerCountMismatch { cluster: String, have: u32, want: u32 },
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Settings fixed for the life of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Segment containers in the cluster (segments are placed over this count).
    pub containers: u32,
    pub created_unix_ms: u64,
    /// How segments are laid over the containers. Clusters created before placements were
    /// recorded are `Hashed`.
    pub placement: Placement,
}

/// The stored record: this archive, behind `PLACEMENT_MAGIC` and the placement byte (padded
/// to 8 bytes) in clusters that record a placement; bare in older ones.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct StoredClusterConfig {
    containers: u32,
    created_unix_ms: u64,
}

const PLACEMENT_MAGIC: &[u8; 4] = b"SCP\0";
const CLUSTER_KEY: &str = "cluster";

fn encode_config(c: &ClusterConfig) -> Vec<u8> {
    let stored = StoredClusterConfig { containers: c.containers, created_unix_ms: c.created_unix_ms };
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&stored).expect("serializing cluster config");
    let mut v = PLACEMENT_MAGIC.to_vec();
    v.extend_from_slice(&[c.placement.as_u8(), 0, 0, 0]);
    v.extend_from_slice(&archive);
    v
}

fn decode_config(bytes: &[u8]) -> Result<ClusterConfig, MetaError> {
    let (placement, archive) = match bytes.strip_prefix(PLACEMENT_MAGIC) {
        Some(rest) if rest.len() >= 4 => {
            let p = Placement::from_u8(rest[0])
                .ok_or_else(|| MetaError::Corrupt(format!("{CLUSTER_KEY}: unknown placement {}", rest[0])))?;
            (p, &rest[4..])
        }
        _ => (Placement::Hashed, bytes),
    };
    // The archive must be aligned to be checked.
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(archive);
    let s = decode_record!(StoredClusterConfig, CLUSTER_KEY, &aligned)?;
    Ok(ClusterConfig { containers: s.containers, created_unix_ms: s.created_unix_ms, placement })
}

/// The cluster's settings, if a node ever created it.
pub async fn cluster_config<S: MetaStore>(store: &S) -> Result<Option<ClusterConfig>, MetaError> {
    match store.get(CLUSTER_KEY).await? {
        None => Ok(None),
        Some(v) => decode_config(&v.value).map(Some),
    }
}

/// Creates the cluster with `containers` containers (and `placement`), or checks that an
/// existing cluster has that many (a node with another count refuses to join) and returns
/// its settings: an existing cluster's placement wins.
pub async fn ensure_cluster<S: MetaStore>(
    store: &S,
    cluster: &str,
    containers: u32,
    placement: Placement,
) -> Result<ClusterConfig, ClusterError> {
    let want = ClusterConfig { containers, created_unix_ms: crate::controller::now_ms(), placement };
    let have = match store.compare_and_swap(CLUSTER_KEY, 0, encode_config(&want)).await {
        Ok(_) => return Ok(want),
        Err(MetaError::Conflict { .. }) => cluster_config(store)
            .await?
            .ok_or_else(|| MetaError::Corrupt(format!("{CLUSTER_KEY} vanished while a node was joining")))?,
        Err(e) => return Err(e.into()),
    };
    if have.containers != containers {
        return Err(ClusterError::ContainerCountMismatch {
            cluster: cluster.to_string(),
            have: have.containers,
            want: containers,
        });
    }
    Ok(have)
}

/// A live registration; dropping it stops the keep-alive (the key expires after the TTL),
/// `leave` removes it at once.
pub struct Registration<S: MetaStore> {
    store: S,
    lease: LeaseId,
    stop: Arc<AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// Writes `info` as the node's registration under `lease`.
pub async fn publish_node<S: MetaStore>(store: &S, info: &NodeInfo, lease: LeaseId) -> Result<(), MetaError> {
    let value = rkyv::to_bytes::<rkyv::rancor::Error>(info).expect("serializing node info").to_vec();
    store.put_with_lease(&node_key(&info.node_id), value, lease).await.map(|_| ())
}

/// Checks that `node_id` is valid and not registered by a live node.
pub async fn check_node_id<S: MetaStore>(store: &S, node_id: &str) -> Result<(), ClusterError> {
    crate::names::validate("node", node_id).map_err(ClusterError::InvalidNodeId)?;
    if store.get(&node_key(node_id)).await?.is_some() {
        return Err(ClusterError::NodeIdTaken(node_id.to_string()));
    }
    Ok(())
}

/// Registers `info` under a lease of `ttl`, renewed every third of it from its own thread.
pub async fn register_node<S: MetaStore>(
    store: &S,
    info: &NodeInfo,
    ttl: Duration,
) -> Result<Registration<S>, ClusterError> {
    check_node_id(store, &info.node_id).await?;
    let lease = store.grant_lease(ttl).await?;
    publish_node(store, info, lease).await?;
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

/// The registration of node `id`, if it has one.
pub async fn get_node<S: MetaStore>(store: &S, id: &str) -> Result<Option<NodeInfo>, MetaError> {
    let key = node_key(id);
    match store.get(&key).await? {
        Some(v) => Ok(Some(decode_record!(NodeInfo, key, &v.value)?)),
        None => Ok(None),
    }
}

/// The live nodes, by id.
pub async fn list_nodes<S: MetaStore>(store: &S) -> Result<Vec<NodeInfo>, MetaError> {
    store.range("nodes/").await?.into_iter().map(|(k, v)| decode_record!(NodeInfo, k, &v.value)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_records_keep_their_placement_and_old_ones_read_as_hashed() {
        let c = ClusterConfig { containers: 12, created_unix_ms: 7, placement: Placement::Spread };
        assert_eq!(decode_config(&encode_config(&c)).unwrap(), c);
        // A record written before placements were recorded: the bare archive.
        let old = StoredClusterConfig { containers: 12, created_unix_ms: 7 };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&old).unwrap().to_vec();
        assert_eq!(decode_config(&bytes).unwrap(), ClusterConfig { placement: Placement::Hashed, ..c.clone() });
        let mut bad = encode_config(&c);
        bad[4] = 9;
        assert!(matches!(decode_config(&bad), Err(MetaError::Corrupt(_))));
        assert!(matches!(decode_config(b"SCP\0\x02"), Err(MetaError::Corrupt(_))));
    }
}
