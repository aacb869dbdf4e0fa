//! Power-loss simulation of the container log. A simulated disk keeps only what a completed
//! fdatasync covers; a crash tears the write in flight (each of its 512-byte sectors lost,
//! kept, or half written, in any combination; a write that puts a block's earlier records
//! there again, packed records, puts the same bytes, so they survive any tear). The real container core plans every flush; after
//! each crash the core is recovered from the disk images, every acknowledged append must be
//! readable at its acknowledged offset, and after the client resends every unacknowledged
//! append (same writer ids and event numbers) each event is present exactly once, in order.
//! In half the seeds a sans-IO mover copies durable data to a simulated tier-2 (durable on
//! append, like the fsync'd stores), records `Chunk` entries through the same flushes (which
//! crash too), and deletes the log files the core says are no longer needed; reads of old
//! data then come from tier-2.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_engine::constants::{BLOCK_BYTES, FILE_HEADER_BYTES, RECORD_HEADER_BYTES};
use sluice_engine::container::core::{ContainerCore, CoreConfig, OpResult, ReadOutcome, Request, Submitted, WriteStep};
use sluice_engine::container::index::FileIndex;
use sluice_engine::log::format::FileHeader;
use sluice_engine::log::scan::{ScanEnd, scan_file, sound_records};
use sluice_net::event::{EventIter, encode_event};
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Default, Clone)]
struct Disk {
    files: BTreeMap<u64, Vec<u8>>,
    /// Tier-2 chunks by name.
    tier2: HashMap<String, Vec<u8>>,
    /// Freed log files kept to be reused as later ones, with all they held (`spare_files`;
    /// deleted when the container opens, as `.spare` files are).
    spares: Vec<Vec<u8>>,
}

struct Crash;

/// What a device writes atomically, at least.
const SECTOR_BYTES: usize = 512;

struct Sim {
    rng: StdRng,
    disk: Disk,
    steps_left: u64,
    /// Whether a second flush may begin while one is written (the I/O driver's default).
    pipelined: bool,
    /// Batch writes under way, oldest first (`None`: a flush with nothing to write): at most
    /// two, completed in order; a crash tears every one of them.
    writing: VecDeque<Option<(u64, u64, Vec<u8>)>>,
    /// Flushes this simulation began beside another.
    began_beside: u64,
}

impl Sim {
    /// A simulation over `disk` that never crashes and keeps one flush in flight.
    fn new(seed: u64, disk: Disk) -> Sim {
        Sim {
            rng: StdRng::seed_from_u64(seed),
            disk,
            steps_left: u64::MAX,
            pipelined: false,
            writing: VecDeque::new(),
            began_beside: 0,
        }
    }

    /// Applies a write; if the crash point is reached the write is torn and Crash returned.
    fn write(&mut self, seq: u64, pos: u64, buf: &[u8]) -> Result<(), Crash> {
        let crash = self.steps_left == 0;
        self.steps_left = self.steps_left.saturating_sub(1);
        let file = self.disk.files.get_mut(&seq).expect("file prepared");
        let at = pos as usize;
        if !crash {
            file[at..at + buf.len()].copy_from_slice(buf);
            return Ok(());
        }
        self.tear(seq, pos, buf, true);
        // The other write under way ends as it may: lost, whole, or torn (it may have
        // reached the disk before the one begun first).
        for (seq, pos, buf) in std::mem::take(&mut self.writing).into_iter().flatten() {
            self.tear(seq, pos, &buf, false);
        }
        Err(Crash)
    }

    /// What a crash leaves of a write under way: each 512-byte sector lost, kept or half
    /// written (`by_sector`), or else the whole write lost, kept, or so torn.
    fn tear(&mut self, seq: u64, pos: u64, buf: &[u8], by_sector: bool) {
        let file = self.disk.files.get_mut(&seq).expect("file prepared");
        let at = pos as usize;
        assert!(at.is_multiple_of(BLOCK_BYTES as usize) && buf.len().is_multiple_of(BLOCK_BYTES as usize));
        let whole = if by_sector { 2 } else { self.rng.random_range(0..3) };
        for (i, block) in buf.chunks(SECTOR_BYTES).enumerate() {
            let dst = at + i * SECTOR_BYTES;
            match if whole == 2 { self.rng.random_range(0..3) } else { whole } {
                0 => {}
                1 => file[dst..dst + block.len()].copy_from_slice(block),
                _ => {
                    let k = self.rng.random_range(1..block.len());
                    file[dst..dst + k].copy_from_slice(&block[..k]);
                }
            }
        }
    }

    fn prepare(&mut self, cfg: &CoreConfig, seq: u64, epoch: u64, min_lsn: u64, tag: u64) -> Result<(), Crash> {
        let header = FileHeader { container: cfg.container, seq, epoch, file_bytes: cfg.file_bytes, min_lsn, tag };
        if let Some(mut image) = self.disk.spares.pop() {
            // A recycled file, as the I/O driver makes it: the new header and a cleared
            // block after it, synced, then the rename (which a crash may or may not keep).
            image[..2 * FILE_HEADER_BYTES as usize].fill(0);
            header.encode(&mut image[..FILE_HEADER_BYTES as usize]);
            let crash = self.steps_left == 0;
            if !crash || self.rng.random_bool(0.5) {
                self.disk.files.insert(seq, image);
            }
            RECYCLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return if crash { Err(Crash) } else { Ok(()) };
        }
        let mut image = vec![0u8; cfg.file_bytes as usize];
        header.encode(&mut image[..FILE_HEADER_BYTES as usize]);
        if self.steps_left == 0 {
            // Torn creation: the file may be missing, or its header partly written.
            if self.rng.random_bool(0.5) {
                let k = self.rng.random_range(0..64);
                image[k..FILE_HEADER_BYTES as usize].fill(0);
                self.disk.files.insert(seq, image);
            }
            return Err(Crash);
        }
        self.steps_left -= 1;
        self.disk.files.insert(seq, image);
        Ok(())
    }
}

fn step_buf(core: &mut ContainerCore, step: WriteStep, checkpoint: bool) -> Vec<u8> {
    let mut buf = vec![0xAAu8; step.len as usize];
    if checkpoint {
        core.encode_checkpoint(&mut buf);
    } else {
        core.encode_batch(&mut buf);
    }
    buf
}

/// Completes one flush, as the I/O driver does: begins one if none is under way, may begin a
/// second beside it (pipelined), then completes the oldest; returns its results (`None`:
/// nothing queued or under way), or Crash.
fn flush(core: &mut ContainerCore, sim: &mut Sim) -> Result<Option<Vec<OpResult>>, Crash> {
    if sim.writing.is_empty() {
        let Some(plan) = core.begin_flush().expect("no poison in the simulation") else {
            return Ok(None);
        };
        if let Some(seq) = plan.prepare {
            // Every record not yet durable (this flush's too) has this LSN or a later one.
            let tag = core.tag_for_file(seq);
            sim.prepare(core.config(), seq, core.epoch(), core.durable_lsn() + 1, tag)?;
        }
        if let Some(step) = plan.checkpoint {
            let buf = step_buf(core, step, true);
            sim.write(step.file_seq, step.pos, &buf)?;
        }
        let batch = plan.batch.map(|step| (step.file_seq, step.pos, step_buf(core, step, false)));
        sim.writing.push_back(batch);
    }
    if sim.pipelined && core.can_begin_another() && sim.rng.random_bool(0.8) {
        let plan = core.begin_flush().expect("no poison").expect("operations queued");
        sim.began_beside += 1;
        assert!(plan.prepare.is_none() && plan.checkpoint.is_none(), "no roll beside a flush in flight");
        let batch = plan.batch.map(|step| {
            for (seq, pos, buf) in sim.writing.iter().flatten() {
                let apart = *seq != step.file_seq || pos + buf.len() as u64 <= step.pos || step.pos + step.len <= *pos;
                assert!(apart, "a write beside another touches its blocks: {step:?} and {pos}+{}", buf.len());
            }
            (step.file_seq, step.pos, step_buf(core, step, false))
        });
        sim.writing.push_back(batch);
    }
    if let Some((seq, pos, buf)) = sim.writing.pop_front().expect("a flush under way") {
        sim.write(seq, pos, &buf)?;
    }
    Ok(Some(core.complete_flush().results))
}

fn recover(cfg: &CoreConfig, disk: &mut Disk) -> ContainerCore {
    let images: Vec<(u64, Bytes)> = disk.files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect();
    if let Some((_, last)) = images.last()
        && let ScanEnd::Torn { reason, .. } = scan_file(last).stop
        && reason.contains("being written with it")
    {
        WRITTEN_WITH_TORN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (core, report) = match ContainerCore::recover(cfg.clone(), &images) {
        Ok(r) => r,
        Err(e) => panic!("recovery failed: {e:?}"),
    };
    for seq in report.discard_files {
        disk.files.remove(&seq);
    }
    disk.spares.clear();
    if let Some((seq, at, clear)) = report.clear_torn {
        disk.files.get_mut(&seq).unwrap()[at as usize..at as usize + clear.len()].copy_from_slice(&clear);
    }
    let mut core = core;
    if let Some(&first) = disk.files.keys().next() {
        core.forget_files_below(first);
    }
    core
}

/// Crashes that left a torn record with the record written beside it whole after it.
static WRITTEN_WITH_TORN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Log files made from freed ones (the simulation must exercise them).
static RECYCLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Reads served from tier-2 (the simulation must exercise them).
static TIER2_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Reads served from log files, whose records were checked (likewise).
static LOG_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads durable bytes `[from, to)` (or to the tail) of a segment from cache, log and tier-2.
fn read_range(core: &mut ContainerCore, disk: &Disk, name: &str, from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = from;
    while off < to {
        let max = (to - off).min(1 << 16) as usize;
        match core.read(name, off, max).unwrap().0 {
            ReadOutcome::Data(d) => {
                let d = &d[..d.len().min(max)];
                off += d.len() as u64;
                out.extend_from_slice(d);
            }
            ReadOutcome::Log { file_seq, pieces, records: (start, end) } => {
                // The records named hold the pieces and are sound, as the engine checks them.
                LOG_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let file = &disk.files[&file_seq];
                if let Err((_, damage)) =
                    sluice_engine::log::scan::check_records(&file[start as usize..end as usize], start)
                {
                    panic!("{damage}");
                }
                assert!(pieces.iter().all(|&(pos, len)| pos >= start && pos + len <= end), "{pieces:?} {start}..{end}");
                for (pos, len) in pieces {
                    out.extend_from_slice(&disk.files[&file_seq][pos as usize..(pos + len) as usize]);
                    off += len;
                }
            }
            ReadOutcome::NeedIndex { file_seq } => {
                let records = sound_records(&Bytes::from(disk.files[&file_seq].clone()));
                core.insert_file_index(file_seq, FileIndex::build(&records).unwrap());
            }
            ReadOutcome::Chunk { chunk, offset, len, chunk_len } => {
                TIER2_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let c = &disk.tier2[&chunk];
                assert!(c.len() as u64 >= chunk_len, "tier-2 chunk {chunk} shorter than recorded");
                out.extend_from_slice(&c[offset as usize..(offset + len) as usize]);
                off += len;
            }
            ReadOutcome::Tail => break,
        }
    }
    out
}

/// One mover step: copy a piece of one segment's durable data to tier-2, record it (a flush
/// that may crash), then delete log files nothing needs. Returns files deleted.
fn mover_step(core: &mut ContainerCore, sim: &mut Sim, rng: &mut StdRng) -> Result<usize, Crash> {
    let tasks = core.move_tasks(0);
    if let Some(t) = tasks.get(rng.random_range(0..tasks.len().max(1))).cloned() {
        let epoch = core.epoch();
        let to = t.to.min(t.from + rng.random_range(1..100_000));
        let data = read_range(core, &sim.disk, &t.name, t.from, to);
        if !data.is_empty() {
            let (start, len0) = match t.last_chunk {
                Some(c) if c.epoch == epoch && c.start + c.len == t.from && rng.random_bool(0.7) => (c.start, c.len),
                _ => (t.from, 0),
            };
            let name = sluice_tier2::layout::chunk_name(&t.name, start, epoch);
            if len0 == 0 {
                // As the mover does: a chunk is recorded (no bytes) before it is created, so
                // tier-2 never holds a chunk the metadata does not name.
                let req = Request::Chunk { name: t.name.clone(), start, epoch, len: 0 };
                assert_eq!(core.submit(req).unwrap(), Submitted::Queued);
                while flush(core, sim)?.is_some() {}
                assert!(sim.disk.tier2.insert(name.clone(), Vec::new()).is_none(), "{name} created twice");
            }
            let chunk = sim.disk.tier2.get_mut(&name).expect("created");
            assert_eq!(chunk.len() as u64, len0, "a chunk is only appended at its recorded end within an epoch");
            chunk.extend_from_slice(&data);
            let req = Request::Chunk { name: t.name.clone(), start, epoch, len: len0 + data.len() as u64 };
            assert_eq!(core.submit(req).unwrap(), Submitted::Queued);
            while flush(core, sim)?.is_some() {}
        }
    }
    Ok(free_files(core, sim))
}

/// Deletes the log files the core no longer needs (the freeing task's work), keeping up to
/// its number of spares to reuse; returns how many went.
fn free_files(core: &mut ContainerCore, sim: &mut Sim) -> usize {
    let needed = core.files_needed_from();
    let gone: Vec<u64> = sim.disk.files.range(..needed).map(|(s, _)| *s).collect();
    for seq in &gone {
        let image = sim.disk.files.remove(seq).expect("listed");
        if sim.disk.spares.len() < core.config().spare_files {
            sim.disk.spares.push(image);
        }
    }
    core.forget_files_below(needed);
    gone.len()
}

/// What lets a restart skip listing tier-2: after any crash, every chunk in tier-2 is named
/// by the recovered metadata.
fn assert_tier2_named(core: &ContainerCore, disk: &Disk, seed: u64) {
    assert!(core.creations_recorded(), "seed {seed}: a container this build created records creations");
    let (map, _) = core.chunk_map();
    for name in disk.tier2.keys() {
        let (dir, file) = name.rsplit_once('/').expect("chunk path");
        let (start, epoch) = sluice_tier2::layout::parse_chunk_file(file).expect("chunk name");
        let named = map
            .iter()
            .any(|(seg, _, chunks, _)| sluice_tier2::layout::segment_dir(seg) == dir && chunks.contains(start, epoch));
        assert!(named, "seed {seed}: tier-2 holds {name}, which no metadata names");
    }
}

fn read_segment(core: &mut ContainerCore, disk: &Disk, name: &str) -> Vec<u8> {
    let status = core.status(name).unwrap();
    read_range(core, disk, name, status.start_offset, u64::MAX)
}

#[derive(Clone)]
struct Send {
    segment: usize,
    writer: u128,
    first: u64,
    payload: Vec<u8>,
    count: u32,
}

fn event(writer: u128, n: u64, rng: &mut StdRng) -> Vec<u8> {
    let mut e = format!("{writer}:{n}:").into_bytes();
    // Small events (many packed records to a block, the block written again by each) and
    // large ones (records across blocks, files that fill).
    let pad = if rng.random_bool(0.3) { rng.random_range(0..300) } else { rng.random_range(300..6000) };
    e.extend(std::iter::repeat_n(b'x', pad));
    e
}

/// One simulated run; `recycle`: with tier-2, and freed log files are reused with what they
/// held (`spare_files`). Its crashes, most log files, files freed and flushes begun beside
/// another.
fn run_seed(seed: u64, recycle: bool) -> (u64, usize, usize, u64) {
    let (mut crashes, mut max_files, mut freed) = (0u64, 0usize, 0usize);
    let with_tier2 = recycle || seed % 2 == 1;
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = CoreConfig {
        container: 3,
        file_bytes: [64u64 << 10, 128 << 10, 256 << 10][rng.random_range(0..3)],
        flush_bytes_max: rng.random_range(2_000..40_000),
        cache_bytes_max: rng.random_range(0..20_000),
        log_bytes_max: u64::MAX,
        pending_bytes_max: 1 << 30,
        prefill: Default::default(),
        spare_files: if recycle { 2 } else { 0 },
        writer_idle_ms: 0,
        salvage: false,
    };
    let names: Vec<String> = (0..3).map(|i| format!("s/t/{i}")).collect();
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim { pipelined: !seed.is_multiple_of(4), ..Sim::new(seed ^ 0x5eed, Disk::default()) };
    for n in &names {
        assert_eq!(core.submit(Request::Create { name: n.clone() }).unwrap(), Submitted::Queued);
    }
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    disk = sim.disk.clone();
    let writers: Vec<u128> = (1..=3u128).map(|w| w << 64 | u128::from(seed as u32)).collect();
    let mut next_number: HashMap<u128, u64> = writers.iter().map(|&w| (w, 1)).collect();
    // Acknowledged appends: (segment, offset, bytes).
    let mut acked: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    let mut unacked: Vec<Send> = Vec::new();
    for _cycle in 0..3 {
        sim.disk = disk.clone();
        sim.steps_left = rng.random_range(0..40);
        let crashed = loop {
            // Queue a few appends (and sometimes a resend of an unacknowledged one).
            let mut queued: Vec<Send> = Vec::new();
            // Like a real writer after a reconnect: resend what was never acknowledged, in
            // order, before anything new.
            let resends = unacked.len();
            for _ in 0..rng.random_range(1..6) + resends {
                let send = if !unacked.is_empty() {
                    unacked.remove(0)
                } else {
                    let writer = writers[rng.random_range(0..writers.len())];
                    let first = next_number[&writer];
                    let count = rng.random_range(1..5u32);
                    let mut payload = Vec::new();
                    for n in first..first + u64::from(count) {
                        encode_event(&mut payload, &event(writer, n, &mut rng));
                    }
                    next_number.insert(writer, first + u64::from(count));
                    Send { segment: rng.random_range(0..names.len()), writer, first, payload, count }
                };
                let req = Request::Append {
                    name: names[send.segment].clone(),
                    writer: send.writer,
                    first_event_number: send.first,
                    event_count: send.count,
                    expected_offset: None,
                    data: Bytes::from(send.payload.clone()),
                };
                match core.submit(req).unwrap() {
                    Submitted::Queued => queued.push(send),
                    Submitted::Ready(OpResult::Appended { duplicate: true, .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            // Flush everything queued; results come in submission order.
            let mut results = Vec::new();
            let mut crash = false;
            loop {
                match flush(&mut core, &mut sim) {
                    Ok(Some(r)) => results.extend(r),
                    Ok(None) => break,
                    Err(Crash) => {
                        crash = true;
                        break;
                    }
                }
            }
            for (send, r) in queued.iter().zip(results.iter()) {
                match r {
                    OpResult::Appended { offset, duplicate: false, .. } => {
                        acked.push((send.segment, *offset, send.payload.clone()));
                    }
                    OpResult::Appended { duplicate: true, .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            unacked.extend(queued.into_iter().skip(results.len()));
            if crash {
                break true;
            }
            if with_tier2 && rng.random_bool(0.5) {
                match mover_step(&mut core, &mut sim, &mut rng) {
                    Ok(n) => freed += n,
                    Err(Crash) => break true,
                }
            }
            if rng.random_bool(0.05) {
                break false;
            }
        };
        // Power loss (or a clean stop): recover from what the disk kept.
        disk = sim.disk.clone();
        crashes += u64::from(crashed);
        max_files = max_files.max(disk.files.len());
        core = recover(&cfg, &mut disk);
        if with_tier2 {
            assert_tier2_named(&core, &disk, seed);
        }
        for (seg, offset, bytes) in &acked {
            let all = read_segment(&mut core, &disk, &names[*seg]);
            assert_eq!(
                &all[*offset as usize..*offset as usize + bytes.len()],
                &bytes[..],
                "seed {seed}: acknowledged append at {offset} of segment {seg} lost"
            );
        }
    }
    // The client resends everything it never saw acknowledged.
    sim.disk = disk.clone();
    sim.steps_left = u64::MAX;
    for send in unacked.drain(..) {
        let req = Request::Append {
            name: names[send.segment].clone(),
            writer: send.writer,
            first_event_number: send.first,
            event_count: send.count,
            expected_offset: None,
            data: Bytes::from(send.payload),
        };
        core.submit(req).unwrap();
        while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    }
    disk = sim.disk.clone();
    core = recover(&cfg, &mut disk);
    // Every event exactly once; per writer and segment in increasing number order.
    let mut seen: HashMap<(u128, u64), usize> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let all = read_segment(&mut core, &disk, name);
        let mut last: HashMap<u128, u64> = HashMap::new();
        for ev in EventIter::new(&all) {
            let ev = std::str::from_utf8(ev.unwrap()).unwrap();
            let mut parts = ev.split(':');
            let w: u128 = parts.next().unwrap().parse().unwrap();
            let n: u64 = parts.next().unwrap().parse().unwrap();
            assert!(seen.insert((w, n), i).is_none(), "seed {seed}: event {w}:{n} appears twice");
            assert!(last.get(&w).is_none_or(|&l| l < n), "seed {seed}: order broken for writer {w}");
            last.insert(w, n);
        }
    }
    for (&w, &next) in &next_number {
        for n in 1..next {
            assert!(seen.contains_key(&(w, n)), "seed {seed}: event {w}:{n} lost");
        }
    }
    (crashes, max_files, freed, sim.began_beside)
}

#[test]
fn power_loss_500_seeds() {
    let (mut crashes, mut max_files, mut freed, mut pipelined) = (0, 0, 0, 0);
    for seed in 0..500 {
        let (c, f, d, b) = run_seed(seed, false);
        crashes += c;
        max_files = max_files.max(f);
        freed += d;
        pipelined += b;
    }
    assert!(freed >= 100, "the mover freed only {freed} log files");
    let tier2_reads = TIER2_READS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(tier2_reads >= 100, "only {tier2_reads} reads came from tier-2");
    let log_reads = LOG_READS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(log_reads >= 100, "only {log_reads} reads came from log files");
    // The simulation must really crash, and crash across log file rolls.
    assert!(crashes >= 500, "only {crashes} crashes in 500 seeds");
    assert!(max_files >= 3, "logs never rolled past {max_files} files");
    // Flushes begun beside another, and crashes that kept the second whole after a torn first.
    let written_with_torn = WRITTEN_WITH_TORN.load(std::sync::atomic::Ordering::Relaxed);
    assert!(pipelined >= 1000, "only {pipelined} flushes began beside another");
    assert!(written_with_torn >= 10, "only {written_with_torn} crashes kept a record written beside a torn one");
    eprintln!(
        "power loss: {crashes} crashes over 500 seeds, up to {max_files} log files, {freed} freed after moves, {tier2_reads} tier-2 reads, {log_reads} log reads, {pipelined} flushes begun beside another, {written_with_torn} crashes kept one written beside a torn one"
    );
}

/// The same with freed log files reused as later ones: their earlier records stay behind the
/// new ones (and behind every torn write), and none of them may count as damage or be
/// replayed or read.
#[test]
fn power_loss_with_reused_log_files_1000_seeds() {
    let (mut crashes, mut freed) = (0, 0);
    for seed in 10_000..11_000 {
        let (c, _, d, _) = run_seed(seed, true);
        crashes += c;
        freed += d;
    }
    let recycled = RECYCLED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(crashes >= 1000, "only {crashes} crashes in 1000 seeds");
    assert!(recycled >= 100, "only {recycled} log files were made from freed ones ({freed} freed)");
    eprintln!("power loss, reusing log files: {crashes} crashes over 1000 seeds, {freed} freed, {recycled} reused");
}

/// Seeds a soak (below) found failing, kept as they were fixed, both with reused files and
/// a record written beside another. 100,013: a write torn only in the padding after its
/// record, the one beside it whole: the padding held the earlier use's bytes, not zeros, and
/// recovery refused to start. 106,195: a torn write left an earlier use's record in place
/// inside its range; the record written beside it, beyond that, was not cleared, and after
/// the next crash it lay after the new chain: damage.
#[test]
fn power_loss_seeds_a_soak_found() {
    for (seed, recycle) in [(100_013, true), (106_195, true)] {
        let (crashes, _, _, _) = run_seed(seed, recycle);
        assert!(crashes > 0, "seed {seed}: no crash");
    }
}

/// A longer run of the simulations, not part of the suite (it takes as long as asked):
/// `SLUICE_SOAK_SEEDS` seeds (default 20,000) of each kind (fresh files, reused files, copies
/// of small segments) from `SLUICE_SOAK_FROM` (default 100,000, past the suite's seeds); a progress line every 1,000 seeds. Run with
/// `cargo test --release -p sluice-engine --test power_loss power_loss_soak -- --ignored --nocapture`.
#[test]
#[ignore = "a soak: run it by name with --ignored"]
fn power_loss_soak() {
    let env = |name: &str, default: u64| {
        std::env::var(name).ok().map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}")))
    };
    let (from, seeds) = (env("SLUICE_SOAK_FROM", 100_000), env("SLUICE_SOAK_SEEDS", 20_000));
    let started = std::time::Instant::now();
    let (mut crashes, mut copies, mut freed, mut pipelined) = (0, 0, 0, 0);
    for (i, seed) in (from..from + seeds).enumerate() {
        for recycle in [false, true] {
            let (c, _, d, b) = run_seed(seed, recycle);
            (crashes, freed, pipelined) = (crashes + c, freed + d, pipelined + b);
        }
        let (c, r, d, b) = copies_seed(seed);
        (crashes, copies, freed, pipelined) = (crashes + c, copies + r, freed + d, pipelined + b);
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "soak: seeds {from}..{} ({} of {seeds}) x 3, {crashes} crashes, {copies} copies, {freed} files freed, {:?}",
                seed + 1,
                i + 1,
                started.elapsed()
            );
        }
    }
    let written_with_torn = WRITTEN_WITH_TORN.load(std::sync::atomic::Ordering::Relaxed);
    let recycled = RECYCLED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(crashes >= 3 * seeds, "only {crashes} crashes in {seeds} seeds of each kind");
    eprintln!(
        "soak done: {crashes} crashes over {seeds} seeds x 3 from {from}, {copies} copies, {freed} freed, {recycled} reused, {pipelined} flushes begun beside another, {written_with_torn} crashes kept one written beside a torn one, {:?}",
        started.elapsed()
    );
}

fn fresh_cfg() -> CoreConfig {
    CoreConfig {
        container: 0,
        file_bytes: 64 << 10,
        flush_bytes_max: 1 << 20,
        cache_bytes_max: 0,
        log_bytes_max: u64::MAX,
        pending_bytes_max: 1 << 30,
        prefill: Default::default(),
        spare_files: 0,
        writer_idle_ms: 0,
        salvage: false,
    }
}

/// An unnumbered append of one event to `a/b/0`.
fn one_event(payload: &[u8]) -> Request {
    let mut p = Vec::new();
    encode_event(&mut p, payload);
    Request::Append {
        name: "a/b/0".into(),
        writer: 0,
        first_event_number: 0,
        event_count: 1,
        expected_offset: None,
        data: Bytes::from(p),
    }
}

/// Writes `n` events of 2,500 bytes, a flush each.
fn write_some(core: &mut ContainerCore, sim: &mut Sim, n: usize) {
    for i in 0..n {
        let mut event = format!("event-{i}-").into_bytes();
        event.resize(2500, b'x');
        core.submit(one_event(&event)).unwrap();
        while flush(core, sim).ok().flatten().is_some() {}
    }
}

fn setup() -> (ContainerCore, Sim) {
    let cfg = fresh_cfg();
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim::new(1, disk);
    core.submit(Request::Create { name: "a/b/0".into() }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    (core, sim)
}

#[test]
fn empty_log_recovers_to_nothing() {
    let mut disk = Disk::default();
    let core = recover(&fresh_cfg(), &mut disk);
    assert_eq!(core.segment_count(), 0);
    assert_eq!(core.epoch(), 1);
}

#[test]
fn torn_tail_is_cut_and_cleared() {
    let (mut core, mut sim) = setup();
    write_some(&mut core, &mut sim, 5);
    // Garbage in the next block: an incomplete record after which nothing valid follows.
    let file = sim.disk.files.get_mut(&0).unwrap();
    let tail = scan_file(&Bytes::from(file.clone())).end as usize;
    file[tail..tail + 100].fill(0x5A);
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert!(disk.files[&0][tail..tail + 100].iter().all(|&b| b == 0), "torn bytes cleared");
    let data = read_segment(&mut core, &disk, "a/b/0");
    assert_eq!(EventIter::new(&data).count(), 5);
    assert!(core.epoch() > 1);
}

#[test]
fn corrupt_middle_refuses_to_start() {
    let (mut core, mut sim) = setup();
    write_some(&mut core, &mut sim, 5);
    let file = sim.disk.files.get_mut(&0).unwrap();
    let scan = scan_file(&Bytes::from(file.clone()));
    let victim = scan.records[2].pos as usize + 50;
    file[victim] ^= 0xFF;
    let images: Vec<(u64, Bytes)> = sim.disk.files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect();
    match ContainerCore::recover(fresh_cfg(), &images) {
        Err(sluice_engine::container::core::RecoverFault::Corrupt { file_seq: 0, at, valid_at }) => {
            assert_eq!(at, scan.records[2].pos);
            assert!(valid_at > at);
        }
        Err(e) => panic!("wrong error {e:?}"),
        Ok(_) => panic!("recovery accepted a corrupt log"),
    }
}

/// An unnumbered append of one event to `name`.
fn event_to(name: &str, payload: &[u8]) -> Request {
    match one_event(payload) {
        Request::Append { writer, first_event_number, event_count, expected_offset, data, .. } => {
            Request::Append { name: name.into(), writer, first_event_number, event_count, expected_offset, data }
        }
        _ => unreachable!(),
    }
}

/// Submits `reqs` and writes them in one flush (one record).
fn one_record(core: &mut ContainerCore, sim: &mut Sim, reqs: Vec<Request>) {
    for r in reqs {
        core.submit(r).unwrap();
    }
    while flush(core, sim).ok().flatten().is_some() {}
}

/// Salvage (`CoreConfig::salvage`): a record in the middle of the current file damaged,
/// sound ones after it. Without salvage recovery refuses; with it every sound record is
/// replayed. `a/b/0` lost one append: a hole where it was, the events on both sides read,
/// and a read at the hole fails as damaged data naming where the data resumes. `s/c/0`,
/// created in the lost record, is gone (its later append dropped); `s/b/0` reads whole;
/// `s/d/0`, untouched after the damage, is named as one whose lost appends would leave no trace.
/// Appends go on after the last sound record, and recovering again (salvaging again, the
/// damage still in the file) finds the same and the new appends.
#[test]
fn salvage_replays_past_a_damaged_record_leaving_holes() {
    use sluice_engine::error::EngineError;
    let (mut core, mut sim) = setup();
    one_record(
        &mut core,
        &mut sim,
        vec![Request::Create { name: "s/b/0".into() }, Request::Create { name: "s/d/0".into() }],
    );
    one_record(&mut core, &mut sim, vec![event_to("a/b/0", b"a1"), event_to("s/b/0", b"b1")]);
    one_record(
        &mut core,
        &mut sim,
        vec![event_to("a/b/0", b"a2-lost"), Request::Create { name: "s/c/0".into() }, event_to("s/c/0", b"c1")],
    );
    one_record(&mut core, &mut sim, vec![event_to("a/b/0", b"a3"), event_to("s/b/0", b"b2"), event_to("s/c/0", b"c2")]);
    one_record(&mut core, &mut sim, vec![event_to("s/b/0", b"b3")]);
    let scan = scan_file(&Bytes::from(sim.disk.files[&0].clone()));
    // The checkpoint, the creation of a/b/0 and of s/b/0, then the three-append records.
    assert_eq!(scan.records.len(), 7);
    let victim = scan.records[4].pos;
    sim.disk.files.get_mut(&0).unwrap()[victim as usize + 60] ^= 0xFF;

    let images =
        |disk: &Disk| -> Vec<(u64, Bytes)> { disk.files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect() };
    assert!(matches!(
        ContainerCore::recover(fresh_cfg(), &images(&sim.disk)),
        Err(sluice_engine::container::core::RecoverFault::Corrupt { at, .. }) if at == victim
    ));
    let salvage = CoreConfig { salvage: true, ..fresh_cfg() };
    let (a1, a2) = (framed(b"a1"), framed(b"a2-lost"));
    let check = |core: &mut ContainerCore, disk: &Disk, a_more: &[&[u8]]| {
        let lines = core.salvaged().join("\n");
        assert!(lines.contains(&format!("damaged records at bytes {victim}..")), "{lines}");
        // Its header is intact: its entries, unverified, tell what it held.
        let c1 = framed(b"c1");
        let held = format!(
            "by their intact headers they held (unverified): a/b/0 bytes {a1}..{}, s/c/0 bytes 0..{c1}, creation of s/c/0",
            a1 + a2
        );
        assert!(lines.contains(&held), "{lines}");
        assert!(lines.contains("1 record lost"), "{lines}");
        assert!(lines.contains(&format!("a/b/0: bytes {a1}..{} lost", a1 + a2)), "{lines}");
        assert!(lines.contains("1 entry for segments created in the lost records dropped"), "{lines}");
        // s/d/0 had no entry after the damage: appends to it could have been lost untraced.
        assert!(lines.contains("1 open segment with no entry after the lost records"), "{lines}");
        assert!(lines.contains("(check their writers): s/d/0"), "{lines}");
        let events = |d: Vec<u8>| EventIter::new(&d).map(|e| e.unwrap().to_vec()).collect::<Vec<_>>();
        // A read from the start ends at the hole.
        match core.read("a/b/0", 0, 1 << 16).unwrap().0 {
            ReadOutcome::Log { pieces, .. } => assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), a1, "{pieces:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(events(read_range(core, disk, "a/b/0", 0, a1)), vec![b"a1".to_vec()], "up to the hole");
        match core.read("a/b/0", a1, 1 << 16) {
            Err(EngineError::DamagedLog { resume, message }) => {
                assert_eq!(resume, a1 + a2, "{message}");
                assert!(message.contains(&format!("no sound record holds offset {a1} of a/b/0")), "{message}");
            }
            other => panic!("a read in the hole gave {other:?}"),
        }
        let mut after = vec![b"a3".to_vec()];
        after.extend(a_more.iter().map(|m| m.to_vec()));
        assert_eq!(events(read_range(core, disk, "a/b/0", a1 + a2, u64::MAX)), after, "after the hole");
        let b: Vec<Vec<u8>> = ["b1", "b2", "b3"].iter().map(|s| s.as_bytes().to_vec()).collect();
        assert_eq!(events(read_range(core, disk, "s/b/0", 0, u64::MAX)), b, "untouched");
        assert!(matches!(core.status("s/c/0"), Err(EngineError::NoSuchSegment(_))), "created in the lost record");
    };
    let mut disk = sim.disk.clone();
    let mut core = recover(&salvage, &mut disk);
    check(&mut core, &disk, &[]);

    // Appends go on after the last sound record; the next recovery salvages the same.
    let mut sim = Sim::new(2, disk);
    one_record(&mut core, &mut sim, vec![event_to("a/b/0", b"a4")]);
    let mut disk = sim.disk.clone();
    let mut core = recover(&salvage, &mut disk);
    check(&mut core, &disk, &[b"a4"]);
    assert!(matches!(
        ContainerCore::recover(fresh_cfg(), &images(&disk)),
        Err(sluice_engine::container::core::RecoverFault::Corrupt { at, .. }) if at == victim
    ));
}

/// Salvage of a damaged checkpoint: the newest log file's opening checkpoint is damaged,
/// its batches sound. Without salvage recovery refuses; with it the file before is replayed
/// and this one's batches after it: nothing is lost (the checkpoint restated that state).
/// The next flush starts a new file with a checkpoint, so a later recovery needs neither
/// salvage nor the file before. Without that file, salvage cannot help and says so.
#[test]
fn salvage_rebuilds_a_damaged_checkpoint_from_the_file_before() {
    use sluice_engine::container::core::RecoverFault;
    let (mut core, mut sim) = setup();
    let mut n = 0;
    while !sim.disk.files.contains_key(&1) {
        core.submit(one_event(format!("event-{n}").as_bytes())).unwrap();
        while flush(&mut core, &mut sim).ok().flatten().is_some() {}
        n += 1;
        assert!(n < 10_000, "the log never rolled");
    }
    write_some(&mut core, &mut sim, 3);
    let expected = read_segment(&mut core, &sim.disk, "a/b/0");
    let scan = scan_file(&Bytes::from(sim.disk.files[&1].clone()));
    assert!(scan.records.len() >= 4, "a checkpoint and batches in file 1");
    sim.disk.files.get_mut(&1).unwrap()[scan.records[0].pos as usize + 70] ^= 0xFF;

    let images =
        |disk: &Disk| -> Vec<(u64, Bytes)> { disk.files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect() };
    assert!(matches!(
        ContainerCore::recover(fresh_cfg(), &images(&sim.disk)),
        Err(RecoverFault::Corrupt { file_seq: 1, .. })
    ));
    let salvage = CoreConfig { salvage: true, ..fresh_cfg() };
    let mut disk = sim.disk.clone();
    let mut core = recover(&salvage, &mut disk);
    let lines = core.salvaged().join("\n");
    assert!(lines.contains("the checkpoint opening log file 0000000000000001.log was damaged"), "{lines}");
    assert!(!lines.contains("they held"), "a checkpoint's payload is not taken for entries: {lines}");
    assert!(
        !lines.contains("records lost") && !lines.contains("lost (") && !lines.contains("no entry after"),
        "{lines}"
    );
    assert_eq!(read_segment(&mut core, &disk, "a/b/0"), expected, "nothing lost");

    // The next write starts file 2 with a checkpoint; then recovery needs neither salvage
    // nor file 0.
    let mut sim = Sim::new(3, disk);
    write_some(&mut core, &mut sim, 1);
    assert!(sim.disk.files.contains_key(&2), "a new file after the salvage");
    let mut disk = sim.disk.clone();
    let core = recover(&fresh_cfg(), &mut disk);
    assert!(core.salvaged().is_empty());
    disk.files.remove(&0);
    recover(&fresh_cfg(), &mut disk);

    // Without the file before the damaged checkpoint there is nothing to rebuild from.
    let mut without = sim.disk.clone();
    without.files.remove(&0);
    without.files.remove(&2);
    match ContainerCore::recover(salvage, &images(&without)) {
        Err(RecoverFault::Invalid { file_seq: 1, reason }) => assert!(reason.contains("cannot salvage"), "{reason}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("salvaged without the file before"),
    }
}

#[test]
fn writer_dedupe_across_recovery() {
    let (mut core, mut sim) = setup();
    let mut p = Vec::new();
    encode_event(&mut p, b"one");
    encode_event(&mut p, b"two");
    let req = |first: u64, data: &[u8], count| Request::Append {
        name: "a/b/0".into(),
        writer: 42,
        first_event_number: first,
        event_count: count,
        expected_offset: None,
        data: Bytes::copy_from_slice(data),
    };
    core.submit(req(1, &p, 2)).unwrap();
    // The same events again before the first copy is durable: answered after it, not appended.
    assert_eq!(core.submit(req(1, &p, 2)).unwrap(), Submitted::Queued);
    let results = flush(&mut core, &mut sim).ok().flatten().unwrap();
    assert!(matches!(results[1], OpResult::Appended { duplicate: true, last_event_number: 2, .. }));
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert!(matches!(
        core.submit(req(1, &p, 2)).unwrap(),
        Submitted::Ready(OpResult::Appended { duplicate: true, .. })
    ));
    // Partial overlap: event 2 again plus a new event 3; only 3 is appended.
    let mut q = Vec::new();
    encode_event(&mut q, b"two");
    encode_event(&mut q, b"three");
    sim.disk = disk;
    core.submit(req(2, &q, 2)).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    let data = read_segment(&mut core, &sim.disk, "a/b/0");
    let evs: Vec<&[u8]> = EventIter::new(&data).map(|e| e.unwrap()).collect();
    assert_eq!(evs, vec![&b"one"[..], b"two", b"three"]);
    assert_eq!(core.status("a/b/0").unwrap().writers, vec![(42, 3)]);
}

#[test]
fn failed_flush_poisons_the_container() {
    let (mut core, mut sim) = setup();
    write_some(&mut core, &mut sim, 2);
    let append = || Request::Append {
        name: "a/b/0".into(),
        writer: 0,
        first_event_number: 0,
        event_count: 0,
        expected_offset: None,
        data: Bytes::from_static(b"raw"),
    };
    core.submit(append()).unwrap();
    core.submit(append()).unwrap();
    let plan = core.begin_flush().unwrap().unwrap();
    assert_eq!(plan.ops, 2);
    core.submit(append()).unwrap();
    // The write (or its fdatasync) failed: everything queued fails, nothing is retried.
    assert_eq!(core.fail_flush("injected EIO".into()), 3);
    assert!(core.is_poisoned());
    match core.submit(append()) {
        Err(sluice_engine::EngineError::Poisoned { reason, .. }) => assert!(reason.contains("EIO")),
        other => panic!("expected poisoned, got {other:?}"),
    }
    assert!(core.begin_flush().unwrap().is_none());
    // Recovery from the disk brings it back with the acknowledged data only.
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert!(!core.is_poisoned());
    assert_eq!(EventIter::new(&read_segment(&mut core, &disk, "a/b/0")).count(), 2);
}

#[test]
fn concurrent_create_answers_after_the_first_is_durable() {
    let (mut core, mut sim) = setup();
    assert_eq!(core.submit(Request::Create { name: "x/y/0".into() }).unwrap(), Submitted::Queued);
    // A second create while the first is queued waits for it rather than failing.
    assert_eq!(core.submit(Request::Create { name: "x/y/0".into() }).unwrap(), Submitted::Queued);
    assert!(core.status("x/y/0").is_err(), "not visible before it is durable");
    let results = flush(&mut core, &mut sim).ok().flatten().unwrap();
    assert_eq!(results, vec![OpResult::Done, OpResult::Done]);
    assert!(core.status("x/y/0").is_ok());
    assert!(matches!(
        core.submit(Request::Create { name: "x/y/0".into() }),
        Err(sluice_engine::EngineError::SegmentExists(_))
    ));
}

#[test]
fn log_budget_refuses_appends_until_files_are_freed() {
    let mut cfg = fresh_cfg();
    cfg.log_bytes_max = 4 * cfg.file_bytes;
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim::new(7, disk);
    core.submit(Request::Create { name: "a/b/0".into() }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    let append = |core: &mut ContainerCore| core.submit(one_event(&[7u8; 8000]));
    let mut accepted = 0;
    let refused = loop {
        match append(&mut core) {
            Ok(_) => {
                accepted += 1;
                while flush(&mut core, &mut sim).ok().flatten().is_some() {}
            }
            Err(e) => break e,
        }
        assert!(accepted < 1000, "the budget never applied");
    };
    assert!(matches!(refused, sluice_engine::error::EngineError::LogFull(_)), "{refused:?}");
    assert!(sim.disk.files.len() as u64 <= 4, "{} files on disk", sim.disk.files.len());
    // Nothing can be freed before tier-2 holds the data.
    assert_eq!(core.files_needed_from(), core.oldest_file());
    // Move everything, free the files, and appends are accepted again.
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..200 {
        mover_step(&mut core, &mut sim, &mut rng).ok().unwrap();
    }
    assert!(core.move_tasks(0).is_empty(), "everything moved");
    assert_eq!(sim.disk.files.len(), 1, "only the current file is left");
    // Forgotten files still being cut from the disk count against the budget until gone.
    core.set_files_freeing(3);
    assert!(matches!(append(&mut core), Err(sluice_engine::error::EngineError::LogFull(_))));
    core.set_files_freeing(0);
    append(&mut core).expect("room again");
    // Truncation turns the chunks below the new start into garbage, and reads below it fail.
    let len = core.status("a/b/0").unwrap().length;
    core.submit(Request::Truncate { name: "a/b/0".into(), offset: len }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    assert!(!core.take_garbage().is_empty(), "chunks below the cut are garbage");
    assert!(matches!(core.read("a/b/0", 0, 10), Err(sluice_engine::error::EngineError::Truncated { .. })));
}

#[test]
fn uncollected_tier2_garbage_survives_log_rolls_and_recovery() {
    let (mut core, mut sim) = setup();
    core.submit(Request::Create { name: "a/b/1".into() }).unwrap();
    write_some(&mut core, &mut sim, 50);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..50 {
        mover_step(&mut core, &mut sim, &mut rng).ok().unwrap();
    }
    assert!(!sim.disk.tier2.is_empty(), "a/b/0 has chunks");
    core.submit(Request::Delete { name: "a/b/0".into() }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    // Roll past the file holding the delete without collecting: the checkpoint carries it.
    let first = core.current_file();
    let mut i = 0;
    while core.current_file() < first + 2 {
        let mut p = Vec::new();
        encode_event(&mut p, &[i as u8; 4000]);
        core.submit(Request::Append {
            name: "a/b/1".into(),
            writer: 0,
            first_event_number: 0,
            event_count: 1,
            expected_offset: None,
            data: Bytes::from(p),
        })
        .unwrap();
        while flush(&mut core, &mut sim).ok().flatten().is_some() {}
        i += 1;
    }
    let mut disk = sim.disk.clone();
    disk.files.retain(|&seq, _| seq > first);
    let mut core = recover(&fresh_cfg(), &mut disk);
    let garbage = core.take_garbage();
    assert!(!garbage.is_empty(), "the deleted segment's chunks are still to be collected");
    for g in &garbage {
        assert!(g.starts_with("a/b/0/") && disk.tier2.contains_key(g), "{g}");
    }
}

#[test]
fn a_replay_accepted_before_a_seal_is_a_duplicate_not_a_refusal() {
    let (mut core, mut sim) = setup();
    let numbered = |first: u64| {
        let mut p = Vec::new();
        encode_event(&mut p, b"x");
        encode_event(&mut p, b"y");
        Request::Append {
            name: "a/b/0".into(),
            writer: 7,
            first_event_number: first,
            event_count: 2,
            expected_offset: None,
            data: Bytes::from(p),
        }
    };
    core.submit(numbered(1)).unwrap();
    core.submit(Request::Seal { name: "a/b/0".into() }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    // A writer that lost its connection resends: the events are in, so it must not send
    // them to the successors as well.
    match core.submit(numbered(1)).unwrap() {
        Submitted::Ready(OpResult::Appended { duplicate: true, .. }) => {}
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert!(matches!(core.submit(numbered(3)), Err(sluice_engine::EngineError::Sealed(_))));
}

/// A committed transaction's shadow moves into its segment in one log entry: no writer
/// entry is left behind, a second merge (concurrent or later) is answered without moving
/// anything twice, and recovery (reading the merged bytes from a cold log file) finds the
/// events in the segment and the shadow gone.
#[test]
fn a_merge_moves_a_shadow_in_one_entry_and_survives_recovery() {
    use sluice_net::txn::{shadow_payload, shadow_segment_name, split_shadow_payload};
    let (mut core, mut sim) = setup();
    let shadow = shadow_segment_name("a", "b", 0, 0xabc);
    core.submit(Request::Create { name: shadow.clone() }).unwrap();
    let mut raw = Vec::new();
    for (i, text) in [b"t1", b"t2"].iter().enumerate() {
        encode_event(&mut raw, &shadow_payload(0.25 + i as f64 / 10.0, &text[..]));
    }
    let shadow_append = Request::Append {
        name: shadow.clone(),
        writer: 9,
        first_event_number: 1,
        event_count: 2,
        expected_offset: None,
        data: Bytes::from(raw.clone()),
    };
    core.submit(shadow_append).unwrap();
    core.submit(Request::Append {
        name: "a/b/0".into(),
        writer: 7,
        first_event_number: 1,
        event_count: 1,
        expected_offset: None,
        data: {
            let mut p = Vec::new();
            encode_event(&mut p, b"plain");
            Bytes::from(p)
        },
    })
    .unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    let len = raw.len() as u64;
    assert_eq!(core.merge_source_length(&shadow, Some(len)).unwrap(), Some(len));
    assert!(core.merge_source_length(&shadow, Some(len + 1)).is_err(), "more than the shadow holds");
    assert!(core.merge_source_length(&shadow, None).is_err(), "all of an unsealed shadow");
    assert!(core.merge_source_length("a/b/0", Some(1)).is_err(), "only shadows merge");
    // What `Container::merge` sends: the events without their key points.
    let mut data = Vec::new();
    for e in EventIter::new(&raw) {
        encode_event(&mut data, split_shadow_payload(e.unwrap()).unwrap().1);
    }
    let merge = |data: Vec<u8>| Request::Merge {
        name: "a/b/0".into(),
        source: shadow.clone(),
        source_length: Some(len),
        data: Bytes::from(data),
    };
    assert!(matches!(
        core.submit(Request::Merge {
            name: "a/b/1".into(),
            source: shadow.clone(),
            source_length: Some(len),
            data: Bytes::from(data.clone())
        }),
        Err(sluice_engine::EngineError::NoSuchSegment(_))
    ));
    assert_eq!(core.submit(merge(data.clone())).unwrap(), Submitted::Queued);
    // A second merge while the first is on its way waits for it, and moves nothing.
    assert_eq!(core.merge_source_length(&shadow, Some(len)).unwrap(), None);
    assert_eq!(core.submit(merge(Vec::new())).unwrap(), Submitted::Queued);
    assert!(core.status(&shadow).is_err(), "the shadow is no longer served");
    let results = flush(&mut core, &mut sim).ok().flatten().unwrap();
    let plain_len = framed(b"plain");
    assert_eq!(
        results,
        vec![
            OpResult::Appended {
                offset: plain_len,
                length: plain_len + data.len() as u64,
                last_event_number: 0,
                duplicate: false
            },
            OpResult::Done
        ]
    );
    assert_eq!(core.submit(merge(Vec::new())).unwrap(), Submitted::Ready(OpResult::Done));
    assert_eq!(core.status("a/b/0").unwrap().writers, vec![(7, 1)], "no writer entry for the merge");
    let expect = vec![&b"plain"[..], b"t1", b"t2"];
    let got = read_segment(&mut core, &sim.disk, "a/b/0");
    assert_eq!(EventIter::new(&got).map(|e| e.unwrap()).collect::<Vec<_>>(), expect);
    // Roll the log past the merge, then recover: the merged bytes come from a cold file.
    write_some(&mut core, &mut sim, 40);
    assert!(sim.disk.files.len() > 1, "the log rolled");
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert!(core.status(&shadow).is_err(), "the shadow stays gone after recovery");
    let got = read_segment(&mut core, &disk, "a/b/0");
    let events: Vec<&[u8]> = EventIter::new(&got).map(|e| e.unwrap()).collect();
    assert_eq!(events[..3], expect[..]);
    assert_eq!(events.len(), 3 + 40);
    // Into a sealed segment: refused (the client moves the events to the successors).
    let shadow2 = shadow_segment_name("a", "b", 0, 0xdef);
    core.submit(Request::Create { name: shadow2.clone() }).unwrap();
    core.submit(Request::Seal { name: shadow2.clone() }).unwrap();
    core.submit(Request::Seal { name: "a/b/0".into() }).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    assert_eq!(core.merge_source_length(&shadow2, None).unwrap(), Some(0));
    let sealed = Request::Merge { name: "a/b/0".into(), source: shadow2, source_length: None, data: Bytes::new() };
    assert!(matches!(core.submit(sealed), Err(sluice_engine::EngineError::Sealed(_))));
}

fn framed(payload: &[u8]) -> u64 {
    let mut p = Vec::new();
    encode_event(&mut p, payload);
    p.len() as u64
}

/// A writer that has not appended for `writer_idle_ms` is forgotten when the next log file
/// starts, and recovery does not bring it back; a recent one stays. Without a clock
/// (`set_now_ms` never called) nothing is forgotten.
#[test]
fn idle_writers_are_forgotten_when_a_new_file_starts() {
    let cfg = CoreConfig { writer_idle_ms: 1000, ..fresh_cfg() };
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim::new(1, disk);
    core.submit(Request::Create { name: "a/b/0".into() }).unwrap();
    let numbered = |writer: u128| {
        let mut p = Vec::new();
        encode_event(&mut p, format!("from {writer}").as_bytes());
        Request::Append {
            name: "a/b/0".into(),
            writer,
            first_event_number: 1,
            event_count: 1,
            expected_offset: None,
            data: Bytes::from(p),
        }
    };
    core.set_now_ms(10_000);
    core.submit(numbered(1)).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    core.set_now_ms(10_500);
    core.submit(numbered(2)).unwrap();
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    core.set_now_ms(11_200);
    let files = sim.disk.files.len();
    write_some(&mut core, &mut sim, 30);
    assert!(sim.disk.files.len() > files, "the log rolled");
    assert_eq!(core.status("a/b/0").unwrap().writers, vec![(2, 1)], "writer 1 idle 1.2 s, writer 2 0.7 s");
    let mut disk = sim.disk.clone();
    let mut core = recover(&cfg, &mut disk);
    assert_eq!(core.status("a/b/0").unwrap().writers, vec![(2, 1)], "recovery keeps it forgotten");
    // Writer 1 is a new writer now: its event 1 is taken (a resend a day late would be).
    assert!(matches!(core.submit(numbered(1)).unwrap(), Submitted::Queued));
    // No clock, no forgetting.
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim::new(1, disk);
    core.submit(Request::Create { name: "a/b/0".into() }).unwrap();
    core.submit(numbered(3)).unwrap();
    write_some(&mut core, &mut sim, 30);
    assert_eq!(core.status("a/b/0").unwrap().writers, vec![(3, 1)]);
}

/// Two damaged records in the current file: the report names the open segments with no
/// entry after the *last* loss (whose last operation may be lost without a trace), here
/// `s/a/0`, whose append in the second damaged record is followed only by `s/b/0`'s (the
/// first damaged record held `s/b/0`'s append: a hole).
#[test]
fn salvage_names_segments_untraced_after_the_last_of_several_losses() {
    let (mut core, mut sim) = setup();
    one_record(
        &mut core,
        &mut sim,
        vec![Request::Create { name: "s/a/0".into() }, Request::Create { name: "s/b/0".into() }],
    );
    one_record(&mut core, &mut sim, vec![event_to("s/a/0", b"a1"), event_to("s/b/0", b"b1")]);
    one_record(&mut core, &mut sim, vec![event_to("s/b/0", b"b2-lost")]);
    one_record(&mut core, &mut sim, vec![event_to("s/a/0", b"a2"), event_to("s/b/0", b"b3")]);
    one_record(&mut core, &mut sim, vec![event_to("s/a/0", b"a3-lost")]);
    one_record(&mut core, &mut sim, vec![event_to("s/b/0", b"b4")]);
    let scan = scan_file(&Bytes::from(sim.disk.files[&0].clone()));
    for victim in [scan.records[4].pos, scan.records[6].pos] {
        sim.disk.files.get_mut(&0).unwrap()[victim as usize + 60] ^= 0xFF;
    }
    let salvage = CoreConfig { salvage: true, ..fresh_cfg() };
    let mut disk = sim.disk.clone();
    let core = recover(&salvage, &mut disk);
    let lines = core.salvaged().join("\n");
    assert!(lines.contains("2 records lost"), "{lines}");
    // (`a/b/0`, which `setup` made, has no entry after the losses either.)
    assert!(lines.contains("2 open segments with no entry after the lost records"), "{lines}");
    assert!(lines.contains("(check their writers): a/b/0, s/a/0"), "{lines}");
    assert_eq!(core.untraced_after_salvage(), ["a/b/0".to_string(), "s/a/0".to_string()]);
    assert!(core.lost_in_salvage());
}

/// A log file in the layout of builds before packed records (header version 2, every record
/// padded to a block): the same records, moved to block boundaries.
fn to_block_padded(image: &[u8]) -> Vec<u8> {
    use sluice_engine::log::format::{RecordLayout, RecordMeta, encode_record};
    let scan = scan_file(&Bytes::copy_from_slice(image));
    let mut out = vec![0u8; image.len()];
    let mut header = scan.header.expect("a sound header");
    (header.min_lsn, header.tag) = (0, 0);
    header.encode(&mut out[..FILE_HEADER_BYTES as usize]);
    out[8] = 2;
    let crc = crc32c::crc32c(&out[..48]);
    out[48..52].copy_from_slice(&crc.to_le_bytes());
    out[52..60].fill(0);
    let mut at = FILE_HEADER_BYTES as usize;
    for r in &scan.records {
        let h = r.header;
        let len = sluice_engine::log::format::RecordHeader::block_padded_len(r.payload.len()) as usize;
        let meta = RecordMeta { layout: RecordLayout::BlockPadded, kind: h.kind, epoch: h.epoch, lsn: h.lsn, tag: 0 };
        encode_record(&mut out[at..at + len], meta, r.payload.len(), |p| p.copy_from_slice(&r.payload));
        at += len;
    }
    out
}

/// A data directory an earlier build wrote (block-padded records) opens, its current file
/// goes on with packed records after them, and a restart reads both.
#[test]
fn a_log_file_of_block_padded_records_goes_on_with_packed_ones() {
    let (mut core, mut sim) = setup();
    write_some(&mut core, &mut sim, 4);
    let before = read_segment(&mut core, &sim.disk, "a/b/0");
    let old = to_block_padded(&sim.disk.files[&0]);
    let old_end = scan_file(&Bytes::from(old.clone())).end;
    assert_eq!(old_end % BLOCK_BYTES, 0);
    sim.disk.files.insert(0, old);
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert_eq!(read_segment(&mut core, &disk, "a/b/0"), before, "block-padded records read");

    let mut sim = Sim::new(5, disk);
    for i in 0..3 {
        core.submit(one_event(format!("small-{i}").as_bytes())).unwrap();
        while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    }
    let scan = scan_file(&Bytes::from(sim.disk.files[&0].clone()));
    let packed: Vec<bool> = scan.records.iter().map(|r| r.header.packed()).collect();
    assert_eq!(packed, [false, false, false, false, false, false, true, true, true], "one file, both layouts");
    assert_eq!(scan.records[6].pos, old_end, "the first packed record right after the last padded one");
    assert!(scan.records[8].pos - scan.records[7].pos < 100, "small records share a block");
    let after = read_segment(&mut core, &sim.disk, "a/b/0");
    let mut disk = sim.disk.clone();
    let mut core = recover(&fresh_cfg(), &mut disk);
    assert_eq!(read_segment(&mut core, &disk, "a/b/0"), after);
    let events: Vec<Vec<u8>> = EventIter::new(&after).map(|e| e.unwrap().to_vec()).collect();
    assert_eq!(events.len(), 7);
    assert_eq!(events[6], b"small-2");
}

/// Without tier-2: a small segment that alone keeps the oldest log file is copied into the
/// current one (`relocation`, `Request::Relocate`) and the files below the one still needed
/// are deleted (or kept to be reused), while a large segment is written and truncated; power
/// fails at any write, the copies' included. Every acknowledged append of the small segment
/// stays readable at its offset after each recovery, and after the writer resends what was
/// never acknowledged each event is there once, in order.
#[test]
fn power_loss_while_small_segments_are_copied_to_free_the_log() {
    let (mut crashes, mut relocated, mut freed, mut beside) = (0u64, 0u64, 0usize, 0u64);
    for seed in 0..300u64 {
        let (c, r, f, b) = copies_seed(seed);
        crashes += c;
        relocated += r;
        freed += f;
        beside += b;
    }
    eprintln!(
        "power loss with copies: {crashes} crashes, {relocated} copies, {freed} files freed, {beside} flushes begun beside another over 300 seeds"
    );
    assert!(
        crashes >= 300 && relocated >= 300 && freed >= 300 && beside >= 1000,
        "{crashes} crashes, {relocated} copies, {freed} freed, {beside} begun beside another"
    );
}

/// Flushes until nothing is queued or under way: every result, in submission order, or
/// the results before the crash.
fn drain(core: &mut ContainerCore, sim: &mut Sim) -> Result<Vec<OpResult>, (Vec<OpResult>, Crash)> {
    let mut results = Vec::new();
    loop {
        match flush(core, sim) {
            Ok(Some(r)) => results.extend(r),
            Ok(None) => return Ok(results),
            Err(Crash) => return Err((results, Crash)),
        }
    }
}

/// One seed of `power_loss_while_small_segments_are_copied_to_free_the_log`: its crashes,
/// copies, files freed and flushes begun beside another.
fn copies_seed(seed: u64) -> (u64, u64, usize, u64) {
    let (mut crashes, mut relocated, mut freed) = (0u64, 0u64, 0usize);
    let append = |name: &str, n: u64, payload: &[u8]| {
        let mut data = Vec::new();
        encode_event(&mut data, payload);
        Request::Append {
            name: name.into(),
            writer: 5,
            first_event_number: n,
            event_count: 1,
            expected_offset: None,
            data: Bytes::from(data),
        }
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0de);
    // In three seeds of four a second flush may begin beside the first (the I/O driver's
    // default): batches are then kept small, so what one step submits takes several flushes.
    let pipelined = !seed.is_multiple_of(4);
    let flush_bytes_max = if pipelined { rng.random_range(2_000..8_000) } else { fresh_cfg().flush_bytes_max };
    let cfg = CoreConfig { spare_files: (seed % 2) as usize, flush_bytes_max, ..fresh_cfg() };
    let mut disk = Disk::default();
    let mut core = recover(&cfg, &mut disk);
    let mut sim = Sim { pipelined, ..Sim::new(seed, Disk::default()) };
    for name in ["big", "small"] {
        core.submit(Request::Create { name: name.into() }).unwrap();
    }
    while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    disk = sim.disk.clone();
    // The small segment's acknowledged appends (offset, event number), and the one sent
    // but not acknowledged when the power failed.
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let (mut next, mut unacked): (u64, Option<u64>) = (1, None);
    let mut big_n = 0;
    let small_event = |n: u64| format!("small-{n}-{}", "s".repeat((n % 7 * 40) as usize)).into_bytes();
    for _cycle in 0..4 {
        sim.disk = disk.clone();
        sim.steps_left = rng.random_range(0..80);
        let crashed = 'run: loop {
            // The small segment: the unacknowledged append again, or now and then a new one.
            let n = match unacked.take() {
                Some(n) => Some(n),
                None if rng.random_bool(0.3) => {
                    next += 1;
                    Some(next - 1)
                }
                None => None,
            };
            let mut small_queued = None;
            if let Some(n) = n {
                match core.submit(append("small", n, &small_event(n))).unwrap() {
                    Submitted::Queued => small_queued = Some(n),
                    Submitted::Ready(OpResult::Appended { duplicate: true, .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            // The large one beside it: a few events of 2-6 KB, then truncated at its
            // (durable) length.
            for _ in 0..rng.random_range(1..4) {
                big_n += 1;
                let payload = vec![b'b'; rng.random_range(2000..6000)];
                core.submit(append("big", big_n, &payload)).unwrap();
            }
            let cut = core.status("big").unwrap().length;
            core.submit(Request::Truncate { name: "big".into(), offset: cut }).unwrap();
            // Results come in submission order: the small append's is the first.
            match drain(&mut core, &mut sim) {
                Ok(r) => {
                    if let Some(n) = small_queued
                        && let OpResult::Appended { offset, duplicate: false, .. } = r[0]
                    {
                        acked.push((offset, n));
                    }
                }
                Err((r, Crash)) => {
                    match (small_queued, r.first()) {
                        (Some(n), Some(OpResult::Appended { offset, duplicate: false, .. })) => {
                            acked.push((*offset, n))
                        }
                        (Some(n), None) => unacked = Some(n),
                        _ => {}
                    }
                    break 'run true;
                }
            }
            // The freeing task: copy what keeps the oldest file (now and then with another
            // append of the large segment queued behind the copy), then free what is not needed.
            if let Some((name, from, to)) = core.relocation() {
                let data = read_range(&mut core, &sim.disk, &name, from, to);
                assert_eq!(data.len() as u64, to - from, "seed {seed}: the copy reads whole");
                let req = Request::Relocate { name, offset: from, data: Bytes::from(data) };
                assert_eq!(core.submit(req).unwrap(), Submitted::Queued);
                if rng.random_bool(0.5) {
                    big_n += 1;
                    core.submit(append("big", big_n, &vec![b'b'; rng.random_range(100..3000)])).unwrap();
                }
                match drain(&mut core, &mut sim) {
                    Ok(_) => relocated += 1,
                    Err(_) => break 'run true,
                }
            }
            freed += free_files(&mut core, &mut sim);
            if rng.random_bool(0.03) {
                break false;
            }
        };
        disk = sim.disk.clone();
        crashes += u64::from(crashed);
        core = recover(&cfg, &mut disk);
        let small = read_segment(&mut core, &disk, "small");
        for &(offset, n) in &acked {
            let want = {
                let mut e = Vec::new();
                encode_event(&mut e, &small_event(n));
                e
            };
            let got = small.get(offset as usize..offset as usize + want.len());
            assert_eq!(got, Some(&want[..]), "seed {seed}: acknowledged event {n} at {offset} lost");
        }
    }
    // The writer resends what it never saw acknowledged; then every event is there once.
    sim.disk = disk.clone();
    sim.steps_left = u64::MAX;
    if let Some(n) = unacked {
        core.submit(append("small", n, &small_event(n))).unwrap();
        while flush(&mut core, &mut sim).ok().flatten().is_some() {}
    }
    let small = read_segment(&mut core, &sim.disk, "small");
    let events: Vec<Vec<u8>> = EventIter::new(&small).map(|e| e.unwrap().to_vec()).collect();
    assert_eq!(events, (1..next).map(small_event).collect::<Vec<_>>(), "seed {seed}: each event once, in order");
    (crashes, relocated, freed, sim.began_beside)
}

/// Reads segment `name` from its start as the I/O layer would, stopping (no panic) at the
/// first error or damaged record: the bytes read.
fn read_what_is_sound(core: &mut ContainerCore, files: &[(u64, Bytes)], name: &str) -> u64 {
    let Ok(status) = core.status(name) else { return 0 };
    let (mut off, mut read) = (status.start_offset, 0u64);
    // Bounded: every turn reads something or builds an index (once per file).
    for _ in 0..10_000 {
        let Ok((outcome, _)) = core.read(name, off, 1 << 16) else { break };
        match outcome {
            ReadOutcome::Data(d) => {
                off += d.len() as u64;
                read += d.len() as u64;
            }
            ReadOutcome::Log { file_seq, pieces, records: (start, end) } => {
                let Some((_, file)) = files.iter().find(|(s, _)| *s == file_seq) else { break };
                if end as usize > file.len()
                    || sluice_engine::log::scan::check_records(&file[start as usize..end as usize], start).is_err()
                {
                    break;
                }
                let n: u64 = pieces.iter().map(|&(_, len)| len).sum();
                off += n;
                read += n;
            }
            ReadOutcome::NeedIndex { file_seq } => {
                let Some((_, file)) = files.iter().find(|(s, _)| *s == file_seq) else { break };
                match FileIndex::build(&sound_records(file)) {
                    Ok(index) => core.insert_file_index(file_seq, index),
                    Err(_) => break,
                }
            }
            ReadOutcome::Chunk { .. } | ReadOutcome::Tail => break,
        }
    }
    read
}

/// Random damage to a sound log, 4,000 times: bytes flipped, sectors of random bytes or
/// zeros, a block copied from elsewhere, a file cut short or gone. Recovery (plain and
/// salvaging) gives a core or a typed refusal, never a panic; a recovered core's reads of
/// every segment end in data or an error. Seeded and bounded (60,000 rounds of four seeds
/// ran clean by hand; one of them found the panic of `a_file_cut_inside_a_record_s_padding`).
#[test]
fn random_damage_never_panics_recovery_or_reads() {
    let (mut core, mut sim) = setup();
    for name in ["s/x/0", "s/y/0"] {
        one_record(&mut core, &mut sim, vec![Request::Create { name: name.into() }]);
    }
    for i in 0..40 {
        write_some(&mut core, &mut sim, 1);
        let name = if i % 2 == 0 { "s/x/0" } else { "s/y/0" };
        one_record(&mut core, &mut sim, vec![event_to(name, format!("x{i}").repeat(300).as_bytes())]);
    }
    one_record(&mut core, &mut sim, vec![Request::Seal { name: "s/y/0".into() }]);
    let pristine = sim.disk.files.clone();
    assert!(pristine.len() >= 3, "{} log files", pristine.len());
    let mut rng = StdRng::seed_from_u64(46);
    let (mut recovered, mut refused) = (0, 0);
    for round in 0..4000 {
        let mut files = pristine.clone();
        for _ in 0..rng.random_range(1..4) {
            let seqs: Vec<u64> = files.keys().copied().collect();
            let seq = seqs[rng.random_range(0..seqs.len())];
            let other = pristine[&seqs[rng.random_range(0..seqs.len())]].clone();
            let f = files.get_mut(&seq).unwrap();
            if f.is_empty() {
                continue;
            }
            let at = rng.random_range(0..f.len());
            // A sector, and a block, at `at` (within the file, which may have been cut short).
            let sector =
                at / SECTOR_BYTES * SECTOR_BYTES..(at / SECTOR_BYTES * SECTOR_BYTES + SECTOR_BYTES).min(f.len());
            let block = at / BLOCK_BYTES as usize * BLOCK_BYTES as usize;
            let block = block..(block + BLOCK_BYTES as usize).min(f.len());
            match rng.random_range(0..7) {
                0 | 1 => f[at] ^= 1 << rng.random_range(0..8),
                2 => rng.fill(&mut f[sector]),
                3 => f[sector].fill(0),
                4 => {
                    let from = rng.random_range(0..other.len() / BLOCK_BYTES as usize) * BLOCK_BYTES as usize;
                    let len = block.len();
                    f[block].copy_from_slice(&other[from..from + len]);
                }
                5 => f.truncate(at),
                _ => {
                    files.remove(&seq);
                    if files.is_empty() {
                        break;
                    }
                }
            }
        }
        let images: Vec<(u64, Bytes)> = files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect();
        for salvage in [false, true] {
            let cfg = CoreConfig { salvage, ..fresh_cfg() };
            let outcome = std::panic::catch_unwind(|| match ContainerCore::recover(cfg, &images) {
                Ok((mut core, _)) => {
                    for name in ["a/b/0", "s/x/0", "s/y/0"] {
                        read_what_is_sound(&mut core, &images, name);
                    }
                    true
                }
                Err(_) => false,
            });
            match outcome {
                Ok(true) => recovered += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!("round {round} (salvage {salvage}): a panic on damaged log files"),
            }
        }
    }
    eprintln!("random damage: {recovered} recoveries, {refused} refusals");
    assert!(recovered > 0 && refused > 0, "{recovered} recoveries, {refused} refusals");
}

/// A log file cut short inside the padding after its last record's payload (the payload
/// whole, the 8-byte alignment after it missing; log files are whole blocks, so only a
/// damaged file system does this): the record is not taken for whole and recovery cuts it
/// as a torn tail. It used to take it, put the scan's end past the file's bytes and panic.
#[test]
fn a_file_cut_inside_a_record_s_padding_is_a_torn_tail_not_a_panic() {
    let (mut core, mut sim) = setup();
    // Records of more than a block (the last one crosses a block boundary, the cut is past
    // it) whose payloads do not end on an 8-byte boundary.
    for i in 0..3 {
        one_record(&mut core, &mut sim, vec![event_to("a/b/0", format!("odd-{i}-").repeat(900).as_bytes())]);
    }
    let file = sim.disk.files.get_mut(&0).unwrap();
    let last = scan_file(&Bytes::from(file.clone())).records.last().unwrap().clone();
    let payload_end = last.pos as usize + RECORD_HEADER_BYTES + last.header.payload_len as usize;
    assert!(!(payload_end as u64).is_multiple_of(8), "the payload ends at {payload_end}, on an 8-byte boundary");
    file.truncate(payload_end);
    let images: Vec<(u64, Bytes)> = sim.disk.files.iter().map(|(s, b)| (*s, Bytes::from(b.clone()))).collect();
    assert!(last.pos < payload_end as u64 / BLOCK_BYTES * BLOCK_BYTES, "the record starts before the cut's block");
    let (mut core, report) = ContainerCore::recover(fresh_cfg(), &images).expect("a torn tail is cut");
    assert_eq!(report.torn_tail_at, Some(last.pos));
    let data = read_segment(&mut core, &sim.disk, "a/b/0");
    assert_eq!(EventIter::new(&data).count(), 2, "the two events before the cut record");
}
