//! Python frames in allocation stacks, read from outside the interpreter.
//!
//! For each CPython process traced ([`find`] finds its interpreter and
//! [`layout`] how its version lays out thread states, frames and code
//! objects), the kernel side sends the Python frames of the allocating
//! thread just before the allocation's record (`PyStackRecord`: code object
//! addresses, instruction indexes, which frames C entered). Here they are
//! paired with their allocation, resolved ([`code`]: name, file and line,
//! once per code object, from the copy the kernel side sent the first time
//! it met it (`PyCodeRecord`) or else from the process's memory) and merged
//! into the native stack: each native frame of the evaluation loop
//! (`_PyEval_EvalFrameDefault`) is replaced by the Python frames it ran, so
//! a stack reads `load_table (job.py:42) → PyArray_NewFromDescr → malloc`.
//!
//! Python frames travel through the aggregator, recordings and reports as
//! stand-in addresses ([`TAG`] in the top 16 bits, which no user or kernel
//! address has) that [`Codes::frame`] turns into frames: a code id and a
//! line. So every report and format shows them as it shows native frames.
//!
//! Not here: the kernel side's walk (`memtrace-ebpf/src/python.rs`) and
//! which functions of the interpreter are probed (`allocators`).

pub mod code;
pub mod find;
pub mod layout;

use std::collections::HashMap;

use memtrace_common::{
    AllocFn, MAX_PY_FRAMES, PY_FRAME_ENTRY, PY_STAMP_MASK, PyFrame, PyStackRecord,
};

use crate::symbolize::Frame;
use code::{CodeInfo, Copied, Memory};
pub use find::Interpreter;

/// Top 16 bits of a Python frame's stand-in address ("PY"): not canonical
/// on x86-64 or arm64, so never a real address.
pub const TAG: u64 = 0x5059 << 48;
const TAG_MASK: u64 = 0xffff << 48;
/// Bits of the line number; the code id sits above them.
const LINE_BITS: u32 = 24;
const LINE_MASK: u64 = (1 << LINE_BITS) - 1;
/// Code ids reach below this; the last one marks the frame that names
/// CPython's allocator ([`allocator_frame`]).
const CODE_IDS: u64 = (1 << (48 - LINE_BITS)) - 1;

/// The module reports give Python frames.
pub const PYTHON_MODULE: &str = "[python]";
/// The module of the frame that marks an allocation made through CPython's
/// own allocator.
pub const ALLOCATOR_MODULE: &str = "[python allocator]";

/// Whether `addr` stands for a Python frame (or the allocator's mark).
pub fn is_python(addr: u64) -> bool {
    addr & TAG_MASK == TAG
}

fn encode(code_id: u64, line: u32) -> u64 {
    TAG | (code_id << LINE_BITS) | (u64::from(line) & LINE_MASK)
}

/// Whether `addr` is the mark of CPython's allocator ([`allocator_frame`]).
pub fn is_allocator_frame(addr: u64) -> bool {
    is_python(addr) && (addr & !TAG_MASK) >> LINE_BITS == CODE_IDS
}

/// The innermost frame of an allocation made through `PyObject_*` or
/// `PyMem_*`: allocations of CPython's own allocator are a category of
/// their own, in every stack-shaped report.
pub fn allocator_frame(func: AllocFn) -> u64 {
    encode(CODE_IDS, u32::from(func as u16))
}

enum Code {
    Known(CodeInfo),
    /// Could not be read (the process was gone, or the object was freed).
    Unknown(u64),
}

/// The code objects of every process, by id: what the stand-in addresses
/// refer to. Ids are never reused, so a stack interned once keeps its
/// meaning.
#[derive(Default)]
pub struct Codes {
    codes: Vec<Code>,
}

impl Codes {
    fn add(&mut self, code: Code) -> Option<u64> {
        let id = self.codes.len() as u64;
        if id >= CODE_IDS {
            return None;
        }
        self.codes.push(code);
        Some(id)
    }

    /// The frame for a stand-in address ([`is_python`]).
    pub fn frame(&self, addr: u64) -> Frame {
        let id = (addr & !TAG_MASK) >> LINE_BITS;
        let line = (addr & LINE_MASK) as u32;
        let base = Frame {
            address: addr,
            module: Some(PYTHON_MODULE.to_string()),
            ..Frame::default()
        };
        if id == CODE_IDS {
            let name = match AllocFn::from_u16(line as u16) {
                Some(AllocFn::PyCalloc) => "PyObject_Calloc",
                Some(AllocFn::PyRealloc) => "PyObject_Realloc",
                _ => "PyObject_Malloc",
            };
            return Frame {
                function: Some(name.to_string()),
                module: Some(ALLOCATOR_MODULE.to_string()),
                ..base
            };
        }
        match self.codes.get(id as usize) {
            Some(Code::Known(c)) => Frame {
                function: Some(c.name.clone()),
                file: Some(c.file.clone()),
                line: (line != 0).then_some(line),
                ..base
            },
            Some(Code::Unknown(code)) => Frame {
                function: Some(format!("<Python code at {code:#x}>")),
                ..base
            },
            None => base,
        }
    }
}

/// How the Python stacks of one process went, for its report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PythonStacks {
    /// "CPython 3.11.7".
    pub interpreter: String,
    /// The object holding it.
    pub module: String,
    /// Whether memtrace has its version's layout (without one, stacks are
    /// native only).
    pub supported: bool,
    /// Allocations whose stacks got Python frames.
    pub stacks: u64,
    /// Of which cut at the deepest Python stack sent
    /// ([`MAX_PY_FRAMES`] frames).
    pub truncated: u64,
    /// Allocations whose Python frames could not be read (interpreter
    /// memory not where its layout says).
    pub unreadable: u64,
    /// Code objects whose names could not be read (freed, or the process
    /// gone before memtrace read them): their frames show an address.
    pub unknown_code: u64,
    /// Whether CPython's own allocator was traced (`--python-allocators`):
    /// without it, objects it serves from its arenas are not seen.
    pub allocator_traced: bool,
}

struct Proc {
    interp: Interpreter,
    mem: Option<Memory>,
    /// Code ids by (code object address, stamp).
    ids: HashMap<(u64, u32), u64>,
    /// Copies of code objects the kernel side sent, by (address, stamp),
    /// until a stack names them.
    copies: HashMap<(u64, u32), Copied>,
    /// Lines by (code id, instruction index).
    lines: HashMap<(u64, u32), u32>,
    stats: PythonStacks,
}

/// Python frames sent for one allocation, waiting for its record.
struct Pending {
    pid: u32,
    addr: u64,
    frames: Vec<PyFrame>,
    truncated: bool,
    err: bool,
}

/// The session's Python state: interpreters by process, Python stacks
/// waiting for their allocation.
#[derive(Default)]
pub struct Python {
    procs: HashMap<u32, Proc>,
    pending: HashMap<u32, Pending>,
}

impl Python {
    /// Process `pid` runs `interp`; its frames are resolved from now on.
    pub fn add(&mut self, pid: u32, interp: Interpreter) {
        let stats = PythonStacks {
            interpreter: interp.name(),
            module: interp.module.clone(),
            supported: interp.layout.is_some(),
            allocator_traced: crate::allocators::python_allocators(),
            ..PythonStacks::default()
        };
        self.procs.insert(
            pid,
            Proc {
                mem: Memory::open(pid).ok(),
                interp,
                ids: HashMap::new(),
                copies: HashMap::new(),
                lines: HashMap::new(),
                stats,
            },
        );
    }

    /// Process `pid` exec'd or exited: its code objects are gone. What its
    /// report says of it stays.
    pub fn forget(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.mem = None;
            p.ids.clear();
            p.copies.clear();
        }
    }

    /// A followed `child` forked from `parent`: the same interpreter at
    /// the same addresses.
    pub fn fork(&mut self, parent: u32, child: u32) -> Option<Interpreter> {
        let interp = self.procs.get(&parent)?.interp.clone();
        self.add(child, interp.clone());
        Some(interp)
    }

    /// Whether process `pid` runs a Python interpreter memtrace found.
    pub fn knows(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.mem.is_some())
    }

    /// How each Python process's stacks went.
    pub fn stats(&self) -> impl Iterator<Item = (u32, &PythonStacks)> {
        self.procs.iter().map(|(&pid, p)| (pid, &p.stats))
    }

    /// A `PyStackRecord` (checked by the caller to be one): kept until the
    /// allocation of the same thread and address comes.
    pub fn record(&mut self, bytes: &[u8]) {
        let Some(rec) = decode(bytes) else {
            return;
        };
        self.pending.insert(rec.0, rec.1);
    }

    /// A `PyCodeRecord` (checked by the caller to be one): kept until a
    /// stack names its code object.
    pub fn code_record(&mut self, bytes: &[u8]) {
        let Some(header) = crate::event::header(bytes) else {
            return;
        };
        let Some(p) = self.procs.get_mut(&header.tgid) else {
            return;
        };
        let Some(layout) = p.interp.layout else {
            return;
        };
        if let Some(c) = Copied::parse(layout, bytes) {
            p.copies.insert((c.code, c.info.stamp), c);
        }
    }

    /// Adds the Python frames sent for allocation `a` (of thread `tid`) to
    /// its stack, and the allocator's mark for CPython's own allocator.
    /// `codes` gets the code objects seen for the first time.
    pub fn complete(&mut self, codes: &mut Codes, tid: u32, a: &mut crate::event::Alloc) {
        let pending = self
            .pending
            .remove(&tid)
            .filter(|p| p.pid == a.pid && p.addr == a.addr);
        if let (Some(p), Some(proc_)) = (pending, self.procs.get_mut(&a.pid)) {
            if p.err {
                proc_.stats.unreadable += 1;
            } else if !p.frames.is_empty() {
                proc_.stats.stacks += 1;
                proc_.stats.truncated += u64::from(p.truncated);
                let py: Vec<(u64, bool)> = p
                    .frames
                    .iter()
                    .map(|f| (proc_.resolve(codes, f), f.info & PY_FRAME_ENTRY != 0))
                    .collect();
                let eval = &proc_.interp.eval;
                a.stack = merge(&a.stack, &py, |addr| {
                    let call = addr.wrapping_sub(1);
                    eval.iter().any(|r| r.contains(&call))
                });
            }
        }
        if a.func.is_python() {
            a.stack.insert(0, allocator_frame(a.func));
        }
    }
}

impl Proc {
    /// What a code object of this stamp at `code` holds: the kernel side's
    /// copy, with the line table from the process if the copy cut it; else
    /// the process's memory, if the code object there is still the same.
    fn read(&mut self, code: u64, stamp: u32) -> Option<CodeInfo> {
        let live = || {
            let c = self.mem.as_ref()?.code(self.interp.layout?, code)?;
            (c.stamp == stamp).then_some(c)
        };
        match self.copies.remove(&(code, stamp)) {
            Some(copy) if copy.whole_table => Some(copy.info),
            Some(copy) => Some(live().unwrap_or(copy.info)),
            None => live(),
        }
    }

    /// The stand-in address of a frame: its code object (read now, the
    /// first time) and line.
    fn resolve(&mut self, codes: &mut Codes, f: &PyFrame) -> u64 {
        let stamp = f.info & PY_STAMP_MASK;
        let key = (f.code, stamp);
        let id = match self.ids.get(&key) {
            Some(&id) => id,
            None => {
                let code = match self.read(f.code, stamp) {
                    Some(c) => Code::Known(c),
                    None => {
                        self.stats.unknown_code += 1;
                        Code::Unknown(f.code)
                    }
                };
                let Some(id) = codes.add(code) else {
                    return encode(0, 0);
                };
                self.ids.insert(key, id);
                id
            }
        };
        let line = *self.lines.entry((id, f.lasti)).or_insert_with(|| {
            match codes.codes.get(id as usize) {
                Some(Code::Known(c)) => code::line_of(&c.linetable, c.first_line, f.lasti),
                _ => None,
            }
            .unwrap_or(0)
        });
        encode(id, line)
    }
}

/// Decodes a `PyStackRecord`: its thread and frames.
fn decode(bytes: &[u8]) -> Option<(u32, Pending)> {
    const FIXED: usize = PyStackRecord::FIXED_LEN;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let pid = u32_at(std::mem::offset_of!(memtrace_common::Header, tgid))?;
    let tid = u32_at(std::mem::offset_of!(memtrace_common::Header, tid))?;
    let addr = u64_at(std::mem::offset_of!(PyStackRecord, addr))?;
    let counts = u32_at(std::mem::offset_of!(PyStackRecord, nframes))?;
    let (n, truncated) = ((counts & 0xffff) as usize, counts >> 16 != 0);
    let err = u32_at(std::mem::offset_of!(PyStackRecord, err))?;
    if n > MAX_PY_FRAMES || bytes.len() < FIXED + 16 * n {
        return None;
    }
    let frames = (0..n)
        .map(|i| {
            let at = FIXED + 16 * i;
            Some(PyFrame {
                code: u64_at(at)?,
                lasti: u32_at(at + 8)?,
                info: u32_at(at + 12)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((
        tid,
        Pending {
            pid,
            addr,
            frames,
            truncated,
            err: err != 0,
        },
    ))
}

/// The native stack `native` (innermost first) with Python frames in
/// place of the evaluation loop's: `py` (innermost first, each with whether
/// C entered the interpreter there) falls into runs that each end at an
/// entry frame, and each native frame for which `in_eval` holds takes the
/// next run. Runs left over (the native walk stopped short) go at the end;
/// evaluation frames left over stay as they are.
pub fn merge(native: &[u64], py: &[(u64, bool)], in_eval: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut runs = py.split_inclusive(|&(_, entry)| entry).peekable();
    let mut out = Vec::with_capacity(native.len() + py.len());
    for &addr in native {
        match runs.peek() {
            Some(_) if in_eval(addr) => out.extend(runs.next().into_iter().flatten().map(|f| f.0)),
            _ => out.push(addr),
        }
    }
    out.extend(runs.flatten().map(|f| f.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVAL: u64 = 0x1000;

    fn in_eval(a: u64) -> bool {
        (EVAL..EVAL + 0x100).contains(&a)
    }

    #[test]
    fn each_evaluation_frame_takes_its_run_of_python_frames() {
        // malloc ← PyList_Append ← eval(g, f) ← builtin_sorted ← eval(key, entry)
        // ← eval(<module>, entry) ← main
        let native = [0x10, EVAL + 1, 0x20, EVAL + 2, EVAL + 3, 0x30];
        let py = [(0xa1, false), (0xa2, true), (0xb1, true), (0xc1, true)];
        assert_eq!(
            merge(&native, &py, in_eval),
            [0x10, 0xa1, 0xa2, 0x20, 0xb1, 0xc1, 0x30]
        );
    }

    #[test]
    fn a_short_native_stack_keeps_every_python_frame() {
        let py = [(0xa1, false), (0xa2, true), (0xb1, true)];
        assert_eq!(merge(&[0x10], &py, in_eval), [0x10, 0xa1, 0xa2, 0xb1]);
        assert_eq!(merge(&[], &py, in_eval), [0xa1, 0xa2, 0xb1]);
    }

    #[test]
    fn evaluation_frames_without_python_frames_stay() {
        let native = [0x10, EVAL + 1, EVAL + 2];
        assert_eq!(
            merge(&native, &[(0xa1, true)], in_eval),
            [0x10, 0xa1, EVAL + 2]
        );
        assert_eq!(merge(&native, &[], in_eval), native);
    }

    #[test]
    fn stand_in_addresses_are_no_real_addresses() {
        let a = encode(7, 42);
        assert!(is_python(a));
        assert!(!crate::symbolize::is_kernel(a));
        assert!(!is_python(0x7fff_ffff_f000));
        assert!(!is_python(0xffff_ffff_8100_0000));
        assert!(is_python(allocator_frame(AllocFn::PyMalloc)));
        assert!(is_allocator_frame(allocator_frame(AllocFn::PyMalloc)));
        assert!(!is_allocator_frame(a));
    }

    #[test]
    fn frames_of_known_unknown_and_allocator_codes() {
        let mut codes = Codes::default();
        let id = codes
            .add(Code::Known(CodeInfo {
                name: "Loader.load".into(),
                file: "/srv/job.py".into(),
                first_line: 10,
                stamp: 10,
                linetable: Vec::new(),
            }))
            .unwrap();
        let f = codes.frame(encode(id, 42));
        assert_eq!(f.function.as_deref(), Some("Loader.load"));
        assert_eq!(f.file.as_deref(), Some("/srv/job.py"));
        assert_eq!(f.line, Some(42));
        assert_eq!(f.module.as_deref(), Some(PYTHON_MODULE));
        let unknown = codes.add(Code::Unknown(0xdead0)).unwrap();
        let f = codes.frame(encode(unknown, 0));
        assert_eq!(f.function.as_deref(), Some("<Python code at 0xdead0>"));
        assert_eq!(f.line, None);
        let f = codes.frame(allocator_frame(AllocFn::PyCalloc));
        assert_eq!(f.function.as_deref(), Some("PyObject_Calloc"));
        assert_eq!(f.module.as_deref(), Some(ALLOCATOR_MODULE));
    }

    #[test]
    fn records_decode_and_pair_with_their_allocation() {
        let mut rec = vec![0u8; PyStackRecord::FIXED_LEN + 32];
        rec[4..8].copy_from_slice(&7u32.to_le_bytes()); // tgid
        rec[8..12].copy_from_slice(&9u32.to_le_bytes()); // tid
        rec[24..32].copy_from_slice(&0x5000u64.to_le_bytes()); // addr
        rec[32..34].copy_from_slice(&2u16.to_le_bytes()); // nframes
        for (i, code) in [0xc0de0u64, 0xc0de8].iter().enumerate() {
            let at = PyStackRecord::FIXED_LEN + 16 * i;
            rec[at..at + 8].copy_from_slice(&code.to_le_bytes());
            rec[at + 8..at + 12].copy_from_slice(&3u32.to_le_bytes());
            let info = 5 | if i == 1 { PY_FRAME_ENTRY } else { 0 };
            rec[at + 12..at + 16].copy_from_slice(&info.to_le_bytes());
        }
        let (tid, p) = decode(&rec).unwrap();
        assert_eq!((tid, p.pid, p.addr, p.frames.len()), (9, 7, 0x5000, 2));
        assert_eq!(p.frames[1].info & PY_FRAME_ENTRY, PY_FRAME_ENTRY);
        assert!(decode(&rec[..PyStackRecord::FIXED_LEN + 20]).is_none());
    }
}
