//! LZ4 frames, as AIStore's compressed streams use them.
//!
//! With `Ais-Compress: lz4` the whole request body (every frame, proto
//! headers included) is one LZ4 frame. AIStore's writer (pierrec/lz4)
//! uses independent blocks, no block checksums, and is never closed: the
//! body ends after a block, with no end mark. So the decoder accepts the
//! body's end at any block boundary. The encoder writes the same kind of
//! frame, and flushes a block at every object's end.
//!
//! Both halves are sans-IO: the decoder takes compressed bytes and hands
//! out decompressed ones; the encoder appends to a buffer.

use super::xxh32::xxh32;

pub const MAGIC: u32 = 0x184D_2204;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const FLG_VERSION: u8 = 0b0100_0000;
const FLG_BLOCK_INDEP: u8 = 1 << 5;
const FLG_BLOCK_CHECKSUM: u8 = 1 << 4;
const FLG_CONTENT_SIZE: u8 = 1 << 3;
const FLG_CONTENT_CHECKSUM: u8 = 1 << 2;
const FLG_DICT_ID: u8 = 1;
const UNCOMPRESSED_BIT: u32 = 1 << 31;
/// History a dependent block may refer back to.
const WINDOW_BYTES: usize = 64 << 10;
/// The largest skippable frame we skip over.
const SKIPPABLE_MAX: u32 = 16 << 20;

/// Block sizes AIStore allows (`transport.lz4_block`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSize {
    K64,
    K256,
    M1,
    M4,
}

impl BlockSize {
    pub fn bytes(self) -> usize {
        match self {
            BlockSize::K64 => 64 << 10,
            BlockSize::K256 => 256 << 10,
            BlockSize::M1 => 1 << 20,
            BlockSize::M4 => 4 << 20,
        }
    }

    fn id(self) -> u8 {
        match self {
            BlockSize::K64 => 4,
            BlockSize::K256 => 5,
            BlockSize::M1 => 6,
            BlockSize::M4 => 7,
        }
    }

    fn from_id(id: u8) -> Option<BlockSize> {
        Some(match id {
            4 => BlockSize::K64,
            5 => BlockSize::K256,
            6 => BlockSize::M1,
            7 => BlockSize::M4,
            _ => return None,
        })
    }

    /// Parses "64K", "256K", "1M", "4M" (any case, "iB" allowed).
    pub fn parse(s: &str) -> Option<BlockSize> {
        let s = s.trim().to_ascii_uppercase();
        let s = s.trim_end_matches("IB").trim_end_matches('B');
        Some(match s {
            "64K" => BlockSize::K64,
            "256K" => BlockSize::K256,
            "1M" => BlockSize::M1,
            "4M" => BlockSize::M4,
            _ => return None,
        })
    }
}

/// Why compressed bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lz4Error {
    #[error("not an LZ4 frame (magic {0:#010x})")]
    Magic(u32),
    #[error("unsupported LZ4 frame descriptor: {0}")]
    Descriptor(&'static str),
    #[error("LZ4 frame descriptor checksum mismatch")]
    DescriptorChecksum,
    #[error("LZ4 block of {len} bytes exceeds the frame's {max}")]
    BlockTooLarge { len: usize, max: usize },
    #[error("LZ4 block checksum mismatch")]
    BlockChecksum,
    #[error("LZ4 content checksum mismatch")]
    ContentChecksum,
    #[error("corrupt LZ4 block: {0}")]
    Corrupt(String),
    #[error("the compressed body ended inside {0}")]
    Truncated(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DState {
    /// 4 magic bytes (a frame, or a skippable frame).
    Magic,
    /// The rest of the descriptor: FLG, BD, options, HC.
    Descriptor,
    /// A skippable frame's length, then its bytes.
    SkipLen,
    Skip {
        left: u32,
    },
    /// A block's 4-byte size.
    BlockSize,
    /// A block's bytes (and checksum).
    Block {
        len: usize,
        raw: bool,
    },
    /// The content checksum after the end mark.
    ContentChecksum,
}

/// The decoder. Feed compressed bytes; take decompressed ones.
#[derive(Debug)]
pub struct Decoder {
    state: DState,
    /// Bytes of the unit being collected (header field or block).
    acc: Vec<u8>,
    flags: u8,
    block_max: usize,
    /// Decompressed bytes not yet taken, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Tail of the output, for dependent blocks.
    window: Vec<u8>,
    /// Frames completed with an end mark.
    frames: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            state: DState::Magic,
            acc: Vec::new(),
            flags: 0,
            block_max: 0,
            out: Vec::new(),
            out_pos: 0,
            window: Vec::new(),
            frames: 0,
        }
    }

    /// Decompressed bytes waiting to be taken.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// `len` bytes of the current block's output from `start` (an offset
    /// into [`output`](Self::output) as it was before a `consume`). They
    /// stay valid until the next `feed`.
    pub fn block_bytes(&self, base: usize, start: usize, len: usize) -> &[u8] {
        &self.out[base + start..base + start + len]
    }

    /// The offset of [`output`](Self::output) in the block, for
    /// [`block_bytes`](Self::block_bytes).
    pub fn output_base(&self) -> usize {
        self.out_pos
    }

    /// Marks `n` output bytes as taken.
    pub fn consume(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
    }

    /// True when the body may end here: before any frame, after a whole
    /// block, or after a frame's end.
    pub fn at_boundary(&self) -> bool {
        self.acc.is_empty() && matches!(self.state, DState::Magic | DState::BlockSize)
    }

    /// Called at the body's end.
    pub fn finish(&self) -> Result<(), Lz4Error> {
        if self.at_boundary() {
            return Ok(());
        }
        Err(Lz4Error::Truncated(match self.state {
            DState::Magic | DState::Descriptor => "a frame header",
            DState::SkipLen | DState::Skip { .. } => "a skippable frame",
            DState::BlockSize => "a block size",
            DState::Block { .. } => "a block",
            DState::ContentChecksum => "the content checksum",
        }))
    }

    /// Takes compressed bytes until a block's output is ready (or the input
    /// is used up). Returns how many bytes it took. Call only when
    /// [`output`](Self::output) is empty.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, Lz4Error> {
        debug_assert!(self.output().is_empty());
        let mut used = 0;
        while used < input.len() && self.output().is_empty() {
            used += self.advance(&input[used..])?;
        }
        Ok(used)
    }

    /// Collects up to `want` bytes into `acc`; true when complete.
    fn collect(&mut self, input: &[u8], want: usize, used: &mut usize) -> bool {
        let n = want.saturating_sub(self.acc.len()).min(input.len());
        self.acc.extend_from_slice(&input[..n]);
        *used += n;
        self.acc.len() == want
    }

    fn advance(&mut self, input: &[u8]) -> Result<usize, Lz4Error> {
        let mut used = 0;
        match self.state {
            DState::Magic => {
                if self.collect(input, 4, &mut used) {
                    let magic = u32::from_le_bytes([self.acc[0], self.acc[1], self.acc[2], self.acc[3]]);
                    self.acc.clear();
                    self.state = if magic == MAGIC {
                        DState::Descriptor
                    } else if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC {
                        DState::SkipLen
                    } else {
                        return Err(Lz4Error::Magic(magic));
                    };
                }
            }
            DState::SkipLen => {
                if self.collect(input, 4, &mut used) {
                    let left = u32::from_le_bytes([self.acc[0], self.acc[1], self.acc[2], self.acc[3]]);
                    self.acc.clear();
                    if left > SKIPPABLE_MAX {
                        return Err(Lz4Error::Descriptor("skippable frame too large"));
                    }
                    self.state = if left == 0 { DState::Magic } else { DState::Skip { left } };
                }
            }
            DState::Skip { left } => {
                let n = (left as usize).min(input.len());
                used = n;
                let left = left - n as u32;
                self.state = if left == 0 { DState::Magic } else { DState::Skip { left } };
            }
            DState::Descriptor => {
                // FLG and BD first, then the options they announce, then HC.
                if self.acc.len() < 2 && !self.collect(input, 2, &mut used) {
                    return Ok(used);
                }
                let flg = self.acc[0];
                let want = 2
                    + if flg & FLG_CONTENT_SIZE != 0 { 8 } else { 0 }
                    + if flg & FLG_DICT_ID != 0 { 4 } else { 0 }
                    + 1;
                if self.collect(&input[used..], want, &mut used) {
                    self.descriptor(flg)?;
                }
            }
            DState::BlockSize => {
                if self.collect(input, 4, &mut used) {
                    let word = u32::from_le_bytes([self.acc[0], self.acc[1], self.acc[2], self.acc[3]]);
                    self.acc.clear();
                    if word == 0 {
                        self.state = if self.flags & FLG_CONTENT_CHECKSUM != 0 {
                            DState::ContentChecksum
                        } else {
                            self.end_frame();
                            DState::Magic
                        };
                    } else {
                        let len = (word & !UNCOMPRESSED_BIT) as usize;
                        if len > self.block_max {
                            return Err(Lz4Error::BlockTooLarge { len, max: self.block_max });
                        }
                        self.state = DState::Block { len, raw: word & UNCOMPRESSED_BIT != 0 };
                    }
                }
            }
            DState::Block { len, raw } => {
                let check = if self.flags & FLG_BLOCK_CHECKSUM != 0 { 4 } else { 0 };
                if self.acc.capacity() < len + check {
                    self.acc.reserve(len + check - self.acc.len());
                }
                if self.collect(input, len + check, &mut used) {
                    self.block(len, raw)?;
                    self.acc.clear();
                    self.state = DState::BlockSize;
                }
            }
            DState::ContentChecksum => {
                // The content hash would need the whole frame's output kept
                // or a streaming XXH32; AIStore never writes one (its writer
                // is never closed), so the value is read and not checked.
                if self.collect(input, 4, &mut used) {
                    self.acc.clear();
                    self.end_frame();
                    self.state = DState::Magic;
                }
            }
        }
        Ok(used)
    }

    fn descriptor(&mut self, flg: u8) -> Result<(), Lz4Error> {
        let bd = self.acc[1];
        let hc = *self.acc.last().expect("collected");
        if flg & 0b1100_0000 != FLG_VERSION {
            return Err(Lz4Error::Descriptor("version is not 01"));
        }
        if flg & 0b10 != 0 || bd & 0b1000_1111 != 0 {
            return Err(Lz4Error::Descriptor("reserved bits set"));
        }
        if flg & FLG_DICT_ID != 0 {
            return Err(Lz4Error::Descriptor("preset dictionaries are not supported"));
        }
        let size = BlockSize::from_id((bd >> 4) & 0b111).ok_or(Lz4Error::Descriptor("unknown block size"))?;
        if (xxh32(&self.acc[..self.acc.len() - 1], 0) >> 8) as u8 != hc {
            return Err(Lz4Error::DescriptorChecksum);
        }
        self.flags = flg;
        self.block_max = size.bytes();
        self.window.clear();
        self.acc.clear();
        self.state = DState::BlockSize;
        Ok(())
    }

    fn block(&mut self, len: usize, raw: bool) -> Result<(), Lz4Error> {
        let data = &self.acc[..len];
        if self.flags & FLG_BLOCK_CHECKSUM != 0 {
            let c = &self.acc[len..len + 4];
            if xxh32(data, 0) != u32::from_le_bytes([c[0], c[1], c[2], c[3]]) {
                return Err(Lz4Error::BlockChecksum);
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if raw {
            self.out.extend_from_slice(data);
        } else {
            self.out.resize(self.block_max, 0);
            let n = if self.flags & FLG_BLOCK_INDEP != 0 {
                lz4_flex::block::decompress_into(data, &mut self.out)
            } else {
                lz4_flex::block::decompress_into_with_dict(data, &mut self.out, &self.window)
            }
            .map_err(|e| Lz4Error::Corrupt(e.to_string()))?;
            self.out.truncate(n);
        }
        if self.flags & FLG_BLOCK_INDEP == 0 {
            // Keep the last 64 KiB of output for the next block.
            let keep = self.out.len().min(WINDOW_BYTES);
            let drop = (self.window.len() + keep).saturating_sub(WINDOW_BYTES);
            self.window.drain(..drop.min(self.window.len()));
            self.window.extend_from_slice(&self.out[self.out.len() - keep..]);
        }
        Ok(())
    }

    fn end_frame(&mut self) {
        self.frames += 1;
        self.window.clear();
    }
}

/// The encoder's frame header: version 01, independent blocks, no
/// checksums, the given block size.
pub fn frame_header(block: BlockSize) -> [u8; 7] {
    let flg = FLG_VERSION | FLG_BLOCK_INDEP;
    let bd = block.id() << 4;
    let hc = (xxh32(&[flg, bd], 0) >> 8) as u8;
    let m = MAGIC.to_le_bytes();
    [m[0], m[1], m[2], m[3], flg, bd, hc]
}

/// Appends one block holding `input` (at most the frame's block size):
/// compressed, or stored as is when compression does not pay.
pub fn encode_block(input: &[u8], out: &mut Vec<u8>) {
    if input.is_empty() {
        return;
    }
    let start = out.len();
    let bound = lz4_flex::block::get_maximum_output_size(input.len());
    out.resize(start + 4 + bound, 0);
    let compressed = lz4_flex::block::compress_into(input, &mut out[start + 4..]).ok().filter(|&n| n < input.len());
    match compressed {
        Some(n) => {
            out[start..start + 4].copy_from_slice(&(n as u32).to_le_bytes());
            out.truncate(start + 4 + n);
        }
        None => {
            out.truncate(start);
            out.extend_from_slice(&(input.len() as u32 | UNCOMPRESSED_BIT).to_le_bytes());
            out.extend_from_slice(input);
        }
    }
}

/// The end mark, for writers that do close their frames.
pub const END_MARK: [u8; 4] = [0; 4];
