//! The retention service: applies each stream's retention policy. It runs once per cluster
//! (in `sluice standalone`, next to the node) and works through the client API like any
//! other user: every interval it records a *mark* per stream with a policy (the tail stream
//! cut, which lies on event boundaries, the time and the stream's total bytes written), and
//! once a stream holds more than the policy's MAX it truncates the stream at the newest mark
//! that still leaves at least MIN. The engine then frees the log space and deletes the tier-2
//! chunks below the new start offsets.
//!
//! Marks live in memory: after a restart, time-based retention counts a stream's age from
//! the first mark it takes (data is kept longer, never shorter).

use sluice_client::{Client, ClientError, StreamCut};
use sluice_net::{ErrorCode, Retention, ScopedStream, SegmentNumber};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

struct Mark {
    at: Instant,
    /// Bytes ever written to the stream when the mark was taken.
    total: u64,
    cut: StreamCut,
}

struct Tracked {
    marks: VecDeque<Mark>,
    /// When the data at the stream's head was written (as far as the service knows).
    head_at: Instant,
}

/// Runs forever: connects (retrying), then applies retention every `interval`.
pub async fn run(url: String, interval: Duration) {
    let client = loop {
        match Client::connect(&url).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(%url, error = %e, "retention service cannot connect; retrying");
                tokio::time::sleep(interval.min(Duration::from_secs(5))).await;
            }
        }
    };
    let mut streams: HashMap<String, Tracked> = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = round(&client, &mut streams).await {
            tracing::warn!(error = %e, "retention round failed; trying again next interval");
        }
    }
}

async fn round(c: &Client, streams: &mut HashMap<String, Tracked>) -> Result<(), ClientError> {
    let mut seen = Vec::new();
    for scope in c.list_scopes().await? {
        for name in c.list_streams(&scope).await? {
            let info = match c.get_stream(&scope, &name).await {
                Ok(i) => i,
                Err(e) if matches!(e.code(), Some(ErrorCode::NoSuchStream)) => continue,
                Err(e) => return Err(e),
            };
            if info.retention == Retention::None {
                continue;
            }
            let stream = ScopedStream::new(scope.clone(), name.clone());
            let key = stream.to_string();
            let now = Instant::now();
            let (mut total, mut held) = (0, 0);
            let mut positions = BTreeMap::new();
            for seg in &info.segments {
                let si = c.segment_info(&stream.segment_name(SegmentNumber(seg.number))).await?;
                total += si.length;
                held += si.length - si.start_offset;
                positions.insert(seg.number, si.length);
            }
            seen.push(key.clone());
            let t = streams.entry(key.clone()).or_insert_with(|| Tracked { marks: VecDeque::new(), head_at: now });
            t.marks.push_back(Mark { at: now, total, cut: StreamCut { stream: stream.clone(), positions } });
            let target = match info.retention {
                Retention::None => None,
                Retention::Time { min_ms, max_ms } => {
                    let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
                    if now.duration_since(t.head_at) > max {
                        t.marks.iter().rposition(|m| now.duration_since(m.at) >= min)
                    } else {
                        None
                    }
                }
                Retention::Size { min_bytes, max_bytes } => {
                    if held > max_bytes {
                        t.marks.iter().rposition(|m| total - m.total >= min_bytes)
                    } else {
                        None
                    }
                }
            };
            if let Some(i) = target {
                let mark = &t.marks[i];
                c.truncate_stream(&mark.cut).await?;
                tracing::info!(
                    stream = %key,
                    held,
                    kept = total - mark.total,
                    policy = %info.retention,
                    "retention truncated the stream"
                );
                t.head_at = mark.at;
                t.marks.drain(..=i);
            }
        }
    }
    streams.retain(|k, _| seen.contains(k));
    Ok(())
}
