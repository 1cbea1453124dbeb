//! Record types shared by memtrace's eBPF programs and its user-space reader.
//!
//! Everything here is `#[repr(C)]`, fixed-width and free of implicit padding, so
//! the bytes the kernel side writes into the ring buffer are exactly the bytes
//! user space decodes. This crate holds layouts and numbering only: no logic
//! beyond constants and conversions. Decoding lives in `memtrace-user`.
//!
//! Every record starts with a [`Header`]; its `kind` says which layout follows.
//! Numbers of kinds, allocator functions and loss counters are part of the wire
//! format: they are never renumbered, new ones go at the end, and a change of
//! layout bumps [`EVENT_ABI`].
#![no_std]
#![deny(missing_docs)]

/// Version of the record layout. The loader refuses an eBPF object that
/// speaks another version.
pub const EVENT_ABI: u16 = 7;

/// Deepest user stack a record carries (the kernel's default
/// `perf_event_max_stack`).
pub const MAX_FRAMES: usize = 127;

/// Deepest nesting of allocator calls one thread may have in flight.
/// glibc and libstdc++ nest up to 4 deep (`new (std::nothrow) T[]` →
/// `new[]` → `new` → `malloc`); 6 leaves room for wrappers.
pub const MAX_NEST: usize = 6;

/// Start of every record in the ring buffer (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// [`EVENT_ABI`] of the writer.
    pub version: u16,
    /// A [`RecordKind`] discriminant.
    pub kind: u16,
    /// Process id (thread-group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// An agent sample ([`RecordKind::Alloc`] or [`RecordKind::AllocStack`]
    /// in sampled mode): its process's thinning shift when it was taken (its
    /// sample point was kept with probability `2^-sample_shift`, see
    /// [`Budget`]). Zero in every other record.
    pub sample_shift: u32,
    /// `bpf_ktime_get_ns()` when the record was made (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}

/// What follows the [`Header`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// An [`AllocRecord`]: an allocator function returned (malloc family,
    /// realloc family, operator new family).
    Alloc = 1,
    /// A [`FreeRecord`]: `free` was entered with a non-NULL pointer.
    Free = 2,
    /// Header only: the last thread of a process exited.
    Exit = 3,
    /// An [`RssRecord`]: one of a process's resident-memory counters changed
    /// (`kmem:rss_stat`).
    Rss = 4,
    /// A [`VmRecord`]: an address-space syscall returned (mmap, munmap,
    /// mremap, brk, madvise).
    Vm = 5,
    /// A [`KmemRecord`]: the kernel allocated or freed memory in the
    /// context of a traced process (`--kernel`).
    Kmem = 6,
    /// An [`OomRecord`]: the OOM killer chose a traced process.
    Oom = 7,
    /// An [`ExecRecord`]: the process called execve and now runs a new
    /// program in a new address space.
    Exec = 8,
    /// A [`ForkRecord`]: a followed process created a child process
    /// (`--follow-forks`).
    Fork = 9,
    /// Header only: the dynamic loader of a traced process finished mapping
    /// libraries (`_dl_debug_state`). The process is stopped (SIGSTOP)
    /// until user space has probed any new allocator library and sent
    /// SIGCONT.
    Loaded = 10,
    /// An [`AllocStackRecord`]: an allocator function returned in a process
    /// whose stacks user space unwinds with DWARF CFI (`--unwind dwarf`).
    AllocStack = 11,
    /// A [`PyStackRecord`]: the Python frames of the thread whose allocation
    /// record follows it (CPython processes listed in the `PYTHON` map).
    PyStack = 12,
    /// A [`PyCodeRecord`]: what the kernel side copied of a code object the
    /// first time a process's Python stack held it (before that stack).
    PyCode = 13,
}

impl RecordKind {
    /// The kind for a wire discriminant, if it is one this version knows.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Alloc),
            2 => Some(Self::Free),
            3 => Some(Self::Exit),
            4 => Some(Self::Rss),
            5 => Some(Self::Vm),
            6 => Some(Self::Kmem),
            7 => Some(Self::Oom),
            8 => Some(Self::Exec),
            9 => Some(Self::Fork),
            10 => Some(Self::Loaded),
            11 => Some(Self::AllocStack),
            12 => Some(Self::PyStack),
            13 => Some(Self::PyCode),
            _ => None,
        }
    }
}

/// The allocator entry points memtrace probes.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocFn {
    /// `malloc(size)`
    Malloc = 1,
    /// `calloc(nmemb, size)`
    Calloc = 2,
    /// `realloc(ptr, size)`
    Realloc = 3,
    /// `reallocarray(ptr, nmemb, size)`
    Reallocarray = 4,
    /// `posix_memalign(&ptr, align, size)`
    PosixMemalign = 5,
    /// `aligned_alloc(align, size)`; in glibc the same code as `memalign`.
    AlignedAlloc = 6,
    /// `memalign(align, size)`
    Memalign = 7,
    /// `valloc(size)`
    Valloc = 8,
    /// `pvalloc(size)`
    Pvalloc = 9,
    /// C++ `operator new` / `operator new[]` and their nothrow and aligned
    /// variants (size is the first argument of every one).
    OperatorNew = 10,
    /// A free that runs code of its own: C++ `operator delete` variants and
    /// jemalloc's `dallocx`/`sdallocx` in an allocator library (pointer
    /// first). Probed at entry and return, so a `free` they call is nested and
    /// counts once; the free is recorded at the return. Never in an
    /// allocation record.
    Delete = 11,
    /// Rust's `__rust_realloc(ptr, old_size, align, new_size)`: a realloc
    /// whose new size is the fourth argument.
    RustRealloc = 12,
    /// CPython's `PyObject_Malloc(size)` or `PyMem_Malloc(size)`: its own
    /// allocator (pymalloc serves blocks of up to 512 bytes from its arenas;
    /// larger ones come from `malloc`, nested and so not counted twice).
    PyMalloc = 13,
    /// `PyObject_Calloc(nelem, elsize)` or `PyMem_Calloc`.
    PyCalloc = 14,
    /// `PyObject_Realloc(ptr, size)` or `PyMem_Realloc`.
    PyRealloc = 15,
}

impl AllocFn {
    /// Every allocator function, in wire order.
    pub const ALL: [AllocFn; 15] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Reallocarray,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
        Self::OperatorNew,
        Self::Delete,
        Self::RustRealloc,
        Self::PyMalloc,
        Self::PyCalloc,
        Self::PyRealloc,
    ];

    /// The function for a wire discriminant.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|f| *f as u16 == v)
    }

    /// The C name (the family name for `operator new`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Reallocarray => "reallocarray",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::OperatorNew => "operator new",
            Self::Delete => "operator delete",
            Self::RustRealloc => "__rust_realloc",
            Self::PyMalloc => "PyObject_Malloc",
            Self::PyCalloc => "PyObject_Calloc",
            Self::PyRealloc => "PyObject_Realloc",
        }
    }

    /// Whether the call frees its pointer argument (the realloc family).
    pub fn is_realloc(self) -> bool {
        matches!(
            self,
            Self::Realloc | Self::Reallocarray | Self::RustRealloc | Self::PyRealloc
        )
    }

    /// Whether the function is CPython's own allocator (`PyObject_*`,
    /// `PyMem_*`), reported as a category of its own.
    pub fn is_python(self) -> bool {
        matches!(self, Self::PyMalloc | Self::PyCalloc | Self::PyRealloc)
    }
}

/// An allocator function returned. Written at the return probe, so the stack
/// starts at the caller's return address and the caller's frame is intact.
///
/// Only `nframes` entries of `frames` are sent: the record is variable-length
/// and [`AllocRecord::FIXED_LEN`] bytes plus `8 * nframes` long.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AllocRecord {
    /// Common header; `kind` is [`RecordKind::Alloc`].
    pub header: Header,
    /// The pointer returned (for `posix_memalign`, the one it stored). Zero
    /// only for `realloc(ptr, 0)`, which freed `old_addr`.
    pub addr: u64,
    /// Bytes requested (`nmemb * size` for calloc and reallocarray).
    pub size: u64,
    /// The pointer a realloc-family call was given; zero otherwise.
    pub old_addr: u64,
    /// `bpf_ktime_get_ns()` at the entry of a realloc-family call (zero for
    /// the others). User space needs it to order a realloc's implicit free
    /// against allocations of other threads.
    pub entry_ts_ns: u64,
    /// An [`AllocFn`] discriminant.
    pub func: u16,
    /// Number of valid entries in `frames`.
    pub nframes: u16,
    /// Negative errno of the stack capture when `nframes` is 0, else 0.
    pub stack_err: i32,
    /// User return addresses, innermost (the allocator's caller) first.
    pub frames: [u64; MAX_FRAMES],
}

impl AllocRecord {
    /// Length of the record without frames.
    pub const FIXED_LEN: usize = core::mem::offset_of!(AllocRecord, frames);
}

/// The most user stack an [`AllocStackRecord`] carries: four pages.
pub const STACK_COPY: usize = 16384;

/// An allocator function returned in a process unwound by user space: the
/// fields of an [`AllocRecord`], then the caller's registers and a copy of
/// its stack from `rsp` up, which user space walks with the binaries' CFI
/// (`.eh_frame`). For code without frame pointers, where the kernel's walk
/// stops at the first frame.
///
/// Variable-length: [`AllocStackRecord::FIXED_LEN`] bytes plus `stack_len`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AllocStackRecord {
    /// Common header; `kind` is [`RecordKind::AllocStack`].
    pub header: Header,
    /// As in [`AllocRecord`].
    pub addr: u64,
    /// As in [`AllocRecord`].
    pub size: u64,
    /// As in [`AllocRecord`].
    pub old_addr: u64,
    /// As in [`AllocRecord`].
    pub entry_ts_ns: u64,
    /// An [`AllocFn`] discriminant.
    pub func: u16,
    /// Zero.
    pub _pad: u16,
    /// Bytes of `stack` copied (up to [`STACK_COPY`]): fewer where the
    /// stack ends sooner (an unmapped page stops the copy).
    pub stack_len: u32,
    /// The return address into the allocator's caller (the caller's `rip`
    /// at the return probe).
    pub rip: u64,
    /// The caller's stack pointer after the return.
    pub rsp: u64,
    /// The caller's `rbp` (a frame pointer or not).
    pub rbp: u64,
    /// The stack from `rsp` up. One page more than [`STACK_COPY`], so the
    /// copy's page-sized pieces stay in bounds at any offset the verifier
    /// can prove.
    pub stack: [u8; STACK_COPY + 4096],
}

impl AllocStackRecord {
    /// Length of the record without its stack.
    pub const FIXED_LEN: usize = core::mem::offset_of!(AllocStackRecord, stack);
}

/// Deepest Python stack a [`PyStackRecord`] carries: the innermost frames
/// of a deeper one, counted as cut. (The kernel's verifier follows each
/// turn of the walk: 128 frames cost a second and a half more at start.)
pub const MAX_PY_FRAMES: usize = 64;

/// One frame of a Python stack, as the kernel side reads it from the
/// interpreter's frame chain. User space resolves `code` (a `PyCodeObject`
/// address) to a function and file by reading the process's memory, and
/// `lasti` to a line with the code object's line table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    /// Address of the frame's code object.
    pub code: u64,
    /// Index (in code units) of the instruction the frame last ran, from
    /// the start of its bytecode; `u32::MAX` when it has run none.
    pub lasti: u32,
    /// The code object's stamp ([`py_code_stamp`], bits 0-29), which tells
    /// a code object from a later one at the same address; bit 31
    /// ([`PY_FRAME_ENTRY`]) set when C code entered the interpreter at this
    /// frame (one native `_PyEval_EvalFrameDefault` call runs this frame and
    /// the frames it called without leaving the loop); bit 30
    /// ([`PY_FRAME_SHIM`]) for a frame that runs no code of its own.
    pub info: u32,
}

/// Bits of [`PyFrame::info`] that hold the code object's stamp.
pub const PY_STAMP_MASK: u32 = (1 << 30) - 1;

/// What tells a code object from another that later stands at the same
/// address: its first line and its file name object, mixed into 30 bits.
/// Both sides compute it, the kernel side from the frame's code object, user
/// space from what it read of it. (Two modules' `<module>` code objects
/// both start at line 1; their file names differ.)
#[inline(always)]
pub fn py_code_stamp(first_line: u32, filename: u64) -> u32 {
    let mixed = (filename >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 34;
    (first_line ^ mixed as u32) & PY_STAMP_MASK
}

/// [`PyFrame::info`] bit: the frame was entered from C.
pub const PY_FRAME_ENTRY: u32 = 1 << 31;

/// [`PyFrame::info`] bit: the frame is the interpreter's shim for a call
/// from C (3.12+), not Python code.
pub const PY_FRAME_SHIM: u32 = 1 << 30;

/// The Python frames of a thread, innermost first, written just before the
/// record of the allocation they belong to (same thread, same `addr`).
///
/// Variable-length: [`PyStackRecord::FIXED_LEN`] bytes plus 16 per frame.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PyStackRecord {
    /// Common header; `kind` is [`RecordKind::PyStack`].
    pub header: Header,
    /// The block the allocation record that follows returns, which pairs
    /// the two (the allocation record may be lost to a full ring buffer).
    pub addr: u64,
    /// Number of valid entries in `frames`.
    pub nframes: u16,
    /// 1 when the chain went on past [`MAX_PY_FRAMES`] frames.
    pub truncated: u16,
    /// Zero, or a [`PyWalkError`] when no frame could be read.
    pub err: u32,
    /// Innermost (the running frame) first.
    pub frames: [PyFrame; MAX_PY_FRAMES],
}

impl PyStackRecord {
    /// Length of the record without frames.
    pub const FIXED_LEN: usize = core::mem::offset_of!(PyStackRecord, frames);
}

/// Why a thread's Python stack could not be read (`PyStackRecord::err`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyWalkError {
    /// No thread state of the interpreter belongs to this thread (a thread
    /// Python did not start and that never called into it).
    NoThreadState = 1,
    /// The interpreter's memory could not be read where the layout said.
    Unreadable = 2,
}

/// Where one CPython version keeps what the frame walk reads, and where
/// this process's interpreter is: the value of the kernel side's `PYTHON`
/// map, keyed by process id. Offsets are in bytes; user space fills them
/// from its per-version tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyConfig {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u32,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u32,
    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id`.
    pub tstate_native_thread_id: u32,
    /// `PyThreadState.cframe`.
    pub tstate_cframe: u32,
    /// `_PyCFrame.current_frame`.
    pub cframe_current_frame: u32,
    /// `_PyInterpreterFrame.f_code`.
    pub frame_code: u32,
    /// `_PyInterpreterFrame.previous`.
    pub frame_previous: u32,
    /// `_PyInterpreterFrame.prev_instr`.
    pub frame_prev_instr: u32,
    /// `_PyInterpreterFrame.is_entry` (a byte).
    pub frame_is_entry: u32,
    /// `_PyInterpreterFrame.owner` (a byte).
    pub frame_owner: u32,
    /// The `owner` value of a frame that is a C stack shim (3.12 and
    /// later; 255 where there is none).
    pub owner_cstack: u32,
    /// `PyCodeObject.co_firstlineno`.
    pub code_firstlineno: u32,
    /// `PyCodeObject.co_code_adaptive`: where the bytecode starts.
    pub code_bytecode: u32,
    /// `PyCodeObject.co_filename`.
    pub code_filename: u32,
    /// `PyCodeObject.co_qualname`.
    pub code_qualname: u32,
    /// `PyCodeObject.co_linetable`.
    pub code_linetable: u32,
    /// `PyASCIIObject.length` (characters).
    pub str_length: u32,
    /// Where the characters of a compact non-ASCII `str` start (those of an
    /// ASCII one start earlier): with 4 bytes a character, a bound of the
    /// object's size.
    pub str_compact_data: u32,
    /// `PyVarObject.ob_size` of a `bytes`.
    pub bytes_size: u32,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u32,
    /// Zero.
    pub _pad: u32,
}

/// Bytes of a `str` object (header and characters) a [`PyCodeRecord`]
/// carries at most.
pub const PY_STR_COPY: usize = 512;

/// Bytes of a `bytes` object (the line table) a [`PyCodeRecord`] carries
/// at most: longer tables are cut (user space reads the rest from the
/// process if it can).
pub const PY_TABLE_COPY: usize = 4096;

/// A copy of the objects that name a code object (qualified name, file
/// name, line table), made by the kernel side the first time one of a
/// process's Python stacks holds it: user space reads code objects from
/// the process's memory, but a code object may be gone by then (a
/// module's body is freed once it has run, and a process may exit).
/// Written just before the [`PyStackRecord`] that holds the code object.
///
/// Variable-length: up to the end of `table`'s copied bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PyCodeRecord {
    /// Common header; `kind` is [`RecordKind::PyCode`].
    pub header: Header,
    /// Address of the code object.
    pub code: u64,
    /// Its [`py_code_stamp`].
    pub stamp: u32,
    /// Its `co_firstlineno`.
    pub first_line: u32,
    /// Address of its `co_qualname`.
    pub name_addr: u64,
    /// Address of its `co_filename`.
    pub file_addr: u64,
    /// Address of its `co_linetable`.
    pub table_addr: u64,
    /// Bytes copied of `name`, from the object's start (0 when it could
    /// not be read).
    pub name_len: u32,
    /// Bytes copied of `file`, likewise.
    pub file_len: u32,
    /// Bytes copied of `table`, likewise.
    pub table_len: u32,
    /// Zero.
    pub _pad: u32,
    /// The `co_qualname` object.
    pub name: [u8; PY_STR_COPY],
    /// The `co_filename` object.
    pub file: [u8; PY_STR_COPY],
    /// The `co_linetable` object.
    pub table: [u8; PY_TABLE_COPY],
}

impl PyCodeRecord {
    /// Length of the record without the line table.
    pub const FIXED_LEN: usize = core::mem::offset_of!(PyCodeRecord, table);
}

/// `free(addr)` was entered with a non-NULL pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeRecord {
    /// Common header; `kind` is [`RecordKind::Free`].
    pub header: Header,
    /// The pointer being freed.
    pub addr: u64,
}

/// One call in flight on a thread: stashed at entry, taken at return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    /// Stack pointer at entry (it points at the return address); the return
    /// probe sees `sp + 8`. Tells nested calls and stale entries apart.
    pub sp: u64,
    /// Bytes requested.
    pub size: u64,
    /// realloc: the old pointer; posix_memalign: where the result is stored.
    pub arg: u64,
    /// Entry time (exact mode reads it for reallocs only). Sampled mode:
    /// the return address the call will return to. A uprobe session runs
    /// one program at entry and at return; at return the instruction
    /// pointer is this address and the stack pointer 8 above the entry's,
    /// which tells the two runs apart.
    pub ts_ns: u64,
    /// An [`AllocFn`] discriminant.
    pub func: u16,
    /// 1 when the call is nested in another traced call and emits nothing.
    pub nested: u16,
    /// Sampled mode: [`SAMPLE_OLD`] and [`SAMPLE_NEW`], and the thinning
    /// shift from bit [`SAMPLE_SHIFT_AT`]; zero otherwise.
    pub flags: u32,
}

/// Per-thread stack of allocator calls in flight, keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightStack {
    /// Number of valid entries in `calls`.
    pub depth: u64,
    /// Outermost call first.
    pub calls: [Inflight; MAX_NEST],
}

/// Loss and anomaly counters kept by the eBPF side, one slot each in a
/// per-CPU array. Every one of them is printed in every report.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A record could not be written: the ring buffer was full.
    RingbufFull = 0,
    /// An allocation was recorded without its stack (capture failed).
    StackLost = 1,
    /// A return probe found no matching entry for its thread.
    ReturnWithoutEntry = 2,
    /// The per-thread in-flight table was full, or nesting went deeper than
    /// [`MAX_NEST`]; the call was not traced.
    InflightFull = 3,
    /// An entry was dropped because its call never returned through the
    /// probe (longjmp or an exception unwinding through an allocator).
    StaleInflight = 4,
    /// Traced calls (entries of allocator functions and frees), whether or
    /// not they emitted a record; a measure of load, not a loss.
    Calls = 5,
    /// The per-thread table of address-space syscalls in flight was full;
    /// the call was not traced.
    VmInflightFull = 6,
    /// The table of live kernel allocations was full; an allocation was not
    /// tracked, and its free will not be seen.
    KmemTableFull = 7,
    /// A record the full ring buffer dropped could not be counted by call
    /// site either (the lost-records table was full): it is in
    /// `ringbuf_full` only.
    LostTableFull = 8,
    /// A child of a followed process (`--follow-forks`) was not followed:
    /// the table of traced processes was full.
    TracedFull = 9,
    /// The Python stack of an allocation could not be written (the ring
    /// buffer was full): the allocation, if recorded, shows native frames
    /// only.
    PyStackLost = 10,
}

/// Number of [`Counter`] slots.
pub const COUNTERS: u32 = 11;

/// Size of the table of processes traced by pid (`--pid`, a command, and
/// the children followed with `--follow-forks`).
pub const TRACED_PIDS: u32 = 16384;

/// Size of the table of allocator records lost to a full ring buffer, by
/// process and call site (key `[tgid, call site]`, value `[count, bytes]`;
/// call site 0 counts the process's lost frees).
pub const LOST_SITES: u32 = 16384;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTERS as usize] = [
        Self::RingbufFull,
        Self::StackLost,
        Self::ReturnWithoutEntry,
        Self::InflightFull,
        Self::StaleInflight,
        Self::Calls,
        Self::VmInflightFull,
        Self::KmemTableFull,
        Self::LostTableFull,
        Self::TracedFull,
        Self::PyStackLost,
    ];

    /// The name used in reports (snake case, stable).
    pub fn name(self) -> &'static str {
        match self {
            Self::RingbufFull => "ringbuf_full",
            Self::StackLost => "stack_lost",
            Self::ReturnWithoutEntry => "return_without_entry",
            Self::InflightFull => "inflight_full",
            Self::StaleInflight => "stale_inflight",
            Self::Calls => "calls",
            Self::VmInflightFull => "vm_inflight_full",
            Self::KmemTableFull => "kmem_table_full",
            Self::LostTableFull => "lost_table_full",
            Self::TracedFull => "traced_full",
            Self::PyStackLost => "python_stack_lost",
        }
    }
}

/// Sampled mode (the agent's allocator tier), an in-flight call: the old
/// block of a realloc-like call was sampled, so its free is forwarded.
pub const SAMPLE_OLD: u32 = 1;

/// Sampled mode, an in-flight call: the new block was chosen as a sample.
pub const SAMPLE_NEW: u32 = 2;

/// Number of exponential draws the loader puts in the sampler's table: the
/// byte distance to the next sample is one of them, chosen at random.
pub const EXP_DRAWS: u32 = 4096;

/// Most address ranges of allocator code kept per sampled process (see
/// [`AllocatorRanges`]).
pub const MAX_ALLOCATOR_RANGES: usize = 8;

/// The executable ranges of the allocator libraries probed in one sampled
/// process, `[start, end)` pairs, unused ones zero. A probed function called
/// from inside one of them (glibc's `memalign` calling `malloc`,
/// libstdc++'s `operator new` calling `malloc`) is the same block already
/// counted by its caller, and is skipped without a return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorRanges {
    /// `[start, end)` of each range.
    pub ranges: [[u64; 2]; MAX_ALLOCATOR_RANGES],
}

/// Per-process state of the sampled tier's record budget: at most about
/// the loader's number of samples per second, so one flooding process cannot
/// fill the ring buffer for the others, without a bias. A process over its
/// budget keeps each later sample point with probability `2^-shift` (one
/// more halving each time a second's budget is spent again, one less after a
/// second under a quarter of it), and every sample carries the shift it was
/// kept with ([`Header::sample_shift`]), so user space weighs it `2^shift`
/// times more: every allocation's chance stays known and non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Start of the current one-second window (`bpf_ktime_get_ns`).
    pub window_ns: u64,
    /// Samples kept in it.
    pub used: u64,
    /// The thinning shift now.
    pub shift: u64,
    /// The highest shift so far.
    pub max_shift: u64,
    /// Sample points not kept by the thinning, since the start.
    pub thinned: u64,
    /// Samples lost because the table of sampled blocks was full, since
    /// the start (a hole in the estimates: not weighed for).
    pub table_full: u64,
}

/// The highest thinning shift: one sample point in 2^20 kept.
pub const MAX_SAMPLE_SHIFT: u64 = 20;

/// Where a sampled call's thinning shift sits in [`Inflight::flags`].
pub const SAMPLE_SHIFT_AT: u32 = 8;

/// Counters of the sampled tier, one slot each in a per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleCounter {
    /// Calls of probed allocator functions in sampled processes.
    Calls = 0,
    /// Sample points that fell in an allocation (before the thinning and
    /// the table check).
    Sampled = 1,
    /// Calls from inside an allocator library, skipped (counted by their
    /// caller).
    Internal = 2,
    /// Samples not kept: the table of sampled live blocks was full.
    TableFull = 3,
    /// Sample points not kept by a process's thinning under its budget
    /// (the kept ones weigh for them: no bias, more variance).
    BudgetThinned = 4,
    /// Frees of sampled blocks, forwarded.
    FreesForwarded = 5,
}

/// Number of [`SampleCounter`] slots.
pub const SAMPLE_COUNTERS: u32 = 6;

impl SampleCounter {
    /// Every counter, in slot order.
    pub const ALL: [SampleCounter; SAMPLE_COUNTERS as usize] = [
        Self::Calls,
        Self::Sampled,
        Self::Internal,
        Self::TableFull,
        Self::BudgetThinned,
        Self::FreesForwarded,
    ];

    /// The name used in reports and metrics (snake case, stable).
    pub fn name(self) -> &'static str {
        match self {
            Self::Calls => "calls",
            Self::Sampled => "sampled",
            Self::Internal => "internal",
            Self::TableFull => "sample_table_full",
            Self::BudgetThinned => "budget_thinned",
            Self::FreesForwarded => "frees_forwarded",
        }
    }
}

/// The kernel's RSS counters (`enum { MM_FILEPAGES, ... }` in `mm_types.h`),
/// numbered as `kmem:rss_stat`'s `member` field numbers them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RssMember {
    /// Pages of files mapped into the process (code, data, mapped files).
    File = 0,
    /// Anonymous pages (heap, stacks, private writes).
    Anon = 1,
    /// Anonymous pages swapped out.
    Swap = 2,
    /// Shared memory pages (tmpfs, `MAP_SHARED|MAP_ANONYMOUS`, SysV shm).
    Shmem = 3,
}

impl RssMember {
    /// Every member, in kernel order.
    pub const ALL: [RssMember; 4] = [Self::File, Self::Anon, Self::Swap, Self::Shmem];

    /// The member for a kernel number.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Anon => "anon",
            Self::Swap => "swap",
            Self::Shmem => "shmem",
        }
    }
}

/// [`RssRecord::flags`]: the change happened while the process's own page
/// fault at `fault_addr` was being handled (the pages at that address became
/// resident).
pub const RSS_FAULT: u32 = 1;
/// [`RssRecord::flags`]: this fault was sampled; `frames` holds the user
/// stack of the code that touched the memory.
pub const RSS_SAMPLED: u32 = 2;

/// One RSS counter of a process changed. `bytes` is the counter's new,
/// absolute value, so a lost or unattributed record costs nothing once the
/// next one arrives. Variable length like [`AllocRecord`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RssRecord {
    /// Common header; `kind` is [`RecordKind::Rss`]. `tgid` is the owner of
    /// the address space, which is not always the current task's.
    pub header: Header,
    /// An [`RssMember`] discriminant.
    pub member: u32,
    /// [`RSS_FAULT`], [`RSS_SAMPLED`].
    pub flags: u32,
    /// The counter's new value, bytes.
    pub bytes: i64,
    /// Change from the previous value the kernel side saw for this process
    /// and member, bytes (0 for its first sight).
    pub delta: i64,
    /// With [`RSS_FAULT`]: the faulting user address.
    pub fault_addr: u64,
    /// Number of valid entries in `frames`.
    pub nframes: u16,
    /// Zero.
    pub _pad: u16,
    /// Negative errno of a sampled stack capture that failed, else 0.
    pub stack_err: i32,
    /// With [`RSS_SAMPLED`]: user return addresses, innermost first.
    pub frames: [u64; MAX_FRAMES],
}

impl RssRecord {
    /// Length of the record without frames.
    pub const FIXED_LEN: usize = core::mem::offset_of!(RssRecord, frames);
}

/// Which address-space syscall a [`VmRecord`] reports.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOp {
    /// `mmap(addr, len, prot, flags, fd, off)`; `ret` is the mapping.
    Mmap = 1,
    /// `munmap(addr, len)`.
    Munmap = 2,
    /// `mremap(addr, old_len, new_len, flags, new_addr)`; `ret` is the new
    /// address.
    Mremap = 3,
    /// `brk(addr)`; `ret` is the new program break.
    Brk = 4,
    /// `madvise(addr, len, advice)`, only for advice that releases pages
    /// (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`, `MADV_DONTNEED_LOCKED`).
    Madvise = 5,
}

impl VmOp {
    /// The op for a wire discriminant.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Mmap),
            2 => Some(Self::Munmap),
            3 => Some(Self::Mremap),
            4 => Some(Self::Brk),
            5 => Some(Self::Madvise),
            _ => None,
        }
    }
}

/// An address-space syscall returned successfully. Variable length like
/// [`AllocRecord`]; only `mmap`, `mremap` and `brk` carry a stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VmRecord {
    /// Common header; `kind` is [`RecordKind::Vm`].
    pub header: Header,
    /// A [`VmOp`] discriminant.
    pub op: u16,
    /// 1 when the call was made from inside a traced allocator function
    /// (glibc's malloc maps and grows its own arenas).
    pub by_allocator: u16,
    /// Number of valid entries in `frames`.
    pub nframes: u16,
    /// Zero.
    pub _pad: u16,
    /// Negative errno of the stack capture when it failed, else 0.
    pub stack_err: i32,
    /// Zero.
    pub _pad2: u32,
    /// First argument (the address; brk's requested break).
    pub addr: u64,
    /// Second argument (the length; mremap's old length).
    pub len: u64,
    /// Third argument (mmap's prot, mremap's new length, madvise's advice).
    pub arg3: u64,
    /// Fourth argument (mmap's and mremap's flags).
    pub arg4: u64,
    /// Fifth argument (mmap's fd, mremap's new address).
    pub arg5: u64,
    /// The syscall's return value.
    pub ret: u64,
    /// User return addresses, innermost first.
    pub frames: [u64; MAX_FRAMES],
}

impl VmRecord {
    /// Length of the record without frames.
    pub const FIXED_LEN: usize = core::mem::offset_of!(VmRecord, frames);
}

/// Syscall arguments stashed at a [`VmRecord`]'s syscall entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmInflight {
    /// A [`VmOp`] discriminant.
    pub op: u16,
    /// As in [`VmRecord`].
    pub by_allocator: u16,
    /// Zero.
    pub _pad: u32,
    /// The syscall's first five arguments.
    pub args: [u64; 5],
}

/// What a [`KmemRecord`] reports.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KmemOp {
    /// `kmalloc` (slab object of a size class, or a large kmalloc).
    Kmalloc = 1,
    /// `kmem_cache_alloc` (object of a named cache).
    CacheAlloc = 2,
    /// A page-allocator allocation of `4096 << order` bytes that is not a
    /// movable (user or page-cache) page.
    Pages = 3,
    /// A per-CPU allocation (`bytes_alloc` is summed over CPUs).
    Percpu = 4,
    /// A tracked allocation was freed; `ptr` names it as it was allocated.
    Free = 5,
}

impl KmemOp {
    /// The op for a wire discriminant.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Kmalloc),
            2 => Some(Self::CacheAlloc),
            3 => Some(Self::Pages),
            4 => Some(Self::Percpu),
            5 => Some(Self::Free),
            _ => None,
        }
    }
}

/// Key of a live kernel allocation: the kind's address space (slab pointer,
/// page frame number, per-CPU pointer) and the address in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmemKey {
    /// [`KmemOp::Kmalloc`] for slab objects (kmalloc and kmem_cache share
    /// `kfree`-able pointers), [`KmemOp::Pages`] or [`KmemOp::Percpu`].
    pub space: u64,
    /// Pointer or page frame number.
    pub addr: u64,
}

/// Kernel memory allocated in the context of a traced process, or freed
/// (in any context) after such an allocation. Variable length like
/// [`AllocRecord`]; frees carry no stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KmemRecord {
    /// Common header; `kind` is [`RecordKind::Kmem`]. For a free, `tgid` is
    /// the process the allocation was charged to.
    pub header: Header,
    /// A [`KmemOp`] discriminant.
    pub op: u16,
    /// Number of valid entries in `frames`.
    pub nframes: u16,
    /// Negative errno of the stack capture when it failed, else 0.
    pub stack_err: i32,
    /// The [`KmemKey::space`] of the allocation.
    pub space: u64,
    /// Pointer, or page frame number.
    pub addr: u64,
    /// Bytes requested (slab), or the bytes of the pages.
    pub bytes_req: u64,
    /// Bytes the allocator set aside.
    pub bytes_alloc: u64,
    /// Kernel return addresses, innermost first.
    pub frames: [u64; MAX_FRAMES],
}

impl KmemRecord {
    /// Length of the record without frames.
    pub const FIXED_LEN: usize = core::mem::offset_of!(KmemRecord, frames);
}

/// What a live kernel allocation remembers until its free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmemOwner {
    /// The process charged.
    pub tgid: u32,
    /// Zero.
    pub _pad: u32,
}

/// A traced process called execve (`sched:sched_process_exec`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecRecord {
    /// Common header; `kind` is [`RecordKind::Exec`].
    pub header: Header,
    /// The new program's name as the kernel keeps it (NUL-padded): read at
    /// the exec itself, so a program that exits before user space drains
    /// the ring is still named.
    pub comm: [u8; 16],
}

/// A followed process created a child process (`task:task_newtask` without
/// `CLONE_THREAD`), which is followed from its first instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkRecord {
    /// Common header; `kind` is [`RecordKind::Fork`], the pid the parent's.
    pub header: Header,
    /// Process id of the child.
    pub child: u32,
    /// Zero.
    pub _pad: u32,
    /// The child's name (its parent's, until it execs), NUL-padded: it may
    /// be gone before user space could read it.
    pub comm: [u8; 16],
}

/// The OOM killer chose a traced process (`oom:mark_victim`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomRecord {
    /// Common header; `kind` is [`RecordKind::Oom`], `tgid` the victim.
    pub header: Header,
    /// The victim's virtual size, KiB.
    pub total_vm_kib: u64,
    /// Resident anonymous memory, KiB.
    pub anon_rss_kib: u64,
    /// Resident file memory, KiB.
    pub file_rss_kib: u64,
    /// Resident shared memory, KiB.
    pub shmem_rss_kib: u64,
    /// Page tables, KiB.
    pub pgtables_kib: u64,
    /// The victim's `oom_score_adj`.
    pub oom_score_adj: i64,
}

/// A page fault being handled on a CPU, waiting for the RSS change it
/// causes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingFault {
    /// The faulting thread.
    pub tid: u32,
    /// Zero.
    pub _pad: u32,
    /// The faulting address.
    pub addr: u64,
    /// When the fault began.
    pub ts_ns: u64,
}

/// Last RSS values the kernel side saw for one process, bytes, by
/// [`RssMember`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssLast {
    /// By member.
    pub bytes: [i64; 4],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Header>(), 24);
        assert_eq!(AllocRecord::FIXED_LEN, 24 + 8 * 4 + 8);
        assert_eq!(offset_of!(AllocRecord, func), 56);
        assert_eq!(
            size_of::<AllocRecord>(),
            AllocRecord::FIXED_LEN + 8 * MAX_FRAMES
        );
        assert_eq!(AllocStackRecord::FIXED_LEN, 24 + 8 * 4 + 8 + 8 * 3);
        assert_eq!(offset_of!(AllocStackRecord, func), 56);
        assert_eq!(size_of::<FreeRecord>(), 32);
        assert_eq!(size_of::<Inflight>(), 40);
        assert_eq!(size_of::<InflightStack>(), 8 + 40 * MAX_NEST);
        assert_eq!(size_of::<Budget>(), 48);
        assert_eq!(size_of::<AllocatorRanges>(), 16 * MAX_ALLOCATOR_RANGES);
        assert_eq!(SampleCounter::ALL.len(), SAMPLE_COUNTERS as usize);
        assert_eq!(RssRecord::FIXED_LEN, 24 + 4 + 4 + 8 * 3 + 8);
        assert_eq!(VmRecord::FIXED_LEN, 24 + 16 + 8 * 6);
        assert_eq!(KmemRecord::FIXED_LEN, 24 + 8 + 8 * 4);
        assert_eq!(size_of::<OomRecord>(), 24 + 8 * 6);
        assert_eq!(size_of::<VmInflight>(), 8 + 40);
        assert_eq!(size_of::<PyFrame>(), 16);
        assert_eq!(PyStackRecord::FIXED_LEN, 24 + 8 + 8);
        assert_eq!(size_of::<PyConfig>(), 8 + 4 * 22);
        assert_eq!(
            PyCodeRecord::FIXED_LEN,
            24 + 8 + 8 + 24 + 16 + 2 * PY_STR_COPY
        );
    }

    #[test]
    fn discriminants_round_trip() {
        for f in AllocFn::ALL {
            assert_eq!(AllocFn::from_u16(f as u16), Some(f));
        }
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert_eq!(RecordKind::from_u16(2), Some(RecordKind::Free));
        assert_eq!(RecordKind::from_u16(9), Some(RecordKind::Fork));
        assert_eq!(RecordKind::from_u16(10), Some(RecordKind::Loaded));
        assert_eq!(RecordKind::from_u16(11), Some(RecordKind::AllocStack));
        assert_eq!(RecordKind::from_u16(12), Some(RecordKind::PyStack));
        assert_eq!(RecordKind::from_u16(13), Some(RecordKind::PyCode));
        assert_eq!(RecordKind::from_u16(14), None);
    }
}
