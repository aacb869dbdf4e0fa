//! Shard statistics (`Client::shard_stats`) laid out for people: the table `sluice stats`
//! and `sluice-bench --server-stats` print. And the client's own measure of its appends'
//! round trips (`ClientConfig::measure_append_round_trips`).

pub use sluice_net::messages::{ContainerHealth, Latencies, LogHeldBy, ShardStats};
use std::sync::Mutex;
use std::time::Duration;

/// Round trips of a client's answered append requests: from just before a request is
/// written to the socket until its reply is read (on the connection's reader task). What
/// lies between the writer and the server: the socket both ways, both sides' scheduling, and
/// the server's own time (which its `appends` latencies count from the frame's arrival in
/// its buffer).
pub(crate) struct RoundTrips(Mutex<hdrhistogram::Histogram<u64>>);

impl RoundTrips {
    pub(crate) fn new() -> Self {
        Self(Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")))
    }

    pub(crate) fn record(&self, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        self.0.lock().expect("lock").saturating_record(us);
    }

    /// The round trips so far; counting starts over.
    pub(crate) fn take(&self) -> RoundTripHistogram {
        let mut h = self.0.lock().expect("lock");
        let taken = RoundTripHistogram(h.clone());
        h.reset();
        taken
    }
}

/// A client's append round trips as taken (`Client::take_append_round_trips`), in
/// microseconds: several clients' add up (`merge`) before their percentiles are read.
#[derive(Clone, Debug)]
pub struct RoundTripHistogram(hdrhistogram::Histogram<u64>);

impl RoundTripHistogram {
    /// Adds `other`'s round trips to these.
    pub fn merge(&mut self, other: &RoundTripHistogram) {
        // Both have the same bounds, so every value fits.
        let _ = self.0.add(&other.0);
    }

    /// How many round trips, and their percentiles.
    pub fn latencies(&self) -> Latencies {
        let h = &self.0;
        Latencies::from_histogram(h.len(), h.max(), |q| h.value_at_quantile(q))
    }
}

fn cells(l: &Latencies) -> String {
    format!("{:>7} {:>7} {:>7} {:>7} {:>7}", l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us)
}

/// Whether the figures come from more than one node (a cluster): rows and lines then name
/// the node too.
fn many_nodes(stats: &[ShardStats]) -> bool {
    stats.iter().any(|s| s.node != stats[0].node)
}

/// Where a shard is, for people: `shard 1`, or in a cluster `node n2 shard 1`.
fn place(s: &ShardStats, many_nodes: bool) -> String {
    match many_nodes {
        true => format!("node {} shard {}", s.node, s.shard),
        false => format!("shard {}", s.shard),
    }
}

/// The table `sluice stats` prints: one row per shard, latencies in microseconds (in a
/// cluster, the node's id first on each row).
pub fn table(stats: &[ShardStats]) -> String {
    let nodes = many_nodes(stats);
    let width = if nodes { stats.iter().map(|s| s.node.len()).max().unwrap_or(0).max(4) } else { 0 };
    let node = |name: &str| if nodes { format!("{name:<width$} ") } else { String::new() };
    let mut out = node("node");
    out += &format!(
        "{:>5} {:>8} {:>9} | {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
        "shard",
        "window_s",
        "req/s",
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
        let per_s = |n: u64| if s.window_ms == 0 { 0.0 } else { n as f64 / secs };
        let rate = per_s(s.flushes.count);
        let kib = if s.flushes.count == 0 { 0.0 } else { s.flushed_bytes as f64 / 1024.0 / s.flushes.count as f64 };
        out += &node(&s.node);
        out += &format!(
            "{:>5} {:>8.1} {:>9.0} | {:>9} {} | {:>8} {:>8.0} {:>9.1} {}\n",
            s.shard,
            secs,
            per_s(s.requests),
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

/// A duration for people: `45s`, `12m 5s`, `3h 20m`, `2d 4h`.
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Each problem of a container, one line each (none for a healthy one).
pub fn problems(h: &ContainerHealth) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(reason) = &h.stopped {
        out.push(format!("stopped, serving nothing until the node restarts: {reason}"));
    }
    if let Some(ms) = h.no_space_ms {
        out.push(format!("disk full for {}: appends refused until a log file fits", ago(ms)));
    }
    if let Some(ms) = h.mover_failing_ms {
        let e = h.mover_error.as_deref().unwrap_or("");
        out.push(format!("tier-2 mover failing for {}: {e}", ago(ms)));
    }
    if h.damaged_reads > 0 {
        let last = h.last_damaged_read.as_deref().unwrap_or("");
        out.push(format!("{} reads refused on damaged data since the node started; the last: {last}", h.damaged_reads));
    }
    for line in &h.salvaged {
        out.push(format!("started past damaged log records (--salvage-damaged-log): {line}"));
    }
    if let (Some(ms), false) = (h.scrub_ago_ms, h.scrub_damage.is_empty()) {
        for d in &h.scrub_damage {
            out.push(format!("the last log scrub ({} ago) found: {d}", ago(ms)));
        }
    }
    out
}

/// A latency distribution as JSON (microseconds): the shape `json` gives the shards' figures.
pub fn latencies_json(l: &Latencies) -> serde_json::Value {
    serde_json::json!({"count": l.count, "p50": l.p50_us, "p90": l.p90_us, "p99": l.p99_us,
        "p99.9": l.p999_us, "max": l.max_us})
}

/// The shards' figures and their containers' state as JSON (`sluice stats --json`,
/// `sluice-bench --server-stats`): one object per shard; latencies in microseconds; each
/// container with its `problems` in words (empty: healthy).
pub fn json(stats: &[ShardStats]) -> serde_json::Value {
    let l = latencies_json;
    stats
        .iter()
        .map(|s| {
            let containers: Vec<_> = s
                .containers
                .iter()
                .map(|h| {
                    serde_json::json!({"container": h.container, "log_bytes": h.log_bytes,
                        "spare_bytes": h.spare_bytes, "files_reused": h.files_reused,
                        "segments_copied": h.segments_copied,
                        "log_held_by": h.log_held_by.as_ref().map(|b| serde_json::json!({"segment": b.segment, "from": b.from, "files": b.files})),
                        "stopped": h.stopped,
                        "no_space_ms": h.no_space_ms, "mover_failing_ms": h.mover_failing_ms,
                        "mover_error": h.mover_error, "damaged_reads": h.damaged_reads,
                        "last_damaged_read": h.last_damaged_read, "scrub_ago_ms": h.scrub_ago_ms,
                        "scrub_damage": h.scrub_damage, "salvaged": h.salvaged, "problems": problems(h)})
                })
                .collect();
            serde_json::json!({"node": s.node, "shard": s.shard, "window_ms": s.window_ms, "requests": s.requests, "appends": l(&s.appends),
                "flushes": l(&s.flushes), "flushed_bytes": s.flushed_bytes, "containers": containers})
        })
        .collect()
}

/// The containers' part of `sluice stats`: one summary line, then a line per problem.
/// Returns the text and how many containers have a problem.
pub fn health(stats: &[ShardStats]) -> (String, usize) {
    let nodes = many_nodes(stats);
    let all: Vec<(String, &ContainerHealth)> =
        stats.iter().flat_map(|s| s.containers.iter().map(move |h| (place(s, nodes), h))).collect();
    let mib = |f: fn(&ContainerHealth) -> u64| all.iter().map(|(_, h)| f(h)).sum::<u64>() as f64 / (1 << 20) as f64;
    let (log_mib, spare_mib) = (mib(|h| h.log_bytes), mib(|h| h.spare_bytes));
    let reused: u64 = all.iter().map(|(_, h)| h.files_reused).sum();
    let copied: u64 = all.iter().map(|(_, h)| h.segments_copied).sum();
    let scrubbed: Vec<u64> = all.iter().filter_map(|(_, h)| h.scrub_ago_ms).collect();
    let mut lines = Vec::new();
    let mut troubled = 0;
    let mut notes = Vec::new();
    for (place, h) in &all {
        let p = problems(h);
        troubled += usize::from(!p.is_empty());
        lines.extend(p.into_iter().map(|p| format!("  container {} ({place}): {p}\n", h.container)));
        if let Some(held) = &h.log_held_by {
            notes.push(format!("  container {} ({place}), not a problem: {held}; {}\n", h.container, held_hint(held)));
        }
    }
    let since = if nodes { "their nodes started" } else { "the node started" };
    let scrubs = match scrubbed.iter().min() {
        None => format!("none scrubbed since {since}"),
        Some(latest) => format!("{} of them scrubbed since {since}, the latest {} ago", scrubbed.len(), ago(*latest)),
    };
    let verdict = match troubled {
        0 => "no problems".to_string(),
        1 => "1 with problems:".to_string(),
        n => format!("{n} with problems:"),
    };
    let spares = match (spare_mib > 0.0, reused) {
        (false, 0) => String::new(),
        (_, reused) => format!(" (and {spare_mib:.1} MiB of freed ones kept to reuse; {reused} made from freed ones)"),
    };
    let spares = match copied {
        0 => spares,
        1 => format!("{spares}, a small segment copied forward once so older log files could go"),
        n => format!("{spares}, small segments copied forward {n} times so older log files could go"),
    };
    let mut out = format!("containers: {}, {log_mib:.1} MiB of log files{spares}; {scrubs}; {verdict}\n", all.len());
    out.extend(lines);
    out.extend(notes);
    (out, troubled)
}

/// What frees the log files a segment alone holds.
fn held_hint(held: &LogHeldBy) -> &'static str {
    let group_state = sluice_net::ScopedStream::of_segment(&held.segment)
        .is_some_and(|(s, _)| s.stream.starts_with(crate::group::GROUP_STATE_PREFIX));
    if group_state {
        "a reader group's state: its running readers compact it every 10 s, the retention service when none runs"
    } else {
        "they go once a truncation or the stream's retention cuts the segment; without either they stay: give the stream a retention policy, or use a tier-2"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_shard_and_no_division_by_nothing() {
        let busy = ShardStats {
            node: "standalone".into(),
            shard: 1,
            window_ms: 2000,
            requests: 8,
            appends: Latencies { count: 10, p50_us: 300, p90_us: 500, p99_us: 900, p999_us: 950, max_us: 990 },
            flushes: Latencies { count: 4, p50_us: 150, p90_us: 200, p99_us: 210, p999_us: 220, max_us: 230 },
            flushed_bytes: 16384,
            containers: Vec::new(),
        };
        let idle = ShardStats { shard: 0, window_ms: 0, flushed_bytes: 0, ..busy.clone() };
        let idle = ShardStats { appends: Latencies::default(), flushes: Latencies::default(), ..idle };
        let t = table(&[idle, busy]);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 3, "{t}");
        assert!(rows[0].contains("flush/s") && rows[0].contains("KiB/flush"), "{t}");
        // 4 flushes in 2 s of 4 KiB each.
        let busy_row: Vec<&str> = rows[2].split_whitespace().collect();
        let want = "1 2.0 4 | 10 300 500 900 950 990 | 4 2 4.0 150 200 210 220 230";
        assert_eq!(busy_row, want.split(' ').collect::<Vec<_>>(), "{t}");
        let idle_row: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(idle_row, "0 0.0 0 | 0 0 0 0 0 0 | 0 0 0.0 0 0 0 0 0".split(' ').collect::<Vec<_>>(), "{t}");
        assert!(!t.contains("NaN") && !t.contains("inf"), "{t}");
    }

    #[test]
    fn healthy_containers_make_one_line_and_each_problem_its_own() {
        let fine = |container| ContainerHealth { container, log_bytes: 64 << 20, ..Default::default() };
        let shard = |shard, containers| idle_shard("standalone", shard, containers);
        let (t, n) = health(&[shard(0, vec![fine(0), fine(2)]), shard(1, vec![fine(1)])]);
        assert_eq!(n, 0);
        assert_eq!(t, "containers: 3, 192.0 MiB of log files; none scrubbed since the node started; no problems\n");
        let sick = ContainerHealth {
            container: 3,
            log_bytes: 0,
            spare_bytes: 64 << 20,
            files_reused: 5,
            segments_copied: 2,
            log_held_by: None,
            stopped: Some("log write failed".into()),
            no_space_ms: Some(5_000),
            mover_failing_ms: Some(125_000),
            mover_error: Some("tier-2 down".into()),
            damaged_reads: 2,
            last_damaged_read: Some("record at byte 8192 fails its checksum".into()),
            scrub_ago_ms: Some(7_300_000),
            scrub_damage: vec!["file 1: damaged".into(), "file 2: damaged".into()],
            salvaged: vec!["s/t/0: bytes 10..20 lost".into()],
        };
        let scrubbed_sound = ContainerHealth {
            scrub_ago_ms: Some(1_000),
            log_held_by: Some(LogHeldBy { segment: "s/c/0".into(), from: 4096, files: 9 }),
            ..fine(1)
        };
        let (t, n) = health(&[shard(0, vec![fine(0), sick]), shard(1, vec![scrubbed_sound])]);
        assert_eq!(n, 1, "{t}");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "containers: 3, 128.0 MiB of log files (and 64.0 MiB of freed ones kept to reuse; 5 made from freed ones), small segments copied forward 2 times so older log files could go; 2 of them scrubbed since the node started, the latest 1s ago; 1 with problems:"
        );
        assert_eq!(
            &lines[1..],
            &[
                "  container 3 (shard 0): stopped, serving nothing until the node restarts: log write failed",
                "  container 3 (shard 0): disk full for 5s: appends refused until a log file fits",
                "  container 3 (shard 0): tier-2 mover failing for 2m 5s: tier-2 down",
                "  container 3 (shard 0): 2 reads refused on damaged data since the node started; the last: record at byte 8192 fails its checksum",
                "  container 3 (shard 0): started past damaged log records (--salvage-damaged-log): s/t/0: bytes 10..20 lost",
                "  container 3 (shard 0): the last log scrub (2h 1m ago) found: file 1: damaged",
                "  container 3 (shard 0): the last log scrub (2h 1m ago) found: file 2: damaged",
                "  container 1 (shard 1), not a problem: s/c/0 alone keeps 9 log files the other segments let go (its data from offset 4096 is only in the log); they go once a truncation or the stream's retention cuts the segment; without either they stay: give the stream a retention policy, or use a tier-2",
            ]
        );
        assert_eq!(ago(2 * 86_400_000 + 4 * 3_600_000 + 59_000), "2d 4h");
        let group = LogHeldBy { segment: "s/_rg_readers/0".into(), from: 0, files: 4 };
        assert!(held_hint(&group).contains("reader group's state"));
        // The JSON has the fields, not the sentence.
        let j = json(&[shard(1, vec![ContainerHealth { log_held_by: Some(group), ..fine(1) }])]);
        assert_eq!(
            j[0]["containers"][0]["log_held_by"],
            serde_json::json!({"segment": "s/_rg_readers/0", "from": 0, "files": 4})
        );
        assert_eq!(json(&[shard(0, vec![fine(0)])])[0]["containers"][0]["log_held_by"], serde_json::Value::Null);
    }

    /// A shard of `node` that counted for a second and saw nothing.
    fn idle_shard(node: &str, shard: u32, containers: Vec<ContainerHealth>) -> ShardStats {
        ShardStats {
            node: node.into(),
            shard,
            window_ms: 1000,
            requests: 0,
            appends: Latencies::default(),
            flushes: Latencies::default(),
            flushed_bytes: 0,
            containers,
        }
    }

    #[test]
    fn a_cluster_names_the_node_of_each_row_and_problem() {
        let shard = idle_shard;
        let fine = |container| ContainerHealth { container, ..Default::default() };
        let sick = ContainerHealth { damaged_reads: 1, last_damaged_read: Some("x".into()), ..fine(7) };
        let stats = [shard("n0", 0, vec![fine(0)]), shard("node-2", 1, vec![sick])];
        let t = table(&stats);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!((rows[0][0], rows[0][1]), ("node", "shard"), "{t}");
        assert_eq!((rows[1][0], rows[1][1], rows[2][0], rows[2][1]), ("n0", "0", "node-2", "1"), "{t}");
        let (h, n) = health(&stats);
        assert_eq!(n, 1);
        assert!(h.contains("  container 7 (node node-2 shard 1): 1 reads refused"), "{h}");
        assert!(h.contains("none scrubbed since their nodes started"), "{h}");
        assert_eq!(json(&stats)[1]["node"], "node-2");
        // One node: no node column, as before.
        assert!(table(&stats[..1]).starts_with("shard"), "{}", table(&stats[..1]));
    }
}
