//! `--aio=io_uring`: a ring per export (or one shared by many: [`IoRing`]), driven by one thread.
//!
//! With `--aio=threads` (the default) every connection's worker calls `pread`/`pwrite` itself, and
//! an `O_DIRECT` request holds a thread until the device answers. Here the I/O of all connections
//! goes into one submission queue that one thread submits and reaps: buffered writes enter the
//! file from one place (the inode-lock fight that `gate.rs` prevents in user space cannot
//! happen), and direct requests are in flight together without a thread each. The raw backend
//! sends reads, writes and flushes through it; the qcow2 backend the data of its writes (the
//! crate plans the metadata around them). Everything else (block status, trim, zeroing) stays
//! on the threads path.
//!
//! How the thread waits: callers push an [`Op`] on a queue and write to an eventfd; the thread
//! keeps a read of that eventfd queued in the ring, so one `submit_and_wait(1)` wakes it for new
//! work and for completions alike, and it never polls. The queue grows only with requests the
//! server has already admitted (its per-connection and server-wide limits bound them).
//!
//! Why `unsafe` (this module is the crate's only use of it): the kernel reads or writes the
//! caller's buffer until the completion arrives, which no borrow checker can see. Every submitted
//! operation is owned by a [`Pending`] future, and dropping a `Pending` whose completion has not
//! arrived *waits for it* (a blocking wait, reached only when a caller abandons the future, e.g.
//! a task cancelled at shutdown): so a buffer can never be freed, nor a descriptor closed, while
//! the kernel still uses it. The ring thread owns the ring and the eventfd's read buffer and
//! exits when the [`Uring`] is dropped and nothing is in flight.

#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};

use super::{BackendError, BackendResult};

/// Submission queue entries of each export's ring (more wait in the queue).
const RING_ENTRIES: u32 = 256;
/// `user_data` of the eventfd read that wakes the ring thread.
const WAKE: u64 = u64::MAX;

/// Where one operation's result lands.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    done: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// The completion's result: bytes moved, or a negated errno.
    result: Option<i32>,
    waker: Option<Waker>,
}

impl Slot {
    fn complete(&self, result: i32) {
        let waker = match self.state.lock() {
            Ok(mut st) => {
                st.result = Some(result);
                st.waker.take()
            }
            Err(poisoned) => {
                let mut st = poisoned.into_inner();
                st.result = Some(result);
                st.waker.take()
            }
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A submission entry and the slot its completion goes to.
struct Op {
    entry: squeue::Entry,
    slot: Arc<Slot>,
}

// SAFETY: an entry holds the caller's buffer address and descriptor number; the caller keeps
// both alive until the completion (see `Pending`), and only the ring thread reads the entry.
unsafe impl Send for Op {}

struct Shared {
    /// Operations not yet taken by the thread; `None` once the thread has failed.
    queue: Mutex<Option<VecDeque<Op>>>,
    wake: OwnedFd,
    stop: AtomicBool,
}

impl Shared {
    fn kick(&self) {
        // An eventfd write only fails when the counter would overflow: the thread is awake then.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// A ring for `--aio=io_uring` backends, cheap to clone: give one to many exports
/// ([`crate::FileBackend::with_ring`], [`crate::Qcow2Backend::with_ring`]) and their I/O shares
/// one submission queue and one thread (a hub with a hundred exports needs no hundred threads).
#[derive(Debug, Clone)]
pub struct IoRing(pub(crate) Arc<Uring>);

impl IoRing {
    /// Set up a ring and start its thread (it ends when the last clone, and every backend
    /// holding one, is gone).
    ///
    /// # Errors
    /// The kernel refuses io_uring (too old, or disabled by `kernel.io_uring_disabled` or a
    /// seccomp policy); the message says so.
    pub fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(Uring::new()?)))
    }
}

/// A ring and the thread that drives it.
pub(crate) struct Uring {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

impl Uring {
    /// Set up a ring and start its thread.
    ///
    /// # Errors
    /// The kernel refuses io_uring (too old, or disabled by `kernel.io_uring_disabled` or a
    /// seccomp policy); the message says so.
    pub fn new() -> io::Result<Self> {
        let refused = |e: io::Error| io::Error::new(e.kind(), format!("io_uring (--aio=io_uring) refused: {e}"));
        let ring = IoUring::new(RING_ENTRIES).map_err(refused)?;
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).map_err(|e| refused(e.into()))?;
        let shared = Arc::new(Shared { queue: Mutex::new(Some(VecDeque::new())), wake, stop: AtomicBool::new(false) });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nbd-uring".into())
            .spawn(move || {
                drive(ring, &thread_shared);
                // Only reached once the `Uring` is gone; refuse anything still queued.
                fail_queued(&thread_shared);
            })
            .map_err(refused)?;
        Ok(Self { shared })
    }

    /// Read into `buf` from `offset` of `file`; resolves to the bytes read (0 at end of file).
    pub fn read<'a>(&'a self, file: &'a File, buf: &'a mut [u8], offset: u64) -> Pending<'a> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len).offset(offset).build();
        self.submit(entry)
    }

    /// Write `data` at `offset` of `file`; resolves to the bytes written.
    pub fn write<'a>(&'a self, file: &'a File, data: &'a [u8], offset: u64) -> Pending<'a> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), data.as_ptr(), len).offset(offset).build();
        self.submit(entry)
    }

    /// `fdatasync` of `file`.
    pub fn sync_data<'a>(&'a self, file: &'a File) -> Pending<'a> {
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build();
        self.submit(entry)
    }

    /// Fill `buf` from `offset` of `file` (short reads continue; the end of the file is an
    /// `UnexpectedEof` error). On an `O_DIRECT` file a short read that stops off a
    /// [`directio::DIRECT_ALIGN`] boundary is the end of the file too: the rest, unaligned, would
    /// be refused with `EINVAL`, and a file's size need not be aligned.
    pub async fn read_exact(&self, file: &File, buf: &mut [u8], offset: u64) -> BackendResult<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let at = offset + done as u64;
            match self.read(file, rest, at).await {
                Ok(0) => return Err(BackendError::io("read", at, io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) => return Err(BackendError::io("read", at, e)),
            }
            if done < buf.len() && done % directio::DIRECT_ALIGN != 0 && is_direct(file) {
                return Err(BackendError::io("read", offset + done as u64, io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(())
    }

    /// Write all of `data` at `offset` of `file` (short writes continue).
    pub async fn write_all(&self, file: &File, data: &[u8], offset: u64) -> BackendResult<()> {
        let mut done = 0;
        while let Some(rest) = data.get(done..).filter(|rest| !rest.is_empty()) {
            let at = offset + done as u64;
            match self.write(file, rest, at).await {
                Ok(0) => return Err(BackendError::io("write", at, io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) => return Err(BackendError::io("write", at, e)),
            }
        }
        Ok(())
    }

    fn submit(&self, entry: squeue::Entry) -> Pending<'_> {
        let slot = Arc::new(Slot::default());
        let queued = match self.shared.queue.lock().as_deref_mut() {
            Ok(Some(q)) => {
                q.push_back(Op { entry, slot: Arc::clone(&slot) });
                true
            }
            _ => false,
        };
        if queued {
            self.shared.kick();
        } else {
            slot.complete(-rustix::io::Errno::IO.raw_os_error());
        }
        Pending { slot, _borrows: std::marker::PhantomData }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.kick();
    }
}

/// One submitted operation; resolves to its result. Dropping it before then waits for the
/// completion (see the module doc): it borrows the buffer and descriptor the kernel is using.
#[must_use = "an operation is waited for even if dropped"]
pub(crate) struct Pending<'a> {
    slot: Arc<Slot>,
    _borrows: std::marker::PhantomData<&'a mut [u8]>,
}

impl Future for Pending<'_> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(mut st) = self.slot.state.lock() else {
            return Poll::Ready(Err(io::Error::other("io_uring completion lost")));
        };
        match st.result {
            Some(r) if r < 0 => Poll::Ready(Err(io::Error::from_raw_os_error(-r))),
            Some(r) => Poll::Ready(Ok(r as usize)),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Ok(mut st) = self.slot.state.lock() else { return };
        while st.result.is_none() {
            st = match self.slot.done.wait(st) {
                Ok(st) => st,
                Err(_) => return,
            };
        }
    }
}

/// The ring thread: submit what is queued, wait for at least one completion, hand results out.
fn drive(mut ring: IoUring, shared: &Shared) {
    // Leaked on purpose (8 bytes per export): a read of the eventfd may still be queued in the
    // ring when the thread ends, and the kernel finishes tearing a ring down asynchronously.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let mut in_flight: HashMap<u64, Arc<Slot>> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut wake_armed = false;
    let mut waiting: VecDeque<Op> = VecDeque::new();
    let mut complained = false;
    loop {
        if !wake_armed {
            let entry =
                opcode::Read::new(types::Fd(shared.wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
            // SAFETY: `wake_buf` is never freed; the ring holds its own reference to the eventfd.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                wake_armed = true;
            }
        }
        if let Ok(Some(q)) = shared.queue.lock().as_deref_mut() {
            waiting.extend(q.drain(..));
        }
        while let Some(op) = waiting.pop_front() {
            let id = next_id;
            next_id = next_id.wrapping_add(1) % WAKE;
            let entry = op.entry.clone().user_data(id);
            // SAFETY: the buffer and descriptor the entry names are kept alive by its `Pending`
            // until the completion below sets its slot.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                waiting.push_front(op);
                break;
            }
            in_flight.insert(id, op.slot);
        }
        if shared.stop.load(Ordering::Acquire) && in_flight.is_empty() && waiting.is_empty() {
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INTR.raw_os_error()) => {}
            // The completion queue is full: reap below, then submit again.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {}
            Err(e) => {
                // Not expected from a working ring. Operations the kernel holds are never failed
                // without their completion (their buffers must outlive it); those not submitted
                // yet are failed now, and the loop tries again.
                if !complained {
                    tracing::error!(error = %e, "io_uring submit failed");
                    complained = true;
                }
                for op in waiting.drain(..) {
                    op.slot.complete(-rustix::io::Errno::IO.raw_os_error());
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        for cqe in ring.completion() {
            if cqe.user_data() == WAKE {
                wake_armed = false;
                continue;
            }
            if let Some(slot) = in_flight.remove(&cqe.user_data()) {
                slot.complete(cqe.result());
            }
        }
    }
}

/// When the thread ends: fail what is still queued and refuse what comes, so no caller waits
/// forever.
fn fail_queued(shared: &Shared) {
    let queued = match shared.queue.lock() {
        Ok(mut q) => q.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    for op in queued.into_iter().flatten() {
        op.slot.complete(-rustix::io::Errno::IO.raw_os_error());
    }
}

/// Whether `file` was opened with `O_DIRECT` (asked only after a short read).
fn is_direct(file: &File) -> bool {
    rustix::fs::fcntl_getfl(file).is_ok_and(|flags| flags.contains(rustix::fs::OFlags::DIRECT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(len: u64) -> (tempfile::NamedTempFile, File) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(tmp.path()).unwrap();
        (tmp, file)
    }

    #[tokio::test]
    async fn reads_writes_and_syncs_come_back_with_their_results() {
        let ring = Uring::new().unwrap();
        let (_tmp, file) = file_with(1 << 20);
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(ring.write(&file, &data, 4096).await.unwrap(), data.len());
        ring.sync_data(&file).await.unwrap();
        let mut back = vec![0u8; data.len()];
        assert_eq!(ring.read(&file, &mut back, 4096).await.unwrap(), data.len());
        assert_eq!(back, data);
        let mut past = vec![0u8; 16];
        assert_eq!(ring.read(&file, &mut past, 1 << 20).await.unwrap(), 0, "end of file reads 0 bytes");
        // The kernel's error reaches the caller as itself.
        let read_only = File::open(_tmp.path()).unwrap();
        let err = ring.write(&read_only, &data, 0).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::BADF.raw_os_error()));
        // Many at once, from several tasks, all land.
        let ring = Arc::new(ring);
        let file = Arc::new(file);
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let (ring, file) = (Arc::clone(&ring), Arc::clone(&file));
                tokio::spawn(async move { ring.write(&file, &[i as u8 + 1; 4096], i * 4096).await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 4096);
        }
        for i in 0..64u64 {
            let mut page = [0u8; 4096];
            file.read_exact_at(&mut page, i * 4096).unwrap();
            assert!(page.iter().all(|&b| b == i as u8 + 1), "page {i}");
        }
    }

    #[test]
    fn an_abandoned_operation_is_waited_for_before_its_buffer_can_go() {
        let ring = Uring::new().unwrap();
        let (_tmp, file) = file_with(8 << 20);
        let data = vec![0x5au8; 4 << 20];
        {
            let mut op = std::pin::pin!(ring.write(&file, &data, 0));
            let mut cx = Context::from_waker(Waker::noop());
            let _ = op.as_mut().poll(&mut cx);
            // Dropped here, perhaps before the kernel is done with `data`.
        }
        // The drop returned only after the completion: the whole write is in the file.
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data);
        drop(data);
    }
}
