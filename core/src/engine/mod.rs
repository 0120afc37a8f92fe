//! The streaming merge engine: opens the inputs, plans, runs the per-tensor
//! kernels of [`crate::safe_m`] on memory-mapped data in parallel, and
//! streams the result through the sharded writer, tensor by tensor.
//!
//! Memory: one tensor is merged at a time while the writer thread writes
//! the one before — two outputs, the merged tensor's input pages (released
//! after it), for SAFE-M one f32 score per element and model, for the
//! whole-tensor baselines their f32 task vectors — plus a few rows of
//! scratch per thread. Determinism: every element's value depends only on
//! its own row (row dot products use [`crate::reduce`]) and on the tensor's
//! thresholds, which are exact integer-count selections; chunk boundaries
//! are fixed by the shape alone. Any thread count gives the same bytes.

pub(crate) mod chunks;

pub use chunks::parallel_select;

/// FAM's alignment and fusion on checkpoints (it lives with the method).
pub use crate::methods::fam::tensor as fam;

use crate::config::{MergeConfig, NanPolicy};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{OutputTensor, ShardedWriter, TensorView};
use crate::methods::TensorInput;
use crate::plan::{open_inputs, plan, Inputs, Plan, TensorPlan, TensorRule};
use crate::report::{MergeReport, TensorOutcome};
use crate::vocab::Vocabulary;
use chunks::convert;
use rayon::prelude::*;
use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements per work item; rows are never split.
pub(crate) const CHUNK_ELEMENTS: usize = 1 << 16;

/// Where a merge is, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Tensors written so far.
    pub tensors_done: usize,
    /// Tensors in all.
    pub tensors_total: usize,
    /// Output bytes written so far.
    pub bytes_done: u64,
    /// Output bytes in all.
    pub bytes_total: u64,
    /// The tensor just written.
    pub tensor: &'a str,
}

/// How to run a merge (what the config does not say).
#[derive(Default)]
pub struct MergeOptions<'a> {
    /// The output directory (created; replaced only with `force`).
    pub out_dir: PathBuf,
    /// Largest shard, in bytes of tensor data; `None` writes one file.
    pub max_shard_bytes: Option<u64>,
    /// Worker threads; `None` uses every core.
    pub threads: Option<usize>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Called after each tensor is written.
    pub progress: Option<&'a (dyn Fn(&Progress<'_>) + Sync)>,
    /// Set to stop the merge between tensors (nothing is left behind).
    pub cancel: Option<&'a AtomicBool>,
    /// Leave the reference model's tokenizer files out of the output
    /// (mergekit's `--no-copy-tokenizer`); the model config is still copied.
    pub skip_tokenizer: bool,
    /// Write a `README.md` model card (mergekit's `--write-model-card`):
    /// the method, the inputs and the config, with Hugging Face front matter.
    pub model_card: bool,
}

impl MergeOptions<'_> {
    /// `Cancelled` once the caller has set the flag (nothing is left behind:
    /// the writer removes its temporary directory).
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(
                Error::new(ErrorKind::Cancelled, "merge cancelled; nothing was written")
                    .with_file(&self.out_dir),
            );
        }
        Ok(())
    }
}

/// What a finished merge did.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// The report written to `merge_report.json`.
    pub report: MergeReport,
}

/// A merge whose inputs are open and whose plan is checked; no tensor
/// data has been read yet. A `models:` config is one [`MergePart`]; a
/// `slices:` config one part per slice, whose tensors are written one
/// after the other into the same output.
pub struct PreparedMerge {
    config: MergeConfig,
    parts: Vec<MergePart>,
    /// Every part's plan, in output order.
    plan: Plan,
    /// The output vocabulary every model's rows are mapped into, if any.
    vocabulary: Option<Vocabulary>,
}

/// What a method merges at once: the whole merge of a `models:` config, or
/// one slice of a `slices:` config, whose inputs are its sources' layer
/// windows under the output's names. Methods see only their part.
pub struct MergePart {
    config: MergeConfig,
    inputs: Inputs,
    plan: Plan,
}

impl PreparedMerge {
    /// Opens the inputs of `config` and plans the merge; fails listing every problem found.
    pub fn new(config: MergeConfig) -> Result<PreparedMerge> {
        let vocabulary = Vocabulary::build(&config)?;
        if config.slices.is_empty() {
            let part = MergePart::new(config.clone(), vocabulary.as_ref())?;
            return Ok(PreparedMerge {
                config,
                plan: part.plan.clone(),
                parts: vec![part],
                vocabulary,
            });
        }
        let mut problems = crate::plan::Problems::default();
        let mut parts = Vec::with_capacity(config.slices.len());
        for slice in &config.slices {
            let slice = MergeConfig {
                seed: config.seed,
                strict: config.strict,
                nan_policy: config.nan_policy,
                out_dtype: config.out_dtype,
                ..slice.clone()
            };
            match MergePart::new(slice, vocabulary.as_ref()) {
                Ok(part) => parts.push(part),
                Err(e) => problems.push(e),
            }
        }
        problems.into_result()?;
        let plan = sliced_plan(&parts)?;
        Ok(PreparedMerge {
            config,
            parts,
            plan,
            vocabulary,
        })
    }

    /// The plan (what `--dry-run` prints): every part's tensors in output order.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The config.
    pub fn config(&self) -> &MergeConfig {
        &self.config
    }

    /// The opened inputs (of the first slice, for a `slices:` config).
    pub fn inputs(&self) -> &Inputs {
        &self.parts[0].inputs
    }

    /// The parts: one, or one per slice.
    pub fn parts(&self) -> &[MergePart] {
        &self.parts
    }

    /// Bytes of tensor data the merge reads: every input of every part
    /// (for a slice, the tensors of its windows).
    pub fn input_bytes(&self) -> u64 {
        self.parts.iter().map(MergePart::input_bytes).sum()
    }

    /// FAM's alignment of every neuron group (SPEC §2.2–2.3), from the
    /// statistics alone: what `flatmerge map` prints (empty for other methods).
    pub fn align(&self) -> Result<Vec<fam::GroupAlignment>> {
        self.parts[0].align()
    }

    /// Runs the merge into `options.out_dir`.
    pub fn run(&self, options: &MergeOptions<'_>) -> Result<MergeSummary> {
        self.check_output_is_not_an_input(&options.out_dir)?;
        thread_pool(options.threads)?.install(|| self.run_in_pool(options))
    }

    /// Refuses an output directory that is, or holds, one of the inputs:
    /// `--force` would otherwise replace a model the merge is reading.
    fn check_output_is_not_an_input(&self, out_dir: &Path) -> Result<()> {
        let Ok(out) = out_dir.canonicalize() else {
            return Ok(());
        };
        let inputs = self
            .parts
            .iter()
            .flat_map(|p| p.inputs.base.iter().chain(&p.inputs.models));
        for input in inputs {
            for shard in input.checkpoint.shard_paths() {
                if shard.canonicalize().is_ok_and(|p| p.starts_with(&out)) {
                    return Err(Error::new(
                        ErrorKind::OutputExists,
                        format!("the output directory holds an input of this merge ({}); choose another output", shard.display()),
                    )
                    .with_file(out_dir));
                }
            }
        }
        Ok(())
    }

    fn run_in_pool(&self, options: &MergeOptions<'_>) -> Result<MergeSummary> {
        let outputs: Vec<OutputTensor> = self
            .plan
            .tensors
            .iter()
            .map(|t| OutputTensor {
                name: t.name.clone(),
                dtype: t.out_dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            (
                "merged_by".to_string(),
                format!("flatmerge {}", crate::VERSION),
            ),
            (
                "merge_method".to_string(),
                self.config.method.as_str().to_string(),
            ),
        ]);
        let writer = ShardedWriter::create(
            &options.out_dir,
            outputs,
            options.max_shard_bytes,
            metadata,
            options.force,
        )?;
        let first = &self.parts[0];
        let mut report = MergeReport::new(&self.config, &first.inputs, &self.plan, writer.shards());
        if self.parts.len() > 1 {
            report.inputs = self
                .parts
                .iter()
                .enumerate()
                .flat_map(|(s, p)| {
                    let slice = match &p.config.layer_window {
                        Some(w) if w.whole => None,
                        Some(w) => Some(w.slice),
                        None => Some(s),
                    };
                    MergeReport::input_reports(&p.config, &p.inputs, slice)
                })
                .collect();
        }
        // A writer thread copies tensor k into the file while the pool
        // computes tensor k + 1. The rendezvous channel bounds memory to two
        // output tensors: the one being written and the one waiting.
        let (finished, to_write) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(0);
        let (computed, writer) = std::thread::scope(|scope| {
            let writing = scope.spawn(|| self.write_tensors(writer, to_write, options));
            let computed = (|| -> Result<()> {
                let mut index = 0;
                for (s, part) in self.parts.iter().enumerate() {
                    let prepared = part.config.method.prepare(part)?;
                    if let Some((key, value)) = prepared.report {
                        let key = match self.parts.len() {
                            1 => key.to_string(),
                            _ => format!("{key}_slice_{s}"),
                        };
                        report.results.insert(key, value);
                    }
                    let state = prepared.state.as_ref();
                    for tensor in &part.plan.tensors {
                        options.check_cancel()?;
                        let merged = part.merge_tensor(tensor, state);
                        part.release_inputs(tensor);
                        let (bytes, outcome) = merged.map_err(|e| {
                            if e.tensor().is_some() {
                                e
                            } else {
                                e.with_tensor(&tensor.name)
                            }
                        })?;
                        report.record(index, outcome);
                        if finished.send((index, bytes)).is_err() {
                            // The writer stopped on an error, which it returns.
                            return Ok(());
                        }
                        index += 1;
                    }
                }
                Ok(())
            })();
            drop(finished);
            let writer = writing
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (computed, writer)
        });
        // The writer's error first: a failed write also ends the computation.
        let mut writer = writer?;
        computed?;
        let out_dtype = self.config.out_dtype;
        let layers = (!self.config.slices.is_empty()).then(|| self.sliced_layers());
        let template = self.chat_template();
        let files = SideFiles {
            dir: first.inputs.reference().checkpoint.dir(),
            out_dtype,
            layers: layers.as_ref(),
            skip_tokenizer: options.skip_tokenizer,
            chat_template: template.as_deref(),
            vocabulary: self.vocabulary.as_ref(),
        };
        let (copied, template_files) = files.copy(&mut writer)?;
        report.copied_files = copied;
        if let Some(v) = &self.config.vocabulary {
            let section = match &self.vocabulary {
                Some(vocabulary) => vocabulary.report(),
                None => serde_json::json!({
                    "source": "base",
                    "note": format!("the base model has no {}: its tokenizer files are copied and no rows are mapped", crate::vocab::TOKENIZER_FILE),
                    "tokens_configured": v.tokens.len(),
                }),
            };
            report.results.insert("vocabulary".into(), section);
        }
        if let Some(chosen) = &self.config.chat_template {
            report.results.insert(
                "chat_template".into(),
                serde_json::json!({
                    "chosen": chosen.label(),
                    "found": template.is_some(),
                    "written_to": template_files,
                }),
            );
        }
        writer.write_file("merge_report.json", &report.to_json_bytes())?;
        if options.model_card {
            let config_text = match &self.config.source {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?),
                None => None,
            };
            let card = report.model_card(config_text.as_deref());
            writer.write_file("README.md", card.as_bytes())?;
        }
        options.check_cancel()?;
        for part in &self.parts {
            for input in part.inputs.base.iter().chain(&part.inputs.models) {
                input.checkpoint.check_unchanged()?;
            }
        }
        let out_dir = writer.finish()?;
        Ok(MergeSummary { out_dir, report })
    }

    /// The writer thread: writes the tensors in plan order as they come and
    /// reports progress; hands the writer back for the side files.
    fn write_tensors(
        &self,
        mut writer: ShardedWriter,
        to_write: std::sync::mpsc::Receiver<(usize, Vec<u8>)>,
        options: &MergeOptions<'_>,
    ) -> Result<ShardedWriter> {
        let bytes_total = self.plan.out_bytes();
        let mut bytes_done = 0;
        for (index, bytes) in to_write {
            let tensor = &self.plan.tensors[index];
            writer.write_tensor(&tensor.name, &bytes)?;
            bytes_done += bytes.len() as u64;
            if let Some(progress) = options.progress {
                progress(&Progress {
                    tensors_done: index + 1,
                    tensors_total: self.plan.tensors.len(),
                    bytes_done,
                    bytes_total,
                    tensor: &tensor.name,
                });
            }
            // A progress callback may have asked to stop: write nothing more.
            options.check_cancel()?;
        }
        Ok(writer)
    }

    /// The text of the config's `chat_template`, `auto` read from every
    /// input model's directory in config order.
    fn chat_template(&self) -> Option<String> {
        let chosen = self.config.chat_template.as_ref()?;
        let dirs: Vec<&Path> = self
            .parts
            .iter()
            .flat_map(|p| p.inputs.base.iter().chain(&p.inputs.models))
            .map(|i| i.checkpoint.dir())
            .collect();
        let mut seen = std::collections::HashSet::new();
        chosen.resolve(dirs.into_iter().filter(|d| seen.insert(d.to_path_buf())))
    }

    /// Where each output layer of a `slices:` merge comes from: per slice,
    /// its first source's directory and layer window.
    fn sliced_layers(&self) -> Vec<(PathBuf, crate::layers::LayerWindow)> {
        self.parts
            .iter()
            .filter_map(|p| {
                let window = p.config.models.first()?.window.clone()?;
                Some((p.inputs.models[0].checkpoint.dir().to_path_buf(), window))
            })
            .collect()
    }
}

impl MergePart {
    fn new(mut config: MergeConfig, vocabulary: Option<&Vocabulary>) -> Result<MergePart> {
        let mut inputs = open_inputs(&config)?;
        resolve_whole_windows(&mut config, &inputs);
        if let Some(vocabulary) = vocabulary {
            vocabulary.map_inputs(&config, &mut inputs)?;
        }
        let plan = plan(&config, &inputs)?;
        Ok(MergePart {
            config,
            inputs,
            plan,
        })
    }

    /// The part's plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The part's config (a slice's own, for a `slices:` config).
    pub fn config(&self) -> &MergeConfig {
        &self.config
    }

    /// The part's opened inputs.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    fn input_bytes(&self) -> u64 {
        let inputs = self.inputs.base.iter().chain(&self.inputs.models);
        inputs.map(|i| i.checkpoint.total_bytes()).sum()
    }

    /// Drops the process's mapping of every input of `tensor`, so resident
    /// memory stays at a few tensors however large the models are.
    fn release_inputs(&self, tensor: &TensorPlan) {
        let source = tensor.source.as_deref().unwrap_or(&tensor.name);
        if let Some(base) = &self.inputs.base {
            base.checkpoint.release(&tensor.name);
        }
        self.inputs.receiver().checkpoint.release(&tensor.name);
        for &k in &tensor.contributors {
            self.inputs.contributor(k).checkpoint.release(source);
        }
    }

    /// The tensor `name` of one input, as planned.
    pub(crate) fn view<'a>(&'a self, model: Model, name: &str) -> Result<TensorView<'a>> {
        let checkpoint = match model {
            Model::Base => {
                &self
                    .inputs
                    .base
                    .as_ref()
                    .expect("planned with a base")
                    .checkpoint
            }
            Model::Receiver => &self.inputs.receiver().checkpoint,
            Model::Reference => &self.inputs.reference().checkpoint,
            Model::Contributor(k) => &self.inputs.contributor(k).checkpoint,
        };
        checkpoint.view(name).ok_or_else(|| {
            Error::new(ErrorKind::Plan, "tensor vanished after planning")
                .with_file(checkpoint.root())
                .with_tensor(name)
        })
    }

    /// FAM's alignment of every neuron group of the part (SPEC §2.2–2.3).
    pub fn align(&self) -> Result<Vec<fam::GroupAlignment>> {
        crate::methods::fam::alignments(self)
    }

    /// Refuses NaN or infinite values in the inputs of a tensor, naming the
    /// file, the tensor and the first bad index (the `error` NaN policy).
    pub(crate) fn check_finite(
        &self,
        tensor: &TensorPlan,
        contributors: &[TensorView<'_>],
    ) -> Result<()> {
        let mut inputs: Vec<(&std::path::Path, TensorView<'_>)> = Vec::new();
        fn named<'a>(
            input: &'a crate::plan::Input,
            name: &str,
        ) -> Option<(&'a std::path::Path, TensorView<'a>)> {
            input
                .checkpoint
                .view(name)
                .map(|v| (input.checkpoint.root(), v))
        }
        inputs.extend(
            self.inputs
                .base
                .as_ref()
                .and_then(|b| named(b, &tensor.name)),
        );
        inputs.extend(named(self.inputs.receiver(), &tensor.name));
        for (&k, view) in tensor.contributors.iter().zip(contributors) {
            // A stacked tensor's bytes are its parts'.
            let checkpoint = &self.inputs.contributor(k).checkpoint;
            for stored in view.stored(checkpoint) {
                inputs.push((checkpoint.root(), stored));
            }
        }
        for (file, view) in inputs {
            let size = view.dtype.size();
            let parts: Vec<(usize, Option<usize>)> = view
                .data
                .par_chunks(CHUNK_ELEMENTS * size)
                .enumerate()
                .map(|(chunk, bytes)| {
                    let (count, first) = crate::dtype::nonfinite(view.dtype, bytes);
                    (count, first.map(|i| chunk * CHUNK_ELEMENTS + i))
                })
                .collect();
            let count: usize = parts.iter().map(|p| p.0).sum();
            if let Some(first) = parts.iter().find_map(|p| p.1) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "holds {count} NaN or infinite value(s), the first at flat index {first}; fix the checkpoint or set `nan_policy: propagate` (--nan-policy propagate) to merge them through"
                    ),
                )
                .with_file(file)
                .with_tensor(view.name));
            }
        }
        Ok(())
    }

    /// A FAM tensor by the receiver's name: A's, or B's counterpart.
    pub(crate) fn fam_view(&self, receiver: bool, name: &str) -> Result<TensorView<'_>> {
        if receiver {
            return self.view(Model::Receiver, name);
        }
        let source = self
            .plan
            .tensors
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.source.as_deref());
        self.view(Model::Contributor(0), source.unwrap_or(name))
    }

    fn merge_tensor(
        &self,
        tensor: &TensorPlan,
        state: &(dyn Any + Send + Sync),
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let source = tensor.source.as_deref().unwrap_or(&tensor.name);
        let contributors = tensor
            .contributors
            .iter()
            .map(|&k| self.view(Model::Contributor(k), source))
            .collect::<Result<Vec<_>>>()?;
        if self.config.nan_policy == NanPolicy::Error {
            self.check_finite(tensor, &contributors)?;
        }
        match &tensor.rule {
            TensorRule::Copy { .. } => Ok((
                convert(
                    &self.view(Model::Reference, &tensor.name)?,
                    tensor.out_dtype,
                ),
                TensorOutcome::default(),
            )),
            _ => self.config.method.merge_tensor(
                self,
                state,
                &TensorInput {
                    plan: tensor,
                    contributors,
                },
            ),
        }
    }

    /// Releases contributor `k`'s pages of `tensor` once a method no
    /// longer reads them (methods that hold decoded task vectors).
    pub(crate) fn release_contributor(&self, tensor: &TensorPlan, k: usize) {
        let source = tensor.source.as_deref().unwrap_or(&tensor.name);
        self.inputs.contributor(k).checkpoint.release(source);
    }
}

/// A module merged from `models:` takes every layer its models have: the
/// count its windows carry (for gradients, the report and `config.json`)
/// is each model's, known once the checkpoints are open.
fn resolve_whole_windows(config: &mut MergeConfig, inputs: &Inputs) {
    let resolve = |window: &mut Option<crate::layers::LayerWindow>, input: &crate::plan::Input| {
        if let Some(w) = window.as_mut().filter(|w| w.whole) {
            w.count = w.stack(&input.checkpoint).map_or(0, |(_, layers)| layers);
        }
    };
    resolve(&mut config.layer_window, inputs.reference());
    if let (Some(base), Some(input)) = (config.base.as_mut(), inputs.base.as_ref()) {
        resolve(&mut base.window, input);
    }
    for (model, input) in config.models.iter_mut().zip(&inputs.models) {
        resolve(&mut model.window, input);
    }
}

/// The plan of a `slices:` merge: each slice's tensors in turn. Windows
/// give every output name to one slice; a name planned twice (a model whose
/// layer tensors do not follow `…layers.N.`) is an error.
fn sliced_plan(parts: &[MergePart]) -> Result<Plan> {
    let mut seen = std::collections::HashSet::new();
    let mut tensors = Vec::new();
    let mut dropped = Vec::new();
    for (s, part) in parts.iter().enumerate() {
        let part_key = part
            .config
            .layer_window
            .as_ref()
            .map_or_else(|| format!("slices[{s}]"), |w| w.key.clone());
        for t in &part.plan.tensors {
            if !seen.insert(t.name.clone()) {
                return Err(Error::new(
                    ErrorKind::Plan,
                    format!("`{part_key}` writes a tensor an earlier slice already wrote; its name does not follow the decoder's `…layers.N.` numbering"),
                )
                .with_file(part.inputs.reference().checkpoint.root())
                .with_tensor(&t.name));
            }
            tensors.push(t.clone());
        }
        dropped.extend(part.plan.dropped.iter().cloned());
    }
    Ok(Plan {
        tensors,
        dropped,
        // The language model's layers (a vision tower's are its own).
        layers: parts
            .iter()
            .filter_map(|p| p.config.layer_window.as_ref())
            .filter(|w| {
                w.module
                    .is_none_or(|m| m == crate::modules::Module::TextDecoder)
            })
            .map(|w| w.count)
            .sum(),
        groups: parts[0].plan.groups.clone(),
    })
}

/// One input of a merge.
#[derive(Clone, Copy)]
pub(crate) enum Model {
    /// The base model (SAFE-M: the common ancestor).
    Base,
    /// The first model (SAFE-M's and FAM's receiver).
    Receiver,
    /// The model the output's names come from ([`Inputs::reference`]):
    /// the receiver, or the base of a method over a base.
    Reference,
    /// Contributor `k` (0-based among the contributors).
    Contributor(usize),
}

/// A worker pool of `threads` threads (`None`: one per core). Parallelism
/// is a parameter, not a global: results never depend on it.
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("cannot start worker threads: {e}"),
            )
        })
}

/// The peak resident memory of this process so far, in bytes (Linux
/// `VmHWM`; `None` elsewhere): what a merge's memory bound is checked with.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Opens, plans and runs a merge in one call.
pub fn merge(config: MergeConfig, options: &MergeOptions<'_>) -> Result<MergeSummary> {
    PreparedMerge::new(config)?.run(options)
}

/// Files of the receiver's directory that a Hugging Face loader needs
/// beside the weights: model config, tokenizer, processor, chat template.
pub fn is_side_file(name: &str) -> bool {
    const EXACT: [&str; 10] = [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "image_processor_config.json",
        "chat_template.json",
    ];
    EXACT.contains(&name)
        || name.starts_with("tokenizer")
        || name.starts_with("vocab.")
        || name.starts_with("chat_template")
        || name.ends_with(".tiktoken")
        || name == "spiece.model"
        || name == "sentencepiece.bpe.model"
        // flatmerge's own MLP description, so a merged MLP can be probed again.
        || name == "flatmerge_mlp.json"
}

/// Side files that make up the tokenizer (what `--no-copy-tokenizer`
/// leaves out): vocabularies, merges, special tokens, chat templates.
pub fn is_tokenizer_file(name: &str) -> bool {
    is_side_file(name)
        && (name.starts_with("tokenizer")
            || name.starts_with("vocab.")
            || name.starts_with("chat_template")
            || name.ends_with(".tiktoken")
            || matches!(
                name,
                "special_tokens_map.json"
                    | "added_tokens.json"
                    | "merges.txt"
                    | "spiece.model"
                    | "sentencepiece.bpe.model"
            ))
}

/// The side files of the output: what to copy from where, and how to edit them.
struct SideFiles<'a> {
    /// The reference model's directory.
    dir: &'a Path,
    /// `config.json` gets `torch_dtype` when a dtype was chosen, so loaders
    /// with `torch_dtype="auto"` pick it up.
    out_dtype: Option<Dtype>,
    /// For a `slices:` merge, the new layer count (see [`with_layers`]).
    layers: Option<&'a Vec<(PathBuf, crate::layers::LayerWindow)>>,
    /// `--no-copy-tokenizer`.
    skip_tokenizer: bool,
    /// The chat template to set in `tokenizer_config.json` and
    /// `chat_template.jinja` (the latter written when neither exists).
    chat_template: Option<&'a str>,
    /// The output vocabulary: the tokenizer files come from its source's
    /// directory (rebuilt when it adds tokens) and `config.json` gets its
    /// `vocab_size`.
    vocabulary: Option<&'a Vocabulary>,
}

impl SideFiles<'_> {
    /// Copies the side files; returns their names and the files the chat
    /// template was written to.
    fn copy(&self, writer: &mut ShardedWriter) -> Result<(Vec<String>, Vec<String>)> {
        let listed = |dir: &Path| -> Result<Vec<String>> {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            Ok(entries
                .filter_map(|e| e.ok())
                // Follows links: Hugging Face cache snapshots are links into a blob store.
                .filter(|e| e.path().is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| is_side_file(name))
                .collect())
        };
        // Tokenizer files come from the vocabulary's source when there is one.
        let tokenizer_dir = self.vocabulary.map_or(self.dir, Vocabulary::tokenizer_dir);
        let rebuilt = self.vocabulary.and_then(Vocabulary::rebuilt);
        let mut files: Vec<(String, PathBuf)> = listed(self.dir)?
            .into_iter()
            .filter(|name| !is_tokenizer_file(name))
            .map(|name| (name.clone(), self.dir.join(name)))
            .collect();
        if !self.skip_tokenizer {
            files.extend(
                listed(tokenizer_dir)?
                    .into_iter()
                    .filter(|name| is_tokenizer_file(name))
                    // A rebuilt tokenizer.json is the tokenizer: the files of
                    // slow tokenizers would still hold the old vocabulary.
                    .filter(|name| rebuilt.is_none() || !is_slow_tokenizer_file(name))
                    .map(|name| (name.clone(), tokenizer_dir.join(name))),
            );
        }
        files.sort();
        let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let mut template_files = Vec::new();
        let template = self.chat_template.filter(|_| !self.skip_tokenizer);
        let not_an_object = |path: &Path, what: &str| {
            Error::new(
                ErrorKind::Format,
                format!("not a JSON object, so {what} cannot be set in it"),
            )
            .with_file(path)
        };
        for (name, path) in &files {
            let read = || std::fs::read(path).map_err(|e| Error::io(path, e));
            match name.as_str() {
                "config.json"
                    if self.out_dtype.is_some()
                        || self.layers.is_some()
                        || self.vocabulary.is_some() =>
                {
                    let mut text = read()?;
                    if let Some(windows) = self.layers {
                        text = with_layers(&text, windows).map_err(|e| e.with_file(path))?;
                    }
                    if let Some(vocabulary) = self.vocabulary {
                        text = vocabulary
                            .model_config(&text)
                            .ok_or_else(|| not_an_object(path, "`vocab_size`"))?;
                    }
                    if let Some(dtype) = self.out_dtype {
                        text = with_torch_dtype(&text, dtype).unwrap_or(text);
                    }
                    writer.write_file(name, &text)?;
                }
                "tokenizer.json" if rebuilt.is_some() => {
                    writer.write_file(name, rebuilt.expect("matched").as_bytes())?;
                }
                "tokenizer_config.json" if template.is_some() || rebuilt.is_some() => {
                    let mut text = read()?;
                    if let (Some(vocabulary), true) = (self.vocabulary, rebuilt.is_some()) {
                        text = vocabulary
                            .tokenizer_config(&text)
                            .ok_or_else(|| not_an_object(path, "the added tokens"))?;
                    }
                    if let Some(template) = template {
                        text = with_chat_template(&text, template)
                            .ok_or_else(|| not_an_object(path, "the chat template"))?;
                        template_files.push(name.clone());
                    }
                    writer.write_file(name, &text)?;
                }
                "chat_template.jinja" if template.is_some() => {
                    writer.write_file(name, template.expect("matched").as_bytes())?;
                    template_files.push(name.clone());
                }
                _ => writer.copy_file(path, name)?,
            }
        }
        if let (Some(text), true) = (template, template_files.is_empty()) {
            writer.write_file("chat_template.jinja", text.as_bytes())?;
            names.push("chat_template.jinja".into());
            template_files.push("chat_template.jinja".into());
        }
        Ok((names, template_files))
    }
}

/// Tokenizer files of slow (Python) tokenizers, which a rebuilt
/// `tokenizer.json` supersedes.
fn is_slow_tokenizer_file(name: &str) -> bool {
    name == "tokenizer.model"
        || name.starts_with("vocab.")
        || name.ends_with(".tiktoken")
        || matches!(
            name,
            "merges.txt" | "added_tokens.json" | "spiece.model" | "sentencepiece.bpe.model"
        )
}

/// `tokenizer_config.json` with `chat_template` set; `None` when it is not
/// a JSON object.
fn with_chat_template(text: &[u8], template: &str) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(text).ok()?;
    value
        .as_object_mut()?
        .insert("chat_template".into(), template.into());
    let mut bytes = serde_json::to_vec_pretty(&value).ok()?;
    bytes.push(b'\n');
    Some(bytes)
}

/// `config.json` of a `slices:` merge: `num_hidden_layers` (at the top or
/// in `text_config`) becomes the output's layer count, and every list of
/// one entry per layer beside it (`layer_types`, …) is rebuilt from the
/// slices, each from its first source's `config.json`. A per-layer list a
/// source lacks, or whose length is not that source's layer count, cannot
/// be carried over: an error naming the key. Under `modules:`, each sliced
/// module's count is set where [`Module::layer_count_keys`] finds it (a
/// vision tower's in `vision_config`); a module merged whole keeps its own.
///
/// [`Module::layer_count_keys`]: crate::modules::Module::layer_count_keys
fn with_layers(text: &[u8], windows: &[(PathBuf, crate::layers::LayerWindow)]) -> Result<Vec<u8>> {
    use crate::modules::{Module, MODULES};
    let mut value = parse_json(text, Path::new("config.json"))?;
    let mut changed = false;
    for module in MODULES {
        let group: Vec<&(PathBuf, crate::layers::LayerWindow)> = windows
            .iter()
            .filter(|(_, w)| !w.whole && w.module.unwrap_or(Module::TextDecoder) == module)
            .collect();
        if !group.is_empty() {
            changed |= set_layer_count(&mut value, module.layer_count_keys(), &group)?;
        }
    }
    if !changed {
        return Ok(text.to_vec());
    }
    let mut bytes = serde_json::to_vec_pretty(&value).expect("a JSON value serialises");
    bytes.push(b'\n');
    Ok(bytes)
}

fn parse_json(bytes: &[u8], file: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::new(ErrorKind::Format, format!("not JSON: {e}")).with_file(file))
}

/// Sets one stack's layer count (and its per-layer lists) in `value`, at
/// the first of `keys` it holds; `false` when it holds none.
fn set_layer_count(
    value: &mut serde_json::Value,
    keys: &[(&str, &str)],
    windows: &[&(PathBuf, crate::layers::LayerWindow)],
) -> Result<bool> {
    use serde_json::Value;
    let section = |v: &Value| -> Option<(String, &str)> {
        keys.iter()
            .find(|(at, key)| v.pointer(&format!("{at}/{key}")).is_some())
            .map(|(at, key)| (at.to_string(), *key))
    };
    let Some((at, count_key)) = section(value) else {
        return Ok(false);
    };
    let old = value
        .pointer(&format!("{at}/{count_key}"))
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let per_layer: Vec<String> = value
        .pointer(&at)
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.as_array().is_some_and(|a| old > 1 && a.len() == old))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut lists: Vec<Vec<Value>> = vec![Vec::new(); per_layer.len()];
    for (dir, window) in windows {
        if per_layer.is_empty() {
            break;
        }
        let file = dir.join("config.json");
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let source = parse_json(&bytes, &file)?;
        let (prefix, source_key) = section(&source).unwrap_or((at.clone(), count_key));
        let layers = source
            .pointer(&format!("{prefix}/{source_key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        for (key, list) in per_layer.iter().zip(&mut lists) {
            let entries = source
                .pointer(&format!("{prefix}/{key}"))
                .and_then(Value::as_array)
                .filter(|a| a.len() == layers && window.first + window.count <= layers)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("`{key}` lists one entry per layer, but this source has no such list of {layers} entries, so `{}` cannot carry it over", window.key),
                    )
                    .with_file(&file)
                })?;
            list.extend_from_slice(&entries[window.first..window.first + window.count]);
        }
    }
    let total: usize = windows.iter().map(|(_, w)| w.count).sum();
    let object = value
        .pointer_mut(&at)
        .and_then(Value::as_object_mut)
        .expect("found above");
    object.insert(count_key.into(), total.into());
    for (key, list) in per_layer.into_iter().zip(lists) {
        object.insert(key, Value::Array(list));
    }
    Ok(true)
}

/// `config.json` with `torch_dtype` set; `None` when it is not a JSON object
/// (then it is copied as it is).
fn with_torch_dtype(text: &[u8], dtype: Dtype) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(text).ok()?;
    let object = value.as_object_mut()?;
    let name = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    object.insert("torch_dtype".into(), name.into());
    let mut bytes = serde_json::to_vec_pretty(&value).ok()?;
    bytes.push(b'\n');
    Some(bytes)
}
