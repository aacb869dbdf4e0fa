//! Container metadata checkpoints: the durable state of every segment, written as the first
//! record of every log file so recovery replays only the newest file. Encoded with rkyv and
//! validated (bytecheck) when read back.
//!
//! Layouts: the current one is tagged (`SLCK`, version 3) and keeps each segment's tier-2
//! chunks as runs, and whether the container records chunk creations. Older layouts are
//! still read, so a data directory written by an older build opens as it was: version 2
//! (the same without the creations flag) and the first layout (untagged, every chunk
//! listed).

use rkyv::{Archive, Deserialize, Serialize};

/// Prefix of a checkpoint of the current layout.
const TAG: &[u8; 8] = b"SLCK\x03\0\0\0";
/// Prefix of a checkpoint of the second layout.
const TAG_V2: &[u8; 8] = b"SLCK\x02\0\0\0";

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CheckpointState {
    pub container: u32,
    pub epoch: u64,
    pub next_segment_id: u64,
    pub segments: Vec<SegmentCheckpoint>,
    /// Tier-2 chunks of truncated or deleted segments not yet deleted from tier-2.
    pub garbage: Vec<String>,
    /// Every tier-2 chunk of the container is named by its metadata, and every chunk is
    /// recorded before it is created (`LogEntry::CreationsRecorded`): a restart need not
    /// list tier-2 for partial uploads.
    pub creations_recorded: bool,
}

/// The second layout (tagged version 2), read only: no `creations_recorded`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CheckpointStateV2 {
    pub container: u32,
    pub epoch: u64,
    pub next_segment_id: u64,
    pub segments: Vec<SegmentCheckpoint>,
    pub garbage: Vec<String>,
}

impl From<CheckpointStateV2> for CheckpointState {
    fn from(v: CheckpointStateV2) -> Self {
        Self {
            container: v.container,
            epoch: v.epoch,
            next_segment_id: v.next_segment_id,
            segments: v.segments,
            garbage: v.garbage,
            // Written by a build that created chunks before recording them.
            creations_recorded: false,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SegmentCheckpoint {
    pub id: u64,
    pub name: String,
    pub start_offset: u64,
    pub length: u64,
    pub sealed: bool,
    /// (writer id, last durable event number)
    pub writers: Vec<(u128, u64)>,
    /// (first segment offset with data in the file, file sequence), ascending.
    pub files: Vec<(u64, u64)>,
    /// Segment bytes below this offset are in tier-2.
    pub tier2_end: u64,
    /// Tier-2 chunks as runs (start offset, owner epoch, bytes per chunk, chunks), ascending:
    /// `count` chunks of `len` bytes, each starting where the one before ends.
    pub chunks: Vec<(u64, u64, u64, u64)>,
    /// Sealed, and all its bytes are in closed chunks (nothing to move or reconcile).
    pub chunks_closed: bool,
}

/// The first layout, read only.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct LegacyCheckpointState {
    pub container: u32,
    pub epoch: u64,
    pub next_segment_id: u64,
    pub segments: Vec<LegacySegmentCheckpoint>,
    pub garbage: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LegacySegmentCheckpoint {
    pub id: u64,
    pub name: String,
    pub start_offset: u64,
    pub length: u64,
    pub sealed: bool,
    pub writers: Vec<(u128, u64)>,
    pub files: Vec<(u64, u64)>,
    pub tier2_end: u64,
    /// Every chunk: (start offset, owner epoch, bytes).
    pub chunks: Vec<(u64, u64, u64)>,
}

impl From<LegacyCheckpointState> for CheckpointState {
    fn from(l: LegacyCheckpointState) -> Self {
        let segments = l
            .segments
            .into_iter()
            .map(|s| SegmentCheckpoint {
                id: s.id,
                name: s.name,
                start_offset: s.start_offset,
                length: s.length,
                sealed: s.sealed,
                writers: s.writers,
                files: s.files,
                tier2_end: s.tier2_end,
                // One run per chunk; the reader joins them.
                chunks: s.chunks.into_iter().map(|(start, epoch, len)| (start, epoch, len, 1)).collect(),
                chunks_closed: false,
            })
            .collect();
        Self {
            container: l.container,
            epoch: l.epoch,
            next_segment_id: l.next_segment_id,
            segments,
            garbage: l.garbage,
            creations_recorded: false,
        }
    }
}

impl CheckpointState {
    pub fn encode(&self) -> Vec<u8> {
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing a checkpoint");
        let mut out = Vec::with_capacity(TAG.len() + body.len());
        out.extend_from_slice(TAG);
        out.extend_from_slice(&body);
        out
    }

    /// Reads any layout.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if let Some(body) = bytes.strip_prefix(TAG)
            && let Ok(ck) = rkyv::from_bytes::<Self, rkyv::rancor::Error>(body)
        {
            return Ok(ck);
        }
        if let Some(body) = bytes.strip_prefix(TAG_V2)
            && let Ok(ck) = rkyv::from_bytes::<CheckpointStateV2, rkyv::rancor::Error>(body)
        {
            return Ok(ck.into());
        }
        rkyv::from_bytes::<LegacyCheckpointState, rkyv::rancor::Error>(bytes)
            .map(Self::from)
            .map_err(|e| format!("invalid checkpoint: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy() -> LegacyCheckpointState {
        LegacyCheckpointState {
            container: 3,
            epoch: 7,
            next_segment_id: 9,
            segments: vec![LegacySegmentCheckpoint {
                id: 4,
                name: "s/t/0".into(),
                start_offset: 10,
                length: 300,
                sealed: false,
                writers: vec![(5, 6)],
                files: vec![(0, 1)],
                tier2_end: 250,
                chunks: vec![(0, 1, 100), (100, 1, 100), (200, 2, 50)],
            }],
            garbage: vec!["x".into()],
        }
    }

    /// Checkpoints of the older layouts read as the same state (creations not recorded);
    /// the current one round-trips.
    #[test]
    fn every_layout_reads() {
        let old = rkyv::to_bytes::<rkyv::rancor::Error>(&legacy()).unwrap();
        let ck = CheckpointState::decode(&old).unwrap();
        assert_eq!(ck.segments[0].chunks, vec![(0, 1, 100, 1), (100, 1, 100, 1), (200, 2, 50, 1)]);
        assert_eq!((ck.container, ck.epoch, ck.next_segment_id, ck.garbage.len()), (3, 7, 9, 1));
        assert_eq!(ck.segments[0].writers, vec![(5, 6)]);
        assert!(!ck.creations_recorded);
        let v2 = CheckpointStateV2 {
            container: ck.container,
            epoch: ck.epoch,
            next_segment_id: ck.next_segment_id,
            segments: ck.segments.clone(),
            garbage: ck.garbage.clone(),
        };
        let mut v2_bytes = TAG_V2.to_vec();
        v2_bytes.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(&v2).unwrap());
        assert_eq!(CheckpointState::decode(&v2_bytes).unwrap(), ck);
        let now = CheckpointState { creations_recorded: true, ..ck };
        assert_eq!(CheckpointState::decode(&now.encode()).unwrap(), now);
        assert!(CheckpointState::decode(b"SLCK\x03\0\0\0garbage").is_err());
        assert!(CheckpointState::decode(b"SLCK\x02\0\0\0garbage").is_err());
        assert!(CheckpointState::decode(&old[..old.len() - 3]).is_err());
    }

    /// A checkpoint damaged at random (bytes changed, cut short): it decodes or fails,
    /// never a panic. Seeded.
    #[test]
    fn damaged_checkpoints_decode_or_fail_cleanly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(44);
        let valid =
            CheckpointState::decode(&rkyv::to_bytes::<rkyv::rancor::Error>(&legacy()).unwrap()).unwrap().encode();
        for _ in 0..20_000 {
            let mut b = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            if rng.random_bool(0.2) {
                b.truncate(rng.random_range(0..=b.len()));
            }
            let _ = CheckpointState::decode(&b);
        }
    }
}
