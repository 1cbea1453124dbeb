//! Where each CPython version keeps what memtrace reads: one table per
//! version, so supporting another version means adding a table, not
//! changing the walk.
//!
//! The offsets are those of x86-64 builds of the release's own headers
//! (`Include/internal/pycore_runtime.h`, `pycore_interp.h`, `cpython/pystate.h`,
//! `pycore_frame.h`, `cpython/code.h`, `cpython/unicodeobject.h`), checked
//! against the DWARF of a debug build and a live interpreter (a root test
//! reads them back through the interpreter itself: `tests/tests/python.rs`).
//! They hold for release and debug builds alike (`Py_DEBUG` adds no field
//! before these), not for the free-threaded builds of 3.13+.

use memtrace_common::PyConfig;

/// One version's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Major and minor version.
    pub version: (u8, u8),
    /// What the kernel side reads (with `runtime` 0: the process fills it),
    /// code objects and the strings and bytes that name them included.
    pub walk: PyConfig,
    /// `PyASCIIObject.state`.
    pub str_state: u64,
    /// Where a compact ASCII string's characters start.
    pub str_ascii_data: u64,
}

/// CPython 3.11.
const PY311: Layout = Layout {
    version: (3, 11),
    walk: PyConfig {
        runtime: 0,
        runtime_interpreters_head: 40,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_cframe: 56,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        frame_prev_instr: 56,
        frame_is_entry: 68,
        frame_owner: 69,
        // 3.11 has no C-stack shim frames.
        owner_cstack: 255,
        code_firstlineno: 72,
        code_bytecode: 184,
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        str_length: 16,
        str_compact_data: 72,
        bytes_size: 16,
        bytes_data: 32,
        _pad: 0,
    },
    str_state: 32,
    str_ascii_data: 48,
};

/// Every version memtrace knows.
const LAYOUTS: &[Layout] = &[PY311];

/// The layout of CPython `major.minor`, if memtrace has one.
pub fn for_version(major: u8, minor: u8) -> Option<&'static Layout> {
    LAYOUTS.iter().find(|l| l.version == (major, minor))
}

/// The versions memtrace has layouts for, for messages ("3.11").
pub fn known_versions() -> String {
    LAYOUTS
        .iter()
        .map(|l| format!("{}.{}", l.version.0, l.version.1))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_known_versions_only() {
        assert_eq!(for_version(3, 11).map(|l| l.version), Some((3, 11)));
        assert!(for_version(3, 10).is_none());
        assert!(for_version(3, 12).is_none());
        assert_eq!(known_versions(), "3.11");
    }

    #[test]
    fn frame_fields_fit_the_kernel_sides_reads() {
        // The walk reads 8-byte pointers and single bytes at these offsets:
        // none of them may overlap.
        let w = PY311.walk;
        let mut fields = [
            (w.frame_code, 8),
            (w.frame_previous, 8),
            (w.frame_prev_instr, 8),
            (w.frame_is_entry, 1),
            (w.frame_owner, 1),
        ];
        fields.sort();
        for pair in fields.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?}");
        }
    }
}
