//! Sans-IO decoder and encoder for the chunked transfer coding (RFC 9112 section 7.1).
//!
//! The decoder is strict: a chunk size is 1 to 16 hex digits and at most 2^48, every line ends
//! in CRLF, and the CRLF after chunk data is required. Chunk extensions are dropped; trailer
//! fields are validated and kept so the encoder can pass them on.

/// Largest chunk size accepted, far above any real chunk and far below overflow.
const MAX_CHUNK_SIZE: u64 = 1 << 48;
/// Maximum bytes of chunk extensions on one chunk-size line.
const MAX_EXTENSION_BYTES: usize = 1024;
/// Maximum bytes of all trailer fields together.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    InvalidSize,
    #[error("invalid chunk extension")]
    InvalidExtension,
    #[error("missing CRLF after chunk data")]
    MissingCrlf,
    #[error("invalid trailer field")]
    InvalidTrailer,
    #[error("trailer fields too large")]
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits; the count read so far.
    Size(u8),
    /// Skipping a chunk extension; bytes seen so far.
    Extension(usize),
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Incremental chunked-body decoder. Feed it bytes with [`ChunkedDecoder::decode`].
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    /// Raw trailer section, each field as `name: value\r\n`.
    trailers: Vec<u8>,
    line_start: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Size(0),
            size: 0,
            trailers: Vec::new(),
            line_start: 0,
        }
    }

    /// Returns whether the final chunk and trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The validated trailer fields, each as `name: value\r\n`.
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Decodes from `input`, calling `on_data` with each run of body bytes. Returns how many
    /// bytes of `input` were consumed: all of them unless the body ended inside `input`.
    ///
    /// # Errors
    /// [`ChunkError`] on the first syntax violation; the body cannot be resumed after it.
    pub fn decode(
        &mut self,
        input: &[u8],
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size(digits) => {
                    if let Some(v) = hex_value(b) {
                        if digits >= 16 {
                            return Err(ChunkError::InvalidSize);
                        }
                        self.size = (self.size << 4) | u64::from(v);
                        if self.size > MAX_CHUNK_SIZE {
                            return Err(ChunkError::InvalidSize);
                        }
                        self.state = State::Size(digits + 1);
                    } else if digits == 0 {
                        return Err(ChunkError::InvalidSize);
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Extension(0);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkError::InvalidSize);
                    }
                    i += 1;
                }
                State::Extension(seen) => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n'
                        || (b < 0x20 && b != b'\t')
                        || b == 0x7f
                        || seen >= MAX_EXTENSION_BYTES
                    {
                        return Err(ChunkError::InvalidExtension);
                    } else {
                        self.state = State::Extension(seen + 1);
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::InvalidSize);
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data(self.size)
                    };
                    self.size = 0;
                }
                State::Data(remaining) => {
                    let available = (input.len() - i) as u64;
                    let take = remaining.min(available) as usize;
                    on_data(&input[i..i + take]);
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Size(0);
                    i += 1;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::FinalLf;
                    } else if b == b' ' || b == b'\t' || b == b':' || !is_token_byte(b) {
                        // obs-fold or an empty or invalid field name.
                        return Err(ChunkError::InvalidTrailer);
                    } else {
                        self.line_start = self.trailers.len();
                        self.push_trailer_byte(b)?;
                        self.state = State::TrailerLine;
                    }
                    i += 1;
                }
                State::TrailerLine => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(ChunkError::InvalidTrailer);
                    } else {
                        self.push_trailer_byte(b)?;
                    }
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::InvalidTrailer);
                    }
                    self.finish_trailer_line()?;
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Done;
                    i += 1;
                }
                State::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    fn push_trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.trailers.len() >= MAX_TRAILER_BYTES {
            return Err(ChunkError::TrailersTooLarge);
        }
        self.trailers.push(b);
        Ok(())
    }

    /// Validates the trailer line just read and keeps it unless it is a field that must not
    /// appear in trailers (framing, routing and hop-by-hop fields are dropped).
    fn finish_trailer_line(&mut self) -> Result<(), ChunkError> {
        let line = &self.trailers[self.line_start..];
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(ChunkError::InvalidTrailer)?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
            return Err(ChunkError::InvalidTrailer);
        }
        const DROPPED: [&[u8]; 5] = [
            b"content-length",
            b"transfer-encoding",
            b"host",
            b"trailer",
            b"connection",
        ];
        if DROPPED.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            self.trailers.truncate(self.line_start);
        } else {
            self.trailers.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

/// Appends the chunk header for `len` data bytes (`{len:x}\r\n`) to `out`.
pub fn encode_chunk_header(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk, the trailer fields and the final CRLF to `out`.
pub fn encode_last_chunk(trailers: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Returns whether `b` may appear in a token (RFC 9110 section 5.6.2).
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Vec<u8>, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::new();
        let mut body = Vec::new();
        let n = decoder.decode(input, &mut |d| body.extend_from_slice(d))?;
        assert!(decoder.is_done(), "not done: {:?}", decoder.state);
        Ok((body, decoder.trailers().to_vec(), n))
    }

    #[test]
    fn decodes_chunks_and_trailers() {
        let input =
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 1\r\nContent-Length: 9\r\n\r\nNEXT";
        let (body, trailers, consumed) = decode_all(input).unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(trailers, b"X-Sum: 1\r\n");
        assert_eq!(&input[consumed..], b"NEXT");
    }

    #[test]
    fn decodes_byte_by_byte() {
        let input = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut decoder = ChunkedDecoder::new();
        let mut body = Vec::new();
        for b in input.chunks(1) {
            decoder
                .decode(b, &mut |d| body.extend_from_slice(d))
                .unwrap();
        }
        assert!(decoder.is_done());
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn rejects_malformed_sizes() {
        let cases: [&[u8]; 7] = [
            b"1zz\r\nx\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"-0\r\n\r\n",
            b"10000000000000000\r\n",
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"1000000000001\r\n",
        ];
        for input in cases {
            let mut decoder = ChunkedDecoder::new();
            let result = decoder.decode(input, &mut |_| {});
            assert_eq!(result, Err(ChunkError::InvalidSize), "input {input:?}");
        }
    }

    #[test]
    fn rejects_missing_crlf_after_data() {
        let mut decoder = ChunkedDecoder::new();
        let result = decoder.decode(b"5\r\nhello0\r\n\r\n", &mut |_| {});
        assert_eq!(result, Err(ChunkError::MissingCrlf));
    }

    #[test]
    fn rejects_folded_trailer() {
        let mut decoder = ChunkedDecoder::new();
        let result = decoder.decode(b"0\r\nX: a\r\n b\r\n\r\n", &mut |_| {});
        assert_eq!(result, Err(ChunkError::InvalidTrailer));
    }

    #[test]
    fn rejects_bare_lf_in_extension() {
        let mut decoder = ChunkedDecoder::new();
        let result = decoder.decode(b"5;a\nhello\r\n", &mut |_| {});
        assert_eq!(result, Err(ChunkError::InvalidExtension));
    }

    #[test]
    fn encodes_chunk_headers() {
        let mut out = Vec::new();
        encode_chunk_header(255, &mut out);
        encode_chunk_header(0x10000, &mut out);
        encode_last_chunk(b"X: y\r\n", &mut out);
        assert_eq!(out, b"ff\r\n10000\r\n0\r\nX: y\r\n\r\n");
    }
}
