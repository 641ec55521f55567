//! The little of HTTP/1.1 the control socket speaks: one request per connection (`Connection:
//! close`), a `Content-Length` body or none, JSON or Prometheus text back.
//!
//! Hand-written rather than a server crate: the control socket serves one local client at a
//! time with a handful of routes, and hyper or tiny_http would bring their own threads, buffers
//! and a few hundred KiB of code to every VM that asks for a socket. What a client sends is
//! bounded before it is stored: [`MAX_HEAD`] bytes of request line and headers, [`MAX_BODY`] of
//! body; anything else is a [`HttpError`] that becomes a 4xx answer.

use std::io::{self, Read, Write};

/// The longest request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// The longest body (a snapshot request is a path).
pub const MAX_BODY: usize = 64 << 10;

/// One request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, … as sent.
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed or closed early.
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
    /// The head or the body is longer than allowed.
    #[error("request too large")]
    TooLarge,
    /// Not HTTP/1.x as this server takes it.
    #[error("bad request: {0}")]
    Malformed(&'static str),
}

impl HttpError {
    /// The status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Io(_) | HttpError::Malformed(_) => 400,
            HttpError::TooLarge => 413,
        }
    }
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    // Byte by byte up to the blank line: the body must stay in the stream, and heads are tiny.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        if stream.read(&mut byte)? == 0 {
            return Err(HttpError::Malformed(
                "the connection closed inside the head",
            ));
        }
        head.push(byte[0]);
    }
    let head = std::str::from_utf8(&head).map_err(|_| HttpError::Malformed("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("only HTTP/1.x"));
    }
    if method.is_empty() || !target.starts_with('/') {
        return Err(HttpError::Malformed("method or path"));
    }
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header without a colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| HttpError::Malformed("Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed("Transfer-Encoding is not supported"));
        }
    }
    if length > MAX_BODY {
        return Err(HttpError::TooLarge);
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

/// The reason phrase for the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a whole response and asks the client to close.
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Reads a response's status and body (the `ember ctl` side).
pub fn read_response(stream: &mut impl Read) -> io::Result<(u16, Vec<u8>)> {
    let mut all = Vec::new();
    stream
        .take((MAX_HEAD + (16 << 20)) as u64)
        .read_to_end(&mut all)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&all[..split]).map_err(|_| bad())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, all[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn requests_curl_sends_are_read() {
        let r = parse(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/vm"));
        assert!(r.body.is_empty());
        let r = parse(
            b"PUT /vm/snapshot?x=1 HTTP/1.1\r\ncontent-length: 13\r\n\r\n{\"dir\":\"/s\"}\nEXTRA",
        )
        .unwrap();
        assert_eq!(r.path, "/vm/snapshot");
        assert_eq!(r.body, b"{\"dir\":\"/s\"}\n");
    }

    #[test]
    fn hostile_requests_are_refused_within_bounds() {
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"GET /vm HTTP/1.1\r\n".to_vec(),
            b"GET /vm\r\n\r\n".to_vec(),
            b"GET vm HTTP/1.1\r\n\r\n".to_vec(),
            b"GET /vm SPDY/3\r\n\r\n".to_vec(),
            b"GET /vm HTTP/1.1 extra\r\n\r\n".to_vec(),
            b"GET /vm HTTP/1.1\r\nbroken header\r\n\r\n".to_vec(),
            b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            b"GET /\xff HTTP/1.1\r\n\r\n".to_vec(),
        ];
        for raw in cases {
            let e = parse(&raw).unwrap_err();
            assert_eq!(e.status(), 400, "{raw:?}: {e}");
        }
        let huge_body = format!(
            "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse(huge_body.as_bytes()).unwrap_err().status(), 413);
        let mut endless_head = b"GET /vm HTTP/1.1\r\n".to_vec();
        endless_head.extend(std::iter::repeat_n(b'a', MAX_HEAD * 2));
        assert_eq!(parse(&endless_head).unwrap_err().status(), 413);
    }

    #[test]
    fn a_response_round_trips() {
        let mut out = Vec::new();
        write_response(&mut out, 404, "application/json", b"{\"error\":\"x\"}").unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Length: 13\r\n"));
        assert_eq!(
            read_response(&mut &out[..]).unwrap(),
            (404, b"{\"error\":\"x\"}".to_vec())
        );
    }
}
