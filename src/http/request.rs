//! Request heads, as a server reads them, and the responses it writes.
//!
//! [`parse_head`] takes the bytes read so far and returns the head once it
//! is complete: method, path, version, the headers we act on, and how the
//! body is framed. Limits: the head's size and its number of fields.

use super::HttpError;

/// Most bytes of a request head (request line and fields).
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Most header fields.
pub const FIELDS_MAX: usize = 64;

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Chunked,
    Length(u64),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub fields: Vec<(String, String)>,
    pub framing: BodyFraming,
    /// The connection stays open after the response.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before the body.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The first field named `name` (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why a head is refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HeadError {
    pub status: u16,
    pub message: String,
}

impl HeadError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HeadError { status, message: message.into() }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` until it is
/// complete, then the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS_MAX];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= HEAD_BYTES_MAX {
                return Err(HeadError::new(431, format!("request head above {HEAD_BYTES_MAX} bytes")));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::new(431, format!("more than {FIELDS_MAX} header fields")));
        }
        Err(e) => return Err(HeadError::new(400, format!("malformed request head: {e}"))),
    };
    if len > HEAD_BYTES_MAX {
        return Err(HeadError::new(431, format!("request head above {HEAD_BYTES_MAX} bytes")));
    }
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    let minor = req.version.unwrap_or(1);
    let mut out = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let v =
            std::str::from_utf8(h.value).map_err(|_| HeadError::new(400, format!("field {} is not UTF-8", h.name)))?;
        out.push((h.name.to_string(), v.trim().to_string()));
    }
    let mut head = RequestHead {
        method,
        path,
        minor,
        fields: out,
        framing: BodyFraming::None,
        keep_alive: minor >= 1,
        expect_continue: false,
    };
    let te = head.field("transfer-encoding").map(str::to_ascii_lowercase);
    let cl = head.field("content-length");
    head.framing = match (te, cl) {
        (Some(_), Some(_)) => return Err(HeadError::new(400, "both Transfer-Encoding and Content-Length")),
        (Some(te), None) => {
            if te.rsplit(',').next().map(str::trim) != Some("chunked") {
                return Err(HeadError::new(501, format!("unsupported Transfer-Encoding {te:?}")));
            }
            BodyFraming::Chunked
        }
        (None, Some(cl)) => BodyFraming::Length(
            cl.parse::<u64>().map_err(|_| HeadError::new(400, format!("bad Content-Length {cl:?}")))?,
        ),
        (None, None) => BodyFraming::None,
    };
    if let Some(c) = head.field("connection").map(str::to_ascii_lowercase) {
        if c.split(',').any(|t| t.trim() == "close") {
            head.keep_alive = false;
        } else if c.split(',').any(|t| t.trim() == "keep-alive") {
            head.keep_alive = true;
        }
    }
    head.expect_continue = head.field("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    Ok(Some((head, len)))
}

/// The reason phrase of the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A request head as a client writes it: the request line, the fields in
/// order, and the blank line. Names and values must not hold CR or LF
/// (they would end the head early); those are refused.
pub fn write_head(method: &str, path: &str, fields: &[(&str, &str)]) -> Result<Vec<u8>, HttpError> {
    let bad = |t: &str| t.contains(['\r', '\n']);
    if bad(method) || bad(path) || path.contains(' ') || method.is_empty() {
        return Err(HttpError::Head(format!("cannot write {method:?} {path:?} as a request line")));
    }
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in fields {
        if bad(name) || bad(value) || name.is_empty() || name.contains(':') {
            return Err(HttpError::Head(format!("cannot write the field {name:?}: {value:?}")));
        }
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    Ok(out.into_bytes())
}

/// A whole response with a JSON or empty body.
pub fn response(status: u16, body: &str, keep_alive: bool) -> Vec<u8> {
    response_typed(status, "application/json", body, keep_alive)
}

/// A whole response whose body (if any) has `content_type`.
pub fn response_typed(status: u16, content_type: &str, body: &str, keep_alive: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n", reason(status), body.len());
    if !body.is_empty() {
        out.push_str("Content-Type: ");
        out.push_str(content_type);
        out.push_str("\r\n");
    }
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// Checks that `raw` is exactly one response to `parse` (used in tests and
/// by clients that read statuses).
pub fn status_of(raw: &[u8]) -> Result<Option<(u16, usize)>, HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS_MAX];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((resp.code.unwrap_or(0), n))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HttpError::Head(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_their_framing() {
        let raw =
            b"PUT /v1/objstream/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nAis-Session-Id: 101\r\n\r\nbody";
        assert_eq!(parse_head(&raw[..20]), Ok(None));
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(n, raw.len() - 4);
        assert_eq!((h.method.as_str(), h.path.as_str(), h.framing), ("PUT", "/v1/objstream/x", BodyFraming::Chunked));
        assert_eq!(h.field("ais-session-id"), Some("101"));
        assert!(h.keep_alive && !h.expect_continue);

        let (h, _) =
            parse_head(b"PUT / HTTP/1.0\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Length(12));
        assert!(!h.keep_alive && h.expect_continue);
        let (h, _) = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::None);
        assert!(!h.keep_alive);
    }

    #[test]
    fn bad_heads_get_their_status() {
        let status = |raw: &[u8]| parse_head(raw).unwrap_err().status;
        assert_eq!(status(b"PUT /\x01 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), 501);
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(status(format!("PUT / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
        let long = format!("PUT / HTTP/1.1\r\nX: {}\r\n", "v".repeat(HEAD_BYTES_MAX));
        assert_eq!(status(long.as_bytes()), 431);
    }

    #[test]
    fn written_heads_parse_back_and_injection_is_refused() {
        let head = write_head("PUT", "/v1/objstream/t", &[("Host", "h:1"), ("Transfer-Encoding", "chunked")]).unwrap();
        let (h, n) = parse_head(&head).unwrap().unwrap();
        assert_eq!((n, h.method.as_str(), h.framing), (head.len(), "PUT", BodyFraming::Chunked));
        assert_eq!(h.field("host"), Some("h:1"));
        assert!(write_head("PUT", "/a b", &[]).is_err());
        assert!(write_head("PUT", "/", &[("X", "1\r\nEvil: 2")]).is_err());
        assert!(write_head("PUT", "/", &[("X:Y", "1")]).is_err());
    }

    #[test]
    fn responses_read_back() {
        let r = response(400, "{\"x\":1}", false);
        assert_eq!(status_of(&r).unwrap(), Some((400, r.len() - 7)));
        assert!(String::from_utf8(r).unwrap().contains("Connection: close\r\n"));
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
    }
}
