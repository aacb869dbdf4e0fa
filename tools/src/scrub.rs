//! `sluice log scrub`: every container's log read back from the disk and checked, on the
//! running node that serves it (in a cluster, on each node), one container at a time per
//! shard and the shards in parallel. Prints each container's result as it comes, a progress
//! line on stderr during long scrubs, and exits with status 1 when anything is damaged.

use sluice_client::Client;
use sluice_net::messages::ContainerScrub;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct ScrubArgs {
    /// Only these containers (comma-separated numbers; default: every one).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    containers: Vec<u32>,
    /// Most MB each shard reads per second, so that a scrub leaves the disk to the writers
    /// (0: as fast as the disk goes).
    #[arg(long, default_value_t = 200, value_name = "MB")]
    rate_mb: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub async fn run(c: &Client, a: ScrubArgs) -> Result<(), String> {
    let count = c.container_count();
    let list: Vec<u32> = if a.containers.is_empty() {
        (0..count).collect()
    } else {
        if let Some(bad) = a.containers.iter().find(|&&n| n >= count) {
            return Err(format!("there is no container {bad}: the node has containers 0..{}", count - 1));
        }
        a.containers.clone()
    };
    // One queue per endpoint (shard): a shard scrubs one container at a time.
    let mut by_endpoint: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for n in &list {
        by_endpoint.entry(c.container_endpoint(*n)).or_default().push(*n);
    }
    let rate = a.rate_mb.saturating_mul(1_000_000);
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (endpoint, containers) in by_endpoint {
        let (c, tx) = (c.clone(), tx.clone());
        tokio::spawn(async move {
            for n in containers {
                let result = c.scrub_container(n, rate).await.map_err(|e| e.to_string());
                if tx.send((n, endpoint.clone(), result)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    eprintln!(
        "scrubbing {} container logs{}",
        list.len(),
        if rate > 0 { format!(" at up to {} MB/s per shard", a.rate_mb) } else { String::new() }
    );
    let started = Instant::now();
    let mut last_progress = started;
    let mut total = ContainerScrub::default();
    let (mut done, mut damaged, mut failed) = (0usize, 0usize, 0usize);
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        let Ok(next) = next else {
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                eprintln!(
                    "  progress: {done} of {} containers done, {:.0} s",
                    list.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            continue;
        };
        let Some((n, endpoint, result)) = next else { break };
        done += 1;
        match result {
            Ok(Some(s)) => {
                let verdict = if s.damage.is_empty() { "sound" } else { "DAMAGED" };
                let gone = if s.gone > 0 { format!(", {} freed meanwhile", s.gone) } else { String::new() };
                println!(
                    "container {n} ({endpoint}): {} files, {:.1} MiB, {} records in {:.1} s{gone}: {verdict}",
                    s.files,
                    mib(s.bytes),
                    s.records,
                    s.took_ms as f64 / 1000.0
                );
                for d in &s.damage {
                    println!("    {d}");
                }
                damaged += usize::from(!s.damage.is_empty());
                total.files += s.files;
                total.bytes += s.bytes;
                total.records += s.records;
                total.gone += s.gone;
            }
            Ok(None) => {
                failed += 1;
                println!("container {n} ({endpoint}): not served there any more (moving?): not scrubbed");
            }
            Err(e) => {
                failed += 1;
                println!("container {n} ({endpoint}): not scrubbed: {e}");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "scrubbed {} of {} container logs: {} files, {:.1} MiB, {} records in {secs:.1} s ({:.0} MB/s)",
        list.len() - failed,
        list.len(),
        total.files,
        mib(total.bytes),
        total.records,
        total.bytes as f64 / secs.max(1e-3) / 1e6
    );
    match (damaged, failed) {
        (0, 0) => {
            println!("no damage found");
            Ok(())
        }
        (0, f) => Err(format!("{f} container logs could not be scrubbed")),
        (d, _) => Err(format!("damage found in {d} container logs")),
    }
}
