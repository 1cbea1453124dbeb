//! The agent's always-on tier: what the kernel tracepoints say about every
//! process on the host, kept as a few counters per process (RSS by type,
//! page faults and the stacks of the sampled ones, address-space calls,
//! kernel memory, OOM kills), bounded in processes and stacks.
//!
//! A pure function of the event stream, like the aggregator, but made for
//! a process that runs for weeks: no per-mapping or per-block state, and
//! exited processes are dropped once exported ([`HostTier::take_exited`]).
//! Not here: the allocator samples (`estimate`), names (`select`).

use std::collections::HashMap;

use memtrace_common::RssMember;

use memtrace_common::KmemOp;

use crate::event::{Event, VmCall};

/// Caps on what is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Processes tracked.
    pub processes: usize,
    /// Distinct page-fault stacks per process.
    pub fault_stacks: usize,
}

/// One page-fault stack: how many sampled faults it took, and their bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStack {
    /// Return addresses, innermost first (empty: the overflow stack).
    pub frames: Box<[u64]>,
    /// Sampled faults.
    pub faults: u64,
    /// Bytes they made resident.
    pub bytes: u64,
    /// Faults and bytes as of the last profile.
    exported: (u64, u64),
}

/// One fault stack's figures over a profile period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeriodFaults {
    /// Index into [`HostProcess::fault_stacks`].
    pub index: usize,
    /// Sampled faults in the period.
    pub faults: u64,
    /// Bytes they made resident.
    pub bytes: u64,
}

/// One process as the kernel side saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostProcess {
    /// Process id.
    pub pid: u32,
    /// RSS by [`RssMember`], bytes (from `kmem:rss_stat`, seeded from /proc).
    pub rss: [u64; 4],
    /// Page faults that made memory resident.
    pub faults: u64,
    /// The bytes they made resident.
    pub fault_bytes: u64,
    /// Sampled faults by stack.
    pub fault_stacks: Vec<FaultStack>,
    /// Sampled faults whose stack was over the cap.
    pub fault_stacks_over_cap: u64,
    /// `mmap` calls that succeeded, and their bytes.
    pub mmaps: u64,
    /// Bytes mapped by them.
    pub mmap_bytes: u64,
    /// Bytes unmapped by `munmap`.
    pub munmap_bytes: u64,
    /// Program break growth since first seen, bytes.
    pub brk_bytes: i64,
    /// Kernel memory charged to it (slab, pages, per-CPU), live, bytes.
    pub kernel_bytes: u64,
    /// Kernel memory allocated on its behalf in all, bytes.
    pub kernel_allocated_bytes: u64,
    /// Times the OOM killer chose it.
    pub oom_kills: u64,
    /// Its exit was seen.
    pub exited: bool,
    first_brk: Option<u64>,
    stack_ids: HashMap<Box<[u64]>, usize>,
}

impl HostProcess {
    /// Resident bytes, all types but swap.
    pub fn resident(&self) -> u64 {
        self.rss[RssMember::File as usize]
            + self.rss[RssMember::Anon as usize]
            + self.rss[RssMember::Shmem as usize]
    }
}

/// Every process's always-on counters.
#[derive(Debug)]
pub struct HostTier {
    limits: Limits,
    processes: HashMap<u32, HostProcess>,
    /// Events of processes over [`Limits::processes`], not kept.
    pub processes_over_cap: u64,
    /// OOM kills on the host since the start (processes come and go).
    pub oom_kills: u64,
}

impl HostTier {
    /// An empty tier.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            processes: HashMap::new(),
            processes_over_cap: 0,
            oom_kills: 0,
        }
    }

    /// Whether `pid` is tracked.
    pub fn knows(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    fn process(&mut self, pid: u32) -> Option<&mut HostProcess> {
        if !self.processes.contains_key(&pid) {
            if self.processes.len() >= self.limits.processes {
                self.processes_over_cap += 1;
                return None;
            }
            self.processes.insert(
                pid,
                HostProcess {
                    pid,
                    ..HostProcess::default()
                },
            );
        }
        self.processes.get_mut(&pid)
    }

    /// Applies one kernel-side event (allocator samples are ignored).
    pub fn on_event(&mut self, ev: &Event) {
        let fault_cap = self.limits.fault_stacks;
        match ev {
            Event::Rss(r) => {
                let Some(p) = self.process(r.pid) else {
                    return;
                };
                p.rss[r.member as usize] = r.bytes;
                if r.fault.is_some() {
                    p.faults += 1;
                    let bytes = r.delta.max(0) as u64;
                    p.fault_bytes += bytes;
                    if r.sampled && !r.stack.is_empty() {
                        let id = match p.stack_ids.get(r.stack.as_slice()) {
                            Some(&id) => id,
                            None if p.fault_stacks.len() < fault_cap => {
                                p.fault_stacks.push(FaultStack {
                                    frames: r.stack.clone().into(),
                                    ..FaultStack::default()
                                });
                                let id = p.fault_stacks.len() - 1;
                                p.stack_ids.insert(r.stack.clone().into(), id);
                                id
                            }
                            None => {
                                p.fault_stacks_over_cap += 1;
                                return;
                            }
                        };
                        p.fault_stacks[id].faults += 1;
                        p.fault_stacks[id].bytes += bytes;
                    }
                }
            }
            Event::Vm(v) => {
                let Some(p) = self.process(v.pid) else {
                    return;
                };
                match v.call {
                    VmCall::Mmap { len, .. } => {
                        p.mmaps += 1;
                        p.mmap_bytes += len;
                    }
                    VmCall::Munmap { len, .. } => p.munmap_bytes += len,
                    VmCall::Mremap {
                        old_len, new_len, ..
                    } => {
                        p.mmap_bytes += new_len;
                        p.munmap_bytes += old_len;
                    }
                    VmCall::Brk { brk, .. } => {
                        let first = *p.first_brk.get_or_insert(brk);
                        p.brk_bytes = brk as i64 - first as i64;
                    }
                    VmCall::Madvise { .. } => {}
                }
            }
            Event::Kmem(k) => {
                let Some(p) = self.process(k.pid) else {
                    return;
                };
                match k.op {
                    KmemOp::Free => p.kernel_bytes = p.kernel_bytes.saturating_sub(k.bytes_alloc),
                    _ => {
                        p.kernel_bytes += k.bytes_alloc;
                        p.kernel_allocated_bytes += k.bytes_alloc;
                    }
                }
            }
            Event::Oom(o) => {
                self.oom_kills += 1;
                if let Some(p) = self.process(o.pid) {
                    p.oom_kills += 1;
                }
            }
            Event::Exit { pid, .. } => {
                if let Some(p) = self.processes.get_mut(pid) {
                    p.exited = true;
                }
            }
            Event::Exec { pid, .. } => {
                if let Some(p) = self.processes.get_mut(pid) {
                    p.first_brk = None;
                    p.brk_bytes = 0;
                }
            }
            _ => {}
        }
    }

    /// Every process tracked.
    pub fn processes(&self) -> impl Iterator<Item = &HostProcess> {
        self.processes.values()
    }

    /// One process.
    pub fn process_ref(&self, pid: u32) -> Option<&HostProcess> {
        self.processes.get(&pid)
    }

    /// The fault stacks of `pid` with new sampled faults since the last
    /// call, and those figures.
    pub fn fault_period(&mut self, pid: u32) -> Vec<PeriodFaults> {
        let Some(p) = self.processes.get_mut(&pid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (index, s) in p.fault_stacks.iter_mut().enumerate() {
            let (faults, bytes) = (s.faults - s.exported.0, s.bytes - s.exported.1);
            s.exported = (s.faults, s.bytes);
            if faults > 0 {
                out.push(PeriodFaults {
                    index,
                    faults,
                    bytes,
                });
            }
        }
        out
    }

    /// Forgets process `pid` now (its pid was reused).
    pub fn remove(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Removes the processes that exited, after their last export.
    pub fn take_exited(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = self
            .processes
            .values()
            .filter(|p| p.exited)
            .map(|p| p.pid)
            .collect();
        for pid in &gone {
            self.processes.remove(pid);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kmem, Rss, Vm};

    fn rss(pid: u32, member: RssMember, bytes: u64, delta: i64, stack: &[u64]) -> Event {
        Event::Rss(Rss {
            pid,
            ts_ns: 1,
            member,
            bytes,
            delta,
            fault: Some(0x1000),
            sampled: !stack.is_empty(),
            stack: stack.to_vec(),
        })
    }

    #[test]
    fn counts_rss_faults_maps_kernel_and_ooms() {
        let mut h = HostTier::new(Limits {
            processes: 1,
            fault_stacks: 1,
        });
        h.on_event(&rss(1, RssMember::Anon, 8192, 4096, &[1, 2]));
        h.on_event(&rss(1, RssMember::Anon, 12288, 4096, &[1, 2]));
        h.on_event(&rss(1, RssMember::Anon, 16384, 4096, &[3]));
        h.on_event(&rss(1, RssMember::File, 4096, 0, &[]));
        h.on_event(&Event::Vm(Vm {
            pid: 1,
            ts_ns: 2,
            call: VmCall::Mmap {
                addr: 0x7000,
                len: 1 << 20,
                prot: 3,
                flags: 0x22,
                fd: -1,
            },
            by_allocator: false,
            stack: Vec::new(),
        }));
        for brk in [0x10000u64, 0x30000] {
            h.on_event(&Event::Vm(Vm {
                pid: 1,
                ts_ns: 3,
                call: VmCall::Brk {
                    requested: brk,
                    brk,
                },
                by_allocator: false,
                stack: Vec::new(),
            }));
        }
        for op in [KmemOp::Kmalloc, KmemOp::Free] {
            h.on_event(&Event::Kmem(Kmem {
                pid: 1,
                ts_ns: 4,
                op,
                space: KmemOp::Kmalloc,
                addr: 0xffff_0000,
                bytes_req: 100,
                bytes_alloc: 128,
                stack: Vec::new(),
            }));
        }
        h.on_event(&rss(2, RssMember::Anon, 1, 1, &[]));
        let p = h.process_ref(1).unwrap();
        assert_eq!(p.rss[RssMember::Anon as usize], 16384);
        assert_eq!(p.resident(), 16384 + 4096);
        assert_eq!((p.faults, p.fault_bytes), (4, 12288));
        assert_eq!(p.fault_stacks.len(), 1);
        assert_eq!(p.fault_stacks[0].faults, 2);
        assert_eq!(p.fault_stacks_over_cap, 1);
        assert_eq!((p.mmaps, p.mmap_bytes), (1, 1 << 20));
        assert_eq!(p.brk_bytes, 0x20000);
        assert_eq!((p.kernel_bytes, p.kernel_allocated_bytes), (0, 128));
        assert_eq!(h.processes_over_cap, 1);
        let period = h.fault_period(1);
        assert_eq!(period.len(), 1);
        assert_eq!((period[0].faults, period[0].bytes), (2, 8192));
        assert!(h.fault_period(1).is_empty());
        h.on_event(&Event::Exit { pid: 1, ts_ns: 9 });
        assert_eq!(h.take_exited(), vec![1]);
        assert!(!h.knows(1));
    }
}
