//! Freeing log files: once no segment needs a log file's data any more (moved to tier-2 by
//! the mover, truncated by retention, or its segment deleted), the file is forgotten and
//! then kept as a spare to become a later log file, or cut from its end in steps and
//! unlinked (so the disk never stalls on one whole discard). With tier-2 the mover frees
//! files after each round; without, a small task per container looks every
//! `LOG_FREE_INTERVAL_MS`, so that retention and deleted streams give disk space back on a
//! node without tier-2 too. That task also copies small segments that alone keep the oldest
//! file into the current one (`relocate_holders`), so a small stream without retention does
//! not keep every file the others let go.
//!
//! Invariants:
//! - A log file is freed only when every segment's data in it is below the segment's
//!   durable tier-2 end or its start (truncated away), and never the current file or the
//!   one being prepared (`ContainerCore::files_needed_from`).
//! - No file is renamed, cut or unlinked while a log file is being opened (glommio looks
//!   an opened file up again by its path), nor cut under a read in flight.

use crate::container::io::{Container, remove_files_off_shard, rename_files_off_shard, wait_until};
use crate::error::EngineError;
use crate::log::file_name;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A freed log file is cut from its end this much at a time, `FREE_STEP_PAUSE` apart, then
/// unlinked. On a file system mounted with `discard` (this VM's ext4), unlinking a whole
/// 64 MiB file discards its blocks at once and the disk stalls every write for 13-22 ms;
/// cut in 1 MiB steps, no stall in fio's tests exceeded ~4-5 ms (docs/BENCHMARKS.md,
/// nineteenth session).
const FREE_STEP_BYTES: u64 = 1 << 20;
const FREE_STEP_PAUSE: Duration = Duration::from_millis(2);
/// Files waiting to be freed in steps beyond which the rest are unlinked whole, with tier-2
/// (where they count against the log's budget) or on a full disk: disk space matters more
/// than a smooth disk when files are freed faster than the steps go. Without tier-2 a large
/// truncation frees many files at once (a retention pass: tens of seconds of writes), and
/// unlinking those whole stalls every write on a disk that discards; they are cut in steps
/// instead, and the next log files are made from the whole ones meanwhile (`take_whole_freed_file`).
const FREE_BACKLOG_MAX: usize = 2;
/// How long freeing a log file waits for a read of it still in flight (which took the file
/// before it was forgotten) before unlinking it whole instead of cutting it under the read.
const FREE_READ_WAIT: Duration = Duration::from_secs(5);
/// Suffix of a log file being freed: recovery never takes it for a log file (a file cut
/// short by a crash midway is deleted at the next open).
pub(crate) const FREEING_SUFFIX: &str = "free";
/// Extension of a freed log file kept to be reused as a later one (`CoreConfig::spare_files`).
pub(crate) const SPARE_SUFFIX: &str = "spare";

/// Copies (`relocate_holders`) tried at most per round of the freeing task.
const RELOCATIONS_PER_ROUND: usize = 16;

/// How often a container without tier-2 looks for log files it can free.
const LOG_FREE_INTERVAL: Duration = Duration::from_millis(crate::constants::LOG_FREE_INTERVAL_MS);

impl Container {
    /// Frees log files no segment needs (their data in tier-2, truncated or deleted). The
    /// files are forgotten first, so reads of their data go to tier-2 (or find it truncated)
    /// from here on; then a few are kept as
    /// spares (`.spare`) and each other one is renamed `.free` and a background task cuts
    /// it in steps and unlinks it (`free_in_steps`), all file system work on the helper
    /// thread. The deletions need not be durable: a `.log`
    /// that comes back after a crash is found unneeded again, a `.free` one is deleted at
    /// the next open. A file that cannot be renamed or deleted stays on disk (reported as the
    /// mover's error, or logged); after a restart recovery lists it again and it is freed.
    pub(crate) async fn free_log_files(self: &Rc<Self>) -> Result<(), String> {
        let (oldest, needed) = {
            let core = self.core.borrow();
            (core.oldest_file(), core.files_needed_from())
        };
        if needed <= oldest {
            return Ok(());
        }
        {
            // Forgotten, the files stay in the log's budget until they are gone.
            let waiting = self.files.borrow().freeing.len() as u64;
            let mut core = self.core.borrow_mut();
            core.forget_files_below(needed);
            core.set_files_freeing(waiting + (needed - oldest));
        }
        // No file below `needed` is opened from here on; one still opening is let finish
        // (it keeps its descriptor among the readers), so none is renamed or unlinked under
        // an open (glommio panics then). Should an open hang, the files stay for now.
        if !self.wait_opens(FREE_READ_WAIT).await {
            self.count_files_freeing();
            return Err(format!(
                "an open of a log file did not finish: files {oldest:x}..{needed:x} stay on disk until the next start"
            ));
        }
        let (mut quiet, mut busy) = (Vec::new(), Vec::new());
        for seq in oldest..needed {
            let path = self.dir.join(file_name(seq));
            let open = self.files.borrow_mut().readers.remove(&seq);
            let mut idle = true;
            if let Some(f) = open {
                // A read that took the file before it was forgotten may still be in flight:
                // the file is not cut under it. Closed here, so that the unlink, not a
                // later close on the shard, frees the blocks.
                idle = wait_until("a read", FREE_READ_WAIT, || Rc::strong_count(&f) == 1).await.is_ok();
                let _ = f.close_rc().await;
            }
            if idle { quiet.push(path) } else { busy.push(path) }
        }
        // A file still read is unlinked whole: its reader's descriptor keeps the data until
        // that read ends. Of the others, the newest are kept as spares (renamed `.spare`) to
        // become later log files, up to the container's number of spares: reused, their
        // blocks need neither allocating nor zero-filling. The rest are renamed `.free` (the
        // directory synced, so that no cut of theirs can outlast a crash under the `.log`
        // name) for the cutting task.
        let unlinked = remove_files_off_shard(busy).await;
        let room = self.core.borrow().config().spare_files.saturating_sub(self.files.borrow().spares.len());
        let keep = quiet.split_off(quiet.len() - room.min(quiet.len()));
        let renamed = rename_files_off_shard(&self.dir, vec![(keep, SPARE_SUFFIX), (quiet, FREEING_SUFFIX)]).await;
        let (spares, freed) = match &renamed {
            Ok((groups, _)) => (groups[0].clone(), groups[1].clone()),
            Err(_) => (Vec::new(), Vec::new()),
        };
        self.files.borrow_mut().spares.extend(spares);
        let whole: Vec<PathBuf> = {
            let mut files = self.files.borrow_mut();
            files.freeing.extend(freed);
            let backlog = if self.tier2.is_some() || self.is_out_of_space() {
                files.freeing.len().saturating_sub(FREE_BACKLOG_MAX)
            } else {
                0
            };
            files.freeing.drain(..backlog).collect()
        };
        let unlinked_backlog = remove_files_off_shard(whole).await;
        self.count_files_freeing();
        let start_cutting = {
            let mut files = self.files.borrow_mut();
            !files.freeing.is_empty() && !std::mem::replace(&mut files.cutting, true)
        };
        if start_cutting {
            let me = self.clone();
            glommio::spawn_local(async move {
                loop {
                    // The file being cut stays at the queue's front (and in the budget).
                    let next = me.files.borrow().freeing.front().cloned();
                    let Some(path) = next else { break };
                    if let Err(e) = free_in_steps(&path).await {
                        tracing::warn!(container = me.id(), error = %e, "freeing a log file");
                    }
                    me.files.borrow_mut().freeing.retain(|p| *p != path);
                    me.count_files_freeing();
                }
                me.files.borrow_mut().cutting = false;
            })
            .detach();
        }
        unlinked.and(unlinked_backlog)?;
        renamed.and_then(|(_, first_error)| first_error)?;
        tracing::debug!(container = self.id(), from = oldest, to = needed, "freed log files");
        Ok(())
    }

    /// A freed file that is still whole, to be made a later log file: a spare, or else the
    /// newest file waiting to be cut (never the oldest, which the cutting task may hold).
    pub(crate) fn take_whole_freed_file(&self) -> Option<PathBuf> {
        let taken = {
            let mut files = self.files.borrow_mut();
            match files.spares.pop() {
                Some(spare) => return Some(spare),
                None if files.freeing.len() >= 2 => files.freeing.pop_back(),
                None => None,
            }
        };
        self.count_files_freeing();
        taken
    }

    /// Tells the core how many forgotten log files are still on disk (in the log's budget).
    fn count_files_freeing(&self) {
        let n = self.files.borrow().freeing.len() as u64;
        self.core.borrow_mut().set_files_freeing(n);
    }

    /// A container without tier-2: starts the task that frees log files whose data was
    /// truncated or deleted, until the container stops. It looks every `LOG_FREE_INTERVAL`
    /// and when a truncation or deletion becomes durable (`wake_freer`).
    pub(crate) fn start_log_freer(self: &Rc<Self>) {
        let me = self.clone();
        glommio::spawn_local(async move {
            let mut last_warn: Option<Instant> = None;
            loop {
                me.freer_wake.sleep(LOG_FREE_INTERVAL).await;
                if me.is_stopping() {
                    return;
                }
                // Freeing first (on a full disk it is what makes room); a copy, once durable,
                // wakes this task to free what it let go.
                let freed = me.free_log_files().await;
                let copied = me.relocate_holders().await;
                if let Err(reason) = freed.and(copied)
                    && last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    tracing::warn!(container = me.id(), %reason, "freeing log files failed; retrying");
                    last_warn = Some(Instant::now());
                }
            }
        })
        .detach();
    }

    /// Without tier-2: copies the segments that keep the oldest needed log file into the
    /// current one while the core names them (`ContainerCore::relocation`: small ones only,
    /// at most a quarter of a file in all), each read through the read path (so its records
    /// are checked) and written as one `Relocate` entry; the file is freed next
    /// (`free_log_files`). A segment that changed between the read and the write is refused
    /// and looked at again the next round.
    async fn relocate_holders(self: &Rc<Self>) -> Result<(), String> {
        // What was read for a copy the core refused (the segment grew meanwhile): the next
        // try reads only the bytes after it.
        let mut kept: Option<(String, u64, bytes::Bytes)> = None;
        for _ in 0..RELOCATIONS_PER_ROUND {
            let next = self.core.borrow().relocation();
            let Some((name, from, to)) = next else { return Ok(()) };
            let mut data = bytes::BytesMut::with_capacity((to - from) as usize);
            if let Some((n, f, d)) = kept.take()
                && n == name
                && f == from
                && d.len() as u64 <= to - from
            {
                data.extend_from_slice(&d);
            }
            let failed = |e: &dyn std::fmt::Display| format!("copying {name} to free a log file: {e}");
            while (data.len() as u64) < to - from {
                let at = from + data.len() as u64;
                let read = match self.read(&name, at, (to - at) as usize, Duration::ZERO).await {
                    Ok(read) => read,
                    // Truncated or deleted meanwhile: the next round looks again.
                    Err(EngineError::Truncated { .. } | EngineError::NoSuchSegment(_)) => return Ok(()),
                    Err(e) => return Err(failed(&e)),
                };
                if read.is_empty() {
                    return Err(failed(&format!("nothing to read at {at} of {to}")));
                }
                read.pieces.iter().for_each(|p| data.extend_from_slice(p));
            }
            data.truncate((to - from) as usize);
            let data = data.freeze();
            let req =
                crate::container::core::Request::Relocate { name: name.clone(), offset: from, data: data.clone() };
            match self.submit(req) {
                Ok(done) => done.await.map_err(|e| failed(&e))?,
                // A full disk: freeing comes first.
                Err(EngineError::NoSpace(_)) => return Ok(()),
                // Changed since the read (appended to, truncated): look again.
                Err(EngineError::BadRequest(_)) => {
                    kept = Some((name, from, data));
                    glommio::yield_if_needed().await;
                    continue;
                }
                Err(e) => return Err(failed(&e)),
            };
            tracing::debug!(container = self.id(), segment = %name, bytes = to - from, "copied to free the oldest log file");
            self.relocations.set(self.relocations.get() + 1);
        }
        Ok(())
    }

    /// Wakes the task that frees log files (without tier-2), if it sleeps.
    pub(crate) fn wake_freer(&self) {
        self.freer_wake.ring();
    }
}

/// Cuts file `path` from its end `FREE_STEP_BYTES` at a time, `FREE_STEP_PAUSE` apart, each
/// cut a short job on the helper thread (which other work may use between them), then
/// unlinks it. A file already gone is done.
async fn free_in_steps(path: &Path) -> Result<(), String> {
    loop {
        let p = path.to_path_buf();
        let left = glommio::executor()
            .spawn_blocking(move || -> std::io::Result<u64> {
                let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                let to = f.metadata()?.len().saturating_sub(FREE_STEP_BYTES);
                f.set_len(to)?;
                Ok(to)
            })
            .await;
        match left {
            Ok(0) => break,
            Ok(_) => glommio::timer::sleep(FREE_STEP_PAUSE).await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Cut or not, the file goes.
            Err(_) => break,
        }
    }
    remove_files_off_shard(vec![path.to_path_buf()]).await
}
