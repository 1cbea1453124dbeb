//! The non-JSON formats of a report, each read the way its users read it:
//! folded stacks and the HdrHistogram log as text, the SVGs for what they
//! name, the pprof profile with `go tool pprof`, the HTML page in a headless
//! chromium (whose `--dump-dom` shows whether the page's script ran).

use std::path::Path;

use memtrace_tests::TempPath;
use memtrace_tests::tool::{require_tool, run_tool};

use super::run::{COMM, path_str, report_text};

/// Precision of memtrace's per-stack histograms (`STACK_SIGFIG` in
/// memtrace-user's agg.rs): 2 significant decimal digits.
pub(super) const STACK_SIGFIG: u32 = 2;

/// The lower edge of the HdrHistogram bucket of `value` at `sigfig`
/// significant digits (its `lowest_equivalent`): buckets below
/// 2 × 10^sigfig rounded up to a power of two are 1 wide, and double in
/// width with every power of two above.
pub(super) fn bucket_floor(value: u64, sigfig: u32) -> u64 {
    let exact = (2 * 10u64.pow(sigfig)).next_power_of_two();
    if value < exact {
        return value;
    }
    let shift = (63 - value.leading_zeros()) - (exact.trailing_zeros() - 1);
    value >> shift << shift
}

/// Folded stacks and the flame graph (leaks by live bytes), and the
/// timeline as SVG.
pub(super) fn check_stack_formats(path: &Path) {
    let folded = report_text(path, &["--format", "folded"]);
    assert!(
        folded.lines().any(|l| l.ends_with(";keep_small 10000")),
        "folded stacks (outermost frame first) should have a line ending in \
         `;keep_small 10000`:\n{folded}"
    );
    assert!(
        !folded.contains("build_table"),
        "build_table holds nothing at the end, so no folded line:\n{folded}"
    );

    let flame = report_text(path, &["--format", "flamegraph"]);
    assert!(
        flame.contains("<svg") && flame.contains("keep_small"),
        "the flame graph should be an SVG showing keep_small:\n{flame}"
    );

    let plot = report_text(path, &["--view", "timeline", "--format", "svg"]);
    assert!(
        plot.contains("<svg") && plot.contains(COMM),
        "the timeline plot should be an SVG naming {COMM}:\n{plot}"
    );
}

/// The HdrHistogram log: `#` header lines, and data lines tagged with the
/// process's sizes and lifetimes.
pub(super) fn check_hlog(path: &Path, pid: u64) {
    let log = report_text(path, &["--view", "histograms", "--format", "hlog"]);
    assert!(
        log.starts_with('#'),
        "the log should start with `#` lines:\n{log}"
    );
    for tag in [format!("pid={pid}/sizes"), format!("pid={pid}/lifetimes")] {
        let line = format!("Tag={tag},");
        assert!(
            log.lines().any(|l| l.starts_with(&line)),
            "no data line tagged {tag} in the log:\n{log}"
        );
    }
}

/// The pprof profile, read by Go's own pprof.
pub(super) fn check_pprof(path: &Path) {
    let go = require_tool("go", "golang-go");
    let profile = TempPath::new("heap.pb.gz");
    report_text(path, &["--format", "pprof", "-o", path_str(profile.path())]);
    let top = run_tool(
        &go,
        [
            "tool",
            "pprof",
            "-top",
            "-sample_index=inuse_space",
            path_str(profile.path()),
        ],
    );
    top.assert_success();
    assert!(
        top.stdout.contains("keep_small"),
        "`{}` should list keep_small:\n{}",
        top.cmdline,
        top.stdout
    );
}

/// The HTML page, rendered by a headless chromium: the page's script must
/// have run (it rewrites `<p id="status">static</p>` to `rendered: ...` and
/// adds `(expected ...)` if the DOM lacks rows of its data).
pub(super) fn check_html(path: &Path) {
    let chromium = require_tool("chromium", "chromium");
    let page = TempPath::new("page.html");
    report_text(path, &["--format", "html", "-o", path_str(page.path())]);
    let profile = TempPath::new("chromium-profile");
    let dom = run_tool(
        &chromium,
        [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("file://{}", page.path().display()),
        ],
    );
    dom.assert_success();
    let html = &dom.stdout;
    for needle in ["keep_small", "build_table"] {
        assert!(
            html.contains(needle),
            "the rendered page lacks {needle}:\n{html}"
        );
    }
    let status = html
        .split_once("<p id=\"status\">")
        .and_then(|(_, rest)| rest.split_once("</p>"))
        .map(|(text, _)| text)
        .unwrap_or_else(|| panic!("the rendered page has no <p id=\"status\">:\n{html}"));
    assert!(
        status.starts_with("rendered: 1 process, ") && !status.contains("expected"),
        "the page's script should have rendered 1 process and every stack, \
         status says {status:?}"
    );
}

#[test]
pub(super) fn bucket_floor_is_hdrhistograms_lowest_equivalent() {
    assert_eq!(bucket_floor(255, 2), 255);
    assert_eq!(bucket_floor(257, 2), 256);
    assert_eq!(bucket_floor(65_536, 2), 65_536);
    // 30 ms sits in a bucket 2^17 ns wide: 228 × 131,072.
    assert_eq!(bucket_floor(30_000_000, 2), 29_884_416);
}
