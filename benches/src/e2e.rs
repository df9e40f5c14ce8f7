//! `e2e` section: a full backup of one disk end to end, the product against the old design, in
//! the same run.
//!
//! - Old design, set up by hand as it ran: `qemu-img create` of a fresh qcow2, `qemu-nbd -f qcow2
//!   --shared=10 -t` on it, OpenSSH `ssh -N -L` through an sshd of our own (default cipher
//!   negotiation), and `nbdcopy --connections=4 --threads=4 --flush` from the disk. Only the
//!   nbdcopy is timed: the set-up is free for it.
//! - The product: `sendense-hub serve` and `sendense-node serve` as two processes, the node's
//!   tunnel to the hub's SSH endpoint (or direct TCP, for the ratio to loopback), timed from
//!   `POST /api/v1/backups` to `completed` (images created, exports opened, the copy, the flush,
//!   the hub's verification of the images and checksums: everything a user waits for).
//!
//! Disks: random data; a realistic disk (60% holes, 10% written zeroes, 30% random, in 1 MiB
//! runs; nbdcopy skips both holes and zeroes too); and an incremental after 1% of the 64 KiB
//! clusters changed, against the old design's only option, a full copy. The random backup is
//! also restored to a new file on the node (the read path: the hub's read-only export through
//! the tunnel or direct TCP), timed from the hub's `POST /api/v1/restores` to the node's job
//! completed, and compared with its source; the old design's restore is nbdcopy from its
//! qemu-nbd through `ssh -L` into a new raw file. CPU is every process
//! taking part (old: qemu-nbd, sshd and its children, ssh, nbdcopy; ours: hub and node), per GB of
//! disk.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::hub::{free_port, free_ports, wait_port, Proc};
use crate::mover::{change_one_percent, children_cpu};
use crate::peers::{cpu_seconds, settle};
use crate::report::Report;
use crate::tunnel::Keys;

/// CPU seconds of `pid` and every live process below it.
fn tree_cpu(pid: u32) -> f64 {
    let mut total = cpu_seconds(pid);
    let Ok(entries) = std::fs::read_dir("/proc") else { return total };
    let mut parent_of = Vec::new();
    for e in entries.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let ppid = stat.rfind(')').and_then(|i| stat.get(i + 2..)?.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(pp) = ppid {
            parent_of.push((p, pp));
        }
    }
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p {
                total += cpu_seconds(child);
                frontier.push(child);
            }
        }
    }
    total
}

/// Fill 1 MiB runs: `kind(i)` says what run `i` is (0 hole, 1 zeroes, 2 random).
fn make_disk(path: &Path, mib: u64, seed: u64, kind: impl Fn(u64) -> u8) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        match kind(i) {
            0 => {}
            1 => f.write_all_at(&vec![0u8; 1 << 20], i << 20)?,
            _ => {
                for c in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all_at(&block, i << 20)?;
            }
        }
    }
    f.sync_all()?;
    Ok(())
}

/// A hub and a node as processes, joined through the hub's SSH endpoint or over direct TCP.
struct Product {
    hub: Proc,
    node: Proc,
    api: String,
    token: String,
    /// The node's own API (the bench calls it directly; the hub goes through the tunnel).
    node_api: String,
    /// Where the node may restore to.
    restore_dir: PathBuf,
    http: reqwest::Client,
}

impl Product {
    /// `node_copy`: lines of the node's `[copy]` table.
    fn start(
        bin: &Path,
        dir: &Path,
        keys: &Keys,
        tunnel: bool,
        disks: &[(&str, &Path)],
        node_copy: &str,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let ports = 4u16;
        let hub_base = free_ports(ports)?;
        let node_base = free_ports(ports)?;
        let (hub_api, node_api, reverse, ssh) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let mut vms = String::new();
        for (name, path) in disks {
            vms += &format!("[[vm]]\nname = \"{name}\"\n[[vm.disk]]\nkey = 2000\nsource = \"{}\"\n", path.display());
        }
        let fingerprint = {
            let out = Command::new("ssh-keygen").arg("-lf").arg(keys.path("host_key.pub")).output()?;
            String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap_or_default().to_string()
        };
        let tunnel_toml = if tunnel {
            format!(
                "[tunnel]\nhub = \"127.0.0.1:{ssh}\"\nuser = \"node\"\nidentity = \"{}\"\nfingerprint = \"{fingerprint}\"\n\
                 forward_range = \"{node_base}-{}:{hub_base}\"\nreverse = \"{reverse}:{node_api}\"\n",
                keys.path("client_key").display(),
                node_base + ports - 1
            )
        } else {
            String::new()
        };
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "listen = \"127.0.0.1:{node_api}\"\nstate_dir = \"{}\"\n{tunnel_toml}[copy]\n{node_copy}\n{vms}",
                dir.join("node-state").display()
            ),
        )?;
        let (node_url, ssh_toml, key) = if tunnel {
            let key = std::fs::read_to_string(keys.path("client_key.pub"))?;
            (
                format!("http://127.0.0.1:{reverse}"),
                format!(
                    "[ssh]\nlisten = \"127.0.0.1:{ssh}\"\nhost_key = \"{}\"\nauthorized_keys = \"{}\"\n",
                    keys.path("host_key").display(),
                    dir.join("no_other_keys").display()
                ),
                format!("key = \"{}\"\n", key.trim()),
            )
        } else {
            (format!("http://127.0.0.1:{node_api}"), String::new(), String::new())
        };
        std::fs::write(dir.join("no_other_keys"), "")?;
        std::fs::write(
            dir.join("hub.toml"),
            format!(
                "listen = \"127.0.0.1:{hub_api}\"\nrepo = \"{}\"\nreplicas = \"{}\"\nnbd_ports = \"{hub_base}-{}\"\n\
                 token_file = \"{}\"\n{ssh_toml}[[node]]\nname = \"n\"\nurl = \"{node_url}\"\n{key}",
                dir.join("repo").display(),
                dir.join("replicas").display(),
                hub_base + ports - 1,
                dir.join("token").display()
            ),
        )?;
        let spawn = |name: &str, config: PathBuf, port: u16| -> anyhow::Result<Proc> {
            let mut c = Command::new(bin.with_file_name(name))
                .args(["serve", "--config"])
                .arg(config)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("{name} (build it with cargo build --release)"))?;
            wait_port(port, &mut c)?;
            Ok(Proc(c))
        };
        let node = spawn("sendense-node", dir.join("node.toml"), node_api)?;
        let hub = spawn("sendense-hub", dir.join("hub.toml"), hub_api)?;
        let token = std::fs::read_to_string(dir.join("token"))?.trim().to_string();
        let p = Self {
            hub,
            node,
            api: format!("http://127.0.0.1:{hub_api}"),
            token,
            node_api: format!("http://127.0.0.1:{node_api}"),
            restore_dir: dir.join("node-state").join("restores"),
            http: reqwest::Client::new(),
        };
        // Until the hub reaches the node (through the reverse forward when tunnelled).
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.call_blocking(reqwest::Method::GET, &format!("/api/v1/backups?vm_name={}", disks[0].0), None).is_err()
            || !Self::node_reachable(&node_url)
        {
            anyhow::ensure!(Instant::now() < deadline, "the hub cannot reach the node at {node_url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }

    fn node_reachable(url: &str) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        rt.is_ok_and(|rt| {
            rt.block_on(async { reqwest::get(format!("{url}/api/v1/vms")).await.is_ok_and(|r| r.status() == 200) })
        })
    }

    fn call_blocking(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call_at(&self.api, method, path, body)
    }

    fn call_at(&self, base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut req = self.http.request(method, format!("{base}{path}")).bearer_auth(&self.token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await?;
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            anyhow::ensure!(status.is_success(), "{path}: {status} {v}");
            Ok(v)
        })
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.hub.0.id()) + cpu_seconds(self.node.0.id())
    }

    /// One backup from POST to completed; (seconds, CPU seconds, final view).
    fn backup(&self, vm: &str, kind: &str) -> anyhow::Result<(f64, f64, Value)> {
        let cpu0 = self.cpu();
        let started = Instant::now();
        let v = self.call_blocking(
            reqwest::Method::POST,
            "/api/v1/backups",
            Some(json!({"vm_name": vm, "backup_type": kind})),
        )?;
        let id = v["backup_id"].as_str().unwrap_or_default().to_string();
        loop {
            let v = self.call_blocking(reqwest::Method::GET, &format!("/api/v1/backups/{id}"), None)?;
            match v["status"].as_str() {
                Some("completed") => return Ok((started.elapsed().as_secs_f64(), self.cpu() - cpu0, v)),
                Some("failed" | "cancelled") => bail!("backup of {vm}: {v}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Backup `id` (one disk, key 2000) restored to a new file on the node, from the hub's
    /// `POST /api/v1/restores` to the node's job completed; (seconds, CPU seconds, the file).
    fn restore(&self, id: &str) -> anyhow::Result<(f64, f64, PathBuf)> {
        let dest = self.restore_dir.join(format!("restored-{id}.raw"));
        let _ = std::fs::remove_file(&dest);
        let cpu0 = self.cpu();
        let started = Instant::now();
        let r = self.call_blocking(reqwest::Method::POST, "/api/v1/restores", Some(json!({"backup_id": id})))?;
        let job = format!("restore-{id}");
        self.call_at(
            &self.node_api,
            reqwest::Method::POST,
            "/api/v1/restore/start",
            Some(json!({"job_id": job, "nbd_targets": r["nbd_targets_string"], "destinations": {"2000": dest}})),
        )?;
        loop {
            let v = self.call_at(&self.node_api, reqwest::Method::GET, &format!("/api/v1/backup/{job}"), None)?;
            match v["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => bail!("restore of {id}: {v}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = self.cpu() - cpu0;
        let restore = r["restore_id"].as_str().unwrap_or_default();
        self.call_blocking(reqwest::Method::DELETE, &format!("/api/v1/restores/{restore}"), None)?;
        Ok((secs, cpu, dest))
    }

    fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.call_blocking(reqwest::Method::DELETE, &format!("/api/v1/backups/{id}"), None).map(|_| ())
    }
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        let (Some(x), Some(y)) = (ba.get(..n), bb.get_mut(..n)) else { return Ok(false) };
        fb.read_exact(y)?;
        if x != y {
            return Ok(false);
        }
    }
}

/// Seconds and CPU seconds of one timed copy.
type Timed = (f64, f64);

/// The old design's copy of `src`: fresh qcow2, qemu-nbd, ssh -L, nbdcopy. (seconds, CPU).
/// With `restore`, the copy is then read back the same way into a new raw file (the old design's
/// restore: nbdcopy from qemu-nbd through `ssh -L`), timed too and compared with the source.
fn old_design(
    dir: &Path,
    keys: &Keys,
    sshd: (u16, u32),
    cipher: Option<&str>,
    src: &Path,
    restore: bool,
) -> anyhow::Result<(Timed, Option<Timed>)> {
    let (sshd_port, sshd_pid) = sshd;
    let img = dir.join("old.qcow2");
    let _ = std::fs::remove_file(&img);
    let size = std::fs::metadata(src)?.len();
    let ok = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg(size.to_string()).status()?;
    anyhow::ensure!(ok.success(), "qemu-img create");
    let nbd_port = free_port()?;
    let mut q = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-x", "vm-disk0", "-p", &nbd_port.to_string(), "-b", "127.0.0.1", "--shared=10", "-t"])
        .arg(&img)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_port(nbd_port, &mut q)?;
    let qemu = Proc(q);
    let local = free_port()?;
    let mut s = Command::new("ssh")
        .args(["-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-p", &sshd_port.to_string()])
        .arg("-i")
        .arg(keys.path("client_key"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", keys.known_hosts_for(sshd_port)?.display()))
        .args(cipher.map(|c| vec!["-c", c]).unwrap_or_default())
        .args(["-L", &format!("127.0.0.1:{local}:127.0.0.1:{nbd_port}"), "root@127.0.0.1"])
        .stdin(Stdio::null())
        .spawn()?;
    wait_port(local, &mut s)?;
    let ssh = Proc(s);
    settle(src);
    let cpu0 = cpu_seconds(qemu.0.id()) + cpu_seconds(ssh.0.id()) + tree_cpu(sshd_pid) + children_cpu();
    let started = Instant::now();
    let ok = Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4", "--flush"])
        .arg(src)
        .arg(format!("nbd://127.0.0.1:{local}/vm-disk0"))
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(ok.success(), "nbdcopy failed");
    let cpu = cpu_seconds(qemu.0.id()) + cpu_seconds(ssh.0.id()) + tree_cpu(sshd_pid) + children_cpu() - cpu0;
    let restored = match restore {
        false => None,
        true => {
            let out = dir.join("old-restored.raw");
            std::fs::File::create(&out)?.set_len(size)?;
            let cpu0 = cpu_seconds(qemu.0.id()) + cpu_seconds(ssh.0.id()) + tree_cpu(sshd_pid) + children_cpu();
            let started = Instant::now();
            let ok = Command::new("nbdcopy")
                .args(["--connections=4", "--threads=4", "--flush"])
                .arg(format!("nbd://127.0.0.1:{local}/vm-disk0"))
                .arg(&out)
                .status()?;
            let secs = started.elapsed().as_secs_f64();
            anyhow::ensure!(ok.success(), "nbdcopy (restore) failed");
            let cpu = cpu_seconds(qemu.0.id()) + cpu_seconds(ssh.0.id()) + tree_cpu(sshd_pid) + children_cpu() - cpu0;
            anyhow::ensure!(same_bytes(src, &out)?, "the old design's restore differs from the source");
            std::fs::remove_file(&out)?;
            Some((secs, cpu))
        }
    };
    drop(ssh);
    drop(qemu);
    let same = Command::new("qemu-img").arg("compare").arg(src).arg(&img).stdout(Stdio::null()).status()?;
    anyhow::ensure!(same.success(), "the old design's copy differs from the source");
    let _ = std::fs::remove_file(&img);
    Ok(((secs, cpu), restored))
}

pub fn e2e_section(bin: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let work = dir.join("e2e");
    std::fs::create_dir_all(&work)?;
    let random = work.join("random.raw");
    let real = work.join("realistic.raw");
    let incr = work.join("incremental.raw");
    make_disk(&random, mib, 0x9e37_79b9, |_| 2)?;
    make_disk(&real, mib, 0x51ed_270b, |i| match i % 10 {
        0..=5 => 0,
        6 => 1,
        _ => 2,
    })?;
    make_disk(&incr, mib, 0x2545_f491, |_| 2)?;
    let keys = Keys::new(&work.join("keys"))?;
    let (sshd, sshd_port) = keys.sshd(
        "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr",
    )?;
    let disks = [("random", random.as_path()), ("realistic", real.as_path()), ("incr", incr.as_path())];
    let tunnelled = Product::start(bin, &work.join("tunnel"), &keys, true, &disks, "")?;
    let direct = Product::start(bin, &work.join("direct"), &keys, false, &disks, "")?;
    let gb = (mib << 20) as f64 / 1e9;
    let record = |report: &mut Report, case: &str, secs: f64, cpu: f64| {
        report.add("e2e", case, "disk MB/s", gb * 1e3 / secs);
        report.add("e2e", case, "CPU s/GB", cpu / gb);
    };
    for rep in 0..reps {
        eprintln!("e2e: rep {}/{reps}", rep + 1);
        for (label, src) in [("random", &random), ("realistic", &real)] {
            let random = label == "random";
            let ((secs, cpu), restored) = old_design(&work, &keys, (sshd_port, sshd.pid()), None, src, random)?;
            record(report, &format!("old design {label}"), secs, cpu);
            if let Some((secs, cpu)) = restored {
                record(report, "old design restore random", secs, cpu);
            }
            if random {
                // The same with OpenSSH told to use the cipher the tunnel picks on this CPU.
                let ((secs, cpu), _) = old_design(
                    &work,
                    &keys,
                    (sshd_port, sshd.pid()),
                    Some(::tunnel::ciphers::first_choice()),
                    src,
                    false,
                )?;
                record(report, "old design random same cipher", secs, cpu);
            }
            for (how, product) in [("tunnel", &tunnelled), ("direct", &direct)] {
                settle(src);
                let (secs, cpu, v) = product.backup(label, "full")?;
                record(report, &format!("sendense {how} {label}"), secs, cpu);
                let id = v["backup_id"].as_str().unwrap_or_default();
                if label == "random" {
                    // The read path: that backup restored to a new file on the node.
                    let (secs, cpu, restored) = product.restore(id)?;
                    anyhow::ensure!(
                        same_bytes(src, &restored)?,
                        "restored {} differs from its source",
                        restored.display()
                    );
                    std::fs::remove_file(&restored)?;
                    record(report, &format!("sendense {how} restore random"), secs, cpu);
                }
                product.delete(id)?;
            }
        }
        // The incremental: a committed full backup, 1% of the clusters rewritten, then the
        // incremental, timed; the old design could only copy everything again.
        settle(&incr);
        let (_, _, full) = tunnelled.backup("incr", "full")?;
        let changed = change_one_percent(&incr, mib, 0x1234 + 2 * rep as u64)?;
        settle(&incr);
        let (secs, cpu, inc) = tunnelled.backup("incr", "incremental")?;
        anyhow::ensure!(inc["backup_type"] == "incremental", "not an incremental: {inc}");
        record(report, "sendense tunnel incr 1%", secs, cpu);
        let sent = inc["disks"][0]["bytes_sent"].as_u64().unwrap_or(0);
        report.add("e2e", "sendense tunnel incr 1%", "sent/changed", sent as f64 / changed as f64);
        let ((secs, cpu), _) = old_design(&work, &keys, (sshd_port, sshd.pid()), None, &incr, false)?;
        record(report, "old design full again", secs, cpu);
        tunnelled.delete(inc["backup_id"].as_str().unwrap_or_default())?;
        tunnelled.delete(full["backup_id"].as_str().unwrap_or_default())?;
    }
    for label in ["random", "realistic"] {
        report.ratio("e2e", &format!("sendense tunnel {label}"), &format!("old design {label}"), "disk MB/s");
        report.ratio("e2e", &format!("sendense tunnel {label}"), &format!("old design {label}"), "CPU s/GB");
        report.ratio("e2e", &format!("sendense tunnel {label}"), &format!("sendense direct {label}"), "disk MB/s");
    }
    report.ratio("e2e", "sendense tunnel restore random", "sendense direct restore random", "disk MB/s");
    report.ratio("e2e", "sendense tunnel restore random", "old design restore random", "disk MB/s");
    report.ratio("e2e", "sendense tunnel restore random", "old design restore random", "CPU s/GB");
    report.ratio("e2e", "sendense tunnel random", "old design random same cipher", "disk MB/s");
    report.ratio("e2e", "sendense tunnel random", "old design random same cipher", "CPU s/GB");
    report.ratio("e2e", "sendense tunnel incr 1%", "old design full again", "disk MB/s");
    report.note(format!(
        "e2e: one {mib} MiB disk, full backup into a fresh qcow2. Old design = qemu-nbd -f qcow2 + OpenSSH ssh -L + \
         nbdcopy --connections=4 --threads=4 --flush (only the nbdcopy timed); sendense = sendense-hub + sendense-node \
         processes, POST /api/v1/backups to completed (image creation, copy, flush and the hub's verification included), \
         through the hub's SSH endpoint (tunnel) or direct TCP. The old design's ssh uses OpenSSH's default cipher \
         (chacha20-poly1305); \"same cipher\" forces the tunnel's first choice on this CPU ({}). realistic = 60% holes, 10% written zeroes, 30% random. \
         restore = the random backup read back to a new raw file on the node (old design: nbdcopy from its qemu-nbd \
         through ssh -L), compared with the source. CPU = every process taking part, per GB of disk. Ratios are medians of same-repetition ratios.",
        ::tunnel::ciphers::first_choice()
    ));
    Ok(())
}

/// `checkpoint` section: what the node's checkpoints cost (a killed node's next start goes on
/// from the last one). The product over direct TCP, a full backup of a random disk, with
/// checkpoints every second (each one reads every running disk's map and flushes the hub's image)
/// against none, alternating in each repetition: throughput and hub + node CPU per GB.
pub fn checkpoint_section(bin: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let work = dir.join("checkpoint");
    std::fs::create_dir_all(&work)?;
    let disk = work.join("random.raw");
    make_disk(&disk, mib, 0x7f4a_7c15, |_| 2)?;
    let keys = Keys::new(&work.join("keys"))?;
    let disks = [("random", disk.as_path())];
    let every = Product::start(bin, &work.join("every"), &keys, false, &disks, "checkpoint_every_s = 1")?;
    let never = Product::start(bin, &work.join("never"), &keys, false, &disks, "checkpoint_every_s = 0")?;
    let gb = (mib << 20) as f64 / 1e9;
    // Not measured: the first backup of each pays for the source's first read and the
    // repository's first allocation.
    for product in [&every, &never] {
        settle(&disk);
        let (_, _, v) = product.backup("random", "full")?;
        product.delete(v["backup_id"].as_str().unwrap_or_default())?;
    }
    for rep in 0..reps {
        eprintln!("checkpoint: rep {}/{reps}", rep + 1);
        let order = if rep % 2 == 0 {
            [("every 1 s", &every), ("none", &never)]
        } else {
            [("none", &never), ("every 1 s", &every)]
        };
        for (case, product) in order {
            settle(&disk);
            let (secs, cpu, v) = product.backup("random", "full")?;
            report.add("checkpoint", &format!("checkpoints {case}"), "disk MB/s", gb * 1e3 / secs);
            report.add("checkpoint", &format!("checkpoints {case}"), "CPU s/GB", cpu / gb);
            product.delete(v["backup_id"].as_str().unwrap_or_default())?;
        }
    }
    report.ratio("checkpoint", "checkpoints every 1 s", "checkpoints none", "disk MB/s");
    report.ratio("checkpoint", "checkpoints every 1 s", "checkpoints none", "CPU s/GB");
    Ok(())
}
