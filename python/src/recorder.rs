//! `flatmerge.Recorder` over the library's recorder (SPEC §4), and
//! `combine` of partial states.
//!
//! Pushes borrow the numpy arrays' memory (no copy for C-contiguous f32,
//! f16 and 16-bit integer arrays, the last holding bf16 bit patterns) and
//! run with the GIL released, so hooks on several threads push at once.

use crate::errors::{invalid, IntoPy};
use engine::recorder::{
    combine_parts, limbs, Activations, Batch, MissingRows, Moments, RecorderOptions,
};
use half::f16;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Recorder>()?;
    m.add_function(wrap_pyfunction!(combine, m)?)?;
    Ok(())
}

/// Records activation statistics (SPEC §4) from `(layer, x, y, example,
/// modality)` pushes; see `flatmerge.Recorder` for the Python-level docs.
#[pyclass(module = "flatmerge", frozen, name = "Recorder")]
pub struct Recorder {
    inner: Arc<engine::recorder::Recorder>,
}

/// A borrowed array: its values and its shape.
enum Held<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    I16(PyReadonlyArrayDyn<'py, i16>),
    U16(PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> Held<'py> {
    fn of(array: &Bound<'py, PyAny>, which: &str) -> PyResult<Held<'py>> {
        if let Ok(a) = array.cast::<PyArrayDyn<f32>>() {
            return Ok(Held::F32(a.readonly()));
        }
        if let Ok(a) = array.cast::<PyArrayDyn<f16>>() {
            return Ok(Held::F16(a.readonly()));
        }
        if let Ok(a) = array.cast::<PyArrayDyn<i16>>() {
            return Ok(Held::I16(a.readonly()));
        }
        if let Ok(a) = array.cast::<PyArrayDyn<u16>>() {
            return Ok(Held::U16(a.readonly()));
        }
        let what = array
            .getattr("dtype")
            .map_or_else(|_| array.get_type().to_string(), |d| d.to_string());
        Err(invalid(format!(
            "`{which}` is {what}: give a numpy array of float32, float16, or int16/uint16 \
             holding bfloat16 bits (`tensor.view(torch.int16).numpy()`)"
        )))
    }

    fn shape(&self) -> &[usize] {
        match self {
            Held::F32(a) => a.shape(),
            Held::F16(a) => a.shape(),
            Held::I16(a) => a.shape(),
            Held::U16(a) => a.shape(),
        }
    }

    /// The values, borrowed when the array is C-contiguous.
    fn values(&self, which: &str) -> PyResult<Activations<'_>> {
        let contiguous = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(invalid(format!(
                    "`{which}` is not C-contiguous: pass numpy.ascontiguousarray({which}) \
                     (the recorder reads the array's memory in place)"
                )))
            }
        };
        Ok(match self {
            Held::F32(a) => {
                contiguous(a.is_c_contiguous())?;
                Activations::F32(a.as_slice().map_err(|e| invalid(e.to_string()))?)
            }
            Held::F16(a) => {
                contiguous(a.is_c_contiguous())?;
                let v = a.as_slice().map_err(|e| invalid(e.to_string()))?;
                Activations::F16(half::slice::HalfFloatSliceExt::reinterpret_cast(v))
            }
            Held::I16(a) => {
                contiguous(a.is_c_contiguous())?;
                let v = a.as_slice().map_err(|e| invalid(e.to_string()))?;
                // SAFETY: i16 and u16 have the same size, alignment and
                // validity (every bit pattern); the length is unchanged.
                let bits = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) };
                Activations::Bf16(bits)
            }
            Held::U16(a) => {
                contiguous(a.is_c_contiguous())?;
                Activations::Bf16(a.as_slice().map_err(|e| invalid(e.to_string()))?)
            }
        })
    }
}

/// Rows and width of a `[rows, width]` (or `[width]`: one row) array.
fn rows_of(shape: &[usize], which: &str, layer: &str) -> PyResult<(usize, usize)> {
    match *shape {
        [width] => Ok((1, width)),
        [rows, width] => Ok((rows, width)),
        _ => Err(invalid(format!(
            "layer `{layer}`: `{which}` has shape {shape:?}; give [tokens, features]"
        ))),
    }
}

/// The values of a `[2, 4, width]` int64 limb array.
fn limb_array<'a>(
    a: &'a PyReadonlyArrayDyn<'_, i64>,
    which: &str,
    layer: &str,
) -> PyResult<&'a [i64]> {
    let shape = a.shape();
    if shape.len() != 3 || shape[0] != 2 || shape[1] != limbs::COUNT || !a.is_c_contiguous() {
        return Err(invalid(format!(
            "layer `{layer}`: `{which}` has shape {shape:?}; give a C-contiguous int64 array \
             [2, {}, width] of limb sums",
            limbs::COUNT
        )));
    }
    a.as_slice().map_err(|e| invalid(e.to_string()))
}

/// Column sums `Σq` (modulo 2^128) and the total `Σ|q|` (saturating) of a
/// `[2, 4, width]` array of limb sums over non-negative and negative values.
fn signed_sums(values: &[i64], layer: &str, which: &str) -> engine::Result<(Vec<i128>, u128)> {
    let width = values.len() / (2 * limbs::COUNT);
    let at = |half: usize, k: usize, c: usize| values[(half * limbs::COUNT + k) * width + c];
    let mut sums = Vec::with_capacity(width);
    let mut magnitude = 0u128;
    for c in 0..width {
        let pos: [i64; limbs::COUNT] = std::array::from_fn(|k| at(0, k, c));
        let neg: [i64; limbs::COUNT] = std::array::from_fn(|k| at(1, k, c));
        let (p, n) = match (
            limbs::to_u128_saturating(&pos),
            limbs::to_u128_saturating(&neg),
        ) {
            (Some(p), Some(n)) => (p, n),
            _ => {
                return Err(engine::Error::new(
                    engine::ErrorKind::InvalidInput,
                    format!("{which} column {c}: a negative limb sum (limbs sum magnitudes)"),
                )
                .with_tensor(layer))
            }
        };
        let signed: [i64; limbs::COUNT] = std::array::from_fn(|k| pos[k] - neg[k]);
        sums.push(limbs::to_i128(&signed));
        magnitude = magnitude.saturating_add(p).saturating_add(n);
    }
    Ok((sums, magnitude))
}

#[pymethods]
impl Recorder {
    #[new]
    #[pyo3(signature = (*, model="", probe="", rows=0, gram=false, gram_shared=None, sources=None, missing_rows="zero"))]
    fn new(
        model: &str,
        probe: &str,
        rows: usize,
        gram: bool,
        gram_shared: Option<BTreeMap<String, String>>,
        sources: Option<Vec<String>>,
        missing_rows: &str,
    ) -> PyResult<Self> {
        let missing_rows = match missing_rows {
            "zero" => MissingRows::Zero,
            "error" => MissingRows::Error,
            other => {
                return Err(invalid(format!(
                    "`missing_rows` is `{other}`, not `zero` or `error`"
                )))
            }
        };
        let gram_shared = gram_shared.unwrap_or_default();
        if let Some((alias, owner)) = gram_shared
            .iter()
            .find(|(_, owner)| gram_shared.contains_key(*owner))
        {
            return Err(invalid(format!(
                "`gram_shared`: `{alias}` shares the Gram of `{owner}`, which itself shares one"
            )));
        }
        Ok(Recorder {
            inner: Arc::new(engine::recorder::Recorder::new(RecorderOptions {
                max_examples: rows,
                model: model.to_string(),
                probe: probe.to_string(),
                missing_rows,
                gram,
                gram_layers: None::<BTreeSet<String>>,
                gram_shared,
                sources,
            })),
        })
    }

    /// Adds `x` `[tokens, in]` and `y` `[tokens, out]` of example `example`
    /// through `layer`.
    #[pyo3(signature = (layer, x, y, example, modality=0))]
    fn push(
        &self,
        py: Python<'_>,
        layer: &str,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        example: u64,
        modality: u8,
    ) -> PyResult<()> {
        let (hx, hy) = (Held::of(x, "x")?, Held::of(y, "y")?);
        let (rx, _) = rows_of(hx.shape(), "x", layer)?;
        let (ry, _) = rows_of(hy.shape(), "y", layer)?;
        if rx != ry {
            return Err(invalid(format!(
                "layer `{layer}`: x has {rx} rows but y has {ry}: one row per token in both"
            )));
        }
        if rx == 0 {
            // A batch whose tokens are all padding adds nothing.
            return Ok(());
        }
        let (vx, vy) = (hx.values("x")?, hy.values("y")?);
        let recorder = &self.inner;
        py.detach(|| {
            recorder.push(&Batch {
                layer,
                rows: rx,
                x: vx,
                y: vy,
                example,
                modality,
            })
        })
        .py_err()
    }

    /// Adds one example's sums reduced elsewhere (on a device): `x` and
    /// `y` are C-contiguous int64 arrays `[2, 4, width]` of 32-bit limb
    /// sums of the fixed-point values `q = trunc(v × 2^60)`: `[0, k]` sums
    /// limb `k` of the non-negative values' `q`, `[1, k]` of the negative
    /// values' `|q|`.
    #[pyo3(signature = (layer, count, x, y, example, modality=0))]
    fn push_moments(
        &self,
        layer: &str,
        count: u64,
        x: PyReadonlyArrayDyn<'_, i64>,
        y: PyReadonlyArrayDyn<'_, i64>,
        example: u64,
        modality: u8,
    ) -> PyResult<()> {
        let (vx, vy) = (limb_array(&x, "x", layer)?, limb_array(&y, "y", layer)?);
        let recorder = &self.inner;
        x.py()
            .detach(|| {
                let (x_sum, mx) = signed_sums(vx, layer, "x")?;
                let (y_sum, my) = signed_sums(vy, layer, "y")?;
                recorder.push_moments(&Moments {
                    layer,
                    count,
                    x_sum: &x_sum,
                    y_sum: &y_sum,
                    magnitude: mx.saturating_add(my),
                    example,
                    modality,
                })
            })
            .py_err()
    }

    /// Adds Gram sums reduced elsewhere: `sums` is a C-contiguous int64
    /// array `[4, in (in + 1) / 2]` of signed 32-bit limb sums of each
    /// push's f64 `XᵀX` entries truncated to `trunc(g × 2^50)`, over the
    /// packed upper triangle (row `i`: columns `i..in`).
    fn add_gram_sums(
        &self,
        py: Python<'_>,
        layer: &str,
        sums: PyReadonlyArrayDyn<'_, i64>,
    ) -> PyResult<()> {
        let shape = sums.shape().to_vec();
        if shape.len() != 2 || shape[0] != limbs::COUNT || !sums.is_c_contiguous() {
            return Err(invalid(format!(
                "layer `{layer}`: Gram sums of shape {shape:?}; give a C-contiguous int64 \
                 array [{}, in (in + 1) / 2]",
                limbs::COUNT
            )));
        }
        let values = sums.as_slice().map_err(|e| invalid(e.to_string()))?;
        let n = shape[1];
        let recorder = &self.inner;
        py.detach(|| {
            let limb =
                |t: usize| -> [i64; limbs::COUNT] { std::array::from_fn(|k| values[k * n + t]) };
            let totals: Vec<i128> = (0..n).map(|t| limbs::to_i128(&limb(t))).collect();
            // The trace from the diagonal; a wrong length is refused by
            // add_gram_sums before the trace matters.
            let width = ((((8 * n + 1) as f64).sqrt() as usize).saturating_sub(1)) / 2;
            let mut trace = 0u128;
            if width * (width + 1) / 2 == n {
                for d in engine::recorder::Recorder::triangle_diagonal(width) {
                    let v = limbs::to_u128_saturating(&limb(d)).ok_or_else(|| {
                        engine::Error::new(
                            engine::ErrorKind::InvalidInput,
                            "a Gram diagonal entry has a negative limb sum",
                        )
                        .with_tensor(layer)
                    })?;
                    trace = trace.saturating_add(v);
                }
            }
            recorder.add_gram_sums(layer, &totals, trace)
        })
        .py_err()
    }

    /// Writes the statistics file (SPEC §4) to `path`, atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let recorder = &self.inner;
        py.detach(|| recorder.save(&path)).py_err()
    }

    /// Writes the exact partial state (`.part`) for `combine`.
    fn save_part(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let recorder = &self.inner;
        py.detach(|| recorder.save_part(&path)).py_err()
    }

    /// Bytes held by the Gram accumulators.
    #[getter]
    fn gram_bytes(&self) -> usize {
        self.inner.gram_bytes()
    }
}

/// Combines partial states recorded on disjoint examples into the
/// statistics file of their union (a `.part` output stays combinable).
#[pyfunction]
fn combine(py: Python<'_>, parts: Vec<PathBuf>, output: PathBuf) -> PyResult<()> {
    py.detach(|| combine_parts(&parts, &output)).py_err()
}
