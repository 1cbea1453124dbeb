//! `cargo xtask bench`: what tracing costs and whether memtrace keeps up,
//! every figure measured side by side in one run and checked against the
//! fixture's ground truth (a fast wrong answer fails the bench).
//!
//! 1. Cost to the traced program: `bench_fixture pairs N` (a tight loop of
//!    malloc+free, sizes 16..4096), ns per pair, untraced, under the floor
//!    (memtrace's probe points with empty programs: `probe_floor`), under
//!    memtrace (exact mode) and under bpftrace running the classic
//!    memleak-style script, and under memtrace with `--unwind dwarf` (the
//!    caller's stack copied and walked with `.eh_frame`: what a program
//!    without frame pointers costs). Modes alternate within each
//!    repetition; medians.
//!    Then one more pair of runs with the kernel's BPF statistics on
//!    (`--probe-cost`): how long each program runs per call, floor and
//!    exact side by side, which is what exact mode adds to the traps.
//! 2. Decode + aggregate throughput (criterion, `benches/pipeline.rs`).
//! 3. Sustained rate: `bench_fixture rate R 10 2` at rising rates; the
//!    highest at which memtrace loses nothing and counts every allocation.
//! 4. memtrace's peak RSS with 1,000,000 live blocks from 100,000 stacks.
//! 5. Attach latency: from starting `memtrace --pid` to its "tracing" line.
//! 6. `memtrace agent`: the same loop's cost untraced, under the agent's
//!    always-on tier (kernel tracepoints only), under its sampled tier
//!    (`--pid`, one sample per 512 KiB, uprobe sessions) and under exact
//!    mode (`memtrace --pid`), alternating within each repetition, with each
//!    tracer's CPU time while the loop ran; the sampled estimate of the
//!    loop's bytes is checked against the truth (within 10%).
//!
//! The report goes to stdout and `target/bench/report.md`; the budgets of
//! docs/PERFORMANCE.md are checked and printed, not enforced (machines
//! differ); wrong results are errors.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::{
    build, setup,
    util::{self, exec},
};

/// How much to measure.
pub struct Options {
    /// Repetitions of the per-pair cost.
    pub reps: usize,
    /// Pairs per run.
    pub pairs: u64,
    /// Seconds each sustained rate runs.
    pub seconds: u64,
    /// Only the agent's section.
    pub agent_only: bool,
}

/// The bench's binaries.
struct Bins {
    memtrace: PathBuf,
    floor: PathBuf,
    fixture: PathBuf,
    dir: PathBuf,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(
        util::is_root(),
        "the bench loads eBPF programs: run it as root"
    );
    setup::for_bench()?;
    let bins = prepare()?;
    let mut out = String::new();
    machine(&mut out);
    if opts.agent_only {
        out.push_str(&agent_costs(&bins, opts)?.table());
        return write_report(&bins, &out);
    }

    let cost = cost(&bins, opts)?;
    let breakdown = breakdown(&bins, opts.pairs)?;
    let records_per_s = pipeline()?;
    let sustained = sustained(&bins, opts.seconds)?;
    let footprint = footprint(&bins)?;
    let attach = attach_latency(&bins)?;
    let agent = agent_costs(&bins, opts)?;

    out.push_str(&cost.table());
    out.push_str(&breakdown.table(opts.pairs, cost.floor));
    out.push_str(&format!(
        "\n## Pipeline\n\ndecode + aggregate, one core: {:.2} M records/s\n",
        records_per_s / 1e6
    ));
    out.push_str("\n## Sustained rate (2 fixture threads, 10 s each)\n\n");
    out.push_str("| target allocs/s | achieved allocs/s | allocations | counted by memtrace | lost records |\n|---:|---:|---:|---:|---:|\n");
    for r in &sustained {
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} |\n",
            r.target, r.achieved, r.allocs, r.counted, r.lost
        ));
    }
    out.push_str(&format!(
        "\n## Footprint\n\nmemtrace peak RSS with {} live blocks from {} stacks: {:.1} MiB (of which the ring buffer's double mapping: {} MiB)\n",
        footprint.live, footprint.stacks, footprint.peak_rss_mib, footprint.ring_mib
    ));
    out.push_str(&format!(
        "\n## Attach\n\n`memtrace --pid` start to probes attached (median of {}): {:.0} ms\n",
        attach.len(),
        median(&attach) * 1e3
    ));

    out.push_str(&agent.table());

    let best_rate = sustained
        .iter()
        .filter(|r| r.lost == 0 && r.counted == r.allocs && r.achieved >= 0.95 * r.target as f64)
        .map(|r| r.target)
        .max()
        .unwrap_or(0);
    let budgets = [
        (
            "exact ≤ 1.15x floor",
            format!("{:.2}x", cost.exact / cost.floor),
            cost.exact / cost.floor <= 1.15,
        ),
        (
            "exact ≤ 0.3x bpftrace",
            format!("{:.2}x", cost.exact / cost.bpftrace),
            cost.exact / cost.bpftrace <= 0.3,
        ),
        (
            "decode + aggregate ≥ 5 M records/s",
            format!("{:.2} M/s", records_per_s / 1e6),
            records_per_s >= 5e6,
        ),
        (
            "no loss at 200 k allocs/s for 10 s",
            format!("highest clean rate {best_rate}/s"),
            best_rate >= 200_000,
        ),
        (
            "peak RSS ≤ 150 MiB (1 M live, 100 k stacks)",
            format!("{:.1} MiB", footprint.peak_rss_mib),
            footprint.peak_rss_mib <= 150.0,
        ),
        (
            "attach ≤ 300 ms",
            format!("{:.0} ms", median(&attach) * 1e3),
            median(&attach) <= 0.3,
        ),
    ];
    out.push_str("\n## Budgets\n\n| budget | measured | |\n|---|---:|---|\n");
    for (what, measured, ok) in budgets {
        let verdict = if ok { "met" } else { "MISSED" };
        out.push_str(&format!("| {what} | {measured} | {verdict} |\n"));
    }
    write_report(&bins, &out)
}

fn write_report(bins: &Bins, out: &str) -> anyhow::Result<()> {
    print!("{out}");
    let path = bins.dir.join("report.md");
    fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Builds memtrace, the floor and the fixture.
fn prepare() -> anyhow::Result<Bins> {
    let memtrace = build::memtrace(false)?;
    exec(util::cargo().args([
        "build",
        "--release",
        "-p",
        "memtrace",
        "--example",
        "probe_floor",
    ]))?;
    let target = util::target_dir()?;
    let dir = target.join("bench");
    fs::create_dir_all(&dir)?;
    let fixture = dir.join("bench_fixture");
    let src = util::workspace_root().join("tests/fixtures");
    // -fno-builtin: no malloc/free pair folded away; frame pointers and no
    // sibling calls: every frame of the `stacks` walk stays on the stack.
    exec(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args([
                "-O2",
                "-g",
                "-fno-builtin",
                "-fno-omit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-pthread",
                "-I",
            ])
            .arg(&src)
            .arg(src.join("bench_fixture.c"))
            .arg("-o")
            .arg(&fixture),
    )?;
    Ok(Bins {
        memtrace,
        floor: target.join("release/examples/probe_floor"),
        fixture,
        dir,
    })
}

fn machine(out: &mut String) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = util::output(Command::new("uname").arg("-r")).unwrap_or_default();
    let glibc = util::output(Command::new("ldd").arg("--version"))
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb >> 20);
    out.push_str(&format!(
        "# memtrace bench\n\nmachine: {cpu}, {cores} cores, {mem} GiB; kernel {}; {}\n",
        kernel.trim(),
        glibc.trim()
    ));
}

/// Median of per-pair costs, ns.
struct Cost {
    untraced: f64,
    floor: f64,
    exact: f64,
    bpftrace: f64,
    /// memtrace with `--unwind dwarf`.
    dwarf: f64,
    runs: Vec<[f64; 5]>,
    pairs: u64,
}

impl Cost {
    fn table(&self) -> String {
        let mut s = format!(
            "\n## Cost to the traced program ({} malloc+free pairs per run, {} runs, medians)\n\n",
            self.pairs,
            self.runs.len()
        );
        s.push_str("| mode | ns per pair | vs untraced | vs floor | vs bpftrace |\n|---|---:|---:|---:|---:|\n");
        for (name, v) in [
            ("untraced", self.untraced),
            ("floor (memtrace's probes, empty programs)", self.floor),
            ("memtrace exact", self.exact),
            ("bpftrace memleak-style script", self.bpftrace),
            ("memtrace exact, --unwind dwarf", self.dwarf),
        ] {
            s.push_str(&format!(
                "| {name} | {v:.0} | {:.1}x | {:.2}x | {:.2}x |\n",
                v / self.untraced,
                v / self.floor,
                v / self.bpftrace
            ));
        }
        s.push_str(
            "\nEvery run (untraced, floor, exact, bpftrace, exact with --unwind dwarf), ns per pair:\n\n",
        );
        for r in &self.runs {
            s.push_str(&format!(
                "- {:.0}, {:.0}, {:.0}, {:.0}, {:.0}\n",
                r[0], r[1], r[2], r[3], r[4]
            ));
        }
        s.push_str(
            "\nWith --unwind dwarf each allocation sends the caller's stack (up to 16 KiB; here the \
             loop runs a few frames below the main stack's top, so a few hundred bytes) and memtrace \
             walks it with the binaries' .eh_frame.\n",
        );
        s
    }
}

fn cost(bins: &Bins, opts: &Options) -> anyhow::Result<Cost> {
    let script = bins.dir.join("memleak.bt");
    fs::write(&script, memleak_script(&libc_path()?))?;
    let mut runs = Vec::new();
    for rep in 0..opts.reps {
        eprintln!("cost: run {} of {}", rep + 1, opts.reps);
        let untraced = pairs_untraced(bins, opts.pairs)?;
        let floor = pairs_under_floor(bins, opts.pairs)?;
        let exact = pairs_under_memtrace(bins, opts.pairs)?;
        let bpftrace = pairs_under_bpftrace(bins, &script, opts.pairs)?;
        let dwarf = pairs_under_memtrace_with(bins, opts.pairs, &["--unwind", "dwarf"])?;
        runs.push([untraced, floor, exact, bpftrace, dwarf]);
    }
    let col = |i: usize| median(&runs.iter().map(|r| r[i]).collect::<Vec<_>>());
    Ok(Cost {
        untraced: col(0),
        floor: col(1),
        exact: col(2),
        bpftrace: col(3),
        dwarf: col(4),
        runs,
        pairs: opts.pairs,
    })
}

/// eBPF run time per program (name, runs, total ns) under the floor and
/// under memtrace, from one run of each with the kernel's BPF statistics on.
struct Breakdown {
    floor: Vec<(String, u64, u64)>,
    exact: Vec<(String, u64, u64)>,
}

impl Breakdown {
    fn table(&self, pairs: u64, floor_ns_per_pair: f64) -> String {
        let mut s = String::from(
            "\n## Where exact mode's time goes (one more run of each, kernel BPF statistics on)\n\n",
        );
        s.push_str(
            "| mode | program | runs | ns per run | ns per pair |\n|---|---|---:|---:|---:|\n",
        );
        let mut per_pair = [0.0; 2];
        for (i, (mode, progs)) in [("floor", &self.floor), ("exact", &self.exact)]
            .into_iter()
            .enumerate()
        {
            // The allocator's probes only: the kernel tracepoints (RSS,
            // faults, mmap) fire a few thousand times in all.
            for (name, runs, ns) in progs.iter().filter(|(_, runs, _)| *runs >= pairs) {
                let pair = *ns as f64 / pairs as f64;
                per_pair[i] += pair;
                s.push_str(&format!(
                    "| {mode} | {name} | {runs} | {:.0} | {pair:.0} |\n",
                    *ns as f64 / *runs as f64
                ));
            }
        }
        let added = per_pair[1] - per_pair[0];
        s.push_str(&format!(
            "\neBPF time per pair: floor {:.0} ns, exact {:.0} ns. Exact adds {added:.0} ns of program \
             time per pair, {:.0}% of the floor's {floor_ns_per_pair:.0} ns per pair (the 1.15x budget \
             allows {:.0} ns for programs and pipeline together). The statistics add two clock reads \
             to every run, to both modes alike.\n",
            per_pair[0],
            per_pair[1],
            100.0 * added / floor_ns_per_pair,
            0.15 * floor_ns_per_pair
        ));
        s
    }
}

fn breakdown(bins: &Bins, pairs: u64) -> anyhow::Result<Breakdown> {
    eprintln!("cost: where the time goes (BPF statistics on)");
    // Floor: `probe_floor --probe-cost` prints `cost NAME RUNS NS` lines.
    let fixture = Waiting::start(bins, &["pairs", &pairs.to_string()])?;
    let mut floor = Command::new(&bins.floor)
        .arg("--probe-cost")
        .arg(fixture.pid().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(floor.stdout.take().expect("piped"));
    let attached = read_line(&mut out, "probe_floor")?;
    ensure!(attached == "attached", "probe_floor printed {attached:?}");
    fixture.go()?;
    drop(floor.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    floor.wait()?;
    let floor_costs: Vec<(String, u64, u64)> = rest
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                ["cost", name, runs, ns] => {
                    Some((name.to_string(), runs.parse().ok()?, ns.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect();
    // Exact: memtrace's report carries the same figures.
    let n = pairs.to_string();
    let (report, _, _) = under_memtrace(bins, &["--top", "1", "--probe-cost"], &["pairs", &n])?;
    let exact_costs: Vec<(String, u64, u64)> = report["probe_cost"]
        .as_array()
        .context("memtrace --probe-cost reported no probe_cost")?
        .iter()
        .map(|c| {
            (
                c["program"].as_str().unwrap_or("?").to_string(),
                c["runs"].as_u64().unwrap_or(0),
                c["run_ns"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let runs_of = |costs: &[(String, u64, u64)], name: &str| {
        costs.iter().find(|c| c.0 == name).map_or(0, |c| c.1)
    };
    // Every pair is one malloc entry, one malloc return and one free.
    ensure!(
        runs_of(&floor_costs, "floor_enter") >= 2 * pairs
            && runs_of(&floor_costs, "floor_exit") >= pairs
            && runs_of(&exact_costs, "malloc_enter") >= pairs
            && runs_of(&exact_costs, "alloc_exit") >= pairs
            && runs_of(&exact_costs, "free_enter") >= pairs,
        "the programs ran fewer times than the fixture called: floor {floor_costs:?}, exact {exact_costs:?}"
    );
    Ok(Breakdown {
        floor: floor_costs,
        exact: exact_costs,
    })
}

/// The C library this process runs on (the fixture's too).
fn libc_path() -> anyhow::Result<String> {
    let maps = fs::read_to_string("/proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libc.so"))
        })
        .map(str::to_string)
        .context("no libc.so in this process's mappings")
}

/// The classic memleak-style bpftrace script: malloc size at entry, the
/// block and its user stack at return, keyed by address; free at entry.
/// BEGIN runs once every probe is attached.
fn memleak_script(libc: &str) -> String {
    format!(
        "BEGIN {{ printf(\"attached\\n\"); }}\n\
         uprobe:{libc}:malloc {{ @size[tid] = arg0; }}\n\
         uretprobe:{libc}:malloc /@size[tid]/ {{ @bytes[retval] = @size[tid]; @stack[retval] = ustack; delete(@size[tid]); }}\n\
         uprobe:{libc}:free {{ delete(@bytes[arg0]); delete(@stack[arg0]); }}\n\
         END {{ clear(@size); clear(@bytes); clear(@stack); }}\n"
    )
}

/// The fixture's result line as key → value.
fn result_line(line: &str) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    let map: std::collections::HashMap<String, f64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    ensure!(
        !map.is_empty(),
        "the fixture printed {line:?}, not its result"
    );
    Ok(map)
}

fn read_line(r: &mut impl BufRead, what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(!line.is_empty(), "{what} ended before printing its line");
    Ok(line.trim_end().to_string())
}

fn pairs_untraced(bins: &Bins, pairs: u64) -> anyhow::Result<f64> {
    let out = Command::new(&bins.fixture)
        .args(["pairs", &pairs.to_string()])
        .output()?;
    ensure!(out.status.success(), "bench_fixture failed: {}", out.status);
    let r = result_line(&String::from_utf8_lossy(&out.stdout))?;
    Ok(r["ns_per_pair"])
}

/// A fixture started with `--wait`, stopped at "ready".
struct Waiting {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Waiting {
    fn start(bins: &Bins, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(&bins.fixture)
            .arg("--wait")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let ready = read_line(&mut stdout, "bench_fixture")?;
        ensure!(ready == "ready", "bench_fixture printed {ready:?}");
        Ok(Self { child, stdout })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Says "go" and returns its result line, once it exits.
    fn go(mut self) -> anyhow::Result<String> {
        let mut stdin = self.child.stdin.take().expect("piped");
        stdin.write_all(b"go\n")?;
        let line = read_line(&mut self.stdout, "bench_fixture")?;
        drop(stdin);
        let status = self.child.wait()?;
        ensure!(status.success(), "bench_fixture failed: {status}");
        Ok(line)
    }
}

/// Waits until a line containing `marker` comes out of `stream`, then
/// keeps draining it in the background (a closed pipe would kill the
/// writer on its next line).
fn wait_for(stream: impl Read + Send + 'static, marker: &str, what: &str) -> anyhow::Result<()> {
    let mut lines = BufReader::new(stream).lines();
    for line in lines.by_ref() {
        if line?.contains(marker) {
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(());
        }
    }
    bail!("{what} exited before printing {marker:?}")
}

fn pairs_under_floor(bins: &Bins, pairs: u64) -> anyhow::Result<f64> {
    let fixture = Waiting::start(bins, &["pairs", &pairs.to_string()])?;
    let mut floor = Command::new(&bins.floor)
        .arg(fixture.pid().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for(
        floor.stdout.take().expect("piped"),
        "attached",
        "probe_floor",
    )?;
    let line = fixture.go()?;
    drop(floor.stdin.take());
    floor.wait()?;
    Ok(result_line(&line)?["ns_per_pair"])
}

fn pairs_under_bpftrace(bins: &Bins, script: &Path, pairs: u64) -> anyhow::Result<f64> {
    let fixture = Waiting::start(bins, &["pairs", &pairs.to_string()])?;
    let mut bt = Command::new("bpftrace")
        .arg("-p")
        .arg(fixture.pid().to_string())
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run bpftrace")?;
    wait_for(bt.stdout.take().expect("piped"), "attached", "bpftrace")?;
    let line = fixture.go()?;
    // bpftrace stops by itself once the -p process is gone.
    bt.wait()?;
    Ok(result_line(&line)?["ns_per_pair"])
}

/// memtrace's JSON report of `memtrace ARGS -- bench_fixture FIXTURE_ARGS`
/// and the fixture's result line, with memtrace's peak RSS in KiB.
fn under_memtrace(
    bins: &Bins,
    args: &[&str],
    fixture_args: &[&str],
) -> anyhow::Result<(serde_json::Value, String, u64)> {
    let json = bins.dir.join("run.json");
    let mut child = Command::new(&bins.memtrace)
        .args(["--format", "json", "--output"])
        .arg(&json)
        .args(args)
        .arg("--")
        .arg(&bins.fixture)
        .args(fixture_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)?;
    let (status, max_rss_kib) = wait_rusage(&child)?;
    ensure!(status == 0, "memtrace exited with {status}: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&json)?)?;
    let line = stdout
        .lines()
        .find(|l| l.contains('='))
        .context("the fixture printed no result")?
        .to_string();
    Ok((report, line, max_rss_kib))
}

/// Waits for `child`; its exit code and peak RSS (KiB), from wait4.
fn wait_rusage(child: &Child) -> anyhow::Result<(i32, u64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; the pid is our child, not yet reaped.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    ensure!(pid > 0, "wait4 failed: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok((code, usage.ru_maxrss as u64))
}

/// Sum of (count, bytes) over the process's stacks that pass through
/// `function`, and its lost records.
fn counted(report: &serde_json::Value, function: &str) -> anyhow::Result<(u64, u64, u64)> {
    let p = &report["processes"][0];
    let stacks = p["stacks"].as_array().context("no stacks in the report")?;
    let (mut count, mut bytes) = (0, 0);
    for s in stacks {
        let through = s["frames"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["function"] == function));
        if through {
            count += s["total_count"].as_u64().unwrap_or(0);
            bytes += s["total_bytes"].as_u64().unwrap_or(0);
        }
    }
    let lost: u64 = report["lost"]
        .as_object()
        .context("no ledger in the report")?
        .iter()
        .filter(|(k, _)| k.as_str() != "unknown_frees")
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    Ok((count, bytes, lost))
}

fn pairs_under_memtrace(bins: &Bins, pairs: u64) -> anyhow::Result<f64> {
    pairs_under_memtrace_with(bins, pairs, &[])
}

/// [`pairs_under_memtrace`] with more memtrace arguments.
fn pairs_under_memtrace_with(bins: &Bins, pairs: u64, extra: &[&str]) -> anyhow::Result<f64> {
    let n = pairs.to_string();
    let mut args = vec!["--top", "0"];
    args.extend_from_slice(extra);
    let (report, line, _) = under_memtrace(bins, &args, &["pairs", &n])?;
    let truth = result_line(&line)?;
    let (count, bytes, lost) = counted(&report, "pair_loop")?;
    ensure!(
        (count, bytes, lost) == (pairs, truth["bytes"] as u64, 0),
        "memtrace counted {count} blocks, {bytes} bytes in pair_loop with {lost} lost; \
         the fixture made {pairs}, {} bytes",
        truth["bytes"]
    );
    Ok(truth["ns_per_pair"])
}

/// Decode + aggregate records/s, from criterion's estimate.
fn pipeline() -> anyhow::Result<f64> {
    exec(util::cargo().args(["bench", "-p", "memtrace", "--bench", "pipeline"]))?;
    let est = util::target_dir()?.join("criterion/pipeline/decode_aggregate/new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(
        &fs::read(&est).with_context(|| format!("cannot read {}", est.display()))?,
    )?;
    let ns = v["median"]["point_estimate"]
        .as_f64()
        .context("no median in criterion's estimates")?;
    // The bench's stream: 1,000,000 records per iteration.
    Ok(1e6 / (ns / 1e9))
}

struct Rate {
    target: u64,
    achieved: f64,
    allocs: u64,
    counted: u64,
    lost: u64,
}

fn sustained(bins: &Bins, seconds: u64) -> anyhow::Result<Vec<Rate>> {
    let mut out = Vec::new();
    for target in [100_000u64, 200_000, 300_000, 400_000, 600_000] {
        eprintln!("sustained: {target} allocs/s for {seconds} s");
        let (report, line, _) = under_memtrace(
            bins,
            &["--top", "0"],
            &["rate", &target.to_string(), &seconds.to_string(), "2"],
        )?;
        let truth = result_line(&line)?;
        let (counted, bytes, lost) = counted(&report, "rate_thread")?;
        let allocs = truth["allocs"] as u64;
        // With nothing lost, every allocation must be there, to the byte.
        if lost == 0 {
            ensure!(
                (counted, bytes) == (allocs, truth["bytes"] as u64),
                "at {target}/s memtrace counted {counted} blocks, {bytes} bytes in rate_thread \
                 and lost nothing; the fixture made {allocs}, {}",
                truth["bytes"]
            );
        }
        let r = Rate {
            target,
            achieved: truth["rate"],
            allocs,
            counted,
            lost,
        };
        let stop = r.lost > 0 || r.achieved < 0.95 * target as f64;
        out.push(r);
        if stop {
            break;
        }
    }
    Ok(out)
}

struct Footprint {
    live: u64,
    stacks: u64,
    peak_rss_mib: f64,
    ring_mib: u64,
}

fn footprint(bins: &Bins) -> anyhow::Result<Footprint> {
    const STACKS: u64 = 100_000;
    const PER: u64 = 10;
    // Named, not left to memtrace's default, so the report can say what
    // share of the RSS the ring is (the kernel maps its pages twice).
    const RING_MIB: u64 = 16;
    eprintln!(
        "footprint: {} live blocks from {STACKS} stacks",
        STACKS * PER
    );
    let (report, _, rss_kib) = under_memtrace(
        bins,
        &["--top", "1", "--ringbuf-size", &RING_MIB.to_string()],
        &["stacks", &STACKS.to_string(), &PER.to_string()],
    )?;
    let p = &report["processes"][0];
    let live = p["live_count"].as_u64().unwrap_or(0);
    let stacks = p["stacks"].as_array().map_or(0, Vec::len) as u64
        + p["stacks_omitted"].as_u64().unwrap_or(0);
    // The fixture's own: its table of pointers and stdout's buffer.
    ensure!(
        (STACKS * PER..=STACKS * PER + 2).contains(&live) && stacks >= STACKS,
        "memtrace saw {live} live blocks in {stacks} stacks; the fixture made {} in {STACKS}",
        STACKS * PER
    );
    Ok(Footprint {
        live,
        stacks,
        peak_rss_mib: rss_kib as f64 / 1024.0,
        ring_mib: 2 * RING_MIB,
    })
}

/// Seconds from starting `memtrace --pid` to its "tracing" line, 5 times.
fn attach_latency(bins: &Bins) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..5 {
        let fixture = Waiting::start(bins, &["pairs", "1"])?;
        let t0 = Instant::now();
        let mut child = Command::new(&bins.memtrace)
            .args(["--pid", &fixture.pid().to_string(), "--output", "/dev/null"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        wait_for(
            child.stderr.take().expect("piped"),
            "memtrace: tracing",
            "memtrace",
        )?;
        out.push(t0.elapsed().as_secs_f64());
        fixture.go()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "memtrace did not stop after its target"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(out)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One run of the pair loop under a tracer: ns per pair, and the tracer's
/// CPU seconds while the loop ran.
#[derive(Clone, Copy, Default)]
struct Traced {
    ns_per_pair: f64,
    cpu_s: f64,
    wall_s: f64,
    /// Bytes the loop allocated.
    bytes: f64,
}

/// The agent's tiers and exact mode, side by side.
struct AgentCost {
    /// untraced, always-on, sampled, exact; per repetition.
    runs: Vec<[Traced; 4]>,
    pairs: u64,
    /// The sampled tier's estimate of the loop's bytes, and the truth, in
    /// the last repetition.
    estimate: (f64, f64),
    /// The always-on agent's CPU share on the idle host, over 10 s.
    idle_share: f64,
}

impl AgentCost {
    fn col(&self, i: usize) -> Traced {
        let m =
            |f: fn(&Traced) -> f64| median(&self.runs.iter().map(|r| f(&r[i])).collect::<Vec<_>>());
        Traced {
            ns_per_pair: m(|t| t.ns_per_pair),
            cpu_s: m(|t| t.cpu_s),
            wall_s: m(|t| t.wall_s),
            bytes: m(|t| t.bytes),
        }
    }

    fn table(&self) -> String {
        let mut s = format!(
            "\n## memtrace agent ({} malloc+free pairs per run, {} runs, medians)\n\n",
            self.pairs,
            self.runs.len()
        );
        s.push_str("| mode | ns per pair | slowdown | tracer CPU while the loop ran | tracer CPU, % of one core over the loop |\n|---|---:|---:|---:|---:|\n");
        let base = self.col(0).ns_per_pair;
        for (i, name) in [
            "untraced",
            "agent, always-on tier (kernel tracepoints)",
            "agent, sampled tier (512 KiB, uprobe sessions)",
            "memtrace exact (--pid)",
        ]
        .iter()
        .enumerate()
        {
            let t = self.col(i);
            let (cpu, share) = if i == 0 {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.3} s", t.cpu_s),
                    format!("{:.1}%", 100.0 * t.cpu_s / t.wall_s.max(1e-9)),
                )
            };
            s.push_str(&format!(
                "| {name} | {:.0} | {:.2}x | {cpu} | {share} |\n",
                t.ns_per_pair,
                t.ns_per_pair / base
            ));
        }
        s.push_str(&format!(
            "\nThe agent (always-on tier, every process) on this host otherwise idle, over 10 s: {:.2}% of one core.\n",
            100.0 * self.idle_share
        ));
        s.push_str(&format!(
            "\nThe sampled tier's estimate of the loop's allocated bytes (last run; checked within 4 standard errors): {:.0} against {:.0} exact ({:+.1}%).\n",
            self.estimate.0,
            self.estimate.1,
            100.0 * (self.estimate.0 - self.estimate.1) / self.estimate.1
        ));
        s.push_str("\nEvery run (untraced, always-on, sampled, exact), ns per pair:\n\n");
        for r in &self.runs {
            s.push_str(&format!(
                "- {:.0}, {:.0}, {:.0}, {:.0}\n",
                r[0].ns_per_pair, r[1].ns_per_pair, r[2].ns_per_pair, r[3].ns_per_pair
            ));
        }
        s
    }
}

/// CPU seconds process `pid` has used, all its threads, to the
/// nanosecond (`/proc/PID/task/*/schedstat`, whose first field is the time
/// on a CPU; `/proc/PID/stat` counts 10 ms ticks).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}

/// The agent's always-on tier on this host with nothing else running: its
/// CPU share over `seconds`.
fn agent_idle(bins: &Bins, args: &[&str], seconds: f64) -> anyhow::Result<f64> {
    let mut c = Command::new(&bins.memtrace)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for(
        c.stderr.take().expect("piped"),
        "memtrace agent: tracing",
        "memtrace",
    )?;
    let cpu0 = cpu_seconds(c.id())?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let cpu1 = cpu_seconds(c.id())?;
    // SAFETY: kill has no memory-safety preconditions; our child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    c.wait()?;
    Ok((cpu1 - cpu0) / seconds)
}

/// Runs the pair loop (stopped at "ready") under `tracer ARGS` (`{pid}`
/// replaced by the loop's pid), started and attached first. With `metrics`,
/// scrapes the tracer there before stopping it.
fn pairs_under(
    bins: &Bins,
    pairs: u64,
    tracer: Option<&[&str]>,
    marker: &str,
    metrics: Option<u16>,
) -> anyhow::Result<(Traced, Option<String>)> {
    let fixture = Waiting::start(bins, &["pairs", &pairs.to_string()])?;
    let pid = fixture.pid().to_string();
    let mut child = match tracer {
        Some(args) => {
            let args: Vec<String> = args.iter().map(|a| a.replace("{pid}", &pid)).collect();
            let mut c = Command::new(&bins.memtrace)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            wait_for(c.stderr.take().expect("piped"), marker, "memtrace")?;
            Some(c)
        }
        None => None,
    };
    let cpu0 = match &child {
        Some(c) => cpu_seconds(c.id())?,
        None => 0.0,
    };
    let line = fixture.go()?;
    let cpu1 = match &child {
        Some(c) => cpu_seconds(c.id())?,
        None => 0.0,
    };
    let scraped = match metrics {
        Some(port) => Some(http_get(port, "/metrics")?),
        None => None,
    };
    if let Some(c) = &mut child {
        // SAFETY: kill has no memory-safety preconditions; our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        c.wait()?;
    }
    let r = result_line(&line)?;
    let ns = r["ns_per_pair"];
    Ok((
        Traced {
            ns_per_pair: ns,
            cpu_s: cpu1 - cpu0,
            wall_s: ns * pairs as f64 / 1e9,
            bytes: r["bytes"],
        },
        scraped,
    ))
}

/// A plain HTTP GET of `path` on 127.0.0.1:`port`: the body.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(text.clone(), |(_, b)| b.to_string()))
}

fn agent_costs(bins: &Bins, opts: &Options) -> anyhow::Result<AgentCost> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let listen = format!("127.0.0.1:{port}");
    let common = [
        "--profile-dir",
        "off",
        "--escalate-slope",
        "0",
        "--escalate-rss",
        "0",
    ];
    let always: Vec<&str> = ["agent", "--listen", "off"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let sampled: Vec<&str> = ["agent", "--pid", "{pid}", "--listen", &listen]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let exact = ["--pid", "{pid}", "--output", "/dev/null", "--top", "1"];
    let mut runs = Vec::new();
    let mut estimate = (0.0, 0.0);
    for rep in 0..opts.reps {
        eprintln!("agent: run {} of {}", rep + 1, opts.reps);
        let (untraced, _) = pairs_under(bins, opts.pairs, None, "", None)?;
        let (on, _) = pairs_under(
            bins,
            opts.pairs,
            Some(&always),
            "memtrace agent: tracing",
            None,
        )?;
        let (smp, scraped) = pairs_under(
            bins,
            opts.pairs,
            Some(&sampled),
            "memtrace agent: tracing",
            Some(port),
        )?;
        let (ex, _) = pairs_under(bins, opts.pairs, Some(&exact), "memtrace: tracing", None)?;
        let truth = smp.bytes;
        let est = scraped
            .as_deref()
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("memtrace_heap_allocated_bytes_total{")
                    && l.contains("comm=\"bench_fixture\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        // Sizes far below the interval: the estimate's standard error is
        // about sqrt(interval x bytes).
        let se = (512.0 * 1024.0 * truth).sqrt();
        ensure!(
            (est - truth).abs() <= 4.0 * se,
            "the agent estimated {est:.0} bytes allocated by the loop; it allocated {truth:.0} \
             (standard error {se:.0})"
        );
        estimate = (est, truth);
        runs.push([untraced, on, smp, ex]);
    }
    let idle_share = agent_idle(bins, &always, 10.0)?;
    Ok(AgentCost {
        runs,
        pairs: opts.pairs,
        estimate,
        idle_share,
    })
}
