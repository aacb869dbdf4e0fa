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

    /// Where the bytes of `segment` from `offset` on lie in this file: (file position,
    /// length) pieces in offset order, at most `max` bytes in all, the last ending within
    /// `span_max` bytes of the first's position (the caller reads that span at once and
    /// takes the pieces out of it). Empty if the file holds nothing at `offset`.
    pub fn locate(&self, segment: u64, offset: u64, max: u64, span_max: u64) -> Vec<(u64, u64)> {
        let Some(v) = self.segments.get(&segment) else { return Vec::new() };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut at, mut total) = (offset, 0u64);
        for e in &v[v.partition_point(|e| e.offset + u64::from(e.len) <= offset)..] {
            if e.offset > at || total >= max {
                break;
            }
            let skip = at - e.offset;
            let (pos, len) = (e.file_pos + skip, (u64::from(e.len) - skip).min(max - total));
            if let Some(&(first, _)) = out.first()
                && pos + len > first + span_max
            {
                break;
            }
            out.push((pos, len));
            total += len;
            at += len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::FileIndex;

    #[test]
    fn locate_gathers_consecutive_appends_within_the_span() {
        let mut idx = FileIndex::default();
        // Segment 1: offsets 0..100 at 1000, 100..250 at 1300, 250..300 at 5000; segment 2 between.
        idx.push(1, 0, 1000, 100);
        idx.push(2, 0, 1100, 150);
        idx.push(1, 100, 1300, 150);
        idx.push(1, 250, 5000, 50);
        assert_eq!(idx.locate(1, 0, 1 << 20, 1 << 20), vec![(1000, 100), (1300, 150), (5000, 50)]);
        // From inside an append, capped by `max`.
        assert_eq!(idx.locate(1, 40, 100, 1 << 20), vec![(1040, 60), (1300, 40)]);
        // The span stops before a piece that would end too far from the first.
        assert_eq!(idx.locate(1, 0, 1 << 20, 1000), vec![(1000, 100), (1300, 150)]);
        assert_eq!(idx.locate(1, 300, 10, 10), vec![]);
        assert_eq!(idx.locate(3, 0, 10, 10), vec![]);
        assert_eq!(idx.locate(2, 149, 10, 10), vec![(1249, 1)]);
    }
}
