//! `cargo xtask`: memtrace's developer tasks (setup, build, run, test, clippy,
//! bench).
//!
//! This file only parses the command line and dispatches to one module per
//! subcommand; the work is in those modules. Every subcommand that builds runs
//! `setup` first, so one command is enough on a fresh machine. Nothing here
//! calls `sudo`: run as root where root is needed.

mod bench;
mod build;
mod clippy;
mod run;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "memtrace's developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks to build and test memtrace.
    ///
    /// Installs nightly's rust-src, bpf-linker 0.10.0 and the Debian packages
    /// the tests need, and mounts tracefs. Does nothing (quickly) when all is
    /// present.
    Setup,
    /// Run setup, build memtrace and print the binary's path.
    Build {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run setup, build memtrace (release) and run it with ARGS.
    ///
    /// Exits with memtrace's exit code. Without ARGS memtrace traces all
    /// processes for 10 s.
    Run {
        /// Arguments for memtrace (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, check formatting, build memtrace, run all tests.
    ///
    /// The unit tests run in parallel, the integration tests one at a time.
    /// The root integration tests skip when not root, unless
    /// MEMTRACE_REQUIRE_ROOT=1 makes them fail.
    Test {
        /// Arguments for the test binaries (after `--`), e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run clippy with `-D warnings` on the host crates and the eBPF crate.
    Clippy,
    /// Run setup (with bpftrace), build, and measure what tracing costs (as
    /// root): per-call cost against the probe floor and bpftrace, pipeline
    /// throughput, sustained rate without loss, footprint, attach latency.
    ///
    /// Prints a report and writes it to target/bench/report.md.
    Bench {
        /// Repetitions of the per-call cost measurement.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// malloc+free pairs per cost run.
        #[arg(long, default_value_t = 200_000)]
        pairs: u64,
        /// Seconds each sustained rate runs.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Only the `memtrace agent` section (its tiers against exact mode).
        #[arg(long)]
        agent_only: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    util::put_cargo_bin_on_path();
    let result = match cli.command {
        Command::Setup => setup::for_tests(),
        Command::Build { debug } => build::run(debug).map(|bin| println!("{}", bin.display())),
        Command::Run { args } => run::run(&args),
        Command::Test { args } => test::run(&args),
        Command::Clippy => clippy::run(),
        Command::Bench {
            reps,
            pairs,
            seconds,
            agent_only,
        } => bench::run(&bench::Options {
            reps,
            pairs,
            seconds,
            agent_only,
        }),
    };
    // The error chain on one line, without a backtrace: failures here are
    // failed commands, whose output is just above.
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn args_after_double_dash_are_passed_through() {
        let cli = Cli::try_parse_from(["xtask", "run", "--", "--pid", "1"]).unwrap();
        let Command::Run { args } = cli.command else {
            panic!("not run");
        };
        assert_eq!(args, ["--pid", "1"]);
    }
}
