//! L2 tables in memory, and the bounded cache that keeps them consistent with the writers.
//!
//! Writers change a cached table in place (under the image's write-state lock, after writing
//! the entry to the file); lookups that miss the cache read the table from the file without
//! that lock, so a table read while a writer is changing it may predate the change. Such a copy
//! must never take the place of the table the writer changed: acknowledged writes would read as
//! zeroes, and the next write to their clusters would allocate over them (seen once in ~40 NBD
//! copies into a fresh image with `--cache=none`: the first 256 KiB lost). So:
//!
//! - a table read from the file is cached only if none is cached meanwhile (the cached one is
//!   then used: it is at least as new) and no table left the cache while it was read (a
//!   writer's changes may have left with it); uncached, it still answers the lookup that read
//!   it, as of the moment it was read, which a concurrent read may see;
//! - a writer that changed a table makes it the cached one ([`L2Cache::changed`]), so a change
//!   made to a table that left the cache, or whose place a reader's older copy took, while the
//!   writer held it, is still what the next lookup sees.
//!
//! Lookups under the write-state lock (writers) read tables no writer is changing, so every
//! copy they read is current.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One L2 table in memory. Entries are atomics so the writer updates them in place (after the
/// on-disk entry is written) while readers holding the same table see the old or the new entry,
/// never a torn one; no table is ever cloned.
pub(crate) struct L2Table {
    words: Vec<AtomicU64>,
}

impl L2Table {
    pub(crate) fn from_bytes(raw: &[u8]) -> Self {
        Self {
            words: raw
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().unwrap_or_default())))
                .collect(),
        }
    }

    pub fn get(&self, word: usize) -> u64 {
        self.words.get(word).map(|w| w.load(Ordering::Acquire)).unwrap_or(0)
    }

    pub fn set(&self, word: usize, value: u64) {
        if let Some(w) = self.words.get(word) {
            w.store(value, Ordering::Release);
        }
    }
}

/// Where the cache stood when a lookup missed it and went to read the table from the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Miss {
    evictions: u64,
}

/// A bounded cache of L2 tables keyed by host offset, evicting the least recently used.
pub(crate) struct L2Cache {
    tables: HashMap<u64, (Arc<L2Table>, u64)>,
    tick: u64,
    capacity: usize,
    /// Tables evicted so far (see the module doc).
    evictions: u64,
}

impl L2Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { tables: HashMap::new(), tick: 0, capacity: capacity.max(1), evictions: 0 }
    }

    /// How many tables it keeps at most.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The table at `offset` if cached, or the [`Miss`] to hand to [`L2Cache::loaded`] with
    /// the table read from the file.
    pub(crate) fn lookup(&mut self, offset: u64) -> Result<Arc<L2Table>, Miss> {
        self.get(offset).ok_or(Miss { evictions: self.evictions })
    }

    /// The table at `offset` if cached.
    pub(crate) fn get(&mut self, offset: u64) -> Option<Arc<L2Table>> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            Arc::clone(t)
        })
    }

    /// `table` was read from the file after `miss`: the table to use, cached when that is safe
    /// (see the module doc).
    pub(crate) fn loaded(&mut self, offset: u64, table: Arc<L2Table>, miss: Miss) -> Arc<L2Table> {
        if let Some(cached) = self.get(offset) {
            return cached;
        }
        if self.evictions == miss.evictions {
            self.insert(offset, Arc::clone(&table));
        }
        table
    }

    /// A writer changed `table`, the one at `offset`: make it the cached one.
    pub(crate) fn changed(&mut self, offset: u64, table: &Arc<L2Table>) {
        match self.tables.get(&offset) {
            Some((cached, _)) if Arc::ptr_eq(cached, table) => {}
            _ => self.insert(offset, Arc::clone(table)),
        }
    }

    /// Cache `table` at `offset`, replacing any other, evicting the least recently used one
    /// when full.
    fn insert(&mut self, offset: u64, table: Arc<L2Table>) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            if let Some(oldest) = self.tables.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) {
                self.tables.remove(&oldest);
                self.evictions += 1;
            }
        }
        self.tick += 1;
        self.tables.insert(offset, (table, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of one entry holding `value` (as the file would, big-endian).
    fn table(value: u64) -> Arc<L2Table> {
        Arc::new(L2Table::from_bytes(&value.to_be_bytes()))
    }

    #[test]
    fn a_copy_read_before_a_writer_cached_its_table_does_not_replace_it() {
        let mut cache = L2Cache::new(4);
        // A reader misses and reads the table (entry 0: unallocated) from the file...
        let Err(miss) = cache.lookup(0x10000) else { panic!("nothing is cached yet") };
        let stale = table(0);
        // ...meanwhile a writer misses too, reads, caches, and points the entry at a cluster.
        let Err(writer_miss) = cache.lookup(0x10000) else { panic!("still not cached") };
        let current = cache.loaded(0x10000, table(0), writer_miss);
        current.set(0, 0x8000_0000_0005_0000);
        cache.changed(0x10000, &current);
        // The reader's copy arrives last: the writer's table is used and stays cached.
        let used = cache.loaded(0x10000, stale, miss);
        assert!(Arc::ptr_eq(&used, &current));
        assert_eq!(cache.get(0x10000).map(|t| t.get(0)), Some(0x8000_0000_0005_0000));
    }

    #[test]
    fn a_copy_read_while_a_table_left_the_cache_answers_once_and_is_not_cached() {
        let mut cache = L2Cache::new(2);
        let Err(miss) = cache.lookup(0x10000) else { panic!("nothing is cached yet") };
        // While it is read, a writer changes the table and it is evicted by two others.
        let Err(m) = cache.lookup(0x10000) else { panic!("not cached") };
        let changed = cache.loaded(0x10000, table(0), m);
        changed.set(0, 7);
        cache.changed(0x10000, &changed);
        for offset in [0x20000, 0x30000] {
            let Err(m) = cache.lookup(offset) else { panic!("not cached") };
            cache.loaded(offset, table(0), m);
        }
        assert!(cache.get(0x10000).is_none(), "evicted");
        // The copy (older than the change) is used by its own lookup but not cached, so the
        // next lookup reads the file again and finds the change there.
        let used = cache.loaded(0x10000, table(0), miss);
        assert_eq!(used.get(0), 0);
        assert!(cache.get(0x10000).is_none(), "a copy that may predate a change is not cached");
    }

    #[test]
    fn a_writers_change_takes_the_place_of_an_older_copy() {
        let mut cache = L2Cache::new(4);
        // The writer holds a table that left the cache; a reader's copy from before the change
        // got cached in its place.
        let held = table(0);
        let Err(miss) = cache.lookup(0x10000) else { panic!("nothing is cached yet") };
        cache.loaded(0x10000, table(0), miss);
        held.set(0, 9);
        cache.changed(0x10000, &held);
        assert!(cache.get(0x10000).is_some_and(|t| Arc::ptr_eq(&t, &held) && t.get(0) == 9));
    }

    #[test]
    fn the_least_recently_used_table_leaves_first() {
        let mut cache = L2Cache::new(2);
        for offset in [1, 2] {
            let Err(m) = cache.lookup(offset) else { panic!("not cached") };
            cache.loaded(offset, table(offset), m);
        }
        assert!(cache.get(1).is_some()); // 2 is now the least recently used
        let Err(m) = cache.lookup(3) else { panic!("not cached") };
        cache.loaded(3, table(3), m);
        assert!(cache.get(2).is_none() && cache.get(1).is_some() && cache.get(3).is_some());
    }
}
