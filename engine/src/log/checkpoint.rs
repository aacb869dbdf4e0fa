//! Container metadata checkpoints: the durable state of every segment, written as the first
//! record of every log file so recovery replays only the newest file. Encoded with rkyv and
//! validated (bytecheck) when read back.

use rkyv::{Archive, Deserialize, Serialize};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CheckpointState {
    pub container: u32,
    pub epoch: u64,
    pub next_segment_id: u64,
    pub segments: Vec<SegmentCheckpoint>,
    /// Tier-2 chunks of truncated or deleted segments not yet deleted from tier-2.
    pub garbage: Vec<String>,
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
    /// Tier-2 chunks (start offset, owner epoch, bytes), ascending.
    pub chunks: Vec<(u64, u64, u64)>,
}

impl CheckpointState {
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing a checkpoint").to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes).map_err(|e| format!("invalid checkpoint: {e}"))
    }
}
