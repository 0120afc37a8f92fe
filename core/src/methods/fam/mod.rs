//! FAM (SPEC §2): flat-align merging of models without a common
//! ancestor — name maps, neuron groups, exact alignment by activation
//! correlation, flat projection fusion and the unsupervised λ search. This
//! module holds the settings and the plan; [`tensor`] aligns and fuses on
//! checkpoint data with the kernels of [`crate::fam`].

pub mod tensor;

use super::{BaseModel, Method, Prepared, Roles, SettingsInput, Statistics, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{
    check_keys, config_error, finite, resolve, GroupsSpec, Lookup, MergeConfig, MethodSettings,
    NameMapSpec, ParamValue,
};
use crate::engine::{MergePart, Model};
use crate::error::{Error, ErrorKind, Result};
use crate::groups::NeuronGroup;
use crate::io::{Checkpoint, TensorInfo};
use crate::plan::{
    float_check, layer_count, layer_of, snake, CopyReason, DroppedTensor, GroupPlan, Input, Inputs,
    Plan, Problems, TensorPlan, TensorRule,
};
use crate::report::{num, TensorOutcome};
use crate::safe_m::EPSILON;
use serde_json::{json, Value};
use std::any::Any;
use std::collections::BTreeMap;

/// The method.
pub struct Fam;

/// FAM's whole-model results: the alignments and the λ used.
struct FamState {
    alignments: Vec<tensor::GroupAlignment>,
    lambdas: (f32, f32),
    grid: Option<tensor::LambdaGrid>,
    /// The map used (the one `auto` picked) and how it accounts for the pair.
    name_map: (String, bool, crate::namemap::Accounting),
    /// [`vocabulary_mismatches`].
    vocabulary: Vec<Value>,
}

/// The report's account of a name map: which map, whether `auto` picked
/// it, and the tensors in each class (SPEC §5).
pub fn accounting_report(source: &str, detected: bool, acc: &crate::namemap::Accounting) -> Value {
    json!({
        "map": source,
        "detected": detected,
        "mapped": acc.mapped.len(),
        "one_to_many": acc.one_to_many.iter().map(|(b, a)| json!({"b": b, "a": a})).collect::<Vec<_>>(),
        "concatenated": acc.concatenated.iter().map(|c| json!({"b": c.parts, "as": c.name, "a": c.targets})).collect::<Vec<_>>(),
        "kept_from_a": acc.kept_from_a,
        "dropped_from_b": acc.dropped_from_b,
        "unaccounted_a": acc.unaccounted_a,
        "unaccounted_b": acc.unaccounted_b,
    })
}

impl FamState {
    fn report(&self) -> Value {
        let (source, detected, acc) = &self.name_map;
        json!({
            "name_map": accounting_report(source, *detected, acc),
            "vocabulary": self.vocabulary,
            "groups": self.alignments.iter().map(tensor::GroupAlignment::summary).collect::<Vec<_>>(),
            "mapping": self.alignments.iter().map(|a| json!({"group": a.name, "b_neuron_of_a": a.matching})).collect::<Vec<_>>(),
            "lambda_proj": self.lambdas.0,
            "lambda_ortho": self.lambdas.1,
            "lambda_grid": self.grid.as_ref().map(|g| g.iter().map(|(p, o, l)| json!({"lambda_proj": p, "lambda_ortho": o, "loss": l})).collect::<Vec<_>>()),
        })
    }
}

/// FAM's alignment of every neuron group (SPEC §2.2–2.3), from the
/// statistics alone; empty for a merge with another method.
pub fn alignments(merge: &MergePart) -> Result<Vec<tensor::GroupAlignment>> {
    match merge.config().fam() {
        Some(settings) => tensor::align(settings, merge.inputs(), merge.plan()),
        None => Ok(Vec::new()),
    }
}

impl Method for Fam {
    fn name(&self) -> &'static str {
        "fam"
    }

    fn summary(&self) -> &'static str {
        "FAM: neuron alignment by activation correlation, flat projection fusion (SPEC §2)"
    }

    fn roles(&self) -> Roles {
        Roles::ReceiverFirst
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Forbidden
    }

    fn statistics(&self) -> Statistics {
        Statistics::Rows
    }

    fn uses_name_map(&self) -> bool {
        true
    }

    /// Adds to B the tensors the name map stacks from B's rows (CogVLM's
    /// fused qkv from LLaVA's q, k, v), so that planning and merging see
    /// one tensor of A's shape.
    fn map_inputs(&self, config: &MergeConfig, inputs: &mut Inputs) -> Result<()> {
        let Some(settings) = config.fam() else {
            return Ok(());
        };
        let (map, _) = resolve_name_map(settings, inputs)?;
        let b = inputs.contributors[0];
        let checkpoint = &mut inputs.models[b].checkpoint;
        for c in stacks(&map, checkpoint) {
            checkpoint.stack(&c.name, &c.parts)?;
        }
        Ok(())
    }

    fn takes_grams_file(&self) -> bool {
        true
    }

    /// SPEC §2.4's defaults (`preset: sketch` changes `density`, `fos_min`
    /// and `beta`).
    fn params(&self) -> Vec<ParamDef> {
        let shared = |name, kind, default| ParamDef {
            name,
            scope: Scope::Shared,
            kind,
            default,
        };
        use ParamDefault::{Bool, Number, Text};
        vec![
            shared("density", Kind::DENSITY, Number(1.0)),
            shared("fos_min", Kind::ANY, Number(-1.0)),
            shared("sigma", Kind::POSITIVE, Number(0.1)),
            shared("beta", Kind::NON_NEGATIVE, Number(0.0)),
            shared("lambda_proj", Kind::ANY, Number(0.5)),
            shared("lambda_ortho", Kind::ANY, Number(0.5)),
            shared("epsilon", Kind::POSITIVE, Number(EPSILON as f64)),
            shared(
                "preset",
                Kind::Choice(&["default", "sketch"]),
                Text("default"),
            ),
            shared(
                "matching",
                Kind::Choice(&["exact", "greedy"]),
                Text("exact"),
            ),
            shared(
                "similarity",
                Kind::Choice(&["pearson", "raw_cosine"]),
                Text("pearson"),
            ),
            shared("lambda_search", Kind::Bool, Bool(false)),
            shared(
                "lambda_grid",
                Kind::NumberList,
                Text("[0, 0.25, 0.5, 0.75, 1]"),
            ),
            shared(
                "fusion",
                Kind::Choice(&["flat", "least_squares"]),
                Text("flat"),
            ),
            shared(
                "gram_alpha",
                Kind::UNIT,
                Number(crate::least_squares::DEFAULT_ALPHA),
            ),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        Ok(MethodSettings::Fam(fam_settings(input)?))
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let settings = config
            .fam()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "fam needs FAM settings"))?;
        plan_fam(config, settings, inputs)
    }

    /// The alignments and λ (searched when asked), before any tensor is written.
    fn prepare(&self, merge: &MergePart) -> Result<Prepared> {
        let settings = merge
            .config()
            .fam()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "fam needs FAM settings"))?;
        if settings.gram_fusion.is_some() {
            tensor::check_grams(merge.inputs(), merge.plan())?;
        }
        let alignments = alignments(merge)?;
        let (lambdas, grid) = if settings.lambda_search {
            let view = |receiver: bool, name: &str| merge.fam_view(receiver, name);
            let (chosen, grid) =
                tensor::lambda_search(settings, merge.inputs(), merge.plan(), &alignments, view)?;
            (chosen, Some(grid))
        } else {
            ((settings.lambda_proj, settings.lambda_ortho), None)
        };
        let (map, accounting) = resolve_name_map(settings, merge.inputs())?;
        let state = FamState {
            alignments,
            lambdas,
            grid,
            name_map: (map.source.clone(), settings.name_map.is_auto(), accounting),
            vocabulary: vocabulary_mismatches(merge.plan(), merge.inputs()),
        };
        Ok(Prepared {
            report: Some(("fam", state.report())),
            state: Box::new(state),
        })
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let tensor = input.plan;
        let settings = merge
            .config()
            .fam()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "fam needs FAM settings"))?;
        let state = state
            .downcast_ref::<FamState>()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "FAM tensors need the alignment"))?;
        let bytes = tensor::FamTensor {
            settings,
            lambdas: state.lambdas,
            plan: tensor,
            a: merge.view(Model::Receiver, &tensor.name)?,
            b: input.contributors[0],
            alignments: &state.alignments,
            inputs: merge.inputs(),
        }
        .merge()?;
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> Value {
        let Some(f) = config.fam() else {
            return Value::Null;
        };
        let mut p = json!({
            "preset": f.preset,
            "density": f.density,
            "fos_min": num(f.fos_min),
            "sigma": num(f.sigma),
            "beta": num(f.beta),
            "lambda_proj": num(f.lambda_proj),
            "lambda_ortho": num(f.lambda_ortho),
            "epsilon": num(f.epsilon),
            "matching": if f.greedy { "greedy" } else { "exact" },
            "similarity": if f.raw_cosine { "raw_cosine" } else { "pearson" },
            "lambda_search": f.lambda_search,
            "lambda_grid": f.lambda_grid.iter().map(|&x| num(x)).collect::<Vec<_>>(),
            "name_map": f.name_map.source,
            "strict": config.strict,
        });
        // Only the least-squares fusion adds keys: flat merges report what they did before.
        if let Some(alpha) = f.gram_fusion {
            p["fusion"] = json!({"form": "least_squares", "gram_alpha": alpha});
        }
        p
    }
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
    /// `fusion: least_squares`: its `gram_alpha` (`None`: the flat
    /// projection fusion of SPEC §2.4).
    pub gram_fusion: Option<f64>,
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
            && self.gram_fusion == other.gram_fusion
    }
}

fn fam_settings(input: &SettingsInput<'_>) -> Result<FamSettings> {
    let SettingsInput {
        raw,
        models,
        base,
        base_dir,
    } = *input;
    let global_keys: Vec<&str> = Fam.params().iter().map(|d| d.name).collect();
    check_keys(&raw.parameters, &global_keys, "`parameters`", "fam")?;
    for (i, m) in raw.models.iter().enumerate() {
        check_keys(
            &m.parameters,
            &[],
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
        Some(NameMapSpec::Builtin(name)) if name == crate::namemap::AUTO => {
            crate::namemap::NameMap::auto()
        }
        Some(NameMapSpec::Builtin(name)) => {
            crate::namemap::NameMap::builtin(name).ok_or_else(|| {
                config_error(
                    name_map_at,
                    "name_map",
                    format!(
                        "unknown built-in name map `{name}`; built in: auto, identity, {}",
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
    let gram_fusion = match text("fusion", "flat", &["flat", "least_squares"])?.as_str() {
        "least_squares" => Some(global.number(
            "gram_alpha",
            crate::least_squares::DEFAULT_ALPHA,
            |a| (0.0..=1.0).contains(&a),
            "[0, 1]",
        )?),
        _ => {
            if let Some(v) = raw.parameters.get("gram_alpha") {
                return Err(config_error(
                    Some(&v.referenced),
                    "gram_alpha",
                    "`gram_alpha` shrinks the Grams of `fusion: least_squares`; set it or drop the key",
                ));
            }
            if let Some(i) = models.iter().position(|m| m.grams.is_some()) {
                return Err(config_error(
                    None,
                    &format!("models[{i}].grams"),
                    "`grams` files are read by `fusion: least_squares` only; set it or drop them",
                ));
            }
            None
        }
    };
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
        gram_fusion,
    })
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
/// The name map of a FAM merge: the configured one, or for `name_map:
/// auto` the built-in map that accounts for every tensor of the pair
/// ([`crate::namemap::NameMap::detect`]), with its accounting.
pub fn resolve_name_map(
    settings: &FamSettings,
    inputs: &Inputs,
) -> Result<(crate::namemap::NameMap, crate::namemap::Accounting)> {
    let a = &inputs.receiver().checkpoint;
    let b = &inputs.contributor(0).checkpoint;
    let names =
        |c: &Checkpoint| -> Vec<String> { c.tensors().iter().map(|t| t.name.clone()).collect() };
    let (a_names, b_names) = (names(a), names(b));
    let a_iter = a_names.iter().map(String::as_str);
    let b_iter = b_names.iter().map(String::as_str);
    if settings.name_map.is_auto() {
        crate::namemap::NameMap::detect(a_iter, b_iter, a.root(), b.root())
    } else {
        let accounting = settings.name_map.account(a_iter, b_iter);
        Ok((settings.name_map.clone(), accounting))
    }
}

/// The tensors `map` stacks from B's rows whose parts B stores (B's own
/// tensors, not stacks).
pub fn stacks(map: &crate::namemap::NameMap, b: &Checkpoint) -> Vec<crate::namemap::Concatenation> {
    map.concatenations(b.tensors().iter().map(|t| t.name.as_str()))
        .into_iter()
        .filter(|c| c.parts.iter().all(|p| b.info(p).is_some()))
        .collect()
}

fn plan_fam(config: &MergeConfig, settings: &FamSettings, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let receiver = &inputs.receiver().checkpoint;
    let contributor = inputs.contributor(0);
    let b = &contributor.checkpoint;
    let (name_map, accounting) = resolve_name_map(settings, inputs)?;
    let mut b_for_a: BTreeMap<String, String> = BTreeMap::new();
    let mut dropped = Vec::new();
    // Dropped on purpose (a rule, or an optional tensor A lacks): accounted
    // for, so `--strict` lets it pass.
    let mut dropped_by_map = std::collections::BTreeSet::new();
    // A stack feeds A's tensors in its parts' place; parts of a stack
    // none of whose targets A has are dropped like any other tensor.
    let mut stacked_parts = std::collections::BTreeSet::new();
    let mut feeds: Vec<(String, String)> = Vec::new();
    for c in stacks(&name_map, b) {
        let present: Vec<&String> = c
            .targets
            .iter()
            .filter(|t| receiver.info(t).is_some())
            .collect();
        if present.is_empty() {
            continue;
        }
        if b.info(&c.name).is_none() {
            return Err(Error::new(
                ErrorKind::Plan,
                "the name map stacks this tensor from the contributor's rows, but the inputs were opened without it",
            )
            .with_file(b.root())
            .with_tensor(&c.name));
        }
        stacked_parts.extend(c.parts.iter().cloned());
        feeds.extend(present.into_iter().map(|t| (t.clone(), c.name.clone())));
    }
    for info in b.tensors() {
        if stacked_parts.contains(&info.name) {
            continue;
        }
        let targets: Vec<String> = name_map
            .apply(&info.name)
            .into_iter()
            .filter(|t| receiver.info(t).is_some())
            .collect();
        if targets.is_empty() {
            dropped.push(DroppedTensor {
                contributor: 0,
                name: info.name.clone(),
            });
            if name_map.drops(&info.name, |t| receiver.info(t).is_some()) {
                dropped_by_map.insert(info.name.clone());
            }
        }
        feeds.extend(targets.into_iter().map(|t| (t, info.name.clone())));
    }
    for (target, source) in feeds {
        {
            if let Some(previous) = b_for_a.insert(target.clone(), source.clone()) {
                problems.push(
                    Error::new(
                        ErrorKind::Plan,
                        format!("both `{previous}` and `{source}` of the contributor map to it"),
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
                    // Vocabulary rows may differ (Qwen's 151646 vs 152064):
                    // the kernel merges the common rows and keeps A's extra
                    // ones; B's extra rows are dropped. The report lists both.
                    let vocab = is_vocabulary_tensor(&info.name);
                    let fits =
                        other.shape.len() == info.shape.len()
                            && other.shape.iter().zip(&info.shape).enumerate().all(
                                |(axis, (x, y))| {
                                    x == y
                                        || (axis == 0 && (rows_of.is_some() || vocab))
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
        let kept_by_map = source.is_none() && name_map.keeps(&info.name);
        if let (true, Some(source)) = (config.strict, source) {
            if accounting.unaccounted_a.contains(&info.name) {
                problems.push(
                    Error::new(
                        ErrorKind::Plan,
                        format!("--strict: fed by `{source}`, which the name map also sends to tensors the receiver lacks"),
                    )
                    .with_file(receiver.root())
                    .with_tensor(&info.name),
                );
            }
        }
        if let (TensorRule::Copy { reason }, true, false) = (&rule, config.strict, kept_by_map) {
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
        // Fed to some of its targets but not all: the map names tensors A
        // lacks, so the accounting leaves it unaccounted.
        let partly_fed = accounting.unaccounted_b.iter().filter(|n| {
            !dropped.iter().any(|d| &d.name == *n) && !stacked_parts.contains(n.as_str())
        });
        for name in partly_fed {
            problems.push(
                Error::new(
                    ErrorKind::Plan,
                    "--strict: the name map sends this contributor tensor to tensors the receiver lacks",
                )
                .with_file(b.root())
                .with_tensor(name),
            );
        }
        for part in stacked_parts
            .iter()
            .filter(|p| accounting.unaccounted_b.contains(p))
        {
            problems.push(
                Error::new(
                    ErrorKind::Plan,
                    "--strict: the name map stacks this contributor tensor into tensors the receiver lacks",
                )
                .with_file(b.root())
                .with_tensor(part),
            );
        }
        for d in dropped.iter().filter(|d| !dropped_by_map.contains(&d.name)) {
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

/// Whether a receiver tensor's rows are the vocabulary (token embeddings,
/// output projection), which may differ in count between the pair.
pub fn is_vocabulary_tensor(name: &str) -> bool {
    name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight")
}

/// Vocabulary tensors whose row counts differ between the pair: per tensor,
/// the rows merged (the common ones), A's extra rows kept and B's extra
/// rows dropped (SPEC §5: nothing is truncated silently).
pub fn vocabulary_mismatches(plan: &Plan, inputs: &Inputs) -> Vec<Value> {
    let b = &inputs.contributor(0).checkpoint;
    plan.tensors
        .iter()
        .filter(|t| is_vocabulary_tensor(&t.name) && matches!(t.rule, TensorRule::Fam { .. }))
        .filter_map(|t| {
            let rows_b = *b.info(t.source.as_deref()?)?.shape.first()?;
            let rows_a = *t.shape.first()?;
            (rows_a != rows_b).then(|| {
                json!({
                    "tensor": t.name,
                    "source": t.source,
                    "rows_a": rows_a,
                    "rows_b": rows_b,
                    "merged_rows": rows_a.min(rows_b),
                    "kept_from_a": rows_a.saturating_sub(rows_b),
                    "dropped_from_b": rows_b.saturating_sub(rows_a),
                })
            })
        })
        .collect()
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
