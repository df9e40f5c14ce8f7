//! Exports: a named backend plus its policy (read-only, connection limit) and live counters.
//!
//! An [`Export`] is shared by all of its connections through an `Arc`. Attaching a connection
//! is a compare-and-swap on the active count, so the limit holds under racing handshakes, and
//! the returned [`ConnectionSlot`] gives the place back on drop however the connection ends.
//! Counters are relaxed atomics: a service reads them for dashboards, not for synchronisation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::proto::consts::transmission_flags as tf;

/// How to publish a backend.
#[derive(Clone)]
#[non_exhaustive]
pub struct ExportConfig {
    /// Name clients ask for (NBD_OPT_GO / EXPORT_NAME).
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// The storage.
    pub backend: Arc<dyn Backend>,
    /// Refuse writes even if the backend could take them.
    pub read_only: bool,
    /// Connections allowed at once (qemu-nbd's `--shared`); more get a clear option error.
    pub max_connections: usize,
    /// Dirty bitmaps of the backend, each offered as a `qemu:dirty-bitmap:NAME` metadata
    /// context (qemu-nbd's `-B NAME`, repeated); the backend answers for them
    /// ([`Backend::bitmap_status`]). At most [`MAX_BITMAPS`], names distinct.
    pub bitmaps: Vec<String>,
}

/// Dirty bitmaps one export offers at most (a connection's selection is one bit each).
pub const MAX_BITMAPS: usize = 64;

/// Bit `i` of a selection of bitmaps (none past [`MAX_BITMAPS`]).
pub(crate) fn bitmap_bit(i: usize) -> u64 {
    u32::try_from(i).ok().and_then(|i| 1u64.checked_shl(i)).unwrap_or(0)
}

/// Why `names` cannot be an export's bitmaps, if they cannot.
pub(crate) fn bitmaps_refused(names: &[String]) -> Option<String> {
    if names.len() > MAX_BITMAPS {
        return Some(format!("{} dirty bitmaps, more than the {MAX_BITMAPS} an export offers", names.len()));
    }
    for (i, name) in names.iter().enumerate() {
        let before = names.get(..i).unwrap_or_default();
        // `qemu:dirty-bitmap:` and the name make one context name, an NBD string.
        if name.is_empty() || name.contains('\0') || name.len() > crate::proto::consts::MAX_STRING_LEN - 18 {
            return Some(format!("dirty bitmap name {name:?} is empty, holds NUL or is too long"));
        }
        if before.contains(name) {
            return Some(format!("dirty bitmap {name} is named twice"));
        }
    }
    None
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("read_only", &self.read_only)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl ExportConfig {
    /// An export of `backend` named `name`, writable if the backend is, one connection at a
    /// time (qemu-nbd's default).
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            backend,
            read_only: false,
            max_connections: 1,
            bitmaps: Vec::new(),
        }
    }

    /// Set the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Offer the backend's dirty bitmaps `names`, each as `qemu:dirty-bitmap:NAME`.
    pub fn bitmaps(mut self, names: Vec<String>) -> Self {
        self.bitmaps = names;
        self
    }

    /// Make the export read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Allow `n` connections at once (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }
}

/// A point-in-time copy of an export's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportStats {
    /// Connections in transmission now.
    pub connections_active: usize,
    /// Connections that ever entered transmission.
    pub connections_total: u64,
    /// Connections refused because the export was at its limit.
    pub connections_refused: u64,
    /// Bytes returned by READ.
    pub bytes_read: u64,
    /// Bytes accepted by WRITE.
    pub bytes_written: u64,
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// TRIM requests.
    pub trims: u64,
    /// WRITE_ZEROES requests.
    pub zeroes: u64,
    /// BLOCK_STATUS requests.
    pub block_status: u64,
    /// CACHE requests.
    pub caches: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub caches: AtomicU64,
    pub errors: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A live export.
pub(crate) struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    pub max_connections: usize,
    /// The dirty bitmaps offered as metadata contexts, by name; the one at index `i` has the
    /// context id `BITMAP_CONTEXT_ID + i` and bit `i` of a connection's selection.
    pub bitmaps: Vec<String>,
    pub counters: Counters,
    /// Clients attached (what `max_connections` limits): released as soon as a client is gone.
    active: AtomicUsize,
    /// Connections still finishing requests (what removal waits for), client gone or not.
    busy: AtomicUsize,
    /// Wakes `drain` when the last connection leaves.
    idle: Notify,
    /// Cancelled when the export is removed: its connections finish what is in flight and close.
    pub closing: CancellationToken,
    /// Cancelled when a removal's deadline passes (or the server is cut): its connections stop
    /// writing replies a client does not read, and close.
    pub hard: CancellationToken,
}

impl Export {
    pub fn new(config: ExportConfig, closing: CancellationToken, hard: CancellationToken) -> Self {
        let read_only = config.read_only || config.backend.capabilities().read_only;
        Self {
            name: config.name,
            description: config.description,
            backend: config.backend,
            read_only,
            max_connections: config.max_connections.max(1),
            bitmaps: config.bitmaps,
            counters: Counters::default(),
            active: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            idle: Notify::new(),
            closing,
            hard,
        }
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Transmission flags, derived from what the backend can do and what was negotiated.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.backend.capabilities();
        let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA;
        if self.read_only {
            flags |= tf::READ_ONLY;
        } else {
            if caps.trim {
                flags |= tf::SEND_TRIM;
            }
            if caps.write_zeroes {
                flags |= tf::SEND_WRITE_ZEROES;
                // Advertised only by backends that honour the flag (fail rather than be slow).
                if caps.fast_zero {
                    flags |= tf::SEND_FAST_ZERO;
                }
            }
        }
        if structured {
            flags |= tf::SEND_DF;
        }
        if self.max_connections > 1 {
            flags |= tf::CAN_MULTI_CONN;
        }
        if caps.cache {
            flags |= tf::SEND_CACHE;
        }
        flags
    }

    /// Take a connection place, or say the export is full.
    pub fn attach(self: &Arc<Self>) -> Option<ConnectionSlot> {
        // An export being removed takes no new connection, even with slots free.
        if self.closing.is_cancelled() {
            bump(&self.counters.connections_refused, 1);
            return None;
        }
        let mut current = self.active.load(Ordering::Acquire);
        loop {
            if current >= self.max_connections {
                bump(&self.counters.connections_refused, 1);
                return None;
            }
            match self.active.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    bump(&self.counters.connections_total, 1);
                    return Some(ConnectionSlot { export: Arc::clone(self) });
                }
                Err(seen) => current = seen,
            }
        }
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Mark a connection as working on this export until the guard drops (its requests may
    /// outlive its client slot).
    pub fn activity(self: &Arc<Self>) -> Activity {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Activity { export: Arc::clone(self) }
    }

    /// Wait until no connection is attached and none is still finishing requests.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active_connections() == 0 && self.busy.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            connections_active: self.active_connections(),
            connections_total: get(&c.connections_total),
            connections_refused: get(&c.connections_refused),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            reads: get(&c.reads),
            writes: get(&c.writes),
            flushes: get(&c.flushes),
            trims: get(&c.trims),
            zeroes: get(&c.zeroes),
            block_status: get(&c.block_status),
            caches: get(&c.caches),
            errors: get(&c.errors),
        }
    }
}

/// A connection still finishing requests on an export; released on drop.
pub(crate) struct Activity {
    export: Arc<Export>,
}

impl Drop for Activity {
    fn drop(&mut self) {
        if self.export.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.export.idle.notify_waiters();
        }
    }
}

/// A connection's place in an export; released on drop.
pub(crate) struct ConnectionSlot {
    pub export: Arc<Export>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if self.export.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.export.idle.notify_waiters();
        }
    }
}

/// All exports of a server, by name.
#[derive(Default)]
pub(crate) struct Registry {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.read().ok()?.get(name).cloned()
    }

    pub fn insert(&self, export: Arc<Export>) -> Result<(), Arc<Export>> {
        let Ok(mut map) = self.exports.write() else {
            return Err(export);
        };
        if map.contains_key(&export.name) {
            return Err(export);
        }
        map.insert(export.name.clone(), export);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.write().ok()?.remove(name)
    }

    pub fn all(&self) -> Vec<Arc<Export>> {
        self.exports.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_are_refused_past_the_limit_twice_named_or_unnamed() {
        let names = |n: usize| (0..n).map(|i| format!("b{i}")).collect::<Vec<_>>();
        assert_eq!(bitmaps_refused(&names(MAX_BITMAPS)), None);
        assert!(bitmaps_refused(&names(MAX_BITMAPS + 1)).is_some_and(|r| r.contains("more than the 64")));
        assert!(bitmaps_refused(&["a".into(), "b".into(), "a".into()]).is_some_and(|r| r.contains("a is named twice")));
        assert!(bitmaps_refused(&[String::new()]).is_some());
        assert!(bitmaps_refused(&["x".repeat(4096)]).is_some());
        assert_eq!((bitmap_bit(0), bitmap_bit(63), bitmap_bit(64)), (1, 1 << 63, 0));
    }
}
