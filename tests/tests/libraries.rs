//! Targets whose C library is not the host's: a process in its own root and
//! mount namespace (a container, as far as files go), a copy of libc that
//! lacks optional allocator functions, and a program exec'd into another
//! libc than the one its parent was probed in.

use std::path::{Path, PathBuf};
use std::process::Command;

use memtrace_tests::truth::{self, c, phases};
use memtrace_tests::{
    Fixture, Memtrace, TempPath, assert_no_losses, assert_totals, fixture, process, require_root,
};
use serde_json::Value;

use crate::{REPORT_ARGS, assert_sites, shared_machine, trace_work};

/// Runs `program args`, failing the test with its output if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies `file` to `root` + `path` (`path` absolute), making directories.
fn copy_into(root: &Path, path: &str, file: &Path) {
    let to = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
    std::fs::copy(file, &to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", file.display(), to.display()));
}

/// A root directory holding `program` (as `/NAME`) and every library `ldd`
/// says it loads, at the paths the loader looks for them.
fn root_for(program: &Path) -> (TempPath, String) {
    let root = TempPath::new("root");
    std::fs::create_dir(root.path()).expect("mkdir root");
    let name = program.file_name().unwrap().to_str().unwrap().to_string();
    copy_into(root.path(), &name, program);
    let ldd = Command::new("ldd").arg(program).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            copy_into(root.path(), path, Path::new(path));
        }
    }
    (root, format!("/{name}"))
}

/// [`trace_work`], then Ctrl-C: the JSON report.
fn traced_work(target: &mut Fixture) -> Value {
    let mut memtrace = trace_work(target);
    memtrace.interrupt();
    let output = memtrace.wait();
    output.assert_status(0);
    output.json()
}

/// The directory of the C library a process maps, as this process names it
/// (the kernel prints paths in `maps` from the reader's root, not the
/// process's).
fn libc_dir(pid: u32) -> String {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .unwrap_or_else(|| panic!("PID {pid} maps no libc.so.6:\n{maps}"));
    path.rsplit_once('/').unwrap().0.to_string()
}

/// The fixture runs chrooted in its own mount namespace, and once it has
/// mapped its libc, the directory that held it is covered by a tmpfs where
/// `libc.so.6` is a link to the host's `/etc/passwd`. Opening the library by
/// its path under `/proc/PID/root` would follow that link out of the
/// container; memtrace must find the library actually mapped, probe it, and
/// count every call site exactly.
#[test]
fn container_libc_is_probed_through_the_mapping_not_its_path() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (root, program) = root_for(&fixture("alloc_fixture"));
    let root_str = root.path().to_str().unwrap();
    let mut target = Fixture::spawn(
        "unshare",
        [
            "--mount",
            "--propagation",
            "private",
            "chroot",
            root_str,
            &program,
            "--wait",
        ],
    );
    target.wait_ready();
    let pid = target.pid();
    let dir = libc_dir(pid);
    assert!(
        dir.starts_with(root_str),
        "{dir} is not under the fixture's root"
    );
    let ns = pid.to_string();
    run(
        "nsenter",
        &["-t", &ns, "-m", "mount", "-t", "tmpfs", "decoy", &dir],
    );
    run(
        "nsenter",
        &[
            "-t",
            &ns,
            "-m",
            "ln",
            "-s",
            "/etc/passwd",
            &format!("{dir}/libc.so.6"),
        ],
    );

    let report = traced_work(&mut target);
    let p = process(&report, pid);
    assert_sites(p, c::SITES, 1);
    assert_totals(p, truth::totals_of(c::SITES, 1));
    assert_no_losses(&report, p);
    let probed: Vec<&Value> = report["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .collect();
    assert!(
        probed.iter().any(|pr| pr["module"]
            .as_str()
            .is_some_and(|m| m.ends_with("/libc.so.6"))),
        "no libc probed: {probed:?}"
    );
    target.finish_ok();
}

/// A copy of glibc whose dynamic symbol table no longer names `pvalloc`
/// (nor `__libc_pvalloc`, which shares the string), loaded by the fixture
/// through `LD_LIBRARY_PATH`: memtrace probes the rest, lists `pvalloc` as
/// not found in that file, and counts every call site exactly.
#[test]
fn libc_without_an_optional_symbol_is_traced() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (dir, copy) = libc_copy(|image| {
        let name = b"\0__libc_pvalloc\0";
        let at = image
            .windows(name.len())
            .position(|w| w == name)
            .expect("__libc_pvalloc in libc's dynamic strings");
        image[at + 8] = b'q'; // __libc_qvalloc, qvalloc
    });

    let lib_path = format!("LD_LIBRARY_PATH={}", dir.path().display());
    let phases = fixture("phases_fixture");
    let mut target = Fixture::spawn(
        "env",
        [lib_path.as_str(), phases.to_str().unwrap(), "--wait"],
    );
    target.wait_ready();
    let pid = target.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(
        maps.contains(copy.to_str().unwrap()),
        "the fixture does not map the copy"
    );
    let report = traced_work(&mut target);
    let p = process(&report, pid);
    assert_sites(p, phases::SITES, 1);
    assert_totals(p, truth::totals_of(phases::SITES, 1));
    assert_no_losses(&report, p);
    let probes = report["probes"].as_array().expect("probes");
    let copy_probes = probes
        .iter()
        .find(|pr| pr["module"] == copy.to_str().unwrap())
        .unwrap_or_else(|| panic!("the copy is not among the probes: {probes:?}"));
    assert_eq!(copy_probes["missing"], serde_json::json!(["pvalloc"]));
    let functions = copy_probes["functions"].to_string();
    assert!(
        functions.contains("\"malloc") && functions.contains("valloc"),
        "{functions}"
    );
    target.finish_ok();
}

/// A directory holding a copy of the host's libc (another file, so
/// probes on the host's do not fire in it), changed by `edit`.
fn libc_copy(edit: impl FnOnce(&mut Vec<u8>)) -> (TempPath, PathBuf) {
    let dir = TempPath::new("libc");
    std::fs::create_dir(dir.path()).expect("mkdir");
    let mut image = std::fs::read(host_libc()).expect("read libc");
    edit(&mut image);
    let copy = dir.join("libc.so.6");
    std::fs::write(&copy, &image).expect("write the copy");
    (dir, copy)
}

/// `memtrace -- env LD_LIBRARY_PATH=DIR alloc_fixture`: memtrace probes the
/// host's libc for `env`, which execs the fixture, whose loader maps a copy
/// of libc memtrace has not seen. The loader's hook stops it until the copy
/// is probed, so every call is seen: exact sites, no unknown frees.
#[test]
fn exec_into_another_libc_is_probed_before_it_runs() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (dir, copy) = libc_copy(|_| {});
    let lib_path = format!("LD_LIBRARY_PATH={}", dir.path().display());
    let program = fixture("alloc_fixture");
    let output = Memtrace::spawn_cmd(
        REPORT_ARGS,
        "env",
        [lib_path.as_str(), program.to_str().unwrap()],
    )
    .wait();
    output.assert_status(0);
    let report = output.json();
    let p = memtrace_tests::process_by_comm(&report, "alloc_fixture");
    assert_sites(p, c::SITES, 1);
    assert_no_losses(&report, p);
    let probes = report["probes"].as_array().expect("probes");
    let pids = serde_json::json!([p["pid"]]);
    assert!(
        probes
            .iter()
            .any(|pr| pr["module"] == copy.to_str().unwrap() && pr["pids"] == pids),
        "the copy is not probed for the fixture: {probes:#?}"
    );
}

/// The C library the test itself runs on.
fn host_libc() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .map(PathBuf::from)
        .expect("the test maps libc.so.6")
}
