//! `sluice rg`: reader groups from the command line.

use sluice_client::group::state_stream;
use sluice_client::{Client, ClientError, CutAt, GroupItem, GroupStream, ReaderGroupConfig, StreamCut};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum RgCmd {
    /// Create a reader group over a stream.
    Create {
        /// scope/group
        group: String,
        /// scope/stream to read
        stream: String,
        /// Start at the head, the tail, or a stream cut (text from `sluice stream cut`).
        #[arg(long, default_value = "head")]
        from: String,
        /// Stop at this stream cut.
        #[arg(long)]
        to: Option<String>,
        /// Subscribe to the stream: its retention never truncates past the group's last
        /// checkpoint (nor before its first).
        #[arg(long)]
        subscriber: bool,
    },
    /// Read events as reader R of the group, one per line. R leaves the group at exit,
    /// handing its segments back at the exact position reached; a reader id left behind by
    /// a crashed run rejoins from its last reported position.
    Read {
        /// scope/group
        group: String,
        /// This reader's id, unique in the group (the group shares its segments among them).
        #[arg(long)]
        reader: String,
        /// Stop after this many events (default: when none comes within --timeout-ms).
        #[arg(long)]
        count: Option<u64>,
        /// Stop once no event came for this long, in ms (a reader that should follow the
        /// stream: a large value).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Start a checkpoint and print its stream cut(s) once every reader passed it.
    Checkpoint {
        /// scope/group
        group: String,
        /// A name for the checkpoint (readers see it as they pass it).
        name: String,
        /// Give up if the readers have not all passed it within this many ms.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Show readers, assignments, positions and lag in bytes.
    Describe {
        /// scope/group
        group: String,
    },
    /// Delete the group's state.
    Delete {
        /// scope/group
        group: String,
    },
}

fn split_group(g: &str) -> Result<(String, String), String> {
    match g.split_once('/') {
        Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('/') => Ok((s.into(), n.into())),
        _ => Err(format!("'{g}' is not a reader group name; expected scope/group")),
    }
}

async fn cut(c: &Client, stream: &str, spec: &str) -> Result<StreamCut, String> {
    match spec {
        "head" => c.stream_cut(stream, CutAt::Head).await.map_err(|e| e.to_string()),
        "tail" => c.stream_cut(stream, CutAt::Tail).await.map_err(|e| e.to_string()),
        text => StreamCut::from_text(text).map_err(|e| e.to_string()),
    }
}

pub async fn run(c: &Client, cmd: RgCmd) -> Result<(), String> {
    let e = |e: ClientError| e.to_string();
    match cmd {
        RgCmd::Create { group, stream, from, to, subscriber } => {
            let (scope, name) = split_group(&group)?;
            let from = Some(cut(c, &stream, &from).await?);
            let to = match to {
                Some(t) => Some(cut(c, &stream, &t).await?),
                None => None,
            };
            let mut config = ReaderGroupConfig::stream(&stream);
            config.streams = vec![GroupStream { stream: stream.clone(), from, to }];
            config.subscriber = subscriber;
            c.create_reader_group(&scope, &name, config).await.map_err(e)?;
            let how = if subscriber { " (subscriber: bounds the stream's retention)" } else { "" };
            println!("created reader group {group} over {stream}{how}");
        }
        RgCmd::Read { group, reader, count, timeout_ms } => {
            let (scope, name) = split_group(&group)?;
            let g = c.reader_group(&scope, &name).await.map_err(e)?;
            let mut r = match g.create_reader(&reader).await {
                Err(ClientError::AlreadyInGroup { .. }) => {
                    g.reader_offline(&reader, None).await.map_err(e)?;
                    g.create_reader(&reader).await.map_err(e)?
                }
                other => other.map_err(e)?,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut n = 0u64;
            let result = async {
                while count.is_none_or(|c| n < c) {
                    match r.read_next(Duration::from_millis(timeout_ms)).await.map_err(e)? {
                        Some(GroupItem::Event(ev)) => {
                            out.write_all(&ev.payload).and_then(|_| out.write_all(b"\n")).map_err(|e| e.to_string())?;
                            n += 1;
                        }
                        Some(GroupItem::Checkpoint(name)) => eprintln!("passed checkpoint {name}"),
                        None => break,
                    }
                }
                out.flush().map_err(|e| e.to_string())
            }
            .await;
            r.close().await.map_err(e)?;
            result?;
        }
        RgCmd::Checkpoint { group, name, timeout_ms } => {
            let (scope, gname) = split_group(&group)?;
            let g = c.reader_group(&scope, &gname).await.map_err(e)?;
            let cp = g.initiate_checkpoint(&name, Duration::from_millis(timeout_ms)).await.map_err(e)?;
            for cut in cp.cuts {
                println!("{} {}", cut.stream, cut);
            }
        }
        RgCmd::Describe { group } => {
            let (scope, name) = split_group(&group)?;
            let g = c.reader_group(&scope, &name).await.map_err(e)?;
            let state = g.state().await.map_err(e)?;
            println!("reader group {group}: {} reader(s), generation {}", state.readers.len(), state.generation);
            // Its state's segment: a snapshot and the updates since (readers compact it).
            let state_stream = state_stream(&name);
            let info = c.get_stream(&scope, &state_stream).await.map_err(e)?;
            if let Some(s) = info.segments.first() {
                let seg = sluice_net::ScopedStream::new(&scope, &state_stream)
                    .segment_name(sluice_net::SegmentNumber(s.number));
                let si = c.segment_info(&seg).await.map_err(e)?;
                println!("state: {} bytes in {seg} (from offset {})", si.length - si.start_offset, si.start_offset);
            }
            let lag = |seg: &str, off: u64| {
                let seg = seg.to_string();
                async move { c.segment_info(&seg).await.map(|i| i.length.saturating_sub(off)).map_err(e) }
            };
            println!("{:<12} {:<32} {:>14} {:>14}", "reader", "segment", "offset", "lag bytes");
            for (reader, held) in &state.readers {
                if held.is_empty() {
                    println!("{reader:<12} {:<32} {:>14} {:>14}", "-", "-", "-");
                }
                for (seg, &off) in held {
                    println!("{reader:<12} {seg:<32} {off:>14} {:>14}", lag(seg, off).await?);
                }
            }
            for (seg, &off) in &state.unassigned {
                println!("{:<12} {seg:<32} {off:>14} {:>14}", "(unassigned)", lag(seg, off).await?);
            }
            for (seg, &off) in &state.finished {
                println!("{:<12} {seg:<32} {off:>14} {:>14}", "(finished)", 0);
            }
            if let Some(cp) = &state.checkpoint {
                println!("checkpoint {} pending, waiting for {:?}", cp.name, cp.waiting);
            }
            for cp in &state.completed {
                println!("checkpoint {} completed", cp.name);
            }
        }
        RgCmd::Delete { group } => {
            let (scope, name) = split_group(&group)?;
            c.reader_group(&scope, &name).await.map_err(e)?.delete().await.map_err(e)?;
            println!("deleted reader group {group}");
        }
    }
    Ok(())
}
