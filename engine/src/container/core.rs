//! The container as a plain state machine (sans-IO). It validates and orders operations,
//! plans group-commit flushes (which bytes go where in which log file), applies flushed
//! operations to the durable state, serves reads from its cache and file indexes, and
//! rebuilds itself from log file images on recovery. The glommio layer (`container::io`)
//! and the power-loss simulator drive it with real or simulated I/O.
//!
//! Two views of every segment: the *accepted* view (durable plus queued operations) decides
//! offsets, conditional appends and duplicate detection; the *durable* view (only what a
//! completed durable write covers) is what reads, segment info and checkpoints see.
//!
//! Invariants: at most one flush is in flight; flushes complete in order; within a flush
//! the checkpoint (on a file roll) and the batch are separate records, each written and
//! synced before the next is written; blocks below the write position are never rewritten.

use crate::constants::{
    BLOCK_BYTES, CONTROL_RESERVE_BYTES, FILE_HEADER_BYTES, FILE_INDEXES_CACHED_MAX, RECORD_HEADER_BYTES,
};
use crate::container::cache::ReadCache;
use crate::container::index::FileIndex;
use crate::error::EngineError;
use crate::log::checkpoint::{CheckpointState, SegmentCheckpoint};
use crate::log::entry::{APPEND_HEADER_BYTES, LogEntry, decode_entries, decode_entries_prefix};
use crate::log::format::{FileHeader, RecordHeader, RecordKind, RecordLayout, RecordMeta, encode_record, new_tag};
use crate::log::scan::{FileScan, ScanEnd, Skipped, damaged_records, scan_file, scan_past_damage};
use bytes::Bytes;
use sluice_net::event::{skip_events, validate_events};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Sizes and budgets of one container.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub container: u32,
    /// Size of each new log file.
    pub file_bytes: u64,
    pub flush_bytes_max: usize,
    pub cache_bytes_max: usize,
    pub pending_bytes_max: usize,
    /// Budget for the container's log files on disk (`u64::MAX`: none). Only a container
    /// with tier-2 ever frees log files; at the budget, appends fail with `LogFull`.
    pub log_bytes_max: u64,
    /// How the I/O driver prepares new log files (the core itself never looks at it).
    pub prefill: Prefill,
    /// Freed log files the I/O driver keeps to reuse as later ones (0: none; each is a
    /// whole log file on disk beyond the budget). A reused file's blocks are written
    /// already, so durable writes into them need no metadata write (see `Prefill`), without the
    /// cost of zero-filling.
    pub spare_files: usize,
    /// An idempotent writer that has not appended to a segment for this long is forgotten
    /// there when the next log file starts (0: never). Its ids and numbers only serve to
    /// drop resends, which a writer makes only within its retry window (a minute); without
    /// a limit every writer that ever wrote stays in memory and in every checkpoint.
    pub writer_idle_ms: u64,
    /// What recovery does with damaged records in the current log file that have sound ones
    /// after them (acknowledged data was damaged): `false` refuses to start; `true` replays
    /// every sound record, leaving a hole in each segment whose appends were lost (reads
    /// there fail with `DamagedLog`) and reporting what was lost (`ContainerCore::salvaged`).
    pub salvage: bool,
}

/// Keeps the `n` smallest of `v`, in order (a selection, then a sort of those only); true if
/// any were dropped.
pub fn keep_first<T: Ord>(v: &mut Vec<T>, n: usize) -> bool {
    let more = v.len() > n;
    if more {
        v.select_nth_unstable(n);
        v.truncate(n);
    }
    v.sort_unstable();
    more
}

/// How a new log file's blocks are prepared before records go into them.
///
/// A durable (O_DSYNC) write into blocks the file system has allocated but never written
/// ("unwritten extents") also makes the file system record durably that they are written
/// (a journal commit; on ext4 without a journal, a synchronous write of the inode's block),
/// from a kernel worker after the data write: about twice the latency of a small write
/// (BENCHMARKS.md, thirty-fourth session, for the requests one flush makes). Zero-filling the file first avoids that, but
/// costs a write of the whole file: under sustained load the disk then writes every byte
/// twice. Where the file system and device can zero blocks without moving data
/// (`FALLOC_FL_WRITE_ZEROES`), that is used instead and costs neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefill {
    /// Zero-fill the next file while recent flushes are small and the shard writes little
    /// (light load, where latency counts and the disk has time to spare); skip it while
    /// flushes are large or the shard's logs take many bytes a second.
    #[default]
    Auto,
    /// Always zero-fill.
    Always,
    /// Never zero-fill (allocate only).
    Never,
}

impl Prefill {
    /// Mean flush size at and above which `Auto` stops zero-filling.
    pub const AUTO_FLUSH_BYTES: u64 = 128 << 10;
    /// Bytes a second written to a shard's logs at and above which `Auto` stops zero-filling:
    /// zero-filling doubles the bytes the disk writes, and on a busy disk the filling's
    /// writes delay the flushes more than the metadata writes it saves (470k x 1 KB events/s
    /// over 16 segments: ack p99 3.4–7.5 ms without it, 5.2–7.1 ms with; one event in flight,
    /// 20 MB/s of 4 KiB flushes: p50 190–235 µs with it, 245–310 µs without).
    pub const AUTO_RATE_BYTES: u64 = 32 << 20;

    /// Parses `auto`, `always` or `never`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("'{s}' is not a prefill mode; expected auto, always or never")),
        }
    }

    /// Whether to zero-fill the next log file, given the recent mean size of the container's
    /// flushes and the bytes a second its shard recently wrote to its logs.
    pub fn zero_fill(self, mean_flush_bytes: u64, shard_bytes_per_sec: u64) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => mean_flush_bytes < Self::AUTO_FLUSH_BYTES && shard_bytes_per_sec < Self::AUTO_RATE_BYTES,
        }
    }
}

impl CoreConfig {
    /// Container `container` with log files of `file_bytes` and small limits: flushes of at
    /// most 256 KiB, a 1 MiB read cache, 8 MiB queued, a 64 MiB log budget, no prefill, no
    /// spare files, writers never forgotten, no salvage (what the engine's tests start from).
    pub fn small(container: u32, file_bytes: u64) -> Self {
        Self {
            container,
            file_bytes,
            flush_bytes_max: 256 << 10,
            cache_bytes_max: 1 << 20,
            pending_bytes_max: 8 << 20,
            log_bytes_max: 64 << 20,
            prefill: Prefill::Never,
            spare_files: 0,
            writer_idle_ms: 0,
            salvage: false,
        }
    }

    /// Largest append payload a log file of this size can carry next to a checkpoint.
    pub fn append_bytes_max(&self) -> usize {
        append_bytes_max(self.file_bytes)
    }
}

/// The current log file's bytes from the block boundary before the log's end up to it: the
/// records already in the block the next record starts in, which that record's write puts
/// there again (records are packed).
#[derive(Debug)]
struct Tail {
    /// The file and the position they end at (where the next record goes).
    file_seq: u64,
    end: u64,
    bytes: Vec<u8>,
}

impl Tail {
    /// Nothing before `pos` (a block boundary) of file `file_seq`.
    fn empty(file_seq: u64, pos: u64) -> Self {
        Self { file_seq, end: pos, bytes: Vec::new() }
    }

    /// Lays out one write into `buf` (exactly `step.len` bytes): these bytes (which must be
    /// the ones from the step's start up to its record: other bytes there would damage
    /// acknowledged records), the record `encode` writes, then zeros. Then holds the
    /// record's last, partly used block, for the next record.
    fn fill(&mut self, buf: &mut [u8], step: WriteStep, encode: impl FnOnce(&mut [u8])) {
        let head = (step.record_pos - step.pos) as usize;
        let end = head + step.record_len as usize;
        assert_eq!(buf.len() as u64, step.len, "a write step's buffer");
        assert!(
            (self.file_seq, self.end, self.bytes.len()) == (step.file_seq, step.record_pos, head),
            "the log's last block is not known: file {:x} up to {} ({} bytes), writing file {:x} at {}",
            self.file_seq,
            self.end,
            self.bytes.len(),
            step.file_seq,
            step.record_pos
        );
        buf[..head].copy_from_slice(&self.bytes);
        encode(&mut buf[head..end]);
        buf[end..].fill(0);
        self.bytes.clear();
        self.bytes.extend_from_slice(&buf[crate::constants::align_down(end as u64) as usize..end]);
        self.end = step.record_pos + step.record_len;
    }
}

/// A chunk list from its checkpoint form: runs of (start, epoch, len, count).
fn chunk_list(runs: &[(u64, u64, u64, u64)]) -> ChunkList {
    ChunkList::from_runs(runs.iter().map(|&(start, epoch, len, count)| ChunkRun { start, epoch, len, count }))
}

/// Largest append payload a log file of `file_bytes` can carry next to a checkpoint.
pub fn append_bytes_max(file_bytes: u64) -> usize {
    (file_bytes.saturating_sub(FILE_HEADER_BYTES) / 2) as usize
        - RECORD_HEADER_BYTES
        - APPEND_HEADER_BYTES
        - BLOCK_BYTES as usize
}

/// An operation on a segment, by qualified name.
#[derive(Clone, Debug)]
pub enum Request {
    Create {
        name: String,
    },
    Append {
        name: String,
        writer: u128,
        first_event_number: u64,
        event_count: u32,
        expected_offset: Option<u64>,
        data: Bytes,
    },
    Seal {
        name: String,
    },
    Truncate {
        name: String,
        offset: u64,
    },
    Delete {
        name: String,
    },
    /// From the mover only: chunk `(start, epoch)` now durably holds `len` bytes.
    Chunk {
        name: String,
        start: u64,
        epoch: u64,
        len: u64,
    },
    /// From the mover only: the sealed segment's chunks hold all of it and are closed.
    ChunksClosed {
        name: String,
    },
    /// From the mover only: tier-2 holds no unrecorded chunk of this container, and chunks
    /// are recorded before they are created from now on.
    CreationsRecorded,
    /// Reads nothing from and writes nothing to the log: the segment's durable length and
    /// seal, answered at once (so it routes like any other operation, to any shard or node).
    Status {
        name: String,
    },
    /// A committed transaction's shadow segment `source` (of this container) moves into
    /// `name`: `data` (its first `source_length` bytes, reframed as the stream's events by
    /// the caller, see `Container::merge`) is appended and `source` deleted, in one log
    /// entry. `source_length` `None`: the whole of a sealed shadow. A source that is gone
    /// was merged before: `Done`. One whose merge is still on its way to the disk: `Done`
    /// once that is durable.
    Merge {
        name: String,
        source: String,
        source_length: Option<u64>,
        data: Bytes,
    },
    /// Without tier-2: the segment's bytes the log holds, all of them (`offset` up to its
    /// length, as `relocation` named them and a read returned them), copied into the current
    /// log file, so that the older files holding them can be freed. Refused (`BadRequest`)
    /// if the segment changed since (truncated, appended to, deleted): the caller asks again.
    Relocate {
        name: String,
        offset: u64,
        data: Bytes,
    },
}

/// What an operation returns once durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Done,
    Appended {
        offset: u64,
        length: u64,
        last_event_number: u64,
        duplicate: bool,
    },
    /// Answer to `Status`: durable length and seal.
    Status {
        length: u64,
        sealed: bool,
    },
}

/// Outcome of `submit`.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Already settled (for instance a replay of durable events): answer now.
    Ready(OpResult),
    /// Queued: the answer comes from the flush that covers it, in submission order.
    Queued,
}

/// One durable write the I/O layer must perform (O_DSYNC, or a write then fdatasync): whole
/// blocks, the first of which may hold earlier records (written again, unchanged, before the
/// new record: records are packed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteStep {
    pub file_seq: u64,
    /// Where the write starts: the block boundary at or before the record.
    pub pos: u64,
    /// Bytes written: whole blocks, from `pos` to the block boundary at or after the record's end.
    pub len: u64,
    /// Where the record starts, and the bytes it takes (packed: a multiple of 8).
    pub record_pos: u64,
    pub record_len: u64,
}

impl WriteStep {
    /// The write that puts a record of `record_len` bytes at `record_pos` of file `file_seq`.
    fn at(file_seq: u64, record_pos: u64, record_len: u64) -> Self {
        let pos = crate::constants::align_down(record_pos);
        let len = crate::constants::align_up(record_pos + record_len) - pos;
        Self { file_seq, pos, len, record_pos, record_len }
    }
}

/// A planned flush: optionally prepare a new file, write+sync its checkpoint, write+sync the batch.
#[derive(Clone, Debug, Default)]
pub struct FlushPlan {
    /// Create (zero-filled, header written, synced) this new file first.
    pub prepare: Option<u64>,
    pub checkpoint: Option<WriteStep>,
    pub batch: Option<WriteStep>,
    /// Operations this flush settles.
    pub ops: usize,
    /// Idle writers forgotten as this flush starts a new file (see `writer_idle_ms`).
    pub writers_forgotten: usize,
}

/// Where a read met damaged log data, for finding where the segment's data resumes.
#[derive(Clone, Copy, Debug)]
pub enum Damage {
    /// In the record at this file position (it failed its checksums when read).
    Record(u64),
    /// At this segment offset, which the file's index lacks: its scan skipped the damaged
    /// record that held it (and indexed the sound ones after it).
    Missing(u64),
}

/// Where read data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(Bytes),
    /// Read these pieces (file position, length) of log file `file_seq`, in order: one
    /// span of the file (see `FileIndex::locate`), the segment's appends in it. `records`
    /// is the file range of the whole records that hold them: read and checked as one.
    Log {
        file_seq: u64,
        pieces: Vec<(u64, u64)>,
        records: (u64, u64),
    },
    /// The index of this file must be loaded (`insert_file_index`) first.
    NeedIndex {
        file_seq: u64,
    },
    /// Read `len` bytes at `offset` of tier-2 chunk `chunk` (which holds `chunk_len` valid bytes).
    Chunk {
        chunk: String,
        offset: u64,
        len: u64,
        chunk_len: u64,
    },
    /// No durable data at this offset yet.
    Tail,
}

/// Durable segment state, as reads and info see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentStatus {
    pub id: u64,
    pub name: String,
    pub start_offset: u64,
    pub length: u64,
    pub sealed: bool,
    pub writers: Vec<(u128, u64)>,
    /// Bytes below this offset are in tier-2 (and possibly still in the log).
    pub tier2_end: u64,
}

pub use crate::container::chunks::ChunkMeta;
use crate::container::chunks::{ChunkList, ChunkRun};

/// Durable segment data the mover should copy to tier-2: `[from, to)` of `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveTask {
    pub name: String,
    pub from: u64,
    pub to: u64,
    /// The segment's last chunk (the mover extends it when it is its own and has room).
    pub last_chunk: Option<ChunkMeta>,
    pub sealed: bool,
    /// The data sits in a log file older than the current one (it pins that file).
    pub pins_old_file: bool,
}

struct Segment {
    name: String,
    created: bool,
    start_offset: u64,
    length: u64,
    sealed: bool,
    writers: HashMap<u128, u64>,
    /// (first offset with data in the file, file seq), ascending.
    files: Vec<(u64, u64)>,
    tier2_end: u64,
    chunks: ChunkList,
    /// Sealed, and every chunk closed in tier-2 (`LogEntry::ChunksClosed`).
    chunks_closed: bool,
    acc_length: u64,
    acc_start_offset: u64,
    acc_sealed: bool,
    acc_writers: HashMap<u128, u64>,
    /// When each writer last appended (the core's clock, ms); writers restored from a
    /// checkpoint have no entry and count as seen when the clock started.
    writer_seen: HashMap<u128, u64>,
}

impl Segment {
    fn new(name: String) -> Self {
        Self {
            name,
            created: false,
            start_offset: 0,
            length: 0,
            sealed: false,
            writers: HashMap::new(),
            files: Vec::new(),
            tier2_end: 0,
            chunks: ChunkList::default(),
            chunks_closed: false,
            acc_length: 0,
            acc_start_offset: 0,
            acc_sealed: false,
            acc_writers: HashMap::new(),
            writer_seen: HashMap::new(),
        }
    }

    fn sync_accepted(&mut self) {
        self.acc_length = self.length;
        self.acc_start_offset = self.start_offset;
        self.acc_sealed = self.sealed;
        self.acc_writers = self.writers.clone();
    }

    /// First offset the log must still hold for this segment.
    fn log_needed_from(&self) -> u64 {
        self.tier2_end.max(self.start_offset)
    }

    /// The oldest log file this segment still needs and the offset its data there starts
    /// at; `None` when the log holds nothing of it that is needed.
    fn oldest_file_needed(&self) -> Option<(u64, u64)> {
        let from = self.log_needed_from();
        if from >= self.length {
            return None;
        }
        self.file_of(from).or(self.files.first().map(|&(_, f)| f)).map(|f| (f, from))
    }

    /// The log file holding `offset`, if the log holds it.
    fn file_of(&self, offset: u64) -> Option<u64> {
        let i = self.files.partition_point(|&(o, _)| o <= offset);
        i.checked_sub(1).and_then(|i| self.files.get(i)).map(|&(_, f)| f)
    }

    /// The file holding this segment's bytes after those at `offset`.
    fn file_after(&self, offset: u64) -> Option<u64> {
        let i = self.files.partition_point(|&(o, _)| o <= offset);
        self.files.get(i).map(|&(_, f)| f)
    }
}

struct Pending {
    entry: Option<LogEntry>,
    result: OpResult,
}

struct InFlight {
    plan: FlushPlan,
    ops: Vec<Pending>,
    checkpoint: Option<Vec<u8>>,
    checkpoint_lsn: u64,
    batch_lsn: u64,
    payload_len: usize,
    /// The batch record starts a block of its own (the record before it was still being
    /// written when this flush began: no write may touch that record's last block again).
    own_block: bool,
}

/// Most flushes in flight at once: a second may begin while the first is written, and the
/// log's scan knows how to read what a crash leaves of two (see `log::scan`).
pub const FLUSHES_IN_FLIGHT_MAX: usize = 2;

/// Results of a completed flush.
pub struct Completion {
    /// One per settled operation, in submission order.
    pub results: Vec<OpResult>,
    /// Segments whose durable tail, seal or existence changed (wake their readers).
    pub changed: Vec<u64>,
    /// A file that stopped being the current one (its index moved to the cold set).
    pub rolled_from: Option<u64>,
}

/// What recovery found, besides the rebuilt core.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// The current file, if there is one; `None` means a new file must be prepared first.
    pub current_file: Option<u64>,
    /// Torn garbage to clear before any new record is written: (file seq, position, bytes to
    /// write there), whole blocks, with the bytes around the garbage as they are (records
    /// before it, in its first block; a record of a recycled file's earlier use after it,
    /// in its last).
    pub clear_torn: Option<(u64, u64, Vec<u8>)>,
    /// Files after the current one that hold no valid record (unused or torn at creation).
    pub discard_files: Vec<u64>,
    pub records_replayed: u64,
    pub torn_tail_at: Option<u64>,
    /// Salvaging: a file whose header block was damaged, with the header rebuilt for it (from
    /// its name and its opening checkpoint), to write before anything else.
    pub rebuilt_header: Option<FileHeader>,
}

/// What a salvage (recovery past damaged records, `CoreConfig::salvage`) skipped and lost.
#[derive(Debug, Default)]
struct Salvage {
    /// The damaged stretches skipped, per log file, each with what the entries of its
    /// records with intact headers say they held (`ContainerCore::describe_damaged`).
    skipped: Vec<(u64, Skipped, String)>,
    /// Records missing from the LSN chain (a lost checkpoint among them).
    lost_records: u64,
    /// (active file, next file) when the next file's opening checkpoint was damaged.
    lost_checkpoint: Option<(u64, u64)>,
    /// Per segment name, the offset ranges whose appends were lost, in order.
    holes: Vec<(String, u64, u64)>,
    /// Entries for segments the core does not know (created in a lost record).
    unknown_segment: u64,
    /// Appends below a segment's replayed length (their place already taken).
    overlapping: u64,
    /// Whether a record with data lost has been passed (a skipped stretch with a gap in the
    /// LSN chain beyond a lost checkpoint), and the segments with entries after the last one.
    passed_loss: bool,
    seen_after: HashSet<u64>,
}

impl Salvage {
    /// The report's lines; `untraced`: the open segments with no entry after the loss
    /// (appends to them among the lost records leave no trace), by name.
    fn lines(&self, untraced: &[String]) -> Vec<String> {
        let name = crate::log::file_name;
        let mut out: Vec<String> = self
            .skipped
            .iter()
            .map(|(seq, k, held)| {
                format!(
                    "log file {}: damaged records at bytes {}..{} skipped ({}){}",
                    name(*seq),
                    k.at,
                    k.valid_at,
                    k.reason,
                    match held.is_empty() {
                        true => String::new(),
                        false => format!("; by their intact headers they held (unverified): {held}"),
                    }
                )
            })
            .collect();
        let mut lost = self.lost_records;
        if let Some((from, to)) = self.lost_checkpoint {
            lost -= 1;
            out.push(format!(
                "the checkpoint opening log file {} was damaged; the state it held was rebuilt from log file {}",
                name(to),
                name(from)
            ));
        }
        if lost > 0 {
            out.push(format!(
                "{} lost; a segment whose last appends were among them ends before them, without a hole",
                count(lost, "record")
            ));
        }
        for (name, from, to) in &self.holes {
            out.push(format!("{name}: bytes {from}..{to} lost (reads there fail as damaged data)"));
        }
        if self.unknown_segment > 0 {
            out.push(format!(
                "{} for segments created in the lost records dropped (those segments are gone)",
                count(self.unknown_segment, "entry")
            ));
        }
        if self.overlapping > 0 {
            out.push(format!("{} below their segment's replayed length dropped", count(self.overlapping, "append")));
        }
        if !untraced.is_empty() {
            out.push(format!(
                "{} with no entry after the lost records, whose appends among those would leave no trace \
                 (check their writers): {}",
                count(untraced.len() as u64, "open segment"),
                named(untraced)
            ));
        }
        out
    }
}

impl ContainerCore {
    /// What the entries of damaged records say they held, for people (untrusted: the
    /// records fail their checksums): the appended byte ranges per segment, then each other
    /// operation, segments named as this core knows them (at most 20 items).
    fn describe_damaged(&self, entries: &[LogEntry]) -> String {
        let mut created: HashMap<u64, &str> = HashMap::new();
        let mut appends: Vec<(String, u64, u64)> = Vec::new();
        let mut other: Vec<String> = Vec::new();
        for e in entries {
            let name = |id: &u64| match (self.segments.get(id), created.get(id)) {
                (Some(s), _) => s.name.clone(),
                (None, Some(n)) => n.to_string(),
                (None, None) => format!("segment id {id}"),
            };
            let what = match e {
                LogEntry::Create { segment, name } => {
                    created.insert(*segment, name);
                    format!("creation of {name}")
                }
                LogEntry::Append { segment, offset, data, .. } | LogEntry::Merge { segment, offset, data, .. } => {
                    let (n, end) = (name(segment), offset + data.len() as u64);
                    match appends.iter_mut().find(|(m, _, to)| *m == n && to == offset) {
                        Some(run) => run.2 = end,
                        None => appends.push((n, *offset, end)),
                    }
                    continue;
                }
                LogEntry::Seal { segment } => format!("seal of {}", name(segment)),
                LogEntry::Truncate { segment, offset } => format!("truncation of {} at {offset}", name(segment)),
                LogEntry::Delete { segment } => format!("deletion of {}", name(segment)),
                LogEntry::Chunk { segment, .. } | LogEntry::ChunksClosed { segment } => {
                    format!("tier-2 bookkeeping of {}", name(segment))
                }
                LogEntry::Relocate { segment, .. } => format!("a copy of {}'s older bytes", name(segment)),
                LogEntry::CreationsRecorded => continue,
            };
            if !other.contains(&what) {
                other.push(what);
            }
        }
        let parts: Vec<String> =
            appends.into_iter().map(|(n, from, to)| format!("{n} bytes {from}..{to}")).chain(other).collect();
        named(&parts)
    }
}

/// Items of a report line: the first 20, comma-separated, and how many more.
pub(crate) fn named(items: &[String]) -> String {
    const NAMED: usize = 20;
    let listed = items[..items.len().min(NAMED)].join(", ");
    match items.len().saturating_sub(NAMED) {
        0 => listed,
        more => format!("{listed} and {more} more"),
    }
}

/// `1 record`, `2 records`, `3 entries`: a count with its noun.
fn count(n: u64, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// A recovery failure, before it is tied to a path.
#[derive(Debug)]
pub enum RecoverFault {
    Corrupt { file_seq: u64, at: u64, valid_at: u64 },
    Invalid { file_seq: u64, reason: String },
}

pub struct ContainerCore {
    cfg: CoreConfig,
    epoch: u64,
    next_lsn: u64,
    file_seq: u64,
    /// False until the first file is prepared.
    has_file: bool,
    file_pos: u64,
    /// The records already in the block the next record starts in (see `Tail`).
    tail: Tail,
    current_file_bytes: u64,
    /// The current file's record tag (`FileHeader::tag`): every record written into it
    /// carries it.
    file_tag: u64,
    /// The record tags chosen for files not yet current, by sequence number: what the I/O
    /// layer writes into a file's header when it prepares it (`tag_for_file`) and the file's
    /// records carry, whatever other file is prepared meanwhile.
    future_tags: BTreeMap<u64, u64>,
    segments: HashMap<u64, Segment>,
    by_name: HashMap<String, u64>,
    next_segment_id: u64,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Flushes begun and not yet durable, oldest first (at most `FLUSHES_IN_FLIGHT_MAX`).
    in_flight: VecDeque<InFlight>,
    poisoned: Option<String>,
    /// The disk is full (why, as the I/O layer saw it): the next log file could not be
    /// created. Requests that add data are refused with `NoSpace` until one can be.
    no_space: Option<String>,
    /// Stopped on purpose (moved to another node, or fenced): requests get `NotOwner`.
    stopped: bool,
    cache: ReadCache,
    current_index: FileIndex,
    cold_indexes: VecDeque<(u64, FileIndex)>,
    /// Lowest log file sequence still on disk.
    oldest_file: u64,
    /// Forgotten log files still on disk while they are freed in steps: they count against
    /// the log's budget until they are gone.
    files_freeing: u64,
    /// Tier-2 chunks no segment refers to any more (truncated or deleted), to delete.
    garbage: Vec<String>,
    /// Every tier-2 chunk of the container is named by its metadata and chunks are recorded
    /// before they are created (`LogEntry::CreationsRecorded`; true from the start for a
    /// container this build created).
    creations_recorded: bool,
    /// What recovery salvaged past damaged records and lost, one line each (empty: nothing;
    /// see `CoreConfig::salvage`).
    salvaged: Vec<String>,
    /// Open segments with no entry after records that recovery's salvage lost: a seal among
    /// those records would have left them open (see `untraced_after_salvage`).
    untraced: Vec<String>,
    /// Recovery's salvage lost records holding data (see `lost_in_salvage`).
    salvage_lost: bool,
    /// Shadow segments whose merge is accepted but not yet durable.
    merging: HashSet<String>,
    /// The time (ms on a monotonic clock) as last told by the I/O driver (`set_now_ms`), and
    /// when it was first told: the clock of writer idleness.
    now_ms: u64,
    clock_started_ms: Option<u64>,
}

impl ContainerCore {
    /// A container with no log file yet; `begin_flush` will prepare file `first_file_seq`.
    pub fn new(cfg: CoreConfig, epoch: u64, first_file_seq: u64) -> Self {
        let cache = ReadCache::new(cfg.cache_bytes_max);
        Self {
            epoch,
            next_lsn: 1,
            file_seq: first_file_seq,
            has_file: false,
            file_pos: u64::MAX,
            tail: Tail::empty(u64::MAX, u64::MAX),
            current_file_bytes: cfg.file_bytes,
            file_tag: 0,
            future_tags: BTreeMap::new(),
            segments: HashMap::new(),
            by_name: HashMap::new(),
            next_segment_id: 1,
            pending: VecDeque::new(),
            pending_bytes: 0,
            in_flight: VecDeque::new(),
            poisoned: None,
            no_space: None,
            stopped: false,
            cache,
            current_index: FileIndex::default(),
            cold_indexes: VecDeque::new(),
            oldest_file: first_file_seq,
            files_freeing: 0,
            garbage: Vec::new(),
            creations_recorded: true,
            salvaged: Vec::new(),
            untraced: Vec::new(),
            salvage_lost: false,
            merging: HashSet::new(),
            now_ms: 0,
            clock_started_ms: None,
            cfg,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The time in ms, for writer idleness: any clock that never steps (the I/O driver's is
    /// monotonic; the times are compared with each other only, and never stored). Without
    /// it no writer is forgotten.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.clock_started_ms.get_or_insert(now_ms);
    }

    /// Whether tier-2 can hold chunks the metadata does not name (see `creations_recorded`).
    pub fn creations_recorded(&self) -> bool {
        self.creations_recorded
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The LSN of the newest durable record (0: none yet).
    pub fn durable_lsn(&self) -> u64 {
        self.in_flight.front().map_or(self.next_lsn, |f| f.checkpoint_lsn) - 1
    }

    pub fn current_file(&self) -> u64 {
        self.file_seq
    }

    /// Takes no more records into the current log file: the next flush rolls into a new
    /// one. For a recovered file whose remaining blocks cannot be allocated (made by an
    /// older build that ignored a failed `fallocate`, on a now full disk): a write into its
    /// unallocated part would fail and poison the container, a roll that finds no room only
    /// holds writes back (`NoSpace`) until space is freed.
    pub fn close_current_file(&mut self) {
        if self.has_file {
            self.current_file_bytes = self.current_file_bytes.min(self.file_pos);
        }
    }

    /// Marks the disk full (`Some(why)`) or no longer full (`None`).
    pub fn set_no_space(&mut self, why: Option<String>) {
        self.no_space = why;
    }

    fn no_space_error(&self) -> Result<(), EngineError> {
        self.no_space_refusal().map_or(Ok(()), Err)
    }

    /// The error writes get while the disk is full.
    pub fn no_space_refusal(&self) -> Option<EngineError> {
        self.no_space.as_ref().map(|why| {
            EngineError::NoSpace(format!(
                "container {}: {why}; writes resume once the file system has room for a {}-byte log file",
                self.cfg.container, self.cfg.file_bytes
            ))
        })
    }

    /// Drops every queued operation (none may be in flight) and undoes what accepting them
    /// changed, so that each can be refused and sent again: the next flush cannot be
    /// written (a full disk). Returns how many were dropped; their waiters are the
    /// caller's to answer. Nothing durable is touched.
    pub fn refuse_pending(&mut self) -> usize {
        assert!(self.in_flight.is_empty(), "queued operations are refused between flushes");
        let ops: Vec<Pending> = self.pending.drain(..).collect();
        self.pending_bytes = 0;
        for p in ops.iter().rev() {
            match &p.entry {
                Some(LogEntry::Create { segment, name }) if self.segments.get(segment).is_some_and(|s| !s.created) => {
                    self.segments.remove(segment);
                    if self.by_name.get(name) == Some(segment) {
                        self.by_name.remove(name);
                    }
                }
                Some(LogEntry::Delete { segment }) => {
                    if let Some(s) = self.segments.get(segment) {
                        self.by_name.insert(s.name.clone(), *segment);
                    }
                }
                Some(LogEntry::Merge { source, .. }) => {
                    if let Some(s) = self.segments.get(source) {
                        self.merging.remove(&s.name);
                        self.by_name.insert(s.name.clone(), *source);
                    }
                }
                _ => {}
            }
        }
        for s in self.segments.values_mut() {
            s.sync_accepted();
        }
        ops.len()
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Why the container stopped on an error, if it did (not when it was closed or handed
    /// off: then it is simply no longer here).
    pub fn poison_reason(&self) -> Option<&str> {
        self.poisoned.as_deref().filter(|_| !self.stopped)
    }

    /// What recovery lost to damaged records it went past, and the tier-2 mover skipped,
    /// one line each (empty: nothing).
    pub fn salvaged(&self) -> &[String] {
        &self.salvaged
    }

    /// Open segments with no entry after the records recovery's salvage lost, by name
    /// (empty: none lost). A seal among the lost records left such a segment open again; the
    /// node asks the controller which of them it has sealed and seals those again.
    pub fn untraced_after_salvage(&self) -> &[String] {
        &self.untraced
    }

    /// Whether recovery's salvage lost records that held operations: a segment's creation may
    /// have been among them, the segment then missing here though its stream has it.
    pub fn lost_in_salvage(&self) -> bool {
        self.salvage_lost
    }

    /// Adds a line to what was salvaged past (the mover skipping damaged data).
    pub fn note_salvaged(&mut self, line: String) {
        self.salvaged.push(line);
    }

    /// Bytes of the log files on disk, each counted whole.
    pub fn log_bytes(&self) -> u64 {
        self.live_files() * self.cfg.file_bytes
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Bytes of log entries queued for the next flush.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    pub fn segment_count(&self) -> usize {
        self.segments.values().filter(|s| s.created).count()
    }

    pub(crate) fn poisoned_error(&self) -> Option<EngineError> {
        self.poisoned.as_ref().map(|r| {
            if self.stopped {
                EngineError::NotOwner { container: self.cfg.container, reason: r.clone() }
            } else {
                EngineError::Poisoned { container: self.cfg.container, reason: r.clone() }
            }
        })
    }

    fn lookup(&self, name: &str) -> Result<u64, EngineError> {
        self.by_name.get(name).copied().ok_or_else(|| EngineError::NoSuchSegment(name.to_string()))
    }

    fn queue(&mut self, entry: Option<LogEntry>, result: OpResult) -> Submitted {
        self.pending_bytes += entry.as_ref().map_or(0, LogEntry::encoded_len);
        self.pending.push_back(Pending { entry, result });
        Submitted::Queued
    }

    /// Validates an operation against the accepted state and queues it.
    pub fn submit(&mut self, req: Request) -> Result<Submitted, EngineError> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        match req {
            Request::Create { name } => {
                if name.is_empty() || name.len() > u16::MAX as usize {
                    return Err(EngineError::BadRequest(format!("invalid segment name length {}", name.len())));
                }
                self.no_space_error()?;
                if let Some(id) = self.by_name.get(&name) {
                    if self.segments[id].created {
                        return Err(EngineError::SegmentExists(name));
                    }
                    // Another create of this name is on its way to the disk: answer when it is
                    // durable, so no caller sees the segment before it exists.
                    return Ok(self.queue(None, OpResult::Done));
                }
                let id = self.next_segment_id;
                self.next_segment_id += 1;
                self.by_name.insert(name.clone(), id);
                self.segments.insert(id, Segment::new(name.clone()));
                Ok(self.queue(Some(LogEntry::Create { segment: id, name }), OpResult::Done))
            }
            Request::Append { name, writer, first_event_number, event_count, expected_offset, data } => {
                self.submit_append(name, writer, first_event_number, event_count, expected_offset, data)
            }
            Request::Status { name } => {
                let s = self.status(&name)?;
                Ok(Submitted::Ready(OpResult::Status { length: s.length, sealed: s.sealed }))
            }
            Request::Seal { name } => {
                let id = self.lookup(&name)?;
                let s = self.segments.get_mut(&id).expect("named segment exists");
                if s.sealed {
                    return Ok(Submitted::Ready(OpResult::Done));
                }
                if s.acc_sealed {
                    return Ok(self.queue(None, OpResult::Done));
                }
                s.acc_sealed = true;
                Ok(self.queue(Some(LogEntry::Seal { segment: id }), OpResult::Done))
            }
            Request::Truncate { name, offset } => {
                let id = self.lookup(&name)?;
                let s = self.segments.get_mut(&id).expect("named segment exists");
                if offset > s.acc_length {
                    return Err(EngineError::BadRequest(format!(
                        "cannot truncate {name} at {offset}: beyond its length {}",
                        s.acc_length
                    )));
                }
                if offset <= s.acc_start_offset {
                    return Ok(self.queue(None, OpResult::Done));
                }
                s.acc_start_offset = offset;
                Ok(self.queue(Some(LogEntry::Truncate { segment: id, offset }), OpResult::Done))
            }
            Request::Delete { name } => {
                let id = self.lookup(&name)?;
                self.by_name.remove(&name);
                Ok(self.queue(Some(LogEntry::Delete { segment: id }), OpResult::Done))
            }
            Request::Merge { name, source, source_length, data } => {
                self.submit_merge(name, source, source_length, data)
            }
            Request::Chunk { name, start, epoch, len } => {
                let id = self.lookup(&name)?;
                let s = &self.segments[&id];
                if start + len > s.length {
                    return Err(EngineError::BadRequest(format!(
                        "chunk of {name} at {start} with {len} bytes reaches beyond its durable length {}",
                        s.length
                    )));
                }
                // A truncation accepted since the mover read the segment: a chunk wholly
                // below the new start would come back after it (a truncation drops such
                // chunks); only the chunk starting right at it is still to be written.
                if start + len <= s.acc_start_offset && !(len == 0 && start == s.acc_start_offset) {
                    return Err(EngineError::Truncated { segment: name, offset: start, start: s.acc_start_offset });
                }
                Ok(self.queue(Some(LogEntry::Chunk { segment: id, start, epoch, len }), OpResult::Done))
            }
            Request::ChunksClosed { name } => {
                let id = self.lookup(&name)?;
                let s = &self.segments[&id];
                let all_in_chunks = s.chunks.last().is_some_and(|c| c.start + c.len >= s.length);
                let all_truncated = s.chunks.is_empty() && s.start_offset >= s.length;
                if !s.sealed || !(all_in_chunks || all_truncated) {
                    return Err(EngineError::BadRequest(format!(
                        "{name} is not sealed with all its {} bytes in tier-2 chunks (or truncated)",
                        s.length
                    )));
                }
                Ok(self.queue(Some(LogEntry::ChunksClosed { segment: id }), OpResult::Done))
            }
            Request::CreationsRecorded => Ok(self.queue(Some(LogEntry::CreationsRecorded), OpResult::Done)),
            Request::Relocate { name, offset, data } => {
                let id = self.lookup(&name)?;
                let s = &self.segments[&id];
                let end = offset + data.len() as u64;
                let unchanged = s.acc_start_offset == s.start_offset && s.acc_length == s.length;
                if !unchanged || offset != s.log_needed_from() || end != s.length || data.is_empty() {
                    return Err(EngineError::BadRequest(format!(
                        "relocation of {name} bytes {offset}..{end}: the log holds {}..{} of it now",
                        s.log_needed_from(),
                        s.length
                    )));
                }
                self.no_space_error()?;
                Ok(self.queue(Some(LogEntry::Relocate { segment: id, offset, data }), OpResult::Done))
            }
        }
    }

    fn submit_append(
        &mut self,
        name: String,
        writer: u128,
        first: u64,
        count: u32,
        expected_offset: Option<u64>,
        mut data: Bytes,
    ) -> Result<Submitted, EngineError> {
        let id = self.lookup(&name)?;
        let max = self.cfg.append_bytes_max();
        let s = self.segments.get(&id).expect("named segment exists");
        // A resent append that was accepted before the seal is a duplicate, not a refusal:
        // the writer must not send those events to the successors as well.
        let replayed = writer != 0
            && s.acc_writers.get(&writer).is_some_and(|&a| first.saturating_add(u64::from(count.max(1)) - 1) <= a);
        if s.acc_sealed && !replayed {
            return Err(EngineError::Sealed(name));
        }
        if data.len() > max {
            return Err(EngineError::TooLarge(format!("append of {} bytes exceeds the {max}-byte limit", data.len())));
        }
        // A commit moves a shadow segment into the stream in one append.
        let txn_max = sluice_net::txn::TXN_SEGMENT_BYTES_MAX.min(max as u64);
        if s.acc_length + data.len() as u64 > txn_max && !replayed && sluice_net::txn::is_shadow_segment(&name) {
            return Err(EngineError::TooLarge(format!(
                "a transaction holds at most {txn_max} bytes per segment here ({name} has {}, this append {})",
                s.acc_length,
                data.len()
            )));
        }
        if count > 0 {
            validate_events(&data, u64::from(count))
                .map_err(|e| EngineError::BadRequest(format!("append to {name}: {e}")))?;
        }
        let units = u64::from(count.max(1));
        let mut last = 0;
        if writer != 0 {
            last = first
                .checked_add(units - 1)
                .ok_or_else(|| EngineError::InvalidEventNumber("event number overflow".into()))?;
            if let Some(&accepted) = s.acc_writers.get(&writer) {
                if last <= accepted {
                    let result = OpResult::Appended {
                        offset: 0,
                        length: s.acc_length,
                        last_event_number: last,
                        duplicate: true,
                    };
                    return Ok(if s.writers.get(&writer).is_some_and(|&d| d >= last) {
                        Submitted::Ready(result)
                    } else {
                        // The original is queued or in flight: answer once it is durable.
                        self.queue(None, result)
                    });
                }
                if first <= accepted {
                    if count == 0 {
                        return Err(EngineError::InvalidEventNumber(format!(
                            "raw append numbered {first}..={last} overlaps accepted number {accepted}"
                        )));
                    }
                    let skip = accepted - first + 1;
                    let at = skip_events(&data, skip).map_err(|e| EngineError::BadRequest(e.to_string()))?;
                    data = data.slice(at..);
                }
            }
        }
        if let Some(expected) = expected_offset
            && expected != s.acc_length
        {
            return Err(EngineError::ConditionalCheckFailed { segment: name, expected, actual: s.acc_length });
        }
        self.admit(data.len())?;
        let s = self.segments.get_mut(&id).expect("named segment exists");
        let offset = s.acc_length;
        s.acc_length += data.len() as u64;
        if writer != 0 {
            s.acc_writers.insert(writer, last);
        }
        let result = OpResult::Appended { offset, length: s.acc_length, last_event_number: last, duplicate: false };
        Ok(self.queue(Some(LogEntry::Append { segment: id, offset, writer, last_event_number: last, data }), result))
    }

    /// Forgets writers idle for `writer_idle_ms` (none with an append on its way). Runs as a
    /// new log file starts, so its checkpoint, and any recovery from it, no longer names
    /// them. Returns how many entries went.
    fn forget_idle_writers(&mut self) -> usize {
        let idle = self.cfg.writer_idle_ms;
        let (Some(started), Some(cutoff)) = (self.clock_started_ms, self.now_ms.checked_sub(idle)) else { return 0 };
        if idle == 0 {
            return 0;
        }
        let mut forgotten = 0;
        for s in self.segments.values_mut() {
            let Segment { writers, acc_writers, writer_seen, .. } = s;
            let idle: Vec<u128> = writers
                .iter()
                .filter(|&(w, last)| {
                    writer_seen.get(w).map_or(started, |&seen| seen.max(started)) <= cutoff
                        && acc_writers.get(w) == Some(last)
                })
                .map(|(&w, _)| w)
                .collect();
            for w in &idle {
                writers.remove(w);
                acc_writers.remove(w);
                writer_seen.remove(w);
            }
            forgotten += idle.len();
        }
        forgotten
    }

    /// Room for `len` more bytes of data: in the log's budget and in the queue.
    fn admit(&self, len: usize) -> Result<(), EngineError> {
        self.no_space_error()?;
        if self.cfg.log_bytes_max != u64::MAX {
            // Files on disk (counted whole) plus everything queued must leave a file of room
            // for the next roll; beyond that the log waits for tier-2 to free files.
            let live = self.live_files();
            // Queued bytes may waste up to a quarter of each file they roll into.
            let queued = (self.pending_bytes + len) as u64;
            let need = live * self.cfg.file_bytes + queued + queued / 3;
            if need + self.cfg.file_bytes > self.cfg.log_bytes_max {
                return Err(EngineError::LogFull(format!(
                    "container {}: the log holds {live} files ({} bytes budget) of data not yet moved to tier-2",
                    self.cfg.container, self.cfg.log_bytes_max
                )));
            }
        }
        if self.pending_bytes + len > self.cfg.pending_bytes_max && !self.pending.is_empty() {
            return Err(EngineError::Overloaded(format!(
                "container {} has {} bytes waiting for the disk",
                self.cfg.container, self.pending_bytes
            )));
        }
        Ok(())
    }

    /// How many bytes of shadow `source` a merge takes: `Ok(None)` when there is nothing
    /// to read (merged, or its merge on its way: `submit` answers those).
    pub fn merge_source_length(&self, source: &str, source_length: Option<u64>) -> Result<Option<u64>, EngineError> {
        if self.merging.contains(source) {
            return Ok(None);
        }
        let Some(id) = self.by_name.get(source) else { return Ok(None) };
        let s = &self.segments[id];
        if !sluice_net::txn::is_shadow_segment(source) {
            return Err(EngineError::BadRequest(format!("{source} is not a transaction's shadow segment")));
        }
        match source_length {
            Some(len) if len > s.length => Err(EngineError::BadRequest(format!(
                "{source} holds {} durable bytes, the merge names {len}",
                s.length
            ))),
            Some(len) => Ok(Some(len)),
            None if s.sealed => Ok(Some(s.length)),
            None => Err(EngineError::BadRequest(format!("{source} is not sealed: name the bytes to merge"))),
        }
    }

    fn submit_merge(
        &mut self,
        name: String,
        source: String,
        source_length: Option<u64>,
        data: Bytes,
    ) -> Result<Submitted, EngineError> {
        if self.merging.contains(&source) {
            return Ok(self.queue(None, OpResult::Done));
        }
        let Some(&src) = self.by_name.get(&source) else { return Ok(Submitted::Ready(OpResult::Done)) };
        // Still what the caller read: a shadow, holding the named bytes (or sealed).
        self.merge_source_length(&source, source_length)?;
        let id = self.lookup(&name)?;
        let s = &self.segments[&id];
        if s.acc_sealed {
            return Err(EngineError::Sealed(name));
        }
        if sluice_net::txn::is_shadow_segment(&name) {
            return Err(EngineError::BadRequest(format!("cannot merge into the shadow segment {name}")));
        }
        let max = self.cfg.append_bytes_max();
        if data.len() > max {
            return Err(EngineError::TooLarge(format!("merge of {} bytes exceeds the {max}-byte limit", data.len())));
        }
        self.admit(data.len())?;
        let s = self.segments.get_mut(&id).expect("named segment exists");
        let offset = s.acc_length;
        s.acc_length += data.len() as u64;
        let result = OpResult::Appended { offset, length: s.acc_length, last_event_number: 0, duplicate: false };
        self.by_name.remove(&source);
        self.merging.insert(source);
        Ok(self.queue(Some(LogEntry::Merge { segment: id, offset, source: src, data }), result))
    }

    fn checkpoint_state(&self) -> CheckpointState {
        let mut segments: Vec<SegmentCheckpoint> = self
            .segments
            .iter()
            .filter(|(_, s)| s.created)
            .map(|(&id, s)| SegmentCheckpoint {
                id,
                name: s.name.clone(),
                start_offset: s.start_offset,
                length: s.length,
                sealed: s.sealed,
                writers: s.writers.iter().map(|(&w, &n)| (w, n)).collect(),
                files: s.files.clone(),
                tier2_end: s.tier2_end,
                chunks: s.chunks.runs().iter().map(|r| (r.start, r.epoch, r.len, r.count)).collect(),
                chunks_closed: s.chunks_closed,
            })
            .collect();
        segments.sort_by_key(|s| s.id);
        CheckpointState {
            container: self.cfg.container,
            epoch: self.epoch,
            next_segment_id: self.next_segment_id,
            segments,
            garbage: self.garbage.clone(),
            creations_recorded: self.creations_recorded,
        }
    }

    /// The container's state for a hand-off through tier-2: the checkpoint without log file
    /// references (the next owner has none of this node's log).
    pub fn handoff_state(&self) -> CheckpointState {
        let mut ck = self.checkpoint_state();
        for s in &mut ck.segments {
            s.files.clear();
        }
        ck
    }

    /// A container taking over a hand-off: every segment's data is in tier-2 (anything the
    /// hand-off says is beyond tier-2 is cut off, and reported). It writes with `epoch`,
    /// and prepares log file 0 on its first flush.
    pub fn from_handoff(cfg: CoreConfig, ck: CheckpointState, epoch: u64) -> (Self, Vec<(String, u64, u64)>) {
        let mut core = Self::new(cfg, epoch, 0);
        core.next_segment_id = ck.next_segment_id;
        core.garbage = ck.garbage;
        core.creations_recorded = ck.creations_recorded;
        let mut cut = Vec::new();
        for sc in ck.segments {
            let mut s = Segment::new(sc.name.clone());
            s.created = true;
            s.start_offset = sc.start_offset;
            s.length = sc.length.min(sc.tier2_end.max(sc.start_offset));
            if s.length < sc.length {
                cut.push((sc.name.clone(), s.length, sc.length));
            }
            s.sealed = sc.sealed;
            s.writers = sc.writers.into_iter().collect();
            s.tier2_end = sc.tier2_end.min(s.length);
            s.chunks = chunk_list(&sc.chunks);
            s.chunks_closed = sc.chunks_closed;
            s.sync_accepted();
            core.by_name.insert(sc.name, sc.id);
            core.segments.insert(sc.id, s);
        }
        (core, cut)
    }

    /// Moves the container to a newer epoch (a new ownership term). Never backwards.
    pub fn set_epoch(&mut self, epoch: u64) {
        assert!(epoch >= self.epoch, "container epochs never go back ({} -> {epoch})", self.epoch);
        self.epoch = epoch;
    }

    /// Every byte of every segment is in tier-2 (or truncated away).
    pub fn all_in_tier2(&self) -> bool {
        self.segments.values().filter(|s| s.created).all(|s| s.log_needed_from() >= s.length)
    }

    /// Stops the container for good (it moved to another node or was fenced): every later
    /// request fails with `reason`. Only when no flush is in flight; returns how many queued
    /// operations the caller must fail.
    pub fn stop(&mut self, reason: String) -> usize {
        assert!(self.in_flight.is_empty(), "a container stops between flushes");
        self.stopped = true;
        self.fail_with(reason, Vec::new())
    }

    /// The error every request gets now (poisoned or stopped), if any.
    pub fn refusal(&self) -> Option<EngineError> {
        self.poisoned_error()
    }

    /// How many queued operations the next flush takes, and their payload bytes: in order,
    /// at least one, then as many as fit the flush size cap.
    fn next_batch(&self) -> (usize, usize, bool) {
        let (mut count, mut payload_len, mut data) = (0, 0usize, false);
        for p in &self.pending {
            let len = p.entry.as_ref().map_or(0, LogEntry::encoded_len);
            if count > 0 && payload_len + len > self.cfg.flush_bytes_max {
                break;
            }
            payload_len += len;
            count += 1;
            data |= p.entry.as_ref().is_some_and(|e| {
                matches!(
                    e,
                    LogEntry::Create { .. }
                        | LogEntry::Append { .. }
                        | LogEntry::Merge { .. }
                        | LogEntry::Relocate { .. }
                )
            });
        }
        (count, payload_len, data)
    }

    /// Whether a record of `payload_len` fits the current file; one that adds data (`data`)
    /// must leave the control reserve free (`CONTROL_RESERVE_BYTES`).
    fn fits_current_file(&self, payload_len: usize, data: bool) -> bool {
        self.fits_current_file_at(self.file_pos, payload_len, data)
    }

    /// Whether a record of `payload_len` at `pos` fits the current file (see `fits_current_file`).
    fn fits_current_file_at(&self, pos: u64, payload_len: usize, data: bool) -> bool {
        let reserve = if data { CONTROL_RESERVE_BYTES.min(self.cfg.file_bytes / 16) } else { 0 };
        let rec_len = RecordHeader::packed_len(payload_len);
        pos.checked_add(rec_len + reserve).is_some_and(|end| end <= self.current_file_bytes)
    }

    /// Where the record of a flush begun now goes, and whether it starts a block of its own:
    /// right after the log's end, or, while a record is being written, at the block boundary
    /// after that record (its last block is not written again before it is durable).
    fn next_record_pos(&self) -> (u64, bool) {
        match self.in_flight.iter().rev().find_map(|f| f.plan.batch) {
            Some(step) => (crate::constants::align_up(step.record_pos + step.record_len), true),
            None => (self.file_pos, false),
        }
    }

    /// Whether a flush may begin now although another is in flight: operations are queued,
    /// fewer than `FLUSHES_IN_FLIGHT_MAX` flushes are in flight, none of them rolls into a new
    /// file, and the next batch fits the current file after the records being written (a
    /// roll waits until nothing is in flight).
    pub fn can_begin_another(&self) -> bool {
        if self.pending.is_empty()
            || self.in_flight.len() >= FLUSHES_IN_FLIGHT_MAX
            || self.in_flight.iter().any(|f| f.plan.prepare.is_some())
            || !self.has_file
        {
            return false;
        }
        let (_, payload_len, data) = self.next_batch();
        payload_len == 0 || self.fits_current_file_at(self.next_record_pos().0, payload_len, data)
    }

    /// The log file the next flush must roll into (the current one has no room for it, or
    /// there is none yet), if any: the I/O layer has it ready before `begin_flush`, so a
    /// file that cannot be created (a full disk) holds the flush back instead of failing it.
    pub fn next_flush_file(&self) -> Option<u64> {
        // Everything queued fits (the common case, no walk over the queue); else the batch.
        if self.pending_bytes == 0 || self.fits_current_file(self.pending_bytes, true) {
            return None;
        }
        let (_, payload_len, data) = self.next_batch();
        if payload_len == 0 || self.fits_current_file(payload_len, data) {
            return None;
        }
        Some(self.next_file_seq())
    }

    /// The record tag of log file `seq`, the current one or a later one (chosen at random
    /// once for it, kept until the file is rolled into): the I/O layer writes it into the
    /// header of the file it prepares, and every record written into the file carries it.
    /// (A roll that fills more than half of its new file prepares the next file before it
    /// completes: the tag chosen for one file must outlive the choice of the next one's.)
    pub fn tag_for_file(&mut self, seq: u64) -> u64 {
        if self.has_file && seq == self.file_seq {
            return self.file_tag;
        }
        *self.future_tags.entry(seq).or_insert_with(new_tag)
    }

    /// The sequence number of the log file the next roll creates.
    pub fn next_file_seq(&self) -> u64 {
        if self.has_file { self.file_seq + 1 } else { self.file_seq }
    }

    /// Takes queued operations into a flush. `None` when nothing is queued. With a flush in
    /// flight, only when `can_begin_another` (the I/O layer writes both at once and
    /// completes them in order). An error poisons the container (the caller fails everything).
    pub fn begin_flush(&mut self) -> Result<Option<FlushPlan>, String> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        assert!(self.in_flight.is_empty() || self.can_begin_another(), "a flush begun beside another must fit");
        let (record_pos, own_block) = self.next_record_pos();
        let (count, payload_len, data) = self.next_batch();
        let ops: Vec<_> = self.pending.drain(..count).collect();
        self.pending_bytes -= payload_len;
        let mut plan = FlushPlan { ops: ops.len(), ..FlushPlan::default() };
        let mut checkpoint = None;
        let (checkpoint_lsn, mut batch_lsn) = (self.next_lsn, self.next_lsn);
        if payload_len > 0 {
            let rec_len = RecordHeader::packed_len(payload_len);
            let (seq, pos) = if self.fits_current_file_at(record_pos, payload_len, data) {
                (self.file_seq, record_pos)
            } else {
                let seq = self.next_file_seq();
                plan.writers_forgotten = self.forget_idle_writers();
                let ck = self.checkpoint_state().encode();
                let ck_len = RecordHeader::packed_len(ck.len());
                let pos = FILE_HEADER_BYTES + ck_len;
                if pos + rec_len > self.cfg.file_bytes {
                    let reason = format!(
                        "checkpoint of {} bytes plus a batch of {} bytes do not fit a {}-byte log file; raise the log file size",
                        ck.len(),
                        payload_len,
                        self.cfg.file_bytes
                    );
                    self.fail_with(reason.clone(), ops);
                    return Err(reason);
                }
                plan.prepare = Some(seq);
                plan.checkpoint = Some(WriteStep::at(seq, FILE_HEADER_BYTES, ck_len));
                checkpoint = Some(ck);
                batch_lsn += 1;
                (seq, pos)
            };
            plan.batch = Some(WriteStep::at(seq, pos, rec_len));
            self.next_lsn = batch_lsn + 1;
        }
        // A roll starts a new file: its batch follows the checkpoint there.
        let own_block = own_block && plan.prepare.is_none();
        self.in_flight.push_back(InFlight {
            plan: plan.clone(),
            ops,
            checkpoint,
            checkpoint_lsn,
            batch_lsn,
            payload_len,
            own_block,
        });
        Ok(Some(plan))
    }

    /// Fills `buf` (exactly the newest in-flight checkpoint step's length) with what its write
    /// puts on disk: the checkpoint record (it opens a file: nothing before it), then zeros.
    /// Flushes are encoded in the order they begin.
    pub fn encode_checkpoint(&mut self, buf: &mut [u8]) {
        let f = self.in_flight.back().expect("a flush in flight");
        let (step, lsn) = (f.plan.checkpoint.expect("the flush rolls"), f.checkpoint_lsn);
        let tag = self.tag_for_file(step.file_seq);
        let meta =
            RecordMeta { layout: RecordLayout::Packed, kind: RecordKind::Checkpoint, epoch: self.epoch, lsn, tag };
        let ck = self.in_flight.back().and_then(|f| f.checkpoint.as_ref()).expect("the flush rolls");
        self.tail = Tail::empty(step.file_seq, step.pos);
        self.tail.fill(buf, step, |rec| encode_record(rec, meta, ck.len(), |p| p.copy_from_slice(ck)));
    }

    /// Fills `buf` (exactly the newest in-flight batch step's length) with what its write puts
    /// on disk: the records already in its first block (none when the record starts a block
    /// of its own), the batch record, then zeros. Flushes are encoded in the order they begin.
    pub fn encode_batch(&mut self, buf: &mut [u8]) {
        let f = self.in_flight.back().expect("a flush in flight");
        let (step, lsn, own_block) = (f.plan.batch.expect("the flush has a batch"), f.batch_lsn, f.own_block);
        let tag = self.tag_for_file(step.file_seq);
        let meta = RecordMeta { layout: RecordLayout::Packed, kind: RecordKind::Batch, epoch: self.epoch, lsn, tag };
        if own_block {
            self.tail = Tail::empty(step.file_seq, step.record_pos);
        }
        let f = self.in_flight.back().expect("a flush in flight");
        self.tail.fill(buf, step, |rec| {
            encode_record(rec, meta, f.payload_len, |p| {
                let mut at = 0;
                for e in f.ops.iter().filter_map(|o| o.entry.as_ref()) {
                    at += e.encode(&mut p[at..]);
                }
            })
        });
    }

    /// The oldest in-flight flush is durable: apply it.
    pub fn complete_flush(&mut self) -> Completion {
        let f = self.in_flight.pop_front().expect("a flush in flight");
        let mut rolled_from = None;
        if let Some(seq) = f.plan.prepare {
            if self.has_file {
                rolled_from = Some(self.file_seq);
                let old = std::mem::take(&mut self.current_index);
                self.remember_index(self.file_seq, old);
            }
            self.file_tag = self.tag_for_file(seq);
            // This file's tag and any earlier one's are never asked for again.
            self.future_tags = self.future_tags.split_off(&(seq + 1));
            self.file_seq = seq;
            self.has_file = true;
            self.current_file_bytes = self.cfg.file_bytes;
        }
        let mut changed = Vec::new();
        if let Some(step) = f.plan.batch {
            self.file_pos = step.record_pos + step.record_len;
            self.current_index.push_record(step.record_pos, step.record_len, true);
            let mut data_pos = step.record_pos + RECORD_HEADER_BYTES as u64;
            for e in f.ops.iter().filter_map(|o| o.entry.as_ref()) {
                let pos = data_pos + e.data_header_len() as u64;
                data_pos += e.encoded_len() as u64;
                if let Some(seg) = self.apply_durable(e, step.file_seq, pos, true) {
                    changed.push(seg);
                }
            }
        }
        changed.dedup();
        Completion { results: f.ops.into_iter().map(|o| o.result).collect(), changed, rolled_from }
    }

    /// A flush failed: the container is poisoned. Returns how many queued operations (those
    /// of every flush in flight first, then the rest, in order) must be failed.
    pub fn fail_flush(&mut self, reason: String) -> usize {
        let ops = self.in_flight.drain(..).flat_map(|f| f.ops).collect();
        self.fail_with(reason, ops)
    }

    fn fail_with(&mut self, reason: String, ops: Vec<Pending>) -> usize {
        self.poisoned = Some(reason);
        let n = ops.len() + self.pending.len();
        self.pending.clear();
        self.pending_bytes = 0;
        n
    }

    /// Applies a durable entry; returns the segment whose readers should wake.
    fn apply_durable(&mut self, entry: &LogEntry, file_seq: u64, data_pos: u64, cache: bool) -> Option<u64> {
        match entry {
            LogEntry::Create { segment, name } => {
                let s = self.segments.entry(*segment).or_insert_with(|| Segment::new(name.clone()));
                s.created = true;
                self.by_name.entry(name.clone()).or_insert(*segment);
                self.next_segment_id = self.next_segment_id.max(segment + 1);
                None
            }
            LogEntry::Append { segment, offset, writer, last_event_number, data } => {
                let now = self.now_ms;
                let s = self.segments.get_mut(segment)?;
                if *writer != 0 {
                    s.writers.insert(*writer, *last_event_number);
                    s.writer_seen.insert(*writer, now);
                }
                self.apply_data(*segment, *offset, data, file_seq, data_pos, cache)
            }
            LogEntry::Merge { segment, offset, source, data } => {
                if let Some(s) = self.segments.get(source) {
                    self.merging.remove(&s.name);
                }
                self.apply_delete(*source);
                self.apply_data(*segment, *offset, data, file_seq, data_pos, cache)
            }
            LogEntry::Relocate { segment, offset, data } => {
                let s = self.segments.get_mut(segment)?;
                // Always so, but after a salvage that lost records before it: then the
                // files that held the bytes keep holding them.
                if offset + data.len() as u64 != s.length || data.is_empty() {
                    return None;
                }
                s.files = vec![(*offset, file_seq)];
                self.current_index.relocate(*segment, *offset, data_pos, data.len() as u32);
                None
            }
            LogEntry::Seal { segment } => {
                self.segments.get_mut(segment)?.sealed = true;
                Some(*segment)
            }
            LogEntry::Truncate { segment, offset } => {
                let s = self.segments.get_mut(segment)?;
                s.start_offset = s.start_offset.max(*offset);
                let start = s.start_offset;
                // Chunks wholly below the start offset are garbage.
                let dropped = s.chunks.drop_below(start);
                let name = s.name.clone();
                self.garbage.extend(dropped.iter().map(|c| sluice_tier2::layout::chunk_name(&name, c.start, c.epoch)));
                self.cache.truncate(*segment, *offset);
                None
            }
            LogEntry::Delete { segment } => self.apply_delete(*segment),
            LogEntry::ChunksClosed { segment } => {
                self.segments.get_mut(segment)?.chunks_closed = true;
                None
            }
            LogEntry::CreationsRecorded => {
                self.creations_recorded = true;
                None
            }
            LogEntry::Chunk { segment, start, epoch, len } => {
                let s = self.segments.get_mut(segment)?;
                s.chunks.record(*start, *epoch, *len);
                s.chunks_closed = false;
                s.tier2_end = s.tier2_end.max(start + len);
                None
            }
        }
    }

    /// Salvage (replay past damaged records): whether `entry` can be applied, after making
    /// room for it. An append or merge beyond its segment's length leaves a hole there (the
    /// lost appends): the segment's length jumps to it and its lost range maps to this file,
    /// whose index has nothing there. Entries for unknown segments and appends below the
    /// length are dropped and counted.
    fn salvage_entry(&mut self, entry: &LogEntry, file_seq: u64, salvage: &mut Salvage) -> bool {
        let Some(segment) = entry.segment().filter(|_| !matches!(entry, LogEntry::Create { .. })) else {
            return true;
        };
        let Some(s) = self.segments.get_mut(&segment) else {
            salvage.unknown_segment += 1;
            return false;
        };
        let offset = match entry {
            LogEntry::Append { offset, .. } | LogEntry::Merge { offset, .. } => *offset,
            _ => return true,
        };
        if offset < s.length {
            salvage.overlapping += 1;
            return false;
        }
        if offset > s.length {
            if s.files.last().is_none_or(|&(_, f)| f != file_seq) {
                s.files.push((s.length, file_seq));
            }
            salvage.holes.push((s.name.clone(), s.length, offset));
            s.length = offset;
        }
        true
    }

    /// Durable data of an append or a merge at `offset` of `segment`.
    fn apply_data(
        &mut self,
        segment: u64,
        offset: u64,
        data: &Bytes,
        file_seq: u64,
        data_pos: u64,
        cache: bool,
    ) -> Option<u64> {
        let s = self.segments.get_mut(&segment)?;
        assert_eq!(offset, s.length, "appends become durable in offset order");
        s.length += data.len() as u64;
        if !data.is_empty() {
            if s.files.last().is_none_or(|&(_, f)| f != file_seq) {
                s.files.push((offset, file_seq));
            }
            self.current_index.push(segment, offset, data_pos, data.len() as u32);
            if cache {
                self.cache.insert(segment, offset, data.clone());
            }
        }
        Some(segment)
    }

    fn apply_delete(&mut self, segment: u64) -> Option<u64> {
        let s = self.segments.remove(&segment)?;
        if self.by_name.get(&s.name) == Some(&segment) {
            self.by_name.remove(&s.name);
        }
        self.garbage.extend(s.chunks.iter().map(|c| sluice_tier2::layout::chunk_name(&s.name, c.start, c.epoch)));
        self.cache.remove_segment(segment);
        Some(segment)
    }

    fn remember_index(&mut self, seq: u64, index: FileIndex) {
        self.cold_indexes.retain(|(s, _)| *s != seq);
        self.cold_indexes.push_back((seq, index));
        while self.cold_indexes.len() > FILE_INDEXES_CACHED_MAX {
            self.cold_indexes.pop_front();
        }
    }

    fn has_file_index_for(&self, s: &Segment, offset: u64) -> bool {
        s.file_of(offset).is_some_and(|f| f == self.file_seq || self.cold_indexes.iter().any(|(seq, _)| *seq == f))
    }

    /// The read error for data of `name` lost to damage in log file `file_seq` (where: see
    /// `Damage`): `DamagedLog` with where the segment's sound data resumes, or plain
    /// `DataCorrupt` for a segment no longer known.
    pub fn damaged(&self, name: &str, file_seq: u64, at: Damage, message: String) -> EngineError {
        match self.resume_after_damage(name, file_seq, at) {
            Some(resume) => EngineError::DamagedLog { message, resume },
            None => EngineError::DataCorrupt(message),
        }
    }

    /// Where the sound data of `name` resumes after damage in log file `file_seq`: its first
    /// offset the file's index holds past the damage, else where its data continues in a
    /// later file, else its length. `None` for an unknown segment.
    fn resume_after_damage(&self, name: &str, file_seq: u64, at: Damage) -> Option<u64> {
        let id = self.lookup(name).ok()?;
        let s = self.segments.get(&id)?;
        let index = if file_seq == self.file_seq {
            Some(&self.current_index)
        } else {
            self.cold_indexes.iter().find(|(seq, _)| *seq == file_seq).map(|(_, i)| i)
        };
        let in_file = index.and_then(|index| match at {
            Damage::Record(pos) => index.offset_after_record(id, pos),
            Damage::Missing(offset) => index.offset_beyond(id, offset),
        });
        Some(in_file.unwrap_or_else(|| s.files.iter().find(|&&(_, f)| f > file_seq).map_or(s.length, |&(o, _)| o)))
    }

    /// The older log file a reader of `name` at `offset` goes to next, if its next bytes are
    /// in one (not in the file being written).
    pub fn next_older_file(&self, name: &str, offset: u64) -> Option<u64> {
        let s = &self.segments[&self.lookup(name).ok()?];
        s.file_after(offset).filter(|&f| f != self.file_seq && f >= self.oldest_file)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Lowest log file sequence still on disk.
    pub fn oldest_file(&self) -> u64 {
        self.oldest_file
    }

    /// Log files on disk: from the oldest to the current one, and those being freed.
    pub fn live_files(&self) -> u64 {
        self.file_seq + 1 - self.oldest_file.min(self.file_seq) + self.files_freeing
    }

    /// The lowest log file any segment still needs (data not yet in tier-2 and not
    /// truncated); files below it may be deleted. Never above the current file.
    pub fn files_needed_from(&self) -> u64 {
        let mut needed = self.file_seq;
        for (f, _) in self.segments.values().filter_map(Segment::oldest_file_needed) {
            needed = needed.min(f);
        }
        for p in self.in_flight.iter().filter_map(|f| f.plan.prepare) {
            needed = needed.min(p);
        }
        needed
    }

    /// A segment that alone keeps log files every other segment has let go (by at least
    /// `min_files`): its name, the offset its data in the log starts at, and how many files
    /// it alone keeps. Without tier-2 that is a segment whose stream is neither truncated
    /// nor deleted while others are, and the reason the log does not shrink.
    pub fn log_held_alone(&self, min_files: u64) -> Option<(String, u64, u64)> {
        // The lowest file any segment needs, and the lowest the others need.
        let mut lowest: Option<(u64, u64, &Segment)> = None;
        let mut second = self.file_seq;
        for s in self.segments.values() {
            let Some((f, from)) = s.oldest_file_needed() else { continue };
            match lowest {
                Some((low, ..)) if f >= low => second = second.min(f),
                _ => second = second.min(lowest.replace((f, from, s)).map_or(u64::MAX, |(low, ..)| low)),
            }
        }
        let (file, from, s) = lowest?;
        let alone = second.saturating_sub(file);
        (alone >= min_files).then(|| (s.name.clone(), from, alone))
    }

    /// Without tier-2: a segment to copy into the current log file (`Request::Relocate`), so
    /// that the oldest file still needed can be freed: (name, first offset, length). Only
    /// when every segment that needs that file can be copied whole, the lot holding at most
    /// a quarter of a log file (so a copy frees at least three times the bytes it writes),
    /// with nothing of theirs queued. A stream without retention that stays small then no
    /// longer keeps the files every other stream's truncations let go.
    pub fn relocation(&self) -> Option<(String, u64, u64)> {
        let oldest = self.files_needed_from();
        if oldest >= self.file_seq || !self.has_file || self.current_file_bytes < self.cfg.file_bytes {
            return None;
        }
        let holders: Vec<(u64, &Segment, u64)> = self
            .segments
            .iter()
            .filter_map(|(id, s)| s.oldest_file_needed().filter(|&(f, _)| f == oldest).map(|(_, from)| (*id, s, from)))
            .collect();
        let total: u64 = holders.iter().map(|(_, s, from)| s.length - from).sum();
        let quiet = holders.iter().all(|(_, s, _)| s.acc_length == s.length && s.acc_start_offset == s.start_offset);
        if total > self.cfg.file_bytes / 4 || !quiet {
            return None;
        }
        holders.iter().min_by_key(|(id, ..)| *id).map(|(_, s, from)| (s.name.clone(), *from, s.length))
    }

    /// How many forgotten log files are still on disk, being freed.
    pub fn set_files_freeing(&mut self, n: u64) {
        self.files_freeing = n;
    }

    /// Files below `seq` are gone from disk (deleted, or found missing at recovery): forget them.
    pub fn forget_files_below(&mut self, seq: u64) {
        self.oldest_file = seq.min(self.file_seq);
        for s in self.segments.values_mut() {
            let gone = s.files.partition_point(|&(_, f)| f < seq);
            s.files.drain(..gone);
        }
        self.cold_indexes.retain(|(f, _)| *f >= seq);
    }

    /// Durable data waiting for tier-2, one task per segment, segments that pin old log
    /// files or are sealed first. Segments with less than `min_bytes` waiting in the
    /// current file are left to accumulate.
    pub fn move_tasks(&self, min_bytes: u64) -> Vec<MoveTask> {
        let mut tasks: Vec<MoveTask> = self
            .segments
            .values()
            .filter(|s| s.created)
            .filter_map(|s| {
                let from = s.log_needed_from();
                let pins_old_file = from < s.length && s.file_of(from).is_some_and(|f| f < self.file_seq);
                let unsealed_chunk =
                    s.sealed && !s.chunks_closed && s.chunks.last().is_some_and(|c| c.start + c.len == s.length);
                if from >= s.length && !unsealed_chunk {
                    return None;
                }
                if from < s.length && !pins_old_file && !s.sealed && s.length - from < min_bytes {
                    return None;
                }
                Some(MoveTask {
                    name: s.name.clone(),
                    from,
                    to: s.length,
                    last_chunk: s.chunks.last(),
                    sealed: s.sealed,
                    pins_old_file,
                })
            })
            .collect();
        tasks.sort_by(|a, b| {
            (!a.pins_old_file, !a.sealed, a.from, &a.name).cmp(&(!b.pins_old_file, !b.sealed, b.from, &b.name))
        });
        tasks
    }

    /// Every segment's chunks (for reconciliation with tier-2 after recovery), but those of
    /// segments whose chunks are all closed: `(name, length, chunks, sealed and truncated
    /// to its end)`, and how many were left out.
    pub fn chunk_map(&self) -> (Vec<(String, u64, ChunkList, bool)>, usize) {
        let live = self.segments.values().filter(|s| s.created);
        let closed = live.clone().filter(|s| s.chunks_closed).count();
        let map = live
            .filter(|s| !s.chunks_closed)
            .map(|s| {
                let emptied = s.sealed && s.chunks.is_empty() && s.start_offset >= s.length;
                (s.name.clone(), s.length, s.chunks.clone(), emptied)
            })
            .collect();
        (map, closed)
    }

    /// Drops from `names` (chunks to delete) those a live segment's chunk list holds: a
    /// stream deleted and created again reuses segment and chunk names.
    pub fn drop_live_chunks(&self, names: &mut Vec<String>) {
        if names.is_empty() {
            return;
        }
        let dirs: HashMap<String, &ChunkList> = self
            .segments
            .values()
            .filter(|s| s.created)
            .map(|s| (sluice_tier2::layout::segment_dir(&s.name), &s.chunks))
            .collect();
        names.retain(|name| {
            let live = name.rsplit_once('/').and_then(|(dir, file)| {
                let (start, epoch) = sluice_tier2::layout::parse_chunk_file(file)?;
                Some(dirs.get(dir)?.contains(start, epoch))
            });
            live != Some(true)
        });
    }

    /// Takes the names of chunks to delete from tier-2.
    pub fn take_garbage(&mut self) -> Vec<String> {
        std::mem::take(&mut self.garbage)
    }

    /// Puts back chunk names whose deletion failed.
    pub fn return_garbage(&mut self, names: Vec<String>) {
        self.garbage.extend(names);
    }

    /// Installs the index of an older file (after `ReadOutcome::NeedIndex`).
    pub fn insert_file_index(&mut self, seq: u64, index: FileIndex) {
        self.remember_index(seq, index);
    }

    /// Durable state of a segment.
    pub fn status(&self, name: &str) -> Result<SegmentStatus, EngineError> {
        let id = self.lookup(name)?;
        let s = &self.segments[&id];
        if !s.created {
            return Err(EngineError::NoSuchSegment(name.to_string()));
        }
        let mut writers: Vec<_> = s.writers.iter().map(|(&w, &n)| (w, n)).collect();
        writers.sort_unstable();
        Ok(SegmentStatus {
            id,
            name: s.name.clone(),
            start_offset: s.start_offset,
            length: s.length,
            sealed: s.sealed,
            writers,
            tier2_end: s.tier2_end,
        })
    }

    /// (name, durable length) of the first `limit` open segments (created, not sealed) in
    /// name order after `after`, and whether more follow. Only those are copied.
    pub fn open_lengths(&self, after: &str, limit: usize) -> (Vec<(String, u64)>, bool) {
        let mut open: Vec<(&str, u64)> = self
            .segments
            .values()
            .filter(|s| s.created && !s.sealed && s.name.as_str() > after)
            .map(|s| (s.name.as_str(), s.length))
            .collect();
        let more = keep_first(&mut open, limit);
        (open.into_iter().map(|(name, len)| (name.to_string(), len)).collect(), more)
    }

    /// Where to read up to `max` bytes of `name` from `offset`.
    pub fn read(&self, name: &str, offset: u64, max: usize) -> Result<(ReadOutcome, SegmentStatus), EngineError> {
        let status = self.status(name)?;
        let s = &self.segments[&status.id];
        if offset < s.start_offset {
            return Err(EngineError::Truncated { segment: name.to_string(), offset, start: s.start_offset });
        }
        if offset >= s.length {
            if offset > s.acc_length {
                return Err(EngineError::BadRequest(format!(
                    "offset {offset} is beyond the end ({}) of {name}",
                    s.acc_length
                )));
            }
            return Ok((ReadOutcome::Tail, status));
        }
        let max = max.max(1);
        if let Some(data) = self.cache.get(status.id, offset, max) {
            return Ok((ReadOutcome::Data(data), status));
        }
        let in_log = s.files.first().is_some_and(|&(o, _)| o <= offset);
        if !in_log || offset < s.tier2_end && !self.has_file_index_for(s, offset) {
            // Below the log: tier-2 holds it.
            if let Some(c) = s.chunks.find(offset) {
                let within = offset - c.start;
                return Ok((
                    ReadOutcome::Chunk {
                        chunk: sluice_tier2::layout::chunk_name(name, c.start, c.epoch),
                        offset: within,
                        len: (c.len - within).min(max as u64),
                        chunk_len: c.len,
                    },
                    status,
                ));
            }
        }
        let Some(file_seq) = s.file_of(offset) else {
            if offset < s.tier2_end
                && let Some(resume) = s.chunks.start_after(offset)
            {
                // A gap between chunks: damaged log data the mover skipped (salvage).
                return Err(EngineError::DamagedLog {
                    message: format!(
                        "no tier-2 chunk holds offset {offset} of {name}: damaged log data the tier-2 mover \
                         skipped (--salvage-damaged-log); the data resumes at {resume}"
                    ),
                    resume,
                });
            }
            return Err(EngineError::BadRequest(format!("neither the log nor tier-2 holds offset {offset} of {name}")));
        };
        let index = if file_seq == self.file_seq {
            &self.current_index
        } else {
            match self.cold_indexes.iter().find(|(seq, _)| *seq == file_seq) {
                Some((_, idx)) => idx,
                None => return Ok((ReadOutcome::NeedIndex { file_seq }, status)),
            }
        };
        // Consecutive appends of one segment lie apart in the file (other entries and record
        // headers between them): one read takes up to twice the bytes asked for.
        let pieces = index.locate(status.id, offset, max as u64, 2 * max as u64);
        if pieces.is_empty() {
            // A file's index holds the records its scan found sound (for the current file,
            // those a salvaging recovery replayed): one that misses data the segment has
            // there lost it to damage.
            let message = format!(
                "container {} log file {}: no sound record holds offset {offset} of {name} (a damaged record; \
                 `sluice log scrub` names it)",
                self.cfg.container,
                crate::log::file_name(file_seq)
            );
            return Err(self.damaged(name, file_seq, Damage::Missing(offset), message));
        }
        let (first, &(last, last_len)) = (pieces[0].0, pieces.last().expect("not empty"));
        let Some(records) = index.record_span(first, last + last_len) else {
            return Err(EngineError::Io(format!(
                "log file {file_seq:x}: no record holds bytes {first}..{} (offset {offset} of {name})",
                last + last_len
            )));
        };
        Ok((ReadOutcome::Log { file_seq, pieces, records }, status))
    }

    /// Rebuilds a container from its log files (ascending sequence, whole file images).
    /// The new core writes with `epoch` one above anything in the log.
    pub fn recover(cfg: CoreConfig, files: &[(u64, Bytes)]) -> Result<(Self, RecoveryReport), RecoverFault> {
        let scans: Vec<FileScan> = files.iter().map(|(_, b)| scan_file(b)).collect();
        let mut report = RecoveryReport::default();
        let header_ok =
            |i: usize| scans[i].header.as_ref().is_ok_and(|h| h.seq == files[i].0 && h.container == cfg.container);
        // A header block that fails its own check, before a sound opening checkpoint of this
        // container: the file is known by its name and that checkpoint (salvaging, it is
        // taken and its header written again).
        let opens_here = |i: usize| {
            scans[i].records.first().is_some_and(|r| {
                r.header.kind == RecordKind::Checkpoint
                    && CheckpointState::decode(&r.payload).is_ok_and(|ck| ck.container == cfg.container)
            })
        };
        let header_damaged = |i: usize| scans[i].header.is_err() && opens_here(i);
        let active = (0..files.len()).rev().find(|&i| {
            (header_ok(i) || cfg.salvage && header_damaged(i))
                && scans[i].records.first().is_some_and(|r| r.header.kind == RecordKind::Checkpoint)
        });
        let max_epoch = scans.iter().filter_map(|s| s.header.as_ref().ok().map(|h| h.epoch)).max().unwrap_or(0);
        // Salvaging, a file after the active one whose opening checkpoint is damaged (sound
        // records after it) continues it: the checkpoint only restated the state the active
        // file's records end in.
        let chained = active.map(|a| a + 1).filter(|&l| {
            cfg.salvage
                && l < files.len()
                && files[l].0 == files[l - 1].0 + 1
                && header_ok(l)
                && scans[l].records.is_empty()
                && matches!(scans[l].stop, ScanEnd::Corrupt { at, .. } if at == FILE_HEADER_BYTES)
        });
        let first_later = chained.or(active).map_or(0, |i| i + 1);
        for (i, scan) in scans.iter().enumerate().skip(first_later) {
            if let ScanEnd::Corrupt { at, valid_at, reason } = &scan.stop {
                if cfg.salvage {
                    return Err(RecoverFault::Invalid {
                        file_seq: files[i].0,
                        reason: format!(
                            "invalid record at byte {at} ({reason}) with a valid record at byte {valid_at}, and no \
                             log file just before this one to rebuild its opening state from: cannot salvage"
                        ),
                    });
                }
                return Err(RecoverFault::Corrupt { file_seq: files[i].0, at: *at, valid_at: *valid_at });
            }
            if let (Err(e), true) = (&scan.header, header_damaged(i)) {
                return Err(RecoverFault::Invalid {
                    file_seq: files[i].0,
                    reason: format!(
                        "damaged file header ({e}) before a sound opening checkpoint: --salvage-damaged-log \
                         writes the header again from the file's name and that checkpoint"
                    ),
                });
            }
            if let Some(r) = scan.records.first() {
                return Err(RecoverFault::Invalid {
                    file_seq: files[i].0,
                    reason: format!("valid record at byte {} but no checkpoint opens the file", r.pos),
                });
            }
            report.discard_files.push(files[i].0);
        }
        let Some(a) = active else {
            let next = files.last().map_or(0, |(s, _)| s + 1);
            return Ok((Self::new(cfg, max_epoch + 1, next), report));
        };
        // The files to replay, each with its sound records and the damaged stretches skipped.
        let mut replay: Vec<(u64, std::borrow::Cow<FileScan>, Vec<Skipped>, &Bytes)> = Vec::new();
        for i in std::iter::once(a).chain(chained) {
            match (&scans[i].stop, cfg.salvage) {
                (ScanEnd::Corrupt { at, valid_at, .. }, false) => {
                    return Err(RecoverFault::Corrupt { file_seq: files[i].0, at: *at, valid_at: *valid_at });
                }
                (ScanEnd::Corrupt { .. }, true) => {
                    let (scan, skipped) = scan_past_damage(&files[i].1);
                    replay.push((files[i].0, std::borrow::Cow::Owned(scan), skipped, &files[i].1));
                }
                _ => replay.push((files[i].0, std::borrow::Cow::Borrowed(&scans[i]), Vec::new(), &files[i].1)),
            }
        }
        let invalid = |file_seq: u64, reason: String| RecoverFault::Invalid { file_seq, reason };
        let (seq, first) = (files[a].0, &replay[0].1);
        if scans[a].header.is_err() {
            report.rebuilt_header = Some(FileHeader {
                container: cfg.container,
                seq,
                epoch: first.records[0].header.epoch,
                file_bytes: files[a].1.len() as u64,
                // The opening checkpoint's: the scan took the file's own records from there.
                min_lsn: first.records[0].header.lsn,
                tag: first.records[0].header.tag,
            });
        }
        let ck = CheckpointState::decode(&first.records[0].payload).map_err(|e| invalid(seq, e))?;
        let mut core = Self::new(cfg, 0, seq);
        core.has_file = true;
        core.next_segment_id = ck.next_segment_id;
        core.garbage = ck.garbage;
        core.creations_recorded = ck.creations_recorded;
        for sc in ck.segments {
            let mut s = Segment::new(sc.name.clone());
            s.created = true;
            s.start_offset = sc.start_offset;
            s.length = sc.length;
            s.sealed = sc.sealed;
            s.writers = sc.writers.into_iter().collect();
            s.files = sc.files;
            s.tier2_end = sc.tier2_end;
            s.chunks = chunk_list(&sc.chunks);
            s.chunks_closed = sc.chunks_closed;
            core.by_name.insert(sc.name, sc.id);
            core.segments.insert(sc.id, s);
        }
        let mut epoch = ck.epoch.max(max_epoch);
        let mut salvage = Salvage::default();
        let mut prev = first.records[0].header;
        for (n, (seq, scan, skipped, bytes)) in replay.iter().enumerate() {
            let seq = *seq;
            // Each damaged stretch is described in the state just before it.
            let mut described = 0;
            let mut describe = |core: &Self, salvage: &mut Salvage, before: u64| {
                while let Some(k) = skipped.get(described).filter(|k| k.valid_at <= before) {
                    let entries: Vec<LogEntry> = damaged_records(bytes, k)
                        .iter()
                        .filter(|(h, _)| h.kind == RecordKind::Batch)
                        .flat_map(|(_, payload)| decode_entries_prefix(payload))
                        .collect();
                    salvage.skipped.push((seq, k.clone(), core.describe_damaged(&entries)));
                    described += 1;
                }
            };
            if n > 0 {
                // The next file, whose checkpoint was lost: the active file's index goes cold.
                salvage.lost_checkpoint = Some((files[a].0, seq));
                core.file_seq = seq;
                core.current_index = FileIndex::default();
            }
            core.file_pos = scan.end;
            core.current_file_bytes = scan.header.as_ref().map_or(bytes.len() as u64, |h| h.file_bytes);
            // Records written into the file from here on carry its tag (a file of an earlier
            // build: 0, as its own records do).
            core.file_tag = match (&scan.header, scan.records.first()) {
                (Ok(h), _) => h.tag,
                (Err(_), Some(r)) => r.header.tag,
                (Err(_), None) => 0,
            };
            for (r, rec) in scan.records.iter().enumerate().skip(if n == 0 { 1 } else { 0 }) {
                if rec.header.kind != RecordKind::Batch {
                    return Err(invalid(seq, format!("unexpected checkpoint at byte {}", rec.pos)));
                }
                if rec.header.lsn <= prev.lsn || rec.header.epoch < prev.epoch {
                    // Only across a skipped stretch (the scan checks the chain within one).
                    return Err(invalid(
                        seq,
                        format!(
                            "the record at byte {} (lsn {}, epoch {}) after damaged records does not follow lsn {} \
                             epoch {}: cannot salvage",
                            rec.pos, rec.header.lsn, rec.header.epoch, prev.lsn, prev.epoch
                        ),
                    ));
                }
                describe(&core, &mut salvage, rec.pos);
                let gap = rec.header.lsn - prev.lsn - 1;
                salvage.lost_records += gap;
                // A lost checkpoint is one record of the gap and holds no appends.
                if gap > u64::from(n > 0 && r == 0) {
                    salvage.passed_loss = true;
                    // What counts is an entry after the *last* loss: a segment with none
                    // may have lost its last operations in it without a trace.
                    salvage.seen_after.clear();
                }
                let follows = rec.header.lsn == prev.lsn + 1;
                prev = rec.header;
                core.current_index.push_record(rec.pos, rec.header.disk_len(), follows);
                for (entry, pos) in decode_entries(&rec.payload, rec.payload_pos()).map_err(|e| invalid(seq, e))? {
                    if salvage.passed_loss
                        && let Some(segment) = entry.segment()
                    {
                        salvage.seen_after.insert(segment);
                    }
                    if skipped.is_empty() || core.salvage_entry(&entry, seq, &mut salvage) {
                        core.apply_durable(&entry, seq, pos, false);
                    }
                }
                report.records_replayed += 1;
            }
            describe(&core, &mut salvage, u64::MAX);
        }
        if salvage.lost_checkpoint.is_some() {
            // The next flush starts a new file, with a checkpoint: until then a restart needs
            // the file before this one (the mover records chunks, so flushes, before it frees
            // that file).
            core.close_current_file();
        }
        if salvage.passed_loss {
            let mut untraced: Vec<String> = core
                .segments
                .iter()
                .filter(|(id, seg)| !seg.sealed && !salvage.seen_after.contains(id))
                .map(|(_, seg)| seg.name.clone())
                .collect();
            untraced.sort();
            core.untraced = untraced;
            core.salvage_lost = true;
        }
        if let Err(e) = &scans[a].header {
            core.salvaged.push(format!(
                "log file {}: its damaged header ({e}) was written again from the file's name and its opening \
                 checkpoint",
                crate::log::file_name(files[a].0)
            ));
        }
        if !salvage.skipped.is_empty() {
            core.salvaged.extend(salvage.lines(&core.untraced));
            // A lost record may have named a tier-2 chunk before its creation: the next mover
            // lists tier-2 and deletes chunks no entry names.
            core.creations_recorded = false;
        }
        let (seq, scan, _, _) = replay.last().expect("the active file");
        let seq = *seq;
        for r in replay.iter().flat_map(|(_, scan, _, _)| &scan.records) {
            epoch = epoch.max(r.header.epoch);
        }
        core.epoch = epoch + 1;
        core.next_lsn = prev.lsn + 1;
        for s in core.segments.values_mut() {
            s.sync_accepted();
        }
        if let ScanEnd::Torn { at, .. } = scan.stop {
            report.torn_tail_at = Some(at);
        }
        let bytes: &Bytes = replay.last().expect("the active file").3;
        let block_start = crate::constants::align_down(scan.end);
        core.tail =
            Tail { file_seq: seq, end: scan.end, bytes: bytes[block_start as usize..scan.end as usize].to_vec() };
        if scan.dirty_end > scan.end {
            let to = crate::constants::align_up(scan.dirty_end).min(bytes.len() as u64);
            let mut clear = bytes[block_start as usize..to as usize].to_vec();
            // (A file cut short ends inside its last block: clear to its end.)
            let dirty_end = scan.dirty_end.min(to);
            clear[(scan.end - block_start) as usize..(dirty_end - block_start) as usize].fill(0);
            report.clear_torn = Some((seq, block_start, clear));
        }
        report.current_file = Some(seq);
        Ok((core, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> ContainerCore {
        let cfg = CoreConfig {
            flush_bytes_max: 64 << 10,
            pending_bytes_max: 1 << 20,
            log_bytes_max: u64::MAX,
            ..CoreConfig::small(3, 1 << 20)
        };
        let mut c = ContainerCore::new(cfg, 1, 0);
        c.set_now_ms(1);
        c
    }

    /// A file's tag, once chosen, is the one it is asked for again until it is rolled into,
    /// whatever later file's tag is chosen meanwhile (a roll past half its new file prepares
    /// the next one before it completes).
    #[test]
    fn a_file_keeps_its_tag_while_a_later_file_s_is_chosen() {
        let mut c = core();
        let first = c.tag_for_file(0);
        let second = c.tag_for_file(1);
        assert_ne!(first, second);
        assert_eq!(c.tag_for_file(0), first);
        assert_eq!(c.tag_for_file(1), second);
        assert_eq!(c.tag_for_file(2), c.tag_for_file(2));
    }

    fn append(name: &str, first: u64, data: &'static [u8]) -> Request {
        Request::Append {
            name: name.into(),
            writer: 7,
            first_event_number: first,
            event_count: 0,
            expected_offset: None,
            data: Bytes::from_static(data),
        }
    }

    /// Flushes everything queued as if the write succeeded.
    fn flush(c: &mut ContainerCore) {
        while c.begin_flush().unwrap().is_some() {
            c.complete_flush();
        }
    }

    /// A second flush may begin while the first is written: its record starts at the block
    /// boundary after the first one's (never in a block being written), its write encodes no
    /// earlier record, and the two complete in order; the durable LSN follows the oldest. A
    /// flush after both packs into the second one's last block again. No second flush begins
    /// beside one that rolls into a new file, nor a third.
    #[test]
    fn a_second_flush_begins_beside_the_first_in_a_block_of_its_own() {
        let mut c = core();
        c.submit(Request::Create { name: "a".into() }).unwrap();
        assert!(!c.can_begin_another(), "nothing in flight, nothing queued");
        let first = c.begin_flush().unwrap().unwrap();
        assert!(first.prepare.is_some());
        c.submit(append("a", 1, b"one")).unwrap();
        assert!(!c.can_begin_another(), "not beside a flush that rolls");
        c.complete_flush();
        flush(&mut c);
        c.submit(append("a", 2, b"two")).unwrap();
        let one = c.begin_flush().unwrap().unwrap().batch.unwrap();
        assert!(!c.can_begin_another(), "nothing queued");
        c.submit(append("a", 3, b"three")).unwrap();
        assert!(c.can_begin_another());
        let durable = c.durable_lsn();
        let two = c.begin_flush().unwrap().unwrap().batch.unwrap();
        assert_eq!(two.record_pos, crate::constants::align_up(one.record_pos + one.record_len));
        assert_eq!((two.pos, two.len), (two.record_pos, BLOCK_BYTES));
        let mut enc = vec![0u8; two.len as usize];
        c.encode_batch(&mut enc);
        assert!(enc.starts_with(&crate::log::format::RECORD_MAGIC.to_le_bytes()), "the record opens its block");
        c.submit(append("a", 4, b"four")).unwrap();
        assert!(!c.can_begin_another(), "two in flight at most");
        assert_eq!(c.durable_lsn(), durable);
        let done = c.complete_flush();
        assert!(matches!(done.results[..], [OpResult::Appended { offset: 3, .. }]), "{:?}", done.results);
        assert_eq!(c.durable_lsn(), durable + 1);
        assert_eq!(c.status("a").unwrap().length, 6);
        let done = c.complete_flush();
        assert!(matches!(done.results[..], [OpResult::Appended { offset: 6, .. }]), "{:?}", done.results);
        assert_eq!((c.durable_lsn(), c.file_pos), (durable + 2, two.record_pos + two.record_len));
        // Nothing in flight: the next record packs after the second one, in its block.
        let three = c.begin_flush().unwrap().unwrap().batch.unwrap();
        assert_eq!((three.record_pos, three.pos), (two.record_pos + two.record_len, two.record_pos));
        let mut buf = vec![0u8; three.len as usize];
        c.encode_batch(&mut buf);
        assert_eq!(&buf[..two.record_len as usize], &enc[..two.record_len as usize], "the second record again");
        c.complete_flush();
        assert_eq!(c.status("a").unwrap().length, 15);
    }

    /// Records that add data stop short of the file's end by the control reserve, so on a
    /// full disk (no next file) a truncation or deletion still fits the current file.
    #[test]
    fn a_truncation_fits_the_current_file_when_the_next_cannot_be_made() {
        let mut c = core();
        c.submit(Request::Create { name: "a".into() }).unwrap();
        flush(&mut c);
        // Records of a block each until the next one needs a new file (the first one fills
        // the block the checkpoint and the create began).
        static DATA: [u8; BLOCK_BYTES as usize - RECORD_HEADER_BYTES - APPEND_HEADER_BYTES] =
            [b'x'; BLOCK_BYTES as usize - RECORD_HEADER_BYTES - APPEND_HEADER_BYTES];
        c.submit(append("a", 1, &DATA[(c.file_pos % BLOCK_BYTES) as usize..])).unwrap();
        flush(&mut c);
        assert_eq!(c.file_pos % BLOCK_BYTES, 0);
        let mut n = 1;
        loop {
            n += 1;
            c.submit(append("a", n, &DATA)).unwrap();
            if c.next_flush_file().is_some() {
                break;
            }
            flush(&mut c);
            assert!(n < 1000, "a 1 MiB file holds at most 255 blocks");
        }
        let free = c.current_file_bytes - c.file_pos;
        assert_eq!(free, CONTROL_RESERVE_BYTES, "data stops at the reserve");
        // The roll fails: the append is refused, the disk marked full.
        assert_eq!(c.refuse_pending(), 1);
        c.set_no_space(Some("no room".into()));
        let seq = c.file_seq;
        c.submit(Request::Truncate { name: "a".into(), offset: 1 }).unwrap();
        assert_eq!(c.next_flush_file(), None, "the truncation fits the reserve");
        let plan = c.begin_flush().unwrap().unwrap();
        assert_eq!((plan.prepare, plan.batch.as_ref().unwrap().file_seq), (None, seq));
        c.complete_flush();
        // The reserve holds 1024 such records (64 bytes each); then a roll is needed for them too.
        let each = RecordHeader::packed_len(1 + 8 + 8);
        assert_eq!(each, 64);
        for i in 1..CONTROL_RESERVE_BYTES / each {
            c.submit(Request::Truncate { name: "a".into(), offset: 2 + i }).unwrap();
            assert_eq!(c.next_flush_file(), None);
            flush(&mut c);
        }
        c.submit(Request::Truncate { name: "a".into(), offset: 2000 }).unwrap();
        assert_eq!(c.next_flush_file(), Some(seq + 1));
    }

    /// Without tier-2 a small segment that alone keeps the oldest log file is copied whole
    /// into the current one (`relocation`, `Request::Relocate`), and then no longer needs the
    /// older files; a large one, or one with writes queued, is not.
    #[test]
    fn a_small_segment_keeping_the_oldest_file_is_copied_into_the_current_one() {
        let mut c = core();
        for name in ["big", "small"] {
            c.submit(Request::Create { name: name.into() }).unwrap();
        }
        c.submit(append("small", 1, b"tiny")).unwrap();
        flush(&mut c);
        static BLOCK: [u8; 60_000] = [b'x'; 60_000];
        // Appends to `big` until the log is in its fourth file.
        let fill_big_to_file_3 = |c: &mut ContainerCore| {
            let mut n = 1;
            while c.current_file() < 3 {
                n += 1;
                c.submit(append("big", n, &BLOCK)).unwrap();
                flush(c);
            }
        };
        fill_big_to_file_3(&mut c);
        assert_eq!((c.files_needed_from(), c.relocation()), (0, None), "big needs the first file as well");
        let big = c.status("big").unwrap().length;
        c.submit(Request::Truncate { name: "big".into(), offset: big - 1000 }).unwrap();
        flush(&mut c);
        assert_eq!(c.files_needed_from(), 0, "small keeps the first file");
        assert_eq!(c.log_held_alone(2).map(|(n, _, files)| (n, files)), Some(("small".to_string(), 3)));
        let (name, from, to) = c.relocation().expect("small is copied");
        assert_eq!((name.as_str(), from, to), ("small", 0, 4));

        // Stale: an append queued since the read.
        c.submit(append("small", 2, b"more")).unwrap();
        assert_eq!(c.relocation(), None, "not while writes are queued");
        let stale = Request::Relocate { name: "small".into(), offset: 0, data: Bytes::from_static(b"tiny") };
        assert!(matches!(c.submit(stale), Err(EngineError::BadRequest(_))));
        flush(&mut c);
        let (_, from, to) = c.relocation().expect("small is copied");
        assert_eq!((from, to), (0, 8));
        let req = Request::Relocate { name: "small".into(), offset: 0, data: Bytes::from_static(b"tinymore") };
        assert_eq!(c.submit(req).unwrap(), Submitted::Queued);
        flush(&mut c);
        assert_eq!(c.files_needed_from(), c.current_file(), "only the file holding the cut is needed now");
        assert_eq!(c.segments[&c.by_name["small"]].files, vec![(0, c.current_file())]);
        assert_eq!(c.relocation(), None);
        assert_eq!(c.log_held_alone(1), None);
        assert_eq!(c.status("small").unwrap().length, 8, "a copy changes no length");

        // The index of the current file takes the copy in place of what it held of the
        // segment: its bytes read from there, in offset order.
        c.submit(append("small", 3, b"last")).unwrap();
        flush(&mut c);
        let (outcome, _) = c.read("small", 2, 100).unwrap();
        let (pieces, cur) = match outcome {
            ReadOutcome::Log { file_seq, pieces, .. } => (pieces, file_seq),
            ReadOutcome::Data(d) => panic!("served from the cache: {d:?}"),
            _ => panic!("not from the log"),
        };
        assert_eq!(cur, c.current_file());
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), 10, "bytes 2..12: the copy's rest, then the append");

        // A segment larger than a quarter of a file is never copied.
        let mut c = core();
        for name in ["big", "other"] {
            c.submit(Request::Create { name: name.into() }).unwrap();
        }
        for n in 1..6 {
            c.submit(append("other", n, &BLOCK)).unwrap();
        }
        flush(&mut c);
        fill_big_to_file_3(&mut c);
        let big = c.status("big").unwrap().length;
        c.submit(Request::Truncate { name: "big".into(), offset: big }).unwrap();
        flush(&mut c);
        assert_eq!((c.files_needed_from(), c.relocation()), (0, None), "300 KB of a 1 MiB file's log stays");
        assert_eq!(c.log_held_alone(2).map(|(n, ..)| n), Some("other".to_string()));
    }

    /// A full disk: writes are refused while it lasts, and queued operations dropped for it
    /// leave the accepted state as the durable one (a resend is taken anew, not as a
    /// duplicate; a refused create leaves no segment; a refused delete leaves it).
    #[test]
    fn refusing_queued_operations_restores_the_durable_state() {
        let mut c = core();
        for name in ["a", "gone"] {
            c.submit(Request::Create { name: name.into() }).unwrap();
        }
        c.submit(append("a", 1, b"one")).unwrap();
        flush(&mut c);
        assert_eq!(c.next_flush_file(), None, "nothing queued");

        c.submit(Request::Create { name: "b".into() }).unwrap();
        c.submit(append("a", 2, b"two")).unwrap();
        c.submit(Request::Delete { name: "gone".into() }).unwrap();
        assert_eq!(c.next_flush_file(), None, "the batch fits the current file");
        c.set_no_space(Some("no room".into()));
        let e = c.submit(append("a", 3, b"three")).err().unwrap();
        assert!(matches!(&e, EngineError::NoSpace(m) if m.contains("no room")), "{e}");
        assert!(matches!(c.submit(Request::Create { name: "c".into() }), Err(EngineError::NoSpace(_))));
        // What adds no data is still taken (it may be what frees space).
        c.submit(Request::Seal { name: "a".into() }).unwrap();
        assert_eq!(c.refuse_pending(), 4);
        assert!(!c.has_pending());

        c.set_no_space(None);
        assert!(matches!(c.status("b"), Err(EngineError::NoSuchSegment(_))), "a refused create leaves nothing");
        assert!(c.status("gone").is_ok(), "a refused delete leaves the segment");
        let a = c.status("a").unwrap();
        assert_eq!((a.length, a.sealed), (3, false));
        // The refused append comes again and is new, not a duplicate of an accepted one.
        let r = c.submit(append("a", 2, b"two"));
        assert!(matches!(r, Ok(Submitted::Queued)), "resend after refusal: {r:?}");
        c.submit(Request::Create { name: "b".into() }).unwrap();
        flush(&mut c);
        assert_eq!(c.status("a").unwrap().length, 6);
        assert!(c.status("b").is_ok());
    }

    /// A chunk record that a truncation accepted since the mover read the segment leaves
    /// wholly below the new start is refused (it would bring the truncated chunk back and
    /// keep a sealed, emptied segment from ever being closed); the chunk starting right at
    /// the new start is still taken.
    #[test]
    fn chunk_records_below_a_truncation_are_refused() {
        let mut c = core();
        c.submit(Request::Create { name: "a".into() }).unwrap();
        c.submit(append("a", 1, b"0123456789")).unwrap();
        flush(&mut c);
        let chunk = |start, len| Request::Chunk { name: "a".into(), start, epoch: 1, len };
        c.submit(chunk(0, 4)).unwrap();
        c.submit(Request::Truncate { name: "a".into(), offset: 6 }).unwrap();
        for (start, len) in [(4, 0), (4, 2), (0, 6)] {
            let r = c.submit(chunk(start, len));
            assert!(matches!(r, Err(EngineError::Truncated { .. })), "chunk at {start} of {len}: {r:?}");
        }
        // The chunk at 4 reaching past the truncation is kept, and a new one may start at 6.
        c.submit(chunk(4, 3)).unwrap();
        flush(&mut c);
        c.submit(Request::Truncate { name: "a".into(), offset: 7 }).unwrap();
        c.submit(chunk(7, 0)).unwrap();
        flush(&mut c);
    }

    /// The flush that needs a new log file is known before it starts.
    #[test]
    fn the_next_flush_says_when_it_rolls() {
        let mut c = core();
        c.submit(Request::Create { name: "a".into() }).unwrap();
        assert_eq!(c.next_flush_file(), Some(0), "the first flush creates the first file");
        flush(&mut c);
        let chunk: &'static [u8] = Box::leak(vec![b'x'; 60 << 10].into_boxed_slice());
        let mut n = 1;
        while c.next_flush_file().is_none() {
            c.submit(append("a", n, chunk)).unwrap();
            n += 1;
            if c.next_flush_file().is_none() {
                flush(&mut c);
            }
            assert!(n < 100, "a 1 MiB file never filled");
        }
        assert_eq!(c.next_flush_file(), Some(1));
        let plan = c.begin_flush().unwrap().unwrap();
        assert_eq!(plan.prepare, Some(1), "begin_flush rolls where next_flush_file said");
    }

    #[test]
    fn a_closed_current_file_takes_no_more_records() {
        let mut c = core();
        c.submit(Request::Create { name: "a".into() }).unwrap();
        flush(&mut c);
        c.submit(append("a", 1, b"one")).unwrap();
        assert_eq!(c.next_flush_file(), None, "a small append fits the current file");
        c.close_current_file();
        assert_eq!(c.next_flush_file(), Some(1), "closed: the next write rolls");
        let plan = c.begin_flush().unwrap().unwrap();
        assert_eq!(plan.prepare, Some(1));
        assert_eq!(plan.checkpoint.map(|s| s.pos), Some(FILE_HEADER_BYTES), "the new file opens with a checkpoint");
    }

    #[test]
    fn keep_first_keeps_the_smallest_in_order() {
        let mut v = vec![5, 1, 4, 2, 3];
        assert!(keep_first(&mut v, 3));
        assert_eq!(v, [1, 2, 3]);
        let mut w = vec![2, 1];
        assert!(!keep_first(&mut w, 2));
        assert_eq!(w, [1, 2]);
    }

    #[test]
    fn prefill_modes_parse_and_decide() {
        assert_eq!(Prefill::parse("auto"), Ok(Prefill::Auto));
        assert_eq!(Prefill::parse("always"), Ok(Prefill::Always));
        assert_eq!(Prefill::parse("never"), Ok(Prefill::Never));
        assert!(Prefill::parse("sometimes").unwrap_err().contains("auto, always or never"));
        // Auto zero-fills after small flushes at a low rate (light load), not after large
        // ones nor while the shard writes many bytes a second.
        assert!(Prefill::Auto.zero_fill(0, 0));
        assert!(Prefill::Auto.zero_fill(4096, 20_000_000));
        assert!(!Prefill::Auto.zero_fill(Prefill::AUTO_FLUSH_BYTES, 0));
        assert!(!Prefill::Auto.zero_fill(4 << 20, 0));
        assert!(!Prefill::Auto.zero_fill(64 << 10, Prefill::AUTO_RATE_BYTES));
        assert!(Prefill::Always.zero_fill(4 << 20, 1 << 30));
        assert!(!Prefill::Never.zero_fill(0, 0));
    }
}
