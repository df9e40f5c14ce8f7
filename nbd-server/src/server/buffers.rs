//! A small per-connection pool of payload buffers.
//!
//! Without it every 256 KiB request allocates and frees a fresh buffer, which glibc serves with
//! `mmap`/`munmap`: the profile of a single-connection copy showed page faults and zeroing of
//! new pages as a large share of server CPU. Buffers come back here once a write has been
//! applied or a read reply has been written; at most `max_bytes` are kept, so an idle
//! connection holds a bounded amount of memory.
//!
//! Every buffer starts on a page boundary ([`AlignedBuf`]): with `--cache=none` the backend hands
//! a payload to `O_DIRECT` as it is, where an unaligned one would first be copied into a bounce
//! buffer (on a 2-vCPU host that copy cost a tenth of the throughput).

use std::sync::Mutex;

use directio::AlignedBuf;

/// Reusable byte buffers.
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    max_bytes: usize,
}

impl BufferPool {
    pub fn new(max_bytes: usize) -> Self {
        Self { free: Mutex::new(Vec::new()), max_bytes }
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (stale data of an earlier
    /// request, or zeroes): callers overwrite every byte they send.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let at = free.iter().position(|b| b.capacity() >= len)?;
            Some(free.swap_remove(at))
        });
        let mut buf = reused.unwrap_or_default();
        if !buf.set_len(len) {
            buf = AlignedBuf::new(len);
        }
        buf
    }

    /// Return a buffer for reuse (dropped if the pool is full).
    pub fn put(&self, buf: AlignedBuf) {
        if buf.capacity() == 0 || buf.capacity() > self.max_bytes {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            let held: usize = free.iter().map(AlignedBuf::capacity).sum();
            if held + buf.capacity() <= self.max_bytes {
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_stays_within_its_bound() {
        let pool = BufferPool::new(1 << 20);
        let a = pool.take(4096);
        let ptr = a.as_ptr();
        assert!(directio::is_memory_aligned(&a), "payloads start on a page boundary");
        pool.put(a);
        let b = pool.take(1024);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer was reused");
        assert_eq!(b.len(), 1024);
        let c = pool.take(8192);
        assert!(directio::is_memory_aligned(&c) && c.len() == 8192, "a larger request gets a new buffer");
        pool.put(AlignedBuf::new(2 << 20));
        assert!(pool.free.lock().unwrap().is_empty(), "a buffer over the bound is dropped");
    }
}
