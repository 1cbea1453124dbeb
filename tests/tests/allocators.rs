//! Allocators other than glibc's shared one.
//!
//! jemalloc, tcmalloc and mimalloc (Debian's libjemalloc2,
//! libtcmalloc-minimal4, libmimalloc2.0), preloaded into the C fixture with
//! `LD_PRELOAD`. They replace glibc's `malloc` for the whole process, so
//! glibc's probes would see almost nothing; memtrace finds them by the
//! `malloc` and `free` they define (not by name), at the loader's stop before
//! the fixture runs, and every call site is exact. The C++ fixture too: their
//! `operator new` and `delete` are code of their own, probed as well.
//!
//! The allocator in the executable (glibc's and musl's, linked statically)
//! and musl's `libc.so`: the same C fixture built three more ways. And the
//! Rust fixture under tikv-jemallocator: jemalloc linked in under its
//! `_rjem_` prefix, reached through Rust's allocator shims.

use std::path::Path;

use memtrace_tests::truth::{c, cxx, rust};
use memtrace_tests::{
    FIXTURE_DIR, Memtrace, assert_no_losses, assert_site, fixture, process_by_comm,
};
use serde_json::Value;

use crate::{REPORT_ARGS, shared_machine};

/// Where Debian puts the libraries.
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

/// `memtrace -- env LD_PRELOAD=LIB FIXTURE`: the report, after checking that
/// memtrace lost nothing and the fixture freed nothing unseen.
fn preloaded(lib: &str, package: &str, fixture_name: &str) -> Value {
    let path = Path::new(LIB_DIR).join(lib);
    assert!(
        path.exists(),
        "{} is missing: install the Debian package {package} (cargo xtask setup does)",
        path.display()
    );
    let preload = format!("LD_PRELOAD={}", path.display());
    let program = fixture(fixture_name);
    let output = Memtrace::spawn_cmd(
        REPORT_ARGS,
        "env",
        [preload.as_str(), program.to_str().unwrap()],
    )
    .wait();
    output.assert_status(0);
    let report = output.json();
    assert_no_losses(&report, process_by_comm(&report, fixture_name));
    assert_probed(&report, lib);
    report
}

/// The C fixture under `lib`. `realloc_zero_frees`: the allocator's
/// `realloc(p, 0)` frees and returns NULL, as glibc's does.
fn c_fixture(lib: &str, package: &str, realloc_zero_frees: bool) {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = preloaded(lib, package, "alloc_fixture");
    let p = process_by_comm(&report, "alloc_fixture");
    for &(function, site) in c::SITES {
        let site = match function {
            "churn" if !realloc_zero_frees => c::CHURN_REALLOC_ZERO_ALLOCATES,
            _ => site,
        };
        assert_site(p, function, site);
    }
}

/// The C++ fixture under `lib`: `new`, `new[]`, nothrow `new` and (sized)
/// `delete`, each site exact.
fn cxx_fixture(lib: &str, package: &str) {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let report = preloaded(lib, package, "cxx_fixture");
    let p = process_by_comm(&report, "cxx_fixture");
    for &(function, site) in cxx::SITES {
        assert_site(p, function, site);
    }
}

/// `lib` was found by its symbols and probed, `malloc` to `free` at least.
fn assert_probed(report: &Value, lib: &str) {
    // Found by its symbols, and probed for the fixture.
    let stem = lib.split(".so").next().unwrap();
    let probes = report["probes"].as_array().expect("probes");
    let probed: Vec<&Value> = probes
        .iter()
        .filter(|pr| {
            pr["module"]
                .as_str()
                .is_some_and(|m| m.rsplit('/').next().unwrap().starts_with(stem))
        })
        .collect();
    assert_eq!(probed.len(), 1, "{lib} among the probes: {probes:#?}");
    let functions = probed[0]["functions"].to_string();
    assert!(
        ["malloc", "calloc", "realloc", "free", "new"]
            .iter()
            .all(|f| functions.contains(&format!("\"{f}"))),
        "{lib}: {functions}"
    );
    assert!(functions.contains("delete"), "{lib}: {functions}");
}

const JEMALLOC: (&str, &str) = ("libjemalloc.so.2", "libjemalloc2");
const TCMALLOC: (&str, &str) = ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4");
const MIMALLOC: (&str, &str) = ("libmimalloc.so.2", "libmimalloc2.0");

#[test]
fn jemalloc_c() {
    c_fixture(JEMALLOC.0, JEMALLOC.1, true);
}

#[test]
fn jemalloc_cxx() {
    cxx_fixture(JEMALLOC.0, JEMALLOC.1);
}

#[test]
fn tcmalloc_c() {
    c_fixture(TCMALLOC.0, TCMALLOC.1, true);
}

#[test]
fn tcmalloc_cxx() {
    cxx_fixture(TCMALLOC.0, TCMALLOC.1);
}

#[test]
fn mimalloc_c() {
    c_fixture(MIMALLOC.0, MIMALLOC.1, false);
}

#[test]
fn mimalloc_cxx() {
    cxx_fixture(MIMALLOC.0, MIMALLOC.1);
}

/// The C fixture built another way (`name`, by tests/build.rs), run under
/// memtrace: every site exact, the allocator named in the probe list.
/// `musl`: no `pvalloc` (its site allocates nothing), and `realloc(p, 0)`
/// returns a new block.
fn built_fixture(name: &str, allocator: &str, musl: bool) {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = Path::new(FIXTURE_DIR).join(name);
    assert!(
        program.exists(),
        "fixture {name} was not built: install musl-tools (cargo xtask setup does)"
    );
    let output =
        Memtrace::spawn_cmd(REPORT_ARGS, program.to_str().unwrap(), [] as [&str; 0]).wait();
    output.assert_status(0);
    let report = output.json();
    // The kernel's comm is the first 15 bytes of the name.
    let comm = &name[..name.len().min(15)];
    let p = process_by_comm(&report, comm);
    assert_no_losses(&report, p);
    let probes = report["probes"].as_array().expect("probes");
    assert!(
        probes
            .iter()
            .any(|pr| pr["allocators"].to_string().contains(allocator)),
        "{allocator} among the probes: {probes:#?}"
    );
    for &(function, site) in c::SITES {
        let site = match function {
            "churn" if musl => c::CHURN_REALLOC_ZERO_ALLOCATES,
            "leak_pvalloc" if musl => {
                assert!(
                    memtrace_tests::matching_stacks(p, function).is_empty(),
                    "musl has no pvalloc"
                );
                continue;
            }
            _ => site,
        };
        assert_site(p, function, site);
    }
}

/// glibc's allocator linked into the executable (`gcc -static`).
#[test]
fn static_glibc() {
    built_fixture("alloc_fixture_static", "glibc", false);
}

/// musl's `libc.so` (`musl-gcc`), the program's interpreter.
#[test]
fn musl_shared() {
    built_fixture("alloc_fixture_musl", "musl", true);
}

/// musl's allocator linked into the executable (`musl-gcc -static`).
#[test]
fn musl_static() {
    built_fixture("alloc_fixture_musl_static", "musl", true);
}

/// Rust's tikv-jemallocator as the `#[global_allocator]`: glibc's `malloc`
/// sees none of the fixture's blocks. memtrace probes the shims
/// (`__rust_alloc`, ...: found by their demangled names) and jemalloc's
/// `_rjem_` functions in the executable; the Rust runtime allocates at
/// start-up too, so only the sites are exact.
#[test]
fn rust_tikv_jemallocator() {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let program = env!("CARGO_BIN_EXE_rust_jemalloc_fixture");
    let output = Memtrace::spawn_cmd(REPORT_ARGS, program, [] as [&str; 0]).wait();
    output.assert_status(0);
    let report = output.json();
    let p = process_by_comm(&report, "rust_jemalloc_f");
    assert_no_losses(&report, p);
    let probes = report["probes"].to_string();
    for name in [
        "_rjem_",
        "Rust #[global_allocator]",
        "__rust_alloc",
        "_rjem_sdallocx",
    ] {
        assert!(probes.contains(name), "{name} among the probes: {probes}");
    }
    for &(function, site) in rust::SITES {
        assert_site(p, function, site);
    }
}
