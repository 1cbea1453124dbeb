//! Allocators other than glibc's: jemalloc, tcmalloc and mimalloc (Debian's
//! libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0), preloaded into the C
//! fixture with `LD_PRELOAD`. They replace glibc's `malloc` for the whole
//! process, so glibc's probes would see almost nothing; memtrace finds them by
//! the `malloc` and `free` they define (not by name), at the loader's stop
//! before the fixture runs, and every call site is exact.

use std::path::Path;

use memtrace_tests::truth::c;
use memtrace_tests::{Memtrace, assert_no_losses, assert_site, fixture, process_by_comm};
use serde_json::Value;

use crate::{REPORT_ARGS, shared_machine};

/// Where Debian puts the libraries.
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

/// `memtrace -- env LD_PRELOAD=LIB alloc_fixture`, checked against the
/// fixture's ground truth. `realloc_zero_frees`: the allocator's
/// `realloc(p, 0)` frees and returns NULL, as glibc's does.
fn preloaded(lib: &str, package: &str, realloc_zero_frees: bool) {
    if !memtrace_tests::require_root() {
        return;
    }
    let _machine = shared_machine();
    let path = Path::new(LIB_DIR).join(lib);
    assert!(
        path.exists(),
        "{} is missing: install the Debian package {package} (cargo xtask setup does)",
        path.display()
    );
    let preload = format!("LD_PRELOAD={}", path.display());
    let program = fixture("alloc_fixture");
    let output = Memtrace::spawn_cmd(
        REPORT_ARGS,
        "env",
        [preload.as_str(), program.to_str().unwrap()],
    )
    .wait();
    output.assert_status(0);
    let report = output.json();
    let p = process_by_comm(&report, "alloc_fixture");
    for &(function, site) in c::SITES {
        let site = match function {
            "churn" if !realloc_zero_frees => c::CHURN_REALLOC_ZERO_ALLOCATES,
            _ => site,
        };
        assert_site(p, function, site);
    }
    assert_no_losses(&report, p);
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
        ["malloc", "calloc", "realloc", "free"]
            .iter()
            .all(|f| functions.contains(&format!("\"{f}"))),
        "{lib}: {functions}"
    );
}

#[test]
fn jemalloc_is_found_and_traced_exactly() {
    preloaded("libjemalloc.so.2", "libjemalloc2", true);
}

#[test]
fn tcmalloc_is_found_and_traced_exactly() {
    preloaded("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4", true);
}

#[test]
fn mimalloc_is_found_and_traced_exactly() {
    preloaded("libmimalloc.so.2", "libmimalloc2.0", false);
}
