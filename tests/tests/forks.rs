//! `--follow-forks`: the children a traced command forks, and what they
//! exec, are each reported as their own process, with their parent, and
//! exactly; without the option they are not traced at all.

use memtrace_tests::truth::{c, forks};
use memtrace_tests::{
    Memtrace, array, assert_no_lost_events, assert_site, fixture, matching_stacks,
};
use serde_json::Value;

use crate::{REPORT_ARGS, assert_sites, shared_machine};

fn traced(follow: bool, fixture_args: &[&str]) -> Value {
    let mut args: Vec<&str> = REPORT_ARGS.to_vec();
    if follow {
        args.push("--follow-forks");
    }
    let mut memtrace = Memtrace::spawn_cmd(args, fixture("fork_fixture"), fixture_args);
    let output = memtrace.wait();
    output.assert_status(0);
    output.json()
}

fn pid_of(p: &Value) -> u64 {
    p["pid"].as_u64().expect("pid")
}

#[test]
fn follow_forks_reports_each_child_exactly() {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let exec = fixture("alloc_fixture");
    let report = traced(true, &["--exec", exec.to_str().unwrap()]);
    assert_no_lost_events(&report);
    let processes = array(&report, "processes");
    let parent = processes
        .iter()
        .find(|p| p["comm"] == "fork_fixture" && p.get("parent").is_none())
        .unwrap_or_else(|| panic!("no fork_fixture without a parent: {processes:#?}"));
    let parent_pid = pid_of(parent);
    assert_sites(parent, forks::PARENT_SITES, 1);
    assert!(
        matching_stacks(parent, "child_work").is_empty(),
        "the children's allocations are counted in the parent"
    );
    let children: Vec<&Value> = processes
        .iter()
        .filter(|p| p["parent"].as_u64() == Some(parent_pid))
        .collect();
    assert_eq!(
        children.len() as u64,
        forks::CHILDREN + 1,
        "children of {parent_pid}: {children:#?}"
    );
    for i in 0..forks::CHILDREN {
        let want = forks::child_work(i);
        let child = children
            .iter()
            .find(|p| p["total_bytes"].as_u64() == Some(want.total_bytes))
            .unwrap_or_else(|| panic!("no child with child_work({i})'s bytes: {children:#?}"));
        assert_eq!(child["comm"], "fork_fixture");
        assert_eq!(child["exited"], true);
        assert_site(child, "child_work", want);
        assert_eq!(child["total_count"].as_u64(), Some(want.total_count));
        // Its one free is of a block the parent allocated before the fork.
        assert_eq!(child["unknown_frees"], 1, "child {i}");
        assert_eq!(child["freed_count"], 0, "child {i}");
    }
    let exec = children
        .iter()
        .find(|p| p["comm"] == "alloc_fixture")
        .unwrap_or_else(|| panic!("the exec'd child is not reported: {children:#?}"));
    assert_sites(exec, c::SITES, 1);
}

#[test]
fn without_follow_forks_children_are_not_traced() {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let exec = fixture("alloc_fixture");
    let report = traced(false, &["--exec", exec.to_str().unwrap()]);
    assert_no_lost_events(&report);
    let processes = array(&report, "processes");
    assert_eq!(
        processes.len(),
        1,
        "only the command is traced: {processes:#?}"
    );
    let parent = &processes[0];
    assert_eq!(parent["comm"], "fork_fixture");
    assert_sites(parent, forks::PARENT_SITES, 1);
    assert!(matching_stacks(parent, "child_work").is_empty());
    assert!(parent.get("parent").is_none());
}

/// Children 0 and 1 get the same pid (clone3 with set_tid): two processes,
/// each reported with its own allocations, none merged into the other.
#[test]
fn a_reused_pid_is_a_new_process() {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = traced(true, &["--reuse-pid"]);
    assert_no_lost_events(&report);
    let processes = array(&report, "processes");
    let parent = processes
        .iter()
        .find(|p| p["comm"] == "fork_fixture" && p.get("parent").is_none())
        .expect("the parent");
    let children: Vec<&Value> = processes
        .iter()
        .filter(|p| p["parent"] == parent["pid"])
        .collect();
    let with = |i: u64| {
        children
            .iter()
            .find(|p| p["total_bytes"].as_u64() == Some(forks::child_work(i).total_bytes))
            .unwrap_or_else(|| panic!("no child {i}: {children:#?}"))
    };
    let (first, second) = (with(0), with(1));
    assert_eq!(first["pid"], second["pid"], "the pid was not reused");
    for (i, child) in [(0, first), (1, second)] {
        assert_site(child, "child_work", forks::child_work(i));
        assert_eq!(child["total_count"].as_u64(), Some(i + 1));
        assert_eq!(child["unknown_frees"], 1);
        assert_eq!(child["exited"], true);
    }
}
