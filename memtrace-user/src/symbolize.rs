//! Return addresses → functions, files and lines.
//!
//! Two steps, split the way blazesym splits them: while a process is alive,
//! [`Symbols::observe`] snapshots its mappings and opens each mapped file that
//! holds a stack address (through `/proc/PID/map_files`, so the file stays
//! readable after the process exits, is deleted, or lived in another mount
//! namespace). At report time, [`Symbols::frames`] turns each address into a
//! (file, offset) pair from that snapshot and symbolizes it with blazesym
//! (ELF symbols, DWARF lines and inlined functions, debug links and
//! `/usr/lib/debug/.build-id`), caching per (file, offset).
//!
//! Kernel addresses (of kernel stacks, at or above [`KERNEL_START`]) need no
//! snapshot: they mean the same in every process, and blazesym's kernel
//! source symbolizes them from `/proc/kallsyms` (or a `vmlinux` with debug
//! info, when one is installed) at report time, caching per address. Their
//! module is `[kernel.kallsyms]`, or `[name]` for a loadable module, as perf
//! shows them.
//!
//! An address that cannot be resolved is still reported, as a bare address or
//! as module + offset: never dropped, never an error.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use blazesym::MaybeDefault;
use blazesym::symbolize::{self, source::Source};

use crate::maps::{self, Mapping};
use crate::python::is_python;

/// Lowest kernel address (the kernel half of a 48-bit address space, on
/// x86-64 and arm64); user addresses are below.
pub const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// The module of a frame in the kernel image, named as perf names it.
pub const KERNEL_MODULE: &str = "[kernel.kallsyms]";

/// Whether `addr` is a kernel address.
pub fn is_kernel(addr: u64) -> bool {
    addr >= KERNEL_START
}

/// One reported stack frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Function name, demangled; `None` when no symbol covers the address.
    pub function: Option<String>,
    /// Source file, when debug info has it.
    pub file: Option<String>,
    /// Source line, when debug info has it.
    pub line: Option<u32>,
    /// Path of the mapped file, as the process saw it; for a kernel
    /// address, [`KERNEL_MODULE`] or `[name]` of a loadable module.
    pub module: Option<String>,
    /// The return address, as in the process.
    #[serde(serialize_with = "hex")]
    pub address: u64,
    /// Offset of the address in `module` (for the kernel image, the address
    /// itself; for a loadable module, from where it is loaded): with the
    /// build-id, what symbolizes the frame later, elsewhere, when the binary
    /// here has no symbols.
    #[serde(
        rename = "offset",
        skip_serializing_if = "Option::is_none",
        serialize_with = "hex_opt"
    )]
    pub module_offset: Option<u64>,
    /// GNU build-id of `module`, hex, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

impl Frame {
    /// A short name for stack-shaped formats: the function, else
    /// `module+0xoffset`, else the address.
    pub fn label(&self) -> String {
        if let Some(f) = &self.function {
            return f.clone();
        }
        match &self.module {
            Some(m) => format!(
                "{}+{:#x}",
                m.rsplit('/').next().unwrap_or(m),
                self.module_offset.unwrap_or(0)
            ),
            None => format!("{:#x}", self.address),
        }
    }
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

fn hex_opt<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex(v, s),
        None => s.serialize_none(),
    }
}

/// What reports need from symbolization. Production uses [`Symbols`]; tests
/// pass a table.
pub trait Symbolize {
    /// Frames for a stack of process `pid`, innermost first. May return more
    /// frames than addresses (inlined functions get frames of their own).
    /// Addresses are return addresses, user or kernel ([`is_kernel`]).
    fn frames(&mut self, pid: u32, stack: &[u64]) -> Vec<Frame>;
    /// The process's command name, if known.
    fn comm(&self, pid: u32) -> Option<String>;
}

struct Module {
    path: String,
    /// Open while the process was alive; read through `/proc/self/fd`.
    file: Option<File>,
    build_id: Option<String>,
}

#[derive(Clone)]
struct Proc {
    comm: Option<String>,
    /// Executable mappings, by address.
    maps: Vec<Mapping>,
    /// Index into `Symbols::modules` of each mapping's file.
    modules: Vec<usize>,
    /// `/proc/PID` could not be read any more.
    gone: bool,
    /// The process mapped code since `maps` was read (see
    /// [`Symbols::maps_changed`]).
    stale: bool,
    /// When `maps` was read.
    read_at: Instant,
}

/// How long a snapshot of a process's mappings stands when no `mmap` of
/// code was seen: a stack with an address outside every mapping (a frame
/// pointer walk through code without frame pointers reads garbage) must not
/// read `/proc/PID/maps` again at every new stack, yet code mapped unseen
/// (`mprotect`, a lost record) is found within this.
const MAPS_FRESH: Duration = Duration::from_secs(1);

/// Symbolization with blazesym over snapshots taken while processes live.
pub struct Symbols {
    blaze: symbolize::Symbolizer,
    procs: HashMap<u32, Proc>,
    modules: Vec<Module>,
    module_ids: HashMap<(String, u64, String), usize>,
    cache: HashMap<(usize, u64), Vec<Frame>>,
    /// Frames of kernel addresses, by address.
    kernel_cache: HashMap<u64, Vec<Frame>>,
    /// Loaded kernel modules, read once when first needed.
    kernel_modules: Option<Vec<KernelModule>>,
    /// The Python code objects that Python frames' stand-in addresses
    /// refer to ([`crate::python`]).
    pub python: crate::python::Codes,
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbols {
    /// An empty symbolizer.
    pub fn new() -> Self {
        Self {
            blaze: symbolize::Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            procs: HashMap::new(),
            modules: Vec::new(),
            module_ids: HashMap::new(),
            cache: HashMap::new(),
            kernel_cache: HashMap::new(),
            kernel_modules: None,
            python: crate::python::Codes::default(),
        }
    }

    /// Remembers the process's name and mappings the first time it is seen,
    /// and opens the files holding `stack`'s addresses. Mappings are read
    /// again when an address is outside the snapshot (a library loaded
    /// later), as long as the process lives. Kernel addresses need nothing
    /// from the process and are skipped.
    pub fn observe(&mut self, pid: u32, stack: &[u64]) {
        if let Entry::Vacant(slot) = self.procs.entry(pid) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|s| s.trim_end().to_string());
            slot.insert(Proc {
                comm,
                maps: Vec::new(),
                modules: Vec::new(),
                gone: false,
                stale: false,
                read_at: Instant::now(),
            });
            self.refresh(pid);
        }
        let covered = |p: &Proc| {
            stack
                .iter()
                .all(|&a| is_kernel(a) || is_python(a) || maps::position(&p.maps, a).is_some())
        };
        let p = &self.procs[&pid];
        if !covered(p) && !p.gone && (p.stale || p.read_at.elapsed() >= MAPS_FRESH) {
            self.refresh(pid);
        }
        for &addr in stack {
            let Some(p) = self.procs.get(&pid) else {
                return;
            };
            let Some(i) = maps::position(&p.maps, addr) else {
                continue;
            };
            let id = p.modules[i];
            if self.modules[id].file.is_none() {
                let file = open_mapped(pid, &p.maps[i]);
                self.modules[id].build_id = file.as_ref().and_then(build_id);
                self.modules[id].file = file;
            }
        }
    }

    /// Forgets process `pid` (it exited and was reported): its snapshot
    /// goes, and the files only it held open are closed, with their cached
    /// frames. A long-running agent would otherwise keep every process
    /// it ever saw.
    pub fn forget(&mut self, pid: u32) {
        if self.procs.remove(&pid).is_none() {
            return;
        }
        let mut used = vec![false; self.modules.len()];
        for p in self.procs.values() {
            for &m in &p.modules {
                used[m] = true;
            }
        }
        for (id, module) in self.modules.iter_mut().enumerate() {
            if !used[id] {
                module.file = None;
            }
        }
        self.cache.retain(|(m, _), _| used[*m]);
    }

    /// Whether the process was seen (its name and mappings read).
    pub fn knows(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// The process called execve: its name and mappings are new. Stacks
    /// seen before keep their cached frames. `comm` is the name the kernel
    /// gave at the exec: the process may be gone by the time this runs.
    pub fn exec(&mut self, pid: u32, comm: Option<&str>) {
        self.procs.remove(&pid);
        self.observe(pid, &[]);
        if let (Some(p), Some(c)) = (self.procs.get_mut(&pid), comm) {
            p.comm = Some(c.to_string());
        }
    }

    /// The process mapped something that may hold code (an executable
    /// `mmap`, an `mremap`, its loader's hook): its mappings are read again
    /// at its next stack outside them.
    pub fn maps_changed(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.stale = true;
        }
    }

    /// `parent` forked `child`, whose address space is a copy of the
    /// parent's: the child starts with the parent's mappings (it may be
    /// gone before memtrace reads its own), and `comm`, the name the kernel
    /// gave it at the fork.
    pub fn fork(&mut self, parent: u32, child: u32, comm: Option<&str>) {
        let Some(mut p) = self.procs.get(&parent).cloned() else {
            self.observe(child, &[]);
            return;
        };
        if let Some(c) = comm {
            p.comm = Some(c.to_string());
        }
        p.gone = false;
        self.procs.insert(child, p);
    }

    fn refresh(&mut self, pid: u32) {
        let Ok(mut maps) = maps::read(pid) else {
            // Only a process that is gone stays unreadable: a read that
            // fails while it lives (mid-exec, say) is retried at its next
            // stack.
            if let Some(p) = self.procs.get_mut(&pid) {
                p.gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            }
            return;
        };
        maps.retain(|m| m.exec);
        let mut modules = Vec::with_capacity(maps.len());
        for m in &maps {
            let key = (m.dev.clone(), m.inode, m.path.clone());
            let id = *self.module_ids.entry(key).or_insert_with(|| {
                self.modules.push(Module {
                    path: m.path.clone(),
                    file: None,
                    build_id: None,
                });
                self.modules.len() - 1
            });
            modules.push(id);
        }
        if let Some(p) = self.procs.get_mut(&pid) {
            p.maps = maps;
            p.modules = modules;
            p.stale = false;
            p.read_at = Instant::now();
        }
    }

    fn symbolize(&mut self, module: usize, offset: u64, address: u64) -> Vec<Frame> {
        let m = &self.modules[module];
        let base = Frame {
            module: Some(m.path.clone()),
            address,
            module_offset: Some(offset),
            build_id: m.build_id.clone(),
            ..Frame::default()
        };
        let Some(file) = &m.file else {
            return vec![base];
        };
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let src = Source::Elf(symbolize::source::Elf::new(path));
        // A return address points after the call; the call is one byte back.
        let input = symbolize::Input::FileOffset(offset.saturating_sub(1));
        let sym = match self.blaze.symbolize_single(&src, input) {
            Ok(symbolize::Symbolized::Sym(sym)) => sym,
            _ => return vec![base],
        };
        sym_frames(&sym, base)
    }

    /// Symbolizes kernel addresses not in the cache yet, into the cache.
    fn symbolize_kernel(&mut self, addrs: &[u64]) {
        // Kernel stacks hold return addresses too: look up the call, one
        // byte back, as the kernel's own backtraces do (printk's `%pB`,
        // Documentation/core-api/printk-formats.rst).
        let calls: Vec<u64> = addrs.iter().map(|a| a.saturating_sub(1)).collect();
        let input = symbolize::Input::AbsAddr(&calls[..]);
        let kernel = symbolize::source::Kernel::default();
        let results = self
            .blaze
            .symbolize(&Source::Kernel(kernel), input)
            .or_else(|_| {
                // A vmlinux was found but could not be used (its KASLR offset
                // needs /proc/kcore, say): kallsyms alone still has names.
                let kallsyms_only = symbolize::source::Kernel {
                    vmlinux: MaybeDefault::None,
                    ..symbolize::source::Kernel::default()
                };
                self.blaze.symbolize(&Source::Kernel(kallsyms_only), input)
            })
            .unwrap_or_default();
        let modules = self
            .kernel_modules
            .get_or_insert_with(|| {
                std::fs::read_to_string("/proc/modules")
                    .map(|text| parse_modules(&text))
                    .unwrap_or_default()
            })
            .as_slice();
        for (i, &addr) in addrs.iter().enumerate() {
            let (module, offset) = match kernel_module(modules, addr) {
                Some(m) => (format!("[{}]", m.name), addr - m.start),
                None => (KERNEL_MODULE.to_string(), addr),
            };
            let base = Frame {
                module: Some(module),
                address: addr,
                module_offset: Some(offset),
                ..Frame::default()
            };
            let frames = match results.get(i) {
                Some(symbolize::Symbolized::Sym(sym)) => sym_frames(sym, base),
                _ => vec![base],
            };
            self.kernel_cache.insert(addr, frames);
        }
    }
}

/// The frames of a symbol blazesym found: its inlined calls, then itself,
/// each with `base`'s module and address.
fn sym_frames(sym: &symbolize::Sym<'_>, base: Frame) -> Vec<Frame> {
    let code = |ci: Option<&symbolize::CodeInfo<'_>>| {
        ci.map(|ci| (Some(ci.to_path().display().to_string()), ci.line))
            .unwrap_or((None, None))
    };
    // blazesym lists inlined calls outermost first, each with the location
    // inside it; the symbol's own location is the call site in the outer
    // function. Frames go innermost first.
    let mut out = Vec::with_capacity(1 + sym.inlined.len());
    for f in sym.inlined.iter().rev() {
        let (file, line) = code(f.code_info.as_ref());
        out.push(Frame {
            function: Some(f.name.to_string()),
            file,
            line,
            ..base.clone()
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    out.push(Frame {
        function: Some(sym.name.to_string()),
        file,
        line,
        ..base
    });
    out
}

/// A loaded kernel module's core, as `/proc/modules` lists it.
#[derive(Debug, PartialEq, Eq)]
struct KernelModule {
    name: String,
    start: u64,
    size: u64,
}

/// Parses `/proc/modules` (`name size refcount deps state address ...`).
/// Modules whose address is hidden (0, for lack of privileges) are left
/// out.
fn parse_modules(text: &str) -> Vec<KernelModule> {
    let mut out: Vec<KernelModule> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let (name, size, addr) = (fields.first()?, fields.get(1)?, fields.get(5)?);
            let start = u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?;
            Some(KernelModule {
                name: name.to_string(),
                start,
                size: size.parse().ok()?,
            })
        })
        .filter(|m| m.start != 0)
        .collect();
    out.sort_by_key(|m| m.start);
    out
}

/// The module (sorted by start) that holds `addr`.
fn kernel_module(modules: &[KernelModule], addr: u64) -> Option<&KernelModule> {
    let i = modules
        .partition_point(|m| m.start <= addr)
        .checked_sub(1)?;
    let m = &modules[i];
    (addr - m.start < m.size).then_some(m)
}

/// The GNU build-id note of an ELF file, as hex.
fn build_id(file: &File) -> Option<String> {
    use object::Object;
    // Reads only the headers and the note, not the whole file.
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}
/// Opens the file behind a mapping, inside the process's own root (see
/// [`crate::mapped`]).
fn open_mapped(pid: u32, m: &Mapping) -> Option<File> {
    crate::mapped::open(pid, m).ok()
}

impl Symbolize for Symbols {
    fn frames(&mut self, pid: u32, stack: &[u64]) -> Vec<Frame> {
        let mut kernel: Vec<u64> = stack
            .iter()
            .copied()
            .filter(|&a| is_kernel(a) && !self.kernel_cache.contains_key(&a))
            .collect();
        if !kernel.is_empty() {
            kernel.sort_unstable();
            kernel.dedup();
            self.symbolize_kernel(&kernel);
        }
        let mut out = Vec::with_capacity(stack.len());
        for &addr in stack {
            if is_kernel(addr) {
                out.extend(self.kernel_cache[&addr].iter().cloned());
                continue;
            }
            if is_python(addr) {
                out.push(self.python.frame(addr));
                continue;
            }
            let hit = self.procs.get(&pid).and_then(|p| {
                let i = maps::position(&p.maps, addr)?;
                Some((p.modules[i], p.maps[i].file_offset(addr)))
            });
            match hit {
                Some(key) => {
                    if !self.cache.contains_key(&key) {
                        let frames = self.symbolize(key.0, key.1, addr);
                        self.cache.insert(key, frames);
                    }
                    // The same file offset appears at other addresses in
                    // other processes: report this process's address.
                    out.extend(self.cache[&key].iter().map(|f| Frame {
                        address: addr,
                        ..f.clone()
                    }));
                }
                None => out.push(Frame {
                    address: addr,
                    ..Frame::default()
                }),
            }
        }
        out
    }

    fn comm(&self, pid: u32) -> Option<String> {
        self.procs.get(&pid).and_then(|p| p.comm.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address of kernel function `name` in `/proc/kallsyms`: `None`
    /// when absent, `Some(0)` when hidden.
    fn kallsyms_address(name: &str) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
        text.lines().find_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (addr, kind, sym) = (f.next()?, f.next()?, f.next()?);
            let in_image = f.next().is_none();
            (sym == name && in_image && kind.eq_ignore_ascii_case("t"))
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
    }

    #[test]
    fn kernel_addresses_get_kernel_function_names() {
        let Some(kfree) = kallsyms_address("kfree") else {
            eprintln!("skipping: kfree not found in /proc/kallsyms");
            return;
        };
        if kfree == 0 {
            eprintln!(
                "skipping: /proc/kallsyms shows zero addresses (kptr_restrict; \
                 needs root or CAP_SYSLOG)"
            );
            return;
        }
        let mut sym = Symbols::new();
        // A return address just inside kfree: its call is kfree's first
        // byte. (kfree's own start, as a return address, would be a call
        // at the end of the function before it.)
        let ret = kfree + 1;
        let user = 0x1234; // mapped by no process
        let frames = sym.frames(1, &[ret, user]);
        let last = frames.iter().rposition(|f| f.address == ret).unwrap();
        let f = &frames[last];
        assert_eq!(f.function.as_deref(), Some("kfree"), "{frames:?}");
        assert_eq!(f.module.as_deref(), Some(KERNEL_MODULE));
        assert_eq!(f.label(), "kfree");
        assert_eq!(frames.last().unwrap().address, user);
        assert_eq!(frames.last().unwrap().function, None);
        // Cached per address, the same for every process.
        assert_eq!(sym.kernel_cache.len(), 1);
        let again = sym.frames(4242, &[ret]);
        assert_eq!(again, frames[..=last]);
        assert_eq!(sym.kernel_cache.len(), 1);
        // `observe` does not read maps again for kernel addresses.
        sym.observe(std::process::id(), &[ret]);
        assert!(!sym.procs[&std::process::id()].gone);
    }

    #[test]
    fn modules_are_parsed_and_found() {
        let text = "\
nf_tables 376832 0 - Live 0xffffffffc0a00000
xfs 2355200 1 - Live 0xffffffffc0200000 (E)
hidden 4096 0 - Live 0x0000000000000000
broken line
";
        let mods = parse_modules(text);
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].name, "xfs");
        let find = |a| kernel_module(&mods, a).map(|m| m.name.as_str());
        assert_eq!(find(0xffff_ffff_c0a0_0010), Some("nf_tables"));
        assert_eq!(find(0xffff_ffff_c020_0000), Some("xfs"));
        assert_eq!(find(0xffff_ffff_c0a0_0000 + 376_832), None);
        assert_eq!(find(0xffff_ffff_8100_0000), None);
    }

    #[test]
    fn garbage_addresses_do_not_reread_maps_until_code_is_mapped() {
        let pid = std::process::id();
        let mut sym = Symbols::new();
        sym.observe(pid, &[]);
        let read_at = |s: &Symbols| s.procs[&pid].read_at;
        let first = read_at(&sym);
        // An address in no mapping, as a walk through code without frame
        // pointers finds: the snapshot stands.
        std::thread::sleep(Duration::from_millis(2));
        sym.observe(pid, &[0x10]);
        assert_eq!(read_at(&sym), first);
        // Code mapped since: read again.
        sym.maps_changed(pid);
        sym.observe(pid, &[0x10]);
        assert!(read_at(&sym) > first);
        assert!(!sym.procs[&pid].stale);
    }

    #[test]
    fn unknown_kernel_frames_keep_their_address() {
        let f = Frame {
            module: Some(KERNEL_MODULE.into()),
            address: 0xffff_ffff_8100_0010,
            module_offset: Some(0xffff_ffff_8100_0010),
            ..Frame::default()
        };
        assert_eq!(f.label(), "[kernel.kallsyms]+0xffffffff81000010");
        assert!(is_kernel(f.address));
        assert!(!is_kernel(0x7fff_ffff_f000));
    }
}
