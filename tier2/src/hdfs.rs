//! HDFS chunk store through hdfs-native (a pure-Rust HDFS client on tokio). The client runs
//! on this store's own tokio runtime; callers on any executor await join handles.
//!
//! Mapping: a chunk is a file `<root>/<name>`. `create` creates the file exclusively (with
//! parents); `append` checks the file length equals the offset, opens the file for append,
//! writes, hsyncs (durable on every DataNode of the pipeline) and closes it; `seal` makes the
//! file read-only (mode 0444), and appends to a read-only file fail with `Fenced`. HDFS
//! leases give single-writer appends; the epoch in chunk names is what fences owners.

use crate::{ChunkError, ChunkStore, validate_name};
use bytes::Bytes;
use hdfs_native::{Client, ClientBuilder, HdfsError, WriteOptions};
use std::future::Future;
use std::sync::Arc;

struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Handle to an HDFS chunk store; cheap to clone.
#[derive(Clone)]
pub struct HdfsChunkStore {
    client: Arc<Client>,
    /// Absolute HDFS path of the store's root, without a trailing '/'.
    root: Arc<String>,
    url: Arc<String>,
    rt: Arc<OwnedRuntime>,
}

fn map(name: &str, e: HdfsError) -> ChunkError {
    match e {
        HdfsError::FileNotFound(_) => ChunkError::NotFound(name.to_string()),
        HdfsError::AlreadyExists(_) => ChunkError::AlreadyExists(name.to_string()),
        HdfsError::IOError(e) => ChunkError::Unavailable(format!("{name}: {e}")),
        HdfsError::RPCError(class, msg) | HdfsError::FatalRPCError(class, msg) => {
            if class.contains("FileAlreadyExists") {
                ChunkError::AlreadyExists(name.to_string())
            } else if class.contains("FileNotFound") {
                ChunkError::NotFound(name.to_string())
            } else if class.contains("AccessControl") || class.contains("LeaseExpired") {
                ChunkError::Fenced { name: name.to_string(), reason: format!("{class}: {msg}") }
            } else if class.contains("SafeMode") || class.contains("Standby") {
                ChunkError::Unavailable(format!("{name}: {class}: {msg}"))
            } else {
                ChunkError::Io(format!("{name}: {class}: {msg}"))
            }
        }
        e => ChunkError::Io(format!("{name}: {e}")),
    }
}

impl HdfsChunkStore {
    /// Connects to `hdfs://namenode:port/path` (the path is the store's root directory).
    pub fn open(url: &str) -> Result<Self, ChunkError> {
        let rest = url
            .strip_prefix("hdfs://")
            .ok_or_else(|| ChunkError::Unavailable(format!("{url}: expected hdfs://namenode:port/path")))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(ChunkError::Unavailable(format!("{url}: no namenode address")));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-tier2-hdfs")
            .enable_all()
            .build()
            .map_err(|e| ChunkError::Unavailable(format!("starting the HDFS runtime: {e}")))?;
        let client = {
            let _guard = rt.enter();
            // Fail over fast: the mover retries with its own back-off, and a long stall
            // inside one call would hold a container's mover for minutes.
            let config: std::collections::HashMap<String, String> = [
                ("dfs.client.failover.max.attempts", "3"),
                ("dfs.client.failover.sleep.base.millis", "200"),
                ("dfs.client.failover.sleep.max.millis", "2000"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            ClientBuilder::new()
                .with_url(format!("hdfs://{authority}"))
                .with_config(config)
                .build()
                .map_err(|e| ChunkError::Unavailable(format!("{url}: {e}")))?
        };
        let root = path.trim_end_matches('/').to_string();
        Ok(Self {
            client: Arc::new(client),
            root: Arc::new(root),
            url: Arc::new(url.to_string()),
            rt: Arc::new(OwnedRuntime(Some(rt))),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    /// Runs `f` on the store's runtime.
    async fn run<T, F, Fut>(&self, name: &str, f: F) -> Result<T, ChunkError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>, String, String) -> Fut,
        Fut: Future<Output = Result<T, ChunkError>> + Send + 'static,
    {
        validate_name(name)?;
        let fut = f(self.client.clone(), self.path(name), name.to_string());
        let rt = self.rt.0.as_ref().ok_or_else(|| ChunkError::Unavailable("HDFS store stopped".into()))?;
        rt.spawn(fut).await.map_err(|e| ChunkError::Unavailable(format!("HDFS task failed: {e}")))?
    }
}

impl ChunkStore for HdfsChunkStore {
    async fn create(&self, name: &str) -> Result<(), ChunkError> {
        self.run(name, |c, path, name| async move {
            let opts = WriteOptions { overwrite: false, create_parent: true, ..WriteOptions::default() };
            let mut w = c.create(&path, opts).await.map_err(|e| map(&name, e))?;
            w.close().await.map_err(|e| map(&name, e))
        })
        .await
    }

    async fn append(&self, name: &str, offset: u64, data: Bytes) -> Result<(), ChunkError> {
        self.run(name, move |c, path, name| async move {
            let st = c.get_file_info(&path).await.map_err(|e| map(&name, e))?;
            if st.permission & 0o222 == 0 {
                return Err(ChunkError::Fenced { name, reason: "sealed".into() });
            }
            if st.length as u64 != offset {
                return Err(ChunkError::Fenced {
                    name,
                    reason: format!("append at {offset}, but the chunk has {} bytes", st.length),
                });
            }
            let mut w = c.append(&path).await.map_err(|e| map(&name, e))?;
            w.write_bytes(data).await.map_err(|e| map(&name, e))?;
            w.hsync().await.map_err(|e| map(&name, e))?;
            w.close().await.map_err(|e| map(&name, e))
        })
        .await
    }

    async fn read(&self, name: &str, offset: u64, len: usize) -> Result<Bytes, ChunkError> {
        self.run(name, move |c, path, name| async move {
            let r = c.read(&path).await.map_err(|e| map(&name, e))?;
            let size = r.file_length() as u64;
            let n = size.saturating_sub(offset).min(len as u64) as usize;
            if n == 0 {
                return Ok(Bytes::new());
            }
            r.read_range(offset as usize, n).await.map_err(|e| map(&name, e))
        })
        .await
    }

    async fn seal(&self, name: &str) -> Result<(), ChunkError> {
        self.run(name, |c, path, name| async move { c.set_permission(&path, 0o444).await.map_err(|e| map(&name, e)) })
            .await
    }

    async fn is_sealed(&self, name: &str) -> Result<bool, ChunkError> {
        self.run(name, |c, path, name| async move {
            let st = c.get_file_info(&path).await.map_err(|e| map(&name, e))?;
            Ok(st.permission & 0o222 == 0)
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<(), ChunkError> {
        self.run(name, |c, path, name| async move {
            match c.delete(&path, false).await.map_err(|e| map(&name, e))? {
                true => Ok(()),
                false => Err(ChunkError::NotFound(name)),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ChunkError> {
        // List the deepest directory the prefix names, recursively, and filter.
        let dir = match prefix.rfind('/') {
            Some(i) => format!("{}/{}", self.root, &prefix[..i]),
            None => self.root.to_string(),
        };
        let (client, root, prefix) = (self.client.clone(), self.root.clone(), prefix.to_string());
        let rt = self.rt.0.as_ref().ok_or_else(|| ChunkError::Unavailable("HDFS store stopped".into()))?;
        rt.spawn(async move {
            let listed = match client.list_status(&dir, true).await {
                Ok(l) => l,
                Err(HdfsError::FileNotFound(_)) => return Ok(Vec::new()),
                Err(e) => return Err(map(&dir, e)),
            };
            let mut out: Vec<String> = listed
                .into_iter()
                .filter(|s| !s.isdir)
                .filter_map(|s| s.path.strip_prefix(&format!("{root}/")).map(str::to_string))
                .filter(|n| n.starts_with(&prefix))
                .collect();
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| ChunkError::Unavailable(format!("HDFS task failed: {e}")))?
    }

    async fn size(&self, name: &str) -> Result<u64, ChunkError> {
        self.run(name, |c, path, name| async move {
            Ok(c.get_file_info(&path).await.map_err(|e| map(&name, e))?.length as u64)
        })
        .await
    }

    async fn exists(&self, name: &str) -> Result<bool, ChunkError> {
        self.run(name, |c, path, name| async move {
            match c.get_file_info(&path).await {
                Ok(_) => Ok(true),
                Err(HdfsError::FileNotFound(_)) => Ok(false),
                Err(e) => Err(map(&name, e)),
            }
        })
        .await
    }
}
