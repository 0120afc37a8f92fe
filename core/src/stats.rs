//! Activation statistics files (SPEC §4): a safetensors file whose
//! `__metadata__` says `format = "flatmerge.activations"`, `version = "1"`
//! or `"2"`, `examples = N`, and which holds, for each layer `L` (a
//! weight's name without `.weight`), `L.x_mean`, `L.y_mean`, `L.count` and
//! optionally the per-example rows `L.x_rows`, `L.y_rows`, plus
//! `probe.modality`.
//!
//! # Second moments (version 2)
//!
//! A layer may also hold `L.x_gram`, F32 `[in, in]`, row-major: the mean
//! second moment of its input, `(1/count) Σ_tokens x xᵀ` (SPEC §4, for
//! least-squares merging, SPEC §7). A file with at least one Gram is
//! `version = "2"`; one without is written as `version = "1"`, byte for
//! byte as before Grams existed, and both versions are read.
//!
//! Two optional `__metadata__` entries, JSON strings:
//!
//! - `gram_shared`: an object `{"alias": "owner", …}`. Layers that read the
//!   same input (q/k/v of an attention block, gate/up of a LLaMA MLP) have
//!   equal Grams; the file stores the owner's `owner.x_gram` once and the
//!   alias has none. [`ActivationStats::gram`] resolves it. An owner is
//!   never itself an alias, an alias has no `x_gram` of its own, and both
//!   must have equal input widths.
//! - `sources`: an array of probe-set `source` names (sorted, distinct):
//!   the recording was restricted to the probe examples of these sources
//!   (RegMean's protocol: each model's second moment on its own task's
//!   examples). Absent: every example of the probe set.
//!
//! Loading checks that a Gram is `[in, in]` with `in` the width of the
//! layer's `x_mean` (when present), finite, with a non-negative diagonal,
//! and symmetric: exactly for files this library writes; a foreign writer's
//! rounding (`Xᵀ X / n` by a BLAS that does not mirror) is accepted when
//! `|G_ij − G_ji| ≤ 2^-16 · √(G_ii · G_jj)` — far below f32 noise of a
//! mean over many tokens, far above any real asymmetry — and the loaded
//! matrix is made exactly symmetric (the upper triangle is mirrored).
//!
//! # Memory
//!
//! Loading reads and checks each Gram once, one at a time, and keeps only
//! its place in the memory-mapped file ([`Gram`]): a merge then decodes one
//! Gram when its layer is solved. A LLaMA-2-7B's Grams (per decoder layer
//! one 4096² attention input, one 4096² o_proj input, one 4096² MLP input
//! and one 11008² down_proj input, in f32) are about 21 GB per model, so
//! holding them all is not an option; loading holds at most one Gram
//! (`4·in²` bytes) beyond the means and rows.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{write_atomically, Checkpoint, OutputTensor, SafetensorsWriter, TensorView};

/// The `format` metadata value of a statistics file.
pub const FORMAT: &str = "flatmerge.activations";

/// The `version` metadata value of a file without Grams.
pub const FORMAT_VERSION: &str = "1";

/// The `version` metadata value of a file with at least one Gram.
pub const FORMAT_VERSION_GRAM: &str = "2";

/// The `__metadata__` key naming layers that share another layer's Gram.
pub const GRAM_SHARED_KEY: &str = "gram_shared";

/// The `__metadata__` key listing the probe sources a recording covers.
pub const SOURCES_KEY: &str = "sources";

/// The relative asymmetry a foreign Gram may have (see the module docs).
pub const GRAM_SYMMETRY_TOLERANCE: f64 = 1.0 / 65536.0;

/// The name of the global per-example modality tensor.
pub const MODALITY_TENSOR: &str = "probe.modality";

/// Per-example activations of one layer: a row-major `[rows, width]` matrix.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// Number of rows (probe examples).
    pub rows: usize,
    /// Length of each row (the layer's `in` or `out`).
    pub width: usize,
    /// `rows × width` values, row `n` for probe example `n`.
    pub data: Vec<f32>,
}

impl Rows {
    /// Row `n`.
    ///
    /// # Panics
    /// If `n >= rows` or `data` is shorter than `rows × width`.
    pub fn row(&self, n: usize) -> &[f32] {
        &self.data[n * self.width..(n + 1) * self.width]
    }
}

/// The statistics of one layer; every field is optional in the file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerStats {
    /// Mean input activation `x̄`, length `in`.
    pub x_mean: Option<Vec<f32>>,
    /// Mean output activation `ȳ`, length `out`.
    pub y_mean: Option<Vec<f32>>,
    /// Number of tokens averaged (at least 1).
    pub count: Option<u64>,
    /// Per-example mean inputs, `[examples, in]`.
    pub x_rows: Option<Rows>,
    /// Per-example mean outputs, `[examples, out]`.
    pub y_rows: Option<Rows>,
    /// Mean second moment of the input, `[in, in]` row-major, symmetric
    /// (version 2). `None` for a layer whose Gram is shared
    /// ([`ActivationStats::gram`] resolves that).
    pub x_gram: Option<Gram>,
}

/// A layer's mean input second moment, `[width, width]` row-major and
/// symmetric: either values in memory (recorded, or built by hand) or a
/// tensor of a loaded statistics file, decoded on demand (see the module
/// docs on memory).
#[derive(Clone)]
pub struct Gram {
    width: usize,
    data: GramData,
}

#[derive(Clone)]
enum GramData {
    Values(Vec<f32>),
    /// Checked when the file was loaded; `tensor` names it in `file`.
    Mapped {
        file: Arc<Checkpoint>,
        tensor: String,
    },
}

impl Gram {
    /// A Gram from its `width²` row-major values (`width = ⌊√len⌋`; a
    /// length that is not a square is refused when the statistics are
    /// saved or used).
    pub fn new(values: Vec<f32>) -> Gram {
        Gram {
            width: values.len().isqrt(),
            data: GramData::Values(values),
        }
    }

    /// `in`, the number of rows and columns.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Whether the values live in a mapped statistics file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, GramData::Mapped { .. })
    }

    /// The `width²` values, row-major, exactly symmetric. A mapped Gram is
    /// decoded into a new buffer (`4·width²` bytes) and the file's pages
    /// are released.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &self.data {
            GramData::Values(v) => Cow::Borrowed(v),
            GramData::Mapped { file, tensor } => {
                let mut values = file
                    .view(tensor)
                    .map(|v| v.to_f32_vec())
                    .unwrap_or_default();
                file.release(tensor);
                mirror_upper(&mut values, self.width);
                Cow::Owned(values)
            }
        }
    }
}

impl PartialEq for Gram {
    fn eq(&self, other: &Gram) -> bool {
        self.width == other.width && self.values() == other.values()
    }
}

impl std::fmt::Debug for Gram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.data {
            GramData::Values(v) => f.debug_tuple("Gram").field(v).finish(),
            GramData::Mapped { tensor, .. } => {
                write!(f, "Gram({w}×{w}, mapped from `{tensor}`)", w = self.width)
            }
        }
    }
}

impl LayerStats {
    fn is_empty(&self) -> bool {
        self.x_mean.is_none()
            && self.y_mean.is_none()
            && self.count.is_none()
            && self.x_rows.is_none()
            && self.y_rows.is_none()
            && self.x_gram.is_none()
    }

    /// The width `in` of the stored Gram (`√len`), if any.
    pub fn gram_width(&self) -> Option<usize> {
        self.x_gram.as_ref().map(Gram::width)
    }
}

/// The contents of an activation statistics file.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationStats {
    /// Number of probe examples `N` (the row count of every `*_rows`).
    pub examples: u64,
    /// Free-form description of the model the statistics come from.
    pub model: String,
    /// Free-form description of the probe set.
    pub probe: String,
    /// Statistics by layer name (a weight's name without `.weight`).
    pub layers: BTreeMap<String, LayerStats>,
    /// Modality of each probe example (0 text, 1 vision, 2 audio, …),
    /// length `examples`.
    pub modality: Option<Vec<u8>>,
    /// Layers whose Gram is another layer's: alias → owner (the owner
    /// stores `x_gram`). Written as the `gram_shared` metadata.
    pub gram_shared: BTreeMap<String, String>,
    /// The probe sources the recording was restricted to (sorted,
    /// distinct); `None`: the whole probe set. Written as `sources`.
    pub sources: Option<Vec<String>>,
}

/// The statistics a tensor name ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suffix {
    XMean,
    YMean,
    Count,
    XRows,
    YRows,
    XGram,
}

impl Suffix {
    const ALL: [Suffix; 6] = [
        Suffix::XMean,
        Suffix::YMean,
        Suffix::Count,
        Suffix::XRows,
        Suffix::YRows,
        Suffix::XGram,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Suffix::XMean => "x_mean",
            Suffix::YMean => "y_mean",
            Suffix::Count => "count",
            Suffix::XRows => "x_rows",
            Suffix::YRows => "y_rows",
            Suffix::XGram => "x_gram",
        }
    }
}

/// Splits `L.suffix` on its last dot (layer names have dots of their own).
fn split_name(name: &str) -> Option<(&str, Suffix)> {
    let (layer, suffix) = name.rsplit_once('.')?;
    let suffix = Suffix::ALL.into_iter().find(|s| s.as_str() == suffix)?;
    (!layer.is_empty()).then_some((layer, suffix))
}

/// Reports a malformed checkpoint as a malformed statistics file; I/O
/// problems and missing files keep their kind.
fn as_stats_error(e: Error) -> Error {
    if matches!(e.kind(), ErrorKind::Io | ErrorKind::NotFound) {
        return e;
    }
    let mut out = Error::new(ErrorKind::Stats, e.message());
    if let Some(file) = e.file() {
        out = out.with_file(file);
    }
    if let Some(tensor) = e.tensor() {
        out = out.with_tensor(tensor);
    }
    out
}

/// The data of one tensor to save.
enum Payload<'a> {
    F32(&'a [f32]),
    Gram(&'a Gram),
    Bytes(Vec<u8>),
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl ActivationStats {
    /// Empty statistics (no layers, no examples) for `model` and `probe`.
    pub fn new(model: &str, probe: &str) -> Self {
        ActivationStats {
            examples: 0,
            model: model.to_string(),
            probe: probe.to_string(),
            layers: BTreeMap::new(),
            modality: None,
            gram_shared: BTreeMap::new(),
            sources: None,
        }
    }

    /// The statistics of layer `name`, if any.
    pub fn layer(&self, name: &str) -> Option<&LayerStats> {
        self.layers.get(name)
    }

    /// The mean second moment of layer `name`'s input: the full `[in, in]`
    /// row-major, symmetric matrix, following a `gram_shared` alias to the
    /// layer that stores it. `None` when the layer has no Gram.
    pub fn gram(&self, name: &str) -> Option<&Gram> {
        let owner = self.gram_shared.get(name).map_or(name, String::as_str);
        self.layers.get(owner)?.x_gram.as_ref()
    }

    /// The layer storing `name`'s Gram: `name` itself, or its owner when it
    /// is a `gram_shared` alias.
    pub fn gram_owner<'a>(&'a self, name: &'a str) -> &'a str {
        self.gram_shared.get(name).map_or(name, String::as_str)
    }

    /// These statistics with their layers renamed by `rename` and those it
    /// gives no name for left out (a `slices:` merge's layer window: the
    /// same function as the checkpoint's, on layer names). A `gram_shared`
    /// alias whose owner is left out keeps no Gram.
    pub fn renamed(mut self, rename: impl Fn(&str) -> Option<String>) -> Self {
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .filter_map(|(name, stats)| rename(&name).map(|n| (n, stats)))
            .collect();
        self.gram_shared = std::mem::take(&mut self.gram_shared)
            .into_iter()
            .filter_map(|(alias, owner)| Some((rename(&alias)?, rename(&owner)?)))
            .collect();
        self
    }

    /// Whether any layer stores a Gram (the file is then version 2).
    pub fn has_grams(&self) -> bool {
        self.layers.values().any(|l| l.x_gram.is_some())
    }

    /// Reads and validates a statistics file: metadata (`format`,
    /// `version`, `examples`), tensor names, dtypes (F32 means, I64 `[1]`
    /// count ≥ 1, F32 or BF16 rows, U8 modality), shapes (rows have
    /// `examples` rows and the width of the matching mean) and finite
    /// values. Errors are [`ErrorKind::Stats`] naming file and tensor
    /// (I/O errors and a missing file keep their kinds).
    pub fn load(path: &Path) -> Result<Self> {
        let file = Arc::new(Checkpoint::open_file(path).map_err(as_stats_error)?);
        let err = |msg: String| Error::new(ErrorKind::Stats, msg).with_file(path);
        let meta = file.metadata();
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(err(format!(
                    "`__metadata__` format is `{f}`, not `{FORMAT}`: not an activation statistics file"
                )))
            }
            None => {
                return Err(err(format!(
                    "no `format` in `__metadata__`: not an activation statistics file (format `{FORMAT}`)"
                )))
            }
        }
        let version = match meta.get("version").map(String::as_str) {
            Some(v @ (FORMAT_VERSION | FORMAT_VERSION_GRAM)) => v.to_string(),
            other => {
                return Err(err(format!(
                    "statistics format version {}; this flatmerge reads versions \
                     {FORMAT_VERSION} and {FORMAT_VERSION_GRAM}",
                    other.map_or_else(|| "missing".to_string(), |v| format!("`{v}`"))
                )))
            }
        };
        let examples = meta
            .get("examples")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                err("`__metadata__` has no `examples` count (a non-negative integer)".into())
            })?;
        let mut stats = ActivationStats {
            examples,
            model: meta.get("model").cloned().unwrap_or_default(),
            probe: meta.get("probe").cloned().unwrap_or_default(),
            layers: BTreeMap::new(),
            modality: None,
            gram_shared: parse_gram_shared(meta.get(GRAM_SHARED_KEY))
                .map_err(|m| err(m).with_tensor(format!("__metadata__.{GRAM_SHARED_KEY}")))?,
            sources: parse_sources(meta.get(SOURCES_KEY))
                .map_err(|m| err(m).with_tensor(format!("__metadata__.{SOURCES_KEY}")))?,
        };

        for info in file.tensors() {
            let name = info.name.as_str();
            let terr = |msg: String| err(msg).with_tensor(name);
            let view = file
                .view(name)
                .ok_or_else(|| terr("the tensor cannot be read".into()))?;
            if name == MODALITY_TENSOR {
                if view.dtype != Dtype::U8 || view.shape.len() != 1 {
                    return Err(terr(format!(
                        "must be U8 of shape [examples], not {} {:?}",
                        view.dtype, view.shape
                    )));
                }
                stats.modality = Some(view.data.to_vec());
                continue;
            }
            let Some((layer, suffix)) = split_name(name) else {
                return Err(terr(
                    "not a statistics tensor: expected `<layer>.x_mean`, `.y_mean`, `.count`, \
                     `.x_rows`, `.y_rows`, `.x_gram` or `probe.modality`"
                        .into(),
                ));
            };
            let entry = stats.layers.entry(layer.to_string()).or_default();
            match suffix {
                Suffix::XMean | Suffix::YMean => {
                    if view.dtype != Dtype::F32 || view.shape.len() != 1 {
                        return Err(terr(format!(
                            "a mean must be F32 of rank 1, not {} {:?}",
                            view.dtype, view.shape
                        )));
                    }
                    let slot = if suffix == Suffix::XMean {
                        &mut entry.x_mean
                    } else {
                        &mut entry.y_mean
                    };
                    *slot = Some(view.to_f32_vec());
                }
                Suffix::Count => {
                    let value = <[u8; 8]>::try_from(view.data)
                        .ok()
                        .filter(|_| view.dtype == Dtype::I64 && view.shape == [1])
                        .map(i64::from_le_bytes)
                        .ok_or_else(|| {
                            terr(format!(
                                "a count must be I64 of shape [1], not {} {:?}",
                                view.dtype, view.shape
                            ))
                        })?;
                    // Zero or negative: a layer no token went through.
                    let count = u64::try_from(value)
                        .ok()
                        .filter(|&c| c >= 1)
                        .ok_or_else(|| terr(format!("count is {value}; it must be at least 1")))?;
                    entry.count = Some(count);
                }
                Suffix::XRows | Suffix::YRows => {
                    let rows = read_rows(&view).ok_or_else(|| {
                        terr(format!(
                            "rows must be F32 or BF16 of rank 2, not {} {:?}",
                            view.dtype, view.shape
                        ))
                    })?;
                    let slot = if suffix == Suffix::XRows {
                        &mut entry.x_rows
                    } else {
                        &mut entry.y_rows
                    };
                    *slot = Some(rows);
                }
                Suffix::XGram => {
                    if version != FORMAT_VERSION_GRAM {
                        return Err(terr(format!(
                            "a Gram in a version {version} file: files with Grams are \
                             version {FORMAT_VERSION_GRAM}"
                        )));
                    }
                    let square = matches!(*view.shape, [a, b] if a == b);
                    if view.dtype != Dtype::F32 || !square {
                        return Err(terr(format!(
                            "a Gram must be F32 of shape [in, in], not {} {:?}",
                            view.dtype, view.shape
                        )));
                    }
                    // Checked now, one at a time; decoded again when used.
                    let width = view.shape[0];
                    let mut gram = view.to_f32_vec();
                    symmetrize(&mut gram, width).map_err(&terr)?;
                    check_gram_values(&gram, width).map_err(terr)?;
                    drop(gram);
                    file.release(name);
                    entry.x_gram = Some(Gram {
                        width,
                        data: GramData::Mapped {
                            file: Arc::clone(&file),
                            tensor: name.to_string(),
                        },
                    });
                }
            }
        }
        stats.check(path)?;
        Ok(stats)
    }

    /// Checks what the file format cannot express by itself: sizes agree,
    /// counts are positive, values are finite. Errors name `path`.
    fn check(&self, path: &Path) -> Result<()> {
        let err = |tensor: String, msg: String| {
            Error::new(ErrorKind::Stats, msg)
                .with_file(path)
                .with_tensor(tensor)
        };
        if let Some(modality) = &self.modality {
            if modality.len() as u64 != self.examples {
                return Err(err(
                    MODALITY_TENSOR.into(),
                    format!(
                        "{} entries, but the file has {} examples",
                        modality.len(),
                        self.examples
                    ),
                ));
            }
        }
        for (layer, s) in &self.layers {
            let tensor = |suffix: Suffix| format!("{layer}.{}", suffix.as_str());
            if layer.is_empty() {
                return Err(err(String::new(), "a layer has an empty name".into()));
            }
            if s.is_empty() {
                return Err(err(layer.clone(), "the layer has no statistics".into()));
            }
            if s.count == Some(0) {
                return Err(err(
                    tensor(Suffix::Count),
                    "count must be at least 1".into(),
                ));
            }
            if s.count.is_some_and(|c| i64::try_from(c).is_err()) {
                return Err(err(
                    tensor(Suffix::Count),
                    "count does not fit an I64".into(),
                ));
            }
            if let Some(gram) = &s.x_gram {
                let width = gram.width();
                if let GramData::Values(values) = &gram.data {
                    if width * width != values.len() {
                        return Err(err(
                            tensor(Suffix::XGram),
                            format!("{} values: not a square [in, in] matrix", values.len()),
                        ));
                    }
                    check_gram_values(values, width).map_err(|m| err(tensor(Suffix::XGram), m))?;
                }
                if let Some(mean) = s.x_mean.as_ref().filter(|m| m.len() != width) {
                    return Err(err(
                        tensor(Suffix::XGram),
                        format!(
                            "shape [{width}, {width}], but `{}` has length {}: a Gram is [in, in]",
                            tensor(Suffix::XMean),
                            mean.len()
                        ),
                    ));
                }
                if self.gram_shared.contains_key(layer) {
                    return Err(err(
                        tensor(Suffix::XGram),
                        format!(
                            "the layer has its own Gram but `{GRAM_SHARED_KEY}` says it shares \
                             `{}`'s",
                            self.gram_shared[layer]
                        ),
                    ));
                }
            }
            for (suffix, mean, rows) in [
                (Suffix::XMean, &s.x_mean, &s.x_rows),
                (Suffix::YMean, &s.y_mean, &s.y_rows),
            ] {
                if mean
                    .as_deref()
                    .is_some_and(|m| m.iter().any(|v| !v.is_finite()))
                {
                    return Err(err(tensor(suffix), "holds a NaN or infinite value".into()));
                }
                let Some(rows) = rows else { continue };
                let rows_suffix = if suffix == Suffix::XMean {
                    Suffix::XRows
                } else {
                    Suffix::YRows
                };
                let rows_name = tensor(rows_suffix);
                if rows.rows.checked_mul(rows.width) != Some(rows.data.len()) {
                    return Err(err(
                        rows_name,
                        format!(
                            "{} values for {} rows of width {}",
                            rows.data.len(),
                            rows.rows,
                            rows.width
                        ),
                    ));
                }
                if rows.rows as u64 != self.examples {
                    return Err(err(
                        rows_name,
                        format!(
                            "{} rows, but the file has {} examples",
                            rows.rows, self.examples
                        ),
                    ));
                }
                if let Some(mean) = mean {
                    if mean.len() != rows.width {
                        return Err(err(
                            rows_name,
                            format!(
                                "rows of width {}, but `{}` has length {}",
                                rows.width,
                                tensor(suffix),
                                mean.len()
                            ),
                        ));
                    }
                }
                if rows.data.iter().any(|v| !v.is_finite()) {
                    return Err(err(rows_name, "holds a NaN or infinite value".into()));
                }
            }
        }
        let meta_tensor = format!("__metadata__.{GRAM_SHARED_KEY}");
        for (alias, owner) in &self.gram_shared {
            let refuse = |msg: String| Err(err(meta_tensor.clone(), msg));
            let Some(owner_stats) = self.layers.get(owner) else {
                return refuse(format!(
                    "`{alias}` shares the Gram of `{owner}`, which is not a layer of the file"
                ));
            };
            let Some(width) = owner_stats.gram_width() else {
                return refuse(format!(
                    "`{alias}` shares the Gram of `{owner}`, which has no `x_gram`"
                ));
            };
            if let Some(w) = self
                .layers
                .get(alias)
                .and_then(|a| a.x_mean.as_ref())
                .map(Vec::len)
                .filter(|&w| w != width)
            {
                return refuse(format!(
                    "`{alias}` (input width {w}) shares the Gram of `{owner}` (width {width})"
                ));
            }
        }
        if let Some(sources) = &self.sources {
            if sources.windows(2).any(|w| w[0] >= w[1]) {
                return Err(err(
                    format!("__metadata__.{SOURCES_KEY}"),
                    "the sources must be sorted and distinct".into(),
                ));
            }
        }
        Ok(())
    }

    /// Writes the statistics to `path` atomically (a temporary file beside
    /// it, renamed when complete); rows are written as F32. Layers are
    /// written in name order, each as `x_mean, y_mean, count, x_rows,
    /// y_rows`, then `probe.modality`. Inconsistent statistics (the checks
    /// of [`load`](Self::load)) are refused with [`ErrorKind::Stats`].
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check(path)?;
        // Values are encoded one tensor at a time while writing, so rows
        // are never held twice.
        let mut tensors = Vec::new();
        let mut data: Vec<Payload<'_>> = Vec::new();
        for (layer, s) in &self.layers {
            let name = |suffix: Suffix| format!("{layer}.{}", suffix.as_str());
            if let Some(m) = &s.x_mean {
                tensors.push(OutputTensor::new(
                    name(Suffix::XMean),
                    Dtype::F32,
                    vec![m.len()],
                ));
                data.push(Payload::F32(m));
            }
            if let Some(m) = &s.y_mean {
                tensors.push(OutputTensor::new(
                    name(Suffix::YMean),
                    Dtype::F32,
                    vec![m.len()],
                ));
                data.push(Payload::F32(m));
            }
            if let Some(c) = s.count {
                tensors.push(OutputTensor::new(name(Suffix::Count), Dtype::I64, vec![1]));
                // `check` made sure the count fits an i64.
                data.push(Payload::Bytes((c as i64).to_le_bytes().to_vec()));
            }
            for (suffix, rows) in [(Suffix::XRows, &s.x_rows), (Suffix::YRows, &s.y_rows)] {
                if let Some(r) = rows {
                    tensors.push(OutputTensor::new(
                        name(suffix),
                        Dtype::F32,
                        vec![r.rows, r.width],
                    ));
                    data.push(Payload::F32(&r.data));
                }
            }
            if let Some(g) = &s.x_gram {
                tensors.push(OutputTensor::new(
                    name(Suffix::XGram),
                    Dtype::F32,
                    vec![g.width(), g.width()],
                ));
                data.push(Payload::Gram(g));
            }
        }
        if let Some(m) = &self.modality {
            tensors.push(OutputTensor::new(MODALITY_TENSOR, Dtype::U8, vec![m.len()]));
            data.push(Payload::Bytes(m.clone()));
        }
        let version = if self.has_grams() {
            FORMAT_VERSION_GRAM
        } else {
            FORMAT_VERSION
        };
        let mut metadata: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", version.to_string()),
            ("examples", self.examples.to_string()),
            ("model", self.model.clone()),
            ("probe", self.probe.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if !self.gram_shared.is_empty() {
            let json = serde_json::to_string(&self.gram_shared).map_err(|e| {
                Error::new(
                    ErrorKind::Stats,
                    format!("cannot encode `{GRAM_SHARED_KEY}`: {e}"),
                )
            })?;
            metadata.insert(GRAM_SHARED_KEY.into(), json);
        }
        if let Some(sources) = &self.sources {
            let json = serde_json::to_string(sources).map_err(|e| {
                Error::new(
                    ErrorKind::Stats,
                    format!("cannot encode `{SOURCES_KEY}`: {e}"),
                )
            })?;
            metadata.insert(SOURCES_KEY.into(), json);
        }
        write_atomically(path, |temp| {
            let mut writer = SafetensorsWriter::create(temp, &tensors, &metadata)?;
            for (t, payload) in tensors.iter().zip(&data) {
                match payload {
                    Payload::F32(values) => writer.write_tensor(&t.name, &f32_bytes(values))?,
                    Payload::Gram(gram) => {
                        writer.write_tensor(&t.name, &f32_bytes(&gram.values()))?
                    }
                    Payload::Bytes(bytes) => writer.write_tensor(&t.name, bytes)?,
                }
            }
            writer.finish()
        })
    }
}

/// The rows of an F32 or BF16 rank-2 tensor, `None` for another dtype or rank.
fn read_rows(view: &TensorView<'_>) -> Option<Rows> {
    if !matches!(view.dtype, Dtype::F32 | Dtype::BF16) {
        return None;
    }
    let [rows, width] = *view.shape else {
        return None;
    };
    Some(Rows {
        rows,
        width,
        data: view.to_f32_vec(),
    })
}

/// The `gram_shared` metadata: a JSON object of alias → owner names.
fn parse_gram_shared(
    text: Option<&String>,
) -> std::result::Result<BTreeMap<String, String>, String> {
    let Some(text) = text else {
        return Ok(BTreeMap::new());
    };
    let map: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
        format!("not a JSON object of layer names (alias → layer storing the Gram): {e}")
    })?;
    if let Some((alias, owner)) = map.iter().find(|(a, o)| map.contains_key(*o) || a == o) {
        return Err(format!(
            "`{alias}` shares the Gram of `{owner}`, which is itself an alias: name the layer \
             storing the Gram"
        ));
    }
    Ok(map)
}

/// The `sources` metadata: a JSON array of strings.
fn parse_sources(text: Option<&String>) -> std::result::Result<Option<Vec<String>>, String> {
    let Some(text) = text else { return Ok(None) };
    let sources: Vec<String> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON array of probe source names: {e}"))?;
    Ok(Some(sources))
}

/// The first `(i, j)`, `i < j`, where `gram` (`[width, width]`) differs
/// from its transpose by more than `tolerance · √(G_ii · G_jj)` (exactly
/// symmetric required when `tolerance` is 0).
fn asymmetry(gram: &[f32], width: usize, tolerance: f64) -> Option<(usize, usize)> {
    (0..width).find_map(|i| {
        (i + 1..width)
            .find(|&j| {
                let (a, b) = (gram[i * width + j], gram[j * width + i]);
                if a == b {
                    return false;
                }
                let scale = (gram[i * width + i] as f64 * gram[j * width + j] as f64)
                    .abs()
                    .sqrt();
                (a as f64 - b as f64).abs() > tolerance * scale
            })
            .map(|j| (i, j))
    })
}

/// Accepts a foreign writer's rounding asymmetry
/// ([`GRAM_SYMMETRY_TOLERANCE`]) and mirrors the upper triangle onto the
/// lower; larger asymmetry is an error. Non-finite values are left for
/// [`ActivationStats::check`] to name.
fn symmetrize(gram: &mut [f32], width: usize) -> std::result::Result<(), String> {
    if gram.iter().any(|v| !v.is_finite()) {
        return Ok(());
    }
    if let Some((i, j)) = asymmetry(gram, width, GRAM_SYMMETRY_TOLERANCE) {
        return Err(format!(
            "not symmetric: entry [{i}, {j}] is {} but [{j}, {i}] is {} (tolerance 2^-16 · \
             √(G_ii · G_jj))",
            gram[i * width + j],
            gram[j * width + i]
        ));
    }
    mirror_upper(gram, width);
    Ok(())
}

/// Copies the upper triangle of `gram` onto the lower.
fn mirror_upper(gram: &mut [f32], width: usize) {
    for i in 0..width {
        for j in i + 1..width {
            gram[j * width + i] = gram[i * width + j];
        }
    }
}

/// What every Gram must be: finite, with a non-negative diagonal, exactly
/// symmetric.
fn check_gram_values(gram: &[f32], width: usize) -> std::result::Result<(), String> {
    if gram.iter().any(|v| !v.is_finite()) {
        return Err("holds a NaN or infinite value".into());
    }
    if let Some(i) = (0..width).find(|&i| gram[i * width + i] < 0.0) {
        return Err(format!(
            "diagonal entry {i} is {}: a second moment is never negative",
            gram[i * width + i]
        ));
    }
    if let Some((i, j)) = asymmetry(gram, width, 0.0) {
        return Err(format!(
            "not symmetric: entry [{i}, {j}] is {} but [{j}, {i}] is {}",
            gram[i * width + j],
            gram[j * width + i]
        ));
    }
    Ok(())
}
