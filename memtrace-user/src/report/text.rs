//! The human report, one view at a time: a header (mode, duration, probes),
//! per process its summary line and the view's body, then the loss ledger
//! (zeros printed too).
//!
//! Bodies: `leaks` lists the top stacks by live bytes; `peak` the
//! high-water mark and what held it; `temporary` the blocks freed within
//! the threshold; `histograms` percentile tables and power-of-two bar charts
//! of sizes and lifetimes; `timeline` a small ASCII chart of live bytes.
//! A process whose report lacks the view's section (it was not built) gets
//! its summary line only. Nothing here computes statistics: every number
//! comes from [`Report`].
//!
//! Byte counts and nanoseconds are printed in full, with thousands
//! separators; human units appear only next to them, never instead of them.
//!
//! ```text
//! PID 42 (server): 528,784 B live in 4 blocks [516.4 KiB]; ...
//!   peak: 3,149,824 B [3.0 MiB] in 3 blocks at 0.010 s
//! ```

use std::io::{self, Write};

use super::{
    Distribution, HistogramsReport, PeakReport, ProcessReport, Report, TemporaryReport,
    TimelineReport, View, memory,
};
use crate::symbolize::Frame;

/// Writes `view` of the report as text.
pub fn render(r: &Report, view: View, out: &mut dyn Write) -> io::Result<()> {
    let shown: Vec<&ProcessReport> = r
        .processes
        .iter()
        .filter(|p| p.total_count > 0 || p.resident.is_some())
        .collect();
    writeln!(
        out,
        "memtrace: {} tracing for {:.2} s; {} process{} allocated, {} traced calls",
        r.mode,
        r.duration_s,
        shown.len(),
        if shown.len() == 1 { "" } else { "es" },
        group(r.traced_calls),
    )?;
    for p in &r.probes {
        let scope = p.scope();
        let what = match p.allocators.as_slice() {
            [] => String::new(),
            names => format!(" [{}]", names.join(", ")),
        };
        write!(
            out,
            "probes: {}{what} ({scope}): {}",
            p.module,
            p.functions.join(" ")
        )?;
        if !p.missing.is_empty() {
            write!(out, "; not found: {}", p.missing.join(" "))?;
        }
        writeln!(out)?;
    }
    if let Some(m) = &r.memtrace {
        writeln!(
            out,
            "memtrace itself: peak RSS {}, CPU {:.2} s",
            human(m.peak_rss_bytes),
            m.cpu_seconds
        )?;
    }
    if !r.probe_cost.is_empty() {
        let costs: Vec<String> = r
            .probe_cost
            .iter()
            .map(|c| format!("{} {:.0} ns x {}", c.program, c.ns_per_run(), group(c.runs)))
            .collect();
        writeln!(
            out,
            "probe cost (eBPF run time per call): {}",
            costs.join(", ")
        )?;
    }
    for p in &shown {
        writeln!(out)?;
        process_header(p, out)?;
        match view {
            View::Leaks => leaks(p, out)?,
            View::Peak => {
                if let Some(peak) = &p.peak {
                    peak_body(peak, out)?;
                }
            }
            View::Temporary => {
                if let Some(t) = &p.temporary {
                    temporary(r.temporary_ms, p, t, out)?;
                }
            }
            View::Histograms => {
                if let Some(h) = &p.histograms {
                    histograms(h, out)?;
                }
            }
            View::Timeline => {
                if let Some(t) = &p.timeline {
                    timeline(t, p.peak.as_ref(), out)?;
                }
            }
            View::Memory => {
                if let Some(m) = &p.memory {
                    memory::render(m, out)?;
                }
            }
            View::PythonLines => {
                if let Some(l) = &p.python_lines {
                    super::python_lines::render(l, out)?;
                }
            }
        }
    }
    let quiet = r.processes.len() - shown.len();
    if quiet > 0 {
        writeln!(
            out,
            "\n{quiet} other process{} only freed memory allocated before tracing began",
            if quiet == 1 { "" } else { "es" }
        )?;
    }
    writeln!(out)?;
    let lost: Vec<String> = r.lost.iter().map(|(k, v)| format!("{k}={v}")).collect();
    writeln!(out, "not seen: {}", lost.join(" "))?;
    if r.lost.get("ringbuf_full").copied().unwrap_or(0) > 0 {
        writeln!(
            out,
            "hint: records were lost because the ring buffer was full; \
             try a larger --ringbuf-size"
        )?;
    }
    Ok(())
}

fn process_header(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    process_line(p, out)?;
    if let Some(r) = &p.resident {
        memory::render_summary(r, out)?;
    }
    if let Some(d) = &p.dwarf {
        writeln!(
            out,
            "  stacks: walked by DWARF call frame information ({} stacks, {} cut short)",
            group(d.stacks),
            group(d.cut)
        )?;
    }
    if let Some(py) = &p.python {
        python_line(py, out)?;
    }
    if let Some(l) = &p.lost {
        lost_lines(l, out)?;
    }
    Ok(())
}

/// What the full ring buffer dropped, by call site, and what to change.
fn lost_lines(l: &super::LostReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  LOST (ring buffer full): {} allocations ({} B) at {} call sites, {} frees (their blocks still count as live); \
         give memtrace a larger --ringbuf-size",
        group(l.allocations),
        group(l.bytes),
        l.sites.len(),
        group(l.frees),
    )?;
    for site in &l.sites {
        let at = site
            .frames
            .first()
            .map_or_else(|| "?".to_string(), |f| f.label());
        writeln!(
            out,
            "    {} allocations ({} B) lost at {at}",
            group(site.count),
            group(site.bytes)
        )?;
    }
    Ok(())
}

fn process_line(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "PID {} ({}){}{}: {} B live in {} blocks [{}]; {} B allocated in {} blocks; {} B freed in {}",
        p.pid,
        p.comm.as_deref().unwrap_or("?"),
        p.parent
            .map(|parent| format!(", forked by PID {parent}"))
            .unwrap_or_default(),
        if p.exited { ", exited" } else { "" },
        group(p.live_bytes),
        group(p.live_count),
        human(p.live_bytes),
        group(p.total_bytes),
        group(p.total_count),
        group(p.freed_bytes),
        group(p.freed_count),
    )
}

/// What a process's Python frames came to.
fn python_line(py: &crate::python::PythonStacks, out: &mut dyn Write) -> io::Result<()> {
    if !py.supported {
        return writeln!(
            out,
            "  python: {} ({}): memtrace has no frame layout for this version; native frames only",
            py.interpreter, py.module
        );
    }
    writeln!(
        out,
        "  python: {} ({}): {} stacks with Python frames ({} cut at {} frames, {} unreadable, {} code objects unreadable)",
        py.interpreter,
        py.module,
        group(py.stacks),
        group(py.truncated),
        memtrace_common::MAX_PY_FRAMES,
        group(py.unreadable),
        group(py.unknown_code)
    )?;
    if !py.allocator_traced {
        writeln!(
            out,
            "  python: objects of CPython's own allocator (pymalloc arenas, blocks up to 512 B) not traced; --python-allocators traces them"
        )?;
    }
    Ok(())
}

fn leaks(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    if p.total_count > 0 {
        let z = &p.sizes;
        writeln!(
            out,
            "  sizes: min {} B, median {} B, p90 {} B, p99 {} B, max {} B",
            group(z.min),
            group(z.p50),
            group(z.p90),
            group(z.p99),
            group(z.max)
        )?;
    }
    if p.unknown_frees > 0 || p.missed_frees > 0 {
        writeln!(
            out,
            "  {} frees of blocks allocated before tracing ({}); {} blocks reused before their free was seen",
            group(p.unknown_frees),
            if p.parent.is_some() {
                "by the parent before the fork, or unknown"
            } else {
                "or unknown"
            },
            group(p.missed_frees)
        )?;
    }
    for s in &p.stacks {
        writeln!(
            out,
            "  {} B live in {} blocks ({} B in {} blocks allocated) from:",
            group(s.live_bytes),
            group(s.live_count),
            group(s.total_bytes),
            group(s.total_count),
        )?;
        frames(&s.frames, out)?;
    }
    omitted(p.stacks_omitted, out)
}

fn peak_body(peak: &PeakReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  peak: {} B [{}] in {} blocks at {:.3} s",
        group(peak.bytes),
        human(peak.bytes),
        group(peak.count),
        peak.at_s
    )?;
    for s in &peak.stacks {
        writeln!(
            out,
            "  {} B in {} blocks at the peak ({} B in {} blocks allocated) from:",
            group(s.live_bytes),
            group(s.live_count),
            group(s.total_bytes),
            group(s.total_count),
        )?;
        frames(&s.frames, out)?;
    }
    omitted(peak.stacks_omitted, out)
}

fn temporary(
    ms: f64,
    p: &ProcessReport,
    t: &TemporaryReport,
    out: &mut dyn Write,
) -> io::Result<()> {
    writeln!(
        out,
        "  temporary (freed within {ms} ms): {} blocks, {} B [{}] of {} blocks allocated",
        group(t.count),
        group(t.bytes),
        human(t.bytes),
        group(p.total_count),
    )?;
    for s in &t.stacks {
        writeln!(
            out,
            "  {} temporary blocks, {} B, of {} blocks, {} B allocated from:",
            group(s.count),
            group(s.bytes),
            group(s.total_count),
            group(s.total_bytes),
        )?;
        frames(&s.frames, out)?;
    }
    omitted(t.stacks_omitted, out)
}

/// Widest bar of a histogram chart, in characters.
const BAR_WIDTH: u64 = 40;

/// A statistic of a [`Distribution`] (other than its count): its name in
/// tables, and how to read it.
pub(super) type Stat = (&'static str, fn(&Distribution) -> u64);

/// The statistics shown in percentile tables, in order.
pub(super) const STATS: [Stat; 7] = [
    ("mean", |d| d.mean.round() as u64),
    ("min", |d| d.min),
    ("p50", |d| d.p50),
    ("p90", |d| d.p90),
    ("p99", |d| d.p99),
    ("p99.9", |d| d.p999),
    ("max", |d| d.max),
];

fn histograms(h: &HistogramsReport, out: &mut dyn Write) -> io::Result<()> {
    // A two-column table: the rows are the statistics, so that the wide
    // cells (exact value plus human unit) stack instead of running on.
    let mut cells = vec![("count", group(h.sizes.count), group(h.lifetimes.count))];
    for (name, f) in STATS {
        cells.push((
            name,
            Unit::Bytes.or_dash(&h.sizes, f(&h.sizes)),
            Unit::Nanos.or_dash(&h.lifetimes, f(&h.lifetimes)),
        ));
    }
    let w = cells
        .iter()
        .map(|c| c.1.chars().count())
        .chain(["sizes".len()])
        .max()
        .unwrap_or(0);
    writeln!(out, "  {:<7}{:<w$}   lifetimes", "", "sizes")?;
    for (name, sizes, lifetimes) in &cells {
        writeln!(out, "  {name:<7}{sizes:<w$}   {lifetimes}")?;
    }
    bars("sizes", &h.sizes, Unit::Bytes, out)?;
    bars("lifetimes", &h.lifetimes, Unit::Nanos, out)?;
    for (i, s) in h.stacks.iter().enumerate() {
        writeln!(
            out,
            "  stack {}: {} blocks allocated, {} freed, from:",
            i + 1,
            group(s.sizes.count),
            group(s.lifetimes.count)
        )?;
        frames(&s.frames, out)?;
        writeln!(out, "    sizes: {}", compact(&s.sizes, Unit::Bytes))?;
        writeln!(out, "    lifetimes: {}", compact(&s.lifetimes, Unit::Nanos))?;
    }
    omitted(h.stacks_omitted, out)
}

/// What a distribution's values are.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Nanos,
}

impl Unit {
    /// `4,096 B [4.0 KiB]`, `16,384 ns [16.4 µs]`; the human part only when
    /// it says something the exact one does not.
    fn show(self, v: u64) -> String {
        match self {
            Unit::Bytes if v < 1024 => format!("{v} B"),
            Unit::Bytes => format!("{} B [{}]", group(v), human(v)),
            Unit::Nanos if v < 1000 => format!("{v} ns"),
            Unit::Nanos => format!("{} ns [{}]", group(v), human_ns(v)),
        }
    }

    /// Like [`Unit::show`], but `-` for an empty distribution, whose
    /// statistics are placeholders.
    fn or_dash(self, d: &Distribution, v: u64) -> String {
        if d.count == 0 {
            "-".into()
        } else {
            self.show(v)
        }
    }
}

/// One line per non-empty power-of-two bucket, bars scaled to the fullest.
fn bars(name: &str, d: &Distribution, unit: Unit, out: &mut dyn Write) -> io::Result<()> {
    let Some(most) = d.buckets.iter().map(|b| b.1).max() else {
        return writeln!(out, "  {name}: no values");
    };
    writeln!(out, "  {name}:")?;
    let labels: Vec<String> = d
        .buckets
        .iter()
        .map(|(upper, _)| format!("<= {}", unit.show(*upper)))
        .collect();
    let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for (label, (_, n)) in labels.iter().zip(&d.buckets) {
        // Rounded up, so that a bucket with one value still shows.
        let len = (n * BAR_WIDTH).div_ceil(most) as usize;
        writeln!(
            out,
            "    {label:>w$}  {:<width$}  {}",
            "#".repeat(len),
            group(*n),
            width = BAR_WIDTH as usize
        )?;
    }
    Ok(())
}

/// `20 values; p50 64 B, p90 64 B, p99 64 B, max 64 B`.
fn compact(d: &Distribution, unit: Unit) -> String {
    if d.count == 0 {
        return "no values".into();
    }
    format!(
        "{} values; p50 {}, p90 {}, p99 {}, max {}",
        group(d.count),
        unit.show(d.p50),
        unit.show(d.p90),
        unit.show(d.p99),
        unit.show(d.max)
    )
}

/// Columns and rows of the timeline chart.
const CHART_COLUMNS: usize = 60;
const CHART_ROWS: u64 = 10;

fn timeline(t: &TimelineReport, peak: Option<&PeakReport>, out: &mut dyn Write) -> io::Result<()> {
    let (Some(first), Some(last)) = (t.points.first(), t.points.last()) else {
        return writeln!(out, "  timeline: no points");
    };
    // Downsampled by max, so a spike narrower than a column still shows.
    let n = t.points.len();
    let cols = n.min(CHART_COLUMNS);
    let columns: Vec<u64> = (0..cols)
        .map(|c| {
            t.points[c * n / cols..(c + 1) * n / cols]
                .iter()
                .map(|p| p.max_bytes)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let top = columns.iter().copied().max().unwrap_or(0);
    if top == 0 {
        return writeln!(out, "  timeline: no live bytes");
    }
    let heights: Vec<u64> = columns
        .iter()
        .map(|v| (v * CHART_ROWS).div_ceil(top))
        .collect();
    // The first column that reaches the top is the peak's.
    let peak_col = columns.iter().position(|&v| v == top);
    let end_s = last.t_s + t.step_s;
    let step = human_ns((t.step_s * 1e9).round() as u64);
    let squeezed = if cols < n {
        format!(" ({} points in {cols} columns)", group(n as u64))
    } else {
        String::new()
    };
    writeln!(
        out,
        "  live bytes, highest per {step} point{squeezed}, {:.3} s to {end_s:.3} s:",
        first.t_s,
    )?;
    let top_label = format!("{} B", group(top));
    let w = top_label.len();
    for row in (1..=CHART_ROWS).rev() {
        let label = match row {
            CHART_ROWS => top_label.clone(),
            r if r == CHART_ROWS / 2 => format!("{} B", group(top / 2)),
            _ => String::new(),
        };
        let line: String = heights
            .iter()
            .enumerate()
            .map(|(c, &h)| match h {
                h if h < row => ' ',
                h if h == row && Some(c) == peak_col => '*',
                _ => '#',
            })
            .collect();
        writeln!(out, "  {label:>w$} |{}", line.trim_end())?;
    }
    writeln!(out, "  {:>w$} +{}", "0 B", "-".repeat(cols))?;
    let left = format!("{:.3} s", first.t_s);
    let right = format!("{end_s:.3} s");
    let gap = (cols + 1).saturating_sub(left.len() + right.len()).max(1);
    writeln!(out, "  {:>w$}  {left}{}{right}", "", " ".repeat(gap))?;
    match peak {
        Some(p) => writeln!(
            out,
            "  peak (*): {} B [{}] in {} blocks at {:.3} s",
            group(p.bytes),
            human(p.bytes),
            group(p.count),
            p.at_s
        ),
        None => {
            let at = t
                .points
                .iter()
                .find(|p| p.max_bytes == top)
                .map_or(0.0, |p| p.t_s);
            writeln!(
                out,
                "  peak (*): {} B [{}] within {:.3} s to {:.3} s",
                group(top),
                human(top),
                at,
                at + t.step_s
            )
        }
    }
}

fn frames(fs: &[Frame], out: &mut dyn Write) -> io::Result<()> {
    if fs.is_empty() {
        writeln!(out, "      [stack not captured]")?;
    }
    for f in fs {
        writeln!(out, "      {}", frame(f))?;
    }
    Ok(())
}

fn omitted(n: usize, out: &mut dyn Write) -> io::Result<()> {
    if n > 0 {
        writeln!(
            out,
            "  ... {} more stacks (--top 0 shows all)",
            group(n as u64)
        )?;
    }
    Ok(())
}

/// One frame: `function (file:line)`, else `module+0xoffset`, else the
/// address.
pub fn frame(f: &Frame) -> String {
    let module = f
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m));
    match (&f.function, &f.file, module) {
        (Some(func), Some(file), _) => match f.line {
            Some(line) => format!("{func} ({file}:{line})"),
            None => format!("{func} ({file})"),
        },
        // Kernel modules are already bracketed: `[kernel.kallsyms]`.
        (Some(func), None, Some(m)) if m.starts_with('[') => format!("{func} {m}"),
        (Some(func), None, Some(m)) => format!("{func} [{m}]"),
        (Some(func), None, None) => func.clone(),
        (None, _, Some(m)) => format!("{m}+{:#x}", f.module_offset.unwrap_or(0)),
        (None, _, None) => format!("[unknown] {:#x}", f.address),
    }
}

/// `1234567` → `1,234,567`.
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1536` → `1.5 KiB`.
pub fn human(v: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `1500` → `1.5 µs`; ns, µs, ms or s, whichever keeps the number under
/// 1000.
pub fn human_ns(v: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1.0, "ns"), (1e3, "µs"), (1e6, "ms"), (1e9, "s")];
    if v < 1000 {
        return format!("{v} ns");
    }
    let mut u = 1;
    // Move up while the rounded number would read 1000.0 or more.
    while u + 1 < UNITS.len() && v as f64 / UNITS[u].0 >= 999.95 {
        u += 1;
    }
    format!("{:.1} {}", v as f64 / UNITS[u].0, UNITS[u].1)
}

#[cfg(test)]
pub(crate) mod tests {
    use memtrace_common::AllocFn;

    use super::super::{Ledger, Options, Probes, SelfUsage, TimelinePoint, build, tests::sample};
    use super::*;
    use crate::agg::{Aggregator, Config};
    use crate::event::{Alloc, Event};
    use crate::symbolize::Symbolize;

    /// When the fixture's trace began (CLOCK_MONOTONIC ns).
    pub const START_NS: u64 = 1_000_000_000;

    /// Names for the fixture's addresses and command names for its pids,
    /// with the awkward cases: C++ templates (`<`, `&`), a frame with only
    /// a module, an unknown address, a stack not captured.
    pub struct Names;

    impl Symbolize for Names {
        fn frames(&mut self, _pid: u32, stack: &[u64]) -> Vec<Frame> {
            stack
                .iter()
                .map(|&address| {
                    let (function, file, line) = match address {
                        0x40_1000 => (Some("cache_grow"), None, None),
                        0x40_1100 => (Some("load_file"), Some("io.c"), Some(88)),
                        0x40_1200 => (Some("format_line"), None, None),
                        0x40_1300 => (
                            Some("std::vector<int>::push_back"),
                            Some("stl_vector.h"),
                            Some(1283),
                        ),
                        0x40_1900 => (Some("main"), Some("server.c"), Some(42)),
                        0x50_1000 => (Some("build<T&>"), None, None),
                        0x50_1100 => (Some("scratch"), None, None),
                        0x50_1900 => (Some("start"), None, None),
                        _ => (None, None, None),
                    };
                    let module = (address == 0x7f_1234).then(|| "/usr/lib/libfoo.so".to_string());
                    Frame {
                        function: function.map(str::to_string),
                        file: file.map(str::to_string),
                        line,
                        module_offset: module.as_ref().map(|_| 0x1234),
                        module,
                        address,
                        ..Frame::default()
                    }
                })
                .collect()
        }

        fn comm(&self, pid: u32) -> Option<String> {
            match pid {
                42 => Some("server".into()),
                77 => Some("tmpl<&>".into()),
                _ => None,
            }
        }
    }

    fn malloc(pid: u32, ms: f64, addr: u64, size: u64, stack: &[u64]) -> Event {
        let ts_ns = START_NS + (ms * 1e6).round() as u64;
        Event::Alloc(Alloc {
            pid,
            tid: pid,
            ts_ns,
            entry_ts_ns: ts_ns - 1,
            addr,
            size,
            func: AllocFn::Malloc,
            old_addr: None,
            stack: stack.to_vec(),
            sample_shift: 0,
        })
    }

    fn free(pid: u32, ms: f64, addr: u64) -> Event {
        Event::Free {
            pid,
            ts_ns: START_NS + (ms * 1e6).round() as u64,
            addr,
        }
    }

    /// Three processes over 60 ms. PID 42 peaks at 3,149,824 B at 10 ms
    /// (three big blocks), frees two of them, and ends with 528,784 B in 4
    /// blocks; in between, 20 small blocks live 10–29 µs (temporary). PID 77
    /// peaks at 600 B, has one temporary block and exits. PID 99 only frees
    /// a block from before tracing.
    pub fn events() -> Vec<Event> {
        const MAIN: u64 = 0x40_1900;
        let mut e = vec![
            malloc(42, 1.0, 0x1000, 4096, &[0x40_1000, MAIN]),
            malloc(42, 2.0, 0x2000, 1 << 20, &[0x40_1100, MAIN]),
        ];
        for i in 0..20u64 {
            let at = 3.0 + i as f64 * 0.1;
            let addr = 0x10000 + i * 0x100;
            e.push(malloc(
                42,
                at,
                addr,
                64 + (i % 4) * 32,
                &[0x40_1200, 0x7f_1234, MAIN],
            ));
            e.push(free(42, at + 0.010 + i as f64 * 0.001, addr));
        }
        e.extend([
            malloc(77, 5.0, 0x1000, 300, &[0x50_1000, 0x50_1900]),
            malloc(77, 6.0, 0x1100, 300, &[0x50_1000, 0x50_1900]),
            free(77, 7.0, 0x1000),
            malloc(77, 7.5, 0x1200, 48, &[0x50_1100, 0x50_1900]),
            free(77, 7.6, 0x1200),
            free(99, 8.0, 0xbeef),
            malloc(42, 10.0, 0x3000, 2 << 20, &[0x40_1300, MAIN]),
            free(42, 20.0, 0x3000),
            free(42, 25.0, 0x2000),
            malloc(42, 30.0, 0x4000, 512 << 10, &[0x40_1100, MAIN]),
            malloc(42, 40.0, 0x5000, 100, &[]),
            free(42, 45.0, 0xdead),
            malloc(42, 50.0, 0x6000, 300, &[0x7f_0000, MAIN]),
            Event::Exit {
                pid: 77,
                ts_ns: START_NS + 60_000_000,
            },
        ]);
        e
    }

    /// [`events`], aggregated.
    pub fn aggregator() -> Aggregator {
        let mut agg = Aggregator::new(Config::default());
        for e in &events() {
            agg.on_event(e);
        }
        agg
    }

    /// The report of [`events`] with every view built.
    pub fn rich() -> Report {
        rich_with(View::ALL.to_vec())
    }

    /// The report of [`events`] with `views` built.
    pub fn rich_with(views: Vec<View>) -> Report {
        let agg = aggregator();
        let ledger = Ledger {
            kernel: vec![("ringbuf_full", 0), ("stack_lost", 1)],
            decode_errors: 0,
            traced_calls: 61,
            probe_cost: Vec::new(),
            lost_sites: Vec::new(),
            memtrace: None,
            dwarf: Default::default(),
            python: Default::default(),
        };
        let probes = [Probes {
            module: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            allocators: vec!["glibc".into()],
            pids: vec![],
            functions: ["malloc", "calloc", "realloc", "free"]
                .map(String::from)
                .to_vec(),
            missing: vec!["pvalloc".into()],
        }];
        let opts = Options {
            views,
            start_ns: START_NS,
            duration_s: 0.06,
            top: 10,
            ..Options::default()
        };
        build(&agg, &ledger, &probes, &mut Names, &opts)
    }

    fn text(r: &Report, view: View) -> String {
        let mut out = Vec::new();
        render(r, view, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_view_matches_its_snapshot() {
        let r = rich();
        for view in View::ALL {
            insta::assert_snapshot!(format!("view_{}", view.name()), text(&r, view));
        }
    }

    #[test]
    fn fixture_has_the_numbers_its_doc_promises() {
        let r = rich();
        let p = &r.processes[0];
        assert_eq!((p.pid, p.live_bytes, p.live_count), (42, 528_784, 4));
        let peak = p.peak.as_ref().unwrap();
        assert_eq!((peak.bytes, peak.count), (3_149_824, 3));
        assert!((peak.at_s - 0.010).abs() < 1e-9, "{}", peak.at_s);
        assert_eq!(p.temporary.as_ref().unwrap().count, 20);
        assert_eq!(r.processes[1].temporary.as_ref().unwrap().count, 1);
        assert_eq!(r.processes.len(), 3);
    }

    #[test]
    fn views_not_built_print_only_the_process_header() {
        let r = rich_with(vec![View::Leaks]);
        for view in [
            View::Peak,
            View::Temporary,
            View::Histograms,
            View::Timeline,
        ] {
            let t = text(&r, view);
            let body: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
            assert!(body.is_empty(), "{view:?}: {t}");
            assert!(
                t.contains("PID 42 (server): 528,784 B live in 4 blocks"),
                "{t}"
            );
            assert!(t.contains("\nnot seen: "), "{t}");
        }
    }

    #[test]
    fn leaks_view_is_the_same_whatever_else_was_built() {
        assert_eq!(
            text(&rich(), View::Leaks),
            text(&rich_with(vec![View::Leaks]), View::Leaks)
        );
    }

    #[test]
    fn timeline_chart_is_downsampled_by_max() {
        // 600 points, one spike of one point: it must survive the squeeze
        // into 60 columns and be the marked peak.
        let points = (0..600)
            .map(|i| TimelinePoint {
                t_s: i as f64 * 0.001,
                max_bytes: if i == 333 { 10_000 } else { 1_000 },
                end_bytes: 1_000,
                resident_max_bytes: None,
                resident_end_bytes: None,
            })
            .collect();
        let t = TimelineReport {
            step_s: 0.001,
            points,
        };
        let mut out = Vec::new();
        timeline(&t, None, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = s.lines().filter(|l| l.contains('|')).collect();
        assert_eq!(rows.len(), CHART_ROWS as usize, "{s}");
        assert_eq!(
            rows[0].split('|').nth(1),
            Some(&*format!("{}*", " ".repeat(33))),
            "{s}"
        );
        assert!(rows[9].ends_with(&"#".repeat(60)), "{s}");
        assert!(s.contains("(600 points in 60 columns)"), "{s}");
        assert!(
            s.contains("peak (*): 10,000 B [9.8 KiB] within 0.333 s to 0.334 s"),
            "{s}"
        );
    }

    #[test]
    fn nanoseconds_are_humanized() {
        assert_eq!(human_ns(0), "0 ns");
        assert_eq!(human_ns(999), "999 ns");
        assert_eq!(human_ns(1_500), "1.5 µs");
        assert_eq!(human_ns(999_999), "1.0 ms");
        assert_eq!(human_ns(2_500_000_000), "2.5 s");
    }

    #[test]
    fn numbers_are_grouped_and_humanized() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(2097152), "2,097,152");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(2 << 20), "2.0 MiB");
    }

    #[test]
    fn renders_processes_stacks_and_ledger() {
        let (agg, mut table) = sample();
        let ledger = Ledger {
            kernel: vec![("ringbuf_full", 0), ("stack_lost", 0)],
            memtrace: Some(SelfUsage {
                peak_rss_bytes: 48 << 20,
                cpu_seconds: 1.254,
            }),
            dwarf: [(42, super::super::DwarfWalks { stacks: 12, cut: 1 })].into(),
            ..Ledger::default()
        };
        let r = build(&agg, &ledger, &[], &mut table, &Options::default());
        let mut out = Vec::new();
        render(&r, View::Leaks, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("PID 42 (prog): 5,200 B live in 3 blocks"),
            "{text}"
        );
        assert!(text.contains("5,000 B live in 1 blocks"), "{text}");
        assert!(
            text.contains("memtrace itself: peak RSS 48.0 MiB, CPU 1.25 s"),
            "{text}"
        );
        assert!(text.contains("      leak_big\n      main\n"), "{text}");
        assert!(
            text.contains(
                "  stacks: walked by DWARF call frame information (12 stacks, 1 cut short)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("not seen: decode_errors=0 missed_frees=0 ringbuf_full=0 stack_lost=0 unknown_frees=0"),
            "{text}"
        );
    }
}
