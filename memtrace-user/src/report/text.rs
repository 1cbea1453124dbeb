//! The human report: per process, the top stacks by live bytes with their
//! frames, then the loss ledger (zeros printed too).
//!
//! Byte counts are exact, with thousands separators; human units appear only
//! next to them, never instead of them.

use std::io::{self, Write};

use super::{ProcessReport, Report};
use crate::symbolize::Frame;

/// Writes the report as text.
pub fn render(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    let shown: Vec<&ProcessReport> = r.processes.iter().filter(|p| p.total_count > 0).collect();
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
        let scope = if p.pids.is_empty() {
            "all processes".to_string()
        } else {
            let pids: Vec<String> = p.pids.iter().map(u32::to_string).collect();
            format!("pid {}", pids.join(","))
        };
        write!(
            out,
            "probes: {} ({scope}): {}",
            p.module,
            p.functions.join(" ")
        )?;
        if !p.missing.is_empty() {
            write!(out, "; not found: {}", p.missing.join(" "))?;
        }
        writeln!(out)?;
    }
    for p in &shown {
        writeln!(out)?;
        process(p, out)?;
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

fn process(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "PID {} ({}){}: {} B live in {} blocks [{}]; {} B allocated in {} blocks; {} B freed in {}",
        p.pid,
        p.comm.as_deref().unwrap_or("?"),
        if p.exited { ", exited" } else { "" },
        group(p.live_bytes),
        group(p.live_count),
        human(p.live_bytes),
        group(p.total_bytes),
        group(p.total_count),
        group(p.freed_bytes),
        group(p.freed_count),
    )?;
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
            "  {} frees of blocks allocated before tracing (or unknown); {} blocks reused before their free was seen",
            group(p.unknown_frees),
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
        if s.frames.is_empty() {
            writeln!(out, "      [stack not captured]")?;
        }
        for f in &s.frames {
            writeln!(out, "      {}", frame(f))?;
        }
    }
    if p.stacks_omitted > 0 {
        writeln!(
            out,
            "  ... {} more stacks (--top 0 shows all)",
            group(p.stacks_omitted as u64)
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

#[cfg(test)]
mod tests {
    use super::super::{Ledger, Options, build, tests::sample};
    use super::*;

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
            ..Ledger::default()
        };
        let r = build(&agg, &ledger, &[], &mut table, &Options::default());
        let mut out = Vec::new();
        render(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("PID 42 (prog): 5,200 B live in 3 blocks"),
            "{text}"
        );
        assert!(text.contains("5,000 B live in 1 blocks"), "{text}");
        assert!(text.contains("      leak_big\n      main\n"), "{text}");
        assert!(
            text.contains("not seen: decode_errors=0 missed_frees=0 ringbuf_full=0 stack_lost=0 unknown_frees=0"),
            "{text}"
        );
    }
}
