//! The method registry: one module per merge method (or per family that
//! shares a kernel), each implementing [`Method`], listed once in
//! [`BUILTIN`].
//!
//! A method declares everything the rest of the library needs to know
//! about it: its config name, its parameters (kinds, defaults, ranges and
//! scopes, which drive validation, the "unknown key" errors and the
//! README's reference table), which inputs and statistics it needs (checked
//! when the config is validated and when the merge is planned), the rule of
//! each output tensor (its plan), any whole-model work done before the
//! first tensor is written, and its per-tensor kernel. The config, the
//! planner, the engine and the report call these and never name a method.
//!
//! Adding a method: write one module here implementing [`Method`], add one
//! line to [`BUILTIN`], an example config under `tests/method_examples/`
//! and its digest (see `docs/methods.md`, "Adding a method"). A library user
//! can also merge with a method of their own, without touching flatmerge:
//! [`Registry::with`] and [`crate::config::MergeConfig::from_yaml_in`].

pub mod arcee_fusion;
pub mod fam;
pub mod karcher;
pub mod linear;
pub mod mergekit;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod regmean;
pub mod regmean_plusplus;
pub mod safe_m;
pub mod sce;
pub mod slerp;
pub mod sparsify;
pub mod subspace;
pub mod ties_reference;

use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings, ModelRef, RawConfig};
use crate::engine::MergePart;
use crate::error::Result;
use crate::io::TensorView;
use crate::plan::{Inputs, Plan, TensorPlan};
use crate::report::TensorOutcome;
use std::any::Any;
use std::fmt;
use std::path::Path;

/// Which listed models play which part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// The first model receives, the others contribute; tensor names,
    /// dtypes and side files come from the receiver (SAFE-M, FAM).
    ReceiverFirst,
    /// Every listed model is an input, the base too when it is listed
    /// (mergekit's `linear`, `passthrough`); names come from the base when
    /// there is one, else from the first model.
    AllModels,
    /// The models that are not the base contribute task vectors over it
    /// (mergekit never counts the base as a contributor); names come from
    /// the base.
    OverBase,
}

/// Whether a method takes `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// It must be given.
    Required,
    /// It may be given.
    Optional,
    /// It must not be given.
    Forbidden,
}

/// Which activation statistics a method needs of every model (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// None; `stats:` keys are refused.
    None,
    /// Means (`x_mean`, `y_mean`), the base's too.
    Means,
    /// Means and per-example rows (`x_rows`, `y_rows`).
    Rows,
    /// Means and input second moments (`x_gram`, SPEC §4 version 2).
    Grams,
}

/// What a method computed before the first tensor: kept for its tensors,
/// and optionally a section of the report (`(key, value)`).
pub struct Prepared {
    /// The method's whole-model state, handed back to every tensor.
    pub state: Box<dyn Any + Send + Sync>,
    /// A top-level section of `merge_report.json`.
    pub report: Option<(&'static str, serde_json::Value)>,
}

impl Prepared {
    /// Nothing computed in advance.
    pub fn nothing() -> Prepared {
        Prepared {
            state: Box::new(()),
            report: None,
        }
    }
}

/// What a method's settings are validated from.
pub struct SettingsInput<'a> {
    /// The config as written.
    pub raw: &'a RawConfig,
    /// The models, paths resolved.
    pub models: &'a [ModelRef],
    /// The base model, paths resolved.
    pub base: Option<&'a ModelRef>,
    /// The directory relative paths resolve against.
    pub base_dir: &'a Path,
}

/// One output tensor to merge: its plan and the contributors' views.
pub struct TensorInput<'a> {
    /// The plan of the tensor.
    pub plan: &'a TensorPlan,
    /// Each participating contributor's tensor (`plan.contributors` order).
    pub contributors: Vec<TensorView<'a>>,
}

/// A merge method. Implementations are stateless `static`s; everything a
/// merge computes lives in its [`Prepared`] state and its outputs.
pub trait Method: Sync {
    /// The config name (`merge_method:`).
    fn name(&self) -> &'static str;

    /// One line for the README's method table.
    fn summary(&self) -> &'static str;

    /// Which models play which part.
    fn roles(&self) -> Roles;

    /// Whether `base_model` is taken.
    fn base_model(&self) -> BaseModel;

    /// The statistics every model needs.
    fn statistics(&self) -> Statistics {
        Statistics::None
    }

    /// Whether the top-level `name_map` and `groups` keys apply (FAM).
    fn uses_name_map(&self) -> bool {
        false
    }

    /// Whether the top-level `probe_set` key applies (a method that runs
    /// the models through the native probes itself).
    fn uses_probe_set(&self) -> bool {
        false
    }

    /// Whether it can merge a `slices:` entry: a window of each model's
    /// layers. Not a method that runs whole models on a probe set.
    fn runs_in_slices(&self) -> bool {
        !self.uses_probe_set()
    }

    /// Whether the per-model `grams:` key applies (a second statistics
    /// file with Grams beside the means of `stats:`).
    fn takes_grams_file(&self) -> bool {
        false
    }

    /// The parameters it accepts (name, scope, kind, default).
    fn params(&self) -> Vec<ParamDef>;

    /// Validates the config's parameters and model list into settings.
    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings>;

    /// Adjusts the opened inputs before planning, reading no tensor data
    /// (FAM: adds the stacked tensors its name map's `concat` rules build
    /// from the contributor's).
    fn map_inputs(&self, _config: &MergeConfig, _inputs: &mut Inputs) -> Result<()> {
        Ok(())
    }

    /// The rule of every output tensor, checked before any tensor data is
    /// read; reports every problem at once.
    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan>;

    /// Whole-model work before the first tensor is written.
    fn prepare(&self, _merge: &MergePart) -> Result<Prepared> {
        Ok(Prepared::nothing())
    }

    /// Merges one tensor whose rule is not a plain copy (the engine copies
    /// those itself); returns the encoded bytes and what it measured.
    fn merge_tensor(
        &self,
        merge: &MergePart,
        state: &(dyn Any + Send + Sync),
        tensor: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)>;

    /// The resolved parameters, as `merge_report.json` shows them.
    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value;
}

/// A method as the config holds it: a handle to a registered [`Method`].
/// Two handles are equal when they name the same method.
#[derive(Clone, Copy)]
pub struct MergeMethod(&'static dyn Method);

impl MergeMethod {
    /// The handle of `method`.
    pub fn new(method: &'static dyn Method) -> MergeMethod {
        MergeMethod(method)
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        self.0.name()
    }

    /// A built-in method by its config name.
    pub fn parse(name: &str) -> Option<MergeMethod> {
        Registry::builtin().find(name)
    }

    /// Every built-in method, in registry order.
    pub fn all() -> impl Iterator<Item = MergeMethod> {
        BUILTIN.iter().map(|m| MergeMethod(*m))
    }

    /// The method itself.
    pub fn method(self) -> &'static dyn Method {
        self.0
    }

    /// The indices (into `models`) of the contributors under these roles.
    pub fn contributors(self, config: &MergeConfig) -> Vec<usize> {
        let all = 0..config.models.len();
        match self.0.roles() {
            Roles::ReceiverFirst => (1..config.models.len()).collect(),
            Roles::AllModels => all.collect(),
            Roles::OverBase => all
                .filter(|&i| {
                    config
                        .base
                        .as_ref()
                        .is_none_or(|b| !b.is_same(&config.models[i]))
                })
                .collect(),
        }
    }
}

impl std::ops::Deref for MergeMethod {
    type Target = dyn Method;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for MergeMethod {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MergeMethod {}

impl fmt::Debug for MergeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MergeMethod({})", self.as_str())
    }
}

impl fmt::Display for MergeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every built-in method, in the order the README lists them.
pub const BUILTIN: &[&dyn Method] = &[
    &safe_m::SafeM,
    &fam::Fam,
    &linear::Linear,
    &sparsify::TASK_ARITHMETIC,
    &sparsify::TIES,
    &sparsify::DARE_LINEAR,
    &sparsify::DARE_TIES,
    &sparsify::BREADCRUMBS,
    &sparsify::BREADCRUMBS_TIES,
    &sparsify::DELLA,
    &sparsify::DELLA_LINEAR,
    &sce::Sce,
    &ram::RAM,
    &ram::RAMPLUS_TL,
    &ties_reference::TiesReferenceMethod,
    &slerp::Slerp,
    &nuslerp::NuSlerp,
    &multislerp::MultiSlerp,
    &karcher::Karcher,
    &arcee_fusion::ArceeFusion,
    &nearswap::Nearswap,
    &model_stock::ModelStock,
    &passthrough::Passthrough,
    &regmean::RegMean,
    &regmean_plusplus::RegMeanPlusPlus,
    &subspace::TSV,
    &subspace::ISO_C,
    &subspace::ISO_CTS,
    &subspace::WUDI,
];

/// mergekit methods flatmerge does not run yet, refused by name.
pub const REFUSED: [&str; 2] = ["core_space", "task_adapter"];

/// The methods a config may name: the built-ins, plus any a library user adds.
#[derive(Clone)]
pub struct Registry {
    methods: Vec<&'static dyn Method>,
}

impl Registry {
    /// The built-in methods.
    pub fn builtin() -> Registry {
        Registry {
            methods: BUILTIN.to_vec(),
        }
    }

    /// This registry with `method` added (it wins over a method of the same name).
    pub fn with(mut self, method: &'static dyn Method) -> Registry {
        self.methods.retain(|m| m.name() != method.name());
        self.methods.push(method);
        self
    }

    /// The method called `name`.
    pub fn find(&self, name: &str) -> Option<MergeMethod> {
        self.methods
            .iter()
            .find(|m| m.name() == name)
            .map(|m| MergeMethod(*m))
    }

    /// Every method's name, in registry order.
    pub fn names(&self) -> Vec<&'static str> {
        self.methods.iter().map(|m| m.name()).collect()
    }
}

fn describe_default(def: &ParamDef) -> String {
    match def.default {
        // Defaults held as f32 widened to f64 (ε) read as the f32 a user writes.
        ParamDefault::Number(x) if (x as f32) as f64 == x => format!("{}", x as f32),
        ParamDefault::Number(x) => format!("{x}"),
        ParamDefault::Bool(b) => format!("`{b}`"),
        ParamDefault::Text(t) => format!("`{t}`"),
        ParamDefault::Required => "required".to_string(),
    }
}

fn describe_kind(kind: Kind) -> String {
    match kind {
        Kind::Number { min, max, min_open } => match (min == f64::MIN, max == f64::MAX) {
            (true, true) => "number".to_string(),
            (false, true) => format!("{} {min}", if min_open { ">" } else { "≥" }),
            _ => format!("{}{min}, {max}]", if min_open { "(" } else { "[" }),
        },
        Kind::Bool => "bool".to_string(),
        Kind::Choice(words) => words.join(" \\| "),
        Kind::NumberList => "numbers".to_string(),
    }
}

/// The README's method table, generated from the registry (a test checks
/// that the README holds exactly this text).
pub fn reference_table() -> String {
    let mut out = String::from(
        "| method | what it does | base model | statistics | parameters (scope: values = default) |\n|---|---|---|---|---|\n",
    );
    for m in BUILTIN {
        let base = match m.base_model() {
            BaseModel::Required => "required",
            BaseModel::Optional => "optional",
            BaseModel::Forbidden => "—",
        };
        let stats = match m.statistics() {
            Statistics::None => "—",
            Statistics::Means => "means",
            Statistics::Rows => "means + rows",
            Statistics::Grams => "means + Grams",
        };
        let params: Vec<String> = m
            .params()
            .iter()
            .map(|d| {
                let scope = match d.scope {
                    Scope::PerModel => "per model",
                    Scope::Shared => "global",
                };
                format!(
                    "`{}` ({scope}: {} = {})",
                    d.name,
                    describe_kind(d.kind),
                    describe_default(d)
                )
            })
            .collect();
        out.push_str(&format!(
            "| `{}` | {} | {base} | {stats} | {} |\n",
            m.name(),
            m.summary(),
            if params.is_empty() {
                "—".to_string()
            } else {
                params.join("; ")
            }
        ));
    }
    out
}
