//! The `memtrace` binary: parse arguments, run the subcommand (live tracing
//! by default), print errors as `memtrace: what` / `hint: what to do`, and
//! exit with 0 (done), the traced command's own status (`-- CMD`), or 2
//! (error).
use std::process::ExitCode;

use clap::Parser;
use memtrace::cli::{Cli, Command};

/// memtrace's own heap is not libc's: when every process is traced, each
/// libc malloc and free memtrace made would trap into its own probes, and
/// handling one record would cost it several traps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memtrace: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        None => runtime.block_on(memtrace::session::run(cli.trace, false)),
        Some(Command::Record(r)) => {
            let mut trace = cli.trace;
            trace.target = r.target;
            trace.count = r.count;
            trace.record = Some(r.output);
            runtime.block_on(memtrace::session::run(trace, true))
        }
        Some(Command::Report(r)) => memtrace::replay::run(r),
        Some(Command::Diff(d)) => memtrace::diff::run(d),
        Some(Command::Agent(a)) => runtime.block_on(memtrace::agent::run(*a)),
        Some(Command::Guard { map_id }) => memtrace::guard::run(map_id),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("memtrace: {}", e.message);
            eprintln!("hint: {}", e.hint);
            ExitCode::from(2)
        }
    }
}
