//! Transactions on the wire: their states, the names of their shadow segments, the framing
//! of events inside a shadow segment, and the writer ids a commit appends with.
//!
//! A transaction writes each event into the shadow segment of the segment that owned its
//! routing key in the transaction's epoch, as a normal framed event whose payload starts with
//! the key's point (f64, little endian) so a commit can route it again when the stream scaled
//! since. Commit appends each shadow's events, points stripped, to their segment in one
//! append per target segment, with a writer id derived from the transaction, the shadow and
//! the segment the events come from: a repeated commit step is answered as a duplicate.

use rkyv::{Archive, Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

/// Most bytes one shadow segment may hold (a commit moves a shadow in one append).
pub const TXN_SEGMENT_BYTES_MAX: u64 = 8 << 20;
/// Bytes a shadow event carries before the user's payload (the routing-key point).
pub const TXN_POINT_BYTES: usize = 8;
/// Shortest and longest transaction lease.
pub const TXN_LEASE_MS_MIN: u64 = 100;
pub const TXN_LEASE_MS_MAX: u64 = 24 * 3600 * 1000;

/// Where a transaction is in its life.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnState {
    /// Takes writes; aborts when its lease runs out.
    Open,
    /// Commit decided: its events are being moved into the stream (finished after any crash).
    Committing,
    /// Every event is in the stream.
    Committed,
    /// Abort decided: its shadow segments are being deleted.
    Aborting,
    Aborted,
}

impl TxnState {
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Open => "open",
            TxnState::Committing => "committing",
            TxnState::Committed => "committed",
            TxnState::Aborting => "aborting",
            TxnState::Aborted => "aborted",
        }
    }

    /// Committed or aborted: nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, TxnState::Committed | TxnState::Aborted)
    }
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A transaction id as people read it: 32 hex digits.
pub fn txn_id_text(id: u128) -> String {
    format!("{id:032x}")
}

/// Parses 32 (or fewer) hex digits.
pub fn parse_txn_id(s: &str) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|&v| v != 0)
}

/// Marker between a segment's name and a transaction id in a shadow segment's name.
pub const TXN_NAME_MARK: &str = "#txn.";

/// Name of transaction `id`'s shadow of segment `number`: `scope/stream/N#txn.<id>`.
pub fn shadow_segment_name(scope: &str, stream: &str, number: u64, id: u128) -> String {
    format!("{scope}/{stream}/{number}{TXN_NAME_MARK}{}", txn_id_text(id))
}

/// Whether a segment name is a transaction's shadow segment.
pub fn is_shadow_segment(name: &str) -> bool {
    name.contains(TXN_NAME_MARK)
}

/// Writer id a commit appends with: transaction `id`'s events from shadow `shadow_of`
/// arriving at a segment from `from` (the shadow itself, or a sealed segment they passed
/// through). Never zero.
pub fn merge_writer_id(id: u128, shadow_of: u64, from: Option<u64>) -> u128 {
    let mut buf = [0u8; 16 + 8 + 9];
    buf[..16].copy_from_slice(&id.to_le_bytes());
    buf[16..24].copy_from_slice(&shadow_of.to_le_bytes());
    if let Some(f) = from {
        buf[24] = 1;
        buf[25..].copy_from_slice(&f.to_le_bytes());
    }
    xxh3_128(&buf).max(1)
}

/// A shadow event's payload: the key point, then the user's bytes.
pub fn shadow_payload(point: f64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TXN_POINT_BYTES + payload.len());
    out.extend_from_slice(&point.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a shadow event's payload into its key point and the user's bytes.
pub fn split_shadow_payload(p: &[u8]) -> Option<(f64, &[u8])> {
    if p.len() < TXN_POINT_BYTES {
        return None;
    }
    let point = f64::from_le_bytes(p[..TXN_POINT_BYTES].try_into().expect("8 bytes"));
    (0.0..1.0).contains(&point).then_some((point, &p[TXN_POINT_BYTES..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_payloads_round_trip() {
        let id = 0xfeed_u128 << 64 | 7;
        let name = shadow_segment_name("s", "t", 3, id);
        assert_eq!(name, "s/t/3#txn.000000000000feed0000000000000007");
        assert!(is_shadow_segment(&name) && !is_shadow_segment("s/t/3"));
        assert_eq!(parse_txn_id(&txn_id_text(id)), Some(id));
        assert_eq!(parse_txn_id("zz"), None);
        assert_eq!(parse_txn_id("0"), None);
        let p = shadow_payload(0.25, b"abc");
        assert_eq!(split_shadow_payload(&p), Some((0.25, &b"abc"[..])));
        assert_eq!(split_shadow_payload(&shadow_payload(1.5, b"")), None);
        assert_eq!(split_shadow_payload(b"short"), None);
        let w = [merge_writer_id(id, 3, None), merge_writer_id(id, 3, Some(4)), merge_writer_id(id, 4, None)];
        assert!(w.iter().all(|&x| x != 0));
        assert!(w[0] != w[1] && w[0] != w[2] && w[1] != w[2]);
        assert_eq!(w[1], merge_writer_id(id, 3, Some(4)));
    }
}
