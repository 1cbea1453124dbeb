//! Estimates from the sampled allocator tier: per process and stack, the
//! allocations and bytes that the samples stand for, allocated in all and
//! live now.
//!
//! A pure function of the sample stream ([`Estimates::on_event`]): every
//! sampled allocation adds its weights ([`weight::weights`]) to its stack's
//! totals and to the live ones until its free arrives (the kernel side
//! forwards only the frees of sampled blocks). Bounded: at most
//! [`Limits::stacks`] stacks per process (later ones are folded into one
//! overflow stack, counted) and [`Limits::processes`] processes (samples of
//! others are dropped, counted). Not here: deciding what is sampled
//! (eBPF), names of frames (`symbolize`), exporting (`metrics`,
//! `profiles`).

use std::collections::HashMap;

use super::weight;
use crate::event::Event;

/// Upper bounds of the allocation-size histogram's buckets, bytes (a last,
/// unbounded bucket follows).
pub const SIZE_BUCKETS: [u64; 12] = [
    16,
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];

/// Caps on what is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Distinct stacks per process.
    pub stacks: usize,
    /// Processes with samples.
    pub processes: usize,
}

/// Estimated totals of one stack (or of a process).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Samples taken.
    pub samples: u64,
    /// Allocations they stand for.
    pub alloc_count: f64,
    /// Bytes they stand for.
    pub alloc_bytes: f64,
    /// Live allocations they stand for.
    pub live_count: f64,
    /// Live bytes they stand for.
    pub live_bytes: f64,
    /// Estimated variances of `alloc_count`, `alloc_bytes`, `live_count`
    /// and `live_bytes` ([`weight::variances`]).
    pub variance: [f64; 4],
}

impl Totals {
    fn add(&mut self, s: &LiveSample) {
        self.samples += 1;
        self.alloc_count += s.count;
        self.alloc_bytes += s.bytes;
        self.live_count += s.count;
        self.live_bytes += s.bytes;
        let [vc, vb] = s.variance;
        self.variance = [
            self.variance[0] + vc,
            self.variance[1] + vb,
            self.variance[2] + vc,
            self.variance[3] + vb,
        ];
    }

    fn release(&mut self, s: &LiveSample) {
        // Sums of floats drift: never below zero.
        self.live_count = (self.live_count - s.count).max(0.0);
        self.live_bytes = (self.live_bytes - s.bytes).max(0.0);
        self.variance[2] = (self.variance[2] - s.variance[0]).max(0.0);
        self.variance[3] = (self.variance[3] - s.variance[1]).max(0.0);
    }

    fn clear_live(&mut self) {
        self.live_count = 0.0;
        self.live_bytes = 0.0;
        self.variance[2] = 0.0;
        self.variance[3] = 0.0;
    }

    /// The standard errors of `alloc_count`, `alloc_bytes`, `live_count`
    /// and `live_bytes`.
    pub fn std_errors(&self) -> [f64; 4] {
        self.variance.map(f64::sqrt)
    }
}

/// One stack's estimates.
#[derive(Clone, Debug, PartialEq)]
pub struct StackEstimate {
    /// Return addresses, innermost first; empty for the overflow stack.
    pub frames: Box<[u64]>,
    /// Its totals.
    pub totals: Totals,
    /// Allocations and bytes as of the last profile period.
    exported: (f64, f64),
}

/// One stack's figures over a profile period.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeriodStack {
    /// Index into [`ProcessEstimate::stacks`].
    pub index: usize,
    /// Allocations estimated in the period.
    pub alloc_count: f64,
    /// Bytes estimated in the period.
    pub alloc_bytes: f64,
    /// Live allocations at its end.
    pub live_count: f64,
    /// Live bytes at its end.
    pub live_bytes: f64,
}

/// A live sampled block.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LiveSample {
    stack: u32,
    count: f64,
    bytes: f64,
    /// Its share of the variances of counts and bytes.
    variance: [f64; 2],
}

/// One process's estimates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessEstimate {
    /// Process id.
    pub pid: u32,
    /// Whole-process totals.
    pub totals: Totals,
    /// By stack; index 0 onwards in order of first sight.
    pub stacks: Vec<StackEstimate>,
    /// Estimated allocations by size bucket ([`SIZE_BUCKETS`], then one
    /// for larger sizes).
    pub size_buckets: [f64; SIZE_BUCKETS.len() + 1],
    /// Samples whose stack was over the cap, folded into the overflow stack.
    pub stacks_over_cap: u64,
    /// Frees forwarded for blocks not known live here (sampled before a
    /// restart of the estimates, or a record lost).
    pub unknown_frees: u64,
    /// Its exit was seen.
    pub exited: bool,
    /// Sampling stopped (backed off); live estimates were dropped then.
    pub stopped: bool,
    /// The highest thinning shift of its samples: under its budget, one
    /// sample point in `2^max_shift` was kept at times (weighed for).
    pub max_shift: u32,
    /// The kernel side's state of its sampling: thinning, and samples lost
    /// to a full table (set by the agent, [`Estimates::note_kernel`]).
    pub budget: memtrace_common::Budget,
    /// Its samples the full ring buffer dropped (set by the agent).
    pub ring_lost: u64,
    live: HashMap<u64, LiveSample>,
    stack_ids: HashMap<Box<[u64]>, u32>,
    overflow: Option<u32>,
}

impl ProcessEstimate {
    fn stack_id(&mut self, frames: &[u64], cap: usize) -> u32 {
        if let Some(&id) = self.stack_ids.get(frames) {
            return id;
        }
        if self.stacks.len() >= cap {
            self.stacks_over_cap += 1;
            if let Some(id) = self.overflow {
                return id;
            }
            let id = self.stacks.len() as u32;
            self.stacks.push(StackEstimate {
                frames: Box::new([]),
                totals: Totals::default(),
                exported: (0.0, 0.0),
            });
            self.overflow = Some(id);
            return id;
        }
        let id = self.stacks.len() as u32;
        self.stacks.push(StackEstimate {
            frames: frames.into(),
            totals: Totals::default(),
            exported: (0.0, 0.0),
        });
        self.stack_ids.insert(frames.into(), id);
        id
    }

    /// Addresses of the sampled blocks live now.
    pub fn live_addresses(&self) -> Vec<u64> {
        self.live.keys().copied().collect()
    }

    /// Whether stack `id` is the overflow stack.
    pub fn is_overflow(&self, id: usize) -> bool {
        self.overflow == Some(id as u32)
    }

    /// Samples lost before they reached the estimates, not weighed for:
    /// the estimates are short by what they stood for.
    pub fn samples_lost(&self) -> u64 {
        self.budget.table_full + self.ring_lost
    }

    /// One line of `key=value` pairs: the estimates with their standard
    /// errors, the thinning the budget applied (weighed for: no bias), and
    /// what was lost (`complete=no` then).
    pub fn summary(&self) -> String {
        let t = &self.totals;
        let [ec, eb, elc, elb] = t.std_errors();
        format!(
            "alloc_bytes={:.0}±{eb:.0} alloc_count={:.0}±{ec:.0} live_bytes={:.0}±{elb:.0} \
             live_count={:.0}±{elc:.0} samples={} max_shift={} thinned={} table_full={} \
             ring_lost={} unknown_frees={} stacks_over_cap={} complete={}",
            t.alloc_bytes,
            t.alloc_count,
            t.live_bytes,
            t.live_count,
            t.samples,
            self.max_shift.max(self.budget.max_shift as u32),
            self.budget.thinned,
            self.budget.table_full,
            self.ring_lost,
            self.unknown_frees,
            self.stacks_over_cap,
            if self.samples_lost() == 0 && !self.stopped {
                "yes"
            } else {
                "no"
            },
        )
    }
}

/// Every process's estimates.
#[derive(Debug)]
pub struct Estimates {
    mean: u64,
    limits: Limits,
    processes: HashMap<u32, ProcessEstimate>,
    /// Samples of processes over [`Limits::processes`], dropped.
    pub processes_over_cap: u64,
}

impl Estimates {
    /// Estimates of samples taken with mean interval `mean` bytes.
    pub fn new(mean: u64, limits: Limits) -> Self {
        Self {
            mean,
            limits,
            processes: HashMap::new(),
            processes_over_cap: 0,
        }
    }

    /// Applies one record: a sample, a forwarded free, an exit.
    pub fn on_event(&mut self, ev: &Event) {
        match ev {
            Event::Alloc(a) => {
                if !self.processes.contains_key(&a.pid)
                    && self.processes.len() >= self.limits.processes
                {
                    self.processes_over_cap += 1;
                    return;
                }
                let (count, bytes) = weight::weights(a.size, self.mean, a.sample_shift);
                let (vc, vb) = weight::variances(a.size, self.mean, a.sample_shift);
                let cap = self.limits.stacks;
                let p = self
                    .processes
                    .entry(a.pid)
                    .or_insert_with(|| ProcessEstimate {
                        pid: a.pid,
                        ..ProcessEstimate::default()
                    });
                p.max_shift = p.max_shift.max(a.sample_shift);
                let stack = p.stack_id(&a.stack, cap);
                let sample = LiveSample {
                    stack,
                    count,
                    bytes,
                    variance: [vc, vb],
                };
                p.stacks[stack as usize].totals.add(&sample);
                p.totals.add(&sample);
                let bucket = SIZE_BUCKETS
                    .iter()
                    .position(|&b| a.size <= b)
                    .unwrap_or(SIZE_BUCKETS.len());
                p.size_buckets[bucket] += count;
                // A block handed out again while we thought it live: its
                // free was lost; it is not live twice.
                if let Some(old) = p.live.insert(a.addr, sample) {
                    p.stacks[old.stack as usize].totals.release(&old);
                    p.totals.release(&old);
                }
            }
            Event::Free { pid, addr, .. } => {
                let Some(p) = self.processes.get_mut(pid) else {
                    return;
                };
                match p.live.remove(addr) {
                    Some(s) => {
                        p.stacks[s.stack as usize].totals.release(&s);
                        p.totals.release(&s);
                    }
                    None => p.unknown_frees += 1,
                }
            }
            Event::Exit { pid, .. } => {
                if let Some(p) = self.processes.get_mut(pid) {
                    p.exited = true;
                }
            }
            // A new process under a reused pid: the old one is gone.
            Event::Fork { pid, .. } => {
                if let Some(p) = self.processes.get_mut(pid) {
                    p.exited = true;
                }
            }
            // An exec's new address space holds none of the old blocks: the
            // caller drops them with `drop_live`, which says which they were
            // (the kernel side's table forgets them too).
            _ => {}
        }
    }

    /// Stops estimating the live blocks of `pid` (its sampling backed off:
    /// their frees will not be seen). Totals stay. Returns the addresses
    /// that were live.
    pub fn stop(&mut self, pid: u32) -> Vec<u64> {
        let addrs = self.drop_live(pid);
        if let Some(p) = self.processes.get_mut(&pid) {
            p.stopped = true;
        }
        addrs
    }

    /// Forgets the live blocks of `pid`; returns their addresses.
    pub fn drop_live(&mut self, pid: u32) -> Vec<u64> {
        let Some(p) = self.processes.get_mut(&pid) else {
            return Vec::new();
        };
        let addrs = p.live_addresses();
        p.live.clear();
        p.totals.clear_live();
        for s in &mut p.stacks {
            s.totals.clear_live();
        }
        addrs
    }

    /// Sampling of `pid` starts again after a back-off.
    pub fn resume(&mut self, pid: u32) {
        if let Some(p) = self.processes.get_mut(&pid) {
            p.stopped = false;
        }
    }

    /// The figures of `pid`'s stacks since the last call (allocations) and
    /// now (live), for a profile: stacks with neither are left out.
    pub fn period(&mut self, pid: u32) -> Vec<PeriodStack> {
        let Some(p) = self.processes.get_mut(&pid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (index, s) in p.stacks.iter_mut().enumerate() {
            let t = s.totals;
            let alloc_count = t.alloc_count - s.exported.0;
            let alloc_bytes = t.alloc_bytes - s.exported.1;
            s.exported = (t.alloc_count, t.alloc_bytes);
            if alloc_count > 0.0 || t.live_count > 0.0 {
                out.push(PeriodStack {
                    index,
                    alloc_count,
                    alloc_bytes,
                    live_count: t.live_count,
                    live_bytes: t.live_bytes,
                });
            }
        }
        out
    }

    /// The processes with estimates.
    pub fn processes(&self) -> impl Iterator<Item = &ProcessEstimate> {
        self.processes.values()
    }

    /// One process's estimates.
    pub fn process(&self, pid: u32) -> Option<&ProcessEstimate> {
        self.processes.get(&pid)
    }

    /// Keeps the kernel side's figures of process `pid`: its budget state
    /// and its samples the ring buffer dropped.
    pub fn note_kernel(&mut self, pid: u32, budget: memtrace_common::Budget, ring_lost: u64) {
        if let Some(p) = self.processes.get_mut(&pid) {
            p.budget = budget;
            p.ring_lost = ring_lost;
        }
    }

    /// Forgets process `pid` now (its pid was reused).
    pub fn remove(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Removes the processes that exited and returns them (after their
    /// last export).
    pub fn take_exited(&mut self) -> Vec<ProcessEstimate> {
        let gone: Vec<u32> = self
            .processes
            .values()
            .filter(|p| p.exited)
            .map(|p| p.pid)
            .collect();
        gone.iter()
            .filter_map(|pid| self.processes.remove(pid))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Alloc;
    use memtrace_common::AllocFn;

    fn alloc(pid: u32, addr: u64, size: u64, stack: &[u64]) -> Event {
        Event::Alloc(Alloc {
            pid,
            tid: pid,
            ts_ns: 1,
            entry_ts_ns: 0,
            addr,
            size,
            func: AllocFn::Malloc,
            old_addr: None,
            stack: stack.to_vec(),
            sample_shift: 0,
        })
    }

    fn free(pid: u32, addr: u64) -> Event {
        Event::Free {
            pid,
            ts_ns: 2,
            addr,
        }
    }

    const LIMITS: Limits = Limits {
        stacks: 2,
        processes: 2,
    };

    #[test]
    fn samples_weigh_and_frees_release() {
        let mean = 1024;
        let mut e = Estimates::new(mean, LIMITS);
        e.on_event(&alloc(1, 0x10, 100, &[1, 2]));
        e.on_event(&alloc(1, 0x20, 1 << 20, &[3]));
        let (c, b) = weight::weights(100, mean, 0);
        let p = e.process(1).unwrap();
        assert_eq!(p.stacks.len(), 2);
        assert_eq!(p.stacks[0].totals.alloc_bytes, b);
        assert_eq!(p.stacks[0].totals.alloc_count, c);
        assert_eq!(p.stacks[1].totals.live_bytes, (1u64 << 20) as f64);
        assert_eq!(p.totals.samples, 2);
        e.on_event(&free(1, 0x10));
        e.on_event(&free(1, 0x99));
        let p = e.process(1).unwrap();
        assert_eq!(p.stacks[0].totals.live_bytes, 0.0);
        assert_eq!(p.stacks[0].totals.alloc_bytes, b);
        assert_eq!(p.totals.live_bytes, (1u64 << 20) as f64);
        assert_eq!(p.unknown_frees, 1);
        // 100 B is in the 256 B bucket; 1 MiB in the 1 MiB one.
        assert_eq!(p.size_buckets[2], c);
        assert_eq!(p.size_buckets[8], 1.0);
    }

    #[test]
    fn a_thinned_sample_weighs_for_the_thinned_and_states_its_error() {
        let mut e = Estimates::new(1024, LIMITS);
        let Event::Alloc(mut a) = alloc(1, 0x10, 100, &[1]) else {
            unreachable!()
        };
        a.sample_shift = 3;
        e.on_event(&Event::Alloc(a));
        let p = e.process(1).unwrap();
        let (c, b) = weight::weights(100, 1024, 0);
        assert!((p.totals.alloc_bytes - 8.0 * b).abs() < 1e-6);
        assert!((p.totals.alloc_count - 8.0 * c).abs() < 1e-9);
        assert_eq!(p.max_shift, 3);
        let (_, vb) = weight::variances(100, 1024, 3);
        assert_eq!(p.totals.std_errors()[1], vb.sqrt());
        assert_eq!(p.totals.std_errors()[3], vb.sqrt());
        e.on_event(&free(1, 0x10));
        let p = e.process(1).unwrap();
        assert_eq!(p.totals.std_errors()[3], 0.0);
        assert_eq!(p.totals.std_errors()[1], vb.sqrt());
        assert!(p.summary().contains(" max_shift=3 "), "{}", p.summary());
        assert!(p.summary().ends_with(" complete=yes"), "{}", p.summary());
        let budget = memtrace_common::Budget {
            table_full: 2,
            ..Default::default()
        };
        e.note_kernel(1, budget, 1);
        let p = e.process(1).unwrap();
        assert_eq!(p.samples_lost(), 3);
        assert!(p.summary().ends_with(" complete=no"), "{}", p.summary());
    }

    #[test]
    fn caps_fold_stacks_and_drop_processes() {
        let mut e = Estimates::new(1, LIMITS);
        e.on_event(&alloc(1, 1, 10, &[1]));
        e.on_event(&alloc(1, 2, 10, &[2]));
        e.on_event(&alloc(1, 3, 10, &[3]));
        e.on_event(&alloc(1, 4, 10, &[4]));
        let p = e.process(1).unwrap();
        assert_eq!(p.stacks.len(), 3);
        assert!(p.is_overflow(2));
        assert_eq!(p.stacks[2].totals.alloc_bytes, 20.0);
        assert_eq!(p.stacks_over_cap, 2);
        e.on_event(&alloc(2, 1, 10, &[1]));
        e.on_event(&alloc(3, 1, 10, &[1]));
        assert!(e.process(3).is_none());
        assert_eq!(e.processes_over_cap, 1);
    }

    #[test]
    fn a_block_reused_unseen_is_not_live_twice() {
        let mut e = Estimates::new(1, LIMITS);
        e.on_event(&alloc(1, 1, 10, &[1]));
        e.on_event(&alloc(1, 1, 30, &[2]));
        let p = e.process(1).unwrap();
        assert_eq!(p.totals.live_bytes, 30.0);
        assert_eq!(p.totals.alloc_bytes, 40.0);
    }

    #[test]
    fn stop_drops_live_and_exits_are_taken() {
        let mut e = Estimates::new(1, LIMITS);
        e.on_event(&alloc(1, 1, 10, &[1]));
        assert_eq!(e.stop(1), vec![1]);
        assert_eq!(e.process(1).unwrap().totals.live_bytes, 0.0);
        assert_eq!(e.process(1).unwrap().totals.alloc_bytes, 10.0);
        let period = e.period(1);
        assert_eq!(period.len(), 1);
        assert_eq!(period[0].alloc_bytes, 10.0);
        // Nothing new since: left out.
        assert!(e.period(1).is_empty());
        e.on_event(&Event::Exit { pid: 1, ts_ns: 5 });
        let gone = e.take_exited();
        assert_eq!(gone.len(), 1);
        assert!(e.process(1).is_none());
    }
}
