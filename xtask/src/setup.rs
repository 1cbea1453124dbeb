//! `cargo xtask setup`: installs what a fresh machine lacks to build and test
//! memtrace, and only checks (quickly, without network) when all is present.
//!
//! Steps, each printing one line, "ok" or what it does:
//! - rust-src for the nightly toolchain (aya-build compiles the eBPF crate with
//!   `rustup run nightly cargo build -Z build-std=core`);
//! - bpf-linker 0.10.0 in cargo's bin directory;
//! - the Debian packages builds need, and for `cargo xtask test` and
//!   `cargo xtask setup` also those only the tests need (as root, with
//!   apt-get; `apt-get update` once, only when something is missing);
//! - tracefs at /sys/kernel/tracing (as root; a failure is only a warning).
//!
//! It does not install rustup or toolchains (nightly cannot be fetched here),
//! and never calls sudo: when not root it says what is missing and how to
//! install it.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, exec, output};

/// bpf-linker 0.10.0 loads the nightly toolchain's own LLVM at run time.
/// Later versions (0.11 to 0.13) link against a system LLVM that this
/// machine lacks and fail to link (`unable to find library -lLLVM`).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages builds and tests need: gcc and g++ build the C and C++
/// fixtures (and gcc links), libc6-dev has the static libc for the static
/// fixture, util-linux has setpriv, make builds the jemalloc of the Rust
/// fixture under tikv-jemallocator (even `cargo clippy` runs its build
/// script).
const DEBIAN_PACKAGES: &[&str] = &["gcc", "g++", "libc6-dev", "util-linux", "make"];

/// Debian packages only the tests need: `go tool pprof` reads memtrace's
/// pprof output, headless Chromium renders its HTML report, python3 runs
/// the interpreter fixture (`tests/fixtures/py_fixture.py`), and jemalloc,
/// tcmalloc and mimalloc are preloaded into the C fixture
/// (`tests/tests/allocators.rs`), and a real Prometheus scrapes
/// `memtrace agent` (`tests/tests/agent.rs`).
const TEST_PACKAGES: &[&str] = &[
    "golang-go",
    "prometheus",
    "chromium",
    "python3",
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "libmimalloc2.0",
    // musl-gcc, for the fixtures built against musl.
    "musl-tools",
    // The differential oracle (`tests/tests/oracle.rs`): the independent
    // tracer, and programs of its corpus.
    "bpftrace",
    "sqlite3",
    "git",
];

const TRACEFS: &str = "/sys/kernel/tracing";

/// What building and running memtrace needs.
pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages(DEBIAN_PACKAGES)?;
    tracefs();
    Ok(())
}

/// What the tests need too.
pub fn for_tests() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    let all: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .chain(TEST_PACKAGES)
        .copied()
        .collect();
    debian_packages(&all)?;
    tracefs();
    Ok(())
}

/// Debian packages `cargo xtask bench` needs besides the build's: bpftrace
/// runs the memleak-style script memtrace is compared with.
const BENCH_PACKAGES: &[&str] = &["bpftrace"];

/// What the benchmarks need too.
pub fn for_bench() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    let all: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .chain(BENCH_PACKAGES)
        .copied()
        .collect();
    debian_packages(&all)?;
    tracefs();
    Ok(())
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // Never let rustup download a toolchain behind our back.
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed: is rustup installed?")?;
    if !toolchains.lines().any(is_plain_nightly) {
        bail!(
            "no `nightly` toolchain in `rustup toolchain list`: the eBPF crate is built with \
             `rustup run nightly`, and setup does not install toolchains (this machine cannot \
             fetch one). Install it where the network allows: rustup toolchain install nightly"
        );
    }
    let installed = output(
        rustup()
            .args(["component", "list", "--toolchain", "nightly"])
            .arg("--installed"),
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        eprintln!("setup: rust-src (nightly): ok");
        return Ok(());
    }
    eprintln!("setup: rust-src (nightly): installing");
    exec(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Whether a line of `rustup toolchain list` is the `nightly` that
/// `rustup run nightly` resolves to (`nightly-<host>`, not a dated one).
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or("");
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn bpf_linker() -> anyhow::Result<()> {
    // PATH already starts with cargo's bin directory (see util::put_cargo_bin_on_path).
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.as_deref().is_some_and(is_wanted_bpf_linker) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION}: ok");
        return Ok(());
    }
    match &version {
        Some(v) => eprintln!(
            "setup: bpf-linker: found {}, installing {BPF_LINKER_VERSION} (takes a few minutes)",
            v.trim()
        ),
        None => {
            eprintln!("setup: bpf-linker: installing {BPF_LINKER_VERSION} (takes a few minutes)")
        }
    }
    exec(
        Command::new("cargo")
            .args(["install", "--locked"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}")),
    )?;
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !is_wanted_bpf_linker(&version) {
        bail!(
            "after `cargo install`, `bpf-linker --version` prints {:?}, not {BPF_LINKER_VERSION}: \
             is another bpf-linker earlier on PATH than {}?",
            version.trim(),
            util::cargo_bin_dir().display()
        );
    }
    Ok(())
}

/// `bpf-linker --version` prints `bpf-linker 0.10.0`.
fn is_wanted_bpf_linker(version: &str) -> bool {
    version.split_whitespace().any(|w| w == BPF_LINKER_VERSION)
}

fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    if output(Command::new("dpkg-query").arg("--version")).is_none() {
        eprintln!(
            "setup: warning: no dpkg-query (not Debian?): make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages ({}): ok", packages.join(" "));
        return Ok(());
    }
    let missing = missing.join(" ");
    if !util::is_root() {
        eprintln!(
            "setup: warning: missing Debian packages the tests need: {missing}\n\
             setup:   install them as root: apt-get update && apt-get install -y {missing}"
        );
        return Ok(());
    }
    eprintln!("setup: Debian packages: installing {missing}");
    exec(Command::new("apt-get").arg("update"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing.split(' '))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn tracefs() {
    let dir = Path::new(TRACEFS);
    if dir.join("uprobe_events").exists() || dir.join("trace").exists() {
        eprintln!("setup: tracefs at {TRACEFS}: ok");
        return;
    }
    if !util::is_root() {
        eprintln!(
            "setup: warning: no tracefs at {TRACEFS} (not mounted, or not readable as \
             this user); as root: mount -t tracefs tracefs {TRACEFS}"
        );
        return;
    }
    eprintln!("setup: tracefs: mounting at {TRACEFS}");
    if let Err(e) = exec(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS])) {
        eprintln!("setup: warning: could not mount tracefs: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_plain_nightly_toolchain() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (active, default)"
        ));
        assert!(!is_plain_nightly(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly("stable-x86_64-unknown-linux-gnu"));
    }

    #[test]
    fn recognises_the_wanted_bpf_linker() {
        assert!(is_wanted_bpf_linker("bpf-linker 0.10.0\n"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.13.1\n"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.10.01\n"));
    }
}
