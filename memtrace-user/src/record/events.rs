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
//! ALLOC 0x10|func Δts (ts-entry) Δaddr size stack            (func 1..=15)
//! REALC 0x20|func Δts (ts-entry) Δaddr size stack Δold       (with old_addr)
//! ```
//!
//! Δ fields are zig-zag signed differences (records from several CPUs are
//! not exactly in time order): Δts from the previous event's time, Δaddr from
//! the previous address (allocated or freed), Δold from the new block's
//! address, Δframe from the previous frame. Stack ids count from 0 over the
//! whole recording; a stack belongs to the process current at its
//! definition. Encoder and decoder state start fresh in each block.

use bytes::{Buf, BufMut, BytesMut};
use memtrace_common::AllocFn;

use crate::event::{Alloc, Event};

const PID: u8 = 0x01;
const TID: u8 = 0x02;
const STACK: u8 = 0x03;
const FREE: u8 = 0x04;
const EXIT: u8 = 0x05;
const ALLOC: u8 = 0x10;
const REALLOC: u8 = 0x20;

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_delta(buf: &mut BytesMut, from: u64, to: u64) {
    let d = to.wrapping_sub(from) as i64;
    put_varint(buf, ((d << 1) ^ (d >> 63)) as u64);
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

fn get_delta(buf: &mut &[u8], from: u64) -> Result<u64, Error> {
    let z = get_varint(buf)?;
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    Ok(from.wrapping_add(d as u64))
}

/// Delta state shared by encoder and decoder.
#[derive(Default)]
struct State {
    pid: Option<u32>,
    tid: Option<u32>,
    ts: u64,
    addr: u64,
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

    /// Appends an event; an allocation names its stack by id (defined
    /// before with [`stack`](Self::stack)).
    pub fn event(&mut self, event: &Event, stack: u32) {
        match event {
            Event::Alloc(a) => {
                self.pid(a.pid);
                if self.state.tid != Some(a.tid) {
                    self.buf.put_u8(TID);
                    put_varint(&mut self.buf, a.tid.into());
                    self.state.tid = Some(a.tid);
                }
                let tag = if a.old_addr.is_some() { REALLOC } else { ALLOC };
                self.buf.put_u8(tag | a.func as u8);
                put_delta(&mut self.buf, self.state.ts, a.ts_ns);
                put_varint(&mut self.buf, a.ts_ns.wrapping_sub(a.entry_ts_ns));
                put_delta(&mut self.buf, self.state.addr, a.addr);
                put_varint(&mut self.buf, a.size);
                put_varint(&mut self.buf, stack.into());
                if let Some(old) = a.old_addr {
                    put_delta(&mut self.buf, a.addr, old);
                }
                self.state.ts = a.ts_ns;
                self.state.addr = a.addr;
            }
            Event::Free { pid, ts_ns, addr } => {
                self.pid(*pid);
                self.buf.put_u8(FREE);
                put_delta(&mut self.buf, self.state.ts, *ts_ns);
                put_delta(&mut self.buf, self.state.addr, *addr);
                self.state.ts = *ts_ns;
                self.state.addr = *addr;
            }
            Event::Exit { pid, ts_ns } => {
                self.pid(*pid);
                self.buf.put_u8(EXIT);
                put_delta(&mut self.buf, self.state.ts, *ts_ns);
                self.state.ts = *ts_ns;
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
                stacks.push((st.pid.unwrap_or(0), frames.into()));
            }
            FREE => {
                st.ts = get_delta(buf, st.ts)?;
                st.addr = get_delta(buf, st.addr)?;
                each(Event::Free {
                    pid: st.pid.unwrap_or(0),
                    ts_ns: st.ts,
                    addr: st.addr,
                });
            }
            EXIT => {
                st.ts = get_delta(buf, st.ts)?;
                each(Event::Exit {
                    pid: st.pid.unwrap_or(0),
                    ts_ns: st.ts,
                });
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
                    pid: st.pid.unwrap_or(0),
                    tid: st.tid.unwrap_or(0),
                    ts_ns: st.ts,
                    entry_ts_ns,
                    addr: st.addr,
                    size,
                    func,
                    old_addr,
                    stack: stack.1.to_vec(),
                }));
            }
            t => return Err(Error::Tag(t)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        })
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
        let mut enc = Encoder::default();
        let mut ids = std::collections::HashMap::new();
        for e in &events {
            let id = match e {
                Event::Alloc(a) => {
                    let next = ids.len() as u32;
                    *ids.entry((a.pid, a.stack.clone())).or_insert_with(|| {
                        enc.stack(a.pid, &a.stack);
                        next
                    })
                }
                _ => 0,
            };
            enc.event(e, id);
        }
        let block = enc.take();
        let mut stacks = Vec::new();
        let mut out = Vec::new();
        decode(&block, &mut stacks, |e| out.push(e)).unwrap();
        assert_eq!(out, events);
        assert_eq!(stacks.len(), 2);
        assert_eq!(stacks[1].0, 20);
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
        let mut stacks = Vec::new();
        assert_eq!(decode(&[0xee], &mut stacks, |_| {}), Err(Error::Tag(0xee)));
        assert_eq!(
            decode(&[0x11, 0, 0, 0, 0, 7], &mut stacks, |_| {}),
            Err(Error::Stack(7))
        );
    }
}
