//! One tracing run, from parsed arguments to the final report: pick targets,
//! load and attach, then read the ring buffer until a stop condition
//! (duration, Ctrl-C/SIGTERM, the command exited, every `--pid` target
//! exited), printing interval reports on the way.
//!
//! This is glue: decoding, accounting, symbolization and rendering live in
//! their own modules.

use std::io::Write;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use memtrace_common::Counter;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::agg::{Aggregator, Config, SizeFilter};
use crate::attach::{self, LibKind, Library};
use crate::cli::{Args, Format};
use crate::error::{Result, UserError};
use crate::event::{self, Event};
use crate::load::Tracer;
use crate::report::{self, Ledger, Probes};
use crate::symbolize::Symbols;
use crate::target::{self, GatedChild};

/// Records handled between two looks at timers and signals.
const BATCH: usize = 16 * 1024;

/// Why tracing stopped.
enum Stop {
    Signal,
    Duration,
    TargetsExited,
    Child(i32),
}

/// Everything fed by the ring buffer.
struct State {
    agg: Aggregator,
    symbols: Symbols,
    decode_errors: u64,
}

impl State {
    fn handle(&mut self, bytes: &[u8]) {
        match event::decode(bytes) {
            Ok(ev) => {
                let new = self.agg.on_event(&ev);
                if let (Some(_), Event::Alloc(a)) = (new, &ev) {
                    self.symbols.observe(a.pid, &a.stack);
                }
            }
            Err(_) => self.decode_errors += 1,
        }
    }

    /// Handles up to `max` records; returns whether the ring is empty. The
    /// cap keeps a flood from starving timers and signals.
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

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Libraries to probe for each target; `None` as pid means every process.
fn plan(args: &Args, child: Option<&GatedChild>) -> Result<Vec<(Library, Option<u32>)>> {
    if let Some(child) = child {
        let mut libs = attach::host_libraries();
        // Without libstdc++ there is no `operator new` to probe; each probe
        // costs time to attach and detach.
        if !attach::links_libstdcxx(&args.command[0]) {
            libs.retain(|l| l.kind != LibKind::Libstdcxx);
        }
        if !libs.iter().any(|l| l.kind == LibKind::Libc) {
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
                UserError::new(
                    format!("cannot read the memory map of PID {pid}: {e}"),
                    "run memtrace as root",
                )
            })?;
            if !libs.iter().any(|l| l.kind == LibKind::Libc) {
                return Err(UserError::new(
                    format!(
                        "PID {pid} ({}) does not map libc: it may be statically linked or use another C library",
                        target::comm(pid)
                    ),
                    "memtrace traces glibc's allocator (libc.so.6); static binaries and musl are not supported yet",
                ));
            }
            out.extend(libs.into_iter().map(|l| (l, Some(pid))));
        }
        return Ok(out);
    }
    // Every process: every distinct allocator library any process maps.
    let mut libs: Vec<Library> = attach::host_libraries();
    let entries = std::fs::read_dir("/proc")
        .map_err(|e| UserError::new(format!("cannot list /proc: {e}"), "is /proc mounted?"))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        for lib in attach::libraries_of(pid).unwrap_or_default() {
            if !libs.iter().any(|l| l.id == lib.id) {
                libs.push(lib);
            }
        }
    }
    Ok(libs.into_iter().map(|l| (l, None)).collect())
}

fn open_output(args: &Args) -> Result<Box<dyn Write>> {
    match &args.output {
        None => Ok(Box::new(std::io::stdout())),
        Some(path) => std::fs::File::create(path)
            .map(|f| Box::new(std::io::BufWriter::new(f)) as Box<dyn Write>)
            .map_err(|e| {
                UserError::new(
                    format!("cannot write the report to {}: {e}", path.display()),
                    "choose a writable path for --output",
                )
            }),
    }
}

fn describe(args: &Args, child: Option<&GatedChild>) -> String {
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

/// Runs the trace; returns the exit status.
pub async fn run(args: Args) -> Result<i32> {
    args.validate()
        .map_err(|m| UserError::new(m, "see memtrace --help"))?;
    target::check_privileges()?;
    let mut out = open_output(&args)?;
    // Caught from the start, so Ctrl-C while attaching still ends in a report.
    let signal_err =
        |e: std::io::Error| UserError::new(format!("cannot catch signals: {e}"), "this is a bug");
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err)?;

    let child = if args.command.is_empty() {
        None
    } else {
        Some(target::spawn_gated(&args.command)?)
    };
    let plan = plan(&args, child.as_ref())?;
    let mut tracer = Tracer::load(args.ringbuf_size << 20)?;
    let mut probes: Vec<Probes> = Vec::new();
    for (lib, pid) in &plan {
        probes.push(tracer.attach(lib, *pid)?);
    }
    let ring = tracer.ring_buffer()?;
    // SAFETY: the ring buffer owns its descriptor and keeps it open, and
    // unchanged, for as long as the AsyncFd holds it.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = registered.map_err(|e| {
        UserError::new(format!("cannot poll the ring buffer: {e}"), "this is a bug")
    })?;

    let mut state = State {
        agg: Aggregator::new(Config {
            filter: SizeFilter {
                min: args.min_size.unwrap_or(0),
                max: args.max_size.unwrap_or(u64::MAX),
            },
            ..Config::default()
        }),
        symbols: Symbols::new(),
        decode_errors: 0,
    };
    for &pid in &args.pids {
        state.symbols.observe(pid, &[]);
    }
    let started = Instant::now();
    let what = describe(&args, child.as_ref());
    let mut child_status = child.as_ref().map(|c| target::wait_in_background(c.pid));
    if let Some(child) = child {
        child.release();
    }
    let until = args
        .effective_duration()
        .map(|d| format!(" for {d} s"))
        .unwrap_or_default();
    eprintln!("memtrace: tracing {what}{until}; stop with Ctrl-C");

    let deadline = args
        .effective_duration()
        .map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    let period = args.interval.map(Duration::from_secs_f64);
    let mut next_report = period.map(|p| tokio::time::Instant::now() + p);
    let mut liveness = tokio::time::interval(Duration::from_millis(250));
    // The most records the ring can hold (the smallest is 24 bytes, plus the
    // kernel's 8-byte record header).
    let backlog = ((args.ringbuf_size as usize) << 20) / 32;

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|e| UserError::new(format!("ring buffer poll failed: {e}"), "this is a bug"))?;
                // The kernel wakes a reader only once it has caught up, so
                // readiness is cleared only when the ring is empty.
                if state.drain(guard.get_inner_mut(), BATCH) {
                    guard.clear_ready();
                }
            }
            _ = sigint.recv() => break Stop::Signal,
            _ = sigterm.recv() => break Stop::Signal,
            _ = sleep_until(deadline) => break Stop::Duration,
            _ = sleep_until(next_report) => {
                state.drain(ring.get_mut(), backlog);
                emit(&args, &mut state, &tracer, &probes, started, &mut out)?;
                next_report = period.map(|p| tokio::time::Instant::now() + p);
            }
            code = wait(&mut child_status) => break Stop::Child(code),
            _ = liveness.tick(), if !args.pids.is_empty() => {
                if args.pids.iter().all(|p| state.agg.has_exited(*p) || target::has_exited(*p)) {
                    break Stop::TargetsExited;
                }
            }
        }
    };
    // What the ring holds now, not what a busy host keeps adding.
    state.drain(ring.get_mut(), backlog);
    emit(&args, &mut state, &tracer, &probes, started, &mut out)?;
    drop(ring);
    tracer.detach();
    Ok(match stop {
        Stop::Child(code) => code,
        Stop::Signal | Stop::Duration | Stop::TargetsExited => 0,
    })
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn wait(rx: &mut Option<tokio::sync::oneshot::Receiver<i32>>) -> i32 {
    match rx {
        Some(rx) => rx.await.unwrap_or(1),
        None => std::future::pending().await,
    }
}

fn emit(
    args: &Args,
    state: &mut State,
    tracer: &Tracer,
    probes: &[Probes],
    started: Instant,
    out: &mut Box<dyn Write>,
) -> Result<()> {
    let counters = tracer.counters();
    let ledger = Ledger {
        kernel: counters
            .iter()
            .filter(|(c, _)| *c != Counter::Calls)
            .map(|(c, v)| (c.name(), *v))
            .collect(),
        decode_errors: state.decode_errors,
        traced_calls: counters
            .iter()
            .find(|(c, _)| *c == Counter::Calls)
            .map_or(0, |(_, v)| *v),
    };
    let opts = report::Options {
        top: args.top,
        live_before_ns: args
            .older_than
            .map(|ms| monotonic_ns().saturating_sub(ms * 1_000_000)),
        duration_s: started.elapsed().as_secs_f64(),
        start_ns: 0,
        views: vec![report::View::Leaks],
    };
    let r = report::build(&state.agg, &ledger, probes, &mut state.symbols, &opts);
    let written = match args.format {
        Format::Text => report::text::render(&r, out),
        Format::Json => report::json::render(&r, out),
    }
    .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        // A closed pipe (`| head`) is the reader's choice, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(UserError::new(
            format!("cannot write the report: {e}"),
            "check the output path and free disk space",
        )),
    }
}
