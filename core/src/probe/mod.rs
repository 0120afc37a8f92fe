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
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

pub use set::{ProbeExample, ProbeInput};

use crate::error::{Error, ErrorKind, Result};
use crate::io::Checkpoint;
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

    /// Layers that read the same input as another layer, alias → owner
    /// (the recorder's [`RecorderOptions::gram_shared`]): their Grams are
    /// equal and stored once. The default: none.
    fn gram_shared(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// The block (decoder layer, MLP layer) a recorded layer belongs to,
    /// for [`ProbeOptions::gram_blocks`]. The default: its position in
    /// [`ProbeModel::layers`].
    fn block_of(&self, layer: &str) -> Option<usize> {
        self.layers().iter().position(|l| l.name == layer)
    }

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
    /// Opens a model directory this architecture detected, with the
    /// tensors of the given checkpoint instead of the directory's own.
    pub open_with: fn(&Path, Checkpoint) -> Result<Box<dyn ProbeModel>>,
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
    (architecture_of(dir)?.open)(dir)
}

/// [`open_model`] with the tensors of `checkpoint` instead of the
/// directory's own (the description, `config.json` and tokenizer still
/// come from `dir`).
pub fn open_model_with(dir: &Path, checkpoint: Checkpoint) -> Result<Box<dyn ProbeModel>> {
    (architecture_of(dir)?.open_with)(dir, checkpoint)
}

/// The first architecture of [`ARCHITECTURES`] that recognises `dir`.
pub(crate) fn architecture_of(dir: &Path) -> Result<&'static Architecture> {
    if !dir.is_dir() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "not a model directory (a native probe reads a directory: description + weights)",
        )
        .with_file(dir));
    }
    if let Some(arch) = ARCHITECTURES.iter().find(|a| (a.detect)(dir)) {
        return Ok(arch);
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

/// [`run_probe_with_progress`] with example ids of the caller's choosing:
/// `examples[n]` runs as example id `ids[n]` (the probe-set position of a
/// source-restricted selection, so that recordings of disjoint selections
/// combine). `ids.len()` must equal `examples.len()`.
pub fn run_probe_ids(
    model: &dyn ProbeModel,
    examples: &[ProbeExample],
    ids: &[u64],
    recorder: &Recorder,
    threads: Option<usize>,
    progress: Option<&ProgressFn>,
) -> Result<u64> {
    if ids.len() != examples.len() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} example ids for {} examples", ids.len(), examples.len()),
        ));
    }
    run_examples(model, examples, Some(ids), recorder, threads, progress)
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
    run_examples(model, examples, None, recorder, threads, progress)
}

fn run_examples(
    model: &dyn ProbeModel,
    examples: &[ProbeExample],
    ids: Option<&[u64]>,
    recorder: &Recorder,
    threads: Option<usize>,
    progress: Option<&ProgressFn>,
) -> Result<u64> {
    let examples = tokenize_texts(model, examples)?;
    let examples = &examples[..];
    let id_of = |n: usize| ids.map_or(n as u64, |ids| ids[n]);
    for (n, example) in examples.iter().enumerate() {
        model.check(id_of(n), example)?;
    }
    let done = AtomicUsize::new(0);
    let tokens = AtomicU64::new(0);
    let total = examples.len();
    crate::engine::thread_pool(threads)?.install(|| {
        examples
            .par_iter()
            .enumerate()
            .try_for_each(|(n, example)| {
                model.forward(id_of(n), example, recorder)?;
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
    /// Record each layer's input Gram (SPEC §4 version 2).
    pub gram: bool,
    /// With `gram`: only the layers of these blocks ([`ProbeModel::block_of`]:
    /// decoder layers of a LLaMA, layers of an MLP) get Grams, bounding
    /// memory (module docs of [`crate::recorder`]); `None`: all.
    pub gram_blocks: Option<Range<usize>>,
    /// With `gram`: only these layers get Grams (with `gram_blocks` too:
    /// those of both); `None`: all. Names not recorded by the model are an
    /// error.
    pub gram_layers: Option<BTreeSet<String>>,
    /// Run only the probe examples whose `source` is listed (example ids
    /// stay their probe-set positions); the file records the sources.
    /// Rows need every example, so they are off unless `max_examples` asks.
    pub sources: Option<Vec<String>>,
    /// Write the recorder's exact partial state ([`Recorder::save_part`])
    /// instead of the statistics file, for [`crate::recorder::combine_parts`].
    pub part: bool,
}

impl std::fmt::Debug for ProbeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeOptions")
            .field("max_examples", &self.max_examples)
            .field("threads", &self.threads)
            .field("missing_rows", &self.missing_rows)
            .field("gram", &self.gram)
            .field("gram_blocks", &self.gram_blocks)
            .field("gram_layers", &self.gram_layers)
            .field("sources", &self.sources)
            .field("part", &self.part)
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
    probe_model(
        open_model(model_dir)?.as_ref(),
        model_dir,
        probe_set,
        output,
        options,
    )
}

/// [`probe_files`] with the model already open ([`open_model_with`]);
/// `model_dir` names it in the file and in errors.
pub fn probe_model(
    model: &dyn ProbeModel,
    model_dir: &Path,
    probe_set: &Path,
    output: &Path,
    options: &ProbeOptions,
) -> Result<ProbeSummary> {
    let examples = set::read_probe_set(probe_set)?;
    if examples.is_empty() {
        return Err(
            Error::new(ErrorKind::InvalidInput, "the probe set has no examples")
                .with_file(probe_set),
        );
    }
    let description = model.describe();
    let (ids, selected) = select_sources(&examples, options.sources.as_deref(), probe_set)?;
    let max_examples = match (&options.sources, options.max_examples) {
        (None, m) => m.unwrap_or(examples.len()),
        (Some(_), None | Some(0)) => 0,
        (Some(_), Some(_)) => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "per-example rows need every probe example (ids without gaps); a recording \
                 restricted to sources keeps means and Grams only (drop --max-examples)",
            )
            .with_file(probe_set))
        }
    };
    let mut gram_shared = BTreeMap::new();
    let mut gram_layers = None;
    if options.gram {
        gram_shared = model.gram_shared();
        if let Some(blocks) = &options.gram_blocks {
            let chosen: BTreeSet<String> = model
                .layers()
                .into_iter()
                .filter(|l| model.block_of(&l.name).is_some_and(|b| blocks.contains(&b)))
                .map(|l| l.name)
                .collect();
            if chosen.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "Gram blocks {}..{} hold no layer of the {description}",
                        blocks.start, blocks.end
                    ),
                )
                .with_file(model_dir));
            }
            gram_layers = Some(chosen);
        }
        if let Some(wanted) = &options.gram_layers {
            let recorded: BTreeSet<String> = model.layers().into_iter().map(|l| l.name).collect();
            if let Some(unknown) = wanted.iter().find(|l| !recorded.contains(*l)) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "`{unknown}` is not a layer the {description} records, so it gets no Gram"
                    ),
                )
                .with_file(model_dir));
            }
            gram_layers = Some(match gram_layers {
                Some(chosen) => chosen.intersection(wanted).cloned().collect(),
                None => wanted.clone(),
            });
        }
    }
    let recorder = Recorder::new(RecorderOptions {
        max_examples,
        model: format!("{description} ({})", model_dir.display()),
        probe: format!("{} ({} examples)", probe_set.display(), examples.len()),
        missing_rows: options.missing_rows,
        gram: options.gram,
        gram_layers,
        gram_shared,
        sources: options.sources.clone(),
    });
    let start = Instant::now();
    let tokens = run_examples(
        model,
        &selected,
        Some(&ids),
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
    let (rows, layers) = if options.part {
        // The exact state only: no f32 statistics are built.
        recorder.save_part(output)?;
        (0, model.layers().len())
    } else {
        let stats = recorder.stats()?;
        stats.save(output)?;
        (
            stats.modality.as_ref().map_or(0, |m| m.len() as u64),
            stats.layers.len(),
        )
    };
    Ok(ProbeSummary {
        model: description,
        examples: selected.len(),
        rows,
        layers,
        tokens,
        seconds,
        output: output.to_path_buf(),
    })
}

/// The examples of `examples` whose source is in `sources` (all when
/// `None`), with their probe-set positions as ids. An unknown source is an
/// error naming it and the probe set.
fn select_sources(
    examples: &[ProbeExample],
    sources: Option<&[String]>,
    probe_set: &Path,
) -> Result<(Vec<u64>, Vec<ProbeExample>)> {
    let Some(sources) = sources else {
        return Ok(((0..examples.len() as u64).collect(), examples.to_vec()));
    };
    let known: BTreeSet<&str> = examples.iter().map(|e| e.source.as_str()).collect();
    let unknown: Vec<&str> = sources
        .iter()
        .map(String::as_str)
        .filter(|s| !known.contains(s))
        .collect();
    if sources.is_empty() || !unknown.is_empty() {
        let listed: Vec<&str> = known.iter().copied().filter(|s| !s.is_empty()).collect();
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "source{} {} not in the probe set (its sources: {})",
                if unknown.len() == 1 { "" } else { "s" },
                if unknown.is_empty() {
                    "(none given)".to_string()
                } else {
                    unknown
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if listed.is_empty() {
                    "none".to_string()
                } else {
                    listed.join(", ")
                }
            ),
        )
        .with_file(probe_set));
    }
    let wanted: BTreeSet<&str> = sources.iter().map(String::as_str).collect();
    Ok(examples
        .iter()
        .enumerate()
        .filter(|(_, e)| wanted.contains(e.source.as_str()))
        .map(|(n, e)| (n as u64, e.clone()))
        .unzip())
}
