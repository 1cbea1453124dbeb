//! `memtrace -p PID` against the C fixture, attached between "ready" and
//! "go": from then on the fixture allocates exactly the ground truth, so
//! even whole-process totals are exact.

use memtrace_tests::truth::{self, c};
use memtrace_tests::{
    assert_caller_frame, assert_no_losses, assert_site, assert_totals, fixture_source_line,
    process, require_root,
};

use crate::{alloc_fixture_traced, assert_exited, assert_sites, shared_machine};

#[test]
fn pid_c_fixture() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (mut fixture, mut memtrace) = alloc_fixture_traced(&[]);
    memtrace.interrupt();
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process(&report, fixture.pid());

    assert_exited(process, false);
    assert_sites(process, c::SITES, 1);
    // Frame 0 is the allocator's caller, with the call's source line.
    let line = fixture_source_line("alloc_fixture.c", "malloc(1000)");
    assert_caller_frame(process, "leak_malloc", "alloc_fixture.c", line);
    assert_totals(process, truth::totals_of(c::SITES, 1));
    assert_no_losses(&report, process);

    fixture.finish_ok();
}

/// The target exits while traced: memtrace notices, reports and exits by
/// itself, and still symbolizes the dead process's stacks (so it must have
/// captured what it needs before the process went away).
#[test]
fn pid_target_exits() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (mut fixture, mut memtrace) = alloc_fixture_traced(&[]);
    fixture.finish_ok();

    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process(&report, fixture.pid());

    assert_exited(process, true);
    assert_site(process, "leak_malloc", c::LEAK_MALLOC);
    assert_sites(process, c::SITES, 1);
    assert_no_losses(&report, process);
}

/// 8 threads each do the work; only the sites are checked. Thread creation
/// allocates inside glibc (each thread's TLS vector): that happens before
/// "ready", but process totals are left out so that a glibc whose threads
/// allocate lazily cannot break this test.
#[test]
fn pid_threads() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    const THREADS: u64 = 8;
    let threads = THREADS.to_string();
    let (mut fixture, mut memtrace) = alloc_fixture_traced(&["--threads", &threads]);
    memtrace.interrupt();
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process(&report, fixture.pid());

    assert_sites(process, c::SITES, THREADS);
    assert_no_losses(&report, process);

    fixture.finish_ok();
}

/// The lost-event counters an attach to a busy process must leave at zero:
/// calls in flight that never pop (an entry probe live before its return
/// probe) or that overflow a thread's stack of calls.
fn assert_no_stale_calls(report: &serde_json::Value) {
    for key in ["inflight_full", "stale_inflight"] {
        assert_eq!(
            report["lost"][key], 0,
            "{key}: calls in flight left behind by the attach:\n{}",
            report["lost"]
        );
    }
}

/// Attached while the fixture mallocs and frees in a loop (`--busy`): calls
/// are in flight while the probes go on. Every site of the work that follows
/// is exact, and no call in flight is left behind (before the fix, the
/// entry probe went live up to 3 s before the return probe, while its
/// program was verified: the loop's entries never popped, and every later
/// call of the thread was taken for a nested one: 0 allocations).
#[test]
fn pid_attach_while_allocating() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (mut fixture, mut memtrace) = alloc_fixture_traced(&["--busy"]);
    memtrace.interrupt();
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process(&report, fixture.pid());
    assert_sites(process, c::SITES, 1);
    assert_no_stale_calls(&report);
    fixture.finish_ok();
}

/// Attached at once to a bash wrapper that forks a command substitution,
/// allocates, and then execs the fixture: memtrace follows the PID through
/// the exec (reading its maps between the exec and the loader's mapping of
/// libc must not make it refuse the process), and the fixture's sites are
/// exact. Three times, as the race lands differently each time.
#[test]
fn pid_attach_during_an_exec_chain() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = memtrace_tests::fixture("alloc_fixture");
    let script = "x=$(echo hi); for i in $(seq 1 3000); do y=\"$y$i\"; done; exec \"$0\" --busy";
    for round in 0..3 {
        let mut target = memtrace_tests::Fixture::spawn(
            "bash",
            ["-c", script, program.to_str().expect("UTF-8 path")],
        );
        let pid = target.pid().to_string();
        let mut memtrace =
            memtrace_tests::Memtrace::spawn(["-p", pid.as_str()].iter().chain(&crate::REPORT_ARGS));
        memtrace.wait_tracing();
        target.wait_ready();
        target.go();
        target.wait_done();
        memtrace.interrupt();
        let output = memtrace.wait();
        output.assert_status(0);
        let report = output.json();
        let process = process(&report, target.pid());
        eprintln!("round {round}: lost {}", report["lost"]);
        assert_sites(process, c::SITES, 1);
        assert_no_stale_calls(&report);
        target.finish_ok();
    }
}
