//! `sluice txn`: inspect and settle transactions, and write one from stdin.

use sluice_client::{Client, TxnConfig};
use sluice_net::TxnInfo;
use sluice_net::txn::{parse_txn_id, txn_id_text};
use std::io::BufRead;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum TxnCmd {
    /// List transactions: of one stream (scope/stream), of a scope, or of every stream.
    List {
        /// scope/stream or scope (default: every stream)
        of: Option<String>,
    },
    /// Show one transaction: state, epoch, lease, shadow segments.
    Describe {
        /// scope/stream
        stream: String,
        /// Transaction id (32 hex digits, as `txn list` prints it)
        id: String,
    },
    /// Abort an open transaction (its events are discarded).
    Abort { stream: String, id: String },
    /// Commit an open transaction, or finish a commit that stopped half-way.
    Commit { stream: String, id: String },
    /// Write stdin lines as one transaction, then commit it (or abort with --abort).
    Write {
        /// scope/stream
        stream: String,
        /// Routing key for every line (default: the line number).
        #[arg(long)]
        key: Option<String>,
        /// Abort instead of committing (the events never become visible).
        #[arg(long)]
        abort: bool,
        /// Lease in milliseconds (renewed in the background while writing).
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
    },
}

fn split_stream(s: &str) -> Result<(String, String), String> {
    let p = crate::parse_stream(s)?;
    Ok((p.scope, p.stream))
}

fn parse_id(s: &str) -> Result<u128, String> {
    parse_txn_id(s).ok_or_else(|| format!("'{s}' is not a transaction id (1 to 32 hex digits, not zero)"))
}

fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let d = now as i64 - ms as i64;
    if d >= 0 { format!("{:.1}s ago", d as f64 / 1000.0) } else { format!("in {:.1}s", -d as f64 / 1000.0) }
}

fn print_one(t: &TxnInfo) {
    let now = sluice_meta::controller::now_ms();
    println!("transaction {} on {}/{}", txn_id_text(t.txn), t.scope, t.stream);
    println!("  state:    {}", t.state);
    println!("  epoch:    {}", t.epoch);
    println!("  created:  {}", ago(t.created_unix_ms, now));
    println!("  lease:    {} ms, runs out {}", t.lease_ms, ago(t.lease_expires_unix_ms, now));
    println!("  finished: {}", ago(t.finished_unix_ms, now));
    for s in &t.segments {
        println!(
            "  segment {} [{:.4}, {:.4}) shadow {}/{}/{}#txn.{}",
            s.number,
            s.key_low,
            s.key_high,
            t.scope,
            t.stream,
            s.number,
            txn_id_text(t.txn)
        );
    }
}

pub async fn run(c: &Client, cmd: TxnCmd) -> Result<(), String> {
    match cmd {
        TxnCmd::List { of } => {
            let (scope, stream) = match of.as_deref() {
                None => (String::new(), String::new()),
                Some(s) if s.contains('/') => split_stream(s)?,
                Some(s) => (s.to_string(), String::new()),
            };
            let txns = c.list_txns(&scope, &stream).await.map_err(|e| e.to_string())?;
            let now = sluice_meta::controller::now_ms();
            println!(
                "{:<32}  {:<24}  {:<10}  {:>5}  {:>8}  {:<14}  lease",
                "id", "stream", "state", "epoch", "segments", "created"
            );
            for t in &txns {
                let lease = if t.state == sluice_net::TxnState::Open {
                    format!("runs out {}", ago(t.lease_expires_unix_ms, now))
                } else {
                    "-".into()
                };
                println!(
                    "{:<32}  {:<24}  {:<10}  {:>5}  {:>8}  {:<14}  {lease}",
                    txn_id_text(t.txn),
                    format!("{}/{}", t.scope, t.stream),
                    t.state.name(),
                    t.epoch,
                    t.segments.len(),
                    ago(t.created_unix_ms, now),
                );
            }
            eprintln!("{} transaction(s)", txns.len());
        }
        TxnCmd::Describe { stream, id } => {
            let (scope, name) = split_stream(&stream)?;
            print_one(&c.get_txn(&scope, &name, parse_id(&id)?).await.map_err(|e| e.to_string())?);
        }
        TxnCmd::Abort { stream, id } => {
            let (scope, name) = split_stream(&stream)?;
            let t = c.abort_txn(&scope, &name, parse_id(&id)?).await.map_err(|e| e.to_string())?;
            println!("transaction {} is {}", txn_id_text(t.txn), t.state);
        }
        TxnCmd::Commit { stream, id } => {
            let (scope, name) = split_stream(&stream)?;
            let t = c.commit_txn(&scope, &name, parse_id(&id)?).await.map_err(|e| e.to_string())?;
            println!("transaction {} is {}", txn_id_text(t.txn), t.state);
        }
        TxnCmd::Write { stream, key, abort, lease_ms } => {
            let config = TxnConfig { lease: Duration::from_millis(lease_ms), auto_ping: true };
            let mut txn = c.begin_txn_with(&stream, config).await.map_err(|e| e.to_string())?;
            let id = txn_id_text(txn.id());
            eprintln!("transaction {id} open");
            let mut n = 0u64;
            for line in std::io::stdin().lock().lines() {
                let line = line.map_err(|e| format!("reading stdin: {e}"))?;
                let k = key.clone().unwrap_or_else(|| n.to_string());
                txn.write_event(k.as_bytes(), line.as_bytes()).await.map_err(|e| e.to_string())?;
                n += 1;
            }
            // A process about to exit: wait for the record too (commit alone would leave that to
            // a background task that dies with the process).
            let t = if abort { txn.abort().await } else { txn.commit_recorded().await }.map_err(|e| e.to_string())?;
            println!("transaction {id}: {n} event(s), {}", t.state);
        }
    }
    Ok(())
}
