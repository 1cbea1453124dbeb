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

/// A static, stripped target: no libc.so, and no symbol says where its
/// malloc is.
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
    output.assert_error(&["no C library", "stripped"]);
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

/// PID 2 is kthreadd on Linux: a kernel thread has no user memory.
#[test]
fn error_kernel_thread() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let output = Memtrace::spawn(["-p", "2"]).wait();
    output.assert_error(&["2", "kernel thread"]);
}

/// The report's path is checked before anything is traced.
#[test]
fn error_unwritable_output() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let output = Memtrace::spawn(["-o", "/nonexistent-dir/report.txt", "--", "true"]).wait();
    output.assert_error(&["/nonexistent-dir/report.txt"]);
}

#[test]
fn error_unknown_command() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let output = Memtrace::spawn(["--", "/nonexistent-dir/program"]).wait();
    output.assert_error(&["not found", "/nonexistent-dir/program"]);
    // What exec would refuse is said before anything starts.
    let dir = std::env::temp_dir();
    let output = Memtrace::spawn([std::ffi::OsStr::new("--"), dir.as_os_str()]).wait();
    output.assert_error(&["cannot run", "directory"]);
    let plain = memtrace_tests::TempPath::new("plain.txt");
    fs::write(plain.path(), "not a program\n").expect("write a plain file");
    let output = Memtrace::spawn([std::ffi::OsStr::new("--"), plain.path().as_os_str()]).wait();
    output.assert_error(&["cannot run", "not executable"]);
    // Executable, but nothing the kernel can run: exec fails, nothing is traced.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(plain.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let output = Memtrace::spawn([std::ffi::OsStr::new("--"), plain.path().as_os_str()]).wait();
    output.assert_error(&["cannot run", "Exec format error"]);
}

/// Options that each make sense alone but not together.
#[test]
fn error_conflicting_options() {
    let _machine = shared_machine();
    Memtrace::spawn(["-p", "1", "--", "true"])
        .wait()
        .assert_error(&["--pid"]);
    Memtrace::spawn(["--format", "flamegraph", "--view", "memory"])
        .wait()
        .assert_error(&["flamegraph", "memory"]);
    Memtrace::spawn(["--follow-forks"])
        .wait()
        .assert_error(&["--follow-forks", "every process"]);
}

/// `memtrace report` on what is not a recording, on a recording cut inside
/// its header, and on one of a newer format: one line each, nothing read.
#[test]
fn error_report_of_a_bad_file() {
    let _machine = shared_machine();
    let dir = std::env::temp_dir().join(format!("memtrace-test-bad-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("create temp dir");
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        fs::write(&path, bytes).expect("write test file");
        path.to_string_lossy().into_owned()
    };
    let text = file("text", b"hello, not a recording at all\n");
    let short = file("short", b"MEMTRACE");
    let mut newer = b"MEMTRACE".to_vec();
    newer.extend_from_slice(&u32::MAX.to_le_bytes());
    newer.extend_from_slice(&[0; 4]);
    let newer = file("newer", &newer);
    let missing = dir.join("missing").to_string_lossy().into_owned();

    Memtrace::spawn(["report", text.as_str()])
        .wait()
        .assert_error(&[&text, "not a memtrace recording"]);
    Memtrace::spawn(["report", short.as_str()])
        .wait()
        .assert_error(&[&short, "shorter than a recording's header"]);
    Memtrace::spawn(["report", newer.as_str()])
        .wait()
        .assert_error(&[&newer, "format version"]);
    Memtrace::spawn(["report", missing.as_str()])
        .wait()
        .assert_error(&[&missing]);
    let _ = fs::remove_dir_all(&dir);
}

/// A static, stripped program started by memtrace: refused before it runs,
/// not traced in silence (its malloc is not the host libc's, and no symbol
/// says where it is).
#[test]
fn error_static_command() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = fixture("static_fixture");
    let output = Memtrace::spawn([std::ffi::OsStr::new("--"), program.as_os_str()]).wait();
    output.assert_error(&["static_fixture", "stripped"]);
}

/// A Go program (no cgo), started by memtrace or running: refused with a
/// message that names Go.
#[test]
fn error_go_program() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let dir = memtrace_tests::temp::TempPath::new("go");
    fs::create_dir_all(&dir).expect("create temp dir");
    let binary = dir.join("go_fixture");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/go_fixture.go");
    let built = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(&source)
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.join("cache"))
        .env("HOME", dir.path())
        .status()
        .expect("run go build (Debian package golang-go)");
    assert!(built.success(), "go build failed: {built}");

    let output = Memtrace::spawn([std::ffi::OsStr::new("--"), binary.as_os_str()]).wait();
    output.assert_error(&["go_fixture", "Go program"]);

    let mut go = Fixture::spawn(&binary, std::iter::empty::<&str>());
    go.wait_line("ready");
    let pid = go.pid().to_string();
    let output = Memtrace::spawn(["-p", pid.as_str()]).wait();
    output.assert_error(&[&pid, "Go program"]);
    go.go();
    go.wait_line("done 100");
    go.finish_ok();
}

/// A process that exits while memtrace attaches, at every moment of the
/// attach: memtrace either traced it (status 0) or says, in one line naming
/// the PID, that it is gone. Never a crash, a hang or a wrong hint.
#[test]
fn error_pid_exits_while_attaching() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    for delay_ms in [0u64, 20, 40, 60, 80, 100, 130, 160, 200, 250] {
        let mut child = std::process::Command::new("sleep")
            .arg("0.25")
            .spawn()
            .expect("run sleep");
        let pid = child.id().to_string();
        // Reaped as soon as it exits, so memtrace never sees a zombie.
        let reaper = std::thread::spawn(move || child.wait());
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let output = Memtrace::spawn(["-p", pid.as_str(), "--output", "/dev/null"]).wait();
        if output.status.code() == Some(0) {
            assert!(
                output.stderr.contains(&format!("tracing PID {pid}")),
                "memtrace exited 0 without tracing (delay {delay_ms} ms)\nstderr:\n{}",
                output.stderr
            );
        } else {
            output.assert_error(&[&pid]);
            assert!(
                !output.stderr.contains("CONFIG_UPROBE_EVENTS"),
                "a vanished process is not a kernel without uprobes (delay {delay_ms} ms)\nstderr:\n{}",
                output.stderr
            );
        }
        let _ = reaper.join();
    }
}
