//! Where to probe: the allocator libraries each target maps, and the file
//! offsets of their allocator functions.
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

use memtrace_common::AllocFn;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

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
    /// Another `malloc`: a shared library that defines `malloc` and `free`
    /// itself (jemalloc, tcmalloc, mimalloc, a sanitizer's or an
    /// application's own), found by its symbols, not its name.
    Malloc,
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
            None if m.exec && name.contains(".so") && defines_malloc(pid, m) => LibKind::Malloc,
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

/// Whether the shared object mapped by `m` defines `malloc` and `free` in its
/// dynamic symbols: an allocator that replaces libc's for the whole process
/// (symbol interposition), so libc's functions would see none of its calls.
/// Remembered per file, as every loader stop asks again.
fn defines_malloc(pid: u32, m: &Mapping) -> bool {
    static SEEN: std::sync::Mutex<Option<HashMap<(String, u64), bool>>> =
        std::sync::Mutex::new(None);
    let key = (m.dev.clone(), m.inode);
    if let Some(known) = SEEN
        .lock()
        .ok()
        .and_then(|s| s.as_ref().and_then(|s| s.get(&key).copied()))
    {
        return known;
    }
    let found = crate::mapped::open(pid, m).is_ok_and(|file| {
        // Reads the headers and the dynamic symbols only.
        let cache = object::ReadCache::new(file);
        object::File::parse(&cache).is_ok_and(|elf| {
            let defined = |name: &str| {
                elf.dynamic_symbols()
                    .any(|s| s.is_definition() && s.name() == Ok(name))
            };
            defined("malloc") && defined("free")
        })
    });
    if let Ok(mut s) = SEEN.lock() {
        s.get_or_insert_with(HashMap::new).insert(key, found);
    }
    found
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
fn program_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
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

/// One allocator function to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// Symbol name.
    pub symbol: &'static str,
    /// What it is. `None` for `free`.
    pub func: Option<AllocFn>,
    /// Whether tracing is pointless without it.
    pub required: bool,
}

const fn want(symbol: &'static str, func: Option<AllocFn>, required: bool) -> Want {
    Want {
        symbol,
        func,
        required,
    }
}

/// What memtrace probes in a C library. `reallocarray` (glibc 2.26),
/// `aligned_alloc` (C11) and the obsolete `valloc`, `pvalloc`, `memalign`
/// are missing from some C libraries, so they are optional.
pub const LIBC: &[Want] = &[
    want("malloc", Some(AllocFn::Malloc), true),
    want("calloc", Some(AllocFn::Calloc), true),
    want("realloc", Some(AllocFn::Realloc), true),
    want("free", None, true),
    want("reallocarray", Some(AllocFn::Reallocarray), false),
    want("posix_memalign", Some(AllocFn::PosixMemalign), false),
    want("aligned_alloc", Some(AllocFn::AlignedAlloc), false),
    want("memalign", Some(AllocFn::Memalign), false),
    want("valloc", Some(AllocFn::Valloc), false),
    want("pvalloc", Some(AllocFn::Pvalloc), false),
];

/// `operator new` and `new[]`, plain, nothrow, aligned and aligned nothrow.
/// Probed because libstdc++ has no frame pointers: from inside its `new`, a
/// frame-pointer walk skips the function that called `new`. `malloc` calls
/// nested in them emit nothing, so nothing counts twice.
pub const LIBSTDCXX: &[Want] = &[
    want("_Znwm", Some(AllocFn::OperatorNew), false),
    want("_Znam", Some(AllocFn::OperatorNew), false),
    want("_ZnwmRKSt9nothrow_t", Some(AllocFn::OperatorNew), false),
    want("_ZnamRKSt9nothrow_t", Some(AllocFn::OperatorNew), false),
    want("_ZnwmSt11align_val_t", Some(AllocFn::OperatorNew), false),
    want("_ZnamSt11align_val_t", Some(AllocFn::OperatorNew), false),
    want(
        "_ZnwmSt11align_val_tRKSt9nothrow_t",
        Some(AllocFn::OperatorNew),
        false,
    ),
    want(
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        Some(AllocFn::OperatorNew),
        false,
    ),
];

/// glibc's dynamic loader calls this empty function (the `r_brk` of
/// `r_debug`, the debuggers' hook) before and after it maps libraries: at
/// start-up and at each `dlopen`. Not an allocator function (`func` is
/// unused), but probed so memtrace can probe a new allocator library before
/// any of its code runs.
pub const LOADER_HOOK: Want = want("_dl_debug_state", None, true);

/// `operator delete` variants and jemalloc's `dallocx`/`sdallocx`, probed in
/// another `malloc` ([`LibKind::Malloc`]) where they are code of their own.
pub const DELETES: &[Want] = &[
    want("_ZdlPv", Some(AllocFn::Delete), false),
    want("_ZdaPv", Some(AllocFn::Delete), false),
    want("_ZdlPvm", Some(AllocFn::Delete), false),
    want("_ZdaPvm", Some(AllocFn::Delete), false),
    want("_ZdlPvRKSt9nothrow_t", Some(AllocFn::Delete), false),
    want("_ZdaPvRKSt9nothrow_t", Some(AllocFn::Delete), false),
    want("_ZdlPvSt11align_val_t", Some(AllocFn::Delete), false),
    want("_ZdaPvSt11align_val_t", Some(AllocFn::Delete), false),
    want("_ZdlPvmSt11align_val_t", Some(AllocFn::Delete), false),
    want("_ZdaPvmSt11align_val_t", Some(AllocFn::Delete), false),
    want(
        "_ZdlPvSt11align_val_tRKSt9nothrow_t",
        Some(AllocFn::Delete),
        false,
    ),
    want(
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
        Some(AllocFn::Delete),
        false,
    ),
    want("dallocx", Some(AllocFn::Delete), false),
    want("sdallocx", Some(AllocFn::Delete), false),
];

/// What memtrace probes in another `malloc` ([`LibKind::Malloc`]): the C
/// functions, and its C++ operators, which in jemalloc, tcmalloc and mimalloc
/// are code of their own, not calls to their `malloc` (an operator that is
/// `free`'s own address is probed once, as `free`). Deletes are probed at
/// entry and return, so a `free` they call counts once. Only `malloc` and
/// `free` are required: they are what made the library one.
pub fn malloc_lib_wants() -> Vec<Want> {
    LIBC.iter()
        .chain(LIBSTDCXX)
        .chain(DELETES)
        .map(|w| Want {
            required: matches!(w.symbol, "malloc" | "free"),
            ..*w
        })
        .collect()
}

/// How reports name a probed symbol: C names as they are, `operator new`
/// variants in C++ terms.
pub fn display_name(symbol: &str) -> &str {
    match symbol {
        "_Znwm" => "new",
        "_Znam" => "new[]",
        "_ZnwmRKSt9nothrow_t" => "new(nothrow)",
        "_ZnamRKSt9nothrow_t" => "new[](nothrow)",
        "_ZnwmSt11align_val_t" => "new(align)",
        "_ZnamSt11align_val_t" => "new[](align)",
        "_ZnwmSt11align_val_tRKSt9nothrow_t" => "new(align,nothrow)",
        "_ZnamSt11align_val_tRKSt9nothrow_t" => "new[](align,nothrow)",
        "_ZdlPv" => "delete",
        "_ZdaPv" => "delete[]",
        "_ZdlPvm" => "delete(sized)",
        "_ZdaPvm" => "delete[](sized)",
        "_ZdlPvRKSt9nothrow_t" => "delete(nothrow)",
        "_ZdaPvRKSt9nothrow_t" => "delete[](nothrow)",
        "_ZdlPvSt11align_val_t" => "delete(align)",
        "_ZdaPvSt11align_val_t" => "delete[](align)",
        "_ZdlPvmSt11align_val_t" => "delete(sized,align)",
        "_ZdaPvmSt11align_val_t" => "delete[](sized,align)",
        "_ZdlPvSt11align_val_tRKSt9nothrow_t" => "delete(align,nothrow)",
        "_ZdaPvSt11align_val_tRKSt9nothrow_t" => "delete[](align,nothrow)",
        other => other,
    }
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
    pub aliases: Vec<&'static str>,
}

/// The functions of `wants` found in the ELF file `data`, one per offset,
/// and the names not found.
pub fn find_sites(
    data: &[u8],
    wants: &[Want],
) -> std::result::Result<(Vec<Site>, Vec<&'static str>), object::Error> {
    let file = object::File::parse(data)?;
    let mut addr_of: HashMap<&str, (u64, u64)> = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_definition()
            && sym.address() != 0
            && let Ok(name) = sym.name()
        {
            addr_of.entry(name).or_insert((sym.address(), sym.size()));
        }
    }
    let to_offset = |vaddr: u64| {
        file.segments().find_map(|seg| {
            let (file_off, file_len) = seg.file_range();
            let start = seg.address();
            (vaddr >= start && vaddr < start + file_len).then(|| vaddr - start + file_off)
        })
    };
    let mut sites: Vec<Site> = Vec::new();
    let mut missing = Vec::new();
    for w in wants {
        let Some((offset, size)) = addr_of
            .get(w.symbol)
            .and_then(|&(a, size)| Some((to_offset(a)?, size)))
        else {
            missing.push(w.symbol);
            continue;
        };
        match sites.iter_mut().find(|s| s.offset == offset) {
            Some(s) => s.aliases.push(w.symbol),
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
                    want: *w,
                    offset,
                    probe: offset + probe_point::probe_offset(code),
                    aliases: Vec::new(),
                })
            }
        }
    }
    Ok((sites, missing))
}

/// Sites to probe in a library; fails when a required function is missing.
pub fn sites_of(lib: &Library, user: Option<u32>) -> Result<(Vec<Site>, Vec<&'static str>)> {
    let data = std::fs::read(&lib.path).map_err(|e| {
        UserError::new(
            format!("cannot read {}: {e}", lib.display),
            "memtrace reads the allocator library to find its functions; check the file exists and is readable",
        )
    })?;
    let wants: Vec<Want> = match lib.kind {
        LibKind::Libc => LIBC.to_vec(),
        LibKind::Libstdcxx => LIBSTDCXX.to_vec(),
        LibKind::Loader => vec![LOADER_HOOK],
        LibKind::Malloc => malloc_lib_wants(),
    };
    let (sites, missing) = find_sites(&data, &wants).map_err(|e| {
        UserError::new(
            format!("{} is not an ELF file memtrace can read: {e}", lib.display),
            "is the library corrupt, or for another architecture?",
        )
    })?;
    if let Some(w) = wants
        .iter()
        .find(|w| w.required && missing.contains(&w.symbol))
    {
        let by = user
            .map(|p| format!(" (mapped by PID {p})"))
            .unwrap_or_default();
        return Err(UserError::new(
            format!("symbol '{}' not found in {}{by}", w.symbol, lib.display),
            "memtrace traces glibc's allocator; a static binary or a custom allocator is not supported yet",
        ));
    }
    Ok((sites, missing))
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
        let (sites, missing) = sites_of(&lib, None).unwrap();
        assert!(sites.iter().any(|s| s.want.symbol == "malloc"));
        assert!(sites.iter().any(|s| s.want.symbol == "free"));
        // glibc: aligned_alloc and memalign are one function.
        if let Some(s) = sites.iter().find(|s| s.want.symbol == "aligned_alloc") {
            assert!(
                s.aliases.contains(&"memalign")
                    || sites.iter().any(|o| o.want.symbol == "memalign"),
            );
        }
        let mut offsets: Vec<u64> = sites.iter().map(|s| s.offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), sites.len(), "one site per offset");
        assert!(missing.iter().all(|m| !["malloc", "free"].contains(m)));
    }

    #[test]
    fn another_malloc_needs_only_malloc_and_free() {
        let wants = malloc_lib_wants();
        let required: Vec<&str> = wants
            .iter()
            .filter(|w| w.required)
            .map(|w| w.symbol)
            .collect();
        assert_eq!(required, ["malloc", "free"]);
        assert!(wants.iter().any(|w| w.symbol == "_Znwm"));
        assert!(
            wants
                .iter()
                .filter(|w| w.func == Some(AllocFn::Delete))
                .count()
                == DELETES.len()
        );
        let mut names: Vec<&str> = wants.iter().map(|w| w.symbol).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), wants.len(), "each symbol once");
    }

    #[test]
    fn another_malloc_is_known_by_its_symbols() {
        let pid = std::process::id();
        let maps = maps::read(pid).unwrap();
        let exec_of = |suffix: &str| {
            maps.iter()
                .find(|m| m.exec && m.path.ends_with(suffix))
                .unwrap_or_else(|| panic!("no executable mapping of *{suffix}"))
        };
        // libc defines both; the loader and the test binary do not.
        assert!(defines_malloc(pid, exec_of("/libc.so.6")));
        assert!(!defines_malloc(pid, exec_of("ld-linux-x86-64.so.2")));
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        assert!(!defines_malloc(pid, exec_of(exe)));
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
