//! Scanning one log file: the valid record chain from the first record on, and what stops
//! it. Recovery, the cold read path (file indexes) and `sluice log dump` all use this.
//!
//! Invariant relied on: the engine never has more than one record written but not yet
//! fdatasync'd. So after the last valid record there may be one torn record (garbage or
//! zeros), but never a complete, valid record; finding one means acknowledged data was
//! damaged, and recovery must refuse to start.

use crate::constants::{BLOCK_BYTES, FILE_HEADER_BYTES, RECORD_HEADER_BYTES};
use crate::log::format::{FileHeader, HeaderFault, RecordHeader};
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
    /// End of the last non-zero block at or after `end` (torn garbage to clear), or `end`.
    pub dirty_end: u64,
}

/// Checks the record at `pos` in isolation (header and payload checksums).
fn record_at(bytes: &Bytes, pos: u64) -> Result<ScannedRecord, (HeaderFault, Option<u64>, String)> {
    let p = pos as usize;
    let header = RecordHeader::decode(&bytes[p..]).map_err(|f| (f, None, "invalid record header".to_string()))?;
    let start = p + RECORD_HEADER_BYTES;
    let end = start + header.payload_len as usize;
    let extent = Some(RecordHeader::disk_len(header.payload_len as usize));
    if end > bytes.len() {
        return Err((
            HeaderFault::Invalid,
            None,
            format!("payload of {} bytes runs past the file end", header.payload_len),
        ));
    }
    if crc32c::crc32c(&bytes[start..end]) != header.payload_crc {
        return Err((HeaderFault::Invalid, extent, "payload checksum mismatch".into()));
    }
    Ok(ScannedRecord { pos, header, payload: bytes.slice(start..end) })
}

/// Whether the file's first record is a valid checkpoint (what makes a file a recovery
/// starting point), checked without scanning the rest.
pub fn opens_with_checkpoint(bytes: &Bytes) -> bool {
    (bytes.len() as u64) >= FILE_HEADER_BYTES + RECORD_HEADER_BYTES as u64
        && record_at(bytes, FILE_HEADER_BYTES)
            .is_ok_and(|r| r.header.kind == crate::log::format::RecordKind::Checkpoint)
}

/// Scans a whole log file held in memory.
pub fn scan_file(bytes: &Bytes) -> FileScan {
    let header = FileHeader::decode(bytes);
    let len = bytes.len() as u64 / BLOCK_BYTES * BLOCK_BYTES;
    let mut records: Vec<ScannedRecord> = Vec::new();
    let mut pos = FILE_HEADER_BYTES;
    let stop = loop {
        if pos + RECORD_HEADER_BYTES as u64 > len {
            break None;
        }
        match record_at(bytes, pos) {
            Ok(rec) => {
                if let Some(prev) = records.last() {
                    let ph = &prev.header;
                    if rec.header.lsn != ph.lsn + 1 || rec.header.epoch < ph.epoch {
                        let reason = format!(
                            "record lsn {} epoch {} does not follow lsn {} epoch {}",
                            rec.header.lsn, rec.header.epoch, ph.lsn, ph.epoch
                        );
                        break Some((pos, HeaderFault::Invalid, None, reason));
                    }
                }
                pos += RecordHeader::disk_len(rec.header.payload_len as usize);
                records.push(rec);
            }
            Err((fault, extent, reason)) => break Some((pos, fault, extent, reason)),
        }
    };
    let end = pos;
    let block = BLOCK_BYTES as usize;
    let dirty_end = (end as usize..len as usize)
        .step_by(block)
        .rev()
        .find(|&b| bytes[b..b + block].iter().any(|&x| x != 0))
        .map_or(end, |b| (b + block) as u64);
    let stop = match stop {
        None => ScanEnd::Clean,
        Some((at, fault, extent, reason)) => {
            let resume = extent.map_or(at + BLOCK_BYTES, |e| at + e);
            let valid_after = (resume..len)
                .step_by(BLOCK_BYTES as usize)
                .take_while(|&b| b < dirty_end)
                .find(|&b| b + RECORD_HEADER_BYTES as u64 <= len && record_at(bytes, b).is_ok());
            match valid_after {
                Some(valid_at) => ScanEnd::Corrupt { at, valid_at, reason },
                None if fault == HeaderFault::Zero && dirty_end == end => ScanEnd::Clean,
                None => ScanEnd::Torn { at, reason },
            }
        }
    };
    FileScan { header, records, end, stop, dirty_end }
}
