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
        let r = c.begin_create_stream("s", "t", 4).await.unwrap();
        assert_eq!(r.segments.len(), 4);
        c.set_state("s", "t", sluice_meta::StreamState::Active).await.unwrap();
        assert_eq!(c.list_streams("s").await.unwrap(), vec!["t".to_string()]);
        assert!(c.delete_scope("s").await.is_err());
    });
}
