//! The merge plan: which rule each output tensor follows, checked before
//! any tensor data is read (STYLE: open → plan → kernels → writer → report).
//!
//! Planning opens every checkpoint and statistics file (headers only, the
//! data stays memory-mapped and untouched) and collects *all* problems it
//! finds, so that a user fixes a config in one round rather than one error
//! at a time.

use crate::config::{MergeConfig, MethodSettings};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Checkpoint, TensorInfo};
use crate::stats::{ActivationStats, LayerStats};
use serde::Serialize;
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
}

impl Plan {
    /// Number of tensors per rule label, in a fixed order.
    pub fn rule_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> =
            ["safe_m", "fallback", "copied", "shape_mismatch"]
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
    /// The receiver (first model).
    pub receiver: Input,
    /// The contributors, in config order.
    pub contributors: Vec<Input>,
}

/// Collects problems so that planning reports them all at once.
#[derive(Default)]
struct Problems(Vec<Error>);

impl Problems {
    fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    fn into_result(self) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.into_iter().next().expect("one problem")),
            n => {
                let lines: Vec<String> = self.0.iter().map(|e| format!("  {e}")).collect();
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
    let mut models: Vec<Option<Input>> = config.models.iter().map(&mut open).collect();
    problems.into_result()?;
    let receiver = models.remove(0).expect("opened");
    Ok(Inputs {
        base: base.map(|b| b.expect("opened")),
        receiver,
        contributors: models.into_iter().map(|m| m.expect("opened")).collect(),
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
fn layer_of(name: &str) -> Option<(&str, bool)> {
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
    }
}

fn plan_safe_m(config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let receiver = &inputs.receiver.checkpoint;
    let base = inputs.base.as_ref().map(|b| &b.checkpoint);
    let mut tensors = Vec::new();
    for info in receiver.tensors() {
        if !float_check(&mut problems, receiver, info) {
            continue;
        }
        let mut present = Vec::new();
        let mut excluded = Vec::new();
        for (k, contributor) in inputs.contributors.iter().enumerate() {
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
        });
    }
    let mut dropped = Vec::new();
    for (k, contributor) in inputs.contributors.iter().enumerate() {
        for info in contributor.checkpoint.tensors() {
            if receiver.info(&info.name).is_none() {
                dropped.push(DroppedTensor {
                    contributor: k,
                    name: info.name.clone(),
                });
            }
        }
    }
    problems.into_result()?;
    Ok(Plan { tensors, dropped })
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
    let models = std::iter::once(&inputs.receiver)
        .chain(present.iter().map(|&k| &inputs.contributors[k]))
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
    need(&inputs.receiver, "the receiver", "y_mean", out);
    if is_weight {
        need(&inputs.receiver, "the receiver", "x_mean", info.shape[1]);
    }
    need(base, "the ancestor", "y_mean", out);
    for &k in present {
        need(
            &inputs.contributors[k],
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
