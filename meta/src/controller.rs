//! Controller functions over a `MetaStore`: scopes and streams (segments with key ranges,
//! state). The node's request handlers call these and then act on the segments; every
//! record change is a compare-and-swap so concurrent callers never overwrite each other.
//!
//! Keys: `scopes/<scope>` (empty value), `streams/<scope>/<stream>` (rkyv `StreamRecord`),
//! `txns/<scope>/<stream>/<id>` (rkyv `TxnRecord`, see `txns`),
//! `subscribers/<scope>/<stream>/<group>` (rkyv `SubscriberRecord`, see `subscribers`).
//!
//! Scaling is three record changes around the segment work, so a crash anywhere leaves a
//! record a retry finishes: `begin_scale` records the pending scale (new segment numbers,
//! next epoch); the node creates the new segments; `commit_scale` makes them current and
//! appends the epoch and the links; the node seals the replaced segments; `end_scale`
//! clears the pending scale. A stream with a pending scale takes no other scale.

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
use crate::store::{MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::ErrorCode;
use sluice_net::messages::{EpochInfo, KeyRange, SegmentHistory, SegmentRange};
use sluice_net::{Retention, ScalingPolicy};

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

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StreamRecord {
    pub state: StreamState,
    /// The current epoch's segments, in key order.
    pub segments: Vec<StreamSegment>,
    pub created_unix_ms: u64,
    pub retention: Retention,
    pub scaling: ScalingPolicy,
    /// Every epoch, oldest first (the last one is current).
    pub epochs: Vec<EpochInfo>,
    /// Every segment the stream ever had, by number.
    pub history: Vec<SegmentHistory>,
    /// Number the next new segment gets.
    pub next_segment: u64,
    pub scale: Option<PendingScale>,
}

impl StreamRecord {
    pub fn ranges(&self) -> Vec<SegmentRange> {
        self.segments
            .iter()
            .map(|s| SegmentRange { number: s.number, key_low: s.key_low, key_high: s.key_high })
            .collect()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epochs.last().map_or(0, |e| e.epoch)
    }
}

record!(StreamRecord, "a stream record");

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
    /// first), and the next page's `after` if there may be one.
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

    /// Names (keys without `prefix`) of one page of keys under `prefix`.
    async fn names_page(&self, prefix: &str, after: &str, limit: usize) -> Result<NamesPage, ControllerError> {
        let limit = limit.max(1);
        let after = if after.is_empty() { String::new() } else { format!("{prefix}{after}") };
        let page = self.store.range_page(prefix, &after, limit).await?;
        let names: Vec<String> = page.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect();
        let next = if names.len() == limit { names.last().cloned() } else { None };
        Ok((names, next))
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
        let record = StreamRecord {
            state: StreamState::Creating,
            epochs: vec![EpochInfo { epoch: 0, created_unix_ms: now, segments: (0..segments.len() as u64).collect() }],
            history: segments
                .iter()
                .enumerate()
                .map(|(i, r)| SegmentHistory {
                    number: i as u64,
                    key_low: r.low,
                    key_high: r.high,
                    created_epoch: 0,
                    sealed_epoch: None,
                    predecessors: Vec::new(),
                })
                .collect(),
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
        match self.store.compare_and_swap(&key, 0, record.encode()).await {
            Ok(_) => Ok(record),
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

    /// Changes a stream's record (see `update_key`).
    async fn update_record(
        &self,
        scope: &str,
        stream: &str,
        change: impl Fn(&mut StreamRecord) -> Result<bool, ControllerError>,
    ) -> Result<StreamRecord, ControllerError> {
        self.update_key(&stream_key(scope, stream), change)
            .await?
            .ok_or_else(|| ControllerError::NoSuchStream(format!("{scope}/{stream}")))
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
    /// very scaling is already complete (a retry whose first attempt's answer was lost).
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
                if scaled_already(r, seal, ranges) {
                    return Ok(false);
                }
                let create = plan_scale(r, seal, ranges).map_err(ControllerError::Invalid)?;
                let epoch = r.epoch() + 1;
                r.next_segment += create.len() as u64;
                r.scale = Some(PendingScale { epoch, seal: seal.to_vec(), create, committed: false });
                Ok(true)
            })
            .await?;
        Ok(record.scale)
    }

    /// Makes a pending scale's new segments current: the new epoch, its segments' history
    /// and their links to the sealed ones. Done once; later calls change nothing.
    pub async fn commit_scale(&self, scope: &str, stream: &str, epoch: u64) -> Result<StreamRecord, ControllerError> {
        self.update_record(scope, stream, |r| {
            let Some(p) = r.scale.as_mut().filter(|p| p.epoch == epoch && !p.committed) else { return Ok(false) };
            p.committed = true;
            let p = p.clone();
            let sealed: Vec<StreamSegment> =
                r.segments.iter().filter(|s| p.seal.contains(&s.number)).cloned().collect();
            for h in r.history.iter_mut().filter(|h| p.seal.contains(&h.number)) {
                h.sealed_epoch = Some(epoch);
            }
            for s in &p.create {
                let predecessors = sealed
                    .iter()
                    .filter(|o| o.key_low < s.key_high && s.key_low < o.key_high)
                    .map(|o| o.number)
                    .collect();
                r.history.push(SegmentHistory {
                    number: s.number,
                    key_low: s.key_low,
                    key_high: s.key_high,
                    created_epoch: epoch,
                    sealed_epoch: None,
                    predecessors,
                });
            }
            r.segments.retain(|s| !p.seal.contains(&s.number));
            r.segments.extend(p.create.iter().cloned());
            r.segments.sort_by(|a, b| a.key_low.total_cmp(&b.key_low));
            r.epochs.push(EpochInfo {
                epoch,
                created_unix_ms: now_ms(),
                segments: r.segments.iter().map(|s| s.number).collect(),
            });
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

/// `n` equal ranges over [low, high).
pub fn split_range(low: f64, high: f64, n: u32) -> Vec<KeyRange> {
    KeyRange { low, high }.split(n)
}

/// Whether one completed scaling sealed exactly `seal` and created exactly `ranges`.
fn scaled_already(r: &StreamRecord, seal: &[u64], ranges: &[KeyRange]) -> bool {
    let sealed_at = |n: &u64| r.history.iter().find(|h| h.number == *n).and_then(|h| h.sealed_epoch);
    let Some(epoch) = seal.first().and_then(sealed_at) else { return false };
    if !seal.iter().all(|n| sealed_at(n) == Some(epoch)) {
        return false;
    }
    let sealed_then = r.history.iter().filter(|h| h.sealed_epoch == Some(epoch)).count();
    let mut created: Vec<&SegmentHistory> = r.history.iter().filter(|h| h.created_epoch == epoch).collect();
    created.sort_by(|a, b| a.key_low.total_cmp(&b.key_low));
    sealed_then == seal.len()
        && created.len() == ranges.len()
        && created.iter().zip(ranges).all(|(h, k)| h.key_low == k.low && h.key_high == k.high)
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
            assert_eq!(
                r.epochs.iter().map(|e| e.segments.clone()).collect::<Vec<_>>(),
                vec![vec![0, 1], vec![2, 3, 4, 1], vec![2, 3, 5]]
            );
            let five = r.history.iter().find(|h| h.number == 5).unwrap();
            assert_eq!((five.predecessors.clone(), five.created_epoch), (vec![4, 1], 2));
            assert_eq!(r.history.iter().find(|h| h.number == 1).unwrap().sealed_epoch, Some(2));
            assert!(r.scale.is_none());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
