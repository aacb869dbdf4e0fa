//! A shard's own view of its latency: how long appends take from the moment the shard takes
//! them up (their frame read) until their acknowledgement is ready, and how long each log
//! flush takes (write and sync, until the shard sees it complete). A client measures these
//! plus the network and its own scheduling; the difference says where the time goes.
//!
//! A shard is one thread, so its statistics live in a thread-local: recording is a histogram
//! increment, with no sharing and no locks. `GetStats` reads (and optionally resets) them.

use hdrhistogram::Histogram;
use sluice_net::messages::{Latencies, ShardStats};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Latencies above this are counted at this value (one minute).
const RECORD_MAX_US: u64 = 60_000_000;

struct Stats {
    since: Instant,
    requests: u64,
    appends: Histogram<u64>,
    flushes: Histogram<u64>,
    flushed_bytes: u64,
}

impl Stats {
    fn new() -> Stats {
        let hist = || Histogram::new_with_bounds(1, RECORD_MAX_US, 3).expect("histogram bounds");
        Stats { since: Instant::now(), requests: 0, appends: hist(), flushes: hist(), flushed_bytes: 0 }
    }
}

thread_local! {
    static STATS: RefCell<Stats> = RefCell::new(Stats::new());
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, RECORD_MAX_US)
}

/// Starts this thread's counting (a shard calls it as it starts, so that the first window
/// covers the shard's whole life).
pub fn start() {
    STATS.with(|s| *s.borrow_mut() = Stats::new());
}

/// A request read from a client.
pub fn record_request() {
    STATS.with(|s| s.borrow_mut().requests += 1);
}

/// An append (or a transaction's merge) answered `took` after its frame was read.
pub fn record_append(took: Duration) {
    STATS.with(|s| s.borrow_mut().appends.saturating_record(micros(took)));
}

/// A log flush of `bytes` that took `took` from its start until the shard saw it complete.
pub fn record_flush(took: Duration, bytes: u64) {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        s.flushes.saturating_record(micros(took));
        s.flushed_bytes += bytes;
    });
}

fn latencies(h: &Histogram<u64>) -> Latencies {
    Latencies::from_histogram(h.len(), h.max(), |q| h.value_at_quantile(q))
}

/// This shard's statistics since they were last reset (or since the shard started); with
/// `reset`, counting starts over after they are taken.
pub fn snapshot(shard: u32, reset: bool) -> ShardStats {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        let stats = ShardStats {
            // The server names its node.
            node: String::new(),
            shard,
            window_ms: s.since.elapsed().as_millis() as u64,
            requests: s.requests,
            appends: latencies(&s.appends),
            flushes: latencies(&s.flushes),
            flushed_bytes: s.flushed_bytes,
            // The server adds its containers' state.
            containers: Vec::new(),
        };
        if reset {
            *s = Stats::new();
        }
        stats
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_summarise_what_was_recorded_and_reset_starts_over() {
        // A test thread has its own statistics, like a shard.
        let empty = snapshot(3, false);
        assert_eq!((empty.shard, empty.appends.count, empty.appends.p50_us, empty.appends.max_us), (3, 0, 0, 0));
        for us in 1..=1000u64 {
            record_append(Duration::from_micros(us));
        }
        record_flush(Duration::from_micros(150), 4096);
        record_flush(Duration::from_secs(3600), 8192);
        let s = snapshot(3, true);
        assert_eq!(s.appends.count, 1000);
        assert!((495..=505).contains(&s.appends.p50_us), "{:?}", s.appends);
        assert!((985..=995).contains(&s.appends.p99_us), "{:?}", s.appends);
        let a = &s.appends;
        assert!(a.p50_us <= a.p90_us && a.p90_us <= a.p99_us && a.p99_us <= a.p999_us && a.p999_us <= a.max_us);
        assert_eq!(s.flushes.count, 2);
        assert_eq!(s.flushed_bytes, 12288);
        // An hour is counted as the largest value kept, not lost.
        assert!(s.flushes.max_us >= RECORD_MAX_US * 999 / 1000, "{:?}", s.flushes);
        let after = snapshot(3, false);
        assert_eq!((after.appends.count, after.flushes.count, after.flushed_bytes), (0, 0, 0));
    }
}
