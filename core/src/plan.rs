//! The merge plan: which rule each output tensor follows, checked before
//! any tensor data is read (STYLE: open → plan → kernels → writer → report).
//!
//! Planning opens every checkpoint and statistics file (headers only, the
//! data stays memory-mapped and untouched) and collects *all* problems it
//! finds, so that a user fixes a config in one round rather than one error
//! at a time.

use crate::config::MergeConfig;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::groups::NeuronGroup;
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
    /// Fewer contributors hold it than the method merges (mergekit's
    /// optional weights): the output takes the reference's values.
    TooFewHolders,
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
    /// Least-squares merging of a linear layer (SPEC §7): the weight and,
    /// folded in, the bias are solved together, once per layer.
    LeastSquares {
        /// The layer: the tensor's name without `.weight` / `.bias`.
        layer: String,
        /// Whether this is the layer's bias (else its weight).
        bias: bool,
    },
    /// The weighted average of the models' tensors.
    Average,
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
            TensorRule::Baseline
            | TensorRule::LeastSquares { .. }
            | TensorRule::Fam { average: false, .. } => "method",
            TensorRule::Fam { average: true, .. } | TensorRule::Average => "average",
            TensorRule::Fallback { .. } => "fallback",
            TensorRule::Copy {
                reason: CopyReason::OnlyInReceiver | CopyReason::TooFewHolders,
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
                TensorRule::LeastSquares { bias: false, .. } => {
                    "least squares (weight)".to_string()
                }
                TensorRule::LeastSquares { bias: true, .. } => "least squares (bias)".to_string(),
                TensorRule::Average => "average".to_string(),
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

pub(crate) fn snake(value: &impl Serialize) -> String {
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
    /// Its second statistics file with Grams (`grams:`) and its path.
    pub grams: Option<(ActivationStats, PathBuf)>,
}

impl Input {
    pub(crate) fn layer(&self, layer: &str) -> Option<&LayerStats> {
        self.stats.as_ref().and_then(|(s, _)| s.layer(layer))
    }

    /// The Gram of `layer`: from the `grams:` file when one was given,
    /// else from the statistics; with the file it came from.
    pub(crate) fn gram(&self, layer: &str) -> Option<(&crate::stats::Gram, &Path)> {
        self.grams
            .as_ref()
            .or(self.stats.as_ref())
            .and_then(|(s, p)| s.gram(layer).map(|g| (g, p.as_path())))
    }

    /// The file [`Input::gram`] reads.
    pub(crate) fn grams_path(&self) -> &Path {
        self.grams
            .as_ref()
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| self.stats_path())
    }

    pub(crate) fn stats_path(&self) -> &Path {
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
    /// The prefix of the output's decoder stack (`model.`), for a slice's
    /// per-slice gradient positions; `None` without layers.
    pub decoder_prefix: Option<String>,
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
pub(crate) struct Problems(Vec<Error>);

impl Problems {
    pub(crate) fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    pub(crate) fn into_result(self) -> Result<()> {
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
            .and_then(|c| match &model.lora {
                Some(adapter) => c.with_adapter(adapter),
                None => Ok(c),
            })
            .map_err(|e| problems.push(e))
            .ok();
        let mut load = |path: &Option<PathBuf>| match path {
            Some(path) => match ActivationStats::load(path) {
                Ok(s) => Some((s, path.clone())),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        let stats = load(&model.stats);
        let grams = load(&model.grams);
        let checkpoint = checkpoint?;
        match &model.window {
            None => Some(Input {
                checkpoint,
                stats,
                grams,
            }),
            Some(window) => windowed(checkpoint, stats, grams, window, config)
                .map_err(|e| problems.push(e))
                .ok(),
        }
    };
    let base = config.base.as_ref().map(&mut open);
    let models: Vec<Option<Input>> = config.models.iter().map(&mut open).collect();
    problems.into_result()?;
    let mut inputs = Inputs {
        base: base.map(|b| b.expect("opened")),
        models: models.into_iter().map(|m| m.expect("opened")).collect(),
        contributors: config.contributors(),
        names_from_base: config.method.roles() != crate::methods::Roles::ReceiverFirst,
        decoder_prefix: None,
    };
    inputs.decoder_prefix = match &config.layer_window {
        Some(window) => window
            .stack(&inputs.reference().checkpoint)
            .map(|(prefix, _)| prefix),
        None => crate::layers::decoder_prefix(&inputs.reference().checkpoint),
    };
    config.method.map_inputs(config, &mut inputs)?;
    Ok(inputs)
}

/// A `slices:` source (or a module's model): the model's layers in
/// `window`, renamed to the output's numbering, with its statistics
/// renamed alike. Under `modules:`, a model holding tensors of a module
/// the config does not list is an error: mergekit would leave them out of
/// the output, and a model without its vision tower does not load.
fn windowed(
    checkpoint: Checkpoint,
    stats: Option<(ActivationStats, PathBuf)>,
    grams: Option<(ActivationStats, PathBuf)>,
    window: &crate::layers::LayerWindow,
    config: &MergeConfig,
) -> Result<Input> {
    let config_file = || {
        config
            .source
            .clone()
            .unwrap_or_else(|| checkpoint.root().to_path_buf())
    };
    if window.module.is_some() {
        let unlisted: Vec<&str> = checkpoint
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !config.modules.contains(&crate::modules::Module::of(n)))
            .collect();
        if let Some(first) = unlisted.first() {
            let module = crate::modules::Module::of(first);
            let listed: Vec<&str> = config.modules.iter().map(|m| m.as_str()).collect();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "`modules:` lists {}, but {} holds {} tensors of `{module}` (`{first}`, …); list that module too (e.g. `{module}: {{models: [{{model: …}}]}}`), or the output would lack them",
                    listed.join(", "),
                    checkpoint.root().display(),
                    unlisted
                        .iter()
                        .filter(|n| crate::modules::Module::of(n) == module)
                        .count()
                ),
            )
            .with_file(config_file()));
        }
    }
    let (prefix, layers) = match window.stack(&checkpoint) {
        Some((prefix, layers)) => (Some(prefix), layers),
        None => (None, 0),
    };
    let mut window = window.clone();
    if window.whole {
        window.count = layers;
    }
    let end = window.first + window.count;
    if end > layers {
        let stack = match window.module {
            Some(m) => format!("`{m}` layers"),
            None => "decoder layers".into(),
        };
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "`{}` is [{}, {end}), but {} has {layers} {stack}",
                window.key,
                window.first,
                checkpoint.root().display()
            ),
        )
        .with_file(config_file()));
    }
    let rename = |name: &str| window.rename(name, prefix.as_deref());
    let rename_stats =
        |s: Option<(ActivationStats, PathBuf)>| s.map(|(s, p)| (s.renamed(rename), p));
    Ok(Input {
        checkpoint: checkpoint.renamed(rename)?,
        stats: rename_stats(stats),
        grams: rename_stats(grams),
    })
}

pub(crate) fn float_check(
    problems: &mut Problems,
    checkpoint: &Checkpoint,
    info: &TensorInfo,
) -> bool {
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

pub(crate) use crate::layers::layer_of;

/// Builds the plan of a merge: the method decides each tensor's rule.
pub fn plan(config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
    config.method.plan(config, inputs)
}

/// Contributor tensors the output (named after `reference`) has no place for.
pub(crate) fn dropped_tensors(inputs: &Inputs, reference: &Checkpoint) -> Vec<DroppedTensor> {
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

pub use crate::layers::layer_count;
