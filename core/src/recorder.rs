//! The activation recorder (SPEC §1.1, §4): framework hooks push
//! `(layer, x [rows × in], y [rows × out], example id, modality)` batches,
//! from any number of threads at once, and the recorder writes the
//! statistics file of SPEC §4.
//!
//! # Exact, order-free accumulation
//!
//! SPEC §4 says means are "accumulated in f64". An f64 sum depends on the
//! order of its terms, and hooks running on several threads push in an
//! order nobody controls; the file would then differ from run to run. The
//! recorder therefore does more than the SPEC asks: it sums **exactly**, in
//! fixed point. Each f32 value `v` becomes the integer
//! `q = (v as f64 × 2^60) as i128` (the f64 product is exact; the cast
//! truncates toward zero). `q` is exactly `v × 2^60` whenever
//! `|v| ≥ 2^-37` (every bit of the 24-bit significand then lies at or above
//! 2^-60); smaller values lose their bits below 2^-60, and values below
//! 2^-60 count as 0 — far below anything an f32 mean can show. Integer
//! addition is associative and commutative, so every order, every split of
//! a batch into smaller batches, and every interleaving of threads gives
//! the same sums and therefore the same file, byte for byte. A mean is
//! `((Σq as f64) / 2^60) / count`, rounded to f32.
//!
//! Range: a value with `|v| > 2^60`, a NaN or an infinity is refused with an
//! error naming the layer, the row and the column. Sums are kept modulo
//! 2^128 (wrapping adds, which stay associative) together with the
//! saturating total `Σ|q|` of the layer; while that total is at most
//! `2^127 − 1` no partial sum in any order can overflow, so the sums are
//! exact. A layer whose activations reach `Σ|v| ≥ 2^67` is refused (by the
//! push that crosses the bound, and again when saving) — whatever the
//! order, since the total does not depend on it.
//!
//! # Examples and rows
//!
//! With [`RecorderOptions::max_examples`] `= M > 0`, the recorder also keeps
//! the per-example mean rows `L.x_rows` / `L.y_rows`: row `n` is the mean
//! over the tokens of example id `n` (ids count from 0, as probe examples
//! are numbered). Ids `≥ M` count in the means but have no row.
//!
//! - `N`, the row count and the `examples` metadata, is `min(max id + 1, M)`
//!   over all pushes. Every id below `N` must have been pushed at least once
//!   (to any layer); a gap is an error when the statistics are built, since
//!   that example has no modality.
//! - An example that was pushed but never reached some layer (a vision
//!   tower's layers never see a text-only example; a mixture-of-experts
//!   expert sees only the tokens routed to it) gets a row of zeros in that
//!   layer by default ([`MissingRows::Zero`]: "no activation"), or an error
//!   with [`MissingRows::Error`].
//! - With `M = 0` no rows and no `probe.modality` are written, and
//!   `examples` is the number of distinct example ids pushed.
//! - `probe.modality[n]` is the modality pushed with example `n`; two
//!   different modalities for one example id are an error.
//!
//! # Threads and memory
//!
//! Every method takes `&self`; a `Recorder` is `Send + Sync`. A push
//! converts and sums its batch with no lock held, then takes the layer's
//! own lock only to add `in + out` integers (twice when the example has a
//! row). A global lock guards the example → modality table for one map
//! look-up per push. The recorder holds, per layer, `16 × (in + out)` bytes
//! of sums, plus as much again for each example id below `M` that reached
//! the layer (four times the rows' size in the file): choose `M` with that
//! in mind.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use crate::dtype::bf16_to_f32;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::{ActivationStats, LayerStats, Rows};

/// The fixed-point scale, `2^60`.
const SCALE: f64 = (1u64 << 60) as f64;

/// The largest magnitude a pushed value may have, `2^60`.
pub const MAX_ABS_VALUE: f32 = (1u64 << 60) as f32;

/// `v × 2^60`, truncated toward zero; `None` for NaN, ±∞ and `|v| > 2^60`.
#[inline]
fn to_fixed(v: f32) -> Option<i128> {
    if v.is_nan() || v.abs() > MAX_ABS_VALUE {
        return None;
    }
    Some((v as f64 * SCALE) as i128)
}

/// `(Σq / 2^60) / count` as f32.
#[inline]
fn mean(sum: i128, count: u64) -> f32 {
    ((sum as f64 / SCALE) / count as f64) as f32
}

/// What to write in an example's row of a layer the example never reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingRows {
    /// A row of zeros ("no activation"); the default.
    #[default]
    Zero,
    /// Refuse to build the statistics.
    Error,
}

/// How a [`Recorder`] keeps rows and describes its file.
#[derive(Debug, Clone, Default)]
pub struct RecorderOptions {
    /// Keep per-example rows for example ids below this (0: means only).
    pub max_examples: usize,
    /// Free-form description of the model (the file's `model` metadata).
    pub model: String,
    /// Free-form description of the probe set (the file's `probe` metadata).
    pub probe: String,
    /// Rows of examples that never reached a layer.
    pub missing_rows: MissingRows,
}

/// Activations as the hook has them: f32 values, or bf16 bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Activations<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values as their `u16` bit patterns (exactly representable in f32).
    Bf16(&'a [u16]),
}

impl Activations<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Activations::F32(v) => v.len(),
            Activations::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One push: `rows` tokens of one example through one layer.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The layer (its weight's name without `.weight`).
    pub layer: &'a str,
    /// Number of tokens (at least 1).
    pub rows: usize,
    /// The layer's inputs, row-major `[rows, in]`.
    pub x: Activations<'a>,
    /// The layer's outputs before any nonlinearity, row-major `[rows, out]`.
    pub y: Activations<'a>,
    /// The probe example the tokens belong to (row `example` of the rows).
    pub example: u64,
    /// The example's modality (0 text, 1 vision, 2 audio, …).
    pub modality: u8,
}

/// Exact sums of one example's tokens through one layer.
#[derive(Debug)]
struct Sums {
    count: u64,
    x: Vec<i128>,
    y: Vec<i128>,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.count = self.count.saturating_add(other.count);
        for (a, b) in self.x.iter_mut().zip(&other.x) {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.y.iter_mut().zip(&other.y) {
            *a = a.wrapping_add(*b);
        }
    }
}

#[derive(Debug)]
struct LayerAcc {
    total: Sums,
    /// Saturating `Σ|q|` over every value pushed to the layer.
    magnitude: u128,
    /// Per-example sums, for ids below `max_examples`.
    examples: BTreeMap<u64, Sums>,
}

#[derive(Debug)]
struct Layer {
    in_width: usize,
    out_width: usize,
    acc: Mutex<LayerAcc>,
}

/// Records activation statistics from concurrent hooks; see the module
/// documentation for the exact accumulation and the row semantics.
#[derive(Debug)]
pub struct Recorder {
    options: RecorderOptions,
    layers: RwLock<HashMap<String, Arc<Layer>>>,
    modality: Mutex<BTreeMap<u64, u8>>,
}

fn invalid(layer: &str, msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg).with_tensor(layer)
}

const POISONED: &str = "a thread panicked while recording; the statistics are incomplete";

fn poisoned(layer: &str) -> Error {
    invalid(layer, POISONED.into())
}

fn poisoned_recorder() -> Error {
    Error::new(ErrorKind::InvalidInput, POISONED)
}

/// Column sums of `data` (`[rows, width]`) in fixed point, and `Σ|q|`.
fn column_sums<T: Copy>(
    data: &[T],
    width: usize,
    decode: impl Fn(T) -> f32,
) -> std::result::Result<(Vec<i128>, u128), (usize, usize, f32)> {
    let mut sums = vec![0i128; width];
    let mut magnitude = 0u128;
    for (r, row) in data.chunks_exact(width).enumerate() {
        for (c, (&raw, s)) in row.iter().zip(sums.iter_mut()).enumerate() {
            let v = decode(raw);
            let q = to_fixed(v).ok_or((r, c, v))?;
            *s = s.wrapping_add(q);
            magnitude = magnitude.saturating_add(q.unsigned_abs());
        }
    }
    Ok((sums, magnitude))
}

fn sums_of(
    layer: &str,
    which: &str,
    values: Activations<'_>,
    width: usize,
) -> Result<(Vec<i128>, u128)> {
    let sums = match values {
        Activations::F32(v) => column_sums(v, width, |x| x),
        Activations::Bf16(v) => column_sums(v, width, bf16_to_f32),
    };
    sums.map_err(|(r, c, v)| {
        let what = if v.is_nan() {
            "NaN".to_string()
        } else if v.is_infinite() {
            "infinite".to_string()
        } else {
            format!("{v:e}, beyond the recorder's range ±2^60")
        };
        invalid(layer, format!("{which} row {r}, column {c} is {what}"))
    })
}

impl Recorder {
    /// An empty recorder.
    pub fn new(options: RecorderOptions) -> Recorder {
        Recorder {
            options,
            layers: RwLock::new(HashMap::new()),
            modality: Mutex::new(BTreeMap::new()),
        }
    }

    /// The options the recorder was made with.
    pub fn options(&self) -> &RecorderOptions {
        &self.options
    }

    /// Pushes `rows` f32 tokens of example `example` through `layer`:
    /// [`push`](Self::push) with [`Activations::F32`].
    pub fn push_f32(
        &self,
        layer: &str,
        rows: usize,
        x: &[f32],
        y: &[f32],
        example: u64,
        modality: u8,
    ) -> Result<()> {
        self.push(&Batch {
            layer,
            rows,
            x: Activations::F32(x),
            y: Activations::F32(y),
            example,
            modality,
        })
    }

    /// Pushes `rows` bf16 tokens (bit patterns) of example `example` through
    /// `layer`: [`push`](Self::push) with [`Activations::Bf16`].
    pub fn push_bf16(
        &self,
        layer: &str,
        rows: usize,
        x: &[u16],
        y: &[u16],
        example: u64,
        modality: u8,
    ) -> Result<()> {
        self.push(&Batch {
            layer,
            rows,
            x: Activations::Bf16(x),
            y: Activations::Bf16(y),
            example,
            modality,
        })
    }

    /// Adds a batch. The first batch of a layer sets its widths
    /// (`x.len() / rows`, `y.len() / rows`); later batches must match them.
    ///
    /// Errors ([`ErrorKind::InvalidInput`], naming the layer): an empty
    /// layer name, `rows == 0`, a slice length that is not `rows × width`
    /// (or, for a new layer, not a positive multiple of `rows`), a NaN,
    /// infinite or too large value (with its row and column), a modality
    /// that differs from an earlier push of the same example, a layer whose
    /// activations are too large to sum exactly. A refused batch adds
    /// nothing (except in the last case, where the layer is then refused
    /// for good, and in a race of two first batches of one layer with
    /// different widths, where the refused one may have noted its
    /// example's modality).
    pub fn push(&self, batch: &Batch<'_>) -> Result<()> {
        let layer = batch.layer;
        if layer.is_empty() {
            return Err(invalid(layer, "the layer name is empty".into()));
        }
        if batch.rows == 0 {
            return Err(invalid(layer, "a batch needs at least one row".into()));
        }
        let known = self.get_layer(layer)?;
        let (in_width, out_width) = match &known {
            Some(l) => (l.in_width, l.out_width),
            None => (
                self.new_width(layer, "x", batch.x.len(), batch.rows)?,
                self.new_width(layer, "y", batch.y.len(), batch.rows)?,
            ),
        };
        check_len(layer, "x", "input", batch.x.len(), batch.rows, in_width)?;
        check_len(layer, "y", "output", batch.y.len(), batch.rows, out_width)?;

        // The heavy part, with no lock held.
        let (x, mx) = sums_of(layer, "x", batch.x, in_width)?;
        let (y, my) = sums_of(layer, "y", batch.y, out_width)?;
        let sums = Sums {
            count: batch.rows as u64,
            x,
            y,
        };

        let target = match known {
            Some(l) => l,
            None => {
                // A conflicting modality must not leave a new layer behind.
                self.note_modality(layer, batch.example, batch.modality, false)?;
                self.insert_layer(layer, in_width, out_width)?
            }
        };
        self.note_modality(layer, batch.example, batch.modality, true)?;

        let mut acc = target.acc.lock().map_err(|_| poisoned(layer))?;
        acc.magnitude = acc.magnitude.saturating_add(mx).saturating_add(my);
        acc.total.add(&sums);
        if batch.example < self.options.max_examples as u64 {
            match acc.examples.get_mut(&batch.example) {
                Some(e) => e.add(&sums),
                None => {
                    acc.examples.insert(batch.example, sums);
                }
            }
        }
        check_magnitude(layer, &acc)
    }

    fn get_layer(&self, layer: &str) -> Result<Option<Arc<Layer>>> {
        let map = self.layers.read().map_err(|_| poisoned(layer))?;
        Ok(map.get(layer).cloned())
    }

    fn new_width(&self, layer: &str, which: &str, len: usize, rows: usize) -> Result<usize> {
        if len == 0 || len % rows != 0 {
            return Err(invalid(
                layer,
                format!(
                    "{which} has {len} values, not a positive multiple of {rows} rows \
                     (the first batch of a layer sets its width)"
                ),
            ));
        }
        Ok(len / rows)
    }

    /// The layer `layer`, created with these widths if absent; errors if
    /// another thread created it first with other widths.
    fn insert_layer(&self, layer: &str, in_width: usize, out_width: usize) -> Result<Arc<Layer>> {
        let mut map = self.layers.write().map_err(|_| poisoned(layer))?;
        let entry = map.entry(layer.to_string()).or_insert_with(|| {
            Arc::new(Layer {
                in_width,
                out_width,
                acc: Mutex::new(LayerAcc {
                    total: Sums {
                        count: 0,
                        x: vec![0; in_width],
                        y: vec![0; out_width],
                    },
                    magnitude: 0,
                    examples: BTreeMap::new(),
                }),
            })
        });
        if (entry.in_width, entry.out_width) != (in_width, out_width) {
            return Err(invalid(
                layer,
                format!(
                    "a batch of width {in_width} → {out_width}, but the layer's first batch \
                     set {} → {}",
                    entry.in_width, entry.out_width
                ),
            ));
        }
        Ok(Arc::clone(entry))
    }

    /// Checks `modality` against earlier pushes of `example`, and records
    /// it when `record`.
    fn note_modality(&self, layer: &str, example: u64, modality: u8, record: bool) -> Result<()> {
        let mut map = self.modality.lock().map_err(|_| poisoned(layer))?;
        match map.get(&example) {
            Some(&m) if m != modality => Err(invalid(
                layer,
                format!(
                    "example {example} pushed with modality {modality}, \
                     but it was pushed with modality {m} before"
                ),
            )),
            Some(_) => Ok(()),
            None => {
                if record {
                    map.insert(example, modality);
                }
                Ok(())
            }
        }
    }

    /// The statistics recorded so far (the recorder keeps recording). The
    /// same pushes, in any order and from any threads, give equal results.
    /// Called while other threads push, it sees each push whole or not at
    /// all (an example whose pushes it does not see yet may get zero rows).
    ///
    /// Errors ([`ErrorKind::InvalidInput`]): an example id below the row
    /// count that was never pushed, a missing row with
    /// [`MissingRows::Error`], a layer whose sums exceeded the exact range.
    pub fn stats(&self) -> Result<ActivationStats> {
        let modality = self
            .modality
            .lock()
            .map_err(|_| poisoned_recorder())?
            .clone();
        let max_examples = self.options.max_examples as u64;
        let rows = match modality.keys().next_back() {
            Some(&last) if max_examples > 0 => last.saturating_add(1).min(max_examples),
            _ => 0,
        };
        let mut stats = ActivationStats::new(&self.options.model, &self.options.probe);
        if max_examples == 0 {
            stats.examples = modality.len() as u64;
        } else {
            stats.examples = rows;
            let mut column = Vec::with_capacity(rows as usize);
            for id in 0..rows {
                let m = modality.get(&id).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "example id {id} was never pushed, but ids up to {} were: \
                             examples must be numbered 0, 1, 2, … without gaps",
                            modality.keys().next_back().copied().unwrap_or(0)
                        ),
                    )
                })?;
                column.push(*m);
            }
            if rows > 0 {
                stats.modality = Some(column);
            }
        }

        let layers: Vec<(String, Arc<Layer>)> = {
            let map = self.layers.read().map_err(|_| poisoned_recorder())?;
            map.iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect()
        };
        for (name, layer) in layers {
            let acc = layer.acc.lock().map_err(|_| poisoned(&name))?;
            if acc.total.count == 0 {
                // Created by a batch that was then refused.
                continue;
            }
            check_magnitude(&name, &acc)?;
            let mut s = LayerStats {
                x_mean: Some(means(&acc.total.x, acc.total.count)),
                y_mean: Some(means(&acc.total.y, acc.total.count)),
                count: Some(acc.total.count),
                x_rows: None,
                y_rows: None,
            };
            if rows > 0 {
                let (x_rows, y_rows) = self.rows_of(&name, &layer, &acc, rows)?;
                s.x_rows = Some(x_rows);
                s.y_rows = Some(y_rows);
            }
            drop(acc);
            stats.layers.insert(name, s);
        }
        Ok(stats)
    }

    fn rows_of(
        &self,
        name: &str,
        layer: &Layer,
        acc: &LayerAcc,
        rows: u64,
    ) -> Result<(Rows, Rows)> {
        let n = rows as usize;
        let mut x = Vec::with_capacity(n * layer.in_width);
        let mut y = Vec::with_capacity(n * layer.out_width);
        for id in 0..rows {
            match acc.examples.get(&id) {
                Some(e) => {
                    x.extend(e.x.iter().map(|&q| mean(q, e.count)));
                    y.extend(e.y.iter().map(|&q| mean(q, e.count)));
                }
                None if self.options.missing_rows == MissingRows::Zero => {
                    x.resize(x.len() + layer.in_width, 0.0);
                    y.resize(y.len() + layer.out_width, 0.0);
                }
                None => {
                    return Err(invalid(
                        name,
                        format!("example {id} never reached this layer, so it has no row"),
                    ))
                }
            }
        }
        Ok((
            Rows {
                rows: n,
                width: layer.in_width,
                data: x,
            },
            Rows {
                rows: n,
                width: layer.out_width,
                data: y,
            },
        ))
    }

    /// Writes the statistics ([`stats`](Self::stats)) to `path` with
    /// [`ActivationStats::save`] (atomically). Errors name `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let stats = self.stats().map_err(|e| {
            if e.file().is_none() {
                e.with_file(path)
            } else {
                e
            }
        })?;
        stats.save(path)
    }
}

fn means(sums: &[i128], count: u64) -> Vec<f32> {
    sums.iter().map(|&q| mean(q, count)).collect()
}

fn check_len(
    layer: &str,
    which: &str,
    side: &str,
    len: usize,
    rows: usize,
    width: usize,
) -> Result<()> {
    if rows.checked_mul(width) == Some(len) {
        return Ok(());
    }
    Err(invalid(
        layer,
        format!(
            "{which} has {len} values for {rows} rows, but the layer's {side} width is {width} \
             (set by its first batch): expected {}",
            rows.saturating_mul(width)
        ),
    ))
}

fn check_magnitude(layer: &str, acc: &LayerAcc) -> Result<()> {
    if acc.magnitude > i128::MAX as u128 {
        return Err(invalid(
            layer,
            "the layer's activations are too large to sum exactly (Σ|v| reaches 2^67)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_is_exact_where_documented() {
        assert_eq!(to_fixed(1.0), Some(1i128 << 60));
        assert_eq!(to_fixed(-0.5), Some(-(1i128 << 59)));
        // The smallest normal with every significand bit at or above 2^-60.
        let v = f32::from_bits(0x2d7f_ffff); // just under 2^-36
        assert_eq!(to_fixed(v).unwrap() as f64, v as f64 * SCALE);
        assert_eq!(to_fixed(f32::MIN_POSITIVE), Some(0));
        assert_eq!(to_fixed(MAX_ABS_VALUE), Some(1i128 << 120));
        assert_eq!(to_fixed(MAX_ABS_VALUE * 2.0), None);
        assert_eq!(to_fixed(f32::NAN), None);
        assert_eq!(to_fixed(f32::NEG_INFINITY), None);
        assert_eq!(mean(3i128 << 60, 2), 1.5);
    }
}
