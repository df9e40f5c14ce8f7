//! The client's judgement of reply chunks, as pure functions: which chunk types may answer a
//! request, how many payload bytes the client may read for one, where a data or hole chunk lands
//! in the read buffer, and what an error chunk says.
//!
//! They live here rather than in the client so that the fuzzers reach every decision the client
//! makes on server bytes (`fuzzing::reply_stream` drives them). Every length is checked against
//! the request it answers *before* the client reads or allocates anything for it: a server can
//! make the client read at most the request's own length plus a chunk header's worth of
//! overhead, an error message of the spec's 4096 bytes, or a block status payload of
//! [`MAX_STATUS_PAYLOAD`].

use std::ops::Range;

use super::consts::reply_type;
use super::cursor::Cursor;
use super::WireError;

/// Largest block status chunk the client reads: the spec's advice of 2^20 extents, in the
/// extended (16-byte) layout, plus its 8-byte header.
pub const MAX_STATUS_PAYLOAD: u64 = 8 + 16 * (1 << 20);

/// Longest error message the spec allows.
pub const MAX_ERROR_MESSAGE: u64 = 4096;

/// What the client asked, as far as judging a chunk needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `NBD_CMD_READ` of `length` bytes at `offset`.
    Read {
        /// Offset of the read.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other command (only `NONE` and error chunks may answer it).
    Other,
}

/// How the client consumes a chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkBody {
    /// `NONE`: nothing follows.
    Empty,
    /// `OFFSET_DATA`: an 8-byte offset, then `data` bytes of read data (checked with [`place`]
    /// once the offset is known, and read straight into the buffer).
    Data {
        /// Bytes of data after the offset.
        data: u64,
    },
    /// `OFFSET_HOLE`: 12 bytes for [`parse_offset_hole`].
    Hole,
    /// Block status: `length` bytes for `transmission::parse_block_status`.
    Status {
        /// Payload length.
        length: usize,
        /// The extended (64-bit) layout.
        extended: bool,
    },
    /// An error chunk: `length` bytes for [`parse_error_chunk`].
    Error {
        /// Payload length.
        length: usize,
    },
}

/// Decide how to read a chunk of type `kind` and `length` payload bytes answering `asked`.
///
/// # Errors
/// A type that cannot answer this request, or a length the spec does not allow for it.
pub fn chunk_body(kind: u16, length: u64, asked: &Asked) -> Result<ChunkBody, WireError> {
    use reply_type::*;
    let bad = |why: &'static str| Err(WireError::Malformed(why));
    match (kind, asked) {
        (NONE, _) if length == 0 => Ok(ChunkBody::Empty),
        (NONE, _) => bad("NONE chunk with a payload"),
        (OFFSET_DATA, Asked::Read { length: asked_len, .. }) => {
            if length < 9 {
                bad("data chunk shorter than 9 bytes")
            } else if length - 8 > *asked_len {
                bad("data chunk longer than the read")
            } else {
                Ok(ChunkBody::Data { data: length - 8 })
            }
        }
        (OFFSET_HOLE, Asked::Read { .. }) if length == 12 => Ok(ChunkBody::Hole),
        (OFFSET_HOLE, Asked::Read { .. }) => bad("hole chunk of a length other than 12"),
        (OFFSET_DATA | OFFSET_HOLE, _) => bad("content chunk answering a request that is not a read"),
        (BLOCK_STATUS | BLOCK_STATUS_EXT, Asked::BlockStatus) => {
            if length > MAX_STATUS_PAYLOAD {
                bad("block status chunk larger than 2^20 extents")
            } else {
                Ok(ChunkBody::Status { length: length as usize, extended: kind == BLOCK_STATUS_EXT })
            }
        }
        (BLOCK_STATUS | BLOCK_STATUS_EXT, _) => bad("block status chunk answering another request"),
        (k, _) if k & ERROR_BIT != 0 => {
            // error (4) + message length (2) + message + ERROR_OFFSET's offset (8).
            if length < 6 {
                bad("error chunk shorter than 6 bytes")
            } else if length > 6 + MAX_ERROR_MESSAGE + 8 {
                bad("error chunk longer than a 4096-byte message")
            } else {
                Ok(ChunkBody::Error { length: length as usize })
            }
        }
        _ => bad("unknown chunk type"),
    }
}

/// The range of the read buffer that a data or hole chunk for `n` bytes at export offset `at`
/// covers, for a read of `read_length` bytes at `read_offset`.
///
/// # Errors
/// The chunk is empty or lies (partly) outside the read.
pub fn place(at: u64, n: u64, read_offset: u64, read_length: u64) -> Result<Range<usize>, WireError> {
    if n == 0 {
        return Err(WireError::Malformed("empty content chunk"));
    }
    let start = at.checked_sub(read_offset).ok_or(WireError::Malformed("content chunk before the read"))?;
    let end = start.checked_add(n).filter(|&e| e <= read_length);
    match (usize::try_from(start), end.map(usize::try_from)) {
        (Ok(s), Some(Ok(e))) => Ok(s..e),
        _ => Err(WireError::Malformed("content chunk past the end of the read")),
    }
}

/// An `OFFSET_HOLE` payload: the export offset and the hole's size.
///
/// # Errors
/// Not exactly 12 bytes.
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), WireError> {
    let mut c = Cursor::new(payload);
    match (c.u64(), c.u32(), c.remaining()) {
        (Some(at), Some(n), 0) => Ok((at, n)),
        _ => Err(WireError::Malformed("hole chunk is not 12 bytes")),
    }
}

/// What an error chunk says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The NBD error value (never 0: a zero is reported as `EIO`).
    pub error: u32,
    /// The server's message, lossily decoded.
    pub message: String,
    /// For `ERROR_OFFSET`, where the error happened.
    pub offset: Option<u64>,
}

/// Parse an error chunk of type `kind`.
///
/// # Errors
/// The message length runs past the payload, or `ERROR_OFFSET` lacks its offset.
pub fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<ErrorChunk, WireError> {
    let mut c = Cursor::new(payload);
    let (Some(error), Some(len)) = (c.u32(), c.u16()) else {
        return Err(WireError::Malformed("error chunk shorter than 6 bytes"));
    };
    let message = c.take(usize::from(len)).ok_or(WireError::Malformed("error message past the chunk"))?;
    let message = String::from_utf8_lossy(message).into_owned();
    let offset = if kind == reply_type::ERROR_OFFSET {
        Some(c.u64().ok_or(WireError::Malformed("ERROR_OFFSET chunk without its offset"))?)
    } else {
        None
    };
    let error = if error == 0 { super::consts::errno::EIO } else { error };
    Ok(ErrorChunk { error, message, offset })
}

/// A `META_CONTEXT` option reply: the context id the server assigned and the context's name.
///
/// # Errors
/// Shorter than the id.
pub fn parse_meta_context_reply(data: &[u8]) -> Result<(u32, String), WireError> {
    let mut c = Cursor::new(data);
    let id = c.u32().ok_or(WireError::Malformed("META_CONTEXT reply shorter than 4 bytes"))?;
    let name = c.take(c.remaining()).unwrap_or_default();
    Ok((id, String::from_utf8_lossy(name).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reply_type::*;

    const READ: Asked = Asked::Read { offset: 4096, length: 8192 };

    #[test]
    fn chunks_are_judged_against_the_request_they_answer() {
        assert_eq!(chunk_body(OFFSET_DATA, 8 + 8192, &READ), Ok(ChunkBody::Data { data: 8192 }));
        assert!(chunk_body(OFFSET_DATA, 8 + 8193, &READ).is_err(), "more data than was read");
        assert!(chunk_body(OFFSET_DATA, 8, &READ).is_err(), "data chunk with no data");
        assert!(chunk_body(OFFSET_DATA, 9, &Asked::Other).is_err(), "data for a write");
        assert_eq!(chunk_body(OFFSET_HOLE, 12, &READ), Ok(ChunkBody::Hole));
        assert!(chunk_body(OFFSET_HOLE, 13, &READ).is_err());
        assert!(chunk_body(BLOCK_STATUS, 12, &READ).is_err(), "status for a read");
        assert!(chunk_body(BLOCK_STATUS, MAX_STATUS_PAYLOAD + 1, &Asked::BlockStatus).is_err());
        assert_eq!(chunk_body(NONE, 0, &Asked::Other), Ok(ChunkBody::Empty));
        assert!(chunk_body(NONE, 1, &Asked::Other).is_err());
        assert!(chunk_body(ERROR, 5, &Asked::Other).is_err());
        assert!(chunk_body(ERROR, 6 + 4096 + 9, &Asked::Other).is_err(), "a message past the spec's limit");
        assert_eq!(chunk_body(ERROR_BIT | 9, 6, &Asked::Other), Ok(ChunkBody::Error { length: 6 }), "unknown error");
        assert!(chunk_body(7, 0, &Asked::Other).is_err(), "unknown non-error type");
    }

    #[test]
    fn content_lands_inside_the_read_or_nowhere() {
        assert_eq!(place(4096, 8192, 4096, 8192), Ok(0..8192));
        assert_eq!(place(8192, 10, 4096, 8192), Ok(4096..4106));
        for (at, n) in [(0, 1), (4095, 2), (8192, 4097), (u64::MAX, 2), (4096, 0), (4096, u64::MAX)] {
            assert!(place(at, n, 4096, 8192).is_err(), "{at}+{n}");
        }
    }

    #[test]
    fn error_chunks_parse_strictly() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(3u16.to_be_bytes());
        p.extend(b"bad");
        assert_eq!(parse_error_chunk(ERROR, &p), Ok(ErrorChunk { error: 5, message: "bad".into(), offset: None }));
        assert!(parse_error_chunk(ERROR_OFFSET, &p).is_err(), "offset missing");
        p.extend(77u64.to_be_bytes());
        assert_eq!(parse_error_chunk(ERROR_OFFSET, &p).map(|e| e.offset), Ok(Some(77)));
        assert!(parse_error_chunk(ERROR, &p[..7]).is_err(), "message past the payload");
        assert_eq!(parse_error_chunk(ERROR, &[0, 0, 0, 0, 0, 0]).map(|e| e.error), Ok(5), "0 reads as EIO");
        assert_eq!(parse_offset_hole(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]), Ok((1, 2)));
        assert!(parse_offset_hole(&[0; 11]).is_err());
        assert_eq!(parse_meta_context_reply(&[0, 0, 0, 9, b'x']), Ok((9, "x".into())));
        assert!(parse_meta_context_reply(&[0, 0, 9]).is_err());
    }
}
