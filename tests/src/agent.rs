//! Helpers for the `memtrace agent` tests: a free loopback port, a plain
//! HTTP GET, a one-shot HTTP endpoint that keeps what was pushed to it, and
//! a decoder of pprof profiles (the few `perftools.profiles` fields the
//! tests look at, declared here from the public schema).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use prost::Message;

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
    l.local_addr().expect("bound address").port()
}

/// `GET path` from `addr`: the status code and body, or the error.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// One request an [`Endpoint`] received.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Method, path and query, as in the request line.
    pub target: String,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Pushed {
    /// The contents of the multipart field `name`.
    pub fn part(&self, name: &str) -> Option<Vec<u8>> {
        let boundary = self
            .content_type
            .split("boundary=")
            .nth(1)?
            .trim_matches('"');
        let delimiter = format!("--{boundary}");
        let body = &self.body;
        let mut starts = Vec::new();
        let d = delimiter.as_bytes();
        let mut i = 0;
        while i + d.len() <= body.len() {
            if &body[i..i + d.len()] == d {
                starts.push(i);
                i += d.len();
            } else {
                i += 1;
            }
        }
        for w in starts.windows(2) {
            let part = &body[w[0] + d.len()..w[1]];
            let split = part.windows(4).position(|x| x == b"\r\n\r\n")?;
            let headers = String::from_utf8_lossy(&part[..split]);
            if headers.contains(&format!("name=\"{name}\"")) {
                let content = &part[split + 4..];
                // The part ends with CRLF before the next delimiter.
                let content = content.strip_suffix(b"\r\n").unwrap_or(content);
                return Some(content.to_vec());
            }
        }
        None
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, key: &str) -> Option<String> {
        let path = self.target.split_whitespace().nth(1)?;
        let query = path.split_once('?')?.1;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| percent_decode(v))
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP endpoint on loopback that answers 200 to every request and
/// hands each one to the test.
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    rx: mpsc::Receiver<Pushed>,
}

impl Endpoint {
    /// Starts listening.
    pub fn start() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(req) = read_request(stream) {
                    let _ = tx.send(req);
                }
            }
        });
        Endpoint { addr, rx }
    }

    /// The next request, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Pushed> {
        self.rx.recv_timeout(timeout).ok()
    }
}

fn read_request(mut stream: TcpStream) -> Option<Pushed> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut target = String::new();
    reader.read_line(&mut target).ok()?;
    let (mut length, mut chunked, mut content_type) = (0usize, false, String::new());
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "content-type" => content_type = v.trim().to_string(),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body).ok()?;
    }
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    Some(Pushed {
        target: target.trim_end().to_string(),
        content_type,
        body,
    })
}

/// One sample of a decoded profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSample {
    /// Function names, innermost first (a location's inlined functions
    /// innermost first too).
    pub functions: Vec<String>,
    /// Values in the order of the profile's sample types.
    pub values: Vec<i64>,
    /// String labels (and numeric ones, as decimal strings).
    pub labels: Vec<(String, String)>,
}

/// A decoded profile.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedProfile {
    /// Sample type names.
    pub sample_types: Vec<String>,
    /// The period.
    pub period: i64,
    /// Every sample.
    pub samples: Vec<ProfileSample>,
}

impl DecodedProfile {
    /// The index of sample type `name`.
    pub fn index(&self, name: &str) -> usize {
        self.sample_types
            .iter()
            .position(|t| t == name)
            .unwrap_or_else(|| panic!("no sample type {name} in {:?}", self.sample_types))
    }

    /// Value `name` summed over the samples whose stack holds `function`.
    pub fn sum_through(&self, function: &str, name: &str) -> i64 {
        let i = self.index(name);
        self.samples
            .iter()
            .filter(|s| s.functions.iter().any(|f| f == function))
            .map(|s| s.values[i])
            .sum()
    }

    /// Value `name` summed over the samples whose innermost function is
    /// `function`.
    pub fn sum_for(&self, function: &str, name: &str) -> i64 {
        let i = self.index(name);
        self.samples
            .iter()
            .filter(|s| s.functions.first().is_some_and(|f| f == function))
            .map(|s| s.values[i])
            .sum()
    }
}

/// Decodes a gzipped pprof profile.
pub fn decode_profile(gz: &[u8]) -> DecodedProfile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("the profile is not gzip");
    let p = Profile::decode(raw.as_slice()).expect("the profile does not decode as pprof");
    let s = |i: i64| p.string_table.get(i as usize).cloned().unwrap_or_default();
    let function = |id: u64| {
        p.function
            .iter()
            .find(|f| f.id == id)
            .map(|f| s(f.name))
            .unwrap_or_default()
    };
    let samples = p
        .sample
        .iter()
        .map(|smp| ProfileSample {
            functions: smp
                .location_id
                .iter()
                .filter_map(|id| p.location.iter().find(|l| l.id == *id))
                .flat_map(|l| l.line.iter().map(|line| function(line.function_id)))
                .collect(),
            values: smp.value.clone(),
            labels: smp
                .label
                .iter()
                .map(|l| {
                    let v = if l.str != 0 {
                        s(l.str)
                    } else {
                        l.num.to_string()
                    };
                    (s(l.key), v)
                })
                .collect(),
        })
        .collect();
    DecodedProfile {
        sample_types: p.sample_type.iter().map(|t| s(t.r#type)).collect(),
        period: p.period,
        samples,
    }
}

#[derive(Clone, PartialEq, Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "12")]
    period: i64,
}

#[derive(Clone, PartialEq, Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
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
}

#[derive(Clone, PartialEq, Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
}

#[derive(Clone, PartialEq, Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
}
