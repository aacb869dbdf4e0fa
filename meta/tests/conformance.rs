//! The MetaStore conformance suite on both backends: the embedded store and a real etcd.

use futures::executor::block_on;
use sluice_meta::{EmbeddedStore, EtcdStore, conformance};
use sluice_tests::{Etcd, TempDir};

#[test]
fn embedded_store_conforms() {
    let dir = TempDir::new("meta-conf");
    let store = EmbeddedStore::open(&dir.0).unwrap();
    block_on(conformance::run(&store, "conf")).unwrap();
    assert_eq!(block_on(conformance::concurrent_increments(&store, "counter", 8, 25)).unwrap(), 200);
    block_on(conformance::run_watch_and_leases(&store, "wl")).unwrap();
}

#[test]
fn embedded_leased_keys_do_not_survive_restart() {
    let dir = TempDir::new("meta-lease");
    {
        let store = EmbeddedStore::open(&dir.0).unwrap();
        block_on(async {
            use sluice_meta::MetaStore;
            store.put("persistent", vec![1]).await.unwrap();
            let lease = store.grant_lease(std::time::Duration::from_secs(60)).await.unwrap();
            store.put_with_lease("ephemeral", vec![2], lease).await.unwrap();
            store.put_with_lease("persistent", vec![3], lease).await.unwrap();
        });
    }
    let store = EmbeddedStore::open(&dir.0).unwrap();
    block_on(async {
        use sluice_meta::MetaStore;
        assert_eq!(store.get("ephemeral").await.unwrap(), None);
        assert_eq!(store.get("persistent").await.unwrap(), None, "a key moved under a lease left the file");
    });
}

#[test]
fn embedded_transactions_survive_restart_whole() {
    use sluice_meta::{MetaStore, MetaTxn};
    let dir = TempDir::new("meta-txn");
    {
        let store = EmbeddedStore::open(&dir.0).unwrap();
        block_on(async {
            store.put("gone", vec![0]).await.unwrap();
            let t = MetaTxn::new().compare("gone", 1).put("a", vec![1]).put("b", vec![2]).delete("gone");
            store.txn(t).await.unwrap();
        });
    }
    let len = std::fs::metadata(dir.0.join("meta.log")).unwrap().len();
    let store = EmbeddedStore::open(&dir.0).unwrap();
    block_on(async {
        assert_eq!(store.get("a").await.unwrap().unwrap().value, vec![1]);
        assert_eq!(store.get("b").await.unwrap().unwrap().value, vec![2]);
        assert_eq!(store.get("gone").await.unwrap(), None);
    });
    drop(store);
    // A torn transaction record is cut whole: none of its changes survive.
    let f = std::fs::OpenOptions::new().write(true).open(dir.0.join("meta.log")).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let store = EmbeddedStore::open(&dir.0).unwrap();
    block_on(async {
        assert_eq!(store.get("a").await.unwrap(), None);
        assert_eq!(store.get("b").await.unwrap(), None);
        assert_eq!(store.get("gone").await.unwrap().unwrap().value, vec![0]);
    });
}

#[test]
fn etcd_store_conforms() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "conf-cluster").unwrap();
    block_on(conformance::run(&store, "conf")).unwrap();
    assert_eq!(block_on(conformance::concurrent_increments(&store, "counter", 8, 25)).unwrap(), 200);
    block_on(conformance::run_watch_and_leases(&store, "wl")).unwrap();
    // Clusters are isolated by their key prefix.
    let other = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "another").unwrap();
    assert_eq!(block_on(sluice_meta::MetaStore::get(&other, "counter")).unwrap(), None);
}

#[test]
fn controller_runs_on_etcd() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "ctl").unwrap();
    let c = sluice_meta::Controller::new(store);
    block_on(async {
        c.create_scope("s").await.unwrap();
        let r = c
            .begin_create_stream(
                "s",
                "t",
                4,
                sluice_net::Retention::None,
                sluice_net::ScalingPolicy::Fixed { segments: 4 },
            )
            .await
            .unwrap();
        assert_eq!(r.segments.len(), 4);
        c.set_state("s", "t", sluice_meta::StreamState::Active).await.unwrap();
        assert_eq!(c.list_streams("s").await.unwrap(), vec!["t".to_string()]);
        assert!(c.delete_scope("s").await.is_err());
    });
}

/// Registration under a lease: live nodes are listed; a node that stops renewing vanishes
/// after its TTL; one that leaves vanishes at once; ids are unique among live nodes.
async fn membership<S: sluice_meta::MetaStore>(store: &S) {
    use sluice_meta::cluster::{ClusterError, NodeInfo, list_nodes, register_node};
    let info = |id: &str| NodeInfo {
        node_id: id.into(),
        endpoints: vec![format!("127.0.0.1:1/{id}")],
        started_unix_ms: 1,
        draining: false,
        lease: 0,
    };
    let ttl = std::time::Duration::from_secs(2);
    let n1 = register_node(store, &info("n1"), ttl).await.unwrap();
    let n2 = register_node(store, &info("n2"), ttl).await.unwrap();
    assert!(matches!(register_node(store, &info("n1"), ttl).await, Err(ClusterError::NodeIdTaken(_))));
    // Renewals keep n1 and n2 registered well past the TTL.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let ids: Vec<String> = list_nodes(store).await.unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(ids, vec!["n1", "n2"]);
    // n2 dies (stops renewing): gone after its TTL.
    drop(n2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while list_nodes(store).await.unwrap().len() > 1 {
        assert!(std::time::Instant::now() < deadline, "a dead node's registration did not expire");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(list_nodes(store).await.unwrap()[0], info("n1"));
    n1.leave().await.unwrap();
    assert!(list_nodes(store).await.unwrap().is_empty());
}

#[test]
fn membership_on_embedded() {
    let dir = TempDir::new("meta-members");
    let store = EmbeddedStore::open(&dir.0).unwrap();
    block_on(membership(&store));
}

#[test]
fn membership_on_etcd() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "members").unwrap();
    block_on(membership(&store));
}
