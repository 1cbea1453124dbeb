//! Helpers shared by the subcommands: running a command (echoing it first),
//! capturing a command's output, the workspace's paths, and root detection.
//!
//! It does not retry, time out, or interpret what commands print.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};

/// Prints `$ cmd args` on stderr, runs `cmd` with inherited stdio, and fails
/// unless it exits successfully.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Like [`exec`], but returns the exit status instead of failing on it.
pub fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    eprintln!("$ {}", display(cmd));
    cmd.status().with_context(|| format!("cannot run {cmd:?}"))
}

/// Runs `cmd` quietly and returns its stdout when it succeeds, `None` when
/// it cannot be started or fails. For checks, which decide what to do next.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd args` as a shell user would type it (without quoting).
fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// A `cargo` command that runs in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
}

/// Cargo's bin directory (`$CARGO_HOME/bin`, by default `~/.cargo/bin`), where
/// `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    home.join("bin")
}

/// Puts cargo's bin directory first on this process's PATH, so every child
/// (and their children: aya-build's nightly cargo looks for bpf-linker
/// there) finds what `cargo install` put there. Call it once, first thing.
pub fn put_cargo_bin_on_path() {
    let bin = cargo_bin_dir();
    let old = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(env::split_paths(&old).filter(|d| *d != bin));
    let new: OsString = env::join_paths(dirs).unwrap_or(old);
    // SAFETY: called at the start of main, before any other thread exists,
    // so nothing reads the environment concurrently.
    unsafe { env::set_var("PATH", new) };
}

/// The directory cargo builds into (honours CARGO_TARGET_DIR and cargo
/// config), from `cargo metadata`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
