//! Chunk checksums: CRC-32C of every `SUM_BLOCK_BYTES` block of a chunk (the last block may
//! be partial), kept in memory while a chunk grows and written beside a closed chunk as
//! `<chunk>.sum`, so reads from tier-2 find damage instead of handing it to readers.
//!
//! A sums file may cover fewer bytes than its chunk (bytes adopted after it was written):
//! only the blocks it covers are checked.

/// Bytes covered by one checksum.
pub const SUM_BLOCK_BYTES: u64 = 1 << 20;

const MAGIC: &[u8; 4] = b"SLCS";
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 24;

/// Name of the sums file of `chunk`.
pub fn sums_name(chunk: &str) -> String {
    format!("{chunk}.sum")
}

/// Checksums of a chunk's first `len` bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkSums {
    len: u64,
    /// CRCs of the whole blocks.
    blocks: Vec<u32>,
    /// CRC of the partial last block (0 when there is none).
    tail: u32,
}

/// A block whose bytes do not match their checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Chunk offset of the block.
    pub offset: u64,
    pub expected: u32,
    pub actual: u32,
}

impl ChunkSums {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds the next bytes of the chunk.
    pub fn extend(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (SUM_BLOCK_BYTES - self.len % SUM_BLOCK_BYTES) as usize;
            let (part, rest) = data.split_at(room.min(data.len()));
            self.tail = crc32c::crc32c_append(self.tail, part);
            self.len += part.len() as u64;
            if self.len.is_multiple_of(SUM_BLOCK_BYTES) {
                self.blocks.push(std::mem::take(&mut self.tail));
            }
            data = rest;
        }
    }

    /// Checks `data`, the chunk's bytes from `offset`: every block that lies wholly inside
    /// both `data` and the covered bytes.
    pub fn verify(&self, offset: u64, data: &[u8]) -> Result<(), Mismatch> {
        let end = (offset + data.len() as u64).min(self.len);
        let mut block = offset.div_ceil(SUM_BLOCK_BYTES);
        loop {
            let from = block * SUM_BLOCK_BYTES;
            let to = (from + SUM_BLOCK_BYTES).min(self.len);
            if from >= to || to > end {
                return Ok(());
            }
            let expected = self.blocks.get(block as usize).copied().unwrap_or(self.tail);
            let actual = crc32c::crc32c(&data[(from - offset) as usize..(to - offset) as usize]);
            if actual != expected {
                return Err(Mismatch { offset: from, expected, actual });
            }
            block += 1;
        }
    }

    /// The sums file: magic `SLCS`, version u16, reserved u16, block size u32, count u32,
    /// covered length u64, `count` CRCs u32 (the last one a partial block's when the length
    /// is not a whole number of blocks), then the CRC-32C of all of that; little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * (self.blocks.len() + 2));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(SUM_BLOCK_BYTES as u32).to_le_bytes());
        let partial = !self.len.is_multiple_of(SUM_BLOCK_BYTES);
        out.extend_from_slice(&((self.blocks.len() + usize::from(partial)) as u32).to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        for crc in self.blocks.iter().chain(partial.then_some(&self.tail)) {
            out.extend_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a sums file; any damage or disagreement is an error (the caller reads the
    /// chunk unchecked, or refuses, as it sees fit).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        if bytes.len() < HEADER_BYTES + 4 || &bytes[..4] != MAGIC {
            return Err("not a sums file".into());
        }
        let body = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..body]) != u32_at(body) {
            return Err("sums file fails its own checksum".into());
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION || u64::from(u32_at(8)) != SUM_BLOCK_BYTES {
            return Err(format!("sums file version {version}, block size {} not supported", u32_at(8)));
        }
        let count = u32_at(12) as usize;
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if count != len.div_ceil(SUM_BLOCK_BYTES) as usize || body != HEADER_BYTES + 4 * count {
            return Err(format!("sums file: {count} sums for {len} bytes in {} bytes", bytes.len()));
        }
        let mut crcs: Vec<u32> = (0..count).map(|i| u32_at(HEADER_BYTES + 4 * i)).collect();
        let tail = if len.is_multiple_of(SUM_BLOCK_BYTES) { 0 } else { crcs.pop().expect("a partial block") };
        Ok(Self { len, blocks: crcs, tail })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    /// Sums built piece by piece equal sums built at once, survive encoding, and find a
    /// flipped byte in any block they cover (but not past what they cover).
    #[test]
    fn sums_check_blocks_and_round_trip() {
        let data = bytes(3 * SUM_BLOCK_BYTES as usize + 12_345);
        let mut whole = ChunkSums::default();
        whole.extend(&data);
        let mut pieces = ChunkSums::default();
        for part in data.chunks(333_333) {
            pieces.extend(part);
        }
        assert_eq!(whole, pieces);
        assert_eq!(whole.len(), data.len() as u64);
        assert_eq!(ChunkSums::decode(&whole.encode()).unwrap(), whole);
        assert_eq!(whole.blocks[0], crc32c::crc32c(&data[..SUM_BLOCK_BYTES as usize]));
        whole.verify(0, &data).unwrap();
        // A read of the middle checks the blocks it holds whole.
        let from = SUM_BLOCK_BYTES as usize - 10;
        whole.verify(from as u64, &data[from..]).unwrap();
        for at in [5, SUM_BLOCK_BYTES as usize + 1, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            let e = whole.verify(0, &bad).unwrap_err();
            assert_eq!(e.offset, at as u64 / SUM_BLOCK_BYTES * SUM_BLOCK_BYTES);
        }
        // Bytes past the covered length, and blocks only partly read, are not checked.
        let mut short = ChunkSums::default();
        short.extend(&data[..100]);
        let mut bad = data.clone();
        bad[200] ^= 1;
        short.verify(0, &bad).unwrap();
        let mut bad = data.clone();
        bad[10] ^= 1;
        whole.verify(0, &bad[..SUM_BLOCK_BYTES as usize - 1]).unwrap();
        assert!(whole.verify(0, &bad).is_err());
        // Whole blocks only, and empty.
        let mut even = ChunkSums::default();
        even.extend(&data[..2 * SUM_BLOCK_BYTES as usize]);
        assert_eq!(ChunkSums::decode(&even.encode()).unwrap(), even);
        assert_eq!(ChunkSums::decode(&ChunkSums::default().encode()).unwrap(), ChunkSums::default());
    }

    #[test]
    fn damaged_sums_files_are_refused() {
        let mut s = ChunkSums::default();
        s.extend(&bytes(1_500_000));
        let good = s.encode();
        assert!(ChunkSums::decode(&good[..good.len() - 1]).is_err());
        assert!(ChunkSums::decode(b"nothing").is_err());
        for at in [0, 4, 12, 16, 26, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(ChunkSums::decode(&bad).is_err(), "byte {at}");
        }
        assert_eq!(
            sums_name("s/t/0/00000000000000000000.e0000000001.chunk"),
            "s/t/0/00000000000000000000.e0000000001.chunk.sum"
        );
    }
}
