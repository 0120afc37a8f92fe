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
//! # Second moments (Grams)
//!
//! With [`RecorderOptions::gram`], the recorder also keeps each layer's
//! input Gram `Σ_tokens x xᵀ` and writes `L.x_gram = Gram / count` (SPEC §4
//! version 2; see [`crate::stats`]). An exact fixed-point sum of every
//! product would cost an i128 operation per product; instead:
//!
//! 1. each push computes its own `XᵀX` in f64, every entry
//!    `Σ_r x_ri · x_rj` summed over the push's rows in row order, one
//!    multiply and one add per term (no fused multiply-add, no
//!    reassociation: the tiling only changes which entries are computed
//!    together, never the order of an entry's terms), so a given push gives
//!    the same f64 matrix on every run, thread count and x86/ARM machine;
//! 2. each entry becomes the integer `(g × 2^50) as i128` (truncated toward
//!    zero: exact to 2^-50 ≈ 8.9·10^-16 absolute, about the f64 rounding of
//!    an entry of order 1);
//! 3. the integers are added to the layer's accumulator.
//!
//! **Guaranteed:** the same pushes in any order, from any number of
//! threads, interleaved in any way, give the same Gram sums and so the same
//! file, byte for byte; and files recorded on disjoint examples combine
//! into exactly the file of their union ([`combine_parts`]). **Not
//! guaranteed:** splitting one push into several (or merging pushes)
//! changes the f64 partial sums of step 1, so the Gram may differ in its
//! last bits (the means do not: they are exact per value). A push is one
//! example's tokens through one layer in the native probes.
//!
//! Range: a push whose diagonal entry `Σ_r x_ri²` exceeds 2^76 is refused,
//! and so is a layer whose total `Σ_pushes trace(XᵀX)` reaches 2^76
//! (by Cauchy–Schwarz every entry of every partial sum is then below
//! 2^126 in fixed point, so integer sums cannot overflow in any order).
//!
//! Only the upper triangle is kept (`in (in + 1) / 2` integers). Layers
//! reading the same input share one accumulator:
//! [`RecorderOptions::gram_shared`] maps an alias (k_proj) to the layer
//! whose Gram it shares (q_proj); the alias's pushes feed only its means,
//! and the file stores the owner's Gram and names the alias in its
//! `gram_shared` metadata. When the statistics are built, an alias whose
//! exact input sums or token count differ from its owner's is an error (it
//! did not read the same input). [`RecorderOptions::gram_layers`] limits
//! Grams to some layers, to bound memory (the native probes record a range
//! of blocks per pass).
//!
//! # Sums reduced elsewhere (partial moments)
//!
//! A hook whose activations live on an accelerator can reduce them there
//! and push only the sums: [`Recorder::push_moments`] takes one example's
//! exact fixed-point column sums (the integers `Σq` that [`Recorder::push`]
//! would compute, with their `Σ|q|`), and [`Recorder::add_gram_sums`] adds
//! fixed-point Gram sums (each push's f64 `XᵀX` truncated to 2^50, as in
//! steps 1–2 above, summed over any number of pushes). Both add the same
//! integers the host path adds, so a recording made of them is the file of
//! the host path, byte for byte. Integers are transported as [`limbs`]:
//! 32-bit limbs in i64, which an integer tensor can sum without overflow.
//!
//! # Partial state and combining
//!
//! Means rounded to f32 cannot be combined exactly, so a recording meant to
//! be combined is saved as a `.part` file ([`Recorder::save_part`]): a
//! safetensors file with `format = "flatmerge.activations.part"` holding
//! the exact integer sums (i128 as 16 little-endian bytes, tensors of dtype
//! U8 `[n, 16]`), token counts, the example ids with their modalities, and
//! the options (model, probe, `max_examples`, Gram settings, sources) as
//! metadata. [`combine_parts`] adds the parts' integers and writes the
//! statistics file: byte-identical to one recording of the union, since it
//! is built from the same integers. Parts from different models, probe
//! sets or options, or sharing an example id, are refused.
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
//!
//! Grams add, per layer that stores one, `16 × in (in + 1) / 2` bytes (a
//! 4096-wide input: 134 MB; 11008: 970 MB), and each push in flight holds
//! its rows in f64 (`8 × rows × in`) plus one strip of 32 Gram rows in f64
//! (`256 × in` bytes). The accumulators never depend on the number of
//! layers pushed without a Gram. Building the statistics adds the f32
//! `[in, in]` matrices of the file (`4 × in²` per stored Gram). For a
//! LLaMA-2-7B block (q/k/v sharing one 4096 Gram, o_proj 4096, gate/up
//! sharing one 4096 Gram, down_proj 11008) that is 1.37 GB of accumulators
//! plus 0.69 GB of f32 output: ten blocks per pass stay within 21 GB.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::dtype::Dtype;
use crate::dtype::{bf16_to_f32, f16_to_f32};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{write_atomically, Checkpoint, OutputTensor, SafetensorsWriter};
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
    /// Record each layer's input Gram (SPEC §4 version 2; module docs).
    pub gram: bool,
    /// With [`gram`](Self::gram): only these layers (owners or aliases of
    /// [`gram_shared`](Self::gram_shared)) get a Gram; `None`: every layer.
    pub gram_layers: Option<BTreeSet<String>>,
    /// Layers reading the same input as another: alias → owner. The alias
    /// shares the owner's accumulator and the file names it in its
    /// `gram_shared` metadata. An owner must not itself be an alias.
    pub gram_shared: BTreeMap<String, String>,
    /// The probe sources the recording is restricted to (the file's
    /// `sources` metadata; sorted and made distinct when written).
    pub sources: Option<Vec<String>>,
}

impl RecorderOptions {
    /// Whether `layer` records a Gram of its own (not an alias).
    fn stores_gram(&self, layer: &str) -> bool {
        self.gram
            && !self.gram_shared.contains_key(layer)
            && self.gram_layers.as_ref().is_none_or(|l| l.contains(layer))
    }

    /// Whether `layer`'s file entry has a Gram, stored or shared.
    fn has_gram(&self, layer: &str) -> bool {
        let owner = self.gram_shared.get(layer).map_or(layer, String::as_str);
        self.stores_gram(owner) && self.gram_layers.as_ref().is_none_or(|l| l.contains(layer))
    }
}

/// Activations as the hook has them: f32 values, or bf16 / f16 bit
/// patterns (both widen to f32 exactly, so a batch gives the same
/// statistics as its f32 widening).
#[derive(Debug, Clone, Copy)]
pub enum Activations<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values as their `u16` bit patterns (exactly representable in f32).
    Bf16(&'a [u16]),
    /// IEEE f16 values as their `u16` bit patterns (exactly representable in f32).
    F16(&'a [u16]),
}

impl Activations<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Activations::F32(v) => v.len(),
            Activations::Bf16(v) | Activations::F16(v) => v.len(),
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

/// One example's tokens through one layer, already summed
/// ([`Recorder::push_moments`]): the fixed-point sums `Σq` (`q = v × 2^60`
/// truncated toward zero, per value, exactly as [`Recorder::push`]
/// converts; sums modulo 2^128) of each input and output column.
#[derive(Debug, Clone, Copy)]
pub struct Moments<'a> {
    /// The layer (its weight's name without `.weight`).
    pub layer: &'a str,
    /// Number of tokens summed (at least 1).
    pub count: u64,
    /// `Σq` of each input column, `[in]`.
    pub x_sum: &'a [i128],
    /// `Σq` of each output column, `[out]`.
    pub y_sum: &'a [i128],
    /// `Σ|q|` over every input and output value, saturating at `u128::MAX`
    /// (the range check of the module docs).
    pub magnitude: u128,
    /// The probe example the tokens belong to.
    pub example: u64,
    /// The example's modality.
    pub modality: u8,
}

/// Fixed-point integers as 32-bit limbs in i64: `Σ_k limb_k × 2^(32k)`.
///
/// A limb holds at most 32 bits of one value, so an i64 sums `2^31` of
/// them without overflow: integer tensors (on any device) can sum the
/// limbs of many values, and the recorder rebuilds the exact integer sum.
/// Limbs need not be normalised (any i64, either sign).
pub mod limbs {
    /// Bits per limb.
    pub const BITS: u32 = 32;
    /// Limbs per value: 128 bits.
    pub const COUNT: usize = 4;

    /// `Σ_k limbs[k] × 2^(32k)` modulo 2^128 (the recorder's wrapping sums).
    pub fn to_i128(limbs: &[i64]) -> i128 {
        limbs.iter().enumerate().fold(0i128, |acc, (k, &l)| {
            acc.wrapping_add((l as i128).wrapping_shl(BITS * k as u32))
        })
    }

    /// `Σ_k limbs[k] × 2^(32k)` of non-negative limbs, saturating at
    /// `u128::MAX`; `None` for a negative limb.
    pub fn to_u128_saturating(limbs: &[i64]) -> Option<u128> {
        let mut sum = 0u128;
        for (k, &l) in limbs.iter().enumerate() {
            let l = u128::try_from(l).ok()?;
            let shift = BITS * k as u32;
            let term = if l == 0 {
                0
            } else if shift >= 128 || l.leading_zeros() < shift {
                u128::MAX
            } else {
                l << shift
            };
            sum = sum.saturating_add(term);
        }
        Some(sum)
    }
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

/// The upper triangle of `Σ x xᵀ` in fixed point (2^50), row-major: row
/// `i` holds columns `i..width`.
#[derive(Debug)]
struct GramAcc {
    sums: Vec<i128>,
    /// Saturating `Σ_pushes trace` in fixed point.
    magnitude: u128,
}

#[derive(Debug)]
struct Layer {
    in_width: usize,
    out_width: usize,
    acc: Mutex<LayerAcc>,
    /// Present when the layer stores its own Gram.
    gram: Option<Mutex<GramAcc>>,
}

/// The Gram's fixed-point scale, `2^50`.
const GRAM_SCALE: f64 = (1u64 << 50) as f64;

/// The largest total trace a Gram accumulates, `2^76` (in fixed point
/// `2^126`: no entry's partial sum can then overflow an i128).
const GRAM_MAX_TRACE: f64 = (1u128 << 76) as f64;

/// Gram rows computed together (one lock of the accumulator per strip).
const GRAM_STRIP: usize = 32;

/// Gram columns per tile inside a strip (the tile stays in L1/L2).
const GRAM_TILE: usize = 256;

/// Index of `(i, j)`, `i ≤ j`, in a packed upper triangle of `width`.
#[inline]
fn triangle_index(i: usize, j: usize, width: usize) -> usize {
    // Row k holds width − k entries; row i starts after rows 0..i.
    i * width - i * i.saturating_sub(1) / 2 + (j - i)
}

/// Number of entries of a packed upper triangle of `width`.
fn triangle_len(width: usize) -> usize {
    width * (width + 1) / 2
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
        Activations::F16(v) => column_sums(v, width, f16_to_f32),
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

/// The values of `values` as f64, row-major `[rows, width]`.
fn decode_f64(values: Activations<'_>) -> Vec<f64> {
    match values {
        Activations::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Activations::Bf16(v) => v.iter().map(|&x| bf16_to_f32(x) as f64).collect(),
        Activations::F16(v) => v.iter().map(|&x| f16_to_f32(x) as f64).collect(),
    }
}

/// A push's Gram, ready to add: its rows in f64 and its trace in fixed
/// point.
struct GramPush {
    x: Vec<f64>,
    trace: u128,
}

/// Checks the diagonal of `XᵀX` (each `Σ_r x_ri²`, in row order, as the
/// strips compute it) against the range, and returns the push.
fn gram_push(layer: &str, x: Vec<f64>, width: usize) -> Result<GramPush> {
    let mut diagonal = vec![0f64; width];
    for row in x.chunks_exact(width) {
        for (d, &v) in diagonal.iter_mut().zip(row) {
            *d += v * v;
        }
    }
    let mut trace = 0u128;
    for (i, &d) in diagonal.iter().enumerate() {
        if d > GRAM_MAX_TRACE {
            return Err(invalid(
                layer,
                format!("x column {i}: Σ x² over the batch is {d:e}, beyond the Gram's range 2^76"),
            ));
        }
        trace = trace.saturating_add((d * GRAM_SCALE) as u128);
    }
    Ok(GramPush { x, trace })
}

/// Rows `i0..i1` of `XᵀX`, columns `i0..width`, into `out`
/// (`[i1 − i0, width − i0]`): each entry summed over the rows in order,
/// one multiply and one add per row, whatever the tiling.
fn gram_strip(x: &[f64], width: usize, i0: usize, i1: usize, out: &mut Vec<f64>) {
    let strip_width = width - i0;
    out.clear();
    out.resize((i1 - i0) * strip_width, 0.0);
    for j0 in (i0..width).step_by(GRAM_TILE) {
        let j1 = (j0 + GRAM_TILE).min(width);
        for row in x.chunks_exact(width) {
            let columns = &row[j0..j1];
            for (r, &xi) in row[i0..i1].iter().enumerate() {
                let start = r * strip_width + (j0 - i0);
                for (d, &v) in out[start..start + (j1 - j0)].iter_mut().zip(columns) {
                    *d += xi * v;
                }
            }
        }
    }
}

/// Adds a push's `XᵀX` to `gram`, one strip of rows at a time (the lock is
/// taken per strip, so pushes to one layer overlap).
fn add_gram(gram: &Mutex<GramAcc>, layer: &str, push: &GramPush, width: usize) -> Result<()> {
    let mut strip = Vec::new();
    for i0 in (0..width).step_by(GRAM_STRIP) {
        let i1 = (i0 + GRAM_STRIP).min(width);
        gram_strip(&push.x, width, i0, i1, &mut strip);
        let strip_width = width - i0;
        let mut acc = gram.lock().map_err(|_| poisoned(layer))?;
        for i in i0..i1 {
            let from = (i - i0) * strip_width + (i - i0);
            let to = (i - i0 + 1) * strip_width;
            let start = triangle_index(i, i, width);
            for (s, &g) in acc.sums[start..start + (width - i)]
                .iter_mut()
                .zip(&strip[from..to])
            {
                *s = s.wrapping_add((g * GRAM_SCALE) as i128);
            }
        }
    }
    Ok(())
}

/// The mean Gram, full `[width, width]` f32, from the packed sums.
fn gram_means(sums: &[i128], width: usize, count: u64) -> Vec<f32> {
    let mut out = vec![0f32; width * width];
    for i in 0..width {
        let start = triangle_index(i, i, width);
        for (j, &q) in (i..width).zip(&sums[start..start + (width - i)]) {
            let v = ((q as f64 / GRAM_SCALE) / count as f64) as f32;
            out[i * width + j] = v;
            out[j * width + i] = v;
        }
    }
    out
}

fn check_gram_magnitude(layer: &str, gram: &GramAcc) -> Result<()> {
    if gram.magnitude > (1u128 << 126) {
        return Err(invalid(
            layer,
            "the layer's Gram is too large to sum exactly (the total Σ x² reaches 2^76)".into(),
        ));
    }
    Ok(())
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

    /// Bytes held by the Gram accumulators: `16 × in (in + 1) / 2` per
    /// layer that stores a Gram (the module docs' memory bound; aliases and
    /// layers outside [`RecorderOptions::gram_layers`] hold none).
    pub fn gram_bytes(&self) -> usize {
        self.layers.read().map_or(0, |map| {
            map.values()
                .filter(|l| l.gram.is_some())
                .map(|l| 16 * triangle_len(l.in_width))
                .sum()
        })
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

    /// Pushes `rows` IEEE f16 tokens (bit patterns) of example `example`
    /// through `layer`: [`push`](Self::push) with [`Activations::F16`].
    pub fn push_f16(
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
            x: Activations::F16(x),
            y: Activations::F16(y),
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
        let gram = if self.options.stores_gram(layer) {
            Some(gram_push(layer, decode_f64(batch.x), in_width)?)
        } else {
            None
        };
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

        if let (Some(push), Some(acc)) = (&gram, &target.gram) {
            // Reserved before anything is added, so a refused push adds
            // nothing to the means either.
            let mut acc = acc.lock().map_err(|_| poisoned(layer))?;
            acc.magnitude = acc.magnitude.saturating_add(push.trace);
            check_gram_magnitude(layer, &acc)?;
        }
        self.add_means(layer, &target, batch.example, sums, mx, my)?;
        if let (Some(push), Some(acc)) = (&gram, &target.gram) {
            add_gram(acc, layer, push, in_width)?;
        }
        Ok(())
    }

    /// Adds one example's sums, reduced outside the recorder (module docs:
    /// partial moments). The same tokens pushed with [`push`](Self::push)
    /// give the same integers, so the file is the same byte for byte. The
    /// first push of a layer sets its widths (`x_sum.len()`,
    /// `y_sum.len()`). A layer that stores a Gram gets none from this: add
    /// it with [`add_gram_sums`](Self::add_gram_sums).
    ///
    /// Errors as [`push`](Self::push): an empty name, `count == 0`, widths
    /// that differ from the layer's, a conflicting modality, a layer whose
    /// total magnitude leaves the exact range.
    pub fn push_moments(&self, m: &Moments<'_>) -> Result<()> {
        let layer = m.layer;
        if layer.is_empty() {
            return Err(invalid(layer, "the layer name is empty".into()));
        }
        if m.count == 0 {
            return Err(invalid(
                layer,
                "partial moments need at least one token".into(),
            ));
        }
        let known = self.get_layer(layer)?;
        let (in_width, out_width) = match &known {
            Some(l) => (l.in_width, l.out_width),
            None => (
                self.new_width(layer, "x", m.x_sum.len(), 1)?,
                self.new_width(layer, "y", m.y_sum.len(), 1)?,
            ),
        };
        check_len(layer, "x", "input", m.x_sum.len(), 1, in_width)?;
        check_len(layer, "y", "output", m.y_sum.len(), 1, out_width)?;
        let target = match known {
            Some(l) => l,
            None => {
                self.note_modality(layer, m.example, m.modality, false)?;
                self.insert_layer(layer, in_width, out_width)?
            }
        };
        self.note_modality(layer, m.example, m.modality, true)?;
        let sums = Sums {
            count: m.count,
            x: m.x_sum.to_vec(),
            y: m.y_sum.to_vec(),
        };
        self.add_means(layer, &target, m.example, sums, m.magnitude, 0)
    }

    /// Adds Gram sums reduced outside the recorder: the packed upper
    /// triangle (row `i` holds columns `i..in`, row-major) of
    /// `Σ_pushes (G_p × 2^50) as i128`, each push's `G_p = XᵀX` computed in
    /// f64 as [`push`](Self::push) does (entries summed over the push's rows
    /// in row order), truncated per push and summed modulo 2^128. The
    /// layer's magnitude grows by the diagonal's total, `trace` (saturating).
    ///
    /// Errors: a layer never pushed, or that stores no Gram (an alias,
    /// outside `gram_layers`, or no `gram`); a length other than
    /// `in (in + 1) / 2`; a total trace beyond the Gram's range.
    pub fn add_gram_sums(&self, layer: &str, sums: &[i128], trace: u128) -> Result<()> {
        let target = self.get_layer(layer)?.ok_or_else(|| {
            invalid(
                layer,
                "Gram sums for a layer never pushed: push its moments first".into(),
            )
        })?;
        let gram = target
            .gram
            .as_ref()
            .ok_or_else(|| invalid(layer, "Gram sums for a layer that stores no Gram".into()))?;
        let expected = triangle_len(target.in_width);
        if sums.len() != expected {
            return Err(invalid(
                layer,
                format!(
                    "{} Gram sums, but the upper triangle of a {} input has {expected}",
                    sums.len(),
                    target.in_width
                ),
            ));
        }
        let mut acc = gram.lock().map_err(|_| poisoned(layer))?;
        let magnitude = acc.magnitude.saturating_add(trace);
        if magnitude > (1u128 << 126) {
            return Err(invalid(
                layer,
                "the layer's Gram is too large to sum exactly (the total Σ x² reaches 2^76)".into(),
            ));
        }
        acc.magnitude = magnitude;
        for (a, &b) in acc.sums.iter_mut().zip(sums) {
            *a = a.wrapping_add(b);
        }
        Ok(())
    }

    /// The diagonal's indices in a packed upper triangle of `width`
    /// (to take a trace of [`add_gram_sums`](Self::add_gram_sums)' input).
    pub fn triangle_diagonal(width: usize) -> impl Iterator<Item = usize> {
        (0..width).map(move |i| triangle_index(i, i, width))
    }

    fn add_means(
        &self,
        layer: &str,
        target: &Layer,
        example: u64,
        sums: Sums,
        mx: u128,
        my: u128,
    ) -> Result<()> {
        let batch_example = example;
        let mut acc = target.acc.lock().map_err(|_| poisoned(layer))?;
        acc.magnitude = acc.magnitude.saturating_add(mx).saturating_add(my);
        acc.total.add(&sums);
        if batch_example < self.options.max_examples as u64 {
            match acc.examples.get_mut(&batch_example) {
                Some(e) => e.add(&sums),
                None => {
                    acc.examples.insert(batch_example, sums);
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
                gram: self.options.stores_gram(layer).then(|| {
                    Mutex::new(GramAcc {
                        sums: vec![0; triangle_len(in_width)],
                        magnitude: 0,
                    })
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
            let x_gram = match &layer.gram {
                Some(gram) => {
                    let gram = gram.lock().map_err(|_| poisoned(&name))?;
                    check_gram_magnitude(&name, &gram)?;
                    Some(gram_means(&gram.sums, layer.in_width, acc.total.count))
                }
                None => None,
            };
            let mut s = LayerStats {
                x_mean: Some(means(&acc.total.x, acc.total.count)),
                y_mean: Some(means(&acc.total.y, acc.total.count)),
                count: Some(acc.total.count),
                x_rows: None,
                y_rows: None,
                x_gram: x_gram.map(crate::stats::Gram::new),
            };
            if rows > 0 {
                let (x_rows, y_rows) = self.rows_of(&name, &layer, &acc, rows)?;
                s.x_rows = Some(x_rows);
                s.y_rows = Some(y_rows);
            }
            drop(acc);
            stats.layers.insert(name, s);
        }
        stats.gram_shared = self.shared_grams()?;
        stats.sources = self.options.sources.as_ref().map(|s| {
            let set: BTreeSet<&String> = s.iter().collect();
            set.into_iter().cloned().collect()
        });
        Ok(stats)
    }

    /// The `gram_shared` entries of the pushed aliases, each checked to
    /// have read its owner's input (equal exact sums and token counts).
    fn shared_grams(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        if !self.options.gram {
            return Ok(out);
        }
        let map = self.layers.read().map_err(|_| poisoned_recorder())?;
        for (alias, owner) in &self.options.gram_shared {
            let Some(alias_layer) = map.get(alias) else {
                continue;
            };
            if !self.options.has_gram(alias) {
                continue;
            }
            let (alias_count, alias_x) = {
                let acc = alias_layer.acc.lock().map_err(|_| poisoned(alias))?;
                (acc.total.count, acc.total.x.clone())
            };
            if alias_count == 0 {
                continue;
            }
            let owner_layer = map.get(owner).filter(|l| l.gram.is_some()).ok_or_else(|| {
                invalid(
                    alias,
                    format!(
                        "the layer shares the Gram of `{owner}`, which was never pushed or \
                         records no Gram"
                    ),
                )
            })?;
            let acc = owner_layer.acc.lock().map_err(|_| poisoned(owner))?;
            if acc.total.count != alias_count || acc.total.x != alias_x {
                return Err(invalid(
                    alias,
                    format!(
                        "the layer shares the Gram of `{owner}`, but its inputs differ \
                         ({alias_count} tokens against {}, or other values): layers sharing a \
                         Gram must read the same input",
                        acc.total.count
                    ),
                ));
            }
            out.insert(alias.clone(), owner.clone());
        }
        Ok(out)
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

/// The `format` metadata value of a recorder's partial state.
pub const PART_FORMAT: &str = "flatmerge.activations.part";

/// The `version` metadata value of the partial-state format.
pub const PART_VERSION: &str = "1";

/// The example ids of a part, I64 `[n]`, ascending.
const PART_IDS: &str = "probe.example_ids";

/// The modality of each id of [`PART_IDS`], U8 `[n]`.
const PART_MODALITY: &str = "probe.example_modality";

/// The tensors a part holds per layer.
const PART_SUFFIXES: [&str; 10] = [
    "count",
    "magnitude",
    "x_sum",
    "y_sum",
    "gram_sum",
    "gram_magnitude",
    "row_ids",
    "row_counts",
    "x_row_sums",
    "y_row_sums",
];

fn i128_bytes(values: &[i128]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i64_bytes(values: impl IntoIterator<Item = u64>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| (v as i64).to_le_bytes())
        .collect()
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Maps and lists of strings always encode.
    serde_json::to_string(value).unwrap_or_default()
}

/// The metadata that must agree for parts to combine (everything but the
/// sources).
fn part_metadata(options: &RecorderOptions) -> BTreeMap<String, String> {
    let missing = match options.missing_rows {
        MissingRows::Zero => "zero",
        MissingRows::Error => "error",
    };
    [
        ("format", PART_FORMAT.to_string()),
        ("version", PART_VERSION.to_string()),
        ("model", options.model.clone()),
        ("probe", options.probe.clone()),
        ("max_examples", options.max_examples.to_string()),
        ("missing_rows", missing.to_string()),
        ("gram", options.gram.to_string()),
        ("gram_layers", json(&options.gram_layers)),
        ("gram_shared", json(&options.gram_shared)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn sorted_sources(sources: &Option<Vec<String>>) -> Option<Vec<String>> {
    sources.as_ref().map(|s| {
        let set: BTreeSet<&String> = s.iter().collect();
        set.into_iter().cloned().collect()
    })
}

/// The options a part was recorded with, from its metadata.
fn part_options(path: &Path, meta: &BTreeMap<String, String>) -> Result<RecorderOptions> {
    let err = |msg: String| Error::new(ErrorKind::Stats, msg).with_file(path);
    match meta.get("format") {
        Some(f) if f == PART_FORMAT => {}
        Some(f) if f == crate::stats::FORMAT => {
            return Err(err(format!(
                "a statistics file, not a recorder's partial state (`{PART_FORMAT}`): its means \
                 are rounded to f32 and cannot be combined exactly; record with `--part` \
                 (Recorder::save_part) to combine"
            )))
        }
        other => {
            return Err(err(format!(
                "`__metadata__` format is {}, not `{PART_FORMAT}`: not a recorder's partial state",
                other.map_or_else(|| "missing".to_string(), |f| format!("`{f}`"))
            )))
        }
    }
    if meta.get("version").map(String::as_str) != Some(PART_VERSION) {
        return Err(err(format!(
            "partial-state version {:?}; this flatmerge reads version {PART_VERSION}",
            meta.get("version")
        )));
    }
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| err(format!("`__metadata__` has no `{key}`")))
    };
    let bad = |key: &str| err(format!("`__metadata__` `{key}` is malformed"));
    Ok(RecorderOptions {
        max_examples: get("max_examples")?
            .parse()
            .map_err(|_| bad("max_examples"))?,
        model: get("model")?.clone(),
        probe: get("probe")?.clone(),
        missing_rows: match get("missing_rows")?.as_str() {
            "zero" => MissingRows::Zero,
            "error" => MissingRows::Error,
            _ => return Err(bad("missing_rows")),
        },
        gram: get("gram")?.parse().map_err(|_| bad("gram"))?,
        gram_layers: serde_json::from_str(get("gram_layers")?).map_err(|_| bad("gram_layers"))?,
        gram_shared: serde_json::from_str(get("gram_shared")?).map_err(|_| bad("gram_shared"))?,
        sources: match meta.get("sources") {
            Some(text) => Some(serde_json::from_str(text).map_err(|_| bad("sources"))?),
            None => None,
        },
    })
}

/// The i128 values of a U8 `[.., 16]` tensor whose leading dimensions are
/// `shape` (`None` when the dtype or shape differ).
fn read_i128s(file: &Checkpoint, name: &str, shape: &[usize]) -> Option<Vec<i128>> {
    let view = file.view(name)?;
    let mut expected = shape.to_vec();
    expected.push(16);
    if view.dtype != Dtype::U8 || *view.shape != expected[..] {
        return None;
    }
    Some(
        view.data
            .chunks_exact(16)
            .map(|c| i128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
            .collect(),
    )
}

/// The values of an I64 `[n]` tensor, refusing negatives.
fn read_u64s(file: &Checkpoint, name: &str) -> Option<Vec<u64>> {
    let view = file.view(name)?;
    if view.dtype != Dtype::I64 || view.shape.len() != 1 {
        return None;
    }
    view.data
        .chunks_exact(8)
        .map(|c| u64::try_from(i64::from_le_bytes(c.try_into().ok()?)).ok())
        .collect()
}

impl Recorder {
    /// Saves the recorder's exact state (integer sums, counts, example ids
    /// and modalities, options) to `path` as a `.part` file (module docs),
    /// atomically. [`combine_parts`] of parts recorded on disjoint examples
    /// gives exactly the statistics file of one recording of their union.
    /// Call it once pushes have ended.
    pub fn save_part(&self, path: &Path) -> Result<()> {
        let with_file = |e: Error| {
            if e.file().is_none() {
                e.with_file(path)
            } else {
                e
            }
        };
        let modality = self
            .modality
            .lock()
            .map_err(|_| with_file(poisoned_recorder()))?
            .clone();
        let mut layers: Vec<(String, Arc<Layer>)> = {
            let map = self
                .layers
                .read()
                .map_err(|_| with_file(poisoned_recorder()))?;
            map.iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect()
        };
        layers.sort_by(|a, b| a.0.cmp(&b.0));

        let n = modality.len();
        let mut tensors = vec![
            OutputTensor::new(PART_IDS, Dtype::I64, vec![n]),
            OutputTensor::new(PART_MODALITY, Dtype::U8, vec![n]),
        ];
        let mut row_counts = Vec::new();
        for (name, layer) in &layers {
            let acc = layer.acc.lock().map_err(|_| with_file(poisoned(name)))?;
            if acc.total.count == 0 {
                row_counts.push(None);
                continue;
            }
            check_magnitude(name, &acc).map_err(with_file)?;
            let t = |suffix: &str| format!("{name}.{suffix}");
            tensors.push(OutputTensor::new(t("count"), Dtype::I64, vec![1]));
            tensors.push(OutputTensor::new(t("magnitude"), Dtype::U8, vec![16]));
            tensors.push(OutputTensor::new(
                t("x_sum"),
                Dtype::U8,
                vec![layer.in_width, 16],
            ));
            tensors.push(OutputTensor::new(
                t("y_sum"),
                Dtype::U8,
                vec![layer.out_width, 16],
            ));
            if layer.gram.is_some() {
                tensors.push(OutputTensor::new(
                    t("gram_sum"),
                    Dtype::U8,
                    vec![triangle_len(layer.in_width), 16],
                ));
                tensors.push(OutputTensor::new(t("gram_magnitude"), Dtype::U8, vec![16]));
            }
            let k = acc.examples.len();
            if k > 0 {
                tensors.push(OutputTensor::new(t("row_ids"), Dtype::I64, vec![k]));
                tensors.push(OutputTensor::new(t("row_counts"), Dtype::I64, vec![k]));
                tensors.push(OutputTensor::new(
                    t("x_row_sums"),
                    Dtype::U8,
                    vec![k, layer.in_width, 16],
                ));
                tensors.push(OutputTensor::new(
                    t("y_row_sums"),
                    Dtype::U8,
                    vec![k, layer.out_width, 16],
                ));
            }
            row_counts.push(Some(k));
        }
        let mut metadata = part_metadata(&self.options);
        if let Some(sources) = sorted_sources(&self.options.sources) {
            metadata.insert("sources".into(), json(&sources));
        }
        write_atomically(path, |temp| {
            let mut writer = SafetensorsWriter::create(temp, &tensors, &metadata)?;
            writer.write_tensor(PART_IDS, &i64_bytes(modality.keys().copied()))?;
            let codes: Vec<u8> = modality.values().copied().collect();
            writer.write_tensor(PART_MODALITY, &codes)?;
            for ((name, layer), k) in layers.iter().zip(&row_counts) {
                let Some(k) = *k else { continue };
                let t = |suffix: &str| format!("{name}.{suffix}");
                let acc = layer.acc.lock().map_err(|_| poisoned(name))?;
                if acc.examples.len() != k {
                    return Err(invalid(
                        name,
                        "pushed to while its partial state was being saved".into(),
                    ));
                }
                writer.write_tensor(&t("count"), &i64_bytes([acc.total.count]))?;
                writer.write_tensor(&t("magnitude"), &acc.magnitude.to_le_bytes())?;
                writer.write_tensor(&t("x_sum"), &i128_bytes(&acc.total.x))?;
                writer.write_tensor(&t("y_sum"), &i128_bytes(&acc.total.y))?;
                if let Some(gram) = &layer.gram {
                    let gram = gram.lock().map_err(|_| poisoned(name))?;
                    writer.write_tensor(&t("gram_sum"), &i128_bytes(&gram.sums))?;
                    writer.write_tensor(&t("gram_magnitude"), &gram.magnitude.to_le_bytes())?;
                }
                if k > 0 {
                    writer.write_tensor(&t("row_ids"), &i64_bytes(acc.examples.keys().copied()))?;
                    let counts = acc.examples.values().map(|e| e.count);
                    writer.write_tensor(&t("row_counts"), &i64_bytes(counts))?;
                    let x: Vec<u8> = acc
                        .examples
                        .values()
                        .flat_map(|e| i128_bytes(&e.x))
                        .collect();
                    writer.write_tensor(&t("x_row_sums"), &x)?;
                    let y: Vec<u8> = acc
                        .examples
                        .values()
                        .flat_map(|e| i128_bytes(&e.y))
                        .collect();
                    writer.write_tensor(&t("y_row_sums"), &y)?;
                }
            }
            writer.finish()
        })
        .map_err(with_file)
    }

    /// Adds the partial state in `path` (recorded with these options but
    /// for its own sources) to this recorder. `origin` maps each example id
    /// added so far to the file it came from, for the overlap error.
    fn add_part(&self, path: &Path, origin: &mut BTreeMap<u64, PathBuf>) -> Result<()> {
        let file = Checkpoint::open_file(path)?;
        let err = |tensor: &str, msg: String| {
            Error::new(ErrorKind::Stats, msg)
                .with_file(path)
                .with_tensor(tensor)
        };
        let ids = read_u64s(&file, PART_IDS)
            .ok_or_else(|| err(PART_IDS, "missing, or not I64 [n] of example ids".into()))?;
        let codes = file
            .view(PART_MODALITY)
            .filter(|v| v.dtype == Dtype::U8 && *v.shape == [ids.len()])
            .ok_or_else(|| {
                err(
                    PART_MODALITY,
                    "missing, or not U8 [n] beside the ids".into(),
                )
            })?
            .data
            .to_vec();
        for &id in &ids {
            if let Some(earlier) = origin.get(&id) {
                return Err(err(
                    PART_IDS,
                    format!(
                        "example {id} was also recorded in {}: parts must cover disjoint examples",
                        earlier.display()
                    ),
                ));
            }
        }
        {
            let mut table = self.modality.lock().map_err(|_| poisoned_recorder())?;
            for (&id, &m) in ids.iter().zip(&codes) {
                table.insert(id, m);
                origin.insert(id, path.to_path_buf());
            }
        }

        let mut names = BTreeSet::new();
        for info in file.tensors() {
            if info.name == PART_IDS || info.name == PART_MODALITY {
                continue;
            }
            match info.name.rsplit_once('.') {
                Some((layer, suffix)) if !layer.is_empty() && PART_SUFFIXES.contains(&suffix) => {
                    names.insert(layer.to_string());
                }
                _ => {
                    return Err(err(
                        &info.name,
                        "not a tensor of a recorder's partial state".into(),
                    ))
                }
            }
        }
        for name in names {
            let t = |suffix: &str| format!("{name}.{suffix}");
            let shape_err =
                |suffix: &str, what: &str| err(&t(suffix), format!("missing, or not {what}"));
            let count = read_u64s(&file, &t("count"))
                .filter(|c| c.len() == 1 && c[0] > 0)
                .ok_or_else(|| shape_err("count", "I64 [1] at least 1"))?[0];
            let width = |suffix: &str| {
                file.view(&t(suffix))
                    .filter(|v| v.shape.len() == 2)
                    .map(|v| v.shape[0])
                    .filter(|&w| w > 0)
                    .ok_or_else(|| shape_err(suffix, "U8 [width, 16]"))
            };
            let (in_width, out_width) = (width("x_sum")?, width("y_sum")?);
            let x = read_i128s(&file, &t("x_sum"), &[in_width])
                .ok_or_else(|| shape_err("x_sum", "U8 [in, 16]"))?;
            let y = read_i128s(&file, &t("y_sum"), &[out_width])
                .ok_or_else(|| shape_err("y_sum", "U8 [out, 16]"))?;
            let magnitude = read_i128s(&file, &t("magnitude"), &[])
                .ok_or_else(|| shape_err("magnitude", "U8 [16]"))?[0]
                as u128;
            let layer = self
                .insert_layer(&name, in_width, out_width)
                .map_err(|e| err(&name, e.message().to_string()))?;
            let gram = match (&layer.gram, file.view(&t("gram_sum")).is_some()) {
                (Some(_), true) => Some((
                    read_i128s(&file, &t("gram_sum"), &[triangle_len(in_width)])
                        .ok_or_else(|| shape_err("gram_sum", "U8 [in (in + 1) / 2, 16]"))?,
                    read_i128s(&file, &t("gram_magnitude"), &[])
                        .ok_or_else(|| shape_err("gram_magnitude", "U8 [16]"))?[0]
                        as u128,
                )),
                (None, false) => None,
                (Some(_), false) => {
                    return Err(err(
                        &t("gram_sum"),
                        "missing: the part's options record this layer's Gram".into(),
                    ))
                }
                (None, true) => {
                    return Err(err(
                        &t("gram_sum"),
                        "present, but the part's options record no Gram for this layer".into(),
                    ))
                }
            };
            let mut rows = Vec::new();
            if file.view(&t("row_ids")).is_some() {
                let row_ids = read_u64s(&file, &t("row_ids"))
                    .ok_or_else(|| shape_err("row_ids", "I64 [k]"))?;
                let k = row_ids.len();
                let counts = read_u64s(&file, &t("row_counts"))
                    .filter(|c| c.len() == k)
                    .ok_or_else(|| shape_err("row_counts", "I64 [k] beside `row_ids`"))?;
                let xr = read_i128s(&file, &t("x_row_sums"), &[k, in_width])
                    .ok_or_else(|| shape_err("x_row_sums", "U8 [k, in, 16]"))?;
                let yr = read_i128s(&file, &t("y_row_sums"), &[k, out_width])
                    .ok_or_else(|| shape_err("y_row_sums", "U8 [k, out, 16]"))?;
                for (n, (&id, &c)) in row_ids.iter().zip(&counts).enumerate() {
                    if !ids.contains(&id) {
                        return Err(err(
                            &t("row_ids"),
                            format!("example {id} is not among the part's example ids"),
                        ));
                    }
                    rows.push((
                        id,
                        Sums {
                            count: c,
                            x: xr[n * in_width..(n + 1) * in_width].to_vec(),
                            y: yr[n * out_width..(n + 1) * out_width].to_vec(),
                        },
                    ));
                }
            }
            {
                let mut acc = layer.acc.lock().map_err(|_| poisoned(&name))?;
                acc.magnitude = acc.magnitude.saturating_add(magnitude);
                acc.total.add(&Sums { count, x, y });
                for (id, sums) in rows {
                    match acc.examples.get_mut(&id) {
                        Some(e) => e.add(&sums),
                        None => {
                            acc.examples.insert(id, sums);
                        }
                    }
                }
                check_magnitude(&name, &acc).map_err(|e| err(&name, e.message().to_string()))?;
            }
            if let (Some((sums, magnitude)), Some(acc)) = (gram, &layer.gram) {
                let mut acc = acc.lock().map_err(|_| poisoned(&name))?;
                acc.magnitude = acc.magnitude.saturating_add(magnitude);
                for (a, b) in acc.sums.iter_mut().zip(&sums) {
                    *a = a.wrapping_add(*b);
                }
                check_gram_magnitude(&name, &acc)
                    .map_err(|e| err(&name, e.message().to_string()))?;
            }
        }
        Ok(())
    }
}

/// The recorder holding the sum of the partial states `parts`
/// ([`Recorder::save_part`]), recorded on disjoint examples of one model
/// and probe set with the same options; its sources are the union of the
/// parts' (all parts restricted to sources, or none).
///
/// Errors ([`ErrorKind::Stats`], naming the file): not a part, parts whose
/// model, probe set or options differ, an example id in two parts, a part
/// restricted to sources beside one that is not, malformed tensors.
/// Memory: one recorder's state plus one part's largest tensor.
pub fn combine_recorders(parts: &[PathBuf]) -> Result<Recorder> {
    let Some(first) = parts.first() else {
        return Err(Error::new(ErrorKind::InvalidInput, "no parts to combine"));
    };
    let mut options: Option<(RecorderOptions, &PathBuf)> = None;
    let mut sources: Option<BTreeSet<String>> = None;
    for path in parts {
        let meta = Checkpoint::open_file(path)?.metadata().clone();
        let part = part_options(path, &meta)?;
        let Some((base, base_path)) = &options else {
            sources = part.sources.as_ref().map(|s| s.iter().cloned().collect());
            options = Some((part, path));
            continue;
        };
        let err = |msg: String| Error::new(ErrorKind::Stats, msg).with_file(path);
        let (a, b) = (part_metadata(base), part_metadata(&part));
        if let Some(key) = a.keys().find(|k| a.get(*k) != b.get(*k)) {
            let what = match key.as_str() {
                "model" => "model",
                "probe" => "probe set",
                _ => "recording options",
            };
            return Err(err(format!(
                "a different {what} than {}: `{key}` is `{}` here but `{}` there; only parts of one \
                 model, probe set and options combine",
                base_path.display(),
                b[key],
                a[key]
            )));
        }
        match (&mut sources, part.sources) {
            (Some(all), Some(more)) => all.extend(more),
            (None, None) => {}
            _ => {
                return Err(err(format!(
                    "one of this part and {} is restricted to probe sources and the other is not",
                    base_path.display()
                )))
            }
        }
    }
    let (mut options, _) = options.unwrap_or_else(|| (RecorderOptions::default(), first));
    options.sources = sources.map(|s| s.into_iter().collect());
    let recorder = Recorder::new(options);
    let mut origin = BTreeMap::new();
    for path in parts {
        recorder.add_part(path, &mut origin)?;
    }
    Ok(recorder)
}

/// Combines the partial states `parts` ([`combine_recorders`]) and writes
/// the statistics file of their union to `output` (atomically), or, when
/// `output` ends in `.part`, their combined partial state. The statistics
/// file is byte-identical to one recording of the union.
pub fn combine_parts(parts: &[PathBuf], output: &Path) -> Result<()> {
    let recorder = combine_recorders(parts)?;
    if output.extension().is_some_and(|e| e == "part") {
        recorder.save_part(output)
    } else {
        recorder.save(output)
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

    #[test]
    fn limbs_rebuild_sums_modulo_2_128_and_saturate_magnitudes() {
        let q: i128 = -(0x1234_5678_9abc_def0_1122_3344_i128 << 20);
        let u = q as u128;
        let l: Vec<i64> = (0..4)
            .map(|k| ((u >> (32 * k)) & 0xffff_ffff) as i64)
            .collect();
        assert_eq!(limbs::to_i128(&l), q);
        // Unnormalised limbs (a sum of many values) rebuild the same integer.
        assert_eq!(limbs::to_i128(&[-(1 << 40), 1 << 8, 0, 0]), 0);
        assert_eq!(limbs::to_i128(&[0, 0, 0, 1 << 32]), 0); // 2^128 wraps to 0
        assert_eq!(
            limbs::to_u128_saturating(&[5, 1, 0, 0]),
            Some((1 << 32) + 5)
        );
        assert_eq!(
            limbs::to_u128_saturating(&[0, 0, 0, 1 << 32]),
            Some(u128::MAX)
        );
        assert_eq!(
            limbs::to_u128_saturating(&[0, 0, 0, 1 << 31]),
            Some(1 << 127)
        );
        // Each term fits, their sum does not.
        let top = (1i64 << 32) - 1;
        assert_eq!(
            limbs::to_u128_saturating(&[0, 0, i64::MAX, top]),
            Some(u128::MAX)
        );
        assert_eq!(limbs::to_u128_saturating(&[0, -1, 0, 0]), None);
    }
}
