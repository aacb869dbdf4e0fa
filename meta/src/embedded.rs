//! Embedded durable metadata store for standalone mode. One thread owns an in-memory
//! ordered map and an append-only file (`meta.log`) of checksummed records; every change is
//! appended and fdatasync'd before it is answered. Group commit: the thread takes every
//! request waiting (up to `GROUP_MAX`), applies them in order, syncs the file once, and only
//! then answers them all and tells the watchers (a read in the group is answered after the
//! sync too, so nothing unsynced is ever seen). A failed sync stops the store: that request
//! group and every later one gets the error. Each record is followed, in the same write, by a
//! *commit* record (op 4): the length and CRC-32C of the group so far (the bytes since the
//! last sync). On open the file is replayed up to its last sound commit, and what follows (a
//! group whose sync never finished, its pages torn in any order) is cut. Damage before a
//! sound commit over a group that begins after it (a group begins where a sync ended) hit
//! changes that were synced and answered: the store then refuses to open rather than cut
//! them away, unless told to salvage (it then keeps a copy of the file as
//! `meta.log.damaged` and cuts at the damage). Once idle after a group, the store appends an
//! empty commit and syncs it, so that damage to the last group (a compacted file is one) is
//! told from a torn tail too. A full disk refuses the change whose record and commit do not
//! fit, and the store goes on. When the file grows well
//! past the live data it is rewritten (temp file, fsync, rename, directory fsync). Watches
//! are notified after each change; keys put under a lease live in memory only and vanish
//! when the lease expires or is revoked (leases do not survive a restart of a standalone
//! node, and neither do their keys).
//!
//! Record: `len u32 | crc32c u32 (of body) | body`, body = `op u8 (1 put, 2 delete) |
//! key_len u16 | key | version u64 | value_len u32 | value`, little-endian; or `op u8 = 3 |
//! records...` (a transaction's records, framed the same way, applied all or none); or
//! `op u8 = 4 | group_len u64 | group_crc u32` (a commit: the `group_len` bytes before it,
//! from the group's start, have that CRC-32C). A file of builds before commits has none:
//! its sound records all count, and the first open seals them with a commit.

use crate::store::{LeaseId, MetaError, MetaStore, MetaTxn, TxnOp, Versioned, Watch, WatchEvent};
use futures::channel::{mpsc, oneshot};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FILE_NAME: &str = "meta.log";
const COMPACT_BYTES_MIN: u64 = 1 << 20;

enum Cmd {
    Get(String, oneshot::Sender<Result<Option<Versioned>, MetaError>>),
    Put(String, Option<u64>, Vec<u8>, oneshot::Sender<Result<u64, MetaError>>),
    Delete(String, Option<u64>, oneshot::Sender<Result<bool, MetaError>>),
    Range(String, oneshot::Sender<Result<Vec<(String, Versioned)>, MetaError>>),
    RangePage(String, String, usize, oneshot::Sender<Result<Vec<(String, Versioned)>, MetaError>>),
    Watch(String, mpsc::UnboundedSender<Result<WatchEvent, MetaError>>),
    Grant(Duration, oneshot::Sender<Result<LeaseId, MetaError>>),
    KeepAlive(LeaseId, oneshot::Sender<Result<(), MetaError>>),
    Revoke(LeaseId, oneshot::Sender<Result<(), MetaError>>),
    PutLeased(String, Vec<u8>, LeaseId, oneshot::Sender<Result<u64, MetaError>>),
    Txn(MetaTxn, oneshot::Sender<Result<(), MetaError>>),
}

/// Most requests applied before one sync.
const GROUP_MAX: usize = 256;

/// Answers a request once its group is synced, with the group's sync error if it failed.
type Reply = Box<dyn FnOnce(Option<&MetaError>) + Send>;

/// The reply for `result` through `tx`, sent once the group is durable.
fn reply<T: Send + 'static>(tx: oneshot::Sender<Result<T, MetaError>>, result: Result<T, MetaError>) -> Reply {
    Box::new(move |failed| {
        let _ = tx.send(match failed {
            Some(e) => Err(e.clone()),
            None => result,
        });
    })
}

/// How often the store thread looks for expired leases.
const LEASE_CHECK: Duration = Duration::from_millis(50);

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// Handle to the embedded store; cheap to clone, usable from any thread or executor.
#[derive(Clone)]
pub struct EmbeddedStore {
    tx: crossbeam_channel::Sender<Cmd>,
}

struct State {
    dir: PathBuf,
    file: File,
    file_bytes: u64,
    /// When a compaction last failed before replacing the file (a full disk): the next
    /// attempt waits `COMPACT_RETRY`, and the store goes on with the file it has.
    compact_failed_at: Option<Instant>,
    /// The file size below which no compaction can be due: four times the live bytes when
    /// they were last counted (a walk of the whole map, done only once the file reaches it).
    compact_check_at: u64,
    map: BTreeMap<String, Versioned>,
    watchers: Vec<(String, mpsc::UnboundedSender<Result<WatchEvent, MetaError>>)>,
    /// Leased keys live in memory only: like their leases, they do not survive a restart.
    leases: HashMap<LeaseId, Lease>,
    leased_keys: HashMap<String, LeaseId>,
    next_lease: LeaseId,
    /// Records written since the last sync.
    dirty: bool,
    /// Where the records written since the last commit begin, and their CRC-32C so far.
    group_start: u64,
    group_crc: u32,
    /// The last group is synced but nothing after it says so yet (`prove`).
    unproven: bool,
    /// Watch events of the current group, sent after its sync.
    events: Vec<WatchEvent>,
    /// Set by a failed write or sync: the store answers every later request with it.
    failed: Option<MetaError>,
}

fn encode(op: u8, key: &str, version: u64, value: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(15 + key.len() + value.len());
    body.push(op);
    body.extend_from_slice(&(key.len() as u16).to_le_bytes());
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(&version.to_le_bytes());
    body.extend_from_slice(&(value.len() as u32).to_le_bytes());
    body.extend_from_slice(value);
    let mut rec = Vec::with_capacity(8 + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// Encodes a transaction's persistent records as one group record (op 3), so a torn write
/// loses all of them or none.
fn encode_group(records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3u8];
    for r in records {
        body.extend_from_slice(r);
    }
    let mut rec = Vec::with_capacity(8 + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// Bytes of a commit record's body.
const COMMIT_BODY: usize = 13;

/// The commit record of a group of `len` bytes of records with CRC-32C `crc` (op 4).
fn encode_commit(len: u64, crc: u32) -> Vec<u8> {
    let mut body = vec![4u8];
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(&crc.to_le_bytes());
    let mut rec = Vec::with_capacity(8 + COMMIT_BODY);
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// The start of the group a sound commit record at `pos` closes (up to it), if `starts`
/// allows it and the bytes from there have the recorded CRC-32C.
fn committed_group(bytes: &[u8], pos: usize, starts: impl Fn(usize) -> bool) -> Option<usize> {
    let body = next_body(bytes, pos).filter(|b| b.len() == COMMIT_BODY && b[0] == 4)?;
    let len = usize::try_from(u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"))).ok()?;
    let crc = u32::from_le_bytes(body[9..13].try_into().expect("4 bytes"));
    let start = pos.checked_sub(len).filter(|&s| starts(s))?;
    (crc32c::crc32c(&bytes[start..pos]) == crc).then_some(start)
}

/// The next framed record's body at `pos`, if whole and its checksum holds.
fn next_body(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let head = bytes.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let body = bytes.get(pos + 8..pos + 8 + len)?;
    (crc32c::crc32c(body) == crc && !body.is_empty()).then_some(body)
}

/// One change a record body holds: the key, its version, and the value put (`None`: the key
/// deleted).
type Change<'a> = (&'a str, u64, Option<&'a [u8]>);

/// The change of one put/delete body, if it parses.
fn parse_body(body: &[u8]) -> Option<Change<'_>> {
    if body.len() < 15 {
        return None;
    }
    let klen = u16::from_le_bytes([body[1], body[2]]) as usize;
    let key = body.get(3..3 + klen).and_then(|k| std::str::from_utf8(k).ok())?;
    let rest = body.get(3 + klen..).filter(|r| r.len() >= 12)?;
    let version = u64::from_le_bytes(rest[0..8].try_into().expect("8 bytes"));
    let vlen = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
    let value = rest.get(12..12 + vlen)?;
    match body[0] {
        1 => Some((key, version, Some(value))),
        2 => Some((key, version, None)),
        _ => None,
    }
}

/// The changes of one record's body: a put, a delete, or a transaction's records (all of
/// them, or `None` if any does not parse).
fn parse_record(body: &[u8]) -> Option<Vec<Change<'_>>> {
    if body[0] != 3 {
        return parse_body(body).map(|c| vec![c]);
    }
    // A transaction: its records are covered by the outer checksum.
    let mut changes = Vec::new();
    let mut at = 1;
    while at < body.len() {
        let b = next_body(body, at)?;
        changes.push(parse_body(b)?);
        at += 8 + b.len();
    }
    Some(changes)
}

/// Applies `changes` to `map`, in order.
fn apply_changes(map: &mut BTreeMap<String, Versioned>, changes: Vec<Change<'_>>) {
    for (key, version, value) in changes {
        match value {
            Some(v) => map.insert(key.to_string(), Versioned { value: v.to_vec(), version }),
            None => map.remove(key),
        };
    }
}

/// What a replay of the file found.
struct Replayed {
    map: BTreeMap<String, Versioned>,
    /// The end of the last record taken: the file is cut there.
    valid: usize,
    /// Whether the file has a commit record (a file of builds before commits has none).
    commits: bool,
    /// Damage to synced records: where the sound records stop, and the start of a complete
    /// group after that.
    damage: Option<(usize, usize)>,
}

/// Replays the file: every record up to its last sound commit (in a file without commits,
/// every sound record), and whether damage comes before a complete later group.
fn replay(bytes: &[u8]) -> Replayed {
    let mut map = BTreeMap::new();
    // The changes read since the last commit, applied once a commit closes their group.
    let mut pending: Vec<Change<'_>> = Vec::new();
    // The end of the last commit, and where its group began.
    let (mut pos, mut committed, mut group, mut commits) = (0, 0, 0, false);
    while let Some(body) = next_body(bytes, pos) {
        let end = pos + 8 + body.len();
        if body[0] == 4 {
            // A commit goes on the last one's group (a later record of the same sync) or
            // begins a group after it (the first record after a sync; or, sealing records
            // written before commits existed, from the file's start).
            let Some(start) = committed_group(bytes, pos, |s| s == committed || s == group) else { break };
            apply_changes(&mut map, std::mem::take(&mut pending));
            (committed, group, commits) = (end, start, true);
        } else if let Some(changes) = parse_record(body) {
            pending.extend(changes);
        } else {
            break;
        }
        pos = end;
    }
    if !commits {
        // A file of builds before commits: every sound record counts.
        apply_changes(&mut map, pending);
        committed = pos;
    }
    // A sound commit after the stop, over a group that begins after it: a group begins
    // where a sync ended, so the bytes the stop is in had been synced.
    let last = bytes.len().saturating_sub(8 + COMMIT_BODY);
    let damage = (pos < bytes.len())
        .then(|| {
            (pos + 1..=last)
                .filter(|&p| bytes[p..p + 4] == (COMMIT_BODY as u32).to_le_bytes() && bytes[p + 8] == 4)
                .find_map(|p| committed_group(bytes, p, |s| s > pos))
        })
        .flatten()
        .map(|group| (pos, group));
    Replayed { map, valid: committed, commits, damage }
}

/// How long after a failed compaction the next is tried.
const COMPACT_RETRY: Duration = Duration::from_secs(10);

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl State {
    /// Writes a record; `sync` makes it durable with the rest of its group.
    fn append(&mut self, rec: &[u8]) -> Result<(), MetaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let io = |e: std::io::Error| MetaError::Io(e.to_string());
        // The record and, in the same write, a commit over the group so far (from the last
        // sync on): the group is whole up to there if its bytes reach the disk.
        let crc = crc32c::crc32c_append(self.group_crc, rec);
        let mut bytes = Vec::with_capacity(rec.len() + 8 + COMMIT_BODY);
        bytes.extend_from_slice(rec);
        bytes.extend_from_slice(&encode_commit(self.file_bytes + rec.len() as u64 - self.group_start, crc));
        if let Err(e) = self.file.write_all(&bytes) {
            // A full disk: cut off what part of the record went in, and the store goes on
            // (the change is refused, nothing before it is touched).
            let full = matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded);
            if full && self.file.set_len(self.file_bytes).is_ok() {
                return Err(MetaError::NoSpace(e.to_string()));
            }
            // A partial record may sit at the end of the file: nothing more may follow it.
            let e = io(e);
            self.failed = Some(e.clone());
            return Err(e);
        }
        self.file_bytes += bytes.len() as u64;
        self.group_crc = crc32c::crc32c_append(crc, &bytes[rec.len()..]);
        self.dirty = true;
        Ok(())
    }

    /// Once the store is idle after a group: an empty commit after it, synced. Replay tells
    /// damage from a torn tail by a later group, so without it damage to the last group (a
    /// compacted file is one group) would be cut as a torn tail while nothing follows it. Not
    /// kept on a full disk (it is only a proof; the next group proves as much).
    fn prove(&mut self) {
        if !self.unproven || self.dirty || self.failed.is_some() {
            return;
        }
        let commit = encode_commit(0, 0);
        match self.file.write_all(&commit).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.file_bytes += commit.len() as u64;
                (self.group_start, self.unproven) = (self.file_bytes, false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metadata log: the commit after the last group was not written");
                if self.file.set_len(self.file_bytes).is_err() {
                    self.failed = Some(MetaError::Io(format!("cutting a partial commit off the metadata log: {e}")));
                }
            }
        }
    }

    /// Ends a group: one fdatasync for its records, then its watch events, then a
    /// compaction if due. An error here stops the store (the memory holds changes the file
    /// may not).
    fn sync(&mut self) -> Result<(), MetaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                let e = MetaError::Io(format!("syncing the metadata log: {e}"));
                tracing::error!(error = %e, "metadata store stopped");
                self.failed = Some(e.clone());
                return Err(e);
            }
            self.dirty = false;
            // The next group begins here.
            (self.group_start, self.group_crc, self.unproven) = (self.file_bytes, 0, true);
        }
        let events = std::mem::take(&mut self.events);
        self.watchers.retain(|(prefix, tx)| {
            events
                .iter()
                .filter(|ev| ev.key.starts_with(prefix.as_str()))
                .all(|ev| tx.unbounded_send(Ok(ev.clone())).is_ok())
        });
        if let Err(e) = self.maybe_compact() {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), MetaError> {
        // Checked after every group, reads' included: the live bytes are counted only once
        // the file could be due (they were counted at every sync, a walk of the whole map:
        // with 1000 streams a quarter of the metadata thread's time under the retention
        // service's reads).
        if self.file_bytes < COMPACT_BYTES_MIN.max(self.compact_check_at) {
            return Ok(());
        }
        let live: u64 = self.map.iter().map(|(k, v)| (23 + k.len() + v.value.len()) as u64).sum();
        if self.file_bytes < 4 * live {
            self.compact_check_at = 4 * live;
            return Ok(());
        }
        if self.compact_failed_at.is_some_and(|t| t.elapsed() < COMPACT_RETRY) {
            return Ok(());
        }
        let io = |e: std::io::Error| MetaError::Io(e.to_string());
        let tmp = self.dir.join("meta.log.tmp");
        // Until the rename the old file is whole: a failure here (a full disk) only skips
        // this compaction.
        let written = (|| -> std::io::Result<u64> {
            let mut f = File::create(&tmp)?;
            let (mut bytes, mut crc) = (0, 0);
            for (k, v) in self.map.iter().filter(|(k, _)| !self.leased_keys.contains_key(*k)) {
                let rec = encode(1, k, v.version, &v.value);
                f.write_all(&rec)?;
                bytes += rec.len() as u64;
                crc = crc32c::crc32c_append(crc, &rec);
            }
            // One group: the whole map.
            let commit = encode_commit(bytes, crc);
            f.write_all(&commit)?;
            f.sync_all()?;
            Ok(bytes + commit.len() as u64)
        })();
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(error = %e, "compacting the metadata log failed; keeping the current one");
                self.compact_failed_at = Some(Instant::now());
                return Ok(());
            }
        };
        self.compact_failed_at = None;
        std::fs::rename(&tmp, self.dir.join(FILE_NAME)).map_err(io)?;
        sync_dir(&self.dir).map_err(io)?;
        self.file = OpenOptions::new().append(true).open(self.dir.join(FILE_NAME)).map_err(io)?;
        (self.file_bytes, self.group_start, self.group_crc, self.unproven) = (bytes, bytes, 0, true);
        Ok(())
    }

    fn write(&mut self, key: String, expected: Option<u64>, value: Vec<u8>) -> Result<u64, MetaError> {
        let actual = self.map.get(&key).map_or(0, |v| v.version);
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(MetaError::Conflict { key, expected, actual });
        }
        let version = actual + 1;
        self.append(&encode(1, &key, version, &value))?;
        self.detach_lease(&key);
        self.notify(&key, Some(&value), version);
        self.map.insert(key, Versioned { value, version });
        Ok(version)
    }

    /// Applies a transaction (see `MetaTxn`): checks, one group record, then memory.
    fn txn(&mut self, txn: MetaTxn) -> Result<(), MetaError> {
        for (key, expected) in &txn.compares {
            let actual = self.map.get(key).map_or(0, |v| v.version);
            if actual != *expected {
                return Err(MetaError::Conflict { key: key.clone(), expected: *expected, actual });
            }
        }
        let mut records = Vec::new();
        for op in &txn.ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let actual = self.map.get(key).map_or(0, |v| v.version);
                    let persistent = self.map.contains_key(key) && !self.leased_keys.contains_key(key);
                    match lease {
                        None => records.push(encode(1, key, actual + 1, value)),
                        Some(id) => {
                            if !self.leases.contains_key(id) {
                                return Err(MetaError::LeaseNotFound(*id));
                            }
                            if persistent {
                                records.push(encode(2, key, actual, &[]));
                            }
                        }
                    }
                }
                TxnOp::Delete { key } => {
                    if self.map.contains_key(key) && !self.leased_keys.contains_key(key) {
                        records.push(encode(2, key, self.map[key].version, &[]));
                    }
                }
            }
        }
        if !records.is_empty() {
            self.append(&encode_group(&records))?;
        }
        for op in txn.ops {
            match op {
                TxnOp::Put { key, value, lease: None } => {
                    let version = self.map.get(&key).map_or(0, |v| v.version) + 1;
                    self.detach_lease(&key);
                    self.notify(&key, Some(&value), version);
                    self.map.insert(key, Versioned { value, version });
                }
                TxnOp::Put { key, value, lease: Some(id) } => {
                    self.put_leased_memory(key, value, id);
                }
                TxnOp::Delete { key } => {
                    if let Some(v) = self.map.remove(&key) {
                        self.detach_lease(&key);
                        self.notify(&key, None, v.version);
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues a watch event; watchers get it once its group is synced.
    fn notify(&mut self, key: &str, value: Option<&Vec<u8>>, version: u64) {
        if self.watchers.iter().any(|(prefix, _)| key.starts_with(prefix.as_str())) {
            self.events.push(WatchEvent { key: key.to_string(), value: value.cloned(), version });
        }
    }

    fn detach_lease(&mut self, key: &str) {
        if let Some(id) = self.leased_keys.remove(key)
            && let Some(l) = self.leases.get_mut(&id)
        {
            l.keys.remove(key);
        }
    }

    fn put_leased(&mut self, key: String, value: Vec<u8>, lease: LeaseId) -> Result<u64, MetaError> {
        if !self.leases.contains_key(&lease) {
            return Err(MetaError::LeaseNotFound(lease));
        }
        // A persistent key becoming leased: the file must forget it.
        if let Some(v) = self.map.get(&key)
            && !self.leased_keys.contains_key(&key)
        {
            let rec = encode(2, &key, v.version, &[]);
            self.append(&rec)?;
        }
        Ok(self.put_leased_memory(key, value, lease))
    }

    /// The in-memory part of a leased put (the lease exists; the file already forgot the key).
    fn put_leased_memory(&mut self, key: String, value: Vec<u8>, lease: LeaseId) -> u64 {
        let l = self.leases.get_mut(&lease).expect("lease checked by the caller");
        l.keys.insert(key.clone());
        let version = self.map.get(&key).map_or(0, |v| v.version) + 1;
        if self.leased_keys.get(&key) != Some(&lease)
            && let Some(old) = self.leased_keys.insert(key.clone(), lease)
            && let Some(ol) = self.leases.get_mut(&old)
        {
            ol.keys.remove(&key);
        }
        self.notify(&key, Some(&value), version);
        self.map.insert(key, Versioned { value, version });
        version
    }

    fn end_lease(&mut self, id: LeaseId) {
        if let Some(l) = self.leases.remove(&id) {
            for key in l.keys {
                self.leased_keys.remove(&key);
                if let Some(v) = self.map.remove(&key) {
                    self.notify(&key, None, v.version);
                }
            }
        }
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.end_lease(id);
        }
    }

    /// Applies one request (not yet synced); its reply, sent after the group's sync. On a
    /// stopped store every change fails at `append` and `sync` answers the whole group with
    /// the error.
    fn handle(&mut self, cmd: Cmd) -> Option<Reply> {
        Some(match cmd {
            Cmd::Get(k, r) => reply(r, Ok(self.map.get(&k).cloned())),
            Cmd::Put(k, e, v, r) => reply(r, self.write(k, e, v)),
            Cmd::Delete(k, e, r) => reply(r, self.delete(k, e)),
            Cmd::Range(p, r) => {
                let out = self.map.range(p.clone()..).take_while(|(k, _)| k.starts_with(&p));
                reply(r, Ok(out.map(|(k, v)| (k.clone(), v.clone())).collect()))
            }
            Cmd::RangePage(p, after, limit, r) => {
                use std::ops::Bound;
                let from =
                    if after.as_str() > p.as_str() { Bound::Excluded(after) } else { Bound::Included(p.clone()) };
                let out = self.map.range((from, Bound::Unbounded)).take_while(|(k, _)| k.starts_with(&p)).take(limit);
                reply(r, Ok(out.map(|(k, v)| (k.clone(), v.clone())).collect()))
            }
            Cmd::Watch(p, tx) => {
                match &self.failed {
                    Some(e) => {
                        let _ = tx.unbounded_send(Err(e.clone()));
                    }
                    None => self.watchers.push((p, tx)),
                }
                return None;
            }
            Cmd::Grant(ttl, r) => {
                let id = self.next_lease;
                self.next_lease += 1;
                self.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
                reply(r, Ok(id))
            }
            Cmd::KeepAlive(id, r) => {
                let res = match self.leases.get_mut(&id) {
                    Some(l) => {
                        l.deadline = Instant::now() + l.ttl;
                        Ok(())
                    }
                    None => Err(MetaError::LeaseNotFound(id)),
                };
                reply(r, res)
            }
            Cmd::Revoke(id, r) => {
                let res = if self.leases.contains_key(&id) { Ok(()) } else { Err(MetaError::LeaseNotFound(id)) };
                self.end_lease(id);
                reply(r, res)
            }
            Cmd::PutLeased(k, v, id, r) => reply(r, self.put_leased(k, v, id)),
            Cmd::Txn(t, r) => reply(r, self.txn(t)),
        })
    }

    fn delete(&mut self, key: String, expected: Option<u64>) -> Result<bool, MetaError> {
        let Some(actual) = self.map.get(&key).map(|v| v.version) else {
            return match expected {
                Some(e) if e != 0 => Err(MetaError::Conflict { key, expected: e, actual: 0 }),
                _ => Ok(false),
            };
        };
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(MetaError::Conflict { key, expected, actual });
        }
        if self.leased_keys.contains_key(&key) {
            self.detach_lease(&key);
        } else {
            self.append(&encode(2, &key, actual, &[]))?;
        }
        self.map.remove(&key);
        self.notify(&key, None, actual);
        Ok(true)
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` and starts its thread.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        Self::open_with(dir, false)
    }

    /// Opens (or creates) the store in `dir` and starts its thread. A log damaged before
    /// changes that were synced after the damaged ones stops the open with `Corrupt`, unless
    /// `salvage`: then the file is kept whole as `meta.log.damaged`, and the store opens with
    /// the changes before the damage.
    pub fn open_with(dir: &Path, salvage: bool) -> Result<Self, MetaError> {
        let io = |e: std::io::Error| MetaError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let Replayed { map, valid, commits, damage } = replay(&bytes);
        if let Some((at, group)) = damage {
            let what = format!(
                "the metadata log {} is damaged at byte {at}, before changes that were made durable after it (a \
                 complete group of them from byte {group}); cutting it there would lose them",
                path.display()
            );
            if !salvage {
                return Err(MetaError::Corrupt(format!(
                    "{what}. Refusing to start; start with --salvage-damaged-log to keep the changes before the \
                     damage (the whole file is kept as {FILE_NAME}.damaged)"
                )));
            }
            let copy = dir.join(format!("{FILE_NAME}.damaged"));
            std::fs::write(&copy, &bytes).and_then(|()| File::open(&copy)?.sync_all()).map_err(io)?;
            tracing::error!(copy = %copy.display(), "{what}: salvaging, the changes after byte {valid} are lost");
        }
        if valid < bytes.len() {
            if damage.is_none() {
                tracing::warn!(file = %path.display(), at = valid, "cutting torn tail of the metadata log");
            }
            file.set_len(valid as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let mut file_bytes = valid as u64;
        if !commits && valid > 0 {
            // Records of builds before commits: sealed as one group, so that a damage among
            // them is told from a torn tail from now on.
            let commit = encode_commit(file_bytes, crc32c::crc32c(&bytes[..valid]));
            file.write_all(&commit).and_then(|()| file.sync_data()).map_err(io)?;
            file_bytes += commit.len() as u64;
        }
        sync_dir(dir).map_err(io)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(io)?;
        }
        let mut state = State {
            dir: dir.to_path_buf(),
            file,
            file_bytes,
            group_start: file_bytes,
            group_crc: 0,
            // The records of earlier builds just sealed.
            unproven: !commits && valid > 0,
            compact_failed_at: None,
            compact_check_at: 0,
            map,
            watchers: Vec::new(),
            leases: HashMap::new(),
            leased_keys: HashMap::new(),
            next_lease: 1,
            dirty: false,
            events: Vec::new(),
            failed: None,
        };
        let (tx, rx) = crossbeam_channel::unbounded::<Cmd>();
        std::thread::Builder::new()
            .name("sluice-meta".into())
            .spawn(move || {
                loop {
                    let first = match rx.recv_timeout(LEASE_CHECK) {
                        Ok(cmd) => cmd,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            state.expire_leases();
                            let _ = state.sync();
                            state.prove();
                            continue;
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                    };
                    state.expire_leases();
                    // Everything waiting, in order, then one sync for all of it.
                    let mut replies = Vec::new();
                    let mut next = Some(first);
                    while let Some(cmd) = next.take() {
                        replies.extend(state.handle(cmd));
                        if replies.len() < GROUP_MAX {
                            next = rx.try_recv().ok();
                        }
                    }
                    let synced = state.sync();
                    for r in replies {
                        r(synced.as_ref().err());
                    }
                }
            })
            .map_err(io)?;
        Ok(Self { tx })
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, MetaError>>) -> Cmd) -> Result<T, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| MetaError::Closed)?;
        rx.await.map_err(|_| MetaError::Closed)?
    }
}

impl MetaStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, MetaError> {
        let key = key.to_string();
        self.call(|r| Cmd::Get(key, r)).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, MetaError> {
        let key = key.to_string();
        self.call(|r| Cmd::Put(key, None, value, r)).await
    }
    async fn compare_and_swap(&self, key: &str, expected: u64, value: Vec<u8>) -> Result<u64, MetaError> {
        let key = key.to_string();
        self.call(|r| Cmd::Put(key, Some(expected), value, r)).await
    }
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, MetaError> {
        let key = key.to_string();
        self.call(|r| Cmd::Delete(key, expected, r)).await
    }
    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetaError> {
        let prefix = prefix.to_string();
        self.call(|r| Cmd::Range(prefix, r)).await
    }
    async fn range_page(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<(String, Versioned)>, MetaError> {
        let (prefix, after) = (prefix.to_string(), after.to_string());
        self.call(|r| Cmd::RangePage(prefix, after, limit, r)).await
    }
    async fn watch(&self, prefix: &str) -> Result<Watch, MetaError> {
        let (tx, rx) = mpsc::unbounded();
        self.tx.send(Cmd::Watch(prefix.to_string(), tx)).map_err(|_| MetaError::Closed)?;
        // A round trip so the watch is registered before this returns.
        self.call(|r| Cmd::Range("\u{10FFFF}".into(), r)).await?;
        Ok(Watch::new(rx, None))
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        self.call(|r| Cmd::Grant(ttl, r)).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.call(|r| Cmd::KeepAlive(lease, r)).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.call(|r| Cmd::Revoke(lease, r)).await
    }
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<u64, MetaError> {
        let key = key.to_string();
        self.call(|r| Cmd::PutLeased(key, value, lease, r)).await
    }
    async fn txn(&self, txn: MetaTxn) -> Result<(), MetaError> {
        self.call(|r| Cmd::Txn(txn, r)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-meta-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Group commit: concurrent updaters (each awaiting its own change) all see their
    /// changes durable; a watcher sees every change, in order per key; after a restart
    /// every value is there.
    #[test]
    fn concurrent_changes_share_syncs_and_survive_restart() {
        let dir = tmp("group");
        const THREADS: u64 = 8;
        const EACH: u64 = 200;
        {
            let s = EmbeddedStore::open(&dir).unwrap();
            let mut watch = block_on(s.watch("g/")).unwrap();
            let started = Instant::now();
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        block_on(async {
                            for v in 1..=EACH {
                                let got = s.compare_and_swap(&format!("g/{t}"), v - 1, v.to_le_bytes().to_vec()).await;
                                assert_eq!(got.unwrap(), v);
                            }
                        })
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            eprintln!("{} changes from {THREADS} threads in {:.2?}", THREADS * EACH, started.elapsed());
            let mut seen = vec![0u64; THREADS as usize];
            block_on(async {
                for _ in 0..THREADS * EACH {
                    let ev = watch.next().await.unwrap().unwrap();
                    let t: usize = ev.key["g/".len()..].parse().unwrap();
                    assert_eq!(ev.version, seen[t] + 1, "watch events in order per key");
                    seen[t] = ev.version;
                }
            });
        }
        let s = EmbeddedStore::open(&dir).unwrap();
        for t in 0..THREADS {
            let v = block_on(s.get(&format!("g/{t}"))).unwrap().unwrap();
            assert_eq!((v.version, v.value), (EACH, EACH.to_le_bytes().to_vec()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn versions_cas_range_and_restart() {
        let dir = tmp("basic");
        {
            let s = EmbeddedStore::open(&dir).unwrap();
            block_on(async {
                assert_eq!(s.compare_and_swap("a/1", 0, b"x".to_vec()).await.unwrap(), 1);
                assert!(matches!(
                    s.compare_and_swap("a/1", 0, b"y".to_vec()).await,
                    Err(MetaError::Conflict { actual: 1, .. })
                ));
                assert_eq!(s.compare_and_swap("a/1", 1, b"y".to_vec()).await.unwrap(), 2);
                s.put("a/2", b"z".to_vec()).await.unwrap();
                s.put("b/1", b"w".to_vec()).await.unwrap();
                assert!(s.delete("b/1", Some(1)).await.unwrap());
                assert!(!s.delete("b/1", None).await.unwrap());
                let r = s.range("a/").await.unwrap();
                assert_eq!(r.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["a/1", "a/2"]);
            });
        }
        // A torn tail is cut on open.
        let path = dir.join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let s = EmbeddedStore::open(&dir).unwrap();
        block_on(async {
            assert_eq!(s.get("a/1").await.unwrap().unwrap(), Versioned { value: b"y".to_vec(), version: 2 });
            assert_eq!(s.get("b/1").await.unwrap(), None);
            s.put("c", vec![1]).await.unwrap();
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Puts `k0`..`k{n-1}` (value `v{i}`), each its own synced group, into a new store in
    /// `dir`; returns the file's bytes and where each group (its put, then its commit) ends.
    fn groups_of_puts(dir: &Path, n: usize) -> (Vec<u8>, Vec<usize>) {
        let s = EmbeddedStore::open(dir).unwrap();
        let mut ends = Vec::new();
        for i in 0..n {
            block_on(s.put(&format!("k{i}"), format!("v{i}").into_bytes())).unwrap();
            ends.push(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len() as usize);
        }
        drop(s);
        (std::fs::read(dir.join(FILE_NAME)).unwrap(), ends)
    }

    /// Which of `k0`..`k{n-1}` a store opened on `dir` holds.
    fn keys_held(dir: &Path, n: usize, salvage: bool) -> Result<Vec<usize>, MetaError> {
        let s = EmbeddedStore::open_with(dir, salvage)?;
        Ok((0..n).filter(|i| block_on(s.get(&format!("k{i}"))).unwrap().is_some()).collect())
    }

    /// A group whose sync never finished may be on disk in any state: without its commit, or
    /// with its commit and some of its bytes missing (pages written back out of order). It
    /// was never answered, and open cuts it; the groups before it stay.
    #[test]
    fn a_torn_last_group_is_cut_whatever_of_it_reached_the_disk() {
        let dir = tmp("torn-group");
        std::fs::create_dir_all(&dir).unwrap();
        let (file, at) = file_of_groups(&[&[0], &[1], &[2], &[3]]);
        let commit = file.len() - (8 + COMMIT_BODY);
        // Its put record whole, its commit missing; or its commit whole and a byte of its
        // put zeroed; or only its commit (the put's page not written).
        let mut no_commit = file.clone();
        no_commit.truncate(commit);
        let mut hole = file.clone();
        hole[at[3] + 11] = 0;
        let mut only_commit = file.clone();
        only_commit[at[3]..commit].fill(0);
        for (what, bytes) in [("no commit", no_commit), ("a hole", hole), ("only its commit", only_commit)] {
            std::fs::write(dir.join(FILE_NAME), &bytes).unwrap();
            assert_eq!(keys_held(&dir, 4, false).unwrap(), [0, 1, 2], "{what}");
            let len = std::fs::metadata(dir.join(FILE_NAME)).unwrap().len() as usize;
            // Cut there (and an empty commit after it if the store went idle meanwhile).
            assert!(len == at[3] || len == at[3] + 8 + COMMIT_BODY, "{what}: cut at {len}");
            assert!(!dir.join(format!("{FILE_NAME}.damaged")).exists());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The last group (a compacted file is one group) is damage too once the store has gone
    /// idle after it: it then writes an empty commit, which nothing but a sync precedes.
    #[test]
    fn the_last_group_is_proven_once_the_store_goes_idle() {
        let dir = tmp("proven");
        let s = EmbeddedStore::open(&dir).unwrap();
        block_on(s.put("k0", b"v0".to_vec())).unwrap();
        let proof = encode_commit(0, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read(dir.join(FILE_NAME)).unwrap().ends_with(&proof) {
            assert!(Instant::now() < deadline, "no empty commit after the idle group");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(s);
        let mut bad = std::fs::read(dir.join(FILE_NAME)).unwrap();
        bad[11] ^= 1;
        std::fs::write(dir.join(FILE_NAME), &bad).unwrap();
        assert!(matches!(keys_held(&dir, 1, false), Err(MetaError::Corrupt(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file as the store writes it, of groups of puts `k{i}` (value `v{i}`): each record
    /// with its commit over its group so far; and where each record begins.
    fn file_of_groups(groups: &[&[usize]]) -> (Vec<u8>, Vec<usize>) {
        let (mut file, mut at) = (Vec::new(), Vec::new());
        for group in groups {
            let start = file.len();
            for &i in group.iter() {
                at.push(file.len());
                file.extend_from_slice(&encode(1, &format!("k{i}"), 1, format!("v{i}").as_bytes()));
                let len = file.len() - start;
                file.extend_from_slice(&encode_commit(len as u64, crc32c::crc32c(&file[start..])));
            }
        }
        (file, at)
    }

    /// Random damage to a file of 40 groups of one to three changes, 20,000 times: bytes
    /// flipped, runs of random bytes or of zeros, a run copied from elsewhere in the file,
    /// the file cut short. The replay always ends (no panic), within the file, and every value
    /// it takes is one that was written under its key; every 100th file the store opens on
    /// (plain and salvaging) or refuses. Seeded.
    #[test]
    fn random_damage_never_panics_the_replay_nor_invents_values() {
        use rand::{Rng, SeedableRng};
        let groups: Vec<Vec<usize>> = (0..40).map(|g| (g * 3..g * 3 + 1 + g % 3).collect()).collect();
        let groups: Vec<&[usize]> = groups.iter().map(Vec::as_slice).collect();
        let (file, _) = file_of_groups(&groups);
        let mut rng = rand::rngs::StdRng::seed_from_u64(44);
        let dir = tmp("random-damage");
        let (mut whole, mut cut, mut damaged) = (0, 0, 0);
        for round in 0..20_000 {
            let mut bad = file.clone();
            for _ in 0..rng.random_range(1..4) {
                if bad.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bad.len());
                let run = at..(at + rng.random_range(1..64)).min(bad.len());
                match rng.random_range(0..5) {
                    0 | 1 => bad[at] ^= 1 << rng.random_range(0..8),
                    2 => rng.fill(&mut bad[run]),
                    3 => bad[run].fill(0),
                    _ if rng.random_bool(0.5) => bad.truncate(at),
                    _ => {
                        let from = rng.random_range(0..file.len() - run.len());
                        let len = run.len();
                        bad[run].copy_from_slice(&file[from..from + len]);
                    }
                }
            }
            let r = std::panic::catch_unwind(|| replay(&bad)).unwrap_or_else(|_| panic!("round {round}: a panic"));
            assert!(r.valid <= bad.len(), "round {round}: valid to {} of {}", r.valid, bad.len());
            for (key, v) in &r.map {
                let i: usize = key.strip_prefix('k').and_then(|n| n.parse().ok()).expect("a key written");
                assert_eq!(v.value, format!("v{i}").into_bytes(), "round {round}: {key}");
            }
            // Every 100th: the store opens on it (plain, then salvaging) or refuses, no panic.
            if round % 100 == 0 {
                for salvage in [false, true] {
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(dir.join(FILE_NAME), &bad).unwrap();
                    let opened = std::panic::catch_unwind(|| EmbeddedStore::open_with(&dir, salvage).is_ok());
                    assert!(opened.is_ok(), "round {round}: opening (salvage {salvage}) panicked");
                }
            }
            match (r.damage.is_some(), r.valid == file.len()) {
                (true, _) => damaged += 1,
                (false, true) => whole += 1,
                (false, false) => cut += 1,
            }
        }
        assert!(whole + cut > 0 && damaged > 0, "{whole} whole, {cut} cut, {damaged} damaged");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// In a group of several changes (one sync), a later record and its commit may reach the
    /// disk while an earlier one does not: its commits cover the group from its start, so
    /// that is a torn group, cut; the same damage with a whole group after it is not.
    #[test]
    fn commits_cover_their_group_from_its_start() {
        let dir = tmp("group-commits");
        std::fs::create_dir_all(&dir).unwrap();
        let (file, at) = file_of_groups(&[&[0], &[1, 2, 3]]);
        assert_eq!(keys_held(&dir, 4, false).unwrap(), [] as [usize; 0], "an empty store");
        for (what, bytes, held) in [
            ("whole", file.clone(), vec![0, 1, 2, 3]),
            (
                "second record torn",
                {
                    let mut b = file.clone();
                    b[at[2] + 12] ^= 1;
                    b
                },
                vec![0, 1],
            ),
        ] {
            std::fs::write(dir.join(FILE_NAME), &bytes).unwrap();
            assert_eq!(keys_held(&dir, 4, false).unwrap(), held, "{what}");
        }
        let (file, at) = file_of_groups(&[&[0], &[1, 2], &[3]]);
        let mut bad = file.clone();
        bad[at[1] + 12] ^= 1;
        std::fs::write(dir.join(FILE_NAME), &bad).unwrap();
        assert!(matches!(keys_held(&dir, 4, false), Err(MetaError::Corrupt(_))), "a whole group after the damage");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Damage to a group that a later complete group follows hit synced, answered changes:
    /// open refuses (and leaves the file as it is) instead of cutting them away; with
    /// salvage it keeps a copy of the file and opens with the groups before the damage.
    #[test]
    fn damage_before_later_durable_changes_refuses_to_open_unless_salvaging() {
        let dir = tmp("damaged-group");
        let (file, ends) = groups_of_puts(&dir, 6);
        let mut bad = file.clone();
        bad[ends[1] + 12] ^= 0x10;
        std::fs::write(dir.join(FILE_NAME), &bad).unwrap();
        let e = keys_held(&dir, 6, false).unwrap_err();
        assert!(
            matches!(&e, MetaError::Corrupt(m) if m.contains(&format!("damaged at byte {}", ends[1]))
                && m.contains("--salvage-damaged-log")),
            "{e}"
        );
        assert_eq!(std::fs::read(dir.join(FILE_NAME)).unwrap(), bad, "nothing cut");
        // Salvage: the copy, then the groups before the damage; later opens need nothing.
        assert_eq!(keys_held(&dir, 6, true).unwrap(), [0, 1]);
        assert_eq!(std::fs::read(dir.join(format!("{FILE_NAME}.damaged"))).unwrap(), bad);
        assert_eq!(keys_held(&dir, 6, false).unwrap(), [0, 1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file of builds before commits: its sound records all count, the first open seals
    /// them with a commit, and damage among them is then told from a torn tail.
    #[test]
    fn records_of_builds_before_commits_are_taken_and_sealed() {
        let dir = tmp("legacy");
        std::fs::create_dir_all(&dir).unwrap();
        let mut legacy = Vec::new();
        for i in 0..3 {
            legacy.extend_from_slice(&encode(1, &format!("k{i}"), 1, format!("v{i}").as_bytes()));
        }
        std::fs::write(dir.join(FILE_NAME), &legacy).unwrap();
        assert_eq!(keys_held(&dir, 4, false).unwrap(), [0, 1, 2]);
        let sealed = std::fs::read(dir.join(FILE_NAME)).unwrap();
        // One commit (and an empty one after it if the store went idle meanwhile).
        assert!(
            [1, 2].map(|n| legacy.len() + n * (8 + COMMIT_BODY)).contains(&sealed.len()),
            "sealed by one commit: {} bytes after {}",
            sealed.len(),
            legacy.len()
        );
        {
            let s = EmbeddedStore::open(&dir).unwrap();
            block_on(s.put("k3", b"v3".to_vec())).unwrap();
        }
        assert_eq!(keys_held(&dir, 4, false).unwrap(), [0, 1, 2, 3]);
        // A byte of the first legacy record: the later groups make it damage.
        let mut bad = std::fs::read(dir.join(FILE_NAME)).unwrap();
        bad[12] ^= 1;
        std::fs::write(dir.join(FILE_NAME), &bad).unwrap();
        assert!(matches!(keys_held(&dir, 4, false), Err(MetaError::Corrupt(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_keeps_data() {
        let dir = tmp("compact");
        let s = EmbeddedStore::open(&dir).unwrap();
        block_on(async {
            for i in 0..3000u32 {
                s.put("hot", vec![0u8; 1000]).await.unwrap();
                if i % 1000 == 0 {
                    s.put(&format!("k{i}"), i.to_le_bytes().to_vec()).await.unwrap();
                }
            }
        });
        drop(s);
        assert!(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len() < 2 << 20);
        let s = EmbeddedStore::open(&dir).unwrap();
        block_on(async {
            assert_eq!(s.get("hot").await.unwrap().unwrap().version, 3000);
            assert_eq!(s.get("k2000").await.unwrap().unwrap().value, 2000u32.to_le_bytes());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
