//! The kernel side of memory: resident bytes (`rss_stat`) against
//! `/proc/PID/status`, the `memory` view's explanation of allocated versus
//! resident against fixtures whose answer is known (`fixtures/mem_fixture.c`,
//! `fixtures/py_fixture.py`, numbers in `memtrace_tests::truth::resident`),
//! kernel allocations with kernel stacks (`--kernel`), and the report written
//! when the OOM killer chooses a traced process in a memory-limited cgroup.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use memtrace_tests::cgroup::MemoryCgroup;
use memtrace_tests::report::{array, field, function_matches};
use memtrace_tests::truth::resident::*;
use memtrace_tests::{Fixture, Memtrace, TempPath, fixture, process_by_comm, require_root, totals};
use serde_json::Value;

use crate::{REPORT_ARGS, shared_machine};

const COMM: &str = "mem_fixture";

/// `memtrace --view memory --format json --top 0 [extra] -- program args`.
fn trace(extra: &[&str], program: impl AsRef<Path>, args: &[&str]) -> Value {
    let mut argv: Vec<&str> = vec!["--view", "memory"];
    argv.extend(REPORT_ARGS);
    argv.extend(extra);
    let out = Memtrace::spawn_cmd(argv, program, args).wait();
    out.assert_status(0);
    out.json()
}

fn explained(p: &Value) -> &Value {
    &p["memory"]["explained"]
}

fn frames_have(stack: &Value, function: &str) -> bool {
    array(stack, "frames").iter().any(|f| {
        f["function"]
            .as_str()
            .is_some_and(|name| function_matches(name, function))
    })
}

/// Checks `got` is within `percent`% of `want`.
fn assert_near(what: &str, got: u64, want: u64, percent: f64) {
    let diff = got.abs_diff(want) as f64;
    assert!(
        diff <= want as f64 * percent / 100.0,
        "{what}: {got} is not within {percent}% of {want}"
    );
}

/// A calloc of 1 GiB of which a tenth is touched: 1 GiB allocated, the
/// touched pages resident, the rest explained as never touched, and the
/// code that touched it named by the sampled faults.
#[test]
fn calloc_touching_a_tenth_is_allocated_not_resident() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = trace(&[], fixture("mem_fixture"), &["calloc-touch"]);
    let p = process_by_comm(&report, COMM);
    let e = explained(p);
    assert_eq!(field(e, "allocated"), CALLOC_BYTES);
    // glibc's mmapped chunk starts on a page and hands out the block 16
    // bytes in (its header): the touched pages hold all but those 16 bytes.
    assert_eq!(field(e, "allocated_resident"), TOUCHED_BYTES - 16);
    assert_eq!(
        field(e, "allocated_untouched"),
        CALLOC_BYTES - (TOUCHED_BYTES - 16)
    );
    assert!(field(e, "resident_anon") >= TOUCHED_BYTES);
    assert!(field(e, "resident_anon") < TOUCHED_BYTES + 8 * MIB);
    // The allocator mapped the block; exactly the touched pages of that
    // mapping became resident.
    let mapping = array(&p["memory"], "mappings")
        .iter()
        .find(|m| m["by_allocator"] == true && field(m, "bytes") > CALLOC_BYTES)
        .expect("the allocator's mapping of the calloc block");
    assert_eq!(field(mapping, "resident_bytes"), TOUCHED_BYTES);
    // One fault in 32 carries its stack; touch_tenth made ~all of it.
    let by_touch: u64 = array(&p["memory"], "fault_stacks")
        .iter()
        .filter(|s| frames_have(s, TOUCH_TENTH))
        .map(|s| field(s, "estimated_bytes"))
        .sum();
    assert_near(
        "bytes made resident by touch_tenth",
        by_touch,
        TOUCHED_BYTES,
        10.0,
    );
}

/// RSS by type equals `/proc/PID/status` of the live process within 1%,
/// attached by pid to a process that already runs.
#[test]
fn resident_bytes_match_proc_status() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut fx = Fixture::spawn(fixture("mem_fixture"), ["--wait", "calloc-touch"]);
    fx.wait_ready();
    let (report, status) = traced_until_killed(&mut fx, &[]);
    let pid = fx.pid();
    let r = &process_by_comm(&report, COMM)["resident"];
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status:\n{status}"))
            << 10
    };
    assert_near("VmRSS", field(r, "resident_bytes"), kib("VmRSS"), 1.0);
    assert_near("RssAnon", field(r, "anon_bytes"), kib("RssAnon"), 1.0);
    assert_near("RssFile", field(r, "file_bytes"), kib("RssFile"), 1.0);
    assert_eq!(field(r, "shmem_bytes"), kib("RssShmem"));
    assert_eq!(field(r, "swap_bytes"), kib("VmSwap"));
}

/// A heap filled and then freed but for its last block: the bytes stay
/// resident, explained as retained by the allocator, not allocated.
#[test]
fn freed_heap_stays_resident_as_allocator_retention() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = trace(&[], fixture("mem_fixture"), &["retain"]);
    let p = process_by_comm(&report, COMM);
    let t = totals(p);
    assert_eq!(
        (t.live_bytes, t.live_count),
        (RETAIN_LIVE_BYTES, RETAIN_LIVE_COUNT)
    );
    assert_eq!(t.total_bytes, RETAIN_BLOCKS * RETAIN_SIZE);
    let e = explained(p);
    assert_eq!(field(e, "allocated"), RETAIN_LIVE_BYTES);
    assert_eq!(field(e, "allocated_resident"), RETAIN_LIVE_BYTES);
    assert_eq!(field(e, "allocated_untouched"), 0);
    assert_near(
        "retained by the allocator",
        field(e, "retained_by_allocator"),
        RETAIN_HEAP_RESIDENT - RETAIN_LIVE_BYTES,
        1.0,
    );
    assert!(field(e, "resident_anon") >= RETAIN_HEAP_RESIDENT);
    let heap = array(&p["memory"], "mappings")
        .iter()
        .find(|m| m["backing"] == "brk")
        .expect("the brk heap among the mappings");
    assert_near(
        "resident heap",
        field(heap, "resident_bytes"),
        RETAIN_HEAP_RESIDENT,
        1.0,
    );
}

/// A file mapped and read: file-backed RSS, in that mapping.
#[test]
fn mapped_file_read_is_file_resident() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let file = TempPath::new("mapped.bin");
    let path = file.path().to_str().expect("UTF-8 temp path").to_string();
    let size = FILEMAP_SIZE.to_string();
    let report = trace(&[], fixture("mem_fixture"), &["filemap", &path, &size]);
    let p = process_by_comm(&report, COMM);
    let e = explained(p);
    assert!(field(e, "resident_file") >= FILEMAP_SIZE, "{e}");
    assert!(field(e, "resident_anon") < 8 * MIB, "{e}");
    let mapping = array(&p["memory"], "mappings")
        .iter()
        .find(|m| m["backing"] == "file" && field(m, "bytes") == FILEMAP_SIZE)
        .expect("the file's mapping");
    assert_near(
        "resident file mapping",
        field(mapping, "resident_bytes"),
        FILEMAP_SIZE,
        1.0,
    );
}

fn python() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("python3 (the test setup installs Debian's)")
}

/// Python: `bytes(512 MiB)` is calloc'd and never touched, `bytearray(64
/// MiB)` is zero-filled: allocated ~576 MiB, resident ~64 MiB plus a list.
/// Looked at while the interpreter lives (at its exit it frees everything).
#[test]
fn python_zeros_are_allocated_not_resident() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/py_fixture.py");
    let mut fx = Fixture::spawn(python(), [script.as_os_str(), "--wait".as_ref()]);
    fx.wait_ready();
    let report = traced_until_killed(&mut fx, &[]).0;
    let p = array(&report, "processes")
        .iter()
        .find(|p| p["pid"] == fx.pid())
        .expect("the python process");
    let e = explained(p);
    assert!(field(e, "allocated") >= PY_UNTOUCHED + PY_TOUCHED, "{e}");
    assert_near(
        "never touched",
        field(e, "allocated_untouched"),
        PY_UNTOUCHED,
        2.0,
    );
    assert!(field(e, "allocated_resident") >= PY_TOUCHED, "{e}");
    assert!(
        field(e, "resident_anon") < PY_UNTOUCHED / 2,
        "the 512 MiB of zeros must not be resident: {e}"
    );
}

/// Attaches to a fixture waiting for "go" (`--pid`, view memory, JSON),
/// lets it work, reads its `/proc/PID/status`, SIGKILLs it where it waits
/// (so it faults in nothing after that read, as a normal exit would) and
/// returns memtrace's report and the status text.
fn traced_until_killed(fx: &mut Fixture, extra: &[&str]) -> (Value, String) {
    let pid = fx.pid().to_string();
    let mut argv = vec!["--pid", pid.as_str(), "--view", "memory"];
    argv.extend(REPORT_ARGS);
    argv.extend(extra);
    let mut memtrace = Memtrace::spawn(argv);
    memtrace.wait_tracing();
    fx.go();
    fx.wait_done();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("fixture status");
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(fx.pid() as libc::pid_t, libc::SIGKILL) };
    let out = memtrace.wait();
    out.assert_status(0);
    (out.json(), status)
}

/// `--kernel`: one page per pipe written, charged to the writer with the
/// kernel stack through the pipe's write; slab objects of the pipes too.
#[test]
fn kernel_pages_of_pipes_have_kernel_stacks() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let pipes = PIPES.to_string();
    let report = trace(&["--kernel"], fixture("mem_fixture"), &["pipes", &pipes]);
    let p = process_by_comm(&report, COMM);
    let k = &p["memory"]["kernel"];
    let stacks = array(k, "stacks");
    let pipe_pages: Vec<&Value> = stacks
        .iter()
        .filter(|s| s["allocator"] == "pages")
        .filter(|s| {
            array(s, "frames").iter().any(|f| {
                f["function"]
                    .as_str()
                    .is_some_and(|n| n.contains("pipe_write"))
            })
        })
        .collect();
    let count: u64 = pipe_pages.iter().map(|s| field(s, "live_count")).sum();
    let bytes: u64 = pipe_pages.iter().map(|s| field(s, "live_bytes")).sum();
    // One more: the fixture's "done" line, written to its stdout, a pipe.
    let pages = PIPES + 1;
    assert_eq!((count, bytes), (pages, pages * PIPE_BYTES), "{k:#}");
    assert!(
        field(&k["slab"], "live_count") >= PIPES,
        "a pipe_inode_info each"
    );
    assert!(field(explained(p), "kernel") >= PIPES * PIPE_BYTES);
}

/// A process OOM-killed in a 64 MiB cgroup leaves its report, written
/// when the kernel chose it, with its heap by stack and its RSS.
#[test]
fn oom_victim_report_is_written() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let cgroup = MemoryCgroup::create("memtrace-oom", 64 * MIB).expect("a memory cgroup");
    let dir = TempPath::new("oom");
    fs::create_dir(dir.path()).expect("report directory");
    let script = format!(
        "echo $$ > {} && exec {} hog 512",
        cgroup.procs_path().display(),
        fixture("mem_fixture").display()
    );
    let mut argv: Vec<OsString> = vec!["--oom-dir".into(), dir.path().into()];
    argv.extend(
        ["--view", "memory"]
            .iter()
            .chain(&REPORT_ARGS)
            .map(OsString::from),
    );
    let out = Memtrace::spawn_cmd(argv, "/bin/sh", ["-c", script.as_str()]).wait();
    assert!(
        cgroup.oom_kills().unwrap_or(0) >= 1,
        "no OOM kill: {}",
        out.stderr
    );
    let files: Vec<PathBuf> = fs::read_dir(dir.path())
        .expect("report directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "one OOM report; stderr:\n{}", out.stderr);
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("memtrace-oom-") && name.ends_with(".json"),
        "{name}"
    );
    assert!(
        out.stderr.contains("the OOM killer chose PID"),
        "{}",
        out.stderr
    );
    let oom: Value = serde_json::from_str(&fs::read_to_string(&files[0]).unwrap()).unwrap();
    let procs = array(&oom, "processes");
    assert_eq!(procs.len(), 1);
    let p = &procs[0];
    let killed = &p["memory"]["oom"];
    assert!(field(killed, "anon_rss_bytes") >= 32 * MIB, "{killed}");
    // The heap by stack: hog's 1 MiB blocks, each touched, up to the limit.
    let hog: u64 = array(p, "stacks")
        .iter()
        .filter(|s| frames_have(s, HOG))
        .map(|s| field(s, "live_bytes"))
        .sum();
    assert!((32 * MIB..=64 * MIB).contains(&hog), "hog held {hog} bytes");
    assert!(field(&p["resident"], "anon_bytes") >= 32 * MIB);
    // The final report says so too.
    let report = out.json();
    let p = process_by_comm(&report, COMM);
    assert!(p["memory"]["oom"].is_object(), "{p:#}");
}

/// A recording keeps the kernel side: `memtrace report FILE --view memory`
/// explains the run exactly as the live report did.
#[test]
fn memory_view_from_a_recording_equals_live() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let file = TempPath::new("memory.mtr");
    let record: Vec<&str> = vec!["--record", file.path().to_str().expect("UTF-8 temp path")];
    let live = trace(&record, fixture("mem_fixture"), &["calloc-touch"]);
    let mut argv: Vec<OsString> = vec!["report".into(), file.path().into()];
    argv.extend(
        ["--view", "memory"]
            .iter()
            .chain(&REPORT_ARGS)
            .map(OsString::from),
    );
    let replay = Memtrace::run(argv);
    replay.assert_status(0);
    let replay = replay.json();
    let (a, b) = (process_by_comm(&live, COMM), process_by_comm(&replay, COMM));
    assert_eq!(explained(a), explained(b));
    assert_eq!(a["resident"], b["resident"]);
    assert_eq!(a["memory"]["faults"], b["memory"]["faults"]);
    assert_eq!(a["memory"]["fault_stacks"], b["memory"]["fault_stacks"]);
    assert_eq!(
        field(explained(b), "allocated_resident"),
        TOUCHED_BYTES - 16
    );
}

/// The coverage meter: 64 MiB malloc'd and written are nearly all of the
/// process's anonymous memory; 64 MiB of its own mmap, written, are memory
/// memtrace never saw allocated, and the meter says so.
#[test]
fn coverage_meter_shows_what_tracing_did_not_see() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let coverage = |mode: &str| {
        let report = trace(&[], fixture("mem_fixture"), &[mode, "64"]);
        let p = process_by_comm(&report, COMM);
        let r = &p["resident"];
        let pct = r["coverage_pct"].as_f64().expect("coverage_pct");
        let traced = r["traced_anon_bytes"].as_u64().expect("traced_anon_bytes");
        let anon = r["anon_bytes"].as_u64().expect("anon_bytes");
        (pct, traced, anon)
    };
    let (pct, traced, anon) = coverage("hog");
    assert!(
        traced >= 64 << 20,
        "64 MiB written after malloc: {traced} traced of {anon}"
    );
    assert!(pct >= 90.0, "hog: {pct}% of {anon} anon bytes");
    let (pct, traced, anon) = coverage("mmap-touch");
    assert!(
        anon >= 64 << 20,
        "64 MiB written in its own mapping: {anon} anon"
    );
    assert!(traced < 1 << 20, "mmap-touch: {traced} traced bytes");
    assert!(pct <= 5.0, "mmap-touch: {pct}% of {anon} anon bytes");
}
