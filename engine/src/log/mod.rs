//! The container log on disk: file and record formats (`format`), entries inside batch
//! records (`entry`), checkpoints (`checkpoint`) and the scanner that recovery, the read
//! path and `sluice log dump` share (`scan`). All of it is pure: bytes in, values out.
//! docs/FORMAT.md is the byte-level specification of what these modules read and write.

pub mod checkpoint;
pub mod entry;
pub mod format;
pub mod scan;

/// File name of log file `seq` inside a container directory.
pub fn file_name(seq: u64) -> String {
    format!("{seq:016x}.log")
}

/// Parses a log file name back to its sequence number.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}
