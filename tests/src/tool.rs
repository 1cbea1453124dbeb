//! External programs that check memtrace's output formats the way their
//! users read them (`go tool pprof`, a headless `chromium`): found on PATH or
//! the test fails saying how to install them, and run with a time limit.
//!
//! A missing tool is a failure, not a skip: a suite that skipped the pprof
//! check would pass without having looked at the profile.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long an external tool may run (chromium's first start is slow).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the output pipes may stay open after the tool exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of `name` on PATH; panics naming the Debian `package` that has
/// it and `cargo xtask setup`, which installs it.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH, and this test needs it to read memtrace's output; \
                 it comes from Debian's {package}: run `cargo xtask setup`, which installs it \
                 (or `apt-get install {package}`)"
            )
        })
}

/// What a tool printed.
#[derive(Debug)]
pub struct ToolOutput {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    /// Checks that the tool exited with 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "`{}` exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.cmdline,
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `program args...` to the end (at most [`TOOL_TIMEOUT`], else it is
/// killed and the test fails), with stdin closed.
pub fn run_tool<I, S>(program: &Path, args: I) -> ToolOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmdline = crate::render_command(program, &args);
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start `{cmdline}`: {err}"));
    // Drained by threads so that a chatty tool never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
        rx
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{cmdline}` did not finish within {TOOL_TIMEOUT:?} (killed it)");
            }
            Err(err) => panic!("cannot wait for `{cmdline}`: {err}"),
        }
    };
    // A helper process the tool left behind could hold the pipes open.
    let collect = |rx: mpsc::Receiver<String>, name: &str| {
        rx.recv_timeout(DRAIN_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "`{cmdline}` exited ({status}) but its {name} stayed open for \
                 {DRAIN_TIMEOUT:?} (a surviving helper process?)"
            )
        })
    };
    let stdout = collect(stdout, "stdout");
    let stderr = collect(stderr, "stderr");
    ToolOutput {
        cmdline,
        status,
        stdout,
        stderr,
    }
}
