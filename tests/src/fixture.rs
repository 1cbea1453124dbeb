//! A running fixture program and its ready/go/done protocol (see
//! `fixtures/alloc_fixture.c`): the test spawns it with `--wait`, waits for
//! "ready", attaches memtrace, sends "go", waits for "done", and finally
//! closes stdin so the fixture exits.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::LINE_TIMEOUT;

/// A fixture process with piped stdin and stdout (stderr is inherited, so its
/// complaints land in the test's output). Killed on drop if still running.
pub struct Fixture {
    cmdline: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines of the fixture's stdout, read by a thread so waits can time out.
    lines: Receiver<String>,
    status: Option<ExitStatus>,
}

impl Fixture {
    /// Starts `program args...`.
    pub fn spawn<I, S>(program: impl AsRef<Path>, args: I) -> Fixture
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program: PathBuf = program.as_ref().to_owned();
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let cmdline = crate::render_command(&program, &args);
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start fixture `{cmdline}`: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Fixture {
            cmdline,
            child,
            stdin,
            lines,
            status: None,
        }
    }

    /// The fixture's pid, for `memtrace -p`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Waits (at most [`LINE_TIMEOUT`]) for the next stdout line and checks
    /// that it is `expected`. The fixtures print nothing else.
    pub fn wait_line(&mut self, expected: &str) {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) if line == expected => {}
            Ok(line) => panic!(
                "fixture `{}` (pid {}) printed {line:?} while the test waited for {expected:?}",
                self.cmdline,
                self.pid()
            ),
            Err(RecvTimeoutError::Timeout) => panic!(
                "fixture `{}` (pid {}) did not print {expected:?} within {LINE_TIMEOUT:?}",
                self.cmdline,
                self.pid()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!(
                    "fixture `{}` (pid {}) closed stdout (exit status {status:?}) \
                     before printing {expected:?}",
                    self.cmdline,
                    self.pid()
                )
            }
        }
    }

    /// Waits for "ready": the fixture has set up and allocates nothing more
    /// until [`Fixture::go`].
    pub fn wait_ready(&mut self) {
        self.wait_line("ready");
    }

    /// Tells a `--wait` fixture to do its work.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("go() after finish()");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|err| {
                panic!("cannot send \"go\" to fixture `{}`: {err}", self.cmdline)
            });
    }

    /// Waits for "done": all the work has been done.
    pub fn wait_done(&mut self) {
        self.wait_line("done");
    }

    /// Closes stdin, which lets a `--wait` fixture exit, and waits (at most
    /// [`LINE_TIMEOUT`]) for it to exit.
    pub fn finish(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        drop(self.stdin.take());
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    panic!(
                        "fixture `{}` (pid {}) did not exit within {LINE_TIMEOUT:?} \
                         of its stdin being closed",
                        self.cmdline,
                        self.pid()
                    )
                }
                Err(err) => panic!("cannot wait for fixture `{}`: {err}", self.cmdline),
            }
        }
    }

    /// Closes stdin and waits (at most [`LINE_TIMEOUT`]) until the fixture
    /// has exited but is not reaped: a zombie, whose `/proc/PID` is still
    /// there with an empty `maps`. [`Fixture::finish`] reaps it.
    pub fn exit_unreaped(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + LINE_TIMEOUT;
        let stat = format!("/proc/{}/stat", self.pid());
        loop {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            let state = state.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            if state.is_some_and(|s| s.starts_with('Z')) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fixture `{}` (pid {}) did not exit within {LINE_TIMEOUT:?} of its stdin being closed",
                self.cmdline,
                self.pid()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`Fixture::finish`], and checks that the fixture exited with 0.
    pub fn finish_ok(&mut self) {
        let status = self.finish();
        assert!(
            status.success(),
            "fixture `{}` (pid {}) exited with {status}",
            self.cmdline,
            self.pid()
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
