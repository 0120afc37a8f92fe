//! `model_stock`: `t = N·cos / (1 + (N − 1)·cos)` from the mean pairwise
//! cosine of the fine-tunes' offsets from the base, over the whole tensor
//! or per row (`filter_wise`); `W* = t·mean(W_k) + (1 − t)·W_base`.

use super::mergekit::{self, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::{par_encode, read_all};
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use rayon::prelude::*;
use std::any::Any;

/// The method.
pub struct ModelStock;

impl Method for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn summary(&self) -> &'static str {
        "the base pulled towards the mean by the angle between fine-tunes"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![mergekit::flag("filter_wise", false)]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::TwoBesidesBase, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan_optional(config, inputs, Counts::TwoBesidesBase, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let out = t.plan.out_dtype;
        let base = read_all(t.base()?);
        let models: Vec<Vec<f32>> = t.contributors.iter().map(read_all).collect();
        let n_models = models.len();
        let cols = if t.flag("filter_wise") {
            *t.plan.shape.last().unwrap_or(&1)
        } else {
            base.len()
        };
        let rows = base.len() / cols.max(1);
        let ratio = |row: usize| -> f32 {
            let range = row * cols..(row + 1) * cols;
            let offsets: Vec<Vec<f32>> = models
                .iter()
                .map(|m| {
                    m[range.clone()]
                        .iter()
                        .zip(&base[range.clone()])
                        .map(|(x, b)| x - b)
                        .collect()
                })
                .collect();
            let norms: Vec<f64> = offsets
                .iter()
                .map(|d| crate::reduce::sum_squares(d).sqrt())
                .collect();
            let (mut sum, mut pairs) = (0f64, 0usize);
            for i in 0..n_models {
                for j in i + 1..n_models {
                    let cos = crate::reduce::dot(&offsets[i], &offsets[j])
                        / (norms[i] * norms[j]).max(1e-6);
                    sum += cos.clamp(-1.0, 1.0);
                    pairs += 1;
                }
            }
            let cos = sum / pairs.max(1) as f64;
            let n = n_models as f64;
            let denominator = 1.0 + (n - 1.0) * cos;
            if denominator.abs() < 1e-6 {
                0.0
            } else {
                (n * cos / denominator) as f32
            }
        };
        let ratios: Vec<f32> = (0..rows).into_par_iter().map(ratio).collect();
        let bytes = par_encode(base.len(), out, cols.max(1), |start, values, _: &mut ()| {
            let t = ratios[start / cols.max(1)];
            for (j, v) in values.iter_mut().enumerate() {
                let i = start + j;
                let mean = models.iter().map(|m| m[i]).sum::<f32>() / n_models as f32;
                *v = t * mean + (1.0 - t) * base[i];
            }
        });
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
