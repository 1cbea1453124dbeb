//! The guard: a small second memtrace process that continues the processes
//! memtrace stopped, should memtrace itself die without doing it.
//!
//! At the dynamic loader's hook a traced process is stopped until memtrace
//! has probed its new libraries (see `probing`). Every stop is in the
//! `STOPPED` BPF map until memtrace sends SIGCONT. A memtrace killed with
//! SIGKILL in those milliseconds cannot send it; the guard, started before any
//! probe, holds the map open and waits for the end of its stdin, a pipe only
//! memtrace writes to. When memtrace is gone for any reason, the pipe closes,
//! and the guard sends SIGCONT to every process still in the map.
//!
//! This module runs and talks to the guard; it knows nothing of probes.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};

use aya::maps::{HashMap, Map, MapData};

use crate::error::{Result, UserError};

/// Processes stopped at the loader's hook (pid → 1).
pub type Stopped = HashMap<MapData, u32, u8>;

/// The running guard.
pub struct Guard {
    child: Child,
    /// Closed when memtrace ends: the guard's signal to act.
    stdin: Option<ChildStdin>,
}

impl Guard {
    /// Starts `memtrace guard ID` for the map with this id, and waits until
    /// it holds the map.
    pub fn spawn(map_id: u32) -> Result<Self> {
        let failed = |e: &dyn std::fmt::Display| {
            UserError::new(
                format!("cannot start memtrace's guard process: {e}"),
                "memtrace runs itself again (/proc/self/exe) to guard the processes it stops; check /proc is mounted",
            )
        };
        let mut child = Command::new("/proc/self/exe")
            .args(["guard", &map_id.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| failed(&e))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        if !matches!(read, Some(Ok(_))) || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(&"it did not start"));
        }
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// memtrace is done and has continued every process itself: the guard
    /// finds nothing left to do and exits.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The guard's own main: hold the map, wait for memtrace to go, continue
/// what is still stopped.
pub fn run(map_id: u32) -> Result<i32> {
    // Ctrl-C and a SIGTERM to the process group are memtrace's to act on;
    // the guard ends when memtrace does.
    // SAFETY: setting a signal's disposition to "ignore" is always sound.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let data = MapData::from_id(map_id).map_err(|e| {
        UserError::new(
            format!("the guard cannot open BPF map {map_id}: {e}"),
            "memtrace guard is started by memtrace itself",
        )
    })?;
    let stopped = Stopped::try_from(Map::HashMap(data))
        .map_err(|e| UserError::new(format!("BPF map {map_id}: {e}"), "this is a bug"))?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready").and_then(|()| out.flush());
    // Until memtrace closes the pipe, or dies.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let pids: Vec<u32> = stopped.keys().filter_map(|k| k.ok()).collect();
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        eprintln!("memtrace guard: PID {pid} was left stopped by memtrace; continued it");
    }
    Ok(0)
}
