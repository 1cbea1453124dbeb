//! Compiles the C and C++ ground-truth fixtures into `OUT_DIR`, where
//! `memtrace_tests::fixture` finds them.
//!
//! Plain `cc`/`c++` through `std::process::Command` (or `$CC`/`$CXX`): the
//! fixtures are single files and a build-dependency would be overkill. The
//! flags keep the fixtures honest ground truth: `-O0` so no allocation is
//! folded away or inlined into its caller, frame pointers and `-g` so memtrace
//! can walk and symbolize the stacks. The C and C++ fixtures share their
//! stdin/stdout protocol through `fixtures/fixture_protocol.h`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One fixture: its source under `fixtures/`, compiler, flags and output name.
struct Fixture {
    source: &'static str,
    output: &'static str,
    cxx: bool,
    flags: &'static [&'static str],
    /// A compiler other than `$CC`/`$CXX`: musl's wrapper. Without it
    /// installed the fixture is not built, and its tests say what to
    /// install (`cargo xtask setup` does).
    compiler: Option<&'static str>,
}

/// The C fixture's flags: ground truth needs `-O0` and frame pointers.
const C_FLAGS: &[&str] = &["-O0", "-g", "-fno-omit-frame-pointer"];

const FIXTURES: &[Fixture] = &[
    Fixture {
        source: "alloc_fixture.c",
        output: "alloc_fixture",
        cxx: false,
        flags: &["-O0", "-g", "-fno-omit-frame-pointer", "-pthread"],
        compiler: None,
    },
    Fixture {
        source: "cxx_fixture.cpp",
        output: "cxx_fixture",
        cxx: true,
        flags: C_FLAGS,
        compiler: None,
    },
    Fixture {
        source: "mem_fixture.c",
        output: "mem_fixture",
        cxx: false,
        flags: C_FLAGS,
        compiler: None,
    },
    Fixture {
        source: "agent_fixture.c",
        output: "agent_fixture",
        cxx: false,
        flags: C_FLAGS,
        compiler: None,
    },
    Fixture {
        source: "phases_fixture.c",
        output: "phases_fixture",
        cxx: false,
        flags: C_FLAGS,
        compiler: None,
    },
    Fixture {
        source: "fork_fixture.c",
        output: "fork_fixture",
        cxx: false,
        flags: C_FLAGS,
        compiler: None,
    },
    Fixture {
        source: "threads_fixture.c",
        output: "threads_fixture",
        cxx: false,
        flags: C_FLAGS,
        compiler: None,
    },
    // Built as distributions build: optimized, no frame pointers. Its
    // callers are found by DWARF unwinding only.
    Fixture {
        source: "nofp_fixture.cpp",
        output: "nofp_fixture",
        cxx: true,
        flags: &["-O2", "-g", "-fomit-frame-pointer", "-pthread"],
        compiler: None,
    },
    // The allocator in the executable: glibc's, then musl's linked in,
    // and musl's libc.so instead of glibc's.
    Fixture {
        source: "alloc_fixture.c",
        output: "alloc_fixture_static",
        cxx: false,
        flags: &[
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-pthread",
            "-static",
        ],
        compiler: None,
    },
    Fixture {
        source: "alloc_fixture.c",
        output: "alloc_fixture_musl",
        cxx: false,
        flags: &["-O0", "-g", "-fno-omit-frame-pointer", "-pthread"],
        compiler: Some(MUSL_GCC),
    },
    Fixture {
        source: "alloc_fixture.c",
        output: "alloc_fixture_musl_static",
        cxx: false,
        flags: &[
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-pthread",
            "-static",
        ],
        compiler: Some(MUSL_GCC),
    },
    // Static and stripped: no symbol says where its malloc is, the
    // "nothing to probe" error case.
    Fixture {
        source: "static_fixture.c",
        output: "static_fixture",
        cxx: false,
        flags: &["-O0", "-static", "-s"],
        compiler: None,
    },
];

/// musl's compiler wrapper (Debian's musl-tools).
const MUSL_GCC: &str = "musl-gcc";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CC");
    println!("cargo::rerun-if-env-changed=CXX");

    let fixture_dir = manifest_dir.join("fixtures");
    // Every fixture includes it, so a change to it rebuilds them all.
    let header = fixture_dir.join("fixture_protocol.h");
    println!("cargo::rerun-if-changed={}", header.display());

    for fixture in FIXTURES {
        let source = fixture_dir.join(fixture.source);
        println!("cargo::rerun-if-changed={}", source.display());
        let output = out_dir.join(fixture.output);
        if let Some(compiler) = fixture.compiler
            && Command::new(compiler).arg("--version").output().is_err()
        {
            println!(
                "cargo::warning={} not built: {compiler} is missing (install musl-tools)",
                fixture.output
            );
            continue;
        }
        compile(fixture, &fixture_dir, &source, &output);
    }
}

fn compile(fixture: &Fixture, include_dir: &Path, source: &Path, output: &Path) {
    let (var, default) = if fixture.cxx {
        ("CXX", "c++")
    } else {
        ("CC", "cc")
    };
    let compiler = match fixture.compiler {
        Some(c) => c.to_owned(),
        None => env::var(var).unwrap_or_else(|_| default.to_owned()),
    };
    let mut command = Command::new(&compiler);
    command
        .args(fixture.flags)
        .arg("-I")
        .arg(include_dir)
        .args(["-Wall", "-o"])
        .arg(output)
        .arg(source);

    let shown = format!("{command:?}");
    let result = command.output().unwrap_or_else(|err| {
        panic!("cannot run the fixture compiler: {shown}: {err} (install gcc/g++ or set ${var})")
    });
    if !result.status.success() {
        panic!(
            "compiling fixture {} failed\ncommand: {shown}\nstatus: {}\nstderr:\n{}",
            fixture.source,
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    // Warnings are worth seeing, but a build script can only surface them this way.
    for line in String::from_utf8_lossy(&result.stderr).lines() {
        println!("cargo::warning={}: {line}", fixture.source);
    }
}
