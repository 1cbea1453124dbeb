//! The kernel's side of a process's memory, as its events tell it: resident
//! bytes by type (RSS), the mappings it made, which of their pages became
//! resident and through which code, kernel memory charged to it, and the OOM
//! killer's verdict. Then [`explain`]: why allocated heap and resident
//! memory differ.
//!
//! Pure like the rest of the aggregator: events in, state out. It does not
//! read `/proc`; a session that attaches to a running process feeds it the
//! counters it read there as ordinary [`Rss`] events.
//!
//! Resident pages are known only from the faults memtrace saw: pages made
//! resident before tracing began, copied in by `fork`, or populated without
//! a fault are counted by RSS but have no address here. [`explain`] reports
//! them as their own line instead of guessing.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use memtrace_common::{KmemOp, RssMember};
use rangemap::RangeSet;

use crate::agg::Stats;
use crate::event::{Kmem, MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_REMOVE, Oom, Rss, Vm, VmCall};

/// Largest unit a single fault makes resident (a PMD-sized huge page).
const MAX_FAULT_UNIT: u64 = 2 << 20;

const PAGE: u64 = 4096;

/// `MAP_ANONYMOUS`.
const MAP_ANONYMOUS: u32 = 0x20;
/// `MAP_SHARED`.
const MAP_SHARED: u32 = 0x01;

/// What backs a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Private anonymous memory (`MAP_ANONYMOUS|MAP_PRIVATE`).
    Anon,
    /// Shared anonymous memory.
    Shared,
    /// A file.
    File,
    /// The program break (`brk`): glibc's main heap.
    Brk,
}

/// One mapping made while traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// One past its last byte.
    pub end: u64,
    /// What backs it.
    pub backing: Backing,
    /// Mapped from inside a traced allocator call.
    pub by_allocator: bool,
    /// Index into [`Memory::map_stacks`] of the code that mapped it.
    pub stack: Option<u32>,
}

/// Mapped bytes by the code that mapped them.
#[derive(Clone, Debug)]
pub struct MapStack {
    /// User return addresses, innermost first.
    pub frames: Box<[u64]>,
    /// Bytes mapped and still mapped (`live_*`) and ever mapped (`total_*`).
    pub stats: Stats,
    /// Mapped by the allocator itself.
    pub by_allocator: bool,
}

/// Sampled faults by the code that touched the memory.
#[derive(Clone, Debug, Default)]
pub struct FaultStack {
    /// User return addresses, innermost first.
    pub frames: Box<[u64]>,
    /// Sampled faults with this stack.
    pub faults: u64,
    /// Bytes those faults made resident.
    pub bytes: u64,
}

/// Kernel memory by kernel stack.
#[derive(Clone, Debug)]
pub struct KernelStack {
    /// Kernel return addresses, innermost first.
    pub frames: Box<[u64]>,
    /// Which allocator (slab object, pages, per-CPU).
    pub op: KmemOp,
    /// Bytes set aside (`bytes_alloc`), live and total.
    pub stats: Stats,
}

/// Live and total kernel bytes by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTotals {
    /// Slab objects (kmalloc and kmem_cache).
    pub slab: Stats,
    /// Non-movable page-allocator pages (page tables, pipe buffers, slab
    /// growth, ...).
    pub pages: Stats,
    /// Per-CPU chunks.
    pub percpu: Stats,
}

impl KernelTotals {
    fn of(&mut self, space: KmemOp) -> &mut Stats {
        match space {
            KmemOp::Pages => &mut self.pages,
            KmemOp::Percpu => &mut self.percpu,
            _ => &mut self.slab,
        }
    }
}

/// Everything the kernel side told about one process.
#[derive(Debug, Default)]
pub struct Memory {
    /// Latest value of each RSS counter, bytes, by [`RssMember`] number;
    /// `None` until one was seen.
    pub rss: [Option<u64>; 4],
    /// Highest resident total (file + anon + shmem) seen, and when.
    pub peak_rss: (u64, u64),
    /// Faults that made memory resident, and the bytes they did.
    pub faults: u64,
    /// Bytes made resident by those faults.
    pub fault_bytes: u64,
    /// RSS increases with no fault address (populate, fork copies, pages
    /// read in by the kernel without a fault).
    pub unplaced_bytes: u64,
    /// Sampled faults by stack.
    pub fault_stacks: Vec<FaultStack>,
    /// Mappings made while traced, by start address.
    pub regions: BTreeMap<u64, Region>,
    /// Mapped bytes by stack.
    pub map_stacks: Vec<MapStack>,
    /// `munmap`/`mremap` of ranges memtrace never saw mapped.
    pub unknown_unmaps: u64,
    /// Bytes given back with `MADV_FREE` (resident until the kernel needs
    /// them).
    pub lazily_freed: u64,
    /// Times the process called execve while traced.
    pub execs: u32,
    /// Kernel memory by kind.
    pub kernel: KernelTotals,
    /// Kernel memory by stack.
    pub kernel_stacks: Vec<KernelStack>,
    /// Kernel frees of allocations memtrace did not see (made before
    /// tracing began, or by an untracked path).
    pub kernel_unknown_frees: u64,
    /// The OOM killer chose this process.
    pub oom: Option<Oom>,
    brk: Option<Range<u64>>,
    /// Resident pages of anonymous and shared memory.
    resident: RangeSet<u64>,
    /// Resident pages of file mappings.
    resident_file: RangeSet<u64>,
    kernel_live: HashMap<(KmemOp, u64), (u64, u32)>,
    fault_ids: HashMap<Box<[u64]>, u32>,
    map_ids: HashMap<(Box<[u64]>, bool), u32>,
    kernel_ids: HashMap<(Box<[u64]>, KmemOp), u32>,
}

/// Which stack table an event added a stack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewKind {
    /// [`Memory::fault_stacks`].
    Fault,
    /// [`Memory::map_stacks`].
    Map,
    /// [`Memory::kernel_stacks`].
    Kernel,
}

fn intern<K: std::hash::Hash + Eq, T>(
    ids: &mut HashMap<K, u32>,
    table: &mut Vec<T>,
    key: K,
    make: impl FnOnce() -> T,
) -> (u32, bool) {
    if let Some(&id) = ids.get(&key) {
        return (id, false);
    }
    let id = table.len() as u32;
    table.push(make());
    ids.insert(key, id);
    (id, true)
}

fn page_range(addr: u64, len: u64) -> Option<Range<u64>> {
    let start = addr & !(PAGE - 1);
    let end = addr.checked_add(len)?.checked_add(PAGE - 1)? & !(PAGE - 1);
    (end > start).then_some(start..end)
}

/// Bytes of `set` within `range`.
fn covered(set: &RangeSet<u64>, range: &Range<u64>) -> u64 {
    if range.is_empty() {
        return 0;
    }
    set.overlapping(range)
        .map(|r| r.end.min(range.end) - r.start.max(range.start))
        .sum()
}

impl Memory {
    /// Resident bytes of a counter (0 until seen).
    pub fn rss_of(&self, m: RssMember) -> u64 {
        self.rss[m as usize].unwrap_or(0)
    }

    /// Resident total: file + anon + shmem.
    pub fn resident(&self) -> u64 {
        self.rss_of(RssMember::File) + self.rss_of(RssMember::Anon) + self.rss_of(RssMember::Shmem)
    }

    /// Whether any RSS value was seen.
    pub fn has_rss(&self) -> bool {
        self.rss.iter().any(Option::is_some)
    }

    /// Applies an RSS change. Returns the new fault stack, if any.
    pub fn on_rss(&mut self, r: &Rss) -> Option<u32> {
        self.rss[r.member as usize] = Some(r.bytes);
        let total = self.resident();
        if total > self.peak_rss.0 {
            self.peak_rss = (total, r.ts_ns);
        }
        if r.delta <= 0 || r.member == RssMember::Swap {
            return None;
        }
        let delta = r.delta as u64;
        let Some(addr) = r.fault else {
            self.unplaced_bytes += delta;
            return None;
        };
        self.faults += 1;
        self.fault_bytes += delta;
        // A fault maps a naturally aligned power-of-two unit around its
        // address (a page, a large folio, fault-around of a file).
        let unit = (1u64 << (63 - delta.leading_zeros())).clamp(PAGE, MAX_FAULT_UNIT);
        let start = addr & !(unit - 1);
        self.unplaced_bytes += delta.saturating_sub(unit);
        let unit_range = start..start + unit;
        if r.member == RssMember::File {
            self.resident_file.insert(unit_range);
        } else {
            // A private file page written to becomes an anonymous copy.
            self.resident_file.remove(unit_range.clone());
            self.resident.insert(unit_range);
        }
        if !r.sampled {
            return None;
        }
        let (id, new) = intern(
            &mut self.fault_ids,
            &mut self.fault_stacks,
            r.stack.clone().into_boxed_slice(),
            || FaultStack {
                frames: r.stack.clone().into(),
                ..FaultStack::default()
            },
        );
        let s = &mut self.fault_stacks[id as usize];
        s.faults += 1;
        s.bytes += delta;
        new.then_some(id)
    }

    /// Applies an address-space syscall. Returns the new map stack, if any.
    pub fn on_vm(&mut self, v: &Vm) -> Option<u32> {
        match v.call {
            VmCall::Mmap {
                addr,
                len,
                flags,
                fd,
                ..
            } => {
                let backing = if flags & MAP_ANONYMOUS == 0 && fd >= 0 {
                    Backing::File
                } else if flags & MAP_SHARED != 0 {
                    Backing::Shared
                } else {
                    Backing::Anon
                };
                let range = page_range(addr, len)?;
                // MAP_FIXED over an old mapping replaces it.
                self.unmap(range.clone(), false);
                self.map(range, backing, v)
            }
            VmCall::Munmap { addr, len } => {
                if let Some(range) = page_range(addr, len) {
                    self.unmap(range, true);
                }
                None
            }
            VmCall::Mremap {
                old_addr,
                old_len,
                new_addr,
                new_len,
            } => self.remap(old_addr, old_len, new_addr, new_len, v),
            VmCall::Brk { requested, brk } => {
                self.set_brk(requested, brk, v);
                None
            }
            VmCall::Madvise { addr, len, advice } => {
                if let Some(range) = page_range(addr, len) {
                    if matches!(advice, MADV_DONTNEED | MADV_DONTNEED_LOCKED | MADV_REMOVE) {
                        self.resident.remove(range.clone());
                        self.resident_file.remove(range);
                    } else {
                        self.lazily_freed += range.end - range.start;
                    }
                }
                None
            }
        }
    }

    fn map(&mut self, range: Range<u64>, backing: Backing, v: &Vm) -> Option<u32> {
        let len = range.end - range.start;
        let (id, new) = intern(
            &mut self.map_ids,
            &mut self.map_stacks,
            (v.stack.clone().into_boxed_slice(), v.by_allocator),
            || MapStack {
                frames: v.stack.clone().into(),
                stats: Stats::default(),
                by_allocator: v.by_allocator,
            },
        );
        self.map_stacks[id as usize].stats.alloc(len);
        self.regions.insert(
            range.start,
            Region {
                end: range.end,
                backing,
                by_allocator: v.by_allocator,
                stack: Some(id),
            },
        );
        new.then_some(id)
    }

    /// Removes `range` from the mappings (splitting those it cuts) and from
    /// the resident pages; returns the first region it overlapped.
    fn unmap(&mut self, range: Range<u64>, count_unknown: bool) -> Option<Region> {
        let overlapping: Vec<(u64, Region)> = self
            .regions
            .range(..range.end)
            .rev()
            .take_while(|(_, r)| r.end > range.start)
            .map(|(s, r)| (*s, *r))
            .collect();
        if overlapping.is_empty() && count_unknown {
            self.unknown_unmaps += 1;
        }
        let mut first = None;
        for (start, region) in overlapping.into_iter().rev() {
            first.get_or_insert(region);
            self.regions.remove(&start);
            let cut = region.end.min(range.end) - start.max(range.start);
            let (left, right) = (start < range.start, region.end > range.end);
            if let Some(id) = region.stack {
                // A mapping cut in two counts as two; one cut away, as none.
                let s = &mut self.map_stacks[id as usize].stats;
                s.live_bytes = s.live_bytes.saturating_sub(cut);
                s.freed_bytes += cut;
                match (left, right) {
                    (false, false) => {
                        s.live_count = s.live_count.saturating_sub(1);
                        s.freed_count += 1;
                    }
                    (true, true) => s.live_count += 1,
                    _ => {}
                }
            }
            if left {
                self.regions.insert(
                    start,
                    Region {
                        end: range.start,
                        ..region
                    },
                );
            }
            if right {
                self.regions.insert(range.end, region);
            }
        }
        self.resident.remove(range.clone());
        self.resident_file.remove(range);
        first
    }

    fn remap(
        &mut self,
        old_addr: u64,
        old_len: u64,
        new_addr: u64,
        new_len: u64,
        v: &Vm,
    ) -> Option<u32> {
        let old = page_range(old_addr, old_len)?;
        let new = page_range(new_addr, new_len)?;
        // The resident pages move with the mapping.
        let moved: Vec<Range<u64>> = self.resident.overlapping(&old).cloned().collect();
        let moved_file: Vec<Range<u64>> = self.resident_file.overlapping(&old).cloned().collect();
        let was = self.unmap(old.clone(), true);
        let backing = was.map_or(Backing::Anon, |r| r.backing);
        let (new_start, new_end) = (new.start, new.end);
        let shift = |r: &Range<u64>| {
            let s = r.start.max(old.start) - old.start + new_start;
            let e = (r.end.min(old.end) - old.start + new_start).min(new_end);
            (e > s).then_some(s..e)
        };
        self.unmap(new.clone(), false);
        let made = self.map(new, backing, v);
        for r in moved.iter().filter_map(shift) {
            self.resident.insert(r);
        }
        for r in moved_file.iter().filter_map(shift) {
            self.resident_file.insert(r);
        }
        made
    }

    fn set_brk(&mut self, requested: u64, brk: u64, v: &Vm) {
        let heap = self.brk.get_or_insert(brk..brk);
        if requested == 0 || brk == heap.end {
            return;
        }
        let gone = brk.max(heap.start)..heap.end;
        if !gone.is_empty() {
            self.resident.remove(gone);
        }
        heap.end = brk.max(heap.start);
        let _ = v;
    }

    /// Applies a kernel allocation or free. Returns the new kernel stack.
    pub fn on_kmem(&mut self, k: &Kmem) -> Option<u32> {
        if k.op == KmemOp::Free {
            match self.kernel_live.remove(&(k.space, k.addr)) {
                Some((bytes, stack)) => {
                    self.kernel.of(k.space).free(bytes);
                    self.kernel_stacks[stack as usize].stats.free(bytes);
                }
                None => self.kernel_unknown_frees += 1,
            }
            return None;
        }
        let (id, new) = intern(
            &mut self.kernel_ids,
            &mut self.kernel_stacks,
            (k.stack.clone().into_boxed_slice(), k.op),
            || KernelStack {
                frames: k.stack.clone().into(),
                op: k.op,
                stats: Stats::default(),
            },
        );
        if let Some((bytes, stack)) = self
            .kernel_live
            .insert((k.space, k.addr), (k.bytes_alloc, id))
        {
            // Its free was not seen: take the old one out first.
            self.kernel.of(k.space).free(bytes);
            self.kernel_stacks[stack as usize].stats.free(bytes);
        }
        self.kernel.of(k.space).alloc(k.bytes_alloc);
        self.kernel_stacks[id as usize].stats.alloc(k.bytes_alloc);
        new.then_some(id)
    }

    /// A new program replaced the address space: mappings and resident
    /// pages start over (kernel allocations stay charged).
    pub fn on_exec(&mut self) {
        self.execs += 1;
        self.rss = [None; 4];
        self.regions.clear();
        for s in &mut self.map_stacks {
            s.stats.live_bytes = 0;
            s.stats.live_count = 0;
        }
        self.brk = None;
        self.resident = RangeSet::new();
        self.resident_file = RangeSet::new();
    }

    /// Whether `addr` lies in memory the allocator manages (the brk heap or
    /// a mapping made from inside an allocator call).
    fn allocator_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = self
            .regions
            .iter()
            .filter(|(_, r)| r.by_allocator)
            .map(|(s, r)| *s..r.end)
            .collect();
        if let Some(b) = &self.brk
            && b.end > b.start
        {
            out.push(b.clone());
        }
        out
    }

    /// The mappings with the most resident bytes, largest first.
    pub fn top_mappings(&self, n: usize) -> Vec<MappingRow> {
        let mut rows: Vec<MappingRow> = self
            .regions
            .iter()
            .map(|(s, r)| {
                let range = *s..r.end;
                MappingRow {
                    start: *s,
                    len: r.end - s,
                    backing: r.backing,
                    by_allocator: r.by_allocator,
                    resident: covered(&self.resident, &range)
                        + covered(&self.resident_file, &range),
                    stack: r.stack,
                }
            })
            .collect();
        if let Some(b) = &self.brk
            && b.end > b.start
        {
            rows.push(MappingRow {
                start: b.start,
                len: b.end - b.start,
                backing: Backing::Brk,
                by_allocator: true,
                resident: covered(&self.resident, b),
                stack: None,
            });
        }
        rows.sort_by(|a, b| b.resident.cmp(&a.resident).then(a.start.cmp(&b.start)));
        rows.truncate(n);
        rows
    }
}

/// One mapping in [`Memory::top_mappings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingRow {
    /// Start address.
    pub start: u64,
    /// Bytes mapped.
    pub len: u64,
    /// What backs it.
    pub backing: Backing,
    /// Mapped by the allocator.
    pub by_allocator: bool,
    /// Bytes of it made resident by faults memtrace saw.
    pub resident: u64,
    /// Index into [`Memory::map_stacks`].
    pub stack: Option<u32>,
}

/// Why allocated and resident bytes differ, at one moment. Every field is
/// bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// Heap bytes allocated and not freed (allocator probes).
    pub allocated: u64,
    /// Resident bytes: file + anon + shmem (`rss_stat`).
    pub resident: u64,
    /// Resident anonymous bytes.
    pub resident_anon: u64,
    /// Resident file-backed bytes.
    pub resident_file: u64,
    /// Resident shared-memory bytes.
    pub resident_shmem: u64,
    /// Swapped-out bytes.
    pub swap: u64,
    /// Bytes mapped (and still mapped) by mmap/mremap while traced.
    pub mapped: u64,
    /// Of which mapped by the allocator itself.
    pub mapped_by_allocator: u64,
    /// Allocated bytes on pages that became resident: allocated and used.
    pub allocated_resident: u64,
    /// Allocated bytes on pages no fault ever touched: allocated, never
    /// used (`calloc` of fresh mappings, `np.zeros`).
    pub allocated_untouched: u64,
    /// Resident bytes in the allocator's memory that hold no allocation:
    /// freed but kept by the allocator, and slack around small blocks.
    pub retained_by_allocator: u64,
    /// Resident anonymous bytes outside the allocator's memory: thread
    /// stacks, the program's own mappings and data.
    pub other_anon: u64,
    /// Resident anonymous and shared bytes with no fault seen: made
    /// resident before tracing began, copied by fork, or populated.
    pub anon_unattributed: u64,
    /// Kernel memory charged to the process (not in RSS): slab + pages +
    /// per-CPU, live (the report takes out pages that back slab objects).
    pub kernel: u64,
}

/// Explains a process's memory from its kernel-side state and its live heap
/// blocks (`(address, size)`).
pub fn explain(
    mem: &Memory,
    live: impl Iterator<Item = (u64, u64)>,
    allocated: u64,
) -> Explanation {
    let mut allocated_resident = 0;
    for (addr, size) in live {
        if size == 0 {
            continue;
        }
        let range = addr..addr.saturating_add(size);
        allocated_resident += covered(&mem.resident, &range);
    }
    let allocator_resident: u64 = mem
        .allocator_ranges()
        .iter()
        .map(|r| covered(&mem.resident, r))
        .sum();
    let tracked_anon: u64 = mem.resident.iter().map(|r| r.end - r.start).sum();
    let anon = mem.rss_of(RssMember::Anon) + mem.rss_of(RssMember::Shmem);
    let mapped: u64 = mem.regions.iter().map(|(s, r)| r.end - s).sum();
    let mapped_by_allocator: u64 = mem
        .regions
        .iter()
        .filter(|(_, r)| r.by_allocator)
        .map(|(s, r)| r.end - s)
        .sum();
    let k = &mem.kernel;
    Explanation {
        allocated,
        resident: mem.resident(),
        resident_anon: mem.rss_of(RssMember::Anon),
        resident_file: mem.rss_of(RssMember::File),
        resident_shmem: mem.rss_of(RssMember::Shmem),
        swap: mem.rss_of(RssMember::Swap),
        mapped,
        mapped_by_allocator,
        allocated_resident,
        allocated_untouched: allocated.saturating_sub(allocated_resident),
        retained_by_allocator: allocator_resident.saturating_sub(allocated_resident),
        other_anon: tracked_anon.saturating_sub(allocator_resident),
        anon_unattributed: anon.saturating_sub(tracked_anon),
        kernel: k.slab.live_bytes + k.pages.live_bytes + k.percpu.live_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss(member: RssMember, bytes: u64, delta: i64, fault: Option<u64>) -> Rss {
        Rss {
            pid: 1,
            ts_ns: 0,
            member,
            bytes,
            delta,
            fault,
            sampled: false,
            stack: vec![],
        }
    }

    fn vm(call: VmCall, by_allocator: bool) -> Vm {
        Vm {
            pid: 1,
            ts_ns: 0,
            call,
            by_allocator,
            stack: vec![0x401000],
        }
    }

    fn mmap(addr: u64, len: u64, by_allocator: bool) -> Vm {
        vm(
            VmCall::Mmap {
                addr,
                len,
                prot: 3,
                flags: 0x22,
                fd: -1,
            },
            by_allocator,
        )
    }

    /// A calloc of 64 pages of which 6 are touched: 58 pages untouched.
    #[test]
    fn untouched_calloc_is_allocated_not_resident() {
        let mut m = Memory::default();
        let base = 0x7f00_0000_0000;
        m.on_vm(&mmap(base, 65 * PAGE, true));
        let block = (base + 16, 64 * PAGE);
        let mut anon = 0;
        for i in 0..6 {
            anon += PAGE;
            m.on_rss(&rss(
                RssMember::Anon,
                anon,
                PAGE as i64,
                Some(base + 16 + i * PAGE),
            ));
        }
        let e = explain(&m, [block].into_iter(), block.1);
        // Page 0 holds the chunk header and 4080 bytes of the block; pages
        // 1-5 hold 4096 each.
        assert_eq!(e.allocated_resident, 6 * PAGE - 16);
        assert_eq!(e.allocated_untouched, 64 * PAGE - (6 * PAGE - 16));
        assert_eq!(e.retained_by_allocator, 16);
        assert_eq!(e.resident_anon, 6 * PAGE);
        assert_eq!(e.anon_unattributed, 0);
        assert_eq!(e.mapped, 65 * PAGE);
        assert_eq!(e.mapped_by_allocator, 65 * PAGE);
    }

    /// A heap filled, then freed but for its last block: resident, retained.
    #[test]
    fn freed_heap_is_retained() {
        let mut m = Memory::default();
        let start = 0x55_0000_0000;
        m.on_vm(&vm(
            VmCall::Brk {
                requested: 0,
                brk: start,
            },
            false,
        ));
        m.on_vm(&vm(
            VmCall::Brk {
                requested: start + 100 * PAGE,
                brk: start + 100 * PAGE,
            },
            true,
        ));
        for i in 0..100 {
            m.on_rss(&rss(
                RssMember::Anon,
                (i + 1) * PAGE,
                PAGE as i64,
                Some(start + i * PAGE),
            ));
        }
        let last = (start + 99 * PAGE + 100, 1000);
        let e = explain(&m, [last].into_iter(), 1000);
        assert_eq!(e.allocated_resident, 1000);
        assert_eq!(e.allocated_untouched, 0);
        assert_eq!(e.retained_by_allocator, 100 * PAGE - 1000);
        assert_eq!(e.other_anon, 0);
        // Shrinking the break gives the pages back.
        m.on_vm(&vm(
            VmCall::Brk {
                requested: start + PAGE,
                brk: start + PAGE,
            },
            true,
        ));
        let e = explain(&m, std::iter::empty(), 0);
        assert_eq!(e.retained_by_allocator, PAGE);
    }

    #[test]
    fn unmap_splits_mappings_and_drops_pages() {
        let mut m = Memory::default();
        let base = 0x7f00_0000_0000;
        m.on_vm(&mmap(base, 10 * PAGE, false));
        for i in 0..10 {
            m.on_rss(&rss(
                RssMember::Anon,
                (i + 1) * PAGE,
                PAGE as i64,
                Some(base + i * PAGE),
            ));
        }
        m.on_vm(&vm(
            VmCall::Munmap {
                addr: base + 2 * PAGE,
                len: 3 * PAGE,
            },
            false,
        ));
        assert_eq!(m.regions.len(), 2);
        assert_eq!(m.map_stacks[0].stats.live_bytes, 7 * PAGE);
        assert_eq!(m.map_stacks[0].stats.live_count, 2);
        // Unmapping both pieces, and again, leaves nothing and no underflow.
        for _ in 0..2 {
            m.on_vm(&vm(
                VmCall::Munmap {
                    addr: base,
                    len: 10 * PAGE,
                },
                false,
            ));
        }
        assert_eq!(m.map_stacks[0].stats.live_bytes, 0);
        assert_eq!(m.map_stacks[0].stats.live_count, 0);
        m.on_vm(&mmap(base, 10 * PAGE, false));
        for i in 0..10 {
            m.on_rss(&rss(
                RssMember::Anon,
                (i + 1) * PAGE,
                PAGE as i64,
                Some(base + i * PAGE),
            ));
        }
        m.on_vm(&vm(
            VmCall::Munmap {
                addr: base + 2 * PAGE,
                len: 3 * PAGE,
            },
            false,
        ));
        assert_eq!(m.map_stacks[0].stats.total_bytes, 20 * PAGE);
        m.on_rss(&rss(RssMember::Anon, 7 * PAGE, -3 * PAGE as i64, None));
        let e = explain(&m, std::iter::empty(), 0);
        assert_eq!(e.other_anon, 7 * PAGE);
        assert_eq!(e.anon_unattributed, 0);
        m.on_vm(&vm(
            VmCall::Munmap {
                addr: 0x1000,
                len: PAGE,
            },
            false,
        ));
        // The second unmap of the whole range above, and this one.
        assert_eq!(m.unknown_unmaps, 2);
    }

    #[test]
    fn mremap_moves_resident_pages() {
        let mut m = Memory::default();
        let a = 0x7f00_0000_0000;
        let b = 0x7f10_0000_0000;
        m.on_vm(&mmap(a, 4 * PAGE, true));
        m.on_rss(&rss(RssMember::Anon, 2 * PAGE, 2 * PAGE as i64, Some(a)));
        m.on_vm(&vm(
            VmCall::Mremap {
                old_addr: a,
                old_len: 4 * PAGE,
                new_addr: b,
                new_len: 8 * PAGE,
            },
            true,
        ));
        let rows = m.top_mappings(5);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].start, rows[0].len, rows[0].resident),
            (b, 8 * PAGE, 2 * PAGE)
        );
    }

    #[test]
    fn huge_page_faults_place_aligned_units() {
        let mut m = Memory::default();
        let base = 0x7f00_0000_0000;
        m.on_rss(&rss(RssMember::Anon, 2 << 20, 2 << 20, Some(base + 12345)));
        let e = explain(&m, [(base, 2 << 20)].into_iter(), 2 << 20);
        assert_eq!(e.allocated_resident, 2 << 20);
        // Resident before tracing: counted, not placed.
        m.on_rss(&rss(RssMember::Anon, 3 << 20, 1 << 20, None));
        assert_eq!(m.unplaced_bytes, 1 << 20);
        assert_eq!(
            explain(&m, std::iter::empty(), 0).anon_unattributed,
            1 << 20
        );
    }

    #[test]
    fn kernel_allocations_are_matched_by_address() {
        let mut m = Memory::default();
        let k = |op, space, addr, bytes| Kmem {
            pid: 1,
            ts_ns: 0,
            op,
            space,
            addr,
            bytes_req: bytes,
            bytes_alloc: bytes,
            stack: if op == KmemOp::Free {
                vec![]
            } else {
                vec![0xffff_ffff_8100_0000]
            },
        };
        m.on_kmem(&k(KmemOp::Pages, KmemOp::Pages, 77, 4096));
        m.on_kmem(&k(
            KmemOp::Kmalloc,
            KmemOp::Kmalloc,
            0xffff_8880_0000_1000,
            192,
        ));
        m.on_kmem(&k(
            KmemOp::CacheAlloc,
            KmemOp::Kmalloc,
            0xffff_8880_0000_2000,
            256,
        ));
        m.on_kmem(&k(KmemOp::Free, KmemOp::Kmalloc, 0xffff_8880_0000_1000, 0));
        m.on_kmem(&k(KmemOp::Free, KmemOp::Pages, 78, 0));
        assert_eq!(m.kernel.pages.live_bytes, 4096);
        assert_eq!(m.kernel.slab.live_bytes, 256);
        assert_eq!(m.kernel.slab.total_bytes, 448);
        assert_eq!(m.kernel_unknown_frees, 1);
        assert_eq!(m.kernel_stacks.len(), 3);
        assert_eq!(explain(&m, std::iter::empty(), 0).kernel, 4096 + 256);
    }

    /// The first break seen may already be a shrink, or below the start.
    #[test]
    fn odd_breaks_are_not_a_panic() {
        let mut m = Memory::default();
        let b = |requested, brk| vm(VmCall::Brk { requested, brk }, true);
        m.on_vm(&b(0x5000_0000, 0x5000_0000));
        m.on_vm(&b(0x4fff_0000, 0x4fff_0000));
        m.on_vm(&b(0x5001_0000, 0x5001_0000));
        m.on_vm(&b(0x5000_8000, 0x5000_8000));
        let _ = explain(&m, [(0x5000_0000, 0)].into_iter(), 0);
    }

    #[test]
    fn exec_starts_the_address_space_over() {
        let mut m = Memory::default();
        m.on_vm(&mmap(0x7f00_0000_0000, PAGE, false));
        m.on_rss(&rss(
            RssMember::Anon,
            PAGE,
            PAGE as i64,
            Some(0x7f00_0000_0000),
        ));
        m.on_exec();
        assert!(m.regions.is_empty());
        assert!(!m.has_rss());
        assert_eq!(m.execs, 1);
    }
}
