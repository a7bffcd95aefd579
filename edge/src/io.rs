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
    /// `buf` came from the worker's pool and goes back there.
    pooled: bool,
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl ReadBuf {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            start: 0,
            base_capacity: capacity,
            pooled: false,
        }
    }

    /// Returns an empty buffer that takes memory on its first read: a buffer from the worker's
    /// pool when `base_capacity` fits one, a new allocation otherwise.
    pub fn lazy(base_capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            base_capacity,
            pooled: false,
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

    /// Returns the memory of an empty buffer to the worker's pool (or frees it), so that an
    /// idle connection keeps none. The next read takes a buffer again. Does nothing while
    /// unread bytes remain.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.start = 0;
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.pooled) {
            pool::give(buf);
        }
    }

    /// Returns the capacity held, in bytes.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
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
        if self.buf.capacity() == 0 {
            // A cancelled read took the last buffer with it.
            self.give_back();
            if self.base_capacity.max(min_free) <= pool::BUFFER_BYTES {
                self.buf = pool::take();
                self.pooled = true;
            }
        }
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

/// A client stream that can wait for incoming bytes without holding a read buffer.
pub trait WaitReadable {
    /// Waits until a read would return data, EOF or an error.
    ///
    /// # Cancel safety
    /// Cancel safe while no byte has arrived. The caller closes the connection after a
    /// cancel in any case, because bytes in flight may be lost.
    async fn wait_readable(&mut self) -> io::Result<()>;
}

impl WaitReadable for monoio::net::TcpStream {
    /// Returns at once, so the read that follows waits. A readiness wait first would cost an
    /// extra io_uring operation per request on plain HTTP.
    // NOTE: an idle plain HTTP connection therefore keeps its read buffer. Only TLS
    // connections wait without one.
    async fn wait_readable(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WaitReadable for crate::tls::stream::TlsStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        crate::tls::stream::TlsStream::wait_readable(self).await
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

/// A per-worker pool of IO buffers, so that connections borrow memory only while bytes pass
/// through and hold none while they wait.
///
/// The pool is thread-local, and each worker is one thread, so taking and giving back are a
/// `Vec` pop and push with no lock.
pub mod pool {
    use std::cell::{Cell, RefCell};

    /// Capacity of every pooled buffer: one TLS record of the largest plaintext size.
    pub const BUFFER_BYTES: usize = 16 * 1024;
    /// Free buffers kept per worker; more are freed when given back.
    const MAX_FREE: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
        /// Buffers taken and not given back, for tests.
        static LENT: Cell<usize> = const { Cell::new(0) };
    }

    /// Takes an empty buffer with a capacity of [`BUFFER_BYTES`].
    pub fn take() -> Vec<u8> {
        LENT.set(LENT.get() + 1);
        FREE.with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_BYTES))
    }

    /// Gives a buffer back. One of another capacity is freed, because callers may grow the
    /// buffers they hold.
    pub fn give(mut buf: Vec<u8>) {
        LENT.set(LENT.get().saturating_sub(1));
        if buf.capacity() != BUFFER_BYTES {
            return;
        }
        buf.clear();
        FREE.with_borrow_mut(|free| {
            if free.len() < MAX_FREE {
                free.push(buf);
            }
        });
    }

    /// Returns how many buffers this thread has taken and not given back.
    ///
    /// NOTE: a buffer dropped instead of given back (one inside a cancelled read, say) stays
    /// counted, so the count is an upper bound.
    #[cfg(test)]
    pub fn lent() -> usize {
        LENT.get()
    }
}
