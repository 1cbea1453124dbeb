//! memtrace: exact, symbolized tracing of heap allocations in live Linux
//! processes, on eBPF.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! cli ─► session ─► target / attach / load ─► (kernel: memtrace-ebpf)
//!                                               │ ring buffer records
//!            event::decode ◄────────────────────┘
//!                 │ Event
//!            agg::Aggregator (pure) ─► report::build ─► report::{text,json}
//!                                        ▲
//!                          symbolize::Symbols (blazesym)
//! ```
//!
//! `agg`, `event`, `report` and `maps::parse` are pure and unit-tested
//! without root; `load` is the only module that talks to BPF.
#![deny(missing_docs)]

pub mod agg;
pub mod attach;
pub mod cli;
pub mod diff;
pub mod error;
pub mod event;
pub mod load;
pub mod maps;
pub mod output;
pub mod record;
pub mod replay;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod target;
