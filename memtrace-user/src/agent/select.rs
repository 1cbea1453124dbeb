//! Which processes the agent samples from the start (`--comm`, `--cgroup`,
//! `--pid`), and what each process is called in metrics and profiles: its
//! command name, cgroup path and, where the path shows one, its container
//! id.
//!
//! The parsing is pure ([`cgroup_path`], [`container_id`], [`Selector`]);
//! [`Identity::read`] reads `/proc`. Not here: escalation (`escalate`).

use regex::Regex;

/// What a process is called.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    /// Its cgroup (v2 path, or the v1 memory controller's), `/` if none.
    pub cgroup: String,
    /// The container id in the cgroup path (64 hex digits of Docker,
    /// containerd, CRI-O, Podman), if any.
    pub container: Option<String>,
}

impl Identity {
    /// Reads process `pid`'s identity; `None` if it is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|c| cgroup_path(&c))
            .unwrap_or_else(|_| "/".into());
        let container = container_id(&cgroup);
        Some(Self {
            comm: comm.trim_end().to_string(),
            cgroup,
            container,
        })
    }
}

/// The cgroup path in the contents of `/proc/PID/cgroup`: the unified
/// (v2) hierarchy's `0::PATH`, else the v1 memory controller's.
pub fn cgroup_path(contents: &str) -> String {
    let mut v1 = None;
    for line in contents.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            return path.to_string();
        }
        if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    v1.unwrap_or_else(|| "/".into())
}

/// The container id in a cgroup path: the last run of 64 hex digits in a
/// path component (`docker-ID.scope`, `cri-containerd-ID.scope`,
/// `crio-ID.scope`, `libpod-ID.scope`, `/docker/ID`, `/kubepods/.../ID`).
pub fn container_id(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|component| {
        let bytes = component.as_bytes();
        (0..bytes.len().saturating_sub(63)).rev().find_map(|i| {
            let run = &bytes[i..i + 64];
            let bounded = |j: Option<&u8>| j.is_none_or(|b| !b.is_ascii_hexdigit());
            (run.iter().all(u8::is_ascii_hexdigit)
                && bounded(i.checked_sub(1).and_then(|j| bytes.get(j)))
                && bounded(bytes.get(i + 64)))
            .then(|| component[i..i + 64].to_string())
        })
    })
}

/// The processes sampled from the start.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// Command names matching this.
    pub comm: Option<Regex>,
    /// Processes in these cgroups or below.
    pub cgroups: Vec<String>,
    /// These processes.
    pub pids: Vec<u32>,
}

impl Selector {
    /// Whether nothing is selected (only escalation samples).
    pub fn is_empty(&self) -> bool {
        self.comm.is_none() && self.cgroups.is_empty() && self.pids.is_empty()
    }

    /// Whether process `pid`, called `id`, is selected.
    pub fn matches(&self, pid: u32, id: &Identity) -> bool {
        self.pids.contains(&pid)
            || self.comm.as_ref().is_some_and(|r| r.is_match(&id.comm))
            || self.cgroups.iter().any(|c| under(&id.cgroup, c))
    }
}

/// Whether cgroup `path` is `parent` or below it.
fn under(path: &str, parent: &str) -> bool {
    let parent = parent.trim_end_matches('/');
    parent.is_empty()
        || path == parent
        || path
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c0a4b9e2d8c7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";

    #[test]
    fn cgroup_paths() {
        assert_eq!(
            cgroup_path("0::/system.slice/nginx.service\n"),
            "/system.slice/nginx.service"
        );
        assert_eq!(
            cgroup_path("12:cpu,cpuacct:/a\n11:memory:/docker/x\n"),
            "/docker/x"
        );
        assert_eq!(cgroup_path(""), "/");
    }

    #[test]
    fn container_ids() {
        let docker = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(container_id(&docker).as_deref(), Some(ID));
        let k8s = format!("/kubepods.slice/kubepods-burstable.slice/cri-containerd-{ID}.scope");
        assert_eq!(container_id(&k8s).as_deref(), Some(ID));
        assert_eq!(container_id(&format!("/docker/{ID}")).as_deref(), Some(ID));
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        // 65 hex digits are not an id.
        assert_eq!(container_id(&format!("/x/{ID}a")), None);
    }

    #[test]
    fn selection() {
        let s = Selector {
            comm: Some(Regex::new("^post(gres|master)$").unwrap()),
            cgroups: vec!["/system.slice/app.service".into()],
            pids: vec![7],
        };
        let id = |comm: &str, cgroup: &str| Identity {
            comm: comm.into(),
            cgroup: cgroup.into(),
            container: None,
        };
        assert!(s.matches(1, &id("postgres", "/")));
        assert!(!s.matches(1, &id("postgresql", "/")));
        assert!(s.matches(1, &id("x", "/system.slice/app.service/sub")));
        assert!(!s.matches(1, &id("x", "/system.slice/app.service2")));
        assert!(s.matches(7, &id("x", "/")));
        assert!(Selector::default().is_empty());
    }
}
