//! `/proc/PID/maps`: which file is mapped where in a process.
//!
//! [`parse`] is pure (text in, ranges out) and unit-tested on literal text;
//! [`read`] is the only function here that touches `/proc`. Used to find the
//! allocator libraries a process maps, and to turn a process's addresses into
//! (file, file offset) pairs while it is alive.

use std::io;

/// One file-backed mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Whether the mapping is executable.
    pub exec: bool,
    /// Device as `major:minor` (hex), as the kernel prints it.
    pub dev: String,
    /// Inode number.
    pub inode: u64,
    /// Path of the file, as seen from the process's mount namespace.
    pub path: String,
}

impl Mapping {
    /// File offset of `addr`, which must lie inside the mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }

    /// The name `/proc/PID/map_files/` gives this mapping.
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// File-backed mappings of one `maps` text, in address order. Anonymous
/// mappings, pseudo-files (`[heap]`, `[vdso]`, ...) and unparsable lines are
/// left out.
pub fn parse(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next()?.trim_start();
    if !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
        dev: dev.to_string(),
        inode: inode.parse().ok()?,
        path: path.to_string(),
    })
}

/// A device number as `maps` prints it (`major:minor`, hex), so a file's
/// `stat` can be compared with a mapping.
pub fn dev_name(dev: u64) -> String {
    format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))
}

/// Reads and parses `/proc/PID/maps`. A process without an address space
/// (past `exit_mm`, a zombie not reaped yet, a kernel thread) reads as no
/// mappings at all: that is an error, not a snapshot, so that no caller
/// takes it for the process's mappings (a symbolizer that did lost every
/// name of a process whose last records it read while the process exited).
pub fn read(pid: u32) -> io::Result<Vec<Mapping>> {
    let maps = parse(&std::fs::read_to_string(format!("/proc/{pid}/maps"))?);
    if maps.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no address space (the process is exiting, or is a kernel thread)",
        ));
    }
    Ok(maps)
}

/// Index of the mapping that contains `addr`, in mappings sorted by address.
pub fn position(maps: &[Mapping], addr: u64) -> Option<usize> {
    let i = maps.partition_point(|m| m.end <= addr);
    maps.get(i).filter(|m| m.start <= addr).map(|_| i)
}

/// The mapping that contains `addr`, in mappings sorted by address.
pub fn find(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    position(maps, addr).map(|i| &maps[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_address_space_is_an_error() {
        // kthreadd: a kernel thread, with an empty `maps`.
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            let e = read(2).expect_err("a kernel thread has no mappings");
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
        }
        assert!(!read(std::process::id()).expect("own maps").is_empty());
    }

    const TEXT: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1048602                    /usr/bin/prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1048602                    /usr/bin/prog
55d0c1e6b000-55d0c1e8c000 rw-p 00000000 00:00 0                          [heap]
7f3a1c028000-7f3a1c17d000 r-xp 00028000 fe:01 1311043                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1c400000-7f3a1c401000 r-xp 00000000 fe:01 99                         /tmp/lib with space.so (deleted)
7ffd5a1c6000-7ffd5a1e7000 rw-p 00000000 00:00 0                          [stack]
garbage line
";

    #[test]
    fn keeps_file_backed_mappings_only() {
        let maps = parse(TEXT);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[2].path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(maps[2].offset, 0x28000);
        assert!(maps[2].exec);
        assert!(!maps[0].exec);
        assert_eq!(maps[2].dev, "fe:01");
        assert_eq!(maps[2].inode, 1311043);
        assert_eq!(maps[3].path, "/tmp/lib with space.so (deleted)");
    }

    #[test]
    fn finds_the_mapping_of_an_address() {
        let maps = parse(TEXT);
        let m = find(&maps, 0x7f3a1c028010).unwrap();
        assert_eq!(m.file_offset(0x7f3a1c028010), 0x28010);
        assert_eq!(m.map_files_name(), "7f3a1c028000-7f3a1c17d000");
        assert!(find(&maps, 0x55d0c1e6b000).is_none());
        assert!(find(&maps, 0x1).is_none());
        assert!(find(&maps, u64::MAX).is_none());
    }
}
