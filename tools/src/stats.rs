//! `sluice stats`: each shard's own latency figures, as one table.

use sluice_client::Client;
use sluice_client::stats::table;
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
}

pub async fn run(c: &Client, a: StatsArgs) -> Result<(), String> {
    let Some(every) = a.every else {
        print!("{}", table(&c.shard_stats(a.reset).await.map_err(|e| e.to_string())?));
        return Ok(());
    };
    if every == 0 {
        return Err("--every must be at least 1 second".into());
    }
    // Start the first window now, so that every table covers SECS seconds.
    c.shard_stats(true).await.map_err(|e| e.to_string())?;
    for _ in 0..a.count.unwrap_or(u64::MAX) {
        tokio::time::sleep(Duration::from_secs(every)).await;
        print!("{}", table(&c.shard_stats(true).await.map_err(|e| e.to_string())?));
    }
    Ok(())
}
