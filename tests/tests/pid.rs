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
