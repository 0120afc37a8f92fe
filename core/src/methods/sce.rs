//! `sce` (mergekit's SCE: select, calculate, erase): the elements whose
//! task vectors vary most across the models, each model weighted by the
//! energy of its task vector, sign conflicts erased. The formula is
//! [`crate::consensus::sce`].

use super::mergekit::{self, encode, flag, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::consensus::sce;
use crate::engine::chunks::read_all;
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::{Sparsity, TensorOutcome};
use std::any::Any;

/// The method.
pub struct Sce;

impl Method for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn summary(&self) -> &'static str {
        "SCE: top-variance selection, task vectors weighted by their energy, sign conflicts erased"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    /// mergekit's names and defaults.
    fn params(&self) -> Vec<ParamDef> {
        vec![
            mergekit::def(
                "select_topk",
                Scope::Shared,
                Kind::UNIT,
                ParamDefault::Number(1.0),
            ),
            flag("int8_mask", false),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan_optional(config, inputs, Counts::AtLeastOne, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let select_topk = t.number("select_topk", None)?;
        let base = read_all(t.base()?);
        let mut taus = t.task_vectors()?;
        let mut out = vec![0f32; base.len()];
        let mut slices: Vec<&mut [f32]> = taus.iter_mut().map(Vec::as_mut_slice).collect();
        sce(&base, &mut slices, select_topk, &mut out);
        // The non-zero entries of each task vector after the selection.
        let sparsity = t
            .plan
            .contributors
            .iter()
            .zip(&taus)
            .map(|(&contributor, tau)| Sparsity {
                contributor,
                kept: tau.iter().filter(|x| **x != 0.0).count() as u64,
                rescale: None,
            })
            .collect();
        Ok((
            encode(&out, t.plan.out_dtype),
            TensorOutcome {
                sparsity,
                ..TensorOutcome::default()
            },
        ))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
