//! Shard statistics (`Client::shard_stats`) laid out for people: the table `sluice stats`
//! and `sluice-bench --server-stats` print.

pub use sluice_net::messages::{Latencies, ShardStats};

fn cells(l: &Latencies) -> String {
    format!("{:>7} {:>7} {:>7} {:>7} {:>7}", l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us)
}

/// The table `sluice stats` prints: one row per shard, latencies in microseconds.
pub fn table(stats: &[ShardStats]) -> String {
    let mut out = format!(
        "{:>5} {:>8} | {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
        "shard",
        "window_s",
        "appends",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "flushes",
        "flush/s",
        "KiB/flush",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us"
    );
    for s in stats {
        let secs = s.window_ms as f64 / 1000.0;
        let rate = if s.window_ms == 0 { 0.0 } else { s.flushes.count as f64 / secs };
        let kib = if s.flushes.count == 0 { 0.0 } else { s.flushed_bytes as f64 / 1024.0 / s.flushes.count as f64 };
        out += &format!(
            "{:>5} {:>8.1} | {:>9} {} | {:>8} {:>8.0} {:>9.1} {}\n",
            s.shard,
            secs,
            s.appends.count,
            cells(&s.appends),
            s.flushes.count,
            rate,
            kib,
            cells(&s.flushes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_shard_and_no_division_by_nothing() {
        let busy = ShardStats {
            shard: 1,
            window_ms: 2000,
            appends: Latencies { count: 10, p50_us: 300, p90_us: 500, p99_us: 900, p999_us: 950, max_us: 990 },
            flushes: Latencies { count: 4, p50_us: 150, p90_us: 200, p99_us: 210, p999_us: 220, max_us: 230 },
            flushed_bytes: 16384,
        };
        let idle = ShardStats { shard: 0, window_ms: 0, flushed_bytes: 0, ..busy.clone() };
        let idle = ShardStats { appends: Latencies::default(), flushes: Latencies::default(), ..idle };
        let t = table(&[idle, busy]);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 3, "{t}");
        assert!(rows[0].contains("flush/s") && rows[0].contains("KiB/flush"), "{t}");
        // 4 flushes in 2 s of 4 KiB each.
        let busy_row: Vec<&str> = rows[2].split_whitespace().collect();
        let want = "1 2.0 | 10 300 500 900 950 990 | 4 2 4.0 150 200 210 220 230";
        assert_eq!(busy_row, want.split(' ').collect::<Vec<_>>(), "{t}");
        let idle_row: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(idle_row, "0 0.0 | 0 0 0 0 0 0 | 0 0 0.0 0 0 0 0 0".split(' ').collect::<Vec<_>>(), "{t}");
        assert!(!t.contains("NaN") && !t.contains("inf"), "{t}");
    }
}
