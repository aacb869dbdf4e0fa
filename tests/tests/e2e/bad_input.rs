//! Hostile and broken clients against a live server: random bytes, truncated frames,
//! oversized lengths, unknown kinds, invalid archives, no handshake. Each bad connection
//! gets an error reply or is closed; the server keeps serving everyone else and loses nothing.

use rand::{Rng, SeedableRng};
use sluice_client::{Client, ReadFrom};
use sluice_net::constants::FRAME_HEADER_BYTES;
use sluice_net::frame::{FrameDecoder, encode_frame, encode_header};
use sluice_net::messages::*;
use sluice_tests::{Server, TempDir, free_ports};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

fn hello() -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, 1, &Hello::current("hostile"), b"");
    out
}

/// Sends `bytes`, half-closes, and reads until the server closes. Returns the frames received.
fn send_and_drain(addr: SocketAddr, bytes: &[u8]) -> Vec<sluice_net::Frame> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("server neither answered nor closed: {e}"),
    }
    let mut dec = FrameDecoder::new(64 << 20);
    dec.extend(&buf);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        frames.push(f);
    }
    frames
}

fn error_code(f: &sluice_net::Frame) -> u16 {
    assert_eq!(f.kind, Kind::ErrorReply, "expected an error reply, got {:?}", f.kind);
    f.decode::<ErrorReply>().unwrap().code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_errors_and_server_keeps_serving() {
    let dir = TempDir::new("badinput");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let addr = server.addr;
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_scope("bad").await.unwrap();
    client.create_stream("bad", "s", 2).await.unwrap();
    let writer = client.event_writer("bad/s").await.unwrap();
    for i in 0..1000 {
        writer.write_event(b"k", format!("before-{i}").into_bytes());
    }
    writer.flush().await.unwrap();

    tokio::task::spawn_blocking(move || {
        // No handshake: the first frame must be Hello.
        let mut f = Vec::new();
        encode_frame(&mut f, 7, &GetSegmentInfo { segment: "bad/s/0".into() }, b"");
        let frames = send_and_drain(addr, &f);
        assert_eq!(error_code(&frames[0]), sluice_net::ErrorCode::BadRequest as u16);

        // Oversized length field: error, then close.
        let mut f = hello();
        let mut h = encode_header(Kind::Append, 9, 0, 0);
        h[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&h);
        let frames = send_and_drain(addr, &f);
        assert_eq!(frames[0].kind, Kind::HelloReply);
        assert_eq!(error_code(&frames[1]), sluice_net::ErrorCode::BadRequest as u16);

        // Truncated frame: a header promising more than arrives, then EOF: closed.
        let mut f = hello();
        f.extend_from_slice(&encode_header(Kind::Append, 9, 10, 100));
        f.extend_from_slice(&[1, 2, 3]);
        let frames = send_and_drain(addr, &f);
        assert_eq!(frames.len(), 1);

        // Unknown kind and invalid archives: error replies, and the connection goes on.
        let mut f = hello();
        let mut h = encode_header(Kind::Done, 10, 0, 0);
        h[4..6].copy_from_slice(&999u16.to_le_bytes());
        f.extend_from_slice(&h);
        let junk = [0xFFu8; 24];
        f.extend_from_slice(&encode_header(Kind::Append, 11, junk.len(), 5));
        f.extend_from_slice(&junk);
        f.extend_from_slice(b"abcde");
        f.extend_from_slice(&encode_header(Kind::Read, 12, 0, 0));
        encode_frame(&mut f, 13, &GetSegmentInfo { segment: "bad/s/0".into() }, b"");
        // A control that validates but carries broken event framing.
        encode_frame(
            &mut f,
            14,
            &Append {
                segment: "bad/s/0".into(),
                writer_id: 5,
                first_event_number: 1,
                event_count: 3,
                expected_offset: None,
            },
            &[9, 0, 0, 0, 1],
        );
        // An event above the limit.
        encode_frame(&mut f, 15, &GetSegmentInfo { segment: "no/such/segment".into() }, b"");
        let frames = send_and_drain(addr, &f);
        let by_id = |id: u64| frames.iter().find(|f| f.request_id == id).unwrap_or_else(|| panic!("no reply to {id}"));
        assert_eq!(error_code(by_id(10)), sluice_net::ErrorCode::BadRequest as u16);
        assert_eq!(error_code(by_id(11)), sluice_net::ErrorCode::BadRequest as u16);
        assert_eq!(error_code(by_id(12)), sluice_net::ErrorCode::BadRequest as u16);
        let info: SegmentInfo = by_id(13).decode().unwrap_or_else(|_| {
            // The segment may live on the other shard: then a typed redirect.
            assert_eq!(error_code(by_id(13)), sluice_net::ErrorCode::WrongHost as u16);
            SegmentInfo {
                segment: String::new(),
                start_offset: 0,
                length: 0,
                sealed: false,
                writers: vec![],
                tier2_end: 0,
                rates: Default::default(),
            }
        });
        let _ = info;
        let c14 = error_code(by_id(14));
        assert!(c14 == sluice_net::ErrorCode::BadRequest as u16 || c14 == sluice_net::ErrorCode::WrongHost as u16);
        let c15 = error_code(by_id(15));
        assert!(c15 == sluice_net::ErrorCode::NoSuchSegment as u16 || c15 == sluice_net::ErrorCode::WrongHost as u16);

        // Random bytes and randomly damaged valid frames, each on its own connection.
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        for i in 0..300 {
            let mut f = if i % 3 == 0 { Vec::new() } else { hello() };
            let mut body = Vec::new();
            encode_frame(
                &mut body,
                20,
                &Append {
                    segment: "bad/s/1".into(),
                    writer_id: 0,
                    first_event_number: 0,
                    event_count: 1,
                    expected_offset: None,
                },
                &[3, 0, 0, 0, b'x', b'y', b'z'],
            );
            if i % 2 == 0 {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..body.len());
                    body[at] = rng.random();
                }
            } else {
                body = (0..rng.random_range(1..2048)).map(|_| rng.random()).collect();
            }
            f.extend_from_slice(&body);
            if rng.random_bool(0.3) {
                f.truncate(rng.random_range(0..f.len()));
            }
            send_and_drain(addr, &f);
        }
        let _ = FRAME_HEADER_BYTES;
    })
    .await
    .unwrap();

    // The server still serves: the old client writes more, a new one reads everything.
    for i in 0..1000 {
        writer.write_event(b"k", format!("after-{i}").into_bytes());
    }
    writer.flush().await.unwrap();
    let fresh = Client::connect(&server.url()).await.unwrap();
    let mut reader = fresh.event_reader("bad/s", ReadFrom::Head).await.unwrap();
    let mut got = Vec::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(2)).await.unwrap() {
        let s = String::from_utf8(ev.payload.to_vec()).unwrap();
        if s.starts_with("before-") || s.starts_with("after-") {
            got.push(s);
        }
    }
    let expected: Vec<String> =
        (0..1000).map(|i| format!("before-{i}")).chain((0..1000).map(|i| format!("after-{i}"))).collect();
    assert_eq!(got, expected, "all events, in order, nothing lost");
}

/// A commit naming shadow lengths the server does not hold (writes in flight, a confused
/// client) is refused with `BadRequest`; the transaction stays open, and commits normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_naming_wrong_shadow_lengths_is_refused() {
    let dir = TempDir::new("badlengths");
    let server = Server::start(&dir.0.join("data"), free_ports(2), 2);
    let c = Client::connect(&server.url()).await.unwrap();
    c.create_scope("bl").await.unwrap();
    c.create_stream("bl", "s", 2).await.unwrap();
    let mut t = c.begin_txn("bl/s").await.unwrap();
    t.write_event(b"k", b"one").await.unwrap();
    t.flush().await.unwrap();
    let id = t.id();
    // Too long, too short (nothing), the wrong number of lengths.
    for lengths in [vec![1u64 << 20, 1 << 20], vec![0, 0], vec![0]] {
        let mut bytes = hello();
        let commit = CommitTxn { scope: "bl".into(), stream: "s".into(), txn: id, lengths: lengths.clone() };
        encode_frame(&mut bytes, 2, &commit, b"");
        let addr = server.addr;
        let frames = tokio::task::spawn_blocking(move || send_and_drain(addr, &bytes)).await.unwrap();
        assert_eq!(frames.len(), 2, "hello reply and one answer for {lengths:?}");
        assert_eq!(error_code(&frames[1]), sluice_net::ErrorCode::BadRequest as u16, "{lengths:?}");
        assert_eq!(c.get_txn("bl", "s", id).await.unwrap().state, sluice_net::TxnState::Open);
    }
    // Merges the server must refuse: a source that is not the segment's shadow, a plain
    // segment as the source, more bytes than the shadow holds, all of an unsealed shadow.
    // The shadow stays as it is: the transaction still commits whole below.
    let shadow = |n: u64| sluice_net::txn::shadow_segment_name("bl", "s", n, id);
    let bad = [
        MergeSegment { segment: "bl/s/0".into(), source: shadow(1), source_length: Some(0) },
        MergeSegment { segment: "bl/s/0".into(), source: "bl/s/1".into(), source_length: Some(0) },
        MergeSegment { segment: "bl/s/0".into(), source: shadow(0), source_length: Some(1 << 20) },
        MergeSegment { segment: "bl/s/1".into(), source: shadow(1), source_length: Some(1 << 20) },
        MergeSegment { segment: "bl/s/0".into(), source: shadow(0), source_length: None },
    ];
    for m in bad {
        let mut answered = None;
        // Sent to each shard: the one that owns the segment answers, the other redirects.
        for shard in 0..2u16 {
            let mut bytes = hello();
            encode_frame(&mut bytes, 2, &m, b"");
            let mut addr = server.addr;
            addr.set_port(addr.port() + shard);
            let frames = tokio::task::spawn_blocking(move || send_and_drain(addr, &bytes)).await.unwrap();
            assert_eq!(frames.len(), 2, "hello reply and one answer for {m:?}");
            let code = error_code(&frames[1]);
            if code != sluice_net::ErrorCode::WrongHost as u16 {
                answered = Some(code);
            }
        }
        assert_eq!(answered, Some(sluice_net::ErrorCode::BadRequest as u16), "{m:?}");
    }
    let info = t.commit().await.unwrap();
    assert_eq!(info.state, sluice_net::TxnState::Committed);
    assert_eq!(info.lengths.iter().sum::<u64>(), c.get_txn("bl", "s", id).await.unwrap().lengths.iter().sum::<u64>());
    assert!(info.lengths.iter().sum::<u64>() > 0, "{info:?}");
    c.seal_stream("bl", "s").await.unwrap();
    let mut r = c.event_reader("bl/s", ReadFrom::Head).await.unwrap();
    let e = r.read_next(Duration::from_secs(10)).await.unwrap().expect("the committed event");
    assert_eq!(&e.payload[..], b"one");
}

/// Framed events (`u32` length, bytes) for an append's data.
fn framed(events: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e.as_bytes());
    }
    out
}

fn part(segment: &str, first_event_number: u64, event_count: u32, data: &[u8]) -> AppendPart {
    AppendPart {
        segment: segment.into(),
        writer_id: 77,
        first_event_number,
        event_count,
        data_bytes: data.len() as u32,
    }
}

fn outcomes(f: &sluice_net::Frame) -> Vec<AppendOutcome> {
    assert_eq!(f.kind, Kind::AppendsReply, "expected an AppendsReply, got {:?}", f.kind);
    f.decode::<AppendsReply>().unwrap().outcomes
}

fn failed_code(o: &AppendOutcome) -> Option<u16> {
    match o {
        AppendOutcome::Acked(_) => None,
        AppendOutcome::Failed(e) => Some(e.code),
    }
}

/// `Appends` frames (several segments' appends in one request): every part is answered as a
/// frame of its own would be, in order (acknowledged, refused for its own bad data, or a
/// duplicate, while the others go on; redirected to the shard that serves it, which ends the
/// connection: the parts after it are not queued); a frame whose parts do not match its
/// payload, with no parts, or with too many, is refused whole and the connection goes on.
/// What was acknowledged is read back once, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_frames_answer_every_part_and_refuse_broken_frames() {
    use sluice_net::ErrorCode;
    let h = sluice_tests::Harness::with_stream("ap", "s", 4).await;
    let (addr, client) = (h.server.addr, &h.client);

    let expected = tokio::task::spawn_blocking(move || {
        // Two events for each of the four segments (on both shards: this frame goes to shard
        // 0), and a segment that does not exist.
        let events = |k: usize| framed(&[format!("s{k}-e0"), format!("s{k}-e1")]);
        let part_of = |k: usize, d: &[u8]| part(&format!("ap/s/{k}"), 1 + 2 * k as u64, 2, d);
        let mut f = hello();
        let mut parts = Vec::new();
        let mut data = Vec::new();
        for k in 0..4 {
            parts.push(part_of(k, &events(k)));
            data.extend_from_slice(&events(k));
        }
        let d = framed(&["nowhere".to_string()]);
        parts.push(part("ap/s/99", 100, 1, &d));
        data.extend_from_slice(&d);
        encode_frame(&mut f, 40, &Appends { parts }, &data);
        let frames = send_and_drain(addr, &f);
        assert_eq!(frames[0].kind, Kind::HelloReply);
        let first = outcomes(&frames[1]);
        assert_eq!(first.len(), 5);
        // In order: acknowledged until the first part served by the other shard, which is
        // redirected and ends the connection (its writer sends it again, with every later
        // append of its own, on a new connection); the parts after it are not queued.
        let mut local = Vec::new();
        let mut expected = Vec::new();
        let mut redirected = None;
        for (k, o) in first.iter().enumerate() {
            match (o, redirected) {
                (AppendOutcome::Acked(a), None) => {
                    assert!(k < 4 && !a.duplicate && a.offset == 0 && a.length > 0, "part {k}: {a:?}");
                    local.push(k);
                    expected.extend([format!("s{k}-e0"), format!("s{k}-e1")]);
                }
                (AppendOutcome::Failed(e), None) => {
                    assert_eq!(e.code, ErrorCode::WrongHost as u16, "part {k}: {e:?}");
                    assert!(e.endpoint.is_some(), "a redirect names where to go: {e:?}");
                    redirected = Some(k);
                }
                (AppendOutcome::Failed(e), Some(_)) => {
                    assert!(
                        e.code == ErrorCode::WrongHost as u16 && e.message.contains("not queued"),
                        "part {k}: {e:?}"
                    );
                }
                (AppendOutcome::Acked(a), Some(r)) => panic!("part {k} accepted after part {r} was redirected: {a:?}"),
            }
        }
        assert!(redirected.is_some_and(|r| r < 4), "two of four segments are on the other shard: {first:?}");
        assert_eq!(frames.len(), 2, "nothing is read after the redirect");
        // The parts not acknowledged, each alone on a connection of its own.
        let others: Vec<usize> = (0..4).filter(|k| !local.contains(k)).collect();
        for k in others {
            let mut f = hello();
            encode_frame(&mut f, 46, &Appends { parts: vec![part_of(k, &events(k))] }, &events(k));
            match &outcomes(&send_and_drain(addr, &f)[1])[0] {
                AppendOutcome::Acked(a) => {
                    assert!(!a.duplicate && a.offset == 0 && a.length > 0, "segment {k}: {a:?}");
                    local.push(k);
                    expected.extend([format!("s{k}-e0"), format!("s{k}-e1")]);
                }
                AppendOutcome::Failed(e) => assert_eq!(e.code, ErrorCode::WrongHost as u16, "segment {k}: {e:?}"),
            }
        }
        // The stream's segments are spread over both shards.
        assert_eq!(local.len(), 2, "two of four segments on each shard: {first:?}");
        local.sort();

        // On a local segment: a part with broken event framing, a resend of acknowledged
        // events, and new ones; then broken frames, and a request after them.
        let seg = format!("ap/s/{}", local[0]);
        let mut f = hello();
        let broken = framed(&["only one".to_string()]);
        let resent = framed(&[format!("s{}-e0", local[0]), format!("s{}-e1", local[0])]);
        let new = framed(&[format!("s{}-e2", local[0])]);
        let parts =
            vec![part(&seg, 20, 3, &broken), part(&seg, 1 + 2 * local[0] as u64, 2, &resent), part(&seg, 30, 1, &new)];
        encode_frame(&mut f, 41, &Appends { parts }, &[broken.clone(), resent, new].concat());
        expected.push(format!("s{}-e2", local[0]));
        // Parts naming more bytes than the payload has.
        let mut p = part(&seg, 40, 1, &broken);
        p.data_bytes += 1;
        encode_frame(&mut f, 42, &Appends { parts: vec![p] }, &broken);
        encode_frame(&mut f, 43, &Appends { parts: vec![] }, b"");
        let many: Vec<_> =
            (0..sluice_net::constants::APPEND_PARTS_MAX as u64 + 1).map(|i| part(&seg, 1000 + i, 0, b"")).collect();
        encode_frame(&mut f, 44, &Appends { parts: many }, b"");
        encode_frame(&mut f, 45, &GetSegmentInfo { segment: seg.clone() }, b"");
        let frames = send_and_drain(addr, &f);
        let by_id = |id: u64| frames.iter().find(|f| f.request_id == id).unwrap_or_else(|| panic!("no reply to {id}"));
        let second = outcomes(by_id(41));
        assert_eq!(failed_code(&second[0]), Some(ErrorCode::BadRequest as u16), "{:?}", second[0]);
        assert!(matches!(&second[1], AppendOutcome::Acked(a) if a.duplicate), "{:?}", second[1]);
        assert!(matches!(&second[2], AppendOutcome::Acked(a) if !a.duplicate && a.offset > 0), "{:?}", second[2]);
        for id in [42, 43, 44] {
            assert_eq!(error_code(by_id(id)), ErrorCode::BadRequest as u16, "frame {id}");
        }
        // Answered at once (the appends before it may still be on their way to the disk).
        let info: SegmentInfo = by_id(45).decode().unwrap();
        assert_eq!(info.segment, seg);
        expected
    })
    .await
    .unwrap();

    client.seal_stream("ap", "s").await.unwrap();
    let mut reader = client.event_reader("ap/s", ReadFrom::Head).await.unwrap();
    let mut got = Vec::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(2)).await.unwrap() {
        got.push(String::from_utf8(ev.payload.to_vec()).unwrap());
    }
    got.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(got, expected, "each acknowledged event once, nothing else");
}

/// A part of an `Appends` frame refused in a way that closes the connection (`Overloaded`:
/// more bytes waiting for the disk than the node takes) is answered, the parts after it are
/// not queued (the next could be the same writer's next batch) and get the same code, and no
/// request after the frame is served. The parts before it are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appends_part_refused_stops_the_parts_after_it_and_the_connection() {
    use sluice_net::ErrorCode;
    let dir = TempDir::new("appends-refused");
    let url = format!("127.0.0.1:{}", free_ports(1));
    let mut cfg = sluice_engine::EngineConfig::new(dir.0.join("data"), url.parse().unwrap(), 1);
    cfg.pin = false;
    cfg.pending_bytes_max = 64 << 10;
    let node = sluice_engine::shard::Node::start(cfg).unwrap();
    let client = Client::connect(&url).await.unwrap();
    client.create_scope("ar").await.unwrap();
    client.create_stream("ar", "s", 1).await.unwrap();
    let addr: SocketAddr = url.parse().unwrap();

    let frames = tokio::task::spawn_blocking(move || {
        let big = |tag: &str| framed(&[format!("{tag}{}", "x".repeat(40 << 10))]);
        // The first goes to the disk at once; the second waits for it; the third would make
        // 80 KiB waiting.
        let data = [big("a"), big("b"), big("c"), framed(&["d".to_string()])];
        let parts = data.iter().enumerate().map(|(i, d)| part("ar/s/0", 1 + i as u64, 1, d)).collect();
        let mut f = hello();
        encode_frame(&mut f, 50, &Appends { parts }, &data.concat());
        encode_frame(&mut f, 51, &GetSegmentInfo { segment: "ar/s/0".into() }, b"");
        send_and_drain(addr, &f)
    })
    .await
    .unwrap();
    assert!(frames.iter().all(|f| f.request_id != 51), "a request after the refused frame was served");
    let got = outcomes(frames.iter().find(|f| f.request_id == 50).expect("the frame is answered"));
    assert!(matches!(&got[0], AppendOutcome::Acked(a) if a.offset == 0), "{:?}", got[0]);
    assert!(matches!(&got[1], AppendOutcome::Acked(_)), "{:?}", got[1]);
    assert_eq!(failed_code(&got[2]), Some(ErrorCode::Overloaded as u16), "{:?}", got[2]);
    match &got[3] {
        AppendOutcome::Failed(e) => {
            assert_eq!(e.code, ErrorCode::Overloaded as u16);
            assert!(e.message.contains("not queued"), "{e:?}");
        }
        other => panic!("the part after the refused one: {other:?}"),
    }

    client.seal_stream("ar", "s").await.unwrap();
    let mut reader = client.event_reader("ar/s", ReadFrom::Head).await.unwrap();
    let mut read = Vec::new();
    while let Some(ev) = reader.read_next(Duration::from_secs(2)).await.unwrap() {
        read.push(ev.payload[0]);
    }
    assert_eq!(read, b"ab", "only the parts before the refused one are written");
    drop(client);
    tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
}

/// An append refused in a way that ends the connection ends it promptly even while a read
/// taken up before it waits at a segment's tail: the read is not waited for. (A client is not
/// told that nothing more is read; kept open, the connection would take its next requests
/// and answer none, and its writers would wait for their own timeout, 30 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_ends_its_connection_while_a_read_waits_at_a_tail() {
    let h = sluice_tests::Harness::with_stream("tw", "s", 4).await;
    let addr = h.server.addr;
    let (elapsed, frames) = tokio::task::spawn_blocking(move || {
        // Which segments shard 0 (this address) serves, and which the other shard does.
        let mut f = hello();
        for k in 0..4u64 {
            encode_frame(&mut f, 10 + k, &GetSegmentInfo { segment: format!("tw/s/{k}") }, b"");
        }
        let frames = send_and_drain(addr, &f);
        let answered = |k: u64, kind: Kind| frames.iter().any(|f| f.request_id == 10 + k && f.kind == kind);
        let local = (0..4).find(|&k| answered(k, Kind::SegmentInfo)).expect("shard 0 serves a segment");
        let remote = (0..4).find(|&k| answered(k, Kind::ErrorReply)).expect("shard 1 serves a segment");

        // A read waiting up to 20 s at the local segment's (empty) tail, then an append to
        // the other shard's segment; the client does not half-close.
        let mut f = hello();
        let read = sluice_net::messages::Read {
            segment: format!("tw/s/{local}"),
            offset: 0,
            max_bytes: 1024,
            wait_ms: 20_000,
        };
        encode_frame(&mut f, 20, &read, b"");
        let append = Append {
            segment: format!("tw/s/{remote}"),
            writer_id: 5,
            first_event_number: 1,
            event_count: 1,
            expected_offset: None,
        };
        encode_frame(&mut f, 21, &append, &framed(&["x".to_string()]));
        let started = std::time::Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&f).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
        let elapsed = started.elapsed();
        let mut dec = FrameDecoder::new(64 << 20);
        dec.extend(&buf);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = dec.next_frame() {
            frames.push(f);
        }
        (elapsed, frames)
    })
    .await
    .unwrap();
    let refused = frames.iter().find(|f| f.request_id == 21).expect("the append is answered");
    assert_eq!(error_code(refused), sluice_net::ErrorCode::WrongHost as u16);
    assert!(frames.iter().all(|f| f.request_id != 20), "the waiting read is not answered");
    assert!(elapsed < Duration::from_secs(10), "the connection stayed open {elapsed:?} (the read waits 20 s)");
}
