//! Where segment data lives on tier-2, so other tools can read a stream straight from the
//! filesystem or HDFS (docs/FORMAT.md, "Tier-2 layout"):
//!
//! `<segment dir>/<start offset, 20 digits>.e<container epoch, 10 digits>.chunk`
//!
//! The segment directory is the segment's qualified name (`scope/stream/number`) when its
//! components are valid chunk-name components, else `_raw/<hex of the name>`. A chunk holds
//! the segment's bytes from its start offset on. The directory listing is the index: sorted
//! by start offset, and among chunks with the same start the highest epoch wins; a chunk's
//! valid bytes end where the next chunk starts (bytes past that point are copies of the same
//! segment bytes left by an interrupted upload). The epoch in the name is the owner's fencing
//! token: an owner only ever creates chunks under its own epoch, so a deposed owner can never
//! write into a newer owner's chunks.

use crate::validate_name;

/// Directory of a segment's chunks.
pub fn segment_dir(segment: &str) -> String {
    if validate_name(segment).is_ok() && !segment.starts_with("_raw/") {
        segment.to_string()
    } else {
        let hex: String = segment.bytes().map(|b| format!("{b:02x}")).collect();
        format!("_raw/{hex}")
    }
}

/// Name of the chunk of `segment` starting at `start`, created by an owner at `epoch`.
pub fn chunk_name(segment: &str, start: u64, epoch: u64) -> String {
    format!("{}/{start:020}.e{epoch:010}.chunk", segment_dir(segment))
}

/// Parses the last component of a chunk name into (start offset, epoch).
pub fn parse_chunk_file(file: &str) -> Option<(u64, u64)> {
    let rest = file.strip_suffix(".chunk")?;
    let (start, epoch) = rest.split_once(".e")?;
    if start.len() != 20 || epoch.len() != 10 {
        return None;
    }
    Some((start.parse().ok()?, epoch.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(chunk_name("s/t/3", 42, 7), "s/t/3/00000000000000000042.e0000000007.chunk");
        assert_eq!(parse_chunk_file("00000000000000000042.e0000000007.chunk"), Some((42, 7)));
        assert_eq!(parse_chunk_file("42.e7.chunk"), None);
        assert_eq!(segment_dir("a b"), "_raw/612062");
        assert_eq!(segment_dir("_raw/x"), "_raw/5f7261772f78");
        let n = chunk_name("a b", 0, 1);
        assert!(validate_name(&n).is_ok(), "{n}");
    }
}
