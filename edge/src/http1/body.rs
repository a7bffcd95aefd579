//! Streams one HTTP/1.x message body from a source to a destination, re-framing it.
//!
//! The body is decoded according to its own framing (length, chunked or until close) and
//! encoded again for the other side, so chunk extensions, malformed sizes and bytes past the
//! end of the body never cross the proxy. At most one read buffer of body is held at a time.

use std::{io, time::Duration};

use monoio::io::{AsyncReadRent, AsyncWriteRent};

use super::{
    chunked::{encode_chunk_header, encode_last_chunk, ChunkError, ChunkedDecoder},
    head::BodyFraming,
};
use crate::io::{with_timeout, write_all_vec, ReadBuf};

/// Bytes of free buffer space requested for each body read.
const BODY_READ_BYTES: usize = 32 * 1024;

/// Framing of the body towards the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// The destination was sent a Content-Length equal to the source's length.
    Length,
    /// Chunked transfer coding, with trailers passed on.
    Chunked,
    /// Raw bytes, delimited by closing the connection.
    Raw,
    /// Raw bytes for a destination that frames the body itself (an HTTP/2 stream). When the
    /// source is chunked, its trailer fields are left in `scratch`, each as `name: value\r\n`.
    Frames,
}

/// Reason a body transfer stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("reading the body failed: {0}")]
    Source(io::Error),
    #[error("the body ended before its declared end")]
    SourceEof,
    #[error("invalid chunked body: {0}")]
    SourceFraming(#[from] ChunkError),
    #[error("writing the body failed: {0}")]
    Destination(io::Error),
    #[error("the body exceeds the size limit")]
    TooLarge,
}

/// Limits for one body transfer.
#[derive(Debug, Clone, Copy)]
pub struct PumpLimits {
    /// Maximum wait for one read or write.
    pub idle: Duration,
    /// Maximum decoded body size.
    pub max_bytes: Option<u64>,
}

/// Copies a body framed as `framing` from `src` (starting with the bytes already in `inbuf`)
/// to `dst`, framed as `out`. Returns the number of body bytes copied. Bytes after the end of
/// the body stay in `inbuf`.
///
/// # Errors
/// [`PumpError`] names the side that failed, and the caller closes both connections.
pub async fn pump_body<R, W>(
    src: &mut R,
    dst: &mut W,
    inbuf: &mut ReadBuf,
    framing: BodyFraming,
    out: OutFraming,
    limits: PumpLimits,
    scratch: &mut Vec<u8>,
) -> Result<u64, PumpError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let total = match framing {
        BodyFraming::Empty => 0,
        BodyFraming::Length(n) => pump_raw(src, dst, inbuf, Some(n), out, limits, scratch).await?,
        BodyFraming::UntilClose => pump_raw(src, dst, inbuf, None, out, limits, scratch).await?,
        BodyFraming::Chunked => {
            return pump_chunked(src, dst, inbuf, out, limits, scratch).await;
        }
    };
    if out == OutFraming::Chunked {
        scratch.clear();
        encode_last_chunk(b"", scratch);
        write_scratch(dst, scratch, limits.idle).await?;
    }
    Ok(total)
}

/// Copies a body of `length` bytes, or up to EOF when `length` is `None`.
async fn pump_raw<R, W>(
    src: &mut R,
    dst: &mut W,
    inbuf: &mut ReadBuf,
    length: Option<u64>,
    out: OutFraming,
    limits: PumpLimits,
    scratch: &mut Vec<u8>,
) -> Result<u64, PumpError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let mut total: u64 = 0;
    loop {
        if length == Some(total) {
            return Ok(total);
        }
        if inbuf.is_empty() {
            let n = with_timeout(limits.idle, inbuf.read_from(src, BODY_READ_BYTES))
                .await
                .map_err(PumpError::Source)?;
            if n == 0 {
                return match length {
                    Some(_) => Err(PumpError::SourceEof),
                    None => Ok(total),
                };
            }
        }
        let available = inbuf.len() as u64;
        let take = match length {
            Some(n) => (n - total).min(available),
            None => available,
        } as usize;
        total += take as u64;
        if limits.max_bytes.is_some_and(|max| total > max) {
            return Err(PumpError::TooLarge);
        }
        if out == OutFraming::Chunked {
            scratch.clear();
            encode_chunk_header(take, scratch);
            scratch.extend_from_slice(&inbuf.data()[..take]);
            scratch.extend_from_slice(b"\r\n");
            inbuf.consume(take);
            write_scratch(dst, scratch, limits.idle).await?;
        } else {
            with_timeout(limits.idle, inbuf.write_range_to(dst, take))
                .await
                .map_err(PumpError::Destination)?;
            inbuf.consume(take);
        }
    }
}

async fn pump_chunked<R, W>(
    src: &mut R,
    dst: &mut W,
    inbuf: &mut ReadBuf,
    out: OutFraming,
    limits: PumpLimits,
    scratch: &mut Vec<u8>,
) -> Result<u64, PumpError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let mut decoder = ChunkedDecoder::new();
    let mut total: u64 = 0;
    loop {
        if inbuf.is_empty() {
            let n = with_timeout(limits.idle, inbuf.read_from(src, BODY_READ_BYTES))
                .await
                .map_err(PumpError::Source)?;
            if n == 0 {
                return Err(PumpError::SourceEof);
            }
        }
        scratch.clear();
        let chunked_out = out == OutFraming::Chunked;
        let consumed = decoder.decode(inbuf.data(), &mut |data| {
            total += data.len() as u64;
            if chunked_out {
                encode_chunk_header(data.len(), scratch);
            }
            scratch.extend_from_slice(data);
            if chunked_out {
                scratch.extend_from_slice(b"\r\n");
            }
        })?;
        inbuf.consume(consumed);
        if limits.max_bytes.is_some_and(|max| total > max) {
            return Err(PumpError::TooLarge);
        }
        if decoder.is_done() {
            if chunked_out {
                encode_last_chunk(decoder.trailers(), scratch);
            }
            if !scratch.is_empty() {
                write_scratch(dst, scratch, limits.idle).await?;
            }
            if out == OutFraming::Frames {
                scratch.clear();
                scratch.extend_from_slice(decoder.trailers());
            }
            return Ok(total);
        }
        if !scratch.is_empty() {
            write_scratch(dst, scratch, limits.idle).await?;
        }
    }
}

async fn write_scratch<W: AsyncWriteRent>(
    dst: &mut W,
    scratch: &mut Vec<u8>,
    idle: Duration,
) -> Result<(), PumpError> {
    let out = std::mem::take(scratch);
    let (result, out) = match monoio::time::timeout(idle, write_all_vec(dst, out)).await {
        Ok(pair) => pair,
        Err(_) => {
            return Err(PumpError::Destination(io::Error::new(
                io::ErrorKind::TimedOut,
                "write timed out",
            )))
        }
    };
    *scratch = out;
    result.map_err(PumpError::Destination)
}
