//! One client connection: handshake, then one reader, many request tasks, one writer.
//!
//! The reader takes a request permit *before* reading the next header and byte-budget permits
//! (the connection's, then the server's) before allocating a payload or read buffer, so a
//! connection never holds more than `max_in_flight` requests or `max_buffered_bytes` of data, and
//! all connections together no more than `max_buffered_bytes_total`, whatever clients send; when a
//! budget is spent the reader simply stops reading the socket (TCP backpressure). Each accepted
//! request runs in its own task, so replies may leave out of order as the spec allows; the
//! request permit travels with the reply and is released only once the writer (`writer.rs`:
//! batching, `sendfile`, owned bytes for SSH channels) has put it on the wire, and so does a
//! READ's byte budget (its data is in the reply); any other request's budget comes back as soon
//! as its payload is applied ([`outgoing`] says why).
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

use directio::AlignedPool;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backend::PipedData;
use crate::proto::consts::{errno, handshake_flags};
use crate::proto::handshake::{encode_greeting, OptionHeader, OPTION_HEADER_LEN};
use crate::proto::transmission::{decode_request, Command};

use super::dispatch::{error_reply, execute, payload_len, validate, Limits, Payload, Reply};
use super::export::bump;
use super::negotiate::{Negotiator, Session, Step, Tls};
use super::writer::{write_loop, BytePermits, Outgoing, ReplyWriter};
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
pub(crate) async fn serve<R, W>(reader: R, writer: W, peer: String, scope: Arc<Scope>, shared: Arc<Shared>)
where
    R: RequestReader,
    W: ReplyWriter,
{
    // Small enough that bulk payload reads bypass it (one copy), large enough for headers.
    let reader = BufReader::with_capacity(32 * 1024, reader);
    serve_from(reader, writer, Opening::Greeting { tls_required: false }, &peer, &scope, &shared).await;
}

/// Serve one connection on a server that requires TLS (`negotiate.rs`'s [`Tls`]): the
/// greeting and the options before `NBD_OPT_STARTTLS` in clear, then the TLS handshake, then
/// the connection served as any other, over TLS, each of the three steps within the handshake
/// timeout. Reads and writes then go through rustls: the halves are not TCP sockets, so no
/// payload is spliced or sent with `sendfile` past the encryption.
pub(crate) async fn serve_tls<S>(
    stream: S,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: String,
    scope: Arc<Scope>,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(4096, reader);
    let timeout = shared.config.handshake_timeout;
    let in_clear = async {
        match negotiate(&mut reader, &mut writer, &scope, &shared, Opening::Greeting { tls_required: true }).await? {
            // The client waits for the ACK before its TLS hello: anything already here was sent
            // in clear after the option, and would be lost to the handshake.
            Negotiated::StartTls { .. } if !reader.buffer().is_empty() => {
                Err(ConnError::Protocol("bytes sent before the answer to NBD_OPT_STARTTLS".into()))
            }
            Negotiated::StartTls { client_flags } => Ok(Some(client_flags)),
            Negotiated::Abort => Ok(None),
            Negotiated::Enter(_) => Err(ConnError::Protocol("transmission without TLS".into())),
        }
    };
    let upgrade = tokio::select! {
        r = tokio::time::timeout(timeout, in_clear) => r.unwrap_or(Err(ConnError::HandshakeTimeout(timeout))),
        _ = shared.shutdown.cancelled() => Err(ConnError::Shutdown),
    };
    let client_flags = match upgrade {
        Ok(Some(flags)) => flags,
        Ok(None) => {
            let _ = writer.shutdown().await;
            return;
        }
        Err(e) => {
            log_unfinished(&peer, &e);
            let _ = writer.shutdown().await;
            return;
        }
    };
    let stream = reader.into_inner().unsplit(writer);
    let accepted = tokio::select! {
        r = tokio::time::timeout(timeout, acceptor.accept(stream)) => {
            r.unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")))
        }
        _ = shared.shutdown.cancelled() => return,
    };
    match accepted {
        Ok(tls) => {
            let (_, session) = tls.get_ref();
            let (version, suite) = (session.protocol_version(), session.negotiated_cipher_suite());
            tracing::debug!(%peer, ?version, suite = ?suite.map(|s| s.suite()), "TLS established");
            let (reader, writer) = tokio::io::split(tls);
            let reader = BufReader::with_capacity(32 * 1024, reader);
            serve_from(reader, writer, Opening::AfterTls { client_flags }, &peer, &scope, &shared).await;
        }
        // A client whose certificate is not trusted, or that does not trust ours, ends here:
        // worth an operator's look.
        Err(e) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
    }
}

/// How a connection's negotiation begins.
#[derive(Debug, Clone, Copy)]
enum Opening {
    /// A fresh connection: send the greeting, read the client's flags; on a listener of a
    /// server with TLS credentials, only `STARTTLS` is served next.
    Greeting { tls_required: bool },
    /// Over TLS just established: the greeting and the client's flags came before it, in clear.
    AfterTls { client_flags: u32 },
}

/// How a negotiation ended, when it ended well.
enum Negotiated {
    /// In transmission.
    Enter(Session),
    /// The client aborted.
    Abort,
    /// The client asked for TLS and was told yes: the handshake comes next.
    StartTls { client_flags: u32 },
}

/// Negotiate (within the handshake timeout), then serve requests until the connection ends.
async fn serve_from<R, W>(
    mut reader: BufReader<R>,
    mut writer: W,
    opening: Opening,
    peer: &str,
    scope: &Scope,
    shared: &Arc<Shared>,
) where
    R: RequestReader,
    W: ReplyWriter,
{
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        r = tokio::time::timeout(timeout, negotiate(&mut reader, &mut writer, scope, shared, opening)) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout(timeout)))
        }
        _ = shared.shutdown.cancelled() => Err(ConnError::Shutdown),
    };
    match negotiated {
        Ok(Negotiated::Enter(session)) => {
            let export = Arc::clone(session.export());
            tracing::debug!(%peer, export = %export.name, mode = ?session.mode, "client entered transmission");
            transmission(reader, writer, session, shared).await;
            tracing::debug!(%peer, export = %export.name, "client disconnected");
        }
        Ok(Negotiated::Abort) => {
            let _ = writer.shutdown().await;
        }
        // Only a server that requires TLS says yes to STARTTLS, and it does so in `serve_tls`.
        Ok(Negotiated::StartTls { .. }) => {
            log_unfinished(peer, &ConnError::Protocol("STARTTLS accepted without TLS credentials".into()));
            let _ = writer.shutdown().await;
        }
        Err(e) => {
            log_unfinished(peer, &e);
            let _ = writer.shutdown().await;
        }
    }
}

/// A client that took the whole handshake timeout is worth an operator's look (a stalled peer
/// or transport); the other endings are clients' own business.
fn log_unfinished(peer: &str, e: &ConnError) {
    if matches!(e, ConnError::HandshakeTimeout(_)) {
        tracing::warn!(%peer, error = %e, "handshake ended without transmission");
    } else {
        tracing::info!(%peer, error = %e, "handshake ended without transmission");
    }
}

async fn negotiate<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    scope: &Scope,
    shared: &Shared,
    opening: Opening,
) -> Result<Negotiated, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (client_flags, tls) = match opening {
        Opening::Greeting { tls_required } => {
            writer.write_all(&encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES)).await?;
            writer.flush().await?;
            let client_flags = reader.read_u32().await?;
            if !Negotiator::client_flags_valid(client_flags) {
                return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
            }
            (client_flags, if tls_required { Tls::Required } else { Tls::Off })
        }
        Opening::AfterTls { client_flags } => (client_flags, Tls::Active),
    };
    let mut negotiator = Negotiator::with_tls(&shared.registry, scope, shared.block_sizes(), client_flags, tls);
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
            Step::Abort => return Ok(Negotiated::Abort),
            Step::Disconnect(reason) => return Err(ConnError::Protocol(reason)),
            Step::Enter(session) => return Ok(Negotiated::Enter(session)),
            Step::StartTls => return Ok(Negotiated::StartTls { client_flags }),
        }
    }
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
        bitmap_contexts: session.bitmap_contexts,
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
            if tx.send(outgoing(reply, false, request_permit, bytes_permit, &pool)).await.is_err() {
                break;
            }
            continue;
        }
        if runs_on_reader(&req) && !writes_wait {
            // Apply the payload now, while it is still in this core's cache (see module doc).
            let reply = execute(&export, req, payload, &limits).await;
            if tx.send(outgoing(reply, false, request_permit, bytes_permit, &pool)).await.is_err() {
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
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            if let Some(barrier) = flush_barrier {
                drop(barrier.write().await);
            }
            let carries_data = req.command == Command::Read;
            let reply = execute(&export, req, payload, &limits).await;
            drop(write_in_flight);
            let _ = tx.send(outgoing(reply, carries_data, request_permit, bytes_permit, &pool)).await;
        });
    }
    // The client is gone (or done): its place goes back to the export now, so a client arriving
    // while the last requests finish is not refused for a slot nobody uses any more.
    drop(session);
    // Let in-flight requests finish; the writer ends once every sender is gone.
    drop(tx);
    let _ = writer_task.await;
}

/// A reply queued for the writer, with what it keeps until it is on the wire: its request permit,
/// and, when it carries data (a READ's), the byte budget that data is counted against. Any other
/// reply carries none — its payload is applied or refused — so its buffer goes back to the pool
/// and its budget to the readers now, not once the writer has it out. Otherwise a transport that
/// stalls the writer would hold the server's budget for bytes no longer buffered, and through it
/// its own progress: on an SSH channel, a reader waiting for budget stops draining its channel,
/// the full channel stalls the whole SSH session (russh's design, `tunnel::limits`), the session
/// stalls the write replies that hold the budget, and nothing moves until a keepalive gives up.
fn outgoing(
    mut reply: Reply,
    carries_data: bool,
    request: OwnedSemaphorePermit,
    bytes: Option<BytePermits>,
    pool: &AlignedPool,
) -> Outgoing {
    if carries_data {
        return Outgoing { reply, _request: Some(request), _bytes: bytes };
    }
    pool.put(std::mem::take(&mut reply.data));
    drop(bytes);
    Outgoing { reply, _request: Some(request), _bytes: None }
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
