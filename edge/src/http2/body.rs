//! Body plumbing shared by every path that sends a body into an HTTP/2 stream: an
//! owned-buffer writer that respects flow control, and trailer parsing.

use std::{future::poll_fn, io};

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, HeaderName, HeaderValue};
use monoio::{
    buf::{IoBuf, IoVecBuf},
    io::AsyncWriteRent,
    BufResult,
};

use crate::http1::head::{is_hop_by_hop, trim_ows};

/// Parses trailer fields written as `name: value\r\n` into a header map, dropping fields that
/// HTTP/2 forbids or that do not parse.
pub fn parse_trailers(raw: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = trim_ows(&line[colon + 1..]);
        if is_hop_by_hop(name) {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// Writes body bytes to an h2 stream as DATA frames, waiting for flow-control capacity, so
/// at most the stream's send buffer is held for a client that reads slowly.
pub struct H2Sink<'a> {
    pub stream: &'a mut SendStream<Bytes>,
}

impl AsyncWriteRent for H2Sink<'_> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `IoBuf` guarantees that `read_ptr` points to `bytes_init` initialised bytes
        // that stay valid while `buf` is owned here, and the slice does not outlive `buf`.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        if data.is_empty() {
            return (Ok(0), buf);
        }
        self.stream.reserve_capacity(data.len());
        let capacity = loop {
            match poll_fn(|cx| self.stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
                Some(Err(e)) => return (Err(io::Error::other(e)), buf),
                None => {
                    return (
                        Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
                        buf,
                    )
                }
            }
        };
        let n = capacity.min(data.len());
        let result = self
            .stream
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map(|()| n)
            .map_err(io::Error::other);
        (result, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "vectored writes to an HTTP/2 stream are not supported",
            )),
            buf,
        )
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_parse_and_filter() {
        let map = parse_trailers(b"grpc-status: 0\r\nGrpc-Message: ok \r\nconnection: x\r\n");
        assert_eq!(map.get("grpc-status").unwrap(), "0");
        assert_eq!(map.get("grpc-message").unwrap(), "ok");
        assert!(map.get("connection").is_none());
    }
}
