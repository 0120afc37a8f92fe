//! Random LLaMA model directories for tests and benchmarks: any
//! [`LlamaConfig`], F32, F16 or BF16, optionally with mPLUG-Owl2's
//! modality-adaptive copies, reproducible from a seed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::config::{LlamaConfig, CONFIG_FILE};
use crate::demo::Rng;
use crate::dtype::{encode_f32, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{write_atomically, OutputTensor, SafetensorsWriter, SINGLE_FILE};

/// What [`write_random_model`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModel {
    /// Sizes and constants (written to `config.json`).
    pub config: LlamaConfig,
    /// The weights' dtype (F32, F16 or BF16).
    pub dtype: Dtype,
    /// Copies of `input_layernorm`, `k_proj`, `v_proj` and
    /// `post_attention_layernorm` (mPLUG-Owl2's `multiway.{i}`); 0 or 1:
    /// plain LLaMA tensors.
    pub multiway: usize,
    /// The seed: each tensor's values depend only on it and the tensor's name.
    pub seed: u64,
}

impl RandomModel {
    /// Every tensor, in the order Hugging Face writes LLaMA checkpoints,
    /// with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let copies = |base: String, shape: Vec<usize>| -> Vec<(String, Vec<usize>)> {
            let bias = (c.qkv_bias && shape.len() == 2).then(|| vec![shape[0]]);
            let names: Vec<String> = if self.multiway > 1 {
                (0..self.multiway)
                    .map(|i| format!("{base}.multiway.{i}"))
                    .collect()
            } else {
                vec![base]
            };
            let mut out = Vec::new();
            for name in names {
                out.push((format!("{name}.weight"), shape.clone()));
                if let Some(b) = &bias {
                    out.push((format!("{name}.bias"), b.clone()));
                }
            }
            out
        };
        let linear = |name: String, shape: Vec<usize>, bias: bool| {
            let mut out = vec![(format!("{name}.weight"), shape.clone())];
            if bias {
                out.push((format!("{name}.bias"), vec![shape[0]]));
            }
            out
        };
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        )];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.extend(copies(format!("{p}.input_layernorm"), vec![h]));
            out.extend(linear(
                format!("{p}.self_attn.q_proj"),
                vec![c.q_width(), h],
                c.qkv_bias,
            ));
            out.extend(copies(
                format!("{p}.self_attn.k_proj"),
                vec![c.kv_width(), h],
            ));
            out.extend(copies(
                format!("{p}.self_attn.v_proj"),
                vec![c.kv_width(), h],
            ));
            out.extend(linear(
                format!("{p}.self_attn.o_proj"),
                vec![h, c.q_width()],
                c.o_bias,
            ));
            out.extend(copies(format!("{p}.post_attention_layernorm"), vec![h]));
            out.extend(linear(format!("{p}.mlp.gate_proj"), vec![m, h], c.mlp_bias));
            out.extend(linear(format!("{p}.mlp.up_proj"), vec![m, h], c.mlp_bias));
            out.extend(linear(format!("{p}.mlp.down_proj"), vec![h, m], c.mlp_bias));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !c.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
        }
        out
    }

    /// The values of tensor `name` of `shape`: biases `0.1·N(0, 1)`, norms `1 + 0.1·N(0, 1)`, the
    /// embedding `N(0, 1)`, other matrices `N(0, 1/in)` (activations stay
    /// of order one through the layers).
    pub fn values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let mut rng = Rng::new(self.seed, name);
        match shape {
            [_] if name.ends_with(".bias") => rng.normals(n, 0.1),
            [_] => rng.normals(n, 0.1).into_iter().map(|v| 1.0 + v).collect(),
            _ if name.contains("embed_tokens") => rng.normals(n, 1.0),
            _ => rng.normals(n, 1.0 / (shape[1] as f32).sqrt()),
        }
    }
}

/// Writes a random model directory `dir` (created if needed):
/// `config.json` ([`LlamaConfig::to_json`], with `torch_dtype` set and, for
/// a multiway model, `model_type` `mplug_owl2` and architecture
/// `MPLUGOwl2LlamaForCausalLM`) and `model.safetensors`, each atomically.
/// Errors: an invalid config or a non-float dtype
/// ([`ErrorKind::InvalidInput`]), I/O.
pub fn write_random_model(dir: &Path, model: &RandomModel) -> Result<()> {
    model.config.validate()?;
    if !model.dtype.is_float() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "cannot write weights as {}: use F32, F16 or BF16",
                model.dtype
            ),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = model.tensors();
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(name, shape)| OutputTensor::new(name.clone(), model.dtype, shape.clone()))
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_atomically(&dir.join(SINGLE_FILE), |temp| {
        let mut writer = SafetensorsWriter::create(temp, &outputs, &metadata)?;
        for (name, shape) in &tensors {
            let values = model.values(name, shape);
            let mut bytes = vec![0u8; values.len() * model.dtype.size()];
            encode_f32(model.dtype, &values, &mut bytes);
            writer.write_tensor(name, &bytes)?;
        }
        writer.finish()
    })?;
    let mut config: Value = serde_json::from_str(&model.config.to_json()).unwrap_or(Value::Null);
    config["torch_dtype"] = Value::from(match model.dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    });
    if model.multiway > 1 {
        config["model_type"] = Value::from("mplug_owl2");
        config["architectures"] = serde_json::json!(["MPLUGOwl2LlamaForCausalLM"]);
    }
    let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
    text.push('\n');
    let path = dir.join(CONFIG_FILE);
    write_atomically(&path, |temp| {
        std::fs::write(temp, &text).map_err(|e| Error::io(temp, e))
    })
}
