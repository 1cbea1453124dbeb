//! memtrace's end-to-end tests: the real binary, real eBPF probes, and
//! fixture programs whose allocations are known exactly
//! (`memtrace_tests::truth`). Every test that traces needs root and skips
//! itself without it (see `memtrace_tests::require_root`).
//!
//! - `agent`: `memtrace agent`: sampled estimates against the truth, profiles
//!   read by `go tool pprof` and pushed, a real Prometheus, escalation.
//! - `allocators`: jemalloc, tcmalloc and mimalloc, found by their symbols.
//! - `pid`: attach to a running fixture with `-p` between its "ready" and
//!   "go", so only the ground-truth work happens while traced.
//! - `cmd`: `memtrace -- fixture`, traced from its first instruction.
//! - `system_wide`: no target at all.
//! - `errors`: the error convention (status 2, `memtrace: ...`, `hint: ...`).
//! - `recording`: `memtrace record` / `--record`, then `memtrace report` in
//!   every view and format, `memtrace diff`, and damaged recordings.
//! - `forks`: `--follow-forks`, children and their execs reported apart.
//! - `libraries`: a container's libc (own root and mount namespace), and a
//!   libc lacking optional functions.
//! - `flood`: records dropped by a full ring buffer, counted by call site.
//! - `oracle`: real programs (CPython, sqlite3, git, gcc, sort) traced by
//!   memtrace and by an independent bpftrace script at once, compared per
//!   process.
//! - `python`: Python frames of a CPython interpreter, per Python line, and
//!   CPython's own allocator against tracemalloc.
//! - `shutdown`: SIGTERM's final report; SIGKILL leaves no program or probe;
//!   a SIGKILLed target is reported whole.

mod agent;
mod allocators;
mod cmd;
mod errors;
mod flood;
mod forks;
mod libraries;
mod oracle;
mod pid;
mod python;
mod recording;
mod resident;
mod shutdown;
mod system_wide;
mod unwind;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use memtrace_tests::{Fixture, Memtrace, Site, assert_site, fixture};
use serde_json::Value;

/// Serializes the system-wide test against the others of this binary: it
/// traces every process, so the fixtures and memtraces of tests running beside
/// it would be noise in its loss counters. Every other test holds it shared.
static MACHINE: RwLock<()> = RwLock::new(());

/// Held by a test that starts processes, while it runs.
fn shared_machine() -> RwLockReadGuard<'static, ()> {
    // A panicking test poisons the lock; the others need not fail for it.
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test that traces the whole machine.
fn exclusive_machine() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// Options of every tracing run: JSON for the queries, and every stack
/// (`--top 0`) so that no site is cut from the report.
const REPORT_ARGS: [&str; 4] = ["--format", "json", "--top", "0"];

/// Attaches `memtrace -p` (JSON, every stack) to a fixture waiting at
/// "ready", lets it do its work, and returns memtrace still tracing.
fn trace_work(target: &mut Fixture) -> Memtrace {
    let pid = target.pid().to_string();
    let mut memtrace = Memtrace::spawn(["-p", pid.as_str()].iter().chain(&REPORT_ARGS));
    memtrace.wait_tracing();
    target.go();
    target.wait_done();
    memtrace
}

/// `alloc_fixture --wait extra...` traced by [`trace_work`]: both still
/// running, the work done.
fn alloc_fixture_traced(extra: &[&str]) -> (Fixture, Memtrace) {
    let mut args = vec!["--wait"];
    args.extend_from_slice(extra);
    let mut target = Fixture::spawn(fixture("alloc_fixture"), &args);
    target.wait_ready();
    let memtrace = trace_work(&mut target);
    (target, memtrace)
}

/// Checks every site of a fixture, each done by `workers` threads.
fn assert_sites(process: &Value, sites: &[(&str, Site)], workers: u64) {
    for (function, site) in sites {
        assert_site(process, function, site.times(workers));
    }
}

/// Checks that the report marks `process` as exited (or not).
fn assert_exited(process: &Value, exited: bool) {
    assert_eq!(
        process.get("exited").and_then(Value::as_bool),
        Some(exited),
        "{}: \"exited\" should be {exited}",
        memtrace_tests::report::label(process)
    );
}
