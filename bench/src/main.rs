//! `sluice-bench`: load generator for a running Sluice node. This first version has the
//! closed-loop `produce` workload (P producers, each its own connection and idempotent
//! writer, a bounded number of events in flight); open-loop rates, consumers, end-to-end
//! latency, plots and peer drivers come with the benchmark issue.

use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use sluice_client::Client;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Throughput and ack latency of a Sluice node")]
enum Cmd {
    /// Write generated events as fast as acknowledgements allow.
    Produce {
        /// Server address.
        #[arg(long, env = "SLUICE_URL", default_value = "127.0.0.1:9090")]
        url: String,
        /// scope/stream (created with --segments if missing).
        #[arg(long, default_value = "bench/produce")]
        stream: String,
        #[arg(long, default_value_t = 4)]
        segments: u32,
        /// Concurrent producers (each its own connection and writer).
        #[arg(long, default_value_t = 1)]
        producers: u32,
        /// Events per producer.
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Event payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Events awaiting acknowledgement per producer.
        #[arg(long, default_value_t = 10_000)]
        inflight: usize,
    },
}

fn main() -> Result<(), String> {
    let Cmd::Produce { url, stream, segments, producers, count, size, inflight } = Cmd::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let admin = Client::connect(&url).await.map_err(|e| e.to_string())?;
        let (scope, name) = stream.split_once('/').ok_or("--stream must be scope/stream")?;
        let _ = admin.create_scope(scope).await;
        let _ = admin.create_stream(scope, name, segments).await;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..producers {
            let (url, stream) = (url.clone(), stream.clone());
            tasks.push(tokio::spawn(async move {
                let client = Client::connect(&url).await.map_err(|e| e.to_string())?;
                let writer = client.event_writer(&stream).await.map_err(|e| e.to_string())?;
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let payload = bytes::Bytes::from(vec![b'x'; size]);
                let mut pending = FuturesUnordered::new();
                for i in 0..count {
                    let sent = Instant::now();
                    let ack = writer.write_event(format!("{p}-{}", i % 64).as_bytes(), payload.clone());
                    pending.push(async move { (ack.await, sent.elapsed()) });
                    while pending.len() >= inflight.max(1) {
                        let (r, lat) = pending.next().await.expect("non-empty");
                        r.map_err(|e| e.to_string())?;
                        hist.saturating_record(lat.as_micros() as u64);
                    }
                }
                while let Some((r, lat)) = pending.next().await {
                    r.map_err(|e| e.to_string())?;
                    hist.saturating_record(lat.as_micros() as u64);
                }
                Ok::<_, String>(hist)
            }));
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        for t in tasks {
            hist.add(t.await.map_err(|e| e.to_string())??).map_err(|e| e.to_string())?;
        }
        let secs = start.elapsed().as_secs_f64();
        let events = count * u64::from(producers);
        println!(
            "produce: {events} events x {size} B, {producers} producer(s): {:.0} events/s, {:.1} MB/s",
            events as f64 / secs,
            events as f64 * size as f64 / secs / 1e6
        );
        println!(
            "ack latency (us): p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.9),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
            hist.value_at_quantile(0.9999),
            hist.max()
        );
        Ok(())
    })
}
