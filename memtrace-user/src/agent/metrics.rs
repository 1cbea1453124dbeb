//! The agent's Prometheus metrics: a [`Snapshot`] of every process's rows
//! and memtrace's own health, cut to the top processes plus one `other`
//! series (bounded cardinality), rendered in the Prometheus text format by
//! prometheus-client.
//!
//! Pure: [`Snapshot::top`] and [`render`] are functions of the rows they
//! are given. Not here: gathering the rows (the agent's loop) or serving
//! them (`http`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::estimate::SIZE_BUCKETS;

/// The sampled tier's estimates of one process's heap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heap {
    /// Estimated live bytes.
    pub live_bytes: f64,
    /// Estimated live allocations.
    pub live_count: f64,
    /// Estimated bytes allocated since sampling started.
    pub alloc_bytes: f64,
    /// Estimated allocations since then.
    pub alloc_count: f64,
    /// Samples taken.
    pub samples: u64,
    /// Estimated variances of `alloc_count`, `alloc_bytes`, `live_count`,
    /// `live_bytes` (their standard errors squared).
    pub variance: [f64; 4],
    /// The thinning shift of the process's sample points now (its budget).
    pub thinning_shift: u64,
    /// Sample points thinned away (weighed for by the kept ones).
    pub thinned: u64,
    /// Samples lost (table full, ring buffer full): not weighed for.
    pub samples_lost: u64,
    /// Estimated allocations per size bucket ([`SIZE_BUCKETS`], then +Inf).
    pub size_buckets: [f64; SIZE_BUCKETS.len() + 1],
}

/// One process's series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// Its pid, or `other`.
    pub pid: String,
    /// Command name.
    pub comm: String,
    /// Cgroup path.
    pub cgroup: String,
    /// Container id, or empty.
    pub container: String,
    /// RSS by type: file, anon, swap, shmem.
    pub rss: [u64; 4],
    /// Page faults that made memory resident.
    pub faults: u64,
    /// Bytes they made resident.
    pub fault_bytes: u64,
    /// mmap calls.
    pub mmaps: u64,
    /// Bytes mapped.
    pub mmap_bytes: u64,
    /// Bytes unmapped.
    pub munmap_bytes: u64,
    /// Program break growth.
    pub brk_bytes: i64,
    /// Kernel memory charged, live.
    pub kernel_bytes: u64,
    /// Kernel memory allocated in all.
    pub kernel_allocated_bytes: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// Heap estimates, for a sampled process.
    pub heap: Option<Heap>,
    /// Why it is sampled now (`selected`, `escalated`), if it is.
    pub sampling: Option<&'static str>,
}

impl Row {
    fn weight(&self) -> f64 {
        let resident = self.rss[0] + self.rss[1] + self.rss[3];
        resident as f64 + self.heap.as_ref().map_or(0.0, |h| h.live_bytes)
    }

    fn add(&mut self, o: &Row) {
        for i in 0..4 {
            self.rss[i] += o.rss[i];
        }
        self.faults += o.faults;
        self.fault_bytes += o.fault_bytes;
        self.mmaps += o.mmaps;
        self.mmap_bytes += o.mmap_bytes;
        self.munmap_bytes += o.munmap_bytes;
        self.brk_bytes += o.brk_bytes;
        self.kernel_bytes += o.kernel_bytes;
        self.kernel_allocated_bytes += o.kernel_allocated_bytes;
        self.oom_kills += o.oom_kills;
        if let Some(h) = &o.heap {
            let mine = self.heap.get_or_insert_with(Heap::default);
            mine.live_bytes += h.live_bytes;
            mine.live_count += h.live_count;
            mine.alloc_bytes += h.alloc_bytes;
            mine.alloc_count += h.alloc_count;
            mine.samples += h.samples;
            for (a, b) in mine.variance.iter_mut().zip(h.variance) {
                *a += b;
            }
            mine.thinning_shift = mine.thinning_shift.max(h.thinning_shift);
            mine.thinned += h.thinned;
            mine.samples_lost += h.samples_lost;
            for (a, b) in mine.size_buckets.iter_mut().zip(h.size_buckets) {
                *a += b;
            }
        }
    }

    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("pid", self.pid.clone()),
            ("comm", self.comm.clone()),
            ("cgroup", self.cgroup.clone()),
            ("container", self.container.clone()),
        ]
    }
}

/// memtrace's own state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Records read from the kernel side.
    pub records: u64,
    /// Over the last interval.
    pub records_per_second: f64,
    /// Everything lost or not kept, by reason (every reason, zeros too).
    pub lost: Vec<(String, u64)>,
    /// Own resident memory now.
    pub rss_bytes: u64,
    /// Own resident memory, peak.
    pub peak_rss_bytes: u64,
    /// Own CPU time.
    pub cpu_seconds: f64,
    /// Processes tracked by the always-on tier.
    pub processes: u64,
    /// Processes whose allocations are sampled now.
    pub sampled_processes: u64,
    /// Mean bytes between samples.
    pub sample_bytes: u64,
    /// `sessions` or `entry_return`.
    pub probe_mode: String,
    /// Escalations and back-offs since the start.
    pub escalations: u64,
    /// Back-offs since the start.
    pub backoffs: u64,
    /// Profiles written, failed writes, pushes, failed pushes.
    pub profiles: [u64; 4],
    /// The kernel-side sampler's counters, by name.
    pub sampler: Vec<(String, u64)>,
}

/// What one scrape shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// One row per process shown, then `other`.
    pub rows: Vec<Row>,
    /// memtrace itself.
    pub health: Health,
}

impl Snapshot {
    /// Keeps every sampled process and the `k` others with the most memory
    /// (resident plus estimated heap), and adds the rest up into one
    /// `pid="other"` row: a sampled process's estimates always keep their
    /// own series.
    pub fn top(rows: Vec<Row>, k: usize, health: Health) -> Self {
        let (mut rows, mut others): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .partition(|r| r.heap.is_some() || r.sampling.is_some());
        let by_weight =
            |a: &Row, b: &Row| b.weight().total_cmp(&a.weight()).then(a.pid.cmp(&b.pid));
        others.sort_by(by_weight);
        let rest = others.split_off(k.min(others.len()));
        rows.extend(others);
        rows.sort_by(by_weight);
        if !rest.is_empty() {
            let mut other = Row {
                pid: "other".into(),
                comm: "other".into(),
                ..Row::default()
            };
            for r in &rest {
                other.add(r);
            }
            rows.push(other);
        }
        Self { rows, health }
    }
}

/// The Prometheus text exposition of `snapshot`.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("memtrace");
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// A per-process metric: its value for a row, if it has one.
type Per = fn(&Row) -> Option<f64>;

const RSS_TYPES: [&str; 4] = ["file", "anon", "swap", "shmem"];

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges: &[(&str, &str, Per)] = &[
            (
                "heap_live_bytes",
                "Estimated live heap bytes (sampled allocator tier; unbiased estimate)",
                |r| r.heap.as_ref().map(|h| h.live_bytes),
            ),
            (
                "heap_live_allocations",
                "Estimated live heap allocations (sampled allocator tier)",
                |r| r.heap.as_ref().map(|h| h.live_count),
            ),
            (
                "kernel_bytes",
                "Kernel memory (slab, pages, per-CPU) charged to the process, live",
                |r| Some(r.kernel_bytes as f64),
            ),
            (
                "brk_growth_bytes",
                "Growth of the program break since memtrace first saw the process",
                |r| Some(r.brk_bytes as f64),
            ),
            (
                "sampling",
                "1 while the process's allocations are sampled (label reason)",
                |r| r.sampling.map(|_| 1.0),
            ),
            (
                "heap_live_bytes_stderr",
                "Standard error of heap_live_bytes (the estimate is unbiased; within 2 of these 95% of the time)",
                |r| r.heap.as_ref().map(|h| h.variance[3].sqrt()),
            ),
            (
                "heap_allocated_bytes_stderr",
                "Standard error of heap_allocated_bytes",
                |r| r.heap.as_ref().map(|h| h.variance[1].sqrt()),
            ),
            (
                "heap_sample_thinning_shift",
                "Over its sample budget, the process keeps one sample point in 2^this (weighed for: no bias)",
                |r| r.heap.as_ref().map(|h| h.thinning_shift as f64),
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &self.rows {
                let Some(v) = value(r) else { continue };
                let mut labels = r.labels();
                if *name == "sampling" {
                    labels.push(("reason", r.sampling.unwrap_or_default().to_string()));
                }
                ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "rss_bytes",
                "Resident memory by type (kmem:rss_stat)",
                None,
                MetricType::Gauge,
            )?;
            for r in &self.rows {
                for (i, kind) in RSS_TYPES.iter().enumerate() {
                    let mut labels = r.labels();
                    labels.push(("type", kind.to_string()));
                    ConstGauge::new(r.rss[i] as f64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let counters: &[(&str, &str, Per)] = &[
            (
                "heap_allocated_bytes",
                "Estimated heap bytes allocated while sampled",
                |r| r.heap.as_ref().map(|h| h.alloc_bytes),
            ),
            (
                "heap_allocations",
                "Estimated heap allocations while sampled",
                |r| r.heap.as_ref().map(|h| h.alloc_count),
            ),
            ("heap_samples", "Allocation samples taken", |r| {
                r.heap.as_ref().map(|h| h.samples as f64)
            }),
            (
                "heap_samples_thinned",
                "Sample points thinned away by the process's budget (the kept samples weigh for them)",
                |r| r.heap.as_ref().map(|h| h.thinned as f64),
            ),
            (
                "heap_samples_lost",
                "Samples lost (table or ring buffer full): the heap estimates are short by what they stood for",
                |r| r.heap.as_ref().map(|h| h.samples_lost as f64),
            ),
            (
                "page_faults",
                "Page faults that made memory resident",
                |r| Some(r.faults as f64),
            ),
            (
                "page_fault_bytes",
                "Bytes made resident by page faults",
                |r| Some(r.fault_bytes as f64),
            ),
            ("mmap_calls", "Successful mmap calls", |r| {
                Some(r.mmaps as f64)
            }),
            ("mmap_bytes", "Bytes mapped by mmap and mremap", |r| {
                Some(r.mmap_bytes as f64)
            }),
            ("munmap_bytes", "Bytes unmapped by munmap and mremap", |r| {
                Some(r.munmap_bytes as f64)
            }),
            (
                "kernel_allocated_bytes",
                "Kernel memory allocated on the process's behalf",
                |r| Some(r.kernel_allocated_bytes as f64),
            ),
            ("oom_kills", "Times the OOM killer chose the process", |r| {
                Some(r.oom_kills as f64)
            }),
        ];
        for (name, help, value) in counters {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in &self.rows {
                if let Some(v) = value(r) {
                    ConstCounter::new(v).encode(m.encode_family(&r.labels())?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "allocation_size_bytes",
                "Estimated allocations by size (sampled allocator tier)",
                None,
                MetricType::Histogram,
            )?;
            for r in &self.rows {
                let Some(h) = &r.heap else { continue };
                let mut buckets: Vec<(f64, u64)> = SIZE_BUCKETS
                    .iter()
                    .zip(h.size_buckets)
                    .map(|(&b, c)| (b as f64, c.round() as u64))
                    .collect();
                buckets.push((f64::MAX, h.size_buckets[SIZE_BUCKETS.len()].round() as u64));
                let count = buckets.iter().map(|b| b.1).sum();
                let labels = r.labels();
                let mut fam = m.encode_family(&labels)?;
                fam.encode_histogram::<NoLabelSet>(h.alloc_bytes, count, &buckets, None)
                    .map(|_| ())?;
            }
        }
        let h = &self.health;
        let own: &[(&str, &str, MetricType, f64)] = &[
            (
                "records",
                "Records read from the kernel side",
                MetricType::Counter,
                h.records as f64,
            ),
            (
                "records_per_second",
                "Records read per second, last interval",
                MetricType::Gauge,
                h.records_per_second,
            ),
            (
                "self_rss_bytes",
                "memtrace's own resident memory (its ring buffer's pages count twice)",
                MetricType::Gauge,
                h.rss_bytes as f64,
            ),
            (
                "self_peak_rss_bytes",
                "memtrace's own peak resident memory",
                MetricType::Gauge,
                h.peak_rss_bytes as f64,
            ),
            (
                "self_cpu_seconds",
                "memtrace's own CPU time",
                MetricType::Counter,
                h.cpu_seconds,
            ),
            (
                "processes",
                "Processes the always-on tier tracks",
                MetricType::Gauge,
                h.processes as f64,
            ),
            (
                "sampled_processes",
                "Processes whose allocations are sampled now",
                MetricType::Gauge,
                h.sampled_processes as f64,
            ),
            (
                "sample_interval_bytes",
                "Mean bytes between allocation samples",
                MetricType::Gauge,
                h.sample_bytes as f64,
            ),
            (
                "escalations",
                "Processes escalated to sampled tracing",
                MetricType::Counter,
                h.escalations as f64,
            ),
            (
                "backoffs",
                "Escalated processes that backed off",
                MetricType::Counter,
                h.backoffs as f64,
            ),
        ];
        for (name, help, ty, v) in own {
            let m = enc.encode_descriptor(name, help, None, *ty)?;
            if *ty == MetricType::Counter {
                ConstCounter::new(*v).encode(m)?;
            } else {
                ConstGauge::new(*v).encode(m)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "lost",
                "Records, samples, stacks or processes memtrace lost or did not keep, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, v) in &h.lost {
                let labels = [("reason", reason.clone())];
                ConstCounter::new(*v as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "sampler",
                "The kernel-side sampler: calls seen, sampled, skipped as internal to an allocator, frees forwarded, ...",
                None,
                MetricType::Counter,
            )?;
            for (event, v) in &h.sampler {
                let labels = [("event", event.clone())];
                ConstCounter::new(*v as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "profiles",
                "Profiles written and pushed, by outcome",
                None,
                MetricType::Counter,
            )?;
            for (i, what) in ["written", "write_failed", "pushed", "push_failed"]
                .iter()
                .enumerate()
            {
                let labels = [("outcome", what.to_string())];
                ConstCounter::new(h.profiles[i] as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "probe_mode",
                "How the sampled tier's probes are attached (sessions: one trap per unsampled call)",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("mode", h.probe_mode.clone())];
            ConstGauge::new(1.0).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, anon: u64) -> Row {
        Row {
            pid: pid.to_string(),
            comm: format!("p{pid}"),
            cgroup: "/".into(),
            rss: [0, anon, 0, 0],
            faults: 1,
            ..Row::default()
        }
    }

    #[test]
    fn top_k_and_other() {
        let rows = vec![row(1, 10), row(2, 30), row(3, 20), row(4, 5)];
        let s = Snapshot::top(rows, 2, Health::default());
        let pids: Vec<&str> = s.rows.iter().map(|r| r.pid.as_str()).collect();
        assert_eq!(pids, ["2", "3", "other"]);
        assert_eq!(s.rows[2].rss[1], 15);
        assert_eq!(s.rows[2].faults, 2);
    }

    /// A sampled process keeps its own series however small it is.
    #[test]
    fn a_sampled_process_is_never_other() {
        let mut small = row(4, 5);
        small.heap = Some(Heap::default());
        small.sampling = Some("selected");
        let rows = vec![row(1, 10), row(2, 30), row(3, 20), small];
        let s = Snapshot::top(rows, 2, Health::default());
        let pids: Vec<&str> = s.rows.iter().map(|r| r.pid.as_str()).collect();
        assert_eq!(pids, ["2", "3", "4", "other"]);
        assert_eq!(s.rows[3].rss[1], 10);
    }

    #[test]
    fn renders_prometheus_text() {
        let mut r = row(42, 4096);
        r.comm = "with \"quote\"".into();
        r.heap = Some(Heap {
            live_bytes: 1000.0,
            alloc_bytes: 5000.0,
            alloc_count: 10.0,
            samples: 3,
            size_buckets: {
                let mut b = [0.0; SIZE_BUCKETS.len() + 1];
                b[3] = 10.0;
                b
            },
            ..Heap::default()
        });
        r.sampling = Some("escalated");
        let health = Health {
            lost: vec![("ringbuf_full".into(), 0), ("sample_table_full".into(), 2)],
            probe_mode: "sessions".into(),
            ..Health::default()
        };
        let text = render(Snapshot::top(vec![r], 10, health));
        let labels = r#"pid="42",comm="with \"quote\"",cgroup="/",container="""#;
        for line in [
            format!("memtrace_heap_live_bytes{{{labels}}} 1000.0"),
            format!("memtrace_rss_bytes{{{labels},type=\"anon\"}} 4096.0"),
            format!("memtrace_heap_allocated_bytes_total{{{labels}}} 5000.0"),
            format!("memtrace_sampling{{{labels},reason=\"escalated\"}} 1.0"),
            format!("memtrace_allocation_size_bytes_bucket{{{labels},le=\"1024\"}} 10"),
            format!("memtrace_allocation_size_bytes_count{{{labels}}} 10"),
            "memtrace_lost_total{reason=\"sample_table_full\"} 2".to_string(),
            "memtrace_probe_mode{mode=\"sessions\"} 1.0".to_string(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
