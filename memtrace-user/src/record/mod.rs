//! Recordings: the event stream of a run, on disk, to report from later.
//!
//! A recording is what the aggregator was fed, plus what reports need once
//! the traced processes are gone: their names, the symbols of every stack
//! address (with module paths, offsets and build-ids), the probes, the loss
//! counters, and the start and end of the run. `memtrace report` replays it
//! through the same [`Aggregator`](crate::agg::Aggregator) as the live
//! session, so both reports agree.
//!
//! # Format (version [`VERSION`])
//!
//! ```text
//! file   = header block*
//! header = "MEMTRACE" version:u32le flags:u32le            (16 bytes)
//! block  = length:u32le crc32:u32le kind:u8 body[length]   (crc32 of kind+body)
//! body   = raw DEFLATE of the block's content
//! ```
//!
//! Blocks are appended whole and never rewritten, so a writer killed at any
//! moment, or stopped by a full disk, leaves a file whose complete blocks
//! all read back; the reader stops at the first short or corrupt block and
//! says how many bytes it could not use. Each block is self-contained: the
//! delta state of [`events`] restarts in each one.
//!
//! Block kinds: [`KIND_EVENTS`] (the compact binary event stream of
//! [`events`]) and [`KIND_META`] (one JSON-encoded [`Meta`], rare and
//! self-describing).
//!
//! Frames of kernel addresses (the kernel stacks of kernel allocations) are
//! the same in every process: [`Meta::Symbols`] holds them once, under
//! [`KERNEL_PID`].
//!
//! # Versions
//!
//! A reader reads its own version and every older one, and refuses newer
//! files, saying so. What a new version is needed for: anything an older
//! reader would misread or take for damage, such as a new event tag (it
//! stops at a tag it does not know) or a changed field. What is not: a new
//! meta block kind or a new optional field in a meta block (older readers
//! skip what they do not know).
//!
//! - 1: allocations, frees, exits.
//! - 2: adds RSS changes, address-space syscalls, kernel allocations (with
//!   kernel stacks), OOM kills and execs to the event stream, and kernel
//!   frames under [`KERNEL_PID`].
//! - 3: adds the forks of followed processes (`--follow-forks`).
//!
//! This module defines the format; [`writer`] and [`reader`] implement it.
//! It does not aggregate or render.

pub mod events;
pub mod reader;
pub mod writer;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::Probes;
use crate::symbolize::Frame;

/// First bytes of every recording.
pub const MAGIC: &[u8; 8] = b"MEMTRACE";
/// Format version written; readers refuse newer ones (see "Versions"
/// above).
pub const VERSION: u32 = 3;
/// Size of the file header.
pub const HEADER_LEN: usize = 16;
/// Size of a block's own header (length, crc, kind).
pub const BLOCK_HEADER_LEN: usize = 9;
/// A block of events.
pub const KIND_EVENTS: u8 = 1;
/// A block holding one [`Meta`].
pub const KIND_META: u8 = 2;
/// The process under which [`Meta::Symbols`] holds kernel addresses, shared
/// by all processes (pid 0 is the kernel's idle task: never traced, and
/// with no user addresses).
pub const KERNEL_PID: u32 = 0;
/// Largest block body a reader accepts (a corrupt length must not make it
/// allocate gigabytes).
pub const MAX_BLOCK: usize = 64 << 20;

/// Everything in a recording that is not an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Meta {
    /// First block: the run.
    Start(Start),
    /// What was traced, once known (after the start block).
    Target {
        /// As memtrace described it.
        target: String,
    },
    /// Where probes were attached.
    Probes {
        /// As in the live report.
        probes: Vec<ProbesMeta>,
    },
    /// A process first seen.
    Process {
        /// Process id.
        pid: u32,
        /// Its command name, if it could be read.
        comm: Option<String>,
    },
    /// Frames of stack addresses of one process, resolved while it lived.
    Symbols {
        /// Process id; [`KERNEL_PID`] for kernel addresses.
        pid: u32,
        /// Address → frames (innermost first; inlined calls expand one
        /// address into several frames).
        addresses: Vec<(u64, Vec<RecFrame>)>,
    },
    /// Loss counters so far (the last one wins).
    Counters(Counters),
    /// Last block of a complete recording.
    End {
        /// CLOCK_MONOTONIC ns at the end.
        end_ns: u64,
        /// Seconds traced, as in the live report.
        duration_s: f64,
        /// Final counters.
        counters: Counters,
    },
}

/// The run a recording holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Start {
    /// memtrace version that wrote it.
    pub memtrace: String,
    /// CLOCK_MONOTONIC ns when tracing began (event times are on this clock).
    pub start_ns: u64,
    /// Wall-clock time then, ms since the Unix epoch.
    pub start_unix_ms: u64,
    /// Host name.
    pub host: String,
    /// What was traced, as memtrace described it (also in a later
    /// [`Meta::Target`]).
    pub target: String,
    /// memtrace's command line.
    pub argv: Vec<String>,
    /// `--min-size` of the live run (reports default to it).
    pub min_size: u64,
    /// `--max-size` of the live run.
    pub max_size: u64,
    /// `--temporary-ms` of the live run, in ns.
    pub temporary_ns: u64,
    /// `--fault-sample` of the live run: one fault in this many carries a
    /// stack (absent in recordings without kernel events).
    #[serde(default = "default_fault_sample")]
    pub fault_sample: u32,
}

fn default_fault_sample() -> u32 {
    crate::agg::DEFAULT_FAULT_SAMPLE
}

/// [`Probes`], owned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbesMeta {
    /// The file probed.
    pub module: String,
    /// The allocators found in it (absent in recordings of memtrace 0.1
    /// before they were named).
    #[serde(default)]
    pub allocators: Vec<String>,
    /// Process ids the probes are limited to.
    pub pids: Vec<u32>,
    /// Functions probed.
    pub functions: Vec<String>,
    /// Functions not found.
    pub missing: Vec<String>,
}

impl From<&Probes> for ProbesMeta {
    fn from(p: &Probes) -> Self {
        Self {
            module: p.module.clone(),
            allocators: p.allocators.clone(),
            pids: p.pids.clone(),
            functions: p.functions.clone(),
            missing: p.missing.clone(),
        }
    }
}

impl From<ProbesMeta> for Probes {
    fn from(p: ProbesMeta) -> Self {
        Self {
            module: p.module,
            allocators: p.allocators,
            pids: p.pids,
            functions: p.functions,
            missing: p.missing,
        }
    }
}

/// Loss counters and traced calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The kernel side's counters, by name.
    pub kernel: BTreeMap<String, u64>,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Traced calls.
    pub traced_calls: u64,
    /// What memtrace itself used (absent from recordings of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memtrace: Option<SelfCounters>,
}

/// memtrace's own footprint as a recording keeps it (see
/// [`crate::report::SelfUsage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfCounters {
    /// Peak resident memory.
    pub peak_rss_bytes: u64,
    /// CPU time, user and system, in microseconds.
    pub cpu_us: u64,
}

/// A [`Frame`] with the fields reports skip in JSON but need later (module
/// offset and build-id, for pprof mappings and cross-run identity).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecFrame {
    /// Function name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Source file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Source line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Offset in the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_offset: Option<u64>,
    /// Build-id of the module, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

impl From<&Frame> for RecFrame {
    fn from(f: &Frame) -> Self {
        Self {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            module: f.module.clone(),
            module_offset: f.module_offset,
            build_id: f.build_id.clone(),
        }
    }
}

impl RecFrame {
    /// The frame at `address`.
    pub fn at(&self, address: u64) -> Frame {
        Frame {
            function: self.function.clone(),
            file: self.file.clone(),
            line: self.line,
            module: self.module.clone(),
            address,
            module_offset: self.module_offset,
            build_id: self.build_id.clone(),
        }
    }
}
