//! Uprobe sessions (`BPF_TRACE_UPROBE_SESSION`, kernel 6.13+): one program
//! runs at a function's entry and, only when that run returns 0, again at
//! its return. The sampled tier uses them so that an unsampled call pays one
//! trap, not two.
//!
//! aya 0.14 has no API for them, and the kernel checks at `BPF_LINK_CREATE`
//! that a program was loaded with that expected attach type, which aya's
//! `UProbe::load` does not set. So this module loads the programs itself,
//! through the bpf syscall: it parses the same eBPF object with aya-obj,
//! relocates its map references to the maps aya created (by descriptor, so
//! both share every map and global), and loads each entry program as a
//! kprobe-type program with the session attach type. Links are uprobe-multi
//! links of one offset each, scoped to one process.
//!
//! Not here: choosing which functions to probe (`attach`, `load`), what the
//! programs do (`memtrace-ebpf/src/sampled.rs`).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};

/// `BPF_TRACE_UPROBE_SESSION` in the kernel's `enum bpf_attach_type` (not
/// in aya-obj 0.3's bindings).
const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// The first kernel with uprobe sessions.
pub const MIN_KERNEL: (u32, u32) = (6, 13);

/// Whether the running kernel is new enough for uprobe sessions.
pub fn kernel_supports() -> bool {
    kernel_version().is_some_and(|v| v >= MIN_KERNEL)
}

/// The running kernel's major and minor version, from `uname`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&release)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The object's programs, relocated against aya's maps, loaded on demand as
/// session programs.
pub struct SessionPrograms {
    /// Relocated instructions of each program, by name.
    code: HashMap<String, Vec<bpf_insn>>,
    license: CString,
    loaded: HashMap<String, OwnedFd>,
}

impl SessionPrograms {
    /// Parses `object` and points its map references at `maps` (name and
    /// descriptor of every map aya created for the same object).
    pub fn new(object: &[u8], maps: &[(String, OwnedFd)]) -> Result<Self, String> {
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| format!("parsing the eBPF object: {e}"))?;
        let defs: Vec<(String, aya_obj::Map)> = obj.maps.drain().collect();
        let mut relocs: Vec<(&str, RawFd, &aya_obj::Map)> = Vec::new();
        for (name, def) in &defs {
            let Some((_, fd)) = maps.iter().find(|(n, _)| n == name) else {
                return Err(format!("map {name} was not created"));
            };
            relocs.push((name.as_str(), fd.as_raw_fd(), def));
        }
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(relocs.into_iter(), &text_sections)
            .map_err(|e| format!("relocating maps: {e}"))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| format!("relocating calls: {e}"))?;
        let code = obj
            .programs
            .iter()
            .filter_map(|(name, p)| {
                let f = obj.functions.get(&p.function_key())?;
                Some((name.clone(), f.instructions.clone()))
            })
            .collect();
        Ok(Self {
            code,
            license: obj.license.clone(),
            loaded: HashMap::new(),
        })
    }

    /// The descriptor of program `name` loaded as a session program (loaded
    /// and verified at its first use).
    pub fn program(&mut self, name: &str) -> Result<RawFd, String> {
        if let Some(fd) = self.loaded.get(name) {
            return Ok(fd.as_raw_fd());
        }
        let insns = self
            .code
            .get(name)
            .ok_or_else(|| format!("no program {name} in the eBPF object"))?;
        let fd = load(name, insns, &self.license)?;
        let raw = fd.as_raw_fd();
        self.loaded.insert(name.to_string(), fd);
        Ok(raw)
    }
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-initialised `bpf_attr` for `cmd`, and
    // the size passed is its own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `BPF_PROG_LOAD` of a kprobe-type program expecting session attachment.
fn load(name: &str, insns: &[bpf_insn], license: &CString) -> Result<OwnedFd, String> {
    let mut log = vec![0u8; 1 << 20];
    let mut attempt = |log_level: u32| {
        // SAFETY: all-zero is a valid `bpf_attr`.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the PROG_LOAD member of a zeroed union.
        let u = unsafe { &mut attr.__bindgen_anon_3 };
        u.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
        u.expected_attach_type = BPF_TRACE_UPROBE_SESSION;
        u.insns = insns.as_ptr() as u64;
        u.insn_cnt = insns.len() as u32;
        u.license = license.as_ptr() as u64;
        for (dst, src) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if log_level > 0 {
            u.log_level = log_level;
            u.log_buf = log.as_mut_ptr() as u64;
            u.log_size = log.len() as u32;
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match attempt(0) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Again with the verifier's log, for the error.
            let _ = attempt(1);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the kernel refused {name} as a uprobe session program: {first}{}{}",
                if tail.is_empty() { "" } else { "; verifier: " },
                tail.join(" | ")
            ))
        }
    }
}

/// Attaches session program `prog` at file offset `offset` of `path`, for
/// process `pid` only. The probe goes when the returned descriptor closes.
pub fn attach(prog: RawFd, path: &Path, offset: u64, pid: u32) -> Result<OwnedFd, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} has a NUL in its name", path.display()))?;
    let offsets = [offset];
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the LINK_CREATE member of a zeroed union.
    let lc = unsafe { &mut attr.link_create };
    lc.__bindgen_anon_1.prog_fd = prog as u32;
    lc.attach_type = BPF_TRACE_UPROBE_SESSION;
    // SAFETY: writing the uprobe-multi member of the zeroed inner union.
    let um = unsafe { &mut lc.__bindgen_anon_3.uprobe_multi };
    um.path = cpath.as_ptr() as u64;
    um.offsets = offsets.as_ptr() as u64;
    um.cnt = 1;
    um.pid = pid;
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|e| {
        format!(
            "attaching a uprobe session at {}+{offset:#x} for PID {pid} failed: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.44-fc-v1252\n"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("6.13"), Some((6, 13)));
        assert_eq!(parse_release("garbage"), None);
        assert!((6, 12) < MIN_KERNEL && (6, 13) >= MIN_KERNEL && (7, 0) > MIN_KERNEL);
    }
}
