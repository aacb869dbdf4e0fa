//! `sluice log dump`: a human-readable listing of container logs for operators.

use bytes::Bytes;
use sluice_engine::log::checkpoint::CheckpointState;
use sluice_engine::log::entry::{LogEntry, decode_entries, decode_entries_prefix};
use sluice_engine::log::format::RecordKind;
use sluice_engine::log::parse_file_name;
use sluice_engine::log::scan::{ScanEnd, damaged_records, scan_past_damage};
use std::path::Path;

fn log_files(dir: &Path) -> Result<Vec<(u64, std::path::PathBuf)>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(parse_file_name).map(|s| (s, e.path())))
        .collect();
    files.sort();
    Ok(files)
}

pub fn dump(dir: &Path, entries: bool) -> Result<(), String> {
    let containers = dir.join("containers");
    if containers.is_dir() {
        let mut dirs: Vec<_> = std::fs::read_dir(&containers)
            .map_err(|e| format!("{}: {e}", containers.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            if log_files(&d)?.is_empty() {
                println!("container log {} (empty: never written)", d.display());
            } else {
                dump_container(&d, entries)?;
            }
        }
        return Ok(());
    }
    if log_files(dir)?.is_empty() {
        return Err(format!("{} holds no log files (*.log) and no containers/ directory", dir.display()));
    }
    dump_container(dir, entries)
}

fn dump_container(dir: &Path, entries: bool) -> Result<(), String> {
    let files = log_files(dir)?;
    println!("container log {}", dir.display());
    for (_, path) in files {
        let bytes = match std::fs::read(&path) {
            Ok(b) => Bytes::from(b),
            // A running node frees log files whose data is in tier-2: gone since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("  file {}: gone (freed since the listing)", path.display());
                continue;
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        // Past each damaged stretch too: what the records after it hold (what a salvage keeps).
        let (scan, skipped) = scan_past_damage(&bytes);
        let mut skipped = skipped.into_iter().peekable();
        match &scan.header {
            Ok(h) => println!(
                "  file {} container {} seq {} epoch {} size {} bytes{}{}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                h.container,
                h.seq,
                h.epoch,
                h.file_bytes,
                // A reused file: what its earlier use left after its own records is not shown.
                if h.min_lsn > 0 { format!(", records from lsn {}", h.min_lsn) } else { String::new() },
                // Records without it (look-alikes in event data) are not the file's.
                if h.tag > 0 { format!(", record tag {:012x}", h.tag) } else { String::new() }
            ),
            Err(e) => println!("  file {}: bad header: {e}", path.display()),
        }
        for rec in &scan.records {
            while let Some(k) = skipped.next_if(|k| k.valid_at <= rec.pos) {
                println!("    DAMAGED at {}: {}; sound records go on at {}", k.at, k.reason, k.valid_at);
                if entries {
                    // Records in it whose headers are intact: their entries as far as they
                    // decode, untrusted (the payloads fail their checksums).
                    for (h, payload) in damaged_records(&bytes, &k).iter().filter(|(h, _)| h.kind == RecordKind::Batch)
                    {
                        println!("      lsn {} epoch {}, header intact; its entries, unverified:", h.lsn, h.epoch);
                        for e in decode_entries_prefix(payload) {
                            print_entry(&e);
                        }
                    }
                }
            }
            let h = &rec.header;
            let kind = match h.kind {
                RecordKind::Batch => "batch",
                RecordKind::Checkpoint => "checkpoint",
            };
            print!(
                "    @{:<10} lsn {:<8} epoch {:<4} {:<10} {:>9} bytes crc {:08x} ok",
                rec.pos, h.lsn, h.epoch, kind, h.payload_len, h.payload_crc
            );
            match h.kind {
                RecordKind::Checkpoint => match CheckpointState::decode(&rec.payload) {
                    Ok(ck) => {
                        let runs: usize = ck.segments.iter().map(|s| s.chunks.len()).sum();
                        let chunks: u64 = ck.segments.iter().flat_map(|s| &s.chunks).map(|r| r.3).sum();
                        println!(
                            "  ({} segments, next segment id {}, {chunks} tier-2 chunks in {runs} runs)",
                            ck.segments.len(),
                            ck.next_segment_id
                        );
                        if entries {
                            for s in &ck.segments {
                                println!(
                                    "        segment {} {} start {} length {} tier-2 end {}{}{}",
                                    s.id,
                                    s.name,
                                    s.start_offset,
                                    s.length,
                                    s.tier2_end,
                                    if s.sealed { " sealed" } else { "" },
                                    if s.chunks_closed { ", chunks closed" } else { "" }
                                );
                                for &(start, epoch, len, count) in &s.chunks {
                                    println!("          chunks from {start}: {count} x {len} bytes, epoch {epoch}");
                                }
                            }
                        }
                    }
                    Err(e) => println!("  ({e})"),
                },
                RecordKind::Batch => match decode_entries(&rec.payload, rec.payload_pos()) {
                    Ok(list) => {
                        let appends = list.iter().filter(|(e, _)| matches!(e, LogEntry::Append { .. })).count();
                        println!("  ({} entries, {appends} appends)", list.len());
                        if entries {
                            for (e, _) in list {
                                print_entry(&e);
                            }
                        }
                    }
                    Err(e) => println!("  (undecodable entries: {e})"),
                },
            }
        }
        match scan.stop {
            ScanEnd::Clean => println!("    end at {} (clean)", scan.end),
            ScanEnd::Torn { at, reason } => println!("    end at {} (torn record: {reason})", at),
            // Not left by `scan_past_damage`, which goes on past every damaged stretch.
            ScanEnd::Corrupt { at, valid_at, reason } => {
                println!("    DAMAGED at {at}: {reason}; a valid record follows at {valid_at}")
            }
        }
    }
    Ok(())
}

/// One entry of a batch, on its own line (an append's data by its length only).
fn print_entry(e: &LogEntry) {
    match e {
        LogEntry::Append { segment, offset, writer, last_event_number, data } => println!(
            "        append segment {segment} offset {offset} len {} writer {writer:x} event {last_event_number}",
            data.len()
        ),
        LogEntry::Merge { segment, offset, source, data } => {
            println!("        merge segment {source} into segment {segment} at offset {offset} len {}", data.len())
        }
        LogEntry::Relocate { segment, offset, data } => {
            println!(
                "        relocate segment {segment} offset {offset} len {} (a copy: its bytes the log holds)",
                data.len()
            )
        }
        other => println!("        {other:?}"),
    }
}
