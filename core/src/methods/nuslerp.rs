//! `nuslerp` (mergekit's NuSLERP): slerp of two models by `t = w₁ / (w₀ +
//! w₁)`, over the whole tensor or per row or column; with a base, of the
//! two task vectors, added back to the base. The formula is
//! [`crate::sphere::nuslerp`].

use super::mergekit::{self, encode, flag, weight, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use crate::sphere::{nuslerp, Lanes};
use std::any::Any;

/// The method.
pub struct NuSlerp;

impl Method for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn summary(&self) -> &'static str {
        "slerp of two models (or their task vectors over the base) by `t = w₁/(w₀ + w₁)`, whole or per row or column"
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
            flag("nuslerp_row_wise", false),
            flag("nuslerp_flatten", true),
        ]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::TwoExactly, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan_optional(config, inputs, Counts::TwoExactly, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let (w0, w1) = (t.number("weight", Some(0))?, t.number("weight", Some(1))?);
        // mergekit's choice for weights that cancel: the midpoint.
        let share = if (w0 + w1).abs() < 1e-6 {
            0.5
        } else {
            w1 / (w0 + w1)
        };
        let shape = &t.plan.shape;
        let lanes = if t.flag("nuslerp_flatten") {
            Lanes::flat(t.plan.numel())
        } else if t.flag("nuslerp_row_wise") {
            Lanes::first_axis(shape)
        } else {
            Lanes::last_axis(shape)
        };
        let mut out = vec![0f32; t.plan.numel()];
        if t.base.is_some() {
            let base = crate::engine::chunks::read_all(t.base()?);
            let taus = t.task_vectors()?;
            nuslerp(share, &taus[0], &taus[1], lanes, &mut out);
            out.iter_mut().zip(&base).for_each(|(o, b)| *o += b);
        } else {
            let models = t.decoded();
            nuslerp(share, &models[0], &models[1], lanes, &mut out);
        }
        Ok((encode(&out, t.plan.out_dtype), TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
