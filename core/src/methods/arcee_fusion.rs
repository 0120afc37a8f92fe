//! `arcee_fusion` (mergekit's Arcee Fusion): the base takes the other
//! model's change where its importance (the change's size times the KL
//! divergence of the two rows' softmax) passes `median + 1.5·IQR`. The
//! formula is [`crate::consensus::arcee_fusion`].

use super::mergekit::{self, encode, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::{MergeConfig, MethodSettings};
use crate::consensus::{arcee_fusion, last_axis_len};
use crate::engine::chunks::read_all;
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::{Sparsity, TensorOutcome};
use std::any::Any;

/// The method.
pub struct ArceeFusion;

impl Method for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn summary(&self) -> &'static str {
        "Arcee Fusion: the other model's changes where their size times the rows' softmax KL divergence passes median + 1.5·IQR"
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    fn params(&self) -> Vec<ParamDef> {
        Vec::new()
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
        let base = read_all(t.base()?);
        let other = read_all(&t.contributors[0]);
        let mut out = vec![0f32; base.len()];
        let (kept, _) = arcee_fusion(&base, &other, last_axis_len(&t.plan.shape), &mut out);
        Ok((
            encode(&out, t.plan.out_dtype),
            TensorOutcome {
                sparsity: vec![Sparsity {
                    contributor: t.plan.contributors[0],
                    kept: kept as u64,
                    rescale: None,
                }],
                ..TensorOutcome::default()
            },
        ))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
