//! `cargo xtask run [-- ARGS]`: runs setup, builds memtrace (release) and runs
//! it with ARGS, inheriting stdio, then exits with memtrace's exit code.
//!
//! It adds no arguments of its own (without ARGS memtrace traces all processes
//! for 10 s) and does not gain privileges: run it as root.
//! Ctrl-C reaches memtrace directly (same process group); xtask ignores it
//! while waiting so memtrace can print its report and exit on its own.

use std::{os::unix::process::ExitStatusExt as _, process::Command};

use anyhow::Context as _;

use crate::build;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let bin = build::run(false)?;
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    eprintln!("$ {} {}", bin.display(), args.join(" "));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    // Ignore SIGINT only after the spawn: an ignored signal stays ignored
    // across exec, and memtrace must see Ctrl-C.
    // SAFETY: SIG_IGN is a valid disposition for SIGINT; no handler runs.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait().context("waiting for memtrace")?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    std::process::exit(code)
}
