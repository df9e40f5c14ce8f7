//! Free TCP ports on 127.0.0.1 for the workspace's tests.
//!
//! Tests start real servers (our hub and node as processes, sshd, qemu-nbd) on ports they pick
//! first and hand over on a command line, so a port is free when picked and bound a moment later.
//! Asking the kernel for port 0 is not safe for that: the port comes from the ephemeral range,
//! where, with tests running in parallel, the same number is handed to another test's pick or
//! becomes the source port of some outgoing connection before the server binds it. (A block of
//! 101 forwarded ports picked that way collided with the node's own API port on a loaded CI run.)
//!
//! So ports come from below the kernel's ephemeral range (read from
//! `/proc/sys/net/ipv4/ip_local_port_range`), where the kernel never picks on its own, handed out
//! from one process-wide cursor so no two picks in a test binary overlap, starting at a random
//! offset so that test processes run one after another (or side by side) rarely meet; every
//! port is still checked by binding it (without listening) before it is given out.

use std::sync::Mutex;

/// The lowest port handed out; below it live well-known services.
const FLOOR: u16 = 10_000;

/// Where the next pick starts; `None` until first use.
static CURSOR: Mutex<Option<u16>> = Mutex::new(None);

/// The ports picks come from: `[FLOOR, start of the ephemeral range)`, or above the ephemeral
/// range when that leaves too few.
fn pool() -> (u16, u16) {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    if low.saturating_sub(FLOOR) >= 4_000 {
        (FLOOR, low)
    } else {
        (high.saturating_add(1).max(FLOOR), u16::MAX)
    }
}

/// A number that differs from process to process (std's per-process random hash keys), so that
/// test binaries run one after another start their picks far apart.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Whether nothing listens on 127.0.0.1:`port`: a bind with `SO_REUSEADDR`, as servers bind,
/// that never listens. A check that listened (std's `TcpListener::bind`) would hold the port
/// against the server the port is for while it lasts, and for longer when another thread of the
/// test process forks meanwhile (to run `qemu-img`, say): the child holds a copy of the socket
/// until it execs. A listener bound but not listening blocks no one.
fn bindable(port: u16) -> bool {
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|socket| {
            socket.set_reuse_address(true)?;
            socket.bind(&at.into())
        })
        .is_ok()
}

/// `n` consecutive ports, each free when checked and given to no other pick in this process;
/// returns the first.
///
/// # Panics
/// When the pool holds no such block (it never does in practice: the pool is tens of thousands
/// of ports wide).
pub fn free_ports(n: u16) -> u16 {
    pick(&mut CURSOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner()), n)
}

/// One free port, as [`free_ports`] picks them.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive bindable ports at or after `cursor`, moving it past them.
fn pick(cursor: &mut Option<u16>, n: u16) -> u16 {
    let (start, end) = pool();
    let width = end - start;
    assert!(n > 0 && n < width, "cannot pick {n} ports from {start}..{end}");
    let mut base = cursor.unwrap_or_else(|| start + (random() % u64::from(width)) as u16);
    let mut tried = 0u32;
    while tried < u32::from(width) {
        if base.checked_add(n).is_none_or(|past| past > end) {
            base = start;
        }
        match (0..n).find(|i| !bindable(base + i)) {
            None => {
                *cursor = Some(base + n);
                return base;
            }
            Some(busy) => {
                tried += u32::from(busy) + 1;
                base += busy + 1;
            }
        }
    }
    panic!("no block of {n} free ports in {start}..{end}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn picks_never_overlap_and_stay_out_of_the_ephemeral_range() {
        let (start, end) = pool();
        let mut seen = std::collections::HashSet::new();
        for n in [1u16, 101, 3, 1, 50] {
            let base = free_ports(n);
            assert!(base >= start && base + n <= end, "{base}+{n} outside {start}..{end}");
            for p in base..base + n {
                assert!(seen.insert(p), "port {p} handed out twice");
                assert!(bindable(p), "port {p} is not free");
            }
        }
    }

    #[test]
    fn a_busy_port_is_skipped() {
        // A block of three of this process's picks, so the other test (running beside this one
        // and picking from the shared cursor) never probes these ports while this one does.
        let block = free_ports(3);
        let busy = block + 1;
        let _taken = TcpListener::bind(("127.0.0.1", busy)).unwrap();
        // A cursor standing on the busy port must step over it.
        let p = pick(&mut Some(busy), 1);
        assert!(p > busy, "{p} is not past the busy {busy}");
        assert!(bindable(p));
    }
}
