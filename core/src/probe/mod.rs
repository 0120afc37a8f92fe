//! Native probes (SPEC §1.1): flatmerge runs a model it knows on a probe
//! set and records each linear layer's input and output with a
//! [`Recorder`], giving the statistics file of SPEC §4 without any other
//! framework.
//!
//! - [`set`]: the probe-set format (JSON Lines), its reader and the
//!   meta-probe sampler.
//! - [`ProbeModel`]: what an architecture provides (its layers, a forward
//!   pass that feeds the recorder); [`ARCHITECTURES`] lists them and
//!   [`open_model`] picks one from a model directory's description.
//!   Adding an architecture is adding one module with a [`ProbeModel`]
//!   implementation and an [`Architecture`] entry.
//! - [`mlp`]: the MLP family (`flatmerge_mlp.json` + `model.safetensors`),
//!   with helpers to write such models.
//!
//! Examples run in parallel, one recorder push per layer and example; the
//! recorder's exact sums make the file the same for any thread count.

pub mod llama;
pub mod mlp;
pub mod set;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use set::{ProbeExample, ProbeInput};

use crate::error::{Error, ErrorKind, Result};
use crate::recorder::{MissingRows, Recorder, RecorderOptions};

/// Name and widths of a linear layer a probe records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    /// The layer's name (its weight's name without `.weight`).
    pub name: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

/// A model flatmerge can run itself to record activation statistics.
///
/// Implementations are called from several threads at once (one example
/// each).
pub trait ProbeModel: Send + Sync {
    /// A one-line description (the statistics file's `model`).
    fn describe(&self) -> String;

    /// The linear layers the probe records, in forward order.
    fn layers(&self) -> Vec<LayerShape>;

    /// Checks that example `id` fits the model (input kind and width),
    /// before anything runs. Errors are [`ErrorKind::InvalidInput`].
    fn check(&self, id: u64, example: &ProbeExample) -> Result<()>;

    /// Runs example `id` and pushes every recorded layer's input and
    /// output (before its nonlinearity, SPEC §1.1) to `recorder`, with
    /// example id `id` and the example's modality.
    fn forward(&self, id: u64, example: &ProbeExample, recorder: &Recorder) -> Result<()>;
}

/// An architecture of the registry: how to recognise its model
/// directories and open them.
#[derive(Debug, Clone, Copy)]
pub struct Architecture {
    /// Short name (`mlp`).
    pub name: &'static str,
    /// Whether a model directory holds this architecture.
    pub detect: fn(&Path) -> bool,
    /// Opens a model directory this architecture detected.
    pub open: fn(&Path) -> Result<Box<dyn ProbeModel>>,
}

/// The architectures flatmerge can probe natively, tried in order.
pub const ARCHITECTURES: &[Architecture] = &[mlp::ARCHITECTURE, llama::ARCHITECTURE];

/// Opens the model directory `dir` with the first architecture of
/// [`ARCHITECTURES`] that recognises it.
///
/// Errors: `dir` missing or holding no description flatmerge knows
/// ([`ErrorKind::NotFound`]); a Hugging Face `config.json` whose
/// `model_type` has no native probe yet ([`ErrorKind::InvalidInput`]);
/// the architecture's own errors when opening.
pub fn open_model(dir: &Path) -> Result<Box<dyn ProbeModel>> {
    if !dir.is_dir() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "not a model directory (a native probe reads a directory: description + weights)",
        )
        .with_file(dir));
    }
    if let Some(arch) = ARCHITECTURES.iter().find(|a| (a.detect)(dir)) {
        return (arch.open)(dir);
    }
    let names: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
    let config = dir.join("config.json");
    let model_type = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
    Err(match model_type {
        Some(t) => Error::new(
            ErrorKind::InvalidInput,
            format!(
                "model_type `{t}` has no native probe yet (native probes: {}); record its \
                 statistics from the framework's forward hooks with the recorder",
                names.join(", ")
            ),
        )
        .with_file(config),
        None => Error::new(
            ErrorKind::NotFound,
            format!(
                "no architecture description flatmerge can run (native probes: {}; an MLP \
                 needs `{}`)",
                names.join(", "),
                mlp::DESCRIPTION_FILE
            ),
        )
        .with_file(dir),
    })
}

/// Runs every example through `model`, pushing to `recorder`; example `n`
/// of `examples` is example id `n`. Every example is checked first (the
/// first misfit, in order, is the error); then examples run in parallel on
/// `threads` worker threads (`None`: all cores) — the recorded statistics
/// are the same for any count.
pub fn run_probe(
    model: &dyn ProbeModel,
    examples: &[ProbeExample],
    recorder: &Recorder,
    threads: Option<usize>,
) -> Result<()> {
    for (id, example) in examples.iter().enumerate() {
        model.check(id as u64, example)?;
    }
    crate::engine::thread_pool(threads)?.install(|| {
        examples
            .par_iter()
            .enumerate()
            .try_for_each(|(id, example)| model.forward(id as u64, example, recorder))
    })
}

/// What [`probe_files`] does.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// Keep per-example rows for the first this many examples (`None`: all
    /// of them; `Some(0)`: means only).
    pub max_examples: Option<usize>,
    /// Worker threads (`None`: all cores); results are identical for any count.
    pub threads: Option<usize>,
    /// Rows of examples that never reached a layer.
    pub missing_rows: MissingRows,
}

/// What [`probe_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSummary {
    /// The model's description.
    pub model: String,
    /// Examples run.
    pub examples: usize,
    /// Examples with per-example rows in the file.
    pub rows: u64,
    /// Layers recorded.
    pub layers: usize,
    /// The statistics file written.
    pub output: PathBuf,
}

/// Opens the model directory `model_dir` ([`open_model`]), runs the probe
/// set `probe_set` ([`set::read_probe_set`]) through it ([`run_probe`]) and
/// writes the statistics to `output` (atomically). The file's `model`
/// metadata is the model's description and directory, its `probe` the
/// probe set's path and size.
pub fn probe_files(
    model_dir: &Path,
    probe_set: &Path,
    output: &Path,
    options: &ProbeOptions,
) -> Result<ProbeSummary> {
    let model = open_model(model_dir)?;
    let examples = set::read_probe_set(probe_set)?;
    if examples.is_empty() {
        return Err(
            Error::new(ErrorKind::InvalidInput, "the probe set has no examples")
                .with_file(probe_set),
        );
    }
    let description = model.describe();
    let recorder = Recorder::new(RecorderOptions {
        max_examples: options.max_examples.unwrap_or(examples.len()),
        model: format!("{description} ({})", model_dir.display()),
        probe: format!("{} ({} examples)", probe_set.display(), examples.len()),
        missing_rows: options.missing_rows,
    });
    run_probe(model.as_ref(), &examples, &recorder, options.threads).map_err(|e| {
        if e.file().is_none() {
            e.with_file(probe_set)
        } else {
            e
        }
    })?;
    let stats = recorder.stats()?;
    stats.save(output)?;
    Ok(ProbeSummary {
        model: description,
        examples: examples.len(),
        rows: stats.modality.as_ref().map_or(0, |m| m.len() as u64),
        layers: stats.layers.len(),
        output: output.to_path_buf(),
    })
}
