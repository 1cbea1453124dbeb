//! Flame graphs: the lines of [`super::folded`], drawn by inferno as one
//! interactive SVG (hover for values, click to zoom, Ctrl-F to search).
//!
//! Widths are one [`Weight`], bytes or blocks, not time: a frame is as wide
//! as what was allocated under it and is still live (or was allocated, for
//! the `total` weights). The root frames are processes. Colors come from
//! inferno's memory palette, picked from a hash of each name rather than at
//! random, so the same samples give the same file. An icicle graph has the
//! same frames, with the processes on top.
//!
//! It does not choose or merge stacks (that is `folded`'s job, so a flame
//! graph and the folded output always show the same numbers), and it draws
//! no differential graphs.

use std::io::{self, Write};

use inferno::flamegraph::color::{BasicPalette, Palette};
use inferno::flamegraph::{self, Direction};

use super::{Sample, Weight, folded};

/// How to draw.
#[derive(Clone, Debug, Default)]
pub struct FlameOptions {
    /// The heading.
    pub title: String,
    /// Draw an icicle graph: root on top, stacks growing down.
    pub icicle: bool,
}

/// Writes the flame graph of `samples` under `weight` as SVG. With no stack
/// weighing more than 0 it writes a small SVG that says so.
pub fn render(
    samples: &[Sample],
    weight: Weight,
    opts: &FlameOptions,
    out: &mut dyn Write,
) -> io::Result<()> {
    let lines = folded::lines(samples, weight);
    if lines.is_empty() {
        // inferno would write an error image and fail; an empty view is not
        // an error.
        return empty(&opts.title, weight, out);
    }
    // `Options` is `#[non_exhaustive]`: no struct literal.
    let mut o = flamegraph::Options::default();
    o.title = opts.title.clone();
    o.count_name = weight.unit().to_string();
    o.colors = Palette::Basic(BasicPalette::Mem);
    // Stable across machines (FNV of the name), unlike the default.
    o.deterministic = true;
    // An icicle keeps the stacks as they are (`reverse_stack_order` would
    // put the innermost frames at the root instead).
    o.direction = if opts.icicle {
        Direction::Inverted
    } else {
        Direction::Straight
    };
    flamegraph::from_lines(&mut o, lines.iter().map(String::as_str), out)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot draw the flame graph: {e}")))
}

/// What `weight` counts, in words.
fn describe(weight: Weight) -> &'static str {
    match weight {
        Weight::LiveBytes => "live bytes",
        Weight::LiveCount => "live blocks",
        Weight::TotalBytes => "allocated bytes",
        Weight::TotalCount => "allocated blocks",
    }
}

/// A valid SVG with the title and a note that nothing weighs anything.
fn empty(title: &str, weight: Weight, out: &mut dyn Write) -> io::Result<()> {
    write!(
        out,
        concat!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n",
            "<svg version=\"1.1\" width=\"1200\" height=\"80\" viewBox=\"0 0 1200 80\" ",
            "xmlns=\"http://www.w3.org/2000/svg\">\n",
            "<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eeeeee\"/>\n",
            "<text x=\"600\" y=\"30\" text-anchor=\"middle\" font-family=\"monospace\" ",
            "font-size=\"17\">{title}</text>\n",
            "<text x=\"600\" y=\"56\" text-anchor=\"middle\" font-family=\"monospace\" ",
            "font-size=\"12\">no stacks with {what} &gt; 0</text>\n",
            "</svg>\n",
        ),
        title = super::svg::escape(title),
        what = describe(weight),
    )
}

#[cfg(test)]
mod tests {
    use super::super::folded::tests::synthetic;
    use super::*;

    fn svg(samples: &[Sample], weight: Weight, icicle: bool) -> String {
        let opts = FlameOptions {
            title: "memtrace: leaks".to_string(),
            icicle,
        };
        let mut out = Vec::new();
        render(samples, weight, &opts, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The `y` of the rectangle drawn for the frame whose tooltip starts
    /// with `title`.
    fn y_of(svg: &str, title: &str) -> u64 {
        let at = svg.find(&format!("<title>{title}")).unwrap();
        let rest = &svg[at..];
        let y = &rest[rest.find(" y=\"").unwrap() + 4..];
        y[..y.find('"').unwrap()].parse().unwrap()
    }

    #[test]
    fn golden_live_bytes() {
        insta::assert_snapshot!("live_bytes", svg(&synthetic(), Weight::LiveBytes, false));
    }

    #[test]
    fn same_samples_same_bytes() {
        let a = svg(&synthetic(), Weight::LiveBytes, false);
        let b = svg(&synthetic(), Weight::LiveBytes, false);
        assert_eq!(a, b);
    }

    #[test]
    fn widths_are_the_folded_values() {
        let s = svg(&synthetic(), Weight::LiveBytes, false);
        // 4096 + 100 + 1000 + 512 + 256
        assert!(s.contains("<title>all (5,964 bytes, 100%)</title>"));
        assert!(s.contains("<title>server (100) (5,196 bytes, "));
        let s = svg(&synthetic(), Weight::TotalCount, false);
        assert!(s.contains("<title>all (43 blocks, 100%)</title>"));
        assert!(s.contains("<title>parse_header (1 blocks, "));
    }

    #[test]
    fn icicle_puts_the_root_on_top() {
        let flame = svg(&synthetic(), Weight::LiveBytes, false);
        let icicle = svg(&synthetic(), Weight::LiveBytes, true);
        assert!(y_of(&flame, "all (") > y_of(&flame, "alloc_buffer"));
        assert!(y_of(&icicle, "all (") < y_of(&icicle, "alloc_buffer"));
        assert!(icicle.contains("var inverted = true;"));
    }

    #[test]
    fn nothing_to_draw_is_not_an_error() {
        let opts = FlameOptions {
            title: "temporary <&>".to_string(),
            icicle: false,
        };
        let mut out = Vec::new();
        let none: Vec<Sample> = synthetic()
            .into_iter()
            .map(|s| Sample { live_bytes: 0, ..s })
            .collect();
        render(&none, Weight::LiveBytes, &opts, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("<?xml "), "{s}");
        assert!(s.ends_with("</svg>\n"), "{s}");
        assert!(s.contains(">temporary &lt;&amp;&gt;</text>"), "{s}");
        assert!(
            s.contains(">no stacks with live bytes &gt; 0</text>"),
            "{s}"
        );
    }
}
