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

use sluice_client::{Client, ClientConfig, ClientError, StreamCut};
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

/// Runs forever: connects (retrying), then applies retention every `interval` while
/// `active()` says this process runs the cluster's duties (always in standalone; on the
/// elected controller in a cluster). A controller that takes over starts with fresh marks.
pub async fn run(url: String, interval: Duration, active: impl Fn() -> bool) {
    let client = connect_service(&url, "retention service", interval).await;
    let mut streams: HashMap<String, Tracked> = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        if !active() {
            streams.clear();
            continue;
        }
        if let Err(e) = round(&client, &mut streams).await {
            tracing::warn!(error = %e, "retention round failed; trying again next interval");
        }
    }
}

/// A client for a cluster duty (retention, auto-scaling), connecting until it succeeds.
/// Its calls give up quickly: a stream whose container is unavailable (its node is down)
/// must not hold up the others; it is tried again next round.
pub async fn connect_service(url: &str, service: &str, interval: Duration) -> Client {
    let config = ClientConfig { retry_for: Duration::from_secs(2), ..ClientConfig::default() };
    loop {
        match Client::connect_with(url, config.clone()).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(%url, error = %e, "{service} cannot connect; retrying");
                tokio::time::sleep(interval.min(Duration::from_secs(5))).await;
            }
        }
    }
}

async fn round(c: &Client, streams: &mut HashMap<String, Tracked>) -> Result<(), ClientError> {
    let mut seen = Vec::new();
    for scope in c.list_scopes().await? {
        for name in c.list_streams(&scope).await? {
            let stream = ScopedStream::new(scope.clone(), name.clone());
            match apply(c, &stream, streams).await {
                Ok(true) => seen.push(stream.to_string()),
                Ok(false) => {}
                Err(e) => {
                    // Keep its marks: the stream is only unavailable for now.
                    seen.push(stream.to_string());
                    tracing::warn!(stream = %stream, error = %e, "retention skipped a stream this round");
                }
            }
        }
    }
    streams.retain(|k, _| seen.contains(k));
    Ok(())
}

/// Marks and, when due, truncates one stream; false if it has no policy (or is gone).
async fn apply(c: &Client, stream: &ScopedStream, streams: &mut HashMap<String, Tracked>) -> Result<bool, ClientError> {
    let info = match c.get_stream(&stream.scope, &stream.stream).await {
        Ok(i) => i,
        Err(e) if matches!(e.code(), Some(ErrorCode::NoSuchStream)) => return Ok(false),
        Err(e) => return Err(e),
    };
    if info.retention == Retention::None {
        return Ok(false);
    }
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
    Ok(true)
}
