//! Controller functions over a `MetaStore`: scopes and streams (segments with key ranges,
//! state). The node's request handlers call these and then act on the segments; every
//! record change is a compare-and-swap so concurrent callers never overwrite each other.
//!
//! Keys: `scopes/<scope>` (empty value), `streams/<scope>/<stream>` (`StreamRecord`: the
//! stream as it is now, its current epoch included), `epochs/<scope>/<stream>/<epoch, 20
//! digits>` (rkyv `EpochRecord`: one per epoch, written with the change that makes it current
//! and never changed after), `txns/<scope>/<stream>/<id>` (rkyv `TxnRecord`, see `txns`),
//! `subscribers/<scope>/<stream>/<group>` (rkyv `SubscriberRecord`, see `subscribers`).
//!
//! A stream's history is its epoch records, read a page at a time (`history_page`), so the
//! stream record's size depends on the stream's width only, not on how often it scaled.
//! Records of the first layout (the whole history inside the stream record) are moved to
//! this one the first time they are read.
//!
//! Scaling is three record changes around the segment work, so a crash anywhere leaves a
//! record a retry finishes: `begin_scale` records the pending scale (new segment numbers,
//! next epoch); the node creates the new segments; `commit_scale` makes them current and
//! writes the new epoch's record (one transaction); the node seals the replaced segments;
//! `end_scale` clears the pending scale. A stream with a pending scale takes no other scale.

/// A record kept (rkyv) under one metadata key and changed by compare-and-swap.
trait Record: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, ControllerError>;
}

macro_rules! record {
    ($t:ty, $what:literal) => {
        impl $crate::controller::Record for $t {
            fn encode(&self) -> Vec<u8> {
                rkyv::to_bytes::<rkyv::rancor::Error>(self).expect(concat!("serializing ", $what)).to_vec()
            }

            fn decode(key: &str, bytes: &[u8]) -> Result<Self, $crate::controller::ControllerError> {
                Ok(decode_record!(Self, key, bytes)?)
            }
        }
    };
}

mod subscribers;
mod txns;

pub use subscribers::SubscriberRecord;
pub use txns::TxnRecord;

use crate::names::validate;
use crate::store::{MetaError, MetaStore, MetaTxn, Versioned};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::ErrorCode;
use sluice_net::messages::{EpochInfo, KeyRange, ListedStream, SegmentHistory, SegmentRange, StreamHistory};
use sluice_net::{Retention, ScalingPolicy};
use std::collections::HashMap;

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

/// A scaling between `begin_scale` and `end_scale`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PendingScale {
    /// The epoch the scaling creates.
    pub epoch: u64,
    /// Segments it replaces, in key order.
    pub seal: Vec<u64>,
    /// Segments it creates, in key order.
    pub create: Vec<StreamSegment>,
    /// The new segments are current (`commit_scale` ran); what is left is sealing.
    pub committed: bool,
}

/// A segment an epoch created.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NewSegment {
    pub number: u64,
    pub key_low: f64,
    pub key_high: f64,
    /// The segments it replaced (sealed by the same epoch, key ranges overlapping).
    pub predecessors: Vec<u64>,
}

/// One epoch of a stream: what it was made of and what made it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub epoch: u64,
    pub created_unix_ms: u64,
    /// Its segments, in key order.
    pub segments: Vec<u64>,
    /// Segments it created (all of them for epoch 0), in key order.
    pub created: Vec<NewSegment>,
    /// Segments of the epoch before that it sealed.
    pub sealed: Vec<u64>,
}

record!(EpochRecord, "an epoch record");

/// A stream as it is now. Its history (every epoch) lives in `EpochRecord`s.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StreamRecord {
    pub state: StreamState,
    /// The current epoch's segments, in key order.
    pub segments: Vec<StreamSegment>,
    pub created_unix_ms: u64,
    pub retention: Retention,
    pub scaling: ScalingPolicy,
    /// The current epoch (also under its own key).
    pub current: EpochRecord,
    /// Number the next new segment gets.
    pub next_segment: u64,
    pub scale: Option<PendingScale>,
}

/// What a stream record's value starts with (then the rkyv archive); a value without it is
/// a record of the first layout (`LegacyStreamRecord`).
const STREAM_RECORD_TAG: [u8; 8] = *b"SSR\x02\0\0\0\0";

impl StreamRecord {
    pub fn ranges(&self) -> Vec<SegmentRange> {
        self.segments
            .iter()
            .map(|s| SegmentRange { number: s.number, key_low: s.key_low, key_high: s.key_high })
            .collect()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.current.epoch
    }
}

impl Record for StreamRecord {
    fn encode(&self) -> Vec<u8> {
        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing a stream record");
        [&STREAM_RECORD_TAG[..], &archive].concat()
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self, ControllerError> {
        match bytes.strip_prefix(&STREAM_RECORD_TAG[..]) {
            Some(archive) => Ok(decode_record!(Self, key, archive)?),
            None => Err(MetaError::Corrupt(format!("{key}: a stream record of the first layout")).into()),
        }
    }
}

/// A stream record of the first layout: the whole history inside (it grew with every
/// scaling). Read only to be moved to the current layout.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct LegacyStreamRecord {
    state: StreamState,
    segments: Vec<StreamSegment>,
    created_unix_ms: u64,
    retention: Retention,
    scaling: ScalingPolicy,
    epochs: Vec<EpochInfo>,
    history: Vec<SegmentHistory>,
    next_segment: u64,
    scale: Option<PendingScale>,
}

record!(LegacyStreamRecord, "a stream record of the first layout");

impl LegacyStreamRecord {
    /// The record in the current layout, and its epoch records.
    fn migrate(self) -> (StreamRecord, Vec<EpochRecord>) {
        let epochs: Vec<EpochRecord> = self
            .epochs
            .iter()
            .map(|e| EpochRecord {
                epoch: e.epoch,
                created_unix_ms: e.created_unix_ms,
                segments: e.segments.clone(),
                created: self
                    .history
                    .iter()
                    .filter(|h| h.created_epoch == e.epoch)
                    .map(|h| NewSegment {
                        number: h.number,
                        key_low: h.key_low,
                        key_high: h.key_high,
                        predecessors: h.predecessors.clone(),
                    })
                    .collect(),
                sealed: self.history.iter().filter(|h| h.sealed_epoch == Some(e.epoch)).map(|h| h.number).collect(),
            })
            .collect();
        let current = epochs.last().cloned().unwrap_or(EpochRecord {
            epoch: 0,
            created_unix_ms: self.created_unix_ms,
            segments: self.segments.iter().map(|s| s.number).collect(),
            created: Vec::new(),
            sealed: Vec::new(),
        });
        let record = StreamRecord {
            state: self.state,
            segments: self.segments,
            created_unix_ms: self.created_unix_ms,
            retention: self.retention,
            scaling: self.scaling,
            current,
            next_segment: self.next_segment,
            scale: self.scale,
        };
        (record, epochs)
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
    #[error("stream {0} is being scaled; retry when that is done")]
    ScaleInProgress(String),
    #[error("no such transaction: {0}")]
    NoSuchTxn(String),
    #[error("{0}")]
    TxnNotOpen(String),
    #[error("{0}")]
    Busy(String),
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
            ControllerError::ScaleInProgress(_) | ControllerError::Busy(_) => ErrorCode::Conflict,
            ControllerError::NoSuchTxn(_) => ErrorCode::NoSuchTxn,
            ControllerError::TxnNotOpen(_) => ErrorCode::TxnNotOpen,
            ControllerError::Meta(MetaError::NoSpace(_)) => ErrorCode::NoSpace,
            ControllerError::Meta(MetaError::Unavailable(_)) => ErrorCode::MetadataUnavailable,
            ControllerError::Meta(MetaError::TooLarge(_)) => ErrorCode::TooLarge,
            ControllerError::Meta(_) => ErrorCode::Internal,
        }
    }
}

/// Most segments a fixed stream may have.
pub const STREAM_SEGMENTS_MAX: u32 = 1024;

/// A page of names and the next page's cursor (`None`: the last page).
pub type NamesPage = (Vec<String>, Option<String>);

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

fn epochs_prefix(scope: &str, stream: &str) -> String {
    format!("epochs/{scope}/{stream}/")
}

fn epoch_key(scope: &str, stream: &str, epoch: u64) -> String {
    format!("epochs/{scope}/{stream}/{epoch:020}")
}

/// Epoch records read from the store per request while walking a history.
const EPOCHS_PER_READ: usize = 64;
/// A retried scaling is recognised as done while its epoch is one of the last this many
/// (older ones are judged as new requests: their segments are sealed, `Invalid`).
const RETRY_EPOCHS: u64 = 16;
/// Epoch records (or bytes of them) written per transaction when a record is migrated (etcd
/// takes at most 128 operations and 1.5 MiB per transaction by default).
const MIGRATE_OPS_MAX: usize = 64;
const MIGRATE_BYTES_MAX: usize = 512 << 10;

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

    /// One page of `list_scopes`: at most `limit` names after `after` (`""`: from the
    /// first), and the next page's `after` if there is a next page (one more is fetched to
    /// know: a page that ends at the last name has none).
    pub async fn list_scopes_page(&self, after: &str, limit: usize) -> Result<NamesPage, ControllerError> {
        self.names_page("scopes/", after, limit).await
    }

    /// One page of `list_streams` (as `list_scopes_page`).
    pub async fn list_streams_page(
        &self,
        scope: &str,
        after: &str,
        limit: usize,
    ) -> Result<NamesPage, ControllerError> {
        self.names_page(&format!("streams/{scope}/"), after, limit).await
    }

    /// One page of `scope`'s streams with what a listing shows of each (state and
    /// policies), as `list_streams_page`. A record of the first layout is read as it is (a
    /// listing does not move it to the current layout; `get_stream` does); one that cannot
    /// be read is listed as `unreadable` (with a warning), so one damaged record does not
    /// hide the others (the services that apply policies go on with them).
    pub async fn list_stream_entries_page(
        &self,
        scope: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<ListedStream>, Option<String>), ControllerError> {
        let prefix = format!("streams/{scope}/");
        let (page, next) = self.keys_page(&prefix, after, limit).await?;
        let streams = page
            .into_iter()
            .map(|(key, v)| {
                let read = match v.value.strip_prefix(&STREAM_RECORD_TAG[..]) {
                    Some(_) => StreamRecord::decode(&key, &v.value).map(|r| (r.state, r.retention, r.scaling)),
                    None => LegacyStreamRecord::decode(&key, &v.value).map(|r| (r.state, r.retention, r.scaling)),
                };
                let name = key[prefix.len()..].to_string();
                match read {
                    Ok((state, retention, scaling)) => ListedStream {
                        name,
                        creating: state == StreamState::Creating,
                        sealed: matches!(state, StreamState::Sealed | StreamState::Sealing),
                        unreadable: false,
                        retention,
                        scaling,
                    },
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "a stream record cannot be read; listed as unreadable");
                        ListedStream {
                            name,
                            creating: false,
                            sealed: false,
                            unreadable: true,
                            retention: Retention::None,
                            scaling: ScalingPolicy::default(),
                        }
                    }
                }
            })
            .collect();
        Ok((streams, next))
    }

    /// Names (keys without `prefix`) of one page of keys under `prefix`.
    async fn names_page(&self, prefix: &str, after: &str, limit: usize) -> Result<NamesPage, ControllerError> {
        let (page, next) = self.keys_page(prefix, after, limit).await?;
        Ok((page.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect(), next))
    }

    /// One page of at most `limit` keys under `prefix` (with their values) after the name
    /// `after` (`""`: from the first), and the next page's `after` (the last name) if there
    /// is a next page: one more is fetched to know, so a page that ends at the last key has
    /// none.
    async fn keys_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<(String, Versioned)>, Option<String>), ControllerError> {
        let limit = limit.max(1);
        let after = if after.is_empty() { String::new() } else { format!("{prefix}{after}") };
        let mut page = self.store.range_page(prefix, &after, limit + 1).await?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().map(|(k, _)| k[prefix.len()..].to_string()) } else { None };
        Ok((page, next))
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
        scaling: ScalingPolicy,
    ) -> Result<StreamRecord, ControllerError> {
        self.require_scope(scope).await?;
        // A fixed policy records the count; an automatic one starts with at least its minimum.
        let (segments, scaling) = match scaling {
            ScalingPolicy::Fixed { .. } => (segments, ScalingPolicy::Fixed { segments }),
            auto => {
                auto.validate().map_err(ControllerError::Invalid)?;
                (segments.max(auto.initial_segments()), auto)
            }
        };
        validate("stream", stream).map_err(ControllerError::InvalidName)?;
        if segments == 0 || segments > STREAM_SEGMENTS_MAX {
            return Err(ControllerError::Invalid(format!(
                "a stream needs 1 to {STREAM_SEGMENTS_MAX} segments, not {segments}"
            )));
        }
        let segments = split_range(0.0, 1.0, segments);
        let now = now_ms();
        let first = EpochRecord {
            epoch: 0,
            created_unix_ms: now,
            segments: (0..segments.len() as u64).collect(),
            created: segments
                .iter()
                .enumerate()
                .map(|(i, r)| NewSegment {
                    number: i as u64,
                    key_low: r.low,
                    key_high: r.high,
                    predecessors: Vec::new(),
                })
                .collect(),
            sealed: Vec::new(),
        };
        let record = StreamRecord {
            state: StreamState::Creating,
            current: first.clone(),
            next_segment: segments.len() as u64,
            segments: segments
                .iter()
                .enumerate()
                .map(|(i, r)| StreamSegment { number: i as u64, key_low: r.low, key_high: r.high })
                .collect(),
            created_unix_ms: now,
            retention,
            scaling,
            scale: None,
        };
        let key = stream_key(scope, stream);
        let txn = MetaTxn::new()
            .compare(key.clone(), 0)
            .put(key, record.encode())
            .put(epoch_key(scope, stream, 0), first.encode());
        match self.store.txn(txn).await {
            Ok(()) => Ok(record),
            Err(MetaError::Conflict { .. }) => {
                let (existing, _) = self.get_versioned(scope, stream).await?;
                if existing.state == StreamState::Creating && existing.segments.len() == segments.len() {
                    Ok(existing)
                } else {
                    Err(ControllerError::StreamExists(format!("{scope}/{stream}")))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_versioned(&self, scope: &str, stream: &str) -> Result<(StreamRecord, u64), ControllerError> {
        self.load_stream(scope, stream).await?.ok_or_else(|| ControllerError::NoSuchStream(format!("{scope}/{stream}")))
    }

    /// A stream's record and its version (`None`: no such stream). A record of the first
    /// layout is moved to the current one first: its epoch records are written, then the
    /// record is replaced (compare-and-swap; writing the same epoch records twice is harmless).
    async fn load_stream(&self, scope: &str, stream: &str) -> Result<Option<(StreamRecord, u64)>, ControllerError> {
        let key = stream_key(scope, stream);
        loop {
            let Some(v) = self.store.get(&key).await? else { return Ok(None) };
            if v.value.starts_with(&STREAM_RECORD_TAG) {
                return Ok(Some((StreamRecord::decode(&key, &v.value)?, v.version)));
            }
            let (record, epochs) = LegacyStreamRecord::decode(&key, &v.value)?.migrate();
            let (mut txn, mut bytes) = (MetaTxn::new(), 0);
            for e in &epochs {
                let value = e.encode();
                bytes += value.len();
                txn = txn.put(epoch_key(scope, stream, e.epoch), value);
                if txn.ops.len() >= MIGRATE_OPS_MAX || bytes >= MIGRATE_BYTES_MAX {
                    self.store.txn(std::mem::take(&mut txn)).await?;
                    bytes = 0;
                }
            }
            if !txn.ops.is_empty() {
                self.store.txn(txn).await?;
            }
            match self.store.compare_and_swap(&key, v.version, record.encode()).await {
                Ok(version) => {
                    tracing::info!(stream = %format!("{scope}/{stream}"), epochs = epochs.len(), "stream record moved to the current layout");
                    return Ok(Some((record, version)));
                }
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn get_stream(&self, scope: &str, stream: &str) -> Result<StreamRecord, ControllerError> {
        validate("scope", scope).map_err(ControllerError::InvalidName)?;
        validate("stream", stream).map_err(ControllerError::InvalidName)?;
        Ok(self.get_versioned(scope, stream).await?.0)
    }

    /// Changes the record at `key` with `change` (which says whether anything changed, or
    /// refuses), compare-and-swap on its version, retried on conflict. `None`: no record.
    async fn update_key<T: Record>(
        &self,
        key: &str,
        change: impl Fn(&mut T) -> Result<bool, ControllerError>,
    ) -> Result<Option<T>, ControllerError> {
        loop {
            let Some(v) = self.store.get(key).await? else { return Ok(None) };
            let mut record = T::decode(key, &v.value)?;
            if !change(&mut record)? {
                return Ok(Some(record));
            }
            match self.store.compare_and_swap(key, v.version, record.encode()).await {
                Ok(_) => return Ok(Some(record)),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Changes a stream's record (as `update_key`, through `load_stream`). A change that
    /// makes a new epoch current writes that epoch's record in the same transaction.
    async fn update_record(
        &self,
        scope: &str,
        stream: &str,
        change: impl Fn(&mut StreamRecord) -> Result<bool, ControllerError>,
    ) -> Result<StreamRecord, ControllerError> {
        let key = stream_key(scope, stream);
        loop {
            let (mut record, version) = self.get_versioned(scope, stream).await?;
            let epoch = record.epoch();
            if !change(&mut record)? {
                return Ok(record);
            }
            let written = if record.epoch() == epoch {
                self.store.compare_and_swap(&key, version, record.encode()).await.map(|_| ())
            } else {
                let txn = MetaTxn::new()
                    .compare(key.clone(), version)
                    .put(key.clone(), record.encode())
                    .put(epoch_key(scope, stream, record.epoch()), record.current.encode());
                self.store.txn(txn).await
            };
            match written {
                Ok(()) => return Ok(record),
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

    /// Changes a stream's retention and/or scaling policy (`None`: unchanged). A fixed
    /// policy records the stream's current segment count.
    pub async fn set_policies(
        &self,
        scope: &str,
        stream: &str,
        retention: Option<Retention>,
        scaling: Option<ScalingPolicy>,
    ) -> Result<StreamRecord, ControllerError> {
        if let Some(p) = &scaling
            && !matches!(p, ScalingPolicy::Fixed { .. })
        {
            p.validate().map_err(ControllerError::Invalid)?;
        }
        self.update_record(scope, stream, |r| {
            if r.state == StreamState::Creating {
                return Err(ControllerError::NoSuchStream(format!("{scope}/{stream} (still being created)")));
            }
            if let Some(retention) = retention {
                r.retention = retention;
            }
            if let Some(scaling) = scaling {
                r.scaling = match scaling {
                    ScalingPolicy::Fixed { .. } => ScalingPolicy::Fixed { segments: r.segments.len() as u32 },
                    auto => auto,
                };
            }
            Ok(true)
        })
        .await
    }

    /// Records a scaling of `scope/stream`: the active, adjacent segments `seal` are to be
    /// replaced by new segments over `ranges` (which must cover exactly their key range, in
    /// order). Returns the pending scale; the same request while it is pending returns it
    /// again (a retry resumes), another one is refused with `ScaleInProgress`. `None`: this
    /// very scaling is already complete (a retry whose first attempt's answer was lost: it
    /// is recognised while its epoch is one of the last `RETRY_EPOCHS`).
    pub async fn begin_scale(
        &self,
        scope: &str,
        stream: &str,
        seal: &[u64],
        ranges: &[KeyRange],
    ) -> Result<Option<PendingScale>, ControllerError> {
        let name = format!("{scope}/{stream}");
        let record = self
            .update_record(scope, stream, |r| {
                match r.state {
                    StreamState::Active => {}
                    StreamState::Creating => {
                        return Err(ControllerError::NoSuchStream(format!("{name} (still being created)")));
                    }
                    StreamState::Sealing | StreamState::Sealed => return Err(ControllerError::Sealed(name.clone())),
                }
                if let Some(p) = &r.scale {
                    let same = p.seal == seal
                        && p.create.len() == ranges.len()
                        && p.create.iter().zip(ranges).all(|(s, k)| s.key_low == k.low && s.key_high == k.high);
                    return if same { Ok(false) } else { Err(ControllerError::ScaleInProgress(name.clone())) };
                }
                if scaled_already(&r.current, seal, ranges) {
                    return Ok(false);
                }
                let create = plan_scale(r, seal, ranges).map_err(ControllerError::Invalid)?;
                let epoch = r.epoch() + 1;
                r.next_segment += create.len() as u64;
                r.scale = Some(PendingScale { epoch, seal: seal.to_vec(), create, committed: false });
                Ok(true)
            })
            .await;
        match record {
            Ok(record) => Ok(record.scale),
            // Segments no longer active: this very scaling may have been done, and others
            // after it (its first answer lost, the retry late).
            Err(ControllerError::Invalid(reason)) => {
                let current = self.get_versioned(scope, stream).await?.0.current.epoch;
                let from = current.saturating_sub(RETRY_EPOCHS).max(1);
                let (recent, _) =
                    self.epoch_records(scope, stream, current, from, RETRY_EPOCHS as usize + 1, usize::MAX).await?;
                if recent.iter().any(|e| scaled_already(e, seal, ranges)) {
                    Ok(None)
                } else {
                    Err(ControllerError::Invalid(reason))
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Makes a pending scale's new segments current: the new epoch (its record written in
    /// the same transaction), its segments and their links to the sealed ones. Done once;
    /// later calls change nothing.
    pub async fn commit_scale(&self, scope: &str, stream: &str, epoch: u64) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| {
            let Some(p) = r.scale.as_mut().filter(|p| p.epoch == epoch && !p.committed) else { return Ok(false) };
            p.committed = true;
            let p = p.clone();
            let sealed: Vec<&StreamSegment> = r.segments.iter().filter(|s| p.seal.contains(&s.number)).collect();
            let created = p
                .create
                .iter()
                .map(|s| NewSegment {
                    number: s.number,
                    key_low: s.key_low,
                    key_high: s.key_high,
                    predecessors: sealed
                        .iter()
                        .filter(|o| o.key_low < s.key_high && s.key_low < o.key_high)
                        .map(|o| o.number)
                        .collect(),
                })
                .collect();
            let sealed = sealed.iter().map(|s| s.number).collect();
            r.segments.retain(|s| !p.seal.contains(&s.number));
            r.segments.extend(p.create.iter().cloned());
            r.segments.sort_by(|a, b| a.key_low.total_cmp(&b.key_low));
            r.current = EpochRecord {
                epoch,
                created_unix_ms: now_ms(),
                segments: r.segments.iter().map(|s| s.number).collect(),
                created,
                sealed,
            };
            Ok(true)
        })
        .await
    }

    /// Drops a pending scale that was never committed (its new segments are the caller's to
    /// delete): the stream stays as it was. For a scaling that cannot be committed.
    pub async fn cancel_scale(&self, scope: &str, stream: &str, epoch: u64) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| {
            if r.scale.as_ref().is_some_and(|p| p.epoch == epoch && !p.committed) {
                r.scale = None;
                Ok(true)
            } else {
                Ok(false)
            }
        })
        .await
    }

    /// Clears a committed scale whose replaced segments are sealed.
    pub async fn end_scale(&self, scope: &str, stream: &str, epoch: u64) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| {
            if r.scale.as_ref().is_some_and(|p| p.epoch == epoch && p.committed) {
                r.scale = None;
                Ok(true)
            } else {
                Ok(false)
            }
        })
        .await
    }

    pub async fn list_streams(&self, scope: &str) -> Result<Vec<String>, ControllerError> {
        let prefix = format!("streams/{scope}/");
        Ok(self.store.range(&prefix).await?.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect())
    }

    /// Removes a sealed stream's records, its epochs first (its segments must be gone
    /// already; an interrupted call leaves the stream record, so a retry finishes).
    pub async fn delete_stream_record(&self, scope: &str, stream: &str) -> Result<(), ControllerError> {
        let (record, version) = self.get_versioned(scope, stream).await?;
        if record.state != StreamState::Sealed {
            return Err(ControllerError::NotSealed(format!("{scope}/{stream}")));
        }
        let prefix = epochs_prefix(scope, stream);
        loop {
            let page = self.store.range_page(&prefix, "", EPOCHS_PER_READ).await?;
            if page.is_empty() {
                break;
            }
            let txn = page.into_iter().fold(MetaTxn::new(), |t, (k, _)| t.delete(k));
            self.store.txn(txn).await?;
        }
        self.store.delete(&stream_key(scope, stream), Some(version)).await?;
        Ok(())
    }

    /// Epoch records from `from` on (at most `limit`, up to the current epoch), and whether
    /// there are more.
    async fn epoch_records(
        &self,
        scope: &str,
        stream: &str,
        current: u64,
        from: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<EpochRecord>, bool), ControllerError> {
        let prefix = epochs_prefix(scope, stream);
        let mut after = if from == 0 { String::new() } else { epoch_key(scope, stream, from - 1) };
        let (mut out, mut bytes) = (Vec::new(), 0);
        loop {
            let want = EPOCHS_PER_READ.min(limit - out.len());
            let page = self.store.range_page(&prefix, &after, want).await?;
            let full = page.len() == want;
            for (k, v) in page {
                let e = EpochRecord::decode(&k, &v.value)?;
                if e.epoch > current {
                    // A later epoch's record without its stream record: not current yet.
                    return Ok((out, false));
                }
                bytes += v.value.len();
                after = k;
                out.push(e);
                if out.len() >= limit || bytes >= bytes_max {
                    let last = out.last().map_or(0, |e| e.epoch);
                    return Ok((out, last < current));
                }
            }
            if !full {
                return Ok((out, false));
            }
        }
    }

    /// One page of a stream's history: its epochs from `from` on (at most `limit` of them,
    /// and no more than about `bytes_max` bytes, at least one), with the segments they
    /// created, and the epoch the next page starts at (`None`: this page ends at the current
    /// epoch: `next`). A segment's `sealed_epoch` is set when an epoch of the same page
    /// sealed it; whoever walks every page derives the others from the epochs' segment
    /// lists (`StreamHistory::derive_sealed`).
    /// `current` is the stream's current epoch, from the record the caller just read.
    pub async fn history_page(
        &self,
        scope: &str,
        stream: &str,
        current: u64,
        from: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<StreamHistory, ControllerError> {
        let (epochs, more) = self.epoch_records(scope, stream, current, from, limit.max(1), bytes_max.max(1)).await?;
        let sealed_at: HashMap<u64, u64> = epochs.iter().flat_map(|e| e.sealed.iter().map(|n| (*n, e.epoch))).collect();
        let mut history = StreamHistory {
            scope: scope.into(),
            stream: stream.into(),
            epochs: Vec::new(),
            segments: Vec::new(),
            next: None,
        };
        for e in epochs {
            history.segments.extend(e.created.into_iter().map(|s| SegmentHistory {
                number: s.number,
                key_low: s.key_low,
                key_high: s.key_high,
                created_epoch: e.epoch,
                sealed_epoch: sealed_at.get(&s.number).copied(),
                predecessors: s.predecessors,
            }));
            history.epochs.push(EpochInfo { epoch: e.epoch, created_unix_ms: e.created_unix_ms, segments: e.segments });
        }
        history.next = if more { history.epochs.last().map(|e| e.epoch + 1) } else { None };
        Ok(history)
    }

    /// Every segment a stream ever had (for deleting them), oldest first; `current` as in
    /// `history_page`.
    pub async fn all_segments(&self, scope: &str, stream: &str, current: u64) -> Result<Vec<u64>, ControllerError> {
        let (mut out, mut from) = (Vec::new(), 0);
        loop {
            let (epochs, more) = self.epoch_records(scope, stream, current, from, EPOCHS_PER_READ, usize::MAX).await?;
            from = epochs.last().map_or(from, |e| e.epoch + 1);
            out.extend(epochs.iter().flat_map(|e| e.created.iter().map(|s| s.number)));
            if !more {
                return Ok(out);
            }
        }
    }
}

/// `n` equal ranges over [low, high).
pub fn split_range(low: f64, high: f64, n: u32) -> Vec<KeyRange> {
    KeyRange { low, high }.split(n)
}

/// Whether the scaling that made epoch `e` sealed exactly `seal` and created exactly
/// `ranges` (a retry whose answer was lost). Segment numbers are never reused, so at most
/// one epoch matches.
fn scaled_already(e: &EpochRecord, seal: &[u64], ranges: &[KeyRange]) -> bool {
    let mut sealed = e.sealed.clone();
    sealed.sort_unstable();
    let mut asked = seal.to_vec();
    asked.sort_unstable();
    !asked.is_empty()
        && sealed == asked
        && e.created.len() == ranges.len()
        && e.created.iter().zip(ranges).all(|(s, k)| s.key_low == k.low && s.key_high == k.high)
}

/// Checks a scaling request against the record and numbers the new segments.
fn plan_scale(r: &StreamRecord, seal: &[u64], ranges: &[KeyRange]) -> Result<Vec<StreamSegment>, String> {
    if seal.is_empty() || ranges.is_empty() {
        return Err("a scaling needs segments to seal and at least one new key range".into());
    }
    let mut sealed = Vec::new();
    for (i, n) in seal.iter().enumerate() {
        if seal[..i].contains(n) {
            return Err(format!("segment {n} is named twice"));
        }
        let s = r.segments.iter().find(|s| s.number == *n).ok_or_else(|| {
            let active: Vec<String> = r.segments.iter().map(|s| s.number.to_string()).collect();
            format!("segment {n} is not an active segment (active: {})", active.join(", "))
        })?;
        sealed.push(s);
    }
    sealed.sort_by(|a, b| a.key_low.total_cmp(&b.key_low));
    if let Some(w) = sealed.windows(2).find(|w| w[0].key_high != w[1].key_low) {
        return Err(format!("segments {} and {} are not adjacent", w[0].number, w[1].number));
    }
    let (low, high) = (sealed[0].key_low, sealed[sealed.len() - 1].key_high);
    let after = r.segments.len() - sealed.len() + ranges.len();
    if after > STREAM_SEGMENTS_MAX as usize {
        return Err(format!("the stream would have {after} segments; at most {STREAM_SEGMENTS_MAX}"));
    }
    if ranges[0].low != low || ranges[ranges.len() - 1].high != high {
        return Err(format!(
            "the new ranges span [{}, {}); the sealed segments span [{low}, {high})",
            ranges[0].low,
            ranges[ranges.len() - 1].high
        ));
    }
    for (i, k) in ranges.iter().enumerate() {
        if k.low.partial_cmp(&k.high) != Some(std::cmp::Ordering::Less) {
            return Err(format!("key range [{}, {}) is empty", k.low, k.high));
        }
        if i > 0 && ranges[i - 1].high != k.low {
            return Err(format!(
                "key ranges must be adjacent: one ends at {}, the next starts at {}",
                ranges[i - 1].high,
                k.low
            ));
        }
    }
    Ok(ranges
        .iter()
        .enumerate()
        .map(|(i, k)| StreamSegment { number: r.next_segment + i as u64, key_low: k.low, key_high: k.high })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;
    use futures::executor::block_on;

    /// Scope and stream names come a page at a time, in order, and the pages add up.
    #[test]
    fn names_come_in_pages() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            for scope in ["a", "b", "c", "d", "e"] {
                c.create_scope(scope).await.unwrap();
            }
            for i in 0..7 {
                c.begin_create_stream("b", &format!("s{i}"), 1, Retention::None, ScalingPolicy::Fixed { segments: 1 })
                    .await
                    .unwrap();
            }
            let (page, next) = c.list_scopes_page("", 2).await.unwrap();
            assert_eq!((page, next.as_deref()), (vec!["a".to_string(), "b".into()], Some("b")));
            let (page, next) = c.list_scopes_page("b", 2).await.unwrap();
            assert_eq!((page, next.as_deref()), (vec!["c".to_string(), "d".into()], Some("d")));
            let (page, next) = c.list_scopes_page("d", 2).await.unwrap();
            assert_eq!((page, next), (vec!["e".to_string()], None));
            // A full page that ends at the last name has no next page (not an empty one).
            let (page, next) = c.list_scopes_page("c", 2).await.unwrap();
            assert_eq!((page, next), (vec!["d".to_string(), "e".into()], None));
            let (mut all, mut after) = (Vec::new(), String::new());
            loop {
                let (page, next) = c.list_streams_page("b", &after, 3).await.unwrap();
                all.extend(page);
                match next {
                    Some(n) => after = n,
                    None => break,
                }
            }
            assert_eq!(all, c.list_streams("b").await.unwrap());
            assert_eq!(all.len(), 7);
            assert!(c.list_streams_page("a", "", 3).await.unwrap().0.is_empty());
            // The entries pages name the same streams, each with its state and policies.
            c.set_state("b", "s1", StreamState::Active).await.unwrap();
            let size = Retention::Size { min_bytes: 10, max_bytes: 20 };
            c.set_policies("b", "s1", Some(size), None).await.unwrap();
            c.set_state("b", "s2", StreamState::Sealed).await.unwrap();
            let (mut entries, mut after) = (Vec::new(), String::new());
            loop {
                let (page, next) = c.list_stream_entries_page("b", &after, 3).await.unwrap();
                assert!(page.len() <= 3);
                entries.extend(page);
                match next {
                    Some(n) => after = n,
                    None => break,
                }
            }
            assert_eq!(entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), all);
            let fixed = ScalingPolicy::Fixed { segments: 1 };
            assert_eq!(
                entries[..3].iter().map(|e| (e.creating, e.sealed, e.retention, e.scaling)).collect::<Vec<_>>(),
                [
                    (true, false, Retention::None, fixed),
                    (false, false, size, fixed),
                    (false, true, Retention::None, fixed)
                ]
            );
            assert!(entries.iter().all(|e| !e.unreadable));
            // A damaged record is listed as unreadable; the others as they are.
            c.store.put("streams/b/s3", b"SSR\x02\0\0\0\0 not an archive".to_vec()).await.unwrap();
            let (page, _) = c.list_stream_entries_page("b", "", 10).await.unwrap();
            assert_eq!(page.len(), 7);
            assert_eq!(page.iter().filter(|e| e.unreadable).map(|e| e.name.as_str()).collect::<Vec<_>>(), ["s3"]);
            assert_eq!(page[1].retention, size);
            assert!(c.get_stream("b", "s3").await.is_err());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scope_and_stream_lifecycle() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            assert!(matches!(
                c.begin_create_stream("s", "t", 2, Retention::None, ScalingPolicy::Fixed { segments: 1 }).await,
                Err(ControllerError::NoSuchScope(_))
            ));
            c.create_scope("s").await.unwrap();
            assert!(matches!(c.create_scope("s").await, Err(ControllerError::ScopeExists(_))));
            assert!(matches!(c.create_scope("bad/name").await, Err(ControllerError::InvalidName(_))));
            let r = c
                .begin_create_stream("s", "t", 3, Retention::None, ScalingPolicy::Fixed { segments: 1 })
                .await
                .unwrap();
            assert_eq!(r.segments.len(), 3);
            assert_eq!(r.segments[2].key_high, 1.0);
            // Resuming an interrupted create is allowed; a different one is not.
            c.begin_create_stream("s", "t", 3, Retention::None, ScalingPolicy::Fixed { segments: 1 }).await.unwrap();
            assert!(matches!(
                c.begin_create_stream("s", "t", 4, Retention::None, ScalingPolicy::Fixed { segments: 1 }).await,
                Err(ControllerError::StreamExists(_))
            ));
            c.set_state("s", "t", StreamState::Active).await.unwrap();
            assert!(matches!(
                c.begin_create_stream("s", "t", 3, Retention::None, ScalingPolicy::Fixed { segments: 1 }).await,
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

    #[test]
    fn scaling_records_epochs_links_and_refuses_bad_requests() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-scale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            c.create_scope("s").await.unwrap();
            c.begin_create_stream("s", "t", 2, Retention::None, ScalingPolicy::Fixed { segments: 1 }).await.unwrap();
            // Not active yet.
            assert!(matches!(
                c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 2)).await,
                Err(ControllerError::NoSuchStream(_))
            ));
            c.set_state("s", "t", StreamState::Active).await.unwrap();
            for (seal, ranges) in [
                (vec![], split_range(0.0, 0.5, 2)),
                (vec![7], split_range(0.0, 0.5, 2)),
                (vec![0, 0], split_range(0.0, 0.5, 2)),
                (vec![0], split_range(0.0, 0.6, 2)),
                (vec![0], vec![KeyRange { low: 0.0, high: 0.2 }, KeyRange { low: 0.3, high: 0.5 }]),
                (vec![0], vec![KeyRange { low: 0.0, high: 0.0 }, KeyRange { low: 0.0, high: 0.5 }]),
            ] {
                assert!(
                    matches!(c.begin_scale("s", "t", &seal, &ranges).await, Err(ControllerError::Invalid(_))),
                    "{seal:?} {ranges:?}"
                );
            }
            // Split segment 0 in three.
            let p = c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 3)).await.unwrap().unwrap();
            assert_eq!((p.epoch, p.create.iter().map(|s| s.number).collect::<Vec<_>>()), (1, vec![2, 3, 4]));
            // The same request resumes; another is refused while one is pending.
            assert_eq!(c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 3)).await.unwrap(), Some(p));
            assert!(matches!(
                c.begin_scale("s", "t", &[1], &split_range(0.5, 1.0, 2)).await,
                Err(ControllerError::ScaleInProgress(_))
            ));
            let r = c.commit_scale("s", "t", 1).await.unwrap();
            assert_eq!(r.segments.iter().map(|s| s.number).collect::<Vec<_>>(), vec![2, 3, 4, 1]);
            assert_eq!(r.epoch(), 1);
            // Committing twice changes nothing.
            assert_eq!(c.commit_scale("s", "t", 1).await.unwrap(), r);
            c.end_scale("s", "t", 1).await.unwrap();
            // Done: the same request again (its answer lost) is answered as done; another
            // scaling of the sealed segment is refused.
            assert_eq!(c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 3)).await.unwrap(), None);
            assert!(matches!(
                c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 2)).await,
                Err(ControllerError::Invalid(_))
            ));
            // Merge 4 and 1 (adjacent), but not 2 and 1 (not adjacent).
            assert!(matches!(
                c.begin_scale("s", "t", &[2, 1], &[KeyRange { low: 0.0, high: 1.0 }]).await,
                Err(ControllerError::Invalid(_))
            ));
            let low = r.segments[2].key_low;
            let p = c.begin_scale("s", "t", &[4, 1], &[KeyRange { low, high: 1.0 }]).await.unwrap().unwrap();
            c.commit_scale("s", "t", p.epoch).await.unwrap();
            let r = c.end_scale("s", "t", p.epoch).await.unwrap();
            assert_eq!(r.segments.iter().map(|s| s.number).collect::<Vec<_>>(), vec![2, 3, 5]);
            // The first scaling retried after another one: still recognised as done.
            assert_eq!(c.begin_scale("s", "t", &[0], &split_range(0.0, 0.5, 3)).await.unwrap(), None);
            assert_eq!(c.begin_scale("s", "t", &[4, 1], &[KeyRange { low, high: 1.0 }]).await.unwrap(), None);
            let h = c.history_page("s", "t", 2, 0, 100, usize::MAX).await.unwrap();
            assert_eq!(
                h.epochs.iter().map(|e| e.segments.clone()).collect::<Vec<_>>(),
                vec![vec![0, 1], vec![2, 3, 4, 1], vec![2, 3, 5]]
            );
            assert_eq!(h.next, None);
            let five = h.segment(5).unwrap();
            assert_eq!((five.predecessors.clone(), five.created_epoch), (vec![4, 1], 2));
            assert_eq!(h.segment(1).unwrap().sealed_epoch, Some(2));
            assert_eq!(h.segment(0).unwrap().sealed_epoch, Some(1));
            assert_eq!(h.segment(2).unwrap().sealed_epoch, None);
            assert!(r.scale.is_none());
            // The record holds the current epoch only; the history is in pages.
            assert_eq!((r.current.epoch, r.current.sealed.clone()), (2, vec![4, 1]));
            let (first, second) = (
                c.history_page("s", "t", 2, 0, 2, usize::MAX).await.unwrap(),
                c.history_page("s", "t", 2, 2, 2, usize::MAX).await.unwrap(),
            );
            assert_eq!((first.epochs.len(), first.next, second.epochs.len(), second.next), (2, Some(2), 1, None));
            // Segment 1 was sealed by epoch 2, on the next page: unknown on the first, then
            // derived once the pages are put together.
            assert_eq!(first.segment(1).unwrap().sealed_epoch, None);
            let mut whole = first;
            whole.extend(second);
            whole.derive_sealed();
            assert_eq!(whole, h);
            // A page stops at its byte budget (at least one epoch).
            let small = c.history_page("s", "t", 2, 0, 100, 1).await.unwrap();
            assert_eq!((small.epochs.len(), small.next), (1, Some(1)));
            assert_eq!(c.all_segments("s", "t", 2).await.unwrap(), vec![0, 1, 2, 3, 4, 5]);
            // Deleting the stream deletes its epochs.
            c.set_state("s", "t", StreamState::Sealed).await.unwrap();
            c.delete_stream_record("s", "t").await.unwrap();
            assert!(c.store.range("epochs/").await.unwrap().is_empty());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A record of the first layout (the whole history inside) is moved to the current one
    /// when first read: same stream, same history, epoch records written, and it scales on.
    #[test]
    fn first_layout_records_are_migrated_on_read() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        let seg = |number, key_low, key_high, created_epoch, sealed_epoch, predecessors| SegmentHistory {
            number,
            key_low,
            key_high,
            created_epoch,
            sealed_epoch,
            predecessors,
        };
        let ss = |number, key_low, key_high| StreamSegment { number, key_low, key_high };
        // 0, 1; 0 split into 2, 3; then 3 and 1 merged into 4.
        let legacy = LegacyStreamRecord {
            state: StreamState::Active,
            segments: vec![ss(2, 0.0, 0.25), ss(4, 0.25, 1.0)],
            created_unix_ms: 7,
            retention: Retention::None,
            scaling: ScalingPolicy::Fixed { segments: 2 },
            epochs: vec![
                EpochInfo { epoch: 0, created_unix_ms: 7, segments: vec![0, 1] },
                EpochInfo { epoch: 1, created_unix_ms: 8, segments: vec![2, 3, 1] },
                EpochInfo { epoch: 2, created_unix_ms: 9, segments: vec![2, 4] },
            ],
            history: vec![
                seg(0, 0.0, 0.5, 0, Some(1), vec![]),
                seg(1, 0.5, 1.0, 0, Some(2), vec![]),
                seg(2, 0.0, 0.25, 1, None, vec![0]),
                seg(3, 0.25, 0.5, 1, Some(2), vec![0]),
                seg(4, 0.25, 1.0, 2, None, vec![3, 1]),
            ],
            next_segment: 5,
            scale: None,
        };
        block_on(async {
            c.create_scope("s").await.unwrap();
            c.store.put("streams/s/old", legacy.encode()).await.unwrap();
            let r = c.get_stream("s", "old").await.unwrap();
            assert_eq!((r.epoch(), r.next_segment, r.ranges().len()), (2, 5, 2));
            assert_eq!((r.current.sealed.clone(), r.current.created.len()), (vec![1, 3], 1));
            assert!(c.store.get("streams/s/old").await.unwrap().unwrap().value.starts_with(&STREAM_RECORD_TAG));
            assert_eq!(c.store.range("epochs/s/old/").await.unwrap().len(), 3);
            let h = c.history_page("s", "old", r.epoch(), 0, 100, usize::MAX).await.unwrap();
            assert_eq!(h.epochs, legacy.epochs);
            assert_eq!(h.segments, legacy.history);
            // And it goes on as any other stream.
            let p = c.begin_scale("s", "old", &[2], &split_range(0.0, 0.25, 2)).await.unwrap().unwrap();
            assert_eq!(c.commit_scale("s", "old", p.epoch).await.unwrap().epoch(), 3);
            assert_eq!(c.all_segments("s", "old", 3).await.unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
