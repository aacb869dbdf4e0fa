//! `sluice-bench txn` smoke run against a spawned standalone server: a few timed
//! transactions, every one committed. No figure is asserted (they live in BENCHMARKS.md).

use sluice_tests::{Server, TempDir, free_ports};
use std::process::Command;

#[test]
fn txn_workload_commits_and_reports() {
    let dir = TempDir::new("bench-txn");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let json = dir.0.join("txn.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--json", json.to_str().unwrap(), "txn", "--url", &server.url()])
        .args(["--rounds", "5", "--events", "200", "--segments", "4"])
        .output()
        .expect("running sluice-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "txn workload failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&json).unwrap().trim()).unwrap();
    assert_eq!(result["workload"], "txn");
    assert_eq!(result["commit"]["count"].as_u64(), Some(5), "{result}");
    assert!(stdout.contains("commit"), "{stdout}");

    // The same, timing each commit until its record says so.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--json", json.to_str().unwrap(), "txn", "--url", &server.url(), "--await-record"])
        .args(["--rounds", "3", "--events", "50", "--segments", "2"])
        .output()
        .expect("running sluice-bench");
    assert!(out.status.success(), "txn --await-record failed: {}", String::from_utf8_lossy(&out.stderr));
    let last = std::fs::read_to_string(&json).unwrap().lines().last().unwrap().to_string();
    let result: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(result["await_record"], true, "{result}");
    assert_eq!(result["commit"]["count"].as_u64(), Some(3), "{result}");
}
