//! AIStore's object-stream wire format ("objstream"), sans-IO.
//!
//! A stream is one HTTP PUT whose body is a run of frames. Every frame
//! starts with a 16-byte proto header (length and flags, then a hash of
//! them); an object is a header frame followed by its bytes, raw (sized
//! streams) or in PDUs of at most 128 KiB (PDU streams, which allow
//! unsized objects); a header-only frame with opcode [`OPC_FIN`] ends the
//! stream. The body may be one LZ4 frame around all of it.
//!
//! - [`hash`]: the proto header's check word.
//! - [`header`]: the object header ([`ObjHdr`]) and its codec.
//! - [`checksum`]: the header's object checksum (AIStore's types), and
//!   its verification as the bytes stream through.
//! - [`frame`]: proto headers, object frames, PDU headers, the Fin frame.
//! - [`decoder`]: the receive side's frame state machine.
//! - [`lz4`] (with [`xxh32`]): LZ4 frames, as AIStore writes them.
//! - [`body`]: a request body end to end: HTTP framing, LZ4, frames.
//! - [`error`]: stream breakage, with AIStore's `sbr_*` codes.

pub mod body;
pub mod checksum;
pub mod decoder;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod hash;
pub mod header;
pub mod lz4;
pub mod xxh32;

pub use body::{BodyDecoder, BodyEvent, Framing};
pub use checksum::{ChecksumError, CksumType, Verdict};
pub use decoder::{Decoder, Event};
pub use error::{SbrCode, SbrError};
pub use header::{Bucket, OPC_FIN, ObjAttrs, ObjHdr, SIZE_UNKNOWN};

#[cfg(test)]
mod tests;
