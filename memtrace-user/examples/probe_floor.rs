//! The cost floor of tracing, for `cargo xtask bench`: puts programs that do
//! nothing on the probe points memtrace would use in process PID, prints
//! `attached`, and keeps them until the process exits or stdin closes.
//!
//! Usage: `probe_floor PID` (as root).

use std::io::Read;
use std::time::Duration;

fn main() {
    let pid: u32 = match std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: probe_floor PID");
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
    let floor = match memtrace::load::Floor::attach(&libs, pid) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("probe_floor: {e}");
            std::process::exit(2);
        }
    };
    println!("attached");
    // Whichever comes first: stdin closes, or the process is gone.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(floor);
}
