//! Per-file index of append data: where each appended range of a segment lies in one log
//! file. The index of the file being written is kept up to date as flushes complete; the
//! indexes of older files are rebuilt on demand by scanning them (cold reads).

use crate::log::entry::{LogEntry, decode_entries};
use crate::log::format::RecordKind;
use crate::log::scan::FileScan;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub file_pos: u64,
    pub len: u32,
}

#[derive(Default, Debug)]
pub struct FileIndex {
    segments: HashMap<u64, Vec<IndexEntry>>,
}

impl FileIndex {
    /// Builds the index of a scanned file.
    pub fn build(scan: &FileScan) -> Result<Self, String> {
        let mut index = Self::default();
        for rec in scan.records.iter().filter(|r| r.header.kind == RecordKind::Batch) {
            for (entry, pos) in decode_entries(&rec.payload, rec.payload_pos())? {
                if let LogEntry::Append { segment, offset, data, .. } | LogEntry::Merge { segment, offset, data, .. } =
                    entry
                {
                    index.push(segment, offset, pos, data.len() as u32);
                }
            }
        }
        Ok(index)
    }

    pub fn push(&mut self, segment: u64, offset: u64, file_pos: u64, len: u32) {
        if len > 0 {
            self.segments.entry(segment).or_default().push(IndexEntry { offset, file_pos, len });
        }
    }

    /// File position of `offset` and the contiguous bytes available there.
    pub fn locate(&self, segment: u64, offset: u64) -> Option<(u64, u64)> {
        let v = self.segments.get(&segment)?;
        let i = v.partition_point(|e| e.offset + u64::from(e.len) <= offset);
        let e = v.get(i)?;
        (e.offset <= offset).then(|| (e.file_pos + (offset - e.offset), e.offset + u64::from(e.len) - offset))
    }
}
