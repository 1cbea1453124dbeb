//! The `python-lines` view: bytes by the Python line that allocated them,
//! as tracemalloc's `statistics("lineno")` groups them, but from outside
//! the process. Each stack counts for its innermost Python frame (the line
//! running when the allocation was made, in Python code or in C code it
//! called); stacks without one (the interpreter's own start-up, threads of
//! C libraries) are summed in one row of their own. Live bytes of
//! CPython's own allocator (`--python-allocators`) are also shown apart.
//!
//! Built from the aggregator's stacks like the other views; renders in
//! `text` (here) and JSON (serialized as it is).

use std::collections::HashMap;
use std::io::{self, Write};

use serde::Serialize;

use super::Options;
use super::text::group;
use crate::agg::{Process, Stats};
use crate::python;
use crate::symbolize::Symbolize;

/// One Python line's allocations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PythonLine {
    /// The function (`co_qualname`).
    pub function: Option<String>,
    /// Its file.
    pub file: Option<String>,
    /// The line; `None` where the interpreter had none for the instruction.
    pub line: Option<u32>,
    /// Bytes live.
    pub live_bytes: u64,
    /// Blocks live.
    pub live_count: u64,
    /// Bytes allocated.
    pub total_bytes: u64,
    /// Blocks allocated.
    pub total_count: u64,
    /// Of the live bytes, those from CPython's allocator (pymalloc, traced
    /// with `--python-allocators`); the rest came from `malloc` and kin.
    pub python_allocator_live_bytes: u64,
}

/// A process's allocations by Python line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PythonLinesReport {
    /// Lines, by live bytes, then bytes allocated (cut by `--top`).
    pub lines: Vec<PythonLine>,
    /// Lines not shown because of `--top`.
    pub lines_omitted: usize,
    /// Allocations whose stacks have no Python frame.
    pub outside_python: PythonLine,
}

/// Groups the stacks of `p` by their innermost Python frame.
pub fn build(p: &Process, sym: &mut dyn Symbolize, opts: &Options) -> PythonLinesReport {
    let mut by_line: HashMap<u64, PythonLine> = HashMap::new();
    let mut outside = PythonLine::default();
    for (id, s) in p.stacks().iter().enumerate() {
        let frames = p.frames(id as u32);
        let from_allocator = frames
            .first()
            .is_some_and(|&a| python::is_allocator_frame(a));
        let line = frames
            .iter()
            .skip(usize::from(from_allocator))
            .find(|&&a| python::is_python(a));
        let row = match line {
            Some(&addr) => by_line.entry(addr).or_insert_with(|| {
                let f = sym.frames(p.pid, &[addr]).remove(0);
                PythonLine {
                    function: f.function,
                    file: f.file,
                    line: f.line,
                    ..PythonLine::default()
                }
            }),
            None => &mut outside,
        };
        add(row, &s.stats, from_allocator);
    }
    // One code object may stand at two addresses (two ids, if it was seen
    // again after an exec): rows are merged by what they show.
    /// What a row shows: function, file and line.
    type Shown = (Option<String>, Option<String>, Option<u32>);
    let mut merged: HashMap<Shown, PythonLine> = HashMap::new();
    for l in by_line.into_values() {
        let key = (l.function.clone(), l.file.clone(), l.line);
        match merged.get_mut(&key) {
            Some(m) => {
                m.live_bytes += l.live_bytes;
                m.live_count += l.live_count;
                m.total_bytes += l.total_bytes;
                m.total_count += l.total_count;
                m.python_allocator_live_bytes += l.python_allocator_live_bytes;
            }
            None => {
                merged.insert(key, l);
            }
        }
    }
    let mut lines: Vec<PythonLine> = merged.into_values().collect();
    lines.sort_by(|a, b| {
        (b.live_bytes, b.total_bytes)
            .cmp(&(a.live_bytes, a.total_bytes))
            .then_with(|| (&a.file, a.line, &a.function).cmp(&(&b.file, b.line, &b.function)))
    });
    let shown = super::top(opts, lines.len());
    let lines_omitted = lines.len() - shown;
    lines.truncate(shown);
    PythonLinesReport {
        lines,
        lines_omitted,
        outside_python: outside,
    }
}

fn add(row: &mut PythonLine, s: &Stats, from_allocator: bool) {
    row.live_bytes += s.live_bytes;
    row.live_count += s.live_count;
    row.total_bytes += s.total_bytes;
    row.total_count += s.total_count;
    if from_allocator {
        row.python_allocator_live_bytes += s.live_bytes;
    }
}

/// The view's text: one line per Python line.
pub fn render(r: &PythonLinesReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  by Python line (innermost Python frame of each stack):"
    )?;
    for l in &r.lines {
        let place = match (&l.file, l.line) {
            (Some(f), Some(n)) => format!("{f}:{n}"),
            (Some(f), None) => f.clone(),
            _ => "?".to_string(),
        };
        row(
            out,
            l,
            &format!("{place} {}", l.function.as_deref().unwrap_or("?")),
        )?;
    }
    if r.lines_omitted > 0 {
        writeln!(
            out,
            "    ... {} more lines (--top)",
            group(r.lines_omitted as u64)
        )?;
    }
    if r.outside_python.total_count > 0 {
        row(out, &r.outside_python, "(no Python frame)")?;
    }
    Ok(())
}

fn row(out: &mut dyn Write, l: &PythonLine, what: &str) -> io::Result<()> {
    let pymalloc = if l.python_allocator_live_bytes > 0 {
        format!(
            ", {} B of it from the Python allocator",
            group(l.python_allocator_live_bytes)
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "    {} B live in {} blocks ({} B in {} blocks allocated{pymalloc})  {what}",
        group(l.live_bytes),
        group(l.live_count),
        group(l.total_bytes),
        group(l.total_count),
    )
}
