//! HTTP/1.1 response framing for the load generator: finds where a response in a read buffer
//! ends (Content-Length, chunked, or until the connection closes) without doing any I/O.

use std::fmt;

/// Maximum number of header lines the load generator accepts in one response.
const MAX_HEADERS: usize = 64;

/// Framing state of the response at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The head or body is not complete yet: read more bytes.
    Incomplete,
    /// The buffer contains a whole response of `len` bytes, head and body.
    Complete(ResponseHead, usize),
    /// The body has no length and runs until the server closes the connection.
    UntilClose(ResponseHead),
}

/// The parts of a response head the load generator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// The server closes the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`).
    pub closes: bool,
}

/// A response the load generator cannot frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError(String);

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid response: {}", self.0)
    }
}

impl std::error::Error for FramingError {}

/// Frames the response at the start of `buf`, which is the response to a GET request.
///
/// # Errors
/// Fails on a malformed head, an invalid `Content-Length` or a malformed chunked body.
pub fn frame_response(buf: &[u8]) -> Result<Framing, FramingError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Framing::Incomplete),
        Err(e) => return Err(FramingError(format!("head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let mut connection_close = response.version == Some(0);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("");
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    connection_close = false;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let len = value
                .trim()
                .parse()
                .map_err(|_| FramingError(format!("Content-Length {value:?}")))?;
            content_length = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    let head = ResponseHead {
        status,
        closes: connection_close,
    };

    // A response to GET without a body: 1xx, 204 and 304.
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Complete(head, head_len));
    }
    if chunked {
        return match chunked_body_len(&buf[head_len..])? {
            Some(body_len) => Ok(Framing::Complete(head, head_len + body_len)),
            None => Ok(Framing::Incomplete),
        };
    }
    match content_length {
        Some(len) if buf.len() >= head_len + len => Ok(Framing::Complete(head, head_len + len)),
        Some(_) => Ok(Framing::Incomplete),
        None => Ok(Framing::UntilClose(ResponseHead {
            closes: true,
            ..head
        })),
    }
}

/// Returns the length of the chunked body at the start of `body`, trailers included, or `None`
/// when it is not complete yet.
fn chunked_body_len(body: &[u8]) -> Result<Option<usize>, FramingError> {
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&body[pos..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[pos..pos + line_end])
            .map_err(|_| FramingError("chunk size line is not UTF-8".to_owned()))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| FramingError(format!("chunk size {size_text:?}")))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailer fields follow, each ending in CRLF, then an empty line.
            loop {
                let Some(trailer_end) = find_crlf(&body[pos..]) else {
                    return Ok(None);
                };
                pos += trailer_end + 2;
                if trailer_end == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if body.len() < pos + size + 2 {
            return Ok(None);
        }
        if &body[pos + size..pos + size + 2] != b"\r\n" {
            return Err(FramingError("chunk data not followed by CRLF".to_owned()));
        }
        pos += size + 2;
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete_len(buf: &[u8]) -> usize {
        match frame_response(buf).unwrap() {
            Framing::Complete(_, len) => len,
            other => panic!("expected a complete response, got {other:?}"),
        }
    }

    #[test]
    fn content_length_response_is_complete() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloNEXT";
        assert_eq!(complete_len(buf), buf.len() - 4);
    }

    #[test]
    fn short_body_is_incomplete() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel";
        assert_eq!(frame_response(buf).unwrap(), Framing::Incomplete);
    }

    #[test]
    fn partial_head_is_incomplete() {
        assert_eq!(
            frame_response(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(),
            Framing::Incomplete
        );
    }

    #[test]
    fn chunked_body_with_trailer_completes() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(complete_len(buf), buf.len());
    }

    #[test]
    fn chunked_body_without_end_incomplete() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert_eq!(frame_response(buf).unwrap(), Framing::Incomplete);
    }

    #[test]
    fn invalid_chunk_size_is_error() {
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let err = frame_response(buf).unwrap_err();
        assert_eq!(err.to_string(), "invalid response: chunk size \"zz\"");
    }

    #[test]
    fn connection_close_header_is_reported() {
        let buf = b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let Framing::Complete(head, _) = frame_response(buf).unwrap() else {
            panic!("expected a complete response");
        };
        assert_eq!(head.status, 502);
        assert!(head.closes);
    }

    #[test]
    fn http10_response_closes_by_default() {
        let buf = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        let Framing::Complete(head, _) = frame_response(buf).unwrap() else {
            panic!("expected a complete response");
        };
        assert!(head.closes);
    }

    #[test]
    fn no_length_reads_until_close() {
        let buf = b"HTTP/1.1 200 OK\r\n\r\nbody";
        assert!(matches!(
            frame_response(buf).unwrap(),
            Framing::UntilClose(ResponseHead {
                status: 200,
                closes: true
            })
        ));
    }

    #[test]
    fn not_modified_has_no_body() {
        let buf = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(complete_len(buf), buf.len());
    }
}
