//! The live-block table: address → (size, stack, allocation time) for every
//! block allocated and not yet freed, the largest thing memtrace holds.
//!
//! Three choices keep it small, because a process can hold millions of blocks:
//! - an entry is 24 bytes (address, 32-bit size, stack id, time): sizes of
//!   4 GiB and more are rare, so they live exactly in a side map;
//! - the table is split into [`SHARDS`] hash tables that grow one at a time,
//!   so a resize copies about 1/64 of the blocks instead of all of them (the
//!   peak is the table plus one shard, not the old and new arrays side by
//!   side);
//! - the shards take unequal shares of the addresses, spread evenly in
//!   log scale over a factor of two, so they reach hashbrown's power-of-two
//!   thresholds at different moments. Equal shards would all double at once,
//!   and just past that point the whole table would sit at 44% load; staggered
//!   ones sit between 44% and 87.5% load spread evenly in log scale, about
//!   63% on average, whatever the number of blocks.
//!
//! It only stores blocks; what a block means is the aggregator's.

use std::hash::BuildHasher;
use std::sync::LazyLock;

use hashbrown::HashTable;

/// Number of independently growing tables.
const SHARDS: usize = 64;

/// Slots of the routing table; a slot's shard takes its share of addresses.
const SLOTS: usize = 4096;

/// Shard of each slot: shard `i` owns a number of slots proportional to
/// 2^(i/64), so shard sizes are spread evenly in log scale over one octave.
static ROUTE: LazyLock<[u8; SLOTS]> = LazyLock::new(|| {
    let weight = |i: usize| (i as f64 / SHARDS as f64).exp2();
    let total: f64 = (0..SHARDS).map(weight).sum();
    let mut route = [0u8; SLOTS];
    let (mut start, mut cumulative) = (0, 0.0);
    for shard in 0..SHARDS {
        cumulative += weight(shard);
        let end = ((cumulative / total) * SLOTS as f64).round() as usize;
        route[start..end.min(SLOTS)].fill(shard as u8);
        start = end;
    }
    route
});

/// Marks a size too large for 32 bits; the real one is in `LiveBlocks::big`.
const BIG: u32 = u32::MAX;

/// One live block, as the aggregator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Bytes requested.
    pub size: u64,
    /// Interned stack (or the aggregator's marker for filtered blocks).
    pub stack: u32,
    /// When it was allocated (ns).
    pub ts_ns: u64,
}

/// A block as stored: 24 bytes with its address.
#[derive(Clone, Copy, Debug)]
struct Entry24 {
    addr: u64,
    size: u32,
    stack: u32,
    ts_ns: u64,
}

/// Live blocks by address.
#[derive(Debug, Default)]
pub struct LiveBlocks {
    shards: Vec<HashTable<Entry24>>,
    /// Exact sizes of blocks whose size does not fit in 32 bits.
    big: hashbrown::HashMap<u64, u64>,
    hasher: hashbrown::DefaultHashBuilder,
    len: usize,
}

impl LiveBlocks {
    /// An empty table (allocates nothing until the first insert).
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The shard of `addr` and its hash. The slot comes from the middle
    /// bits: hashbrown places entries by the low bits and tags them with the
    /// top 7, so taking either would leave each shard's entries crowded.
    fn locate(&self, addr: u64) -> (usize, u64) {
        let hash = self.hasher.hash_one(addr);
        (ROUTE[(hash >> 32) as usize % SLOTS] as usize, hash)
    }

    fn unpack(&self, e: &Entry24) -> Block {
        let size = if e.size == BIG {
            self.big[&e.addr]
        } else {
            u64::from(e.size)
        };
        Block {
            size,
            stack: e.stack,
            ts_ns: e.ts_ns,
        }
    }

    /// The block at `addr`, if live.
    pub fn get(&self, addr: u64) -> Option<Block> {
        let (shard, hash) = self.locate(addr);
        self.shards
            .get(shard)?
            .find(hash, |e| e.addr == addr)
            .map(|e| self.unpack(e))
    }

    /// Adds the block at `addr`, which must not be live: the aggregator
    /// takes a block it did not see freed out first, to count it (one lookup
    /// per allocation instead of two).
    pub fn insert(&mut self, addr: u64, block: Block) {
        debug_assert!(self.get(addr).is_none(), "{addr:#x} is already live");
        let (shard, hash) = self.locate(addr);
        if self.shards.is_empty() {
            self.shards.resize_with(SHARDS, HashTable::new);
        }
        let size = match u32::try_from(block.size) {
            Ok(s) if s != BIG => s,
            _ => {
                self.big.insert(addr, block.size);
                BIG
            }
        };
        let hasher = &self.hasher;
        self.shards[shard].insert_unique(
            hash,
            Entry24 {
                addr,
                size,
                stack: block.stack,
                ts_ns: block.ts_ns,
            },
            |e| hasher.hash_one(e.addr),
        );
        self.len += 1;
    }

    /// Takes the block at `addr` out, if live.
    pub fn remove(&mut self, addr: u64) -> Option<Block> {
        let (shard, hash) = self.locate(addr);
        let table = self.shards.get_mut(shard)?;
        // `find_entry`, not `entry`: the latter reserves room for an insert.
        let (e, _) = table.find_entry(hash, |e| e.addr == addr).ok()?.remove();
        self.len -= 1;
        let size = if e.size == BIG {
            self.big
                .remove(&addr)
                .expect("a block marked big has its size in the side map")
        } else {
            u64::from(e.size)
        };
        Some(Block {
            size,
            stack: e.stack,
            ts_ns: e.ts_ns,
        })
    }

    /// Every live block with its address, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Block)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.iter())
            .map(|e| (e.addr, self.unpack(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size: u64, stack: u32) -> Block {
        Block {
            size,
            stack,
            ts_ns: 7,
        }
    }

    #[test]
    fn holds_removes_and_replaces_blocks() {
        let mut live = LiveBlocks::new();
        assert_eq!(live.remove(0x1000), None);
        for i in 0..10_000u64 {
            live.insert(0x1000 + 16 * i, block(i, i as u32));
        }
        assert_eq!(live.len(), 10_000);
        assert_eq!(live.get(0x1000 + 16 * 42), Some(block(42, 42)));
        assert_eq!(live.remove(0x1000 + 16 * 42), Some(block(42, 42)));
        live.insert(0x1000 + 16 * 42, block(1, 1));
        assert_eq!(live.len(), 10_000);
        assert_eq!(live.remove(0x1000 + 16 * 42), Some(block(1, 1)));
        assert_eq!(live.get(0x1000 + 16 * 42), None);
        assert_eq!(live.len(), 9_999);
        let sum: u64 = live.iter().map(|(_, b)| b.size).sum();
        assert_eq!(sum, (0..10_000u64).sum::<u64>() - 42);
    }

    #[test]
    fn sizes_beyond_32_bits_stay_exact() {
        let mut live = LiveBlocks::new();
        for size in [u64::from(u32::MAX), 1 << 40, u64::MAX] {
            live.insert(size, block(size, 3));
            assert_eq!(live.get(size).map(|b| b.size), Some(size));
        }
        live.remove(u64::MAX);
        live.insert(u64::MAX, block(5, 3));
        assert_eq!(live.get(u64::MAX).map(|b| b.size), Some(5));
        assert_eq!(live.remove(1 << 40).map(|b| b.size), Some(1 << 40));
        assert_eq!(live.big.len(), 1, "only u32::MAX's block is still big");
    }

    #[test]
    fn lookups_of_absent_addresses_leave_the_table_intact() {
        let mut live = LiveBlocks::new();
        for i in 0..50_000u64 {
            live.insert(16 * i, block(i, 0));
            assert_eq!(live.remove(16 * i + 8), None);
            assert_eq!(live.get(16 * i + 8), None);
        }
        assert!((0..50_000u64).all(|i| live.get(16 * i) == Some(block(i, 0))));
    }

    #[test]
    fn every_shard_owns_slots_and_the_largest_about_twice_the_smallest() {
        let mut owned = [0usize; SHARDS];
        for &s in ROUTE.iter() {
            owned[s as usize] += 1;
        }
        let (lo, hi) = (owned[0], owned[SHARDS - 1]);
        assert!(owned.windows(2).all(|w| w[0] <= w[1] + 1), "{owned:?}");
        assert!(
            (40..=50).contains(&lo) && (85..=95).contains(&hi),
            "{lo} {hi}"
        );
    }

    #[test]
    fn an_entry_is_24_bytes() {
        assert_eq!(size_of::<Entry24>(), 24);
    }
}
