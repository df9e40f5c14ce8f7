//! Large writes from TCP clients travel from the socket to the file in pipes (`splice`): every
//! byte lands where the request says, whatever the client's segmentation, and a payload a client
//! abandons never reaches another request.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_same_bytes, pattern, require, run, sparse_file};
use nbd_server::proto::consts::{cmd, opt, rep, IHAVEOPT, REQUEST_MAGIC};
use nbd_server::proto::handshake::{encode_info_request, OptionReplyHeader, GREETING_LEN};
use nbd_server::proto::transmission::{decode_reply_header, ReplyHeader};
use nbd_server::{
    backend::BackendResult, Backend, Capabilities, Client, ExportConfig, FileBackend, MemoryBackend, Qcow2Backend,
    Server, ServerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 16 << 20;

async fn serve(backend: Arc<dyn Backend>) -> (Server, u16) {
    let server = Server::new(ServerConfig::default());
    // Room for a client that just left while its slot is given back (the default is one).
    server.add_export(ExportConfig::new("e", backend).max_connections(4)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, port)
}

/// Handshake with GO, simple replies; the socket is left in transmission.
async fn transmitting(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let info = encode_info_request("e", &[]);
    let mut option = Vec::new();
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&opt::GO.to_be_bytes());
    option.extend_from_slice(&(info.len() as u32).to_be_bytes());
    option.extend_from_slice(&info);
    s.write_all(&option).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut d = vec![0u8; h.length as usize];
        s.read_exact(&mut d).await.unwrap();
        if h.reply == rep::ACK {
            return s;
        }
        assert_eq!(h.reply, rep::INFO);
    }
}

fn write_header(cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&cmd::WRITE.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

async fn reply_error(s: &mut TcpStream, cookie: u64) -> u32 {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    match decode_reply_header(&h).unwrap().unwrap().0 {
        ReplyHeader::Simple { cookie: c, error } => {
            assert_eq!(c, cookie);
            error
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

/// Send one WRITE whose payload leaves in `segment`-byte sends with a pause between some of
/// them, so the server finds it in the socket as many small segments (each takes a pipe slot:
/// 300 of 1 KiB fill a pipe's 256 slots long before its 1 MiB).
async fn write_in_segments(s: &mut TcpStream, cookie: u64, offset: u64, payload: &[u8], segment: usize) {
    s.write_all(&write_header(cookie, offset, payload.len() as u32)).await.unwrap();
    for (i, part) in payload.chunks(segment).enumerate() {
        s.write_all(part).await.unwrap();
        if i % 8 == 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    assert_eq!(reply_error(s, cookie).await, 0, "write at {offset:#x} failed");
}

async fn read_all(port: u16) -> Vec<u8> {
    let c = Client::connect_tcp(("127.0.0.1", port), "e").await.unwrap();
    let mut all = Vec::new();
    for at in (0..SIZE).step_by(1 << 20) {
        all.extend(c.read(at, 1 << 20).await.unwrap());
    }
    c.disconnect().await.unwrap();
    all
}

fn create_qcow2(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("t.qcow2");
    run(Command::new(require("qemu-img")).args(["create", "-q", "-f", "qcow2"]).arg(&img).arg(SIZE.to_string()));
    img
}

/// Writes in tiny segments (several pipes each), in bulk (one pipe), unaligned and across
/// clusters, then a read-back and, for qcow2, qemu-img's verdict on the file.
async fn writes_land_whole(backend: Arc<dyn Backend>) -> Vec<u8> {
    assert!(backend.capabilities().piped_writes, "the backend takes piped writes");
    let (server, port) = serve(backend).await;
    let mut model = vec![0u8; SIZE as usize];
    let mut s = transmitting(port).await;
    let writes: [(u64, usize, usize); 5] = [
        (0, 300 * 1024, 1024),
        ((1 << 20) + 12_345, 700 * 1024 + 3, 512),
        (5 << 20, 3 << 20, 64 * 1024),
        ((9 << 20) + 4096, 2 << 20, 1 << 20),
        ((12 << 20) - 1, 256 * 1024, 4096),
    ];
    for (i, &(offset, len, segment)) in writes.iter().enumerate() {
        let data = pattern(len, i as u64 + 1);
        write_in_segments(&mut s, i as u64, offset, &data, segment).await;
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    drop(s);
    assert_same_bytes(&read_all(port).await, &model, "after piped writes");
    server.shutdown().await.unwrap();
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_many_small_segments_land_whole_in_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "w.raw", SIZE);
    let backend = FileBackend::open(&path, false).unwrap();
    let model = writes_land_whole(Arc::new(backend)).await;
    assert_same_bytes(&std::fs::read(&path).unwrap(), &model, "the file itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_many_small_segments_land_whole_in_a_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2(dir.path());
    let backend = Qcow2Backend::open(&img, false).unwrap();
    let model = writes_land_whole(Arc::new(backend)).await;
    let raw = dir.path().join("out.raw");
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&img));
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&raw));
    assert_same_bytes(&std::fs::read(&raw).unwrap(), &model, "the image, converted by qemu-img");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_its_client_abandons_never_reaches_another_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "w.raw", SIZE);
    let (server, port) = serve(Arc::new(FileBackend::open(&path, false).unwrap())).await;
    let mut model = vec![0u8; SIZE as usize];
    for round in 0..40u64 {
        // Half a 512 KiB payload (0xee bytes), then the client is gone.
        let mut quitter = transmitting(port).await;
        quitter.write_all(&write_header(1, 0, 512 * 1024)).await.unwrap();
        quitter.write_all(&vec![0xee; 256 * 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(quitter);
        // Another client's write takes the pipes next.
        let mut s = transmitting(port).await;
        let offset = (1 << 20) + round * 300 * 1024;
        let data = pattern(300 * 1024, round + 100);
        write_in_segments(&mut s, 7, offset, &data, 32 * 1024).await;
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    assert_same_bytes(&read_all(port).await, &model, "no abandoned byte anywhere");
    server.shutdown().await.unwrap();
}

/// A backend that asks for piped writes but implements only `write`: the trait's default
/// `write_piped` copies the payload out.
struct PipesThroughDefault(MemoryBackend);

#[nbd_server::async_trait]
impl Backend for PipesThroughDefault {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities().piped_writes(true)
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.0.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        self.0.write(offset, data, fua).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.0.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_its_own_write_piped_gets_the_bytes_through_write() {
    writes_land_whole(Arc::new(PipesThroughDefault(MemoryBackend::new(SIZE)))).await;
}
