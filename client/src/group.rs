//! Reader groups: readers that share streams, each segment read by exactly one reader at a
//! time, with checkpoints the group agrees on. The group's state lives in a state
//! synchronizer (stream `<scope>/_rg_<group>`): which reader holds which segment at which
//! offset, unassigned segments, end offsets from end cuts, finished segments, the pending
//! checkpoint and the completed ones. Every change is an update applied by all members in
//! the same order, so they agree without talking to each other.
//!
//! Rules: a reader takes unassigned segments while it holds fewer than its fair share
//! (ceil(segments / readers)) and gives one back while it holds more; nobody takes a
//! segment while a checkpoint is pending, so every segment's position at the checkpoint is
//! known (reported by its reader when it passes the marker, else where it was released or
//! finished). A reader that goes offline returns its segments at the position given (or its
//! last reported one). A segment read to its end (sealed by a scaling) brings in each of its
//! successors once all of the successor's predecessors are finished, so nobody reads a
//! key's newer events before its older ones; a segment that stops at an end cut does not.
//!
//! Each held segment has a task that reads it (a read sent ahead while the last one is cut
//! into events) and hands the reader each read's events in one message; the reader
//! delivers them one by one, dropping those of a segment it no longer holds.

use crate::client::Client;
use crate::cut::{CutAt, StreamCut};
use crate::error::ClientError;
use crate::reader::{Event, EventCutter, READ_CHUNK_BYTES, ReadAhead};
use crate::sync::{StateSynchronizer, Synchronized, archive as encode};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::messages::{AddSubscriber, Done, RemoveSubscriber, SegmentOffset, UpdateSubscriber};
use sluice_net::{ErrorCode, ScopedStream};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Completed checkpoints kept in the state.
const CHECKPOINTS_KEPT: usize = 10;
/// Events `GroupReader::read_next` may hand out before it reads the clock again.
const UNCLOCKED_EVENTS_MAX: u32 = 64;
/// How often a reader reports its positions (when they moved) at the least: each report is
/// a durable write to the group state, and the reader delivers nothing while it waits for
/// it. They serve `rg describe`'s lag and `reader_offline` without positions; checkpoints
/// and releases carry their own.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);
/// How old the group state's snapshot may grow before a reader writes a new one and
/// truncates the state segment before it (see `ReaderGroupConfig::compact_state_every`).
pub const STATE_COMPACT_EVERY: Duration = Duration::from_secs(10);
/// Updates after the snapshot that make a compaction due sooner (a busy group).
const STATE_COMPACT_BYTES: u64 = 1 << 20;

#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PendingCheckpoint {
    pub name: String,
    pub waiting: BTreeSet<String>,
    pub positions: BTreeMap<String, u64>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CompletedCheckpoint {
    pub name: String,
    /// Qualified segment name → offset.
    pub positions: BTreeMap<String, u64>,
}

/// The shared state of a reader group.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GroupState {
    /// Grows on every reset; readers drop what they hold when it changes.
    pub generation: u64,
    /// Reader → (segment → offset of the next event to deliver).
    pub readers: BTreeMap<String, BTreeMap<String, u64>>,
    pub unassigned: BTreeMap<String, u64>,
    /// Segment → offset where reading stops (end cuts).
    pub ends: BTreeMap<String, u64>,
    /// Segments read to their end, and where. A finished segment is forgotten once all of
    /// its successors are in the group (nothing needs it any more), so the map holds the
    /// segments between the newest finished epoch and the ones being read, not the stream's
    /// whole history; one with no successors (its stream's end) or stopped at an end cut
    /// stays.
    pub finished: BTreeMap<String, u64>,
    pub checkpoint: Option<PendingCheckpoint>,
    pub completed: Vec<CompletedCheckpoint>,
    /// Finished segment → its successors not in the group yet (each waits for another of
    /// its predecessors to finish).
    pub awaiting: BTreeMap<String, Vec<String>>,
}

/// The layout of `GroupState` before `awaiting` (snapshots without the version prefix).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
struct GroupStateV1 {
    generation: u64,
    readers: BTreeMap<String, BTreeMap<String, u64>>,
    unassigned: BTreeMap<String, u64>,
    ends: BTreeMap<String, u64>,
    finished: BTreeMap<String, u64>,
    checkpoint: Option<PendingCheckpoint>,
    completed: Vec<CompletedCheckpoint>,
}

impl From<GroupStateV1> for GroupState {
    fn from(v: GroupStateV1) -> Self {
        // Finished segments of an old snapshot have no successor record: they stay.
        let GroupStateV1 { generation, readers, unassigned, ends, finished, checkpoint, completed } = v;
        Self { generation, readers, unassigned, ends, finished, checkpoint, completed, awaiting: BTreeMap::new() }
    }
}

/// Prefix of a versioned `GroupState` snapshot: `RG` and the layout's version.
const STATE_MAGIC_V2: &[u8; 3] = b"RG\x02";

/// A segment that replaced a finished one, and every segment it replaced.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Successor {
    pub segment: String,
    pub predecessors: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum GroupUpdate {
    AddReader { reader: String },
    RemoveReader { reader: String, positions: Option<BTreeMap<String, u64>> },
    Acquire { reader: String, segment: String },
    Release { reader: String, segment: String, offset: u64 },
    Positions { reader: String, positions: BTreeMap<String, u64> },
    Finish { reader: String, segment: String, offset: u64, successors: Vec<Successor> },
    StartCheckpoint { name: String },
    CheckpointReached { reader: String, name: String, positions: BTreeMap<String, u64> },
    Reset { positions: BTreeMap<String, u64>, ends: BTreeMap<String, u64> },
}

impl GroupState {
    fn complete_checkpoint(&mut self) {
        let Some(cp) = self.checkpoint.take() else { return };
        let mut positions: BTreeMap<String, u64> = self.finished.clone();
        positions.extend(self.unassigned.iter().map(|(s, o)| (s.clone(), *o)));
        positions.extend(cp.positions);
        self.completed.push(CompletedCheckpoint { name: cp.name, positions });
        if self.completed.len() > CHECKPOINTS_KEPT {
            self.completed.remove(0);
        }
    }

    /// The segment is in the group (unassigned, held or finished).
    fn knows(&self, segment: &str) -> bool {
        self.unassigned.contains_key(segment)
            || self.finished.contains_key(segment)
            || self.readers.values().any(|h| h.contains_key(segment))
    }

    /// Crosses off the successors now in the group and forgets the finished segments that
    /// have none left to wait for (a successor crossed off stays so: a segment joins the
    /// group once).
    fn forget_finished(&mut self) {
        let mut awaiting = std::mem::take(&mut self.awaiting);
        awaiting.retain(|seg, waiting| {
            waiting.retain(|s| !self.knows(s));
            if waiting.is_empty() {
                self.finished.remove(seg);
            }
            !waiting.is_empty()
        });
        self.awaiting = awaiting;
    }

    /// Segments not yet finished.
    pub fn active_segments(&self) -> usize {
        self.unassigned.len() + self.readers.values().map(BTreeMap::len).sum::<usize>()
    }

    /// The share of segments one reader should hold.
    pub fn fair_share(&self) -> usize {
        self.active_segments().div_ceil(self.readers.len().max(1))
    }
}

impl Synchronized for GroupState {
    type Update = GroupUpdate;

    fn encode(&self) -> Vec<u8> {
        let mut out = STATE_MAGIC_V2.to_vec();
        out.extend_from_slice(&encode(self));
        out
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if let Some(v2) = bytes.strip_prefix(STATE_MAGIC_V2)
            && let Ok(state) = rkyv::from_bytes::<Self, rkyv::rancor::Error>(v2)
        {
            return Ok(state);
        }
        // A snapshot written before states were versioned.
        rkyv::from_bytes::<GroupStateV1, rkyv::rancor::Error>(bytes).map(Self::from).map_err(|e| e.to_string())
    }
    fn encode_update(update: &GroupUpdate) -> Vec<u8> {
        encode(update)
    }
    fn decode_update(bytes: &[u8]) -> Result<GroupUpdate, String> {
        rkyv::from_bytes::<GroupUpdate, rkyv::rancor::Error>(bytes).map_err(|e| e.to_string())
    }

    fn apply(&mut self, u: &GroupUpdate) {
        match u {
            GroupUpdate::AddReader { reader } => {
                self.readers.entry(reader.clone()).or_default();
            }
            GroupUpdate::RemoveReader { reader, positions } => {
                let Some(held) = self.readers.remove(reader) else { return };
                let mut released = BTreeMap::new();
                for (seg, off) in held {
                    let off = positions.as_ref().and_then(|p| p.get(&seg)).copied().unwrap_or(off);
                    released.insert(seg.clone(), off);
                    self.unassigned.insert(seg, off);
                }
                if let Some(cp) = self.checkpoint.as_mut() {
                    if cp.waiting.remove(reader) {
                        cp.positions.extend(released);
                    }
                    if cp.waiting.is_empty() {
                        self.complete_checkpoint();
                    }
                }
            }
            GroupUpdate::Acquire { reader, segment } => {
                if self.checkpoint.is_none()
                    && let (Some(held), Some(off)) =
                        (self.readers.get_mut(reader), self.unassigned.get(segment).copied())
                {
                    self.unassigned.remove(segment);
                    held.insert(segment.clone(), off);
                }
            }
            GroupUpdate::Release { reader, segment, offset } => {
                if self.readers.get_mut(reader).and_then(|h| h.remove(segment)).is_some() {
                    self.unassigned.insert(segment.clone(), *offset);
                }
            }
            GroupUpdate::Positions { reader, positions } => {
                if let Some(held) = self.readers.get_mut(reader) {
                    for (seg, off) in positions {
                        if let Some(o) = held.get_mut(seg) {
                            *o = *off;
                        }
                    }
                }
            }
            GroupUpdate::Finish { reader, segment, offset, successors } => {
                if self.readers.get_mut(reader).and_then(|h| h.remove(segment)).is_some() {
                    self.finished.insert(segment.clone(), *offset);
                    if !self.ends.contains_key(segment) && !successors.is_empty() {
                        for s in successors {
                            if s.predecessors.iter().all(|p| self.finished.contains_key(p)) && !self.knows(&s.segment) {
                                self.unassigned.insert(s.segment.clone(), 0);
                            }
                        }
                        let names = successors.iter().map(|s| s.segment.clone()).collect();
                        self.awaiting.insert(segment.clone(), names);
                        self.forget_finished();
                    }
                }
            }
            GroupUpdate::StartCheckpoint { name } => {
                if self.checkpoint.is_none() {
                    let waiting = self.readers.keys().cloned().collect();
                    self.checkpoint =
                        Some(PendingCheckpoint { name: name.clone(), waiting, positions: BTreeMap::new() });
                    if self.readers.is_empty() {
                        self.complete_checkpoint();
                    }
                }
            }
            GroupUpdate::CheckpointReached { reader, name, positions } => {
                if let Some(cp) = self.checkpoint.as_mut().filter(|cp| &cp.name == name) {
                    if cp.waiting.remove(reader) {
                        cp.positions.extend(positions.iter().map(|(s, o)| (s.clone(), *o)));
                    }
                    if cp.waiting.is_empty() {
                        self.complete_checkpoint();
                    }
                }
            }
            GroupUpdate::Reset { positions, ends } => {
                self.generation += 1;
                for held in self.readers.values_mut() {
                    held.clear();
                }
                self.unassigned = positions.clone();
                self.ends = ends.clone();
                self.finished.clear();
                self.awaiting.clear();
                self.checkpoint = None;
            }
        }
    }
}

/// A stream read by a group, optionally between two cuts.
#[derive(Clone, Debug)]
pub struct GroupStream {
    /// `scope/stream`.
    pub stream: String,
    /// Where reading starts (default: the head).
    pub from: Option<StreamCut>,
    /// Where reading stops (default: never).
    pub to: Option<StreamCut>,
}

#[derive(Clone, Debug)]
pub struct ReaderGroupConfig {
    pub streams: Vec<GroupStream>,
    /// How often readers re-read the group state (rebalance, checkpoints, positions).
    pub refresh: Duration,
    /// Consumption-based retention: the group subscribes to its streams, and their
    /// truncation never passes the group's last completed checkpoint (nor happens before
    /// its first).
    pub subscriber: bool,
    /// How often a reader compacts the group state (writes a snapshot and truncates the
    /// state segment before it) at the least. Uncompacted, the state grows by every
    /// reader's position report (one a second each), every new reader replays it all, and
    /// without tier-2 its oldest bytes keep the log files holding them, and everything
    /// written to them since, on disk. A handle from `reader_group` uses the default;
    /// see `ReaderGroup::compacting_state_every`.
    pub compact_state_every: Duration,
}

impl ReaderGroupConfig {
    pub fn stream(stream: &str) -> Self {
        Self {
            streams: vec![GroupStream { stream: stream.into(), from: None, to: None }],
            refresh: Duration::from_millis(100),
            subscriber: false,
            compact_state_every: STATE_COMPACT_EVERY,
        }
    }

    /// The same, as a subscriber of its streams (see `subscriber`).
    pub fn subscribing(mut self) -> Self {
        self.subscriber = true;
        self
    }
}

/// A completed checkpoint: one cut per stream.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub name: String,
    pub cuts: Vec<StreamCut>,
}

/// What a group reader returns: an event, or the marker of a checkpoint it just passed.
#[derive(Clone, Debug)]
pub enum GroupItem {
    Event(Event),
    Checkpoint(String),
}

/// Handle to a reader group.
#[derive(Clone)]
pub struct ReaderGroup {
    client: Client,
    scope: String,
    name: String,
    refresh: Duration,
    compact_state_every: Duration,
}

/// The prefix of the stream holding a group's state: `<scope>/_rg_<group>`.
pub const GROUP_STATE_PREFIX: &str = "_rg_";

/// The stream holding the state of group `group` (in the group's scope).
pub fn state_stream(group: &str) -> String {
    format!("{GROUP_STATE_PREFIX}{group}")
}

impl Client {
    /// Creates a reader group `scope/name` over the configured streams.
    pub async fn create_reader_group(
        &self,
        scope: &str,
        name: &str,
        config: ReaderGroupConfig,
    ) -> Result<ReaderGroup, ClientError> {
        let mut state = GroupState::default();
        for gs in &config.streams {
            let from = match &gs.from {
                Some(c) => c.clone(),
                None => self.stream_cut(&gs.stream, CutAt::Head).await?,
            };
            for cut in std::iter::once(&from).chain(gs.to.as_ref()) {
                if cut.stream.to_string() != gs.stream {
                    return Err(ClientError::InvalidStreamCut(format!(
                        "the cut is for {}, not {}",
                        cut.stream, gs.stream
                    )));
                }
                self.validate_cut(cut).await?;
            }
            for (&seg, &off) in &from.positions {
                state.unassigned.insert(from.segment_name(seg), off);
            }
            if let Some(to) = &gs.to {
                for (&seg, &off) in &to.positions {
                    state.ends.insert(to.segment_name(seg), off);
                }
            }
        }
        let mut sync = self.state_synchronizer::<GroupState>(scope, &state_stream(name)).await?;
        if !sync.initialize(state).await? {
            return Err(ClientError::GroupExists(format!("{scope}/{name}")));
        }
        if config.subscriber {
            for gs in &config.streams {
                let s = crate::client::parse_stream(&gs.stream)?;
                let msg = AddSubscriber { scope: s.scope, stream: s.stream, group: format!("{scope}/{name}") };
                self.admin::<_, Done>(msg).await?;
            }
        }
        Ok(ReaderGroup {
            client: self.clone(),
            scope: scope.into(),
            name: name.into(),
            refresh: config.refresh,
            compact_state_every: config.compact_state_every,
        })
    }

    /// An existing reader group.
    pub async fn reader_group(&self, scope: &str, name: &str) -> Result<ReaderGroup, ClientError> {
        let group = self.group_handle(scope, name);
        group.state().await?;
        Ok(group)
    }

    /// Compacts an existing reader group's state (`ReaderGroup::compact_state`) without
    /// reading it first to check that the group exists (`reader_group` does):
    /// `NoSuchGroup` if it does not.
    pub async fn compact_reader_group_state(&self, scope: &str, name: &str) -> Result<(), ClientError> {
        self.group_handle(scope, name).compact_state().await
    }

    /// A handle on a group not checked to exist (its calls say `NoSuchGroup` if not).
    fn group_handle(&self, scope: &str, name: &str) -> ReaderGroup {
        ReaderGroup {
            client: self.clone(),
            scope: scope.into(),
            name: name.into(),
            refresh: Duration::from_millis(100),
            compact_state_every: STATE_COMPACT_EVERY,
        }
    }
}

impl ReaderGroup {
    pub fn name(&self) -> String {
        format!("{}/{}", self.scope, self.name)
    }

    /// The same handle, whose readers compact the group state at least this often (see
    /// `ReaderGroupConfig::compact_state_every`).
    pub fn compacting_state_every(mut self, every: Duration) -> Self {
        self.compact_state_every = every;
        self
    }

    /// Writes a snapshot of the group state and truncates the state segment before it,
    /// whether due or not (for a group whose readers are not running: see
    /// `ReaderGroupConfig::compact_state_every`).
    pub async fn compact_state(&self) -> Result<(), ClientError> {
        let mut sync = self.sync().await?;
        sync.compact().await
    }

    async fn sync(&self) -> Result<StateSynchronizer<GroupState>, ClientError> {
        let info = self.client.get_stream(&self.scope, &state_stream(&self.name)).await;
        if let Err(e) = info {
            return Err(if e.code() == Some(sluice_net::ErrorCode::NoSuchStream) {
                ClientError::NoSuchGroup(self.name())
            } else {
                e
            });
        }
        self.client.state_synchronizer(&self.scope, &state_stream(&self.name)).await
    }

    /// The current group state.
    pub async fn state(&self) -> Result<GroupState, ClientError> {
        let mut sync = self.sync().await?;
        sync.fetch_updates().await?;
        sync.state().cloned().ok_or_else(|| ClientError::NoSuchGroup(self.name()))
    }

    /// Adds a reader with this id to the group.
    pub async fn create_reader(&self, id: &str) -> Result<GroupReader, ClientError> {
        let mut sync = self.sync().await?;
        let mut existed = false;
        sync.update_state(|s| {
            existed = s.readers.contains_key(id);
            if existed { vec![] } else { vec![GroupUpdate::AddReader { reader: id.into() }] }
        })
        .await?;
        if existed {
            return Err(ClientError::AlreadyInGroup { group: self.name(), reader: id.into() });
        }
        // Messages carry the events of one read (at most `READ_CHUNK_BYTES`).
        let (tx, rx) = mpsc::channel(16);
        let generation = sync.state().map_or(0, |s| s.generation);
        Ok(GroupReader {
            id: id.into(),
            group: self.name(),
            client: self.client.clone(),
            sync,
            generation,
            owned: BTreeMap::new(),
            tx,
            rx,
            refresh: self.refresh,
            compact_state_every: self.compact_state_every,
            next_refresh: Instant::now(),
            next_report: Instant::now(),
            unclocked: 0,
            ready: VecDeque::new(),
            ready_token: 0,
            next_token: 0,
            reported: BTreeMap::new(),
        })
    }

    /// Takes a reader out of the group; its segments go back to the pool at `positions`
    /// (default: the positions it last reported).
    pub async fn reader_offline(&self, id: &str, positions: Option<BTreeMap<String, u64>>) -> Result<(), ClientError> {
        let mut sync = self.sync().await?;
        let mut present = false;
        sync.update_state(|s| {
            present = s.readers.contains_key(id);
            if present {
                vec![GroupUpdate::RemoveReader { reader: id.into(), positions: positions.clone() }]
            } else {
                vec![]
            }
        })
        .await?;
        if !present {
            return Err(ClientError::NotInGroup { group: self.name(), reader: id.into() });
        }
        Ok(())
    }

    /// Starts a checkpoint and waits (up to `timeout`) until every reader passed its marker.
    pub async fn initiate_checkpoint(&self, name: &str, timeout: Duration) -> Result<Checkpoint, ClientError> {
        let mut sync = self.sync().await?;
        let mut busy = None;
        sync.update_state(|s| match &s.checkpoint {
            Some(cp) => {
                busy = Some(cp.name.clone());
                vec![]
            }
            None => {
                busy = None;
                vec![GroupUpdate::StartCheckpoint { name: name.into() }]
            }
        })
        .await?;
        if let Some(other) = busy {
            return Err(ClientError::InvalidArgument(format!(
                "checkpoint {other} is still pending in {}",
                self.name()
            )));
        }
        let deadline = Instant::now() + timeout;
        loop {
            sync.fetch_updates().await?;
            let state = sync.state().expect("initialized");
            if let Some(done) = state.completed.iter().rev().find(|c| c.name == name) {
                let cuts = positions_to_cuts(&done.positions);
                // A subscriber's streams may now be truncated up to here (no-op otherwise).
                for cut in &cuts {
                    let msg = UpdateSubscriber {
                        scope: cut.stream.scope.clone(),
                        stream: cut.stream.stream.clone(),
                        group: self.name(),
                        positions: cut
                            .positions
                            .iter()
                            .map(|(&segment, &offset)| SegmentOffset { segment, offset })
                            .collect(),
                    };
                    self.client.admin::<_, Done>(msg).await?;
                }
                return Ok(Checkpoint { name: name.into(), cuts });
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "checkpoint {name}: readers still to pass it: {:?}",
                    state.checkpoint.as_ref().map(|c| &c.waiting)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Restarts the group at these cuts (e.g. a checkpoint's): every reader drops what it
    /// holds and the segments are handed out again from there.
    pub async fn reset(&self, cuts: &[StreamCut]) -> Result<(), ClientError> {
        let mut positions = BTreeMap::new();
        for cut in cuts {
            self.client.validate_cut(cut).await?;
            for (&seg, &off) in &cut.positions {
                positions.insert(cut.segment_name(seg), off);
            }
        }
        let mut sync = self.sync().await?;
        sync.update_state(|s| vec![GroupUpdate::Reset { positions: positions.clone(), ends: s.ends.clone() }]).await
    }

    /// Deletes the group's state.
    pub async fn delete(&self) -> Result<(), ClientError> {
        // No longer a subscriber of any stream it read.
        let state = self.state().await?;
        let mut streams: Vec<ScopedStream> = Vec::new();
        let segments = state.readers.values().flat_map(|h| h.keys()).chain(state.unassigned.keys());
        for seg in segments.chain(state.finished.keys()) {
            if let Some((s, _)) = ScopedStream::of_segment(seg)
                && !streams.contains(&s)
            {
                streams.push(s);
            }
        }
        for s in streams {
            let msg = RemoveSubscriber { scope: s.scope, stream: s.stream, group: self.name() };
            match self.client.admin::<_, Done>(msg).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::NoSuchStream) => {}
                Err(e) => return Err(e),
            }
        }
        let stream = state_stream(&self.name);
        self.client.seal_stream(&self.scope, &stream).await?;
        self.client.delete_stream(&self.scope, &stream).await
    }
}

/// Groups segment positions into one cut per stream.
pub fn positions_to_cuts(positions: &BTreeMap<String, u64>) -> Vec<StreamCut> {
    let mut cuts: BTreeMap<ScopedStream, BTreeMap<u64, u64>> = BTreeMap::new();
    for (seg, &off) in positions {
        if let Some((stream, n)) = ScopedStream::of_segment(seg) {
            cuts.entry(stream).or_default().insert(n.0, off);
        }
    }
    cuts.into_iter().map(|(stream, positions)| StreamCut { stream, positions }).collect()
}

struct Owned {
    /// Offset of the next event to deliver.
    offset: u64,
    token: u64,
    task: JoinHandle<()>,
}

enum Fetched {
    /// The events of one read, each with the offset after it.
    Events {
        token: u64,
        events: Vec<(Event, u64)>,
    },
    End {
        token: u64,
        segment: String,
        offset: u64,
    },
    Error {
        token: u64,
        error: ClientError,
    },
}

/// One reader of a group.
pub struct GroupReader {
    id: String,
    group: String,
    client: Client,
    sync: StateSynchronizer<GroupState>,
    generation: u64,
    owned: BTreeMap<String, Owned>,
    tx: mpsc::Sender<Fetched>,
    rx: mpsc::Receiver<Fetched>,
    refresh: Duration,
    compact_state_every: Duration,
    next_refresh: Instant,
    /// When positions are next reported (if they moved).
    next_report: Instant,
    /// Events taken since the clock was last read (see `read_next`).
    unclocked: u32,
    /// Events of the last read taken from the channel, not delivered yet, and its token.
    ready: VecDeque<(Event, u64)>,
    ready_token: u64,
    next_token: u64,
    reported: BTreeMap<String, u64>,
}

impl Drop for GroupReader {
    fn drop(&mut self) {
        for o in self.owned.values() {
            o.task.abort();
        }
    }
}

async fn fetch_segment(
    client: Client,
    segment: String,
    start: u64,
    end: Option<u64>,
    token: u64,
    tx: mpsc::Sender<Fetched>,
) {
    let mut cut = EventCutter::new(segment.clone(), start);
    let mut ahead = ReadAhead::default();
    let wait = Duration::from_millis(500);
    let max_at = |at: u64| end.map_or(READ_CHUNK_BYTES, |e| (e - at).min(u64::from(READ_CHUNK_BYTES)) as u32);
    loop {
        let at = cut.read_offset();
        if end.is_some_and(|e| at >= e) {
            let _ = tx.send(Fetched::End { token, segment, offset: cut.offset() }).await;
            return;
        }
        let read = ahead.read(&client, &segment, at, max_at(at), wait).await;
        if let Ok((reply, data)) = &read
            && !data.is_empty()
            && !reply.end_of_segment
            && end.is_none_or(|e| at + (data.len() as u64) < e)
        {
            let next = at + data.len() as u64;
            ahead.send(&client, &segment, next, max_at(next), wait);
        }
        let (reply, events) = match read.and_then(|(reply, data)| Ok((reply, cut.push(data)?))) {
            Ok(r) => r,
            Err(error) => {
                let _ = tx.send(Fetched::Error { token, error }).await;
                return;
            }
        };
        if !events.is_empty() && tx.send(Fetched::Events { token, events }).await.is_err() {
            return;
        }
        if reply.end_of_segment && !cut.has_partial() {
            let _ = tx.send(Fetched::End { token, segment, offset: cut.offset() }).await;
            return;
        }
    }
}

/// What a reader's refresh writes, decided from a state (again on each conflict retry).
struct Plan {
    me: String,
    positions: BTreeMap<String, u64>,
    /// Whether the positions are due to be reported.
    report: bool,
}

impl Plan {
    /// The updates for `s`, and the checkpoint passed by them, if any.
    fn updates(&self, s: &GroupState) -> (Vec<GroupUpdate>, Option<String>) {
        let me = &self.me;
        if let Some(cp) = s.checkpoint.as_ref().filter(|cp| cp.waiting.contains(me)) {
            let reached = GroupUpdate::CheckpointReached {
                reader: me.clone(),
                name: cp.name.clone(),
                positions: self.positions.clone(),
            };
            return (vec![reached], Some(cp.name.clone()));
        }
        let mut ups = Vec::new();
        if self.report {
            ups.push(GroupUpdate::Positions { reader: me.clone(), positions: self.positions.clone() });
        }
        if s.checkpoint.is_none() {
            let held = s.readers.get(me).map_or(0, BTreeMap::len);
            let fair = s.fair_share();
            if held < fair {
                for seg in s.unassigned.keys().take(fair - held) {
                    ups.push(GroupUpdate::Acquire { reader: me.clone(), segment: seg.clone() });
                }
            } else if held > fair
                && let Some((seg, _)) = s.readers.get(me).and_then(|h| h.iter().next_back())
            {
                let offset = self.positions.get(seg).copied().unwrap_or(0);
                ups.push(GroupUpdate::Release { reader: me.clone(), segment: seg.clone(), offset });
            }
        }
        (ups, None)
    }
}

/// `d` give or take a fifth, at random: readers started together drift apart, so their
/// refreshes do not all meet on the state segment at once (and conflict).
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

impl GroupReader {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Offsets of the next event to deliver, per held segment.
    pub fn positions(&self) -> BTreeMap<String, u64> {
        self.owned.iter().map(|(s, o)| (s.clone(), o.offset)).collect()
    }

    fn start(&mut self, segment: String, offset: u64, end: Option<u64>) {
        self.next_token += 1;
        let token = self.next_token;
        let task =
            tokio::spawn(fetch_segment(self.client.clone(), segment.clone(), offset, end, token, self.tx.clone()));
        self.owned.insert(segment, Owned { offset, token, task });
    }

    fn stop(&mut self, segment: &str) {
        if let Some(o) = self.owned.remove(segment) {
            o.task.abort();
        }
    }

    /// Makes the held segments match the state.
    fn reconcile(&mut self) -> Result<(), ClientError> {
        let state = self.sync.state().cloned().expect("initialized");
        let Some(held) = state.readers.get(&self.id) else {
            return Err(ClientError::NotInGroup { group: self.group.clone(), reader: self.id.clone() });
        };
        if state.generation != self.generation {
            self.generation = state.generation;
            let all: Vec<String> = self.owned.keys().cloned().collect();
            for s in all {
                self.stop(&s);
            }
        }
        let gone: Vec<String> = self.owned.keys().filter(|s| !held.contains_key(*s)).cloned().collect();
        for s in gone {
            self.stop(&s);
        }
        for (seg, &off) in held {
            if !self.owned.contains_key(seg) {
                self.start(seg.clone(), off, state.ends.get(seg).copied());
            }
        }
        Ok(())
    }

    /// Re-reads the group state: passes a pending checkpoint, reports positions, rebalances.
    /// Only a change is written (a durable conditional append, during which this reader
    /// delivers nothing): positions at most every `POSITIONS_EVERY`, not at every refresh.
    async fn refresh(&mut self) -> Result<Option<GroupItem>, ClientError> {
        self.sync.fetch_updates().await?;
        if self.sync.compaction_due(self.compact_state_every, STATE_COMPACT_BYTES) {
            self.sync.compact_when(self.compact_state_every, STATE_COMPACT_BYTES).await?;
        }
        self.reconcile()?;
        let now = Instant::now();
        let positions = self.positions();
        let report = now >= self.next_report && positions != self.reported;
        let plan = Plan { me: self.id.clone(), positions, report };
        let state = self.sync.state().expect("initialized");
        if plan.updates(state).0.is_empty() {
            return Ok(None);
        }
        let mut outcome = (Vec::new(), None);
        self.sync
            .update_state(|s| {
                outcome = plan.updates(s);
                outcome.0.clone()
            })
            .await?;
        let (written, passed) = outcome;
        // A checkpoint's positions go to the checkpoint, not to the reader's held ones.
        if written.iter().any(|u| matches!(u, GroupUpdate::Positions { .. })) {
            self.reported = plan.positions;
            self.next_report = now + jittered(POSITIONS_EVERY.max(self.refresh));
        }
        self.reconcile()?;
        Ok(passed.map(GroupItem::Checkpoint))
    }

    /// The next event (or checkpoint marker), or `None` if nothing came within `timeout`.
    pub async fn read_next(&mut self, timeout: Duration) -> Result<Option<GroupItem>, ClientError> {
        let mut deadline = None;
        loop {
            // A catching-up reader finds its next event already fetched: it takes it without
            // reading the clock (three reads per event were a tenth of its time), but looks
            // whether a refresh is due at least every `UNCLOCKED_EVENTS_MAX` events.
            if self.unclocked < UNCLOCKED_EVENTS_MAX
                && let Some((event, next)) = self.ready.pop_front()
            {
                self.unclocked += 1;
                if let Some(o) = self.owned.get_mut(&*event.segment).filter(|o| o.token == self.ready_token) {
                    o.offset = next;
                    return Ok(Some(GroupItem::Event(event)));
                }
                continue;
            }
            let ready = if self.unclocked < UNCLOCKED_EVENTS_MAX { self.rx.try_recv().ok() } else { None };
            let msg = match ready {
                Some(m) => {
                    self.unclocked += 1;
                    m
                }
                None => {
                    self.unclocked = 0;
                    let now = Instant::now();
                    let deadline = *deadline.get_or_insert(now + timeout);
                    if now >= self.next_refresh {
                        self.next_refresh = now + jittered(self.refresh);
                        if let Some(item) = self.refresh().await? {
                            return Ok(Some(item));
                        }
                    }
                    if !self.ready.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    let wait = (deadline - now).min(self.next_refresh.saturating_duration_since(now));
                    match tokio::time::timeout(wait, self.rx.recv()).await {
                        Ok(Some(m)) => m,
                        Ok(None) | Err(_) => continue,
                    }
                }
            };
            match msg {
                Fetched::Events { token, events } => {
                    self.ready_token = token;
                    self.ready.extend(events);
                }
                Fetched::End { token, segment, offset } => {
                    if self.owned.get(&segment).is_some_and(|o| o.token == token) {
                        let successors = match self.successors(&segment).await {
                            Ok(s) => s,
                            Err(e) => {
                                // Read it again (it ends at once) and report the end then.
                                let end = self.sync.state().and_then(|s| s.ends.get(&segment).copied());
                                self.stop(&segment);
                                self.start(segment, offset, end);
                                return Err(e);
                            }
                        };
                        self.stop(&segment);
                        let me = self.id.clone();
                        self.sync
                            .update_state(|_| {
                                vec![GroupUpdate::Finish {
                                    reader: me.clone(),
                                    segment: segment.clone(),
                                    offset,
                                    successors: successors.clone(),
                                }]
                            })
                            .await?;
                        self.next_refresh = Instant::now();
                    }
                }
                Fetched::Error { token, error } => {
                    let failed = self.owned.iter().find(|(_, o)| o.token == token).map(|(s, o)| (s.clone(), o.offset));
                    if let Some((segment, offset)) = failed {
                        // Report it, and keep reading the segment from where delivery stands,
                        // or from its new start if a truncation overtook this reader.
                        let offset = match &error {
                            ClientError::Server { code: ErrorCode::Truncated, offset: Some(start), .. } => {
                                offset.max(*start)
                            }
                            _ => offset,
                        };
                        let end = self.sync.state().and_then(|s| s.ends.get(&segment).copied());
                        self.stop(&segment);
                        self.start(segment, offset, end);
                        return Err(error);
                    }
                }
            }
        }
    }

    /// The segments that replaced `segment` (a qualified name), with their predecessors.
    async fn successors(&self, segment: &str) -> Result<Vec<Successor>, ClientError> {
        let Some((stream, n)) = ScopedStream::of_segment(segment) else { return Ok(Vec::new()) };
        let history = self.client.stream_history(&stream.scope, &stream.stream).await?;
        let name = |n: u64| stream.segment_name(sluice_net::SegmentNumber(n));
        Ok(history
            .successors(n.0)
            .map(|s| Successor {
                segment: name(s.number),
                predecessors: s.predecessors.iter().map(|&p| name(p)).collect(),
            })
            .collect())
    }

    /// Leaves the group, handing its segments back at the current positions.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let me = self.id.clone();
        let positions = self.positions();
        self.sync
            .update_state(|_| {
                vec![GroupUpdate::RemoveReader { reader: me.clone(), positions: Some(positions.clone()) }]
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(s: &mut GroupState, ups: &[GroupUpdate]) {
        for u in ups {
            s.apply(u);
        }
    }

    fn state(segments: &[&str]) -> GroupState {
        GroupState { unassigned: segments.iter().map(|s| (s.to_string(), 0)).collect(), ..GroupState::default() }
    }

    #[test]
    fn a_refresh_writes_only_what_changed() {
        let mut s = state(&["a/b/0", "a/b/1"]);
        apply(&mut s, &[GroupUpdate::AddReader { reader: "r1".into() }]);
        apply(&mut s, &[GroupUpdate::Acquire { reader: "r1".into(), segment: "a/b/0".into() }]);
        apply(&mut s, &[GroupUpdate::Acquire { reader: "r1".into(), segment: "a/b/1".into() }]);
        let positions: BTreeMap<String, u64> = [("a/b/0".into(), 40), ("a/b/1".into(), 7)].into();
        let plan = |report| Plan { me: "r1".into(), positions: positions.clone(), report };
        // Positions that moved are written only when due; nothing else to do: no write.
        assert_eq!(plan(false).updates(&s), (vec![], None));
        assert_eq!(
            plan(true).updates(&s),
            (vec![GroupUpdate::Positions { reader: "r1".into(), positions: positions.clone() }], None)
        );
        // A new reader: one segment is released at its current position, reported or not.
        apply(&mut s, &[GroupUpdate::AddReader { reader: "r2".into() }]);
        assert_eq!(
            plan(false).updates(&s),
            (vec![GroupUpdate::Release { reader: "r1".into(), segment: "a/b/1".into(), offset: 7 }], None)
        );
        // A pending checkpoint is passed with the positions, due or not, and nothing else.
        apply(&mut s, &[GroupUpdate::StartCheckpoint { name: "c1".into() }]);
        assert_eq!(
            plan(false).updates(&s),
            (
                vec![GroupUpdate::CheckpointReached {
                    reader: "r1".into(),
                    name: "c1".into(),
                    positions: positions.clone()
                }],
                Some("c1".into())
            )
        );
    }

    #[test]
    fn assignment_release_offline_and_finish() {
        let mut s = state(&["a/b/0", "a/b/1"]);
        apply(
            &mut s,
            &[GroupUpdate::AddReader { reader: "r1".into() }, GroupUpdate::AddReader { reader: "r2".into() }],
        );
        assert_eq!(s.fair_share(), 1);
        apply(&mut s, &[GroupUpdate::Acquire { reader: "r1".into(), segment: "a/b/0".into() }]);
        // A segment cannot be taken twice.
        apply(&mut s, &[GroupUpdate::Acquire { reader: "r2".into(), segment: "a/b/0".into() }]);
        assert_eq!(s.readers["r2"].len(), 0);
        apply(&mut s, &[GroupUpdate::Positions { reader: "r1".into(), positions: [("a/b/0".into(), 40)].into() }]);
        apply(&mut s, &[GroupUpdate::RemoveReader { reader: "r1".into(), positions: None }]);
        assert_eq!(s.unassigned["a/b/0"], 40);
        apply(&mut s, &[GroupUpdate::Acquire { reader: "r2".into(), segment: "a/b/0".into() }]);
        apply(
            &mut s,
            &[GroupUpdate::Finish { reader: "r2".into(), segment: "a/b/0".into(), offset: 90, successors: vec![] }],
        );
        assert_eq!(s.finished["a/b/0"], 90);
        assert_eq!(s.active_segments(), 1);
    }

    #[test]
    fn successors_come_in_once_all_predecessors_finish() {
        let succ = |seg: &str, preds: &[&str]| Successor {
            segment: seg.into(),
            predecessors: preds.iter().map(|p| p.to_string()).collect(),
        };
        let mut s = state(&["a/b/0", "a/b/1", "a/b/2"]);
        apply(
            &mut s,
            &[
                GroupUpdate::AddReader { reader: "r".into() },
                GroupUpdate::Acquire { reader: "r".into(), segment: "a/b/0".into() },
                GroupUpdate::Acquire { reader: "r".into(), segment: "a/b/1".into() },
                GroupUpdate::Acquire { reader: "r".into(), segment: "a/b/2".into() },
            ],
        );
        // 0 and 1 merged into 3; 2 split into 4 and 5.
        let merged = vec![succ("a/b/3", &["a/b/0", "a/b/1"])];
        apply(
            &mut s,
            &[GroupUpdate::Finish {
                reader: "r".into(),
                segment: "a/b/0".into(),
                offset: 5,
                successors: merged.clone(),
            }],
        );
        assert!(!s.unassigned.contains_key("a/b/3"), "3 waits for 1");
        apply(
            &mut s,
            &[GroupUpdate::Finish { reader: "r".into(), segment: "a/b/1".into(), offset: 6, successors: merged }],
        );
        assert_eq!(s.unassigned.get("a/b/3"), Some(&0));
        s.ends.insert("a/b/2".into(), 9);
        let split = vec![succ("a/b/4", &["a/b/2"]), succ("a/b/5", &["a/b/2"])];
        apply(
            &mut s,
            &[GroupUpdate::Finish { reader: "r".into(), segment: "a/b/2".into(), offset: 9, successors: split }],
        );
        assert!(!s.unassigned.contains_key("a/b/4"), "an end cut stops the walk");
        assert_eq!(s.active_segments(), 1);
    }

    #[test]
    fn finished_segments_are_forgotten_once_their_successors_are_in() {
        let succ = |seg: &str, preds: &[&str]| Successor {
            segment: seg.into(),
            predecessors: preds.iter().map(|p| p.to_string()).collect(),
        };
        let finish = |s: &mut GroupState, seg: &str, successors: Vec<Successor>| {
            apply(
                s,
                &[
                    GroupUpdate::Acquire { reader: "r".into(), segment: seg.into() },
                    GroupUpdate::Finish { reader: "r".into(), segment: seg.into(), offset: 7, successors },
                ],
            );
        };
        let mut s = state(&["a/b/0", "a/b/1"]);
        apply(&mut s, &[GroupUpdate::AddReader { reader: "r".into() }]);
        // 0 and 1 are replaced by 2 (from 0 alone) and 3 (from 0 and 1).
        let next = vec![succ("a/b/2", &["a/b/0"]), succ("a/b/3", &["a/b/0", "a/b/1"])];
        finish(&mut s, "a/b/0", next.clone());
        assert!(s.unassigned.contains_key("a/b/2"));
        assert!(s.finished.contains_key("a/b/0"), "0 is still needed: 3 waits for 1");
        // 2 is read to its end (and replaced by 4) before 1 finishes.
        finish(&mut s, "a/b/2", vec![succ("a/b/4", &["a/b/2"])]);
        assert!(!s.finished.contains_key("a/b/2"), "4 is in: 2 is no longer needed");
        finish(&mut s, "a/b/1", vec![succ("a/b/3", &["a/b/0", "a/b/1"])]);
        assert!(s.unassigned.contains_key("a/b/3"));
        assert!(s.finished.is_empty() && s.awaiting.is_empty(), "{:?} {:?}", s.finished, s.awaiting);
        // A hundred more scalings, each splitting the newest segment: the state stays small.
        let mut last = "a/b/4".to_string();
        for n in 0..100u64 {
            let (x, y) = (format!("a/b/{}", 10 + 2 * n), format!("a/b/{}", 11 + 2 * n));
            finish(&mut s, &last, vec![succ(&x, &[last.as_str()]), succ(&y, &[last.as_str()])]);
            finish(&mut s, &y, vec![]);
            last = x;
        }
        assert_eq!(s.unassigned.keys().cloned().collect::<Vec<_>>(), vec!["a/b/208".to_string(), "a/b/3".into()]);
        // Only the segments with no successors (the stream's ends) stay finished.
        let ends: Vec<String> = (0..100u64).map(|n| format!("a/b/{}", 11 + 2 * n)).collect();
        assert_eq!(s.finished.len(), 100);
        assert!(ends.iter().all(|e| s.finished.contains_key(e)));
        assert!(s.awaiting.is_empty());
        // Encoded with the version prefix; decoded back whole.
        let bytes = Synchronized::encode(&s);
        assert!(bytes.starts_with(STATE_MAGIC_V2));
        assert_eq!(<GroupState as Synchronized>::decode(&bytes), Ok(s));
    }

    #[test]
    fn snapshots_from_before_the_version_prefix_still_decode() {
        let old = GroupStateV1 {
            generation: 3,
            readers: [("r".to_string(), [("a/b/5".to_string(), 40u64)].into())].into(),
            unassigned: [("a/b/6".to_string(), 0u64)].into(),
            ends: BTreeMap::new(),
            finished: [("a/b/0".to_string(), 90u64)].into(),
            checkpoint: None,
            completed: vec![CompletedCheckpoint { name: "c".into(), positions: [("a/b/0".to_string(), 9u64)].into() }],
        };
        let bytes = encode(&old);
        let s = <GroupState as Synchronized>::decode(&bytes).expect("an old snapshot decodes");
        assert_eq!(s.generation, 3);
        assert_eq!(s.readers["r"]["a/b/5"], 40);
        assert_eq!(s.finished["a/b/0"], 90);
        assert_eq!(s.completed[0].name, "c");
        assert!(s.awaiting.is_empty());
        assert!(<GroupState as Synchronized>::decode(b"RG\x02 not a state").is_err());
    }

    #[test]
    fn checkpoint_positions_and_no_acquire_while_pending() {
        let mut s = state(&["a/b/0", "a/b/1", "a/b/2"]);
        apply(
            &mut s,
            &[
                GroupUpdate::AddReader { reader: "r1".into() },
                GroupUpdate::AddReader { reader: "r2".into() },
                GroupUpdate::Acquire { reader: "r1".into(), segment: "a/b/0".into() },
                GroupUpdate::Acquire { reader: "r2".into(), segment: "a/b/1".into() },
                GroupUpdate::StartCheckpoint { name: "c".into() },
                GroupUpdate::Acquire { reader: "r2".into(), segment: "a/b/2".into() },
            ],
        );
        assert!(s.unassigned.contains_key("a/b/2"), "no acquire during a checkpoint");
        apply(
            &mut s,
            &[GroupUpdate::CheckpointReached {
                reader: "r1".into(),
                name: "c".into(),
                positions: [("a/b/0".into(), 10)].into(),
            }],
        );
        assert!(s.checkpoint.is_some());
        // r2 releases before passing the marker, then goes offline: its position counts.
        apply(&mut s, &[GroupUpdate::Release { reader: "r2".into(), segment: "a/b/1".into(), offset: 7 }]);
        apply(&mut s, &[GroupUpdate::RemoveReader { reader: "r2".into(), positions: None }]);
        assert!(s.checkpoint.is_none());
        let done = s.completed[0].clone();
        assert_eq!(done.positions, [("a/b/0".into(), 10), ("a/b/1".into(), 7), ("a/b/2".into(), 0)].into());
        let cuts = positions_to_cuts(&done.positions);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].positions, [(0, 10), (1, 7), (2, 0)].into());
        apply(&mut s, &[GroupUpdate::Reset { positions: done.positions.clone(), ends: BTreeMap::new() }]);
        assert_eq!((s.generation, s.unassigned.len()), (1, 3));
    }

    #[test]
    fn state_and_updates_roundtrip() {
        let mut s = state(&["a/b/0"]);
        s.apply(&GroupUpdate::AddReader { reader: "r".into() });
        assert_eq!(GroupState::decode(&s.encode()).unwrap(), s);
        let u = GroupUpdate::Release { reader: "r".into(), segment: "a/b/0".into(), offset: 5 };
        assert_eq!(GroupState::decode_update(&GroupState::encode_update(&u)).unwrap(), u);
        assert!(GroupState::decode(&[1, 2, 3]).is_err());
    }
}
