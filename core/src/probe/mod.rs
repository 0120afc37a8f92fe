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

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

    /// Token ids of `texts` (the probe set's `"text"` examples), one list
    /// per text; [`run_probe`] calls it once per run, before
    /// [`ProbeModel::check`], and runs the ids as `tokens`. The default:
    /// the model takes no text ([`ErrorKind::InvalidInput`]).
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let _ = texts;
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "`text` examples need a tokenizer, and the {} has none (pre-tokenize to \
                 `tokens`)",
                self.describe()
            ),
        ))
    }
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
    run_probe_with_progress(model, examples, recorder, threads, None).map(|_| ())
}

/// How far a probe run is, as given to a progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeProgress {
    /// Examples finished so far.
    pub examples_done: usize,
    /// Examples in the run.
    pub examples_total: usize,
    /// Tokens of the finished examples ([`example_tokens`]).
    pub tokens_done: u64,
}

/// A progress callback: called after each example, from worker threads.
pub type ProgressFn = dyn Fn(ProbeProgress) + Send + Sync;

/// The tokens an example counts for in [`ProbeProgress`] and
/// [`ProbeSummary`]: its token count, 1 for a vector of features, 0 for
/// untokenized text.
pub fn example_tokens(example: &ProbeExample) -> u64 {
    match &example.input {
        ProbeInput::Tokens(t) => t.len() as u64,
        ProbeInput::Features(_) => 1,
        // Not known before tokenizing: run_probe counts its tokens.
        ProbeInput::Text(_) => 0,
    }
}

/// [`run_probe`], calling `progress` (when given) after each example with
/// the counts so far. Calls come from the worker threads, in no particular
/// order; each call's counts include its own example, and the last call
/// has `examples_done == examples_total`. Returns the tokens run
/// ([`example_tokens`], `text` examples counted after tokenizing).
pub fn run_probe_with_progress(
    model: &dyn ProbeModel,
    examples: &[ProbeExample],
    recorder: &Recorder,
    threads: Option<usize>,
    progress: Option<&ProgressFn>,
) -> Result<u64> {
    let examples = tokenize_texts(model, examples)?;
    let examples = &examples[..];
    for (id, example) in examples.iter().enumerate() {
        model.check(id as u64, example)?;
    }
    let done = AtomicUsize::new(0);
    let tokens = AtomicU64::new(0);
    let total = examples.len();
    crate::engine::thread_pool(threads)?.install(|| {
        examples
            .par_iter()
            .enumerate()
            .try_for_each(|(id, example)| {
                model.forward(id as u64, example, recorder)?;
                if let Some(progress) = progress {
                    let t = tokens.fetch_add(example_tokens(example), Ordering::Relaxed)
                        + example_tokens(example);
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    progress(ProbeProgress {
                        examples_done: d,
                        examples_total: total,
                        tokens_done: t,
                    });
                }
                Ok(())
            })
    })?;
    Ok(examples.iter().map(example_tokens).sum())
}

/// `examples` with every `text` example replaced by its tokens
/// ([`ProbeModel::tokenize`]); borrowed when there is none.
fn tokenize_texts<'a>(
    model: &dyn ProbeModel,
    examples: &'a [ProbeExample],
) -> Result<Cow<'a, [ProbeExample]>> {
    let texts: Vec<(usize, &str)> = examples
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.input {
            ProbeInput::Text(t) => Some((i, t.as_str())),
            _ => None,
        })
        .collect();
    let Some(&(first, _)) = texts.first() else {
        return Ok(Cow::Borrowed(examples));
    };
    let strs: Vec<&str> = texts.iter().map(|t| t.1).collect();
    let ids = model.tokenize(&strs).map_err(|e| {
        let prefixed = Error::new(e.kind(), format!("example {first}: {}", e.message()));
        match e.file() {
            Some(f) => prefixed.with_file(f),
            None => prefixed,
        }
    })?;
    let mut owned = examples.to_vec();
    for (&(i, _), tokens) in texts.iter().zip(ids) {
        if tokens.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("example {i}: its `text` gives no tokens"),
            ));
        }
        owned[i].input = ProbeInput::Tokens(tokens);
    }
    Ok(Cow::Owned(owned))
}

/// What [`probe_files`] does.
#[derive(Clone, Default)]
pub struct ProbeOptions {
    /// Keep per-example rows for the first this many examples (`None`: all
    /// of them; `Some(0)`: means only).
    pub max_examples: Option<usize>,
    /// Worker threads (`None`: all cores); results are identical for any count.
    pub threads: Option<usize>,
    /// Rows of examples that never reached a layer.
    pub missing_rows: MissingRows,
    /// Called after each example ([`run_probe_with_progress`]).
    pub progress: Option<Arc<ProgressFn>>,
}

impl std::fmt::Debug for ProbeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeOptions")
            .field("max_examples", &self.max_examples)
            .field("threads", &self.threads)
            .field("missing_rows", &self.missing_rows)
            .field(
                "progress",
                &self.progress.as_ref().map(|_| "Fn(ProbeProgress)"),
            )
            .finish()
    }
}

/// What [`probe_files`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSummary {
    /// The model's description.
    pub model: String,
    /// Examples run.
    pub examples: usize,
    /// Examples with per-example rows in the file.
    pub rows: u64,
    /// Layers recorded.
    pub layers: usize,
    /// Tokens run: the token inputs' lengths, 1 per example of features
    /// ([`example_tokens`]).
    pub tokens: u64,
    /// Wall time of the run ([`run_probe`]), in seconds: the forward
    /// passes, not reading the model or writing the file.
    pub seconds: f64,
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
    let start = Instant::now();
    let tokens = run_probe_with_progress(
        model.as_ref(),
        &examples,
        &recorder,
        options.threads,
        options.progress.as_deref(),
    )
    .map_err(|e| {
        if e.file().is_none() {
            e.with_file(probe_set)
        } else {
            e
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = recorder.stats()?;
    stats.save(output)?;
    Ok(ProbeSummary {
        model: description,
        examples: examples.len(),
        rows: stats.modality.as_ref().map_or(0, |m| m.len() as u64),
        layers: stats.layers.len(),
        tokens,
        seconds,
        output: output.to_path_buf(),
    })
}
