//! Which libraries are probed, for which processes, and probing the ones a
//! traced process maps later: the allocator of a new image after an `exec`,
//! or one loaded with `dlopen`.
//!
//! The dynamic loader's hook (`_dl_debug_state`, see
//! [`attach::LOADER_HOOK`]) stops the process when it has mapped libraries
//! ([`Event::Loaded`]); [`Probing::settle`] reads its mappings, probes any
//! allocator library not probed for it yet, and only then lets it continue
//! (SIGCONT), so none of the new library's calls is missed. An `exec` is
//! looked at too, without a stop: the new image's loader may be one memtrace
//! has not hooked.
//!
//! This module decides what to attach and when; `attach` finds the
//! functions and `load` talks to the kernel.

use aya::maps::{MapData, RingBuf};

use crate::attach::{self, Library};
use crate::error::Result;
use crate::event::Event;
use crate::guard::Stopped;
use crate::load::Tracer;
use crate::report::Probes;

/// The probes attached so far, and the processes waiting for more.
pub struct Probing {
    /// Probes go on every process (filtered in eBPF), not per pid.
    follow_forks: bool,
    /// What reports list.
    probes: Vec<Probes>,
    /// Files probed (device, inode), and for which pid (`None`: all).
    done: Vec<((String, u64), Option<u32>)>,
    /// Processes to look at again: (pid, stopped at the loader's hook).
    pending: Vec<(u32, bool)>,
    /// Whether `probes` grew since [`Probing::take_changed`].
    changed: bool,
    /// The kernel's list of processes stopped at the loader's hook, which
    /// memtrace's guard reads if memtrace dies; a process leaves it when
    /// continued.
    stopped: Option<Stopped>,
}

impl Probing {
    /// Nothing probed yet. With `follow_forks`, each file is probed once for
    /// every process.
    pub fn new(follow_forks: bool) -> Self {
        Self {
            follow_forks,
            probes: Vec::new(),
            done: Vec::new(),
            pending: Vec::new(),
            changed: false,
            stopped: None,
        }
    }

    /// The kernel's list of stopped processes (see [`crate::guard`]).
    pub fn set_stopped(&mut self, stopped: Stopped) {
        self.stopped = Some(stopped);
    }

    /// Lets a process stopped at the loader's hook run on.
    fn resume(&mut self, pid: u32) {
        // SAFETY: kill has no memory-safety preconditions. A pid reused
        // meanwhile would get a harmless SIGCONT.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        if let Some(s) = &mut self.stopped {
            let _ = s.remove(&pid);
        }
    }

    fn scope(&self, pid: Option<u32>) -> Option<u32> {
        if self.follow_forks { None } else { pid }
    }

    /// Probes `lib` for `pid` (`None`: every process) unless it is already;
    /// a failure is the caller's to report.
    pub fn attach(&mut self, tracer: &mut Tracer, lib: &Library, pid: Option<u32>) -> Result<()> {
        let scope = self.scope(pid);
        let key = (lib.id.clone(), scope);
        if self.done.contains(&key) {
            return Ok(());
        }
        self.done.push(key);
        let probes = tracer.attach(lib, scope)?;
        self.probes.push(probes);
        self.changed = true;
        Ok(())
    }

    /// Notes the events that call for another look at a process.
    pub fn note(&mut self, ev: &Event) {
        match ev {
            Event::Exec { pid, .. } => self.pending.push((*pid, false)),
            Event::Loaded { pid, .. } => self.pending.push((*pid, true)),
            _ => {}
        }
    }

    /// Has [`Probing::settle`] look at process `pid`'s mappings again (it
    /// is not stopped).
    pub fn relook_later(&mut self, pid: u32) {
        self.pending.push((pid, false));
    }

    /// Probes the new allocator libraries (and loaders) of the processes
    /// noted, then continues the stopped ones, whatever happened.
    pub fn settle(&mut self, tracer: &mut Tracer) {
        for (pid, stopped) in std::mem::take(&mut self.pending) {
            // A process gone has nothing left to probe.
            for lib in attach::libraries_of(pid).unwrap_or_default() {
                if let Err(e) = self.attach(tracer, &lib, Some(pid)) {
                    eprintln!(
                        "memtrace: cannot probe {} for PID {pid}: {}; its calls are not seen",
                        lib.display, e.message
                    );
                }
            }
            if stopped {
                self.resume(pid);
            }
        }
    }

    /// Once the probes are gone: continues every process whose loader stop
    /// is still in `ring` (nothing more is probed, so they need not wait).
    pub fn continue_stopped(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            if let Ok(Event::Loaded { pid, .. }) = crate::event::decode(&item) {
                self.pending.push((pid, true));
            }
        }
        for (pid, stopped) in std::mem::take(&mut self.pending) {
            if stopped {
                self.resume(pid);
            }
        }
    }

    /// The probes attached, for reports.
    pub fn probes(&self) -> &[Probes] {
        &self.probes
    }

    /// Whether probes were added since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}
