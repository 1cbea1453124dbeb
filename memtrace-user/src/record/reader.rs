//! Reads a recording back, streaming: events go to a callback one by one as
//! blocks are read, so memory is bounded by what the callback keeps (the
//! aggregator's live blocks and stacks), not by the number of events.
//!
//! A damaged tail is not an error: reading stops at the first incomplete or
//! corrupt block and [`Integrity`] says how many bytes were cut. A file that
//! is not a recording, or one of a newer format, is an error.
//!
//! Not here: aggregation and reports (the caller's callback and `report`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::DeflateDecoder;

use super::events::{self, StackDef};
use super::{
    BLOCK_HEADER_LEN, Counters, HEADER_LEN, KERNEL_PID, KIND_EVENTS, KIND_META, MAGIC, MAX_BLOCK,
    Meta, RecFrame, Start, VERSION,
};
use crate::error::UserError;
use crate::event::Event;
use crate::report::Probes;
use crate::symbolize::{Frame, Symbolize, is_kernel};

/// How much of the file could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Integrity {
    /// Size of the file.
    pub file_bytes: u64,
    /// Complete blocks read.
    pub blocks: u64,
    /// Bytes after the last complete block that could not be used.
    pub cut_bytes: u64,
    /// Whether the end block was reached (the writer finished cleanly).
    pub complete: bool,
    /// What was wrong where reading stopped early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damage: Option<String>,
}

/// Everything but the events.
#[derive(Debug)]
pub struct Recording {
    /// The run.
    pub start: Start,
    /// Probes attached.
    pub probes: Vec<Probes>,
    /// Loss counters, from the end block or else the last one written.
    pub counters: Counters,
    /// CLOCK_MONOTONIC ns at the end (else the last event's time).
    pub end_ns: u64,
    /// Seconds traced (else the span from start to the last event).
    pub duration_s: f64,
    /// Events read.
    pub events: u64,
    /// What could be read.
    pub integrity: Integrity,
    /// Process names and resolved frames.
    pub symbols: RecordedSymbols,
}

/// The frames a recording carries, as a [`Symbolize`].
#[derive(Debug, Default)]
pub struct RecordedSymbols {
    comms: HashMap<u32, Option<String>>,
    frames: HashMap<(u32, u64), Vec<RecFrame>>,
}

impl Symbolize for RecordedSymbols {
    fn frames(&mut self, pid: u32, stack: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(stack.len());
        for &addr in stack {
            let mut found = self.frames.get(&(pid, addr));
            if found.is_none() && is_kernel(addr) {
                found = self.frames.get(&(KERNEL_PID, addr));
            }
            match found {
                Some(fs) if !fs.is_empty() => out.extend(fs.iter().map(|f| f.at(addr))),
                _ => out.push(Frame {
                    address: addr,
                    ..Frame::default()
                }),
            }
        }
        out
    }

    fn comm(&self, pid: u32) -> Option<String> {
        self.comms.get(&pid).cloned().flatten()
    }
}

fn bad(path: &Path, what: impl std::fmt::Display) -> UserError {
    UserError::new(
        format!("{} is not a memtrace recording: {what}", path.display()),
        "give a file written by `memtrace record -o FILE` or `memtrace --record FILE`",
    )
}

/// Reads the recording at `path`, handing each event to `each` in order.
pub fn replay(path: &Path, mut each: impl FnMut(&Event)) -> Result<Recording, UserError> {
    scan(path, &mut each, &mut |_| true)
}

/// Reads only the start block: the run's settings, which the aggregator
/// needs before the first event.
pub fn read_start(path: &Path) -> Result<Start, UserError> {
    Ok(scan(path, &mut |_| {}, &mut |m| !matches!(m, Meta::Start(_)))?.start)
}

/// Reads blocks until the end, damage, or `more` returns false after a meta
/// block.
fn scan(
    path: &Path,
    each: &mut dyn FnMut(&Event),
    more: &mut dyn FnMut(&Meta) -> bool,
) -> Result<Recording, UserError> {
    let file = File::open(path).map_err(|e| {
        UserError::new(
            format!("cannot open the recording {}: {e}", path.display()),
            "check the path and that you may read it",
        )
    })?;
    let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER_LEN];
    input
        .read_exact(&mut header)
        .map_err(|_| bad(path, "it is shorter than a recording's header"))?;
    if &header[..8] != MAGIC {
        return Err(bad(path, "it does not start with MEMTRACE"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version > VERSION {
        return Err(UserError::new(
            format!(
                "{} is a recording of format version {version}; this memtrace reads up to version {VERSION}",
                path.display()
            ),
            "report it with a newer memtrace",
        ));
    }

    let mut start: Option<Start> = None;
    let mut probes = Vec::new();
    let mut counters = Counters::default();
    let mut end: Option<(u64, f64)> = None;
    let mut symbols = RecordedSymbols::default();
    let mut stacks: Vec<StackDef> = Vec::new();
    let mut integrity = Integrity {
        file_bytes,
        ..Integrity::default()
    };
    let mut offset = HEADER_LEN as u64;
    let mut events = 0u64;
    let mut last_ts = 0u64;
    let mut content = Vec::new();
    let damage = loop {
        let mut bh = [0u8; BLOCK_HEADER_LEN];
        match read_full(&mut input, &mut bh) {
            Ok(0) => break None,
            Ok(n) if n < BLOCK_HEADER_LEN => break Some("the last block is incomplete".into()),
            Ok(_) => {}
            Err(e) => break Some(format!("read error: {e}")),
        }
        let len = u32::from_le_bytes(bh[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bh[4..8].try_into().expect("4 bytes"));
        let kind = bh[8];
        if len > MAX_BLOCK {
            break Some(format!("block at offset {offset} claims {len} bytes"));
        }
        let mut body = vec![0u8; len];
        match read_full(&mut input, &mut body) {
            Ok(n) if n == len => {}
            Ok(_) => break Some("the last block is incomplete".into()),
            Err(e) => break Some(format!("read error: {e}")),
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(&body);
        if h.finalize() != crc {
            break Some(format!("block at offset {offset} fails its checksum"));
        }
        content.clear();
        if let Err(e) = DeflateDecoder::new(&body[..]).read_to_end(&mut content) {
            break Some(format!("block at offset {offset} does not decompress: {e}"));
        }
        match kind {
            KIND_EVENTS => {
                let r = events::decode(&content, &mut stacks, |ev| {
                    events += 1;
                    last_ts = last_ts.max(ev.ts_ns());
                    each(&ev);
                });
                if let Err(e) = r {
                    break Some(format!("events at offset {offset}: {e}"));
                }
            }
            KIND_META => match serde_json::from_slice::<Meta>(&content) {
                Ok(meta) if !more(&meta) => {
                    if let Meta::Start(s) = meta {
                        start = Some(s);
                    }
                    offset += (BLOCK_HEADER_LEN + len) as u64;
                    integrity.blocks += 1;
                    break None;
                }
                Ok(Meta::Start(s)) => start = Some(s),
                Ok(Meta::Target { target }) => {
                    if let Some(s) = &mut start {
                        s.target = target;
                    }
                }
                Ok(Meta::Probes { probes: p }) => {
                    probes = p.into_iter().map(Probes::from).collect()
                }
                Ok(Meta::Process { pid, comm }) => {
                    symbols.comms.insert(pid, comm);
                }
                Ok(Meta::Symbols { pid, addresses }) => {
                    for (addr, frames) in addresses {
                        symbols.frames.insert((pid, addr), frames);
                    }
                }
                Ok(Meta::Counters(c)) => counters = c,
                Ok(Meta::End {
                    end_ns,
                    duration_s,
                    counters: c,
                }) => {
                    counters = c;
                    end = Some((end_ns, duration_s));
                }
                // A block of a kind added later within the same version
                // is skipped, not fatal.
                Err(_) => {}
            },
            _ => {}
        }
        offset += (BLOCK_HEADER_LEN + len) as u64;
        integrity.blocks += 1;
    };
    integrity.cut_bytes = file_bytes.saturating_sub(offset);
    integrity.damage = damage;
    integrity.complete = end.is_some();
    let start = start.ok_or_else(|| bad(path, "its first block is missing or damaged"))?;
    let (end_ns, duration_s) = end.unwrap_or_else(|| {
        let end = last_ts.max(start.start_ns);
        (end, end.saturating_sub(start.start_ns) as f64 / 1e9)
    });
    Ok(Recording {
        start,
        probes,
        counters,
        end_ns,
        duration_s,
        events,
        integrity,
        symbols,
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::writer::Recorder;
    use super::*;
    use crate::event::Alloc;
    use memtrace_common::AllocFn;

    struct NoSymbols;
    impl Symbolize for NoSymbols {
        fn frames(&mut self, _pid: u32, stack: &[u64]) -> Vec<Frame> {
            stack
                .iter()
                .map(|&a| Frame {
                    function: Some(format!("f{a:x}")),
                    address: a,
                    module_offset: Some(a - 0x1000),
                    build_id: Some("abcd".into()),
                    ..Frame::default()
                })
                .collect()
        }
        fn comm(&self, _pid: u32) -> Option<String> {
            Some("prog".into())
        }
    }

    fn start() -> Start {
        Start {
            memtrace: "test".into(),
            start_ns: 1000,
            start_unix_ms: 0,
            host: "h".into(),
            target: "t".into(),
            argv: vec![],
            min_size: 0,
            max_size: u64::MAX,
            temporary_ns: 1_000_000,
            fault_sample: crate::agg::DEFAULT_FAULT_SAMPLE,
        }
    }

    fn events(n: u64) -> Vec<Event> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(Event::Alloc(Alloc {
                pid: 7,
                tid: 7,
                ts_ns: 2000 + i * 10,
                entry_ts_ns: 1995 + i * 10,
                addr: 0x10000 + (i % 8) * 32,
                size: 24,
                func: AllocFn::Malloc,
                old_addr: None,
                stack: vec![0x5000 + (i % 3), 0x6000],
                sample_shift: 0,
            }));
            out.push(Event::Free {
                pid: 7,
                ts_ns: 2005 + i * 10,
                addr: 0x10000 + (i % 8) * 32,
            });
        }
        out
    }

    fn write(path: &Path, evs: &[Event], finish: bool) {
        let mut rec = Recorder::create(path, start()).unwrap();
        for (i, e) in evs.iter().enumerate() {
            rec.record(e);
            if i % 1000 == 999 {
                rec.flush(&mut NoSymbols, &Counters::default()).unwrap();
            }
        }
        let c = Counters {
            traced_calls: evs.len() as u64,
            ..Counters::default()
        };
        if finish {
            rec.finish(&mut NoSymbols, &c, 99_000, 1.5).unwrap();
        } else {
            rec.flush(&mut NoSymbols, &c).unwrap();
        }
    }

    #[test]
    fn round_trip_keeps_events_symbols_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.mtr");
        let evs = events(5000);
        write(&path, &evs, true);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut back = Vec::new();
        let mut rec = replay(&path, |e| back.push(e.clone())).unwrap();
        assert_eq!(back, evs);
        assert!(rec.integrity.complete);
        assert_eq!(rec.integrity.cut_bytes, 0);
        assert_eq!((rec.end_ns, rec.duration_s), (99_000, 1.5));
        assert_eq!(rec.counters.traced_calls, 10_000);
        assert_eq!(rec.symbols.comm(7).as_deref(), Some("prog"));
        let f = rec.symbols.frames(7, &[0x5001, 0x9999]);
        assert_eq!(f[0].function.as_deref(), Some("f5001"));
        assert_eq!(f[0].build_id.as_deref(), Some("abcd"));
        assert_eq!(f[1].function, None);
    }

    #[test]
    fn truncated_anywhere_reads_up_to_the_last_complete_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.mtr");
        let evs = events(3000);
        write(&path, &evs, false);
        let full = std::fs::read(&path).unwrap();
        let mut last_count = usize::MAX;
        for cut in (HEADER_LEN + 1..full.len()).rev().step_by(97) {
            std::fs::write(&path, &full[..cut]).unwrap();
            let mut n = 0;
            match replay(&path, |_| n += 1) {
                Ok(rec) => {
                    assert!(!rec.integrity.complete);
                    assert_eq!(rec.events as usize, n);
                    assert!(n <= last_count.min(evs.len()));
                    last_count = n;
                    if rec.integrity.cut_bytes > 0 {
                        assert!(rec.integrity.damage.is_some());
                    }
                }
                // Cut inside the first (start) block.
                Err(e) => assert!(e.message.contains("first block"), "{}", e.message),
            }
        }
        // A flipped byte in the middle stops reading there.
        let mut bad = full.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let rec = replay(&path, |_| {}).unwrap();
        assert!(rec.integrity.cut_bytes > 0);
        assert!(rec.events < evs.len() as u64);
    }

    #[test]
    fn not_a_recording_and_newer_versions_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"hello world, not a recording").unwrap();
        let e = replay(&path, |_| {}).unwrap_err();
        assert!(
            e.message.contains("not a memtrace recording"),
            "{}",
            e.message
        );
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&(VERSION + 1).to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        std::fs::write(&path, &h).unwrap();
        let e = replay(&path, |_| {}).unwrap_err();
        assert!(e.message.contains("format version"), "{}", e.message);
    }

    #[test]
    fn new_kinds_of_stacks_are_defined_once_and_kernel_frames_kept() {
        use crate::event::{Kmem, Rss, Vm, VmCall};
        use memtrace_common::{KmemOp, RssMember};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.mtr");
        let kstack = vec![0xffff_ffff_8162_d2a1, 0xffff_ffff_8150_0010];
        let kmem = |pid, ts_ns, stack: &Vec<u64>| {
            Event::Kmem(Kmem {
                pid,
                ts_ns,
                op: KmemOp::Kmalloc,
                space: KmemOp::Kmalloc,
                addr: 0xffff_8880_0000_1000,
                bytes_req: 100,
                bytes_alloc: 128,
                stack: stack.clone(),
            })
        };
        let rss = |stack: Vec<u64>| {
            Event::Rss(Rss {
                pid: 7,
                ts_ns: 3000,
                member: RssMember::Anon,
                bytes: 4096,
                delta: 4096,
                fault: Some(0x10000),
                sampled: true,
                stack,
            })
        };
        let evs = vec![
            (rss(vec![]), false),
            (rss(vec![0x5000, 0x6000]), true),
            (rss(vec![0x5000, 0x6000]), false),
            (
                Event::Vm(Vm {
                    pid: 7,
                    ts_ns: 3100,
                    call: VmCall::Munmap {
                        addr: 0x7f00_0000_0000,
                        len: 4096,
                    },
                    by_allocator: false,
                    stack: vec![0x5000, 0x6000],
                }),
                false,
            ),
            (kmem(7, 3200, &kstack), true),
            (kmem(7, 3300, &kstack), false),
            // The same kernel stack in another process is its own stack,
            // but its frames are written once.
            (kmem(8, 3400, &kstack), true),
            (kmem(8, 3500, &Vec::new()), false),
            (
                Event::Exec {
                    pid: 8,
                    ts_ns: 3600,
                    comm: None,
                },
                false,
            ),
        ];
        let mut rec = Recorder::create(&path, start()).unwrap();
        for (i, (e, new)) in evs.iter().enumerate() {
            assert_eq!(rec.record(e), *new, "event {i}: {e:?}");
        }
        rec.finish(&mut NoSymbols, &Counters::default(), 9000, 1.0)
            .unwrap();

        let mut kernel_blocks = 0;
        let mut back = Vec::new();
        let mut rec = scan(&path, &mut |e| back.push(e.clone()), &mut |m| {
            if let Meta::Symbols { pid, addresses } = m
                && addresses.iter().any(|(a, _)| is_kernel(*a))
            {
                assert_eq!(*pid, KERNEL_PID);
                assert_eq!(addresses.len(), 2);
                kernel_blocks += 1;
            }
            true
        })
        .unwrap();
        assert_eq!(kernel_blocks, 1);
        let expected: Vec<Event> = evs.into_iter().map(|(e, _)| e).collect();
        assert_eq!(back, expected);
        for pid in [7, 8, 9] {
            let f = rec.symbols.frames(pid, &kstack);
            assert_eq!(f[0].function.as_deref(), Some("fffffffff8162d2a1"));
        }
        assert_eq!(rec.symbols.frames(8, &[0x5000])[0].function, None);
    }

    #[test]
    fn version_1_recordings_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.mtr");
        let evs = events(10);
        write(&path, &evs, true);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let mut back = Vec::new();
        let rec = replay(&path, |e| back.push(e.clone())).unwrap();
        assert_eq!(back, evs);
        assert!(rec.integrity.complete);
    }

    /// Writes a large synthetic recording for the bounded-memory check of
    /// `memtrace report` (see README, "Recordings"):
    /// `MEMTRACE_BIG=/tmp/big.mtr MEMTRACE_BIG_EVENTS=100000000 cargo test
    /// --release -p memtrace --lib big_recording -- --ignored`, then
    /// `/usr/bin/time -v memtrace report /tmp/big.mtr`.
    #[test]
    #[ignore = "writes a large file; run by hand"]
    fn big_recording() {
        let path = std::env::var("MEMTRACE_BIG").unwrap_or("/tmp/big.mtr".into());
        let n: u64 = std::env::var("MEMTRACE_BIG_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000_000);
        let mut rec = Recorder::create(Path::new(&path), start()).unwrap();
        // Pairs of malloc and free from 1,000 stacks; 4,096 blocks live at
        // any time, so the aggregator's state stays small however long.
        let mut ts = 2000;
        for i in 0..n / 2 {
            ts += 100 + (i % 7) * 13;
            let addr = 0x10_0000 + ((i % 4096) * 64);
            if i >= 4096 {
                rec.record(&Event::Free {
                    pid: 7,
                    ts_ns: ts,
                    addr,
                });
            }
            rec.record(&Event::Alloc(Alloc {
                pid: 7,
                tid: 7 + (i % 4) as u32,
                ts_ns: ts + 50,
                entry_ts_ns: ts + 10,
                addr,
                size: 16 + (i * 37) % 4081,
                func: AllocFn::Malloc,
                old_addr: None,
                stack: vec![0x5000 + (i % 1000), 0x6000 + (i % 10), 0x7000],
                sample_shift: 0,
            }));
            if i % 1_000_000 == 0 {
                rec.flush(&mut NoSymbols, &Counters::default()).unwrap();
            }
        }
        let c = Counters {
            traced_calls: n,
            ..Counters::default()
        };
        let bytes = rec
            .finish(&mut NoSymbols, &c, ts + 100, ts as f64 / 1e9)
            .unwrap();
        eprintln!("{path}: {n} events, {bytes} bytes");
    }

    proptest::proptest! {
        /// A recording damaged anywhere (bytes changed, cut short) reads as
        /// an error or as fewer events, never a panic and never more events.
        #[test]
        fn damaged_recordings_read_or_fail(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), 1..=255u8),
                0..6,
            ),
            keep in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r");
            let evs = events(300);
            write(&path, &evs, true);
            let mut bytes = std::fs::read(&path).unwrap();
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            bytes.truncate(keep.index(bytes.len() + 1));
            std::fs::write(&path, &bytes).unwrap();
            let mut n = 0;
            if replay(&path, |_| n += 1).is_ok() {
                proptest::prop_assert!(n <= evs.len(), "{} events read from {} written", n, evs.len());
            }
        }
    }
}
