//! `linear` (SPEC §3): `W* = Σ w_k W_k / Σ w_k`, undivided when
//! `normalize: false`. Every listed model is an input, and a base model
//! that is not listed under `models` too (mergekit appends it).

use super::mergekit::{self, base_is_extra_input, flag, weight, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::baselines::linear_combine;
use crate::config::params::ParamDef;
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::{par_encode, read};
use crate::engine::{MergePart, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use std::any::Any;

/// The method.
pub struct Linear;

impl Method for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn summary(&self) -> &'static str {
        "weighted average `Σ w_k W_k / Σ w_k`"
    }

    fn roles(&self) -> Roles {
        Roles::AllModels
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Optional
    }

    fn params(&self) -> Vec<ParamDef> {
        vec![weight(), flag("normalize", true)]
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        let params = mergekit::params(config)?;
        let extra = base_is_extra_input(config);
        mergekit::plan_optional(config, inputs, Counts::AtLeastOne, &|info, t| {
            (extra && params.number("weight", None, &info.name, t).is_err()).then(|| {
                Error::new(
                    ErrorKind::Config,
                    "linear weighs the base model too (it is not listed under `models`): give a global `weight` or list it with its own",
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
        let mut views: Vec<&TensorView<'_>> = Vec::new();
        let mut weights = Vec::new();
        if let (true, Some(base)) = (base_is_extra_input(merge.config()), &t.base) {
            views.push(base);
            weights.push(t.number("weight", None)? as f32);
        }
        for (k, view) in t.contributors.iter().enumerate() {
            views.push(view);
            weights.push(t.number("weight", Some(k))? as f32);
        }
        let normalize = t.flag("normalize");
        let bytes = par_encode(
            t.plan.numel(),
            t.plan.out_dtype,
            CHUNK_ELEMENTS,
            |start, values, bufs: &mut Vec<Vec<f32>>| {
                bufs.resize_with(views.len(), Vec::new);
                for (buf, view) in bufs.iter_mut().zip(&views) {
                    read(view, start, values.len(), buf);
                }
                let refs: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
                linear_combine(&refs, &weights, normalize, values);
            },
        );
        Ok((bytes, TensorOutcome::default()))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
