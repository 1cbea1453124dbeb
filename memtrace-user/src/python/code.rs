//! Code objects → function, file and line.
//!
//! A code object is read once from the process's memory (through
//! `/proc/PID/mem`): its qualified name, file name, first line and line
//! table. [`line_of`] then maps an instruction index to its line with the
//! table alone, as `PyCode_Addr2Line` does. The parsers are pure and
//! unit-tested on bytes CPython itself produced; only [`Memory`] touches
//! `/proc`.

use std::fs::File;
use std::os::unix::fs::FileExt;

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
    /// `co_linetable`.
    pub linetable: Vec<u8>,
}

/// Longest string or line table read from a process: past this, the
/// object is taken for garbage (a code object freed and its memory reused).
const MAX_READ: u64 = 1 << 20;

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

    fn bytes(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        if len > MAX_READ {
            return None;
        }
        let mut buf = vec![0; len as usize];
        self.file.read_exact_at(&mut buf, addr).ok()?;
        Some(buf)
    }

    fn u64(&self, addr: u64) -> Option<u64> {
        let b = self.bytes(addr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn u32(&self, addr: u64) -> Option<u32> {
        let b = self.bytes(addr, 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// A `str` object's text: compact strings only (every string the
    /// compiler makes for names and file names is compact).
    fn string(&self, layout: &Layout, obj: u64) -> Option<String> {
        let len = self.u64(obj + layout.str_length)?;
        let state = self.u32(obj + layout.str_state)?;
        let kind = (state >> 2) & 7;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        if !compact {
            return None;
        }
        if ascii {
            let b = self.bytes(obj + layout.str_ascii_data, len)?;
            return String::from_utf8(b).ok();
        }
        let width = match kind {
            1 | 2 | 4 => u64::from(kind),
            _ => return None,
        };
        let b = self.bytes(obj + layout.str_compact_data, len.checked_mul(width)?)?;
        decode_ucs(&b, width as usize)
    }

    /// A code object, by its address.
    pub fn code(&self, layout: &Layout, code: u64) -> Option<CodeInfo> {
        let name = self.string(layout, self.u64(code + layout.code_qualname)?)?;
        let file = self.string(layout, self.u64(code + layout.code_filename)?)?;
        let first_line = self.u32(code + u64::from(layout.walk.code_firstlineno))?;
        let table = self.u64(code + layout.code_linetable)?;
        let len = self.u64(table + layout.bytes_size)?;
        let linetable = self.bytes(table + layout.bytes_data, len)?;
        Some(CodeInfo {
            name,
            file,
            first_line,
            linetable,
        })
    }
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
