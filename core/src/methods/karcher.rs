//! `karcher` (mergekit's Karcher mean): the Riemannian mean of every
//! model's direction (the base's too, when it is not listed under
//! `models`: mergekit appends it), with equal weights, at the models' mean
//! norm. The formula is [`crate::sphere::karcher`].

use super::mergekit::{self, base_is_extra_input, encode, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::read_all;
use crate::engine::MergePart;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use crate::sphere::karcher;
use std::any::Any;

/// The method.
pub struct Karcher;

impl Method for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn summary(&self) -> &'static str {
        "the Karcher (Riemannian) mean of the models' directions, at their mean norm"
    }

    fn roles(&self) -> Roles {
        Roles::AllModels
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Optional
    }

    /// mergekit's names and defaults.
    fn params(&self) -> Vec<ParamDef> {
        let number = |name, default| {
            mergekit::def(
                name,
                Scope::Shared,
                Kind::NON_NEGATIVE,
                ParamDefault::Number(default),
            )
        };
        vec![number("max_iter", 10.0), number("tol", 1e-5)]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let params = mergekit::params(config)?;
        mergekit::plan_optional(config, inputs, Counts::AtLeastOne, &|info, t| {
            let max_iter = params.number("max_iter", None, &info.name, t).ok()?;
            (max_iter.fract() != 0.0).then(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("parameter `max_iter` is a number of iterations, got {max_iter}"),
                )
                .with_file(config.source.clone().unwrap_or_default())
                .with_tensor(&info.name)
            })
        })
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let max_iter = t.number("max_iter", None)? as usize;
        let tol = t.number("tol", None)?;
        let mut models = Vec::new();
        if let (true, Some(base)) = (base_is_extra_input(merge.config()), &t.base) {
            models.push(read_all(base));
        }
        models.extend(t.decoded());
        let slices: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; t.plan.numel()];
        karcher(&slices, max_iter, tol, &mut out);
        Ok((encode(&out, t.plan.out_dtype), TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
