//! Shards and the node. A node runs one glommio executor per shard, pinned to a core; shard
//! `k` owns the containers `c` with `c mod shards == k` and listens on base port + k. The
//! data path never leaves the shard that owns the container. Stream-level work (creating,
//! sealing, deleting a stream's segments) reaches other shards through per-shard inboxes
//! (futures channels; the only cross-core traffic).

use crate::config::EngineConfig;
use crate::container::core::{CoreConfig, OpResult, Request};
use crate::container::io::Container;
use crate::container::mover::Tier2Config;
use crate::error::EngineError;
use crate::server;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use glommio::{LocalExecutorBuilder, Placement};
use sluice_meta::{Controller, EmbeddedStore, MetaStore};
use sluice_net::ShardEndpoint;
use sluice_net::routing::{container_of, shard_of};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::Duration;

/// Work sent to another shard.
pub enum ShardMsg {
    Segment { segment: String, req: Request, reply: oneshot::Sender<Result<OpResult, EngineError>> },
    Stop,
}

/// Per-shard state shared by its connections (single-threaded).
pub struct Shard<S: MetaStore> {
    pub index: u32,
    pub cfg: EngineConfig,
    pub containers: HashMap<u32, Rc<Container>>,
    pub peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    pub endpoints: Vec<ShardEndpoint>,
    pub controller: Controller<S>,
}

/// Where a segment lives.
pub enum Owner {
    Local(Rc<Container>),
    /// Another shard of this node: (shard, endpoint).
    Remote(u32, String),
}

impl<S: MetaStore> Shard<S> {
    pub fn owner(&self, segment: &str) -> Owner {
        let c = container_of(segment, self.cfg.container_count());
        match self.containers.get(&c.0) {
            Some(container) => Owner::Local(container.clone()),
            None => {
                let s = shard_of(c, self.cfg.shards);
                Owner::Remote(s, self.endpoints[s as usize].address.clone())
            }
        }
    }

    /// Runs a segment operation on whichever shard owns the segment, and waits for it.
    pub async fn segment_op(&self, segment: String, req: Request) -> Result<OpResult, EngineError> {
        match self.owner(&segment) {
            Owner::Local(c) => c.submit(req)?.await,
            Owner::Remote(s, _) => {
                let (tx, rx) = oneshot::channel();
                self.peers[s as usize]
                    .unbounded_send(ShardMsg::Segment { segment, req, reply: tx })
                    .map_err(|_| EngineError::Io(format!("shard {s} is gone")))?;
                rx.await.map_err(|_| EngineError::Io(format!("shard {s} dropped a request")))?
            }
        }
    }
}

/// A running node; dropping it does not stop it, `stop` does.
pub struct Node {
    handles: Vec<glommio::ExecutorJoinHandle<Result<(), String>>>,
    peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    pub endpoints: Vec<ShardEndpoint>,
}

/// Advertised address for a bound address (an unspecified IP is advertised as loopback).
fn advertised(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}

/// Works around glommio 0.9 failing later reads when the first file an executor opens is
/// empty: open and read a non-empty 4 KiB file once.
async fn probe_dma(dir: &std::path::Path, shard: u32) -> Result<(), String> {
    let path = dir.join(format!(".probe-{shard}"));
    std::fs::write(&path, vec![0u8; 4096]).map_err(|e| format!("{}: {e}", path.display()))?;
    let f = glommio::io::DmaFile::open(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    f.read_at_aligned(0, 4096).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = f.close().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Binds a listening socket. A crashed predecessor's socket can outlive its process for a
/// moment (io_uring tears down asynchronously), so "address in use" is retried briefly.
fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
}

/// The container count is fixed by the first start of a data directory: segments are
/// placed by hashing over it, so another count would lose track of them.
fn check_layout(cfg: &EngineConfig) -> Result<(), String> {
    let path = cfg.data_dir.join("containers").join("COUNT");
    let want = cfg.container_count();
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let have: u32 = s.trim().parse().map_err(|_| format!("{} does not hold a number", path.display()))?;
            if have != want {
                return Err(format!(
                    "{} was created with {have} containers, but {} shards x {} containers per shard gives {want}; \
                     restart with a shard count and --containers-per-core whose product is {have}",
                    cfg.data_dir.display(),
                    cfg.shards,
                    cfg.containers_per_shard
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().expect("has a parent");
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            std::fs::write(&path, format!("{want}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl Node {
    /// Opens the metadata store, binds every shard's port, recovers every container, and
    /// returns once all shards serve (or the first failure).
    pub fn start(cfg: EngineConfig) -> Result<Node, String> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("creating {}: {e}", cfg.data_dir.display()))?;
        let store = EmbeddedStore::open(&cfg.data_dir.join("meta")).map_err(|e| e.to_string())?;
        Self::start_with_store(cfg, store)
    }

    /// Starts a node whose scopes and streams live in `store` (embedded or etcd).
    pub fn start_with_store<S: MetaStore>(mut cfg: EngineConfig, store: S) -> Result<Node, String> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("creating {}: {e}", cfg.data_dir.display()))?;
        // Absolute paths everywhere: glommio's directory handles fail on relative ones.
        cfg.data_dir = cfg.data_dir.canonicalize().map_err(|e| format!("resolving {}: {e}", cfg.data_dir.display()))?;
        check_layout(&cfg)?;
        let tier2 = match &cfg.tier2 {
            Some(url) => Some(sluice_tier2::open_url(url).map_err(|e| format!("tier-2 {url}: {e}"))?),
            None => None,
        };
        let mut listeners = Vec::new();
        let mut endpoints = Vec::new();
        for k in 0..cfg.shards {
            let mut addr = cfg.listen;
            addr.set_port(cfg.listen.port() + k as u16);
            let l = bind_listener(addr)?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            endpoints.push(ShardEndpoint { shard: k, address: advertised(bound).to_string() });
            listeners.push(l);
        }
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.shards).map(|_| mpsc::unbounded::<ShardMsg>()).unzip();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut handles = Vec::new();
        for ((k, listener), inbox) in (0..cfg.shards).zip(listeners).zip(rxs) {
            let placement = if cfg.pin { Placement::Fixed(k as usize % cpus) } else { Placement::Unbound };
            let (cfg, peers, endpoints, store, ready, tier2) =
                (cfg.clone(), txs.clone(), endpoints.clone(), store.clone(), ready_tx.clone(), tier2.clone());
            let fd = listener.into_raw_fd();
            let h = LocalExecutorBuilder::new(placement)
                .name(&format!("sluice-shard-{k}"))
                .spawn(move || async move {
                    // SAFETY: `fd` is a listening TCP socket we own; ownership moves to glommio.
                    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
                    let r = shard_main(k, cfg, peers, endpoints, store, tier2, listener, inbox, &ready).await;
                    if let Err(e) = &r {
                        let _ = ready.send(Err(e.clone()));
                    }
                    r
                })
                .map_err(|e| format!("starting shard {k}: {e}"))?;
            handles.push(h);
        }
        drop(ready_tx);
        let node = Node { handles, peers: txs, endpoints };
        for _ in 0..cfg.shards {
            match ready_rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    node.stop();
                    return Err(e);
                }
                Err(_) => {
                    node.stop();
                    return Err("a shard stopped during start-up".into());
                }
            }
        }
        Ok(node)
    }

    /// Stops every shard and waits for their threads.
    pub fn stop(self) {
        for p in &self.peers {
            let _ = p.unbounded_send(ShardMsg::Stop);
        }
        for h in self.handles {
            let _ = h.join();
        }
    }

    /// Blocks until a shard ends (which only happens on failure or stop).
    pub fn wait(self) -> Result<(), String> {
        for h in self.handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("shard failed: {e}")),
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn shard_main<S: MetaStore>(
    index: u32,
    cfg: EngineConfig,
    peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    endpoints: Vec<ShardEndpoint>,
    store: S,
    tier2: Option<sluice_tier2::DynStore>,
    listener: glommio::net::TcpListener,
    mut inbox: mpsc::UnboundedReceiver<ShardMsg>,
    ready: &std::sync::mpsc::Sender<Result<u32, String>>,
) -> Result<(), String> {
    probe_dma(&cfg.data_dir, index).await?;
    let pacer = Rc::new(crate::container::io::IoPacer::new(cfg.flushes_per_second.div_ceil(u64::from(cfg.shards))));
    let mut containers = HashMap::new();
    for c in (0..cfg.container_count()).filter(|c| c % cfg.shards == index) {
        let core_cfg = CoreConfig {
            container: c,
            file_bytes: cfg.log_file_bytes,
            // A flush must leave room in a file for a checkpoint and waste little at its end.
            flush_bytes_max: cfg.flush_bytes_max.min((cfg.log_file_bytes / 4) as usize),
            cache_bytes_max: cfg.cache_bytes_max,
            pending_bytes_max: cfg.pending_bytes_max,
            log_bytes_max: if tier2.is_some() { cfg.log_bytes_max } else { u64::MAX },
        };
        let t2 = tier2.as_ref().map(|store| Tier2Config {
            store: store.clone(),
            chunk_bytes: cfg.chunk_bytes,
            move_bytes_min: cfg.move_bytes_min,
            interval: Duration::from_millis(crate::constants::MOVE_INTERVAL_MS),
        });
        let dir = cfg.data_dir.join("containers").join(format!("{c:04}"));
        let container =
            Container::open(core_cfg, dir, pacer.clone(), t2).await.map_err(|e| format!("container {c}: {e}"))?;
        containers.insert(c, container);
    }
    let shard = Rc::new(Shard { index, cfg, containers, peers, endpoints, controller: Controller::new(store) });
    let _ = ready.send(Ok(index));
    let accept = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(server::serve_connection(shard.clone(), stream)).detach();
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.index, error = %e, "accept failed");
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach()
    };
    while let Some(msg) = inbox.next().await {
        match msg {
            ShardMsg::Segment { segment, req, reply } => match shard.owner(&segment) {
                Owner::Local(c) => match c.submit(req) {
                    Ok(fut) => {
                        glommio::spawn_local(async move {
                            let _ = reply.send(fut.await);
                        })
                        .detach();
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Owner::Remote(s, _) => {
                    let _ = reply
                        .send(Err(EngineError::Io(format!("segment {segment} belongs to shard {s}, not {index}"))));
                }
            },
            ShardMsg::Stop => break,
        }
    }
    // Stop taking connections, then let running flushes finish so that what is on its way
    // to the disk is answered (bounded: a stuck disk must not block shutdown forever).
    accept.cancel();
    for _ in 0..500 {
        if shard.containers.values().all(|c| c.is_idle()) {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
