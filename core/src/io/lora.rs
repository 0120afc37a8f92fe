//! LoRA adapters in PEFT's layout (`adapter_config.json` beside
//! `adapter_model.safetensors`), applied to a model while it is read:
//! mergekit's `model: path+adapter` references.
//!
//! The merged weight `W + s·B·A` (`A` `[r, in]`, `B` `[out, r]`,
//! `s = lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`) is never
//! written anywhere: a [`TensorView`](super::TensorView) of an adapted
//! weight carries a [`LowRank`] beside the base bytes, and every decode adds
//! `s·B·A` to the elements it reads. Memory is the adapter's mapped factors
//! plus one row of scratch per read.
//!
//! Determinism: each element is `w + s·Σ_k B[i,k]·A[k,j]`, the sum taken in
//! `k` order from zero, whichever range a read covers, so any chunking
//! gives the same bits.

use super::Checkpoint;
use crate::dtype::{decode_f32, Dtype};
use crate::error::{Error, ErrorKind, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The factors of one adapted weight, borrowed from the adapter's map.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    a: &'a [u8],
    a_dtype: Dtype,
    b: &'a [u8],
    b_dtype: Dtype,
    rank: usize,
    cols: usize,
    scale: f32,
}

impl LowRank<'_> {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale `s`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    fn a_at(&self, k: usize, j: usize) -> f32 {
        element(self.a_dtype, self.a, k * self.cols + j)
    }

    fn b_at(&self, i: usize, k: usize) -> f32 {
        element(self.b_dtype, self.b, i * self.rank + k)
    }

    /// Adds `s·(B·A)` to `out`, elements `[start, start + out.len())` of
    /// the row-major `[out_features, in_features]` weight.
    pub fn add_to(&self, start: usize, out: &mut [f32]) {
        let (cols, rank) = (self.cols, self.rank);
        if out.len() < cols {
            // A few elements (sampling): one dot product of length r each.
            for (offset, value) in out.iter_mut().enumerate() {
                let (i, j) = ((start + offset) / cols, (start + offset) % cols);
                let mut acc = 0.0f32;
                for k in 0..rank {
                    acc += self.b_at(i, k) * self.a_at(k, j);
                }
                *value += self.scale * acc;
            }
            return;
        }
        let mut a = vec![0.0f32; rank * cols];
        decode_f32(self.a_dtype, self.a, &mut a);
        let mut b_row = vec![0.0f32; rank];
        let mut acc = vec![0.0f32; cols];
        let end = start + out.len();
        let mut at = start;
        while at < end {
            let (i, j0) = (at / cols, at % cols);
            let j1 = cols.min(j0 + (end - at));
            let size = self.b_dtype.size();
            decode_f32(
                self.b_dtype,
                &self.b[i * rank * size..(i + 1) * rank * size],
                &mut b_row,
            );
            let acc = &mut acc[j0..j1];
            acc.fill(0.0);
            for (k, &c) in b_row.iter().enumerate() {
                for (s, &x) in acc.iter_mut().zip(&a[k * cols + j0..k * cols + j1]) {
                    *s += c * x;
                }
            }
            let dst = &mut out[at - start..at - start + (j1 - j0)];
            for (v, s) in dst.iter_mut().zip(acc.iter()) {
                *v += self.scale * s;
            }
            at += j1 - j0;
        }
    }
}

fn element(dtype: Dtype, bytes: &[u8], index: usize) -> f32 {
    let size = dtype.size();
    let mut x = [0.0f32];
    decode_f32(dtype, &bytes[index * size..(index + 1) * size], &mut x);
    x[0]
}

/// One adapted weight: its factors' names in the adapter file and its scale.
#[derive(Debug, Clone)]
struct Target {
    a: String,
    b: String,
    rank: usize,
    cols: usize,
    scale: f32,
}

/// A loaded adapter: its file (memory-mapped) and the weights it adapts,
/// by the base model's tensor names.
#[derive(Debug)]
pub struct Adapter {
    dir: PathBuf,
    file: Checkpoint,
    targets: HashMap<String, Target>,
}

/// The prefix PEFT gives every module name in a saved adapter.
const PEFT_PREFIX: &str = "base_model.model.";

impl Adapter {
    /// Reads the adapter at `dir` and checks it against `base`: every
    /// factor pair names a 2-D weight of the model with matching shapes, every
    /// `target_modules` entry matches a module of the model, and the factors
    /// are finite. Errors name the adapter's file and tensor or key.
    pub fn load(dir: &Path, base: &Checkpoint) -> Result<Adapter> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read(&config_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    "no adapter_config.json: a LoRA reference `model+adapter` names a PEFT adapter directory",
                )
                .with_file(&config_path)
            } else {
                Error::io(&config_path, e)
            }
        })?;
        let config: Value = serde_json::from_slice(&text).map_err(|e| {
            Error::new(ErrorKind::Format, format!("not JSON: {e}")).with_file(&config_path)
        })?;
        let bad = |key: &str, why: String| {
            Error::new(ErrorKind::Format, why)
                .with_file(&config_path)
                .with_tensor(key)
        };
        let rank = config
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", "expected the rank, a whole number ≥ 1".into()))?
            as usize;
        let alpha = match config.get("lora_alpha") {
            None => rank as f64,
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad("lora_alpha", "expected a number".into()))?,
        };
        let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
        for (key, why) in [
            (
                "use_dora",
                "DoRA adapters (a magnitude vector per weight) are not supported",
            ),
            (
                "fan_in_fan_out",
                "adapters of transposed (Conv1D, GPT-2 style) weights are not supported",
            ),
        ] {
            if flag(key) {
                return Err(bad(key, why.into()));
            }
        }
        if let Some(saved) = config
            .get("modules_to_save")
            .and_then(Value::as_array)
            .filter(|m| !m.is_empty())
        {
            return Err(bad(
                "modules_to_save",
                format!(
                    "the adapter saves whole modules ({} of them); only LoRA factors are supported",
                    saved.len()
                ),
            ));
        }
        let rslora = flag("use_rslora");
        let patterns = |key: &str| -> Result<Vec<(Regex, Value)>> {
            let Some(map) = config.get(key).and_then(Value::as_object) else {
                return Ok(Vec::new());
            };
            map.iter()
                .map(|(pattern, value)| {
                    Regex::new(&format!(r"^(.*\.)?({pattern})$"))
                        .map(|re| (re, value.clone()))
                        .map_err(|e| bad(key, format!("`{pattern}` is not a pattern: {e}")))
                })
                .collect()
        };
        let rank_pattern = patterns("rank_pattern")?;
        let alpha_pattern = patterns("alpha_pattern")?;
        let file = Checkpoint::open(dir)?;
        let file_path = file
            .shard_paths()
            .first()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| dir.to_path_buf());
        let tensor_error = |name: &str, why: String| {
            Error::new(ErrorKind::Format, why)
                .with_file(&file_path)
                .with_tensor(name)
        };
        let mut factors: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
        for t in file.tensors() {
            let Some(module_part) = t.name.strip_prefix(PEFT_PREFIX) else {
                return Err(tensor_error(
                    &t.name,
                    format!("not a PEFT adapter tensor (names start with `{PEFT_PREFIX}`)"),
                ));
            };
            let stem = module_part
                .strip_suffix(".weight")
                .map(|s| s.strip_suffix(".default").unwrap_or(s));
            let split = stem.and_then(|s| {
                s.strip_suffix(".lora_A")
                    .map(|m| (m, true))
                    .or_else(|| s.strip_suffix(".lora_B").map(|m| (m, false)))
            });
            let Some((module, is_a)) = split else {
                let why = if t.name.contains("lora_embedding") {
                    "an embedding adapter (lora_embedding_A/B): only adapters of linear layers are supported".to_string()
                } else if t.name.contains("lora_magnitude") {
                    "a DoRA magnitude vector: DoRA adapters are not supported".to_string()
                } else {
                    "neither a lora_A nor a lora_B factor (bias and modules_to_save tensors are not supported)".to_string()
                };
                return Err(tensor_error(&t.name, why));
            };
            let entry = factors.entry(module.to_string()).or_default();
            if is_a {
                entry.0 = Some(t.name.clone());
            } else {
                entry.1 = Some(t.name.clone());
            }
        }
        let mut targets = HashMap::new();
        let mut modules: Vec<&String> = factors.keys().collect();
        modules.sort();
        for module in modules {
            let (a, b) = &factors[module];
            let (Some(a), Some(b)) = (a, b) else {
                let present = a.as_ref().or(b.as_ref()).expect("one factor");
                return Err(tensor_error(
                    present,
                    "has no partner factor (every module needs lora_A and lora_B)".into(),
                ));
            };
            let weight = format!("{module}.weight");
            let Some(info) = base.info(&weight) else {
                return Err(tensor_error(
                    a,
                    format!(
                        "adapts `{weight}`, which {} does not have",
                        base.root().display()
                    ),
                ));
            };
            let (a_info, b_info) = (file.info(a).expect("listed"), file.info(b).expect("listed"));
            let [out, cols] = info.shape[..] else {
                return Err(tensor_error(
                    a,
                    format!(
                        "adapts `{weight}` of shape {:?}, which is not a 2-D weight",
                        info.shape
                    ),
                ));
            };
            let r = a_info.shape.first().copied().unwrap_or(0);
            if a_info.shape != [r, cols] || b_info.shape != [out, r] || r == 0 {
                return Err(tensor_error(
                    a,
                    format!(
                        "factors of shapes {:?} (A) and {:?} (B) do not fit `{weight}` of shape [{out}, {cols}] (A must be [r, {cols}], B [{out}, r])",
                        a_info.shape, b_info.shape
                    ),
                ));
            }
            let wanted = rank_pattern
                .iter()
                .find(|(re, _)| re.is_match(module))
                .and_then(|(_, v)| v.as_u64())
                .map_or(rank, |r| r as usize);
            if r != wanted {
                return Err(tensor_error(
                    a,
                    format!("has rank {r}, but adapter_config.json says {wanted}"),
                ));
            }
            for factor in [a, b] {
                let view = file.view(factor).expect("listed");
                if !view.dtype.is_float() || crate::dtype::nonfinite(view.dtype, view.data).0 > 0 {
                    return Err(tensor_error(factor, "is not a finite float tensor".into()));
                }
            }
            let alpha = alpha_pattern
                .iter()
                .find(|(re, _)| re.is_match(module))
                .and_then(|(_, v)| v.as_f64())
                .unwrap_or(alpha);
            let scale = if rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            targets.insert(
                weight,
                Target {
                    a: a.clone(),
                    b: b.clone(),
                    rank: r,
                    cols,
                    scale: scale as f32,
                },
            );
        }
        check_target_modules(&config, base, &config_path)?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            targets,
        })
    }

    /// The adapter's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The adapter's file, for fingerprints and change checks.
    pub(crate) fn file(&self) -> &Checkpoint {
        &self.file
    }

    /// The factors of the base tensor `name`, if the adapter adapts it.
    pub fn low_rank(&self, name: &str) -> Option<LowRank<'_>> {
        let t = self.targets.get(name)?;
        let (a, b) = (self.file.view(&t.a)?, self.file.view(&t.b)?);
        Some(LowRank {
            a: a.data,
            a_dtype: a.dtype,
            b: b.data,
            b_dtype: b.dtype,
            rank: t.rank,
            cols: t.cols,
            scale: t.scale,
        })
    }

    /// Drops the mapping of `name`'s factors (see [`Checkpoint::release`]).
    pub(crate) fn release(&self, name: &str) {
        if let Some(t) = self.targets.get(name) {
            self.file.release(&t.a);
            self.file.release(&t.b);
        }
    }

    /// The adapter with its targets renamed as the model's tensors are
    /// (a `slices:` window); targets the window leaves out are dropped.
    pub(crate) fn renamed(mut self, rename: &impl Fn(&str) -> Option<String>) -> Adapter {
        self.targets = std::mem::take(&mut self.targets)
            .into_iter()
            .filter_map(|(name, t)| rename(&name).map(|n| (n, t)))
            .collect();
        self
    }

    /// Number of adapted weights.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether it adapts no weight.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Every `target_modules` entry (a list of module names, matched as PEFT
/// does: the whole name or its last components; or one regular expression
/// over the whole name) must match a linear weight of the model.
fn check_target_modules(config: &Value, base: &Checkpoint, config_path: &Path) -> Result<()> {
    let modules: Vec<&str> = base
        .tensors()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .filter_map(|t| t.name.strip_suffix(".weight"))
        .collect();
    let error = |why: String| {
        Error::new(ErrorKind::Format, why)
            .with_file(config_path)
            .with_tensor("target_modules")
    };
    match config.get("target_modules") {
        Some(Value::Array(entries)) => {
            for entry in entries {
                let Some(entry) = entry.as_str() else {
                    return Err(error(format!("expected module names, found {entry}")));
                };
                let dotted = format!(".{entry}");
                if !modules.iter().any(|m| *m == entry || m.ends_with(&dotted)) {
                    return Err(error(format!(
                        "`{entry}` matches no linear layer of {}",
                        base.root().display()
                    )));
                }
            }
        }
        Some(Value::String(pattern)) if pattern != "all-linear" => {
            let re = Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| error(format!("`{pattern}` is not a pattern: {e}")))?;
            if !modules.iter().any(|m| re.is_match(m)) {
                return Err(error(format!(
                    "`{pattern}` matches no linear layer of {}",
                    base.root().display()
                )));
            }
        }
        _ => {}
    }
    Ok(())
}
