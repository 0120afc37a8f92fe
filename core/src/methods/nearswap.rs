//! `nearswap`: per element, `w = clamp(t / |a − b|, 0, 1)` of the other
//! model and `1 − w` of the base: a swap where the two models are close.

use super::mergekit::elementwise;
use super::mergekit::{self, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::params::{Default as ParamDefault, Kind, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use std::any::Any;

/// The method.
pub struct Nearswap;

impl Method for Nearswap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn summary(&self) -> &'static str {
        "interpolation towards the base where the two models are close"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![mergekit::def(
            "t",
            Scope::Shared,
            Kind::POSITIVE,
            ParamDefault::Required,
        )]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::OneBesidesBase, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan_optional(config, inputs, Counts::OneBesidesBase, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let t_value = t.number("t", None)? as f32;
        let (a, b) = (t.base()?, &t.contributors[0]);
        let bytes = elementwise(a, b, t.plan.out_dtype, |p, q| {
            let w = (t_value / (p - q).abs().max(1e-6)).clamp(0.0, 1.0);
            w * q + (1.0 - w) * p
        });
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
