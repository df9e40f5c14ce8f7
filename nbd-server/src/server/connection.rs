//! One client connection: handshake, then one reader, many request tasks, one writer.
//!
//! The reader takes a request permit *before* reading the next header and byte-budget permits
//! (the connection's, then the server's) before allocating a payload or read buffer, so a
//! connection never holds more than `max_in_flight` requests or `max_buffered_bytes` of data, and
//! all connections together no more than `max_buffered_bytes_total`, whatever clients send; when a
//! budget is spent the reader simply stops reading the socket (TCP backpressure). Each accepted
//! request runs in its own task, so replies may leave out of order as the spec allows; the
//! permits travel with the reply and are released only once the writer has put it on the wire.
//! The writer is the only task that touches the write half, so replies never interleave. On a
//! TCP connection it sends read data that a backend offers from a file in memory with `sendfile`
//! (`Backend::file_range`), headers first with `MSG_MORE`: no copy through this process. On a
//! stream whose transport takes owned bytes (an SSH channel: [`crate::zero_copy`]), a large read
//! reply's data goes to it as `Bytes` sharing the reply's pooled buffer, which returns to the
//! pool when the transport drops it: the hub's restores through the tunnel, 1.07x the
//! throughput at 0.87x the hub's CPU.
//!
//! Exception: a small plain WRITE (under [`READER_WRITES_BELOW`]) is applied by the reader before
//! it reads the next header: the payload is hot in this core's cache and a task per 4 KiB write
//! costs more than the copy (4 KiB random writes lost a fifth of their IOPS as tasks). Larger
//! writes run in their own task like everything else, so the reader drains the socket while the
//! last payload is copied into the file, as nbdkit's threads do: with 256 KiB writes on tmpfs
//! 1.08-1.10x the throughput at 0.87-0.92x the CPU per GB of applying them on the reader (raw,
//! 1 and 4 connections; qcow2, 4 connections). (Applying every write on the reader was once the
//! faster choice: before `gate.rs`, tasks writing one file spun on its inode lock.) Not for a
//! backend whose writes wait for the device (`Capabilities::writes_wait`, `O_DIRECT`): there
//! the payload goes to the device, and applying it on the reader would leave one write per
//! connection in flight.
//!
//! On a TCP connection to a backend that takes them (`Capabilities::piped_writes`: raw files and
//! qcow2 images in writeback), the payload of a large WRITE (128 KiB to 8 MiB) is not read
//! into a buffer: it is `splice`d from the socket into pipes from the server's pool and the
//! backend splices it on into the file (`backend/piped.rs`), a copy fewer. Against the same
//! binary without it (tmpfs, nbdcopy, 5-6 pairs per run): raw with one connection 1.05-1.13x
//! the throughput at 0.85-0.90x the server CPU per GB, qcow2 with four 1.06-1.17x at
//! 0.76-0.83x, the client's CPU unchanged; qcow2 on disk the same throughput at 0.75x. The header after
//! such a payload is read alone ([`read_header`]), so the next payload stays in the socket for
//! its own splice. No pipe free: the payload takes a buffer as before.
//!
//! Ending: NBD_CMD_DISC, EOF, a protocol violation, the export being removed or the server
//! shutting down all stop the reader; in-flight requests still complete and their replies are
//! still sent (the spec's "handle all outstanding requests"), then the socket closes. The
//! connection's `--shared` slot is given back as soon as the reader stops (a client that vanished
//! holds no place while its last requests drain); removal waits for the drain itself.

use std::sync::Arc;

use bytes::Bytes;
use directio::{AlignedBuf, AlignedPool};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backend::PipedData;
use crate::proto::consts::{errno, handshake_flags};
use crate::proto::handshake::{encode_greeting, OptionHeader, OPTION_HEADER_LEN};
use crate::proto::transmission::{decode_request, Command};
use crate::zero_copy::SendBytes;

use super::dispatch::{error_reply, execute, payload_len, validate, FileData, Limits, Payload, Reply, Segment};
use super::export::bump;
use super::negotiate::{Negotiator, Session, Step};
use super::{Scope, Shared};

/// Longest option data we read; longer options end the connection.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Payload buffers a connection keeps for reuse. Without a pool every 256 KiB request allocated
/// and freed a fresh buffer (an `mmap`/`munmap` pair: page faults and zeroing were a large share
/// of server CPU in a single-connection copy). The buffers start on a page boundary, so with
/// `--cache=none` a payload goes to `O_DIRECT` as it is, where an unaligned one would first be
/// copied into a bounce buffer (a tenth of the throughput on a 2-vCPU host).
const POOL_BYTES: usize = 16 * 1024 * 1024;
/// Plain writes shorter than this are applied on the connection's reader (module doc).
const READER_WRITES_BELOW: u64 = 128 * 1024;
/// Largest write payload carried in pipes (several, 1 MiB each); larger ones take a buffer.
const MAX_PIPED_PAYLOAD: u64 = 8 * 1024 * 1024;
/// Unit of the byte budgets (per connection and server-wide).
pub(crate) const BUDGET_UNIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("server shutting down")]
    Shutdown,
}

/// Serve one connection to the end. Never panics on client input; logs how it ended.
pub(crate) async fn serve<R, W>(reader: R, mut writer: W, peer: String, scope: Arc<Scope>, shared: Arc<Shared>)
where
    R: RequestReader,
    W: ReplyWriter,
{
    // Small enough that bulk payload reads bypass it (one copy), large enough for headers.
    let mut reader = BufReader::with_capacity(32 * 1024, reader);
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        r = tokio::time::timeout(timeout, negotiate(&mut reader, &mut writer, &scope, &shared)) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout(timeout)))
        }
        _ = shared.shutdown.cancelled() => Err(ConnError::Shutdown),
    };
    match negotiated {
        Ok(Some(session)) => {
            let export = Arc::clone(session.export());
            tracing::debug!(%peer, export = %export.name, mode = ?session.mode, "client entered transmission");
            transmission(reader, writer, session, &shared).await;
            tracing::debug!(%peer, export = %export.name, "client disconnected");
        }
        Ok(None) => {
            let _ = writer.shutdown().await;
        }
        Err(e) => {
            // A client that took the whole handshake timeout is worth an operator's look (a
            // stalled peer or transport); the other endings are clients' own business.
            if matches!(e, ConnError::HandshakeTimeout(_)) {
                tracing::warn!(%peer, error = %e, "handshake ended without transmission");
            } else {
                tracing::info!(%peer, error = %e, "handshake ended without transmission");
            }
            let _ = writer.shutdown().await;
        }
    }
}

async fn negotiate<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    scope: &Scope,
    shared: &Shared,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES)).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if !Negotiator::client_flags_valid(client_flags) {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let mut negotiator = Negotiator::new(&shared.registry, scope, shared.block_sizes(), client_flags);
    let mut out = Vec::with_capacity(512);
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut head).await?;
        let header = OptionHeader::parse(&head).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if header.length > MAX_OPTION_DATA {
            return Err(ConnError::Protocol(format!(
                "option {} carries {} bytes, more than the {MAX_OPTION_DATA} accepted",
                header.option, header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;
        out.clear();
        let step = negotiator.handle(header.option, &data, &mut out);
        writer.write_all(&out).await?;
        writer.flush().await?;
        match step {
            Step::Continue => {}
            Step::Abort => return Ok(None),
            Step::Disconnect(reason) => return Err(ConnError::Protocol(reason)),
            Step::Enter(session) => return Ok(Some(session)),
        }
    }
}

/// A reply on its way to the writer, with the permits it holds.
struct Outgoing {
    reply: Reply,
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

async fn transmission<R, W>(mut reader: BufReader<R>, writer: W, session: Session, shared: &Arc<Shared>)
where
    R: RequestReader,
    W: ReplyWriter,
{
    let export = Arc::clone(session.export());
    // Held until the last reply is written: removal waits for it.
    let _activity = export.activity();
    let config = &shared.config;
    let limits = Limits {
        size: export.size(),
        flags: session.flags,
        structured: session.structured,
        mode: session.mode,
        allocation_context: session.allocation_context,
        max_payload: u64::from(config.max_payload),
        sendfile: writer.tcp().is_some(),
    };
    let (tx, rx) = mpsc::channel::<Outgoing>(config.max_in_flight + 1);
    let writer_gone = CancellationToken::new();
    let pool = Arc::new(AlignedPool::new(POOL_BYTES));
    let writer_task = tokio::spawn(write_loop(writer, rx, writer_gone.clone(), export.hard.clone(), Arc::clone(&pool)));
    let requests = Arc::new(Semaphore::new(config.max_in_flight));
    let budget_units = (config.max_buffered_bytes as u64 / BUDGET_UNIT).max(1);
    let total_units = (config.max_buffered_bytes_total as u64 / BUDGET_UNIT).clamp(1, u64::from(u32::MAX)) as u32;
    let bytes = Arc::new(Semaphore::new(budget_units as usize));
    let stop = export.closing.clone();
    let capabilities = export.backend.capabilities();
    let writes_wait = capabilities.writes_wait;
    // Large writes may travel in pipes: from a TCP socket, to a backend that splices them.
    let pipes = (reader.get_ref().tcp().is_some() && capabilities.piped_writes && !writes_wait)
        .then(|| Arc::clone(&shared.pipes));
    let mode = session.mode;
    let mut header = [0u8; 32];
    // The last payload went into a pipe: read the next header alone (see `read_header`).
    let mut last_piped = false;
    let write_barrier: WriteBarrier = Arc::default();

    loop {
        let request_permit = tokio::select! {
            p = Arc::clone(&requests).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
            _ = writer_gone.cancelled() => break,
        };
        let Some(head) = header.get_mut(..mode.request_len()) else {
            break;
        };
        let read = tokio::select! {
            r = read_header(&mut reader, head, last_piped) => r,
            _ = stop.cancelled() => break,
            _ = writer_gone.cancelled() => break,
        };
        if let Err(e) = read {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                tracing::debug!(export = %export.name, error = %e, "read failed");
            }
            break;
        }
        let req = match decode_request(head, mode) {
            Ok(Some((req, _))) => req,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(export = %export.name, error = %e, "closing connection: not an NBD request");
                break;
            }
        };
        if req.command == Command::Disconnect {
            break;
        }
        let plen = payload_len(&req, mode);
        if plen > limits.max_payload {
            // Answer, then hang up: reading what the header merely claims is not an option.
            bump(&export.counters.errors, 1);
            let msg = format!("payload of {plen} bytes exceeds the maximum of {}; closing", limits.max_payload);
            tracing::warn!(export = %export.name, "{msg}");
            let reply = error_reply(&req, &limits, errno::EINVAL, &msg);
            let _ = tx.send(Outgoing { reply, _request: Some(request_permit), _bytes: None }).await;
            break;
        }
        let need = if req.command == Command::Read { req.length.min(limits.max_payload) } else { plen };
        let units = need.div_ceil(BUDGET_UNIT).min(budget_units) as u32;
        // The connection's budget first, then the server's: one connection cannot take more
        // than its share, and all of them together no more than the total.
        let bytes_permit = if units > 0 {
            let local = tokio::select! {
                p = Arc::clone(&bytes).acquire_many_owned(units) => match p { Ok(p) => p, Err(_) => break },
                _ = stop.cancelled() => break,
                _ = writer_gone.cancelled() => break,
            };
            let global = tokio::select! {
                p = Arc::clone(&shared.buffered).acquire_many_owned(units.min(total_units)) => match p { Ok(p) => p, Err(_) => break },
                _ = stop.cancelled() => break,
                _ = writer_gone.cancelled() => break,
            };
            Some((local, global))
        } else {
            None
        };
        let piped = pipes.as_ref().filter(|_| goes_piped(&req, plen, &limits)).and_then(|pipes| pipes.payload());
        last_piped = piped.is_some();
        let payload = tokio::select! {
            r = read_payload(&mut reader, piped, &pool, need as usize, plen > 0) => r,
            _ = stop.cancelled() => break,
            _ = writer_gone.cancelled() => break,
        };
        let Ok(payload) = payload else {
            tracing::debug!(export = %export.name, "client vanished in the middle of a write payload");
            break;
        };
        if let Err(refusal) = validate(&req, &limits) {
            bump(&export.counters.errors, 1);
            tracing::debug!(export = %export.name, command = ?req.command, message = %refusal.message, "request refused");
            let mut reply = error_reply(&req, &limits, refusal.error, &refusal.message);
            reply.data = payload.into_buffer();
            if tx.send(Outgoing { reply, _request: Some(request_permit), _bytes: bytes_permit }).await.is_err() {
                break;
            }
            continue;
        }
        if runs_on_reader(&req) && !writes_wait {
            // Apply the payload now, while it is still in this core's cache (see module doc).
            let reply = execute(&export, req, payload, &limits).await;
            if tx.send(Outgoing { reply, _request: Some(request_permit), _bytes: bytes_permit }).await.is_err() {
                break;
            }
            continue;
        }
        // A plain write in its own task holds the barrier until it is applied; a FLUSH waits for
        // every such write read before it (see `WriteBarrier`).
        let write_in_flight = if is_plain_write(&req) {
            match Arc::clone(&write_barrier).try_read_owned() {
                Ok(guard) => Some(guard),
                // A FLUSH is waiting for earlier writes: this one waits for it to pass.
                Err(_) => tokio::select! {
                    g = Arc::clone(&write_barrier).read_owned() => Some(g),
                    _ = stop.cancelled() => break,
                    _ = writer_gone.cancelled() => break,
                },
            }
        } else {
            None
        };
        let flush_barrier = (req.command == Command::Flush).then(|| Arc::clone(&write_barrier));
        let tx = tx.clone();
        let export = Arc::clone(&export);
        tokio::spawn(async move {
            if let Some(barrier) = flush_barrier {
                drop(barrier.write().await);
            }
            let reply = execute(&export, req, payload, &limits).await;
            drop(write_in_flight);
            let _ = tx.send(Outgoing { reply, _request: Some(request_permit), _bytes: bytes_permit }).await;
        });
    }
    // The client is gone (or done): its place goes back to the export now, so a client arriving
    // while the last requests finish is not refused for a slot nobody uses any more.
    drop(session);
    // Let in-flight requests finish; the writer ends once every sender is gone.
    drop(tx);
    let _ = writer_task.await;
}

/// Plain writes of this connection in their own tasks hold a read guard until applied; a FLUSH
/// takes the write guard (and drops it at once) before it syncs. So a FLUSH covers every plain
/// write read before it on its connection, replied or not — more than the spec asks (writes
/// already replied to), and what applying every write on the reader used to give.
type WriteBarrier = Arc<tokio::sync::RwLock<()>>;

fn is_plain_write(req: &crate::proto::transmission::Request) -> bool {
    req.command == Command::Write && req.flags & crate::proto::consts::cmd_flags::FUA == 0
}

/// Whether a request's payload goes into pipes (when the connection has them): a valid WRITE
/// large enough to run in its own task, and not so large that it would hold many pipes.
fn goes_piped(req: &crate::proto::transmission::Request, plen: u64, limits: &Limits) -> bool {
    req.command == Command::Write
        && (READER_WRITES_BELOW..=MAX_PIPED_PAYLOAD).contains(&plen)
        && validate(req, limits).is_ok()
}

/// Take a request's payload off the wire: into `piped`'s pipes when given, else into a buffer of
/// `need` bytes from the pool (a READ's buffer for its data: `has_payload` false), which also
/// takes what no pipe was left for.
async fn read_payload<R: RequestReader>(
    reader: &mut BufReader<R>,
    piped: Option<PipedData>,
    pool: &AlignedPool,
    need: usize,
    has_payload: bool,
) -> std::io::Result<Payload> {
    if let Some(mut piped) = piped {
        if fill_pipe(reader, &mut piped, need).await? {
            return Ok(Payload::Piped(piped));
        }
        let mut buffer = pool.take(need);
        let (held, rest) = buffer
            .split_at_mut_checked(piped.len())
            .ok_or_else(|| std::io::Error::other("piped more than the payload"))?;
        piped.read_into(held)?;
        reader.read_exact(rest).await?;
        return Ok(Payload::Buffer(buffer));
    }
    let mut buffer = if need > 0 { pool.take(need) } else { directio::AlignedBuf::default() };
    if has_payload {
        reader.read_exact(&mut buffer).await?;
    }
    Ok(Payload::Buffer(buffer))
}

/// Move a write's payload of `want` bytes into `piped`: first what the read buffer already holds,
/// then straight from the socket with `splice`, taking another pipe whenever the last one is
/// full. `Ok(false)` when the pool has no pipe left for the rest, which is still in the socket.
async fn fill_pipe<R: RequestReader>(
    reader: &mut BufReader<R>,
    piped: &mut PipedData,
    want: usize,
) -> std::io::Result<bool> {
    let buffered = reader.buffer().get(..want).unwrap_or(reader.buffer());
    if !buffered.is_empty() {
        let n = buffered.len();
        piped.push(buffered)?;
        reader.consume(n);
    }
    let Some(sock) = reader.get_ref().tcp() else {
        return Ok(piped.len() == want);
    };
    while piped.len() < want {
        if !piped.last_has_room() && !piped.grow() {
            return Ok(false);
        }
        sock.readable().await?;
        // `WouldBlock` only for an empty socket: tokio then waits for new data. A full pipe must
        // not be reported so, or the socket's readiness would be forgotten while it holds bytes.
        let step = sock.try_io(tokio::io::Interest::READABLE, || match piped.splice_from(sock, want - piped.len()) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && socket_has_bytes(sock) => {
                match piped.splice_from(sock, want - piped.len()) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    other => other.map(Some),
                }
            }
            other => other.map(Some),
        });
        match step {
            Ok(Some(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Some(_)) => {}
            // The last pipe is out of slots while the socket holds bytes.
            Ok(None) => {
                if !piped.grow() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Read a request header. After a piped payload, when the read buffer is empty, exactly the
/// header's bytes are read from the socket: a buffered read would take the start of the next
/// payload too (up to the buffer's 32 KiB), which would then be copied into the pipe, two copies
/// more than splicing it. Otherwise through the buffer, which takes several small requests in
/// one `recv`.
async fn read_header<R: RequestReader>(reader: &mut BufReader<R>, head: &mut [u8], exact: bool) -> std::io::Result<()> {
    if exact && reader.buffer().is_empty() {
        reader.get_mut().read_exact(head).await?;
    } else {
        reader.read_exact(head).await?;
    }
    Ok(())
}

/// Whether the socket's receive queue holds bytes (`FIONREAD`).
fn socket_has_bytes(sock: &tokio::net::TcpStream) -> bool {
    rustix::io::ioctl_fionread(sock).is_ok_and(|n| n > 0)
}

/// Small plain writes are applied by the reader itself: the payload was just copied from the
/// socket and is hot in this core's cache (see the module doc). Larger writes, and everything
/// that may wait on the device (FUA, FLUSH, TRIM, zeroing) or produces a reply payload (READ),
/// run in their own task.
fn runs_on_reader(req: &crate::proto::transmission::Request) -> bool {
    is_plain_write(req) && req.length < READER_WRITES_BELOW
}

async fn write_loop<W>(
    writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    gone: CancellationToken,
    hard_stop: CancellationToken,
    pool: Arc<AlignedPool>,
) where
    W: ReplyWriter,
{
    let mut w = BufWriter::with_capacity(REPLY_BUFFER, writer);
    let result: std::io::Result<()> = async {
        while let Some(out) = rx.recv().await {
            let Outgoing { reply, _request, _bytes } = out;
            let owned = w.get_ref().payloads().filter(|_| reply.files.is_none() && reply.data.len() >= REPLY_BUFFER);
            if let Some(payloads) = owned {
                // The data goes to the transport as it is; its buffer returns to the pool when
                // the transport lets go of it.
                let payloads = Arc::clone(payloads);
                tokio::select! {
                    r = send_owned(&mut w, reply, payloads.as_ref(), &pool) => r?,
                    _ = hard_stop.cancelled() => return Err(std::io::ErrorKind::TimedOut.into()),
                }
            } else {
                tokio::select! {
                    r = write_reply(&mut w, &reply) => r?,
                    _ = hard_stop.cancelled() => return Err(std::io::ErrorKind::TimedOut.into()),
                }
                pool.put(reply.data);
            }
            drop((_request, _bytes));
            if rx.is_empty() {
                tokio::select! {
                    r = w.flush() => r?,
                    _ = hard_stop.cancelled() => return Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
        }
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "reply writer stopped");
    }
    // Tell the reader to stop, and keep draining so request tasks never block on a full channel.
    gone.cancel();
    rx.close();
    while rx.recv().await.is_some() {}
}

/// Bytes of replies gathered before they are written (small replies batch in it).
const REPLY_BUFFER: usize = 256 * 1024;
/// Most pieces a reply is sent with in one `writev` (the kernel takes up to 1024).
const MAX_REPLY_SLICES: usize = 64;

/// Put one reply into `w`. A reply at least as large as the buffer (a read's data) goes out with
/// its headers in one `writev` once what is buffered is flushed: written through the buffer, its
/// few header bytes would leave as a packet of their own and wake the client once more. A reply
/// with file data goes out with `sendfile` ([`send_from_files`]).
async fn write_reply<W: ReplyWriter>(w: &mut BufWriter<W>, reply: &Reply) -> std::io::Result<()> {
    if let Some(files) = &reply.files {
        w.flush().await?;
        let Some(sock) = w.get_ref().tcp() else {
            return Err(std::io::Error::other("internal: file data for a connection that cannot send it"));
        };
        return send_from_files(sock, files, reply).await;
    }
    let pieces = reply.segments.iter().filter_map(|seg| match seg {
        Segment::Head(r) => reply.head.get(r.clone()),
        Segment::Data(r) => reply.data.get(r.clone()),
        Segment::File { .. } | Segment::Zeroes(_) => None,
    });
    let total: usize = pieces.clone().map(<[u8]>::len).sum();
    if total < REPLY_BUFFER || reply.segments.len() > MAX_REPLY_SLICES {
        for bytes in pieces {
            w.write_all(bytes).await?;
        }
        return Ok(());
    }
    w.flush().await?;
    let mut slices: Vec<std::io::IoSlice<'_>> = pieces.map(std::io::IoSlice::new).collect();
    let mut rest = slices.as_mut_slice();
    while !rest.is_empty() {
        let n = w.get_mut().write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Send a reply's headers through the stream and its data to the transport's owned-bytes path
/// ([`crate::zero_copy`]), in segment order; the data buffer is shared, not copied, and goes
/// back to `pool` once every piece of it has been dropped by the transport.
async fn send_owned<W: ReplyWriter>(
    w: &mut BufWriter<W>,
    reply: Reply,
    payloads: &dyn SendBytes,
    pool: &Arc<AlignedPool>,
) -> std::io::Result<()> {
    let Reply { head, data, segments, .. } = reply;
    let data = Bytes::from_owner(Pooled { buf: data, pool: Arc::clone(pool) });
    for seg in &segments {
        match seg {
            Segment::Head(r) => w.write_all(head.get(r.clone()).unwrap_or_default()).await?,
            Segment::Data(r) if r.start <= r.end && r.end <= data.len() => {
                w.flush().await?;
                payloads.send(data.slice(r.clone())).await?;
            }
            Segment::Data(_) | Segment::File { .. } | Segment::Zeroes(_) => {
                return Err(std::io::Error::other("internal: a reply segment outside its data"));
            }
        }
    }
    Ok(())
}

/// A reply's data buffer lent to the transport as `Bytes`: back to its pool when dropped.
struct Pooled {
    buf: AlignedBuf,
    pool: Arc<AlignedPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// Send a reply whose data is in files straight from them (`sendfile`: the page cache to the
/// socket, no copy through this process; on loopback 1.1-1.3x the throughput of `pread` plus
/// `send` at 0.76-0.88x the sender's CPU). Headers and zero runs go with `MSG_MORE`, so they
/// leave in the same packets as the data.
async fn send_from_files(sock: &tokio::net::TcpStream, files: &FileData, reply: &Reply) -> std::io::Result<()> {
    let last = reply.segments.len().saturating_sub(1);
    for (i, seg) in reply.segments.iter().enumerate() {
        let more = if i < last { rustix::net::SendFlags::MORE } else { rustix::net::SendFlags::empty() };
        match seg {
            Segment::Head(r) | Segment::Data(r) => {
                let from = if matches!(seg, Segment::Head(_)) { &reply.head[..] } else { &reply.data[..] };
                send_bytes(sock, from.get(r.clone()).unwrap_or_default(), more).await?;
            }
            Segment::Zeroes(n) => send_zeroes(sock, *n, more).await?,
            Segment::File { index, range } => {
                let Some(file) = files.file(*index) else {
                    return Err(std::io::Error::other("internal: a file segment without its file"));
                };
                let (mut offset, end) = (range.start, range.end);
                while offset < end {
                    let want = usize::try_from(end - offset).unwrap_or(usize::MAX).min(1 << 30);
                    let sent = sock_io(sock, || rustix::fs::sendfile(sock, file, Some(&mut offset), want)).await?;
                    if sent == 0 {
                        // The file is shorter than its backend said: the client gets a cut reply.
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file ended"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Send all of `bytes`.
async fn send_bytes(
    sock: &tokio::net::TcpStream,
    mut bytes: &[u8],
    more: rustix::net::SendFlags,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = sock_io(sock, || rustix::net::send(sock, bytes, more)).await?;
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Zero bytes [`send_zeroes`] sends from.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Send `n` zero bytes.
async fn send_zeroes(sock: &tokio::net::TcpStream, mut n: u64, more: rustix::net::SendFlags) -> std::io::Result<()> {
    while n > 0 {
        let chunk = ZEROES.get(..usize::try_from(n).unwrap_or(ZEROES.len()).min(ZEROES.len())).unwrap_or_default();
        send_bytes(sock, chunk, if n > chunk.len() as u64 { rustix::net::SendFlags::MORE } else { more }).await?;
        n -= chunk.len() as u64;
    }
    Ok(())
}

/// Run a non-blocking socket call once the socket is writable, again while it would block.
async fn sock_io(
    sock: &tokio::net::TcpStream,
    mut call: impl FnMut() -> rustix::io::Result<usize>,
) -> std::io::Result<usize> {
    loop {
        sock.writable().await?;
        match sock.try_io(tokio::io::Interest::WRITABLE, || call().map_err(std::io::Error::from)) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// The read half of a connection: any byte source, and for TCP the socket itself, from which
/// write payloads can be spliced into pipes ([`fill_pipe`]).
pub(crate) trait RequestReader: AsyncRead + Unpin + Send + 'static {
    /// The TCP socket under this reader, if it is one.
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

impl RequestReader for tokio::net::tcp::OwnedReadHalf {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        Some(self.as_ref())
    }
}

impl RequestReader for tokio::net::unix::OwnedReadHalf {}

impl<T: AsyncRead + Send + 'static> RequestReader for tokio::io::ReadHalf<T> {}

/// The write half of a connection: any byte sink, and for TCP the socket itself, which can send
/// file data without copying it ([`send_from_file`]).
pub(crate) trait ReplyWriter: AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket under this writer, if it is one.
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        None
    }

    /// The transport's path for owned bytes, if it has one ([`crate::zero_copy`]).
    fn payloads(&self) -> Option<&Arc<dyn SendBytes>> {
        None
    }
}

/// A writer whose transport also takes owned bytes ([`Server::serve_stream_with_payloads`]).
///
/// [`Server::serve_stream_with_payloads`]: crate::Server::serve_stream_with_payloads
pub(crate) struct WithPayloads<W> {
    inner: W,
    payloads: Arc<dyn SendBytes>,
}

impl<W> WithPayloads<W> {
    pub(crate) fn new(inner: W, payloads: Arc<dyn SendBytes>) -> Self {
        Self { inner, payloads }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WithPayloads<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> ReplyWriter for WithPayloads<W> {
    fn payloads(&self) -> Option<&Arc<dyn SendBytes>> {
        Some(&self.payloads)
    }
}

impl ReplyWriter for tokio::net::tcp::OwnedWriteHalf {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        Some(self.as_ref())
    }
}

impl ReplyWriter for tokio::net::unix::OwnedWriteHalf {}

impl<T: AsyncWrite + Send + 'static> ReplyWriter for tokio::io::WriteHalf<T> {}
