//! The JSON report: one document per report, on one line.
//!
//! The layout is [`super::Report`]'s, documented in the README and versioned
//! by [`super::REPORT_VERSION`].

use std::io::{self, Write};

use super::Report;

/// Writes the report as one line of JSON.
pub fn render(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::super::{Ledger, Options, build, tests::sample};

    #[test]
    fn has_the_documented_shape() {
        let (agg, mut table) = sample();
        let r = build(
            &agg,
            &Ledger::default(),
            &[],
            &mut table,
            &Options::default(),
        );
        let mut out = Vec::new();
        super::render(&r, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["mode"], "exact");
        let p = &v["processes"][0];
        assert_eq!(p["pid"], 42);
        assert_eq!(p["live_bytes"], 5200);
        assert_eq!(p["stacks"][0]["frames"][0]["function"], "leak_big");
        assert_eq!(p["stacks"][0]["frames"][0]["address"], "0x2");
        assert_eq!(p["stacks"][0]["frames"][0]["file"], serde_json::Value::Null);
        assert_eq!(v["lost"]["unknown_frees"], 0);
    }

    #[test]
    fn every_view_matches_its_snapshot() {
        for view in super::super::View::ALL {
            let r = super::super::text::tests::rich_with(vec![view]);
            let mut out = Vec::new();
            super::render(&r, &mut out).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            insta::assert_snapshot!(
                format!("view_{}", view.name()),
                serde_json::to_string_pretty(&v).unwrap()
            );
        }
    }
}
