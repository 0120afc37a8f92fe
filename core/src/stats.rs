//! Activation statistics files (SPEC §4): a safetensors file whose
//! `__metadata__` says `format = "flatmerge.activations"`, `version = "1"`,
//! `examples = N`, and which holds, for each layer `L` (a weight's name
//! without `.weight`), `L.x_mean`, `L.y_mean`, `L.count` and optionally the
//! per-example rows `L.x_rows`, `L.y_rows`, plus `probe.modality`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{write_atomically, Checkpoint, OutputTensor, SafetensorsWriter, TensorView};

/// The `format` metadata value of a statistics file.
pub const FORMAT: &str = "flatmerge.activations";

/// The `version` metadata value this library reads and writes.
pub const FORMAT_VERSION: &str = "1";

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
}

impl LayerStats {
    fn is_empty(&self) -> bool {
        self.x_mean.is_none()
            && self.y_mean.is_none()
            && self.count.is_none()
            && self.x_rows.is_none()
            && self.y_rows.is_none()
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
}

/// The statistics a tensor name ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suffix {
    XMean,
    YMean,
    Count,
    XRows,
    YRows,
}

impl Suffix {
    const ALL: [Suffix; 5] = [
        Suffix::XMean,
        Suffix::YMean,
        Suffix::Count,
        Suffix::XRows,
        Suffix::YRows,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Suffix::XMean => "x_mean",
            Suffix::YMean => "y_mean",
            Suffix::Count => "count",
            Suffix::XRows => "x_rows",
            Suffix::YRows => "y_rows",
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
        }
    }

    /// The statistics of layer `name`, if any.
    pub fn layer(&self, name: &str) -> Option<&LayerStats> {
        self.layers.get(name)
    }

    /// Reads and validates a statistics file: metadata (`format`,
    /// `version`, `examples`), tensor names, dtypes (F32 means, I64 `[1]`
    /// count ≥ 1, F32 or BF16 rows, U8 modality), shapes (rows have
    /// `examples` rows and the width of the matching mean) and finite
    /// values. Errors are [`ErrorKind::Stats`] naming file and tensor
    /// (I/O errors and a missing file keep their kinds).
    pub fn load(path: &Path) -> Result<Self> {
        let file = Checkpoint::open_file(path).map_err(as_stats_error)?;
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
        match meta.get("version").map(String::as_str) {
            Some(FORMAT_VERSION) => {}
            other => {
                return Err(err(format!(
                    "statistics format version {}; this flatmerge reads version {FORMAT_VERSION}",
                    other.map_or_else(|| "missing".to_string(), |v| format!("`{v}`"))
                )))
            }
        }
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
                     `.x_rows`, `.y_rows` or `probe.modality`"
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
        }
        if let Some(m) = &self.modality {
            tensors.push(OutputTensor::new(MODALITY_TENSOR, Dtype::U8, vec![m.len()]));
            data.push(Payload::Bytes(m.clone()));
        }
        let metadata: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", FORMAT_VERSION.to_string()),
            ("examples", self.examples.to_string()),
            ("model", self.model.clone()),
            ("probe", self.probe.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        write_atomically(path, |temp| {
            let mut writer = SafetensorsWriter::create(temp, &tensors, &metadata)?;
            for (t, payload) in tensors.iter().zip(&data) {
                match payload {
                    Payload::F32(values) => writer.write_tensor(&t.name, &f32_bytes(values))?,
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
