//! Per-file index of append data: where each appended range of a segment lies in one log
//! file, and where the records holding them begin and end (a read takes whole records, so
//! that their checksums can be checked). The index of the file being written is kept up to
//! date as flushes complete; the indexes of older files are rebuilt on demand by scanning
//! them (cold reads).

use crate::log::entry::{LogEntry, decode_entries};
use crate::log::format::RecordKind;
use crate::log::scan::ScannedRecord;
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
    /// Batch records as (file position, bytes on disk), in file order.
    records: Vec<(u64, u64)>,
    /// Where a run of back-to-back records ends before a gap (a damaged stretch the file's
    /// scan skipped), in file order; empty for a sound file. The rest of the block before a
    /// record written beside the one before it (at the next block boundary) is no gap
    /// (`log::scan`).
    gaps: Vec<u64>,
}

impl FileIndex {
    /// Builds the index of a file's scanned records (in file order).
    pub fn build(records: &[ScannedRecord]) -> Result<Self, String> {
        let mut index = Self::default();
        let mut prev_lsn = None;
        for rec in records {
            let follows = prev_lsn.is_some_and(|l: u64| rec.header.lsn == l + 1);
            prev_lsn = Some(rec.header.lsn);
            if rec.header.kind != RecordKind::Batch {
                continue;
            }
            index.push_record(rec.pos, rec.header.disk_len(), follows);
            for (entry, pos) in decode_entries(&rec.payload, rec.payload_pos())? {
                match entry {
                    LogEntry::Append { segment, offset, data, .. } | LogEntry::Merge { segment, offset, data, .. } => {
                        index.push(segment, offset, pos, data.len() as u32);
                    }
                    LogEntry::Relocate { segment, offset, data } => {
                        index.relocate(segment, offset, pos, data.len() as u32);
                    }
                    _ => {}
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

    /// All the bytes of `segment` the log holds, copied to `file_pos` of this file
    /// (`LogEntry::Relocate`): they replace what the file held of it before (a copy takes
    /// those bytes too), so the segment's entries stay in offset order.
    pub fn relocate(&mut self, segment: u64, offset: u64, file_pos: u64, len: u32) {
        self.segments.remove(&segment);
        self.push(segment, offset, file_pos, len);
    }

    /// A batch record at `pos` taking `disk_len` bytes (records are pushed in file order);
    /// `follows`: its LSN is the one after the record before it (not so after a damaged
    /// stretch a salvage skipped, even one that ends at the block boundary where it starts).
    pub fn push_record(&mut self, pos: u64, disk_len: u64, follows: bool) {
        debug_assert!(self.records.last().is_none_or(|&(p, l)| p + l <= pos), "records in file order");
        if let Some(&(p, l)) = self.records.last()
            && !(follows && (p + l == pos || crate::constants::align_up(p + l) == pos))
        {
            self.gaps.push(p + l);
        }
        self.records.push((pos, disk_len));
    }

    /// The file range `[start, end)` of the record holding file byte `at`.
    fn record_holding(&self, at: u64) -> Option<(u64, u64)> {
        let i = self.records.partition_point(|&(p, _)| p <= at).checked_sub(1)?;
        let (p, l) = self.records[i];
        (at < p + l).then_some((p, p + l))
    }

    /// The file range `[start, end)` of the whole records that hold the file bytes
    /// `[from, to)`; `None` if no record holds `from` or `to - 1`.
    pub fn record_span(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        Some((self.record_holding(from)?.0, self.record_holding(to.checked_sub(1)?)?.1))
    }

    /// Where the run of back-to-back records holding file byte `at` ends, or `limit` if
    /// sooner. A gap between records is a damaged stretch the scan skipped: a read that
    /// spanned it would take damaged bytes.
    fn run_end(&self, at: u64, limit: u64) -> u64 {
        self.gaps.get(self.gaps.partition_point(|&g| g <= at)).map_or(limit, |&g| g.min(limit))
    }

    /// The first offset of `segment` this file holds beyond `offset` (where its data resumes
    /// after a stretch the index lacks).
    pub fn offset_beyond(&self, segment: u64, offset: u64) -> Option<u64> {
        let v = self.segments.get(&segment)?;
        v.get(v.partition_point(|e| e.offset <= offset)).map(|e| e.offset)
    }

    /// The first offset of `segment` held by a record after the one at `record_pos`.
    pub fn offset_after_record(&self, segment: u64, record_pos: u64) -> Option<u64> {
        let (_, end) = self.record_holding(record_pos)?;
        let v = self.segments.get(&segment)?;
        v.get(v.partition_point(|e| e.file_pos < end)).map(|e| e.offset)
    }

    /// Where the bytes of `segment` from `offset` on lie in this file: (file position,
    /// length) pieces in offset order, at most `max` bytes in all, the last ending within
    /// `span_max` bytes of the first's position (the caller reads that span at once and
    /// takes the pieces out of it). Empty if the file holds nothing at `offset`.
    pub fn locate(&self, segment: u64, offset: u64, max: u64, span_max: u64) -> Vec<(u64, u64)> {
        let Some(v) = self.segments.get(&segment) else { return Vec::new() };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut at, mut total) = (offset, 0u64);
        let mut span_end = u64::MAX;
        for e in &v[v.partition_point(|e| e.offset + u64::from(e.len) <= offset)..] {
            if e.offset > at || total >= max {
                break;
            }
            let skip = at - e.offset;
            let (pos, len) = (e.file_pos + skip, (u64::from(e.len) - skip).min(max - total));
            if out.is_empty() {
                span_end = self.run_end(pos, pos.saturating_add(span_max));
            } else if pos + len > span_end {
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

    /// Records with a gap between them (a damaged stretch a scan skipped): a read's span
    /// ends at the gap, so that it never takes the damaged bytes; the next read starts after.
    #[test]
    fn locate_stops_at_a_gap_between_records() {
        let mut idx = FileIndex::default();
        idx.push_record(1000, 300, true);
        idx.push(1, 0, 1040, 100);
        idx.push_record(1300, 300, true);
        idx.push(1, 100, 1340, 150);
        // 1600..5000: damaged, not indexed.
        idx.push_record(5000, 400, true);
        idx.push(1, 250, 5040, 50);
        assert_eq!(idx.locate(1, 0, 1 << 20, 1 << 20), vec![(1040, 100), (1340, 150)]);
        assert_eq!(idx.record_span(1040, 1490), Some((1000, 1600)));
        assert_eq!(idx.locate(1, 250, 1 << 20, 1 << 20), vec![(5040, 50)]);
    }

    /// A record written beside the one before it starts at the next block boundary: the
    /// bytes between them are no gap, a read spans them.
    #[test]
    fn the_rest_of_the_block_before_a_record_of_its_own_is_no_gap() {
        let mut idx = FileIndex::default();
        idx.push_record(4096, 304, true);
        idx.push(1, 0, 4136, 200);
        idx.push_record(8192, 400, true);
        idx.push(1, 200, 8232, 300);
        assert_eq!(idx.locate(1, 0, 1 << 20, 1 << 20), vec![(4136, 200), (8232, 300)]);
        assert_eq!(idx.record_span(4136, 8532), Some((4096, 8592)));
        // Not so where the record at the boundary does not follow (a salvage skipped damaged
        // records that ended there): a read stops before it.
        let mut idx = FileIndex::default();
        idx.push_record(4096, 304, true);
        idx.push(1, 0, 4136, 200);
        idx.push_record(8192, 400, false);
        idx.push(1, 200, 8232, 300);
        assert_eq!(idx.locate(1, 0, 1 << 20, 1 << 20), vec![(4136, 200)]);
        assert_eq!(idx.locate(1, 200, 1 << 20, 1 << 20), vec![(8232, 300)]);
    }

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

    #[test]
    fn record_span_covers_whole_records() {
        let mut idx = FileIndex::default();
        idx.push_record(4096, 4096, true);
        idx.push_record(8192, 12288, true);
        idx.push_record(20480, 4096, true);
        assert_eq!(idx.record_span(4200, 4300), Some((4096, 8192)));
        assert_eq!(idx.record_span(5000, 9000), Some((4096, 20480)));
        assert_eq!(idx.record_span(8192, 24576), Some((8192, 24576)));
        // Before the first record, past the last one, and an empty range.
        assert_eq!(idx.record_span(100, 5000), None);
        assert_eq!(idx.record_span(5000, 24577), None);
        assert_eq!(idx.record_span(0, 0), None);
        // Segment 1's appends in the first and third records, segment 2's in the second.
        idx.push(1, 0, 4200, 100);
        idx.push(2, 0, 8300, 100);
        idx.push(1, 100, 20600, 100);
        assert_eq!(idx.offset_after_record(1, 4096), Some(100));
        assert_eq!(idx.offset_after_record(1, 8192), Some(100));
        assert_eq!(idx.offset_after_record(1, 20480), None, "nothing after the last record");
        assert_eq!(idx.offset_after_record(2, 8192), None);
        // Past a stretch the index lacks (segment 1 holds 0..100 and 100..200 here).
        assert_eq!(idx.offset_beyond(1, 50), Some(100));
        assert_eq!(idx.offset_beyond(1, 100), None);
        assert_eq!(idx.offset_beyond(3, 0), None);
    }
}
