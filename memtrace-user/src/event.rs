//! Ring-buffer records → [`Event`]s.
//!
//! Decoding is a pure function of a byte slice: it checks length, version and
//! kind, and turns the kernel's raw facts (a realloc that returned NULL for
//! size 0, say) into the events the aggregator reasons about. It does not
//! filter, attribute or symbolize.

use memtrace_common::{AllocFn, AllocRecord, EVENT_ABI, FreeRecord, Header, RecordKind};

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
}

impl Event {
    /// When it happened.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Alloc(a) => a.ts_ns,
            Event::Free { ts_ns, .. } | Event::Exit { ts_ns, .. } => *ts_ns,
        }
    }

    /// The process it happened in.
    pub fn pid(&self) -> u32 {
        match self {
            Event::Alloc(a) => a.pid,
            Event::Free { pid, .. } | Event::Exit { pid, .. } => *pid,
        }
    }
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
    /// When the call was entered.
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
        None => Err(DecodeError::Kind(header.kind)),
    }
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
    let pid = header.tgid;
    if addr == 0 {
        // realloc(old, 0): the kernel side only sends this when it freed old.
        return Ok(Event::Free {
            pid,
            ts_ns: header.ts_ns,
            addr: old,
        });
    }
    Ok(Event::Alloc(Alloc {
        pid,
        tid: header.tid,
        ts_ns: header.ts_ns,
        entry_ts_ns,
        addr,
        size,
        func,
        old_addr: (func.is_realloc() && old != 0).then_some(old),
        stack,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::{AllocRecord, Header, RecordKind};

    /// Encodes an allocation as the kernel side would.
    fn encode_alloc(a: &Alloc) -> Vec<u8> {
        let mut rec = AllocRecord {
            header: Header {
                version: EVENT_ABI,
                kind: RecordKind::Alloc as u16,
                tgid: a.pid,
                tid: a.tid,
                _reserved: 0,
                ts_ns: a.ts_ns,
            },
            addr: a.addr,
            size: a.size,
            old_addr: a.old_addr.unwrap_or(0),
            entry_ts_ns: a.entry_ts_ns,
            func: a.func as u16,
            nframes: a.stack.len() as u16,
            stack_err: 0,
            frames: [0; memtrace_common::MAX_FRAMES],
        };
        rec.frames[..a.stack.len()].copy_from_slice(&a.stack);
        // SAFETY: a `#[repr(C)]` record without padding, viewed as bytes.
        let all = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const AllocRecord).cast::<u8>(),
                size_of::<AllocRecord>(),
            )
        };
        all[..AllocRecord::FIXED_LEN + 8 * a.stack.len()].to_vec()
    }

    fn alloc() -> Alloc {
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
        }
    }

    #[test]
    fn alloc_round_trips() {
        let a = alloc();
        assert_eq!(decode(&encode_alloc(&a)), Ok(Event::Alloc(a)));
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
