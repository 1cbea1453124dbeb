//! Finding a CPython interpreter in a process: the object (the `python3`
//! executable or `libpython3.X.so`) that defines `_PyRuntime`, its version
//! (`Py_Version`, or the file's name before 3.11), where it is loaded, and
//! the address range of its evaluation loop (`_PyEval_EvalFrameDefault`),
//! whose native frames the Python frames replace.
//!
//! Reads `/proc/PID/maps` and the mapped files (through the mapping, so an
//! interpreter in a container is read from the container's file); the
//! symbol facts of each file are remembered by device and inode.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use object::{Object, ObjectSegment, ObjectSymbol};

use super::layout::{self, Layout};
use crate::maps::{self, Mapping};

/// What one file says of the interpreter it holds (addresses are the
/// file's own virtual addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    runtime: u64,
    eval: Option<(u64, u64)>,
    /// (major, minor, micro), when known.
    version: Option<(u8, u8, u8)>,
    /// Loaded segments: (file offset, file size, virtual address).
    segments: Vec<(u64, u64, u64)>,
}

/// A CPython interpreter in a process.
#[derive(Clone, Debug, PartialEq)]
pub struct Interpreter {
    /// Path of the object that holds it, as the process sees it.
    pub module: String,
    /// (major, minor, micro).
    pub version: (u8, u8, u8),
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Where `_PyEval_EvalFrameDefault` runs in the process.
    pub eval: Vec<Range<u64>>,
    /// Its version's layout; `None` when memtrace has none.
    pub layout: Option<&'static Layout>,
}

impl Interpreter {
    /// "CPython 3.11.7".
    pub fn name(&self) -> String {
        let (a, b, c) = self.version;
        format!("CPython {a}.{b}.{c}")
    }
}

/// The interpreter process `pid` runs, if it maps one. An error only when
/// its mappings cannot be read.
pub fn find(pid: u32) -> std::io::Result<Option<Interpreter>> {
    let maps = maps::read(pid)?;
    Ok(find_in(pid, &maps))
}

fn find_in(pid: u32, maps: &[Mapping]) -> Option<Interpreter> {
    let mut seen: Vec<(String, u64)> = Vec::new();
    for m in maps.iter().filter(|m| m.exec) {
        let key = (m.dev.clone(), m.inode);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let Some(facts) = facts_of(key, || crate::mapped::open(pid, m)) else {
            continue;
        };
        let bias = crate::unwind::load_bias(&facts.segments, m.start, m.offset)?;
        let version = facts
            .version
            .or_else(|| version_of_name(&m.path))
            .unwrap_or((0, 0, 0));
        let eval = facts
            .eval
            .map(|(a, size)| a.wrapping_add(bias)..a.wrapping_add(bias) + size.max(1))
            .into_iter()
            .collect();
        return Some(Interpreter {
            module: m.path.clone(),
            version,
            runtime: facts.runtime.wrapping_add(bias),
            eval,
            layout: layout::for_version(version.0, version.1),
        });
    }
    None
}

/// The facts of a file, remembered by `key` (device and inode); `None` for
/// a file that holds no interpreter.
fn facts_of(
    key: (String, u64),
    open: impl FnOnce() -> std::io::Result<std::fs::File>,
) -> Option<Facts> {
    /// Files already read, by device and inode.
    type Seen = HashMap<(String, u64), Option<Facts>>;
    static SEEN: Mutex<Option<Seen>> = Mutex::new(None);
    if let Some(known) = SEEN
        .lock()
        .ok()
        .and_then(|s| s.as_ref().and_then(|s| s.get(&key).cloned()))
    {
        return known;
    }
    let facts = open().ok().and_then(|file| read_facts(&file));
    if let Ok(mut s) = SEEN.lock() {
        s.get_or_insert_with(HashMap::new)
            .insert(key, facts.clone());
    }
    facts
}

fn read_facts(file: &std::fs::File) -> Option<Facts> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let mut runtime = None;
    let mut eval = None;
    let mut version_at = None;
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if !sym.is_definition() {
            continue;
        }
        match sym.name() {
            Ok("_PyRuntime") => runtime = runtime.or(Some(sym.address())),
            Ok("_PyEval_EvalFrameDefault") => {
                eval = eval.or(Some((sym.address(), sym.size())));
            }
            Ok("Py_Version") => version_at = version_at.or(Some(sym.address())),
            _ => {}
        }
    }
    let runtime = runtime?;
    let segments: Vec<(u64, u64, u64)> = elf
        .segments()
        .map(|s| {
            let (off, len) = s.file_range();
            (off, len, s.address())
        })
        .collect();
    // `Py_Version` (3.11+) is a constant `PY_VERSION_HEX`: 0x030b07f0 is
    // 3.11.7 final.
    let version = version_at
        .and_then(|a| crate::attach::file_offset(&elf, a))
        .and_then(|off| {
            let mut b = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut b, off).ok()?;
            let hex = u32::from_le_bytes(b);
            Some(((hex >> 24) as u8, (hex >> 16) as u8, (hex >> 8) as u8))
        });
    Some(Facts {
        runtime,
        eval,
        version,
        segments,
    })
}

/// The version in a file's name: `libpython3.10.so.1.0`, `python3.9`.
fn version_of_name(path: &str) -> Option<(u8, u8, u8)> {
    let name = path.rsplit('/').next()?;
    let rest = name.strip_prefix("lib").unwrap_or(name);
    let rest = rest.strip_prefix("python")?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        assert_eq!(
            version_of_name("/usr/lib/libpython3.10.so.1.0"),
            Some((3, 10, 0))
        );
        assert_eq!(version_of_name("/usr/bin/python3.9"), Some((3, 9, 0)));
        assert_eq!(version_of_name("/usr/bin/python3"), None);
        assert_eq!(version_of_name("/usr/lib/libc.so.6"), None);
    }

    #[test]
    fn memtrace_itself_is_no_interpreter() {
        let maps = maps::read(std::process::id()).unwrap();
        assert!(find_in(std::process::id(), &maps).is_none());
    }
}
