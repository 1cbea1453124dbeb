//! Python stacks: the frames of the CPython interpreter running on the
//! allocating thread, read from the interpreter's own data structures.
//!
//! For a process in [`PYTHON`], the allocation return probe first writes a
//! [`PyStackRecord`]: the thread's `PyThreadState` is found (cached per
//! thread in [`PY_TSTATE`], checked by its `native_thread_id`, else searched
//! for in the interpreter's list of thread states), and its chain of
//! `_PyInterpreterFrame`s is walked from `cframe->current_frame`, innermost
//! first, for at most [`MAX_PY_FRAMES`] frames. Each frame sends its code
//! object's address, the index of the instruction it last ran, its
//! `co_firstlineno` and whether C code entered the interpreter there.
//!
//! Nothing is resolved here: names, files and lines come from user space,
//! which reads the code objects from the process's memory. A code object
//! may be gone by the time user space gets to it (a module's body is freed
//! once it has run; a process may exit), so the first time a process's stack
//! holds one (by [`PY_CODES`]) a [`PyCodeRecord`] goes first with a copy of
//! its name, file name and line table objects. Where each field lies
//! depends on the Python version: the offsets come with the map value
//! ([`PyConfig`]), from user space's per-version tables.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use memtrace_common::{
    Counter, MAX_PY_FRAMES, PY_FRAME_ENTRY, PY_FRAME_SHIM, PY_STAMP_MASK, PY_STR_COPY,
    PyCodeRecord, PyConfig, PyFrame, PyStackRecord, PyWalkError, RecordKind, TRACED_PIDS,
    py_code_stamp,
};

use crate::{count, header, output};

/// CPython processes whose allocations carry Python stacks, with where their
/// interpreter is and how its version lays out what the walk reads. Filled
/// by the loader.
#[map]
pub(crate) static PYTHON: HashMap<u32, PyConfig> = HashMap::with_max_entries(TRACED_PIDS, 0);

/// Nonzero when some process may be in [`PYTHON`]: every other allocation
/// then skips the lookup.
#[unsafe(no_mangle)]
static PYTHON_ON: u8 = 0;

/// The `PyThreadState` last found for each thread id. Checked at each use
/// (its `native_thread_id` must still be the thread's), so a stale entry
/// costs a search, never a wrong stack.
#[map]
static PY_TSTATE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// One record being built, per CPU (too large for the BPF stack).
#[map]
static PY_SCRATCH: PerCpuArray<PyStackRecord> = PerCpuArray::with_max_entries(1, 0);

/// Code objects already sent ([`PyCodeRecord`]), by process and address,
/// with their stamp: a new code object at an old address has another.
#[map]
static PY_CODES: LruHashMap<[u64; 2], u32> = LruHashMap::with_max_entries(65536, 0);

/// One code record being built, per CPU.
#[map]
static PY_CODE_SCRATCH: PerCpuArray<PyCodeRecord> = PerCpuArray::with_max_entries(1, 0);

/// Code records one stack sends at most, innermost first: the rest go with
/// the stacks that follow, whose outer frames are mostly the same (or user
/// space reads them from the process). The verifier follows each turn of
/// the loop once per count of records sent so far: at 4, loading takes
/// half a minute.
const MAX_NEW_CODES: usize = 2;

/// Thread states looked at when searching for a thread's: a process with
/// more Python threads than this gets their later ones' frames only once
/// one of them is found (never, past the bound).
const MAX_THREADS: usize = 128;

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, PyWalkError> {
    // SAFETY: reads user memory through a checked helper.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| PyWalkError::Unreadable)
}

/// Writes the Python stack of thread `tid` of process `tgid`, if it is a
/// Python process and the thread runs Python code, for the allocation of
/// `addr` whose record comes next.
#[inline(always)]
pub(crate) fn emit_py_stack(tgid: u32, tid: u32, addr: u64) {
    // SAFETY: as in `self_tgid`.
    if unsafe { core::ptr::read_volatile(&PYTHON_ON) } == 0 {
        return;
    }
    // SAFETY: a read-only look at a map value.
    let Some(cfg) = (unsafe { PYTHON.get(tgid) }) else {
        return;
    };
    let Some(rec) = PY_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not migrate mid-run.
    let rec = unsafe { &mut *rec };
    rec.header = header(
        RecordKind::PyStack,
        (u64::from(tgid) << 32) | u64::from(tid),
    );
    rec.addr = addr;
    rec.nframes = 0;
    rec.truncated = 0;
    rec.err = 0;
    match thread_frame(cfg, tid) {
        Ok(0) => return,
        Ok(frame) => {
            if let Err(e) = walk(cfg, frame, rec) {
                rec.err = e as u32;
            }
        }
        // A thread Python never ran on (a C library's own thread): no
        // Python frames, which is no loss.
        Err(PyWalkError::NoThreadState) => return,
        Err(e) => rec.err = e as u32,
    }
    send_new_codes(cfg, tgid, rec);
    let n = rec.nframes as usize;
    let len = PyStackRecord::FIXED_LEN + core::mem::size_of::<PyFrame>() * n;
    // `output` counts a full ring buffer; this says whose record it was.
    if n <= MAX_PY_FRAMES && !output(rec, len) {
        count(Counter::PyStackLost);
    }
}

/// The innermost frame of thread `tid` (0 when it runs no Python code).
#[inline(always)]
fn thread_frame(cfg: &PyConfig, tid: u32) -> Result<u64, PyWalkError> {
    // SAFETY: a read-only look at a map value.
    if let Some(&ts) = unsafe { PY_TSTATE.get(tid) } {
        let owner: u64 = read(ts + u64::from(cfg.tstate_native_thread_id))?;
        if owner as u32 == tid {
            return current_frame(cfg, ts);
        }
    }
    let interp: u64 = read(cfg.runtime + u64::from(cfg.runtime_interpreters_head))?;
    if interp == 0 {
        return Err(PyWalkError::NoThreadState);
    }
    let mut ts: u64 = read(interp + u64::from(cfg.interp_threads_head))?;
    // A thread being started has a thread state made by its parent, with
    // the parent's ids, until it runs: the one with frames is the thread's.
    let mut idle = 0u64;
    for _ in 0..MAX_THREADS {
        if ts == 0 {
            break;
        }
        let owner: u64 = read(ts + u64::from(cfg.tstate_native_thread_id))?;
        if owner as u32 == tid {
            let frame = current_frame(cfg, ts)?;
            if frame != 0 {
                let _ = PY_TSTATE.insert(tid, ts, 0);
                return Ok(frame);
            }
            idle = ts;
        }
        ts = read(ts + u64::from(cfg.tstate_next))?;
    }
    if idle != 0 {
        return Ok(0);
    }
    Err(PyWalkError::NoThreadState)
}

#[inline(always)]
fn current_frame(cfg: &PyConfig, ts: u64) -> Result<u64, PyWalkError> {
    let cframe: u64 = read(ts + u64::from(cfg.tstate_cframe))?;
    if cframe == 0 {
        return Ok(0);
    }
    read(cframe + u64::from(cfg.cframe_current_frame))
}

/// Follows `previous` from `frame`, filling `rec.frames`. One frame per
/// turn, whatever it is (the frame count is the turn's number, so the
/// verifier sees one path per turn): a shim frame (3.12+, no code) is sent
/// as it is, with its `owner`, and user space leaves it out.
#[inline(always)]
fn walk(cfg: &PyConfig, mut frame: u64, rec: &mut PyStackRecord) -> Result<(), PyWalkError> {
    for i in 0..MAX_PY_FRAMES {
        if frame == 0 {
            break;
        }
        let code: u64 = read(frame + u64::from(cfg.frame_code))?;
        let previous: u64 = read(frame + u64::from(cfg.frame_previous))?;
        let prev_instr: u64 = read(frame + u64::from(cfg.frame_prev_instr))?;
        let entry: u8 = read(frame + u64::from(cfg.frame_is_entry))?;
        let owner: u8 = read(frame + u64::from(cfg.frame_owner))?;
        let stamp = if u32::from(owner) == cfg.owner_cstack {
            0
        } else {
            let first: u32 = read(code + u64::from(cfg.code_firstlineno))?;
            let file: u64 = read(code + u64::from(cfg.code_filename))?;
            py_code_stamp(first, file)
        };
        let start = code + u64::from(cfg.code_bytecode);
        // Before its first instruction a frame's `prev_instr` is one code
        // unit before the start.
        let lasti = if prev_instr >= start {
            ((prev_instr - start) / 2) as u32
        } else {
            u32::MAX
        };
        let info = (stamp & PY_STAMP_MASK)
            | if entry != 0 { PY_FRAME_ENTRY } else { 0 }
            | if u32::from(owner) == cfg.owner_cstack {
                PY_FRAME_SHIM
            } else {
                0
            };
        if let Some(slot) = rec.frames.get_mut(i) {
            *slot = PyFrame { code, lasti, info };
        }
        // Kept as it grows: a read that fails further out keeps these.
        rec.nframes = (i + 1) as u16;
        frame = previous;
    }
    rec.truncated = (frame != 0) as u16;
    Ok(())
}

/// Sends a [`PyCodeRecord`] for each code object of `rec` this process has
/// not sent yet, innermost first, at most [`MAX_NEW_CODES`].
#[inline(always)]
fn send_new_codes(cfg: &PyConfig, tgid: u32, rec: &PyStackRecord) {
    let mut sent = 0;
    for i in 0..MAX_PY_FRAMES {
        if i >= rec.nframes as usize {
            break;
        }
        let Some(f) = rec.frames.get(i) else {
            break;
        };
        if f.info & PY_FRAME_SHIM != 0 || f.code == 0 {
            continue;
        }
        let key = [u64::from(tgid), f.code];
        let stamp = f.info & PY_STAMP_MASK;
        // SAFETY: a read-only look at a map value.
        if unsafe { PY_CODES.get(key) } == Some(&stamp) {
            continue;
        }
        // Marked before it is sent, so a code object twice on the stack
        // (recursion) goes once; unmarked if it could not go (it goes with
        // a later stack, then).
        if PY_CODES.insert(key, stamp, 0).is_err() {
            continue;
        }
        if !send_code(cfg, rec.header.tgid, rec.header.tid, f) {
            let _ = PY_CODES.remove(key);
            break;
        }
        sent += 1;
        if sent >= MAX_NEW_CODES {
            break;
        }
    }
}

/// Copies the name, file name and line table of `f`'s code object into a
/// [`PyCodeRecord`] and sends it; false when the ring buffer was full.
#[inline(always)]
fn send_code(cfg: &PyConfig, tgid: u32, tid: u32, f: &PyFrame) -> bool {
    let Some(rec) = PY_CODE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot; programs do not migrate mid-run.
    let rec = unsafe { &mut *rec };
    rec.header = header(RecordKind::PyCode, (u64::from(tgid) << 32) | u64::from(tid));
    rec.code = f.code;
    rec.stamp = f.info & PY_STAMP_MASK;
    rec.first_line = read(f.code + u64::from(cfg.code_firstlineno)).unwrap_or(0);
    rec.name_addr = read(f.code + u64::from(cfg.code_qualname)).unwrap_or(0);
    rec.file_addr = read(f.code + u64::from(cfg.code_filename)).unwrap_or(0);
    rec.table_addr = read(f.code + u64::from(cfg.code_linetable)).unwrap_or(0);
    rec.name_len = copy_str(cfg, rec.name_addr, &mut rec.name);
    rec.file_len = copy_str(cfg, rec.file_addr, &mut rec.file);
    // A `bytes`: its header, its bytes and a NUL.
    let size: u64 = read(rec.table_addr + u64::from(cfg.bytes_size)).unwrap_or(0);
    let want = u64::from(cfg.bytes_data) + size + 1;
    rec.table_len = copy(rec.table_addr, want, &mut rec.table);
    let len = PyCodeRecord::FIXED_LEN + rec.table_len as usize;
    output(rec, len)
}

/// Copies a `str` object at `addr` into `buf`: its header and characters
/// (bounded by 4 bytes a character past the non-ASCII header, which is at
/// least the object's size). Returns the bytes copied.
#[inline(always)]
fn copy_str(cfg: &PyConfig, addr: u64, buf: &mut [u8; PY_STR_COPY]) -> u32 {
    let Ok(chars) = read::<u64>(addr + u64::from(cfg.str_length)) else {
        return 0;
    };
    let want = u64::from(cfg.str_compact_data) + chars.saturating_mul(4) + 4;
    let got = copy(addr, want, buf);
    if got != 0 {
        return got;
    }
    // The bound ran past the end of the mapping: an ASCII string's own size.
    copy(addr, u64::from(cfg.str_compact_data) + chars, buf)
}

/// Copies `want` bytes (at most the buffer's size) from `addr`; returns the
/// bytes copied, 0 when they could not be read.
#[inline(always)]
fn copy<const N: usize>(addr: u64, want: u64, buf: &mut [u8; N]) -> u32 {
    if addr == 0 || want == 0 {
        return 0;
    }
    let n = if want > N as u64 { N } else { want as usize };
    // SAFETY: `n` is at most the buffer's size; the helper checks the
    // source.
    let copied = unsafe {
        let dst = core::slice::from_raw_parts_mut(buf.as_mut_ptr(), n);
        bpf_probe_read_user_buf(addr as *const u8, dst)
    };
    if copied.is_ok() { n as u32 } else { 0 }
}
