//! Handshake-phase codec: the greeting, option requests and option replies, in both directions.
//!
//! Pure functions over bytes. Fixed-size frames are parsed from arrays whose length the type
//! guarantees; variable option payloads are parsed from the slice the caller already read, with
//! every length field checked against what is actually there. Nothing here allocates more than
//! the input it was given, so a header that claims a huge name costs nothing.

use super::consts::*;
use super::cursor::Cursor;
use super::WireError;

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The server's first message.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Parse the server greeting (client side); returns the handshake flags.
///
/// # Errors
/// [`WireError::BadMagic`] when it is not a fixed-newstyle greeting (oldstyle included).
pub fn parse_greeting(bytes: &[u8; GREETING_LEN]) -> Result<u16, WireError> {
    let mut c = Cursor::new(bytes);
    let magic = c.u64().unwrap_or_default();
    let newstyle = c.u64().unwrap_or_default();
    let flags = c.u16().unwrap_or_default();
    if magic != NBD_MAGIC {
        return Err(WireError::BadMagic { what: "greeting", found: magic });
    }
    if newstyle != IHAVEOPT {
        return Err(WireError::BadMagic { what: "newstyle greeting", found: newstyle });
    }
    Ok(flags)
}

/// A client's option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option type (`opt::*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parse an option header.
    ///
    /// # Errors
    /// [`WireError::BadMagic`] when the first 8 bytes are not `IHAVEOPT`.
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, WireError> {
        let mut c = Cursor::new(bytes);
        let magic = c.u64().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic { what: "option", found: magic });
        }
        Ok(Self { option: c.u32().unwrap_or_default(), length: c.u32().unwrap_or_default() })
    }

    /// Encode an option request with its data (client side).
    pub fn encode(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
}

/// The server's reply header to an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Parse an option reply header (client side).
    ///
    /// # Errors
    /// [`WireError::BadMagic`] on a wrong magic.
    pub fn parse(bytes: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, WireError> {
        let mut c = Cursor::new(bytes);
        let magic = c.u64().unwrap_or_default();
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic { what: "option reply", found: magic });
        }
        Ok(Self {
            option: c.u32().unwrap_or_default(),
            reply: c.u32().unwrap_or_default(),
            length: c.u32().unwrap_or_default(),
        })
    }
}

/// Append one option reply to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Append an error reply whose data is a human-readable message (truncated to the spec's limit).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING_LEN);
    encode_option_reply(out, option, reply, msg.as_bytes());
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// What `NBD_OPT_INFO` / `NBD_OPT_GO` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name ("" is the default export).
    pub name: &'a str,
    /// Information types requested (`info::*`).
    pub requests: Vec<u16>,
}

/// Why option data could not be parsed; the server answers `NBD_REP_ERR_INVALID` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// A length field points past the option data.
    #[error("{field} length {claimed} exceeds the {available} bytes of option data left")]
    LengthPastEnd {
        /// Which length field.
        field: &'static str,
        /// What it claimed.
        claimed: u64,
        /// What was left.
        available: usize,
    },
    /// Data was left over after the last field.
    #[error("{0} trailing bytes after the option's fields")]
    TrailingBytes(usize),
    /// A string is not UTF-8 or too long.
    #[error("{0} is not a valid NBD string (UTF-8, no NUL, at most 4096 bytes)")]
    BadString(&'static str),
    /// The option must carry no data.
    #[error("this option takes no data, got {0} bytes")]
    UnexpectedData(usize),
}

fn string<'a>(c: &mut Cursor<'a>, field: &'static str, len: u64) -> Result<&'a str, OptionDataError> {
    let available = c.remaining();
    let n = usize::try_from(len).ok().filter(|n| *n <= available).ok_or(OptionDataError::LengthPastEnd {
        field,
        claimed: len,
        available,
    })?;
    let bytes = c.take(n).ok_or(OptionDataError::LengthPastEnd { field, claimed: len, available })?;
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(OptionDataError::BadString(field));
    }
    std::str::from_utf8(bytes).map_err(|_| OptionDataError::BadString(field))
}

fn short(field: &'static str, claimed: u64, c: &Cursor<'_>) -> OptionDataError {
    OptionDataError::LengthPastEnd { field, claimed, available: c.remaining() }
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// # Errors
/// [`OptionDataError`] when a length field disagrees with the data.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, OptionDataError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or_else(|| short("name", 4, &c))?;
    let name = string(&mut c, "export name", u64::from(name_len))?;
    let count = c.u16().ok_or_else(|| short("information request count", 2, &c))?;
    let needed = u64::from(count) * 2;
    if needed != c.remaining() as u64 {
        return Err(if needed > c.remaining() as u64 {
            short("information requests", needed, &c)
        } else {
            OptionDataError::TrailingBytes(c.remaining() - needed as usize)
        });
    }
    let mut requests = Vec::with_capacity(usize::from(count));
    while let Some(r) = c.u16() {
        requests.push(r);
    }
    Ok(InfoRequest { name, requests })
}

/// Encode the data of `NBD_OPT_INFO` / `NBD_OPT_GO` (client side).
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// What `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub export: &'a str,
    /// Queries, each `namespace:leaf`.
    pub queries: Vec<&'a str>,
}

/// Parse the data of the two meta-context options.
///
/// The query count is bounded by the data actually present (each query needs at least 4
/// bytes), so a claimed count of 2^32 cannot make this allocate.
///
/// # Errors
/// [`OptionDataError`] when a length field disagrees with the data.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, OptionDataError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or_else(|| short("export name", 4, &c))?;
    let export = string(&mut c, "export name", u64::from(name_len))?;
    let count = c.u32().ok_or_else(|| short("query count", 4, &c))?;
    if u64::from(count) * 4 > c.remaining() as u64 {
        return Err(short("queries", u64::from(count) * 4, &c));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = c.u32().ok_or_else(|| short("query", 4, &c))?;
        queries.push(string(&mut c, "query", u64::from(len))?);
    }
    if c.remaining() != 0 {
        return Err(OptionDataError::TrailingBytes(c.remaining()));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Encode the data of a meta-context option (client side).
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Data of `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Data of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let text = truncate_utf8(text, MAX_STRING_LEN);
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Data of `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// One parsed `NBD_REP_INFO` item (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Canonical name.
    Name(String),
    /// Description.
    Description(String),
    /// Block size constraints.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        maximum: u32,
    },
    /// A type this crate does not know (ignored, as the spec requires).
    Unknown(u16),
}

/// Parse the data of one `NBD_REP_INFO` reply (client side).
///
/// # Errors
/// [`WireError::Malformed`] when a known item has the wrong length.
pub fn parse_info_item(data: &[u8]) -> Result<InfoItem, WireError> {
    let mut c = Cursor::new(data);
    let kind = c.u16().ok_or(WireError::Malformed("NBD_REP_INFO shorter than 2 bytes"))?;
    let text = |c: &mut Cursor<'_>| String::from_utf8_lossy(c.take(c.remaining()).unwrap_or_default()).into_owned();
    Ok(match kind {
        info::EXPORT if data.len() == 12 => {
            InfoItem::Export { size: c.u64().unwrap_or_default(), flags: c.u16().unwrap_or_default() }
        }
        info::EXPORT => return Err(WireError::Malformed("NBD_INFO_EXPORT length is not 12")),
        info::NAME => InfoItem::Name(text(&mut c)),
        info::DESCRIPTION => InfoItem::Description(text(&mut c)),
        info::BLOCK_SIZE if data.len() == 14 => InfoItem::BlockSize {
            minimum: c.u32().unwrap_or_default(),
            preferred: c.u32().unwrap_or_default(),
            maximum: c.u32().unwrap_or_default(),
        },
        info::BLOCK_SIZE => return Err(WireError::Malformed("NBD_INFO_BLOCK_SIZE length is not 14")),
        other => InfoItem::Unknown(other),
    })
}

/// Data of `NBD_REP_META_CONTEXT`.
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Data of `NBD_REP_SERVER`: the name, then an optional description.
pub fn server_reply(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(truncate_utf8(description, MAX_STRING_LEN).as_bytes());
    out
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless NO_ZEROES was agreed.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trips_and_rejects_oldstyle() {
        let g = encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        assert_eq!(parse_greeting(&g), Ok(3));
        let mut old = g;
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(parse_greeting(&old), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn info_request_round_trips() {
        let data = encode_info_request("disk0", &[info::BLOCK_SIZE, info::NAME]);
        let req = parse_info_request(&data).unwrap();
        assert_eq!(req.name, "disk0");
        assert_eq!(req.requests, vec![info::BLOCK_SIZE, info::NAME]);
    }

    #[test]
    fn info_request_rejects_a_name_length_past_the_data() {
        let mut data = encode_info_request("abc", &[]);
        data[..4].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        assert!(matches!(parse_info_request(&data), Err(OptionDataError::LengthPastEnd { .. })));
    }

    #[test]
    fn info_request_rejects_a_request_count_that_disagrees_with_the_data() {
        let mut data = encode_info_request("a", &[1, 2]);
        data.push(0);
        assert_eq!(parse_info_request(&data), Err(OptionDataError::TrailingBytes(1)));
        let data = encode_info_request("a", &[1, 2]);
        assert!(parse_info_request(&data[..data.len() - 1]).is_err());
    }

    #[test]
    fn meta_context_request_with_a_huge_query_count_fails_without_allocating() {
        let mut data = encode_meta_context_request("e", &[]);
        let at = data.len() - 4;
        data[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_meta_context_request(&data), Err(OptionDataError::LengthPastEnd { .. })));
    }

    #[test]
    fn meta_context_request_round_trips() {
        let data = encode_meta_context_request("vm-disk0", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let req = parse_meta_context_request(&data).unwrap();
        assert_eq!(req.export, "vm-disk0");
        assert_eq!(req.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
    }

    #[test]
    fn strings_with_nul_or_bad_utf8_are_rejected() {
        let data = encode_info_request("a\0b", &[]);
        assert_eq!(parse_info_request(&data), Err(OptionDataError::BadString("export name")));
        let mut data = encode_info_request("ab", &[]);
        data[4] = 0xff;
        assert_eq!(parse_info_request(&data), Err(OptionDataError::BadString("export name")));
    }

    #[test]
    fn info_items_parse_and_unknown_types_are_kept_as_unknown() {
        assert_eq!(
            parse_info_item(&info_export(1 << 30, 0x1234)),
            Ok(InfoItem::Export { size: 1 << 30, flags: 0x1234 })
        );
        assert_eq!(
            parse_info_item(&info_block_size(1, 4096, 1 << 25)),
            Ok(InfoItem::BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 })
        );
        assert_eq!(parse_info_item(&[0, 9, 1]), Ok(InfoItem::Unknown(9)));
        assert!(parse_info_item(&[0, 0, 1]).is_err());
        assert!(parse_info_item(&[0]).is_err());
    }

    #[test]
    fn truncate_utf8_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
