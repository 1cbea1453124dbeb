//! Empty on purpose: the programs are the `memtrace` binary of this crate.
//! This library target exists so memtrace-user can name this crate as a
//! build-dependency, which makes cargo rebuild it when these sources change.
#![no_std]
