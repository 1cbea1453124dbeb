//! DWARF unwinding of the user stacks the kernel side copies (`--unwind
//! dwarf`, or `auto` for a program built without frame pointers).
//!
//! At an allocator's return the kernel side sends the caller's `rip`, `rsp`
//! and `rbp` and up to 16 KiB of its stack ([`RawStack`]). This module walks
//! that copy with the call frame information (`.eh_frame`, else
//! `.debug_frame`) of every file the process maps, through framehop: the
//! return addresses, innermost first, as a frame-pointer walk would give them
//! where frame pointers exist. Code without CFI falls back to its frame
//! pointer, framehop's own rule.
//!
//! Per process, one framehop unwinder built from `/proc/PID/maps`; per file
//! (device and inode), the CFI sections, read once and shared by every
//! process that maps the file. Modules are rebuilt when the process's code
//! mappings change or a return address falls outside them.
//!
//! Not here: which processes are unwound this way ([`frame_pointers`] is the
//! `auto` test; the choice is the session's), symbolization.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _};
use memtrace_common::MAX_FRAMES;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::event::RawStack;
use crate::maps::{self, Mapping};

/// Section bytes a module keeps (framehop wants `Deref<Target = [u8]>`).
type Bytes = Arc<[u8]>;

/// The maps of a process are read again for an address outside its modules
/// at most this often (as in `symbolize`).
const MAPS_FRESH: Duration = Duration::from_secs(1);

/// What one file contributes to every process mapping it.
#[derive(Clone)]
struct FileCfi {
    sections: ExplicitModuleSectionInfo<Bytes>,
    /// `PT_LOAD` segments: file offset, file size, virtual address; to find
    /// a mapping's load bias.
    segments: Vec<(u64, u64, u64)>,
}

struct Proc {
    unwinder: UnwinderX86_64<Bytes>,
    /// The mappings the modules were built from: a child's until it has
    /// its own.
    maps: Vec<Mapping>,
    /// Address ranges of the modules.
    code: Vec<Range<u64>>,
    read_at: Instant,
    /// The code mappings changed since they were read.
    stale: bool,
}

/// The name of [`UnwindStats::cut`] among a report's losses.
pub const STACKS_CUT: &str = "stacks_cut";

/// How the walks went, for the report's account of what was not seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Stacks walked.
    pub stacks: u64,
    /// Walks that stopped before the outermost frame: the copy ended first
    /// (a stack deeper than 16 KiB), or neither CFI nor a frame pointer
    /// said where the caller was.
    pub cut: u64,
}

/// The DWARF unwinder of every process that sends copied stacks.
pub struct StackUnwinder {
    procs: HashMap<u32, Proc>,
    files: HashMap<(String, u64), Option<FileCfi>>,
    cache: CacheX86_64,
    stats: UnwindStats,
    /// The walks of each process.
    by_pid: BTreeMap<u32, UnwindStats>,
}

impl Default for StackUnwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackUnwinder {
    /// An unwinder that knows no process yet.
    pub fn new() -> Self {
        Self {
            procs: HashMap::new(),
            files: HashMap::new(),
            cache: CacheX86_64::new(),
            stats: UnwindStats::default(),
            by_pid: BTreeMap::new(),
        }
    }

    /// The walks so far.
    pub fn stats(&self) -> UnwindStats {
        self.stats
    }

    /// The walks so far, by process.
    pub fn stats_by_pid(&self) -> &BTreeMap<u32, UnwindStats> {
        &self.by_pid
    }

    /// The return addresses of `stack`, innermost (the allocator's caller)
    /// first, at most [`MAX_FRAMES`].
    pub fn unwind(&mut self, pid: u32, stack: &RawStack<'_>) -> Vec<u64> {
        let (frames, complete) = self.unwind_once(pid, stack);
        for s in [&mut self.stats, self.by_pid.entry(pid).or_default()] {
            s.stacks += 1;
            s.cut += u64::from(!complete);
        }
        frames
    }

    /// [`Self::unwind`], and whether the walk reached the outermost frame.
    fn unwind_once(&mut self, pid: u32, stack: &RawStack<'_>) -> (Vec<u64>, bool) {
        if self.procs.get(&pid).is_none_or(|p| p.stale) {
            self.load(pid);
        }
        let (frames, complete) = self.walk(pid, stack);
        // A return address outside every module: code mapped since the maps
        // were read (a dlopen, a JIT). Once per MAPS_FRESH.
        let unknown = self.procs.get(&pid).is_some_and(|p| {
            frames
                .iter()
                .any(|&a| !p.code.iter().any(|r| r.contains(&a)))
        });
        if unknown && self.procs[&pid].read_at.elapsed() >= MAPS_FRESH {
            self.load(pid);
            return self.walk(pid, stack);
        }
        (frames, complete)
    }

    /// Reads the process's mappings now, while it lives (at the loader's
    /// stop, after an exec): a process that exits before its records are
    /// read has no mappings left to read.
    pub fn refresh(&mut self, pid: u32) {
        self.load(pid);
    }

    /// A child process: its own mappings if it still runs, else its
    /// parent's, which it was born with.
    pub fn fork(&mut self, parent: u32, child: u32) {
        self.load(child);
        if self.procs.contains_key(&child) {
            return;
        }
        if let Some(maps) = self.procs.get(&parent).map(|p| p.maps.clone()) {
            self.build(child, maps);
        }
    }

    /// The process's code mappings changed (an exec, a library mapped).
    pub fn maps_changed(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.stale = true;
        }
    }

    /// The process exited.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    fn walk(&mut self, pid: u32, stack: &RawStack<'_>) -> (Vec<u64>, bool) {
        let mut frames = vec![stack.rip];
        let Some(p) = self.procs.get(&pid) else {
            return (frames, false);
        };
        let base = stack.rsp;
        let bytes = stack.bytes;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = addr.checked_sub(base).ok_or(())? as usize;
            let word = bytes.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut regs = UnwindRegsX86_64::new(stack.rip, stack.rsp, stack.rbp);
        // At the return probe `rip` is a return address: CFI is looked up
        // at `rip - 1`, inside the call.
        let Some(mut addr) = FrameAddress::from_return_address(stack.rip) else {
            return (frames, false);
        };
        while frames.len() < MAX_FRAMES {
            match p
                .unwinder
                .unwind_frame(addr, &mut regs, &mut self.cache, &mut read_stack)
            {
                Ok(Some(ret)) => {
                    frames.push(ret);
                    match FrameAddress::from_return_address(ret) {
                        Some(a) => addr = a,
                        None => return (frames, true),
                    }
                }
                Ok(None) => return (frames, true),
                Err(_) => {
                    let at_entry = frames.last().is_some_and(|&a| in_loader(&p.maps, a));
                    return (frames, at_entry);
                }
            }
        }
        (frames, true)
    }

    /// (Re)builds the modules of `pid` from its maps.
    fn load(&mut self, pid: u32) {
        match maps::read(pid) {
            Ok(maps) => self.build(pid, maps),
            // Gone: keep what there is (its last records are in flight).
            Err(_) => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.stale = false;
                    p.read_at = Instant::now();
                }
            }
        }
    }

    /// Builds the modules of `pid` from `maps`. A file seen before costs no
    /// read: its call frame information is kept.
    fn build(&mut self, pid: u32, maps: Vec<Mapping>) {
        let mut unwinder = UnwinderX86_64::new();
        let mut code = Vec::new();
        for (range, m) in code_files(&maps) {
            let key = (m.dev.clone(), m.inode);
            let cfi = self
                .files
                .entry(key)
                .or_insert_with(|| file_cfi(pid, m))
                .clone();
            let Some(cfi) = cfi else {
                continue;
            };
            let Some(bias) = load_bias(&cfi.segments, m.start, m.offset) else {
                continue;
            };
            unwinder.add_module(Module::new(
                m.path.clone(),
                range.clone(),
                bias,
                cfi.sections,
            ));
            code.push(range);
        }
        self.procs.insert(
            pid,
            Proc {
                unwinder,
                maps,
                code,
                read_at: Instant::now(),
                stale: false,
            },
        );
    }
}

/// Whether `addr` is in the dynamic loader. The outermost frame of code run
/// before `main` (static constructors, from `_dl_init`) is the loader's
/// entry point, `_dl_start_user`, which has no call frame information and
/// no caller: a walk that stops there is complete.
fn in_loader(maps: &[Mapping], addr: u64) -> bool {
    maps::find(maps, addr).is_some_and(|m| {
        let name = m.path.rsplit('/').next().unwrap_or(&m.path);
        crate::attach::LibKind::of_file_name(name) == Some(crate::attach::LibKind::Loader)
    })
}

/// One entry per mapped file with code: the span of its executable
/// mappings and the first of them.
fn code_files(maps: &[Mapping]) -> Vec<(Range<u64>, &Mapping)> {
    let mut out: Vec<(Range<u64>, &Mapping)> = Vec::new();
    for m in maps {
        // Anonymous code (a JIT), [vdso], [uprobes]: no file to read.
        if !m.exec || m.inode == 0 || !m.path.starts_with('/') {
            continue;
        }
        match out
            .iter_mut()
            .find(|(_, f)| f.inode == m.inode && f.dev == m.dev)
        {
            Some((range, _)) => {
                range.start = range.start.min(m.start);
                range.end = range.end.max(m.end);
            }
            None => out.push((m.start..m.end, m)),
        }
    }
    out
}

/// The address that the file's virtual address 0 is mapped at, given one
/// mapping of it (framehop's `base_avma`): 0 for a non-PIE executable.
pub(crate) fn load_bias(segments: &[(u64, u64, u64)], start: u64, offset: u64) -> Option<u64> {
    // Two segments may share a file page (one ends where the next begins,
    // as with lld's layout): a mapping that starts at that page is the later
    // segment's start, so the last segment holding the offset is the one.
    segments
        .iter()
        .filter(|&&(p_offset, p_filesz, _)| {
            offset >= p_offset & !0xfff && offset < p_offset + p_filesz.max(1)
        })
        .max_by_key(|&&(p_offset, _, _)| p_offset)
        .map(|&(p_offset, _, p_vaddr)| {
            start
                .wrapping_add(p_offset)
                .wrapping_sub(p_vaddr)
                .wrapping_sub(offset)
        })
}

/// The call frame information of the file mapped by `m`; `None` when it
/// cannot be read or has none.
fn file_cfi(pid: u32, m: &Mapping) -> Option<FileCfi> {
    let file = crate::mapped::open(pid, m).ok()?;
    // Reads the headers and the sections asked for, not the whole file.
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).ok()?;
    let range = |name: &str| {
        obj.section_by_name(name)
            .map(|s| s.address()..s.address() + s.size())
    };
    let bytes = |name: &str| -> Option<Bytes> {
        let s = obj.section_by_name(name)?;
        // No bytes in the file (a debug file's NOBITS copy).
        s.file_range()?;
        let data = s.uncompressed_data().ok()?;
        (!data.is_empty()).then(|| Arc::from(&*data))
    };
    // framehop reads `.debug_frame` only without `.eh_frame`: every
    // distribution binary has the latter.
    let eh_frame = bytes(".eh_frame");
    let debug_frame = match eh_frame {
        Some(_) => None,
        None => bytes(".debug_frame"),
    };
    if eh_frame.is_none() && debug_frame.is_none() {
        // Frame pointers only, which framehop follows without a module.
        return None;
    }
    let sections = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: range(".text"),
        got_svma: range(".got"),
        eh_frame_svma: range(".eh_frame"),
        eh_frame_hdr_svma: range(".eh_frame_hdr"),
        eh_frame_hdr: bytes(".eh_frame_hdr"),
        eh_frame,
        debug_frame,
        ..Default::default()
    };
    let segments = obj
        .segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (off, size, s.address())
        })
        .collect();
    Some(FileCfi { sections, segments })
}

/// The end of the main thread's stack of process `pid` (its `[stack]`
/// mapping), or 0.
pub fn main_stack_top(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return 0;
    };
    text.lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| l.split(' ').next()?.split_once('-'))
        .and_then(|(_, end)| u64::from_str_radix(end, 16).ok())
        .unwrap_or(0)
}

/// Whether the program at `path` keeps frame pointers, by the prologue of
/// its `main` (`push rbp; mov rbp, rsp` when built with them): main is the
/// program's own code, built with its flags, where a static binary's other
/// functions are mostly its C library's. Without a `main` symbol, by most of
/// up to 400 functions. A program without symbols (stripped) is taken to
/// lack them, as a distribution's optimized build does.
pub fn frame_pointers(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // Reads the headers, the symbol tables and the prologues looked at, not
    // the whole program (asked again at every exec).
    let cache = object::ReadCache::new(f);
    let Ok(file) = object::File::parse(&cache) else {
        return false;
    };
    let prologue = |sym: &object::Symbol<'_, '_, &object::ReadCache<std::fs::File>>| {
        let at = crate::attach::file_offset(&file, sym.address())?;
        let code = object::ReadRef::read_bytes_at(&cache, at, sym.size().min(48)).ok()?;
        Some(frame_prologue(code))
    };
    let functions = || {
        file.symbols()
            .chain(file.dynamic_symbols())
            .filter(|sym| sym.kind() == SymbolKind::Text && sym.is_definition() && sym.size() >= 16)
    };
    if let Some(main) = functions().find(|s| s.name() == Ok("main"))
        && let Some(fp) = prologue(&main)
    {
        return fp;
    }
    let mut with = 0usize;
    let mut seen = 0usize;
    for sym in functions()
        .filter(|s| !s.name().is_ok_and(|n| TOOLCHAIN.contains(&n)))
        .take(400)
    {
        if let Some(fp) = prologue(&sym) {
            seen += 1;
            with += usize::from(fp);
        }
    }
    seen > 0 && with * 4 >= seen * 3
}

/// Functions the toolchain's start-up files add to every program, built
/// without frame pointers whatever the program's flags: in a small program
/// they would outnumber its own.
const TOOLCHAIN: &[&str] = &[
    "_start",
    "_init",
    "_fini",
    "deregister_tm_clones",
    "register_tm_clones",
    "__do_global_dtors_aux",
    "frame_dummy",
    "__libc_csu_init",
    "__libc_csu_fini",
];

/// Whether `code` starts with a frame-pointer prologue: `push %rbp`, then
/// `mov %rsp,%rbp` within the next few instructions (the compiler schedules
/// others between them). Code without frame pointers may save `rbp` too,
/// as any callee-saved register, but never points it at the stack.
fn frame_prologue(code: &[u8]) -> bool {
    use iced_x86::{Code, Decoder, DecoderOptions, Register};
    let mut pushed = false;
    let mut decoder = Decoder::new(64, code, DecoderOptions::NONE);
    for insn in decoder.iter().take(8) {
        match insn.code() {
            Code::Push_r64 if insn.op0_register() == Register::RBP => pushed = true,
            Code::Mov_r64_rm64 | Code::Mov_rm64_r64
                if pushed
                    && insn.op0_register() == Register::RBP
                    && insn.op1_register() == Register::RSP =>
            {
                return true;
            }
            Code::INVALID => return false,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_bias_of_pie_and_fixed_executables() {
        // A PIE: text at file offset 0x1000, vaddr 0x1000, mapped at
        // 0x5555_5555_5000 from offset 0x1000.
        let pie = [(0, 0x800, 0), (0x1000, 0x2000, 0x1000)];
        assert_eq!(
            load_bias(&pie, 0x5555_5555_5000, 0x1000),
            Some(0x5555_5555_4000)
        );
        // Not PIE: vaddr 0x401000 mapped at 0x401000: no bias.
        let fixed = [(0, 0x800, 0x400000), (0x1000, 0x2000, 0x401000)];
        assert_eq!(load_bias(&fixed, 0x401000, 0x1000), Some(0));
        assert_eq!(load_bias(&fixed, 0x401000, 0x9000), None);
        // lld packs segments: the read-only one ends in the page where the
        // code begins (offset 0x1489c0, vaddr 0x1499c0). The code's mapping
        // starts at offset 0x148000, inside both: it is the code's.
        let packed = [(0, 0x1489bc, 0), (0x1489c0, 0x4241a0, 0x1499c0)];
        assert_eq!(
            load_bias(&packed, 0x5555_5569_e000, 0x148000),
            Some(0x5555_5555_5000)
        );
    }

    #[test]
    fn prologues_with_and_without_frame_pointers() {
        assert!(frame_prologue(&[0x55, 0x48, 0x89, 0xe5, 0x90]));
        // push %rbp; shr %rsi; mov %rsp,%rbp (scheduled apart)
        assert!(frame_prologue(&[0x55, 0x48, 0xd1, 0xee, 0x48, 0x89, 0xe5]));
        // push %rbp; push %rbx (rbp saved as a callee-saved register)
        assert!(!frame_prologue(&[
            0x55, 0x53, 0x48, 0x83, 0xec, 0x08, 0x90, 0x90
        ]));
        assert!(frame_prologue(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5
        ]));
        // sub $0x18,%rsp
        assert!(!frame_prologue(&[0x48, 0x83, 0xec, 0x18]));
        // push %rbx
        assert!(!frame_prologue(&[0x53, 0x48, 0x89, 0xfb]));
    }

    #[test]
    fn memtraces_own_binary_keeps_frame_pointers() {
        // .cargo/config.toml builds everything with them.
        assert!(frame_pointers(&std::env::current_exe().unwrap()));
    }

    /// This thread's `rip` (just past the asm), `rsp` and `rbp`, and a
    /// copy of its stack from `rsp` up, taken at once as the kernel side
    /// takes a caller's.
    #[inline(never)]
    fn snapshot() -> (u64, u64, u64, Vec<u8>) {
        let (rip, rsp, rbp): (u64, u64, u64);
        // SAFETY: reads this thread's registers into locals.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) rip,
                sp = out(reg) rsp,
                bp = out(reg) rbp,
            );
        }
        // The stack's end: the top of its mapping (anonymous, which
        // `maps::read` leaves out). Nothing below allocates on the stack
        // past what the copy reads.
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let top = text
            .lines()
            .filter_map(|l| {
                let (start, end) = l.split(' ').next()?.split_once('-')?;
                let start = u64::from_str_radix(start, 16).ok()?;
                let end = u64::from_str_radix(end, 16).ok()?;
                (start <= rsp && rsp < end).then_some(end)
            })
            .next()
            .unwrap();
        let len = (top - rsp).min(16384) as usize;
        // SAFETY: [rsp, rsp + len) is inside the stack's mapping.
        let copy = unsafe { std::slice::from_raw_parts(rsp as *const u8, len) }.to_vec();
        (rip, rsp, rbp, copy)
    }

    /// Walks this test's own stack: through this crate's frames (which
    /// have frame pointers, but the walk uses CFI) and libc's thread
    /// start-up code (which has none).
    #[test]
    fn unwinds_its_own_stack_to_the_thread_start() {
        let (rip, rsp, rbp, copy) = snapshot();
        let pid = std::process::id();
        let maps = maps::read(pid).unwrap();
        let mut u = StackUnwinder::new();
        // `rip` is an instruction here, not a return address: +1 makes the
        // lookup at rip - 1 land on it.
        let frames = u.unwind(
            pid,
            &RawStack {
                rip: rip + 1,
                rsp,
                rbp,
                bytes: &copy,
            },
        );
        assert!(frames.len() >= 3, "{frames:x?}");
        // Every return address lies in code.
        for &a in &frames[1..] {
            assert!(
                maps.iter().any(|m| m.exec && m.start <= a && a < m.end),
                "{a:#x} is not in code: {frames:x?}"
            );
        }
        assert_eq!(u.stats().stacks, 1);
    }
}
