//! How tracing ends: SIGTERM gives the final report like Ctrl-C; SIGKILL
//! gives it no chance to clean up, so the kernel must drop its probes and
//! programs with its file descriptors. The target runs on unharmed either way,
//! and a target killed mid-trace is reported whole.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use memtrace_tests::truth;
use memtrace_tests::{
    Fixture, Memtrace, TempPath, assert_no_losses, assert_totals, fixture, process_by_comm,
    require_root,
};

use crate::{alloc_fixture_traced, exclusive_machine, shared_machine};

/// Ids of the BPF programs loaded on the host that carry one of memtrace's
/// allocator program names.
fn memtrace_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            matches!(
                p.name_as_str(),
                Some("alloc_exit" | "free_enter" | "malloc_enter")
            )
        })
        .map(|p| p.id())
        .collect()
}

#[test]
fn sigkill_leaves_no_probe_behind() {
    if !require_root() {
        return;
    }
    // Alone on the machine: other tests' memtraces load the same programs.
    let _machine = exclusive_machine();
    let before = memtrace_programs();
    let uprobe_events = || std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").ok();
    let events_before = uprobe_events();

    let mut target = Fixture::spawn(fixture("alloc_fixture"), ["--wait"]);
    target.wait_ready();
    let pid = target.pid().to_string();
    let mut memtrace = Memtrace::spawn(["-p", pid.as_str(), "--format", "json"]);
    memtrace.wait_tracing();
    let ours: BTreeSet<u32> = memtrace_programs().difference(&before).copied().collect();
    assert!(
        ours.len() >= 3,
        "memtrace's allocator programs should be loaded while it traces; found {ours:?}"
    );

    memtrace.signal(libc::SIGKILL);
    let _ = memtrace.wait();
    // The kernel releases programs once their last link and fd are gone,
    // after an RCU grace period per probe.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left: BTreeSet<u32> = ours.clone();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = memtrace_programs().intersection(&ours).copied().collect();
    }
    assert!(
        left.is_empty(),
        "programs {left:?} of the killed memtrace are still loaded 10 s later"
    );
    assert_eq!(
        uprobe_events(),
        events_before,
        "the killed memtrace left uprobe events in tracefs"
    );

    // The target, probed until a moment ago, does its work and exits cleanly.
    target.go();
    target.wait_done();
    target.finish_ok();
}

/// The state letter of `/proc/PID/stat` (`T`: stopped).
fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A traced shell execs the C fixture while memtrace is stopped: the
/// fixture stops at the dynamic loader's hook, waiting for memtrace to probe
/// its libraries, and memtrace is killed with SIGKILL. Its guard process
/// continues the fixture, which does its work and exits cleanly.
#[test]
fn sigkill_while_a_target_waits_at_the_loader_leaves_it_running() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = fixture("alloc_fixture");
    let script = format!("echo ready; read go; exec {}", program.display());
    let mut target = Fixture::spawn("sh", ["-c", script.as_str()]);
    target.wait_ready();
    let pid = target.pid();
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn(["-p", pid_arg.as_str(), "--format", "json"]);
    memtrace.wait_tracing();
    memtrace.signal(libc::SIGSTOP);
    target.go();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(pid) != Some('T') {
        assert!(
            Instant::now() < deadline,
            "the exec'd fixture never stopped at the loader's hook (state {:?})",
            state_of(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    memtrace.signal(libc::SIGKILL);
    let _ = memtrace.wait();
    target.wait_done();
    target.finish_ok();
}

#[test]
fn sigterm_gives_the_final_report() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (mut target, mut memtrace) = alloc_fixture_traced(&[]);
    memtrace.signal(libc::SIGTERM);
    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process_by_comm(&report, "alloc_fixture");
    assert!(
        process["total_count"].as_u64().is_some_and(|n| n > 0),
        "the report after SIGTERM should hold the fixture's allocations:\n{process:#}"
    );
    target.finish_ok();
}

/// SIGTERM to a memtrace writing a report file and a recording: both are
/// complete within a second (the stderr summary, printed once the recording
/// is closed, marks the moment), and only then are the probes removed.
#[test]
fn sigterm_flushes_report_and_recording_within_a_second() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let report_file = TempPath::new("report.json");
    let recording = TempPath::new("trace.mtr");
    let mut target = Fixture::spawn(fixture("alloc_fixture"), ["--wait"]);
    target.wait_ready();
    let pid = target.pid().to_string();
    let mut memtrace = Memtrace::spawn([
        "-p",
        pid.as_str(),
        "--format",
        "json",
        "-o",
        report_file.path().to_str().unwrap(),
        "--record",
        recording.path().to_str().unwrap(),
    ]);
    memtrace.wait_tracing();
    target.go();
    target.wait_done();

    let sent = Instant::now();
    memtrace.signal(libc::SIGTERM);
    let flushed = loop {
        if memtrace.stderr_so_far().contains("memtrace: recorded") {
            break sent.elapsed();
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "no recording summary 10 s after SIGTERM:\n{}",
            memtrace.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Read at that moment, before memtrace exits.
    let text = std::fs::read_to_string(report_file.path()).expect("the report file");
    for file in [report_file.path(), recording.path()] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).expect("stat").permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{} is mode {:o}",
            file.display(),
            mode & 0o777
        );
    }
    let report: serde_json::Value = serde_json::from_str(&text).expect("a complete JSON report");
    let replayed = Memtrace::run([
        "report",
        recording.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    let exited = memtrace.wait();
    let total = sent.elapsed();
    exited.assert_status(0);
    replayed.assert_status(0);
    eprintln!(
        "SIGTERM: report and recording complete after {flushed:?}, memtrace gone after {total:?}"
    );
    assert!(
        flushed < Duration::from_secs(1),
        "report and recording took {flushed:?} after SIGTERM"
    );
    let live = process_by_comm(&report, "alloc_fixture");
    let from_file = replayed.json();
    let recorded = process_by_comm(&from_file, "alloc_fixture");
    assert_eq!(live["total_count"], recorded["total_count"]);
    assert!(live["total_count"].as_u64().is_some_and(|n| n > 0));
    target.finish_ok();
}

/// The target killed with SIGKILL mid-trace: memtrace notices it is gone,
/// ends on its own with status 0, and reports everything it allocated,
/// exactly, with the process marked exited.
#[test]
fn sigkilled_target_is_reported_whole() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (mut target, mut memtrace) = alloc_fixture_traced(&[]);
    let raw = libc::pid_t::try_from(target.pid()).expect("pid fits pid_t");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(
        unsafe { libc::kill(raw, libc::SIGKILL) },
        0,
        "kill the target"
    );
    let status = target.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    let output = memtrace.wait();
    output.assert_status(0);
    let report = output.json();
    let process = process_by_comm(&report, "alloc_fixture");
    assert_eq!(process["exited"], true, "{process:#}");
    crate::assert_sites(process, truth::c::SITES, 1);
    assert_totals(process, truth::totals_of(truth::c::SITES, 1));
    assert_no_losses(&report, process);
}
