//! An async NBD client: fixed newstyle with GO, structured replies, extended headers when the
//! server offers them, block status for `base:allocation` and any other metadata context the
//! caller names (such as qemu's `qemu:dirty-bitmap:NAME`), and pipelined requests.
//!
//! A [`Client`] is one connection; clone it to issue requests from many tasks at once. Requests
//! are written under a mutex (header and payload stay together). Every request future is
//! cancel-safe: a future dropped before its whole frame was written *poisons* the connection
//! (the write half is closed at once and every later request fails with
//! [`ClientError::Closed`]), so the server sees a truncated frame and a closed stream, never a
//! frame completed with another request's bytes; a future dropped after its frame was written
//! just lets the reader discard the reply. One reader task (`replies`) owns the read
//! half and routes each reply chunk to the waiting request by cookie, reassembling structured
//! reads (data and hole chunks, in any order) into the caller's buffer, or, for
//! [`Client::read_bytes`], putting their pieces in order (`source`: over a transport that hands
//! out what it received, those pieces are its own and nothing is copied). Several connections to
//! one export are simply several `Client`s. Every length a server sends is checked against the
//! request it answers before anything is allocated (the checks are `proto::reply`, where the
//! fuzzers reach them), and a read whose chunks do not cover it exactly is a protocol error,
//! never a buffer with bytes the server did not send.
//!
//! Bounds: at most [`ClientOptions::max_in_flight`] requests are outstanding per connection (a
//! request waits for a slot; a slot is held until the reply arrives, even when the caller has
//! gone). With [`ClientOptions::request_timeout`], a request not answered in time fails with
//! [`ClientError::TimedOut`] and closes the connection (every other request on it fails with
//! `Closed`): a server that stopped answering is not waited on forever, and a caller such as a
//! connection pool reconnects.
//!
//! TLS ([`ClientOptions::tls`], `nbds://` URIs): `starttls` upgrades the connection before any
//! option, and the handshake goes on over it; a server that refuses is never spoken to in clear.
//!
//! Layout: `negotiate` is the handshake, `starttls` its TLS opening, `send` writes a request's frame (and holds the
//! cancel-safety rules), `replies` is the reader task, `source` what it reads from, `options`
//! and `uri` what callers configure; this module is the connection and its requests.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::Semaphore;

use crate::proto::consts::{cmd_flags, transmission_flags, BASE_ALLOCATION};
use crate::proto::transmission::{Command, Extent, HeaderMode, Request};

mod negotiate;
mod options;
mod replies;
mod send;
mod source;
mod starttls;
mod uri;

pub use crate::zero_copy::{ReceiveBytes, SendBytes};
use crate::ClientTls;
use negotiate::Negotiated;
pub use options::{ClientError, ClientOptions, CommandFlags, ExportInfo, DEFAULT_MAX_IN_FLIGHT};
use replies::{fail_all, reader_loop, Expect, Pending};
use send::{Payload, WriteSide};
use source::{in_order, Received, ReplySource};
use uri::{parse_uri, Place, Target};

/// The read buffer in front of a plain stream.
const READ_BUFFER: usize = 256 * 1024;

type Result<T> = std::result::Result<T, ClientError>;

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Requests awaiting replies; `closed` is set (under the same lock) once the reader has stopped,
/// so a request submitted afterwards fails at once instead of waiting forever.
#[derive(Default)]
struct PendingTable {
    map: HashMap<u64, Pending>,
    closed: bool,
}

struct Inner {
    /// `None` once poisoned by a request dropped in the middle of its frame.
    writer: tokio::sync::Mutex<Option<WriteSide>>,
    pending: Mutex<PendingTable>,
    next_cookie: AtomicU64,
    info: ExportInfo,
    mode: HeaderMode,
    structured: bool,
    allocation_context: Option<u32>,
    /// Every context the server granted, by name.
    contexts: HashMap<String, u32>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// In-flight slots ([`ClientOptions::max_in_flight`]).
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    request_timeout: Option<Duration>,
}

impl Inner {
    /// Close the connection from this side: the reader stops, every waiting request fails,
    /// later ones fail at once, and the write half is dropped unless a request is writing (that
    /// request closes it when it finishes or is dropped).
    fn close(&self) {
        if let Ok(mut r) = self.reader.lock() {
            if let Some(h) = r.take() {
                h.abort();
            }
        }
        fail_all(self);
        self.slots.close();
        if let Ok(mut w) = self.writer.try_lock() {
            w.take();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut r) = self.reader.lock() {
            if let Some(h) = r.take() {
                h.abort();
            }
        }
    }
}

/// One NBD connection. Cheap to clone; clones share the connection and pipeline requests.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("info", &self.inner.info).field("mode", &self.inner.mode).finish()
    }
}

impl Client {
    /// Connect over TCP (with TCP_NODELAY) and negotiate `export` with everything on.
    ///
    /// # Errors
    /// Connection or negotiation failed.
    pub async fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Self::handshake(r, w, &ClientOptions::new(export)).await
    }

    /// Connect over a Unix socket and negotiate with `options` (over TLS with
    /// [`ClientOptions::tls`], which must then name the host the server's certificate is for).
    ///
    /// # Errors
    /// Connection or negotiation failed.
    pub async fn connect_unix(path: impl AsRef<std::path::Path>, options: &ClientOptions) -> Result<Self> {
        let stream = tokio::net::UnixStream::connect(path.as_ref()).await?;
        if let Some(tls) = &options.tls {
            return Self::over_tls(stream, tls, None, options).await;
        }
        let (r, w) = stream.into_split();
        Self::handshake(r, w, options).await
    }

    /// Connect to an NBD URI: `nbd://HOST[:PORT][/EXPORT]` (port 10809 by default),
    /// `nbd+unix:///[EXPORT]?socket=PATH`, or their TLS forms `nbds://` and `nbds+unix://`, with
    /// `options` (its export name is replaced by the URI's). A TLS URI takes its credentials
    /// from `tls-certificates=DIR` (libnbd's name; `ca-cert.pem`, and `client-cert.pem` with
    /// `client-key.pem` if the server asks for one) or else from [`ClientOptions::tls`], and
    /// `tls-hostname=NAME` where the certificate is not for the host connected to; a plain URI
    /// never uses TLS, and options that ask for it are refused with it. Other query keys are
    /// refused too: pretending to honour them would be worse.
    ///
    /// # Errors
    /// A URI this client cannot honour ([`ClientError::Invalid`]), credentials that cannot be
    /// loaded, or connection, TLS or negotiation failed.
    pub async fn connect_uri(uri: &str, options: &ClientOptions) -> Result<Self> {
        let Target { place, export, tls } = parse_uri(uri)?;
        let tls = match (tls, &options.tls) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ClientError::Invalid(format!(
                    "TLS credentials given for '{uri}': use nbds:// or nbds+unix://"
                )))
            }
            (Some(query), given) => {
                let creds = match (&query.certificates, given) {
                    (Some(dir), _) => ClientTls::from_x509_dir(dir)
                        .map_err(|e| ClientError::Invalid(format!("NBD URI '{uri}': {e}")))?,
                    (None, Some(given)) => given.clone(),
                    (None, None) => {
                        return Err(ClientError::Invalid(format!(
                            "NBD URI '{uri}': TLS needs credentials: tls-certificates=DIR, or ClientOptions::tls"
                        )))
                    }
                };
                Some(match query.hostname {
                    Some(name) => creds.hostname(name),
                    None => creds,
                })
            }
        };
        let options = ClientOptions { export, tls, ..options.clone() };
        match place {
            Place::Tcp { host, port } => Self::connect_tcp_with(&host, port, &options).await,
            Place::Unix { path } => Self::connect_unix(path, &options).await,
        }
    }

    /// Connect over TCP (with TCP_NODELAY) to `host:port` and negotiate with `options`: over
    /// TLS with [`ClientOptions::tls`], the server's certificate checked against `host` unless
    /// the credentials name another.
    ///
    /// # Errors
    /// Connection, TLS or negotiation failed.
    pub async fn connect_tcp_with(host: &str, port: u16, options: &ClientOptions) -> Result<Self> {
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        if let Some(tls) = &options.tls {
            return Self::over_tls(stream, tls, Some(host), options).await;
        }
        let (r, w) = stream.into_split();
        Self::handshake(r, w, options).await
    }

    /// STARTTLS on `stream` (`starttls.rs`), then the negotiation over TLS.
    async fn over_tls<S>(stream: S, tls: &ClientTls, host: Option<&str>, options: &ClientOptions) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        within_request_timeout(options, async {
            let (upgraded, flags) = starttls::start(stream, tls, host).await?;
            let (r, w) = tokio::io::split(upgraded);
            Self::negotiate(BufReader::with_capacity(READ_BUFFER, r), w, None, options, Some(flags)).await
        })
        .await
    }

    /// Negotiate over an established stream's halves.
    ///
    /// # Errors
    /// Negotiation failed (unknown export, server refused, protocol violation).
    pub async fn handshake<R, W>(reader: R, writer: W, options: &ClientOptions) -> Result<Self>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        refuse_tls_on_halves(options)?;
        Self::handshake_buffered(reader, writer, None, options).await
    }

    /// [`Client::handshake`] over a transport that can also take write payloads by ownership
    /// ([`SendBytes`]): [`Client::write_bytes`] hands them to `payloads` instead of copying
    /// them into `writer`.
    ///
    /// # Errors
    /// As [`Client::handshake`].
    pub async fn handshake_with_payloads<R, W>(
        reader: R,
        writer: W,
        payloads: Arc<dyn SendBytes>,
        options: &ClientOptions,
    ) -> Result<Self>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        refuse_tls_on_halves(options)?;
        Self::handshake_buffered(reader, writer, Some(payloads), options).await
    }

    /// [`Client::handshake_with_payloads`] over a transport that also hands out what it
    /// received as owned bytes ([`ReceiveBytes`]): [`Client::read_bytes`] answers with its own
    /// pieces instead of copying them into a buffer. Both ways, no payload byte is copied.
    ///
    /// # Errors
    /// As [`Client::handshake`].
    pub async fn handshake_zero_copy<R, W>(
        reader: R,
        writer: W,
        payloads: Arc<dyn SendBytes>,
        options: &ClientOptions,
    ) -> Result<Self>
    where
        R: ReceiveBytes,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        refuse_tls_on_halves(options)?;
        within_request_timeout(options, Self::negotiate(Received(reader), writer, Some(payloads), options, None)).await
    }

    /// The handshake over a plain stream: its reader behind one buffer, which the replies'
    /// headers and payloads are read through.
    async fn handshake_buffered<R, W>(
        reader: R,
        writer: W,
        payloads: Option<Arc<dyn SendBytes>>,
        options: &ClientOptions,
    ) -> Result<Self>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let reader = BufReader::with_capacity(READ_BUFFER, reader);
        within_request_timeout(options, Self::negotiate(reader, writer, payloads, options, None)).await
    }

    async fn negotiate<S, W>(
        mut r: S,
        writer: W,
        payloads: Option<Arc<dyn SendBytes>>,
        options: &ClientOptions,
        greeted: Option<u32>,
    ) -> Result<Self>
    where
        S: ReplySource,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut w: Writer = Box::new(writer);
        let Negotiated { export, mode, structured, contexts } =
            negotiate::options(&mut r, &mut w, options, greeted).await?;
        let allocation_context = contexts.get(BASE_ALLOCATION).copied();
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(Some(WriteSide { stream: w, payloads })),
            pending: Mutex::new(PendingTable::default()),
            next_cookie: AtomicU64::new(1),
            info: export,
            mode,
            structured,
            allocation_context,
            contexts,
            reader: Mutex::new(None),
            slots: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
            max_in_flight: options.max_in_flight.max(1),
            request_timeout: options.request_timeout,
        });
        let weak = Arc::downgrade(&inner);
        let handle = tokio::spawn(async move { reader_loop(r, weak).await });
        if let Ok(mut slot) = inner.reader.lock() {
            *slot = Some(handle);
        }
        Ok(Self { inner })
    }

    /// The export as the server described it.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Whether extended headers are in use.
    pub fn extended_headers(&self) -> bool {
        self.inner.mode == HeaderMode::Extended
    }

    /// Whether structured replies are in use.
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// Requests sent (or being sent) whose replies have not all been read yet, including those
    /// whose callers have gone; at most [`ClientOptions::max_in_flight`].
    pub fn in_flight(&self) -> usize {
        if self.inner.slots.is_closed() {
            return 0;
        }
        self.inner.max_in_flight.saturating_sub(self.inner.slots.available_permits())
    }

    /// Whether block status can be queried.
    pub fn can_block_status(&self) -> bool {
        self.inner.allocation_context.is_some()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.inner.info.size => Ok(()),
            _ => Err(ClientError::Invalid(format!("{offset:#x}+{length:#x} is past the end of the export"))),
        }
    }

    /// Read `length` bytes at `offset` (at most the server's maximum payload).
    ///
    /// # Errors
    /// Out of range, or the server failed the read.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>> {
        self.read_into(offset, vec![0; length as usize]).await
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and hand it back: with buffers that are
    /// reused, no allocation per read. Every byte of the returned buffer was sent by the server
    /// (data) or declared a hole (zeroed here).
    ///
    /// # Errors
    /// Out of range, larger than the server's maximum payload, or the server failed the read
    /// (the buffer is dropped).
    pub async fn read_into(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let length = buf.len() as u64;
        self.check_read(offset, length)?;
        if length == 0 {
            return Ok(buf);
        }
        match self
            .submit(
                request(Command::Read, 0, offset, length),
                Payload::Borrowed(&[]),
                Expect::Read { offset, buf, covered: 0 },
            )
            .await?
        {
            Expect::Read { buf, .. } => Ok(buf),
            _ => Err(ClientError::Protocol("reply kind mismatch".into())),
        }
    }

    /// Read `length` bytes at `offset` as pieces that are, in order, the bytes asked for. On a
    /// connection made by [`Client::handshake_zero_copy`] they are the transport's own (no copy);
    /// on any other, one buffer per data chunk. A hole comes back as zeroes.
    ///
    /// # Errors
    /// As [`Client::read_into`].
    pub async fn read_bytes(&self, offset: u64, length: u32) -> Result<Vec<Bytes>> {
        let length = u64::from(length);
        self.check_read(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let expect = Expect::Pieces { offset, length, pieces: Vec::new(), covered: 0 };
        match self.submit(request(Command::Read, 0, offset, length), Payload::Borrowed(&[]), expect).await? {
            Expect::Pieces { pieces, .. } => in_order(pieces, length as usize),
            _ => Err(ClientError::Protocol("reply kind mismatch".into())),
        }
    }

    fn check_read(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        if length > u64::from(self.inner.info.max_payload) {
            return Err(ClientError::Invalid(format!(
                "read of {length} exceeds max payload {}",
                self.inner.info.max_payload
            )));
        }
        Ok(())
    }

    /// The wire flags for `flags` on `command`, refusing what the export does not advertise or
    /// the command does not take.
    fn wire_flags(&self, command: Command, flags: CommandFlags) -> Result<u16> {
        use crate::proto::consts::transmission_flags::{SEND_FAST_ZERO, SEND_FUA};
        let offered = self.inner.info.flags;
        let mut wire = 0;
        if flags.fua {
            if offered & SEND_FUA == 0 {
                return Err(ClientError::Unsupported("FUA"));
            }
            wire |= cmd_flags::FUA;
        }
        if flags.no_hole {
            if command != Command::WriteZeroes {
                return Err(ClientError::Invalid("NO_HOLE applies to write zeroes only".into()));
            }
            wire |= cmd_flags::NO_HOLE;
        }
        if flags.fast_zero {
            if command != Command::WriteZeroes {
                return Err(ClientError::Invalid("FAST_ZERO applies to write zeroes only".into()));
            }
            if offered & SEND_FAST_ZERO == 0 {
                return Err(ClientError::Unsupported("fast zero"));
            }
            wire |= cmd_flags::FAST_ZERO;
        }
        Ok(wire)
    }

    /// Write `data` at `offset`; `fua` makes it durable before the reply.
    ///
    /// # Errors
    /// Out of range, too large, or the server failed the write.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CommandFlags::default().fua() } else { CommandFlags::default() };
        self.write_with(offset, data, flags).await
    }

    /// Write `data` at `offset` with `flags` (FUA only).
    ///
    /// # Errors
    /// Out of range, too large, a flag the export or the command does not take, or the server
    /// failed the write.
    pub async fn write_with(&self, offset: u64, data: &[u8], flags: CommandFlags) -> Result<()> {
        self.write_payload(offset, Payload::Borrowed(data), flags).await
    }

    /// [`Client::write_with`] of a payload the caller shares rather than lends: on a connection
    /// made by [`Client::handshake_with_payloads`] the transport takes `data` as it is, without
    /// a copy ([`crate::zero_copy`]); on any other, the same as `write_with`.
    ///
    /// # Errors
    /// As [`Client::write_with`].
    pub async fn write_bytes(&self, offset: u64, data: Bytes, flags: CommandFlags) -> Result<()> {
        self.write_payload(offset, Payload::Owned(data), flags).await
    }

    async fn write_payload(&self, offset: u64, data: Payload<'_>, flags: CommandFlags) -> Result<()> {
        let len = data.as_slice().len() as u64;
        self.check_range(offset, len)?;
        if len > u64::from(self.inner.info.max_payload) {
            return Err(ClientError::Invalid(format!("write of {len} exceeds max payload")));
        }
        let wire = self.wire_flags(Command::Write, flags)?;
        self.submit(request(Command::Write, wire, offset, len), data, Expect::Simple).await.map(drop)
    }

    /// Flush completed writes to stable storage.
    ///
    /// # Errors
    /// The server failed the flush.
    pub async fn flush(&self) -> Result<()> {
        self.submit(request(Command::Flush, 0, 0, 0), Payload::Borrowed(&[]), Expect::Simple).await.map(drop)
    }

    /// Discard a range.
    ///
    /// # Errors
    /// Unsupported by the export, out of range, or failed.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.trim_with(offset, length, CommandFlags::default()).await
    }

    /// Discard a range with `flags` (FUA only).
    ///
    /// # Errors
    /// Unsupported by the export, a flag it does not take, out of range, or failed.
    pub async fn trim_with(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.range_command(Command::Trim, transmission_flags::SEND_TRIM, "trim", offset, length, flags).await
    }

    /// Zero a range; `no_hole` keeps it allocated.
    ///
    /// # Errors
    /// Unsupported by the export, out of range, or failed.
    pub async fn write_zeroes(&self, offset: u64, length: u64, no_hole: bool) -> Result<()> {
        let flags = if no_hole { CommandFlags::default().no_hole() } else { CommandFlags::default() };
        self.zero(offset, length, flags).await
    }

    /// Zero a range with `flags` (NO_HOLE, FAST_ZERO, FUA). With FAST_ZERO, a server that
    /// cannot zero faster than by writing answers [`ClientError::Request`] with
    /// `errno::ENOTSUP`, and the caller writes the zeroes itself if it must.
    ///
    /// # Errors
    /// Unsupported by the export, a flag it does not take, out of range, or failed.
    pub async fn zero(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        let advertised = transmission_flags::SEND_WRITE_ZEROES;
        self.range_command(Command::WriteZeroes, advertised, "write zeroes", offset, length, flags).await
    }

    /// A command on a range with no payload and a simple answer, if the export advertised it
    /// (`advertised`, a transmission flag).
    async fn range_command(
        &self,
        command: Command,
        advertised: u16,
        what: &'static str,
        offset: u64,
        length: u64,
        flags: CommandFlags,
    ) -> Result<()> {
        if self.inner.info.flags & advertised == 0 {
            return Err(ClientError::Unsupported(what));
        }
        self.check_range(offset, length)?;
        let wire = self.wire_flags(command, flags)?;
        self.submit(request(command, wire, offset, length), Payload::Borrowed(&[]), Expect::Simple).await.map(drop)
    }

    /// Whether the server granted the metadata context `name`.
    pub fn has_meta_context(&self, name: &str) -> bool {
        self.inner.contexts.contains_key(name)
    }

    /// `base:allocation` extents from `offset` (consecutive, at least one).
    ///
    /// # Errors
    /// Block status not negotiated, out of range, or failed.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let context = self.inner.allocation_context.ok_or(ClientError::Unsupported("block status"))?;
        self.query_context(context, offset, length).await
    }

    /// Extents of the metadata context `name` (selected with [`ClientOptions::meta_context`])
    /// from `offset`: consecutive, at least one; flags as that context defines them (for
    /// `qemu:dirty-bitmap:*`, bit 0 = dirty).
    ///
    /// # Errors
    /// The context was not granted, out of range, or failed.
    pub async fn block_status_of(&self, name: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let context = *self.inner.contexts.get(name).ok_or(ClientError::Unsupported("this metadata context"))?;
        self.query_context(context, offset, length).await
    }

    async fn query_context(&self, context: u32, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, length)?;
        let length = if self.inner.mode == HeaderMode::Compact { length.min(u64::from(u32::MAX)) } else { length };
        let expect = Expect::Status { context, extents: Vec::new() };
        match self.submit(request(Command::BlockStatus, 0, offset, length), Payload::Borrowed(&[]), expect).await? {
            Expect::Status { extents, .. } if !extents.is_empty() => Ok(extents),
            Expect::Status { .. } => Err(ClientError::Protocol("block status reply without extents".into())),
            _ => Err(ClientError::Protocol("reply kind mismatch".into())),
        }
    }
}

/// A request of `command` (its cookie is given when it is sent).
fn request(command: Command, flags: u16, offset: u64, length: u64) -> Request {
    Request { flags, command, cookie: 0, offset, length }
}

/// `negotiation` within the request timeout, if there is one.
/// TLS wraps a whole stream, which the `handshake*` functions, given halves, do not have:
/// options asking for it are refused there rather than ignored.
fn refuse_tls_on_halves(options: &ClientOptions) -> Result<()> {
    match options.tls {
        Some(_) => Err(ClientError::Invalid(
            "TLS needs a connection the client opens itself: Client::connect_uri, connect_tcp_with or connect_unix"
                .into(),
        )),
        None => Ok(()),
    }
}

async fn within_request_timeout<T>(
    options: &ClientOptions,
    negotiation: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match options.request_timeout {
        Some(t) => tokio::time::timeout(t, negotiation).await.unwrap_or(Err(ClientError::TimedOut(t))),
        None => negotiation.await,
    }
}
