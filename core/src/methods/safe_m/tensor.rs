//! SAFE-M on tensors read from the checkpoints: a score pass per model,
//! exact thresholds, then one fusion pass over row chunks, all calling the
//! kernels of [`crate::safe_m`].

use super::{Reproject, SafeMSettings};
use crate::dtype::encode_f32;
use crate::engine::chunks::{parallel_threshold, read, read_all, rows_per_chunk, tensor_buffer};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::least_squares::{RegMeanModel, RegMeanSystem as LsSystem};
use crate::plan::{Inputs, TensorPlan};
use crate::reduce;
use crate::report::TensorOutcome;
use crate::safe_m::{
    activation_lambda, fuse_block, fuse_block_with, masked_task_vectors, output_shift,
    score_matrix, score_vector, task_vector, ContributorBlock, Election, ElectionParams,
    MaskCounts, Member, Salience, Variant,
};
use rayon::prelude::*;

/// The statistics one SAFE-M tensor needs, checked by the planner.
pub(crate) struct SafeMLayer<'a> {
    x_mean: &'a [f32],
    receiver_y: &'a [f32],
    ancestor_y: &'a [f32],
    contributor_y: Vec<&'a [f32]>,
    /// `layer_lambda: activation`: the layer's λ scale, from the probe rows.
    lambda_scale: Option<f32>,
}

impl<'a> SafeMLayer<'a> {
    pub(crate) fn gather(
        inputs: &'a Inputs,
        layer: &str,
        tensor: &TensorPlan,
        settings: &SafeMSettings,
    ) -> Result<SafeMLayer<'a>> {
        let missing = || {
            Error::new(
                ErrorKind::Stats,
                format!("statistics of layer `{layer}` vanished after planning"),
            )
        };
        let get = |input: &'a crate::plan::Input, x: bool| -> Result<&'a [f32]> {
            let stats = input.stats.as_ref().ok_or_else(missing)?;
            let layer = stats.0.layer(layer).ok_or_else(missing)?;
            let v = if x { &layer.x_mean } else { &layer.y_mean };
            v.as_deref().ok_or_else(missing)
        };
        let base = inputs.base.as_ref().ok_or_else(missing)?;
        let rows = |input: &'a crate::plan::Input| -> Result<&'a [f32]> {
            let stats = input.stats.as_ref().ok_or_else(missing)?;
            let l = stats.0.layer(layer).ok_or_else(missing)?;
            l.y_rows.as_ref().map(|r| r.data.as_slice()).ok_or_else(|| {
                Error::new(
                    ErrorKind::Stats,
                    format!(
                        "`layer_lambda: activation` (also set by `preset: keep_all`) needs per-example output rows (`{layer}.y_rows`) in every statistics file; record them, or set `layer_lambda: fixed`"
                    ),
                )
            })
        };
        let lambda_scale = if settings.variant.activation_lambda {
            let ancestor = rows(base)?;
            let mut models = vec![rows(inputs.receiver())?];
            for &k in &tensor.contributors {
                models.push(rows(inputs.contributor(k))?);
            }
            if models.iter().any(|m| m.len() != ancestor.len()) {
                return Err(Error::new(
                    ErrorKind::Stats,
                    format!("`{layer}.y_rows` differ in size between the statistics files (the same probe set is needed)"),
                ));
            }
            let width = tensor.shape[0];
            Some(activation_lambda(ancestor, &models, width))
        } else {
            None
        };
        Ok(SafeMLayer {
            lambda_scale,
            x_mean: if tensor.shape.len() == 2 {
                get(inputs.receiver(), true)?
            } else {
                &[]
            },
            receiver_y: get(inputs.receiver(), false)?,
            ancestor_y: get(base, false)?,
            contributor_y: tensor
                .contributors
                .iter()
                .map(|&k| get(inputs.contributor(k), false))
                .collect::<Result<_>>()?,
        })
    }
}

/// Scores of one model over a whole tensor, computed in parallel row chunks.
/// With `ancestor`, the salience is the task vector `W − W_C`
/// ([`Salience::TaskVector`]), formed chunk by chunk.
fn score_tensor(
    view: &TensorView<'_>,
    ancestor: Option<&TensorView<'_>>,
    u: &[f32],
    v: Option<&[f32]>,
    params: ElectionParams,
) -> Vec<f32> {
    let n = view.numel();
    let mut scores = tensor_buffer::<f32>(n);
    let load = |start: usize, len: usize, w: &mut Vec<f32>, c: &mut Vec<f32>| {
        read(view, start, len, w);
        if let Some(ancestor) = ancestor {
            read(ancestor, start, len, c);
            let weight = core::mem::take(w);
            w.resize(len, 0.0);
            task_vector(&weight, c, w);
            *c = weight;
        }
    };
    match v {
        Some(v) => {
            let cols = v.len();
            let rows = rows_per_chunk(cols);
            scores
                .par_chunks_mut(rows * cols)
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(w, c), (chunk, out)| {
                        let first_row = chunk * rows;
                        let block_rows = out.len() / cols;
                        load(first_row * cols, out.len(), w, c);
                        score_matrix(
                            w,
                            &u[first_row..first_row + block_rows],
                            v,
                            params.form,
                            out,
                        );
                    },
                );
        }
        None => {
            let (mut w, mut c) = (Vec::new(), Vec::new());
            load(0, n, &mut w, &mut c);
            score_vector(&w, u, params.form, &mut scores);
        }
    }
    scores
}

/// Stage 2's scores and thresholds: the receiver's, then each
/// contributor's (plan order).
#[allow(clippy::type_complexity)]
fn elect(
    tensor: &TensorPlan,
    settings: &SafeMSettings,
    receiver: &TensorView<'_>,
    ancestor: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    layer: &SafeMLayer<'_>,
) -> (Vec<f32>, f32, Vec<(Vec<f32>, f32)>) {
    let v = (tensor.shape.len() == 2).then_some(layer.x_mean);
    let salient_over = (settings.variant.salience == Salience::TaskVector).then_some(ancestor);
    let receiver_scores = score_tensor(
        receiver,
        salient_over,
        &output_shift(layer.receiver_y, layer.ancestor_y),
        v,
        settings.receiver,
    );
    let receiver_threshold = parallel_threshold(&receiver_scores, settings.receiver.density);
    let elections = tensor
        .contributors
        .iter()
        .zip(contributors)
        .zip(&layer.contributor_y)
        .map(|((&k, view), y)| {
            let params = settings.contributors[k].election;
            let scores = score_tensor(
                view,
                salient_over,
                &output_shift(y, layer.ancestor_y),
                v,
                params,
            );
            let threshold = parallel_threshold(&scores, params.density);
            (scores, threshold)
        })
        .collect();
    (receiver_scores, receiver_threshold, elections)
}

/// SAFE-M with `reproject: gram` on one weight (docs/methods.md): the
/// election and conflict rule of the settings give each model's masked
/// task vector `τ_u` ([`masked_task_vectors`]); the layer is then the
/// least-squares solve ([`crate::least_squares`], no bias folded: the
/// bias keeps SPEC §1.3's rule) over the targets `W_A` with the receiver's
/// Gram and `W_A + λ_k τ_u,k` with contributor k's (receiver form), or
/// `W_C + λ_j τ_u,j` with model j's Gram for every model (symmetric form).
/// λ is a model's `lambda_proj` (times the layer's activation λ).
///
/// Memory: the decoded receiver, ancestor and contributors, the masked
/// task vectors, one target and one Gram at a time, and the f64 system.
#[allow(clippy::too_many_arguments)]
pub(crate) fn safe_m_gram_tensor(
    inputs: &Inputs,
    layer_name: &str,
    tensor: &TensorPlan,
    settings: &SafeMSettings,
    receiver: &TensorView<'_>,
    ancestor: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    layer: &SafeMLayer<'_>,
) -> Result<(Vec<u8>, TensorOutcome)> {
    let Reproject::Gram { alpha } = settings.reproject else {
        return Err(Error::new(ErrorKind::Plan, "not a Gram re-projection"));
    };
    let variant = &settings.variant;
    let (out_rows, cols) = (tensor.shape[0], tensor.shape[1]);
    let (receiver_scores, receiver_threshold, elections) =
        elect(tensor, settings, receiver, ancestor, contributors, layer);
    let w_a = read_all(receiver);
    let w_c = read_all(ancestor);
    let weights: Vec<Vec<f32>> = contributors.iter().map(read_all).collect();
    let scale = layer.lambda_scale.unwrap_or(1.0);
    let members: Vec<Member<'_>> = std::iter::once(Member {
        weight: &w_a,
        election: Election {
            scores: &receiver_scores,
            threshold: receiver_threshold,
        },
        lambda_proj: scale * variant.receiver_lambda.0,
        lambda_ortho: scale * variant.receiver_lambda.1,
        rescale_cap: (1.0 / settings.receiver.density) as f32,
    })
    .chain(
        tensor
            .contributors
            .iter()
            .zip(&weights)
            .zip(&elections)
            .map(|((&k, weight), (scores, threshold))| Member {
                weight,
                election: Election {
                    scores,
                    threshold: *threshold,
                },
                lambda_proj: scale * settings.contributors[k].lambda_proj,
                lambda_ortho: scale * settings.contributors[k].lambda_ortho,
                rescale_cap: (1.0 / settings.contributors[k].election.density) as f32,
            }),
    )
    .collect();
    let mut taus = vec![Vec::new(); members.len()];
    let mut counts = vec![MaskCounts::default(); members.len()];
    masked_task_vectors(&w_c, &members, cols, variant, &mut taus, &mut counts);
    let model_of = |j: usize| {
        if j == 0 {
            inputs.receiver()
        } else {
            inputs.contributor(tensor.contributors[j - 1])
        }
    };
    let mut system = LsSystem::new(out_rows, cols, false, alpha)
        .map_err(|e| Error::new(ErrorKind::Config, e.to_string()))?;
    let mut target = vec![0f32; w_a.len()];
    for (j, member) in members.iter().enumerate() {
        let model = model_of(j);
        let (gram, path) = model.gram(layer_name).ok_or_else(|| {
            Error::new(ErrorKind::Stats, "Gram vanished after planning")
                .with_file(model.grams_path())
        })?;
        let from: &[f32] = if variant.symmetric { &w_c } else { &w_a };
        let tau = &taus[j];
        if tau.is_empty() {
            target.copy_from_slice(from);
        } else {
            for ((t, &f), &d) in target.iter_mut().zip(from).zip(tau) {
                *t = f + member.lambda_proj * d;
            }
        }
        system
            .add_model(&RegMeanModel {
                weight: &target,
                bias: None,
                gram: &gram.values(),
                mean: None,
                w: 1.0,
            })
            .map_err(|e| {
                Error::new(ErrorKind::Stats, format!("reproject: gram: {e}"))
                    .with_file(path)
                    .with_tensor(&tensor.name)
            })?;
    }
    let solution = system.solve().map_err(|e| {
        Error::new(
            ErrorKind::Stats,
            format!("the Gram re-projection of layer `{layer_name}` failed: {e}"),
        )
        .with_tensor(&tensor.name)
    })?;
    let mut bytes = tensor_buffer::<u8>(solution.weight.len() * tensor.out_dtype.size());
    encode_f32(tensor.out_dtype, &solution.weight, &mut bytes);
    // Counts per contributor, as the mean re-projection reports them.
    counts.remove(0);
    Ok((
        bytes,
        TensorOutcome {
            receiver_threshold: Some(receiver_threshold),
            thresholds: elections.iter().map(|(_, t)| *t).collect(),
            counts,
            layer_lambda: layer.lambda_scale,
            ridge: solution.ridge,
            ..TensorOutcome::default()
        },
    ))
}

/// SAFE-M on one tensor read from the checkpoints: a score pass per model,
/// the thresholds, then one fusion pass over row chunks.
pub(crate) fn safe_m_tensor(
    tensor: &TensorPlan,
    settings: &SafeMSettings,
    receiver: &TensorView<'_>,
    ancestor: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    layer: &SafeMLayer<'_>,
) -> (Vec<u8>, TensorOutcome) {
    let is_weight = tensor.shape.len() == 2;
    let v = is_weight.then_some(layer.x_mean);
    let variant = &settings.variant;
    let (receiver_scores, receiver_threshold, elections) =
        elect(tensor, settings, receiver, ancestor, contributors, layer);
    let cols = if is_weight {
        tensor.shape[1]
    } else {
        tensor.numel()
    };
    let direction = v.map(|d| (d, reduce::sum_squares(d)));
    let chunk = rows_per_chunk(cols) * cols;
    let out_dtype = tensor.out_dtype;
    let n = tensor.numel();
    let mut out = tensor_buffer::<u8>(n * out_dtype.size());
    let chunk_counts: Vec<Vec<MaskCounts>> = out
        .par_chunks_mut(chunk.max(1) * out_dtype.size())
        .enumerate()
        .map_init(Scratch::default, |scratch, (index, bytes)| {
            let start = index * chunk;
            let len = bytes.len() / out_dtype.size();
            let range = start..start + len;
            read(receiver, start, len, &mut scratch.receiver);
            read(ancestor, start, len, &mut scratch.ancestor);
            scratch
                .contributors
                .resize_with(contributors.len(), Vec::new);
            for (buf, view) in scratch.contributors.iter_mut().zip(contributors) {
                read(view, start, len, buf);
            }
            let blocks: Vec<ContributorBlock<'_>> = tensor
                .contributors
                .iter()
                .zip(&scratch.contributors)
                .zip(&elections)
                .map(|((&k, weight), (scores, threshold))| ContributorBlock {
                    weight,
                    election: Election {
                        scores: &scores[range.clone()],
                        threshold: *threshold,
                    },
                    lambda_proj: settings.contributors[k].lambda_proj,
                    lambda_ortho: settings.contributors[k].lambda_ortho,
                })
                .collect();
            scratch.merged.resize(len, 0.0);
            if *variant != Variant::default() {
                let scale = layer.lambda_scale.unwrap_or(1.0);
                let receiver_election = Election {
                    scores: &receiver_scores[range.clone()],
                    threshold: receiver_threshold,
                };
                let members: Vec<Member<'_>> = core::iter::once(Member {
                    weight: &scratch.receiver,
                    election: receiver_election,
                    lambda_proj: scale * variant.receiver_lambda.0,
                    lambda_ortho: scale * variant.receiver_lambda.1,
                    rescale_cap: (1.0 / settings.receiver.density) as f32,
                })
                .chain(
                    blocks
                        .iter()
                        .zip(&tensor.contributors)
                        .map(|(b, &k)| Member {
                            weight: b.weight,
                            election: b.election,
                            lambda_proj: scale * b.lambda_proj,
                            lambda_ortho: scale * b.lambda_ortho,
                            rescale_cap: (1.0 / settings.contributors[k].election.density) as f32,
                        }),
                )
                .collect();
                let mut counts = vec![MaskCounts::default(); members.len()];
                fuse_block_with(
                    &scratch.ancestor,
                    &members,
                    direction,
                    settings.epsilon,
                    variant,
                    &mut scratch.merged,
                    &mut scratch.tau,
                    &mut counts,
                );
                encode_f32(out_dtype, &scratch.merged, bytes);
                counts.remove(0);
                return counts;
            }
            let mut counts = vec![MaskCounts::default(); blocks.len()];
            fuse_block(
                &scratch.receiver,
                &scratch.ancestor,
                Election {
                    scores: &receiver_scores[range.clone()],
                    threshold: receiver_threshold,
                },
                &blocks,
                direction,
                settings.epsilon,
                &mut scratch.merged,
                &mut scratch.tau,
                &mut counts,
            );
            encode_f32(out_dtype, &scratch.merged, bytes);
            counts
        })
        .collect();
    let mut counts = vec![MaskCounts::default(); contributors.len()];
    for chunk in &chunk_counts {
        for (total, c) in counts.iter_mut().zip(chunk) {
            total.add(c);
        }
    }
    let outcome = TensorOutcome {
        receiver_threshold: Some(receiver_threshold),
        thresholds: elections.iter().map(|(_, t)| *t).collect(),
        counts,
        layer_lambda: layer.lambda_scale,
        ..TensorOutcome::default()
    };
    (out, outcome)
}

#[derive(Default)]
struct Scratch {
    receiver: Vec<f32>,
    ancestor: Vec<f32>,
    contributors: Vec<Vec<f32>>,
    merged: Vec<f32>,
    tau: Vec<f32>,
}
