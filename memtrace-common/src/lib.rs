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
pub const EVENT_ABI: u16 = 1;

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
    /// Zero; room for a later field without a layout change.
    pub _reserved: u32,
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
}

impl RecordKind {
    /// The kind for a wire discriminant, if it is one this version knows.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Alloc),
            2 => Some(Self::Free),
            3 => Some(Self::Exit),
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
}

impl AllocFn {
    /// Every allocator function, in wire order.
    pub const ALL: [AllocFn; 10] = [
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
        }
    }

    /// Whether the call frees its pointer argument (the realloc family).
    pub fn is_realloc(self) -> bool {
        matches!(self, Self::Realloc | Self::Reallocarray)
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
    /// `bpf_ktime_get_ns()` at the call's entry. User space needs it to order
    /// a realloc's implicit free against allocations of other threads.
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
    /// Entry time.
    pub ts_ns: u64,
    /// An [`AllocFn`] discriminant.
    pub func: u16,
    /// 1 when the call is nested in another traced call and emits nothing.
    pub nested: u16,
    /// Padding, zero.
    pub _pad: u32,
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
}

/// Number of [`Counter`] slots.
pub const COUNTERS: u32 = 6;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTERS as usize] = [
        Self::RingbufFull,
        Self::StackLost,
        Self::ReturnWithoutEntry,
        Self::InflightFull,
        Self::StaleInflight,
        Self::Calls,
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
        }
    }
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
        assert_eq!(size_of::<FreeRecord>(), 32);
        assert_eq!(size_of::<Inflight>(), 40);
        assert_eq!(size_of::<InflightStack>(), 8 + 40 * MAX_NEST);
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
        assert_eq!(RecordKind::from_u16(9), None);
    }
}
