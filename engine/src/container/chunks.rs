//! A segment's tier-2 chunks, kept as runs: consecutive chunks of one owner epoch and one
//! length, each starting where the one before ends, are one `ChunkRun`. The mover fills
//! chunks to the configured size, so a segment's chunks form a handful of runs (about two
//! per ownership term that moved data: the full chunks and the last, partial one) however
//! much it holds in tier-2; the checkpoint at the head of every log file and the container's
//! memory grow with the number of terms, not with the data (infinite retention).

/// A tier-2 chunk of a segment: `len` valid bytes from segment offset `start`, written by
/// the owner at `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub start: u64,
    pub epoch: u64,
    pub len: u64,
}

/// `count` chunks of `len` bytes each, of owner `epoch`, the first at `start` and each next
/// one where the one before ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRun {
    pub start: u64,
    pub epoch: u64,
    pub len: u64,
    pub count: u64,
}

impl ChunkRun {
    fn end(&self) -> u64 {
        self.start + self.len * self.count
    }

    fn chunk(&self, i: u64) -> ChunkMeta {
        ChunkMeta { start: self.start + i * self.len, epoch: self.epoch, len: self.len }
    }
}

/// A segment's chunks in offset order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkList {
    runs: Vec<ChunkRun>,
}

impl ChunkList {
    /// From runs as stored (runs of no chunk are dropped; adjacent runs that could be one
    /// are joined).
    pub fn from_runs(runs: impl IntoIterator<Item = ChunkRun>) -> Self {
        let mut list = Self::default();
        for r in runs.into_iter().filter(|r| r.count > 0) {
            if r.len == 0 {
                (0..r.count).for_each(|_| list.push(r.chunk(0)));
                continue;
            }
            match list.runs.last_mut() {
                Some(last) if last.epoch == r.epoch && last.len == r.len && last.end() == r.start => {
                    last.count += r.count
                }
                _ => list.runs.push(r),
            }
        }
        list
    }

    /// From single chunks, in order.
    pub fn from_chunks(chunks: impl IntoIterator<Item = ChunkMeta>) -> Self {
        let mut list = Self::default();
        for c in chunks {
            list.push(c);
        }
        list
    }

    pub fn runs(&self) -> &[ChunkRun] {
        &self.runs
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Number of chunks.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    pub fn last(&self) -> Option<ChunkMeta> {
        self.runs.last().map(|r| r.chunk(r.count - 1))
    }

    pub fn iter(&self) -> impl Iterator<Item = ChunkMeta> + '_ {
        self.runs.iter().flat_map(|r| (0..r.count).map(move |i| r.chunk(i)))
    }

    /// The chunk holding segment offset `offset`, if any.
    pub fn find(&self, offset: u64) -> Option<ChunkMeta> {
        let i = self.runs.partition_point(|r| r.start <= offset).checked_sub(1)?;
        let r = &self.runs[i];
        let c = r.chunk(((offset - r.start).checked_div(r.len)?).min(r.count - 1));
        (offset < c.start + c.len).then_some(c)
    }

    /// The start of the first chunk after `offset` (where data resumes after a gap).
    pub fn start_after(&self, offset: u64) -> Option<u64> {
        self.runs.get(self.runs.partition_point(|r| r.start <= offset)).map(|r| r.start)
    }

    /// Whether the list holds the chunk that starts at `start` under `epoch`.
    pub fn contains(&self, start: u64, epoch: u64) -> bool {
        let upto = self.runs.partition_point(|r| r.start <= start);
        // Runs before the last one starting at or below `start` only matter when they start
        // there too (chunks of no bytes).
        for r in self.runs[..upto].iter().rev() {
            let at = start - r.start;
            let holds = if r.len == 0 { at == 0 } else { at.is_multiple_of(r.len) && at / r.len < r.count };
            if holds && r.epoch == epoch {
                return true;
            }
            if at > 0 {
                return false;
            }
        }
        false
    }

    /// A `Chunk` log entry: chunk (`start`, `epoch`) holds `len` bytes. The last chunk grows
    /// (never shrinks), or a new chunk follows it.
    pub fn record(&mut self, start: u64, epoch: u64, len: u64) {
        match self.last() {
            Some(c) if c.start == start && c.epoch == epoch => {
                if len > c.len {
                    self.pop();
                    self.push(ChunkMeta { len, ..c });
                }
            }
            _ => self.push(ChunkMeta { start, epoch, len }),
        }
    }

    /// Drops the chunks that end at or below `offset` (truncated away) and returns them.
    pub fn drop_below(&mut self, offset: u64) -> Vec<ChunkMeta> {
        let mut dropped = Vec::new();
        while let Some(r) = self.runs.first_mut() {
            if r.end() <= offset {
                dropped.extend((0..r.count).map(|i| r.chunk(i)));
                self.runs.remove(0);
                continue;
            }
            if let Some(k) = offset.saturating_sub(r.start).checked_div(r.len) {
                let k = k.min(r.count);
                dropped.extend((0..k).map(|i| r.chunk(i)));
                r.start += k * r.len;
                r.count -= k;
            }
            break;
        }
        dropped
    }

    fn push(&mut self, c: ChunkMeta) {
        match self.runs.last_mut() {
            Some(r) if r.epoch == c.epoch && r.len == c.len && r.len > 0 && r.end() == c.start => r.count += 1,
            _ => self.runs.push(ChunkRun { start: c.start, epoch: c.epoch, len: c.len, count: 1 }),
        }
    }

    fn pop(&mut self) {
        if let Some(r) = self.runs.last_mut() {
            r.count -= 1;
            if r.count == 0 {
                self.runs.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// What a mover does: chunks filled piece by piece to 64 MiB, a restart (new epoch)
    /// leaving a partial chunk, a truncation in the middle of a run.
    #[test]
    fn chunks_filled_by_movers_stay_a_few_runs() {
        let mut list = ChunkList::default();
        let mut plain: Vec<ChunkMeta> = Vec::new();
        let mut record = |list: &mut ChunkList, start: u64, epoch: u64, len: u64| {
            list.record(start, epoch, len);
            match plain.last_mut() {
                Some(c) if c.start == start && c.epoch == epoch => c.len = c.len.max(len),
                _ => plain.push(ChunkMeta { start, epoch, len }),
            }
            assert_eq!(list.iter().collect::<Vec<_>>(), plain);
            plain.clone()
        };
        let mut at = 0;
        for epoch in 1..=3 {
            // 100 full chunks in 8 MiB pieces, then a partial one of 20 MiB.
            for _ in 0..100 {
                for piece in 1..=8 {
                    record(&mut list, at, epoch, piece * 8 * MIB);
                }
                at += 64 * MIB;
            }
            record(&mut list, at, epoch, 12 * MIB);
            record(&mut list, at, epoch, 20 * MIB);
            at += 20 * MIB;
        }
        let plain = record(&mut list, at, 4, 5);
        assert_eq!(list.runs().len(), 7, "{:?}", list.runs());
        assert_eq!(list.count(), plain.len() as u64);
        assert_eq!(ChunkList::from_chunks(plain.iter().copied()), list);
        assert_eq!(ChunkList::from_runs(list.runs().iter().copied()), list);
        // Every chunk is found by each of its offsets, and only those.
        for c in &plain {
            for off in [c.start, c.start + c.len / 2, c.start + c.len - 1] {
                assert_eq!(list.find(off), Some(*c));
            }
            assert!(list.contains(c.start, c.epoch));
            assert!(!list.contains(c.start, c.epoch + 1));
            assert!(!list.contains(c.start + 1, c.epoch));
        }
        assert_eq!(list.find(at + 5), None);
        assert_eq!(list.last(), Some(ChunkMeta { start: at, epoch: 4, len: 5 }));
        // A record of a shorter length changes nothing.
        let before = list.clone();
        list.record(at, 4, 3);
        assert_eq!(list, before);

        // Truncation in the middle of the second run.
        let cut = 64 * MIB * 100 + 20 * MIB + 64 * MIB * 10 + 5;
        let dropped = list.drop_below(cut);
        let kept: Vec<ChunkMeta> = plain.iter().copied().filter(|c| c.start + c.len > cut).collect();
        assert_eq!(dropped.len() + kept.len(), plain.len());
        assert!(dropped.iter().all(|c| c.start + c.len <= cut));
        assert_eq!(list.iter().collect::<Vec<_>>(), kept);
        assert_eq!(list.find(cut).map(|c| c.start), Some(cut - 5));
        assert!(list.drop_below(0).is_empty());
        let all = list.drop_below(u64::MAX / 2);
        assert_eq!(all, kept);
        assert!(list.is_empty() && list.last().is_none() && list.find(0).is_none());
    }

    /// Runs that are not contiguous or differ in epoch or length stay apart; a chunk that
    /// grows out of a run leaves it.
    #[test]
    fn runs_join_only_what_is_one() {
        let mut list = ChunkList::default();
        list.record(0, 1, 10);
        list.record(10, 1, 10);
        assert_eq!(list.runs().len(), 1);
        list.record(10, 1, 15);
        assert_eq!(list.runs().len(), 2);
        assert_eq!(list.last(), Some(ChunkMeta { start: 10, epoch: 1, len: 15 }));
        list.record(30, 1, 15); // a gap (data moved from a later offset)
        assert_eq!(list.runs().len(), 3);
        assert_eq!(list.find(27), None);
        list.record(45, 2, 15); // another epoch
        assert_eq!(list.runs().len(), 4);
        let from = ChunkList::from_runs([
            ChunkRun { start: 0, epoch: 1, len: 10, count: 2 },
            ChunkRun { start: 20, epoch: 1, len: 10, count: 0 },
            ChunkRun { start: 20, epoch: 1, len: 10, count: 3 },
        ]);
        assert_eq!(from.runs(), &[ChunkRun { start: 0, epoch: 1, len: 10, count: 5 }]);
    }
}
