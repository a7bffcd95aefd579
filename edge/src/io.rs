//! Buffers and helpers for monoio's owned-buffer IO, shared by every protocol handler.
//!
//! monoio's io_uring driver takes ownership of a buffer for the duration of a read or write
//! and gives it back with the result, so these helpers move a `Vec<u8>` in and out of each
//! call. If a call is cancelled (a timeout or shutdown fires), the buffer goes with it; the
//! callers close the connection in that case, so an empty buffer is never read again.

use std::{future::Future, io, time::Duration};

use monoio::{
    buf::{IoBuf, IoBufMut, SliceMut},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
};

/// A read buffer with a consumed prefix: `data()` is what has been read and not yet used.
#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    /// Capacity kept after a large message has passed through.
    base_capacity: usize,
}

impl ReadBuf {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            start: 0,
            base_capacity: capacity,
        }
    }

    /// Returns an empty buffer that allocates on its first read.
    pub fn lazy(base_capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            base_capacity,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks `n` bytes of `data()` as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > 4 * self.base_capacity {
                self.buf.shrink_to(self.base_capacity);
            }
        }
    }

    /// Reads once from `src`, appending to `data()`. Returns the number of bytes read; 0 means
    /// EOF. The buffer grows so that at least `min_free` bytes can be read.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled read loses the buffer's contents.
    pub async fn read_from<R: AsyncReadRent>(
        &mut self,
        src: &mut R,
        min_free: usize,
    ) -> io::Result<usize> {
        if self.start > 0 && self.buf.capacity() - self.buf.len() < min_free {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < min_free {
            self.buf.reserve(min_free);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let cap = buf.capacity();
        let (result, slice): (io::Result<usize>, SliceMut<Vec<u8>>) =
            src.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        result
    }

    /// Writes `data()[range]` to `dst` without copying.
    pub async fn write_range_to<W: AsyncWriteRent>(
        &mut self,
        dst: &mut W,
        len: usize,
    ) -> io::Result<()> {
        let start = self.start;
        let buf = std::mem::take(&mut self.buf);
        let (result, slice) = dst.write_all(buf.slice(start..start + len)).await;
        self.buf = slice.into_inner();
        result.map(|_| ())
    }
}

/// Writes all of `out` to `dst` and returns the (cleared) buffer for reuse.
pub async fn write_all_vec<W: AsyncWriteRent>(
    dst: &mut W,
    out: Vec<u8>,
) -> (io::Result<()>, Vec<u8>) {
    let (result, mut out) = dst.write_all(out).await;
    out.clear();
    (result.map(|_| ()), out)
}

/// Runs `fut` with a time limit; a timeout becomes `io::ErrorKind::TimedOut`.
pub async fn with_timeout<T>(
    limit: Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match monoio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
    }
}
