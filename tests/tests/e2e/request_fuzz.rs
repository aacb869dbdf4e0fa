//! Requests of every kind with random contents, sent one at a time to a live server (with
//! tier-2, without, a two-node cluster on etcd, and that cluster with a node leaving and
//! joining again meanwhile): names of things that exist and of things that do not (shadow
//! segments, names at and over the length limit, empty ones), numbers at their limits, NaN
//! and infinite key ranges, random policies, broken event framing. Each request is answered
//! or its connection is closed, never left hanging; no server panics or stops a container,
//! they keep serving, and start again from their logs after a SIGKILL. Seeded, bounded in
//! count and time.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_client::{Client, ReadFrom};
use sluice_net::frame::{FrameDecoder, encode_frame};
use sluice_net::messages::*;
use sluice_net::txn::shadow_segment_name;
use sluice_net::{Retention, ScalingPolicy};
use sluice_tests::{Etcd, Server, TempDir, cli, free_ports, small_log_with_tier2};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Requests sent at most to a standalone server and to a cluster (slower: metadata in etcd,
/// node-to-node calls), and the time they may take together.
const REQUESTS: usize = 10_000;
const CLUSTER_REQUESTS: usize = 3_000;
const FUZZ_TIME: Duration = Duration::from_secs(60);
/// How long one request may go unanswered with its connection open.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Random field values, biased towards what reaches past the first checks.
struct Gen {
    rng: StdRng,
    /// Transaction ids requests name (some begun by earlier requests).
    txns: Vec<u128>,
}

impl Gen {
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.rng.random_range(0..xs.len())].clone()
    }

    fn odd_name(&mut self) -> String {
        let long = "n".repeat(sluice_net::constants::NAME_BYTES_MAX);
        let over = "o".repeat(sluice_net::constants::NAME_BYTES_MAX + 1);
        self.pick(&["", " ", "a/b", "..", "é", "x\0y", "#txn.1", "+1", "-", long.as_str(), over.as_str()]).to_string()
    }

    fn scope(&mut self) -> String {
        if self.rng.random_bool(0.85) { self.pick(&["fz", "fz", "fz", "gz"]).to_string() } else { self.odd_name() }
    }

    fn stream(&mut self) -> String {
        if self.rng.random_bool(0.85) { self.pick(&["s", "s", "t", "u", "v"]).to_string() } else { self.odd_name() }
    }

    fn number(&mut self) -> u64 {
        self.pick(&[0, 0, 1, 2, 3, 4, 5, 7, 1 << 32, u64::MAX])
    }

    fn segment(&mut self) -> String {
        if self.rng.random_bool(0.5) {
            // One the server has (until the requests scale, seal or delete it).
            let (stream, n) = if self.rng.random_bool(0.7) {
                ("s", self.rng.random_range(0..4))
            } else {
                ("t", self.rng.random_range(0..2))
            };
            return format!("fz/{stream}/{n}");
        }
        let (scope, stream, n) = (self.scope(), self.stream(), self.number());
        match self.rng.random_range(0..10) {
            0 => {
                let txn = self.txn();
                shadow_segment_name(&scope, &stream, n, txn)
            }
            1 => self.pick(&["fz/s/+1", "fz/s/01", "fz/s/", "fz//0", "/", "", "fz/s/0/1", "fz/s/-1"]).to_string(),
            2 => self.odd_name(),
            _ => format!("{scope}/{stream}/{n}"),
        }
    }

    fn txn(&mut self) -> u128 {
        if self.rng.random_bool(0.9) { self.pick(&self.txns.clone()) } else { self.rng.random() }
    }

    fn u64(&mut self) -> u64 {
        if self.rng.random_bool(0.3) {
            return self.rng.random_range(0..100_000);
        }
        self.pick(&[0, 1, 2, 7, 100, 4096, 1 << 20, u32::MAX as u64, u64::MAX / 2, u64::MAX - 1, u64::MAX])
    }

    fn u32(&mut self) -> u32 {
        if self.rng.random_bool(0.3) {
            return self.rng.random_range(0..100);
        }
        self.pick(&[0, 1, 2, 3, 4, 16, 1000, 1024, 1025, 100_000, u32::MAX])
    }

    fn f64(&mut self) -> f64 {
        if self.rng.random_bool(0.3) {
            return self.rng.random();
        }
        self.pick(&[
            0.0,
            0.25,
            0.5,
            0.75,
            1.0,
            -0.5,
            1.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ])
    }

    fn retention(&mut self) -> Retention {
        match self.rng.random_range(0..3) {
            0 => Retention::None,
            1 => Retention::Time { min_ms: self.u64(), max_ms: self.u64() },
            _ => Retention::Size { min_bytes: self.u64(), max_bytes: self.u64() },
        }
    }

    fn scaling(&mut self) -> ScalingPolicy {
        match self.rng.random_range(0..3) {
            0 => ScalingPolicy::Fixed { segments: self.u32() },
            1 => ScalingPolicy::ByEventRate { events_per_s: self.u32(), factor: self.u32(), min_segments: self.u32() },
            _ => ScalingPolicy::ByByteRate { kib_per_s: self.u32(), factor: self.u32(), min_segments: self.u32() },
        }
    }

    /// A stream to seal or delete: never `fz/s`, which the requests keep writing to.
    fn doomed_stream(&mut self) -> String {
        let s = self.stream();
        if s == "s" { "u".into() } else { s }
    }

    fn ranges(&mut self) -> Vec<KeyRange> {
        if self.rng.random_bool(0.3) {
            let n = self.pick(&[1u32, 2, 3, 1025]);
            return KeyRange { low: self.f64(), high: self.f64() }.split(n);
        }
        (0..self.rng.random_range(0..4)).map(|_| KeyRange { low: self.f64(), high: self.f64() }).collect()
    }

    /// Event data: well framed, or not (a length past the end, a zero length, a huge one).
    fn events(&mut self) -> (u32, Vec<u8>) {
        let count = self.rng.random_range(0..5u32);
        let mut out = Vec::new();
        for i in 0..count {
            let len = self.rng.random_range(0..64u32);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend((0..len).map(|b| (b + i) as u8));
        }
        match self.rng.random_range(0..6) {
            0 => out.truncate(self.rng.random_range(0..=out.len())),
            1 => out.extend_from_slice(&u32::MAX.to_le_bytes()),
            2 => {
                if let Some(b) = out.first_mut() {
                    *b = self.rng.random();
                }
            }
            _ => {}
        }
        let claimed = if self.rng.random_bool(0.8) { count } else { self.u32() };
        (claimed, out)
    }

    /// One request frame with id `id`, and what it is (for a failure's message).
    fn request(&mut self, id: u64) -> (Vec<u8>, String) {
        let mut f = Vec::new();
        macro_rules! send {
            ($msg:expr) => {{
                let m = $msg;
                encode_frame(&mut f, id, &m, b"");
                format!("{m:?}")
            }};
            ($msg:expr, $payload:expr) => {{
                let m = $msg;
                let p: Vec<u8> = $payload;
                encode_frame(&mut f, id, &m, &p);
                format!("{m:?} with {} payload bytes", p.len())
            }};
        }
        let what = match self.rng.random_range(0..36) {
            0 => send!(CreateScope { scope: self.scope() }),
            1 => send!(DeleteScope { scope: self.scope() }),
            2 => send!(ListScopes { after: self.scope(), limit: self.u32() }),
            3 | 4 => send!(CreateStream {
                scope: self.scope(),
                stream: self.stream(),
                segments: self.u32(),
                retention: self.retention(),
                scaling: self.scaling(),
            }),
            5 => send!(ListStreams { scope: self.scope(), after: self.stream(), limit: self.u32() }),
            6 => send!(GetStream { scope: self.scope(), stream: self.stream() }),
            7 => send!(SealStream { scope: self.scope(), stream: self.doomed_stream() }),
            8 => send!(DeleteStream { scope: self.scope(), stream: self.doomed_stream() }),
            9 | 10 => send!(UpdateStream {
                scope: self.scope(),
                stream: self.stream(),
                retention: self.rng.random_bool(0.5).then(|| self.retention()),
                scaling: self.rng.random_bool(0.5).then(|| self.scaling()),
            }),
            11 | 12 => {
                if self.rng.random_bool(0.4) {
                    // A split of one of `fz/s`'s first segments (it takes while it has it).
                    let n = self.rng.random_range(0..4u64);
                    let ranges = KeyRange { low: n as f64 / 4.0, high: (n + 1) as f64 / 4.0 }.split(self.pick(&[2, 3]));
                    send!(ScaleStream { scope: "fz".into(), stream: "s".into(), seal: vec![n], ranges })
                } else {
                    let seal = (0..self.rng.random_range(0..4)).map(|_| self.number()).collect();
                    send!(ScaleStream { scope: self.scope(), stream: self.stream(), seal, ranges: self.ranges() })
                }
            }
            13 => send!(GetStreamHistory {
                scope: self.scope(),
                stream: self.stream(),
                from_epoch: self.u64(),
                limit: self.u32()
            }),
            14 => send!(CreateSegment { segment: self.segment() }),
            15..=18 => {
                let (event_count, data) = self.events();
                let writer_id = if self.rng.random_bool(0.5) { 0 } else { self.rng.random_range(1..4) };
                send!(
                    Append {
                        segment: self.segment(),
                        writer_id,
                        first_event_number: self.u64(),
                        event_count,
                        expected_offset: self.rng.random_bool(0.3).then(|| self.u64()),
                    },
                    data
                )
            }
            19 | 20 => {
                let mut payload = Vec::new();
                let mut parts = Vec::new();
                for _ in 0..self.rng.random_range(0..4) {
                    let (event_count, data) = self.events();
                    let data_bytes = if self.rng.random_bool(0.85) { data.len() as u32 } else { self.u32() };
                    parts.push(AppendPart {
                        segment: self.segment(),
                        writer_id: self.rng.random_range(0..4),
                        first_event_number: self.u64(),
                        event_count,
                        data_bytes,
                    });
                    payload.extend(data);
                }
                send!(Appends { parts }, payload)
            }
            21 | 22 => send!(Read {
                segment: self.segment(),
                offset: self.u64(),
                max_bytes: self.u32(),
                wait_ms: self.rng.random_range(0..50),
            }),
            23 => send!(GetSegmentInfo { segment: self.segment() }),
            24 => send!(SealSegment { segment: self.segment() }),
            25 => send!(TruncateSegment { segment: self.segment(), offset: self.u64() }),
            26 => send!(DeleteSegment { segment: self.segment() }),
            27 => {
                let (segment, source) = if self.rng.random_bool(0.5) {
                    // A transaction's shadow into its own segment.
                    let (stream, n, txn) = (self.stream(), self.number(), self.txn());
                    (format!("fz/{stream}/{n}"), shadow_segment_name("fz", &stream, n, txn))
                } else {
                    (self.segment(), self.segment())
                };
                let source_length = self.rng.random_bool(0.5).then(|| self.u64());
                send!(MergeSegment { segment, source, source_length })
            }
            28 => send!(BeginTxn { scope: self.scope(), stream: self.stream(), txn: self.txn(), lease_ms: self.u64() }),
            29 => match self.rng.random_range(0..4) {
                0 => send!(GetTxn { scope: self.scope(), stream: self.stream(), txn: self.txn() }),
                1 => send!(ListTxns {
                    scope: self.scope(),
                    stream: self.stream(),
                    after: self.odd_name(),
                    limit: self.u32()
                }),
                2 => {
                    send!(PingTxn { scope: self.scope(), stream: self.stream(), txn: self.txn(), lease_ms: self.u64() })
                }
                _ => send!(ForgetTxn { scope: self.scope(), stream: self.stream(), txn: self.txn() }),
            },
            30 => {
                let lengths = (0..self.rng.random_range(0..5)).map(|_| self.u64()).collect();
                send!(CommitTxn { scope: self.scope(), stream: self.stream(), txn: self.txn(), lengths })
            }
            31 => match self.rng.random_range(0..2) {
                0 => send!(FinishCommit { scope: self.scope(), stream: self.stream(), txn: self.txn() }),
                _ => send!(AbortTxn { scope: self.scope(), stream: self.stream(), txn: self.txn() }),
            },
            32 => {
                let group = self.pick(&["g", "h", ""]).to_string();
                match self.rng.random_range(0..4) {
                    0 => send!(AddSubscriber { scope: self.scope(), stream: self.stream(), group }),
                    1 => send!(RemoveSubscriber { scope: self.scope(), stream: self.stream(), group }),
                    2 => send!(ListSubscribers { scope: self.scope(), stream: self.stream() }),
                    _ => {
                        let positions = (0..self.rng.random_range(0..4))
                            .map(|_| SegmentOffset { segment: self.number(), offset: self.u64() })
                            .collect();
                        send!(UpdateSubscriber { scope: self.scope(), stream: self.stream(), group, positions })
                    }
                }
            }
            33 => send!(GetStats { reset: self.rng.random_bool(0.5) }),
            34 => {
                let containers = (0..self.rng.random_range(0..3)).map(|_| self.u32()).collect();
                // A rate of 0 reads at full speed; the log here is small.
                send!(ScrubLog { containers, bytes_per_sec: self.pick(&[0, 1 << 30]) })
            }
            _ => send!(ListSegmentLengths { after: self.segment(), limit: self.u32() }),
        };
        (f, what)
    }
}

/// A connection to one shard that sends one request at a time and waits for its answer.
struct Conn {
    addr: String,
    stream: Option<TcpStream>,
    dec: FrameDecoder,
    /// The last handshake's reply.
    hello: Option<HelloReply>,
}

enum Answer {
    Reply(sluice_net::Frame),
    /// The server closed the connection instead (it does after some refusals).
    Closed,
}

impl Conn {
    fn new(addr: &str) -> Self {
        Conn { addr: addr.to_string(), stream: None, dec: FrameDecoder::new(64 << 20), hello: None }
    }

    fn open(&mut self) -> &mut TcpStream {
        if self.stream.is_none() {
            let mut s = TcpStream::connect(&self.addr).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr));
            s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
            let mut hello = Vec::new();
            encode_frame(&mut hello, 0, &Hello::current("request-fuzz"), b"");
            s.write_all(&hello).unwrap();
            self.dec = FrameDecoder::new(64 << 20);
            self.stream = Some(s);
            match self.wait_for(0, "the handshake") {
                Answer::Reply(f) => self.hello = Some(f.decode().expect("a handshake reply")),
                Answer::Closed => panic!("{} closed the connection at the handshake", self.addr),
            }
        }
        self.stream.as_mut().expect("connected")
    }

    fn ask(&mut self, frame: &[u8], id: u64, what: &str) -> Answer {
        if self.open().write_all(frame).is_err() {
            self.stream = None;
            return Answer::Closed;
        }
        self.wait_for(id, what)
    }

    /// As `ask`, on a new connection once more if this one was closed before the answer
    /// (after an earlier request's refusal).
    fn ask_again_if_closed(&mut self, frame: &[u8], id: u64, what: &str) -> Answer {
        match self.ask(frame, id, what) {
            Answer::Closed => self.ask(frame, id, what),
            answer => answer,
        }
    }

    fn wait_for(&mut self, id: u64, what: &str) -> Answer {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) if f.request_id == id => return Answer::Reply(f),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("the server sent a broken frame after {what}: {e}"),
            }
            let s = self.stream.as_mut().expect("connected");
            match s.read(&mut buf) {
                Ok(0) => {
                    self.stream = None;
                    return Answer::Closed;
                }
                Ok(n) => self.dec.extend(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("no answer within {ANSWER_WITHIN:?} and the connection still open, to {what}")
                }
                Err(_) => {
                    self.stream = None;
                    return Answer::Closed;
                }
            }
        }
    }
}

/// With tier-2 (the mover, chunks, freed log files reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_of_every_kind_are_answered_and_break_nothing() {
    fuzz(true).await;
}

/// Without tier-2 (log files freed by relocating what they still hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_without_tier2_are_answered_and_break_nothing() {
    fuzz(false).await;
}

/// A cluster of two nodes (etcd, a shared tier-2): requests reach segments and streams
/// through the node that does not serve them too (node-to-node calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_to_a_cluster_are_answered_and_break_nothing() {
    fuzz_cluster("request-fuzz-cluster", None).await;
}

/// The same, with a node leaving (SIGTERM: it hands its containers to the other) after a
/// third of the requests and joining again (it takes containers back) after two thirds:
/// containers hand over with whatever the requests left in them (shadow segments, sealed
/// and truncated segments, merges half done, writers' numbers), while requests keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_to_a_cluster_while_a_node_leaves_and_joins_break_nothing() {
    fuzz_cluster("request-fuzz-handoff", Some(Leave::HandOff)).await;
}

/// The same with the node killed (SIGKILL) instead and started again a second later: its
/// containers wait for it (their logs are on its disk) and it takes them back from its logs,
/// with whatever the requests left in them, while requests keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_to_a_cluster_while_a_node_dies_and_comes_back_break_nothing() {
    fuzz_cluster("request-fuzz-failover", Some(Leave::Killed)).await;
}

/// How a node leaves in the middle of the requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Leave {
    /// SIGTERM: it hands its containers off and exits.
    HandOff,
    /// SIGKILL, and a start again a second later (in the background: requests that need
    /// its containers wait for it).
    Killed,
}

/// The requests to a cluster of two nodes (see `cluster_nodes`; a temporary directory
/// named by `tag`), one of which leaves meanwhile if `leave` says how.
async fn fuzz_cluster(tag: &str, leave: Option<Leave>) {
    let etcd = Etcd::start();
    let dir = TempDir::new(tag);
    let nodes = cluster_nodes(&etcd, &dir);
    // Both nodes serve containers before the requests begin.
    until_sound(&nodes[0].url(), Some(2)).await;
    fuzz_servers(nodes, CLUSTER_REQUESTS, leave).await;
}

/// Two nodes of cluster "fz" in `etcd`, a shared tier-2 under `dir`, small log files, the
/// services every 200 ms.
fn cluster_nodes(etcd: &Etcd, dir: &TempDir) -> Vec<Server> {
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let mut args: Vec<String> = ["--tier2", &tier2, "--containers-per-core", "4", "--log-file-mb", "1"]
        .iter()
        .chain(&["--move-min-kb", "64", "--lease-ttl-s", "3"])
        .map(|s| s.to_string())
        .collect();
    args.extend(SERVICES_QUICK.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (0..2)
        .map(|i| {
            let data = dir.0.join(format!("node{i}"));
            Server::start_node(&data, free_ports(1), 1, &etcd.endpoint, "fz", &format!("n{i}"), &args, &[])
        })
        .collect()
}

/// The services (retention, auto-scaling, transaction timeouts) every 200 ms.
const SERVICES_QUICK: [&str; 6] =
    ["--retention-interval-ms", "200", "--autoscale-interval-ms", "200", "--txn-interval-ms", "200"];

/// Waits (at most 30 s) until `sluice stats --check` through `url` passes, covering `nodes`
/// nodes if given (a cluster's ownership settles after a start).
pub(crate) async fn until_sound(url: &str, nodes: Option<usize>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = cli(url, &["stats", "--json", "--check"], None);
        let covered = nodes.is_none_or(|n| {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let shards = v["shards"].as_array().cloned().unwrap_or_default();
            let names: std::collections::HashSet<String> =
                shards.iter().filter_map(|s| s["node"].as_str().map(String::from)).collect();
            names.len() == n
        });
        if ok && covered {
            return;
        }
        assert!(Instant::now() < deadline, "a container reports a problem:\n{out}\n{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fuzz(with_tier2: bool) {
    let dir = TempDir::new(if with_tier2 { "request-fuzz" } else { "request-fuzz-log" });
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let mut args = if with_tier2 { small_log_with_tier2(&tier2) } else { vec!["--log-file-mb".into(), "1".into()] };
    args.extend(SERVICES_QUICK.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(&dir.0.join("data"), free_ports(2), 2, &args);
    fuzz_servers(vec![server], REQUESTS, None).await;
}

/// `requests` requests against `servers` (one standalone server, or a cluster's nodes),
/// then the checks. `leave`: the last server leaves (as it says) after a third of the
/// requests and joins again after two thirds.
async fn fuzz_servers(servers: Vec<Server>, requests: usize, leave: Option<Leave>) {
    let url = servers[0].url();
    let began = Instant::now();
    // Things for the requests to find: a scope, streams with events, a transaction.
    let client = Client::connect(&url).await.unwrap();
    client.create_scope("fz").await.unwrap();
    client.create_stream("fz", "s", 4).await.unwrap();
    client.create_stream("fz", "t", 2).await.unwrap();
    for stream in ["fz/s", "fz/t"] {
        let w = client.event_writer(stream).await.unwrap();
        for i in 0..200 {
            w.write_event(format!("k{}", i % 7).as_bytes(), format!("{stream} {i}").into_bytes());
        }
        w.flush().await.unwrap();
    }
    let begun = client.begin_txn("fz/s").await.unwrap();
    let txns = vec![begun.id(), 1, 2, 3];

    // Every shard's endpoint, with the index of its server, from their handshakes.
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let (endpoints, owners): (Vec<String>, Vec<usize>) = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let mut c = Conn::new(url);
            c.open();
            all.extend(c.hello.take().expect("a handshake").shards.into_iter().map(|s| (s.address, i)));
        }
        all.into_iter().unzip()
    })
    .await
    .unwrap();
    assert_eq!(endpoints.len(), 2, "{endpoints:?}");

    // Another seed (e.g. to look further by hand): SLUICE_TEST_FUZZ_SEED.
    let seed = std::env::var("SLUICE_TEST_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207);
    eprintln!("request fuzz: seed {seed}");
    let (sent, replies, closed, tally, mut servers) = tokio::task::spawn_blocking(move || {
        let mut servers = servers;
        let mut gen_ = Gen { rng: StdRng::seed_from_u64(seed), txns };
        let mut conns: Vec<Conn> = endpoints.iter().map(|a| Conn::new(a)).collect();
        let started = Instant::now();
        let (mut sent, mut replies, mut closed) = (0usize, 0usize, 0usize);
        // (request kind, answer) -> count: which requests got past the first checks.
        let mut tally = std::collections::BTreeMap::<(String, String), usize>::new();
        // With `leave`: the server that is away, whose shards get no requests.
        let leaving = servers.len() - 1;
        let (mut away, mut left) = (None, false);
        let mut restarting: Option<std::thread::JoinHandle<Server>> = None;
        // The away server back: the killed one's start awaited, the stopped one started.
        let come_back =
            |servers: &mut Vec<Server>, restarting: &mut Option<std::thread::JoinHandle<Server>>| match restarting
                .take()
            {
                Some(h) => servers.push(h.join().expect("the node started again")),
                None => servers[leaving].restart(),
            };
        // The time the node took to leave and start again is not the requests'.
        let mut paused = Duration::ZERO;
        while sent < requests && started.elapsed().saturating_sub(paused) < FUZZ_TIME {
            if let Some(how) = leave
                && !left
                && sent == requests / 3
            {
                let at = Instant::now();
                match how {
                    Leave::HandOff => assert!(
                        servers[leaving].terminate(Duration::from_secs(60)),
                        "the leaving node stopped cleanly:\n{}",
                        servers[leaving].output()
                    ),
                    Leave::Killed => {
                        let mut node = servers.pop().expect("the leaving node");
                        node.kill();
                        restarting = Some(std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_secs(1));
                            node.restart();
                            node
                        }));
                    }
                }
                eprintln!("request fuzz: node {leaving} left ({how:?}) after {sent} requests in {:?}", at.elapsed());
                paused += at.elapsed();
                (away, left) = (Some(leaving), true);
            } else if away.is_some() && sent == 2 * requests / 3 {
                let at = Instant::now();
                come_back(&mut servers, &mut restarting);
                eprintln!(
                    "request fuzz: node {leaving} joined again after {sent} requests ({:?} after the start)",
                    started.elapsed()
                );
                paused += at.elapsed();
                away = None;
            }
            let id = sent as u64 + 1;
            let (frame, what) = gen_.request(id);
            let live: Vec<usize> = (0..conns.len()).filter(|&i| Some(owners[i]) != away).collect();
            let mut shard = live[gen_.rng.random_range(0..live.len())];
            // As a client would: a redirect is followed once.
            let mut answer = conns[shard].ask_again_if_closed(&frame, id, &what);
            if let Answer::Reply(f) = &answer
                && let Ok(ErrorReply { code: 1, endpoint: Some(to), .. }) = f.decode::<ErrorReply>()
                && let Some(i) = endpoints.iter().position(|a| *a == to)
                && Some(owners[i]) != away
            {
                shard = i;
                answer = conns[shard].ask_again_if_closed(&frame, id, &what);
            }
            let answer = match answer {
                Answer::Reply(f) => {
                    replies += 1;
                    match f.decode::<ErrorReply>() {
                        Ok(e) => format!("error {}", e.code),
                        Err(_) => format!("{:?}", f.kind),
                    }
                }
                Answer::Closed => {
                    closed += 1;
                    "closed".into()
                }
            };
            let kind = what.split([' ', '{']).next().unwrap_or_default().to_string();
            *tally.entry((kind, answer)).or_default() += 1;
            sent += 1;
        }
        assert!(left || leave.is_none(), "only {sent} requests in {FUZZ_TIME:?}: no node left");
        if away.is_some() {
            come_back(&mut servers, &mut restarting);
        }
        eprintln!("request fuzz: {sent} requests in {:?}", started.elapsed());
        (sent, replies, closed, tally, servers)
    })
    .await
    .unwrap();
    eprintln!("request fuzz: {sent} requests, {replies} answered, {closed} connections closed instead");
    for ((kind, answer), n) in &tally {
        eprintln!("  {kind:<20} {answer:<16} {n}");
    }
    assert!(sent >= 500, "only {sent} requests in {FUZZ_TIME:?}");
    assert!(replies > sent / 2, "{replies} of {sent} answered");

    // The services act on whatever policies the requests left.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for server in &mut servers {
        assert!(server.is_running(), "a server exited:\n{}", server.output());
        assert!(!server.output().contains("panicked"), "a server panicked:\n{}", server.output());
    }
    until_sound(&url, Some(servers.len()).filter(|&n| n > 1)).await;

    // The streams the requests went at are read through, or refused with an error: the raw
    // segment requests may have sealed, truncated, deleted or re-created their segments.
    for stream in ["fz/s", "fz/t"] {
        let outcome = match client.event_reader(stream, ReadFrom::Head).await {
            Err(e) => format!("no reader: {e}"),
            Ok(mut r) => {
                let mut n = 0;
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), r.read_next(Duration::from_secs(2))).await {
                        Err(_) => panic!("reading {stream} hangs after {n} events"),
                        Ok(Ok(Some(_))) => n += 1,
                        Ok(Ok(None)) => break format!("{n} events"),
                        Ok(Err(e)) => break format!("an error after {n} events: {e}"),
                    }
                }
            }
        };
        eprintln!("request fuzz: {stream} read from its head: {outcome} ({:?} after the start)", began.elapsed());
    }
    // It still serves: a new stream written and read back.
    let after = Client::connect(&url).await.unwrap();
    after.create_stream("fz", "after", 3).await.unwrap();
    let w = after.event_writer("fz/after").await.unwrap();
    for i in 0..300 {
        w.write_event(format!("k{}", i % 5).as_bytes(), format!("after {i}").into_bytes());
    }
    w.flush().await.unwrap();
    let read_all = |c: Client| async move {
        let mut r = c.event_reader("fz/after", ReadFrom::Head).await.unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.read_next(Duration::from_secs(2)).await.unwrap() {
            got.push(String::from_utf8(e.payload.to_vec()).unwrap());
        }
        got.sort();
        got
    };
    let mut expected: Vec<String> = (0..300).map(|i| format!("after {i}")).collect();
    expected.sort();
    assert_eq!(read_all(after).await, expected);

    eprintln!("request fuzz: checked {:?} after the start", began.elapsed());
    // And the logs, with whatever the requests wrote into them, recover.
    for server in &mut servers {
        server.kill();
        server.restart();
    }
    until_sound(&url, Some(servers.len()).filter(|&n| n > 1)).await;
    assert_eq!(read_all(Client::connect(&url).await.unwrap()).await, expected);
    eprintln!("request fuzz: recovered {:?} after the start", began.elapsed());
    for server in &servers {
        assert!(!server.output().contains("panicked"), "a server panicked:\n{}", server.output());
    }
}
