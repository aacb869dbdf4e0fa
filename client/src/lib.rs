//! Rust client for Sluice (tokio).
//!
//! ```no_run
//! use sluice_client::{Client, ReadFrom};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! let client = Client::connect("127.0.0.1:9090").await?;
//! client.create_scope("shop").await.ok();
//! client.create_stream("shop", "orders", 4).await.ok();
//!
//! let writer = client.event_writer("shop/orders").await?;
//! let ack = writer.write_event(b"customer-17", &b"order #1"[..]);
//! ack.await?; // durable on disk now
//! writer.flush().await?;
//!
//! let mut reader = client.event_reader("shop/orders", ReadFrom::Head).await?;
//! while let Some(event) = reader.read_next(Duration::from_secs(1)).await? {
//!     println!("{}", String::from_utf8_lossy(&event.payload));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Modules: `connection` (one multiplexed TCP connection per shard endpoint), `client`
//! (bootstrap, shard map, routing, stream manager, segment calls), `writer` (batching,
//! pipelining, idempotent resend), `reader` (all segments of a stream, tail long-poll),
//! `cut` (stream cuts), `sync` (state synchronizer), `batch` (reads between cuts),
//! `bytestream` (byte streams), `txn` (transactions), `stats` (shard statistics as a table).

mod acks;
pub mod batch;
pub mod bytestream;
pub mod client;
pub mod connection;
pub mod cut;
pub mod error;
pub mod group;
pub mod reader;
pub mod stats;
pub mod sync;
pub mod txn;
pub mod writer;

pub use batch::{SegmentSlice, SliceReader};
pub use bytestream::{ByteReader, ByteWriter};
pub use client::{Client, ClientConfig};
pub use connection::answers_handshake;
pub use cut::{CutAt, StreamCut};
pub use error::ClientError;
pub use group::{Checkpoint, GroupItem, GroupReader, GroupStream, ReaderGroup, ReaderGroupConfig};
pub use reader::{Event, EventReader, ReadFrom};
/// Wire error codes, as `ClientError::code` reports them.
pub use sluice_net::ErrorCode;
pub use sync::{StateSynchronizer, Synchronized};
pub use txn::{Transaction, TxnConfig};
pub use writer::{AckFuture, Burst, EventWriter, WriterConfig};

/// The README's Rust example, compiled as a doc test so it cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
