//! `sluice stream verify`: reads every byte a stream holds, in every segment it ever had,
//! so damage is found before a reader meets it. The server checks what it reads: log records
//! against their checksums (a read stops before a damaged record, and one that starts in it
//! answers `DataCorrupt` with the offset where the segment's sound data resumes, where the
//! verification goes on), tier-2 against the chunks' sums (a damaged MiB answers
//! `DataCorrupt`; the verification skips a MiB); the client checks the event framing of what
//! it gets (every length within the limit, no event cut short at a segment's end).

use sluice_client::{Client, ClientError};
use sluice_net::ErrorCode;
use sluice_net::constants::EVENT_HEADER_BYTES;
use sluice_net::event::split_whole_events;
use std::time::{Duration, Instant};

/// Bytes asked for per read.
const READ_BYTES: u32 = 8 << 20;
/// How far a verification skips past a damaged read (the server checks tier-2 in MiBs).
const SKIP_BYTES: u64 = 1 << 20;
/// Most problems listed per segment (the rest are counted).
const LISTED_MAX: usize = 20;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// scope/stream
    stream: String,
    /// The stream holds raw bytes (a byte stream): do not check event framing.
    #[arg(long)]
    raw: bool,
}

/// What one segment's verification found.
#[derive(Default)]
struct Found {
    bytes: u64,
    events: u64,
    /// Bytes not read: past damage, up to where sound data resumes.
    skipped: u64,
    problems: Vec<String>,
    more_problems: usize,
    /// Server answers already reported (a damaged block fails every read within it).
    seen: std::collections::HashSet<String>,
}

impl Found {
    fn problem(&mut self, p: String) {
        if self.problems.len() < LISTED_MAX {
            self.problems.push(p);
        } else {
            self.more_problems += 1;
        }
    }
}

struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= Duration::from_secs(2) {
            self.last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "  progress: {:.1} of {:.1} MiB ({:.0} MB/s)",
                self.done as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                self.done as f64 / secs / 1e6
            );
        }
    }
}

pub async fn run(c: &Client, a: VerifyArgs) -> Result<(), String> {
    let err = |e: ClientError| e.to_string();
    let s = crate::parse_stream(&a.stream)?;
    let history = c.stream_history(&s.scope, &s.stream).await.map_err(err)?;
    let mut segments: Vec<u64> = history.segments.iter().map(|h| h.number).collect();
    segments.sort_unstable();
    let mut infos = Vec::new();
    for &n in &segments {
        let name = s.segment_name(sluice_net::SegmentNumber(n));
        let info = c.segment_info(&name).await;
        infos.push((n, name, info));
    }
    let total = infos.iter().filter_map(|(_, _, i)| i.as_ref().ok()).map(|i| i.length - i.start_offset).sum();
    let started = Instant::now();
    let mut progress = Progress { total, done: 0, started, last: started };
    let (mut bytes, mut events, mut damaged) = (0u64, 0u64, 0usize);
    for (n, name, info) in infos {
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                println!("segment {n}: cannot be read: {e}");
                damaged += 1;
                continue;
            }
        };
        let found = verify_segment(c, &name, info.start_offset, info.length, a.raw, &mut progress).await?;
        bytes += found.bytes;
        events += found.events;
        let what = if a.raw { String::new() } else { format!(", {} events", found.events) };
        let state = if info.sealed { "sealed" } else { "active" };
        if found.problems.is_empty() {
            println!("segment {n} ({state}): bytes {}..{}{what}: ok", info.start_offset, info.length);
        } else {
            damaged += 1;
            println!(
                "segment {n} ({state}): bytes {}..{}{what}: DAMAGED ({} bytes unreadable or skipped)",
                info.start_offset, info.length, found.skipped
            );
            for p in &found.problems {
                println!("    {p}");
            }
            if found.more_problems > 0 {
                println!("    ... and {} more", found.more_problems);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let what = if a.raw { String::new() } else { format!(", {events} events") };
    println!(
        "verified {s}: {} segments, {bytes} bytes read{what} in {secs:.1} s ({:.0} MB/s)",
        segments.len(),
        bytes as f64 / secs.max(1e-3) / 1e6
    );
    if damaged > 0 {
        return Err(format!("{damaged} of {} segments of {s} are damaged or unreadable", segments.len()));
    }
    println!("no damage found");
    Ok(())
}

/// Reads `[from, to)` of `name`, checking framing unless `raw`. After damage the rest is
/// still read (to find more damage) but its framing is no longer checked: where the next
/// event starts is unknown.
async fn verify_segment(
    c: &Client,
    name: &str,
    from: u64,
    to: u64,
    raw: bool,
    progress: &mut Progress,
) -> Result<Found, String> {
    let mut found = Found::default();
    let mut framing = !raw;
    // Bytes of an event that continues in the next read.
    let mut carry: Vec<u8> = Vec::new();
    let mut at = from;
    while at < to {
        let (_, data) = match c.read_segment(name, at, READ_BYTES, Duration::ZERO).await {
            Ok(r) => r,
            Err(e) if e.code() == Some(ErrorCode::DataCorrupt) => {
                if found.seen.insert(e.to_string()) {
                    found.problem(format!("read at offset {at}: {e}"));
                }
                // A damaged log record: the server says where the sound data resumes (where
                // an append begins, so events are whole from there on). Tier-2: a MiB on.
                let resume = match &e {
                    ClientError::Server { offset: Some(r), .. } if *r > at => Some((*r).min(to)),
                    _ => None,
                };
                let next = resume.unwrap_or(at + SKIP_BYTES.min(to - at));
                found.skipped += next - at;
                progress.add(next - at);
                at = next;
                framing &= resume.is_some();
                carry.clear();
                continue;
            }
            Err(e) if e.code() == Some(ErrorCode::Truncated) => {
                // Retention moved the start meanwhile: what is gone needs no checking.
                let start = c.segment_info(name).await.map_err(|e| e.to_string())?.start_offset;
                progress.add(start.saturating_sub(at));
                at = start.max(at + 1);
                carry.clear();
                framing = false;
                continue;
            }
            Err(e) => return Err(format!("reading {name} at {at}: {e}")),
        };
        if data.is_empty() {
            found.problem(format!("ends at offset {at}, {} bytes before its length", to - at));
            break;
        }
        let data = &data[..data.len().min((to - at) as usize)];
        at += data.len() as u64;
        found.bytes += data.len() as u64;
        progress.add(data.len() as u64);
        if !framing {
            continue;
        }
        carry.extend_from_slice(data);
        match split_whole_events(&carry) {
            Ok((whole, used)) => {
                found.events += whole.len() as u64;
                carry.drain(..used);
            }
            Err(e) => {
                let base = at - carry.len() as u64;
                found.problem(format!("bad event framing in the event read from offset {base} on: {e}"));
                framing = false;
                carry.clear();
            }
        }
    }
    if framing && !carry.is_empty() {
        let off = to - carry.len() as u64;
        let what = if carry.len() < EVENT_HEADER_BYTES { "a partial event header" } else { "an event cut short" };
        found.problem(format!("ends in {what} at offset {off} ({} bytes)", carry.len()));
    }
    Ok(found)
}
