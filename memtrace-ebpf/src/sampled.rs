//! The agent's sampled allocator tier: byte-weighted Poisson sampling
//! decided here, at the allocator's entry.
//!
//! Every byte allocated has the same chance, one in [`SAMPLE_BYTES`], of
//! being a sample point; an allocation is sampled when a point falls in its
//! bytes, which happens with probability `1 - exp(-size / SAMPLE_BYTES)`.
//! The distance to the next point is drawn from an exponential distribution
//! (a table of draws the loader fills, [`EXP`]) and counted down per CPU: by
//! the exponential's lack of memory, the chance of an allocation does not
//! depend on what ran on that CPU before it. User space weighs each sample
//! by the inverse of that chance; this side only decides.
//!
//! An unsampled call costs its entry trap and nothing more: the entry
//! program returns 1, which tells a uprobe session (kernel 6.13+) not to run
//! at the function's return. A sampled one is pushed on the thread's stack
//! of calls in flight, as in exact mode, and finished at its return: the
//! same program runs again then (a session), or, on a kernel without
//! sessions, where the same programs are plain uprobes, `sampled_exit` on a
//! uretprobe of every call does. Exact mode's programs carry none of this,
//! so the verifier does not check it at every exact-mode attach. Sampled blocks are kept in [`SAMPLED`], and a
//! free is forwarded only for an address found there.
//!
//! The session programs are written without aya's `#[uprobe]` macro, which
//! throws their return value away.
//!
//! Not here: weights, estimates, stacks' symbols (user space); exact mode
//! (`main.rs`), which this never runs beside.

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    AllocFn, AllocatorRanges, Budget, EXP_DRAWS, Inflight, InflightStack, MAX_ALLOCATOR_RANGES,
    MAX_NEST, MAX_SAMPLE_SHIFT, SAMPLE_COUNTERS, SAMPLE_NEW, SAMPLE_OLD, SAMPLE_SHIFT_AT,
    SampleCounter, TRACED_PIDS,
};

use crate::{INFLIGHT, count, slot_mut};

/// Mean bytes between two samples; 0 in exact mode. Set by the loader.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// Samples per second one process may send; 0 for no limit.
#[unsafe(no_mangle)]
static BUDGET_PER_S: u64 = 0;

/// Exponential draws with mean [`SAMPLE_BYTES`], filled by the loader.
#[map]
static EXP: Array<u64> = Array::with_max_entries(EXP_DRAWS, 0);

/// Bytes left before the next sample point, per CPU.
#[map]
static SAMPLE_LEFT: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Sampled blocks still live: key `[tgid, address]`, value the size. The
/// loader sets its size (`--max-live`); a sample that finds it full is not
/// kept, and counted ([`SampleCounter::TableFull`]).
#[map]
static SAMPLED: HashMap<[u64; 2], u64> = HashMap::with_max_entries(1 << 18, 0);

/// Counters, one slot per [`SampleCounter`].
#[map]
static SAMPLE_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SAMPLE_COUNTERS, 0);

/// Each sampled process's budget state and its own losses ([`Budget`]).
#[map]
static BUDGETS: LruHashMap<u32, Budget> = LruHashMap::with_max_entries(TRACED_PIDS, 0);

/// Each sampled process's allocator code, filled by the loader.
#[map]
static RANGES: HashMap<u32, AllocatorRanges> = HashMap::with_max_entries(TRACED_PIDS, 0);

#[inline(always)]
fn bump(c: SampleCounter) {
    if let Some(slot) = SAMPLE_COUNTS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's own slot.
        unsafe { *slot += 1 };
    }
}

/// Counts `size` bytes down to the next sample point; true when one falls
/// in them. The next distance is drawn afresh after a sample.
#[inline(always)]
fn take_sample(size: u64) -> bool {
    let Some(left) = SAMPLE_LEFT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot.
    let left = unsafe { &mut *left };
    *left -= size as i64;
    if *left > 0 {
        return false;
    }
    // SAFETY: helper without preconditions.
    let i = unsafe { bpf_get_prandom_u32() } & (EXP_DRAWS - 1);
    *left = EXP.get(i).copied().unwrap_or(1) as i64;
    bump(SampleCounter::Sampled);
    true
}

/// Process `tgid`'s budget state, made at its first sample point.
#[inline(always)]
fn budget(tgid: u32, now: u64) -> Option<&'static mut Budget> {
    if let Some(b) = BUDGETS.get_ptr_mut(tgid) {
        // SAFETY: a map value; racing CPUs may lose an update, no more.
        return Some(unsafe { &mut *b });
    }
    let fresh = Budget {
        window_ns: now,
        ..Budget::default()
    };
    let _ = BUDGETS.insert(tgid, fresh, 0);
    // SAFETY: as above.
    BUDGETS.get_ptr_mut(tgid).map(|b| unsafe { &mut *b })
}

/// Thins process `tgid`'s sample points to its budget ([`Budget`]): returns
/// the shift a kept point was kept with, `None` for one thinned away. The
/// shift read is the one the coin used and the sample carries, so the
/// weights stay exact whatever other CPUs do to the state meanwhile.
#[inline(always)]
fn thin(tgid: u32, size: u64) -> Option<u32> {
    // SAFETY: as in `sampling`.
    let limit = unsafe { core::ptr::read_volatile(&BUDGET_PER_S) };
    if limit == 0 {
        return Some(0);
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Without a state (its table full of other processes), no thinning:
    // the sample's weight is then exact too.
    let b = budget(tgid, now)?;
    if now.wrapping_sub(b.window_ns) >= 1_000_000_000 {
        // A second well under budget: twice as many points from now on.
        if b.used < limit / 4 && b.shift > 0 {
            b.shift -= 1;
        }
        b.window_ns = now;
        b.used = 0;
    }
    if b.used >= limit && b.shift < MAX_SAMPLE_SHIFT {
        // The second's budget is spent: half as many points from now on,
        // and room for them.
        b.shift += 1;
        b.used = limit / 2;
        if b.shift > b.max_shift {
            b.max_shift = b.shift;
        }
    }
    let shift = (b.shift & 31) as u32;
    // Kept with probability min(2^shift, 1 + size / SAMPLE_BYTES) / 2^shift
    // (`weight::thinning` says the same): an allocation many intervals
    // large is thinned less, or not at all, so a few large blocks do not
    // hang on a coin each.
    // SAFETY: as in `sampling`.
    let mean = unsafe { core::ptr::read_volatile(&SAMPLE_BYTES) }.max(1);
    let odds = 1 + size / mean;
    // SAFETY: helper without preconditions.
    let draw = u64::from(unsafe { bpf_get_prandom_u32() } & ((1u32 << shift) - 1));
    if shift > 0 && draw >= odds {
        b.thinned += 1;
        bump(SampleCounter::BudgetThinned);
        return None;
    }
    b.used += 1;
    Some(shift)
}

/// Counts a sample of process `tgid` lost to a full table, in its own
/// state too: its estimates are partial.
#[inline(always)]
fn table_full(tgid: u32) {
    bump(SampleCounter::TableFull);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(b) = budget(tgid, now) {
        b.table_full += 1;
    }
}

/// Whether `ret` (a return address) lies in the allocator code of process
/// `tgid`: the call comes from inside the allocator.
#[inline(always)]
fn internal(tgid: u32, ret: u64) -> bool {
    // SAFETY: a read-only look at a map value.
    let Some(r) = (unsafe { RANGES.get(tgid) }) else {
        return false;
    };
    for i in 0..MAX_ALLOCATOR_RANGES {
        let [start, end] = r.ranges[i];
        if ret >= start && ret < end {
            return true;
        }
    }
    false
}

/// Forwards the free of `addr` by process `tgid` if it was a sample.
#[inline(always)]
pub(crate) fn forward_free(pid_tgid: u64, addr: u64) {
    let key = [pid_tgid >> 32, addr];
    if SAMPLED.remove(key).is_ok() {
        bump(SampleCounter::FreesForwarded);
        crate::emit_free(pid_tgid, addr);
    }
}

/// The program of an allocator function in sampled mode, at entry or (in a
/// uprobe session) at return. Returns 1 to skip the return run.
#[inline(always)]
pub(crate) fn on_call<C: EbpfContext>(
    ctx: &C,
    regs: &pt_regs,
    func: AllocFn,
    size: u64,
    arg: u64,
) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == crate::self_tgid() {
        return 1;
    }
    let tid = pid_tgid as u32;
    if let Some(call) = session_return(tid, regs) {
        finish(ctx, regs, pid_tgid, &call);
        return 0;
    }
    bump(SampleCounter::Calls);
    // SAFETY: reads user memory through a checked helper; at entry the stack
    // pointer points at the return address.
    let ret = unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0);
    if internal(tgid, ret) {
        bump(SampleCounter::Internal);
        return 1;
    }
    let mut flags = 0;
    match func {
        AllocFn::Delete => {
            if arg != 0 {
                forward_free(pid_tgid, arg);
            }
            return 1;
        }
        // SAFETY: a read-only look at a map value.
        AllocFn::Realloc | AllocFn::Reallocarray | AllocFn::RustRealloc
            if arg != 0 && unsafe { SAMPLED.get([u64::from(tgid), arg]) }.is_some() =>
        {
            flags |= SAMPLE_OLD;
        }
        _ => {}
    }
    if take_sample(size)
        && let Some(shift) = thin(tgid, size)
    {
        flags |= SAMPLE_NEW | (shift << SAMPLE_SHIFT_AT);
    }
    if flags == 0 {
        return 1;
    }
    push(
        tid,
        Inflight {
            sp: regs.rsp,
            size,
            arg,
            // Sampled calls need no entry time: the field holds the
            // return address (see `session_return`).
            ts_ns: ret,
            func: func as u16,
            nested: 0,
            flags,
        },
    );
    0
}

/// Pushes a sampled call on the thread's stack (dropping entries of calls
/// that never returned, below it).
#[inline(always)]
fn push(tid: u32, call: Inflight) {
    let st = match INFLIGHT.get_ptr_mut(tid) {
        Some(st) => st,
        None => {
            if INFLIGHT.insert(tid, InflightStack::default(), 0).is_err() {
                count(memtrace_common::Counter::InflightFull);
                return;
            }
            match INFLIGHT.get_ptr_mut(tid) {
                Some(st) => st,
                None => return,
            }
        }
    };
    // SAFETY: this thread's own entry.
    let st = unsafe { &mut *st };
    let mut depth = st.depth as usize;
    if depth > MAX_NEST {
        depth = MAX_NEST;
    }
    for i in (0..MAX_NEST).rev() {
        if i + 1 == depth && st.calls[i].sp <= call.sp {
            depth = i;
            count(memtrace_common::Counter::StaleInflight);
        }
    }
    match slot_mut(st, depth) {
        Some(slot) => {
            *slot = call;
            st.depth = depth as u64 + 1;
        }
        None => count(memtrace_common::Counter::InflightFull),
    }
}

/// In a session, whether this run is the return of the thread's innermost
/// sampled call: its return address is the instruction pointer, and the
/// return popped it off the stack. Pops and returns the call if so.
#[inline(always)]
fn session_return(tid: u32, regs: &pt_regs) -> Option<Inflight> {
    let st = INFLIGHT.get_ptr_mut(tid)?;
    // SAFETY: this thread's own entry.
    let st = unsafe { &mut *st };
    let depth = st.depth as usize;
    let mut found = None;
    for i in 0..MAX_NEST {
        if i + 1 == depth {
            let c = st.calls[i];
            // A sampled call's `ts_ns` is its return address.
            if c.sp + 8 == regs.rsp && c.ts_ns == regs.rip && c.ts_ns != 0 {
                found = Some(c);
                st.depth = i as u64;
            }
        }
    }
    found
}

/// The return of a sampled call (`alloc_exit` or a session's return run):
/// forwards the old block's free, keeps and sends the new block.
#[inline(always)]
pub(crate) fn finish<C: EbpfContext>(ctx: &C, regs: &pt_regs, pid_tgid: u64, call: &Inflight) {
    let ret = regs.rax;
    let tgid = (pid_tgid >> 32) as u32;
    let addr = match AllocFn::from_u16(call.func) {
        Some(AllocFn::Realloc | AllocFn::Reallocarray | AllocFn::RustRealloc) => {
            // realloc(p, 0) frees p and may return NULL; a failed realloc
            // leaves p as it was.
            if call.flags & SAMPLE_OLD != 0 && (ret != 0 || call.size == 0) {
                forward_free(pid_tgid, call.arg);
            }
            ret
        }
        Some(AllocFn::PosixMemalign) => {
            if ret as u32 != 0 {
                return;
            }
            // SAFETY: reads user memory through a checked helper.
            unsafe { bpf_probe_read_user(call.arg as *const u64) }.unwrap_or(0)
        }
        _ => ret,
    };
    if call.flags & SAMPLE_NEW == 0 || addr == 0 {
        return;
    }
    let key = [u64::from(tgid), addr];
    if SAMPLED.insert(key, call.size, 0).is_err() {
        table_full(tgid);
        return;
    }
    let sample = Inflight { arg: 0, ..*call };
    crate::emit_alloc(ctx, tgid, pid_tgid as u32, addr, 0, &sample);
}

/// A uprobe-session program for one allocator function: `on_call`, whose
/// return value the kernel reads (aya's `#[uprobe]` macro returns 0
/// whatever the function returns, which would run every return). Loaded by
/// user space with the session attach type, or by aya as a plain uprobe
/// beside `sampled_exit` where the kernel has no sessions.
macro_rules! session_program {
    ($name:ident, $func:expr, |$ctx:ident| ($size:expr, $arg:expr)) => {
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "uprobe")]
        pub fn $name(raw: *mut core::ffi::c_void) -> u32 {
            let $ctx = ProbeContext::new(raw);
            // SAFETY: uprobe contexts are `pt_regs`.
            let regs = unsafe { &*(raw as *const pt_regs) };
            on_call(&$ctx, regs, $func, $size, $arg)
        }
    };
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

session_program!(malloc_session, AllocFn::Malloc, |c| (arg(&c, 0), 0));
session_program!(calloc_session, AllocFn::Calloc, |c| (
    arg(&c, 0).wrapping_mul(arg(&c, 1)),
    0
));
session_program!(realloc_session, AllocFn::Realloc, |c| (
    arg(&c, 1),
    arg(&c, 0)
));
session_program!(reallocarray_session, AllocFn::Reallocarray, |c| (
    arg(&c, 1).wrapping_mul(arg(&c, 2)),
    arg(&c, 0)
));
session_program!(posix_memalign_session, AllocFn::PosixMemalign, |c| (
    arg(&c, 2),
    arg(&c, 0)
));
session_program!(aligned_alloc_session, AllocFn::AlignedAlloc, |c| (
    arg(&c, 1),
    0
));
session_program!(memalign_session, AllocFn::Memalign, |c| (arg(&c, 1), 0));
session_program!(valloc_session, AllocFn::Valloc, |c| (arg(&c, 0), 0));
session_program!(pvalloc_session, AllocFn::Pvalloc, |c| (arg(&c, 0), 0));
session_program!(operator_new_session, AllocFn::OperatorNew, |c| (
    arg(&c, 0),
    0
));
session_program!(delete_session, AllocFn::Delete, |c| (0, arg(&c, 0)));
session_program!(rust_realloc_session, AllocFn::RustRealloc, |c| (
    arg(&c, 3),
    arg(&c, 0)
));

/// The return of a sampled call on a kernel without uprobe sessions (a
/// uretprobe on every call of a sampled process): finishes the thread's
/// innermost sampled call if this is its return, else (an unsampled call)
/// returns at once. Its own program, so that exact mode's return program
/// carries none of this for the verifier to check.
#[uretprobe]
pub fn sampled_exit(ctx: RetProbeContext) -> u32 {
    // SAFETY: uretprobe contexts are `pt_regs`.
    let regs = unsafe { &*(ctx.as_ptr() as *const pt_regs) };
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(call) = session_return(pid_tgid as u32, regs) {
        finish(&ctx, regs, pid_tgid, &call);
    }
    0
}

/// `free(ptr)` as a session program: forwards a sample's free, and never
/// asks for the return.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn free_session(raw: *mut core::ffi::c_void) -> u32 {
    let ctx = ProbeContext::new(raw);
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == crate::self_tgid() {
        return 1;
    }
    let addr = arg(&ctx, 0);
    if addr != 0 {
        forward_free(pid_tgid, addr);
    }
    1
}
