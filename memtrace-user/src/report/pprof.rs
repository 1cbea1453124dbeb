//! pprof profiles: gzip-compressed protobuf in the `perftools.profiles`
//! schema (google/pprof `proto/profile.proto`), for `go tool pprof`,
//! `pprof -http`, Grafana Pyroscope, Speedscope and the like.
//!
//! Values follow Go's heap profiles, so tools treat the file as one:
//! `alloc_objects`/`alloc_space` (blocks and bytes allocated) and
//! `inuse_objects`/`inuse_space` (live); the default is `inuse_space` for
//! `leaks` and `peak`, `alloc_space` for `temporary`. Every call is traced,
//! so the period is 1 byte and values need no scaling. Each sample carries
//! the process as labels `pid` (number) and `comm` (string).
//!
//! Frames are already symbolized: a location holds its inlined functions
//! innermost first, as pprof wants, and its mapping holds the file's path and
//! GNU build-id, so pprof can still symbolize what we could not (a frame
//! with a module but no function has a location with no lines). A frame
//! outside every mapping keeps only its address.
//!
//! It does not symbolize, sample or merge: each [`Sample`] is one pprof
//! sample. The message types below are written from the public schema;
//! nothing is generated at build time.

use std::collections::HashMap;
use std::io::{self, Write};

use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::{Sample, View};
use crate::symbolize::Frame;

/// What a profile's values are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// A Go-style heap profile: `alloc_objects`, `alloc_space`,
    /// `inuse_objects`, `inuse_space`.
    #[default]
    Heap,
    /// Page faults that made memory resident: `faults` (count) and
    /// `resident_space` (bytes), from each sample's `total_count` and
    /// `total_bytes`.
    Faults,
}

/// What a profile says beyond its samples: the sampling period and labels
/// every sample carries (the agent's host, cgroup, container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// What the values are.
    pub kind: Kind,
    /// Mean bytes between samples: 1 for exact tracing (values need no
    /// scaling either way: sampled values are already estimates).
    pub period: i64,
    /// `(key, value)` string labels added to every sample.
    pub labels: Vec<(String, String)>,
    /// When the profile was taken, ns since the Unix epoch (0: unknown).
    pub time_nanos: i64,
}

impl Default for Meta {
    fn default() -> Self {
        Self {
            kind: Kind::Heap,
            period: 1,
            labels: Vec::new(),
            time_nanos: 0,
        }
    }
}

/// Writes the samples of `view` as a gzipped pprof profile covering
/// `duration_s` seconds.
pub fn render(
    samples: &[Sample],
    view: View,
    duration_s: f64,
    out: &mut dyn Write,
) -> io::Result<()> {
    render_with(samples, view, duration_s, &Meta::default(), out)
}

/// [`render`], with a period and labels.
pub fn render_with(
    samples: &[Sample],
    view: View,
    duration_s: f64,
    meta: &Meta,
    out: &mut dyn Write,
) -> io::Result<()> {
    let bytes = profile(samples, view, duration_s, meta).encode_to_vec();
    // GzEncoder::new writes mtime 0 into the header: same input, same file.
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}

/// Builds the profile message.
fn profile(samples: &[Sample], view: View, duration_s: f64, meta: &Meta) -> Profile {
    let mut b = Builder::default();
    // Index 0 must be "" (the schema says so; readers rely on it).
    b.string("");
    let mut value_type = |kind: &str, unit: &str| ValueType {
        r#type: b.string(kind),
        unit: b.string(unit),
    };
    // The order of the values in every sample.
    let (sample_type, period_type, default_sample_type, comment) = match meta.kind {
        Kind::Heap => {
            let sample_type = vec![
                value_type("alloc_objects", "count"),
                value_type("alloc_space", "bytes"),
                value_type("inuse_objects", "count"),
                value_type("inuse_space", "bytes"),
            ];
            let period_type = value_type("space", "bytes");
            let default = match view {
                View::Temporary => sample_type[1].r#type,
                _ => sample_type[3].r#type,
            };
            (
                sample_type,
                period_type,
                default,
                format!("memtrace {}", view.name()),
            )
        }
        Kind::Faults => {
            let sample_type = vec![
                value_type("faults", "count"),
                value_type("resident_space", "bytes"),
            ];
            let period_type = value_type("faults", "count");
            let default = sample_type[1].r#type;
            (
                sample_type,
                period_type,
                default,
                "memtrace page faults".to_string(),
            )
        }
    };
    let comment = vec![b.string(&comment)];
    let (pid_key, comm_key) = (b.string("pid"), b.string("comm"));
    let extra: Vec<Label> = meta
        .labels
        .iter()
        .map(|(k, v)| Label {
            key: b.string(k),
            str: b.string(v),
            ..Label::default()
        })
        .collect();
    let sample = samples
        .iter()
        .map(|s| {
            let location_id = per_address(&s.frames)
                .into_iter()
                .map(|chain| b.location(s.pid, chain))
                .collect();
            let mut label = vec![Label {
                key: pid_key,
                num: i64::from(s.pid),
                ..Label::default()
            }];
            if let Some(comm) = s.comm.as_deref().filter(|c| !c.is_empty()) {
                label.push(Label {
                    key: comm_key,
                    str: b.string(comm),
                    ..Label::default()
                });
            }
            label.extend(extra.iter().cloned());
            let values: &[u64] = match meta.kind {
                Kind::Heap => &[s.total_count, s.total_bytes, s.live_count, s.live_bytes],
                Kind::Faults => &[s.total_count, s.total_bytes],
            };
            ProfileSample {
                location_id,
                value: values
                    .iter()
                    .copied()
                    .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
                    .collect(),
                label,
            }
        })
        .collect();
    let mapping = b.mappings();
    Profile {
        sample_type,
        sample,
        mapping,
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        duration_nanos: (duration_s.max(0.0) * 1e9) as i64,
        period_type: Some(period_type),
        period: meta.period,
        time_nanos: meta.time_nanos,
        comment,
        default_sample_type,
        ..Profile::default()
    }
}

/// Splits a stack (innermost first) into one chain of frames per return
/// address. Frames of one address are its inlined functions; but a function
/// that calls itself from one call site repeats the same address, so a run
/// of one address is cut into its shortest repeating chain.
fn per_address(frames: &[Frame]) -> Vec<&[Frame]> {
    let mut out = Vec::new();
    let mut rest = frames;
    while let Some(first) = rest.first() {
        let len = rest
            .iter()
            .position(|f| f.address != first.address)
            .unwrap_or(rest.len());
        let run = &rest[..len];
        let period = (1..=len)
            .find(|&p| len % p == 0 && run.chunks(p).all(|c| c == &run[..p]))
            .unwrap_or(len);
        out.extend(run.chunks(period));
        rest = &rest[len..];
    }
    out
}

/// One mapped file of one process (the key in `span_ids`), as its frames
/// show it.
struct Span {
    path: String,
    build_id: Option<String>,
    start: u64,
    limit: u64,
    // Whether every frame in it has a function, file, line (pprof
    // symbolizes mappings without functions itself, if it finds the file).
    functions: bool,
    filenames: bool,
    line_numbers: bool,
}

/// Interns strings, functions, locations and mappings; ids start at 1
/// (0 means none in the schema).
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, Option<String>), u64>,
    locations: Vec<Location>,
    location_ids: HashMap<(u32, u64), u64>,
    spans: Vec<Span>,
    span_ids: HashMap<(u32, String), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let key = (name.to_string(), file.map(str::to_string));
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.string(name);
        let filename = file.map_or(0, |f| self.string(f));
        self.functions.push(Function {
            id,
            name,
            // Names are demangled already; there is no other to give.
            system_name: name,
            filename,
            start_line: 0,
        });
        self.function_ids.insert(key, id);
        id
    }

    /// The location of one address's chain of frames (innermost first).
    fn location(&mut self, pid: u32, chain: &[Frame]) -> u64 {
        let first = &chain[0];
        if let Some(&id) = self.location_ids.get(&(pid, first.address)) {
            return id;
        }
        let mapping_id = match &first.module {
            Some(path) => self.span(pid, path, chain),
            None => 0,
        };
        // pprof: "the last entry represents the caller into which the
        // preceding entries were inlined", i.e. innermost first, as ours.
        let line = chain
            .iter()
            .filter_map(|f| {
                let name = f.function.as_deref()?;
                Some(Line {
                    function_id: self.function(name, f.file.as_deref()),
                    line: f.line.map_or(0, i64::from),
                    column: 0,
                })
            })
            .collect();
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location {
            id,
            mapping_id,
            address: first.address,
            line,
            is_folded: false,
        });
        self.location_ids.insert((pid, first.address), id);
        id
    }

    /// The mapping of `path` in `pid`, grown to cover `chain`'s address.
    fn span(&mut self, pid: u32, path: &str, chain: &[Frame]) -> u64 {
        let first = &chain[0];
        // Where the file's offset 0 would be mapped: the address less its
        // offset in the file, so that pprof's address → file offset works.
        let start = first.address - first.module_offset.unwrap_or(0).min(first.address);
        let key = (pid, path.to_string());
        let id = *self.span_ids.entry(key).or_insert_with(|| {
            self.spans.push(Span {
                path: path.to_string(),
                build_id: None,
                start,
                limit: start,
                functions: true,
                filenames: true,
                line_numbers: true,
            });
            self.spans.len() as u64
        });
        let span = &mut self.spans[id as usize - 1];
        span.start = span.start.min(start);
        span.limit = span.limit.max(first.address.saturating_add(1));
        if span.build_id.is_none() {
            span.build_id = first.build_id.clone();
        }
        for f in chain {
            span.functions &= f.function.is_some();
            span.filenames &= f.file.is_some();
            span.line_numbers &= f.line.is_some();
        }
        id
    }

    fn mappings(&mut self) -> Vec<Mapping> {
        let spans = std::mem::take(&mut self.spans);
        spans
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Mapping {
                    id: i as u64 + 1,
                    memory_start: s.start,
                    memory_limit: s.limit,
                    file_offset: 0,
                    filename: self.string(&s.path),
                    build_id: s.build_id.as_deref().map_or(0, |b| self.string(b)),
                    has_functions: s.functions,
                    has_filenames: s.filenames,
                    has_line_numbers: s.line_numbers,
                    // blazesym reports inlined functions whenever it finds
                    // a function.
                    has_inline_frames: s.functions,
                }
            })
            .collect()
    }
}

// The perftools.profiles messages, with the schema's field numbers. Strings
// are indexes into `string_table`; ids are 1-based, 0 meaning none.

#[derive(Clone, PartialEq, Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<ProfileSample>,
    #[prost(message, repeated, tag = "3")]
    mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "7")]
    drop_frames: i64,
    #[prost(int64, tag = "8")]
    keep_frames: i64,
    #[prost(int64, tag = "9")]
    time_nanos: i64,
    #[prost(int64, tag = "10")]
    duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
    #[prost(int64, repeated, tag = "13")]
    comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    default_sample_type: i64,
}

#[derive(Clone, Copy, PartialEq, Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

/// `Sample` in the schema.
#[derive(Clone, PartialEq, Message)]
struct ProfileSample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    /// One per `sample_type`.
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
struct Label {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "2")]
    str: i64,
    #[prost(int64, tag = "3")]
    num: i64,
    #[prost(int64, tag = "4")]
    num_unit: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Mapping {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    memory_start: u64,
    #[prost(uint64, tag = "3")]
    memory_limit: u64,
    #[prost(uint64, tag = "4")]
    file_offset: u64,
    #[prost(int64, tag = "5")]
    filename: i64,
    #[prost(int64, tag = "6")]
    build_id: i64,
    #[prost(bool, tag = "7")]
    has_functions: bool,
    #[prost(bool, tag = "8")]
    has_filenames: bool,
    #[prost(bool, tag = "9")]
    has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    mapping_id: u64,
    #[prost(uint64, tag = "3")]
    address: u64,
    /// Innermost inlined function first.
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
    #[prost(bool, tag = "5")]
    is_folded: bool,
}

#[derive(Clone, PartialEq, Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
    #[prost(int64, tag = "3")]
    column: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "3")]
    system_name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
    #[prost(int64, tag = "5")]
    start_line: i64,
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use super::super::folded::tests::synthetic;
    use super::*;

    fn written(view: View) -> Profile {
        let mut gz = Vec::new();
        render(&synthetic(), view, 1.5, &mut gz).unwrap();
        let mut raw = Vec::new();
        GzDecoder::new(gz.as_slice()).read_to_end(&mut raw).unwrap();
        Profile::decode(raw.as_slice()).unwrap()
    }

    fn text(p: &Profile, i: i64) -> &str {
        &p.string_table[i as usize]
    }

    fn location(p: &Profile, id: u64) -> &Location {
        let l = &p.location[id as usize - 1];
        assert_eq!(l.id, id);
        l
    }

    fn function(p: &Profile, id: u64) -> &Function {
        let f = &p.function[id as usize - 1];
        assert_eq!(f.id, id);
        f
    }

    fn mapping(p: &Profile, id: u64) -> &Mapping {
        let m = &p.mapping[id as usize - 1];
        assert_eq!(m.id, id);
        m
    }

    /// A sample's stack, leaf first: per location its functions innermost
    /// first joined by `<`, or its address when it has none.
    fn stack(p: &Profile, s: &ProfileSample) -> Vec<String> {
        s.location_id
            .iter()
            .map(|&id| {
                let l = location(p, id);
                if l.line.is_empty() {
                    return format!("{:#x}", l.address);
                }
                let names: Vec<&str> = l
                    .line
                    .iter()
                    .map(|line| text(p, function(p, line.function_id).name))
                    .collect();
                names.join("<")
            })
            .collect()
    }

    #[test]
    fn header_follows_go_heap_profiles() {
        let p = written(View::Leaks);
        assert_eq!(p.string_table[0], "");
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (text(&p, t.r#type), text(&p, t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes")
            ]
        );
        assert_eq!(text(&p, p.default_sample_type), "inuse_space");
        let period = p.period_type.unwrap();
        assert_eq!(
            (text(&p, period.r#type), text(&p, period.unit)),
            ("space", "bytes")
        );
        assert_eq!(p.period, 1);
        assert_eq!(p.duration_nanos, 1_500_000_000);
        assert_eq!(text(&p, p.comment[0]), "memtrace leaks");
        let temporary = written(View::Temporary);
        assert_eq!(
            text(&temporary, temporary.default_sample_type),
            "alloc_space"
        );
    }

    #[test]
    fn samples_keep_values_labels_and_stacks() {
        let p = written(View::Leaks);
        let input = synthetic();
        assert_eq!(p.sample.len(), input.len());
        for (s, i) in p.sample.iter().zip(&input) {
            let expected = [i.total_count, i.total_bytes, i.live_count, i.live_bytes];
            let expected: Vec<i64> = expected.iter().map(|&v| v as i64).collect();
            assert_eq!(s.value, expected);
            let labels: Vec<(&str, String)> = s
                .label
                .iter()
                .map(|l| {
                    let v = if l.str != 0 {
                        text(&p, l.str).to_string()
                    } else {
                        l.num.to_string()
                    };
                    (text(&p, l.key), v)
                })
                .collect();
            let mut want = vec![("pid", i.pid.to_string())];
            want.extend(i.comm.iter().map(|c| ("comm", c.clone())));
            assert_eq!(labels, want);
        }
        let stacks: Vec<Vec<String>> = p.sample.iter().map(|s| stack(&p, s)).collect();
        assert_eq!(
            stacks,
            [
                vec!["alloc_buffer<handle_request", "main", "__libc_start_main"],
                vec!["alloc_buffer<handle_request", "main", "__libc_start_main"],
                vec!["0x7f1004a0", "handle_request", "main", "__libc_start_main"],
                vec!["parse_header", "main", "__libc_start_main"],
                vec!["0xdeadbeef", "<[u8; 8] as client::Encode>::encode", "main"],
                vec!["recurse", "recurse", "main"],
            ]
        );
    }

    #[test]
    fn locations_are_per_address_and_functions_per_name_and_file() {
        let p = written(View::Leaks);
        let (a, b) = (&p.sample[0].location_id, &p.sample[1].location_id);
        // Two call sites: two locations, the same two functions, the same
        // caller locations.
        assert_ne!(a[0], b[0]);
        assert_eq!(a[1..], b[1..]);
        let (la, lb) = (location(&p, a[0]), location(&p, b[0]));
        assert_eq!(la.address, 0x5000_1234);
        let lines = |l: &Location| -> Vec<(u64, i64)> {
            l.line.iter().map(|x| (x.function_id, x.line)).collect()
        };
        assert_eq!(lines(la).len(), 2);
        assert_eq!(lines(la)[0].0, lines(lb)[0].0);
        assert_eq!(lines(la)[1].0, lines(lb)[1].0);
        assert_eq!((lines(la)[0].1, lines(la)[1].1), (12, 40));
        assert_eq!(lines(lb)[1].1, 44);
        let inner = function(&p, la.line[0].function_id);
        assert_eq!(text(&p, inner.name), "alloc_buffer");
        assert_eq!(text(&p, inner.system_name), "alloc_buffer");
        assert_eq!(text(&p, inner.filename), "src/buf.rs");
        // `main` in src/main.rs in both processes is one function, at
        // different locations.
        let mains: Vec<&Function> = p
            .function
            .iter()
            .filter(|f| text(&p, f.name) == "main")
            .collect();
        assert_eq!(mains.len(), 1);
        // Recursion from one call site: one location, twice.
        let r = &p.sample[5].location_id;
        assert_eq!(r[0], r[1]);
        assert_eq!(location(&p, r[0]).line.len(), 1);
        // Unique ids, unique (mapping, address) pairs within a process.
        let mut ids: Vec<u64> = p.location.iter().map(|l| l.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), p.location.len());
    }

    #[test]
    fn mappings_carry_build_ids_and_what_is_known() {
        let p = written(View::Leaks);
        let files: Vec<&str> = p.mapping.iter().map(|m| text(&p, m.filename)).collect();
        assert_eq!(
            files,
            [
                "/usr/bin/server",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/opt/plugins/libplugin.so",
                "/usr/bin/client"
            ]
        );
        let server = location(&p, p.sample[0].location_id[0]).mapping_id;
        let m = mapping(&p, server);
        assert_eq!(text(&p, m.build_id), "5e7e7000aabbccdd");
        assert_eq!(
            (m.memory_start, m.memory_limit, m.file_offset),
            (0x5000_0000, 0x5000_2001, 0)
        );
        assert!(m.has_functions && m.has_filenames && m.has_line_numbers && m.has_inline_frames);
        let libc = mapping(&p, 2);
        assert!(libc.has_functions && !libc.has_filenames && !libc.has_line_numbers);
        // A module without symbols: the address and its mapping, no lines,
        // so pprof may symbolize it from the file.
        let plugin = location(&p, p.sample[2].location_id[0]);
        assert!(plugin.line.is_empty());
        let m = mapping(&p, plugin.mapping_id);
        assert_eq!(text(&p, m.filename), "/opt/plugins/libplugin.so");
        assert_eq!((m.build_id, m.memory_start), (0, 0x7f10_0000));
        assert!(!m.has_functions);
        // An address outside every mapping: the address alone.
        let bare = location(&p, p.sample[4].location_id[0]);
        assert_eq!(
            (bare.address, bare.mapping_id, bare.line.len()),
            (0xdead_beef, 0, 0)
        );
    }

    #[test]
    fn same_samples_same_bytes() {
        let run = || {
            let mut out = Vec::new();
            render(&synthetic(), View::Peak, 3.0, &mut out).unwrap();
            out
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn per_address_tells_inlining_from_recursion() {
        let f = |name: &str, address: u64| Frame {
            function: Some(name.to_string()),
            address,
            ..Frame::default()
        };
        let names = |frames: &[Frame]| -> Vec<Vec<String>> {
            per_address(frames)
                .iter()
                .map(|c| c.iter().map(Frame::label).collect())
                .collect()
        };
        // g inlined into f, f recursing from one call site, then main.
        let frames = [f("g", 1), f("f", 1), f("g", 1), f("f", 1), f("main", 2)];
        assert_eq!(
            names(&frames),
            [vec!["g", "f"], vec!["g", "f"], vec!["main"]]
        );
        let frames = [f("g", 1), f("f", 1), f("h", 1)];
        assert_eq!(names(&frames), [vec!["g", "f", "h"]]);
        assert!(per_address(&[]).is_empty());
    }

    /// Checks the file with the real reader. Run with
    /// `cargo test -p memtrace --lib report::pprof -- --ignored --nocapture`;
    /// `MEMTRACE_PPROF_OUT=PATH` keeps the profile at PATH.
    #[test]
    #[ignore = "needs `go` on PATH"]
    fn go_tool_pprof_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::var_os("MEMTRACE_PPROF_OUT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| dir.path().join("leaks.pb.gz"));
        let mut file = std::fs::File::create(&path).unwrap();
        render(&synthetic(), View::Leaks, 1.5, &mut file).unwrap();
        drop(file);
        let out = std::process::Command::new("go")
            .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
            .arg(&path)
            .output()
            .expect("running go tool pprof");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}\n{stderr}");
        assert!(out.status.success(), "{stderr}");
        // Flat inuse_space of the leaves.
        for (bytes, name) in [
            ("4196B", "alloc_buffer (inline)"),
            ("1000B", "[libplugin.so]"),
            // pprof names a location without mapping or lines so; with
            // `-addresses` it shows 00000000deadbeef.
            ("512B", "<unknown>"),
            ("256B", "recurse"),
        ] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(bytes) && l.contains(name)),
                "{name} {bytes} not in\n{stdout}"
            );
        }
    }
}
