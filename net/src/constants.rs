//! Protocol limits and fixed sizes, units last.

/// Version spoken by this build; the handshake picks the highest common version.
pub const PROTOCOL_VERSION: u16 = 21;
/// Magic carried in the `Hello` message ("SLCE").
pub const HELLO_MAGIC: u32 = 0x534C_4345;
/// Bytes of the fixed frame header: length u32, kind u16, flags u16, request id u64, control length u32.
pub const FRAME_HEADER_BYTES: usize = 20;
/// Bytes of the header counted by the length field (everything after the length itself).
pub const FRAME_HEADER_AFTER_LENGTH_BYTES: usize = FRAME_HEADER_BYTES - 4;
/// Default maximum frame size (header included).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 << 20;
/// Maximum size of one control archive.
pub const CONTROL_BYTES_MAX: usize = 1 << 20;
/// Maximum size of one event's payload.
pub const EVENT_BYTES_MAX: usize = 8 << 20;
/// Bytes of the length prefix that frames an event inside segment bytes.
pub const EVENT_HEADER_BYTES: usize = 4;
/// Most parts in one `Appends` frame (a part's control is at most a few hundred bytes, so
/// a frame's control stays far below `CONTROL_BYTES_MAX`).
pub const APPEND_PARTS_MAX: usize = 256;
/// Longest scope or stream name.
pub const NAME_BYTES_MAX: usize = 64;

/// Most transactions in one `TxnList` page (each is well under 1 KiB, so a page stays far
/// below `CONTROL_BYTES_MAX`).
pub const TXN_PAGE_MAX: u32 = 1000;

/// Most names in one `ScopeList` or `StreamList` page (names are at most 64 bytes; a
/// `StreamList` entry adds its policies, a few dozen bytes, so a page stays below
/// `CONTROL_BYTES_MAX`).
pub const NAMES_PAGE_MAX: u32 = 5000;

/// Most segments in one `SegmentLengths` page (a segment name is at most about 190 bytes,
/// a transaction's shadow included, so a page stays below half of `CONTROL_BYTES_MAX`).
pub const LENGTHS_PAGE_MAX: u32 = 2000;

/// Most epochs in one `StreamHistory` page (the server also stops a page at about a quarter
/// of `CONTROL_BYTES_MAX` of epoch records: an epoch of a wide stream is kilobytes).
pub const HISTORY_PAGE_MAX: u32 = 1000;
