//! Ring-buffer records → [`Event`]s.
//!
//! Decoding is a pure function of a byte slice: it checks length, version and
//! kind, and turns the kernel's raw facts (a realloc that returned NULL for
//! size 0, say) into the events the aggregator reasons about. It does not
//! filter, attribute or symbolize.

use memtrace_common::{
    AllocFn, AllocRecord, AllocStackRecord, EVENT_ABI, ExecRecord, ForkRecord, FreeRecord, Header,
    KmemOp, KmemRecord, MAX_FRAMES, OomRecord, RSS_FAULT, RSS_SAMPLED, RecordKind, RssMember,
    RssRecord, STACK_COPY, VmOp, VmRecord,
};

/// One thing a traced process did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A block was allocated (malloc family, `operator new`, or the new block
    /// of a realloc, which then also names the block it replaced).
    Alloc(Alloc),
    /// `free(addr)`, or `realloc(addr, 0)`.
    Free {
        /// Process id.
        pid: u32,
        /// When (CLOCK_MONOTONIC ns).
        ts_ns: u64,
        /// The block freed.
        addr: u64,
    },
    /// The process's last thread exited.
    Exit {
        /// Process id.
        pid: u32,
        /// When.
        ts_ns: u64,
    },
    /// One of the process's resident-memory counters changed.
    Rss(Rss),
    /// An address-space syscall returned.
    Vm(Vm),
    /// The kernel allocated or freed memory charged to the process.
    Kmem(Kmem),
    /// The OOM killer chose the process.
    Oom(Oom),
    /// The process called execve: a new program in a new address space.
    Exec {
        /// Process id.
        pid: u32,
        /// When.
        ts_ns: u64,
        /// The new program's name, as the kernel had it at the exec (not
        /// kept in recordings, which name processes on their own).
        comm: Option<String>,
    },
    /// A followed process created a child process (`--follow-forks`).
    Fork {
        /// Process id of the child: the event starts its account.
        pid: u32,
        /// Process id of the parent.
        parent: u32,
        /// When.
        ts_ns: u64,
        /// The child's name at the fork (not kept in recordings).
        comm: Option<String>,
    },
    /// The process's dynamic loader mapped libraries, and the process waits,
    /// stopped, for memtrace to probe any new allocator among them and send
    /// SIGCONT. A control event: not accounted, not recorded.
    Loaded {
        /// Process id.
        pid: u32,
        /// When.
        ts_ns: u64,
    },
}

impl Event {
    /// When it happened.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Alloc(a) => a.ts_ns,
            Event::Rss(r) => r.ts_ns,
            Event::Vm(v) => v.ts_ns,
            Event::Kmem(k) => k.ts_ns,
            Event::Oom(o) => o.ts_ns,
            Event::Free { ts_ns, .. }
            | Event::Exit { ts_ns, .. }
            | Event::Exec { ts_ns, .. }
            | Event::Fork { ts_ns, .. }
            | Event::Loaded { ts_ns, .. } => *ts_ns,
        }
    }

    /// The stack it carries, if any (user frames, or kernel frames for
    /// kernel allocations).
    pub fn stack(&self) -> Option<&[u64]> {
        let s: &[u64] = match self {
            Event::Alloc(a) => &a.stack,
            Event::Rss(r) => &r.stack,
            Event::Vm(v) => &v.stack,
            Event::Kmem(k) => &k.stack,
            _ => return None,
        };
        (!s.is_empty()).then_some(s)
    }

    /// The process it happened in.
    pub fn pid(&self) -> u32 {
        match self {
            Event::Alloc(a) => a.pid,
            Event::Rss(r) => r.pid,
            Event::Vm(v) => v.pid,
            Event::Kmem(k) => k.pid,
            Event::Oom(o) => o.pid,
            Event::Free { pid, .. }
            | Event::Exit { pid, .. }
            | Event::Exec { pid, .. }
            | Event::Fork { pid, .. }
            | Event::Loaded { pid, .. } => *pid,
        }
    }
}

/// A task name as the kernel keeps it (NUL-padded), if not empty.
fn comm_of(comm: &[u8; 16]) -> Option<String> {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    (len > 0).then(|| String::from_utf8_lossy(&comm[..len]).into_owned())
}

/// A resident-memory counter's new value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rss {
    /// Process id (owner of the address space).
    pub pid: u32,
    /// When.
    pub ts_ns: u64,
    /// Which counter.
    pub member: RssMember,
    /// Its new value, bytes.
    pub bytes: u64,
    /// Change from the previous value, bytes; 0 when there was none to
    /// compare with (the first sight of a process, a value read from /proc).
    pub delta: i64,
    /// The user address whose page fault made these bytes resident.
    pub fault: Option<u64>,
    /// The fault was sampled for its stack (`--fault-sample`).
    pub sampled: bool,
    /// User stack of a sampled fault, innermost first; else empty.
    pub stack: Vec<u64>,
}

/// An address-space syscall and its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmCall {
    /// `mmap`: a new mapping at `addr`.
    Mmap {
        /// Where it was mapped.
        addr: u64,
        /// Bytes.
        len: u64,
        /// `PROT_*` bits.
        prot: u32,
        /// `MAP_*` bits.
        flags: u32,
        /// File descriptor, or -1 for an anonymous mapping.
        fd: i32,
    },
    /// `munmap(addr, len)`.
    Munmap {
        /// Start.
        addr: u64,
        /// Bytes.
        len: u64,
    },
    /// `mremap`: `old_len` bytes at `old_addr` now are `new_len` at
    /// `new_addr`.
    Mremap {
        /// Old start.
        old_addr: u64,
        /// Old length.
        old_len: u64,
        /// New start.
        new_addr: u64,
        /// New length.
        new_len: u64,
    },
    /// `brk(requested)` set the program break to `brk`.
    Brk {
        /// The break asked for (0 asks for the current one).
        requested: u64,
        /// The break now.
        brk: u64,
    },
    /// `madvise(addr, len, advice)` with advice that releases pages.
    Madvise {
        /// Start.
        addr: u64,
        /// Bytes.
        len: u64,
        /// `MADV_*` value.
        advice: u32,
    },
}

/// `MADV_DONTNEED`: the pages are dropped at once.
pub const MADV_DONTNEED: u32 = 4;
/// `MADV_FREE`: the pages may be reclaimed later, when memory is short.
pub const MADV_FREE: u32 = 8;
/// `MADV_REMOVE`: the pages and their backing store are dropped.
pub const MADV_REMOVE: u32 = 9;
/// `MADV_DONTNEED_LOCKED`: as `MADV_DONTNEED`, locked pages too.
pub const MADV_DONTNEED_LOCKED: u32 = 24;

/// An address-space syscall made by a traced process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// Process id.
    pub pid: u32,
    /// When it returned.
    pub ts_ns: u64,
    /// What it did.
    pub call: VmCall,
    /// Made from inside a traced allocator function.
    pub by_allocator: bool,
    /// User stack (mmap, mremap and brk), innermost first.
    pub stack: Vec<u64>,
}

/// A kernel allocation charged to a process, or its free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kmem {
    /// The process charged.
    pub pid: u32,
    /// When.
    pub ts_ns: u64,
    /// What happened ([`KmemOp::Free`] for a free).
    pub op: KmemOp,
    /// The allocation's kind of address (for a free, the op that made it:
    /// [`KmemOp::Kmalloc`] for any slab object, `Pages`, `Percpu`).
    pub space: KmemOp,
    /// Pointer or page frame number.
    pub addr: u64,
    /// Bytes asked for.
    pub bytes_req: u64,
    /// Bytes set aside.
    pub bytes_alloc: u64,
    /// Kernel stack, innermost first; empty for frees.
    pub stack: Vec<u64>,
}

/// The OOM killer's choice, with the kernel's figures at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oom {
    /// The victim.
    pub pid: u32,
    /// When.
    pub ts_ns: u64,
    /// Virtual size, bytes.
    pub total_vm: u64,
    /// Resident anonymous bytes.
    pub anon_rss: u64,
    /// Resident file bytes.
    pub file_rss: u64,
    /// Resident shared-memory bytes.
    pub shmem_rss: u64,
    /// Page-table bytes.
    pub pgtables: u64,
    /// The victim's `oom_score_adj`.
    pub oom_score_adj: i64,
}

/// An allocation, with the stack of its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alloc {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// When the call returned.
    pub ts_ns: u64,
    /// When the call was entered: realloc-family calls only, else 0.
    pub entry_ts_ns: u64,
    /// The new block.
    pub addr: u64,
    /// Bytes requested.
    pub size: u64,
    /// The allocator function called.
    pub func: AllocFn,
    /// For realloc-family calls on a non-NULL pointer: the block given,
    /// freed by the call (it may equal `addr` when resized in place).
    pub old_addr: Option<u64>,
    /// User return addresses, innermost (the allocator's caller) first.
    /// Empty when the stack could not be captured.
    pub stack: Vec<u64>,
    /// An agent sample's thinning shift (it weighs `2^sample_shift` times
    /// its sampling weight); 0 in exact mode.
    pub sample_shift: u32,
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its kind requires.
    #[error("record of {got} bytes is shorter than the {need} its kind needs")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Written by an eBPF object of another layout version.
    #[error("record has layout version {0}, this memtrace reads {EVENT_ABI}")]
    Version(u16),
    /// A kind this version does not know.
    #[error("record has unknown kind {0}")]
    Kind(u16),
    /// An allocator function this version does not know.
    #[error("allocation record names unknown allocator function {0}")]
    Func(u16),
    /// A field with a value this version does not know.
    #[error("record has unknown {what} {value}")]
    Field {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    // SAFETY: `T` is one of memtrace-common's `#[repr(C)]` integer-only
    // records, valid for any bit pattern; the length was checked, and
    // `read_unaligned` needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn read_u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_ne_bytes(b)
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: Header = read(bytes)?;
    if header.version != EVENT_ABI {
        return Err(DecodeError::Version(header.version));
    }
    let pid = header.tgid;
    match RecordKind::from_u16(header.kind) {
        Some(RecordKind::Alloc) => decode_alloc(bytes),
        Some(RecordKind::AllocStack) => decode_alloc_stack(bytes),
        Some(RecordKind::Free) => {
            let rec: FreeRecord = read(bytes)?;
            Ok(Event::Free {
                pid,
                ts_ns: header.ts_ns,
                addr: rec.addr,
            })
        }
        Some(RecordKind::Exit) => Ok(Event::Exit {
            pid,
            ts_ns: header.ts_ns,
        }),
        Some(RecordKind::Exec) => {
            let r: ExecRecord = read(bytes)?;
            Ok(Event::Exec {
                pid,
                ts_ns: header.ts_ns,
                comm: comm_of(&r.comm),
            })
        }
        Some(RecordKind::Fork) => {
            let r: ForkRecord = read(bytes)?;
            Ok(Event::Fork {
                pid: r.child,
                parent: pid,
                ts_ns: header.ts_ns,
                comm: comm_of(&r.comm),
            })
        }
        Some(RecordKind::Loaded) => Ok(Event::Loaded {
            pid,
            ts_ns: header.ts_ns,
        }),
        Some(RecordKind::Rss) => decode_rss(bytes),
        Some(RecordKind::Vm) => decode_vm(bytes),
        Some(RecordKind::Kmem) => decode_kmem(bytes),
        Some(RecordKind::Oom) => {
            let r: OomRecord = read(bytes)?;
            Ok(Event::Oom(Oom {
                pid,
                ts_ns: header.ts_ns,
                total_vm: r.total_vm_kib << 10,
                anon_rss: r.anon_rss_kib << 10,
                file_rss: r.file_rss_kib << 10,
                shmem_rss: r.shmem_rss_kib << 10,
                pgtables: r.pgtables_kib << 10,
                oom_score_adj: r.oom_score_adj,
            }))
        }
        // Not events of their own: the Python frames of the allocation
        // record that follows, and the code objects they name (see
        // `python`).
        Some(RecordKind::PyStack | RecordKind::PyCode) | None => {
            Err(DecodeError::Kind(header.kind))
        }
    }
}

/// The kind of a record of this version, read from its header.
pub fn kind(bytes: &[u8]) -> Option<RecordKind> {
    RecordKind::from_u16(header(bytes)?.kind)
}

/// The header of a record of this version (`None` for a short record or
/// another version's).
pub fn header(bytes: &[u8]) -> Option<Header> {
    let header: Header = read(bytes).ok()?;
    (header.version == EVENT_ABI).then_some(header)
}

fn decode_alloc(bytes: &[u8]) -> Result<Event, DecodeError> {
    const FIXED: usize = AllocRecord::FIXED_LEN;
    if bytes.len() < FIXED {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: FIXED,
        });
    }
    let header: Header = read(bytes)?;
    let field = |name_offset: usize| read_u64_at(bytes, name_offset);
    let addr = field(std::mem::offset_of!(AllocRecord, addr));
    let size = field(std::mem::offset_of!(AllocRecord, size));
    let old = field(std::mem::offset_of!(AllocRecord, old_addr));
    let entry_ts_ns = field(std::mem::offset_of!(AllocRecord, entry_ts_ns));
    let at = std::mem::offset_of!(AllocRecord, func);
    let func_raw = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
    let at = std::mem::offset_of!(AllocRecord, nframes);
    let nframes = u16::from_ne_bytes([bytes[at], bytes[at + 1]]) as usize;
    let func = AllocFn::from_u16(func_raw).ok_or(DecodeError::Func(func_raw))?;
    let need = FIXED + 8 * nframes;
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    let stack = (0..nframes)
        .map(|i| read_u64_at(bytes, FIXED + 8 * i))
        .collect();
    Ok(alloc_event(
        &header,
        addr,
        size,
        old,
        entry_ts_ns,
        func,
        stack,
    ))
}

/// The event of an allocator function's return; `realloc(old, 0)` that
/// freed `old` is a free.
fn alloc_event(
    header: &Header,
    addr: u64,
    size: u64,
    old: u64,
    entry_ts_ns: u64,
    func: AllocFn,
    stack: Vec<u64>,
) -> Event {
    let pid = header.tgid;
    if addr == 0 {
        // realloc(old, 0): the kernel side only sends this when it freed old.
        return Event::Free {
            pid,
            ts_ns: header.ts_ns,
            addr: old,
        };
    }
    Event::Alloc(Alloc {
        pid,
        tid: header.tid,
        ts_ns: header.ts_ns,
        entry_ts_ns,
        addr,
        size,
        func,
        old_addr: (func.is_realloc() && old != 0).then_some(old),
        stack,
        sample_shift: header.sample_shift,
    })
}

/// An [`AllocStackRecord`] as an event whose stack is empty: the session
/// fills it in by unwinding the copy [`raw_stack`] gives.
fn decode_alloc_stack(bytes: &[u8]) -> Result<Event, DecodeError> {
    // Checks the lengths.
    raw_stack(bytes)?;
    let header: Header = read(bytes)?;
    let field = |offset: usize| read_u64_at(bytes, offset);
    let at = std::mem::offset_of!(AllocStackRecord, func);
    let func_raw = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
    let func = AllocFn::from_u16(func_raw).ok_or(DecodeError::Func(func_raw))?;
    Ok(alloc_event(
        &header,
        field(std::mem::offset_of!(AllocStackRecord, addr)),
        field(std::mem::offset_of!(AllocStackRecord, size)),
        field(std::mem::offset_of!(AllocStackRecord, old_addr)),
        field(std::mem::offset_of!(AllocStackRecord, entry_ts_ns)),
        func,
        Vec::new(),
    ))
}

/// A user stack copied by the kernel side, for user space to unwind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawStack<'a> {
    /// The return address into the allocator's caller.
    pub rip: u64,
    /// The caller's stack pointer: where `bytes` start.
    pub rsp: u64,
    /// The caller's `rbp`.
    pub rbp: u64,
    /// The stack from `rsp` up.
    pub bytes: &'a [u8],
}

/// The copied stack of an [`AllocStackRecord`]; an error for a record of
/// another kind.
pub fn raw_stack(bytes: &[u8]) -> Result<RawStack<'_>, DecodeError> {
    const FIXED: usize = AllocStackRecord::FIXED_LEN;
    let header: Header = read(bytes)?;
    if header.kind != RecordKind::AllocStack as u16 {
        return Err(DecodeError::Kind(header.kind));
    }
    if bytes.len() < FIXED {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: FIXED,
        });
    }
    let at = std::mem::offset_of!(AllocStackRecord, stack_len);
    let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    if len > STACK_COPY {
        return Err(DecodeError::Field {
            what: "stack length",
            value: len as u64,
        });
    }
    let stack = bytes
        .get(FIXED..FIXED + len)
        .ok_or(DecodeError::Truncated {
            got: bytes.len(),
            need: FIXED + len,
        })?;
    Ok(RawStack {
        rip: read_u64_at(bytes, std::mem::offset_of!(AllocStackRecord, rip)),
        rsp: read_u64_at(bytes, std::mem::offset_of!(AllocStackRecord, rsp)),
        rbp: read_u64_at(bytes, std::mem::offset_of!(AllocStackRecord, rbp)),
        bytes: stack,
    })
}

/// Reads a variable-length record: its fixed part as `T` (whose trailing
/// `frames` array may be cut short) and `nframes` frames after `fixed`.
fn read_with_frames<T: Copy>(
    bytes: &[u8],
    fixed: usize,
    nframes: impl Fn(&T) -> u16,
) -> Result<(T, Vec<u64>), DecodeError> {
    if bytes.len() < fixed {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: fixed,
        });
    }
    // Pad to the full size so the fixed part can be read as a `T`.
    let mut full = vec![0u8; size_of::<T>()];
    let n = bytes.len().min(full.len());
    full[..n].copy_from_slice(&bytes[..n]);
    let rec: T = read(&full)?;
    let frames = (nframes(&rec) as usize).min(MAX_FRAMES);
    let need = fixed + 8 * frames;
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    let stack = (0..frames)
        .map(|i| read_u64_at(bytes, fixed + 8 * i))
        .collect();
    Ok((rec, stack))
}

fn decode_rss(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (r, stack) = read_with_frames::<RssRecord>(bytes, RssRecord::FIXED_LEN, |r| r.nframes)?;
    let member = RssMember::from_u32(r.member).ok_or(DecodeError::Field {
        what: "RSS member",
        value: r.member.into(),
    })?;
    Ok(Event::Rss(Rss {
        pid: r.header.tgid,
        ts_ns: r.header.ts_ns,
        member,
        bytes: r.bytes.max(0) as u64,
        delta: r.delta,
        fault: (r.flags & RSS_FAULT != 0).then_some(r.fault_addr),
        sampled: r.flags & RSS_SAMPLED != 0,
        stack,
    }))
}

fn decode_vm(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (r, stack) = read_with_frames::<VmRecord>(bytes, VmRecord::FIXED_LEN, |r| r.nframes)?;
    let op = VmOp::from_u16(r.op).ok_or(DecodeError::Field {
        what: "address-space syscall",
        value: r.op.into(),
    })?;
    let call = match op {
        VmOp::Mmap => VmCall::Mmap {
            addr: r.ret,
            len: r.len,
            prot: r.arg3 as u32,
            flags: r.arg4 as u32,
            fd: r.arg5 as i32,
        },
        VmOp::Munmap => VmCall::Munmap {
            addr: r.addr,
            len: r.len,
        },
        VmOp::Mremap => VmCall::Mremap {
            old_addr: r.addr,
            old_len: r.len,
            new_addr: r.ret,
            new_len: r.arg3,
        },
        VmOp::Brk => VmCall::Brk {
            requested: r.addr,
            brk: r.ret,
        },
        VmOp::Madvise => VmCall::Madvise {
            addr: r.addr,
            len: r.len,
            advice: r.arg3 as u32,
        },
    };
    Ok(Event::Vm(Vm {
        pid: r.header.tgid,
        ts_ns: r.header.ts_ns,
        call,
        by_allocator: r.by_allocator != 0,
        stack,
    }))
}

fn decode_kmem(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (r, stack) = read_with_frames::<KmemRecord>(bytes, KmemRecord::FIXED_LEN, |r| r.nframes)?;
    let known = |v: u64, what| {
        u16::try_from(v)
            .ok()
            .and_then(KmemOp::from_u16)
            .ok_or(DecodeError::Field { what, value: v })
    };
    Ok(Event::Kmem(Kmem {
        pid: r.header.tgid,
        ts_ns: r.header.ts_ns,
        op: known(r.op.into(), "kernel allocation op")?,
        space: known(r.space, "kernel allocation space")?,
        addr: r.addr,
        bytes_req: r.bytes_req,
        bytes_alloc: r.bytes_alloc,
        stack,
    }))
}

/// Encodes an allocation as the kernel side writes it (for tests and
/// benchmarks of the decoder).
pub fn encode_alloc(a: &Alloc) -> Vec<u8> {
    let mut rec = AllocRecord {
        header: Header {
            version: EVENT_ABI,
            kind: RecordKind::Alloc as u16,
            tgid: a.pid,
            tid: a.tid,
            sample_shift: 0,
            ts_ns: a.ts_ns,
        },
        addr: a.addr,
        size: a.size,
        old_addr: a.old_addr.unwrap_or(0),
        entry_ts_ns: a.entry_ts_ns,
        func: a.func as u16,
        nframes: a.stack.len() as u16,
        stack_err: 0,
        frames: [0; MAX_FRAMES],
    };
    rec.frames[..a.stack.len()].copy_from_slice(&a.stack);
    bytes_of(&rec)[..AllocRecord::FIXED_LEN + 8 * a.stack.len()].to_vec()
}

/// A record as the kernel side writes it: its bytes. Only for the
/// `#[repr(C)]` records of `memtrace_common`, which have no padding.
fn bytes_of<T: Copy>(rec: &T) -> &[u8] {
    // SAFETY: `T` is a plain-data record without padding (every caller
    // passes a `memtrace_common` record), so all its bytes are initialized.
    unsafe { std::slice::from_raw_parts((rec as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Encodes `free(addr)` as the kernel side writes it (for tests and
/// benchmarks of the decoder).
pub fn encode_free(pid: u32, tid: u32, ts_ns: u64, addr: u64) -> Vec<u8> {
    let rec = FreeRecord {
        header: Header {
            version: EVENT_ABI,
            kind: RecordKind::Free as u16,
            tgid: pid,
            tid,
            sample_shift: 0,
            ts_ns,
        },
        addr,
    };
    bytes_of(&rec).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn alloc() -> Alloc {
        Alloc {
            pid: 7,
            tid: 8,
            ts_ns: 100,
            entry_ts_ns: 90,
            addr: 0x1000,
            size: 64,
            func: AllocFn::Malloc,
            old_addr: None,
            stack: vec![0x401000, 0x402000],
            sample_shift: 0,
        }
    }

    #[test]
    fn alloc_round_trips() {
        let a = alloc();
        assert_eq!(decode(&encode_alloc(&a)), Ok(Event::Alloc(a)));
    }

    /// A record header at time 100.
    fn header(kind: RecordKind, tgid: u32, tid: u32) -> Header {
        Header {
            version: EVENT_ABI,
            kind: kind as u16,
            tgid,
            tid,
            sample_shift: 0,
            ts_ns: 100,
        }
    }

    #[test]
    fn a_fork_names_the_child_and_its_parent() {
        let mut r = ForkRecord {
            header: header(RecordKind::Fork, 7, 9),
            child: 12,
            _pad: 0,
            comm: [0; 16],
        };
        r.comm[..4].copy_from_slice(b"make");
        assert_eq!(
            decode(bytes_of(&r)),
            Ok(Event::Fork {
                pid: 12,
                parent: 7,
                ts_ns: 100,
                comm: Some("make".into()),
            })
        );
    }

    #[test]
    fn an_exec_carries_the_new_programs_name() {
        let mut r = ExecRecord {
            header: header(RecordKind::Exec, 7, 7),
            comm: [0; 16],
        };
        r.comm[..12].copy_from_slice(b"rust_fixture");
        let exec = |comm: Option<&str>| Event::Exec {
            pid: 7,
            ts_ns: 100,
            comm: comm.map(str::to_string),
        };
        assert_eq!(decode(bytes_of(&r)), Ok(exec(Some("rust_fixture"))));
        r.comm = [0; 16];
        assert_eq!(decode(bytes_of(&r)), Ok(exec(None)));
    }

    #[test]
    fn realloc_to_zero_is_a_free() {
        let a = Alloc {
            func: AllocFn::Realloc,
            addr: 0,
            size: 0,
            old_addr: Some(0x5000),
            ..alloc()
        };
        assert_eq!(
            decode(&encode_alloc(&a)),
            Ok(Event::Free {
                pid: 7,
                ts_ns: 100,
                addr: 0x5000
            })
        );
    }

    #[test]
    fn truncated_and_foreign_records_are_errors() {
        let bytes = encode_alloc(&alloc());
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&bytes[..10]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert_eq!(decode(&wrong), Err(DecodeError::Version(99)));
        let mut kind = bytes;
        kind[2] = 42;
        assert_eq!(decode(&kind), Err(DecodeError::Kind(42)));
    }
}

/// The decoder on bytes the kernel never wrote (proptest: a short run in
/// every `cargo test`; `PROPTEST_CASES=100000` for a long one): an error or
/// an event, never a panic, and never more frames than a record can hold.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn header(kind: u16) -> Vec<u8> {
        let h = Header {
            version: EVENT_ABI,
            kind,
            tgid: 7,
            tid: 7,
            sample_shift: 0,
            ts_ns: 100,
        };
        // SAFETY: a `#[repr(C)]` record of integers, viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts((&h as *const Header).cast::<u8>(), size_of::<Header>())
        }
        .to_vec()
    }

    fn frames_ok(ev: &Event) -> bool {
        ev.stack().is_none_or(|s| s.len() <= MAX_FRAMES)
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(ev) = decode(&bytes) {
                prop_assert!(frames_ok(&ev));
            }
        }

        #[test]
        fn any_body_behind_a_valid_header_decodes_or_fails(
            kind in 0u16..12,
            body in prop::collection::vec(any::<u8>(), 0..1400),
        ) {
            let mut bytes = header(kind);
            bytes.extend_from_slice(&body);
            if let Ok(ev) = decode(&bytes) {
                prop_assert!(frames_ok(&ev));
            }
        }

        #[test]
        fn damaged_alloc_records_decode_or_fail(
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..6),
            keep in any::<prop::sample::Index>(),
            frames in prop::collection::vec(any::<u64>(), 0..40),
        ) {
            let a = Alloc {
                stack: frames,
                ..super::tests::alloc()
            };
            let mut bytes = encode_alloc(&a);
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            bytes.truncate(keep.index(bytes.len() + 1));
            if let Ok(ev) = decode(&bytes) {
                prop_assert!(frames_ok(&ev));
            }
        }
    }
}
