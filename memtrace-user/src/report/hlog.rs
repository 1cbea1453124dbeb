//! The histograms view as an HdrHistogram interval log, for HdrHistogram's
//! own tools (`HistogramLogAnalyzer`, `HistogramLogProcessor`, the Rust
//! crate's `IntervalLogIterator`).
//!
//! One interval per process and per top stack, for sizes (bytes) and for
//! lifetimes (ns, blocks freed while traced), told apart by tags:
//! `pid=42/sizes`, `pid=42/lifetimes`, `pid=42/stack=1/sizes`, … Stacks are
//! numbered as in the text report (most blocks allocated first); the comment
//! header names each stack's innermost function. An interval starts at the
//! process's first event and lasts until its last, in seconds since the
//! trace began (the log has no `StartTime`/`BaseTime`: memtrace's clock is
//! CLOCK_MONOTONIC, not wall time). Histograms are written as they are, with
//! their own precision (3 significant digits per process, 2 per stack);
//! nothing is re-binned, and processes whose report has no histograms (the
//! view was not built) or that allocated nothing are left out.
//!
//! ```text
//! #pid=42/sizes, pid=42/lifetimes: PID 42 (server)
//! #pid=42/stack=1/sizes, pid=42/stack=1/lifetimes: format_line
//! Tag=pid=42/sizes,0.001,0.049,2097152.000,HISTFAAAA…
//! ```

use std::io::{self, Write};
use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{
    IntervalLogWriterBuilder, IntervalLogWriterError, Tag,
};

use super::{ProcessReport, Report};

/// Writes the histograms of every process (and its top stacks) as an
/// interval log.
pub fn render(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    let mut procs: Vec<&ProcessReport> = r
        .processes
        .iter()
        .filter(|p| p.total_count > 0 && p.histograms.is_some())
        .collect();
    // The format expects intervals ordered by start time.
    procs.sort_by(|a, b| a.first_s.total_cmp(&b.first_s).then(a.pid.cmp(&b.pid)));

    let mut builder = IntervalLogWriterBuilder::new();
    builder
        .add_comment("memtrace: allocation sizes (bytes) and lifetimes (ns) as HdrHistogram intervals")
        .add_comment(
            "timestamps: seconds since the trace began; an interval spans a process's first to last event",
        )
        .add_comment("values: sizes of every allocation counted; lifetimes of blocks freed while traced");
    for p in &procs {
        let comm = p.comm.as_deref().unwrap_or("?");
        builder.add_comment(&format!(
            "pid={0}/sizes, pid={0}/lifetimes: PID {0} ({1})",
            p.pid,
            one_line(comm)
        ));
        let Some(h) = &p.histograms else { continue };
        for (i, s) in h.stacks.iter().enumerate() {
            let innermost = s
                .frames
                .first()
                .map_or_else(|| "[stack not captured]".to_string(), |f| f.label());
            builder.add_comment(&format!(
                "pid={0}/stack={1}/sizes, pid={0}/stack={1}/lifetimes: {2}",
                p.pid,
                i + 1,
                one_line(&innermost)
            ));
        }
    }

    let mut serializer = V2DeflateSerializer::new();
    let mut out = out;
    let mut log = builder.begin_log_with(&mut out, &mut serializer)?;
    for p in &procs {
        let Some(h) = &p.histograms else { continue };
        let start = seconds(p.first_s);
        let length = seconds(p.last_s - p.first_s);
        let mut intervals: Vec<(String, &Histogram<u64>)> = vec![
            (format!("pid={}/sizes", p.pid), &h.sizes.histogram),
            (format!("pid={}/lifetimes", p.pid), &h.lifetimes.histogram),
        ];
        for (i, s) in h.stacks.iter().enumerate() {
            let stack = format!("pid={}/stack={}", p.pid, i + 1);
            intervals.push((format!("{stack}/sizes"), &s.sizes.histogram));
            intervals.push((format!("{stack}/lifetimes"), &s.lifetimes.histogram));
        }
        for (tag, hist) in &intervals {
            // Built from numbers, '=' and '/' only: never a space or comma.
            let tag = Tag::new(tag).expect("tags hold no spaces or commas");
            log.write_histogram(hist, start, length, Some(tag))
                .map_err(|e| match e {
                    IntervalLogWriterError::IoError(e) => e,
                    IntervalLogWriterError::SerializeError(e) => io::Error::other(format!(
                        "cannot serialize histogram {}: {e}",
                        tag.as_str()
                    )),
                })?;
        }
    }
    Ok(())
}

/// A duration from seconds, negative and NaN read as zero (clocks of
/// different CPUs may disagree by a little).
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

/// Comments end at a line break, so names must not contain one.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    use super::super::View;
    use super::super::text::tests::{rich, rich_with};
    use super::*;

    /// Standard base64, enough to read the log back (the crate keeps its
    /// decoder to itself).
    fn base64(s: &str) -> Vec<u8> {
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = ABC.iter().position(|&a| a == c).expect("base64 digit") as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }

    /// (histogram, start s, length s) per tag, from the log text.
    fn read_back(log: &[u8]) -> BTreeMap<String, (Histogram<u64>, f64, f64)> {
        let mut by_tag = BTreeMap::new();
        for entry in IntervalLogIterator::new(log) {
            let LogEntry::Interval(i) = entry.expect("a well-formed log") else {
                panic!("no StartTime or BaseTime expected");
            };
            let bytes = base64(i.encoded_histogram());
            let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
            let tag = i
                .tag()
                .expect("every interval is tagged")
                .as_str()
                .to_string();
            let t = (
                h,
                i.start_timestamp().as_secs_f64(),
                i.duration().as_secs_f64(),
            );
            assert!(by_tag.insert(tag, t).is_none(), "tags are unique");
        }
        by_tag
    }

    fn render_to_vec(r: &Report) -> Vec<u8> {
        let mut out = Vec::new();
        render(r, &mut out).unwrap();
        out
    }

    #[test]
    fn reads_back_with_the_counts_and_maxima_of_the_report() {
        let r = rich();
        let log = render_to_vec(&r);
        let got = read_back(&log);
        let mut want = BTreeMap::new();
        for p in r.processes.iter().filter(|p| p.total_count > 0) {
            let h = p.histograms.as_ref().unwrap();
            let span = (p.first_s, p.last_s - p.first_s);
            let mut put = |tag: String, d: &super::super::Distribution| {
                want.insert(tag, (d.count, d.max, span.0, span.1));
            };
            put(format!("pid={}/sizes", p.pid), &h.sizes);
            put(format!("pid={}/lifetimes", p.pid), &h.lifetimes);
            for (i, s) in h.stacks.iter().enumerate() {
                put(format!("pid={}/stack={}/sizes", p.pid, i + 1), &s.sizes);
                put(
                    format!("pid={}/stack={}/lifetimes", p.pid, i + 1),
                    &s.lifetimes,
                );
            }
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (tag, (count, max, start, length)) in &want {
            let (h, got_start, got_length) = &got[tag];
            assert_eq!(h.len(), *count, "{tag}");
            // A histogram rebuilt from its buckets knows its maximum only
            // to its precision.
            assert!(
                *count == 0 || h.equivalent(h.max(), *max),
                "{tag}: max {} vs {max}",
                h.max()
            );
            // The log keeps milliseconds.
            assert!(
                (got_start - start).abs() < 0.001,
                "{tag}: start {got_start} vs {start}"
            );
            assert!(
                (got_length - length).abs() < 0.001,
                "{tag}: length {got_length} vs {length}"
            );
        }
        // Spot checks against the fixture itself.
        let sizes = &got["pid=42/sizes"].0;
        assert_eq!(sizes.len(), 26);
        assert!(sizes.equivalent(sizes.max(), 2 << 20));
        assert_eq!(got["pid=42/lifetimes"].0.len(), 22);
        assert_eq!(got["pid=77/stack=2/lifetimes"].0.len(), 1);
        assert!(
            !got.contains_key("pid=99/sizes"),
            "pid 99 allocated nothing"
        );
    }

    #[test]
    fn header_names_every_tag_and_intervals_are_in_time_order() {
        let log = String::from_utf8(render_to_vec(&rich())).unwrap();
        assert!(
            log.contains("#pid=42/sizes, pid=42/lifetimes: PID 42 (server)\n"),
            "{log}"
        );
        assert!(
            log.contains("#pid=77/sizes, pid=77/lifetimes: PID 77 (tmpl<&>)\n"),
            "{log}"
        );
        assert!(
            log.contains("#pid=42/stack=1/sizes, pid=42/stack=1/lifetimes: format_line\n"),
            "{log}"
        );
        assert!(log.contains(": [stack not captured]\n"), "{log}");
        let starts: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("Tag="))
            .map(|l| l.split(',').nth(1).unwrap())
            .collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
        assert!(
            log.lines()
                .any(|l| l.starts_with("Tag=pid=77/sizes,0.005,")),
            "{log}"
        );
    }

    #[test]
    fn without_histograms_there_are_no_intervals() {
        let log = String::from_utf8(render_to_vec(&rich_with(vec![View::Leaks]))).unwrap();
        assert!(!log.contains("Tag="), "{log}");
        assert!(log.starts_with("#memtrace: "), "{log}");
    }

    #[test]
    fn log_matches_its_snapshot() {
        let mut out = Vec::new();
        render(&rich(), &mut out).unwrap();
        insta::assert_snapshot!(String::from_utf8(out).unwrap());
    }
}
