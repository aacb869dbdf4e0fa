//! Controller functions over a `MetaStore`: scopes and streams (segments with key ranges,
//! state). The node's request handlers call these and then act on the segments; every
//! record change is a compare-and-swap so concurrent callers never overwrite each other.
//!
//! Keys: `scopes/<scope>` (empty value), `streams/<scope>/<stream>` (rkyv `StreamRecord`).

use crate::names::validate;
use crate::store::{MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::ErrorCode;
use sluice_net::Retention;
use sluice_net::messages::SegmentRange;

/// Lifecycle of a stream. `Creating` and `Sealing` mark work in progress that a retry resumes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    Creating,
    Active,
    Sealing,
    Sealed,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StreamSegment {
    pub number: u64,
    pub key_low: f64,
    pub key_high: f64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StreamRecord {
    pub state: StreamState,
    pub segments: Vec<StreamSegment>,
    pub created_unix_ms: u64,
    pub retention: Retention,
}

impl StreamRecord {
    pub fn ranges(&self) -> Vec<SegmentRange> {
        self.segments
            .iter()
            .map(|s| SegmentRange { number: s.number, key_low: s.key_low, key_high: s.key_high })
            .collect()
    }

    fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing a stream record").to_vec()
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self, ControllerError> {
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes)
            .map_err(|e| ControllerError::Meta(MetaError::Corrupt(format!("{key}: {e}"))))
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ControllerError {
    #[error("no such scope: {0}")]
    NoSuchScope(String),
    #[error("no such stream: {0}")]
    NoSuchStream(String),
    #[error("scope {0} already exists")]
    ScopeExists(String),
    #[error("stream {0} already exists")]
    StreamExists(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("scope {0} still has streams; delete them first")]
    NotEmpty(String),
    #[error("stream {0} is not sealed; seal it before deleting it")]
    NotSealed(String),
    #[error("stream {0} is sealed")]
    Sealed(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl ControllerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ControllerError::NoSuchScope(_) => ErrorCode::NoSuchScope,
            ControllerError::NoSuchStream(_) => ErrorCode::NoSuchStream,
            ControllerError::ScopeExists(_) | ControllerError::StreamExists(_) => ErrorCode::AlreadyExists,
            ControllerError::InvalidName(_) => ErrorCode::InvalidName,
            ControllerError::NotEmpty(_) => ErrorCode::NotEmpty,
            ControllerError::NotSealed(_) => ErrorCode::StreamNotSealed,
            ControllerError::Sealed(_) => ErrorCode::Sealed,
            ControllerError::Invalid(_) => ErrorCode::BadRequest,
            ControllerError::Meta(_) => ErrorCode::Internal,
        }
    }
}

/// Most segments a fixed stream may have.
pub const STREAM_SEGMENTS_MAX: u32 = 1024;

#[derive(Clone)]
pub struct Controller<S: MetaStore> {
    store: S,
}

fn scope_key(scope: &str) -> String {
    format!("scopes/{scope}")
}

fn stream_key(scope: &str, stream: &str) -> String {
    format!("streams/{scope}/{stream}")
}

/// Wall-clock milliseconds since the Unix epoch (for records people read).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl<S: MetaStore> Controller<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub async fn create_scope(&self, scope: &str) -> Result<(), ControllerError> {
        validate("scope", scope).map_err(ControllerError::InvalidName)?;
        match self.store.compare_and_swap(&scope_key(scope), 0, Vec::new()).await {
            Ok(_) => Ok(()),
            Err(MetaError::Conflict { .. }) => Err(ControllerError::ScopeExists(scope.into())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_scopes(&self) -> Result<Vec<String>, ControllerError> {
        Ok(self.store.range("scopes/").await?.into_iter().map(|(k, _)| k["scopes/".len()..].to_string()).collect())
    }

    async fn require_scope(&self, scope: &str) -> Result<(), ControllerError> {
        validate("scope", scope).map_err(ControllerError::InvalidName)?;
        match self.store.get(&scope_key(scope)).await? {
            Some(_) => Ok(()),
            None => Err(ControllerError::NoSuchScope(scope.into())),
        }
    }

    pub async fn delete_scope(&self, scope: &str) -> Result<(), ControllerError> {
        self.require_scope(scope).await?;
        if !self.list_streams(scope).await?.is_empty() {
            return Err(ControllerError::NotEmpty(scope.into()));
        }
        self.store.delete(&scope_key(scope), None).await?;
        Ok(())
    }

    /// Records a new stream in state `Creating`. Returns the record; a stream left in
    /// `Creating` by an interrupted call with the same segment count is returned again so
    /// the caller can finish creating it.
    pub async fn begin_create_stream(
        &self,
        scope: &str,
        stream: &str,
        segments: u32,
        retention: Retention,
    ) -> Result<StreamRecord, ControllerError> {
        self.require_scope(scope).await?;
        validate("stream", stream).map_err(ControllerError::InvalidName)?;
        if segments == 0 || segments > STREAM_SEGMENTS_MAX {
            return Err(ControllerError::Invalid(format!(
                "a stream needs 1 to {STREAM_SEGMENTS_MAX} segments, not {segments}"
            )));
        }
        let n = f64::from(segments);
        let record = StreamRecord {
            state: StreamState::Creating,
            segments: (0..segments)
                .map(|i| StreamSegment {
                    number: u64::from(i),
                    key_low: f64::from(i) / n,
                    key_high: if i + 1 == segments { 1.0 } else { f64::from(i + 1) / n },
                })
                .collect(),
            created_unix_ms: now_ms(),
            retention,
        };
        let key = stream_key(scope, stream);
        match self.store.compare_and_swap(&key, 0, record.encode()).await {
            Ok(_) => Ok(record),
            Err(MetaError::Conflict { .. }) => {
                let (existing, _) = self.get_versioned(scope, stream).await?;
                if existing.state == StreamState::Creating && existing.segments.len() == segments as usize {
                    Ok(existing)
                } else {
                    Err(ControllerError::StreamExists(format!("{scope}/{stream}")))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_versioned(&self, scope: &str, stream: &str) -> Result<(StreamRecord, u64), ControllerError> {
        let key = stream_key(scope, stream);
        let v =
            self.store.get(&key).await?.ok_or_else(|| ControllerError::NoSuchStream(format!("{scope}/{stream}")))?;
        Ok((StreamRecord::decode(&key, &v.value)?, v.version))
    }

    pub async fn get_stream(&self, scope: &str, stream: &str) -> Result<StreamRecord, ControllerError> {
        validate("scope", scope).map_err(ControllerError::InvalidName)?;
        validate("stream", stream).map_err(ControllerError::InvalidName)?;
        Ok(self.get_versioned(scope, stream).await?.0)
    }

    /// Changes a stream's record with `change` (which says whether anything changed, or
    /// refuses), compare-and-swap on the record's version, retried on conflict.
    async fn update_record(
        &self,
        scope: &str,
        stream: &str,
        change: impl Fn(&mut StreamRecord) -> Result<bool, ControllerError>,
    ) -> Result<StreamRecord, ControllerError> {
        loop {
            let (mut record, version) = self.get_versioned(scope, stream).await?;
            if !change(&mut record)? {
                return Ok(record);
            }
            match self.store.compare_and_swap(&stream_key(scope, stream), version, record.encode()).await {
                Ok(_) => return Ok(record),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Moves a stream to `state` (compare-and-swap on the record's version).
    /// Concurrent callers moving the stream to the same state both succeed.
    pub async fn set_state(
        &self,
        scope: &str,
        stream: &str,
        state: StreamState,
    ) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| Ok(std::mem::replace(&mut r.state, state) != state)).await
    }

    /// Changes a stream's retention policy.
    pub async fn set_retention(
        &self,
        scope: &str,
        stream: &str,
        retention: Retention,
    ) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| {
            if r.state == StreamState::Creating {
                return Err(ControllerError::NoSuchStream(format!("{scope}/{stream} (still being created)")));
            }
            r.retention = retention;
            Ok(true)
        })
        .await
    }

    pub async fn list_streams(&self, scope: &str) -> Result<Vec<String>, ControllerError> {
        let prefix = format!("streams/{scope}/");
        Ok(self.store.range(&prefix).await?.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect())
    }

    /// Removes a sealed stream's record (its segments must be gone already).
    pub async fn delete_stream_record(&self, scope: &str, stream: &str) -> Result<(), ControllerError> {
        let (record, version) = self.get_versioned(scope, stream).await?;
        if record.state != StreamState::Sealed {
            return Err(ControllerError::NotSealed(format!("{scope}/{stream}")));
        }
        self.store.delete(&stream_key(scope, stream), Some(version)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;
    use futures::executor::block_on;

    #[test]
    fn scope_and_stream_lifecycle() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            assert!(matches!(
                c.begin_create_stream("s", "t", 2, Retention::None).await,
                Err(ControllerError::NoSuchScope(_))
            ));
            c.create_scope("s").await.unwrap();
            assert!(matches!(c.create_scope("s").await, Err(ControllerError::ScopeExists(_))));
            assert!(matches!(c.create_scope("bad/name").await, Err(ControllerError::InvalidName(_))));
            let r = c.begin_create_stream("s", "t", 3, Retention::None).await.unwrap();
            assert_eq!(r.segments.len(), 3);
            assert_eq!(r.segments[2].key_high, 1.0);
            // Resuming an interrupted create is allowed; a different one is not.
            c.begin_create_stream("s", "t", 3, Retention::None).await.unwrap();
            assert!(matches!(
                c.begin_create_stream("s", "t", 4, Retention::None).await,
                Err(ControllerError::StreamExists(_))
            ));
            c.set_state("s", "t", StreamState::Active).await.unwrap();
            assert!(matches!(
                c.begin_create_stream("s", "t", 3, Retention::None).await,
                Err(ControllerError::StreamExists(_))
            ));
            assert!(matches!(c.delete_scope("s").await, Err(ControllerError::NotEmpty(_))));
            assert!(matches!(c.delete_stream_record("s", "t").await, Err(ControllerError::NotSealed(_))));
            c.set_state("s", "t", StreamState::Sealed).await.unwrap();
            c.delete_stream_record("s", "t").await.unwrap();
            c.delete_scope("s").await.unwrap();
            assert!(c.list_scopes().await.unwrap().is_empty());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
