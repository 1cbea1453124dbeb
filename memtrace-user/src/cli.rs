//! Command-line definitions (clap) and their pure validation. Nothing here
//! touches the system: `session`, `replay` and `diff` act on the parsed [`Cli`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::report::{Format, View, Weight};

const EXAMPLES: &str = "\
EXAMPLES:
    memtrace --pid 4242              trace a running process until Ctrl-C, then report
    memtrace -p 4242 --interval 5    also print a report every 5 seconds
    memtrace -- ./server --port 80   start a command under tracing, report when it exits
    memtrace --duration 30           trace every process on the host for 30 seconds
    memtrace -p 4242 --format json -o leaks.json --top 0
                                     every stack, as JSON, into a file
    memtrace -p 4242 --older-than 10000
                                     only blocks still live after 10 s (likely leaks)
    memtrace record -o run.mtr -- ./job
                                     record a run, then look at it from every angle:
    memtrace report run.mtr --view peak
    memtrace report run.mtr --format flamegraph -o leaks.svg
    memtrace report run.mtr --format pprof -o heap.pb.gz
    memtrace report run.mtr --format html -o run.html
    memtrace diff before.mtr after.mtr
                                     per-stack growth between two recordings";

/// Exact tracing of heap allocations in live processes, with eBPF.
///
/// memtrace probes the C library's allocator (malloc, calloc, realloc,
/// reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc,
/// free) and C++ operator new, records the call stack of every allocation,
/// and reports which stacks hold how many bytes, with what it could not see.
/// Without a subcommand it traces and reports live.
#[derive(Debug, Parser)]
#[command(
    name = "memtrace",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; tracing live when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Live tracing.
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace like the live command and write everything to a recording.
    Record(RecordArgs),
    /// Report from a recording, in any view and format.
    Report(ReportArgs),
    /// Per-stack growth between two recordings, or two times of one.
    Diff(DiffArgs),
    /// Fleet mode: every process on the host until stopped, kernel
    /// tracepoints for all, sampled allocations for the selected and the
    /// growing; Prometheus metrics and pprof profiles.
    Agent(Box<crate::agent::AgentArgs>),
    /// Internal: continues the processes memtrace stopped if memtrace dies
    /// (started by memtrace itself; see `guard`).
    #[command(hide = true)]
    Guard {
        /// Id of the BPF map of stopped processes.
        map_id: u32,
    },
}

/// What to trace.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Trace this process (repeat for several). Without --pid and without a
    /// command, every process on the host is traced.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Stop after this many seconds [default: 10 when tracing every process,
    /// else until Ctrl-C or the targets exit].
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<f64>,

    /// Size of the kernel-to-user ring buffer, in MiB (a power of two). It
    /// counts twice in memtrace's RSS (the kernel maps its pages twice).
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub ringbuf_size: u32,

    /// Take the user stack of one page fault in N (which code made memory
    /// resident); 1 takes every one.
    #[arg(long, default_value_t = crate::agg::DEFAULT_FAULT_SAMPLE, value_name = "N")]
    pub fault_sample: u32,

    /// Also trace kernel memory (slab, pages, per-CPU) allocated on behalf
    /// of the traced processes, with kernel stacks. Runs a program on every
    /// kernel free on the host.
    #[arg(long)]
    pub kernel: bool,

    /// Have the kernel time memtrace's eBPF programs and report the mean run
    /// time of each per call (the programs only: not the trap into them).
    /// Turns the kernel's BPF statistics on while tracing, which costs every
    /// BPF program on the host two clock reads per run.
    #[arg(long)]
    pub probe_cost: bool,

    /// Follow the child processes the targets (`--pid` or the command)
    /// create, and theirs, each reported as its own process. The allocator
    /// probes then trap in every process that maps the same libraries, and
    /// the untraced ones return at once.
    #[arg(long)]
    pub follow_forks: bool,

    /// How allocation stacks are walked: by frame pointers (cheap; stops at
    /// the first function built without them), by DWARF call frame
    /// information (`.eh_frame`) over a 16 KiB copy of the stack (right in
    /// any code; each allocation then costs the copy), or `auto`: DWARF for
    /// a program whose functions lack frame-pointer prologues, frame
    /// pointers otherwise. Tracing every process, `auto` is `fp`.
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,

    /// Do not read Python frames. By default the stacks of a CPython
    /// process (3.11) show the Python functions, files and lines that
    /// allocated, in place of the interpreter's own frames; each allocation
    /// then costs a walk of the thread's Python frames.
    #[arg(long)]
    pub no_python: bool,

    /// Also trace CPython's own allocator (`PyObject_Malloc`, `Calloc`,
    /// `Realloc`, `Free` and the `PyMem_` ones), whose small blocks come from
    /// its arenas, not from `malloc`: each Python object is then counted
    /// where it was made, as its own category (`PyObject_Malloc [python
    /// allocator]` frames). Python makes objects by the million: this costs
    /// a trap per object.
    #[arg(long)]
    pub python_allocators: bool,

    /// Where to write the report of a traced process the OOM killer chose
    /// [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub oom_dir: Option<PathBuf>,

    /// The command to start and trace, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What counts (shared by live tracing and reports).
#[derive(Debug, Clone, clap::Args)]
pub struct CountArgs {
    /// Count only allocations of at least this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Count only allocations of at most this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Allocations freed within this many milliseconds are temporary
    /// [default: 1].
    #[arg(long, value_name = "MS")]
    pub temporary_ms: Option<f64>,
}

/// What to show and how.
#[derive(Debug, Clone, clap::Args)]
pub struct ViewArgs {
    /// The angle on the trace.
    #[arg(long, value_enum, default_value_t = View::Leaks)]
    pub view: View,

    /// Output format (flamegraph, folded, pprof: views leaks, peak,
    /// temporary; svg: timeline; hlog: histograms; html: everything).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// What weighs a stack in flamegraph and folded output [default:
    /// live-bytes; total-count for --view temporary].
    #[arg(long, value_enum, value_name = "WEIGHT")]
    pub weight: Option<Weight>,

    /// Draw the flame graph as an icicle (callers on top).
    #[arg(long)]
    pub icicle: bool,

    /// Stacks shown per process, most bytes first; 0 shows all.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Show only blocks still live this many milliseconds after they were
    /// allocated (outstanding allocations older than MS).
    #[arg(long, value_name = "MS")]
    pub older_than: Option<u64>,

    /// Write reports to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The live command.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// What to trace.
    #[command(flatten)]
    pub target: TargetArgs,
    /// What counts.
    #[command(flatten)]
    pub count: CountArgs,
    /// What to show.
    #[command(flatten)]
    pub view: ViewArgs,

    /// Also print a report every this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub interval: Option<f64>,

    /// Also write a recording of the run to this file.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

/// `memtrace record`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "The recording is written as the trace runs (a crash or a full disk \
leaves it readable up to its last complete block) with mode 0600."
)]
pub struct RecordArgs {
    /// The recording to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// What to trace.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Defaults for reports of this recording.
    #[command(flatten)]
    pub count: CountArgs,
}

/// `memtrace report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The recording.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// What counts [default: as when recorded].
    #[command(flatten)]
    pub count: CountArgs,
    /// What to show.
    #[command(flatten)]
    pub view: ViewArgs,
}

/// `--unwind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unwind {
    /// By program: frame pointers where its code keeps them, else DWARF.
    Auto,
    /// Frame pointers.
    Fp,
    /// DWARF call frame information over a copy of the stack.
    Dwarf,
}

/// Output formats of `memtrace diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    /// A table of the stacks that changed most.
    Text,
    /// One JSON document.
    Json,
    /// Folded stacks weighted by growth in bytes (shrinking stacks left out).
    Folded,
}

/// `memtrace diff`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiffArgs {
    /// The earlier recording (or the only one, with --from/--to).
    #[arg(value_name = "BEFORE")]
    pub before: PathBuf,
    /// The later recording.
    #[arg(value_name = "AFTER")]
    pub after: Option<PathBuf>,
    /// With one recording: compare live bytes at this many seconds from its
    /// start [default: 0]...
    #[arg(long, value_name = "SECONDS")]
    pub from: Option<f64>,
    /// ...with live bytes at this many seconds [default: the end].
    #[arg(long, value_name = "SECONDS")]
    pub to: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,
    /// Stacks shown, largest change first; 0 shows all.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub top: usize,
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

impl TargetArgs {
    /// Checks that need no system access. The message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if !self.pids.is_empty() && !self.command.is_empty() {
            return Err(
                "--pid and a command (-- CMD) cannot be combined: trace one or the other".into(),
            );
        }
        if let Some(v) = self.duration
            && !(v.is_finite() && v > 0.0)
        {
            return Err(format!(
                "--duration must be a positive number of seconds, not {v}"
            ));
        }
        if !self.ringbuf_size.is_power_of_two() || self.ringbuf_size > 1024 {
            return Err(format!(
                "--ringbuf-size must be a power of two between 1 and 1024 MiB, not {}",
                self.ringbuf_size
            ));
        }
        if self.follow_forks && self.system_wide() {
            return Err(
                "--follow-forks follows the children of --pid or a command (-- CMD); \
                 without either, every process is traced already"
                    .into(),
            );
        }
        if self.pids.contains(&0) {
            return Err("--pid 0 is not a process".into());
        }
        if self.fault_sample == 0 {
            return Err("--fault-sample must be at least 1 (1 samples every fault)".into());
        }
        Ok(())
    }

    /// Whether every process is traced.
    pub fn system_wide(&self) -> bool {
        self.pids.is_empty() && self.command.is_empty()
    }

    /// How long to trace, if bounded.
    pub fn effective_duration(&self) -> Option<f64> {
        self.duration.or(self.system_wide().then_some(10.0))
    }
}

impl CountArgs {
    /// Checks that need no system access.
    pub fn validate(&self) -> Result<(), String> {
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            return Err(format!("--min-size {min} is larger than --max-size {max}"));
        }
        if let Some(t) = self.temporary_ms
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!(
                "--temporary-ms must be a non-negative number of milliseconds, not {t}"
            ));
        }
        Ok(())
    }
}

impl ViewArgs {
    /// Checks that need no system access.
    pub fn validate(&self) -> Result<(), String> {
        if !self.format.shows(self.view) {
            return Err(format!(
                "--format {} cannot show --view {}; {}",
                self.format.name(),
                self.view.name(),
                match self.format {
                    Format::Svg => "svg plots the timeline view",
                    Format::Hlog => "hlog exports the histograms view",
                    _ => "stack formats show the leaks, peak and temporary views",
                }
            ));
        }
        Ok(())
    }

    /// The weight of stacks in stack-shaped formats.
    pub fn weight(&self) -> Weight {
        self.weight.unwrap_or(Weight::default_for(self.view))
    }
}

impl TraceArgs {
    /// Checks that need no system access. The message names the option.
    pub fn validate(&self) -> Result<(), String> {
        self.target.validate()?;
        self.count.validate()?;
        self.view.validate()?;
        if let Some(v) = self.interval
            && !(v.is_finite() && v > 0.0)
        {
            return Err(format!(
                "--interval must be a positive number of seconds, not {v}"
            ));
        }
        if self.interval.is_some()
            && matches!(
                self.view.format,
                Format::Pprof | Format::Flamegraph | Format::Html | Format::Svg | Format::Hlog
            )
            && self.view.output.is_some()
        {
            return Err(format!(
                "--interval with --format {} would write several documents into one file; \
                 record with --record and use memtrace report instead",
                self.view.format.name()
            ));
        }
        Ok(())
    }
}

impl DiffArgs {
    /// Checks that need no system access.
    pub fn validate(&self) -> Result<(), String> {
        if self.after.is_some() && (self.from.is_some() || self.to.is_some()) {
            return Err(
                "--from/--to compare two times of one recording; give one recording, not two"
                    .into(),
            );
        }
        if let (Some(a), Some(b)) = (self.from, self.to)
            && a > b
        {
            return Err(format!("--from {a} is later than --to {b}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("memtrace").chain(args.iter().copied()))
    }

    fn live(args: &[&str]) -> TraceArgs {
        let cli = parse(args).unwrap();
        assert!(cli.command.is_none());
        cli.trace
    }

    #[test]
    fn pids_repeat_and_command_follows_double_dash() {
        let a = live(&["-p", "1", "--pid", "2", "--top", "0"]);
        assert_eq!(a.target.pids, vec![1, 2]);
        assert_eq!(a.view.top, 0);
        let a = live(&["--format", "json", "--", "./prog", "-x"]);
        assert_eq!(a.target.command, vec!["./prog", "-x"]);
        assert_eq!(a.view.format, Format::Json);
        assert!(!a.target.system_wide());
    }

    #[test]
    fn defaults() {
        let a = live(&[]);
        assert!(a.target.system_wide());
        assert_eq!(a.target.effective_duration(), Some(10.0));
        assert_eq!(a.view.top, 10);
        assert_eq!(a.view.format, Format::Text);
        assert_eq!(a.view.view, View::Leaks);
        assert_eq!(a.view.weight(), Weight::LiveBytes);
        let a = live(&["-p", "5"]);
        assert_eq!(a.target.effective_duration(), None);
    }

    #[test]
    fn subcommands() {
        let cli = parse(&["record", "-o", "x.mtr", "--", "ls", "-l"]).unwrap();
        let Some(Command::Record(r)) = cli.command else {
            panic!("not record")
        };
        assert_eq!(r.output, PathBuf::from("x.mtr"));
        assert_eq!(r.target.command, vec!["ls", "-l"]);
        let cli = parse(&[
            "report", "x.mtr", "--view", "peak", "--format", "pprof", "-o", "p.pb.gz",
        ])
        .unwrap();
        let Some(Command::Report(r)) = cli.command else {
            panic!("not report")
        };
        assert_eq!((r.view.view, r.view.format), (View::Peak, Format::Pprof));
        let cli = parse(&["diff", "a.mtr", "b.mtr"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Diff(_))));
        assert!(parse(&["record"]).is_err(), "record needs -o");
    }

    #[test]
    fn conflicts_are_named() {
        let a = live(&["-p", "1", "--", "prog"]);
        assert!(a.validate().unwrap_err().contains("--pid and a command"));
        let a = live(&["--min-size", "10", "--max-size", "5"]);
        assert!(a.validate().unwrap_err().contains("--min-size 10"));
        let a = live(&["--duration=-1"]);
        assert!(a.validate().unwrap_err().contains("--duration"));
        let a = live(&["--ringbuf-size", "3"]);
        assert!(a.validate().unwrap_err().contains("power of two"));
        let a = live(&["--view", "timeline", "--format", "pprof"]);
        assert!(
            a.validate()
                .unwrap_err()
                .contains("cannot show --view timeline")
        );
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["-p", "abc"]).is_err());
        let Some(Command::Diff(d)) = parse(&["diff", "a", "b", "--from", "1"]).unwrap().command
        else {
            panic!()
        };
        assert!(d.validate().is_err());
    }
}
