//! Harness for memtrace's integration tests: where the binaries are, who may
//! run them, handles on a fixture and on memtrace, and queries on the JSON
//! report.
//!
//! The tests run the real memtrace binary against fixture programs whose
//! allocations are known exactly (`fixtures/`, numbers in [`truth`]), so they
//! need root for the eBPF probes. Without root each test skips itself with a
//! note, unless `MEMTRACE_REQUIRE_ROOT=1` asks for a hard failure (CI sets it
//! so that a skipped suite cannot pass for a green one).

pub mod agent;
pub mod cgroup;
pub mod fixture;
pub mod memtrace;
pub mod report;
pub mod temp;
pub mod tool;
pub mod truth;

use std::env;
use std::path::{Path, PathBuf};

pub use fixture::Fixture;
pub use memtrace::{Memtrace, Output};
pub use report::{
    Site, Totals, array, assert_caller_frame, assert_no_losses, assert_no_lost_events, assert_site,
    assert_totals, matching_stacks, process, process_by_comm, site, totals,
};
pub use temp::TempPath;

/// Where `build.rs` put the compiled C and C++ fixtures.
pub const FIXTURE_DIR: &str = env!("OUT_DIR");

/// How long a fixture or memtrace may take to say its next line.
pub const LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The memtrace binary under test: `$MEMTRACE_BIN`, or else the `memtrace`
/// that cargo built next to this test executable (`target/<profile>/`, one
/// level above the test's `deps/`).
pub fn memtrace_bin() -> PathBuf {
    let path = match env::var_os("MEMTRACE_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = env::current_exe().expect("cannot find the test executable's path");
            // target/<profile>/deps/<test>-<hash> → target/<profile>/memtrace
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
            profile_dir.join("memtrace")
        }
    };
    if !path.is_file() {
        panic!(
            "memtrace binary not found at {}; build it with `cargo build --release -p memtrace` \
             or run `cargo xtask test` (or point MEMTRACE_BIN at it)",
            path.display()
        );
    }
    path
}

/// Path of a fixture compiled by `build.rs` (`alloc_fixture`, `cxx_fixture`,
/// `phases_fixture`, ...: see its list). (The Rust fixture is a cargo binary: integration tests
/// get it from `env!("CARGO_BIN_EXE_rust_fixture")`.)
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(FIXTURE_DIR).join(name);
    assert!(
        path.is_file(),
        "fixture {name} not found at {} (built by tests/build.rs)",
        path.display()
    );
    path
}

/// The 1-based line of `fixtures/<file>` that contains `needle` (which must
/// occur on exactly one line), for checking memtrace's line numbers.
pub fn fixture_source_line(file: &str, needle: &str) -> u64 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file);
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    let hits: Vec<usize> = source
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    match hits.as_slice() {
        [line] => *line as u64,
        _ => panic!(
            "{needle:?} is on lines {hits:?} of {}, not on exactly one",
            path.display()
        ),
    }
}

/// Whether the tests that load eBPF programs can run. As non-root this skips
/// (returns false, with a note on stderr) unless `MEMTRACE_REQUIRE_ROOT=1`,
/// in which case it panics.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if env::var("MEMTRACE_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
        panic!(
            "root required: these tests load eBPF programs, but they run as uid {euid} \
             and MEMTRACE_REQUIRE_ROOT=1 forbids skipping them"
        );
    }
    eprintln!("skipping: needs root, running as uid {euid}");
    false
}

/// A pid that no process has right now, for the "no such process" error.
/// Scans down from the top of the pid range, where pids are rarely in use.
pub fn unused_pid() -> u32 {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (1..pid_max)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .expect("every pid is in use")
}

/// Renders a command line for messages, quoting nothing: it is for humans.
pub(crate) fn render_command(program: &Path, args: &[std::ffi::OsString]) -> String {
    let mut line = program.display().to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
