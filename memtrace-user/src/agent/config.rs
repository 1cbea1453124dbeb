//! `memtrace agent`'s settings: the command line, a TOML file
//! (`--config`) with the same keys, and their defaults, resolved into one
//! [`Config`] (the command line wins over the file). Pure apart from reading
//! the file; validated here, so the agent starts only with settings that make
//! sense.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Runs on every process of the host until stopped: kernel tracepoints for
/// all, sampled allocator tracing for the selected processes and for those
/// whose memory grows; Prometheus metrics on --listen and pprof profiles
/// every --profile-period.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// A TOML file with these settings (keys as the long options, with
    /// underscores); options given here win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Sample the allocations of processes whose command name matches this
    /// regular expression.
    #[arg(long, value_name = "REGEX")]
    pub comm: Option<String>,
    /// Sample the allocations of processes in this cgroup or below (a path
    /// as in /proc/PID/cgroup; repeat for several).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<String>,
    /// Sample the allocations of this process (repeat for several).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Mean bytes between two allocation samples [default: 512KiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub sample_bytes: Option<u64>,
    /// Where to serve Prometheus metrics, or `off` [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Seconds between two pprof profiles of each sampled process [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub profile_period: Option<f64>,
    /// Directory of the profiles, or `off` [default: /var/lib/memtrace/profiles].
    #[arg(long, value_name = "DIR")]
    pub profile_dir: Option<PathBuf>,
    /// Most bytes of profiles kept there; the oldest go first [default: 256MiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub profile_max_bytes: Option<u64>,
    /// Most profile files kept there [default: 1000].
    #[arg(long, value_name = "N")]
    pub profile_max_files: Option<usize>,
    /// Push each profile to this Pyroscope-compatible server
    /// (`http://host:4040`; `/ingest` is added).
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// The application name pushed profiles carry [default: memtrace].
    #[arg(long, value_name = "NAME")]
    pub push_app: Option<String>,
    /// Processes with their own series in metrics; the others add up in
    /// `pid="other"` [default: 20].
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    /// Sample a process whose RSS grows this many bytes per second over the
    /// slope window (0: never) [default: 1MiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub escalate_slope: Option<u64>,
    /// Sample a process whose RSS grows past this many bytes (0: never)
    /// [default: 0].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub escalate_rss: Option<u64>,
    /// Seconds of RSS history the slope is fitted over [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub escalate_window: Option<f64>,
    /// Seconds a sampled process must grow slower than a quarter of the
    /// slope before it backs off [default: 120].
    #[arg(long, value_name = "SECONDS")]
    pub calm: Option<f64>,
    /// Seconds between two looks at every process's RSS [default: 5].
    #[arg(long, value_name = "SECONDS")]
    pub check_interval: Option<f64>,
    /// Most processes sampled by escalation at once [default: 8].
    #[arg(long, value_name = "N")]
    pub max_escalated: Option<usize>,
    /// Most sampled blocks tracked live, host-wide [default: 262144].
    #[arg(long, value_name = "N")]
    pub max_live: Option<u32>,
    /// Most stacks kept per sampled process [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_stacks: Option<usize>,
    /// Most processes tracked [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_processes: Option<usize>,
    /// Most samples one process may send per second [default: 2000].
    #[arg(long, value_name = "N")]
    pub budget: Option<u64>,
    /// Take the user stack of one page fault in N [default: 32].
    #[arg(long, value_name = "N")]
    pub fault_sample: Option<u32>,
    /// Ring buffer size, MiB, a power of two [default: 16].
    #[arg(long, value_name = "MIB")]
    pub ringbuf_size: Option<u32>,
    /// Do not trace kernel memory (slab, pages, per-CPU): that tier runs a
    /// program on every kernel free on the host.
    #[arg(long)]
    pub no_kernel: bool,
    /// Use entry and return probes even where the kernel has uprobe
    /// sessions (every sampled-process call then pays two traps).
    #[arg(long)]
    pub no_sessions: bool,
    /// Stop after this many seconds (tests, benchmarks) [default: until
    /// SIGINT or SIGTERM].
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<f64>,
}

/// The same settings from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    comm: Option<String>,
    cgroup: Option<Vec<String>>,
    pid: Option<Vec<u32>>,
    sample_bytes: Option<ByteSize>,
    listen: Option<String>,
    profile_period: Option<f64>,
    profile_dir: Option<PathBuf>,
    profile_max_bytes: Option<ByteSize>,
    profile_max_files: Option<usize>,
    push: Option<String>,
    push_app: Option<String>,
    top: Option<usize>,
    escalate_slope: Option<ByteSize>,
    escalate_rss: Option<ByteSize>,
    escalate_window: Option<f64>,
    calm: Option<f64>,
    check_interval: Option<f64>,
    max_escalated: Option<usize>,
    max_live: Option<u32>,
    max_stacks: Option<usize>,
    max_processes: Option<usize>,
    budget: Option<u64>,
    fault_sample: Option<u32>,
    ringbuf_size: Option<u32>,
    kernel: Option<bool>,
    sessions: Option<bool>,
    duration: Option<f64>,
}

/// A size in a file: a number of bytes or a string like `"512KiB"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "toml::Value")]
struct ByteSize(u64);

impl TryFrom<toml::Value> for ByteSize {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(n) if n >= 0 => Ok(Self(n as u64)),
            toml::Value::String(s) => parse_bytes(&s).map(Self),
            other => Err(format!(
                "expected bytes, a number or a string like \"512KiB\", not {}",
                other.type_str()
            )),
        }
    }
}

/// Parses `4096`, `512K`, `512KiB`, `16M`, `1GiB` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 4096, 512KiB, 16MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}`: unknown unit (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Every setting, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `--comm`.
    pub comm: Option<String>,
    /// `--cgroup`.
    pub cgroups: Vec<String>,
    /// `--pid`.
    pub pids: Vec<u32>,
    /// Mean bytes between samples.
    pub sample_bytes: u64,
    /// Metrics listener, if on.
    pub listen: Option<SocketAddr>,
    /// Seconds between profiles.
    pub profile_period: f64,
    /// Profile directory, if on.
    pub profile_dir: Option<PathBuf>,
    /// Bytes of profiles kept.
    pub profile_max_bytes: u64,
    /// Profile files kept.
    pub profile_max_files: usize,
    /// Push URL.
    pub push: Option<String>,
    /// Pushed application name.
    pub push_app: String,
    /// Processes with their own series.
    pub top: usize,
    /// Escalation slope, bytes/s.
    pub escalate_slope: u64,
    /// Escalation threshold, bytes.
    pub escalate_rss: u64,
    /// Slope window, s.
    pub escalate_window: f64,
    /// Calm before back-off, s.
    pub calm: f64,
    /// RSS check interval, s.
    pub check_interval: f64,
    /// Most escalated processes.
    pub max_escalated: usize,
    /// Most live samples.
    pub max_live: u32,
    /// Most stacks per process.
    pub max_stacks: usize,
    /// Most processes.
    pub max_processes: usize,
    /// Samples per second per process.
    pub budget: u64,
    /// Page-fault stack sampling.
    pub fault_sample: u32,
    /// Ring buffer MiB.
    pub ringbuf_size: u32,
    /// Kernel-memory tier on.
    pub kernel: bool,
    /// Uprobe sessions tried.
    pub sessions: bool,
    /// Stop after, s.
    pub duration: Option<f64>,
}

impl Config {
    /// Resolves `args` over the file it names (if any) over the defaults.
    pub fn resolve(args: &AgentArgs) -> Result<Self, String> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Resolves `args` over the TOML text `toml` (for tests).
    pub fn from_toml(args: &AgentArgs, toml: &str) -> Result<Self, String> {
        let file: FileConfig = toml::from_str(toml).map_err(|e| e.to_string())?;
        Self::merge(args, file)
    }

    fn merge(a: &AgentArgs, f: FileConfig) -> Result<Self, String> {
        let listen = a
            .listen
            .clone()
            .or(f.listen)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let listen =
            if listen == "off" {
                None
            } else {
                Some(listen.parse().map_err(|_| {
                    format!("--listen {listen}: not an address like 127.0.0.1:9464")
                })?)
            };
        let profile_dir = a
            .profile_dir
            .clone()
            .or(f.profile_dir)
            .unwrap_or_else(|| "/var/lib/memtrace/profiles".into());
        let profile_dir = (profile_dir != Path::new("off")).then_some(profile_dir);
        let bytes = |cli: Option<u64>, file: Option<ByteSize>, default: u64| {
            cli.or(file.map(|b| b.0)).unwrap_or(default)
        };
        let c = Self {
            comm: a.comm.clone().or(f.comm),
            cgroups: if a.cgroup.is_empty() {
                f.cgroup.unwrap_or_default()
            } else {
                a.cgroup.clone()
            },
            pids: if a.pids.is_empty() {
                f.pid.unwrap_or_default()
            } else {
                a.pids.clone()
            },
            sample_bytes: bytes(a.sample_bytes, f.sample_bytes, 512 << 10),
            listen,
            profile_period: a.profile_period.or(f.profile_period).unwrap_or(60.0),
            profile_dir,
            profile_max_bytes: bytes(a.profile_max_bytes, f.profile_max_bytes, 256 << 20),
            profile_max_files: a.profile_max_files.or(f.profile_max_files).unwrap_or(1000),
            push: a.push.clone().or(f.push),
            push_app: a
                .push_app
                .clone()
                .or(f.push_app)
                .unwrap_or_else(|| "memtrace".into()),
            top: a.top.or(f.top).unwrap_or(20),
            escalate_slope: bytes(a.escalate_slope, f.escalate_slope, 1 << 20),
            escalate_rss: bytes(a.escalate_rss, f.escalate_rss, 0),
            escalate_window: a.escalate_window.or(f.escalate_window).unwrap_or(60.0),
            calm: a.calm.or(f.calm).unwrap_or(120.0),
            check_interval: a.check_interval.or(f.check_interval).unwrap_or(5.0),
            max_escalated: a.max_escalated.or(f.max_escalated).unwrap_or(8),
            max_live: a.max_live.or(f.max_live).unwrap_or(1 << 18),
            max_stacks: a.max_stacks.or(f.max_stacks).unwrap_or(4096),
            max_processes: a.max_processes.or(f.max_processes).unwrap_or(4096),
            budget: a.budget.or(f.budget).unwrap_or(2000),
            fault_sample: a.fault_sample.or(f.fault_sample).unwrap_or(32),
            ringbuf_size: a.ringbuf_size.or(f.ringbuf_size).unwrap_or(16),
            kernel: !a.no_kernel && f.kernel.unwrap_or(true),
            sessions: !a.no_sessions && f.sessions.unwrap_or(true),
            duration: a.duration.or(f.duration),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if self.sample_bytes == 0 {
            return Err("--sample-bytes must be at least 1".into());
        }
        if let Some(r) = &self.comm {
            regex::Regex::new(r).map_err(|e| format!("--comm {r}: {e}"))?;
        }
        let positive = [
            ("--profile-period", self.profile_period),
            ("--escalate-window", self.escalate_window),
            ("--check-interval", self.check_interval),
        ];
        for (name, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{name} must be a positive number of seconds"));
            }
        }
        if self.calm.is_nan() || self.calm < 0.0 {
            return Err("--calm must be a number of seconds".into());
        }
        if self.duration.is_some_and(|d| d.is_nan() || d <= 0.0) {
            return Err("--duration must be positive".into());
        }
        if !self.ringbuf_size.is_power_of_two() || self.ringbuf_size > 1024 {
            return Err("--ringbuf-size must be a power of two, in MiB, at most 1024".into());
        }
        if self.fault_sample == 0 || self.max_live == 0 || self.max_stacks == 0 {
            return Err("--fault-sample, --max-live and --max-stacks must be at least 1".into());
        }
        if let Some(url) = &self.push
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("--push {url}: expected an http:// URL"));
        }
        if self
            .push
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
        {
            return Err(
                "--push: https is not built in; push through a local proxy, or to http://".into(),
            );
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::resolve(&AgentArgs::default()).unwrap();
        assert_eq!(c.sample_bytes, 512 * 1024);
        assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.profile_period, 60.0);
        assert!(c.kernel && c.sessions);
    }

    #[test]
    fn command_line_wins_over_the_file() {
        let args = AgentArgs {
            sample_bytes: Some(4096),
            no_kernel: true,
            ..AgentArgs::default()
        };
        let c = Config::from_toml(
            &args,
            r#"
            sample_bytes = "1MiB"
            comm = "^nginx$"
            cgroup = ["/system.slice"]
            listen = "off"
            escalate_rss = "2GiB"
            profile_dir = "/tmp/p"
            kernel = true
            "#,
        )
        .unwrap();
        assert_eq!(c.sample_bytes, 4096);
        assert_eq!(c.comm.as_deref(), Some("^nginx$"));
        assert_eq!(c.cgroups, ["/system.slice"]);
        assert_eq!(c.listen, None);
        assert_eq!(c.escalate_rss, 2 << 30);
        assert_eq!(c.profile_dir.as_deref(), Some(Path::new("/tmp/p")));
        assert!(!c.kernel);
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = |toml: &str| Config::from_toml(&AgentArgs::default(), toml).unwrap_err();
        assert!(bad("sample_bytes = 0").contains("sample-bytes"));
        assert!(bad("comm = \"(\"").contains("--comm"));
        assert!(bad("listen = \"nowhere\"").contains("--listen"));
        assert!(bad("no_such_key = 1").contains("no_such_key"));
        assert!(bad("push = \"ftp://x\"").contains("http"));
        assert!(bad("ringbuf_size = 3").contains("power of two"));
    }

    /// The example shipped in deploy/ is valid and says the defaults.
    #[test]
    fn the_deployed_example_parses() {
        let text = include_str!("../../../deploy/agent.toml");
        let c = Config::from_toml(&AgentArgs::default(), text).unwrap();
        assert_eq!(c, Config::resolve(&AgentArgs::default()).unwrap());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("16M"), Ok(16 << 20));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("KiB").is_err());
    }
}
