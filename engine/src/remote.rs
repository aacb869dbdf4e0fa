//! Node-to-node segment calls (cluster mode): a stream operation on one node (create, seal,
//! delete, truncate a stream's segments) reaches segments whose containers other nodes own
//! through the same binary protocol a client speaks. One short connection per call: these
//! are rare control operations, never the data path. Runs on the calling shard (glommio).

use crate::container::core::{OpResult, Request};
use crate::error::EngineError;
use bytes::Bytes;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use sluice_net::constants::FRAME_HEADER_BYTES;
use sluice_net::frame::{Frame, FrameHeader, encode_frame};
use sluice_net::messages::*;
use sluice_net::{ErrorCode, Kind};
use std::time::Duration;

/// Bound on one node-to-node call (connect, handshake, request and reply).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn read_frame(s: &mut glommio::net::TcpStream, max: usize) -> Result<Frame, String> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let header = FrameHeader::parse(&head, max).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; header.body_len as usize];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Frame::from_parts(&header, Bytes::from(body)).map_err(|e| e.to_string())
}

/// The engine error for an error reply from another node.
fn from_reply(e: ErrorReply) -> EngineError {
    match ErrorCode::from_u16(e.code) {
        Some(ErrorCode::WrongHost) => EngineError::NotOwner { container: u32::MAX, reason: e.message },
        Some(ErrorCode::NoSuchSegment) => EngineError::NoSuchSegment(e.message),
        Some(ErrorCode::AlreadyExists) => EngineError::SegmentExists(e.message),
        Some(ErrorCode::Sealed) => EngineError::Sealed(e.message),
        Some(ErrorCode::BadRequest) => EngineError::BadRequest(e.message),
        _ => EngineError::Io(format!("remote node: {}", e.message)),
    }
}

async fn call(endpoint: &str, req: &Request, frame_max: usize) -> Result<OpResult, EngineError> {
    let unreachable = |e: String| EngineError::Unreachable(format!("{endpoint}: {e}"));
    let mut s = glommio::net::TcpStream::connect_timeout(endpoint, CALL_TIMEOUT)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = s.set_nodelay(true);
    let mut out = Vec::new();
    encode_frame(&mut out, 0, &Hello::current("sluice-node"), &[]);
    match req {
        Request::Create { name } => encode_frame(&mut out, 1, &CreateSegment { segment: name.clone() }, &[]),
        Request::Seal { name } => encode_frame(&mut out, 1, &SealSegment { segment: name.clone() }, &[]),
        Request::Delete { name } => encode_frame(&mut out, 1, &DeleteSegment { segment: name.clone() }, &[]),
        Request::Truncate { name, offset } => {
            encode_frame(&mut out, 1, &TruncateSegment { segment: name.clone(), offset: *offset }, &[])
        }
        Request::Status { name } => encode_frame(&mut out, 1, &GetSegmentInfo { segment: name.clone() }, &[]),
        other => return Err(EngineError::BadRequest(format!("{other:?} is not sent to another node"))),
    }
    s.write_all(&out).await.map_err(|e| unreachable(e.to_string()))?;
    s.flush().await.map_err(|e| unreachable(e.to_string()))?;
    // Anything but the answers a node gives (a broken or foreign peer) is `Unreachable`: the
    // caller retries, then fails the operation; nothing it did not answer is taken as done.
    let hello = read_frame(&mut s, frame_max).await.map_err(unreachable)?;
    match (hello.kind, hello.request_id) {
        (Kind::HelloReply, 0) => {}
        (Kind::ErrorReply, 0) => {
            return Err(from_reply(hello.decode::<ErrorReply>().map_err(|e| unreachable(e.to_string()))?));
        }
        (kind, id) => return Err(unreachable(format!("the handshake answered by {kind:?} to request {id}"))),
    }
    let reply = read_frame(&mut s, frame_max).await.map_err(unreachable)?;
    if reply.request_id != 1 {
        return Err(unreachable(format!("an answer to request {} where 1 was asked", reply.request_id)));
    }
    // A status asks for `SegmentInfo`; the other operations are answered by `Done`.
    let status = matches!(req, Request::Status { .. });
    match reply.kind {
        Kind::Done if !status => Ok(OpResult::Done),
        Kind::SegmentInfo if status => {
            let info: SegmentInfo = reply.decode().map_err(|e| unreachable(e.to_string()))?;
            Ok(OpResult::Status { length: info.length, sealed: info.sealed })
        }
        Kind::ErrorReply => Err(from_reply(reply.decode::<ErrorReply>().map_err(|e| unreachable(e.to_string()))?)),
        other => Err(unreachable(format!("unexpected reply {other:?}"))),
    }
}

/// Runs a segment control operation on the node at `endpoint`.
pub async fn segment_op(endpoint: &str, req: &Request, frame_max: usize) -> Result<OpResult, EngineError> {
    segment_op_within(endpoint, req, frame_max, CALL_TIMEOUT).await
}

/// `segment_op`, the whole call bounded by `within`.
async fn segment_op_within(
    endpoint: &str,
    req: &Request,
    frame_max: usize,
    within: Duration,
) -> Result<OpResult, EngineError> {
    let timeout = glommio::timer::sleep(within);
    let work = call(endpoint, req, frame_max);
    futures::pin_mut!(timeout, work);
    match futures::future::select(work, timeout).await {
        futures::future::Either::Left((r, _)) => r,
        futures::future::Either::Right(_) => Err(EngineError::Unreachable(format!("{endpoint}: timed out"))),
    }
}

#[cfg(test)]
mod tests {
    //! The calls against a peer that answers wrongly: each ends in a typed error within its
    //! bound, and only a node's own answers count as done.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    const FRAME_MAX: usize = 1 << 20;

    /// A whole frame without a payload.
    fn frame<M: Control>(request_id: u64, m: &M) -> Vec<u8> {
        sluice_net::frame::encode_frame_head(request_id, m, 0)
    }

    fn hello() -> Vec<u8> {
        let reply = HelloReply {
            version: sluice_net::constants::PROTOCOL_VERSION,
            node: "peer".into(),
            container_count: 1,
            shards: vec![ShardEndpoint { shard: 0, address: "127.0.0.1:1".into() }],
            containers: Vec::new(),
            append_bytes_max: 1 << 20,
            placement: 2,
        };
        frame(0, &reply)
    }

    /// `req` against a peer that reads the request and then writes `answer` (and, if
    /// `hold`, keeps the connection open without a word more); the outcome and its time.
    fn against(req: Request, answer: Vec<u8>, hold: bool) -> (Result<OpResult, EngineError>, Duration) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&answer);
            if hold {
                std::thread::sleep(Duration::from_millis(800));
            }
        });
        let outcome = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let began = Instant::now();
                let r = segment_op_within(&endpoint, &req, FRAME_MAX, Duration::from_millis(300)).await;
                (r, began.elapsed())
            })
            .unwrap()
            .join()
            .unwrap();
        peer.join().unwrap();
        outcome
    }

    fn info(length: u64, sealed: bool) -> SegmentInfo {
        SegmentInfo {
            segment: "s/t/0".into(),
            start_offset: 0,
            length,
            sealed,
            writers: Vec::new(),
            tier2_end: 0,
            rates: AppendRates::default(),
        }
    }

    fn seal() -> Request {
        Request::Seal { name: "s/t/0".into() }
    }

    fn is_unreachable(r: &Result<OpResult, EngineError>) -> bool {
        matches!(r, Err(EngineError::Unreachable(_)))
    }

    #[test]
    fn a_sound_answer_is_taken() {
        let done = [hello(), frame(1, &Done {})].concat();
        assert!(matches!(against(seal(), done, false).0, Ok(OpResult::Done)));
        let status = [hello(), frame(1, &info(7, true))].concat();
        let r = against(Request::Status { name: "s/t/0".into() }, status, false).0;
        assert!(matches!(r, Ok(OpResult::Status { length: 7, sealed: true })), "{r:?}");
        let refused = ErrorReply {
            code: sluice_net::ErrorCode::Sealed as u16,
            message: "sealed".into(),
            endpoint: None,
            offset: None,
        };
        let r = against(seal(), [hello(), frame(1, &refused)].concat(), false).0;
        assert!(matches!(r, Err(EngineError::Sealed(_))), "{r:?}");
    }

    #[test]
    fn silence_ends_at_the_bound() {
        let (r, took) = against(seal(), Vec::new(), true);
        assert!(is_unreachable(&r), "{r:?}");
        assert!(took < Duration::from_millis(750), "{took:?}");
        let (r, took) = against(seal(), hello(), true);
        assert!(is_unreachable(&r), "{r:?}");
        assert!(took < Duration::from_millis(750), "{took:?}");
    }

    #[test]
    fn wrong_answers_are_not_taken_as_done() {
        let mut huge = frame(1, &Done {});
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let cases: Vec<(&str, Request, Vec<u8>)> = vec![
            ("closed at once", seal(), Vec::new()),
            ("garbage", seal(), (0..200u32).map(|i| (i * 37 % 251) as u8).collect()),
            ("a frame beyond the limit", seal(), [hello(), huge].concat()),
            ("no handshake", seal(), frame(1, &Done {})),
            ("another request's answer", seal(), [hello(), frame(2, &Done {})].concat()),
            ("a status for a seal", seal(), [hello(), frame(1, &info(0, false))].concat()),
            ("done for a status", Request::Status { name: "s/t/0".into() }, [hello(), frame(1, &Done {})].concat()),
            ("a reply cut short", seal(), [hello(), frame(1, &Done {})[..10].to_vec()].concat()),
        ];
        for (what, req, answer) in cases {
            let (r, took) = against(req, answer, false);
            assert!(is_unreachable(&r), "{what}: {r:?}");
            assert!(took < Duration::from_millis(750), "{what}: {took:?}");
        }
    }
}
