//! Byte streams: a one-segment stream used as plain bytes (no event framing). The writer
//! is idempotent (a writer id and a number per write), so a retried write after a
//! reconnect is never applied twice.

use crate::client::Client;
use crate::error::ClientError;
use bytes::Bytes;
use sluice_net::ScopedStream;
use sluice_net::messages::{Append, AppendAck};
use std::time::Duration;

impl Client {
    /// Creates `scope/name` as a byte stream (one segment).
    pub async fn create_byte_stream(&self, scope: &str, name: &str) -> Result<(), ClientError> {
        self.create_stream(scope, name, 1).await
    }

    async fn byte_segment(&self, stream: &str) -> Result<(ScopedStream, String), ClientError> {
        let s = crate::client::parse_stream(stream)?;
        let info = self.get_stream(&s.scope, &s.stream).await?;
        match info.segments.as_slice() {
            [seg] => {
                let name = s.segment_name(sluice_net::SegmentNumber(seg.number));
                Ok((s, name))
            }
            segs => {
                Err(ClientError::InvalidArgument(format!("{s} has {} segments; a byte stream has one", segs.len())))
            }
        }
    }

    pub async fn byte_writer(&self, stream: &str) -> Result<ByteWriter, ClientError> {
        let (stream, segment) = self.byte_segment(stream).await?;
        Ok(ByteWriter { client: self.clone(), stream, segment, writer_id: rand::random::<u128>() | 1, next: 1 })
    }

    pub async fn byte_reader(&self, stream: &str) -> Result<ByteReader, ClientError> {
        let (_, segment) = self.byte_segment(stream).await?;
        let start = self.segment_info(&segment).await?.start_offset;
        Ok(ByteReader { client: self.clone(), segment, offset: start })
    }
}

pub struct ByteWriter {
    client: Client,
    stream: ScopedStream,
    segment: String,
    writer_id: u128,
    next: u64,
}

impl ByteWriter {
    /// Appends `data`; returns once it is durable, with the offset where it landed (0 when
    /// a retry found it already written).
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<u64, ClientError> {
        let msg = Append {
            segment: self.segment.clone(),
            writer_id: self.writer_id,
            first_event_number: self.next,
            event_count: 0,
            expected_offset: None,
        };
        self.next += 1;
        let data = data.into();
        let (client, segment) = (&self.client, self.segment.as_str());
        let ack: AppendAck = client
            .with_retry(|| {
                let (msg, data) = (msg.clone(), data.clone());
                async move { client.segment_connection(segment).await?.call(&msg, data).await }
            })
            .await?;
        Ok(ack.offset)
    }

    /// Every `write` is durable when it returns; flush is there for symmetry.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        Ok(())
    }

    /// No more writes, ever.
    pub async fn seal(&mut self) -> Result<(), ClientError> {
        self.client.seal_stream(&self.stream.scope, &self.stream.stream).await
    }

    /// Drops the bytes before `offset`.
    pub async fn truncate_before(&mut self, offset: u64) -> Result<(), ClientError> {
        self.client.truncate_segment(&self.segment, offset).await
    }
}

pub struct ByteReader {
    client: Client,
    segment: String,
    offset: u64,
}

impl ByteReader {
    pub fn position(&self) -> u64 {
        self.offset
    }

    pub fn seek(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// Bytes written beyond the current position.
    pub async fn available(&self) -> Result<u64, ClientError> {
        Ok(self.client.segment_info(&self.segment).await?.length.saturating_sub(self.offset))
    }

    /// Up to `max` bytes from the position, waiting up to `wait` if none are there yet.
    /// Empty at the end of a sealed stream or when the wait passes.
    pub async fn read(&mut self, max: u32, wait: Duration) -> Result<Bytes, ClientError> {
        let (_, data) = self.client.read_segment(&self.segment, self.offset, max, wait).await?;
        self.offset += data.len() as u64;
        Ok(data)
    }
}
