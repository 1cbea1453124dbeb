//! The agent's pprof profiles: one per sampled process per period, written
//! to a bounded directory (the oldest files go first past a byte or file
//! limit) and, with `--push`, sent to a Pyroscope-compatible `/ingest`
//! endpoint.
//!
//! Each profile is a Go-style heap profile (`alloc_objects`, `alloc_space`,
//! `inuse_objects`, `inuse_space`) of the sampled tier's estimates, built by
//! `report::pprof` with the period (the mean sample interval) and labels
//! (host, cgroup, container) on every sample. Not here: the estimates
//! (`estimate`), symbolization (`symbolize`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::report::pprof::{self, Kind, Meta};
use crate::report::{Sample, View};

/// Files written here start with this (rotation touches no other file).
const PREFIX: &str = "memtrace-";

/// One process's profile, encoded.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Heap (the sampled tier) or page faults (the always-on tier).
    pub kind: Kind,
    /// Process id.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Labels (pid and comm first).
    pub labels: Vec<(String, String)>,
    /// Start and end of the period, seconds since the Unix epoch.
    pub from_s: u64,
    /// End of the period.
    pub until_s: u64,
    /// The gzipped pprof bytes.
    pub bytes: Vec<u8>,
}

impl Profile {
    /// Encodes `samples` (one process's) of `kind` with `labels` and period
    /// `period`.
    #[expect(clippy::too_many_arguments, reason = "one profile's every part, named")]
    pub fn encode(
        kind: Kind,
        pid: u32,
        comm: &str,
        samples: &[Sample],
        labels: Vec<(String, String)>,
        period: u64,
        from_s: u64,
        until_s: u64,
    ) -> io::Result<Self> {
        let mut bytes = Vec::new();
        let meta = Meta {
            kind,
            period: period as i64,
            labels: labels.clone(),
            time_nanos: (from_s as i64).saturating_mul(1_000_000_000),
        };
        let duration = until_s.saturating_sub(from_s) as f64;
        pprof::render_with(samples, View::Leaks, duration, &meta, &mut bytes)?;
        let mut all = vec![
            ("pid".to_string(), pid.to_string()),
            ("comm".to_string(), comm.to_string()),
        ];
        all.extend(labels);
        Ok(Self {
            kind,
            pid,
            comm: comm.to_string(),
            labels: all,
            from_s,
            until_s,
            bytes,
        })
    }

    /// Its file name: `memtrace-COMM-PID-UNTIL.pb.gz`, or
    /// `memtrace-faults-COMM-PID-UNTIL.pb.gz`.
    pub fn file_name(&self) -> String {
        let comm: String = self
            .comm
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let kind = match self.kind {
            Kind::Heap => "",
            Kind::Faults => "faults-",
        };
        format!("{PREFIX}{kind}{comm}-{}-{}.pb.gz", self.pid, self.until_s)
    }
}

/// Counts of what happened to profiles, shared with push tasks.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Written to the directory.
    pub written: AtomicU64,
    /// Not written (an I/O error).
    pub write_failed: AtomicU64,
    /// Pushed and accepted.
    pub pushed: AtomicU64,
    /// Push refused or failed.
    pub push_failed: AtomicU64,
}

impl Outcomes {
    /// The four counts, in that order.
    pub fn get(&self) -> [u64; 4] {
        [
            self.written.load(Ordering::Relaxed),
            self.write_failed.load(Ordering::Relaxed),
            self.pushed.load(Ordering::Relaxed),
            self.push_failed.load(Ordering::Relaxed),
        ]
    }
}

/// Where profiles go.
pub struct Sink {
    dir: Option<PathBuf>,
    max_bytes: u64,
    max_files: usize,
    push: Option<(reqwest::Client, String, String)>,
    /// What happened to them.
    pub outcomes: Arc<Outcomes>,
}

impl Sink {
    /// Profiles into `dir` (created if missing), kept to `max_bytes` and
    /// `max_files`; pushed to `push` under application name `app`.
    pub fn new(
        dir: Option<PathBuf>,
        max_bytes: u64,
        max_files: usize,
        push: Option<String>,
        app: String,
    ) -> io::Result<Self> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        let push = match push {
            Some(url) => {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .map_err(io::Error::other)?;
                Some((client, url.trim_end_matches('/').to_string(), app))
            }
            None => None,
        };
        Ok(Self {
            dir,
            max_bytes,
            max_files,
            push,
            outcomes: Arc::default(),
        })
    }

    /// Writes `p` and rotates the directory; pushes it in the background.
    pub fn deliver(&self, p: Profile) {
        if let Some(dir) = &self.dir {
            let path = dir.join(p.file_name());
            match write_new(&path, &p.bytes)
                .and_then(|()| rotate(dir, self.max_bytes, self.max_files))
            {
                Ok(()) => {
                    self.outcomes.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.outcomes.write_failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "memtrace agent: cannot write the profile {}: {e}",
                        path.display()
                    );
                }
            }
        }
        if let Some((client, url, app)) = &self.push {
            let request = client.post(ingest_url(url, app, &p)).multipart(
                reqwest::multipart::Form::new().part(
                    "profile",
                    reqwest::multipart::Part::bytes(p.bytes).file_name("profile.pprof"),
                ),
            );
            let outcomes = Arc::clone(&self.outcomes);
            tokio::spawn(async move {
                match request.send().await.and_then(|r| r.error_for_status()) {
                    Ok(_) => outcomes.pushed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("memtrace agent: pushing a profile failed: {e}");
                        outcomes.push_failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            });
        }
    }
}

/// The `/ingest` URL of a profile: `name` is `APP{key=value,...}`, as
/// Pyroscope's ingest API takes application names with labels.
pub fn ingest_url(base: &str, app: &str, p: &Profile) -> String {
    let labels: Vec<String> = p
        .labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", label_value(v)))
        .collect();
    let name = format!("{app}{{{}}}", labels.join(","));
    format!(
        "{base}/ingest?name={}&from={}&until={}&format=pprof&spyName=memtrace",
        percent_encode(&name),
        p.from_s,
        p.until_s.max(p.from_s + 1)
    )
}

/// A label value in the characters application names allow.
fn label_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-./".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Creates `path` (mode 0600) with `bytes`, through a temporary name so
/// that a reader never sees half a file.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// Removes the oldest of memtrace's profiles in `dir` until at most
/// `max_files` remain, holding at most `max_bytes`.
pub fn rotate(dir: &Path, max_bytes: u64, max_files: usize) -> io::Result<()> {
    let mut files: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(PREFIX) && name.ends_with(".pb.gz")) {
            continue;
        }
        let meta = entry.metadata()?;
        files.push((meta.modified()?, name, meta.len()));
    }
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    let mut count = files.len();
    for (_, name, len) in files {
        if count <= max_files && total <= max_bytes {
            break;
        }
        std::fs::remove_file(dir.join(&name))?;
        total -= len;
        count -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(pid: u32, until: u64) -> Profile {
        Profile::encode(
            Kind::Heap,
            pid,
            "my app",
            &[],
            vec![("cgroup".into(), "/system.slice/a b.service".into())],
            512 * 1024,
            until - 60,
            until,
        )
        .unwrap()
    }

    #[test]
    fn names_and_urls() {
        let p = profile(42, 1_000_060);
        assert_eq!(p.file_name(), "memtrace-my_app-42-1000060.pb.gz");
        let url = ingest_url("http://127.0.0.1:4040", "memtrace", &p);
        assert_eq!(
            url,
            "http://127.0.0.1:4040/ingest?name=memtrace%7Bpid%3D42%2Ccomm%3Dmy_app%2Ccgroup%3D%2Fsystem.slice%2Fa_b.service%7D&from=1000000&until=1000060&format=pprof&spyName=memtrace"
        );
    }

    #[test]
    fn rotation_keeps_the_newest_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            let p = profile(1, 2_000_000 + i);
            write_new(&dir.path().join(p.file_name()), &[0u8; 100]).unwrap();
            // Distinct modification times, oldest first.
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + i);
            let f = std::fs::File::options()
                .write(true)
                .open(dir.path().join(p.file_name()))
                .unwrap();
            f.set_modified(t).unwrap();
        }
        std::fs::write(dir.path().join("other.txt"), b"not ours").unwrap();
        rotate(dir.path(), 10_000, 3).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "memtrace-my_app-1-2000002.pb.gz",
                "memtrace-my_app-1-2000003.pb.gz",
                "memtrace-my_app-1-2000004.pb.gz",
                "other.txt"
            ]
        );
        rotate(dir.path(), 150, 10).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
