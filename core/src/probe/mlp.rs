//! The MLP family: a stack of linear layers, each followed by an
//! activation function, stored as a model directory holding
//!
//! - `flatmerge_mlp.json`, the architecture:
//!   ```json
//!   {"format": "flatmerge.mlp", "version": 1, "layers": [
//!     {"name": "fc1", "in_features": 4, "out_features": 8, "activation": "relu", "bias": true},
//!     {"name": "fc2", "in_features": 8, "out_features": 2, "activation": "none", "bias": false}]}
//!   ```
//!   Layer `k + 1` takes layer `k`'s output (`in_features` equals the
//!   previous `out_features`); `bias` defaults to `true`; activations are
//!   [`Activation`]'s names;
//! - `model.safetensors` with `<name>.weight` `[out, in]` (PyTorch layout)
//!   and `<name>.bias` `[out]` for each layer, in F32, F16 or BF16 (other
//!   tensors are ignored).
//!
//! The forward pass is in f32 with f64 dot products: the output of a
//! layer is `y[o] = f32(Σ_i W[o,i]·x[i] + b[o])`, summed in
//! [`reduce::dot`](crate::reduce::dot)'s fixed order, so it does not depend
//! on threads or batching. The probe records each layer's `x` and `y`
//! (before the activation, SPEC §1.1) for each example.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Architecture, LayerShape, ProbeExample, ProbeInput, ProbeModel};
use crate::dtype::{encode_f32, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{write_atomically, Checkpoint, OutputTensor, SafetensorsWriter, SINGLE_FILE};
use crate::recorder::Recorder;
use crate::reduce::dot;

/// The architecture file of an MLP model directory.
pub const DESCRIPTION_FILE: &str = "flatmerge_mlp.json";

/// The `format` value of [`DESCRIPTION_FILE`].
pub const FORMAT: &str = "flatmerge.mlp";

/// The `version` of [`DESCRIPTION_FILE`] this library reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The probe registry's entry for this family.
pub const ARCHITECTURE: Architecture = Architecture {
    name: "mlp",
    detect: |dir| dir.join(DESCRIPTION_FILE).is_file(),
    open: |dir| Ok(Box::new(Mlp::load(dir)?)),
    open_with: |dir, checkpoint| Ok(Box::new(Mlp::load_with(dir, checkpoint)?)),
};

/// The function applied after a linear layer (evaluated in f64, rounded
/// to f32; `libm`, so every platform gives the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The identity (a final layer's logits).
    None,
    /// `max(v, 0)`.
    Relu,
    /// `v · Φ(v)` with the exact normal CDF (PyTorch's default GELU).
    Gelu,
    /// GELU's tanh approximation (`approximate="tanh"`).
    GeluTanh,
    /// `v · σ(v)` (also called swish).
    Silu,
    /// `tanh(v)`.
    Tanh,
    /// `σ(v) = 1 / (1 + e^-v)`.
    Sigmoid,
}

impl Activation {
    /// The function at `v`.
    pub fn apply(self, v: f32) -> f32 {
        let x = v as f64;
        match self {
            Activation::None => v,
            Activation::Relu => {
                if v > 0.0 {
                    v
                } else {
                    0.0
                }
            }
            Activation::Gelu => {
                (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
            }
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                (0.5 * x * (1.0 + libm::tanh(c * (x + 0.044715 * x * x * x)))) as f32
            }
            Activation::Silu => (x / (1.0 + libm::exp(-x))) as f32,
            Activation::Tanh => libm::tanh(x) as f32,
            Activation::Sigmoid => (1.0 / (1.0 + libm::exp(-x))) as f32,
        }
    }
}

fn default_bias() -> bool {
    true
}

/// One linear layer of an [`MlpSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpLayerSpec {
    /// The layer's name: its tensors are `<name>.weight` and `<name>.bias`,
    /// its statistics `<name>.x_mean`, ….
    pub name: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// The function applied to the layer's output.
    pub activation: Activation,
    /// Whether the layer has a bias (default true).
    #[serde(default = "default_bias")]
    pub bias: bool,
}

impl MlpLayerSpec {
    /// A layer with a bias.
    pub fn new(
        name: &str,
        in_features: usize,
        out_features: usize,
        activation: Activation,
    ) -> Self {
        MlpLayerSpec {
            name: name.to_string(),
            in_features,
            out_features,
            activation,
            bias: true,
        }
    }
}

/// The architecture of an MLP: its layers, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpSpec {
    /// The layers, input first.
    pub layers: Vec<MlpLayerSpec>,
}

/// [`DESCRIPTION_FILE`]'s JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptionFile {
    format: String,
    version: u32,
    layers: Vec<MlpLayerSpec>,
}

impl MlpSpec {
    /// A chain of layers `fc1, fc2, …` of the given widths (`widths[0]` in,
    /// `widths[k]` out of layer `k`), each with a bias and `hidden` after
    /// it, except the last, which has `output` after it.
    pub fn chain(widths: &[usize], hidden: Activation, output: Activation) -> MlpSpec {
        let n = widths.len().saturating_sub(1);
        MlpSpec {
            layers: (0..n)
                .map(|k| {
                    let act = if k + 1 == n { output } else { hidden };
                    MlpLayerSpec::new(&format!("fc{}", k + 1), widths[k], widths[k + 1], act)
                })
                .collect(),
        }
    }

    /// Input width (0 without layers).
    pub fn in_features(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_features)
    }

    /// Output width (0 without layers).
    pub fn out_features(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_features)
    }

    /// Parameter count.
    pub fn parameters(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.out_features * l.in_features + if l.bias { l.out_features } else { 0 })
            .sum()
    }

    /// Checks the spec: at least one layer, non-empty unique names, positive
    /// widths, each layer taking the previous one's output. The error
    /// ([`ErrorKind::Format`]) names the layer.
    pub fn validate(&self) -> Result<()> {
        let err = |layer: &str, msg: String| Error::new(ErrorKind::Format, msg).with_tensor(layer);
        if self.layers.is_empty() {
            return Err(Error::new(
                ErrorKind::Format,
                "an MLP needs at least one layer",
            ));
        }
        let mut names = HashSet::new();
        for (k, l) in self.layers.iter().enumerate() {
            if l.name.is_empty() {
                return Err(Error::new(
                    ErrorKind::Format,
                    format!("layer {k} has an empty name"),
                ));
            }
            if !names.insert(l.name.as_str()) {
                return Err(err(&l.name, "two layers have this name".into()));
            }
            if l.in_features == 0 || l.out_features == 0 {
                return Err(err(&l.name, "widths must be positive".into()));
            }
            if let Some(prev) = k.checked_sub(1).map(|p| &self.layers[p]) {
                if prev.out_features != l.in_features {
                    return Err(err(
                        &l.name,
                        format!(
                            "in_features {} differs from `{}`'s out_features {}",
                            l.in_features, prev.name, prev.out_features
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The description file's text.
    pub fn to_json(&self) -> String {
        let file = DescriptionFile {
            format: FORMAT.to_string(),
            version: FORMAT_VERSION,
            layers: self.layers.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Parses and validates a description file's text; `file` names it in
    /// errors ([`ErrorKind::Format`]).
    pub fn from_json(text: &str, file: &Path) -> Result<MlpSpec> {
        let parsed: DescriptionFile = serde_json::from_str(text).map_err(|e| {
            Error::new(ErrorKind::Format, format!("not an MLP description: {e}")).with_file(file)
        })?;
        if parsed.format != FORMAT {
            return Err(Error::new(
                ErrorKind::Format,
                format!("`format` is `{}`, not `{FORMAT}`", parsed.format),
            )
            .with_file(file));
        }
        if parsed.version != FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::Format,
                format!(
                    "MLP description version {}; this flatmerge reads version {FORMAT_VERSION}",
                    parsed.version
                ),
            )
            .with_file(file));
        }
        let spec = MlpSpec {
            layers: parsed.layers,
        };
        spec.validate().map_err(|e| e.with_file(file))?;
        Ok(spec)
    }

    /// Reads `dir/flatmerge_mlp.json`.
    pub fn load(dir: &Path) -> Result<MlpSpec> {
        let path = dir.join(DESCRIPTION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, "no MLP description").with_file(&path)
            } else {
                Error::io(&path, e)
            }
        })?;
        MlpSpec::from_json(&text, &path)
    }
}

/// The parameters of one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Row-major `[out, in]` (PyTorch layout).
    pub weight: Vec<f32>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Vec<f32>>,
}

/// An MLP: its architecture and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    spec: MlpSpec,
    layers: Vec<Linear>,
}

impl fmt::Display for MlpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MLP {}", self.in_features())?;
        for l in &self.layers {
            write!(f, " → {}", l.out_features)?;
        }
        Ok(())
    }
}

impl Mlp {
    /// An MLP from its spec and parameters (one [`Linear`] per layer, in
    /// order). Errors ([`ErrorKind::InvalidInput`], naming the layer) when
    /// the spec is invalid or a length does not fit it.
    pub fn new(spec: MlpSpec, layers: Vec<Linear>) -> Result<Mlp> {
        spec.validate()?;
        if layers.len() != spec.layers.len() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} sets of parameters for {} layers",
                    layers.len(),
                    spec.layers.len()
                ),
            ));
        }
        for (s, l) in spec.layers.iter().zip(&layers) {
            let err = |msg: String| Error::new(ErrorKind::InvalidInput, msg).with_tensor(&s.name);
            if l.weight.len() != s.out_features * s.in_features {
                return Err(err(format!(
                    "weight has {} values, not {} × {}",
                    l.weight.len(),
                    s.out_features,
                    s.in_features
                )));
            }
            match (&l.bias, s.bias) {
                (Some(b), true) if b.len() != s.out_features => {
                    return Err(err(format!(
                        "bias has {} values, not {}",
                        b.len(),
                        s.out_features
                    )))
                }
                (Some(_), false) => return Err(err("a bias, but the spec says none".into())),
                (None, true) => return Err(err("no bias, but the spec says one".into())),
                _ => {}
            }
        }
        Ok(Mlp { spec, layers })
    }

    /// The architecture.
    pub fn spec(&self) -> &MlpSpec {
        &self.spec
    }

    /// The parameters, one per layer.
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// Reads an MLP model directory (see the module documentation). Errors
    /// name the file and tensor: a missing or malformed description, a
    /// missing tensor, a wrong shape or a non-float dtype
    /// ([`ErrorKind::Format`]).
    pub fn load(dir: &Path) -> Result<Mlp> {
        Mlp::load_with(dir, Checkpoint::open(dir)?)
    }

    /// [`Mlp::load`] with the description of `dir` and the tensors of
    /// `checkpoint` (e.g. [`Checkpoint::with_overrides`]).
    pub fn load_with(dir: &Path, checkpoint: Checkpoint) -> Result<Mlp> {
        let spec = MlpSpec::load(dir)?;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for s in &spec.layers {
            let read = |suffix: &str, shape: &[usize]| -> Result<Option<Vec<f32>>> {
                let name = format!("{}.{suffix}", s.name);
                let Some(view) = checkpoint.view(&name) else {
                    return Ok(None);
                };
                let err = |msg: String| {
                    Error::new(ErrorKind::Format, msg)
                        .with_file(checkpoint.root())
                        .with_tensor(&name)
                };
                if !view.dtype.is_float() {
                    return Err(err(format!("dtype {}, not a float dtype", view.dtype)));
                }
                if view.shape != shape {
                    return Err(err(format!(
                        "shape {:?}, but {DESCRIPTION_FILE} says {shape:?}",
                        view.shape
                    )));
                }
                Ok(Some(view.to_f32_vec()))
            };
            let weight = read("weight", &[s.out_features, s.in_features])?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Format,
                    "missing: the checkpoint has no such tensor",
                )
                .with_file(checkpoint.root())
                .with_tensor(format!("{}.weight", s.name))
            })?;
            let bias = read("bias", &[s.out_features])?;
            if bias.is_some() != s.bias {
                return Err(Error::new(
                    ErrorKind::Format,
                    if s.bias {
                        format!("missing, but {DESCRIPTION_FILE} says the layer has a bias")
                    } else {
                        format!("present, but {DESCRIPTION_FILE} says the layer has no bias")
                    },
                )
                .with_file(checkpoint.root())
                .with_tensor(format!("{}.bias", s.name)));
            }
            layers.push(Linear { weight, bias });
        }
        Mlp::new(spec, layers)
    }

    /// Writes the model directory `dir` (created if needed): the description
    /// and `model.safetensors` in F32. See [`save_as`](Self::save_as).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, Dtype::F32)
    }

    /// Writes the model directory `dir` (created if needed):
    /// `flatmerge_mlp.json` and `model.safetensors` with the parameters in
    /// `dtype` (F32, F16 or BF16), each file atomically. Tensors are in
    /// layer order, weight then bias; the metadata is `format = pt`.
    pub fn save_as(&self, dir: &Path, dtype: Dtype) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cannot save an MLP as {dtype}: use F32, F16 or BF16"),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::new();
        let mut data: Vec<&[f32]> = Vec::new();
        for (s, l) in self.spec.layers.iter().zip(&self.layers) {
            tensors.push(OutputTensor::new(
                format!("{}.weight", s.name),
                dtype,
                vec![s.out_features, s.in_features],
            ));
            data.push(&l.weight);
            if let Some(b) = &l.bias {
                tensors.push(OutputTensor::new(
                    format!("{}.bias", s.name),
                    dtype,
                    vec![s.out_features],
                ));
                data.push(b);
            }
        }
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_atomically(&dir.join(SINGLE_FILE), |temp| {
            let mut writer = SafetensorsWriter::create(temp, &tensors, &metadata)?;
            for (t, values) in tensors.iter().zip(&data) {
                let mut bytes = vec![0u8; values.len() * dtype.size()];
                encode_f32(dtype, values, &mut bytes);
                writer.write_tensor(&t.name, &bytes)?;
            }
            writer.finish()
        })?;
        let description = dir.join(DESCRIPTION_FILE);
        write_atomically(&description, |temp| {
            std::fs::write(temp, self.spec.to_json()).map_err(|e| Error::io(temp, e))
        })
    }

    /// The output for one input `x` (length `in_features`).
    ///
    /// # Panics
    /// If `x.len()` is not the input width.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.forward_batch(x, 1)
    }

    /// The outputs `[rows, out_features]` for the inputs `x`
    /// (`[rows, in_features]`, row-major). Each row is computed on its
    /// own: a row's output does not depend on the others or on `rows`.
    ///
    /// # Panics
    /// If `x.len()` is not `rows × in_features`.
    pub fn forward_batch(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let result: std::result::Result<_, std::convert::Infallible> =
            self.forward_visit(x, rows, |_, _, _| Ok(()));
        match result {
            Ok(out) => out,
            Err(never) => match never {},
        }
    }

    /// [`forward_batch`](Self::forward_batch), calling `visit(k, x, y)` for
    /// each layer `k` with its input `x` (`[rows, in]`) and its output
    /// before the activation `y` (`[rows, out]`); the first error of
    /// `visit` stops the pass. (What the probe records; a trainer can use
    /// it to keep what backpropagation needs.)
    ///
    /// # Panics
    /// If `x.len()` is not `rows × in_features`.
    pub fn forward_visit<E>(
        &self,
        x: &[f32],
        rows: usize,
        mut visit: impl FnMut(usize, &[f32], &[f32]) -> std::result::Result<(), E>,
    ) -> std::result::Result<Vec<f32>, E> {
        assert_eq!(
            x.len(),
            rows * self.spec.in_features(),
            "Mlp::forward: {} values for {rows} rows of width {}",
            x.len(),
            self.spec.in_features()
        );
        let mut input = x.to_vec();
        for (k, (s, l)) in self.spec.layers.iter().zip(&self.layers).enumerate() {
            let mut y = Vec::with_capacity(rows * s.out_features);
            for row in input.chunks_exact(s.in_features) {
                for (o, w) in l.weight.chunks_exact(s.in_features).enumerate() {
                    let b = l.bias.as_ref().map_or(0.0, |b| b[o] as f64);
                    y.push((dot(w, row) + b) as f32);
                }
            }
            visit(k, &input, &y)?;
            for v in y.iter_mut() {
                *v = s.activation.apply(*v);
            }
            input = y;
        }
        Ok(input)
    }
}

impl ProbeModel for Mlp {
    fn describe(&self) -> String {
        self.spec.to_string()
    }

    fn layers(&self) -> Vec<LayerShape> {
        self.spec
            .layers
            .iter()
            .map(|l| LayerShape {
                name: l.name.clone(),
                in_features: l.in_features,
                out_features: l.out_features,
            })
            .collect()
    }

    fn check(&self, id: u64, example: &ProbeExample) -> Result<()> {
        self.features(id, example).map(|_| ())
    }

    fn forward(&self, id: u64, example: &ProbeExample, recorder: &Recorder) -> Result<()> {
        let x = self.features(id, example)?;
        self.forward_visit(x, 1, |k, x, y| {
            recorder.push_f32(&self.spec.layers[k].name, 1, x, y, id, example.modality)
        })?;
        Ok(())
    }
}

impl Mlp {
    /// The features of `example` (number `id`), if it has the input width.
    fn features<'a>(&self, id: u64, example: &'a ProbeExample) -> Result<&'a [f32]> {
        let width = self.spec.in_features();
        match &example.input {
            ProbeInput::Features(x) if x.len() == width => Ok(x),
            ProbeInput::Features(x) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "example {id} has {} input features; the MLP takes {width}",
                    x.len()
                ),
            )),
            ProbeInput::Tokens(_) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("example {id} has `tokens`; an MLP takes `input` features"),
            )),
            ProbeInput::Text(_) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("example {id} has `text`; an MLP takes `input` features"),
            )),
        }
    }
}
