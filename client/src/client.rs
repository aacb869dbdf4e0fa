//! The client: bootstraps from one node address, learns the shard map (container count and
//! one endpoint per shard), routes each segment request straight to the shard that owns the
//! segment's container, and keeps one connection per endpoint. A `WrongHost` reply, or a
//! node that cannot be reached (gone for good, its containers served elsewhere), refreshes
//! the map before the retry. Also the stream manager (scopes and streams) and raw segment calls.

use crate::connection::Connection;
use crate::error::ClientError;
use crate::reader::{EventReader, ReadFrom};
use crate::writer::{EventWriter, WriterConfig};
use bytes::Bytes;
use sluice_net::messages::*;
use sluice_net::routing::{Placement, container_of, shard_of};
use sluice_net::{ErrorCode, Frame, Retention, ScalingPolicy, ScopedStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// How long calls keep retrying while the server is unreachable or restarting.
    pub retry_for: Duration,
    /// Measure the round trip of every append request of this client's writers
    /// (`Client::take_append_round_trips`): a lock and two clock reads per request. For
    /// benchmarks that want to tell the client's share of a latency from the server's.
    pub measure_append_round_trips: bool,
    /// How long a writer waits for the answer to an append before it takes the connection
    /// as lost (a server host gone without closing it, a lost answer): it drops the
    /// connection (every request on it fails with `ConnectionLost`) and resends on a new one;
    /// the server drops what it already has. The server answers an append once it is durable
    /// or refused (a full disk or log is refused at once), within milliseconds normally.
    pub append_answer_timeout: Duration,
    /// How long any other request may go unanswered (a read: beyond its wait at the tail)
    /// before the client takes the connection as lost, as for appends: a frozen server (its
    /// connections open, nothing answered) fails the call with `Timeout` and its retries go
    /// to a new connection, instead of waiting forever. A scrub (paced by the caller) has no
    /// limit. Keep it above the server's own waits: a stream operation waits up to 30 s for
    /// a segment whose container is moving (in a cluster, a node restarting).
    pub request_timeout: Duration,
}

/// How long a call or a writer retries before it warns (once) what it is waiting for.
const RETRY_WARN_AFTER: Duration = Duration::from_secs(2);

/// Says once per retry episode (`warned`) what a long wait is for (a full disk, a
/// restarting node): when the episode that began `since` passed `RETRY_WARN_AFTER`.
/// `segment`: a writer's. Returns whether it warned now.
pub(crate) fn warn_long_retry(
    warned: &mut bool,
    since: Instant,
    retry_for: Duration,
    segment: Option<&str>,
    e: &ClientError,
) -> bool {
    if *warned || since.elapsed() < RETRY_WARN_AFTER {
        return false;
    }
    *warned = true;
    let writes = segment.map(|s| format!(" writes to {s}")).unwrap_or_default();
    tracing::warn!(error = %e, "still retrying{writes}; giving up after {retry_for:?}");
    true
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(60),
            measure_append_round_trips: false,
            append_answer_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
struct ShardMap {
    container_count: u32,
    placement: Placement,
    endpoints: Vec<String>,
    /// Cluster: the endpoint of each container ("" while it moves); empty on a standalone node.
    containers: Vec<String>,
    /// The node's largest append payload.
    append_bytes_max: usize,
}

/// Held while connecting to an address; the last failure to connect there, and when.
type ConnectGate = Arc<tokio::sync::Mutex<Option<(Instant, ClientError)>>>;

impl ShardMap {
    fn from_hello(hello: HelloReply) -> Self {
        Self {
            container_count: hello.container_count,
            // Versions that know other placements speak another protocol version.
            placement: Placement::from_u8(hello.placement).unwrap_or(Placement::Spread),
            endpoints: hello.shards.into_iter().map(|s| s.address).collect(),
            containers: hello.containers,
            append_bytes_max: usize::try_from(hello.append_bytes_max).unwrap_or(usize::MAX),
        }
    }
}

struct Inner {
    bootstrap: String,
    config: ClientConfig,
    map: Mutex<ShardMap>,
    conns: Mutex<HashMap<String, Arc<Connection>>>,
    /// One gate per address, held while connecting to it: callers that need the same
    /// address at once (a new writer's lanes) wait for one connection and share it, or its
    /// failure (when it came, and why), instead of each trying in turn.
    connecting: Mutex<HashMap<String, ConnectGate>>,
    /// Stream histories read before, by (scope, stream): epochs never change once current,
    /// so a later read only fetches what came after (`Client::stream_history`).
    histories: Mutex<HistoryCache>,
    /// With `ClientConfig::measure_append_round_trips`.
    round_trips: Option<Arc<crate::stats::RoundTrips>>,
}

/// Stream histories a client keeps (beyond that, the least recently used is dropped).
const HISTORIES_CACHED: usize = 64;

/// Cached histories with the tick of their last use.
#[derive(Default)]
struct HistoryCache {
    tick: u64,
    entries: HashMap<(String, String), (Arc<StreamHistory>, u64)>,
}

impl HistoryCache {
    fn get(&mut self, key: &(String, String)) -> Option<Arc<StreamHistory>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(h, used)| {
            *used = tick;
            h.clone()
        })
    }

    fn put(&mut self, key: (String, String), history: Arc<StreamHistory>) {
        if self.entries.len() >= HISTORIES_CACHED && !self.entries.contains_key(&key) {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.tick += 1;
        self.entries.insert(key, (history, self.tick));
    }
}

/// A handle to a Sluice node; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Normalizes `sluice://host:port`, `host:port`, `:port`, or `unix:PATH` (also
/// `unix://PATH`) for a server on this host listening on a Unix socket.
fn normalize(url: &str) -> Result<String, ClientError> {
    use sluice_net::socket::UNIX_SCHEME;
    if let Some(path) = url.trim().strip_prefix(UNIX_SCHEME) {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(ClientError::InvalidArgument(format!("server address '{url}' needs a path: unix:PATH")));
        }
        return Ok(format!("{UNIX_SCHEME}{path}"));
    }
    let s = url.trim().trim_start_matches("sluice://").trim_end_matches('/');
    let s = if s.starts_with(':') { format!("127.0.0.1{s}") } else { s.to_string() };
    if !s.contains(':') {
        return Err(ClientError::InvalidArgument(format!("server address '{url}' needs host:port")));
    }
    Ok(s)
}

/// A `Read` reply frame as the reply and the data it carries, or the server's error.
pub(crate) fn read_reply(frame: Frame) -> Result<(ReadReply, Bytes), ClientError> {
    let payload = frame.payload.clone();
    Ok((crate::connection::expect::<ReadReply>(frame)?, payload))
}

impl Client {
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Self::connect_with(url, ClientConfig::default()).await
    }

    pub async fn connect_with(url: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let bootstrap = normalize(url)?;
        let (conn, hello) = Connection::connect(&bootstrap, config.connect_timeout, config.request_timeout).await?;
        let map = ShardMap::from_hello(hello);
        let mut conns = HashMap::new();
        conns.insert(bootstrap.clone(), conn);
        Ok(Client {
            inner: Arc::new(Inner {
                bootstrap,
                map: Mutex::new(map),
                conns: Mutex::new(conns),
                connecting: Mutex::new(HashMap::new()),
                histories: Mutex::new(HistoryCache::default()),
                round_trips: config.measure_append_round_trips.then(|| Arc::new(crate::stats::RoundTrips::new())),
                config,
            }),
        })
    }

    /// The round trips of this client's append requests since the last call (or since it
    /// connected), in microseconds (`.latencies()` for their percentiles); `None` unless
    /// `ClientConfig::measure_append_round_trips`.
    pub fn take_append_round_trips(&self) -> Option<crate::stats::RoundTripHistogram> {
        self.inner.round_trips.as_ref().map(|r| r.take())
    }

    pub(crate) fn round_trips(&self) -> Option<&Arc<crate::stats::RoundTrips>> {
        self.inner.round_trips.as_ref()
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The largest append payload the node takes (from its handshake): writers keep their
    /// batches within it.
    pub fn append_bytes_max(&self) -> usize {
        self.inner.map.lock().expect("lock").append_bytes_max
    }

    /// How the node lays segments over its containers.
    pub fn placement(&self) -> Placement {
        self.inner.map.lock().expect("lock").placement
    }

    /// Number of shards of the node.
    pub fn shard_count(&self) -> usize {
        self.inner.map.lock().expect("lock").endpoints.len()
    }

    /// Each shard's latency statistics (see `sluice_engine::stats`), in node and shard
    /// order; with `reset`, every shard starts counting over once its figures are taken. In a
    /// cluster: the shards of the node this client started from and of every node serving a
    /// container (the map is refreshed first), so that nothing wrong on another node goes
    /// unseen; a node that does not answer fails the call.
    pub async fn shard_stats(&self, reset: bool) -> Result<Vec<ShardStats>, ClientError> {
        let mut all = Vec::new();
        for e in self.every_shard().await? {
            all.push(self.call_once_more(&e, &GetStats { reset }).await?);
        }
        all.sort_by(|a: &ShardStats, b| (&a.node, a.shard).cmp(&(&b.node, b.shard)));
        Ok(all)
    }

    /// (name, length) of every open segment of every shard (in a cluster, as `shard_stats`
    /// reaches them), a request (a page of up to 2000) per shard rather than one per segment:
    /// how the retention service sees which streams grew. In no order.
    pub async fn open_segment_lengths(&self) -> Result<Vec<(String, u64)>, ClientError> {
        let mut all = Vec::new();
        for e in self.every_shard().await? {
            let mut after = String::new();
            loop {
                let page: SegmentLengths = self.call_once_more(&e, &ListSegmentLengths { after, limit: 0 }).await?;
                all.extend(page.segments);
                match page.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        Ok(all)
    }

    /// The endpoint of every shard: this node's, and in a cluster every node's that serves a
    /// container (the map refreshed first).
    async fn every_shard(&self) -> Result<Vec<String>, ClientError> {
        if !self.inner.map.lock().expect("lock").containers.is_empty() {
            self.refresh().await?;
        }
        let mut endpoints = Vec::new();
        let map = self.inner.map.lock().expect("lock");
        for e in map.endpoints.iter().chain(map.containers.iter()) {
            if !e.is_empty() && !endpoints.contains(e) {
                endpoints.push(e.clone());
            }
        }
        Ok(endpoints)
    }

    /// A control call to the shard at `endpoint`, made once more on a new connection if the
    /// cached one was lost (the server closes one after refusing an append).
    async fn call_once_more<M: Control, R: Control>(&self, endpoint: &str, msg: &M) -> Result<R, ClientError> {
        let call = || async { self.connection(endpoint).await?.call(msg, Bytes::new()).await };
        match call().await {
            Err(ClientError::ConnectionLost(_)) => call().await,
            r => r,
        }
    }

    /// A live connection to `addr` (cached; reconnects if the cached one broke).
    pub async fn connection(&self, addr: &str) -> Result<Arc<Connection>, ClientError> {
        let open = || self.inner.conns.lock().expect("lock").get(addr).filter(|c| !c.is_closed()).cloned();
        if let Some(c) = open() {
            return Ok(c);
        }
        let asked = Instant::now();
        let gate = self.inner.connecting.lock().expect("lock").entry(addr.to_string()).or_default().clone();
        let mut failed = gate.lock().await;
        // Whoever held the gate before may have connected, or failed since this call began.
        if let Some(c) = open() {
            return Ok(c);
        }
        if let Some((at, e)) = failed.as_ref()
            && *at >= asked
        {
            return Err(e.clone());
        }
        let (conn, hello) =
            match Connection::connect(addr, self.inner.config.connect_timeout, self.inner.config.request_timeout).await
            {
                Ok(c) => c,
                Err(e) => {
                    *failed = Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            };
        *self.inner.map.lock().expect("lock") = ShardMap::from_hello(hello);
        self.inner.conns.lock().expect("lock").insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// The open connection to the shard that owns `segment`, if there is one (no waiting).
    pub(crate) fn open_segment_connection(&self, segment: &str) -> Option<Arc<Connection>> {
        let ep = self.endpoint_of(segment);
        self.inner.conns.lock().expect("lock").get(&ep).filter(|c| !c.is_closed()).cloned()
    }

    /// The `Read` request for `wait` at most.
    pub(crate) fn read_request(segment: &str, offset: u64, max_bytes: u32, wait: Duration) -> Read {
        Read { segment: segment.into(), offset, max_bytes, wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32 }
    }

    /// The container that holds `segment` (by the node's container count and placement).
    pub fn container_of(&self, segment: &str) -> u32 {
        let map = self.inner.map.lock().expect("lock");
        container_of(segment, map.container_count, map.placement).0
    }

    /// Endpoint of the shard that owns `segment` (in a cluster, of the node that serves
    /// its container; the bootstrap node while the container moves, which redirects).
    pub fn endpoint_of(&self, segment: &str) -> String {
        let c = {
            let map = self.inner.map.lock().expect("lock");
            container_of(segment, map.container_count, map.placement)
        };
        self.container_endpoint(c.0)
    }

    /// Number of segment containers (of the node; of the cluster in cluster mode).
    pub fn container_count(&self) -> u32 {
        self.inner.map.lock().expect("lock").container_count
    }

    /// Endpoint of the shard serving container `c` (in a cluster, of the node that serves it;
    /// the bootstrap node while it moves).
    pub fn container_endpoint(&self, c: u32) -> String {
        let map = self.inner.map.lock().expect("lock");
        if !map.containers.is_empty() {
            return match map.containers.get(c as usize).filter(|e| !e.is_empty()) {
                Some(e) => e.clone(),
                None => self.inner.bootstrap.clone(),
            };
        }
        map.endpoints[shard_of(sluice_net::ids::ContainerId(c), map.endpoints.len() as u32) as usize].clone()
    }

    /// Has the node serving container `c` read its log files back from the disk and check
    /// every record (`ScrubLog`), at most `bytes_per_sec` (0: unpaced). `None`: that node
    /// no longer serves it (it is moving).
    pub async fn scrub_container(&self, c: u32, bytes_per_sec: u64) -> Result<Option<ContainerScrub>, ClientError> {
        let endpoint = self.container_endpoint(c);
        let report: ScrubReport = self
            .connection(&endpoint)
            .await?
            .call_untimed(&ScrubLog { containers: vec![c], bytes_per_sec }, Bytes::new())
            .await?;
        Ok(report.containers.into_iter().find(|s| s.container == c))
    }

    /// Connection to the shard that owns `segment`.
    pub async fn segment_connection(&self, segment: &str) -> Result<Arc<Connection>, ClientError> {
        let ep = self.endpoint_of(segment);
        self.connection(&ep).await
    }

    /// Refreshes the shard map from the bootstrap node, or, in a cluster whose bootstrap
    /// node is down, from any other node the map names.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let mut candidates = vec![self.inner.bootstrap.clone()];
        {
            let map = self.inner.map.lock().expect("lock");
            for e in map.containers.iter().chain(map.endpoints.iter()) {
                if !e.is_empty() && !candidates.contains(e) {
                    candidates.push(e.clone());
                }
            }
        }
        let mut last = None;
        for addr in candidates {
            self.inner.conns.lock().expect("lock").remove(&addr);
            match self.connection(&addr).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least the bootstrap node was tried"))
    }

    /// Runs `f` until it succeeds, fails with a non-retryable error, or `retry_for` passes.
    pub(crate) async fn with_retry<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = Instant::now();
        let deadline = started + self.inner.config.retry_for;
        let mut backoff = Duration::from_millis(20);
        let mut warned = false;
        loop {
            match f().await {
                Ok(v) => {
                    if started.elapsed() > Duration::from_secs(2) {
                        tracing::warn!(waited = ?started.elapsed(), "a call succeeded only after a long retry");
                    }
                    return Ok(v);
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    if !warn_long_retry(&mut warned, started, self.inner.config.retry_for, None, &e)
                        && backoff >= Duration::from_millis(500)
                    {
                        tracing::debug!(error = %e, waited = ?started.elapsed(), "retrying");
                    }
                    if e.map_may_be_stale() {
                        let _ = self.refresh().await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Nodes to send stream-manager calls to: the bootstrap node first, then (in a
    /// cluster) the other nodes the map names, so admin calls survive a stopped bootstrap node.
    fn admin_candidates(&self) -> Vec<String> {
        let mut out = vec![self.inner.bootstrap.clone()];
        for e in self.inner.map.lock().expect("lock").containers.iter() {
            if !e.is_empty() && !out.contains(e) {
                out.push(e.clone());
            }
        }
        out
    }

    pub(crate) async fn admin<T: Control + Clone, R: Control>(&self, msg: T) -> Result<R, ClientError> {
        self.with_retry(|| self.admin_attempt(msg.clone())).await
    }

    async fn admin_attempt<T: Control, R: Control>(&self, msg: T) -> Result<R, ClientError> {
        let mut last = None;
        for addr in self.admin_candidates() {
            match self.connection(&addr).await {
                Ok(conn) => return conn.call(&msg, Bytes::new()).await,
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least the bootstrap node was tried"))
    }

    /// An admin call that creates or deletes something. When an attempt's connection broke
    /// after the request went out (the node restarted), the request may have been carried
    /// out; if a retry is then answered `settled` (it exists already, or is gone already),
    /// the lost attempt did it, and the call succeeded.
    pub(crate) async fn admin_once<T: Control + Clone>(&self, msg: T, settled: ErrorCode) -> Result<(), ClientError> {
        let maybe_done = AtomicBool::new(false);
        let result = self
            .with_retry(|| async {
                let r = self.admin_attempt::<_, Done>(msg.clone()).await;
                let unknown = matches!(r, Err(ClientError::ConnectionLost(_) | ClientError::Timeout(_)))
                    || r.as_ref().is_err_and(|e| e.code() == Some(ErrorCode::MetadataUnavailable));
                if unknown {
                    maybe_done.store(true, Ordering::Relaxed);
                }
                r
            })
            .await;
        match result {
            Err(e) if e.code() == Some(settled) && maybe_done.load(Ordering::Relaxed) => {
                tracing::debug!(error = %e, "a retried call found its work done by the attempt whose answer was lost");
                Ok(())
            }
            r => r.map(|_| ()),
        }
    }

    pub(crate) async fn segment_call<T: Control + Clone, R: Control>(
        &self,
        segment: &str,
        msg: T,
        payload: Bytes,
    ) -> Result<R, ClientError> {
        self.with_retry(|| {
            let (msg, payload) = (msg.clone(), payload.clone());
            async move { self.segment_connection(segment).await?.call(&msg, payload).await }
        })
        .await
    }

    /// Creates a scope. Names that begin with `_` are Sluice's own (`reserved_name`).
    pub async fn create_scope(&self, scope: &str) -> Result<(), ClientError> {
        reserved_name("scope", scope)?;
        self.create_reserved_scope(scope).await
    }

    /// Creates a scope whatever its name: for Sluice's own services (the retention service's
    /// `_system`), which may use the names `create_scope` refuses.
    #[doc(hidden)]
    pub async fn create_reserved_scope(&self, scope: &str) -> Result<(), ClientError> {
        self.admin_once(CreateScope { scope: scope.into() }, ErrorCode::AlreadyExists).await
    }

    pub async fn delete_scope(&self, scope: &str) -> Result<(), ClientError> {
        self.admin_once(DeleteScope { scope: scope.into() }, ErrorCode::NoSuchScope).await
    }

    /// Every scope, in name order (asked for a page at a time).
    pub async fn list_scopes(&self) -> Result<Vec<String>, ClientError> {
        all_pages(|after| async move { self.list_scopes_page(&after, 0).await }).await
    }

    /// One page of scope names: at most `limit` (0: the server's page, 5000) after `after`
    /// (`""`: from the first), and the next page's `after` if there is one.
    pub async fn list_scopes_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, Option<String>), ClientError> {
        let page = self.admin::<_, ScopeList>(ListScopes { after: after.into(), limit }).await?;
        Ok((page.scopes, cursor(page.next)))
    }

    /// Creates a stream with a fixed number of segments.
    pub async fn create_stream(&self, scope: &str, stream: &str, segments: u32) -> Result<(), ClientError> {
        self.create_stream_with(scope, stream, segments, Retention::None).await
    }

    /// Creates a stream with a retention policy.
    pub async fn create_stream_with(
        &self,
        scope: &str,
        stream: &str,
        segments: u32,
        retention: Retention,
    ) -> Result<(), ClientError> {
        self.create_stream_policies(scope, stream, segments, retention, ScalingPolicy::Fixed { segments }).await
    }

    /// Creates a stream with a retention and a scaling policy (an automatic policy starts
    /// with at least its minimum segments).
    pub async fn create_stream_policies(
        &self,
        scope: &str,
        stream: &str,
        segments: u32,
        retention: Retention,
        scaling: ScalingPolicy,
    ) -> Result<(), ClientError> {
        reserved_name("stream", stream)?;
        self.create_stream_unchecked(CreateStream {
            scope: scope.into(),
            stream: stream.into(),
            segments,
            retention,
            scaling,
        })
        .await
    }

    /// Creates a stream of any name, the reserved ones included (reader groups' state
    /// streams are created through `state_synchronizer`).
    pub(crate) async fn create_stream_unchecked(&self, msg: CreateStream) -> Result<(), ClientError> {
        self.admin_once(msg, ErrorCode::AlreadyExists).await
    }

    /// Changes the retention policy of a live stream.
    pub async fn update_retention(&self, scope: &str, stream: &str, retention: Retention) -> Result<(), ClientError> {
        self.update_stream(scope, stream, Some(retention), None).await
    }

    /// Changes a live stream's retention and/or scaling policy (`None`: unchanged).
    pub async fn update_stream(
        &self,
        scope: &str,
        stream: &str,
        retention: Option<Retention>,
        scaling: Option<ScalingPolicy>,
    ) -> Result<(), ClientError> {
        let msg = UpdateStream { scope: scope.into(), stream: stream.into(), retention, scaling };
        self.admin::<_, Done>(msg).await.map(|_| ())
    }

    /// Every stream of `scope`, in name order (asked for a page at a time).
    pub async fn list_streams(&self, scope: &str) -> Result<Vec<String>, ClientError> {
        all_pages(|after| async move { self.list_streams_page(scope, &after, 0).await }).await
    }

    /// One page of `scope`'s stream names (as `list_scopes_page`).
    pub async fn list_streams_page(
        &self,
        scope: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, Option<String>), ClientError> {
        let (page, next) = self.list_stream_entries_page(scope, after, limit).await?;
        Ok((page.into_iter().map(|s| s.name).collect(), next))
    }

    /// Every stream of `scope` in name order, each with its state and policies (what
    /// `get_stream` says of it, less its segments), asked for a page at a time: a service
    /// that applies a policy finds the streams that have one without a request per stream.
    pub async fn list_stream_entries(&self, scope: &str) -> Result<Vec<ListedStream>, ClientError> {
        all_pages(|after| async move { self.list_stream_entries_page(scope, &after, 0).await }).await
    }

    /// One page of `list_stream_entries` (as `list_scopes_page`).
    pub async fn list_stream_entries_page(
        &self,
        scope: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<ListedStream>, Option<String>), ClientError> {
        let m = ListStreams { scope: scope.into(), after: after.into(), limit };
        let page = self.admin::<_, StreamList>(m).await?;
        Ok((page.streams, cursor(page.next)))
    }

    pub async fn get_stream(&self, scope: &str, stream: &str) -> Result<StreamInfo, ClientError> {
        self.admin(GetStream { scope: scope.into(), stream: stream.into() }).await
    }

    /// Scales a stream: seals the adjacent active segments `seal` and replaces them with new
    /// segments over `ranges` (which must cover exactly their key range, in order). Returns
    /// the stream in its new epoch. Writers move to the new segments by themselves; readers
    /// finish the sealed ones first.
    pub async fn scale_stream(
        &self,
        scope: &str,
        stream: &str,
        seal: &[u64],
        ranges: &[KeyRange],
    ) -> Result<StreamInfo, ClientError> {
        let msg =
            ScaleStream { scope: scope.into(), stream: stream.into(), seal: seal.to_vec(), ranges: ranges.to_vec() };
        self.admin(msg).await
    }

    /// Splits active segment `segment` into `parts` equal key ranges.
    pub async fn split_segment(
        &self,
        scope: &str,
        stream: &str,
        segment: u64,
        parts: u32,
    ) -> Result<StreamInfo, ClientError> {
        if !(2..=64).contains(&parts) {
            return Err(ClientError::InvalidArgument(format!("a segment splits into 2 to 64 parts, not {parts}")));
        }
        let info = self.get_stream(scope, stream).await?;
        let s = info.segments.iter().find(|s| s.number == segment).ok_or_else(|| {
            ClientError::InvalidArgument(format!("segment {segment} is not an active segment of {scope}/{stream}"))
        })?;
        let ranges = KeyRange { low: s.key_low, high: s.key_high }.split(parts);
        self.scale_stream(scope, stream, &[segment], &ranges).await
    }

    /// Merges adjacent active segments into one.
    pub async fn merge_segments(&self, scope: &str, stream: &str, segments: &[u64]) -> Result<StreamInfo, ClientError> {
        let info = self.get_stream(scope, stream).await?;
        let mut picked = Vec::new();
        for n in segments {
            picked.push(info.segments.iter().find(|s| s.number == *n).ok_or_else(|| {
                ClientError::InvalidArgument(format!("segment {n} is not an active segment of {scope}/{stream}"))
            })?);
        }
        let low = picked.iter().map(|s| s.key_low).fold(f64::INFINITY, f64::min);
        let high = picked.iter().map(|s| s.key_high).fold(f64::NEG_INFINITY, f64::max);
        self.scale_stream(scope, stream, segments, &[KeyRange { low, high }]).await
    }

    /// Every epoch of a stream and every segment it ever had, every segment's
    /// `sealed_epoch` set. The first call walks the history's pages; the client keeps the
    /// result, and later calls fetch only the pages from its last epoch on (that epoch read
    /// again shows the stream is the same one, not one deleted and created again under the
    /// name: then the walk starts over). Pages that do not follow on (the stream recreated
    /// during a walk) start the walk again, a few times.
    pub async fn stream_history(&self, scope: &str, stream: &str) -> Result<StreamHistory, ClientError> {
        const WALKS: u32 = 3;
        let key = (scope.to_string(), stream.to_string());
        let cached = self.inner.histories.lock().expect("histories lock").get(&key);
        for walk in 0..WALKS {
            let known = if walk == 0 { cached.as_deref() } else { None };
            let mut history = match known {
                Some(known) => match self.history_since(scope, stream, known).await? {
                    Some(h) => h,
                    None => continue,
                },
                None => self.stream_history_page(scope, stream, 0, 0).await?,
            };
            if !self.follow_pages(scope, stream, &mut history).await? {
                continue;
            }
            history.derive_sealed();
            self.inner.histories.lock().expect("histories lock").put(key, Arc::new(history.clone()));
            return Ok(history);
        }
        Err(ClientError::Server {
            code: ErrorCode::Conflict,
            message: format!("the history of {scope}/{stream} kept changing while it was read ({WALKS} tries)"),
            endpoint: None,
            offset: None,
        })
    }

    /// `known` with the first page after it (`next` set if more follow), or `None` if
    /// `known`'s last epoch is not the stream's any more.
    async fn history_since(
        &self,
        scope: &str,
        stream: &str,
        known: &StreamHistory,
    ) -> Result<Option<StreamHistory>, ClientError> {
        let Some(last) = known.epochs.last() else { return Ok(None) };
        let mut page = self.stream_history_page(scope, stream, last.epoch, 0).await?;
        if page.epochs.first() != Some(last) {
            return Ok(None);
        }
        page.epochs.remove(0);
        page.segments.retain(|s| s.created_epoch != last.epoch);
        let mut history = known.clone();
        history.extend(page);
        Ok(Some(history))
    }

    /// Fetches the pages after `history` while it has a `next`; false if one does not follow on.
    async fn follow_pages(&self, scope: &str, stream: &str, history: &mut StreamHistory) -> Result<bool, ClientError> {
        while let Some(from) = history.next {
            let page = self.stream_history_page(scope, stream, from, 0).await?;
            if page.epochs.first().map(|e| e.epoch) != Some(from) {
                return Ok(false);
            }
            history.extend(page);
        }
        Ok(true)
    }

    /// One page of a stream's history: epochs from `from_epoch` on, at most `limit` (0: as
    /// many as the server sends at once), with the segments they created; `next` is where
    /// the next page starts. A segment sealed by an epoch on a later page has no
    /// `sealed_epoch` here.
    pub async fn stream_history_page(
        &self,
        scope: &str,
        stream: &str,
        from_epoch: u64,
        limit: u32,
    ) -> Result<StreamHistory, ClientError> {
        self.admin(GetStreamHistory { scope: scope.into(), stream: stream.into(), from_epoch, limit }).await
    }

    pub async fn seal_stream(&self, scope: &str, stream: &str) -> Result<(), ClientError> {
        self.admin::<_, Done>(SealStream { scope: scope.into(), stream: stream.into() }).await.map(|_| ())
    }

    pub async fn delete_stream(&self, scope: &str, stream: &str) -> Result<(), ClientError> {
        self.admin_once(DeleteStream { scope: scope.into(), stream: stream.into() }, ErrorCode::NoSuchStream).await
    }

    pub async fn segment_info(&self, segment: &str) -> Result<SegmentInfo, ClientError> {
        self.segment_call(segment, GetSegmentInfo { segment: segment.into() }, Bytes::new()).await
    }

    /// Reads raw segment bytes from `offset`, waiting up to `wait` at the tail.
    pub async fn read_segment(
        &self,
        segment: &str,
        offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<(ReadReply, Bytes), ClientError> {
        let msg = Self::read_request(segment, offset, max_bytes, wait);
        self.with_retry(|| {
            let msg = msg.clone();
            async move {
                let conn = self.segment_connection(segment).await?;
                read_reply(conn.send_waiting(&msg, Bytes::new(), Some(wait)).await?)
            }
        })
        .await
    }

    /// Appends raw bytes, optionally only if the segment length equals `expected_offset`.
    /// Not numbered: a retry after a broken connection may append the bytes twice, or
    /// (conditional) fail its check on its own first attempt; see `append_raw_numbered`.
    pub async fn append_raw(
        &self,
        segment: &str,
        data: Bytes,
        expected_offset: Option<u64>,
    ) -> Result<AppendAck, ClientError> {
        self.append_raw_numbered(segment, data, expected_offset, 0, 0).await
    }

    /// `append_raw` as number `number` of writer `writer` (non-zero, numbers increasing per
    /// writer and segment): a resend of an append that is already in is answered as a
    /// duplicate (`AppendAck::duplicate`, before any conditional check) instead of being
    /// appended again or refused.
    pub async fn append_raw_numbered(
        &self,
        segment: &str,
        data: Bytes,
        expected_offset: Option<u64>,
        writer: u128,
        number: u64,
    ) -> Result<AppendAck, ClientError> {
        let msg = Append {
            segment: segment.into(),
            writer_id: writer,
            first_event_number: number,
            event_count: 0,
            expected_offset,
        };
        self.segment_call(segment, msg, data).await
    }

    pub async fn truncate_segment(&self, segment: &str, offset: u64) -> Result<(), ClientError> {
        self.segment_call::<_, Done>(segment, TruncateSegment { segment: segment.into(), offset }, Bytes::new())
            .await
            .map(|_| ())
    }

    /// A writer for `scope/stream`.
    pub async fn event_writer(&self, stream: &str) -> Result<EventWriter, ClientError> {
        self.event_writer_with(stream, WriterConfig::default()).await
    }

    pub async fn event_writer_with(&self, stream: &str, config: WriterConfig) -> Result<EventWriter, ClientError> {
        let s = parse_stream(stream)?;
        let info = self.get_stream(&s.scope, &s.stream).await?;
        if info.sealed {
            return Err(ClientError::InvalidArgument(format!("stream {s} is sealed")));
        }
        Ok(EventWriter::new(self.clone(), s, info.segments, config))
    }

    /// A reader over all segments of `scope/stream`.
    pub async fn event_reader(&self, stream: &str, from: ReadFrom) -> Result<EventReader, ClientError> {
        EventReader::start(self.clone(), parse_stream(stream)?, from).await
    }
}

/// Parses `scope/stream` with a clear error.
pub fn parse_stream(s: &str) -> Result<ScopedStream, ClientError> {
    ScopedStream::parse(s)
        .ok_or_else(|| ClientError::InvalidArgument(format!("'{s}' is not a stream name; expected scope/stream")))
}

/// A page's `next` as the next page's cursor (empty: there is none).
pub(crate) fn cursor(next: String) -> Option<String> {
    Some(next).filter(|n| !n.is_empty())
}

/// Every item of a paged list: `page(after)` gives a page and the next `after`, if any.
pub(crate) async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, ClientError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), ClientError>>,
{
    let (mut all, mut after) = (Vec::new(), String::new());
    loop {
        let (items, next) = page(after).await?;
        all.extend(items);
        match next {
            Some(next) => after = next,
            None => return Ok(all),
        }
    }
}

/// Scope and stream names that begin with `_` are Sluice's own: `<scope>/_rg_<group>` holds a
/// reader group's state and `_system/_retention` the retention service's marks. A stream a
/// user named `_rg_<group>` would be read as that group's state (and its events taken for
/// the group's updates), so `create_scope` and `create_stream*` refuse such names; the
/// server's own rules (letters, digits, `.`, `_`, `-`) apply to the rest.
fn reserved_name(kind: &str, name: &str) -> Result<(), ClientError> {
    if name.starts_with('_') {
        return Err(ClientError::InvalidArgument(format!(
            "{kind} name '{name}' begins with '_': such names are reserved for Sluice's own streams \
             (a reader group's state is kept in <scope>/_rg_<group>)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(n: usize) -> Arc<StreamHistory> {
        Arc::new(StreamHistory {
            scope: "s".into(),
            stream: format!("t{n}"),
            epochs: Vec::new(),
            segments: Vec::new(),
            next: None,
        })
    }

    /// A full cache drops the history used longest ago, not one in use.
    #[test]
    fn history_cache_drops_the_least_recently_used() {
        let mut cache = HistoryCache::default();
        let key = |n: usize| ("s".to_string(), format!("t{n}"));
        for n in 0..HISTORIES_CACHED {
            cache.put(key(n), history(n));
        }
        assert!(cache.get(&key(0)).is_some());
        cache.put(key(1000), history(1000));
        assert_eq!(cache.entries.len(), HISTORIES_CACHED);
        assert!(cache.get(&key(0)).is_some(), "used lately: kept");
        assert!(cache.get(&key(1)).is_none(), "the oldest unused: dropped");
        cache.put(key(2), history(2));
        assert_eq!(cache.entries.len(), HISTORIES_CACHED, "a known key replaces its entry");
    }

    #[test]
    fn addresses_normalize_to_host_port_or_unix_path() {
        assert_eq!(normalize("sluice://10.0.0.1:9090/").unwrap(), "10.0.0.1:9090");
        assert_eq!(normalize(":9091").unwrap(), "127.0.0.1:9091");
        assert_eq!(normalize("unix:/run/sluice.sock").unwrap(), "unix:/run/sluice.sock");
        assert_eq!(normalize("unix:///run/sluice.sock").unwrap(), "unix:/run/sluice.sock");
        assert_eq!(normalize(" unix:s.sock").unwrap(), "unix:s.sock");
        assert!(matches!(normalize("unix:"), Err(ClientError::InvalidArgument(_))));
        assert!(matches!(normalize("localhost"), Err(ClientError::InvalidArgument(_))));
    }
}
