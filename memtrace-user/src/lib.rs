//! memtrace: exact, symbolized tracing of heap allocations in live Linux
//! processes, on eBPF.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! cli ─► session ─► target / attach / load ─► (kernel: memtrace-ebpf)
//!                                               │ ring buffer records
//!            event::decode ◄────────────────────┘
//!                 │ Event ──► record::writer ──► recording file
//!                 ▼                                   │
//!            agg::Aggregator (pure) ◄── replay / diff ◄┘ record::reader
//!              + mem::Memory (kernel side: RSS, mappings, faults, kmem)
//!                 │
//!            output (view × format) ─► report::build / report::samples
//!                 │                          ▲
//!                 ▼                   symbolize::Symbols (blazesym), or
//!            report::{text, json, flame, folded, pprof, svg, hlog, html}
//!                                     the recording's own frames
//! ```
//!
//! `agg`, `mem`, `event`, `record`, `report` and `maps::parse` are pure (or touch
//! only the file they are given) and are unit-tested without root; `load` is
//! the only module that talks to BPF.
#![deny(missing_docs)]

pub mod agent;
pub mod agg;
pub mod allocators;
pub mod attach;
pub mod cli;
pub mod diff;
pub mod dist;
pub mod error;
pub mod event;
pub mod guard;
pub mod live;
pub mod load;
pub mod mapped;
pub mod maps;
pub mod mem;
pub mod output;
pub mod probe_point;
pub mod probing;
pub mod python;
pub mod record;
pub mod replay;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod target;
pub mod tracefs;
pub mod unwind;
pub mod uprobe_session;
