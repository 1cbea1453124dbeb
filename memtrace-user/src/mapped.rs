//! Opening the file behind another process's mapping, without being led
//! out of that process's filesystem.
//!
//! A process in a container names its files relative to its own root. A path
//! from its `/proc/PID/maps` joined to `/proc/PID/root` is resolved by the
//! kernel with memtrace's privileges, and an absolute symbolic link planted
//! inside the container (say, the library replaced by a link to
//! `/etc/shadow`) would be followed to the host's file. So:
//! - first `/proc/PID/map_files/START-END`, which the kernel resolves to the
//!   very file mapped there, by reference, not by name (and which still
//!   works once the file is deleted, as after a library upgrade);
//! - else the path resolved with `openat2(RESOLVE_IN_ROOT)` under the
//!   process's root, so `..` and absolute links stay inside it, and only if
//!   the file found is the mapped one (same device and inode);
//! - else, once the process is gone, the path as memtrace sees it, again only
//!   if it is the very file that was mapped.
//!
//! This module opens files; it does not parse them (see `attach`,
//! `symbolize`).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::maps::Mapping;

/// The `map_files` entry of a mapping: a path the kernel resolves to the
/// mapped file itself (root only).
pub fn map_files_path(pid: u32, m: &Mapping) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{}", m.map_files_name()))
}

/// Opens the file mapped by `m` in process `pid`: through the mapping, else
/// under the process's root, else (the process is gone) by the path as
/// memtrace sees it, if that is the very file that was mapped.
pub fn open(pid: u32, m: &Mapping) -> io::Result<File> {
    File::open(map_files_path(pid, m))
        .or_else(|_| open_in_root(pid, m))
        .or_else(|_| checked(File::open(&m.path)?, m, "at that path"))
}

/// Opens `m.path` inside the root of process `pid`, never leaving it, and
/// checks that the file found is the one mapped.
pub fn open_in_root(pid: u32, m: &Mapping) -> io::Result<File> {
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let path = m.path.strip_suffix(" (deleted)").unwrap_or(&m.path);
    let fd = rustix::fs::openat2(
        &root,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?;
    checked(File::from(fd), m, "in the process's root")
}

/// `file` if it is the one `m` maps; else an error saying it was replaced.
fn checked(file: File, m: &Mapping, where_: &str) -> io::Result<File> {
    let meta = file.metadata()?;
    if !is_mapped_file(m, meta.dev(), meta.ino()) {
        return Err(io::Error::other(format!(
            "{} {where_} is not the file mapped (it was replaced)",
            m.path
        )));
    }
    Ok(file)
}

/// Whether a file's device and inode are those a mapping names.
fn is_mapped_file(m: &Mapping, dev: u64, ino: u64) -> bool {
    m.inode == ino && m.dev == crate::maps::dev_name(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(dev: &str, inode: u64) -> Mapping {
        Mapping {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            exec: true,
            dev: dev.into(),
            inode,
            path: "/lib/libc.so.6".into(),
        }
    }

    #[test]
    fn device_and_inode_must_both_match() {
        let dev = libc::makedev(0xfe, 0x01);
        assert!(is_mapped_file(&mapping("fe:01", 42), dev, 42));
        assert!(!is_mapped_file(&mapping("fe:01", 42), dev, 43));
        assert!(!is_mapped_file(&mapping("fe:02", 42), dev, 42));
        assert!(is_mapped_file(
            &mapping("103:05", 7),
            libc::makedev(0x103, 0x05),
            7
        ));
    }

    #[test]
    fn a_mapping_of_this_process_opens_and_a_replaced_one_does_not() {
        let pid = std::process::id();
        let maps = crate::maps::read(pid).expect("own maps");
        let exe = maps.iter().find(|m| m.exec).expect("an executable mapping");
        // Through the root (map_files may need more privilege than tests have).
        open_in_root(pid, exe).expect("own executable");
        let replaced = Mapping {
            inode: exe.inode + 1,
            ..exe.clone()
        };
        assert!(open_in_root(pid, &replaced).is_err());
    }
}
