//! What memtrace probes in each kind of allocator: the functions of glibc,
//! libstdc++ and the dynamic loader, and the interfaces by which any other
//! object (a shared library or the executable itself) is known to contain an
//! allocator: plain `malloc`/`free` (jemalloc, tcmalloc, mimalloc preloaded or
//! linked, a static glibc or musl, an application's own), jemalloc's `je_`
//! and Rust tikv-jemallocator's `_rjem_` prefixes, tcmalloc's `tc_`,
//! mimalloc's `mi_`, and Rust's global-allocator shims.
//!
//! Pure tables and a function of a symbol table; finding files and offsets is
//! `attach`'s job.

use std::borrow::Cow;
use std::collections::HashMap;

use memtrace_common::AllocFn;

/// One allocator function to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// Symbol name, as the object defines it.
    pub symbol: Cow<'static, str>,
    /// What it is. `None` for `free`.
    pub func: Option<AllocFn>,
    /// Whether tracing is pointless without it.
    pub required: bool,
}

const fn want(symbol: &'static str, func: Option<AllocFn>, required: bool) -> Want {
    Want {
        symbol: Cow::Borrowed(symbol),
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

/// `operator delete` variants, probed in another `malloc` where they are
/// code of their own (jemalloc, tcmalloc and mimalloc).
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
];

/// jemalloc's own interface, beside the C one: `mallocx(size, flags)` and
/// `rallocx(ptr, size, flags)` take their size where `malloc` and `realloc`
/// do; `dallocx(ptr, flags)` and `sdallocx(ptr, size, flags)` free. Not
/// `xallocx`, which resizes in place and returns the usable size, not what
/// was asked for.
const JEMALLOC_X: &[Want] = &[
    want("mallocx", Some(AllocFn::Malloc), false),
    want("rallocx", Some(AllocFn::Realloc), false),
    want("dallocx", Some(AllocFn::Delete), false),
    want("sdallocx", Some(AllocFn::Delete), false),
];

/// mimalloc's own interface where it is not the C one under another name:
/// zeroing and aligned variants (size first), `mi_mallocn(count, size)`.
const MIMALLOC_X: &[Want] = &[
    want("zalloc", Some(AllocFn::Malloc), false),
    want("malloc_aligned", Some(AllocFn::Malloc), false),
    want("zalloc_aligned", Some(AllocFn::Malloc), false),
    want("realloc_aligned", Some(AllocFn::Realloc), false),
    want("mallocn", Some(AllocFn::Calloc), false),
];

/// An allocator interface: names under a prefix, present when the object
/// defines a prefixed `malloc` (or `mallocx`) and `free` (or `dallocx`,
/// `sdallocx`).
struct Family {
    /// How reports name the allocator.
    name: &'static str,
    prefix: &'static str,
    /// Beside the C functions.
    extra: &'static [Want],
}

/// CPython's allocator: `PyObject_*` (objects) and `PyMem_*` (their
/// buffers), both served by pymalloc from its arenas for blocks of up to
/// 512 bytes, by `malloc` beyond (nested, so not counted twice). The frees
/// are probed at entry and return, like `operator delete`, so the `free`
/// of a large block counts once.
pub const PYTHON: &[Want] = &[
    want("PyObject_Malloc", Some(AllocFn::PyMalloc), true),
    want("PyObject_Calloc", Some(AllocFn::PyCalloc), false),
    want("PyObject_Realloc", Some(AllocFn::PyRealloc), false),
    want("PyObject_Free", Some(AllocFn::Delete), true),
    want("PyMem_Malloc", Some(AllocFn::PyMalloc), false),
    want("PyMem_Calloc", Some(AllocFn::PyCalloc), false),
    want("PyMem_Realloc", Some(AllocFn::PyRealloc), false),
    want("PyMem_Free", Some(AllocFn::Delete), false),
];

/// How probe lists name CPython's allocator.
pub const PYTHON_NAME: &str = "CPython (PyObject_*, PyMem_*)";

/// Whether an object's symbols define CPython's allocator.
pub fn defines_python_allocator<V>(symbols: &HashMap<&str, V>) -> bool {
    symbols.contains_key("PyObject_Malloc") && symbols.contains_key("PyObject_Free")
}

static PYTHON_ALLOCATORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Has CPython's allocator probed wherever one is found
/// (`--python-allocators`), for the rest of the run.
pub fn probe_python_allocators(on: bool) {
    PYTHON_ALLOCATORS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether CPython's allocator is probed ([`probe_python_allocators`]).
pub fn python_allocators() -> bool {
    PYTHON_ALLOCATORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The prefixed interfaces. The unprefixed one is [`plain_wants`].
const FAMILIES: &[Family] = &[
    Family {
        name: "jemalloc (je_)",
        prefix: "je_",
        extra: JEMALLOC_X,
    },
    Family {
        name: "jemalloc (_rjem_, Rust tikv-jemallocator)",
        prefix: "_rjem_",
        extra: JEMALLOC_X,
    },
    Family {
        name: "tcmalloc (tc_)",
        prefix: "tc_",
        extra: &[],
    },
    Family {
        name: "mimalloc (mi_)",
        prefix: "mi_",
        extra: MIMALLOC_X,
    },
];

/// Rust's global-allocator shims (`alloc::alloc` calls them; they call the
/// `#[global_allocator]`), by their demangled names: rustc mangles them
/// (`_RNvCs…_7___rustc12___rust_alloc`) since 1.84 or so.
const RUST_SHIMS: &[Want] = &[
    want("__rust_alloc", Some(AllocFn::Malloc), true),
    want("__rust_alloc_zeroed", Some(AllocFn::Malloc), false),
    want("__rust_realloc", Some(AllocFn::RustRealloc), false),
    want("__rust_dealloc", Some(AllocFn::Delete), true),
];

/// What memtrace probes in another `malloc` with the C names: the C
/// functions, jemalloc's `mallocx` family (Debian's libjemalloc exports it
/// unprefixed), and the C++ operators, which in jemalloc, tcmalloc and
/// mimalloc are code of their own, not calls to their `malloc` (an operator
/// that is `free`'s own address is probed once, as `free`). Deletes are
/// probed at entry and return, so a `free` they call counts once. Only
/// `malloc` and `free` are required: they are what made the object one.
pub fn plain_wants() -> Vec<Want> {
    LIBC.iter()
        .chain(JEMALLOC_X)
        .chain(LIBSTDCXX)
        .chain(DELETES)
        .map(|w| Want {
            required: matches!(&*w.symbol, "malloc" | "free"),
            ..w.clone()
        })
        .collect()
}

/// The allocators an object's symbols (dynamic and static, name to address)
/// show, and what to probe in them: each interface whose `malloc` and `free`
/// it defines, and Rust's shims where the program has a
/// `#[global_allocator]` of its own: then the shims call it, where with the
/// default they call `__rdl_alloc` (std's, which calls `malloc`, probed
/// anyway: probing the shims too would double the traps for nothing).
pub fn found_in<V>(symbols: &HashMap<&str, V>) -> (Vec<&'static str>, Vec<Want>) {
    let mut names = Vec::new();
    let mut wants = Vec::new();
    let has = |s: &str| symbols.contains_key(s);
    if has("malloc") && has("free") {
        names.push(plain_name(symbols));
        wants.extend(plain_wants());
    }
    for f in FAMILIES {
        let prefixed = |s: &str| format!("{}{s}", f.prefix);
        // A static link keeps only what the program calls: Rust's
        // tikv-jemallocator frees with `sdallocx`, never `free`.
        let allocates = ["malloc", "mallocx"].iter().any(|s| has(&prefixed(s)));
        let frees = ["free", "dallocx", "sdallocx"]
            .iter()
            .any(|s| has(&prefixed(s)));
        if !(allocates && frees) {
            continue;
        }
        names.push(f.name);
        for w in LIBC.iter().chain(f.extra) {
            wants.push(Want {
                symbol: Cow::Owned(prefixed(&w.symbol)),
                required: false,
                ..w.clone()
            });
        }
    }
    let shims = rust_shims(symbols);
    let has_shim = |base: &str| shims.iter().any(|(b, _)| *b == base);
    if !has_shim("__rdl_alloc") && has_shim("__rust_alloc") && has_shim("__rust_dealloc") {
        names.push("Rust #[global_allocator]");
        wants.extend(shims.into_iter().filter_map(|(_, w)| w));
    }
    (names, wants)
}

/// Which allocator defines the plain names, as far as its other symbols
/// tell.
fn plain_name<V>(symbols: &HashMap<&str, V>) -> &'static str {
    let has = |s: &str| symbols.contains_key(s);
    if has("mallocx") {
        "jemalloc"
    } else if has("tc_malloc") {
        "tcmalloc"
    } else if has("mi_malloc") {
        "mimalloc"
    } else if has("__libc_malloc_impl") {
        "musl"
    } else if has("__libc_malloc") && has("malloc_trim") {
        "glibc"
    } else {
        "malloc"
    }
}

/// Rust's shims among the symbols: each one's plain name, and what to probe
/// under its mangled name. `__rdl_alloc` (std's default allocator, there
/// when the program has no `#[global_allocator]`) is listed with nothing to
/// probe.
fn rust_shims<V>(symbols: &HashMap<&str, V>) -> Vec<(&'static str, Option<Want>)> {
    let mut out = Vec::new();
    for &name in symbols.keys() {
        // Every form of the names (mangled or not) holds this.
        if !name.contains("__r") {
            continue;
        }
        let Some(last) = last_segment(name) else {
            continue;
        };
        if last == "__rdl_alloc" {
            out.push(("__rdl_alloc", None));
        } else if let Some(w) = RUST_SHIMS.iter().find(|w| w.symbol == last) {
            let base: &'static str = match &w.symbol {
                Cow::Borrowed(b) => b,
                Cow::Owned(_) => continue,
            };
            let probe = Want {
                symbol: Cow::Owned(name.to_owned()),
                ..w.clone()
            };
            out.push((base, Some(probe)));
        }
    }
    // A stable order, for stable probe lists.
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// The last path segment of a (possibly mangled) Rust symbol.
fn last_segment(name: &str) -> Option<String> {
    let demangled = match rustc_demangle::try_demangle(name) {
        // `{:#}` leaves out the hash.
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_owned(),
    };
    demangled.rsplit("::").next().map(str::to_owned)
}

/// How reports name a probed symbol: C names as they are, `operator new`
/// and `delete` variants in C++ terms, Rust's shims demangled.
pub fn display_name(symbol: &str) -> Cow<'_, str> {
    let name = match symbol {
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
        other if other.starts_with("_R") => {
            return match last_segment(other) {
                Some(last) => Cow::Owned(last),
                None => Cow::Borrowed(other),
            };
        }
        other => other,
    };
    Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols(names: &[&'static str]) -> HashMap<&'static str, u64> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i as u64 * 16))
            .collect()
    }

    fn probed(wants: &[Want]) -> Vec<&str> {
        wants.iter().map(|w| &*w.symbol).collect()
    }

    #[test]
    fn plain_malloc_needs_only_malloc_and_free() {
        let wants = plain_wants();
        let required: Vec<&str> = wants
            .iter()
            .filter(|w| w.required)
            .map(|w| &*w.symbol)
            .collect();
        assert_eq!(required, ["malloc", "free"]);
        assert!(wants.iter().any(|w| w.symbol == "_Znwm"));
        assert!(wants.iter().any(|w| w.symbol == "mallocx"));
        let mut names = probed(&wants);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), wants.len(), "each symbol once");
    }

    #[test]
    fn an_object_without_malloc_and_free_is_no_allocator() {
        let (names, wants) = found_in(&symbols(&["malloc", "main", "je_malloc"]));
        assert!(names.is_empty() && wants.is_empty());
    }

    #[test]
    fn prefixed_interfaces_are_found_with_their_own_functions() {
        let (names, wants) = found_in(&symbols(&[
            "_rjem_malloc",
            "_rjem_sdallocx",
            "_rjem_mallocx",
            "tc_malloc",
        ]));
        assert_eq!(names, ["jemalloc (_rjem_, Rust tikv-jemallocator)"]);
        let w = wants.iter().find(|w| w.symbol == "_rjem_rallocx").unwrap();
        assert_eq!(w.func, Some(AllocFn::Realloc));
        let w = wants.iter().find(|w| w.symbol == "_rjem_sdallocx").unwrap();
        assert_eq!(w.func, Some(AllocFn::Delete));
        assert!(wants.iter().all(|w| !w.required));
    }

    #[test]
    fn plain_names_are_told_apart_by_their_neighbours() {
        let name = |extra: &[&'static str]| {
            let mut all = vec!["malloc", "free"];
            all.extend_from_slice(extra);
            found_in(&symbols(&all)).0[0]
        };
        assert_eq!(name(&["mallocx"]), "jemalloc");
        assert_eq!(name(&["__libc_malloc_impl", "__libc_malloc"]), "musl");
        assert_eq!(name(&["__libc_malloc", "malloc_trim"]), "glibc");
        assert_eq!(name(&[]), "malloc");
    }

    #[test]
    fn rust_shims_are_found_by_their_demangled_names_under_a_global_allocator() {
        let mangled = [
            "_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc",
            "_RNvCsfLfy6EI15iL_7___rustc14___rust_dealloc",
            "_RNvCsfLfy6EI15iL_7___rustc14___rust_realloc",
            "_RNvCsfLfy6EI15iL_7___rustc19___rust_alloc_zeroed",
            "_RNvCsfLfy6EI15iL_7___rustc26___rust_alloc_error_handler",
        ];
        // The default allocator: its shims call malloc, probed anyway.
        let mut default = mangled.to_vec();
        default.push("_RNvCsfLfy6EI15iL_7___rustc11___rdl_alloc");
        let (names, wants) = found_in(&symbols(&default));
        assert!(names.is_empty() && wants.is_empty(), "{names:?}");

        let (names, wants) = found_in(&symbols(&mangled));
        assert_eq!(names, ["Rust #[global_allocator]"]);
        let by_name: HashMap<String, Option<AllocFn>> = wants
            .iter()
            .map(|w| (display_name(&w.symbol).into_owned(), w.func))
            .collect();
        assert_eq!(by_name.len(), 4, "{by_name:?}");
        assert_eq!(by_name["__rust_alloc"], Some(AllocFn::Malloc));
        assert_eq!(by_name["__rust_alloc_zeroed"], Some(AllocFn::Malloc));
        assert_eq!(by_name["__rust_realloc"], Some(AllocFn::RustRealloc));
        assert_eq!(by_name["__rust_dealloc"], Some(AllocFn::Delete));
    }

    #[test]
    fn display_names_read_like_code() {
        assert_eq!(display_name("_ZnwmRKSt9nothrow_t"), "new(nothrow)");
        assert_eq!(display_name("_ZdlPvm"), "delete(sized)");
        assert_eq!(display_name("_rjem_malloc"), "_rjem_malloc");
        assert_eq!(
            display_name("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc"),
            "__rust_alloc"
        );
    }
}
