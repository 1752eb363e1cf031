//! Our small HTTP/1.1 layer: sans-IO pieces on top of `httparse`.
//!
//! - [`chunked`]: an incremental decoder of `Transfer-Encoding: chunked`
//!   bodies that hands out borrowed slices of the input (no copy).
//! - [`query`]: percent-encoding of query values, and finding one in a
//!   request target.
//! - [`request`]: request heads as a server reads them (limits, body
//!   framing, keep-alive) and the responses it writes.
//! - [`response`]: splits a whole response (as read to EOF) into status,
//!   headers and body; the etcd client uses it.

pub mod chunked;
pub mod query;
pub mod request;
pub mod response;

/// Why bytes are not valid HTTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP head: {0}")]
    Head(String),
    #[error("the HTTP head is incomplete")]
    IncompleteHead,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    #[error("the body ended early ({0})")]
    Truncated(&'static str),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
}
