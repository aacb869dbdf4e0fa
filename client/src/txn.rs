//! Transactions: events written into a transaction become visible all together on commit,
//! or never (abort, or a lease that ran out).
//!
//! `Client::begin_txn` opens one on the stream's current epoch: the server records it and
//! creates a shadow segment per segment of that epoch. `Transaction::write_event` frames
//! each event (its payload prefixed by its routing-key point, see `sluice_net::txn`) into a
//! buffer per shadow, sent as idempotent appends (this transaction's own writer id) when a
//! buffer fills or on `flush`. A background task pings the lease while the transaction
//! lives.
//!
//! Commit = `CommitTxn` (the record says `Committing` and the shadows are sealed), then
//! `finish_commit`: each shadow is read whole and its events are appended, points stripped,
//! to the segment that owned their keys in the transaction's epoch, in one append per target
//! with a writer id derived from (transaction, shadow, the segment they come from). A target
//! sealed by a scaling since refuses, and its events go on to its successors (split by key
//! point), hop by hop through the history; a target that already took them answers
//! "duplicate", also after a seal. So a commit step can be repeated any number of times, by
//! anyone: the committing client, or the controller's transaction service after a crash.
//! Once every shadow is moved, `FinishCommit`; the spent shadows are deleted after that, off
//! the commit's path (the server deletes any left over when the record is forgotten).
//! `Transaction::commit` returns as soon as every shadow is moved (the decision is durable
//! and every event visible) and sends `FinishCommit` in the background: one metadata sync
//! fewer on the commit's latency.

use crate::client::{Client, parse_stream};
use crate::error::ClientError;
use bytes::Bytes;
use sluice_net::event::{EventIter, encode_event, framed_len};
use sluice_net::messages::*;
use sluice_net::routing::key_point;
use sluice_net::txn::{
    TXN_POINT_BYTES, TXN_SEGMENT_BYTES_MAX, merge_writer_id, shadow_payload, shadow_segment_name, split_shadow_payload,
    txn_id_text,
};
use sluice_net::{ErrorCode, ScopedStream, TxnState};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Bytes buffered per shadow segment before they are sent.
const TXN_BUFFER_BYTES: usize = 1 << 20;

/// How a transaction is opened.
#[derive(Clone, Debug)]
pub struct TxnConfig {
    /// The transaction aborts if nothing renews its lease for this long.
    pub lease: Duration,
    /// Renew the lease in the background (every third of it) while the transaction lives.
    pub auto_ping: bool,
}

impl Default for TxnConfig {
    fn default() -> Self {
        Self { lease: Duration::from_secs(30), auto_ping: true }
    }
}

struct Shadow {
    number: u64,
    low: f64,
    high: f64,
    name: String,
    /// Framed events not sent yet, and how many.
    buf: Vec<u8>,
    count: u32,
    /// Number of the next event to send (numbers start at 1).
    next: u64,
    /// Bytes sent or buffered.
    bytes: u64,
}

/// An open transaction. Dropping it without `commit` or `abort` lets its lease run out
/// (it then aborts).
pub struct Transaction {
    client: Client,
    stream: ScopedStream,
    info: TxnInfo,
    writer_id: u128,
    shadows: Vec<Shadow>,
    pinger: Option<JoinHandle<()>>,
    /// A send failed: events may be missing, so the transaction can only abort.
    failed: Option<ClientError>,
}

impl Client {
    /// Opens a transaction on `scope/stream` with a 30 s lease, renewed in the background.
    pub async fn begin_txn(&self, stream: &str) -> Result<Transaction, ClientError> {
        self.begin_txn_with(stream, TxnConfig::default()).await
    }

    pub async fn begin_txn_with(&self, stream: &str, config: TxnConfig) -> Result<Transaction, ClientError> {
        let s = parse_stream(stream)?;
        let lease_ms = config.lease.as_millis().min(u128::from(u64::MAX)) as u64;
        // The id is ours, so a request retried after a lost connection resumes the same
        // transaction instead of opening a second one.
        let txn = rand::random::<u128>().max(1);
        let info: TxnInfo =
            self.admin(BeginTxn { scope: s.scope.clone(), stream: s.stream.clone(), txn, lease_ms }).await?;
        let shadows = info
            .segments
            .iter()
            .map(|r| Shadow {
                number: r.number,
                low: r.key_low,
                high: r.key_high,
                name: shadow_segment_name(&s.scope, &s.stream, r.number, info.txn),
                buf: Vec::new(),
                count: 0,
                next: 1,
                bytes: 0,
            })
            .collect();
        let pinger = config.auto_ping.then(|| {
            let (client, s, txn) = (self.clone(), s.clone(), info.txn);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(lease_ms / 3)).await;
                    if let Err(e) = client.ping_txn(&s.scope, &s.stream, txn, lease_ms).await {
                        tracing::debug!(txn = %txn_id_text(txn), error = %e, "transaction ping failed; stop pinging");
                        return;
                    }
                }
            })
        });
        let writer_id = rand::random::<u128>().max(1);
        Ok(Transaction { client: self.clone(), stream: s, info, writer_id, shadows, pinger, failed: None })
    }

    /// A transaction's record.
    pub async fn get_txn(&self, scope: &str, stream: &str, txn: u128) -> Result<TxnInfo, ClientError> {
        self.admin(GetTxn { scope: scope.into(), stream: stream.into(), txn }).await
    }

    /// Transactions of a stream (or of a scope, `stream` empty; or of every stream, both empty).
    pub async fn list_txns(&self, scope: &str, stream: &str) -> Result<Vec<TxnInfo>, ClientError> {
        crate::client::all_pages(|after| async move { self.list_txns_page(scope, stream, &after, 0).await }).await
    }

    /// One page of `list_txns`: at most `limit` transactions (0: the server's page size,
    /// 1000) after the cursor `after` (`""`: from the first), and the next page's cursor
    /// if there is one.
    pub async fn list_txns_page(
        &self,
        scope: &str,
        stream: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<TxnInfo>, Option<String>), ClientError> {
        let m = ListTxns { scope: scope.into(), stream: stream.into(), after: after.into(), limit };
        let page = self.admin::<_, TxnList>(m).await?;
        Ok((page.txns, crate::client::cursor(page.next)))
    }

    /// Renews an open transaction's lease: it runs out `lease_ms` from now.
    pub async fn ping_txn(&self, scope: &str, stream: &str, txn: u128, lease_ms: u64) -> Result<TxnInfo, ClientError> {
        self.admin(PingTxn { scope: scope.into(), stream: stream.into(), txn, lease_ms }).await
    }

    /// Aborts a transaction (open or aborting); its events are discarded.
    pub async fn abort_txn(&self, scope: &str, stream: &str, txn: u128) -> Result<TxnInfo, ClientError> {
        self.admin(AbortTxn { scope: scope.into(), stream: stream.into(), txn }).await
    }

    /// Commits a transaction whose events are all written (or finishes a commit someone
    /// else decided): returns once every event is in the stream.
    pub async fn commit_txn(&self, scope: &str, stream: &str, txn: u128) -> Result<TxnInfo, ClientError> {
        let info: TxnInfo =
            self.admin(CommitTxn { scope: scope.into(), stream: stream.into(), txn, lengths: Vec::new() }).await?;
        self.finish_commit(&info).await
    }

    /// Removes a committed or aborted transaction's record.
    pub async fn forget_txn(&self, scope: &str, stream: &str, txn: u128) -> Result<(), ClientError> {
        self.admin_once(ForgetTxn { scope: scope.into(), stream: stream.into(), txn }, ErrorCode::NoSuchTxn).await
    }

    /// Moves a committing transaction's events into the stream and records it committed.
    /// Every step may be repeated; concurrent callers do no harm.
    pub async fn finish_commit(&self, info: &TxnInfo) -> Result<TxnInfo, ClientError> {
        match info.state {
            TxnState::Committed => return Ok(info.clone()),
            TxnState::Committing => {}
            other => {
                return Err(ClientError::InvalidArgument(format!(
                    "transaction {} is {other}, not committing",
                    txn_id_text(info.txn)
                )));
            }
        }
        self.move_shadows(info).await?;
        self.record_commit(info).await
    }

    /// Every shadow is moved: the record says `Committed`, and the spent shadows go.
    async fn record_commit(&self, info: &TxnInfo) -> Result<TxnInfo, ClientError> {
        let done: TxnInfo =
            self.admin(FinishCommit { scope: info.scope.clone(), stream: info.stream.clone(), txn: info.txn }).await?;
        self.delete_shadows_later(info);
        Ok(done)
    }

    /// Every shadow's events into the stream (each move may be repeated).
    async fn move_shadows(&self, info: &TxnInfo) -> Result<(), ClientError> {
        let moves = info.segments.iter().map(|r| self.move_shadow(info, r.number));
        for r in futures::future::join_all(moves).await {
            r?;
        }
        Ok(())
    }

    /// The shadows are spent: delete them off the commit's path. One left behind (this
    /// process stopped) goes when the record is forgotten or the stream deleted.
    fn delete_shadows_later(&self, info: &TxnInfo) {
        let (client, info) = (self.clone(), info.clone());
        tokio::spawn(async move { client.delete_shadows(&info).await });
    }

    async fn delete_shadows(&self, info: &TxnInfo) {
        for r in &info.segments {
            let shadow = shadow_segment_name(&info.scope, &info.stream, r.number, info.txn);
            if let Err(e) = self.delete_segment(&shadow).await
                && e.code() != Some(ErrorCode::NoSuchSegment)
            {
                tracing::debug!(%shadow, error = %e, "deleting a committed transaction's shadow failed");
            }
        }
    }

    /// One shadow's events into the stream (nothing to do if the shadow is gone already).
    /// The server merges the shadow into its segment in one step; only when the segment was
    /// sealed by a scaling does the client read the shadow and append its events to the
    /// successors (numbered with `merge_writer_id`, so a repeated move drops duplicates).
    async fn move_shadow(&self, info: &TxnInfo, number: u64) -> Result<(), ClientError> {
        let shadow = shadow_segment_name(&info.scope, &info.stream, number, info.txn);
        let length = info.segments.iter().position(|r| r.number == number).and_then(|i| info.lengths.get(i)).copied();
        let target = format!("{}/{}/{number}", info.scope, info.stream);
        let merge = MergeSegment { segment: target.clone(), source: shadow.clone(), source_length: length };
        match self.segment_call::<_, AppendAck>(&target, merge, Bytes::new()).await {
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.code(), Some(ErrorCode::Sealed | ErrorCode::NoSuchSegment)) => {}
            Err(e) => return Err(e),
        }
        let data = match length {
            Some(len) => self.read_prefix(&shadow, len).await?,
            None => self.read_sealed_whole(&shadow).await?,
        };
        let Some(data) = data else { return Ok(()) };
        let mut events = Vec::new();
        for e in EventIter::new(&data) {
            let e = e.map_err(|e| corrupt(&shadow, &e.to_string()))?;
            let (point, payload) =
                split_shadow_payload(e).ok_or_else(|| corrupt(&shadow, "event without a key point"))?;
            events.push((point, payload));
        }
        // (segment, the sealed segment the events come from, events): a worklist instead of
        // recursion through the successors.
        let mut work = vec![(number, None, events)];
        let mut history: Option<StreamHistory> = None;
        while let Some((segment, from, events)) = work.pop() {
            if events.is_empty() {
                continue;
            }
            let mut payload = Vec::with_capacity(events.iter().map(|e| framed_len(e.1.len())).sum());
            for (_, p) in &events {
                encode_event(&mut payload, p);
            }
            let name = format!("{}/{}/{segment}", info.scope, info.stream);
            let msg = Append {
                segment: name.clone(),
                writer_id: merge_writer_id(info.txn, number, from),
                first_event_number: 1,
                event_count: events.len() as u32,
                expected_offset: None,
            };
            match self.segment_call::<_, AppendAck>(&name, msg, Bytes::from(payload)).await {
                Ok(_) => continue,
                Err(e) if matches!(e.code(), Some(ErrorCode::Sealed | ErrorCode::NoSuchSegment)) => {
                    // Replaced by a scaling (or gone with retention): on to its successors.
                    if history.as_ref().is_none_or(|h| h.successors(segment).next().is_none()) {
                        history = Some(self.stream_history(&info.scope, &info.stream).await?);
                    }
                    let h = history.as_ref().expect("fetched");
                    let next: Vec<&SegmentHistory> = h.successors(segment).collect();
                    if next.is_empty() {
                        // The stream itself was sealed: nowhere to put them.
                        return Err(e);
                    }
                    let mut parts: Vec<Vec<(f64, &[u8])>> = vec![Vec::new(); next.len()];
                    for (point, p) in events {
                        let i = next
                            .iter()
                            .position(|s| s.key_low <= point && point < s.key_high)
                            .ok_or_else(|| corrupt(&shadow, &format!("no successor of {segment} holds key {point}")))?;
                        parts[i].push((point, p));
                    }
                    for (s, part) in next.iter().zip(parts) {
                        work.push((s.number, Some(segment), part));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The first `len` bytes of a segment (sealed or not); `None` if it does not exist (any
    /// more).
    async fn read_prefix(&self, segment: &str, len: u64) -> Result<Option<Bytes>, ClientError> {
        let mut out = Vec::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let at = out.len() as u64;
            let want = (len - at).min(8 << 20) as u32;
            match self.read_segment(segment, at, want, Duration::ZERO).await {
                Ok((_, data)) if data.is_empty() => {
                    return Err(corrupt(segment, &format!("it holds {at} bytes, the commit recorded {len}")));
                }
                Ok((_, data)) => out.extend_from_slice(&data[..data.len().min((len - at) as usize)]),
                Err(e) if e.code() == Some(ErrorCode::NoSuchSegment) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(Bytes::from(out)))
    }

    /// All bytes of a sealed segment; `None` if it does not exist (any more).
    async fn read_sealed_whole(&self, segment: &str) -> Result<Option<Bytes>, ClientError> {
        let mut out = Vec::new();
        loop {
            let at = out.len() as u64;
            match self.read_segment(segment, at, 8 << 20, Duration::ZERO).await {
                Ok((reply, data)) => {
                    if !reply.sealed {
                        return Err(ClientError::InvalidArgument(format!(
                            "{segment} is not sealed: the transaction's commit was not decided"
                        )));
                    }
                    out.extend_from_slice(&data);
                    if reply.end_of_segment || data.is_empty() {
                        return Ok(Some(Bytes::from(out)));
                    }
                }
                Err(e) if e.code() == Some(ErrorCode::NoSuchSegment) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) async fn delete_segment(&self, segment: &str) -> Result<(), ClientError> {
        self.segment_call::<_, Done>(segment, DeleteSegment { segment: segment.into() }, Bytes::new()).await.map(|_| ())
    }
}

fn corrupt(segment: &str, why: &str) -> ClientError {
    ClientError::Server {
        code: ErrorCode::Internal,
        message: format!("transaction shadow {segment} is malformed: {why}"),
        endpoint: None,
        offset: None,
    }
}

impl Transaction {
    pub fn id(&self) -> u128 {
        self.info.txn
    }

    /// The record as it was when the transaction opened.
    pub fn info(&self) -> &TxnInfo {
        &self.info
    }

    pub fn stream(&self) -> &ScopedStream {
        &self.stream
    }

    /// Adds an event; it becomes visible with the others on commit. Events with the same
    /// routing key keep their order. May send a full buffer (and wait for it).
    pub async fn write_event(&mut self, routing_key: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let max = sluice_net::constants::EVENT_BYTES_MAX - TXN_POINT_BYTES;
        if payload.len() > max {
            return Err(ClientError::InvalidArgument(format!(
                "a transaction event holds at most {max} bytes, not {}",
                payload.len()
            )));
        }
        let point = key_point(routing_key);
        let i = self.shadows.iter().position(|s| s.low <= point && point < s.high).expect("the epoch covers [0, 1)");
        let framed = framed_len(TXN_POINT_BYTES + payload.len()) as u64;
        let s = &self.shadows[i];
        if s.bytes + framed > TXN_SEGMENT_BYTES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "transaction {} is full: at most {TXN_SEGMENT_BYTES_MAX} bytes per segment (segment {})",
                txn_id_text(self.info.txn),
                s.number
            )));
        }
        // Appends stay within the node's limit (small log files take small appends).
        let buffer_max = TXN_BUFFER_BYTES.min(self.client.append_bytes_max());
        if !s.buf.is_empty() && s.buf.len() + framed as usize > buffer_max {
            self.send(i).await?;
        }
        let s = &mut self.shadows[i];
        encode_event(&mut s.buf, &shadow_payload(point, payload));
        s.count += 1;
        s.bytes += framed;
        if s.buf.len() >= buffer_max {
            self.send(i).await?;
        }
        Ok(())
    }

    async fn send(&mut self, i: usize) -> Result<(), ClientError> {
        let s = &mut self.shadows[i];
        if s.count == 0 {
            return Ok(());
        }
        let msg = Append {
            segment: s.name.clone(),
            writer_id: self.writer_id,
            first_event_number: s.next,
            event_count: s.count,
            expected_offset: None,
        };
        let data = Bytes::from(std::mem::take(&mut s.buf));
        let r = self.client.segment_call::<_, AppendAck>(&s.name, msg, data).await;
        s.next += u64::from(s.count);
        s.count = 0;
        let r = r.map(|_| ()).map_err(|e| match e.code() {
            Some(ErrorCode::Sealed | ErrorCode::NoSuchSegment) => ClientError::Server {
                code: ErrorCode::TxnNotOpen,
                message: format!(
                    "transaction {} takes no more events (committed, aborted or expired): {e}",
                    txn_id_text(self.info.txn)
                ),
                endpoint: None,
                offset: None,
            },
            _ => e,
        });
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Sends every buffered event and waits until they are durable in the shadows.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        for i in 0..self.shadows.len() {
            self.send(i).await?;
        }
        Ok(())
    }

    /// Renews the lease now.
    pub async fn ping(&self) -> Result<TxnInfo, ClientError> {
        self.client.ping_txn(&self.stream.scope, &self.stream.stream, self.info.txn, self.info.lease_ms).await
    }

    /// The transaction's current state.
    pub async fn status(&self) -> Result<TxnState, ClientError> {
        Ok(self.client.get_txn(&self.stream.scope, &self.stream.stream, self.info.txn).await?.state)
    }

    /// Flushes, then commits: on `Ok` the commit is decided for good and every event of the
    /// transaction is in the stream (the returned state is `Committed`). The record's last
    /// step (`Committing` → `Committed`, what `status` and `sluice txn list` show) and the
    /// deletion of the spent shadows follow in the background, off the commit's latency; if
    /// this process stops first, the controller's transaction service completes them. An
    /// error before the commit was decided leaves the transaction open (or aborted, if its
    /// lease ran out); after, anyone (or the controller) finishes the commit.
    pub async fn commit(self) -> Result<TxnInfo, ClientError> {
        self.commit_with(false).await
    }

    /// `commit`, then also waits until the record says `Committed` (and deletes the spent
    /// shadows): for a process that exits right after (the CLI), or a caller that lists
    /// transactions next. One metadata write more on the latency.
    pub async fn commit_recorded(self) -> Result<TxnInfo, ClientError> {
        self.commit_with(true).await
    }

    async fn commit_with(mut self, await_record: bool) -> Result<TxnInfo, ClientError> {
        self.flush().await?;
        self.stop_pinging();
        let (scope, stream, txn) = (&self.stream.scope, &self.stream.stream, self.info.txn);
        // What this transaction wrote into each shadow, all acknowledged: the server checks
        // and records it, so nothing needs sealing before the events move.
        let lengths = self
            .info
            .segments
            .iter()
            .map(|r| self.shadows.iter().find(|s| s.number == r.number).map_or(0, |s| s.bytes))
            .collect();
        let mut info: TxnInfo =
            self.client.admin(CommitTxn { scope: scope.clone(), stream: stream.clone(), txn, lengths }).await?;
        if info.state == TxnState::Committed {
            return Ok(info);
        }
        if await_record {
            return self.client.finish_commit(&info).await;
        }
        // `Committing` here (anything else was refused): move, then record in the background.
        self.client.move_shadows(&info).await?;
        let (client, recorded) = (self.client.clone(), info.clone());
        tokio::spawn(async move {
            if let Err(e) = client.record_commit(&recorded).await {
                tracing::debug!(txn = %txn_id_text(txn), error = %e, "recording a commit as finished failed; the transaction service will");
            }
        });
        info.state = TxnState::Committed;
        Ok(info)
    }

    /// Aborts: no event of the transaction will ever be visible.
    pub async fn abort(mut self) -> Result<TxnInfo, ClientError> {
        self.stop_pinging();
        self.client.abort_txn(&self.stream.scope, &self.stream.stream, self.info.txn).await
    }

    fn stop_pinging(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
    }
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("stream", &self.stream.to_string())
            .field("id", &txn_id_text(self.info.txn))
            .field("epoch", &self.info.epoch)
            .finish()
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.stop_pinging();
    }
}
