//! State synchronizer: a shared, versioned state kept in a one-segment stream. The segment
//! holds framed records: a snapshot of the whole state, then updates. Every change is a
//! conditional append at the revision (segment length) the writer last saw, so concurrent
//! updaters never lose an update: the loser of a race re-reads and tries again. Appends
//! are numbered as one writer's, so one resent after a broken connection is answered as a
//! duplicate rather than failing its check against itself (and being applied twice).
//! Compaction appends a snapshot and truncates the segment before it; `compact_when` does it
//! only once the snapshot in use has grown old or been followed by many updates, and is
//! what a long-lived user calls now and then: an uncompacted state segment grows with every
//! update (and every newcomer replays them all), and without tier-2 its oldest bytes keep
//! the log files that hold them on disk.
//!
//! Record: event framing (`len u32`), then a type byte (1 snapshot, 2 update) and the
//! encoded snapshot or update.

use crate::client::Client;
use crate::error::ClientError;
use bytes::{Bytes, BytesMut};
use sluice_net::event::{encode_event, split_whole_events};
use sluice_net::{ErrorCode, Retention, ScalingPolicy};
use std::time::{Duration, Instant};

const SNAPSHOT: u8 = 1;
const UPDATE: u8 = 2;
/// After a failed conditional append, how long the re-read waits for the winner's bytes
/// to become durable (it returns as soon as they are).
const CONFLICT_WAIT: Duration = Duration::from_secs(1);

/// A state that can be shared through a synchronizer.
pub trait Synchronized: Clone + Send + Sized + 'static {
    type Update: Send;
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, String>;
    fn encode_update(update: &Self::Update) -> Vec<u8>;
    fn decode_update(bytes: &[u8]) -> Result<Self::Update, String>;
    fn apply(&mut self, update: &Self::Update);
}

pub struct StateSynchronizer<S: Synchronized> {
    client: Client,
    segment: String,
    state: Option<S>,
    revision: u64,
    /// Attempts of `update_state` before `SyncConflict`.
    pub max_attempts: u32,
    /// This synchronizer's appends are numbered as this writer's, so that an append resent
    /// after a broken connection is recognized instead of failing its check against its own
    /// first attempt (and the update then being applied twice).
    writer_id: u128,
    number: u64,
    /// Where the snapshot in use ends (the updates since are `revision - snapshot_end`
    /// bytes), and when this synchronizer first saw it.
    snapshot_end: u64,
    snapshot_seen: Instant,
}

/// How a conditional append at the current revision ended.
enum Appended {
    /// In, at this append.
    Now(sluice_net::messages::AppendAck),
    /// In already: an earlier attempt of this very append, whose answer was lost.
    Before,
    /// Someone else appended first.
    Conflict,
}

fn record(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    let mut r = Vec::with_capacity(1 + body.len());
    r.push(kind);
    r.extend_from_slice(body);
    encode_event(out, &r);
}

/// An rkyv archive of `v`: how synchronized states and their updates are written (reader
/// groups, retention marks).
pub fn archive<T>(v: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(v).expect("an in-memory value archives").to_vec()
}

impl Client {
    /// A synchronizer over the stream `scope/name` (created with one segment if missing).
    pub async fn state_synchronizer<S: Synchronized>(
        &self,
        scope: &str,
        name: &str,
    ) -> Result<StateSynchronizer<S>, ClientError> {
        // Any name: reader groups keep their state in `_rg_<group>` streams.
        let msg = sluice_net::messages::CreateStream {
            scope: scope.into(),
            stream: name.into(),
            segments: 1,
            retention: Retention::None,
            scaling: ScalingPolicy::Fixed { segments: 1 },
        };
        match self.create_stream_unchecked(msg).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
        let info = self.get_stream(scope, name).await?;
        if info.segments.len() != 1 {
            return Err(ClientError::InvalidArgument(format!(
                "{scope}/{name} has {} segments; a synchronizer needs one",
                info.segments.len()
            )));
        }
        let segment =
            sluice_net::ScopedStream::new(scope, name).segment_name(sluice_net::SegmentNumber(info.segments[0].number));
        Ok(StateSynchronizer {
            client: self.clone(),
            segment,
            state: None,
            revision: 0,
            max_attempts: 1000,
            writer_id: rand::random::<u128>() | 1,
            number: 0,
            snapshot_end: 0,
            snapshot_seen: Instant::now(),
        })
    }
}

impl<S: Synchronized> StateSynchronizer<S> {
    /// The state as of the last fetch or update (`None` before initialization).
    pub fn state(&self) -> Option<&S> {
        self.state.as_ref()
    }

    /// Segment offset up to which updates are applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Appends `records` if the segment is still at `revision`.
    async fn append_at_revision(&mut self, records: Vec<u8>) -> Result<Appended, ClientError> {
        self.number += 1;
        let r = self
            .client
            .append_raw_numbered(&self.segment, Bytes::from(records), Some(self.revision), self.writer_id, self.number)
            .await;
        match r {
            Ok(ack) if ack.duplicate => Ok(Appended::Before),
            Ok(ack) => Ok(Appended::Now(ack)),
            Err(e) if e.code() == Some(ErrorCode::ConditionalCheckFailed) => Ok(Appended::Conflict),
            Err(e) => Err(e),
        }
    }

    fn corrupt(&self, reason: String) -> ClientError {
        ClientError::SyncCorrupt { name: self.segment.clone(), reason }
    }

    /// Applies every record written since the last fetch.
    pub async fn fetch_updates(&mut self) -> Result<(), ClientError> {
        self.fetch(Duration::ZERO).await
    }

    /// Like `fetch_updates`, but when nothing new is durable yet, waits up to `wait` for it.
    /// After a failed conditional append this is what a retry needs: the append that won is
    /// accepted but may not be durable yet, and reads see only durable bytes; retrying at
    /// once would fail again (and again, for as long as the disk takes).
    async fn fetch(&mut self, mut wait: Duration) -> Result<(), ClientError> {
        let mut pending = BytesMut::new();
        loop {
            let at = self.revision + pending.len() as u64;
            let read = self.client.read_segment(&self.segment, at, 1 << 20, std::mem::take(&mut wait)).await;
            let (reply, data) = match read {
                Ok(r) => r,
                Err(ClientError::Server { code: ErrorCode::Truncated, offset: Some(start), .. }) => {
                    // Compacted past us: start over from the snapshot at the new start.
                    self.state = None;
                    self.revision = start;
                    pending.clear();
                    continue;
                }
                Err(e) => return Err(e),
            };
            pending.extend_from_slice(&data);
            let (ranges, used) = split_whole_events(&pending).map_err(|e| self.corrupt(e.to_string()))?;
            let whole: Bytes = pending.split_to(used).freeze();
            for r in ranges {
                let end = self.revision + r.end as u64;
                self.apply_record(&whole[r], end)?;
            }
            self.revision += used as u64;
            if data.is_empty() || self.revision + pending.len() as u64 >= reply.length {
                if pending.is_empty() {
                    return Ok(());
                }
                if data.is_empty() {
                    return Err(self.corrupt(format!("partial record at the end, offset {}", self.revision)));
                }
            }
        }
    }

    /// Applies one record, which ends at segment offset `end`.
    fn apply_record(&mut self, rec: &[u8], end: u64) -> Result<(), ClientError> {
        match rec.first() {
            Some(&SNAPSHOT) => {
                self.state = Some(S::decode(&rec[1..]).map_err(|e| self.corrupt(e))?);
                self.snapshot_taken(end);
            }
            Some(&UPDATE) => {
                let u = S::decode_update(&rec[1..]).map_err(|e| self.corrupt(e))?;
                match self.state.as_mut() {
                    Some(s) => s.apply(&u),
                    None => return Err(self.corrupt("update before any snapshot".into())),
                }
            }
            _ => return Err(self.corrupt("unknown record type".into())),
        }
        Ok(())
    }

    /// Writes `initial` if nobody initialized the state yet. Returns whether it did.
    pub async fn initialize(&mut self, initial: S) -> Result<bool, ClientError> {
        let mut wait = Duration::ZERO;
        loop {
            self.fetch(std::mem::replace(&mut wait, CONFLICT_WAIT)).await?;
            if self.state.is_some() {
                return Ok(false);
            }
            let mut buf = Vec::new();
            record(SNAPSHOT, &initial.encode(), &mut buf);
            match self.append_at_revision(buf).await? {
                Appended::Now(ack) => {
                    self.state = Some(initial);
                    self.revision = ack.length;
                    self.snapshot_taken(ack.length);
                    return Ok(true);
                }
                Appended::Before => {
                    // Durable (a duplicate is answered once it is): read it back.
                    self.fetch(Duration::ZERO).await?;
                    return Ok(true);
                }
                Appended::Conflict => continue,
            }
        }
    }

    /// Applies the updates `f` derives from the current state, atomically: if another
    /// writer got in first, re-reads and calls `f` again.
    pub async fn update_state<F>(&mut self, mut f: F) -> Result<(), ClientError>
    where
        F: FnMut(&S) -> Vec<S::Update>,
    {
        let mut wait = Duration::ZERO;
        for _ in 0..self.max_attempts {
            self.fetch(std::mem::replace(&mut wait, CONFLICT_WAIT)).await?;
            let state = self
                .state
                .as_ref()
                .ok_or_else(|| ClientError::InvalidArgument(format!("{} is not initialized", self.segment)))?;
            let updates = f(state);
            if updates.is_empty() {
                return Ok(());
            }
            let mut buf = Vec::new();
            for u in &updates {
                record(UPDATE, &S::encode_update(u), &mut buf);
            }
            match self.append_at_revision(buf).await? {
                Appended::Now(ack) => {
                    let s = self.state.as_mut().expect("checked above");
                    for u in &updates {
                        s.apply(u);
                    }
                    self.revision = ack.length;
                    return Ok(());
                }
                // In once, not twice: read it back (updates after it may follow).
                Appended::Before => return self.fetch(Duration::ZERO).await,
                Appended::Conflict => continue,
            }
        }
        Err(ClientError::SyncConflict { name: self.segment.clone(), attempts: self.max_attempts })
    }

    fn snapshot_taken(&mut self, end: u64) {
        if end != self.snapshot_end {
            self.snapshot_end = end;
            self.snapshot_seen = Instant::now();
        }
    }

    /// Whether, as of the last fetch, a compaction is due: the snapshot in use was first seen
    /// at least `age` ago, or more than `bytes` of updates follow it (see `compact_when`).
    pub fn compaction_due(&self, age: Duration, bytes: u64) -> bool {
        let after = self.revision.saturating_sub(self.snapshot_end);
        self.state.is_some() && (self.snapshot_seen.elapsed() >= age || after > bytes)
    }

    /// Writes a snapshot of the current state and truncates everything before it.
    pub async fn compact(&mut self) -> Result<(), ClientError> {
        self.compact_when(Duration::ZERO, 0).await.map(|_| ())
    }

    /// Compacts (as `compact`) if, after a fetch, the snapshot in use was seen at least
    /// `age` ago or more than `bytes` of updates follow it; several members calling this
    /// together compact once (the others see the new snapshot and find nothing due).
    /// Returns whether this call wrote a snapshot.
    pub async fn compact_when(&mut self, age: Duration, bytes: u64) -> Result<bool, ClientError> {
        let mut wait = Duration::ZERO;
        loop {
            self.fetch(std::mem::replace(&mut wait, CONFLICT_WAIT)).await?;
            if !self.compaction_due(age, bytes) {
                return Ok(false);
            }
            let Some(state) = &self.state else { return Ok(false) };
            let mut buf = Vec::new();
            record(SNAPSHOT, &state.encode(), &mut buf);
            match self.append_at_revision(buf).await? {
                Appended::Now(ack) => {
                    self.revision = ack.length;
                    self.snapshot_taken(ack.length);
                    self.client.truncate_segment(&self.segment, ack.offset).await?;
                    return Ok(true);
                }
                // The snapshot is in, but where is not known here: the next compaction
                // truncates (the state read back is the same either way).
                Appended::Before => {
                    self.fetch(Duration::ZERO).await?;
                    return Ok(true);
                }
                Appended::Conflict => continue,
            }
        }
    }
}
