//! The HTML report: one self-contained page with every view the report
//! holds — summary, loss ledger, flame graph, timeline plot (with resident
//! bytes when known), and per process its resident memory, the leaks,
//! memory, peak, temporary and histogram tables.
//!
//! Self-contained means it works offline and from `file://`: CSS and the
//! one small script are inline, the flame graph (made by the caller, passed
//! in as SVG text) and the timeline ([`super::svg::timeline_svg`]) are
//! inline SVG, and nothing is fetched. Sections appear only for views the
//! report was built with. Every string from the trace (command names,
//! frames, which hold `<` in C++ templates) is escaped. It computes no
//! statistics: every number comes from [`Report`].
//!
//! The script replaces the text of `<p id="status">` (`static` as served)
//! with `rendered: N processes, M stacks`, counted in the DOM (`M` counts
//! stack rows over all tables), and checks them against the counts embedded
//! as JSON in `<script id="mt-data">`; it also sets `document.title`. So a
//! headless browser's `--dump-dom` shows whether the page rendered. Ids and
//! classes start with `mt-` so they do not clash with the flame graph's own
//! (`frames`, `details`, `search`, …), whose script looks them up by id.
//!
//! ```text
//! html::render(&report, &flame_svg, &mut out)?;
//! ```

use std::io::{self, Write};

use super::memory::{self, MemoryReport, ResidentSummary};
use super::svg::{escape, timeline_svg};
use super::text::{STATS, frame, group, human, human_ns};
use super::{
    Distribution, HistogramsReport, PeakReport, ProcessReport, Report, StackReport, TemporaryReport,
};
use crate::mem::Backing;
use crate::symbolize::Frame;

/// Writes the report as one HTML page, with `flame_svg` (an SVG document,
/// may be empty) as its flame graph.
pub fn render(r: &Report, flame_svg: &str, out: &mut dyn Write) -> io::Result<()> {
    // As in the text report: processes that allocated, or whose resident
    // memory is known.
    let shown: Vec<&ProcessReport> = r
        .processes
        .iter()
        .filter(|p| p.total_count > 0 || p.resident.is_some())
        .collect();
    let mut page = Page { out, stacks: 0 };
    page.head(&shown)?;
    page.summary(r, &shown)?;
    page.ledger(r)?;
    page.flame(flame_svg)?;
    if shown.iter().any(|p| p.timeline.is_some()) {
        writeln!(
            page.out,
            "<section id=\"mt-timeline\"><h2>Timeline</h2><div class=\"mt-scroll\">{}</div></section>",
            timeline_svg(r)
        )?;
    }
    for p in &shown {
        page.process(r, p)?;
    }
    let quiet = r.processes.len() - shown.len();
    if quiet > 0 {
        writeln!(
            page.out,
            "<p class=\"mt-note\">{quiet} other process{} only freed memory allocated before tracing began.</p>",
            if quiet == 1 { "" } else { "es" }
        )?;
    }
    page.tail(shown.len())
}

/// The page being written, and the stack rows written so far (for the
/// script's check).
struct Page<'a> {
    out: &'a mut dyn Write,
    stacks: usize,
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1240px; padding: 0 16px 32px; color: #222; }
h1 { margin-bottom: 0; }
h2 { border-bottom: 1px solid #ccc; margin-top: 32px; }
h3 { margin-bottom: 4px; }
#status { color: #666; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; }
td.mt-num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.mt-h { color: #777; }
.mt-zero { color: #999; }
.mt-frames { font-family: ui-monospace, monospace; font-size: 12px; }
.mt-frames ol { margin: 2px 0; padding-left: 20px; }
.mt-scroll { overflow-x: auto; }
#mt-flame .mt-scroll > svg { display: block; width: 100%; }
.mt-bars td { border: none; padding: 0 6px; }
.mt-bar { background: #4c78a8; height: 12px; min-width: 1px; }
.mt-hint { background: #fff4d6; padding: 4px 8px; }
.mt-note { color: #666; }
.mt-memory .mt-d1 th { padding-left: 24px; font-weight: normal; }
.mt-memory .mt-d2 th { padding-left: 44px; font-weight: normal; }
.mt-memory td.mt-why { color: #555; }
nav a { margin-right: 12px; }
svg.mt-timeline text { font-family: sans-serif; font-size: 12px; }
svg.mt-timeline text.mt-title { font-size: 16px; font-weight: bold; }
"#;

/// Counts the DOM and shows the result; see the module docs.
const SCRIPT: &str = r#"
(function () {
  "use strict";
  var want = JSON.parse(document.getElementById("mt-data").textContent);
  var procs = document.querySelectorAll("section.mt-process").length;
  var stacks = document.querySelectorAll("tr.mt-stack").length;
  var text = procs + (procs === 1 ? " process, " : " processes, ") +
    stacks + (stacks === 1 ? " stack" : " stacks");
  if (procs !== want.processes || stacks !== want.stacks) {
    text += " (expected " + want.processes + " processes, " + want.stacks + " stacks)";
  }
  document.getElementById("status").textContent = "rendered: " + text;
  document.title = "memtrace: " + text;
})();
"#;

impl Page<'_> {
    fn head(&mut self, shown: &[&ProcessReport]) -> io::Result<()> {
        writeln!(
            self.out,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>memtrace report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
             <h1>memtrace report</h1>\n<p id=\"status\">static</p>"
        )?;
        if !shown.is_empty() {
            write!(self.out, "<nav>")?;
            for p in shown {
                write!(
                    self.out,
                    "<a href=\"#mt-pid-{}\">{}</a>",
                    p.pid,
                    escape(&name(p))
                )?;
            }
            writeln!(self.out, "</nav>")?;
        }
        Ok(())
    }

    fn summary(&mut self, r: &Report, shown: &[&ProcessReport]) -> io::Result<()> {
        let views: Vec<&str> = r.views.iter().map(|v| v.name()).collect();
        let quiet = r.processes.len() - shown.len();
        writeln!(
            self.out,
            "<section id=\"mt-summary\"><h2>Summary</h2><table>\n\
             <tr><th>mode</th><td>{}</td></tr>\n\
             <tr><th>duration</th><td>{:.2} s</td></tr>\n\
             <tr><th>traced calls</th><td>{}</td></tr>\n\
             <tr><th>processes</th><td>{} allocated{}</td></tr>\n\
             <tr><th>temporary</th><td>freed within {} ms</td></tr>\n\
             <tr><th>views</th><td>{}</td></tr>",
            escape(r.mode),
            r.duration_s,
            group(r.traced_calls),
            shown.len(),
            if quiet > 0 {
                format!(", {quiet} only freed")
            } else {
                String::new()
            },
            r.temporary_ms,
            escape(&views.join(", "))
        )?;
        for p in &r.probes {
            let scope = p.scope();
            write!(
                self.out,
                "<tr><th>probes</th><td>{} ({scope}): {}",
                escape(&p.module),
                escape(&p.functions.join(" "))
            )?;
            if !p.missing.is_empty() {
                write!(self.out, "; not found: {}", escape(&p.missing.join(" ")))?;
            }
            writeln!(self.out, "</td></tr>")?;
        }
        writeln!(self.out, "</table></section>")
    }

    fn ledger(&mut self, r: &Report) -> io::Result<()> {
        writeln!(
            self.out,
            "<section id=\"mt-ledger\"><h2>Not seen</h2><table>"
        )?;
        for (reason, n) in &r.lost {
            writeln!(
                self.out,
                "<tr{}><th>{}</th><td class=\"mt-num\">{}</td></tr>",
                if *n == 0 { " class=\"mt-zero\"" } else { "" },
                escape(reason),
                group(*n)
            )?;
        }
        writeln!(self.out, "</table>")?;
        if r.lost.get("ringbuf_full").copied().unwrap_or(0) > 0 {
            writeln!(
                self.out,
                "<p class=\"mt-hint\">Records were lost because the ring buffer was full; \
                 try a larger --ringbuf-size.</p>"
            )?;
        }
        writeln!(self.out, "</section>")
    }

    fn flame(&mut self, svg: &str) -> io::Result<()> {
        writeln!(self.out, "<section id=\"mt-flame\"><h2>Flame graph</h2>")?;
        // Inline SVG in HTML starts at the element: an XML declaration or
        // doctype before it would only be a parse error.
        match svg.find("<svg") {
            Some(at) => writeln!(self.out, "<div class=\"mt-scroll\">{}</div>", &svg[at..])?,
            None => writeln!(self.out, "<p class=\"mt-note\">No flame graph.</p>")?,
        }
        writeln!(self.out, "</section>")
    }

    fn process(&mut self, r: &Report, p: &ProcessReport) -> io::Result<()> {
        writeln!(
            self.out,
            "<section class=\"mt-process\" id=\"mt-pid-{0}\" data-pid=\"{0}\">\n<h2>{1}{2}</h2>",
            p.pid,
            escape(&name(p)),
            if p.exited { ", exited" } else { "" }
        )?;
        writeln!(
            self.out,
            "<p>{} live in {} blocks; {} allocated in {} blocks; {} freed in {} blocks; \
             first event at {:.3} s, last at {:.3} s.</p>",
            bytes(p.live_bytes),
            group(p.live_count),
            bytes(p.total_bytes),
            group(p.total_count),
            bytes(p.freed_bytes),
            group(p.freed_count),
            p.first_s,
            p.last_s
        )?;
        if let Some(res) = &p.resident {
            resident_line(res, self.out)?;
        }
        self.leaks(p)?;
        if let Some(m) = &p.memory {
            self.memory(p, m)?;
        }
        if let Some(peak) = &p.peak {
            self.peak(peak)?;
        }
        if let Some(t) = &p.temporary {
            self.temporary(r, p, t)?;
        }
        if let Some(h) = &p.histograms {
            self.histograms(h)?;
        }
        writeln!(self.out, "</section>")
    }

    fn leaks(&mut self, p: &ProcessReport) -> io::Result<()> {
        writeln!(self.out, "<h3>Leaks</h3>")?;
        let z = &p.sizes;
        if p.total_count > 0 {
            writeln!(
                self.out,
                "<p>Sizes: min {}, median {}, p90 {}, p99 {}, max {}.</p>",
                bytes(z.min),
                bytes(z.p50),
                bytes(z.p90),
                bytes(z.p99),
                bytes(z.max)
            )?;
        }
        if p.unknown_frees > 0 || p.missed_frees > 0 {
            writeln!(
                self.out,
                "<p>{} frees of blocks allocated before tracing (or unknown); \
                 {} blocks reused before their free was seen.</p>",
                group(p.unknown_frees),
                group(p.missed_frees)
            )?;
        }
        self.stack_table(&["live", "live blocks"], &p.stacks)?;
        self.omitted(p.stacks_omitted)
    }

    /// The memory view: the explanation of allocated versus resident,
    /// mapped and kernel memory, then what made memory resident, the
    /// mappings holding it, kernel stacks and the OOM killer's verdict.
    fn memory(&mut self, p: &ProcessReport, m: &MemoryReport) -> io::Result<()> {
        let e = &m.explained;
        writeln!(self.out, "<h3>Memory</h3>")?;
        let known = p.resident.is_some();
        match &p.resident {
            Some(res) => writeln!(
                self.out,
                "<p>Allocated {} vs resident {}; resident peaked at {} at {:.3} s.</p>",
                bytes(e.allocated),
                bytes(e.resident),
                bytes(res.peak_resident_bytes),
                m.peak_resident_at_s
            )?,
            None => writeln!(
                self.out,
                "<p class=\"mt-note\">No resident memory (RSS) was reported for this process \
                 while traced: only allocated, mapped and kernel memory are known.</p>"
            )?,
        }
        writeln!(
            self.out,
            "<table class=\"mt-memory\"><tr><th></th><th>bytes</th><th>why</th></tr>"
        )?;
        for (depth, label, why, needs_rss, v) in memory::EXPLAINED {
            if known || !needs_rss {
                self.memory_row(depth, label, v(e), why)?;
            }
        }
        if let Some(k) = &m.kernel {
            #[rustfmt::skip]
            let rows = [
                (0, "kernel (not in RSS)", e.kernel, "slab objects, pages and per-CPU memory charged to it"),
                (1, "slab", k.slab.live_bytes, "kmalloc and kmem_cache objects"),
                (1, "pages", k.pages.live_bytes, "pages allocated for it"),
                (1, "per-CPU", k.percpu.live_bytes, "per-CPU chunks"),
            ];
            for (depth, label, v, why) in rows {
                self.memory_row(depth, label, v, why)?;
            }
        }
        writeln!(self.out, "</table>")?;
        if let Some(k) = &m.kernel {
            writeln!(
                self.out,
                "<p>Kernel memory allocated while traced: slab {}, pages {}, per-CPU {}; \
                 {} frees of kernel allocations not seen.</p>",
                bytes(k.slab.total_bytes),
                bytes(k.pages.total_bytes),
                bytes(k.percpu.total_bytes),
                group(k.unknown_frees)
            )?;
        }
        let f = &m.faults;
        if known || f.count > 0 {
            writeln!(
                self.out,
                "<p>Faults: {} made {} resident ({} more with no fault); \
                 1 in {} sampled for its stack.</p>",
                group(f.count),
                bytes(f.bytes),
                bytes(f.unplaced_bytes),
                group(u64::from(f.sample_every))
            )?;
        }
        if !m.fault_stacks.is_empty() {
            writeln!(
                self.out,
                "<h4>Made resident by (estimated from samples)</h4>\n\
                 <table><tr><th>resident (estimated)</th><th>sampled faults</th>\
                 <th>sampled</th><th>stack</th></tr>"
            )?;
            for s in &m.fault_stacks {
                self.stacks += 1;
                writeln!(
                    self.out,
                    "<tr class=\"mt-stack\"><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>\
                     <td class=\"mt-num\">{}</td>{}</tr>",
                    bytes(s.estimated_bytes),
                    group(s.sampled_faults),
                    bytes(s.sampled_bytes),
                    frames(&s.frames)
                )?;
            }
            writeln!(self.out, "</table>")?;
        }
        let mapped: Vec<_> = m.mappings.iter().filter(|r| r.resident_bytes > 0).collect();
        if !mapped.is_empty() {
            writeln!(
                self.out,
                "<h4>Mappings with the most resident bytes</h4>\n\
                 <table><tr><th>start</th><th>mapped</th><th>resident</th><th>backing</th>\
                 <th>mapped by</th></tr>"
            )?;
            for r in mapped {
                self.stacks += 1;
                writeln!(
                    self.out,
                    "<tr class=\"mt-stack\"><td class=\"mt-frames\">{}</td><td class=\"mt-num\">{}</td>\
                     <td class=\"mt-num\">{}</td><td>{}{}</td>{}</tr>",
                    escape(&r.start),
                    bytes(r.bytes),
                    bytes(r.resident_bytes),
                    backing(r.backing),
                    if r.by_allocator { " (allocator)" } else { "" },
                    frames(&r.frames)
                )?;
            }
            writeln!(self.out, "</table>")?;
        }
        if let Some(k) = &m.kernel
            && !k.stacks.is_empty()
        {
            writeln!(
                self.out,
                "<h4>Kernel memory by kernel stack</h4>\n\
                 <table><tr><th>live</th><th>live allocations</th><th>allocated</th>\
                 <th>allocations</th><th>allocator</th><th>kernel stack</th></tr>"
            )?;
            for s in &k.stacks {
                self.stacks += 1;
                writeln!(
                    self.out,
                    "<tr class=\"mt-stack\"><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>\
                     <td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td><td>{}</td>{}</tr>",
                    bytes(s.bytes.live_bytes),
                    group(s.bytes.live_count),
                    bytes(s.bytes.total_bytes),
                    group(s.bytes.total_count),
                    escape(s.allocator),
                    frames(&s.frames)
                )?;
            }
            writeln!(self.out, "</table>")?;
            self.omitted(k.stacks_omitted)?;
        }
        if let Some(o) = &m.oom {
            writeln!(
                self.out,
                "<p class=\"mt-hint\">OOM-killed at {:.3} s: anon-rss {}, file-rss {}, \
                 shmem-rss {}, page tables {}, virtual size {}, oom_score_adj {}.</p>",
                o.at_s,
                bytes(o.anon_rss_bytes),
                bytes(o.file_rss_bytes),
                bytes(o.shmem_rss_bytes),
                bytes(o.pgtables_bytes),
                bytes(o.total_vm_bytes),
                o.oom_score_adj
            )?;
        }
        if m.unknown_unmaps > 0 || m.lazily_freed_bytes > 0 || m.execs > 0 {
            writeln!(
                self.out,
                "<p class=\"mt-note\">{} unmaps of ranges mapped before tracing; \
                 {} given back with MADV_FREE; {} execs.</p>",
                group(m.unknown_unmaps),
                bytes(m.lazily_freed_bytes),
                m.execs
            )?;
        }
        Ok(())
    }

    /// One line of the memory explanation, indented by `depth`.
    fn memory_row(&mut self, depth: u8, label: &str, v: u64, why: &str) -> io::Result<()> {
        writeln!(
            self.out,
            "<tr{}><th>{}</th><td class=\"mt-num\">{}</td><td class=\"mt-why\">{}</td></tr>",
            match depth {
                0 => "",
                1 => " class=\"mt-d1\"",
                _ => " class=\"mt-d2\"",
            },
            escape(label),
            bytes(v),
            escape(why)
        )
    }

    fn peak(&mut self, peak: &PeakReport) -> io::Result<()> {
        writeln!(
            self.out,
            "<h3>Peak</h3>\n<p>Peak: {} in {} blocks at {:.3} s.</p>",
            bytes(peak.bytes),
            group(peak.count),
            peak.at_s
        )?;
        self.stack_table(&["at the peak", "blocks at the peak"], &peak.stacks)?;
        self.omitted(peak.stacks_omitted)
    }

    /// Leaks and peak: the two first columns are live bytes and blocks
    /// (at the end, or at the peak), named by `live`.
    fn stack_table(&mut self, live: &[&str; 2], stacks: &[StackReport]) -> io::Result<()> {
        if stacks.is_empty() {
            return writeln!(self.out, "<p class=\"mt-note\">No stacks.</p>");
        }
        writeln!(
            self.out,
            "<table><tr><th>{}</th><th>{}</th><th>allocated</th><th>blocks allocated</th><th>stack</th></tr>",
            live[0], live[1]
        )?;
        for s in stacks {
            self.stacks += 1;
            writeln!(
                self.out,
                "<tr class=\"mt-stack\"><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>\
                 <td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>{}</tr>",
                bytes(s.live_bytes),
                group(s.live_count),
                bytes(s.total_bytes),
                group(s.total_count),
                frames(&s.frames)
            )?;
        }
        writeln!(self.out, "</table>")
    }

    fn temporary(&mut self, r: &Report, p: &ProcessReport, t: &TemporaryReport) -> io::Result<()> {
        writeln!(
            self.out,
            "<h3>Temporary</h3>\n<p>Freed within {} ms: {} blocks, {}, of {} blocks allocated.</p>",
            r.temporary_ms,
            group(t.count),
            bytes(t.bytes),
            group(p.total_count)
        )?;
        if t.stacks.is_empty() {
            return writeln!(self.out, "<p class=\"mt-note\">No stacks.</p>");
        }
        writeln!(
            self.out,
            "<table><tr><th>temporary blocks</th><th>temporary</th><th>blocks allocated</th>\
             <th>allocated</th><th>stack</th></tr>"
        )?;
        for s in &t.stacks {
            self.stacks += 1;
            writeln!(
                self.out,
                "<tr class=\"mt-stack\"><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>\
                 <td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>{}</tr>",
                group(s.count),
                bytes(s.bytes),
                group(s.total_count),
                bytes(s.total_bytes),
                frames(&s.frames)
            )?;
        }
        writeln!(self.out, "</table>")?;
        self.omitted(t.stacks_omitted)
    }

    fn histograms(&mut self, h: &HistogramsReport) -> io::Result<()> {
        writeln!(
            self.out,
            "<h3>Histograms</h3>\n<table><tr><th></th><th>sizes</th><th>lifetimes</th></tr>"
        )?;
        writeln!(
            self.out,
            "<tr><th>count</th><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td></tr>",
            group(h.sizes.count),
            group(h.lifetimes.count)
        )?;
        for (label, f) in STATS {
            let cell = |d: &Distribution, show: fn(u64) -> String| {
                if d.count == 0 { "-".into() } else { show(f(d)) }
            };
            writeln!(
                self.out,
                "<tr><th>{label}</th><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td></tr>",
                cell(&h.sizes, bytes),
                cell(&h.lifetimes, nanos)
            )?;
        }
        writeln!(self.out, "</table>")?;
        self.bars("Sizes", &h.sizes, bytes)?;
        self.bars("Lifetimes", &h.lifetimes, nanos)?;
        if h.stacks.is_empty() {
            return Ok(());
        }
        writeln!(
            self.out,
            "<table><tr><th>#</th><th>blocks</th><th>sizes p50 / p90 / p99 / max</th>\
             <th>freed</th><th>lifetimes p50 / p90 / p99 / max</th><th>stack</th></tr>"
        )?;
        for (i, s) in h.stacks.iter().enumerate() {
            self.stacks += 1;
            writeln!(
                self.out,
                "<tr class=\"mt-stack\"><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>\
                 <td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td><td class=\"mt-num\">{}</td>{}</tr>",
                i + 1,
                group(s.sizes.count),
                percentiles(&s.sizes, bytes),
                group(s.lifetimes.count),
                percentiles(&s.lifetimes, nanos),
                frames(&s.frames)
            )?;
        }
        writeln!(self.out, "</table>")?;
        self.omitted(h.stacks_omitted)
    }

    /// A bar per power-of-two bucket, as wide as its share of the fullest.
    fn bars(&mut self, title: &str, d: &Distribution, show: fn(u64) -> String) -> io::Result<()> {
        let Some(most) = d.buckets.iter().map(|b| b.1).max() else {
            return writeln!(self.out, "<p class=\"mt-note\">{title}: no values.</p>");
        };
        writeln!(self.out, "<h4>{title}</h4>\n<table class=\"mt-bars\">")?;
        for &(upper, n) in &d.buckets {
            writeln!(
                self.out,
                "<tr><td class=\"mt-num\">&le; {}</td><td style=\"width:320px\">\
                 <div class=\"mt-bar\" style=\"width:{:.1}%\"></div></td><td class=\"mt-num\">{}</td></tr>",
                show(upper),
                n as f64 * 100.0 / most as f64,
                group(n)
            )?;
        }
        writeln!(self.out, "</table>")
    }

    fn omitted(&mut self, n: usize) -> io::Result<()> {
        if n > 0 {
            writeln!(
                self.out,
                "<p class=\"mt-note\">… {} more stacks (--top 0 shows all).</p>",
                group(n as u64)
            )?;
        }
        Ok(())
    }

    fn tail(&mut self, processes: usize) -> io::Result<()> {
        // What the script should find; `</` cannot occur in these numbers,
        // so the JSON cannot end the script element early.
        let data = serde_json::json!({ "processes": processes, "stacks": self.stacks });
        writeln!(
            self.out,
            "<script type=\"application/json\" id=\"mt-data\">{data}</script>\n\
             <script>{SCRIPT}</script>\n</body>\n</html>"
        )
    }
}

/// The resident summary under a process's header.
fn resident_line(r: &ResidentSummary, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "<p>Resident: {} (anon {}, file {}, shmem {}; swap {}; peak {}). Coverage: traced \
         allocations hold {:.1}% of anon ({}).</p>",
        bytes(r.resident_bytes),
        bytes(r.anon_bytes),
        bytes(r.file_bytes),
        bytes(r.shmem_bytes),
        bytes(r.swap_bytes),
        bytes(r.peak_resident_bytes),
        r.coverage_pct,
        bytes(r.traced_anon_bytes)
    )
}

/// What backs a mapping, as JSON names it.
fn backing(b: Backing) -> &'static str {
    match b {
        Backing::Anon => "anon",
        Backing::Shared => "shared",
        Backing::File => "file",
        Backing::Brk => "brk",
    }
}

/// `PID 42 (server)`.
fn name(p: &ProcessReport) -> String {
    format!("PID {} ({})", p.pid, p.comm.as_deref().unwrap_or("?"))
}

/// `4,096 B <span>4.0 KiB</span>`, the human part only when it adds
/// something. Safe HTML.
fn bytes(v: u64) -> String {
    if v < 1024 {
        format!("{v} B")
    } else {
        format!("{} B <span class=\"mt-h\">[{}]</span>", group(v), human(v))
    }
}

/// Like [`bytes`], for nanoseconds.
fn nanos(v: u64) -> String {
    if v < 1000 {
        format!("{v} ns")
    } else {
        format!(
            "{} ns <span class=\"mt-h\">[{}]</span>",
            group(v),
            human_ns(v)
        )
    }
}

fn percentiles(d: &Distribution, show: fn(u64) -> String) -> String {
    if d.count == 0 {
        return "-".into();
    }
    format!(
        "{} / {} / {} / {}",
        show(d.p50),
        show(d.p90),
        show(d.p99),
        show(d.max)
    )
}

/// A table cell with the stack: the innermost frame, and the callers under
/// a disclosure so long stacks do not swamp the table.
fn frames(fs: &[Frame]) -> String {
    match fs {
        [] => "<td class=\"mt-frames\">[stack not captured]</td>".into(),
        [only] => format!("<td class=\"mt-frames\">{}</td>", escape(&frame(only))),
        [first, rest @ ..] => {
            let callers: String = rest
                .iter()
                .map(|f| format!("<li>{}</li>", escape(&frame(f))))
                .collect();
            format!(
                "<td class=\"mt-frames\"><details><summary>{}</summary><ol>{callers}</ol></details></td>",
                escape(&frame(first))
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::flame::FlameOptions;
    use super::super::text::tests::{Names, aggregator, rich, rich_with};
    use super::super::{View, Weight};
    use super::*;

    /// Stands in for the flame graph: a prolog, a doctype, and text that
    /// must survive untouched (it is trusted SVG, not escaped).
    const FLAME: &str = "<?xml version=\"1.0\" standalone=\"no\"?>\n\
        <!DOCTYPE svg PUBLIC \"-//W3C//DTD SVG 1.1//EN\" \"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd\">\n\
        <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" height=\"20\"><text x=\"0\" y=\"15\">flame: main</text></svg>\n";

    fn page(r: &Report) -> String {
        let mut out = Vec::new();
        render(r, FLAME, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn page_matches_its_snapshot() {
        insta::assert_snapshot!("page", page(&rich()));
    }

    #[test]
    fn strings_from_the_trace_are_escaped() {
        let html = page(&rich());
        assert!(html.contains("PID 77 (tmpl&lt;&amp;&gt;)"), "{html}");
        assert!(html.contains("std::vector&lt;int&gt;::push_back"), "{html}");
        assert!(!html.contains("tmpl<&>"), "{html}");
        assert!(!html.contains("vector<int>"), "{html}");
    }

    #[test]
    fn works_offline() {
        let html = page(&rich());
        // The only URLs are XML namespaces and the flame graph's doctype,
        // which is dropped with the prolog.
        for (at, _) in html.match_indices("http") {
            let around = &html[at..html.len().min(at + 40)];
            assert!(
                around.starts_with("http://www.w3.org/2000/svg\""),
                "{around}"
            );
        }
        assert!(!html.contains("<?xml"), "prolog kept");
        assert!(!html.contains(" src="), "{html}");
        assert!(html.contains("<text x=\"0\" y=\"15\">flame: main</text>"));
    }

    #[test]
    fn sections_follow_the_views_built() {
        let all = page(&rich());
        for s in [
            "<h3>Memory</h3>",
            "<h3>Peak</h3>",
            "<h3>Temporary</h3>",
            "<h3>Histograms</h3>",
            "id=\"mt-timeline\"",
        ] {
            assert!(all.contains(s), "{s}");
        }
        let leaks = page(&rich_with(vec![View::Leaks]));
        assert!(leaks.contains("<h3>Leaks</h3>"));
        for s in [
            "<h3>Memory</h3>",
            "<h3>Peak</h3>",
            "<h3>Temporary</h3>",
            "<h3>Histograms</h3>",
            "id=\"mt-timeline\"",
        ] {
            assert!(!leaks.contains(s), "{s}");
        }
    }

    /// [`rich`] with PID 42's resident memory known, on its timeline too,
    /// and a memory view with every part: fault stacks, mappings, kernel
    /// stacks and an OOM kill, frames and an allocator name that need
    /// escaping.
    fn with_memory() -> Report {
        use super::super::memory::{
            FaultStackReport, FaultSummary, KernelBytes, KernelReport, KernelStackReport,
            MappingReport, OomReport,
        };
        use crate::mem::Explanation;
        let frame = |name: &str, address| Frame {
            function: Some(name.into()),
            address,
            ..Frame::default()
        };
        let kernel = |live_bytes, total_bytes| KernelBytes {
            live_bytes,
            live_count: live_bytes / 64,
            total_bytes,
            total_count: total_bytes / 64,
        };
        let mut r = super::super::svg::tests::rich_with_resident();
        let p = &mut r.processes[0];
        p.resident = Some(ResidentSummary {
            resident_bytes: 9 << 20,
            anon_bytes: 6 << 20,
            file_bytes: 3 << 20,
            shmem_bytes: 0,
            swap_bytes: 4096,
            peak_resident_bytes: 9 << 20,
            traced_anon_bytes: 400_000,
            coverage_pct: 6.4,
        });
        p.memory = Some(MemoryReport {
            resident_known: true,
            explained: Explanation {
                allocated: 528_784,
                resident: 9 << 20,
                resident_anon: 6 << 20,
                resident_file: 3 << 20,
                resident_shmem: 0,
                swap: 4096,
                mapped: 4 << 20,
                mapped_by_allocator: 1 << 20,
                allocated_resident: 524_288,
                allocated_untouched: 4_496,
                retained_by_allocator: 2 << 20,
                other_anon: 3 << 20,
                anon_unattributed: (1 << 20) - 524_288,
                kernel: 12_288,
            },
            peak_resident_at_s: 0.011,
            faults: FaultSummary {
                count: 1_536,
                bytes: 6 << 20,
                unplaced_bytes: 8192,
                sample_every: 32,
            },
            fault_stacks: vec![FaultStackReport {
                sampled_faults: 48,
                sampled_bytes: 196_608,
                estimated_bytes: 6 << 20,
                frames: vec![frame("fill<char>", 0x40_1400), frame("main", 0x40_1900)],
            }],
            mappings: vec![
                MappingReport {
                    start: "0x7f0000000000".into(),
                    bytes: 4 << 20,
                    backing: Backing::Anon,
                    by_allocator: true,
                    resident_bytes: 3 << 20,
                    frames: vec![frame("sysmalloc", 0x7f_1000)],
                },
                MappingReport {
                    start: "0x7f0000400000".into(),
                    bytes: 1 << 20,
                    backing: Backing::File,
                    by_allocator: false,
                    resident_bytes: 0,
                    frames: vec![],
                },
            ],
            map_stacks: vec![],
            kernel: Some(KernelReport {
                slab: kernel(8192, 16_384),
                pages: kernel(4096, 4096),
                percpu: kernel(0, 0),
                slab_pages: kernel(0, 0),
                unknown_frees: 3,
                stacks: vec![KernelStackReport {
                    allocator: "kmalloc<x>",
                    bytes: kernel(8192, 16_384),
                    frames: vec![
                        frame("__kmalloc", 0xffff_0001),
                        frame("do_sys_open", 0xffff_0002),
                    ],
                }],
                stacks_omitted: 2,
            }),
            unknown_unmaps: 1,
            lazily_freed_bytes: 0,
            execs: 0,
            oom: Some(OomReport {
                at_s: 0.05,
                anon_rss_bytes: 6 << 20,
                file_rss_bytes: 3 << 20,
                shmem_rss_bytes: 0,
                pgtables_bytes: 8192,
                total_vm_bytes: 64 << 20,
                oom_score_adj: 500,
            }),
        });
        r
    }

    /// From `<h3>Memory</h3>` to the next section heading.
    fn memory_section(html: &str) -> &str {
        let at = html.find("<h3>Memory</h3>").expect("a memory section");
        let end = html[at + 1..]
            .find("<h3>")
            .map_or(html.len(), |e| at + 1 + e);
        &html[at..end]
    }

    #[test]
    fn memory_section_matches_its_snapshot() {
        insta::assert_snapshot!("memory", memory_section(&page(&with_memory())));
    }

    #[test]
    fn memory_view_explains_allocated_against_resident() {
        let html = page(&with_memory());
        let m = memory_section(&html);
        for s in [
            "<th>allocated (heap, live)</th><td class=\"mt-num\">528,784 B",
            "<tr class=\"mt-d1\"><th>of which never touched</th><td class=\"mt-num\">4,496 B",
            "<th>resident (RSS)</th><td class=\"mt-num\">9,437,184 B",
            "<tr class=\"mt-d2\"><th>allocator: retained, not allocated</th><td class=\"mt-num\">2,097,152 B",
            "<th>other anonymous mappings</th>",
            "<th>no fault seen</th><td class=\"mt-num\">524,288 B",
            "<th>file</th><td class=\"mt-num\">3,145,728 B",
            "<th>swap</th><td class=\"mt-num\">4,096 B",
            "<th>mapped (mmap/mremap while traced)</th>",
            "<th>kernel (not in RSS)</th><td class=\"mt-num\">12,288 B",
            "what the program asked malloc &amp; co for and still holds",
            "<h4>Made resident by (estimated from samples)</h4>",
            "<summary>fill&lt;char&gt;</summary>",
            "<h4>Mappings with the most resident bytes</h4>",
            "<td>anon (allocator)</td>",
            "<h4>Kernel memory by kernel stack</h4>",
            "<td>kmalloc&lt;x&gt;</td>",
            "<summary>__kmalloc</summary>",
            "… 2 more stacks",
            "OOM-killed at 0.050 s: anon-rss 6,291,456 B",
            "oom_score_adj 500.",
        ] {
            assert!(m.contains(s), "{s}\n{m}");
        }
        // Mappings that hold nothing resident are left out, as in text.
        assert!(!m.contains("0x7f0000400000"), "{m}");
        assert!(!html.contains("fill<char>"), "{html}");
        assert!(!html.contains("kmalloc<x>"), "{html}");
        assert!(
            html.contains("<p>Resident: 9,437,184 B <span class=\"mt-h\">[9.0 MiB]</span> (anon "),
            "{html}"
        );
        // The page's timeline has the resident line, and its counts
        // include the memory view's rows: 1 fault stack, 1 mapping, 1
        // kernel stack.
        assert!(html.contains("<polyline class=\"mt-resident\""), "{html}");
        assert!(
            html.contains(">server (42): resident (RSS)</text>"),
            "{html}"
        );
        let rows = html.matches("<tr class=\"mt-stack\">").count();
        assert_eq!(
            rows,
            page(&rich()).matches("<tr class=\"mt-stack\">").count() + 3
        );
        assert!(
            html.contains(&format!("{{\"processes\":2,\"stacks\":{rows}}}")),
            "{html}"
        );
    }

    #[test]
    fn memory_view_without_resident_data_says_so_and_shows_what_is_known() {
        let html = page(&rich());
        let m = memory_section(&html);
        assert!(m.contains("No resident memory (RSS) was reported"), "{m}");
        assert!(
            m.contains("<th>allocated (heap, live)</th><td class=\"mt-num\">528,784 B"),
            "{m}"
        );
        assert!(
            m.contains("<th>mapped (mmap/mremap while traced)</th>"),
            "{m}"
        );
        for s in [
            "resident (RSS)</th>",
            "of which",
            "<th>swap</th>",
            "kernel (not in RSS)",
            "Faults:",
        ] {
            assert!(!m.contains(s), "{s}\n{m}");
        }
        assert!(!html.contains("<p>Resident:"), "{html}");
        assert!(!html.contains("mt-resident"), "{html}");
    }

    #[test]
    fn embedded_counts_match_the_rows_written() {
        let html = page(&rich());
        let rows = html.matches("<tr class=\"mt-stack\">").count();
        let sections = html.matches("<section class=\"mt-process\"").count();
        assert_eq!(sections, 2);
        assert!(
            html.contains(&format!("{{\"processes\":2,\"stacks\":{rows}}}")),
            "{html}"
        );
        assert!(html.contains("<p id=\"status\">static</p>"));
    }

    /// Writes the page of [`with_memory`] (every part of the memory view),
    /// with a real flame graph (inferno's, script and all), to
    /// `MEMTRACE_HTML_OUT` for a look in a browser (`chromium --headless
    /// --dump-dom file://…`); does nothing otherwise.
    #[test]
    fn write_page_for_a_browser() {
        let Some(path) = std::env::var_os("MEMTRACE_HTML_OUT") else {
            return;
        };
        let samples = super::super::samples(&aggregator(), &mut Names, View::Leaks);
        let mut flame = Vec::new();
        let opts = FlameOptions {
            title: "live bytes".into(),
            icicle: false,
        };
        super::super::flame::render(&samples, Weight::LiveBytes, &opts, &mut flame).unwrap();
        let mut out = Vec::new();
        render(&with_memory(), &String::from_utf8(flame).unwrap(), &mut out).unwrap();
        std::fs::write(path, out).unwrap();
    }
}
