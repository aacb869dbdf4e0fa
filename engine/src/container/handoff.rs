//! Container hand-off through tier-2 (cluster mode) and the tier-2 side of epoch fencing.
//!
//! Objects under `.sluice/containers/<container:05>/` (docs/FORMAT.md, "Container objects";
//! `.sluice` cannot collide with a scope, whose names never start with '.'):
//! - `<epoch:010>.owner`: empty; created by an owner when it starts serving the container at
//!   `epoch`. A mover that finds an owner or hand-off object of a newer epoch stops its
//!   container at once (it was deposed), so a node that lost its lease stops writing to
//!   tier-2 even if it never hears from etcd again.
//! - `<epoch:010>.handoff`: the container's metadata (every segment's length, start
//!   offset, seal, writer event numbers, tier-2 chunks, uncollected garbage) written by the
//!   owner at `epoch` after all its data is in tier-2; the next owner starts from it.
//!
//! Hand-off layout: `magic u32 "SLHO" | version u16 | reserved u16 | container u32 |
//! epoch u64 | payload_len u32 | crc32c(payload) u32 | payload` (a `CheckpointState`
//! archive), little-endian.

use crate::log::checkpoint::CheckpointState;
use bytes::Bytes;
use sluice_tier2::{ChunkError, DynStore};

const MAGIC: u32 = u32::from_le_bytes(*b"SLHO");
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 28;

/// Directory of a container's objects.
pub fn container_dir(container: u32) -> String {
    format!(".sluice/containers/{container:05}")
}

fn object(container: u32, epoch: u64, kind: &str) -> String {
    format!("{}/{epoch:010}.{kind}", container_dir(container))
}

/// Parses `<epoch>.<kind>`.
fn parse(name: &str) -> Option<(u64, &str)> {
    let file = name.rsplit('/').next()?;
    let (epoch, kind) = file.split_once('.')?;
    (epoch.len() == 10).then_some(())?;
    Some((epoch.parse().ok()?, kind))
}

pub fn encode(container: u32, epoch: u64, ck: &CheckpointState) -> Vec<u8> {
    let payload = ck.encode();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&container.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn decode(container: u32, bytes: &[u8]) -> Result<(u64, CheckpointState), String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!("hand-off of {} bytes is shorter than its header", bytes.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != MAGIC {
        return Err("not a hand-off (bad magic)".into());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(format!("hand-off version {version} is not supported (this build reads {VERSION})"));
    }
    if u32_at(8) != container {
        return Err(format!("hand-off of container {} found under container {container}", u32_at(8)));
    }
    let epoch = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let len = u32_at(20) as usize;
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len).ok_or("hand-off is cut short")?;
    if crc32c::crc32c(payload) != u32_at(24) {
        return Err("hand-off checksum mismatch".into());
    }
    Ok((epoch, CheckpointState::decode(payload)?))
}

fn t2(e: ChunkError) -> String {
    e.to_string()
}

/// The container's objects: (epoch, kind, name).
async fn objects(store: &DynStore, container: u32) -> Result<Vec<(u64, String, String)>, String> {
    let listed = store.list(&format!("{}/", container_dir(container))).await.map_err(t2)?;
    Ok(listed.into_iter().filter_map(|n| parse(&n).map(|(e, k)| (e, k.to_string(), n.clone()))).collect())
}

/// Fails if an owner newer than `epoch` announced itself among `objects`.
fn check_newest(objects: &[(u64, String, String)], container: u32, epoch: u64) -> Result<(), String> {
    match objects.iter().map(|o| o.0).max().filter(|e| *e > epoch) {
        Some(newer) => {
            Err(format!("fenced: container {container} has an owner at epoch {newer}; this node has {epoch}"))
        }
        None => Ok(()),
    }
}

/// The newest epoch with an owner or hand-off object, if any.
pub async fn newest_epoch(store: &DynStore, container: u32) -> Result<Option<u64>, String> {
    Ok(objects(store, container).await?.iter().map(|o| o.0).max())
}

/// Deletes the objects of `kind` older than `epoch` (best effort: leftovers are ignored).
async fn delete_older(store: &DynStore, objects: &[(u64, String, String)], kind: &str, epoch: u64) {
    for (_, _, name) in objects.iter().filter(|(e, k, _)| k == kind && *e < epoch) {
        let _ = store.delete(name).await;
    }
}

/// Announces the owner at `epoch` (and forgets older announcements). Fails if a newer
/// owner already announced itself.
pub async fn claim(store: &DynStore, container: u32, epoch: u64) -> Result<(), String> {
    let existing = objects(store, container).await?;
    check_newest(&existing, container, epoch)?;
    match store.create(&object(container, epoch, "owner")).await {
        Ok(()) | Err(ChunkError::AlreadyExists(_)) => {}
        Err(e) => return Err(t2(e)),
    }
    delete_older(store, &existing, "owner", epoch).await;
    Ok(())
}

/// Writes the hand-off of `container` at `epoch`, then deletes older hand-offs.
pub async fn write(store: &DynStore, container: u32, epoch: u64, ck: &CheckpointState) -> Result<(), String> {
    let existing = objects(store, container).await?;
    check_newest(&existing, container, epoch)?;
    let name = object(container, epoch, "handoff");
    // A hand-off retried after a failure starts over.
    match store.delete(&name).await {
        Ok(()) | Err(ChunkError::NotFound(_)) => {}
        Err(e) => return Err(t2(e)),
    }
    store.create(&name).await.map_err(t2)?;
    store.append(&name, 0, Bytes::from(encode(container, epoch, ck))).await.map_err(t2)?;
    store.seal(&name).await.map_err(t2)?;
    delete_older(store, &existing, "handoff", epoch).await;
    Ok(())
}

/// The newest hand-off below `epoch` (the one the owner at `epoch` starts from).
pub async fn read_latest(
    store: &DynStore,
    container: u32,
    epoch: u64,
) -> Result<Option<(u64, CheckpointState)>, String> {
    let Some((_, _, name)) = objects(store, container)
        .await?
        .into_iter()
        .filter(|(e, k, _)| k == "handoff" && *e < epoch)
        .max_by_key(|o| o.0)
    else {
        return Ok(None);
    };
    let size = store.size(&name).await.map_err(t2)?;
    let bytes = store.read(&name, 0, size as usize).await.map_err(t2)?;
    decode(container, &bytes).map(Some).map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::checkpoint::SegmentCheckpoint;

    #[test]
    fn round_trip_and_damage() {
        let ck = CheckpointState {
            container: 3,
            epoch: 9,
            next_segment_id: 2,
            segments: vec![SegmentCheckpoint {
                id: 1,
                name: "s/t/0".into(),
                start_offset: 0,
                length: 100,
                sealed: false,
                writers: vec![(7, 12)],
                files: vec![],
                tier2_end: 100,
                chunks: vec![(0, 9, 100, 1)],
                chunks_closed: false,
            }],
            garbage: vec![],
            creations_recorded: true,
        };
        let bytes = encode(3, 9, &ck);
        assert_eq!(decode(3, &bytes).unwrap(), (9, ck));
        assert!(decode(4, &bytes).unwrap_err().contains("container 3"));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode(3, &bad).unwrap_err().contains("checksum"));
        assert!(decode(3, &bytes[..bytes.len() - 1]).unwrap_err().contains("short"));
        assert_eq!(parse(".sluice/containers/00003/0000000009.handoff"), Some((9, "handoff")));
        assert_eq!(parse("x/12.owner"), None);
    }
}
