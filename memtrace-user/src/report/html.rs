//! The HTML report: one self-contained page with every view the report
//! holds — summary, loss ledger, flame graph, timeline plot, and per
//! process the leaks, peak, temporary and histogram tables.
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

use super::svg::{escape, timeline_svg};
use super::text::{STATS, frame, group, human, human_ns};
use super::{
    Distribution, HistogramsReport, PeakReport, ProcessReport, Report, StackReport, TemporaryReport,
};
use crate::symbolize::Frame;

/// Writes the report as one HTML page, with `flame_svg` (an SVG document,
/// may be empty) as its flame graph.
pub fn render(r: &Report, flame_svg: &str, out: &mut dyn Write) -> io::Result<()> {
    let shown: Vec<&ProcessReport> = r.processes.iter().filter(|p| p.total_count > 0).collect();
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
        self.leaks(p)?;
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
        writeln!(
            self.out,
            "<p>Sizes: min {}, median {}, p90 {}, p99 {}, max {}.</p>",
            bytes(z.min),
            bytes(z.p50),
            bytes(z.p90),
            bytes(z.p99),
            bytes(z.max)
        )?;
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
            "<h3>Peak</h3>",
            "<h3>Temporary</h3>",
            "<h3>Histograms</h3>",
            "id=\"mt-timeline\"",
        ] {
            assert!(!leaks.contains(s), "{s}");
        }
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

    /// Writes the page, with a real flame graph (inferno's, script and
    /// all), to `MEMTRACE_HTML_OUT` for a look in a browser (`chromium
    /// --headless --dump-dom file://…`); does nothing otherwise.
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
        render(&rich(), &String::from_utf8(flame).unwrap(), &mut out).unwrap();
        std::fs::write(path, out).unwrap();
    }
}
