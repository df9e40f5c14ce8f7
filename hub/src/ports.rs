//! The NBD port allocator: a lease table over a range, pure and thread-safe.
//!
//! A lease belongs to a job and is given back on every exit path (the job layer holds a
//! [`Lease`] guard whose drop releases, so a panicking task or an early return cannot leak a
//! port). Ports another process holds are skipped, not failed on: the caller
//! passes the probe. Exhaustion names the range and how many leases are held.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// No free port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free NBD port in {first}-{last}: {held} leased by running jobs, {busy} taken by other processes, {wanted} wanted")]
pub struct Exhausted {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range.
    pub last: u16,
    /// Ports leased.
    pub held: usize,
    /// Ports skipped because something else listens there.
    pub busy: usize,
    /// Ports asked for.
    pub wanted: usize,
}

/// The lease table.
#[derive(Debug)]
pub struct Ports {
    first: u16,
    last: u16,
    leases: Mutex<BTreeMap<u16, String>>,
}

/// Ports held for a job; released when dropped.
#[derive(Debug)]
pub struct Lease {
    table: Arc<Ports>,
    job: String,
    /// The ports, in the order asked for.
    pub ports: Vec<u16>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.table.release_ports(&self.job, &self.ports);
    }
}

impl Ports {
    /// A table over `first..=last`.
    pub fn new(first: u16, last: u16) -> Arc<Self> {
        Arc::new(Self { first, last, leases: Mutex::new(BTreeMap::new()) })
    }

    /// `A-B` as given.
    pub fn range_text(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }

    /// Lease `n` ports for `job`, skipping ports `is_free` says are taken elsewhere. All or none.
    ///
    /// # Errors
    /// Not enough free ports.
    pub fn lease(self: &Arc<Self>, job: &str, n: usize, is_free: impl Fn(u16) -> bool) -> Result<Lease, Exhausted> {
        let mut leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut got = Vec::with_capacity(n);
        let mut busy = 0;
        for port in self.first..=self.last {
            if got.len() == n {
                break;
            }
            if leases.contains_key(&port) {
                continue;
            }
            if is_free(port) {
                got.push(port);
            } else {
                busy += 1;
            }
        }
        if got.len() < n {
            return Err(Exhausted { first: self.first, last: self.last, held: leases.len(), busy, wanted: n });
        }
        for p in &got {
            leases.insert(*p, job.to_string());
        }
        Ok(Lease { table: Arc::clone(self), job: job.to_string(), ports: got })
    }

    /// Lease exactly `ports` for `job` (a job taken up again after a restart keeps the ports its
    /// node copies to). All or none.
    ///
    /// # Errors
    /// A port outside the range, leased already, or taken elsewhere (`is_free`), named.
    pub fn lease_exact(
        self: &Arc<Self>,
        job: &str,
        ports: &[u16],
        is_free: impl Fn(u16) -> bool,
    ) -> Result<Lease, String> {
        let mut leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, &port) in ports.iter().enumerate() {
            if !(self.first..=self.last).contains(&port) {
                return Err(format!("port {port} is outside the NBD range {}-{}", self.first, self.last));
            }
            if ports[..i].contains(&port) {
                return Err(format!("port {port} is asked for twice"));
            }
            if let Some(other) = leases.get(&port) {
                return Err(format!("port {port} is leased to job {other}"));
            }
            if !is_free(port) {
                return Err(format!("port {port} is taken by another process"));
            }
        }
        for p in ports {
            leases.insert(*p, job.to_string());
        }
        Ok(Lease { table: Arc::clone(self), job: job.to_string(), ports: ports.to_vec() })
    }

    fn release_ports(&self, job: &str, ports: &[u16]) {
        let mut leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in ports {
            if leases.get(p).is_some_and(|j| j == job) {
                leases.remove(p);
            }
        }
    }

    /// `(port, job)` for every lease.
    pub fn leased(&self) -> Vec<(u16, String)> {
        let leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        leases.iter().map(|(p, j)| (*p, j.clone())).collect()
    }

    /// Ports not leased.
    pub fn free(&self) -> usize {
        let total = usize::from(self.last - self.first) + 1;
        total - self.leased().len()
    }

    /// Whether `port` is leased to `job`.
    pub fn is_leased_to(&self, port: u16, job: &str) -> bool {
        let leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        leases.get(&port).is_some_and(|j| j == job)
    }
}

/// Whether nothing listens on `addr:port` right now (we can bind it): a bind with
/// `SO_REUSEADDR`, as the export's listener binds, that never listens. A check that listened
/// (std's `TcpListener::bind`) would hold the port against the export while it lasts, and for
/// longer when a thread of the process forks meanwhile (the child holds a copy of the socket
/// until it execs): the export would then fail on a port found free.
pub fn bindable(addr: std::net::IpAddr, port: u16) -> bool {
    let at = std::net::SocketAddr::from((addr, port));
    socket2::Socket::new(socket2::Domain::for_address(at), socket2::Type::STREAM, None)
        .and_then(|socket| {
            socket.set_reuse_address(true)?;
            socket.bind(&at.into())
        })
        .is_ok()
}

/// The first of `n` consecutive ports on 127.0.0.1 that nothing listens on now, for a hub that
/// runs beside others on one machine (the demo, the fuzzed hub): found from where the kernel
/// hands out a free port, so two such hubs rarely try the same block.
pub fn free_block(n: u16) -> Option<u16> {
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    (0..500).find_map(|_| {
        let base = std::net::TcpListener::bind((localhost, 0)).ok()?.local_addr().ok()?.port();
        (base < 65000 - n && (0..n).all(|i| bindable(localhost, base + i))).then_some(base)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_skip_busy_ports_and_come_back_on_drop() {
        let t = Ports::new(100, 104);
        let a = t.lease("a", 2, |p| p != 100).unwrap();
        assert_eq!(a.ports, vec![101, 102]);
        let b = t.lease("b", 2, |_| true).unwrap();
        assert_eq!(b.ports, vec![100, 103]);
        let err = t.lease("c", 2, |_| true).unwrap_err();
        assert_eq!((err.held, err.wanted), (4, 2));
        assert!(err.to_string().contains("100-104"));
        assert_eq!(t.free(), 1);
        drop(a);
        assert_eq!(t.free(), 3);
        let c = t.lease("c", 3, |_| true).unwrap();
        assert_eq!(c.ports, vec![101, 102, 104]);
        assert!(t.is_leased_to(104, "c") && !t.is_leased_to(104, "b"));
        drop(b);
        drop(c);
        assert_eq!(t.free(), 5);
    }

    #[test]
    fn exact_leases_take_the_ports_named_or_none() {
        let t = Ports::new(100, 104);
        let a = t.lease_exact("a", &[103, 101], |_| true).unwrap();
        assert_eq!(a.ports, vec![103, 101]);
        assert!(t.lease_exact("b", &[102, 103], |_| true).unwrap_err().contains("leased to job a"));
        assert!(t.lease_exact("b", &[102, 105], |_| true).unwrap_err().contains("outside"));
        assert!(t.lease_exact("b", &[102, 102], |_| true).unwrap_err().contains("twice"));
        assert!(t.lease_exact("b", &[102], |_| false).unwrap_err().contains("another process"));
        assert_eq!(t.free(), 3, "refused leases took nothing");
        drop(a);
        assert_eq!(t.free(), 5);
    }

    #[test]
    fn a_failed_lease_takes_nothing() {
        let t = Ports::new(1, 3);
        assert!(t.lease("x", 4, |_| true).is_err());
        assert_eq!(t.free(), 3);
    }
}
