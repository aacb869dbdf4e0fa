//! Stable hashes: routing key → point in [0, 1), segment name → container (by the node's
//! placement), container → shard. These functions are part of the protocol: client and server
//! must agree on them forever (they use xxh3-64 with seed 0).

use crate::ids::ContainerId;
use xxhash_rust::xxh3::xxh3_64;

/// Maps a routing key to a point in [0, 1).
pub fn key_point(routing_key: &[u8]) -> f64 {
    // 53 high bits give every representable f64 step in [0, 1).
    (xxh3_64(routing_key) >> 11) as f64 / (1u64 << 53) as f64
}

/// How segments are laid over containers: fixed for the life of a data directory or a
/// cluster (recorded with its container count), announced to clients in `HelloReply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// By a hash of the segment's whole name. Data directories and clusters created before
    /// `Spread` existed keep it: their segments are where it put them.
    Hashed = 1,
    /// A stream's segments on consecutive containers, from a hash of the stream's name: its
    /// first N segments on N different containers (N up to the count), so on every shard
    /// alike. Names that do not end in `/number` are hashed whole.
    Spread = 2,
}

impl Placement {
    pub fn from_u8(v: u8) -> Option<Placement> {
        match v {
            1 => Some(Placement::Hashed),
            2 => Some(Placement::Spread),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name used in data directories and in `sluice cluster status`.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Hashed => "hashed",
            Placement::Spread => "spread",
        }
    }

    pub fn from_name(s: &str) -> Option<Placement> {
        [Placement::Hashed, Placement::Spread].into_iter().find(|p| p.name() == s)
    }
}

/// Container that owns a segment. A transaction's shadow segment (`scope/stream/N#txn.<id>`)
/// is placed like its segment `scope/stream/N`, so both live in one container and a
/// commit's seal, move and delete share its group commits.
pub fn container_of(segment: &str, container_count: u32, placement: Placement) -> ContainerId {
    assert!(container_count > 0, "container count must be positive");
    let base = segment.split_once(crate::txn::TXN_NAME_MARK).map_or(segment, |(s, _)| s);
    // The trailing number is looked for only where it counts (this runs for every append).
    let numbered = match placement {
        Placement::Spread => base.rsplit_once('/').and_then(|(stream, n)| Some((stream, n.parse::<u64>().ok()?))),
        Placement::Hashed => None,
    };
    let slot = match numbered {
        Some((stream, n)) => xxh3_64(stream.as_bytes()).wrapping_add(n),
        None => xxh3_64(base.as_bytes()),
    };
    ContainerId((slot % u64::from(container_count)) as u32)
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
        for p in [Placement::Hashed, Placement::Spread] {
            assert_eq!(container_of("s/t/0", 8, p), container_of("s/t/0", 8, p));
            for c in [3, 8, 64] {
                let shadow = "s/t/7#txn.0000000000000000000000000000abcd";
                assert_eq!(container_of(shadow, c, p), container_of("s/t/7", c, p));
            }
            assert_eq!(Placement::from_u8(p.as_u8()), Some(p));
            assert_eq!(Placement::from_name(p.name()), Some(p));
        }
        // Pinned: data placed by the hash must stay findable.
        assert_eq!(container_of("s/t/0", 8, Placement::Hashed).0, (xxh3_64(b"s/t/0") % 8) as u32);
        assert_eq!(Placement::from_u8(0), None);
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn containers_spread() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[container_of(&format!("s/t/{i}"), 8, Placement::Hashed).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn spread_puts_a_streams_segments_on_distinct_containers_and_alternating_shards() {
        for stream in ["bench/e2e1234", "shop/orders", "a/b"] {
            let cs: Vec<u32> = (0..8).map(|n| container_of(&format!("{stream}/{n}"), 8, Placement::Spread).0).collect();
            let mut distinct = cs.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 8, "{stream}: {cs:?}");
            // Four segments on a 2-shard node: two per shard.
            let on_first = cs[..4].iter().filter(|&&c| shard_of(ContainerId(c), 2) == 0).count();
            assert_eq!(on_first, 2, "{stream}: {cs:?}");
        }
        // Names without a trailing number are hashed whole.
        assert_eq!(container_of("s/x", 8, Placement::Spread), container_of("s/x", 8, Placement::Hashed));
        assert_eq!(container_of("s/t/v2", 8, Placement::Spread), container_of("s/t/v2", 8, Placement::Hashed));
        // Numbers near the top wrap instead of overflowing.
        let _ = container_of(&format!("s/t/{}", u64::MAX), 7, Placement::Spread);
    }
}
