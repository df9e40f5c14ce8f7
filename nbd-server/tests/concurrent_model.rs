//! Four NBD connections into one export, sixteen request streams writing, zeroing, trimming,
//! flushing and reading back at once, each checked against a byte-array model after every step;
//! then qemu-img judges the image. Once per way the hub may open one: qcow2 or raw, the page
//! cache or `O_DIRECT`, threads or io_uring, fresh or an overlay (a filled file), large or tiny
//! clusters. A second test kills the server amid the streams; a third lets the streams race on
//! the same bytes.
//!
//! Each stream owns its bytes, so the model stays exact however the requests interleave, but
//! the bytes are dealt so that the streams share everything else (as in the `qcow2` crate's
//! `concurrent_model.rs`): in the first half of the disk each cluster is split in four chunks
//! owned by streams on four different connections, in the second half whole clusters go round
//! the streams (whole-cluster trims and zero clusters beside other connections' writes).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use common::*;
use nbd_server::Client;

const CONNECTIONS: u64 = 4;
const STREAMS_PER_CONNECTION: u64 = 4;
const STREAMS: u64 = CONNECTIONS * STREAMS_PER_CONNECTION;
const SIZE: u64 = 8 << 20;

/// The bytes one stream owns: chunks of clusters in the first half, whole clusters in the
/// second.
#[derive(Clone, Copy)]
struct Ownership {
    /// The qcow2 cluster size; for a raw file, the unit handed round the streams alike.
    cluster: u64,
    /// A raw export (trims behave differently).
    raw: bool,
}

impl Ownership {
    fn chunk(&self) -> u64 {
        self.cluster / 4
    }

    fn half(&self) -> u64 {
        SIZE / 2
    }

    /// A random piece `stream` owns: (start, end, whether it is a whole cluster).
    fn pick(&self, stream: u64, r: &mut fastrand::Rng) -> (u64, u64, bool) {
        if r.bool() {
            let k = r.u64(..self.half() / self.chunk() / STREAMS) * STREAMS + stream;
            (k * self.chunk(), (k + 1) * self.chunk(), false)
        } else {
            let first = self.half() / self.cluster;
            let c = first + r.u64(..(SIZE / self.cluster - first) / STREAMS) * STREAMS + stream;
            (c * self.cluster, (c + 1) * self.cluster, true)
        }
    }
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// What the streams share: the model, and for a test that kills the server, which piece each
/// stream has a request in flight for (its bytes are unknown after the kill) and how many
/// requests were acknowledged.
struct Shared {
    model: Mutex<Vec<u8>>,
    in_flight: Vec<AtomicU64>,
    acknowledged: AtomicU64,
}

/// No request in flight.
const IDLE: u64 = u64::MAX;

impl Shared {
    fn new(model: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            model: Mutex::new(model),
            in_flight: (0..STREAMS).map(|_| AtomicU64::new(IDLE)).collect(),
            acknowledged: AtomicU64::new(0),
        })
    }

    fn set(&self, start: u64, len: u64, byte: u8) {
        if let Ok(mut m) = self.model.lock() {
            m[start as usize..(start + len) as usize].fill(byte);
        }
    }

    fn model(&self) -> Vec<u8> {
        self.model.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// How a stream ended early.
enum StreamError {
    /// A request failed (expected once the server is killed).
    Request(String),
    /// A read-back differs from the model: never expected.
    Mismatch(String),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Request(e) => write!(f, "request failed: {e}"),
            Self::Mismatch(e) => write!(f, "read-back differs: {e}"),
        }
    }
}

/// One stream's steps; the first wrong read-back or failed request, if any.
async fn run_stream(
    client: Client,
    shared: Arc<Shared>,
    own: Ownership,
    stream: u64,
    seed: u64,
    ops: usize,
) -> Result<(), StreamError> {
    let mut r = fastrand::Rng::with_seed(seed);
    let failed = |what: &str, e: nbd_server::ClientError| StreamError::Request(format!("stream {stream}: {what}: {e}"));
    let set = |start: u64, len: u64, byte: u8| shared.set(start, len, byte);
    let slot = &shared.in_flight[stream as usize];
    for step in 0..ops {
        let (piece, piece_end, whole_cluster) = own.pick(stream, &mut r);
        slot.store(piece, Ordering::SeqCst);
        let start = piece + r.u64(..piece_end - piece);
        let len = 1 + r.u64(..piece_end - start);
        let what = match r.u64(..12) {
            0..=6 => {
                let byte = (r.u64(..255) + 1) as u8;
                let fua = r.u64(..8) == 0;
                client.write(start, &vec![byte; len as usize], fua).await.map_err(|e| failed("write", e))?;
                set(start, len, byte);
                "write"
            }
            7 | 8 => {
                let no_hole = r.u64(..2) == 0;
                client.write_zeroes(start, len, no_hole).await.map_err(|e| failed("write_zeroes", e))?;
                set(start, len, 0);
                "zero"
            }
            9 | 10 if own.raw => {
                // A raw file punches a hole where the filesystem can: each byte reads as it was
                // or as zero, nothing else; the model takes what it reads.
                client.trim(start, len).await.map_err(|e| failed("trim", e))?;
                let got = client.read(start, len as u32).await.map_err(|e| failed("read", e))?;
                let mut model = shared.model.lock().map_err(|_| StreamError::Mismatch("model poisoned".into()))?;
                let old = &mut model[start as usize..(start + len) as usize];
                if let Some(at) = got.iter().zip(old.iter()).position(|(g, o)| *g != *o && *g != 0) {
                    return Err(StreamError::Mismatch(format!(
                        "stream {stream} step {step} (trim at {start}+{len}): byte {} reads {:#04x}, neither what it was ({:#04x}) nor zero",
                        start + at as u64,
                        got[at],
                        old[at]
                    )));
                }
                old.copy_from_slice(&got);
                "trim"
            }
            9 | 10 => {
                // A trimmed whole qcow2 cluster reads as zeroes; a part of one keeps its data.
                let (start, len) = if whole_cluster { (piece, own.cluster) } else { (start, len) };
                client.trim(start, len).await.map_err(|e| failed("trim", e))?;
                if whole_cluster {
                    set(start, len, 0);
                }
                "trim"
            }
            _ => {
                client.flush().await.map_err(|e| failed("flush", e))?;
                "flush"
            }
        };
        slot.store(IDLE, Ordering::SeqCst);
        shared.acknowledged.fetch_add(1, Ordering::SeqCst);
        let got = client.read(piece, (piece_end - piece) as u32).await.map_err(|e| failed("read", e))?;
        let want = shared.model.lock().map_err(|_| StreamError::Mismatch("model poisoned".into()))?
            [piece as usize..piece_end as usize]
            .to_vec();
        if let Some(at) = first_difference(&got, &want) {
            return Err(StreamError::Mismatch(format!(
                "stream {stream} step {step} ({what} at {start}+{len}): byte {} reads {:#04x}, the model says {:#04x}",
                piece + at as u64,
                got[at],
                want[at]
            )));
        }
    }
    Ok(())
}

struct Variant {
    /// A raw file instead of a qcow2 image (`backed`: one filled with a pattern first).
    raw: bool,
    flags: &'static [&'static str],
    cluster_size: u64,
    backed: bool,
    ops_per_stream: usize,
}

impl Variant {
    fn describe(&self, seed: u64) -> String {
        let kind = match (self.raw, self.backed) {
            (true, true) => "raw, filled",
            (true, false) => "raw, sparse",
            (false, true) => "qcow2 overlay",
            (false, false) => "fresh qcow2",
        };
        format!("{kind}, {:?}, {} byte clusters, seed {seed}", self.flags, self.cluster_size)
    }
}

/// A fresh image of `size` bytes (or an overlay on a raw base of `base(i)` at byte `i`) as the
/// variant says, or a raw file (sparse, or filled with the same bytes), and the bytes it reads as.
fn create_image(d: &Path, v: &Variant, size: u64, base: fn(u64) -> u8) -> (PathBuf, Vec<u8>) {
    let filled = || (0..size).map(base).collect::<Vec<u8>>();
    if v.raw {
        if v.backed {
            let data = filled();
            return (write_file(d, "c.raw", &data), data);
        }
        return (sparse_file(d, "c.raw", size), vec![0u8; size as usize]);
    }
    let img = d.join("c.qcow2");
    let cluster_opt = format!("cluster_size={}", v.cluster_size);
    if v.backed {
        let data = filled();
        write_file(d, "base.raw", &data);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", &cluster_opt])
            .arg(&img));
        (img, data)
    } else {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &cluster_opt])
            .arg(&img)
            .arg(size.to_string()));
        (img, vec![0u8; size as usize])
    }
}

/// Base bytes numbered by 512-byte sector, never zero.
fn numbered(i: u64) -> u8 {
    (i / 512 % 251) as u8 + 1
}

fn start(img: &Path, v: &Variant) -> Peer {
    let mut flags = vec!["--shared=8"];
    flags.extend_from_slice(v.flags);
    start_sendense_as(img, if v.raw { "raw" } else { "qcow2" }, "c", &flags)
}

/// Connect, and start the sixteen streams.
async fn start_streams(
    peer: &Peer,
    shared: &Arc<Shared>,
    v: &Variant,
    seed: u64,
) -> (Vec<Client>, Vec<JoinHandle<Result<(), StreamError>>>) {
    let own = Ownership { cluster: v.cluster_size, raw: v.raw };
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Client::connect_tcp(("127.0.0.1", peer.port), "c").await.unwrap());
    }
    let streams = (0..STREAMS)
        .map(|stream| {
            let client = clients[(stream % CONNECTIONS) as usize].clone();
            tokio::spawn(run_stream(client, Arc::clone(shared), own, stream, seed + stream, v.ops_per_stream))
        })
        .collect();
    (clients, streams)
}

/// qemu-img check's exit code and output.
fn qemu_img_check(img: &Path) -> (i32, String) {
    run_status(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img))
}

/// The clusters `qemu-img check` reports leaked (lost space, no harm to data).
fn leaked_clusters(check_output: &str) -> u64 {
    check_output
        .lines()
        .find_map(|l| l.strip_suffix(" leaked clusters were found on the image.").and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

/// qemu-img judges the closed image: no errors, at most `leaks` leaked clusters (those a
/// crash left: qemu does not reclaim them on open either; `qemu-img check -r leaks` does),
/// every byte as the model says.
fn judge(d: &Path, img: &Path, model: &[u8], leaks: u64, what: &str) {
    if img.extension().is_some_and(|e| e == "raw") {
        assert_same_bytes(&std::fs::read(img).unwrap(), model, &format!("{what}: the file after a clean exit"));
        return;
    }
    let (code, text) = qemu_img_check(img);
    assert!(
        code == 0 || (code == 3 && leaked_clusters(&text) <= leaks),
        "{what}: qemu-img check (exit {code}, {leaks} leaks allowed): {text}"
    );
    let raw = write_file(d, "model.raw", model);
    let compare = run_status(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(img));
    assert_eq!(compare.0, 0, "{what}: qemu-img compare with the model: {}", compare.1);
}

async fn run_variant(v: &Variant, seed: u64) {
    // On the disk the build lives on (some filesystems refuse O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (img, base) = create_image(d, v, SIZE, numbered);
    let peer = start(&img, v);
    let what = v.describe(seed);
    let shared = Shared::new(base);
    let (clients, streams) = start_streams(&peer, &shared, v, seed).await;
    let mut failures = Vec::new();
    for s in streams {
        if let Err(e) = s.await.unwrap() {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{what}: {}", failures.join("; "));

    let model = shared.model();
    let mut whole = Vec::new();
    for at in (0..SIZE).step_by(1 << 20) {
        whole.extend(clients[0].read(at, 1 << 20).await.unwrap());
    }
    assert_same_bytes(&whole, &model, &format!("{what}: the whole disk through NBD"));
    for c in &clients {
        c.disconnect().await.unwrap();
    }
    assert!(peer.stop().success(), "{what}: a clean exit");
    judge(d, &img, &model, 0, &what);
}

/// The streams run until some requests were acknowledged, then the server gets SIGKILL. Every
/// acknowledged change must be in the image (the kernel keeps what was written; a kill loses
/// only what the server held back), the pieces with a request in flight may hold either state,
/// the image may leak clusters but never be corrupt; a new server opens it (repairing the
/// refcounts a crash may leave behind), takes another round of streams and closes it clean.
async fn kill_and_resume(v: &Variant, seed: u64, kill_after: u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (img, base) = create_image(d, v, SIZE, numbered);
    let what = format!("{}, killed after {kill_after} acknowledged requests", v.describe(seed));
    let mut peer = start(&img, v);
    let shared = Shared::new(base);
    let (_clients, streams) = start_streams(&peer, &shared, v, seed).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while shared.acknowledged.load(Ordering::SeqCst) < kill_after {
        assert!(std::time::Instant::now() < deadline, "{what}: the streams never got that far");
        assert!(!streams.iter().all(|s| s.is_finished()), "{what}: the streams finished before the kill");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    // Replies that left before the kill may still be on their way to the streams: the model is
    // complete only once every stream has ended (each of its requests acknowledged and entered
    // in the model, or failed with its piece still marked in flight).
    for s in streams {
        if let Err(StreamError::Mismatch(e)) = s.await.unwrap() {
            panic!("{what}: before the kill: {e}");
        }
    }
    let model = shared.model();
    let unknown: Vec<u64> = shared.in_flight.iter().map(|p| p.load(Ordering::SeqCst)).filter(|&p| p != IDLE).collect();
    let (code, text) = qemu_img_check(&img);
    assert!(code == 0 || code == 3, "{what}: qemu-img check exit {code} after the kill (2 = corruption): {text}");
    let leaks = leaked_clusters(&text);
    let raw = d.join("now.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&raw));
    let mut now = std::fs::read(&raw).unwrap();
    // A piece with a request in flight may hold either state: take the image's word for it.
    let mut resumed_model = model.clone();
    for piece in unknown {
        let end = piece + if piece < SIZE / 2 { v.cluster_size / 4 } else { v.cluster_size };
        let range = piece as usize..end as usize;
        resumed_model[range.clone()].copy_from_slice(&now[range.clone()]);
        now[range.clone()].copy_from_slice(&model[range]);
    }
    assert_same_bytes(&now, &model, &format!("{what}: every acknowledged change after the kill"));

    let peer = start(&img, v);
    let shared = Shared::new(resumed_model);
    let (clients, streams) = start_streams(&peer, &shared, v, seed ^ 0x5eed).await;
    for s in streams {
        if let Err(e) = s.await.unwrap() {
            panic!("{what}: after the restart: {e}");
        }
    }
    for c in &clients {
        c.disconnect().await.unwrap();
    }
    assert!(peer.stop().success(), "{what}: a clean exit after the restart");
    judge(d, &img, &shared.model(), leaks, &format!("{what}, then resumed"));
}

fn run_status(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// `NBD_STRESS_ROUNDS=N` repeats every variant N times with new seeds (a soak; the suite runs one
/// round); a failure names its seed, and `NBD_STRESS_SEED` starts from it (the interleaving will
/// differ).
fn rounds_and_seed() -> (u64, u64) {
    let rounds = std::env::var("NBD_STRESS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let seed = std::env::var("NBD_STRESS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    (rounds, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_streams_on_four_connections_read_back_what_the_model_says_in_every_cache_and_aio_mode() {
    require("qemu-img");
    let variants = [
        Variant { raw: false, flags: &[], cluster_size: 65536, backed: false, ops_per_stream: 150 },
        Variant { raw: false, flags: &[], cluster_size: 4096, backed: true, ops_per_stream: 150 },
        // Writes of up to 256 KiB: from 128 KiB on they travel in pipes (`piped.rs`).
        Variant { raw: false, flags: &[], cluster_size: 262144, backed: false, ops_per_stream: 60 },
        Variant { raw: false, flags: &["--aio=io_uring"], cluster_size: 512, backed: false, ops_per_stream: 150 },
        Variant { raw: false, flags: &["--cache=none"], cluster_size: 4096, backed: true, ops_per_stream: 60 },
        Variant {
            raw: false,
            flags: &["--cache=none", "--aio=io_uring"],
            cluster_size: 65536,
            backed: true,
            ops_per_stream: 60,
        },
        Variant {
            raw: false,
            flags: &["--cache=none", "--aio=io_uring"],
            cluster_size: 4096,
            backed: false,
            ops_per_stream: 60,
        },
        Variant { raw: true, flags: &[], cluster_size: 65536, backed: true, ops_per_stream: 150 },
        Variant { raw: true, flags: &["--aio=io_uring"], cluster_size: 4096, backed: false, ops_per_stream: 150 },
        Variant { raw: true, flags: &[], cluster_size: 262144, backed: true, ops_per_stream: 60 },
        Variant { raw: true, flags: &["--cache=none"], cluster_size: 65536, backed: false, ops_per_stream: 60 },
        Variant {
            raw: true,
            flags: &["--cache=none", "--aio=io_uring"],
            cluster_size: 16384,
            backed: true,
            ops_per_stream: 60,
        },
    ];
    let (rounds, first_seed) = rounds_and_seed();
    for round in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            run_variant(v, first_seed.wrapping_add(round * 1000 + i as u64 * 100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_amid_sixteen_streams_keeps_every_acknowledged_change_and_takes_more_after_a_restart() {
    require("qemu-img");
    let variants = [
        Variant { raw: false, flags: &[], cluster_size: 65536, backed: true, ops_per_stream: 200 },
        Variant { raw: false, flags: &["--aio=io_uring"], cluster_size: 4096, backed: false, ops_per_stream: 200 },
        Variant { raw: false, flags: &[], cluster_size: 262144, backed: false, ops_per_stream: 100 },
        Variant {
            raw: false,
            flags: &["--cache=none", "--aio=io_uring"],
            cluster_size: 65536,
            backed: false,
            ops_per_stream: 100,
        },
    ];
    let (rounds, first_seed) = rounds_and_seed();
    for round in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            let seed = first_seed.wrapping_add(round * 1000 + i as u64 * 100);
            kill_and_resume(v, seed, 50 + seed % 500).await;
        }
    }
}

/// Sixteen streams writing, zeroing, trimming and flushing the same few clusters at once, ranges
/// overlapping at random (the `qcow2` crate's `concurrent_model.rs` has the same test without
/// NBD): every byte reads as a value some request could have left, and the image, after a clean
/// exit, is exactly what NBD read before it, with no leak and no corruption.
async fn overlapping(v: &Variant, seed: u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let size = 32 * v.cluster_size;
    // Backing bytes above every value a stream writes, so the two cannot be confused.
    let (img, base) = create_image(d, v, size, |i| 200 + (i / 512 % 50) as u8);
    let what = format!("overlapping, {}", v.describe(seed));
    let peer = start(&img, v);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Client::connect_tcp(("127.0.0.1", peer.port), "c").await.unwrap());
    }
    let cluster = v.cluster_size;
    let ops = v.ops_per_stream as u64;
    let streams: Vec<_> = (0..STREAMS)
        .map(|s| {
            let c = clients[(s % CONNECTIONS) as usize].clone();
            tokio::spawn(async move {
                let mut r = fastrand::Rng::with_seed(seed + s);
                for step in 0..ops {
                    let start = r.u64(..size);
                    let len = 1 + r.u64(..(3 * cluster).min(size - start));
                    // Stream s writes values 1 + 10s ..= 10 + 10s: below the backing bytes.
                    let result = match r.u64(..10) {
                        0..=5 => {
                            c.write(start, &vec![(1 + 10 * s + step % 10) as u8; len as usize], r.u64(..8) == 0).await
                        }
                        6 | 7 => c.write_zeroes(start, len, r.bool()).await,
                        8 => c.trim(start, len).await,
                        _ => c.flush().await,
                    };
                    result.map_err(|e| format!("stream {s} step {step} at {start}+{len}: {e}"))?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let mut failures = Vec::new();
    for s in streams {
        if let Err(e) = s.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{what}: {}", failures.join("; "));
    let before = clients[0].read(0, size as u32).await.unwrap();
    let written = 1..=(10 * STREAMS) as u8;
    if let Some(at) = before.iter().enumerate().position(|(i, &b)| b != 0 && b != base[i] && !written.contains(&b)) {
        panic!("{what}: byte {at} reads {:#04x}, which no request could have left there", before[at]);
    }
    for c in &clients {
        c.disconnect().await.unwrap();
    }
    assert!(peer.stop().success(), "{what}: a clean exit");
    judge(d, &img, &before, 0, &what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_streams_racing_on_the_same_clusters_leave_a_consistent_image_in_every_cache_and_aio_mode() {
    require("qemu-img");
    let variants = [
        Variant { raw: false, flags: &[], cluster_size: 4096, backed: false, ops_per_stream: 100 },
        Variant { raw: false, flags: &[], cluster_size: 65536, backed: true, ops_per_stream: 100 },
        Variant { raw: false, flags: &[], cluster_size: 262144, backed: true, ops_per_stream: 60 },
        Variant { raw: false, flags: &["--aio=io_uring"], cluster_size: 4096, backed: true, ops_per_stream: 100 },
        Variant {
            raw: false,
            flags: &["--cache=none", "--aio=io_uring"],
            cluster_size: 65536,
            backed: false,
            ops_per_stream: 50,
        },
        Variant { raw: false, flags: &["--cache=none"], cluster_size: 4096, backed: true, ops_per_stream: 50 },
    ];
    let (rounds, first_seed) = rounds_and_seed();
    for round in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            overlapping(v, first_seed.wrapping_add(round * 1000 + i as u64 * 100)).await;
        }
    }
}
