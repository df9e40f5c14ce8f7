//! One request from decoded header to encoded reply: validation (pure) then execution.
//!
//! [`validate`] decides, from the header and the session alone, whether a request may run and
//! which NBD error it gets otherwise; it is where every error code of the spec is chosen.
//! [`execute`] runs an accepted request against the backend and builds the reply: simple,
//! structured or extended as negotiated, with sparse reads answered by `OFFSET_HOLE` chunks
//! where block status says the range reads as zeroes.

use std::ops::Range;
use std::sync::Arc;

use directio::AlignedBuf;

use crate::backend::{BackendError, BackendErrorKind, FileExtent, PipedData, ZeroFlags};
use crate::proto::consts::{cmd_flags, errno, transmission_flags as tf};
use crate::proto::transmission::{self as tx, Command, Extent, HeaderMode, Request};

use super::export::{bitmap_bit, bump, Export};
use super::negotiate::BITMAP_CONTEXT_ID;

/// What validation needs to know about the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub mode: HeaderMode,
    pub allocation_context: Option<u32>,
    /// The export's bitmaps selected, bit `i` for its bitmap `i` (context id
    /// `BITMAP_CONTEXT_ID + i`).
    pub bitmap_contexts: u64,
    pub max_payload: u64,
    /// The connection can send file data straight from the file (`sendfile`, TCP).
    pub sendfile: bool,
}

/// Why a request is refused: the NBD error and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub error: u32,
    pub message: String,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal { error, message: message.into() }
}

/// Bytes of payload that follow this header on the wire.
pub(crate) fn payload_len(req: &Request, mode: HeaderMode) -> u64 {
    match req.command {
        Command::Write => req.length,
        _ if mode == HeaderMode::Extended && req.flags & cmd_flags::PAYLOAD_LEN != 0 => req.length,
        _ => 0,
    }
}

fn range_end(req: &Request) -> Option<u64> {
    req.offset.checked_add(req.length)
}

/// Decide whether `req` may run.
pub(crate) fn validate(req: &Request, l: &Limits) -> Result<(), Refusal> {
    if let Command::Unknown(c) = req.command {
        return Err(refuse(errno::EINVAL, format!("unknown command {c}")));
    }
    let unknown = req.flags & !req.command.allowed_flags();
    if unknown != 0 {
        return Err(refuse(errno::EINVAL, format!("flags {unknown:#x} are not valid for {:?}", req.command)));
    }
    if req.flags & cmd_flags::PAYLOAD_LEN != 0 && l.mode != HeaderMode::Extended {
        return Err(refuse(errno::EINVAL, "PAYLOAD_LEN needs extended headers"));
    }
    if req.flags & cmd_flags::DF != 0 && l.flags & tf::SEND_DF == 0 {
        return Err(refuse(errno::EINVAL, "DF needs structured replies"));
    }
    if req.flags & cmd_flags::FAST_ZERO != 0 && l.flags & tf::SEND_FAST_ZERO == 0 {
        return Err(refuse(errno::EINVAL, "FAST_ZERO was not advertised"));
    }
    let in_range = range_end(req).is_some_and(|end| end <= l.size);
    let read_only = l.flags & tf::READ_ONLY != 0;
    let past_end =
        || format!("range {:#x}+{:#x} is past the end of the {:#x}-byte export", req.offset, req.length, l.size);
    match req.command {
        Command::Read => {
            if req.length > l.max_payload {
                // With structured replies the spec names EOVERFLOW for "too large, retry smaller".
                let error = if l.structured { errno::EOVERFLOW } else { errno::EINVAL };
                let msg = format!("read of {} bytes exceeds the maximum payload {}", req.length, l.max_payload);
                return Err(refuse(error, msg));
            }
            if !in_range {
                return Err(refuse(errno::EINVAL, past_end()));
            }
        }
        Command::Write | Command::WriteZeroes => {
            if req.command == Command::WriteZeroes && l.flags & tf::SEND_WRITE_ZEROES == 0 && !read_only {
                return Err(refuse(errno::EINVAL, "write zeroes is not supported by this export"));
            }
            if read_only {
                return Err(refuse(errno::EPERM, "export is read-only"));
            }
            if !in_range {
                return Err(refuse(errno::ENOSPC, past_end()));
            }
        }
        Command::Trim => {
            if read_only {
                return Err(refuse(errno::EPERM, "export is read-only"));
            }
            if l.flags & tf::SEND_TRIM == 0 {
                return Err(refuse(errno::EINVAL, "trim is not supported by this export"));
            }
            if !in_range {
                return Err(refuse(errno::EINVAL, past_end()));
            }
        }
        Command::Cache => {
            if l.flags & tf::SEND_CACHE == 0 {
                return Err(refuse(errno::EINVAL, "cache is not supported by this export"));
            }
            if !in_range {
                return Err(refuse(errno::EINVAL, past_end()));
            }
        }
        Command::BlockStatus => {
            if l.allocation_context.is_none() && l.bitmap_contexts == 0 {
                return Err(refuse(errno::EINVAL, "no metadata context was selected for this export"));
            }
            if req.length == 0 {
                return Err(refuse(errno::EINVAL, "block status of an empty range"));
            }
            if !in_range {
                return Err(refuse(errno::EINVAL, past_end()));
            }
        }
        Command::Flush | Command::Disconnect | Command::Unknown(_) => {}
    }
    Ok(())
}

/// An encoded reply: header bytes and bulk data, written in `segments` order.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub head: Vec<u8>,
    pub data: AlignedBuf,
    /// Where the reply's data lies when it is sent from files ([`crate::Backend::file_range`]) rather
    /// than from `data`; its `Segment::File`s point into it.
    pub files: Option<FileData>,
    pub segments: Vec<Segment>,
}

/// The files a reply's data is sent from, and where the request's range lies in them.
#[derive(Debug)]
pub(crate) struct FileData {
    /// The request's range, in order, from its first byte.
    extents: Vec<FileExtent>,
    /// The first extent the next [`FileData::segments`] call may need, and where it starts in
    /// the request: calls come in order, so a reply costs one pass over its extents however
    /// many data chunks it has.
    cursor: (usize, u64),
}

impl FileData {
    fn new(extents: Vec<FileExtent>) -> Self {
        Self { extents, cursor: (0, 0) }
    }

    /// The file of extent `index`.
    pub fn file(&self, index: usize) -> Option<&std::fs::File> {
        match self.extents.get(index)? {
            FileExtent::File { file, .. } => Some(file),
            FileExtent::Zero { .. } => None,
        }
    }

    /// The segments that send `range` of the request (bytes from its first one); ranges come
    /// in increasing order.
    fn segments(&mut self, range: Range<u64>, out: &mut Vec<Segment>) {
        let (mut index, mut start) = self.cursor;
        if range.start < start {
            (index, start) = (0, 0); // out of order: start over
        }
        while let Some(extent) = self.extents.get(index) {
            let end = start + extent.length();
            let (from, to) = (range.start.max(start), range.end.min(end));
            if from < to {
                out.push(match extent {
                    FileExtent::File { offset, .. } => {
                        Segment::File { index, range: offset + (from - start)..offset + (to - start) }
                    }
                    FileExtent::Zero { .. } => Segment::Zeroes(to - from),
                });
            }
            if end > range.end {
                break; // the next range may still need this extent
            }
            (index, start) = (index + 1, end);
        }
        self.cursor = (index, start);
    }
}

/// A piece of a reply.
#[derive(Debug, Clone)]
pub(crate) enum Segment {
    /// Bytes of `head`.
    Head(Range<usize>),
    /// Bytes of `data`.
    Data(Range<usize>),
    /// Bytes of the file of extent `index` of the reply's [`FileData`], at these offsets, sent
    /// from the file itself (`sendfile`).
    File { index: usize, range: Range<u64> },
    /// This many zero bytes, in a reply sent from files.
    Zeroes(u64),
}

impl Reply {
    /// Append header bytes produced by `f`.
    pub fn head(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.head.len();
        f(&mut self.head);
        let end = self.head.len();
        match self.segments.last_mut() {
            Some(Segment::Head(r)) if r.end == start => r.end = end,
            _ => self.segments.push(Segment::Head(start..end)),
        }
    }

    /// Read data: `range` of the request's bytes, from the buffer or, when the reply is sent
    /// from files, from where they lie in them.
    fn payload(&mut self, range: Range<usize>) {
        match &mut self.files {
            Some(files) => files.segments(range.start as u64..range.end as u64, &mut self.segments),
            None => self.segments.push(Segment::Data(range)),
        }
    }
}

/// The error reply for `req`, in the negotiated layout.
pub(crate) fn error_reply(req: &Request, l: &Limits, error: u32, message: &str) -> Reply {
    let mut r = Reply::default();
    if l.structured {
        r.head(|o| tx::encode_error_chunk(o, l.mode, req.cookie, req.offset, error, message));
    } else {
        r.head(|o| tx::encode_simple_reply(o, req.cookie, error));
    }
    r
}

fn ok_reply(req: &Request, l: &Limits) -> Reply {
    let mut r = Reply::default();
    match l.mode {
        HeaderMode::Extended => r.head(|o| tx::encode_done(o, l.mode, req.cookie, req.offset)),
        HeaderMode::Compact => r.head(|o| tx::encode_simple_reply(o, req.cookie, 0)),
    }
    r
}

fn nbd_error(e: &BackendError, fast_zero: bool) -> u32 {
    match e.kind {
        BackendErrorKind::Unsupported if fast_zero => errno::ENOTSUP,
        BackendErrorKind::Unsupported | BackendErrorKind::InvalidInput => errno::EINVAL,
        BackendErrorKind::NoSpace => errno::ENOSPC,
        BackendErrorKind::ReadOnly => errno::EPERM,
        _ => errno::EIO,
    }
}

/// Run an accepted request. `buffer` holds the write payload for WRITE and is the read buffer
/// (already `length` bytes, contents unspecified) for READ; it travels back in the reply so the
/// connection can reuse it.
/// A request's payload as the connection's reader took it off the wire: in a buffer (which also
/// carries a READ's data back), or, for a large write from a TCP client, in a pipe.
#[derive(Debug)]
pub(crate) enum Payload {
    Buffer(AlignedBuf),
    Piped(PipedData),
}

impl Payload {
    /// The buffer to hand back with the reply (none for a piped payload).
    pub(crate) fn into_buffer(self) -> AlignedBuf {
        match self {
            Self::Buffer(buffer) => buffer,
            Self::Piped(_) => AlignedBuf::default(),
        }
    }
}

pub(crate) async fn execute(export: &Arc<Export>, req: Request, payload: Payload, l: &Limits) -> Reply {
    let (payload, mut piped) = match payload {
        Payload::Buffer(buffer) => (buffer, None),
        Payload::Piped(piped) => (AlignedBuf::default(), Some(piped)),
    };
    let backend = &export.backend;
    let c = &export.counters;
    let fua = req.flags & cmd_flags::FUA != 0;
    let result = match req.command {
        Command::Read => {
            bump(&c.reads, 1);
            return read(export, &req, l, payload).await;
        }
        Command::Write => {
            bump(&c.writes, 1);
            match piped.as_mut() {
                Some(piped) => {
                    bump(&c.bytes_written, piped.len() as u64);
                    backend.write_piped(req.offset, piped, fua).await
                }
                None => {
                    bump(&c.bytes_written, payload.len() as u64);
                    backend.write(req.offset, &payload, fua).await
                }
            }
        }
        Command::Flush => {
            bump(&c.flushes, 1);
            backend.flush().await
        }
        Command::Trim => {
            bump(&c.trims, 1);
            backend.trim(req.offset, req.length, fua).await
        }
        Command::WriteZeroes => {
            bump(&c.zeroes, 1);
            let flags = ZeroFlags {
                no_hole: req.flags & cmd_flags::NO_HOLE != 0,
                fast: req.flags & cmd_flags::FAST_ZERO != 0,
                fua,
            };
            backend.write_zeroes(req.offset, req.length, flags).await
        }
        Command::Cache => {
            bump(&c.caches, 1);
            backend.cache(req.offset, req.length).await
        }
        Command::BlockStatus => {
            bump(&c.block_status, 1);
            return block_status(export, &req, l).await;
        }
        Command::Disconnect | Command::Unknown(_) => Ok(()),
    };
    let mut reply = match result {
        Ok(()) => ok_reply(&req, l),
        Err(e) => {
            bump(&c.errors, 1);
            let fast = req.command == Command::WriteZeroes && req.flags & cmd_flags::FAST_ZERO != 0;
            if !(fast && e.kind == BackendErrorKind::Unsupported) {
                tracing::warn!(export = %export.name, command = ?req.command, offset = req.offset, error = %e, "request failed");
            }
            error_reply(&req, l, nbd_error(&e, fast), &e.message)
        }
    };
    reply.data = payload;
    reply
}

/// Smallest hole worth its own chunk; smaller ones are sent as data.
const MIN_HOLE_CHUNK: u64 = 4096;

async fn read(export: &Arc<Export>, req: &Request, l: &Limits, mut data: AlignedBuf) -> Reply {
    let len = req.length as usize;
    // A file the writer can send from directly: no copy through `data` (left unread).
    let files = if l.sendfile { export.backend.file_range(req.offset, req.length) } else { None };
    // A backend that places fewer or more bytes than asked for is not trusted with the reply.
    let files = files.filter(|e| e.iter().map(FileExtent::length).sum::<u64>() == req.length);
    if files.is_none() && !data.set_len(len) {
        data = AlignedBuf::new(len);
    }
    // Which parts to actually read: all of it, unless block status shows zero ranges.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new(); // (relative offset, length, is_hole)
    let sparse = l.structured
        && req.flags & cmd_flags::DF == 0
        && len as u64 >= MIN_HOLE_CHUNK
        && export.backend.capabilities().block_status;
    if sparse {
        if let Ok(extents) = export.backend.block_status(req.offset, req.length).await {
            let mut pos = 0u64;
            for e in extents {
                if pos >= req.length || e.length == 0 {
                    break;
                }
                let n = e.length.min(req.length - pos);
                let hole = e.flags & crate::proto::consts::STATE_ZERO != 0 && n >= MIN_HOLE_CHUNK;
                match pieces.last_mut() {
                    Some(last) if last.2 == hole => last.1 += n,
                    _ => pieces.push((pos, n, hole)),
                }
                pos += n;
            }
            if pos < req.length {
                match pieces.last_mut() {
                    Some(last) if !last.2 => last.1 += req.length - pos,
                    _ => pieces.push((pos, req.length - pos, false)),
                }
            }
        }
    }
    if pieces.is_empty() {
        pieces.push((0, req.length, false));
    }
    for &(rel, n, hole) in &pieces {
        if hole || files.is_some() {
            continue;
        }
        // A piece outside the buffer would leave pool bytes of an earlier request in the reply.
        let Some(buf) = data.get_mut(rel as usize..(rel + n) as usize) else {
            bump(&export.counters.errors, 1);
            tracing::error!(export = %export.name, offset = req.offset, "internal: read piece outside its buffer");
            return error_reply(req, l, errno::EIO, "internal error: read piece outside its buffer");
        };
        if let Err(e) = export.backend.read(req.offset + rel, buf).await {
            bump(&export.counters.errors, 1);
            tracing::warn!(export = %export.name, offset = req.offset, error = %e, "read failed");
            return error_reply(req, l, nbd_error(&e, false), &e.message);
        }
    }
    bump(&export.counters.bytes_read, req.length);
    let mut reply = Reply { files: files.map(FileData::new), ..Reply::default() };
    if !l.structured {
        reply.head(|o| tx::encode_simple_reply(o, req.cookie, 0));
        reply.payload(0..len);
        reply.data = data;
        return reply;
    }
    if req.length == 0 {
        reply.head(|o| tx::encode_done(o, l.mode, req.cookie, req.offset));
        return reply;
    }
    let last = pieces.len() - 1;
    for (i, &(rel, n, hole)) in pieces.iter().enumerate() {
        let done = i == last;
        if hole {
            reply.head(|o| tx::encode_offset_hole(o, l.mode, done, req.cookie, req.offset, req.offset + rel, n as u32));
        } else {
            reply.head(|o| tx::encode_offset_data_header(o, l.mode, done, req.cookie, req.offset, req.offset + rel, n));
            reply.payload(rel as usize..(rel + n) as usize);
        }
    }
    reply.data = data;
    reply
}

/// Most descriptors in one block status chunk (the spec's SHOULD).
const MAX_DESCRIPTORS: usize = 1 << 20;
/// Largest compact extent, kept a multiple of 512.
const MAX_COMPACT_EXTENT: u64 = u32::MAX as u64 & !511;

/// Clip, merge and bound backend extents into what the reply may carry.
pub(crate) fn shape_extents(raw: &[Extent], length: u64, req_one: bool, mode: HeaderMode) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u64;
    for e in raw {
        if covered >= length || out.len() >= MAX_DESCRIPTORS {
            break;
        }
        let mut n = e.length.min(length - covered);
        if n == 0 {
            continue;
        }
        let capped = mode == HeaderMode::Compact && n > MAX_COMPACT_EXTENT;
        if capped {
            n = MAX_COMPACT_EXTENT;
        }
        match out.last_mut() {
            Some(last)
                if last.flags == e.flags && (mode == HeaderMode::Extended || last.length + n <= MAX_COMPACT_EXTENT) =>
            {
                last.length += n
            }
            _ => out.push(Extent { length: n, flags: e.flags }),
        }
        covered += n;
        if capped {
            break;
        }
    }
    if out.is_empty() {
        let n = if mode == HeaderMode::Compact { length.min(MAX_COMPACT_EXTENT) } else { length };
        out.push(Extent { length: n.max(1), flags: 0 });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// One block status chunk per selected context, the last marked done: `base:allocation` (where
/// the backend cannot tell, "data" is always true), then each dirty bitmap selected, in the
/// export's order, whose bits cannot be guessed: if the backend fails one, the request fails.
async fn block_status(export: &Arc<Export>, req: &Request, l: &Limits) -> Reply {
    let one = req.flags & cmd_flags::REQ_ONE != 0;
    let mut chunks: Vec<(u32, Vec<Extent>)> = Vec::new();
    if let Some(id) = l.allocation_context {
        let raw = if export.backend.capabilities().block_status {
            match export.backend.block_status(req.offset, req.length).await {
                Ok(e) => e,
                Err(e) => {
                    // Allowed by the spec: status 0 ("allocated, contents unknown") is always true.
                    tracing::debug!(export = %export.name, error = %e, "block status unavailable; reporting data");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        chunks.push((id, shape_extents(&raw, req.length, one, l.mode)));
    }
    let selected = export.bitmaps.iter().zip(BITMAP_CONTEXT_ID..).enumerate();
    for (name, id) in selected.filter(|(i, _)| l.bitmap_contexts & bitmap_bit(*i) != 0).map(|(_, b)| b) {
        match export.backend.bitmap_status(name, req.offset, req.length).await {
            Ok(raw) if !raw.is_empty() => chunks.push((id, shape_extents(&raw, req.length, one, l.mode))),
            Ok(_) => return error_reply(req, l, errno::EIO, &format!("bitmap {name}: no status for this range")),
            Err(e) => return error_reply(req, l, errno::EIO, &format!("bitmap {name}: {e}")),
        }
    }
    let mut reply = Reply::default();
    let last = chunks.len().saturating_sub(1);
    for (i, (id, extents)) in chunks.iter().enumerate() {
        reply.head(|o| tx::encode_block_status(o, l.mode, i == last, req.cookie, req.offset, *id, extents));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::consts::{STATE_HOLE, STATE_ZERO};

    /// What `segments` sends, as (extent index or `None` for zeroes, file range).
    fn sent(files: &mut FileData, range: Range<u64>) -> Vec<(Option<usize>, Range<u64>)> {
        let mut out = Vec::new();
        files.segments(range, &mut out);
        out.into_iter()
            .map(|s| match s {
                Segment::File { index, range } => (Some(index), range),
                Segment::Zeroes(n) => (None, 0..n),
                other => panic!("not file data: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn file_data_places_each_chunk_of_a_reply_in_its_extents_in_one_pass() {
        let a = Arc::new(tempfile::tempfile().unwrap());
        let b = Arc::new(tempfile::tempfile().unwrap());
        let mut files = FileData::new(vec![
            FileExtent::File { file: Arc::clone(&a), offset: 1000, length: 4096 },
            FileExtent::Zero { length: 4096 },
            FileExtent::File { file: Arc::clone(&b), offset: 0, length: 8192 },
        ]);
        assert_eq!(sent(&mut files, 0..100), [(Some(0), 1000..1100)]);
        assert_eq!(sent(&mut files, 100..6000), [(Some(0), 1100..5096), (None, 0..1904)]);
        // A hole chunk between (6000..9000) is not asked for; the rest is.
        assert_eq!(sent(&mut files, 9000..16384), [(Some(2), 808..8192)]);
        assert_eq!(files.cursor, (3, 16384), "every extent passed once");
        // Out of order (never sent by the server, but placed right all the same).
        assert_eq!(sent(&mut files, 4000..8200), [(Some(0), 5000..5096), (None, 0..4096), (Some(2), 0..8)]);
        assert!(files.file(1).is_none() && files.file(2).is_some());
    }

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            flags: tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_DF,
            structured: true,
            mode: HeaderMode::Compact,
            allocation_context: Some(1),
            bitmap_contexts: 0,
            max_payload: 1 << 25,
            sendfile: false,
        }
    }

    fn req(command: Command, offset: u64, length: u64, flags: u16) -> Request {
        Request { flags, command, cookie: 1, offset, length }
    }

    #[test]
    fn each_misuse_gets_the_error_the_spec_names() {
        let l = limits();
        let err = |r: Request, l: &Limits| validate(&r, l).unwrap_err().error;
        assert_eq!(err(req(Command::Read, 1 << 20, 1, 0), &l), errno::EINVAL);
        assert_eq!(err(req(Command::Write, (1 << 20) - 1, 2, 0), &l), errno::ENOSPC);
        assert_eq!(err(req(Command::WriteZeroes, u64::MAX, 2, 0), &l), errno::ENOSPC);
        assert_eq!(err(req(Command::Trim, 1 << 20, 1, 0), &l), errno::EINVAL);
        assert_eq!(err(req(Command::Unknown(42), 0, 0, 0), &l), errno::EINVAL);
        assert_eq!(err(req(Command::Read, 0, 1, cmd_flags::REQ_ONE), &l), errno::EINVAL);
        assert_eq!(
            err(req(Command::WriteZeroes, 0, 1, cmd_flags::FAST_ZERO), &l),
            errno::EINVAL,
            "fast zero not advertised"
        );
        assert_eq!(err(req(Command::Read, 0, (1 << 25) + 1, 0), &l), errno::EOVERFLOW);
        let simple = Limits { structured: false, flags: l.flags & !tf::SEND_DF, ..l };
        assert_eq!(err(req(Command::Read, 0, (1 << 25) + 1, 0), &simple), errno::EINVAL);
        let ro = Limits { flags: l.flags | tf::READ_ONLY, ..l };
        assert_eq!(err(req(Command::Write, 0, 1, 0), &ro), errno::EPERM);
        assert_eq!(err(req(Command::Trim, 0, 1, 0), &ro), errno::EPERM);
        let no_ctx = Limits { allocation_context: None, bitmap_contexts: 0, ..l };
        assert_eq!(err(req(Command::BlockStatus, 0, 1, 0), &no_ctx), errno::EINVAL);
        assert!(validate(&req(Command::Write, 0, 1, cmd_flags::FUA), &l).is_ok());
        assert!(validate(&req(Command::Flush, 0, 0, cmd_flags::FUA), &l).is_ok());
    }

    #[test]
    fn payload_length_counts_writes_and_extended_payload_flags_only() {
        assert_eq!(payload_len(&req(Command::Write, 0, 512, 0), HeaderMode::Compact), 512);
        assert_eq!(payload_len(&req(Command::Read, 0, 512, 0), HeaderMode::Compact), 0);
        assert_eq!(payload_len(&req(Command::BlockStatus, 0, 16, cmd_flags::PAYLOAD_LEN), HeaderMode::Extended), 16);
        assert_eq!(payload_len(&req(Command::BlockStatus, 0, 16, cmd_flags::PAYLOAD_LEN), HeaderMode::Compact), 0);
    }

    #[test]
    fn extents_are_clipped_to_the_request_merged_and_capped_for_compact_replies() {
        let hole = STATE_HOLE | STATE_ZERO;
        let raw = [
            Extent { length: 100, flags: hole },
            Extent { length: 50, flags: hole },
            Extent { length: 1000, flags: 0 },
        ];
        assert_eq!(
            shape_extents(&raw, 400, false, HeaderMode::Compact),
            vec![Extent { length: 150, flags: hole }, Extent { length: 250, flags: 0 }]
        );
        assert_eq!(shape_extents(&raw, 400, true, HeaderMode::Compact), vec![Extent { length: 150, flags: hole }]);
        let huge = [Extent { length: 10 << 32, flags: 0 }];
        let c = shape_extents(&huge, 10 << 32, false, HeaderMode::Compact);
        assert_eq!(c, vec![Extent { length: MAX_COMPACT_EXTENT, flags: 0 }]);
        let e = shape_extents(&huge, 10 << 32, false, HeaderMode::Extended);
        assert_eq!(e, vec![Extent { length: 10 << 32, flags: 0 }]);
        assert_eq!(shape_extents(&[], 7, false, HeaderMode::Compact), vec![Extent { length: 7, flags: 0 }]);
    }
}
