//! Per-segment append rates for auto-scaling: events/s and bytes/s, each exponentially
//! weighted over a short window and a long one (five times as long). Kept by the container
//! in memory (after a restart the rates start from zero and `measured` says how long they
//! have been watched, so a scaling policy does not mistake a fresh counter for a cold
//! segment). Updates are lazy: appends add to counters, and the counters fold into the
//! averages when a rate is read or at most every `FOLD_EVERY`, with the exact weight for
//! the time passed, so idle segments decay correctly without a timer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Counters fold into the averages at most this often while appends come in.
const FOLD_EVERY: Duration = Duration::from_millis(100);

/// A segment's rates as reported in `SegmentInfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub events_fast: f64,
    pub bytes_fast: f64,
    pub events_slow: f64,
    pub bytes_slow: f64,
    /// How long this segment's rates have been measured.
    pub measured: Duration,
}

struct Tracker {
    rates: Rates,
    events: u64,
    bytes: u64,
    last: Instant,
    since: Instant,
}

impl Tracker {
    fn new(now: Instant) -> Self {
        Self { rates: Rates::default(), events: 0, bytes: 0, last: now, since: now }
    }

    fn fold(&mut self, now: Instant, window: Duration) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        let (events, bytes) = (self.events as f64 / dt, self.bytes as f64 / dt);
        let weight = |tau: f64| 1.0 - (-dt / tau).exp();
        let fast = weight(window.as_secs_f64().max(1e-3));
        let slow = weight(window.as_secs_f64().max(1e-3) * 5.0);
        let r = &mut self.rates;
        r.events_fast += fast * (events - r.events_fast);
        r.bytes_fast += fast * (bytes - r.bytes_fast);
        r.events_slow += slow * (events - r.events_slow);
        r.bytes_slow += slow * (bytes - r.bytes_slow);
        r.measured = now.saturating_duration_since(self.since);
        self.events = 0;
        self.bytes = 0;
        self.last = now;
    }
}

/// The rates of a container's segments, by name.
pub struct SegmentRates {
    window: Duration,
    segments: HashMap<String, Tracker>,
}

impl SegmentRates {
    pub fn new(window: Duration) -> Self {
        Self { window, segments: HashMap::new() }
    }

    /// Counts an append of `events` events (0 for raw bytes) and `bytes` bytes.
    pub fn record(&mut self, segment: &str, events: u64, bytes: u64, now: Instant) {
        let window = self.window;
        let t = match self.segments.get_mut(segment) {
            Some(t) => t,
            None => self.segments.entry(segment.to_string()).or_insert_with(|| Tracker::new(now)),
        };
        t.events += events;
        t.bytes += bytes;
        if now.saturating_duration_since(t.last) >= FOLD_EVERY {
            t.fold(now, window);
        }
    }

    /// The segment's rates now (zero for a segment nothing was appended to yet).
    pub fn rates(&mut self, segment: &str, now: Instant) -> Rates {
        let window = self.window;
        let t = self.segments.entry(segment.to_string()).or_insert_with(|| Tracker::new(now));
        t.fold(now, window);
        t.rates
    }

    /// Forgets a deleted segment.
    pub fn remove(&mut self, segment: &str) {
        self.segments.remove(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_converges_and_idle_decays() {
        let start = Instant::now();
        let mut r = SegmentRates::new(Duration::from_secs(1));
        // 1,000 events/s of 100 B for 5 s, in 10 ms steps.
        for i in 1..=500u64 {
            r.record("s", 10, 1000, start + Duration::from_millis(10 * i));
        }
        let at5 = r.rates("s", start + Duration::from_secs(5));
        assert!((at5.events_fast - 1000.0).abs() < 50.0, "{at5:?}");
        assert!((at5.bytes_fast - 100_000.0).abs() < 5_000.0, "{at5:?}");
        // The slow average (5 s) has come about two thirds of the way.
        assert!(at5.events_slow > 500.0 && at5.events_slow < 800.0, "{at5:?}");
        assert!(at5.measured >= Duration::from_millis(4900));
        // Five idle seconds: the fast rate falls to under 1% of it, the slow one to about a third.
        let idle = r.rates("s", start + Duration::from_secs(10));
        assert!(idle.events_fast < 10.0, "{idle:?}");
        assert!(idle.events_slow > 150.0 && idle.events_slow < 350.0, "{idle:?}");
        assert_eq!(r.rates("other", start).events_fast, 0.0);
    }
}
