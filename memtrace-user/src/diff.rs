//! `memtrace diff`: per-stack growth of live bytes between two recordings,
//! or between two times of one.
//!
//! Addresses differ from run to run (ASLR), so a stack is identified by its
//! process name and its symbolized frames (function, else module+offset):
//! the same code path in two runs is one row. [`compare`] is pure; [`run`]
//! reads recordings and renders.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use serde::Serialize;

use crate::agg::{Aggregator, StackId};
use crate::cli::{CountArgs, DiffArgs, DiffFormat};
use crate::error::{Result, UserError};
use crate::output;
use crate::record::reader;
use crate::report::text::group;
use crate::session;
use crate::symbolize::Symbolize;

/// A stack's identity across runs: process name, then frame labels,
/// innermost first.
pub type Key = Vec<String>;

/// Live bytes and blocks per stack at one moment.
pub type Snapshot = BTreeMap<Key, (u64, u64)>;

/// Live (bytes, blocks) per (pid, stack) at one moment, before symbolizing.
type Raw = HashMap<(u32, StackId), (u64, u64)>;

fn raw(agg: &Aggregator) -> Raw {
    let mut out = Raw::new();
    for p in agg.processes() {
        for (i, s) in p.stacks().iter().enumerate() {
            if s.stats.live_count > 0 {
                *out.entry((p.pid, i as StackId)).or_default() =
                    (s.stats.live_bytes, s.stats.live_count);
            }
        }
    }
    out
}

/// Symbolizes a raw snapshot into keys (stacks with the same key add up).
fn keyed(agg: &Aggregator, raw: &Raw, sym: &mut dyn Symbolize) -> Snapshot {
    let mut out = Snapshot::new();
    let procs: HashMap<u32, &crate::agg::Process> = agg.processes().map(|p| (p.pid, p)).collect();
    for (&(pid, id), &(bytes, count)) in raw {
        let Some(p) = procs.get(&pid) else { continue };
        let mut key = vec![sym.comm(pid).unwrap_or_else(|| format!("pid {pid}"))];
        key.extend(sym.frames(pid, &p.frames(id)).iter().map(|f| f.label()));
        let e = out.entry(key).or_default();
        e.0 += bytes;
        e.1 += count;
    }
    out
}

/// One stack's change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Process name.
    pub comm: String,
    /// Frame labels, innermost first.
    pub frames: Vec<String>,
    /// Live bytes before.
    pub before_bytes: u64,
    /// Live bytes after.
    pub after_bytes: u64,
    /// after − before.
    pub delta_bytes: i64,
    /// Live blocks before.
    pub before_count: u64,
    /// Live blocks after.
    pub after_count: u64,
    /// after − before.
    pub delta_count: i64,
}

/// Every stack live in either snapshot whose live bytes or blocks changed,
/// largest absolute byte change first.
pub fn compare(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut keys: Vec<&Key> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<Change> = keys
        .into_iter()
        .filter_map(|k| {
            let (bb, bc) = before.get(k).copied().unwrap_or_default();
            let (ab, ac) = after.get(k).copied().unwrap_or_default();
            ((bb, bc) != (ab, ac)).then(|| Change {
                comm: k[0].clone(),
                frames: k[1..].to_vec(),
                before_bytes: bb,
                after_bytes: ab,
                delta_bytes: ab as i64 - bb as i64,
                before_count: bc,
                after_count: ac,
                delta_count: ac as i64 - bc as i64,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.delta_bytes
            .unsigned_abs()
            .cmp(&a.delta_bytes.unsigned_abs())
            .then(b.delta_bytes.cmp(&a.delta_bytes))
            .then(a.frames.cmp(&b.frames))
    });
    out
}

/// Live bytes per stack at the end of a recording.
fn at_end(path: &std::path::Path, count: &CountArgs) -> Result<Snapshot> {
    let (agg, mut rec) = crate::replay::load(path, count)?;
    crate::replay::warn_if_cut(path, &rec);
    let r = raw(&agg);
    Ok(keyed(&agg, &r, &mut rec.symbols))
}

/// Live bytes per stack at two times (seconds from the start) of one
/// recording.
fn at_times(
    path: &std::path::Path,
    count: &CountArgs,
    from_s: f64,
    to_s: Option<f64>,
) -> Result<(Snapshot, Snapshot)> {
    let start = reader::read_start(path)?;
    let from_ns = start.start_ns + (from_s * 1e9) as u64;
    let to_ns = to_s.map(|t| start.start_ns + (t * 1e9) as u64);
    let mut agg = Aggregator::new(session::config(count, Some(&start)));
    let mut before: Option<Raw> = None;
    let mut rec = reader::replay(path, |e| {
        let ts = e.ts_ns();
        if before.is_none() && ts > from_ns {
            before = Some(raw(&agg));
        }
        if to_ns.is_none_or(|t| ts <= t) {
            agg.on_event(e);
        }
    })?;
    crate::replay::warn_if_cut(path, &rec);
    let before = before.unwrap_or_else(|| raw(&agg));
    let after = raw(&agg);
    Ok((
        keyed(&agg, &before, &mut rec.symbols),
        keyed(&agg, &after, &mut rec.symbols),
    ))
}

/// Runs `memtrace diff`; returns the exit status.
pub fn run(args: DiffArgs) -> Result<i32> {
    args.validate()
        .map_err(|m| UserError::new(m, "see memtrace diff --help"))?;
    let count = CountArgs {
        min_size: None,
        max_size: None,
        temporary_ms: None,
    };
    let (before, after, what) = match &args.after {
        Some(after) => (
            at_end(&args.before, &count)?,
            at_end(after, &count)?,
            format!("{} → {}", args.before.display(), after.display()),
        ),
        None => {
            let from = args.from.unwrap_or(0.0);
            let (b, a) = at_times(&args.before, &count, from, args.to)?;
            let to = args
                .to
                .map_or("the end".to_string(), |t| format!("{t:.3} s"));
            (
                b,
                a,
                format!("{} at {from:.3} s → {to}", args.before.display()),
            )
        }
    };
    let changes = compare(&before, &after);
    let mut out = output::open(args.output.as_deref())?;
    let written = render(&args, &what, &changes, &mut out).and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(UserError::new(
            format!("cannot write the diff: {e}"),
            "check the output path and free disk space",
        )),
    }
}

fn render(
    args: &DiffArgs,
    what: &str,
    changes: &[Change],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let shown = if args.top == 0 {
        changes.len()
    } else {
        args.top.min(changes.len())
    };
    match args.format {
        DiffFormat::Json => {
            #[derive(Serialize)]
            struct Doc<'a> {
                compared: &'a str,
                grown_bytes: i64,
                changes: &'a [Change],
                changes_omitted: usize,
            }
            let doc = Doc {
                compared: what,
                grown_bytes: changes.iter().map(|c| c.delta_bytes).sum(),
                changes: &changes[..shown],
                changes_omitted: changes.len() - shown,
            };
            serde_json::to_writer(&mut *out, &doc)?;
            writeln!(out)
        }
        DiffFormat::Folded => {
            for c in changes.iter().filter(|c| c.delta_bytes > 0) {
                let mut line = vec![c.comm.replace(';', ":")];
                line.extend(c.frames.iter().rev().map(|f| f.replace(';', ":")));
                writeln!(out, "{} {}", line.join(";"), c.delta_bytes)?;
            }
            Ok(())
        }
        DiffFormat::Text => {
            let total: i64 = changes.iter().map(|c| c.delta_bytes).sum();
            writeln!(
                out,
                "memtrace diff: {what}: live bytes {}{} B over {} changed stacks",
                if total >= 0 { "+" } else { "-" },
                group(total.unsigned_abs()),
                group(changes.len() as u64)
            )?;
            for c in &changes[..shown] {
                writeln!(
                    out,
                    "\n{}{} B ({}{} blocks): {} → {} B in {} ({})",
                    if c.delta_bytes >= 0 { "+" } else { "-" },
                    group(c.delta_bytes.unsigned_abs()),
                    if c.delta_count >= 0 { "+" } else { "-" },
                    group(c.delta_count.unsigned_abs()),
                    group(c.before_bytes),
                    group(c.after_bytes),
                    c.comm,
                    group(c.after_count),
                )?;
                for f in &c.frames {
                    writeln!(out, "      {f}")?;
                }
            }
            if shown < changes.len() {
                writeln!(
                    out,
                    "\n... {} more changed stacks (--top 0 shows all)",
                    group((changes.len() - shown) as u64)
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(rows: &[(&[&str], u64, u64)]) -> Snapshot {
        rows.iter()
            .map(|(k, b, c)| (k.iter().map(|s| s.to_string()).collect(), (*b, *c)))
            .collect()
    }

    #[test]
    fn growth_shrink_new_and_gone_stacks() {
        let before = snap(&[
            (&["app", "grow", "main"], 100, 1),
            (&["app", "shrink", "main"], 500, 5),
            (&["app", "same", "main"], 7, 1),
            (&["app", "gone", "main"], 50, 1),
        ]);
        let after = snap(&[
            (&["app", "grow", "main"], 1100, 3),
            (&["app", "shrink", "main"], 200, 2),
            (&["app", "same", "main"], 7, 1),
            (&["app", "new", "main"], 30, 1),
        ]);
        let c = compare(&before, &after);
        let rows: Vec<(&str, i64, i64)> = c
            .iter()
            .map(|c| (c.frames[0].as_str(), c.delta_bytes, c.delta_count))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("grow", 1000, 2),
                ("shrink", -300, -3),
                ("gone", -50, -1),
                ("new", 30, 1)
            ]
        );
    }
}
