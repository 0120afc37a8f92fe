//! Per-tensor parameters as mergekit has them (mergekit 0.1.5 semantics):
//!
//! - a scalar;
//! - a list of numbers, a *gradient*, interpolated piecewise-linearly over
//!   the layer position `t = layer / (layers − 1)` of the tensor (`t = 1`
//!   for a single layer; tensors outside the decoder layers, such as
//!   embeddings, the final norm and `lm_head`, get `t = 0`):
//!   `s = t·(n − 1)`, `i = ⌊s⌋`, `v = (1 − (s − i))·v[i] + (s − i)·v[min(i + 1, n − 1)]`;
//! - a list of `{filter, value}` entries: the first entry whose `filter` is
//!   a substring of the tensor name (or is missing, or `"*"`) gives the
//!   value, itself a scalar or a gradient; when none matches, the lookup
//!   falls through to the next level.
//!
//! Precedence: the model's own `parameters`, then the global ones, then the
//! method's default. Method-wide ("shared") parameters are only global.

use super::ParamValue;
use crate::error::{Error, ErrorKind, Result};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// A validated parameter setting.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// One value for every tensor.
    Value(Scalar),
    /// Interpolated over the layer position.
    Gradient(Vec<f64>),
    /// `{filter, value}` entries, first match wins (`None` matches every tensor).
    Filtered(Vec<(Option<String>, Setting)>),
}

/// A scalar parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A word.
    Text(String),
}

impl Setting {
    /// The value for tensor `name` at layer position `t`, or `None` when no
    /// filter matches.
    pub fn at(&self, name: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Value(v) => Some(v.clone()),
            Setting::Gradient(points) => Some(Scalar::Number(interpolate(points, t))),
            Setting::Filtered(entries) => entries
                .iter()
                .find(|(filter, _)| {
                    filter
                        .as_deref()
                        .is_none_or(|f| f == "*" || name.contains(f))
                })
                .and_then(|(_, s)| s.at(name, t)),
        }
    }

    /// Every number this setting can produce (the gradient's points, each
    /// filter's values), for range checks.
    fn numbers(&self) -> Vec<f64> {
        match self {
            Setting::Value(Scalar::Number(x)) => vec![*x],
            Setting::Value(_) => Vec::new(),
            Setting::Gradient(points) => points.clone(),
            Setting::Filtered(entries) => entries.iter().flat_map(|(_, s)| s.numbers()).collect(),
        }
    }
}

/// Piecewise-linear interpolation of `points` at `t ∈ [0, 1]` (mergekit's gradient).
pub fn interpolate(points: &[f64], t: f64) -> f64 {
    match points.len() {
        0 => 0.0,
        1 => points[0],
        n => {
            let scaled = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i0 = (scaled.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            let frac = scaled - i0 as f64;
            (1.0 - frac) * points[i0] + frac * points[i1]
        }
    }
}

pub use crate::layers::layer_position;

/// Where a parameter may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Globally or per model (per model wins).
    PerModel,
    /// Only globally: it configures the method, not a model.
    Shared,
}

/// What values a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A number in `[min, max]`, or `(min, max]` when `min_open`.
    Number {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
        /// Whether `min` itself is excluded.
        min_open: bool,
    },
    /// `true` or `false`.
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A list of numbers (FAM's `lambda_grid`; read by the method itself).
    NumberList,
}

impl Kind {
    /// Any finite number.
    pub const ANY: Kind = Kind::Number {
        min: f64::MIN,
        max: f64::MAX,
        min_open: false,
    };
    /// `[0, 1]`.
    pub const UNIT: Kind = Kind::Number {
        min: 0.0,
        max: 1.0,
        min_open: false,
    };
    /// `(0, 1]`.
    pub const DENSITY: Kind = Kind::Number {
        min: 0.0,
        max: 1.0,
        min_open: true,
    };
    /// `≥ 0`.
    pub const NON_NEGATIVE: Kind = Kind::Number {
        min: 0.0,
        max: f64::MAX,
        min_open: false,
    };
    /// `> 0`.
    pub const POSITIVE: Kind = Kind::Number {
        min: 0.0,
        max: f64::MAX,
        min_open: true,
    };

    fn describe(&self) -> String {
        match self {
            Kind::Number { min, max, min_open } => match (*min == f64::MIN, *max == f64::MAX) {
                (true, true) => "a finite number".to_string(),
                (false, true) => format!("a number {} {min}", if *min_open { ">" } else { "≥" }),
                _ => format!(
                    "a number in {}{min}, {max}]",
                    if *min_open { "(" } else { "[" }
                ),
            },
            Kind::Bool => "true or false".to_string(),
            Kind::Choice(words) => format!("one of {}", words.join(", ")),
            Kind::NumberList => "a list of numbers".to_string(),
        }
    }

    fn accepts_number(&self, x: f64) -> bool {
        match self {
            Kind::Number { min, max, min_open } => {
                x.is_finite() && x <= *max && if *min_open { x > *min } else { x >= *min }
            }
            _ => false,
        }
    }
}

/// A default value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A word.
    Text(&'static str),
    /// None: the parameter must be given (for every model it applies to).
    Required,
}

/// One parameter a method accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamDef {
    /// Its name.
    pub name: &'static str,
    /// Where it may be given.
    pub scope: Scope,
    /// Its values.
    pub kind: Kind,
    /// Its default.
    pub default: Default,
}

/// Validated parameters of a merge: global ones and one map per model.
#[derive(Debug, Clone, PartialEq, std::default::Default)]
pub struct Params {
    /// The method's parameter definitions.
    pub defs: Vec<ParamDef>,
    /// Global `parameters`.
    pub global: BTreeMap<String, Setting>,
    /// Each model's `parameters`, in config order.
    pub per_model: Vec<BTreeMap<String, Setting>>,
}

fn param_error(at: &Spanned<ParamValue>, key: &str, problem: impl std::fmt::Display) -> Error {
    super::config_error(Some(&at.referenced), key, problem)
}

/// Converts a raw value into a setting of `kind`, checking every number.
fn setting(raw: &Spanned<ParamValue>, key: &str, kind: Kind, nested: bool) -> Result<Setting> {
    let bad = |found: &ParamValue| {
        param_error(
            raw,
            key,
            format!("expected {}, found {found}", kind.describe()),
        )
    };
    let scalar = |v: &ParamValue| -> Result<Scalar> {
        match (v, kind) {
            (ParamValue::Number(x), Kind::Number { .. }) if kind.accepts_number(*x) => {
                Ok(Scalar::Number(*x))
            }
            (ParamValue::Bool(b), Kind::Bool) => Ok(Scalar::Bool(*b)),
            (ParamValue::Text(t), Kind::Choice(words)) if words.contains(&t.as_str()) => {
                Ok(Scalar::Text(t.clone()))
            }
            (other, _) => Err(bad(other)),
        }
    };
    match &raw.value {
        ParamValue::List(items)
            if items.iter().all(|i| matches!(i, ParamValue::Number(_))) && !items.is_empty() =>
        {
            if !matches!(kind, Kind::Number { .. }) {
                return Err(bad(&raw.value));
            }
            let points: Vec<f64> = items
                .iter()
                .map(|i| match i {
                    ParamValue::Number(x) if kind.accepts_number(*x) => Ok(*x),
                    other => Err(param_error(
                        raw,
                        key,
                        format!("gradient point {other} is not {}", kind.describe()),
                    )),
                })
                .collect::<Result<_>>()?;
            Ok(Setting::Gradient(points))
        }
        ParamValue::List(items) if !nested => {
            let mut entries = Vec::new();
            for item in items {
                let ParamValue::Map(map) = item else {
                    return Err(param_error(
                        raw,
                        key,
                        "a list must hold only numbers (a gradient) or only {filter, value} entries",
                    ));
                };
                entries.push(filter_entry(raw, key, kind, map)?);
            }
            Ok(Setting::Filtered(entries))
        }
        ParamValue::Map(map) if !nested => {
            Ok(Setting::Filtered(vec![filter_entry(raw, key, kind, map)?]))
        }
        other => Ok(Setting::Value(scalar(other)?)),
    }
}

fn filter_entry(
    raw: &Spanned<ParamValue>,
    key: &str,
    kind: Kind,
    map: &BTreeMap<String, ParamValue>,
) -> Result<(Option<String>, Setting)> {
    if let Some(unknown) = map.keys().find(|k| *k != "filter" && *k != "value") {
        return Err(param_error(
            raw,
            key,
            format!("unknown key `{unknown}` in a filter entry; expected `filter` and `value`"),
        ));
    }
    let filter = match map.get("filter") {
        None => None,
        Some(ParamValue::Text(f)) => Some(f.clone()),
        Some(other) => {
            return Err(param_error(
                raw,
                key,
                format!("`filter` must be a string, found {other}"),
            ))
        }
    };
    let value = map
        .get("value")
        .ok_or_else(|| param_error(raw, key, "a filter entry needs a `value`"))?;
    let spanned = Spanned::new(value.clone(), raw.referenced, raw.defined);
    Ok((filter, setting(&spanned, key, kind, true)?))
}

impl Params {
    /// Validates raw parameter blocks against a method's definitions.
    /// `applies_to(i)` says whether model `i` takes per-model parameters
    /// (mergekit: not the base model).
    pub fn validate(
        method: &str,
        defs: &[ParamDef],
        global: &super::RawParams,
        per_model: &[&super::RawParams],
    ) -> Result<Params> {
        let find = |key: &str| defs.iter().find(|d| d.name == key);
        let names = || defs.iter().map(|d| d.name).collect::<Vec<_>>().join(", ");
        let mut params = Params {
            defs: defs.to_vec(),
            ..Params::default()
        };
        for (key, raw) in global {
            let def = find(key).ok_or_else(|| {
                param_error(
                    raw,
                    key,
                    format!(
                        "unknown parameter for {method}; expected one of: {}",
                        names()
                    ),
                )
            })?;
            params
                .global
                .insert(key.clone(), setting(raw, key, def.kind, false)?);
        }
        for (i, block) in per_model.iter().enumerate() {
            let mut map = BTreeMap::new();
            for (key, raw) in block.iter() {
                let def = find(key).ok_or_else(|| {
                    param_error(
                        raw,
                        key,
                        format!(
                            "unknown parameter for {method} in models[{i}]; expected one of: {}",
                            names()
                        ),
                    )
                })?;
                if def.scope == Scope::Shared {
                    return Err(param_error(
                        raw,
                        key,
                        format!("`{key}` configures the method, not a model: give it under the top-level `parameters`"),
                    ));
                }
                map.insert(key.clone(), setting(raw, key, def.kind, false)?);
            }
            params.per_model.push(map);
        }
        Ok(params)
    }

    fn def(&self, key: &str) -> &ParamDef {
        self.defs
            .iter()
            .find(|d| d.name == key)
            .unwrap_or_else(|| panic!("parameter `{key}` is not defined for this method"))
    }

    /// The value of `key` for `model` (`None`: a shared parameter) on tensor
    /// `name` at layer position `t`: per-model, then global, then default.
    pub fn get(&self, key: &str, model: Option<usize>, name: &str, t: f64) -> Option<Scalar> {
        let own = model
            .and_then(|m| self.per_model.get(m))
            .and_then(|p| p.get(key))
            .and_then(|s| s.at(name, t));
        own.or_else(|| self.global.get(key).and_then(|s| s.at(name, t)))
            .or_else(|| match self.def(key).default {
                Default::Number(x) => Some(Scalar::Number(x)),
                Default::Bool(b) => Some(Scalar::Bool(b)),
                Default::Text(t) => Some(Scalar::Text(t.to_string())),
                Default::Required => None,
            })
    }

    /// A number parameter; an error naming the tensor and model when a
    /// required one has no value there.
    pub fn number(&self, key: &str, model: Option<usize>, name: &str, t: f64) -> Result<f64> {
        match self.get(key, model, name, t) {
            Some(Scalar::Number(x)) => Ok(x),
            _ => Err(Error::new(
                ErrorKind::Config,
                match model {
                    Some(m) => format!("parameter `{key}` has no value for models[{m}] on this tensor (no filter matches and no default)"),
                    None => format!("parameter `{key}` has no value on this tensor (no filter matches and no default)"),
                },
            )
            .with_tensor(name)),
        }
    }

    /// A boolean parameter (shared).
    pub fn flag(&self, key: &str, name: &str, t: f64) -> bool {
        matches!(self.get(key, None, name, t), Some(Scalar::Bool(true)))
    }

    /// Checks that every required parameter has a value for each model in
    /// `models` wherever a tensor could ask (a filter list without a
    /// catch-all is checked per tensor when merging).
    pub fn check_required(
        &self,
        models: &[usize],
        describe: impl Fn(usize) -> String,
    ) -> Result<()> {
        for def in self.defs.iter().filter(|d| d.default == Default::Required) {
            let targets: Vec<Option<usize>> = match def.scope {
                Scope::Shared => vec![None],
                Scope::PerModel => models.iter().map(|&m| Some(m)).collect(),
            };
            for target in targets {
                let own = target
                    .and_then(|m| self.per_model.get(m))
                    .and_then(|p| p.get(def.name));
                if own.is_none() && !self.global.contains_key(def.name) {
                    let whom = target
                        .map(&describe)
                        .unwrap_or_else(|| "the method".to_string());
                    return Err(super::config_error(
                        None,
                        def.name,
                        format!("required parameter missing for {whom}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every number a parameter can take anywhere (for reports and checks).
    pub fn numbers(&self, key: &str) -> Vec<f64> {
        self.global
            .get(key)
            .into_iter()
            .chain(self.per_model.iter().filter_map(|p| p.get(key)))
            .flat_map(Setting::numbers)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = [0.0, 1.0, 0.5];
        assert_eq!(interpolate(&g, 0.0), 0.0);
        assert_eq!(interpolate(&g, 0.25), 0.5);
        assert_eq!(interpolate(&g, 0.5), 1.0);
        assert_eq!(interpolate(&g, 0.75), 0.75);
        assert_eq!(interpolate(&g, 1.0), 0.5);
        assert_eq!(layer_position("model.layers.3.mlp.up_proj.weight", 4), 1.0);
        assert_eq!(layer_position("model.layers.1.mlp.up_proj.weight", 5), 0.25);
        assert_eq!(layer_position("model.norm.weight", 5), 0.0);
        assert_eq!(layer_position("lm_head.weight", 5), 0.0);
        assert_eq!(
            layer_position("model.layers.0.self_attn.q_proj.weight", 1),
            1.0
        );
    }

    #[test]
    fn filters_take_the_first_match() {
        let s = Setting::Filtered(vec![
            (
                Some("self_attn".into()),
                Setting::Value(Scalar::Number(0.1)),
            ),
            (Some("mlp".into()), Setting::Gradient(vec![0.0, 1.0])),
            (None, Setting::Value(Scalar::Number(0.5))),
        ]);
        assert_eq!(
            s.at("model.layers.0.self_attn.q_proj.weight", 0.3),
            Some(Scalar::Number(0.1))
        );
        assert_eq!(
            s.at("model.layers.0.mlp.up_proj.weight", 0.25),
            Some(Scalar::Number(0.25))
        );
        assert_eq!(s.at("model.norm.weight", 0.0), Some(Scalar::Number(0.5)));
        let partial = Setting::Filtered(vec![(
            Some("mlp".into()),
            Setting::Value(Scalar::Number(1.0)),
        )]);
        assert_eq!(partial.at("model.norm.weight", 0.0), None);
    }
}
