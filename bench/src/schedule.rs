//! The open-loop send schedule: event `i` is due at `start + i / rate`. A thread of its own
//! sleeps until each due time (thread sleep with a 1 µs timer slack, so it wakes within tens
//! of microseconds; at most every 100 µs) and publishes how many events are due; the sending
//! task waits on that. Or, with a client whose sends are plain calls (`start_sending`), the
//! thread sends the due events itself: on a busy machine the hop to a sending task was the
//! larger part of the harness's lateness (p99 2–3 ms against 0.6–0.7 ms for the schedule
//! thread's own wake-up, at 100k events/s on two cores).
//! Tokio's timer rounds to whole milliseconds: a sender sleeping on it sends in 1 ms bursts,
//! and every latency measured from the scheduled send time would include up to a
//! millisecond of the harness's own lateness.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Longest single sleep of the schedule thread, so that dropping the schedule is prompt.
const SLEEP_MAX: Duration = Duration::from_millis(10);
/// Shortest time between two publications: at high rates one wake-up releases several
/// events (each still timed from its own due time), which bounds the thread's and the
/// sender's wake-ups to 10,000 a second.
const TICK_MIN: Duration = Duration::from_micros(100);

pub struct Schedule {
    start: Instant,
    rate: f64,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    /// Events due so far (never more than the total).
    due: AtomicU64,
    more: Notify,
    stop: AtomicBool,
}

impl Schedule {
    /// Starts the schedule of `total` events at `rate` per second from `start`.
    pub fn start_at(start: Instant, rate: u64, total: u64) -> Result<Schedule, String> {
        Self::spawn(start, rate, total, |_| {})
    }

    /// Starts the schedule and calls `send` on its thread, inside `runtime`'s context, with
    /// each run of events as they fall due (in order, every event once); the due count is
    /// published after the call, so it counts events sent.
    pub fn start_sending<F>(
        start: Instant,
        rate: u64,
        total: u64,
        runtime: tokio::runtime::Handle,
        mut send: F,
    ) -> Result<Schedule, String>
    where
        F: FnMut(Range<u64>) + Send + 'static,
    {
        Self::spawn(start, rate, total, move |due| {
            let _context = runtime.enter();
            send(due)
        })
    }

    fn spawn<F>(start: Instant, rate: u64, total: u64, mut on_due: F) -> Result<Schedule, String>
    where
        F: FnMut(Range<u64>) + Send + 'static,
    {
        let rate = rate.max(1) as f64;
        let shared = Arc::new(Shared { due: AtomicU64::new(0), more: Notify::new(), stop: AtomicBool::new(false) });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-schedule".into())
            .spawn(move || {
                // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                let mut published = 0u64;
                // When the last publication was (none yet: the first event is not held back).
                let mut last: Option<Instant> = None;
                while published < total && !s.stop.load(Ordering::Relaxed) {
                    let due = start + due_after(published, rate);
                    let next = last.map_or(due, |l| due.max(l + TICK_MIN));
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(SLEEP_MAX));
                        continue;
                    }
                    // Everything due by now, in one step (at high rates one wake covers several).
                    let due_by_now = ((now - start).as_secs_f64() * rate) as u64 + 1;
                    let newly = published..due_by_now.clamp(published + 1, total);
                    published = newly.end;
                    on_due(newly);
                    last = Some(now);
                    s.due.store(published, Ordering::Release);
                    s.more.notify_one();
                }
            })
            .map_err(|e| format!("cannot start the schedule thread: {e}"))?;
        Ok(Schedule { start, rate, shared, thread: Some(thread) })
    }

    /// When event `i` is due.
    pub fn due_at(&self, i: u64) -> Instant {
        self.start + due_after(i, self.rate)
    }

    /// How many events are due by now.
    pub fn due_count(&self) -> u64 {
        self.shared.due.load(Ordering::Acquire)
    }

    /// Returns once more than `sent` events are due (at once if they already are).
    pub async fn wait_beyond(&self, sent: u64) {
        loop {
            // A notification sent between the check and the wait is kept for it.
            let more = self.shared.more.notified();
            if self.due_count() > sent {
                return;
            }
            more.await;
        }
    }
}

/// How long after the start event `i` is due at `rate` events per second.
pub fn due_after(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event becomes due, in order, never before its time.
    #[tokio::test]
    async fn events_become_due_in_order_and_never_early() {
        let total = 2000;
        let s = Schedule::start_at(Instant::now(), 20_000, total).unwrap();
        assert_eq!(s.due_at(20_000) - s.due_at(0), Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = 0;
        while seen < total {
            assert!(Instant::now() < deadline, "schedule stalled at {seen} of {total}");
            s.wait_beyond(seen).await;
            let due = s.due_count();
            assert!(due > seen && due <= total, "due count {due} after {seen}");
            assert!(Instant::now() >= s.due_at(due - 1), "event {} published before its time", due - 1);
            seen = due;
        }
    }

    /// The schedule's thread sends every event once, in order, never before its time, inside
    /// the runtime (a client may spawn tasks as it sends); the due count follows the sends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_thread_sends_each_event_once_in_order_when_due() {
        let total = 3000;
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let send = move |due: Range<u64>| {
            let now = Instant::now();
            // Spawning needs the runtime's context: the schedule's thread has it.
            let tx = tx.clone();
            tokio::spawn(async move { tx.send((due, now)) });
        };
        let s = Schedule::start_sending(start, 30_000, total, tokio::runtime::Handle::current(), send).unwrap();
        let mut sent: Vec<(Range<u64>, Instant)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent.iter().map(|(r, _)| r.end - r.start).sum::<u64>() < total {
            assert!(Instant::now() < deadline, "schedule stalled after {sent:?}");
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
            sent.push(got);
        }
        sent.sort_by_key(|(r, _)| r.start);
        let mut next = 0;
        for (r, at) in &sent {
            assert_eq!(r.start, next, "a gap or a repeat before {r:?}");
            assert!(r.end > r.start);
            assert!(*at >= start + due_after(r.end - 1, 30_000.0), "events {r:?} sent before the last was due");
            next = r.end;
        }
        assert_eq!(next, total);
        // Published right after the last send returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.due_count() < total {
            assert!(Instant::now() < deadline, "due count {} of {total}", s.due_count());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Dropping a schedule whose next event is far off stops its thread.
    #[tokio::test]
    async fn dropping_stops_the_thread() {
        let s = Schedule::start_at(Instant::now(), 1, 10).unwrap();
        s.wait_beyond(0).await;
        assert_eq!(s.due_count(), 1);
        let t = Instant::now();
        drop(s);
        assert!(t.elapsed() < Duration::from_secs(5), "drop waited for the next due time");
    }
}
