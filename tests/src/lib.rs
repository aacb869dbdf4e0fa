//! Helpers for end-to-end tests: build and locate the `sluice` binary, pick free loopback
//! ports, and run a standalone server that is always killed (drop guard).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `sluice` binary of this build profile, built on first use (cargo is a no-op when it
/// is up to date). `SLUICE_BIN` overrides.
pub fn sluice_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("SLUICE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // `--workspace`, not `-p sluice-tools`: a single-package build resolves features
        // differently, so it would rebuild the client and the tools (a minute or more,
        // inside whichever test asked first) next to what `cargo test --workspace` built.
        cmd.args(["build", "--quiet", "--workspace", "--bin", "sluice"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the sluice binary");
        assert!(status.success(), "building the sluice binary failed");
        let bin = profile_dir.join("sluice");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Sends the client's own warnings (a connection given up for want of an answer, a lane that
/// held unsent events, a long retry) to the run's stderr, even when the test passes: they
/// are the trace of a stall a test would otherwise only show as time. Once per process.
pub fn show_client_warnings() {
    let _ = tracing_subscriber::fmt().with_env_filter("sluice_client=warn").with_writer(std::io::stderr).try_init();
}

/// A base port with `n` consecutive free ports on 127.0.0.1, below the kernel's ephemeral
/// range (`sluice_net::socket::free_local_ports`).
pub fn free_ports(n: u16) -> u16 {
    sluice_net::socket::free_local_ports(n).unwrap_or_else(|| panic!("no {n} consecutive free ports found"))
}

/// Bytes of the files under `dir` (recursively) whose paths `keep` takes.
pub fn bytes_of_files_under(dir: &Path, keep: impl Fn(&Path) -> bool) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if keep(&e.path()) => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

/// Bytes of the log files (`*.log`) under `dir`: what the log's budget bounds (freed files
/// kept as spares for reuse, `.spare`, lie beyond it).
pub fn log_bytes_under(dir: &Path) -> u64 {
    bytes_of_files_under(dir, |p| p.extension().is_some_and(|x| x == "log"))
}

/// True when a server answers the protocol handshake at `addr` (a bare TCP connect is not
/// enough: a killed server's listening socket can outlive it for a moment).
pub fn handshake(addr: SocketAddr) -> bool {
    sluice_client::answers_handshake(addr, Duration::from_millis(300))
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sluice-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("SLUICE_KEEP_FAILED").is_some() {
            eprintln!("kept {} for inspection", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `sluice standalone` (or `sluice node`) process, SIGKILLed when dropped.
pub struct Server {
    child: Option<Child>,
    /// The subcommand and its leading arguments (`standalone`, or `node --etcd ...`).
    mode: Vec<String>,
    extra: Vec<String>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cores: u32,
    /// Environment for the next (re)start, e.g. `RUST_LOG` to see more of the server's log.
    pub env: Vec<(String, String)>,
}

impl Server {
    pub fn start(data_dir: &Path, port: u16, cores: u32) -> Server {
        Self::start_with(data_dir, port, cores, &[])
    }

    /// Starts with extra `sluice standalone` arguments.
    pub fn start_with(data_dir: &Path, port: u16, cores: u32, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, port, cores, extra, &[])
    }

    /// Starts with extra arguments and environment (e.g. `RUST_LOG`, for a test that
    /// watches the server's log).
    pub fn start_with_env(data_dir: &Path, port: u16, cores: u32, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut s = Server {
            child: None,
            mode: vec!["standalone".into()],
            extra: extra.iter().map(|a| a.to_string()).collect(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir: data_dir.into(),
            cores,
            env: env.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        s.restart();
        s
    }

    /// Starts `sluice node` for cluster `cluster` in etcd `etcd` with id `node_id`, with
    /// environment `env` (e.g. `RUST_LOG`: its log is printed if the test panics).
    #[allow(clippy::too_many_arguments)]
    pub fn start_node(
        data_dir: &Path,
        port: u16,
        cores: u32,
        etcd: &str,
        cluster: &str,
        node_id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut s = Server {
            child: None,
            mode: ["node", "--etcd", etcd, "--cluster", cluster, "--node-id", node_id].map(String::from).to_vec(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir: data_dir.into(),
            cores,
            env: env.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        self.addr.to_string()
    }

    /// SIGTERM (a graceful stop: a cluster node hands its containers off) and waits up to
    /// `within` for the exit; SIGKILL after that. Returns the exit status' success.
    pub fn terminate(&mut self, within: Duration) -> bool {
        if self.child.is_none() {
            return false;
        }
        self.signal(libc::SIGTERM);
        match self.wait_exit(within) {
            Some(status) => status.success(),
            None => {
                self.kill();
                false
            }
        }
    }

    /// Starts the process (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("server log");
        let mut cmd = Command::new(sluice_bin());
        cmd.args(&self.mode).arg("--data-dir").arg(&self.data_dir).args([
            "--listen",
            &self.addr.to_string(),
            "--cores",
            &self.cores.to_string(),
            "--no-pin",
        ]);
        if !self.extra.iter().any(|a| a == "--log-file-mb") {
            cmd.args(["--log-file-mb", "8"]);
        }
        let child = cmd
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning sluice");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if handshake(self.addr) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "server exited during start-up with {status}; see {}",
                    self.data_dir.with_extension("log").display()
                );
            }
            assert!(Instant::now() < deadline, "server did not start within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no warning, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to the process (if it runs).
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Waits up to `within` for the process to exit; its status if it did (then reaped).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running process' id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the process wrote to stdout and stderr (all its runs).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Is the process still alive?
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let log = self.data_dir.with_extension("log");
        if std::thread::panicking() {
            eprintln!("--- server log {} ---\n{}", log.display(), std::fs::read_to_string(&log).unwrap_or_default());
        }
        let _ = std::fs::remove_file(log);
    }
}

/// Runs the `sluice` CLI against `url`; returns (success, stdout, stderr).
pub fn cli(url: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(sluice_bin())
        .args(args)
        .env("SLUICE_URL", url)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sluice");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing stdin");
    }
    let out = child.wait_with_output().expect("sluice output");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A real etcd (Debian `etcd-server`) on 127.0.0.1 with a temporary data directory,
/// SIGKILLed and removed when dropped.
pub struct Etcd {
    child: Child,
    dir: TempDir,
    base: u16,
    extra: Vec<String>,
    pub endpoint: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(&[])
    }

    /// Starts etcd with `extra` arguments (e.g. `--quota-backend-bytes`).
    /// If etcd exits during start-up (another process took one of its two ports after they
    /// were probed), it is started again on other ports, up to three times.
    pub fn start_with(extra: &[&str]) -> Etcd {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for attempt in 1..=3 {
            let dir = TempDir::new("etcd");
            let base = free_ports(2);
            let child = Self::spawn(&dir, base, &extra);
            let mut e = Etcd { child, dir, base, extra: extra.clone(), endpoint: format!("http://127.0.0.1:{base}") };
            match e.wait_ready() {
                Ok(()) => return e,
                Err(why) if attempt < 3 => eprintln!("etcd on port {base}: {why}; starting it again on other ports"),
                Err(why) => panic!("etcd on port {base}: {why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(dir: &TempDir, base: u16, extra: &[String]) -> Child {
        let client = format!("http://127.0.0.1:{base}");
        let peer = format!("http://127.0.0.1:{}", base + 1);
        Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.0.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}"), "--log-level", "error"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd: install Debian's etcd-server (scripts/test.sh does)")
    }

    /// Waits until etcd reports itself healthy on its client port (`GET /health`: it has a
    /// leader and serves requests; a listening socket alone is not enough), for at most 30 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Self::healthy(self.base) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited during start-up with {status}"));
            }
            if Instant::now() >= deadline {
                return Err("not healthy within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One bounded health probe.
    fn healthy(port: u16) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let mut reply = Vec::new();
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_ok()
            && s.take(64 << 10).read_to_end(&mut reply).is_ok()
            && String::from_utf8_lossy(&reply).contains("\"health\":\"true\"")
    }

    /// SIGKILL (an outage); `restart` brings it back on the same ports and data.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `SIGSTOP`: etcd keeps its connections open and answers nothing
    /// until `SIGCONT`, as a host that froze or a network that drops packets).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, self.base, &self.extra);
        if let Err(why) = self.wait_ready() {
            panic!("etcd restarted on port {}: {why}", self.base);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running 2-shard server with one scope and one stream, and a client connected to it.
/// Fields drop in order: client, server (killed), then the data directory.
pub struct Harness {
    pub client: sluice_client::Client,
    pub server: Server,
    _dir: TempDir,
}

impl Harness {
    /// Starts a server in a fresh directory and creates `scope/stream` with `segments`.
    pub async fn with_stream(scope: &str, stream: &str, segments: u32) -> Harness {
        let dir = TempDir::new(scope);
        let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
        let client = sluice_client::Client::connect(&server.url()).await.expect("connecting to the test server");
        client.create_scope(scope).await.expect("creating the test scope");
        client.create_stream(scope, stream, segments).await.expect("creating the test stream");
        Harness { client, server, _dir: dir }
    }
}

/// One scaling of `scope/stream`, whose active segments are `segs`: split the widest in
/// two (`split`), or merge the narrowest adjacent pair.
pub async fn split_or_merge(
    c: &sluice_client::Client,
    scope: &str,
    stream: &str,
    segs: &[sluice_net::messages::SegmentRange],
    split: bool,
) -> Result<sluice_net::messages::StreamInfo, sluice_client::ClientError> {
    if split {
        let widest = segs.iter().max_by(|a, b| (a.key_high - a.key_low).total_cmp(&(b.key_high - b.key_low)));
        c.split_segment(scope, stream, widest.expect("a segment").number, 2).await
    } else {
        let pair = segs
            .windows(2)
            .min_by(|a, b| (a[1].key_high - a[0].key_low).total_cmp(&(b[1].key_high - b[0].key_low)))
            .expect("two segments");
        c.merge_segments(scope, stream, &[pair[0].number, pair[1].number]).await
    }
}

/// Writes "w:k:seq" events over `keys` routing keys ("key-k") to `stream` until `stop`,
/// 200 in flight; every one must be acknowledged (across scalings and restarts: writers
/// retry). Returns how many went to each key (seq 0..n).
pub async fn keyed_writer(
    c: sluice_client::Client,
    stream: &'static str,
    w: u64,
    keys: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::collections::HashMap<u64, u64> {
    let wr = c.event_writer(stream).await.unwrap();
    let mut seq: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "writer {w} ran too long");
        let k = (i * 7 + w) % keys;
        i += 1;
        let q = seq.entry(k).or_default();
        acks.push(wr.write_event(format!("key-{k}").as_bytes(), format!("{w}:{k}:{q}").into_bytes()));
        *q += 1;
        if acks.len() >= 200 {
            for a in acks.drain(..) {
                a.await.expect("every event is acknowledged");
            }
        }
    }
    for a in acks {
        a.await.expect("every event is acknowledged");
    }
    seq
}

/// Stops `keyed_writer`s and gathers how many events each wrote per key, by (writer, key).
pub async fn stop_keyed_writers(
    stop: &std::sync::atomic::AtomicBool,
    writers: Vec<tokio::task::JoinHandle<std::collections::HashMap<u64, u64>>>,
) -> std::collections::HashMap<(u64, u64), u64> {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut written = std::collections::HashMap::new();
    for (w, t) in writers.into_iter().enumerate() {
        for (k, n) in t.await.unwrap() {
            written.insert((w as u64, k), n);
        }
    }
    written
}

/// Server arguments for a busy mover: tier-2 at `tier2` (a `fs:` URL), 1 MiB log files
/// within an 8 MiB log budget, 1 MiB chunks, moving from 64 KiB on.
pub fn small_log_with_tier2(tier2: &str) -> Vec<String> {
    let args = ["--log-file-mb", "1", "--log-budget-mb", "8", "--chunk-mb", "1", "--move-min-kb", "64"];
    ["--tier2", tier2].iter().chain(args.iter()).map(|s| s.to_string()).collect()
}
