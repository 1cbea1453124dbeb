//! Folded stacks: one line per distinct stack, `root;outer;…;inner VALUE`.
//!
//! The text format of Brendan Gregg's `stackcollapse-*` scripts, read by
//! `flamegraph.pl`, inferno, speedscope and others. The root frame is the
//! process, `comm (pid)` (or `pid PID` when its name is unknown); then come
//! the frames from the outermost to the caller of the allocator, each as
//! [`Frame::label`](crate::symbolize::Frame::label). The value is one
//! [`Weight`] of the stack. Stacks weighing 0 are left out, identical lines
//! are merged (summed) and lines are sorted, so the same samples always give
//! the same bytes.
//!
//! It does not draw ([`super::flame`] draws exactly these lines) and it
//! keeps only names: files, lines and addresses of resolved frames are in
//! the pprof and JSON formats.
//!
//! ```text
//! server (100);main;handle_request;alloc_buffer 4196
//! ```

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::{Sample, Weight};

/// Writes the folded stacks of `samples` under `weight`, one per line.
pub fn render(samples: &[Sample], weight: Weight, out: &mut dyn Write) -> io::Result<()> {
    for line in lines(samples, weight) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The folded lines, without newlines: merged, sorted, none weighing 0.
pub fn lines(samples: &[Sample], weight: Weight) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for s in samples {
        let value = weight.of(s);
        if value == 0 {
            continue;
        }
        // Distinct stacks can share a line: two addresses in one function,
        // or two raw stacks that symbolize alike.
        let sum = merged.entry(stack(s)).or_insert(0);
        *sum = sum.saturating_add(value);
    }
    let mut out: Vec<String> = merged
        .into_iter()
        .map(|(stack, value)| format!("{stack} {value}"))
        .collect();
    // Sorted by line, not by stack: what readers of the format sort by.
    out.sort_unstable();
    out
}

/// The `;`-joined frames of one sample, process first.
fn stack(s: &Sample) -> String {
    let mut line = match s.comm.as_deref().map(str::trim) {
        Some(comm) if !comm.is_empty() => format!("{} ({})", sanitize(comm), s.pid),
        _ => format!("pid {}", s.pid),
    };
    if s.frames.is_empty() {
        // Without a frame, `pid 42 100` would read as two counts (a
        // differential line) to flamegraph tools.
        line.push_str(";[no stack]");
    }
    for f in s.frames.iter().rev() {
        line.push(';');
        line.push_str(&sanitize(&f.label()));
    }
    line
}

/// Makes a label safe as one frame: `;` separates frames and a newline
/// ends the line, so they become `:` and a space (Rust types such as
/// `[u8; 8]` carry semicolons). The space before a last word of digits and
/// dots becomes `_`, because readers take a trailing number as a count.
fn sanitize(label: &str) -> String {
    let cleaned: String = label
        .chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let mut s = cleaned.trim().to_string();
    if s.is_empty() {
        return "[unknown]".to_string();
    }
    if let Some(i) = s.rfind(' ')
        && s[i + 1..].bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        s.replace_range(i..=i, "_");
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::symbolize::Frame;

    fn resolved(function: &str, file: &str, line: u32, address: u64, module: &Module) -> Frame {
        Frame {
            function: Some(function.to_string()),
            file: (!file.is_empty()).then(|| file.to_string()),
            line: (line != 0).then_some(line),
            ..module.frame(address)
        }
    }

    /// A mapped file of a synthetic process.
    pub(crate) struct Module {
        path: &'static str,
        base: u64,
        build_id: Option<&'static str>,
    }

    impl Module {
        /// A frame in this file with no symbol.
        fn frame(&self, address: u64) -> Frame {
            Frame {
                module: Some(self.path.to_string()),
                address,
                module_offset: Some(address - self.base),
                build_id: self.build_id.map(str::to_string),
                ..Frame::default()
            }
        }
    }

    const SERVER: Module = Module {
        path: "/usr/bin/server",
        base: 0x5000_0000,
        build_id: Some("5e7e7000aabbccdd"),
    };
    const LIBC: Module = Module {
        path: "/usr/lib/x86_64-linux-gnu/libc.so.6",
        base: 0x7f00_0000,
        build_id: Some("c1bc0000ffee"),
    };
    const PLUGIN: Module = Module {
        path: "/opt/plugins/libplugin.so",
        base: 0x7f10_0000,
        build_id: None,
    };
    const CLIENT: Module = Module {
        path: "/usr/bin/client",
        base: 0x4000_0000,
        build_id: Some("c11e47"),
    };

    fn sample(pid: u32, comm: Option<&str>, frames: Vec<Frame>, w: [u64; 4]) -> Sample {
        Sample {
            pid,
            comm: comm.map(str::to_string),
            frames,
            live_bytes: w[0],
            live_count: w[1],
            total_bytes: w[2],
            total_count: w[3],
        }
    }

    /// Two processes' stacks, as `report::samples` gives them: inlined
    /// frames (same address), a frame with a module but no symbol, a bare
    /// address, a `;` in a name, recursion from one call site, two stacks
    /// with the same labels, and a stack with live weights 0.
    /// Weights are `[live_bytes, live_count, total_bytes, total_count]`.
    pub(crate) fn synthetic() -> Vec<Sample> {
        let main = || resolved("main", "src/main.rs", 7, 0x5000_0100, &SERVER);
        let start = || resolved("__libc_start_main", "", 0, 0x7f00_2000, &LIBC);
        let server = Some("server");
        vec![
            // alloc_buffer is inlined into handle_request: one address.
            sample(
                100,
                server,
                vec![
                    resolved("alloc_buffer", "src/buf.rs", 12, 0x5000_1234, &SERVER),
                    resolved("handle_request", "src/server.rs", 40, 0x5000_1234, &SERVER),
                    main(),
                    start(),
                ],
                [4096, 4, 8192, 8],
            ),
            // The same functions from another call site: the same folded
            // line, another pprof location.
            sample(
                100,
                server,
                vec![
                    resolved("alloc_buffer", "src/buf.rs", 12, 0x5000_1250, &SERVER),
                    resolved("handle_request", "src/server.rs", 44, 0x5000_1250, &SERVER),
                    main(),
                    start(),
                ],
                [100, 1, 100, 1],
            ),
            // A plugin without symbols.
            sample(
                100,
                server,
                vec![
                    PLUGIN.frame(0x7f10_04a0),
                    resolved("handle_request", "src/server.rs", 52, 0x5000_1300, &SERVER),
                    main(),
                    start(),
                ],
                [1000, 10, 3000, 30],
            ),
            // Only temporary: nothing live.
            sample(
                100,
                server,
                vec![
                    resolved("parse_header", "src/http.rs", 3, 0x5000_2000, &SERVER),
                    main(),
                    start(),
                ],
                [0, 0, 64, 1],
            ),
            // An address outside any known mapping, called from a function
            // whose name holds a `;`.
            sample(
                200,
                None,
                vec![
                    Frame {
                        address: 0xdead_beef,
                        ..Frame::default()
                    },
                    resolved(
                        "<[u8; 8] as client::Encode>::encode",
                        "src/encode.rs",
                        9,
                        0x4000_1000,
                        &CLIENT,
                    ),
                    resolved("main", "src/main.rs", 20, 0x4000_0500, &CLIENT),
                ],
                [512, 2, 512, 2],
            ),
            // recurse calls itself from one call site: the same return
            // address twice.
            sample(
                200,
                None,
                vec![
                    resolved("recurse", "src/tree.rs", 30, 0x4000_2000, &CLIENT),
                    resolved("recurse", "src/tree.rs", 30, 0x4000_2000, &CLIENT),
                    resolved("main", "src/main.rs", 21, 0x4000_0510, &CLIENT),
                ],
                [256, 1, 256, 1],
            ),
        ]
    }

    fn text(samples: &[Sample], weight: Weight) -> String {
        let mut out = Vec::new();
        render(samples, weight, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn golden_live_bytes() {
        insta::assert_snapshot!("live_bytes", text(&synthetic(), Weight::LiveBytes));
    }

    #[test]
    fn golden_total_count() {
        insta::assert_snapshot!("total_count", text(&synthetic(), Weight::TotalCount));
    }

    #[test]
    fn merges_identical_lines_and_skips_zero_weights() {
        let lines = lines(&synthetic(), Weight::LiveBytes);
        let buffer: Vec<&String> = lines
            .iter()
            .filter(|l| l.ends_with(";alloc_buffer 4196"))
            .collect();
        assert_eq!(buffer.len(), 1, "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("parse_header")));
        let total: u64 = lines
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        let expected: u64 = synthetic().iter().map(|s| s.live_bytes).sum();
        assert_eq!(total, expected);
    }

    #[test]
    fn labels_cannot_break_the_line() {
        assert_eq!(sanitize("<[u8; 8] as A>::f"), "<[u8: 8] as A>::f");
        assert_eq!(sanitize("two\nlines\t"), "two lines");
        assert_eq!(sanitize("ends in 42"), "ends in_42");
        assert_eq!(sanitize("v 1.5"), "v_1.5");
        assert_eq!(
            sanitize("operator new(unsigned long)"),
            "operator new(unsigned long)"
        );
        assert_eq!(sanitize(" \n"), "[unknown]");
    }

    #[test]
    fn empty_stack_and_unnamed_process() {
        let samples = [
            sample(7, None, vec![], [10, 1, 10, 1]),
            sample(8, Some("a;b\n"), vec![], [5, 1, 5, 1]),
        ];
        assert_eq!(
            lines(&samples, Weight::LiveBytes),
            ["a:b (8);[no stack] 5", "pid 7;[no stack] 10"]
        );
    }
}
