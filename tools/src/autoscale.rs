//! The auto-scaler: applies each stream's automatic scaling policy. Like retention it runs
//! once per cluster (next to the node in `sluice standalone`; on the elected controller in
//! a cluster) and works through the client API. Every interval it reads the append rates
//! the shards keep per segment (`SegmentInfo::rates`) and, for a stream whose last scaling
//! is older than the cooldown, does at most one thing: splits the hottest segment above
//! the target rate into up to FACTOR parts, or else merges the coolest pair of adjacent
//! segments that have both been well below the target (under half, over the short and the
//! long average, watched for at least a window), never below MIN segments. The streams are
//! listed with their policies, so a stream without an automatic policy costs no request.

use sluice_client::{Client, ClientError};
use sluice_net::{ScalingPolicy, SegmentNumber};
use std::time::Duration;

/// One segment's load as the policy sees it, in key order.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentLoad {
    pub number: u64,
    /// Rate over the short window, in the policy's unit (events/s or bytes/s).
    pub rate: f64,
    /// Rate over the long window.
    pub rate_long: f64,
    /// The rates cover at least one whole window.
    pub settled: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Split { segment: u64, parts: u32 },
    Merge { segments: [u64; 2] },
}

/// The target rate per segment, the split factor and the minimum segment count; `None`
/// for a fixed policy.
fn limits(policy: ScalingPolicy) -> Option<(f64, u32, u32)> {
    match policy {
        ScalingPolicy::Fixed { .. } => None,
        ScalingPolicy::ByEventRate { events_per_s, factor, min_segments } => {
            Some((f64::from(events_per_s), factor, min_segments))
        }
        ScalingPolicy::ByByteRate { kib_per_s, factor, min_segments } => {
            Some((f64::from(kib_per_s) * 1024.0, factor, min_segments))
        }
    }
}

/// What the policy does with a stream whose segments (in key order) carry these loads.
pub fn decide(policy: ScalingPolicy, segments: &[SegmentLoad]) -> Option<Action> {
    let (target, factor, min) = limits(policy)?;
    let hottest = segments.iter().filter(|s| s.rate > target).max_by(|a, b| a.rate.total_cmp(&b.rate));
    if let Some(s) = hottest {
        let room = 1024usize.saturating_sub(segments.len()) as u32 + 1;
        let parts = ((s.rate / target).ceil() as u32).clamp(2, factor).min(room);
        if parts >= 2 {
            return Some(Action::Split { segment: s.number, parts });
        }
    }
    if segments.len() <= min as usize {
        return None;
    }
    let cold = |s: &SegmentLoad| s.settled && s.rate < target / 2.0 && s.rate_long < target / 2.0;
    segments
        .windows(2)
        .filter(|w| cold(&w[0]) && cold(&w[1]) && w[0].rate + w[1].rate < target / 2.0)
        .min_by(|a, b| (a[0].rate + a[1].rate).total_cmp(&(b[0].rate + b[1].rate)))
        .map(|w| Action::Merge { segments: [w[0].number, w[1].number] })
}

/// Runs forever: every `interval`, while `active()`, applies the scaling policies.
pub async fn run(url: String, interval: Duration, cooldown: Duration, active: impl Fn() -> bool) {
    let client = crate::retention::connect_service(&url, "auto-scaler", interval).await;
    loop {
        tokio::time::sleep(interval).await;
        if !active() {
            continue;
        }
        if let Err(e) = round(&client, cooldown).await {
            tracing::warn!(error = %e, "auto-scaling round failed; trying again next interval");
        }
    }
}

async fn round(c: &Client, cooldown: Duration) -> Result<(), ClientError> {
    let now_ms = sluice_meta::controller::now_ms();
    for scope in c.list_scopes().await? {
        // The listing carries each stream's policy: only those with an automatic one, and
        // not sealed, cost requests.
        for entry in c.list_stream_entries(&scope).await? {
            let stream = entry.name;
            if stream.starts_with('_')
                || entry.creating
                || entry.sealed
                || entry.unreadable
                || limits(entry.scaling).is_none()
            {
                continue; // reader-group and synchronizer state; nothing to scale
            }
            if let Err(e) = one_stream(c, &scope, &stream, now_ms, cooldown).await {
                tracing::debug!(%scope, %stream, error = %e, "auto-scaling skipped a stream this round");
            }
        }
    }
    Ok(())
}

async fn one_stream(c: &Client, scope: &str, stream: &str, now_ms: u64, cooldown: Duration) -> Result<(), ClientError> {
    let info = c.get_stream(scope, stream).await?;
    let Some(_) = limits(info.scaling).filter(|_| !info.sealed) else { return Ok(()) };
    let current = c.stream_history_page(scope, stream, info.epoch, 1).await?;
    let last = current.epochs.last().map_or(0, |e| e.created_unix_ms);
    if now_ms.saturating_sub(last) < cooldown.as_millis() as u64 {
        return Ok(());
    }
    let bytes = matches!(info.scaling, ScalingPolicy::ByByteRate { .. });
    let s = sluice_net::ScopedStream::new(scope, stream);
    let mut loads = Vec::with_capacity(info.segments.len());
    for seg in &info.segments {
        let r = c.segment_info(&s.segment_name(SegmentNumber(seg.number))).await?.rates;
        loads.push(SegmentLoad {
            number: seg.number,
            rate: if bytes { r.bytes_per_s } else { r.events_per_s },
            rate_long: if bytes { r.bytes_per_s_long } else { r.events_per_s_long },
            settled: r.measured_ms >= r.window_ms,
        });
    }
    match decide(info.scaling, &loads) {
        Some(Action::Split { segment, parts }) => {
            let after = c.split_segment(scope, stream, segment, parts).await?;
            tracing::info!(%scope, %stream, segment, parts, epoch = after.epoch, "auto-scaling split a hot segment");
        }
        Some(Action::Merge { segments }) => {
            let after = c.merge_segments(scope, stream, &segments).await?;
            tracing::info!(%scope, %stream, ?segments, epoch = after.epoch, "auto-scaling merged cold segments");
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(number: u64, rate: f64) -> SegmentLoad {
        SegmentLoad { number, rate, rate_long: rate, settled: true }
    }

    #[test]
    fn splits_the_hottest_merges_the_coolest_pair_and_keeps_the_minimum() {
        let p = ScalingPolicy::ByEventRate { events_per_s: 100, factor: 4, min_segments: 2 };
        assert_eq!(decide(ScalingPolicy::Fixed { segments: 2 }, &[load(0, 1e9)]), None);
        // 250/s over a 100/s target: three parts; 1000/s: capped at the factor.
        assert_eq!(decide(p, &[load(0, 10.0), load(1, 250.0)]), Some(Action::Split { segment: 1, parts: 3 }));
        assert_eq!(decide(p, &[load(0, 1000.0), load(1, 250.0)]), Some(Action::Split { segment: 0, parts: 4 }));
        // Cold neighbours merge (the coolest pair), but not below the minimum.
        let three = [load(0, 10.0), load(1, 5.0), load(2, 1.0)];
        assert_eq!(decide(p, &three), Some(Action::Merge { segments: [1, 2] }));
        assert_eq!(decide(p, &three[..2]), None);
        // Not while the long average is still high, or before a window has been watched.
        let warm = [load(0, 1.0), SegmentLoad { rate_long: 80.0, ..load(1, 1.0) }, load(2, 60.0)];
        assert_eq!(decide(p, &warm), None);
        let fresh = [load(0, 1.0), SegmentLoad { settled: false, ..load(1, 1.0) }, load(2, 60.0)];
        assert_eq!(decide(p, &fresh), None);
        // Bytes: the target is in KiB/s.
        let b = ScalingPolicy::ByByteRate { kib_per_s: 1, factor: 2, min_segments: 1 };
        assert_eq!(decide(b, &[load(0, 2048.0)]), Some(Action::Split { segment: 0, parts: 2 }));
    }
}
