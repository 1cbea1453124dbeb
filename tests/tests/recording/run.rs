//! Running memtrace's subcommands on recordings, queries on the JSON they
//! print, and the files the recording tests make (cut copies, noise, a
//! small tmpfs to fill).

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use memtrace_tests::report::{array, field, function_matches, label};
use memtrace_tests::{Memtrace, Output, TempPath, fixture, matching_stacks};
use serde_json::Value;

use crate::REPORT_ARGS;

/// The fixture's command name, as the reports show it.
pub(super) const COMM: &str = "phases_fixture";

/// No arguments for the fixture.
pub(super) const NO_ARGS: [&str; 0] = [];

/// Runs `memtrace record -o file -- phases_fixture args...` to the end and
/// checks that it succeeded and said what it recorded.
pub(super) fn record(file: &Path, args: &[&str]) -> Output {
    let mut argv: Vec<OsString> = vec!["record".into(), "-o".into(), file.into(), "--".into()];
    argv.push(fixture("phases_fixture").into());
    argv.extend(args.iter().map(OsString::from));
    let output = Memtrace::run(argv);
    output.assert_status(0);
    assert!(
        output.stderr.contains("memtrace: recorded "),
        "`memtrace record` did not say what it recorded\ncommand: {}\nstderr:\n{}",
        output.cmdline,
        output.stderr
    );
    output
}

/// Runs `memtrace report file args...` to the end.
pub(super) fn report(file: &Path, args: &[&str]) -> Output {
    let mut argv: Vec<OsString> = vec!["report".into(), file.into()];
    argv.extend(args.iter().map(OsString::from));
    Memtrace::run(argv)
}

/// `memtrace report file --format json --top 0 args...`, which must succeed.
pub(super) fn report_json(file: &Path, args: &[&str]) -> Value {
    let mut all = REPORT_ARGS.to_vec();
    all.extend_from_slice(args);
    let output = report(file, &all);
    output.assert_status(0);
    output.json()
}

/// `memtrace report file args...` (a text format), which must succeed; its
/// stdout.
pub(super) fn report_text(file: &Path, args: &[&str]) -> String {
    let output = report(file, args);
    output.assert_status(0);
    output.stdout
}

/// `memtrace diff args... --format json`, which must succeed.
pub(super) fn diff_json(args: &[OsString]) -> Value {
    let mut argv: Vec<OsString> = vec!["diff".into()];
    argv.extend_from_slice(args);
    argv.extend(["--format".into(), "json".into()]);
    let output = Memtrace::run(argv);
    output.assert_status(0);
    output.json()
}

/// The `recording` section of a report from a file.
#[derive(Debug)]
pub(super) struct Recording {
    pub(super) file_bytes: u64,
    pub(super) cut_bytes: u64,
    pub(super) complete: bool,
}

/// The `recording` section of a report from a file; panics if it is missing.
pub(super) fn recording(report: &Value) -> Recording {
    let section = report
        .get("recording")
        .unwrap_or_else(|| panic!("a report from a file should have \"recording\": {report:#}"));
    Recording {
        file_bytes: field(section, "file_bytes"),
        cut_bytes: field(section, "cut_bytes"),
        complete: section
            .get("complete")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| panic!("\"recording\" has no boolean \"complete\": {section:#}")),
    }
}

/// A process's section for `view` (`process["peak"]`, ...).
pub(super) fn section<'a>(process: &'a Value, view: &str) -> &'a Value {
    process.get(view).unwrap_or_else(|| {
        panic!(
            "{} has no {view:?} section in a `--view {view}` report",
            label(process)
        )
    })
}

/// The only stack of a view's section that has `function` in a frame.
pub(super) fn only_stack<'a>(section: &'a Value, function: &str) -> &'a Value {
    match matching_stacks(section, function).as_slice() {
        [stack] => stack,
        stacks => panic!(
            "expected one stack with {function}, found {}: {section:#}",
            stacks.len()
        ),
    }
}

/// Checks that no stack of a view's section has `function` in a frame.
pub(super) fn assert_no_stack(section: &Value, view: &str, function: &str) {
    let stacks = matching_stacks(section, function);
    assert!(
        stacks.is_empty(),
        "{function} should not be among the {view} stacks, but is in {}: {stacks:#?}",
        stacks.len()
    );
}

/// The first place where two JSON documents differ, as a path and both
/// values; `None` if they are equal.
pub(super) fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.keys().chain(y.keys()).find_map(|key| {
            let path = format!("{path}.{key}");
            match (x.get(key), y.get(key)) {
                (Some(u), Some(v)) => first_difference(u, v, &path),
                (u, v) => Some(format!("{path}: {u:?} against {v:?}")),
            }
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} against {b}")),
    }
}

/// Checks that only the owner may read the recording: it holds the target's
/// stacks, paths and command line.
pub(super) fn assert_mode_0600(file: &Path) {
    let mode = fs::metadata(file)
        .unwrap_or_else(|err| panic!("cannot stat the recording {}: {err}", file.display()))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the recording {} should have mode 0600, has {:o}",
        file.display(),
        mode & 0o777
    );
}

/// Whether a change of `memtrace diff` (frames as function names) has
/// `function` in a frame.
pub(super) fn diff_frames_have(change: &Value, function: &str) -> bool {
    array(change, "frames")
        .iter()
        .any(|f| f.as_str().is_some_and(|f| function_matches(f, function)))
}

/// A temp path as a `&str` argument.
pub(super) fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Cuts the file at `path` to `len` bytes, as a crash mid-write would.
pub(super) fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|err| panic!("cannot truncate {}: {err}", path.display()));
}

/// `n` bytes of xorshift64 noise: random-looking, the same on every run.
pub(super) fn pseudo_random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

/// A tmpfs mounted on a fresh directory; unmounted (and the directory
/// removed) on drop, so a failing test does not leave it behind.
pub(super) struct Tmpfs {
    dir: TempPath,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=...`, e.g. `64k`).
    pub(super) fn mount(size: &str) -> Tmpfs {
        let dir = TempPath::new("tmpfs");
        fs::create_dir(dir.path())
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.path().display()));
        let tmpfs = Tmpfs { dir };
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(tmpfs.dir.path())
            .status()
            .expect("cannot run mount");
        assert!(
            status.success(),
            "mount -t tmpfs -o size={size} on {} failed: {status}",
            tmpfs.dir.path().display()
        );
        tmpfs
    }

    /// A path inside the tmpfs.
    pub(super) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
