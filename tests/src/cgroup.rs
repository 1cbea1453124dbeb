//! Memory-limited cgroups, for tests that run a fixture out of memory: a
//! [`MemoryCgroup`] is a fresh cgroup with a memory limit (and no swap), and
//! dropping it kills what is left inside and removes it.
//!
//! cgroup v2 is used when its hierarchy has the memory controller; otherwise
//! the v1 memory hierarchy (a hybrid machine has a v2 mount without it). The
//! new cgroup goes under the test's own cgroup when that can hold it, so it
//! stays inside whatever limits the test runs under; otherwise under the root
//! of the hierarchy (in v2 a cgroup that has processes cannot give its
//! children controllers, so that is the usual case there). Needs root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Which cgroup hierarchy a [`MemoryCgroup`] lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A fresh memory-limited cgroup, removed on drop (after SIGKILLing whatever
/// still runs in it).
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    version: Version,
}

/// How long drop waits for killed processes to leave the cgroup.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl MemoryCgroup {
    /// Makes a cgroup named `<name_prefix>-<pid>-<n>` whose processes may
    /// use at most `limit_bytes` of memory, swap included, with the OOM
    /// killer enabled: a process that needs more is SIGKILLed.
    pub fn create(name_prefix: &str, limit_bytes: u64) -> Result<MemoryCgroup, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{name_prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mounts = fs::read_to_string("/proc/self/mounts")
            .map_err(|err| format!("cannot read /proc/self/mounts: {err}"))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|err| format!("cannot read /proc/self/cgroup: {err}"))?;

        let (version, parent) = if let Some(root) = v2_root_with_memory(&mounts) {
            let own = own_cgroup(&own, Version::V2);
            (Version::V2, v2_parent(&root, own.as_deref())?)
        } else if let Some(root) = mount_point(&mounts, |fstype, options| {
            fstype == "cgroup" && options.split(',').any(|o| o == "memory")
        }) {
            let own = own_cgroup(&own, Version::V1);
            (Version::V1, v1_parent(&root, own.as_deref()))
        } else {
            return Err(
                "no memory cgroup controller: neither a cgroup v2 hierarchy with `memory` \
                 in cgroup.controllers nor a cgroup v1 memory hierarchy is mounted"
                    .to_owned(),
            );
        };

        let dir = parent.join(&name);
        fs::create_dir(&dir)
            .map_err(|err| format!("cannot create cgroup {}: {err}", dir.display()))?;
        // From here on, drop removes the directory if a limit cannot be set.
        let cgroup = MemoryCgroup { dir, version };
        cgroup.set_limit(limit_bytes)?;
        Ok(cgroup)
    }

    fn set_limit(&self, limit_bytes: u64) -> Result<(), String> {
        let limit = limit_bytes.to_string();
        match self.version {
            Version::V2 => {
                self.write("memory.max", &limit)?;
                // Absent without swap accounting; then there is no swap to use.
                if self.dir.join("memory.swap.max").exists() {
                    self.write("memory.swap.max", "0")?;
                }
            }
            Version::V1 => {
                // memsw (memory + swap) may never be below the memory limit,
                // so the memory limit goes first.
                self.write("memory.limit_in_bytes", &limit)?;
                if self.dir.join("memory.memsw.limit_in_bytes").exists() {
                    self.write("memory.memsw.limit_in_bytes", &limit)?;
                }
                // A v1 child inherits oom_kill_disable from its parent.
                let oom = self.read("memory.oom_control").unwrap_or_default();
                if field(&oom, "oom_kill_disable") == Some(1) {
                    self.write("memory.oom_control", "0")?;
                }
            }
        }
        Ok(())
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its `cgroup.procs`: writing a pid there moves that process in (a
    /// shell can move itself with `echo $$ > PROCS` before exec'ing).
    pub fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Moves process `pid` into the cgroup. Its children follow it; memory
    /// it was charged for before stays charged where it was.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The processes in the cgroup now.
    pub fn procs(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// How many processes the OOM killer has killed in this cgroup (v2
    /// `memory.events`, v1 `memory.oom_control`), if the kernel says.
    pub fn oom_kills(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        field(&self.read(file).ok()?, "oom_kill")
    }

    fn read(&self, file: &str) -> io::Result<String> {
        fs::read_to_string(self.dir.join(file))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        fs::write(&path, value)
            .map_err(|err| format!("cannot write {value:?} to {}: {err}", path.display()))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let procs = self.procs();
            if procs.is_empty() && fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "warning: cannot remove cgroup {} (processes still in it: {procs:?})",
                    self.dir.display()
                );
                return;
            }
            for pid in procs {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill has no memory-safety preconditions; the
                    // pid was in this test's own cgroup a moment ago.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The number after `name` on a `name value` line (the format of
/// `memory.events` and `memory.oom_control`).
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// Where the first filesystem of /proc/self/mounts for which
/// `wanted(fstype, options)` holds is mounted.
fn mount_point(mounts: &str, wanted: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, dir, fstype, options, ..] if wanted(fstype, options) => {
                Some(PathBuf::from(dir.replace("\\040", " ")))
            }
            _ => None,
        }
    })
}

/// The cgroup v2 mount, if its root has the memory controller.
fn v2_root_with_memory(mounts: &str) -> Option<PathBuf> {
    let root = mount_point(mounts, |fstype, _| fstype == "cgroup2")?;
    has_controller(&root.join("cgroup.controllers"), "memory").then_some(root)
}

fn has_controller(file: &Path, controller: &str) -> bool {
    fs::read_to_string(file).is_ok_and(|s| s.split_whitespace().any(|c| c == controller))
}

/// This process's cgroup in the hierarchy of `version`, relative to the
/// hierarchy's root, from /proc/self/cgroup (`id:controllers:path` lines;
/// v2's is `0::path`).
fn own_cgroup(proc_self_cgroup: &str, version: Version) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        wanted.then(|| path.trim_start_matches('/').to_owned())
    })
}

/// The v2 cgroup to create ours under: the own cgroup if it can give its
/// children the memory controller, else the root. Enables memory in the
/// parent's `cgroup.subtree_control` when it is not yet.
fn v2_parent(root: &Path, own: Option<&str>) -> Result<PathBuf, String> {
    let own = own.filter(|p| !p.is_empty()).map(|p| root.join(p));
    let mut last_err = String::new();
    for parent in own.into_iter().chain([root.to_owned()]) {
        let subtree = parent.join("cgroup.subtree_control");
        if has_controller(&subtree, "memory") {
            return Ok(parent);
        }
        if !has_controller(&parent.join("cgroup.controllers"), "memory") {
            continue;
        }
        match fs::write(&subtree, "+memory") {
            Ok(()) => return Ok(parent),
            // EBUSY when the cgroup has processes of its own: try the root.
            Err(err) => {
                last_err = format!("cannot write \"+memory\" to {}: {err}", subtree.display())
            }
        }
    }
    Err(format!(
        "no cgroup v2 parent can delegate the memory controller: {last_err}"
    ))
}

/// The v1 memory cgroup to create ours under: the own one if it is there
/// (v1 children share their parent's limits), else the root.
fn v1_parent(root: &Path, own: Option<&str>) -> PathBuf {
    own.filter(|p| !p.is_empty())
        .map(|p| root.join(p))
        .filter(|dir| dir.join("cgroup.procs").is_file())
        .unwrap_or_else(|| root.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    #[test]
    fn parses_proc_files() {
        let cgroup = "9:name=systemd:/\n4:memory:/a/b\n0::/c\n";
        assert_eq!(own_cgroup(cgroup, Version::V1).as_deref(), Some("a/b"));
        assert_eq!(own_cgroup(cgroup, Version::V2).as_deref(), Some("c"));
        let mounts = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            mount_point(mounts, |t, _| t == "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point(mounts, |t, o| t == "cgroup" && o.contains("memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(field(oom, "oom_kill"), Some(3));
        assert_eq!(field(oom, "oom_kill_disable"), Some(0));
        assert_eq!(field(oom, "missing"), None);
    }

    /// mem_fixture's hog mode wants 512 MiB; in a 64 MiB cgroup the OOM
    /// killer must SIGKILL it, and the cgroup must count the kill.
    #[test]
    fn hog_is_oom_killed_in_a_small_cgroup() {
        if !crate::require_root() {
            return;
        }
        let cgroup = MemoryCgroup::create("memtrace-test-oom", 64 << 20)
            .unwrap_or_else(|err| panic!("cannot make a memory cgroup: {err}"));
        let fixture = crate::fixture("mem_fixture");
        let mut child = Command::new("sh")
            .args(["-c", r#"echo $$ > "$1" && exec "$2" hog 512"#, "sh"])
            .arg(cgroup.procs_path())
            .arg(&fixture)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run sh: {err}"));
        let deadline = Instant::now() + crate::LINE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    panic!(
                        "`mem_fixture hog 512` was neither killed nor done after {:?} \
                         in cgroup {}",
                        crate::LINE_TIMEOUT,
                        cgroup.path().display()
                    );
                }
                Err(err) => panic!("cannot wait for `mem_fixture hog 512`: {err}"),
            }
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "`mem_fixture hog 512` in a 64 MiB cgroup ({}) exited with {status}, \
             not by the OOM killer's SIGKILL",
            cgroup.path().display()
        );
        let kills = cgroup.oom_kills();
        assert!(
            kills.is_some_and(|k| k >= 1),
            "cgroup {} counts {kills:?} OOM kills after its hog was SIGKILLed",
            cgroup.path().display()
        );
    }
}
