//! The ground truth: what each fixture function allocates, derived from the
//! loops in `fixtures/`. Keep these in step with the fixture sources.
//!
//! memtrace reports requested sizes (not glibc's rounded chunk sizes), counts
//! a `realloc` that moves or resizes a block as a free of the old block plus
//! an allocation of the new one, `realloc(p, 0)` as a free only, and a failed
//! (NULL) allocation not at all.

use crate::report::{Site, Totals};

/// `count` blocks of `size` bytes, all still live.
const fn leaked(count: u64, size: u64) -> Site {
    Site {
        live_bytes: count * size,
        live_count: count,
        total_bytes: count * size,
        total_count: count,
    }
}

/// Blocks totalling `bytes` in `count` allocations, all freed again.
const fn freed(count: u64, bytes: u64) -> Site {
    Site {
        live_bytes: 0,
        live_count: 0,
        total_bytes: bytes,
        total_count: count,
    }
}

/// Whole-process numbers of a process whose only allocations are `sites`,
/// each done `workers` times: every allocation is either still live or freed.
pub fn totals_of(sites: &[(&str, Site)], workers: u64) -> Totals {
    let mut t = Totals::default();
    for (_, site) in sites {
        let site = site.times(workers);
        t.live_bytes += site.live_bytes;
        t.live_count += site.live_count;
        t.total_bytes += site.total_bytes;
        t.total_count += site.total_count;
    }
    t.freed_bytes = t.total_bytes - t.live_bytes;
    t.freed_count = t.total_count - t.live_count;
    t
}

/// `fixtures/alloc_fixture.c`, per worker (the main thread, or each of
/// `--threads N`).
pub mod c {
    use super::*;

    pub const LEAK_MALLOC: Site = leaked(10, 1000);
    pub const LEAK_CALLOC: Site = leaked(7, 3 * 333);
    /// 4 × { realloc(NULL, 300) → realloc(p, 4000) }: the 300-byte blocks
    /// are freed by the second realloc, the 4000-byte ones stay.
    pub const LEAK_REALLOC: Site = Site {
        live_bytes: 4 * 4000,
        live_count: 4,
        total_bytes: 4 * (300 + 4000),
        total_count: 8,
    };
    pub const LEAK_REALLOCARRAY: Site = leaked(3, 25 * 40);
    pub const LEAK_POSIX_MEMALIGN: Site = leaked(6, 2000);
    pub const LEAK_ALIGNED_ALLOC: Site = leaked(5, 1024);
    pub const LEAK_MEMALIGN: Site = leaked(3, 700);
    pub const LEAK_VALLOC: Site = leaked(2, 5000);
    /// Requested size, not the page-rounded 8192 glibc hands out.
    pub const LEAK_PVALLOC: Site = leaked(2, 5000);
    pub const LEAK_BIG: Site = leaked(2, 1 << 20);
    /// 1000 × { malloc(128), calloc(4, 64), realloc(a, 512), malloc(32) };
    /// everything freed (the last by realloc(d, 0)).
    pub const CHURN: Site = freed(1000 * 4, 1000 * (128 + 4 * 64 + 512 + 32));
    /// `churn` under an allocator whose `realloc(p, 0)` frees `p` and
    /// returns a new zero-byte block (mimalloc), where glibc's returns NULL:
    /// 1000 more allocations, of 0 bytes, each left live.
    pub const CHURN_REALLOC_ZERO_ALLOCATES: Site = Site {
        live_bytes: 0,
        live_count: 1000,
        total_bytes: CHURN.total_bytes,
        total_count: CHURN.total_count + 1000,
    };
    /// The control: 50 × malloc(2048) + free.
    pub const NO_LEAK: Site = freed(50, 50 * 2048);
    /// malloc(SIZE_MAX) returns NULL: nothing to report.
    pub const FAIL_ALLOC: Site = Site {
        live_bytes: 0,
        live_count: 0,
        total_bytes: 0,
        total_count: 0,
    };

    pub const SITES: &[(&str, Site)] = &[
        ("leak_malloc", LEAK_MALLOC),
        ("leak_calloc", LEAK_CALLOC),
        ("leak_realloc", LEAK_REALLOC),
        ("leak_reallocarray", LEAK_REALLOCARRAY),
        ("leak_posix_memalign", LEAK_POSIX_MEMALIGN),
        ("leak_aligned_alloc", LEAK_ALIGNED_ALLOC),
        ("leak_memalign", LEAK_MEMALIGN),
        ("leak_valloc", LEAK_VALLOC),
        ("leak_pvalloc", LEAK_PVALLOC),
        ("leak_big", LEAK_BIG),
        ("churn", CHURN),
        ("no_leak", NO_LEAK),
        ("fail_alloc", FAIL_ALLOC),
    ];
}

/// `fixtures/cxx_fixture.cpp`.
pub mod cxx {
    use super::*;

    /// `sizeof(Widget)`: `struct Widget { char data[48]; }`.
    pub const WIDGET: u64 = 48;

    pub const LEAK_NEW: Site = leaked(10, WIDGET);
    pub const LEAK_NEW_ARRAY: Site = leaked(5, 1000);
    pub const LEAK_NEW_NOTHROW: Site = leaked(4, 256);
    /// 1000 × { new Widget; delete; new int[100]; delete[] }.
    pub const CHURN_NEW_DELETE: Site = freed(1000 * 2, 1000 * (WIDGET + 100 * 4));
    /// 20 × a scoped `std::vector<int>(1000)`.
    pub const NO_LEAK_VECTOR: Site = freed(20, 20 * 1000 * 4);

    pub const SITES: &[(&str, Site)] = &[
        ("leak_new", LEAK_NEW),
        ("leak_new_array", LEAK_NEW_ARRAY),
        ("leak_new_nothrow", LEAK_NEW_NOTHROW),
        ("churn_new_delete", CHURN_NEW_DELETE),
        ("no_leak_vector", NO_LEAK_VECTOR),
    ];
}

/// `fixtures/nofp_fixture.cpp` (-O2, no frame pointers): `leak_leaf`
/// allocates for three callers, one of them through glibc's `pthread_once`.
pub mod nofp {
    use super::*;

    pub const CALLER_A: Site = leaked(6, 1000);
    pub const CALLER_B: Site = leaked(4, 3000);
    /// `once_body`, called by `pthread_once` in libc.
    pub const CALLER_VIA_LIBC: Site = leaked(3, 500);
    pub const LEAK_LEAF: Site = Site {
        live_bytes: 6 * 1000 + 4 * 3000 + 3 * 500,
        live_count: 6 + 4 + 3,
        total_bytes: 6 * 1000 + 4 * 3000 + 3 * 500,
        total_count: 6 + 4 + 3,
    };
    /// 100 × { malloc(64); free }.
    pub const CHURN_CALLER: Site = freed(100, 100 * 64);

    pub const SITES: &[(&str, Site)] = &[
        ("leak_leaf", LEAK_LEAF),
        ("caller_a", CALLER_A),
        ("caller_b", CALLER_B),
        ("once_body", CALLER_VIA_LIBC),
        ("caller_via_libc", CALLER_VIA_LIBC),
        ("churn_leaf", CHURN_CALLER),
        ("churn_caller", CHURN_CALLER),
    ];
}

/// `fixtures/rust_fixture.rs`.
pub mod rust {
    use super::*;

    pub const LEAK_BOX: Site = leaked(10, 4096);
    /// 5 × `Vec::<u64>::with_capacity(1000)`, forgotten.
    pub const LEAK_VEC: Site = leaked(5, 1000 * 8);
    /// 1000 × `Vec::<u32>::with_capacity(16)`, dropped.
    pub const CHURN: Site = freed(1000, 1000 * 16 * 4);
    /// 50 × `vec![1u8; 2048]`, dropped.
    pub const NO_LEAK: Site = freed(50, 50 * 2048);

    pub const SITES: &[(&str, Site)] = &[
        ("leak_box", LEAK_BOX),
        ("leak_vec", LEAK_VEC),
        ("churn", CHURN),
        ("no_leak", NO_LEAK),
    ];
}

/// `fixtures/threads_fixture.c`: per thread, one block kept and one freed at
/// once, each from its own function (`assert_sites` with the thread count as
/// the workers).
pub mod threads {
    use super::*;

    /// Threads the fixture starts by default (in waves of 100): more over
    /// the run than memtrace's in-flight table holds (16,384).
    pub const THREADS: u64 = 20_000;
    /// One malloc(100) per thread, kept.
    pub const THREAD_LEAK: Site = leaked(1, 100);
    /// One malloc(200) per thread, freed at once.
    pub const THREAD_CHURN: Site = freed(1, 200);

    pub const SITES: &[(&str, Site)] =
        &[("thread_leak", THREAD_LEAK), ("thread_churn", THREAD_CHURN)];
}

/// `fixtures/fork_fixture.c`: the parent's sites, and each child's.
pub mod forks {
    use super::*;

    /// Children forked (without `--exec`).
    pub const CHILDREN: u64 = 3;
    /// 4 × malloc(1000) before the forks, kept.
    pub const PARENT_KEEP: Site = leaked(4, 1000);
    /// 2 × malloc(3000) after the children are done, kept.
    pub const PARENT_AFTER: Site = leaked(2, 3000);
    pub const PARENT_SITES: &[(&str, Site)] =
        &[("parent_keep", PARENT_KEEP), ("parent_after", PARENT_AFTER)];

    /// Child `i`: i + 1 blocks of 2000 + i bytes, kept. Its one free is of
    /// a block its parent allocated before the fork.
    pub const fn child_work(i: u64) -> Site {
        leaked(i + 1, 2000 + i)
    }
}

/// `fixtures/phases_fixture.c`. Without `--churn` it runs, in order,
/// temporaries, build_table, a 30 ms sleep, drop_table and keep_small, and
/// allocates nothing else (the fixture protocol does not allocate either).
pub mod phases {
    use super::*;

    /// 500 × malloc(256), each freed at once.
    pub const TEMPORARIES: Site = freed(500, 500 * 256);
    /// Blocks of the table: built by build_table, freed by drop_table.
    pub const TABLE_BLOCKS: u64 = 64;
    /// Bytes of each table block.
    pub const TABLE_BLOCK_SIZE: u64 = 65536;
    /// 64 × malloc(65536), all freed again by drop_table.
    pub const BUILD_TABLE: Site = freed(TABLE_BLOCKS, TABLE_BLOCKS * TABLE_BLOCK_SIZE);
    /// build_table at the peak: the whole table is live.
    pub const BUILD_TABLE_AT_PEAK: Site = leaked(TABLE_BLOCKS, TABLE_BLOCK_SIZE);
    /// 10 × malloc(1000), kept to the end.
    pub const KEEP_SMALL: Site = leaked(10, 1000);
    /// The sleep between build_table and drop_table (`pause_ms(30)`): every
    /// table block lives at least this long.
    pub const TABLE_SLEEP_NS: u64 = 30_000_000;
    /// The high-water mark of live bytes, reached by build_table's last
    /// malloc: the whole table, and nothing else (every temporary is freed
    /// before it, keep_small comes after drop_table).
    pub const PEAK_BYTES: u64 = BUILD_TABLE_AT_PEAK.live_bytes;
    /// Blocks live at the peak.
    pub const PEAK_COUNT: u64 = BUILD_TABLE_AT_PEAK.live_count;

    pub const SITES: &[(&str, Site)] = &[
        ("temporaries", TEMPORARIES),
        ("build_table", BUILD_TABLE),
        ("keep_small", KEEP_SMALL),
    ];

    /// The churn site of `--churn n`: n × malloc(16 + (i * 37) % 4081) for
    /// i in 0..n, each freed at once.
    pub const fn churn(n: u64) -> Site {
        let mut bytes = 0;
        let mut i = 0;
        while i < n {
            bytes += 16 + (i * 37) % 4081;
            i += 1;
        }
        freed(n, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The brief's numbers, spelled out, as a check on the arithmetic above.
    #[test]
    fn c_numbers_match_the_spec() {
        assert_eq!(c::LEAK_CALLOC.live_bytes, 6993);
        assert_eq!(c::LEAK_REALLOC.total_bytes, 17200);
        assert_eq!(c::CHURN.total_bytes, 928_000);
        assert_eq!(c::CHURN.total_count, 4000);
        assert_eq!(c::LEAK_BIG.live_bytes, 2_097_152);
        let t = totals_of(c::SITES, 1);
        assert_eq!(t.freed_count, 4 + 4000 + 50);
        assert_eq!(t.freed_bytes, 1200 + 928_000 + 102_400);
    }

    #[test]
    fn cxx_and_rust_numbers_match_the_spec() {
        assert_eq!(cxx::CHURN_NEW_DELETE.total_bytes, 448_000);
        assert_eq!(cxx::NO_LEAK_VECTOR.total_bytes, 80_000);
        assert_eq!(rust::LEAK_BOX.live_bytes, 40_960);
        assert_eq!(rust::LEAK_VEC.live_bytes, 40_000);
        assert_eq!(rust::CHURN.total_bytes, 64_000);
    }

    #[test]
    fn phases_numbers_match_the_fixture() {
        assert_eq!(phases::TEMPORARIES.total_bytes, 128_000);
        assert_eq!(phases::BUILD_TABLE.total_bytes, 4_194_304);
        assert_eq!(phases::PEAK_BYTES, 4 << 20);
        assert_eq!(phases::KEEP_SMALL.live_bytes, 10_000);
        // i = 0, 1, 2: 16, 16 + 37, 16 + 74.
        assert_eq!(phases::churn(3).total_bytes, 159);
        // (i * 37) % 4081 wraps at i = 111: 16 + 4107 % 4081 = 42.
        assert_eq!(
            phases::churn(112).total_bytes - phases::churn(111).total_bytes,
            42
        );
        let t = totals_of(phases::SITES, 1);
        assert_eq!((t.total_count, t.live_count), (574, 10));
    }
}

/// `fixtures/mem_fixture.c` and `fixtures/py_fixture.py`: resident memory
/// (RSS) as opposed to allocated bytes. Each C mode's steps are siblings
/// called from `main`, in the order listed; the Python steps are called from
/// the script's `main()`.
pub mod resident {
    /// The page size the fixtures step by.
    pub const PAGE: u64 = 4096;
    /// One MiB, the unit of `hog` and of the Python sizes.
    pub const MIB: u64 = 1 << 20;

    // ---- mem_fixture calloc-touch ----

    /// `untouched_calloc`: one `calloc(1, CALLOC_BYTES)`, never freed.
    /// glibc serves it from a fresh mmap, so calloc writes none of it.
    pub const CALLOC_BYTES: u64 = 1 << 30;
    /// `touch_tenth` writes one byte in each of the block's first pages:
    /// 10% of it, rounded down to whole pages ((1 GiB / 10) / 4096).
    pub const TOUCHED_PAGES: u64 = CALLOC_BYTES / 10 / PAGE;
    /// Resident bytes `touch_tenth` adds (anonymous): 107,372,544, not the
    /// 1 GiB allocated. The block starts 16 bytes into its first page (the
    /// mmap'd chunk's header), so byte `i * PAGE` of it is in page i.
    pub const TOUCHED_BYTES: u64 = TOUCHED_PAGES * PAGE;
    pub const UNTOUCHED_CALLOC: &str = "untouched_calloc";
    pub const TOUCH_TENTH: &str = "touch_tenth";

    // ---- mem_fixture retain ----

    /// `fill_heap`: this many `malloc(RETAIN_SIZE)`, each memset.
    pub const RETAIN_BLOCKS: u64 = 100_000;
    pub const RETAIN_SIZE: u64 = 1000;
    /// glibc's chunk for a 1000-byte request (1000 + 8 rounded up to 16):
    /// the heap grows by this much per block.
    pub const RETAIN_CHUNK: u64 = 1008;
    /// `free_most` frees every block but the last one allocated, which sits
    /// at the top of the brk heap, so glibc cannot trim and the freed
    /// memory stays resident. Live allocated bytes after it: one block.
    pub const RETAIN_LIVE_BYTES: u64 = RETAIN_SIZE;
    pub const RETAIN_LIVE_COUNT: u64 = 1;
    /// Bytes freed by `free_most`.
    pub const RETAIN_FREED_BYTES: u64 = (RETAIN_BLOCKS - 1) * RETAIN_SIZE;
    /// Anonymous resident bytes the heap keeps after `free_most`: every
    /// chunk ever carved, 100,800,000 (about 96 MiB); measured RssAnon
    /// growth is 98,440 kB (this plus the page the heap's top sits in).
    pub const RETAIN_HEAP_RESIDENT: u64 = RETAIN_BLOCKS * RETAIN_CHUNK;
    pub const FILL_HEAP: &str = "fill_heap";
    pub const FREE_MOST: &str = "free_most";

    // ---- mem_fixture filemap PATH SIZE ----

    /// A SIZE for `filemap` (a whole number of pages). `map_file` writes
    /// SIZE bytes of non-zero data to PATH and maps all of it `PROT_READ,
    /// MAP_PRIVATE`; `read_mapping` reads one byte per page. File-backed RSS
    /// (RssFile) grows by SIZE rounded up to whole pages, anonymous RSS does
    /// not grow (the 1 MiB write buffer is filled before "ready"), and
    /// nothing is malloc'd.
    pub const FILEMAP_SIZE: u64 = 64 * MIB;
    pub const MAP_FILE: &str = "map_file";
    pub const READ_MAPPING: &str = "read_mapping";

    // ---- mem_fixture pipes N ----

    /// `fill_pipes` writes exactly this much into each of the N pipes that
    /// `make_pipes` made: one page of pipe buffer per pipe, allocated by
    /// the kernel in pipe_write and charged to the process's memory cgroup
    /// (kernel memory: it is in no RSS counter).
    pub const PIPE_BYTES: u64 = 4096;
    /// A pipe count for `pipes N`: 1000 pipes, so `fill_pipes` makes the
    /// kernel allocate 1000 pages (4,096,000 bytes); the slab objects of the
    /// pipes and their files, from `make_pipes`, come on top. The fixture
    /// raises its open-files limit to the hard one (2 descriptors a pipe).
    pub const PIPES: u64 = 1000;
    pub const MAKE_PIPES: &str = "make_pipes";
    pub const FILL_PIPES: &str = "fill_pipes";

    // ---- mem_fixture hog MIB ----

    /// `hog` mallocs and memsets this much per step, MIB steps, all kept.
    pub const HOG_STEP: u64 = MIB;
    pub const HOG: &str = "hog";
    /// The line `hog` prints (before "done") if it was not OOM-killed.
    pub const HOG_SURVIVED: &str = "survived";

    // ---- py_fixture.py ----

    /// `make_untouched`: `bytes(512 MiB)`. CPython allocates it with calloc
    /// (fresh mmap, never written): allocated, not resident.
    pub const PY_UNTOUCHED: u64 = 512 * MIB;
    /// `make_touched`: `bytearray(64 MiB)`, zero-filled with memset:
    /// allocated and resident.
    pub const PY_TOUCHED: u64 = 64 * MIB;
    /// `make_list`: `[i for i in range(PY_LIST_LEN)]`, resident: 8 bytes of
    /// pointer per item (plus the list's over-allocation) and a 32-byte int
    /// object for each item above 256 (smaller ints are cached), about
    /// 40 MB in all. Measured RssAnon growth of the whole work with
    /// CPython 3.11: 104,852 kB (64 MiB + the list), not the 576 MiB
    /// allocated.
    pub const PY_LIST_LEN: u64 = 1_000_000;
    pub const MAKE_UNTOUCHED: &str = "make_untouched";
    pub const MAKE_TOUCHED: &str = "make_touched";
    pub const MAKE_LIST: &str = "make_list";
}

/// `fixtures/py_frames.py` (and the module it imports), per Python line (the lines marked `# site:`).
/// Sizes are what CPython asks its allocator for: `bytearray(n)` asks for
/// `n + 1` bytes (`PyObject_Realloc(NULL, n + 1)`, which `malloc` serves
/// past 512 bytes); an 8-character ASCII `str` for 57 (a 48-byte header,
/// the characters, a NUL).
pub mod python {
    use super::{Site, freed, leaked};

    /// `bytearray(1 MiB)`, 20 kept.
    pub const BYTEARRAYS: Site = leaked(20, (1 << 20) + 1);
    /// `bytearray(100000)`, 1,000 freed at once.
    pub const CHURN: Site = freed(1000, 1000 * 100_001);
    /// `bytearray(200000)` in the key function `sorted` calls, 10 kept.
    pub const KEY: Site = leaked(10, 200_001);
    /// `bytearray(300000)` in the body of `py_frames_module.py`, kept.
    pub const MODULE: Site = leaked(1, 300_001);
    /// 100,000 strings of 8 characters, kept (`--python-allocators`; the
    /// totals also count the temporaries of formatting them).
    pub const STRINGS: Site = leaked(100_000, 57);
}

/// `agent_fixture sample` (fixtures/agent_fixture.c): one stack per
/// function, each called once from main.
pub mod agent {
    use super::{Site, freed, leaked};

    pub const MANY_SMALL: Site = leaked(400_000, 64);
    /// 14,000 blocks of 1000 + (i % 7) * 500 bytes: 2,000 of each size.
    pub const MIXED_SIZES: Site = Site {
        live_bytes: 35_000_000,
        live_count: 14_000,
        total_bytes: 35_000_000,
        total_count: 14_000,
    };
    pub const FEW_LARGE: Site = leaked(24, 1 << 20);
    pub const CHURN_SMALL: Site = freed(1_000_000, 100_000_000);
    pub const A_LITTLE: Site = leaked(100, 1000);

    pub const SITES: &[(&str, Site)] = &[
        ("many_small", MANY_SMALL),
        ("mixed_sizes", MIXED_SIZES),
        ("few_large", FEW_LARGE),
        ("churn_small", CHURN_SMALL),
        ("a_little", A_LITTLE),
    ];
}
