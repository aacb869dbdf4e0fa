//! Shared by the engine's glommio tests: a temporary root removed on drop, a container
//! configuration, a filesystem tier-2, the first-open workaround for a new executor, and a
//! whole segment read back.

use sluice_engine::container::core::CoreConfig;
use sluice_engine::container::io::Container;
use sluice_engine::container::mover::Tier2Config;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// A fresh directory under the system's temporary one, removed when dropped.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let root = std::env::temp_dir().join(format!("sluice-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Dir(root)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Container `container` with log files of `file_bytes`, a 64 MiB log budget, no prefill.
pub fn core_cfg(container: u32, file_bytes: u64) -> CoreConfig {
    CoreConfig::small(container, file_bytes)
}

/// A filesystem tier-2 under `root`, with chunks of `chunk_bytes` and a mover that looks
/// every 20 ms.
pub fn tier2(root: &Path, chunk_bytes: u64) -> Tier2Config {
    Tier2Config {
        store: sluice_tier2::open_url(&format!("fs:{}", root.display())).unwrap(),
        chunk_bytes,
        move_bytes_min: 4 << 10,
        interval: Duration::from_millis(20),
    }
}

/// glommio 0.9: the first file an executor opens must not be empty (see shard.rs); opens
/// and reads one under `root`.
pub async fn first_open(root: &Path) {
    let probe = root.join("probe");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    let f = glommio::io::DmaFile::open(&probe).await.unwrap();
    f.read_at_aligned(0, 4096).await.unwrap();
    f.close().await.unwrap();
}

/// Segment `segment`'s bytes up to its length, read in pieces of up to 1 MiB.
#[allow(dead_code)] // Not every test that includes this module reads a segment whole.
pub async fn read_segment(c: &Rc<Container>, segment: &str) -> Vec<u8> {
    let len = c.status(segment).unwrap().length;
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < len {
        let d = c.read(segment, bytes.len() as u64, 1 << 20, Duration::ZERO).await.unwrap();
        assert!(!d.is_empty(), "a read at {} below the length {len} returns data", bytes.len());
        bytes.extend_from_slice(&d.to_bytes());
    }
    // A read may go past the length asked for, into data appended since.
    bytes.truncate(len as usize);
    bytes
}
