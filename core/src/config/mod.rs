//! Merge configs: mergekit's YAML layout, extended with the keys SAFE-M
//! needs (`stats`, `base_model_stats`). Parsing happens in two stages, as
//! in ripgrep: the raw document ([`RawConfig`], every key known, unknown
//! keys rejected with their line), then validation into [`MergeConfig`],
//! whose values are checked and whose paths are resolved.
//!
//! Relative paths are resolved against the directory of the config file
//! (the current directory for a config given as a string), so a config and
//! its models can move together.

pub mod params;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::safe_m::{ConflictRule, ElectionParams, Salience, ScoreForm, Variant, EPSILON};
use params::{Default as D, Kind, ParamDef, Params, Scope};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A parameter value as written in the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// A boolean (`normalize: true`).
    Bool(bool),
    /// A number.
    Number(f64),
    /// A word (`score: sas`).
    Text(String),
    /// A list (mergekit's gradients and filters).
    List(Vec<ParamValue>),
    /// A mapping (one `{filter, value}` entry).
    Map(BTreeMap<String, ParamValue>),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Number(x) => write!(f, "{x}"),
            ParamValue::Text(s) => write!(f, "{s:?}"),
            ParamValue::List(_) => f.write_str("a list"),
            ParamValue::Map(_) => f.write_str("a mapping"),
        }
    }
}

/// A `parameters:` block: names to values, each with its place in the file.
pub type RawParams = BTreeMap<String, Spanned<ParamValue>>;

/// One entry of `models:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Path of the checkpoint.
    pub model: String,
    /// Path of its activation statistics (SAFE-M, FAM).
    #[serde(default)]
    pub stats: Option<String>,
    /// Per-model parameters; they override the global ones.
    #[serde(default)]
    pub parameters: RawParams,
}

/// A config as written, every key known.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The method (`safe_m`).
    pub merge_method: Spanned<String>,
    /// The common ancestor (SAFE-M) or base model (task-vector methods).
    #[serde(default)]
    pub base_model: Option<String>,
    /// Activation statistics of the base model.
    #[serde(default)]
    pub base_model_stats: Option<String>,
    /// The models; for SAFE-M the first is the receiver.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Global parameters.
    #[serde(default)]
    pub parameters: RawParams,
    /// Output dtype (mergekit: the compute dtype; flatmerge always computes in f32).
    #[serde(default)]
    pub dtype: Option<Spanned<String>>,
    /// Output dtype; wins over `dtype`.
    #[serde(default)]
    pub out_dtype: Option<Spanned<String>>,
    /// mergekit's frankenmerge layout (refused with a clear message).
    #[serde(default)]
    pub slices: Option<Spanned<ParamValue>>,
    /// mergekit's multi-module layout (refused with a clear message).
    #[serde(default)]
    pub modules: Option<Spanned<ParamValue>>,
    /// mergekit's tokenizer donor: only the output-name model's own tokenizer is supported.
    #[serde(default)]
    pub tokenizer_source: Option<Spanned<ParamValue>>,
    /// mergekit's vocabulary merging (refused with a clear message).
    #[serde(default)]
    pub tokenizer: Option<Spanned<ParamValue>>,
    /// mergekit's chat template override (refused with a clear message).
    #[serde(default)]
    pub chat_template: Option<Spanned<ParamValue>>,
    /// What to do with NaN or infinite weights: `error` (default) or `propagate`.
    #[serde(default)]
    pub nan_policy: Option<Spanned<String>>,
    /// FAM: how the contributor's tensor names map to the receiver's (SPEC §5).
    #[serde(default)]
    pub name_map: Option<Spanned<NameMapSpec>>,
    /// FAM: the neuron groups (SPEC §2.1).
    #[serde(default)]
    pub groups: Option<Spanned<GroupsSpec>>,
}

/// `name_map:` as written: a built-in map's name, a list of rules, or `{file: PATH}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum NameMapSpec {
    /// A built-in map (`llava-1.5-to-mplug-owl2`) or `identity`.
    Builtin(String),
    /// Rules in order.
    Rules(Vec<crate::namemap::RawRule>),
    /// A YAML or JSON file of rules, relative to the config.
    File {
        /// The path.
        file: String,
    },
}

/// `groups:` as written: a template name or explicit groups.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum GroupsSpec {
    /// `auto` (default), `llama_mlp`, `sequential` or `none`.
    Template(String),
    /// Groups declared in the receiver's names.
    List(Vec<crate::groups::NeuronGroup>),
}

/// A merge method flatmerge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergeMethod {
    /// SAFE-M (SPEC §1).
    SafeM,
    /// FAM (SPEC §2).
    Fam,
    /// `Σ w_k W_k / Σ w_k` (SPEC §3).
    Linear,
    /// `W_base + λ Σ w_k τ_k`.
    TaskArithmetic,
    /// TIES: magnitude trim, sign vote, disjoint mean.
    Ties,
    /// DARE drop and rescale, then a linear sum of task vectors.
    DareLinear,
    /// DARE drop and rescale, then the TIES vote.
    DareTies,
    /// Model breadcrumbs: drop the smallest and the largest magnitudes.
    Breadcrumbs,
    /// Breadcrumbs with the TIES vote.
    BreadcrumbsTies,
    /// DELLA: magnitude-ranked random drop, rescale, TIES vote.
    Della,
    /// DELLA without the vote.
    DellaLinear,
    /// The original TIES paper code: one threshold over the whole model.
    TiesReference,
    /// Spherical interpolation between the base and one model.
    Slerp,
    /// Interpolation towards the base where the two models are close.
    Nearswap,
    /// Model Stock: the base pulled towards the mean by the angle between fine-tunes.
    ModelStock,
    /// One model, optionally scaled.
    Passthrough,
}

impl MergeMethod {
    /// Every method, in the order above.
    pub const ALL: [MergeMethod; 16] = [
        MergeMethod::SafeM,
        MergeMethod::Fam,
        MergeMethod::Linear,
        MergeMethod::TaskArithmetic,
        MergeMethod::Ties,
        MergeMethod::DareLinear,
        MergeMethod::DareTies,
        MergeMethod::Breadcrumbs,
        MergeMethod::BreadcrumbsTies,
        MergeMethod::Della,
        MergeMethod::DellaLinear,
        MergeMethod::TiesReference,
        MergeMethod::Slerp,
        MergeMethod::Nearswap,
        MergeMethod::ModelStock,
        MergeMethod::Passthrough,
    ];

    /// mergekit methods flatmerge refuses by name (random sampling that
    /// cannot be reproduced, or layouts it does not run).
    pub const REFUSED: [&'static str; 9] = [
        "sce",
        "karcher",
        "arcee_fusion",
        "nuslerp",
        "multislerp",
        "ram",
        "ramplus_tl",
        "core_space",
        "task_adapter",
    ];

    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeMethod::SafeM => "safe_m",
            MergeMethod::Fam => "fam",
            MergeMethod::Linear => "linear",
            MergeMethod::TaskArithmetic => "task_arithmetic",
            MergeMethod::Ties => "ties",
            MergeMethod::DareLinear => "dare_linear",
            MergeMethod::DareTies => "dare_ties",
            MergeMethod::Breadcrumbs => "breadcrumbs",
            MergeMethod::BreadcrumbsTies => "breadcrumbs_ties",
            MergeMethod::Della => "della",
            MergeMethod::DellaLinear => "della_linear",
            MergeMethod::TiesReference => "ties_reference",
            MergeMethod::Slerp => "slerp",
            MergeMethod::Nearswap => "nearswap",
            MergeMethod::ModelStock => "model_stock",
            MergeMethod::Passthrough => "passthrough",
        }
    }

    /// Parses a config name.
    pub fn parse(name: &str) -> Option<MergeMethod> {
        MergeMethod::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether the method adds task vectors `τ_k = W_k − W_base` of the
    /// contributors (mergekit's generalized task arithmetic family).
    pub fn is_task_arithmetic(self) -> bool {
        matches!(
            self,
            MergeMethod::TaskArithmetic
                | MergeMethod::Ties
                | MergeMethod::DareLinear
                | MergeMethod::DareTies
                | MergeMethod::Breadcrumbs
                | MergeMethod::BreadcrumbsTies
                | MergeMethod::Della
                | MergeMethod::DellaLinear
        )
    }

    /// Whether `base_model` is required.
    pub fn needs_base(self) -> bool {
        !matches!(
            self,
            MergeMethod::Linear | MergeMethod::Passthrough | MergeMethod::Fam
        )
    }

    /// The parameters the method accepts (mergekit 0.1.5 names and defaults).
    pub fn params(self) -> Vec<ParamDef> {
        let def = |name, scope, kind, default| ParamDef {
            name,
            scope,
            kind,
            default,
        };
        let weight = def("weight", Scope::PerModel, Kind::ANY, D::Required);
        let flag = |name, default| def(name, Scope::Shared, Kind::Bool, D::Bool(default));
        let gta = |normalize: bool, rescale: bool| {
            vec![
                weight,
                def("density", Scope::PerModel, Kind::UNIT, D::Number(1.0)),
                flag("normalize", normalize),
                flag("rescale", rescale),
                def("lambda", Scope::Shared, Kind::ANY, D::Number(1.0)),
                flag("int8_mask", false),
            ]
        };
        let with = |mut defs: Vec<ParamDef>, extra: ParamDef| {
            defs.push(extra);
            defs
        };
        let gamma = def("gamma", Scope::PerModel, Kind::UNIT, D::Number(0.01));
        let della_eps = def("epsilon", Scope::PerModel, Kind::UNIT, D::Number(0.15));
        match self {
            MergeMethod::SafeM | MergeMethod::Fam => Vec::new(),
            MergeMethod::Linear => vec![weight, flag("normalize", true)],
            MergeMethod::TaskArithmetic => gta(false, false),
            MergeMethod::Ties => gta(true, false),
            MergeMethod::DareLinear | MergeMethod::DareTies => gta(false, true),
            MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies => {
                with(gta(false, false), gamma)
            }
            MergeMethod::Della => with(gta(true, true), della_eps),
            MergeMethod::DellaLinear => with(gta(false, true), della_eps),
            MergeMethod::TiesReference => vec![
                def("density", Scope::Shared, Kind::DENSITY, D::Number(0.2)),
                def("lambda", Scope::Shared, Kind::ANY, D::Number(1.0)),
            ],
            MergeMethod::Slerp => vec![def("t", Scope::Shared, Kind::ANY, D::Required)],
            MergeMethod::Nearswap => vec![def("t", Scope::Shared, Kind::POSITIVE, D::Required)],
            MergeMethod::ModelStock => vec![flag("filter_wise", false)],
            MergeMethod::Passthrough => {
                vec![def("scale", Scope::PerModel, Kind::ANY, D::Number(1.0))]
            }
        }
    }
}

/// What a merge does with NaN or infinite input weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NanPolicy {
    /// Refuse the merge, naming the file, the tensor and the first bad index.
    #[default]
    Error,
    /// Merge them through (the results of the arithmetic, NaN included).
    Propagate,
}

impl NanPolicy {
    /// Parses `error` or `propagate`.
    pub fn parse(text: &str) -> Option<NanPolicy> {
        match text {
            "error" => Some(NanPolicy::Error),
            "propagate" => Some(NanPolicy::Propagate),
            _ => None,
        }
    }
}

/// A checkpoint and its statistics, paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    /// The checkpoint (file or directory).
    pub path: PathBuf,
    /// Its activation statistics file, when given.
    pub stats: Option<PathBuf>,
}

/// SAFE-M settings of one contributor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SafeMContributor {
    /// Election of its parameters.
    pub election: ElectionParams,
    /// `λ_proj` (default 1.0).
    pub lambda_proj: f32,
    /// `λ_ortho` (default 0.5).
    pub lambda_ortho: f32,
}

/// Validated SAFE-M settings (SPEC §1).
#[derive(Debug, Clone, PartialEq)]
pub struct SafeMSettings {
    /// Election of the receiver's parameters.
    pub receiver: ElectionParams,
    /// One entry per contributor, in the order of `models` after the receiver.
    pub contributors: Vec<SafeMContributor>,
    /// `w` of the fallback `(1 − w)·W_A + w·B̄` (default 0.5).
    pub fallback_weight: f32,
    /// `ε` of the projection and of the `ratio` score (default 1e-8).
    pub epsilon: f32,
    /// The variant (docs/methods.md); `Variant::default()` is SPEC §1.
    pub variant: Variant,
    /// The preset whose defaults were used (`spec` unless `preset:` says otherwise).
    pub preset: &'static str,
}

/// Defaults of a SAFE-M preset; keys written in the config win over them.
#[derive(Debug, Clone, Copy)]
struct SafeMPreset {
    name: &'static str,
    density: f64,
    lambda_proj: f64,
    lambda_ortho: f64,
    variant: Variant,
}

/// `spec`: SPEC §1's defaults (what `merge_method: safe_m` does unless told otherwise).
const SAFE_M_SPEC: SafeMPreset = SafeMPreset {
    name: "spec",
    density: 0.2,
    lambda_proj: 1.0,
    lambda_ortho: 0.5,
    variant: Variant {
        symmetric: false,
        receiver_lambda: (1.0, 1.0),
        conflict: ConflictRule::Drop,
        salience: Salience::Weight,
        rescale: false,
        activation_lambda: false,
    },
};

/// `keep_all`: the setting chosen on the quality benchmark's validation
/// split (docs/quality.md): every model's task vector over C, nothing
/// trimmed or dropped, each layer's λ from the probe rows.
const SAFE_M_KEEP_ALL: SafeMPreset = SafeMPreset {
    name: "keep_all",
    density: 1.0,
    lambda_proj: 1.0,
    lambda_ortho: 1.0,
    variant: Variant {
        symmetric: true,
        receiver_lambda: (1.0, 1.0),
        conflict: ConflictRule::Keep,
        salience: Salience::Weight,
        rescale: false,
        activation_lambda: true,
    },
};

const SAFE_M_PRESETS: &[SafeMPreset] = &[SAFE_M_SPEC, SAFE_M_KEEP_ALL];

/// A validated merge config.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The method.
    pub method: MergeMethod,
    /// The base model (SAFE-M: the common ancestor `C`).
    pub base: Option<ModelRef>,
    /// The models in config order (SAFE-M: receiver `A`, then contributors).
    pub models: Vec<ModelRef>,
    /// Output dtype; `None` keeps the receiver's dtype per tensor.
    pub out_dtype: Option<Dtype>,
    /// Method settings.
    pub settings: MethodSettings,
    /// Seed of DARE's and DELLA's random masks (SPEC §3; default 0).
    pub seed: u64,
    /// FAM: tensors without a counterpart and dropped tensors are errors (`--strict`).
    pub strict: bool,
    /// What to do with NaN or infinite input weights.
    pub nan_policy: NanPolicy,
    /// Where the config came from (for messages and the report).
    pub source: Option<PathBuf>,
}

/// Settings of the chosen method.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MethodSettings {
    /// SAFE-M: scalar parameters, resolved once.
    SafeM(SafeMSettings),
    /// The baselines: mergekit-style parameters, resolved per tensor.
    Baseline(Params),
    /// FAM.
    Fam(FamSettings),
}

/// Validated FAM settings (SPEC §2), defaults as in §2.4.
#[derive(Debug, Clone)]
pub struct FamSettings {
    /// `k_n`: share of each model's neurons that are candidates (default 1).
    pub density: f64,
    /// FOS gate (default −1: no gate).
    pub fos_min: f32,
    /// `σ` of the flatness term of FOS (default 0.1).
    pub sigma: f32,
    /// `β` of the flatness factor (default 0).
    pub beta: f32,
    /// `λ_proj` (default 0.5).
    pub lambda_proj: f32,
    /// `λ_ortho` (default 0.5).
    pub lambda_ortho: f32,
    /// `ε` (default 1e-8).
    pub epsilon: f32,
    /// Greedy matching instead of the exact assignment.
    pub greedy: bool,
    /// Plain cosine instead of Pearson correlation.
    pub raw_cosine: bool,
    /// Choose `λ_proj, λ_ortho` by the unsupervised grid search of SPEC §2.5.
    pub lambda_search: bool,
    /// The grid of that search.
    pub lambda_grid: Vec<f32>,
    /// The preset the values started from (`default` or `sketch`).
    pub preset: String,
    /// The name map.
    pub name_map: crate::namemap::NameMap,
    /// The groups as configured.
    pub groups: GroupsSpec,
}

impl PartialEq for FamSettings {
    fn eq(&self, other: &Self) -> bool {
        self.density == other.density
            && self.fos_min == other.fos_min
            && self.sigma == other.sigma
            && self.beta == other.beta
            && self.lambda_proj == other.lambda_proj
            && self.lambda_ortho == other.lambda_ortho
            && self.epsilon == other.epsilon
            && self.greedy == other.greedy
            && self.raw_cosine == other.raw_cosine
            && self.lambda_search == other.lambda_search
            && self.lambda_grid == other.lambda_grid
            && self.preset == other.preset
            && self.name_map.source == other.name_map.source
            && self.groups == other.groups
    }
}

impl MergeConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<MergeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        MergeConfig::from_yaml(&text, base_dir, Some(path))
    }

    /// Parses and validates YAML text; relative paths resolve against `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path, source: Option<&Path>) -> Result<MergeConfig> {
        let with_source = |e: Error| match source {
            Some(path) => e.with_file(path),
            None => e,
        };
        // Non-finite numbers reach validation, whose message names the key
        // and the allowed range (the parser's own names only the line).
        let mut options = serde_saphyr::Options::default();
        options.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
        let raw: RawConfig = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| with_source(yaml_error(&e)))?;
        validate(raw, base_dir, source).map_err(with_source)
    }

    /// A FAM config for two models (what `flatmerge map` uses): `name_map`
    /// is a built-in map's name or a rules file, `groups` a template name.
    pub fn fam_pair(
        receiver: (&Path, &Path),
        contributor: (&Path, &Path),
        name_map: Option<&str>,
        groups: Option<&str>,
        preset: Option<&str>,
    ) -> Result<MergeConfig> {
        let q = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
        let mut text = format!(
            "merge_method: fam\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
            q(receiver.0),
            q(receiver.1),
            q(contributor.0),
            q(contributor.1)
        );
        if let Some(map) = name_map {
            let is_file = Path::new(map).is_file();
            let value = serde_json::Value::String(map.to_string()).to_string();
            text.push_str(&if is_file {
                format!("name_map: {{file: {value}}}\n")
            } else {
                format!("name_map: {value}\n")
            });
        }
        if let Some(groups) = groups {
            text.push_str(&format!(
                "groups: {}\n",
                serde_json::Value::String(groups.to_string())
            ));
        }
        if let Some(preset) = preset {
            text.push_str(&format!(
                "parameters:\n  preset: {}\n",
                serde_json::Value::String(preset.to_string())
            ));
        }
        MergeConfig::from_yaml(&text, Path::new("."), None)
    }

    /// The SAFE-M settings.
    pub fn safe_m(&self) -> Option<&SafeMSettings> {
        match &self.settings {
            MethodSettings::SafeM(s) => Some(s),
            _ => None,
        }
    }

    /// The baseline parameters.
    pub fn baseline(&self) -> Option<&Params> {
        match &self.settings {
            MethodSettings::Baseline(p) => Some(p),
            _ => None,
        }
    }

    /// The FAM settings.
    pub fn fam(&self) -> Option<&FamSettings> {
        match &self.settings {
            MethodSettings::Fam(f) => Some(f),
            _ => None,
        }
    }

    /// Indices (into `models`) of the contributors: SAFE-M's models after
    /// the receiver; for the other methods with a base, the models that are
    /// not the base (mergekit never treats the base as a contributor).
    pub fn contributors(&self) -> Vec<usize> {
        match self.method {
            MergeMethod::SafeM | MergeMethod::Fam => (1..self.models.len()).collect(),
            // mergekit: every listed model is an input of these, the base included.
            MergeMethod::Linear | MergeMethod::Passthrough => (0..self.models.len()).collect(),
            _ => (0..self.models.len())
                .filter(|&i| {
                    self.base
                        .as_ref()
                        .is_none_or(|b| !same_model(&b.path, &self.models[i].path))
                })
                .collect(),
        }
    }
}

/// Whether two paths name the same checkpoint (after resolving links).
pub fn same_model(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The first line of a serde-saphyr error ("line L column C: problem"); the
/// rest is a source excerpt that does not fit a one-line message.
fn yaml_error(err: &serde_saphyr::Error) -> Error {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or("invalid YAML");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // Advice meant for programmers using the parser ("set DuplicateKeyPolicy
    // in Options if acceptable") is no use to someone writing a config.
    let first = match first.split_once(", set ") {
        Some((problem, advice)) if advice.contains("Options") => problem,
        _ => first,
    };
    Error::new(ErrorKind::Config, first.to_string())
}

pub(crate) fn config_error(
    value_at: Option<&serde_saphyr::Location>,
    key: &str,
    problem: impl fmt::Display,
) -> Error {
    let message = match value_at {
        Some(at) if at.line() > 0 => {
            format!("line {} column {}: {problem}", at.line(), at.column())
        }
        _ => problem.to_string(),
    };
    Error::new(ErrorKind::Config, message).with_tensor(key)
}

/// `path` relative to `base_dir`, with `.` components dropped so that
/// reports and messages show `dir/A` rather than `dir/./A`.
fn resolve(base_dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    joined
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect()
}

/// Parameter names a method accepts, globally and per model.
struct ParamSpec {
    global: &'static [&'static str],
    per_model: &'static [&'static str],
}

const SAFE_M_PARAMS: ParamSpec = ParamSpec {
    global: &[
        "density",
        "alpha",
        "score",
        "lambda_proj",
        "lambda_ortho",
        "fallback_weight",
        "epsilon",
        "preset",
        "symmetric",
        "conflict",
        "salience",
        "rescale",
        "layer_lambda",
    ],
    per_model: &["density", "alpha", "score", "lambda_proj", "lambda_ortho"],
};

fn check_keys(params: &RawParams, allowed: &[&str], place: &str, method: &str) -> Result<()> {
    for (key, value) in params {
        if !allowed.contains(&key.as_str()) {
            return Err(config_error(
                Some(&value.referenced),
                key,
                format!(
                    "unknown parameter for {method} in {place}; expected one of: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Looks a parameter up: the model's own value first, then the global one.
struct Lookup<'a> {
    model: Option<&'a RawParams>,
    global: &'a RawParams,
}

impl<'a> Lookup<'a> {
    fn get(&self, key: &str) -> Option<&'a Spanned<ParamValue>> {
        self.model
            .and_then(|m| m.get(key))
            .or_else(|| self.global.get(key))
    }

    fn number(
        &self,
        key: &str,
        default: f64,
        valid: impl Fn(f64) -> bool,
        range: &str,
    ) -> Result<f64> {
        let Some(spanned) = self.get(key) else {
            return Ok(default);
        };
        match &spanned.value {
            ParamValue::Number(x) if valid(*x) => Ok(*x),
            other => Err(config_error(
                Some(&spanned.referenced),
                key,
                format!("expected a number {range}, found {other}"),
            )),
        }
    }

    fn score_form(&self, epsilon: f32) -> Result<ScoreForm> {
        let alpha = self.number("alpha", 1.0, |a| a.is_finite() && a >= 0.0, "≥ 0")? as f32;
        let Some(spanned) = self.get("score") else {
            return Ok(ScoreForm::Sas { alpha });
        };
        match &spanned.value {
            ParamValue::Text(s) if s == "sas" => Ok(ScoreForm::Sas { alpha }),
            ParamValue::Text(s) if s == "ratio" => Ok(ScoreForm::Ratio { epsilon }),
            other => Err(config_error(
                Some(&spanned.referenced),
                "score",
                format!("expected `sas` or `ratio`, found {other}"),
            )),
        }
    }

    fn election(&self, epsilon: f32, density: f64) -> Result<ElectionParams> {
        Ok(ElectionParams {
            density: self.number("density", density, |k| k > 0.0 && k <= 1.0, "in (0, 1]")?,
            form: self.score_form(epsilon)?,
        })
    }

    /// A boolean SAFE-M key.
    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Spanned {
                value: ParamValue::Bool(b),
                ..
            }) => Ok(*b),
            Some(spanned) => Err(config_error(
                Some(&spanned.referenced),
                key,
                format!("expected `true` or `false`, found {}", spanned.value),
            )),
        }
    }

    /// A SAFE-M key that takes one of `choices` (word, value).
    fn choice<T: Copy>(&self, key: &str, default: T, choices: &[(&str, T)]) -> Result<T> {
        let Some(spanned) = self.get(key) else {
            return Ok(default);
        };
        if let ParamValue::Text(s) = &spanned.value {
            if let Some((_, v)) = choices.iter().find(|(w, _)| w == s) {
                return Ok(*v);
            }
        }
        let words: Vec<String> = choices.iter().map(|(w, _)| format!("`{w}`")).collect();
        Err(config_error(
            Some(&spanned.referenced),
            key,
            format!(
                "expected one of {}, found {}",
                words.join(", "),
                spanned.value
            ),
        ))
    }
}

fn finite(x: f64) -> bool {
    x.is_finite()
}

fn out_dtype(raw: &RawConfig) -> Result<Option<Dtype>> {
    let Some((key, spanned)) = [("out_dtype", &raw.out_dtype), ("dtype", &raw.dtype)]
        .into_iter()
        .find_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    else {
        return Ok(None);
    };
    Dtype::parse_float(&spanned.value).map(Some).ok_or_else(|| {
        config_error(
            Some(&spanned.referenced),
            key,
            format!(
                "unsupported dtype `{}`; expected bfloat16, float16 or float32",
                spanned.value
            ),
        )
    })
}

fn refuse_layouts(raw: &RawConfig) -> Result<()> {
    let refuse = |value: &Option<Spanned<ParamValue>>, key: &str, why: &str| match value {
        Some(v) => Err(config_error(Some(&v.referenced), key, why)),
        None => Ok(()),
    };
    refuse(
        &raw.slices,
        "slices",
        "`slices` / `layer_range` (frankenmerges) are not supported by flatmerge; list whole models under `models:`",
    )?;
    refuse(
        &raw.modules,
        "modules",
        "`modules` (multi-module merges) are not supported by flatmerge; use `models:`",
    )?;
    refuse(
        &raw.tokenizer,
        "tokenizer",
        "vocabulary merging (`tokenizer:`) is not supported; the output keeps the tokenizer of the model its tensor names come from",
    )?;
    refuse(
        &raw.chat_template,
        "chat_template",
        "`chat_template` is not supported; the output keeps the chat template files of the model its tensor names come from",
    )?;
    match &raw.tokenizer_source {
        Some(v) if !matches!(&v.value, ParamValue::Text(t) if t == "base") => Err(config_error(
            Some(&v.referenced),
            "tokenizer_source",
            "only `tokenizer_source: base` is supported (the tokenizer files of the model the tensor names come from are copied)",
        )),
        _ => Ok(()),
    }
}

fn validate(raw: RawConfig, base_dir: &Path, source: Option<&Path>) -> Result<MergeConfig> {
    let method = MergeMethod::parse(&raw.merge_method.value).ok_or_else(|| {
        let supported: Vec<&str> = MergeMethod::ALL.iter().map(|m| m.as_str()).collect();
        let why = if MergeMethod::REFUSED.contains(&raw.merge_method.value.as_str()) {
            "is a mergekit method flatmerge does not run"
        } else {
            "is unknown"
        };
        config_error(
            Some(&raw.merge_method.referenced),
            "merge_method",
            format!(
                "merge method `{}` {why}; flatmerge runs: {}",
                raw.merge_method.value,
                supported.join(", ")
            ),
        )
    })?;
    refuse_layouts(&raw)?;
    if method != MergeMethod::Fam {
        if let Some(map) = &raw.name_map {
            return Err(config_error(
                Some(&map.referenced),
                "name_map",
                format!(
                    "{} merges models with the same tensor names; `name_map` is for fam",
                    method.as_str()
                ),
            ));
        }
        if let Some(groups) = &raw.groups {
            return Err(config_error(
                Some(&groups.referenced),
                "groups",
                format!("`groups` is for fam, not {}", method.as_str()),
            ));
        }
    }
    let models: Vec<ModelRef> = raw
        .models
        .iter()
        .map(|m| ModelRef {
            path: resolve(base_dir, &m.model),
            stats: m.stats.as_deref().map(|s| resolve(base_dir, s)),
        })
        .collect();
    let base = raw.base_model.as_deref().map(|b| ModelRef {
        path: resolve(base_dir, b),
        stats: raw
            .base_model_stats
            .as_deref()
            .map(|s| resolve(base_dir, s)),
    });
    if raw.base_model_stats.is_some() && raw.base_model.is_none() {
        return Err(config_error(
            None,
            "base_model_stats",
            "given without `base_model`",
        ));
    }
    let settings = match method {
        MergeMethod::SafeM => MethodSettings::SafeM(safe_m_settings(&raw, &models, base.as_ref())?),
        MergeMethod::Fam => {
            MethodSettings::Fam(fam_settings(&raw, &models, base.as_ref(), base_dir)?)
        }
        _ => MethodSettings::Baseline(baseline_params(method, &raw, &models, base.as_ref())?),
    };
    Ok(MergeConfig {
        method,
        base,
        models,
        out_dtype: out_dtype(&raw)?,
        settings,
        seed: 0,
        strict: false,
        nan_policy: match &raw.nan_policy {
            None => NanPolicy::Error,
            Some(v) => NanPolicy::parse(&v.value).ok_or_else(|| {
                config_error(
                    Some(&v.referenced),
                    "nan_policy",
                    format!("expected `error` or `propagate`, found `{}`", v.value),
                )
            })?,
        },
        source: source.map(Path::to_path_buf),
    })
}

const FAM_PARAMS: ParamSpec = ParamSpec {
    global: &[
        "density",
        "fos_min",
        "sigma",
        "beta",
        "lambda_proj",
        "lambda_ortho",
        "epsilon",
        "preset",
        "matching",
        "similarity",
        "lambda_search",
        "lambda_grid",
    ],
    per_model: &[],
};

fn fam_settings(
    raw: &RawConfig,
    models: &[ModelRef],
    base: Option<&ModelRef>,
    base_dir: &Path,
) -> Result<FamSettings> {
    check_keys(&raw.parameters, FAM_PARAMS.global, "`parameters`", "fam")?;
    for (i, m) in raw.models.iter().enumerate() {
        check_keys(
            &m.parameters,
            FAM_PARAMS.per_model,
            &format!("`models[{i}].parameters`"),
            "fam",
        )?;
    }
    if base.is_some() {
        return Err(config_error(
            None,
            "base_model",
            "fam merges models without a common ancestor: remove `base_model`",
        ));
    }
    if models.len() != 2 {
        return Err(config_error(
            None,
            "models",
            "fam merges exactly two models: the receiver A first, then B",
        ));
    }
    for (i, m) in models.iter().enumerate() {
        if m.stats.is_none() {
            return Err(config_error(
                None,
                &format!("models[{i}].stats"),
                format!(
                    "fam needs activation statistics with per-example rows for {}",
                    m.path.display()
                ),
            ));
        }
    }
    let global = Lookup {
        model: None,
        global: &raw.parameters,
    };
    let text = |key: &str, default: &str, choices: &[&str]| -> Result<String> {
        match raw.parameters.get(key) {
            None => Ok(default.to_string()),
            Some(v) => match &v.value {
                ParamValue::Text(t) if choices.contains(&t.as_str()) => Ok(t.clone()),
                other => Err(config_error(
                    Some(&v.referenced),
                    key,
                    format!("expected one of {}, found {other}", choices.join(", ")),
                )),
            },
        }
    };
    let flag = |key: &str| -> Result<bool> {
        match raw.parameters.get(key) {
            None => Ok(false),
            Some(v) => match &v.value {
                ParamValue::Bool(b) => Ok(*b),
                other => Err(config_error(
                    Some(&v.referenced),
                    key,
                    format!("expected true or false, found {other}"),
                )),
            },
        }
    };
    let preset = text("preset", "default", &["default", "sketch"])?;
    // SPEC §2.4: the defaults reach the aligned average; `sketch` is the method sketch's values.
    let (k, fos, sigma, beta) = if preset == "sketch" {
        (0.2, 0.5, 0.1, 0.5)
    } else {
        (1.0, -1.0, 0.1, 0.0)
    };
    let lambda_grid = match raw.parameters.get("lambda_grid") {
        None => vec![0.0, 0.25, 0.5, 0.75, 1.0],
        Some(v) => match &v.value {
            ParamValue::List(items) if !items.is_empty() => items
                .iter()
                .map(|i| match i {
                    ParamValue::Number(x) if x.is_finite() => Ok(*x as f32),
                    other => Err(config_error(
                        Some(&v.referenced),
                        "lambda_grid",
                        format!("expected numbers, found {other}"),
                    )),
                })
                .collect::<Result<_>>()?,
            other => Err(config_error(
                Some(&v.referenced),
                "lambda_grid",
                format!("expected a list of numbers, found {other}"),
            ))?,
        },
    };
    let name_map_at = raw.name_map.as_ref().map(|m| &m.referenced);
    let name_map = match raw.name_map.as_ref().map(|m| &m.value) {
        None => crate::namemap::NameMap::identity(),
        Some(NameMapSpec::Builtin(name)) if name == "identity" => {
            crate::namemap::NameMap::identity()
        }
        Some(NameMapSpec::Builtin(name)) => {
            crate::namemap::NameMap::builtin(name).ok_or_else(|| {
                config_error(
                    name_map_at,
                    "name_map",
                    format!(
                        "unknown built-in name map `{name}`; built in: identity, {}",
                        crate::namemap::BUILTIN.join(", ")
                    ),
                )
            })?
        }
        Some(NameMapSpec::Rules(rules)) => crate::namemap::NameMap::new("config", rules)?,
        Some(NameMapSpec::File { file }) => {
            crate::namemap::NameMap::from_file(&resolve(base_dir, file))?
        }
    };
    let groups = raw
        .groups
        .as_ref()
        .map_or(GroupsSpec::Template("auto".into()), |g| g.value.clone());
    if let GroupsSpec::Template(t) = &groups {
        if !["auto", "llama_mlp", "sequential", "none"].contains(&t.as_str()) {
            return Err(config_error(
                raw.groups.as_ref().map(|g| &g.referenced),
                "groups",
                format!("unknown group template `{t}`; expected auto, llama_mlp, sequential, none or a list"),
            ));
        }
    }
    Ok(FamSettings {
        density: global.number("density", k, |k| k > 0.0 && k <= 1.0, "in (0, 1]")?,
        fos_min: global.number("fos_min", fos, finite, "(finite)")? as f32,
        sigma: global.number("sigma", sigma, |s| s > 0.0 && s.is_finite(), "> 0")? as f32,
        beta: global.number("beta", beta, |b| b >= 0.0 && b.is_finite(), "≥ 0")? as f32,
        lambda_proj: global.number("lambda_proj", 0.5, finite, "(finite)")? as f32,
        lambda_ortho: global.number("lambda_ortho", 0.5, finite, "(finite)")? as f32,
        epsilon: global.number(
            "epsilon",
            EPSILON as f64,
            |e| e > 0.0 && e.is_finite(),
            "> 0",
        )? as f32,
        greedy: text("matching", "exact", &["exact", "greedy"])? == "greedy",
        raw_cosine: text("similarity", "pearson", &["pearson", "raw_cosine"])? == "raw_cosine",
        lambda_search: flag("lambda_search")?,
        lambda_grid,
        preset,
        name_map,
        groups,
    })
}

fn baseline_params(
    method: MergeMethod,
    raw: &RawConfig,
    models: &[ModelRef],
    base: Option<&ModelRef>,
) -> Result<Params> {
    let name = method.as_str();
    if method.needs_base() && base.is_none() {
        return Err(config_error(
            None,
            "base_model",
            format!("{name} needs `base_model`"),
        ));
    }
    if models.is_empty() {
        return Err(config_error(
            None,
            "models",
            format!("{name} needs at least one model under `models:`"),
        ));
    }
    for (i, m) in raw.models.iter().enumerate() {
        if let Some(stats) = &m.stats {
            return Err(config_error(
                None,
                &format!("models[{i}].stats"),
                format!("{name} uses no activation statistics (`{stats}`)"),
            ));
        }
    }
    if raw.base_model_stats.is_some() {
        return Err(config_error(
            None,
            "base_model_stats",
            format!("{name} uses no activation statistics"),
        ));
    }
    let per_model: Vec<&RawParams> = raw.models.iter().map(|m| &m.parameters).collect();
    let params = Params::validate(name, &method.params(), &raw.parameters, &per_model)?;
    let is_base = |i: usize| base.is_some_and(|b| same_model(&b.path, &models[i].path));
    let contributors: Vec<usize> = (0..models.len()).filter(|&i| !is_base(i)).collect();
    let count_error = |what: &str| Err(config_error(None, "models", format!("{name} {what}")));
    match method {
        MergeMethod::Slerp | MergeMethod::Nearswap if contributors.len() != 1 => {
            return count_error("merges the base with exactly one other model");
        }
        MergeMethod::ModelStock if contributors.len() < 2 => {
            return count_error("needs at least two models besides the base");
        }
        MergeMethod::Passthrough if models.len() != 1 => {
            return count_error("takes exactly one model")
        }
        _ if contributors.is_empty() => {
            return count_error("needs at least one model besides the base")
        }
        _ => {}
    }
    let weighted: Vec<usize> = if method == MergeMethod::Linear {
        (0..models.len()).collect()
    } else {
        contributors
    };
    params.check_required(&weighted, |i| {
        format!("models[{i}] ({})", models[i].path.display())
    })?;
    Ok(params)
}

fn safe_m_settings(
    raw: &RawConfig,
    models: &[ModelRef],
    base: Option<&ModelRef>,
) -> Result<SafeMSettings> {
    let method = "safe_m";
    check_keys(
        &raw.parameters,
        SAFE_M_PARAMS.global,
        "`parameters`",
        method,
    )?;
    for (i, m) in raw.models.iter().enumerate() {
        check_keys(
            &m.parameters,
            SAFE_M_PARAMS.per_model,
            &format!("`models[{i}].parameters`"),
            method,
        )?;
    }
    let base = base.ok_or_else(|| {
        config_error(
            None,
            "base_model",
            "safe_m needs `base_model`: the common ancestor C of all models",
        )
    })?;
    if models.len() < 2 {
        return Err(config_error(
            None,
            "models",
            "safe_m needs at least two models: the receiver A first, then one or more contributors",
        ));
    }
    if base.stats.is_none() {
        return Err(config_error(
            None,
            "base_model_stats",
            "safe_m needs the ancestor's activation statistics",
        ));
    }
    for (i, m) in models.iter().enumerate() {
        if m.stats.is_none() {
            return Err(config_error(
                None,
                &format!("models[{i}].stats"),
                format!(
                    "safe_m needs activation statistics for {}",
                    m.path.display()
                ),
            ));
        }
    }
    let receiver_params = &raw.models[0].parameters;
    let global = Lookup {
        model: None,
        global: &raw.parameters,
    };
    let presets: Vec<(&str, SafeMPreset)> = SAFE_M_PRESETS.iter().map(|p| (p.name, *p)).collect();
    let preset = global.choice("preset", SAFE_M_SPEC, &presets)?;
    let symmetric = global.flag("symmetric", preset.variant.symmetric)?;
    if !symmetric {
        for key in ["lambda_proj", "lambda_ortho"] {
            if let Some(v) = receiver_params.get(key) {
                return Err(config_error(
                    Some(&v.referenced),
                    key,
                    "the receiver (first model) gives nothing, so it takes no λ; set it on a contributor or globally (or use `symmetric: true`)",
                ));
            }
        }
    }
    let epsilon = global.number(
        "epsilon",
        EPSILON as f64,
        |e| e > 0.0 && e.is_finite(),
        "> 0",
    )? as f32;
    let fallback_weight = global.number("fallback_weight", 0.5, finite, "(finite)")? as f32;
    let receiver = Lookup {
        model: Some(receiver_params),
        global: &raw.parameters,
    }
    .election(epsilon, preset.density)?;
    let lambdas = |lookup: &Lookup<'_>| -> Result<(f32, f32)> {
        Ok((
            lookup.number("lambda_proj", preset.lambda_proj, finite, "(finite)")? as f32,
            lookup.number("lambda_ortho", preset.lambda_ortho, finite, "(finite)")? as f32,
        ))
    };
    let receiver_lambda = lambdas(&Lookup {
        model: Some(receiver_params),
        global: &raw.parameters,
    })?;
    let contributors = raw.models[1..]
        .iter()
        .map(|m| {
            let lookup = Lookup {
                model: Some(&m.parameters),
                global: &raw.parameters,
            };
            let (lambda_proj, lambda_ortho) = lambdas(&lookup)?;
            Ok(SafeMContributor {
                election: lookup.election(epsilon, preset.density)?,
                lambda_proj,
                lambda_ortho,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let variant = Variant {
        symmetric,
        receiver_lambda: if symmetric {
            receiver_lambda
        } else {
            (1.0, 1.0)
        },
        conflict: global.choice(
            "conflict",
            preset.variant.conflict,
            &[
                ("drop", ConflictRule::Drop),
                ("keep", ConflictRule::Keep),
                ("score", ConflictRule::Score),
            ],
        )?,
        salience: global.choice(
            "salience",
            preset.variant.salience,
            &[
                ("weight", Salience::Weight),
                ("task_vector", Salience::TaskVector),
            ],
        )?,
        rescale: global.flag("rescale", preset.variant.rescale)?,
        activation_lambda: global.choice(
            "layer_lambda",
            preset.variant.activation_lambda,
            &[("fixed", false), ("activation", true)],
        )?,
    };
    Ok(SafeMSettings {
        receiver,
        contributors,
        fallback_weight,
        epsilon,
        variant,
        preset: preset.name,
    })
}

/// Parses a byte size as mergekit's `--out-shard-size` does: a number with
/// an optional decimal suffix `K`, `M`, `B`/`G` (10³, 10⁶, 10⁹) or `T`, an
/// optional trailing `B` for bytes (`500M`, `5B`, `2GB`, `1.5G`, `123`).
pub fn parse_byte_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let (number, scale) = [
        ("TB", 1e12),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("T", 1e12),
        ("G", 1e9),
        ("B", 1e9),
        ("M", 1e6),
        ("K", 1e3),
    ]
    .iter()
    .find_map(|(suffix, scale)| {
        upper
            .strip_suffix(suffix)
            .map(|n| (n.trim().to_string(), *scale))
    })
    .unwrap_or((upper.clone(), 1.0));
    match number.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x * scale >= 1.0 => Ok((x * scale).round() as u64),
        _ => Err(format!("`{text}` is not a size; expected a positive number with an optional K, M, B/G or T suffix (e.g. 500M, 5B)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_like_mergekit() {
        assert_eq!(parse_byte_size("500M"), Ok(500_000_000));
        assert_eq!(parse_byte_size("5B"), Ok(5_000_000_000));
        assert_eq!(parse_byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_byte_size("1.5g"), Ok(1_500_000_000));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("lots").is_err());
    }

    const EXAMPLE: &str = "\
merge_method: safe_m
base_model: ./C                 # the common ancestor
base_model_stats: ./C.stats.safetensors
models:
  - model: ./A                  # the first listed model is the receiver
    stats: ./A.stats.safetensors
  - model: ./B
    stats: ./B.stats.safetensors
parameters:
  density: 0.2                  # k
  alpha: 1.0
  score: sas                    # or: ratio
  lambda_proj: 1.0
  lambda_ortho: 0.5
  fallback_weight: 0.5
dtype: float32                  # optional: output dtype; default the receiver's
";

    #[test]
    fn the_issue_example_parses() {
        let c = MergeConfig::from_yaml(EXAMPLE, Path::new("/m"), None).unwrap();
        assert_eq!(c.method, MergeMethod::SafeM);
        assert_eq!(c.base.as_ref().unwrap().path, Path::new("/m/C"));
        assert_eq!(
            c.models[1].stats.as_deref(),
            Some(Path::new("/m/B.stats.safetensors"))
        );
        assert_eq!(c.out_dtype, Some(Dtype::F32));
        let s = c.safe_m().unwrap();
        assert_eq!(
            s.receiver,
            ElectionParams {
                density: 0.2,
                form: ScoreForm::Sas { alpha: 1.0 }
            }
        );
        assert_eq!(s.contributors.len(), 1);
        assert_eq!(s.contributors[0].lambda_proj, 1.0);
        assert_eq!(s.contributors[0].lambda_ortho, 0.5);
        assert_eq!(s.fallback_weight, 0.5);
    }

    #[test]
    fn per_model_parameters_override_global_ones() {
        let text = EXAMPLE.replace(
            "    stats: ./B.stats.safetensors\n",
            "    stats: ./B.stats.safetensors\n    parameters:\n      density: 0.5\n      score: ratio\n      lambda_ortho: 0.25\n",
        );
        let c = MergeConfig::from_yaml(&text, Path::new("."), None).unwrap();
        let s = c.safe_m().unwrap();
        assert_eq!(s.receiver.density, 0.2);
        assert_eq!(s.contributors[0].election.density, 0.5);
        assert_eq!(
            s.contributors[0].election.form,
            ScoreForm::Ratio { epsilon: EPSILON }
        );
        assert_eq!(s.contributors[0].lambda_ortho, 0.25);
        assert_eq!(s.contributors[0].lambda_proj, 1.0);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_line() {
        let e = MergeConfig::from_yaml(&EXAMPLE.replace("dtype:", "dtyp:"), Path::new("."), None)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("unknown field `dtyp`"), "{e}");
        assert!(e.to_string().contains("line 16"), "{e}");
        let e = MergeConfig::from_yaml(&EXAMPLE.replace("alpha:", "alpah:"), Path::new("."), None)
            .unwrap_err();
        assert!(
            e.to_string().contains("`alpah`") && e.to_string().contains("line 11"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for (from, to, needle) in [
            ("density: 0.2", "density: 0", "in (0, 1]"),
            ("density: 0.2", "density: 1.5", "in (0, 1]"),
            ("score: sas", "score: snip", "`sas` or `ratio`"),
            ("alpha: 1.0", "alpha: -1", "≥ 0"),
            ("dtype: float32", "dtype: int8", "unsupported dtype"),
            (
                "merge_method: safe_m",
                "merge_method: frobnicate",
                "`frobnicate` is unknown",
            ),
            ("base_model: ./C ", "# ", "base_model"),
        ] {
            let e = MergeConfig::from_yaml(&EXAMPLE.replace(from, to), Path::new("."), None)
                .unwrap_err();
            assert!(e.to_string().contains(needle), "{from} → {to}: {e}");
        }
    }
}
