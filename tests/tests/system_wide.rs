//! memtrace with no target traces every process; the fixture must still be
//! exact among all the others.

use memtrace_tests::truth::c;
use memtrace_tests::{Fixture, Memtrace, assert_no_losses, fixture, process, require_root};

use crate::{REPORT_ARGS, assert_sites, exclusive_machine};

#[test]
fn system_wide() {
    if !require_root() {
        return;
    }
    let _machine = exclusive_machine();
    let mut fixture = Fixture::spawn(fixture("alloc_fixture"), ["--wait"]);
    fixture.wait_ready();
    // --duration is only a safety net: the test interrupts long before.
    let mut memtrace = Memtrace::spawn(REPORT_ARGS.iter().chain(&["--duration", "120"]));
    memtrace.wait_tracing();
    fixture.go();
    fixture.wait_done();
    memtrace.interrupt();
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process(&report, fixture.pid());

    assert_sites(process, c::SITES, 1);
    // Other processes may free blocks allocated before tracing began, but the
    // kernel side must have lost nothing and the fixture freed nothing unseen.
    assert_no_losses(&report, process);

    fixture.finish_ok();
}
