//! RESP2, the redis protocol, sans-IO: [`encode`] writes a command (an
//! array of bulk strings), [`decode`] reads one reply from the front of
//! the bytes received so far, or says it needs more.
//!
//! Replies are small here (`OK`, a descriptor, an integer), so [`decode`]
//! re-reads from the start of the buffer each time more bytes arrive
//! rather than keeping a partial parse; the limits in [`Limits`] bound
//! that work, and everything else a reply may claim (lengths, counts,
//! depth) before any memory is set aside for it.

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`: the server refused the command.
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc`, or `$-1` (nil: no such key).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...`, or `*-1` (nil).
    Array(Option<Vec<Reply>>),
}

/// Why bytes are not a RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("unknown reply type byte {0:#04x}")]
    UnknownType(u8),
    #[error("a line not ended by CRLF")]
    BadLine,
    #[error("a bad length or integer {0:?}")]
    BadNumber(String),
    #[error("a line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("a bulk string of {0} bytes, above the limit of {1}")]
    BulkTooLarge(u64, usize),
    #[error("an array of {0} elements, above the limit of {1}")]
    ArrayTooLong(u64, usize),
    #[error("arrays nested deeper than {0}")]
    TooDeep(usize),
    #[error("a simple string or error that is not UTF-8")]
    NotUtf8,
}

/// What a reply may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub bulk_bytes_max: usize,
    pub array_len_max: usize,
    pub depth_max: usize,
    /// Of a simple string, an error, or a length line.
    pub line_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { bulk_bytes_max: 64 << 20, array_len_max: 1024, depth_max: 4, line_bytes_max: 64 << 10 }
    }
}

/// A command as redis reads it: an array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let len: usize = args.iter().map(|a| a.len() + 16).sum();
    let mut out = Vec::with_capacity(len + 16);
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One reply from the front of `buf` and the bytes it used, or `None` if
/// `buf` holds only part of one.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Reply, usize)>, RespError> {
    let mut at = 0;
    Ok(parse(buf, &mut at, limits, 0)?.map(|r| (r, at)))
}

/// The line starting at `*at` (without CRLF), moving `*at` past it.
fn line<'a>(buf: &'a [u8], at: &mut usize, limits: &Limits) -> Result<Option<&'a [u8]>, RespError> {
    let rest = &buf[*at..];
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return if rest.len() > limits.line_bytes_max {
            Err(RespError::LineTooLong(limits.line_bytes_max))
        } else {
            Ok(None)
        };
    };
    if cr > limits.line_bytes_max {
        return Err(RespError::LineTooLong(limits.line_bytes_max));
    }
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => {
            *at += cr + 2;
            Ok(Some(&rest[..cr]))
        }
        Some(_) => Err(RespError::BadLine),
    }
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    let bad = || RespError::BadNumber(String::from_utf8_lossy(text).into_owned());
    let s = std::str::from_utf8(text).map_err(|_| bad())?;
    // Only digits and a leading minus: `+5` and ` 5` are not redis's.
    if s.is_empty() || !s.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) || s.starts_with("--") {
        return Err(bad());
    }
    s.parse::<i64>().map_err(|_| bad())
}

fn parse(buf: &[u8], at: &mut usize, limits: &Limits, depth: usize) -> Result<Option<Reply>, RespError> {
    let Some(&kind) = buf.get(*at) else { return Ok(None) };
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(RespError::UnknownType(kind));
    }
    *at += 1;
    let Some(text) = line(buf, at, limits)? else { return Ok(None) };
    let utf8 = |t: &[u8]| String::from_utf8(t.to_vec()).map_err(|_| RespError::NotUtf8);
    match kind {
        b'+' => Ok(Some(Reply::Simple(utf8(text)?))),
        b'-' => Ok(Some(Reply::Error(utf8(text)?))),
        b':' => Ok(Some(Reply::Integer(number(text)?))),
        b'$' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some(Reply::Bulk(None)));
            }
            let n = u64::try_from(n).map_err(|_| RespError::BadNumber(n.to_string()))?;
            if n > limits.bulk_bytes_max as u64 {
                return Err(RespError::BulkTooLarge(n, limits.bulk_bytes_max));
            }
            let n = n as usize;
            let Some(data) = buf.get(*at..*at + n + 2) else { return Ok(None) };
            if &data[n..] != b"\r\n" {
                return Err(RespError::BadLine);
            }
            *at += n + 2;
            Ok(Some(Reply::Bulk(Some(data[..n].to_vec()))))
        }
        _ => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some(Reply::Array(None)));
            }
            let n = u64::try_from(n).map_err(|_| RespError::BadNumber(n.to_string()))?;
            if n > limits.array_len_max as u64 {
                return Err(RespError::ArrayTooLong(n, limits.array_len_max));
            }
            if depth >= limits.depth_max {
                return Err(RespError::TooDeep(limits.depth_max));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                match parse(buf, at, limits, depth + 1)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            Ok(Some(Reply::Array(Some(items))))
        }
    }
}

/// For the fuzz target: any bytes, whole and cut at every length, never
/// panic, and a reply found whole is found the same in any longer prefix.
pub fn fuzz(data: &[u8]) {
    let limits = Limits { bulk_bytes_max: 1 << 16, array_len_max: 64, depth_max: 4, line_bytes_max: 256 };
    let whole = decode(data, &limits);
    if let Ok(Some((_, used))) = &whole {
        assert!(*used <= data.len());
        assert_eq!(decode(&data[..*used], &limits), whole, "the reply needs only its own bytes");
    }
    // Cut anywhere, the decoder waits or reaches the same verdict; it never
    // reports a different reply.
    for cut in 0..data.len().min(512) {
        match decode(&data[..cut], &limits) {
            Ok(None) | Err(_) => {}
            Ok(Some(r)) => assert_eq!(Ok(Some(r)), whole),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    /// Every reply, fed cut at every byte: nothing until the last byte,
    /// then the reply and its length.
    #[test]
    fn replies_decode_at_every_split() {
        let cases: Vec<(&[u8], Reply)> = vec![
            (b"+OK\r\n", Reply::Simple("OK".into())),
            (
                b"-WRONGPASS invalid username-password pair\r\n",
                Reply::Error("WRONGPASS invalid username-password pair".into()),
            ),
            (b":-42\r\n", Reply::Integer(-42)),
            (b"$5\r\nab\r\nc\r\n", Reply::Bulk(Some(b"ab\r\nc".to_vec()))),
            (b"$0\r\n\r\n", Reply::Bulk(Some(Vec::new()))),
            (b"$-1\r\n", Reply::Bulk(None)),
            (b"*-1\r\n", Reply::Array(None)),
            (b"*0\r\n", Reply::Array(Some(vec![]))),
            (
                b"*3\r\n:1\r\n$1\r\nx\r\n*1\r\n+y\r\n",
                Reply::Array(Some(vec![
                    Reply::Integer(1),
                    Reply::Bulk(Some(b"x".to_vec())),
                    Reply::Array(Some(vec![Reply::Simple("y".into())])),
                ])),
            ),
        ];
        for (bytes, want) in cases {
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut], &lim()), Ok(None), "{bytes:?} cut at {cut}");
            }
            let mut more = bytes.to_vec();
            more.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(decode(&more, &lim()), Ok(Some((want, bytes.len()))), "{bytes:?}");
        }
    }

    #[test]
    fn bad_replies_are_errors() {
        let err = |b: &[u8]| decode(b, &lim()).unwrap_err();
        assert_eq!(err(b"!x\r\n"), RespError::UnknownType(b'!'));
        assert_eq!(err(b"+OK\rx"), RespError::BadLine);
        assert!(matches!(err(b":12a\r\n"), RespError::BadNumber(_)));
        assert!(matches!(err(b":+5\r\n"), RespError::BadNumber(_)));
        assert!(matches!(err(b":\r\n"), RespError::BadNumber(_)));
        assert!(matches!(err(b"$-2\r\n"), RespError::BadNumber(_)));
        assert!(matches!(err(b"*--1\r\n"), RespError::BadNumber(_)));
        assert!(matches!(err(b":99999999999999999999\r\n"), RespError::BadNumber(_)));
        assert_eq!(err(b"$3\r\nabcd\r\n"), RespError::BadLine);
        assert_eq!(err(b"+\xff\r\n"), RespError::NotUtf8);
        let small = Limits { bulk_bytes_max: 4, array_len_max: 2, depth_max: 2, line_bytes_max: 8 };
        assert_eq!(decode(b"$5\r\n", &small), Err(RespError::BulkTooLarge(5, 4)));
        assert_eq!(decode(b"*3\r\n", &small), Err(RespError::ArrayTooLong(3, 2)));
        assert_eq!(decode(b"*1\r\n*1\r\n*1\r\n", &small), Err(RespError::TooDeep(2)));
        assert_eq!(decode(b"+123456789", &small), Err(RespError::LineTooLong(8)));
        assert_eq!(decode(b"+123456789\r\n", &small), Err(RespError::LineTooLong(8)));
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(encode(&[b"SET", b"a b", b""]), b"*3\r\n$3\r\nSET\r\n$3\r\na b\r\n$0\r\n\r\n");
        // What we write, we read (as an array of bulk strings).
        let cmd = encode(&[b"x\r\n", b"y"]);
        let want = Reply::Array(Some(vec![Reply::Bulk(Some(b"x\r\n".to_vec())), Reply::Bulk(Some(b"y".to_vec()))]));
        assert_eq!(decode(&cmd, &lim()), Ok(Some((want, cmd.len()))));
    }

    /// The fuzz target over generated inputs: valid replies and their
    /// mutants.
    #[test]
    fn the_fuzz_target_holds_on_generated_inputs() {
        let seeds: [&[u8]; 6] = [
            b"*3\r\n$1\r\na\r\n:5\r\n*1\r\n$-1\r\n",
            b"$-1\r\n",
            b"-ERR x\r\n+OK\r\n",
            b"*9\r\n",
            b"$4\r\n\r\n\r\n\r\n",
            b"",
        ];
        for seed in seeds {
            for m in crate::proto::mutants(seed, &[0, b'\r', b'\n', b'-', b'9', b'*', b'$', 0xff]) {
                fuzz(&m);
            }
        }
    }
}
