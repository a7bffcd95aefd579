//! Sans-IO parsing and validation of HTTP/1.x request and response heads.
//!
//! httparse does the tokenising; this module adds the checks that keep a front proxy and the
//! backend in agreement about where a message ends (RFC 9112 sections 2.2, 5.2 and 6): bare LF
//! line endings, obs-fold, ambiguous `Content-Length` and `Transfer-Encoding`. Every rejection is
//! a [`HeadError`] that the connection maps to a status code and then closes.

use std::ops::Range;

/// Maximum number of header fields in one message head.
pub const MAX_HEADERS: usize = 128;

/// HTTP/1.x minor version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Delimitation of a message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes (responses only).
    UntilClose,
}

/// Reason a message head was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head exceeds the configured byte limit or header count.
    #[error("message head too large")]
    TooLarge,
    /// The head is syntactically invalid.
    #[error("invalid message head: {0}")]
    Invalid(&'static str),
    /// The head is valid, but its body framing is ambiguous or unsupported.
    #[error("invalid body framing: {0}")]
    Framing(&'static str),
    /// The request uses a method the proxy does not forward.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
}

/// Byte ranges of one header field inside the head buffer.
#[derive(Debug, Clone)]
pub struct HeaderField {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// A parsed request head. Ranges index the buffer passed to [`parse_request`].
#[derive(Debug, Default, Clone)]
pub struct RequestHead {
    pub head_len: usize,
    pub method: Range<usize>,
    /// The path and query of the target (origin form), also for absolute-form targets.
    pub path_and_query: Range<usize>,
    pub version: Option<Version>,
    pub headers: Vec<HeaderField>,
    /// Host from the `Host` header or the absolute-form target, as sent (may carry a port).
    pub host: Option<Range<usize>>,
    pub framing: Option<BodyFraming>,
    /// Whether the client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header: a protocol switch is requested.
    pub upgrade: bool,
    /// Lowercase header names listed in `Connection`, which are removed when forwarding.
    pub connection_names: Vec<Range<usize>>,
}

impl RequestHead {
    pub fn version(&self) -> Version {
        self.version.unwrap_or(Version::Http11)
    }

    pub fn framing(&self) -> BodyFraming {
        self.framing.unwrap_or(BodyFraming::Empty)
    }
}

/// A parsed response head. Ranges index the buffer passed to [`parse_response`].
#[derive(Debug, Default, Clone)]
pub struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub reason: Range<usize>,
    pub version: Option<Version>,
    pub headers: Vec<HeaderField>,
    pub framing: Option<BodyFraming>,
    /// Whether the backend allows the connection to be reused.
    pub keep_alive: bool,
    /// Seconds from `Keep-Alive: timeout=N`, if the backend sent one.
    pub keep_alive_timeout_secs: Option<u64>,
    /// The `Upgrade` header is present (needed to accept a 101).
    pub has_upgrade: bool,
    pub connection_names: Vec<Range<usize>>,
}

impl ResponseHead {
    pub fn framing(&self) -> BodyFraming {
        self.framing.unwrap_or(BodyFraming::UntilClose)
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed and `buf` is still under `max_bytes`.
///
/// # Errors
/// [`HeadError`] for a head over `max_bytes` or [`MAX_HEADERS`] fields, invalid syntax, or
/// ambiguous framing.
pub fn parse_request(
    buf: &[u8],
    max_bytes: usize,
    out: &mut RequestHead,
) -> Result<Option<()>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let Some(head_len) = complete_head_len(req.parse(buf), buf, max_bytes, true)? else {
        return Ok(None);
    };

    out.head_len = head_len;
    out.headers.clear();
    out.connection_names.clear();
    out.host = None;
    out.expect_continue = false;
    out.upgrade = false;

    let method = req.method.unwrap_or_default();
    out.method = range_of(buf, method.as_bytes());
    let version = match req.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    out.version = Some(version);

    let target = req.path.unwrap_or_default();
    if method == "CONNECT" {
        return Err(HeadError::MethodNotAllowed("CONNECT"));
    }
    let target_range = range_of(buf, target.as_bytes());
    let mut absolute_host = None;
    if target.starts_with('/') {
        out.path_and_query = target_range;
    } else if target == "*" {
        if method != "OPTIONS" {
            return Err(HeadError::Invalid(
                "asterisk target is only valid for OPTIONS",
            ));
        }
        out.path_and_query = target_range;
    } else if let Some((authority, path)) = split_absolute_target(target) {
        absolute_host = Some(range_of(buf, authority.as_bytes()));
        out.path_and_query = if path.is_empty() {
            // An empty path in absolute form means "/"; the caller substitutes it.
            target_range.end..target_range.end
        } else {
            range_of(buf, path.as_bytes())
        };
    } else {
        return Err(HeadError::Invalid(
            "request target is not in origin or absolute form",
        ));
    }

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut host_seen = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut connection_upgrade = false;
    let mut upgrade_header = false;

    for field in req.headers.iter() {
        let name = field.name;
        let value = trim_ows(field.value);
        let name_range = range_of(buf, name.as_bytes());
        let value_range = range_of(buf, value);
        if name.eq_ignore_ascii_case("host") {
            if host_seen {
                return Err(HeadError::Invalid("more than one Host header"));
            }
            host_seen = true;
            out.host = Some(value_range.clone());
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HeadError::Framing("more than one Content-Length"));
            }
            content_length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked {
                return Err(HeadError::Framing("more than one Transfer-Encoding"));
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Framing("Transfer-Encoding other than chunked"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in split_list(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection_keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                }
                out.connection_names.push(range_of(buf, token));
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                out.expect_continue = true;
            } else {
                return Err(HeadError::Invalid("Expect value other than 100-continue"));
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_header = true;
        }
        out.headers.push(HeaderField {
            name: name_range,
            value: value_range,
        });
    }

    if version == Version::Http11 && !host_seen && absolute_host.is_none() {
        return Err(HeadError::Invalid("missing Host header"));
    }
    if absolute_host.is_some() {
        // RFC 9112 section 3.2.2: the target's authority wins over the Host header.
        out.host = absolute_host;
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::Framing(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if chunked && version == Version::Http10 {
        return Err(HeadError::Framing(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    out.framing = Some(match (chunked, content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(0)) | (false, None) => BodyFraming::Empty,
        (false, Some(n)) => BodyFraming::Length(n),
    });
    out.keep_alive = match version {
        Version::Http11 => !connection_close,
        Version::Http10 => connection_keep_alive && !connection_close,
    };
    out.upgrade = connection_upgrade && upgrade_header && version == Version::Http11;
    Ok(Some(()))
}

/// Parses a response head from the start of `buf`, for a request with method `HEAD` when
/// `head_request` is set.
///
/// # Errors
/// [`HeadError`] as for requests; the caller responds with 502.
pub fn parse_response(
    buf: &[u8],
    max_bytes: usize,
    head_request: bool,
    out: &mut ResponseHead,
) -> Result<Option<()>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let Some(head_len) = complete_head_len(res.parse(buf), buf, max_bytes, false)? else {
        return Ok(None);
    };

    out.head_len = head_len;
    out.headers.clear();
    out.connection_names.clear();
    out.keep_alive_timeout_secs = None;
    out.has_upgrade = false;
    let status = res.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err(HeadError::Invalid("status code out of range"));
    }
    out.status = status;
    out.reason = range_of(buf, res.reason.unwrap_or_default().as_bytes());
    let version = match res.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    out.version = Some(version);

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;

    for field in res.headers.iter() {
        let name = field.name;
        let value = trim_ows(field.value);
        let name_range = range_of(buf, name.as_bytes());
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HeadError::Framing("conflicting Content-Length values"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in split_list(value) {
                if chunked {
                    // chunked must be the final coding.
                    other_coding = true;
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    other_coding = true;
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in split_list(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection_keep_alive = true;
                }
                out.connection_names.push(range_of(buf, token));
            }
        } else if name.eq_ignore_ascii_case("keep-alive") {
            out.keep_alive_timeout_secs = parse_keep_alive_timeout(value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            out.has_upgrade = true;
        }
        out.headers.push(HeaderField {
            name: name_range,
            value: range_of(buf, value),
        });
    }

    if chunked && content_length.is_some() {
        return Err(HeadError::Framing(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    out.framing = Some(if no_body {
        BodyFraming::Empty
    } else if chunked && !other_coding {
        BodyFraming::Chunked
    } else if chunked || other_coding {
        BodyFraming::UntilClose
    } else {
        match content_length {
            Some(0) => BodyFraming::Empty,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    });
    out.keep_alive = match version {
        Version::Http11 => !connection_close,
        Version::Http10 => connection_keep_alive && !connection_close,
    } && out.framing() != BodyFraming::UntilClose;
    Ok(Some(()))
}

/// Turns an httparse result into the head length, `None` while incomplete, or the error.
/// Line endings are checked on the complete head, and also on a partial request head so that
/// a bare LF is rejected before the size limit is reached.
fn complete_head_len(
    parsed: httparse::Result<usize>,
    buf: &[u8],
    max_bytes: usize,
    check_partial: bool,
) -> Result<Option<usize>, HeadError> {
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_bytes {
                return Err(HeadError::TooLarge);
            }
            if check_partial {
                check_line_endings(buf, false)?;
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Invalid(httparse_reason(e))),
    };
    if head_len > max_bytes {
        return Err(HeadError::TooLarge);
    }
    check_line_endings(&buf[..head_len], true)?;
    Ok(Some(head_len))
}

/// Returns whether `name` is a hop-by-hop header that a proxy never forwards as is.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Returns whether the method is idempotent (RFC 9110 section 9.2.2), so a request that
/// failed before any response byte may be sent again.
pub fn is_idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Splits a comma-separated header value into trimmed, non-empty elements.
pub fn split_list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Removes leading and trailing optional whitespace (SP and HTAB only).
pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Rejects bare LF, lone CR and obs-fold. `complete` tells whether `head` ends with the blank
/// line; a partial head may end in the middle of a CRLF.
fn check_line_endings(head: &[u8], complete: bool) -> Result<(), HeadError> {
    let len = head.len();
    for i in memchr_iter(b'\n', head) {
        if i == 0 || head[i - 1] != b'\r' {
            return Err(HeadError::Invalid("bare LF line ending"));
        }
        if let Some(&next) = head.get(i + 1) {
            if next == b' ' || next == b'\t' {
                return Err(HeadError::Invalid("obsolete line folding"));
            }
        }
    }
    for i in memchr_iter(b'\r', head) {
        match head.get(i + 1) {
            Some(b'\n') => {}
            None if !complete && i + 1 == len => {}
            _ => return Err(HeadError::Invalid("CR not followed by LF")),
        }
    }
    Ok(())
}

fn memchr_iter(needle: u8, haystack: &[u8]) -> impl Iterator<Item = usize> + '_ {
    haystack
        .iter()
        .enumerate()
        .filter(move |(_, &b)| b == needle)
        .map(|(i, _)| i)
}

/// Parses a Content-Length value: 1 to 19 ASCII digits, nothing else (no sign, no list).
fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Framing("invalid Content-Length"));
    }
    let mut n: u64 = 0;
    for &d in value {
        n = n * 10 + u64::from(d - b'0');
    }
    Ok(n)
}

pub fn parse_keep_alive_timeout(value: &[u8]) -> Option<u64> {
    for param in split_list(value) {
        let Some(eq) = param.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, val) = (trim_ows(&param[..eq]), trim_ows(&param[eq + 1..]));
        if key.eq_ignore_ascii_case(b"timeout")
            && !val.is_empty()
            && val.len() <= 9
            && val.iter().all(u8::is_ascii_digit)
        {
            return std::str::from_utf8(val).ok()?.parse().ok();
        }
    }
    None
}

/// Splits `http://authority/path` into the authority and the path (which may be empty).
fn split_absolute_target(target: &str) -> Option<(&str, &str)> {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some((authority, path))
}

/// Returns the range of `part` inside `buf`; `part` must be a sub-slice of `buf`.
fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    let start = start.min(buf.len());
    start..(start + part.len()).min(buf.len())
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status line",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<Option<RequestHead>, HeadError> {
        let mut head = RequestHead::default();
        parse_request(raw.as_bytes(), 16 * 1024, &mut head).map(|o| o.map(|()| head))
    }

    fn framing_of(raw: &str) -> BodyFraming {
        req(raw).unwrap().unwrap().framing()
    }

    #[test]
    fn request_simple_get() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:8443\r\n\r\n";
        let head = req(raw).unwrap().unwrap();
        assert_eq!(&raw[head.path_and_query.clone()], "/a?b=1");
        assert_eq!(&raw[head.host.clone().unwrap()], "Example.COM:8443");
        assert_eq!(head.framing(), BodyFraming::Empty);
        assert!(head.keep_alive);
    }

    #[test]
    fn request_partial_needs_more() {
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert!(req("GET / HTTP/1.1\r\nHost: a\r").unwrap().is_none());
    }

    #[test]
    fn request_framing_rejections() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 34\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(req(raw), Err(HeadError::Framing(_))),
                "accepted: {raw:?}"
            );
        }
    }

    #[test]
    fn request_syntax_rejections() {
        let cases = [
            "GET / HTTP/1.1\nHost: t\n\n",
            "GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : t\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\n:\r\nContent-Length: 27\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
            "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(req(raw), Err(HeadError::Invalid(_))),
                "accepted: {raw:?}"
            );
        }
    }

    #[test]
    fn request_connect_not_allowed() {
        let raw = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        assert!(matches!(req(raw), Err(HeadError::MethodNotAllowed(_))));
    }

    #[test]
    fn request_too_large() {
        let mut head = RequestHead::default();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(
            parse_request(raw.as_bytes(), 64, &mut head),
            Err(HeadError::TooLarge)
        );
        let many: String = (0..200).map(|i| format!("X{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(
            parse_request(raw.as_bytes(), 1 << 20, &mut head),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn request_body_framings() {
        let chunked = "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(framing_of(chunked), BodyFraming::Chunked);
        let length = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(framing_of(length), BodyFraming::Length(12));
        let zero = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing_of(zero), BodyFraming::Empty);
    }

    #[test]
    fn request_connection_semantics() {
        let raw = "GET / HTTP/1.0\r\nHost: t\r\n\r\n";
        assert!(!req(raw).unwrap().unwrap().keep_alive);
        let raw = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert!(req(raw).unwrap().unwrap().keep_alive);
        let raw = "GET / HTTP/1.1\r\nHost: t\r\nConnection: close, X-Foo\r\n\r\n";
        let head = req(raw).unwrap().unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.connection_names.len(), 2);
        let raw =
            "GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(req(raw).unwrap().unwrap().upgrade);
        let raw = "PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n";
        assert!(req(raw).unwrap().unwrap().expect_continue);
    }

    #[test]
    fn request_absolute_form_target() {
        let raw = "GET http://a.test/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        let head = req(raw).unwrap().unwrap();
        assert_eq!(&raw[head.host.clone().unwrap()], "a.test");
        assert_eq!(&raw[head.path_and_query.clone()], "/x?y");
    }

    fn res(raw: &str, head_request: bool) -> Result<Option<ResponseHead>, HeadError> {
        let mut head = ResponseHead::default();
        parse_response(raw.as_bytes(), 16 * 1024, head_request, &mut head).map(|o| o.map(|()| head))
    }

    #[test]
    fn response_framings() {
        let r = res("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert_eq!(r.unwrap().unwrap().framing(), BodyFraming::Length(5));
        let r = res("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(r.unwrap().unwrap().framing(), BodyFraming::Empty);
        let r = res("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.unwrap().unwrap().framing(), BodyFraming::Empty);
        let r = res(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.unwrap().unwrap().framing(), BodyFraming::Chunked);
        let r = res("HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(r.framing(), BodyFraming::UntilClose);
        assert!(!r.keep_alive);
        let r = res("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!(r.unwrap().unwrap().framing(), BodyFraming::UntilClose);
    }

    #[test]
    fn response_ambiguous_framing_rejected() {
        let r = res(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(matches!(r, Err(HeadError::Framing(_))));
        let r = res(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            false,
        );
        assert!(matches!(r, Err(HeadError::Framing(_))));
    }

    #[test]
    fn response_keep_alive_timeout() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKeep-Alive: timeout=5, max=100\r\n\r\n";
        let r = res(raw, false).unwrap().unwrap();
        assert_eq!(r.keep_alive_timeout_secs, Some(5));
        assert!(r.keep_alive);
    }

    #[test]
    fn hop_by_hop_names() {
        assert!(is_hop_by_hop(b"Connection"));
        assert!(is_hop_by_hop(b"TE"));
        assert!(!is_hop_by_hop(b"Host"));
    }
}
