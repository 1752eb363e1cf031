//! HTTP/1.1 responses as a client reads them: the head (through
//! `httparse`), and the body framed by `Content-Length`, chunked encoding,
//! or the end of the connection. [`take`] reads one response from bytes
//! that keep arriving (keep-alive), [`parse`] a whole one read to EOF.

use super::{HttpError, chunked};

/// Most header fields accepted in a response.
pub const HEADERS_MAX: usize = 48;

/// A parsed response; the body is decoded (de-chunked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// How a response's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// None at all (1xx, 204, 304).
    Empty,
    Length(usize),
    Chunked,
    /// To the end of the connection.
    ToEof,
}

/// A response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// `Connection: close`: the server closes after this response.
    pub close: bool,
    /// Bytes of the head.
    pub len: usize,
}

/// The head at the start of `raw`, once it is complete.
pub fn parse_head(raw: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut head = httparse::Response::new(&mut headers);
    let len = match head.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Head(e.to_string())),
    };
    let status = head.code.ok_or_else(|| HttpError::Head("no status code".into()))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    let mut close = head.version == Some(0);
    for h in head.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Head(format!("{} is not text", h.name)))?;
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.rsplit(',').next().unwrap_or("").trim().eq_ignore_ascii_case("chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = value.trim().parse::<usize>().map_err(|_| HttpError::Head("bad Content-Length".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(HttpError::Head("conflicting Content-Length fields".into()));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            close = v.contains("close") || (close && !v.contains("keep-alive"));
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        length.map_or(Framing::ToEof, Framing::Length)
    };
    Ok(Some(Head { status, framing, close, len }))
}

/// Parses a complete response (as read to EOF). `body_max` bounds the
/// decoded body.
pub fn parse(raw: &[u8], body_max: usize) -> Result<Response, HttpError> {
    match take(raw, true, body_max)? {
        Some((head, body, _)) => Ok(Response { status: head.status, body }),
        None => Err(HttpError::IncompleteHead),
    }
}

/// Takes one response from the front of `raw`, if it is all there: its
/// head, its decoded body, and the bytes it used. `at_eof` says the
/// connection has ended (a body framed by the end is then complete).
pub fn take(raw: &[u8], at_eof: bool, body_max: usize) -> Result<Option<(Head, Vec<u8>, usize)>, HttpError> {
    let Some(head) = parse_head(raw)? else {
        return if at_eof && !raw.is_empty() { Err(HttpError::IncompleteHead) } else { Ok(None) };
    };
    let rest = &raw[head.len..];
    match head.framing {
        Framing::Empty => Ok(Some((head, Vec::new(), head.len))),
        Framing::Length(n) => {
            if n > body_max {
                return Err(HttpError::TooLarge(body_max));
            }
            match rest.get(..n) {
                Some(body) => Ok(Some((head, body.to_vec(), head.len + n))),
                None if at_eof => Err(HttpError::Truncated("body shorter than its Content-Length")),
                None => Ok(None),
            }
        }
        Framing::ToEof if at_eof => {
            if rest.len() > body_max {
                return Err(HttpError::TooLarge(body_max));
            }
            Ok(Some((head, rest.to_vec(), raw.len())))
        }
        Framing::ToEof => {
            if rest.len() > body_max {
                return Err(HttpError::TooLarge(body_max));
            }
            Ok(None)
        }
        Framing::Chunked => {
            let mut decoder = chunked::Decoder::new();
            let (mut used, mut body) = (0, Vec::new());
            loop {
                let (n, step) = decoder.step(&rest[used..])?;
                used += n;
                match step {
                    chunked::Step::Data(d) => {
                        if body.len() + d.len() > body_max {
                            return Err(HttpError::TooLarge(body_max));
                        }
                        body.extend_from_slice(d);
                    }
                    chunked::Step::Done => return Ok(Some((head, body, head.len + used))),
                    chunked::Step::NeedMore if at_eof => return Err(HttpError::Truncated("chunked body")),
                    chunked::Step::NeedMore => return Ok(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_taken_one_at_a_time_as_bytes_arrive() {
        let two =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nokNEXT";
        for cut in 0..two.len() {
            let r = take(&two[..cut], false, 64).unwrap();
            if cut < 25 {
                assert!(r.is_none(), "cut {cut}");
            }
        }
        let (h, body, used) = take(two, false, 64).unwrap().unwrap();
        assert_eq!((h.status, h.framing, body.len(), used), (100, Framing::Empty, 0, 25));
        let (h, body, used) = take(&two[25..], false, 64).unwrap().unwrap();
        assert_eq!((h.status, h.close, body.as_slice()), (200, true, &b"ok"[..]));
        assert_eq!(&two[25 + used..], b"NEXT");
        // Framed by the end: complete only at EOF.
        let to_eof = b"HTTP/1.1 400 Bad\r\n\r\n{\"m\":1}";
        assert_eq!(take(to_eof, false, 64).unwrap(), None);
        assert_eq!(take(to_eof, true, 64).unwrap().unwrap().1, b"{\"m\":1}");
        assert!(take(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", true, 64).is_err());
        assert!(take(b"HTTP/1.1 200", true, 64).is_err(), "a head cut by the end");
        assert_eq!(take(b"", true, 64).unwrap(), None);
        assert!(parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap().close, "1.0 closes by default");
    }

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
