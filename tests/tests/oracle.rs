//! The differential oracle: programs this project did not write (CPython,
//! sqlite3, git, gcc, GNU sort's threads), traced at the same time by
//! memtrace and by an independent tracer of the same calls, and the two
//! counts compared per process.
//!
//! The independent tracer is `tests/oracle/alloc_oracle.bt`, a bpftrace
//! script written apart from memtrace's code (uprobes and uretprobes on the
//! C library's allocator, per-process counts and live blocks, realloc as
//! memtrace's README documents it). Each program is started behind a gate
//! (`sh` waiting on its stdin, then `exec`ing the program): both tracers
//! attach to the gate's PID (memtrace with `-p PID --follow-forks`, the
//! oracle following forks itself), then the gate opens, so both see the same
//! calls from the same instant, through the exec and into every child.
//!
//! Compared per process: allocations and bytes made, blocks and bytes live
//! at the end, frees of blocks seen allocated, frees of blocks never seen.
//! The table is printed and written to `target/oracle/table.txt`, which
//! `cargo xtask test` prints at its end.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use memtrace_tests::tool::require_tool;
use memtrace_tests::{Memtrace, TempPath, require_root};
use serde_json::Value;

use crate::shared_machine;

/// One program of the corpus: a name for the table and the command (run in
/// a directory that [`corpus`] fills with its inputs).
struct Program {
    name: &'static str,
    command: Vec<String>,
}

/// The oracle's figures of one process (its `ORACLE_PROC` line).
#[derive(Debug, Default)]
struct Counted {
    comm: String,
    allocs: u64,
    bytes: u64,
    known_frees: u64,
    live_blocks: u64,
    live_bytes: u64,
    unknown_frees: u64,
}

fn oracle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle")
}

/// Parses the oracle's `ORACLE_PROC` lines, by pid; panics on its warnings
/// (events it lost, maps it filled).
fn parse_oracle(out: &str) -> Vec<(u32, Counted)> {
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("ORACLE_WARN "))
        .collect();
    assert!(
        warnings.is_empty(),
        "the oracle lost events or failed:\n{}",
        warnings.join("\n")
    );
    out.lines()
        .filter_map(|l| l.strip_prefix("ORACLE_PROC "))
        .map(|l| {
            let mut c = Counted::default();
            let mut pid = 0;
            for kv in l.split_whitespace() {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let n = v.parse().unwrap_or(0);
                match k {
                    "pid" => pid = n as u32,
                    "comm" => c.comm = v.to_string(),
                    "allocs" => c.allocs = n,
                    "bytes" => c.bytes = n,
                    "known_frees" => c.known_frees = n,
                    // memtrace keeps one account of a process across
                    // its execs (README: a block from before an exec stays
                    // live until freed); the oracle splits it at each exec.
                    "live_blocks" | "exec_dropped_blocks" => c.live_blocks += n,
                    "live_bytes" | "exec_dropped_bytes" => c.live_bytes += n,
                    "unknown_frees" => c.unknown_frees = n,
                    _ => {}
                }
            }
            (pid, c)
        })
        .collect()
}

/// memtrace's figures of process `pid`, in the oracle's terms.
fn memtrace_counts(report: &Value, pid: u32) -> Option<Counted> {
    let p = report["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))?;
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    Some(Counted {
        comm: p["comm"].as_str().unwrap_or("?").to_string(),
        allocs: n("total_count"),
        bytes: n("total_bytes"),
        known_frees: n("freed_count"),
        live_blocks: n("live_count"),
        live_bytes: n("live_bytes"),
        unknown_frees: n("unknown_frees"),
    })
}

/// Waits until `path` holds `needle` (the oracle's probes are attached once
/// its BEGIN has printed), 180 s at most (bpftrace zeroes its preallocated
/// maps first).
fn wait_for(path: &Path, needle: &str, oracle: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return;
        }
        if let Ok(Some(status)) = oracle.try_wait() {
            panic!("the oracle exited with {status} before attaching");
        }
        assert!(Instant::now() < deadline, "the oracle never attached");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `program` in `dir` behind the gate under both tracers; returns one
/// table row per process and whether each was equal.
fn compare(program: &Program, dir: &Path) -> Vec<(String, bool)> {
    // The gate: `sh` blocked in `read` until both tracers are attached.
    let mut gate = Command::new("sh")
        .arg("-c")
        .arg("read -r _ && exec \"$@\"")
        .arg("gate")
        .args(&program.command)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh");
    let pid = gate.id();
    // A file of this program's own: the attach is read from it.
    let raw = dir.join(format!("{}.oracle", program.name));
    let _ = std::fs::remove_file(&raw);
    let mut oracle = Command::new("bash")
        .arg(oracle_dir().join("alloc_oracle.sh"))
        .arg(pid.to_string())
        .env("ORACLE_RAW", &raw)
        // Every map of the script gets this many keys, preallocated: the
        // live blocks need the most (a quarter million is more than the
        // corpus holds at once; a full map is a warning, which fails).
        .env("ORACLE_MAP_KEYS", "262144")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    wait_for(&raw, "ORACLE_START", &mut oracle);
    let pid_arg = pid.to_string();
    let mut memtrace = Memtrace::spawn([
        "-p",
        pid_arg.as_str(),
        "--follow-forks",
        "--format",
        "json",
        "--top",
        "0",
    ]);
    memtrace.wait_tracing();
    let mut stdin = gate.stdin.take().expect("gate stdin");
    stdin.write_all(b"go\n").expect("open the gate");
    drop(stdin);
    let status = gate.wait().expect("the program");
    assert!(status.success(), "{}: {status}", program.name);
    let out = memtrace.wait();
    out.assert_status(0);
    let report = out.json();
    // The program and its children are done: the oracle stops counting
    // (its script's SIGTERM trap), prints, and exits.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(oracle.id() as i32, libc::SIGTERM) };
    let oracle = oracle.wait_with_output().expect("oracle");
    let text = String::from_utf8_lossy(&oracle.stdout);
    let counted = parse_oracle(&text);
    assert!(
        !counted.is_empty(),
        "{}: the oracle counted no process:\n{text}\n{}",
        program.name,
        String::from_utf8_lossy(&oracle.stderr)
    );
    let mut rows = Vec::new();
    for (pid, o) in counted {
        let m = memtrace_counts(&report, pid).unwrap_or_else(|| {
            panic!(
                "{}: the oracle saw PID {pid} ({}) allocate, memtrace has no such process:\n{}",
                program.name, o.comm, report["processes"]
            )
        });
        let pairs = [
            ("allocs", o.allocs, m.allocs),
            ("bytes", o.bytes, m.bytes),
            ("frees", o.known_frees, m.known_frees),
            ("live", o.live_blocks, m.live_blocks),
            ("live_bytes", o.live_bytes, m.live_bytes),
            ("unknown_frees", o.unknown_frees, m.unknown_frees),
        ];
        let equal = pairs.iter().all(|(_, a, b)| a == b);
        let cells: Vec<String> = pairs
            .iter()
            .map(|(k, a, b)| {
                if a == b {
                    format!("{k}={a}")
                } else {
                    format!("{k}={a}/{b}")
                }
            })
            .collect();
        rows.push((
            format!(
                "{:<10} {:<8} {:>7} {:<16} {} {}",
                program.name,
                "--pid",
                pid,
                m.comm,
                if equal { "equal" } else { "DIFFER" },
                cells.join(" ")
            ),
            equal,
        ));
    }
    rows
}

/// A Python script of json, re, sqlite3 and zlib work, deterministic.
const PY_SCRIPT: &str = r#"
import json, re, sqlite3, zlib
rows = [{"id": i, "name": "n%d" % i, "tags": ["t%d" % (i % 7)] * 3} for i in range(20000)]
text = json.dumps(rows)
back = json.loads(text)
words = re.findall(r"n\d+", text)
packed = zlib.compress(text.encode(), 6)
assert zlib.decompress(packed).decode() == text
db = sqlite3.connect(":memory:")
db.execute("create table t (id integer primary key, name text, tags text)")
db.executemany("insert into t values (?, ?, ?)", [(r["id"], r["name"], json.dumps(r["tags"])) for r in back])
n = db.execute("select count(*), sum(length(name)) from t where name like 'n1%'").fetchone()
print(len(words), len(packed), n)
"#;

const C_SOURCE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct node { struct node *next; char name[24]; };
int main(void) {
    struct node *head = NULL;
    for (int i = 0; i < 1000; i++) {
        struct node *n = malloc(sizeof *n);
        snprintf(n->name, sizeof n->name, "node %d", i);
        n->next = head;
        head = n;
    }
    printf("%s\n", head->name);
    return 0;
}
"#;

/// The corpus, with its inputs written to `dir`.
fn corpus(dir: &Path) -> Vec<Program> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    std::fs::write(dir.join("work.py"), PY_SCRIPT).expect("script");
    std::fs::write(dir.join("prog.c"), C_SOURCE).expect("C source");
    let sql: String = std::iter::once("create table t(a integer, b text);\nbegin;\n".to_string())
        .chain((0..20_000).map(|i| format!("insert into t values({i}, 'row {i} {}');\n", i * 7919 % 1000)))
        .chain(std::iter::once(
            "commit;\ncreate index tb on t(b);\nselect count(*), max(a), sum(length(b)) from t where b like 'row 1%';\n"
                .to_string(),
        ))
        .collect();
    std::fs::write(dir.join("load.sql"), sql).expect("SQL");
    let lines: String = (0..200_000)
        .map(|i| format!("{}\n", (i * 7919) % 100_003))
        .collect();
    std::fs::write(dir.join("numbers.txt"), lines).expect("numbers");
    let mut corpus = Vec::new();
    let sqlite = require_tool("sqlite3", "sqlite3");
    corpus.push(Program {
        name: "sqlite3",
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("exec {} db.sqlite < load.sql", sqlite.display()),
        ],
    });
    let git = require_tool("git", "git");
    let git = git.display().to_string();
    corpus.push(Program {
        name: "git",
        command: s(&[
            "sh",
            "-c",
            &format!(
                "{git} init -q repo && cd repo && for i in $(seq 1 40); do echo line $i > f$i; done && \
                 {git} add . && {git} -c user.name=t -c user.email=t@t commit -qm first && {git} log --stat > /dev/null"
            ),
        ]),
    });
    let gcc = require_tool("gcc", "gcc");
    corpus.push(Program {
        name: "gcc",
        command: vec![
            gcc.display().to_string(),
            "-O2".into(),
            "-c".into(),
            "prog.c".into(),
        ],
    });
    corpus.push(Program {
        name: "sort",
        command: s(&[
            "sort",
            "--parallel=2",
            "-S",
            "8M",
            "-n",
            "-o",
            "sorted.txt",
            "numbers.txt",
        ]),
    });
    let python = require_tool("python3", "python3");
    corpus.push(Program {
        name: "python3",
        command: vec![python.display().to_string(), "work.py".into()],
    });
    if let Some(debian) = Some(Path::new("/usr/bin/python3.11")).filter(|p| p.exists()) {
        corpus.push(Program {
            name: "python3.11",
            command: vec![debian.display().to_string(), "work.py".into()],
        });
    }
    corpus
}

/// Every program of the corpus, attached by `--pid` before its work and
/// followed through its exec and into its children: memtrace and the oracle
/// count the same allocations, bytes, frees and live blocks per process.
#[test]
fn oracle_agrees_on_real_programs() {
    if !require_root() {
        return;
    }
    let _machine = shared_machine();
    require_tool("bpftrace", "bpftrace");
    let dir = TempPath::new("oracle");
    std::fs::create_dir_all(dir.path()).expect("oracle directory");
    let mut table = vec![format!(
        "{:<10} {:<8} {:>7} {:<16} {} {}",
        "program", "mode", "pid", "comm", "result", "figures (oracle/memtrace where they differ)"
    )];
    let mut differ = Vec::new();
    for program in corpus(dir.path()) {
        for (row, equal) in compare(&program, dir.path()) {
            eprintln!("{row}");
            if !equal {
                differ.push(row.clone());
            }
            table.push(row);
        }
    }
    let text = table.join("\n") + "\n";
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oracle");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("table.txt"), &text);
    eprintln!("{text}");
    assert!(
        differ.is_empty(),
        "memtrace and the oracle differ:\n{}\n\nthe whole table:\n{text}",
        differ.join("\n")
    );
}
