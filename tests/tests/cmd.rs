//! `memtrace -- CMD`: memtrace starts the fixture itself, traces it from its
//! first instruction, exits when it exits and passes on its exit status.

use std::path::Path;

use memtrace_tests::truth::{self, c, cxx, rust};
use memtrace_tests::{
    Memtrace, Output, assert_caller_frame, assert_no_losses, assert_no_lost_events, assert_totals,
    fixture, fixture_source_line, process_by_comm, require_root,
};
use serde_json::Value;

use crate::{REPORT_ARGS, assert_exited, assert_sites, shared_machine};

/// Runs `memtrace ... -- program args...` to the end and checks that the
/// child ran (its "done" passes through memtrace's stdout; the report goes
/// to a file) and that memtrace exited with the child's `exit_code`.
fn trace_command(program: &Path, args: &[&str], exit_code: i32) -> (Output, Value) {
    let mut memtrace = Memtrace::spawn_cmd(REPORT_ARGS, program, args);
    let output = memtrace.wait();
    output.assert_status(exit_code);
    assert!(
        output.stdout.lines().any(|line| line == "done"),
        "the traced command did not print \"done\"\ncommand: {}\nstdout:\n{}\nstderr:\n{}",
        output.cmdline,
        output.stdout,
        output.stderr
    );
    let report = output.json();
    (output, report)
}

/// Traced from exec, the C fixture's allocations are all ground truth: the
/// loader and glibc's start-up allocate nothing through malloc & co for it.
#[test]
fn cmd_c_fixture() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_, report) = trace_command(&fixture("alloc_fixture"), &["--exit-code", "3"], 3);
    let process = process_by_comm(&report, "alloc_fixture");

    assert_exited(process, true);
    assert_sites(process, c::SITES, 1);
    assert_totals(process, truth::totals_of(c::SITES, 1));
    assert_no_losses(&report, process);
}

/// libstdc++ allocates at start-up (its exception-handling pool), so only
/// the sites are exact.
#[test]
fn cmd_cxx_fixture() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_, report) = trace_command(&fixture("cxx_fixture"), &[], 0);
    let process = process_by_comm(&report, "cxx_fixture");

    assert_sites(process, cxx::SITES, 1);
    // operator new is probed itself: frame 0 is the function that said `new`.
    let line = fixture_source_line("cxx_fixture.cpp", "keep(new Widget)");
    assert_caller_frame(process, "leak_new", "cxx_fixture.cpp", line);
    assert_no_losses(&report, process);
}

/// The Rust runtime allocates at start-up (arguments, thread info), so only
/// the sites are exact.
#[test]
fn cmd_rust_fixture() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = Path::new(env!("CARGO_BIN_EXE_rust_fixture"));
    let (_, report) = trace_command(program, &[], 0);
    let process = process_by_comm(&report, "rust_fixture");

    assert_sites(process, rust::SITES, 1);
    assert_no_losses(&report, process);
}

/// `--probe-cost`: the kernel's run counts of memtrace's programs cover
/// every call the report counts (each allocation went through the shared
/// return program, each freed block through `free` or a realloc), with a run
/// time for each; without the option, the report has no such section.
#[test]
fn probe_cost_counts_every_traced_call() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut args: Vec<&str> = REPORT_ARGS.to_vec();
    args.push("--probe-cost");
    let mut memtrace = Memtrace::spawn_cmd(args, fixture("alloc_fixture"), ["--exit-code", "0"]);
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process_by_comm(&report, "alloc_fixture");
    let costs = report["probe_cost"]
        .as_array()
        .unwrap_or_else(|| panic!("no probe_cost in the report:\n{report:#}"));
    let runs = |program: &str| {
        costs
            .iter()
            .find(|c| c["program"] == program)
            .and_then(|c| c["runs"].as_u64())
            .unwrap_or(0)
    };
    let total = process["total_count"].as_u64().expect("total_count");
    let freed = process["freed_count"].as_u64().expect("freed_count");
    assert!(total > 0 && freed > 0, "the fixture allocates and frees");
    assert!(
        runs("alloc_exit") >= total,
        "alloc_exit ran {} times for {total} allocations: {costs:?}",
        runs("alloc_exit")
    );
    let freeing = runs("free_enter") + runs("realloc_enter") + runs("reallocarray_enter");
    assert!(
        freeing >= freed,
        "free and realloc entries ran {freeing} times for {freed} blocks freed: {costs:?}"
    );
    assert!(runs("malloc_enter") > 0, "{costs:?}");
    for c in costs {
        assert!(
            c["run_ns"].as_u64().is_some_and(|ns| ns > 0),
            "a program that ran took no time: {c}"
        );
    }

    let (_, plain) = trace_command(&fixture("alloc_fixture"), &[], 0);
    assert!(
        plain.get("probe_cost").is_none(),
        "probe_cost without --probe-cost"
    );
}

/// A stripped binary has no symbols: its frames are reported as module +
/// offset with the file's build-id, never dropped, and every byte is still
/// counted (the call sites are the C fixture's, by their exact totals).
#[test]
fn stripped_binary_frames_keep_module_and_offset() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let dir = memtrace_tests::temp::TempPath::new("stripped");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let program = dir.join("alloc_stripped");
    std::fs::copy(fixture("alloc_fixture"), &program).expect("copy the fixture");
    let strip = std::process::Command::new("strip")
        .arg(&program)
        .status()
        .expect("run strip (binutils)");
    assert!(strip.success(), "strip failed: {strip}");

    let (_, report) = trace_command(&program, &[], 0);
    let process = process_by_comm(&report, "alloc_stripped");
    assert_totals(process, truth::totals_of(c::SITES, 1));
    assert_no_losses(&report, process);

    let path = program.to_string_lossy();
    let mut own = 0;
    for stack in process["stacks"].as_array().expect("stacks") {
        let frames = stack["frames"].as_array().expect("frames");
        assert!(!frames.is_empty(), "a stack without frames: {stack}");
        for f in frames.iter().filter(|f| f["module"] == *path) {
            own += 1;
            assert!(
                f["function"].is_null(),
                "a stripped binary named a function: {f}"
            );
            assert!(
                f["offset"].as_str().is_some_and(|o| o.starts_with("0x"))
                    && f["build_id"].as_str().is_some_and(|b| !b.is_empty()),
                "a frame in the stripped binary lacks its offset or build-id: {f}"
            );
        }
    }
    assert!(own > 0, "no frame in the stripped binary:\n{process:#}");
}

/// 20,000 short-lived threads, more over the run than the kernel side's
/// table of calls in flight holds: every thread's two calls counted exactly,
/// nothing lost (an exited thread's entry leaves the table with it). glibc
/// frees per-thread blocks at thread exit that it allocated on internal
/// paths memtrace does not probe (the thread's tcache among them): those
/// frees are counted as unknown, at most two a thread here.
#[test]
fn cmd_short_lived_threads() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_, report) = trace_command(&fixture("threads_fixture"), &[], 0);
    let process = process_by_comm(&report, "threads_fixture");
    assert_sites(process, truth::threads::SITES, truth::threads::THREADS);
    assert_no_lost_events(&report);
    let unknown = process["unknown_frees"].as_u64().expect("unknown_frees");
    assert!(
        unknown <= 2 * truth::threads::THREADS,
        "{unknown} unknown frees for {} threads",
        truth::threads::THREADS
    );
}
