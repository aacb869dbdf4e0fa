//! The conformance suite on the filesystem backend (always) and on HDFS (only when
//! `SLUICE_TEST_HDFS_URL` names a cluster; the HDFS backend comes with the tier-2 issue).

use sluice_tier2::fs::FsChunkStore;

#[test]
fn filesystem_backend_conforms() {
    let dir = std::env::temp_dir().join(format!("sluice-tier2-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = FsChunkStore::open(&dir, 2).unwrap();
    let result = futures::executor::block_on(sluice_tier2::conformance::run(&store, "scope/stream"));
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}

#[test]
fn filesystem_backend_reports_unavailable_when_read_only() {
    // Root can write to read-only directories, so this check only means something for
    // other users; as root it is skipped with a message.
    if process_uid() == 0 {
        eprintln!("skipped: running as root, directory permissions do not stop writes");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-tier2-ro-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = FsChunkStore::open(&dir, 1).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = futures::executor::block_on(sluice_tier2::ChunkStore::create(&store, "a/b/0.1.chunk"));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(r, Err(sluice_tier2::ChunkError::Unavailable(_))), "{r:?}");
}

fn process_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0)
}

#[test]
fn hdfs_backend_conforms() {
    match std::env::var("SLUICE_TEST_HDFS_URL") {
        Ok(url) => panic!("SLUICE_TEST_HDFS_URL={url} is set, but the HDFS backend is not built yet (tier-2 issue)"),
        Err(_) => {
            eprintln!("skipped: no HDFS (set SLUICE_TEST_HDFS_URL to run the conformance suite against a cluster)")
        }
    }
}
