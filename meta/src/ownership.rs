//! Container ownership in a cluster: who serves each container, under which epoch.
//!
//! Two keys per container (docs/ARCHITECTURE.md, "Metadata layout"):
//! - `containers/<c>` (persistent): `ContainerRecord` — the container epoch, the node that
//!   owns or last owned it, and whether that node *released* it after handing its data and
//!   metadata to tier-2.
//! - `owners/<c>` (under the owner's node lease): `OwnerLease` — present while the owner is
//!   alive; it vanishes with the lease when the node dies or loses etcd.
//!
//! Acquiring a container is one transaction: `owners/<c>` must be absent and the record at
//! the version read; the record gets epoch + 1 and the new owner, and the lease key is put.
//! So every ownership change increases the epoch, and two nodes can never both win it.
//! A container whose owner died without releasing it waits for that node to come back (its
//! log holds acknowledged data that may not be in tier-2 yet; log replication, a later
//! step, will let another node take over); a released one goes to whichever node needs it.
//!
//! `plan` is the assignment policy as a pure function, so it is unit tested on its own:
//! containers spread evenly over the active (not draining) nodes, a node takes back what it
//! owned and did not release, and a node above its share releases containers only while
//! another node is below its share.

use crate::cluster::NodeInfo;
use crate::store::{LeaseId, MetaError, MetaStore, MetaTxn};
use rkyv::{Archive, Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The persistent ownership record of a container.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Fencing token: grows by one on every ownership change.
    pub epoch: u64,
    /// The node that owns (or last owned) the container.
    pub owner: String,
    /// The owner handed everything to tier-2 and let go: any node may take it.
    pub released: bool,
}

/// Present while the owner lives (under its node lease).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OwnerLease {
    pub node: String,
    pub epoch: u64,
}

pub fn record_key(c: u32) -> String {
    format!("containers/{c:05}")
}

pub fn owner_key(c: u32) -> String {
    format!("owners/{c:05}")
}

macro_rules! encode {
    ($v:expr) => {
        rkyv::to_bytes::<rkyv::rancor::Error>($v).expect("serializing an ownership record").to_vec()
    };
}

fn parse_index(key: &str, prefix: &str) -> Option<u32> {
    key.strip_prefix(prefix)?.parse().ok()
}

/// Everything the assignment looks at, read from the store.
#[derive(Debug, Clone, Default)]
pub struct OwnershipView {
    /// Records with their versions.
    pub records: BTreeMap<u32, (ContainerRecord, u64)>,
    /// Live owners.
    pub owners: BTreeMap<u32, OwnerLease>,
    pub nodes: Vec<NodeInfo>,
}

impl OwnershipView {
    /// Reads records, owners and nodes (three range reads; a change between them is seen
    /// on the next read, and every action re-checks versions in its transaction).
    pub async fn read<S: MetaStore>(store: &S) -> Result<Self, MetaError> {
        let mut view = OwnershipView::default();
        for (k, v) in store.range("containers/").await? {
            let Some(c) = parse_index(&k, "containers/") else { continue };
            let r = decode_record!(ContainerRecord, k, &v.value)?;
            view.records.insert(c, (r, v.version));
        }
        for (k, v) in store.range("owners/").await? {
            let Some(c) = parse_index(&k, "owners/") else { continue };
            let o = decode_record!(OwnerLease, k, &v.value)?;
            view.owners.insert(c, o);
        }
        view.nodes = crate::cluster::list_nodes(store).await?;
        Ok(view)
    }

    /// The live owner of each container (`None`: nobody serves it now).
    pub fn owner_of(&self, c: u32) -> Option<&str> {
        self.owners.get(&c).map(|o| o.node.as_str())
    }
}

/// What a node should do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub acquire: Vec<u32>,
    pub release: Vec<u32>,
}

/// This node's share of `count` containers among `active` nodes (sorted ids).
pub fn share(count: u32, active: &[&str], node: &str) -> u32 {
    let n = active.len() as u32;
    match active.iter().position(|a| *a == node) {
        Some(i) if n > 0 => count / n + u32::from((i as u32) < count % n),
        _ => 0,
    }
}

/// The assignment policy for node `me`, which serves `mine` now.
pub fn plan(me: &str, count: u32, view: &OwnershipView, mine: &BTreeSet<u32>) -> Plan {
    let mut active: Vec<&str> = view.nodes.iter().filter(|n| !n.draining).map(|n| n.node_id.as_str()).collect();
    active.sort_unstable();
    let mut out = Plan::default();
    if !active.contains(&me) {
        // Draining (or not registered): hand everything off.
        out.release = mine.iter().copied().collect();
        return out;
    }
    let mut held: BTreeMap<&str, u32> = BTreeMap::new();
    for o in view.owners.values() {
        *held.entry(o.node.as_str()).or_default() += 1;
    }
    let mut have = mine.len() as u32;
    let target = share(count, &active, me);
    let free = |c: &u32| !view.owners.contains_key(c) && !mine.contains(c);
    // What this node owned and did not release is only ever taken back by this node.
    for c in (0..count).filter(free) {
        if let Some((r, _)) = view.records.get(&c)
            && r.owner == me
            && !r.released
        {
            out.acquire.push(c);
            have += 1;
        }
    }
    if have < target {
        // Start at a node-specific place so nodes rarely race for the same container.
        let me_idx = active.iter().position(|a| *a == me).unwrap_or(0) as u32;
        let start = me_idx * count / active.len() as u32;
        for c in (0..count).map(|i| (start + i) % count).filter(free) {
            if have >= target {
                break;
            }
            let takeable = match view.records.get(&c) {
                None => true,
                Some((r, _)) => r.released || r.owner == me,
            };
            if takeable && !out.acquire.contains(&c) {
                out.acquire.push(c);
                have += 1;
            }
        }
    } else if have > target {
        let deficit: u32 = active
            .iter()
            .filter(|a| **a != me)
            .map(|a| share(count, &active, a).saturating_sub(held.get(a).copied().unwrap_or(0)))
            .sum();
        let n = (have - target).min(deficit) as usize;
        out.release = mine.iter().rev().take(n).copied().collect();
    }
    out
}

/// Where a newly acquired container's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Never owned before: start empty.
    Fresh,
    /// This node owned it last: its local log has the newest state (if the log is gone,
    /// the last hand-off in tier-2).
    Local,
    /// Another node released it: recover from its hand-off in tier-2.
    Handoff { from: String },
}

/// A container this node now owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub container: u32,
    pub epoch: u64,
    pub source: Source,
}

/// Takes container `c` for node `me` under its node `lease`, if `view` still holds.
/// `Conflict` means another node moved first (or the record changed): nothing was written.
pub async fn acquire<S: MetaStore>(
    store: &S,
    view: &OwnershipView,
    c: u32,
    me: &str,
    lease: LeaseId,
) -> Result<Acquired, MetaError> {
    let (prev, version) = match view.records.get(&c) {
        Some((r, v)) => (Some(r.clone()), *v),
        None => (None, 0),
    };
    let source = match &prev {
        None => Source::Fresh,
        Some(r) if r.owner == me => Source::Local,
        Some(r) if r.released => Source::Handoff { from: r.owner.clone() },
        // Owned by another node that has not released it: not ours to take.
        Some(_) => return Err(MetaError::Conflict { key: record_key(c), expected: version, actual: version }),
    };
    let epoch = prev.as_ref().map_or(0, |r| r.epoch) + 1;
    let record = ContainerRecord { epoch, owner: me.to_string(), released: false };
    let owner = OwnerLease { node: me.to_string(), epoch };
    let txn = MetaTxn::new()
        .compare(owner_key(c), 0)
        .compare(record_key(c), version)
        .put(record_key(c), encode!(&record))
        .put_leased(owner_key(c), encode!(&owner), lease);
    store.txn(txn).await?;
    Ok(Acquired { container: c, epoch, source })
}

/// Marks container `c` released by `me` at `epoch` (after its hand-off to tier-2 is
/// complete) and removes the owner key, in one transaction.
pub async fn release<S: MetaStore>(store: &S, c: u32, me: &str, epoch: u64) -> Result<(), MetaError> {
    let Some(v) = store.get(&record_key(c)).await? else {
        return Err(MetaError::Corrupt(format!("{} is missing", record_key(c))));
    };
    let r = decode_record!(ContainerRecord, record_key(c), &v.value)?;
    if r.owner != me || r.epoch != epoch {
        return Err(MetaError::Conflict { key: record_key(c), expected: epoch, actual: r.epoch });
    }
    let record = ContainerRecord { epoch, owner: me.to_string(), released: true };
    store
        .txn(MetaTxn::new().compare(record_key(c), v.version).put(record_key(c), encode!(&record)).delete(owner_key(c)))
        .await
}

/// The node that runs the once-per-cluster duties (retention now; scaling decisions and
/// transaction timeouts as they arrive). Under the holder's node lease: when the holder
/// dies or loses etcd, the key goes and another node wins the next election.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ControllerRecord {
    pub node: String,
    pub since_unix_ms: u64,
}

pub const CONTROLLER_KEY: &str = "controller";

/// The current controller, if any.
pub async fn controller<S: MetaStore>(store: &S) -> Result<Option<ControllerRecord>, MetaError> {
    match store.get(CONTROLLER_KEY).await? {
        None => Ok(None),
        Some(v) => decode_record!(ControllerRecord, CONTROLLER_KEY, &v.value).map(Some),
    }
}

/// Campaigns for the controller role: true if `me` holds it (won now or held already).
pub async fn campaign<S: MetaStore>(store: &S, me: &str, lease: LeaseId) -> Result<bool, MetaError> {
    if let Some(c) = controller(store).await? {
        return Ok(c.node == me);
    }
    let record = ControllerRecord { node: me.to_string(), since_unix_ms: crate::controller::now_ms() };
    let txn = MetaTxn::new().compare(CONTROLLER_KEY, 0).put_leased(CONTROLLER_KEY, encode!(&record), lease);
    match store.txn(txn).await {
        Ok(()) => Ok(true),
        Err(MetaError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, draining: bool) -> NodeInfo {
        NodeInfo { node_id: id.into(), endpoints: vec![], started_unix_ms: 0, draining, lease: 0 }
    }

    fn view(nodes: &[(&str, bool)], owners: &[(u32, &str)], records: &[(u32, &str, bool)]) -> OwnershipView {
        OwnershipView {
            records: records
                .iter()
                .map(|(c, o, rel)| (*c, (ContainerRecord { epoch: 1, owner: o.to_string(), released: *rel }, 1)))
                .collect(),
            owners: owners.iter().map(|(c, o)| (*c, OwnerLease { node: o.to_string(), epoch: 1 })).collect(),
            nodes: nodes.iter().map(|(n, d)| node(n, *d)).collect(),
        }
    }

    #[test]
    fn shares_are_even() {
        let active = ["a", "b", "c"];
        assert_eq!(active.iter().map(|n| share(12, &active, n)).collect::<Vec<_>>(), vec![4, 4, 4]);
        assert_eq!(active.iter().map(|n| share(8, &active, n)).collect::<Vec<_>>(), vec![3, 3, 2]);
        assert_eq!(share(8, &active, "zzz"), 0);
    }

    #[test]
    fn a_fresh_cluster_spreads_out() {
        let v = view(&[("a", false), ("b", false)], &[], &[]);
        let pa = plan("a", 4, &v, &BTreeSet::new());
        let pb = plan("b", 4, &v, &BTreeSet::new());
        assert_eq!(pa.acquire, vec![0, 1]);
        assert_eq!(pb.acquire, vec![2, 3], "nodes start at different places");
    }

    #[test]
    fn a_joining_node_gets_a_share_and_unreleased_containers_wait() {
        // a holds 0..4, b holds nothing yet.
        let owners: Vec<(u32, &str)> = (0..4).map(|c| (c, "a")).collect();
        let records: Vec<(u32, &str, bool)> = (0..4).map(|c| (c, "a", false)).collect();
        let v = view(&[("a", false), ("b", false)], &owners, &records);
        let mine: BTreeSet<u32> = (0..4).collect();
        assert_eq!(plan("a", 4, &v, &mine).release, vec![3, 2]);
        assert!(plan("b", 4, &v, &BTreeSet::new()).acquire.is_empty(), "nothing is released yet");
        // a released 2 and 3.
        let owners: Vec<(u32, &str)> = (0..2).map(|c| (c, "a")).collect();
        let records = [(0, "a", false), (1, "a", false), (2, "a", true), (3, "a", true)];
        let v = view(&[("a", false), ("b", false)], &owners, &records);
        assert_eq!(plan("b", 4, &v, &BTreeSet::new()).acquire, vec![2, 3]);
        let mine: BTreeSet<u32> = (0..2).collect();
        assert_eq!(plan("a", 4, &v, &mine), Plan::default(), "a is at its share");
    }

    #[test]
    fn a_node_takes_back_what_it_did_not_release() {
        // a died and came back: its owner keys are gone, its records unreleased.
        let records = [(0, "a", false), (1, "b", false), (2, "a", false)];
        let v = view(&[("a", false), ("b", false)], &[(1, "b")], &records);
        assert_eq!(plan("a", 3, &v, &BTreeSet::new()).acquire, vec![0, 2]);
        // b must not take a's containers even below its share.
        let v = view(&[("b", false)], &[(1, "b")], &records);
        let mine: BTreeSet<u32> = [1].into();
        assert!(plan("b", 3, &v, &mine).acquire.is_empty());
    }

    #[test]
    fn a_draining_node_releases_all_and_others_take_them() {
        let owners = [(0, "a"), (1, "a"), (2, "b"), (3, "b")];
        let records = [(0, "a", false), (1, "a", false), (2, "b", false), (3, "b", false)];
        let v = view(&[("a", true), ("b", false)], &owners, &records);
        assert_eq!(plan("a", 4, &v, &[0, 1].into()).release, vec![0, 1]);
        let v = view(&[("a", true), ("b", false)], &[(2, "b"), (3, "b")], &[(0, "a", true), (1, "a", true)]);
        assert_eq!(plan("b", 4, &v, &[2, 3].into()).acquire, vec![0, 1]);
    }

    #[test]
    fn acquire_bumps_the_epoch_and_only_one_node_wins() {
        use crate::EmbeddedStore;
        let dir = std::env::temp_dir().join(format!("sluice-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir).unwrap();
        futures::executor::block_on(async {
            let la = store.grant_lease(std::time::Duration::from_secs(30)).await.unwrap();
            let lb = store.grant_lease(std::time::Duration::from_secs(30)).await.unwrap();
            let v = OwnershipView::read(&store).await.unwrap();
            let a = acquire(&store, &v, 7, "a", la).await.unwrap();
            assert_eq!((a.epoch, a.source), (1, Source::Fresh));
            assert!(matches!(acquire(&store, &v, 7, "b", lb).await, Err(MetaError::Conflict { .. })), "b lost");
            let v = OwnershipView::read(&store).await.unwrap();
            assert_eq!(v.owner_of(7), Some("a"));
            assert!(acquire(&store, &v, 7, "b", lb).await.is_err(), "not released");
            assert!(release(&store, 7, "b", 1).await.is_err(), "only the owner releases");
            release(&store, 7, "a", 1).await.unwrap();
            let v = OwnershipView::read(&store).await.unwrap();
            assert_eq!(v.owner_of(7), None);
            let b = acquire(&store, &v, 7, "b", lb).await.unwrap();
            assert_eq!((b.epoch, b.source), (2, Source::Handoff { from: "a".into() }));
            // b dies: its owner key goes, the record stays unreleased; b comes back.
            store.revoke_lease(lb).await.unwrap();
            let lb2 = store.grant_lease(std::time::Duration::from_secs(30)).await.unwrap();
            let v = OwnershipView::read(&store).await.unwrap();
            assert!(acquire(&store, &v, 7, "a", la).await.is_err(), "a waits for b");
            let b = acquire(&store, &v, 7, "b", lb2).await.unwrap();
            assert_eq!((b.epoch, b.source), (3, Source::Local));
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
