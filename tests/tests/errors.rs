//! memtrace's error convention: exit status 2, a first stderr line
//! `memtrace: ...` naming the offending value, a second line `hint: ...`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use memtrace_tests::{Fixture, Memtrace, fixture, memtrace_bin, require_root, unused_pid};

use crate::shared_machine;

#[test]
fn error_no_such_pid() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let pid = unused_pid().to_string();
    let output = Memtrace::spawn(["-p", pid.as_str()]).wait();
    output.assert_error(&[&pid]);
}

/// A statically linked target has no libc.so to probe.
#[test]
fn error_static_target() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut fixture = Fixture::spawn(fixture("static_fixture"), ["--wait"]);
    fixture.wait_ready();
    let pid = fixture.pid().to_string();
    let output = Memtrace::spawn(["-p", pid.as_str()]).wait();
    output.assert_error(&["libc"]);
    // Let the fixture run its protocol to the end, so its exit is clean.
    fixture.go();
    fixture.wait_done();
    fixture.finish_ok();
}

/// Run as nobody (needs root to become nobody). The binary is copied to a
/// world-readable place first: the build tree may sit under a private home.
#[test]
fn error_not_root() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let dir = std::env::temp_dir().join(format!("memtrace-test-nobody-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("create temp dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let binary: PathBuf = dir.join("memtrace");
    fs::copy(memtrace_bin(), &binary).expect("copy memtrace");
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).expect("chmod memtrace");

    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let output = Memtrace::spawn_via(&wrapper, &binary, ["-p", "1"]).wait();
    let _ = fs::remove_dir_all(&dir);
    output.assert_error(&[]);
}

/// Usage errors come from argument parsing, before any privilege is needed,
/// so this one runs as any user.
#[test]
fn error_bad_option() {
    let _machine = shared_machine();
    let output = Memtrace::spawn(["--no-such-flag"]).wait();
    output.assert_status(2);
    assert!(
        output.stderr.contains("--no-such-flag"),
        "stderr should name the unknown option\ncommand: {}\nstderr:\n{}",
        output.cmdline,
        output.stderr
    );
}
