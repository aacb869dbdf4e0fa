//! The retention service: applies each stream's retention policy. It runs once per cluster
//! (in `sluice standalone`, next to the node) and works through the client API like any
//! other user: every interval it records a *mark* per stream with a policy (the tail stream
//! cut, which lies on event boundaries, the time and the stream's total bytes written), and
//! once a stream holds more than the policy's MAX it truncates the stream at the newest mark
//! that still leaves at least MIN. The engine then frees the log space and deletes the tier-2
//! chunks below the new start offsets.
//!
//! A scaled stream counts the bytes of every segment it ever had, and a truncation at a mark
//! also empties the sealed segments wholly before it. Reader groups that subscribe to the
//! stream bound truncation: the service truncates at the newest mark that is before every
//! subscriber's last checkpoint cut, and not at all while a subscriber has none.
//!
//! Marks live in memory: after a restart, time-based retention counts a stream's age from
//! the first mark it takes (data is kept longer, never shorter).
//!
//! The service also compacts the state of reader groups whose readers are not running (their
//! state segment's start has not moved since its previous round): running readers compact
//! it themselves, but an idle group's snapshot would otherwise stay where it was written
//! and, without tier-2, keep every log file from there on.

use sluice_client::group::GROUP_STATE_PREFIX;
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
    let mut groups: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        if !active() {
            streams.clear();
            groups.clear();
            continue;
        }
        let started = std::time::Instant::now();
        match round(&client, &mut streams, &mut groups).await {
            Ok(()) => tracing::debug!(took = ?started.elapsed(), streams = streams.len(), "retention round"),
            Err(e) => tracing::warn!(error = %e, "retention round failed; trying again next interval"),
        }
    }
}

/// Whether truncating at `mark` keeps everything from `bound` on: each of the mark's
/// segments is at or before its offset in `bound`, or wholly before `bound` (an ancestor
/// of its segments).
pub fn cut_before(mark: &StreamCut, bound: &StreamCut, history: &sluice_net::StreamHistory) -> bool {
    let before = sluice_client::cut::ancestors(history, bound);
    mark.positions.iter().all(|(seg, &off)| bound.positions.get(seg).is_some_and(|&b| off <= b) || before.contains(seg))
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

async fn round(
    c: &Client,
    streams: &mut HashMap<String, Tracked>,
    groups: &mut HashMap<String, u64>,
) -> Result<(), ClientError> {
    let mut seen = std::collections::HashSet::new();
    for scope in c.list_scopes().await? {
        for name in c.list_streams(&scope).await? {
            let stream = ScopedStream::new(scope.clone(), name.clone());
            if let Some(group) = name.strip_prefix(GROUP_STATE_PREFIX) {
                seen.insert(stream.to_string());
                match compact_idle_group(c, &stream, group, groups).await {
                    Ok(()) => {}
                    // A stream of the user's own that only looks like a group's state.
                    Err(e @ ClientError::SyncCorrupt { .. }) => {
                        tracing::debug!(stream = %stream, error = %e, "not a reader group's state")
                    }
                    Err(e) => {
                        tracing::warn!(stream = %stream, error = %e, "the state of an idle reader group was not compacted this round")
                    }
                }
            }
            match apply(c, &stream, streams).await {
                Ok(true) => {
                    seen.insert(stream.to_string());
                }
                Ok(false) => {}
                Err(e) => {
                    // Keep its marks: the stream is only unavailable for now.
                    seen.insert(stream.to_string());
                    tracing::warn!(stream = %stream, error = %e, "retention skipped a stream this round");
                }
            }
        }
    }
    streams.retain(|k, _| seen.contains(k));
    groups.retain(|k, _| seen.contains(k));
    Ok(())
}

/// Compacts a reader group's state if its segment's start has not moved since the previous
/// round (no reader of the group compacted it meanwhile).
async fn compact_idle_group(
    c: &Client,
    stream: &ScopedStream,
    group: &str,
    groups: &mut HashMap<String, u64>,
) -> Result<(), ClientError> {
    let info = match c.get_stream(&stream.scope, &stream.stream).await {
        Ok(i) => i,
        Err(e) if e.code() == Some(ErrorCode::NoSuchStream) => return Ok(()),
        Err(e) => return Err(e),
    };
    let [segment] = info.segments.as_slice() else { return Ok(()) };
    let si = c.segment_info(&stream.segment_name(SegmentNumber(segment.number))).await?;
    let key = stream.to_string();
    if groups.insert(key.clone(), si.start_offset) != Some(si.start_offset) {
        return Ok(());
    }
    match c.reader_group(&stream.scope, group).await {
        Ok(g) => g.compact_state().await?,
        Err(ClientError::NoSuchGroup(_)) => return Ok(()),
        Err(e) => return Err(e),
    }
    groups.remove(&key);
    tracing::debug!(group = %format!("{}/{group}", stream.scope), "compacted an idle reader group's state");
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
    // Bytes written and held count every segment the stream ever had (a scaled stream's
    // sealed segments hold data until a truncation passes them); the mark is the tail.
    let (mut total, mut held) = (0, 0);
    let mut positions = BTreeMap::new();
    let history = c.stream_history(&stream.scope, &stream.stream).await?;
    for seg in &history.segments {
        let si = match c.segment_info(&stream.segment_name(SegmentNumber(seg.number))).await {
            Ok(si) => si,
            Err(e) if e.code() == Some(ErrorCode::NoSuchSegment) && seg.sealed_epoch.is_some() => continue,
            Err(e) => return Err(e),
        };
        total += si.length;
        held += si.length - si.start_offset;
        if info.segments.iter().any(|s| s.number == seg.number) {
            positions.insert(seg.number, si.length);
        }
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
    // Subscribers (consumption-based retention): never past any one's last checkpoint.
    let Some(i) = target else { return Ok(true) };
    let subs = c.list_subscribers(&key).await?;
    let mut cuts = Vec::new();
    for sub in &subs {
        match &sub.positions {
            Some(p) => cuts.push(StreamCut {
                stream: stream.clone(),
                positions: p.iter().map(|x| (x.segment, x.offset)).collect(),
            }),
            None => {
                tracing::debug!(stream = %key, group = %sub.group, "retention waits for a subscriber's first checkpoint");
                return Ok(true);
            }
        }
    }
    let (cut, at) = if cuts.iter().all(|sub| cut_before(&t.marks[i].cut, sub, &history)) {
        (t.marks[i].cut.clone(), Some(i))
    } else {
        // The policy would pass a subscriber: truncate at the slowest subscriber's
        // checkpoint if the policy allows that much, else at the newest mark before all.
        let slowest = cuts.iter().find(|a| cuts.iter().all(|b| cut_before(a, b, &history)));
        match slowest {
            Some(low) if cut_before(low, &t.marks[i].cut, &history) => {
                let older = t.marks.iter().rposition(|m| cut_before(&m.cut, low, &history));
                (low.clone(), older)
            }
            _ => match (0..i).rev().find(|&j| cuts.iter().all(|sub| cut_before(&t.marks[j].cut, sub, &history))) {
                Some(j) => (t.marks[j].cut.clone(), Some(j)),
                None => return Ok(true),
            },
        }
    };
    c.truncate_stream(&cut).await?;
    tracing::info!(stream = %key, held, policy = %info.retention, subscribers = subs.len(), "retention truncated the stream");
    if let Some(j) = at {
        t.head_at = t.marks[j].at;
        t.marks.drain(..=j);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_net::{EpochInfo, SegmentHistory, StreamHistory};

    fn seg(number: u64, low: f64, high: f64, predecessors: Vec<u64>) -> SegmentHistory {
        SegmentHistory { number, key_low: low, key_high: high, created_epoch: 0, sealed_epoch: None, predecessors }
    }

    fn cut(p: &[(u64, u64)]) -> StreamCut {
        StreamCut { stream: ScopedStream::new("s", "t"), positions: p.iter().copied().collect() }
    }

    #[test]
    fn marks_compare_with_subscriber_cuts_across_epochs() {
        // 0, 1; then 0 splits into 2, 3.
        let history = StreamHistory {
            scope: "s".into(),
            stream: "t".into(),
            epochs: vec![EpochInfo { epoch: 0, created_unix_ms: 0, segments: vec![0, 1] }],
            segments: vec![
                seg(0, 0.0, 0.5, vec![]),
                seg(1, 0.5, 1.0, vec![]),
                seg(2, 0.0, 0.25, vec![0]),
                seg(3, 0.25, 0.5, vec![0]),
            ],
            next: None,
        };
        let old = cut(&[(0, 100), (1, 50)]);
        let new = cut(&[(2, 10), (3, 0), (1, 60)]);
        assert!(cut_before(&old, &new, &history));
        assert!(!cut_before(&new, &old, &history));
        assert!(cut_before(&old, &old, &history));
        assert!(!cut_before(&old, &cut(&[(0, 80), (1, 60)]), &history));
        assert_eq!(sluice_client::cut::ancestors(&history, &new), vec![0]);
    }
}
