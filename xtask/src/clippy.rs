//! `cargo xtask clippy`: clippy with `-D warnings` on the host crates (all
//! targets, release) and on the eBPF crate (nightly, bpfel-unknown-none,
//! `-Z build-std=core`, from the workspace root). Both always run; it fails
//! at the end if either found something.
//!
//! It runs setup first (memtrace's build.rs builds the eBPF object even under
//! clippy, so host clippy needs rust-src and bpf-linker too). It does not
//! check formatting: `cargo xtask test` does.

use anyhow::bail;

use crate::{
    setup,
    util::{self, status},
};

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let host = status(util::cargo().args([
        "clippy",
        "--release",
        "-p",
        "memtrace-common",
        "-p",
        "memtrace",
        "-p",
        "memtrace-tests",
        "-p",
        "xtask",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // aya-build passes `--cfg bpf_target_arch=...` when it builds the object;
    // without it aya-ebpf's build script defaults to the host's arch, the
    // same value here, so clippy sees the code that gets built.
    let ebpf = status(util::cargo().args([
        "+nightly",
        "clippy",
        "--release",
        "-p",
        "memtrace-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    match (host.success(), ebpf.success()) {
        (true, true) => Ok(()),
        (false, true) => bail!("clippy failed on the host crates"),
        (true, false) => bail!("clippy failed on the eBPF crate"),
        (false, false) => bail!("clippy failed on the host crates and on the eBPF crate"),
    }
}
