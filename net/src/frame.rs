//! Frame layout and codec (sans-IO).
//!
//! ```text
//! offset size field
//! 0      4    length       u32 LE: bytes after this field (16 + control + payload)
//! 4      2    kind         u16 LE (messages::Kind)
//! 6      2    flags        u16 LE, 0
//! 8      8    request_id   u64 LE, echoed by the reply
//! 16     4    control_len  u32 LE
//! 20     ..   control      rkyv archive of the kind's struct
//! ..     ..   payload      raw bytes (events for Append, segment bytes for ReadReply)
//! ```

use crate::constants::{CONTROL_BYTES_MAX, FRAME_HEADER_AFTER_LENGTH_BYTES, FRAME_HEADER_BYTES};
use crate::error::ProtocolError;
use crate::messages::{Control, Kind};
use bytes::Bytes;

/// The fixed part of a frame, parsed and bounds-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Raw kind; may be unknown to this build (the frame can still be skipped).
    pub kind: u16,
    pub flags: u16,
    pub request_id: u64,
    pub control_len: u32,
    /// Bytes that follow the fixed header: control + payload.
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and checks a header. Fails before anything is allocated when the declared
    /// length is above `frame_bytes_max` or inconsistent.
    pub fn parse(buf: &[u8; FRAME_HEADER_BYTES], frame_bytes_max: usize) -> Result<Self, ProtocolError> {
        let length = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if length < FRAME_HEADER_AFTER_LENGTH_BYTES {
            return Err(ProtocolError::FrameTooShort { len: length });
        }
        if length + 4 > frame_bytes_max {
            return Err(ProtocolError::FrameTooLarge { len: length + 4, max: frame_bytes_max });
        }
        let kind = u16::from_le_bytes([buf[4], buf[5]]);
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        let request_id = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let control_len = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes"));
        let body_len = length - FRAME_HEADER_AFTER_LENGTH_BYTES;
        if control_len as usize > body_len || control_len as usize > CONTROL_BYTES_MAX {
            return Err(ProtocolError::ControlOverrun { control: control_len as usize, len: length + 4 });
        }
        Ok(Self { kind, flags, request_id, control_len, body_len: body_len as u32 })
    }

    /// The kind, if this build knows it.
    pub fn known_kind(&self) -> Result<Kind, ProtocolError> {
        Kind::from_u16(self.kind).ok_or(ProtocolError::UnknownKind(self.kind))
    }
}

/// Encodes a fixed header.
pub fn encode_header(kind: Kind, request_id: u64, control_len: usize, payload_len: usize) -> [u8; FRAME_HEADER_BYTES] {
    let length = (FRAME_HEADER_AFTER_LENGTH_BYTES + control_len + payload_len) as u32;
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&length.to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h[16..20].copy_from_slice(&(control_len as u32).to_le_bytes());
    h
}

/// Appends a whole frame (header, control, payload) to `out`.
pub fn encode_frame<T: Control>(out: &mut Vec<u8>, request_id: u64, msg: &T, payload: &[u8]) {
    let control = msg.to_control_bytes();
    out.extend_from_slice(&encode_header(T::KIND, request_id, control.len(), payload.len()));
    out.extend_from_slice(&control);
    out.extend_from_slice(payload);
}

/// Encodes a frame's header and control; the payload is sent after it separately (no copy).
pub fn encode_frame_head<T: Control>(request_id: u64, msg: &T, payload_len: usize) -> Vec<u8> {
    let control = msg.to_control_bytes();
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + control.len());
    out.extend_from_slice(&encode_header(T::KIND, request_id, control.len(), payload_len));
    out.extend_from_slice(&control);
    out
}

/// A received frame. `control` and `payload` are views of one owned body buffer.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: Kind,
    pub request_id: u64,
    pub control: Bytes,
    pub payload: Bytes,
}

impl Frame {
    /// Builds a frame from its header and body (control + payload, `header.body_len` bytes).
    pub fn from_parts(header: &FrameHeader, body: Bytes) -> Result<Self, ProtocolError> {
        if body.len() != header.body_len as usize {
            return Err(ProtocolError::Truncated);
        }
        let kind = header.known_kind()?;
        let control = body.slice(..header.control_len as usize);
        let payload = body.slice(header.control_len as usize..);
        Ok(Self { kind, request_id: header.request_id, control, payload })
    }

    /// Validates and decodes the control archive as `T`.
    pub fn decode<T: Control>(&self) -> Result<T, ProtocolError> {
        if self.kind != T::KIND {
            return Err(ProtocolError::UnexpectedKind { expected: T::KIND, got: self.kind });
        }
        T::from_control_bytes(&self.control)
    }
}

/// Incremental decoder for a byte stream: feed bytes, take whole frames.
pub struct FrameDecoder {
    buf: bytes::BytesMut,
    frame_bytes_max: usize,
}

impl FrameDecoder {
    pub fn new(frame_bytes_max: usize) -> Self {
        Self { buf: bytes::BytesMut::with_capacity(64 << 10), frame_bytes_max }
    }

    /// Adds received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Takes the next whole frame, if one has arrived. An error means the stream is broken.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let head: &[u8; FRAME_HEADER_BYTES] = self.buf[..FRAME_HEADER_BYTES].try_into().expect("header bytes");
        let header = FrameHeader::parse(head, self.frame_bytes_max)?;
        let total = FRAME_HEADER_BYTES + header.body_len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        let body = frame.split_off(FRAME_HEADER_BYTES).freeze();
        Frame::from_parts(&header, body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::FRAME_BYTES_MAX_DEFAULT;
    use crate::messages::*;
    use rand::{Rng, SeedableRng};

    fn append() -> Append {
        Append {
            segment: "scope/stream/3".into(),
            writer_id: 0xDEAD_BEEF_u128 << 64 | 7,
            first_event_number: 41,
            event_count: 2,
            expected_offset: Some(1234),
        }
    }

    #[test]
    fn roundtrip_in_pieces() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, 9, &append(), b"payload bytes");
        encode_frame(&mut wire, 10, &Done {}, b"");
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let mut frames = Vec::new();
        for chunk in wire.chunks(3) {
            dec.extend(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].request_id, 9);
        assert_eq!(frames[0].decode::<Append>().unwrap(), append());
        assert_eq!(&frames[0].payload[..], b"payload bytes");
        assert_eq!(frames[1].kind, Kind::Done);
        assert!(matches!(frames[1].decode::<Append>(), Err(ProtocolError::UnexpectedKind { .. })));
    }

    #[test]
    fn oversized_and_short_lengths_fail_before_allocation() {
        let mut h = encode_header(Kind::Append, 1, 0, 0);
        h[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(FrameHeader::parse(&h, 1 << 20), Err(ProtocolError::FrameTooLarge { .. })));
        h[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(FrameHeader::parse(&h, 1 << 20), Err(ProtocolError::FrameTooShort { .. })));
        let mut h = encode_header(Kind::Append, 1, 100, 0);
        h[16..20].copy_from_slice(&200u32.to_le_bytes());
        assert!(matches!(FrameHeader::parse(&h, 1 << 20), Err(ProtocolError::ControlOverrun { .. })));
    }

    #[test]
    fn unknown_kind_is_typed() {
        let h = encode_header(Kind::Done, 1, 0, 0);
        let mut raw = h;
        raw[4..6].copy_from_slice(&999u16.to_le_bytes());
        let header = FrameHeader::parse(&raw, 1 << 20).unwrap();
        assert_eq!(Frame::from_parts(&header, Bytes::new()).unwrap_err(), ProtocolError::UnknownKind(999));
    }

    #[test]
    fn random_archives_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = append().to_control_bytes().to_vec();
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 { valid.clone() } else { vec![0u8; rng.random_range(0..96)] };
            for _ in 0..rng.random_range(1..6) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            if rng.random_bool(0.2) {
                bytes.truncate(rng.random_range(0..=bytes.len()));
            }
            // Either a clean error or a value: never a panic or an out-of-bounds read.
            let _ = Append::from_control_bytes(&bytes);
            let _ = HelloReply::from_control_bytes(&bytes);
            let _ = StreamInfo::from_control_bytes(&bytes);
        }
    }
}
