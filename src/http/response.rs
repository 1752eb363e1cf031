//! A whole HTTP/1.1 response, as read to EOF from a `Connection: close`
//! request: status, headers (through `httparse`) and the body, framed by
//! `Content-Length`, chunked encoding, or the end of the bytes.

use super::{HttpError, chunked};

/// Most header fields accepted in a response.
pub const HEADERS_MAX: usize = 48;

/// A parsed response; the body is decoded (de-chunked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Parses a complete response. `body_max` bounds the decoded body.
pub fn parse(raw: &[u8], body_max: usize) -> Result<Response, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HttpError::IncompleteHead),
        Err(e) => return Err(HttpError::Head(e.to_string())),
    };
    let status = head.code.ok_or_else(|| HttpError::Head("no status code".into()))?;
    let mut chunked_body = false;
    let mut length: Option<usize> = None;
    for h in head.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked_body = std::str::from_utf8(h.value)
                .map(|v| v.rsplit(',').next().unwrap_or("").trim().eq_ignore_ascii_case("chunked"))
                .unwrap_or(false);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| HttpError::Head("bad Content-Length".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(HttpError::Head("conflicting Content-Length fields".into()));
            }
            length = Some(n);
        }
    }
    let rest = &raw[head_len..];
    let body = if chunked_body {
        chunked::decode_all(rest, body_max)?
    } else {
        let n = length.unwrap_or(rest.len());
        if n > body_max {
            return Err(HttpError::TooLarge(body_max));
        }
        rest.get(..n).ok_or(HttpError::Truncated("body shorter than its Content-Length"))?.to_vec()
    };
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing", 64).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n", 64);
        assert_eq!(r.unwrap().body, b"{\"a\":1}");
        let r = parse(b"HTTP/1.0 404 Not Found\r\n\r\nto the end", 64).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"to the end"[..]));
    }

    #[test]
    fn rejects_bad_responses() {
        assert!(matches!(parse(b"garbage\r\n\r\n", 64), Err(HttpError::Head(_))));
        assert!(matches!(parse(b"HTTP/1.1 x\r\n\r\n", 64), Err(HttpError::Head(_))));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n", 64).unwrap_err(), HttpError::IncompleteHead);
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}", 64), Err(HttpError::Truncated(_))));
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", 64), Err(HttpError::Head(_))));
        let conflict = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(parse(conflict, 64), Err(HttpError::Head(_))));
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n123456789", 4).unwrap_err(),
            HttpError::TooLarge(4)
        );
        let many: String = (0..HEADERS_MAX + 1).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(parse(raw.as_bytes(), 64), Err(HttpError::Head(_))));
    }
}
