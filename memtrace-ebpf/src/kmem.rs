//! Kernel memory charged to traced processes (`--kernel`): slab objects
//! (`kmem:kmalloc`, `kmem:kmem_cache_alloc`), page-allocator pages that are
//! not movable (`kmem:mm_page_alloc`; movable pages are user and page-cache
//! pages, already counted by RSS) and per-CPU chunks (`percpu:*`).
//!
//! An allocation made while a traced process is the current task is charged
//! to it, remembered in [`KLIVE`] and reported with its kernel stack. Frees
//! run in any context (RCU callbacks, other tasks): every free is looked up
//! in [`KLIVE`] and reported only when it matches, so untraced processes'
//! frees cost a hash lookup and nothing else.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use memtrace_common::{Counter, KmemKey, KmemOp, KmemOwner, KmemRecord, RecordKind};

use crate::vm::field;
use crate::{capture, count, header, output, traced};

/// Live kernel allocations of traced processes.
#[map]
static KLIVE: HashMap<KmemKey, KmemOwner> = HashMap::with_max_entries(262144, 0);

/// Room to build a [`KmemRecord`].
#[map]
static KMEM_SCRATCH: PerCpuArray<KmemRecord> = PerCpuArray::with_max_entries(1, 0);

/// `__GFP_MOVABLE`: user and page-cache pages.
const GFP_MOVABLE: u64 = 0x08;

/// Sizes of an allocation: bytes requested, bytes set aside.
#[derive(Clone, Copy)]
struct Sizes(u64, u64);

/// Writes a record charged to `tgid` (thread `tid` made it); only
/// allocations carry a stack.
#[inline(always)]
fn record(ctx: &TracePointContext, tgid: u32, tid: u32, op: KmemOp, key: &KmemKey, sizes: Sizes) {
    let Sizes(req, alloc) = sizes;
    let with_stack = op != KmemOp::Free;
    let Some(rec) = KMEM_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot.
    let rec = unsafe { &mut *rec };
    rec.header = header(RecordKind::Kmem, ((tgid as u64) << 32) | tid as u64);
    rec.op = op as u16;
    rec.space = key.space;
    rec.addr = key.addr;
    rec.bytes_req = req;
    rec.bytes_alloc = alloc;
    rec.nframes = 0;
    rec.stack_err = 0;
    if with_stack {
        let (n, err) = capture(ctx, &mut rec.frames, false);
        rec.nframes = n;
        rec.stack_err = err;
    }
    output(rec, KmemRecord::FIXED_LEN + 8 * rec.nframes as usize);
}

#[inline(always)]
fn on_alloc(ctx: &TracePointContext, op: KmemOp, space: KmemOp, addr: u64, req: u64, alloc: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if addr == 0 || !traced(tgid) {
        return;
    }
    let key = KmemKey {
        space: space as u64,
        addr,
    };
    let owner = KmemOwner { tgid, _pad: 0 };
    if KLIVE.insert(key, owner, 0).is_err() {
        count(Counter::KmemTableFull);
        return;
    }
    record(ctx, tgid, pid_tgid as u32, op, &key, Sizes(req, alloc));
}

#[inline(always)]
fn on_free(ctx: &TracePointContext, space: KmemOp, addr: u64) {
    let key = KmemKey {
        space: space as u64,
        addr,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(owner) = (unsafe { KLIVE.get(key) }).copied() else {
        return;
    };
    let _ = KLIVE.remove(key);
    let tid = bpf_get_current_pid_tgid() as u32;
    record(ctx, owner.tgid, tid, KmemOp::Free, &key, Sizes(0, 0));
}

/// `kmem:kmalloc`: ptr 16, bytes_req 24, bytes_alloc 32.
#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    let (ptr, req, alloc) = (field(&ctx, 16), field(&ctx, 24), field(&ctx, 32));
    on_alloc(&ctx, KmemOp::Kmalloc, KmemOp::Kmalloc, ptr, req, alloc);
    0
}

/// `kmem:kmem_cache_alloc`: ptr 16, bytes_req 32, bytes_alloc 40.
#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let (ptr, req, alloc) = (field(&ctx, 16), field(&ctx, 32), field(&ctx, 40));
    on_alloc(&ctx, KmemOp::CacheAlloc, KmemOp::Kmalloc, ptr, req, alloc);
    0
}

/// `kmem:kfree` and `kmem:kmem_cache_free`: ptr 16.
#[tracepoint]
pub fn slab_free(ctx: TracePointContext) -> u32 {
    on_free(&ctx, KmemOp::Kmalloc, field(&ctx, 16));
    0
}

/// `kmem:mm_page_alloc`: pfn 8, order 16, gfp_flags 24.
#[tracepoint]
pub fn page_alloc(ctx: TracePointContext) -> u32 {
    let pfn: u64 = field(&ctx, 8);
    let order: u32 = field(&ctx, 16);
    let gfp: u64 = field(&ctx, 24);
    // A failed allocation reports pfn -1.
    if gfp & GFP_MOVABLE != 0 || pfn == u64::MAX || order > 20 {
        return 0;
    }
    let bytes = 4096u64 << order;
    on_alloc(&ctx, KmemOp::Pages, KmemOp::Pages, pfn, bytes, bytes);
    0
}

/// `kmem:mm_page_free` and `kmem:mm_page_free_batched`: pfn 8.
#[tracepoint]
pub fn page_free(ctx: TracePointContext) -> u32 {
    on_free(&ctx, KmemOp::Pages, field(&ctx, 8));
    0
}

/// `percpu:percpu_alloc_percpu`: size 24, ptr 56, bytes_alloc 64.
#[tracepoint]
pub fn percpu_alloc(ctx: TracePointContext) -> u32 {
    let (req, ptr, alloc) = (field(&ctx, 24), field(&ctx, 56), field(&ctx, 64));
    on_alloc(&ctx, KmemOp::Percpu, KmemOp::Percpu, ptr, req, alloc);
    0
}

/// `percpu:percpu_free_percpu`: ptr 24.
#[tracepoint]
pub fn percpu_free(ctx: TracePointContext) -> u32 {
    on_free(&ctx, KmemOp::Percpu, field(&ctx, 24));
    0
}
