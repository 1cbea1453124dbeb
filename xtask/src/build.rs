//! `cargo xtask build [--debug]`: runs setup, then builds the memtrace binary
//! (release by default: the tracer's consumer must keep up with the events)
//! and returns its path.
//!
//! The eBPF crate is built by memtrace-user's build.rs (through aya-build), not
//! here. It does not build the tests or fixtures.

use std::path::PathBuf;

use crate::{
    setup,
    util::{self, exec},
};

pub fn run(debug: bool) -> anyhow::Result<PathBuf> {
    setup::run()?;
    memtrace(debug)
}

/// Builds memtrace without running setup; returns the binary's path.
pub fn memtrace(debug: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "memtrace"]);
    if !debug {
        cmd.arg("--release");
    }
    exec(&mut cmd)?;
    let profile = if debug { "debug" } else { "release" };
    Ok(util::target_dir()?.join(profile).join("memtrace"))
}
