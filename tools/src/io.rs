//! `sluice write` and `sluice read`.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use sluice_client::{Client, ReadFrom};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct WriteArgs {
    /// scope/stream
    stream: String,
    /// Routing key for stdin lines (default: the line number, which spreads lines over segments).
    #[arg(long)]
    key: Option<String>,
    /// Generate this many events instead of reading stdin.
    #[arg(long)]
    count: Option<u64>,
    /// Size of each generated event in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Number of routing keys for generated events (key-0 .. key-{K-1}).
    #[arg(long, default_value_t = 16)]
    keys: u64,
    /// Most events awaiting acknowledgement at once.
    #[arg(long, default_value_t = 10_000)]
    inflight: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum From {
    Head,
    Tail,
}

#[derive(clap::Args)]
pub struct ReadArgs {
    /// scope/stream
    stream: String,
    /// Start at the oldest event or only read new ones.
    #[arg(long, value_enum, default_value = "head")]
    from: From,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long without an event.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Payload of generated event `n` for `key`: "key:n:" padded with '.' to `size` bytes.
fn generated(key: &str, n: u64, size: usize) -> Bytes {
    let mut p = format!("{key}:{n}:").into_bytes();
    p.resize(size.max(p.len()), b'.');
    Bytes::from(p)
}

pub async fn write(c: &Client, a: WriteArgs) -> Result<(), String> {
    let writer = c.event_writer(&a.stream).await.map_err(|e| e.to_string())?;
    let Some(count) = a.count else {
        let stdin = std::io::stdin();
        let mut acks = std::collections::VecDeque::new();
        let mut n = 0u64;
        for line in stdin.lock().lines() {
            let line = line.map_err(|e| format!("reading stdin: {e}"))?;
            let key = a.key.clone().unwrap_or_else(|| n.to_string());
            acks.push_back(writer.write_event(key.as_bytes(), line.into_bytes()));
            n += 1;
            if acks.len() >= a.inflight.max(1) {
                acks.pop_front().expect("non-empty").await.map_err(|e| e.to_string())?;
            }
        }
        for ack in acks {
            ack.await.map_err(|e| e.to_string())?;
        }
        eprintln!("wrote {n} event(s)");
        return Ok(());
    };
    if a.inflight == 0 || a.keys == 0 {
        return Err("--inflight and --keys must be at least 1".into());
    }
    let keys: Vec<String> = (0..a.keys).map(|k| format!("key-{k}")).collect();
    let mut seq = vec![0u64; keys.len()];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let mut last_report = start;
    let mut done = 0u64;
    for i in 0..count {
        let k = (i % a.keys) as usize;
        let payload = generated(&keys[k], seq[k], a.size);
        seq[k] += 1;
        let sent = Instant::now();
        let ack = writer.write_event(keys[k].as_bytes(), payload);
        pending.push(async move { (ack.await, sent.elapsed()) });
        while pending.len() >= a.inflight {
            let (r, lat) = pending.next().await.expect("non-empty");
            r.map_err(|e| e.to_string())?;
            hist.saturating_record(lat.as_micros() as u64);
            done += 1;
        }
        if last_report.elapsed() > Duration::from_secs(1) {
            last_report = Instant::now();
            eprint!("\r{done} events acknowledged ({:.0} events/s)   ", done as f64 / start.elapsed().as_secs_f64());
        }
    }
    while let Some((r, lat)) = pending.next().await {
        r.map_err(|e| e.to_string())?;
        hist.saturating_record(lat.as_micros() as u64);
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    if last_report != start {
        eprintln!();
    }
    println!(
        "{done} events of {} B in {secs:.2} s: {:.0} events/s, {:.1} MB/s",
        a.size,
        done as f64 / secs,
        done as f64 * a.size as f64 / secs / 1e6
    );
    println!(
        "ack latency (us): p50 {} p99 {} p99.9 {} max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    Ok(())
}

pub async fn read(c: &Client, a: ReadArgs) -> Result<(), String> {
    let from = match a.from {
        From::Head => ReadFrom::Head,
        From::Tail => ReadFrom::Tail,
    };
    let mut reader = c.event_reader(&a.stream, from).await.map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        match reader.read_next(Duration::from_millis(a.timeout_ms)).await.map_err(|e| e.to_string())? {
            Some(ev) => {
                out.write_all(&ev.payload).and_then(|_| out.write_all(b"\n")).map_err(|e| e.to_string())?;
                n += 1;
            }
            None => break,
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(())
}
