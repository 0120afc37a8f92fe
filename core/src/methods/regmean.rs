//! `regmean` (SPEC §7): least-squares merging. Each linear layer's merged
//! weight (with its bias folded in as an input fixed at 1) is the one that
//! best reproduces every model's outputs on that model's own inputs, from
//! each model's input second moment `L.x_gram` and mean `L.x_mean`; the
//! solve is [`crate::least_squares`]. Tensors without Grams (embeddings,
//! norms, `lm_head`, layers without statistics) are the weighted average
//! `Σ w_k W_k / Σ w_k`. No ancestor is needed.
//!
//! Order and memory: the plan puts each layer's `weight` right before its
//! `bias`. The layer is solved once, when its weight is merged; the merged
//! bias (`out` floats) waits in the method's state until its turn. A
//! layer's solve holds the f64 system of [`crate::least_squares`]
//! (`8·(n² + 2·out·n + 128·n)` bytes, `n = in (+1 with a bias)`) and one
//! model's decoded weight and one model's Gram, decoded from its mapped
//! statistics file ([`crate::stats::Gram::values`]), at a time (see the
//! README for the whole bound).
//!
//! Determinism: the solve runs single-threaded per layer and adds the
//! models in config order, so any thread count gives the same bytes.

use super::mergekit::{self, def, Counts, MergekitTensor};
use super::{BaseModel, Method, Prepared, Roles, SettingsInput, Statistics, TensorInput};
use crate::baselines::linear_combine;
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::dtype::encode_f32;
use crate::engine::chunks::{par_encode, read, read_all, tensor_buffer};
use crate::engine::{MergePart, Model, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::least_squares::{RegMeanModel, RegMeanSystem, DEFAULT_ALPHA};
use crate::plan::{layer_of, Input, Inputs, Plan, TensorPlan, TensorRule};
use crate::report::TensorOutcome;
use crate::stats::ActivationStats;
use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// The method.
pub struct RegMean;

/// Merged biases waiting for their turn, by tensor name.
#[derive(Default)]
pub(crate) struct Pending(Mutex<BTreeMap<String, Vec<f32>>>);

/// The statistics (with Grams) of model `i` (its index in the config's
/// `models`) and the file they came from.
pub(crate) type StatsOf<'s> = dyn Fn(usize) -> Result<(&'s ActivationStats, &'s Path)> + 's;

impl Method for RegMean {
    fn name(&self) -> &'static str {
        "regmean"
    }

    fn summary(&self) -> &'static str {
        "RegMean: per linear layer, the least-squares merge from each model's input Gram (SPEC §7)"
    }

    fn roles(&self) -> Roles {
        Roles::AllModels
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Forbidden
    }

    fn statistics(&self) -> Statistics {
        Statistics::Grams
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![
            def(
                "weight",
                Scope::PerModel,
                Kind::NON_NEGATIVE,
                ParamDefault::Number(1.0),
            ),
            def(
                "alpha",
                Scope::Shared,
                Kind::UNIT,
                ParamDefault::Number(DEFAULT_ALPHA),
            ),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let mut plan = mergekit::plan(config, inputs, &|_, _| None)?;
        let mut problems = crate::plan::Problems::default();
        let names: BTreeMap<&str, &TensorPlan> =
            plan.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut rules: BTreeMap<String, TensorRule> = BTreeMap::new();
        for t in &plan.tensors {
            let Some((layer, true)) = layer_of(&t.name) else {
                continue;
            };
            if t.shape.len() != 2 {
                continue;
            }
            let bias_name = format!("{layer}.bias");
            let bias = names
                .get(bias_name.as_str())
                .filter(|b| b.shape == [t.shape[0]])
                .is_some();
            if layer_needs(&mut problems, inputs, layer, t, bias) {
                rules.insert(
                    t.name.clone(),
                    TensorRule::LeastSquares {
                        layer: layer.to_string(),
                        bias: false,
                    },
                );
                if bias {
                    rules.insert(
                        bias_name,
                        TensorRule::LeastSquares {
                            layer: layer.to_string(),
                            bias: true,
                        },
                    );
                }
            }
        }
        problems.into_result()?;
        for t in &mut plan.tensors {
            t.rule = rules.remove(&t.name).unwrap_or(TensorRule::Average);
        }
        // Each layer's weight right before its bias: the bias is solved with it.
        let position: BTreeMap<String, usize> = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let key = |t: &TensorPlan| match &t.rule {
            TensorRule::LeastSquares { layer, bias: true } => {
                (position[&format!("{layer}.weight")], 1)
            }
            _ => (position[&t.name], 0),
        };
        plan.tensors.sort_by_key(key);
        Ok(plan)
    }

    fn prepare(&self, _merge: &MergePart) -> Result<Prepared> {
        Ok(Prepared {
            state: Box::new(Pending::default()),
            report: None,
        })
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let pending = state
            .downcast_ref::<Pending>()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "regmean needs its state"))?;
        let stats_of = |i: usize| -> Result<(&ActivationStats, &Path)> {
            merge.inputs().models[i]
                .stats
                .as_ref()
                .map(|(s, p)| (s, p.as_path()))
                .ok_or_else(|| Error::new(ErrorKind::Stats, "statistics vanished after planning"))
        };
        merge_tensor_with(merge, pending, input, &stats_of)
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}

/// One tensor of a least-squares merge with the Grams of `stats_of`: a
/// layer's weight is solved (its bias kept in `pending` for its turn), a
/// planned bias is taken from `pending`, other tensors are averaged.
pub(crate) fn merge_tensor_with(
    merge: &MergePart,
    pending: &Pending,
    input: &TensorInput<'_>,
    stats_of: &StatsOf<'_>,
) -> Result<(Vec<u8>, TensorOutcome)> {
    {
        let t = MergekitTensor::new(merge, input)?;
        let tensor = input.plan;
        match &tensor.rule {
            TensorRule::LeastSquares { layer, bias: false } => {
                solve_layer(merge, &t, layer, pending, stats_of)
            }
            TensorRule::LeastSquares { bias: true, .. } => {
                let values = pending
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&tensor.name)
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Plan, "the layer's weight was not solved first")
                    })?;
                Ok((encode(&values, tensor), TensorOutcome::default()))
            }
            _ => Ok((average(&t)?, TensorOutcome::default())),
        }
    }
}

/// Whether layer `layer` (weight `t`) is solved: every model has its Gram
/// (and its mean, with a bias) of the right width. Grams in some models but
/// not others, or of the wrong width, are problems.
fn layer_needs(
    problems: &mut crate::plan::Problems,
    inputs: &Inputs,
    layer: &str,
    t: &TensorPlan,
    bias: bool,
) -> bool {
    let width = t.shape[1];
    let models: Vec<&Input> = inputs.models.iter().collect();
    let grams: Vec<Option<usize>> = models
        .iter()
        .map(|m| {
            m.stats
                .as_ref()
                .and_then(|(s, _)| s.gram(layer))
                .map(|g| g.width())
        })
        .collect();
    if grams.iter().all(Option::is_none) {
        return false;
    }
    let mut fine = true;
    for (i, (model, gram)) in models.iter().zip(&grams).enumerate() {
        let problem = match gram {
            None => Some(format!(
                "models[{i}] has no Gram for layer `{layer}` while other models have one (record every model with --gram)"
            )),
            Some(g) if *g != width => Some(format!(
                "the Gram of layer `{layer}` is {g}×{g} but `{}` has shape {:?} (needs {width}×{width})",
                t.name,
                t.shape
            )),
            Some(_) if bias => match model.layer(layer).and_then(|l| l.x_mean.as_ref()) {
                Some(m) if m.len() == width => None,
                Some(m) => Some(format!(
                    "`{layer}.x_mean` has width {} but `{}` has shape {:?}",
                    m.len(),
                    t.name,
                    t.shape
                )),
                None => Some(format!(
                    "layer `{layer}` has a bias, so its mean input `{layer}.x_mean` is needed beside the Gram"
                )),
            },
            Some(_) => None,
        };
        if let Some(problem) = problem {
            fine = false;
            problems.push(
                Error::new(ErrorKind::Stats, problem)
                    .with_file(model.stats_path())
                    .with_tensor(format!("{layer}.x_gram")),
            );
        }
    }
    fine
}

/// Solves layer `layer` (SPEC §7) when its weight's turn comes; keeps the
/// merged bias for the bias's turn.
fn solve_layer(
    merge: &MergePart,
    t: &MergekitTensor<'_>,
    layer: &str,
    pending: &Pending,
    stats_of: &StatsOf<'_>,
) -> Result<(Vec<u8>, TensorOutcome)> {
    let tensor = t.plan;
    let (out, width) = (tensor.shape[0], tensor.shape[1]);
    let bias_name = format!("{layer}.bias");
    let has_bias = merge
        .plan()
        .tensors
        .iter()
        .any(|p| p.name == bias_name && matches!(p.rule, TensorRule::LeastSquares { .. }));
    let alpha = t.number("alpha", None)?;
    let mut system = RegMeanSystem::new(out, width, has_bias, alpha)
        .map_err(|e| Error::new(ErrorKind::Config, e.to_string()))?;
    for (k, view) in t.contributors.iter().enumerate() {
        let (stats, path) = stats_of(t.model_index[k])?;
        let gram = stats.gram(layer).ok_or_else(|| {
            Error::new(ErrorKind::Stats, "Gram vanished after planning").with_file(path)
        })?;
        let mean = stats.layer(layer).and_then(|l| l.x_mean.as_deref());
        let weight = read_all(view);
        let bias = if has_bias {
            Some(read_all(&merge.view(
                Model::Contributor(tensor.contributors[k]),
                &bias_name,
            )?))
        } else {
            None
        };
        system
            .add_model(&RegMeanModel {
                weight: &weight,
                bias: bias.as_deref(),
                gram: &gram.values(),
                mean,
                w: t.number("weight", Some(k))?,
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Stats,
                    format!("models[{}]: {e}", t.model_index[k]),
                )
                .with_file(path)
                .with_tensor(&tensor.name)
            })?;
        merge.release_contributor(tensor, tensor.contributors[k]);
    }
    let solution = system.solve().map_err(|e| {
        Error::new(
            ErrorKind::Stats,
            format!("the least-squares solve of layer `{layer}` failed: {e}"),
        )
        .with_tensor(&tensor.name)
    })?;
    if let Some(bias) = solution.bias {
        pending
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bias_name, bias);
    }
    Ok((
        encode(&solution.weight, tensor),
        TensorOutcome {
            ridge: solution.ridge,
            ..TensorOutcome::default()
        },
    ))
}

/// `Σ w_k W_k / Σ w_k` over every model.
fn average(t: &MergekitTensor<'_>) -> Result<Vec<u8>> {
    let weights: Vec<f32> = (0..t.contributors.len())
        .map(|k| t.number("weight", Some(k)).map(|w| w as f32))
        .collect::<Result<_>>()?;
    let views: &[TensorView<'_>] = &t.contributors;
    Ok(par_encode(
        t.plan.numel(),
        t.plan.out_dtype,
        CHUNK_ELEMENTS,
        |start, values, bufs: &mut Vec<Vec<f32>>| {
            bufs.resize_with(views.len(), Vec::new);
            for (buf, view) in bufs.iter_mut().zip(views) {
                read(view, start, values.len(), buf);
            }
            let refs: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
            linear_combine(&refs, &weights, true, values);
        },
    ))
}

fn encode(values: &[f32], tensor: &TensorPlan) -> Vec<u8> {
    let mut bytes = tensor_buffer::<u8>(values.len() * tensor.out_dtype.size());
    encode_f32(tensor.out_dtype, values, &mut bytes);
    bytes
}
