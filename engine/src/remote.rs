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
    let hello = read_frame(&mut s, frame_max).await.map_err(unreachable)?;
    if hello.kind == Kind::ErrorReply {
        return Err(from_reply(hello.decode::<ErrorReply>().map_err(|e| unreachable(e.to_string()))?));
    }
    let reply = read_frame(&mut s, frame_max).await.map_err(unreachable)?;
    match reply.kind {
        Kind::Done => Ok(OpResult::Done),
        Kind::SegmentInfo => {
            let info: SegmentInfo = reply.decode().map_err(|e| unreachable(e.to_string()))?;
            Ok(OpResult::Status { length: info.length, sealed: info.sealed })
        }
        Kind::ErrorReply => Err(from_reply(reply.decode::<ErrorReply>().map_err(|e| unreachable(e.to_string()))?)),
        other => Err(unreachable(format!("unexpected reply {other:?}"))),
    }
}

/// Runs a segment control operation on the node at `endpoint`.
pub async fn segment_op(endpoint: &str, req: &Request, frame_max: usize) -> Result<OpResult, EngineError> {
    let timeout = glommio::timer::sleep(CALL_TIMEOUT);
    let work = call(endpoint, req, frame_max);
    futures::pin_mut!(timeout, work);
    match futures::future::select(work, timeout).await {
        futures::future::Either::Left((r, _)) => r,
        futures::future::Either::Right(_) => Err(EngineError::Unreachable(format!("{endpoint}: timed out"))),
    }
}
