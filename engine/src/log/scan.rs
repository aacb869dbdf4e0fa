//! Scanning one log file: the valid record chain from the first record on, and what stops
//! it. Recovery, the cold read path (file indexes) and `sluice log dump` all use this.
//!
//! Invariant relied on: the engine never has more than two records written but not yet
//! durable, and the second of two starts at a block boundary of its own (the rest of the
//! block before it is the first one's write: zeros, unless that write was torn there; in a
//! reused file a torn write leaves the earlier use's bytes there). A crash leaves
//! after the last valid record at most one torn record (garbage or zeros), and after that
//! at most the one record that was being written with it, which is valid only if it starts
//! at a block boundary and has the next LSN but one (neither was acknowledged: flushes
//! complete in order). Any other valid record after a torn one means acknowledged data was
//! damaged, and recovery must refuse to start.
//!
//! A record that starts a block of its own follows the one before it after the rest of that
//! one's last block (whatever it holds): the chain goes on at the block boundary when a
//! packed record with the next LSN starts there and none starts where the one before ends.
//!
//! Records are packed (each at the 8-byte boundary after the one before; files of earlier
//! builds hold block-padded ones, each at a block boundary): a record's own header says
//! where the next one starts, and a search for records past damage looks at every 8-byte
//! boundary (the record magic first, a cheap test).
//!
//! A recycled file (a freed log file given a new name and header instead of a new file)
//! still holds its earlier use's records after its own. Those have LSNs below the header's
//! `min_lsn`; they end the chain like zeros and are never evidence of damage.
//!
//! A record is the file's own only if it carries the file's record tag (`FileHeader::tag`,
//! random per file; 0 in files of earlier builds), and a chain's next record only if it
//! carries its predecessor's. The searches past a damaged or torn record, and into a reused
//! file's earlier use, look at positions that may hold any bytes a user wrote (event
//! payloads inside records): without the tag a crafted event could pass there for a record of
//! this use, and make recovery refuse to start (or a salvage replay it).

use crate::constants::{BLOCK_BYTES, FILE_HEADER_BYTES, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};
use crate::log::format::{FileHeader, HeaderFault, RecordHeader, starts_with_magic};
use bytes::Bytes;

/// A valid record.
#[derive(Clone, Debug)]
pub struct ScannedRecord {
    /// File position of the header.
    pub pos: u64,
    pub header: RecordHeader,
    pub payload: Bytes,
}

impl ScannedRecord {
    /// File position of the payload.
    pub fn payload_pos(&self) -> u64 {
        self.pos + RECORD_HEADER_BYTES as u64
    }
}

/// How the record chain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Zeros after the last record: nothing else was ever written.
    Clean,
    /// A torn (incomplete or checksum-failing) record at `at`, and nothing valid after it.
    Torn { at: u64, reason: String },
    /// An invalid record at `at` followed by a valid one at `valid_at`.
    Corrupt { at: u64, valid_at: u64, reason: String },
}

/// Result of scanning a file.
#[derive(Clone, Debug)]
pub struct FileScan {
    pub header: Result<FileHeader, String>,
    pub records: Vec<ScannedRecord>,
    /// Position just after the last valid record (where the next record goes).
    pub end: u64,
    pub stop: ScanEnd,
    /// End of the last block holding a non-zero byte at or after `end` (torn garbage to
    /// clear), or `end`; in a recycled file, only up to the first record of its earlier use
    /// (which may start inside a block), unless the record written with a torn one lies
    /// beyond that: then to the end of its last block.
    pub dirty_end: u64,
}

/// What stops a scan: where, the kind of fault, the damaged record's extent when its header
/// is sound, and why.
type Fault = (u64, HeaderFault, Option<u64>, String);

/// The record that starts a block of its own after a valid record with header `prev` that
/// ends at `pos` (inside a block), if its sound header continues the chain there: the record,
/// or, when its payload is damaged, the fault at its own position (not at the rest of the
/// block before it, where nothing was meant to be).
fn own_block_record(bytes: &Bytes, pos: u64, prev: &RecordHeader, len: u64) -> Option<Result<ScannedRecord, Fault>> {
    let next = own_block_after(bytes, 0, pos as usize, prev)? as u64;
    if next + RECORD_HEADER_BYTES as u64 > len {
        return None;
    }
    match record_at(bytes, next) {
        Ok(rec) => (rec.header.epoch >= prev.epoch).then_some(Ok(rec)),
        Err((fault, extent, reason)) => Some(Err((next, fault, extent, reason))),
    }
}

/// Where the record that starts a block of its own after the record `prev`, which ends at
/// `pos` (an index into `bytes`, read from file position `base`), starts: the next block
/// boundary, if a sound packed header that follows `prev` (`follows`) is there and none is at
/// `pos` (that would be the next record, packed after its predecessor, whatever its
/// payload). The bytes between are not looked at: zeros the first write put there, or,
/// where that write was torn, what the sectors held before (in a reused file, its earlier
/// use's bytes). The rule for a record written beside the one before it (module doc).
fn own_block_after(bytes: &[u8], base: u64, pos: usize, prev: &RecordHeader) -> Option<usize> {
    let next = (crate::constants::align_up(base + pos as u64) - base) as usize;
    let is_next = |at: usize| RecordHeader::decode(&bytes[at..]).is_ok_and(|h| follows(&h, prev));
    (next > pos
        && next + RECORD_HEADER_BYTES <= bytes.len()
        && !is_next(pos)
        && RecordHeader::decode(&bytes[next..]).is_ok_and(|h| follows(&h, prev) && h.packed()))
    .then_some(next)
}

/// Whether a record with header `h` may follow `prev` in a chain: the next LSN, and the same
/// file's tag (its epoch is checked where a chain is replayed).
fn follows(h: &RecordHeader, prev: &RecordHeader) -> bool {
    h.lsn == prev.lsn + 1 && h.tag == prev.tag
}

/// Checks the record at `pos` in isolation (header and payload checksums).
fn record_at(bytes: &Bytes, pos: u64) -> Result<ScannedRecord, (HeaderFault, Option<u64>, String)> {
    let p = pos as usize;
    let header = RecordHeader::decode(&bytes[p..]).map_err(|f| (f, None, "invalid record header".to_string()))?;
    let start = p + RECORD_HEADER_BYTES;
    let end = start + header.payload_len as usize;
    let extent = Some(header.disk_len());
    // The whole extent, padding included (it covers the payload): a file cut short inside a
    // record's padding (a damaged file system; log files are whole blocks) must not leave
    // the scan's end past the bytes it has.
    if p as u64 + header.disk_len() > bytes.len() as u64 {
        return Err((
            HeaderFault::Invalid,
            None,
            format!("the record of {} payload bytes runs past the file end", header.payload_len),
        ));
    }
    if crc32c::crc32c(&bytes[start..end]) != header.payload_crc {
        return Err((HeaderFault::Invalid, extent, "payload checksum mismatch".into()));
    }
    Ok(ScannedRecord { pos, header, payload: bytes.slice(start..end) })
}

/// Checks that `bytes`, read from a log file at `base`, are whole records back to back, each
/// with sound header and payload checksums (what a read from the log verifies before it
/// serves anything). On damage: the file position of the first damaged record and what is
/// wrong with it (the records before it are sound).
pub fn check_records(bytes: &[u8], base: u64) -> Result<(), (u64, String)> {
    let mut pos = 0usize;
    let mut prev: Option<RecordHeader> = None;
    while pos < bytes.len() {
        let at = base + pos as u64;
        let decoded = RecordHeader::decode(&bytes[pos..]);
        let header = match (decoded, prev) {
            (Ok(h), None) => h,
            (Ok(h), Some(p)) if follows(&h, &p) => h,
            (other, _) => {
                // The next record (the next LSN) starts a block of its own (see the module doc).
                if let Some(next) = prev.and_then(|p| own_block_after(bytes, base, pos, &p)) {
                    pos = next;
                    continue;
                }
                return Err(match other {
                    Err(HeaderFault::Zero) => (at, format!("no record at byte {at}, where the index has one (zeros)")),
                    Err(HeaderFault::Invalid) => (at, format!("the record at byte {at} has a damaged header")),
                    Ok(h) if prev.is_some_and(|p| h.lsn == p.lsn + 1) => {
                        (at, format!("the record at byte {at} has another tag than the one before it"))
                    }
                    Ok(h) => (
                        at,
                        format!(
                            "the record at byte {at} has LSN {}, not the {} after the one before it",
                            h.lsn,
                            prev.map_or(0, |p| p.lsn + 1)
                        ),
                    ),
                });
            }
        };
        let start = pos + RECORD_HEADER_BYTES;
        let end = start + header.payload_len as usize;
        let next = pos as u64 + header.disk_len();
        if next > bytes.len() as u64 {
            return Err((at, format!("the record at byte {at} runs past the {} bytes read", bytes.len())));
        }
        if crc32c::crc32c(&bytes[start..end]) != header.payload_crc {
            return Err((at, format!("the record at byte {at} fails its checksum")));
        }
        pos = next as usize;
        prev = Some(header);
    }
    Ok(())
}

/// What marks a record of this file's own use (see the module doc): the lowest LSN it has
/// and its tag, the header's; or, when the header is damaged, those in the header of the
/// checkpoint that opens the file (a recycled file's first record block is cleared when it is
/// reused, so a checkpoint there is its own; its header has a checksum of its own, so its
/// payload may be damaged too). Else LSN 0 and no tag: a file whose header and opening
/// checkpoint header are both damaged cannot tell its records from look-alikes (any record
/// found there could be one), so its scan takes none of them for its own, while any sound
/// record after damage still counts as evidence of damage (recovery refuses to start, reads
/// of the file get a damage error instead of data that may be forged).
fn own_use(bytes: &Bytes, header: &Result<FileHeader, String>) -> (u64, Option<u64>) {
    match header {
        Ok(h) => (h.min_lsn, Some(h.tag)),
        Err(_) => bytes
            .get(FILE_HEADER_BYTES as usize..)
            .and_then(|b| RecordHeader::decode(b).ok())
            .filter(|h| h.kind == crate::log::format::RecordKind::Checkpoint)
            .map_or((0, None), |h| (h.lsn, Some(h.tag))),
    }
}

/// Scans a whole log file held in memory.
pub fn scan_file(bytes: &Bytes) -> FileScan {
    scan_from(bytes, FILE_HEADER_BYTES)
}

/// A damaged stretch of a log file that a scan went past: from the invalid record at `at`
/// to the next valid one at `valid_at`, and what was wrong at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub at: u64,
    pub valid_at: u64,
    pub reason: String,
}

/// Scans a whole file and goes on past each damaged stretch (where the chain stops at damage
/// with a valid record after it): every sound record in file order, with `end`, `stop` and
/// `dirty_end` of the last stretch's scan (its `stop` is never `Corrupt`), and the stretches
/// skipped. The records before and after a skipped stretch do not chain (LSNs skip).
pub fn scan_past_damage(bytes: &Bytes) -> (FileScan, Vec<Skipped>) {
    let mut scan = scan_file(bytes);
    let mut records = std::mem::take(&mut scan.records);
    let mut skipped = Vec::new();
    while let ScanEnd::Corrupt { at, valid_at, reason } = scan.stop {
        skipped.push(Skipped { at, valid_at, reason });
        scan = scan_from(bytes, valid_at);
        records.append(&mut scan.records);
    }
    scan.records = records;
    (scan, skipped)
}

/// The records of a damaged stretch whose headers are intact (their payloads fail their
/// checksums), in file order: header and payload, untrusted. Stops at the first record whose
/// header is damaged too.
pub fn damaged_records(bytes: &Bytes, k: &Skipped) -> Vec<(RecordHeader, Bytes)> {
    let mut out = Vec::new();
    let mut pos = k.at as usize;
    while pos < k.valid_at as usize && pos < bytes.len() {
        let Ok(header) = RecordHeader::decode(&bytes[pos..]) else { break };
        let start = pos + RECORD_HEADER_BYTES;
        let end = start + header.payload_len as usize;
        if end > bytes.len() {
            break;
        }
        out.push((header, bytes.slice(start..end)));
        pos += header.disk_len() as usize;
    }
    out
}

/// Every sound record of a file (see `scan_past_damage`). For indexing an older file whose
/// records are read, not replayed: the sound records after a damaged one stay readable.
pub fn sound_records(bytes: &Bytes) -> Vec<ScannedRecord> {
    scan_past_damage(bytes).0.records
}

/// Positions from `from` (a multiple of 8) up to `to` where a record header could start and
/// its magic is in place.
fn magic_positions(bytes: &Bytes, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
    let last = (bytes.len() as u64).saturating_sub(RECORD_HEADER_BYTES as u64);
    (from..to.min(last + 1))
        .step_by(RECORD_ALIGN_BYTES as usize)
        .filter(move |&p| starts_with_magic(&bytes[p as usize..]))
}

/// Scans records from `start` (a record boundary) to the end of the file.
fn scan_from(bytes: &Bytes, start: u64) -> FileScan {
    let header = FileHeader::decode(bytes);
    let (min_lsn, tag) = own_use(bytes, &header);
    // A record is taken for the file's own only with the file's tag; when that is unknown,
    // any sound record is still evidence of damage (see `own_use`).
    let own_tag = |h: &RecordHeader| tag == Some(h.tag);
    let may_be_own = |h: &RecordHeader| tag.is_none_or(|t| h.tag == t);
    let len = bytes.len() as u64 / BLOCK_BYTES * BLOCK_BYTES;
    let mut records: Vec<ScannedRecord> = Vec::new();
    let mut pos = start;
    let stop = loop {
        if pos + RECORD_HEADER_BYTES as u64 > len {
            break None;
        }
        let fault = match record_at(bytes, pos) {
            // The earlier use's records: the file's own end, like zeros.
            Ok(rec) if rec.header.lsn < min_lsn => {
                (pos, HeaderFault::Zero, None, "a record of the file's earlier use".to_string())
            }
            Ok(rec) if !own_tag(&rec.header) => {
                let reason = match tag {
                    Some(_) => "a record with another tag than the file's",
                    None => "a record of a file whose tag is unknown (its header and opening checkpoint are damaged)",
                };
                (pos, HeaderFault::Invalid, None, reason.to_string())
            }
            Ok(rec) => match records.last().map(|p| &p.header) {
                Some(ph) if rec.header.lsn != ph.lsn + 1 || rec.header.epoch < ph.epoch => {
                    let reason = format!(
                        "record lsn {} epoch {} does not follow lsn {} epoch {}",
                        rec.header.lsn, rec.header.epoch, ph.lsn, ph.epoch
                    );
                    (pos, HeaderFault::Invalid, None, reason)
                }
                _ => {
                    pos += rec.header.disk_len();
                    records.push(rec);
                    continue;
                }
            },
            Err((fault, extent, reason)) => (pos, fault, extent, reason),
        };
        match records.last().and_then(|p| own_block_record(bytes, pos, &p.header, len)) {
            Some(Ok(rec)) => {
                pos = rec.pos + rec.header.disk_len();
                records.push(rec);
            }
            Some(Err(own)) => break Some(own),
            None => break Some(fault),
        }
    };
    let end = pos;
    let block = BLOCK_BYTES as usize;
    // Torn bytes reach at most to the first record of the earlier use after the end (a
    // record header with a lower LSN than the file's own: a cheap test, the header only).
    let earlier_use = |p: u64| RecordHeader::decode(&bytes[p as usize..]).is_ok_and(|h| h.lsn < min_lsn);
    let limit = if end >= len { len } else { magic_positions(bytes, end, len).find(|&p| earlier_use(p)).unwrap_or(len) }
        as usize;
    // The last block holding a non-zero byte at or after the end (the end's own block only
    // from the end on: the bytes before it are records).
    let first_block = crate::constants::align_down(end) as usize;
    let mut dirty_end = (first_block..limit)
        .step_by(block)
        .rev()
        .find(|&b| bytes[b.max(end as usize)..(b + block).min(limit)].iter().any(|&x| x != 0))
        .map_or(end, |b| ((b + block).min(limit) as u64).max(end));
    let dirty = dirty_end.min(len);
    let stop = match stop {
        None => ScanEnd::Clean,
        Some((at, fault, extent, reason)) => {
            let resume = extent.map_or(at + RECORD_ALIGN_BYTES, |e| at + e);
            // A record of this use (its header first: the earlier use's, and look-alikes
            // without the file's tag, are skipped cheaply).
            let valid = |b: u64| {
                RecordHeader::decode(&bytes[b as usize..])
                    .is_ok_and(|h| h.lsn >= min_lsn && may_be_own(&h))
                    .then(|| record_at(bytes, b).ok())
                    .flatten()
            };
            // The first record of this use from `from` on: at any 8-byte boundary before the
            // dirty end, and in a reused file at any block boundary after it (a torn write may
            // have left a record of the earlier use in place inside its range, which ends the
            // dirty part there, and the record written beside it lies beyond).
            let this_use_from = |from: u64| {
                let far = crate::constants::align_up(from.max(dirty));
                let far = (limit < len as usize).then(|| (far..len).step_by(block)).into_iter().flatten();
                magic_positions(bytes, from, dirty).chain(far).find(|&b| valid(b).is_some())
            };
            let valid_after = this_use_from(resume);
            // The record written together with the torn one (see the module doc): packed (as
            // builds that write two at once write them), at a block boundary, the next LSN
            // but one, and nothing valid after it. Where it ends.
            let written_with_torn = |b: u64| {
                let (Some(prev), Some(rec)) = (records.last(), valid(b)) else { return None };
                let rec_end = b + rec.header.disk_len();
                (rec.header.packed()
                    && b.is_multiple_of(BLOCK_BYTES)
                    && rec.header.lsn == prev.header.lsn + 2
                    && rec.header.epoch >= prev.header.epoch
                    && this_use_from(rec_end).is_none())
                .then_some(rec_end)
            };
            match valid_after.map(|v| (v, written_with_torn(v))) {
                Some((valid_at, Some(rec_end))) => {
                    // Cut with the torn one, its blocks cleared too.
                    dirty_end = dirty_end.max(crate::constants::align_up(rec_end).min(len));
                    ScanEnd::Torn {
                        at,
                        reason: format!(
                            "{reason}; the record at byte {valid_at} was being written with it (neither was acknowledged)"
                        ),
                    }
                }
                Some((valid_at, None)) => ScanEnd::Corrupt { at, valid_at, reason },
                None if fault == HeaderFault::Zero && dirty_end == end => ScanEnd::Clean,
                None => ScanEnd::Torn { at, reason },
            }
        }
    };
    FileScan { header, records, end, stop, dirty_end }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record tag of the test files.
    const TAG: u64 = 0x5eed_0000_7a95;

    #[test]
    fn check_records_finds_the_damaged_record() {
        use crate::log::format::{RecordKind, RecordLayout, RecordMeta, encode_record};
        let mut buf = Vec::new();
        for (lsn, len) in [(1u64, 100usize), (2, 5000), (3, 10)] {
            let mut rec = vec![0u8; RecordHeader::block_padded_len(len) as usize];
            encode_record(
                &mut rec,
                RecordMeta { layout: RecordLayout::BlockPadded, kind: RecordKind::Batch, epoch: 1, lsn, tag: TAG },
                len,
                |p| p.fill(lsn as u8),
            );
            buf.extend_from_slice(&rec);
        }
        let base = 8192;
        assert_eq!(check_records(&buf, base), Ok(()));
        // A payload byte of the second record (at 4096 in the buffer).
        let mut bad = buf.clone();
        bad[4096 + RECORD_HEADER_BYTES + 4500] ^= 1;
        assert_eq!(check_records(&bad, base), Err((12288, "the record at byte 12288 fails its checksum".into())));
        let mut bad = buf.clone();
        bad[4096 + 20] ^= 1;
        assert_eq!(check_records(&bad, base), Err((12288, "the record at byte 12288 has a damaged header".into())));
        // Cut short, or zeros where a record should be.
        let (at, what) = check_records(&buf[..8192], base).unwrap_err();
        assert!(at == 12288 && what.contains("runs past"), "{what}");
        let mut zeros = buf.clone();
        zeros.extend_from_slice(&[0u8; 4096]);
        let (at, what) = check_records(&zeros, base).unwrap_err();
        assert!(at == 24576 && what.contains("no record at byte 24576"), "{what}");
    }

    #[test]
    fn sound_records_go_on_past_each_damaged_stretch() {
        use crate::log::format::{FileHeader, RecordKind, RecordLayout, RecordMeta, encode_record};
        let mut file = vec![0u8; FILE_HEADER_BYTES as usize];
        FileHeader { container: 1, seq: 0, epoch: 1, file_bytes: 1 << 20, min_lsn: 0, tag: TAG }.encode(&mut file);
        let mut at = Vec::new();
        for lsn in 1..=6u64 {
            at.push(file.len());
            let len = if lsn == 3 { 6000 } else { 100 };
            let mut rec = vec![0u8; RecordHeader::block_padded_len(len) as usize];
            encode_record(
                &mut rec,
                RecordMeta { layout: RecordLayout::BlockPadded, kind: RecordKind::Batch, epoch: 1, lsn, tag: TAG },
                len,
                |p| p.fill(lsn as u8),
            );
            file.extend_from_slice(&rec);
        }
        file.extend_from_slice(&[0u8; 8192]);
        let lsns =
            |b: &[u8]| sound_records(&Bytes::copy_from_slice(b)).iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        assert_eq!(lsns(&file), [1, 2, 3, 4, 5, 6]);
        // A payload byte of record 2, and the header of record 5: each skipped, the rest kept.
        let mut bad = file.clone();
        bad[at[1] + RECORD_HEADER_BYTES + 10] ^= 1;
        bad[at[4] + 3] ^= 1;
        assert_eq!(lsns(&bad), [1, 3, 4, 6]);
        let scan = scan_file(&Bytes::copy_from_slice(&bad));
        assert_eq!(scan.records.len(), 1, "a scan stops at the damage");
        // Damage in the last record: nothing valid after it, nothing more to find.
        let mut bad = file.clone();
        bad[at[5] + RECORD_HEADER_BYTES] ^= 1;
        assert_eq!(lsns(&bad), [1, 2, 3, 4, 5]);
    }

    /// A recycled file: its own records (LSN 100 on, a block each), then what its earlier use
    /// left (LSN 10 on, three blocks each, from byte 4096), the first block after the header
    /// cleared as a reused file's is.
    fn recycled(own: u64) -> (Vec<u8>, Vec<usize>) {
        let records: Vec<(u64, usize, bool)> = (100..100 + own).map(|l| (l, 3000, false)).collect();
        let earlier = file_with(0, &(10..30).map(|l| (l, 9000, false)).collect::<Vec<_>>(), 1 << 20).0;
        let (mut file, at) = file_with(100, &records, 1 << 20);
        let from = at.last().map_or(2 * FILE_HEADER_BYTES as usize, |&a| a + 4096);
        file[from..].copy_from_slice(&earlier[from..]);
        (file, at)
    }

    #[test]
    fn a_recycled_file_ends_where_its_earlier_use_begins() {
        let lsns = |s: &FileScan| s.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        // Six records of its own end where an earlier record starts (byte 28672).
        let (file, at) = recycled(6);
        let scan = scan_file(&Bytes::from(file.clone()));
        assert_eq!(lsns(&scan), [100, 101, 102, 103, 104, 105]);
        assert_eq!(scan.stop, ScanEnd::Clean);
        assert_eq!((scan.end, scan.dirty_end), (28672, 28672));
        assert_eq!(sound_records(&Bytes::from(file.clone())).len(), 6);

        // Four end inside an earlier record: its rest is torn-looking bytes up to the next
        // earlier record (cleared by recovery), not damage.
        let (four, _) = recycled(4);
        let scan = scan_file(&Bytes::from(four));
        assert_eq!(lsns(&scan), [100, 101, 102, 103]);
        assert!(matches!(scan.stop, ScanEnd::Torn { at: 20480, .. }), "{:?}", scan.stop);
        assert_eq!(scan.dirty_end, 28672);

        // Reused but not written yet: nothing of its own.
        let (unused, _) = recycled(0);
        let scan = scan_file(&Bytes::from(unused));
        assert!(scan.records.is_empty() && !matches!(scan.stop, ScanEnd::Corrupt { .. }), "{:?}", scan.stop);

        // The last record torn: a torn end, not damage.
        let mut torn = file.clone();
        torn[at[5] + RECORD_HEADER_BYTES + 5] ^= 1;
        let scan = scan_file(&Bytes::from(torn));
        assert_eq!(lsns(&scan), [100, 101, 102, 103, 104]);
        assert!(matches!(scan.stop, ScanEnd::Torn { at: a, .. } if a == at[5] as u64), "{:?}", scan.stop);
        assert_eq!(scan.dirty_end, 28672);

        // A damaged record with the file's own records after it is damage.
        let mut bad = file.clone();
        bad[at[1] + RECORD_HEADER_BYTES + 5] ^= 1;
        let scan = scan_file(&Bytes::from(bad.clone()));
        assert_eq!(
            scan.stop,
            ScanEnd::Corrupt { at: at[1] as u64, valid_at: at[2] as u64, reason: "payload checksum mismatch".into() }
        );
        assert_eq!(
            sound_records(&Bytes::from(bad)).iter().map(|r| r.header.lsn).collect::<Vec<_>>(),
            [100, 102, 103, 104, 105]
        );

        // A damaged header: the opening checkpoint's LSN marks the file's own records.
        let mut head = file.clone();
        head[20] ^= 1;
        let scan = scan_file(&Bytes::from(head));
        assert!(scan.header.is_err());
        assert_eq!(lsns(&scan), [100, 101, 102, 103, 104, 105]);
        assert_eq!(scan.stop, ScanEnd::Clean);
    }
    /// A file of records (lsn, payload length, packed) after a header with `min_lsn`, the
    /// first a checkpoint, padded with zeros to `total` bytes; and each record's position.
    fn file_with(min_lsn: u64, records: &[(u64, usize, bool)], total: usize) -> (Vec<u8>, Vec<usize>) {
        use crate::log::format::{FileHeader, RecordKind, RecordLayout, RecordMeta, encode_record};
        let mut file = vec![0u8; FILE_HEADER_BYTES as usize];
        FileHeader { container: 1, seq: 3, epoch: 1, file_bytes: total as u64, min_lsn, tag: TAG }.encode(&mut file);
        let mut at = Vec::new();
        for (i, &(lsn, len, packed)) in records.iter().enumerate() {
            at.push(file.len());
            let kind = if i == 0 { RecordKind::Checkpoint } else { RecordKind::Batch };
            let layout = if packed { RecordLayout::Packed } else { RecordLayout::BlockPadded };
            let mut rec = vec![0u8; layout.disk_len(len) as usize];
            encode_record(&mut rec, RecordMeta { layout, kind, epoch: 1, lsn, tag: TAG }, len, |p| {
                p.fill(lsn as u8 | 1)
            });
            file.extend_from_slice(&rec);
        }
        file.resize(total, 0);
        (file, at)
    }

    /// A record that is not one: a packed batch record of `len` bytes of payload, sound in
    /// itself (both checksums), with the tag `tag`, LSN and epoch `lsn`.
    fn look_alike(tag: u64, lsn: u64) -> Vec<u8> {
        use crate::log::format::{RecordKind, RecordLayout, RecordMeta, encode_record};
        let mut rec = vec![0u8; RecordLayout::Packed.disk_len(16) as usize];
        let meta = RecordMeta { layout: RecordLayout::Packed, kind: RecordKind::Batch, epoch: lsn, lsn, tag };
        encode_record(&mut rec, meta, 16, |p| p.fill(0x42));
        rec
    }

    /// Puts `bytes` at `at`, inside the payload of the record at `rec_at`, and seals that
    /// record again (checksums): what a user's event crafted to hold them leaves there.
    fn plant(file: &mut [u8], rec_at: usize, at: usize, bytes: &[u8]) {
        use crate::log::format::{RecordMeta, encode_record};
        let h = RecordHeader::decode(&file[rec_at..]).unwrap();
        let start = rec_at + RECORD_HEADER_BYTES;
        let mut payload = file[start..start + h.payload_len as usize].to_vec();
        payload[at - start..at - start + bytes.len()].copy_from_slice(bytes);
        let meta = RecordMeta { layout: h.layout, kind: h.kind, epoch: h.epoch, lsn: h.lsn, tag: h.tag };
        let len = h.disk_len() as usize;
        encode_record(&mut file[rec_at..rec_at + len], meta, payload.len(), |p| p.copy_from_slice(&payload));
    }

    /// Bytes that look like a record of a later LSN, in an event's data where a scan looks
    /// (past a torn record, in a reused file's earlier use), are not taken for one: without
    /// the file's tag they are neither damage that stops a start nor records to replay.
    #[test]
    fn a_look_alike_without_the_file_tag_is_not_taken_for_a_record() {
        let lsns = |s: &FileScan| s.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        // A reused file: six records of its own, then its earlier use, whose record at 28672
        // holds a look-alike at the block boundary 32768 in its payload.
        let (file, _) = recycled(6);
        for (tag, taken) in [(0, false), (TAG ^ 1, false), (TAG, true)] {
            let mut f = file.clone();
            plant(&mut f, 28672, 32768, &look_alike(tag, 1 << 40));
            let scan = scan_file(&Bytes::from(f.clone()));
            assert_eq!(lsns(&scan), [100, 101, 102, 103, 104, 105]);
            if taken {
                // The file's own tag (which a user cannot know): damage after the end.
                assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 28672, valid_at: 32768, .. }), "{:?}", scan.stop);
            } else {
                assert_eq!((scan.stop, scan.end, scan.dirty_end), (ScanEnd::Clean, 28672, 28672), "tag {tag:x}");
                assert_eq!(sound_records(&Bytes::from(f)).len(), 6);
            }
        }

        // Past a torn record, at an 8-byte boundary of the torn bytes.
        let records: Vec<(u64, usize, bool)> =
            [(1, 300), (2, 13), (3, 1000), (4, 5000), (5, 7), (6, 100)].map(|(l, n)| (l, n, true)).to_vec();
        let (file, at) = file_with(0, &records, 1 << 16);
        let mut torn = file.clone();
        torn[10768..10800].fill(0x77);
        for (tag, taken) in [(0, false), (TAG, true)] {
            let mut t = torn.clone();
            let fake = look_alike(tag, 9);
            t[10800..10800 + fake.len()].copy_from_slice(&fake);
            let scan = scan_file(&Bytes::from(t));
            assert_eq!(lsns(&scan), [1, 2, 3, 4, 5, 6]);
            if taken {
                assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 10768, valid_at: 10800, .. }), "{:?}", scan.stop);
            } else {
                assert!(matches!(scan.stop, ScanEnd::Torn { at: 10768, .. }), "{:?}", scan.stop);
                assert_eq!(scan.dirty_end, 12288);
            }
        }

        // A record with the next LSN but another tag does not follow in a chain, nor in a read.
        let mut other = file.clone();
        let h = RecordHeader::decode(&other[at[2]..]).unwrap();
        RecordHeader { tag: 0, ..h }.encode(&mut other[at[2]..at[2] + RECORD_HEADER_BYTES]);
        let scan = scan_file(&Bytes::from(other.clone()));
        assert_eq!(lsns(&scan), [1, 2]);
        assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 4496, valid_at: 5536, .. }), "{:?}", scan.stop);
        assert_eq!(
            check_records(&other[at[1]..10768], at[1] as u64),
            Err((4496, "the record at byte 4496 has another tag than the one before it".into()))
        );
    }

    /// A damaged file header: the opening checkpoint's header gives the file's lowest LSN and
    /// its tag, even when the checkpoint's payload is damaged. With the checkpoint's header
    /// damaged too, no record is taken for the file's own (any could be a look-alike), and a
    /// sound one after the damage is still damage.
    #[test]
    fn a_damaged_header_takes_its_tag_from_the_opening_checkpoint_else_no_record() {
        let lsns = |r: &[ScannedRecord]| r.iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        // A reused file: six records of its own, then its earlier use (LSNs 10..30) holding a
        // look-alike of a later LSN with another tag.
        let (mut file, at) = recycled(6);
        plant(&mut file, 28672, 32768, &look_alike(TAG ^ 1, 1 << 40));
        file[20] ^= 1;
        file[at[0] + RECORD_HEADER_BYTES + 5] ^= 1;
        let bytes = Bytes::from(file.clone());
        let scan = scan_file(&bytes);
        assert!(scan.header.is_err());
        assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 4096, valid_at: 8192, .. }), "{:?}", scan.stop);
        // The records of its own after the checkpoint; not the earlier use's, not the look-alike.
        assert_eq!(lsns(&sound_records(&bytes)), [101, 102, 103, 104, 105]);

        file[at[0] + 20] ^= 1;
        let bytes = Bytes::from(file);
        let scan = scan_file(&bytes);
        assert!(scan.records.is_empty());
        assert!(matches!(&scan.stop, ScanEnd::Corrupt { at: 4096, valid_at: 8192, .. }), "{:?}", scan.stop);
        let (sound, skipped) = scan_past_damage(&bytes);
        assert!(sound.records.is_empty(), "{:?}", lsns(&sound.records));
        assert!(skipped[1].reason.contains("whose tag is unknown"), "{:?}", skipped[1]);
    }

    #[test]
    fn packed_records_share_blocks_and_a_torn_tail_among_them_is_cut() {
        let lsns = |s: &FileScan| s.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        // Several records to a block, one across a block boundary.
        let records: Vec<(u64, usize, bool)> =
            [(1, 300), (2, 13), (3, 1000), (4, 5000), (5, 7), (6, 100)].map(|(l, n)| (l, n, true)).to_vec();
        let (file, at) = file_with(0, &records, 1 << 16);
        assert_eq!(at, [4096, 4440, 4496, 5536, 10576, 10624]);
        let scan = scan_file(&Bytes::from(file.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3, 4, 5, 6]);
        assert_eq!((scan.stop.clone(), scan.end, scan.dirty_end), (ScanEnd::Clean, 10768, 10768));
        let mut read = file[at[1]..scan.end as usize].to_vec();
        assert_eq!(check_records(&read, at[1] as u64), Ok(()));
        read[at[4] - at[1] + 45] ^= 1;
        assert_eq!(
            check_records(&read, at[1] as u64),
            Err((10576, "the record at byte 10576 fails its checksum".into()))
        );

        // A torn write of a next record in the same block: garbage right after the end.
        let mut torn = file.clone();
        torn[10768..10800].fill(0x77);
        let scan = scan_file(&Bytes::from(torn.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3, 4, 5, 6]);
        assert!(matches!(scan.stop, ScanEnd::Torn { at: 10768, .. }), "{:?}", scan.stop);
        assert_eq!(scan.dirty_end, 12288, "to the end of the block");
        // ... and reaching into the next block.
        torn[12290] = 1;
        assert_eq!(scan_file(&Bytes::from(torn)).dirty_end, 16384);

        // Damage to a record with sound ones after it, at no block boundary.
        let mut bad = file.clone();
        bad[at[2] + RECORD_HEADER_BYTES + 10] ^= 1;
        let scan = scan_file(&Bytes::from(bad.clone()));
        assert_eq!(
            scan.stop,
            ScanEnd::Corrupt { at: at[2] as u64, valid_at: at[3] as u64, reason: "payload checksum mismatch".into() }
        );
        assert_eq!(sound_records(&Bytes::from(bad)).iter().map(|r| r.header.lsn).collect::<Vec<_>>(), [1, 2, 4, 5, 6]);
        // A damaged header: the next sound record is found at its own 8-byte boundary.
        let mut bad = file.clone();
        bad[at[4] + 20] ^= 1;
        let scan = scan_file(&Bytes::from(bad));
        assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 10576, valid_at: 10624, .. }), "{:?}", scan.stop);
    }

    /// A file of packed records (lsn, payload length, starts a block of its own) after a header,
    /// the first a checkpoint; and each record's position.
    fn file_of_blocks(records: &[(u64, usize, bool)]) -> (Vec<u8>, Vec<usize>) {
        use crate::log::format::{FileHeader, RecordKind, RecordLayout, RecordMeta, encode_record};
        let mut file = vec![0u8; FILE_HEADER_BYTES as usize];
        FileHeader { container: 1, seq: 3, epoch: 1, file_bytes: 1 << 16, min_lsn: 0, tag: TAG }.encode(&mut file);
        let mut at = Vec::new();
        for (i, &(lsn, len, own_block)) in records.iter().enumerate() {
            if own_block {
                file.resize(crate::constants::align_up(file.len() as u64) as usize, 0);
            }
            at.push(file.len());
            let kind = if i == 0 { RecordKind::Checkpoint } else { RecordKind::Batch };
            let mut rec = vec![0u8; RecordLayout::Packed.disk_len(len) as usize];
            encode_record(
                &mut rec,
                RecordMeta { layout: RecordLayout::Packed, kind, epoch: 1, lsn, tag: TAG },
                len,
                |p| p.fill(lsn as u8 | 1),
            );
            file.extend_from_slice(&rec);
        }
        file.resize(1 << 16, 0);
        (file, at)
    }

    #[test]
    fn a_record_written_beside_the_one_before_it_starts_a_block_of_its_own() {
        let lsns = |s: &FileScan| s.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>();
        // Record 4 was written while 3 was (zeros after 3 up to 8192), record 5 after 4 was
        // durable (packed after it), record 6 beside 5 again.
        let records =
            [(1, 300, false), (2, 13, false), (3, 1000, false), (4, 5000, true), (5, 7, false), (6, 100, true)];
        let (file, at) = file_of_blocks(&records);
        assert_eq!(at, [4096, 4440, 4496, 8192, 13232, 16384]);
        let scan = scan_file(&Bytes::from(file.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3, 4, 5, 6]);
        assert_eq!((scan.stop.clone(), scan.end), (ScanEnd::Clean, 16528));
        // A read over the zeros checks every record on both sides of them.
        assert_eq!(check_records(&file[at[1]..16528], at[1] as u64), Ok(()));
        let mut read = file[at[1]..16528].to_vec();
        read[at[4] - at[1] + 45] ^= 1;
        assert_eq!(
            check_records(&read, at[1] as u64),
            Err((13232, "the record at byte 13232 fails its checksum".into()))
        );

        // The record beside a torn one made it to the disk whole: both were in flight and
        // neither was acknowledged, a torn end where the chain stops, after record 3: the
        // fault is where the torn record 4 starts (its own block), and the second one's
        // blocks are cleared too.
        let mut torn = file.clone();
        torn[at[3] + RECORD_HEADER_BYTES + 10] ^= 1;
        torn.truncate(at[5]);
        torn.resize(at[4], 0);
        let (mut beside, _) =
            file_of_blocks(&[(1, 300, false), (2, 13, false), (3, 1000, false), (4, 5000, true), (5, 7, true)]);
        beside[..at[4]].copy_from_slice(&torn);
        let five = crate::constants::align_up(at[4] as u64) as usize;
        let scan = scan_file(&Bytes::from(beside.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3]);
        assert!(
            matches!(&scan.stop, ScanEnd::Torn { at: 8192, reason } if reason.contains(&format!("record at byte {five} was being written with it"))),
            "{:?}",
            scan.stop
        );
        assert_eq!((scan.end, scan.dirty_end), (5536, five as u64 + 4096));
        // Not so if another valid record follows that one: damage.
        let mut more = beside.clone();
        let (six, _) = file_of_blocks(&[
            (1, 300, false),
            (2, 13, false),
            (3, 1000, false),
            (4, 5000, true),
            (5, 7, true),
            (6, 9, false),
        ]);
        more[five + 48..five + 48 + 56].copy_from_slice(&six[five + 48..five + 48 + 56]);
        assert!(matches!(scan_file(&Bytes::from(more)).stop, ScanEnd::Corrupt { at: 8192, .. }));
        // Nor if it does not start a block, or skips an LSN.
        let (skip, at_skip) =
            file_of_blocks(&[(1, 300, false), (2, 13, false), (3, 1000, false), (4, 5000, true), (6, 7, true)]);
        let mut skip = skip;
        skip[at_skip[3] + RECORD_HEADER_BYTES + 10] ^= 1;
        assert!(matches!(scan_file(&Bytes::from(skip)).stop, ScanEnd::Corrupt { at: 8192, .. }));
        let mut packed = file.clone();
        packed[at[3] + RECORD_HEADER_BYTES + 10] ^= 1;
        packed[at[5]..].fill(0);
        assert!(matches!(scan_file(&Bytes::from(packed)).stop, ScanEnd::Corrupt { at: 8192, valid_at: 13232, .. }));
        // Damage to the payload of a record of its own block with nothing after it (the last
        // record of a file, a byte flipped at rest) is reported at that record, with its
        // header (the rest of the block before it is not the damage), and the chain ends
        // where the record before it ends.
        let mut last = file.clone();
        last[at[5] + RECORD_HEADER_BYTES + 3] ^= 1;
        let scan = scan_file(&Bytes::from(last.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3, 4, 5]);
        assert_eq!(
            (scan.stop, scan.end),
            (ScanEnd::Torn { at: 16384, reason: "payload checksum mismatch".into() }, 13280)
        );
        assert_eq!(
            check_records(&last[at[1]..16528], at[1] as u64),
            Err((16384, "the record at byte 16384 fails its checksum".into()))
        );

        // What the rest of the block before a record of its own holds does not matter: a
        // write torn there leaves its sectors' old bytes (in a reused file, its earlier use's,
        // a sound record of a lower LSN among them), and the chain goes on at the boundary.
        let mut dirty = file.clone();
        dirty[5540] = 1;
        dirty[6000] = 7;
        dirty[6144..6200].copy_from_slice(&file[at[1]..at[2]]);
        for (gap_at, stale) in [(5536, &file[at[1]..at[2]]), (5544, &[0xa5; 64][..])] {
            let mut dirty = dirty.clone();
            dirty[gap_at..gap_at + stale.len()].copy_from_slice(stale);
            let scan = scan_file(&Bytes::from(dirty.clone()));
            assert_eq!((lsns(&scan), scan.stop, scan.end), (vec![1, 2, 3, 4, 5, 6], ScanEnd::Clean, 16528));
            assert_eq!(check_records(&dirty[at[1]..16528], at[1] as u64), Ok(()));
        }
        // But a sound header with the next LSN where the record before ends is that record,
        // packed after it (its payload damaged here): the chain does not jump past it.
        let mut damaged_next = file.clone();
        damaged_next[5536..5536 + RECORD_HEADER_BYTES].copy_from_slice(&file[at[3]..at[3] + RECORD_HEADER_BYTES]);
        let scan = scan_file(&Bytes::from(damaged_next.clone()));
        assert_eq!(lsns(&scan), [1, 2, 3]);
        assert!(matches!(scan.stop, ScanEnd::Corrupt { at: 5536, valid_at: 13232, .. }), "{:?}", scan.stop);
        assert_eq!(
            check_records(&damaged_next[at[1]..16528], at[1] as u64),
            Err((5536, "the record at byte 5536 fails its checksum".into()))
        );
        // Nor is a record of another LSN after the one before it in a read.
        let mut stale = file.clone();
        stale[at[4]..at[4] + 56].copy_from_slice(&file[at[1]..at[2]]);
        assert_eq!(
            check_records(&stale[at[1]..16528], at[1] as u64),
            Err((13232, "the record at byte 13232 has LSN 2, not the 5 after the one before it".into()))
        );
        // A record zeroed out up to a block boundary is damage to a read, not a gap: the
        // record after the zeros is not the next LSN.
        let mut zeroed = file.clone();
        zeroed[at[2]..8192].fill(0);
        assert_eq!(
            check_records(&zeroed[at[1]..16528], at[1] as u64),
            Err((4496, "no record at byte 4496, where the index has one (zeros)".into()))
        );
    }

    #[test]
    fn packed_records_follow_block_padded_ones_in_a_file_an_earlier_build_began() {
        let records = [(1, 200, false), (2, 300, false), (3, 50, true), (4, 5000, true), (5, 9, true)];
        let (file, at) = file_with(0, &records, 1 << 16);
        assert_eq!(at, [4096, 8192, 12288, 12384, 17424]);
        let scan = scan_file(&Bytes::from(file.clone()));
        assert_eq!(scan.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!((scan.stop, scan.end), (ScanEnd::Clean, 17480));
        assert_eq!(check_records(&file[at[1]..17480], at[1] as u64), Ok(()));
    }

    /// In a reused file a torn write may leave a record of the earlier use in place inside
    /// its range; the record written beside it, beyond that, is found and cleared all the
    /// same (left there, a later crash would find it after a new chain: damage).
    #[test]
    fn a_record_written_beside_a_torn_one_is_found_past_an_earlier_use_record() {
        use crate::log::format::FileHeader;
        let earlier = file_with(0, &(10..70).map(|l| (l, 1000, true)).collect::<Vec<_>>(), 1 << 16).0;
        let (own, at) = file_of_blocks(&[(100, 300, false), (101, 5000, false), (102, 7, true)]);
        let second_end = at[2] + 4096;
        assert!(at[2] as u64 == crate::constants::align_up(at[1] as u64 + 5000) && at[1] + 512 < 5136);
        let mut image = earlier.clone();
        image[..at[1] + 512].copy_from_slice(&own[..at[1] + 512]);
        image[at[2]..second_end].copy_from_slice(&own[at[2]..second_end]);
        FileHeader { container: 1, seq: 3, epoch: 1, file_bytes: 1 << 16, min_lsn: 100, tag: TAG }.encode(&mut image);
        // Record 101 torn after its first sector: the earlier use's record at 5136 is intact
        // inside its range, record 102 (a block of its own) whole after it.
        assert!(RecordHeader::decode(&image[5136..]).is_ok_and(|h| h.lsn < 100));
        let scan = scan_file(&Bytes::from(image));
        assert_eq!(scan.records.iter().map(|r| r.header.lsn).collect::<Vec<_>>(), [100]);
        assert!(
            matches!(&scan.stop, ScanEnd::Torn { at: a, reason } if *a == at[1] as u64 && reason.contains("being written with it")),
            "{:?}",
            scan.stop
        );
        assert_eq!((scan.end, scan.dirty_end), (at[1] as u64, second_end as u64));
    }

    #[test]
    fn a_recycled_file_of_packed_records_ends_where_its_earlier_use_begins_inside_a_block() {
        // The earlier use: packed records of 1,000 bytes (1,040 on disk) from byte 4096.
        let earlier = file_with(0, &(10..60).map(|l| (l, 1000, true)).collect::<Vec<_>>(), 1 << 16).0;
        let own = |n: u64, len: usize| {
            let records: Vec<(u64, usize, bool)> = (100..100 + n).map(|l| (l, len, true)).collect();
            let (mut file, at) = file_with(100, &records, 1 << 16);
            let end = at.last().map_or(4096, |&a| a + RecordHeader::packed_len(len) as usize);
            file[end..].copy_from_slice(&earlier[end..]);
            (file, end)
        };
        // Two own records of 1,560 bytes end exactly where an earlier record starts (byte
        // 7216, inside a block): the end is clean, nothing to clear.
        let (file, end) = own(2, 1520);
        assert_eq!(end, 7216);
        let scan = scan_file(&Bytes::from(file));
        assert_eq!((scan.stop, scan.end, scan.dirty_end), (ScanEnd::Clean, 7216, 7216));
        // Ending inside an earlier record: its rest is torn-looking bytes to clear, up to the
        // next earlier record, not damage.
        let (file, end) = own(2, 1500);
        assert_eq!(end, 7184);
        let scan = scan_file(&Bytes::from(file));
        assert!(matches!(scan.stop, ScanEnd::Torn { at: 7184, .. }), "{:?}", scan.stop);
        assert_eq!(scan.dirty_end, 7216, "up to the earlier record, inside the block");
    }
}
