//! One buffered write in the kernel at a time per file.
//!
//! Buffered `pwrite`s into one file serialise on its inode lock (tmpfs, ext4, xfs alike). When
//! several runtime workers arrive there together the losers spin in the kernel
//! (`rwsem_spin_on_owner`: 17-31% of the server's samples in `perf` profiles of a 4-connection
//! copy, raw and qcow2, on tmpfs) and that CPU does nothing. Taking turns in user space first
//! costs nothing the kernel did not already impose, and a write waiting for its turn yields its
//! worker to other connections' protocol work instead of spinning. Reads take no turn.

use std::sync::Arc;

/// The turn to write into one file; clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteGate(Arc<tokio::sync::Mutex<()>>);

impl WriteGate {
    /// Wait for the turn; the write happens while the guard lives.
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}
