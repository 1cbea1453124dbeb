//! Where to probe: the objects each target maps that hold an allocator
//! (glibc, libstdc++, any library or executable whose symbols show one: see
//! `allocators`), and the file offsets of their allocator functions.
//!
//! Libraries are found in the targets' own `/proc/PID/maps` and opened
//! through `/proc/PID/map_files` when the target lives in another mount
//! namespace (or the file was deleted), so a container's libc is probed, not
//! the host's, and no link inside the container can point memtrace elsewhere. Functions are found in
//! the ELF symbol tables and deduplicated by file offset: glibc's `malloc`
//! and `__libc_malloc`, `aligned_alloc` and `memalign` are the same code, and
//! probing an address twice would count every call twice.
//!
//! This module reads files and `/proc`; it does not talk to the kernel's BPF
//! side (see `load`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

pub use crate::allocators::{LIBC, LIBSTDCXX, LOADER_HOOK, Want, display_name};
use crate::error::{Result, UserError};
use crate::maps::{self, Mapping};
use crate::probe_point;

/// Which allocator a library provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LibKind {
    /// The C library (glibc's naming).
    Libc,
    /// The GNU C++ runtime (`operator new`).
    Libstdcxx,
    /// The dynamic loader (`ld-linux-x86-64.so.2`): not an allocator, but
    /// it says when a process has mapped new libraries ([`LOADER_HOOK`]).
    Loader,
    /// Another allocator: a shared library or an executable whose symbols
    /// define one (jemalloc, tcmalloc, mimalloc, a static glibc or musl, a
    /// Rust `#[global_allocator]`, a sanitizer's or an application's own
    /// `malloc`), found by its symbols, not its name (see `allocators`).
    Malloc,
    /// CPython's own allocator (`PyObject_Malloc` and kin) in `libpython`
    /// or a `python` executable: probed with `--python-allocators` only.
    Python,
}

impl LibKind {
    /// The kind of library a file name is, if any.
    pub fn of_file_name(name: &str) -> Option<Self> {
        let name = name.strip_suffix(" (deleted)").unwrap_or(name);
        if name == "libc.so.6" || name == "libc.so" || is_versioned(name, "libc-") {
            Some(Self::Libc)
        } else if name.starts_with("libstdc++.so") {
            Some(Self::Libstdcxx)
        } else if (name.starts_with("ld-linux") && name.contains(".so"))
            || is_versioned(name, "ld-")
        {
            Some(Self::Loader)
        } else {
            None
        }
    }
}

/// `libc-2.31.so` style names.
fn is_versioned(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".so"))
        .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// A library to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    /// What it provides.
    pub kind: LibKind,
    /// Path memtrace opens (and hands the kernel): the mapping's
    /// `/proc/PID/map_files` entry for processes in another mount namespace.
    pub path: PathBuf,
    /// Path as the target sees it.
    pub display: String,
    /// Device and inode, which identify the file across namespaces.
    pub id: (String, u64),
}

/// The allocator libraries among a process's mappings, one per file.
pub fn libraries_in(pid: u32, maps: &[Mapping]) -> Vec<Library> {
    let root_differs = std::fs::read_link(format!("/proc/{pid}/root"))
        .map(|p| p != Path::new("/"))
        .unwrap_or(false);
    let mut out: Vec<Library> = Vec::new();
    for m in maps {
        let name = m.path.rsplit('/').next().unwrap_or(&m.path);
        let id = (m.dev.clone(), m.inode);
        if out.iter().any(|l| l.id == id) {
            continue;
        }
        let kind = match LibKind::of_file_name(name) {
            Some(kind) => kind,
            None if m.exec && holds_allocator(pid, m) => LibKind::Malloc,
            None if m.exec
                && crate::allocators::python_allocators()
                && holds_python_allocator(pid, m) =>
            {
                LibKind::Python
            }
            None => continue,
        };
        // Another root's paths, or a deleted file's, are opened (by memtrace
        // and by the kernel, for the probe) through the mapping itself.
        let path = if root_differs || m.path.ends_with(" (deleted)") {
            crate::mapped::map_files_path(pid, m)
        } else {
            PathBuf::from(&m.path)
        };
        out.push(Library {
            kind,
            path,
            display: m.path.clone(),
            id,
        });
    }
    out
}

/// Whether the object mapped by `m` holds an allocator, by its dynamic and
/// static symbols ([`allocators::found_in`](crate::allocators::found_in)):
/// a library that replaces libc's `malloc` for the whole process (symbol
/// interposition, so libc's functions would see none of its calls), or an
/// executable with an allocator linked in. Remembered per file, as every
/// loader stop asks again.
fn holds_allocator(pid: u32, m: &Mapping) -> bool {
    holds_allocator_at((m.dev.clone(), m.inode), || crate::mapped::open(pid, m))
}

/// [`holds_allocator`] of the file `open` opens, known by `key` (device and
/// inode).
fn holds_allocator_at(
    key: (String, u64),
    open: impl FnOnce() -> std::io::Result<std::fs::File>,
) -> bool {
    static SEEN: Seen = std::sync::Mutex::new(None);
    symbols_show(&SEEN, key, open, |symbols| {
        !crate::allocators::found_in(symbols).1.is_empty()
    })
}

/// Whether the object mapped by `m` holds CPython's allocator.
fn holds_python_allocator(pid: u32, m: &Mapping) -> bool {
    static SEEN: Seen = std::sync::Mutex::new(None);
    symbols_show(
        &SEEN,
        (m.dev.clone(), m.inode),
        || crate::mapped::open(pid, m),
        crate::allocators::defines_python_allocator,
    )
}

/// What files' symbols showed, by device and inode.
type Seen = std::sync::Mutex<Option<HashMap<(String, u64), bool>>>;

/// Whether `test` holds of the symbols of the file `open` opens, known by
/// `key`: remembered in `seen`, as every loader stop asks again.
fn symbols_show(
    seen: &Seen,
    key: (String, u64),
    open: impl FnOnce() -> std::io::Result<std::fs::File>,
    test: impl FnOnce(&HashMap<&str, (u64, u64)>) -> bool,
) -> bool {
    if let Some(known) = seen
        .lock()
        .ok()
        .and_then(|s| s.as_ref().and_then(|s| s.get(&key).copied()))
    {
        return known;
    }
    let found = open().is_ok_and(|file| {
        // Reads the headers and the symbol tables only.
        let cache = object::ReadCache::new(file);
        object::File::parse(&cache).is_ok_and(|elf| test(&symbol_map(&elf)))
    });
    if let Ok(mut s) = seen.lock() {
        s.get_or_insert_with(HashMap::new).insert(key, found);
    }
    found
}

/// Every defined symbol of an object, dynamic ones first, by name: its
/// address and size.
fn symbol_map<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
) -> HashMap<&'d str, (u64, u64)> {
    let mut out = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_definition()
            && sym.address() != 0
            && let Ok(name) = sym.name()
        {
            out.entry(name).or_insert((sym.address(), sym.size()));
        }
    }
    out
}

/// The allocator libraries of a running process.
pub fn libraries_of(pid: u32) -> std::io::Result<Vec<Library>> {
    Ok(libraries_in(pid, &maps::read(pid)?))
}

/// The C library and dynamic loader this process (memtrace) uses, and the
/// host's C++ runtime if installed: what a command started by memtrace will
/// load.
pub fn host_libraries() -> Vec<Library> {
    let mut libs = libraries_of(std::process::id()).unwrap_or_default();
    libs.retain(|l| matches!(l.kind, LibKind::Libc | LibKind::Loader));
    const DIRS: [&str; 6] = [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ];
    if let Some(p) = DIRS
        .iter()
        .map(|d| Path::new(d).join("libstdc++.so.6"))
        .find(|p| p.exists())
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(&p) {
            let display = p.display().to_string();
            libs.push(Library {
                kind: LibKind::Libstdcxx,
                // As `maps` names it, so the library is known when the
                // command's own mappings are read.
                id: (maps::dev_name(meta.dev()), meta.ino()),
                path: p,
                display,
            });
        }
    }
    libs
}

/// The file a program name runs: a path, or a name looked up on PATH.
pub fn program_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// What a program started by memtrace will map that holds an allocator,
/// beside the host's libc: the executable itself (a static binary, a Rust
/// `#[global_allocator]`, a program with a `malloc` of its own) and its
/// interpreter when it is not glibc's (musl's `ld-musl-*.so.1` is its
/// libc). Found before it runs, so their probes are in place at its first
/// instruction.
pub fn program_libraries(program: &str) -> Vec<Library> {
    let Some(path) = program_path(program) else {
        return Vec::new();
    };
    let mut out: Vec<Library> = library_at(&path).into_iter().collect();
    // Headers and one section: not the whole program.
    let interp = std::fs::File::open(&path).ok().and_then(|f| {
        let cache = object::ReadCache::new(f);
        let file = object::File::parse(&cache).ok()?;
        let bytes = file.section_by_name(".interp")?.data().ok()?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Some(PathBuf::from(std::str::from_utf8(&bytes[..end]).ok()?))
    });
    if let Some(lib) = interp.as_deref().and_then(library_at)
        && lib.kind != LibKind::Loader
        && !out.iter().any(|l| l.id == lib.id)
    {
        out.push(lib);
    }
    out
}

/// The file at `path` (links followed, as the kernel maps it) as a library,
/// if it is one memtrace probes.
fn library_at(path: &Path) -> Option<Library> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    // As `maps` names it, so the file is known when the process's own
    // mappings are read.
    let id = (maps::dev_name(meta.dev()), meta.ino());
    let name = real.file_name()?.to_str()?;
    let kind = match LibKind::of_file_name(name) {
        Some(kind) => kind,
        None if holds_allocator_at(id.clone(), || std::fs::File::open(&real)) => LibKind::Malloc,
        None => return None,
    };
    Some(Library {
        kind,
        display: real.display().to_string(),
        path: real,
        id,
    })
}

/// Whether a program (a path, or a name on PATH) names libstdc++ among its
/// needed libraries. A program that loads it later with dlopen is missed;
/// its `new` calls are still seen through `malloc`, with one frame less.
pub fn links_libstdcxx(program: &str) -> bool {
    program_path(program)
        .and_then(|p| std::fs::read(p).ok())
        .is_some_and(|data| needs(&data, b"libstdc++.so"))
}

/// Whether an ELF image's dynamic string table names `lib` (its DT_NEEDED
/// names live there; their bytes are enough of a test).
fn needs(data: &[u8], lib: &[u8]) -> bool {
    let Ok(file) = object::File::parse(data) else {
        return false;
    };
    file.section_by_name(".dynstr")
        .and_then(|s| s.data().ok())
        .is_some_and(|d| d.windows(lib.len()).any(|w| w == lib))
}

/// What kind of program a binary is, as far as probing its allocator goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// Linked against a shared libc: its malloc can be probed.
    SharedLibc,
    /// A Go program without cgo: Go's own heap, and no C library at all.
    Go,
    /// Statically linked (or against another C library): no libc.so.6.
    NoSharedLibc,
    /// Not an ELF file memtrace can read.
    Unknown,
}

/// The kind of the ELF binary at `path`.
pub fn program_kind(path: &Path) -> ProgramKind {
    let Ok(data) = std::fs::read(path) else {
        return ProgramKind::Unknown;
    };
    let Ok(file) = object::File::parse(&*data) else {
        return ProgramKind::Unknown;
    };
    if needs(&data, b"libc.so.6") {
        ProgramKind::SharedLibc
    } else if file.section_by_name(".go.buildinfo").is_some() {
        ProgramKind::Go
    } else {
        ProgramKind::NoSharedLibc
    }
}

/// The kind of a program named on the command line (a path, or on PATH).
pub fn command_kind(program: &str) -> ProgramKind {
    program_path(program).map_or(ProgramKind::Unknown, |p| program_kind(&p))
}

/// A function found, at its file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// What to probe.
    pub want: Want,
    /// Offset of the function's entry in the file.
    pub offset: u64,
    /// Offset in the file of the instruction probed: the entry, or a
    /// little past it where the kernel emulates the instruction (see
    /// [`probe_point`]).
    pub probe: u64,
    /// Other wanted names at the same offset (probed once, under `want`).
    pub aliases: Vec<String>,
}

/// What an object offers to probe: its allocators' names and its sites.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The allocators found, as reports name them ("glibc", "jemalloc",
    /// "Rust #[global_allocator]", ...).
    pub allocators: Vec<&'static str>,
    /// One per file offset.
    pub sites: Vec<Site>,
    /// Optional functions the object lacks.
    pub missing: Vec<String>,
}

/// The functions of `wants` found in the ELF file `data`, one per offset,
/// and the names not found.
pub fn find_sites(
    data: &[u8],
    wants: &[Want],
) -> std::result::Result<(Vec<Site>, Vec<String>), object::Error> {
    let file = object::File::parse(data)?;
    Ok(sites_in(&file, data, wants))
}

fn sites_in<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: &[u8],
    wants: &[Want],
) -> (Vec<Site>, Vec<String>) {
    let addr_of = symbol_map(file);
    let to_offset = |vaddr: u64| file_offset(file, vaddr);
    let mut sites: Vec<Site> = Vec::new();
    let mut missing = Vec::new();
    for w in wants {
        let Some((offset, size)) = addr_of
            .get(&*w.symbol)
            .and_then(|&(a, size)| Some((to_offset(a)?, size)))
        else {
            missing.push(w.symbol.to_string());
            continue;
        };
        match sites.iter_mut().find(|s| s.offset == offset) {
            Some(s) => s.aliases.push(w.symbol.to_string()),
            None => {
                // Unknown sizes (0) are read as "at least what is decoded".
                let end = match size {
                    0 => data.len(),
                    n => (offset + n) as usize,
                };
                let code = data
                    .get(offset as usize..end.min(data.len()))
                    .unwrap_or(&[]);
                sites.push(Site {
                    want: w.clone(),
                    offset,
                    probe: offset + probe_point::probe_offset(code),
                    aliases: Vec::new(),
                })
            }
        }
    }
    (sites, missing)
}

/// The offset in the file of virtual address `vaddr`, if a loaded segment
/// holds it in the file.
pub(crate) fn file_offset<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    vaddr: u64,
) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (file_off, file_len) = seg.file_range();
        let start = seg.address();
        (vaddr >= start && vaddr < start + file_len).then(|| vaddr - start + file_off)
    })
}

/// What to probe in a library; fails when a required function is missing.
pub fn sites_of(lib: &Library, user: Option<u32>) -> Result<Found> {
    let data = std::fs::read(&lib.path).map_err(|e| {
        UserError::new(
            format!("cannot read {}: {e}", lib.display),
            "memtrace reads the allocator library to find its functions; check the file exists and is readable",
        )
    })?;
    let not_elf = |e: object::Error| {
        UserError::new(
            format!("{} is not an ELF file memtrace can read: {e}", lib.display),
            "is the library corrupt, or for another architecture?",
        )
    };
    let file = object::File::parse(&*data).map_err(not_elf)?;
    let (allocators, wants): (Vec<&'static str>, Vec<Want>) = match lib.kind {
        LibKind::Libc => (vec![libc_name(&lib.display)], LIBC.to_vec()),
        LibKind::Libstdcxx => (vec!["libstdc++ (operator new)"], LIBSTDCXX.to_vec()),
        LibKind::Loader => (Vec::new(), vec![LOADER_HOOK]),
        LibKind::Malloc => crate::allocators::found_in(&symbol_map(&file)),
        LibKind::Python => (
            vec![crate::allocators::PYTHON_NAME],
            crate::allocators::PYTHON.to_vec(),
        ),
    };
    let (sites, mut missing) = sites_in(&file, &data, &wants);
    let by = user
        .map(|p| format!(" (mapped by PID {p})"))
        .unwrap_or_default();
    if let Some(w) = wants
        .iter()
        .find(|w| w.required && missing.iter().any(|m| *m == w.symbol))
    {
        return Err(UserError::new(
            format!("symbol '{}' not found in {}{by}", w.symbol, lib.display),
            "memtrace probes the allocator functions a library or program defines; is it stripped of its symbols?",
        ));
    }
    if sites.is_empty() {
        return Err(UserError::new(
            format!("no allocator functions found in {}{by}", lib.display),
            "memtrace probes the allocator functions a library or program defines; is it stripped of its symbols?",
        ));
    }
    if lib.kind == LibKind::Malloc {
        // Only the C names are worth naming as missing: a C program has no
        // reason to define the C++ operators, glibc no reason to define
        // jemalloc's `mallocx`, and a static link keeps only the prefixed
        // functions the program calls.
        missing.retain(|m| LIBC.iter().any(|c| c.symbol == *m));
    }
    Ok(Found {
        allocators,
        sites,
        missing,
    })
}

/// How reports name a C library: musl's file is `libc.so`, glibc's
/// `libc.so.6`.
fn libc_name(path: &str) -> &'static str {
    if path.contains("musl") {
        "musl"
    } else {
        "glibc"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_allocator_libraries_by_name() {
        assert_eq!(LibKind::of_file_name("libc.so.6"), Some(LibKind::Libc));
        assert_eq!(LibKind::of_file_name("libc-2.31.so"), Some(LibKind::Libc));
        assert_eq!(
            LibKind::of_file_name("libc.so.6 (deleted)"),
            Some(LibKind::Libc)
        );
        assert_eq!(
            LibKind::of_file_name("libstdc++.so.6.0.30"),
            Some(LibKind::Libstdcxx)
        );
        assert_eq!(
            LibKind::of_file_name("ld-linux-x86-64.so.2"),
            Some(LibKind::Loader)
        );
        assert_eq!(LibKind::of_file_name("ld-2.31.so"), Some(LibKind::Loader));
        assert_eq!(LibKind::of_file_name("ldap.so"), None);
        assert_eq!(LibKind::of_file_name("libcrypt.so.1"), None);
        assert_eq!(LibKind::of_file_name("libc-client.so"), None);
    }

    fn self_libc() -> Library {
        host_libraries()
            .into_iter()
            .find(|l| l.kind == LibKind::Libc)
            .expect("the test process maps a libc")
    }

    #[test]
    fn finds_libc_functions_and_merges_aliases() {
        let lib = self_libc();
        let found = sites_of(&lib, None).unwrap();
        assert_eq!(found.allocators, ["glibc"]);
        let sites = &found.sites;
        assert!(sites.iter().any(|s| s.want.symbol == "malloc"));
        assert!(sites.iter().any(|s| s.want.symbol == "free"));
        // glibc: aligned_alloc and memalign are one function.
        if let Some(s) = sites.iter().find(|s| s.want.symbol == "aligned_alloc") {
            assert!(
                s.aliases.iter().any(|a| a == "memalign")
                    || sites.iter().any(|o| o.want.symbol == "memalign"),
            );
        }
        let mut offsets: Vec<u64> = sites.iter().map(|s| s.offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), sites.len(), "one site per offset");
        assert!(found.missing.iter().all(|m| m != "malloc" && m != "free"));
    }

    #[test]
    fn an_allocator_is_known_by_its_symbols() {
        let pid = std::process::id();
        let maps = maps::read(pid).unwrap();
        let exec_of = |suffix: &str| {
            maps.iter()
                .find(|m| m.exec && m.path.ends_with(suffix))
                .unwrap_or_else(|| panic!("no executable mapping of *{suffix}"))
        };
        // libc defines both; the loader does not.
        assert!(holds_allocator(pid, exec_of("/libc.so.6")));
        assert!(!holds_allocator(pid, exec_of("ld-linux-x86-64.so.2")));
    }

    #[test]
    fn a_library_without_malloc_is_refused_by_name() {
        let exe = std::env::current_exe().unwrap();
        let lib = Library {
            kind: LibKind::Libc,
            display: exe.display().to_string(),
            path: exe,
            id: (String::new(), 0),
        };
        let err = sites_of(&lib, Some(77)).unwrap_err();
        assert!(err.message.starts_with("symbol '"), "{}", err.message);
        assert!(
            err.message.contains("(mapped by PID 77)"),
            "{}",
            err.message
        );
    }
}
