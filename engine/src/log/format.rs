//! File header and record header layouts (little-endian, crc32c).

use crate::constants::{RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};

/// Magic at the start of every log file.
pub const FILE_MAGIC: &[u8; 8] = b"SLUICELG";
/// Magic at the start of every record ("SLRC").
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SLRC");
/// On-disk format version of the first record layout (each record padded to the next block
/// boundary), and of the first file header layout.
pub const FORMAT_VERSION: u16 = 1;
/// Record format version of packed records (the next one starts at the next 8-byte boundary):
/// what this build writes.
pub const PACKED_RECORD_VERSION: u8 = 2;
/// The second file header layout: the first plus `min_lsn` (its records are block-padded).
pub const FILE_HEADER_VERSION_2: u16 = 2;
/// The second layout, in a file whose records may be packed (a build that knows only
/// block-padded records must not take the file).
pub const FILE_HEADER_VERSION_3: u16 = 3;
/// The second layout, in a file where a record may start a block of its own after the rest
/// of the block before it (written while the record before it was; see `log::scan`): a build
/// that would take the bytes there for the log's end must not take the file.
pub const FILE_HEADER_VERSION_4: u16 = 4;
/// Version of the file header written now: the third layout, the fourth's plus the file's
/// record tag (`FileHeader::tag`), which every record of the file carries.
pub const FILE_HEADER_VERSION: u16 = 5;

/// The bits of a record tag (`FileHeader::tag`): 48, in two reserved fields of the record
/// header.
pub const TAG_MASK: u64 = (1 << 48) - 1;

/// A new file's record tag: random, never 0 (the tag of files without one).
pub fn new_tag() -> u64 {
    (rand::random::<u64>() & TAG_MASK).max(1)
}

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A group-commit batch of entries.
    Batch = 1,
    /// A container metadata checkpoint (first record of every file).
    Checkpoint = 2,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Batch),
            2 => Some(Self::Checkpoint),
            _ => None,
        }
    }
}

/// The first block of a log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub container: u32,
    pub seq: u64,
    pub epoch: u64,
    pub file_bytes: u64,
    /// Records of this file have LSNs from here on; a record with a lower LSN was left by
    /// the file's earlier use (a recycled file) and is not part of it. 0 in files of the
    /// first header layout (never recycled).
    pub min_lsn: u64,
    /// The record tag (48 bits; 0 in files of earlier layouts): random, chosen when the file
    /// is made (or reused), and carried by every record written into it. Scans take a record
    /// for one of the file's own only if its tag is the file's, so bytes that merely look
    /// like a record (a user's event crafted to, at a position a scan looks at after damage
    /// or in a reused file's earlier use) are not taken: their writer cannot know the tag.
    pub tag: u64,
}

impl FileHeader {
    /// Writes the header (current layout) into the first bytes of `block` (the rest must be
    /// zero).
    pub fn encode(&self, block: &mut [u8]) {
        block[0..8].copy_from_slice(FILE_MAGIC);
        block[8..10].copy_from_slice(&FILE_HEADER_VERSION.to_le_bytes());
        block[10..12].copy_from_slice(&0u16.to_le_bytes());
        block[12..16].copy_from_slice(&self.container.to_le_bytes());
        block[16..24].copy_from_slice(&self.seq.to_le_bytes());
        block[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        block[32..40].copy_from_slice(&self.file_bytes.to_le_bytes());
        block[40..48].copy_from_slice(&self.min_lsn.to_le_bytes());
        block[48..56].copy_from_slice(&self.tag.to_le_bytes());
        let crc = crc32c::crc32c(&block[..56]);
        block[56..60].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses and verifies a file header of either layout.
    pub fn decode(block: &[u8]) -> Result<Self, String> {
        if block.len() < 60 {
            return Err("file shorter than its header".into());
        }
        if &block[0..8] != FILE_MAGIC {
            return Err("bad file magic".into());
        }
        let version = u16::from_le_bytes([block[8], block[9]]);
        // Bytes covered by the checksum, which follows them.
        let covered = match version {
            FORMAT_VERSION => 40,
            FILE_HEADER_VERSION_2 | FILE_HEADER_VERSION_3 | FILE_HEADER_VERSION_4 => 48,
            FILE_HEADER_VERSION => 56,
            // A damaged version field is a checksum failure like any other damaged byte.
            _ if [40, 48, 56].iter().all(|&n| crc_at(block, n) != crc32c::crc32c(&block[..n])) => {
                return Err("file header checksum mismatch".into());
            }
            _ => return Err(format!("unsupported log file header version {version}")),
        };
        if crc_at(block, covered) != crc32c::crc32c(&block[..covered]) {
            return Err("file header checksum mismatch".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self {
            container: u32::from_le_bytes(block[12..16].try_into().expect("4 bytes")),
            seq: u64_at(16),
            epoch: u64_at(24),
            file_bytes: u64_at(32),
            min_lsn: if version == FORMAT_VERSION { 0 } else { u64_at(40) },
            tag: if version == FILE_HEADER_VERSION { u64_at(48) & TAG_MASK } else { 0 },
        })
    }
}

/// The little-endian u32 at `at` (a header checksum).
fn crc_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

/// A record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub epoch: u64,
    pub lsn: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    /// Packed (record version 2, what this build writes) or block-padded (version 1, written
    /// by earlier builds): where the next record starts.
    pub layout: RecordLayout,
    /// Its file's record tag (`FileHeader::tag`; 0 in files without one): bytes 6..8 hold
    /// its high 16 bits, 36..40 its low 32.
    pub tag: u64,
}

/// Why the bytes at a position are not a valid record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderFault {
    /// All zero: nothing was ever written here.
    Zero,
    /// Something was written, but it is not a valid header.
    Invalid,
}

impl RecordHeader {
    /// Bytes a packed record of `payload_len` takes on disk (what this build writes): header
    /// and payload, padded to the next 8-byte boundary.
    pub fn packed_len(payload_len: usize) -> u64 {
        ((RECORD_HEADER_BYTES + payload_len) as u64).next_multiple_of(RECORD_ALIGN_BYTES)
    }

    /// Bytes a block-padded record (record version 1) of `payload_len` takes on disk.
    pub fn block_padded_len(payload_len: usize) -> u64 {
        crate::constants::align_up((RECORD_HEADER_BYTES + payload_len) as u64)
    }

    /// Bytes this record takes on disk: where the next record starts, counted from its own
    /// start.
    pub fn disk_len(&self) -> u64 {
        self.layout.disk_len(self.payload_len as usize)
    }

    /// Whether the record is packed (what this build writes).
    pub fn packed(&self) -> bool {
        self.layout == RecordLayout::Packed
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4] = match self.layout {
            RecordLayout::Packed => PACKED_RECORD_VERSION,
            RecordLayout::BlockPadded => FORMAT_VERSION as u8,
        };
        out[5] = self.kind as u8;
        out[6..8].copy_from_slice(&((self.tag >> 32) as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..24].copy_from_slice(&self.lsn.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out[36..40].copy_from_slice(&(self.tag as u32).to_le_bytes());
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderFault> {
        let Some(b) = bytes.get(..RECORD_HEADER_BYTES) else {
            return Err(HeaderFault::Invalid);
        };
        if b.iter().all(|&x| x == 0) {
            return Err(HeaderFault::Zero);
        }
        let layout = match b[4] {
            PACKED_RECORD_VERSION => RecordLayout::Packed,
            v if v == FORMAT_VERSION as u8 => RecordLayout::BlockPadded,
            _ => return Err(HeaderFault::Invalid),
        };
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != RECORD_MAGIC {
            return Err(HeaderFault::Invalid);
        }
        let crc = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[0..32]) {
            return Err(HeaderFault::Invalid);
        }
        let kind = RecordKind::from_u8(b[5]).ok_or(HeaderFault::Invalid)?;
        Ok(Self {
            kind,
            epoch: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            lsn: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            payload_len: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
            payload_crc: u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")),
            layout,
            tag: u64::from(u16::from_le_bytes([b[6], b[7]])) << 32
                | u64::from(u32::from_le_bytes(b[36..40].try_into().expect("4 bytes"))),
        })
    }
}

/// Whether the bytes at the start of `bytes` begin with the record magic (a cheap test before
/// `RecordHeader::decode`, for scans that look for records at every 8-byte boundary).
pub fn starts_with_magic(bytes: &[u8]) -> bool {
    bytes.get(..4).is_some_and(|m| m == RECORD_MAGIC.to_le_bytes())
}

/// How records are laid out one after the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordLayout {
    /// Record version 2, what this build writes: the next record at the next 8-byte boundary.
    Packed,
    /// Record version 1, as builds before packed records wrote them (still read): the next
    /// record at the next block boundary.
    BlockPadded,
}

impl RecordLayout {
    /// Bytes a record of `payload_len` takes on disk in this layout.
    pub fn disk_len(self, payload_len: usize) -> u64 {
        match self {
            Self::Packed => RecordHeader::packed_len(payload_len),
            Self::BlockPadded => RecordHeader::block_padded_len(payload_len),
        }
    }
}

/// What a record's header says besides its payload's length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub layout: RecordLayout,
    pub kind: RecordKind,
    pub epoch: u64,
    pub lsn: u64,
    /// The file's record tag.
    pub tag: u64,
}

/// Encodes a whole record (header, payload written by `fill`, zero padding) into `out`, which
/// must be exactly `meta.layout.disk_len(payload_len)` bytes.
pub fn encode_record(out: &mut [u8], meta: RecordMeta, payload_len: usize, fill: impl FnOnce(&mut [u8])) {
    let RecordMeta { layout, kind, epoch, lsn, tag } = meta;
    debug_assert_eq!(out.len() as u64, layout.disk_len(payload_len));
    let (head, rest) = out.split_at_mut(RECORD_HEADER_BYTES);
    let payload = &mut rest[..payload_len];
    fill(payload);
    let payload_crc = crc32c::crc32c(payload);
    RecordHeader { kind, epoch, lsn, payload_len: payload_len as u32, payload_crc, layout, tag }.encode(head);
    rest[payload_len..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_damage() {
        let len = RecordHeader::packed_len(10) as usize;
        assert_eq!(len, 56, "40 + 10, padded to 8");
        let mut buf = vec![0u8; len];
        let tag = 0xabcd_1234_5678;
        let meta = RecordMeta { layout: RecordLayout::Packed, kind: RecordKind::Batch, epoch: 3, lsn: 77, tag };
        encode_record(&mut buf, meta, 10, |p| p.copy_from_slice(b"0123456789"));
        let h = RecordHeader::decode(&buf).unwrap();
        assert_eq!((h.kind, h.epoch, h.lsn, h.payload_len, h.packed()), (RecordKind::Batch, 3, 77, 10, true));
        // The tag: its high 16 bits at 6, its low 32 at 36.
        assert_eq!((h.tag, &buf[6..8], &buf[36..40]), (tag, &[0xcd, 0xab][..], &[0x78, 0x56, 0x34, 0x12][..]));
        assert_eq!(h.payload_crc, crc32c::crc32c(b"0123456789"));
        assert_eq!(h.disk_len(), 56);
        // The first layout, still read: the next record at the next block boundary.
        let mut old = vec![0u8; RecordHeader::block_padded_len(10) as usize];
        let meta = RecordMeta { layout: RecordLayout::BlockPadded, tag: 0, ..meta };
        encode_record(&mut old, meta, 10, |p| p.copy_from_slice(b"0123456789"));
        let o = RecordHeader::decode(&old).unwrap();
        assert_eq!((o.packed(), o.disk_len(), o.payload_crc, o.tag), (false, 4096, h.payload_crc, 0));
        assert_eq!(old[4], 1);
        assert!(starts_with_magic(&old) && !starts_with_magic(&old[1..]));
        assert_eq!(RecordHeader::decode(&[0u8; 40]), Err(HeaderFault::Zero));
        buf[17] ^= 1;
        assert_eq!(RecordHeader::decode(&buf), Err(HeaderFault::Invalid));
    }

    #[test]
    fn file_header_roundtrip() {
        let mut block = vec![0u8; 4096];
        let h =
            FileHeader { container: 5, seq: 9, epoch: 2, file_bytes: 1 << 20, min_lsn: 1234, tag: 0x1234_5678_9abc };
        h.encode(&mut block);
        assert_eq!(FileHeader::decode(&block).unwrap(), h);
        assert_eq!(block[8], 5, "files whose records carry a tag");
        // The second layout (2: block-padded records only; 3: packed records; 4: a record may
        // start a block of its own) reads the same, without a tag.
        for version in [2, 3, 4] {
            let mut older = block.clone();
            older[8] = version;
            older[48..60].fill(0);
            let crc = crc32c::crc32c(&older[..48]);
            older[48..52].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(FileHeader::decode(&older).unwrap(), FileHeader { tag: 0, ..h });
        }
        let mut later = block.clone();
        later[8] = 6;
        let crc = crc32c::crc32c(&later[..56]);
        later[56..60].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FileHeader::decode(&later), Err("unsupported log file header version 6".into()));
        for at in [9, 20, 44, 50] {
            let mut bad = block.clone();
            bad[at] ^= 0xff;
            assert_eq!(FileHeader::decode(&bad), Err("file header checksum mismatch".into()), "byte {at}");
        }
    }

    #[test]
    fn first_layout_headers_still_read() {
        // Version 1: the checksum of bytes 0..40 at 40, no `min_lsn`.
        let mut block = vec![0u8; 4096];
        block[0..8].copy_from_slice(FILE_MAGIC);
        block[8..10].copy_from_slice(&1u16.to_le_bytes());
        block[12..16].copy_from_slice(&5u32.to_le_bytes());
        block[16..24].copy_from_slice(&9u64.to_le_bytes());
        block[24..32].copy_from_slice(&2u64.to_le_bytes());
        block[32..40].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let crc = crc32c::crc32c(&block[..40]);
        block[40..44].copy_from_slice(&crc.to_le_bytes());
        let h = FileHeader::decode(&block).unwrap();
        assert_eq!(h, FileHeader { container: 5, seq: 9, epoch: 2, file_bytes: 1 << 20, min_lsn: 0, tag: 0 });
        // A later layout, checksummed as this build would not know it.
        block[8..10].copy_from_slice(&7u16.to_le_bytes());
        let crc = crc32c::crc32c(&block[..40]);
        block[40..44].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FileHeader::decode(&block), Err("unsupported log file header version 7".into()));
    }
}
