//! Reading checkpoints: one or more memory-mapped safetensors files,
//! validated completely before any tensor data is read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::json::{first_duplicate, RawHeader, RawIndex};
use super::lora::{Adapter, LowRank};
use super::mmap::MappedFile;
use super::rows::{RowMaps, Rows};
use super::{INDEX_FILE, SINGLE_FILE};
use crate::dtype::{decode_f32, Dtype};
use crate::error::{Error, ErrorKind, Result};

/// The largest header accepted, as in the `safetensors` crate: anything
/// larger is a corrupt length field, not a model.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes of the little-endian header length that starts every file.
const LEN_BYTES: usize = 8;

/// What every pickle refusal tells the user to do.
const PICKLE_HINT: &str = "flatmerge reads safetensors only and never unpickles PyTorch files \
     (loading a pickle can run arbitrary code); convert the checkpoint first with the \
     Hugging Face tooling, e.g. `AutoModel.from_pretrained(src).save_pretrained(dst, \
     safe_serialization=True)`";

/// A model checkpoint: one or more memory-mapped safetensors shards.
///
/// The files are mapped, not read: tensor data is paged in when a
/// [`TensorView`] is read. Opening validates every header completely
/// (lengths, JSON, duplicate names, dtypes, shapes against byte ranges,
/// offsets, shard/index agreement), so later reads cannot go out of bounds.
///
/// The files must not be modified while the checkpoint is open (see
/// [`Checkpoint::open`]).
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    fingerprints: Vec<FileFingerprint>,
    /// A LoRA adapter applied while reading ([`Checkpoint::with_adapter`]).
    adapter: Option<Box<Adapter>>,
    /// Tensors seen with their rows mapped ([`Checkpoint::set_rows`]).
    rows: Option<Box<RowMaps>>,
    /// Tensors stacked from the rows of others ([`Checkpoint::stack`]): not
    /// stored, so not among [`Checkpoint::tensors`].
    stacked: HashMap<String, Stacked>,
}

/// A tensor made of the rows of several stored ones.
#[derive(Debug)]
struct Stacked {
    info: TensorInfo,
    /// Each part's name and element count, in order.
    parts: Vec<(String, usize)>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: MappedFile,
    /// Size and modification time when opened, to notice a file rewritten
    /// during a merge (cheap: one `stat` per shard).
    stamp: (u64, Option<std::time::SystemTime>),
}

/// Name, dtype and shape of one tensor of a [`Checkpoint`].
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    shard: usize,
    /// Byte range in the shard's map (while parsing: in its data section).
    begin: usize,
    end: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        // Cannot overflow: `nbytes` was computed with checked arithmetic at open.
        self.shape.iter().product()
    }

    /// Number of bytes of data.
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A borrowed view of one tensor's bytes in a [`Checkpoint`].
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its little-endian bytes, exactly `numel × dtype.size()` of them
    /// (not necessarily aligned: they point into the file's map). With
    /// `lora`, the tensor is these values plus the low-rank update: read it
    /// with [`TensorView::read_f32`], which adds it.
    pub data: &'a [u8],
    /// A LoRA update `s·B·A` to add to the stored values.
    pub lora: Option<LowRank<'a>>,
    /// With rows mapped into another vocabulary, the tensor is these rows
    /// (of `shape`), built from the merge's models; `data` then holds the
    /// model's own rows as stored (for scans), not the tensor's values.
    pub rows: Option<Rows<'a>>,
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The views whose stored bytes make up this tensor, for scans of
    /// `data`: itself, or a stacked tensor's parts.
    pub fn stored(&self, checkpoint: &'a Checkpoint) -> Vec<TensorView<'a>> {
        match &self.rows {
            Some(rows) if self.data.is_empty() && rows.parts().next().is_some() => {
                rows.parts().filter_map(|p| checkpoint.view(p)).collect()
            }
            _ => vec![*self],
        }
    }

    /// Decodes elements `[start, start + out.len())` of an F32, F16 or BF16
    /// tensor into `out`.
    ///
    /// # Panics
    /// If the dtype is not F32, F16 or BF16 (the planner checks dtypes
    /// before reading) or the range goes past the last element.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let size = self.dtype.size();
        let end = start
            .checked_add(out.len())
            .filter(|&end| end <= self.numel())
            .unwrap_or_else(|| {
                panic!(
                    "read_f32 `{}`: elements {start}..+{} out of {}",
                    self.name,
                    out.len(),
                    self.numel()
                )
            });
        if let Some(rows) = &self.rows {
            rows.read(start, out);
            return;
        }
        decode_f32(self.dtype, &self.data[start * size..end * size], out);
        if let Some(lora) = &self.lora {
            lora.add_to(start, out);
        }
    }

    /// Element `index` as f32 (LoRA update included).
    ///
    /// # Panics
    /// As [`TensorView::read_f32`].
    pub fn element(&self, index: usize) -> f32 {
        let mut x = [0.0f32];
        self.read_f32(index, &mut x);
        x[0]
    }

    /// Decodes the whole F32, F16 or BF16 tensor.
    ///
    /// # Panics
    /// If the dtype is not F32, F16 or BF16.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.read_f32(0, &mut out);
        out
    }
}

/// Identifies an input file cheaply for the merge report (SPEC §6): its
/// size and the SHA-256 of its header (the 8-byte length and the JSON),
/// which lists every tensor's name, dtype, shape and offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileFingerprint {
    /// The file's path.
    pub path: PathBuf,
    /// The file's size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the header bytes.
    pub header_sha256: String,
}

/// Where the tensors of a path are.
enum Layout {
    Single(PathBuf),
    Index(PathBuf),
}

impl Checkpoint {
    /// Opens a checkpoint at `path`, which may be:
    /// - a `.safetensors` file (any other file is also tried as safetensors);
    /// - a directory holding `model.safetensors` (preferred when an index is
    ///   also present, as in `transformers`);
    /// - a directory holding `model.safetensors.index.json` (Hugging Face
    ///   shards), or that index file itself: every shard it names is opened,
    ///   and the index must list exactly the tensors of the shards, each in
    ///   the shard that holds it;
    /// - a directory holding exactly one `*.safetensors` file of another name
    ///   (`adapter_model.safetensors`, …). Several such files without an
    ///   index are refused: which of them make up the model is unknown.
    ///
    /// PyTorch pickles (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, or a directory
    /// holding only those) are refused with [`ErrorKind::Pickle`]; a path
    /// that does not exist or holds nothing readable gives
    /// [`ErrorKind::NotFound`]; invalid files give [`ErrorKind::Format`] or
    /// [`ErrorKind::UnsupportedDtype`] (a dtype name flatmerge does not know;
    /// known non-float dtypes such as I64 open fine).
    ///
    /// The files are memory-mapped: they must not be modified or truncated
    /// while the checkpoint is open, or reads see the new bytes (or the
    /// process gets SIGBUS). Writing the merge output over one of its own
    /// inputs is therefore not supported.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        match resolve(path)? {
            Layout::Single(file) => Checkpoint::open_single(path, &file),
            Layout::Index(index) => Checkpoint::open_index(path, &index),
        }
    }

    /// Opens exactly the safetensors file `path`, whatever its name (for
    /// statistics files and tests); no directory or pickle detection.
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_single(path, path)
    }

    fn open_single(root: &Path, file: &Path) -> Result<Checkpoint> {
        let shard = read_shard(file, 0)?;
        Ok(Checkpoint::assemble(root, parent_dir(file), vec![shard]))
    }

    fn open_index(root: &Path, index_path: &Path) -> Result<Checkpoint> {
        let dir = parent_dir(index_path);
        let bytes = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: RawIndex = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::Format,
                format!("not a valid safetensors index (expected {{\"weight_map\": {{tensor: file}}}}): {e}"),
            )
            .with_file(index_path)
        })?;
        let format_err = |msg: String| Error::new(ErrorKind::Format, msg).with_file(index_path);
        if let Some(name) = index.weight_map.first_duplicate() {
            return Err(format_err("`weight_map` lists the tensor twice".into()).with_tensor(name));
        }
        if index.weight_map.0.is_empty() {
            return Err(format_err("`weight_map` names no tensors".into()));
        }
        for (tensor, file) in &index.weight_map.0 {
            if !is_plain_file_name(file) {
                return Err(format_err(format!(
                    "`weight_map` puts the tensor in `{file}`, which is not a file name in the index's directory"
                ))
                .with_tensor(tensor));
            }
        }

        // Sorted file names give HF's natural shard order (model-00001-of-…).
        let files: Vec<&str> = index
            .weight_map
            .0
            .iter()
            .map(|(_, f)| f.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut shards = Vec::with_capacity(files.len());
        for (i, file) in files.iter().enumerate() {
            let path = dir.join(file);
            if !path.is_file() {
                let example = index
                    .weight_map
                    .0
                    .iter()
                    .find(|(_, f)| f == file)
                    .map(|(t, _)| t.as_str())
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "shard named by {} is missing (the index puts `{example}` and possibly others in it)",
                        index_path.display()
                    ),
                )
                .with_file(path));
            }
            shards.push(read_shard(&path, i)?);
        }

        // Where each tensor really is; a name in two shards is ambiguous.
        let mut located: HashMap<&str, usize> = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for t in &shard.tensors {
                if let Some(&first) = located.get(t.name.as_str()) {
                    return Err(Error::new(
                        ErrorKind::Format,
                        format!(
                            "tensor also in shard {}",
                            shards[first].shard.path.display()
                        ),
                    )
                    .with_file(&shard.shard.path)
                    .with_tensor(&t.name));
                }
                located.insert(&t.name, i);
            }
        }
        let listed: HashMap<&str, &str> = index
            .weight_map
            .0
            .iter()
            .map(|(t, f)| (t.as_str(), f.as_str()))
            .collect();
        for (tensor, file) in &index.weight_map.0 {
            match located.get(tensor.as_str()) {
                Some(&i) if files[i] == file => {}
                Some(&i) => {
                    return Err(format_err(format!(
                        "the index puts the tensor in `{file}` but it is in `{}`",
                        files[i]
                    ))
                    .with_tensor(tensor))
                }
                None => {
                    return Err(format_err(format!(
                        "the index puts the tensor in `{file}`, which does not contain it"
                    ))
                    .with_tensor(tensor))
                }
            }
        }
        for shard in &shards {
            if let Some(t) = shard
                .tensors
                .iter()
                .find(|t| !listed.contains_key(t.name.as_str()))
            {
                return Err(Error::new(
                    ErrorKind::Format,
                    format!("tensor is missing from {}", index_path.display()),
                )
                .with_file(&shard.shard.path)
                .with_tensor(&t.name));
            }
        }
        Ok(Checkpoint::assemble(root, dir, shards))
    }

    fn assemble(root: &Path, dir: PathBuf, parsed: Vec<ParsedShard>) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            root: root.to_path_buf(),
            dir,
            shards: Vec::with_capacity(parsed.len()),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            metadata: BTreeMap::new(),
            fingerprints: Vec::with_capacity(parsed.len()),
            adapter: None,
            rows: None,
            stacked: HashMap::new(),
        };
        for shard in parsed {
            // First shard wins on conflicting keys: HF shards normally all
            // carry the same `{"format": "pt"}`.
            for (k, v) in shard.metadata {
                checkpoint.metadata.entry(k).or_insert(v);
            }
            for t in shard.tensors {
                checkpoint
                    .by_name
                    .insert(t.name.clone(), checkpoint.tensors.len());
                checkpoint.tensors.push(t);
            }
            checkpoint.fingerprints.push(shard.fingerprint);
            checkpoint.shards.push(shard.shard);
        }
        checkpoint
    }

    /// This checkpoint with some tensors read from other safetensors files
    /// instead: every tensor of `files` must be a tensor of the checkpoint
    /// with the same shape (its dtype may differ), and replaces it; the
    /// list of tensors and its order stay the checkpoint's. For running a
    /// model whose earlier layers were merged (RegMean++, SPEC §7) without
    /// writing a copy of it. Errors name the file and tensor
    /// ([`ErrorKind::Format`]) or are the files' own.
    pub fn with_overrides(mut self, files: &[PathBuf]) -> Result<Checkpoint> {
        for file in files {
            let parsed = read_shard(file, self.shards.len())?;
            for t in parsed.tensors {
                let err = |msg: String| {
                    Error::new(ErrorKind::Format, msg)
                        .with_file(file)
                        .with_tensor(&t.name)
                };
                let Some(&i) = self.by_name.get(&t.name) else {
                    return Err(err(format!(
                        "not a tensor of {}, so it cannot replace one",
                        self.root.display()
                    )));
                };
                if self.tensors[i].shape != t.shape {
                    return Err(err(format!(
                        "shape {:?}, but the tensor it replaces has shape {:?}",
                        t.shape, self.tensors[i].shape
                    )));
                }
                self.tensors[i] = t;
            }
            self.fingerprints.push(parsed.fingerprint);
            self.shards.push(parsed.shard);
        }
        Ok(self)
    }

    /// This checkpoint seen through `rename`: exactly the tensors it gives
    /// a name for, under that name, in the checkpoint's order. The data
    /// stays the same mapped bytes. For a `slices:` merge, where one
    /// model's layers `[a, b)` become the output's layers `[o, o + b − a)`.
    /// Errors if two tensors get the same name ([`ErrorKind::Format`]).
    pub fn renamed(mut self, rename: impl Fn(&str) -> Option<String>) -> Result<Checkpoint> {
        let tensors = std::mem::take(&mut self.tensors);
        self.by_name.clear();
        for mut t in tensors {
            let Some(name) = rename(&t.name) else {
                continue;
            };
            if self.by_name.contains_key(&name) {
                return Err(Error::new(
                    ErrorKind::Format,
                    format!("two tensors would both be called `{name}`"),
                )
                .with_file(&self.root)
                .with_tensor(&t.name));
            }
            t.name = name;
            self.by_name.insert(t.name.clone(), self.tensors.len());
            self.tensors.push(t);
        }
        self.adapter = self.adapter.take().map(|a| Box::new(a.renamed(&rename)));
        Ok(self)
    }

    /// This checkpoint with the PEFT LoRA adapter at `dir` applied while
    /// reading: views of the weights it adapts carry its update (see
    /// [`super::lora`]). The adapter's file joins the checkpoint's
    /// fingerprints and change checks. Errors name the adapter's file and
    /// tensor or key.
    pub fn with_adapter(mut self, dir: &Path) -> Result<Checkpoint> {
        let adapter = Adapter::load(dir, &self)?;
        self.fingerprints
            .extend(adapter.file().fingerprints().iter().cloned());
        self.adapter = Some(Box::new(adapter));
        Ok(self)
    }

    /// Sees the tensors of `maps` through their row maps from now on:
    /// their shapes become the maps' row counts (the columns stay). For a
    /// merge into another vocabulary ([`crate::vocab`]).
    ///
    /// # Panics
    /// If a map names a tensor that is not 2-D.
    pub fn set_rows(&mut self, maps: RowMaps) {
        for t in &mut self.tensors {
            if let Some(map) = maps.get(&t.name) {
                assert_eq!(t.shape.len(), 2, "row map of a tensor that is not 2-D");
                t.shape[0] = map.rows();
            }
        }
        self.rows = Some(Box::new(maps));
    }

    /// Adds a tensor called `name` whose rows are those of `parts`, one
    /// after the other (CogVLM's fused `query_key_value` from LLaVA's q, k
    /// and v), read from the parts while the merge reads it, never
    /// materialised here. It is not stored, so [`Checkpoint::tensors`] does
    /// not list it; [`Checkpoint::info`] and [`Checkpoint::view`] find it.
    /// Errors ([`ErrorKind::Plan`], naming the tensor): `name` is taken, a
    /// part is missing or itself stacked, or the parts differ in dtype or
    /// in any axis but the first.
    pub fn stack(&mut self, name: &str, parts: &[String]) -> Result<()> {
        let err = |msg: String| {
            Error::new(ErrorKind::Plan, msg)
                .with_file(&self.root)
                .with_tensor(name)
        };
        if self.info(name).is_some() {
            return Err(err(
                "a stacked tensor would replace a tensor of the same name".into(),
            ));
        }
        let mut infos = Vec::with_capacity(parts.len());
        for part in parts {
            match self.by_name.get(part) {
                Some(&i) => infos.push(&self.tensors[i]),
                None => return Err(err(format!("its part `{part}` is not a stored tensor"))),
            }
        }
        let Some(first) = infos.first() else {
            return Err(err("a stacked tensor needs at least one part".into()));
        };
        let (dtype, tail) = (first.dtype, first.shape.get(1..).unwrap_or(&[]));
        if let Some(other) = infos
            .iter()
            .find(|t| t.dtype != dtype || t.shape.is_empty() || &t.shape[1..] != tail)
        {
            return Err(err(format!(
                "its parts must share the dtype and every axis but the first: `{}` is {:?} {:?}, `{}` is {:?} {:?}",
                first.name, first.dtype, first.shape, other.name, other.dtype, other.shape
            )));
        }
        let mut shape = first.shape.clone();
        shape[0] = infos.iter().map(|t| t.shape[0]).sum();
        let parts = infos.iter().map(|t| (t.name.clone(), t.numel())).collect();
        let info = TensorInfo {
            name: name.to_string(),
            dtype,
            shape,
            shard: 0,
            begin: 0,
            end: 0,
        };
        self.stacked
            .insert(name.to_string(), Stacked { info, parts });
        Ok(())
    }

    /// The LoRA adapter applied while reading, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_deref()
    }

    /// The path given to [`Checkpoint::open`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding the shards, where `config.json`, tokenizer
    /// files and the like are found.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor: shards in order, within a shard by data offset (ties,
    /// which only zero-sized tensors have, by name).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if any.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        match self.by_name.get(name) {
            Some(&i) => Some(&self.tensors[i]),
            None => self.stacked.get(name).map(|s| &s.info),
        }
    }

    /// A view of the bytes of the tensor called `name`, if any.
    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        if let Some(s) = self.stacked.get(name) {
            return Some(TensorView {
                name: &s.info.name,
                dtype: s.info.dtype,
                shape: &s.info.shape,
                data: &[],
                lora: None,
                rows: Some(Rows::stacked(self, &s.parts)),
            });
        }
        let info = self.info(name)?;
        let data = self.shards.get(info.shard)?.map.get(info.begin..info.end)?;
        Some(TensorView {
            name: &info.name,
            dtype: info.dtype,
            shape: &info.shape,
            data,
            lora: self.adapter.as_ref().and_then(|a| a.low_rank(name)),
            rows: self.rows.as_ref().and_then(|r| r.rows(&info.name)),
        })
    }

    /// Drops this process's mapping of the tensor called `name` (see
    /// [`MappedFile::release`]): for a merge that is done with it.
    pub fn release(&self, name: &str) {
        if let Some(s) = self.stacked.get(name) {
            for (part, _) in &s.parts {
                self.release(part);
            }
            return;
        }
        if let Some(info) = self.info(name) {
            if let Some(shard) = self.shards.get(info.shard) {
                shard.map.release(info.begin..info.end);
            }
        }
        if let Some(adapter) = &self.adapter {
            adapter.release(name);
        }
        if let Some(rows) = &self.rows {
            rows.release(name);
        }
    }

    /// The `__metadata__` of the shards (for several shards: the union, the
    /// first shard winning on conflicting keys); empty if none.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The shard files, in order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        let adapter = self.adapter.iter().flat_map(|a| a.file().shard_paths());
        self.shards
            .iter()
            .map(|s| s.path.as_path())
            .chain(adapter)
            .collect()
    }

    /// An error naming the first shard whose size or modification time
    /// changed since it was opened: a merge that read it may have read a
    /// mix of old and new data (the maps assume unchanged files).
    pub fn check_unchanged(&self) -> Result<()> {
        for shard in &self.shards {
            let now = std::fs::metadata(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
            if (now.len(), now.modified().ok()) != shard.stamp {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the file changed while it was being read (size or modification time); nothing was written, run the merge again",
                )
                .with_file(&shard.path));
            }
        }
        match &self.adapter {
            Some(adapter) => adapter.file().check_unchanged(),
            None => Ok(()),
        }
    }

    /// One fingerprint per shard file, in shard order.
    pub fn fingerprints(&self) -> &[FileFingerprint] {
        &self.fingerprints
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }
}

/// The directory holding `file` (`.` for a bare file name).
fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A name that stays inside the directory it is joined to.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(components.next(), Some(Component::Normal(c)) if c == name)
        && components.next().is_none()
}

fn has_pickle_extension(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".bin", ".pt", ".pth", ".ckpt", ".pkl"]
        .iter()
        .any(|ext| lower.ends_with(ext))
        || lower == "pytorch_model.bin.index.json"
}

fn resolve(path: &Path) -> Result<Layout> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(ErrorKind::NotFound, "no such file or directory").with_file(path)
        } else {
            Error::io(path, e)
        }
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if meta.is_file() {
        if has_pickle_extension(&name) {
            return Err(Error::new(
                ErrorKind::Pickle,
                format!("this is a PyTorch pickle checkpoint; {PICKLE_HINT}"),
            )
            .with_file(path));
        }
        if name.ends_with(".index.json") {
            return Ok(Layout::Index(path.to_path_buf()));
        }
        return Ok(Layout::Single(path.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(
            Error::new(ErrorKind::NotFound, "neither a file nor a directory").with_file(path),
        );
    }

    let single = path.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(Layout::Single(single));
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        return Ok(Layout::Index(index));
    }
    let mut safetensors = Vec::new();
    let mut pickles = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_file() {
            continue;
        }
        if file_name.ends_with(".safetensors") {
            safetensors.push(file_name);
        } else if has_pickle_extension(&file_name) {
            pickles.push(file_name);
        }
    }
    safetensors.sort();
    pickles.sort();
    match safetensors.as_slice() {
        [one] => Ok(Layout::Single(path.join(one))),
        [] if !pickles.is_empty() => Err(Error::new(
            ErrorKind::Pickle,
            format!(
                "the directory holds PyTorch pickle files ({}) and no safetensors; {PICKLE_HINT}",
                pickles.join(", ")
            ),
        )
        .with_file(path)),
        [] => Err(Error::new(
            ErrorKind::NotFound,
            format!("no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file in this directory"),
        )
        .with_file(path)),
        several => Err(Error::new(
            ErrorKind::Format,
            format!(
                "the directory holds {} safetensors files ({}) but no {INDEX_FILE} saying which \
                 tensors each holds: add the index, or pass the one file to use",
                several.len(),
                several.join(", ")
            ),
        )
        .with_file(path)),
    }
}

/// One validated shard file.
struct ParsedShard {
    shard: Shard,
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
    fingerprint: FileFingerprint,
}

/// Maps and validates the safetensors file `path`, shard number `index`.
fn read_shard(path: &Path, index: usize) -> Result<ParsedShard> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(ErrorKind::NotFound, "no such file").with_file(path)
        } else {
            Error::io(path, e)
        }
    })?;
    let file_meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let size = file_meta.len();
    let modified = file_meta.modified().ok();
    // Checked before mapping: an empty file cannot be mapped everywhere.
    if size < LEN_BYTES as u64 {
        return Err(Error::new(
            ErrorKind::Format,
            format!("truncated: the file has {size} bytes, fewer than the 8-byte header length of a safetensors file"),
        )
        .with_file(path));
    }
    // SAFETY: checkpoints are assumed not to be modified during the merge,
    // as documented on `Checkpoint::open`.
    let map = unsafe { MappedFile::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (tensors, metadata, header_end) = parse_header(path, &map, index)?;
    let fingerprint = FileFingerprint {
        path: path.to_path_buf(),
        size,
        header_sha256: hex(&Sha256::digest(&map[..header_end])),
    };
    Ok(ParsedShard {
        shard: Shard {
            path: path.to_path_buf(),
            map,
            stamp: (size, modified),
        },
        tensors,
        metadata,
        fingerprint,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Validates the header of the file whose bytes are `bytes`; returns its
/// tensors (sorted by offset), its `__metadata__` and the header's end.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    shard: usize,
) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>, usize)> {
    let err = |msg: String| Error::new(ErrorKind::Format, msg).with_file(path);
    let n = bytes
        .get(..LEN_BYTES)
        .and_then(|b| <[u8; LEN_BYTES]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| {
            err(format!(
                "truncated: the file has {} bytes, fewer than the 8-byte header length of a safetensors file",
                bytes.len()
            ))
        })?;
    if n > MAX_HEADER_BYTES {
        return Err(err(format!(
            "header length {n} is over the 100 MB limit: not a safetensors file, or a corrupt one"
        )));
    }
    let header_end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(LEN_BYTES))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            err(format!(
                "truncated: the header length says {n} bytes but only {} follow it",
                bytes.len() - LEN_BYTES
            ))
        })?;
    let header: RawHeader = serde_json::from_slice(&bytes[LEN_BYTES..header_end])
        .map_err(|e| err(format!("the header is not valid JSON: {e}")))?;
    let data_start = header_end;
    let data_len = bytes.len() - data_start;

    let metadata = match header.metadata.as_slice() {
        [] => BTreeMap::new(),
        [meta] => {
            if let Some(key) = meta.first_duplicate() {
                return Err(err(format!("`__metadata__` has the key `{key}` twice")));
            }
            let mut out = BTreeMap::new();
            for (key, value) in &meta.0 {
                let Value::String(value) = value else {
                    return Err(err(format!(
                        "`__metadata__` value of `{key}` is not a string (safetensors allows only strings)"
                    )));
                };
                out.insert(key.clone(), value.clone());
            }
            out
        }
        _ => return Err(err("`__metadata__` appears twice in the header".into())),
    };
    if let Some(name) = first_duplicate(header.tensors.iter().map(|(k, _)| k.as_str())) {
        return Err(err("the header lists the tensor twice".into()).with_tensor(name));
    }

    let mut tensors = Vec::with_capacity(header.tensors.len());
    for (name, entry) in &header.tensors {
        let (dtype, shape, begin, end) =
            tensor_entry(entry, data_len).map_err(|e| e.with_file(path).with_tensor(name))?;
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            shard,
            begin,
            end,
        });
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));

    // The data section must be covered exactly once, as the safetensors
    // format (and Python's reader) requires: no overlaps, no holes.
    let mut cursor = 0usize;
    let mut previous = "";
    for t in &tensors {
        let (begin, end) = (t.begin, t.end);
        if begin < cursor {
            return Err(err(format!(
                "data_offsets [{begin}, {end}] overlap those of `{previous}`, which end at {cursor}"
            ))
            .with_tensor(&t.name));
        }
        if begin > cursor {
            return Err(err(format!(
                "bytes [{cursor}, {begin}) of the data section, before this tensor, belong to no tensor"
            ))
            .with_tensor(&t.name));
        }
        cursor = end;
        previous = &t.name;
    }
    if cursor != data_len {
        return Err(err(format!(
            "the data section has {data_len} bytes but the tensors cover {cursor}: {} bytes at the end belong to no tensor",
            data_len - cursor
        )));
    }

    // The reference implementation must agree: a file we accept is a file
    // every safetensors reader accepts (it also rejects duplicate fields
    // inside an entry, which serde_json's `Value` would hide from us).
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| reference_error(path, e))?;

    // From here on offsets are into the whole map, not the data section.
    for t in &mut tensors {
        t.begin += data_start;
        t.end += data_start;
    }
    Ok((tensors, metadata, header_end))
}

/// One header entry, checked: `(dtype, shape, begin, end)` with offsets
/// relative to the data section. Errors name neither file nor tensor; the
/// caller adds both.
fn tensor_entry(entry: &Value, data_len: usize) -> Result<(Dtype, Vec<usize>, usize, usize)> {
    let err = |msg: String| Error::new(ErrorKind::Format, msg);
    let Value::Object(fields) = entry else {
        return Err(err("the header entry is not a JSON object".into()));
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| err("the header entry has no string `dtype`".into()))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| {
        let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.as_str()).collect();
        Error::new(
            ErrorKind::UnsupportedDtype,
            format!(
                "unsupported dtype `{dtype_name}` (flatmerge reads {})",
                known.join(", ")
            ),
        )
    })?;
    let shape = fields
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| err("`shape` is not an array of non-negative integers".into()))?;
    let offsets = fields
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|o| match o.as_slice() {
            [b, e] => Some((
                b.as_u64().and_then(|b| usize::try_from(b).ok())?,
                e.as_u64().and_then(|e| usize::try_from(e).ok())?,
            )),
            _ => None,
        })
        .ok_or_else(|| err("`data_offsets` is not an array of two non-negative integers".into()))?;
    let (begin, end) = offsets;
    let nbytes = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|numel| numel.checked_mul(dtype.size()))
        .ok_or_else(|| {
            err(format!(
                "shape {shape:?} of {dtype} overflows the address space"
            ))
        })?;
    if end < begin {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    if end - begin != nbytes {
        return Err(err(format!(
            "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        )));
    }
    if end > data_len {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes): \
             the file is truncated or its header is wrong"
        )));
    }
    Ok((dtype, shape, begin, end))
}

/// Maps an error of the `safetensors` crate, naming the tensor when it does.
fn reference_error(path: &Path, e: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let tensor = match &e {
        E::InvalidOffset(name) | E::TensorNotFound(name) => Some(name.clone()),
        _ => None,
    };
    let mut error = Error::new(
        ErrorKind::Format,
        format!("rejected by the safetensors reader: {e}"),
    )
    .with_file(path);
    if let Some(name) = tensor {
        error = error.with_tensor(name);
    }
    error.with_source(e)
}
