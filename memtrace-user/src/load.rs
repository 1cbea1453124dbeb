//! The only module that talks to the kernel's BPF side: loads the embedded
//! eBPF object, attaches its programs, hands out the ring buffer and reads
//! the loss counters. Errors from aya are turned into [`UserError`]s that
//! say what failed, on which file and pid.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::os::fd::{AsFd as _, OwnedFd};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{
    ProgramError, RawTracePoint, TracePoint, UProbe,
    trace_point::TracePointLink,
    uprobe::{UProbeLink, UProbeScope},
};
use aya::{Ebpf, EbpfLoader};
use memtrace_common::{
    AllocFn, Budget, Counter, EXP_DRAWS, MAX_ALLOCATOR_RANGES, PyConfig, SampleCounter,
};

use crate::attach::{Found, LibKind, Library, Site, display_name, sites_of};
use crate::error::{Result, UserError};
use crate::report::{LostSite, Probes, ProgramCost};
use crate::tracefs;
use crate::uprobe_session::{self, SessionPrograms};

/// Kernel tracepoints and the programs on them, always attached: RSS,
/// faults, address-space syscalls, exec and OOM.
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("rss_stat", "kmem", "rss_stat"),
    ("page_fault_user", "exceptions", "page_fault_user"),
    ("page_fault_kernel", "exceptions", "page_fault_kernel"),
    ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
    ("sys_enter_mremap", "syscalls", "sys_enter_mremap"),
    ("sys_enter_brk", "syscalls", "sys_enter_brk"),
    ("sys_enter_madvise", "syscalls", "sys_enter_madvise"),
    ("vm_exit", "syscalls", "sys_exit_mmap"),
    ("vm_exit", "syscalls", "sys_exit_munmap"),
    ("vm_exit", "syscalls", "sys_exit_mremap"),
    ("vm_exit", "syscalls", "sys_exit_brk"),
    ("vm_exit", "syscalls", "sys_exit_madvise"),
    ("process_exec", "sched", "sched_process_exec"),
    ("oom_victim", "oom", "mark_victim"),
];

/// New processes, attached with `--follow-forks` (to follow them) and when
/// tracing every process (so a pid reused after a lost exit record starts a
/// new account); every fork and thread creation on the host runs it then.
const FORK_TRACEPOINTS: &[(&str, &str, &str)] = &[("process_fork", "task", "task_newtask")];

/// Kernel-allocation tracepoints, attached with `--kernel` only: every
/// kfree on the host runs a program then.
const KERNEL_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("kmalloc", "kmem", "kmalloc"),
    ("kmem_cache_alloc", "kmem", "kmem_cache_alloc"),
    ("slab_free", "kmem", "kfree"),
    ("slab_free", "kmem", "kmem_cache_free"),
    ("page_alloc", "kmem", "mm_page_alloc"),
    ("page_free", "kmem", "mm_page_free"),
    ("page_free", "kmem", "mm_page_free_batched"),
    ("percpu_alloc", "percpu", "percpu_alloc_percpu"),
    ("percpu_free", "percpu", "percpu_free_percpu"),
];

/// What the kernel side traces beyond the allocator probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// Every process, not only those named with [`Tracer::trace_process`].
    pub all_processes: bool,
    /// Take the user stack of every this many faults (`--fault-sample`).
    pub fault_sample: u32,
    /// Trace kernel allocations (`--kernel`).
    pub kernel_allocations: bool,
    /// Have the kernel time memtrace's programs (`--probe-cost`).
    pub probe_cost: bool,
    /// Follow the children of traced processes (`--follow-forks`): the
    /// allocator probes then go on every process, filtered by pid in eBPF.
    pub follow_forks: bool,
    /// Which processes send a copy of their stack for user space to unwind
    /// ([`Tracer::unwind_in_user_space`]).
    pub copied_stacks: CopiedStacks,
    /// Read the Python frames of the processes named with
    /// [`Tracer::trace_python`] (off with `--no-python`).
    pub python: bool,
    /// Sample allocations instead of tracing every call (the agent's
    /// allocator tier); `None` is exact mode.
    pub sampling: Option<Sampling>,
}

/// The sampled allocator tier's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampling {
    /// Mean bytes between two samples (`--sample-bytes`).
    pub mean_bytes: u64,
    /// Most sampled blocks tracked live at once, host-wide (`--max-live`).
    pub max_live: u32,
    /// Most samples one process may send per second (0: no limit).
    pub budget_per_s: u64,
    /// Use uprobe sessions where the kernel has them; else (or when they
    /// fail) entry and return probes.
    pub sessions: bool,
}

/// How the sampled tier's probes are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// Uprobe sessions: an unsampled call pays its entry trap only.
    Sessions,
    /// A uprobe at entry and a uretprobe at return of every call, and why
    /// not sessions.
    EntryAndReturn(String),
}

/// One probe, removed when dropped.
#[expect(
    dead_code,
    reason = "links are held to keep their probes, never read; dropping one removes it"
)]
enum Link {
    Uprobe(UProbeLink),
    /// A uprobe-session link's descriptor.
    Session(OwnedFd),
}

/// Which processes' allocation stacks the kernel side copies, for user
/// space to unwind with DWARF, instead of walking their frame pointers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopiedStacks {
    /// None.
    #[default]
    None,
    /// Those named with [`Tracer::unwind_in_user_space`].
    Listed,
    /// Every process.
    All,
}

/// The eBPF object, built by build.rs from memtrace-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));

/// The entry program of an allocator function (each reads its own
/// arguments).
fn entry_program(func: AllocFn) -> &'static str {
    match func {
        AllocFn::Malloc => "malloc_enter",
        AllocFn::Calloc => "calloc_enter",
        AllocFn::Realloc => "realloc_enter",
        AllocFn::Reallocarray => "reallocarray_enter",
        AllocFn::PosixMemalign => "posix_memalign_enter",
        AllocFn::AlignedAlloc => "aligned_alloc_enter",
        AllocFn::Memalign => "memalign_enter",
        AllocFn::Valloc => "valloc_enter",
        AllocFn::Delete => "delete_enter",
        AllocFn::Pvalloc => "pvalloc_enter",
        AllocFn::OperatorNew => "operator_new_enter",
        AllocFn::RustRealloc => "rust_realloc_enter",
        AllocFn::PyMalloc => "py_malloc_enter",
        AllocFn::PyCalloc => "py_calloc_enter",
        AllocFn::PyRealloc => "py_realloc_enter",
    }
}

/// The uprobe-session program of an allocator function (`None`: free),
/// if it has one (CPython's allocators, never sampled, have none).
fn session_program(func: Option<AllocFn>) -> Option<&'static str> {
    Some(match func? {
        AllocFn::Malloc => "malloc_session",
        AllocFn::Calloc => "calloc_session",
        AllocFn::Realloc => "realloc_session",
        AllocFn::Reallocarray => "reallocarray_session",
        AllocFn::PosixMemalign => "posix_memalign_session",
        AllocFn::AlignedAlloc => "aligned_alloc_session",
        AllocFn::Memalign => "memalign_session",
        AllocFn::Valloc => "valloc_session",
        AllocFn::Pvalloc => "pvalloc_session",
        AllocFn::OperatorNew => "operator_new_session",
        AllocFn::Delete => "delete_session",
        AllocFn::RustRealloc => "rust_realloc_session",
        AllocFn::PyMalloc | AllocFn::PyCalloc | AllocFn::PyRealloc => return None,
    })
}

/// The sampled tier's return program on a kernel without uprobe sessions.
const SAMPLED_EXIT: &str = "sampled_exit";

/// The return program of every allocator function.
const ALLOC_EXIT: &str = "alloc_exit";

/// The program on the dynamic loader's [`LOADER_HOOK`](crate::attach::LOADER_HOOK).
const LOADER_READY: &str = "loader_ready";

/// The loaded programs and maps.
pub struct Tracer {
    ebpf: Ebpf,
    /// Holds the kernel's BPF run-time statistics on (`--probe-cost`).
    stats: Option<OwnedFd>,
    counts: PerCpuArray<MapData, u64>,
    lost: PerCpuHashMap<MapData, [u64; 2], [u64; 2]>,
    links: Vec<UProbeLink>,
    tracepoint_links: Vec<TracePointLink>,
    traced: BpfHashMap<MapData, u32, u8>,
    /// Processes whose stacks are copied, and their main stacks' tops.
    dwarf: BpfHashMap<MapData, u32, u64>,
    /// CPython processes whose Python frames are read, with their
    /// interpreter's layout (a `PyConfig`, as words: the map's value type
    /// must be plain data to aya).
    python: BpfHashMap<MapData, u32, [u64; PY_CONFIG_WORDS]>,
    /// Sampled mode: its maps, probes per process and session programs.
    sampled: Option<SampledMaps>,
}

/// The sampled tier's side of the tracer.
struct SampledMaps {
    options: Sampling,
    live: BpfHashMap<MapData, [u64; 2], u64>,
    ranges: BpfHashMap<MapData, u32, [u64; 2 * MAX_ALLOCATOR_RANGES]>,
    budgets: BpfHashMap<MapData, u32, [u64; BUDGET_WORDS]>,
    counts: PerCpuArray<MapData, u64>,
    /// Probes by process, so that one process's can be removed.
    links: HashMap<u32, Vec<Link>>,
    /// Session programs (built at the first attach), or why there are none.
    sessions: Option<std::result::Result<SessionPrograms, String>>,
    /// Every map's name and a descriptor of it, for the session programs.
    map_fds: Vec<(String, OwnedFd)>,
}

/// Size of a [`Budget`] in 8-byte words.
const BUDGET_WORDS: usize = std::mem::size_of::<Budget>() / 8;

/// Size of a `PyConfig` in 8-byte words.
const PY_CONFIG_WORDS: usize = std::mem::size_of::<PyConfig>() / 8;

fn load_error(name: &str, e: &ProgramError) -> UserError {
    let what = match e {
        ProgramError::LoadError { io_error, .. } => {
            format!("the kernel refused eBPF program {name}: {io_error}")
        }
        other => format!("loading eBPF program {name} failed: {other}"),
    };
    UserError::new(what, verifier_hint(e))
}

fn verifier_hint(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "the kernel's verifier rejected a program; the end of its log:\n{}",
                tail.join("\n")
            )
        }
        _ => "check that the kernel supports BPF uprobes (CONFIG_UPROBE_EVENTS, CONFIG_BPF_EVENTS) and that memtrace runs as root".into(),
    }
}

impl Tracer {
    /// Loads every program; the ring buffer gets `ringbuf_bytes` (a power of
    /// two, at least a page).
    pub fn load(ringbuf_bytes: u32, opts: KernelOptions) -> Result<Self> {
        let self_tgid = std::process::id();
        let trace_all = opts.all_processes as u8;
        let fault_sample = opts.fault_sample.max(1);
        // Records wake memtrace only once an eighth of the ring is waiting;
        // the rest of the time it drains the ring on a timer (`session`).
        let wake_bytes = u64::from(ringbuf_bytes / 8);
        let tracefs_root = tracefs::ensure_mounted()?;
        tracefs::check(&tracefs_root, tracefs::FIELDS)?;
        if opts.kernel_allocations {
            tracefs::check(&tracefs_root, tracefs::KERNEL_FIELDS)?;
        }
        let forks = opts.follow_forks || opts.all_processes;
        if forks {
            tracefs::check(&tracefs_root, tracefs::FORK_FIELDS)?;
        }
        let follow_forks = opts.follow_forks as u8;
        let unwind: u8 = match opts.copied_stacks {
            CopiedStacks::None => 0,
            CopiedStacks::All => 1,
            CopiedStacks::Listed => 2,
        };
        let python_on = opts.python as u8;
        let sample_bytes = opts.sampling.map_or(0, |s| s.mean_bytes.max(1));
        let budget = opts.sampling.map_or(0, |s| s.budget_per_s);
        let max_live = opts.sampling.map_or(1, |s| s.max_live.max(1));
        let mut ebpf = EbpfLoader::new()
            .override_global("SAMPLE_BYTES", &sample_bytes, true)
            .override_global("BUDGET_PER_S", &budget, true)
            .map_max_entries("SAMPLED", max_live)
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("FOLLOW_FORKS", &follow_forks, true)
            .override_global("UNWIND", &unwind, true)
            .override_global("PYTHON_ON", &python_on, true)
            .override_global("FAULT_SAMPLE", &fault_sample, true)
            .override_global("WAKE_BYTES", &wake_bytes, true)
            .map_max_entries("EVENTS", ringbuf_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| {
                UserError::new(
                    format!("loading the eBPF object failed: {e}"),
                    "memtrace needs root (or CAP_BPF and CAP_PERFMON) and a kernel with BPF ring buffers (5.8+)",
                )
            })?;
        // Before any map is taken out of `ebpf`: the session programs are
        // relocated against all of them.
        let map_fds = if opts.sampling.is_some() {
            map_descriptors(&ebpf)?
        } else {
            Vec::new()
        };
        let exit: &mut RawTracePoint = program(&mut ebpf, "process_exit")?
            .try_into()
            .map_err(|e| internal("process_exit", e))?;
        exit.load().map_err(|e| load_error("process_exit", &e))?;
        exit.attach("sched_process_exit").map_err(|e| {
            UserError::new(
                format!("attaching to the sched_process_exit tracepoint failed: {e}"),
                "memtrace needs raw tracepoints (kernel 4.17+) with BTF",
            )
        })?;
        let counts = PerCpuArray::try_from(
            ebpf.take_map("COUNTS")
                .ok_or_else(|| internal("COUNTS", "map missing"))?,
        )
        .map_err(|e| internal("COUNTS", e))?;
        let lost = PerCpuHashMap::try_from(
            ebpf.take_map("LOST")
                .ok_or_else(|| internal("LOST", "map missing"))?,
        )
        .map_err(|e| internal("LOST", e))?;
        let traced = BpfHashMap::try_from(
            ebpf.take_map("TRACED")
                .ok_or_else(|| internal("TRACED", "map missing"))?,
        )
        .map_err(|e| internal("TRACED", e))?;
        let dwarf = BpfHashMap::try_from(
            ebpf.take_map("DWARF")
                .ok_or_else(|| internal("DWARF", "map missing"))?,
        )
        .map_err(|e| internal("DWARF", e))?;
        let python = BpfHashMap::try_from(
            ebpf.take_map("PYTHON")
                .ok_or_else(|| internal("PYTHON", "map missing"))?,
        )
        .map_err(|e| internal("PYTHON", e))?;
        let stats = opts.probe_cost.then(run_time_stats).transpose()?;
        let sampled = opts
            .sampling
            .map(|options| SampledMaps::take(&mut ebpf, options, map_fds))
            .transpose()?;
        let mut tracer = Self {
            ebpf,
            stats,
            counts,
            lost,
            links: Vec::new(),
            tracepoint_links: Vec::new(),
            traced,
            dwarf,
            python,
            sampled,
        };
        tracer.attach_tracepoints(TRACEPOINTS)?;
        if opts.kernel_allocations {
            tracer.attach_tracepoints(KERNEL_TRACEPOINTS)?;
        }
        if forks {
            tracer.attach_tracepoints(FORK_TRACEPOINTS)?;
        }
        Ok(tracer)
    }

    fn attach_tracepoints(&mut self, list: &[(&str, &str, &str)]) -> Result<()> {
        for &(name, category, event) in list {
            let prog: &mut TracePoint = program(&mut self.ebpf, name)?
                .try_into()
                .map_err(|e| internal(name, e))?;
            if prog.fd().is_err() {
                prog.load().map_err(|e| load_error(name, &e))?;
            }
            let id = prog.attach(category, event).map_err(|e| {
                UserError::new(
                    format!("attaching to the tracepoint {category}:{event} failed: {e}"),
                    "memtrace needs tracefs and kernel tracepoints (CONFIG_TRACEPOINTS, CONFIG_FTRACE_SYSCALLS)",
                )
            })?;
            self.tracepoint_links
                .push(prog.take_link(id).map_err(|e| internal(name, e))?);
        }
        Ok(())
    }

    /// Reports the kernel-side memory events of process `pid` (the
    /// allocator probes are scoped when attached).
    pub fn trace_process(&mut self, pid: u32) -> Result<()> {
        self.traced.insert(pid, 1, 0).map_err(|e| {
            UserError::new(
                format!("cannot trace the kernel-side events of pid {pid}: {e}"),
                "memtrace follows at most 16384 processes by pid; trace the whole system instead",
            )
        })
    }

    /// Has the kernel side copy the allocation stacks of process `pid` for
    /// user space to unwind (with [`CopiedStacks::Listed`]). `stack_top`:
    /// the end of its main thread's stack, where the copy stops (0 when
    /// unknown).
    pub fn unwind_in_user_space(&mut self, pid: u32, stack_top: u64) -> Result<()> {
        self.dwarf.insert(pid, stack_top, 0).map_err(|e| {
            UserError::new(
                format!("cannot have the stacks of pid {pid} copied: {e}"),
                "memtrace unwinds at most 16384 processes by DWARF; use --unwind fp",
            )
        })
    }

    /// Has the kernel side send the Python frames of process `pid` with each
    /// allocation, reading its interpreter as `config` says.
    pub fn trace_python(&mut self, pid: u32, config: &PyConfig) -> Result<()> {
        // SAFETY: `PyConfig` is `repr(C)`, without padding, a whole number
        // of words long; any bytes make a valid array of words.
        let words: [u64; PY_CONFIG_WORDS] = unsafe { std::mem::transmute_copy(config) };
        self.python.insert(pid, words, 0).map_err(|e| {
            UserError::new(
                format!("cannot read the Python frames of pid {pid}: {e}"),
                "memtrace reads the Python frames of at most 16384 processes; use --no-python",
            )
        })
    }

    /// Stops reading the Python frames of process `pid` (it exec'd).
    pub fn untrace_python(&mut self, pid: u32) {
        let _ = self.python.remove(&pid);
    }

    /// Has the kernel side walk the frame pointers of process `pid` again.
    pub fn unwind_by_frame_pointers(&mut self, pid: u32) {
        // Absent already, most often.
        let _ = self.dwarf.remove(&pid);
    }

    /// Probes the allocator functions of `lib`, for the given process only
    /// or (with `None`) for every process mapping it.
    pub fn attach(&mut self, lib: &Library, pid: Option<u32>) -> Result<Probes> {
        let found = sites_of(lib, pid)?;
        let scope = match pid.and_then(NonZeroU32::new) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        // Every program these sites need is loaded (verified) before the
        // first probe goes live: alloc_exit alone takes the verifier 0.6-3 s,
        // and an entry probe live that long without its return probe fills a
        // running target's in-flight stack with calls that never pop.
        for site in &found.sites {
            for name in Self::programs_of(site, lib) {
                load_uprobe(&mut self.ebpf, name)?;
            }
        }
        let mut functions = Vec::new();
        for site in &found.sites {
            self.attach_site(site, lib, scope)?;
            functions.push(probe_name(site));
        }
        Ok(probes_of(lib, &found, pid.into_iter().collect(), functions))
    }

    /// The programs on `site`, in attach order: the return probe before the
    /// entry probe. A call whose entry is seen then always has its return
    /// seen too (the kernel hijacks the return address at the entry trap
    /// once any return consumer is registered); the other order leaves,
    /// for every call made between the two attaches, an in-flight entry that
    /// nothing pops, and each later call at or below its stack pointer is
    /// taken for a nested call (silenced) or overflows the stack
    /// (`inflight_full`). A return seen without its entry is only counted.
    fn programs_of(site: &Site, lib: &Library) -> Vec<&'static str> {
        match (lib.kind, site.want.func) {
            (LibKind::Loader, _) => vec![LOADER_READY],
            (_, None) => vec!["free_enter"],
            (_, Some(f)) => vec![ALLOC_EXIT, entry_program(f)],
        }
    }

    fn attach_site(&mut self, site: &Site, lib: &Library, scope: UProbeScope) -> Result<()> {
        for name in Self::programs_of(site, lib) {
            let link = attach_uprobe(&mut self.ebpf, name, site, lib, scope)?;
            self.links.push(link);
        }
        Ok(())
    }

    /// Removes every probe. Each removal waits for an RCU grace period in the
    /// kernel (about 0.1 s here); done one after another, 40 probes would
    /// keep memtrace alive for seconds after its report, so they are closed
    /// from parallel threads and the grace periods overlap.
    pub fn detach(mut self) {
        let links = std::mem::take(&mut self.links);
        let tracepoints = std::mem::take(&mut self.tracepoint_links);
        let sampled: Vec<Link> = self
            .sampled
            .as_mut()
            .map(|s| s.links.drain().flat_map(|(_, l)| l).collect())
            .unwrap_or_default();
        std::thread::scope(|s| {
            for link in links {
                s.spawn(move || drop(link));
            }
            for link in sampled {
                s.spawn(move || drop(link));
            }
            for link in tracepoints {
                s.spawn(move || drop(link));
            }
        });
    }

    /// The map of processes stopped at the loader's hook, and its id (for
    /// the guard process). Call once.
    pub fn stopped(&mut self) -> Result<(u32, crate::guard::Stopped)> {
        let map = self
            .ebpf
            .take_map("STOPPED")
            .ok_or_else(|| internal("STOPPED", "map missing"))?;
        let id = match &map {
            aya::maps::Map::HashMap(data) => data.info().map(|i| i.id()),
            _ => return Err(internal("STOPPED", "not a hash map")),
        }
        .map_err(|e| internal("STOPPED", e))?;
        let stopped = crate::guard::Stopped::try_from(map).map_err(|e| internal("STOPPED", e))?;
        Ok((id, stopped))
    }

    /// The ring buffer of records. Call once.
    pub fn ring_buffer(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| internal("EVENTS", "map missing"))?;
        RingBuf::try_from(map).map_err(|e| internal("EVENTS", e))
    }

    /// How long each of memtrace's programs ran, when `--probe-cost` asked
    /// the kernel to count; else nothing.
    pub fn probe_cost(&self) -> Vec<ProgramCost> {
        match self.stats {
            Some(_) => costs(&self.ebpf),
            None => Vec::new(),
        }
    }

    /// Allocator records the full ring buffer dropped, by process and call
    /// site, summed over CPUs.
    pub fn lost_sites(&self) -> Vec<LostSite> {
        let mut out: Vec<LostSite> = self
            .lost
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|([tgid, site], per_cpu)| LostSite {
                pid: tgid as u32,
                site,
                count: per_cpu.iter().map(|v| v[0]).sum(),
                bytes: per_cpu.iter().map(|v| v[1]).sum(),
            })
            .collect();
        out.sort_by_key(|l| (l.pid, l.site));
        out
    }

    /// The kernel side's counters, summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (*c, summed(&self.counts, *c as u32)))
            .collect()
    }
}

/// A descriptor of each of `ebpf`'s maps, by name.
fn map_descriptors(ebpf: &Ebpf) -> Result<Vec<(String, OwnedFd)>> {
    use aya::maps::Map;
    let mut out = Vec::new();
    for (name, map) in ebpf.maps() {
        let data = match map {
            Map::Array(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuArray(d)
            | Map::PerCpuHashMap(d)
            | Map::PerCpuLruHashMap(d)
            | Map::RingBuf(d)
            | Map::StackTraceMap(d)
            | Map::Unsupported(d) => d,
            _ => return Err(internal(name, "a map of a kind memtrace does not use")),
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| internal(name, e))?;
        out.push((name.to_string(), fd));
    }
    Ok(out)
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| internal(name, "map missing"))?;
    BpfHashMap::try_from(map).map_err(|e| internal(name, e))
}

impl SampledMaps {
    /// Takes the sampled tier's maps out of `ebpf` and fills the sampler's
    /// table of exponential draws and each CPU's first distance.
    fn take(ebpf: &mut Ebpf, options: Sampling, map_fds: Vec<(String, OwnedFd)>) -> Result<Self> {
        let draws = crate::agent::weight::exponential_draws(options.mean_bytes, EXP_DRAWS);
        let mut exp: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(
            ebpf.map_mut("EXP")
                .ok_or_else(|| internal("EXP", "map missing"))?,
        )
        .map_err(|e| internal("EXP", e))?;
        for (i, d) in draws.iter().enumerate() {
            exp.set(i as u32, d, 0).map_err(|e| internal("EXP", e))?;
        }
        let mut left: PerCpuArray<&mut MapData, i64> = PerCpuArray::try_from(
            ebpf.map_mut("SAMPLE_LEFT")
                .ok_or_else(|| internal("SAMPLE_LEFT", "map missing"))?,
        )
        .map_err(|e| internal("SAMPLE_LEFT", e))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| internal("SAMPLE_LEFT", e))?;
        // Each CPU starts at a random point of the first gap, not at zero
        // (which would sample every CPU's first allocation).
        let first: Vec<i64> = (0..cpus)
            .map(|c| draws[(c * 977 + 13) % draws.len()] as i64)
            .collect();
        left.set(
            0,
            aya::maps::PerCpuValues::try_from(first).map_err(|e| internal("SAMPLE_LEFT", e))?,
            0,
        )
        .map_err(|e| internal("SAMPLE_LEFT", e))?;
        let counts = PerCpuArray::try_from(
            ebpf.take_map("SAMPLE_COUNTS")
                .ok_or_else(|| internal("SAMPLE_COUNTS", "map missing"))?,
        )
        .map_err(|e| internal("SAMPLE_COUNTS", e))?;
        Ok(Self {
            options,
            live: take_hash(ebpf, "SAMPLED")?,
            ranges: take_hash(ebpf, "RANGES")?,
            budgets: take_hash(ebpf, "BUDGETS")?,
            counts,
            links: HashMap::new(),
            sessions: None,
            map_fds,
        })
    }

    /// The session programs, built at the first call; the error says why
    /// there are none.
    fn sessions(&mut self) -> std::result::Result<&mut SessionPrograms, String> {
        if self.sessions.is_none() {
            let built = if !self.options.sessions {
                Err("uprobe sessions were turned off".to_string())
            } else if !uprobe_session::kernel_supports() {
                Err(format!(
                    "kernel {} has no uprobe sessions (they came in {}.{})",
                    uprobe_session::kernel_version()
                        .map_or("?".into(), |(a, b)| format!("{a}.{b}")),
                    uprobe_session::MIN_KERNEL.0,
                    uprobe_session::MIN_KERNEL.1
                ))
            } else {
                SessionPrograms::new(EBPF_OBJECT, &self.map_fds)
            };
            self.sessions = Some(built);
        }
        match self.sessions.as_mut() {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(e.clone()),
            None => Err("unreachable".into()),
        }
    }
}

impl Tracer {
    fn sampled_mut(&mut self) -> Result<&mut SampledMaps> {
        self.sampled
            .as_mut()
            .ok_or_else(|| internal("the sampled tier", "not loaded in sampled mode"))
    }

    /// Samples the allocator functions of `lib` in process `pid`, with uprobe
    /// sessions where the kernel has them. Returns what was probed and how.
    /// Functions the sampled tier leaves out: libstdc++'s `operator new` and
    /// `delete` (they call `malloc` and `free`, which count each block once),
    /// and a `reallocarray` beside a `realloc` (glibc's jumps to it).
    pub fn attach_sampled(&mut self, lib: &Library, pid: u32) -> Result<(Probes, ProbeMode)> {
        let found = sites_of(lib, Some(pid))?;
        let has_realloc = found
            .sites
            .iter()
            .any(|s| s.want.func == Some(AllocFn::Realloc));
        let sites: Vec<&Site> = found
            .sites
            .iter()
            .filter(|s| !(s.want.func == Some(AllocFn::Reallocarray) && has_realloc))
            .collect();
        let mut mode = match self.sampled_mut()?.sessions() {
            Ok(_) => ProbeMode::Sessions,
            Err(why) => ProbeMode::EntryAndReturn(why),
        };
        let mut links = Vec::new();
        let mut functions = Vec::new();
        for site in sites {
            let session = match site.want.func {
                None => Some("free_session"),
                f => session_program(f),
            };
            if let (ProbeMode::Sessions, Some(session)) = (&mode, session) {
                let s = self
                    .sampled_mut()?
                    .sessions()
                    .map_err(|e| internal("sessions", e))?;
                let attached = s
                    .program(session)
                    .and_then(|fd| uprobe_session::attach(fd, &lib.path, site.probe, pid));
                match attached {
                    Ok(fd) => {
                        links.push(Link::Session(fd));
                        functions.push(probe_name(site));
                        continue;
                    }
                    // A process gone is not a reason to give up sessions.
                    Err(_) if crate::target::has_exited(pid) => {
                        return Err(UserError::new(
                            format!("PID {pid} exited while memtrace was attaching its probes"),
                            "nothing to sample",
                        ));
                    }
                    Err(e) => {
                        // Sessions failed here: every probe from now on is
                        // an entry and return pair, and those made already
                        // stay (they work).
                        mode = ProbeMode::EntryAndReturn(e.clone());
                        self.sampled_mut()?.sessions = Some(Err(e));
                    }
                }
            }
            // No sessions: the same programs as plain uprobes (their return
            // value then ignored), and a return probe on every call.
            let Some(entry) = session else {
                continue;
            };
            let scope = UProbeScope::OneProcess(
                NonZeroU32::new(pid).ok_or_else(|| internal("attach", "pid 0"))?,
            );
            links.push(Link::Uprobe(attach_uprobe(
                &mut self.ebpf,
                entry,
                site,
                lib,
                scope,
            )?));
            if site.want.func.is_some() {
                links.push(Link::Uprobe(attach_uprobe(
                    &mut self.ebpf,
                    SAMPLED_EXIT,
                    site,
                    lib,
                    scope,
                )?));
            }
            functions.push(probe_name(site));
        }
        self.sampled_mut()?
            .links
            .entry(pid)
            .or_default()
            .extend(links);
        Ok((probes_of(lib, &found, vec![pid], functions), mode))
    }

    /// Tells the sampled tier where process `pid`'s allocator code is, so
    /// that calls from inside it are not counted twice.
    pub fn set_allocator_ranges(&mut self, pid: u32, ranges: &[(u64, u64)]) -> Result<()> {
        let mut words = [0u64; 2 * MAX_ALLOCATOR_RANGES];
        for (i, (start, end)) in ranges.iter().take(MAX_ALLOCATOR_RANGES).enumerate() {
            words[2 * i] = *start;
            words[2 * i + 1] = *end;
        }
        self.sampled_mut()?
            .ranges
            .insert(pid, words, 0)
            .map_err(|e| internal("RANGES", e))
    }

    /// Removes process `pid`'s sampled probes (it backs off, or exited) and
    /// forgets its sampled blocks `addrs` (their frees will not be seen).
    pub fn stop_sampling(&mut self, pid: u32, addrs: &[u64]) {
        let Some(s) = self.sampled.as_mut() else {
            return;
        };
        let links = s.links.remove(&pid).unwrap_or_default();
        // Each removal waits for an RCU grace period: in parallel.
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
        });
        for &a in addrs {
            let _ = s.live.remove(&[u64::from(pid), a]);
        }
        // Its budget state stays: its losses count for its whole life, and
        // a process sampled again starts at the thinning it had.
        let _ = s.ranges.remove(&pid);
    }

    /// Forgets sampled blocks `addrs` of process `pid` (it exec'd: its new
    /// address space holds none of them).
    pub fn forget_samples(&mut self, pid: u32, addrs: &[u64]) {
        if let Some(s) = self.sampled.as_mut() {
            for &a in addrs {
                let _ = s.live.remove(&[u64::from(pid), a]);
            }
        }
    }

    /// Process `pid`'s budget state: its thinning and its losses.
    pub fn budget(&self, pid: u32) -> Option<Budget> {
        let w = self.sampled.as_ref()?.budgets.get(&pid, 0).ok()?;
        Some(Budget {
            window_ns: w[0],
            used: w[1],
            shift: w[2],
            max_shift: w[3],
            thinned: w[4],
            table_full: w[5],
        })
    }

    /// [`Tracer::budget`], and forgets it (the process exited).
    pub fn take_budget(&mut self, pid: u32) -> Option<Budget> {
        let b = self.budget(pid);
        if let Some(s) = self.sampled.as_mut() {
            let _ = s.budgets.remove(&pid);
        }
        b
    }

    /// The sampled tier's counters, summed over CPUs (zeros in exact mode).
    pub fn sample_counters(&self) -> Vec<(SampleCounter, u64)> {
        SampleCounter::ALL
            .iter()
            .map(|c| {
                (
                    *c,
                    self.sampled
                        .as_ref()
                        .map_or(0, |s| summed(&s.counts, *c as u32)),
                )
            })
            .collect()
    }
}

/// A probed function as probe lists name it: its symbol, the other names
/// at its address (`=alias`), and `+N` when probed past its entry at an
/// instruction the kernel emulates.
fn probe_name(site: &Site) -> String {
    let mut name = display_name(&site.want.symbol).into_owned();
    for a in &site.aliases {
        name.push('=');
        name.push_str(&display_name(a));
    }
    if site.probe != site.offset {
        name.push_str(&format!("+{}", site.probe - site.offset));
    }
    name
}

/// The probe list entry of `lib`'s `found` functions.
fn probes_of(lib: &Library, found: &Found, pids: Vec<u32>, functions: Vec<String>) -> Probes {
    Probes {
        module: lib.display.clone(),
        allocators: found.allocators.iter().map(|a| a.to_string()).collect(),
        pids,
        functions,
        missing: found
            .missing
            .iter()
            .map(|m| display_name(m).into_owned())
            .collect(),
    }
}

/// Slot `slot` of a per-CPU counter array, summed over CPUs (0 if
/// unreadable).
fn summed(counts: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    counts.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// Loads (and has the kernel verify) uprobe program `name` unless it is
/// already: at the first library that needs it, so a program for functions no
/// probed library has costs no attach time, but before any of that library's
/// probes is attached (see [`Tracer::attach`]).
fn load_uprobe(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let prog: &mut UProbe = program(ebpf, name)?
        .try_into()
        .map_err(|e| internal(name, e))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| load_error(name, &e))?;
    }
    Ok(())
}

/// Attaches program `name` at `site`'s probe point.
fn attach_uprobe(
    ebpf: &mut Ebpf,
    name: &str,
    site: &Site,
    lib: &Library,
    scope: UProbeScope,
) -> Result<UProbeLink> {
    load_uprobe(ebpf, name)?;
    let prog: &mut UProbe = program(ebpf, name)?
        .try_into()
        .map_err(|e| internal(name, e))?;
    let id = prog.attach(site.probe, &lib.path, scope).map_err(|e| {
        // A pid-scoped probe fails once its process is gone: say that, not
        // that the kernel lacks uprobes.
        if let UProbeScope::OneProcess(pid) = scope
            && crate::target::has_exited(pid.get())
        {
            return UserError::new(
                format!("PID {pid} exited while memtrace was attaching its probes; nothing was traced"),
                "trace a process that keeps running, or start the program under memtrace: memtrace -- CMD",
            );
        }
        UserError::new(
            format!(
                "attaching {name} to {} at offset {:#x} ({}+{}) failed: {e}",
                lib.display,
                site.probe,
                site.want.symbol,
                site.probe - site.offset
            ),
            "the kernel needs CONFIG_UPROBE_EVENTS; is the library on a filesystem that supports uprobes?",
        )
    })?;
    prog.take_link(id).map_err(|e| internal(name, e))
}

/// The cost floor of tracing, for `cargo xtask bench`: programs that do
/// nothing on exactly the probe points memtrace uses (entry and return of
/// each allocator function, `free`'s entry), so the traps alone are
/// measured. Detaches when dropped.
pub struct Floor {
    ebpf: Ebpf,
    stats: Option<OwnedFd>,
    _links: Vec<UProbeLink>,
}

impl Floor {
    /// Probes the allocator functions of `libs` in process `pid`; with
    /// `probe_cost`, the kernel times the programs ([`Floor::probe_cost`]).
    pub fn attach(libs: &[Library], pid: u32, probe_cost: bool) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", 4096)
            .load(EBPF_OBJECT)
            .map_err(|e| internal("the eBPF object", e))?;
        for name in ["floor_enter", "floor_exit"] {
            let prog: &mut UProbe = program(&mut ebpf, name)?
                .try_into()
                .map_err(|e| internal(name, e))?;
            prog.load().map_err(|e| load_error(name, &e))?;
        }
        let scope = UProbeScope::OneProcess(
            NonZeroU32::new(pid).ok_or_else(|| internal("the floor", "pid 0"))?,
        );
        let mut links = Vec::new();
        for lib in libs.iter().filter(|l| l.kind != LibKind::Loader) {
            for site in &sites_of(lib, Some(pid))?.sites {
                links.push(attach_uprobe(&mut ebpf, "floor_enter", site, lib, scope)?);
                if site.want.func.is_some() {
                    links.push(attach_uprobe(&mut ebpf, "floor_exit", site, lib, scope)?);
                }
            }
        }
        Ok(Self {
            ebpf,
            stats: probe_cost.then(run_time_stats).transpose()?,
            _links: links,
        })
    }

    /// How long the empty programs ran, with `probe_cost`; else nothing.
    pub fn probe_cost(&self) -> Vec<ProgramCost> {
        match self.stats {
            Some(_) => costs(&self.ebpf),
            None => Vec::new(),
        }
    }
}

/// Turns on the kernel's BPF run-time statistics until the returned fd
/// closes. They are host-wide: every BPF program on the host pays two clock
/// reads per run meanwhile, which is why they are asked for, not default.
fn run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        UserError::new(
            format!("cannot turn on the kernel's BPF statistics: {e}"),
            "--probe-cost needs kernel 5.8 or later and CAP_SYS_ADMIN",
        )
    })
}

/// Run time and count of each program of `ebpf` that ran.
fn costs(ebpf: &Ebpf) -> Vec<ProgramCost> {
    let mut out: Vec<ProgramCost> = ebpf
        .programs()
        .filter_map(|(name, prog)| {
            let info = prog.info().ok()?;
            (info.run_count() > 0).then(|| ProgramCost {
                program: name.to_string(),
                runs: info.run_count(),
                run_ns: info.run_time().as_nanos() as u64,
            })
        })
        .collect();
    out.sort_by(|a, b| a.program.cmp(&b.program));
    out
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| internal(name, "program missing from the eBPF object"))
}

fn internal(what: &str, e: impl std::fmt::Display) -> UserError {
    UserError::new(
        format!("internal error with {what}: {e}"),
        "the embedded eBPF object does not match this binary; rebuild with `cargo xtask build`",
    )
}
