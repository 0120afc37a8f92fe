//! The merge report (SPEC §6), written as `merge_report.json` beside the
//! merged weights: tool, method and parameters, input fingerprints, and per
//! tensor the rule applied with its mask counts — enough to reproduce the
//! merge and to see what each contributor actually gave.

use crate::config::MergeConfig;
use crate::io::{FileFingerprint, ShardPlan};
use crate::methods::Roles;
use crate::plan::{DroppedTensor, Inputs, Plan, TensorPlan};
use crate::safe_m::MaskCounts;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a baseline's sparsification left of one contributor's task vector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sparsity {
    /// Index among the contributors.
    pub contributor: usize,
    /// Non-zero entries kept (0: the tensor keeps nothing of this contributor).
    pub kept: u64,
    /// The L1 rescale factor applied (DARE, DELLA); `ramplus_tl`: the
    /// factor `λ_k` of the model's unique entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale: Option<f32>,
}

/// What the kernels of one tensor measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorOutcome {
    /// Each contributor's sparsification (baselines).
    pub sparsity: Vec<Sparsity>,
    /// The receiver's election threshold (SAFE-M tensors).
    pub receiver_threshold: Option<f32>,
    /// Each participating contributor's threshold, in plan order.
    pub thresholds: Vec<f32>,
    /// Each participating contributor's mask counts, in plan order.
    pub counts: Vec<MaskCounts>,
    /// SAFE-M with `layer_lambda: activation`: the layer's λ scale.
    pub layer_lambda: Option<f32>,
    /// Least-squares merging: the ridge factor `δ` the solve needed (SPEC §7).
    pub ridge: Option<f64>,
    /// Data-free subspace merging (SPEC §8): what a 2-D tensor's decomposition kept.
    pub subspace: Option<Subspace>,
}

/// What the decomposition of one 2-D tensor kept in a data-free subspace
/// merge (SPEC §8; `tsv`, `iso_c`, `iso_cts`, `wudi`). Contributor lists are
/// in plan order. Directions whose singular value is at most the rank
/// tolerance (`σ₁·max(out, in)·ε_f64`) are never kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Subspace {
    /// `r = min(out, in)`.
    pub r: usize,
    /// The slots of each task: TSV-M `⌊r/T⌋`, Iso-CTS `(r − k)/T`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_task: Option<usize>,
    /// The slots of the common space `Σ τ_k`: Iso-C `r`, Iso-CTS `k`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common: Option<usize>,
    /// The common directions kept (those above the tolerance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common_kept: Option<usize>,
    /// Each contributor's numerical rank: of `τ_k` (TSV-M), of its residual
    /// outside the common space (Iso-CTS).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<usize>,
    /// The directions each contributor gave.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<usize>,
    /// The ranks of the orthogonalised `U` and `V`: below the number of
    /// directions kept when tasks share directions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor_ranks: Option<[usize; 2]>,
    /// Iso-C and Iso-CTS: the flat singular value `σ̄`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
    /// Contributors whose task matrix is all zero (they give nothing; WUDI
    /// leaves them out of its objective).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zero: Vec<usize>,
}

/// One input model in the report.
#[derive(Debug, Clone, Serialize)]
pub struct InputReport {
    /// `base`, `receiver` or `contributor`.
    pub role: &'static str,
    /// The checkpoint path.
    pub path: PathBuf,
    /// Its statistics file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<PathBuf>,
    /// Size and header hash of each shard.
    pub files: Vec<FileFingerprint>,
    /// The LoRA adapter applied to it (`model+adapter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<PathBuf>,
    /// In a `slices:` merge: the slice it is a source of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<usize>,
    /// In a `slices:` merge: the layers it gives, `[start, end)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_range: Option<[usize; 2]>,
    /// In a `modules:` merge: the module it gives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// One output tensor in the report.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// The plan of the tensor (name, shape, dtypes, rule, contributors).
    #[serde(flatten)]
    pub plan: TensorPlan,
    /// The receiver's election (SAFE-M tensors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<ReceiverMask>,
    /// Each participating contributor's mask (SAFE-M tensors).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<ContributorMask>,
    /// Each contributor's sparsification (baselines that trim or drop).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sparsity: Vec<Sparsity>,
    /// SAFE-M with `layer_lambda: activation`: the λ scale of the tensor's layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_lambda: Option<f32>,
    /// Least-squares merging: the ridge `δ` added as `δ·mean(diag)` to make
    /// the summed Gram positive definite (absent: none was needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ridge: Option<f64>,
    /// Data-free subspace merging: what the tensor's decomposition kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subspace: Option<Subspace>,
}

/// The receiver's election over one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReceiverMask {
    /// The threshold `t_A`.
    pub threshold: f32,
    /// `|M_A|`.
    pub elected: u64,
}

/// One contributor's mask over one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ContributorMask {
    /// Index among the contributors.
    pub contributor: usize,
    /// The threshold `t_B`.
    pub threshold: f32,
    /// `|M_B|`.
    pub elected: u64,
    /// `|K|`: elected by both with opposite signs, removed.
    pub conflicts: u64,
    /// `|M'_B|`: what the contributor gives.
    pub kept: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// `{"name": "flatmerge", "version": …}`.
    pub tool: Value,
    /// The method's config name.
    pub method: &'static str,
    /// The resolved parameters of the method.
    pub parameters: Value,
    /// The config file, when the merge came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// Output dtype chosen (`null`: the receiver's, per tensor).
    pub out_dtype: Option<&'static str>,
    /// Input models with fingerprints.
    pub inputs: Vec<InputReport>,
    /// Output shards: file, tensor count, bytes.
    pub shards: Vec<Value>,
    /// Tensor count per rule.
    pub summary: Value,
    /// Per tensor.
    pub tensors: Vec<TensorReport>,
    /// Contributor tensors that had no place in the receiver.
    pub dropped: Vec<DroppedTensor>,
    /// Non-weight files copied from the receiver.
    pub copied_files: Vec<String>,
    /// Whole-model results of the method, by section name (FAM: `fam`,
    /// each group's alignment summary and mapping, and the λ used with the
    /// searched grid).
    #[serde(flatten)]
    pub results: BTreeMap<String, Value>,
}

/// An f32 parameter as the number a user wrote (`1e-8`, not the f64 widening `9.99999993922529e-9`).
pub(crate) fn num(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

impl MergeReport {
    /// The report of a planned merge, before any tensor is merged.
    pub fn new(
        config: &MergeConfig,
        inputs: &Inputs,
        plan: &Plan,
        shards: &[ShardPlan],
    ) -> MergeReport {
        let input_reports = MergeReport::input_reports(config, inputs, None);
        let summary: serde_json::Map<String, Value> = plan
            .rule_counts()
            .into_iter()
            .map(|(label, n)| (label.to_string(), n.into()))
            .collect();
        MergeReport {
            tool: json!({"name": "flatmerge", "version": crate::VERSION}),
            method: config.method.as_str(),
            parameters: config.method.report_parameters(config),
            config_file: config.source.clone(),
            out_dtype: config.out_dtype.map(|d| d.as_str()),
            inputs: input_reports,
            shards: shards
                .iter()
                .map(|s| json!({"file": s.file_name, "tensors": s.tensors.len(), "bytes": s.bytes}))
                .collect(),
            summary: Value::Object(summary),
            tensors: plan
                .tensors
                .iter()
                .map(|t| TensorReport {
                    plan: t.clone(),
                    receiver: None,
                    masks: Vec::new(),
                    sparsity: Vec::new(),
                    layer_lambda: None,
                    ridge: None,
                    subspace: None,
                })
                .collect(),
            dropped: plan.dropped.clone(),
            copied_files: Vec::new(),
            results: BTreeMap::new(),
        }
    }

    /// The inputs of one part of a merge (`slice`: its index in a `slices:`
    /// merge), each with its role.
    pub fn input_reports(
        config: &MergeConfig,
        inputs: &Inputs,
        slice: Option<usize>,
    ) -> Vec<InputReport> {
        let input =
            |role, i: &crate::plan::Input, model: Option<&crate::config::ModelRef>| InputReport {
                role,
                path: i.checkpoint.root().to_path_buf(),
                stats: i.stats.as_ref().map(|(_, p)| p.clone()),
                files: i.checkpoint.fingerprints().to_vec(),
                lora: i.checkpoint.adapter().map(|a| a.dir().to_path_buf()),
                slice,
                layer_range: model
                    .and_then(|m| m.window.as_ref())
                    .map(|w| [w.first, w.first + w.count]),
                module: model
                    .and_then(|m| m.window.as_ref())
                    .and_then(|w| w.module)
                    .map(|m| m.as_str().to_string()),
            };
        let mut reports: Vec<InputReport> = inputs
            .base
            .iter()
            .map(|b| input("base", b, config.base.as_ref()))
            .collect();
        for (i, model) in inputs.models.iter().enumerate() {
            let role = if config.method.roles() == Roles::ReceiverFirst && i == 0 {
                "receiver"
            } else if inputs.contributors.contains(&i) {
                "contributor"
            } else {
                "base"
            };
            reports.push(input(role, model, config.models.get(i)));
        }
        reports
    }

    /// Records what the kernels measured on tensor `index` of the plan.
    pub fn record(&mut self, index: usize, outcome: TensorOutcome) {
        let tensor = &mut self.tensors[index];
        tensor.sparsity = outcome.sparsity;
        tensor.layer_lambda = outcome.layer_lambda;
        tensor.ridge = outcome.ridge;
        tensor.subspace = outcome.subspace;
        if let (Some(threshold), Some(first)) = (outcome.receiver_threshold, outcome.counts.first())
        {
            tensor.receiver = Some(ReceiverMask {
                threshold,
                elected: first.receiver_elected,
            });
        }
        tensor.masks = tensor
            .plan
            .contributors
            .iter()
            .zip(outcome.thresholds.iter().zip(&outcome.counts))
            .map(|(&contributor, (&threshold, c))| ContributorMask {
                contributor,
                threshold,
                elected: c.elected,
                conflicts: c.conflicts,
                kept: c.kept,
            })
            .collect();
    }

    /// Totals over all SAFE-M tensors: their element count, and per
    /// contributor the summed mask counts.
    pub fn mask_totals(&self) -> (u64, Vec<MaskCounts>) {
        let contributors = self
            .inputs
            .iter()
            .filter(|i| i.role == "contributor")
            .count();
        let mut totals = vec![MaskCounts::default(); contributors];
        let mut elements = 0u64;
        for t in self.tensors.iter().filter(|t| t.receiver.is_some()) {
            elements += t.plan.numel() as u64;
            let receiver_elected = t.receiver.map_or(0, |r| r.elected);
            for m in &t.masks {
                if let Some(total) = totals.get_mut(m.contributor) {
                    total.add(&MaskCounts {
                        receiver_elected,
                        elected: m.elected,
                        conflicts: m.conflicts,
                        kept: m.kept,
                    });
                }
            }
        }
        (elements, totals)
    }

    /// A Hugging Face model card (`README.md`) for the merged model, in the
    /// layout mergekit's `--write-model-card` writes: front matter with the
    /// input models and tags, the method, the inputs by role, and the
    /// config as it was written (`config_text`).
    pub fn model_card(&self, config_text: Option<&str>) -> String {
        let path = |i: &InputReport| i.path.display().to_string();
        let mut seen = std::collections::BTreeSet::new();
        let models: Vec<String> = self
            .inputs
            .iter()
            .map(path)
            .filter(|p| seen.insert(p.clone()))
            .collect();
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut card = String::from("---\nbase_model:\n");
        for m in &models {
            card.push_str(&format!("- {}\n", quote(m)));
        }
        card.push_str("library_name: transformers\ntags:\n- merge\n- flatmerge\n---\n");
        card.push_str("# Merged model\n\n");
        card.push_str(&format!(
            "A merge of pre-trained language models made with flatmerge {} from a mergekit-style config.\n\n",
            crate::VERSION
        ));
        card.push_str("## Merge details\n\n### Merge method\n\n");
        let bases: Vec<String> = self
            .inputs
            .iter()
            .filter(|i| i.role == "base")
            .map(path)
            .collect();
        card.push_str(&format!(
            "This model was merged with the `{}` method",
            self.method
        ));
        if let Some(base) = bases.first() {
            card.push_str(&format!(", with `{base}` as the base"));
        }
        card.push_str(".\n\n### Models merged\n\n");
        for i in &self.inputs {
            let module = i
                .module
                .as_deref()
                .map_or(String::new(), |m| format!("{m} "));
            let range = match (i.slice, i.layer_range) {
                (Some(s), Some([a, b])) if b > a => {
                    format!(" ({module}slice {s}: layers {a}–{})", b - 1)
                }
                _ if !module.is_empty() => format!(" ({})", module.trim_end()),
                _ => String::new(),
            };
            card.push_str(&format!("* `{}` ({}){range}\n", path(i), i.role));
        }
        if let Some(text) = config_text {
            card.push_str(
                "\n### Configuration\n\nThe config that produced this model:\n\n```yaml\n",
            );
            card.push_str(text.trim_end());
            card.push_str("\n```\n");
        }
        card
    }

    /// The report as pretty JSON with a final newline.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
        bytes.push(b'\n');
        bytes
    }
}
