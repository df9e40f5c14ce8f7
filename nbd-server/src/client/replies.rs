//! The reply reader: one task per connection reads every reply and hands it to the request that
//! waits for it by cookie ([`Pending`]). Structured chunks may come in any order; a read's are
//! placed into its buffer, or kept as the transport's pieces ([`Expect::Pieces`]), and a read
//! whose chunks do not cover it exactly, or overlap, is a protocol error. Every length is judged
//! against the request it answers (`proto::reply`) before anything is read or allocated. When
//! the reader stops, for whatever reason, every waiting request fails with
//! [`ClientError::Closed`].

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::source::ReplySource;
use super::{ClientError, Inner, Result};
use crate::proto::consts::reply_flags;
use crate::proto::reply::{self, Asked, ChunkBody};
use crate::proto::transmission::{self as tx, Extent, ReplyHeader};

/// What a request waits for.
pub(super) enum Expect {
    Simple,
    /// A read into `buf`; `covered` counts the bytes its chunks have filled so far.
    Read {
        offset: u64,
        buf: Vec<u8>,
        covered: u64,
    },
    /// A read answered with owned pieces, each with its position in the read.
    Pieces {
        offset: u64,
        length: u64,
        pieces: Vec<(usize, Bytes)>,
        covered: u64,
    },
    Status {
        context: u32,
        extents: Vec<Extent>,
    },
}

impl Expect {
    fn asked(&self) -> Asked {
        match self {
            Self::Read { offset, buf, .. } => Asked::Read { offset: *offset, length: buf.len() as u64 },
            Self::Pieces { offset, length, .. } => Asked::Read { offset: *offset, length: *length },
            Self::Status { .. } => Asked::BlockStatus,
            Self::Simple => Asked::Other,
        }
    }

    /// For a read whose chunks have not covered it exactly: how many bytes they covered of how
    /// many.
    fn uncovered(&self) -> Option<(u64, u64)> {
        match self {
            Self::Read { buf, covered, .. } if *covered != buf.len() as u64 => Some((*covered, buf.len() as u64)),
            Self::Pieces { length, covered, .. } if covered != length => Some((*covered, *length)),
            _ => None,
        }
    }
}

/// A request waiting for its reply.
pub(super) struct Pending {
    pub(super) expect: Expect,
    pub(super) error: Option<ClientError>,
    pub(super) reply: oneshot::Sender<Result<Expect>>,
    /// The request's in-flight slot, given back when the reply has been read.
    pub(super) _slot: OwnedSemaphorePermit,
}

fn take_pending(inner: &Inner, cookie: u64) -> Option<Pending> {
    inner.pending.lock().ok()?.map.remove(&cookie)
}

/// Fail every waiting request and refuse later ones: the connection is gone.
pub(super) fn fail_all(inner: &Inner) {
    if let Ok(mut p) = inner.pending.lock() {
        p.closed = true;
        for (_, pending) in p.map.drain() {
            let _ = pending.reply.send(Err(ClientError::Closed));
        }
    }
}

/// The connection's reader task: replies until the stream ends or breaks the protocol.
pub(super) async fn reader_loop<S: ReplySource>(mut r: S, inner: std::sync::Weak<Inner>) {
    let result = read_replies(&mut r, &inner).await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "client reader stopped");
    }
    if let Some(inner) = inner.upgrade() {
        fail_all(&inner);
    }
}

async fn read_replies<S: ReplySource>(r: &mut S, weak: &std::sync::Weak<Inner>) -> Result<()> {
    let mut head = [0u8; 32];
    loop {
        let Some(first) = head.get_mut(..4) else {
            return Ok(());
        };
        match r.read_exact(first).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len =
            tx::reply_header_len(magic).ok_or_else(|| ClientError::Protocol(format!("bad reply magic {magic:#x}")))?;
        if let Some(rest) = head.get_mut(4..len) {
            r.read_exact(rest).await?;
        }
        let Some((header, _)) = tx::decode_reply_header(head.get(..len).unwrap_or_default())? else {
            return Err(ClientError::Protocol("short reply header".into()));
        };
        let Some(inner) = weak.upgrade() else {
            return Ok(());
        };
        match header {
            ReplyHeader::Simple { cookie, error } => {
                let mut p = take_pending(&inner, cookie)
                    .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))?;
                if error != 0 {
                    let _ = p.reply.send(Err(ClientError::Request { error, message: String::new() }));
                    continue;
                }
                let is_read = matches!(p.expect, Expect::Read { .. } | Expect::Pieces { .. });
                if is_read && inner.structured {
                    return Err(ClientError::Protocol("simple reply to a read with structured replies".into()));
                }
                match &mut p.expect {
                    Expect::Read { buf, .. } => {
                        r.read_exact(buf).await?;
                    }
                    Expect::Pieces { length, pieces, covered, .. } => {
                        let mut got = Vec::new();
                        r.read_owned(*length as usize, &mut got).await?;
                        place_pieces(pieces, 0, got);
                        *covered = *length;
                    }
                    _ => {}
                }
                let _ = p.reply.send(Ok(p.expect));
            }
            ReplyHeader::Chunk { flags, kind, cookie, length } => {
                let mut p = take_pending(&inner, cookie)
                    .ok_or_else(|| ClientError::Protocol(format!("chunk for unknown cookie {cookie}")))?;
                let body = reply::chunk_body(kind, length, &p.expect.asked())?;
                apply_chunk(r, &mut p, kind, body).await?;
                if flags & reply_flags::DONE != 0 {
                    let result = match (p.error.take(), p.expect.uncovered()) {
                        (Some(e), _) => Err(e),
                        (None, Some((covered, length))) => {
                            return Err(ClientError::Protocol(format!(
                                "read reply covered {covered} of {length} bytes"
                            )));
                        }
                        (None, None) => Ok(p.expect),
                    };
                    let _ = p.reply.send(result);
                } else if let Ok(mut table) = inner.pending.lock() {
                    table.map.insert(cookie, p);
                }
            }
        }
    }
}

/// Pieces are kept, not written into place: chunks that together claim more than the read are
/// refused before they are read, so what a server sends for one read never exceeds what it
/// asked for.
fn check_tiling(covered: u64, more: u64, length: u64) -> Result<()> {
    match covered.checked_add(more) {
        Some(total) if total <= length => Ok(()),
        _ => Err(ClientError::Protocol("read reply chunks overlap: more bytes than were read".into())),
    }
}

/// Record `got`, the pieces of a data run that starts at byte `start` of the read.
fn place_pieces(pieces: &mut Vec<(usize, Bytes)>, start: usize, got: Vec<Bytes>) {
    let mut at = start;
    for piece in got {
        let len = piece.len();
        pieces.push((at, piece));
        at += len;
    }
}

/// Consume one chunk's payload as `body` (already judged against the request) into `p`.
async fn apply_chunk<S: ReplySource>(r: &mut S, p: &mut Pending, kind: u16, body: ChunkBody) -> Result<()> {
    match (body, &mut p.expect) {
        (ChunkBody::Empty, _) => Ok(()),
        (ChunkBody::Data { data }, Expect::Read { offset, buf, covered }) => {
            let at = r.read_u64().await?;
            let range = reply::place(at, data, *offset, buf.len() as u64)?;
            let dst = buf.get_mut(range).ok_or_else(|| ClientError::Protocol("data chunk range".into()))?;
            r.read_exact(dst).await?;
            *covered += data;
            Ok(())
        }
        (ChunkBody::Data { data }, Expect::Pieces { offset, length, pieces, covered }) => {
            let at = r.read_u64().await?;
            let range = reply::place(at, data, *offset, *length)?;
            check_tiling(*covered, data, *length)?;
            let mut got = Vec::new();
            r.read_owned(range.len(), &mut got).await?;
            place_pieces(pieces, range.start, got);
            *covered += data;
            Ok(())
        }
        (ChunkBody::Hole, Expect::Pieces { offset, length, pieces, covered }) => {
            let mut payload = [0u8; 12];
            r.read_exact(&mut payload).await?;
            let (at, n) = reply::parse_offset_hole(&payload)?;
            let range = reply::place(at, u64::from(n), *offset, *length)?;
            check_tiling(*covered, u64::from(n), *length)?;
            pieces.push((range.start, Bytes::from(vec![0u8; range.len()])));
            *covered += u64::from(n);
            Ok(())
        }
        (ChunkBody::Hole, Expect::Read { offset, buf, covered }) => {
            let mut payload = [0u8; 12];
            r.read_exact(&mut payload).await?;
            let (at, n) = reply::parse_offset_hole(&payload)?;
            let range = reply::place(at, u64::from(n), *offset, buf.len() as u64)?;
            if let Some(dst) = buf.get_mut(range) {
                dst.fill(0);
            }
            *covered += u64::from(n);
            Ok(())
        }
        (ChunkBody::Status { length, extended }, Expect::Status { context, extents }) => {
            let mut payload = vec![0u8; length];
            r.read_exact(&mut payload).await?;
            let (id, got) = tx::parse_block_status(&payload, extended)?;
            // With several contexts selected the server answers one chunk per context.
            if id == *context {
                extents.extend(got);
            }
            Ok(())
        }
        (ChunkBody::Error { length }, _) => {
            let mut payload = vec![0u8; length];
            r.read_exact(&mut payload).await?;
            let e = reply::parse_error_chunk(kind, &payload)?;
            p.error.get_or_insert(ClientError::Request { error: e.error, message: e.message });
            Ok(())
        }
        _ => Err(ClientError::Protocol(format!("chunk type {kind} does not answer this request"))),
    }
}
