//! The transaction service: runs once per cluster (next to retention and the auto-scaler)
//! and finishes what transactions left behind. Every interval it lists every transaction
//! and: aborts open ones whose lease ran out; finishes aborts that stopped half-way;
//! finishes commits that have been `Committing` for a whole interval (their client died, or
//! the server restarted under them: the commit steps are idempotent, so racing a live
//! committer does no harm); forgets committed and aborted records after `keep`.

use crate::retention::connect_service;
use sluice_client::{Client, ClientError};
use sluice_net::TxnInfo;
use sluice_net::TxnState;
use sluice_net::txn::txn_id_text;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What the service does with one transaction this round.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Abort,
    FinishCommit,
    Forget,
}

/// Decides for one transaction. `committing_since_ms`: when this service first saw it
/// committing (wall clock), if it did.
pub fn decide(
    t: &TxnInfo,
    now_ms: u64,
    committing_since_ms: Option<u64>,
    interval: Duration,
    keep: Duration,
) -> Action {
    match t.state {
        TxnState::Open if now_ms > t.lease_expires_unix_ms => Action::Abort,
        TxnState::Open => Action::None,
        TxnState::Aborting => Action::Abort,
        TxnState::Committing => match committing_since_ms {
            Some(since) if now_ms.saturating_sub(since) >= interval.as_millis() as u64 => Action::FinishCommit,
            _ => Action::None,
        },
        TxnState::Committed | TxnState::Aborted => {
            if now_ms.saturating_sub(t.finished_unix_ms) >= keep.as_millis() as u64 {
                Action::Forget
            } else {
                Action::None
            }
        }
    }
}

/// Runs forever while `active()` (see `retention::run`).
pub async fn run(url: String, interval: Duration, keep: Duration, active: impl Fn() -> bool) {
    let client = connect_service(&url, "transaction service", interval).await;
    let mut committing: HashMap<u128, u64> = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        if !active() {
            committing.clear();
            continue;
        }
        if let Err(e) = round(&client, interval, keep, &mut committing).await {
            tracing::warn!(error = %e, "transaction round failed; trying again next interval");
        }
    }
}

async fn round(
    c: &Client,
    interval: Duration,
    keep: Duration,
    committing: &mut HashMap<u128, u64>,
) -> Result<(), ClientError> {
    // A page at a time: a busy cluster keeps many finished records for `keep`.
    let mut still_committing = HashSet::new();
    let mut after = String::new();
    loop {
        let (txns, next) = c.list_txns_page("", "", &after, 0).await?;
        let now = sluice_meta::controller::now_ms();
        for t in txns {
            let since = if t.state == TxnState::Committing {
                still_committing.insert(t.txn);
                Some(*committing.entry(t.txn).or_insert(now))
            } else {
                None
            };
            step(c, &t, decide(&t, now, since, interval, keep)).await;
        }
        match next {
            Some(next) => after = next,
            None => break,
        }
    }
    committing.retain(|id, _| still_committing.contains(id));
    Ok(())
}

/// Carries out one decision (a failure is logged; the next round tries again).
async fn step(c: &Client, t: &TxnInfo, action: Action) {
    let id = txn_id_text(t.txn);
    let result = match action {
        Action::None => return,
        Action::Abort => {
            tracing::info!(stream = %format!("{}/{}", t.scope, t.stream), txn = %id, "aborting an expired transaction");
            c.abort_txn(&t.scope, &t.stream, t.txn).await.map(|_| ())
        }
        Action::FinishCommit => {
            tracing::info!(stream = %format!("{}/{}", t.scope, t.stream), txn = %id, "finishing a stalled commit");
            c.commit_txn(&t.scope, &t.stream, t.txn).await.map(|_| ())
        }
        Action::Forget => c.forget_txn(&t.scope, &t.stream, t.txn).await,
    };
    if let Err(e) = result {
        tracing::warn!(stream = %format!("{}/{}", t.scope, t.stream), txn = %id, error = %e, "transaction service step failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(state: TxnState, expires: u64, finished: u64) -> TxnInfo {
        TxnInfo {
            lengths: Vec::new(),
            scope: "s".into(),
            stream: "t".into(),
            txn: 1,
            state,
            epoch: 0,
            segments: Vec::new(),
            lease_ms: 1000,
            lease_expires_unix_ms: expires,
            created_unix_ms: 0,
            finished_unix_ms: finished,
        }
    }

    #[test]
    fn expired_aborts_stalled_commits_finish_old_records_go() {
        let (i, keep) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(decide(&txn(TxnState::Open, 5_000, 0), 4_000, None, i, keep), Action::None);
        assert_eq!(decide(&txn(TxnState::Open, 5_000, 0), 5_001, None, i, keep), Action::Abort);
        assert_eq!(decide(&txn(TxnState::Aborting, 0, 0), 1, None, i, keep), Action::Abort);
        assert_eq!(decide(&txn(TxnState::Committing, 0, 0), 10_000, Some(10_000), i, keep), Action::None);
        assert_eq!(decide(&txn(TxnState::Committing, 0, 0), 11_000, Some(10_000), i, keep), Action::FinishCommit);
        assert_eq!(decide(&txn(TxnState::Committed, 0, 10_000), 20_000, None, i, keep), Action::None);
        assert_eq!(decide(&txn(TxnState::Aborted, 0, 10_000), 70_000, None, i, keep), Action::Forget);
    }
}
