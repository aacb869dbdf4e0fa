//! Log scrub: a container's log files read back from the disk (direct I/O, past every cache)
//! and every record checked, so that damage is found while the server runs, not first by the
//! reader or the restart that needs the bytes.
//!
//! Recovery checks the files it replays and a read checks an older file when it indexes it;
//! data that nobody reads (a log without tier-2 keeps every byte) was otherwise not looked at
//! again. What counts as damage:
//! - a record that fails its checksums with a valid record after it (`ScanEnd::Corrupt`);
//! - a gap in the LSN chain between files: the records at the end of a file (or the head of
//!   the next) are damaged or missing, which a scan alone takes for a torn tail;
//! - in the current file, fewer valid records than were durable when the scrub began;
//! - a file header that does not check.
//!
//! Files freed while the scrub runs are counted and skipped. A file is read in 1 MiB pieces
//! one after the other, each on the shard's helper thread, paced to the rate asked between
//! pieces (so the log's own writes never queue behind more than one piece, and the helper
//! thread's other work, file images for readers and log file preparation, gets in between);
//! its checks run there too. The shard only waits.

use crate::container::image;
use crate::container::io::Container;
use crate::log::file_name;
use crate::log::scan::{ScanEnd, scan_file};
use bytes::Bytes;
use sluice_net::messages::ContainerScrub;
use std::path::Path;
use std::time::{Duration, Instant};

/// What one file held, summed up on a helper thread.
#[derive(Debug)]
struct FileCheck {
    bytes: u64,
    header: Option<String>,
    records: u64,
    first_lsn: Option<u64>,
    last_lsn: Option<u64>,
    /// Position after the last valid record.
    end: u64,
    stop: ScanEnd,
}

/// Checks a file's records (blocking: CRCs of the whole file).
fn check_image(bytes: &Bytes) -> FileCheck {
    let scan = scan_file(bytes);
    FileCheck {
        bytes: bytes.len() as u64,
        header: scan.header.err(),
        records: scan.records.len() as u64,
        first_lsn: scan.records.first().map(|r| r.header.lsn),
        last_lsn: scan.records.last().map(|r| r.header.lsn),
        end: scan.end,
        stop: scan.stop,
    }
}

/// The pace of one container's scrub: at most `bytes_per_sec` (0: unpaced) over all its
/// files, counted from `started`.
struct Pace {
    bytes_per_sec: u64,
    started: Instant,
    /// Bytes of the files read before the current one.
    before: u64,
}

impl Pace {
    /// Waits until `read` more bytes (of the current file) are due.
    async fn keep(&self, read: u64) {
        if self.bytes_per_sec > 0 {
            let due = Duration::from_secs_f64((self.before + read) as f64 / self.bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                glommio::timer::sleep(wait).await;
            }
        }
    }
}

/// Reads `path` a piece at a time (each piece a helper-thread call, so the shard's other
/// blocking work gets in between), waiting after each piece to keep to the pace (also after
/// a file's last piece: a log of many small files is paced too).
async fn read_paced(path: &Path, pace: &mut Pace) -> std::io::Result<Bytes> {
    let owned = path.to_path_buf();
    let mut image = glommio::executor().spawn_blocking(move || image::PartialImage::open(&owned)).await?;
    loop {
        let (back, done) = glommio::executor()
            .spawn_blocking(move || {
                let done = image.read_piece();
                (image, done)
            })
            .await;
        image = back;
        let done = done?;
        pace.keep(image.done() as u64).await;
        if done {
            pace.before += image.done() as u64;
            return Ok(image.finish());
        }
    }
}

impl Container {
    /// Reads every log file of the container back from the disk and checks every record, at
    /// most `bytes_per_sec` (0: unpaced).
    pub async fn scrub(&self, bytes_per_sec: u64) -> ContainerScrub {
        let started = Instant::now();
        let (oldest, current, durable_lsn) = {
            let core = self.core.borrow();
            (core.oldest_file(), core.current_file(), core.durable_lsn())
        };
        let mut out = ContainerScrub { container: self.id(), ..ContainerScrub::default() };
        let mut pace = Pace { bytes_per_sec, started, before: 0 };
        // The LSN the next file must open with, while the chain is known.
        let mut next_lsn: Option<(u64, u64)> = None;
        for seq in oldest..=current {
            let path = self.dir.join(file_name(seq));
            let f = match read_paced(&path, &mut pace).await {
                Ok(bytes) => glommio::executor().spawn_blocking(move || check_image(&bytes)).await,
                // A container that never wrote a record may have no file yet.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && seq == current && durable_lsn == 0 => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.gone += 1;
                    next_lsn = None;
                    continue;
                }
                Err(e) => {
                    out.damage.push(format!("file {seq:016x}.log: cannot be read: {e}"));
                    next_lsn = None;
                    continue;
                }
            };
            out.files += 1;
            out.bytes += f.bytes;
            out.records += f.records;
            let name = format!("file {seq:016x}.log");
            if let Some(reason) = &f.header {
                out.damage.push(format!("{name}: bad file header: {reason}"));
            }
            // The current file is written while it is read: past the records durable when
            // the scrub began, a record may be read half written and the next one whole.
            let last = f.last_lsn.unwrap_or(0);
            let settled = seq < current || last < durable_lsn;
            if let ScanEnd::Corrupt { at, valid_at, reason } = &f.stop
                && settled
            {
                out.damage.push(format!(
                    "{name}: the record at byte {at} is damaged ({reason}); a valid record follows at byte {valid_at}"
                ));
            }
            if let (Some((prev, want)), Some(first)) = (next_lsn, f.first_lsn)
                && first != want
            {
                out.damage.push(format!(
                    "file {prev:016x}.log ends at LSN {} but {name} opens with LSN {first}: records between them are damaged or lost",
                    want - 1
                ));
            }
            if seq == current && last < durable_lsn {
                // Where the next record is damaged (a record of its own block lies past the
                // end of the one before it), or where it is missing.
                let (at, stop) = match &f.stop {
                    ScanEnd::Torn { at, reason } => (*at, format!(" ({reason})")),
                    ScanEnd::Corrupt { .. } => (f.end, " (above)".to_string()),
                    ScanEnd::Clean => (f.end, String::new()),
                };
                out.damage.push(format!(
                    "{name}: the record at byte {at} (LSN {}) is damaged or missing{stop}; records up to LSN {durable_lsn} were acknowledged",
                    last + 1
                ));
            }
            // After damage in the middle of a file its later records were not counted: the
            // chain to the next file is not known (and would only repeat the finding).
            let corrupt = matches!(f.stop, ScanEnd::Corrupt { .. });
            next_lsn = f.last_lsn.filter(|_| !corrupt).map(|l| (seq, l + 1));
        }
        out.took_ms = started.elapsed().as_millis() as u64;
        *self.last_scrub.borrow_mut() = Some((Instant::now(), out.damage.clone()));
        if out.damage.is_empty() {
            tracing::info!(
                container = out.container,
                files = out.files,
                bytes = out.bytes,
                took_ms = out.took_ms,
                "log scrubbed: sound"
            );
        } else {
            for d in &out.damage {
                tracing::error!(container = out.container, damage = %d, "log scrub found damage");
            }
        }
        out
    }
}
