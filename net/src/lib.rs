//! Sluice wire protocol, shared by the server (engine, on the shard executors) and the
//! client (tokio). This crate does no I/O (`socket` only sets a socket option): it owns the frame layout, the control messages
//! (rkyv archives validated with bytecheck before use), the typed error codes a client can
//! act on, the id newtypes, the event framing inside segment bytes, and the stable hashes
//! that route a routing key to a segment and a segment to a container.
//!
//! Invariants: a frame's declared length is checked against the configured maximum before
//! any buffer for it is allocated; a control archive is validated before it is read.

pub mod constants;
pub mod error;
pub mod event;
pub mod frame;
pub mod ids;
pub mod messages;
pub mod retention;
pub mod routing;
pub mod scaling;
pub mod socket;
pub mod txn;

pub use error::{ErrorCode, ProtocolError};
pub use frame::{Frame, FrameHeader};
pub use ids::*;
pub use messages::*;
pub use retention::Retention;
pub use scaling::ScalingPolicy;
pub use txn::TxnState;
