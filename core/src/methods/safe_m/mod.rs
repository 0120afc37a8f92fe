//! SAFE-M (SPEC §1): sharpness-aware election, sign-conflict removal and
//! decoupled re-projection, for models fine-tuned from one ancestor. This
//! module holds the method's settings, presets and plan; [`tensor`] runs
//! its per-tensor kernels ([`crate::safe_m`]) on checkpoint data.

pub mod tensor;

use super::{BaseModel, Method, Roles, SettingsInput, Statistics, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{check_keys, config_error, finite, Lookup, MergeConfig, MethodSettings};
use crate::engine::chunks::blend;
use crate::engine::{MergePart, Model};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorInfo;
use crate::plan::{
    dropped_tensors, float_check, layer_count, layer_of, CopyReason, Excluded, FallbackReason,
    Input, Inputs, Plan, Problems, TensorPlan, TensorRule,
};
use crate::report::{num, TensorOutcome};
use crate::safe_m::{ConflictRule, ElectionParams, Salience, ScoreForm, Variant, EPSILON};
use serde_json::{json, Value};
use std::any::Any;
use tensor::{safe_m_gram_tensor, safe_m_tensor, SafeMLayer};

/// The method.
pub struct SafeM;

impl Method for SafeM {
    fn name(&self) -> &'static str {
        "safe_m"
    }

    fn summary(&self) -> &'static str {
        "SAFE-M: sharpness-aware election, conflict removal, decoupled re-projection (SPEC §1)"
    }

    fn roles(&self) -> Roles {
        Roles::ReceiverFirst
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn statistics(&self) -> Statistics {
        Statistics::Means
    }

    fn takes_grams_file(&self) -> bool {
        true
    }

    /// Per-model keys apply to that model's election (and to a
    /// contributor's λ); the others configure the method.
    fn params(&self) -> Vec<ParamDef> {
        let per_model = |name, kind, default| ParamDef {
            name,
            scope: Scope::PerModel,
            kind,
            default,
        };
        let shared = |name, kind, default| ParamDef {
            name,
            scope: Scope::Shared,
            kind,
            default,
        };
        use ParamDefault::{Bool, Number, Text};
        vec![
            per_model("density", Kind::DENSITY, Number(0.2)),
            per_model("alpha", Kind::NON_NEGATIVE, Number(1.0)),
            per_model("score", Kind::Choice(&["sas", "ratio"]), Text("sas")),
            per_model("lambda_proj", Kind::ANY, Number(1.0)),
            per_model("lambda_ortho", Kind::ANY, Number(0.5)),
            shared("fallback_weight", Kind::ANY, Number(0.5)),
            shared("epsilon", Kind::POSITIVE, Number(EPSILON as f64)),
            shared(
                "preset",
                Kind::Choice(&["spec", "keep_all", "gram"]),
                Text("spec"),
            ),
            shared("symmetric", Kind::Bool, Bool(false)),
            shared(
                "conflict",
                Kind::Choice(&["drop", "keep", "score"]),
                Text("drop"),
            ),
            shared(
                "salience",
                Kind::Choice(&["weight", "task_vector"]),
                Text("weight"),
            ),
            shared("rescale", Kind::Bool, Bool(false)),
            shared(
                "layer_lambda",
                Kind::Choice(&["fixed", "activation"]),
                Text("fixed"),
            ),
            shared("reproject", Kind::Choice(&["mean", "gram"]), Text("mean")),
            shared(
                "gram_alpha",
                Kind::UNIT,
                Number(crate::least_squares::DEFAULT_ALPHA),
            ),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        Ok(MethodSettings::SafeM(safe_m_settings(input)?))
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        plan_safe_m(config, inputs)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let tensor = input.plan;
        let s = merge
            .config()
            .safe_m()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "safe_m tensors need SAFE-M settings"))?;
        match &tensor.rule {
            TensorRule::Fallback { .. } => Ok((
                blend(
                    &merge.view(Model::Receiver, &tensor.name)?,
                    &input.contributors,
                    s.fallback_weight,
                    tensor.out_dtype,
                ),
                TensorOutcome::default(),
            )),
            TensorRule::SafeMWeight { layer } if s.reproject != Reproject::Mean => {
                let receiver = merge.view(Model::Receiver, &tensor.name)?;
                let ancestor = merge.view(Model::Base, &tensor.name)?;
                let layers = SafeMLayer::gather(merge.inputs(), layer, tensor, s)?;
                safe_m_gram_tensor(
                    merge.inputs(),
                    layer,
                    tensor,
                    s,
                    &receiver,
                    &ancestor,
                    &input.contributors,
                    &layers,
                )
            }
            TensorRule::SafeMWeight { layer } | TensorRule::SafeMBias { layer } => {
                let receiver = merge.view(Model::Receiver, &tensor.name)?;
                let ancestor = merge.view(Model::Base, &tensor.name)?;
                let layers = SafeMLayer::gather(merge.inputs(), layer, tensor, s)?;
                Ok(safe_m_tensor(
                    tensor,
                    s,
                    &receiver,
                    &ancestor,
                    &input.contributors,
                    &layers,
                ))
            }
            rule => Err(Error::new(
                ErrorKind::Plan,
                format!("rule {} does not apply to safe_m", rule.label()),
            )),
        }
    }

    fn report_parameters(&self, config: &MergeConfig) -> Value {
        let Some(s) = config.safe_m() else {
            return Value::Null;
        };
        let mut p = json!({
            "receiver": {"density": s.receiver.density, "form": form_json(s.receiver.form)},
            "contributors": s.contributors.iter().map(|c| json!({
                "density": c.election.density,
                "form": form_json(c.election.form),
                "lambda_proj": num(c.lambda_proj),
                "lambda_ortho": num(c.lambda_ortho),
            })).collect::<Vec<_>>(),
            "fallback_weight": num(s.fallback_weight),
            "epsilon": num(s.epsilon),
        });
        // Only a variant adds keys, so SPEC merges report exactly what they did before.
        let v = &s.variant;
        if *v != Variant::default() || s.preset != "spec" {
            p["variant"] = json!({
                "preset": s.preset,
                "symmetric": v.symmetric,
                "receiver_lambda": [num(v.receiver_lambda.0), num(v.receiver_lambda.1)],
                "conflict": match v.conflict {
                    ConflictRule::Drop => "drop",
                    ConflictRule::Keep => "keep",
                    ConflictRule::Score => "score",
                },
                "salience": match v.salience {
                    Salience::Weight => "weight",
                    Salience::TaskVector => "task_vector",
                },
                "rescale": v.rescale,
                "layer_lambda": if v.activation_lambda { "activation" } else { "fixed" },
            });
        }
        if let Reproject::Gram { alpha } = s.reproject {
            p["reproject"] = json!({"form": "gram", "gram_alpha": alpha});
        }
        p
    }
}

/// How the elected task vectors are fused into the receiver (docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reproject {
    /// SPEC §1.3: split along the receiver's mean input `x̄_A`, `λ_proj`
    /// on the parallel part and `λ_ortho` on the rest.
    Mean,
    /// The least-squares re-projection from second moments: weights are
    /// solved so that the merged layer reproduces, on each model's inputs
    /// (its Gram, `G̃ = α G + (1 − α) diag G`), the receiver (`W_A`) and
    /// each contributor's update on it (`W_A + λ τ_u,k`) — in the
    /// symmetric form every model's `W_C + λ τ_u,j`.
    Gram {
        /// `gram_alpha`: the off-diagonal shrinkage of each Gram.
        alpha: f64,
    },
}

fn form_json(form: ScoreForm) -> Value {
    match form {
        ScoreForm::Sas { alpha } => json!({"score": "sas", "alpha": num(alpha)}),
        ScoreForm::Ratio { epsilon } => json!({"score": "ratio", "epsilon": num(epsilon)}),
    }
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
    /// How the elected task vectors are fused (`reproject:`).
    pub reproject: Reproject,
}

/// Defaults of a SAFE-M preset; keys written in the config win over them.
#[derive(Debug, Clone, Copy)]
struct SafeMPreset {
    name: &'static str,
    density: f64,
    lambda_proj: f64,
    lambda_ortho: f64,
    variant: Variant,
    /// Whether `reproject` defaults to `gram`.
    gram: bool,
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
    gram: false,
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
    gram: false,
};

/// `gram`: the setting the quality benchmark's validation split chose
/// among every variant once second moments were available
/// (docs/quality.md): every model's whole task vector over C, re-projected
/// by the least-squares solve from each model's own-task Gram, scaled by
/// 1.5 (λ = 1 is RegMean without the bias folded in).
const SAFE_M_GRAM: SafeMPreset = SafeMPreset {
    name: "gram",
    density: 1.0,
    lambda_proj: 1.5,
    lambda_ortho: 1.5,
    variant: Variant {
        symmetric: true,
        receiver_lambda: (1.0, 1.0),
        conflict: ConflictRule::Keep,
        salience: Salience::Weight,
        rescale: false,
        activation_lambda: false,
    },
    gram: true,
};

const SAFE_M_PRESETS: &[SafeMPreset] = &[SAFE_M_SPEC, SAFE_M_KEEP_ALL, SAFE_M_GRAM];

fn safe_m_settings(input: &SettingsInput<'_>) -> Result<SafeMSettings> {
    let SettingsInput {
        raw, models, base, ..
    } = *input;
    let method = "safe_m";
    let params = SafeM.params();
    let global: Vec<&str> = params.iter().map(|d| d.name).collect();
    let per_model: Vec<&str> = params
        .iter()
        .filter(|d| d.scope == Scope::PerModel)
        .map(|d| d.name)
        .collect();
    check_keys(&raw.parameters, &global, "`parameters`", method)?;
    for (i, m) in raw.models.iter().enumerate() {
        check_keys(
            &m.parameters,
            &per_model,
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
    let default_reproject = if preset.gram { "gram" } else { "mean" };
    let reproject = match global.choice(
        "reproject",
        default_reproject,
        &[("mean", "mean"), ("gram", "gram")],
    )? {
        "gram" => Reproject::Gram {
            alpha: global.number(
                "gram_alpha",
                crate::least_squares::DEFAULT_ALPHA,
                |a| (0.0..=1.0).contains(&a),
                "[0, 1]",
            )?,
        },
        _ => Reproject::Mean,
    };
    if reproject == Reproject::Mean {
        if let Some(v) = raw.parameters.get("gram_alpha") {
            return Err(config_error(
                Some(&v.referenced),
                "gram_alpha",
                "`gram_alpha` shrinks the Grams of `reproject: gram`; set `reproject: gram` or drop it",
            ));
        }
        if let Some(i) = models.iter().position(|m| m.grams.is_some()) {
            return Err(config_error(
                None,
                &format!("models[{i}].grams"),
                "`grams` files are read by `reproject: gram` only; set it or drop them",
            ));
        }
    } else {
        // The Gram solve has no parallel/orthogonal split: one λ per model.
        let ortho = std::iter::once(&raw.parameters)
            .chain(raw.models.iter().map(|m| &m.parameters))
            .find_map(|p| p.get("lambda_ortho"));
        if let Some(v) = ortho {
            return Err(config_error(
                Some(&v.referenced),
                "lambda_ortho",
                "`reproject: gram` has no orthogonal part: a model's update is scaled by its `lambda_proj` alone",
            ));
        }
    }
    Ok(SafeMSettings {
        receiver,
        contributors,
        fallback_weight,
        epsilon,
        variant,
        preset: preset.name,
        reproject,
    })
}

/// The plan of a SAFE-M merge (SPEC §1.4 decides the rules).
fn plan_safe_m(config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
    let mut problems = Problems::default();
    let gram = config
        .safe_m()
        .is_some_and(|s| s.reproject != Reproject::Mean);
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
            safe_m_rule(&mut problems, inputs, info, ancestor, &present, gram)
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
    gram: bool,
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
    if gram && is_weight {
        let width = info.shape[1];
        let models = std::iter::once((inputs.receiver(), "the receiver".to_string())).chain(
            present
                .iter()
                .map(|&k| (inputs.contributor(k), format!("contributor {k}"))),
        );
        for (model, who) in models {
            let problem = match model.gram(layer) {
                None => format!(
                    "`reproject: gram` needs {who}'s Gram of layer `{layer}` (record it with `flatmerge probe --gram`, on the model's own examples, and give it as `grams:` or in `stats:`)"
                ),
                Some((g, _)) if g.width() != width => format!(
                    "{who}'s Gram of layer `{layer}` is {0}×{0} but `{1}` has shape {2:?} (needs {width}×{width})",
                    g.width(),
                    info.name,
                    info.shape
                ),
                Some(_) => continue,
            };
            problems.push(
                Error::new(ErrorKind::Stats, problem)
                    .with_file(model.grams_path())
                    .with_tensor(format!("{layer}.x_gram")),
            );
        }
    }
    // Incomplete statistics were pushed as problems: the plan fails as a whole.
    let layer = layer.to_string();
    if is_weight {
        TensorRule::SafeMWeight { layer }
    } else {
        TensorRule::SafeMBias { layer }
    }
}
