//! `memtrace agent` on real processes: sampled estimates against the
//! ground truth of `agent_fixture sample`, profiles read by `go tool pprof`
//! and pushed to an HTTP endpoint, metrics scraped by a real Prometheus, and
//! escalation of a process that starts to grow (and not of a flat one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use memtrace_tests::agent::{DecodedProfile, Endpoint, decode_profile, free_port, http_get};
use memtrace_tests::tool::{require_tool, run_tool};
use memtrace_tests::truth::agent::SITES;
use memtrace_tests::{Fixture, Memtrace, Output, TempPath, fixture, require_root};
use serde_json::Value;

use crate::shared_machine;

/// An agent sampling process `pid` only, profiles into `dir`, no listener.
fn agent_for(pid: u32, dir: &Path, extra: &[&str]) -> Memtrace {
    let pid = pid.to_string();
    let mut args = vec![
        "agent",
        "--pid",
        &pid,
        "--listen",
        "off",
        "--profile-dir",
        dir.to_str().expect("UTF-8 temporary path"),
        "--profile-period",
        "3600",
    ];
    args.extend_from_slice(extra);
    let mut agent = Memtrace::spawn(&args);
    agent.wait_tracing();
    agent
}

/// The one profile of process `pid` in `dir`.
fn profile_of(dir: &Path, pid: u32) -> (PathBuf, DecodedProfile) {
    let wanted = format!("-{pid}-");
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("profile directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("memtrace-agent_fixture") && n.contains(&wanted))
        })
        .collect();
    assert_eq!(
        files.len(),
        1,
        "expected one profile of PID {pid} in {}: {files:?}",
        dir.display()
    );
    let bytes = std::fs::read(&files[0]).expect("profile readable");
    (files[0].clone(), decode_profile(&bytes))
}

/// Runs `agent_fixture sample` under an agent sampling one block per
/// `interval` bytes, its budget and everything else at their defaults;
/// returns its profile and the agent's output.
fn sample_run(interval: &str, extra: &[&str]) -> (TempPath, PathBuf, DecodedProfile, Output, u32) {
    let dir = TempPath::new("agent-profiles");
    std::fs::create_dir_all(dir.path()).expect("profile directory");
    let mut target = Fixture::spawn(fixture("agent_fixture"), ["--wait", "sample"]);
    target.wait_ready();
    let pid = target.pid();
    let mut args = vec!["--sample-bytes", interval];
    args.extend_from_slice(extra);
    let mut agent = agent_for(pid, dir.path(), &args);
    target.go();
    target.wait_done();
    agent.interrupt();
    let out = agent.wait();
    out.assert_status(0);
    target.finish_ok();
    let (path, profile) = profile_of(dir.path(), pid);
    (dir, path, profile, out, pid)
}

/// One stack's estimates against the truth: (function, truth, estimate,
/// relative error) for allocated bytes, allocations and live bytes.
fn errors(profile: &DecodedProfile) -> Vec<(&'static str, &'static str, u64, i64, f64)> {
    let mut out = Vec::new();
    for (function, site) in SITES {
        for (what, truth, index) in [
            ("alloc_space", site.total_bytes, "alloc_space"),
            ("alloc_objects", site.total_count, "alloc_objects"),
            ("inuse_space", site.live_bytes, "inuse_space"),
        ] {
            let est = profile.sum_for(function, index);
            let err = if truth == 0 {
                est as f64
            } else {
                (est as f64 - truth as f64) / truth as f64
            };
            out.push((*function, what, truth, est, err));
        }
    }
    out
}

fn print_table(interval: &str, rows: &[(&str, &str, u64, i64, f64)]) {
    eprintln!("sampled vs exact, one sample per {interval} bytes:");
    eprintln!(
        "  {:<12} {:<13} {:>12} {:>12} {:>8}",
        "stack", "value", "exact", "estimate", "error"
    );
    for (f, what, truth, est, err) in rows {
        eprintln!(
            "  {f:<12} {what:<13} {truth:>12} {est:>12} {:>7.2}%",
            err * 100.0
        );
    }
}

/// The standard error of an estimated total of `count` blocks of `size`
/// bytes sampled every `mean` bytes (of bytes, or of blocks), with sample
/// points kept one in `2^shift`.
fn standard_error(count: u64, size: u64, mean: u64, shift: u32, bytes: bool) -> f64 {
    let p = -(-(size as f64) / mean as f64).exp_m1() / f64::from(1u32 << shift);
    let w = if bytes { size as f64 } else { 1.0 };
    (count as f64 * w * w * (1.0 - p) / p).sqrt()
}

/// The blocks `agent_fixture sample` makes at one stack: (count, size).
fn site_blocks(function: &str) -> &'static [(u64, u64)] {
    match function {
        "many_small" => &[(400_000, 64)],
        "mixed_sizes" => &[
            (2000, 1000),
            (2000, 1500),
            (2000, 2000),
            (2000, 2500),
            (2000, 3000),
            (2000, 3500),
            (2000, 4000),
        ],
        "few_large" => &[(24, 1 << 20)],
        "churn_small" => &[(1_000_000, 100)],
        "a_little" => &[(100, 1000)],
        _ => &[],
    }
}

/// The agent's closing estimate of process `pid` (its `estimate PID` line),
/// as `key=value` pairs; `value±error` pairs give both.
fn estimate_line(stderr: &str, pid: u32) -> Vec<(String, f64, f64)> {
    let prefix = format!("memtrace agent: estimate PID {pid} ");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no estimate of PID {pid} on the agent's stderr:\n{stderr}"));
    let (_, pairs) = line.split_once("): ").expect("estimate line");
    pairs
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let (v, e) = v.split_once('±').unwrap_or((v, "0"));
            let v = match v {
                "yes" => 1.0,
                "no" => 0.0,
                v => v.parse().ok()?,
            };
            Some((k.to_string(), v, e.parse().ok()?))
        })
        .collect()
}

/// One figure of an estimate line, with its standard error.
fn figure(line: &[(String, f64, f64)], key: &str) -> (f64, f64) {
    line.iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, v, e)| (*v, *e))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Checks `agent_fixture sample`'s estimates, sampled every `mean` bytes at
/// the default budget: the process's totals within four of the standard
/// errors the agent states (and those errors small), every stack within
/// four of an upper bound of its standard error (its samples kept with at
/// most the highest thinning the agent reports), churn's live bytes zero
/// exactly. Returns the highest thinning shift.
fn assert_within_error(profile: &DecodedProfile, out: &Output, pid: u32, mean: u64) -> u32 {
    let line = estimate_line(&out.stderr, pid);
    let shift = figure(&line, "max_shift").0 as u32;
    assert_eq!(
        figure(&line, "complete").0,
        1.0,
        "the estimate says it is partial: {line:?}"
    );
    let all = |count: bool| {
        SITES
            .iter()
            .map(move |(_, s)| if count { s.total_count } else { s.total_bytes })
    };
    for (key, truth) in [
        ("alloc_bytes", all(false).sum::<u64>()),
        ("alloc_count", all(true).sum::<u64>()),
        ("live_bytes", SITES.iter().map(|(_, s)| s.live_bytes).sum()),
    ] {
        let (est, se) = figure(&line, key);
        eprintln!("PID {pid} {key}: estimated {est:.0} ± {se:.0}, exact {truth}");
        assert!(
            (est - truth as f64).abs() <= 4.0 * se + 1.0,
            "{key}: estimated {est:.0}, exact {truth}, stated standard error {se:.0}"
        );
        assert!(
            se <= 0.1 * truth as f64,
            "{key}: standard error {se:.0} of {truth}"
        );
    }
    for (f, what, truth, est, _) in &errors(profile) {
        let live = *what == "inuse_space";
        if live && *truth == 0 {
            assert_eq!(
                *est, 0,
                "{f}: every block was freed, yet {est} B are estimated live"
            );
            continue;
        }
        let bytes = *what != "alloc_objects";
        let se = site_blocks(f)
            .iter()
            .map(|&(n, s)| standard_error(n, s, mean, shift, bytes).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (*est as f64 - *truth as f64).abs() <= 4.0 * se + 1.0,
            "{f} {what}: estimated {est}, exact {truth}, standard error at most {se:.0}"
        );
    }
    shift
}

/// At 16 KiB per sample and the default budget, which this run is over (so
/// samples are thinned, and weighed for it), every estimate is within four
/// standard errors of the truth (on main before the thinning, the budget
/// dropped samples unweighed: 88.9 of 185.9 MB); the freed churn is
/// estimated at 0 live exactly (every sampled block's free is forwarded),
/// and the profile is Go's heap profile, read by `go tool pprof` with its
/// labels.
#[test]
fn agent_sampled_estimates_within_their_error_at_the_default_budget() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_dir, path, profile, out, pid) = sample_run("16KiB", &[]);
    assert!(
        out.stderr.contains("uprobe sessions"),
        "the agent should say how its probes are attached:\n{}",
        out.stderr
    );
    assert_eq!(profile.period, 16 << 10);
    print_table("16384", &errors(&profile));
    let shift = assert_within_error(&profile, &out, pid, 16 << 10);
    // The fixture makes ~11,000 sample points in well under a second: over
    // the default budget of 2,000 a second, so the thinning was at work.
    assert!(
        shift > 0,
        "the budget should have thinned this run's samples:\n{}",
        out.stderr
    );
    // Every sample carries the process and the host.
    let labels = &profile.samples[0].labels;
    for key in ["pid", "comm", "host", "cgroup"] {
        assert!(
            labels.iter().any(|(k, _)| k == key),
            "sample labels lack {key}: {labels:?}"
        );
    }
    assert!(labels.contains(&("pid".into(), pid.to_string())));

    let go = require_tool("go", "golang-go");
    let path = path.to_str().expect("UTF-8 path");
    let top = run_tool(
        &go,
        ["tool", "pprof", "-top", "-sample_index=inuse_space", path],
    );
    top.assert_success();
    for f in ["many_small", "mixed_sizes", "few_large"] {
        assert!(
            top.stdout.contains(f),
            "`{}` should list {f}:\n{}",
            top.cmdline,
            top.stdout
        );
    }
    let tags = run_tool(&go, ["tool", "pprof", "-tags", path]);
    tags.assert_success();
    assert!(
        tags.stdout.contains("agent_fixture") && tags.stdout.contains("host"),
        "`{}` should show the comm and host labels:\n{}",
        tags.cmdline,
        tags.stdout
    );
}

/// At the default interval (512 KiB) the estimates are noisier: each is
/// checked against four of its standard errors, and the errors printed.
#[test]
fn agent_default_interval_estimates_within_their_error() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_dir, _path, profile, out, pid) = sample_run("512KiB", &[]);
    print_table("524288", &errors(&profile));
    assert_within_error(&profile, &out, pid, 512 << 10);
}

/// Without uprobe sessions (entry and return probes on every call) the
/// estimates are the same kind: within their error at 16 KiB.
#[test]
fn agent_entry_and_return_fallback_estimates() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let (_dir, _path, profile, out, pid) = sample_run("16KiB", &["--no-sessions"]);
    assert!(
        out.stderr.contains("entry and return uprobes") && out.stderr.contains("turned off"),
        "the agent should say it fell back, and why:\n{}",
        out.stderr
    );
    print_table("16384 (entry and return probes)", &errors(&profile));
    assert_within_error(&profile, &out, pid, 16 << 10);
}

/// Kills a child process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus's answer to an instant query: the result vector.
fn prometheus_query(prom: SocketAddr, query: &str) -> Vec<Value> {
    let encoded: String = query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let Ok((200, body)) = http_get(prom, &format!("/api/v1/query?query={encoded}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Polls `query` until it has a result (60 s at most); returns its value.
fn wait_for_series(prom: SocketAddr, query: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = prometheus_query(prom, query);
        if let Some(first) = result.first() {
            eprintln!("prometheus: {query} => {first}");
            return first["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had a result for {query}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A real Prometheus scrapes the agent; its HTTP API then has the
/// fixture's metrics: estimated live heap, RSS, page faults, and the
/// agent's own health.
#[test]
fn agent_metrics_scraped_by_prometheus() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let prometheus = require_tool("prometheus", "prometheus");
    let agent_port = free_port();
    let prom_port = free_port();
    let dir = TempPath::new("prometheus");
    std::fs::create_dir_all(dir.path()).expect("prometheus directory");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: memtrace\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .expect("prometheus config");
    let child = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start prometheus");
    let _prometheus = Killed(child);
    let prom: SocketAddr = format!("127.0.0.1:{prom_port}").parse().expect("address");

    let mut target = Fixture::spawn(fixture("agent_fixture"), ["--wait", "flat", "16"]);
    target.wait_ready();
    let pid = target.pid();
    let listen = format!("127.0.0.1:{agent_port}");
    let pid_s = pid.to_string();
    let mut agent = Memtrace::spawn([
        "agent",
        "--pid",
        &pid_s,
        "--listen",
        &listen,
        "--profile-dir",
        "off",
        "--sample-bytes",
        "64KiB",
    ]);
    agent.wait_tracing();
    target.go();
    target.wait_done();

    let sel = format!("pid=\"{pid}\"");
    let up = wait_for_series(prom, "up{job=\"memtrace\"}");
    assert_eq!(up, 1.0, "Prometheus cannot scrape the agent");
    // 16 blocks of 1 MiB, each sampled (1 MiB is 16 intervals): exact.
    let live = wait_for_series(prom, &format!("memtrace_heap_live_bytes{{{sel}}} > 0"));
    assert!(
        (live - (16u64 << 20) as f64).abs() <= 0.10 * (16u64 << 20) as f64,
        "estimated live heap {live}, exact 16 MiB"
    );
    let anon = wait_for_series(prom, &format!("memtrace_rss_bytes{{{sel},type=\"anon\"}}"));
    assert!(
        anon >= (16u64 << 20) as f64,
        "anonymous RSS {anon} below the 16 MiB written"
    );
    let faults = wait_for_series(prom, &format!("memtrace_page_faults_total{{{sel}}}"));
    assert!(
        faults >= 16.0 * 256.0 / 2.0,
        "page faults {faults}: 16 MiB were written"
    );
    wait_for_series(
        prom,
        &format!("memtrace_sampling{{{sel},reason=\"selected\",comm=\"agent_fixture\"}}"),
    );
    wait_for_series(
        prom,
        &format!("memtrace_allocation_size_bytes_bucket{{{sel},le=\"1.048576e+06\"}}"),
    );
    let lost = wait_for_series(prom, "sum(memtrace_lost_total{reason=\"ringbuf_full\"})");
    assert_eq!(lost, 0.0);
    wait_for_series(prom, "memtrace_self_cpu_seconds_total");
    wait_for_series(prom, "memtrace_probe_mode{mode=\"sessions\"}");

    agent.interrupt();
    agent.wait().assert_status(0);
    target.finish_ok();
}

/// With `--push`, each profile is POSTed to `/ingest` as multipart pprof,
/// named `APP{labels}`; the endpoint decodes it and finds the labels.
#[test]
fn agent_pushes_pprof_with_labels() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let endpoint = Endpoint::start();
    let mut target = Fixture::spawn(fixture("agent_fixture"), ["--wait", "flat", "8"]);
    target.wait_ready();
    let pid = target.pid();
    let pid_s = pid.to_string();
    let url = format!("http://{}", endpoint.addr);
    let mut agent = Memtrace::spawn([
        "agent",
        "--pid",
        &pid_s,
        "--listen",
        "off",
        "--profile-dir",
        "off",
        "--profile-period",
        "1",
        "--sample-bytes",
        "64KiB",
        "--push",
        &url,
        "--push-app",
        "memtrace-test",
    ]);
    agent.wait_tracing();
    target.go();
    target.wait_done();
    let pushed = endpoint
        .next(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("nothing pushed within 30 s:\n{}", agent.stderr_so_far()));
    agent.interrupt();
    agent.wait().assert_status(0);
    target.finish_ok();

    assert!(
        pushed.target.starts_with("POST /ingest?"),
        "{}",
        pushed.target
    );
    assert_eq!(pushed.query("format").as_deref(), Some("pprof"));
    let name = pushed.query("name").expect("a name parameter");
    assert!(
        name.starts_with("memtrace-test{")
            && name.contains(&format!("pid={pid}"))
            && name.contains("comm=agent_fixture"),
        "pushed name {name}"
    );
    let bytes = pushed
        .part("profile")
        .unwrap_or_else(|| panic!("no `profile` part in a {} body", pushed.content_type));
    let profile = decode_profile(&bytes);
    assert_eq!(profile.period, 64 << 10);
    let live = profile.index("inuse_space");
    let held: i64 = profile.samples.iter().map(|s| s.values[live]).sum();
    // Each 1 MiB block is sampled with probability 1 - e^-16: weighed as
    // 1 MiB / (1 - e^-16), 0.12 B more.
    assert!(
        (held - (8 << 20)).abs() <= 8,
        "8 blocks of 1 MiB, each sampled: {held} B estimated live"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    for s in &profile.samples {
        assert!(
            s.labels.contains(&("pid".into(), pid_s.clone())),
            "{:?}",
            s.labels
        );
        assert!(s.labels.contains(&("comm".into(), "agent_fixture".into())));
        assert!(s.labels.contains(&("host".into(), host.trim().to_string())));
        assert!(
            s.labels
                .iter()
                .any(|(k, v)| k == "cgroup" && v.starts_with('/'))
        );
    }
}

/// A process that is flat, then grows 20 MiB/s, is escalated to sampled
/// tracing once it grows (not before) and backs off once it stops; a flat
/// one holding more memory is never escalated.
#[test]
fn agent_escalates_a_growing_process_not_a_flat_one() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let mut flat = Fixture::spawn(fixture("agent_fixture"), ["--wait", "flat", "64"]);
    flat.wait_ready();
    flat.go();
    flat.wait_done();
    let mut grow = Fixture::spawn(fixture("agent_fixture"), ["--wait", "grow", "4", "80"]);
    grow.wait_ready();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Memtrace::spawn([
        "agent",
        "--listen",
        &listen,
        "--profile-dir",
        "off",
        "--sample-bytes",
        "64KiB",
        "--escalate-slope",
        "4MiB",
        "--escalate-window",
        "3",
        "--check-interval",
        "0.5",
        "--calm",
        "2",
        "--max-escalated",
        "64",
    ]);
    agent.wait_tracing();
    let addr: SocketAddr = listen.parse().expect("address");
    let escalated = |pid: u32| {
        let (_, body) = http_get(addr, "/metrics").expect("scrape");
        body.lines().any(|l| {
            l.starts_with("memtrace_sampling{")
                && l.contains(&format!("pid=\"{pid}\""))
                && l.contains("reason=\"escalated\"")
        })
    };
    grow.go();
    // Its flat phase: 4 s. Not escalated then.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !escalated(grow.pid()),
        "escalated while flat:\n{}",
        agent.stderr_so_far()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !escalated(grow.pid()) {
        assert!(
            Instant::now() < deadline,
            "the growing fixture was not escalated:\n{}",
            agent.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    grow.wait_done();
    let backed_off = format!("PID {} (agent_fixture) stopped growing", grow.pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.stderr_so_far().contains(&backed_off) {
        assert!(
            Instant::now() < deadline,
            "the fixture did not back off once flat:\n{}",
            agent.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!escalated(flat.pid()));
    agent.interrupt();
    let out = agent.wait();
    out.assert_status(0);
    let stderr = out.stderr;
    assert!(stderr.contains(&format!(
        "escalating PID {} (agent_fixture): RSS growing",
        grow.pid()
    )));
    assert!(
        !stderr.contains(&format!("escalating PID {} ", flat.pid())),
        "the flat fixture was escalated:\n{stderr}"
    );
    grow.finish_ok();
    flat.finish_ok();
}

/// A process in a container's cgroup (named as Docker names its scopes) is
/// selected by `--cgroup` and labelled with its cgroup path and container
/// id, in the metrics and on every profile sample.
#[test]
fn agent_selects_by_cgroup_and_labels_the_container() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    const ID: &str = "5e2b7c9d4a1f3e8b6c0d2a4f6e8b0c1d3e5f7a9b1c3d5e7f9a0b2c4d6e8f0a1b";
    let cgroup = memtrace_tests::cgroup::MemoryCgroup::create(&format!("docker-{ID}"), 1 << 30)
        .expect("a cgroup");
    let mut target = Fixture::spawn(fixture("agent_fixture"), ["--wait", "flat", "4"]);
    target.wait_ready();
    let pid = target.pid();
    cgroup.add(pid).expect("the fixture moved into the cgroup");
    // The path as the process's /proc/PID/cgroup has it (v2 `0::PATH`, or v1
    // memory controller's).
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
    let path = own
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|p| p.contains(ID))
        .unwrap_or_else(|| panic!("the fixture is not in the new cgroup: {own}"))
        .to_string();
    let dir = TempPath::new("agent-profiles");
    std::fs::create_dir_all(dir.path()).expect("profile directory");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Memtrace::spawn([
        "agent",
        "--cgroup",
        &path,
        "--listen",
        &listen,
        "--profile-dir",
        dir.path().to_str().expect("UTF-8 path"),
        "--profile-period",
        "3600",
        "--sample-bytes",
        "64KiB",
        "--escalate-slope",
        "0",
    ]);
    agent.wait_tracing();
    target.go();
    target.wait_done();
    let addr: SocketAddr = listen.parse().expect("address");
    let (_, metrics) = http_get(addr, "/metrics").expect("scrape");
    let labels =
        format!("pid=\"{pid}\",comm=\"agent_fixture\",cgroup=\"{path}\",container=\"{ID}\"");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("memtrace_sampling{") && l.contains(&labels))
        .unwrap_or_else(|| panic!("no memtrace_sampling series with {labels}:\n{metrics}"));
    assert!(line.contains("reason=\"selected\""), "{line}");
    agent.interrupt();
    agent.wait().assert_status(0);
    target.finish_ok();
    let (_, profile) = profile_of(dir.path(), pid);
    let held: i64 = {
        let i = profile.index("inuse_space");
        profile.samples.iter().map(|s| s.values[i]).sum()
    };
    assert!(
        (held - (4 << 20)).abs() <= 8,
        "4 blocks of 1 MiB: {held} B live"
    );
    for s in &profile.samples {
        assert!(
            s.labels.contains(&("container_id".into(), ID.to_string())),
            "{:?}",
            s.labels
        );
        assert!(
            s.labels.contains(&("cgroup".into(), path.clone())),
            "{:?}",
            s.labels
        );
    }
}

/// A program without frame pointers (`nofp_fixture`, C++ -O2): the agent
/// copies its sampled stacks and walks them by DWARF, so each caller's
/// site is found. With one sample per byte every allocation is a sample of
/// weight 1, so the sites are exact.
#[test]
fn agent_walks_stacks_without_frame_pointers_by_dwarf() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let dir = TempPath::new("agent-profiles");
    std::fs::create_dir_all(dir.path()).expect("profile directory");
    let mut target = Fixture::spawn(fixture("nofp_fixture"), ["--wait"]);
    target.wait_ready();
    let pid = target.pid();
    let mut agent = agent_for(pid, dir.path(), &["--sample-bytes", "1", "--budget", "0"]);
    target.go();
    target.wait_done();
    agent.interrupt();
    let out = agent.wait();
    out.assert_status(0);
    target.finish_ok();
    assert!(out.stderr.contains("stacks_cut=0"), "{}", out.stderr);
    let name = format!("-{pid}-");
    let file = std::fs::read_dir(dir.path())
        .expect("profile directory")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains(&name))
        .expect("a profile of the fixture");
    let profile = decode_profile(&std::fs::read(&file).expect("profile"));
    for (function, site) in memtrace_tests::truth::nofp::SITES {
        let got = [
            profile.sum_through(function, "alloc_space"),
            profile.sum_through(function, "alloc_objects"),
            profile.sum_through(function, "inuse_space"),
        ];
        let want = [site.total_bytes, site.total_count, site.live_bytes].map(|v| v as i64);
        assert_eq!(
            got, want,
            "{function}: (allocated bytes, allocations, live bytes)"
        );
    }
}

/// The always-on tier's page-fault profiles: with every fault's stack
/// taken (`--fault-sample 1`), the profile of a process that writes 16 MiB
/// says the code that wrote them made 16 MiB resident, without any
/// allocator probe on it.
#[test]
fn agent_profiles_the_faults_that_made_memory_resident() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    let dir = TempPath::new("agent-profiles");
    std::fs::create_dir_all(dir.path()).expect("profile directory");
    let mut target = Fixture::spawn(fixture("agent_fixture"), ["--wait", "flat", "16"]);
    target.wait_ready();
    let pid = target.pid();
    let mut agent = Memtrace::spawn([
        "agent",
        "--listen",
        "off",
        "--profile-dir",
        dir.path().to_str().expect("UTF-8 path"),
        "--profile-period",
        "3600",
        "--fault-sample",
        "1",
        "--escalate-slope",
        "0",
    ]);
    agent.wait_tracing();
    target.go();
    target.wait_done();
    agent.interrupt();
    agent.wait().assert_status(0);
    target.finish_ok();
    let name = format!("memtrace-faults-agent_fixture-{pid}-");
    let file = std::fs::read_dir(dir.path())
        .expect("profile directory")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&name))
        })
        .unwrap_or_else(|| panic!("no {name}* in {}", dir.path().display()));
    let profile = decode_profile(&std::fs::read(&file).expect("profile"));
    assert_eq!(profile.sample_types, ["faults", "resident_space"]);
    // 16 blocks of 256 pages, each block's first page faulted in by malloc
    // writing its header (in libc, whose stacks stop there).
    let bytes = profile.sum_through("hold_mib", "resident_space");
    let mib = 1 << 20;
    assert!(
        (15 * mib..=17 * mib).contains(&bytes),
        "hold_mib touched 16 MiB; its faults made {bytes} B resident"
    );
    assert!(profile.sum_through("hold_mib", "faults") >= 16 * 256 / 2);
    // No allocator was probed: no heap profile.
    assert!(
        !std::fs::read_dir(dir.path())
            .expect("profile directory")
            .any(|e| e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with("memtrace-agent_fixture")),
        "a heap profile without sampling"
    );
}
