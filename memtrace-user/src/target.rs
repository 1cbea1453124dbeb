//! What to trace: checks on `--pid` targets, privileges, and the gated child
//! of `-- CMD`.
//!
//! The child is forked, then blocks on a pipe until memtrace has attached its
//! probes, then execs the command: its start-up allocations are seen (bcc
//! memleak's `fork_sync_exec` idea). If memtrace fails before releasing it,
//! the pipe closes and the child exits with 127 without running anything.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Result, UserError};

/// Capability bits (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails unless this process may load BPF programs and attach uprobes.
pub fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    Err(UserError::new(
        format!(
            "loading eBPF programs needs root or CAP_BPF + CAP_PERFMON (running as uid {uid}, effective capabilities {caps:#x})"
        ),
        "run it with sudo, or grant the capabilities: setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep memtrace",
    ))
}

/// Fails unless `pid` names a user-space process memtrace can trace.
pub fn check_pid(pid: u32) -> Result<()> {
    let dir = format!("/proc/{pid}");
    if pid == 0 || !Path::new(&dir).exists() {
        return Err(UserError::new(
            format!("no process with PID {pid} ({dir} does not exist)"),
            "find it with 'pgrep -a NAME', or start the program under memtrace: memtrace -- ./prog ARGS",
        ));
    }
    let comm = comm(pid);
    match std::fs::read_to_string(format!("{dir}/maps")) {
        Ok(maps) if maps.trim().is_empty() => Err(UserError::new(
            format!(
                "PID {pid} ({comm}) is a kernel thread or a zombie: it has no user memory to trace"
            ),
            "pick a user-space process: 'ps -o pid,comm -p PID' shows kernel threads in [brackets]",
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(UserError::new(
            format!("cannot read {dir}/maps: {e}"),
            "memtrace needs to read the target's memory map: run it as root",
        )),
    }
}

/// The command name of a process, or `?`.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A process's RSS counters as `/proc/PID/status` has them now, as events
/// at `ts_ns` (the kernel side reports only changes). Empty when the file
/// cannot be read.
pub fn resident_now(pid: u32, ts_ns: u64) -> Vec<crate::event::Event> {
    use memtrace_common::RssMember;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let kib = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| {
            let v = l.strip_prefix(key)?.strip_prefix(':')?;
            v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    [
        (RssMember::Anon, "RssAnon"),
        (RssMember::File, "RssFile"),
        (RssMember::Shmem, "RssShmem"),
        (RssMember::Swap, "VmSwap"),
    ]
    .into_iter()
    .filter_map(|(member, key)| {
        Some(crate::event::Event::Rss(crate::event::Rss {
            pid,
            ts_ns,
            member,
            bytes: kib(key)? << 10,
            delta: 0,
            fault: None,
            sampled: false,
            stack: Vec::new(),
        }))
    })
    .collect()
}

/// Every process on the host but memtrace.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .collect()
}

/// Whether a process is gone: no `/proc` entry, or a zombie.
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command, which is in parentheses and may
        // itself contain them.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| state == 'Z' || state == 'X'),
    }
}

/// A forked child waiting to exec its command.
pub struct GatedChild {
    /// Its process id (the same after exec).
    pub pid: u32,
    gate: OwnedFd,
    /// Closed by a successful exec (close-on-exec); a failed one writes its
    /// errno here first.
    exec_result: OwnedFd,
}

impl GatedChild {
    /// Lets the child exec its command, and waits for the exec: the error if
    /// it failed (the child then exits with status 127).
    pub fn release(self) -> std::io::Result<()> {
        // SAFETY: writes one byte from a valid buffer to a pipe we own.
        unsafe { libc::write(self.gate.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        drop(self.gate);
        let mut errno = [0u8; 4];
        let mut file = std::fs::File::from(self.exec_result);
        match std::io::Read::read_exact(&mut file, &mut errno) {
            Ok(()) => Err(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno))),
            // End of file: the pipe closed with the exec.
            Err(_) => Ok(()),
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Forks a child that will exec `argv` once released.
pub fn spawn_gated(argv: &[String]) -> Result<GatedChild> {
    let Some(program) = argv.first().and_then(|p| find_program(p)) else {
        return Err(UserError::new(
            format!(
                "command not found: {}",
                argv.first().map(String::as_str).unwrap_or("")
            ),
            "give a path (./prog) or a program on PATH after --",
        ));
    };
    if !program.exists() {
        return Err(UserError::new(
            format!("command not found: {}", program.display()),
            "check the path of the program after --",
        ));
    }
    // What exec would refuse, said before anything is started.
    if let Ok(meta) = program.metadata() {
        use std::os::unix::fs::PermissionsExt;
        let why = if meta.is_dir() {
            Some("it is a directory".to_string())
        } else if meta.permissions().mode() & 0o111 == 0 {
            Some(format!(
                "it is not executable (mode {:o})",
                meta.permissions().mode() & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(UserError::new(
                format!("cannot run {}: {why}", program.display()),
                "give the program to run after --",
            ));
        }
    }
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| {
            UserError::new(
                format!("argument contains a NUL byte: {s:?}"),
                "remove the NUL byte",
            )
        })
    };
    let path = cstr(&program.to_string_lossy())?;
    let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());

    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(UserError::new(
            format!("pipe2 failed: {}", std::io::Error::last_os_error()),
            "too many open files?",
        ));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut fds = [0; 2];
    // SAFETY: as above.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(UserError::new(
            format!("pipe2 failed: {}", std::io::Error::last_os_error()),
            "too many open files?",
        ));
    }
    // SAFETY: as above.
    let (result_rd, result_wr) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: after fork the child calls only async-signal-safe functions
    // (close, read, execv, write, _exit) on data prepared before the fork.
    match unsafe { libc::fork() } {
        -1 => Err(UserError::new(
            format!("fork failed: {}", std::io::Error::last_os_error()),
            "the system may be out of processes or memory",
        )),
        0 => unsafe {
            libc::close(wr.as_raw_fd());
            libc::close(result_rd.as_raw_fd());
            let mut b = 0u8;
            let n = libc::read(rd.as_raw_fd(), (&raw mut b).cast(), 1);
            if n != 1 {
                libc::_exit(127);
            }
            libc::execv(path.as_ptr(), arg_ptrs.as_ptr());
            // memtrace says why (`release`).
            let errno = (*libc::__errno_location()).to_ne_bytes();
            libc::write(result_wr.as_raw_fd(), errno.as_ptr().cast(), errno.len());
            libc::_exit(127)
        },
        pid => {
            drop(rd);
            drop(result_wr);
            Ok(GatedChild {
                pid: pid as u32,
                gate: wr,
                exec_result: result_rd,
            })
        }
    }
}

/// Waits for a child on a thread of its own; the status arrives on the
/// returned channel as a shell would report it (128 + signal when killed).
pub fn wait_in_background(pid: u32) -> tokio::sync::oneshot::Receiver<i32> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        let code = if r < 0 {
            1
        } else if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            1
        };
        let _ = tx.send(code);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pid_is_explained() {
        let err = check_pid(u32::MAX - 1).unwrap_err();
        assert!(
            err.message.contains("no process with PID"),
            "{}",
            err.message
        );
        assert!(err.hint.contains("pgrep"));
    }

    #[test]
    fn this_process_is_alive() {
        assert!(!has_exited(std::process::id()));
        assert!(has_exited(u32::MAX - 1));
    }

    #[test]
    fn unknown_command_is_explained() {
        let err = spawn_gated(&["no-such-program-xyz".into()]).err().unwrap();
        assert!(
            err.message
                .contains("command not found: no-such-program-xyz")
        );
    }

    #[test]
    fn gated_child_runs_only_when_released() {
        let child = spawn_gated(&["/bin/sh".into(), "-c".into(), "exit 7".into()]).unwrap();
        let pid = child.pid;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let rx = wait_in_background(pid);
        child.release().unwrap();
        assert_eq!(rt.block_on(rx).unwrap(), 7);
    }

    #[test]
    fn a_failed_exec_is_reported_by_release() {
        // Executable, but not a format the kernel runs.
        let path = std::env::temp_dir().join(format!("memtrace-noexec-{}", std::process::id()));
        std::fs::write(&path, b"not a program").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let child = spawn_gated(&[path.to_string_lossy().into_owned()]).unwrap();
        let rx = wait_in_background(child.pid);
        let err = child.release().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOEXEC));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(rx).unwrap(), 127);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn dropped_gate_ends_the_child_unrun() {
        let child = spawn_gated(&["/bin/sh".into(), "-c".into(), "exit 7".into()]).unwrap();
        let rx = wait_in_background(child.pid);
        drop(child);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(rx).unwrap(), 127);
    }
}
