//! The merge plan: which rule each output tensor follows, checked before
//! any tensor data is read (STYLE: open → plan → kernels → writer → report).
//!
//! Planning opens every checkpoint and statistics file (headers only, the
//! data stays memory-mapped and untouched) and collects *all* problems it
//! finds, so that a user fixes a config in one round rather than one error
//! at a time.

use crate::config::params::Params;
use crate::config::{FamSettings, GroupsSpec};
use crate::config::{MergeConfig, MergeMethod, MethodSettings};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::groups::NeuronGroup;
use crate::io::{Checkpoint, TensorInfo};
use crate::stats::{ActivationStats, LayerStats};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a tensor is blended by the fallback of SPEC §1.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// Its layer has no statistics (norms, embeddings, lm_head, …).
    NoStatistics,
    /// It has statistics but is not a 2-D weight or a 1-D bias (e.g. a convolution kernel).
    NotLinear,
    /// The common ancestor lacks it.
    MissingFromAncestor,
    /// The common ancestor has it with another shape.
    AncestorShapeDiffers,
}

/// Why a tensor keeps the receiver's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyReason {
    /// No contributor has it.
    OnlyInReceiver,
    /// Contributors have it, but with other shapes.
    ShapeMismatch,
}

/// The rule one output tensor follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum TensorRule {
    /// SAFE-M on a 2-D weight `[out, in]` of a layer with statistics (SPEC §1.2–1.3).
    SafeMWeight {
        /// The layer: the weight's name without `.weight`.
        layer: String,
    },
    /// SAFE-M on the bias of a layer with statistics (SPEC §1.3, last line).
    SafeMBias {
        /// The layer: the bias's name without `.bias`.
        layer: String,
    },
    /// `(1 − w)·W_A + w·B̄` (SPEC §1.4).
    Fallback {
        /// Why.
        reason: FallbackReason,
    },
    /// A baseline method over every input (SPEC §3).
    Baseline,
    /// FAM (SPEC §2.4): rows aligned by the groups, then fused or averaged.
    Fam {
        /// The group whose neurons are this tensor's rows.
        #[serde(skip_serializing_if = "Option::is_none")]
        row_group: Option<usize>,
        /// The group whose neurons are this tensor's columns.
        #[serde(skip_serializing_if = "Option::is_none")]
        col_group: Option<usize>,
        /// The layer whose mean input `x̄_A` is the projection direction (2-D weights with statistics).
        #[serde(skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
        /// A plain average (no statistics, norms, other shapes) instead of the projection fusion.
        average: bool,
    },
    /// The receiver's values, unchanged.
    Copy {
        /// Why.
        reason: CopyReason,
    },
}

impl TensorRule {
    /// A short name for tables: `safe_m`, `fallback`, `copied`.
    pub fn label(&self) -> &'static str {
        match self {
            TensorRule::SafeMWeight { .. } | TensorRule::SafeMBias { .. } => "safe_m",
            TensorRule::Baseline | TensorRule::Fam { average: false, .. } => "method",
            TensorRule::Fam { average: true, .. } => "average",
            TensorRule::Fallback { .. } => "fallback",
            TensorRule::Copy {
                reason: CopyReason::OnlyInReceiver,
            } => "copied",
            TensorRule::Copy {
                reason: CopyReason::ShapeMismatch,
            } => "shape_mismatch",
        }
    }
}

/// A contributor that does not take part in one tensor, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Excluded {
    /// Index among the contributors (0 = the second model of the config).
    pub contributor: usize,
    /// `missing` or `shape [..]`.
    pub why: String,
}

/// The plan of one output tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorPlan {
    /// Name (the receiver's).
    pub name: String,
    /// Shape (the receiver's).
    pub shape: Vec<usize>,
    /// The receiver's dtype.
    pub in_dtype: Dtype,
    /// The output dtype.
    pub out_dtype: Dtype,
    /// The rule.
    #[serde(flatten)]
    pub rule: TensorRule,
    /// Contributors that take part (indices among the contributors).
    pub contributors: Vec<usize>,
    /// Contributors that lack the tensor or have another shape.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
    /// FAM: the contributor tensor this one is merged with (its name in B).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl TensorPlan {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes written.
    pub fn out_bytes(&self) -> u64 {
        (self.numel() * self.out_dtype.size()) as u64
    }
}

/// A contributor tensor with no place in the receiver (SPEC §1.4: dropped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedTensor {
    /// Index among the contributors.
    pub contributor: usize,
    /// Its name.
    pub name: String,
}

/// The plan of a whole merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Output tensors in the receiver's order.
    pub tensors: Vec<TensorPlan>,
    /// Contributor tensors the receiver lacks.
    pub dropped: Vec<DroppedTensor>,
    /// Decoder layers of the output (gradients' `t = layer / (layers − 1)`).
    pub layers: usize,
    /// FAM: the neuron groups, in the receiver's names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupPlan>,
}

/// A neuron group with the contributor's name for its activation layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupPlan {
    /// The group, in the receiver's names.
    #[serde(flatten)]
    pub group: NeuronGroup,
    /// The contributor's name of the activation layer (its statistics key).
    pub contributor_activations: String,
}

impl Plan {
    /// Number of tensors per rule label, in a fixed order.
    pub fn rule_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = [
            "safe_m",
            "method",
            "average",
            "fallback",
            "copied",
            "shape_mismatch",
        ]
        .into_iter()
        .map(|label| {
            (
                label,
                self.tensors
                    .iter()
                    .filter(|t| t.rule.label() == label)
                    .count(),
            )
        })
        .collect();
        counts.push(("dropped", self.dropped.len()));
        counts
    }

    /// Total bytes written.
    pub fn out_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::out_bytes).sum()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tensors {
            let detail = match &t.rule {
                TensorRule::SafeMWeight { .. } => "safe_m (weight)".to_string(),
                TensorRule::SafeMBias { .. } => "safe_m (bias)".to_string(),
                TensorRule::Baseline => "method".to_string(),
                TensorRule::Fam { average: true, .. } => "fam (average)".to_string(),
                TensorRule::Fam {
                    row_group,
                    col_group,
                    ..
                } => format!(
                    "fam (rows {}, columns {})",
                    row_group.map_or("own".to_string(), |g| format!("of group {g}")),
                    col_group.map_or("own".to_string(), |g| format!("of group {g}"))
                ),
                TensorRule::Fallback { reason } => format!("fallback ({})", snake(reason)),
                TensorRule::Copy { reason } => format!("copied ({})", snake(reason)),
            };
            writeln!(
                f,
                "{:<60} {:<18} {:>5} → {:<5} {:>12} B  {}",
                t.name,
                format!("{:?}", t.shape),
                t.in_dtype.as_str(),
                t.out_dtype.as_str(),
                t.out_bytes(),
                detail
            )?;
        }
        for d in &self.dropped {
            writeln!(
                f,
                "{:<60} dropped (only in contributor {})",
                d.name, d.contributor
            )?;
        }
        let counts: Vec<String> = self
            .rule_counts()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(l, n)| format!("{l} {n}"))
            .collect();
        write!(
            f,
            "{} tensors, {} bytes out: {}",
            self.tensors.len(),
            self.out_bytes(),
            counts.join(", ")
        )
    }
}

fn snake(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A checkpoint with its (optional) statistics.
pub struct Input {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Its statistics and the file they came from.
    pub stats: Option<(ActivationStats, PathBuf)>,
}

impl Input {
    fn layer(&self, layer: &str) -> Option<&LayerStats> {
        self.stats.as_ref().and_then(|(s, _)| s.layer(layer))
    }

    fn stats_path(&self) -> &Path {
        self.stats
            .as_ref()
            .map(|(_, p)| p.as_path())
            .unwrap_or(Path::new("<no statistics>"))
    }
}

/// Every input of a merge, opened.
pub struct Inputs {
    /// The base model (SAFE-M: the common ancestor).
    pub base: Option<Input>,
    /// The models, in config order.
    pub models: Vec<Input>,
    /// Indices into `models` of the contributors ([`MergeConfig::contributors`]).
    pub contributors: Vec<usize>,
    /// Whether the output takes its names, dtypes and side files from the
    /// base (baselines with a base) rather than the first model (SAFE-M's
    /// receiver, or a merge without a base).
    pub names_from_base: bool,
}

impl Inputs {
    /// SAFE-M's receiver `A`: the first model.
    pub fn receiver(&self) -> &Input {
        &self.models[0]
    }

    /// Contributor `k` (0-based among the contributors).
    pub fn contributor(&self, k: usize) -> &Input {
        &self.models[self.contributors[k]]
    }

    /// The model whose tensor names, dtypes and side files the output takes.
    pub fn reference(&self) -> &Input {
        match (&self.base, self.names_from_base) {
            (Some(base), true) => base,
            _ => &self.models[0],
        }
    }
}

/// Collects problems so that planning reports them all at once.
#[derive(Default)]
struct Problems(Vec<Error>);

impl Problems {
    fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    fn into_result(self) -> Result<()> {
        const SHOWN: usize = 25;
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.into_iter().next().expect("one problem")),
            n => {
                let mut lines: Vec<String> = self
                    .0
                    .iter()
                    .take(SHOWN)
                    .map(|e| format!("  {e}"))
                    .collect();
                if n > SHOWN {
                    lines.push(format!("  … and {} more", n - SHOWN));
                }
                Err(Error::new(
                    ErrorKind::Plan,
                    format!("{n} problems with the inputs:\n{}", lines.join("\n")),
                ))
            }
        }
    }
}

/// Opens every checkpoint and statistics file the config names; reports
/// every file that cannot be opened, not only the first.
pub fn open_inputs(config: &MergeConfig) -> Result<Inputs> {
    let mut problems = Problems::default();
    let mut open = |model: &crate::config::ModelRef| -> Option<Input> {
        let checkpoint = Checkpoint::open(&model.path)
            .map_err(|e| problems.push(e))
            .ok();
        let stats = match &model.stats {
            Some(path) => match ActivationStats::load(path) {
                Ok(s) => Some((s, path.clone())),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        checkpoint.map(|checkpoint| Input { checkpoint, stats })
    };
    let base = config.base.as_ref().map(&mut open);
    let models: Vec<Option<Input>> = config.models.iter().map(&mut open).collect();
    problems.into_result()?;
    Ok(Inputs {
        base: base.map(|b| b.expect("opened")),
        models: models.into_iter().map(|m| m.expect("opened")).collect(),
        contributors: config.contributors(),
        names_from_base: !matches!(config.method, MergeMethod::SafeM | MergeMethod::Fam),
    })
}

fn float_check(problems: &mut Problems, checkpoint: &Checkpoint, info: &TensorInfo) -> bool {
    if info.dtype.is_float() {
        return true;
    }
    problems.push(
        Error::new(
            ErrorKind::UnsupportedDtype,
            format!(
                "dtype {} cannot be merged; flatmerge merges BF16, F16 and F32 tensors",
                info.dtype
            ),
        )
        .with_file(checkpoint.root())
        .with_tensor(&info.name),
    );
    false
}

/// The name of the layer a tensor belongs to and whether it is its weight
/// (`false`: its bias), or `None` for other names.
pub(crate) fn layer_of(name: &str) -> Option<(&str, bool)> {
    if let Some(layer) = name.strip_suffix(".weight") {
        Some((layer, true))
    } else {
        name.strip_suffix(".bias").map(|layer| (layer, false))
    }
}

/// Builds the plan of a SAFE-M merge (SPEC §1.4 decides the rules).
pub fn plan(config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
    match &config.settings {
        MethodSettings::SafeM(_) => plan_safe_m(config, inputs),
        MethodSettings::Baseline(params) => plan_baseline(config, params, inputs),
        MethodSettings::Fam(settings) => plan_fam(config, settings, inputs),
    }
}

fn plan_safe_m(config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let receiver = &inputs.receiver().checkpoint;
    let base = inputs.base.as_ref().map(|b| &b.checkpoint);
    let mut tensors = Vec::new();
    for info in receiver.tensors() {
        if !float_check(&mut problems, receiver, info) {
            continue;
        }
        let mut present = Vec::new();
        let mut excluded = Vec::new();
        for (k, contributor) in (0..inputs.contributors.len()).map(|k| (k, inputs.contributor(k))) {
            match contributor.checkpoint.info(&info.name) {
                None => excluded.push(Excluded {
                    contributor: k,
                    why: "missing".into(),
                }),
                Some(other) if other.shape != info.shape => excluded.push(Excluded {
                    contributor: k,
                    why: format!("shape {:?}", other.shape),
                }),
                Some(other) => {
                    if float_check(&mut problems, &contributor.checkpoint, other) {
                        present.push(k);
                    }
                }
            }
        }
        let ancestor = base.and_then(|b| b.info(&info.name));
        if let (Some(b), Some(a)) = (base, ancestor) {
            float_check(&mut problems, b, a);
        }
        let rule = if present.is_empty() {
            let reason = if excluded.iter().all(|e| e.why == "missing") {
                CopyReason::OnlyInReceiver
            } else {
                CopyReason::ShapeMismatch
            };
            TensorRule::Copy { reason }
        } else {
            safe_m_rule(&mut problems, inputs, info, ancestor, &present)
        };
        tensors.push(TensorPlan {
            name: info.name.clone(),
            shape: info.shape.clone(),
            in_dtype: info.dtype,
            out_dtype: config.out_dtype.unwrap_or(info.dtype),
            rule,
            contributors: present,
            excluded,
            source: None,
        });
    }
    let dropped = dropped_tensors(inputs, receiver);
    problems.into_result()?;
    Ok(Plan {
        tensors,
        dropped,
        layers: layer_count(receiver),
        groups: Vec::new(),
    })
}

fn safe_m_rule(
    problems: &mut Problems,
    inputs: &Inputs,
    info: &TensorInfo,
    ancestor: Option<&TensorInfo>,
    present: &[usize],
) -> TensorRule {
    let fallback = |reason| TensorRule::Fallback { reason };
    let Some((layer, is_weight)) = layer_of(&info.name) else {
        return fallback(FallbackReason::NoStatistics);
    };
    let base = inputs.base.as_ref().expect("safe_m has a base model");
    let models = std::iter::once(inputs.receiver())
        .chain(present.iter().map(|&k| inputs.contributor(k)))
        .chain(std::iter::once(base));
    if !models.clone().any(|m| m.layer(layer).is_some()) {
        return fallback(FallbackReason::NoStatistics);
    }
    let linear = if is_weight {
        info.shape.len() == 2
    } else {
        info.shape.len() == 1
    };
    if !linear {
        return fallback(FallbackReason::NotLinear);
    }
    match ancestor {
        None => return fallback(FallbackReason::MissingFromAncestor),
        Some(a) if a.shape != info.shape => return fallback(FallbackReason::AncestorShapeDiffers),
        Some(_) => {}
    }
    let out = info.shape[0];
    let mut need = |input: &Input, who: &str, what: &str, width: usize| {
        let found = input.layer(layer).and_then(|l| match what {
            "x_mean" => l.x_mean.as_ref(),
            _ => l.y_mean.as_ref(),
        });
        let problem = match found {
            None => {
                format!("statistics of layer `{layer}` are incomplete: {who}'s `{what}` is missing")
            }
            Some(v) if v.len() != width => format!(
                "{who}'s `{layer}.{what}` has width {} but `{}` has shape {:?} (needs {width})",
                v.len(),
                info.name,
                info.shape
            ),
            Some(_) => return,
        };
        problems.push(
            Error::new(ErrorKind::Stats, problem)
                .with_file(input.stats_path())
                .with_tensor(format!("{layer}.{what}")),
        );
    };
    need(inputs.receiver(), "the receiver", "y_mean", out);
    if is_weight {
        need(inputs.receiver(), "the receiver", "x_mean", info.shape[1]);
    }
    need(base, "the ancestor", "y_mean", out);
    for &k in present {
        need(
            inputs.contributor(k),
            &format!("contributor {k}"),
            "y_mean",
            out,
        );
    }
    // Incomplete statistics were pushed as problems: the plan fails as a whole.
    let layer = layer.to_string();
    if is_weight {
        TensorRule::SafeMWeight { layer }
    } else {
        TensorRule::SafeMBias { layer }
    }
}

/// Plans a baseline merge: every tensor of the reference model (the base,
/// or the first model without one) must exist with the same shape in every
/// input (mergekit 0.1.5 refuses mismatches too); tensors only some other
/// input has are dropped and reported. Required per-tensor parameters are
/// resolved here so that a filter list that misses a tensor fails early.
fn plan_baseline(config: &MergeConfig, params: &Params, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let reference = &inputs.reference().checkpoint;
    let mut others: Vec<(String, &Checkpoint)> = Vec::new();
    let reference_is_model = !inputs.names_from_base || inputs.base.is_none();
    for (k, &m) in inputs.contributors.iter().enumerate() {
        if reference_is_model && m == 0 {
            continue;
        }
        others.push((
            format!("contributor {k}"),
            &inputs.contributor(k).checkpoint,
        ));
    }
    let layers = layer_count(reference);
    let base_is_extra_input = config.base.as_ref().is_some_and(|b| {
        !config
            .models
            .iter()
            .any(|m| crate::config::same_model(&m.path, &b.path))
    });
    let mut tensors = Vec::new();
    for info in reference.tensors() {
        if !float_check(&mut problems, reference, info) {
            continue;
        }
        for (who, other) in &others {
            match other.info(&info.name) {
                None => problems.push(
                    Error::new(
                        ErrorKind::Plan,
                        format!("missing in {who}, which every tensor of this method needs"),
                    )
                    .with_file(other.root())
                    .with_tensor(&info.name),
                ),
                Some(o) if o.shape != info.shape => problems.push(
                    Error::new(
                        ErrorKind::Plan,
                        format!(
                            "shape {:?} in {who} but {:?} in {}{}",
                            o.shape,
                            info.shape,
                            reference.root().display(),
                            if info.name.contains("embed") || info.name.contains("lm_head") {
                                " (a different vocabulary: flatmerge does not merge vocabularies)"
                            } else {
                                ""
                            }
                        ),
                    )
                    .with_file(other.root())
                    .with_tensor(&info.name),
                ),
                Some(o) => {
                    float_check(&mut problems, other, o);
                }
            }
        }
        let t = crate::config::params::layer_position(&info.name, layers);
        for def in params
            .defs
            .iter()
            .filter(|d| d.default == crate::config::params::Default::Required)
        {
            let targets: Vec<Option<usize>> = match def.scope {
                crate::config::params::Scope::Shared => vec![None],
                crate::config::params::Scope::PerModel => {
                    inputs.contributors.iter().map(|&m| Some(m)).collect()
                }
            };
            for target in targets {
                if let Err(e) = params.number(def.name, target, &info.name, t) {
                    problems.push(e.with_file(config.source.clone().unwrap_or_default()));
                }
            }
            // linear also weighs a base model that is not listed under `models` (mergekit appends it).
            if config.method == MergeMethod::Linear
                && def.name == "weight"
                && base_is_extra_input
                && params.number("weight", None, &info.name, t).is_err()
            {
                problems.push(
                    Error::new(
                        ErrorKind::Config,
                        "linear weighs the base model too (it is not listed under `models`): give a global `weight` or list it with its own",
                    )
                    .with_file(config.source.clone().unwrap_or_default())
                    .with_tensor(&info.name),
                );
            }
        }
        tensors.push(TensorPlan {
            name: info.name.clone(),
            shape: info.shape.clone(),
            in_dtype: info.dtype,
            out_dtype: config.out_dtype.unwrap_or(info.dtype),
            rule: TensorRule::Baseline,
            contributors: (0..inputs.contributors.len()).collect(),
            excluded: Vec::new(),
            source: None,
        });
    }
    let dropped = dropped_tensors(inputs, reference);
    problems.into_result()?;
    Ok(Plan {
        tensors,
        dropped,
        layers,
        groups: Vec::new(),
    })
}

/// Contributor tensors the output (named after `reference`) has no place for.
fn dropped_tensors(inputs: &Inputs, reference: &Checkpoint) -> Vec<DroppedTensor> {
    (0..inputs.contributors.len())
        .flat_map(|k| {
            inputs
                .contributor(k)
                .checkpoint
                .tensors()
                .iter()
                .filter(|t| reference.info(&t.name).is_none())
                .map(move |t| DroppedTensor {
                    contributor: k,
                    name: t.name.clone(),
                })
        })
        .collect()
}

/// Decoder layers of a checkpoint: one more than the largest `layers.N` index.
pub fn layer_count(checkpoint: &Checkpoint) -> usize {
    checkpoint
        .tensors()
        .iter()
        .filter_map(|t| crate::demo::layer_index(&t.name))
        .max()
        .map_or(0, |l| l + 1)
}

/// The neuron groups of a FAM merge, in the receiver's names.
fn resolve_groups(spec: &GroupsSpec, receiver: &Checkpoint) -> Vec<NeuronGroup> {
    let names = receiver.tensors().iter().map(|t| t.name.as_str());
    let sequential = || {
        // Linear layers in file order whose widths chain (out of one = in of the next).
        let linear: Vec<&TensorInfo> = receiver
            .tensors()
            .iter()
            .filter(|t| t.shape.len() == 2 && t.name.ends_with(".weight"))
            .collect();
        let mut chain: Vec<String> = Vec::new();
        for pair in linear.windows(2) {
            if pair[0].shape[0] == pair[1].shape[1] {
                if chain.is_empty() {
                    chain.push(pair[0].name.trim_end_matches(".weight").to_string());
                }
                chain.push(pair[1].name.trim_end_matches(".weight").to_string());
            } else if !chain.is_empty() {
                break;
            }
        }
        crate::groups::sequential(&chain, names.clone())
    };
    match spec {
        GroupsSpec::List(groups) => groups.clone(),
        GroupsSpec::Template(t) => match t.as_str() {
            "llama_mlp" => crate::groups::llama_mlp(names.clone()),
            "sequential" => sequential(),
            "none" => Vec::new(),
            _ => {
                let llama = crate::groups::llama_mlp(names.clone());
                if llama.is_empty() {
                    sequential()
                } else {
                    llama
                }
            }
        },
    }
}

/// Plans a FAM merge (SPEC §2, §5): maps B's names into A's, resolves the
/// neuron groups, and decides per tensor of A whether it is fused by rows
/// (aligned by its groups), averaged, or kept.
fn plan_fam(config: &MergeConfig, settings: &FamSettings, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let receiver = &inputs.receiver().checkpoint;
    let contributor = inputs.contributor(0);
    let b = &contributor.checkpoint;
    let mut b_for_a: BTreeMap<String, String> = BTreeMap::new();
    let mut dropped = Vec::new();
    for info in b.tensors() {
        let targets: Vec<String> = settings
            .name_map
            .apply(&info.name)
            .into_iter()
            .filter(|t| receiver.info(t).is_some())
            .collect();
        if targets.is_empty() {
            dropped.push(DroppedTensor {
                contributor: 0,
                name: info.name.clone(),
            });
        }
        for target in targets {
            if let Some(previous) = b_for_a.insert(target.clone(), info.name.clone()) {
                problems.push(
                    Error::new(
                        ErrorKind::Plan,
                        format!(
                            "both `{previous}` and `{}` of the contributor map to it",
                            info.name
                        ),
                    )
                    .with_file(receiver.root())
                    .with_tensor(&target),
                );
            }
        }
    }
    let groups = resolve_groups(&settings.groups, receiver);
    let mut row_group: BTreeMap<&str, usize> = BTreeMap::new();
    let mut col_group: BTreeMap<&str, usize> = BTreeMap::new();
    let mut group_plans = Vec::new();
    let stats_layer = |input: &Input, layer: &str| input.layer(layer).cloned();
    for (g, group) in groups.iter().enumerate() {
        for (names, axis, map) in [
            (&group.producers, "rows", &mut row_group),
            (&group.consumers, "columns", &mut col_group),
        ] {
            for name in names {
                if receiver.info(name).is_none() {
                    problems.push(
                        Error::new(
                            ErrorKind::Plan,
                            format!("group `{}` names a tensor the receiver lacks", group.name),
                        )
                        .with_file(receiver.root())
                        .with_tensor(name),
                    );
                } else if let Some(other) = map.insert(name.as_str(), g) {
                    problems.push(
                        Error::new(
                            ErrorKind::Plan,
                            format!(
                                "its {axis} belong to two groups: `{}` and `{}`",
                                groups[other].name, group.name
                            ),
                        )
                        .with_tensor(name),
                    );
                }
            }
        }
        let a_name = format!("{}.weight", group.activations);
        let b_layer = b_for_a
            .get(&a_name)
            .map(|n| n.trim_end_matches(".weight").to_string());
        for (who, input, layer) in [
            (
                "receiver",
                inputs.receiver(),
                Some(group.activations.clone()),
            ),
            ("contributor", contributor, b_layer.clone()),
        ] {
            let rows = layer.as_deref().and_then(|l| stats_layer(input, l));
            let complete = rows
                .as_ref()
                .is_some_and(|l| l.y_rows.is_some() && l.x_rows.is_some());
            if !complete {
                problems.push(
                    Error::new(
                        ErrorKind::Stats,
                        format!(
                            "group `{}` needs the {who}'s per-example rows (x_rows and y_rows) of layer `{}`",
                            group.name,
                            layer.as_deref().unwrap_or(&group.activations)
                        ),
                    )
                    .with_file(input.stats_path()),
                );
            }
        }
        group_plans.push(GroupPlan {
            group: group.clone(),
            contributor_activations: b_layer.unwrap_or_default(),
        });
    }
    let mut tensors = Vec::new();
    for info in receiver.tensors() {
        if !float_check(&mut problems, receiver, info) {
            continue;
        }
        let rows_of = row_group.get(info.name.as_str()).copied();
        let cols_of = col_group.get(info.name.as_str()).copied();
        let source = b_for_a.get(&info.name);
        let rule =
            match source.and_then(|s| b.info(s)) {
                None => TensorRule::Copy {
                    reason: CopyReason::OnlyInReceiver,
                },
                Some(other) => {
                    float_check(&mut problems, b, other);
                    let fits =
                        other.shape.len() == info.shape.len()
                            && other.shape.iter().zip(&info.shape).enumerate().all(
                                |(axis, (x, y))| {
                                    x == y
                                        || (axis == 0 && rows_of.is_some())
                                        || (axis == 1 && cols_of.is_some())
                                },
                            );
                    if !fits {
                        TensorRule::Copy {
                            reason: CopyReason::ShapeMismatch,
                        }
                    } else {
                        fam_rule(inputs, info, rows_of, cols_of)
                    }
                }
            };
        if let (TensorRule::Copy { reason }, true) = (&rule, config.strict) {
            problems.push(
                Error::new(
                    ErrorKind::Plan,
                    format!(
                        "--strict: no counterpart in the contributor ({})",
                        snake(reason)
                    ),
                )
                .with_file(receiver.root())
                .with_tensor(&info.name),
            );
        }
        tensors.push(TensorPlan {
            name: info.name.clone(),
            shape: info.shape.clone(),
            in_dtype: info.dtype,
            out_dtype: config.out_dtype.unwrap_or(info.dtype),
            rule,
            contributors: if source.is_some() {
                vec![0]
            } else {
                Vec::new()
            },
            excluded: Vec::new(),
            source: source.cloned(),
        });
    }
    if config.strict {
        for d in &dropped {
            problems.push(
                Error::new(
                    ErrorKind::Plan,
                    "--strict: this contributor tensor has no place in the receiver",
                )
                .with_file(b.root())
                .with_tensor(&d.name),
            );
        }
    }
    problems.into_result()?;
    Ok(Plan {
        tensors,
        dropped,
        layers: layer_count(receiver),
        groups: group_plans,
    })
}

fn fam_rule(
    inputs: &Inputs,
    info: &TensorInfo,
    row_group: Option<usize>,
    col_group: Option<usize>,
) -> TensorRule {
    let average = |row_group, col_group| TensorRule::Fam {
        row_group,
        col_group,
        layer: None,
        average: true,
    };
    match layer_of(&info.name) {
        // SPEC §2.4: a bias follows its rows (fused, f = 1 outside groups).
        Some((_, false)) if info.shape.len() == 1 => TensorRule::Fam {
            row_group,
            col_group: None,
            layer: None,
            average: false,
        },
        Some((layer, true)) if info.shape.len() == 2 => {
            let has_direction = inputs
                .receiver()
                .layer(layer)
                .and_then(|l| l.x_mean.as_ref())
                .is_some_and(|x| x.len() == info.shape[1]);
            if has_direction {
                TensorRule::Fam {
                    row_group,
                    col_group,
                    layer: Some(layer.to_string()),
                    average: false,
                }
            } else {
                average(row_group, col_group)
            }
        }
        _ => average(row_group, col_group),
    }
}
