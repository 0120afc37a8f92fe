//! `slerp`: spherical interpolation between the base and one model by
//! the angle between the two whole tensors (mergekit's semantics: linear
//! when they are nearly colinear, |cos| > 0.9995).

use super::mergekit::elementwise;
use super::mergekit::{self, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::config::params::ParamDef;
use crate::config::params::{Default as ParamDefault, Kind, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::engine::chunks::read;
use crate::engine::MergePart;
use crate::engine::CHUNK_ELEMENTS;
use crate::error::Result;
use crate::io::TensorView;
use crate::plan::{Inputs, Plan};
use crate::report::TensorOutcome;
use rayon::prelude::*;
use std::any::Any;

/// The method.
pub struct Slerp;

/// `[⟨a,a⟩, ⟨b,b⟩, ⟨a,b⟩]` over two whole tensors, in f64, summed per chunk
/// and then in chunk order.
fn chunk_products(a: &TensorView<'_>, b: &TensorView<'_>) -> [f64; 3] {
    let n = a.numel();
    let parts: Vec<[f64; 3]> = (0..n.div_ceil(CHUNK_ELEMENTS))
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(x, y), chunk| {
                let start = chunk * CHUNK_ELEMENTS;
                let len = CHUNK_ELEMENTS.min(n - start);
                read(a, start, len, x);
                read(b, start, len, y);
                [
                    crate::reduce::sum_squares(x),
                    crate::reduce::sum_squares(y),
                    crate::reduce::dot(x, y),
                ]
            },
        )
        .collect();
    parts.iter().fold([0.0; 3], |acc, p| {
        [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]]
    })
}

impl Method for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }

    fn summary(&self) -> &'static str {
        "spherical interpolation between the base and one model"
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
            Kind::ANY,
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
        let t_value = t.number("t", None)?;
        let (a, b) = (t.base()?, &t.contributors[0]);
        let [aa, bb, ab] = chunk_products(a, b);
        let norm = |x: f64| if x.sqrt() <= 1e-8 { 1.0 } else { x.sqrt() };
        let dot = (ab / (norm(aa) * norm(bb))).clamp(-1.0, 1.0);
        let (s0, s1) = if dot.abs() > 0.9995 {
            (1.0 - t_value, t_value)
        } else {
            let theta = dot.acos();
            let sin = theta.sin();
            (
                ((1.0 - t_value) * theta).sin() / sin,
                (t_value * theta).sin() / sin,
            )
        };
        let (s0, s1) = (s0 as f32, s1 as f32);
        Ok((
            elementwise(a, b, t.plan.out_dtype, |p, q| s0 * p + s1 * q),
            TensorOutcome::default(),
        ))
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}
