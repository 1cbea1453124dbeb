//! Command-line definitions (clap) and their pure validation. Nothing here
//! touches the system: `session` acts on the parsed [`Args`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Report formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables of stacks.
    Text,
    /// One JSON document per report (layout in the README).
    Json,
}

const EXAMPLES: &str = "\
EXAMPLES:
    memtrace --pid 4242              trace a running process until Ctrl-C, then report
    memtrace -p 4242 --interval 5    also print a report every 5 seconds
    memtrace -- ./server --port 80   start a command under tracing, report when it exits
    memtrace --duration 30           trace every process on the host for 30 seconds
    memtrace -p 4242 --format json -o leaks.json --top 0
                                     every stack, as JSON, into a file
    memtrace -p 4242 --older-than 10000
                                     only blocks still live after 10 s (likely leaks)";

/// Exact tracing of heap allocations in live processes, with eBPF.
///
/// memtrace probes the C library's allocator (malloc, calloc, realloc,
/// reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc,
/// free) and C++ operator new, records the call stack of every allocation,
/// and reports which stacks hold how many bytes, with what it could not see.
#[derive(Debug, Parser)]
#[command(name = "memtrace", version, after_help = EXAMPLES)]
pub struct Args {
    /// Trace this process (repeat for several). Without --pid and without a
    /// command, every process on the host is traced.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Stop after this many seconds [default: 10 when tracing every process,
    /// else until Ctrl-C or the targets exit].
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<f64>,

    /// Also print a report every this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub interval: Option<f64>,

    /// Stacks shown per process, most live bytes first; 0 shows all.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Count only allocations of at least this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Count only allocations of at most this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Show only blocks still live this many milliseconds after they were
    /// allocated (outstanding allocations older than MS).
    #[arg(long, value_name = "MS")]
    pub older_than: Option<u64>,

    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write reports to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Size of the kernel-to-user ring buffer, in MiB (a power of two).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub ringbuf_size: u32,

    /// The command to start and trace, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl Args {
    /// Checks that need no system access. The message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if !self.pids.is_empty() && !self.command.is_empty() {
            return Err(
                "--pid and a command (-- CMD) cannot be combined: trace one or the other".into(),
            );
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            return Err(format!("--min-size {min} is larger than --max-size {max}"));
        }
        for (name, v) in [("--duration", self.duration), ("--interval", self.interval)] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(format!(
                    "{name} must be a positive number of seconds, not {v}"
                ));
            }
        }
        if !self.ringbuf_size.is_power_of_two() || self.ringbuf_size > 1024 {
            return Err(format!(
                "--ringbuf-size must be a power of two between 1 and 1024 MiB, not {}",
                self.ringbuf_size
            ));
        }
        if self.pids.contains(&0) {
            return Err("--pid 0 is not a process".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("memtrace").chain(args.iter().copied()))
    }

    #[test]
    fn pids_repeat_and_command_follows_double_dash() {
        let a = parse(&["-p", "1", "--pid", "2", "--top", "0"]).unwrap();
        assert_eq!(a.pids, vec![1, 2]);
        assert_eq!(a.top, 0);
        let a = parse(&["--format", "json", "--", "./prog", "-x"]).unwrap();
        assert_eq!(a.command, vec!["./prog", "-x"]);
        assert_eq!(a.format, Format::Json);
        assert!(!a.system_wide());
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert!(a.system_wide());
        assert_eq!(a.effective_duration(), Some(10.0));
        assert_eq!(a.top, 10);
        assert_eq!(a.format, Format::Text);
        let a = parse(&["-p", "5"]).unwrap();
        assert_eq!(a.effective_duration(), None);
    }

    #[test]
    fn conflicts_are_named() {
        let a = parse(&["-p", "1", "--", "prog"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--pid and a command"));
        let a = parse(&["--min-size", "10", "--max-size", "5"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--min-size 10"));
        let a = parse(&["--duration=-1"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--duration"));
        let a = parse(&["--ringbuf-size", "3"]).unwrap();
        assert!(a.validate().unwrap_err().contains("power of two"));
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["-p", "abc"]).is_err());
    }
}
