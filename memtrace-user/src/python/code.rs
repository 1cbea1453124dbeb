//! Code objects → function, file and line.
//!
//! A code object is read once: its qualified name, file name, first line
//! and line table, from the copy the kernel side sent of them
//! ([`Copied`], from a `PyCodeRecord`), else from the process's memory
//! (through `/proc/PID/mem`, [`Memory`]). [`line_of`] then maps an
//! instruction index to its line with the table alone, as
//! `PyCode_Addr2Line` does. The parsers are pure and unit-tested on bytes
//! CPython itself produced; only [`Memory`] touches `/proc`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use memtrace_common::{PyCodeRecord, py_code_stamp};

use super::layout::Layout;

/// What a report shows of one code object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_qualname` (`Class.method`, `outer.<locals>.inner`).
    pub name: String,
    /// `co_filename`.
    pub file: String,
    /// `co_firstlineno`.
    pub first_line: u32,
    /// Its [`py_code_stamp`], which frames carry.
    pub stamp: u32,
    /// `co_linetable` (its start only, when the copy cut it).
    pub linetable: Vec<u8>,
}

/// Longest string or line table read from a process: past this, the
/// object is taken for garbage (a code object freed and its memory reused).
const MAX_READ: u64 = 1 << 20;

/// Somewhere to read a process's memory from.
pub trait Source {
    /// `len` bytes at `addr`, if they can be read.
    fn bytes(&self, addr: u64, len: u64) -> Option<Vec<u8>>;

    /// A little-endian `u64` at `addr`.
    fn u64(&self, addr: u64) -> Option<u64> {
        let b = self.bytes(addr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// A little-endian `u32` at `addr`.
    fn u32(&self, addr: u64) -> Option<u32> {
        let b = self.bytes(addr, 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }
}

/// Reads a live process's memory.
pub struct Memory {
    file: File,
}

impl Memory {
    /// Opens the memory of process `pid`.
    pub fn open(pid: u32) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(format!("/proc/{pid}/mem"))?,
        })
    }

    /// A code object, by its address.
    pub fn code(&self, layout: &Layout, code: u64) -> Option<CodeInfo> {
        let w = &layout.walk;
        let name = string(self, layout, self.u64(code + u64::from(w.code_qualname))?)?;
        let file_addr = self.u64(code + u64::from(w.code_filename))?;
        let file = string(self, layout, file_addr)?;
        let first_line = self.u32(code + u64::from(w.code_firstlineno))?;
        let table = self.u64(code + u64::from(w.code_linetable))?;
        let len = self.u64(table + u64::from(w.bytes_size))?;
        let linetable = self.bytes(table + u64::from(w.bytes_data), len)?;
        Some(CodeInfo {
            name,
            file,
            first_line,
            stamp: py_code_stamp(first_line, file_addr),
            linetable,
        })
    }
}

impl Source for Memory {
    fn bytes(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        if len > MAX_READ {
            return None;
        }
        let mut buf = vec![0; len as usize];
        self.file.read_exact_at(&mut buf, addr).ok()?;
        Some(buf)
    }
}

/// What the kernel side copied of one code object (a `PyCodeRecord`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The code object's address.
    pub code: u64,
    /// What the copy holds.
    pub info: CodeInfo,
    /// Whether the line table is whole (else `info.linetable` is its
    /// start).
    pub whole_table: bool,
}

/// The regions of memory a `PyCodeRecord` copied.
struct Regions<'a>(Vec<(u64, &'a [u8])>);

impl Source for Regions<'_> {
    fn bytes(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        self.0.iter().find_map(|&(start, data)| {
            let off = addr.checked_sub(start)?;
            let end = off.checked_add(len)?;
            (end <= data.len() as u64).then(|| data[off as usize..end as usize].to_vec())
        })
    }
}

/// The first `len` bytes of `data` (all of it, if fewer), at `addr`.
fn part(addr: u64, data: &[u8], len: u32) -> (u64, &[u8]) {
    (addr, &data[..(len as usize).min(data.len())])
}

impl Copied {
    /// Parses a `PyCodeRecord` (`None` when its name or file name was not
    /// copied whole, or the record is short).
    pub fn parse(layout: &Layout, bytes: &[u8]) -> Option<Self> {
        if bytes.len() < PyCodeRecord::FIXED_LEN {
            return None;
        }
        let mut buf = [0u8; size_of::<PyCodeRecord>()];
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        // SAFETY: `PyCodeRecord` is plain old data (integers and byte
        // arrays) and `buf` is exactly its size.
        let rec: PyCodeRecord = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let table_len = (rec.table_len as usize).min(n - PyCodeRecord::FIXED_LEN);
        let src = Regions(vec![
            part(rec.name_addr, &rec.name, rec.name_len),
            part(rec.file_addr, &rec.file, rec.file_len),
            part(rec.table_addr, &rec.table, table_len as u32),
        ]);
        let name = string(&src, layout, rec.name_addr)?;
        let file = string(&src, layout, rec.file_addr)?;
        let w = &layout.walk;
        let size = src.u64(rec.table_addr + u64::from(w.bytes_size))?;
        let data = u64::from(w.bytes_data);
        let held = (table_len as u64).saturating_sub(data).min(size);
        let linetable = src.bytes(rec.table_addr + data, held)?;
        Some(Self {
            code: rec.code,
            info: CodeInfo {
                name,
                file,
                first_line: rec.first_line,
                stamp: rec.stamp,
                linetable,
            },
            whole_table: held == size,
        })
    }
}

/// A `str` object's text: compact strings only (every string the compiler
/// makes for names and file names is compact).
fn string(src: &impl Source, layout: &Layout, obj: u64) -> Option<String> {
    let w = &layout.walk;
    let len = src.u64(obj + u64::from(w.str_length))?;
    let state = src.u32(obj + layout.str_state)?;
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || len > MAX_READ {
        return None;
    }
    if ascii {
        let b = src.bytes(obj + layout.str_ascii_data, len)?;
        return String::from_utf8(b).ok();
    }
    let width = match kind {
        1 | 2 | 4 => u64::from(kind),
        _ => return None,
    };
    let b = src.bytes(obj + u64::from(w.str_compact_data), len.checked_mul(width)?)?;
    decode_ucs(&b, width as usize)
}

/// Characters of `width` bytes each (latin-1, UCS-2, UCS-4) as a string.
fn decode_ucs(b: &[u8], width: usize) -> Option<String> {
    b.chunks_exact(width)
        .map(|c| {
            let v = match width {
                1 => u32::from(c[0]),
                2 => u32::from(u16::from_le_bytes([c[0], c[1]])),
                _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            };
            char::from_u32(v)
        })
        .collect()
}

/// The line of the instruction at code-unit index `lasti`, from a 3.11+
/// location table (CPython's `Objects/locations.md`): entries of a header
/// byte (bit 7 set, a 4-bit code, the length in code units less one) and the
/// code's operands. `None` for an instruction with no line (or beyond the
/// table). `u32::MAX` (a frame that has run nothing yet) is the first line.
pub fn line_of(table: &[u8], first_line: u32, lasti: u32) -> Option<u32> {
    if lasti == u32::MAX {
        return Some(first_line);
    }
    let mut line = i64::from(first_line);
    let mut addr: u64 = 0;
    let mut i = 0;
    while i < table.len() {
        let head = table[i];
        i += 1;
        if head & 0x80 == 0 {
            // Not at an entry's start: the table is not one we can read.
            return None;
        }
        let code = (head >> 3) & 15;
        let len = u64::from(head & 7) + 1;
        let (delta, has_line) = match code {
            15 => (0, false),
            14 => {
                let d = svarint(table, &mut i)?;
                for _ in 0..3 {
                    varint(table, &mut i)?;
                }
                (d, true)
            }
            13 => (svarint(table, &mut i)?, true),
            10..=12 => {
                i += 2;
                (i64::from(code) - 10, true)
            }
            _ => {
                i += 1;
                (0, true)
            }
        };
        line += delta;
        if (addr..addr + len).contains(&u64::from(lasti)) {
            return if has_line {
                u32::try_from(line).ok()
            } else {
                None
            };
        }
        addr += len;
    }
    None
}

/// An unsigned varint of 6-bit chunks, bit 6 meaning "more follows".
fn varint(table: &[u8], i: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *table.get(*i)?;
        *i += 1;
        v |= u64::from(b & 63) << shift;
        if b & 64 == 0 {
            return Some(v);
        }
        shift += 6;
        if shift > 60 {
            return None;
        }
    }
}

/// A signed varint: the sign in the lowest bit.
fn svarint(table: &[u8], i: &mut usize) -> Option<i64> {
    let v = varint(table, i)?;
    let m = (v >> 1) as i64;
    Some(if v & 1 != 0 { -m } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `co_linetable` of this function, compiled by CPython 3.11.7:
    ///
    /// ```python
    /// def f(n):        # line 1
    ///     x = []
    ///     for i in range(n):
    ///         x.append(
    ///             str(i))
    ///     return x
    /// ```
    /// with its `co_positions()` lines, one per code unit (cache entries
    /// included).
    const TABLE: &[u8] = &[
        0x80, 0x00, 0xd8, 0x08, 0x0a, 0x80, 0x41, 0xdd, 0x0d, 0x12, 0x90, 0x31, 0x89, 0x58, 0x8c,
        0x58, 0xf0, 0x00, 0x02, 0x05, 0x14, 0xf0, 0x00, 0x02, 0x05, 0x14, 0x88, 0x01, 0xd8, 0x08,
        0x09, 0x8f, 0x08, 0x8a, 0x08, 0xdd, 0x0c, 0x0f, 0x90, 0x01, 0x89, 0x46, 0x8c, 0x46, 0xf1,
        0x03, 0x01, 0x09, 0x14, 0xf4, 0x00, 0x01, 0x09, 0x14, 0xf0, 0x00, 0x01, 0x09, 0x14, 0xf0,
        0x00, 0x01, 0x09, 0x14, 0xe0, 0x0b, 0x0c, 0x80, 0x48,
    ];
    const LINES: &[u32] = &[
        1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
        4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 6, 6,
    ];

    #[test]
    fn lines_of_every_instruction_match_cpythons() {
        let got: Vec<Option<u32>> = (0..LINES.len() as u32)
            .map(|i| line_of(TABLE, 1, i))
            .collect();
        let want: Vec<Option<u32>> = LINES.iter().map(|&l| Some(l)).collect();
        assert_eq!(got, want);
        assert_eq!(line_of(TABLE, 1, LINES.len() as u32), None);
        assert_eq!(line_of(TABLE, 7, u32::MAX), Some(7));
    }

    #[test]
    fn damaged_tables_give_no_line() {
        assert_eq!(line_of(&[0x00, 0x01], 1, 0), None);
        assert_eq!(line_of(&[0xf0], 1, 0), None);
        assert_eq!(line_of(&[], 1, 0), None);
    }

    #[test]
    fn varints_round_trip() {
        let mut i = 0;
        assert_eq!(varint(&[0x45, 0x02], &mut i), Some(5 | (2 << 6)));
        assert_eq!(i, 2);
        let mut i = 0;
        assert_eq!(svarint(&[0x03], &mut i), Some(-1));
        let mut i = 0;
        assert_eq!(varint(&[0x40], &mut i), None);
    }

    /// A `str` object of 3.11 as CPython lays it out: compact, ASCII or
    /// latin-1.
    fn str_object(text: &str) -> Vec<u8> {
        let ascii = text.is_ascii();
        let mut o = vec![0u8; if ascii { 48 } else { 72 }];
        o[16..24].copy_from_slice(&(text.chars().count() as u64).to_le_bytes());
        let state: u32 = (1 << 2) | (1 << 5) | if ascii { 1 << 6 } else { 0 };
        o[32..36].copy_from_slice(&state.to_le_bytes());
        o.extend(text.chars().map(|c| c as u32 as u8));
        o.push(0);
        o
    }

    /// A `PyCodeRecord` with these objects, the table cut to `table_len`
    /// bytes of its `bytes` object.
    fn record(name: &[u8], file: &[u8], table: &[u8], table_len: usize) -> Vec<u8> {
        let mut bytes_obj = vec![0u8; 32];
        bytes_obj[16..24].copy_from_slice(&(table.len() as u64).to_le_bytes());
        bytes_obj.extend(table);
        bytes_obj.push(0);
        let mut rec = PyCodeRecord {
            header: memtrace_common::Header {
                version: memtrace_common::EVENT_ABI,
                kind: memtrace_common::RecordKind::PyCode as u16,
                tgid: 7,
                tid: 7,
                sample_shift: 0,
                ts_ns: 0,
            },
            code: 0x7000,
            stamp: py_code_stamp(1, 0x9000),
            first_line: 1,
            name_addr: 0x8000,
            file_addr: 0x9000,
            table_addr: 0xa000,
            name_len: name.len() as u32,
            file_len: file.len() as u32,
            table_len: table_len.min(bytes_obj.len()) as u32,
            _pad: 0,
            name: [0; memtrace_common::PY_STR_COPY],
            file: [0; memtrace_common::PY_STR_COPY],
            table: [0; memtrace_common::PY_TABLE_COPY],
        };
        rec.name[..name.len()].copy_from_slice(name);
        rec.file[..file.len()].copy_from_slice(file);
        let n = rec.table_len as usize;
        rec.table[..n].copy_from_slice(&bytes_obj[..n]);
        // SAFETY: plain old data, read as bytes.
        let all = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const PyCodeRecord).cast::<u8>(),
                size_of::<PyCodeRecord>(),
            )
        };
        all[..PyCodeRecord::FIXED_LEN + n].to_vec()
    }

    #[test]
    fn a_copied_code_object_reads_as_the_live_one_would() {
        let layout = super::super::layout::for_version(3, 11).unwrap();
        let bytes = record(
            &str_object("make_key"),
            &str_object("/tmp/é.py"),
            TABLE,
            4096,
        );
        let c = Copied::parse(layout, &bytes).unwrap();
        assert_eq!(c.code, 0x7000);
        assert!(c.whole_table);
        assert_eq!(c.info.name, "make_key");
        assert_eq!(c.info.file, "/tmp/é.py");
        assert_eq!(c.info.first_line, 1);
        assert_eq!(c.info.stamp, py_code_stamp(1, 0x9000));
        assert_eq!(c.info.linetable, TABLE);
        assert_eq!(line_of(&c.info.linetable, 1, 20), Some(4));
    }

    #[test]
    fn a_cut_table_keeps_its_start_and_says_so() {
        let layout = super::super::layout::for_version(3, 11).unwrap();
        let bytes = record(&str_object("f"), &str_object("a.py"), TABLE, 32 + 10);
        let c = Copied::parse(layout, &bytes).unwrap();
        assert!(!c.whole_table);
        assert_eq!(c.info.linetable, &TABLE[..10]);
        assert_eq!(line_of(&c.info.linetable, 1, 0), Some(1));
        // A name cut short is no name: the copy is not used.
        let name = str_object("make_key");
        let bytes = record(&name[..name.len() - 4], &str_object("a.py"), TABLE, 4096);
        assert_eq!(Copied::parse(layout, &bytes), None);
    }

    #[test]
    fn stamps_tell_modules_apart() {
        // Two modules' bodies both start at line 1.
        assert_ne!(
            py_code_stamp(1, 0x7f00_1234_5670),
            py_code_stamp(1, 0x7f00_1234_9990)
        );
        assert_ne!(
            py_code_stamp(1, 0x7f00_1234_5670),
            py_code_stamp(2, 0x7f00_1234_5670)
        );
        assert_eq!(
            py_code_stamp(3, 0x1000) & !memtrace_common::PY_STAMP_MASK,
            0
        );
    }

    #[test]
    fn strings_of_each_width() {
        assert_eq!(decode_ucs(b"abc", 1).as_deref(), Some("abc"));
        assert_eq!(decode_ucs(&[0xe9, 0x00], 2).as_deref(), Some("é"));
        assert_eq!(
            decode_ucs(&[0x00, 0xf6, 0x01, 0x00], 4).as_deref(),
            Some("😀")
        );
    }
}
