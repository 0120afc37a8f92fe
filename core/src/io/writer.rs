//! Streaming safetensors output: the header is written first (every size is
//! known from the plan), then each tensor's bytes as they are produced, so a
//! merge never holds the whole output in memory. A model directory is
//! written under a temporary name and renamed only when complete.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::checkpoint::is_plain_file_name;
use super::fault;
use super::{INDEX_FILE, SINGLE_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};

/// Header alignment of the safetensors format: the JSON is padded with
/// spaces so tensor data starts at a multiple of 8 bytes.
const ALIGNMENT: usize = 8;

/// The largest header readers accept (see the `safetensors` crate).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Buffer of the file writers: large writes pass through, small ones batch.
const BUFFER_BYTES: usize = 1 << 20;

/// A file being written. Every output file goes through it, so that the
/// simulated faults of [`fault`] reach every write the tests exercise.
#[derive(Debug)]
struct Sink {
    file: File,
    budget: Option<fault::Budget>,
    /// Bytes written so far, and up to where writeback was started.
    written: u64,
    writeback_started: u64,
}

/// Writeback of a file being written is started every this many bytes, so
/// the disk works while the merge computes and the final fsync is short.
const WRITEBACK_BYTES: u64 = 64 << 20;

impl Sink {
    /// Creates (or truncates) `path`.
    fn create(path: &Path) -> io::Result<Sink> {
        Ok(Sink {
            file: File::create(path)?,
            budget: fault::write_budget(path),
            written: 0,
            writeback_started: 0,
        })
    }

    /// Flushes the data of `path` (this sink's file) to the disk.
    fn sync(&self, path: &Path) -> io::Result<()> {
        sync_handle(&self.file, path)
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &self.budget {
            None => self.file.write(buf)?,
            Some(budget) => {
                let allowed = budget.take(buf.len())?;
                self.file.write(&buf[..allowed])?
            }
        };
        self.written += n as u64;
        if self.written - self.writeback_started >= WRITEBACK_BYTES {
            start_writeback(&self.file, self.writeback_started, self.written);
            self.writeback_started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Asks the kernel to start writing bytes `[from, to)` of `file` to the
/// disk without waiting (Linux `sync_file_range`); advisory, so errors are
/// left to the final fsync, which reports them.
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a file descriptor we own.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

/// fsync of an open file (or directory) `path`.
fn sync_handle(file: &File, path: &Path) -> io::Result<()> {
    match fault::sync_error(path) {
        Some(e) => Err(e),
        None => file.sync_all(),
    }
}

/// `std::fs::rename`, subject to simulated faults.
fn rename(from: &Path, to: &Path) -> io::Result<()> {
    match fault::rename_error(to) {
        Some(e) => Err(e),
        None => std::fs::rename(from, to),
    }
}

/// Name, dtype and shape of a tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTensor {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl OutputTensor {
    /// A tensor called `name` of `dtype` and `shape`.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        OutputTensor {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Bytes of data, or `None` if the size overflows a `u64`.
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
            .and_then(|n| n.checked_mul(self.dtype.size() as u64))
    }
}

/// Checks names (unique, not `__metadata__`) and sizes; returns each
/// tensor's byte count. Errors name `file` and the tensor.
fn checked_sizes(file: &Path, tensors: &[OutputTensor]) -> Result<Vec<u64>> {
    let err = |msg: &str, name: &str| {
        Error::new(ErrorKind::InvalidInput, msg)
            .with_file(file)
            .with_tensor(name)
    };
    let mut seen = BTreeSet::new();
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(err("`__metadata__` is reserved by safetensors", &t.name));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(err("the tensor is declared twice", &t.name));
        }
        sizes.push(
            t.nbytes()
                .ok_or_else(|| err("the tensor's byte size overflows", &t.name))?,
        );
    }
    Ok(sizes)
}

/// The header bytes: 8-byte little-endian length, then the JSON padded with
/// spaces to a multiple of 8 (as the reference writer does).
fn header_bytes(
    file: &Path,
    tensors: &[OutputTensor],
    sizes: &[u64],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    // JSON is assembled by hand so that tensors keep the declared order
    // (serde_json's map would sort them); every string goes through
    // serde_json for escaping.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&quote(k));
            json.push(':');
            json.push_str(&quote(v));
        }
        json.push('}');
    }
    let mut offset = 0u64;
    for (i, (t, &size)) in tensors.iter().zip(sizes).enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        let end = offset.checked_add(size).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "the file's total size overflows")
                .with_file(file)
                .with_tensor(&t.name)
        })?;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            quote(&t.name),
            t.dtype.as_str(),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while json.len() % ALIGNMENT != 0 {
        json.push(' ');
    }
    if json.len() > MAX_HEADER_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the header would have {} bytes, over the 100 MB that readers accept: write more, smaller shards",
                json.len()
            ),
        )
        .with_file(file));
    }
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    Ok(bytes)
}

/// Writes one safetensors file: the header at [`create`](Self::create),
/// then each tensor's bytes in the declared order.
///
/// The file is written in place; an unfinished file is incomplete and
/// invalid. Use [`write_atomically`] or [`ShardedWriter`] to publish only
/// complete files.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<Sink>,
    /// Declared tensors: name and byte size.
    tensors: Vec<(String, u64)>,
    next: usize,
    /// Set by a failed write: the file's contents are then unknown.
    failed: bool,
}

impl SafetensorsWriter {
    /// Creates (or truncates) `path` and writes the header declaring
    /// `tensors` in this order, with `metadata` as `__metadata__` (omitted
    /// when empty). Errors if a name repeats, is `__metadata__`, or a size
    /// overflows.
    pub fn create(
        path: &Path,
        tensors: &[OutputTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let sizes = checked_sizes(path, tensors)?;
        let header = header_bytes(path, tensors, &sizes, metadata)?;
        let file = Sink::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = BufWriter::with_capacity(BUFFER_BYTES, file);
        out.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            out,
            tensors: tensors.iter().map(|t| t.name.clone()).zip(sizes).collect(),
            next: 0,
            failed: false,
        })
    }

    /// Appends the little-endian bytes of tensor `name`, which must be the
    /// next declared tensor and have exactly its byte size.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let err = |msg: String| {
            Error::new(ErrorKind::InvalidInput, msg)
                .with_file(&self.path)
                .with_tensor(name)
        };
        if self.failed {
            return Err(err("an earlier write to this file failed".into()));
        }
        let Some((expected, size)) = self.tensors.get(self.next) else {
            return Err(err(format!(
                "all {} declared tensors are already written",
                self.tensors.len()
            )));
        };
        if expected != name {
            return Err(err(format!(
                "written out of order: the next declared tensor is `{expected}`"
            )));
        }
        if data.len() as u64 != *size {
            return Err(err(format!(
                "{} bytes given, but the header declares {size}",
                data.len()
            )));
        }
        if let Err(e) = self.out.write_all(data) {
            self.failed = true;
            return Err(Error::io(&self.path, e).with_tensor(name));
        }
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes and fsyncs.
    pub fn finish(self) -> Result<()> {
        if let Some((missing, _)) = self.tensors.get(self.next) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "finished after {} of {} tensors: this one and any after it were not written",
                    self.next,
                    self.tensors.len()
                ),
            )
            .with_file(&self.path)
            .with_tensor(missing.as_str()));
        }
        if self.failed {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "an earlier write to this file failed",
            )
            .with_file(&self.path));
        }
        let path = self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync(&path).map_err(|e| Error::io(&path, e))
    }
}

/// One output shard: its file name, its tensors (in order) and their total
/// bytes of data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// File name inside the output directory.
    pub file_name: String,
    /// Tensors of this shard, in the order they are written.
    pub tensors: Vec<OutputTensor>,
    /// Total bytes of tensor data.
    pub bytes: u64,
}

/// Writes a model directory (one `model.safetensors`, or Hugging Face
/// shards with `model.safetensors.index.json`, plus any extra files) under
/// a temporary name beside the destination, and renames it into place at
/// [`finish`](Self::finish). Dropped unfinished, it removes the temporary
/// directory: a failed or cancelled merge leaves nothing behind.
///
/// While it lives it holds the output's lock (`<parent>/.<name>.lock`), so
/// a second writer of the same output fails at once with
/// [`ErrorKind::OutputExists`] instead of racing the first one.
#[derive(Debug)]
pub struct ShardedWriter {
    out_dir: PathBuf,
    temp_dir: PathBuf,
    force: bool,
    metadata: BTreeMap<String, String>,
    shards: Vec<ShardPlan>,
    /// The open shard, `shards[shard]`, once its first tensor is written.
    current: Option<SafetensorsWriter>,
    shard: usize,
    written_in_shard: usize,
    /// File names taken in the directory (shards, index, extra files).
    taken: BTreeSet<String>,
    finished: bool,
    /// Declared last: dropped (released) only after `Drop` has removed the
    /// temporary directory.
    _lock: OutputLock,
}

impl ShardedWriter {
    /// Splits `tensors` (kept in the given order) into shards of at most
    /// `max_shard_bytes` of tensor data; a single tensor larger than that
    /// gets a shard of its own, and `None` means one file. One shard is
    /// named `model.safetensors`; several are named
    /// `model-00001-of-0000N.safetensors`, as Hugging Face does. No tensors
    /// give one empty shard, so the output is always a loadable model.
    pub fn plan_shards(tensors: &[OutputTensor], max_shard_bytes: Option<u64>) -> Vec<ShardPlan> {
        let mut plans: Vec<ShardPlan> = Vec::new();
        let mut current = ShardPlan {
            file_name: String::new(),
            tensors: Vec::new(),
            bytes: 0,
        };
        for t in tensors {
            // Saturating: `create` rejects overflowing sizes before planning.
            let size = t.nbytes().unwrap_or(u64::MAX);
            let fits = match max_shard_bytes {
                None => true,
                Some(max) => current.bytes.saturating_add(size) <= max,
            };
            if !fits && !current.tensors.is_empty() {
                plans.push(std::mem::replace(
                    &mut current,
                    ShardPlan {
                        file_name: String::new(),
                        tensors: Vec::new(),
                        bytes: 0,
                    },
                ));
            }
            current.bytes = current.bytes.saturating_add(size);
            current.tensors.push(t.clone());
        }
        plans.push(current);
        let n = plans.len();
        for (i, plan) in plans.iter_mut().enumerate() {
            plan.file_name = if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
        }
        plans
    }

    /// Prepares to write the model directory `out_dir`: creates its parent
    /// if needed, takes the output's lock and creates the temporary
    /// directory `<parent>/.<name>.tmp-<pid>-<nanos>/`.
    ///
    /// If another writer (in this or another process) holds the lock, this
    /// is [`ErrorKind::OutputExists`] naming the lock file. If `out_dir`
    /// exists, this is [`ErrorKind::OutputExists`] unless `force`; with
    /// `force` the old directory is replaced only at
    /// [`finish`](Self::finish), never before. As a guard against a
    /// mistyped path, `force` replaces only a directory that is empty or
    /// holds a model (`model.safetensors`, `model.safetensors.index.json`
    /// or `merge_report.json`); anything else stays an `OutputExists` error.
    ///
    /// `metadata` goes into every shard's `__metadata__`, with
    /// `"format": "pt"` added when it has no `format` key: `transformers`
    /// refuses shards whose metadata lacks it. The index's `metadata` holds
    /// `total_size` only, as Hugging Face writes it.
    pub fn create(
        out_dir: &Path,
        tensors: Vec<OutputTensor>,
        max_shard_bytes: Option<u64>,
        mut metadata: BTreeMap<String, String>,
        force: bool,
    ) -> Result<Self> {
        metadata
            .entry("format".to_string())
            .or_insert_with(|| "pt".to_string());
        let name = dir_name(out_dir)?;
        checked_sizes(out_dir, &tensors)?;
        let parent = parent_of(out_dir);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let lock = OutputLock::acquire(out_dir, parent.join(format!(".{name}.lock")))?;
        check_replaceable(out_dir, force)?;
        let temp_dir = parent.join(format!(".{name}.tmp-{}", unique_suffix()));
        std::fs::create_dir(&temp_dir).map_err(|e| Error::io(&temp_dir, e))?;

        let shards = ShardedWriter::plan_shards(&tensors, max_shard_bytes);
        let mut taken: BTreeSet<String> = shards.iter().map(|s| s.file_name.clone()).collect();
        taken.insert(SINGLE_FILE.to_string());
        taken.insert(INDEX_FILE.to_string());
        Ok(ShardedWriter {
            out_dir: out_dir.to_path_buf(),
            temp_dir,
            force,
            metadata,
            shards,
            current: None,
            shard: 0,
            written_in_shard: 0,
            taken,
            finished: false,
            _lock: lock,
        })
    }

    /// The shards being written.
    pub fn shards(&self) -> &[ShardPlan] {
        &self.shards
    }

    /// The temporary directory being written (renamed to the output
    /// directory by [`finish`](Self::finish)).
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// An error about a file in the temporary directory, told about the
    /// file the user asked for (`OUT/model.safetensors`, not
    /// `.OUT.tmp-…/model.safetensors`); an I/O error also says that
    /// nothing was published, since the writer is about to be dropped.
    fn for_user(&self, e: Error) -> Error {
        let file = match e.file().map(|f| f.strip_prefix(&self.temp_dir)) {
            Some(Ok(rel)) if rel.as_os_str().is_empty() => Some(self.out_dir.clone()),
            Some(Ok(rel)) => Some(self.out_dir.join(rel)),
            _ => None,
        };
        let e = match file {
            Some(file) => e.with_file(file),
            None => e,
        };
        if e.kind() != ErrorKind::Io || self.finished {
            return e;
        }
        let message = format!(
            "{}; the output was not written (its temporary files are removed)",
            e.message()
        );
        e.with_message(message)
    }

    fn open_shard(&self) -> Result<SafetensorsWriter> {
        let plan = &self.shards[self.shard];
        SafetensorsWriter::create(
            &self.temp_dir.join(&plan.file_name),
            &plan.tensors,
            &self.metadata,
        )
    }

    /// Appends the bytes of tensor `name`, which must be the next tensor in
    /// the declared order and have exactly its byte size; opens the next
    /// shard as needed and finishes (fsyncs) each shard when it is full.
    /// Errors name the output's file (not the temporary one).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.try_write_tensor(name, data)
            .map_err(|e| self.for_user(e))
    }

    fn try_write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if self.shard >= self.shards.len() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "all declared tensors are already written",
            )
            .with_file(&self.out_dir)
            .with_tensor(name));
        }
        if self.current.is_none() {
            self.current = Some(self.open_shard()?);
        }
        if let Some(writer) = self.current.as_mut() {
            writer.write_tensor(name, data)?;
        }
        self.written_in_shard += 1;
        if self.written_in_shard == self.shards[self.shard].tensors.len() {
            if let Some(writer) = self.current.take() {
                writer.finish()?;
            }
            self.shard += 1;
            self.written_in_shard = 0;
        }
        Ok(())
    }

    fn claim(&mut self, file_name: &str) -> Result<PathBuf> {
        if !is_plain_file_name(file_name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("`{file_name}` is not a plain file name"),
            )
            .with_file(&self.out_dir));
        }
        if !self.taken.insert(file_name.to_string()) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("`{file_name}` is already written or reserved for the weights"),
            )
            .with_file(&self.out_dir));
        }
        Ok(self.temp_dir.join(file_name))
    }

    /// Copies `src` into the output directory as `file_name` (for example
    /// `config.json` from the model whose architecture the output keeps).
    /// Read errors name `src`, write errors the output's file.
    pub fn copy_file(&mut self, src: &Path, file_name: &str) -> Result<()> {
        let result = self.claim(file_name).and_then(|dst| {
            let mut from = File::open(src).map_err(|e| Error::io(src, e))?;
            let mut to = Sink::create(&dst).map_err(|e| Error::io(&dst, e))?;
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = match std::io::Read::read(&mut from, &mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io(src, e)),
                };
                to.write_all(&buffer[..n]).map_err(|e| Error::io(&dst, e))?;
            }
            to.sync(&dst).map_err(|e| Error::io(&dst, e))
        });
        result.map_err(|e| self.for_user(e))
    }

    /// Writes `bytes` into the output directory as `file_name` (for example
    /// `merge_report.json`).
    pub fn write_file(&mut self, file_name: &str, bytes: &[u8]) -> Result<()> {
        let result = self
            .claim(file_name)
            .and_then(|dst| write_synced(&dst, bytes));
        result.map_err(|e| self.for_user(e))
    }

    /// Checks that every tensor was written, writes the index (several
    /// shards), fsyncs, and renames the temporary directory to the output
    /// directory; with `force`, an existing output is first moved aside,
    /// then removed once the new one is in place. Returns the output path.
    /// On an error the temporary directory is removed and an output that
    /// `force` was replacing stays as it was.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.try_finish().map_err(|e| self.for_user(e))
    }

    fn try_finish(&mut self) -> Result<PathBuf> {
        while self.shard < self.shards.len() {
            let plan = &self.shards[self.shard];
            if let Some(missing) = plan.tensors.get(self.written_in_shard) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "finished before this tensor (and any after it) was written",
                )
                .with_file(&self.out_dir)
                .with_tensor(&missing.name));
            }
            // Only an empty model has a shard with no tensors left to open.
            let writer = match self.current.take() {
                Some(writer) => writer,
                None => self.open_shard()?,
            };
            writer.finish()?;
            self.shard += 1;
        }
        if self.shards.len() > 1 {
            let index = self.index_json();
            write_synced(&self.temp_dir.join(INDEX_FILE), index.as_bytes())?;
        }
        sync_dir(&self.temp_dir)?;

        let parent = parent_of(&self.out_dir);
        let old = if std::fs::symlink_metadata(&self.out_dir).is_ok() {
            check_replaceable(&self.out_dir, self.force)?;
            let name = dir_name(&self.out_dir)?;
            let aside = parent.join(format!(".{name}.old-{}", unique_suffix()));
            rename(&self.out_dir, &aside).map_err(|e| Error::io(&self.out_dir, e))?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = rename(&self.temp_dir, &self.out_dir) {
            if let Some(old) = &old {
                // Put the previous output back: a failed merge changes nothing.
                let _ = std::fs::rename(old, &self.out_dir);
            }
            return Err(Error::io(&self.out_dir, e));
        }
        self.finished = true;
        if let Some(old) = old {
            // The new output is complete and in place; a leftover hidden
            // `.name.old-*` directory would be harmless, so a failure to
            // remove it is not an error of the merge.
            let _ = std::fs::remove_dir_all(old);
        }
        // The output is published: a failed fsync of its parent (the
        // rename may not yet be durable) is reported but removes nothing.
        sync_dir(&parent)?;
        Ok(self.out_dir.clone())
    }

    /// `model.safetensors.index.json` as `transformers` writes it: sorted
    /// keys, two-space indent, trailing newline.
    fn index_json(&self) -> String {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for plan in &self.shards {
            total = total.saturating_add(plan.bytes);
            for t in &plan.tensors {
                weight_map.insert(t.name.clone(), plan.file_name.clone().into());
            }
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&index).unwrap_or_default();
        text.push('\n');
        text
    }
}

impl Drop for ShardedWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Close the open shard before removing its directory.
            self.current = None;
            let _ = std::fs::remove_dir_all(&self.temp_dir);
        }
    }
}

/// Whether `path` may be created (absent) or replaced (`force`, and it is a
/// directory that looks like an earlier output).
fn check_replaceable(path: &Path, force: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let refuse = |msg: &str| Err(Error::new(ErrorKind::OutputExists, msg).with_file(path));
    if !force {
        return refuse("the output already exists; pass force (--force) to replace it");
    }
    if !meta.is_dir() {
        return refuse("the output exists and is not a directory; refusing to replace it");
    }
    let mut entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let empty = entries.next().is_none();
    let model = [SINGLE_FILE, INDEX_FILE, "merge_report.json"]
        .iter()
        .any(|f| path.join(f).is_file());
    if empty || model {
        Ok(())
    } else {
        refuse(
            "the output exists but holds no model (no model.safetensors, \
             model.safetensors.index.json or merge_report.json); refusing to replace it \
             even with force: remove it yourself if you mean to",
        )
    }
}

/// The last component of `out_dir`, which becomes part of temporary names.
fn dir_name(out_dir: &Path) -> Result<String> {
    out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "the output path has no directory name",
            )
            .with_file(out_dir)
        })
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `<pid>-<nanos>`: distinct between processes and between calls.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| sync_handle(&f, path))
        .map_err(|e| Error::io(path, e))
}

/// Creates `path` holding `bytes`, fsynced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = Sink::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync(path))
        .map_err(|e| Error::io(path, e))
}

/// Makes renames and new entries in `dir` durable (a no-op where
/// directories cannot be opened, as on Windows).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        sync_file(dir)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Removes a temporary file unless disarmed, also when the writer panics.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the single file `path` atomically: `f` writes a temporary file
/// beside it (the path `f` receives), which is fsynced and renamed to
/// `path` when `f` succeeds, and removed when it fails.
pub fn write_atomically(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "the output path has no file name").with_file(path)
        })?;
    let parent = parent_of(path);
    let mut temp = TempFile {
        path: parent.join(format!(".{name}.tmp-{}", unique_suffix())),
        armed: true,
    };
    // Errors name the file the caller asked for, not the temporary one.
    let name_target = |e: Error| match e.file() {
        Some(file) if file == temp.path => e.with_file(path),
        _ => e,
    };
    f(&temp.path).map_err(name_target)?;
    // `f` need not fsync: the rename must not publish unwritten data.
    sync_file(&temp.path).map_err(name_target)?;
    rename(&temp.path, path).map_err(|e| Error::io(path, e))?;
    temp.armed = false;
    sync_dir(&parent)
}

/// The lock of an output path, `<parent>/.<name>.lock`, held from
/// [`ShardedWriter::create`] until the writer is dropped: two merges into
/// one output would otherwise both write and the later rename would
/// silently replace (with `force`) or fail on the earlier output.
///
/// On Unix it is an `flock` on the file, which the kernel releases when the
/// process dies: a killed merge leaves at most an unlocked file, which the
/// next merge takes over. The file is removed on release; a waiting
/// process that opened it just before checks that the path still names
/// the file it locked. Elsewhere the file is created exclusively and a
/// stale one must be removed by hand (the error says so).
#[derive(Debug)]
struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    fn acquire(out_dir: &Path, path: PathBuf) -> Result<OutputLock> {
        // A retry is needed only when the holder released and removed the
        // file between our open and our lock: a handful suffices.
        for _ in 0..16 {
            let Some(mut file) = lock_file(&path)? else {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                return Err(Error::new(
                    ErrorKind::OutputExists,
                    format!(
                        "another merge{holder} is writing this output now (it holds the lock {}); \
                         wait for it to finish or choose another output{STALE_LOCK_HINT}",
                        path.display()
                    ),
                )
                .with_file(out_dir));
            };
            if !still_named(&file, &path) {
                continue;
            }
            // Who holds it, for the message of a second merge; best effort.
            let _ = file
                .set_len(0)
                .and_then(|()| write!(file, "{}", std::process::id()));
            return Ok(OutputLock { path, _file: file });
        }
        Err(Error::new(
            ErrorKind::OutputExists,
            "other merges keep taking this output's lock; run one merge at a time",
        )
        .with_file(out_dir))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so that
        // nobody can lock the removed file and think they hold the lock.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
const STALE_LOCK_HINT: &str = "";
#[cfg(not(unix))]
const STALE_LOCK_HINT: &str =
    "; if no merge is running, a crashed one left the lock file: remove it";

/// Opens `path` and locks it exclusively without waiting; `None` when
/// another process (or another writer in this one) holds it.
#[cfg(unix)]
fn lock_file(path: &Path) -> Result<Option<File>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    loop {
        // SAFETY: `flock` on a descriptor we own, open for the whole call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(Error::io(path, e)),
        }
    }
}

#[cfg(not(unix))]
fn lock_file(path: &Path) -> Result<Option<File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Whether `path` still names the open `file` (not removed or replaced by
/// an earlier holder's release).
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_named(_file: &File, _path: &Path) -> bool {
    true
}
