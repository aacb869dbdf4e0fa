//! Cluster mode. `Routes` is the node's view of which node serves each container (shared by
//! the shards, read on redirects and by the handshake). The agent that keeps it current and
//! acquires, hands off and fences containers comes with `ClusterNode`.

use std::sync::{Arc, RwLock};

/// Who serves a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node: String,
    /// The client endpoint of the shard that serves the container on that node.
    pub endpoint: String,
}

/// Container → serving node, replaced as a whole by the agent.
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<Arc<Vec<Option<Route>>>>,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, container: u32) -> Option<Route> {
        self.table.read().expect("routes lock").get(container as usize).cloned().flatten()
    }

    pub fn set(&self, table: Vec<Option<Route>>) {
        *self.table.write().expect("routes lock") = Arc::new(table);
    }

    /// One endpoint per container, empty where nobody serves it (for the handshake).
    pub fn endpoints(&self, count: u32) -> Vec<String> {
        let t = self.table.read().expect("routes lock").clone();
        (0..count as usize).map(|c| t.get(c).cloned().flatten().map(|r| r.endpoint).unwrap_or_default()).collect()
    }
}

use crate::EngineConfig;
use crate::container::io::OpenSource;
use crate::shard::{Node, ShardMsg};
use futures::channel::oneshot;
use sluice_meta::cluster::{ClusterError, NodeInfo, check_node_id, ensure_cluster, get_node, publish_node};
use sluice_meta::ownership::{self, OwnershipView, Source, owner_key};
use sluice_meta::{LeaseId, MetaError, MetaStore};
use sluice_net::routing::shard_of;
use sluice_net::{ContainerId, ShardEndpoint};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How a node joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub cluster: String,
    pub node_id: String,
    /// The node's etcd lease: it stops serving its containers when the lease cannot be
    /// renewed for two thirds of this, so it is gone before the lease expires.
    pub lease_ttl: Duration,
    /// Pause between the agent's looks at the cluster.
    pub poll: Duration,
}

impl ClusterOptions {
    pub fn new(cluster: &str, node_id: &str) -> Self {
        Self {
            cluster: cluster.into(),
            node_id: node_id.into(),
            lease_ttl: Duration::from_secs(crate::constants::NODE_LEASE_TTL_S),
            poll: Duration::from_millis(crate::constants::AGENT_POLL_MS),
        }
    }
}

/// What the agent shares with the `ClusterNode` handle.
#[derive(Default)]
struct AgentCtl {
    drain: AtomicBool,
    stop: AtomicBool,
    /// Containers served now (for status and tests).
    serving: std::sync::Mutex<BTreeMap<u32, u64>>,
    /// This node holds the controller election.
    controller: AtomicBool,
}

/// A node of a cluster: its shards plus the agent thread that keeps its membership,
/// acquires and hands off containers, fences them when the lease is lost, and keeps the
/// routes current.
pub struct ClusterNode {
    node: Option<Node>,
    agent: Option<std::thread::JoinHandle<()>>,
    ctl: Arc<AgentCtl>,
    pub endpoints: Vec<ShardEndpoint>,
}

impl ClusterNode {
    /// Checks the cluster's settings, starts the shards (serving nothing yet), registers
    /// the node, and starts the agent. Containers arrive within a few agent rounds.
    pub fn start<S: MetaStore>(mut cfg: EngineConfig, store: S, opts: ClusterOptions) -> Result<Self, String> {
        let rt = agent_runtime()?;
        sluice_meta::names::validate("node", &opts.node_id).map_err(|e| format!("invalid --node-id: {e}"))?;
        let count = cfg.container_count();
        let settings = rt
            .block_on(timeout(Duration::from_secs(10), ensure_cluster(&store, &opts.cluster, count, cfg.placement)))
            .map_err(|e| format!("etcd: {e}"))?
            .map_err(|e| e.to_string())?;
        cfg.placement = settings.placement;
        let routes = Arc::new(Routes::new());
        cfg.cluster = Some(routes.clone());
        cfg.node_name = opts.node_id.clone();
        let lease_file = cfg.data_dir.join(LEASE_FILE);
        let shards = cfg.shards;
        let node = Node::start_with_store(cfg, store.clone())?;
        let endpoints = node.endpoints.clone();
        let ctl = Arc::new(AgentCtl::default());
        let mut agent = Agent {
            store,
            opts,
            count,
            shards,
            routes,
            senders: node.senders(),
            info: NodeInfo {
                node_id: String::new(),
                endpoints: endpoints.iter().map(|e| e.address.clone()).collect(),
                started_unix_ms: sluice_meta::controller::now_ms(),
                draining: false,
                lease: 0,
            },
            ctl: ctl.clone(),
            lease: None,
            lease_file,
            fenced_lease: None,
            renewal: Arc::new(Renewal::default()),
            mine: BTreeMap::new(),
        };
        agent.info.node_id = agent.opts.node_id.clone();
        // Register before returning, so a node id clash is reported to the caller. A
        // registration of this id that is not this directory's last (another node, or a
        // crash before the lease was noted) is waited out for a lease TTL: a dead node's
        // expires, a live one's is renewed and the start fails.
        let deadline = Instant::now() + agent.opts.lease_ttl + Duration::from_secs(2);
        let mut told = false;
        loop {
            match rt.block_on(agent.register()) {
                Ok(()) => break,
                Err(RegisterError::Taken(e)) if Instant::now() < deadline => {
                    if !told {
                        tracing::warn!(error = %e, "waiting for the registration to expire");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    node.stop();
                    return Err(e.to_string());
                }
            }
        }
        let handle = std::thread::Builder::new()
            .name("sluice-agent".into())
            .spawn(move || agent.run(rt))
            .map_err(|e| format!("starting the cluster agent: {e}"))?;
        Ok(Self { node: Some(node), agent: Some(handle), ctl, endpoints })
    }

    /// Whether this node runs the once-per-cluster duties now (see `ownership::campaign`).
    /// Shared so a service thread can check it before each round.
    pub fn controller_flag(&self) -> impl Fn() -> bool + Clone + Send + Sync + 'static {
        let ctl = self.ctl.clone();
        move || ctl.controller.load(Ordering::SeqCst)
    }

    /// Containers this node serves now, with their epochs.
    pub fn serving(&self) -> BTreeMap<u32, u64> {
        self.ctl.serving.lock().expect("lock").clone()
    }

    /// Graceful stop: announce draining, hand every container off through tier-2 (other
    /// nodes take them over), leave the cluster, stop the shards.
    pub fn shutdown(mut self) {
        self.ctl.drain.store(true, Ordering::SeqCst);
        if let Some(a) = self.agent.take() {
            let _ = a.join();
        }
        if let Some(n) = self.node.take() {
            n.stop();
        }
    }

    /// Blocks until a shard fails or the node is stopped.
    pub fn wait(mut self) -> Result<(), String> {
        let r = self.node.take().map_or(Ok(()), |n| n.wait());
        self.ctl.stop.store(true, Ordering::SeqCst);
        r
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.agent.take() {
            let _ = a.join();
        }
        if let Some(n) = self.node.take() {
            n.stop();
        }
    }
}

fn agent_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| format!("agent runtime: {e}"))
}

async fn timeout<T>(d: Duration, f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(d, f).await.map_err(|_| format!("no answer from the metadata store within {d:?}"))
}

/// Bound on one call of the agent's to the metadata store, for a lease of `ttl`.
fn call_timeout(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(500))
}

/// File in the data directory noting the lease a cluster node registered under.
const LEASE_FILE: &str = "cluster-lease";

/// Why registering failed.
#[derive(Debug)]
enum RegisterError {
    /// The node id is registered and not by this directory's previous run.
    Taken(String),
    Other(String),
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterError::Taken(m) | RegisterError::Other(m) => f.write_str(m),
        }
    }
}

impl From<String> for RegisterError {
    fn from(m: String) -> Self {
        RegisterError::Other(m)
    }
}

struct Agent<S: MetaStore> {
    store: S,
    opts: ClusterOptions,
    count: u32,
    shards: u32,
    routes: Arc<Routes>,
    senders: Vec<futures::channel::mpsc::UnboundedSender<ShardMsg>>,
    info: NodeInfo,
    ctl: Arc<AgentCtl>,
    lease: Option<LeaseId>,
    /// Where the node notes the lease it registered under (`<data-dir>/cluster-lease`), so
    /// that after a crash it can tell its own stale registration from another node's.
    lease_file: std::path::PathBuf,
    /// The lease this node fenced itself off: revoked before it registers again, so its
    /// old registration and ownership records go at once instead of at the lease's expiry
    /// (after an etcd outage, or a renewal that timed out, the lease may still be alive).
    fenced_lease: Option<LeaseId>,
    /// The lease's renewal, shared with the task that renews it (`renew`).
    renewal: Arc<Renewal>,
    /// Containers this node serves, with their epochs.
    mine: BTreeMap<u32, u64>,
}

impl<S: MetaStore> Agent<S> {
    fn call_timeout(&self) -> Duration {
        call_timeout(self.opts.lease_ttl)
    }

    async fn register(&mut self) -> Result<(), RegisterError> {
        let t = self.call_timeout();
        if let Some(old) = self.fenced_lease {
            match timeout(t, self.store.revoke_lease(old)).await? {
                Ok(()) | Err(MetaError::LeaseNotFound(_)) => self.fenced_lease = None,
                Err(e) => return Err(format!("revoking the lease this node fenced itself off: {e}").into()),
            }
        }
        match timeout(t, check_node_id(&self.store, &self.info.node_id)).await? {
            Ok(()) => {}
            Err(ClusterError::NodeIdTaken(_)) => self.remove_previous_run(t).await?,
            Err(e) => return Err(e.to_string().into()),
        }
        let asked = Instant::now();
        let lease = timeout(t, self.store.grant_lease(self.opts.lease_ttl)).await?.map_err(|e| e.to_string())?;
        self.info.lease = lease;
        timeout(t, publish_node(&self.store, &self.info, lease)).await?.map_err(|e| e.to_string())?;
        if let Err(e) = std::fs::write(&self.lease_file, format!("{} {lease}\n", self.info.node_id)) {
            tracing::warn!(path = %self.lease_file.display(), error = %e, "cannot note the node's lease");
        }
        self.lease = Some(lease);
        self.renewal.start(lease, asked);
        tracing::info!(node = %self.info.node_id, cluster = %self.opts.cluster, "registered");
        Ok(())
    }

    /// The node id is registered already. If the registration is this data directory's
    /// last one (its lease is the one noted in `cluster-lease`), its process is dead: this
    /// one holds the directory's lock and its ports. It crashed without leaving, and its
    /// lease may live on for a TTL; revoke it now (its ownership records go with it, and this
    /// node takes its containers back from its log). Anything else is another node's.
    async fn remove_previous_run(&self, t: Duration) -> Result<(), RegisterError> {
        let id = &self.info.node_id;
        let taken = || {
            RegisterError::Taken(format!(
                "node id {id} is registered by another live node, or by one that died within the lease TTL ({:?})",
                self.opts.lease_ttl
            ))
        };
        let noted = std::fs::read_to_string(&self.lease_file).ok().and_then(|s| {
            let (node, lease) = s.trim().split_once(' ')?;
            (node == id).then(|| lease.parse::<LeaseId>().ok()).flatten()
        });
        let Some(noted) = noted else { return Err(taken()) };
        let Some(old) = timeout(t, get_node(&self.store, id)).await?.map_err(|e| e.to_string())? else {
            return Ok(()); // expired meanwhile
        };
        if old.lease != noted {
            return Err(taken());
        }
        match timeout(t, self.store.revoke_lease(noted)).await? {
            Ok(()) | Err(MetaError::LeaseNotFound(_)) => {
                tracing::info!(node = %id, lease = noted, "removed the registration of this node's previous run (it did not leave the cluster)");
                Ok(())
            }
            Err(e) => Err(format!("revoking the previous run's lease: {e}").into()),
        }
    }

    async fn shard_call(
        &self,
        c: u32,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> ShardMsg,
    ) -> Result<(), String> {
        shard_call(&self.senders, self.shards, c, make).await
    }

    fn publish_serving(&self) {
        *self.ctl.serving.lock().expect("lock") = self.mine.clone();
    }

    /// Stops serving everything at once: the lease is lost or about to be.
    async fn fence_all(&mut self, why: &str) {
        tracing::error!(node = %self.info.node_id, containers = self.mine.len(), %why, "fencing: stopped serving all containers");
        self.renewal.stop();
        let all: Vec<u32> = self.mine.keys().copied().collect();
        self.fence().stop(&all).await;
        self.mine.clear();
        self.fenced_lease = self.lease.take();
        self.publish_serving();
    }

    fn fence(&self) -> Fence {
        Fence {
            senders: self.senders.clone(),
            shards: self.shards,
            count: self.count,
            routes: self.routes.clone(),
            ctl: self.ctl.clone(),
        }
    }

    /// Fences if the renewal task found the lease lost or unrenewed for too long (it has
    /// stopped the containers then; this clears the agent's own state).
    async fn check_lease(&mut self) {
        if self.lease.is_some()
            && let Some(why) = self.renewal.failed(self.opts.lease_ttl)
        {
            self.fence_all(&why).await;
        }
    }

    fn update_routes(&self, view: &OwnershipView) {
        let endpoints: BTreeMap<&str, &Vec<String>> =
            view.nodes.iter().map(|n| (n.node_id.as_str(), &n.endpoints)).collect();
        let table = (0..self.count)
            .map(|c| {
                let o = view.owners.get(&c)?;
                let eps = endpoints.get(o.node.as_str()).filter(|e| !e.is_empty())?;
                let ep = eps.get(shard_of(ContainerId(c), eps.len() as u32) as usize)?;
                Some(Route { node: o.node.clone(), endpoint: ep.clone() })
            })
            .collect();
        self.routes.set(table);
    }

    /// One look at the cluster: routes, then hand-offs, then acquisitions.
    async fn round(&mut self) -> Result<(), String> {
        let t = self.call_timeout();
        let Some(lease) = self.lease else { return Ok(()) };
        let draining = self.ctl.drain.load(Ordering::SeqCst);
        if draining && !self.info.draining {
            self.info.draining = true;
            timeout(t, publish_node(&self.store, &self.info, lease)).await?.map_err(|e| e.to_string())?;
        }
        let view = timeout(t, OwnershipView::read(&self.store)).await?.map_err(|e| e.to_string())?;
        if !view.nodes.iter().any(|n| n.node_id == self.info.node_id) {
            // Our registration is gone (lease revoked or expired): stop serving at once;
            // the next round registers again.
            self.fence_all("the node's registration vanished from the cluster").await;
            return Ok(());
        }
        self.update_routes(&view);
        let is_controller = !draining
            && timeout(t, ownership::campaign(&self.store, &self.info.node_id, lease)).await?.unwrap_or(false);
        if draining && self.ctl.controller.load(Ordering::SeqCst) {
            // Let another node take the role now rather than when this node's lease ends.
            if let Ok(Ok(Some(c))) = timeout(t, ownership::controller(&self.store)).await
                && c.node == self.info.node_id
            {
                let _ = timeout(t, self.store.delete(ownership::CONTROLLER_KEY, None)).await;
            }
        }
        if is_controller != self.ctl.controller.swap(is_controller, Ordering::SeqCst) {
            tracing::info!(node = %self.info.node_id, is_controller, "controller role changed");
        }
        let mine: std::collections::BTreeSet<u32> = self.mine.keys().copied().collect();
        let plan = ownership::plan(&self.info.node_id, self.count, &view, &mine);
        if !plan.release.is_empty() {
            let started = Instant::now();
            let this = &*self;
            let closes = plan.release.iter().map(|&c| async move {
                (c, this.shard_call(c, move |reply| ShardMsg::Close { container: c, handoff: true, reply }).await)
            });
            for (c, r) in futures::future::join_all(closes).await {
                match r {
                    Ok(()) => {
                        let epoch = self.mine.remove(&c).expect("releasing a container of ours");
                        if let Err(e) = timeout(t, ownership::release(&self.store, c, &self.info.node_id, epoch)).await
                        {
                            tracing::error!(container = c, error = %e, "release not recorded; the container waits for this node");
                        }
                    }
                    Err(e) => tracing::warn!(container = c, error = %e, "hand-off failed; keeping the container"),
                }
            }
            tracing::info!(containers = plan.release.len(), took = ?started.elapsed(), "handed off");
            self.publish_serving();
        }
        for c in plan.acquire {
            let acquired =
                match timeout(t, ownership::acquire(&self.store, &view, c, &self.info.node_id, lease)).await? {
                    Ok(a) => a,
                    Err(MetaError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.to_string()),
                };
            let source = match acquired.source {
                Source::Fresh => OpenSource::Fresh,
                Source::Local => OpenSource::Local,
                Source::Handoff { .. } => OpenSource::Handoff,
            };
            let epoch = acquired.epoch;
            match self.shard_call(c, move |reply| ShardMsg::Open { container: c, epoch, source, reply }).await {
                Ok(()) => {
                    self.mine.insert(c, epoch);
                }
                Err(e) => {
                    tracing::error!(container = c, epoch, error = %e, "cannot serve the container; will retry");
                    let _ = timeout(t, self.store.delete(&owner_key(c), None)).await;
                }
            }
        }
        self.publish_serving();
        Ok(())
    }

    fn run(mut self, rt: tokio::runtime::Runtime) {
        let mut last_warn: Option<Instant> = None;
        rt.block_on(async {
            let renewer =
                tokio::spawn(renew(self.store.clone(), self.renewal.clone(), self.opts.clone(), self.fence()));
            loop {
                if self.ctl.stop.load(Ordering::SeqCst) {
                    return;
                }
                let draining = self.ctl.drain.load(Ordering::SeqCst);
                if draining && self.mine.is_empty() && self.info.draining {
                    break;
                }
                if self.lease.is_none() && !draining {
                    if let Err(e) = self.register().await
                        && last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                    {
                        tracing::warn!(error = %e, "cannot register with the cluster yet; retrying");
                        last_warn = Some(Instant::now());
                    }
                } else if self.lease.is_none() {
                    break;
                }
                self.check_lease().await;
                if let Err(e) = self.round().await
                    && last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    tracing::warn!(error = %e, "cluster round failed; retrying");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(self.opts.poll).await;
            }
            // Drained: leave the cluster now rather than when the lease expires.
            self.renewal.stop();
            if let Some(lease) = self.lease.take() {
                let _ = timeout(self.call_timeout(), self.store.revoke_lease(lease)).await;
            }
            renewer.abort();
            tracing::info!(node = %self.info.node_id, "left the cluster");
        });
    }
}

/// A message to the shard that serves container `c`, and its answer.
async fn shard_call(
    senders: &[futures::channel::mpsc::UnboundedSender<ShardMsg>],
    shards: u32,
    c: u32,
    make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> ShardMsg,
) -> Result<(), String> {
    let (tx, rx) = oneshot::channel();
    let shard = shard_of(ContainerId(c), shards) as usize;
    senders[shard].unbounded_send(make(tx)).map_err(|_| "shard is gone".to_string())?;
    rx.await.map_err(|_| "shard dropped the request".to_string())?
}

/// Stops `containers` at once, without a hand-off (their logs stay; the node takes them
/// back under new epochs).
async fn stop_containers(
    senders: &[futures::channel::mpsc::UnboundedSender<ShardMsg>],
    shards: u32,
    containers: &[u32],
) {
    let closes = containers
        .iter()
        .map(|&c| shard_call(senders, shards, c, move |reply| ShardMsg::Close { container: c, handoff: false, reply }));
    futures::future::join_all(closes).await;
}

/// The node lease's renewal state, shared by the agent and the task that renews the lease
/// (`renew`). The renewal runs beside the agent's rounds: a round can wait long (a hand-off
/// moving a container's backlog to tier-2 may take up to a minute), and the lease must
/// neither lapse meanwhile nor outlive its renewals unfenced.
#[derive(Default)]
struct Renewal(std::sync::Mutex<Option<Renewing>>);

/// A lease being renewed (none before the node registers, nor once it fenced itself).
struct Renewing {
    lease: LeaseId,
    /// When the last renewal the store confirmed was sent (or the grant asked for): the
    /// store extends the lease from a moment after that, so it lives at least a TTL past it.
    renewed: Instant,
    /// When the last renewal was sent, confirmed or not.
    attempted: Instant,
    /// Why the lease is lost (the store said it is gone, or renewals failed for two thirds
    /// of the TTL), once the renewal task found it so.
    failed: Option<String>,
    /// The renewal task has stopped the containers (the agent clears its state next).
    fenced: bool,
}

impl Renewal {
    /// Renews `lease` from now on, granted by a request sent at `asked`.
    fn start(&self, lease: LeaseId, asked: Instant) {
        *self.0.lock().expect("lock") =
            Some(Renewing { lease, renewed: asked, attempted: asked, failed: None, fenced: false });
    }

    /// Renews nothing more (fenced, or leaving).
    fn stop(&self) {
        *self.0.lock().expect("lock") = None;
    }

    /// Why the lease is lost, if it is: the renewal task's finding, or (if that task is held
    /// up) renewals older than two thirds of `ttl`.
    fn failed(&self, ttl: Duration) -> Option<String> {
        self.0.lock().expect("lock").as_ref().and_then(|r| r.failed(ttl))
    }
}

impl Renewing {
    fn failed(&self, ttl: Duration) -> Option<String> {
        self.failed.clone().or_else(|| {
            (self.renewed.elapsed() > ttl * 2 / 3)
                .then(|| "the lease could not be renewed for two thirds of its TTL".to_string())
        })
    }
}

/// What fencing the node takes beyond its agent's own state: the containers stopped at
/// once, the routes cleared, the controller role dropped. The renewal task fences with it
/// without waiting for the agent's round to end; the agent, with what it knows it serves.
struct Fence {
    senders: Vec<futures::channel::mpsc::UnboundedSender<ShardMsg>>,
    shards: u32,
    count: u32,
    routes: Arc<Routes>,
    ctl: Arc<AgentCtl>,
}

impl Fence {
    async fn stop(&self, containers: &[u32]) {
        self.ctl.controller.store(false, Ordering::SeqCst);
        self.routes.set(vec![None; self.count as usize]);
        stop_containers(&self.senders, self.shards, containers).await;
    }
}

/// Renews the node's lease every third of its TTL, each attempt bounded by a third of the
/// TTL and by the moment the node must be fenced; when the store says the lease is gone, or
/// no renewal succeeded for two thirds of the TTL, stops every container the node serves at
/// once and leaves the rest (its own state, registering again) to the agent.
async fn renew<S: MetaStore>(store: S, renewal: Arc<Renewal>, opts: ClusterOptions, fence: Fence) {
    let ttl = opts.lease_ttl;
    loop {
        tokio::time::sleep(opts.poll.min(ttl / 6)).await;
        // The lease to renew now, and until when.
        let due = {
            let mut state = renewal.0.lock().expect("lock");
            match state.as_mut() {
                Some(r) if r.failed.is_none() && r.attempted.elapsed() >= ttl / 3 => {
                    r.attempted = Instant::now();
                    Some((r.lease, r.attempted, r.renewed + ttl * 2 / 3))
                }
                _ => None,
            }
        };
        if let Some((lease, sent, fence_at)) = due {
            let bound = call_timeout(ttl).min(fence_at.saturating_duration_since(sent));
            let outcome = timeout(bound.max(Duration::from_millis(1)), store.keep_alive(lease)).await;
            let mut state = renewal.0.lock().expect("lock");
            match (state.as_mut().filter(|r| r.lease == lease), outcome) {
                (None, _) => continue,
                (Some(r), Ok(Ok(()))) => r.renewed = sent,
                (Some(r), Ok(Err(MetaError::LeaseNotFound(_)))) => {
                    r.failed = Some("the node's lease expired or was revoked".into());
                }
                (Some(_), Ok(Err(e))) => tracing::warn!(error = %e, "lease renewal failed"),
                (Some(_), Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
        let failed = {
            let mut state = renewal.0.lock().expect("lock");
            match state.as_mut() {
                Some(r) if !r.fenced => {
                    r.failed = r.failed(ttl);
                    r.fenced = r.failed.is_some();
                    r.failed.clone()
                }
                _ => None,
            }
        };
        if let Some(why) = failed {
            let serving: Vec<u32> = fence.ctl.serving.lock().expect("lock").keys().copied().collect();
            tracing::error!(containers = serving.len(), %why, "fencing: stopping every container now");
            fence.stop(&serving).await;
        }
    }
}
