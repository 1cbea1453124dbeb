//! `memtrace report FILE`: a recording replayed through the same aggregator
//! and renderers as a live run, so the report equals the live one of the
//! same run (given the same options).
//!
//! Glue only: reading is `record::reader`, accounting `agg`, output
//! `output`.

use std::path::Path;

use crate::agg::Aggregator;
use crate::cli::{CountArgs, ReportArgs};
use crate::error::{Result, UserError};
use crate::output::{self, Inputs};
use crate::record::reader::{self, Recording};
use crate::report;
use crate::session;

/// Replays `path` into an aggregator configured from `count` (defaulting to
/// the recording's own settings).
pub fn load(path: &Path, count: &CountArgs) -> Result<(Aggregator, Recording)> {
    count
        .validate()
        .map_err(|m| UserError::new(m, "see memtrace report --help"))?;
    let start = reader::read_start(path)?;
    let mut agg = Aggregator::new(session::config(count, Some(&start)));
    let rec = reader::replay(path, |e| {
        agg.on_event(e);
    })?;
    Ok((agg, rec))
}

/// Says on standard error what part of the recording could not be read.
pub fn warn_if_cut(path: &Path, rec: &Recording) {
    let i = &rec.integrity;
    if i.cut_bytes > 0 {
        eprintln!(
            "memtrace: {} was cut: the last {} of its {} bytes are unreadable ({}); the report covers the {} complete blocks before, up to {:.3} s",
            path.display(),
            report::text::group(i.cut_bytes),
            report::text::group(i.file_bytes),
            i.damage.as_deref().unwrap_or("incomplete block"),
            report::text::group(i.blocks),
            rec.duration_s,
        );
    } else if !i.complete {
        eprintln!(
            "memtrace: {} has no end block (the writer was killed or is still running); the report covers its {} blocks, up to {:.3} s",
            path.display(),
            report::text::group(i.blocks),
            rec.duration_s,
        );
    }
}

/// Runs `memtrace report`; returns the exit status.
pub fn run(args: ReportArgs) -> Result<i32> {
    args.view
        .validate()
        .map_err(|m| UserError::new(m, "see memtrace report --help"))?;
    let (agg, mut rec) = load(&args.file, &args.count)?;
    warn_if_cut(&args.file, &rec);
    let mut out = output::open(args.view.output.as_deref())?;
    let ledger = output::ledger_of(&rec.counters);
    let opts = output::options(&args.view, rec.start.start_ns, rec.end_ns, rec.duration_s);
    let input = Inputs {
        agg: &agg,
        ledger: &ledger,
        probes: &rec.probes,
        sym: &mut rec.symbols,
        opts,
        recording: Some(rec.integrity.clone()),
    };
    output::emit(&args.view, input, &mut out)?;
    Ok(0)
}
