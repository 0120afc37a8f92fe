//! `ram` and `ramplus_tl` (mergekit's Reinforced Agent Merging, tensor
//! local): an entry changed by one model keeps that model's change (by
//! `ramplus_tl` rescaled by how much the model shares with the others), one
//! changed by several takes the mean of their changes. One module for the
//! two: they share the kernel [`crate::consensus::ram`].

use super::mergekit::{self, encode, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::consensus::{ram, RamPlus};
use crate::engine::chunks::read_all;
use crate::engine::MergePart;
use crate::error::Result;
use crate::plan::{Inputs, Plan};
use crate::report::{Sparsity, TensorOutcome};
use std::any::Any;

/// One member of the family, as registered.
pub struct Ram {
    name: &'static str,
    summary: &'static str,
    plus: bool,
}

/// `ram`: unique changes kept, shared ones averaged.
pub const RAM: Ram = Ram {
    name: "ram",
    summary:
        "RAM: an entry changed by one model keeps its change, one changed by several their mean",
    plus: false,
};

/// `ramplus_tl`: `ram` with each model's unique changes rescaled by its overlap ratio.
pub const RAMPLUS_TL: Ram = Ram {
    name: "ramplus_tl",
    summary: "RAM+ (tensor-local): RAM with each model's unique changes scaled by `1 + r·clamp(shared/unique, 0, α)`",
    plus: true,
};

impl Method for Ram {
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

    /// mergekit's names and defaults.
    fn params(&self) -> Vec<ParamDef> {
        let number = |name, kind, default| {
            mergekit::def(name, Scope::Shared, kind, ParamDefault::Number(default))
        };
        let mut defs = Vec::new();
        if self.plus {
            defs.push(number("r", Kind::ANY, 0.1));
            defs.push(number("alpha", Kind::NON_NEGATIVE, 0.2));
        }
        defs.push(number("epsilon", Kind::NON_NEGATIVE, 1e-5));
        defs
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
        let epsilon = t.number("epsilon", None)? as f32;
        let plus = if self.plus {
            Some(RamPlus {
                r: t.number("r", None)?,
                alpha: t.number("alpha", None)?,
            })
        } else {
            None
        };
        let base = read_all(t.base()?);
        let models = t.decoded();
        let slices: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; base.len()];
        let lambdas = ram(&base, &slices, epsilon, plus, &mut out);
        // ramplus_tl's λ_k, shown as the factor of each model's unique entries.
        let sparsity = if self.plus {
            t.plan
                .contributors
                .iter()
                .zip(&slices)
                .zip(&lambdas)
                .map(|((&contributor, m), &lambda)| Sparsity {
                    contributor,
                    kept: m
                        .iter()
                        .zip(&base)
                        .filter(|(x, b)| (**x - **b).abs() > epsilon)
                        .count() as u64,
                    rescale: Some(lambda as f32),
                })
                .collect()
        } else {
            Vec::new()
        };
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
