//! `cargo xtask test [-- ARGS]`: runs setup, checks formatting, builds the
//! memtrace binary (release), then runs
//! 1. the unit tests of memtrace-common, memtrace and xtask (in parallel),
//! 2. the integration tests in memtrace-tests, one at a time (they trace
//!    real processes and measure them),
//!
//! both with MEMTRACE_BIN pointing at the binary, ARGS passed to the test
//! binaries, and both always run; it fails at the end if either failed.
//! It prints the differential oracle's table (memtrace against an
//! independent bpftrace count, per process of real programs) when that test
//! ran.
//!
//! It does not gain privileges: the root integration tests skip when not
//! root, unless MEMTRACE_REQUIRE_ROOT=1 makes them fail. It does not run
//! clippy (`cargo xtask clippy` does).

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    build, setup,
    util::{self, exec, status},
};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    setup::for_tests()?;
    exec(util::cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    let bin = build::memtrace(false)?;

    let unit = status(
        test_command(&bin, &["memtrace-common", "memtrace", "xtask"])
            .arg("--")
            .args(args),
    )?;
    let oracle_table = Path::new("target/oracle/table.txt");
    let _ = std::fs::remove_file(oracle_table);
    let integration = status(
        test_command(&bin, &["memtrace-tests"])
            .args(["--", "--test-threads=1"])
            .args(args),
    )?;
    // The differential oracle's table (tests/tests/oracle.rs), when it ran.
    if let Ok(table) = std::fs::read_to_string(oracle_table) {
        eprintln!("\nmemtrace against the independent oracle, per process:\n{table}");
    }

    if !util::is_root() && std::env::var("MEMTRACE_REQUIRE_ROOT").as_deref() != Ok("1") {
        eprintln!(
            "\n**********************************************************************\n\
             NOTE: not root, so the integration tests that need root were SKIPPED.\n\
             Run as root (MEMTRACE_REQUIRE_ROOT=1 makes them fail instead of skip).\n\
             **********************************************************************"
        );
    }

    let failed: Vec<&str> = [
        ("the unit tests (memtrace-common, memtrace, xtask)", unit),
        ("the integration tests (memtrace-tests)", integration),
    ]
    .into_iter()
    .filter(|(_, s)| !s.success())
    .map(|(name, _)| name)
    .collect();
    if !failed.is_empty() {
        bail!("{} failed", failed.join(" and "));
    }
    eprintln!("all tests passed");
    Ok(())
}

/// `cargo test --release -p PACKAGE...` with the environment the tests expect.
fn test_command(bin: &Path, packages: &[&str]) -> Command {
    let mut cmd = util::cargo();
    cmd.args(["test", "--release"])
        .env("MEMTRACE_BIN", bin)
        .env("RUST_BACKTRACE", "1");
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd
}
