//! `multislerp` (mergekit's Multi-SLERP): the weighted spherical
//! barycentre of the models (with a base, of their task vectors, added
//! back to it), scaled by the weighted mean norm. The formula is
//! [`crate::sphere::multislerp`].

use super::mergekit::{self, encode, flag, weight, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::read_all;
use crate::engine::MergePart;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use crate::sphere::multislerp;
use std::any::Any;

/// The method.
pub struct MultiSlerp;

impl Method for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn summary(&self) -> &'static str {
        "the weighted spherical barycentre of several models (or task vectors over the base), at their weighted mean norm"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Optional
    }

    /// mergekit's names and defaults.
    fn params(&self) -> Vec<ParamDef> {
        vec![
            weight(),
            flag("normalize_weights", true),
            mergekit::def(
                "eps",
                Scope::Shared,
                Kind::POSITIVE,
                ParamDefault::Number(1e-8),
            ),
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
        let weights = (0..t.contributors.len())
            .map(|k| t.number("weight", Some(k)))
            .collect::<Result<Vec<f64>>>()?;
        let base = t.base.as_ref().map(read_all);
        let models = t.decoded();
        let slices: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; t.plan.numel()];
        multislerp(
            &slices,
            base.as_deref(),
            &weights,
            t.flag("normalize_weights"),
            t.number("eps", None)?,
            &mut out,
        )
        .map_err(|e| {
            Error::new(ErrorKind::InvalidInput, format!("multislerp: {e}"))
                .with_file(merge.config().source.clone().unwrap_or_default())
                .with_tensor(&t.plan.name)
        })?;
        Ok((encode(&out, t.plan.out_dtype), TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
