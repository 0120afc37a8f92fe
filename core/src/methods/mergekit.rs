//! What the mergekit-style methods share: their validation (parameters
//! as scalars, gradients and filters, [`crate::config::params`]), their
//! plan (every input holds every tensor with the same shape), their report
//! section, and the per-tensor context their kernels read parameters and
//! tensors from.

use crate::config::params::{
    layer_position, Default as ParamDefault, Params, Scalar, Scope, Setting,
};
use crate::config::{config_error, MergeConfig, MethodSettings, RawParams};
use crate::dtype::Dtype;
use crate::engine::chunks::{par_encode, read, read_all};
use crate::engine::{MergePart, Model, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{TensorInfo, TensorView};
use crate::methods::{BaseModel, Method, Roles, SettingsInput, Statistics, TensorInput};
use crate::plan::{
    dropped_tensors, float_check, layer_count, CopyReason, Excluded, Inputs, Plan, Problems,
    TensorPlan, TensorRule,
};
use rayon::prelude::*;
use serde_json::{json, Value};

/// How many models a mergekit-style method merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// At least one besides the base.
    AtLeastOne,
    /// Exactly one besides the base (slerp, nearswap).
    OneBesidesBase,
    /// At least two besides the base (model_stock).
    TwoBesidesBase,
    /// Exactly one model in all (passthrough).
    OneModel,
    /// Exactly two besides the base (nuslerp).
    TwoExactly,
}

/// Validates a mergekit-style method's parameters (its [`Method::params`])
/// and model list into [`MethodSettings::Baseline`].
pub fn settings(
    method: &dyn Method,
    counts: Counts,
    input: &SettingsInput<'_>,
) -> Result<MethodSettings> {
    let SettingsInput {
        raw, models, base, ..
    } = *input;
    let name = method.name();
    if method.base_model() == BaseModel::Forbidden && base.is_some() {
        return Err(config_error(
            None,
            "base_model",
            format!("{name} takes no `base_model`"),
        ));
    }
    if method.base_model() == BaseModel::Required && base.is_none() {
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
    if method.statistics() == Statistics::None {
        for (i, m) in raw.models.iter().enumerate() {
            if let Some(stats) = &m.stats {
                return Err(config_error(
                    None,
                    &format!("models[{i}].stats"),
                    format!("{name} uses no activation statistics (`{stats}`)"),
                ));
            }
        }
    } else {
        for (i, m) in models.iter().enumerate() {
            if m.stats.is_none() {
                return Err(config_error(
                    None,
                    &format!("models[{i}].stats"),
                    format!(
                        "{name} needs activation statistics for {}",
                        m.path.display()
                    ),
                ));
            }
        }
    }
    if raw.base_model_stats.is_some() {
        return Err(config_error(
            None,
            "base_model_stats",
            if method.statistics() == Statistics::None {
                format!("{name} uses no activation statistics")
            } else {
                format!("{name} uses no statistics of the base model")
            },
        ));
    }
    let per_model: Vec<&RawParams> = raw.models.iter().map(|m| &m.parameters).collect();
    let params = Params::validate(name, &method.params(), &raw.parameters, &per_model)?;
    let is_base = |i: usize| base.is_some_and(|b| b.is_same(&models[i]));
    let contributors: Vec<usize> = (0..models.len()).filter(|&i| !is_base(i)).collect();
    let count_error = |what: &str| Err(config_error(None, "models", format!("{name} {what}")));
    match counts {
        Counts::OneBesidesBase if contributors.len() != 1 => {
            return count_error("merges the base with exactly one other model");
        }
        Counts::TwoBesidesBase if contributors.len() < 2 => {
            return count_error("needs at least two models besides the base");
        }
        Counts::OneModel if models.len() != 1 => return count_error("takes exactly one model"),
        Counts::TwoExactly if contributors.len() != 2 => {
            return count_error("merges exactly two models besides the base");
        }
        _ if contributors.is_empty() => {
            return count_error("needs at least one model besides the base")
        }
        _ => {}
    }
    // Methods over every listed model weigh the base too when it is listed.
    let weighted: Vec<usize> = if method.roles() == Roles::AllModels {
        (0..models.len()).collect()
    } else {
        contributors
    };
    params.check_required(&weighted, |i| {
        format!("models[{i}] ({})", models[i].path.display())
    })?;
    Ok(MethodSettings::Baseline(params))
}

/// Whether the base is an input although it is not listed under `models`
/// (methods over every model, `Roles::AllModels`: mergekit appends it).
pub fn base_is_extra_input(config: &MergeConfig) -> bool {
    config
        .base
        .as_ref()
        .is_some_and(|b| !config.models.iter().any(|m| m.is_same(b)))
}

/// The validated parameters of a mergekit-style merge.
pub fn params(config: &MergeConfig) -> Result<&Params> {
    config.baseline().ok_or_else(|| {
        Error::new(
            ErrorKind::Plan,
            format!("{} has no mergekit-style parameters", config.method),
        )
    })
}

/// Plans a baseline merge: every tensor of the reference model (the base,
/// or the first model without one) must exist with the same shape in every
/// input (mergekit 0.1.5 refuses mismatches too); tensors only some other
/// input has are dropped and reported. For methods whose whole-model pass
/// or statistics need every tensor of every input; the others use
/// [`plan_optional`]. Required per-tensor parameters are resolved here so
/// that a filter list that misses a tensor fails early.
///
/// `check(tensor, t)` adds a method's own per-tensor problem (`t`: the
/// tensor's layer position for gradients).
pub fn plan(
    config: &MergeConfig,
    inputs: &Inputs,
    check: &dyn Fn(&TensorInfo, f64) -> Option<Error>,
) -> Result<Plan> {
    plan_with(config, inputs, None, check)
}

/// [`plan`] for a method that merges a tensor over the contributors that
/// hold it, as mergekit does for optional weights: a tensor of the
/// reference that some contributors lack is merged over the others when
/// they are as many as `counts` asks, and otherwise copied from the
/// reference (the base, or the first model without one); each case is in
/// the plan (`excluded`, the `copied` rule) and so in the report. With
/// `--strict` a missing tensor is an error, and so is a dropped one.
pub fn plan_optional(
    config: &MergeConfig,
    inputs: &Inputs,
    counts: Counts,
    check: &dyn Fn(&TensorInfo, f64) -> Option<Error>,
) -> Result<Plan> {
    plan_with(config, inputs, Some(counts), check)
}

/// Whether `present` contributors are enough for a tensor under `counts`.
fn enough(counts: Counts, present: usize) -> bool {
    match counts {
        Counts::AtLeastOne | Counts::OneModel => present >= 1,
        Counts::OneBesidesBase => present == 1,
        Counts::TwoBesidesBase => present >= 2,
        Counts::TwoExactly => present == 2,
    }
}

fn plan_with(
    config: &MergeConfig,
    inputs: &Inputs,
    optional: Option<Counts>,
    check: &dyn Fn(&TensorInfo, f64) -> Option<Error>,
) -> Result<Plan> {
    let params = params(config)?;
    let mut problems = Problems::default();
    let reference = &inputs.reference().checkpoint;
    let reference_is_model = !inputs.names_from_base || inputs.base.is_none();
    let layers = layer_count(reference);
    let mut tensors = Vec::new();
    for info in reference.tensors() {
        if !float_check(&mut problems, reference, info) {
            continue;
        }
        let mut present = Vec::new();
        let mut excluded = Vec::new();
        for k in 0..inputs.contributors.len() {
            if reference_is_model && inputs.contributors[k] == 0 {
                present.push(k);
                continue;
            }
            let who = format!("contributor {k}");
            let other = &inputs.contributor(k).checkpoint;
            match other.info(&info.name) {
                None if optional.is_some() => {
                    if config.strict {
                        problems.push(
                            Error::new(
                                ErrorKind::Plan,
                                format!(
                                    "--strict: missing in {who}, which holds other tensors of {} (without --strict the tensor is merged over the models that hold it)",
                                    reference.root().display()
                                ),
                            )
                            .with_file(other.root())
                            .with_tensor(&info.name),
                        );
                    }
                    excluded.push(Excluded {
                        contributor: k,
                        why: "missing".into(),
                    });
                }
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
                    if float_check(&mut problems, other, o) {
                        present.push(k);
                    }
                }
            }
        }
        let t = gradient_position(config, inputs, &info.name, layers);
        for def in params
            .defs
            .iter()
            .filter(|d| d.default == ParamDefault::Required)
        {
            let targets: Vec<Option<usize>> = match def.scope {
                Scope::Shared => vec![None],
                Scope::PerModel => present
                    .iter()
                    .map(|&k| Some(inputs.contributors[k]))
                    .collect(),
            };
            for target in targets {
                if let Err(e) = params.number(def.name, target, &info.name, t) {
                    problems.push(e.with_file(config.source.clone().unwrap_or_default()));
                }
            }
        }
        let rule = match optional {
            Some(counts) if !enough(counts, present.len()) => TensorRule::Copy {
                reason: if present.is_empty() {
                    CopyReason::OnlyInReceiver
                } else {
                    CopyReason::TooFewHolders
                },
            },
            _ => {
                if let Some(problem) = check(info, t) {
                    problems.push(problem);
                }
                TensorRule::Baseline
            }
        };
        tensors.push(TensorPlan {
            name: info.name.clone(),
            shape: info.shape.clone(),
            in_dtype: info.dtype,
            out_dtype: config.out_dtype.unwrap_or(info.dtype),
            contributors: if matches!(rule, TensorRule::Copy { .. }) {
                Vec::new()
            } else {
                present
            },
            rule,
            excluded,
            source: None,
        });
    }
    let dropped = dropped_tensors(inputs, reference);
    if optional.is_some() && config.strict {
        for d in &dropped {
            problems.push(
                Error::new(
                    ErrorKind::Plan,
                    format!(
                        "--strict: only some models hold this tensor and {} (the output's names) does not, so it would be dropped",
                        reference.root().display()
                    ),
                )
                .with_file(inputs.contributor(d.contributor).checkpoint.root())
                .with_tensor(&d.name),
            );
        }
    }
    problems.into_result()?;
    Ok(Plan {
        tensors,
        dropped,
        layers,
        groups: Vec::new(),
    })
}

/// The `parameters` section of the report: the values as written, per
/// model, and the defaults.
pub fn report_parameters(config: &MergeConfig) -> Value {
    let Some(p) = config.baseline() else {
        return Value::Null;
    };
    let block = |m: &std::collections::BTreeMap<String, Setting>| -> Value {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), setting_json(v)))
                .collect(),
        )
    };
    let defaults: serde_json::Map<String, Value> = p
        .defs
        .iter()
        .map(|d| {
            let v = match d.default {
                ParamDefault::Number(x) => json!(x),
                ParamDefault::Bool(b) => json!(b),
                ParamDefault::Text(t) => json!(t),
                ParamDefault::Required => json!("required"),
            };
            (d.name.to_string(), v)
        })
        .collect();
    json!({
        "global": block(&p.global),
        "models": p.per_model.iter().map(block).collect::<Vec<_>>(),
        "defaults": defaults,
        "seed": config.seed,
    })
}

fn setting_json(setting: &Setting) -> Value {
    match setting {
        Setting::Value(Scalar::Number(x)) => json!(x),
        Setting::Value(Scalar::Bool(b)) => json!(b),
        Setting::Value(Scalar::Text(t)) => json!(t),
        Setting::Gradient(points) => json!(points),
        Setting::Filtered(entries) => Value::Array(
            entries
                .iter()
                .map(|(filter, value)| json!({"filter": filter, "value": setting_json(value)}))
                .collect(),
        ),
    }
}

/// The position `t ∈ [0, 1]` of a tensor for gradients: over the model's
/// layers, or within the slice for a slice of a `slices:` config.
fn gradient_position(config: &MergeConfig, inputs: &Inputs, name: &str, layers: usize) -> f64 {
    match &config.layer_window {
        Some(window) => window.position(name, inputs.decoder_prefix.as_deref()),
        None => layer_position(name, layers),
    }
}

/// What a mergekit-style tensor is merged from: its parameters (resolved
/// per tensor and model), the base's tensor and each contributor's.
pub struct MergekitTensor<'a> {
    /// Its parameters.
    pub params: &'a Params,
    /// Seed of random masks.
    pub seed: u64,
    /// Decoder layers (for gradients).
    pub layers: usize,
    /// The plan of the tensor.
    pub plan: &'a TensorPlan,
    /// The base model's tensor, when the method has a base.
    pub base: Option<TensorView<'a>>,
    /// Each contributor's tensor.
    pub contributors: Vec<TensorView<'a>>,
    /// Each contributor's index in the config's `models` (for per-model parameters).
    pub model_index: Vec<usize>,
    merge: &'a MergePart,
}

impl<'a> MergekitTensor<'a> {
    /// The context of one tensor of `merge`.
    pub fn new(merge: &'a MergePart, input: &TensorInput<'a>) -> Result<MergekitTensor<'a>> {
        let tensor = input.plan;
        let base = match &merge.inputs().base {
            Some(_) => Some(merge.view(Model::Base, &tensor.name)?),
            None => None,
        };
        Ok(MergekitTensor {
            params: params(merge.config())?,
            seed: merge.config().seed,
            layers: merge.plan().layers,
            plan: tensor,
            base,
            contributors: input.contributors.clone(),
            model_index: tensor
                .contributors
                .iter()
                .map(|&k| merge.inputs().contributors[k])
                .collect(),
            merge,
        })
    }

    /// The tensor's layer position for gradients.
    pub fn t(&self) -> f64 {
        gradient_position(
            self.merge.config(),
            self.merge.inputs(),
            &self.plan.name,
            self.layers,
        )
    }

    /// A number parameter of contributor `k` (`None`: a shared one).
    pub fn number(&self, key: &str, k: Option<usize>) -> Result<f64> {
        self.params.number(
            key,
            k.map(|k| self.model_index[k]),
            &self.plan.name,
            self.t(),
        )
    }

    /// A shared boolean parameter.
    pub fn flag(&self, key: &str) -> bool {
        self.params.flag(key, &self.plan.name, self.t())
    }

    /// The base model's tensor.
    pub fn base(&self) -> Result<&TensorView<'a>> {
        self.base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "this method needs the base model's tensor"))
    }

    /// The merge the tensor belongs to.
    pub fn merge(&self) -> &'a MergePart {
        self.merge
    }

    /// The output bytes of an element-wise rule: `f(values)` for every
    /// element, `values` holding the contributors' entries in plan order,
    /// computed in parallel chunks and encoded in the output dtype. What a
    /// method of one's own needs for a per-element formula.
    pub fn map_elements(&self, f: impl Fn(&[f32]) -> f32 + Sync) -> Vec<u8> {
        let views = &self.contributors;
        par_encode(
            self.plan.numel(),
            self.plan.out_dtype,
            CHUNK_ELEMENTS,
            |start, values, (bufs, column): &mut (Vec<Vec<f32>>, Vec<f32>)| {
                bufs.resize_with(views.len(), Vec::new);
                for (buf, view) in bufs.iter_mut().zip(views) {
                    read(view, start, values.len(), buf);
                }
                for (i, v) in values.iter_mut().enumerate() {
                    column.clear();
                    column.extend(bufs.iter().map(|b| b[i]));
                    *v = f(column);
                }
            },
        )
    }

    /// Every contributor's tensor, decoded (in plan order).
    pub fn decoded(&self) -> Vec<Vec<f32>> {
        self.contributors.iter().map(read_all).collect()
    }

    /// `τ_k = W_k − W_base` for every contributor, decoded in parallel;
    /// each contributor's pages leave memory once its task vector is held.
    pub fn task_vectors(&self) -> Result<Vec<Vec<f32>>> {
        let base = self.base()?;
        Ok(self
            .contributors
            .iter()
            .enumerate()
            .map(|(k, view)| {
                let mut tau = read_all(view);
                tau.par_chunks_mut(CHUNK_ELEMENTS)
                    .enumerate()
                    .for_each_init(Vec::new, |b, (chunk, values)| {
                        read(base, chunk * CHUNK_ELEMENTS, values.len(), b);
                        subtract(values, b);
                    });
                self.merge
                    .release_contributor(self.plan, self.plan.contributors[k]);
                tau
            })
            .collect())
    }
}

/// The output bytes of a tensor computed whole by a kernel on decoded
/// slices, encoded in the output dtype in parallel chunks.
pub fn encode(values: &[f32], out: Dtype) -> Vec<u8> {
    par_encode(
        values.len(),
        out,
        CHUNK_ELEMENTS,
        |start, chunk, _: &mut ()| {
            chunk.copy_from_slice(&values[start..start + chunk.len()]);
        },
    )
}

/// `tau −= base`, element-wise (a task vector from a decoded weight).
pub fn subtract(tau: &mut [f32], base: &[f32]) {
    for (t, x) in tau.iter_mut().zip(base) {
        *t -= x;
    }
}

/// `f(a[i], b[i])` over two whole tensors, in parallel chunks.
pub fn elementwise(
    a: &TensorView<'_>,
    b: &TensorView<'_>,
    out: Dtype,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<u8> {
    par_encode(
        a.numel(),
        out,
        CHUNK_ELEMENTS,
        |start, values, (x, y): &mut (Vec<f32>, Vec<f32>)| {
            read(a, start, values.len(), x);
            read(b, start, values.len(), y);
            for ((v, &p), &q) in values.iter_mut().zip(x.iter()).zip(y.iter()) {
                *v = f(p, q);
            }
        },
    )
}

/// One parameter definition.
pub fn def(
    name: &'static str,
    scope: Scope,
    kind: crate::config::params::Kind,
    default: ParamDefault,
) -> crate::config::params::ParamDef {
    crate::config::params::ParamDef {
        name,
        scope,
        kind,
        default,
    }
}

/// mergekit's per-model `weight` (required).
pub fn weight() -> crate::config::params::ParamDef {
    def(
        "weight",
        Scope::PerModel,
        crate::config::params::Kind::ANY,
        ParamDefault::Required,
    )
}

/// A method-wide boolean.
pub fn flag(name: &'static str, default: bool) -> crate::config::params::ParamDef {
    def(
        name,
        Scope::Shared,
        crate::config::params::Kind::Bool,
        ParamDefault::Bool(default),
    )
}
