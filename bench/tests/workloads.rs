//! Smoke runs of `sluice-bench produce` (one future per event and per batch call, for a count
//! and for a time after a warm-up, with the server's own figures and the client's round
//! trips, with lingering writers, into a stream it creates with a retention policy),
//! `consume` and `end-to-end` against a spawned standalone server: each completes, counts
//! every event, and writes its JSON result. No figure is asserted (they live in
//! docs/BENCHMARKS.md).

use sluice_tests::{Server, TempDir, free_ports};
use std::path::Path;
use std::process::Command;

/// Runs sluice-bench with `args`, returns the JSON line it appended to `json`.
fn run(json: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--json", json.to_str().unwrap()])
        .args(args)
        .output()
        .expect("running sluice-bench");
    assert!(
        out.status.success(),
        "sluice-bench {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(json).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// Runs sluice-bench with `args` and checks that it fails saying `message`.
fn assert_refused(args: &[&str], message: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench")).args(args).output().expect("running sluice-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(message), "sluice-bench {args:?}: {err}");
}

#[test]
fn produce_consume_and_end_to_end_complete() {
    let dir = TempDir::new("bench-workloads");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let url = server.url();
    let json = dir.0.join("runs.jsonl");
    let stream = ["--stream", "bw/p"];
    let r = run(&json, &["produce", "--url", &url, stream[0], stream[1], "--count", "20000", "--inflight", "1000"]);
    assert_eq!((r["workload"].as_str(), r["events"].as_u64()), (Some("produce"), Some(20_000)), "{r}");
    assert_eq!((r["ack"]["count"].as_u64(), r["linger_us"].as_u64()), (Some(20_000), Some(0)), "{r}");
    // Writers that wait for more events before each batch.
    let lingering = ["--linger-us", "300", "produce", "--url", &url, "--stream", "bw/l", "--count", "5000"];
    let r = run(&json, &lingering);
    assert_eq!((r["ack"]["count"].as_u64(), r["linger_us"].as_u64()), (Some(5_000), Some(300)), "{r}");
    // A stream the run creates with a retention policy.
    let kept = ["produce", "--url", &url, "--stream", "bw/r", "--count", "1000", "--retention", "size:64M,128M"];
    let r = run(&json, &kept);
    assert_eq!((r["ack"]["count"].as_u64(), r["retention"].as_str()), (Some(1000), Some("size:64M,128M")), "{r}");
    let describe = Command::new(sluice_tests::sluice_bin())
        .args(["stream", "describe", "bw/r", "--url", &url])
        .output()
        .expect("running sluice");
    let describe = String::from_utf8_lossy(&describe.stdout);
    assert!(describe.contains("retention size:64M,128M"), "{describe}");
    assert_refused(&["produce", "--url", &url, "--retention", "size:2G,1G"], "MIN <= MAX");
    // An existing stream keeps its policy, and the run says so.
    let again = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["produce", "--url", &url, "--stream", "bw/r", "--count", "10", "--retention", "time:1h"])
        .output()
        .expect("running sluice-bench");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.contains("bw/r exists with retention size:64M,128M"), "{err}");
    let batches =
        ["produce", "--url", &url, stream[0], stream[1], "--count", "20000", "--batch", "100", "--threads", "1"];
    let r = run(&json, &batches);
    assert_eq!((r["batch"].as_u64(), r["ack"]["count"].as_u64()), (Some(100), Some(20_000)), "{r}");
    // For a time instead of a count, the first half second's events sent but not timed.
    // With the server's own figures, counted from the end of the warm-up.
    let timed = ["--seconds", "1", "--warmup-s", "0.5", "--keys", "8", "--stream", "bw/d", "--server-stats"];
    let r = run(&json, &[&["produce", "--url", &url][..], &timed[..]].concat());
    let (events, secs) = (r["events"].as_u64().unwrap_or(0), r["seconds"].as_f64().unwrap_or(0.0));
    assert!(events > 0 && r["ack"]["count"].as_u64() == Some(events), "{r}");
    assert!((0.9..30.0).contains(&secs) && r["warmup_s"].as_f64() == Some(0.5) && r["keys"].as_u64() == Some(8), "{r}");
    let shards = r["server"].as_array().expect("server figures");
    assert_eq!(shards.len(), 2, "{r}");
    let appends: u64 = shards.iter().map(|s| s["appends"]["count"].as_u64().unwrap()).sum();
    assert!(appends > 0 && shards.iter().all(|s| s["flushes"]["count"].as_u64() > Some(0)), "{r}");
    // The window began as the warm-up ended, not as the server started.
    assert!(
        shards.iter().all(|s| (1..(secs * 1000.0) as u64 + 1000).contains(&s["window_ms"].as_u64().unwrap())),
        "{r}"
    );
    // The client's append round trips after the warm-up (requests, each of one event or more).
    let trips = &r["client_round_trips"];
    let (p50, p99, max) = (trips["p50"].as_u64(), trips["p99"].as_u64(), trips["max"].as_u64());
    assert!(trips["count"].as_u64() > Some(0) && p50 > Some(0) && p50 <= p99 && p99 <= max, "{r}");
    assert!(max < Some((secs * 1e6) as u64 + 1_000_000), "{r}");
    assert_refused(
        &["consume", "--url", &url, "--server-stats"],
        "--server-stats works with produce, end-to-end and compare",
    );
    assert_refused(&["produce", "--url", &url, "--seconds", "0"], "--seconds 0: must be above 0");
    assert_refused(&["--threads", "0", "produce", "--url", &url], "--threads must be at least 1");
    assert_refused(
        &["--linger-us", "100", "consume", "--url", &url],
        "--linger-us works with produce, end-to-end and compare",
    );
    assert_refused(&["compare", "--targets", "sluice", "--segments", "0"], "--segments must be at least 1");
    let r = run(&json, &["consume", "--url", &url, stream[0], stream[1], "--readers", "2", "--idle-ms", "500"]);
    assert_eq!((r["workload"].as_str(), r["events"].as_u64()), (Some("consume"), Some(40_000)), "{r}");
    // Consuming a stream nobody wrote says what to do, and writes no result.
    assert_refused(&["consume", "--url", &url, "--stream", "bw/none"], "bw/none does not exist: write it first");
    let e2e = ["end-to-end", "--url", &url, "--rate", "2000", "--seconds", "1", "--readers", "2", "--linger-us", "100"];
    let r = run(&json, &e2e);
    assert_eq!((r["workload"].as_str(), r["linger_us"].as_u64()), (Some("end-to-end"), Some(100)), "{r}");
    assert!(r["end_to_end"]["count"].as_u64().unwrap_or(0) >= 1000, "{r}");
    assert_eq!(r["received"].as_u64(), r["sent"].as_u64(), "{r}");
    // How late the harness sent, for the events after the warm-up.
    assert_eq!(r["send_lateness"]["count"].as_u64(), r["end_to_end"]["count"].as_u64(), "{r}");
}
