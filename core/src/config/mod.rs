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
pub mod tokenizer;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::methods::{Registry, SettingsInput};
use crate::safe_m::{ElectionParams, ScoreForm};
use params::Params;
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
    /// Path of a second statistics file holding its input Grams, for a
    /// method that takes means from `stats` (recorded on the shared
    /// meta-probe) and second moments from the model's own examples
    /// (`safe_m` with `reproject: gram`).
    #[serde(default)]
    pub grams: Option<String>,
    /// Per-model parameters; they override the global ones.
    #[serde(default)]
    pub parameters: RawParams,
}

/// One entry of `slices:` as written: sources whose layer ranges are
/// merged into the next output layers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlice {
    /// The models and their layer ranges.
    pub sources: Vec<RawSource>,
    /// Parameters of this slice; over the global ones, under a source's.
    #[serde(default)]
    pub parameters: RawParams,
    /// This slice's base model, instead of the config's.
    #[serde(default)]
    pub base_model: Option<String>,
}

/// One source of a slice as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Path of the checkpoint.
    pub model: String,
    /// The half-open decoder-layer range `[start, end)`.
    pub layer_range: Spanned<Vec<Spanned<i64>>>,
    /// Its activation statistics (whole-model; the range's layers are used).
    #[serde(default)]
    pub stats: Option<String>,
    /// Its Grams file, as `models[].grams`.
    #[serde(default)]
    pub grams: Option<String>,
    /// Parameters of this source; they win over the slice's and the global ones.
    #[serde(default)]
    pub parameters: RawParams,
}

/// One entry of `modules:` as written (mergekit's output module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModule {
    /// The module's models, each whole.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// The module's layer slices.
    #[serde(default)]
    pub slices: Option<Spanned<Vec<RawSlice>>>,
    /// Parameters of this module; over the global ones, under a slice's.
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
    /// mergekit's layer slices (frankenmerges, depth upscaling): the
    /// output's decoder layers, slice after slice, instead of `models:`.
    #[serde(default)]
    pub slices: Option<Spanned<Vec<RawSlice>>>,
    /// mergekit's multi-module layout: per module of a multimodal model
    /// (`text_decoder`, `vision_tower`, `multi_modal_projector`), its own
    /// `models:` or `slices:`, instead of the config's.
    #[serde(default)]
    pub modules: Option<Spanned<BTreeMap<String, Spanned<RawModule>>>>,
    /// mergekit's output vocabulary: `base`, `union` or a model.
    #[serde(default)]
    pub tokenizer_source: Option<Spanned<ParamValue>>,
    /// mergekit's vocabulary block: `source`, `tokens`, `pad_to_multiple_of`.
    #[serde(default)]
    pub tokenizer: Option<Spanned<tokenizer::RawTokenizer>>,
    /// The merged tokenizer's chat template: `auto`, a built-in name or Jinja text.
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
    /// RegMean++: the probe set re-run through the partial merge (SPEC §7).
    #[serde(default)]
    pub probe_set: Option<Spanned<String>>,
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
    /// Its second statistics file with Grams (`grams:`), when given.
    pub grams: Option<PathBuf>,
    /// The layers a `slices:` source takes (`None`: the whole model).
    pub window: Option<crate::layers::LayerWindow>,
    /// A PEFT LoRA adapter applied while reading (`model: path+adapter`).
    pub lora: Option<PathBuf>,
}

impl ModelRef {
    /// Whether two references read the same tensors: the same checkpoint,
    /// layer window and adapter.
    pub fn is_same(&self, other: &ModelRef) -> bool {
        same_model(&self.path, &other.path)
            && self.window == other.window
            && self.lora == other.lora
    }
}

pub use crate::methods::fam::FamSettings;
pub use crate::methods::safe_m::{SafeMContributor, SafeMSettings};
pub use crate::methods::MergeMethod;

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
    /// Tensors only some models hold are errors (`--strict`): FAM's tensors
    /// without a counterpart and dropped tensors; for mergekit-style
    /// methods, tensors some contributors lack and dropped tensors.
    pub strict: bool,
    /// What to do with NaN or infinite input weights.
    pub nan_policy: NanPolicy,
    /// Where the config came from (for messages and the report).
    pub source: Option<PathBuf>,
    /// The probe set a method runs itself (`regmean_plusplus`), resolved.
    pub probe_set: Option<PathBuf>,
    /// A `slices:` config: one plain config per slice, in output order,
    /// each over its sources' layer windows (empty for a `models:` config,
    /// which is its own single part). The fields above are the first
    /// slice's; `seed`, `strict`, `nan_policy` and `out_dtype` set on this
    /// config apply to every slice.
    pub slices: Vec<MergeConfig>,
    /// The chat template the output's tokenizer gets (`chat_template:`).
    pub chat_template: Option<crate::chat_template::ChatTemplate>,
    /// In a slice's config: the output layers it writes, for gradients
    /// (interpolated within the slice, as mergekit does) and messages.
    pub layer_window: Option<crate::layers::LayerWindow>,
    /// The output's vocabulary (`tokenizer_source:` / `tokenizer:`): every
    /// model's embedding and output rows are mapped into it. `None` keeps
    /// the reference model's tokenizer and rows as they are.
    pub vocabulary: Option<tokenizer::VocabularyConfig>,
    /// Under `modules:`, the modules the config lists (every tensor of
    /// every model must fall in one); empty otherwise. Each module's
    /// slices (or its one whole part) are parts in [`MergeConfig::slices`].
    pub modules: Vec<crate::modules::Module>,
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

impl MergeConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<MergeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        MergeConfig::from_yaml(&text, base_dir, Some(path))
    }

    /// Parses and validates YAML text; relative paths resolve against `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path, source: Option<&Path>) -> Result<MergeConfig> {
        MergeConfig::from_yaml_in(text, base_dir, source, &Registry::builtin())
    }

    /// [`MergeConfig::from_yaml`] with the methods of `registry` (the
    /// built-ins plus a library user's own, see [`Registry::with`]).
    pub fn from_yaml_in(
        text: &str,
        base_dir: &Path,
        source: Option<&Path>,
        registry: &Registry,
    ) -> Result<MergeConfig> {
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
        validate(raw, base_dir, source, registry).map_err(with_source)
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

    /// Indices (into `models`) of the contributors, as the method's
    /// [`crate::methods::Roles`] say: the models after the receiver, every
    /// model, or the models that are not the base (mergekit never treats
    /// the base as a contributor).
    pub fn contributors(&self) -> Vec<usize> {
        self.method.contributors(self)
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

/// A model reference as mergekit writes it: a path, or `path+adapter` (a
/// model with a PEFT LoRA adapter applied), split at the last `+` unless
/// the whole text names an existing file or directory.
pub(crate) fn model_reference(base_dir: &Path, text: &str) -> (PathBuf, Option<PathBuf>) {
    let whole = resolve(base_dir, text);
    match text.rsplit_once('+') {
        Some((model, adapter)) if !whole.exists() && !model.is_empty() && !adapter.is_empty() => {
            (resolve(base_dir, model), Some(resolve(base_dir, adapter)))
        }
        _ => (whole, None),
    }
}

/// `path` relative to `base_dir`, with `.` components dropped so that
/// reports and messages show `dir/A` rather than `dir/./A`.
pub(crate) fn resolve(base_dir: &Path, path: &str) -> PathBuf {
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

pub(crate) fn check_keys(
    params: &RawParams,
    allowed: &[&str],
    place: &str,
    method: &str,
) -> Result<()> {
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
pub(crate) struct Lookup<'a> {
    pub(crate) model: Option<&'a RawParams>,
    pub(crate) global: &'a RawParams,
}

impl<'a> Lookup<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Spanned<ParamValue>> {
        self.model
            .and_then(|m| m.get(key))
            .or_else(|| self.global.get(key))
    }

    pub(crate) fn number(
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

    pub(crate) fn score_form(&self, epsilon: f32) -> Result<ScoreForm> {
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

    pub(crate) fn election(&self, epsilon: f32, density: f64) -> Result<ElectionParams> {
        Ok(ElectionParams {
            density: self.number("density", density, |k| k > 0.0 && k <= 1.0, "in (0, 1]")?,
            form: self.score_form(epsilon)?,
        })
    }

    /// A boolean SAFE-M key.
    pub(crate) fn flag(&self, key: &str, default: bool) -> Result<bool> {
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
    pub(crate) fn choice<T: Copy>(
        &self,
        key: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T> {
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

pub(crate) fn finite(x: f64) -> bool {
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

fn validate(
    raw: RawConfig,
    base_dir: &Path,
    source: Option<&Path>,
    registry: &Registry,
) -> Result<MergeConfig> {
    let method = registry.find(&raw.merge_method.value).ok_or_else(|| {
        let supported = registry.names();
        let why = if crate::methods::REFUSED.contains(&raw.merge_method.value.as_str()) {
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
    if let Some(modules) = &raw.modules {
        return validate_modules(&raw, modules, base_dir, source, registry, method);
    }
    if let Some(slices) = &raw.slices {
        return validate_slices(&raw, slices, base_dir, source, registry, method, None);
    }
    if !method.uses_name_map() {
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
    if let Some(p) = raw.probe_set.as_ref().filter(|_| !method.uses_probe_set()) {
        return Err(config_error(
            Some(&p.referenced),
            "probe_set",
            format!(
                "`probe_set` is for methods that run the models themselves (regmean_plusplus), not {}",
                method.as_str()
            ),
        ));
    }
    let models: Vec<ModelRef> = raw
        .models
        .iter()
        .map(|m| {
            let (path, lora) = model_reference(base_dir, &m.model);
            ModelRef {
                path,
                stats: m.stats.as_deref().map(|s| resolve(base_dir, s)),
                grams: m.grams.as_deref().map(|s| resolve(base_dir, s)),
                window: None,
                lora,
            }
        })
        .collect();
    if let Some(i) = raw.models.iter().position(|m| m.grams.is_some()) {
        if !method.takes_grams_file() {
            return Err(config_error(
                None,
                &format!("models[{i}].grams"),
                format!(
                    "`grams` is for safe_m with `reproject: gram`; {} reads Grams from `stats`",
                    method.as_str()
                ),
            ));
        }
    }
    let base = raw.base_model.as_deref().map(|b| {
        let (path, lora) = model_reference(base_dir, b);
        ModelRef {
            path,
            stats: raw
                .base_model_stats
                .as_deref()
                .map(|s| resolve(base_dir, s)),
            grams: None,
            window: None,
            lora,
        }
    });
    let with_lora = base.iter().chain(&models).any(|m| m.lora.is_some());
    if with_lora && method.uses_probe_set() {
        return Err(config_error(
            None,
            "models",
            format!(
                "{} runs the models on a probe set itself, which a LoRA reference (`model+adapter`) cannot take part in; merge the adapter first",
                method.as_str()
            ),
        ));
    }
    if raw.base_model_stats.is_some() && raw.base_model.is_none() {
        return Err(config_error(
            None,
            "base_model_stats",
            "given without `base_model`",
        ));
    }
    let settings = method.settings(&SettingsInput {
        raw: &raw,
        models: &models,
        base: base.as_ref(),
        base_dir,
    })?;
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
        probe_set: raw.probe_set.as_ref().map(|p| resolve(base_dir, &p.value)),
        slices: Vec::new(),
        chat_template: match &raw.chat_template {
            None => None,
            Some(v) => Some(match &v.value {
                ParamValue::Text(t) => crate::chat_template::ChatTemplate::parse(t)
                    .map_err(|why| config_error(Some(&v.referenced), "chat_template", why))?,
                other => {
                    return Err(config_error(
                        Some(&v.referenced),
                        "chat_template",
                        format!("expected `auto`, a template name or Jinja text, found {other}"),
                    ))
                }
            }),
        },
        layer_window: None,
        vocabulary: tokenizer::vocabulary(&raw, base_dir)?,
        modules: Vec::new(),
    })
}

/// A `modules:` config: each module's slices (or its `models:`, one part
/// whose models carry a whole-module window) become parts, module after
/// module in [`MODULES`](crate::modules::MODULES) order; parameters: slice
/// source over slice over module over global, as mergekit's.
fn validate_modules(
    raw: &RawConfig,
    modules: &Spanned<BTreeMap<String, Spanned<RawModule>>>,
    base_dir: &Path,
    source: Option<&Path>,
    registry: &Registry,
    method: MergeMethod,
) -> Result<MergeConfig> {
    use crate::modules::{Module, MODULES};
    let at = Some(&modules.referenced);
    if !raw.models.is_empty() || raw.slices.is_some() {
        return Err(config_error(
            at,
            "modules",
            "a config has one of `models:`, `slices:` or `modules:`, not several",
        ));
    }
    if modules.value.is_empty() {
        return Err(config_error(at, "modules", "lists no module"));
    }
    if !method.runs_in_slices() {
        return Err(config_error(
            at,
            "modules",
            format!(
                "{} runs the models on a probe set, which needs whole models; use `models:`",
                method.as_str()
            ),
        ));
    }
    let mut listed = Vec::new();
    for (name, def) in &modules.value {
        let module = Module::parse(name).ok_or_else(|| {
            let known: Vec<String> = MODULES.iter().map(|m| format!("`{m}`")).collect();
            config_error(
                Some(&def.referenced),
                &format!("modules.{name}"),
                format!(
                    "`{name}` is not a module flatmerge knows; modules are {}",
                    known.join(", ")
                ),
            )
        })?;
        listed.push(module);
    }
    listed.sort();
    let mut parts = Vec::new();
    for module in MODULES.into_iter().filter(|m| listed.contains(m)) {
        let def = &modules.value[module.as_str()];
        let key = format!("modules.{module}");
        let mut parameters = raw.parameters.clone();
        parameters.extend(def.value.parameters.clone());
        let module_raw = RawConfig {
            models: Vec::new(),
            slices: None,
            modules: None,
            parameters,
            ..raw.clone()
        };
        match (&def.value.slices, def.value.models.is_empty()) {
            (Some(slices), true) => {
                let sliced = validate_slices(
                    &module_raw,
                    slices,
                    base_dir,
                    source,
                    registry,
                    method,
                    Some(module),
                )?;
                parts.extend(sliced.slices);
            }
            (None, false) => {
                let part_raw = RawConfig {
                    models: def.value.models.clone(),
                    ..module_raw
                };
                let mut part = validate(part_raw, base_dir, source, registry).map_err(|e| {
                    let message = format!("{} (in {key})", e.message());
                    e.with_message(message)
                })?;
                let window = crate::layers::LayerWindow::whole_module(module, key.clone());
                for m in part.base.iter_mut().chain(part.models.iter_mut()) {
                    m.window = Some(window.clone());
                }
                part.layer_window = Some(window);
                parts.push(part);
            }
            _ => {
                return Err(config_error(
                    Some(&def.referenced),
                    &key,
                    "gives either `models:` or `slices:`, exactly one",
                ))
            }
        }
    }
    for part in &mut parts {
        part.modules = listed.clone();
    }
    let mut whole = parts[0].clone();
    whole.slices = parts;
    whole.modules = listed;
    Ok(whole)
}

/// A `slices:` config (the config's, or a module's): each slice becomes a
/// plain config over its sources (parameters: source over slice over
/// global), whose models carry their layer windows; output layers are
/// numbered on across slices.
fn validate_slices(
    raw: &RawConfig,
    slices: &Spanned<Vec<RawSlice>>,
    base_dir: &Path,
    source: Option<&Path>,
    registry: &Registry,
    method: MergeMethod,
    module: Option<crate::modules::Module>,
) -> Result<MergeConfig> {
    let at = Some(&slices.referenced);
    let scope = module.map_or(String::new(), |m| format!("modules.{m}."));
    if !raw.models.is_empty() {
        return Err(config_error(
            at,
            "slices",
            "a config has either `models:` or `slices:`, not both",
        ));
    }
    if slices.value.is_empty() {
        return Err(config_error(
            at,
            &format!("{scope}slices"),
            "lists no slice",
        ));
    }
    if !method.runs_in_slices() {
        return Err(config_error(
            at,
            "slices",
            format!(
                "{} runs the models on a probe set, which needs whole models; use `models:`",
                method.as_str()
            ),
        ));
    }
    let last = slices.value.len() - 1;
    let mut out_first = 0usize;
    let mut parts = Vec::with_capacity(slices.value.len());
    for (s, slice) in slices.value.iter().enumerate() {
        if slice.sources.is_empty() {
            return Err(config_error(
                at,
                &format!("{scope}slices[{s}].sources"),
                "lists no source",
            ));
        }
        let mut windows = Vec::with_capacity(slice.sources.len());
        for (i, src) in slice.sources.iter().enumerate() {
            let key = format!("{scope}slices[{s}].sources[{i}].layer_range");
            let range = &src.layer_range;
            let (first, end) = match range.value.as_slice() {
                [a, b] => (a.value, b.value),
                _ => {
                    return Err(config_error(
                        Some(&range.referenced),
                        &key,
                        "expected two layer indices `[start, end]` (half-open)",
                    ))
                }
            };
            if first < 0 || end <= first {
                return Err(config_error(
                    Some(&range.referenced),
                    &key,
                    format!("[{first}, {end}] is empty or negative; a range is half-open `[start, end)` with 0 ≤ start < end"),
                ));
            }
            let count = (end - first) as usize;
            if let Some(w) = windows.first() {
                let w: &crate::layers::LayerWindow = w;
                if w.count != count {
                    return Err(config_error(
                        Some(&range.referenced),
                        &key,
                        format!(
                            "spans {count} layers, but {scope}slices[{s}].sources[0] spans {}; every source of a slice spans the same number of layers",
                            w.count
                        ),
                    ));
                }
            }
            windows.push(crate::layers::LayerWindow {
                first: first as usize,
                count,
                out_first,
                embeddings: s == 0,
                head: s == last,
                key,
                slice: s,
                module,
                whole: false,
            });
        }
        let mut parameters = raw.parameters.clone();
        parameters.extend(slice.parameters.clone());
        let part_raw = RawConfig {
            models: slice
                .sources
                .iter()
                .map(|src| RawModel {
                    model: src.model.clone(),
                    stats: src.stats.clone(),
                    grams: src.grams.clone(),
                    parameters: src.parameters.clone(),
                })
                .collect(),
            parameters,
            base_model: slice.base_model.clone().or_else(|| raw.base_model.clone()),
            slices: None,
            ..raw.clone()
        };
        let mut part = validate(part_raw, base_dir, source, registry).map_err(|e| {
            let message = format!("{} (in {scope}slices[{s}])", e.message());
            e.with_message(message)
        })?;
        for (model, window) in part.models.iter_mut().zip(&windows) {
            model.window = Some(window.clone());
        }
        if let Some(base) = &mut part.base {
            // The base takes the window of the source that is the base
            // model (mergekit's slices list it), else the first source's.
            let own = part
                .models
                .iter()
                .find(|m| same_model(&m.path, &base.path) && m.lora == base.lora)
                .unwrap_or(&part.models[0]);
            base.window = own.window.clone();
        }
        part.layer_window = Some(windows[0].clone());
        out_first += windows[0].count;
        parts.push(part);
    }
    let mut whole = parts[0].clone();
    whole.slices = parts;
    Ok(whole)
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
    use crate::safe_m::EPSILON;

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
        assert_eq!(c.method.as_str(), "safe_m");
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
