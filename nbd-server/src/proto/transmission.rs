//! Transmission-phase codec: request headers (compact and extended) and reply headers
//! (simple, structured and extended chunks), in both directions.
//!
//! [`decode_request`] returns `Ok(None)` until a whole header is present ("need more bytes" is
//! not an error); it never looks at a write payload, whose length the caller checks against the
//! negotiated maximum before reading a byte of it. Reply encoders append to a caller-owned
//! buffer, so the server builds each reply's headers in one allocation and writes bulk read data
//! straight from the buffer it was read into.

use super::consts::*;
use super::cursor::Cursor;
use super::WireError;

/// Which header layout the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderMode {
    /// 28-byte requests; simple or structured replies.
    #[default]
    Compact,
    /// 32-byte requests with a 64-bit length; every reply is a 32-byte extended chunk.
    Extended,
}

impl HeaderMode {
    /// Size of a request header in this mode.
    pub const fn request_len(self) -> usize {
        match self {
            Self::Compact => 28,
            Self::Extended => 32,
        }
    }
}

/// The command a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    /// From the wire value.
    pub fn from_wire(v: u16) -> Self {
        match v {
            cmd::READ => Self::Read,
            cmd::WRITE => Self::Write,
            cmd::DISC => Self::Disconnect,
            cmd::FLUSH => Self::Flush,
            cmd::TRIM => Self::Trim,
            cmd::CACHE => Self::Cache,
            cmd::WRITE_ZEROES => Self::WriteZeroes,
            cmd::BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// To the wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => cmd::READ,
            Self::Write => cmd::WRITE,
            Self::Disconnect => cmd::DISC,
            Self::Flush => cmd::FLUSH,
            Self::Trim => cmd::TRIM,
            Self::Cache => cmd::CACHE,
            Self::WriteZeroes => cmd::WRITE_ZEROES,
            Self::BlockStatus => cmd::BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }

    /// Command flags that are meaningful for this command (FUA is accepted on all).
    pub fn allowed_flags(self) -> u16 {
        cmd_flags::FUA
            | match self {
                Self::Read => cmd_flags::DF,
                Self::WriteZeroes => cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
                Self::BlockStatus => cmd_flags::REQ_ONE,
                Self::Write => cmd_flags::PAYLOAD_LEN,
                _ => 0,
            }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (for WRITE, the payload that follows).
    pub length: u64,
}

/// Decode one request header from the front of `buf`.
///
/// Returns `Ok(None)` when fewer than a header's bytes are present, otherwise the request and
/// the number of bytes consumed (the header only; the caller reads any payload).
///
/// # Errors
/// [`WireError::BadMagic`] when the magic does not match the negotiated mode: the stream cannot
/// be resynchronised and the connection must be closed.
pub fn decode_request(buf: &[u8], mode: HeaderMode) -> Result<Option<(Request, usize)>, WireError> {
    let len = mode.request_len();
    let Some(header) = buf.get(..len) else {
        return Ok(None);
    };
    let mut c = Cursor::new(header);
    let magic = c.u32().unwrap_or_default();
    let expected = match mode {
        HeaderMode::Compact => REQUEST_MAGIC,
        HeaderMode::Extended => EXTENDED_REQUEST_MAGIC,
    };
    if magic != expected {
        return Err(WireError::BadMagic { what: "request", found: u64::from(magic) });
    }
    let flags = c.u16().unwrap_or_default();
    let command = Command::from_wire(c.u16().unwrap_or_default());
    let cookie = c.u64().unwrap_or_default();
    let offset = c.u64().unwrap_or_default();
    let length = match mode {
        HeaderMode::Compact => u64::from(c.u32().unwrap_or_default()),
        HeaderMode::Extended => c.u64().unwrap_or_default(),
    };
    Ok(Some((Request { flags, command, cookie, offset, length }, len)))
}

/// Encode a request header (client side). In compact mode `length` must fit in 32 bits.
///
/// # Errors
/// [`WireError::Malformed`] when a compact request's length exceeds 32 bits.
pub fn encode_request(out: &mut Vec<u8>, mode: HeaderMode, req: &Request) -> Result<(), WireError> {
    match mode {
        HeaderMode::Compact => {
            let len = u32::try_from(req.length).map_err(|_| WireError::Malformed("length needs extended headers"))?;
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            out.extend_from_slice(&req.flags.to_be_bytes());
            out.extend_from_slice(&req.command.to_wire().to_be_bytes());
            out.extend_from_slice(&req.cookie.to_be_bytes());
            out.extend_from_slice(&req.offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        HeaderMode::Extended => {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            out.extend_from_slice(&req.flags.to_be_bytes());
            out.extend_from_slice(&req.command.to_wire().to_be_bytes());
            out.extend_from_slice(&req.cookie.to_be_bytes());
            out.extend_from_slice(&req.offset.to_be_bytes());
            out.extend_from_slice(&req.length.to_be_bytes());
        }
    }
    Ok(())
}

/// Append a simple reply header (no payload follows unless it answers a successful READ).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a structured (compact) or extended chunk header.
///
/// `request_offset` is echoed in extended headers, as the extension asks.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: u64,
) {
    match mode {
        HeaderMode::Compact => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            // Callers never build a compact chunk over 4 GiB (payloads are capped far below).
            out.extend_from_slice(&(payload_len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
        HeaderMode::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&request_offset.to_be_bytes());
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
    }
}

/// Append the header of an `OFFSET_DATA` chunk; `data_len` bytes of data must follow it.
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    data_offset: u64,
    data_len: u64,
) {
    let flags = if done { reply_flags::DONE } else { 0 };
    encode_chunk_header(out, mode, flags, reply_type::OFFSET_DATA, cookie, request_offset, 8 + data_len);
    out.extend_from_slice(&data_offset.to_be_bytes());
}

/// Append a whole `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    hole_offset: u64,
    hole_len: u32,
) {
    let flags = if done { reply_flags::DONE } else { 0 };
    encode_chunk_header(out, mode, flags, reply_type::OFFSET_HOLE, cookie, request_offset, 12);
    out.extend_from_slice(&hole_offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// Append a final `NONE` chunk.
pub fn encode_done(out: &mut Vec<u8>, mode: HeaderMode, cookie: u64, request_offset: u64) {
    encode_chunk_header(out, mode, reply_flags::DONE, reply_type::NONE, cookie, request_offset, 0);
}

/// Append a final `ERROR` chunk carrying a message for humans.
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    request_offset: u64,
    error: u32,
    message: &str,
) {
    let msg = super::handshake::truncate_utf8(message, MAX_STRING_LEN);
    encode_chunk_header(out, mode, reply_flags::DONE, reply_type::ERROR, cookie, request_offset, 6 + msg.len() as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// One extent of block status: `length` bytes with `flags` (`STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// `base:allocation` flags.
    pub flags: u32,
}

/// Append a final block status chunk for one context. In compact mode the caller has already
/// made every extent fit in 32 bits.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    extents: &[Extent],
) {
    let flags = if done { reply_flags::DONE } else { 0 };
    match mode {
        HeaderMode::Compact => {
            let len = 4 + 8 * extents.len() as u64;
            encode_chunk_header(out, mode, flags, reply_type::BLOCK_STATUS, cookie, request_offset, len);
            out.extend_from_slice(&context_id.to_be_bytes());
            for e in extents {
                out.extend_from_slice(&(e.length.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                out.extend_from_slice(&e.flags.to_be_bytes());
            }
        }
        HeaderMode::Extended => {
            let len = 8 + 16 * extents.len() as u64;
            encode_chunk_header(out, mode, flags, reply_type::BLOCK_STATUS_EXT, cookie, request_offset, len);
            out.extend_from_slice(&context_id.to_be_bytes());
            out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for e in extents {
                out.extend_from_slice(&e.length.to_be_bytes());
                out.extend_from_slice(&u64::from(e.flags).to_be_bytes());
            }
        }
    }
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Cookie of the request.
        cookie: u64,
        /// Error (0 = success).
        error: u32,
    },
    /// A structured or extended chunk.
    Chunk {
        /// Reply flags (`reply_flags::*`).
        flags: u16,
        /// Chunk type (`reply_type::*`).
        kind: u16,
        /// Cookie of the request.
        cookie: u64,
        /// Payload length that follows.
        length: u64,
    },
}

/// Bytes a reply header occupies given its first 4 bytes (its magic), or `None` for an unknown
/// magic.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(16),
        STRUCTURED_REPLY_MAGIC => Some(20),
        EXTENDED_REPLY_MAGIC => Some(32),
        _ => None,
    }
}

/// Decode a reply header; `Ok(None)` until enough bytes are present.
///
/// # Errors
/// [`WireError::BadMagic`] for an unknown magic.
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, WireError> {
    let Some(magic) = Cursor::new(buf).u32() else {
        return Ok(None);
    };
    let len = reply_header_len(magic).ok_or(WireError::BadMagic { what: "reply", found: u64::from(magic) })?;
    let Some(header) = buf.get(4..len) else {
        return Ok(None);
    };
    let mut c = Cursor::new(header);
    let reply = match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = c.u32().unwrap_or_default();
            ReplyHeader::Simple { error, cookie: c.u64().unwrap_or_default() }
        }
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: c.u16().unwrap_or_default(),
            kind: c.u16().unwrap_or_default(),
            cookie: c.u64().unwrap_or_default(),
            length: u64::from(c.u32().unwrap_or_default()),
        },
        _ => {
            let flags = c.u16().unwrap_or_default();
            let kind = c.u16().unwrap_or_default();
            let cookie = c.u64().unwrap_or_default();
            let _offset = c.u64();
            ReplyHeader::Chunk { flags, kind, cookie, length: c.u64().unwrap_or_default() }
        }
    };
    Ok(Some((reply, len)))
}

/// Parse the extents of a block status chunk payload (client side); `extended` selects the
/// 64-bit layout. Returns the context id and the extents.
///
/// # Errors
/// [`WireError::Malformed`] when the payload length does not fit the layout.
pub fn parse_block_status(payload: &[u8], extended: bool) -> Result<(u32, Vec<Extent>), WireError> {
    let mut c = Cursor::new(payload);
    let id = c.u32().ok_or(WireError::Malformed("block status chunk without context id"))?;
    let mut extents = Vec::with_capacity(payload.len() / 8);
    if extended {
        let _count = c.u32().ok_or(WireError::Malformed("extended block status without count"))?;
        if c.remaining() % 16 != 0 || c.remaining() == 0 {
            return Err(WireError::Malformed("extended block status descriptors are not 16-byte records"));
        }
        while let (Some(length), Some(flags)) = (c.u64(), c.u64()) {
            extents.push(Extent { length, flags: flags as u32 });
        }
    } else {
        if c.remaining() % 8 != 0 || c.remaining() == 0 {
            return Err(WireError::Malformed("block status descriptors are not 8-byte records"));
        }
        while let (Some(length), Some(flags)) = (c.u32(), c.u32()) {
            extents.push(Extent { length: u64::from(length), flags });
        }
    }
    Ok((id, extents))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: Command, length: u64) -> Request {
        Request { flags: cmd_flags::FUA, command, cookie: 0xdead_beef, offset: 4096, length }
    }

    #[test]
    fn request_decoding_waits_for_a_whole_header() {
        let mut out = Vec::new();
        encode_request(&mut out, HeaderMode::Compact, &req(Command::Write, 512)).unwrap();
        assert_eq!(out.len(), 28);
        for cut in 0..28 {
            assert_eq!(decode_request(&out[..cut], HeaderMode::Compact), Ok(None));
        }
        assert_eq!(decode_request(&out, HeaderMode::Compact), Ok(Some((req(Command::Write, 512), 28))));
    }

    #[test]
    fn extended_requests_carry_64_bit_lengths() {
        let mut out = Vec::new();
        let r = req(Command::Trim, 5 << 32);
        encode_request(&mut out, HeaderMode::Extended, &r).unwrap();
        assert_eq!(decode_request(&out, HeaderMode::Extended), Ok(Some((r, 32))));
        assert!(encode_request(&mut Vec::new(), HeaderMode::Compact, &r).is_err());
    }

    #[test]
    fn a_request_with_the_other_mode_s_magic_is_rejected() {
        let mut out = Vec::new();
        encode_request(&mut out, HeaderMode::Extended, &req(Command::Read, 1)).unwrap();
        assert!(matches!(decode_request(&out, HeaderMode::Compact), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn unknown_commands_are_kept_not_rejected() {
        assert_eq!(Command::from_wire(99), Command::Unknown(99));
        assert_eq!(Command::Unknown(99).to_wire(), 99);
    }

    #[test]
    fn reply_headers_round_trip_in_all_three_layouts() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 7, errno::EIO);
        assert_eq!(decode_reply_header(&out), Ok(Some((ReplyHeader::Simple { cookie: 7, error: errno::EIO }, 16))));
        for mode in [HeaderMode::Compact, HeaderMode::Extended] {
            let mut out = Vec::new();
            encode_offset_hole(&mut out, mode, true, 9, 0, 4096, 512);
            let (h, n) = decode_reply_header(&out).unwrap().unwrap();
            assert_eq!(
                h,
                ReplyHeader::Chunk { flags: reply_flags::DONE, kind: reply_type::OFFSET_HOLE, cookie: 9, length: 12 }
            );
            assert_eq!(out.len() - n, 12);
        }
    }

    #[test]
    fn block_status_round_trips_in_both_layouts() {
        let extents = [Extent { length: 65536, flags: STATE_HOLE | STATE_ZERO }, Extent { length: 4096, flags: 0 }];
        for (mode, ext) in [(HeaderMode::Compact, false), (HeaderMode::Extended, true)] {
            let mut out = Vec::new();
            encode_block_status(&mut out, mode, true, 1, 0, 3, &extents);
            let (_, n) = decode_reply_header(&out).unwrap().unwrap();
            let (id, got) = parse_block_status(&out[n..], ext).unwrap();
            assert_eq!(id, 3);
            assert_eq!(got, extents);
        }
    }

    #[test]
    fn error_chunks_carry_the_message() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, HeaderMode::Compact, 5, 0, errno::EINVAL, "out of range");
        let (h, n) = decode_reply_header(&out).unwrap().unwrap();
        assert!(matches!(h, ReplyHeader::Chunk { kind: reply_type::ERROR, length: 18, .. }));
        assert_eq!(&out[n + 6..], b"out of range");
    }
}
