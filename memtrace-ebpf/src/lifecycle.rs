//! Process lifecycle: a new child (`task:task_newtask`, followed with
//! `--follow-forks`), exit (`sched_process_exit`, a raw tracepoint), exec
//! (`sched:sched_process_exec`), the dynamic loader's "libraries mapped"
//! hook (`_dl_debug_state`, a uprobe) and the OOM killer's choice
//! (`oom:mark_victim`).

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_send_signal},
    macros::{map, raw_tracepoint, tracepoint, uprobe},
    maps::HashMap,
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
};
use memtrace_common::{Counter, ExecRecord, ForkRecord, Header, OomRecord, RecordKind};

use crate::vm::{RSS_LAST, field};
use crate::{
    DWARF, EVENTS, FOLLOW_FORKS, INFLIGHT, TRACED, count, header, self_tgid, skipped, submit,
    traced,
};

/// `CLONE_THREAD`: the new task is a thread of its creator's process.
const CLONE_THREAD: u64 = 0x0001_0000;

/// `task:task_newtask` (pid 8, comm 12, clone_flags 32), in the creator's
/// context, before the new task first runs. With `--follow-forks`, a
/// followed process's new child process is followed too, so none of its
/// calls is missed. When every process is traced, each new process is
/// reported too: it starts a new account even if the exit of an earlier
/// process with its pid was lost. Threads are not new processes.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let flags: u64 = field(&ctx, 32);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let child: i32 = field(&ctx, 8);
    // SAFETY: as in `self_tgid`.
    if unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) } != 0 {
        // SAFETY: a read-only look at a map value.
        if unsafe { TRACED.get((pid_tgid >> 32) as u32) }.is_none() {
            return 0;
        }
        if TRACED.insert(child as u32, 1, 0).is_err() {
            count(Counter::TracedFull);
            return 0;
        }
        // A child of a process unwound by user space is unwound too; its
        // main stack is the parent's copy, at the same place.
        // SAFETY: a read-only look at a map value.
        if let Some(&top) = unsafe { DWARF.get((pid_tgid >> 32) as u32) } {
            let _ = DWARF.insert(child as u32, top, 0);
        }
    } else if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let comm: [u8; 16] = field(&ctx, 12);
    submit::<ForkRecord>(|r| {
        r.header = header(RecordKind::Fork, pid_tgid);
        r.child = child as u32;
        r.comm = comm;
    });
    0
}

/// A thread exited. Its calls in flight are dropped: a thread killed inside
/// an allocator never returns through the probes, and a later thread that
/// reuses its id must not inherit them (they would make its own calls look
/// nested, and silence them). When the last thread of a process exits
/// (`group_dead`), its accounting closes.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit(ctx: RawTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p, bool group_dead); `p` is current.
    let group_dead: u64 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // A call that never returned allocated nothing anyone will see: this is
    // cleanup, not a loss. Removing a missing key is a cheap failure.
    let _ = INFLIGHT.remove(tid);
    let tgid = (pid_tgid >> 32) as u32;
    if group_dead & 0xff == 0 || tgid == self_tgid() {
        return 0;
    }
    // A later process with this pid is not the one asked for.
    let _ = RSS_LAST.remove(tgid);
    let _ = TRACED.remove(tgid);
    let _ = DWARF.remove(tgid);
    submit::<Header>(|h| *h = header(RecordKind::Exit, pid_tgid));
    0
}

/// `sched:sched_process_exec` (pid 12, old_pid 16): the process now runs a
/// new program in a new address space; its RSS counters start again from
/// that address space's. Calls in flight in the old image can never return
/// (its stack is gone): they are dropped, for the thread under its id before
/// the exec too (a non-leader thread that execs takes the process's id), as
/// at a thread's exit. Kept, they sit above or below the new image's stack
/// at random and can silence every later call of the thread.
#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = INFLIGHT.remove(pid_tgid as u32);
    let old: i32 = field(&ctx, 16);
    if old as u32 != pid_tgid as u32 {
        let _ = INFLIGHT.remove(old as u32);
    }
    let tgid = (pid_tgid >> 32) as u32;
    if !traced(tgid) {
        return 0;
    }
    let _ = RSS_LAST.remove(tgid);
    // The task's name is the new program's by the time this tracepoint fires.
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    submit::<ExecRecord>(|r| {
        r.header = header(RecordKind::Exec, pid_tgid);
        r.comm = comm;
    });
    0
}

/// `SIGSTOP`.
const SIGSTOP: u32 = 19;

/// Processes stopped at the loader's hook and not yet continued by memtrace
/// (which removes them): what its guard process continues if memtrace dies.
#[map]
static STOPPED: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// The dynamic loader of a traced process calls `_dl_debug_state` (glibc's
/// `r_brk`, the debugger's hook) before and after it maps libraries: at
/// start-up, before any library's code runs, and at each `dlopen`. The
/// process may now map an allocator library memtrace has not probed (after
/// an exec, or a dlopen), so it is stopped until user space has looked:
/// the record goes out with a wakeup, and user space sends SIGCONT once the
/// new library is probed, so none of its calls is missed. Space is reserved
/// before the signal is sent, so a stop is always reported, and the signal is
/// queued before the record is visible, so the SIGCONT cannot come first.
#[uprobe]
pub fn loader_ready(_ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if skipped((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<Header>(0) else {
        // Not stopped: its new libraries are looked for at the next stop,
        // or its exec, and calls before that are not seen.
        count(Counter::RingbufFull);
        return 0;
    };
    entry.write(header(RecordKind::Loaded, pid_tgid));
    // SAFETY: a helper without memory arguments; it signals the current
    // process.
    if unsafe { bpf_send_signal(SIGSTOP) } != 0 {
        entry.discard(0);
        return 0;
    }
    // For memtrace's guard process, should memtrace die before it sends
    // SIGCONT (see `guard` in memtrace-user). A full table leaves the stop
    // to memtrace alone.
    let _ = STOPPED.insert((pid_tgid >> 32) as u32, 1, 0);
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    0
}

/// `oom:mark_victim`: pid 8, total_vm 16, anon_rss 24, file_rss 32,
/// shmem_rss 40, pgtables 56 (all KiB), oom_score_adj 64.
#[tracepoint]
pub fn oom_victim(ctx: TracePointContext) -> u32 {
    let pid: i32 = field(&ctx, 8);
    let victim = pid as u32;
    if !traced(victim) {
        return 0;
    }
    let f = |off: usize| -> u64 { field(&ctx, off) };
    let adj: i16 = field(&ctx, 64);
    // The victim is not the current task: the header names the victim.
    let pid_tgid = ((victim as u64) << 32) | victim as u64;
    submit::<OomRecord>(|r| {
        *r = OomRecord {
            header: header(RecordKind::Oom, pid_tgid),
            total_vm_kib: f(16),
            anon_rss_kib: f(24),
            file_rss_kib: f(32),
            shmem_rss_kib: f(40),
            pgtables_kib: f(56),
            oom_score_adj: adj as i64,
        }
    });
    0
}
