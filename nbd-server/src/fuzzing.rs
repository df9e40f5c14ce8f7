//! Entry points for the cargo-fuzz targets in `fuzz/` and for replaying their seed corpus in
//! `cargo test`.
//!
//! They drive the same pure code the server runs — the option state machine and the request
//! decoder plus validation — over arbitrary bytes, with an in-memory export behind them, so a
//! fuzzer explores the protocol without sockets. Each returns a small summary so tests can
//! assert that a seed really reached the phase it was written for.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backend::MemoryBackend;
use crate::proto::cursor::Cursor;
use crate::proto::handshake::OptionHeader;
use crate::proto::transmission::{decode_request, HeaderMode};
use crate::server::dispatch::{payload_len, validate, Limits};
use crate::server::negotiate::{BlockSizes, Negotiator, Scope, Step, Tls};

/// How far a fuzzed stream got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Options handled.
    pub options: usize,
    /// Whether transmission was entered.
    pub entered: bool,
    /// Requests decoded in transmission.
    pub requests: usize,
    /// Requests that validation accepted.
    pub accepted: usize,
}

const MAX_PAYLOAD: u64 = 1 << 25;

/// Run a client byte stream (client flags, options, then requests) through negotiation and
/// request validation against an export named "fuzz" of 1 MiB with two dirty bitmaps; then the same stream against a
/// server that requires TLS, where an accepted `NBD_OPT_STARTTLS` starts a fresh negotiation
/// on the bytes after it (as if the TLS handshake had happened). Returns the first's outcome.
pub fn session(data: &[u8]) -> Outcome {
    let _ = session_requiring_tls(data);
    session_as(data, Tls::Off)
}

/// [`session`] against a server that requires TLS alone.
pub fn session_requiring_tls(data: &[u8]) -> Outcome {
    session_as(data, Tls::Required)
}

fn session_as(data: &[u8], tls: Tls) -> Outcome {
    let registry = crate::server::export::Registry::default();
    // Two bitmaps: metadata context ids and selections past the first are reached too.
    let config = crate::server::ExportConfig::new("fuzz", Arc::new(MemoryBackend::new(1 << 20)))
        .max_connections(2)
        .bitmaps(vec!["b0".into(), "b1".into()]);
    let _ = registry.insert(Arc::new(crate::server::export::Export::new(
        config,
        CancellationToken::new(),
        CancellationToken::new(),
    )));
    let scope = Scope::All;
    let sizes = BlockSizes { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD as u32 };
    let mut c = Cursor::new(data);
    let mut outcome = Outcome::default();
    let Some(flags) = c.u32() else { return outcome };
    if !Negotiator::client_flags_valid(flags) {
        return outcome;
    }
    let mut n = Negotiator::with_tls(&registry, &scope, sizes, flags, tls);
    // A server that requires TLS lets no client reach an export in clear.
    let mut in_clear_only = tls == Tls::Required;
    let mut out = Vec::new();
    let session = loop {
        let Some(head) = c.take(16).and_then(|h| <[u8; 16]>::try_from(h).ok()) else {
            return outcome;
        };
        let Ok(h) = OptionHeader::parse(&head) else {
            return outcome;
        };
        let Some(body) = c.take(h.length as usize) else {
            return outcome;
        };
        out.clear();
        outcome.options += 1;
        match n.handle(h.option, body, &mut out) {
            Step::Continue => {}
            Step::Abort | Step::Disconnect(_) => return outcome,
            Step::Enter(s) => {
                assert!(!in_clear_only, "transmission entered before TLS on a server that requires it");
                break s;
            }
            Step::StartTls => {
                assert!(in_clear_only, "STARTTLS accepted by a server without TLS, or twice");
                in_clear_only = false;
                n = Negotiator::with_tls(&registry, &scope, sizes, flags, Tls::Active);
            }
        }
    };
    outcome.entered = true;
    let limits = Limits {
        size: session.export().size(),
        flags: session.flags,
        structured: session.structured,
        mode: session.mode,
        allocation_context: session.allocation_context,
        bitmap_contexts: session.bitmap_contexts,
        max_payload: MAX_PAYLOAD,
        sendfile: false,
    };
    let rest = c.take(c.remaining()).unwrap_or_default();
    let r = requests(rest, &limits);
    outcome.requests = r.requests;
    outcome.accepted = r.accepted;
    outcome
}

/// Decode and validate a request stream in the mode chosen by the first byte
/// (bit 0: extended headers, bit 1: structured replies, bit 2: read-only).
pub fn request_stream(data: &[u8]) -> Outcome {
    let Some((&selector, rest)) = data.split_first() else {
        return Outcome::default();
    };
    let mode = if selector & 1 != 0 { HeaderMode::Extended } else { HeaderMode::Compact };
    let structured = selector & 3 != 0;
    let mut flags = crate::proto::consts::transmission_flags::HAS_FLAGS | 0x0c6c;
    if selector & 4 != 0 {
        flags |= crate::proto::consts::transmission_flags::READ_ONLY;
    }
    if structured {
        flags |= crate::proto::consts::transmission_flags::SEND_DF;
    }
    let limits = Limits {
        size: 1 << 20,
        flags,
        structured,
        mode,
        allocation_context: structured.then_some(1),
        bitmap_contexts: 0,
        max_payload: MAX_PAYLOAD,
        sendfile: false,
    };
    requests(rest, &limits)
}

fn requests(mut data: &[u8], limits: &Limits) -> Outcome {
    let mut outcome = Outcome::default();
    loop {
        match decode_request(data, limits.mode) {
            Ok(Some((req, used))) => {
                outcome.requests += 1;
                data = data.get(used..).unwrap_or_default();
                let plen = payload_len(&req, limits.mode);
                if plen > limits.max_payload {
                    return outcome;
                }
                if validate(&req, limits).is_ok() {
                    outcome.accepted += 1;
                }
                let skip = usize::try_from(plen).unwrap_or(usize::MAX);
                data = data.get(skip..).unwrap_or_default();
            }
            Ok(None) | Err(_) => return outcome,
        }
    }
}

/// Parse a server byte stream the way the client does (reply headers, then each chunk judged by
/// `proto::reply` against a read of 64 KiB at 1 MiB, a block status query or another command
/// in turn, and its payload parsed: data placed, holes, errors, block status, info items and
/// META_CONTEXT replies), returning how many reply headers were decoded.
pub fn reply_stream(data: &[u8]) -> usize {
    use crate::proto::handshake::parse_info_item;
    use crate::proto::reply::{self, Asked, ChunkBody};
    use crate::proto::transmission::{decode_reply_header, parse_block_status, ReplyHeader};
    let asks = [Asked::Read { offset: 1 << 20, length: 65536 }, Asked::BlockStatus, Asked::Other];
    let mut rest = data;
    let mut decoded = 0;
    while let Ok(Some((header, used))) = decode_reply_header(rest) {
        let asked = asks.get(decoded % asks.len()).copied().unwrap_or(Asked::Other);
        decoded += 1;
        rest = rest.get(used..).unwrap_or_default();
        let ReplyHeader::Chunk { kind, length, .. } = header else { continue };
        let n = usize::try_from(length).unwrap_or(usize::MAX).min(rest.len());
        let payload = rest.get(..n).unwrap_or_default();
        match reply::chunk_body(kind, length, &asked) {
            Ok(ChunkBody::Data { data }) => {
                if let (Some(at), Asked::Read { offset, length }) = (Cursor::new(payload).u64(), asked) {
                    let _ = reply::place(at, data, offset, length);
                }
            }
            Ok(ChunkBody::Hole) => {
                if let (Ok((at, size)), Asked::Read { offset, length }) = (reply::parse_offset_hole(payload), asked) {
                    let _ = reply::place(at, u64::from(size), offset, length);
                }
            }
            Ok(ChunkBody::Status { extended, .. }) => drop(parse_block_status(payload, extended)),
            Ok(ChunkBody::Error { .. }) => drop(reply::parse_error_chunk(kind, payload)),
            Ok(ChunkBody::Empty) | Err(_) => {
                let _ = parse_info_item(payload);
                let _ = reply::parse_meta_context_reply(payload);
            }
        }
        rest = rest.get(n..).unwrap_or_default();
    }
    decoded
}

/// The subject of a client certificate, as `--tls-authz` reads it (`tls_authz::subject_name`):
/// `None` when the bytes are not a certificate.
pub fn certificate_subject(data: &[u8]) -> Option<String> {
    crate::tls_authz::subject_name(data).ok()
}
