//! Four NBD connections into one qcow2 export, sixteen request streams writing, zeroing,
//! trimming, flushing and reading back at once, each checked against a byte-array model after
//! every step; then qemu-img judges the image. Once per way the hub may open an image: the page
//! cache or `O_DIRECT`, threads or io_uring, fresh or an overlay, large or tiny clusters.
//!
//! Each stream owns its bytes, so the model stays exact however the requests interleave, but
//! the bytes are dealt so that the streams share everything else (as in the `qcow2` crate's
//! `concurrent_model.rs`): in the first half of the disk each cluster is split in four chunks
//! owned by streams on four different connections, in the second half whole clusters go round
//! the streams (whole-cluster trims and zero clusters beside other connections' writes).

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use nbd_server::Client;

const CONNECTIONS: u64 = 4;
const STREAMS_PER_CONNECTION: u64 = 4;
const STREAMS: u64 = CONNECTIONS * STREAMS_PER_CONNECTION;
const SIZE: u64 = 8 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The bytes one stream owns: chunks of clusters in the first half, whole clusters in the
/// second.
#[derive(Clone, Copy)]
struct Ownership {
    cluster: u64,
}

impl Ownership {
    fn chunk(&self) -> u64 {
        self.cluster / 4
    }

    fn half(&self) -> u64 {
        SIZE / 2
    }

    /// A random piece `stream` owns: (start, end, whether it is a whole cluster).
    fn pick(&self, stream: u64, r: &mut Rng) -> (u64, u64, bool) {
        if r.next() % 2 == 0 {
            let k = r.below(self.half() / self.chunk() / STREAMS) * STREAMS + stream;
            (k * self.chunk(), (k + 1) * self.chunk(), false)
        } else {
            let first = self.half() / self.cluster;
            let c = first + r.below((SIZE / self.cluster - first) / STREAMS) * STREAMS + stream;
            (c * self.cluster, (c + 1) * self.cluster, true)
        }
    }
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// One stream's steps; the first wrong read-back or failed request, if any.
async fn run_stream(
    client: Client,
    model: Arc<Mutex<Vec<u8>>>,
    own: Ownership,
    stream: u64,
    seed: u64,
    ops: usize,
) -> Result<(), String> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let set = |start: u64, len: u64, byte: u8| {
        if let Ok(mut m) = model.lock() {
            m[start as usize..(start + len) as usize].fill(byte);
        }
    };
    for step in 0..ops {
        let (piece, piece_end, whole_cluster) = own.pick(stream, &mut r);
        let start = piece + r.below(piece_end - piece);
        let len = 1 + r.below(piece_end - start);
        let what = match r.below(12) {
            0..=6 => {
                let byte = (r.below(255) + 1) as u8;
                let fua = r.below(8) == 0;
                client.write(start, &vec![byte; len as usize], fua).await.map_err(|e| format!("write: {e}"))?;
                set(start, len, byte);
                "write"
            }
            7 | 8 => {
                let no_hole = r.below(2) == 0;
                client.write_zeroes(start, len, no_hole).await.map_err(|e| format!("write_zeroes: {e}"))?;
                set(start, len, 0);
                "zero"
            }
            9 | 10 => {
                // A trimmed whole cluster reads as zeroes; a part of one keeps its data.
                let (start, len) = if whole_cluster { (piece, own.cluster) } else { (start, len) };
                client.trim(start, len).await.map_err(|e| format!("trim: {e}"))?;
                if whole_cluster {
                    set(start, len, 0);
                }
                "trim"
            }
            _ => {
                client.flush().await.map_err(|e| format!("flush: {e}"))?;
                "flush"
            }
        };
        let got = client.read(piece, (piece_end - piece) as u32).await.map_err(|e| format!("read: {e}"))?;
        let want = model.lock().map_err(|_| "model poisoned")?[piece as usize..piece_end as usize].to_vec();
        if let Some(at) = first_difference(&got, &want) {
            return Err(format!(
                "stream {stream} step {step} ({what} at {start}+{len}): byte {} reads {:#04x}, the model says {:#04x}",
                piece + at as u64,
                got[at],
                want[at]
            ));
        }
    }
    Ok(())
}

struct Variant {
    flags: &'static [&'static str],
    cluster_size: u64,
    backed: bool,
    ops_per_stream: usize,
}

async fn run_variant(v: &Variant, seed: u64) {
    // On the disk the build lives on (some filesystems refuse O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let img = d.join("c.qcow2");
    let cluster_opt = format!("cluster_size={}", v.cluster_size);
    let base = if v.backed {
        let data: Vec<u8> = (0..SIZE).map(|i| (i / 512 % 251) as u8 + 1).collect();
        write_file(d, "base.raw", &data);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", &cluster_opt])
            .arg(&img));
        data
    } else {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &cluster_opt])
            .arg(&img)
            .arg(SIZE.to_string()));
        vec![0u8; SIZE as usize]
    };
    let mut flags = vec!["--shared=8"];
    flags.extend_from_slice(v.flags);
    let peer = start_sendense_as(&img, "qcow2", "c", &flags);
    let what = format!(
        "{:?}, {} byte clusters, {}, seed {seed}",
        v.flags,
        v.cluster_size,
        if v.backed { "overlay" } else { "fresh" }
    );

    let model = Arc::new(Mutex::new(base));
    let own = Ownership { cluster: v.cluster_size };
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Client::connect_tcp(("127.0.0.1", peer.port), "c").await.unwrap());
    }
    let mut streams = Vec::new();
    for stream in 0..STREAMS {
        let client = clients[(stream % CONNECTIONS) as usize].clone();
        streams.push(tokio::spawn(run_stream(
            client,
            Arc::clone(&model),
            own,
            stream,
            seed + stream,
            v.ops_per_stream,
        )));
    }
    let mut failures = Vec::new();
    for s in streams {
        if let Err(e) = s.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{what}: {}", failures.join("; "));

    let model = model.lock().unwrap().clone();
    let mut whole = Vec::new();
    for at in (0..SIZE).step_by(1 << 20) {
        whole.extend(clients[0].read(at, 1 << 20).await.unwrap());
    }
    assert_same_bytes(&whole, &model, &format!("{what}: the whole disk through NBD"));
    for c in &clients {
        c.disconnect().await.unwrap();
    }
    assert!(peer.stop().success(), "{what}: a clean exit");

    let check = run_status(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&img));
    assert_eq!(check.0, 0, "{what}: qemu-img check: {}", check.1);
    let raw = write_file(d, "model.raw", &model);
    let compare =
        run_status(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&img));
    assert_eq!(compare.0, 0, "{what}: qemu-img compare with the model: {}", compare.1);
}

fn run_status(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_streams_on_four_connections_read_back_what_the_model_says_in_every_cache_and_aio_mode() {
    require("qemu-img");
    let variants = [
        Variant { flags: &[], cluster_size: 65536, backed: false, ops_per_stream: 150 },
        Variant { flags: &[], cluster_size: 4096, backed: true, ops_per_stream: 150 },
        Variant { flags: &["--aio=io_uring"], cluster_size: 512, backed: false, ops_per_stream: 150 },
        Variant { flags: &["--cache=none"], cluster_size: 4096, backed: true, ops_per_stream: 60 },
        Variant { flags: &["--cache=none", "--aio=io_uring"], cluster_size: 65536, backed: true, ops_per_stream: 60 },
        Variant { flags: &["--cache=none", "--aio=io_uring"], cluster_size: 4096, backed: false, ops_per_stream: 60 },
    ];
    let rounds: u64 = std::env::var("NBD_STRESS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let first_seed = std::env::var("NBD_STRESS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    for round in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            run_variant(v, first_seed.wrapping_add(round * 1000 + i as u64 * 100)).await;
        }
    }
}
