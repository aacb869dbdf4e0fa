//! The glommio driver of a container: direct-IO log files (DmaFile, O_DIRECT), the group
//! commit loop, waiters for acknowledgements and for data at a segment's tail, and reads
//! that miss the cache. Runs on the shard that owns the container; everything here is
//! single-threaded (Rc/RefCell), and no call blocks the executor.
//!
//! Group commit: submitting an operation queues it in the core; if no flush is running one
//! starts. A flush takes everything queued (up to the flush size cap), writes it as one
//! record to a file opened with O_DIRECT | O_DSYNC (so the write completes only once it is
//! on stable storage, like a write followed by fdatasync, in one I/O), and only then answers
//! the waiters. Operations queued meanwhile go into the next flush. A failed write poisons
//! the container: every waiter and every later request gets `ContainerPoisoned`; nothing is
//! retried. An optional per-shard pacer (`IoPacer`) spaces flushes on rate-limited devices,
//! and can make a busy container linger before flushing a small batch so that it carries more.

use super::image;
use crate::constants::{FILE_HEADER_BYTES, FILE_IMAGES_PER_SHARD, MERGE_READ_BYTES, PREFILL_CHUNK_BYTES};
use crate::container::core::{
    ContainerCore, CoreConfig, Damage, FLUSHES_IN_FLIGHT_MAX, FlushPlan, OpResult, ReadOutcome, Request, SegmentStatus,
    Submitted,
};
use crate::container::freeing::{FREEING_SUFFIX, SPARE_SUFFIX};
use crate::container::handoff;
use crate::container::index::FileIndex;
use crate::container::mover::{Tier2Config, Tier2State};
use crate::error::{EngineError, RecoveryError};
use crate::log::format::FileHeader;
use crate::log::scan::{check_records, scan_file, sound_records};
use crate::log::{file_name, parse_file_name};
use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{Either, select};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use sluice_net::messages::ContainerHealth;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds on this process's monotonic clock (from its first reading): the clock of
/// writer idleness. The wall clock served before: a forward step of it longer than
/// `--writer-idle-hours` (a restored VM, an NTP correction) made every writer idle at once,
/// and one resending a batch the container had accepted (within its retry window) got it
/// written twice.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A notice raised, at once, when an operation queued with it is refused with a transient
/// error (or dropped unanswered): set by the container as it refuses, before the refusal's
/// answer can be read. The server passes one per connection with its appends, so that it
/// reads no later append of that connection after a refused one (see `Container::submit_noting`).
pub type RefusalNotice = Rc<Cell<bool>>;

/// The answer to one queued operation, and the notice to raise if it is refused.
struct Waiter {
    tx: Option<oneshot::Sender<Result<OpResult, EngineError>>>,
    notice: Option<RefusalNotice>,
}

impl Waiter {
    fn answer(mut self, result: Result<OpResult, EngineError>) {
        if let (Err(e), Some(n)) = (&result, &self.notice)
            && e.code().0.is_transient()
        {
            n.set(true);
        }
        // Answered: taking the sender keeps `drop` from raising the notice.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }
}

impl Drop for Waiter {
    /// Dropped unanswered (the container is going away): its operation fails `Poisoned`.
    fn drop(&mut self) {
        if self.tx.is_some()
            && let Some(n) = &self.notice
        {
            n.set(true);
        }
    }
}

/// Where a container a node now owns gets its state from (cluster mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenSource {
    /// Never owned before.
    Fresh,
    /// This node owned it last: its local log (else the last hand-off).
    Local,
    /// The previous owner's hand-off in tier-2.
    Handoff,
}

/// A flush slower than this is logged as a warning (a failing or overloaded disk).
const SLOW_FLUSH: Duration = Duration::from_secs(1);

/// Batches of at least this many bytes are flushed without lingering (`--flush-linger-us`).
const LINGER_BYTES_MAX: usize = 64 << 10;

/// Durable data read from a segment.
#[derive(Debug)]
pub struct ReadData {
    /// The bytes read, in order, in one or more pieces: a read served from a file image
    /// keeps each append's slice of the image, and the pieces go to the socket as they are
    /// (never copied together on the server).
    pub pieces: Vec<Bytes>,
    pub status: SegmentStatus,
}

impl ReadData {
    fn one(data: Bytes, status: SegmentStatus) -> Self {
        Self { pieces: if data.is_empty() { Vec::new() } else { vec![data] }, status }
    }

    /// Bytes read.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(Bytes::is_empty)
    }

    /// The bytes as one buffer (a copy only if there are several pieces).
    pub fn to_bytes(&self) -> Bytes {
        match &self.pieces[..] {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }
}

pub(crate) struct Files {
    current: Option<Rc<DmaFile>>,
    current_seq: u64,
    /// The next log file: being prepared, or ready.
    next: Option<NextFile>,
    pub(crate) readers: HashMap<u64, Rc<DmaFile>>,
    /// Files being read to index them, with the reads waiting for that.
    indexing: HashMap<u64, Vec<oneshot::Sender<()>>>,
    /// Freed log files kept for reuse as later ones (`.spare`, `CoreConfig::spare_files`).
    pub(crate) spares: Vec<PathBuf>,
    /// Log files renamed `.free`, waiting to be cut in steps and unlinked, oldest first.
    pub(crate) freeing: VecDeque<PathBuf>,
    /// A task is working through `freeing`.
    pub(crate) cutting: bool,
}

impl Files {
    /// No file open yet; `current_seq` the log's current file.
    fn new(current_seq: u64) -> Self {
        Self {
            current: None,
            current_seq,
            next: None,
            readers: HashMap::new(),
            indexing: HashMap::new(),
            spares: Vec::new(),
            freeing: VecDeque::new(),
            cutting: false,
        }
    }
}

pub(crate) enum NextFile {
    Preparing(u64, glommio::task::JoinHandle<Result<DmaFile, PrepareFailure>>),
    Ready(u64, DmaFile),
}

/// Why a log file could not be prepared.
pub(crate) struct PrepareFailure {
    message: String,
    /// The file system is full (`ENOSPC`, `EDQUOT`): worth retrying once space is freed.
    no_space: bool,
}

impl PrepareFailure {
    fn new<T>(what: &str, path: &Path, e: glommio::GlommioError<T>) -> Self
    where
        glommio::GlommioError<T>: std::fmt::Display,
    {
        let source = match &e {
            glommio::GlommioError::IoError(s) | glommio::GlommioError::EnhancedIoError { source: s, .. } => {
                s.raw_os_error()
            }
            _ => None,
        };
        let no_space = matches!(source, Some(libc::ENOSPC) | Some(libc::EDQUOT));
        Self { message: io_err(what, path, e), no_space }
    }

    fn other(message: String) -> Self {
        Self { message, no_space: false }
    }
}

/// How often a container whose disk is full tries again to create its next log file.
const NO_SPACE_RETRY: Duration = Duration::from_secs(1);
/// Without tier-2, `sluice stats` names a segment that alone keeps at least this many log
/// files the other segments let go.
const LOG_HELD_ALONE_NOTE_FILES: u64 = 4;

pub struct Container {
    id: u32,
    /// Unique among the containers this process opened (a container opened again, after a
    /// hand-off, gets a new one): the key of its file images.
    instance: u64,
    pub(crate) dir: PathBuf,
    pub(crate) core: RefCell<ContainerCore>,
    waiters: RefCell<VecDeque<Waiter>>,
    tail_waiters: RefCell<HashMap<u64, Vec<oneshot::Sender<()>>>>,
    flushing: Cell<bool>,
    /// Wakes a flush loop waiting on a write when operations are queued (it may begin
    /// another flush beside the one in flight).
    queued: Nudge,
    /// Flushes begun while another was being written, since the container opened.
    begun_beside: Cell<u64>,
    /// Mean size of recent batch writes, moving average over about 8 (for `Prefill::Auto`).
    flush_mean: Cell<u64>,
    pub(crate) files: RefCell<Files>,
    pacer: Rc<IoPacer>,
    pub(crate) tier2: Option<Tier2State>,
    /// A stop requested while a flush ran, applied by the flush loop between flushes.
    stop_reason: RefCell<Option<String>>,
    /// A log file is being prepared.
    preparing: Cell<bool>,
    /// When preparing the last log file failed for want of space (cleared by a success).
    no_space_since: Cell<Option<Instant>>,
    /// The records the last read from the disk took and checked: (file, position, bytes).
    /// Records are never written again once durable, so it stays valid; one per container.
    checked_span: RefCell<Option<(u64, u64, Bytes)>>,
    /// Reads refused on damaged data since the container opened, and the last one's error.
    damaged_reads: Cell<u64>,
    last_damaged_read: RefCell<Option<String>>,
    /// The damage the tier-2 mover's reads last met: its retries of the same refusal are
    /// counted once in `damaged_reads`.
    mover_damage: RefCell<Option<String>>,
    /// When the last scrub of the log ended, and what it found (empty: sound).
    pub(crate) last_scrub: RefCell<Option<(Instant, Vec<String>)>>,
    /// Opens of older log files in flight (`reader_file`): freeing waits for them.
    opens_in_flight: Cell<usize>,
    /// Without tier-2: wakes the sleeping task that frees log files.
    pub(crate) freer_wake: Alarm,
    /// Log files made from freed ones since the container opened.
    files_reused: Cell<u64>,
    /// Without tier-2: segments copied to free the oldest log file since the container
    /// opened (`relocate_holders`).
    pub(crate) relocations: Cell<u64>,
}

/// Container directories with a log file being prepared, once per preparation under way
/// (the process's, every shard's). A preparation runs on as a task of its own after its
/// container stopped: an opening of the same directory (a container closed and opened
/// again, as a cluster node does when it regains one) waits for it, or it would list the
/// directory before the file exists and later create the same file (`EEXIST`, which poisons
/// the container on its next roll).
static PREPARING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Longest wait of an opening for an earlier instance's log file preparation.
const EARLIER_PREPARE_WAIT: Duration = Duration::from_secs(60);

/// One preparation under way in a directory (`PREPARING`), until dropped.
struct PreparingIn(PathBuf);

impl PreparingIn {
    fn new(dir: &Path) -> Self {
        PREPARING.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_path_buf());
        Self(dir.to_path_buf())
    }

    fn any_in(dir: &Path) -> bool {
        PREPARING.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|d| d == dir)
    }
}

impl Drop for PreparingIn {
    fn drop(&mut self) {
        let mut all = PREPARING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = all.iter().position(|d| *d == self.0) {
            all.swap_remove(i);
        }
    }
}

/// Waits until no earlier instance of the container in `dir` prepares a log file there.
async fn wait_for_earlier_prepares(dir: &Path) -> Result<(), String> {
    wait_until("an earlier opening's log file preparation", EARLIER_PREPARE_WAIT, || !PreparingIn::any_in(dir)).await
}

/// Waits (bounded by `limit`, looking every 2 ms) until `done`.
pub(crate) async fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// A background task's sleep that others can cut short (the mover's, the freer's).
#[derive(Default)]
pub(crate) struct Alarm(RefCell<Option<oneshot::Sender<()>>>);

impl Alarm {
    /// Sleeps for `d`, or until `ring`.
    pub(crate) async fn sleep(&self, d: Duration) {
        let (tx, rx) = oneshot::channel();
        *self.0.borrow_mut() = Some(tx);
        let sleep = glommio::timer::sleep(d);
        futures::pin_mut!(sleep);
        let _ = futures::future::select(rx, sleep).await;
        self.0.borrow_mut().take();
    }

    /// Ends the sleep in progress, if any.
    pub(crate) fn ring(&self) {
        if let Some(tx) = self.0.borrow_mut().take() {
            let _ = tx.send(());
        }
    }
}

/// Wakes one waiting task, or the next one to wait if none waits now (a wake is never lost).
#[derive(Default)]
struct Nudge {
    nudged: Cell<bool>,
    waiter: RefCell<Option<std::task::Waker>>,
}

impl Nudge {
    fn nudge(&self) {
        self.nudged.set(true);
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }

    /// Returns once nudged (since the last return).
    fn nudged(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.nudged.replace(false) {
                return std::task::Poll::Ready(());
            }
            *self.waiter.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
    }
}

/// A flush's write under way, on a task of its own (so that a second can be written at once):
/// its plan, and the write's result and time taken.
struct Writing {
    plan: FlushPlan,
    task: glommio::task::JoinHandle<(Result<(), String>, Duration)>,
}

/// Counts an open of a log file while it is in flight (also when its future is dropped).
struct OpenInFlight<'a>(&'a Cell<usize>);

impl<'a> OpenInFlight<'a> {
    fn new(count: &'a Cell<usize>) -> Self {
        count.set(count.get() + 1);
        Self(count)
    }
}

impl Drop for OpenInFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A shard's I/O budget (flushes per second), as a GCRA rate limiter: a burst of up to
/// `burst` is free, beyond it flushes are spaced `interval` apart. While a flush waits for
/// its turn, more operations queue, so each flush carries more: throughput holds, the I/O
/// rate stays within a device's budget (rate-limited cloud volumes delay I/O beyond theirs
/// by whole refill periods). An interval of zero disables it.
pub struct IoPacer {
    interval: Duration,
    burst: Duration,
    /// Theoretical arrival time of the next flush.
    tat: Cell<Instant>,
    /// Flushes a container may have in flight at once (1 or 2; 1 with a rate limit or linger).
    depth: usize,
    /// How long a flush of a small batch that follows another flush at once waits first.
    linger: Duration,
    /// Bytes the shard's containers wrote to their logs recently (`Prefill::Auto`).
    written: RateMeter,
}

/// Bytes a second over the last one or two windows of `RATE_WINDOW` (a shard's log writes).
struct RateMeter {
    since: Cell<Instant>,
    current: Cell<u64>,
    previous: Cell<u64>,
}

const RATE_WINDOW: Duration = Duration::from_millis(500);

impl RateMeter {
    fn new(now: Instant) -> Self {
        Self { since: Cell::new(now), current: Cell::new(0), previous: Cell::new(0) }
    }

    /// Starts a new window if the current one is over (a window with nothing written in
    /// it counts as an empty previous one).
    fn roll(&self, now: Instant) {
        let age = now.saturating_duration_since(self.since.get());
        if age < RATE_WINDOW {
            return;
        }
        self.previous.set(if age < 2 * RATE_WINDOW { self.current.get() } else { 0 });
        self.current.set(0);
        self.since.set(now);
    }

    fn add(&self, bytes: u64, now: Instant) {
        self.roll(now);
        self.current.set(self.current.get() + bytes);
    }

    fn per_second(&self, now: Instant) -> u64 {
        self.roll(now);
        let span = RATE_WINDOW + now.saturating_duration_since(self.since.get());
        ((self.previous.get() + self.current.get()) as f64 / span.as_secs_f64()) as u64
    }
}

impl IoPacer {
    pub fn new(flushes_per_second: u64, linger: Duration) -> Self {
        let interval =
            if flushes_per_second == 0 { Duration::ZERO } else { Duration::from_secs(1) / flushes_per_second as u32 };
        let now = Instant::now();
        Self { interval, burst: interval * 8, tat: Cell::new(now), depth: 1, linger, written: RateMeter::new(now) }
    }

    /// Sets how many flushes a container may have in flight at once (clamped to 1 ..=
    /// `FLUSHES_IN_FLIGHT_MAX`). With a flush rate limit or a linger it is always 1: those
    /// space flushes out on purpose.
    pub fn with_flush_depth(mut self, depth: usize) -> Self {
        self.depth = depth.clamp(1, FLUSHES_IN_FLIGHT_MAX);
        self
    }

    fn flush_depth(&self) -> usize {
        if self.interval.is_zero() && self.linger.is_zero() { self.depth } else { 1 }
    }

    /// A container of the shard wrote `bytes` to its log.
    fn wrote(&self, bytes: u64) {
        self.written.add(bytes, Instant::now());
    }

    /// Bytes a second the shard's containers recently wrote to their logs.
    fn written_per_second(&self) -> u64 {
        self.written.per_second(Instant::now())
    }

    /// How long the flush of `pending` bytes waits for more: only right after another flush
    /// (operations arrived while it ran: the container is busy) and only for a batch smaller
    /// than `LINGER_BYTES_MAX` (a large one is worth its write as it is). An operation that
    /// finds the container idle is flushed at once, so light load never waits.
    fn linger(&self, after_flush: bool, pending: usize) -> Duration {
        if after_flush && pending > 0 && pending < LINGER_BYTES_MAX { self.linger } else { Duration::ZERO }
    }

    /// How long the next flush must wait.
    fn delay(&self) -> Duration {
        if self.interval.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let tat = self.tat.get().max(now);
        self.tat.set(tat + self.interval);
        tat.checked_sub(self.burst).map_or(Duration::ZERO, |allowed| allowed.saturating_duration_since(now))
    }
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// Reads a whole file with direct I/O, on a helper thread into the image's own memory (see
/// `image`): the shard neither copies nor submits the reads. `then` runs on that thread too,
/// with the image: checking and indexing a 64 MiB log file takes milliseconds that the
/// shard's appends would otherwise wait (with a catch-up reader at ~300 MB/s, concurrent
/// writers' p99 was 25-48 ms with that work on the shard, 13-17 ms without).
async fn read_whole<T: Send + 'static>(
    path: &Path,
    then: impl FnOnce(Bytes) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let owned = path.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || then(image::read_file(&owned).map_err(|e| io_err("reading", &owned, e))?))
        .await
}

/// Removes directory `dir` and everything in it on the shard's helper thread: unlinking each
/// 64 MiB log file takes milliseconds that the shard's appends would otherwise wait.
pub(crate) async fn remove_dir_off_shard(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    glommio::executor().spawn_blocking(move || std::fs::remove_dir_all(&dir)).await
}

/// Runs `op` on each of `paths` on the shard's helper thread. Every path is tried; a missing
/// file counts as done; returns the paths done and the first error (`verb` names the
/// operation in it).
async fn each_path_off_shard(
    paths: Vec<PathBuf>,
    verb: &'static str,
    op: impl Fn(&Path) -> std::io::Result<()> + Send + 'static,
) -> (Vec<PathBuf>, Result<(), String>) {
    if paths.is_empty() {
        return (Vec::new(), Ok(()));
    }
    glommio::executor()
        .spawn_blocking(move || {
            let (mut done, mut first_error) = (Vec::new(), Ok(()));
            for path in paths {
                match op(&path) {
                    Ok(()) => done.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        if first_error.is_ok() {
                            first_error = Err(format!("{verb} {}: {e}", path.display()));
                        }
                    }
                }
            }
            (done, first_error)
        })
        .await
}

/// Removes files `paths` on the shard's helper thread (unlinking a 64 MiB log file takes
/// 15-25 ms here, which the shard's appends would otherwise wait). Every file is tried; a
/// missing one counts as removed; the first error is returned.
pub(crate) async fn remove_files_off_shard(paths: Vec<PathBuf>) -> Result<(), String> {
    each_path_off_shard(paths, "deleting", |p| std::fs::remove_file(p)).await.1
}

/// Renames each group of files (in `dir`) to its extension on the shard's helper thread,
/// then syncs `dir` once if any was renamed. Returns each group's new names and the first
/// error (a file that failed stays as it was); `Err` only if the directory could not be
/// synced.
pub(crate) async fn rename_files_off_shard(
    dir: &Path,
    groups: Vec<(Vec<PathBuf>, &'static str)>,
) -> Result<(Vec<Vec<PathBuf>>, Result<(), String>), String> {
    let (mut renamed, mut first_error) = (Vec::with_capacity(groups.len()), Ok(()));
    for (paths, ext) in groups {
        let (done, error) =
            each_path_off_shard(paths, "renaming", move |p| std::fs::rename(p, p.with_extension(ext))).await;
        renamed.push(done.into_iter().map(|p| p.with_extension(ext)).collect::<Vec<_>>());
        first_error = first_error.and(error);
    }
    if renamed.iter().any(|r| !r.is_empty()) {
        sync_dir(dir).await?;
    }
    Ok((renamed, first_error))
}

thread_local! {
    /// Images of older log files read whole to index them, by container instance and file:
    /// reads of such a file are served from its image, so a reader catching up reads each
    /// file once, not twice. A shard is a thread: at most `FILE_IMAGES_PER_SHARD` images per
    /// shard, the oldest dropped first.
    static FILE_IMAGES: RefCell<VecDeque<(u64, u64, Bytes)>> = const { RefCell::new(VecDeque::new()) };
}

fn file_image(instance: u64, seq: u64) -> Option<Bytes> {
    FILE_IMAGES.with(|i| i.borrow().iter().find(|(c, s, _)| (*c, *s) == (instance, seq)).map(|(_, _, b)| b.clone()))
}

fn keep_file_image(instance: u64, seq: u64, image: Bytes) {
    FILE_IMAGES.with(|i| {
        let mut images = i.borrow_mut();
        images.retain(|(c, s, _)| (*c, *s) != (instance, seq));
        images.push_back((instance, seq, image));
        while images.len() > FILE_IMAGES_PER_SHARD {
            images.pop_front();
        }
    })
}

fn drop_file_images(instance: u64) {
    drop_file_images_before(instance, u64::MAX);
}

/// Drops the images of container `instance` of files before `seq`.
fn drop_file_images_before(instance: u64, seq: u64) {
    // The images' memory goes back to the pool once no reply holds a slice of it.
    FILE_IMAGES.with(|i| i.borrow_mut().retain(|&(c, s, _)| c != instance || s >= seq));
}

/// The leading pieces (file position, length) that `image`, which holds the file from
/// `base` on, holds, in order, as slices of it (no copy): all of them, some, or none.
fn held_slices(image: &Bytes, base: u64, pieces: &[(u64, u64)]) -> Vec<Bytes> {
    let end = base + image.len() as u64;
    pieces
        .iter()
        .take_while(|&&(pos, len)| pos >= base && pos + len <= end)
        .map(|&(pos, len)| image.slice((pos - base) as usize..(pos - base + len) as usize))
        .collect()
}

/// All the pieces out of `image` (see `held_slices`); `None` if it does not hold them all.
fn slices(image: &Bytes, base: u64, pieces: &[(u64, u64)]) -> Option<Vec<Bytes>> {
    Some(held_slices(image, base, pieces)).filter(|s| s.len() == pieces.len())
}

async fn write_all_at(file: &DmaFile, buf: glommio::io::DmaBuffer, pos: u64, path: &Path) -> Result<(), String> {
    let len = buf.len();
    let n = file.write_at(buf, pos).await.map_err(|e| io_err("writing", path, e))?;
    if n != len {
        return Err(format!("short write to {}: {n} of {len} bytes at {pos}", path.display()));
    }
    Ok(())
}

async fn sync_dir(dir: &Path) -> Result<(), String> {
    let d = glommio::io::Directory::open(dir).await.map_err(|e| io_err("opening directory", dir, e))?;
    d.sync().await.map_err(|e| io_err("syncing directory", dir, e))?;
    let _ = d.close().await;
    Ok(())
}

/// Set once `FALLOC_FL_WRITE_ZEROES` was refused here (old kernel, file system or device
/// without zeroing by unmap), so later files skip the attempt.
static WRITE_ZEROES_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// `FALLOC_FL_WRITE_ZEROES` (Linux 6.17): allocate written, zeroed blocks without moving data.
const FALLOC_FL_WRITE_ZEROES: libc::c_int = 0x80;

/// Zeroes `len` bytes of `file` as written blocks by `FALLOC_FL_WRITE_ZEROES`, on a helper
/// thread (the call may take a while). False when the system cannot.
async fn write_zeroes(file: &DmaFile, len: u64) -> bool {
    if WRITE_ZEROES_UNSUPPORTED.load(Ordering::Relaxed) {
        return false;
    }
    let fd = file.as_raw_fd();
    // The file stays open until this returns: the descriptor is valid throughout.
    let result = glommio::executor()
        .spawn_blocking(move || {
            // SAFETY: plain syscall on a descriptor that stays open for the call's duration.
            let rc = unsafe { libc::fallocate(fd, FALLOC_FL_WRITE_ZEROES, 0, len as libc::off_t) };
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        })
        .await;
    match result {
        Ok(()) => true,
        Err(e) => {
            if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)) {
                WRITE_ZEROES_UNSUPPORTED.store(true, Ordering::Relaxed);
                tracing::debug!(error = %e, "FALLOC_FL_WRITE_ZEROES unavailable: log files are zero-filled by writes");
            }
            false
        }
    }
}

/// Creates log file `seq`: its blocks allocated (with `zero_fill`, also zeroed as written
/// blocks, so later durable writes carry no allocation metadata: by `FALLOC_FL_WRITE_ZEROES`
/// where supported, else by writing zeros), the header block written, fdatasync, directory
/// fsync. See `Prefill`. A file that cannot be made whole (a full disk) is removed again:
/// no log file is ever used without all its blocks.
async fn prepare_log_file(dir: PathBuf, header: FileHeader, zero_fill: bool) -> Result<DmaFile, PrepareFailure> {
    let path = dir.join(file_name(header.seq));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .dma_open(&path)
        .await
        .map_err(|e| PrepareFailure::new("creating", &path, e))?;
    let filled = fill_log_file(&f, &header, zero_fill, &path).await;
    let _ = f.close().await;
    if let Err(failure) = filled {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a log file that could not be prepared");
        }
        return Err(failure);
    }
    sync_dir(&dir).await.map_err(PrepareFailure::other)?;
    open_log_for_writing(&path).await.map_err(PrepareFailure::other)
}

/// Makes the spare (freed) log file `spare` log file `header.seq`: its header block written
/// with the new sequence number and `min_lsn`, and the block after it (where the earlier
/// use's opening checkpoint lies) cleared, both synced, before it is renamed and the
/// directory synced. Its blocks are all allocated and mostly written already: durable
/// writes into them need no metadata write (`Prefill`), and nothing is zero-filled. Records of its
/// earlier use stay after the new ones and have lower LSNs than `min_lsn` (FORMAT.md).
/// A spare of another size (the file size changed) is not used. The spare is gone either
/// way (`Err`: removed, or left to the next open, which deletes `.spare` files).
async fn recycle_log_file(dir: &Path, spare: PathBuf, header: FileHeader) -> Result<DmaFile, String> {
    let path = dir.join(file_name(header.seq));
    let reused = async {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&spare)
            .await
            .map_err(|e| io_err("opening", &spare, e))?;
        let written = async {
            let size = f.file_size().await.map_err(|e| io_err("reading the size of", &spare, e))?;
            if size != header.file_bytes {
                return Err(format!("{} holds {size} bytes, not {}", spare.display(), header.file_bytes));
            }
            write_all_at(&f, header_blocks(&f, &header, 2), 0, &spare).await?;
            f.fdatasync().await.map_err(|e| io_err("syncing", &spare, e))
        }
        .await;
        let _ = f.close().await;
        written?;
        let (from, to) = (spare.clone(), path.clone());
        glommio::executor()
            .spawn_blocking(move || std::fs::rename(&from, &to))
            .await
            .map_err(|e| io_err("renaming", &spare, e))?;
        sync_dir(dir).await?;
        open_log_for_writing(&path).await
    }
    .await;
    if reused.is_err() {
        let _ = remove_files_off_shard(vec![spare]).await;
    }
    reused
}

/// A log file's header block (block 0) followed by `blocks - 1` zeroed blocks, ready to write.
fn header_blocks(f: &DmaFile, header: &FileHeader, blocks: usize) -> glommio::io::DmaBuffer {
    let mut head = f.alloc_dma_buffer(blocks * FILE_HEADER_BYTES as usize);
    head.as_bytes_mut().fill(0);
    header.encode(head.as_bytes_mut());
    head
}

/// Allocates (and zero-fills) a new log file's blocks and writes its header block, durably.
async fn fill_log_file(f: &DmaFile, header: &FileHeader, zero_fill: bool, path: &Path) -> Result<(), PrepareFailure> {
    let zeroed = zero_fill && write_zeroes(f, header.file_bytes).await;
    if !zeroed {
        // A full file system must not hand out a file whose later writes would fail.
        allocate(f, header.file_bytes, path).await?;
    }
    // The header block, then (zero-filling without zeroing by allocation) zeros up to the
    // end: one zeroed buffer written again and again (a fresh one per chunk cost a memset of
    // the whole file: 8% of a shard's time with four containers rolling files under load).
    write_shared_at(f, Rc::new(header_blocks(f, header, 1)), 0, path).await?;
    let end = if zero_fill && !zeroed { header.file_bytes } else { FILE_HEADER_BYTES };
    let mut pos = FILE_HEADER_BYTES;
    let mut zeros: Option<Rc<glommio::io::DmaBuffer>> = None;
    while pos < end {
        let n = (end - pos).min(PREFILL_CHUNK_BYTES as u64) as usize;
        let buf = match &zeros {
            Some(z) if z.len() == n => z.clone(),
            _ => {
                let mut z = f.alloc_dma_buffer(n);
                z.as_bytes_mut().fill(0);
                zeros.insert(Rc::new(z)).clone()
            }
        };
        write_shared_at(f, buf, pos, path).await?;
        pos += n as u64;
    }
    f.fdatasync().await.map_err(|e| PrepareFailure::new("syncing", path, e))
}

/// Writes all of `buf` (which the caller may write again) at `pos` while preparing a file.
async fn write_shared_at(
    f: &DmaFile,
    buf: Rc<glommio::io::DmaBuffer>,
    pos: u64,
    path: &Path,
) -> Result<(), PrepareFailure> {
    let n = buf.len();
    let written = f.write_rc_at(buf, pos).await.map_err(|e| PrepareFailure::new("writing", path, e))?;
    if written != n {
        return Err(PrepareFailure::other(format!(
            "short write to {}: {written} of {n} bytes at {pos}",
            path.display()
        )));
    }
    Ok(())
}

/// Allocates whatever of the first `len` bytes of `f` is not allocated yet (for a file
/// already whole, the call only walks its extents). `Err` only when the disk has no room:
/// a file system without `fallocate` allocates as the file is written.
async fn allocate(f: &DmaFile, len: u64, path: &Path) -> Result<(), PrepareFailure> {
    match f.pre_allocate(len, false).await {
        Err(e) => {
            let failure = PrepareFailure::new("allocating", path, e);
            if failure.no_space { Err(failure) } else { Ok(()) }
        }
        Ok(()) => Ok(()),
    }
}

/// Opens a log file for records: O_DIRECT and O_DSYNC, so a write is durable (data and
/// the metadata to find it) when it completes: one I/O per flush instead of write then
/// fdatasync. The preallocated, zero-filled file needs no allocation metadata on the way.
async fn open_log_for_writing(path: &Path) -> Result<DmaFile, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .dma_open(path)
        .await
        .map_err(|e| io_err("opening", path, e))
}

impl Container {
    /// Opens (recovering) or creates container `cfg.container` under `dir`.
    /// `pacer` is the shard's I/O budget, shared by its containers. With `tier2`, a mover
    /// task starts that copies data to tier-2 and frees log files.
    pub async fn open(
        cfg: CoreConfig,
        dir: PathBuf,
        pacer: Rc<IoPacer>,
        tier2: Option<Tier2Config>,
    ) -> Result<Rc<Self>, RecoveryError> {
        let (core, files) = Self::recover_dir(cfg, &dir).await?;
        Ok(Self::assemble(core, files, dir, pacer, tier2, false))
    }

    /// Opens a container this node now owns at `epoch` (cluster mode; tier-2 required):
    /// from its local log (`Local`; a log holding a newer epoch is refused: this node was
    /// deposed), from the previous owner's hand-off in tier-2 (`Handoff`; the local log, if
    /// any, is stale and deleted), or empty (`Fresh`). Announces the new epoch in tier-2, so
    /// a deposed owner's mover stops.
    pub async fn open_owned(
        cfg: CoreConfig,
        dir: PathBuf,
        pacer: Rc<IoPacer>,
        tier2: Tier2Config,
        epoch: u64,
        source: OpenSource,
    ) -> Result<Rc<Self>, String> {
        let c = cfg.container;
        let store = tier2.store.clone();
        let has_log = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_str().and_then(parse_file_name).is_some()))
            .unwrap_or(false);
        let (core, files) = if source == OpenSource::Local && has_log {
            let (mut core, files) = Self::recover_dir(cfg, &dir).await.map_err(|e| e.to_string())?;
            if core.epoch() > epoch {
                return Err(format!(
                    "container {c}: the local log holds epoch {} but this node owns the container at epoch {epoch}: \
                     refusing to write under a stale epoch",
                    core.epoch() - 1
                ));
            }
            core.set_epoch(epoch);
            (core, files)
        } else {
            // Whatever local log there is belongs to an older term: start over.
            wait_for_earlier_prepares(&dir).await?;
            if dir.exists() {
                remove_dir_off_shard(&dir).await.map_err(|e| io_err("removing", &dir, e))?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
            let core = match (source, handoff::read_latest(&store, c, epoch).await?) {
                (OpenSource::Fresh, None) => ContainerCore::new(cfg, epoch, 0),
                (_, Some((from, ck))) => {
                    let (core, cut) = ContainerCore::from_handoff(cfg, ck, epoch);
                    for (segment, kept, had) in cut {
                        tracing::error!(container = c, %segment, kept, had, "hand-off lacked data in tier-2");
                    }
                    tracing::info!(container = c, from_epoch = from, epoch, "container taken over from tier-2");
                    core
                }
                (OpenSource::Local, None) => {
                    tracing::warn!(container = c, "no local log and no hand-off in tier-2: starting empty");
                    ContainerCore::new(cfg, epoch, 0)
                }
                (OpenSource::Handoff, None) => {
                    return Err(format!("container {c}: no hand-off in tier-2 below epoch {epoch}"));
                }
            };
            (core, Files::new(0))
        };
        handoff::claim(&store, c, epoch).await?;
        Ok(Self::assemble(core, files, dir, pacer, Some(tier2), true))
    }

    /// Recovers the container in `dir` from its log files.
    async fn recover_dir(cfg: CoreConfig, dir: &Path) -> Result<(ContainerCore, Files), RecoveryError> {
        let dir = dir.to_path_buf();
        wait_for_earlier_prepares(&dir).await.map_err(|reason| RecoveryError::Invalid { file: dir.clone(), reason })?;
        let ioerr = |source: std::io::Error| RecoveryError::Io { file: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(ioerr)?;
        // Make the directory chain itself durable (containers/ and the data directory).
        for d in dir.ancestors().skip(1).take(2) {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|source| RecoveryError::Io { file: d.into(), source })?;
        }
        let entries: Vec<PathBuf> =
            std::fs::read_dir(&dir).map_err(ioerr)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // Log files a crash caught while they were being freed (cut short, renamed first):
        // their data is in tier-2. Spare files are not kept across starts either. One may be
        // gone already: a stopped instance's freeing round ends its work on its own.
        for path in entries.iter().filter(|p| p.extension().is_some_and(|x| x == FREEING_SUFFIX || x == SPARE_SUFFIX)) {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RecoveryError::Io { file: path.clone(), source: e });
                }
                _ => {}
            }
        }
        let mut seqs: Vec<u64> =
            entries.iter().filter_map(|p| p.file_name().and_then(|n| n.to_str()).and_then(parse_file_name)).collect();
        seqs.sort_unstable();
        // Read files newest first until one opens with a checkpoint: recovery needs only those.
        let mut images: Vec<(u64, Bytes)> = Vec::new();
        for &seq in seqs.iter().rev() {
            let path = dir.join(file_name(seq));
            let bytes =
                read_whole(&path, Ok).await.map_err(|reason| RecoveryError::Invalid { file: path.clone(), reason })?;
            let has_checkpoint = scan_file(&bytes)
                .records
                .first()
                .is_some_and(|r| r.header.kind == crate::log::format::RecordKind::Checkpoint);
            images.insert(0, (seq, bytes));
            if has_checkpoint {
                break;
            }
        }
        let (mut core, report) = ContainerCore::recover(cfg.clone(), &images).map_err(|f| match f {
            crate::container::core::RecoverFault::Corrupt { file_seq, at, valid_at } => {
                RecoveryError::Corrupt { file: dir.join(file_name(file_seq)), offset: at, valid_at }
            }
            crate::container::core::RecoverFault::Invalid { file_seq, reason } => {
                RecoveryError::Invalid { file: dir.join(file_name(file_seq)), reason }
            }
        })?;
        drop(images);
        // Files below the oldest one on disk were freed after their data went to tier-2.
        if let Some(&first) = seqs.first() {
            core.forget_files_below(first);
        }
        for seq in &report.discard_files {
            let path = dir.join(file_name(*seq));
            std::fs::remove_file(&path).map_err(|source| RecoveryError::Io { file: path, source })?;
        }
        if let Some(header) = report.rebuilt_header {
            // Salvaging: the damaged header block written again, so the next start needs no
            // salvage for it.
            let path = dir.join(file_name(header.seq));
            let invalid = |reason| RecoveryError::Invalid { file: path.clone(), reason };
            let f = open_log_for_writing(&path).await.map_err(invalid)?;
            write_all_at(&f, header_blocks(&f, &header, 1), 0, &path).await.map_err(invalid)?;
            f.fdatasync().await.map_err(|e| invalid(e.to_string()))?;
            let _ = f.close().await;
        }
        let mut files = Files::new(core.current_file());
        if let Some(seq) = report.current_file {
            let path = dir.join(file_name(seq));
            let f = open_log_for_writing(&path)
                .await
                .map_err(|reason| RecoveryError::Invalid { file: path.clone(), reason })?;
            if let Some((_, at, clear)) = report.clear_torn {
                // Clear the torn tail so no stale bytes sit after future records (whole
                // blocks: the records before it in its first block are written again as
                // they are).
                let invalid = |reason| RecoveryError::Invalid { file: path.clone(), reason };
                let mut buf = f.alloc_dma_buffer(clear.len());
                buf.as_bytes_mut().copy_from_slice(&clear);
                write_all_at(&f, buf, at, &path).await.map_err(invalid)?;
                f.fdatasync().await.map_err(|e| invalid(e.to_string()))?;
            }
            // A file made by an older build may lack blocks (it ignored a failed fallocate).
            let len = f
                .file_size()
                .await
                .map_err(|e| RecoveryError::Invalid { file: path.clone(), reason: e.to_string() })?;
            if let Err(failure) = allocate(&f, len, &path).await {
                tracing::warn!(
                    container = core.config().container,
                    reason = %failure.message,
                    "the current log file is not fully allocated and the disk has no room for it: \
                     the next write rolls into a new file"
                );
                core.close_current_file();
            }
            files.current = Some(Rc::new(f));
        }
        for line in core.salvaged() {
            tracing::error!(container = core.config().container, "recovery salvaged past damage: {line}");
        }
        if report.torn_tail_at.is_some() || report.records_replayed > 0 {
            tracing::info!(
                container = core.config().container,
                replayed = report.records_replayed,
                torn_tail_at = ?report.torn_tail_at,
                segments = core.segment_count(),
                epoch = core.epoch(),
                "container recovered"
            );
        }
        Ok((core, files))
    }

    fn assemble(
        core: ContainerCore,
        files: Files,
        dir: PathBuf,
        pacer: Rc<IoPacer>,
        tier2: Option<Tier2Config>,
        owned: bool,
    ) -> Rc<Self> {
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let container = Rc::new(Self {
            id: core.config().container,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            dir,
            core: RefCell::new(core),
            waiters: RefCell::new(VecDeque::new()),
            tail_waiters: RefCell::new(HashMap::new()),
            flushing: Cell::new(false),
            queued: Nudge::default(),
            begun_beside: Cell::new(0),
            flush_mean: Cell::new(0),
            files: RefCell::new(files),
            pacer,
            tier2: tier2.map(|t| Tier2State::new(t, owned)),
            stop_reason: RefCell::new(None),
            preparing: Cell::new(false),
            no_space_since: Cell::new(None),
            checked_span: RefCell::new(None),
            damaged_reads: Cell::new(0),
            last_damaged_read: RefCell::new(None),
            mover_damage: RefCell::new(None),
            last_scrub: RefCell::new(None),
            opens_in_flight: Cell::new(0),
            freer_wake: Alarm::default(),
            files_reused: Cell::new(0),
            relocations: Cell::new(0),
        });
        if container.tier2.is_some() {
            container.start_mover();
        } else {
            container.start_log_freer();
        }
        if container.files.borrow().current.is_none() {
            // A container without a log file yet (a fresh one) prepares its first now, not
            // on the commit path of its first write (zero-filling it takes a while).
            let seq = container.core.borrow().current_file();
            container.start_prepare(seq);
        }
        container
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Log files made from freed ones (spares, or files waiting to be cut) since the
    /// container opened.
    pub fn log_files_reused(&self) -> u64 {
        self.files_reused.get()
    }

    /// Flushes begun while another was being written (`IoPacer::with_flush_depth`) since the
    /// container opened.
    pub fn flushes_begun_beside(&self) -> u64 {
        self.begun_beside.get()
    }

    /// Segments copied to free the oldest log file (without tier-2) since it opened.
    pub fn log_relocations(&self) -> u64 {
        self.relocations.get()
    }

    /// The last log file could not be created for want of space (until one is).
    pub(crate) fn is_out_of_space(&self) -> bool {
        self.no_space_since.get().is_some()
    }

    /// The container stopped, or stops after the flush in flight.
    pub(crate) fn is_stopping(&self) -> bool {
        self.core.borrow().is_poisoned() || self.stop_reason.borrow().is_some()
    }

    /// No flush is running (everything submitted so far is answered).
    pub fn is_idle(&self) -> bool {
        !self.flushing.get()
    }

    /// A flush runs or operations wait for one.
    pub fn is_busy(&self) -> bool {
        self.flushing.get() || self.core.borrow().has_pending()
    }

    /// Stops the container for good (it moved to another node, or this node lost it): queued
    /// and later requests fail with `NotOwner`, readers waiting at a tail wake, the mover
    /// ends. A flush in flight completes first (its operations are durable and answered).
    pub fn stop_with(&self, reason: String) {
        if let Some(t) = &self.tier2 {
            t.request_stop();
        }
        self.wake_mover();
        self.wake_freer();
        if self.flushing.get() {
            *self.stop_reason.borrow_mut() = Some(reason);
            return;
        }
        self.apply_stop(reason);
    }

    fn apply_stop(&self, reason: String) {
        let n = self.core.borrow_mut().stop(reason.clone());
        self.fail_waiters(n, &reason);
        drop_file_images(self.instance);
        for (_, ws) in self.tail_waiters.borrow_mut().drain() {
            for w in ws {
                let _ = w.send(());
            }
        }
    }

    /// Queues an operation now (ordering is fixed at call time) and returns a future for
    /// its answer, which arrives once the operation is durable. Requests refused at once
    /// (unknown segment, sealed, overloaded, ...) fail here, before anything is queued.
    pub fn submit(
        self: &Rc<Self>,
        req: Request,
    ) -> Result<impl std::future::Future<Output = Result<OpResult, EngineError>> + 'static, EngineError> {
        self.submit_noting(req, None)
    }

    /// `submit`, raising `notice` at the moment the operation, once queued, is refused with
    /// a transient error (a full disk, a poisoned or stopped container), before anyone can
    /// read that answer. A connection that passes one with its appends checks it before
    /// each later request: its writer resends the refused append and every later one in
    /// order, so a later append taken meanwhile (the disk got room in between) would make
    /// the resend look like a duplicate of it and its events would be lost.
    pub fn submit_noting(
        self: &Rc<Self>,
        req: Request,
        notice: Option<RefusalNotice>,
    ) -> Result<impl std::future::Future<Output = Result<OpResult, EngineError>> + 'static, EngineError> {
        // Without tier-2 a truncation or deletion may free log files: once durable, it
        // wakes the task that frees them.
        let frees = (self.tier2.is_none()
            && matches!(req, Request::Truncate { .. } | Request::Delete { .. } | Request::Relocate { .. }))
        .then(|| self.clone());
        // End the borrow before spawning: glommio may run a new task at once.
        let submitted = self.core.borrow_mut().submit(req);
        match &submitted {
            Err(EngineError::LogFull(_)) => self.wake_mover(),
            Err(EngineError::NoSpace(_)) => self.retry_after_no_space(),
            _ => {}
        }
        let submitted = submitted?;
        let state = match submitted {
            Submitted::Ready(r) => Either::Left(r),
            Submitted::Queued => {
                let (tx, rx) = oneshot::channel();
                self.waiters.borrow_mut().push_back(Waiter { tx: Some(tx), notice });
                if !self.flushing.get() {
                    self.flushing.set(true);
                    glommio::spawn_local(Self::flush_loop(self.clone())).detach();
                } else {
                    self.queued.nudge();
                }
                Either::Right(rx)
            }
        };
        let id = self.id;
        Ok(async move {
            let answer = match state {
                Either::Left(r) => Ok(r),
                Either::Right(rx) => rx.await.unwrap_or_else(|_| {
                    Err(EngineError::Poisoned { container: id, reason: "container stopped".into() })
                }),
            };
            if let Some(c) = frees
                && answer.is_ok()
            {
                c.wake_freer();
            }
            answer
        })
    }

    async fn flush_loop(self: Rc<Self>) {
        // Whether the last turn flushed: the operations queued now arrived while it ran.
        let mut after_flush = false;
        // Writes under way, oldest first: they complete (are applied and answered) in order.
        let mut writing: VecDeque<Writing> = VecDeque::new();
        let depth = self.pacer.flush_depth();
        loop {
            if writing.is_empty() {
                let stop = self.stop_reason.borrow_mut().take();
                if let Some(reason) = stop {
                    self.apply_stop(reason);
                    break;
                }
                let linger = self.pacer.linger(std::mem::take(&mut after_flush), self.core.borrow().pending_bytes());
                if !linger.is_zero() {
                    glommio::timer::sleep(linger).await;
                }
                let wait = self.pacer.delay();
                if !wait.is_zero() {
                    glommio::timer::sleep(wait).await;
                }
                // A flush that rolls into a new log file waits for it. On a full disk the
                // queued operations are refused (`NoSpace`, which writers retry) rather than
                // left waiting for space that may never come; nothing durable is touched.
                let roll = self.core.borrow().next_flush_file();
                if let Some(seq) = roll
                    && self.ready_next_file(seq).await.is_err()
                {
                    self.refuse_queued();
                    continue;
                }
                match self.begin_flush() {
                    Some(w) => writing.push_back(w),
                    None => break,
                }
                continue;
            }
            // A second flush begins at once beside the one being written (its record in a
            // block of its own), rather than after it: an operation waits for one write, not
            // for the rest of the one in flight and then its own.
            let another =
                writing.len() < depth && self.stop_reason.borrow().is_none() && self.core.borrow().can_begin_another();
            if another {
                let Some(w) = self.begin_flush() else {
                    // The container was poisoned (every waiter is answered): the writes under
                    // way end before it is given up (their buffers are the disk's until then).
                    for w in writing.drain(..) {
                        let _ = w.task.await;
                    }
                    break;
                };
                writing.push_back(w);
                self.begun_beside.set(self.begun_beside.get() + 1);
                continue;
            }
            let room = writing.len() < depth;
            let oldest = &mut writing.front_mut().expect("a write under way").task;
            let done = if room {
                match select(oldest, self.queued.nudged()).await {
                    Either::Left((done, _)) => done,
                    // Operations were queued: maybe another flush can begin.
                    Either::Right(_) => continue,
                }
            } else {
                oldest.await
            };
            let (result, took) = done.unwrap_or_else(|| (Err("flush task lost".into()), Duration::ZERO));
            let plan = writing.pop_front().expect("a write under way").plan;
            if result.is_ok() {
                let bytes = plan.checkpoint.iter().chain(plan.batch.iter()).map(|w| w.len).sum();
                crate::stats::record_flush(took, bytes);
            }
            if took > SLOW_FLUSH {
                tracing::warn!(
                    container = self.id,
                    ops = plan.ops,
                    rolled = plan.prepare.is_some(),
                    ?took,
                    "slow flush"
                );
            }
            match result {
                Ok(()) => {
                    after_flush = true;
                    // Writers are seen at the clock set as the flush began.
                    let done = self.core.borrow_mut().complete_flush();
                    {
                        let mut waiters = self.waiters.borrow_mut();
                        for r in done.results {
                            let w = waiters.pop_front().expect("a waiter per queued operation");
                            w.answer(Ok(r));
                        }
                    }
                    if let Some(old) = done.rolled_from {
                        self.files.borrow_mut().readers.remove(&old);
                        self.wake_mover();
                    }
                    let mut tails = self.tail_waiters.borrow_mut();
                    for seg in done.changed {
                        for w in tails.remove(&seg).unwrap_or_default() {
                            let _ = w.send(());
                        }
                    }
                }
                Err(reason) => {
                    tracing::error!(container = self.id, %reason, "log write failed; container poisoned");
                    // A write begun after the failed one may still be under way: it ends
                    // before the container is given up (its buffer is the disk's until then).
                    for w in writing.drain(..) {
                        let _ = w.task.await;
                    }
                    let n = self.core.borrow_mut().fail_flush(reason.clone());
                    self.fail_waiters(n, &reason);
                    break;
                }
            }
        }
        self.flushing.set(false);
    }

    /// Begins a flush of what is queued and starts its write; `None` when nothing is queued
    /// or the container was poisoned (its waiters are answered).
    fn begin_flush(self: &Rc<Self>) -> Option<Writing> {
        let plan = {
            let mut core = self.core.borrow_mut();
            core.set_now_ms(monotonic_ms());
            core.begin_flush()
        };
        let plan = match plan {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(reason) => {
                tracing::error!(container = self.id, %reason, "container poisoned");
                self.fail_waiters(usize::MAX, &reason);
                return None;
            }
        };
        if plan.writers_forgotten > 0 {
            tracing::debug!(container = self.id, forgotten = plan.writers_forgotten, "idle writers forgotten");
        }
        // A flush into the current file is encoded now, in the order flushes begin (the
        // next one's first block depends on it); one that rolls is encoded once its file is
        // ready, and no other begins while it is in flight.
        let started = Instant::now();
        let write = if plan.prepare.is_none() {
            let file = self.files.borrow().current.clone();
            let encoded = match (file, plan.batch) {
                (Some(file), Some(step)) => Some(Ok((self.encode_step(&file, step, false), file, step))),
                (None, Some(_)) => Some(Err("no current log file".to_string())),
                (_, None) => None,
            };
            let me = self.clone();
            futures::future::Either::Left(async move {
                match encoded {
                    Some(Ok((buf, file, step))) => me.write_batch(&file, step, buf).await,
                    Some(Err(e)) => Err(e),
                    None => Ok(()),
                }
            })
        } else {
            let (me, plan) = (self.clone(), plan.clone());
            futures::future::Either::Right(async move { me.execute(&plan).await })
        };
        let task = glommio::spawn_local(async move {
            let result = write.await;
            (result, started.elapsed())
        })
        .detach();
        Some(Writing { plan, task })
    }

    /// Refuses every queued operation with the disk-full error (between flushes).
    fn refuse_queued(&self) {
        let mut core = self.core.borrow_mut();
        let n = core.refuse_pending();
        let err = core.no_space_refusal().unwrap_or_else(|| EngineError::NoSpace("the disk is full".into()));
        drop(core);
        let mut waiters = self.waiters.borrow_mut();
        for _ in 0..n.min(waiters.len()) {
            let w = waiters.pop_front().expect("counted");
            w.answer(Err(err.clone()));
        }
        tracing::warn!(container = self.id, refused = n, "disk full: queued operations refused");
    }

    fn fail_waiters(&self, n: usize, reason: &str) {
        let err = self
            .core
            .borrow()
            .refusal()
            .unwrap_or_else(|| EngineError::Poisoned { container: self.id, reason: reason.to_string() });
        let mut waiters = self.waiters.borrow_mut();
        for _ in 0..n.min(waiters.len()) {
            let w = waiters.pop_front().expect("counted");
            w.answer(Err(err.clone()));
        }
    }

    /// Starts preparing log file `seq`.
    fn start_prepare(self: &Rc<Self>, seq: u64) {
        let (header, shard_bytes_per_sec, zero_fill) = {
            let mut core = self.core.borrow_mut();
            let tag = core.tag_for_file(seq);
            let cfg = core.config();
            // Whatever a recycled file holds of its earlier use is durable, so has lower LSNs
            // than any record not yet written (those of a flush in flight included).
            let header = FileHeader {
                container: self.id,
                seq,
                epoch: core.epoch(),
                file_bytes: cfg.file_bytes,
                min_lsn: core.durable_lsn() + 1,
                tag,
            };
            let shard_bytes_per_sec = self.pacer.written_per_second();
            (header, shard_bytes_per_sec, cfg.prefill.zero_fill(self.flush_mean.get(), shard_bytes_per_sec))
        };
        tracing::debug!(
            container = self.id,
            seq,
            mean_flush = self.flush_mean.get(),
            shard_bytes_per_sec,
            zero_fill,
            "preparing log file"
        );
        self.preparing.set(true);
        let container = Rc::downgrade(self);
        let spare = self.take_whole_freed_file();
        let (dir, id) = (self.dir.clone(), self.id);
        let under_way = PreparingIn::new(&dir);
        let prepare = async move {
            let _under_way = under_way;
            if let Some(spare) = spare {
                match recycle_log_file(&dir, spare, header).await {
                    Ok(f) => {
                        tracing::debug!(container = id, seq, "log file recycled");
                        return (Ok(f), true);
                    }
                    Err(reason) => {
                        tracing::warn!(container = id, %reason, "reusing a freed log file failed; creating one")
                    }
                }
            }
            (prepare_log_file(dir, header, zero_fill).await, false)
        };
        let task = glommio::spawn_local(async move {
            let (result, recycled) = prepare.await;
            if let Some(c) = container.upgrade() {
                c.preparing.set(false);
                c.files_reused.set(c.files_reused.get() + u64::from(recycled));
                c.prepared(seq, &result);
            }
            result
        })
        .detach();
        self.files.borrow_mut().next = Some(NextFile::Preparing(seq, task));
    }

    /// A preparation ended: a full disk refuses new writes until a later one succeeds.
    fn prepared(&self, seq: u64, result: &Result<DmaFile, PrepareFailure>) {
        match result {
            Ok(_) if self.no_space_since.take().is_some() => {
                tracing::info!(container = self.id, seq, "log file created: the disk has room again, writes resume");
                self.core.borrow_mut().set_no_space(None);
            }
            Ok(_) => {}
            Err(f) if f.no_space => {
                if self.no_space_since.replace(Some(Instant::now())).is_none() {
                    tracing::error!(
                        container = self.id,
                        reason = %f.message,
                        "disk full: no room for the next log file; writes are refused until space is freed"
                    );
                }
                self.core.borrow_mut().set_no_space(Some(f.message.clone()));
            }
            Err(f) => tracing::warn!(container = self.id, reason = %f.message, "preparing a log file failed"),
        }
    }

    /// Log file `seq`, prepared (started now unless it is on its way or ready).
    async fn take_prepared(self: &Rc<Self>, seq: u64) -> Result<DmaFile, PrepareFailure> {
        let next = self.files.borrow_mut().next.take();
        let task = match next {
            Some(NextFile::Ready(s, f)) if s == seq => return Ok(f),
            Some(NextFile::Preparing(s, task)) if s == seq => task,
            _ => {
                self.start_prepare(seq);
                match self.files.borrow_mut().next.take() {
                    Some(NextFile::Preparing(_, task)) => task,
                    _ => unreachable!("just started"),
                }
            }
        };
        task.await.unwrap_or_else(|| Err(PrepareFailure::other("log file preparation was cancelled".into())))
    }

    /// Has log file `seq` ready for the flush that rolls into it. `Err` only for a full
    /// disk: the flush waits (its operations stay queued) and tries again later.
    async fn ready_next_file(self: &Rc<Self>, seq: u64) -> Result<(), PrepareFailure> {
        match self.take_prepared(seq).await {
            Ok(f) => {
                self.files.borrow_mut().next = Some(NextFile::Ready(seq, f));
                Ok(())
            }
            Err(f) if f.no_space => Err(f),
            // Anything else fails the flush as it always did (the roll prepares again).
            Err(_) => Ok(()),
        }
    }

    /// A write was refused for want of space: try again to create the next log file (at
    /// most every `NO_SPACE_RETRY`), so that freed space is noticed without a flush.
    fn retry_after_no_space(self: &Rc<Self>) {
        let due = self.no_space_since.get().is_some_and(|t| t.elapsed() >= NO_SPACE_RETRY);
        if due && !self.preparing.get() {
            self.no_space_since.set(Some(Instant::now()));
            let seq = self.core.borrow().next_file_seq();
            self.start_prepare(seq);
        }
    }

    /// Encodes the newest in-flight flush's checkpoint or batch write into a buffer of its own.
    fn encode_step(&self, file: &DmaFile, step: crate::container::core::WriteStep, checkpoint: bool) -> DmaBuffer {
        let mut buf = file.alloc_dma_buffer(step.len as usize);
        let mut core = self.core.borrow_mut();
        if checkpoint {
            core.encode_checkpoint(buf.as_bytes_mut());
        } else {
            core.encode_batch(buf.as_bytes_mut());
        }
        buf
    }

    async fn write_step(
        &self,
        file: &DmaFile,
        step: crate::container::core::WriteStep,
        checkpoint: bool,
    ) -> Result<(), String> {
        let buf = self.encode_step(file, step, checkpoint);
        // The file is O_DSYNC: the write is durable when it completes.
        write_all_at(file, buf, step.pos, &self.dir.join(file_name(step.file_seq))).await
    }

    /// Writes an encoded batch (durable when the write completes: the file is O_DSYNC), then
    /// what follows a batch write (the flush size average, the pacer's count, preparing the
    /// next file once this one is half used).
    async fn write_batch(
        self: &Rc<Self>,
        file: &DmaFile,
        step: crate::container::core::WriteStep,
        buf: DmaBuffer,
    ) -> Result<(), String> {
        write_all_at(file, buf, step.pos, &self.dir.join(file_name(step.file_seq))).await?;
        self.batch_written(step);
        Ok(())
    }

    fn batch_written(self: &Rc<Self>, step: crate::container::core::WriteStep) {
        let mean = self.flush_mean.get();
        self.flush_mean.set(mean - mean / 8 + step.record_len / 8);
        self.pacer.wrote(step.len);
        // Prepare the next file once this one is half used, off the commit path.
        let (half, next_seq) = {
            let c = self.core.borrow();
            let in_budget = (c.live_files() + 1).saturating_mul(c.config().file_bytes) <= c.config().log_bytes_max;
            (in_budget && step.pos + step.len > c.config().file_bytes / 2, step.file_seq + 1)
        };
        if half && self.files.borrow().next.is_none() {
            self.start_prepare(next_seq);
        }
    }

    async fn execute(self: &Rc<Self>, plan: &FlushPlan) -> Result<(), String> {
        if let Some(seq) = plan.prepare {
            let f = Rc::new(self.take_prepared(seq).await.map_err(|f| f.message)?);
            let mut files = self.files.borrow_mut();
            if let Some(old) = files.current.replace(f) {
                let old_seq = files.current_seq;
                files.readers.insert(old_seq, old);
            }
            files.current_seq = seq;
        }
        let file = self.files.borrow().current.clone().ok_or("no current log file")?;
        if let Some(step) = plan.checkpoint {
            self.write_step(&file, step, true).await?;
        }
        if let Some(step) = plan.batch {
            self.write_step(&file, step, false).await?;
            self.batch_written(step);
        }
        Ok(())
    }

    async fn reader_file(&self, seq: u64) -> Result<Rc<DmaFile>, EngineError> {
        {
            let files = self.files.borrow();
            if seq == files.current_seq
                && let Some(f) = &files.current
            {
                return Ok(f.clone());
            }
            if let Some(f) = files.readers.get(&seq) {
                return Ok(f.clone());
            }
        }
        let path = self.dir.join(file_name(seq));
        // A freed file, or any file of a stopped container, is never opened again: glommio
        // looks the file up by its path again once it is open (statfs) and panics if it was
        // renamed or unlinked in between. The mover forgets a file before it renames it, and
        // a hand-off stops the container before its directory goes; both wait for the opens
        // in flight (`wait_opens`).
        let refused = {
            let core = self.core.borrow();
            if seq < core.oldest_file() {
                Some(EngineError::Io(format!("log file {} was freed", path.display())))
            } else {
                // `NotOwner`: the reader goes to the container's new place.
                core.is_stopped().then(|| core.poisoned_error()).flatten()
            }
        };
        if let Some(e) = refused {
            return Err(e);
        }
        let opening = OpenInFlight::new(&self.opens_in_flight);
        let opened = DmaFile::open(&path).await;
        drop(opening);
        let f = Rc::new(opened.map_err(|e| EngineError::Io(io_err("opening", &path, e)))?);
        let mut files = self.files.borrow_mut();
        if files.readers.len() >= 8 {
            files.readers.clear();
        }
        files.readers.insert(seq, f.clone());
        Ok(f)
    }

    /// Waits (up to `limit`) until no log file is being opened; false if one still is.
    pub(crate) async fn wait_opens(&self, limit: Duration) -> bool {
        wait_until("opens of log files", limit, || self.opens_in_flight.get() == 0).await.is_ok()
    }

    /// Open segments recovery's salvage may have left open past a lost seal (see
    /// `ContainerCore::untraced_after_salvage`).
    pub fn untraced_after_salvage(&self) -> Vec<String> {
        self.core.borrow().untraced_after_salvage().to_vec()
    }

    /// Whether recovery's salvage lost records that held operations (see
    /// `ContainerCore::lost_in_salvage`).
    pub fn lost_in_salvage(&self) -> bool {
        self.core.borrow().lost_in_salvage()
    }

    /// Adds a line to what `sluice stats` reports as salvaged.
    pub fn note_salvaged(&self, line: String) {
        self.core.borrow_mut().note_salvaged(line);
    }

    /// What an operator should know of this container (`sluice stats`): its log's size and
    /// whatever is wrong with it.
    pub fn health(&self) -> ContainerHealth {
        let core = self.core.borrow();
        let ms = |t: Instant| t.elapsed().as_millis() as u64;
        let mover = self.tier2_error();
        let scrub = self.last_scrub.borrow();
        ContainerHealth {
            container: self.id,
            log_bytes: core.log_bytes(),
            spare_bytes: self.files.borrow().spares.len() as u64 * core.config().file_bytes,
            files_reused: self.files_reused.get(),
            segments_copied: self.relocations.get(),
            log_held_by: self
                .tier2
                .is_none()
                .then(|| core.log_held_alone(LOG_HELD_ALONE_NOTE_FILES))
                .flatten()
                .map(|(segment, from, files)| sluice_net::LogHeldBy { segment, from, files }),
            stopped: core.poison_reason().map(str::to_string),
            no_space_ms: self.no_space_since.get().map(ms),
            mover_failing_ms: mover.as_ref().map(|(_, since)| ms(*since)),
            mover_error: mover.map(|(e, _)| e),
            damaged_reads: self.damaged_reads.get(),
            last_damaged_read: self.last_damaged_read.borrow().clone(),
            scrub_ago_ms: scrub.as_ref().map(|(t, _)| ms(*t)),
            scrub_damage: scrub.as_ref().map(|(_, d)| d.clone()).unwrap_or_default(),
            salvaged: core.salvaged().to_vec(),
        }
    }

    /// Reads durable bytes from `offset`. At the tail waits up to `wait` for data (or a seal).
    /// A read refused on damaged data is counted for the container's health.
    pub async fn read(
        self: &Rc<Self>,
        name: &str,
        offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<ReadData, EngineError> {
        let r = self.read_durable(name, offset, max, wait).await;
        if let Err(e @ (EngineError::DamagedLog { .. } | EngineError::DataCorrupt(_))) = &r {
            self.count_damaged_read(e.to_string());
        }
        r
    }

    /// A read of the tier-2 mover: as `read`, but a refusal it met already (the mover
    /// retries the same damaged bytes every round) is not counted again.
    pub(crate) async fn read_for_mover(
        self: &Rc<Self>,
        name: &str,
        offset: u64,
        max: usize,
    ) -> Result<ReadData, EngineError> {
        let r = self.read_durable(name, offset, max, Duration::ZERO).await;
        if let Err(e @ (EngineError::DamagedLog { .. } | EngineError::DataCorrupt(_))) = &r {
            let message = e.to_string();
            if self.mover_damage.borrow().as_deref() != Some(message.as_str()) {
                *self.mover_damage.borrow_mut() = Some(message.clone());
                self.count_damaged_read(message);
            }
        }
        r
    }

    fn count_damaged_read(&self, message: String) {
        self.damaged_reads.set(self.damaged_reads.get() + 1);
        *self.last_damaged_read.borrow_mut() = Some(message);
    }

    async fn read_durable(
        self: &Rc<Self>,
        name: &str,
        offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<ReadData, EngineError> {
        let deadline = Instant::now() + wait;
        loop {
            let (outcome, status) = self.core.borrow().read(name, offset, max)?;
            match outcome {
                ReadOutcome::Data(data) => return Ok(ReadData::one(data, status)),
                ReadOutcome::Chunk { chunk, offset: within, len, chunk_len } => {
                    let data = self.read_chunk(&chunk, within, len, chunk_len).await?;
                    return Ok(ReadData::one(data, status));
                }
                ReadOutcome::Log { file_seq, pieces, records: (start, end) } => {
                    if let Some(pieces) =
                        file_image(self.instance, file_seq).and_then(|image| slices(&image, 0, &pieces))
                    {
                        self.prefetch_after(name, offset, file_seq);
                        return Ok(ReadData { pieces, status });
                    }
                    // Records read and checked by the last read from the disk: the pieces in
                    // them are served from there (a shorter read; the next one starts after
                    // them, at a record boundary, so no record is read twice).
                    let held = match &*self.checked_span.borrow() {
                        Some((seq, base, span)) if *seq == file_seq => held_slices(span, *base, &pieces),
                        _ => Vec::new(),
                    };
                    if !held.is_empty() {
                        return Ok(ReadData { pieces: held, status });
                    }
                    // The reader moved on to another file: free this container's images.
                    drop_file_images(self.instance);
                    let f = match self.reader_file(file_seq).await {
                        Ok(f) => f,
                        // Freed meanwhile (its data is in tier-2 now): look again.
                        Err(_) if file_seq < self.core.borrow().oldest_file() => continue,
                        Err(e) => return Err(e),
                    };
                    let span = self.read_records(&f, name, file_seq, start, end).await?;
                    // Only the pieces before a damaged record, if there is one.
                    let held = held_slices(&span, start, &pieces);
                    if held.is_empty() {
                        return Err(EngineError::Io(format!(
                            "log file {file_seq:x}: records {start}..{end} do not hold {pieces:?}"
                        )));
                    }
                    *self.checked_span.borrow_mut() = Some((file_seq, start, span));
                    return Ok(ReadData { pieces: held, status });
                }
                ReadOutcome::NeedIndex { file_seq } => {
                    // One load per file: reads that find it loading wait, then look again.
                    if !self.claim_load(file_seq) {
                        let (tx, rx) = oneshot::channel();
                        self.files.borrow_mut().indexing.entry(file_seq).or_default().push(tx);
                        let _ = rx.await;
                        continue;
                    }
                    match self.load_file(file_seq).await {
                        Ok(()) => {}
                        Err(_) if file_seq < self.core.borrow().oldest_file() => continue,
                        Err(e) => return Err(EngineError::Io(e)),
                    }
                }
                ReadOutcome::Tail => {
                    let now = Instant::now();
                    if status.sealed || now >= deadline {
                        return Ok(ReadData { pieces: Vec::new(), status });
                    }
                    let (tx, rx) = oneshot::channel();
                    self.tail_waiters.borrow_mut().entry(status.id).or_default().push(tx);
                    let sleep = glommio::timer::sleep(deadline - now);
                    futures::pin_mut!(sleep);
                    let _ = select(rx, sleep).await;
                }
            }
        }
    }

    /// Reads the whole records in `[start, end)` of log file `file_seq` and checks their
    /// checksums. Damaged bytes are never served (nor copied to tier-2 by the mover, which
    /// reads through here): the sound records before a damaged one are returned (a reader
    /// gets everything up to the damage), and a read that starts in a damaged record fails
    /// with `DataCorrupt`, naming the file and the record, and where `name`'s sound data
    /// resumes (`DamagedLog`).
    async fn read_records(
        &self,
        f: &DmaFile,
        name: &str,
        file_seq: u64,
        start: u64,
        end: u64,
    ) -> Result<Bytes, EngineError> {
        let len = (end - start) as usize;
        let r =
            f.read_at(start, len).await.map_err(|e| EngineError::Io(format!("reading log file {file_seq:x}: {e}")))?;
        if r.len() != len {
            return Err(EngineError::Io(format!("log file {file_seq:x}: {} of {len} bytes at {start}", r.len())));
        }
        match check_records(&r, start) {
            Ok(()) => Ok(Bytes::copy_from_slice(&r)),
            Err((at, damage)) => {
                let file = file_name(file_seq);
                tracing::error!(container = self.id, %file, %damage, "damaged log record: not served");
                if at == start {
                    let message = format!("container {} log file {file}: {damage}", self.id);
                    return Err(self.core.borrow().damaged(name, file_seq, Damage::Record(at), message));
                }
                Ok(Bytes::copy_from_slice(&r[..(at - start) as usize]))
            }
        }
    }

    /// Whether the caller takes on loading older file `file_seq` (`load_file`): false if a
    /// load of it is already under way.
    fn claim_load(&self, file_seq: u64) -> bool {
        match self.files.borrow_mut().indexing.entry(file_seq) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Vec::new());
                true
            }
        }
    }

    /// Reads older log file `file_seq` whole (claimed with `claim_load`), installs its index
    /// and keeps its image, then wakes the reads waiting for it.
    async fn load_file(&self, file_seq: u64) -> Result<(), String> {
        let path = self.dir.join(file_name(file_seq));
        let loaded = read_whole(&path, |image| Ok((FileIndex::build(&sound_records(&image))?, image))).await;
        let result = loaded.map(|(index, image)| {
            // A container stopped meanwhile keeps nothing (its instance is never read again).
            if !self.core.borrow().is_stopped() {
                self.core.borrow_mut().insert_file_index(file_seq, index);
                keep_file_image(self.instance, file_seq, image);
            }
        });
        for w in self.files.borrow_mut().indexing.remove(&file_seq).unwrap_or_default() {
            let _ = w.send(());
        }
        result
    }

    /// A read of `name` at `offset` was served from the image of older file `file_seq`:
    /// loads the file its reader goes to next in the background, so that the disk reads it
    /// while the network carries this one (a catch-up otherwise waits for each file's load in
    /// turn). Images of this container's files before `file_seq` are dropped first: their
    /// reader has left them, and their buffer takes the next file.
    fn prefetch_after(self: &Rc<Self>, name: &str, offset: u64, file_seq: u64) {
        let Some(next) = self.core.borrow().next_older_file(name, offset) else { return };
        if next <= file_seq || file_image(self.instance, next).is_some() || !self.claim_load(next) {
            return;
        }
        drop_file_images_before(self.instance, file_seq);
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = me.load_file(next).await;
        })
        .detach();
    }

    /// Moves a committed transaction's shadow segment `source` (of this container) into
    /// segment `name`: reads its first `source_length` bytes (`None`: all of a sealed
    /// shadow), strips each event's key point (see `sluice_net::txn::shadow_payload`), and
    /// appends the events while deleting the shadow, in one log entry. Idempotent: once the
    /// shadow is gone the answer is `Done`. Returns the result and the events moved.
    pub async fn merge(
        self: &Rc<Self>,
        name: String,
        source: String,
        source_length: Option<u64>,
    ) -> Result<(OpResult, u64), EngineError> {
        let want = self.core.borrow().merge_source_length(&source, source_length)?;
        let mut events = 0u64;
        let mut data = Vec::new();
        if let Some(len) = want {
            let mut raw = Vec::with_capacity(len as usize);
            while (raw.len() as u64) < len {
                let at = raw.len() as u64;
                let step = (len - at).min(MERGE_READ_BYTES) as usize;
                match self.read(&source, at, step, Duration::ZERO).await {
                    Ok(r) if r.is_empty() => {
                        return Err(EngineError::Io(format!("{source} ends at {at}, before the {len} bytes to merge")));
                    }
                    Ok(r) => {
                        for p in &r.pieces {
                            let room = step - (raw.len() as u64 - at) as usize;
                            raw.extend_from_slice(&p[..p.len().min(room)]);
                        }
                    }
                    // Merged by another call meanwhile: `submit` answers.
                    Err(EngineError::NoSuchSegment(_)) => {
                        raw.clear();
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            data.reserve(raw.len());
            for e in sluice_net::event::EventIter::new(&raw) {
                let bad = |why: String| EngineError::BadRequest(format!("{source}: {why}"));
                let e = e.map_err(|e| bad(e.to_string()))?;
                let (_, payload) = sluice_net::txn::split_shadow_payload(e)
                    .ok_or_else(|| bad("an event without its key point".into()))?;
                sluice_net::event::encode_event(&mut data, payload);
                events += 1;
            }
        }
        let req = Request::Merge { name, source, source_length, data: Bytes::from(data) };
        let r = self.submit(req)?.await?;
        Ok((r, events))
    }

    /// Durable state of a segment.
    pub fn status(&self, name: &str) -> Result<SegmentStatus, EngineError> {
        self.core.borrow().status(name)
    }

    /// (name, durable length) of the first `limit` open segments after `after`, in name
    /// order, and whether more follow.
    pub fn open_lengths(&self, after: &str, limit: usize) -> (Vec<(String, u64)>, bool) {
        self.core.borrow().open_lengths(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_images_are_per_container_instance_and_bounded_per_shard() {
        let image = |b: u8| Bytes::from(vec![b; 8]);
        keep_file_image(1, 5, image(1));
        assert_eq!(file_image(1, 5), Some(image(1)));
        assert_eq!(file_image(2, 5), None, "another container (or the same one reopened) never sees it");
        keep_file_image(2, 5, image(2));
        keep_file_image(2, 6, image(3));
        assert_eq!(FILE_IMAGES_PER_SHARD, 2);
        assert_eq!(file_image(1, 5), None, "the oldest went first");
        assert_eq!(file_image(2, 5), Some(image(2)));
        drop_file_images(2);
        assert_eq!(file_image(2, 6), None);
        // Pieces come out in order, zero-copy when there is one; beyond the image: none.
        let img = Bytes::from((0u8..100).collect::<Vec<_>>());
        assert_eq!(slices(&img, 0, &[(10, 3)]).unwrap(), [Bytes::from_static(&[10, 11, 12])]);
        let two = slices(&img, 0, &[(10, 2), (50, 2)]).unwrap();
        assert_eq!(two, [Bytes::from_static(&[10, 11]), Bytes::from_static(&[50, 51])]);
        assert_eq!(two[1].as_ptr(), img[50..].as_ptr(), "slices of the image, not copies");
        let read = ReadData { pieces: two, status: SegmentStatus::default() };
        assert_eq!((read.len(), read.to_bytes()), (4, Bytes::from_static(&[10, 11, 50, 51])));
        assert_eq!(slices(&img, 0, &[(10, 2), (99, 2)]), None);
        // An image of part of a file, from position 1010 on.
        let part = img.slice(10..20);
        let two = slices(&part, 1010, &[(1012, 2), (1018, 2)]).unwrap();
        assert_eq!(two, [Bytes::from_static(&[12, 13]), Bytes::from_static(&[18, 19])]);
        assert_eq!(slices(&part, 1010, &[(1008, 4)]), None, "before the image");
        assert_eq!(slices(&part, 1010, &[(1018, 4)]), None, "past its end");
    }

    /// A queued append refused for a full disk, or failed because its container stopped,
    /// raises its notice as the refusal is made (before anyone reads the answer); an
    /// acknowledged one leaves it down.
    #[test]
    fn a_refused_queued_operation_raises_its_notice_at_once() {
        let root = std::env::temp_dir().join(format!("sluice-notice-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.clone();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                // glommio 0.9: an executor's first opened file must not be empty (shard.rs).
                let probe = dir.join("probe");
                std::fs::write(&probe, vec![0u8; 4096]).unwrap();
                DmaFile::open(&probe).await.unwrap().close().await.unwrap();
                let cfg = CoreConfig::small(1, 4 << 20);
                let log = dir.join("log");
                let pacer = Rc::new(IoPacer::new(0, Duration::ZERO));
                let c = Container::open(cfg, log, pacer, None).await.unwrap();
                c.submit(Request::Create { name: "s".into() }).unwrap().await.unwrap();
                let append = |n: u64| {
                    let mut data = Vec::new();
                    sluice_net::event::encode_event(&mut data, format!("event {n}").as_bytes());
                    let data = Bytes::from(data);
                    Request::Append {
                        name: "s".into(),
                        writer: 7,
                        first_event_number: n,
                        event_count: 1,
                        expected_offset: None,
                        data,
                    }
                };
                let notice: RefusalNotice = Rc::new(Cell::new(false));
                c.submit_noting(append(1), Some(notice.clone())).unwrap().await.unwrap();
                assert!(!notice.get(), "an acknowledged append leaves the notice down");
                // The flush loop ends once nothing is queued (it may write a checkpoint first).
                for _ in 0..200 {
                    if !c.flushing.get() {
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                assert!(!c.flushing.get(), "the flush loop did not end");
                // Queued and refused for a full disk between flushes, as the flush loop does
                // when the next log file cannot be created (marked as running so that the
                // submissions do not start it: it would put the first in flight at once).
                c.flushing.set(true);
                let refused = c.submit_noting(append(2), Some(notice.clone())).unwrap();
                let bystander = c.submit(append(3)).unwrap();
                c.refuse_queued();
                assert!(notice.get(), "raised as the refusal is made, before its answer is read");
                assert!(matches!(refused.await, Err(EngineError::NoSpace(_))));
                assert!(matches!(bystander.await, Err(EngineError::NoSpace(_))));
                // Queued when the container stops (it moved away): `NotOwner`, raised too.
                let moved: RefusalNotice = Rc::new(Cell::new(false));
                let fut = c.submit_noting(append(2), Some(moved.clone())).unwrap();
                c.flushing.set(false);
                c.stop_with("moved to another node".into());
                assert!(moved.get(), "raised as the container stops");
                let answer = fut.await;
                assert!(matches!(answer, Err(EngineError::NotOwner { .. })), "{answer:?}");
            })
            .unwrap()
            .join()
            .unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_writer_idleness_clock_is_monotonic() {
        let a = monotonic_ms();
        std::thread::sleep(Duration::from_millis(15));
        let b = monotonic_ms();
        assert!(b >= a + 14, "{a} then {b}");
    }

    #[test]
    fn the_write_rate_covers_the_last_windows_and_forgets_older_ones() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let m = RateMeter::new(t0);
        assert_eq!(m.per_second(t0), 0);
        // 10 MB in the first window: 20 MB/s over it.
        m.add(10_000_000, at(100));
        assert_eq!(m.per_second(at(100)), 16_666_666, "10 MB over 0.6 s");
        // The next window: the first one's bytes count with it.
        m.add(5_000_000, at(600));
        assert_eq!(m.per_second(at(600)), 30_000_000, "15 MB over 0.5 s");
        assert_eq!(m.per_second(at(850)), 20_000_000, "15 MB over 0.75 s");
        // A quiet window, then another: what was written is forgotten.
        assert_eq!(m.per_second(at(1200)), 10_000_000, "5 MB over 0.5 s");
        assert_eq!(m.per_second(at(2300)), 0);
    }
}
