//! `sluice stats`: each shard's own latency figures, as one table, and what is wrong with
//! any container (`--check` makes that the exit status).

use sluice_client::Client;
use sluice_client::stats::{ShardStats, health, json, table};
use std::time::Duration;

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Start counting over once the figures are printed.
    #[arg(long)]
    reset: bool,
    /// Print a table every SECS seconds, each with the figures of the last SECS seconds
    /// (implies --reset).
    #[arg(long, value_name = "SECS")]
    every: Option<u64>,
    /// With --every: stop after N tables (default: until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit with an error when a container has a problem (for monitoring scripts): stopped
    /// on an error, disk full, tier-2 mover failing, reads refused on damaged data, or
    /// damage found by its last log scrub.
    #[arg(long, conflicts_with = "every")]
    check: bool,
    /// Print JSON instead of tables (one line per table: `shards` with each shard's figures
    /// and its containers' state, `containers_with_problems`), for monitoring.
    #[arg(long)]
    json: bool,
}

/// Prints the latency table and the containers' state (or their JSON); returns how many
/// containers have a problem.
fn print(stats: &[ShardStats], as_json: bool) -> usize {
    let (health, troubled) = health(stats);
    if as_json {
        println!("{}", serde_json::json!({"shards": json(stats), "containers_with_problems": troubled}));
    } else {
        print!("{}{health}", table(stats));
    }
    troubled
}

pub async fn run(c: &Client, a: StatsArgs) -> Result<(), String> {
    let Some(every) = a.every else {
        let troubled = print(&c.shard_stats(a.reset).await.map_err(|e| e.to_string())?, a.json);
        return match (a.check, troubled) {
            (true, 1) => Err("1 container has problems".into()),
            (true, n) if n > 1 => Err(format!("{n} containers have problems")),
            _ => Ok(()),
        };
    };
    if every == 0 {
        return Err("--every must be at least 1 second".into());
    }
    // Start the first window now, so that every table covers SECS seconds.
    c.shard_stats(true).await.map_err(|e| e.to_string())?;
    for _ in 0..a.count.unwrap_or(u64::MAX) {
        tokio::time::sleep(Duration::from_secs(every)).await;
        print(&c.shard_stats(true).await.map_err(|e| e.to_string())?, a.json);
    }
    Ok(())
}
