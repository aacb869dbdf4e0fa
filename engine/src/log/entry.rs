//! Entries inside a batch record: what a container did, in order.

use bytes::Bytes;

const CREATE: u8 = 1;
const APPEND: u8 = 2;
const SEAL: u8 = 3;
const TRUNCATE: u8 = 4;
const DELETE: u8 = 5;
const CHUNK: u8 = 6;
const MERGE: u8 = 7;
const CHUNKS_CLOSED: u8 = 8;
const CREATIONS_RECORDED: u8 = 9;
const RELOCATE: u8 = 10;

/// Bytes of an append entry before its data.
pub const APPEND_HEADER_BYTES: usize = 1 + 8 + 8 + 16 + 8 + 4;
/// Bytes of a merge entry before its data.
pub const MERGE_HEADER_BYTES: usize = 1 + 8 + 8 + 8 + 4;
/// Bytes of a relocate entry before its data.
pub const RELOCATE_HEADER_BYTES: usize = 1 + 8 + 8 + 4;

/// One operation in the log. Segment ids are local to the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEntry {
    Create {
        segment: u64,
        name: String,
    },
    /// `data` lands at `offset`; `writer` 0 means no idempotent writer.
    Append {
        segment: u64,
        offset: u64,
        writer: u128,
        last_event_number: u64,
        data: Bytes,
    },
    Seal {
        segment: u64,
    },
    Truncate {
        segment: u64,
        offset: u64,
    },
    Delete {
        segment: u64,
    },
    /// Tier-2 chunk `(start, epoch)` of the segment durably holds `len` bytes from `start`
    /// (a new chunk when it is not the segment's last one).
    Chunk {
        segment: u64,
        start: u64,
        epoch: u64,
        len: u64,
    },
    /// A committed transaction's shadow segment `source` moves into `segment`: `data` (its
    /// events) lands at `offset` and `source` is deleted, in one step. Recovery finds both
    /// done or neither.
    Merge {
        segment: u64,
        offset: u64,
        source: u64,
        data: Bytes,
    },
    /// The sealed segment's bytes are all in tier-2, in closed chunks (sealed, with sums):
    /// nothing of it is left to move or to reconcile after a restart.
    ChunksClosed {
        segment: u64,
    },
    /// Container-wide: tier-2 holds no chunk of this container that a `Chunk` entry does not
    /// name (reconciliation listed every segment's chunks and deleted the others), and from
    /// here on every chunk is recorded (a `Chunk` entry of 0 bytes) before it is created; so
    /// restarts need not list tier-2 to find partial uploads.
    CreationsRecorded,
    /// The segment's bytes the log still holds, all of them (`offset` up to its length), copied
    /// here from the older log files that held them: reads of them come from here on, and
    /// those files no longer hold anything of it (so they can be freed without tier-2).
    Relocate {
        segment: u64,
        offset: u64,
        data: Bytes,
    },
}

impl LogEntry {
    /// The segment the entry is about (`None`: container-wide).
    pub fn segment(&self) -> Option<u64> {
        match self {
            LogEntry::Create { segment, .. }
            | LogEntry::Append { segment, .. }
            | LogEntry::Merge { segment, .. }
            | LogEntry::Relocate { segment, .. }
            | LogEntry::Seal { segment }
            | LogEntry::Truncate { segment, .. }
            | LogEntry::Delete { segment }
            | LogEntry::Chunk { segment, .. }
            | LogEntry::ChunksClosed { segment } => Some(*segment),
            LogEntry::CreationsRecorded => None,
        }
    }

    /// Encoded size.
    pub fn encoded_len(&self) -> usize {
        match self {
            LogEntry::Create { name, .. } => 1 + 8 + 2 + name.len(),
            LogEntry::Append { data, .. } => APPEND_HEADER_BYTES + data.len(),
            LogEntry::Seal { .. } | LogEntry::Delete { .. } | LogEntry::ChunksClosed { .. } => 1 + 8,
            LogEntry::Truncate { .. } => 1 + 8 + 8,
            LogEntry::Chunk { .. } => 1 + 8 * 4,
            LogEntry::CreationsRecorded => 1,
            LogEntry::Merge { data, .. } => MERGE_HEADER_BYTES + data.len(),
            LogEntry::Relocate { data, .. } => RELOCATE_HEADER_BYTES + data.len(),
        }
    }

    /// Bytes of the entry before its data (for entries that carry segment data).
    pub fn data_header_len(&self) -> usize {
        match self {
            LogEntry::Merge { .. } => MERGE_HEADER_BYTES,
            LogEntry::Relocate { .. } => RELOCATE_HEADER_BYTES,
            _ => APPEND_HEADER_BYTES,
        }
    }

    /// Encodes into the front of `out`; returns the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut w = Writer { out, pos: 0 };
        match self {
            LogEntry::Create { segment, name } => {
                w.u8(CREATE);
                w.u64(*segment);
                w.u16(name.len() as u16);
                w.bytes(name.as_bytes());
            }
            LogEntry::Append { segment, offset, writer, last_event_number, data } => {
                w.u8(APPEND);
                w.u64(*segment);
                w.u64(*offset);
                w.bytes(&writer.to_le_bytes());
                w.u64(*last_event_number);
                w.u32(data.len() as u32);
                w.bytes(data);
            }
            LogEntry::Seal { segment } => {
                w.u8(SEAL);
                w.u64(*segment);
            }
            LogEntry::Truncate { segment, offset } => {
                w.u8(TRUNCATE);
                w.u64(*segment);
                w.u64(*offset);
            }
            LogEntry::Delete { segment } => {
                w.u8(DELETE);
                w.u64(*segment);
            }
            LogEntry::ChunksClosed { segment } => {
                w.u8(CHUNKS_CLOSED);
                w.u64(*segment);
            }
            LogEntry::CreationsRecorded => w.u8(CREATIONS_RECORDED),
            LogEntry::Chunk { segment, start, epoch, len } => {
                w.u8(CHUNK);
                for v in [*segment, *start, *epoch, *len] {
                    w.u64(v);
                }
            }
            LogEntry::Merge { segment, offset, source, data } => {
                w.u8(MERGE);
                w.u64(*segment);
                w.u64(*offset);
                w.u64(*source);
                w.u32(data.len() as u32);
                w.bytes(data);
            }
            LogEntry::Relocate { segment, offset, data } => {
                w.u8(RELOCATE);
                w.u64(*segment);
                w.u64(*offset);
                w.u32(data.len() as u32);
                w.bytes(data);
            }
        }
        w.pos
    }
}

/// Decodes all entries of a batch payload. `data_base` is the payload's position in the
/// file; each entry comes with the file position of its data (for appends).
pub fn decode_entries(payload: &Bytes, data_base: u64) -> Result<Vec<(LogEntry, u64)>, String> {
    let mut out = Vec::new();
    decode_into(payload, data_base, &mut out)?;
    Ok(out)
}

/// The entries of a payload that fails its checksum, as far as they decode (up to the first
/// undecodable one). Untrusted: for telling an operator what damaged records probably held.
pub fn decode_entries_prefix(payload: &Bytes) -> Vec<LogEntry> {
    let mut out = Vec::new();
    let _ = decode_into(payload, 0, &mut out);
    out.into_iter().map(|(e, _)| e).collect()
}

fn decode_into(payload: &Bytes, data_base: u64, out: &mut Vec<(LogEntry, u64)>) -> Result<(), String> {
    let mut r = Reader { buf: payload, pos: 0 };
    while r.pos < payload.len() {
        let tag = r.u8()?;
        let entry = match tag {
            CREATE => {
                let segment = r.u64()?;
                let len = r.u16()? as usize;
                let name = std::str::from_utf8(r.take(len)?).map_err(|_| "segment name is not UTF-8")?.to_owned();
                LogEntry::Create { segment, name }
            }
            APPEND => {
                let segment = r.u64()?;
                let offset = r.u64()?;
                let writer = u128::from_le_bytes(r.take(16)?.try_into().expect("16 bytes"));
                let last_event_number = r.u64()?;
                let len = r.u32()? as usize;
                let at = r.pos;
                r.take(len)?;
                let data = payload.slice(at..at + len);
                out.push((
                    LogEntry::Append { segment, offset, writer, last_event_number, data },
                    data_base + at as u64,
                ));
                continue;
            }
            MERGE => {
                let (segment, offset, source) = (r.u64()?, r.u64()?, r.u64()?);
                let len = r.u32()? as usize;
                let at = r.pos;
                r.take(len)?;
                let data = payload.slice(at..at + len);
                out.push((LogEntry::Merge { segment, offset, source, data }, data_base + at as u64));
                continue;
            }
            RELOCATE => {
                let (segment, offset) = (r.u64()?, r.u64()?);
                let len = r.u32()? as usize;
                let at = r.pos;
                r.take(len)?;
                let data = payload.slice(at..at + len);
                out.push((LogEntry::Relocate { segment, offset, data }, data_base + at as u64));
                continue;
            }
            SEAL => LogEntry::Seal { segment: r.u64()? },
            TRUNCATE => LogEntry::Truncate { segment: r.u64()?, offset: r.u64()? },
            DELETE => LogEntry::Delete { segment: r.u64()? },
            CHUNK => LogEntry::Chunk { segment: r.u64()?, start: r.u64()?, epoch: r.u64()?, len: r.u64()? },
            CHUNKS_CLOSED => LogEntry::ChunksClosed { segment: r.u64()? },
            CREATIONS_RECORDED => LogEntry::CreationsRecorded,
            t => {
                return Err(format!("unknown entry type {t} at payload byte {}", r.pos - 1));
            }
        };
        out.push((entry, 0));
    }
    Ok(())
}

struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or_else(|| format!("entry cut short at payload byte {}", self.pos))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of every kind.
    fn every_kind() -> Vec<LogEntry> {
        vec![
            LogEntry::Create { segment: 1, name: "s/t/0".into() },
            LogEntry::Append {
                segment: 1,
                offset: 0,
                writer: 99 << 70,
                last_event_number: 5,
                data: Bytes::from_static(b"abc"),
            },
            LogEntry::Seal { segment: 1 },
            LogEntry::Truncate { segment: 1, offset: 2 },
            LogEntry::Delete { segment: 1 },
            LogEntry::Chunk { segment: 1, start: 10, epoch: 3, len: 4096 },
            LogEntry::Merge { segment: 1, offset: 3, source: 2, data: Bytes::from_static(b"defg") },
            LogEntry::ChunksClosed { segment: 1 },
            LogEntry::CreationsRecorded,
            LogEntry::Relocate { segment: 1, offset: 2, data: Bytes::from_static(b"bcdefg") },
        ]
    }

    fn encoded(entries: &[LogEntry]) -> Vec<u8> {
        let total: usize = entries.iter().map(|e| e.encoded_len()).sum();
        let mut buf = vec![0u8; total];
        let mut pos = 0;
        for e in entries {
            pos += e.encode(&mut buf[pos..]);
        }
        assert_eq!(pos, total);
        buf
    }

    #[test]
    fn entries_roundtrip() {
        let entries = every_kind();
        let buf = encoded(&entries);
        let decoded = decode_entries(&Bytes::from(buf), 1000).unwrap();
        assert_eq!(decoded.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(), entries);
        assert_eq!(decoded[1].1, 1000 + 16 + APPEND_HEADER_BYTES as u64);
        let merge_at: usize = entries[..6].iter().map(|e| e.encoded_len()).sum();
        assert_eq!(decoded[6].1, 1000 + (merge_at + MERGE_HEADER_BYTES) as u64);
        assert!(decode_entries(&Bytes::from_static(&[2, 0, 0]), 0).is_err());
        let relocate_at: usize = entries[..9].iter().map(|e| e.encoded_len()).sum();
        assert_eq!(decoded[9].1, 1000 + (relocate_at + RELOCATE_HEADER_BYTES) as u64);
        assert!(decode_entries(&Bytes::from_static(&[10]), 0).is_err());
        assert!(decode_entries(&Bytes::from_static(&[11]), 0).is_err());
    }

    /// A batch payload damaged at random (bytes changed, cut short) or random bytes: its
    /// entries decode or the decoding fails, never a panic. Seeded.
    #[test]
    fn damaged_payloads_decode_or_fail_cleanly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(44);
        let valid = encoded(&every_kind());
        let mut failed = 0;
        for _ in 0..20_000 {
            let mut b = if rng.random_bool(0.8) {
                valid.clone()
            } else {
                (0..rng.random_range(0..200)).map(|_| rng.random()).collect()
            };
            for _ in 0..rng.random_range(1..4) {
                if !b.is_empty() {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
            }
            if rng.random_bool(0.2) {
                b.truncate(rng.random_range(0..=b.len()));
            }
            let b = Bytes::from(b);
            failed += usize::from(decode_entries(&b, 0).is_err());
            decode_entries_prefix(&b);
        }
        assert!(failed > 0);
    }
}
