//! The streaming merge engine: opens the inputs, plans, runs the per-tensor
//! kernels of [`crate::safe_m`] on memory-mapped data in parallel, and
//! streams the result through the sharded writer, tensor by tensor.
//!
//! Memory: one tensor at a time is held — its output bytes and, for SAFE-M,
//! one f32 score per element and model — plus a few rows of scratch per
//! thread. Determinism: every element's value depends only on its own row
//! (row dot products use [`crate::reduce`]) and on the tensor's thresholds,
//! which are exact integer-count radix selections; chunk boundaries are
//! fixed by the shape alone. Any thread count gives the same bytes.

use crate::config::{MergeConfig, MethodSettings, SafeMSettings};
use crate::dtype::{decode_f32, encode_f32, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{OutputTensor, ShardedWriter, TensorView};
use crate::plan::{open_inputs, plan, Inputs, Plan, TensorPlan, TensorRule};
use crate::reduce;
use crate::report::{MergeReport, TensorOutcome};
use crate::safe_m::{
    fallback_blend, fuse_block, output_shift, score_matrix, score_vector, ContributorBlock,
    Election, ElectionParams, MaskCounts,
};
use crate::select::{elect_count, RadixSelect, RADIX_BUCKETS};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements per work item; rows are never split.
const CHUNK_ELEMENTS: usize = 1 << 16;

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

    /// Runs the merge into `options.out_dir`.
    pub fn run(&self, options: &MergeOptions<'_>) -> Result<MergeSummary> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads.unwrap_or(0))
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("cannot start worker threads: {e}"),
                )
            })?;
        pool.install(|| self.run_in_pool(options))
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
        let mut writer = ShardedWriter::create(
            &options.out_dir,
            outputs,
            options.max_shard_bytes,
            metadata,
            options.force,
        )?;
        let mut report = MergeReport::new(&self.config, &self.inputs, &self.plan, writer.shards());
        let bytes_total = self.plan.out_bytes();
        let mut bytes_done = 0;
        for (index, tensor) in self.plan.tensors.iter().enumerate() {
            if options.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    "merge cancelled; nothing was written",
                )
                .with_file(&options.out_dir));
            }
            let (bytes, outcome) = self.merge_tensor(tensor).map_err(|e| {
                if e.tensor().is_some() {
                    e
                } else {
                    e.with_tensor(&tensor.name)
                }
            })?;
            writer.write_tensor(&tensor.name, &bytes)?;
            report.record(index, outcome);
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
        }
        let out_dtype = self.config.out_dtype;
        report.copied_files = copy_side_files(
            &mut writer,
            self.inputs.receiver.checkpoint.dir(),
            out_dtype,
        )?;
        writer.write_file("merge_report.json", &report.to_json_bytes())?;
        let out_dir = writer.finish()?;
        Ok(MergeSummary { out_dir, report })
    }

    fn view<'a>(&'a self, model: Model, name: &str) -> Result<TensorView<'a>> {
        let checkpoint = match model {
            Model::Base => {
                &self
                    .inputs
                    .base
                    .as_ref()
                    .expect("planned with a base")
                    .checkpoint
            }
            Model::Receiver => &self.inputs.receiver.checkpoint,
            Model::Contributor(k) => &self.inputs.contributors[k].checkpoint,
        };
        checkpoint.view(name).ok_or_else(|| {
            Error::new(ErrorKind::Plan, "tensor vanished after planning")
                .with_file(checkpoint.root())
                .with_tensor(name)
        })
    }

    fn merge_tensor(&self, tensor: &TensorPlan) -> Result<(Vec<u8>, TensorOutcome)> {
        let receiver = self.view(Model::Receiver, &tensor.name)?;
        let contributors = tensor
            .contributors
            .iter()
            .map(|&k| self.view(Model::Contributor(k), &tensor.name))
            .collect::<Result<Vec<_>>>()?;
        match (&tensor.rule, &self.config.settings) {
            (TensorRule::Copy { .. }, _) => Ok((
                convert(&receiver, tensor.out_dtype),
                TensorOutcome::default(),
            )),
            (TensorRule::Fallback { .. }, MethodSettings::SafeM(s)) => Ok((
                blend(
                    &receiver,
                    &contributors,
                    s.fallback_weight,
                    tensor.out_dtype,
                ),
                TensorOutcome::default(),
            )),
            (
                TensorRule::SafeMWeight { layer } | TensorRule::SafeMBias { layer },
                MethodSettings::SafeM(s),
            ) => {
                let ancestor = self.view(Model::Base, &tensor.name)?;
                let layers = SafeMLayer::gather(&self.inputs, layer, tensor)?;
                Ok(safe_m_tensor(
                    tensor,
                    s,
                    &receiver,
                    &ancestor,
                    &contributors,
                    &layers,
                ))
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Model {
    Base,
    Receiver,
    Contributor(usize),
}

/// Opens, plans and runs a merge in one call.
pub fn merge(config: MergeConfig, options: &MergeOptions<'_>) -> Result<MergeSummary> {
    PreparedMerge::new(config)?.run(options)
}

/// Rows per work item for rows of `cols` elements.
fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK_ELEMENTS / cols.max(1)).max(1)
}

/// The receiver's tensor in the output dtype: a byte copy when the dtype is
/// kept, else decoded and re-encoded.
fn convert(view: &TensorView<'_>, out_dtype: Dtype) -> Vec<u8> {
    if view.dtype == out_dtype {
        return view.data.to_vec();
    }
    blend(view, &[], 0.0, out_dtype)
}

/// SPEC §1.4 on a whole tensor, in parallel element chunks.
fn blend(
    receiver: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    weight: f32,
    out_dtype: Dtype,
) -> Vec<u8> {
    let n = receiver.numel();
    let mut out = vec![0u8; n * out_dtype.size()];
    out.par_chunks_mut(CHUNK_ELEMENTS * out_dtype.size())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(a, bs, merged): &mut (Vec<f32>, Vec<Vec<f32>>, Vec<f32>), (chunk, bytes)| {
                let start = chunk * CHUNK_ELEMENTS;
                let len = bytes.len() / out_dtype.size();
                read(receiver, start, len, a);
                bs.resize_with(contributors.len(), Vec::new);
                for (b, view) in bs.iter_mut().zip(contributors) {
                    read(view, start, len, b);
                }
                let refs: Vec<&[f32]> = bs.iter().map(Vec::as_slice).collect();
                merged.resize(len, 0.0);
                fallback_blend(a, &refs, weight, merged);
                encode_f32(out_dtype, merged, bytes);
            },
        );
    out
}

fn read(view: &TensorView<'_>, start: usize, len: usize, buf: &mut Vec<f32>) {
    buf.resize(len, 0.0);
    decode_f32(
        view.dtype,
        &view.data[start * view.dtype.size()..(start + len) * view.dtype.size()],
        buf,
    );
}

/// The statistics one SAFE-M tensor needs, checked by the planner.
struct SafeMLayer<'a> {
    x_mean: &'a [f32],
    receiver_y: &'a [f32],
    ancestor_y: &'a [f32],
    contributor_y: Vec<&'a [f32]>,
}

impl<'a> SafeMLayer<'a> {
    fn gather(inputs: &'a Inputs, layer: &str, tensor: &TensorPlan) -> Result<SafeMLayer<'a>> {
        let missing = || {
            Error::new(
                ErrorKind::Stats,
                format!("statistics of layer `{layer}` vanished after planning"),
            )
        };
        let get = |input: &'a crate::plan::Input, x: bool| -> Result<&'a [f32]> {
            let stats = input.stats.as_ref().ok_or_else(missing)?;
            let layer = stats.0.layer(layer).ok_or_else(missing)?;
            let v = if x { &layer.x_mean } else { &layer.y_mean };
            v.as_deref().ok_or_else(missing)
        };
        let base = inputs.base.as_ref().ok_or_else(missing)?;
        Ok(SafeMLayer {
            x_mean: if tensor.shape.len() == 2 {
                get(&inputs.receiver, true)?
            } else {
                &[]
            },
            receiver_y: get(&inputs.receiver, false)?,
            ancestor_y: get(base, false)?,
            contributor_y: tensor
                .contributors
                .iter()
                .map(|&k| get(&inputs.contributors[k], false))
                .collect::<Result<_>>()?,
        })
    }
}

/// Scores of one model over a whole tensor, computed in parallel row chunks.
fn score_tensor(
    view: &TensorView<'_>,
    u: &[f32],
    v: Option<&[f32]>,
    params: ElectionParams,
) -> Vec<f32> {
    let n = view.numel();
    let mut scores = vec![0f32; n];
    match v {
        Some(v) => {
            let cols = v.len();
            let rows = rows_per_chunk(cols);
            scores
                .par_chunks_mut(rows * cols)
                .enumerate()
                .for_each_init(Vec::new, |w, (chunk, out)| {
                    let first_row = chunk * rows;
                    let block_rows = out.len() / cols;
                    read(view, first_row * cols, out.len(), w);
                    score_matrix(
                        w,
                        &u[first_row..first_row + block_rows],
                        v,
                        params.form,
                        out,
                    );
                });
        }
        None => {
            let mut w = Vec::new();
            read(view, 0, n, &mut w);
            score_vector(&w, u, params.form, &mut scores);
        }
    }
    scores
}

/// The election threshold over all scores (SPEC §1.2): a radix select whose
/// histograms are counted in parallel chunks and summed (exact integers).
fn parallel_threshold(scores: &[f32], density: f64) -> f32 {
    let m = elect_count(density, scores.len());
    if m == 0 {
        return 0.0;
    }
    let mut select = RadixSelect::new(m);
    while !select.is_done() {
        let hist = scores
            .par_chunks(CHUNK_ELEMENTS)
            .map(|chunk| {
                let mut hist = Box::new([0u64; RADIX_BUCKETS]);
                select.count(chunk, &mut hist);
                hist
            })
            .reduce(
                || Box::new([0u64; RADIX_BUCKETS]),
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b.iter()) {
                        *x += y;
                    }
                    a
                },
            );
        select.advance(&hist);
    }
    select.threshold()
}

/// SAFE-M on one tensor read from the checkpoints: a score pass per model,
/// the thresholds, then one fusion pass over row chunks.
fn safe_m_tensor(
    tensor: &TensorPlan,
    settings: &SafeMSettings,
    receiver: &TensorView<'_>,
    ancestor: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    layer: &SafeMLayer<'_>,
) -> (Vec<u8>, TensorOutcome) {
    let is_weight = tensor.shape.len() == 2;
    let v = is_weight.then_some(layer.x_mean);
    let receiver_scores = score_tensor(
        receiver,
        &output_shift(layer.receiver_y, layer.ancestor_y),
        v,
        settings.receiver,
    );
    let receiver_threshold = parallel_threshold(&receiver_scores, settings.receiver.density);
    let elections: Vec<(Vec<f32>, f32)> = tensor
        .contributors
        .iter()
        .zip(contributors)
        .zip(&layer.contributor_y)
        .map(|((&k, view), y)| {
            let params = settings.contributors[k].election;
            let scores = score_tensor(view, &output_shift(y, layer.ancestor_y), v, params);
            let threshold = parallel_threshold(&scores, params.density);
            (scores, threshold)
        })
        .collect();
    let cols = if is_weight {
        tensor.shape[1]
    } else {
        tensor.numel()
    };
    let direction = v.map(|d| (d, reduce::sum_squares(d)));
    let chunk = rows_per_chunk(cols) * cols;
    let out_dtype = tensor.out_dtype;
    let n = tensor.numel();
    let mut out = vec![0u8; n * out_dtype.size()];
    let chunk_counts: Vec<Vec<MaskCounts>> = out
        .par_chunks_mut(chunk.max(1) * out_dtype.size())
        .enumerate()
        .map_init(Scratch::default, |scratch, (index, bytes)| {
            let start = index * chunk;
            let len = bytes.len() / out_dtype.size();
            let range = start..start + len;
            read(receiver, start, len, &mut scratch.receiver);
            read(ancestor, start, len, &mut scratch.ancestor);
            scratch
                .contributors
                .resize_with(contributors.len(), Vec::new);
            for (buf, view) in scratch.contributors.iter_mut().zip(contributors) {
                read(view, start, len, buf);
            }
            let blocks: Vec<ContributorBlock<'_>> = tensor
                .contributors
                .iter()
                .zip(&scratch.contributors)
                .zip(&elections)
                .map(|((&k, weight), (scores, threshold))| ContributorBlock {
                    weight,
                    election: Election {
                        scores: &scores[range.clone()],
                        threshold: *threshold,
                    },
                    lambda_proj: settings.contributors[k].lambda_proj,
                    lambda_ortho: settings.contributors[k].lambda_ortho,
                })
                .collect();
            let mut counts = vec![MaskCounts::default(); blocks.len()];
            scratch.merged.resize(len, 0.0);
            fuse_block(
                &scratch.receiver,
                &scratch.ancestor,
                Election {
                    scores: &receiver_scores[range.clone()],
                    threshold: receiver_threshold,
                },
                &blocks,
                direction,
                settings.epsilon,
                &mut scratch.merged,
                &mut scratch.tau,
                &mut counts,
            );
            encode_f32(out_dtype, &scratch.merged, bytes);
            counts
        })
        .collect();
    let mut counts = vec![MaskCounts::default(); contributors.len()];
    for chunk in &chunk_counts {
        for (total, c) in counts.iter_mut().zip(chunk) {
            total.add(c);
        }
    }
    let outcome = TensorOutcome {
        receiver_threshold: Some(receiver_threshold),
        thresholds: elections.iter().map(|(_, t)| *t).collect(),
        counts,
    };
    (out, outcome)
}

#[derive(Default)]
struct Scratch {
    receiver: Vec<f32>,
    ancestor: Vec<f32>,
    contributors: Vec<Vec<f32>>,
    merged: Vec<f32>,
    tau: Vec<f32>,
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
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
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
