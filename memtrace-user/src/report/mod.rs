//! Reports: plain data built from the aggregator's state, then rendered.
//!
//! [`build`] is pure apart from the [`Symbolize`] it is handed: it selects,
//! sorts and cuts (`--top`, `--older-than`) the aggregator's stacks and
//! resolves their frames. Renderers ([`text`], [`json`]) are separate
//! functions of a [`Report`]. Nothing here reads the clock or `/proc`.

pub mod json;
pub mod text;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::agg::{Aggregator, Process, StackId, Stats};
use crate::symbolize::{Frame, Symbolize};

/// Version of the JSON layout. Fields may be added without a bump; none are
/// removed or renamed without one.
pub const REPORT_VERSION: u32 = 1;

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
}

/// Which allocator functions were probed in one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Probes {
    /// The file, as given to the kernel.
    pub module: String,
    /// Process ids the probes are limited to; empty means every process.
    pub pids: Vec<u32>,
    /// Functions probed (one name per distinct address).
    pub functions: Vec<String>,
    /// Functions looked for and not found in this file.
    pub missing: Vec<String>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Always `exact` for now (every call traced).
    pub mode: &'static str,
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
}

/// One process instance.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    /// Process id.
    pub pid: u32,
    /// Command name, when it could be read.
    pub comm: Option<String>,
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
    /// Distribution of the sizes allocated.
    pub sizes: SizeSummary,
    /// Stacks shown (after `--top` and `--older-than`).
    pub stacks: Vec<StackReport>,
    /// Stacks with allocations not shown because of `--top`.
    pub stacks_omitted: usize,
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
    /// The kernel side's counters, by name.
    pub kernel: Vec<(&'static str, u64)>,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Traced calls.
    pub traced_calls: u64,
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
        .map(|p| process_report(p, sym, opts))
        .collect();
    processes.sort_by(|a, b| {
        (b.live_bytes, b.total_bytes, a.pid).cmp(&(a.live_bytes, a.total_bytes, b.pid))
    });
    let mut lost: BTreeMap<&'static str, u64> = ledger.kernel.iter().copied().collect();
    lost.insert("decode_errors", ledger.decode_errors);
    lost.insert("unknown_frees", agg.unknown_frees());
    lost.insert("missed_frees", agg.missed_frees());
    Report {
        version: REPORT_VERSION,
        mode: "exact",
        duration_s: opts.duration_s,
        processes,
        lost,
        traced_calls: ledger.traced_calls,
        probes: probes.to_vec(),
    }
}

fn process_report(p: &Process, sym: &mut dyn Symbolize, opts: &Options) -> ProcessReport {
    let older = opts.live_before_ns.map(|cutoff| p.live_older_than(cutoff));
    let mut rows: Vec<(StackId, Stats)> = p
        .stacks()
        .iter()
        .enumerate()
        .map(|(i, s)| (i as StackId, s.stats))
        .filter_map(|(id, stats)| match &older {
            None => Some((id, stats)),
            Some(old) => old.get(&id).map(|o| {
                (
                    id,
                    Stats {
                        live_bytes: o.live_bytes,
                        live_count: o.live_count,
                        ..stats
                    },
                )
            }),
        })
        .collect();
    rows.sort_by(|(ia, a), (ib, b)| {
        (b.live_bytes, b.total_bytes, ia).cmp(&(a.live_bytes, a.total_bytes, ib))
    });
    let shown = if opts.top == 0 {
        rows.len()
    } else {
        opts.top.min(rows.len())
    };
    let stacks = rows[..shown]
        .iter()
        .map(|(id, s)| StackReport {
            live_bytes: s.live_bytes,
            live_count: s.live_count,
            total_bytes: s.total_bytes,
            total_count: s.total_count,
            frames: sym.frames(p.pid, &p.stacks()[*id as usize].frames),
        })
        .collect();
    let t = p.totals;
    ProcessReport {
        pid: p.pid,
        comm: sym.comm(p.pid),
        exited: p.exit_ts_ns.is_some(),
        live_bytes: t.live_bytes,
        live_count: t.live_count,
        total_bytes: t.total_bytes,
        total_count: t.total_count,
        freed_bytes: t.freed_bytes,
        freed_count: t.freed_count,
        unknown_frees: p.unknown_frees,
        missed_frees: p.missed_frees,
        sizes: SizeSummary::of(p),
        stacks,
        stacks_omitted: rows.len() - shown,
    }
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
}
