//! The aggregator: [`Event`]s in, per-process and per-stack accounting out.
//!
//! Pure by design: no clock, no `/proc`, no BPF, no threads. Time comes from
//! the events' timestamps or from the caller, so every report can be
//! reproduced from a sequence of events, and tests need no root.
//!
//! What it keeps, per process instance (a pid plus its lifetime; a pid seen
//! again after its exit starts a new instance):
//! - every live block: address → size, stack, allocation time;
//! - per distinct stack (interned raw return addresses): live, total and
//!   freed bytes and counts;
//! - what it could not attribute: frees of addresses it never saw allocated
//!   (allocated before tracing began, double frees, lost records) and blocks
//!   handed out again before their free was seen.
//!
//! It does not symbolize, filter stacks for display or sort: see `report`.

use std::collections::HashMap;

use std::hash::BuildHasher;

use hdrhistogram::Histogram;

use memtrace_common::KmemOp;

use crate::dist::Compact;
use crate::event::{Alloc, Event};
use crate::live::{Block, LiveBlocks};
use crate::mem::{Memory, NewKind};

/// Index of an interned stack within its process.
pub type StackId = u32;

/// Marks a block outside the size filter: remembered, so its free is known,
/// but counted nowhere.
const FILTERED: StackId = StackId::MAX;

/// Which allocations count (`--min-size`, `--max-size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeFilter {
    /// Smallest size that counts.
    pub min: u64,
    /// Largest size that counts.
    pub max: u64,
}

impl Default for SizeFilter {
    fn default() -> Self {
        Self {
            min: 0,
            max: u64::MAX,
        }
    }
}

impl SizeFilter {
    fn admits(&self, size: u64) -> bool {
        (self.min..=self.max).contains(&size)
    }
}

/// What the aggregator counts, beyond plain bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which allocations count.
    pub filter: SizeFilter,
    /// Blocks freed within this many ns of their allocation are
    /// "temporary" (`--temporary-ms`).
    pub temporary_ns: u64,
    /// One page fault in this many carries a stack (`--fault-sample`);
    /// sampled faults stand for this many each.
    pub fault_sample: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            filter: SizeFilter::default(),
            temporary_ns: 1_000_000,
            fault_sample: DEFAULT_FAULT_SAMPLE,
        }
    }
}

/// Default of `--fault-sample`: a stack costs about a microsecond, a fault
/// that zeroes a page a few; one in 32 keeps the added cost in the noise.
pub const DEFAULT_FAULT_SAMPLE: u32 = 32;

/// Precision of per-process histograms (significant decimal digits).
const PROCESS_SIGFIG: u8 = 3;

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new(sigfig).expect("2 or 3 significant digits is a valid precision")
}

/// Byte and block counts of one stack or one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes allocated and not yet freed.
    pub live_bytes: u64,
    /// Blocks allocated and not yet freed.
    pub live_count: u64,
    /// Bytes allocated since tracing began.
    pub total_bytes: u64,
    /// Blocks allocated since tracing began.
    pub total_count: u64,
    /// Bytes freed (of blocks allocated while traced).
    pub freed_bytes: u64,
    /// Blocks freed (of blocks allocated while traced).
    pub freed_count: u64,
}

impl Stats {
    pub(crate) fn alloc(&mut self, size: u64) {
        self.live_bytes += size;
        self.live_count += 1;
        self.total_bytes += size;
        self.total_count += 1;
    }

    pub(crate) fn free(&mut self, size: u64) {
        self.live_bytes -= size;
        self.live_count -= 1;
        self.freed_bytes += size;
        self.freed_count += 1;
    }
}

/// Allocations freed soon after they were made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Temporary {
    /// Blocks freed within the threshold.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Distributions of one stack or process: sizes of the allocations counted,
/// and lifetimes (ns from allocation to free) of those freed.
#[derive(Clone, Debug)]
pub struct Distributions {
    /// Allocation sizes, bytes.
    pub sizes: Histogram<u64>,
    /// Lifetimes of freed blocks, ns.
    pub lifetimes: Histogram<u64>,
}

impl Distributions {
    fn new(sigfig: u8) -> Self {
        Self {
            sizes: histogram(sigfig),
            lifetimes: histogram(sigfig),
        }
    }
}

/// One stack of a process and its accounting.
#[derive(Debug)]
pub struct StackStats {
    /// Its return addresses, innermost first, as indices into the
    /// process's table of distinct addresses ([`Process::frames`] gives
    /// them back): a process has few distinct return addresses and may have
    /// hundreds of thousands of stacks, so half the bytes.
    frames: Box<[u32]>,
    /// Hash of the raw addresses, kept for the id table's resizes.
    hash: u64,
    /// Its accounting.
    pub stats: Stats,
    /// Blocks from here freed within the temporary threshold.
    pub temporary: Temporary,
    /// Size and lifetime distributions (compact while small: a process
    /// may have hundreds of thousands of stacks).
    pub dist: StackDistributions,
}

/// Size and lifetime distributions of one stack, to 2 significant digits
/// (1% buckets).
#[derive(Clone, Debug, Default)]
pub struct StackDistributions {
    /// Allocation sizes, bytes.
    pub sizes: Compact<2>,
    /// Lifetimes of freed blocks, ns.
    pub lifetimes: Compact<2>,
}

/// The high-water mark of a process's live bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peak {
    /// Live bytes at the peak.
    pub bytes: u64,
    /// Live blocks at the peak.
    pub count: u64,
    /// When it was first reached.
    pub ts_ns: u64,
    /// Live (bytes, blocks) of each stack at that moment, by [`StackId`]
    /// (stacks interned later held nothing then). Taken lazily, just before
    /// the first decrease after the peak; while `pending`, the peak is now.
    stacks: Vec<(u64, u64)>,
    pending: bool,
}

/// Live bytes over time, at a resolution that halves whenever the series
/// would outgrow [`TIMELINE_POINTS`], so memory stays bounded however long
/// the trace.
#[derive(Clone, Debug)]
pub struct Timeline {
    /// Width of one point, ns.
    pub step_ns: u64,
    /// Start of the first point (the process's first event).
    pub start_ns: u64,
    /// Per point: highest live bytes within it, and live bytes at its end.
    /// A point with no event repeats the previous end.
    pub points: Vec<(u64, u64)>,
    /// Per point, the same for resident bytes (file + anon + shmem); `None`
    /// before the kernel side first reported them.
    pub resident: Vec<Option<(u64, u64)>>,
}

/// Most points kept per process timeline.
pub const TIMELINE_POINTS: usize = 1024;

impl Timeline {
    fn new(start_ns: u64) -> Self {
        Self {
            step_ns: 1_000_000,
            start_ns,
            points: Vec::new(),
            resident: Vec::new(),
        }
    }

    /// Records live heap bytes and, when known, resident bytes at `ts_ns`.
    fn record(&mut self, ts_ns: u64, live: u64, resident: Option<u64>) {
        let mut index = (ts_ns.saturating_sub(self.start_ns) / self.step_ns) as usize;
        while index >= TIMELINE_POINTS {
            self.coarsen();
            index = (ts_ns.saturating_sub(self.start_ns) / self.step_ns) as usize;
        }
        // Records from other CPUs arrive slightly out of order: one that
        // belongs to an earlier point lands in the current one.
        let index = index.max(self.points.len().saturating_sub(1));
        let last = self.points.last().map_or(0, |p| p.1);
        self.points.resize(index + 1, (last, last));
        let p = &mut self.points[index];
        p.0 = p.0.max(live);
        p.1 = live;
        let last = self.resident.last().copied().flatten().map(|p| (p.1, p.1));
        self.resident.resize(index + 1, last);
        if let Some(rss) = resident {
            let p = self.resident[index].get_or_insert((rss, rss));
            p.0 = p.0.max(rss);
            p.1 = rss;
        }
    }

    fn coarsen(&mut self) {
        self.step_ns *= 2;
        self.points = self
            .points
            .chunks(2)
            .map(|c| (c.iter().map(|p| p.0).max().unwrap_or(0), c[c.len() - 1].1))
            .collect();
        self.resident = self
            .resident
            .chunks(2)
            .map(|c| {
                let known = c.iter().flatten();
                let max = known.clone().map(|p| p.0).max()?;
                Some((max, known.last()?.1))
            })
            .collect();
    }
}

/// Accounting of one process instance.
#[derive(Debug)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// The process that created it, when it was followed from its fork
    /// (`--follow-forks`).
    pub parent: Option<u32>,
    /// Time of its first event.
    pub first_ts_ns: u64,
    /// Time of its exit, once seen.
    pub exit_ts_ns: Option<u64>,
    /// Whole-process accounting (allocations inside the size filter).
    pub totals: Stats,
    /// Frees of addresses not known to be live.
    pub unknown_frees: u64,
    /// Blocks handed out again by the allocator before their free was seen.
    pub missed_frees: u64,
    /// Size and lifetime distributions (3 significant digits).
    pub dist: Distributions,
    /// Exact smallest and largest size counted (the histogram rounds).
    pub size_range: Option<(u64, u64)>,
    /// Blocks freed within the temporary threshold.
    pub temporary: Temporary,
    /// High-water mark of live bytes.
    pub peak: Peak,
    /// Live bytes over time.
    pub timeline: Timeline,
    /// Time of the last event.
    pub last_ts_ns: u64,
    /// What the kernel side reported: RSS, mappings, faults, kernel memory.
    pub mem: Memory,
    /// Live blocks by address.
    live: LiveBlocks,
    stacks: Vec<StackStats>,
    /// Ids of `stacks` by their frames, which live only in `stacks`.
    stack_ids: hashbrown::HashTable<StackId>,
    /// Distinct return addresses of this process's stacks, and their index.
    addrs: Vec<u64>,
    addr_ids: hashbrown::HashMap<u64, u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl Process {
    fn new(pid: u32, ts_ns: u64) -> Self {
        Self {
            pid,
            parent: None,
            first_ts_ns: ts_ns,
            exit_ts_ns: None,
            totals: Stats::default(),
            unknown_frees: 0,
            missed_frees: 0,
            dist: Distributions::new(PROCESS_SIGFIG),
            size_range: None,
            temporary: Temporary::default(),
            peak: Peak::default(),
            timeline: Timeline::new(ts_ns),
            last_ts_ns: ts_ns,
            mem: Memory::default(),
            live: LiveBlocks::new(),
            stacks: Vec::new(),
            stack_ids: hashbrown::HashTable::new(),
            addrs: Vec::new(),
            addr_ids: hashbrown::HashMap::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// Every stack seen, indexed by [`StackId`].
    pub fn stacks(&self) -> &[StackStats] {
        &self.stacks
    }

    /// The raw return addresses of a stack, innermost first.
    pub fn frames(&self, id: StackId) -> Vec<u64> {
        self.stacks[id as usize]
            .frames
            .iter()
            .map(|&i| self.addrs[i as usize])
            .collect()
    }

    /// Live (bytes, blocks) of each stack at the peak, by [`StackId`].
    pub fn peak_stacks(&self) -> std::borrow::Cow<'_, [(u64, u64)]> {
        if self.peak.pending {
            self.current_live().into()
        } else {
            (&self.peak.stacks[..]).into()
        }
    }

    fn current_live(&self) -> Vec<(u64, u64)> {
        self.stacks
            .iter()
            .map(|s| (s.stats.live_bytes, s.stats.live_count))
            .collect()
    }

    /// Live bytes and counts per stack for blocks allocated at or before
    /// `cutoff_ns` only (`--older-than`); other fields are zero.
    pub fn live_older_than(&self, cutoff_ns: u64) -> HashMap<StackId, Stats> {
        let mut out: HashMap<StackId, Stats> = HashMap::new();
        for (_, b) in self.live.iter() {
            if b.stack != FILTERED && b.ts_ns <= cutoff_ns {
                let s = out.entry(b.stack).or_default();
                s.live_bytes += b.size;
                s.live_count += 1;
            }
        }
        out
    }

    fn intern(&mut self, frames: &[u64]) -> (StackId, bool) {
        let hash = self.hasher.hash_one(frames);
        let (stacks, addrs) = (&self.stacks, &self.addrs);
        let same = |id: &StackId| {
            let known = &stacks[*id as usize].frames;
            known.len() == frames.len()
                && known
                    .iter()
                    .zip(frames)
                    .all(|(&i, &addr)| addrs[i as usize] == addr)
        };
        if let Some(&id) = self.stack_ids.find(hash, same) {
            return (id, false);
        }
        let indices = frames
            .iter()
            .map(|&addr| {
                *self.addr_ids.entry(addr).or_insert_with(|| {
                    self.addrs.push(addr);
                    (self.addrs.len() - 1) as u32
                })
            })
            .collect();
        let id = self.stacks.len() as StackId;
        self.stacks.push(StackStats {
            frames: indices,
            hash,
            stats: Stats::default(),
            temporary: Temporary::default(),
            dist: StackDistributions::default(),
        });
        let stacks = &self.stacks;
        self.stack_ids
            .insert_unique(hash, id, |&id| stacks[id as usize].hash);
        (id, true)
    }

    /// Takes a block out of the accounting; `freed_at` is the time of its
    /// free, `None` when the free itself was missed (lifetime unknown).
    fn release(&mut self, block: Block, freed_at: Option<u64>, temporary_ns: u64) {
        if block.stack == FILTERED {
            return;
        }
        if self.peak.pending {
            // The first decrease after a new high-water mark: this moment
            // is the peak, so keep its breakdown.
            self.peak.stacks = self.current_live();
            self.peak.pending = false;
        }
        self.totals.free(block.size);
        let stack = &mut self.stacks[block.stack as usize];
        stack.stats.free(block.size);
        if let Some(ts) = freed_at {
            let lifetime = ts.saturating_sub(block.ts_ns);
            stack.dist.lifetimes.record(lifetime);
            let _ = self.dist.lifetimes.record(lifetime);
            if lifetime <= temporary_ns {
                for t in [&mut stack.temporary, &mut self.temporary] {
                    t.count += 1;
                    t.bytes += block.size;
                }
            }
        }
    }

    fn free(&mut self, addr: u64, ts_ns: u64, temporary_ns: u64) {
        match self.live.remove(addr) {
            Some(block) => self.release(block, Some(ts_ns), temporary_ns),
            None => self.unknown_frees += 1,
        }
    }

    fn tick(&mut self, ts_ns: u64) {
        self.last_ts_ns = self.last_ts_ns.max(ts_ns);
        let resident = self.mem.has_rss().then(|| self.mem.resident());
        self.timeline
            .record(ts_ns, self.totals.live_bytes, resident);
    }

    /// Every live block counted: (address, bytes).
    pub fn live_blocks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.live
            .iter()
            .filter(|(_, b)| b.stack != FILTERED)
            .map(|(a, b)| (a, b.size))
    }

    /// Why this process's allocated and resident memory differ, now (or at
    /// its exit).
    pub fn explain(&self) -> crate::mem::Explanation {
        crate::mem::explain(&self.mem, self.live_blocks(), self.totals.live_bytes)
    }

    fn alloc(&mut self, a: &Alloc, config: &Config) -> Option<StackId> {
        let filter = &config.filter;
        let temporary_ns = config.temporary_ns;
        if let Some(old) = a.old_addr {
            match self.live.get(old) {
                // A block at `old` allocated after this realloc began belongs
                // to another thread: the allocator handed `old` out again
                // after the realloc released it, and that allocation's
                // record overtook ours. Its arrival already released our old
                // block and counted a missed free, which this explains.
                Some(b) if b.ts_ns > a.entry_ts_ns && old != a.addr => {
                    self.missed_frees = self.missed_frees.saturating_sub(1);
                }
                _ => self.free(old, a.ts_ns, temporary_ns),
            }
        }
        if let Some(prev) = self.live.remove(a.addr) {
            self.missed_frees += 1;
            self.release(prev, None, temporary_ns);
        }
        let (stack, new) = if filter.admits(a.size) {
            let (id, new) = self.intern(&a.stack);
            self.totals.alloc(a.size);
            // An auto-resizing histogram takes any u64.
            let _ = self.dist.sizes.record(a.size);
            let (lo, hi) = self.size_range.unwrap_or((a.size, a.size));
            self.size_range = Some((lo.min(a.size), hi.max(a.size)));
            let stack = &mut self.stacks[id as usize];
            stack.stats.alloc(a.size);
            stack.dist.sizes.record(a.size);
            if self.totals.live_bytes > self.peak.bytes {
                self.peak.bytes = self.totals.live_bytes;
                self.peak.count = self.totals.live_count;
                self.peak.ts_ns = a.ts_ns;
                self.peak.pending = true;
            }
            (id, new)
        } else {
            (FILTERED, false)
        };
        self.live.insert(
            a.addr,
            Block {
                size: a.size,
                stack,
                ts_ns: a.ts_ns,
            },
        );
        new.then_some(stack)
    }
}

/// A stack seen for the first time: the moment to resolve its addresses,
/// while the process is still alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewStack {
    /// Process id.
    pub pid: u32,
    /// The stack within its table.
    pub stack: StackId,
    /// Which table: `None` for heap stacks, else one of the kernel side's.
    pub kind: Option<NewKind>,
}

/// All processes' accounting.
#[derive(Debug, Default)]
pub struct Aggregator {
    config: Config,
    running: hashbrown::HashMap<u32, Process>,
    exited: Vec<Process>,
}

impl Aggregator {
    /// An empty aggregator.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// What it counts.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies one event. Returns the stack it interned, if it is new.
    pub fn on_event(&mut self, event: &Event) -> Option<NewStack> {
        let ts = event.ts_ns();
        match event {
            Event::Alloc(a) => {
                let config = self.config;
                let p = self.process(a.pid, ts);
                let stack = p.alloc(a, &config);
                p.tick(ts);
                Some(NewStack {
                    pid: a.pid,
                    stack: stack?,
                    kind: None,
                })
            }
            Event::Rss(r) => {
                let p = self.process(r.pid, ts);
                let new = p.mem.on_rss(r);
                p.tick(ts);
                Self::new_stack(r.pid, new, NewKind::Fault)
            }
            Event::Vm(v) => {
                let p = self.process(v.pid, ts);
                let new = p.mem.on_vm(v);
                p.tick(ts);
                Self::new_stack(v.pid, new, NewKind::Map)
            }
            // A process's kernel objects are freed as it exits (its files,
            // sockets, pipes): the report keeps what it held at its exit.
            Event::Kmem(k) if k.op == KmemOp::Free && !self.running.contains_key(&k.pid) => None,
            Event::Kmem(k) => {
                let p = self.process(k.pid, ts);
                let new = p.mem.on_kmem(k);
                p.tick(ts);
                Self::new_stack(k.pid, new, NewKind::Kernel)
            }
            Event::Oom(o) => {
                let p = self.process(o.pid, ts);
                p.mem.oom = Some(*o);
                p.tick(ts);
                None
            }
            Event::Exec { pid, .. } => {
                let p = self.process(*pid, ts);
                p.mem.on_exec();
                p.tick(ts);
                None
            }
            Event::Free { pid, addr, .. } => {
                let temporary_ns = self.config.temporary_ns;
                let p = self.process(*pid, ts);
                p.free(*addr, ts, temporary_ns);
                p.tick(ts);
                None
            }
            Event::Exit { pid, ts_ns } => {
                self.close(*pid, *ts_ns);
                None
            }
            // A control event for the session; nothing to account.
            Event::Loaded { .. } => None,
            Event::Fork {
                pid, parent, ts_ns, ..
            } => {
                // A new process with this pid: one still running under it
                // has exited unseen (its exit record lost).
                self.close(*pid, *ts_ns);
                let p = self.process(*pid, *ts_ns);
                p.parent = Some(*parent);
                None
            }
        }
    }

    fn new_stack(pid: u32, stack: Option<u32>, kind: NewKind) -> Option<NewStack> {
        Some(NewStack {
            pid,
            stack: stack?,
            kind: Some(kind),
        })
    }

    /// Ends the running instance of `pid`, if any.
    fn close(&mut self, pid: u32, ts_ns: u64) {
        if let Some(mut p) = self.running.remove(&pid) {
            p.tick(ts_ns);
            p.exit_ts_ns = Some(ts_ns);
            self.exited.push(p);
        }
    }

    fn process(&mut self, pid: u32, ts: u64) -> &mut Process {
        self.running
            .entry(pid)
            .or_insert_with(|| Process::new(pid, ts))
    }

    /// The running process instance with this pid.
    pub fn running(&self, pid: u32) -> Option<&Process> {
        self.running.get(&pid)
    }

    /// Every process instance, running and exited.
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.exited.iter().chain(self.running.values())
    }

    /// Whether the process with this pid has exited (and not come back).
    pub fn has_exited(&self, pid: u32) -> bool {
        !self.running.contains_key(&pid) && self.exited.iter().any(|p| p.pid == pid)
    }

    /// Unknown frees summed over all processes.
    pub fn unknown_frees(&self) -> u64 {
        self.processes().map(|p| p.unknown_frees).sum()
    }

    /// Missed frees summed over all processes.
    pub fn missed_frees(&self) -> u64 {
        self.processes().map(|p| p.missed_frees).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::AllocFn;

    pub(super) const PID: u32 = 100;

    pub(super) fn malloc(ts: u64, addr: u64, size: u64, stack: &[u64]) -> Event {
        Event::Alloc(Alloc {
            pid: PID,
            tid: PID,
            ts_ns: ts,
            entry_ts_ns: ts - 1,
            addr,
            size,
            func: AllocFn::Malloc,
            old_addr: None,
            stack: stack.to_vec(),
            sample_shift: 0,
        })
    }

    pub(super) fn realloc(ts: u64, old: u64, addr: u64, size: u64, stack: &[u64]) -> Event {
        Event::Alloc(Alloc {
            pid: PID,
            tid: PID,
            ts_ns: ts,
            entry_ts_ns: ts - 5,
            addr,
            size,
            func: AllocFn::Realloc,
            old_addr: Some(old),
            stack: stack.to_vec(),
            sample_shift: 0,
        })
    }

    pub(super) fn free(ts: u64, addr: u64) -> Event {
        Event::Free {
            pid: PID,
            ts_ns: ts,
            addr,
        }
    }

    fn run(events: &[Event]) -> Aggregator {
        let mut agg = Aggregator::new(Config::default());
        for e in events {
            agg.on_event(e);
        }
        agg
    }

    fn stats(live_bytes: u64, live_count: u64, total_bytes: u64, total_count: u64) -> Stats {
        Stats {
            live_bytes,
            live_count,
            total_bytes,
            total_count,
            freed_bytes: total_bytes - live_bytes,
            freed_count: total_count - live_count,
        }
    }

    #[test]
    fn allocations_and_frees_per_stack() {
        let agg = run(&[
            malloc(10, 0xa, 100, &[1, 2]),
            malloc(11, 0xb, 50, &[1, 2]),
            malloc(12, 0xc, 7, &[3]),
            free(13, 0xa),
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.stacks().len(), 2);
        assert_eq!(p.stacks()[0].stats, stats(50, 1, 150, 2));
        assert_eq!(p.stacks()[1].stats, stats(7, 1, 7, 1));
        assert_eq!(p.totals, stats(57, 2, 157, 3));
        assert_eq!(p.unknown_frees, 0);
    }

    #[test]
    fn realloc_chain_moves_bytes_between_stacks() {
        let agg = run(&[
            malloc(10, 0xa, 100, &[1]),
            realloc(20, 0xa, 0xb, 300, &[2]),
            realloc(30, 0xb, 0xb, 400, &[3]),
            realloc(40, 0xb, 0xc, 10, &[3]),
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.stacks()[0].stats, stats(0, 0, 100, 1));
        assert_eq!(p.stacks()[1].stats, stats(0, 0, 300, 1));
        assert_eq!(p.stacks()[2].stats, stats(10, 1, 410, 2));
        assert_eq!(p.totals, stats(10, 1, 810, 4));
        assert_eq!((p.unknown_frees, p.missed_frees), (0, 0));
    }

    #[test]
    fn free_of_unknown_pointer_and_double_free_are_counted() {
        let agg = run(&[
            free(5, 0xdead),
            malloc(10, 0xa, 8, &[1]),
            free(11, 0xa),
            free(12, 0xa),
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.unknown_frees, 2);
        assert_eq!(p.totals, stats(0, 0, 8, 1));
        assert_eq!(agg.unknown_frees(), 2);
    }

    #[test]
    fn realloc_of_a_block_from_before_tracing_counts_an_unknown_free() {
        let agg = run(&[realloc(20, 0x77, 0xb, 30, &[2])]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.unknown_frees, 1);
        assert_eq!(p.totals, stats(30, 1, 30, 1));
    }

    #[test]
    fn overtaken_realloc_is_reconciled() {
        // Thread A reallocs 0xa → 0xb; inside it the allocator frees 0xa and
        // thread B gets 0xa, and B's record arrives before A's.
        let mut b_alloc = malloc(18, 0xa, 64, &[9]);
        if let Event::Alloc(a) = &mut b_alloc {
            a.tid = PID + 1;
        }
        let agg = run(&[
            malloc(10, 0xa, 100, &[1]),
            b_alloc,
            realloc(20, 0xa, 0xb, 300, &[2]), // entered at 15
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.missed_frees, 0);
        assert_eq!(p.unknown_frees, 0);
        assert_eq!(p.stacks()[0].stats, stats(0, 0, 100, 1));
        assert_eq!(p.stacks()[1].stats, stats(64, 1, 64, 1));
        assert_eq!(p.stacks()[2].stats, stats(300, 1, 300, 1));
    }

    #[test]
    fn address_reused_without_a_free_is_a_missed_free() {
        let agg = run(&[malloc(10, 0xa, 100, &[1]), malloc(20, 0xa, 5, &[2])]);
        let p = agg.running(PID).unwrap();
        assert_eq!(p.missed_frees, 1);
        assert_eq!(p.totals, stats(5, 1, 105, 2));
    }

    #[test]
    fn a_fork_starts_the_childs_own_instance() {
        const CHILD: u32 = PID + 1;
        let fork = |pid: u32, ts_ns: u64| Event::Fork {
            pid,
            parent: PID,
            ts_ns,
            comm: None,
        };
        let in_child = |e: Event| match e {
            Event::Alloc(a) => Event::Alloc(Alloc { pid: CHILD, ..a }),
            Event::Free { ts_ns, addr, .. } => Event::Free {
                pid: CHILD,
                ts_ns,
                addr,
            },
            e => e,
        };
        let agg = run(&[
            malloc(10, 0xa, 100, &[1]),
            fork(CHILD, 20),
            in_child(malloc(30, 0xb, 7, &[2])),
            // The parent's block, inherited: unknown to the child.
            in_child(free(40, 0xa)),
            // The child's pid again with no exit seen: a new process.
            fork(CHILD, 50),
            in_child(malloc(60, 0xc, 9, &[2])),
        ]);
        let parent = agg.running(PID).unwrap();
        assert_eq!(parent.parent, None);
        assert_eq!(parent.totals, stats(100, 1, 100, 1));
        let all: Vec<_> = agg.processes().filter(|p| p.pid == CHILD).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].exit_ts_ns, Some(50));
        assert_eq!(all[0].parent, Some(PID));
        assert_eq!(all[0].first_ts_ns, 20);
        assert_eq!(all[0].totals, stats(7, 1, 7, 1));
        assert_eq!(all[0].unknown_frees, 1);
        assert_eq!(all[1].totals, stats(9, 1, 9, 1));
        assert_eq!(all[1].parent, Some(PID));
    }

    #[test]
    fn exit_closes_the_instance_and_a_reused_pid_starts_anew() {
        let mut agg = run(&[
            malloc(10, 0xa, 100, &[1]),
            Event::Exit {
                pid: PID,
                ts_ns: 50,
            },
        ]);
        assert!(agg.has_exited(PID));
        agg.on_event(&malloc(60, 0xa, 3, &[1]));
        assert!(!agg.has_exited(PID));
        let all: Vec<_> = agg.processes().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].exit_ts_ns, Some(50));
        assert_eq!(all[0].totals.live_bytes, 100);
        assert_eq!(all[1].totals.live_bytes, 3);
        assert_eq!(all[1].missed_frees, 0);
    }

    #[test]
    fn size_filter_counts_nothing_outside_but_knows_its_frees() {
        let mut agg = Aggregator::new(Config {
            filter: SizeFilter { min: 10, max: 100 },
            ..Config::default()
        });
        for e in [
            malloc(10, 0xa, 5, &[1]),
            malloc(11, 0xb, 50, &[2]),
            malloc(12, 0xc, 500, &[3]),
            free(13, 0xa),
            free(14, 0xc),
        ] {
            agg.on_event(&e);
        }
        let p = agg.running(PID).unwrap();
        assert_eq!(p.totals, stats(50, 1, 50, 1));
        assert_eq!(p.unknown_frees, 0);
        assert_eq!(p.stacks().len(), 1);
    }

    #[test]
    fn older_than_keeps_only_old_blocks() {
        let agg = run(&[malloc(10, 0xa, 100, &[1]), malloc(50, 0xb, 7, &[1])]);
        let old = agg.running(PID).unwrap().live_older_than(20);
        assert_eq!(old[&0].live_bytes, 100);
        assert_eq!(old[&0].live_count, 1);
    }

    #[test]
    fn new_stacks_are_announced_once() {
        let mut agg = Aggregator::new(Config::default());
        let first = agg.on_event(&malloc(10, 0xa, 1, &[1]));
        let again = agg.on_event(&malloc(11, 0xb, 1, &[1]));
        assert_eq!(
            first,
            Some(NewStack {
                pid: PID,
                stack: 0,
                kind: None
            })
        );
        assert_eq!(again, None);
    }

    #[test]
    fn peak_keeps_the_breakdown_of_its_moment() {
        // Stack 1 peaks at 1000 bytes and is freed; stack 2 then holds less.
        let agg = run(&[
            malloc(10, 0xa, 600, &[1]),
            malloc(20, 0xb, 400, &[1]),
            malloc(25, 0xc, 50, &[2]),
            free(30, 0xa),
            free(40, 0xb),
            malloc(50, 0xd, 700, &[2]),
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!((p.peak.bytes, p.peak.count, p.peak.ts_ns), (1050, 3, 25));
        assert_eq!(*p.peak_stacks(), [(1000, 2), (50, 1)]);
        assert_eq!(p.totals.live_bytes, 750);
    }

    #[test]
    fn peak_still_rising_at_the_end_is_the_current_state() {
        let agg = run(&[
            malloc(10, 0xa, 10, &[1]),
            free(11, 0xa),
            malloc(12, 0xb, 30, &[2]),
        ]);
        let p = agg.running(PID).unwrap();
        assert_eq!((p.peak.bytes, p.peak.ts_ns), (30, 12));
        assert_eq!(*p.peak_stacks(), [(0, 0), (30, 1)]);
    }

    #[test]
    fn temporary_and_lifetimes() {
        let mut agg = Aggregator::new(Config {
            temporary_ns: 100,
            ..Config::default()
        });
        for e in [
            malloc(1000, 0xa, 8, &[1]),
            free(1050, 0xa),
            malloc(2000, 0xb, 16, &[1]),
            free(2100, 0xb),
            malloc(3000, 0xc, 32, &[1]),
            free(3101, 0xc),
            malloc(4000, 0xd, 64, &[2]),
        ] {
            agg.on_event(&e);
        }
        let p = agg.running(PID).unwrap();
        let t = Temporary {
            count: 2,
            bytes: 24,
        };
        assert_eq!(p.temporary, t);
        assert_eq!(p.stacks()[0].temporary, t);
        assert_eq!(p.stacks()[1].temporary, Temporary::default());
        assert_eq!(p.dist.lifetimes.len(), 3);
        assert_eq!(p.dist.lifetimes.max(), 101);
        assert_eq!(p.dist.lifetimes.min(), 50);
        assert_eq!(p.stacks()[0].dist.sizes.len(), 3);
        assert_eq!(p.stacks()[1].dist.lifetimes.len(), 0);
    }

    #[test]
    fn timeline_is_bounded_and_keeps_maxima() {
        let mut events = Vec::new();
        // 5000 ms of one allocation per ms, each freed 0.5 ms later.
        for i in 0..5000u64 {
            let t = 1_000_000 + i * 1_000_000;
            events.push(malloc(t, 0x1000 + i, 100 + i, &[1]));
            events.push(free(t + 500_000, 0x1000 + i));
        }
        let agg = run(&events);
        let tl = &agg.running(PID).unwrap().timeline;
        assert!(tl.points.len() <= TIMELINE_POINTS);
        assert_eq!(tl.step_ns, 8_000_000);
        assert_eq!(tl.points.iter().map(|p| p.0).max(), Some(100 + 4999));
        assert_eq!(tl.points.last().unwrap().1, 0);
    }
}

/// Properties of the accounting over random event sequences (proptest: a
/// short run in every `cargo test`; `PROPTEST_CASES=100000` for a long one).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::tests::{self, PID};
    use super::*;

    /// One call of a program with 16 addresses and 4 stacks: frees of
    /// blocks never allocated, double frees and reuse without a seen free
    /// all happen.
    #[derive(Clone, Debug)]
    enum Call {
        Malloc { slot: u64, size: u64, stack: u64 },
        Free { slot: u64 },
        Realloc { old: u64, new: u64, size: u64 },
    }

    fn call() -> impl Strategy<Value = Call> {
        prop_oneof![
            (0..16u64, 0..5000u64, 0..4u64).prop_map(|(slot, size, stack)| Call::Malloc {
                slot,
                size,
                stack
            }),
            (0..16u64).prop_map(|slot| Call::Free { slot }),
            (0..16u64, 0..16u64, 0..5000u64).prop_map(|(old, new, size)| Call::Realloc {
                old,
                new,
                size
            }),
        ]
    }

    fn event(c: &Call, ts: u64) -> Event {
        let addr = |slot: u64| 0x1000 + slot * 0x100;
        match *c {
            Call::Malloc { slot, size, stack } => {
                tests::malloc(ts, addr(slot), size, &[0x40_0000 + stack, 0x40_1000])
            }
            Call::Free { slot } => tests::free(ts, addr(slot)),
            Call::Realloc { old, new, size } => {
                tests::realloc(ts, addr(old), addr(new), size, &[0x40_0009, 0x40_1000])
            }
        }
    }

    proptest! {
        #[test]
        fn totals_stacks_and_live_blocks_agree(
            calls in prop::collection::vec(call(), 0..400),
            min in 0..64u64,
        ) {
            let config = Config {
                filter: SizeFilter { min, max: 4000 },
                ..Config::default()
            };
            let mut agg = Aggregator::new(config);
            for (i, c) in calls.iter().enumerate() {
                agg.on_event(&event(c, 10 + 10 * i as u64));
                let Some(p) = agg.running(PID) else { continue };
                let t = p.totals;
                // Live is what was allocated and not freed, in bytes and blocks.
                prop_assert_eq!(t.live_bytes, t.total_bytes - t.freed_bytes);
                prop_assert_eq!(t.live_count, t.total_count - t.freed_count);
                // The live table holds exactly the live blocks counted.
                let (bytes, count) = p
                    .live_blocks()
                    .fold((0, 0), |(b, n), (_, size)| (b + size, n + 1));
                prop_assert_eq!((bytes, count), (t.live_bytes, t.live_count));
                // Every counted block is inside the size filter.
                prop_assert!(p.live_blocks().all(|(_, size)| (min..=4000).contains(&size)));
                // The stacks add up to the process.
                let mut sum = Stats::default();
                for s in p.stacks() {
                    sum.live_bytes += s.stats.live_bytes;
                    sum.live_count += s.stats.live_count;
                    sum.total_bytes += s.stats.total_bytes;
                    sum.total_count += s.stats.total_count;
                    sum.freed_bytes += s.stats.freed_bytes;
                    sum.freed_count += s.stats.freed_count;
                }
                prop_assert_eq!(sum, t);
                // The peak is at least what is live now.
                prop_assert!(p.peak.bytes >= t.live_bytes);
            }
        }
    }
}
