//! The cost floor of tracing, for `cargo xtask bench`: puts programs that do
//! nothing on the probe points memtrace would use in process PID, prints
//! `attached`, and keeps them until the process exits or stdin closes.
//!
//! With `--probe-cost`, the kernel times the empty programs, and their run
//! time per call is printed at the end (`cost PROGRAM RUNS NS`).
//!
//! Usage: `probe_floor [--probe-cost] PID` (as root).

use std::io::Read;
use std::time::Duration;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let probe_cost = args.first().is_some_and(|a| a == "--probe-cost");
    if probe_cost {
        args.remove(0);
    }
    let pid: u32 = match args.first().and_then(|a| a.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: probe_floor [--probe-cost] PID");
            std::process::exit(2);
        }
    };
    let libs = match memtrace::attach::libraries_of(pid) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("probe_floor: cannot read the mappings of PID {pid}: {e}");
            std::process::exit(2);
        }
    };
    let floor = match memtrace::load::Floor::attach(&libs, pid, probe_cost) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("probe_floor: {e}");
            std::process::exit(2);
        }
    };
    println!("attached");
    // Whichever comes first: stdin closes, or the process is gone.
    let (done, wait) = std::sync::mpsc::channel();
    let closed = done.clone();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed.send(());
    });
    std::thread::spawn(move || {
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = done.send(());
    });
    let _ = wait.recv();
    for c in floor.probe_cost() {
        println!("cost {} {} {}", c.program, c.runs, c.run_ns);
    }
    drop(floor);
}
