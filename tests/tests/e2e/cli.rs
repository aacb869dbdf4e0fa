//! The `sluice` command line against a real standalone server.

use sluice_tests::{Server, TempDir, cli, free_ports};

/// Runs `sluice args` against `url`, checks that it succeeded, and returns its stdout.
fn succeeds(url: &str, args: &[&str]) -> String {
    let (ok, out, err) = cli(url, args, None);
    assert!(ok, "sluice {args:?} failed: {err}");
    out
}

#[test]
fn cli_end_to_end() {
    let dir = TempDir::new("cli");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let url = server.url();
    let run = |args: &[&str]| succeeds(&url, args);
    assert!(run(&["scope", "create", "demo"]).contains("created scope demo"));
    assert!(run(&["stream", "create", "demo/ev", "--segments", "3"]).contains("3 segment"));
    assert_eq!(run(&["stream", "list", "demo"]).trim(), "ev");
    assert!(run(&["stream", "create", "demo/kept", "--retention", "size:1M,2M"]).contains("created stream"));
    let long: Vec<Vec<String>> = run(&["stream", "list", "demo", "--long"])
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(
        long,
        [
            ["stream", "state", "retention", "scaling"],
            ["ev", "active", "none", "fixed:3"],
            ["kept", "active", "size:1M,2M", "fixed:1"]
        ]
    );
    assert_eq!(run(&["scope", "list"]).trim(), "demo");

    let (ok, _, err) = cli(&url, &["write", "demo/ev", "--key", "k"], Some("alpha\nbeta\ngamma\n"));
    assert!(ok && err.contains("wrote 3 event"), "{err}");
    assert_eq!(run(&["read", "demo/ev", "--timeout-ms", "500"]), "alpha\nbeta\ngamma\n");
    assert_eq!(run(&["read", "demo/ev", "--count", "2"]), "alpha\nbeta\n");
    assert_eq!(run(&["read", "demo/ev", "--from", "tail", "--timeout-ms", "300"]), "");
    let early = run(&["stream", "cut", "demo/ev", "--at", "tail"]);

    let out = run(&["write", "demo/ev", "--count", "2000", "--size", "64", "--keys", "4", "--inflight", "100"]);
    assert!(out.contains("2000 events of 64 B") && out.contains("p99.9"), "{out}");
    let all = run(&["read", "demo/ev", "--timeout-ms", "500"]);
    assert_eq!(all.lines().count(), 2003);
    // Generated payloads carry key and sequence: per key in order.
    for k in 0..4 {
        let prefix = format!("key-{k}:");
        let seqs: Vec<u64> = all
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|r| r.split(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>(), "key {k} out of order");
    }

    let cut = run(&["stream", "cut", "demo/ev", "--at", "tail"]);
    let cut = sluice_client::StreamCut::from_text(cut.trim()).unwrap();
    assert_eq!(cut.positions.len(), 3);
    assert!(cut.positions.values().sum::<u64>() > 0);

    // Reader groups: two CLI readers split the stream; together they see every event once.
    assert!(run(&["rg", "create", "demo/g", "demo/ev"]).contains("created reader group"));
    let first = run(&["rg", "read", "demo/g", "--reader", "r1", "--count", "1000"]);
    assert_eq!(first.lines().count(), 1000);
    let cp = run(&["rg", "checkpoint", "demo/g", "cp1"]);
    assert!(cp.starts_with("demo/ev "), "{cp}");
    let rest = run(&["rg", "read", "demo/g", "--reader", "r2", "--timeout-ms", "700"]);
    let mut all_rg: Vec<&str> = first.lines().chain(rest.lines()).collect();
    assert_eq!(all_rg.len(), 2003);
    all_rg.sort_unstable();
    all_rg.dedup();
    assert_eq!(all_rg.len(), 2003, "an event was read twice");
    let d = run(&["rg", "describe", "demo/g"]);
    assert!(d.contains("0 reader(s)") && d.contains("(unassigned)") && d.contains("cp1 completed"), "{d}");
    assert!(d.contains(" bytes in demo/_rg_g/0 (from offset "), "{d}");
    let (ok, _, err) = cli(&url, &["rg", "describe", "demo/nope"], None);
    assert!(!ok && err.contains("no reader group"), "{err}");
    assert!(run(&["rg", "delete", "demo/g"]).contains("deleted"));

    let describe = run(&["stream", "describe", "demo/ev"]);
    assert!(describe.contains("active") && describe.lines().count() == 7, "{describe}");
    assert!(describe.contains("epoch 0") && describe.contains("segments 0 1 2"), "{describe}");
    // Epochs carry their time of creation, readable (UTC).
    let epoch_line = describe.lines().find(|l| l.trim_start().starts_with("0  at ")).expect("epoch 0's line");
    assert!(epoch_line.contains(" UTC  segments 0 1 2") && epoch_line.contains("at 20"), "{describe}");
    assert!(describe.contains("retention none") && describe.contains("in tier-2"), "{describe}");
    // Each segment's container and the shard that serves it: a new data directory spreads a
    // stream's segments over consecutive containers, so the three take both shards in turn.
    let rows: Vec<(u32, String)> = describe
        .lines()
        .filter(|l| l.contains('['))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[cols.len() - 2].parse().unwrap(), cols[cols.len() - 1].to_string())
        })
        .collect();
    assert_eq!(rows.len(), 3, "{describe}");
    let shard = |c: u32| format!("127.0.0.1:{}", server.addr.port() as u32 + c % 2);
    for (i, (container, served_by)) in rows.iter().enumerate() {
        assert_eq!(*served_by, shard(*container), "{describe}");
        if i > 0 {
            let prev = rows[i - 1].0;
            assert!(*container == prev + 1 || *container == 0, "segments not on consecutive containers: {describe}");
        }
    }

    // Truncate at the cut taken after the first three events: only the 2000 generated remain.
    let (ok, _, err) = cli(&url, &["stream", "truncate", "demo/ev", "--at", "bogus!"], None);
    assert!(!ok && err.contains("cut"), "{err}");
    // Where to cut must be said, once: a cut, or a segment and an offset.
    let (ok, _, err) = cli(&url, &["stream", "truncate", "demo/ev"], None);
    assert!(!ok && err.contains("--at") && err.contains("--segment"), "{err}");
    let (ok, _, err) = cli(&url, &["stream", "truncate", "demo/ev", "--segment", "0"], None);
    assert!(!ok && err.contains("--offset"), "{err}");
    let (ok, _, err) = cli(&url, &["stream", "truncate", "demo/ev", "--at", early.trim(), "--segment", "0"], None);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = cli(&url, &["stream", "truncate", "demo/ev", "--at", early.trim()], None);
    assert!(ok, "{err}");
    let after = run(&["read", "demo/ev", "--timeout-ms", "500"]);
    assert_eq!(after.lines().count(), 2000, "events before the cut are gone");
    assert!(!after.contains("alpha"));
    assert!(run(&["stream", "update", "demo/ev", "--retention", "size:1G,2G"]).contains("retention size:"));
    assert!(run(&["stream", "describe", "demo/ev"]).contains("retention size:1G,2G"));
    let (ok, _, err) = cli(&url, &["stream", "update", "demo/ev", "--retention", "size:2G,1G"], None);
    assert!(!ok && err.contains("MIN <= MAX"), "{err}");

    let (ok, _, err) = cli(&url, &["stream", "delete", "demo/ev"], None);
    assert!(!ok && err.contains("seal it before deleting"), "{err}");
    assert!(run(&["stream", "seal", "demo/ev"]).contains("sealed"));
    let (ok, _, err) = cli(&url, &["write", "demo/ev"], Some("late\n"));
    assert!(!ok && err.contains("sealed"), "{err}");
    assert!(run(&["stream", "describe", "demo/ev"]).contains("sealed"));
    assert!(run(&["stream", "list", "demo", "-l"]).lines().nth(1).is_some_and(|l| l.contains(" sealed ")));
    assert!(run(&["stream", "delete", "demo/ev"]).contains("deleted"));
    assert!(run(&["stream", "seal", "demo/kept"]).contains("sealed"));
    assert!(run(&["stream", "delete", "demo/kept"]).contains("deleted"));
    assert!(run(&["scope", "delete", "demo"]).contains("deleted"));

    // Clear errors.
    let (ok, _, err) = cli(&url, &["stream", "create", "no-slash"], None);
    assert!(!ok && err.contains("expected scope/stream"), "{err}");
    let (ok, _, err) = cli(&url, &["read", "nope/x"], None);
    assert!(!ok && err.contains("no such"), "{err}");
    let (ok, _, err) = cli(&url, &["stream", "create", "nope/x"], None);
    assert!(!ok && err.contains("no such scope") && err.contains("sluice scope create nope"), "{err}");
    let (ok, _, err) = cli(&url, &["scope", "create", "bad name"], None);
    assert!(!ok && err.contains("contains ' '"), "{err}");
    // Names beginning with '_' are Sluice's own (a reader group's state is `_rg_<group>`).
    let (ok, _, err) = cli(&url, &["scope", "create", "_mine"], None);
    assert!(!ok && err.contains("reserved"), "{err}");
    let (ok, _, err) = cli(&url, &["stream", "create", "nope/_rg_g"], None);
    assert!(!ok && err.contains("begins with '_'") && err.contains("_rg_<group>"), "{err}");
    let (ok, _, err) = cli("127.0.0.1:1", &["scope", "list"], None);
    assert!(!ok && err.contains("cannot connect"), "{err}");

    // The log inspector reads the data directory offline.
    let (ok, out, err) = cli(&url, &["log", "dump", dir.0.join("data").to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(out.contains("checkpoint") && out.contains("batch") && out.contains("(clean)"), "{out}");

    let (ok, out, _) = cli(&url, &["--help"], None);
    assert!(ok && out.contains("standalone") && out.contains("log"));
}

/// The quick start as a new user runs it: the default, relative data directory.
#[test]
fn standalone_with_relative_data_dir() {
    let dir = TempDir::new("reldir");
    let port = free_ports(2);
    let url = format!("127.0.0.1:{port}");
    let mut server = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["standalone", "--listen", &url, "--cores", "2", "--no-pin"])
        .current_dir(&dir.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        sluice_tests::handshake(url.parse().unwrap())
    });
    let result = std::panic::catch_unwind(|| {
        assert!(ready, "server did not start");
        for args in [&["scope", "create", "shop"][..], &["stream", "create", "shop/orders", "--segments", "4"]] {
            let (ok, _, err) = cli(&url, args, None);
            assert!(ok, "{err}");
        }
        let (ok, _, err) = cli(&url, &["write", "shop/orders", "--count", "1000", "--size", "100"], None);
        assert!(ok, "{err}");
        let (ok, out, err) = cli(&url, &["read", "shop/orders", "--timeout-ms", "500"], None);
        assert!(ok && out.lines().count() == 1000, "{err}");
        assert!(dir.0.join("sluice-data/containers/COUNT").exists());
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// A second server on a data directory in use is refused at once, naming the holder; the
/// lock goes with the first server's process (SIGKILL included), so a restart finds it free.
#[test]
fn a_data_directory_serves_one_server_at_a_time() {
    let dir = TempDir::new("cli-lock");
    let mut server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let port = free_ports(2);
    let started = std::time::Instant::now();
    let out = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["standalone", "--listen", &format!("127.0.0.1:{port}"), "--cores", "2", "--no-pin", "--data-dir"])
        .arg(dir.0.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second server started on the same data directory");
    assert!(err.contains("is in use by another sluice process (pid "), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "refused only after {:?}", started.elapsed());
    // The first one serves on, and comes back after a SIGKILL.
    server.kill();
    server.restart();
    assert!(sluice_tests::handshake(server.url().parse().unwrap()));
}

/// A data directory keeps the container count it was created with: a restart without
/// `--containers-per-core` takes it from the directory; a shard count that cannot share it
/// evenly is refused, naming what would fit; an explicit count that differs is refused.
#[test]
fn a_data_directory_keeps_its_container_count() {
    let dir = TempDir::new("cli-count");
    let data = dir.0.join("data");
    let containers = |url: &str| {
        let out = succeeds(url, &["stats"]);
        out.lines().find_map(|l| l.strip_prefix("containers: ")?.split(',').next()?.parse::<u32>().ok()).expect(&out)
    };
    let mut server = Server::start_with(&data, free_ports(2), 2, &["--containers-per-core", "3"]);
    assert_eq!(containers(&server.url()), 6);
    succeeds(&server.url(), &["scope", "create", "k"]);
    succeeds(&server.url(), &["stream", "create", "k/ev", "--segments", "4"]);
    succeeds(&server.url(), &["write", "k/ev", "--count", "100", "--keys", "8"]);
    server.kill();
    // No flag: the directory's count, and its events.
    let server = Server::start(&data, free_ports(2), 2);
    assert_eq!(containers(&server.url()), 6);
    let read = succeeds(&server.url(), &["read", "k/ev", "--timeout-ms", "500"]);
    assert_eq!(read.lines().count(), 100, "{read}");
    drop(server);
    let refused = |args: &[&str]| {
        let port = free_ports(4).to_string();
        let out = std::process::Command::new(sluice_tests::sluice_bin())
            .args(["standalone", "--listen", &format!("127.0.0.1:{port}"), "--no-pin", "--data-dir"])
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--cores", "4"]);
    assert!(err.contains("created with 6 containers, which 4 shards cannot share evenly"), "{err}");
    assert!(err.contains("--containers-per-core whose product is 6"), "{err}");
    let err = refused(&["--cores", "2", "--containers-per-core", "1"]);
    assert!(err.contains("was created with 6 containers"), "{err}");
}

/// Defaults that are a shard's, shared by its containers, still give each container what it
/// needs: with 32 containers per core and 64 MiB log files, the tier-2 log budget's default
/// (4 GiB per shard) is raised to the four files a log needs instead of refusing to start.
#[test]
fn many_containers_per_core_start_with_the_default_budgets() {
    let dir = TempDir::new("cli-many");
    let tier2 = format!("fs:{}", dir.0.join("tier2").display());
    let args = ["--tier2", &tier2, "--containers-per-core", "32", "--log-file-mb", "64", "--log-prefill", "never"];
    let server = Server::start_with(&dir.0.join("data"), free_ports(1), 1, &args);
    let out = succeeds(&server.url(), &["stats"]);
    assert!(out.contains("containers: 32, ") && out.contains("; no problems"), "{out}");
}

/// `--shard-nice`: each shard thread runs at the nice value asked for, the process' other
/// threads as started; a value the process may not set stops the start with the reason.
#[test]
fn shard_threads_take_the_nice_value_asked_for() {
    let dir = TempDir::new("cli-nice");
    let server = Server::start_with(&dir.0.join("data"), free_ports(2), 2, &["--shard-nice", "5"]);
    let pid = server.pid().expect("running");
    let mut nice: Vec<(String, i64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let path = t.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_string();
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the command's closing parenthesis: state is field 3, nice field 19.
            let nice = stat.rsplit_once(") ")?.1.split_whitespace().nth(16)?.parse().ok()?;
            Some((comm, nice))
        })
        .collect();
    nice.sort();
    for k in 0..2 {
        let prefix = format!("sluice-shard-{k}");
        assert!(nice.iter().any(|(c, n)| c.starts_with(&prefix) && *n == 5), "shard {k}: {nice:?}");
    }
    assert!(nice.iter().any(|(c, n)| c == "sluice" && *n == 0), "main thread: {nice:?}");
    drop(server);

    // A negative value without the right to it: as an unprivileged user.
    let data = dir.0.join("unprivileged");
    std::fs::create_dir_all(&data).unwrap();
    // SAFETY: a plain syscall without arguments.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        // So that `nobody` may write there.
        for d in [&dir.0, &data] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        }
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).arg(sluice_tests::sluice_bin());
        c
    } else {
        std::process::Command::new(sluice_tests::sluice_bin())
    };
    let port = free_ports(2);
    let log = dir.0.join("unprivileged.log");
    let mut child = cmd
        .args([
            "standalone",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cores",
            "2",
            "--no-pin",
            "--shard-nice",
            "-5",
        ])
        .args(["--log-file-mb", "8", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    if !root && status.is_none_or(|s| s.success()) {
        // Not root, and RLIMIT_NICE lets this user raise priority: nothing to refuse.
        eprintln!("skipped the refusal: this user may set a nice value of -5 ({err})");
        return;
    }
    assert!(status.is_some_and(|s| !s.success()), "started as nobody with --shard-nice -5: {err}");
    assert!(err.contains("setting shard") && err.contains("nice value to -5") && err.contains("CAP_SYS_NICE"), "{err}");
}

/// `sluice stats`: a row per shard counting what it served, a line on the containers,
/// `--reset` starting over, and `--every` printing one table per interval.
#[test]
fn stats_count_what_each_shard_served() {
    let dir = TempDir::new("cli-stats");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let url = server.url();
    let run = |args: &[&str]| succeeds(&url, args);
    run(&["scope", "create", "st"]);
    run(&["stream", "create", "st/ev", "--segments", "4"]);
    run(&["write", "st/ev", "--count", "3000", "--size", "64", "--keys", "8", "--inflight", "100"]);
    // Rows: shard, window_s, req/s, |, appends, 5 latencies, |, flushes, flush/s, KiB/flush,
    // 5 latencies; then the containers' line.
    let rows = |out: &str| -> Vec<Vec<u64>> {
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("appends") && lines[0].contains("KiB/flush"), "{out}");
        assert_eq!(lines.len(), 4, "{out}");
        // A new standalone directory: one container per core.
        assert!(lines[3].starts_with("containers: 2, ") && lines[3].ends_with("; no problems"), "{out}");
        lines[1..3]
            .iter()
            .map(|l| l.split_whitespace().filter(|w| *w != "|").map(|w| w.parse::<f64>().unwrap() as u64).collect())
            .collect()
    };
    let before = rows(&run(&["stats", "--reset"]));
    assert_eq!(before.iter().map(|r| r[0]).collect::<Vec<_>>(), [0, 1]);
    let appends: u64 = before.iter().map(|r| r[3]).sum();
    assert!((1..=3000).contains(&appends), "{before:?}");
    // A new node spreads a stream's segments: both shards served appends.
    assert!(before.iter().all(|r| r[3] > 0), "{before:?}");
    for r in before.iter().filter(|r| r[3] > 0) {
        // The writes came as requests (hundreds over a window of seconds).
        assert!(r[2] > 0, "requests per second: {r:?}");
        let (a, f) = (&r[4..9], &r[12..17]);
        assert!(a.windows(2).all(|w| w[0] <= w[1]) && a[0] > 0, "append latencies out of order: {r:?}");
        assert!(r[9] > 0 && f.windows(2).all(|w| w[0] <= w[1]) && f[0] > 0, "flushes: {r:?}");
        // Direct I/O writes whole 4 KiB blocks.
        assert!(r[11] >= 4, "KiB per flush: {r:?}");
    }
    let after = rows(&run(&["stats"]));
    assert!(after.iter().all(|r| r[3] == 0 && r[9] == 0), "reset did not start over: {after:?}");
    let every = run(&["stats", "--every", "1", "--count", "2"]);
    assert_eq!(every.lines().filter(|l| l.contains("KiB/flush")).count(), 2, "{every}");
    assert_eq!(every.lines().filter(|l| l.starts_with("containers: 2, ")).count(), 2, "{every}");
    let (ok, out, err) = cli(&url, &["stats", "--check"], None);
    assert!(ok && out.contains("; no problems"), "{out}{err}");
    let (ok, out, err) = cli(&url, &["stats", "--json", "--every", "1", "--count", "2"], None);
    assert!(ok && out.lines().count() == 2, "{out}{err}");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["containers_with_problems"], 0, "{out}");
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.iter().map(|s| s["shard"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1], "{out}");
    let containers: Vec<_> = shards.iter().flat_map(|s| s["containers"].as_array().unwrap()).collect();
    assert_eq!(containers.len(), 2, "{out}");
    assert!(containers.iter().all(|c| c["problems"].as_array().is_some_and(Vec::is_empty)), "{out}");
    assert!(shards[0]["window_ms"].as_u64().is_some_and(|w| (500..5000).contains(&w)), "{out}");
    let (ok, _, err) = cli(&url, &["stats", "--every", "0"], None);
    assert!(!ok && err.contains("--every must be at least 1 second"), "{err}");
}
