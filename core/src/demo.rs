//! A self-contained demo family, also used by tests and benchmarks: a
//! LLaMA-shaped common ancestor `C` (random), a receiver `A` and a
//! contributor `B` (each `C` plus its own structured low-rank "task"
//! update), their activation statistics, and a SAFE-M config — all
//! generated from a seed, no downloads.
//!
//! Statistics follow SPEC §1.1 for a linear layer: each model sees mean
//! inputs `x̄` close to a shared probe mean, and its mean output is exactly
//! `ȳ = W x̄` (LLaMA's linear layers have no bias).

use crate::dtype::{encode_f32, Dtype};
use crate::error::{Error, Result};
use crate::io::{OutputTensor, SafetensorsWriter};
use crate::stats::{ActivationStats, LayerStats};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Sizes of a LLaMA-family decoder (no grouped-query attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden (residual) width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
}

impl LlamaShape {
    /// The demo's size: about 1.3 M parameters.
    pub const DEMO: LlamaShape = LlamaShape {
        vocab: 512,
        hidden: 128,
        intermediate: 344,
        layers: 4,
    };

    /// LLaMA-2-7B's size (for reference and scaled benchmarks).
    pub const LLAMA2_7B: LlamaShape = LlamaShape {
        vocab: 32000,
        hidden: 4096,
        intermediate: 11008,
        layers: 32,
    };

    /// Every tensor in the order Hugging Face writes LLaMA checkpoints, with
    /// its shape and whether it is a linear layer's weight (`[out, in]`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let (h, m) = (self.hidden, self.intermediate);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab, h],
            false,
        )];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h], false));
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h], true));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                false,
            ));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h], true));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![m, h], true));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, m], true));
        }
        out.push(("model.norm.weight".to_string(), vec![h], false));
        out.push(("lm_head.weight".to_string(), vec![self.vocab, h], false));
        out
    }

    /// Parameter count.
    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    /// A Hugging Face `config.json` for this shape.
    pub fn config_json(&self, dtype: Dtype) -> String {
        let torch_dtype = match dtype {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            _ => "float32",
        };
        let heads = (self.hidden / 32).max(1);
        format!(
            "{{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"model_type\": \"llama\",\n  \"hidden_size\": {},\n  \"intermediate_size\": {},\n  \"num_hidden_layers\": {},\n  \"num_attention_heads\": {heads},\n  \"num_key_value_heads\": {heads},\n  \"vocab_size\": {},\n  \"max_position_embeddings\": 4096,\n  \"rms_norm_eps\": 1e-05,\n  \"hidden_act\": \"silu\",\n  \"tie_word_embeddings\": false,\n  \"torch_dtype\": \"{torch_dtype}\"\n}}\n",
            self.hidden, self.intermediate, self.layers, self.vocab
        )
    }
}

/// A small counter-based generator (splitmix64): reproducible from a seed
/// and a stream name, whatever order tensors are generated in.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `stream` under `seed`.
    pub fn new(seed: u64, stream: &str) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in stream.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// `n` normals times `scale`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Paths of a generated family.
#[derive(Debug, Clone)]
pub struct DemoFamily {
    /// The folder holding everything.
    pub dir: PathBuf,
    /// The common ancestor `C`.
    pub ancestor: PathBuf,
    /// The receiver `A`.
    pub receiver: PathBuf,
    /// The contributors `B_k`.
    pub contributors: Vec<PathBuf>,
    /// The SAFE-M config (the example layout).
    pub config: PathBuf,
}

/// A rank-`rank` update `Σ_r a_r b_rᵀ · scale` of a `[rows, cols]` weight,
/// added in place: fine-tuning updates are close to low rank.
fn add_low_rank(w: &mut [f32], rows: usize, cols: usize, rank: usize, scale: f32, rng: &mut Rng) {
    for _ in 0..rank {
        let a = rng.normals(rows, 1.0);
        let b = rng.normals(cols, 1.0);
        for (r, &ar) in a.iter().enumerate() {
            for (x, &bc) in w[r * cols..(r + 1) * cols].iter_mut().zip(&b) {
                *x += scale * ar * bc;
            }
        }
    }
}

/// `W x` for a row-major `[rows, cols]` weight.
pub fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| crate::reduce::dot(row, x) as f32)
        .collect()
}

/// Writes `C`, `A` and `contributors` models `B_k` of `shape` under `dir`
/// (as `dir/C`, `dir/A`, `dir/B`, `dir/B2`, …), with statistics and a config.
pub fn write_family(
    dir: &Path,
    shape: &LlamaShape,
    dtype: Dtype,
    contributors: usize,
    seed: u64,
) -> Result<DemoFamily> {
    let names: Vec<String> = std::iter::once("C".to_string())
        .chain(std::iter::once("A".to_string()))
        .chain((0..contributors).map(|k| {
            if k == 0 {
                "B".to_string()
            } else {
                format!("B{}", k + 1)
            }
        }))
        .collect();
    let tensors = shape.tensors();
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(name, s, _)| OutputTensor {
            name: name.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writers = Vec::new();
    let mut stats = Vec::new();
    for name in &names {
        let model_dir = dir.join(name);
        std::fs::create_dir_all(&model_dir).map_err(|e| Error::io(&model_dir, e))?;
        let config = model_dir.join("config.json");
        std::fs::write(&config, shape.config_json(dtype)).map_err(|e| Error::io(&config, e))?;
        writers.push(SafetensorsWriter::create(
            &model_dir.join("model.safetensors"),
            &outputs,
            &metadata,
        )?);
        stats.push(ActivationStats::new(
            &format!("demo {name}"),
            "synthetic mean inputs",
        ));
    }
    for (name, s, linear) in &tensors {
        let n: usize = s.iter().product();
        let mut rng = Rng::new(seed, name);
        let ancestor: Vec<f32> = if s.len() == 1 {
            rng.normals(n, 0.02).into_iter().map(|x| 1.0 + x).collect()
        } else {
            rng.normals(n, 0.02)
        };
        // Task updates: the receiver's task lives mostly in the first half
        // of the layers, each contributor's in a band of its own, and every
        // model also drifts a little everywhere.
        let models: Vec<Vec<f32>> = (0..names.len())
            .map(|m| {
                let mut w = ancestor.clone();
                if m == 0 {
                    return w;
                }
                let mut rng = Rng::new(seed ^ (m as u64 * 0x51ed), name);
                let layer = layer_index(name).unwrap_or(0);
                let band = (m - 1) % 2 == 0;
                let strong = (layer < shape.layers.div_ceil(2)) == band;
                let scale = if strong { 4e-3 } else { 1e-3 };
                if s.len() == 2 {
                    add_low_rank(&mut w, s[0], s[1], 2, scale, &mut rng);
                }
                for x in w.iter_mut() {
                    *x += rng.normal() * 2e-3;
                }
                w
            })
            .collect();
        for (m, (w, writer)) in models.iter().zip(&mut writers).enumerate() {
            let mut bytes = vec![0u8; n * dtype.size()];
            encode_f32(dtype, w, &mut bytes);
            writer.write_tensor(name, &bytes)?;
            if *linear {
                let layer = name.trim_end_matches(".weight");
                let mut probe = Rng::new(seed, &format!("probe {layer}"));
                let mut x = probe.normals(s[1], 1.0);
                let mut own = Rng::new(seed ^ (m as u64 + 1), &format!("probe {layer}"));
                for v in x.iter_mut() {
                    *v += own.normal() * 0.1;
                }
                let y = matvec(w, &x);
                stats[m].layers.insert(
                    layer.to_string(),
                    LayerStats {
                        x_mean: Some(x),
                        y_mean: Some(y),
                        count: Some(4096),
                        x_rows: None,
                        y_rows: None,
                    },
                );
            }
        }
    }
    for writer in writers {
        writer.finish()?;
    }
    for (name, s) in names.iter().zip(&mut stats) {
        s.examples = 64;
        s.save(&dir.join(format!("{name}.stats.safetensors")))?;
    }
    let mut config = String::from(
        "merge_method: safe_m\nbase_model: ./C\nbase_model_stats: ./C.stats.safetensors\nmodels:\n",
    );
    for name in &names[1..] {
        config.push_str(&format!(
            "  - model: ./{name}\n    stats: ./{name}.stats.safetensors\n"
        ));
    }
    config.push_str(
        "parameters:\n  density: 0.2\n  alpha: 1.0\n  score: sas\n  lambda_proj: 1.0\n  lambda_ortho: 0.5\n  fallback_weight: 0.5\n",
    );
    let config_path = dir.join("safe_m.yaml");
    std::fs::write(&config_path, config).map_err(|e| Error::io(&config_path, e))?;
    Ok(DemoFamily {
        dir: dir.to_path_buf(),
        ancestor: dir.join("C"),
        receiver: dir.join("A"),
        contributors: names[2..].iter().map(|n| dir.join(n)).collect(),
        config: config_path,
    })
}

/// The decoder layer index in a name such as `model.layers.3.mlp.up_proj.weight`.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// The demo's inputs: writes a [`LlamaShape::DEMO`] family under `dir`
/// (BF16, one contributor) and prepares its SAFE-M merge.
pub fn prepare(dir: &Path) -> Result<(DemoFamily, crate::engine::PreparedMerge)> {
    let family = write_family(dir, &LlamaShape::DEMO, Dtype::BF16, 1, 0)?;
    let config = crate::config::MergeConfig::from_file(&family.config)?;
    Ok((family, crate::engine::PreparedMerge::new(config)?))
}
