//! Queries on memtrace's JSON report (`--format json`):
//!
//! ```text
//! {"version":1, "processes":[{"pid":..,"live_bytes":..,...,"unknown_frees":..,
//!    "stacks":[{"live_bytes":..,...,"frames":[{"function":..,...}]}]}],
//!  "lost":{"ringbuf_full":..,...}}
//! ```
//!
//! A "site" is a function of a fixture: its numbers are the sums over every
//! stack that has the function in any frame, so they do not depend on how
//! memtrace splits stacks (by call site, by inlined caller, by thread).

use std::fmt;

use serde_json::Value;

/// Allocation numbers of a site (or of one stack).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Site {
    pub live_bytes: u64,
    pub live_count: u64,
    pub total_bytes: u64,
    pub total_count: u64,
}

impl Site {
    /// The numbers of `n` workers each doing the same work.
    pub const fn times(self, n: u64) -> Site {
        Site {
            live_bytes: self.live_bytes * n,
            live_count: self.live_count * n,
            total_bytes: self.total_bytes * n,
            total_count: self.total_count * n,
        }
    }
}

/// Whole-process numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_count: u64,
    pub total_bytes: u64,
    pub total_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "live {} B / {}, total {} B / {}",
            self.live_bytes, self.live_count, self.total_bytes, self.total_count
        )
    }
}

/// "pid 123 (alloc_fixture)", for messages.
pub fn label(process: &Value) -> String {
    let comm = process.get("comm").and_then(Value::as_str).unwrap_or("?");
    format!("pid {} ({comm})", process["pid"])
}

/// Reads a non-negative integer field, with a message that shows the object.
pub fn field(object: &Value, name: &str) -> u64 {
    object
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("report field {name:?} missing or not a u64 in {object:#}"))
}

/// Reads an array field, with a message that shows the object.
pub fn array<'a>(object: &'a Value, name: &str) -> &'a [Value] {
    object
        .get(name)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("report field {name:?} missing or not an array in {object:#}"))
}

/// The report's entry for `pid`.
pub fn process(report: &Value, pid: u32) -> &Value {
    let processes = array(report, "processes");
    processes
        .iter()
        .find(|p| p.get("pid").and_then(Value::as_u64) == Some(u64::from(pid)))
        .unwrap_or_else(|| {
            let present: Vec<String> = processes
                .iter()
                .map(|p| format!("{} ({})", p["pid"], p["comm"]))
                .collect();
            panic!(
                "pid {pid} is not in the report; processes present: [{}]",
                present.join(", ")
            )
        })
}

/// The report's only entry whose `comm` is `comm`, for `-- CMD` runs where
/// the test does not know the child's pid. (The kernel cuts comm to 15 bytes.)
pub fn process_by_comm<'a>(report: &'a Value, comm: &str) -> &'a Value {
    let processes = array(report, "processes");
    let found: Vec<&Value> = processes
        .iter()
        .filter(|p| p.get("comm").and_then(Value::as_str) == Some(comm))
        .collect();
    match found.as_slice() {
        [one] => one,
        _ => {
            let present: Vec<String> = processes
                .iter()
                .map(|p| format!("{} ({})", p["pid"], p["comm"]))
                .collect();
            panic!(
                "expected exactly one process named {comm:?} in the report, found {}; \
                 processes present: [{}]",
                found.len(),
                present.join(", ")
            )
        }
    }
}

/// Whether a symbolized function name is `name`: equal, or a path ending in
/// `::name` (C++ namespaces, Rust modules), ignoring a Rust legacy-mangling
/// hash suffix `::h0123456789abcdef` should the demangler keep it.
pub fn function_matches(function: &str, name: &str) -> bool {
    let function = strip_rust_hash(function);
    function == name
        || function
            .strip_suffix(name)
            .is_some_and(|prefix| prefix.ends_with("::"))
}

fn strip_rust_hash(function: &str) -> &str {
    match function.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path
        }
        _ => function,
    }
}

/// The stacks of `process` that have `function` in any frame. Works on any
/// object with `stacks`, such as a view's section (`process["peak"]`).
pub fn matching_stacks<'a>(process: &'a Value, function: &str) -> Vec<&'a Value> {
    array(process, "stacks")
        .iter()
        .filter(|stack| {
            array(stack, "frames").iter().any(|frame| {
                frame
                    .get("function")
                    .and_then(Value::as_str)
                    .is_some_and(|f| function_matches(f, function))
            })
        })
        .collect()
}

/// The four numbers of a stack, or of any row that has them (a
/// `python_lines` row).
pub fn stack_numbers(stack: &Value) -> Site {
    Site {
        live_bytes: field(stack, "live_bytes"),
        live_count: field(stack, "live_count"),
        total_bytes: field(stack, "total_bytes"),
        total_count: field(stack, "total_count"),
    }
}

/// The numbers of `function`: sums over the stacks that contain it, each
/// stack counted once however many of its frames match.
pub fn site(process: &Value, function: &str) -> Site {
    matching_stacks(process, function)
        .into_iter()
        .map(stack_numbers)
        .fold(Site::default(), |sum, s| Site {
            live_bytes: sum.live_bytes + s.live_bytes,
            live_count: sum.live_count + s.live_count,
            total_bytes: sum.total_bytes + s.total_bytes,
            total_count: sum.total_count + s.total_count,
        })
}

/// One line per frame, for failure messages.
fn render_stack(stack: &Value) -> String {
    let mut out = format!("  stack: {}\n", stack_numbers(stack));
    for frame in array(stack, "frames") {
        let text = |key: &str| match frame.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "?".to_owned(),
            Some(other) => other.to_string(),
        };
        out.push_str(&format!(
            "    {} {} at {}:{} in {}\n",
            text("address"),
            text("function"),
            text("file"),
            text("line"),
            text("module")
        ));
    }
    out
}

/// Checks the numbers of `function` exactly, showing expected against got
/// and the stacks that matched.
pub fn assert_site(process: &Value, function: &str, expected: Site) {
    let got = site(process, function);
    if got == expected {
        return;
    }
    let stacks = matching_stacks(process, function);
    let rows = [
        ("live_bytes", expected.live_bytes, got.live_bytes),
        ("live_count", expected.live_count, got.live_count),
        ("total_bytes", expected.total_bytes, got.total_bytes),
        ("total_count", expected.total_count, got.total_count),
    ];
    let mut table = format!("  {:<12} {:>12} {:>12}\n", "", "expected", "got");
    for (name, want, have) in rows {
        let mark = if want == have { "" } else { "  <--" };
        table.push_str(&format!("  {name:<12} {want:>12} {have:>12}{mark}\n"));
    }
    let rendered: String = stacks.iter().map(|s| render_stack(s)).collect();
    panic!(
        "site {function} of {} is wrong\n{table}{} matching stack(s):\n{rendered}",
        label(process),
        stacks.len()
    );
}

/// Checks that every stack of `function` starts at it, i.e. frame 0 is the
/// allocator's caller, symbolized to `file_suffix`:`line` (the call's line).
pub fn assert_caller_frame(process: &Value, function: &str, file_suffix: &str, line: u64) {
    let stacks = matching_stacks(process, function);
    assert!(
        !stacks.is_empty(),
        "{}: no stack contains {function}",
        label(process)
    );
    for stack in stacks {
        let frame = array(stack, "frames").first();
        let ok = frame.is_some_and(|f| {
            f.get("function")
                .and_then(Value::as_str)
                .is_some_and(|name| function_matches(name, function))
                && f.get("file")
                    .and_then(Value::as_str)
                    .is_some_and(|file| file.ends_with(file_suffix))
                && f.get("line").and_then(Value::as_u64) == Some(line)
        });
        assert!(
            ok,
            "{}: frame 0 should be the call in {function} at {file_suffix}:{line}, \
             the allocator's caller; got:\n{}",
            label(process),
            render_stack(stack)
        );
    }
}

/// The whole-process numbers.
pub fn totals(process: &Value) -> Totals {
    Totals {
        live_bytes: field(process, "live_bytes"),
        live_count: field(process, "live_count"),
        total_bytes: field(process, "total_bytes"),
        total_count: field(process, "total_count"),
        freed_bytes: field(process, "freed_bytes"),
        freed_count: field(process, "freed_count"),
    }
}

/// Checks the whole-process numbers exactly.
pub fn assert_totals(process: &Value, expected: Totals) {
    let got = totals(process);
    assert_eq!(
        got,
        expected,
        "process totals of {} are wrong (left: got, right: expected)",
        label(process)
    );
}

/// The counters of `report["lost"]` that must stay zero in a clean run.
/// (`lost.unknown_frees` is not one: in a system-wide run other processes
/// free blocks allocated before tracing began.)
pub const LOSS_COUNTERS: &[&str] = &[
    "ringbuf_full",
    "stack_lost",
    "return_without_entry",
    "inflight_full",
    "stale_inflight",
    "decode_errors",
    "traced_full",
    "python_stack_lost",
];

/// Checks that memtrace lost no event and that `process` freed nothing that
/// memtrace did not see allocated.
pub fn assert_no_losses(report: &Value, process: &Value) {
    assert_no_lost_events(report);
    let unknown = field(process, "unknown_frees");
    assert_eq!(
        unknown,
        0,
        "{} has {unknown} unknown frees: frees of blocks memtrace never saw allocated",
        label(process)
    );
}

/// Checks that every counter of [`LOSS_COUNTERS`] is zero (unknown frees
/// aside).
pub fn assert_no_lost_events(report: &Value) {
    let lost = report
        .get("lost")
        .and_then(Value::as_object)
        .unwrap_or_else(|| {
            panic!(
                "report has no \"lost\" object; report keys: {:?}",
                keys(report)
            )
        });
    let nonzero: Vec<String> = lost
        .iter()
        .filter(|(key, value)| LOSS_COUNTERS.contains(&key.as_str()) && value.as_u64() != Some(0))
        .map(|(key, value)| format!("{key} = {value}"))
        .collect();
    assert!(
        nonzero.is_empty(),
        "memtrace lost events: {}",
        nonzero.join(", ")
    );
}

fn keys(value: &Value) -> Vec<&str> {
    value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_match_plain_and_qualified() {
        assert!(function_matches("leak_malloc", "leak_malloc"));
        assert!(function_matches("rust_fixture::leak_box", "leak_box"));
        assert!(function_matches(
            "rust_fixture::leak_box::h0123456789abcdef",
            "leak_box"
        ));
        assert!(!function_matches("my_leak_malloc", "leak_malloc"));
        assert!(!function_matches("leak_malloc2", "leak_malloc"));
        assert!(!function_matches("x:leak_malloc", "leak_malloc"));
    }

    #[test]
    fn site_sums_each_matching_stack_once() {
        let process = serde_json::json!({
            "pid": 1, "comm": "x",
            "stacks": [
                {"live_bytes": 10, "live_count": 1, "total_bytes": 20, "total_count": 2,
                 "frames": [{"function": "f"}, {"function": "f"}, {"function": "main"}]},
                {"live_bytes": 5, "live_count": 1, "total_bytes": 5, "total_count": 1,
                 "frames": [{"function": null}, {"function": "ns::f"}]},
                {"live_bytes": 7, "live_count": 1, "total_bytes": 7, "total_count": 1,
                 "frames": [{"function": "g"}]},
            ]
        });
        assert_eq!(
            site(&process, "f"),
            Site {
                live_bytes: 15,
                live_count: 2,
                total_bytes: 25,
                total_count: 3
            }
        );
        assert_eq!(site(&process, "absent"), Site::default());
    }

    #[test]
    #[should_panic(expected = "site f of pid 1 (x) is wrong")]
    fn assert_site_explains_a_mismatch() {
        let process = serde_json::json!({
            "pid": 1, "comm": "x",
            "stacks": [{"live_bytes": 1, "live_count": 1, "total_bytes": 1, "total_count": 1,
                        "frames": [{"function": "f", "file": "/f.c", "line": 3,
                                    "module": "/bin/x", "address": "0x10"}]}]
        });
        assert_site(&process, "f", Site::default());
    }
}
