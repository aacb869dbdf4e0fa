//! Read cache of recent durable appends, per container, with a byte budget. Entries are
//! evicted oldest first across all segments. Only durable data ever enters the cache.
//!
//! Small appends are copied into blocks of `BLOCK_BYTES` that the cache fills in turn, so what
//! the cache keeps alive is a run of equal blocks, not the request buffers the appends came
//! in: those (every size, freed at every turn of the heap) left glibc's heap so fragmented
//! that finding room for each request frame took a tenth of a busy shard's time.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};

/// The size of the blocks small appends are copied into.
const BLOCK_BYTES: usize = 256 << 10;
/// Appends of this size or more are kept as they came (one allocation each already).
const OWN_BYTES: usize = BLOCK_BYTES / 4;

pub struct ReadCache {
    budget: usize,
    used: usize,
    /// Insertion order: (segment, offset).
    order: VecDeque<(u64, u64)>,
    segments: HashMap<u64, VecDeque<(u64, Bytes)>>,
    /// The rest of the block being filled.
    block: BytesMut,
}

impl ReadCache {
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0, order: VecDeque::new(), segments: HashMap::new(), block: BytesMut::new() }
    }

    /// `data` as the cache keeps it: copied into the current block if small.
    fn keep(&mut self, data: Bytes) -> Bytes {
        if data.len() >= OWN_BYTES {
            return data;
        }
        if self.block.capacity() - self.block.len() < data.len() {
            self.block = BytesMut::with_capacity(BLOCK_BYTES);
        }
        self.block.extend_from_slice(&data);
        self.block.split().freeze()
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Adds durable data at `offset` (appends arrive in offset order per segment).
    pub fn insert(&mut self, segment: u64, offset: u64, data: Bytes) {
        if data.is_empty() || data.len() > self.budget {
            return;
        }
        let data = self.keep(data);
        self.used += data.len();
        self.order.push_back((segment, offset));
        self.segments.entry(segment).or_default().push_back((offset, data));
        while self.used > self.budget {
            let Some((seg, off)) = self.order.pop_front() else {
                break;
            };
            if let Some(q) = self.segments.get_mut(&seg)
                && q.front().is_some_and(|(o, _)| *o == off)
            {
                let (_, d) = q.pop_front().expect("front exists");
                self.used -= d.len();
                if q.is_empty() {
                    self.segments.remove(&seg);
                }
            }
        }
    }

    /// Up to `max` bytes from `offset`, if the cache holds that offset. Consecutive entries
    /// are joined; a single entry is returned without copying.
    pub fn get(&self, segment: u64, offset: u64, max: usize) -> Option<Bytes> {
        let q = self.segments.get(&segment)?;
        let i = q.partition_point(|(o, d)| o + d.len() as u64 <= offset);
        let (o, d) = q.get(i)?;
        if *o > offset {
            return None;
        }
        let first = d.slice((offset - o) as usize..);
        if first.len() >= max {
            return Some(first.slice(..max));
        }
        let mut out: Option<BytesMut> = None;
        let mut next = offset + first.len() as u64;
        for (o, d) in q.iter().skip(i + 1) {
            if *o != next || out.as_ref().map_or(first.len(), |b| b.len()) >= max {
                break;
            }
            let buf = out.get_or_insert_with(|| BytesMut::from(&first[..]));
            let take = d.len().min(max - buf.len());
            buf.extend_from_slice(&d[..take]);
            next += take as u64;
        }
        Some(out.map_or(first, BytesMut::freeze))
    }

    /// Drops entries wholly below `start`.
    pub fn truncate(&mut self, segment: u64, start: u64) {
        if let Some(q) = self.segments.get_mut(&segment) {
            while q.front().is_some_and(|(o, d)| o + d.len() as u64 <= start) {
                let (_, d) = q.pop_front().expect("front exists");
                self.used -= d.len();
            }
        }
    }

    pub fn remove_segment(&mut self, segment: u64) {
        if let Some(q) = self.segments.remove(&segment) {
            self.used -= q.iter().map(|(_, d)| d.len()).sum::<usize>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_gather_and_truncate() {
        let mut c = ReadCache::new(10);
        c.insert(1, 0, Bytes::from_static(b"abcd"));
        c.insert(1, 4, Bytes::from_static(b"efgh"));
        assert_eq!(c.get(1, 2, 100).unwrap(), Bytes::from_static(b"cdefgh"));
        assert_eq!(c.get(1, 2, 3).unwrap(), Bytes::from_static(b"cde"));
        assert_eq!(c.get(1, 8, 10), None);
        c.insert(2, 0, Bytes::from_static(b"xyz"));
        // 11 bytes > 10: the oldest entry goes.
        assert_eq!(c.get(1, 0, 10), None);
        assert_eq!(c.used_bytes(), 7);
        c.truncate(1, 8);
        assert_eq!(c.used_bytes(), 3);
        c.remove_segment(2);
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn small_appends_are_copied_into_shared_blocks_and_large_ones_kept() {
        let mut c = ReadCache::new(4 * BLOCK_BYTES);
        let mut offset = 0u64;
        // Enough 1000-byte appends to fill more than one block.
        for i in 0..(BLOCK_BYTES / 1000 + 10) {
            let data = Bytes::from(vec![(i % 251) as u8; 1000]);
            c.insert(7, offset, data);
            offset += 1000;
        }
        for i in 0..(BLOCK_BYTES / 1000 + 10) {
            let got = c.get(7, i as u64 * 1000, 1000).expect("cached");
            assert_eq!(got, Bytes::from(vec![(i % 251) as u8; 1000]), "entry {i}");
        }
        // Entries next to each other in one block sit next to each other in memory.
        let a = c.get(7, 0, 1000).unwrap();
        let b = c.get(7, 1000, 1000).unwrap();
        assert_eq!(a.as_ptr().wrapping_add(1000), b.as_ptr());
        // A read across entries is joined.
        assert_eq!(c.get(7, 500, 1000).unwrap().len(), 1000);
        let large = Bytes::from(vec![9u8; OWN_BYTES]);
        let at = large.as_ptr();
        c.insert(8, 0, large);
        assert_eq!(c.get(8, 0, OWN_BYTES).unwrap().as_ptr(), at, "kept as it came");
    }
}
