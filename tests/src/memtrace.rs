//! A running memtrace and what it printed.
//!
//! stdout and stderr are drained by threads from the start, so memtrace never
//! blocks on a full pipe and every wait can time out. The stderr thread also
//! watches for the `memtrace: tracing` line that says the probes are
//! attached. Every panic carries the command line and all of memtrace's stderr.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long memtrace may take to attach its probes (BTF, verifier, symbol
/// resolution on a loaded 2-core machine).
pub const TRACING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long memtrace may take to exit once asked to (or once its target ends).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the output pipes may stay open after memtrace exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A memtrace process. Killed on drop if still running.
pub struct Memtrace {
    cmdline: String,
    child: Child,
    stdout: Receiver<Vec<u8>>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Receiver<()>,
    tracing: Receiver<()>,
    report_file: Option<PathBuf>,
    exited: bool,
}

impl Memtrace {
    /// Starts memtrace with `args`; the report is expected on stdout.
    pub fn spawn<I, S>(args: I) -> Memtrace
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        Memtrace::launch(&[], crate::memtrace_bin(), args, None)
    }

    /// Runs memtrace with `args` to the end, e.g. `memtrace report FILE`, and
    /// returns what it printed (the report is on stdout).
    pub fn run<I, S>(args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Memtrace::spawn(args).wait()
    }

    /// Starts `memtrace args... -o FILE -- command command_args...`. The
    /// report goes to a temporary file because the traced command shares
    /// memtrace's stdout.
    pub fn spawn_cmd<I, S, J, T>(args: I, command: impl AsRef<Path>, command_args: J) -> Memtrace
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        J: IntoIterator<Item = T>,
        T: AsRef<OsStr>,
    {
        let report_file = temp_report_path();
        let mut argv: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        argv.push("-o".into());
        argv.push(report_file.clone().into());
        argv.push("--".into());
        argv.push(command.as_ref().into());
        argv.extend(command_args.into_iter().map(|a| a.as_ref().to_owned()));
        Memtrace::launch(&[], crate::memtrace_bin(), argv, Some(report_file))
    }

    /// Starts `wrapper... binary args...`, e.g. a copy of memtrace under
    /// `setpriv` to drop privileges.
    pub fn spawn_via<I, S>(wrapper: &[&str], binary: &Path, args: I) -> Memtrace
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        Memtrace::launch(wrapper, binary.to_owned(), args, None)
    }

    fn launch(
        wrapper: &[&str],
        binary: PathBuf,
        args: Vec<OsString>,
        report_file: Option<PathBuf>,
    ) -> Memtrace {
        let (program, argv): (PathBuf, Vec<OsString>) = match wrapper.split_first() {
            None => (binary, args),
            Some((first, rest)) => {
                let mut argv: Vec<OsString> = rest.iter().map(OsString::from).collect();
                argv.push(binary.into());
                argv.extend(args);
                (PathBuf::from(first), argv)
            }
        };
        let cmdline = crate::render_command(&program, &argv);
        let mut child = Command::new(&program)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start `{cmdline}`: {err}"));

        let mut stdout = child.stdout.take().expect("piped stdout");
        let (stdout_tx, stdout_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            let _ = stdout_tx.send(buf);
        });

        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tracing_tx, tracing_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let collected = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                // Echoed so that a failing test's captured output shows it.
                eprintln!("[memtrace] {line}");
                if line.starts_with("memtrace: tracing")
                    || line.starts_with("memtrace agent: tracing")
                {
                    let _ = tracing_tx.send(());
                }
                let mut all = collected.lock().unwrap_or_else(|e| e.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
            let _ = done_tx.send(());
        });

        Memtrace {
            cmdline,
            child,
            stdout: stdout_rx,
            stderr,
            stderr_done: done_rx,
            tracing: tracing_rx,
            report_file,
            exited: false,
        }
    }

    /// memtrace's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything memtrace wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the `memtrace: tracing` line: the probes are attached, and
    /// every allocation from now on is seen.
    pub fn wait_tracing(&mut self) {
        match self.tracing.recv_timeout(TRACING_TIMEOUT) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                panic!(
                    "memtrace did not print `memtrace: tracing` within {TRACING_TIMEOUT:?}\n\
                     command: {}\nstderr so far:\n{}",
                    self.cmdline,
                    self.stderr_so_far()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                self.exited = true;
                // Let the stderr thread finish collecting.
                let _ = self.stderr_done.recv_timeout(DRAIN_TIMEOUT);
                panic!(
                    "memtrace closed stderr (exit status {status:?}) without printing \
                     `memtrace: tracing`\ncommand: {}\nstderr:\n{}",
                    self.cmdline,
                    self.stderr_so_far()
                )
            }
        }
    }

    /// Sends SIGINT, which asks memtrace for its final report.
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    /// Sends `signal`, e.g. SIGKILL to leave a recording unfinished.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "cannot send signal {signal} to memtrace (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits (at most [`EXIT_TIMEOUT`]) for memtrace to exit and collects
    /// what it printed. On timeout it is killed and the test fails.
    pub fn wait(&mut self) -> Output {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    self.exited = true;
                    let _ = self.stderr_done.recv_timeout(DRAIN_TIMEOUT);
                    panic!(
                        "memtrace did not exit within {EXIT_TIMEOUT:?} (killed it)\n\
                         command: {}\nstderr:\n{}",
                        self.cmdline,
                        self.stderr_so_far()
                    )
                }
                Err(err) => panic!("cannot wait for `{}`: {err}", self.cmdline),
            }
        };
        self.exited = true;

        // A child of memtrace that outlived it could still hold the pipes.
        let stdout = self.stdout.recv_timeout(DRAIN_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "memtrace exited ({status}) but its stdout stayed open for {DRAIN_TIMEOUT:?} \
                 (a surviving child process?)\ncommand: {}\nstderr:\n{}",
                self.cmdline,
                self.stderr_so_far()
            )
        });
        let _ = self.stderr_done.recv_timeout(DRAIN_TIMEOUT);
        let report = self.report_file.as_ref().map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_else(|err| {
                panic!(
                    "memtrace exited ({status}) but its report file {} is unreadable: {err}\n\
                     command: {}\nstderr:\n{}",
                    path.display(),
                    self.cmdline,
                    self.stderr_so_far()
                )
            });
            let _ = std::fs::remove_file(path);
            text
        });
        Output {
            cmdline: self.cmdline.clone(),
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: self.stderr_so_far(),
            report,
        }
    }
}

impl Drop for Memtrace {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(path) = &self.report_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What an exited memtrace left behind.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The `-o` file's contents, when started with [`Memtrace::spawn_cmd`].
    pub report: Option<String>,
}

impl Output {
    /// The report as JSON: the `-o` file if there is one, else stdout.
    pub fn json(&self) -> Value {
        let (source, text) = match &self.report {
            Some(text) => ("report file", text.as_str()),
            None => ("stdout", self.stdout.as_str()),
        };
        serde_json::from_str(text).unwrap_or_else(|err| {
            panic!(
                "memtrace's {source} is not one JSON document: {err}\ncommand: {}\n\
                 exit status: {}\n--- {source} ---\n{text}\n--- stderr ---\n{}",
                self.cmdline, self.status, self.stderr
            )
        })
    }

    /// Checks that memtrace exited with `code`.
    pub fn assert_status(&self, code: i32) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "memtrace exited with {} instead of code {code}\ncommand: {}\nstderr:\n{}",
            self.status,
            self.cmdline,
            self.stderr
        );
    }

    /// Checks memtrace's error convention: exit status 2, a first stderr line
    /// `memtrace: ...` that mentions each of `mentions` (case-insensitively),
    /// and a second line `hint: ...`.
    pub fn assert_error(&self, mentions: &[&str]) {
        self.assert_status(2);
        let mut lines = self.stderr.lines();
        let first = lines.next().unwrap_or("");
        let second = lines.next().unwrap_or("");
        let context = format!("command: {}\nstderr:\n{}", self.cmdline, self.stderr);
        assert!(
            first.starts_with("memtrace: "),
            "first stderr line should start with `memtrace: `\n{context}"
        );
        for mention in mentions {
            assert!(
                first.to_lowercase().contains(&mention.to_lowercase()),
                "first stderr line should mention {mention:?}\n{context}"
            );
        }
        assert!(
            second.starts_with("hint: "),
            "second stderr line should start with `hint: `\n{context}"
        );
    }
}

/// A fresh path in the temp directory for a `-o` report.
fn temp_report_path() -> PathBuf {
    crate::temp::fresh_path("report.json")
}
