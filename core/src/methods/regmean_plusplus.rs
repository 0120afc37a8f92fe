//! `regmean_plusplus` (SPEC §7; RegMean++, arXiv 2508.03121): RegMean whose
//! Grams for the layers of block `b` (a decoder layer of a LLaMA, a layer of
//! an MLP) are recorded by running each model's own examples through the
//! model *already merged* in blocks `< b`, with the model's own block `b`
//! and later. RegMean takes every Gram from the unmerged models, so it never
//! sees how the merged early layers move the inputs of the later ones.
//!
//! How: the merge is computed block by block before the first tensor is
//! written ([`Method::prepare`]). The tensors outside any block (embeddings,
//! final norm) are merged first; then for each block in forward order every
//! model is opened through the native probe with the merged tensors so far
//! in place of its own ([`Checkpoint::with_overrides`]) and re-run on the
//! probe set's examples of its own sources (those its statistics file was
//! recorded on), recording Grams of that block's least-squares layers only;
//! the block is solved exactly as `regmean` solves it and written, in the
//! output dtype, to a stage file in a temporary directory. Least-squares
//! layers in no block (`lm_head`) come last, after every block is merged.
//! The engine then writes the stage files' bytes as the output.
//!
//! Each model's statistics file (`stats:`) decides, as for `regmean`, which
//! layers are solved and over which sources the model is re-run; its Gram
//! values are not used. The probe set must be the one it was recorded on.
//!
//! Cost and memory: `models × solved blocks` probe passes over the models'
//! own examples. Resident at a time: one model as the native probe holds it
//! and the Grams of one block, or one layer's solve (see `regmean`); on disk,
//! one output-sized copy of the merged tensors in the temporary directory,
//! removed when the merge ends, whatever its outcome.
//!
//! Determinism: the probes' statistics are identical for any thread count
//! and the solve is `regmean`'s, so the output is too.

use super::regmean::{merge_tensor_with, Pending, RegMean};
use super::{BaseModel, Method, Prepared, Roles, SettingsInput, Statistics, TensorInput};
use crate::config::params::ParamDef;
use crate::config::{config_error, MergeConfig, MethodSettings, NanPolicy};
use crate::engine::chunks::tensor_buffer;
use crate::engine::{MergePart, Model};
use crate::error::{Error, ErrorKind, Result};
use crate::io::Checkpoint;
use crate::io::{OutputTensor, SafetensorsWriter};
use crate::layers::{layer_index, layer_of};
use crate::plan::{Inputs, Plan, TensorPlan, TensorRule};
use crate::probe::{self, ProbeModel, ProbeOptions};
use crate::report::TensorOutcome;
use crate::stats::ActivationStats;
use serde_json::json;
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The method.
pub struct RegMeanPlusPlus;

/// When a tensor is merged: before every block, with block `b`, or after
/// every block (least-squares layers outside the blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Before,
    Block(usize),
    After,
}

/// The merge computed by [`Method::prepare`]: where each tensor's bytes are.
struct Merged {
    /// The stage files, opened.
    stages: Vec<Checkpoint>,
    /// Tensor name → its stage file and what its merge measured.
    tensors: BTreeMap<String, (usize, TensorOutcome)>,
    /// Dropped last: removes the stage files.
    _work: WorkDir,
}

/// A temporary directory removed on drop, whatever the merge's outcome.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir> {
        let tmp = std::env::temp_dir();
        for attempt in 0u32.. {
            let dir = tmp.join(format!(
                "flatmerge-regmean-plusplus-{}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(WorkDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&dir, e)),
            }
        }
        unreachable!("u32 attempts exhausted")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Method for RegMeanPlusPlus {
    fn name(&self) -> &'static str {
        "regmean_plusplus"
    }

    fn summary(&self) -> &'static str {
        "RegMean++: RegMean with each block's Grams re-recorded through the blocks merged before it (SPEC §7)"
    }

    fn roles(&self) -> Roles {
        Roles::AllModels
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Forbidden
    }

    fn statistics(&self) -> Statistics {
        Statistics::Grams
    }

    fn uses_probe_set(&self) -> bool {
        true
    }

    fn params(&self) -> Vec<ParamDef> {
        RegMean.params()
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        if input.raw.probe_set.is_none() {
            return Err(config_error(
                None,
                "probe_set",
                "regmean_plusplus re-runs every model through the merge so far: give `probe_set:`, \
                 the probe set the models' statistics were recorded on",
            ));
        }
        super::mergekit::settings(self, super::mergekit::Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let plan = RegMean.plan(config, inputs)?;
        let probe_set = probe_set_of(config)?;
        if !probe_set.is_file() {
            return Err(
                Error::new(ErrorKind::NotFound, "no such probe set (`probe_set:`)")
                    .with_file(probe_set),
            );
        }
        for model in &inputs.models {
            // Every model must be one the native probes can run.
            probe::architecture_of(model.checkpoint.dir())?;
        }
        Ok(plan)
    }

    fn prepare(&self, merge: &MergePart) -> Result<Prepared> {
        let probe_set = probe_set_of(merge.config())?;
        let models = &merge.inputs().models;
        let layout = probe::open_model(models[0].checkpoint.dir())?;
        let stage_of: Vec<Stage> = merge
            .plan()
            .tensors
            .iter()
            .map(|t| stage_of(layout.as_ref(), t))
            .collect();
        drop(layout);
        let stages: BTreeSet<Stage> = stage_of.iter().copied().collect();
        let work = WorkDir::create()?;
        let pending = Pending::default();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut report_stages = Vec::new();
        for stage in stages {
            let planned: Vec<&TensorPlan> = merge
                .plan()
                .tensors
                .iter()
                .zip(&stage_of)
                .filter(|(t, s)| **s == stage && !matches!(t.rule, TensorRule::Copy { .. }))
                .map(|(t, _)| t)
                .collect();
            let layers: BTreeSet<String> = planned
                .iter()
                .filter_map(|t| match &t.rule {
                    TensorRule::LeastSquares { layer, bias: false } => Some(layer.clone()),
                    _ => None,
                })
                .collect();
            let mut examples = Vec::new();
            let stats = if layers.is_empty() {
                Vec::new()
            } else {
                let mut stats = Vec::with_capacity(models.len());
                for (i, model) in models.iter().enumerate() {
                    let own = model.stats.as_ref().and_then(|(s, _)| s.sources.clone());
                    let out = work
                        .0
                        .join(format!("stage-{}-model-{i}.stats.safetensors", files.len()));
                    let dir = model.checkpoint.dir();
                    let partial = Checkpoint::open(dir)?.with_overrides(&files)?;
                    let probed = probe::open_model_with(dir, partial)?;
                    let summary = probe::probe_model(
                        probed.as_ref(),
                        dir,
                        &probe_set,
                        &out,
                        &ProbeOptions {
                            max_examples: Some(0),
                            threads: Some(rayon::current_num_threads()),
                            gram: true,
                            gram_layers: Some(layers.clone()),
                            sources: own,
                            ..ProbeOptions::default()
                        },
                    )
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!(
                                "regmean_plusplus: re-running models[{i}] through the merge before {}: {}",
                                describe(stage),
                                e.message()
                            ),
                        )
                        .with_file(e.file().unwrap_or(dir))
                    })?;
                    examples.push(summary.examples);
                    stats.push((ActivationStats::load(&out)?, out));
                }
                stats
            };
            let stats_of = |i: usize| -> Result<(&ActivationStats, &Path)> {
                stats.get(i).map(|(s, p)| (s, p.as_path())).ok_or_else(|| {
                    Error::new(ErrorKind::Stats, "no statistics re-recorded for this stage")
                })
            };
            let path = work.0.join(format!("stage-{}.safetensors", files.len()));
            let outputs: Vec<OutputTensor> = planned
                .iter()
                .map(|t| OutputTensor::new(t.name.clone(), t.out_dtype, t.shape.clone()))
                .collect();
            let mut writer = SafetensorsWriter::create(&path, &outputs, &BTreeMap::new())?;
            for tensor in &planned {
                let (bytes, outcome) =
                    merge_one(merge, &pending, tensor, &stats_of).map_err(|e| {
                        if e.tensor().is_some() {
                            e
                        } else {
                            e.with_tensor(&tensor.name)
                        }
                    })?;
                writer.write_tensor(&tensor.name, &bytes)?;
                tensors.insert(tensor.name.clone(), (files.len(), outcome));
            }
            writer.finish()?;
            report_stages.push(json!({
                "stage": describe(stage),
                "tensors": planned.len(),
                "solved_layers": layers.len(),
                "examples": examples,
            }));
            // The Grams of a solved block are no longer needed.
            for (_, file) in stats {
                let _ = std::fs::remove_file(file);
            }
            files.push(path);
        }
        let stages = files
            .iter()
            .map(|f| Checkpoint::open_file(f))
            .collect::<Result<Vec<_>>>()?;
        let probe_passes: usize = report_stages
            .iter()
            .filter(|s| s["solved_layers"].as_u64() > Some(0))
            .count()
            * models.len();
        Ok(Prepared {
            state: Box::new(Merged {
                stages,
                tensors,
                _work: work,
            }),
            report: Some((
                "regmean_plusplus",
                json!({
                    "probe_set": probe_set.display().to_string(),
                    "probe_passes": probe_passes,
                    "sources": models
                        .iter()
                        .map(|m| m.stats.as_ref().and_then(|(s, _)| s.sources.clone()))
                        .collect::<Vec<_>>(),
                    "stages": report_stages,
                }),
            )),
        })
    }

    fn merge_tensor(
        &self,
        _merge: &MergePart,
        state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let merged = state
            .downcast_ref::<Merged>()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "regmean_plusplus needs its state"))?;
        let name = &input.plan.name;
        let (stage, outcome) = merged
            .tensors
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::Plan, "the tensor was not merged in advance"))?;
        let checkpoint = &merged.stages[*stage];
        let view = checkpoint.view(name).ok_or_else(|| {
            Error::new(ErrorKind::Plan, "the tensor vanished from its stage file")
                .with_file(checkpoint.root())
        })?;
        let mut bytes = tensor_buffer::<u8>(view.data.len());
        bytes.copy_from_slice(view.data);
        checkpoint.release(name);
        Ok((bytes, outcome.clone()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        RegMean.report_parameters(config)
    }
}

/// The resolved `probe_set:` (required by [`RegMeanPlusPlus::settings`]).
fn probe_set_of(config: &MergeConfig) -> Result<PathBuf> {
    config
        .probe_set
        .clone()
        .ok_or_else(|| config_error(None, "probe_set", "regmean_plusplus needs `probe_set:`"))
}

/// One tensor as `regmean` merges it, with the stage's statistics, after
/// the NaN check the engine would have made.
fn merge_one(
    merge: &MergePart,
    pending: &Pending,
    tensor: &TensorPlan,
    stats_of: &super::regmean::StatsOf<'_>,
) -> Result<(Vec<u8>, TensorOutcome)> {
    let source = tensor.source.as_deref().unwrap_or(&tensor.name);
    let contributors = tensor
        .contributors
        .iter()
        .map(|&k| merge.view(Model::Contributor(k), source))
        .collect::<Result<Vec<_>>>()?;
    if merge.config().nan_policy == NanPolicy::Error {
        merge.check_finite(tensor, &contributors)?;
    }
    let input = TensorInput {
        plan: tensor,
        contributors,
    };
    let merged = merge_tensor_with(merge, pending, &input, stats_of);
    for &k in &tensor.contributors {
        merge.release_contributor(tensor, k);
    }
    merged
}

/// The stage of a planned tensor: a least-squares layer's block as the
/// probe numbers it ([`ProbeModel::block_of`]), after every block when it
/// has none; any other tensor's block by its layer or decoder-layer index,
/// before every block when it has none.
fn stage_of(model: &dyn ProbeModel, tensor: &TensorPlan) -> Stage {
    if let TensorRule::LeastSquares { layer, .. } = &tensor.rule {
        return model.block_of(layer).map_or(Stage::After, Stage::Block);
    }
    let stem = layer_of(&tensor.name).map_or(tensor.name.as_str(), |(l, _)| l);
    model
        .block_of(stem)
        .or_else(|| layer_index(&tensor.name))
        .map_or(Stage::Before, Stage::Block)
}

fn describe(stage: Stage) -> String {
    match stage {
        Stage::Before => "the tensors outside the blocks".into(),
        Stage::Block(b) => format!("block {b}"),
        Stage::After => "the layers after the blocks".into(),
    }
}
