//! Fresh paths in the temp directory for the files a test makes (reports,
//! recordings, mount points), named `memtrace-test-<pid>-<n>-<name>` so that
//! tests running side by side, or a second run of the suite, never share one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A path that no other test of this process uses: `name` says what it is
/// for (and gives the file its extension).
pub fn fresh_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("memtrace-test-{}-{n}-{name}", std::process::id()))
}

/// A [`fresh_path`] whose file or directory is removed when this is
/// dropped, so a failing test cleans up too. Nothing is created here.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
}

impl TempPath {
    /// A fresh path; see [`fresh_path`].
    pub fn new(name: &str) -> TempPath {
        TempPath {
            path: fresh_path(name),
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside this path (which the test made a directory).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for TempPath {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.path.is_dir() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
