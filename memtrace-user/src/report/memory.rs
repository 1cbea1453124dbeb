//! The `memory` view: allocated heap next to what the kernel holds for the
//! process (resident by type, mapped, kernel), and the lines that explain
//! the gap. Built from [`crate::mem`]; rendered as text here, as JSON by
//! serde, and in the HTML page.

use std::io::{self, Write};

use serde::Serialize;

use crate::agg::{Process, Stats};
use memtrace_common::KmemOp;

use crate::mem::{Backing, Explanation, KernelStack};
use crate::report::text::{group, human};
use crate::report::{Options, top};
use crate::symbolize::{Frame, Symbolize};

/// Resident memory of a process, always reported when known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ResidentSummary {
    /// Resident bytes: file + anon + shmem (VmRSS).
    pub resident_bytes: u64,
    /// Anonymous (RssAnon).
    pub anon_bytes: u64,
    /// File-backed (RssFile).
    pub file_bytes: u64,
    /// Shared memory (RssShmem).
    pub shmem_bytes: u64,
    /// Swapped out (VmSwap).
    pub swap_bytes: u64,
    /// Highest resident total seen.
    pub peak_resident_bytes: u64,
    /// Anonymous resident bytes that traced allocations hold: live blocks
    /// on pages the program touched while traced.
    pub traced_anon_bytes: u64,
    /// The coverage meter: `traced_anon_bytes` as a percentage of
    /// `anon_bytes`. Low when the process allocates through something
    /// memtrace does not see (an allocator it found no symbols for, its own
    /// mmaps, a runtime's heap), or held its memory before tracing began.
    pub coverage_pct: f64,
}

impl ResidentSummary {
    /// The summary of a process, if the kernel side reported its RSS.
    pub fn of(p: &Process) -> Option<Self> {
        use memtrace_common::RssMember::*;
        let m = &p.mem;
        if !m.has_rss() {
            return None;
        }
        let anon_bytes = m.rss_of(Anon);
        let traced_anon_bytes = p.explain().allocated_resident.min(anon_bytes);
        Some(ResidentSummary {
            resident_bytes: m.resident(),
            anon_bytes,
            file_bytes: m.rss_of(File),
            shmem_bytes: m.rss_of(Shmem),
            swap_bytes: m.rss_of(Swap),
            peak_resident_bytes: m.peak_rss.0,
            traced_anon_bytes,
            coverage_pct: coverage_pct(traced_anon_bytes, anon_bytes),
        })
    }
}

/// The `memory` view of one process.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// Whether the kernel side reported resident memory (false for
    /// recordings made before memtrace traced it): without it only
    /// `allocated` and `mapped` mean anything.
    pub resident_known: bool,
    /// The figures and the lines of the explanation, bytes.
    pub explained: Explanation,
    /// Seconds from the trace's start to the highest resident total.
    pub peak_resident_at_s: f64,
    /// Faults that made memory resident, as memtrace saw them.
    pub faults: FaultSummary,
    /// The code that made memory resident (sampled faults), most bytes
    /// first.
    pub fault_stacks: Vec<FaultStackReport>,
    /// Mappings made while traced with the most resident bytes.
    pub mappings: Vec<MappingReport>,
    /// Mapped bytes by the code that mapped them, most live first.
    pub map_stacks: Vec<MapStackReport>,
    /// Kernel memory charged to the process (with `--kernel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelReport>,
    /// `munmap`/`mremap` of ranges not seen mapped (mapped before tracing).
    pub unknown_unmaps: u64,
    /// Bytes given back with `MADV_FREE`, resident until reclaimed.
    pub lazily_freed_bytes: u64,
    /// execve calls while traced (each starts the address space over).
    pub execs: u32,
    /// The OOM killer's verdict, if it chose this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom: Option<OomReport>,
}

/// Faults seen.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FaultSummary {
    /// Faults that made memory resident.
    pub count: u64,
    /// Bytes they made resident.
    pub bytes: u64,
    /// RSS growth with no fault address (pages populated or copied in).
    pub unplaced_bytes: u64,
    /// One fault in this many was sampled for its stack.
    pub sample_every: u32,
}

/// Sampled faults of one stack.
#[derive(Clone, Debug, Serialize)]
pub struct FaultStackReport {
    /// Sampled faults.
    pub sampled_faults: u64,
    /// Bytes those made resident.
    pub sampled_bytes: u64,
    /// Estimated bytes this code made resident (sampled × rate).
    pub estimated_bytes: u64,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

/// One mapping.
#[derive(Clone, Debug, Serialize)]
pub struct MappingReport {
    /// Start address, hex.
    pub start: String,
    /// Bytes mapped.
    pub bytes: u64,
    /// What backs it.
    pub backing: Backing,
    /// Mapped by the allocator.
    pub by_allocator: bool,
    /// Bytes made resident by faults memtrace saw.
    pub resident_bytes: u64,
    /// The code that mapped it.
    pub frames: Vec<Frame>,
}

/// Mapped bytes of one stack.
#[derive(Clone, Debug, Serialize)]
pub struct MapStackReport {
    /// Bytes still mapped.
    pub live_bytes: u64,
    /// Mappings still mapped.
    pub live_count: u64,
    /// Bytes ever mapped.
    pub total_bytes: u64,
    /// Mappings ever made.
    pub total_count: u64,
    /// Mapped from inside the allocator.
    pub by_allocator: bool,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

/// Kernel memory of one process.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    /// Slab objects (kmalloc, kmem_cache), bytes set aside.
    pub slab: KernelBytes,
    /// Non-movable pages.
    pub pages: KernelBytes,
    /// Per-CPU chunks.
    pub percpu: KernelBytes,
    /// Of `pages`, those allocated to grow a slab cache (their stack runs
    /// through `allocate_slab`): they hold the slab objects above, so the
    /// kernel total counts them once.
    pub slab_pages: KernelBytes,
    /// Frees of kernel allocations memtrace had not seen.
    pub unknown_frees: u64,
    /// By kernel stack, most live bytes first.
    pub stacks: Vec<KernelStackReport>,
    /// Stacks not shown because of `--top`.
    pub stacks_omitted: usize,
}

/// Live and total kernel bytes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct KernelBytes {
    /// Bytes allocated and not freed.
    pub live_bytes: u64,
    /// Allocations not freed.
    pub live_count: u64,
    /// Bytes allocated while traced.
    pub total_bytes: u64,
    /// Allocations while traced.
    pub total_count: u64,
}

impl From<Stats> for KernelBytes {
    fn from(s: Stats) -> Self {
        Self {
            live_bytes: s.live_bytes,
            live_count: s.live_count,
            total_bytes: s.total_bytes,
            total_count: s.total_count,
        }
    }
}

/// Kernel memory of one kernel stack.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStackReport {
    /// `kmalloc`, `kmem_cache`, `pages` or `percpu`.
    pub allocator: &'static str,
    /// Bytes and counts.
    #[serde(flatten)]
    pub bytes: KernelBytes,
    /// Kernel frames, innermost first.
    pub frames: Vec<Frame>,
}

/// What the kernel said when the OOM killer chose the process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OomReport {
    /// Seconds from the trace's start.
    pub at_s: f64,
    /// Resident anonymous bytes then.
    pub anon_rss_bytes: u64,
    /// Resident file bytes then.
    pub file_rss_bytes: u64,
    /// Resident shared-memory bytes then.
    pub shmem_rss_bytes: u64,
    /// Page tables, bytes.
    pub pgtables_bytes: u64,
    /// Virtual size, bytes.
    pub total_vm_bytes: u64,
    /// The process's `oom_score_adj`.
    pub oom_score_adj: i64,
}

/// Kernel functions that allocate pages for a slab cache.
fn grows_slab(function: &str) -> bool {
    matches!(function, "allocate_slab" | "new_slab" | "alloc_slab_page")
}

fn kernel_name(s: &KernelStack) -> &'static str {
    use memtrace_common::KmemOp::*;
    match s.op {
        Kmalloc => "kmalloc",
        CacheAlloc => "kmem_cache",
        Pages => "pages",
        Percpu => "percpu",
        Free => "free",
    }
}

/// Builds the `memory` view of `p`; `sample_every` is the fault sampling
/// rate of the trace.
pub fn build(
    p: &Process,
    sym: &mut dyn Symbolize,
    opts: &Options,
    sample_every: u32,
) -> MemoryReport {
    let m = &p.mem;
    let rate = sample_every.max(1) as u64;
    let mut faults: Vec<usize> = (0..m.fault_stacks.len()).collect();
    faults.sort_by_key(|&i| (std::cmp::Reverse(m.fault_stacks[i].bytes), i));
    faults.truncate(top(opts, faults.len()));
    let mut maps: Vec<usize> = (0..m.map_stacks.len()).collect();
    let mkey = |i: usize| {
        let s = m.map_stacks[i].stats;
        (s.live_bytes, s.total_bytes)
    };
    maps.sort_by(|&a, &b| (mkey(b), a).cmp(&(mkey(a), b)));
    maps.truncate(top(opts, maps.len()));
    let mut explained = p.explain();
    let kernel = (!m.kernel_stacks.is_empty() || m.kernel_unknown_frees > 0).then(|| {
        let mut slab_pages = Stats::default();
        for s in m.kernel_stacks.iter().filter(|s| s.op == KmemOp::Pages) {
            let frames = sym.frames(p.pid, &s.frames);
            if frames
                .iter()
                .any(|f| f.function.as_deref().is_some_and(grows_slab))
            {
                slab_pages.live_bytes += s.stats.live_bytes;
                slab_pages.live_count += s.stats.live_count;
                slab_pages.total_bytes += s.stats.total_bytes;
                slab_pages.total_count += s.stats.total_count;
            }
        }
        explained.kernel = explained.kernel.saturating_sub(slab_pages.live_bytes);
        let mut rows: Vec<usize> = (0..m.kernel_stacks.len()).collect();
        let kkey = |i: usize| {
            let s = m.kernel_stacks[i].stats;
            (s.live_bytes, s.total_bytes)
        };
        rows.sort_by(|&a, &b| (kkey(b), a).cmp(&(kkey(a), b)));
        let shown = top(opts, rows.len());
        KernelReport {
            slab: m.kernel.slab.into(),
            pages: m.kernel.pages.into(),
            percpu: m.kernel.percpu.into(),
            slab_pages: slab_pages.into(),
            unknown_frees: m.kernel_unknown_frees,
            stacks: rows[..shown]
                .iter()
                .map(|&i| {
                    let s = &m.kernel_stacks[i];
                    KernelStackReport {
                        allocator: kernel_name(s),
                        bytes: s.stats.into(),
                        frames: sym.frames(p.pid, &s.frames),
                    }
                })
                .collect(),
            stacks_omitted: rows.len() - shown,
        }
    });
    MemoryReport {
        resident_known: m.has_rss(),
        explained,
        peak_resident_at_s: opts.seconds(m.peak_rss.1),
        faults: FaultSummary {
            count: m.faults,
            bytes: m.fault_bytes,
            unplaced_bytes: m.unplaced_bytes,
            sample_every: sample_every.max(1),
        },
        fault_stacks: faults
            .into_iter()
            .map(|i| {
                let s = &m.fault_stacks[i];
                FaultStackReport {
                    sampled_faults: s.faults,
                    sampled_bytes: s.bytes,
                    estimated_bytes: s.bytes * rate,
                    frames: sym.frames(p.pid, &s.frames),
                }
            })
            .collect(),
        mappings: m
            .top_mappings(top(opts, m.regions.len() + 1))
            .into_iter()
            .map(|r| MappingReport {
                start: format!("{:#x}", r.start),
                bytes: r.len,
                backing: r.backing,
                by_allocator: r.by_allocator,
                resident_bytes: r.resident,
                frames: r
                    .stack
                    .map(|s| sym.frames(p.pid, &m.map_stacks[s as usize].frames))
                    .unwrap_or_default(),
            })
            .collect(),
        map_stacks: maps
            .into_iter()
            .map(|i| {
                let s = &m.map_stacks[i];
                MapStackReport {
                    live_bytes: s.stats.live_bytes,
                    live_count: s.stats.live_count,
                    total_bytes: s.stats.total_bytes,
                    total_count: s.stats.total_count,
                    by_allocator: s.by_allocator,
                    frames: sym.frames(p.pid, &s.frames),
                }
            })
            .collect(),
        kernel,
        unknown_unmaps: m.unknown_unmaps,
        lazily_freed_bytes: m.lazily_freed,
        execs: m.execs,
        oom: m.oom.map(|o| OomReport {
            at_s: opts.seconds(o.ts_ns),
            anon_rss_bytes: o.anon_rss,
            file_rss_bytes: o.file_rss,
            shmem_rss_bytes: o.shmem_rss,
            pgtables_bytes: o.pgtables,
            total_vm_bytes: o.total_vm,
            oom_score_adj: o.oom_score_adj,
        }),
    }
}

fn frame_line(frames: &[Frame]) -> String {
    let names: Vec<String> = frames.iter().take(6).map(Frame::label).collect();
    if names.is_empty() {
        "(no stack)".into()
    } else {
        names.join(" < ")
    }
}

fn line(out: &mut dyn Write, label: &str, bytes: u64, why: &str) -> io::Result<()> {
    let text = format!(
        "    {label:<38} {:>15} B {:>10}  {why}",
        group(bytes),
        human(bytes)
    );
    writeln!(out, "{}", text.trim_end())
}

/// One line of the memory explanation: depth, label, why, whether it needs
/// the resident figures (RSS), and its bytes.
pub(crate) type Line = (
    u8,
    &'static str,
    &'static str,
    bool,
    fn(&Explanation) -> u64,
);

/// The lines of the memory explanation, shared by the text and HTML reports.
#[rustfmt::skip]
pub(crate) const EXPLAINED: [Line; 13] = [
    (0, "allocated (heap, live)", "what the program asked malloc & co for and still holds", false, |e| e.allocated),
    (1, "of which resident", "on pages the program touched", true, |e| e.allocated_resident),
    (1, "of which never touched", "no fault on those pages: allocated, not resident (calloc, zeros)", true, |e| e.allocated_untouched),
    (0, "resident (RSS)", "what the kernel holds in RAM", true, |e| e.resident),
    (1, "anon", "private memory: the heap, stacks, anonymous mappings", true, |e| e.resident_anon),
    (2, "allocator: retained, not allocated", "freed but kept by the allocator, and slack", true, |e| e.retained_by_allocator),
    (2, "other anonymous mappings", "thread stacks, the program's own mmaps", true, |e| e.other_anon),
    (2, "no fault seen", "resident before tracing, copied by fork, or populated", true, |e| e.anon_unattributed),
    (1, "file", "code, libraries and mapped files", true, |e| e.resident_file),
    (1, "shmem", "shared memory: tmpfs, memfd, shared anonymous mappings", true, |e| e.resident_shmem),
    (0, "swap", "swapped out: not in RAM, not in RSS", true, |e| e.swap),
    (0, "mapped (mmap/mremap while traced)", "address space; resident only where touched", false, |e| e.mapped),
    (1, "by the allocator", "arenas and large blocks the allocator mapped", false, |e| e.mapped_by_allocator),
];

/// `part` as a percentage of `whole`, one decimal; 0 of nothing.
fn coverage_pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (1000.0 * part as f64 / whole as f64).round() / 10.0
}

/// The one-line resident summary under a process header, and the coverage
/// meter.
pub fn render_summary(r: &ResidentSummary, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  resident: {} [anon {}, file {}, shmem {}, swap {}; peak {}]",
        human(r.resident_bytes),
        human(r.anon_bytes),
        human(r.file_bytes),
        human(r.shmem_bytes),
        human(r.swap_bytes),
        human(r.peak_resident_bytes),
    )?;
    writeln!(
        out,
        "  coverage: traced allocations hold {:.1}% of anon ({} of {}){}",
        r.coverage_pct,
        human(r.traced_anon_bytes),
        human(r.anon_bytes),
        if r.coverage_pct < 50.0 && r.anon_bytes >= 4 << 20 {
            "; the rest is memory memtrace did not see allocated (see --view memory)"
        } else {
            ""
        }
    )
}

/// The `memory` view of one process as text.
pub fn render(m: &MemoryReport, out: &mut dyn Write) -> io::Result<()> {
    let e = &m.explained;
    if !m.resident_known {
        writeln!(
            out,
            "  memory: allocated {}; resident memory was not reported (no kernel events in this trace)",
            human(e.allocated)
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "  memory: allocated {} vs resident {}",
        human(e.allocated),
        human(e.resident)
    )?;
    for (depth, label, why, _, v) in EXPLAINED {
        let indent = "  ".repeat(depth as usize);
        line(out, &format!("{indent}{label}"), v(e), why)?;
    }
    if let Some(k) = &m.kernel {
        line(
            out,
            "kernel (not in RSS)",
            e.kernel,
            "slab objects, pages and per-CPU memory charged to it",
        )?;
        writeln!(
            out,
            "      slab {} live of {} allocated; pages {} of {} ({} of them hold slab); per-CPU {} of {}; {} frees of unseen allocations",
            human(k.slab.live_bytes),
            human(k.slab.total_bytes),
            human(k.pages.live_bytes),
            human(k.pages.total_bytes),
            human(k.slab_pages.live_bytes),
            human(k.percpu.live_bytes),
            human(k.percpu.total_bytes),
            group(k.unknown_frees)
        )?;
    }
    let f = &m.faults;
    writeln!(
        out,
        "  faults: {} made {} resident ({} more with no fault); 1 in {} sampled for its stack",
        group(f.count),
        human(f.bytes),
        human(f.unplaced_bytes),
        f.sample_every
    )?;
    if !m.fault_stacks.is_empty() {
        writeln!(out, "  made resident by (estimated from samples):")?;
        for s in &m.fault_stacks {
            writeln!(
                out,
                "    {:>10}  {}",
                human(s.estimated_bytes),
                frame_line(&s.frames)
            )?;
        }
    }
    let mapped: Vec<&MappingReport> = m.mappings.iter().filter(|r| r.resident_bytes > 0).collect();
    if !mapped.is_empty() {
        writeln!(out, "  mappings with the most resident bytes:")?;
        for r in mapped {
            writeln!(
                out,
                "    {} {:>10} mapped, {:>10} resident, {:?}{}  {}",
                r.start,
                human(r.bytes),
                human(r.resident_bytes),
                r.backing,
                if r.by_allocator { " (allocator)" } else { "" },
                frame_line(&r.frames)
            )?;
        }
    }
    if let Some(k) = &m.kernel
        && !k.stacks.is_empty()
    {
        writeln!(out, "  kernel memory by kernel stack:")?;
        for s in &k.stacks {
            writeln!(
                out,
                "    {:>10} live, {:>10} total  {:<10} {}",
                human(s.bytes.live_bytes),
                human(s.bytes.total_bytes),
                s.allocator,
                frame_line(&s.frames)
            )?;
        }
    }
    if let Some(o) = &m.oom {
        writeln!(
            out,
            "  OOM-killed at {:.3} s: anon-rss {}, file-rss {}, shmem-rss {}, page tables {}",
            o.at_s,
            human(o.anon_rss_bytes),
            human(o.file_rss_bytes),
            human(o.shmem_rss_bytes),
            human(o.pgtables_bytes)
        )?;
    }
    if m.unknown_unmaps > 0 || m.lazily_freed_bytes > 0 || m.execs > 0 {
        writeln!(
            out,
            "  {} unmaps of ranges mapped before tracing; {} given back with MADV_FREE; {} execs",
            group(m.unknown_unmaps),
            human(m.lazily_freed_bytes),
            m.execs
        )?;
    }
    Ok(())
}
