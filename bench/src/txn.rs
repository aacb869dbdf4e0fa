//! The `txn` workload: what a transaction costs. Each round opens a transaction on a stream
//! of S segments, writes E events spread over keys that cover every segment, flushes them
//! into the shadow segments, then commits; it times the commit alone (decide, move every
//! shadow into the stream: the events are readable when it returns; with `await_record`,
//! also until the record says `Committed`) and the whole transaction (begin to committed).

use crate::{RunResult, hist_json, report};
use sluice_client::{Client, ClientError};
use std::time::Instant;

pub struct TxnLoad {
    pub segments: u32,
    pub events: u32,
    pub size: usize,
    pub rounds: u32,
    /// Time until the record says `Committed` (`Client::commit_txn`), not `Transaction::commit`.
    pub await_record: bool,
}

pub async fn run(url: String, load: TxnLoad) -> RunResult {
    let e = |e: ClientError| e.to_string();
    let c = Client::connect(&url).await.map_err(e)?;
    let scope = "bench";
    let stream = format!("txn{}", std::process::id());
    let _ = c.create_scope(scope).await;
    c.create_stream(scope, &stream, load.segments).await.map_err(e)?;
    let name = format!("{scope}/{stream}");
    let new_hist = crate::micros_histogram;
    let (mut commit, mut whole) = (new_hist(), new_hist());
    let payload = vec![b'x'; load.size];
    // One warm-up round (connections, first log files) that is not counted.
    for round in 0..=load.rounds {
        let started = Instant::now();
        let mut t = c.begin_txn(&name).await.map_err(e)?;
        for i in 0..load.events {
            t.write_event(format!("key-{}", i % 64).as_bytes(), &payload).await.map_err(e)?;
        }
        t.flush().await.map_err(e)?;
        let committing = Instant::now();
        if load.await_record {
            let id = t.id();
            drop(t);
            c.commit_txn(scope, &stream, id).await.map_err(e)?;
        } else {
            t.commit().await.map_err(e)?;
        }
        if round > 0 {
            commit.saturating_record(committing.elapsed().as_micros() as u64);
            whole.saturating_record(started.elapsed().as_micros() as u64);
        }
    }
    report("commit", &commit);
    report("transaction", &whole);
    let json = serde_json::json!({"workload": "txn", "segments": load.segments, "events": load.events,
        "size": load.size, "rounds": load.rounds, "await_record": load.await_record, "commit": hist_json(&commit), "transaction": hist_json(&whole)});
    Ok((json, vec![("commit".to_string(), commit)]))
}
