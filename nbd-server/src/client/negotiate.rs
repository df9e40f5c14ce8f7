//! The handshake as a client: the greeting, the options this client asks for (extended headers,
//! structured replies, metadata contexts) and NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME
//! for old servers. Option replies are bounded ([`MAX_OPTION_REPLY`]) before they are read, and a
//! context the server grants unasked, or a reply to another option, ends the handshake.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{ClientError, ClientOptions, ExportInfo, Result, Writer};
use crate::proto::consts::{client_flags, handshake_flags, info, opt, rep, BASE_ALLOCATION};
use crate::proto::handshake::{
    self as hs, InfoItem, OptionHeader, OptionReplyHeader, GREETING_LEN, OPTION_REPLY_HEADER_LEN,
};
use crate::proto::reply;
use crate::proto::transmission::HeaderMode;

/// Largest option reply we read.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the handshake settled.
pub(super) struct Negotiated {
    /// The export as the server described it.
    pub(super) export: ExportInfo,
    /// Request and reply headers: extended when the server took them.
    pub(super) mode: HeaderMode,
    /// Whether replies to reads come in chunks.
    pub(super) structured: bool,
    /// Every metadata context the server granted, by name.
    pub(super) contexts: HashMap<String, u32>,
}

/// Run the handshake on `r` and `w` as `options` ask, up to and including NBD_OPT_GO; from the
/// greeting on, or, with `greeted` (the client flags sent before TLS, `starttls.rs`), from the
/// options on.
pub(super) async fn options<R: AsyncRead + Unpin>(
    r: &mut R,
    w: &mut Writer,
    options: &ClientOptions,
    greeted: Option<u32>,
) -> Result<Negotiated> {
    let flags = match greeted {
        Some(flags) => flags,
        None => {
            let flags = greeting(r).await?;
            w.write_all(&flags.to_be_bytes()).await?;
            flags
        }
    };

    let mut mode = HeaderMode::Compact;
    let mut structured = false;
    if options.structured_replies && options.extended_headers && simple_option(r, w, opt::EXTENDED_HEADERS).await? {
        mode = HeaderMode::Extended;
        structured = true;
    }
    if options.structured_replies && !structured {
        structured = simple_option(r, w, opt::STRUCTURED_REPLY).await?;
    }
    let mut contexts = HashMap::new();
    let mut queries: Vec<&str> = options.meta_contexts.iter().map(String::as_str).collect();
    if options.block_status {
        queries.insert(0, BASE_ALLOCATION);
    }
    if structured && !queries.is_empty() {
        send_option(w, opt::SET_META_CONTEXT, &hs::encode_meta_context_request(&options.export, &queries)).await?;
        loop {
            let (h, data) = read_option_reply(r, opt::SET_META_CONTEXT).await?;
            match h.reply {
                rep::META_CONTEXT => {
                    let (id, name) = reply::parse_meta_context_reply(&data)?;
                    if !queries.contains(&name.as_str()) {
                        return Err(ClientError::Protocol(format!("server granted unrequested context {name}")));
                    }
                    contexts.insert(name, id);
                }
                rep::ACK => break,
                e if e & rep::ERR_BIT != 0 => break,
                other => return Err(ClientError::Protocol(format!("unexpected reply {other:#x} to SET_META_CONTEXT"))),
            }
        }
    }
    let export = go(r, w, &options.export, flags & client_flags::NO_ZEROES != 0).await?;
    w.flush().await?;
    Ok(Negotiated { export, mode, structured, contexts })
}

/// Read the server's greeting; the client flags to answer it with.
pub(super) async fn greeting<R: AsyncRead + Unpin>(r: &mut R) -> Result<u32> {
    let mut greeting = [0u8; GREETING_LEN];
    r.read_exact(&mut greeting).await?;
    let server_flags = hs::parse_greeting(&greeting)?;
    if server_flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server does not speak fixed newstyle".into()));
    }
    let mut flags = client_flags::FIXED_NEWSTYLE;
    if server_flags & handshake_flags::NO_ZEROES != 0 {
        flags |= client_flags::NO_ZEROES;
    }
    Ok(flags)
}

/// The error a refused option's reply makes.
pub(super) fn refused(option: u32, reply: u32, message: &[u8]) -> ClientError {
    ClientError::OptionRefused { option, reply, message: String::from_utf8_lossy(message).into_owned() }
}

/// NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME for servers that do not know GO.
async fn go<R: AsyncRead + Unpin>(r: &mut R, w: &mut Writer, name: &str, no_zeroes: bool) -> Result<ExportInfo> {
    let wanted = [info::BLOCK_SIZE, info::NAME, info::DESCRIPTION];
    send_option(w, opt::GO, &hs::encode_info_request(name, &wanted)).await?;
    let mut export = ExportInfo { min_block: 1, preferred_block: 4096, max_payload: 32 << 20, ..Default::default() };
    let mut got_export = false;
    loop {
        let (h, data) = read_option_reply(r, opt::GO).await?;
        match h.reply {
            rep::INFO => match hs::parse_info_item(&data)? {
                InfoItem::Export { size, flags } => {
                    export.size = size;
                    export.flags = flags;
                    got_export = true;
                }
                InfoItem::Name(n) => export.name = Some(n),
                InfoItem::Description(d) => export.description = Some(d),
                InfoItem::BlockSize { minimum, preferred, maximum } => {
                    export.min_block = minimum;
                    export.preferred_block = preferred;
                    export.max_payload = maximum;
                }
                InfoItem::Unknown(_) => {}
            },
            rep::ACK if got_export => return Ok(export),
            rep::ACK => return Err(ClientError::Protocol("GO acknowledged without NBD_INFO_EXPORT".into())),
            rep::ERR_UNSUP => {
                // An old server: EXPORT_NAME has no error path; it answers with size and flags.
                let mut out = Vec::new();
                OptionHeader::encode(&mut out, opt::EXPORT_NAME, name.as_bytes());
                w.write_all(&out).await?;
                w.flush().await?;
                export.size = r.read_u64().await?;
                export.flags = r.read_u16().await?;
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    r.read_exact(&mut zeroes).await?;
                }
                return Ok(export);
            }
            e if e & rep::ERR_BIT != 0 => return Err(refused(opt::GO, e, &data)),
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:#x} to GO"))),
        }
    }
}

async fn send_option(w: &mut Writer, option: u32, data: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    OptionHeader::encode(&mut out, option, data);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

pub(super) async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>)> {
    let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut head).await?;
    let h = OptionReplyHeader::parse(&head)?;
    if h.option != option {
        return Err(ClientError::Protocol(format!("reply for option {} while waiting for {option}", h.option)));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol(format!("option reply of {} bytes", h.length)));
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data).await?;
    Ok((h, data))
}

/// Send an option without data; true on ACK, false on an error reply.
async fn simple_option<R: AsyncRead + Unpin>(r: &mut R, w: &mut Writer, option: u32) -> Result<bool> {
    send_option(w, option, &[]).await?;
    let (h, _) = read_option_reply(r, option).await?;
    Ok(h.reply == rep::ACK)
}
