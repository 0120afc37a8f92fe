//! SAFE-M on tensors read from the checkpoints: a score pass per model,
//! exact thresholds, then one fusion pass over row chunks, all calling the
//! kernels of [`crate::safe_m`].

use super::chunks::{parallel_threshold, read, rows_per_chunk};
use crate::config::SafeMSettings;
use crate::dtype::encode_f32;
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::plan::{Inputs, TensorPlan};
use crate::reduce;
use crate::report::TensorOutcome;
use crate::safe_m::{
    fuse_block, output_shift, score_matrix, score_vector, ContributorBlock, Election,
    ElectionParams, MaskCounts,
};
use rayon::prelude::*;

/// The statistics one SAFE-M tensor needs, checked by the planner.
pub(super) struct SafeMLayer<'a> {
    x_mean: &'a [f32],
    receiver_y: &'a [f32],
    ancestor_y: &'a [f32],
    contributor_y: Vec<&'a [f32]>,
}

impl<'a> SafeMLayer<'a> {
    pub(super) fn gather(
        inputs: &'a Inputs,
        layer: &str,
        tensor: &TensorPlan,
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
        Ok(SafeMLayer {
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
fn score_tensor(
    view: &TensorView<'_>,
    u: &[f32],
    v: Option<&[f32]>,
    params: ElectionParams,
) -> Vec<f32> {
    let n = view.numel();
    let mut scores = vec![0f32; n];
    match v {
        Some(v) => {
            let cols = v.len();
            let rows = rows_per_chunk(cols);
            scores
                .par_chunks_mut(rows * cols)
                .enumerate()
                .for_each_init(Vec::new, |w, (chunk, out)| {
                    let first_row = chunk * rows;
                    let block_rows = out.len() / cols;
                    read(view, first_row * cols, out.len(), w);
                    score_matrix(
                        w,
                        &u[first_row..first_row + block_rows],
                        v,
                        params.form,
                        out,
                    );
                });
        }
        None => {
            let mut w = Vec::new();
            read(view, 0, n, &mut w);
            score_vector(&w, u, params.form, &mut scores);
        }
    }
    scores
}

/// SAFE-M on one tensor read from the checkpoints: a score pass per model,
/// the thresholds, then one fusion pass over row chunks.
pub(super) fn safe_m_tensor(
    tensor: &TensorPlan,
    settings: &SafeMSettings,
    receiver: &TensorView<'_>,
    ancestor: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    layer: &SafeMLayer<'_>,
) -> (Vec<u8>, TensorOutcome) {
    let is_weight = tensor.shape.len() == 2;
    let v = is_weight.then_some(layer.x_mean);
    let receiver_scores = score_tensor(
        receiver,
        &output_shift(layer.receiver_y, layer.ancestor_y),
        v,
        settings.receiver,
    );
    let receiver_threshold = parallel_threshold(&receiver_scores, settings.receiver.density);
    let elections: Vec<(Vec<f32>, f32)> = tensor
        .contributors
        .iter()
        .zip(contributors)
        .zip(&layer.contributor_y)
        .map(|((&k, view), y)| {
            let params = settings.contributors[k].election;
            let scores = score_tensor(view, &output_shift(y, layer.ancestor_y), v, params);
            let threshold = parallel_threshold(&scores, params.density);
            (scores, threshold)
        })
        .collect();
    let cols = if is_weight {
        tensor.shape[1]
    } else {
        tensor.numel()
    };
    let direction = v.map(|d| (d, reduce::sum_squares(d)));
    let chunk = rows_per_chunk(cols) * cols;
    let out_dtype = tensor.out_dtype;
    let n = tensor.numel();
    let mut out = vec![0u8; n * out_dtype.size()];
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
            let mut counts = vec![MaskCounts::default(); blocks.len()];
            scratch.merged.resize(len, 0.0);
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
