//! Percent-encoding of query values, both ways, and the lookup of one
//! parameter in a request target (`/metadata?key=mooncake%2Fram%2Fx`).
//!
//! Encoding keeps only RFC 3986's unreserved characters as they are (what
//! libcurl's `curl_easy_escape` does, so keys look the same on the wire as
//! Mooncake's). Decoding also reads `+` as a space, as form encoding does.

/// `text` with every byte but `A-Z a-z 0-9 - . _ ~` written as `%XX`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a query value cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("a % not followed by two hex digits")]
    BadEscape,
    #[error("the decoded value is not UTF-8")]
    NotUtf8,
}

/// Decodes `%XX` escapes and `+`.
pub fn unescape(text: &str) -> Result<String, QueryError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(QueryError::BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| QueryError::BadEscape)?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return Err(QueryError::BadEscape);
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| QueryError::BadEscape)?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// Splits a request target into its path and its query (without the `?`).
pub fn split_target(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

/// The decoded value of the first parameter `name` in `query`, if any.
pub fn param(query: &str, name: &str) -> Result<Option<String>, QueryError> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if unescape(k)? == name {
            return unescape(v).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_as_curl_does_and_come_back() {
        let key = "mooncake/rpc_meta/127.0.0.1:12345";
        assert_eq!(escape(key), "mooncake%2Frpc_meta%2F127.0.0.1%3A12345");
        assert_eq!(unescape(&escape(key)).unwrap(), key);
        let odd = "a b+c&d=e%f/é~";
        assert_eq!(unescape(&escape(odd)).unwrap(), odd);
        assert_eq!(unescape("a+b%20c").unwrap(), "a b c");
    }

    #[test]
    fn bad_escapes_are_errors() {
        for bad in ["%", "%2", "%zz", "a%2", "%+1", "%é"] {
            assert_eq!(unescape(bad), Err(QueryError::BadEscape), "{bad:?}");
        }
        assert_eq!(unescape("%ff"), Err(QueryError::NotUtf8));
    }

    #[test]
    fn parameters_are_found_in_targets() {
        let (path, query) = split_target("/metadata?x=1&key=mooncake%2Fram%2Fa&key=second");
        assert_eq!(path, "/metadata");
        assert_eq!(param(query, "key").unwrap().as_deref(), Some("mooncake/ram/a"));
        assert_eq!(param(query, "nope").unwrap(), None);
        assert_eq!(param("key", "key").unwrap().as_deref(), Some(""));
        assert_eq!(split_target("/metadata"), ("/metadata", ""));
        assert_eq!(param("", "key").unwrap(), None);
    }
}
