//! Reports: plain data built from the aggregator's state, then rendered.
//!
//! [`build`] is pure apart from the [`Symbolize`] it is handed: it selects,
//! sorts and cuts (`--top`, `--older-than`) the aggregator's stacks for the
//! views asked for, and resolves their frames; [`samples`] lists every stack
//! with its weights for the stack-shaped formats (flame graph, folded,
//! pprof). Renderers, one file per format, are functions of those. Nothing
//! here reads the clock or `/proc`.

pub mod flame;
pub mod folded;
pub mod hlog;
pub mod html;
pub mod json;
pub mod memory;
pub mod pprof;
pub mod python_lines;
pub mod svg;
pub mod text;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::agg::{Aggregator, Process, StackId, Stats};
use crate::symbolize::{Frame, Symbolize};

/// Version of the JSON layout. Fields may be added without a bump; none are
/// removed or renamed without one.
pub const REPORT_VERSION: u32 = 2;

/// One angle on a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// Outstanding allocations at the end, by stack.
    Leaks,
    /// The high-water mark of live bytes per process, and what held them then.
    Peak,
    /// Allocations freed within `--temporary-ms` of being made, by stack.
    Temporary,
    /// Size and lifetime distributions, per process and per top stack.
    Histograms,
    /// Live bytes over time, per process.
    Timeline,
    /// Allocated heap next to resident, mapped and kernel memory, and what
    /// explains the difference.
    Memory,
    /// Live and allocated bytes by the Python line that allocated them
    /// (CPython processes; tracemalloc's grouping, from outside).
    PythonLines,
}

impl View {
    /// Every view, in the order the HTML report shows them.
    pub const ALL: [View; 6] = [
        View::Leaks,
        View::Memory,
        View::Peak,
        View::Temporary,
        View::Histograms,
        View::Timeline,
    ];

    /// Its name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            View::Leaks => "leaks",
            View::Peak => "peak",
            View::Temporary => "temporary",
            View::Histograms => "histograms",
            View::Timeline => "timeline",
            View::Memory => "memory",
            View::PythonLines => "python-lines",
        }
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables (every view).
    Text,
    /// One JSON document (every view; layout in the README).
    Json,
    /// Flame graph, SVG (views leaks, peak, temporary).
    Flamegraph,
    /// Folded stacks, `frame;frame;frame weight` (views leaks, peak, temporary).
    Folded,
    /// pprof profile, gzip-compressed protobuf (views leaks, peak, temporary).
    Pprof,
    /// One self-contained HTML page with every view.
    Html,
    /// SVG plot (view timeline).
    Svg,
    /// HdrHistogram interval log (view histograms).
    Hlog,
}

impl Format {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Flamegraph => "flamegraph",
            Format::Folded => "folded",
            Format::Pprof => "pprof",
            Format::Html => "html",
            Format::Svg => "svg",
            Format::Hlog => "hlog",
        }
    }

    /// Whether it can show `view`.
    pub fn shows(self, view: View) -> bool {
        match self {
            Format::Text | Format::Json | Format::Html => true,
            Format::Flamegraph | Format::Folded | Format::Pprof => {
                matches!(view, View::Leaks | View::Peak | View::Temporary)
            }
            Format::Svg => view == View::Timeline,
            Format::Hlog => view == View::Histograms,
        }
    }
}

/// Which number weighs a stack in stack-shaped formats (see [`Sample`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weight {
    /// Bytes live (at the end, or at the peak).
    LiveBytes,
    /// Blocks live.
    LiveCount,
    /// Bytes allocated (for `temporary`: in temporary blocks).
    TotalBytes,
    /// Blocks allocated (likewise).
    TotalCount,
}

impl Weight {
    /// The default for a view: what it is about.
    pub fn default_for(view: View) -> Self {
        match view {
            View::Temporary => Weight::TotalCount,
            _ => Weight::LiveBytes,
        }
    }

    /// The sample's value under this weight.
    pub fn of(self, s: &Sample) -> u64 {
        match self {
            Weight::LiveBytes => s.live_bytes,
            Weight::LiveCount => s.live_count,
            Weight::TotalBytes => s.total_bytes,
            Weight::TotalCount => s.total_count,
        }
    }

    /// Unit name (`bytes` or `blocks`).
    pub fn unit(self) -> &'static str {
        match self {
            Weight::LiveBytes | Weight::TotalBytes => "bytes",
            Weight::LiveCount | Weight::TotalCount => "blocks",
        }
    }
}

/// What to show.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Stacks per process; 0 shows all.
    pub top: usize,
    /// Show only blocks allocated at or before this time (CLOCK_MONOTONIC
    /// ns), for `--older-than`.
    pub live_before_ns: Option<u64>,
    /// Length of the trace so far.
    pub duration_s: f64,
    /// When the trace began (CLOCK_MONOTONIC ns); times in reports are
    /// seconds from here.
    pub start_ns: u64,
    /// The views to build (the leaks table is always built).
    pub views: Vec<View>,
}

impl Options {
    pub(crate) fn seconds(&self, ts_ns: u64) -> f64 {
        ts_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    fn wants(&self, v: View) -> bool {
        self.views.contains(&v)
    }
}

/// Which allocator functions were probed in one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Probes {
    /// The file, as given to the kernel.
    pub module: String,
    /// The allocators found in it ("glibc", "jemalloc", "Rust
    /// #[global_allocator]", ...); empty for the loader's hook.
    pub allocators: Vec<String>,
    /// Process ids the probes are limited to; empty means every process.
    pub pids: Vec<u32>,
    /// Functions probed (one name per distinct address).
    pub functions: Vec<String>,
    /// Functions looked for and not found in this file.
    pub missing: Vec<String>,
}

impl Probes {
    /// `all processes`, or `pid 1,2`.
    pub fn scope(&self) -> String {
        if self.pids.is_empty() {
            return "all processes".into();
        }
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        format!("pid {}", pids.join(","))
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// The views built, in JSON the one shown.
    pub views: Vec<View>,
    /// Always `exact` for now (every call traced).
    pub mode: &'static str,
    /// Blocks freed within this many ms count as temporary.
    pub temporary_ms: f64,
    /// Seconds traced.
    pub duration_s: f64,
    /// Processes, most live bytes first.
    pub processes: Vec<ProcessReport>,
    /// What was not seen, by reason. Every reason is present, zeros too.
    pub lost: BTreeMap<&'static str, u64>,
    /// Traced calls (allocator entries and frees) counted by the kernel side.
    pub traced_calls: u64,
    /// Where probes were attached.
    pub probes: Vec<Probes>,
    /// Time memtrace's eBPF programs ran (`--probe-cost`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe_cost: Vec<ProgramCost>,
    /// What memtrace itself used while tracing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memtrace: Option<SelfUsage>,
    /// For a report from a recording: how much of it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording: Option<crate::record::reader::Integrity>,
}

/// One process instance.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    /// Process id.
    pub pid: u32,
    /// Command name, when it could be read.
    pub comm: Option<String>,
    /// The process that forked it, when it was followed from its fork
    /// (`--follow-forks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Whether the process exited while traced.
    pub exited: bool,
    /// Bytes allocated and not freed.
    pub live_bytes: u64,
    /// Blocks allocated and not freed.
    pub live_count: u64,
    /// Bytes allocated while traced.
    pub total_bytes: u64,
    /// Blocks allocated while traced.
    pub total_count: u64,
    /// Bytes freed (of blocks allocated while traced).
    pub freed_bytes: u64,
    /// Blocks freed (of blocks allocated while traced).
    pub freed_count: u64,
    /// Frees of addresses not known to be live (allocated before tracing,
    /// double frees, or allocations lost).
    pub unknown_frees: u64,
    /// Blocks the allocator handed out again before their free was seen.
    pub missed_frees: u64,
    /// Records of this process the full ring buffer dropped, by call site:
    /// each site's allocations here plus those counted in its stacks are all
    /// it made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<LostReport>,
    /// Its stacks were copied and walked by DWARF call frame information
    /// (`--unwind dwarf`, or `auto` for its program); absent when walked by
    /// frame pointers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dwarf: Option<DwarfWalks>,
    /// Distribution of the sizes allocated.
    pub sizes: SizeSummary,
    /// Stacks shown (after `--top` and `--older-than`).
    pub stacks: Vec<StackReport>,
    /// Stacks with allocations not shown because of `--top`.
    pub stacks_omitted: usize,
    /// Seconds from the trace's start to this process's first event.
    pub first_s: f64,
    /// Seconds from the trace's start to its last event.
    pub last_s: f64,
    /// The high-water mark (view `peak`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<PeakReport>,
    /// Short-lived allocations (view `temporary`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temporary: Option<TemporaryReport>,
    /// Distributions (view `histograms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histograms: Option<HistogramsReport>,
    /// Live bytes over time (view `timeline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<TimelineReport>,
    /// Resident memory (RSS) by type, when the kernel reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident: Option<memory::ResidentSummary>,
    /// Allocated versus resident, mapped and kernel memory (view `memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<memory::MemoryReport>,
    /// Its Python interpreter and how reading its Python frames went;
    /// absent for a process memtrace found no interpreter in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<crate::python::PythonStacks>,
    /// Bytes by Python line (view `python-lines`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_lines: Option<python_lines::PythonLinesReport>,
}

/// A process's high-water mark of live bytes and its breakdown at that
/// moment.
#[derive(Clone, Debug, Serialize)]
pub struct PeakReport {
    /// Live bytes at the peak.
    pub bytes: u64,
    /// Live blocks at the peak.
    pub count: u64,
    /// Seconds from the trace's start to when the peak was first reached.
    pub at_s: f64,
    /// Stacks holding memory at the peak, most bytes first; their
    /// `live_bytes`/`live_count` are the values at the peak.
    pub stacks: Vec<StackReport>,
    /// Stacks holding memory at the peak not shown because of `--top`.
    pub stacks_omitted: usize,
}

/// Allocations freed within the threshold.
#[derive(Clone, Debug, Serialize)]
pub struct TemporaryReport {
    /// Temporary blocks.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Stacks with temporary allocations, most temporary blocks first.
    pub stacks: Vec<TemporaryStack>,
    /// Stacks with temporary allocations not shown because of `--top`.
    pub stacks_omitted: usize,
}

/// One stack's temporary allocations.
#[derive(Clone, Debug, Serialize)]
pub struct TemporaryStack {
    /// Temporary blocks.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Every block allocated here.
    pub total_count: u64,
    /// Their bytes.
    pub total_bytes: u64,
    /// Caller of the allocator first.
    pub frames: Vec<Frame>,
}

/// Size and lifetime distributions of a process and its top stacks.
#[derive(Clone, Debug, Serialize)]
pub struct HistogramsReport {
    /// Allocation sizes, bytes.
    pub sizes: Distribution,
    /// Lifetimes of freed blocks, ns.
    pub lifetimes: Distribution,
    /// The top stacks by blocks allocated.
    pub stacks: Vec<StackHistograms>,
    /// Stacks not shown because of `--top`.
    pub stacks_omitted: usize,
}

/// One stack's distributions.
#[derive(Clone, Debug, Serialize)]
pub struct StackHistograms {
    /// Allocation sizes, bytes.
    pub sizes: Distribution,
    /// Lifetimes of freed blocks, ns.
    pub lifetimes: Distribution,
    /// Caller of the allocator first.
    pub frames: Vec<Frame>,
}

/// A summary of one HdrHistogram. Values are within the histogram's
/// precision (0.1% per process, 1% per stack) of the exact ones.
#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    /// Values recorded.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// For bar charts: (upper bound of a power-of-two bucket, values in it),
    /// for the non-empty buckets from the smallest to the largest value.
    pub buckets: Vec<(u64, u64)>,
    /// The histogram itself, for the HdrHistogram log export.
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl Distribution {
    /// Summarizes `h`. Each value is reported as the lower edge of its
    /// histogram bucket (exact for round sizes like 256 or 65,536, never
    /// above the true value), capped by the largest.
    pub fn of(h: &Histogram<u64>) -> Self {
        let max = if h.is_empty() {
            0
        } else {
            h.lowest_equivalent(h.max())
        };
        let q = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.lowest_equivalent(h.value_at_quantile(q)).min(max)
            }
        };
        // Each recorded bucket goes whole into the power of two above its
        // lower edge, so no value counts twice.
        let mut bars: BTreeMap<u64, u64> = BTreeMap::new();
        for v in h.iter_recorded() {
            let low = h.lowest_equivalent(v.value_iterated_to());
            *bars.entry(low.max(1).next_power_of_two()).or_default() += v.count_at_value();
        }
        let buckets = bars.into_iter().collect();
        Self {
            count: h.len(),
            mean: if h.is_empty() { 0.0 } else { h.mean() },
            min: if h.is_empty() { 0 } else { h.min() },
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max,
            buckets,
            histogram: h.clone(),
        }
    }
}

/// Live bytes over time.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineReport {
    /// Width of one point, seconds.
    pub step_s: f64,
    /// Points: seconds from the trace's start to the point's start, the
    /// most live bytes within it, and live bytes at its end.
    pub points: Vec<TimelinePoint>,
}

/// One point of a timeline.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TimelinePoint {
    /// Seconds from the trace's start.
    pub t_s: f64,
    /// Most live bytes within the point.
    pub max_bytes: u64,
    /// Live bytes at its end.
    pub end_bytes: u64,
    /// Most resident bytes (RSS) within the point, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_max_bytes: Option<u64>,
    /// Resident bytes at its end, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_end_bytes: Option<u64>,
}

/// Allocation sizes, in bytes: exact `min` and `max`; percentiles from an
/// HdrHistogram with 3 significant digits (within 0.1% of the exact value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SizeSummary {
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl SizeSummary {
    fn of(p: &Process) -> Self {
        let Some((min, max)) = p.size_range else {
            return Self::default();
        };
        // A percentile is reported as its bucket's lower edge (exact for
        // sizes like 4096 or 5000), clamped to the exact range.
        let q = |q: f64| {
            p.dist
                .sizes
                .lowest_equivalent(p.dist.sizes.value_at_quantile(q))
                .clamp(min, max)
        };
        Self {
            min,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max,
        }
    }
}

/// One allocating stack.
#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    /// Bytes allocated here and not freed.
    pub live_bytes: u64,
    /// Blocks allocated here and not freed.
    pub live_count: u64,
    /// Bytes allocated here.
    pub total_bytes: u64,
    /// Blocks allocated here.
    pub total_count: u64,
    /// Caller of the allocator first.
    pub frames: Vec<Frame>,
}

/// Counters of what was not seen, gathered outside the aggregator.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// The loss counters, by name: the kernel side's, and the DWARF
    /// unwinder's ([`crate::unwind::STACKS_CUT`]) when it walked any stack.
    pub kernel: Vec<(&'static str, u64)>,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Traced calls.
    pub traced_calls: u64,
    /// Time memtrace's eBPF programs ran, with `--probe-cost`; else empty.
    pub probe_cost: Vec<ProgramCost>,
    /// Allocator records the full ring buffer dropped, by process and call
    /// site.
    pub lost_sites: Vec<LostSite>,
    /// What memtrace itself used (from a recording: when it was made).
    pub memtrace: Option<SelfUsage>,
    /// Processes whose stacks were walked by DWARF, and how those walks
    /// went (not kept in recordings).
    pub dwarf: BTreeMap<u32, DwarfWalks>,
    /// Python processes: their interpreter, and how reading their Python
    /// frames went (not kept in recordings).
    pub python: BTreeMap<u32, crate::python::PythonStacks>,
}

/// The stacks of one process walked by DWARF (`--unwind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DwarfWalks {
    /// Stacks copied and walked.
    pub stacks: u64,
    /// Of which stopped before the outermost frame.
    pub cut: u64,
}

/// memtrace's own footprint, so a report shows what tracing cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SelfUsage {
    /// Peak resident memory (`ru_maxrss`), the ring buffer's pages included.
    pub peak_rss_bytes: u64,
    /// CPU time, user and system.
    pub cpu_seconds: f64,
}

impl SelfUsage {
    /// This process's usage so far.
    pub fn now() -> Self {
        // SAFETY: an all-zero rusage is valid; getrusage fills it.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a valid out-pointer.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Self::from(crate::record::SelfCounters {
            peak_rss_bytes: u.ru_maxrss as u64 * 1024,
            cpu_us: us(u.ru_utime) + us(u.ru_stime),
        })
    }
}

// Through whole microseconds both ways, so a report from a recording shows
// exactly what the live one did.
impl From<crate::record::SelfCounters> for SelfUsage {
    fn from(c: crate::record::SelfCounters) -> Self {
        Self {
            peak_rss_bytes: c.peak_rss_bytes,
            cpu_seconds: c.cpu_us as f64 / 1e6,
        }
    }
}

impl From<SelfUsage> for crate::record::SelfCounters {
    fn from(u: SelfUsage) -> Self {
        Self {
            peak_rss_bytes: u.peak_rss_bytes,
            cpu_us: (u.cpu_seconds * 1e6).round() as u64,
        }
    }
}

/// What the full ring buffer dropped of one process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LostReport {
    /// Allocations dropped.
    pub allocations: u64,
    /// Bytes they asked for.
    pub bytes: u64,
    /// Frees dropped (their blocks stay counted as live).
    pub frees: u64,
    /// Allocations dropped by call site, most first (cut by `--top`).
    pub sites: Vec<LostSiteReport>,
}

/// Allocations dropped at one call site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LostSiteReport {
    /// Allocations dropped.
    pub count: u64,
    /// Bytes they asked for.
    pub bytes: u64,
    /// The call site: the caller of the allocator function (one frame, more
    /// when inlined).
    pub frames: Vec<Frame>,
}

/// Allocator records of one process the full ring buffer dropped at one
/// call site (`site` 0: its frees).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostSite {
    /// Process id.
    pub pid: u32,
    /// Return address into the allocator's caller; 0 for frees.
    pub site: u64,
    /// Records dropped.
    pub count: u64,
    /// Bytes those allocations asked for (0 for frees).
    pub bytes: u64,
}

/// The time one eBPF program ran, as the kernel's BPF statistics count it
/// (the program's own run, not the trap that led to it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgramCost {
    /// Program name, e.g. `malloc_exit`.
    pub program: String,
    /// Times it ran.
    pub runs: u64,
    /// Nanoseconds it ran, in all.
    pub run_ns: u64,
}

impl ProgramCost {
    /// Mean nanoseconds per run.
    pub fn ns_per_run(&self) -> f64 {
        self.run_ns as f64 / self.runs.max(1) as f64
    }
}

/// Builds the report of everything the aggregator holds.
pub fn build(
    agg: &Aggregator,
    ledger: &Ledger,
    probes: &[Probes],
    sym: &mut dyn Symbolize,
    opts: &Options,
) -> Report {
    let mut processes: Vec<ProcessReport> = agg
        .processes()
        .map(|p| process_report(p, sym, opts, agg.config().fault_sample))
        .collect();
    processes.sort_by(|a, b| {
        (b.live_bytes, b.total_bytes, a.pid).cmp(&(a.live_bytes, a.total_bytes, b.pid))
    });
    // One account per pid: on the first (largest) instance that has it.
    let mut seen = std::collections::HashSet::new();
    for p in &mut processes {
        if seen.insert(p.pid) {
            p.lost = lost_report(p.pid, ledger, sym, opts);
            p.dwarf = ledger.dwarf.get(&p.pid).copied();
            p.python = ledger.python.get(&p.pid).cloned();
        }
    }
    let mut lost: BTreeMap<&'static str, u64> = ledger.kernel.iter().copied().collect();
    lost.insert("decode_errors", ledger.decode_errors);
    lost.insert("unknown_frees", agg.unknown_frees());
    lost.insert("missed_frees", agg.missed_frees());
    Report {
        version: REPORT_VERSION,
        views: opts.views.clone(),
        mode: "exact",
        temporary_ms: agg.config().temporary_ns as f64 / 1e6,
        duration_s: opts.duration_s,
        processes,
        lost,
        traced_calls: ledger.traced_calls,
        probes: probes.to_vec(),
        probe_cost: ledger.probe_cost.clone(),
        memtrace: ledger.memtrace,
        recording: None,
    }
}

/// What the full ring buffer dropped of process `pid`, if anything. (A pid
/// that ran two programs in turn has one account of losses.)
fn lost_report(
    pid: u32,
    ledger: &Ledger,
    sym: &mut dyn Symbolize,
    opts: &Options,
) -> Option<LostReport> {
    let mut mine: Vec<&LostSite> = ledger.lost_sites.iter().filter(|l| l.pid == pid).collect();
    if mine.is_empty() {
        return None;
    }
    mine.sort_by(|a, b| (b.count, b.bytes, a.site).cmp(&(a.count, a.bytes, b.site)));
    let (frees, allocs): (Vec<&LostSite>, Vec<&LostSite>) =
        mine.into_iter().partition(|l| l.site == 0);
    let shown = top(opts, allocs.len());
    Some(LostReport {
        allocations: allocs.iter().map(|l| l.count).sum(),
        bytes: allocs.iter().map(|l| l.bytes).sum(),
        frees: frees.iter().map(|l| l.count).sum(),
        sites: allocs[..shown]
            .iter()
            .map(|l| LostSiteReport {
                count: l.count,
                bytes: l.bytes,
                frames: sym.frames(pid, &[l.site]),
            })
            .collect(),
    })
}

fn process_report(
    p: &Process,
    sym: &mut dyn Symbolize,
    opts: &Options,
    fault_sample: u32,
) -> ProcessReport {
    let older = opts.live_before_ns.map(|cutoff| p.live_older_than(cutoff));
    // The stack's counts, with live ones from blocks older than the cutoff
    // only when `--older-than` asks (stacks without such blocks drop out).
    let row = |id: StackId| -> Option<Stats> {
        let stats = p.stacks()[id as usize].stats;
        match &older {
            None => Some(stats),
            Some(old) => old.get(&id).map(|o| Stats {
                live_bytes: o.live_bytes,
                live_count: o.live_count,
                ..stats
            }),
        }
    };
    let (ids, omitted) = ranked(
        (0..p.stacks().len() as StackId).filter(|&id| row(id).is_some()),
        opts,
        |id| row(id).map(|s| (s.live_bytes, s.total_bytes)),
    );
    let stacks = ids
        .iter()
        .map(|&id| {
            let s = row(id).expect("ranked ids have rows");
            StackReport {
                live_bytes: s.live_bytes,
                live_count: s.live_count,
                total_bytes: s.total_bytes,
                total_count: s.total_count,
                frames: sym.frames(p.pid, &p.frames(id)),
            }
        })
        .collect();
    let t = p.totals;
    let peak = opts.wants(View::Peak).then(|| peak_report(p, sym, opts));
    let temporary = opts
        .wants(View::Temporary)
        .then(|| temporary_report(p, sym, opts));
    let histograms = opts
        .wants(View::Histograms)
        .then(|| histograms_report(p, sym, opts));
    let timeline = opts.wants(View::Timeline).then(|| {
        let resident = &p.timeline.resident;
        TimelineReport {
            step_s: p.timeline.step_ns as f64 / 1e9,
            points: p
                .timeline
                .points
                .iter()
                .enumerate()
                .map(|(i, &(max_bytes, end_bytes))| {
                    let rss = resident.get(i).copied().flatten();
                    TimelinePoint {
                        t_s: opts.seconds(p.timeline.start_ns + i as u64 * p.timeline.step_ns),
                        max_bytes,
                        end_bytes,
                        resident_max_bytes: rss.map(|r| r.0),
                        resident_end_bytes: rss.map(|r| r.1),
                    }
                })
                .collect(),
        }
    });
    let memory = opts
        .wants(View::Memory)
        .then(|| memory::build(p, sym, opts, fault_sample));
    let python_lines = opts
        .wants(View::PythonLines)
        .then(|| python_lines::build(p, sym, opts));
    ProcessReport {
        pid: p.pid,
        comm: sym.comm(p.pid),
        parent: p.parent,
        exited: p.exit_ts_ns.is_some(),
        live_bytes: t.live_bytes,
        live_count: t.live_count,
        total_bytes: t.total_bytes,
        total_count: t.total_count,
        freed_bytes: t.freed_bytes,
        freed_count: t.freed_count,
        unknown_frees: p.unknown_frees,
        missed_frees: p.missed_frees,
        lost: None,
        dwarf: None,
        sizes: SizeSummary::of(p),
        stacks,
        stacks_omitted: omitted,
        first_s: opts.seconds(p.first_ts_ns),
        last_s: opts.seconds(p.last_ts_ns),
        peak,
        temporary,
        histograms,
        timeline,
        resident: memory::ResidentSummary::of(p),
        memory,
        python: None,
        python_lines,
    }
}

/// How many of `n` rows `--top` shows.
pub(crate) fn top(opts: &Options, n: usize) -> usize {
    if opts.top == 0 { n } else { opts.top.min(n) }
}

/// The stacks `--top` shows, by descending `key` (ties: lower id first),
/// and how many were left out. Selects before it sorts, and holds ids only:
/// a process may have hundreds of thousands of stacks, and the report
/// should not cost memtrace a copy of their counts.
fn ranked<K: Ord>(
    ids: impl Iterator<Item = StackId>,
    opts: &Options,
    key: impl Fn(StackId) -> K,
) -> (Vec<StackId>, usize) {
    let mut ids: Vec<StackId> = ids.collect();
    let order = |a: &StackId, b: &StackId| key(*b).cmp(&key(*a)).then(a.cmp(b));
    let shown = top(opts, ids.len());
    let omitted = ids.len() - shown;
    if shown < ids.len() {
        if shown > 0 {
            ids.select_nth_unstable_by(shown - 1, order);
        }
        ids.truncate(shown);
    }
    ids.sort_unstable_by(order);
    (ids, omitted)
}

fn peak_report(p: &Process, sym: &mut dyn Symbolize, opts: &Options) -> PeakReport {
    let at = p.peak_stacks();
    let (ids, omitted) = ranked(
        (0..at.len() as StackId).filter(|&id| at[id as usize].0 > 0),
        opts,
        |id| at[id as usize],
    );
    PeakReport {
        bytes: p.peak.bytes,
        count: p.peak.count,
        at_s: opts.seconds(p.peak.ts_ns),
        stacks: ids
            .iter()
            .map(|&id| {
                let (bytes, count) = at[id as usize];
                let s = &p.stacks()[id as usize];
                StackReport {
                    live_bytes: bytes,
                    live_count: count,
                    total_bytes: s.stats.total_bytes,
                    total_count: s.stats.total_count,
                    frames: sym.frames(p.pid, &p.frames(id)),
                }
            })
            .collect(),
        stacks_omitted: omitted,
    }
}

fn temporary_report(p: &Process, sym: &mut dyn Symbolize, opts: &Options) -> TemporaryReport {
    let stack = |id: StackId| &p.stacks()[id as usize];
    let (ids, omitted) = ranked(
        (0..p.stacks().len() as StackId).filter(|&id| stack(id).temporary.count > 0),
        opts,
        |id| (stack(id).temporary.count, stack(id).temporary.bytes),
    );
    TemporaryReport {
        count: p.temporary.count,
        bytes: p.temporary.bytes,
        stacks: ids
            .iter()
            .map(|&id| {
                let s = stack(id);
                TemporaryStack {
                    count: s.temporary.count,
                    bytes: s.temporary.bytes,
                    total_count: s.stats.total_count,
                    total_bytes: s.stats.total_bytes,
                    frames: sym.frames(p.pid, &p.frames(id)),
                }
            })
            .collect(),
        stacks_omitted: omitted,
    }
}

fn histograms_report(p: &Process, sym: &mut dyn Symbolize, opts: &Options) -> HistogramsReport {
    let stack = |id: StackId| &p.stacks()[id as usize];
    let (ids, omitted) = ranked(
        (0..p.stacks().len() as StackId).filter(|&id| stack(id).stats.total_count > 0),
        opts,
        |id| (stack(id).stats.total_count, stack(id).stats.total_bytes),
    );
    HistogramsReport {
        sizes: Distribution::of(&p.dist.sizes),
        lifetimes: Distribution::of(&p.dist.lifetimes),
        stacks: ids
            .iter()
            .map(|&id| {
                let s = stack(id);
                StackHistograms {
                    sizes: Distribution::of(&s.dist.sizes.histogram()),
                    lifetimes: Distribution::of(&s.dist.lifetimes.histogram()),
                    frames: sym.frames(p.pid, &p.frames(id)),
                }
            })
            .collect(),
        stacks_omitted: omitted,
    }
}

/// One stack with every weight a stack-shaped format may use.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Process id.
    pub pid: u32,
    /// Its command name.
    pub comm: Option<String>,
    /// Caller of the allocator first.
    pub frames: Vec<Frame>,
    /// Bytes live (at the end for `leaks`, at the peak for `peak`; 0 for
    /// `temporary`).
    pub live_bytes: u64,
    /// Blocks live, likewise.
    pub live_count: u64,
    /// Bytes allocated (for `temporary`: of blocks freed within the
    /// threshold).
    pub total_bytes: u64,
    /// Blocks allocated, likewise.
    pub total_count: u64,
}

/// Every stack of every process with its weights for `view` (`leaks`,
/// `peak` or `temporary`), unsorted and uncut: stack-shaped formats show
/// everything. Stacks whose weights are all zero are left out.
pub fn samples(agg: &Aggregator, sym: &mut dyn Symbolize, view: View) -> Vec<Sample> {
    let mut out = Vec::new();
    for p in agg.processes() {
        let comm = sym.comm(p.pid);
        let at_peak = (view == View::Peak).then(|| p.peak_stacks());
        for (i, s) in p.stacks().iter().enumerate() {
            let (live_bytes, live_count, total_bytes, total_count) = match view {
                View::Peak => {
                    let (b, c) = at_peak
                        .as_ref()
                        .and_then(|v| v.get(i).copied())
                        .unwrap_or((0, 0));
                    (b, c, s.stats.total_bytes, s.stats.total_count)
                }
                View::Temporary => (0, 0, s.temporary.bytes, s.temporary.count),
                _ => (
                    s.stats.live_bytes,
                    s.stats.live_count,
                    s.stats.total_bytes,
                    s.stats.total_count,
                ),
            };
            if live_bytes == 0 && total_bytes == 0 && live_count == 0 && total_count == 0 {
                continue;
            }
            if view == View::Peak && live_bytes == 0 {
                continue;
            }
            out.push(Sample {
                pid: p.pid,
                comm: comm.clone(),
                frames: sym.frames(p.pid, &p.frames(i as StackId)),
                live_bytes,
                live_count,
                total_bytes,
                total_count,
            });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Alloc, Event};
    use memtrace_common::AllocFn;
    use std::collections::HashMap;

    /// A symbolizer from a table: address → function name.
    pub struct Table(pub HashMap<u64, &'static str>);

    impl Symbolize for Table {
        fn frames(&mut self, _pid: u32, stack: &[u64]) -> Vec<Frame> {
            stack
                .iter()
                .map(|a| Frame {
                    function: self.0.get(a).map(|s| s.to_string()),
                    address: *a,
                    ..Frame::default()
                })
                .collect()
        }
        fn comm(&self, _pid: u32) -> Option<String> {
            Some("prog".into())
        }
    }

    pub fn sample() -> (Aggregator, Table) {
        let mut agg = Aggregator::new(crate::agg::Config::default());
        let mut ts = 0;
        let mut alloc = |addr, size, stack: &[u64]| {
            ts += 10;
            Event::Alloc(Alloc {
                pid: 42,
                tid: 42,
                ts_ns: ts,
                entry_ts_ns: ts - 1,
                addr,
                size,
                func: AllocFn::Malloc,
                old_addr: None,
                stack: stack.to_vec(),
                sample_shift: 0,
            })
        };
        let events = [
            alloc(0x10, 100, &[1, 9]),
            alloc(0x20, 100, &[1, 9]),
            alloc(0x30, 5000, &[2, 9]),
            alloc(0x40, 64, &[3, 9]),
            Event::Free {
                pid: 42,
                ts_ns: 100,
                addr: 0x40,
            },
        ];
        for e in &events {
            agg.on_event(e);
        }
        let table = Table(HashMap::from([
            (1, "leak_small"),
            (2, "leak_big"),
            (3, "no_leak"),
            (9, "main"),
        ]));
        (agg, table)
    }

    #[test]
    fn lost_records_are_reported_by_call_site_under_their_process() {
        let (agg, mut table) = sample();
        let lost = |pid, site, count, bytes| LostSite {
            pid,
            site,
            count,
            bytes,
        };
        let ledger = Ledger {
            lost_sites: vec![
                lost(42, 1, 5, 500),
                lost(42, 2, 7, 35_000),
                lost(42, 0, 9, 0),
                lost(43, 1, 1, 1),
            ],
            ..Ledger::default()
        };
        let opts = Options {
            top: 1,
            ..Options::default()
        };
        let r = build(&agg, &ledger, &[], &mut table, &opts);
        let l = r.processes[0].lost.as_ref().expect("pid 42 lost records");
        assert_eq!((l.allocations, l.bytes, l.frees), (12, 35_500, 9));
        assert_eq!(l.sites.len(), 1, "cut by --top");
        assert_eq!((l.sites[0].count, l.sites[0].bytes), (7, 35_000));
        assert_eq!(l.sites[0].frames[0].function.as_deref(), Some("leak_big"));
        let r = build(&agg, &Ledger::default(), &[], &mut table, &opts);
        assert_eq!(r.processes[0].lost, None);
    }

    #[test]
    fn stacks_sorted_by_live_bytes_and_cut_by_top() {
        let (agg, mut table) = sample();
        let opts = Options {
            top: 2,
            ..Options::default()
        };
        let r = build(&agg, &Ledger::default(), &[], &mut table, &opts);
        let p = &r.processes[0];
        assert_eq!(
            (p.live_bytes, p.total_bytes, p.freed_bytes),
            (5200, 5264, 64)
        );
        assert_eq!(p.stacks.len(), 2);
        assert_eq!(p.stacks_omitted, 1);
        assert_eq!(p.stacks[0].frames[0].function.as_deref(), Some("leak_big"));
        assert_eq!(p.stacks[1].live_count, 2);
        assert_eq!(
            p.sizes,
            SizeSummary {
                min: 64,
                p50: 100,
                p90: 5000,
                p99: 5000,
                max: 5000
            }
        );
        assert_eq!(r.lost["unknown_frees"], 0);
    }

    #[test]
    fn older_than_hides_young_blocks() {
        let (agg, mut table) = sample();
        let opts = Options {
            live_before_ns: Some(25),
            ..Options::default()
        };
        let r = build(&agg, &Ledger::default(), &[], &mut table, &opts);
        let p = &r.processes[0];
        assert_eq!(p.stacks.len(), 1);
        assert_eq!(p.stacks[0].live_bytes, 200);
        assert_eq!(p.stacks[0].total_bytes, 200);
    }

    #[test]
    fn distribution_buckets_count_each_value_once_and_percentiles_are_lower_edges() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in [1, 256, 256, 4096, 4104, 1 << 20, 65536] {
            h.record(v).unwrap();
        }
        let d = Distribution::of(&h);
        assert_eq!(d.buckets.iter().map(|b| b.1).sum::<u64>(), 7);
        assert_eq!(
            d.buckets,
            vec![
                (1, 1),
                (256, 2),
                (4096, 1),
                (8192, 1),
                (65536, 1),
                (1 << 20, 1)
            ]
        );
        assert_eq!((d.min, d.p50, d.max), (1, 4096, 1 << 20));
    }
}
