//! Shards and the node. A node runs one glommio executor per shard, pinned to a core; shard
//! `k` owns the containers `c` with `c mod shards == k` and listens on base port + k. The
//! data path never leaves the shard that owns the container. Stream-level work (creating,
//! sealing, deleting a stream's segments) reaches other shards through per-shard inboxes
//! (futures channels; the only cross-core traffic).

use crate::config::EngineConfig;
use crate::container::core::{CoreConfig, OpResult, Request, named};
use crate::container::io::{Container, IoPacer, OpenSource};
use crate::container::mover::Tier2Config;
use crate::error::EngineError;
use crate::server;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use glommio::{LocalExecutorBuilder, Placement};
use sluice_meta::controller::ControllerError;
use sluice_meta::{Controller, EmbeddedStore, MetaStore, StreamRecord, StreamState};
use sluice_net::ShardEndpoint;
use sluice_net::ids::{ScopedStream, SegmentNumber};
use sluice_net::routing::{Placement as SegmentPlacement, container_of, shard_of};
use sluice_net::socket::{UNIX_SCHEME, widen_send_buffer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// Work sent to a shard (by another shard, or by the cluster agent).
pub enum ShardMsg {
    Segment {
        segment: String,
        req: Request,
        reply: oneshot::Sender<Result<OpResult, EngineError>>,
    },
    /// Cluster mode: start serving a container this node now owns at `epoch`.
    Open {
        container: u32,
        epoch: u64,
        source: OpenSource,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Cluster mode: stop serving a container, handing it off through tier-2 (`handoff`)
    /// or at once (fenced: this node may no longer own it).
    Close {
        container: u32,
        handoff: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A client connected on this shard's Unix socket (accepted by the node's acceptor).
    UnixClient(std::os::fd::OwnedFd),
    Stop,
}

/// Per-shard state shared by its connections (single-threaded).
pub struct Shard<S: MetaStore> {
    pub index: u32,
    pub cfg: EngineConfig,
    pub containers: RefCell<HashMap<u32, Rc<Container>>>,
    pub peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    pub endpoints: Vec<ShardEndpoint>,
    /// The shards' Unix socket endpoints (`unix:PATH`), when the node listens on one.
    pub unix_endpoints: Vec<ShardEndpoint>,
    pub controller: Controller<S>,
    /// Append rates of the segments this shard serves (for auto-scaling).
    pub rates: RefCell<crate::container::rates::SegmentRates>,
    pacer: Rc<IoPacer>,
    tier2: Option<sluice_tier2::DynStore>,
}

/// Where a segment lives.
pub enum Owner {
    Local(Rc<Container>),
    /// Another shard of this node.
    Remote(u32),
    /// Cluster mode: another node, at this endpoint (`None`: nobody serves the container
    /// right now, it is moving).
    Node(u32, Option<String>),
}

/// How long a stream operation keeps retrying a segment whose container is moving.
const SEGMENT_OP_RETRY: Duration = Duration::from_secs(30);

impl<S: MetaStore> Shard<S> {
    /// The shard endpoints a client connected by `via` should use.
    pub fn endpoints_via(&self, via: server::Via) -> &[ShardEndpoint] {
        match via {
            server::Via::Unix if !self.unix_endpoints.is_empty() => &self.unix_endpoints,
            _ => &self.endpoints,
        }
    }

    /// Submits an operation to a container of this shard, keeping the append rates in step:
    /// appends counted (not those of transactions' shadow segments), deleted segments forgotten.
    pub fn submit_local(
        &self,
        c: &Rc<Container>,
        segment: &str,
        req: Request,
    ) -> Result<impl std::future::Future<Output = Result<OpResult, EngineError>> + 'static, EngineError> {
        self.submit_local_noting(c, segment, req, None)
    }

    /// `submit_local`, with `Container::submit_noting`'s refusal notice.
    pub fn submit_local_noting(
        &self,
        c: &Rc<Container>,
        segment: &str,
        req: Request,
        notice: Option<crate::container::io::RefusalNotice>,
    ) -> Result<impl std::future::Future<Output = Result<OpResult, EngineError>> + 'static, EngineError> {
        match &req {
            Request::Append { event_count, data, .. } if !sluice_net::txn::is_shadow_segment(segment) => {
                let now = std::time::Instant::now();
                self.rates.borrow_mut().record(segment, u64::from(*event_count), data.len() as u64, now);
            }
            Request::Delete { .. } => self.rates.borrow_mut().remove(segment),
            _ => {}
        }
        c.submit_noting(req, notice)
    }

    pub fn owner(&self, segment: &str) -> Owner {
        let c = container_of(segment, self.cfg.container_count(), self.cfg.placement);
        if let Some(container) = self.containers.borrow().get(&c.0) {
            return Owner::Local(container.clone());
        }
        match &self.cfg.cluster {
            None => {
                let s = shard_of(c, self.cfg.shards);
                Owner::Remote(s)
            }
            Some(routes) => match routes.get(c.0) {
                Some(r) if r.node == self.cfg.node_name => {
                    let s = shard_of(c, self.cfg.shards);
                    if s == self.index {
                        // Ours, but not open on this shard (yet, or any more).
                        Owner::Node(c.0, None)
                    } else {
                        Owner::Remote(s)
                    }
                }
                Some(r) => Owner::Node(c.0, Some(r.endpoint)),
                None => Owner::Node(c.0, None),
            },
        }
    }

    /// Runs a segment operation on whichever shard (of this node, or in cluster mode of
    /// any node) owns the segment, and waits for it. In cluster mode an operation on a
    /// moving container is retried for up to `SEGMENT_OP_RETRY`.
    pub async fn segment_op(&self, segment: String, req: Request) -> Result<OpResult, EngineError> {
        let deadline = std::time::Instant::now() + SEGMENT_OP_RETRY;
        loop {
            let result = match self.owner(&segment) {
                Owner::Local(c) => match self.submit_local(&c, &segment, req.clone()) {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                },
                Owner::Remote(s) => {
                    let (tx, rx) = oneshot::channel();
                    self.peers[s as usize]
                        .unbounded_send(ShardMsg::Segment { segment: segment.clone(), req: req.clone(), reply: tx })
                        .map_err(|_| EngineError::Io(format!("shard {s} is gone")))?;
                    rx.await.map_err(|_| EngineError::Io(format!("shard {s} dropped a request")))?
                }
                Owner::Node(_, Some(endpoint)) => {
                    crate::remote::segment_op(&endpoint, &req, self.cfg.frame_bytes_max).await
                }
                Owner::Node(c, None) => {
                    Err(EngineError::NotOwner { container: c, reason: "no node serves it right now".into() })
                }
            };
            match result {
                Err(EngineError::NotOwner { .. }) | Err(EngineError::Unreachable(_))
                    if self.cfg.cluster.is_some() && std::time::Instant::now() < deadline =>
                {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    fn core_config(&self, c: u32) -> CoreConfig {
        core_config(&self.cfg, c, self.tier2.is_some())
    }

    fn tier2_config(&self) -> Option<Tier2Config> {
        self.tier2.as_ref().map(|store| tier2_config(&self.cfg, store))
    }

    fn container_dir(&self, c: u32) -> std::path::PathBuf {
        self.cfg.data_dir.join("containers").join(format!("{c:04}"))
    }

    /// Cluster mode: opens a container this node now owns.
    async fn open_owned(self: &Rc<Self>, c: u32, epoch: u64, source: OpenSource) -> Result<(), String> {
        if self.containers.borrow().contains_key(&c) {
            return Err(format!("container {c} is already open on shard {}", self.index));
        }
        let t2 = self.tier2_config().ok_or("cluster mode needs tier-2")?;
        let container =
            Container::open_owned(self.core_config(c), self.container_dir(c), self.pacer.clone(), t2, epoch, source)
                .await?;
        self.containers.borrow_mut().insert(c, container.clone());
        tracing::info!(shard = self.index, container = c, epoch, ?source, "serving container");
        if container.lost_in_salvage() {
            glommio::spawn_local(reconcile_after_salvage(self.clone(), container)).detach();
        }
        Ok(())
    }

    /// Cluster mode: stops serving a container (see `ShardMsg::Close`).
    async fn close(self: &Rc<Self>, c: u32, handoff: bool) -> Result<(), String> {
        let Some(container) = self.containers.borrow_mut().remove(&c) else {
            return Ok(());
        };
        if !handoff {
            container.stop_with(format!("container {c}: this node lost its ownership lease"));
            return Ok(());
        }
        match container.hand_off().await {
            Ok(()) => {
                // Everything is in tier-2 now; the local log would only be a stale copy
                // (taking the container back reads the hand-off when the log is gone).
                // A read still opening one of its files finishes first (no open starts on a
                // stopped container): glommio panics when an open file's path vanishes.
                let dir = self.container_dir(c);
                let settled = container.wait_opens(Duration::from_secs(5)).await;
                drop(container);
                if !settled {
                    tracing::warn!(container = c, dir = %dir.display(), "a read still opens a handed-off log file; its log stays until the container is taken again");
                } else if let Err(e) = crate::container::io::remove_dir_off_shard(&dir).await {
                    tracing::warn!(container = c, dir = %dir.display(), error = %e, "cannot remove a handed-off log");
                }
                Ok(())
            }
            Err(e) => {
                self.containers.borrow_mut().insert(c, container);
                Err(format!("container {c}: {e}"))
            }
        }
    }
}

fn core_config(cfg: &EngineConfig, c: u32, tier2: bool) -> CoreConfig {
    CoreConfig {
        container: c,
        file_bytes: cfg.log_file_bytes,
        // A flush must leave room in a file for a checkpoint and waste little at its end.
        flush_bytes_max: cfg.flush_bytes_max.min((cfg.log_file_bytes / 4) as usize),
        cache_bytes_max: cfg.cache_bytes_max,
        pending_bytes_max: cfg.pending_bytes_max,
        log_bytes_max: if tier2 { cfg.log_bytes_max } else { u64::MAX },
        prefill: cfg.log_prefill,
        spare_files: cfg.log_spare_files,
        writer_idle_ms: cfg.writer_idle.as_millis() as u64,
        salvage: cfg.salvage_damaged_log,
    }
}

fn tier2_config(cfg: &EngineConfig, store: &sluice_tier2::DynStore) -> Tier2Config {
    Tier2Config {
        store: store.clone(),
        chunk_bytes: cfg.chunk_bytes,
        move_bytes_min: cfg.move_bytes_min,
        interval: Duration::from_millis(crate::constants::MOVE_INTERVAL_MS),
    }
}

/// A running node; dropping it does not stop it, `stop` does.
pub struct Node {
    handles: Vec<glommio::ExecutorJoinHandle<Result<(), String>>>,
    peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    pub endpoints: Vec<ShardEndpoint>,
    /// The shards' Unix socket endpoints (empty without `unix_socket`).
    pub unix_endpoints: Vec<ShardEndpoint>,
    /// The shards' Unix sockets (removed when the node stops).
    unix_paths: Vec<PathBuf>,
    /// The thread accepting on them, and the socket whose closing stops it (dropping the
    /// node stops accepting on Unix sockets).
    acceptor: Option<(std::os::unix::net::UnixStream, std::thread::JoinHandle<()>)>,
    /// The data directory's lock, held while the node runs.
    _lock: DataDirLock,
}

/// An exclusive `flock` on `<data-dir>/lock`, which holds the owner's pid: a second node
/// on the same data directory (a second server started by mistake, or before the last one
/// exited) would write the same log files. The kernel drops the lock when the process dies,
/// SIGKILL included, so a restart after a crash finds it free.
struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    fn acquire(dir: &Path) -> Result<DataDirLock, String> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own, for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut owner = String::new();
                let _ = f.read_to_string(&mut owner);
                let owner = owner.trim();
                let by = if owner.is_empty() { String::new() } else { format!(" (pid {owner})") };
                return Err(format!(
                    "data directory {} is in use by another sluice process{by}: stop it first, or give another --data-dir",
                    dir.display()
                ));
            }
            return Err(format!("locking {}: {e}", path.display()));
        }
        let pid = std::process::id().to_string();
        f.set_len(0)
            .and_then(|()| f.rewind())
            .and_then(|()| f.write_all(pid.as_bytes()))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(DataDirLock { _file: f })
    }
}

/// The longest Unix socket path Linux takes (`sun_path` holds 108 bytes with the NUL).
const UNIX_PATH_MAX: usize = 107;

/// Shard `k`'s Unix socket: shard 0 listens on `path` itself, shard k on `path.k`.
fn unix_socket_path(path: &Path, k: u32) -> PathBuf {
    if k == 0 {
        return path.to_path_buf();
    }
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{k}"));
    PathBuf::from(p)
}

/// Makes `path` ready to bind: its directory is created; a socket left there by a server
/// that died is removed (nobody answers on it), but a socket a live server listens on, or
/// anything that is not a socket, is left alone with an error.
fn prepare_unix_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    if path.as_os_str().len() > UNIX_PATH_MAX {
        return Err(format!(
            "unix socket path {shown} is {} bytes long; Linux takes at most {UNIX_PATH_MAX}: give a shorter --unix-socket",
            path.as_os_str().len()
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Err(format!("{shown} exists and is not a socket: remove it, or give another --unix-socket"));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {
            Err(format!("{shown} is in use: another server listens on it; stop it, or give another --unix-socket"))
        }
        Err(_) => std::fs::remove_file(path).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(format!("removing the stale socket {shown}: {e}")),
        }),
    }
}

/// Removes the node's Unix sockets once it has stopped listening.
fn remove_unix_sockets(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove the unix socket");
        }
    }
}

/// Where a shard listens and what it tells clients.
struct Endpoints {
    /// Every shard's TCP endpoint.
    tcp: Vec<ShardEndpoint>,
    /// Every shard's Unix socket endpoint (empty without `--unix-socket`).
    unix: Vec<ShardEndpoint>,
}

/// The acceptor thread: waits on every shard's Unix listener (bound before any shard
/// started, so a client told of a shard's socket always finds it) and hands each client to
/// its shard. Ends when `stop` becomes readable (its other end written or closed).
fn accept_unix(
    listeners: &[std::os::unix::net::UnixListener],
    shards: &[mpsc::UnboundedSender<ShardMsg>],
    stop: &std::os::unix::net::UnixStream,
) {
    use std::os::fd::AsRawFd;
    for l in listeners {
        if let Err(e) = l.set_nonblocking(true) {
            tracing::error!(error = %e, "unix socket listener: cannot make it non-blocking; not accepting");
            return;
        }
    }
    let mut polled: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| l.as_raw_fd())
        .chain([stop.as_raw_fd()])
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    loop {
        // SAFETY: `polled` holds one valid pollfd per listener and the stop socket, which
        // outlive the call.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "unix socket acceptor: poll failed; not accepting");
            return;
        }
        if polled.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (k, (l, p)) in listeners.iter().zip(&mut polled).enumerate() {
            if p.revents == 0 {
                continue;
            }
            p.revents = 0;
            loop {
                match l.accept() {
                    Ok((stream, _)) => {
                        let setup = stream.set_nonblocking(true);
                        if let Err(e) = setup {
                            tracing::warn!(error = %e, "unix socket client dropped: cannot make it non-blocking");
                            continue;
                        }
                        // Read replies go this way: the same buffer as the client's.
                        let _ = widen_send_buffer(stream.as_raw_fd());
                        if shards[k].unbounded_send(ShardMsg::UnixClient(stream.into())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors, say: back off rather than spin.
                        tracing::warn!(shard = k, error = %e, "accept failed (unix socket)");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
    }
}

/// Stops the Unix socket acceptor (if any) and removes the sockets: the node's shards have
/// ended, or are ending.
fn close_unix_sockets(
    acceptor: Option<(std::os::unix::net::UnixStream, std::thread::JoinHandle<()>)>,
    paths: &[PathBuf],
) {
    if let Some((stop, thread)) = acceptor {
        // Closing our end makes the acceptor's end readable (end of stream).
        drop(stop);
        let _ = thread.join();
    }
    remove_unix_sockets(paths);
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
/// empty: open and read a non-empty 4 KiB file once. On a full disk, where no probe file can
/// be written, an existing log file serves (the node still starts and serves reads).
async fn probe_dma(dir: &std::path::Path, shard: u32) -> Result<(), String> {
    let path = dir.join(format!(".probe-{shard}"));
    let written = std::fs::write(&path, vec![0u8; 4096]);
    let target = match &written {
        Ok(()) => path.clone(),
        Err(e) => match existing_log_file(dir) {
            Some(log) => log,
            None => {
                let _ = std::fs::remove_file(&path);
                let hint = if e.raw_os_error() == Some(libc::ENOSPC) { ": the file system is full" } else { "" };
                return Err(format!("{}: {e}{hint}", path.display()));
            }
        },
    };
    let f = glommio::io::DmaFile::open(&target).await.map_err(|e| format!("{}: {e}", target.display()))?;
    f.read_at_aligned(0, 4096).await.map_err(|e| format!("{}: {e}", target.display()))?;
    let _ = f.close().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Any log file of at least 4 KiB under `dir`'s containers.
fn existing_log_file(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let containers = std::fs::read_dir(dir.join("containers")).ok()?;
    containers.flatten().filter_map(|c| std::fs::read_dir(c.path()).ok()).flat_map(|d| d.flatten()).find_map(|e| {
        let is_log = e.path().extension().is_some_and(|x| x == "log");
        (is_log && e.metadata().is_ok_and(|m| m.len() >= 4096)).then(|| e.path())
    })
}

/// Binds a listening socket. A crashed predecessor's socket can outlive its process for a
/// moment (io_uring tears down asynchronously), so "address in use" is retried briefly.
fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut told = false;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut told, true) {
                    tracing::warn!(%addr, "the address is in use; trying again for 10 s (a stopped node's socket can linger a moment)");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
}

/// Sets the calling thread's nice value (Linux: a per-thread attribute); 0 leaves it alone.
fn set_thread_nice(nice: i32) -> Result<(), String> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: plain syscalls on the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            format!("{e} (a negative value needs CAP_SYS_NICE, e.g. root, or an RLIMIT_NICE that allows it)")
        }
        _ => e.to_string(),
    })
}

/// The container count a data directory was created with (`None`: a new directory).
pub fn recorded_container_count(data_dir: &Path) -> Result<Option<u32>, String> {
    let path = data_dir.join("containers").join("COUNT");
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| format!("{} does not hold a number", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The container count and the placement are fixed by the first start of a data directory:
/// segments are placed by them, so others would lose track of them. A directory created
/// before placements were recorded has its count only, and keeps the hashed placement.
/// Returns the directory's placement (standalone; a cluster node takes the cluster's).
fn check_layout(cfg: &EngineConfig) -> Result<Option<SegmentPlacement>, String> {
    let dir = cfg.data_dir.join("containers");
    let path = dir.join("COUNT");
    let placement_path = dir.join("PLACEMENT");
    let want = cfg.container_count();
    match recorded_container_count(&cfg.data_dir)? {
        Some(have) => {
            if have != want {
                return Err(format!(
                    "{} was created with {have} containers, but {} shards x {} containers per shard gives {want}; \
                     restart with a shard count and --containers-per-core whose product is {have}",
                    cfg.data_dir.display(),
                    cfg.shards,
                    cfg.containers_per_shard
                ));
            }
            if cfg.cluster.is_some() {
                return Ok(None);
            }
            match std::fs::read_to_string(&placement_path) {
                Ok(s) => SegmentPlacement::from_name(s.trim())
                    .map(Some)
                    .ok_or_else(|| format!("{} holds an unknown placement {:?}", placement_path.display(), s.trim())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(SegmentPlacement::Hashed)),
                Err(e) => Err(format!("{}: {e}", placement_path.display())),
            }
        }
        None => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // The placement first: a directory with a count and no placement is an old one.
            let placement = cfg.cluster.is_none().then_some(cfg.placement);
            if let Some(p) = placement {
                write_synced(&placement_path, &format!("{}\n", p.name()))?;
            }
            write_synced(&path, &format!("{want}\n"))?;
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(placement)
        }
    }
}

fn write_synced(path: &std::path::Path, text: &str) -> Result<(), String> {
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

impl Node {
    /// Opens the metadata store, binds every shard's port, recovers every container, and
    /// returns once all shards serve (or the first failure).
    pub fn start(cfg: EngineConfig) -> Result<Node, String> {
        // Locked before anything in it is opened: the metadata store recovers on open.
        let lock = DataDirLock::acquire(&cfg.data_dir)?;
        let store =
            EmbeddedStore::open_with(&cfg.data_dir.join("meta"), cfg.salvage_damaged_log).map_err(|e| e.to_string())?;
        Self::start_locked(cfg, store, lock)
    }

    /// Starts a node whose scopes and streams live in `store` (embedded or etcd).
    pub fn start_with_store<S: MetaStore>(cfg: EngineConfig, store: S) -> Result<Node, String> {
        let lock = DataDirLock::acquire(&cfg.data_dir)?;
        Self::start_locked(cfg, store, lock)
    }

    fn start_locked<S: MetaStore>(mut cfg: EngineConfig, store: S, lock: DataDirLock) -> Result<Node, String> {
        cfg.validate()?;
        // Absolute paths everywhere: glommio's directory handles fail on relative ones.
        cfg.data_dir = cfg.data_dir.canonicalize().map_err(|e| format!("resolving {}: {e}", cfg.data_dir.display()))?;
        if let Some(placement) = check_layout(&cfg)? {
            cfg.placement = placement;
        }
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
        let unix_paths: Vec<PathBuf> = match &cfg.unix_socket {
            Some(path) => {
                // Absolute: clients are told the paths and may run elsewhere.
                let path = std::path::absolute(path).map_err(|e| format!("resolving {}: {e}", path.display()))?;
                (0..cfg.shards).map(|k| unix_socket_path(&path, k)).collect()
            }
            None => Vec::new(),
        };
        let mut unix_listeners = Vec::new();
        for path in &unix_paths {
            let bound = prepare_unix_socket(path).and_then(|()| {
                let l = std::os::unix::net::UnixListener::bind(path)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                if let Some(mode) = cfg.unix_socket_mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| format!("setting the mode of {}: {e}", path.display()))?;
                }
                Ok(l)
            });
            match bound {
                Ok(l) => unix_listeners.push(l),
                Err(e) => {
                    remove_unix_sockets(&unix_paths[..unix_listeners.len()]);
                    return Err(e);
                }
            }
        }
        let unix_endpoints: Vec<ShardEndpoint> = unix_paths
            .iter()
            .zip(0..)
            .map(|(p, k)| ShardEndpoint { shard: k, address: format!("{UNIX_SCHEME}{}", p.display()) })
            .collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.shards).map(|_| mpsc::unbounded::<ShardMsg>()).unzip();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut handles = Vec::new();
        for ((k, listener), inbox) in (0..cfg.shards).zip(listeners).zip(rxs) {
            let placement = if cfg.pin { Placement::Fixed(k as usize % cpus) } else { Placement::Unbound };
            let (cfg, peers, store, ready, tier2) =
                (cfg.clone(), txs.clone(), store.clone(), ready_tx.clone(), tier2.clone());
            let addrs = Endpoints { tcp: endpoints.clone(), unix: unix_endpoints.clone() };
            let fd = listener.into_raw_fd();
            let h = LocalExecutorBuilder::new(placement)
                .spin_before_park(cfg.idle_spin)
                .name(&format!("sluice-shard-{k}"))
                .spawn(move || async move {
                    // SAFETY: `fd` is a listening TCP socket we own; ownership moves to glommio.
                    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
                    if let Err(e) = set_thread_nice(cfg.shard_nice) {
                        let e = format!("setting shard {k}'s nice value to {}: {e}", cfg.shard_nice);
                        let _ = ready.send(Err(e.clone()));
                        return Err(e);
                    }
                    crate::stats::start();
                    let r = shard_main(k, cfg, peers, addrs, store, tier2, listener, inbox, &ready).await;
                    if let Err(e) = &r {
                        let _ = ready.send(Err(e.clone()));
                    }
                    r
                })
                .map_err(|e| format!("starting shard {k}: {e}"))?;
            handles.push(h);
        }
        drop(ready_tx);
        let acceptor = if unix_listeners.is_empty() {
            None
        } else {
            let (stop, stopped) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| format!("starting the unix socket acceptor: {e}"))?;
            let peers = txs.clone();
            let thread = std::thread::Builder::new()
                .name("sluice-unix-accept".into())
                .spawn(move || accept_unix(&unix_listeners, &peers, &stopped))
                .map_err(|e| format!("starting the unix socket acceptor: {e}"))?;
            Some((stop, thread))
        };
        let node = Node { handles, peers: txs, endpoints, unix_endpoints, unix_paths, acceptor, _lock: lock };
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

    /// Handles to send shard messages (the cluster agent opens and closes containers).
    pub fn senders(&self) -> Vec<mpsc::UnboundedSender<ShardMsg>> {
        self.peers.clone()
    }

    /// Stops every shard and waits for their threads.
    pub fn stop(self) {
        for p in &self.peers {
            let _ = p.unbounded_send(ShardMsg::Stop);
        }
        for h in self.handles {
            let _ = h.join();
        }
        close_unix_sockets(self.acceptor, &self.unix_paths);
    }

    /// Blocks until a shard ends (which only happens on failure or stop).
    pub fn wait(self) -> Result<(), String> {
        let result = self.handles.into_iter().try_for_each(|h| match h.join() {
            Ok(r) => r,
            Err(e) => Err(format!("shard failed: {e}")),
        });
        close_unix_sockets(self.acceptor, &self.unix_paths);
        result
    }
}

/// Whether the controller has segment `number` of stream `r` sealed: the stream is sealed
/// (or being sealed), or a scaling replaced the segment (it is in no current epoch and no
/// scaling in progress creates it). A number the stream never gave out is not sealed.
fn sealed_by_controller(r: &StreamRecord, number: u64) -> bool {
    match r.state {
        StreamState::Sealed | StreamState::Sealing => true,
        StreamState::Creating => false,
        StreamState::Active => {
            number < r.next_segment
                && !r.segments.iter().any(|s| s.number == number)
                && !r.scale.as_ref().is_some_and(|p| p.create.iter().any(|s| s.number == number))
        }
    }
}

/// How often a look-up in the controller is tried before it is given up (the metadata store
/// unreachable), and how long apart.
const SALVAGE_TRIES: u32 = 10;
const SALVAGE_RETRY: Duration = Duration::from_millis(500);

/// Streams and scopes listed per controller call after a salvage.
const SALVAGE_PAGE: usize = 200;

/// Runs a controller look-up for `reconcile_after_salvage`, retrying while the metadata store
/// is unreachable; `None` when the name is unknown or the tries ran out (logged).
async fn looked_up<T, F, Fut>(container: u32, what: &str, f: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ControllerError>>,
{
    for _ in 0..SALVAGE_TRIES {
        match f().await {
            Ok(v) => return Some(v),
            Err(ControllerError::NoSuchStream(_) | ControllerError::NoSuchScope(_)) => return None,
            Err(e) => {
                tracing::warn!(container, what, error = %e, "after salvage: the controller did not answer; trying again");
                glommio::timer::sleep(SALVAGE_RETRY).await;
            }
        }
    }
    tracing::error!(
        container,
        what,
        "after salvage: gave up asking the controller; what it would have fixed stays as is"
    );
    None
}

/// After recovery's salvage lost log records, puts the container back in line with the
/// controller, which is not affected by the damage:
/// - a segment whose creation was lost is missing here, though its stream has it (writers
///   and readers of the stream would fail on it for good): each segment of every stream the
///   controller knows that belongs to this container and is missing is created again, empty
///   (its data is lost), and sealed if the controller has it sealed;
/// - a seal among the lost records left its segment open again: each open segment with no
///   entry after the loss (what a lost seal leaves) that the controller has sealed (its
///   stream sealed, or replaced by a scaling) is sealed again, so that no writer appends to it.
///
/// Each fix is logged and reported in `sluice stats`. Segments of streams the controller
/// does not know, shadow and raw segments are left as they are.
async fn reconcile_after_salvage<S: MetaStore>(shard: Rc<Shard<S>>, container: Rc<Container>) {
    let c = container.id();
    let ctl = &shard.controller;
    let mut streams: HashMap<String, Option<StreamRecord>> = HashMap::new();
    // The container is this shard's: `segment_op` submits to it here.
    let apply = |name: String, req: Request| {
        let shard = shard.clone();
        async move { shard.segment_op(name, req).await.map(|_| ()) }
    };

    // Segments created in the lost records: every stream's segments, against this container.
    let mut recreated = Vec::new();
    let mut scopes_after = String::new();
    'scopes: loop {
        let Some((scopes, next)) = looked_up(c, "scopes", || ctl.list_scopes_page(&scopes_after, SALVAGE_PAGE)).await
        else {
            break;
        };
        for scope in scopes {
            let mut after = String::new();
            loop {
                let Some((names, next)) =
                    looked_up(c, &scope, || ctl.list_streams_page(&scope, &after, SALVAGE_PAGE)).await
                else {
                    break;
                };
                for stream in names {
                    let key = format!("{scope}/{stream}");
                    let Some(r) = looked_up(c, &key, || ctl.get_stream(&scope, &stream)).await else { continue };
                    if r.state == StreamState::Creating {
                        continue;
                    }
                    let numbers =
                        looked_up(c, &key, || ctl.all_segments(&scope, &stream, r.epoch())).await.unwrap_or_default();
                    for n in numbers {
                        let name = format!("{key}/{n}");
                        let ours = container_of(&name, shard.cfg.container_count(), shard.cfg.placement).0 == c;
                        if !ours || !matches!(container.status(&name), Err(EngineError::NoSuchSegment(_))) {
                            continue;
                        }
                        let mut done = apply(name.clone(), Request::Create { name: name.clone() }).await;
                        if done.is_ok() && sealed_by_controller(&r, n) {
                            done = apply(name.clone(), Request::Seal { name: name.clone() }).await;
                        }
                        match done {
                            Ok(()) => {
                                tracing::warn!(container = c, segment = %name, "after salvage: created again, empty (its creation was among the lost records)");
                                recreated.push(name);
                            }
                            Err(e) => {
                                tracing::error!(container = c, segment = %name, error = %e, "after salvage: cannot create again")
                            }
                        }
                    }
                    streams.insert(key, Some(r));
                }
                match next {
                    Some(n) => after = n,
                    None => break,
                }
            }
        }
        match next {
            Some(n) => scopes_after = n,
            None => break 'scopes,
        }
    }
    if !recreated.is_empty() {
        container.note_salvaged(format!(
            "created again, empty, as the controller has them (their creation was among the lost records, \
             their data is lost): {}",
            named(&recreated)
        ));
    }

    // Seals among the lost records.
    let mut resealed = Vec::new();
    for name in container.untraced_after_salvage() {
        let Some((stream, SegmentNumber(number))) = sluice_net::split_segment_name(&name) else { continue };
        let Some(ss) = ScopedStream::parse(stream) else { continue };
        if !streams.contains_key(stream) {
            let r = looked_up(c, stream, || ctl.get_stream(&ss.scope, &ss.stream)).await;
            streams.insert(stream.to_string(), r);
        }
        if !streams[stream].as_ref().is_some_and(|r| sealed_by_controller(r, number)) {
            continue;
        }
        match apply(name.clone(), Request::Seal { name: name.clone() }).await {
            Ok(()) => {
                tracing::warn!(container = c, segment = %name, "after salvage: sealed again (the controller has it sealed)");
                resealed.push(name);
            }
            Err(e) => tracing::error!(container = c, segment = %name, error = %e, "after salvage: cannot seal again"),
        }
    }
    if !resealed.is_empty() {
        container.note_salvaged(format!(
            "sealed again, as the controller has them (their seal was among the lost records): {}",
            named(&resealed)
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn shard_main<S: MetaStore>(
    index: u32,
    cfg: EngineConfig,
    peers: Vec<mpsc::UnboundedSender<ShardMsg>>,
    endpoints: Endpoints,
    store: S,
    tier2: Option<sluice_tier2::DynStore>,
    listener: glommio::net::TcpListener,
    mut inbox: mpsc::UnboundedReceiver<ShardMsg>,
    ready: &std::sync::mpsc::Sender<Result<u32, String>>,
) -> Result<(), String> {
    probe_dma(&cfg.data_dir, index).await?;
    let pacer = Rc::new(
        crate::container::io::IoPacer::new(cfg.flushes_per_second.div_ceil(u64::from(cfg.shards)), cfg.flush_linger)
            .with_flush_depth(cfg.flush_depth),
    );
    let mut containers = HashMap::new();
    // In cluster mode containers open as the node acquires them.
    let opened_here = if cfg.cluster.is_some() { 0 } else { cfg.container_count() };
    for c in (0..opened_here).filter(|c| c % cfg.shards == index) {
        let t2 = tier2.as_ref().map(|store| tier2_config(&cfg, store));
        let dir = cfg.data_dir.join("containers").join(format!("{c:04}"));
        let container = Container::open(core_config(&cfg, c, tier2.is_some()), dir, pacer.clone(), t2)
            .await
            .map_err(|e| format!("container {c}: {e}"))?;
        containers.insert(c, container);
    }
    let cfg_rate_window = cfg.rate_window;
    let shard = Rc::new(Shard {
        index,
        cfg,
        containers: RefCell::new(containers),
        peers,
        endpoints: endpoints.tcp,
        unix_endpoints: endpoints.unix,
        controller: Controller::new(store),
        rates: RefCell::new(crate::container::rates::SegmentRates::new(cfg_rate_window)),
        pacer,
        tier2,
    });
    let _ = ready.send(Ok(index));
    for c in shard.containers.borrow().values().filter(|c| c.lost_in_salvage()) {
        glommio::spawn_local(reconcile_after_salvage(shard.clone(), c.clone())).detach();
    }
    if let Some(every) = shard.cfg.scrub_every {
        glommio::spawn_local(scrub_on_schedule(shard.clone(), every)).detach();
    }
    let accept = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        let peer = stream.peer_addr().map_or_else(|e| format!("? ({e})"), |a| a.to_string());
                        glommio::spawn_local(server::serve_connection(shard.clone(), stream, server::Via::Tcp, peer))
                            .detach();
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
                Owner::Local(c) => match shard.submit_local(&c, &segment, req) {
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
                Owner::Remote(s) => {
                    let _ = reply
                        .send(Err(EngineError::Io(format!("segment {segment} belongs to shard {s}, not {index}"))));
                }
                Owner::Node(c, _) => {
                    let _ = reply.send(Err(EngineError::NotOwner {
                        container: c,
                        reason: format!("not open on shard {index} of this node"),
                    }));
                }
            },
            ShardMsg::Open { container, epoch, source, reply } => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.open_owned(container, epoch, source).await);
                })
                .detach();
            }
            ShardMsg::Close { container, handoff, reply } => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.close(container, handoff).await);
                })
                .detach();
            }
            ShardMsg::UnixClient(fd) => {
                // SAFETY: a connected, non-blocking Unix stream socket, now owned by glommio.
                let stream = unsafe { glommio::net::UnixStream::from_raw_fd(fd.into_raw_fd()) };
                let peer = format!("a client on the unix socket of shard {index}");
                glommio::spawn_local(server::serve_connection(shard.clone(), stream, server::Via::Unix, peer)).detach();
            }
            ShardMsg::Stop => break,
        }
    }
    // Stop taking connections, then let running flushes finish so that what is on its way
    // to the disk is answered (bounded: a stuck disk must not block shutdown forever).
    accept.cancel();
    for _ in 0..500 {
        if shard.containers.borrow().values().all(|c| c.is_idle()) {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Scrubs the logs of the shard's containers every `every` (`--scrub-every`), one container
/// after another at the configured pace; damage is logged as errors by the scrub itself,
/// and each round ends with a summary line.
async fn scrub_on_schedule<S: MetaStore>(shard: Rc<Shard<S>>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let mut containers: Vec<_> = shard.containers.borrow().values().cloned().collect();
        containers.sort_by_key(|c| c.id());
        let started = std::time::Instant::now();
        let (mut bytes, mut damaged) = (0u64, 0usize);
        for c in &containers {
            let report = c.scrub(shard.cfg.scrub_bytes_per_sec).await;
            bytes += report.bytes;
            damaged += usize::from(!report.damage.is_empty());
        }
        let took_s = started.elapsed().as_secs();
        if damaged > 0 {
            tracing::error!(
                shard = shard.index,
                containers = containers.len(),
                damaged,
                bytes,
                took_s,
                "scheduled log scrub found damage"
            );
        } else {
            tracing::info!(
                shard = shard.index,
                containers = containers.len(),
                bytes,
                took_s,
                "scheduled log scrub: sound"
            );
        }
    }
}
