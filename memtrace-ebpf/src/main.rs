//! memtrace's eBPF programs: allocator uprobes (this file), the kernel's
//! memory tracepoints (`vm`: RSS, page faults, address-space syscalls;
//! `kmem`: kernel allocations) and process lifecycle (`lifecycle`).
//!
//! The kernel side records facts and nothing more: an entry probe stashes the
//! call's arguments in a per-thread stack of calls in flight, the return probe
//! takes them back and writes one [`AllocRecord`] with the caller's user stack,
//! `free` writes one [`FreeRecord`]. No aggregation, no filtering by size, no
//! formatting: user space does all of that.
//!
//! Nesting: glibc's `realloc(NULL, n)`, `aligned_alloc`, `posix_memalign`,
//! `memalign` and libstdc++'s `operator new` call the traced `malloc` (and
//! `realloc(p, 0)` calls `free`) from inside a traced call. Only the outermost
//! call of a thread emits a record; calls nested in it are pushed (so their
//! returns pair up) but emit nothing. Entries are matched to returns by stack
//! pointer, so an entry whose call never returned (longjmp) is found and
//! dropped instead of corrupting the thread's state.
//!
//! Every loss is counted in [`COUNTERS`], indexed by [`Counter`]; records the
//! full ring buffer drops are also counted by process and call site in
//! [`LOST`], so each call site's ledger stays exact.
#![no_std]
#![no_main]

mod kmem;
mod lifecycle;
mod python;
mod sampled;
mod vm;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        pt_regs,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_buf,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    AllocFn, AllocRecord, AllocStackRecord, COUNTERS, Counter, EVENT_ABI, FreeRecord, Header,
    Inflight, InflightStack, LOST_SITES, MAX_FRAMES, MAX_NEST, RecordKind, SAMPLE_SHIFT_AT,
    STACK_COPY, TRACED_PIDS,
};

/// memtrace's own process id: its allocations are never traced (in
/// system-wide mode they would feed back into the ring buffer).
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;

/// Nonzero when every process is traced (no `--pid`, no command); else
/// the kernel tracepoints report only the processes in [`TRACED`].
#[unsafe(no_mangle)]
static TRACE_ALL: u8 = 0;

/// Nonzero with `--follow-forks`: the allocator probes are attached for
/// every process and trace only those in [`TRACED`], to which followed
/// processes add their children. Otherwise the kernel scopes the probes to
/// the traced pids itself, and they need no lookup.
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u8 = 0;

/// Processes whose kernel-side memory events are reported (and, with
/// [`FOLLOW_FORKS`], whose allocator calls are). Filled by the loader, and
/// with `--follow-forks` by `process_fork`.
#[map]
pub(crate) static TRACED: HashMap<u32, u8> = HashMap::with_max_entries(TRACED_PIDS, 0);

/// How allocation stacks are taken: 0, by frame pointers in every process;
/// 1, copied for user space to unwind ([`AllocStackRecord`]) in every
/// process; 2, copied for the processes in [`DWARF`], by frame pointers for
/// the others.
#[unsafe(no_mangle)]
static UNWIND: u8 = 0;

/// Processes whose stacks user space unwinds (with [`UNWIND`] 2), and the
/// top of each one's main-thread stack (0 when unknown): a copy that would
/// run past it stops there instead of at a fault. Filled by the loader;
/// `process_fork` adds a followed child of a listed parent.
#[map]
pub(crate) static DWARF: HashMap<u32, u64> = HashMap::with_max_entries(TRACED_PIDS, 0);

/// Bytes waiting in [`EVENTS`] past which a record wakes the reader. Below
/// it records are written without a wakeup (a wakeup is an interrupt on the
/// traced thread's CPU) and user space drains the ring on a short timer.
/// The loader sets it to a fraction of the ring's size.
#[unsafe(no_mangle)]
static WAKE_BYTES: u64 = 1 << 20;

/// Set by the loader so it can refuse an object built from other sources.
#[unsafe(no_mangle)]
static ABI_VERSION: u16 = EVENT_ABI;

/// Records to user space. The loader sets the size (`--ringbuf-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Calls in flight, per thread id. A thread's entry is made at its first
/// traced call and removed when the thread exits (`lifecycle`), not after
/// each call: an insert and a delete per call cost more than the rest of
/// the probe. A host with more than 16,384 live threads that allocate loses
/// the calls of the others (`inflight_full`).
#[map]
pub(crate) static INFLIGHT: HashMap<u32, InflightStack> = HashMap::with_max_entries(16384, 0);

/// Per-CPU room to build an [`AllocRecord`] (too large for the BPF stack).
#[map]
static SCRATCH: PerCpuArray<AllocRecord> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room to build an [`AllocStackRecord`].
#[map]
static STACK_SCRATCH: PerCpuArray<AllocStackRecord> = PerCpuArray::with_max_entries(1, 0);

/// The most user stack copied in one read: a page (see [`user_stack`]).
const PAGE: usize = 4096;

/// Per-CPU room for that copy, plus one word never written: indices masked
/// to the page's size, plus one, stay inside the map value, which is what
/// the verifier checks.
#[map]
static WINDOW: PerCpuArray<[u64; PAGE / 8 + 1]> = PerCpuArray::with_max_entries(1, 0);

/// Allocator records the full ring buffer dropped, by process and call site:
/// key `[tgid, call site]` (the return address into the allocator's caller;
/// 0 for frees), value `[count, bytes]`, per CPU so that no update races.
/// User space adds them to each call site's ledger.
#[map]
static LOST: PerCpuHashMap<[u64; 2], [u64; 2]> = PerCpuHashMap::with_max_entries(LOST_SITES, 0);

/// Counts a record of process `tgid` dropped by the full ring buffer:
/// an allocation of `bytes` at `site`, or (`site` 0) a free.
#[inline(always)]
fn count_lost(tgid: u32, site: u64, bytes: u64) {
    let key = [tgid as u64, site];
    if let Some(v) = LOST.get_ptr_mut(key) {
        // SAFETY: this CPU's own value of the entry.
        unsafe {
            (*v)[0] += 1;
            (*v)[1] += bytes;
        }
    } else if LOST.insert(key, [1, bytes], BPF_NOEXIST as u64).is_err() {
        // Another CPU made the entry meanwhile (then this CPU's value is
        // there, zero), or the table is full.
        match LOST.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(v) => unsafe {
                (*v)[0] += 1;
                (*v)[1] += bytes;
            },
            None => count(Counter::LostTableFull),
        }
    }
}

/// Loss and load counters, one slot per [`Counter`].
#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(slot) = COUNTS.get_ptr_mut(c as u32) {
        // SAFETY: the pointer comes from the map and is this CPU's own slot.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub(crate) fn self_tgid() -> u32 {
    // SAFETY: a read of a global the loader set before load; volatile so the
    // compiler does not fold the zero it was compiled with.
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

/// Whether the allocator probes skip this process: memtrace itself, and
/// with `--follow-forks` (probes on every process) any process not followed.
#[inline(always)]
pub(crate) fn skipped(tgid: u32) -> bool {
    if tgid == self_tgid() {
        return true;
    }
    // SAFETY: as in `self_tgid`.
    if unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) } == 0 {
        return false;
    }
    // SAFETY: a read-only look at a map value.
    unsafe { TRACED.get(tgid) }.is_none()
}

/// Whether the kernel-side events of process `tgid` are reported.
#[inline(always)]
pub(crate) fn traced(tgid: u32) -> bool {
    if tgid == self_tgid() || tgid == 0 {
        return false;
    }
    // SAFETY: as in `self_tgid`.
    if unsafe { core::ptr::read_volatile(&TRACE_ALL) } != 0 {
        return true;
    }
    // SAFETY: a read-only look at a map value.
    unsafe { TRACED.get(tgid) }.is_some()
}

/// Captures the current stack into `frames` (the user stack with `user`,
/// else the kernel's). Returns the number of frames and, when none could be
/// had, the helper's negative errno.
#[inline(always)]
pub(crate) fn capture<C: EbpfContext>(
    ctx: &C,
    frames: &mut [u64; MAX_FRAMES],
    user: bool,
) -> (u16, i32) {
    let flags = if user { BPF_F_USER_STACK as u64 } else { 0 };
    // SAFETY: the buffer is `frames`, of the size passed.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            frames.as_mut_ptr().cast(),
            (MAX_FRAMES * 8) as u32,
            flags,
        )
    };
    if got > 0 {
        let mut bytes = got as usize & 0x7f8;
        if bytes > MAX_FRAMES * 8 {
            bytes = MAX_FRAMES * 8;
        }
        ((bytes / 8) as u16, 0)
    } else {
        count(Counter::StackLost);
        (0, got as i32)
    }
}

/// The wakeup flag for a record written now (see [`WAKE_BYTES`]).
#[inline(always)]
pub(crate) fn wake_flags() -> u64 {
    // SAFETY: as in `self_tgid`.
    let wake_at = unsafe { core::ptr::read_volatile(&WAKE_BYTES) };
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wake_at {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// The user stack at a uprobe or uretprobe, by frame pointers: the probed
/// instruction, then the return address of each frame up the `rbp` chain.
///
/// Not `bpf_get_stack`: the kernel's walker follows the chain until a read
/// fails, and the outermost frame of nearly every program holds `rbp = 0`
/// (`_start` clears it), so every walk ended in a page fault, which cost
/// more here than the uprobe itself. This walk stops at a null, misaligned
/// or non-increasing frame pointer (frames live at ever higher addresses),
/// or at a read that fails.
///
/// The stack from the first frame record to the end of its page is copied in
/// one read, and the records inside it are read from the copy: each
/// `bpf_probe_read_user` costs a call, a fault-proof copy and a
/// hardened-usercopy check, ~0.1 µs here, more than copying the page, and a
/// stack of 36 frames read one by one cost 4.8 µs. The copy stops at the end
/// of the page: reading on would fault wherever the next page is not mapped
/// (above the main thread's stack), and a fault costs more than the reads it
/// saves. Records beyond the copy are read one by one; the copy happens
/// before the walk, so the verifier checks the walk once, not per copy.
#[inline(always)]
fn user_stack(regs: &pt_regs, frames: &mut [u64; MAX_FRAMES]) -> u16 {
    frames[0] = regs.rip;
    let Some(window) = WINDOW.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's own slot; programs do not migrate mid-run.
    let window = unsafe { &mut *window };
    let mut fp = regs.rbp;
    let start = fp;
    // The copy holds [start, start + len) of the stack.
    let mut len = 0;
    let rest = PAGE - (fp as usize & (PAGE - 1));
    if fp != 0 && fp & 7 == 0 && (16..=PAGE).contains(&rest) {
        // SAFETY: the helper writes `rest` ≤ PAGE bytes into the slot, which
        // holds PAGE + 8.
        let copied = unsafe {
            let bytes = core::slice::from_raw_parts_mut(window.as_mut_ptr().cast::<u8>(), rest);
            bpf_probe_read_user_buf(fp as *const u8, bytes)
        };
        if copied.is_ok() {
            len = rest as u64;
        }
    }
    let mut n = 1;
    while n < MAX_FRAMES {
        if fp == 0 || fp & 7 != 0 {
            break;
        }
        // [fp] is the caller's frame pointer, [fp + 8] the return address.
        let frame = if fp >= start && fp - start + 16 <= len {
            let i = ((fp - start) / 8) as usize & (PAGE / 8 - 1);
            match (window.get(i), window.get(i + 1)) {
                (Some(&next), Some(&ret)) => [next, ret],
                _ => break,
            }
        } else {
            // SAFETY: reads user memory through a checked helper.
            match unsafe { bpf_probe_read_user(fp as *const [u64; 2]) } {
                Ok(frame) => frame,
                Err(_) => break,
            }
        };
        if frame[1] == 0 {
            break;
        }
        frames[n] = frame[1];
        n += 1;
        if frame[0] <= fp {
            break;
        }
        fp = frame[0];
    }
    n as u16
}

/// Sends the first `len` bytes of `rec` (a variable-length record), counting
/// a full ring buffer. Returns whether it was sent.
#[inline(always)]
pub(crate) fn output<T>(rec: &T, len: usize) -> bool {
    let len = if len > size_of::<T>() {
        size_of::<T>()
    } else {
        len
    };
    // SAFETY: `len` never exceeds the record's size.
    let data = unsafe { core::slice::from_raw_parts((rec as *const T).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(data, wake_flags()).is_err() {
        count(Counter::RingbufFull);
        return false;
    }
    true
}

/// The stack pointer of the probed context.
#[inline(always)]
fn sp_of<C: EbpfContext>(ctx: &C) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: uprobe and uretprobe contexts are `pt_regs`.
    unsafe { (*regs).rsp }
}

/// The in-flight slot `i`, through constant offsets only.
#[inline(always)]
pub(crate) fn slot_mut(st: &mut InflightStack, i: usize) -> Option<&mut Inflight> {
    match i {
        0 => Some(&mut st.calls[0]),
        1 => Some(&mut st.calls[1]),
        2 => Some(&mut st.calls[2]),
        3 => Some(&mut st.calls[3]),
        4 => Some(&mut st.calls[4]),
        5 => Some(&mut st.calls[5]),
        _ => None,
    }
}

/// Entry of an allocator function: push the call on the thread's stack.
#[inline(always)]
fn on_entry(ctx: &ProbeContext, func: AllocFn, size: u64, arg: u64) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if skipped((pid_tgid >> 32) as u32) {
        return 0;
    }
    count(Counter::Calls);
    let tid = pid_tgid as u32;
    let sp = sp_of(ctx);
    let st = match INFLIGHT.get_ptr_mut(tid) {
        Some(st) => st,
        None => {
            if INFLIGHT.insert(tid, InflightStack::default(), 0).is_err() {
                count(Counter::InflightFull);
                return 0;
            }
            match INFLIGHT.get_ptr_mut(tid) {
                Some(st) => st,
                None => return 0,
            }
        }
    };
    // SAFETY: `st` points into the map value of this thread, which only this
    // thread touches.
    let st = unsafe { &mut *st };
    let mut depth = st.depth as usize;
    if depth > MAX_NEST {
        depth = MAX_NEST;
    }
    // A live outer call sits higher on the stack (larger sp), or at the same
    // sp when it tail-called this function (glibc's `reallocarray` jumps to
    // `realloc`, libstdc++'s `new[]` to `new`): both returns then fire at the
    // same sp, innermost first. Entries below this call's sp belong to calls
    // that never returned through us (longjmp, exceptions). Indices are
    // constants (the loop unrolls) so the verifier sees every access is in
    // bounds.
    for i in (0..MAX_NEST).rev() {
        if i + 1 == depth && st.calls[i].sp < sp {
            depth = i;
            count(Counter::StaleInflight);
        }
    }
    let Some(slot) = slot_mut(st, depth) else {
        st.depth = depth as u64;
        count(Counter::InflightFull);
        return 0;
    };
    *slot = Inflight {
        sp,
        size,
        arg,
        // Only a realloc's start time is ever read (user space tells a
        // block handed out again mid-realloc by it); a clock read costs.
        ts_ns: if func.is_realloc() {
            // SAFETY: helper without preconditions.
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        },
        func: func as u16,
        nested: (depth > 0) as u16,
        flags: 0,
    };
    st.depth = depth as u64 + 1;
    0
}

/// Return of an allocator function: pop the matching entry and, for an
/// outermost call that allocated (or a realloc that freed), emit a record.
/// The entry says which function it was.
#[inline(always)]
fn on_return(ctx: &RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == self_tgid() {
        return 0;
    }
    let tid = pid_tgid as u32;
    let ret: u64 = ctx.ret();
    let sp = sp_of(ctx);
    let Some(st) = INFLIGHT.get_ptr_mut(tid) else {
        // With --follow-forks the return probes fire in every process; only
        // a traced one's return is missing its entry.
        if !skipped(tgid) {
            count(Counter::ReturnWithoutEntry);
        }
        return 0;
    };
    // SAFETY: as in `on_entry`.
    let st = unsafe { &mut *st };
    let mut depth = st.depth as usize;
    if depth > MAX_NEST {
        depth = MAX_NEST;
    }
    let mut found: Option<Inflight> = None;
    for i in (0..MAX_NEST).rev() {
        if found.is_none() && i + 1 == depth {
            let c = st.calls[i];
            // `ret` popped the return address: sp is 8 above the entry's.
            if c.sp + 8 == sp {
                found = Some(c);
                depth = i;
            } else if c.sp + 8 < sp {
                depth = i;
                count(Counter::StaleInflight);
            }
        }
    }
    // The thread's entry stays (at depth 0) until the thread exits: a map
    // insert and delete on every call cost more than the rest of the probe.
    st.depth = depth as u64;
    let Some(call) = found else {
        count(Counter::ReturnWithoutEntry);
        return 0;
    };
    if call.nested != 0 {
        return 0;
    }
    if call.func == AllocFn::Delete as u16 {
        // Recorded now, once: a free it called was nested in it.
        if call.arg != 0 {
            emit_free(pid_tgid, call.arg);
        }
        return 0;
    }

    let (addr, old_addr) = match AllocFn::from_u16(call.func) {
        Some(AllocFn::PosixMemalign) => {
            // Returns 0 on success and stores the pointer through its first
            // argument.
            if ret as u32 != 0 {
                return 0;
            }
            // SAFETY: reads user memory through a checked helper.
            match unsafe { bpf_probe_read_user(call.arg as *const u64) } {
                Ok(p) => (p, 0),
                Err(_) => {
                    count(Counter::ReturnWithoutEntry);
                    return 0;
                }
            }
        }
        Some(
            AllocFn::Realloc | AllocFn::Reallocarray | AllocFn::RustRealloc | AllocFn::PyRealloc,
        ) => (ret, call.arg),
        _ => (ret, 0),
    };
    // NULL is a failed allocation, except realloc(p, 0), which freed p.
    if addr == 0 && !(old_addr != 0 && call.size == 0) {
        return 0;
    }
    // Before the allocation's own record, which user space pairs it with.
    python::emit_py_stack(tgid, tid, addr);
    emit_alloc(ctx, tgid, tid, addr, old_addr, &call);
    0
}

/// Sends the record of an allocation made by the call that returned, in a
/// return context `ctx` (a uretprobe's, or a uprobe session's return run:
/// both hold the caller's registers).
#[inline(always)]
pub(crate) fn emit_alloc<C: EbpfContext>(
    ctx: &C,
    tgid: u32,
    tid: u32,
    addr: u64,
    old_addr: u64,
    call: &Inflight,
) {
    if let Some(stack_top) = unwound_by_user(tgid) {
        emit_alloc_stack(ctx, tgid, tid, addr, old_addr, call, stack_top);
        return;
    }
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not migrate mid-run.
    let rec = unsafe { &mut *rec };
    rec.header = Header {
        version: EVENT_ABI,
        kind: RecordKind::Alloc as u16,
        tgid,
        tid,
        // Zero in exact mode, whose calls carry no flags.
        sample_shift: call.flags >> SAMPLE_SHIFT_AT,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    rec.addr = addr;
    rec.size = call.size;
    rec.old_addr = old_addr;
    rec.entry_ts_ns = call.ts_ns;
    rec.func = call.func;
    // At the return probe the registers are the caller's: the first frame is
    // the return address into the caller, and its frame chain is intact.
    // SAFETY: return contexts are `pt_regs`.
    let regs = unsafe { &*(ctx.as_ptr() as *const pt_regs) };
    rec.nframes = user_stack(regs, &mut rec.frames);
    rec.stack_err = 0;
    if !output(rec, AllocRecord::FIXED_LEN + 8 * rec.nframes as usize) {
        // frames[0] is the return address into the caller: the call site.
        count_lost(tgid, rec.frames[0], call.size);
    }
}

/// Whether user space unwinds the stacks of process `tgid`, and if so the
/// top of its main thread's stack (0 when unknown).
#[inline(always)]
fn unwound_by_user(tgid: u32) -> Option<u64> {
    // SAFETY: as in `self_tgid`.
    match unsafe { core::ptr::read_volatile(&UNWIND) } {
        0 => None,
        1 => Some(0),
        // SAFETY: a read-only look at a map value.
        _ => unsafe { DWARF.get(tgid) }.copied(),
    }
}

/// [`emit_alloc`] for a process whose stack user space unwinds: the
/// caller's registers and a copy of its stack instead of frames.
#[inline(always)]
fn emit_alloc_stack<C: EbpfContext>(
    ctx: &C,
    tgid: u32,
    tid: u32,
    addr: u64,
    old_addr: u64,
    call: &Inflight,
    stack_top: u64,
) {
    let Some(rec) = STACK_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not migrate mid-run.
    let rec = unsafe { &mut *rec };
    rec.header = header(
        RecordKind::AllocStack,
        (u64::from(tgid) << 32) | u64::from(tid),
    );
    rec.header.sample_shift = call.flags >> SAMPLE_SHIFT_AT;
    rec.addr = addr;
    rec.size = call.size;
    rec.old_addr = old_addr;
    rec.entry_ts_ns = call.ts_ns;
    rec.func = call.func;
    rec._pad = 0;
    // SAFETY: return contexts are `pt_regs`.
    let regs = unsafe { &*(ctx.as_ptr() as *const pt_regs) };
    rec.rip = regs.rip;
    rec.rsp = regs.rsp;
    rec.rbp = regs.rbp;
    let len = copy_stack(regs.rsp, stack_top, &mut rec.stack);
    rec.stack_len = len as u32;
    if !output(rec, AllocStackRecord::FIXED_LEN + len) {
        count_lost(tgid, regs.rip, call.size);
    }
}

/// Copies the user stack from `sp` up into `buf`: the rest of `sp`'s page,
/// then whole pages, up to [`STACK_COPY`] bytes, or to `top` (the main
/// thread's stack end, when known and above `sp`), or to the first page that
/// cannot be read (a read is all or nothing). Returns the bytes copied.
#[inline(always)]
fn copy_stack(sp: u64, top: u64, buf: &mut [u8; STACK_COPY + PAGE]) -> usize {
    // How far the stack reaches, when known: below a main-thread top within
    // reach, or all of the copy.
    let room = if top > sp && top - sp < STACK_COPY as u64 {
        (top - sp) as usize
    } else {
        STACK_COPY
    };
    let first = (PAGE - (sp as usize & (PAGE - 1))) & (2 * PAGE - 1);
    if first == 0 || first > PAGE {
        return 0;
    }
    // SAFETY: the helper writes `first` ≤ PAGE bytes at the buffer's start.
    let copied = unsafe {
        let dst = core::slice::from_raw_parts_mut(buf.as_mut_ptr(), first);
        bpf_probe_read_user_buf(sp as *const u8, dst)
    };
    if copied.is_err() {
        return 0;
    }
    let mut len = first;
    for _ in 0..STACK_COPY / PAGE - 1 {
        if len >= room {
            break;
        }
        // `len` < STACK_COPY here, so the mask changes nothing; it shows the
        // verifier that a page written there stays in the buffer.
        let off = len & (STACK_COPY - 1);
        // SAFETY: `off + PAGE` ≤ STACK_COPY + PAGE, the buffer's size.
        let copied = unsafe {
            let dst = core::slice::from_raw_parts_mut(buf.as_mut_ptr().add(off), PAGE);
            bpf_probe_read_user_buf((sp + off as u64) as *const u8, dst)
        };
        if copied.is_err() {
            break;
        }
        len += PAGE;
    }
    if len > room { room } else { len }
}

/// Writes one fixed-size record, counting a full ring buffer. Returns
/// whether it was written.
#[inline(always)]
pub(crate) fn submit<T: 'static>(fill: impl FnOnce(&mut T)) -> bool {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            // SAFETY: `fill` writes every field before the entry is submitted.
            fill(unsafe { &mut *entry.as_mut_ptr() });
            entry.submit(wake_flags());
            true
        }
        None => {
            count(Counter::RingbufFull);
            false
        }
    }
}

pub(crate) fn header(kind: RecordKind, pid_tgid: u64) -> Header {
    Header {
        version: EVENT_ABI,
        kind: kind as u16,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        sample_shift: 0,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// `free(ptr)`: one record, unless the call is nested in a traced call
/// (`realloc(p, 0)` frees through `free`; its own record says so). A free
/// tail-called from a traced call has the same sp and is nested too.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if skipped((pid_tgid >> 32) as u32) {
        return 0;
    }
    count(Counter::Calls);
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    let tid = pid_tgid as u32;
    let sp = sp_of(&ctx);
    // SAFETY: read-only look at this thread's own entry.
    if let Some(st) = unsafe { INFLIGHT.get(tid) } {
        for i in 0..MAX_NEST {
            if (i as u64) < st.depth && st.calls[i].sp >= sp {
                return 0;
            }
        }
    }
    emit_free(pid_tgid, addr);
    0
}

/// One free record; a full ring counts it lost for the process.
#[inline(always)]
pub(crate) fn emit_free(pid_tgid: u64, addr: u64) {
    let sent = submit::<FreeRecord>(|r| {
        r.header = header(RecordKind::Free, pid_tgid);
        r.addr = addr;
    });
    if !sent {
        count_lost((pid_tgid >> 32) as u32, 0, 0);
    }
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// Return of every allocator function: one program for all (the in-flight
/// entry says which function returned), so the kernel verifies the stack
/// walk once, not once per function; that verification was most of the
/// time memtrace took to attach.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    on_return(&ctx)
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Malloc, arg(&ctx, 0), 0)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 0).wrapping_mul(arg(&ctx, 1));
    on_entry(&ctx, AllocFn::Calloc, size, 0)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Realloc, arg(&ctx, 1), arg(&ctx, 0))
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 1).wrapping_mul(arg(&ctx, 2));
    on_entry(&ctx, AllocFn::Reallocarray, size, arg(&ctx, 0))
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::PosixMemalign, arg(&ctx, 2), arg(&ctx, 0))
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::AlignedAlloc, arg(&ctx, 1), 0)
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Memalign, arg(&ctx, 1), 0)
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Valloc, arg(&ctx, 0), 0)
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Pvalloc, arg(&ctx, 0), 0)
}

/// Every `operator new` variant takes the size first.
#[uprobe]
pub fn operator_new_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::OperatorNew, arg(&ctx, 0), 0)
}

/// `operator delete` variants, jemalloc's `dallocx` and `sdallocx`, Rust's
/// `__rust_dealloc`: the pointer is the first argument. Null is pushed too, as the
/// return probe fires anyway.
#[uprobe]
pub fn delete_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::Delete, 0, arg(&ctx, 0))
}

/// Rust's `__rust_realloc(ptr, old_size, align, new_size)`.
#[uprobe]
pub fn rust_realloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::RustRealloc, arg(&ctx, 3), arg(&ctx, 0))
}

/// CPython's `PyObject_Malloc(size)` and `PyMem_Malloc(size)`.
#[uprobe]
pub fn py_malloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::PyMalloc, arg(&ctx, 0), 0)
}

/// `PyObject_Calloc(nelem, elsize)` and `PyMem_Calloc`.
#[uprobe]
pub fn py_calloc_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 0).wrapping_mul(arg(&ctx, 1));
    on_entry(&ctx, AllocFn::PyCalloc, size, 0)
}

/// `PyObject_Realloc(ptr, size)` and `PyMem_Realloc`.
#[uprobe]
pub fn py_realloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, AllocFn::PyRealloc, arg(&ctx, 1), arg(&ctx, 0))
}

/// Benchmarks only (`cargo xtask bench`): programs that do nothing, put on
/// the same probe points as the real ones, measure what the traps alone
/// cost. memtrace never loads them.
#[uprobe]
pub fn floor_enter(_ctx: ProbeContext) -> u32 {
    0
}
#[uretprobe]
pub fn floor_exit(_ctx: RetProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a program the verifier accepted: it rejects any path
    // that reaches a call to an unknown function.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
