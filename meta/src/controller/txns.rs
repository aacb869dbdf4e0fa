//! Transaction records: one per transaction at `txns/<scope>/<stream>/<id as 32 hex>`.
//!
//! The record is the transaction's single source of truth; every change is a
//! compare-and-swap on it. `Open` → `Committing` → `Committed`, or `Open` → `Aborting` →
//! `Aborted`; the middle states are decisions already taken, so whoever finds one (the
//! client, or the controller's transaction service after a crash) finishes it. An open
//! transaction whose lease ran out can only abort: `begin_commit` refuses it (and starts
//! the abort). Leases are wall-clock deadlines kept in the record.

use super::{Controller, ControllerError, Record, StreamSegment, StreamState, now_ms};
use crate::store::{MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};
use sluice_net::TxnState;
use sluice_net::txn::{TXN_LEASE_MS_MAX, TXN_LEASE_MS_MIN, txn_id_text};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TxnRecord {
    pub id: u128,
    pub state: TxnState,
    /// The stream epoch it was opened in, and that epoch's segments (each has a shadow).
    pub epoch: u64,
    pub segments: Vec<StreamSegment>,
    pub lease_ms: u64,
    pub lease_expires_unix_ms: u64,
    pub created_unix_ms: u64,
    /// When it became committed or aborted (0 before).
    pub finished_unix_ms: u64,
    /// Committing by lengths: the bytes of each shadow (in `segments` order) the commit
    /// moves; empty: the shadows were sealed at the decision and are moved whole.
    pub lengths: Vec<u64>,
}

record!(TxnRecord, "a transaction record");

fn txn_prefix(scope: &str, stream: &str) -> String {
    format!("txns/{scope}/{stream}/")
}

fn txn_key(scope: &str, stream: &str, id: u128) -> String {
    format!("{}{}", txn_prefix(scope, stream), txn_id_text(id))
}

/// The key prefix of the transactions `list_txns` lists.
fn txn_list_prefix(scope: &str, stream: &str) -> String {
    match (scope.is_empty(), stream.is_empty()) {
        (true, _) => "txns/".to_string(),
        (false, true) => format!("txns/{scope}/"),
        (false, false) => txn_prefix(scope, stream),
    }
}

/// A listed transaction record as `(scope, stream, record)`.
fn decode_listed(key: &str, v: &crate::store::Versioned) -> Result<(String, String, TxnRecord), ControllerError> {
    let mut parts = key["txns/".len()..].splitn(3, '/');
    let (Some(sc), Some(st), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(MetaError::Corrupt(format!("{key}: not a transaction key")).into());
    };
    Ok((sc.to_string(), st.to_string(), TxnRecord::decode(key, &v.value)?))
}

fn check_lease(lease_ms: u64) -> Result<(), ControllerError> {
    if (TXN_LEASE_MS_MIN..=TXN_LEASE_MS_MAX).contains(&lease_ms) {
        Ok(())
    } else {
        Err(ControllerError::Invalid(format!(
            "a transaction lease must be {TXN_LEASE_MS_MIN} ms to {TXN_LEASE_MS_MAX} ms, not {lease_ms} ms"
        )))
    }
}

impl<S: MetaStore> Controller<S> {
    /// Records a new open transaction `id` (chosen by the client) on the stream's current
    /// epoch. The same id again, while it is open, returns the record (a retried request
    /// resumes); after that it is refused. The caller creates its shadow segments next; a
    /// crash in between leaves an open transaction that a retry resumes or that expires and
    /// aborts (deleting whatever shadows exist).
    pub async fn begin_txn(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
        lease_ms: u64,
    ) -> Result<TxnRecord, ControllerError> {
        check_lease(lease_ms)?;
        let r = self.get_stream(scope, stream).await?;
        match r.state {
            StreamState::Active => {}
            StreamState::Creating => {
                return Err(ControllerError::NoSuchStream(format!("{scope}/{stream} (still being created)")));
            }
            StreamState::Sealing | StreamState::Sealed => {
                return Err(ControllerError::Sealed(format!("{scope}/{stream}")));
            }
        }
        let now = now_ms();
        let record = TxnRecord {
            id,
            state: TxnState::Open,
            epoch: r.epoch(),
            segments: r.segments.clone(),
            lease_ms,
            lease_expires_unix_ms: now + lease_ms,
            created_unix_ms: now,
            finished_unix_ms: 0,
            lengths: Vec::new(),
        };
        match self.store.compare_and_swap(&txn_key(scope, stream, id), 0, record.encode()).await {
            Ok(_) => Ok(record),
            Err(MetaError::Conflict { .. }) => match self.get_txn(scope, stream, id).await? {
                t if t.state == TxnState::Open => Ok(t),
                t => Err(not_open(&t, "begin")),
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn get_txn_versioned(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
    ) -> Result<(TxnRecord, u64), ControllerError> {
        let key = txn_key(scope, stream, id);
        let v = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ControllerError::NoSuchTxn(format!("{} on {scope}/{stream}", txn_id_text(id))))?;
        Ok((TxnRecord::decode(&key, &v.value)?, v.version))
    }

    pub async fn get_txn(&self, scope: &str, stream: &str, id: u128) -> Result<TxnRecord, ControllerError> {
        Ok(self.get_txn_versioned(scope, stream, id).await?.0)
    }

    /// Transactions of one stream, or (`stream` empty) of every stream of `scope`, or
    /// (both empty) of every stream, as `(scope, stream, record)`.
    pub async fn list_txns(
        &self,
        scope: &str,
        stream: &str,
    ) -> Result<Vec<(String, String, TxnRecord)>, ControllerError> {
        self.store.range(&txn_list_prefix(scope, stream)).await?.iter().map(|(k, v)| decode_listed(k, v)).collect()
    }

    /// One page of `list_txns`: at most `limit` transactions after the cursor `after` (`""`:
    /// from the first), fewer if their records pass `bytes_max` (at least one), and the
    /// cursor of the next page if there is one (one more is fetched to know).
    pub async fn list_txns_page(
        &self,
        scope: &str,
        stream: &str,
        after: &str,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<(String, String, TxnRecord)>, Option<String>), ControllerError> {
        let prefix = txn_list_prefix(scope, stream);
        if !after.is_empty() && !after.starts_with(&prefix) {
            return Err(ControllerError::Invalid(format!("'{after}' is not a cursor of this transaction list")));
        }
        let limit = limit.max(1);
        let mut page = self.store.range_page(&prefix, after, limit + 1).await?;
        let full = page.len() > limit;
        page.truncate(limit);
        let mut bytes = 0;
        let fit = page
            .iter()
            .position(|(k, v)| {
                bytes += k.len() + v.value.len();
                bytes > bytes_max
            })
            .map_or(page.len(), |i| i.max(1));
        let cut = fit < page.len();
        page.truncate(fit);
        let next = if full || cut { page.last().map(|(k, _)| k.clone()) } else { None };
        let txns = page.iter().map(|(k, v)| decode_listed(k, v)).collect::<Result<_, _>>()?;
        Ok((txns, next))
    }

    /// Changes a transaction record (see `update_key`).
    async fn update_txn(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
        change: impl Fn(&mut TxnRecord) -> Result<bool, ControllerError>,
    ) -> Result<TxnRecord, ControllerError> {
        self.update_key(&txn_key(scope, stream, id), change)
            .await?
            .ok_or_else(|| ControllerError::NoSuchTxn(format!("{} on {scope}/{stream}", txn_id_text(id))))
    }

    /// Renews an open transaction's lease.
    pub async fn ping_txn(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
        lease_ms: u64,
    ) -> Result<TxnRecord, ControllerError> {
        check_lease(lease_ms)?;
        let now = now_ms();
        self.update_txn(scope, stream, id, |t| {
            if t.state != TxnState::Open {
                return Err(not_open(t, "ping"));
            }
            if now > t.lease_expires_unix_ms {
                return Err(expired(t));
            }
            t.lease_ms = lease_ms;
            t.lease_expires_unix_ms = now + lease_ms;
            Ok(true)
        })
        .await
    }

    /// Decides to commit: `Open` (lease not run out) → `Committing`. Already committing or
    /// committed: returned as is (a retry continues). The stream must still be active (a
    /// stream being sealed aborts its open transactions).
    pub async fn begin_commit(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
        lengths: &[u64],
    ) -> Result<TxnRecord, ControllerError> {
        let r = self.get_stream(scope, stream).await?;
        let now = now_ms();
        let sealing = matches!(r.state, StreamState::Sealing | StreamState::Sealed);
        self.update_txn(scope, stream, id, |t| match t.state {
            TxnState::Committing | TxnState::Committed => Ok(false),
            TxnState::Aborting | TxnState::Aborted => Err(not_open(t, "commit")),
            TxnState::Open if now > t.lease_expires_unix_ms => Err(expired(t)),
            TxnState::Open if sealing => Err(ControllerError::Sealed(format!("{scope}/{stream}"))),
            TxnState::Open => {
                t.state = TxnState::Committing;
                t.lengths = lengths.to_vec();
                Ok(true)
            }
        })
        .await
    }

    /// Every shadow's events are in the stream: `Committing` → `Committed`.
    pub async fn end_commit(&self, scope: &str, stream: &str, id: u128) -> Result<TxnRecord, ControllerError> {
        self.finish(scope, stream, id, TxnState::Committing, TxnState::Committed, "finish committing").await
    }

    /// `from` → `to` (final), stamping the finish time; already `to`: as is.
    async fn finish(
        &self,
        scope: &str,
        stream: &str,
        id: u128,
        from: TxnState,
        to: TxnState,
        what: &str,
    ) -> Result<TxnRecord, ControllerError> {
        let now = now_ms();
        self.update_txn(scope, stream, id, |t| {
            if t.state == to {
                Ok(false)
            } else if t.state == from {
                t.state = to;
                t.finished_unix_ms = now;
                Ok(true)
            } else {
                Err(not_open(t, what))
            }
        })
        .await
    }

    /// Decides to abort: `Open` → `Aborting` (already aborting or aborted: as is). A
    /// transaction being committed cannot abort.
    pub async fn begin_abort(&self, scope: &str, stream: &str, id: u128) -> Result<TxnRecord, ControllerError> {
        self.update_txn(scope, stream, id, |t| match t.state {
            TxnState::Aborting | TxnState::Aborted => Ok(false),
            TxnState::Committing | TxnState::Committed => Err(not_open(t, "abort")),
            TxnState::Open => {
                t.state = TxnState::Aborting;
                Ok(true)
            }
        })
        .await
    }

    /// Its shadow segments are gone: `Aborting` → `Aborted`.
    pub async fn end_abort(&self, scope: &str, stream: &str, id: u128) -> Result<TxnRecord, ControllerError> {
        self.finish(scope, stream, id, TxnState::Aborting, TxnState::Aborted, "finish aborting").await
    }

    /// Removes a committed or aborted transaction's record (or, `any`, any record: when its
    /// stream is deleted).
    pub async fn forget_txn(&self, scope: &str, stream: &str, id: u128, any: bool) -> Result<(), ControllerError> {
        let (t, version) = match self.get_txn_versioned(scope, stream, id).await {
            Ok(v) => v,
            Err(ControllerError::NoSuchTxn(_)) if any => return Ok(()),
            Err(e) => return Err(e),
        };
        if !any && !t.state.is_final() {
            return Err(ControllerError::TxnNotOpen(format!(
                "transaction {} is {}; only a committed or aborted one can be forgotten",
                txn_id_text(id),
                t.state
            )));
        }
        match self.store.delete(&txn_key(scope, stream, id), Some(version)).await {
            Ok(_) => Ok(()),
            Err(MetaError::Conflict { .. }) => {
                Err(ControllerError::Busy(format!("transaction {} changed meanwhile; retry", txn_id_text(id))))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn not_open(t: &TxnRecord, what: &str) -> ControllerError {
    ControllerError::TxnNotOpen(format!("cannot {what} transaction {}: it is {}", txn_id_text(t.id), t.state))
}

fn expired(t: &TxnRecord) -> ControllerError {
    ControllerError::TxnNotOpen(format!("transaction {} is open but its lease ran out (it aborts)", txn_id_text(t.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;
    use futures::executor::block_on;
    use sluice_net::{Retention, ScalingPolicy};

    #[test]
    fn transaction_states_move_one_way() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-txn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            c.create_scope("s").await.unwrap();
            c.begin_create_stream("s", "t", 2, Retention::None, ScalingPolicy::Fixed { segments: 2 }).await.unwrap();
            assert!(matches!(c.begin_txn("s", "t", 1, 1000).await, Err(ControllerError::NoSuchStream(_))));
            c.set_state("s", "t", StreamState::Active).await.unwrap();
            assert!(matches!(c.begin_txn("s", "t", 1, 0).await, Err(ControllerError::Invalid(_))));
            let t = c.begin_txn("s", "t", 1, 1000).await.unwrap();
            assert_eq!((t.state, t.epoch, t.segments.len()), (TxnState::Open, 0, 2));
            // A retried begin resumes the open transaction.
            assert_eq!(c.begin_txn("s", "t", 1, 1000).await.unwrap().created_unix_ms, t.created_unix_ms);
            assert!(matches!(c.get_txn("s", "t", 9).await, Err(ControllerError::NoSuchTxn(_))));
            c.ping_txn("s", "t", 1, 2000).await.unwrap();
            // Commit: idempotent, then no abort; finished once.
            let t = c.begin_commit("s", "t", 1, &[10, 20]).await.unwrap();
            assert_eq!((t.state, t.lengths), (TxnState::Committing, vec![10, 20]));
            // A repeat answers the decided record as is (its lengths too).
            let t = c.begin_commit("s", "t", 1, &[]).await.unwrap();
            assert_eq!((t.state, t.lengths), (TxnState::Committing, vec![10, 20]));
            assert!(matches!(c.begin_abort("s", "t", 1).await, Err(ControllerError::TxnNotOpen(_))));
            assert!(matches!(c.ping_txn("s", "t", 1, 1000).await, Err(ControllerError::TxnNotOpen(_))));
            assert!(matches!(c.forget_txn("s", "t", 1, false).await, Err(ControllerError::TxnNotOpen(_))));
            let done = c.end_commit("s", "t", 1).await.unwrap();
            assert!(done.state == TxnState::Committed && done.finished_unix_ms > 0);
            assert_eq!(c.end_commit("s", "t", 1).await.unwrap(), done);
            // Abort: then no commit.
            c.begin_txn("s", "t", 2, 1000).await.unwrap();
            assert_eq!(c.begin_abort("s", "t", 2).await.unwrap().state, TxnState::Aborting);
            assert!(matches!(c.begin_commit("s", "t", 2, &[]).await, Err(ControllerError::TxnNotOpen(_))));
            assert_eq!(c.end_abort("s", "t", 2).await.unwrap().state, TxnState::Aborted);
            assert!(matches!(c.begin_txn("s", "t", 2, 1000).await, Err(ControllerError::TxnNotOpen(_))));
            // An expired lease cannot commit.
            c.begin_txn("s", "t", 3, 100).await.unwrap();
            std::thread::sleep(std::time::Duration::from_millis(150));
            assert!(matches!(c.begin_commit("s", "t", 3, &[]).await, Err(ControllerError::TxnNotOpen(_))));
            assert_eq!(c.list_txns("s", "t").await.unwrap().len(), 3);
            assert_eq!(c.list_txns("s", "").await.unwrap().len(), 3);
            assert_eq!(c.list_txns("", "").await.unwrap().len(), 3);
            c.forget_txn("s", "t", 1, false).await.unwrap();
            c.forget_txn("s", "t", 3, true).await.unwrap();
            c.forget_txn("s", "t", 3, true).await.unwrap();
            let left: Vec<u128> = c.list_txns("s", "t").await.unwrap().into_iter().map(|x| x.2.id).collect();
            assert_eq!(left, vec![2]);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lists come a page at a time, by count and by bytes, and the pages add up to the list.
    #[test]
    fn transaction_lists_come_in_pages() {
        let dir = std::env::temp_dir().join(format!("sluice-ctl-txn-pages-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Controller::new(EmbeddedStore::open(&dir).unwrap());
        block_on(async {
            c.create_scope("s").await.unwrap();
            for stream in ["a", "b"] {
                c.begin_create_stream("s", stream, 3, Retention::None, ScalingPolicy::Fixed { segments: 3 })
                    .await
                    .unwrap();
                c.set_state("s", stream, StreamState::Active).await.unwrap();
                for id in 1..=25u128 {
                    c.begin_txn("s", stream, id, 60_000).await.unwrap();
                }
            }
            let pages = |scope: &'static str, stream: &'static str, limit: usize, bytes: usize| {
                let c = c.clone();
                async move {
                    let (mut all, mut sizes, mut after) = (Vec::new(), Vec::new(), String::new());
                    loop {
                        let (page, next) = c.list_txns_page(scope, stream, &after, limit, bytes).await.unwrap();
                        sizes.push(page.len());
                        all.extend(page.into_iter().map(|(sc, st, t)| (sc, st, t.id)));
                        match next {
                            Some(n) => after = n,
                            None => return (all, sizes),
                        }
                    }
                }
            };
            let everything: Vec<_> =
                c.list_txns("", "").await.unwrap().into_iter().map(|(sc, st, t)| (sc, st, t.id)).collect();
            assert_eq!(everything.len(), 50);
            let (all, sizes) = pages("", "", 10, usize::MAX).await;
            // A page that ends at the last transaction says there is no next one.
            assert_eq!((all, sizes), (everything.clone(), vec![10, 10, 10, 10, 10]));
            let (all, sizes) = pages("s", "b", 7, usize::MAX).await;
            assert_eq!(all, everything[25..].to_vec());
            assert_eq!(sizes, vec![7, 7, 7, 4]);
            // A byte budget below one record still makes progress, one record per page.
            let (all, sizes) = pages("s", "a", 1000, 1).await;
            assert_eq!((all.len(), sizes.len()), (25, 25));
            let bad = c.list_txns_page("s", "a", "txns/s/b/00", 10, usize::MAX).await;
            assert!(matches!(bad, Err(ControllerError::Invalid(_))), "a cursor of another list: {bad:?}");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
