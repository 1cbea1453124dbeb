//! `memtrace agent`: fleet-wide production tracing, one agent per host,
//! running until stopped.
//!
//! Two tiers. The always-on tier is the kernel tracepoints only (RSS by
//! type, page faults with sampled stacks, mmap/brk, kernel allocations, OOM
//! kills) for every process ([`host`]). The sampled allocator tier probes
//! the allocators of the processes selected (`--comm`, `--cgroup`, `--pid`)
//! and of those whose RSS grows ([`escalate`]), sampling allocations by
//! bytes in eBPF ([`weight`]) and estimating per stack ([`estimate`]).
//! Exact mode never runs here. Out go Prometheus metrics ([`metrics`],
//! [`http`]) and pprof profiles ([`profiles`]).
//!
//! This file is the loop that glues them: read records, apply them, look at
//! RSS every `--check-interval`, write profiles every `--profile-period`,
//! answer scrapes. Each stage is a module of its own, pure where it can be.

pub mod config;
pub mod escalate;
pub mod estimate;
pub mod host;
pub mod http;
pub mod metrics;
pub mod profiles;
pub mod select;
pub mod weight;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use memtrace_common::{Counter, SampleCounter};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::attach::{self, LibKind};
use crate::error::{Result, UserError};
use crate::event::{self, Event};
use crate::load::{CopiedStacks, KernelOptions, ProbeMode, Sampling, Tracer};
use crate::report::pprof::Kind;
use crate::report::{Sample, SelfUsage};
use crate::session::maps_code;
use crate::symbolize::{Frame, Symbolize as _, Symbols};
use crate::target;
use crate::unwind::{self, StackUnwinder};
pub use config::AgentArgs;
use config::Config;
use escalate::{Decision, Escalator, Policy};
use estimate::Estimates;
use host::HostTier;
use select::{Identity, Selector};

/// Records handled between two looks at timers, signals and scrapes.
const BATCH: usize = 16 * 1024;

/// How often the ring buffer is drained without a wakeup.
const POLL: Duration = Duration::from_millis(50);

/// Why a process's allocations are sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// `--comm`, `--cgroup` or `--pid` chose it.
    Selected,
    /// Its RSS grew.
    Escalated,
}

impl Why {
    fn name(self) -> &'static str {
        match self {
            Why::Selected => "selected",
            Why::Escalated => "escalated",
        }
    }
}

/// The agent's state, owned by its loop.
struct Agent {
    cfg: Config,
    tracer: Tracer,
    symbols: Symbols,
    /// Walks the stacks copied for sampled processes without frame
    /// pointers (`--unwind auto`'s choice, per program).
    unwinder: StackUnwinder,
    est: Estimates,
    host: HostTier,
    esc: Escalator,
    selector: Selector,
    ids: HashMap<u32, Identity>,
    sampled: HashMap<u32, Why>,
    /// Every process sampled since the start (the ones that exited too).
    sampled_ever: HashSet<u32>,
    /// Processes found to have no allocator to probe (not tried again).
    unprobeable: HashMap<u32, String>,
    /// Processes first seen since the last check (looked at for selection).
    new_pids: Vec<u32>,
    decode_errors: u64,
    records: u64,
    records_rate: (u64, Instant, f64),
    probe_mode: Option<ProbeMode>,
    escalations: u64,
    backoffs: u64,
    sink: profiles::Sink,
    host_name: String,
    started: Instant,
    /// Start of the current profile period, Unix seconds.
    period_from: u64,
}

fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Agent {
    fn handle(&mut self, bytes: &[u8]) {
        self.records += 1;
        match event::decode(bytes) {
            Ok(mut ev) => {
                // A copied stack: walked here, while the process lives.
                if let Event::Alloc(a) = &mut ev
                    && let Ok(raw) = event::raw_stack(bytes)
                {
                    a.stack = self.unwinder.unwind(a.pid, &raw);
                }
                self.apply(ev)
            }
            Err(_) => self.decode_errors += 1,
        }
    }

    fn apply(&mut self, ev: Event) {
        let pid = ev.pid();
        if let Event::Fork { pid, .. } = &ev {
            // A pid reused: the process known under it is gone.
            self.gone(*pid);
        }
        if pid != 0
            && !self.ids.contains_key(&pid)
            && !matches!(ev, Event::Exit { .. })
            && let Some(id) = Identity::read(pid)
        {
            self.ids.insert(pid, id);
            self.new_pids.push(pid);
            // The kernel side reports RSS as it changes: what it is already
            // comes from /proc.
            for seed in target::resident_now(pid, ev.ts_ns()) {
                self.host.on_event(&seed);
            }
        }
        match &ev {
            Event::Alloc(a) => {
                self.symbols.observe(a.pid, &a.stack);
                self.est.on_event(&ev);
            }
            Event::Free { .. } => self.est.on_event(&ev),
            Event::Exec { pid, comm, .. } => {
                self.host.on_event(&ev);
                let addrs = self.est.drop_live(*pid);
                self.tracer.forget_samples(*pid, &addrs);
                self.symbols.exec(*pid, comm.as_deref());
                if let Some(id) = Identity::read(*pid) {
                    self.ids.insert(*pid, id);
                }
                self.unprobeable.remove(pid);
                // A new program maps other libraries: probe it anew.
                if let Some(why) = self.sampled.get(pid).copied() {
                    self.stop_sampling(*pid);
                    self.start_sampling(*pid, why);
                } else {
                    self.new_pids.push(*pid);
                }
            }
            // A sampled fault's stack: its files opened while it lives.
            Event::Rss(r) if r.sampled && !r.stack.is_empty() => {
                self.symbols.observe(r.pid, &r.stack);
                self.host.on_event(&ev);
            }
            Event::Vm(v) if maps_code(&v.call) => {
                self.host.on_event(&ev);
                self.symbols.maps_changed(v.pid);
                self.unwinder.maps_changed(v.pid);
            }
            Event::Exit { pid, .. } => {
                self.host.on_event(&ev);
                self.est.on_event(&ev);
                if self.est.process(*pid).is_some() {
                    self.note_kernel(*pid, true);
                }
                self.esc.forget(*pid);
                self.unwinder.forget(*pid);
                self.unprobeable.remove(pid);
                if self.sampled.remove(pid).is_some() {
                    let addrs = self
                        .est
                        .process(*pid)
                        .map(|p| p.live_addresses())
                        .unwrap_or_default();
                    self.tracer.stop_sampling(*pid, &addrs);
                    self.tracer.unwind_by_frame_pointers(*pid);
                }
            }
            Event::Loaded { .. } | Event::Fork { .. } => {}
            _ => self.host.on_event(&ev),
        }
    }

    /// Forgets everything about the process under `pid` now.
    fn gone(&mut self, pid: u32) {
        if !self.ids.contains_key(&pid) {
            return;
        }
        self.stop_sampling(pid);
        // Only this pid's: the other exited processes wait for their last
        // profile.
        self.host.remove(pid);
        self.est.remove(pid);
        self.esc.forget(pid);
        self.unwinder.forget(pid);
        self.unprobeable.remove(&pid);
        self.ids.remove(&pid);
        self.symbols.forget(pid);
    }

    /// Probes process `pid`'s allocators for sampling.
    fn start_sampling(&mut self, pid: u32, why: Why) {
        if self.sampled.contains_key(&pid) || self.unprobeable.contains_key(&pid) {
            return;
        }
        let comm = self
            .ids
            .get(&pid)
            .map(|i| i.comm.clone())
            .unwrap_or_default();
        let libs: Vec<attach::Library> = match attach::libraries_of(pid) {
            Ok(l) => l
                .into_iter()
                .filter(|l| matches!(l.kind, LibKind::Libc | LibKind::Malloc))
                .collect(),
            // Gone already.
            Err(_) => return,
        };
        if libs.is_empty() {
            let why = "no allocator memtrace can probe (a Go or stripped static program?)";
            eprintln!(
                "memtrace agent: PID {pid} ({comm}): {why}; its kernel-side memory is still traced"
            );
            self.unprobeable.insert(pid, why.into());
            return;
        }
        if let Err(e) = self
            .tracer
            .set_allocator_ranges(pid, &allocator_ranges(pid, &libs))
        {
            eprintln!("memtrace agent: PID {pid} ({comm}): {}", e.message);
            return;
        }
        // A program without frame pointers gets its stacks copied and
        // walked by DWARF: samples are rare, so the copies are cheap.
        let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
        if !unwind::frame_pointers(&exe)
            && self
                .tracer
                .unwind_in_user_space(pid, unwind::main_stack_top(pid))
                .is_ok()
        {
            self.unwinder.refresh(pid);
        }
        self.sampled.insert(pid, why);
        let mut probed = Vec::new();
        for lib in &libs {
            match self.tracer.attach_sampled(lib, pid) {
                Ok((probes, mode)) => {
                    if self.probe_mode.as_ref() != Some(&mode) {
                        match &mode {
                            ProbeMode::Sessions => eprintln!(
                                "memtrace agent: sampled probes are uprobe sessions: an unsampled call costs one trap"
                            ),
                            ProbeMode::EntryAndReturn(why) => eprintln!(
                                "memtrace agent: sampled probes are entry and return uprobes (every call pays two traps): {why}"
                            ),
                        }
                        self.probe_mode = Some(mode);
                    }
                    probed.push(format!(
                        "{} [{}]",
                        probes.module,
                        probes.functions.join(" ")
                    ));
                }
                Err(e) => {
                    eprintln!("memtrace agent: PID {pid} ({comm}): {}", e.message);
                }
            }
        }
        if probed.is_empty() {
            self.sampled.remove(&pid);
            self.tracer.stop_sampling(pid, &[]);
            self.tracer.unwind_by_frame_pointers(pid);
            return;
        }
        self.est.resume(pid);
        self.sampled_ever.insert(pid);
        eprintln!(
            "memtrace agent: sampling PID {pid} ({comm}, {}): {}",
            why.name(),
            probed.join("; ")
        );
    }

    /// Copies the kernel side's figures of process `pid` (its budget
    /// state, its samples dropped by the ring) into its estimates; forgets
    /// the kernel's state of an `exited` one.
    fn note_kernel(&mut self, pid: u32, exited: bool) {
        let budget = if exited {
            self.tracer.take_budget(pid)
        } else {
            self.tracer.budget(pid)
        };
        let ring_lost = self
            .tracer
            .lost_sites()
            .iter()
            .filter(|l| l.pid == pid && l.site != 0)
            .map(|l| l.count)
            .sum();
        self.est
            .note_kernel(pid, budget.unwrap_or_default(), ring_lost);
    }

    /// Says on standard error what process `pid`'s estimates came to.
    fn print_estimate(&self, p: &estimate::ProcessEstimate) {
        let comm = self
            .symbols
            .comm(p.pid)
            .or_else(|| self.ids.get(&p.pid).map(|i| i.comm.clone()))
            .unwrap_or_default();
        eprintln!(
            "memtrace agent: estimate PID {} ({comm}): {}",
            p.pid,
            p.summary()
        );
    }

    fn stop_sampling(&mut self, pid: u32) {
        if self.sampled.remove(&pid).is_some() {
            let addrs = self.est.stop(pid);
            self.tracer.stop_sampling(pid, &addrs);
            self.tracer.unwind_by_frame_pointers(pid);
            self.unwinder.forget(pid);
        }
    }

    /// Every `--check-interval`: selection of new processes, escalation.
    fn check(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        let sampled: Vec<u32> = self.sampled.keys().copied().collect();
        for pid in sampled {
            self.note_kernel(pid, false);
        }
        for pid in std::mem::take(&mut self.new_pids) {
            if let Some(id) = self.ids.get(&pid)
                && self.selector.matches(pid, id)
            {
                self.start_sampling(pid, Why::Selected);
            }
        }
        let observed: Vec<(u32, u64)> = self
            .host
            .processes()
            .filter(|p| !p.exited && self.sampled.get(&p.pid) != Some(&Why::Selected))
            .map(|p| (p.pid, p.resident()))
            .collect();
        for (pid, rss) in observed {
            self.esc.observe(pid, t, rss);
        }
        for d in self.esc.decide(t) {
            match d {
                Decision::Escalate(pid, reason) => {
                    if self.sampled.contains_key(&pid) || target::has_exited(pid) {
                        continue;
                    }
                    let comm = self
                        .ids
                        .get(&pid)
                        .map(|i| i.comm.clone())
                        .unwrap_or_default();
                    eprintln!("memtrace agent: escalating PID {pid} ({comm}): {reason}");
                    self.escalations += 1;
                    self.start_sampling(pid, Why::Escalated);
                }
                Decision::BackOff(pid) => {
                    if self.sampled.get(&pid) == Some(&Why::Escalated) {
                        let comm = self
                            .ids
                            .get(&pid)
                            .map(|i| i.comm.clone())
                            .unwrap_or_default();
                        eprintln!(
                            "memtrace agent: PID {pid} ({comm}) stopped growing: sampling backs off"
                        );
                        self.backoffs += 1;
                        self.stop_sampling(pid);
                    }
                }
            }
        }
        let (n, at, _) = self.records_rate;
        let dt = at.elapsed().as_secs_f64();
        if dt > 0.0 {
            self.records_rate = (self.records, Instant::now(), (self.records - n) as f64 / dt);
        }
    }

    /// Every `--profile-period` and at the end: a profile of each process
    /// with samples, then the exited processes are dropped.
    fn write_profiles(&mut self) {
        let until = unix_s().max(self.period_from + 1);
        let pids: Vec<u32> = self.est.processes().map(|p| p.pid).collect();
        for pid in pids {
            let period = self.est.period(pid);
            if period.is_empty() {
                continue;
            }
            let Some(p) = self.est.process(pid) else {
                continue;
            };
            let id = self.ids.get(&pid).cloned().unwrap_or_default();
            let comm = self.symbols.comm(pid).unwrap_or(id.comm.clone());
            let overflow = Frame {
                function: Some("[stacks over memtrace's cap]".into()),
                ..Frame::default()
            };
            let stacks: Vec<(Box<[u64]>, bool)> = period
                .iter()
                .map(|s| (p.stacks[s.index].frames.clone(), p.is_overflow(s.index)))
                .collect();
            let samples: Vec<Sample> = period
                .iter()
                .zip(stacks)
                .map(|(s, (frames, is_overflow))| Sample {
                    pid,
                    comm: Some(comm.clone()),
                    frames: if is_overflow {
                        vec![overflow.clone()]
                    } else {
                        self.symbols.frames(pid, &frames)
                    },
                    live_bytes: s.live_bytes.round() as u64,
                    live_count: s.live_count.round() as u64,
                    total_bytes: s.alloc_bytes.round() as u64,
                    total_count: s.alloc_count.round() as u64,
                })
                .collect();
            let labels = self.labels(&id);
            match profiles::Profile::encode(
                Kind::Heap,
                pid,
                &comm,
                &samples,
                labels,
                self.cfg.sample_bytes,
                self.period_from,
                until,
            ) {
                Ok(profile) => self.sink.deliver(profile),
                Err(e) => eprintln!("memtrace agent: cannot encode the profile of PID {pid}: {e}"),
            }
        }
        self.write_fault_profiles(until);
        self.period_from = until;
        for p in self.est.take_exited() {
            self.print_estimate(&p);
            if !self.host.knows(p.pid) {
                self.ids.remove(&p.pid);
                self.symbols.forget(p.pid);
            }
        }
        for pid in self.host.take_exited() {
            if self.est.process(pid).is_none() {
                self.ids.remove(&pid);
                self.symbols.forget(pid);
            }
        }
    }

    /// The always-on tier's profiles: where the sampled page faults of the
    /// period were taken, for the `--top` processes with the most bytes
    /// made resident by them. One fault in `--fault-sample` has its stack
    /// taken: values are scaled by that, estimates like the heap's.
    fn write_fault_profiles(&mut self, until: u64) {
        let pids: Vec<u32> = self.host.processes().map(|p| p.pid).collect();
        let mut periods: Vec<(u32, Vec<host::PeriodFaults>)> = pids
            .into_iter()
            .map(|pid| (pid, self.host.fault_period(pid)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let bytes = |p: &[host::PeriodFaults]| p.iter().map(|f| f.bytes).sum::<u64>();
        periods.sort_by_key(|(pid, p)| (std::cmp::Reverse(bytes(p)), *pid));
        periods.truncate(self.cfg.top);
        for (pid, period) in periods {
            let Some(p) = self.host.process_ref(pid) else {
                continue;
            };
            let stacks: Vec<Box<[u64]>> = period
                .iter()
                .map(|f| p.fault_stacks[f.index].frames.clone())
                .collect();
            let id = self.ids.get(&pid).cloned().unwrap_or_default();
            let comm = self.symbols.comm(pid).unwrap_or(id.comm.clone());
            let samples: Vec<Sample> = period
                .iter()
                .zip(stacks)
                .map(|(f, frames)| Sample {
                    pid,
                    comm: Some(comm.clone()),
                    frames: self.symbols.frames(pid, &frames),
                    live_bytes: 0,
                    live_count: 0,
                    total_bytes: f.bytes * u64::from(self.cfg.fault_sample),
                    total_count: f.faults * u64::from(self.cfg.fault_sample),
                })
                .collect();
            let encoded = profiles::Profile::encode(
                Kind::Faults,
                pid,
                &comm,
                &samples,
                self.labels(&id),
                u64::from(self.cfg.fault_sample),
                self.period_from,
                until,
            );
            match encoded {
                Ok(profile) => self.sink.deliver(profile),
                Err(e) => {
                    eprintln!("memtrace agent: cannot encode the fault profile of PID {pid}: {e}")
                }
            }
        }
    }

    /// The labels every profile sample of a process carries besides pid and
    /// comm.
    fn labels(&self, id: &Identity) -> Vec<(String, String)> {
        let mut labels = vec![
            ("host".to_string(), self.host_name.clone()),
            ("cgroup".to_string(), id.cgroup.clone()),
        ];
        if let Some(c) = &id.container {
            labels.push(("container_id".to_string(), c.clone()));
        }
        labels
    }

    /// Everything lost or not kept, by reason.
    fn losses(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .tracer
            .counters()
            .into_iter()
            .filter(|(c, _)| *c != Counter::Calls)
            .map(|(c, v)| (c.name().to_string(), v))
            .collect();
        for (c, v) in self.tracer.sample_counters() {
            if matches!(c, SampleCounter::TableFull) {
                out.push((c.name().to_string(), v));
            }
        }
        let est: Vec<_> = self.est.processes().collect();
        out.push(("decode_errors".into(), self.decode_errors));
        out.push((
            "stacks_over_cap".into(),
            est.iter().map(|p| p.stacks_over_cap).sum(),
        ));
        out.push((
            "unknown_frees".into(),
            est.iter().map(|p| p.unknown_frees).sum(),
        ));
        out.push((
            "fault_stacks_over_cap".into(),
            self.host.processes().map(|p| p.fault_stacks_over_cap).sum(),
        ));
        out.push((
            "processes_over_cap".into(),
            self.host.processes_over_cap + self.est.processes_over_cap,
        ));
        out.push(("escalations_deferred".into(), self.esc.deferred));
        out.push((unwind::STACKS_CUT.into(), self.unwinder.stats().cut));
        out
    }

    fn metrics(&self) -> String {
        let rows = self
            .host
            .processes()
            .map(|p| {
                let id = self.ids.get(&p.pid).cloned().unwrap_or_default();
                metrics::Row {
                    pid: p.pid.to_string(),
                    comm: id.comm,
                    cgroup: id.cgroup,
                    container: id.container.unwrap_or_default(),
                    rss: p.rss,
                    faults: p.faults,
                    fault_bytes: p.fault_bytes,
                    mmaps: p.mmaps,
                    mmap_bytes: p.mmap_bytes,
                    munmap_bytes: p.munmap_bytes,
                    brk_bytes: p.brk_bytes,
                    kernel_bytes: p.kernel_bytes,
                    kernel_allocated_bytes: p.kernel_allocated_bytes,
                    oom_kills: p.oom_kills,
                    heap: self.est.process(p.pid).map(|e| metrics::Heap {
                        live_bytes: e.totals.live_bytes,
                        live_count: e.totals.live_count,
                        alloc_bytes: e.totals.alloc_bytes,
                        alloc_count: e.totals.alloc_count,
                        samples: e.totals.samples,
                        variance: e.totals.variance,
                        thinning_shift: e.budget.shift,
                        thinned: e.budget.thinned,
                        samples_lost: e.samples_lost(),
                        size_buckets: e.size_buckets,
                    }),
                    sampling: self.sampled.get(&p.pid).map(|w| w.name()),
                }
            })
            .collect();
        let own = SelfUsage::now();
        let health = metrics::Health {
            records: self.records,
            records_per_second: self.records_rate.2,
            lost: self.losses(),
            rss_bytes: own_rss(),
            peak_rss_bytes: own.peak_rss_bytes,
            cpu_seconds: own.cpu_seconds,
            processes: self.host.processes().count() as u64,
            sampled_processes: self.sampled.len() as u64,
            sample_bytes: self.cfg.sample_bytes,
            probe_mode: match &self.probe_mode {
                Some(ProbeMode::EntryAndReturn(_)) => "entry_return".into(),
                Some(ProbeMode::Sessions) => "sessions".into(),
                None => "none".into(),
            },
            escalations: self.escalations,
            backoffs: self.backoffs,
            profiles: self.sink.outcomes.get(),
            sampler: self
                .tracer
                .sample_counters()
                .into_iter()
                .map(|(c, v)| (c.name().to_string(), v))
                .collect(),
        };
        metrics::render(metrics::Snapshot::top(rows, self.cfg.top, health))
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>, max: usize) -> bool {
        for _ in 0..max {
            match ring.next() {
                Some(item) => self.handle(&item),
                None => return true,
            }
        }
        false
    }
}

/// The executable ranges of `libs` in process `pid`, but not the program's
/// own (a static program's allocator is in it: every call from the program
/// would look internal).
fn allocator_ranges(pid: u32, libs: &[attach::Library]) -> Vec<(u64, u64)> {
    let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            (m.dev(), m.ino())
        })
        .ok();
    let Ok(maps) = crate::maps::read(pid) else {
        return Vec::new();
    };
    maps.iter()
        .filter(|m| m.exec)
        .filter(|m| libs.iter().any(|l| l.id == (m.dev.clone(), m.inode)))
        .filter(|m| exe.is_none_or(|(_, ino)| ino != m.inode))
        .map(|m| (m.start, m.end))
        .collect()
}

/// memtrace's resident memory now (`/proc/self/statm`), bytes.
fn own_rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next_scrape(
    rx: &mut Option<tokio::sync::mpsc::Receiver<http::Scrape>>,
) -> Option<http::Scrape> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs the agent until SIGINT, SIGTERM or `--duration`.
pub async fn run(args: AgentArgs) -> Result<i32> {
    let cfg = Config::resolve(&args).map_err(|m| UserError::new(m, "see memtrace agent --help"))?;
    target::check_privileges()?;
    let signal_err =
        |e: std::io::Error| UserError::new(format!("cannot catch signals: {e}"), "this is a bug");
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err)?;
    let selector = Selector {
        comm: cfg
            .comm
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| UserError::new(format!("--comm: {e}"), "see memtrace agent --help"))?,
        cgroups: cfg.cgroups.clone(),
        pids: cfg.pids.clone(),
    };
    for &pid in &cfg.pids {
        target::check_pid(pid)?;
    }
    let sink = profiles::Sink::new(
        cfg.profile_dir.clone(),
        cfg.profile_max_bytes,
        cfg.profile_max_files,
        cfg.push.clone(),
        cfg.push_app.clone(),
    )
    .map_err(|e| {
        UserError::new(
            format!(
                "cannot use the profile directory {}: {e}",
                cfg.profile_dir
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            ),
            "give a writable --profile-dir, or --profile-dir off",
        )
    })?;
    // Bound before the programs load, so a port in use costs nothing.
    let mut scrapes = match cfg.listen {
        Some(addr) => Some(http::serve(addr).await.map_err(|e| {
            UserError::new(
                format!("cannot listen on {addr}: {e}"),
                "is another agent (or exporter) on that port? use --listen ADDR, or --listen off",
            )
        })?),
        None => None,
    };
    let mut tracer = Tracer::load(
        cfg.ringbuf_size << 20,
        KernelOptions {
            all_processes: true,
            fault_sample: cfg.fault_sample,
            kernel_allocations: cfg.kernel,
            probe_cost: false,
            follow_forks: false,
            copied_stacks: CopiedStacks::Listed,
            python: false,
            sampling: Some(Sampling {
                mean_bytes: cfg.sample_bytes,
                max_live: cfg.max_live,
                budget_per_s: cfg.budget,
                sessions: cfg.sessions,
            }),
        },
    )?;
    let ring = tracer.ring_buffer()?;
    // SAFETY: the ring buffer owns its descriptor and keeps it open, and
    // unchanged, for as long as the AsyncFd holds it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
            UserError::new(format!("cannot poll the ring buffer: {e}"), "this is a bug")
        })?;
    let policy = Policy {
        slope: cfg.escalate_slope as f64,
        rss: cfg.escalate_rss,
        window: cfg.escalate_window,
        calm: cfg.calm,
        max_sampled: cfg.max_escalated,
    };
    let mut agent = Agent {
        est: Estimates::new(
            cfg.sample_bytes,
            estimate::Limits {
                stacks: cfg.max_stacks,
                processes: cfg.max_processes,
            },
        ),
        host: HostTier::new(host::Limits {
            processes: cfg.max_processes,
            fault_stacks: 256,
        }),
        esc: Escalator::new(policy),
        selector,
        ids: HashMap::new(),
        sampled: HashMap::new(),
        sampled_ever: HashSet::new(),
        unprobeable: HashMap::new(),
        new_pids: Vec::new(),
        decode_errors: 0,
        records: 0,
        records_rate: (0, Instant::now(), 0.0),
        probe_mode: None,
        escalations: 0,
        backoffs: 0,
        sink,
        host_name: host_name(),
        started: Instant::now(),
        period_from: unix_s(),
        symbols: Symbols::new(),
        unwinder: StackUnwinder::new(),
        tracer,
        cfg,
    };
    // Every process running now: named, RSS seeded, selection looked at.
    let me = std::process::id();
    for pid in target::all_pids() {
        if pid == me {
            continue;
        }
        if let Some(id) = Identity::read(pid) {
            agent.ids.insert(pid, id);
            agent.new_pids.push(pid);
            let now = crate::session::monotonic_ns();
            for seed in target::resident_now(pid, now) {
                agent.host.on_event(&seed);
            }
        }
    }
    agent.check();
    let listen = agent
        .cfg
        .listen
        .map(|a| format!("; metrics on http://{a}/metrics"))
        .unwrap_or_default();
    eprintln!(
        "memtrace agent: tracing every process ({} now; {} sampled, one sample per {} bytes allocated){listen}; stop with Ctrl-C",
        agent.host.processes().count(),
        agent.sampled.len(),
        agent.cfg.sample_bytes
    );
    let deadline = agent
        .cfg
        .duration
        .map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(Duration::from_secs_f64(agent.cfg.check_interval));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let period = Duration::from_secs_f64(agent.cfg.profile_period);
    let mut profile_tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    profile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let backlog = ((agent.cfg.ringbuf_size as usize) << 20) / 32;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => return Err(UserError::new(format!("ring buffer poll failed: {e}"), "this is a bug")),
                };
                if agent.drain(guard.get_inner_mut(), BATCH) {
                    guard.clear_ready();
                }
            }
            _ = poll.tick() => {
                agent.drain(ring.get_mut(), BATCH);
            }
            _ = check.tick() => agent.check(),
            _ = profile_tick.tick() => {
                agent.drain(ring.get_mut(), backlog);
                agent.write_profiles();
            }
            scrape = next_scrape(&mut scrapes) => {
                match scrape {
                    Some(reply) => {
                        agent.drain(ring.get_mut(), backlog);
                        let _ = reply.send(agent.metrics());
                    }
                    None => scrapes = None,
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep_until(deadline) => break,
        }
    }
    agent.drain(ring.get_mut(), backlog);
    let sampled: Vec<u32> = agent.sampled.keys().copied().collect();
    for pid in sampled {
        agent.note_kernel(pid, false);
    }
    agent.write_profiles();
    for p in agent.est.processes() {
        agent.print_estimate(p);
    }
    let lost: Vec<String> = agent
        .losses()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "memtrace agent: stopping after {:.1} s: {} records, {} processes sampled at some point ({} escalated, {} backed off); profiles written/failed/pushed/failed: {:?}; not seen: {}",
        agent.started.elapsed().as_secs_f64(),
        agent.records,
        agent.sampled_ever.len(),
        agent.escalations,
        agent.backoffs,
        agent.sink.outcomes.get(),
        lost.join(" ")
    );
    // Pushes still in flight get a moment.
    if agent.cfg.push.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agent.tracer.detach();
    Ok(0)
}
