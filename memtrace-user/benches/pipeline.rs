//! Decode + aggregate throughput, records per second on one core: the part
//! of memtrace that must keep up with the kernel (`cargo xtask bench` reads
//! criterion's estimate and turns it into records/s).
//!
//! The stream is synthetic but shaped like a real one: 1,000,000 records
//! from one process, allocations of 16..4096 bytes from 1,000 distinct
//! 12-frame stacks, each block freed 4,096 allocations later, so about
//! 4,096 blocks stay live. Before measuring, one pass checks that the
//! aggregator's totals equal the stream's.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memtrace::agg::{Aggregator, Config};
use memtrace::event::{Alloc, decode, encode_alloc, encode_free};
use memtrace_common::AllocFn;

const RECORDS: usize = 1_000_000;
const STACKS: u64 = 1_000;
const LIVE: usize = 4_096;

/// The encoded records, and (allocations, bytes) they hold.
fn stream() -> (Vec<Vec<u8>>, u64, u64) {
    let mut out = Vec::with_capacity(RECORDS);
    let mut addrs: std::collections::VecDeque<u64> = Default::default();
    let (mut allocs, mut bytes) = (0u64, 0u64);
    let mut ts = 1_000u64;
    let mut i = 0u64;
    while out.len() < RECORDS {
        ts += 250;
        if addrs.len() == LIVE {
            let addr = addrs.pop_front().expect("full");
            out.push(encode_free(7, 7, ts, addr));
            continue;
        }
        let stack_no = (i * 7919) % STACKS;
        let stack: Vec<u64> = (0..12)
            .map(|f| 0x40_0000 + stack_no * 0x100 + f * 0x1_0000)
            .collect();
        let size = 16 + (i * 2_654_435_761) % 4081;
        let addr = 0x7f00_0000_0000 + i * 0x1000;
        out.push(encode_alloc(&Alloc {
            pid: 7,
            tid: 7,
            ts_ns: ts,
            entry_ts_ns: ts - 100,
            addr,
            size,
            func: AllocFn::Malloc,
            old_addr: None,
            stack,
            sample_shift: 0,
        }));
        addrs.push_back(addr);
        allocs += 1;
        bytes += size;
        i += 1;
    }
    (out, allocs, bytes)
}

fn run(records: &[Vec<u8>]) -> Aggregator {
    let mut agg = Aggregator::new(Config::default());
    for r in records {
        let ev = decode(r).expect("a well-formed record");
        agg.on_event(&ev);
    }
    agg
}

fn pipeline(c: &mut Criterion) {
    let (records, allocs, bytes) = stream();
    let agg = run(&records);
    let p = agg.processes().next().expect("one process");
    assert_eq!(
        (p.totals.total_count, p.totals.total_bytes),
        (allocs, bytes)
    );
    assert_eq!(p.totals.live_count, LIVE as u64);
    assert_eq!(p.stacks().len() as u64, STACKS);

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(10);
    group.bench_function("decode_aggregate", |b| b.iter(|| run(&records)));
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
