//! Stacks of code without frame pointers (`--unwind`): `nofp_fixture`, C++
//! built with -O2 -fomit-frame-pointer, where a frame-pointer walk stops at
//! the function that allocated. With DWARF unwinding (what `auto` picks for
//! it) each caller is found, one of them through glibc's `pthread_once`,
//! and every caller's site is exact.

use memtrace_tests::truth::{c, nofp};
use memtrace_tests::{
    Fixture, Memtrace, assert_no_losses, assert_site, fixture, matching_stacks, process,
    process_by_comm, require_root, site,
};
use serde_json::Value;

use crate::{REPORT_ARGS, shared_machine};

/// `memtrace [extra] -- nofp_fixture`: the fixture's process, in its report.
fn traced_nofp(extra: &[&str]) -> Value {
    let mut args: Vec<&str> = REPORT_ARGS.to_vec();
    args.extend_from_slice(extra);
    let output = Memtrace::spawn_cmd(args, fixture("nofp_fixture"), [] as [&str; 0]).wait();
    output.assert_status(0);
    output.json()
}

/// The function names of a stack, innermost first.
fn functions(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?"))
        .collect()
}

/// Each site of `nofp::SITES` is exact, the leaking function is the first
/// frame with its caller right after it, and no walk stopped short.
fn assert_unwound(report: &Value, p: &Value) {
    assert_no_losses(report, p);
    assert_eq!(
        report["lost"]["stacks_cut"], 0,
        "every walk reached the stack's end: {}",
        report["lost"]
    );
    for &(function, site) in nofp::SITES {
        assert_site(p, function, site);
    }
    // The process says how its stacks were walked: every allocation's.
    let walks = &p["dwarf"];
    assert_eq!(walks["stacks"], p["total_count"], "{walks}");
    assert_eq!(walks["cut"], 0, "{walks}");
    for (leaf, callers) in [
        ("caller_a", &["leak_leaf", "caller_a", "work", "main"][..]),
        ("caller_b", &["leak_leaf", "caller_b", "work", "main"]),
        (
            "once_body",
            &[
                "leak_leaf",
                "once_body",
                "__pthread_once_slow",
                "caller_via_libc",
                "work",
                "main",
            ],
        ),
        (
            "churn_caller",
            &["churn_leaf", "churn_caller", "work", "main"],
        ),
    ] {
        let stacks = matching_stacks(p, leaf);
        assert_eq!(stacks.len(), 1, "one stack through {leaf}");
        let got = functions(stacks[0]);
        assert!(
            got.starts_with(callers),
            "stack through {leaf}: expected {callers:?} first, got {got:?}"
        );
    }
}

#[test]
fn dwarf_finds_the_callers_of_code_without_frame_pointers() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    // `auto`, the default: the fixture's functions have no frame-pointer
    // prologue, so its stacks are copied and unwound.
    let report = traced_nofp(&[]);
    let p = process_by_comm(&report, "nofp_fixture");
    assert_unwound(&report, p);
}

/// Without DWARF the callers are lost: what the test above checks is what
/// DWARF adds, not what any walk finds.
#[test]
fn frame_pointers_alone_lose_the_callers() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = traced_nofp(&["--unwind", "fp"]);
    let p = process_by_comm(&report, "nofp_fixture");
    assert_site(p, "leak_leaf", nofp::LEAK_LEAF);
    assert_eq!(site(p, "caller_a").total_count, 0);
    assert!(
        report["lost"].get("stacks_cut").is_none(),
        "no stack copied"
    );
    assert!(p.get("dwarf").is_none(), "walked by frame pointers");
}

/// A process traced by PID: its mappings are read at once, and the walk
/// goes through the same code.
#[test]
fn dwarf_for_a_running_process() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut target = Fixture::spawn(fixture("nofp_fixture"), ["--wait"]);
    target.wait_ready();
    let pid = target.pid().to_string();
    let mut memtrace = Memtrace::spawn(["-p", pid.as_str()].iter().chain(&REPORT_ARGS));
    memtrace.wait_tracing();
    target.go();
    target.wait_done();
    target.finish_ok();
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    assert_unwound(&report, process(&report, target.pid()));
}

/// `--unwind dwarf` on code with frame pointers: the same exact sites as
/// the frame-pointer walk gives.
#[test]
fn dwarf_on_code_with_frame_pointers_is_exact_too() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut args: Vec<&str> = REPORT_ARGS.to_vec();
    args.extend_from_slice(&["--unwind", "dwarf"]);
    let output = Memtrace::spawn_cmd(args, fixture("alloc_fixture"), [] as [&str; 0]).wait();
    output.assert_status(0);
    let report = output.json();
    let p = process_by_comm(&report, "alloc_fixture");
    assert_no_losses(&report, p);
    assert_eq!(report["lost"]["stacks_cut"], 0, "{}", report["lost"]);
    for &(function, site) in c::SITES {
        assert_site(p, function, site);
    }
}

/// `auto` on a program built with frame pointers (small, so the start-up
/// files' functions, built without, are a good part of it): the kernel
/// side walks them, nothing is copied.
#[test]
fn auto_walks_frame_pointers_where_the_program_keeps_them() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let output = Memtrace::spawn_cmd(REPORT_ARGS, fixture("alloc_fixture"), [] as [&str; 0]).wait();
    output.assert_status(0);
    let report = output.json();
    assert!(
        report["lost"].get("stacks_cut").is_none(),
        "no stack copied: {}",
        report["lost"]
    );
    let p = process_by_comm(&report, "alloc_fixture");
    for &(function, site) in c::SITES {
        assert_site(p, function, site);
    }
}
