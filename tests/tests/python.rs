//! Python frames: memtrace attaches to a running CPython interpreter
//! (`fixtures/py_frames.py`, run by the machine's `python3`) and reports
//! the Python functions, files and lines that hold memory, with the native
//! frames between them, and (`--python-allocators`) the objects of
//! CPython's own allocator, compared with what tracemalloc says of the same
//! script.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use memtrace_tests::report::stack_numbers;
use memtrace_tests::truth::python as truth;
use memtrace_tests::{
    Fixture, Memtrace, Site, array, assert_no_lost_events, process, require_root,
};
use serde_json::Value;

use crate::{REPORT_ARGS, shared_machine};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/py_frames.py")
}

/// A CPython 3.11 interpreter (its `sys.executable`: `python3` on PATH may
/// be a launcher script) with a shared `libpython` when `shared`, a static
/// one otherwise. The two differ where it matters: in a shared build
/// CPython's allocator is a function of its own that every caller calls,
/// where a static, link-time optimized build (Debian's
/// `/usr/bin/python3.11`) inlines it into its callers.
fn python(shared: bool) -> PathBuf {
    let mut candidates = vec![PathBuf::from("python3")];
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".pyenv/shims/python3"));
    }
    candidates.push(PathBuf::from("/usr/bin/python3.11"));
    candidates.push(PathBuf::from("/usr/bin/python3"));
    for c in candidates {
        let Ok(out) = Command::new(&c)
            .args([
                "-c",
                "import sys; print(sys.executable); \
                 print(any('/libpython' in l for l in open('/proc/self/maps'))); \
                 print(sys.version_info[:2] == (3, 11))",
            ])
            .output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        if let [exe, mapped, v311] = lines[..]
            && v311 == "True"
            && (mapped == "True") == shared
        {
            return PathBuf::from(exe);
        }
    }
    panic!(
        "no CPython 3.11 with a {} libpython found (python3 on PATH, ~/.pyenv, /usr/bin/python3.11, \
         /usr/bin/python3): `cargo xtask setup` installs both",
        if shared { "shared" } else { "static" }
    );
}

/// Site name → line, from the `# site: NAME` markers of fixture `file`.
fn sites_of(file: &str) -> HashMap<String, u64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file);
    let text = std::fs::read_to_string(path).expect("fixture source");
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let (code, name) = l.split_once("  # site: ")?;
            (!code.trim().is_empty()).then(|| (name.trim().to_string(), i as u64 + 1))
        })
        .collect()
}

/// The sites of `py_frames.py`.
fn sites() -> HashMap<String, u64> {
    sites_of("py_frames.py")
}

/// `memtrace --pid` (view python-lines, JSON) on the fixture between its
/// "ready" and "done"; the fixture is then SIGKILLed where it waits, so
/// what it kept is still live. Returns the report and the process's pid.
fn traced(interpreter: &Path, extra: &[&str]) -> (Value, u32) {
    let mut fx = Fixture::spawn(interpreter, [script().as_os_str(), "--wait".as_ref()]);
    fx.wait_ready();
    let pid = fx.pid();
    let pid_arg = pid.to_string();
    let mut argv = vec!["--pid", pid_arg.as_str(), "--view", "python-lines"];
    argv.extend(REPORT_ARGS);
    argv.extend(extra);
    let mut memtrace = Memtrace::spawn(argv);
    memtrace.wait_tracing();
    fx.go();
    fx.wait_done();
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let out = memtrace.wait();
    out.assert_status(0);
    (out.json(), pid)
}

/// The row of `python_lines` for line `line` of `py_frames.py`.
fn line_row(p: &Value, line: u64) -> &Value {
    file_row(p, "py_frames.py", line)
}

/// The row of `python_lines` for line `line` of fixture `file`.
fn file_row<'a>(p: &'a Value, file: &str, line: u64) -> &'a Value {
    let lines = array(&p["python_lines"], "lines");
    lines
        .iter()
        .find(|l| {
            l["line"] == line
                && l["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with(&format!("/{file}")))
        })
        .unwrap_or_else(|| panic!("no row for {file}:{line} in {lines:#?}"))
}

fn assert_row(row: &Value, expected: Site, what: &str) {
    assert_eq!(stack_numbers(row), expected, "{what}: {row}");
}

fn assert_line(p: &Value, name: &str, expected: Site) {
    let line = sites()[name];
    assert_row(
        line_row(p, line),
        expected,
        &format!("site {name} (py_frames.py:{line})"),
    );
}

/// The module's body: its code object was freed after the import, its
/// name and lines come from the kernel side's copy.
fn assert_module_line(p: &Value) {
    let line = sites_of("py_frames_module.py")["module"];
    let row = file_row(p, "py_frames_module.py", line);
    assert_eq!(row["function"], "<module>", "{row}");
    assert_row(row, truth::MODULE, "the module's body");
}

/// How the process's Python frames went: every stack read; with
/// `started`, the interpreter started under memtrace: stacks deeper than
/// memtrace sends may be (its start imports modules from modules, past 64
/// Python frames), and every code object is named. Attached to a running
/// one, no stack is cut; the process, killed where it waits, may leave
/// memtrace a few code objects it had not read yet and the kernel side did
/// not copy (counted; not those of the sites, which the rows name).
fn assert_frames_read(p: &Value, started: bool) {
    let py = &p["python"];
    assert_eq!(py["supported"], true, "{py}");
    assert!(
        py["interpreter"]
            .as_str()
            .is_some_and(|i| i.starts_with("CPython 3.11.")),
        "{py}"
    );
    assert!(py["stacks"].as_u64().unwrap() > 0, "{py}");
    assert_eq!(py["unreadable"], 0, "{py}");
    if started {
        assert_eq!(py["unknown_code"], 0, "{py}");
    } else {
        assert_eq!(py["truncated"], 0, "{py}");
    }
}

/// Attached to a running interpreter: each line's bytes are exact (the
/// buffers come from `malloc`), freed ones included.
#[test]
fn python_lines_of_a_running_interpreter() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    for interpreter in [python(false), python(true)] {
        let (report, pid) = traced(&interpreter, &[]);
        let p = process(&report, pid);
        // Attached to a running interpreter, memtrace sees frees of blocks
        // allocated before it: unknown frees are expected, lost events not.
        assert_no_lost_events(&report);
        assert_frames_read(p, false);
        assert_eq!(p["python"]["allocator_traced"], false);
        assert_line(p, "bytearrays", truth::BYTEARRAYS);
        assert_line(p, "key", truth::KEY);
        assert_line(p, "churn", truth::CHURN);
        assert_module_line(p);
    }
}

/// The functions of a stack, innermost first, with whether each is a
/// Python frame.
fn frames(stack: &Value) -> Vec<(String, Option<u64>, bool)> {
    array(stack, "frames")
        .iter()
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("?").to_string(),
                f["line"].as_u64(),
                f["module"] == "[python]",
            )
        })
        .collect()
}

/// `sorted` (C) calls the key function (Python): its stack reads
/// `make_key` → the C functions of `sorted` → `nested` → `work` → `main` →
/// `<module>`, each Python frame at its line.
#[test]
fn python_caller_above_a_c_function() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (report, pid) = traced(&python(true), &[]);
    let p = process(&report, pid);
    let sites = sites();
    let stack = array(p, "stacks")
        .iter()
        .find(|s| s["live_bytes"] == truth::KEY.live_bytes)
        .expect("the key function's stack");
    let f = frames(stack);
    let at = |name: &str, line: Option<u64>| {
        f.iter()
            .position(|(n, l, py)| n == name && *py && (line.is_none() || *l == line))
            .unwrap_or_else(|| panic!("no Python frame {name}:{line:?} in {f:#?}"))
    };
    let key = at("make_key", Some(sites["key"]));
    let nested = at("nested", Some(sites["sorted"]));
    let work = at("work", None);
    let module = at("<module>", None);
    assert!(key < nested && nested < work && work < module, "{f:#?}");
    // Between the key function and its caller: `sorted`'s C code, native.
    let between = &f[key + 1..nested];
    assert!(
        between.iter().any(|(n, _, py)| !py && n.contains("sorted")),
        "builtin_sorted between make_key and nested: {f:#?}"
    );
    // The evaluation loop's own frames are gone where Python frames stand.
    assert!(
        !f.iter().any(|(n, _, _)| n == "_PyEval_EvalFrameDefault"),
        "{f:#?}"
    );
}

/// `--python-allocators`: small objects are counted where they are made,
/// as CPython's allocator's, and every kept line equals tracemalloc's
/// figure for the same script (tracemalloc counts inside the process, at
/// the same functions).
#[test]
fn python_allocator_objects_match_tracemalloc() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let interpreter = python(true);
    let (report, pid) = traced(&interpreter, &["--python-allocators"]);
    let p = process(&report, pid);
    assert_no_lost_events(&report);
    assert_frames_read(p, false);
    assert_eq!(p["python"]["allocator_traced"], true);
    // Live only: formatting each string makes temporaries on that line too.
    let strings = line_row(p, sites()["strings"]);
    assert_eq!(
        (&strings["live_bytes"], &strings["live_count"]),
        (
            &Value::from(truth::STRINGS.live_bytes),
            &Value::from(truth::STRINGS.live_count)
        ),
        "{strings}"
    );
    assert_eq!(
        strings["python_allocator_live_bytes"],
        truth::STRINGS.live_bytes,
        "{strings}"
    );

    let out = Command::new(&interpreter)
        .arg(script())
        .arg("--tracemalloc")
        .output()
        .expect("the fixture under tracemalloc");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut compared = 0;
    for line in text.lines().filter_map(|l| l.strip_prefix("tracemalloc ")) {
        let f: Vec<&str> = line.split(' ').collect();
        let (name, line, bytes, count) = (f[0], f[1], f[2], f[3]);
        let line: u64 = line.parse().unwrap();
        let (bytes, count): (u64, u64) = (bytes.parse().unwrap(), count.parse().unwrap());
        if count == 0 {
            continue;
        }
        let row = line_row(p, line);
        assert_eq!(
            (row["live_bytes"].as_u64(), row["live_count"].as_u64()),
            (Some(bytes), Some(count)),
            "site {name}: memtrace {row} against tracemalloc {bytes} B in {count}"
        );
        compared += 1;
    }
    assert_eq!(compared, 3, "bytearrays, strings, key: {text}");
}

/// `memtrace -- python3 script.py`: the interpreter is found when its
/// loader has mapped libpython (or at the exec, for a static one), before
/// the script runs.
#[test]
fn command_started_under_memtrace() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    for interpreter in [python(false), python(true)] {
        let mut argv = vec!["--view", "python-lines"];
        argv.extend(REPORT_ARGS);
        let out = Memtrace::spawn_cmd(argv, &interpreter, [script()]).wait();
        out.assert_status(0);
        let report = out.json();
        let p = array(&report, "processes")
            .iter()
            .find(|p| p["python"].is_object())
            .expect("the interpreter's process");
        assert_frames_read(p, true);
        // At its exit the interpreter freed what the script kept: the
        // totals stand.
        let row = line_row(p, sites()["bytearrays"]);
        assert_eq!(row["total_bytes"], truth::BYTEARRAYS.total_bytes, "{row}");
        assert_eq!(row["total_count"], truth::BYTEARRAYS.total_count, "{row}");
        let line = sites_of("py_frames_module.py")["module"];
        let row = file_row(p, "py_frames_module.py", line);
        assert_eq!(row["total_bytes"], truth::MODULE.total_bytes, "{row}");
        assert_eq!(row["total_count"], truth::MODULE.total_count, "{row}");
    }
}
