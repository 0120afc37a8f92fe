//! `passthrough`: one model, each tensor multiplied by its `scale`
//! (mergekit's use: scaling chosen tensors with filters).

use super::mergekit::{self, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::params::{Default as ParamDefault, Kind, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::{par_encode, read};
use crate::engine::MergePart;
use crate::engine::CHUNK_ELEMENTS;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use std::any::Any;

/// The method.
pub struct Passthrough;

impl Method for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn summary(&self) -> &'static str {
        "one model, optionally scaled per tensor"
    }

    fn roles(&self) -> Roles {
        Roles::AllModels
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Optional
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![mergekit::def(
            "scale",
            Scope::PerModel,
            Kind::ANY,
            ParamDefault::Number(1.0),
        )]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::OneModel, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan(config, inputs, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let scale = t.number("scale", Some(0))? as f32;
        let view = &t.contributors[0];
        let bytes = par_encode(
            view.numel(),
            t.plan.out_dtype,
            CHUNK_ELEMENTS,
            |start, values, buf: &mut Vec<f32>| {
                read(view, start, values.len(), buf);
                for (v, x) in values.iter_mut().zip(buf.iter()) {
                    *v = scale * x;
                }
            },
        );
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
