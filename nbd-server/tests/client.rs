//! The async client against our own server (in-process) and against qemu-nbd and nbdkit.

mod common;

use std::sync::Arc;

use common::*;
use nbd_server::proto::consts::{STATE_HOLE, STATE_ZERO};
use nbd_server::{Client, ClientError, ClientOptions, CommandFlags, ExportConfig, MemoryBackend, Server, ServerConfig};

async fn in_process(limit: usize, size: u64) -> (Server, u16) {
    let server = Server::new(ServerConfig::default());
    server.add_export(ExportConfig::new("mem", Arc::new(MemoryBackend::new(size))).max_connections(limit)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, port)
}

/// The same checks against any server: pipelined writes, reads, zeroes, trim, block status.
async fn exercise(client: &Client, check_holes: bool) {
    let size = client.info().size;
    assert!(size >= 8 << 20);
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(65536, i + 1);
            c.write(i * 65536, &data, i % 8 == 0).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client.flush().await.unwrap();
    let mut reads = Vec::new();
    for i in 0..32u64 {
        let c = client.clone();
        reads.push(tokio::spawn(async move { (i, c.read(i * 65536, 65536).await.unwrap()) }));
    }
    for r in reads {
        let (i, got) = r.await.unwrap();
        assert_eq!(got, pattern(65536, i + 1), "block {i}");
    }
    client.write_zeroes(65536, 65536, false).await.unwrap();
    assert_eq!(client.read(65536, 65536).await.unwrap(), vec![0u8; 65536]);
    client.trim(4 << 20, 1 << 20).await.unwrap();
    if check_holes && client.can_block_status() {
        let extents = client.block_status(0, 8 << 20).await.unwrap();
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        assert!(covered > 0);
        assert_eq!(extents[0].flags & STATE_HOLE, 0, "first block has data: {extents:?}");
        let mut pos = 0;
        let mut tail_is_hole = false;
        for e in &extents {
            if pos <= 6 << 20 && pos + e.length > 6 << 20 {
                tail_is_hole = e.flags & STATE_ZERO != 0;
            }
            pos += e.length;
        }
        assert!(tail_is_hole, "the unwritten tail reads as zero: {extents:?}");
    }
    // A read spanning written data and a hole reassembles correctly.
    let span = client.read(31 * 65536, 2 * 65536).await.unwrap();
    assert_eq!(&span[..65536], &pattern(65536, 32)[..]);
    assert_eq!(&span[65536..], &vec![0u8; 65536][..]);
    // And so does one that comes back in pieces.
    assert_eq!(client.read_bytes(31 * 65536, 2 * 65536).await.unwrap().concat(), span);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_agree_with_extended_and_compact_headers() {
    let (_server, port) = in_process(4, 16 << 20).await;
    let c = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    assert!(c.extended_headers());
    exercise(&c, true).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (r, w) = stream.into_split();
    let opts = ClientOptions::new("mem").extended_headers(false);
    let compact = Client::handshake(r, w, &opts).await.unwrap();
    assert!(!compact.extended_headers() && compact.structured_replies());
    exercise(&compact, true).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (r, w) = stream.into_split();
    let opts = ClientOptions::new("mem").structured_replies(false).extended_headers(false);
    let simple = Client::handshake(r, w, &opts).await.unwrap();
    assert!(!simple.structured_replies());
    exercise(&simple, false).await;
    simple.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_on_one_connection_covers_writes_made_on_another() {
    // A real file behind the export: FLUSH is an fdatasync of the one file both connections
    // share, which is what makes CAN_MULTI_CONN honest.
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "shared.raw", 8 << 20);
    let server = Server::new(ServerConfig::default());
    let backend = Arc::new(nbd_server::FileBackend::open(&file, false).unwrap());
    server.add_export(ExportConfig::new("mem", backend).max_connections(4)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let a = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    let b = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    assert!(a.info().flags & nbd_server::proto::consts::transmission_flags::CAN_MULTI_CONN != 0);
    a.write(0, &[7u8; 4096], false).await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(b.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    let stats = server.export_stats("mem").unwrap();
    assert_eq!(stats.connections_active, 2);
    assert_eq!(stats.writes, 1);
    assert_eq!(stats.flushes, 1);
    assert_eq!(stats.bytes_read, 4096);
    assert_eq!(&std::fs::read(&file).unwrap()[..4096], &[7u8; 4096][..], "in the file both connections share");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_is_reported_with_its_reason() {
    let (_server, port) = in_process(1, 1 << 20).await;
    let _first = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    let err = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap_err();
    match err {
        ClientError::OptionRefused { message, .. } => assert!(message.contains("limit of 1"), "{message}"),
        other => panic!("unexpected {other}"),
    }
    let err = Client::connect_tcp(("127.0.0.1", port), "nope").await.unwrap_err();
    assert!(err.to_string().contains("no export named 'nope'"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_drains_its_clients_and_reports_final_counters() {
    let (server, port) = in_process(2, 1 << 20).await;
    let c = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    c.write(0, &[1u8; 512], false).await.unwrap();
    let stats = server.remove_export("mem").await.unwrap();
    assert_eq!(stats.writes, 1);
    assert_eq!(stats.connections_active, 0);
    assert!(c.read(0, 512).await.is_err(), "the connection is closed");
    assert!(Client::connect_tcp(("127.0.0.1", port), "mem").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_works_against_qemu_nbd_with_extended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "q.raw", 16 << 20);
    let peer = start_qemu_nbd(&file, "q");
    let c = Client::connect_tcp(("127.0.0.1", peer.port), "q").await.unwrap();
    assert!(c.extended_headers(), "qemu-nbd 10 speaks extended headers");
    exercise(&c, true).await;
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_works_against_nbdkit_without_extended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "k.raw", 16 << 20);
    let peer = start_nbdkit(&file);
    let c = Client::connect_tcp(("127.0.0.1", peer.port), "").await.unwrap();
    assert!(c.structured_replies());
    exercise(&c, true).await;
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_dropped_mid_frame_closes_the_connection_instead_of_corrupting_the_export() {
    let (_server, port) = in_process(4, 64 << 20).await;
    let client = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    let big = pattern(32 << 20, 7);
    // Poll the write once: 32 MiB do not fit in the socket buffers, so the frame is half sent
    // when the future is dropped.
    let completed = tokio::select! {
        biased;
        r = client.write(0, &big, false) => { r.unwrap(); true }
        _ = std::future::ready(()) => false,
    };
    assert!(!completed, "the first poll sent 32 MiB whole; the test needs a partial frame");
    // The next request on any clone fails cleanly instead of being glued to the partial frame.
    let next = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.clone().write(48 << 20, &pattern(4096, 9), false),
    )
    .await
    .expect("the next write hung: its bytes were taken as the rest of the dropped frame");
    assert!(matches!(next, Err(ClientError::Closed)), "{next:?}");
    // Nothing of either request reached the export.
    let fresh = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    assert_eq!(fresh.read(48 << 20, 4096).await.unwrap(), vec![0u8; 4096]);
    let head = fresh.read(0, 1 << 20).await.unwrap();
    assert!(head.iter().all(|&b| b == 0), "a truncated write must not be applied");
}

/// A client that negotiates, asks for 256 MiB of reads and never reads a reply.
fn stalled_reader(port: u16, export: &str) -> std::net::TcpStream {
    use nbd_server::proto::consts::{opt, rep};
    use nbd_server::proto::handshake::{encode_info_request, OptionHeader, OptionReplyHeader};
    use nbd_server::proto::transmission::{encode_request, Command, HeaderMode, Request};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut out = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    OptionHeader::encode(&mut out, opt::GO, &encode_info_request(export, &[]));
    s.write_all(&out).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut d = vec![0u8; h.length as usize];
        s.read_exact(&mut d).unwrap();
        if h.reply == rep::ACK {
            break;
        }
    }
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        let r = Request { flags: 0, command: Command::Read, cookie: i, offset: i << 25, length: 32 << 20 };
        encode_request(&mut reqs, HeaderMode::Compact, &r).unwrap();
    }
    s.write_all(&reqs).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_cuts_a_client_that_stopped_reading_once_the_deadline_passes() {
    let (server, port) = in_process(4, 256 << 20).await;
    let s = tokio::task::spawn_blocking(move || stalled_reader(port, "mem")).await.unwrap();
    // Let the server fill the socket with replies nobody reads.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.export_stats("mem").map(|st| st.reads).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the reads never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let removed = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        server.remove_export_within("mem", std::time::Duration::from_millis(300)),
    )
    .await
    .expect("removing the export hung on a client that does not read");
    let stats = removed.unwrap();
    assert_eq!(stats.connections_active, 0, "{stats:?}");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_stream_takes_a_client_slot_and_shutdown_waits_for_it() {
    let server = Server::new(ServerConfig::default().max_clients(1));
    server.add_export(ExportConfig::new("mem", Arc::new(MemoryBackend::new(1 << 20)))).unwrap();
    let stream_client = |server: &Server| {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let s = server.clone();
        let served = tokio::spawn(async move { s.serve_stream(theirs, nbd_server::Scope::All).await });
        let (r, w) = tokio::io::split(ours);
        (served, async move { Client::handshake(r, w, &ClientOptions::new("mem")).await })
    };
    let (first_served, first) = stream_client(&server);
    let first = first.await.unwrap();
    first.write(0, &[7u8; 4096], false).await.unwrap();
    // The only slot is taken: a second stream is refused (dropped before the handshake).
    let (second_served, second) = stream_client(&server);
    assert!(second.await.is_err(), "a second stream got past the client limit");
    second_served.await.unwrap();
    // Shutdown waits for the stream's connection (and flushes), then the stream is done.
    let shutdown = {
        let s = server.clone();
        tokio::spawn(async move { s.shutdown().await })
    };
    drop(first);
    shutdown.await.unwrap().unwrap();
    first_served.await.unwrap();
    // After shutdown began, a stream is not served at all.
    let (_, late) = stream_client(&server);
    assert!(late.await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_connects_by_uri_over_tcp_and_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "q.raw", 16 << 20);
    // qemu-nbd on TCP, by URI.
    let peer = start_qemu_nbd(&file, "q");
    let c =
        Client::connect_uri(&format!("nbd://127.0.0.1:{}/q", peer.port), &ClientOptions::new("ignored")).await.unwrap();
    exercise(&c, true).await;
    c.disconnect().await.unwrap();
    drop(peer);
    // sendense-nbd on a Unix socket, by URI.
    let sock = dir.path().join("s.sock");
    let child = std::process::Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "u", "-t", "-k"])
        .arg(&sock)
        .arg(&file)
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Listening, not just bound: a probe connection goes through (the export is persistent).
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let uri = format!("nbd+unix:///u?socket={}", sock.display());
    let c = Client::connect_uri(&uri, &ClientOptions::new("")).await.unwrap();
    c.write(4096, &[9u8; 4096], true).await.unwrap();
    assert_eq!(c.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
    c.disconnect().await.unwrap();
    assert!(Client::connect_uri("nbds://127.0.0.1/u", &ClientOptions::new("")).await.is_err(), "TLS refused");
    let _ = child.kill();
    let _ = child.wait();
}

/// Stop or continue a process (SIGSTOP / SIGCONT): a server that stops answering while its
/// sockets stay open, the way a hung or swapped-out server looks to a client.
fn signal(peer: &Peer, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, &peer.child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_holds_at_most_max_in_flight_requests_then_answers_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "q.raw", &pattern(8 << 20, 3));
    let peer = start_qemu_nbd(&file, "q");
    let opts = ClientOptions::new("q").max_in_flight(2);
    let c = Client::connect_uri(&peer.url(), &opts).await.unwrap();
    signal(&peer, "-STOP");
    let reads: Vec<_> = (0..5u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { (i, c.read(i << 20, 65536).await) })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.in_flight() < 2 {
        assert!(std::time::Instant::now() < deadline, "two requests never went out");
        tokio::task::yield_now().await;
    }
    // The other three wait for a slot; nothing has been answered.
    assert_eq!(c.in_flight(), 2);
    assert!(reads.iter().all(|r| !r.is_finished()), "a read finished while the server was stopped");
    signal(&peer, "-CONT");
    let want = pattern(8 << 20, 3);
    for r in reads {
        let (i, got) = r.await.unwrap();
        let at = (i << 20) as usize;
        assert_eq!(got.unwrap(), &want[at..at + 65536], "read {i}");
    }
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_server_never_answers_times_out_and_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "q.raw", 4 << 20);
    let peer = start_qemu_nbd(&file, "q");
    let timeout = std::time::Duration::from_millis(300);
    let opts = ClientOptions::new("q").request_timeout(timeout);
    // Data written without a deadline: a loaded machine may take longer than 300 ms to answer.
    let plain = Client::connect_uri(&peer.url(), &ClientOptions::new("q")).await.unwrap();
    plain.write(0, &[1u8; 4096], false).await.unwrap();
    let c = Client::connect_uri(&peer.url(), &opts).await.unwrap();
    signal(&peer, "-STOP");
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 4096).await }
    });
    let here = c.read(0, 4096).await.unwrap_err();
    let there = pending.await.unwrap().unwrap_err();
    // The first to time out closes the connection; the other fails with it.
    let timed_out = |e: &ClientError| matches!(e, ClientError::TimedOut(t) if *t == timeout);
    assert!(timed_out(&here) || timed_out(&there), "{here} / {there}");
    for e in [&here, &there] {
        assert!(timed_out(e) || matches!(e, ClientError::Closed), "{e}");
    }
    assert!(matches!(c.read(0, 4096).await, Err(ClientError::Closed)), "the connection is closed for good");
    assert_eq!(c.in_flight(), 0);
    signal(&peer, "-CONT");
    let fresh = Client::connect_uri(&peer.url(), &opts).await.unwrap();
    assert_eq!(fresh.read(0, 4096).await.unwrap(), vec![1u8; 4096], "the server itself is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_flags_reach_the_server_and_fast_zero_is_refused_where_it_cannot_be_fast() {
    let dir = tempfile::tempdir().unwrap();
    // Our server over qcow2: zeroing without holes is a write, so FAST_ZERO|NO_HOLE is ENOTSUP.
    let image = dir.path().join("z.qcow2");
    qcow2::Image::create(&image, &qcow2::CreateOptions::new(8 << 20)).unwrap();
    let server = Server::new(ServerConfig::default());
    let backend = Arc::new(nbd_server::Qcow2Backend::open(&image, false).unwrap());
    server.add_export(ExportConfig::new("z", backend)).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn({
        let s = server.clone();
        async move { s.serve(listener).await }
    });
    let c = Client::connect_tcp(("127.0.0.1", port), "z").await.unwrap();
    c.write_with(0, &pattern(1 << 20, 5), CommandFlags::default().fua()).await.unwrap();
    let none = CommandFlags::default();
    let err = c.zero(0, 65536, none.fast_zero().no_hole()).await.unwrap_err();
    let enotsup = nbd_server::proto::consts::errno::ENOTSUP;
    assert!(matches!(err, ClientError::Request { error, .. } if error == enotsup), "{err}");
    assert_eq!(c.read(0, 65536).await.unwrap(), pattern(1 << 20, 5)[..65536], "a refused fast zero changes nothing");
    c.zero(0, 65536, none.fast_zero().fua()).await.unwrap();
    // read_into hands back the caller's buffer, every byte from the server (zeroes included).
    let buf = c.read_into(0, vec![0xAA; 131072]).await.unwrap();
    assert_eq!(&buf[..65536], &vec![0u8; 65536][..]);
    assert_eq!(&buf[65536..], &pattern(1 << 20, 5)[65536..131072]);
    let err = c.write_with(0, &[0u8; 512], none.no_hole()).await.unwrap_err();
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    c.disconnect().await.unwrap();
    // qemu-nbd on a raw file zeroes fast (a punched hole): the same request succeeds there.
    let raw = write_file(dir.path(), "q.raw", &pattern(1 << 20, 6));
    let peer = start_qemu_nbd(&raw, "q");
    let q = Client::connect_uri(&peer.url(), &ClientOptions::new("q")).await.unwrap();
    q.zero(0, 65536, none.fast_zero()).await.unwrap();
    assert_eq!(q.read(0, 65536).await.unwrap(), vec![0u8; 65536]);
    q.write_with(65536, &[9u8; 4096], none.fua()).await.unwrap();
    assert_eq!(&std::fs::read(&raw).unwrap()[65536..69632], &[9u8; 4096][..], "FUA: in the file at the reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_before_it_was_sent_gives_its_in_flight_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "q.raw", 64 << 20);
    let peer = start_qemu_nbd(&file, "q");
    let c = Client::connect_uri(&peer.url(), &ClientOptions::new("q").max_in_flight(2)).await.unwrap();
    signal(&peer, "-STOP");
    // A 32 MiB write to a stopped server fills the socket buffers and holds the writer. Polled
    // once here, so it holds the writer before any read below asks for it (spawned, it could
    // hold its slot but not yet the writer, and a read sent first would keep its slot).
    let mut big = Box::pin({
        let c = c.clone();
        async move { c.write(0, &pattern(32 << 20, 4), false).await }
    });
    let first = tokio::select! {
        biased;
        r = &mut big => Some(r),
        _ = std::future::ready(()) => None,
    };
    assert!(first.is_none(), "32 MiB went whole to a stopped server; the test needs a held writer");
    assert_eq!(c.in_flight(), 1);
    // Reads that give up while waiting for the writer: never sent, so nothing will answer them.
    for _ in 0..3 {
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(50), c.read(40 << 20, 4096)).await;
        assert!(gave_up.is_err(), "a read completed while the server was stopped");
    }
    assert_eq!(c.in_flight(), 1, "a dropped, unsent request kept its slot");
    signal(&peer, "-CONT");
    big.await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(32 << 20, 4)[..4096]);
    assert_eq!(c.in_flight(), 0);
}

/// A TCP write half shared by the byte stream and the owned-payload path, as a channel's two
/// sending paths share one channel.
struct SharedWriteHalf(Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>);

impl SharedWriteHalf {
    /// The client writes a frame under its own lock, so the two paths never overlap: finding
    /// the half taken is a test failure, reported as an error.
    fn with_half<T>(
        &self,
        f: impl FnOnce(std::pin::Pin<&mut tokio::net::tcp::OwnedWriteHalf>) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match self.0.try_lock() {
            Ok(mut w) => f(std::pin::Pin::new(&mut *w)),
            Err(_) => std::task::Poll::Ready(Err(std::io::Error::other("both paths at once"))),
        }
    }
}

impl tokio::io::AsyncWrite for SharedWriteHalf {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.with_half(|w| w.poll_write(cx, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.with_half(|w| w.poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.with_half(|w| w.poll_shutdown(cx))
    }
}

/// The owned-payload path: counts what it was handed and writes it to the same socket.
struct CountingPayloads {
    socket: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    handed: std::sync::atomic::AtomicU64,
}

impl nbd_server::client::SendBytes for CountingPayloads {
    fn send(
        &self,
        data: bytes::Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            self.handed.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.socket.lock().await.write_all(&data).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_payloads_take_the_transports_own_path_after_their_header_and_land_intact() {
    let (_server, port) = in_process(4, 64 << 20).await;
    let (r, w) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap().into_split();
    let socket = Arc::new(tokio::sync::Mutex::new(w));
    let payloads = Arc::new(CountingPayloads { socket: Arc::clone(&socket), handed: 0.into() });
    let options = ClientOptions::new("mem");
    let client = Client::handshake_with_payloads(r, SharedWriteHalf(socket), payloads.clone(), &options).await.unwrap();
    // Pipelined from many tasks: every header must be followed by its own payload.
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = bytes::Bytes::from(pattern(300_000, i + 1));
            c.write_bytes(i * 300_000, data, CommandFlags::default()).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A borrowed payload on the same connection still goes through the stream.
    client.write(24 * 300_000, &pattern(4096, 99), false).await.unwrap();
    assert_eq!(payloads.handed.load(std::sync::atomic::Ordering::Relaxed), 24 * 300_000);
    for i in 0..24u64 {
        assert_eq!(client.read(i * 300_000, 300_000).await.unwrap(), pattern(300_000, i + 1), "write {i}");
    }
    assert_eq!(client.read(24 * 300_000, 4096).await.unwrap(), pattern(4096, 99));
    // On a connection without such a path, `write_bytes` is a plain write.
    let plain = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    plain.write_bytes(40 << 20, bytes::Bytes::from(pattern(70_000, 5)), CommandFlags::default()).await.unwrap();
    assert_eq!(client.read(40 << 20, 70_000).await.unwrap(), pattern(70_000, 5));
}

/// A served stream: the accepted socket's read half, and its write half shared with the
/// owned-bytes path.
struct SharedStream {
    read: tokio::net::tcp::OwnedReadHalf,
    write: SharedWriteHalf,
}

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.write).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.write).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_stream_with_an_owned_bytes_path_sends_large_read_replies_through_it_intact() {
    use std::sync::atomic::Ordering::Relaxed;
    let server = Server::new(ServerConfig::default());
    server.add_export(ExportConfig::new("mem", Arc::new(MemoryBackend::new(64 << 20)))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s, total) = (server.clone(), Arc::clone(&handed));
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let (read, write) = sock.into_split();
            let socket = Arc::new(tokio::sync::Mutex::new(write));
            let payloads = Arc::new(CountingPayloads { socket: Arc::clone(&socket), handed: 0.into() });
            let stream = SharedStream { read, write: SharedWriteHalf(socket) };
            let (s, total, counted) = (s.clone(), Arc::clone(&total), Arc::clone(&payloads));
            tokio::spawn(async move {
                s.serve_stream_with_payloads(stream, nbd_server::Scope::All, "test", payloads).await;
                total.fetch_add(counted.handed.load(Relaxed), Relaxed);
            });
        }
    });
    // Data with a hole in the middle: structured reads answer with data, hole and data chunks,
    // simple ones with the whole range; both must arrive intact.
    let mut image = pattern(3 << 20, 1);
    image.resize(5 << 20, 0);
    image.extend(pattern(3 << 20, 2));
    image.resize(12 << 20, 0);
    for structured in [true, false] {
        let options = ClientOptions::new("mem").structured_replies(structured);
        let client = Client::connect_uri(&format!("nbd://127.0.0.1:{port}/mem"), &options).await.unwrap();
        client.write(0, &image[..8 << 20], false).await.unwrap();
        let mut reads = Vec::new();
        for i in 0..6usize {
            let c = client.clone();
            reads.push(tokio::spawn(async move { (i, c.read((i as u64) << 20, 4 << 20).await.unwrap()) }));
        }
        for r in reads {
            let (i, got) = r.await.unwrap();
            assert!(got[..] == image[i << 20..(i + 4) << 20], "read at {i} MiB (structured: {structured})");
        }
        // A small reply goes through the stream.
        assert_eq!(client.read(4096, 4096).await.unwrap(), &image[4096..8192]);
        client.disconnect().await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Every simple reply's 4 MiB went that way, and the structured replies' data chunks.
    while handed.load(Relaxed) < 6 * (4 << 20) {
        assert!(std::time::Instant::now() < deadline, "read data handed over: {}", handed.load(Relaxed));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A read half that hands out what it received in pieces of changing sizes, as a channel hands
/// out its messages, and counts what went that way.
struct Piecewise {
    read: tokio::net::tcp::OwnedReadHalf,
    sizes: std::iter::Cycle<std::vec::IntoIter<usize>>,
    handed: Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncRead for Piecewise {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl nbd_server::ReceiveBytes for Piecewise {
    fn poll_receive(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        max: usize,
    ) -> std::task::Poll<std::io::Result<bytes::Bytes>> {
        let size = self.sizes.next().unwrap_or(1).min(max);
        let mut piece = vec![0u8; size];
        let mut buf = tokio::io::ReadBuf::new(&mut piece);
        std::task::ready!(tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.read), cx, &mut buf))?;
        let n = buf.filled().len();
        piece.truncate(n);
        self.handed.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        std::task::Poll::Ready(Ok(bytes::Bytes::from(piece)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_a_transport_that_hands_out_its_pieces_come_back_as_those_pieces_in_order() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_server, port) = in_process(8, 64 << 20).await;
    // Data with a hole in the middle: structured reads answer with data, hole and data chunks.
    let mut image = pattern(3 << 20, 1);
    image.resize(5 << 20, 0);
    image.extend(pattern(3 << 20, 2));
    let plain = Client::connect_tcp(("127.0.0.1", port), "mem").await.unwrap();
    plain.write(0, &image, false).await.unwrap();
    for structured in [true, false] {
        let (read, write) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap().into_split();
        let socket = Arc::new(tokio::sync::Mutex::new(write));
        let payloads = Arc::new(CountingPayloads { socket: Arc::clone(&socket), handed: 0.into() });
        let handed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sizes = vec![1, 7, 4096, 65_536, 33_000, 200_000].into_iter().cycle();
        let reader = Piecewise { read, sizes, handed: Arc::clone(&handed) };
        let options = ClientOptions::new("mem").structured_replies(structured);
        let client = Client::handshake_zero_copy(reader, SharedWriteHalf(socket), payloads, &options).await.unwrap();
        let mut reads = Vec::new();
        for i in 0..6usize {
            let c = client.clone();
            let (at, len) = ((i as u64) * 900_000 + 13, 2 << 20);
            reads.push(tokio::spawn(async move { (at as usize, len as usize, c.read_bytes(at, len).await.unwrap()) }));
        }
        let mut most_pieces = 0;
        for r in reads {
            let (at, len, pieces) = r.await.unwrap();
            most_pieces = most_pieces.max(pieces.len());
            assert!(pieces.concat() == image[at..at + len], "read at {at} (structured: {structured})");
        }
        assert!(most_pieces > 10, "a read came back as the transport's pieces, not joined: {most_pieces}");
        // The data went through the transport's own path; the holes were not sent at all.
        assert!(handed.load(Relaxed) >= 6 * (1 << 20), "handed out: {}", handed.load(Relaxed));
        // A read into a buffer on the same connection still works, and so does a write.
        client.write_bytes(60 << 20, bytes::Bytes::from(pattern(70_000, 3)), CommandFlags::default()).await.unwrap();
        assert_eq!(client.read(60 << 20, 70_000).await.unwrap(), pattern(70_000, 3));
        assert_eq!(client.read_bytes(60 << 20, 0).await.unwrap(), Vec::<bytes::Bytes>::new());
        client.disconnect().await.unwrap();
    }
    // On a plain connection, `read_bytes` is the same bytes.
    assert_eq!(plain.read_bytes(4 << 20, 2 << 20).await.unwrap().concat(), &image[4 << 20..6 << 20]);
}

/// A server that negotiates (structured replies, one export of 1 MiB) and then answers the
/// first request, a read, with `chunks`: (offset, length, done) data chunks of pattern bytes.
async fn scripted_server(chunks: Vec<(u64, u32, bool)>) -> u16 {
    use nbd_server::proto::consts::{handshake_flags, info, opt, rep, reply_flags, STRUCTURED_REPLY_MAGIC};
    use nbd_server::proto::handshake::{encode_greeting, encode_option_reply};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES)).await.unwrap();
        s.read_u32().await.unwrap();
        loop {
            let mut head = [0u8; 16];
            s.read_exact(&mut head).await.unwrap();
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize];
            s.read_exact(&mut data).await.unwrap();
            let mut out = Vec::new();
            if option == opt::GO {
                let mut export = info::EXPORT.to_be_bytes().to_vec();
                export.extend((1u64 << 20).to_be_bytes());
                export.extend(1u16.to_be_bytes());
                encode_option_reply(&mut out, option, rep::INFO, &export);
            }
            encode_option_reply(&mut out, option, rep::ACK, &[]);
            s.write_all(&out).await.unwrap();
            if option == opt::GO {
                break;
            }
        }
        let mut request = [0u8; 28];
        s.read_exact(&mut request).await.unwrap();
        let cookie = u64::from_be_bytes(request[8..16].try_into().unwrap());
        for (offset, length, done) in chunks {
            let mut out = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            out.extend((if done { reply_flags::DONE } else { 0 }).to_be_bytes());
            out.extend(1u16.to_be_bytes()); // OFFSET_DATA
            out.extend(cookie.to_be_bytes());
            out.extend((length + 8).to_be_bytes());
            out.extend(offset.to_be_bytes());
            out.extend(pattern(length as usize, offset));
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_answered_with_overlapping_chunks_is_refused_before_they_pile_up() {
    let options = ClientOptions::new("x").extended_headers(false).block_status(false);
    // Chunks that tile the read: accepted, and in order whatever order they came in.
    let port = scripted_server(vec![(8192, 4096, false), (4096, 4096, true)]).await;
    let c = Client::connect_uri(&format!("nbd://127.0.0.1:{port}/x"), &options).await.unwrap();
    let got = c.read_bytes(4096, 8192).await.unwrap().concat();
    assert_eq!(&got[..4096], &pattern(4096, 4096)[..]);
    assert_eq!(&got[4096..], &pattern(4096, 8192)[..]);
    // The same half twice: as many bytes as were read, but not the read.
    let port = scripted_server(vec![(4096, 4096, false), (4096, 4096, true)]).await;
    let c = Client::connect_uri(&format!("nbd://127.0.0.1:{port}/x"), &options).await.unwrap();
    match c.read_bytes(4096, 8192).await {
        Err(ClientError::Protocol(m)) => assert!(m.contains("overlap"), "{m}"),
        other => panic!("overlapping chunks accepted: {other:?}"),
    }
    // The whole read again and again without DONE: refused at the second chunk, not kept.
    let port = scripted_server(vec![(4096, 8192, false); 64]).await;
    let c = Client::connect_uri(&format!("nbd://127.0.0.1:{port}/x"), &options).await.unwrap();
    assert!(c.read_bytes(4096, 8192).await.is_err());
    assert!(c.read(0, 512).await.is_err(), "the connection is closed after a protocol error");
}
