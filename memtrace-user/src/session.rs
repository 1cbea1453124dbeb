//! One tracing run, from parsed arguments to the final report: pick targets,
//! load and attach, then read the ring buffer until a stop condition
//! (duration, Ctrl-C/SIGTERM, the command exited, every `--pid` target
//! exited), printing interval reports on the way and, when asked, writing
//! every event to a recording (flushed once a second, closed at the end).
//!
//! This is glue: decoding, accounting, recording, symbolization and
//! rendering live in their own modules.

use std::io::Write;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use memtrace_common::{Counter, PyConfig, RecordKind};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::agg::{Aggregator, Config, SizeFilter};
use crate::attach::{self, LibKind, Library};
use crate::cli::{CountArgs, TargetArgs, TraceArgs, Unwind};
use crate::error::{Result, UserError};
use crate::event::{self, Event, VmCall};
use crate::guard::Guard;
use crate::load::{CopiedStacks, KernelOptions, Tracer};
use crate::output::{self, Inputs};
use crate::probing::Probing;
use crate::python::{self, Python};
use crate::record::writer::Recorder;
use crate::record::{Meta, ProbesMeta, Start};
use crate::report::{self, Ledger, Probes, SelfUsage};
use crate::symbolize::Symbols;
use crate::target::{self, GatedChild};
use crate::unwind::{self, StackUnwinder};

/// Records handled between two looks at timers and signals.
const BATCH: usize = 16 * 1024;

/// How often the ring buffer is drained without a wakeup.
const POLL: Duration = Duration::from_millis(10);

/// Why tracing stopped.
enum Stop {
    Signal,
    Duration,
    TargetsExited,
    Child(i32),
    RecordingFailed,
    /// An error while tracing: reported once everything is cleaned up.
    Failed(UserError),
}

/// Everything fed by the ring buffer.
struct State {
    agg: Aggregator,
    symbols: Symbols,
    decode_errors: u64,
    recorder: Option<Recorder>,
    /// Processes the OOM killer chose, whose reports are not written yet.
    oom_victims: Vec<u32>,
    /// Children followed from their fork (`--follow-forks`).
    followed: Vec<u32>,
    /// Execs and loader stops, for [`Probing::note`]: taken after each drain.
    relook: Vec<Event>,
    /// Every process is traced: the libraries probed are those found at the
    /// start, and execs are not looked at again.
    system_wide: bool,
    /// `--follow-forks`: the trace lasts while a followed child runs.
    follow_forks: bool,
    /// Walks the stacks the kernel side copies (`--unwind dwarf`).
    unwinder: StackUnwinder,
    /// `--unwind`.
    unwind: Unwind,
    /// Which processes' stacks are copied. With any, the unwinder reads a
    /// process's mappings whenever it has new ones, while it lives; with
    /// listed ones, one that execs gets its new main stack's top, and with
    /// `auto` is unwound as its new program needs.
    copied_stacks: CopiedStacks,
    /// Python frames: the interpreters found, stacks waiting for their
    /// allocation (off with `--no-python`).
    python: Option<Python>,
    /// Processes that exec'd, to look at for an interpreter until one is
    /// found or the time is up (it maps its `libpython` after the exec).
    python_check: Vec<(u32, std::time::Instant)>,
}

/// How long after an exec memtrace looks for an interpreter the program
/// loads.
const PYTHON_CHECK: Duration = Duration::from_secs(2);

impl State {
    fn handle(&mut self, bytes: &[u8]) {
        match event::kind(bytes) {
            // The Python frames of the allocation that comes next.
            Some(RecordKind::PyStack) => {
                if let Some(py) = &mut self.python {
                    py.record(bytes);
                }
                return;
            }
            // A code object those frames name, copied.
            Some(RecordKind::PyCode) => {
                if let Some(py) = &mut self.python {
                    py.code_record(bytes);
                }
                return;
            }
            _ => {}
        }
        match event::decode(bytes) {
            Ok(mut ev) => {
                // A copied stack: its frames are found here, before anything
                // (the recording too) sees the event.
                if let Event::Alloc(a) = &mut ev
                    && let Ok(raw) = event::raw_stack(bytes)
                {
                    a.stack = self.unwinder.unwind(a.pid, &raw);
                }
                // So are its Python frames.
                if let (Event::Alloc(a), Some(py)) = (&mut ev, &mut self.python) {
                    py.complete(&mut self.symbols.python, a.tid, a);
                }
                self.apply(&ev)
            }
            Err(_) => self.decode_errors += 1,
        }
    }

    fn apply(&mut self, ev: &Event) {
        // Not about memory: the session acts on it (see `probing`).
        if let Event::Loaded { pid, .. } = ev {
            self.symbols.maps_changed(*pid);
            // It waits, stopped, for this.
            if self.copied_stacks != CopiedStacks::None {
                self.unwinder.refresh(*pid);
            }
            self.relook.push(ev.clone());
            return;
        }
        // Its name, read while it lives, whatever its first event is (the
        // kernel side's carry no stack to trigger it).
        if let Event::Fork {
            pid, parent, comm, ..
        } = ev
        {
            self.symbols.fork(*parent, *pid, comm.as_deref());
            if self.copied_stacks != CopiedStacks::None {
                self.unwinder.fork(*parent, *pid);
            }
        }
        if !self.symbols.knows(ev.pid()) && !matches!(ev, Event::Exit { .. }) {
            self.symbols.observe(ev.pid(), &[]);
            // The kernel side reports RSS counters as they change: the
            // ones that do not change yet come from /proc, once.
            for seed in target::resident_now(ev.pid(), ev.ts_ns()) {
                self.apply_one(&seed);
            }
        }
        self.apply_one(ev);
    }

    fn apply_one(&mut self, ev: &Event) {
        let new = self.agg.on_event(ev).is_some();
        // The recording keeps stacks outside the size filter too.
        let recorded_new = self.recorder.as_mut().is_some_and(|r| r.record(ev));
        if new || recorded_new {
            // Resolved now, while the process (and its mappings) lives.
            if let Some(stack) = ev.stack() {
                self.symbols.observe(ev.pid(), stack);
            }
        }
        match ev {
            Event::Vm(v) if maps_code(&v.call) => {
                self.symbols.maps_changed(v.pid);
                self.unwinder.maps_changed(v.pid);
            }
            Event::Exit { pid, .. } => {
                self.unwinder.forget(*pid);
                if let Some(py) = &mut self.python {
                    py.forget(*pid);
                }
            }
            Event::Oom(o) => self.oom_victims.push(o.pid),
            Event::Exec { pid, comm, .. } => {
                if let Some(py) = &mut self.python {
                    py.forget(*pid);
                    self.python_check.push((*pid, std::time::Instant::now()));
                }
                self.symbols.exec(*pid, comm.as_deref());
                if self.copied_stacks != CopiedStacks::None {
                    self.unwinder.refresh(*pid);
                }
                if !self.system_wide {
                    self.relook.push(ev.clone());
                }
            }
            Event::Fork { pid, .. } if self.follow_forks => self.followed.push(*pid),
            _ => {}
        }
    }

    /// Probes what the processes that exec'd or stopped at the loader's hook
    /// map now, continues the stopped ones, and notes new probes in the
    /// recording.
    fn relook(&mut self, probing: &mut Probing, tracer: &mut Tracer) {
        self.look_for_python(tracer);
        if self.relook.is_empty() {
            return;
        }
        let events: Vec<Event> = self.relook.drain(..).collect();
        for ev in events {
            if let Event::Loaded { pid, .. } = ev {
                // It mapped its libraries (libpython among them, perhaps),
                // and waits.
                self.find_python(tracer, pid);
            }
            if let Event::Exec { pid, .. } = ev {
                // A new program, a new main stack, perhaps other code. A
                // failure leaves the process as it was: frames stay right
                // where its code has frame pointers, and the copy stops at
                // an unreadable page where it does not know the top.
                let top = unwind::main_stack_top(pid);
                let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
                if self.copied_stacks == CopiedStacks::Listed {
                    let _ = choose_unwind(tracer, self.unwind, pid, &exe, top);
                }
            }
            probing.note(&ev);
        }
        probing.settle(tracer);
        if probing.take_changed()
            && let Some(r) = &mut self.recorder
        {
            r.meta(&Meta::Probes {
                probes: probing.probes().iter().map(ProbesMeta::from).collect(),
            });
        }
    }

    /// Looks for an interpreter in process `pid`; once found, its
    /// allocations carry Python frames. Returns whether it was found.
    fn find_python(&mut self, tracer: &mut Tracer, pid: u32) -> bool {
        let Some(py) = &mut self.python else {
            return false;
        };
        if py.knows(pid) {
            return true;
        }
        let Ok(Some(interp)) = python::find::find(pid) else {
            return false;
        };
        let traced = match interp.layout {
            Some(layout) => {
                let config = PyConfig {
                    runtime: interp.runtime,
                    ..layout.walk
                };
                tracer.trace_python(pid, &config).is_ok()
            }
            None => {
                eprintln!(
                    "memtrace: PID {pid} runs {}, whose frames memtrace cannot read (it knows CPython {}): its stacks show native frames only",
                    interp.name(),
                    python::layout::known_versions()
                );
                true
            }
        };
        if traced {
            py.add(pid, interp);
        }
        traced
    }

    /// Looks at the processes that exec'd lately for an interpreter.
    fn look_for_python(&mut self, tracer: &mut Tracer) {
        if self.python_check.is_empty() {
            return;
        }
        let mut checks = std::mem::take(&mut self.python_check);
        checks.retain(|&(pid, since)| {
            !self.find_python(tracer, pid)
                && since.elapsed() < PYTHON_CHECK
                && !target::has_exited(pid)
        });
        checks.append(&mut self.python_check);
        self.python_check = checks;
    }

    /// Handles up to `max` records; returns whether the ring is empty. The
    /// cap keeps a flood from starving timers and signals. A process stopped
    /// at the loader's hook ends the batch early: it waits for [`Self::relook`].
    fn drain(&mut self, ring: &mut RingBuf<MapData>, max: usize) -> bool {
        for _ in 0..max {
            match ring.next() {
                Some(item) => self.handle(&item),
                None => return true,
            }
            if matches!(self.relook.last(), Some(Event::Loaded { .. })) {
                return false;
            }
        }
        false
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether an address-space call may have mapped code (for symbols).
pub fn maps_code(call: &VmCall) -> bool {
    match call {
        VmCall::Mmap { prot, .. } => *prot & libc::PROT_EXEC as u32 != 0,
        VmCall::Mremap { .. } => true,
        _ => false,
    }
}

/// How the stacks of one process running the program at `exe` are taken,
/// with processes listed for copied stacks: copied for DWARF unwinding with
/// `--unwind dwarf`, and with `auto` when the program's code lacks frame
/// pointers; else walked by them. `top`: its main stack's end (0 unknown).
fn choose_unwind(
    tracer: &mut Tracer,
    mode: Unwind,
    pid: u32,
    exe: &std::path::Path,
    top: u64,
) -> Result<()> {
    if mode == Unwind::Fp || (mode == Unwind::Auto && unwind::frame_pointers(exe)) {
        tracer.unwind_by_frame_pointers(pid);
        Ok(())
    } else {
        tracer.unwind_in_user_space(pid, top)
    }
}

/// Lists the targets whose stacks are copied (with [`CopiedStacks::Listed`]).
fn list_for_unwinding(
    tracer: &mut Tracer,
    args: &TargetArgs,
    child: Option<&GatedChild>,
) -> Result<()> {
    let targets = args.pids.iter().map(|&p| {
        let exe = std::path::PathBuf::from(format!("/proc/{p}/exe"));
        (p, Some(exe), unwind::main_stack_top(p))
    });
    // The command's main stack is not there yet: it comes at its exec.
    let command = child.map(|c| (c.pid, attach::program_path(&args.command[0]), 0));
    for (pid, exe, top) in targets.chain(command) {
        let exe = exe.unwrap_or_default();
        choose_unwind(tracer, args.unwind, pid, &exe, top)?;
    }
    Ok(())
}

/// How the kernel side takes the targets' stacks (`--unwind`), and which
/// processes it copies them for, as the loader needs it.
fn copied_stacks(args: &TargetArgs) -> CopiedStacks {
    match (args.unwind, args.system_wide()) {
        (Unwind::Fp, _) | (Unwind::Auto, true) => CopiedStacks::None,
        (Unwind::Dwarf, true) => CopiedStacks::All,
        (Unwind::Dwarf | Unwind::Auto, false) => CopiedStacks::Listed,
    }
}

/// Libraries to probe for each target; `None` as pid means every process.
fn plan(args: &TargetArgs, child: Option<&GatedChild>) -> Result<Vec<(Library, Option<u32>)>> {
    if let Some(child) = child {
        let program = &args.command[0];
        let kind = attach::command_kind(program);
        if kind == attach::ProgramKind::Go {
            return Err(no_libc(program, kind));
        }
        // A program without libc.so.6 (static, or on musl) maps none of the
        // host's libraries; each probe costs time to attach and detach.
        let mut libs = match kind {
            attach::ProgramKind::NoSharedLibc => Vec::new(),
            _ => attach::host_libraries(),
        };
        for lib in attach::program_libraries(program) {
            if !libs.iter().any(|l| l.id == lib.id) {
                libs.push(lib);
            }
        }
        // Without libstdc++ there is no `operator new` to probe.
        if !attach::links_libstdcxx(program) {
            libs.retain(|l| l.kind != LibKind::Libstdcxx);
        }
        if !libs.iter().any(|l| holds_allocator(l.kind)) {
            if kind == attach::ProgramKind::NoSharedLibc {
                return Err(no_libc(program, kind));
            }
            return Err(UserError::new(
                "memtrace cannot find the C library it runs on, to probe for the command",
                "is memtrace itself statically linked? build it against glibc",
            ));
        }
        return Ok(libs.into_iter().map(|l| (l, Some(child.pid))).collect());
    }
    if !args.pids.is_empty() {
        let mut out = Vec::new();
        for &pid in &args.pids {
            target::check_pid(pid)?;
            let libs = attach::libraries_of(pid).map_err(|e| {
                if target::has_exited(pid) {
                    return UserError::new(
                        format!("PID {pid} exited while memtrace was attaching; nothing was traced"),
                        "trace a process that keeps running, or start the program under memtrace: memtrace -- CMD",
                    );
                }
                UserError::new(
                    format!("cannot read the memory map of PID {pid}: {e}"),
                    "run memtrace as root",
                )
            })?;
            let mut libs = libs;
            if !libs.iter().any(|l| holds_allocator(l.kind)) {
                let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
                // Between an exec and its loader's mapping of the program's
                // libraries, only the program and the loader are mapped.
                // Probe what a command would get (the host's libc, the
                // program's own allocator); the loader's hook stops it once
                // its libraries are mapped, and `settle` probes them.
                let in_exec = libs.iter().any(|l| l.kind == LibKind::Loader)
                    && attach::program_kind(&exe) == attach::ProgramKind::SharedLibc;
                if !in_exec {
                    let what = format!("PID {pid} ({})", target::comm(pid));
                    return Err(no_libc(&what, attach::program_kind(&exe)));
                }
                for lib in attach::host_libraries()
                    .into_iter()
                    .chain(attach::program_libraries(&exe.to_string_lossy()))
                {
                    if !libs.iter().any(|l| l.id == lib.id) {
                        libs.push(lib);
                    }
                }
            }
            out.extend(libs.into_iter().map(|l| (l, Some(pid))));
        }
        return Ok(out);
    }
    // Every process: every distinct allocator library any process maps.
    let mut libs: Vec<Library> = attach::host_libraries();
    let entries = std::fs::read_dir("/proc")
        .map_err(|e| UserError::new(format!("cannot list /proc: {e}"), "is /proc mounted?"))?;
    // No loader hook: stopping every process on the host at each dlopen is
    // not a price system-wide tracing should make it pay.
    libs.retain(|l| l.kind != LibKind::Loader);
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // memtrace's own allocator (its binary's, linked in): the programs
        // skip memtrace, so its probes would only cost time.
        if pid == std::process::id() {
            continue;
        }
        for lib in attach::libraries_of(pid).unwrap_or_default() {
            if lib.kind != LibKind::Loader && !libs.iter().any(|l| l.id == lib.id) {
                libs.push(lib);
            }
        }
    }
    Ok(libs.into_iter().map(|l| (l, None)).collect())
}

fn describe(args: &TargetArgs, child: Option<&GatedChild>) -> String {
    let what = describe_targets(args, child);
    if args.follow_forks {
        format!("{what} and the processes it forks")
    } else {
        what
    }
}

fn describe_targets(args: &TargetArgs, child: Option<&GatedChild>) -> String {
    if let Some(child) = child {
        format!("command `{}` (PID {})", args.command.join(" "), child.pid)
    } else if !args.pids.is_empty() {
        let targets: Vec<String> = args
            .pids
            .iter()
            .map(|p| format!("PID {p} ({})", target::comm(*p)))
            .collect();
        targets.join(", ")
    } else {
        "every process".into()
    }
}

/// The aggregator's settings from the command line (`defaults` from a
/// recording, where options were not given).
pub fn config(count: &CountArgs, defaults: Option<&Start>) -> Config {
    let d = Config::default();
    Config {
        fault_sample: defaults.map_or(d.fault_sample, |s| s.fault_sample),
        filter: SizeFilter {
            min: count.min_size.or(defaults.map(|s| s.min_size)).unwrap_or(0),
            max: count
                .max_size
                .or(defaults.map(|s| s.max_size))
                .unwrap_or(u64::MAX),
        },
        temporary_ns: count
            .temporary_ms
            .map(|ms| (ms * 1e6) as u64)
            .or(defaults.map(|s| s.temporary_ns))
            .unwrap_or(d.temporary_ns),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn start_recording(
    path: &std::path::Path,
    config: &Config,
    start_ns: u64,
    what: &str,
) -> Result<Recorder> {
    let start = Start {
        memtrace: env!("CARGO_PKG_VERSION").into(),
        start_ns,
        start_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        host: host_name(),
        target: what.into(),
        argv: std::env::args().collect(),
        min_size: config.filter.min,
        max_size: config.filter.max,
        temporary_ns: config.temporary_ns,
        fault_sample: config.fault_sample,
    };
    Recorder::create(path, start)
}

/// Runs the trace; returns the exit status. With `record_only`, nothing is
/// reported: the run goes to the recording (`--record`), and a summary to
/// standard error.
pub async fn run(args: TraceArgs, record_only: bool) -> Result<i32> {
    args.validate()
        .map_err(|m| UserError::new(m, "see memtrace --help"))?;
    target::check_privileges()?;
    crate::allocators::probe_python_allocators(args.target.python_allocators);
    let mut out = if record_only {
        Box::new(std::io::sink())
    } else {
        output::open(args.view.output.as_deref())?
    };
    // Caught from the start, so Ctrl-C while attaching still ends in a report.
    let signal_err =
        |e: std::io::Error| UserError::new(format!("cannot catch signals: {e}"), "this is a bug");
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err)?;
    let config = Config {
        fault_sample: args.target.fault_sample,
        ..config(&args.count, None)
    };
    let start_ns = monotonic_ns();
    // Created before anything is attached, so a bad path costs nothing.
    let mut recorder = match &args.record {
        Some(path) => Some(start_recording(path, &config, start_ns, "")?),
        None => None,
    };
    // A run that fails before tracing leaves no recording behind.
    let mut unfinished = Unfinished(args.record.clone());

    let target_args = &args.target;
    let child = if target_args.command.is_empty() {
        None
    } else {
        Some(target::spawn_gated(&target_args.command)?)
    };
    let plan = plan(target_args, child.as_ref())?;
    let copied_stacks = copied_stacks(target_args);
    let mut tracer = Tracer::load(
        target_args.ringbuf_size << 20,
        KernelOptions {
            all_processes: target_args.system_wide(),
            fault_sample: target_args.fault_sample,
            kernel_allocations: target_args.kernel,
            probe_cost: target_args.probe_cost,
            follow_forks: target_args.follow_forks,
            copied_stacks,
            python: !target_args.no_python,
            sampling: None,
        },
    )?;
    if copied_stacks == CopiedStacks::Listed {
        list_for_unwinding(&mut tracer, target_args, child.as_ref())?;
    }
    for pid in target_args
        .pids
        .iter()
        .chain(child.as_ref().map(|c| &c.pid))
    {
        tracer.trace_process(*pid)?;
    }
    // With --follow-forks the children are not known yet: the probes go on
    // every process, once per file, and the programs keep the followed ones
    // (`TRACED`).
    let mut probing = Probing::new(target_args.follow_forks);
    // Processes stopped at the loader's hook are continued even if memtrace
    // is killed (not tracing every process: no hook then).
    let guard = if target_args.system_wide() {
        None
    } else {
        let (id, stopped) = tracer.stopped()?;
        probing.set_stopped(stopped);
        Some(Guard::spawn(id)?)
    };
    // The loader's hook first: a target that execs (or is still in its
    // loader) while the rest is attached waits at the hook, stopped, until
    // `relook` has probed what it mapped.
    let (hooks, allocators): (Vec<_>, Vec<_>) = plan
        .iter()
        .partition(|(lib, _)| lib.kind == LibKind::Loader);
    for (lib, pid) in hooks.into_iter().chain(allocators) {
        probing.attach(&mut tracer, lib, *pid)?;
    }
    // What the targets mapped while the probes went on (an exec, the loader
    // mapping libc): looked at again before tracing is announced.
    for &pid in &target_args.pids {
        probing.relook_later(pid);
    }
    probing.settle(&mut tracer);
    probing.take_changed();
    let ring = tracer.ring_buffer()?;
    // SAFETY: the ring buffer owns its descriptor and keeps it open, and
    // unchanged, for as long as the AsyncFd holds it.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = registered.map_err(|e| {
        UserError::new(format!("cannot poll the ring buffer: {e}"), "this is a bug")
    })?;
    let what = describe(target_args, child.as_ref());
    if let Some(r) = &mut recorder {
        r.meta(&Meta::Target {
            target: what.clone(),
        });
        r.meta(&Meta::Probes {
            probes: probing.probes().iter().map(ProbesMeta::from).collect(),
        });
    }

    let mut state = State {
        agg: Aggregator::new(config),
        symbols: Symbols::new(),
        decode_errors: 0,
        recorder,
        oom_victims: Vec::new(),
        followed: Vec::new(),
        relook: Vec::new(),
        system_wide: target_args.system_wide(),
        follow_forks: target_args.follow_forks,
        unwinder: StackUnwinder::new(),
        unwind: target_args.unwind,
        copied_stacks,
        python: (!target_args.no_python).then(Python::default),
        python_check: Vec::new(),
    };
    // The interpreters running already (every one, tracing every process).
    let running: Vec<u32> = if target_args.system_wide() {
        target::all_pids()
    } else {
        target_args.pids.clone()
    };
    for pid in running {
        state.find_python(&mut tracer, pid);
    }
    if copied_stacks != CopiedStacks::None {
        for &pid in &target_args.pids {
            state.unwinder.refresh(pid);
        }
    }
    for &pid in &target_args.pids {
        state.symbols.observe(pid, &[]);
        // What is resident already: the kernel reports only changes.
        for ev in target::resident_now(pid, monotonic_ns()) {
            state.apply_one(&ev);
        }
    }
    let mut child_status = child.as_ref().map(|c| target::wait_in_background(c.pid));
    // The command's exit status, once it exited (with --follow-forks, before
    // its children did).
    let mut command_status: Option<i32> = None;
    if let Some(child) = child {
        child.release().map_err(|e| {
            UserError::new(
                format!("cannot run {}: {e}", target_args.command[0]),
                "is it a program for this machine, or a script without a #! line?",
            )
        })?;
    }
    let until = target_args
        .effective_duration()
        .map(|d| format!(" for {d} s"))
        .unwrap_or_default();
    let into = state
        .recorder
        .as_ref()
        .map(|r| format!(", recording to {}", r.path().display()))
        .unwrap_or_default();
    eprintln!("memtrace: tracing {what}{until}{into}; stop with Ctrl-C");
    unfinished.0 = None;

    let deadline = target_args
        .effective_duration()
        .map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    let period = args.interval.map(Duration::from_secs_f64);
    let mut next_report = period.map(|p| tokio::time::Instant::now() + p);
    let mut liveness = tokio::time::interval(Duration::from_millis(250));
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    // Records do not wake memtrace until an eighth of the ring is full (a
    // wakeup per record costs the traced thread an interrupt); this timer
    // keeps what waits fresh.
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The most records the ring can hold (the smallest is 24 bytes, plus the
    // kernel's 8-byte record header).
    let backlog = ((target_args.ringbuf_size as usize) << 20) / 32;

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => break Stop::Failed(UserError::new(format!("ring buffer poll failed: {e}"), "this is a bug")),
                };
                // The kernel wakes a reader only once it has caught up, so
                // readiness is cleared only when the ring is empty.
                if state.drain(guard.get_inner_mut(), BATCH) {
                    guard.clear_ready();
                }
                state.relook(&mut probing, &mut tracer);
            }
            _ = poll.tick() => {
                state.drain(ring.get_mut(), BATCH);
                state.relook(&mut probing, &mut tracer);
            }
            _ = sigint.recv() => break Stop::Signal,
            _ = sigterm.recv() => break Stop::Signal,
            _ = sleep_until(deadline) => break Stop::Duration,
            _ = sleep_until(next_report) => {
                state.drain(ring.get_mut(), backlog);
                state.relook(&mut probing, &mut tracer);
                let now = Snapshot::take(&tracer, &state, start_ns);
                if let Err(e) = emit(&args, &mut state, probing.probes(), &now, start_ns, &mut out) {
                    break Stop::Failed(e);
                }
                next_report = period.map(|p| tokio::time::Instant::now() + p);
            }
            _ = flush.tick(), if state.recorder.is_some() => {
                let now = Snapshot::take(&tracer, &state, start_ns);
                if !state.flush_recording(&now) && record_only {
                    break Stop::RecordingFailed;
                }
            }
            code = wait(&mut child_status) => {
                // With --follow-forks the trace goes on while a child does.
                if !target_args.follow_forks {
                    break Stop::Child(code);
                }
                command_status = Some(code);
            }
            _ = liveness.tick(), if !target_args.pids.is_empty() || target_args.follow_forks => {
                let gone = |p: &u32| state.agg.has_exited(*p) || target::has_exited(*p);
                let targets_gone = if target_args.pids.is_empty() {
                    command_status.is_some()
                } else {
                    target_args.pids.iter().all(gone)
                };
                if targets_gone && state.followed.iter().all(gone) {
                    break command_status.map_or(Stop::TargetsExited, Stop::Child);
                }
            }
        }
        if !state.oom_victims.is_empty() {
            let now = Snapshot::take(&tracer, &state, start_ns);
            write_oom_reports(target_args, &mut state, probing.probes(), &now, start_ns);
        }
    };
    // What the ring holds now, not what a busy host keeps adding.
    state.drain(ring.get_mut(), backlog);
    // No process is left stopped at the loader's hook.
    state.relook(&mut probing, &mut tracer);
    let now = Snapshot::take(&tracer, &state, start_ns);
    write_oom_reports(target_args, &mut state, probing.probes(), &now, start_ns);
    let emitted = if record_only || matches!(stop, Stop::Failed(_)) {
        Ok(())
    } else {
        emit(
            &args,
            &mut state,
            probing.probes(),
            &now,
            start_ns,
            &mut out,
        )
    };
    let recorded = state.finish_recording(&now);
    // Said before the probes go: their removal takes the kernel a while, and
    // the report and recording are complete already.
    if let Some((path, bytes, events)) = &recorded {
        summarize(path, *bytes, *events, now.ledger.traced_calls);
    }
    tracer.detach();
    // A process may have stopped at the loader's hook after the last drain,
    // until the probes went: continue it.
    probing.continue_stopped(&mut ring.into_inner());
    if let Some(g) = guard {
        g.finish();
    }
    emitted?;
    if let Stop::Failed(e) = stop {
        return Err(e);
    }
    // A recording asked for and not written fails the run, whatever the
    // traced command's own status.
    if args.record.is_some() && recorded.is_none() {
        return Ok(2);
    }
    Ok(match stop {
        Stop::Child(code) => code,
        Stop::RecordingFailed => 2,
        Stop::Signal | Stop::Duration | Stop::TargetsExited | Stop::Failed(_) => 0,
    })
}

/// Removes a recording on drop unless disarmed.
struct Unfinished(Option<std::path::PathBuf>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn summarize(path: &std::path::Path, bytes: u64, events: u64, calls: u64) {
    let per = |n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", bytes as f64 / n as f64)
        }
    };
    eprintln!(
        "memtrace: recorded {} events ({} traced calls) in {} bytes to {}: {} bytes per event, {} per traced call",
        report::text::group(events),
        report::text::group(calls),
        report::text::group(bytes),
        path.display(),
        per(events),
        per(calls),
    );
    eprintln!(
        "memtrace: view it with `memtrace report {}` (--view leaks|peak|temporary|histograms|timeline, --format text|json|flamegraph|folded|pprof|html|svg|hlog)",
        path.display()
    );
}

/// What reports and the recording need to know at one moment.
struct Snapshot {
    ledger: Ledger,
    now_ns: u64,
    duration_s: f64,
}

/// The DWARF walks that stopped short, for the report's list of what was
/// not seen; nothing when no stack was copied.
fn unwind_losses(u: &StackUnwinder) -> Option<(&'static str, u64)> {
    let stats = u.stats();
    (stats.stacks > 0).then_some((unwind::STACKS_CUT, stats.cut))
}

impl Snapshot {
    /// `start_ns`: when memtrace began, before attaching (probes fire
    /// from the first attach on, so that is when tracing began).
    fn take(tracer: &Tracer, state: &State, start_ns: u64) -> Self {
        let counters = tracer.counters();
        let now_ns = monotonic_ns();
        Self {
            ledger: Ledger {
                kernel: counters
                    .iter()
                    .filter(|(c, _)| *c != Counter::Calls)
                    .map(|(c, v)| (c.name(), *v))
                    .chain(unwind_losses(&state.unwinder))
                    .collect(),
                decode_errors: state.decode_errors,
                traced_calls: counters
                    .iter()
                    .find(|(c, _)| *c == Counter::Calls)
                    .map_or(0, |(_, v)| *v),
                probe_cost: tracer.probe_cost(),
                lost_sites: tracer.lost_sites(),
                memtrace: Some(SelfUsage::now()),
                dwarf: state
                    .unwinder
                    .stats_by_pid()
                    .iter()
                    .map(|(&pid, s)| {
                        let walks = report::DwarfWalks {
                            stacks: s.stacks,
                            cut: s.cut,
                        };
                        (pid, walks)
                    })
                    .collect(),
                python: state
                    .python
                    .iter()
                    .flat_map(Python::stats)
                    .map(|(pid, s)| (pid, s.clone()))
                    .collect(),
            },
            now_ns,
            duration_s: now_ns.saturating_sub(start_ns) as f64 / 1e9,
        }
    }
}

impl State {
    /// Flushes the recording; on a write error, says so, stops recording
    /// and returns false.
    fn flush_recording(&mut self, now: &Snapshot) -> bool {
        let Some(r) = &mut self.recorder else {
            return true;
        };
        match r.flush(&mut self.symbols, &output::counters_of(&now.ledger)) {
            Ok(()) => true,
            Err(e) => {
                recording_failed(r.path(), &e);
                self.recorder = None;
                false
            }
        }
    }

    /// Closes the recording; returns its path, size and events, or `None`
    /// when it failed (and says so).
    fn finish_recording(&mut self, now: &Snapshot) -> Option<(std::path::PathBuf, u64, u64)> {
        let r = self.recorder.take()?;
        let path = r.path().to_path_buf();
        let events = r.events();
        let counters = output::counters_of(&now.ledger);
        match r.finish(&mut self.symbols, &counters, now.now_ns, now.duration_s) {
            Ok(written) => Some((path, written, events)),
            Err(e) => {
                recording_failed(&path, &e);
                None
            }
        }
    }
}

fn recording_failed(path: &std::path::Path, e: &std::io::Error) {
    eprintln!(
        "memtrace: cannot write the recording {}: {e}; it stays readable up to its last complete block",
        path.display()
    );
    eprintln!("hint: free disk space or record to another file system");
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The command's exit status, once; then never again.
async fn wait(rx: &mut Option<tokio::sync::oneshot::Receiver<i32>>) -> i32 {
    match rx {
        Some(r) => {
            let code = r.await.unwrap_or(1);
            *rx = None;
            code
        }
        None => std::future::pending().await,
    }
}

fn emit(
    args: &TraceArgs,
    state: &mut State,
    probes: &[Probes],
    now: &Snapshot,
    start_ns: u64,
    out: &mut Box<dyn Write>,
) -> Result<()> {
    let opts = output::options(&args.view, start_ns, now.now_ns, now.duration_s);
    let input = Inputs {
        agg: &state.agg,
        ledger: &now.ledger,
        probes,
        sym: &mut state.symbols,
        opts,
        recording: None,
    };
    output::emit(&args.view, input, out)
}

/// Writes the report of each process the OOM killer chose since the last
/// call: its heap by stack and its memory view, as JSON, while memtrace
/// still holds them (`--oom-dir`).
fn write_oom_reports(
    args: &TargetArgs,
    state: &mut State,
    probes: &[Probes],
    now: &Snapshot,
    start_ns: u64,
) {
    for pid in std::mem::take(&mut state.oom_victims) {
        let opts = report::Options {
            top: 0,
            live_before_ns: None,
            duration_s: now.duration_s,
            start_ns,
            views: vec![report::View::Leaks, report::View::Memory],
        };
        let mut r = report::build(&state.agg, &now.ledger, probes, &mut state.symbols, &opts);
        r.processes
            .retain(|p| p.pid == pid && p.memory.as_ref().is_some_and(|m| m.oom.is_some()));
        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = args.oom_dir.clone().unwrap_or_else(|| ".".into());
        let path = dir.join(format!("memtrace-oom-{pid}-{unix_s}.json"));
        let written = output::open(Some(&path))
            .map_err(|e| e.to_string())
            .and_then(|mut f| {
                report::json::render(&r, &mut f)
                    .and_then(|()| f.flush())
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => eprintln!(
                "memtrace: the OOM killer chose PID {pid} ({}); its memory report is in {}",
                r.processes
                    .first()
                    .and_then(|p| p.comm.clone())
                    .unwrap_or_default(),
                path.display()
            ),
            Err(e) => eprintln!(
                "memtrace: the OOM killer chose PID {pid}; its report could not be written to {}: {e}",
                path.display()
            ),
        }
    }
}

/// Whether a library of this kind is an allocator (not only the loader's
/// hook or `operator new`, which calls one).
fn holds_allocator(kind: LibKind) -> bool {
    matches!(kind, LibKind::Libc | LibKind::Malloc)
}

/// The error for a target without an allocator to probe: a Go program, or a
/// static one stripped of its symbols. `what` names it.
fn no_libc(what: &str, kind: attach::ProgramKind) -> UserError {
    if kind == attach::ProgramKind::Go {
        UserError::new(
            format!(
                "{what} is a Go program: its heap is the Go runtime's own, not libc's malloc, and \
                 uretprobes break Go code (the runtime moves goroutine stacks)"
            ),
            "profile a Go heap with Go's pprof (runtime/pprof, net/http/pprof); memtrace traces C allocators",
        )
    } else {
        UserError::new(
            format!(
                "{what} maps no C library and its symbols show no allocator: it may be a static \
                 binary stripped of its symbols"
            ),
            "memtrace finds a static program's malloc by its symbol table; trace an unstripped build",
        )
    }
}
