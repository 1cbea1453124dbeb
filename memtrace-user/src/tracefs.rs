//! tracefs: mounted when it is not, and the layouts of the tracepoints the
//! eBPF programs read checked against the running kernel's `format` files.
//!
//! Rust eBPF has no CO-RE relocations, so the programs read tracepoint
//! fields at fixed offsets. Those offsets are the kernel's ABI for tracing
//! tools in practice, but not a promise: a kernel that moved a field would
//! make the programs read garbage. This module refuses that kernel with the
//! field that differs instead.

use std::path::{Path, PathBuf};

use crate::error::{Result, UserError};

/// Where tracefs is, or is mounted.
const TRACEFS: &str = "/sys/kernel/tracing";
/// The older place, under debugfs.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// One field a program reads: tracepoint, field name, offset, size.
pub type Field = (&'static str, &'static str, usize, usize);

/// Every field the eBPF programs read, at the offsets they read it.
pub const FIELDS: &[Field] = &[
    ("kmem/rss_stat", "mm_id", 8, 4),
    ("kmem/rss_stat", "curr", 12, 4),
    ("kmem/rss_stat", "member", 16, 4),
    ("kmem/rss_stat", "size", 24, 8),
    ("exceptions/page_fault_user", "address", 8, 8),
    ("exceptions/page_fault_kernel", "address", 8, 8),
    ("syscalls/sys_enter_mmap", "addr", 16, 8),
    ("syscalls/sys_enter_mmap", "fd", 48, 8),
    ("syscalls/sys_exit_mmap", "ret", 16, 8),
    ("syscalls/sys_enter_munmap", "len", 24, 8),
    ("syscalls/sys_enter_mremap", "new_len", 32, 8),
    ("syscalls/sys_enter_brk", "brk", 16, 8),
    ("syscalls/sys_enter_madvise", "behavior", 32, 8),
    ("oom/mark_victim", "pid", 8, 4),
    ("oom/mark_victim", "anon_rss", 24, 8),
    ("oom/mark_victim", "pgtables", 56, 8),
    ("oom/mark_victim", "oom_score_adj", 64, 2),
    ("sched/sched_process_exec", "old_pid", 16, 4),
];

/// Fields read only with `--follow-forks`.
pub const FORK_FIELDS: &[Field] = &[
    ("task/task_newtask", "pid", 8, 4),
    ("task/task_newtask", "comm", 12, 16),
    ("task/task_newtask", "clone_flags", 32, 8),
];

/// Fields read only with `--kernel`.
pub const KERNEL_FIELDS: &[Field] = &[
    ("kmem/kmalloc", "ptr", 16, 8),
    ("kmem/kmalloc", "bytes_req", 24, 8),
    ("kmem/kmalloc", "bytes_alloc", 32, 8),
    ("kmem/kmem_cache_alloc", "ptr", 16, 8),
    ("kmem/kmem_cache_alloc", "bytes_req", 32, 8),
    ("kmem/kmem_cache_alloc", "bytes_alloc", 40, 8),
    ("kmem/kfree", "ptr", 16, 8),
    ("kmem/kmem_cache_free", "ptr", 16, 8),
    ("kmem/mm_page_alloc", "pfn", 8, 8),
    ("kmem/mm_page_alloc", "order", 16, 4),
    ("kmem/mm_page_alloc", "gfp_flags", 24, 8),
    ("kmem/mm_page_free", "pfn", 8, 8),
    ("kmem/mm_page_free_batched", "pfn", 8, 8),
    ("percpu/percpu_alloc_percpu", "size", 24, 8),
    ("percpu/percpu_alloc_percpu", "ptr", 56, 8),
    ("percpu/percpu_alloc_percpu", "bytes_alloc", 64, 8),
    ("percpu/percpu_free_percpu", "ptr", 24, 8),
];

/// The tracefs directory, mounting tracefs first if nothing is there.
pub fn ensure_mounted() -> Result<PathBuf> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let target = std::ffi::CString::new(TRACEFS).expect("no NUL in a constant");
    let fstype = std::ffi::CString::new("tracefs").expect("no NUL in a constant");
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(UserError::new(
            format!("cannot mount tracefs on {TRACEFS}: {e}"),
            "memtrace needs tracefs for the kernel's memory tracepoints: run as root, or mount it with `mount -t tracefs tracefs /sys/kernel/tracing`",
        ));
    }
    Ok(PathBuf::from(TRACEFS))
}

/// `(offset, size)` of `field` in a tracepoint's `format` text.
pub fn field_layout(format: &str, field: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let number = |key: &str| -> Option<usize> {
            line.split(';')
                .find_map(|p| p.trim().strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        Some((number("offset:")?, number("size:")?))
    })
}

/// Checks every field in `fields` against the kernel's format files.
pub fn check(root: &Path, fields: &[Field]) -> Result<()> {
    for &(event, field, offset, size) in fields {
        let path = root.join("events").join(event).join("format");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            UserError::new(
                format!("cannot read the tracepoint {event} ({}): {e}", path.display()),
                "this kernel lacks a tracepoint memtrace uses (CONFIG_TRACEPOINTS, CONFIG_FTRACE_SYSCALLS)",
            )
        })?;
        match field_layout(&text, field) {
            Some(got) if got == (offset, size) => {}
            got => {
                let got = got.map_or("absent".to_string(), |(o, s)| {
                    format!("at offset {o}, {s} bytes")
                });
                return Err(UserError::new(
                    format!(
                        "the kernel's tracepoint {event} has field {field} {got}; memtrace reads it at offset {offset}, {size} bytes"
                    ),
                    "this kernel's tracepoint layout is one memtrace does not know; please report it with `uname -r`",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS_STAT: &str = "name: rss_stat
ID: 470
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned int mm_id;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int member;\toffset:16;\tsize:4;\tsigned:1;
\tfield:long size;\toffset:24;\tsize:8;\tsigned:1;
\tfield:const void * ptr;\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:40;\tsize:4;\tsigned:0;
";

    #[test]
    fn reads_offsets_and_sizes_from_format_text() {
        assert_eq!(field_layout(RSS_STAT, "size"), Some((24, 8)));
        assert_eq!(field_layout(RSS_STAT, "member"), Some((16, 4)));
        assert_eq!(field_layout(RSS_STAT, "ptr"), Some((32, 8)));
        assert_eq!(field_layout(RSS_STAT, "name"), Some((40, 4)));
        assert_eq!(field_layout(RSS_STAT, "curr"), None);
    }

    #[test]
    fn this_kernels_layouts_are_the_ones_memtrace_reads() {
        let root = Path::new(TRACEFS);
        if !root.join("events/kmem/rss_stat/format").exists() {
            eprintln!("skipped: tracefs is not mounted");
            return;
        }
        check(root, FIELDS).unwrap();
        check(root, KERNEL_FIELDS).unwrap();
    }
}
