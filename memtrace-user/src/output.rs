//! The last stage, shared by live tracing and `memtrace report`: build what
//! a view needs from the aggregator and hand it to the renderer of the
//! format asked for, into a file created mode 0600 or standard output.
//!
//! Not here: any rendering (see `report::*`), any tracing.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use memtrace_common::Counter;

use crate::agg::Aggregator;
use crate::cli::ViewArgs;
use crate::error::UserError;
use crate::record::Counters;
use crate::record::reader::Integrity;
use crate::report::{self, Format, Ledger, Probes, View, flame, folded, hlog, html, json, pprof};
use crate::report::{svg, text};
use crate::symbolize::Symbolize;

/// Opens `path` for a report or export (mode 0600: reports name the
/// functions and files of the traced programs), or standard output.
pub fn open(path: Option<&Path>) -> Result<Box<dyn Write>, UserError> {
    match path {
        None => Ok(Box::new(io::stdout())),
        Some(path) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map(|f| Box::new(io::BufWriter::new(f)) as Box<dyn Write>)
            .map_err(|e| {
                UserError::new(
                    format!("cannot write the report to {}: {e}", path.display()),
                    "choose a writable path for --output",
                )
            }),
    }
}

/// Report options from the command line, for a trace that began at
/// `start_ns` and is reported at `end_ns` (both CLOCK_MONOTONIC ns).
pub fn options(args: &ViewArgs, start_ns: u64, end_ns: u64, duration_s: f64) -> report::Options {
    report::Options {
        top: args.top,
        live_before_ns: args
            .older_than
            .map(|ms| end_ns.saturating_sub(ms * 1_000_000)),
        duration_s,
        start_ns,
        views: Vec::new(),
    }
}

/// Everything a report is made from.
pub struct Inputs<'a> {
    /// The accounting.
    pub agg: &'a Aggregator,
    /// What was not seen.
    pub ledger: &'a Ledger,
    /// Where probes were attached.
    pub probes: &'a [Probes],
    /// Addresses to frames.
    pub sym: &'a mut dyn Symbolize,
    /// Times and cuts (its `views` is set here).
    pub opts: report::Options,
    /// For a report from a recording: how much of it was read.
    pub recording: Option<Integrity>,
}

/// Writes the view and format of `args` to `out`.
pub fn write(args: &ViewArgs, mut input: Inputs<'_>, out: &mut dyn Write) -> io::Result<()> {
    let view = args.view;
    let build = |views: Vec<View>, input: &mut Inputs<'_>| {
        let opts = report::Options {
            views,
            ..input.opts.clone()
        };
        let mut r = report::build(input.agg, input.ledger, input.probes, input.sym, &opts);
        r.recording = input.recording.clone();
        r
    };
    match args.format {
        Format::Text => text::render(&build(vec![view], &mut input), view, out)?,
        Format::Json => json::render(&build(vec![view], &mut input), out)?,
        Format::Svg => svg::timeline(&build(vec![view], &mut input), out)?,
        Format::Hlog => hlog::render(&build(vec![view], &mut input), out)?,
        Format::Flamegraph => {
            let samples = report::samples(input.agg, input.sym, view);
            let opts = flame::FlameOptions {
                title: format!("memtrace: {} by {}", view.name(), weight_title(args)),
                icicle: args.icicle,
            };
            flame::render(&samples, args.weight(), &opts, out)?;
        }
        Format::Folded => {
            let samples = report::samples(input.agg, input.sym, view);
            folded::render(&samples, args.weight(), out)?;
        }
        Format::Pprof => {
            let samples = report::samples(input.agg, input.sym, view);
            pprof::render(&samples, view, input.opts.duration_s, out)?;
        }
        Format::Html => {
            let samples = report::samples(input.agg, input.sym, View::Leaks);
            let mut svg = Vec::new();
            let opts = flame::FlameOptions {
                title: "live bytes by stack".into(),
                icicle: args.icicle,
            };
            flame::render(&samples, report::Weight::LiveBytes, &opts, &mut svg)?;
            let r = build(View::ALL.to_vec(), &mut input);
            html::render(&r, &String::from_utf8_lossy(&svg), out)?;
        }
    }
    out.flush()
}

fn weight_title(args: &ViewArgs) -> &'static str {
    match args.weight() {
        report::Weight::LiveBytes => "live bytes",
        report::Weight::LiveCount => "live blocks",
        report::Weight::TotalBytes => "bytes allocated",
        report::Weight::TotalCount => "blocks allocated",
    }
}

/// Writes a report, turning a closed pipe (`| head`) into success and other
/// errors into a [`UserError`].
pub fn emit(args: &ViewArgs, input: Inputs<'_>, out: &mut dyn Write) -> Result<(), UserError> {
    match write(args, input, out) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(UserError::new(
            format!("cannot write the report: {e}"),
            "check the output path and free disk space",
        )),
    }
}

/// The ledger as a recording stores it.
pub fn counters_of(ledger: &Ledger) -> Counters {
    Counters {
        kernel: ledger
            .kernel
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>(),
        decode_errors: ledger.decode_errors,
        traced_calls: ledger.traced_calls,
        memtrace: ledger.memtrace.map(Into::into),
    }
}

/// The ledger a recording's counters describe. Counter names of another
/// memtrace version are kept, not dropped.
pub fn ledger_of(c: &Counters) -> Ledger {
    Ledger {
        kernel: c
            .kernel
            .iter()
            .map(|(k, v)| {
                let name = Counter::ALL
                    .iter()
                    .map(|c| c.name())
                    .find(|n| n == k)
                    // A handful of names at most, once per report.
                    .unwrap_or_else(|| Box::leak(k.clone().into_boxed_str()));
                (name, *v)
            })
            .collect(),
        decode_errors: c.decode_errors,
        traced_calls: c.traced_calls,
        memtrace: c.memtrace.map(Into::into),
        // Not recorded: a recording is about the traced program.
        probe_cost: Vec::new(),
        // Not recorded yet: a recording's ledger has the totals only.
        lost_sites: Vec::new(),
        dwarf: Default::default(),
        python: Default::default(),
    }
}
