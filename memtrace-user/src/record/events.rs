//! The compact binary event stream inside [`KIND_EVENTS`](super::KIND_EVENTS)
//! blocks.
//!
//! Each event is a tag byte and LEB128 varints, most of them deltas from the
//! previous event of the block, so a churn of same-size allocations at
//! nearby addresses costs a few bytes per call before compression:
//!
//! ```text
//! PID   0x01 pid                                   the process of what follows
//! TID   0x02 tid                                   the thread of what follows
//! STACK 0x03 n frame0 Δframe1 … Δframe(n-1)        defines the next stack id
//! FREE  0x04 Δts Δaddr
//! EXIT  0x05 Δts
//! EXEC  0x06 Δts                                                      (v2)
//! OOM   0x07 Δts total_vm anon_rss file_rss shmem_rss pgtables ±adj   (v2)
//! FORK  0x08 Δts parent                 the current pid is the child  (v3)
//! ALLOC 0x10|func Δts (ts-entry) Δaddr size stack            (func 1..=15)
//! REALC 0x20|func Δts (ts-entry) Δaddr size stack Δold       (with old_addr)
//! KMEM  0x30|op|S<<3 Δts space Δkaddr req Δalloc [stack]       (op 1..=5, v2)
//! RSS   0x40|member|F<<2|s<<3|S<<4 Δts ±delta Δbytes [Δfault] [stack]    (v2)
//! VM    0x60|call|a<<3|S<<4 Δts <call's fields> [stack]      (call 0..=4, v2)
//!         0 mmap    Δaddr len prot flags ±fd
//!         1 munmap  Δaddr len
//!         2 mremap  Δold_addr old_len Δnew_addr new_len
//!         3 brk     Δbrk Δrequested
//!         4 madvise Δaddr len advice
//! ```
//!
//! Δ fields are zig-zag signed differences (records from several CPUs are
//! not exactly in time order): Δts from the previous event's time, Δaddr from
//! the previous address (allocated or freed), Δold from the new block's
//! address, Δframe from the previous frame. Address-space addresses (a
//! fault's, a syscall's) have a chain of their own, each from the previous
//! one (Δnew_addr from the old address; Δrequested, off the chain, from the
//! new break, as `brk(0)` only asks for it), so
//! that mmap and faults far from the heap do not lengthen the deltas of
//! allocations; kernel allocations (`Δkaddr`, a pointer or a page frame
//! number) have a third. `±` fields are zig-zag signed values. In RSS,
//! `Δbytes` is from the counter's previous value in the block (per member)
//! plus `delta`, so a steady stream of one process's counter costs one byte
//! for it; `F` says a fault address follows and `s` that the fault was
//! sampled. In KMEM, `Δalloc` is bytes set aside less bytes requested and
//! `space` is a [`KmemOp`] discriminant, as `op` is. In VM, `a` says the call
//! came from inside an allocator.
//!
//! Stacks: an allocation always names one (possibly of no frames), as
//! version 1 did. The other events with a stack set the tag's `S` bit and
//! then name its id; an empty stack clears the bit and costs nothing. Stack
//! ids count from 0 over the whole recording; a stack belongs to the process
//! current at its definition. Kernel stacks (of KMEM allocations) are stacks
//! like the others: their frames are kernel addresses. Encoder and decoder
//! state start fresh in each block.
//!
//! Tags marked v2 (v3) are new in format version 2 (3) (see the version
//! rules in [`super`]); an older reader would take them for damage, so files
//! that may hold them say the newer version.

use bytes::{Buf, BufMut, BytesMut};
use memtrace_common::{AllocFn, KmemOp, RssMember};

use crate::event::{Alloc, Event, Kmem, Oom, Rss, Vm, VmCall};

const PID: u8 = 0x01;
const TID: u8 = 0x02;
const STACK: u8 = 0x03;
const FREE: u8 = 0x04;
const EXIT: u8 = 0x05;
const EXEC: u8 = 0x06;
const OOM: u8 = 0x07;
const FORK: u8 = 0x08;
const ALLOC: u8 = 0x10;
const REALLOC: u8 = 0x20;
const KMEM: u8 = 0x30;
const RSS: u8 = 0x40;
const VM: u8 = 0x60;

/// KMEM tag bit: a stack id follows.
const KMEM_STACK: u8 = 1 << 3;
/// RSS tag bit: a fault address follows.
const RSS_FAULT: u8 = 1 << 2;
/// RSS tag bit: the fault was sampled.
const RSS_SAMPLED: u8 = 1 << 3;
/// RSS tag bit: a stack id follows.
const RSS_STACK: u8 = 1 << 4;
/// VM tag bit: called from inside an allocator.
const VM_BY_ALLOCATOR: u8 = 1 << 3;
/// VM tag bit: a stack id follows.
const VM_STACK: u8 = 1 << 4;

/// The stack an event names in the stream, if any: an allocation's always
/// (even of no frames, as in version 1), another event's when it has frames
/// ([`Event::stack`]). The recorder defines each new one before the event.
pub fn stack_of(event: &Event) -> Option<&[u64]> {
    match event {
        Event::Alloc(a) => Some(&a.stack),
        _ => event.stack(),
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_delta(buf: &mut BytesMut, from: u64, to: u64) {
    put_varint(buf, zigzag(to.wrapping_sub(from) as i64));
}

/// Why a block's events could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The block ended inside an event.
    #[error("event block ends inside an event")]
    Short,
    /// A tag this version does not know.
    #[error("unknown event tag {0:#x}")]
    Tag(u8),
    /// An allocator function this version does not know.
    #[error("unknown allocator function {0}")]
    Func(u8),
    /// A field whose value this version does not know.
    #[error("unknown {what} {value}")]
    Value {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A stack id used before its definition.
    #[error("stack {0} used before it was defined")]
    Stack(u64),
    /// A varint longer than 64 bits.
    #[error("malformed number")]
    Varint,
}

fn get_varint(buf: &mut &[u8]) -> Result<u64, Error> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return Err(Error::Short);
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Error::Varint)
}

fn get_signed(buf: &mut &[u8]) -> Result<i64, Error> {
    get_varint(buf).map(unzigzag)
}

fn get_delta(buf: &mut &[u8], from: u64) -> Result<u64, Error> {
    Ok(from.wrapping_add(get_signed(buf)? as u64))
}

fn get_u32(buf: &mut &[u8], what: &'static str) -> Result<u32, Error> {
    let v = get_varint(buf)?;
    u32::try_from(v).map_err(|_| Error::Value { what, value: v })
}

fn get_kmem_op(v: u64, what: &'static str) -> Result<KmemOp, Error> {
    u16::try_from(v)
        .ok()
        .and_then(KmemOp::from_u16)
        .ok_or(Error::Value { what, value: v })
}

/// The frames of the stack whose id is next in `buf`.
fn get_stack(buf: &mut &[u8], stacks: &[StackDef]) -> Result<Vec<u64>, Error> {
    let id = get_varint(buf)?;
    let stack = stacks.get(id as usize).ok_or(Error::Stack(id))?;
    Ok(stack.1.to_vec())
}

/// Delta state shared by encoder and decoder.
#[derive(Default)]
struct State {
    pid: Option<u32>,
    tid: Option<u32>,
    ts: u64,
    /// Last block allocated or freed.
    addr: u64,
    /// Last address-space address (a fault's, a syscall's).
    vaddr: u64,
    /// Last kernel allocation's address.
    kaddr: u64,
    /// Last value of each RSS counter, by [`RssMember`].
    rss: [u64; 4],
}

/// Appends events to a block.
#[derive(Default)]
pub struct Encoder {
    state: State,
    buf: BytesMut,
}

impl Encoder {
    /// Bytes encoded since the last [`take`](Self::take).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was encoded since the last take.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The block's content; the next event starts a fresh block.
    pub fn take(&mut self) -> BytesMut {
        self.state = State::default();
        self.buf.split()
    }

    fn pid(&mut self, pid: u32) {
        if self.state.pid != Some(pid) {
            self.buf.put_u8(PID);
            put_varint(&mut self.buf, pid.into());
            self.state.pid = Some(pid);
        }
    }

    /// The process, then the tag.
    fn start(&mut self, pid: u32, tag: u8, ts_ns: u64) {
        self.pid(pid);
        self.buf.put_u8(tag);
        put_delta(&mut self.buf, self.state.ts, ts_ns);
        self.state.ts = ts_ns;
    }

    fn vaddr(&mut self, addr: u64) {
        put_delta(&mut self.buf, self.state.vaddr, addr);
        self.state.vaddr = addr;
    }

    /// Defines the next stack id, for process `pid`.
    pub fn stack(&mut self, pid: u32, frames: &[u64]) {
        self.pid(pid);
        self.buf.put_u8(STACK);
        put_varint(&mut self.buf, frames.len() as u64);
        let mut prev = 0;
        for &f in frames {
            put_delta(&mut self.buf, prev, f);
            prev = f;
        }
    }

    /// Appends an event. An event with a stack (see [`stack_of`]) names it
    /// by id, defined before with [`stack`](Self::stack); `stack` is
    /// ignored for the others.
    pub fn event(&mut self, event: &Event, stack: u32) {
        let stack_bit = |frames: &[u64], bit: u8| if frames.is_empty() { 0 } else { bit };
        match event {
            Event::Alloc(a) => {
                self.pid(a.pid);
                if self.state.tid != Some(a.tid) {
                    self.buf.put_u8(TID);
                    put_varint(&mut self.buf, a.tid.into());
                    self.state.tid = Some(a.tid);
                }
                let tag = if a.old_addr.is_some() { REALLOC } else { ALLOC };
                self.start(a.pid, tag | a.func as u8, a.ts_ns);
                put_varint(&mut self.buf, a.ts_ns.wrapping_sub(a.entry_ts_ns));
                put_delta(&mut self.buf, self.state.addr, a.addr);
                put_varint(&mut self.buf, a.size);
                put_varint(&mut self.buf, stack.into());
                if let Some(old) = a.old_addr {
                    put_delta(&mut self.buf, a.addr, old);
                }
                self.state.addr = a.addr;
            }
            Event::Free { pid, ts_ns, addr } => {
                self.start(*pid, FREE, *ts_ns);
                put_delta(&mut self.buf, self.state.addr, *addr);
                self.state.addr = *addr;
            }
            Event::Exit { pid, ts_ns } => self.start(*pid, EXIT, *ts_ns),
            Event::Exec { pid, ts_ns, .. } => self.start(*pid, EXEC, *ts_ns),
            // A control event, not a fact about memory: not recorded.
            Event::Loaded { .. } => {}
            Event::Fork {
                pid, parent, ts_ns, ..
            } => {
                self.start(*pid, FORK, *ts_ns);
                put_varint(&mut self.buf, (*parent).into());
            }
            Event::Oom(o) => {
                self.start(o.pid, OOM, o.ts_ns);
                for v in [o.total_vm, o.anon_rss, o.file_rss, o.shmem_rss, o.pgtables] {
                    put_varint(&mut self.buf, v);
                }
                put_varint(&mut self.buf, zigzag(o.oom_score_adj));
            }
            Event::Kmem(k) => {
                let tag = KMEM | k.op as u8 | stack_bit(&k.stack, KMEM_STACK);
                self.start(k.pid, tag, k.ts_ns);
                put_varint(&mut self.buf, k.space as u64);
                put_delta(&mut self.buf, self.state.kaddr, k.addr);
                self.state.kaddr = k.addr;
                put_varint(&mut self.buf, k.bytes_req);
                put_delta(&mut self.buf, k.bytes_req, k.bytes_alloc);
                if !k.stack.is_empty() {
                    put_varint(&mut self.buf, stack.into());
                }
            }
            Event::Rss(r) => {
                let member = r.member as u8;
                let mut tag = RSS | member | stack_bit(&r.stack, RSS_STACK);
                if r.fault.is_some() {
                    tag |= RSS_FAULT;
                }
                if r.sampled {
                    tag |= RSS_SAMPLED;
                }
                self.start(r.pid, tag, r.ts_ns);
                put_varint(&mut self.buf, zigzag(r.delta));
                let last = &mut self.state.rss[usize::from(member)];
                put_delta(&mut self.buf, last.wrapping_add(r.delta as u64), r.bytes);
                *last = r.bytes;
                if let Some(fault) = r.fault {
                    self.vaddr(fault);
                }
                if !r.stack.is_empty() {
                    put_varint(&mut self.buf, stack.into());
                }
            }
            Event::Vm(v) => {
                let call = match v.call {
                    VmCall::Mmap { .. } => 0,
                    VmCall::Munmap { .. } => 1,
                    VmCall::Mremap { .. } => 2,
                    VmCall::Brk { .. } => 3,
                    VmCall::Madvise { .. } => 4,
                };
                let by_allocator = if v.by_allocator { VM_BY_ALLOCATOR } else { 0 };
                let tag = VM | call | by_allocator | stack_bit(&v.stack, VM_STACK);
                self.start(v.pid, tag, v.ts_ns);
                match v.call {
                    VmCall::Mmap {
                        addr,
                        len,
                        prot,
                        flags,
                        fd,
                    } => {
                        self.vaddr(addr);
                        put_varint(&mut self.buf, len);
                        put_varint(&mut self.buf, prot.into());
                        put_varint(&mut self.buf, flags.into());
                        put_varint(&mut self.buf, zigzag(fd.into()));
                    }
                    VmCall::Munmap { addr, len } => {
                        self.vaddr(addr);
                        put_varint(&mut self.buf, len);
                    }
                    VmCall::Mremap {
                        old_addr,
                        old_len,
                        new_addr,
                        new_len,
                    } => {
                        self.vaddr(old_addr);
                        put_varint(&mut self.buf, old_len);
                        self.vaddr(new_addr);
                        put_varint(&mut self.buf, new_len);
                    }
                    VmCall::Brk { requested, brk } => {
                        // brk(0), a query, is common: a delta from the new
                        // break keeps the chain of addresses near the heap.
                        self.vaddr(brk);
                        put_delta(&mut self.buf, brk, requested);
                    }
                    VmCall::Madvise { addr, len, advice } => {
                        self.vaddr(addr);
                        put_varint(&mut self.buf, len);
                        put_varint(&mut self.buf, advice.into());
                    }
                }
                if !v.stack.is_empty() {
                    put_varint(&mut self.buf, stack.into());
                }
            }
        }
    }
}

/// A stack defined in the recording: its process and raw frames.
pub type StackDef = (u32, Box<[u64]>);

/// Decodes one block's events, in order, defining stacks into `stacks`
/// (recording-wide, so pass the same vector for every block).
pub fn decode(
    mut buf: &[u8],
    stacks: &mut Vec<StackDef>,
    mut each: impl FnMut(Event),
) -> Result<(), Error> {
    let mut st = State::default();
    let buf = &mut buf;
    while buf.has_remaining() {
        let tag = buf.get_u8();
        let pid = st.pid.unwrap_or(0);
        match tag {
            PID => st.pid = Some(get_varint(buf)? as u32),
            TID => st.tid = Some(get_varint(buf)? as u32),
            STACK => {
                let n = get_varint(buf)?;
                if n > buf.remaining() as u64 {
                    return Err(Error::Short);
                }
                let mut frames = Vec::with_capacity(n as usize);
                let mut prev = 0;
                for _ in 0..n {
                    prev = get_delta(buf, prev)?;
                    frames.push(prev);
                }
                stacks.push((pid, frames.into()));
            }
            FREE => {
                st.ts = get_delta(buf, st.ts)?;
                st.addr = get_delta(buf, st.addr)?;
                each(Event::Free {
                    pid,
                    ts_ns: st.ts,
                    addr: st.addr,
                });
            }
            EXIT => {
                st.ts = get_delta(buf, st.ts)?;
                each(Event::Exit { pid, ts_ns: st.ts });
            }
            EXEC => {
                st.ts = get_delta(buf, st.ts)?;
                each(Event::Exec {
                    pid,
                    ts_ns: st.ts,
                    comm: None,
                });
            }
            FORK => {
                st.ts = get_delta(buf, st.ts)?;
                let parent = get_varint(buf)?;
                each(Event::Fork {
                    pid,
                    parent: u32::try_from(parent).map_err(|_| Error::Value {
                        what: "parent pid",
                        value: parent,
                    })?,
                    ts_ns: st.ts,
                    comm: None,
                });
            }
            OOM => {
                st.ts = get_delta(buf, st.ts)?;
                let mut v = [0u64; 5];
                for x in &mut v {
                    *x = get_varint(buf)?;
                }
                let [total_vm, anon_rss, file_rss, shmem_rss, pgtables] = v;
                each(Event::Oom(Oom {
                    pid,
                    ts_ns: st.ts,
                    total_vm,
                    anon_rss,
                    file_rss,
                    shmem_rss,
                    pgtables,
                    oom_score_adj: get_signed(buf)?,
                }));
            }
            t if t & 0xf0 == ALLOC || t & 0xf0 == REALLOC => {
                let func = AllocFn::from_u16((t & 0x0f).into()).ok_or(Error::Func(t & 0x0f))?;
                st.ts = get_delta(buf, st.ts)?;
                let entry_ts_ns = st.ts.wrapping_sub(get_varint(buf)?);
                st.addr = get_delta(buf, st.addr)?;
                let size = get_varint(buf)?;
                let id = get_varint(buf)?;
                let old_addr = if t & 0xf0 == REALLOC {
                    Some(get_delta(buf, st.addr)?)
                } else {
                    None
                };
                let stack = stacks.get(id as usize).ok_or(Error::Stack(id))?;
                each(Event::Alloc(Alloc {
                    pid,
                    tid: st.tid.unwrap_or(0),
                    ts_ns: st.ts,
                    entry_ts_ns,
                    addr: st.addr,
                    size,
                    func,
                    old_addr,
                    stack: stack.1.to_vec(),
                    // Recordings are of exact mode.
                    sample_shift: 0,
                }));
            }
            t if t & 0xf0 == KMEM => {
                let op = get_kmem_op((t & 0x07).into(), "kernel allocation op")?;
                st.ts = get_delta(buf, st.ts)?;
                let space = get_kmem_op(get_varint(buf)?, "kernel allocation space")?;
                st.kaddr = get_delta(buf, st.kaddr)?;
                let bytes_req = get_varint(buf)?;
                let bytes_alloc = get_delta(buf, bytes_req)?;
                let stack = if t & KMEM_STACK != 0 {
                    get_stack(buf, stacks)?
                } else {
                    Vec::new()
                };
                each(Event::Kmem(Kmem {
                    pid,
                    ts_ns: st.ts,
                    op,
                    space,
                    addr: st.kaddr,
                    bytes_req,
                    bytes_alloc,
                    stack,
                }));
            }
            t if t & 0xe0 == RSS => {
                let member = usize::from(t & 0x03);
                st.ts = get_delta(buf, st.ts)?;
                let delta = get_signed(buf)?;
                let bytes = get_delta(buf, st.rss[member].wrapping_add(delta as u64))?;
                st.rss[member] = bytes;
                let fault = if t & RSS_FAULT != 0 {
                    st.vaddr = get_delta(buf, st.vaddr)?;
                    Some(st.vaddr)
                } else {
                    None
                };
                let stack = if t & RSS_STACK != 0 {
                    get_stack(buf, stacks)?
                } else {
                    Vec::new()
                };
                each(Event::Rss(Rss {
                    pid,
                    ts_ns: st.ts,
                    member: RssMember::ALL[member],
                    bytes,
                    delta,
                    fault,
                    sampled: t & RSS_SAMPLED != 0,
                    stack,
                }));
            }
            t if t & 0xe0 == VM => {
                st.ts = get_delta(buf, st.ts)?;
                let call = match t & 0x07 {
                    0 => {
                        st.vaddr = get_delta(buf, st.vaddr)?;
                        VmCall::Mmap {
                            addr: st.vaddr,
                            len: get_varint(buf)?,
                            prot: get_u32(buf, "mmap protection")?,
                            flags: get_u32(buf, "mmap flags")?,
                            fd: get_signed(buf)? as i32,
                        }
                    }
                    1 => {
                        st.vaddr = get_delta(buf, st.vaddr)?;
                        VmCall::Munmap {
                            addr: st.vaddr,
                            len: get_varint(buf)?,
                        }
                    }
                    2 => {
                        let old_addr = get_delta(buf, st.vaddr)?;
                        let old_len = get_varint(buf)?;
                        st.vaddr = get_delta(buf, old_addr)?;
                        VmCall::Mremap {
                            old_addr,
                            old_len,
                            new_addr: st.vaddr,
                            new_len: get_varint(buf)?,
                        }
                    }
                    3 => {
                        st.vaddr = get_delta(buf, st.vaddr)?;
                        VmCall::Brk {
                            brk: st.vaddr,
                            requested: get_delta(buf, st.vaddr)?,
                        }
                    }
                    4 => {
                        st.vaddr = get_delta(buf, st.vaddr)?;
                        VmCall::Madvise {
                            addr: st.vaddr,
                            len: get_varint(buf)?,
                            advice: get_u32(buf, "madvise advice")?,
                        }
                    }
                    call => {
                        return Err(Error::Value {
                            what: "address-space call",
                            value: call.into(),
                        });
                    }
                };
                let stack = if t & VM_STACK != 0 {
                    get_stack(buf, stacks)?
                } else {
                    Vec::new()
                };
                each(Event::Vm(Vm {
                    pid,
                    ts_ns: st.ts,
                    call,
                    by_allocator: t & VM_BY_ALLOCATOR != 0,
                    stack,
                }));
            }
            t => return Err(Error::Tag(t)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::event::MADV_DONTNEED;

    fn alloc(pid: u32, tid: u32, ts: u64, addr: u64, size: u64, old: Option<u64>) -> Event {
        Event::Alloc(Alloc {
            pid,
            tid,
            ts_ns: ts,
            entry_ts_ns: ts - 700,
            addr,
            size,
            func: if old.is_some() {
                AllocFn::Realloc
            } else {
                AllocFn::Malloc
            },
            old_addr: old,
            stack: vec![0x5555_0000_1234, 0x5555_0000_1000, 0x7fff_0000_0001],
            sample_shift: 0,
        })
    }

    fn rss(pid: u32, ts: u64, member: RssMember, bytes: u64, delta: i64) -> Rss {
        Rss {
            pid,
            ts_ns: ts,
            member,
            bytes,
            delta,
            fault: None,
            sampled: false,
            stack: vec![],
        }
    }

    fn vm(pid: u32, ts: u64, call: VmCall, stack: Vec<u64>) -> Event {
        Event::Vm(Vm {
            pid,
            ts_ns: ts,
            call,
            by_allocator: false,
            stack,
        })
    }

    fn kmem(pid: u32, ts: u64, op: KmemOp, addr: u64, stack: Vec<u64>) -> Kmem {
        Kmem {
            pid,
            ts_ns: ts,
            op,
            space: match op {
                KmemOp::CacheAlloc | KmemOp::Free => KmemOp::Kmalloc,
                op => op,
            },
            addr,
            bytes_req: 200,
            bytes_alloc: 256,
            stack,
        }
    }

    /// Encodes `events` into one block as the recorder does (each stack
    /// defined before its first use); returns the block and the number of
    /// stacks defined.
    fn encode(events: &[Event]) -> (BytesMut, usize) {
        let mut enc = Encoder::default();
        let mut ids = HashMap::new();
        for e in events {
            let id = match stack_of(e) {
                Some(frames) => {
                    let next = ids.len() as u32;
                    *ids.entry((e.pid(), frames.to_vec())).or_insert_with(|| {
                        enc.stack(e.pid(), frames);
                        next
                    })
                }
                None => 0,
            };
            enc.event(e, id);
        }
        (enc.take(), ids.len())
    }

    fn decode_all(block: &[u8]) -> (Vec<Event>, Vec<StackDef>) {
        let mut stacks = Vec::new();
        let mut out = Vec::new();
        decode(block, &mut stacks, |e| out.push(e)).unwrap();
        (out, stacks)
    }

    /// Every kind of event, from three processes, with and without stacks,
    /// user and kernel, and values at the edges of their types.
    fn mixed() -> Vec<Event> {
        let kstack = vec![
            0xffff_ffff_8162_d2a0,
            0xffff_ffff_8150_0010,
            0xffff_ffff_c0a0_1234,
        ];
        let ustack = vec![0x5555_0000_2000, 0x7f00_0000_1000];
        vec![
            Event::Exec {
                pid: 10,
                ts_ns: 500,
                comm: None,
            },
            Event::Fork {
                pid: 20,
                parent: 10,
                ts_ns: 700,
                comm: None,
            },
            alloc(10, 11, 1_000_000, 0x5000_0010, 64, None),
            Event::Rss(Rss {
                fault: Some(0x5000_0000),
                ..rss(10, 1_000_100, RssMember::Anon, 1 << 20, 4096)
            }),
            Event::Rss(rss(20, 1_000_150, RssMember::File, 8 << 20, 0)),
            Event::Rss(Rss {
                fault: Some(0x5000_1000),
                sampled: true,
                stack: ustack.clone(),
                ..rss(10, 1_000_200, RssMember::Anon, (1 << 20) + 4096, 4096)
            }),
            // Sampled, but the stack could not be had.
            Event::Rss(Rss {
                fault: Some(0x5000_2000),
                sampled: true,
                ..rss(10, 1_000_210, RssMember::Anon, (1 << 20) + 8192, 4096)
            }),
            Event::Rss(rss(30, 1_000_220, RssMember::Swap, 0, -12288)),
            Event::Rss(rss(30, 1_000_230, RssMember::Shmem, u64::MAX, i64::MIN)),
            vm(
                10,
                999_000, // earlier than the previous event
                VmCall::Mmap {
                    addr: 0x7f12_3456_0000,
                    len: 1 << 30,
                    prot: 3,
                    flags: 0x22,
                    fd: -1,
                },
                ustack.clone(),
            ),
            vm(
                10,
                1_000_300,
                VmCall::Mmap {
                    addr: 0x7f12_0000_0000,
                    len: 4096,
                    prot: 1,
                    flags: u32::MAX,
                    fd: i32::MAX,
                },
                vec![],
            ),
            vm(
                20,
                1_000_310,
                VmCall::Munmap {
                    addr: 0x7f12_3456_0000,
                    len: 1 << 30,
                },
                vec![],
            ),
            Event::Vm(Vm {
                by_allocator: true,
                ..match vm(
                    10,
                    1_000_320,
                    VmCall::Mremap {
                        old_addr: 0x7f00_0000_0000,
                        old_len: 1 << 21,
                        new_addr: 0x7e00_0000_0000,
                        new_len: 1 << 22,
                    },
                    ustack.clone(),
                ) {
                    Event::Vm(v) => v,
                    _ => unreachable!(),
                }
            }),
            vm(
                10,
                1_000_330,
                VmCall::Brk {
                    requested: 0,
                    brk: 0x5555_5600_0000,
                },
                vec![0x5555_0000_3000],
            ),
            vm(
                10,
                1_000_340,
                VmCall::Brk {
                    requested: 0x5555_5602_1000,
                    brk: 0x5555_5602_1000,
                },
                vec![0x5555_0000_3000],
            ),
            vm(
                30,
                1_000_350,
                VmCall::Madvise {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 21,
                    advice: MADV_DONTNEED,
                },
                vec![],
            ),
            Event::Kmem(kmem(
                10,
                1_000_400,
                KmemOp::Kmalloc,
                0xffff_8880_0123_4000,
                kstack.clone(),
            )),
            Event::Kmem(kmem(
                10,
                1_000_410,
                KmemOp::CacheAlloc,
                0xffff_8880_0123_5000,
                kstack.clone(),
            )),
            Event::Kmem(Kmem {
                bytes_req: 4096 << 3,
                bytes_alloc: 4096 << 3,
                ..kmem(
                    20,
                    1_000_420,
                    KmemOp::Pages,
                    0x12_3456,
                    kstack[1..].to_vec(),
                )
            }),
            Event::Kmem(Kmem {
                bytes_alloc: 0, // less than asked: still exact
                ..kmem(
                    20,
                    1_000_430,
                    KmemOp::Percpu,
                    0xffff_c8ff_fff0_0000,
                    kstack.clone(),
                )
            }),
            Event::Kmem(kmem(
                10,
                1_000_440,
                KmemOp::Free,
                0xffff_8880_0123_4000,
                vec![],
            )),
            Event::Free {
                pid: 10,
                ts_ns: 1_000_450,
                addr: 0x5000_0010,
            },
            alloc(10, 12, 1_000_600, 0x5000_0100, 128, Some(0x5000_0010)),
            Event::Oom(Oom {
                pid: 30,
                ts_ns: 1_500_000,
                total_vm: 8 << 30,
                anon_rss: 6 << 30,
                file_rss: 10 << 20,
                shmem_rss: 0,
                pgtables: 12 << 20,
                oom_score_adj: -1000,
            }),
            Event::Exit {
                pid: 30,
                ts_ns: 1_500_010,
            },
            Event::Exec {
                pid: 10,
                ts_ns: 1_600_000,
                comm: None,
            },
            Event::Exit {
                pid: 10,
                ts_ns: u64::MAX,
            },
        ]
    }

    #[test]
    fn round_trip_with_out_of_order_times_and_several_processes() {
        let events = vec![
            alloc(10, 11, 1_000_000, 0x5000_0010, 64, None),
            Event::Free {
                pid: 10,
                ts_ns: 999_000, // earlier than the previous event
                addr: 0x5000_0010,
            },
            alloc(20, 20, 1_000_500, 0x7000_0000, 1 << 40, None),
            alloc(10, 12, 1_000_600, 0x5000_0100, 128, Some(0x5000_0010)),
            Event::Exit {
                pid: 20,
                ts_ns: 2_000_000,
            },
        ];
        let (block, _) = encode(&events);
        let (out, stacks) = decode_all(&block);
        assert_eq!(out, events);
        assert_eq!(stacks.len(), 2);
        assert_eq!(stacks[1].0, 20);
    }

    #[test]
    fn every_event_kind_round_trips() {
        let events = mixed();
        let (block, defined) = encode(&events);
        let (out, stacks) = decode_all(&block);
        assert_eq!(out, events);
        // Alloc (pid 10, twice), user stack of pid 10 (rss, mmap, mremap),
        // brk's, kernel stack of pid 10 (twice), pid 20's two kernel stacks.
        assert_eq!((defined, stacks.len()), (6, 6));
        assert!(
            stacks
                .iter()
                .any(|(pid, f)| *pid == 10 && f[0] == 0xffff_ffff_8162_d2a0)
        );
        assert!(stacks.iter().all(|(_, f)| !f.is_empty()));
    }

    #[test]
    fn blocks_are_independent() {
        let events = mixed();
        let (mid_a, mid_b) = events.split_at(events.len() / 2);
        let mut enc = Encoder::default();
        let mut stacks = Vec::new();
        let mut out = Vec::new();
        let mut ids: HashMap<(u32, Vec<u64>), u32> = HashMap::new();
        for part in [mid_a, mid_b] {
            for e in part {
                let mut id = 0;
                if let Some(frames) = stack_of(e) {
                    let next = ids.len() as u32;
                    id = *ids.entry((e.pid(), frames.to_vec())).or_insert_with(|| {
                        enc.stack(e.pid(), frames);
                        next
                    });
                }
                enc.event(e, id);
            }
            decode(&enc.take(), &mut stacks, |e| out.push(e)).unwrap();
        }
        assert_eq!(out, events);
    }

    #[test]
    fn a_churn_pair_costs_few_bytes() {
        let mut enc = Encoder::default();
        enc.stack(1, &[0x5555_0000_1234, 0x5555_0000_1000]);
        let before = enc.len();
        for i in 0..1000u64 {
            let ts = 1_000_000 + i * 300;
            enc.event(&alloc(1, 1, ts, 0x5000_0000 + (i % 4) * 48, 32, None), 0);
            enc.event(
                &Event::Free {
                    pid: 1,
                    ts_ns: ts + 150,
                    addr: 0x5000_0000 + (i % 4) * 48,
                },
                0,
            );
        }
        let per_call = (enc.len() - before) as f64 / 2000.0;
        // Before compression; blocks are deflated on top.
        assert!(per_call <= 7.0, "{per_call} bytes per call");
    }

    #[test]
    fn faults_without_stacks_cost_few_bytes_and_define_no_stack() {
        // A process touching fresh heap pages, one RSS event per fault.
        let events: Vec<Event> = (0..1000u64)
            .map(|i| {
                Event::Rss(Rss {
                    fault: Some(0x5555_6000_0000 + i * 4096),
                    ..rss(
                        1,
                        1_000_000 + i * 900,
                        RssMember::Anon,
                        (1 << 20) + i * 4096,
                        4096,
                    )
                })
            })
            .collect();
        let mut enc = Encoder::default();
        enc.event(&events[0], 0);
        let before = enc.len();
        for e in &events[1..] {
            enc.event(e, 0);
        }
        // Tag 1, Δts 2, delta 2, Δbytes 1 (0: the counter plus delta), Δfault
        // 2; before compression.
        let per_event = (enc.len() - before) as f64 / 999.0;
        assert!(per_event <= 8.0, "{per_event} bytes per event");
        let (block, defined) = encode(&events);
        assert_eq!(defined, 0);
        assert_eq!(decode_all(&block), (events, vec![]));
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let mut enc = Encoder::default();
        enc.stack(1, &[1, 2, 3]);
        enc.event(&alloc(1, 1, 5000, 0x10, 8, None), 0);
        let block = enc.take();
        for cut in 0..block.len() {
            let mut stacks = Vec::new();
            let r = decode(&block[..cut], &mut stacks, |_| {});
            assert!(r.is_ok() || r.is_err());
        }

        // Cut anywhere, a block of every kind decodes to a prefix of its
        // events, then stops: at an event's end, or as cut short.
        let events = mixed();
        let (block, _) = encode(&events);
        for cut in 0..block.len() {
            let mut stacks = Vec::new();
            let mut out = Vec::new();
            let r = decode(&block[..cut], &mut stacks, |e| out.push(e));
            assert_eq!(out[..], events[..out.len()], "cut at {cut}");
            assert!(out.len() < events.len(), "cut at {cut}");
            if let Err(e) = r {
                assert_eq!(e, Error::Short, "cut at {cut}");
            }
        }
        // Any byte changed to any value: no panic, whatever comes out.
        for at in 0..block.len() {
            for v in [
                0x00, 0x01, 0x03, 0x07, 0x30, 0x3f, 0x47, 0x5f, 0x65, 0x7f, 0x80, 0xff,
            ] {
                let mut bad = block.to_vec();
                bad[at] = v;
                let mut stacks = Vec::new();
                let _ = decode(&bad, &mut stacks, |_| {});
            }
        }

        let mut stacks = Vec::new();
        assert_eq!(decode(&[0xee], &mut stacks, |_| {}), Err(Error::Tag(0xee)));
        assert_eq!(decode(&[0x80], &mut stacks, |_| {}), Err(Error::Tag(0x80)));
        assert_eq!(
            decode(&[0x11, 0, 0, 0, 0, 7], &mut stacks, |_| {}),
            Err(Error::Stack(7))
        );
        // A kernel allocation with a stack never defined.
        assert_eq!(
            decode(
                &[KMEM | 1 | KMEM_STACK, 0, 1, 0, 0, 0, 3],
                &mut stacks,
                |_| {}
            ),
            Err(Error::Stack(3))
        );
        // Kernel allocation op 0 and space 9, address-space call 5.
        assert_eq!(
            decode(&[KMEM, 0, 1, 0, 0, 0], &mut stacks, |_| {}),
            Err(Error::Value {
                what: "kernel allocation op",
                value: 0
            })
        );
        assert_eq!(
            decode(&[KMEM | 1, 0, 9, 0, 0, 0], &mut stacks, |_| {}),
            Err(Error::Value {
                what: "kernel allocation space",
                value: 9
            })
        );
        assert_eq!(
            decode(&[VM | 5, 0], &mut stacks, |_| {}),
            Err(Error::Value {
                what: "address-space call",
                value: 5
            })
        );
        assert_eq!(
            decode(&[OOM, 0, 1, 2], &mut stacks, |_| {}),
            Err(Error::Short)
        );
    }
}
