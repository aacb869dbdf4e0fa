//! The `scale` workload: what a scaling costs. First the time of split/merge operations on
//! an idle stream (request to reply: the new epoch is writable when the reply comes), then
//! the same while one open-loop producer writes at a fixed rate, with the producer's ack
//! latency (from each event's scheduled send time) and the latency spikes around each
//! scaling: a spike is a burst of events above the p99.9 of the events sent away from any
//! scaling (slow events less than 50 ms apart count as one burst).

use crate::{RunResult, hist_json, report};
use sluice_client::{Client, ClientError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Events sent within this long after a scaling starts count as "around" it.
const WINDOW: Duration = Duration::from_millis(500);
/// Slow events (by scheduled send time) closer than this belong to the same spike.
const SPIKE_GAP: Duration = Duration::from_millis(50);

pub struct ScaleLoad {
    pub segments: u32,
    pub scalings: u32,
    pub rate: u64,
    pub every: Duration,
    pub size: usize,
}

/// One scaling: split the widest segment in two on even steps, merge the narrowest
/// neighbours on odd ones. Returns how long the call took.
async fn scale_once(c: &Client, scope: &str, stream: &str, step: u32) -> Result<Duration, ClientError> {
    let info = c.get_stream(scope, stream).await?;
    let started = Instant::now();
    let width = |low: f64, high: f64| high - low;
    if step.is_multiple_of(2) || info.segments.len() < 2 {
        let widest = info
            .segments
            .iter()
            .max_by(|a, b| width(a.key_low, a.key_high).total_cmp(&width(b.key_low, b.key_high)))
            .expect("a stream has segments");
        c.split_segment(scope, stream, widest.number, 2).await?;
    } else {
        let pair = info
            .segments
            .windows(2)
            .min_by(|a, b| width(a[0].key_low, a[1].key_high).total_cmp(&width(b[0].key_low, b[1].key_high)))
            .expect("two segments");
        c.merge_segments(scope, stream, &[pair[0].number, pair[1].number]).await?;
    }
    Ok(started.elapsed())
}

pub async fn run(url: String, load: ScaleLoad) -> RunResult {
    let e = |e: ClientError| e.to_string();
    let c = Client::connect(&url).await.map_err(e)?;
    let scope = "bench";
    let stream = format!("scale{}", std::process::id());
    let _ = c.create_scope(scope).await;
    c.create_stream(scope, &stream, load.segments).await.map_err(e)?;

    // Idle: nothing writes.
    let mut idle = crate::micros_histogram();
    for step in 0..load.scalings {
        idle.saturating_record(scale_once(&c, scope, &stream, step).await.map_err(e)?.as_micros() as u64);
    }
    report("idle scale", &idle);

    // Under load: an open-loop producer, and a scaling every `every`.
    let writer = c.event_writer(&format!("{scope}/{stream}")).await.map_err(e)?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let producer = {
        let stop = stop.clone();
        let payload = bytes::Bytes::from(vec![b'x'; load.size]);
        let schedule = crate::schedule::Schedule::start_at(start, load.rate, u64::MAX)?;
        tokio::spawn(async move {
            // (scheduled send time since start, ack latency) of every event.
            let mut acks = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = schedule.due_at(i);
                schedule.wait_beyond(i).await;
                let ack = writer.write_event(format!("k{}", i % 256).as_bytes(), payload.clone());
                acks.push(tokio::spawn(async move { ack.await.map(|()| (due - start, due.elapsed())) }));
                i += 1;
            }
            let mut out = Vec::with_capacity(acks.len());
            for a in acks {
                out.push(a.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
            }
            Ok::<_, String>(out)
        })
    };
    tokio::time::sleep(load.every).await;
    let mut loaded = crate::micros_histogram();
    let mut windows = Vec::new();
    for step in 0..load.scalings {
        windows.push(start.elapsed());
        loaded.saturating_record(scale_once(&c, scope, &stream, step).await.map_err(e)?.as_micros() as u64);
        tokio::time::sleep(load.every).await;
    }
    stop.store(true, Ordering::Relaxed);
    let events = producer.await.map_err(|e| e.to_string())??;
    report("loaded scale", &loaded);

    let near = |t: Duration| windows.iter().any(|&w| t >= w && t < w + WINDOW);
    let mut all = crate::micros_histogram();
    let mut away = crate::micros_histogram();
    for &(t, lat) in &events {
        let us = lat.as_micros() as u64;
        all.saturating_record(us);
        if !near(t) {
            away.saturating_record(us);
        }
    }
    let threshold = away.value_at_quantile(0.999);
    let mut spikes = Vec::new();
    let mut worst = Vec::new();
    for &w in &windows {
        let around: Vec<(Duration, u64)> = events
            .iter()
            .filter(|(t, _)| *t >= w && *t < w + WINDOW)
            .map(|&(t, l)| (t, l.as_micros() as u64))
            .collect();
        // Events above the threshold less than SPIKE_GAP apart are one spike.
        let mut runs = 0;
        let mut last_high: Option<Duration> = None;
        for &(t, l) in &around {
            if l > threshold {
                if last_high.is_none_or(|h| t - h > SPIKE_GAP) {
                    runs += 1;
                }
                last_high = Some(t);
            }
        }
        spikes.push(runs);
        worst.push(around.iter().map(|a| a.1).max().unwrap_or(0));
    }
    report("ack (whole run)", &all);
    report("ack (away from scalings)", &away);
    let max_spikes = spikes.iter().copied().max().unwrap_or(0);
    println!(
        "scale: {} scalings every {} ms under {} events/s: spikes above p99.9 ({threshold} us) per scaling: {spikes:?} (max {max_spikes}); worst ack within {} ms of each (us): {worst:?}",
        load.scalings,
        load.every.as_millis(),
        load.rate,
        WINDOW.as_millis()
    );
    c.seal_stream(scope, &stream).await.map_err(e)?;
    c.delete_stream(scope, &stream).await.map_err(e)?;
    let json = serde_json::json!({"workload": "scale", "segments": load.segments, "scalings": load.scalings,
        "rate": load.rate, "every_ms": load.every.as_millis() as u64, "size": load.size,
        "idle_scale": hist_json(&idle), "loaded_scale": hist_json(&loaded), "ack": hist_json(&all),
        "ack_away": hist_json(&away), "spikes_per_scaling": spikes, "worst_ack_near_scaling_us": worst});
    Ok((json, vec![("ack".to_string(), all), ("idle scale".to_string(), idle)]))
}
