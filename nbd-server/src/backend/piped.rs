//! Write payloads that stay in the kernel from the socket to the file: [`PipedData`].
//!
//! A write's payload normally takes two copies: `recv` from the socket into the connection's
//! buffer, `pwrite` from there into the page cache. On a TCP connection the server can instead
//! `splice` the payload from the socket into a pipe (the kernel hands over the socket buffer's
//! pages, no copy) and the backend `splice`s it from the pipe into the file (one copy, into the
//! page cache). The bare loops of `nbd-bench floor` put the saving at about a tenth of a
//! receiver's CPU; on a 2-vCPU host where client and server share the cores that is throughput.
//!
//! A pipe holds 1 MiB, or fewer bytes when the socket hands over small segments (each takes one
//! of its 256 slots), so a payload takes as many pipes as it needs. They come from a bounded pool
//! shared by the whole server ([`PipePool`]): each is two descriptors, and Linux limits the pipe
//! capacity of a user (`fs.pipe-user-pages-soft`); when none is free or the kernel refuses to
//! size one, the payload takes the buffer path. A pipe goes back to the pool only empty: one
//! whose data was not all consumed (a client that vanished mid-payload, a failed write) is
//! closed, so no byte ever reaches another request. Memory stays bounded however a client
//! segments its bytes: a pipe takes at most 1 MiB of payload in at most 256 slots, each slot
//! pinning the page its bytes sit in (a socket may hand over a compound page of a few tens of
//! KiB), the pool has a fixed number of pipes, and the connections' byte budgets count piped
//! payloads like buffered ones.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};

/// Bytes one pipe holds: Linux's default `fs.pipe-max-size`. A larger payload takes several.
pub(crate) const PIPE_CAPACITY: usize = 1024 * 1024;
/// Most pipes a server keeps when the kernel lets it exceed its user's pipe allowance
/// (`CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN`): enough for every large write in flight on four
/// connections that each keep 64 (a pool of 64 left three quarters of a 4-connection qcow2 copy's
/// writes on the buffer path, and its CPU saving with them).
const MAX_PIPES: usize = 256;
/// Most pipes otherwise: half the default `fs.pipe-user-pages-soft` (64 MiB of pipe capacity per
/// user, shared by every process of the uid; past it the kernel refuses to grow our pipes and
/// gives the user's new pipes everywhere two pages). Root without those capabilities, as the
/// hub's systemd unit runs it, counts as unprivileged here.
const MAX_PIPES_UNPRIVILEGED: usize = 32;

/// The two ends of one pipe.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// A bounded set of pipes of [`PIPE_CAPACITY`] bytes, shared by every connection of a server.
#[derive(Debug)]
pub(crate) struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Pipes alive (free or in use).
    made: AtomicUsize,
    max: usize,
    /// The kernel refused to make or size a pipe once: stop asking.
    refused: AtomicBool,
}

impl PipePool {
    /// A pool of at most `max` pipes; none are made until asked for.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { free: Mutex::default(), made: AtomicUsize::new(0), max, refused: AtomicBool::new(false) })
    }

    /// A pool sized for this process: [`MAX_PIPES`] with the capabilities that lift the user's
    /// pipe allowance, [`MAX_PIPES_UNPRIVILEGED`] without, and never more than an eighth of the
    /// descriptors it may open (two per pipe).
    pub(crate) fn for_this_process() -> Arc<Self> {
        use rustix::thread::CapabilityFlags;
        let lifted = CapabilityFlags::SYS_RESOURCE | CapabilityFlags::SYS_ADMIN;
        let privileged = rustix::thread::capabilities(None).is_ok_and(|caps| caps.effective.intersects(lifted));
        let by_user = if privileged { MAX_PIPES } else { MAX_PIPES_UNPRIVILEGED };
        let descriptors = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let by_descriptors = descriptors.map_or(usize::MAX, |n| usize::try_from(n / 8).unwrap_or(usize::MAX));
        Self::new(by_user.min(by_descriptors))
    }

    /// An empty payload with one pipe, or `None` when all are in use or the kernel refuses one.
    pub(crate) fn payload(self: &Arc<Self>) -> Option<PipedData> {
        let pipe = self.take()?;
        Some(PipedData { pipes: VecDeque::from([Held { pipe, len: 0 }]), len: 0, pool: Arc::clone(self) })
    }

    fn take(&self) -> Option<Pipe> {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        reused.or_else(|| self.make())
    }

    fn make(&self) -> Option<Pipe> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        if self.made.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.made.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let made = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).and_then(|(read, write)| {
            fcntl_setpipe_size(&write, PIPE_CAPACITY)?;
            Ok(Pipe { read, write })
        });
        match made {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                // EPERM past the user's pipe allowance, EMFILE: the pipes made so far serve.
                self.made.fetch_sub(1, Ordering::Relaxed);
                self.refused.store(true, Ordering::Relaxed);
                tracing::info!(error = %e, pipes = self.made.load(Ordering::Relaxed), "no more pipes for write payloads");
                None
            }
        }
    }

    fn give_back(&self, pipe: Pipe) {
        match self.free.lock() {
            Ok(mut free) => free.push(pipe),
            Err(_) => {
                self.made.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// A pipe closed with bytes in it.
    fn discard(&self, pipe: Pipe) {
        drop(pipe);
        self.made.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pipe of a payload and the bytes it holds.
#[derive(Debug)]
struct Held {
    pipe: Pipe,
    len: usize,
}

/// A write's payload held in kernel pipes (see the module doc). Backends move it into a file
/// with [`PipedData::write_to_file`] or copy it out with [`PipedData::read_into`], in order.
#[derive(Debug)]
pub struct PipedData {
    /// In payload order; the front one holds the next bytes.
    pipes: VecDeque<Held>,
    /// Bytes in all of them.
    len: usize,
    pool: Arc<PipePool>,
}

impl PipedData {
    /// Bytes still in the pipes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether every byte has been taken.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pipe holding the next bytes; an emptied front pipe goes back to the pool at once.
    fn front(&mut self) -> std::io::Result<&mut Held> {
        while self.pipes.front().is_some_and(|held| held.len == 0) && self.pipes.len() > 1 {
            if let Some(held) = self.pipes.pop_front() {
                self.pool.give_back(held.pipe);
            }
        }
        self.pipes.front_mut().filter(|held| held.len > 0).ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }

    /// Move the next `n` bytes of the payload into `file` at `offset`, the way `pwrite` would
    /// (the file's position does not move). A filesystem that cannot take a splice gets the
    /// bytes by `pwrite`.
    ///
    /// # Errors
    /// `n` is more than [`Self::len`], or the file refused the write (`ENOSPC`, `EIO`...). The
    /// bytes not yet written stay in the pipes.
    pub fn write_to_file(&mut self, file: &File, mut offset: u64, mut n: usize) -> std::io::Result<()> {
        if n > self.len {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "more bytes asked than piped"));
        }
        while n > 0 {
            let held = self.front()?;
            let step = n.min(held.len);
            let moved = match splice(&held.pipe.read, None, file, Some(&mut offset), step, SpliceFlags::MOVE) {
                Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "file took no bytes")),
                Ok(moved) => moved,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::INVAL) => return self.pwrite_rest(file, offset, n),
                Err(e) => return Err(e.into()),
            };
            held.len -= moved;
            self.len -= moved;
            n -= moved;
        }
        Ok(())
    }

    /// `write_to_file` for files that refuse `splice`: through a small buffer.
    fn pwrite_rest(&mut self, file: &File, mut offset: u64, mut n: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut chunk = vec![0u8; n.min(64 * 1024)];
        while n > 0 {
            let step = n.min(chunk.len());
            let part = chunk.get_mut(..step).unwrap_or_default();
            self.read_into(part)?;
            file.write_all_at(part, offset)?;
            offset += step as u64;
            n -= step;
        }
        Ok(())
    }

    /// Copy the next `buf.len()` bytes of the payload into `buf`.
    ///
    /// # Errors
    /// `buf` is longer than [`Self::len`].
    pub fn read_into(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        if buf.len() > self.len {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "more bytes asked than piped"));
        }
        let mut at = 0;
        while at < buf.len() {
            let held = self.front()?;
            let step = (buf.len() - at).min(held.len);
            let Some(part) = buf.get_mut(at..at + step) else {
                return Err(std::io::ErrorKind::InvalidInput.into());
            };
            match rustix::io::read(&held.pipe.read, part) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => {
                    at += got;
                    held.len -= got;
                    self.len -= got;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The whole rest of the payload as a vector (for backends without a file to splice into).
    ///
    /// # Errors
    /// Reading a pipe failed.
    pub fn to_vec(&mut self) -> std::io::Result<Vec<u8>> {
        let mut data = vec![0u8; self.len];
        self.read_into(&mut data)?;
        Ok(data)
    }

    /// The pipe bytes are added to, with its room left (by bytes; slots may run out first).
    fn back(&mut self) -> std::io::Result<&mut Held> {
        self.pipes.back_mut().ok_or_else(|| std::io::Error::other("payload without a pipe"))
    }

    /// Append `bytes` (a part of the payload already read from the socket) to the last pipe. At
    /// most what one pipe holds; the pipe is non-blocking, so this writes all of them or fails.
    pub(crate) fn push(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let held = self.back()?;
            match rustix::io::write(&held.pipe.write, bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(put) => {
                    bytes = bytes.get(put..).unwrap_or_default();
                    held.len += put;
                    self.len += put;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Move up to `max` bytes from `socket` into the last pipe without blocking: `Ok(0)` is the
    /// end of the stream, `WouldBlock` an empty socket or a full pipe (the caller tells them
    /// apart and then [`Self::grow`]s).
    pub(crate) fn splice_from(&mut self, socket: &impl std::os::fd::AsFd, max: usize) -> std::io::Result<usize> {
        let held = self.back()?;
        let room = PIPE_CAPACITY.saturating_sub(held.len);
        if room == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let moved = splice(socket, None, &held.pipe.write, None, max.min(room), flags)?;
        held.len += moved;
        self.len += moved;
        Ok(moved)
    }

    /// Whether the last pipe has room by bytes (it may still be out of slots).
    pub(crate) fn last_has_room(&self) -> bool {
        self.pipes.back().is_some_and(|held| held.len < PIPE_CAPACITY)
    }

    /// Add another pipe for the bytes to come; `false` when the pool has none.
    pub(crate) fn grow(&mut self) -> bool {
        match self.pool.take() {
            Some(pipe) => {
                self.pipes.push_back(Held { pipe, len: 0 });
                true
            }
            None => false,
        }
    }
}

impl Drop for PipedData {
    fn drop(&mut self) {
        for held in self.pipes.drain(..) {
            if held.len == 0 {
                self.pool.give_back(held.pipe);
            } else {
                // Bytes of a payload nobody took: close the pipe with them.
                self.pool.discard(held.pipe);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_payload_goes_from_a_socket_through_the_pipe_into_a_file_at_its_offset() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        client.write_all(&payload).unwrap();

        // The first bytes were read the ordinary way (a connection's read buffer): pushed first.
        let mut head = [0u8; 1000];
        (&server).read_exact(&mut head).unwrap();
        let pool = PipePool::new(2);
        let mut data = pool.payload().expect("a pipe");
        data.push(&head).unwrap();
        server.set_nonblocking(true).unwrap();
        while data.len() < payload.len() {
            match data.splice_from(&server, payload.len() - data.len()) {
                Ok(0) => panic!("socket closed early"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("splice: {e}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let file =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap();
        data.write_to_file(&file, 4096, 200_000).unwrap();
        let mut tail = vec![0u8; 100_000];
        data.read_into(&mut tail).unwrap();
        assert!(data.is_empty());
        assert_eq!(tail, payload[200_000..]);
        let mut written = vec![0u8; 200_000];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut written, 4096).unwrap();
        assert_eq!(written, payload[..200_000]);
        drop(data);
        assert_eq!(pool.free.lock().unwrap().len(), 1, "an emptied pipe goes back to the pool");
    }

    #[test]
    fn a_pipe_with_bytes_left_is_closed_not_reused_and_the_pool_is_bounded() {
        let pool = PipePool::new(1);
        let mut data = pool.payload().expect("a pipe");
        assert!(pool.payload().is_none(), "the only pipe is in use");
        assert!(!data.grow(), "and cannot be added to a payload twice");
        data.push(b"left over").unwrap();
        assert!(data.write_to_file(&tempfile::tempfile().unwrap(), 0, 100).is_err(), "more than piped");
        drop(data);
        assert!(pool.free.lock().unwrap().is_empty());
        let mut fresh = pool.payload().expect("a new pipe in its place");
        assert!(fresh.is_empty());
        fresh.push(b"new").unwrap();
        assert_eq!(fresh.to_vec().unwrap(), b"new");
    }

    #[test]
    fn a_payload_over_several_pipes_reads_back_in_order_and_frees_each_pipe_as_it_empties() {
        let pool = PipePool::new(3);
        let mut data = pool.payload().expect("a pipe");
        let first: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let second: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
        data.push(&first).unwrap();
        assert!(data.grow());
        data.push(&second).unwrap();
        assert_eq!(data.len(), 120_000);
        let file = tempfile::tempfile().unwrap();
        // A piece that ends inside the first pipe, one across both, the rest copied out.
        data.write_to_file(&file, 0, 60_000).unwrap();
        data.write_to_file(&file, 60_000, 30_000).unwrap();
        assert_eq!(pool.free.lock().unwrap().len(), 1, "the first pipe went back once empty");
        let mut rest = vec![0u8; 30_000];
        data.read_into(&mut rest).unwrap();
        assert!(data.is_empty());
        let mut want = first.clone();
        want.extend_from_slice(&second);
        assert_eq!(rest, want[90_000..]);
        let mut written = vec![0u8; 90_000];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut written, 0).unwrap();
        assert_eq!(written, want[..90_000]);
        drop(data);
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}
