//! Control messages: one rkyv-archived struct per frame kind. Event payload bytes never go
//! through rkyv; they follow the control archive raw.

use crate::error::ProtocolError;
use rkyv::{Archive, Deserialize, Serialize};

macro_rules! kinds {
    ($($name:ident = $v:expr),* $(,)?) => {
        /// Frame kinds (u16 on the wire).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Kind { $($name = $v),* }
        impl Kind {
            pub fn from_u16(v: u16) -> Option<Kind> {
                match v { $($v => Some(Kind::$name),)* _ => None }
            }
        }
    };
}

kinds! {
    Hello = 1, HelloReply = 2, ErrorReply = 3, Done = 4,
    CreateScope = 10, DeleteScope = 11, ListScopes = 12, ScopeList = 13,
    CreateStream = 20, ListStreams = 21, StreamList = 22, GetStream = 23, StreamInfo = 24,
    SealStream = 25, DeleteStream = 26, UpdateStream = 27, ScaleStream = 28, GetStreamHistory = 29,
    StreamHistory = 40,
    CreateSegment = 30, Append = 31, AppendAck = 32, Read = 33, ReadReply = 34,
    GetSegmentInfo = 35, SegmentInfo = 36, SealSegment = 37, TruncateSegment = 38,
    DeleteSegment = 39, MergeSegment = 41, Appends = 42, AppendsReply = 43,
    BeginTxn = 50, TxnInfo = 51, GetTxn = 52, ListTxns = 53, TxnList = 54, PingTxn = 55,
    CommitTxn = 56, FinishCommit = 57, AbortTxn = 58, ForgetTxn = 59,
    AddSubscriber = 60, RemoveSubscriber = 61, UpdateSubscriber = 62, ListSubscribers = 63,
    SubscriberList = 64,
    GetStats = 70, ShardStats = 71, ScrubLog = 72, ScrubReport = 73, ListSegmentLengths = 74,
    SegmentLengths = 75,
}

/// A control message: its kind and its archive.
pub trait Control: Sized {
    const KIND: Kind;

    /// Serializes the control archive.
    fn to_control_bytes(&self) -> rkyv::util::AlignedVec;

    /// Validates (bytecheck) and deserializes a control archive.
    fn from_control_bytes(bytes: &[u8]) -> Result<Self, ProtocolError>;
}

macro_rules! control {
    ($kind:ident, $(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl Control for $name {
            const KIND: Kind = Kind::$kind;
            fn to_control_bytes(&self) -> rkyv::util::AlignedVec {
                // Serializing plain owned structs into a growable buffer cannot fail.
                rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing a control message")
            }
            fn from_control_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
                rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes)
                    .map_err(|e| ProtocolError::InvalidArchive { kind: Self::KIND, reason: e.to_string() })
            }
        }
    };
}

control!(
    Hello,
    /// First frame on a connection.
    pub struct Hello {
        pub magic: u32,
        pub min_version: u16,
        pub max_version: u16,
        pub client: String,
    }
);
impl Hello {
    /// The first frame of a connection from this build: its magic and protocol version,
    /// naming the client (`client`: what the server's log calls it).
    pub fn current(client: &str) -> Hello {
        Hello {
            magic: crate::constants::HELLO_MAGIC,
            min_version: crate::constants::PROTOCOL_VERSION,
            max_version: crate::constants::PROTOCOL_VERSION,
            client: client.into(),
        }
    }
}

control!(
    HelloReply,
    /// The server's half of the handshake, with its shard map.
    pub struct HelloReply {
        pub version: u16,
        pub node: String,
        pub container_count: u32,
        pub shards: Vec<ShardEndpoint>,
        /// Cluster mode: the endpoint serving each container ("" while it moves); empty on a
        /// standalone node, where container `c` is on shard `c mod shards`.
        pub containers: Vec<String>,
        /// Largest append payload the node takes (its log files must hold a record of it):
        /// writers keep their batches within it.
        pub append_bytes_max: u64,
        /// How segments are laid over containers (`routing::Placement`, 1 hashed, 2 spread).
        pub placement: u8,
    }
);
control!(
    ErrorReply,
    /// A typed error answering a request.
    pub struct ErrorReply {
        pub code: u16,
        pub message: String,
        /// For `WrongHost`: where the request belongs.
        pub endpoint: Option<String>,
        /// For `Truncated`: the start offset; for `ConditionalCheckFailed`: the actual length.
        pub offset: Option<u64>,
    }
);
control!(
    Done,
    /// Success without a body.
    pub struct Done {}
);
control!(
    CreateScope,
    pub struct CreateScope {
        pub scope: String,
    }
);
control!(
    DeleteScope,
    pub struct DeleteScope {
        pub scope: String,
    }
);
control!(
    ListScopes,
    /// Scope names in order, a page at a time: at most `limit` (the server caps it at
    /// `NAMES_PAGE_MAX`; 0: the cap) after the name `after` (empty: from the first).
    pub struct ListScopes {
        pub after: String,
        pub limit: u32,
    }
);
control!(
    ScopeList,
    /// One page; `next` is the next page's `after` (empty: this was the last).
    pub struct ScopeList {
        pub scopes: Vec<String>,
        pub next: String,
    }
);
control!(
    CreateStream,
    pub struct CreateStream {
        pub scope: String,
        pub stream: String,
        /// Segments to start with (an automatic policy starts with at least its minimum).
        pub segments: u32,
        pub retention: crate::Retention,
        pub scaling: crate::ScalingPolicy,
    }
);
control!(
    ListStreams,
    /// A scope's stream names in order, a page at a time (as `ListScopes`).
    pub struct ListStreams {
        pub scope: String,
        pub after: String,
        pub limit: u32,
    }
);
control!(
    StreamList,
    /// One page of a scope's streams, each with its state and policies (so that a service
    /// that applies a policy, such as retention or auto-scaling, need not ask for every
    /// stream's record to find the few with one); `next` as in `ScopeList`.
    pub struct StreamList {
        pub streams: Vec<ListedStream>,
        pub next: String,
    }
);
control!(
    GetStream,
    pub struct GetStream {
        pub scope: String,
        pub stream: String,
    }
);
control!(
    StreamInfo,
    /// A stream's current segments and state.
    pub struct StreamInfo {
        pub scope: String,
        pub stream: String,
        pub sealed: bool,
        pub segments: Vec<SegmentRange>,
        pub retention: crate::Retention,
        pub scaling: crate::ScalingPolicy,
        /// The epoch `segments` belong to (0 at creation, one more per scaling).
        pub epoch: u64,
    }
);
control!(
    ScaleStream,
    /// Seals `seal` (adjacent active segments) and replaces them with new segments over
    /// `ranges`, which must exactly cover the sealed segments' key range, in order. The
    /// answer is the stream's `StreamInfo` in the new epoch.
    pub struct ScaleStream {
        pub scope: String,
        pub stream: String,
        pub seal: Vec<u64>,
        pub ranges: Vec<KeyRange>,
    }
);
control!(
    GetStreamHistory,
    /// One page of a stream's history: epochs from `from_epoch` on, at most `limit` (0: as
    /// many as the server sends in one answer).
    pub struct GetStreamHistory {
        pub scope: String,
        pub stream: String,
        pub from_epoch: u64,
        pub limit: u32,
    }
);
control!(
    StreamHistory,
    /// A stream's epochs and the segments they created, with their links: one page of them
    /// as an answer (`next`: the epoch the next page starts at), all of them once a client
    /// has walked the pages (`Client::stream_history`).
    pub struct StreamHistory {
        pub scope: String,
        pub stream: String,
        pub epochs: Vec<EpochInfo>,
        pub segments: Vec<SegmentHistory>,
        pub next: Option<u64>,
    }
);
control!(
    UpdateStream,
    /// Changes a live stream's policies (`None`: leave it as it is).
    pub struct UpdateStream {
        pub scope: String,
        pub stream: String,
        pub retention: Option<crate::Retention>,
        pub scaling: Option<crate::ScalingPolicy>,
    }
);
control!(
    SealStream,
    pub struct SealStream {
        pub scope: String,
        pub stream: String,
    }
);
control!(
    DeleteStream,
    pub struct DeleteStream {
        pub scope: String,
        pub stream: String,
    }
);
control!(
    CreateSegment,
    pub struct CreateSegment {
        pub segment: String,
    }
);
control!(
    Append,
    /// Appends the frame's payload to a segment. With `event_count > 0` the payload
    /// must be exactly that many framed events, numbered from `first_event_number`; with
    /// `event_count == 0` it is raw bytes (byte streams). A non-zero writer makes it idempotent.
    pub struct Append {
        pub segment: String,
        pub writer_id: u128,
        pub first_event_number: u64,
        pub event_count: u32,
        /// Conditional append: only if the segment's length equals this.
        pub expected_offset: Option<u64>,
    }
);
control!(
    MergeSegment,
    /// Moves a committed transaction's shadow `source` (`segment` + `#txn.<id>`) into
    /// `segment` on the server: its first `source_length` bytes (`None`: all of a sealed
    /// shadow), each event without its key point, appended while the shadow is deleted, in
    /// one durable step. Answer: `AppendAck` (`last_event_number` 0; `duplicate` when the
    /// shadow is gone, merged before). `Sealed` when `segment` was sealed by a scaling: the
    /// client moves the events to the successors itself.
    pub struct MergeSegment {
        pub segment: String,
        pub source: String,
        pub source_length: Option<u64>,
    }
);
control!(
    AppendAck,
    /// The append is durable.
    pub struct AppendAck {
        /// Segment offset where the data begins (0 for a duplicate).
        pub offset: u64,
        /// Segment length after the append.
        pub length: u64,
        pub last_event_number: u64,
        /// The events were already durable; nothing was appended.
        pub duplicate: bool,
    }
);
control!(
    Appends,
    /// Several appends in one frame, to segments served by the shard or node the frame is
    /// sent to (a writer's batches for many segments in one request): each part is an
    /// `Append` without `expected_offset`, its data the next `data_bytes` of the payload. The
    /// server queues the parts in order, as if each came in a frame of its own, and answers
    /// once all of them are done, with `AppendsReply`.
    pub struct Appends {
        pub parts: Vec<AppendPart>,
    }
);
control!(
    AppendsReply,
    /// The answer to `Appends`: one outcome per part, in order.
    pub struct AppendsReply {
        pub outcomes: Vec<AppendOutcome>,
    }
);
control!(
    Read,
    /// Reads from `offset`; at the tail waits up to `wait_ms` for data.
    pub struct Read {
        pub segment: String,
        pub offset: u64,
        pub max_bytes: u32,
        pub wait_ms: u32,
    }
);
control!(
    ReadReply,
    /// Bytes of the segment from `offset` follow as payload.
    pub struct ReadReply {
        pub offset: u64,
        /// Durable length of the segment at the time of the read.
        pub length: u64,
        pub sealed: bool,
        /// Sealed and `offset` is the end: no more data will ever come.
        pub end_of_segment: bool,
    }
);
control!(
    GetSegmentInfo,
    pub struct GetSegmentInfo {
        pub segment: String,
    }
);
control!(
    SegmentInfo,
    /// Durable state of a segment.
    pub struct SegmentInfo {
        pub segment: String,
        pub start_offset: u64,
        pub length: u64,
        pub sealed: bool,
        pub writers: Vec<WriterState>,
        /// Bytes below this offset are in tier-2 (0 without tier-2).
        pub tier2_end: u64,
        /// Append rates, for auto-scaling.
        pub rates: AppendRates,
    }
);
control!(
    SealSegment,
    pub struct SealSegment {
        pub segment: String,
    }
);
control!(
    TruncateSegment,
    pub struct TruncateSegment {
        pub segment: String,
        pub offset: u64,
    }
);
control!(
    DeleteSegment,
    pub struct DeleteSegment {
        pub segment: String,
    }
);

control!(
    BeginTxn,
    /// Opens transaction `txn` (a random non-zero id the client picks, so a retry resumes
    /// it) on a stream's current epoch; it aborts unless pinged within `lease_ms`.
    pub struct BeginTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
        pub lease_ms: u64,
    }
);
control!(
    TxnInfo,
    /// A transaction's record.
    pub struct TxnInfo {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
        pub state: crate::txn::TxnState,
        /// The stream epoch it was opened in.
        pub epoch: u64,
        /// That epoch's segments: each has a shadow segment in the transaction.
        pub segments: Vec<SegmentRange>,
        pub lease_ms: u64,
        /// Wall-clock time the lease runs out (while open).
        pub lease_expires_unix_ms: u64,
        pub created_unix_ms: u64,
        /// When it was committed or aborted (0 before).
        pub finished_unix_ms: u64,
        /// Committing or committed by lengths: the bytes of each shadow (in `segments`
        /// order) the commit moves. Empty: the shadows were sealed at the decision and are
        /// moved whole.
        pub lengths: Vec<u64>,
    }
);
control!(
    GetTxn,
    pub struct GetTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
    }
);
control!(
    ListTxns,
    /// Transactions of one stream, or of every stream when `stream` is empty (and `scope` too),
    /// a page at a time: at most `limit` (the server caps it at `TXN_PAGE_MAX`; 0: the cap),
    /// after the cursor `after` (empty: from the first).
    pub struct ListTxns {
        pub scope: String,
        pub stream: String,
        pub after: String,
        pub limit: u32,
    }
);
control!(
    TxnList,
    /// One page; `next` is the cursor of the next page (empty: this was the last).
    pub struct TxnList {
        pub txns: Vec<TxnInfo>,
        pub next: String,
    }
);
control!(
    PingTxn,
    /// Renews an open transaction's lease: it now runs out `lease_ms` from now.
    pub struct PingTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
        pub lease_ms: u64,
    }
);
control!(
    CommitTxn,
    /// Decides the commit: the transaction becomes `Committing`. With `lengths` (the bytes
    /// written into each shadow, in the transaction's `segments` order, all acknowledged)
    /// the server checks that every shadow holds exactly that many bytes and records them:
    /// the commit moves those bytes, and the decision is one metadata write. Without (empty),
    /// the shadows are sealed beside the decision and moved whole. The caller then moves the
    /// shadows' events into the stream and sends `FinishCommit` (anyone may finish a commit;
    /// the controller does after a crash).
    pub struct CommitTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
        pub lengths: Vec<u64>,
    }
);
control!(
    FinishCommit,
    /// Every shadow's events are in the stream: the transaction becomes `Committed`.
    pub struct FinishCommit {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
    }
);
control!(
    AbortTxn,
    /// Aborts: the shadow segments are deleted and the transaction becomes `Aborted`.
    pub struct AbortTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
    }
);
control!(
    ForgetTxn,
    /// Removes a committed or aborted transaction's record.
    pub struct ForgetTxn {
        pub scope: String,
        pub stream: String,
        pub txn: u128,
    }
);

control!(
    AddSubscriber,
    /// Makes reader group `group` (as `scope/name`) a subscriber of a stream: truncation never
    /// passes its last checkpoint (and waits for its first one).
    pub struct AddSubscriber {
        pub scope: String,
        pub stream: String,
        pub group: String,
    }
);
control!(
    RemoveSubscriber,
    pub struct RemoveSubscriber {
        pub scope: String,
        pub stream: String,
        pub group: String,
    }
);
control!(
    UpdateSubscriber,
    /// A subscriber's new checkpoint cut on the stream, as (segment number, offset). A group
    /// that is not a subscriber of the stream changes nothing.
    pub struct UpdateSubscriber {
        pub scope: String,
        pub stream: String,
        pub group: String,
        pub positions: Vec<SegmentOffset>,
    }
);
control!(
    ListSubscribers,
    pub struct ListSubscribers {
        pub scope: String,
        pub stream: String,
    }
);
control!(
    SubscriberList,
    pub struct SubscriberList {
        pub subscribers: Vec<SubscriberInfo>,
    }
);

control!(
    GetStats,
    /// A shard's latency statistics (answered by the shard it is sent to).
    pub struct GetStats {
        /// Start counting over once these are taken.
        pub reset: bool,
    }
);
control!(
    ShardStats,
    /// What one shard measured since its statistics were last reset (or since it started).
    pub struct ShardStats {
        /// The node's id (`standalone` on a standalone node).
        pub node: String,
        pub shard: u32,
        /// How long the shard has been counting.
        pub window_ms: u64,
        /// Requests (frames) read from clients: an `Appends` frame is one, however many
        /// appends it carries.
        pub requests: u64,
        /// Appends and merges: from their frame read until their acknowledgement is ready
        /// (waiting for the flush in flight, then their own).
        pub appends: Latencies,
        /// Log flushes: write and sync, until the shard sees them complete.
        pub flushes: Latencies,
        /// Bytes written by those flushes.
        pub flushed_bytes: u64,
        /// The state of each container the shard serves, in container order. Not reset with
        /// the figures: these are conditions, not counts over the window.
        pub containers: Vec<ContainerHealth>,
    }
);

/// A segment that alone keeps a container's older log files (`ContainerHealth::log_held_by`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct LogHeldBy {
    /// The segment's name (`scope/stream/number`).
    pub segment: String,
    /// The offset from which its data is only in the log.
    pub from: u64,
    /// How many log files it alone keeps.
    pub files: u64,
}

impl std::fmt::Display for LogHeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} alone keeps {} log files the other segments let go (its data from offset {} is only in the log)",
            self.segment, self.files, self.from
        )
    }
}

/// What an operator needs to know about one container: how much log it holds, and whatever
/// is wrong with it (nothing: every `Option` `None`, `damaged_reads` 0, `scrub_damage` and `salvaged` empty).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ContainerHealth {
    pub container: u32,
    /// Bytes of its log files on disk (each counted whole).
    pub log_bytes: u64,
    /// Bytes of the freed log files it keeps to reuse (`.spare`, each counted whole).
    pub spare_bytes: u64,
    /// Log files it made from freed ones since it opened on this node.
    pub files_reused: u64,
    /// Without tier-2: copies of small segments into its current log file since it opened on
    /// this node (one per segment and time), so that the older files they alone kept could
    /// be freed.
    pub segments_copied: u64,
    /// Without tier-2: a segment that alone keeps log files every other segment has let
    /// go (the log does not shrink past its data).
    pub log_held_by: Option<LogHeldBy>,
    /// It stopped on an error (poisoned) and serves nothing until the node restarts.
    pub stopped: Option<String>,
    /// For how long appends have been refused for want of disk space for the next log file.
    pub no_space_ms: Option<u64>,
    /// The tier-2 mover fails: for how long, and its last error.
    pub mover_failing_ms: Option<u64>,
    pub mover_error: Option<String>,
    /// Reads refused on damaged data (a log record or a tier-2 block) since the container
    /// opened on this node, the mover's included, and what the last one said.
    pub damaged_reads: u64,
    pub last_damaged_read: Option<String>,
    /// How long ago its last log scrub since the node started ended (`None`: none yet), and
    /// what that scrub found (empty: sound).
    pub scrub_ago_ms: Option<u64>,
    pub scrub_damage: Vec<String>,
    /// What its recovery at this node's start went past and lost, with
    /// `--salvage-damaged-log` (empty: nothing was damaged).
    pub salvaged: Vec<String>,
}

control!(
    ScrubLog,
    /// Reads the log files of the shard's containers back from the disk and checks every
    /// record (answered by the shard it is sent to, once done).
    pub struct ScrubLog {
        /// Containers to scrub; those the shard does not serve are left out of the answer.
        pub containers: Vec<u32>,
        /// Most bytes read per second (0: as fast as the disk goes).
        pub bytes_per_sec: u64,
    }
);
control!(
    ScrubReport,
    /// What a scrub found, per container the shard serves.
    pub struct ScrubReport {
        pub shard: u32,
        pub containers: Vec<ContainerScrub>,
    }
);
control!(
    ListSegmentLengths,
    /// The length of every open (unsealed) segment the shard serves, in one answer: how the
    /// retention service sees which streams grew without a request per segment. `after`:
    /// names after this one only (empty: from the first), at most `limit` of them (0: the
    /// server's cap, `LENGTHS_PAGE_MAX`).
    pub struct ListSegmentLengths {
        pub after: String,
        pub limit: u32,
    }
);
control!(
    SegmentLengths,
    /// (segment name, length) in name order; `next`: the name to ask after for the rest
    /// (`None`: that was all).
    pub struct SegmentLengths {
        pub segments: Vec<(String, u64)>,
        pub next: Option<String>,
    }
);

/// One container's log, read back and checked.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ContainerScrub {
    pub container: u32,
    /// Log files read.
    pub files: u32,
    /// Records whose checksums held.
    pub records: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Files deleted (freed: their data moved to tier-2, truncated or deleted) before the scrub reached them.
    pub gone: u32,
    /// Each finding: the file, where, and what is wrong. Empty: the log is sound.
    pub damage: Vec<String>,
    pub took_ms: u64,
}

/// A latency distribution in microseconds (all 0 when `count` is 0).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Latencies {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latencies {
    /// From a histogram of microseconds: how many values it holds, its largest, and its value
    /// at a quantile (not called when it is empty: all 0 then).
    pub fn from_histogram(count: u64, max_us: u64, at: impl Fn(f64) -> u64) -> Self {
        if count == 0 {
            return Self::default();
        }
        Self { count, p50_us: at(0.5), p90_us: at(0.9), p99_us: at(0.99), p999_us: at(0.999), max_us }
    }
}

/// A position in one segment of a stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct SegmentOffset {
    pub segment: u64,
    pub offset: u64,
}

/// A subscriber of a stream and its last checkpoint cut (`None` before its first).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SubscriberInfo {
    pub group: String,
    pub positions: Option<Vec<SegmentOffset>>,
    pub updated_unix_ms: u64,
}

/// One part of an `Appends` frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AppendPart {
    pub segment: String,
    pub writer_id: u128,
    pub first_event_number: u64,
    pub event_count: u32,
    /// Bytes of the frame's payload that are this part's data (after the earlier parts').
    pub data_bytes: u32,
}

/// How one part of an `Appends` frame ended: what a frame of its own would have been
/// answered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    Acked(AppendAck),
    Failed(ErrorReply),
}

/// One shard's listening address.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardEndpoint {
    pub shard: u32,
    pub address: String,
}

/// A stream as a `StreamList` page shows it: what `StreamInfo` says of it, less its
/// segments.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ListedStream {
    pub name: String,
    /// Still being created: not yet usable (`GetStream` says there is no such stream).
    pub creating: bool,
    pub sealed: bool,
    /// Its record could not be read (damaged; `GetStream` says how): the other fields are
    /// defaults, not the stream's. Listed rather than failing the whole listing.
    pub unreadable: bool,
    pub retention: crate::Retention,
    pub scaling: crate::ScalingPolicy,
}

/// A segment of a stream and its routing-key range [key_low, key_high).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SegmentRange {
    pub number: u64,
    pub key_low: f64,
    pub key_high: f64,
}

/// A segment's append rates, exponentially weighted over a window and over five windows.
/// Kept in memory by the container: `measured_ms` says how long they have been watched.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct AppendRates {
    pub events_per_s: f64,
    pub bytes_per_s: f64,
    pub events_per_s_long: f64,
    pub bytes_per_s_long: f64,
    pub window_ms: u64,
    pub measured_ms: u64,
}

/// A routing-key range [low, high).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct KeyRange {
    pub low: f64,
    pub high: f64,
}

impl KeyRange {
    /// `n` equal ranges over this one; the last ends exactly at `high`, so they cover it.
    pub fn split(self, n: u32) -> Vec<KeyRange> {
        let width = self.high - self.low;
        let at = |i: u32| if i == n { self.high } else { self.low + width * f64::from(i) / f64::from(n) };
        (0..n).map(|i| KeyRange { low: if i == 0 { self.low } else { at(i) }, high: at(i + 1) }).collect()
    }
}

/// One epoch of a stream: the segments that partition the key space in it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EpochInfo {
    pub epoch: u64,
    pub created_unix_ms: u64,
    pub segments: Vec<u64>,
}

/// A segment as the stream's history knows it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SegmentHistory {
    pub number: u64,
    pub key_low: f64,
    pub key_high: f64,
    /// Epoch that created it.
    pub created_epoch: u64,
    /// Epoch that replaced it (a scaling sealed it), if any.
    pub sealed_epoch: Option<u64>,
    /// Segments it replaced: a reader reads all of them to their end before this one.
    pub predecessors: Vec<u64>,
}

impl StreamHistory {
    pub fn segment(&self, number: u64) -> Option<&SegmentHistory> {
        self.segments.iter().find(|s| s.number == number)
    }

    /// Segments that replaced `number`, with their predecessors.
    pub fn successors(&self, number: u64) -> impl Iterator<Item = &SegmentHistory> {
        self.segments.iter().filter(move |s| s.predecessors.contains(&number))
    }

    /// The segments of the first epoch (where a stream's head starts).
    pub fn first_epoch(&self) -> Vec<&SegmentHistory> {
        let first = self.epochs.first().map_or(0, |e| e.epoch);
        self.segments.iter().filter(|s| s.created_epoch == first).collect()
    }

    /// Appends the next page (epochs right after this one's last).
    pub fn extend(&mut self, page: StreamHistory) {
        self.epochs.extend(page.epochs);
        self.segments.extend(page.segments);
        self.next = page.next;
    }

    /// Sets every segment's `sealed_epoch` from the epochs' segment lists: a segment is
    /// sealed by the first epoch that no longer lists it (a page leaves it unset when the
    /// epoch that sealed it is on a later page).
    pub fn derive_sealed(&mut self) {
        let mut sealed = std::collections::HashMap::new();
        for w in self.epochs.windows(2) {
            let now: std::collections::HashSet<u64> = w[1].segments.iter().copied().collect();
            for n in w[0].segments.iter().filter(|n| !now.contains(n)) {
                sealed.insert(*n, w[1].epoch);
            }
        }
        for s in &mut self.segments {
            s.sealed_epoch = sealed.get(&s.number).copied();
        }
    }
}

/// Last durable event number of one writer on a segment.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WriterState {
    pub writer_id: u128,
    pub event_number: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{CONTROL_BYTES_MAX, LENGTHS_PAGE_MAX, NAME_BYTES_MAX, NAMES_PAGE_MAX};

    /// A full page of the longest stream names with the largest policies stays inside a
    /// control archive.
    #[test]
    fn a_full_page_of_listed_streams_fits_a_control_archive() {
        let listed = ListedStream {
            name: "t".repeat(NAME_BYTES_MAX),
            creating: false,
            sealed: true,
            unreadable: false,
            retention: crate::Retention::Size { min_bytes: u64::MAX, max_bytes: u64::MAX },
            scaling: crate::ScalingPolicy::ByByteRate { kib_per_s: u32::MAX, factor: u32::MAX, min_segments: u32::MAX },
        };
        let page = StreamList { streams: vec![listed.clone(); NAMES_PAGE_MAX as usize], next: listed.name.clone() };
        let bytes = page.to_control_bytes().len();
        assert!(bytes <= CONTROL_BYTES_MAX, "{bytes} bytes for {NAMES_PAGE_MAX} streams");
        assert_eq!(StreamList::from_control_bytes(&page.to_control_bytes()).unwrap(), page);
    }

    /// A full page of the longest segment names (transactions' shadows of the longest scope
    /// and stream names, the largest segment number) stays well inside a control archive.
    #[test]
    fn a_full_page_of_segment_lengths_fits_a_control_archive() {
        let (scope, stream) = ("s".repeat(NAME_BYTES_MAX), "t".repeat(NAME_BYTES_MAX));
        let name = crate::txn::shadow_segment_name(&scope, &stream, u64::MAX, u128::MAX);
        let page = SegmentLengths {
            segments: (0..LENGTHS_PAGE_MAX).map(|_| (name.clone(), u64::MAX)).collect(),
            next: Some(name.clone()),
        };
        let bytes = page.to_control_bytes().len();
        assert!(bytes <= CONTROL_BYTES_MAX / 2, "{bytes} bytes for {} of {} bytes", LENGTHS_PAGE_MAX, name.len());
        assert_eq!(SegmentLengths::from_control_bytes(&page.to_control_bytes()).unwrap(), page);
    }
}
