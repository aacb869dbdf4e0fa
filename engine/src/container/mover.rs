//! The tier-2 side of a container, on the shard that owns it: the mover that copies durable
//! segment data from the log into tier-2 chunks and then frees log files (`freeing`),
//! reconciliation of chunk metadata with what tier-2 holds after a restart, deletion of
//! truncated chunks, and chunk-aligned tier-2 reads with read-ahead.
//!
//! Invariants:
//! - Only durable log data is copied, so every byte in a chunk is a correct segment byte,
//!   even past the length the log recorded (an upload interrupted before its `Chunk` entry).
//! - A chunk's bytes count only once its `Chunk` entry is durable in the log; a log file is
//!   deleted only when every segment's data in it is below its durable tier-2 end (or
//!   truncated away).
//! - The mover creates chunks only under the container's current epoch, and seals the last
//!   chunk of an older epoch before writing more, so a deposed owner cannot append to it.
//! - The mover never blocks appends: it runs as its own task, a few segments at a time
//!   (each piece by piece); when tier-2 fails it backs off and retries, and the log's
//!   budget (`LogFull`) is the only back-pressure writers see.
//! - Checksums: the mover keeps the CRC-32C of every MiB it uploads to a chunk
//!   (`ChunkSums`), writes them beside the chunk (`<chunk>.sum`) when it closes the chunk
//!   or hands the container off, and every tier-2 read is checked against the sums in
//!   memory or in that file; damage is `DataCorrupt`, never bytes. The sums of a chunk still
//!   open are written too, every `SUMS_WRITE_GROWTH` bytes and whenever the mover idles, so
//!   a crash leaves at most that much uncovered; whoever closes a chunk it did not fill (the
//!   next owner, after a crash) completes its sums from the chunk's bytes first.

use crate::container::chunks::ChunkList;
use crate::container::core::{ChunkMeta, MoveTask, Request};
use crate::container::handoff;
use crate::container::io::{Alarm, Container, wait_until};
use crate::error::EngineError;
use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use sluice_tier2::layout::{chunk_name, parse_chunk_file, segment_dir};
use sluice_tier2::sums::{ChunkSums, sums_name};
use sluice_tier2::{ChunkError, DynStore};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes copied per tier-2 append (and per `Chunk` log entry).
const MOVE_PIECE_BYTES: u64 = 8 << 20;
/// Segments a mover copies at once. One segment's pieces go one after another (read,
/// upload and sync, record), about 50 MB/s here under load; a container holding many busy
/// segments (one container per core takes all of a shard's) needs several moving at once to
/// keep up with its writers.
const SEGMENTS_MOVING_MAX: usize = 4;
/// `Chunk` entries a mover may have queued in the log while it uploads the next pieces
/// (each waits behind the writers' queued appends; waiting for each in turn would cap the
/// mover far below the write rate).
const RECORDS_IN_FLIGHT_MAX: usize = 4;
/// Size of an aligned tier-2 read (the unit of the tier-2 read cache and of read-ahead).
const READ_BLOCK_BYTES: u64 = 4 << 20;
/// Tier-2 read blocks cached per container.
const READ_BLOCKS_CACHED: usize = 8;
/// Blocks read ahead of a sequential reader.
const READ_AHEAD_BLOCKS: u64 = 2;
/// Longest pause between retries while tier-2 fails.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an owned container's mover looks for a newer owner in tier-2.
const FENCE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on each wait of a hand-off (queued operations, the mover's round, moving the rest).
const HANDOFF_WAIT: Duration = Duration::from_secs(60);
/// Sums files (or their absence) remembered per container.
const SUMS_CACHED: usize = 256;
/// How long a chunk found without a sums file is read unchecked before looking again.
const NO_SUMS_RECHECK: Duration = Duration::from_secs(5);
/// Largest sums file read (it covers a 256 GiB chunk).
const SUMS_FILE_BYTES_MAX: usize = 1 << 20;
/// An open chunk's sums file is rewritten once the chunk grew this much past it (and when
/// the mover has nothing to move).
const SUMS_WRITE_GROWTH: u64 = 16 << 20;

/// Waits (bounded by `HANDOFF_WAIT`) until `done`, for a hand-off.
async fn handoff_wait(what: &str, done: impl Fn() -> bool) -> Result<(), String> {
    wait_until(what, HANDOFF_WAIT, done).await.map_err(|e| format!("hand-off: {e}"))
}

/// Tier-2 settings of a container.
#[derive(Clone)]
pub struct Tier2Config {
    pub store: DynStore,
    /// A chunk is closed (sealed) and a new one started at this size.
    pub chunk_bytes: u64,
    /// Data of a segment waiting in the current log file is moved once this much has gathered
    /// (data in older files, and of sealed segments, is moved at once).
    pub move_bytes_min: u64,
    /// Pause between mover rounds when there is nothing to do.
    pub interval: Duration,
}

/// A tier-2 read block: (chunk name, block number).
type BlockKey = (String, u64);
/// A sums file looked up: (chunk, its sums or none, when looked up).
type SumsLookup = (String, Option<Rc<ChunkSums>>, Instant);

/// Sums of a chunk the mover is filling.
#[derive(Default)]
struct Growing {
    /// Exactly the chunk's uploaded bytes.
    sums: ChunkSums,
    /// Bytes the chunk's sums file covers.
    written: u64,
}

/// Mover and tier-2 read state of one container.
pub struct Tier2State {
    pub cfg: Tier2Config,
    /// Chunks known sealed on tier-2 (so they are sealed once).
    sealed: RefCell<HashSet<String>>,
    /// The last tier-2 failure and since when rounds fail, until a round succeeds.
    pub last_error: RefCell<Option<(String, Instant)>>,
    /// Wakes a sleeping mover (a log file rolled, or an append hit the budget).
    wake: Alarm,
    blocks: RefCell<VecDeque<(BlockKey, Bytes)>>,
    loading: RefCell<HashMap<BlockKey, Vec<oneshot::Sender<()>>>>,
    /// Sums of the chunks this mover is filling (by chunk name).
    growing: RefCell<HashMap<String, Growing>>,
    /// Sums files looked up for reads, oldest first.
    sums_files: RefCell<VecDeque<SumsLookup>>,
    /// Cluster mode: the container is owned under an etcd epoch; the mover watches tier-2
    /// for a newer owner and stops the container when one appears.
    owned: bool,
    last_fence_check: Cell<Option<Instant>>,
    reconciled: Cell<bool>,
    /// Asks the background mover to end after its current round.
    stop: Cell<bool>,
    running: Cell<bool>,
    /// Held while garbage chunks are deleted: a segment moving at the same time must not
    /// create a chunk under a name a collection in progress is about to delete.
    collecting: futures::lock::Mutex<()>,
}

impl Tier2State {
    pub(crate) fn request_stop(&self) {
        self.stop.set(true);
    }

    pub fn new(cfg: Tier2Config, owned: bool) -> Self {
        Self {
            owned,
            last_fence_check: Cell::new(None),
            reconciled: Cell::new(false),
            stop: Cell::new(false),
            running: Cell::new(false),
            cfg,
            sealed: RefCell::new(HashSet::new()),
            last_error: RefCell::new(None),
            wake: Alarm::default(),
            blocks: RefCell::new(VecDeque::new()),
            loading: RefCell::new(HashMap::new()),
            growing: RefCell::new(HashMap::new()),
            sums_files: RefCell::new(VecDeque::new()),
            collecting: futures::lock::Mutex::new(()),
        }
    }
}

fn t2err(e: ChunkError) -> String {
    e.to_string()
}

/// Why moving one segment stopped.
enum MoveStop {
    /// Its log data where the move got to is damaged: the other segments move on.
    Damaged(String),
    /// Anything else (tier-2, metadata): the round stops.
    Failed(String),
}

impl From<String> for MoveStop {
    fn from(e: String) -> Self {
        MoveStop::Failed(e)
    }
}

impl Container {
    fn t2(&self) -> &Tier2State {
        self.tier2.as_ref().expect("container has tier-2")
    }

    /// Wakes the mover if it sleeps.
    pub(crate) fn wake_mover(&self) {
        if let Some(t) = &self.tier2 {
            t.wake.ring();
        }
    }

    /// The mover task: reconcile once, then move, collect garbage and free log files until
    /// the container is poisoned.
    pub(crate) fn start_mover(self: &Rc<Self>) {
        self.t2().stop.set(false);
        self.t2().running.set(true);
        glommio::spawn_local(Self::mover_loop(self.clone())).detach();
    }

    async fn mover_loop(self: Rc<Self>) {
        let interval = self.t2().cfg.interval;
        let mut backoff = interval;
        let mut last_warn: Option<Instant> = None;
        loop {
            if self.core.borrow().is_poisoned() || self.t2().stop.get() {
                self.t2().running.set(false);
                return;
            }
            let round = async {
                self.check_fence().await?;
                if !self.t2().reconciled.get() {
                    self.reconcile().await?;
                    self.t2().reconciled.set(true);
                }
                let (moved, damaged) = self.move_round(self.t2().cfg.move_bytes_min).await?;
                self.collect_garbage().await?;
                self.free_log_files().await?;
                self.write_open_sums(if moved { SUMS_WRITE_GROWTH } else { 1 }).await?;
                // A segment stopped at damaged log data fails the round (and is retried),
                // after everything else was done.
                damaged.map_or(Ok(moved), Err)
            }
            .await;
            match round {
                Ok(moved) => {
                    if let Some((e, _)) = self.t2().last_error.borrow_mut().take() {
                        tracing::info!(container = self.id(), previous_error = %e, "tier-2 is back; moving again");
                    }
                    backoff = interval;
                    if !moved {
                        self.t2().wake.sleep(interval).await;
                    }
                }
                Err(reason) => {
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(container = self.id(), %reason, "tier-2 move failed; retrying");
                        last_warn = Some(Instant::now());
                    }
                    let since = self.t2().last_error.borrow().as_ref().map_or_else(Instant::now, |(_, since)| *since);
                    *self.t2().last_error.borrow_mut() = Some((reason, since));
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Makes chunk metadata and tier-2 agree after a restart: an older epoch's last chunk
    /// keeps any extra (valid) bytes an interrupted upload left and is sealed. Sealed
    /// segments whose chunks were all closed (`ChunksClosed`) need nothing and are skipped,
    /// so a restart's tier-2 work follows the segments still being written, not every
    /// segment a stream ever had. A container whose chunks were not all recorded at creation
    /// (written by an older build) also lists each segment's tier-2 directory once and
    /// deletes chunks of older epochs that the metadata does not name (partial uploads),
    /// then records that it no longer needs to (`CreationsRecorded`).
    async fn reconcile(self: &Rc<Self>) -> Result<(), String> {
        let store = self.t2().cfg.store.clone();
        let started = Instant::now();
        let (epoch, (map, closed), recorded) = {
            let core = self.core.borrow();
            (core.epoch(), core.chunk_map(), core.creations_recorded())
        };
        let checked = map.len();
        let mut listed = 0;
        for (name, length, chunks, emptied) in map {
            if length == 0 {
                continue;
            }
            if !recorded {
                listed += 1;
                self.delete_partial_uploads(&name, &chunks, epoch).await?;
            }
            if emptied {
                // Sealed and truncated to its end: nothing of it is left in tier-2, and never
                // will be; recorded, so later restarts skip it.
                self.record_closed(&name).await;
                continue;
            }
            let Some(last) = chunks.last().filter(|c| c.epoch < epoch) else {
                continue;
            };
            let chunk = chunk_name(&name, last.start, last.epoch);
            let size = match store.size(&chunk).await {
                Ok(size) => size,
                // Recorded, then the owner stopped before creating it: created now, so that
                // it can be sealed like any other.
                Err(ChunkError::NotFound(_)) if last.len == 0 => {
                    self.create_chunk(&chunk).await?;
                    0
                }
                Err(e) => return Err(t2err(e)),
            };
            if size < last.len {
                tracing::error!(
                    container = self.id(),
                    %chunk,
                    size,
                    recorded = last.len,
                    "tier-2 chunk is shorter than recorded: tier-2 lost acknowledged bytes"
                );
            } else if size > last.len {
                let len = size.min(length - last.start);
                if len > last.len {
                    self.record_chunk(&name, last.start, last.epoch, len).await?;
                }
            }
            self.close_chunk(&chunk, Some(size)).await?;
        }
        if !recorded {
            let done: Result<_, EngineError> = async { self.submit(Request::CreationsRecorded)?.await }.await;
            done.map_err(|e| format!("recording chunk creations: {e}"))?;
        }
        if checked + closed > 0 {
            tracing::info!(container = self.id(), checked, closed, listed, took = ?started.elapsed(), "tier-2 reconciled (closed segments skipped)");
        }
        Ok(())
    }

    /// Lists a segment's tier-2 directory and deletes the chunks of older epochs its
    /// metadata does not name: uploads a crash interrupted before their first `Chunk` entry
    /// (only builds that created chunks before recording them left such chunks).
    async fn delete_partial_uploads(&self, name: &str, chunks: &ChunkList, epoch: u64) -> Result<(), String> {
        let dir = format!("{}/", segment_dir(name));
        for listed in self.t2().cfg.store.list(&dir).await.map_err(t2err)? {
            let Some((start, e)) = listed.rsplit('/').next().and_then(parse_chunk_file) else {
                continue;
            };
            if !chunks.contains(start, e) && e < epoch {
                tracing::info!(container = self.id(), chunk = %listed, "deleting a partial tier-2 upload");
                self.delete_chunk(&listed).await?;
            }
        }
        Ok(())
    }

    async fn record_chunk(self: &Rc<Self>, name: &str, start: u64, epoch: u64, len: u64) -> Result<(), String> {
        self.queue_record(name, start, epoch, len).map_err(|e| format!("recording chunk of {name}: {e}"))?.await
    }

    /// Queues a `Chunk` entry now (its place in the log is fixed at this call); the future
    /// resolves once it is durable. Refused (`Truncated`) when a truncation accepted
    /// meanwhile leaves the chunk wholly below the segment's start.
    fn queue_record(
        self: &Rc<Self>,
        name: &str,
        start: u64,
        epoch: u64,
        len: u64,
    ) -> Result<impl std::future::Future<Output = Result<(), String>> + 'static, EngineError> {
        let what = format!("recording chunk of {name}");
        let fut = self.submit(Request::Chunk { name: name.to_string(), start, epoch, len })?;
        Ok(async move { fut.await.map(|_| ()).map_err(|e| format!("{what}: {e}")) })
    }

    /// Closes a chunk for good: makes its sums file cover all of it and seals it. `size`:
    /// its size in tier-2, when the caller just asked.
    async fn close_chunk(&self, chunk: &str, size: Option<u64>) -> Result<(), String> {
        if self.t2().sealed.borrow().contains(chunk) {
            return Ok(());
        }
        let growing = self.t2().growing.borrow().get(chunk).map(|g| (g.sums.clone(), g.written));
        match growing {
            Some((sums, written)) if sums.len() > written => self.write_sums(chunk, sums).await?,
            Some(_) => {}
            None => self.complete_sums(chunk, size).await?,
        }
        self.t2().cfg.store.seal(chunk).await.map_err(t2err)?;
        self.t2().growing.borrow_mut().remove(chunk);
        self.t2().sealed.borrow_mut().insert(chunk.to_string());
        Ok(())
    }

    /// Writes (or replaces) `<chunk>.sum`, sealed.
    async fn write_sums(&self, chunk: &str, sums: ChunkSums) -> Result<(), String> {
        let store = &self.t2().cfg.store;
        let name = sums_name(chunk);
        // Replaces the file this mover wrote before (sums files are rewritten whole).
        self.delete_if_exists(&name).await?;
        store.create(&name).await.map_err(t2err)?;
        store.append(&name, 0, Bytes::from(sums.encode())).await.map_err(t2err)?;
        store.seal(&name).await.map_err(t2err)?;
        if let Some(g) = self.t2().growing.borrow_mut().get_mut(chunk) {
            g.written = sums.len();
        }
        self.remember_sums(chunk, Some(Rc::new(sums)));
        Ok(())
    }

    /// A chunk this mover did not fill (an older epoch's, left open by a crash, or one from
    /// before chunks had sums): makes its sums file cover every byte, reading back from the
    /// chunk the bytes the file does not cover. Those bytes are summed as tier-2 holds them
    /// now: damage from here on is found, damage already done is not.
    async fn complete_sums(&self, chunk: &str, size: Option<u64>) -> Result<(), String> {
        let store = &self.t2().cfg.store;
        let size = match size {
            Some(s) => s,
            None => store.size(chunk).await.map_err(t2err)?,
        };
        let name = sums_name(chunk);
        let mut sums = match store.read(&name, 0, SUMS_FILE_BYTES_MAX).await {
            Ok(bytes) => match ChunkSums::decode(&bytes) {
                Ok(s) if s.len() <= size => s,
                Ok(s) => {
                    tracing::warn!(container = self.id(), %name, covers = s.len(), size, "sums file longer than its chunk; summing the chunk again");
                    ChunkSums::default()
                }
                Err(reason) => {
                    tracing::warn!(container = self.id(), %name, %reason, "unusable sums file; summing the chunk again");
                    ChunkSums::default()
                }
            },
            Err(ChunkError::NotFound(_)) => ChunkSums::default(),
            Err(e) => return Err(t2err(e)),
        };
        let covered = sums.len();
        if covered == size {
            return Ok(());
        }
        while sums.len() < size {
            let want = (size - sums.len()).min(MOVE_PIECE_BYTES) as usize;
            let data = store.read(chunk, sums.len(), want).await.map_err(t2err)?;
            if data.is_empty() {
                return Err(format!("chunk {chunk} ended at {} while summing it ({size} expected)", sums.len()));
            }
            sums.extend(&data);
        }
        tracing::info!(container = self.id(), %chunk, covered, size, "completed a chunk's sums from its bytes");
        self.write_sums(chunk, sums).await
    }

    /// Creates chunk `name` empty; one that exists is our own earlier attempt that was never
    /// recorded: it is deleted with its sums file and started over.
    async fn create_chunk(&self, name: &str) -> Result<(), String> {
        let store = &self.t2().cfg.store;
        match store.create(name).await {
            Ok(()) => Ok(()),
            Err(ChunkError::AlreadyExists(_)) => {
                self.delete_chunk(name).await?;
                store.create(name).await.map_err(t2err)
            }
            Err(e) => Err(t2err(e)),
        }
    }

    async fn delete_if_exists(&self, name: &str) -> Result<(), String> {
        match self.t2().cfg.store.delete(name).await {
            Ok(()) | Err(ChunkError::NotFound(_)) => Ok(()),
            Err(e) => Err(t2err(e)),
        }
    }

    fn remember_sums(&self, chunk: &str, sums: Option<Rc<ChunkSums>>) {
        let mut cache = self.t2().sums_files.borrow_mut();
        cache.retain(|(c, _, _)| c != chunk);
        cache.push_back((chunk.to_string(), sums, Instant::now()));
        while cache.len() > SUMS_CACHED {
            cache.pop_front();
        }
    }

    /// Deletes a chunk and its sums file, and forgets both.
    async fn delete_chunk(&self, chunk: &str) -> Result<(), String> {
        self.delete_if_exists(&sums_name(chunk)).await?;
        self.delete_if_exists(chunk).await?;
        let t = self.t2();
        t.sealed.borrow_mut().remove(chunk);
        t.growing.borrow_mut().remove(chunk);
        t.sums_files.borrow_mut().retain(|(c, _, _)| c != chunk);
        // A stream created again reuses chunk names: its reads must not meet the old bytes.
        t.blocks.borrow_mut().retain(|((c, _), _)| c != chunk);
        Ok(())
    }

    /// Checks bytes read from `chunk` at `offset` against its sums: those of a chunk this
    /// mover is filling, else its sums file (a chunk without one reads unchecked).
    async fn check_sums(&self, chunk: &str, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        let growing = self.t2().growing.borrow().get(chunk).map(|g| g.sums.verify(offset, data));
        let checked = match growing {
            Some(r) => r,
            None => match self.sums_file(chunk).await {
                Some(sums) => sums.verify(offset, data),
                None => Ok(()),
            },
        };
        checked.map_err(|m| {
            tracing::error!(
                container = self.id(),
                %chunk,
                offset = m.offset,
                expected = format_args!("{:08x}", m.expected),
                actual = format_args!("{:08x}", m.actual),
                "tier-2 chunk damaged: a block fails its checksum"
            );
            EngineError::DataCorrupt(format!(
                "tier-2 chunk {chunk}: the MiB at chunk offset {} fails its checksum (crc32c {:08x}, expected {:08x})",
                m.offset, m.actual, m.expected
            ))
        })
    }

    /// The sums file of `chunk`, through the cache (none: absent, or unreadable).
    async fn sums_file(&self, chunk: &str) -> Option<Rc<ChunkSums>> {
        let cached = self.t2().sums_files.borrow().iter().find(|(c, _, _)| c == chunk).cloned();
        if let Some((_, sums, at)) = cached
            && (sums.is_some() || at.elapsed() < NO_SUMS_RECHECK)
        {
            return sums;
        }
        let name = sums_name(chunk);
        let sums = match self.t2().cfg.store.read(&name, 0, SUMS_FILE_BYTES_MAX).await {
            Ok(bytes) => match ChunkSums::decode(&bytes) {
                Ok(s) => Some(Rc::new(s)),
                Err(reason) => {
                    tracing::warn!(container = self.id(), %name, %reason, "unusable sums file; chunk read unchecked");
                    None
                }
            },
            Err(ChunkError::NotFound(_)) => None,
            // Tier-2 trouble: the chunk read itself will tell; do not remember anything.
            Err(_) => return None,
        };
        self.remember_sums(chunk, sums.clone());
        sums
    }

    /// Writes the sums files of the chunks still open that grew at least `growth` bytes
    /// past their file, so that a crash or hand-off leaves them checked (their next owner
    /// closes them, completing the sums of any bytes the file does not cover).
    async fn write_open_sums(&self, growth: u64) -> Result<(), String> {
        let open: Vec<(String, ChunkSums)> = self
            .t2()
            .growing
            .borrow()
            .iter()
            .filter(|(_, g)| g.sums.len() > g.written && g.sums.len() - g.written >= growth)
            .map(|(c, g)| (c.clone(), g.sums.clone()))
            .collect();
        for (chunk, sums) in open {
            self.write_sums(&chunk, sums).await?;
        }
        Ok(())
    }

    /// Cluster mode: stops the container if a newer owner announced itself in tier-2
    /// (checked at most once per `FENCE_CHECK_INTERVAL`).
    async fn check_fence(self: &Rc<Self>) -> Result<(), String> {
        let t = self.t2();
        if !t.owned || t.last_fence_check.get().is_some_and(|at| at.elapsed() < FENCE_CHECK_INTERVAL) {
            return Ok(());
        }
        let epoch = self.core.borrow().epoch();
        let newest = handoff::newest_epoch(&t.cfg.store, self.id()).await?;
        t.last_fence_check.set(Some(Instant::now()));
        if let Some(newer) = newest.filter(|e| *e > epoch) {
            let reason =
                format!("fenced: container {} has a newer owner (epoch {newer}, this node {epoch})", self.id());
            tracing::error!(container = self.id(), epoch, newer, "deposed by a newer owner; container stopped");
            self.stop_with(reason.clone());
            return Err(reason);
        }
        Ok(())
    }

    /// Graceful hand-off (cluster mode): with client requests no longer routed here, lets
    /// queued operations finish, stops the background mover, moves every remaining byte to
    /// tier-2, writes the container's metadata there (`handoff`), and stops the container.
    /// On failure the container keeps serving (the mover restarts) and the caller may retry.
    pub async fn hand_off(self: &Rc<Self>) -> Result<(), String> {
        let started = Instant::now();
        handoff_wait("queued operations", || !self.is_busy()).await?;
        self.t2().request_stop();
        self.wake_mover();
        handoff_wait("the mover's round", || !self.t2().running.get()).await?;
        let result = async {
            self.t2().last_fence_check.set(None);
            self.check_fence().await?;
            if !self.t2().reconciled.get() {
                self.reconcile().await?;
                self.t2().reconciled.set(true);
            }
            let deadline = Instant::now() + HANDOFF_WAIT;
            while !self.core.borrow().all_in_tier2() {
                if Instant::now() > deadline {
                    return Err("hand-off: timed out moving data to tier-2".to_string());
                }
                self.move_round(0).await?;
            }
            if let Err(e) = self.collect_garbage().await {
                tracing::warn!(container = self.id(), error = %e, "hand-off: garbage left for the next owner");
            }
            handoff_wait("chunk records", || !self.is_busy()).await?;
            self.write_open_sums(1).await?;
            let (epoch, ck) = {
                let core = self.core.borrow();
                (core.epoch(), core.handoff_state())
            };
            handoff::write(&self.t2().cfg.store, self.id(), epoch, &ck).await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.stop_with(format!("container {} moved to another node", self.id()));
                tracing::info!(container = self.id(), took = ?started.elapsed(), "container handed off");
                Ok(())
            }
            Err(e) => {
                if !self.core.borrow().is_poisoned() {
                    self.start_mover();
                }
                Err(e)
            }
        }
    }

    /// One pass over the segments with data waiting; true if anything moved.
    /// Moves what each segment has to move, up to `SEGMENTS_MOVING_MAX` segments at once:
    /// whether anything moved, and the first segment stopped at damaged log data (the others
    /// move on: one damaged record must not hold every segment of the container back from
    /// tier-2). After a failure no further segment starts; those already moving finish (their
    /// pieces and entries are valid) before the failure is returned.
    async fn move_round(self: &Rc<Self>, min_bytes: u64) -> Result<(bool, Option<String>), String> {
        use futures::StreamExt;
        let tasks = self.core.borrow().move_tasks(min_bytes);
        let failed = Cell::new(false);
        let results: Vec<Result<bool, MoveStop>> = futures::stream::iter(tasks)
            .map(|task| {
                let failed = &failed;
                async move {
                    if failed.get() {
                        return Ok(false);
                    }
                    let r = self.move_segment(task).await;
                    if matches!(r, Err(MoveStop::Failed(_))) {
                        failed.set(true);
                    }
                    r
                }
            })
            .buffer_unordered(SEGMENTS_MOVING_MAX)
            .collect()
            .await;
        let (mut moved, mut damaged, mut failure) = (false, None, None);
        for r in results {
            match r {
                Ok(m) => moved |= m,
                Err(MoveStop::Damaged(e)) => {
                    damaged.get_or_insert(e);
                }
                Err(MoveStop::Failed(e)) => {
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok((moved, damaged)), Err)
    }

    async fn move_segment(self: &Rc<Self>, task: MoveTask) -> Result<bool, MoveStop> {
        let chunk_bytes = self.t2().cfg.chunk_bytes;
        let epoch = self.core.borrow().epoch();
        // This term's last chunk goes on filling; one recorded with no bytes is created again
        // unless this mover created it (the creation may have failed after the record).
        let mut chunk: Option<ChunkMeta> = task.last_chunk.filter(|c| {
            c.epoch == epoch
                && c.start + c.len == task.from
                && c.len < chunk_bytes
                && (c.len > 0 || self.t2().growing.borrow().contains_key(&chunk_name(&task.name, c.start, c.epoch)))
        });
        if let Some(old) = task.last_chunk.filter(|c| c.epoch < epoch) {
            // Fence the previous owner's chunk before writing past it.
            self.close_chunk(&chunk_name(&task.name, old.start, old.epoch), None).await?;
        }
        let mut off = task.from;
        let mut moved = false;
        let mut records = VecDeque::new();
        let result = self.move_pieces(&task, epoch, &mut chunk, &mut off, &mut moved, &mut records).await;
        // Whatever happened, wait for the entries already queued: they are valid.
        let mut recorded = Ok(());
        for r in records {
            if let Err(e) = r.await {
                recorded = Err(e);
            }
        }
        match (result, recorded) {
            (Err(e), _) => return Err(e),
            (Ok(()), Err(_)) if self.core.borrow().status(&task.name).is_err() => return Ok(moved),
            (Ok(()), Err(e)) => return Err(e.into()),
            (Ok(()), Ok(())) => {}
        }
        // A sealed segment's last chunk is final: seal it too. It is the chunk still open
        // for appends, or, when nothing moved, the one the task started from (a chunk that
        // filled up was sealed when it rolled).
        if task.sealed && off >= task.to {
            if let Some(c) = chunk.or(if moved { None } else { task.last_chunk }) {
                self.close_chunk(&chunk_name(&task.name, c.start, c.epoch), None).await?;
            }
            // Every chunk of the sealed segment is closed (full ones as they filled, older
            // epochs' by reconciliation): recorded, so that neither later rounds nor restarts
            // look at it again.
            self.record_closed(&task.name).await;
        }
        Ok(moved)
    }

    /// Records that a sealed segment has nothing left to move or reconcile. Only a saving:
    /// a failure (the segment deleted meanwhile, ...) leaves it to be looked at again.
    async fn record_closed(self: &Rc<Self>, name: &str) {
        let result: Result<_, EngineError> =
            async { self.submit(Request::ChunksClosed { name: name.to_string() })?.await }.await;
        if let Err(e) = result {
            tracing::debug!(container = self.id(), segment = %name, error = %e, "chunks not recorded closed");
        }
    }

    /// Uploads `[*off, task.to)` piece by piece, queueing a `Chunk` entry after each upload
    /// and keeping at most `RECORDS_IN_FLIGHT_MAX` of them unanswered.
    async fn move_pieces(
        self: &Rc<Self>,
        task: &MoveTask,
        epoch: u64,
        chunk: &mut Option<ChunkMeta>,
        off: &mut u64,
        moved: &mut bool,
        records: &mut VecDeque<futures::future::LocalBoxFuture<'static, Result<(), String>>>,
    ) -> Result<(), MoveStop> {
        let store = self.t2().cfg.store.clone();
        let chunk_bytes = self.t2().cfg.chunk_bytes;
        let salvage = self.core.borrow().config().salvage;
        // Where the move skipped damaged data to: a chunk must start there even with nothing
        // after it yet, so that the move goes on from there.
        let mut skipped_to = None;
        while *off < task.to || skipped_to == Some(*off) && chunk.is_none() {
            let at = *off;
            let c = match *chunk {
                Some(c) => c,
                None => {
                    let name = chunk_name(&task.name, at, epoch);
                    // A deleted segment of the same name may have left this very name as
                    // garbage: delete it first, or a later collection would take ours.
                    self.collect_garbage().await?;
                    // Recorded (with no bytes) before it exists, so that tier-2 never holds
                    // a chunk the metadata does not name and restarts need not list tier-2.
                    // The entry is queued behind those of the pieces before: durable after
                    // them.
                    match self.queue_record(&task.name, at, epoch, 0) {
                        Ok(f) => f.await?,
                        // Truncated or deleted meanwhile: nothing more to move for it now.
                        Err(EngineError::Truncated { .. } | EngineError::NoSuchSegment(_)) => return Ok(()),
                        Err(e) => return Err(format!("recording a new chunk of {}: {e}", task.name).into()),
                    }
                    self.create_chunk(&name).await?;
                    self.t2().growing.borrow_mut().insert(name, Growing::default());
                    ChunkMeta { start: at, epoch, len: 0 }
                }
            };
            let want = (chunk_bytes - c.len).min(task.to.saturating_sub(at)).min(MOVE_PIECE_BYTES);
            if want == 0 {
                *chunk = Some(c);
                break;
            }
            let data = match self.read_log_range(&task.name, at, want).await {
                Ok(d) => d,
                // Truncated or deleted meanwhile: nothing more to move for it now.
                Err(EngineError::Truncated { .. } | EngineError::NoSuchSegment(_)) => return Ok(()),
                Err(e @ EngineError::DataCorrupt(_)) => {
                    return Err(MoveStop::Damaged(format!("reading {} at {at} for tier-2: {e}", task.name)));
                }
                // Salvaging: the damaged bytes are given up, the chunk being filled is closed
                // and the next one starts where the sound data resumes, leaving a gap between
                // chunks that reads report as damage.
                Err(EngineError::DamagedLog { resume, message }) if salvage && resume > at => {
                    let line = format!(
                        "{}: bytes {at}..{resume} skipped by the tier-2 mover ({message}); they are gone once \
                         their log file is freed",
                        task.name
                    );
                    tracing::error!(container = self.id(), "salvaging past damage: {line}");
                    self.core.borrow_mut().note_salvaged(line);
                    // The chunk being filled (perhaps created just now, empty) ends here.
                    *chunk = None;
                    while let Some(r) = records.pop_front() {
                        r.await?;
                    }
                    self.close_chunk(&chunk_name(&task.name, c.start, epoch), None).await?;
                    *off = resume;
                    skipped_to = Some(resume);
                    continue;
                }
                // Nothing past the damage moves, so the log files from here on stay: name
                // the ways out.
                Err(e @ EngineError::DamagedLog { resume, .. }) => {
                    let (stream, number) = task.name.rsplit_once('/').unwrap_or((&task.name, "?"));
                    return Err(MoveStop::Damaged(format!(
                        "reading {} at {at} for tier-2: {e}; its sound data resumes at {resume}: \
                         `sluice stream truncate {stream} --segment {number} --offset {resume}` gives up the \
                         bytes before it and lets the mover go on, or a restart with --salvage-damaged-log \
                         moves past the damage and keeps the sound bytes on both sides",
                        task.name
                    )));
                }
                Err(e) => return Err(format!("reading {} at {at} for tier-2: {e}", task.name).into()),
            };
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            let name = chunk_name(&task.name, c.start, epoch);
            store.append(&name, c.len, data.clone()).await.map_err(t2err)?;
            {
                let mut growing = self.t2().growing.borrow_mut();
                match growing.get_mut(&name) {
                    Some(g) if g.sums.len() == c.len => g.sums.extend(&data),
                    // Sums of other bytes than the chunk's (a record failed meanwhile, or a
                    // chunk of another round of this epoch): dropped; closing the chunk
                    // completes its sums file from the chunk's bytes.
                    Some(_) => {
                        growing.remove(&name);
                    }
                    None => {}
                }
            }
            match self.queue_record(&task.name, c.start, epoch, c.len + n) {
                Ok(f) => records.push_back(Box::pin(f)),
                // Truncated past the piece or deleted meanwhile: nothing more to move now.
                Err(EngineError::Truncated { .. } | EngineError::NoSuchSegment(_)) => return Ok(()),
                Err(e) => return Err(format!("recording chunk of {}: {e}", task.name).into()),
            }
            *moved = true;
            *off += n;
            let c = ChunkMeta { len: c.len + n, ..c };
            if c.len >= chunk_bytes {
                // The chunk is full: seal it once its final length is durable.
                while let Some(r) = records.pop_front() {
                    r.await?;
                }
                self.close_chunk(&name, None).await?;
                *chunk = None;
            } else {
                *chunk = Some(c);
            }
            while records.len() > RECORDS_IN_FLIGHT_MAX {
                records.pop_front().expect("non-empty").await?;
            }
        }
        Ok(())
    }

    /// Reads up to `want` durable bytes of `name` from `offset` out of the cache and the log.
    async fn read_log_range(self: &Rc<Self>, name: &str, offset: u64, want: u64) -> Result<Bytes, EngineError> {
        let mut out = BytesMut::new();
        let mut at = offset;
        while (out.len() as u64) < want {
            let left = (want - out.len() as u64) as usize;
            let r = match self.read_for_mover(name, at, left).await {
                Ok(r) => r,
                // What came before damage moves now; the next read meets the damage itself.
                Err(EngineError::DamagedLog { .. } | EngineError::DataCorrupt(_)) if !out.is_empty() => break,
                Err(e) => return Err(e),
            };
            if r.is_empty() {
                break;
            }
            if let [one] = &r.pieces[..]
                && out.is_empty()
                && one.len() >= want as usize
            {
                return Ok(one.slice(..want as usize));
            }
            let mut take = 0;
            for p in &r.pieces {
                let n = p.len().min(left - take);
                out.extend_from_slice(&p[..n]);
                take += n;
            }
            at += take as u64;
        }
        Ok(out.freeze())
    }

    /// Deletes chunks no segment refers to any more. A name a live segment's chunk list
    /// holds is never deleted: a stream deleted and created again reuses segment names, so
    /// the old segment's garbage (re-listed when recovery replays its deletion) can name a
    /// chunk that now belongs to the new segment.
    async fn collect_garbage(&self) -> Result<(), String> {
        // Segments move concurrently: a second collection waits until the first has deleted
        // what it took, so a chunk created after this returns is never among the deleted.
        let _collecting = self.t2().collecting.lock().await;
        let mut garbage = self.core.borrow_mut().take_garbage();
        self.core.borrow().drop_live_chunks(&mut garbage);
        for (i, chunk) in garbage.iter().enumerate() {
            if let Err(e) = self.delete_chunk(chunk).await {
                self.core.borrow_mut().return_garbage(garbage[i..].to_vec());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads from a tier-2 chunk through the block cache, reading ahead.
    pub(crate) async fn read_chunk(
        self: &Rc<Self>,
        chunk: &str,
        offset: u64,
        len: u64,
        chunk_len: u64,
    ) -> Result<Bytes, EngineError> {
        let block = offset / READ_BLOCK_BYTES;
        let data = self.chunk_block(chunk, block, chunk_len).await?;
        for ahead in 1..=READ_AHEAD_BLOCKS {
            let b = block + ahead;
            let key = (chunk.to_string(), b);
            if b * READ_BLOCK_BYTES < chunk_len
                && !self.t2().loading.borrow().contains_key(&key)
                && !self.t2().blocks.borrow().iter().any(|(k, _)| *k == key)
            {
                let this = self.clone();
                let chunk = chunk.to_string();
                glommio::spawn_local(async move {
                    let _ = this.chunk_block(&chunk, b, chunk_len).await;
                })
                .detach();
            }
        }
        let from = (offset - block * READ_BLOCK_BYTES) as usize;
        let to = (from as u64 + len).min(data.len() as u64) as usize;
        Ok(data.slice(from.min(to)..to))
    }

    async fn chunk_block(&self, chunk: &str, block: u64, chunk_len: u64) -> Result<Bytes, EngineError> {
        let key = (chunk.to_string(), block);
        let start = block * READ_BLOCK_BYTES;
        let len = READ_BLOCK_BYTES.min(chunk_len.saturating_sub(start)) as usize;
        loop {
            {
                // A block of a chunk still being filled was cached when the chunk was
                // shorter: one that does not reach as far as the chunk does now is read again.
                let mut blocks = self.t2().blocks.borrow_mut();
                match blocks.iter().position(|(k, _)| *k == key) {
                    Some(i) if blocks[i].1.len() >= len => return Ok(blocks[i].1.clone()),
                    Some(i) => drop(blocks.remove(i)),
                    None => {}
                }
            }
            let wait = {
                let mut loading = self.t2().loading.borrow_mut();
                match loading.get_mut(&key) {
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        Some(rx)
                    }
                    None => {
                        loading.insert(key.clone(), Vec::new());
                        None
                    }
                }
            };
            if let Some(rx) = wait {
                let _ = rx.await;
                continue;
            }
            let result = self.t2().cfg.store.read(chunk, start, len).await;
            let waiters = self.t2().loading.borrow_mut().remove(&key).unwrap_or_default();
            for w in waiters {
                let _ = w.send(());
            }
            let data = result.map_err(|e| EngineError::Tier2(e.to_string()))?;
            if data.len() < len {
                // Recorded bytes are gone: damage, not an outage (retrying will not help).
                tracing::error!(container = self.id(), %chunk, start, len, got = data.len(), "tier-2 chunk is shorter than recorded");
                return Err(EngineError::DataCorrupt(format!(
                    "tier-2 chunk {chunk} is shorter than recorded: {} bytes at chunk offset {start}, {len} expected",
                    data.len()
                )));
            }
            self.check_sums(chunk, start, &data).await?;
            let mut blocks = self.t2().blocks.borrow_mut();
            blocks.push_back((key, data.clone()));
            while blocks.len() > READ_BLOCKS_CACHED {
                blocks.pop_front();
            }
            return Ok(data);
        }
    }

    /// The mover's last error and since when its rounds fail, if they do.
    pub fn tier2_error(&self) -> Option<(String, Instant)> {
        self.tier2.as_ref().and_then(|t| t.last_error.borrow().clone())
    }
}
