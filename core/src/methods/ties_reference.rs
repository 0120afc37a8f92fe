//! `ties_reference`: the original TIES paper code (SPEC §3): one
//! magnitude threshold per contributor over the whole flattened model,
//! computed before the first tensor is written, an unweighted vote and the
//! disjoint mean.

use super::mergekit::{self, def, Counts, MergekitTensor};
use super::{BaseModel, Method, Prepared, Roles, SettingsInput, TensorInput};
use crate::baselines::{magnitude_key, trim_count};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::{add_histograms, par_encode, read};
use crate::engine::{MergePart, Model, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use crate::select::{RadixSelect, RADIX_BUCKETS};
use rayon::prelude::*;
use std::any::Any;

/// The method.
pub struct TiesReferenceMethod;

impl Method for TiesReferenceMethod {
    fn name(&self) -> &'static str {
        "ties_reference"
    }

    fn summary(&self) -> &'static str {
        "the original TIES paper code: one threshold over the whole model"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![
            def(
                "density",
                Scope::Shared,
                Kind::DENSITY,
                ParamDefault::Number(0.2),
            ),
            def(
                "lambda",
                Scope::Shared,
                Kind::ANY,
                ParamDefault::Number(1.0),
            ),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan(config, inputs, &|_, _| None)
    }

    /// The whole-model pass, before any tensor is written.
    fn prepare(&self, merge: &MergePart) -> Result<Prepared> {
        let density = mergekit::params(merge.config())?.number("density", None, "", 0.0)?;
        let tensors = merge
            .plan()
            .tensors
            .iter()
            .map(|t| {
                let contributors = (0..merge.inputs().contributors.len())
                    .map(|k| merge.view(Model::Contributor(k), &t.name))
                    .collect::<Result<Vec<_>>>()?;
                Ok((merge.view(Model::Base, &t.name)?, contributors))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            state: Box::new(TiesReference::compute(density, &tensors)),
            report: None,
        })
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let globals = state.downcast_ref::<TiesReference>().ok_or_else(|| {
            Error::new(ErrorKind::Plan, "ties_reference needs its whole-model pass")
        })?;
        let t = MergekitTensor::new(merge, input)?;
        let out = input.plan.out_dtype;
        let lambda = t.number("lambda", None)? as f32;
        let base = t.base()?;
        let taus = t.task_vectors()?;
        let bytes = par_encode(
            base.numel(),
            out,
            CHUNK_ELEMENTS,
            |start, values, (b, trimmed): &mut (Vec<f32>, Vec<f32>)| {
                read(base, start, values.len(), b);
                trimmed.resize(taus.len(), 0.0);
                for (j, v) in values.iter_mut().enumerate() {
                    for ((t, tau), &threshold) in
                        trimmed.iter_mut().zip(&taus).zip(&globals.thresholds)
                    {
                        let x = tau[start + j];
                        *t = if magnitude_key(x) >= threshold {
                            x
                        } else {
                            0.0
                        };
                    }
                    *v = b[j] + lambda * globals.disjoint_mean(trimmed);
                }
            },
        );
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}

/// Whole-model quantities of `ties_reference` (SPEC §3): each contributor's
/// magnitude threshold over all its task-vector entries, and the sign of
/// the sum of all elected signs.
#[derive(Debug, Clone, PartialEq)]
pub struct TiesReference {
    /// Magnitude keys: entries with `|τ_k| ≥` the threshold are kept.
    pub thresholds: Vec<u32>,
    /// −1, 0 or +1: the sign a zero vote takes.
    pub majority: i8,
}

impl TiesReference {
    /// The disjoint mean of one element's trimmed task vectors: the vote is
    /// `sign(Σ_k τ_k)` (the majority sign when that is 0); the entries of
    /// the voted sign are averaged.
    pub fn disjoint_mean(&self, trimmed: &[f32]) -> f32 {
        let sum: f32 = trimmed.iter().sum();
        let sign = if sum > 0.0 {
            1
        } else if sum < 0.0 {
            -1
        } else {
            self.majority
        };
        let (mut total, mut count) = (0f32, 0u32);
        for &x in trimmed {
            if (sign > 0 && x > 0.0) || (sign < 0 && x < 0.0) {
                total += x;
                count += 1;
            }
        }
        total / count.max(1) as f32
    }

    /// Runs the whole-model passes over every tensor of the plan: three
    /// radix-select passes for the thresholds, one for the majority sign.
    pub fn compute(
        density: f64,
        tensors: &[(TensorView<'_>, Vec<TensorView<'_>>)],
    ) -> TiesReference {
        let m = tensors.first().map_or(0, |(_, c)| c.len());
        let total: usize = tensors.iter().map(|(b, _)| b.numel()).sum();
        if total == 0 || m == 0 {
            return TiesReference {
                thresholds: vec![0; m],
                majority: 0,
            };
        }
        // Keep ⌊density·K⌋ + 1 entries: the (K − ⌊density·K⌋)-th smallest and above.
        let rank = (trim_count(density, total) + 1).min(total);
        let mut selects = vec![RadixSelect::new(rank); m];
        let chunks: Vec<(usize, usize)> = tensors
            .iter()
            .enumerate()
            .flat_map(|(t, (b, _))| (0..b.numel()).step_by(CHUNK_ELEMENTS).map(move |s| (t, s)))
            .collect();
        let task_chunk =
            |t: usize, start: usize, k: usize, base: &mut Vec<f32>, tau: &mut Vec<f32>| {
                let (b, contributors) = &tensors[t];
                let len = CHUNK_ELEMENTS.min(b.numel() - start);
                read(b, start, len, base);
                read(&contributors[k], start, len, tau);
                for (x, y) in tau.iter_mut().zip(base.iter()) {
                    *x -= y;
                }
            };
        while !selects[0].is_done() {
            let hists: Vec<Box<[u64; RADIX_BUCKETS]>> = (0..m)
                .map(|k| {
                    chunks
                        .par_iter()
                        .map_init(
                            || (Vec::new(), Vec::new()),
                            |(base, tau), &(t, start)| {
                                task_chunk(t, start, k, base, tau);
                                let mut hist = Box::new([0u64; RADIX_BUCKETS]);
                                selects[k]
                                    .count_keys(tau.iter().map(|&x| magnitude_key(x)), &mut hist);
                                hist
                            },
                        )
                        .reduce(|| Box::new([0u64; RADIX_BUCKETS]), add_histograms)
                })
                .collect();
            for (select, hist) in selects.iter_mut().zip(&hists) {
                select.advance(hist);
            }
        }
        let thresholds: Vec<u32> = selects.iter().map(RadixSelect::key).collect();
        let signs: i64 = chunks
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(base, tau, sums): &mut (Vec<f32>, Vec<f32>, Vec<f32>), &(t, start)| {
                    for (k, &threshold) in thresholds.iter().enumerate() {
                        task_chunk(t, start, k, base, tau);
                        if k == 0 {
                            sums.clear();
                            sums.resize(tau.len(), 0.0);
                        }
                        for (s, &x) in sums.iter_mut().zip(tau.iter()) {
                            if magnitude_key(x) >= threshold {
                                *s += x;
                            }
                        }
                    }
                    sums.iter()
                        .map(|&s| (s > 0.0) as i64 - (s < 0.0) as i64)
                        .sum::<i64>()
                },
            )
            .sum();
        TiesReference {
            thresholds,
            majority: signs.signum() as i8,
        }
    }
}
