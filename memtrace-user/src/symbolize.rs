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
//! An address that cannot be resolved is still reported, as a bare address or
//! as module + offset: never dropped, never an error.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::os::fd::AsRawFd;

use blazesym::symbolize::{self, source::Source};

use crate::maps::{self, Mapping};

/// One reported stack frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Function name, demangled; `None` when no symbol covers the address.
    pub function: Option<String>,
    /// Source file, when debug info has it.
    pub file: Option<String>,
    /// Source line, when debug info has it.
    pub line: Option<u32>,
    /// Path of the mapped file, as the process saw it.
    pub module: Option<String>,
    /// The return address, as in the process.
    #[serde(serialize_with = "hex")]
    pub address: u64,
    /// Offset of the address in `module`.
    #[serde(skip)]
    pub module_offset: Option<u64>,
    /// GNU build-id of `module`, hex, when it has one.
    #[serde(skip)]
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

/// What reports need from symbolization. Production uses [`Symbols`]; tests
/// pass a table.
pub trait Symbolize {
    /// Frames for a stack of process `pid`, innermost first. May return more
    /// frames than addresses (inlined functions get frames of their own).
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

struct Proc {
    comm: Option<String>,
    /// Executable mappings, by address.
    maps: Vec<Mapping>,
    /// Index into `Symbols::modules` of each mapping's file.
    modules: Vec<usize>,
    /// `/proc/PID` could not be read any more.
    gone: bool,
}

/// Symbolization with blazesym over snapshots taken while processes live.
pub struct Symbols {
    blaze: symbolize::Symbolizer,
    procs: HashMap<u32, Proc>,
    modules: Vec<Module>,
    module_ids: HashMap<(String, u64, String), usize>,
    cache: HashMap<(usize, u64), Vec<Frame>>,
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
        }
    }

    /// Remembers the process's name and mappings the first time it is seen,
    /// and opens the files holding `stack`'s addresses. Mappings are read
    /// again when an address is outside the snapshot (a library loaded
    /// later), as long as the process lives.
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
            });
            self.refresh(pid);
        }
        let covered = |p: &Proc| stack.iter().all(|a| maps::position(&p.maps, *a).is_some());
        if !covered(&self.procs[&pid]) && !self.procs[&pid].gone {
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

    fn refresh(&mut self, pid: u32) {
        let Ok(mut maps) = maps::read(pid) else {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.gone = true;
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
        let code = |ci: Option<&symbolize::CodeInfo<'_>>| {
            ci.map(|ci| (Some(ci.to_path().display().to_string()), ci.line))
                .unwrap_or((None, None))
        };
        // blazesym lists inlined calls outermost first, each with the
        // location inside it; the symbol's own location is the call site in
        // the outer function. Frames go innermost first.
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
/// Opens the file behind a mapping: through `map_files` (works across mount
/// namespaces and for deleted files), else through the process's root, else
/// by its path.
fn open_mapped(pid: u32, m: &Mapping) -> Option<File> {
    File::open(format!("/proc/{pid}/map_files/{}", m.map_files_name()))
        .or_else(|_| File::open(format!("/proc/{pid}/root{}", m.path)))
        .or_else(|_| File::open(&m.path))
        .ok()
}

impl Symbolize for Symbols {
    fn frames(&mut self, pid: u32, stack: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(stack.len());
        for &addr in stack {
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
