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
/// data has been read yet.
pub struct PreparedMerge {
    config: MergeConfig,
    inputs: Inputs,
    plan: Plan,
}

impl PreparedMerge {
    /// Opens the inputs of `config` and plans the merge; fails listing every problem found.
    pub fn new(config: MergeConfig) -> Result<PreparedMerge> {
        let inputs = open_inputs(&config)?;
        let plan = plan(&config, &inputs)?;
        Ok(PreparedMerge {
            config,
            inputs,
            plan,
        })
    }

    /// The plan (what `--dry-run` prints).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The config.
    pub fn config(&self) -> &MergeConfig {
        &self.config
    }

    /// The opened inputs.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    /// Bytes of tensor data in all the inputs (the base and every model).
    pub fn input_bytes(&self) -> u64 {
        let inputs = self.inputs.base.iter().chain(&self.inputs.models);
        inputs.map(|i| i.checkpoint.total_bytes()).sum()
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
        let inputs = self.inputs.base.iter().chain(&self.inputs.models);
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
        let mut report = MergeReport::new(&self.config, &self.inputs, &self.plan, writer.shards());
        let prepared = self.config.method.prepare(self)?;
        if let Some((key, value)) = prepared.report {
            report.results.insert(key.to_string(), value);
        }
        let state = prepared.state.as_ref();
        // A writer thread copies tensor k into the file while the pool
        // computes tensor k + 1. The rendezvous channel bounds memory to two
        // output tensors: the one being written and the one waiting.
        let (finished, to_write) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(0);
        let (computed, writer) = std::thread::scope(|scope| {
            let writing = scope.spawn(|| self.write_tensors(writer, to_write, options));
            let computed = (|| -> Result<()> {
                for (index, tensor) in self.plan.tensors.iter().enumerate() {
                    options.check_cancel()?;
                    let merged = self.merge_tensor(tensor, state);
                    self.release_inputs(tensor);
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
                        break;
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
        report.copied_files = copy_side_files(
            &mut writer,
            self.inputs.reference().checkpoint.dir(),
            out_dtype,
        )?;
        writer.write_file("merge_report.json", &report.to_json_bytes())?;
        options.check_cancel()?;
        for input in self.inputs.base.iter().chain(&self.inputs.models) {
            input.checkpoint.check_unchanged()?;
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

    /// FAM's alignment of every neuron group (SPEC §2.2–2.3), from the
    /// statistics alone: what `flatmerge map` prints (empty for other methods).
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
            inputs.push((self.inputs.contributor(k).checkpoint.root(), *view));
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

/// Copies the receiver's side files; `config.json` gets the output dtype
/// when one was chosen, so loaders with `torch_dtype="auto"` pick it up.
fn copy_side_files(
    writer: &mut ShardedWriter,
    dir: &Path,
    out_dtype: Option<Dtype>,
) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        // Follows links: Hugging Face cache snapshots are links into a blob store.
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_side_file(name))
        .collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        match (name.as_str(), out_dtype) {
            ("config.json", Some(dtype)) => {
                let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                let bytes = with_torch_dtype(&text, dtype).unwrap_or(text);
                writer.write_file(name, &bytes)?;
            }
            _ => writer.copy_file(&path, name)?,
        }
    }
    Ok(names)
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
