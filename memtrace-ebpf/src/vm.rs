//! Resident and mapped memory: `kmem:rss_stat`, page faults and the
//! address-space syscalls (mmap, munmap, mremap, brk, madvise).
//!
//! `rss_stat` carries the new absolute value of one RSS counter, for an
//! address space named by a hash (`mm_id`), with a flag saying whether it is
//! the current task's. The owner of a hash is learnt from the changes a
//! process makes to its own address space; changes by others (a parent
//! copying pages into a forked child, reclaim) are attributed through it.
//!
//! A page fault stashes its address per CPU; the RSS increase it causes,
//! reported by `rss_stat` in the same thread moments later, carries that
//! address, so user space knows which pages became resident. Every
//! `FAULT_SAMPLE`th such fault also carries the user stack that touched the
//! memory.
//!
//! Field offsets are the tracepoints' `format` files' (checked by the loader
//! before it attaches; see `memtrace-user/src/tracefs.rs`).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use memtrace_common::{
    Counter, PendingFault, RSS_FAULT, RSS_SAMPLED, RecordKind, RssLast, RssRecord, VmInflight,
    VmOp, VmRecord,
};

use crate::{INFLIGHT, capture, count, output, traced};

/// Take a fault's stack every this many faults per CPU (`--fault-sample`).
#[unsafe(no_mangle)]
static FAULT_SAMPLE: u32 = 32;

/// A fault is linked to an RSS increase only this soon after it began: a
/// fault that made nothing resident (a write to a present page) must not
/// lend its address to a later, unrelated increase.
const FAULT_WINDOW_NS: u64 = 50_000_000;

/// Owner (tgid) of each address space, by `rss_stat`'s `mm_id`.
#[map]
static MM_OWNER: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// The last RSS values seen per process, to compute changes.
#[map]
pub(crate) static RSS_LAST: HashMap<u32, RssLast> = HashMap::with_max_entries(16384, 0);

/// The fault being handled on each CPU.
#[map]
static PENDING: PerCpuArray<PendingFault> = PerCpuArray::with_max_entries(1, 0);

/// Faults linked to an RSS increase on each CPU, for sampling.
#[map]
static FAULTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Room to build an [`RssRecord`].
#[map]
static RSS_SCRATCH: PerCpuArray<RssRecord> = PerCpuArray::with_max_entries(1, 0);

/// Room to build a [`VmRecord`].
#[map]
static VM_SCRATCH: PerCpuArray<VmRecord> = PerCpuArray::with_max_entries(1, 0);

/// Address-space syscalls in flight, by thread id.
#[map]
static VM_INFLIGHT: HashMap<u32, VmInflight> = HashMap::with_max_entries(16384, 0);

/// Highest user-space address on x86-64 (4-level paging) plus one.
const USER_END: u64 = 0x0000_8000_0000_0000;

/// The tracepoint field at `offset`, or its default if unreadable.
#[inline(always)]
pub(crate) fn field<T>(ctx: &TracePointContext, offset: usize) -> T
where
    T: Default,
{
    // SAFETY: `offset` is within the tracepoint's record (checked against its
    // format file at load); the helper reads through bpf_probe_read.
    unsafe { ctx.read_at::<T>(offset) }.unwrap_or_default()
}

#[inline(always)]
fn note_fault(ctx: &TracePointContext, user_only: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let addr: u64 = field(ctx, 8);
    if user_only && addr >= USER_END {
        return 0;
    }
    if let Some(p) = PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot.
        unsafe {
            *p = PendingFault {
                tid: pid_tgid as u32,
                _pad: 0,
                addr,
                ts_ns: bpf_ktime_get_ns(),
            }
        };
    }
    0
}

/// `exceptions:page_fault_user`: a user-mode access faulted.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    note_fault(&ctx, false)
}

/// `exceptions:page_fault_kernel`: the kernel faulted on a user address on
/// the process's behalf (`read()` into an untouched buffer).
#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    note_fault(&ctx, true)
}

/// `kmem:rss_stat`: an RSS counter of some address space changed.
#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let mm_id: u32 = field(&ctx, 8);
    let curr: u32 = field(&ctx, 12);
    let member: i32 = field(&ctx, 16);
    let bytes: i64 = field(&ctx, 24);
    if !(0..4).contains(&member) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let current = (pid_tgid >> 32) as u32;
    let tgid = if curr != 0 {
        if !traced(current) {
            return 0;
        }
        // SAFETY: read-only look at a map value.
        if unsafe { MM_OWNER.get(mm_id) }.copied() != Some(current) {
            let _ = MM_OWNER.insert(mm_id, current, 0);
        }
        current
    } else {
        // SAFETY: as above.
        match unsafe { MM_OWNER.get(mm_id) }.copied() {
            // A process changing its own address space while it is not its
            // current one is tearing it down (exit, or the old one at
            // exec): its accounting ends with the exit or exec record.
            // Its hash may name a new address space once this one is
            // freed: forget the owner now.
            Some(owner) if owner == current => {
                let _ = MM_OWNER.remove(mm_id);
                return 0;
            }
            Some(owner) => owner,
            // An address space whose owner is not known yet: a child being
            // forked, an exec building its new stack. Nothing is lost: the
            // counters are absolute, and the owner's next change carries
            // the value.
            None => return 0,
        }
    };
    if !traced(tgid) {
        return 0;
    }

    let last = match RSS_LAST.get_ptr_mut(tgid) {
        Some(l) => l,
        None => {
            let unknown = RssLast { bytes: [-1; 4] };
            let _ = RSS_LAST.insert(tgid, unknown, 0);
            match RSS_LAST.get_ptr_mut(tgid) {
                Some(l) => l,
                None => return 0,
            }
        }
    };
    // SAFETY: a map value; concurrent updates of one process's entry from
    // two CPUs can only misattribute a delta, never corrupt memory.
    let last = unsafe { &mut *last };
    // Constant indices: the verifier cannot bound a computed one here.
    let slot = match member {
        0 => &mut last.bytes[0],
        1 => &mut last.bytes[1],
        2 => &mut last.bytes[2],
        _ => &mut last.bytes[3],
    };
    let prev = *slot;
    *slot = bytes;
    let delta = if prev < 0 { 0 } else { bytes - prev };

    let Some(rec) = RSS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot.
    let rec = unsafe { &mut *rec };
    // The owner's record, made by the current thread.
    rec.header = crate::header(
        RecordKind::Rss,
        ((tgid as u64) << 32) | (pid_tgid & 0xffff_ffff),
    );
    let now = rec.header.ts_ns;
    rec.member = member as u32;
    rec.flags = 0;
    rec.bytes = bytes;
    rec.delta = delta;
    rec.fault_addr = 0;
    rec.nframes = 0;
    rec._pad = 0;
    rec.stack_err = 0;
    // member 2 is swap: a fault never makes swap entries.
    if curr != 0
        && delta > 0
        && member != 2
        && let Some(p) = PENDING.get_ptr_mut(0)
    {
        // SAFETY: this CPU's own slot.
        let p = unsafe { &mut *p };
        if p.tid == pid_tgid as u32 && now.wrapping_sub(p.ts_ns) < FAULT_WINDOW_NS {
            rec.flags = RSS_FAULT;
            rec.fault_addr = p.addr;
            p.tid = 0;
            if sample() {
                rec.flags |= RSS_SAMPLED;
                let (n, err) = capture(&ctx, &mut rec.frames, true);
                rec.nframes = n;
                rec.stack_err = err;
            }
        }
    }
    output(rec, RssRecord::FIXED_LEN + 8 * rec.nframes as usize);
    0
}

/// Whether this CPU's next linked fault is sampled for its stack.
#[inline(always)]
fn sample() -> bool {
    // SAFETY: a read of a global the loader set before load.
    let every = unsafe { core::ptr::read_volatile(&FAULT_SAMPLE) } as u64;
    let Some(n) = FAULTS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot.
    let n = unsafe { &mut *n };
    *n += 1;
    every <= 1 || *n % every == 0
}

/// Stashes a syscall's arguments (offsets 16, 24, ... in every
/// `syscalls:sys_enter_*` record).
#[inline(always)]
fn vm_enter(ctx: &TracePointContext, op: VmOp) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let tid = pid_tgid as u32;
    let args = [
        field::<u64>(ctx, 16),
        field::<u64>(ctx, 24),
        field::<u64>(ctx, 32),
        field::<u64>(ctx, 40),
        field::<u64>(ctx, 48),
    ];
    if op == VmOp::Madvise && !matches!(args[2], 4 | 8 | 9 | 24) {
        // Only advice that releases pages changes what is resident.
        return 0;
    }
    // Inside a traced allocator call, the allocator itself is mapping.
    // SAFETY: read-only look at this thread's entry.
    let by_allocator = unsafe { INFLIGHT.get(tid) }.is_some_and(|st| st.depth > 0);
    let call = VmInflight {
        op: op as u16,
        by_allocator: by_allocator as u16,
        _pad: 0,
        args,
    };
    if VM_INFLIGHT.insert(tid, call, 0).is_err() {
        count(Counter::VmInflightFull);
    }
    0
}

#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    vm_enter(&ctx, VmOp::Mmap)
}
#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    vm_enter(&ctx, VmOp::Munmap)
}
#[tracepoint]
pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
    vm_enter(&ctx, VmOp::Mremap)
}
#[tracepoint]
pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
    vm_enter(&ctx, VmOp::Brk)
}
#[tracepoint]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    vm_enter(&ctx, VmOp::Madvise)
}

/// Return of any of the syscalls above (`syscalls:sys_exit_*`, `ret` at 16).
#[tracepoint]
pub fn vm_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: read of this thread's own entry, copied out before removal.
    let Some(call) = (unsafe { VM_INFLIGHT.get(tid) }).copied() else {
        return 0;
    };
    let _ = VM_INFLIGHT.remove(tid);
    let ret: i64 = field(&ctx, 16);
    // Errors are -4095..-1; user addresses are never negative.
    if (-4095..0).contains(&ret) {
        return 0;
    }
    let Some(rec) = VM_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot.
    let rec = unsafe { &mut *rec };
    rec.header = crate::header(RecordKind::Vm, pid_tgid);
    rec.op = call.op;
    rec.by_allocator = call.by_allocator;
    rec._pad = 0;
    rec._pad2 = 0;
    rec.addr = call.args[0];
    rec.len = call.args[1];
    rec.arg3 = call.args[2];
    rec.arg4 = call.args[3];
    rec.arg5 = call.args[4];
    rec.ret = ret as u64;
    rec.nframes = 0;
    rec.stack_err = 0;
    // Who mapped is worth a stack; who unmapped or advised is not.
    if matches!(call.op, 1 | 3 | 4) {
        let (n, err) = capture(&ctx, &mut rec.frames, true);
        rec.nframes = n;
        rec.stack_err = err;
    }
    output(rec, VmRecord::FIXED_LEN + 8 * rec.nframes as usize);
    0
}
