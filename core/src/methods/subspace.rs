//! The data-free subspace family (SPEC §8): `tsv` (TSV-M), `iso_c`,
//! `iso_cts` and `wudi` share one tensor loop. Each 2-D `*.weight` tensor
//! is merged from its task matrices `τ_k = W_k − W_C` by the kernels of
//! [`crate::subspace`]; 1-D tensors get `W_C + α·mean_k τ_k`; every other
//! tensor (0-D, 3-D and up, 2-D tensors that are not `*.weight`) follows
//! task arithmetic, `W_C + λ Σ w_k τ_k`.
//!
//! Determinism: every SVD, polar factor and solve runs with `Par::Seq`; the
//! tasks' decompositions run in parallel but each is independent and they
//! are combined in config order; the update is formed in row blocks fixed
//! by the shape. Any thread count gives the same bytes.
//!
//! Memory (one tensor `[out, in]` at a time, `r = min(out, in)`): the
//! base's f32 tensor, then per task in flight (at most one per thread) its
//! f64 task matrix and one SVD's factors and workspace
//! ([`crate::subspace`]); then the kept triplets (`8·(out + in)·r` bytes)
//! and one f64 row block per thread. WUDI holds §7's system instead
//! (`8·(2·in² + 2·out·in + 128·in)` bytes) and adds the tasks one at a time.

use super::mergekit::{self, def, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::baselines::task_arithmetic_combine;
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::{par_encode, read, read_all};
use crate::engine::{MergePart, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorInfo;
use crate::plan::{Inputs, Plan, TensorPlan, TensorRule};
use crate::report::{Subspace, TensorOutcome};
use crate::subspace::{
    block_rows, iso_c_factors, iso_cts_common, iso_cts_factors, iso_cts_share, iso_cts_split,
    mean_update, tsv_factors, tsv_per_task, tsv_share, Share, SubspaceError, SubspaceInfo, Svd,
    Triplets, Wudi, DEFAULT_ALPHA, DEFAULT_COMMON_SPACE_FRACTION,
};
use rayon::prelude::*;
use std::any::Any;

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Tsv,
    IsoC,
    IsoCts,
    Wudi,
}

/// One member of the family, as registered.
pub struct SubspaceMethod {
    name: &'static str,
    summary: &'static str,
    family: Family,
}

/// TSV-M (Gargiulo et al. 2025).
pub const TSV: SubspaceMethod = SubspaceMethod {
    name: "tsv",
    summary: "TSV-M: each task matrix's top ⌊r/T⌋ singular triplets, orthogonalised (SPEC §8)",
    family: Family::Tsv,
};
/// Iso-C (Marczak et al. 2025).
pub const ISO_C: SubspaceMethod = SubspaceMethod {
    name: "iso_c",
    summary: "Iso-C: `Σ τ_k` with every singular value set to their mean (SPEC §8)",
    family: Family::IsoC,
};
/// Iso-CTS (Marczak et al. 2025).
pub const ISO_CTS: SubspaceMethod = SubspaceMethod {
    name: "iso_cts",
    summary: "Iso-CTS: common directions of `Σ τ_k` plus each task's own, flat spectrum (SPEC §8)",
    family: Family::IsoCts,
};
/// WUDI (Cheng et al. 2025), closed form.
pub const WUDI: SubspaceMethod = SubspaceMethod {
    name: "wudi",
    summary:
        "WUDI: `argmin Σ_k ‖(τ − τ_k) τ_kᵀ‖² / ‖τ_k‖²`, solved in closed form by SPEC §7 (SPEC §8)",
    family: Family::Wudi,
};

/// How one tensor of a subspace merge is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A 2-D `*.weight`: the method's subspace rule.
    Matrix,
    /// A 1-D tensor: `W_C + α·mean_k τ_k`.
    Vector,
    /// Anything else: task arithmetic.
    Other,
}

fn shape_of(name: &str, shape: &[usize]) -> Shape {
    match shape.len() {
        2 if name.ends_with(".weight") => Shape::Matrix,
        1 => Shape::Vector,
        _ => Shape::Other,
    }
}

impl Method for SubspaceMethod {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn params(&self) -> Vec<ParamDef> {
        let mut defs = vec![def(
            "alpha",
            Scope::Shared,
            Kind::ANY,
            ParamDefault::Number(DEFAULT_ALPHA),
        )];
        if self.family == Family::IsoCts {
            defs.push(def(
                "common_space_fraction",
                Scope::Shared,
                Kind::UNIT,
                ParamDefault::Number(DEFAULT_COMMON_SPACE_FRACTION),
            ));
        }
        // Task arithmetic's, for the tensors that are neither 2-D weights nor 1-D.
        defs.push(def(
            "weight",
            Scope::PerModel,
            Kind::ANY,
            ParamDefault::Number(1.0),
        ));
        defs.push(def(
            "lambda",
            Scope::Shared,
            Kind::ANY,
            ParamDefault::Number(1.0),
        ));
        defs
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    /// mergekit's plan (same names and shapes everywhere); TSV-M refuses a
    /// 2-D weight with `0 < r < T` (no task would keep a triplet) here,
    /// before any tensor data is read. 1-D tensors are marked `average`.
    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let tasks = inputs.contributors.len();
        let reference = inputs.reference().checkpoint.root().to_path_buf();
        let family = self.family;
        let check = |info: &TensorInfo, _t: f64| -> Option<Error> {
            if family != Family::Tsv || shape_of(&info.name, &info.shape) != Shape::Matrix {
                return None;
            }
            let r = info.shape[0].min(info.shape[1]);
            tsv_per_task(r, tasks).err().map(|e| {
                Error::new(
                    ErrorKind::Plan,
                    format!(
                        "shape {:?}: {e}; merge fewer models or use iso_c, iso_cts or wudi",
                        info.shape
                    ),
                )
                .with_file(&reference)
                .with_tensor(&info.name)
            })
        };
        let mut plan = mergekit::plan(config, inputs, &check)?;
        for t in &mut plan.tensors {
            if shape_of(&t.name, &t.shape) == Shape::Vector {
                t.rule = TensorRule::Average;
            }
        }
        Ok(plan)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        match shape_of(&t.plan.name, &t.plan.shape) {
            Shape::Matrix => self.matrix(&t),
            Shape::Vector => Ok((vector(&t)?, TensorOutcome::default())),
            Shape::Other => Ok((task_arithmetic(&t)?, TensorOutcome::default())),
        }
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}

/// A kernel's error on one tensor, named.
fn tensor_error(plan: &TensorPlan, method: &str, e: SubspaceError) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("{method}: {e}")).with_tensor(&plan.name)
}

/// One contributor's task matrix in f64 and whether it is all zero.
fn task_matrix(t: &MergekitTensor<'_>, base: &[f32], k: usize) -> (Vec<f64>, bool) {
    let w = read_all(&t.contributors[k]);
    t.merge()
        .release_contributor(t.plan, t.plan.contributors[k]);
    let tau: Vec<f64> = w
        .iter()
        .zip(base)
        .map(|(&x, &b)| f64::from(x) - f64::from(b))
        .collect();
    let zero = tau.iter().all(|&x| x == 0.0);
    (tau, zero)
}

/// `Σ_k τ_k` in f64, added in task order (as [`crate::subspace::task_sum`]
/// does), one decoded contributor at a time; and the all-zero tasks.
fn task_sum(t: &MergekitTensor<'_>, base: &[f32]) -> (Vec<f64>, Vec<usize>) {
    let mut sum = vec![0.0f64; base.len()];
    let mut zero = Vec::new();
    for k in 0..t.contributors.len() {
        let (tau, is_zero) = task_matrix(t, base, k);
        if is_zero {
            zero.push(k);
        }
        sum.par_chunks_mut(CHUNK_ELEMENTS)
            .zip(tau.par_chunks(CHUNK_ELEMENTS))
            .for_each(|(s, x)| s.iter_mut().zip(x).for_each(|(s, x)| *s += x));
    }
    (sum, zero)
}

impl SubspaceMethod {
    /// The subspace rule on one 2-D weight.
    fn matrix(&self, t: &MergekitTensor<'_>) -> Result<(Vec<u8>, TensorOutcome)> {
        let plan = t.plan;
        let (rows, cols) = (plan.shape[0], plan.shape[1]);
        let r = rows.min(cols);
        let tasks = t.contributors.len();
        let alpha = t.number("alpha", None)?;
        let base = read_all(t.base()?);
        let err = |e| tensor_error(plan, self.name, e);
        let mut report = Subspace {
            r,
            ..Subspace::default()
        };
        if self.family == Family::Wudi {
            let mut system = Wudi::new(rows, cols).map_err(err)?;
            for k in 0..tasks {
                let (tau, _) = task_matrix(t, &base, k);
                system.add(&tau).map_err(err)?;
            }
            let solution = system.solve().map_err(err)?;
            report.zero = solution.zero;
            let tau = solution.tau;
            let bytes = par_encode(
                plan.numel(),
                plan.out_dtype,
                CHUNK_ELEMENTS,
                |start, values, _: &mut ()| {
                    let end = start + values.len();
                    for ((o, &b), &d) in values
                        .iter_mut()
                        .zip(&base[start..end])
                        .zip(&tau[start..end])
                    {
                        *o = (f64::from(b) + alpha * d) as f32;
                    }
                },
            );
            return Ok((
                bytes,
                TensorOutcome {
                    ridge: solution.ridge,
                    subspace: Some(report),
                    ..TensorOutcome::default()
                },
            ));
        }
        let (factors, info): (Triplets, SubspaceInfo) = match self.family {
            Family::Tsv => {
                let per_task = tsv_per_task(r, tasks).map_err(err)?;
                report.per_task = Some(per_task);
                let shares = (0..tasks)
                    .into_par_iter()
                    .map(|k| {
                        let (tau, zero) = task_matrix(t, &base, k);
                        Ok((tsv_share(&tau, rows, cols, per_task).map_err(err)?, zero))
                    })
                    .collect::<Result<Vec<(Share, bool)>>>()?;
                report.zero = zero_tasks(shares.iter().map(|s| s.1));
                let shares: Vec<Share> = shares.into_iter().map(|s| s.0).collect();
                tsv_factors(rows, cols, &shares).map_err(err)?
            }
            Family::IsoC => {
                let (sum, zero) = task_sum(t, &base);
                report.zero = zero;
                report.common = Some(r);
                iso_c_factors(&Svd::of(&sum, rows, cols).map_err(err)?)
            }
            Family::IsoCts => {
                let fraction = t.number("common_space_fraction", None)?;
                let (k, per_task) = iso_cts_split(r, tasks, fraction).map_err(err)?;
                report.common = Some(k);
                report.per_task = Some(per_task);
                let (sum, zero) = task_sum(t, &base);
                report.zero = zero;
                let sum = Svd::of(&sum, rows, cols).map_err(err)?;
                let common = iso_cts_common(&sum, k);
                drop(sum);
                // The residuals need every task again: decoded a second time
                // rather than held, one per thread in flight.
                let shares = (0..tasks)
                    .into_par_iter()
                    .map(|k| {
                        let (tau, _) = task_matrix(t, &base, k);
                        iso_cts_share(tau, rows, cols, &common.triplets, per_task).map_err(err)
                    })
                    .collect::<Result<Vec<Share>>>()?;
                iso_cts_factors(rows, cols, &common, &shares, per_task).map_err(err)?
            }
            Family::Wudi => unreachable!("WUDI returned above"),
        };
        report.ranks = info.ranks;
        report.kept = info.kept;
        report.common_kept = info.common_kept;
        report.factor_ranks = info.factor_ranks;
        report.sigma = info.sigma;
        let block = block_rows(cols) * cols;
        let bytes = par_encode(
            plan.numel(),
            plan.out_dtype,
            block,
            |start, values, scratch: &mut (Vec<f64>, Vec<f64>)| {
                let end = start + values.len();
                factors.apply_rows(&base[start..end], start / cols, alpha, values, scratch);
            },
        );
        Ok((
            bytes,
            TensorOutcome {
                subspace: Some(report),
                ..TensorOutcome::default()
            },
        ))
    }
}

fn zero_tasks(zero: impl Iterator<Item = bool>) -> Vec<usize> {
    zero.enumerate()
        .filter(|(_, z)| *z)
        .map(|(k, _)| k)
        .collect()
}

/// `W_C + α·mean_k τ_k` on a 1-D tensor (SPEC §8).
fn vector(t: &MergekitTensor<'_>) -> Result<Vec<u8>> {
    let alpha = t.number("alpha", None)?;
    let base = t.base()?;
    let views = &t.contributors;
    Ok(par_encode(
        t.plan.numel(),
        t.plan.out_dtype,
        CHUNK_ELEMENTS,
        |start, values, (b, bufs): &mut (Vec<f32>, Vec<Vec<f32>>)| {
            read(base, start, values.len(), b);
            bufs.resize_with(views.len(), Vec::new);
            for (buf, view) in bufs.iter_mut().zip(views) {
                read(view, start, values.len(), buf);
            }
            let refs: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
            mean_update(b, &refs, alpha, values);
        },
    ))
}

/// Task arithmetic, `W_C + λ Σ w_k τ_k` (SPEC §3), on the other tensors.
fn task_arithmetic(t: &MergekitTensor<'_>) -> Result<Vec<u8>> {
    let weights: Vec<f32> = (0..t.contributors.len())
        .map(|k| t.number("weight", Some(k)).map(|w| w as f32))
        .collect::<Result<_>>()?;
    let lambda = t.number("lambda", None)? as f32;
    let base = t.base()?;
    let views = &t.contributors;
    type Scratch = (Vec<f32>, Vec<Vec<f32>>, Vec<f32>);
    Ok(par_encode(
        t.plan.numel(),
        t.plan.out_dtype,
        CHUNK_ELEMENTS,
        |start, values, (b, taus, scratch): &mut Scratch| {
            read(base, start, values.len(), b);
            taus.resize_with(views.len(), Vec::new);
            for (tau, view) in taus.iter_mut().zip(views) {
                read(view, start, values.len(), tau);
                mergekit::subtract(tau, b);
            }
            let refs: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
            task_arithmetic_combine(b, &refs, &weights, false, false, lambda, scratch, values);
        },
    ))
}
