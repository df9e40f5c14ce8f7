//! Hostile and broken clients: each gets the spec's answer or a clean close, the server stays
//! up, and other clients are not disturbed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{option_reply, send_option};

use nbd_server::proto::consts::{cmd, errno, opt, rep, IHAVEOPT, REQUEST_MAGIC};
use nbd_server::proto::handshake::{encode_info_request, GREETING_LEN};
use nbd_server::proto::transmission::{decode_reply_header, ReplyHeader};
use nbd_server::{Backend, Client, ExportConfig, MemoryBackend, Scope, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 1 << 20;

async fn start(config: ServerConfig, limit: usize) -> (Server, u16, Arc<MemoryBackend>) {
    common::start_embedded(config, SIZE, limit).await
}

async fn greeted(port: u16) -> TcpStream {
    greeted_on(TcpStream::connect(("127.0.0.1", port)).await.unwrap()).await
}

/// The greeting read from any transport.
async fn greeted_on<S: AsyncRead + Unpin>(mut s: S) -> S {
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    s
}

/// Handshake with GO, simple replies; leaves the socket in transmission.
async fn transmitting(port: u16) -> TcpStream {
    go(greeted(port).await).await
}

/// Client flags, then GO for export "e", on a greeted transport.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> S {
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    send_option(&mut s, opt::GO, &encode_info_request("e", &[])).await;
    loop {
        let (h, _) = option_reply(&mut s).await;
        if h.reply == rep::ACK {
            return s;
        }
        assert_eq!(h.reply, rep::INFO);
    }
}

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

async fn simple_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u64, u32) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    match decode_reply_header(&h).unwrap().unwrap().0 {
        ReplyHeader::Simple { cookie, error } => (cookie, error),
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

/// The server closed the connection (EOF or reset) within a few seconds.
async fn closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "server did not close the connection");
}

async fn still_serves(port: u16) {
    let c = Client::connect_tcp(("127.0.0.1", port), "e").await.unwrap();
    c.write(0, b"alive", false).await.unwrap();
    assert_eq!(c.read(0, 5).await.unwrap(), b"alive");
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_client_flags_or_options_closes_only_that_connection() {
    let (_server, port, _) = start(ServerConfig::default(), 4).await;
    let mut a = greeted(port).await;
    a.write_all(&0xffff_ffffu32.to_be_bytes()).await.unwrap();
    closed(&mut a).await;
    let mut b = greeted(port).await;
    b.write_all(&3u32.to_be_bytes()).await.unwrap();
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    closed(&mut b).await;
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_starttls_and_bad_option_data_get_errors_and_haggling_goes_on() {
    let (_server, port, _) = start(ServerConfig::default(), 4).await;
    let mut s = greeted(port).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    send_option(&mut s, 999, b"whatever").await;
    assert_eq!(option_reply(&mut s).await.0.reply, rep::ERR_UNSUP);
    send_option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut s).await.0.reply, rep::ERR_POLICY);
    send_option(&mut s, opt::GO, &[0, 0, 0, 200, b'x']).await;
    let (h, msg) = option_reply(&mut s).await;
    assert_eq!(h.reply, rep::ERR_INVALID);
    assert!(String::from_utf8_lossy(&msg).contains("exceeds"), "{}", String::from_utf8_lossy(&msg));
    send_option(&mut s, opt::LIST, &[]).await;
    let (h, d) = option_reply(&mut s).await;
    assert_eq!(h.reply, rep::SERVER);
    assert_eq!(&d[4..5], b"e");
    assert_eq!(option_reply(&mut s).await.0.reply, rep::ACK);
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(option_reply(&mut s).await.0.reply, rep::ACK);
    closed(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_claiming_a_gigabyte_closes_without_reading_it() {
    let (_server, port, _) = start(ServerConfig::default(), 4).await;
    let mut s = greeted(port).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&out).await.unwrap();
    closed(&mut s).await;
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_out_of_range_requests_get_errors_and_the_connection_goes_on() {
    let (server, port, _) = start(ServerConfig::default(), 4).await;
    let mut s = transmitting(port).await;
    s.write_all(&request(99, 1, 0, 0)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (1, errno::EINVAL));
    s.write_all(&request(cmd::READ, 2, SIZE, 512)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (2, errno::EINVAL));
    let mut w = request(cmd::WRITE, 3, SIZE - 100, 512);
    w.extend_from_slice(&[0xaa; 512]);
    s.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (3, errno::ENOSPC));
    s.write_all(&request(cmd::BLOCK_STATUS, 4, 0, 512)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (4, errno::EINVAL), "no metadata context was negotiated");
    // And a good request after all that.
    let mut w = request(cmd::WRITE, 5, 0, 4);
    w.extend_from_slice(b"good");
    s.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (5, 0));
    s.write_all(&request(cmd::READ, 6, 0, 4)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (6, 0));
    let mut data = [0u8; 4];
    s.read_exact(&mut data).await.unwrap();
    assert_eq!(&data, b"good");
    assert!(server.export_stats("e").unwrap().errors >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_announcing_a_1_gib_write_is_refused_and_closed_without_reading_the_payload() {
    let (_server, port, _) = start(ServerConfig::default(), 4).await;
    let mut s = transmitting(port).await;
    s.write_all(&request(cmd::WRITE, 7, 0, 1 << 30)).await.unwrap();
    let (cookie, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut s)).await.unwrap();
    assert_eq!((cookie, error), (7, errno::EINVAL));
    closed(&mut s).await;
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_the_connection() {
    let (server, port, _) = start(ServerConfig::default(), 1).await;
    let mut s = transmitting(port).await;
    s.write_all(&[0x55u8; 28]).await.unwrap();
    closed(&mut s).await;
    // The place is released: the single-connection export takes a new client.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.export_stats("e").unwrap().connections_active != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the connection's place was not released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_with_requests_in_flight_leaves_the_server_healthy() {
    let (server, port, _) = start(ServerConfig::default(), 1).await;
    let mut s = transmitting(port).await;
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend_from_slice(&request(cmd::WRITE, i, (i % 16) * 65536, 65536));
        burst.extend_from_slice(&vec![i as u8; 65536]);
    }
    s.write_all(&burst).await.unwrap();
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.export_stats("e").unwrap().connections_active != 0 {
        assert!(tokio::time::Instant::now() < deadline, "connection not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_at_the_handshake_deadline() {
    let config = ServerConfig::default().handshake_timeout(Duration::from_millis(300));
    let (_server, port, _) = start(config, 1).await;
    let mut s = greeted(port).await;
    let started = std::time::Instant::now();
    closed(&mut s).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    still_serves(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_in_flight_writes_before_closing() {
    let (server, port, backend) = start(ServerConfig::default(), 1).await;
    let c = Client::connect_tcp(("127.0.0.1", port), "e").await.unwrap();
    let mut writes = Vec::new();
    for i in 0..16u64 {
        let c = c.clone();
        writes.push(tokio::spawn(async move { (i, c.write(i * 65536, &vec![i as u8 + 1; 65536], false).await) }));
    }
    // Shut down once the server is working on them (the first bytes have landed), not after a
    // guessed delay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.export_stats("e").unwrap().bytes_written == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no write reached the server");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.shutdown().await.unwrap();
    let mut acknowledged = 0;
    for w in writes {
        let (i, result) = w.await.unwrap();
        if result.is_ok() {
            acknowledged += 1;
            let mut back = vec![0u8; 65536];
            backend.read(i * 65536, &mut back).await.unwrap();
            assert!(back.iter().all(|&b| b == i as u8 + 1), "acknowledged write {i} is in the backend");
        }
    }
    assert!(acknowledged > 0);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "listener closed after shutdown");
}

/// The real in-memory backend with reads held until the test opens the gate: makes "requests
/// still in flight" a state the test controls instead of a race.
struct GatedReads {
    inner: MemoryBackend,
    open: tokio::sync::watch::Receiver<bool>,
    entered: std::sync::atomic::AtomicUsize,
}

#[nbd_server::async_trait]
impl Backend for GatedReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> nbd_server::backend::BackendResult<()> {
        self.entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> nbd_server::backend::BackendResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> nbd_server::backend::BackendResult<()> {
        self.inner.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_gives_its_slot_back_while_its_requests_still_drain() {
    let (gate, open) = tokio::sync::watch::channel(false);
    let server = Server::new(ServerConfig::default());
    let backend = Arc::new(GatedReads { inner: MemoryBackend::new(SIZE), open, entered: Default::default() });
    server.add_export(ExportConfig::new("e", backend as Arc<dyn Backend>).max_connections(1)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });

    // The only client sends 32 reads (held in the backend) and vanishes.
    let mut a = transmitting(port).await;
    let mut burst = Vec::new();
    for i in 0..32u64 {
        burst.extend_from_slice(&request(cmd::READ, i, i * 4096, 4096));
    }
    a.write_all(&burst).await.unwrap();
    drop(a);
    // Its place is free while those reads still wait: the next client gets in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.export_stats("e").unwrap().connections_active != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the vanished client still holds the only slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut b = transmitting(port).await;
    // Removal still waits for the old requests: it finishes only once they are let go.
    let remover = {
        let s = server.clone();
        tokio::spawn(async move { s.remove_export("e").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!remover.is_finished(), "removal did not wait for requests still in flight");
    gate.send_replace(true);
    b.write_all(&request(cmd::DISC, 99, 0, 0)).await.unwrap();
    drop(b);
    tokio::time::timeout(Duration::from_secs(10), remover).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_connections_together_stay_within_the_server_wide_byte_budget() {
    let (gate, open) = tokio::sync::watch::channel(false);
    let config = ServerConfig::default().max_payload(256 << 10).max_buffered_bytes_total(1 << 20);
    let server = Server::new(config);
    let backend = Arc::new(GatedReads { inner: MemoryBackend::new(SIZE), open, entered: Default::default() });
    server.add_export(ExportConfig::new("e", backend.clone() as Arc<dyn Backend>).max_connections(4)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let entered = || backend.entered.load(std::sync::atomic::Ordering::SeqCst);

    // One client takes the whole budget: four 256 KiB reads, held in the backend.
    let mut a = transmitting(port).await;
    let mut burst = Vec::new();
    for i in 0..4u64 {
        burst.extend_from_slice(&request(cmd::READ, i, i * (256 << 10), 256 << 10));
    }
    a.write_all(&burst).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while entered() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the first client's reads never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Another client's read waits for budget: its buffer is not even allocated.
    let mut b = transmitting(port).await;
    b.write_all(&request(cmd::READ, 9, 0, 256 << 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(entered(), 4, "a read went past the server-wide budget");
    // Budget comes back as replies go out: everything completes.
    gate.send_replace(true);
    for _ in 0..4 {
        let (_, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut a)).await.unwrap();
        assert_eq!(error, 0);
        let mut data = vec![0u8; 256 << 10];
        a.read_exact(&mut data).await.unwrap();
    }
    let (cookie, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut b)).await.unwrap();
    assert_eq!((cookie, error), (9, 0));
    assert_eq!(entered(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writes_budget_comes_back_once_it_is_applied_even_while_its_reply_cannot_leave() {
    let config = ServerConfig::default().max_payload(256 << 10).max_buffered_bytes_total(1 << 20);
    let (server, port, backend) = start(config, 4).await;
    // A client whose transport takes one reply and then stalls (an SSH session held up by
    // another channel, say): 16 bytes of room, and the test stops reading after the handshake.
    let (client_end, server_end) = tokio::io::duplex(16);
    let s = server.clone();
    tokio::spawn(async move { s.serve_stream(server_end, Scope::All).await });
    let mut a = go(greeted_on(client_end).await).await;
    // Six 256 KiB writes: all applied; one reply out, one in the writer's buffer, and four, the
    // server-wide budget (1 MiB) over again, waiting behind them.
    let mut burst = Vec::new();
    for i in 0..6u64 {
        burst.extend_from_slice(&request(cmd::WRITE, i, (i % 4) * (256 << 10), 256 << 10));
        burst.extend_from_slice(&vec![i as u8 + 1; 256 << 10]);
    }
    tokio::time::timeout(Duration::from_secs(5), a.write_all(&burst)).await.unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut last = [0u8; 1];
        backend.read(256 << 10, &mut last).await.unwrap();
        if last[0] == 6 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the last write was never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Their bytes are in the image, not in buffers: another client's write gets the budget.
    let mut b = transmitting(port).await;
    let mut write = request(cmd::WRITE, 9, 3 * (256 << 10), 256 << 10);
    write.extend_from_slice(&vec![9u8; 256 << 10]);
    b.write_all(&write).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut b)).await;
    assert_eq!(answered.ok(), Some((9, 0)), "the write waited for budget held by replies that cannot leave");
    // The stalled client's replies all arrive once its transport moves again.
    let mut cookies = Vec::new();
    for _ in 0..6 {
        let (cookie, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut a)).await.unwrap();
        assert_eq!(error, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [0, 1, 2, 3, 4, 5]);
}

/// The real in-memory backend with writes held until the test opens the gate, and a log of
/// which writes and flushes reached it, in order.
struct HeldWrites {
    inner: MemoryBackend,
    open: tokio::sync::watch::Receiver<bool>,
    log: std::sync::Mutex<Vec<&'static str>>,
}

#[nbd_server::async_trait]
impl Backend for HeldWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> nbd_server::backend::BackendResult<()> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> nbd_server::backend::BackendResult<()> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.write(offset, data, fua).await?;
        self.log.lock().unwrap().push(if data.len() >= 128 << 10 { "large write" } else { "small write" });
        Ok(())
    }
    async fn flush(&self) -> nbd_server::backend::BackendResult<()> {
        self.log.lock().unwrap().push("flush");
        self.inner.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_covers_every_write_sent_before_it_on_its_connection_even_unanswered_ones() {
    let (gate, open) = tokio::sync::watch::channel(false);
    let server = Server::new(ServerConfig::default());
    let backend = Arc::new(HeldWrites { inner: MemoryBackend::new(SIZE), open, log: Default::default() });
    server.add_export(ExportConfig::new("e", backend.clone() as Arc<dyn Backend>)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });

    // A large plain write (applied in its own task) held in the backend, then a FLUSH, sent
    // together: the flush must not reach the backend before the write is in it.
    let mut c = transmitting(port).await;
    let mut burst = request(cmd::WRITE, 1, 0, 256 << 10);
    burst.extend_from_slice(&vec![0x5a; 256 << 10]);
    burst.extend_from_slice(&request(cmd::FLUSH, 2, 0, 0));
    c.write_all(&burst).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(backend.log.lock().unwrap().is_empty(), "the flush ran before the write it follows");
    gate.send_replace(true);
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let (cookie, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut c)).await.unwrap();
        assert_eq!(error, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2]);
    assert_eq!(*backend.log.lock().unwrap(), ["large write", "flush"]);
    // Writes after a flush still run: a small one (applied by the reader), then a flush.
    let mut burst = request(cmd::WRITE, 3, 0, 4096);
    burst.extend_from_slice(&[0xa5; 4096]);
    burst.extend_from_slice(&request(cmd::FLUSH, 4, 0, 0));
    c.write_all(&burst).await.unwrap();
    for _ in 0..2 {
        let (_, error) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut c)).await.unwrap();
        assert_eq!(error, 0);
    }
    assert_eq!(*backend.log.lock().unwrap(), ["large write", "flush", "small write", "flush"]);
}
