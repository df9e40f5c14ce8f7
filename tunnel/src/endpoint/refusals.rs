//! Logins the endpoint refused lately, kept for the embedding service to show its operators.
//!
//! A node whose tunnel does not connect is, more often than not, a node whose key the hub does
//! not hold as it should: a line pasted wrong, the node's key made again, an `expiry-time=` passed,
//! a `from=` that no longer covers its address. Each refusal is in the log, but an operator asks
//! the service ("why is this node down?"), not the log; so the endpoint keeps what it refused in
//! the last [`WINDOW`], by what (reason, key fingerprint, address), each counted, and tells it with
//! [`super::Endpoint::refused_logins`]; [`super::Endpoint::refusals_total`] counts every refusal
//! since the start, for a metric.
//!
//! Recorded: a key refused after it signed (so the key's fingerprint is the client's own), a user
//! name refused, and a connection that ended before it logged in (the handshake failed or the
//! client went away: a node that does not accept the hub's host key, its pinned fingerprint
//! wrong, does that; so does a port scanner). A peer can grow nothing: at most [`MAX_KINDS`] kinds are
//! kept, the one refused least recently giving its place to a new one, so a flood of fresh keys
//! (each costing its sender a key exchange and a signature) pushes older entries out and no more.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How long a refusal is told after it last happened.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Kinds of refusal (reason, key, address) kept at once.
pub const MAX_KINDS: usize = 64;

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The key is not among those that may connect.
    UnknownKey,
    /// The key's `expiry-time=` has passed.
    KeyExpired,
    /// The key's `from=` does not allow the address it came from.
    AddressNotAllowed,
    /// The key holds as many connections as it may.
    TooManyConnections,
    /// The endpoint takes another user name.
    WrongUser,
    /// The connection ended before it logged in: the handshake failed or the client closed it
    /// (a client that does not accept the endpoint's host key does).
    EndedBeforeLogin,
}

impl Refusal {
    /// Every reason, in the order [`RefusalTotals`] counts them.
    pub const ALL: [Refusal; 6] = [
        Self::UnknownKey,
        Self::KeyExpired,
        Self::AddressNotAllowed,
        Self::TooManyConnections,
        Self::WrongUser,
        Self::EndedBeforeLogin,
    ];

    /// Its name in APIs and metrics (`unknown-key`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown-key",
            Self::KeyExpired => "key-expired",
            Self::AddressNotAllowed => "address-not-allowed",
            Self::TooManyConnections => "too-many-connections",
            Self::WrongUser => "wrong-user",
            Self::EndedBeforeLogin => "ended-before-login",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::UnknownKey => 0,
            Self::KeyExpired => 1,
            Self::AddressNotAllowed => 2,
            Self::TooManyConnections => 3,
            Self::WrongUser => 4,
            Self::EndedBeforeLogin => 5,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Logins refused for one reason, with one key, from one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedLogin {
    /// Why.
    pub reason: Refusal,
    /// The key's SHA-256 fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints it); none when
    /// the connection ended before it offered one.
    pub fingerprint: Option<String>,
    /// Where the logins came from.
    pub peer: IpAddr,
    /// How many were refused since `first`.
    pub count: u64,
    /// The first of them (since when they come without an hour's pause).
    pub first: SystemTime,
    /// The latest.
    pub last: SystemTime,
}

/// Refusals since the endpoint started, per reason.
pub type RefusalTotals = [(Refusal, u64); 6];

/// The record (module doc).
#[derive(Default)]
pub(super) struct Refusals {
    recent: Mutex<Vec<RefusedLogin>>,
    totals: [AtomicU64; 6],
}

impl Refusals {
    /// Count a login refused at `now`.
    pub(super) fn record(&self, reason: Refusal, fingerprint: Option<&str>, peer: IpAddr, now: SystemTime) {
        if let Some(total) = self.totals.get(reason.index()) {
            total.fetch_add(1, Ordering::Relaxed);
        }
        let Ok(mut recent) = self.recent.lock() else { return };
        let same =
            |r: &&mut RefusedLogin| r.reason == reason && r.peer == peer && r.fingerprint.as_deref() == fingerprint;
        if let Some(r) = recent.iter_mut().find(same) {
            if !told_at(r.last, now) {
                (r.first, r.count) = (now, 0);
            }
            r.count += 1;
            r.last = now;
            return;
        }
        if recent.len() >= MAX_KINDS {
            if let Some(oldest) = recent.iter().enumerate().min_by_key(|(_, r)| r.last).map(|(i, _)| i) {
                recent.swap_remove(oldest);
            }
        }
        recent.push(RefusedLogin {
            reason,
            fingerprint: fingerprint.map(str::to_string),
            peer,
            count: 1,
            first: now,
            last: now,
        });
    }

    /// What was refused within [`WINDOW`] of `now`, the latest first.
    pub(super) fn recent(&self, now: SystemTime) -> Vec<RefusedLogin> {
        let Ok(mut recent) = self.recent.lock() else { return Vec::new() };
        recent.retain(|r| told_at(r.last, now));
        let mut out = recent.clone();
        out.sort_by_key(|r| std::cmp::Reverse(r.last));
        out
    }

    /// Refusals since the start, per reason.
    pub(super) fn totals(&self) -> RefusalTotals {
        Refusal::ALL.map(|r| (r, self.totals.get(r.index()).map_or(0, |t| t.load(Ordering::Relaxed))))
    }
}

/// Whether something that happened at `at` is still told at `now`.
fn told_at(at: SystemTime, now: SystemTime) -> bool {
    now.duration_since(at).map_or(true, |age| age <= WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_are_counted_by_reason_key_and_address_and_told_for_an_hour() {
        let r = Refusals::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = |s| t0 + Duration::from_secs(s);
        r.record(Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.7"), t0);
        r.record(Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.7"), later(10));
        r.record(Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.8"), later(20));
        r.record(Refusal::KeyExpired, Some("SHA256:b"), ip("10.0.0.7"), later(30));
        let told = r.recent(later(40));
        let brief: Vec<(Refusal, Option<&str>, IpAddr, u64)> =
            told.iter().map(|x| (x.reason, x.fingerprint.as_deref(), x.peer, x.count)).collect();
        assert_eq!(
            brief,
            [
                (Refusal::KeyExpired, Some("SHA256:b"), ip("10.0.0.7"), 1),
                (Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.8"), 1),
                (Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.7"), 2),
            ]
        );
        assert_eq!((told[2].first, told[2].last), (t0, later(10)));
        // An hour after each one's latest, it is no longer told; the totals stay.
        let told = r.recent(later(10 + 3600 + 1));
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(r.recent(later(30 + 3601)).is_empty());
        assert_eq!(r.totals()[0], (Refusal::UnknownKey, 3));
        assert_eq!(r.totals()[1], (Refusal::KeyExpired, 1));
        // A kind refused again after its hour starts counting again.
        r.record(Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.9"), t0);
        r.record(Refusal::UnknownKey, Some("SHA256:a"), ip("10.0.0.9"), later(7200));
        let again = r.recent(later(7200));
        assert_eq!((again.len(), again[0].count, again[0].first), (1, 1, later(7200)));
    }

    #[test]
    fn a_flood_of_new_keys_keeps_the_record_bounded_and_the_latest_refusals() {
        let r = Refusals::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..10 * MAX_KINDS as u64 {
            let key = format!("SHA256:{i}");
            r.record(Refusal::UnknownKey, Some(&key), ip("192.0.2.1"), t0 + Duration::from_millis(i));
        }
        let told = r.recent(t0 + Duration::from_secs(1));
        assert_eq!(told.len(), MAX_KINDS);
        assert_eq!(told[0].fingerprint, Some(format!("SHA256:{}", 10 * MAX_KINDS - 1)));
        assert_eq!(told[MAX_KINDS - 1].fingerprint, Some(format!("SHA256:{}", 9 * MAX_KINDS)));
        assert_eq!(r.totals()[0].1, 10 * MAX_KINDS as u64);
    }
}
