//! `flatmerge.Recorder` over the library's recorder (SPEC §4), and
//! `combine` of partial states.
//!
//! Pushes borrow the numpy arrays' memory (no copy for C-contiguous f32,
//! f16 and 16-bit integer arrays, the last holding bf16 bit patterns) and
//! run with the GIL released, so hooks on several threads push at once.

use crate::errors::{invalid, IntoPy};
use engine::recorder::{combine_parts, Activations, Batch, MissingRows, RecorderOptions};
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
