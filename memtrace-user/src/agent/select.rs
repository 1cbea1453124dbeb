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
    /// Its cgroup, as labels show it: the unified (v2) path, or on a hybrid
    /// host where that is the root, the v1 memory controller's; `/` if none.
    pub cgroup: String,
    /// Every distinct cgroup path it has, one per hierarchy (selection
    /// matches any).
    pub cgroups: Vec<String>,
    /// The container id in the cgroup path (64 hex digits of Docker,
    /// containerd, CRI-O, Podman), if any.
    pub container: Option<String>,
}

impl Identity {
    /// Reads process `pid`'s identity; `None` if it is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let contents = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cgroups = cgroup_paths(&contents);
        let container = std::iter::once(cgroup_path(&contents))
            .chain(cgroups.iter().cloned())
            .find_map(|p| container_id(&p));
        Some(Self {
            comm: comm.trim_end().to_string(),
            cgroup: cgroup_path(&contents),
            cgroups,
            container,
        })
    }
}

/// The cgroup path in the contents of `/proc/PID/cgroup` that labels a
/// process: the unified (v2) hierarchy's `0::PATH`, unless it is the root
/// and the v1 memory controller has a path (a hybrid host), then that.
pub fn cgroup_path(contents: &str) -> String {
    let (mut v2, mut memory) = (None, None);
    for (id, controllers, path) in lines(contents) {
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            memory = Some(path);
        }
    }
    match (v2, memory) {
        (Some("/"), Some(m)) => m.to_string(),
        (Some(v2), _) => v2.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => "/".into(),
    }
}

/// Every distinct path in `/proc/PID/cgroup`.
pub fn cgroup_paths(contents: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, _, path) in lines(contents) {
        if !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    out
}

/// `id:controllers:path` lines.
fn lines(contents: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    contents.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ':');
        Some((parts.next()?, parts.next()?, parts.next()?))
    })
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
    /// Whether process `pid`, called `id`, is selected.
    pub fn matches(&self, pid: u32, id: &Identity) -> bool {
        self.pids.contains(&pid)
            || self.comm.as_ref().is_some_and(|r| r.is_match(&id.comm))
            || self
                .cgroups
                .iter()
                .any(|c| under(&id.cgroup, c) || id.cgroups.iter().any(|path| under(path, c)))
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
    fn cgroup_paths_are_read() {
        assert_eq!(
            cgroup_path("0::/system.slice/nginx.service\n"),
            "/system.slice/nginx.service"
        );
        assert_eq!(
            cgroup_path("12:cpu,cpuacct:/a\n11:memory:/docker/x\n"),
            "/docker/x"
        );
        assert_eq!(cgroup_path(""), "/");
        // A hybrid host: the unified hierarchy's root says nothing.
        let hybrid = "4:memory:/process_api/x\n1:cpu:/\n0::/\n";
        assert_eq!(cgroup_path(hybrid), "/process_api/x");
        assert_eq!(cgroup_paths(hybrid), ["/process_api/x", "/"]);
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
            cgroups: vec![cgroup.into()],
            container: None,
        };
        assert!(s.matches(1, &id("postgres", "/")));
        assert!(!s.matches(1, &id("postgresql", "/")));
        assert!(s.matches(1, &id("x", "/system.slice/app.service/sub")));
        assert!(!s.matches(1, &id("x", "/system.slice/app.service2")));
        assert!(s.matches(7, &id("x", "/")));
    }
}
