//! Event framing inside segment bytes: each event is a little-endian u32 length followed by
//! that many payload bytes. Byte streams carry raw bytes without this framing.

use crate::constants::{EVENT_BYTES_MAX, EVENT_HEADER_BYTES};

/// Appends one framed event to `out`.
pub fn encode_event(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Bytes one event takes in a segment.
pub fn framed_len(payload_len: usize) -> usize {
    EVENT_HEADER_BYTES + payload_len
}

/// Why a byte range is not a whole sequence of framed events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("event at byte {at} declares {len} bytes, above the {max}-byte limit")]
    TooLarge { at: usize, len: usize, max: usize },
    #[error("event at byte {at} is cut short")]
    Truncated { at: usize },
    #[error("expected {expected} events, found {found}")]
    CountMismatch { expected: u64, found: u64 },
}

/// Checks that `data` holds exactly `count` whole events, each within the size limit.
pub fn validate_events(data: &[u8], count: u64) -> Result<(), FramingError> {
    let found = EventIter::new(data).try_fold(0u64, |n, ev| ev.map(|_| n + 1))?;
    if found != count {
        return Err(FramingError::CountMismatch { expected: count, found });
    }
    Ok(())
}

/// Byte position just after the first `n` events of `data` (which must be valid framing).
pub fn skip_events(data: &[u8], n: u64) -> Result<usize, FramingError> {
    let mut pos = 0;
    for _ in 0..n {
        let (_, next) = next_event(data, pos)?.ok_or(FramingError::Truncated { at: pos })?;
        pos = next;
    }
    Ok(pos)
}

fn next_event(data: &[u8], pos: usize) -> Result<Option<(std::ops::Range<usize>, usize)>, FramingError> {
    if pos == data.len() {
        return Ok(None);
    }
    let Some(hdr) = data.get(pos..pos + EVENT_HEADER_BYTES) else {
        return Err(FramingError::Truncated { at: pos });
    };
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len > EVENT_BYTES_MAX {
        return Err(FramingError::TooLarge { at: pos, len, max: EVENT_BYTES_MAX });
    }
    let start = pos + EVENT_HEADER_BYTES;
    if data.len() - start < len {
        return Err(FramingError::Truncated { at: pos });
    }
    Ok(Some((start..start + len, start + len)))
}

/// Iterates over the payloads of framed events.
pub struct EventIter<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> EventIter<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, failed: false }
    }

    /// Bytes consumed by the events returned so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for EventIter<'a> {
    type Item = Result<&'a [u8], FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match next_event(self.data, self.pos) {
            Ok(None) => None,
            Ok(Some((range, next))) => {
                self.pos = next;
                Some(Ok(&self.data[range]))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Splits a buffer that may end in a partial event: returns the whole events and the byte
/// count they take. Used by readers that receive raw segment bytes in arbitrary chunks.
pub fn split_whole_events(data: &[u8]) -> Result<(Vec<std::ops::Range<usize>>, usize), FramingError> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match next_event(data, pos) {
            Ok(Some((range, next))) => {
                out.push(range);
                pos = next;
            }
            Ok(None) | Err(FramingError::Truncated { .. }) => return Ok((out, pos)),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_validation() {
        let mut buf = Vec::new();
        encode_event(&mut buf, b"hello");
        encode_event(&mut buf, b"");
        encode_event(&mut buf, b"world!");
        assert_eq!(validate_events(&buf, 3), Ok(()));
        assert!(matches!(validate_events(&buf, 2), Err(FramingError::CountMismatch { .. })));
        assert!(matches!(validate_events(&buf[..buf.len() - 1], 3), Err(FramingError::Truncated { .. })));
        let evs: Vec<_> = EventIter::new(&buf).map(|e| e.unwrap().to_vec()).collect();
        assert_eq!(evs, vec![b"hello".to_vec(), vec![], b"world!".to_vec()]);
        assert_eq!(skip_events(&buf, 1), Ok(9));
        let (whole, used) = split_whole_events(&buf[..buf.len() - 2]).unwrap();
        assert_eq!(whole.len(), 2);
        assert_eq!(used, 13);
    }

    #[test]
    fn oversized_length_is_rejected() {
        let mut buf = ((EVENT_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(validate_events(&buf, 1), Err(FramingError::TooLarge { .. })));
    }
}
