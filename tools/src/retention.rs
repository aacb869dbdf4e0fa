//! The retention service: applies each stream's retention policy. It runs once per cluster
//! (in `sluice standalone`, next to the node) and works through the client API like any
//! other user: when it looks at a stream with a policy (see "Pace" below) it records a
//! *mark* (the tail stream cut, which lies on event boundaries, the time (`now_ms`: the wall
//! clock read at start, then the monotonic clock) and the stream's total bytes written),
//! and once a stream holds more than the policy's MAX it truncates the stream at the newest
//! mark that still leaves at least MIN. The engine then frees the log space and deletes the
//! tier-2 chunks below the new start offsets.
//!
//! A scaled stream counts the bytes of every segment it ever had, and a truncation at a mark
//! also empties the sealed segments wholly before it. Reader groups that subscribe to the
//! stream bound truncation: the service truncates at the newest mark that is before every
//! subscriber's last checkpoint cut, and not at all while a subscriber has none.
//!
//! Marks are kept in a state synchronizer (the stream `_system/_retention`), so a restart or
//! a new controller goes on from them: before, marks lived in memory, and after a restart a
//! size policy truncated nothing until MIN more bytes had come, a time policy nothing until
//! MAX had passed again (twice the data on disk). A mark is taken only once the stream moved
//! a 128th of its policy's MAX (in bytes or time) past the previous one, which bounds a
//! stream's marks to about 128 and truncations to that granularity.
//!
//! The service also compacts the state of reader groups whose readers are not running (their
//! state segment's start has not moved since its previous round): running readers compact
//! it themselves, but an idle group's snapshot would otherwise stay where it was written
//! and, without tier-2, keep every log file from there on.
//!
//! Pace: the interval is how often every stream with a policy is looked at (and idle groups'
//! state compacted), unless a look would find nothing new (below). Streams are listed with
//! their policies: one without a policy costs no look, and one listed with another policy
//! than its last look found is looked at at once (a policy changed). A stream with a
//! policy is looked at again sooner when it needs it: a size
//! policy's stream once it will have written about a 64th of its MAX (or half its MAX − MIN,
//! if less) at the rate it wrote since the previous look, a time policy's once a 128th of its
//! MAX has passed; never more often than every 100 ms (or every interval, if that is
//! shorter). A size policy's stream that wrote nothing since its previous look is looked at
//! again after twice the time since it (up to the interval), so one that pauses between
//! bursts, or starts writing a moment after it was created, is soon looked at again. The
//! names are listed every second, so a new stream is looked at within a second; and with
//! them the length of every open segment, one request per shard (`ListSegmentLengths`), so
//! a size policy's stream whose open segments grew by its share since its last look (one
//! that was slow or idle then, and whose next look was up to an interval away) is looked at
//! within a second too, at no cost per stream (`wake_grown`); while a due look at a size
//! policy's stream that had nothing to cut and has not written since (by a read of the
//! lengths made after that look) is put off, full rounds included, so an idle stream under
//! an unchanged size policy costs no look at all (`put_off_unchanged`). With one
//! look per interval, a stream writing 1 GB/s outgrew a size policy by 30 GB at the default
//! 30 s; now by about 100 ms of writes. Its marks (the points it can be cut at) are taken at
//! looks, so they are that much closer together too: closer than MAX − MIN while the stream
//! writes at a steady rate, so that a mark always leaves between MIN and MAX (with marks
//! further apart, the newest one that leaves MIN can leave more than MAX, and the stream
//! stays above MAX until it writes again). A slow or idle stream that starts writing fast
//! outgrows its MAX by about a second of its writes once (by up to an interval's, 30 s by
//! default, before the lengths were read, or while they cannot be: a node down).
//! Nor are marks closer than MAX − MIN when a stream writes in bursts of about MAX − MIN or
//! more with pauses between them (a look in a pause sees nothing new, so marks come at most
//! one a burst, or one per 100 ms within one): a stream that stops after such bursts can stay
//! a little above MAX until it writes again (a test saw 2,100,224 bytes under `size:1M,2M`
//! with bursts of 1 MiB); a policy whose MAX − MIN is gigabytes needs bursts that large.

use rkyv::{Archive, Deserialize, Serialize};
use sluice_client::group::GROUP_STATE_PREFIX;
use sluice_client::sync::archive;
use sluice_client::{Client, ClientConfig, ClientError, StateSynchronizer, StreamCut, Synchronized};
use sluice_net::{ErrorCode, ListedStream, Retention, ScopedStream, SegmentNumber};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Where the marks are kept.
const MARKS_SCOPE: &str = "_system";
const MARKS_STREAM: &str = "_retention";
/// Marks per policy span (see the module doc).
const MARKS_PER_SPAN: u64 = 128;
/// Least time between two looks at a stream (unless the interval is shorter).
const LOOK_MIN: Duration = Duration::from_millis(100);
/// How often the names are listed (a new stream is looked at once listed), and the open
/// segments' lengths read (a stream that grew is looked at once read).
const LIST_EVERY: Duration = Duration::from_secs(1);
/// How long after a failed read of the lengths the next is tried.
const LENGTHS_RETRY: Duration = Duration::from_secs(30);
/// A size policy's stream is looked at again once it has written about this share of its
/// MAX (at the rate it was last seen writing), so it outgrows MAX by about that much; or
/// half its MAX − MIN if that is less, so that its marks (taken at looks) are closer
/// together than MAX − MIN and one of them always leaves between MIN and MAX.
const SIZE_LOOK_SHARE: u64 = 64;

/// Unix milliseconds for marks (they outlive the process): the wall clock read once, at the
/// first call, and advanced by the monotonic clock from then on. A step of the system clock
/// while the service runs (an NTP correction, a restored VM) does not move it: read afresh
/// each time, a forward step of more than a time policy's MIN aged every mark at once, and
/// the next look truncated the stream at its newest mark (all but the last moments of its
/// data); a backward step stopped marks and truncations for as long as the step. Across a
/// restart the wall clock is read again (marks from before it keep their times).
fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let &(wall, at) = ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        (wall as u64, Instant::now())
    });
    anchored_ms(wall, at, Instant::now())
}

/// `wall` (Unix ms at the monotonic instant `at`) advanced to `now`.
fn anchored_ms(wall: u64, at: Instant, now: Instant) -> u64 {
    wall.saturating_add(now.saturating_duration_since(at).as_millis() as u64)
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Mark {
    /// When it was taken (Unix ms).
    at_ms: u64,
    /// Bytes ever written to the stream when the mark was taken.
    total: u64,
    /// The tail cut then: (segment number, offset).
    positions: Vec<(u64, u64)>,
}

impl Mark {
    fn cut(&self, stream: &ScopedStream) -> StreamCut {
        StreamCut { stream: stream.clone(), positions: self.positions.iter().copied().collect() }
    }
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Tracked {
    marks: VecDeque<Mark>,
    /// When the data at the stream's head was written (as far as the service knows; Unix ms).
    head_at_ms: u64,
}

/// Every tracked stream's marks, as kept in `_system/_retention`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SavedMarks {
    streams: BTreeMap<String, Tracked>,
}

/// A change to the kept marks; the service writes one pass's changes together.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum MarksUpdate {
    /// A stream is tracked from now (its head written at `head_at_ms`).
    Track {
        stream: String,
        head_at_ms: u64,
    },
    Mark {
        stream: String,
        mark: Mark,
    },
    /// The stream was truncated at its mark `index` (that and the older ones go).
    Truncated {
        stream: String,
        index: u32,
        head_at_ms: u64,
    },
    /// No longer tracked (deleted, or its policy removed).
    Forget {
        stream: String,
    },
}

impl Synchronized for SavedMarks {
    type Update = MarksUpdate;

    fn encode(&self) -> Vec<u8> {
        archive(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes).map_err(|e| e.to_string())
    }
    fn encode_update(update: &MarksUpdate) -> Vec<u8> {
        archive(update)
    }
    fn decode_update(bytes: &[u8]) -> Result<MarksUpdate, String> {
        rkyv::from_bytes::<MarksUpdate, rkyv::rancor::Error>(bytes).map_err(|e| e.to_string())
    }
    fn apply(&mut self, u: &MarksUpdate) {
        apply_update(&mut self.streams, u);
    }
}

/// Applies `u` to the tracked streams (the service's own view and the kept one alike).
fn apply_update(streams: &mut BTreeMap<String, Tracked>, u: &MarksUpdate) {
    match u {
        MarksUpdate::Track { stream, head_at_ms } => {
            streams.insert(stream.clone(), Tracked { marks: VecDeque::new(), head_at_ms: *head_at_ms });
        }
        MarksUpdate::Mark { stream, mark } => {
            if let Some(t) = streams.get_mut(stream) {
                t.marks.push_back(mark.clone());
            }
        }
        MarksUpdate::Truncated { stream, index, head_at_ms } => {
            if let Some(t) = streams.get_mut(stream) {
                let n = (*index as usize + 1).min(t.marks.len());
                t.marks.drain(..n);
                t.head_at_ms = *head_at_ms;
            }
        }
        MarksUpdate::Forget { stream } => {
            streams.remove(stream);
        }
    }
}

/// The kept marks, opened: `None` if none were ever kept and `create` is false (an unused
/// stream would keep its shard's first log file for good without tier-2).
async fn open_marks(c: &Client, create: bool) -> Result<Option<StateSynchronizer<SavedMarks>>, ClientError> {
    if !create {
        match c.get_stream(MARKS_SCOPE, MARKS_STREAM).await {
            Ok(_) => {}
            Err(e) if matches!(e.code(), Some(ErrorCode::NoSuchStream | ErrorCode::NoSuchScope)) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    match c.create_reserved_scope(MARKS_SCOPE).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => {}
        Err(e) => return Err(e),
    }
    let mut sync = c.state_synchronizer::<SavedMarks>(MARKS_SCOPE, MARKS_STREAM).await?;
    sync.initialize(SavedMarks::default()).await?;
    sync.fetch_updates().await?;
    Ok(Some(sync))
}

/// Keeps one round's changes (opening the kept marks on first need) and compacts them once
/// their snapshot is `every` old (each round): their stream's start moves with the log, so
/// without tier-2 it never holds more than a round's log files.
async fn keep(
    c: &Client,
    kept: &mut Option<StateSynchronizer<SavedMarks>>,
    changes: Vec<MarksUpdate>,
    every: Duration,
) -> Result<(), ClientError> {
    if kept.is_none() && !changes.is_empty() {
        *kept = open_marks(c, true).await?;
    }
    let Some(sync) = kept.as_mut() else { return Ok(()) };
    if !changes.is_empty() {
        sync.update_state(|_| changes.clone()).await?;
    }
    if sync.compaction_due(every, 1 << 20) {
        sync.compact_when(every, 1 << 20).await?;
    }
    Ok(())
}

/// When a stream is looked at next, and what its last look found.
#[derive(Clone, Copy, Debug)]
struct Pace {
    next: Instant,
    /// `None` for a stream without a policy.
    seen: Option<Seen>,
}

/// What a look at a stream with a policy found, and when it began.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Seen {
    at: Instant,
    found: Found,
}

/// What a look at a stream with a policy found.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Found {
    policy: Retention,
    /// Bytes ever written to the stream.
    total: u64,
    /// Bytes in its open segments (the lengths the shards report between looks).
    open: u64,
    /// Nothing to cut: a size policy's stream that held no more than its MAX.
    settled: bool,
}

/// The open segments' lengths summed per stream (`scope/stream`), as read at `read_at`.
struct OpenLengths {
    read_at: Instant,
    by_stream: HashMap<String, u64>,
}

impl OpenLengths {
    /// Sums `lengths` (segment name, length) per stream. A transaction's shadow segment
    /// (`N#txn.<id>`) is not the stream's yet.
    fn new(read_at: Instant, lengths: &[(String, u64)]) -> Self {
        let mut by_stream: HashMap<String, u64> = HashMap::new();
        for (name, len) in lengths {
            if let Some((stream, _)) = sluice_net::split_segment_name(name) {
                *by_stream.entry(stream.to_string()).or_default() += len;
            }
        }
        Self { read_at, by_stream }
    }

    fn of(&self, stream: &str) -> u64 {
        self.by_stream.get(stream).copied().unwrap_or(0)
    }
}

/// Bytes a size policy's stream may write between two looks (see `SIZE_LOOK_SHARE`).
fn size_share(min_bytes: u64, max_bytes: u64) -> u64 {
    (max_bytes / SIZE_LOOK_SHARE).min(max_bytes.saturating_sub(min_bytes) / 2).max(1)
}

/// How long until a stream with `policy` is looked at again: `since` is what it wrote since
/// the previous look and how long ago that was (`None` if it was not looked at before).
/// Between `floor` and `interval`.
fn look_after(policy: Retention, since: Option<(u64, Duration)>, floor: Duration, interval: Duration) -> Duration {
    let after = match policy {
        Retention::None => interval,
        // A first look measures nothing yet: the next one, soon, gives the rate.
        Retention::Size { min_bytes, max_bytes } => match since {
            None => floor,
            Some((written, gap)) if written > 0 => {
                let share = size_share(min_bytes, max_bytes);
                let rate = written as f64 / gap.as_secs_f64().max(1e-3);
                Duration::from_secs_f64((share as f64 / rate).min(1e9))
            }
            // Idle: twice the previous gap, so a stream that pauses between bursts (or
            // was created a moment before its writes begin) is looked at again soon, and
            // an idle one is looked at once an interval within a few.
            Some((_, gap)) => gap.saturating_mul(2),
        },
        Retention::Time { max_ms, .. } => Duration::from_millis(max_ms / MARKS_PER_SPAN),
    };
    after.clamp(floor, interval.max(floor))
}

/// Runs forever: connects (retrying), then applies retention while `active()` says this
/// process runs the cluster's duties (always in standalone; on the elected controller in a
/// cluster): every stream every `interval`, a fast one sooner (see the module doc). A
/// controller that takes over loads the kept marks.
pub async fn run(url: String, interval: Duration, active: impl Fn() -> bool) {
    let client = connect_service(&url, "retention service", interval).await;
    let tick = interval.min(LOOK_MIN);
    let mut streams: BTreeMap<String, Tracked> = BTreeMap::new();
    let mut groups: HashMap<String, u64> = HashMap::new();
    let mut paces: HashMap<String, Pace> = HashMap::new();
    let mut kept: Option<StateSynchronizer<SavedMarks>> = None;
    // Whether the kept marks were loaded since this process became active.
    let mut loaded = false;
    // When every stream was last looked at (none yet: the first round looks at all).
    let mut last_full: Option<Instant> = None;
    // The streams (with their policies) as last listed, and when.
    let mut names = Listing::default();
    let mut last_list: Option<Instant> = None;
    // When the lengths last could not be read, and the last ones read.
    let mut lengths_failed: Option<Instant> = None;
    let mut open: Option<OpenLengths> = None;
    loop {
        tokio::time::sleep(tick).await;
        if !active() {
            streams.clear();
            groups.clear();
            paces.clear();
            names = Listing::default();
            (kept, loaded, last_full, last_list, lengths_failed, open) = (None, false, None, None, None, None);
            continue;
        }
        if !loaded {
            match open_marks(&client, false).await {
                Ok(sync) => {
                    streams = sync.as_ref().and_then(|s| s.state()).map(|s| s.streams.clone()).unwrap_or_default();
                    tracing::debug!(streams = streams.len(), "retention marks loaded");
                    (kept, loaded) = (sync, true);
                }
                // Retention goes on with the marks in memory; loading is tried again next
                // round (replacing them), and nothing is kept until it succeeds.
                Err(e) => tracing::warn!(error = %e, "retention marks cannot be loaded; trying again next round"),
            }
        }
        let started = Instant::now();
        // Every stream, and the idle groups, once an interval (less half a tick, so that the
        // ticks' drift does not make it an interval and a tick).
        let full = last_full.is_none_or(|t| started.duration_since(t) + tick / 2 >= interval);
        if full {
            last_full = Some(started);
        }
        // The names once a second (and in a full round); the rounds between look only at
        // the fast streams whose time came.
        let sweep = full || last_list.is_none_or(|t| started.duration_since(t) + tick / 2 >= LIST_EVERY);
        if sweep {
            match list_names(&client).await {
                Ok(n) => (names, last_list) = (n, Some(started)),
                Err(e) => {
                    tracing::warn!(error = %e, "retention cannot list the streams; trying again next round");
                    continue;
                }
            }
            // With the names, the open segments' lengths: a slow stream that turned fast is
            // looked at now (see `wake_grown`). After a failure (a node down: a silent one
            // takes the connect timeout) not again for a while, so the looks are not held up.
            if lengths_failed.is_none_or(|t| started.duration_since(t) >= LENGTHS_RETRY) {
                match client.open_segment_lengths().await {
                    Ok(lengths) => {
                        lengths_failed = None;
                        let read = open.insert(OpenLengths::new(started, &lengths));
                        let woken = wake_grown(&mut paces, read, Instant::now());
                        if woken > 0 {
                            tracing::debug!(woken, "retention looks at streams that grew since their last look");
                        }
                    }
                    Err(e) => {
                        lengths_failed = Some(started);
                        tracing::warn!(
                            error = %e,
                            "retention cannot read the segments' lengths (tried again in {LENGTHS_RETRY:?}): a slow \
                             stream that turns fast waits for its next look meanwhile (up to an interval)"
                        );
                    }
                }
            }
        }
        let mut changes = Vec::new();
        // Every listed stream just after a listing; between listings only those whose time
        // came (most ticks: none), so a tick costs nothing per stream.
        let over = if sweep { None } else { Some(names.due(&paces, Instant::now())) };
        let fresh = open.as_ref().filter(|o| started.duration_since(o.read_at) <= 2 * LIST_EVERY);
        let pace = Pacing { paces: &mut paces, full, floor: tick, interval, open: fresh };
        let looked = round(&client, &names, over.as_deref(), &mut streams, &mut groups, pace, &mut changes).await;
        if looked > 0 {
            tracing::debug!(took = ?started.elapsed(), streams = streams.len(), looked, full, "retention round");
        }
        if loaded && let Err(e) = keep(&client, &mut kept, changes, interval).await {
            // Loaded again next round: this round's changes are not kept.
            tracing::warn!(error = %e, "retention marks not kept this round");
            (kept, loaded) = (None, false);
        }
    }
}

/// Which streams a round looks at: all (`full`), or the new ones and those whose time came.
struct Pacing<'a> {
    paces: &'a mut HashMap<String, Pace>,
    full: bool,
    floor: Duration,
    interval: Duration,
    /// The open segments' lengths, if read in the last two seconds.
    open: Option<&'a OpenLengths>,
}

impl Pacing<'_> {
    /// Whether `stream`, listed with policy `listed`, is to be looked at: in a full round, if
    /// its time came, or if its policy is not the one its last look found (a policy changed
    /// is applied at once).
    fn due(&self, stream: &str, now: Instant, listed: Retention) -> bool {
        self.full
            || self.paces.get(stream).is_none_or(|p| p.next <= now || p.seen.is_some_and(|s| s.found.policy != listed))
    }

    /// Whether the look due at `stream` (listed with policy `listed`) at `now` can be left
    /// out, and if so puts it off: a size policy's stream that had nothing to cut at its
    /// last look, whose policy is still the one that look found, and whose open segments had
    /// the same length in a read of the lengths made since: there is nothing to mark or cut
    /// (a stream that writes again is woken by `wake_grown`). Its next look is then as far
    /// again as the last one is behind. In full rounds too, so an idle stream costs no look.
    fn put_off_unchanged(&mut self, stream: &str, now: Instant, listed: Retention) -> bool {
        let Some(open) = self.open else { return false };
        let Some(p) = self.paces.get_mut(stream) else { return false };
        let Some(Seen { at, found }) = p.seen else { return false };
        let unchanged = matches!(found.policy, Retention::Size { .. })
            && found.policy == listed
            && found.settled
            && open.read_at > at
            && open.of(stream) == found.open;
        if unchanged {
            p.next = now + now.duration_since(at).clamp(self.floor, self.interval);
        }
        unchanged
    }

    /// Sets when `stream` is looked at next, after a look at `now` that found `checked`.
    fn looked(&mut self, stream: &str, now: Instant, checked: Option<Found>) {
        let before = self.paces.get(stream).and_then(|p| p.seen);
        let pace = match checked {
            None => Pace { next: now + self.interval, seen: None },
            Some(found) => {
                let since = before.map(|b| (found.total.saturating_sub(b.found.total), now.duration_since(b.at)));
                let next = now + look_after(found.policy, since, self.floor, self.interval);
                Pace { next, seen: Some(Seen { at: now, found }) }
            }
        };
        self.paces.insert(stream.to_string(), pace);
    }

    /// A look at `stream` failed at `now`: the next is in a few ticks (its rate as it was).
    fn failed(&mut self, stream: &str, now: Instant) {
        let next = now + (self.floor * 5).min(self.interval);
        let seen = self.paces.get(stream).and_then(|p| p.seen);
        self.paces.insert(stream.to_string(), Pace { next, seen });
    }
}

/// Makes due now every size policy's stream whose open segments grew by its share (a 64th
/// of its MAX, or half its MAX − MIN) since its last look, by the shards' lengths of every
/// open segment (`Client::open_segment_lengths`, summed per stream). So a stream that was
/// slow or idle when it was last looked at (its next look up to an interval away) and has
/// started writing fast is looked at within a second, whatever the number of streams: a
/// request per shard a second instead of a look per stream. Returns how many it made due.
fn wake_grown(paces: &mut HashMap<String, Pace>, open: &OpenLengths, now: Instant) -> usize {
    let mut woken = 0;
    for (stream, pace) in paces.iter_mut() {
        let Some(Seen { found: Found { policy: Retention::Size { min_bytes, max_bytes }, open: was, .. }, .. }) =
            pace.seen
        else {
            continue;
        };
        if pace.next > now && open.of(stream).saturating_sub(was) >= size_share(min_bytes, max_bytes) {
            pace.next = now;
            woken += 1;
        }
    }
    woken
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

/// The streams as last listed, each with its policies, in name order.
#[derive(Default)]
struct Listing {
    streams: Vec<Listed>,
    /// Index in `streams` by `scope/stream`.
    by_key: HashMap<String, usize>,
}

struct Listed {
    /// `scope/stream`.
    key: String,
    stream: ScopedStream,
    entry: ListedStream,
}

impl Listing {
    /// The indices (in name order) of the listed streams whose next look is due at `now`.
    fn due(&self, paces: &HashMap<String, Pace>, now: Instant) -> Vec<usize> {
        let mut due: Vec<usize> =
            paces.iter().filter(|(_, p)| p.next <= now).filter_map(|(k, _)| self.by_key.get(k).copied()).collect();
        due.sort_unstable();
        due
    }
}

/// Every scope's streams, each with its policies.
async fn list_names(c: &Client) -> Result<Listing, ClientError> {
    let mut listing = Listing::default();
    for scope in c.list_scopes().await? {
        for entry in c.list_stream_entries(&scope).await? {
            let stream = ScopedStream::new(scope.clone(), entry.name.clone());
            let key = stream.to_string();
            listing.by_key.insert(key.clone(), listing.streams.len());
            listing.streams.push(Listed { key, stream, entry });
        }
    }
    Ok(listing)
}

/// One round over the streams as last listed (`names`), or only those at the indices `over`:
/// looks at those due (all in a full
/// round, which also compacts idle groups' state), forgets the marks of streams gone or
/// without a policy. Returns how many streams it looked at (a stream that cannot be looked
/// at keeps its marks and is tried again soon).
async fn round(
    c: &Client,
    names: &Listing,
    over: Option<&[usize]>,
    streams: &mut BTreeMap<String, Tracked>,
    groups: &mut HashMap<String, u64>,
    mut pace: Pacing<'_>,
    changes: &mut Vec<MarksUpdate>,
) -> usize {
    // Streams whose marks are kept (on a pass over every listed stream: the others'
    // marks are forgotten).
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut looked = 0;
    let picked: Box<dyn Iterator<Item = &Listed>> = match over {
        None => Box::new(names.streams.iter()),
        Some(over) => Box::new(over.iter().map(|&i| &names.streams[i])),
    };
    for Listed { key, stream, entry } in picked {
        let key = key.as_str();
        if let Some(group) = stream.stream.strip_prefix(GROUP_STATE_PREFIX) {
            // Kept in view every round: its start is compared from one full round to the next.
            seen.insert(key);
            let compacted = if pace.full { compact_idle_group(c, stream, group, groups).await } else { Ok(()) };
            match compacted {
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
        if entry.retention == Retention::None && !entry.unreadable {
            // No policy (as listed a moment ago): nothing to look at; its marks, if it had
            // a policy before, are forgotten, and a policy set later makes it due at once.
            pace.paces.remove(key);
            continue;
        }
        let now = Instant::now();
        // A stream still being created, or whose record cannot be read (its policy is not
        // known: its marks are kept), is not looked at.
        let skip = entry.creating || entry.unreadable;
        if skip || !pace.due(key, now, entry.retention) || pace.put_off_unchanged(key, now, entry.retention) {
            // Not looked at this round: its marks stay as they are.
            if streams.contains_key(key) {
                seen.insert(key);
            }
            continue;
        }
        looked += 1;
        match apply(c, stream, streams, changes).await {
            Ok(checked) => {
                if checked.is_some() {
                    seen.insert(key);
                }
                pace.looked(key, now, checked);
            }
            Err(e) => {
                // Keep its marks: the stream is only unavailable for now.
                tracing::warn!(stream = %stream, error = %e, "retention skipped a stream this round");
                pace.failed(key, now);
                seen.insert(key);
            }
        }
    }
    if over.is_none() {
        for stream in streams.keys().filter(|k| !seen.contains(k.as_str())) {
            changes.push(MarksUpdate::Forget { stream: stream.clone() });
        }
        streams.retain(|k, _| seen.contains(k.as_str()));
        groups.retain(|k, _| seen.contains(k.as_str()));
        pace.paces.retain(|k, _| names.by_key.contains_key(k));
    }
    looked
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
    match c.compact_reader_group_state(&stream.scope, group).await {
        Ok(()) => {}
        Err(ClientError::NoSuchGroup(_)) => return Ok(()),
        Err(e) => return Err(e),
    }
    groups.remove(&key);
    tracing::debug!(group = %format!("{}/{group}", stream.scope), "compacted an idle reader group's state");
    Ok(())
}

/// Marks and, when due, truncates one stream; returns its policy, the bytes it ever had
/// written and those in its open segments, or `None` if it has no policy (or is gone).
async fn apply(
    c: &Client,
    stream: &ScopedStream,
    streams: &mut BTreeMap<String, Tracked>,
    changes: &mut Vec<MarksUpdate>,
) -> Result<Option<Found>, ClientError> {
    let info = match c.get_stream(&stream.scope, &stream.stream).await {
        Ok(i) => i,
        Err(e) if matches!(e.code(), Some(ErrorCode::NoSuchStream)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if info.retention == Retention::None {
        return Ok(None);
    }
    let key = stream.to_string();
    let now = now_ms();
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
    let settled = match info.retention {
        Retention::Size { max_bytes, .. } => held <= max_bytes,
        _ => false,
    };
    let checked = Some(Found { policy: info.retention, total, open: positions.values().sum(), settled });
    let update = |streams: &mut BTreeMap<String, Tracked>, changes: &mut Vec<MarksUpdate>, u: MarksUpdate| {
        apply_update(streams, &u);
        changes.push(u);
    };
    // Fewer bytes than at the last mark: the stream was deleted and created again (perhaps
    // while the service was down); its old marks mean nothing now.
    if streams.get(&key).and_then(|t| t.marks.back()).is_some_and(|m| m.total > total) {
        update(streams, changes, MarksUpdate::Forget { stream: key.clone() });
    }
    if !streams.contains_key(&key) {
        update(streams, changes, MarksUpdate::Track { stream: key.clone(), head_at_ms: now });
    }
    // A new mark once the stream moved a 128th of its policy's MAX past the last one.
    let last = streams[&key].marks.back().map(|m| (m.at_ms, m.total));
    let due = match (info.retention, last) {
        (_, None) => true,
        (Retention::Time { max_ms, .. }, Some((at, _))) => now.saturating_sub(at) >= max_ms / MARKS_PER_SPAN,
        (Retention::Size { max_bytes, .. }, Some((_, t))) => {
            total.saturating_sub(t) >= (max_bytes / MARKS_PER_SPAN).max(1)
        }
        (Retention::None, Some(_)) => false,
    };
    if due {
        let mark = Mark { at_ms: now, total, positions: positions.into_iter().collect() };
        update(streams, changes, MarksUpdate::Mark { stream: key.clone(), mark });
    }
    let t = &streams[&key];
    let target = match info.retention {
        Retention::None => None,
        Retention::Time { min_ms, max_ms } => {
            if now.saturating_sub(t.head_at_ms) > max_ms {
                t.marks.iter().rposition(|m| now.saturating_sub(m.at_ms) >= min_ms)
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
    let Some(i) = target else { return Ok(checked) };
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
                return Ok(checked);
            }
        }
    }
    let (cut, at) = if cuts.iter().all(|sub| cut_before(&t.marks[i].cut(stream), sub, &history)) {
        (t.marks[i].cut(stream), Some(i))
    } else {
        // The policy would pass a subscriber: truncate at the slowest subscriber's
        // checkpoint if the policy allows that much, else at the newest mark before all.
        let slowest = cuts.iter().find(|a| cuts.iter().all(|b| cut_before(a, b, &history)));
        match slowest {
            Some(low) if cut_before(low, &t.marks[i].cut(stream), &history) => {
                let older = t.marks.iter().rposition(|m| cut_before(&m.cut(stream), low, &history));
                (low.clone(), older)
            }
            _ => {
                match (0..i).rev().find(|&j| cuts.iter().all(|sub| cut_before(&t.marks[j].cut(stream), sub, &history)))
                {
                    Some(j) => (t.marks[j].cut(stream), Some(j)),
                    None => return Ok(checked),
                }
            }
        }
    };
    c.truncate_stream(&cut).await?;
    tracing::info!(stream = %key, held, policy = %info.retention, subscribers = subs.len(), "retention truncated the stream");
    if let Some(j) = at {
        let head_at_ms = t.marks[j].at_ms;
        update(streams, changes, MarksUpdate::Truncated { stream: key, index: j as u32, head_at_ms });
    }
    Ok(checked)
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
    fn the_marks_clock_moves_with_the_monotonic_clock_from_its_anchor() {
        let at = Instant::now();
        let wall = 1_800_000_000_000;
        assert_eq!(anchored_ms(wall, at, at), wall);
        assert_eq!(anchored_ms(wall, at, at + Duration::from_millis(2_500)), wall + 2_500);
        // An instant before the anchor (never asked for): the anchor's time, not less.
        assert_eq!(anchored_ms(wall, at + Duration::from_secs(1), at), wall);
        // The process's clock: read once, so two readings a moment apart differ by that moment.
        let (a, t) = (now_ms(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b, u) = (now_ms(), Instant::now());
        let elapsed = u.duration_since(t).as_millis() as u64;
        assert!(b >= a + 19 && b <= a + elapsed + 1, "{a} then {b} after {elapsed} ms");
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

    #[test]
    fn streams_whose_open_segments_grew_by_their_share_are_looked_at_now() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        // A 64th of 2 MiB (32 KiB) is less than half of MAX − MIN (512 KiB).
        let size = Retention::parse("size:1M,2M").unwrap();
        let pace = |policy, open| Pace {
            next: later,
            seen: Some(Seen { at: now, found: Found { policy, total: open, open, settled: true } }),
        };
        let mut paces = HashMap::from([
            ("s/grew".to_string(), pace(size, 1000)),
            ("s/little".to_string(), pace(size, 1000)),
            ("s/time".to_string(), pace(Retention::parse("time:1h,2h").unwrap(), 0)),
            ("s/none".to_string(), Pace { next: later, seen: None }),
        ]);
        let lengths: Vec<(String, u64)> = [
            // 32 KiB more over two segments; a transaction's shadow segment does not count.
            ("s/grew/0", 1000 + (20 << 10)),
            ("s/grew/3", 12 << 10),
            ("s/little/0#txn.00000000000000000000000000000001", 1 << 30),
            ("s/little/1", 1000 + (32 << 10) - 1),
            ("s/time/0", 1 << 30),
            ("s/none/0", 1 << 30),
            ("other/9", 1 << 30),
        ]
        .map(|(n, l)| (n.to_string(), l))
        .to_vec();
        let open = OpenLengths::new(now, &lengths);
        assert_eq!(
            (open.of("s/grew"), open.of("s/little"), open.of("s/gone")),
            (1000 + (32 << 10), 1000 + (32 << 10) - 1, 0)
        );
        assert_eq!(wake_grown(&mut paces, &open, now), 1);
        assert_eq!(paces["s/grew"].next, now);
        for other in ["s/little", "s/time", "s/none"] {
            assert_eq!(paces[other].next, later, "{other}");
        }
        // Already due: not counted again.
        assert_eq!(wake_grown(&mut paces, &open, now), 0);
    }

    /// A due look at a size policy's stream that had nothing to cut and has not written since
    /// (by lengths read after the look) is put off, in a full round too; not when the lengths
    /// are older than the look, nor for a stream that wrote, held more than MAX, has a time
    /// policy, or is listed with another policy than its look found (which makes it due).
    #[test]
    fn a_due_look_at_an_unchanged_settled_stream_is_put_off() {
        let t0 = Instant::now();
        let (looked, read, now) = (t0, t0 + Duration::from_secs(4), t0 + Duration::from_secs(5));
        let size = Retention::parse("size:1M,2M").unwrap();
        let pace = |policy, open, settled| Pace {
            next: now,
            seen: Some(Seen { at: looked, found: Found { policy, total: open, open, settled } }),
        };
        let lengths: Vec<(String, u64)> = [("s/idle/0", 700), ("s/wrote/0", 701), ("s/over/0", 700), ("s/time/0", 700)]
            .map(|(n, l)| (n.to_string(), l))
            .to_vec();
        let mut paces = HashMap::from([
            ("s/idle".to_string(), pace(size, 700, true)),
            ("s/wrote".to_string(), pace(size, 700, true)),
            ("s/over".to_string(), pace(size, 700, false)),
            ("s/time".to_string(), pace(Retention::parse("time:1h,2h").unwrap(), 700, true)),
        ]);
        let (floor, interval) = (Duration::from_millis(100), Duration::from_secs(30));
        let fresh = OpenLengths::new(read, &lengths);
        let mut pacing = Pacing { paces: &mut paces, full: false, floor, interval, open: Some(&fresh) };
        assert!(pacing.put_off_unchanged("s/idle", now, size));
        for other in ["s/wrote", "s/over", "s/time", "s/unknown"] {
            assert!(!pacing.put_off_unchanged(other, now, size), "{other}");
        }
        // Put off as far again as the last look is behind (5 s).
        assert_eq!(paces["s/idle"].next, now + Duration::from_secs(5));
        assert_eq!(paces["s/wrote"].next, now);
        // Not yet due; a changed policy makes it due, and is not put off.
        let other = Retention::parse("size:1M,3M").unwrap();
        let pacing = Pacing { paces: &mut paces, full: false, floor, interval, open: Some(&fresh) };
        assert!(!pacing.due("s/idle", now, size));
        assert!(pacing.due("s/idle", now, other));
        paces.get_mut("s/idle").unwrap().next = now;
        let mut pacing = Pacing { paces: &mut paces, full: false, floor, interval, open: Some(&fresh) };
        assert!(!pacing.put_off_unchanged("s/idle", now, other));
        // A full round puts it off too (its policy is the listed one).
        let mut full = Pacing { paces: &mut paces, full: true, floor, interval, open: Some(&fresh) };
        assert!(full.due("s/idle", now, size));
        assert!(full.put_off_unchanged("s/idle", now, size));
        // Lengths read before the look say nothing of what came after it.
        paces.get_mut("s/idle").unwrap().next = now;
        let stale = OpenLengths::new(looked - Duration::from_millis(1), &lengths);
        let mut old = Pacing { paces: &mut paces, full: false, floor, interval, open: Some(&stale) };
        assert!(!old.put_off_unchanged("s/idle", now, size));
        let mut none = Pacing { paces: &mut paces, full: false, floor, interval, open: None };
        assert!(!none.put_off_unchanged("s/idle", now, size));
    }

    /// Between listings a tick goes over the listed streams whose look is due, in name
    /// order; a pace of a stream no longer listed is not one of them.
    #[test]
    fn a_tick_between_listings_picks_the_due_streams_in_name_order() {
        let now = Instant::now();
        let mut listing = Listing::default();
        for name in ["a", "b", "c", "d"] {
            let entry = ListedStream {
                name: name.to_string(),
                creating: false,
                sealed: false,
                unreadable: false,
                retention: Retention::parse("size:1M,2M").unwrap(),
                scaling: sluice_net::ScalingPolicy::default(),
            };
            let stream = ScopedStream::new("s", name);
            listing.by_key.insert(stream.to_string(), listing.streams.len());
            listing.streams.push(Listed { key: stream.to_string(), stream, entry });
        }
        let pace = |next| Pace { next, seen: None };
        let later = now + Duration::from_secs(1);
        let paces = HashMap::from([
            ("s/d".to_string(), pace(now)),
            ("s/b".to_string(), pace(now - Duration::from_millis(5))),
            ("s/c".to_string(), pace(later)),
            ("s/gone".to_string(), pace(now)),
        ]);
        assert_eq!(listing.due(&paces, now), [1, 3]);
        assert_eq!(listing.due(&paces, later), [1, 2, 3]);
    }

    #[test]
    fn fast_streams_are_looked_at_sooner_within_the_floor_and_the_interval() {
        let (floor, interval) = (Duration::from_secs(1), Duration::from_secs(30));
        let size = Retention::parse("size:8G,10G").unwrap();
        // Bytes written in the second before.
        let after =
            |p: Retention, rate: Option<u64>| look_after(p, rate.map(|b| (b, Duration::from_secs(1))), floor, interval);
        // First look: soon, for the rate.
        assert_eq!(after(size, None), floor);
        // A 64th of 10 GiB is 160 MiB: at 16 MiB/s, 10 s; at 1 GB/s the floor.
        assert_eq!(after(size, Some(16 << 20)), Duration::from_secs(10));
        assert_eq!(after(size, Some(1_000_000_000)), floor);
        // A narrow window: half of MAX − MIN (512 KiB of 100M,101M) once that is under a
        // 64th of MAX, so that marks fall closer together than the window; 256 KiB/s: 2 s.
        assert_eq!(after(Retention::parse("size:100M,101M").unwrap(), Some(256 << 10)), Duration::from_secs(2));
        assert_eq!(after(Retention::parse("size:100").unwrap(), Some(1)), floor);
        // Slow: once an interval.
        assert_eq!(after(size, Some(1000)), interval);
        // Idle: twice the gap before, up to the interval.
        assert_eq!(after(size, Some(0)), Duration::from_secs(2));
        assert_eq!(look_after(size, Some((0, Duration::from_secs(20))), floor, interval), interval);
        assert_eq!(look_after(size, Some((0, Duration::ZERO)), floor, interval), floor);
        // Time: a 128th of MAX (2 h: 56.25 s, over the interval; 64 s: half a second, under
        // the floor; 10 min: 4.687 s).
        assert_eq!(after(Retention::parse("time:1h,2h").unwrap(), Some(5)), interval);
        assert_eq!(after(Retention::parse("time:32s,64s").unwrap(), None), floor);
        assert_eq!(after(Retention::parse("time:5m,10m").unwrap(), None), Duration::from_millis(4687));
        assert_eq!(after(Retention::None, None), interval);
        // A floor above the interval (the service never passes one) is kept, no panic.
        assert_eq!(look_after(size, None, floor, Duration::from_millis(100)), floor);
    }
}
