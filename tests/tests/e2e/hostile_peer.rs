//! The client against a peer it cannot trust. A proxy between the client and a live
//! standalone server damages the server's replies at random: bytes flipped in a reply's
//! control archive or in its data, another kind, another request id, a reply dropped, sent
//! twice, held back behind the next one, cut short, replaced by a random typed error (with
//! random endpoints and offsets), garbage bytes, the connection closed. Calls of every area
//! (stream manager, writers, readers, transactions, reader groups, byte streams, batch
//! reads, cuts, statistics, raw segment calls) go through it from several tasks at once:
//! each must end, with a result or an error, within a bound (never hang), and no client
//! thread may panic. Then the replies are left alone, and the same client must work again:
//! a new stream written and read back whole and in per-key order. Nothing here asserts what
//! a damaged reply's call returned: without a checksum on replies (TCP's is the protocol's)
//! a damaged value can be taken for a sound one. Once against a standalone server, once
//! against a cluster of two nodes (its container map and redirects go through the proxy).
//!
//! Seeded (`SLUICE_TEST_FUZZ_SEED`), bounded in time. The proxy's threads are scheduled by
//! the system, so a seed repeats the damage chosen, not its exact interleaving.

use crate::request_fuzz::until_sound;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_client::{Client, ClientConfig, CutAt, GroupItem, ReadFrom, ReaderGroupConfig};
use sluice_net::frame::{FrameHeader, encode_frame, encode_frame_head};
use sluice_net::messages::*;
use sluice_tests::{Etcd, Server, TempDir, cli, free_ports};
use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// How long calls are started for, by how many tasks at once.
const FUZZ_TIME: Duration = Duration::from_secs(30);
const TASKS: usize = 4;
/// Replies damaged, per thousand (`SLUICE_TEST_FUZZ_PER_MILLE` for another share by hand).
const DAMAGE_PER_MILLE: u32 = 40;
/// How long one call of the workload may take before it counts as hung: far beyond its
/// retries (`CONFIG`: every request answered or given up within 2 s, retries for 3 s).
const CALL_WITHIN: Duration = Duration::from_secs(60);
/// Prefix of the names of the threads a panic of which fails the test (the client's
/// runtime; the proxy's threads).
const WATCHED: &str = "hostile-";

fn config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        retry_for: Duration::from_secs(3),
        append_answer_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Panics on watched threads, as "thread: message".
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records the panics of watched threads (other tests' panics pass through untouched).
fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let earlier = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if name.starts_with(WATCHED) {
                PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{name}: {info}"));
            }
            earlier(info);
        }));
    });
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Damage {
    ControlBytes,
    PayloadBytes,
    Kind,
    RequestId,
    Dropped,
    Twice,
    HeldBack,
    CutShort,
    TypedError,
    Garbage,
    Closed,
}

const DAMAGES: [Damage; 11] = [
    Damage::ControlBytes,
    Damage::PayloadBytes,
    Damage::Kind,
    Damage::RequestId,
    Damage::Dropped,
    Damage::Twice,
    Damage::HeldBack,
    Damage::CutShort,
    Damage::TypedError,
    Damage::Garbage,
    Damage::Closed,
];

/// A damaged reply claims a kind below this: any of them (1–75, requests a server never
/// sends among them) or one this build does not know.
const KINDS_BELOW: u16 = 80;

const HEADER: usize = sluice_net::constants::FRAME_HEADER_BYTES;

/// The header of a whole frame from the server (sound: damage comes after it is read).
fn header_of(frame: &[u8]) -> FrameHeader {
    FrameHeader::parse(frame[..HEADER].try_into().unwrap(), usize::MAX).expect("the server's frame header")
}

struct Shared {
    seed: u64,
    per_mille: AtomicU32,
    stop: AtomicBool,
    connections: AtomicU64,
    frames: AtomicU64,
    /// Error replies whose endpoint was rewritten (redirects through the proxy).
    redirects: AtomicU64,
    /// Server endpoint → the proxy's address for it.
    routes: Mutex<HashMap<String, String>>,
    /// Every socket of the proxy, shut when it stops.
    sockets: Mutex<Vec<TcpStream>>,
    tally: Mutex<BTreeMap<Damage, u64>>,
}

/// The damaging proxy: one listening address per server endpoint (the handshake's shard
/// map is rewritten to name them), two threads per connection.
struct Proxy(Arc<Shared>);

impl Proxy {
    fn start(upstream: &str, seed: u64) -> (Proxy, String) {
        let shared = Arc::new(Shared {
            seed,
            per_mille: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
            sockets: Mutex::new(Vec::new()),
            tally: Mutex::new(BTreeMap::new()),
        });
        let bootstrap = route(&shared, upstream);
        (Proxy(shared), bootstrap)
    }

    fn damage(&self, per_mille: u32) {
        self.0.per_mille.store(per_mille, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
        // Wakes each accepting thread (it sees `stop`) and ends each relaying one.
        for addr in self.0.routes.lock().unwrap().values() {
            let _ = TcpStream::connect(addr);
        }
        for s in self.0.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The proxy's address for server endpoint `upstream` (listening from now on).
fn route(shared: &Arc<Shared>, upstream: &str) -> String {
    let mut routes = shared.routes.lock().unwrap();
    if let Some(a) = routes.get(upstream) {
        return a.clone();
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = listener.local_addr().expect("addr").to_string();
    routes.insert(upstream.to_string(), addr.clone());
    let (shared, upstream) = (shared.clone(), upstream.to_string());
    std::thread::Builder::new()
        .name(format!("{WATCHED}proxy-accept"))
        .spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                relay(&shared, client, server);
            }
        })
        .expect("spawn");
    addr
}

/// Starts the two threads of a connection: requests pass untouched, replies are damaged.
fn relay(shared: &Arc<Shared>, client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let n = shared.connections.fetch_add(1, Ordering::SeqCst);
    {
        let mut sockets = shared.sockets.lock().unwrap();
        sockets.push(client.try_clone().expect("clone"));
        sockets.push(server.try_clone().expect("clone"));
    }
    let (mut from_client, mut to_server) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    std::thread::Builder::new()
        .name(format!("{WATCHED}proxy-up"))
        .spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
            let _ = to_server.shutdown(Shutdown::Both);
            let _ = from_client.shutdown(Shutdown::Both);
        })
        .expect("spawn");
    let shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("{WATCHED}proxy-down"))
        .spawn(move || {
            let rng = StdRng::seed_from_u64(shared.seed ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            replies(&shared, rng, server, client);
        })
        .expect("spawn");
}

/// Relays the server's replies frame by frame, damaging some.
fn replies(shared: &Arc<Shared>, mut rng: StdRng, mut server: TcpStream, mut client: TcpStream) {
    // A held-back frame goes out after the next one, or once the server is quiet a moment.
    let _ = server.set_read_timeout(Some(Duration::from_millis(50)));
    let mut held: Option<Vec<u8>> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    'outer: loop {
        while buf.len() >= HEADER {
            let header = header_of(&buf);
            let len = HEADER + header.body_len as usize;
            if buf.len() < len {
                break;
            }
            let mut frame: Vec<u8> = buf.drain(..len).collect();
            shared.frames.fetch_add(1, Ordering::Relaxed);
            if header.kind == Kind::HelloReply as u16 {
                frame = rewrite_hello(shared, frame);
            } else if header.kind == Kind::ErrorReply as u16 {
                frame = rewrite_error(shared, frame);
            }
            let damage = (rng.random_range(0..1000) < shared.per_mille.load(Ordering::SeqCst))
                .then(|| DAMAGES[rng.random_range(0..DAMAGES.len())]);
            let out = match damage {
                None => vec![frame],
                Some(d) => {
                    *shared.tally.lock().unwrap().entry(d).or_default() += 1;
                    match damaged(&mut rng, d, frame) {
                        Some(Ok(out)) => out,
                        Some(Err(f)) => {
                            held = held.or(Some(f));
                            Vec::new()
                        }
                        None => break 'outer,
                    }
                }
            };
            for f in out {
                if client.write_all(&f).is_err() {
                    break 'outer;
                }
            }
            if damage != Some(Damage::HeldBack)
                && let Some(h) = held.take()
                && client.write_all(&h).is_err()
            {
                break 'outer;
            }
        }
        match server.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if let Some(h) = held.take()
                    && client.write_all(&h).is_err()
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// The handshake reply with each shard endpoint replaced by the proxy's address for it.
fn rewrite_hello(shared: &Arc<Shared>, frame: Vec<u8>) -> Vec<u8> {
    let header = header_of(&frame);
    let (control_len, request_id) = (header.control_len as usize, header.request_id);
    let mut hello =
        HelloReply::from_control_bytes(&frame[HEADER..HEADER + control_len]).expect("the server's handshake");
    for s in &mut hello.shards {
        s.address = route(shared, &s.address);
    }
    for c in &mut hello.containers {
        if !c.is_empty() {
            *c = route(shared, c);
        }
    }
    let mut out = Vec::new();
    encode_frame(&mut out, request_id, &hello, &frame[HEADER + control_len..]);
    out
}

/// An error reply that names an endpoint (a cluster's `WrongHost`: the node that serves a
/// container now) with the proxy's address for it instead.
fn rewrite_error(shared: &Arc<Shared>, frame: Vec<u8>) -> Vec<u8> {
    let header = header_of(&frame);
    let control = &frame[HEADER..HEADER + header.control_len as usize];
    let mut e = ErrorReply::from_control_bytes(control).expect("the server's error reply");
    match e.endpoint.take() {
        Some(endpoint) if !endpoint.is_empty() => {
            shared.redirects.fetch_add(1, Ordering::Relaxed);
            e.endpoint = Some(route(shared, &endpoint));
            encode_frame_head(header.request_id, &e, 0)
        }
        _ => frame,
    }
}

/// `frame` with damage `d`: the frames to send instead (`Ok`), the frame to hold back
/// (`Err`), or `None`: close the connection.
#[allow(clippy::type_complexity)]
fn damaged(rng: &mut StdRng, d: Damage, mut frame: Vec<u8>) -> Option<Result<Vec<Vec<u8>>, Vec<u8>>> {
    let header = header_of(&frame);
    let (payload_at, request_id) = (HEADER + header.control_len as usize, header.request_id);
    let flip = |rng: &mut StdRng, frame: &mut Vec<u8>, from: usize, to: usize| {
        if from < to {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(from..to);
                frame[i] = if rng.random_bool(0.5) { frame[i] ^ (1 << rng.random_range(0..8)) } else { rng.random() };
            }
        }
    };
    Some(Ok(match d {
        Damage::ControlBytes => {
            flip(rng, &mut frame, HEADER, payload_at);
            vec![frame]
        }
        Damage::PayloadBytes => {
            let end = frame.len();
            flip(rng, &mut frame, payload_at, end);
            vec![frame]
        }
        Damage::Kind => {
            frame[4..6].copy_from_slice(&rng.random_range(0..KINDS_BELOW).to_le_bytes());
            vec![frame]
        }
        Damage::RequestId => {
            let ids = [request_id.wrapping_add(1), request_id.wrapping_sub(1), request_id + 2, 0, rng.random()];
            frame[8..16].copy_from_slice(&ids[rng.random_range(0..ids.len())].to_le_bytes());
            vec![frame]
        }
        Damage::Dropped => Vec::new(),
        Damage::Twice => vec![frame.clone(), frame],
        Damage::HeldBack => return Some(Err(frame)),
        Damage::CutShort => {
            // The payload cut short, or without one the control archive; the lengths fixed.
            let keep = if frame.len() > payload_at {
                rng.random_range(payload_at..frame.len())
            } else {
                let keep = rng.random_range(HEADER..=payload_at);
                frame[16..20].copy_from_slice(&((keep - HEADER) as u32).to_le_bytes());
                keep
            };
            frame.truncate(keep);
            frame[0..4].copy_from_slice(&((keep - 4) as u32).to_le_bytes());
            vec![frame]
        }
        Damage::TypedError => {
            let codes = [rng.random_range(1..=25), 0, 26, 999, u16::MAX];
            let endpoints = [None, Some(String::new()), Some("127.0.0.1:1".into()), Some("nowhere".into())];
            let offsets = [None, Some(0), Some(rng.random_range(0..1 << 20)), Some(u64::MAX)];
            let e = ErrorReply {
                code: codes[if rng.random_bool(0.8) { 0 } else { rng.random_range(1..codes.len()) }],
                message: "a hostile peer's error".into(),
                endpoint: endpoints[rng.random_range(0..endpoints.len())].clone(),
                offset: offsets[rng.random_range(0..offsets.len())],
            };
            vec![encode_frame_head(request_id, &e, 0)]
        }
        Damage::Garbage => {
            let n = rng.random_range(1..64);
            vec![(0..n).map(|_| rng.random()).collect(), frame]
        }
        Damage::Closed => return None,
    }))
}

/// One call of the workload (`i` picks which), through `client`; its name and whether it
/// succeeded. `n`: a number unique to the call, for names.
async fn call(client: &Client, i: usize, n: u64) -> (&'static str, Result<(), String>) {
    let e = |e: sluice_client::ClientError| e.to_string();
    match i {
        0 => ("create stream", client.create_stream("hp", &format!("c{}", n % 8), 1 + (n % 3) as u32).await.map_err(e)),
        1 => ("get stream", client.get_stream("hp", "a").await.map(|_| ()).map_err(e)),
        2 => ("history", client.stream_history("hp", "a").await.map(|_| ()).map_err(e)),
        3 => (
            "list",
            async {
                client.list_scopes().await?;
                client.list_streams("hp").await.map(|_| ())
            }
            .await
            .map_err(e),
        ),
        4 => (
            "write",
            async {
                let w = client.event_writer("hp/a").await?;
                let acks: Vec<_> = (0..20)
                    .map(|k| w.write_event(format!("k{}", k % 4).as_bytes(), format!("w{n}-{k}").into_bytes()))
                    .collect();
                for a in acks {
                    a.await?;
                }
                w.flush().await
            }
            .await
            .map_err(e),
        ),
        5 => (
            "read",
            async {
                let mut r = client.event_reader("hp/a", ReadFrom::Head).await?;
                for _ in 0..50 {
                    if r.read_next(Duration::from_millis(200)).await?.is_none() {
                        break;
                    }
                }
                Ok(())
            }
            .await
            .map_err(e),
        ),
        6 => (
            "transaction",
            async {
                let mut t = client.begin_txn("hp/a").await?;
                for k in 0..5 {
                    t.write_event(format!("k{k}").as_bytes(), format!("t{n}-{k}").as_bytes()).await?;
                }
                t.commit().await.map(|_| ())
            }
            .await
            .map_err(e),
        ),
        7 => (
            "reader group",
            async {
                let group =
                    client.create_reader_group("hp", &format!("g{n}"), ReaderGroupConfig::stream("hp/a")).await?;
                let mut r = group.create_reader("r").await?;
                for _ in 0..20 {
                    match r.read_next(Duration::from_millis(200)).await? {
                        Some(GroupItem::Event(_) | GroupItem::Checkpoint(_)) => {}
                        None => break,
                    }
                }
                Ok(())
            }
            .await
            .map_err(e),
        ),
        8 => (
            "byte stream",
            async {
                let mut w = client.byte_writer("hp/bytes").await?;
                w.write(vec![n as u8; 100]).await?;
                w.flush().await?;
                let mut r = client.byte_reader("hp/bytes").await?;
                r.read(4096, Duration::from_millis(100)).await.map(|_| ())
            }
            .await
            .map_err(e),
        ),
        9 => (
            "batch read",
            async {
                let slices = client.segment_slices("hp/a", None, None).await?;
                if let Some(s) = slices.into_iter().next() {
                    let mut r = client.read_slice(s);
                    for _ in 0..50 {
                        if r.next_event().await?.is_none() {
                            break;
                        }
                    }
                }
                Ok(())
            }
            .await
            .map_err(e),
        ),
        10 => (
            "stream cut",
            async {
                let cut = client.stream_cut("hp/a", CutAt::Tail).await?;
                client.validate_cut(&cut).await
            }
            .await
            .map_err(e),
        ),
        11 => ("statistics", client.shard_stats(false).await.map(|_| ()).map_err(e)),
        12 => (
            "segment calls",
            async {
                client.segment_info("hp/a/0").await?;
                client.read_segment("hp/a/0", 0, 4096, Duration::ZERO).await.map(|_| ())
            }
            .await
            .map_err(e),
        ),
        _ => (
            "split",
            async {
                let info = client.get_stream("hp", "split").await?;
                let first = info.segments.first().map(|s| s.number).unwrap_or(0);
                client.split_segment("hp", "split", first, 2).await.map(|_| ())
            }
            .await
            .map_err(e),
        ),
    }
}

const CALLS: usize = 14;

#[test]
fn the_client_survives_a_peer_that_damages_its_replies() {
    let dir = TempDir::new("hostile-peer");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    through_a_hostile_peer(&[server]);
}

/// The same against a cluster of two nodes, which a third node joins after a third of the
/// time and leaves (SIGTERM: a hand-off) after two thirds: the client's container map, its
/// redirects (`WrongHost` names the node that serves a container now; the proxy names its
/// own address for it) and its refreshes meet damaged replies while containers move. Stream
/// operations reach other nodes' containers node to node, not through the proxy.
#[test]
fn the_client_survives_a_cluster_whose_replies_are_damaged() {
    let etcd = Etcd::start();
    let dir = TempDir::new("hostile-cluster");
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let args = ["--tier2", &tier2, "--containers-per-core", "4", "--lease-ttl-s", "3"];
    let node = |i: usize| {
        let data = dir.0.join(format!("node{i}"));
        Server::start_node(&data, free_ports(1), 1, &etcd.endpoint, "hp", &format!("n{i}"), &args, &[])
    };
    let nodes = [node(0), node(1)];
    let third = std::thread::scope(|s| {
        let third = s.spawn(|| {
            std::thread::sleep(FUZZ_TIME / 3);
            let mut n2 = node(2);
            eprintln!("hostile cluster: n2 joined");
            std::thread::sleep(FUZZ_TIME / 3);
            let status = ["cluster", "status", "--etcd", &etcd.endpoint, "--cluster", "hp"];
            eprintln!("hostile cluster before n2 leaves:\n{}", cli("", &status, None).1);
            let stopped = n2.terminate(Duration::from_secs(60));
            eprintln!("hostile cluster: n2 left (clean exit: {stopped})");
            (stopped, n2.output())
        });
        through_a_hostile_peer(&nodes);
        third.join().expect("the third node's thread")
    });
    assert!(third.0, "the third node handed off and stopped cleanly:\n{}", third.1);
    assert!(!third.1.contains("panicked"), "the third node panicked:\n{}", third.1);
}

/// The fuzz against `servers` (a standalone server, or a cluster's nodes: the client starts
/// from the first), then the checks.
fn through_a_hostile_peer(servers: &[Server]) {
    watch_panics();
    let seed: u64 = std::env::var("SLUICE_TEST_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    let url = servers[0].url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{WATCHED}client"))
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if servers.len() > 1 {
            // Every node serves containers before the calls begin.
            until_sound(&url, Some(servers.len())).await;
        }
        let direct = Client::connect(&url).await.unwrap();
        direct.create_scope("hp").await.unwrap();
        direct.create_stream("hp", "a", 3).await.unwrap();
        direct.create_stream("hp", "split", 1).await.unwrap();
        direct.create_byte_stream("hp", "bytes").await.unwrap();
        let w = direct.event_writer("hp/a").await.unwrap();
        for k in 0..200 {
            w.write_event(format!("k{}", k % 4).as_bytes(), format!("first {k}").into_bytes());
        }
        w.flush().await.unwrap();

        let (proxy, bootstrap) = Proxy::start(&url, seed);
        let client = Client::connect_with(&bootstrap, config()).await.unwrap();
        let per_mille = std::env::var("SLUICE_TEST_FUZZ_PER_MILLE").ok().and_then(|s| s.parse().ok());
        proxy.damage(per_mille.unwrap_or(DAMAGE_PER_MILLE));
        let began = Instant::now();
        let numbers = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (client, numbers) = (client.clone(), numbers.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
                let mut outcomes: BTreeMap<(&'static str, bool), u64> = BTreeMap::new();
                let mut hung = Vec::new();
                while began.elapsed() < FUZZ_TIME {
                    let i = rng.random_range(0..CALLS);
                    let n = numbers.fetch_add(1, Ordering::SeqCst);
                    match tokio::time::timeout(CALL_WITHIN, call(&client, i, n)).await {
                        Ok((name, r)) => *outcomes.entry((name, r.is_ok())).or_default() += 1,
                        Err(_) => {
                            hung.push(i);
                            break;
                        }
                    }
                }
                (outcomes, hung)
            }));
        }
        let mut outcomes: BTreeMap<(&'static str, bool), u64> = BTreeMap::new();
        let mut hung = Vec::new();
        for t in tasks {
            let (o, h) = t.await.expect("a workload task panicked");
            for (k, v) in o {
                *outcomes.entry(k).or_default() += v;
            }
            hung.extend(h);
        }
        let tally = proxy.0.tally.lock().unwrap().clone();
        eprintln!(
            "hostile peer (seed {seed}, {} server(s)): {} replies ({} redirects) relayed over {} connections to {} \
             endpoints in {:?}; damaged: {tally:?}",
            servers.len(),
            proxy.0.frames.load(Ordering::SeqCst),
            proxy.0.redirects.load(Ordering::SeqCst),
            proxy.0.connections.load(Ordering::SeqCst),
            proxy.0.routes.lock().unwrap().len(),
            began.elapsed()
        );
        for ((name, ok), count) in &outcomes {
            eprintln!("  {name:<14} {:<6} {count}", if *ok { "ok" } else { "failed" });
        }
        let panics = PANICS.lock().unwrap().clone();
        assert!(panics.is_empty(), "client or proxy threads panicked:\n{}", panics.join("\n"));
        assert!(hung.is_empty(), "calls hung for {CALL_WITHIN:?} (seed {seed}): {hung:?}");
        let damaged: u64 = tally.values().sum();
        assert!(damaged >= 50, "only {damaged} replies damaged");
        assert!(outcomes.iter().any(|((_, ok), _)| *ok), "no call succeeded");

        // The replies left alone: the same client works again.
        proxy.damage(0);
        let sound = async {
            client.create_stream("hp", "after", 3).await.unwrap();
            let w = client.event_writer("hp/after").await.unwrap();
            for i in 0..300 {
                w.write_event(format!("k{}", i % 5).as_bytes(), format!("{} {i}", i % 5).into_bytes());
            }
            w.flush().await.unwrap();
            let mut r = client.event_reader("hp/after", ReadFrom::Head).await.unwrap();
            let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            while let Some(e) = r.read_next(Duration::from_secs(2)).await.unwrap() {
                let text = String::from_utf8(e.payload.to_vec()).unwrap();
                let (key, i) = text.split_once(' ').unwrap();
                per_key.entry(key.to_string()).or_default().push(i.parse().unwrap());
            }
            for (key, got) in &per_key {
                let want: Vec<u32> = (0..300).filter(|i| (i % 5).to_string() == *key).collect();
                assert_eq!(got, &want, "key {key}: every event once, in order");
            }
            assert_eq!(per_key.len(), 5);
        };
        tokio::time::timeout(Duration::from_secs(60), sound)
            .await
            .expect("the client works again once the replies are sound");
        let panics = PANICS.lock().unwrap().clone();
        assert!(panics.is_empty(), "client or proxy threads panicked:\n{}", panics.join("\n"));
        drop(proxy);
    });
    // The server saw only well-formed requests, whatever the client made of its replies.
    let (ok, out, err) = cli(&url, &["stats", "--check"], None);
    assert!(ok, "the server reports a problem:\n{out}\n{err}");
    for server in servers {
        assert!(!server.output().contains("panicked"), "a server panicked:\n{}", server.output());
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
}
