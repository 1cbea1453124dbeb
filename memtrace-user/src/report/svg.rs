//! The timeline as an SVG plot: live bytes over time, one step-shaped line
//! per process that has a timeline, with axes, ticks, a legend and each
//! process's highest point marked. When the kernel side reported a
//! process's resident bytes (RSS), they are a second, dashed line in the
//! process's colour on the same scale, and the legend tells the allocated
//! (heap) line from the resident (RSS) one; a plot with no resident data
//! is drawn as before.
//!
//! Hand-written SVG text, no plotting crate, and deterministic: the same
//! report gives the same bytes (fixed-precision coordinates, no clock, no
//! random ids), so the output can be snapshot-tested. It does not compute a
//! timeline: it draws [`TimelineReport`](super::TimelineReport) points (the
//! highest live bytes within each point) as they are. The same text is
//! embedded by the HTML report ([`timeline_svg`]), so every id and class here
//! starts with `mt-` to stay clear of the flame graph's (`frames`, `title`,
//! `details`, …).
//!
//! ```text
//! let svg = memtrace::report::svg::timeline_svg(&report);
//! assert!(svg.starts_with("<svg"));
//! ```

use std::io::{self, Write};

use super::Report;
use super::text::{group, human};

/// Size of the whole picture (before the legend) and of the plot's margins.
const WIDTH: f64 = 800.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
const PLOT_HEIGHT: f64 = 280.0;
/// Height of one legend line.
const LEGEND_LINE: f64 = 18.0;

/// Line colours, one per process in report order, repeating after the last.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Dash pattern of the resident (RSS) lines.
const RESIDENT_DASH: &str = "6 3";

/// Writes the timeline of every process that has one as an SVG document.
pub fn timeline(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    let series: Vec<Series> = r
        .processes
        .iter()
        // Processes that only freed (and have no resident memory) are left
        // out, as in the text report.
        .filter(|p| p.total_count > 0 || p.resident.is_some())
        .filter_map(|p| {
            let t = p.timeline.as_ref()?;
            let resident: Vec<(f64, u64)> = t
                .points
                .iter()
                .filter_map(|q| Some((q.t_s, q.resident_max_bytes?)))
                .collect();
            (!t.points.is_empty()).then(|| Series {
                label: format!("{} ({})", p.comm.as_deref().unwrap_or("?"), p.pid),
                step_s: t.step_s,
                points: t.points.iter().map(|q| (q.t_s, q.max_bytes)).collect(),
                resident,
            })
        })
        .collect();
    let with_resident = series.iter().any(|s| !s.resident.is_empty());
    let legend_top = TOP + PLOT_HEIGHT + 52.0;
    let legend_lines: usize = series
        .iter()
        .map(|s| 1 + usize::from(!s.resident.is_empty()))
        .sum();
    let height = legend_top + LEGEND_LINE * legend_lines as f64 + 8.0;
    writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="mt-timeline" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"##
    )?;
    writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    )?;
    writeln!(
        out,
        r##"<text class="mt-title" x="{}" y="24" text-anchor="middle" font-size="16" font-weight="bold">memtrace: {} over time ({} s traced)</text>"##,
        WIDTH / 2.0,
        if with_resident {
            "live heap and resident bytes"
        } else {
            "live heap bytes"
        },
        num(r.duration_s, 2)
    )?;
    if series.is_empty() {
        writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle">no timeline: no process allocated, or the timeline view was not built</text>"##,
            WIDTH / 2.0,
            TOP + PLOT_HEIGHT / 2.0
        )?;
        return writeln!(out, "</svg>");
    }
    let x_end = series
        .iter()
        .map(|s| s.points.last().map_or(0.0, |p| p.0) + s.step_s)
        .fold(0.0, f64::max);
    // One scale for both lines: it covers the highest of either.
    let y_end = series
        .iter()
        .flat_map(|s| s.points.iter().chain(&s.resident).map(|p| p.1))
        .max()
        .unwrap_or(0);
    let axes = Axes::new(x_end, y_end);
    axes.write(
        out,
        if with_resident {
            "bytes (highest per point)"
        } else {
            "live bytes (highest per point)"
        },
    )?;
    let mut legend_y = legend_top;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        writeln!(
            out,
            r##"<polyline class="mt-series" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"##,
            step_path(&axes, &s.points, s.step_s)
        )?;
        let (t, v) = highest(&s.points);
        writeln!(
            out,
            r##"<circle cx="{}" cy="{}" r="3" fill="{colour}"><title>{}: highest {}{} at {} s</title></circle>"##,
            num(axes.x(t + s.step_s / 2.0), 1),
            num(axes.y(v), 1),
            escape(&s.label),
            if with_resident { "allocated " } else { "" },
            bytes(v),
            num(t, 3)
        )?;
        legend(
            out,
            legend_y,
            colour,
            None,
            &if with_resident {
                format!("{}: allocated (heap)", s.label)
            } else {
                s.label.clone()
            },
        )?;
        legend_y += LEGEND_LINE;
        if s.resident.is_empty() {
            continue;
        }
        writeln!(
            out,
            r##"<polyline class="mt-resident" fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{RESIDENT_DASH}" points="{}"/>"##,
            step_path(&axes, &s.resident, s.step_s)
        )?;
        let (t, v) = highest(&s.resident);
        writeln!(
            out,
            r##"<circle cx="{}" cy="{}" r="3" fill="#ffffff" stroke="{colour}" stroke-width="1.5"><title>{}: highest resident {} at {} s</title></circle>"##,
            num(axes.x(t + s.step_s / 2.0), 1),
            num(axes.y(v), 1),
            escape(&s.label),
            bytes(v),
            num(t, 3)
        )?;
        legend(
            out,
            legend_y,
            colour,
            Some(RESIDENT_DASH),
            &format!("{}: resident (RSS)", s.label),
        )?;
        legend_y += LEGEND_LINE;
    }
    writeln!(out, "</svg>")
}

/// A step-shaped line through `points`: a point's value holds over its
/// whole width, so the line turns only where the value changes.
fn step_path(axes: &Axes, points: &[(f64, u64)], step_s: f64) -> String {
    let mut path: Vec<String> = Vec::new();
    let mut corner = |t: f64, v: u64| {
        let at = format!("{},{}", num(axes.x(t), 1), num(axes.y(v), 1));
        // Changes smaller than a tenth of a pixel would repeat a corner.
        if path.last() != Some(&at) {
            path.push(at);
        }
    };
    let mut prev = None;
    for &(t, v) in points {
        match prev {
            None => corner(t, v),
            Some(p) if p != v => {
                corner(t, p);
                corner(t, v);
            }
            Some(_) => {}
        }
        prev = Some(v);
    }
    if let (Some(&(t, v)), Some(_)) = (points.last(), prev) {
        corner(t + step_s, v);
    }
    path.join(" ")
}

/// The first point that reaches the highest value.
fn highest(points: &[(f64, u64)]) -> (f64, u64) {
    points
        .iter()
        .copied()
        .fold((0.0, 0), |best, p| if p.1 > best.1 { p } else { best })
}

/// `3,149,824 B [3.0 MiB]`, the human part only when it adds something.
fn bytes(v: u64) -> String {
    if v < 1024 {
        format!("{} B", group(v))
    } else {
        format!("{} B [{}]", group(v), human(v))
    }
}

/// One legend line: a swatch of the line (dashed when `dash` is given) and
/// its label.
fn legend(
    out: &mut dyn Write,
    y: f64,
    colour: &str,
    dash: Option<&str>,
    label: &str,
) -> io::Result<()> {
    let dash = dash.map_or(String::new(), |d| format!(" stroke-dasharray=\"{d}\""));
    writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"##,
        num(y - 4.0, 1),
        LEFT + 24.0,
        num(y - 4.0, 1),
        LEFT + 30.0,
        num(y, 1),
        escape(label)
    )
}

/// The SVG document as a string, for embedding (it has no XML prolog, so it
/// can go straight into an HTML page).
pub fn timeline_svg(r: &Report) -> String {
    let mut out = Vec::new();
    timeline(r, &mut out).expect("writing to a Vec cannot fail");
    String::from_utf8(out).expect("the SVG is built from UTF-8 strings")
}

/// Escapes text for XML and HTML, content and quoted attributes alike.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One process's lines: (point start in seconds, highest live bytes), and
/// the same for resident bytes where the kernel side reported them (empty
/// when it did not).
struct Series {
    label: String,
    step_s: f64,
    points: Vec<(f64, u64)>,
    resident: Vec<(f64, u64)>,
}

/// Scales and ticks: the x axis runs from the trace's start to the last
/// point's end, the y axis from 0 to the highest value, both rounded up to
/// a whole tick.
struct Axes {
    x_step: f64,
    x_ticks: usize,
    x_max: f64,
    y_step: u64,
    y_ticks: u64,
    y_max: u64,
}

impl Axes {
    fn new(x_end: f64, y_end: u64) -> Self {
        let x_step = nice_seconds(x_end.max(1e-9) / 8.0);
        let x_ticks = (x_end / x_step - 1e-9).ceil().max(1.0) as usize;
        let y_step = nice_bytes(y_end.max(1).div_ceil(5));
        let y_ticks = y_end.max(1).div_ceil(y_step);
        Self {
            x_step,
            x_ticks,
            x_max: x_step * x_ticks as f64,
            y_step,
            y_ticks,
            y_max: y_step * y_ticks,
        }
    }

    fn x(&self, t_s: f64) -> f64 {
        LEFT + (WIDTH - LEFT - RIGHT) * t_s / self.x_max
    }

    fn y(&self, v: u64) -> f64 {
        TOP + PLOT_HEIGHT * (1.0 - v as f64 / self.y_max as f64)
    }

    /// The grid, ticks and axis titles; `y_title` names the y axis.
    fn write(&self, out: &mut dyn Write, y_title: &str) -> io::Result<()> {
        let bottom = TOP + PLOT_HEIGHT;
        let right = WIDTH - RIGHT;
        for i in 0..=self.y_ticks {
            let v = self.y_step * i;
            let y = num(self.y(v), 1);
            writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y}" x2="{right}" y2="{y}" stroke="#e0e0e0"/><text x="{}" y="{y}" dy="4" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                human(v)
            )?;
        }
        // Enough decimals to tell ticks apart, no more.
        let decimals = if self.x_step >= 1.0 {
            0
        } else {
            // 1e-9 absorbs log10's rounding (0.01 → -1.9999…).
            (-self.x_step.log10() - 1e-9).ceil() as usize
        };
        for i in 0..=self.x_ticks {
            let t = self.x_step * i as f64;
            let x = num(self.x(t), 1);
            writeln!(
                out,
                r##"<line x1="{x}" y1="{bottom}" x2="{x}" y2="{}" stroke="#000000"/><text x="{x}" y="{}" text-anchor="middle">{} s</text>"##,
                bottom + 5.0,
                bottom + 18.0,
                num(t, decimals)
            )?;
        }
        writeln!(
            out,
            r##"<polyline fill="none" stroke="#000000" points="{LEFT},{TOP} {LEFT},{bottom} {right},{bottom}"/>"##
        )?;
        writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle">seconds since the trace began</text>"##,
            LEFT + (right - LEFT) / 2.0,
            bottom + 36.0
        )?;
        writeln!(
            out,
            r##"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_title}</text>"##,
            TOP + PLOT_HEIGHT / 2.0,
            TOP + PLOT_HEIGHT / 2.0
        )
    }
}

/// The smallest of 1, 2, 5 × a power of ten seconds that is at least `raw`.
fn nice_seconds(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// The smallest of 1, 2, 5, 10, 20, 50, 100, 200, 500 × a power of 1024
/// bytes that is at least `raw`, so tick labels read `512.0 KiB`, `1.0
/// MiB`, not `1,048,576`-ish fractions.
fn nice_bytes(raw: u64) -> u64 {
    let mut unit = 1u64;
    loop {
        for m in [1, 2, 5, 10, 20, 50, 100, 200, 500] {
            let s = m * unit;
            if s >= raw {
                return s;
            }
        }
        match unit.checked_mul(1024) {
            Some(u) if u.checked_mul(500).is_some() => unit = u,
            _ => return raw,
        }
    }
}

/// A number with fixed decimals and without `-0`, for stable output.
fn num(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::View;
    use super::super::text::tests::{rich, rich_with};
    use super::*;

    #[test]
    fn timeline_matches_its_snapshot() {
        insta::assert_snapshot!("timeline", timeline_svg(&rich()));
    }

    #[test]
    fn one_line_per_process_with_a_timeline_and_names_escaped() {
        let svg = timeline_svg(&rich());
        assert_eq!(
            svg.matches("<polyline class=\"mt-series\"").count(),
            2,
            "{svg}"
        );
        assert!(svg.contains(">tmpl&lt;&amp;&gt; (77)</text>"), "{svg}");
        assert!(svg.contains(">server (42)</text>"), "{svg}");
        assert!(!svg.contains("tmpl<"), "{svg}");
        assert!(svg.ends_with("</svg>\n"));
    }

    /// [`rich`] with resident bytes on PID 42's timeline from its third
    /// point on: 8 MiB, then 9 MiB from the tenth, above every heap value.
    pub(crate) fn rich_with_resident() -> Report {
        let mut r = rich();
        let t = r.processes[0].timeline.as_mut().unwrap();
        for (i, q) in t.points.iter_mut().enumerate().skip(2) {
            let rss = if i < 10 { 8 << 20 } else { 9 << 20 };
            q.resident_max_bytes = Some(rss);
            q.resident_end_bytes = Some(rss);
        }
        r
    }

    #[test]
    fn resident_bytes_are_a_dashed_second_line_on_the_same_scale() {
        let svg = timeline_svg(&rich_with_resident());
        assert_eq!(
            svg.matches("<polyline class=\"mt-series\"").count(),
            2,
            "{svg}"
        );
        // Only PID 42 has resident data: one dashed line, in its colour.
        assert_eq!(
            svg.matches("<polyline class=\"mt-resident\"").count(),
            1,
            "{svg}"
        );
        assert!(
            svg.contains(
                "<polyline class=\"mt-resident\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" stroke-dasharray=\"6 3\""
            ),
            "{svg}"
        );
        // The legend names both lines, the resident swatch dashed too.
        assert!(
            svg.contains(">server (42): allocated (heap)</text>"),
            "{svg}"
        );
        assert!(
            svg.contains("stroke-dasharray=\"6 3\"/><text x=\"120\" y=\"394.0\">server (42): resident (RSS)</text>"),
            "{svg}"
        );
        assert!(
            svg.contains(">tmpl&lt;&amp;&gt; (77): allocated (heap)</text>"),
            "{svg}"
        );
        assert!(!svg.contains("(77): resident"), "{svg}");
        // The y axis reaches 9 MiB (the heap alone peaks at 3 MiB) and the
        // highest resident point sits below its top.
        assert!(svg.contains(">10.0 MiB</text>"), "{svg}");
        assert!(
            svg.contains("highest resident 9,437,184 B [9.0 MiB] at 0.011 s"),
            "{svg}"
        );
        assert!(
            svg.contains("live heap and resident bytes over time"),
            "{svg}"
        );
        // One more legend line than without resident data.
        let plain = timeline_svg(&rich());
        let height = |s: &str| {
            s.split("height=\"")
                .nth(1)
                .and_then(|h| h.split('"').next())
                .map(str::to_string)
        };
        assert_eq!(height(&plain).as_deref(), Some("420"));
        assert_eq!(height(&svg).as_deref(), Some("438"));
    }

    #[test]
    fn timeline_with_resident_matches_its_snapshot() {
        insta::assert_snapshot!("timeline_resident", timeline_svg(&rich_with_resident()));
    }

    #[test]
    fn without_resident_data_there_is_no_resident_line_or_legend() {
        let svg = timeline_svg(&rich());
        assert!(!svg.contains("mt-resident"), "{svg}");
        assert!(!svg.contains("stroke-dasharray"), "{svg}");
        assert!(!svg.contains("(RSS)"), "{svg}");
        assert!(svg.contains(">server (42)</text>"), "{svg}");
    }

    #[test]
    fn without_timelines_it_says_so() {
        let svg = timeline_svg(&rich_with(vec![View::Leaks]));
        assert!(svg.contains("no timeline"), "{svg}");
        assert!(!svg.contains("<polyline"), "{svg}");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_bytes(1), 1);
        assert_eq!(nice_bytes(3), 5);
        assert_eq!(nice_bytes(629_965), 1024 * 1024);
        assert_eq!(nice_bytes(300 * 1024), 500 * 1024);
        assert_eq!(nice_seconds(0.0075), 0.01);
        assert_eq!(nice_seconds(0.3), 0.5);
        assert_eq!(num(-0.0001, 1), "0.0");
    }
}
