//! Writes a recording as the session runs.
//!
//! Events are encoded as they arrive and written in blocks of about
//! [`BLOCK_TARGET`] bytes, or sooner when the session calls
//! [`Recorder::flush`] (once a second), which also writes what is needed to
//! read the events without the processes: names of new processes and the
//! frames of new stacks, symbolized now, while their files are still open
//! (kernel addresses once for all processes).
//! Each block goes out in one `write`, so a crash or a full disk cuts the
//! file at a block boundary or inside the last block, never earlier.
//!
//! Not here: deciding when to flush (the session) and reading (`reader`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::DeflateEncoder;

use super::events::{Encoder, stack_of};
use super::{
    BLOCK_HEADER_LEN, Counters, KERNEL_PID, KIND_EVENTS, KIND_META, MAGIC, Meta, RecFrame, Start,
    VERSION,
};
use crate::error::UserError;
use crate::event::Event;
use crate::symbolize::{Symbolize, is_kernel};

/// Encoded bytes of events that make a block.
pub const BLOCK_TARGET: usize = 1 << 20;

/// A recording being written.
pub struct Recorder {
    path: PathBuf,
    file: Option<File>,
    enc: Encoder,
    stack_ids: HashMap<(u32, Box<[u64]>), u32>,
    /// Stacks defined since the last flush, to symbolize.
    pending_stacks: Vec<(u32, Box<[u64]>)>,
    /// (pid, address) pairs already symbolized.
    symbolized: HashSet<(u32, u64)>,
    pids: HashSet<u32>,
    pending_pids: Vec<u32>,
    written: u64,
    events: u64,
    error: Option<std::io::Error>,
}

impl Recorder {
    /// Creates (or truncates) `path`, mode 0600, and writes the header and
    /// the [`Start`] block.
    pub fn create(path: &Path, start: Start) -> Result<Self, UserError> {
        let cannot = |e: std::io::Error| {
            UserError::new(
                format!("cannot write the recording {}: {e}", path.display()),
                "choose a writable path with free space",
            )
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(cannot)?;
        // `mode` applies only to a file created now; an existing one keeps
        // its permissions unless set here.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(cannot)?;
        let mut header = Vec::with_capacity(super::HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut rec = Self {
            path: path.to_path_buf(),
            file: Some(file),
            enc: Encoder::default(),
            stack_ids: HashMap::new(),
            pending_stacks: Vec::new(),
            symbolized: HashSet::new(),
            pids: HashSet::new(),
            pending_pids: Vec::new(),
            written: 0,
            events: 0,
            error: None,
        };
        rec.write_raw(&header);
        rec.meta(&Meta::Start(start));
        match rec.error.take() {
            Some(e) => Err(cannot(e)),
            None => Ok(rec),
        }
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Events recorded so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Appends an event. Returns whether it defined a new stack (of an
    /// allocation, a sampled fault, an address-space syscall or a kernel
    /// allocation: see [`stack_of`]), whose process the caller should
    /// snapshot for symbols now.
    pub fn record(&mut self, event: &Event) -> bool {
        if self.file.is_none() || matches!(event, Event::Loaded { .. }) {
            return false;
        }
        let pid = event.pid();
        // A process is named at its first event, and again after an exec
        // (a command started by memtrace is memtrace's fork until then).
        if self.pids.insert(pid) || matches!(event, Event::Exec { .. }) {
            self.pending_pids.push(pid);
        }
        let mut stack = 0;
        let mut new = false;
        if let Some(frames) = stack_of(event) {
            let key: (u32, Box<[u64]>) = (pid, frames.into());
            stack = match self.stack_ids.get(&key) {
                Some(&id) => id,
                None => {
                    let id = self.stack_ids.len() as u32;
                    self.enc.stack(pid, frames);
                    self.pending_stacks.push(key.clone());
                    self.stack_ids.insert(key, id);
                    new = true;
                    id
                }
            };
        }
        self.enc.event(event, stack);
        self.events += 1;
        if self.enc.len() >= BLOCK_TARGET {
            self.flush_events();
        }
        new
    }

    /// Writes buffered events, the names of new processes, the frames of
    /// new stacks, and `counters`. Returns the first write error, after
    /// which nothing more is written (the file stays readable up to its
    /// last complete block).
    pub fn flush(&mut self, sym: &mut dyn Symbolize, counters: &Counters) -> std::io::Result<()> {
        self.flush_events();
        for pid in std::mem::take(&mut self.pending_pids) {
            self.meta(&Meta::Process {
                pid,
                comm: sym.comm(pid),
            });
        }
        let mut by_pid: HashMap<u32, Vec<(u64, Vec<RecFrame>)>> = HashMap::new();
        for (pid, frames) in std::mem::take(&mut self.pending_stacks) {
            for &addr in frames.iter() {
                // A kernel address means the same in every process.
                let owner = if is_kernel(addr) { KERNEL_PID } else { pid };
                if self.symbolized.insert((owner, addr)) {
                    let resolved = sym.frames(pid, &[addr]);
                    by_pid
                        .entry(owner)
                        .or_default()
                        .push((addr, resolved.iter().map(RecFrame::from).collect()));
                }
            }
        }
        let mut pids: Vec<u32> = by_pid.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let addresses = by_pid.remove(&pid).unwrap_or_default();
            self.meta(&Meta::Symbols { pid, addresses });
        }
        self.meta(&Meta::Counters(counters.clone()));
        if let Some(f) = &self.file
            && let Err(e) = f.sync_data()
        {
            self.fail(e);
        }
        self.take_error()
    }

    /// Flushes, writes the end block and closes the file; returns the
    /// file's size.
    pub fn finish(
        mut self,
        sym: &mut dyn Symbolize,
        counters: &Counters,
        end_ns: u64,
        duration_s: f64,
    ) -> std::io::Result<u64> {
        self.flush(sym, counters)?;
        self.meta(&Meta::End {
            end_ns,
            duration_s,
            counters: counters.clone(),
        });
        if let Some(f) = &self.file
            && let Err(e) = f.sync_all()
        {
            self.fail(e);
        }
        self.take_error().map(|()| self.written)
    }

    /// Writes a [`Meta`] block (after the events buffered so far, so that
    /// order is kept).
    pub fn meta(&mut self, meta: &Meta) {
        self.flush_events();
        match serde_json::to_vec(meta) {
            Ok(json) => self.block(KIND_META, &json),
            Err(e) => self.fail(std::io::Error::other(e)),
        }
    }

    fn flush_events(&mut self) {
        if !self.enc.is_empty() {
            let content = self.enc.take();
            self.block(KIND_EVENTS, &content);
        }
    }

    fn block(&mut self, kind: u8, content: &[u8]) {
        // Fast compression: the session compresses on its own thread,
        // between ring-buffer reads, so speed matters more than the last
        // percent of size.
        let mut z = DeflateEncoder::new(Vec::with_capacity(content.len() / 2), Compression::fast());
        let body = match z.write_all(content).and_then(|()| z.finish()) {
            Ok(b) => b,
            Err(e) => return self.fail(e),
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(&body);
        let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.push(kind);
        out.extend_from_slice(&body);
        self.write_raw(&out);
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        let Some(f) = &mut self.file else { return };
        match f.write_all(bytes) {
            Ok(()) => self.written += bytes.len() as u64,
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        // Stop writing: a later, smaller block might fit where this one did
        // not, and a reader would take the torn block for the end anyway.
        self.file = None;
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn take_error(&mut self) -> std::io::Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
