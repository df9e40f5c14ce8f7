//! The write path: in-place writes, cluster allocation with copy-on-write, zeroing, discard,
//! flush.
//!
//! A write to a cluster that is already allocated to this image (COPIED) is a plain `pwrite`
//! with no lock. Anything else allocates: under the metadata lock the guest cluster is marked
//! in flight and a fresh host cluster taken (see `refcount.rs` for why that is crash-safe);
//! outside the lock the whole new cluster is assembled (old contents from wherever they were:
//! backing file, compressed cluster, zeroes) and written; back under the lock the L2 entry is
//! switched to it and the old host cluster released. A second writer to the same guest cluster
//! waits for the first, then writes in place, so racing writers end with one cluster and both
//! writes intact.
//!
//! Crash safety mostly does not depend on the order the disk persists these writes in (the code
//! issues data, then a new L2 table's zeroes and its L1 entry, then the L2 entry): every cluster an
//! entry may newly point at is fresh from the end of the file (zeroes until its own write lands)
//! and has a durable refcount, so a pointer persisted without its target reads zeroes where an
//! unacknowledged write was, never other data. The one exception is copy-on-write: a new cluster
//! that carries older bytes (from the backing file or a compressed cluster) is made durable
//! (`fdatasync`) before its L2 entry is written, so a crash cannot zero bytes written and flushed
//! long before. FLUSH makes everything before it durable. See `qcow2/DESIGN.md`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::layout::{self, Mapping, COPIED};
use crate::refcount::Refcounts;

/// Mutable metadata state of a writable image.
pub(crate) struct WriteState {
    pub refcounts: Refcounts,
    /// Guest clusters being allocated, and who waits for them.
    pub(crate) inflight: HashMap<u64, Arc<InFlight>>,
}

impl WriteState {
    pub fn new(refcounts: Refcounts) -> Self {
        Self { refcounts, inflight: HashMap::new() }
    }
}

#[derive(Default)]
pub(crate) struct InFlight {
    done: Mutex<bool>,
    cv: Condvar,
}

impl InFlight {
    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn finish(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// The L2 entry (and extended bitmap) for `new`.
fn encode_entry(new: NewEntry, extended: bool) -> (u64, u64) {
    match (new, extended) {
        (NewEntry::Data(host), false) => (host | COPIED, 0),
        (NewEntry::Data(host), true) => (host | COPIED, 0x0000_0000_ffff_ffff),
        (NewEntry::Zero, false) => (layout::ZERO, 0),
        (NewEntry::Zero, true) => (0, 0xffff_ffff_0000_0000),
        (NewEntry::Unallocated, _) => (0, 0),
    }
}

/// How to rewrite one guest cluster's L2 entry.
#[derive(Debug, Clone, Copy)]
enum NewEntry {
    Data(u64),
    Zero,
    Unallocated,
}

impl Image {
    pub(crate) fn state(&self) -> Result<std::sync::MutexGuard<'_, WriteState>> {
        let Some(m) = self.write_state.as_ref() else { return Err(Error::ReadOnly("the image was opened read-only")) };
        Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Write `data` at guest `offset`.
    ///
    /// # Errors
    /// Read-only image, out of range, malformed metadata, or I/O.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, data.len() as u64)?;
        let cluster = self.geo.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = pos & (cluster - 1);
            let remaining = (data.len() - done) as u64;
            if within == 0 && remaining >= cluster {
                // Whole clusters from here: handle as many as one L2 table covers at once.
                let guest = pos >> self.geo.cluster_bits;
                let left_in_table = self.geo.l2_entries() - guest % self.geo.l2_entries();
                let k = (remaining / cluster).min(left_in_table);
                let chunk = data.get(done..done + (k * cluster) as usize).unwrap_or_default();
                done += self.write_run(pos, chunk)?;
                continue;
            }
            let n = ((cluster - within) as usize).min(data.len() - done);
            let chunk = data.get(done..done + n).unwrap_or_default();
            self.write_cluster(pos, chunk)?;
            done += n;
        }
        Ok(())
    }

    /// Whether writing `length` bytes at `offset` may wait on the disk or on another writer: any
    /// write with [`crate::ImageOptions::direct_io`], a copy-on-write (made durable with
    /// `fdatasync`), a new refcount reservation (another `fdatasync`), or a guest cluster another
    /// writer is allocating. Writes into clusters this
    /// image already owns, and allocations the current reservation covers, only copy into the
    /// page cache (and take the metadata lock for a moment) and answer `false`.
    ///
    /// Advisory, for async callers choosing where to run [`Image::write_at`]: the answer may be
    /// stale by the time the write runs (another writer may have taken the reservation), which
    /// costs a wait, never correctness. A request that will fail (read-only, out of range,
    /// unreadable metadata) answers `false` and fails at once.
    pub fn write_may_wait(&self, offset: u64, length: u64) -> bool {
        let Some(state) = self.write_state.as_ref() else { return false };
        let Some(end) = offset.checked_add(length).filter(|&end| end <= self.geo.size) else { return false };
        if self.is_direct() {
            return true; // an O_DIRECT write waits for the device
        }
        let cluster = self.geo.cluster_size();
        let mut allocating = Vec::new();
        let mut pos = offset;
        while pos < end {
            let start = pos & !(cluster - 1);
            let next = (start + cluster).min(end);
            match self.mapping_at(pos) {
                Ok((Mapping::Data { copied: true, .. }, run)) if run >= next - pos => {}
                Ok(_) => {
                    // The rule `fill_new_cluster` follows: only a whole cluster, or one whose old
                    // contents read as zeroes, is written without copying (and syncing) old bytes.
                    if next - pos != cluster && !self.reads_as_zeroes(start).unwrap_or(false) {
                        return true;
                    }
                    allocating.push(start >> self.geo.cluster_bits);
                }
                Err(_) => return false,
            }
            pos = next;
        }
        let Some(&first) = allocating.first() else { return false };
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        if allocating.iter().any(|g| st.inflight.contains_key(g)) {
            return true;
        }
        // New L2 tables come out of the same reservation: count one per table touched.
        let last = allocating.last().copied().unwrap_or(first);
        let tables = last / self.geo.l2_entries() - first / self.geo.l2_entries() + 1;
        st.refcounts.reserved_left() < allocating.len() as u64 + tables
    }

    /// Write whole clusters starting at cluster-aligned `pos` (all in one L2 table). Writes the
    /// longest leading run it can in one go — in place if already allocated contiguously, or
    /// into freshly allocated contiguous clusters with one data `pwrite` and one L2 `pwrite` —
    /// and returns the bytes written (at least one cluster).
    fn write_run(&self, pos: u64, data: &[u8]) -> Result<usize> {
        let cs = self.geo.cluster_size();
        let k = data.len() as u64 / cs;
        let in_place = |i: u64| -> Result<Option<u64>> {
            Ok(match self.mapping_at(pos + i * cs)? {
                (Mapping::Data { host, copied: true }, run) if run >= cs => Some(host),
                _ => None,
            })
        };
        if let Some(host) = in_place(0)? {
            let mut n = 1;
            while n < k && in_place(n)? == Some(host + n * cs) {
                n += 1;
            }
            let bytes = data.get(..(n * cs) as usize).unwrap_or_default();
            self.write_data(bytes, host)?;
            return Ok(bytes.len());
        }
        let g0 = pos >> self.geo.cluster_bits;
        let mut st = self.state()?;
        let mut n = 0;
        while n < k && !st.inflight.contains_key(&(g0 + n)) && in_place(n)?.is_none() {
            n += 1;
        }
        if n == 0 {
            drop(st);
            self.write_cluster(pos, data.get(..cs as usize).unwrap_or_default())?;
            return Ok(cs as usize);
        }
        let (host, n) = st.refcounts.alloc_run(self.file(), n)?;
        let marker = Arc::new(InFlight::default());
        for g in g0..g0 + n {
            st.inflight.insert(g, Arc::clone(&marker));
        }
        drop(st);
        let bytes = data.get(..(n * cs) as usize).unwrap_or_default();
        let result = self.write_data(bytes, host).and_then(|()| {
            let mut st = self.state()?;
            self.set_run(&mut st, g0, n, host)
        });
        let mut st = self.state()?;
        for g in g0..g0 + n {
            st.inflight.remove(&g);
        }
        drop(st);
        marker.finish();
        result.map(|()| bytes.len())
    }

    /// Point guest clusters `g0..g0 + n` (in one L2 table) at host clusters `host..` with one
    /// L2 write, then release what they pointed at before.
    pub(crate) fn set_run(&self, st: &mut WriteState, g0: u64, n: u64, host: u64) -> Result<()> {
        let l2_offset = self.ensure_l2(st, g0)?;
        let l1_index = g0 / self.geo.l2_entries();
        let table = self.l2_table(l2_offset, l1_index)?;
        let ext = self.geo.extended_l2;
        let words = if ext { 2 } else { 1 };
        let first_word = ((g0 % self.geo.l2_entries()) * words) as usize;
        let cs = self.geo.cluster_size();
        let mut bytes = Vec::with_capacity((n * words * 8) as usize);
        let mut old = Vec::with_capacity(n as usize);
        for i in 0..n {
            let word = first_word + (i * words) as usize;
            old.push(table.get(word));
            let (entry, bitmap) = encode_entry(NewEntry::Data(host + i * cs), ext);
            bytes.extend_from_slice(&entry.to_be_bytes());
            if ext {
                bytes.extend_from_slice(&bitmap.to_be_bytes());
            }
        }
        let at = l2_offset + first_word as u64 * 8;
        self.file().write_all_at(&bytes, at).map_err(Error::io("write L2", at))?;
        for i in 0..n {
            let word = first_word + (i * words) as usize;
            let (entry, bitmap) = encode_entry(NewEntry::Data(host + i * cs), ext);
            table.set(word, entry);
            if ext {
                table.set(word + 1, bitmap);
            }
        }
        self.l2_table_changed(l2_offset, &table);
        for (i, old_entry) in old.into_iter().enumerate() {
            self.release_old(st, old_entry, g0 + i as u64, NewEntry::Data(host + i as u64 * cs))?;
        }
        Ok(())
    }

    pub(crate) fn check_write(&self, offset: u64, length: u64) -> Result<()> {
        if self.write_state.is_none() {
            return Err(Error::ReadOnly("the image was opened read-only"));
        }
        // Written again after a close: dropping the image must close it again.
        if self.closed.load(Ordering::Relaxed) {
            self.closed.store(false, Ordering::Release);
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, length, size: self.geo.size }),
        }
    }

    /// Write within one guest cluster.
    fn write_cluster(&self, pos: u64, chunk: &[u8]) -> Result<()> {
        let guest = pos >> self.geo.cluster_bits;
        loop {
            if let (Mapping::Data { host, copied: true }, run) = self.mapping_at(pos)? {
                if run >= chunk.len() as u64 {
                    return self.write_data(chunk, host);
                }
            }
            // Allocation path: become the allocator of this guest cluster, or wait for it.
            let mut st = self.state()?;
            if let Some(other) = st.inflight.get(&guest).cloned() {
                drop(st);
                other.wait();
                continue;
            }
            if let (Mapping::Data { copied: true, .. }, run) = self.mapping_at(pos)? {
                if run >= chunk.len() as u64 {
                    continue; // allocated meanwhile: write in place
                }
            }
            let marker = Arc::new(InFlight::default());
            st.inflight.insert(guest, Arc::clone(&marker));
            let host = st.refcounts.alloc(self.file());
            drop(st);
            let result =
                host.and_then(|host| self.fill_new_cluster(guest, pos, chunk, host).map(|()| host)).and_then(|host| {
                    let mut st = self.state()?;
                    self.set_entry(&mut st, guest, NewEntry::Data(host))
                });
            let mut st = self.state()?;
            st.inflight.remove(&guest);
            drop(st);
            marker.finish();
            return result;
        }
    }

    /// Assemble the new contents of guest cluster `guest` (old contents with `chunk` at `pos`
    /// laid over them) and write them at `host`.
    fn fill_new_cluster(&self, guest: u64, pos: u64, chunk: &[u8], host: u64) -> Result<()> {
        let cluster = self.geo.cluster_size();
        let start = guest << self.geo.cluster_bits;
        let within = (pos - start) as usize;
        if chunk.len() as u64 == cluster || self.reads_as_zeroes(start)? {
            // A fresh host cluster has never been written (the allocator only appends), so it
            // reads as zeroes already: when the old contents are zeroes too, only the new bytes
            // need writing.
            let at = host + within as u64;
            return self.write_data(chunk, at);
        }
        let mut buf = vec![0u8; cluster as usize];
        let valid = (self.geo.size - start).min(cluster) as usize;
        if let Some(old) = buf.get_mut(..valid) {
            self.read_at(old, start)?;
        }
        if let Some(dst) = buf.get_mut(within..within + chunk.len()) {
            dst.copy_from_slice(chunk);
        }
        self.write_data(&buf, host)?;
        // The new cluster carries bytes the guest wrote earlier (copied from the backing file or
        // a compressed cluster), maybe long since flushed: they must be durable before the L2
        // entry that stops pointing at their old home can be, or a crash would turn them into
        // zeroes. (A cluster holding only new bytes needs no barrier: losing an unflushed write
        // is allowed.)
        self.file().sync_data().map_err(Error::io("fdatasync", host))
    }

    /// Whether the whole guest cluster starting at `start` currently reads as zeroes by
    /// metadata alone (zero cluster, or unallocated with nothing underneath).
    pub(crate) fn reads_as_zeroes(&self, start: u64) -> Result<bool> {
        let (mapping, run) = self.mapping_at(start)?;
        let whole = run >= self.geo.cluster_size().min(self.geo.size - start);
        Ok(whole && (mapping == Mapping::Zero || (mapping == Mapping::Unallocated && !self.has_backing())))
    }

    /// The L2 table covering guest cluster `guest`, allocating it if needed. Returns its host
    /// offset. Caller holds the write state.
    pub(crate) fn ensure_l2(&self, st: &mut WriteState, guest: u64) -> Result<u64> {
        let l1_index = guest / self.geo.l2_entries();
        let entry = self.l1_entry(l1_index)?;
        let existing = layout::l1_entry_offset(entry, l1_index, self.geo.cluster_bits)?;
        if existing != 0 {
            return Ok(existing);
        }
        let table = st.refcounts.alloc(self.file())?;
        let zero = vec![0u8; self.geo.cluster_size() as usize];
        self.file().write_all_at(&zero, table).map_err(Error::io("write L2 table", table))?;
        let at = self.header.l1_table_offset + l1_index * 8;
        self.file().write_all_at(&(table | COPIED).to_be_bytes(), at).map_err(Error::io("write L1", at))?;
        if let Ok(mut l1) = self.l1.write() {
            if let Some(e) = l1.get_mut(l1_index as usize) {
                *e = table | COPIED;
            }
        }
        Ok(table)
    }

    /// Point guest cluster `guest` at `new`, then release what it pointed at before.
    fn set_entry(&self, st: &mut WriteState, guest: u64, new: NewEntry) -> Result<()> {
        let l2_offset = self.ensure_l2(st, guest)?;
        let l1_index = guest / self.geo.l2_entries();
        let l2_index = guest % self.geo.l2_entries();
        let table = self.l2_table(l2_offset, l1_index)?;
        let ext = self.geo.extended_l2;
        let word = if ext { (l2_index * 2) as usize } else { l2_index as usize };
        let old_entry = table.get(word);
        let (entry, bitmap) = encode_entry(new, ext);
        let mut bytes = entry.to_be_bytes().to_vec();
        if ext {
            bytes.extend_from_slice(&bitmap.to_be_bytes());
        }
        let at = l2_offset + word as u64 * 8;
        self.file().write_all_at(&bytes, at).map_err(Error::io("write L2", at))?;
        table.set(word, entry);
        if ext {
            table.set(word + 1, bitmap);
        }
        self.l2_table_changed(l2_offset, &table);
        self.release_old(st, old_entry, guest, new)
    }

    /// Release the host storage an old L2 entry pointed at, now that nothing points at it.
    fn release_old(&self, st: &mut WriteState, old_entry: u64, guest: u64, new: NewEntry) -> Result<()> {
        if old_entry & layout::COMPRESSED != 0 {
            if let (Mapping::Compressed { host, length }, _) = layout::map_l2_entry(&self.geo, old_entry, 0, guest, 0)?
            {
                st.refcounts.free(self.file(), host & !511, length + (host & 511))?;
            }
        } else {
            let old_host = old_entry & layout::OFFSET_MASK;
            if old_host != 0 && !matches!(new, NewEntry::Data(h) if h == old_host) {
                st.refcounts.free(self.file(), old_host, self.geo.cluster_size())?;
            }
        }
        Ok(())
    }

    /// Make `[offset, offset + length)` read as zeroes: whole clusters by metadata alone (zero
    /// flag, or nothing at all where nothing shows through), partial ones by writing zeroes.
    ///
    /// # Errors
    /// Read-only image, out of range, or I/O.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_write(offset, length)?;
        self.zero_or_discard(offset, length, false)
    }

    /// Discard `[offset, offset + length)`: whole clusters are freed (or, over a backing file,
    /// marked zero so the backing data does not show through); partial clusters are left alone,
    /// as discard is advisory.
    ///
    /// # Errors
    /// Read-only image, out of range, or I/O.
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.check_write(offset, length)?;
        self.zero_or_discard(offset, length, true)
    }

    fn zero_or_discard(&self, offset: u64, length: u64, discard: bool) -> Result<()> {
        let cluster = self.geo.cluster_size();
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let start = pos & !(cluster - 1);
            let cluster_end = (start + cluster).min(self.geo.size);
            let stop = end.min(cluster_end);
            let whole = pos == start && stop == cluster_end;
            if !whole {
                if !discard {
                    let zeroes = vec![0u8; (stop - pos) as usize];
                    self.write_at(&zeroes, pos)?;
                }
                pos = stop;
                continue;
            }
            let guest = start >> self.geo.cluster_bits;
            let (mapping, _) = self.mapping_at(start)?;
            let needs_zero_flag = self.has_backing();
            let target = if needs_zero_flag { NewEntry::Zero } else { NewEntry::Unallocated };
            let already = match mapping {
                Mapping::Zero => true,
                Mapping::Unallocated => !needs_zero_flag,
                _ => false,
            };
            if !already {
                if !self.geo.v3 && needs_zero_flag {
                    // Version 2 has no zero flag: write the zeroes.
                    let zeroes = vec![0u8; (stop - start) as usize];
                    self.write_at(&zeroes, start)?;
                } else {
                    let mut st = self.state()?;
                    while let Some(other) = st.inflight.get(&guest).cloned() {
                        drop(st);
                        other.wait();
                        st = self.state()?;
                    }
                    self.set_entry(&mut st, guest, target)?;
                }
            }
            pos = stop;
        }
        Ok(())
    }

    /// Make every completed write durable.
    ///
    /// # Errors
    /// `fdatasync` failed.
    pub fn flush(&self) -> Result<()> {
        if self.write_state.is_none() {
            return Ok(());
        }
        self.file().sync_data().map_err(Error::io("fdatasync", 0))
    }

    /// Flush and give back reserved but unused clusters, so `qemu-img check` finds no leaks.
    /// Nothing to do if it has run since the last write, or the image was just created and not
    /// written; the drop calls it otherwise. Call it yourself to see its errors, or to choose
    /// the thread that waits for the disk (an async service calls it off its runtime, then drops
    /// the image anywhere), once writes have stopped. The image stays usable: a later write
    /// reserves clusters again, and the drop closes once more.
    ///
    /// # Errors
    /// I/O while releasing or syncing.
    pub fn close(&self) -> Result<()> {
        if self.write_state.is_none() || self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.state()?;
        st.refcounts.release(self.file())?;
        let end = st.refcounts.end_of_clusters();
        drop(st);
        self.trim_grown_tail(end)?;
        self.file().sync_all().map_err(Error::io("fsync", 0))?;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
