//! Numeric constants of the NBD protocol (`reference/nbd-proto.md`, "Values"), plus the
//! extended-headers extension that qemu 8.2+ and libnbd 1.18+ speak.
//!
//! They are plain `pub const`s grouped by the field they belong to, so a reader can put the
//! spec beside this file and tick them off one by one.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic in the greeting and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic (extended headers negotiated).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after EXPORT_NAME.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits), sent per export.
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES (and NO_HOLE) are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF read flag is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// All connections share one cache: FLUSH on one covers all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE (experimental; never set here).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The FAST_ZERO flag of WRITE_ZEROES is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS accepts a payload (extended headers; never set here).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option types a client sends during haggling.
pub mod opt {
    /// Select an export and end haggling (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn PEEK_EXPORT.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Option accepted / list finished.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One information item of INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks an error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform (TLS here).
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Block size information must be requested.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;
}

/// Information types inside `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum / preferred / maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch hint.
    pub const CACHE: u16 = 5;
    /// Write zeroes without payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (16 bits).
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail with ENOTSUP unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: length is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flags.
pub mod reply_flags {
    /// Final chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// No payload; final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// 32-bit block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// 64-bit block status descriptors (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit 15 marks an error chunk.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Error without offset.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Error values in replies.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (bad range, unknown command or flag).
    pub const EINVAL: u32 = 22;
    /// No space left (write past the end, or the backing store is full).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (fast zero that is not fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context this crate serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, description, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
