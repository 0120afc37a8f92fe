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
use crate::io::{OutputTensor, SafetensorsWriter, ShardedWriter};
use crate::stats::{ActivationStats, LayerStats};
use rayon::prelude::*;
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

    /// A LLaMA-2-like shape (vocabulary 32000, MLP width 2.6875 × hidden)
    /// whose checkpoint in `dtype` holds about `bytes` bytes: the hidden
    /// width grows with the size, the layer count makes up the rest (at
    /// least one). For benchmarks that scale a model from 100 MB to many GB.
    pub fn with_bytes(bytes: u64, dtype: Dtype) -> LlamaShape {
        let params = bytes / dtype.size() as u64;
        let hidden: usize = match params {
            p if p < 300_000_000 => 512,
            p if p < 3_000_000_000 => 2048,
            _ => 4096,
        };
        let vocab = 32000;
        let intermediate = hidden * 43 / 16;
        let per_layer = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) as u64;
        let fixed = (2 * vocab * hidden + hidden) as u64;
        let layers = (params.saturating_sub(fixed) as f64 / per_layer as f64).round() as usize;
        LlamaShape {
            vocab,
            hidden,
            intermediate,
            layers: layers.max(1),
        }
    }

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

/// A fine-tune of `base` as bf16 training leaves one: `base` and the result
/// are rounded to bf16, after a dense update of scale `dense` (below most
/// weights' bf16 spacing, so most entries stay put or move one or two
/// steps) plus updates of scale `large` on a share `share` of the entries.
/// The task vector, a difference of bf16 numbers, then has long runs of
/// exactly equal magnitudes, as real fine-tunes' do. Returns both.
pub fn bf16_fine_tune(
    base: &[f32],
    rng: &mut Rng,
    dense: f32,
    large: f32,
    share: f64,
) -> (Vec<f32>, Vec<f32>) {
    let round = |x: f32| crate::dtype::bf16_to_f32(crate::dtype::f32_to_bf16(x));
    let base: Vec<f32> = base.iter().map(|&x| round(x)).collect();
    let tuned = base
        .iter()
        .map(|&x| {
            let mut d = rng.normal() * dense;
            if rng.uniform() < share {
                d += rng.normal() * large;
            }
            round(x + d)
        })
        .collect();
    (base, tuned)
}

/// `W x` for a row-major `[rows, cols]` weight.
pub fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| crate::reduce::dot(row, x) as f32)
        .collect()
}

/// How [`write_family_with`] makes the fine-tunes, and how it stores them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FamilyOptions {
    /// Fine-tunes as bf16 training leaves them ([`bf16_fine_tune`]: a dense
    /// update of a scale drawn per tensor between 5·10⁻⁵ and 4·10⁻⁴, most
    /// of it below the weights' bf16 spacing, plus updates of 2·10⁻³ on 2%
    /// of the entries) instead of low-rank task updates plus a drift.
    pub bf16_updates: bool,
    /// Shards of at most this many bytes of tensor data (`None`: one
    /// `model.safetensors`).
    pub shard_bytes: Option<u64>,
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
    write_family_with(
        dir,
        shape,
        dtype,
        contributors,
        seed,
        FamilyOptions::default(),
    )
}

/// [`write_family`] with the fine-tunes and the storage of `options`.
pub fn write_family_with(
    dir: &Path,
    shape: &LlamaShape,
    dtype: Dtype,
    contributors: usize,
    seed: u64,
    options: FamilyOptions,
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
        writers.push(ShardedWriter::create(
            &model_dir,
            outputs.clone(),
            options.shard_bytes,
            metadata.clone(),
            true,
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
            .into_par_iter()
            .map(|m| {
                let mut w = ancestor.clone();
                if m == 0 {
                    return w;
                }
                let mut rng = Rng::new(seed ^ (m as u64 * 0x51ed), name);
                if options.bf16_updates {
                    let dense = 5e-5 * 8f64.powf(rng.uniform()) as f32;
                    return bf16_fine_tune(&w, &mut rng, dense, 2e-3, 0.02).1;
                }
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
                        x_gram: None,
                    },
                );
            }
        }
    }
    for mut writer in writers {
        writer.write_file("config.json", shape.config_json(dtype).as_bytes())?;
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

pub use crate::layers::layer_index;

/// The demo's inputs: writes a [`LlamaShape::DEMO`] family under `dir`
/// (BF16, one contributor) and prepares its SAFE-M merge.
pub fn prepare(dir: &Path) -> Result<(DemoFamily, crate::engine::PreparedMerge)> {
    let family = write_family(dir, &LlamaShape::DEMO, Dtype::BF16, 1, 0)?;
    let config = crate::config::MergeConfig::from_file(&family.config)?;
    Ok((family, crate::engine::PreparedMerge::new(config)?))
}

/// The FAM demo's inputs: writes a [`PairShape::SMALL`]-like pair under
/// `dir` and prepares its merge with the built-in LLaVA → mPLUG-Owl2 map.
pub fn prepare_fam(dir: &Path) -> Result<(HeterogeneousPair, crate::engine::PreparedMerge)> {
    let shape = PairShape {
        llm: LlamaShape {
            vocab: 256,
            hidden: 64,
            intermediate: 172,
            layers: 4,
        },
        vision: 32,
        examples: 128,
    };
    let pair = write_heterogeneous_pair(dir, &shape, 0.05, 0)?;
    let config = crate::config::MergeConfig::from_file(&pair.config)?;
    Ok((pair, crate::engine::PreparedMerge::new(config)?))
}

/// Sizes of the small checkpoints that imitate the LLaVA-1.5 → mPLUG-Owl2
/// pair of `heterogeneous-pairs.md` (same tensor names, scaled-down widths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairShape {
    /// The shared language model's sizes.
    pub llm: LlamaShape,
    /// Width of the vision features (ViT hidden size).
    pub vision: usize,
    /// Probe examples recorded per model (half text, half image).
    pub examples: usize,
}

impl PairShape {
    /// A shape small enough for tests.
    pub const SMALL: PairShape = PairShape {
        llm: LlamaShape {
            vocab: 64,
            hidden: 32,
            intermediate: 48,
            layers: 2,
        },
        vision: 16,
        examples: 96,
    };
}

/// Paths of a generated heterogeneous pair.
#[derive(Debug, Clone)]
pub struct HeterogeneousPair {
    /// The receiver, mPLUG-Owl2-like (modality-adaptive k/v and norms, vision modules).
    pub receiver: PathBuf,
    /// The contributor, LLaVA-like (single k/v and norms, an MLP projector).
    pub contributor: PathBuf,
    /// The receiver's statistics (means and per-example rows).
    pub receiver_stats: PathBuf,
    /// The contributor's statistics.
    pub contributor_stats: PathBuf,
    /// A FAM config merging them with the built-in map.
    pub config: PathBuf,
    /// For each MLP group, the permutation applied to the contributor's
    /// neurons: contributor neuron `permutation[i]` is receiver neuron `i`.
    pub permutations: Vec<Vec<usize>>,
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Writes an mPLUG-Owl2-like receiver and a LLaVA-like contributor whose
/// language models are siblings: the contributor's MLP neurons are the
/// receiver's, permuted per layer (consistently across gate, up and down),
/// plus noise of relative size `noise`. Statistics with per-example rows
/// are computed from a shared probe (the same examples through both models:
/// the residual-stream inputs of every layer are shared, the MLP hidden
/// activations follow each model's own weights).
pub fn write_heterogeneous_pair(
    dir: &Path,
    shape: &PairShape,
    noise: f32,
    seed: u64,
) -> Result<HeterogeneousPair> {
    let (h, m, n) = (shape.llm.hidden, shape.llm.intermediate, shape.examples);
    let mut receiver: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut contributor: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut stats_a = ActivationStats::new("mplug-owl2 imitation", "shared synthetic probe");
    let mut stats_b = ActivationStats::new("llava-1.5 imitation", "shared synthetic probe");
    let modality: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
    stats_a.examples = n as u64;
    stats_b.examples = n as u64;
    stats_a.modality = Some(modality.clone());
    stats_b.modality = Some(modality.clone());
    let normal = |name: &str, count: usize, scale: f32| Rng::new(seed, name).normals(count, scale);
    let perturb = |w: &[f32], name: &str| -> Vec<f32> {
        let mut rng = Rng::new(seed ^ 0xb, name);
        w.iter().map(|x| x + noise * 0.1 * rng.normal()).collect()
    };
    // Per-example rows of a linear layer: x [n, in] → y = x Wᵀ [n, out].
    let record =
        |stats: &mut ActivationStats, layer: &str, x: &[f32], w: &[f32], out: usize| -> Vec<f32> {
            let inn = x.len() / n;
            let y: Vec<f32> = x.chunks_exact(inn).flat_map(|row| matvec(w, row)).collect();
            let mean = |rows: &[f32], width: usize| -> Vec<f32> {
                (0..width)
                    .map(|i| {
                        (0..n).map(|s| rows[s * width + i] as f64).sum::<f64>() as f32 / n as f32
                    })
                    .collect()
            };
            stats.layers.insert(
                layer.to_string(),
                LayerStats {
                    x_mean: Some(mean(x, inn)),
                    y_mean: Some(mean(&y, out)),
                    count: Some(n as u64),
                    x_rows: Some(crate::stats::Rows {
                        rows: n,
                        width: inn,
                        data: x.to_vec(),
                    }),
                    y_rows: Some(crate::stats::Rows {
                        rows: n,
                        width: out,
                        data: y.clone(),
                    }),
                    x_gram: None,
                },
            );
            y
        };
    let lm = |p: &str, s: &str| format!("model.layers.{p}.{s}");
    let embed = "model.embed_tokens.weight";
    let w = normal(embed, shape.llm.vocab * h, 0.02);
    contributor.push((
        embed.to_string(),
        vec![shape.llm.vocab, h],
        perturb(&w, embed),
    ));
    receiver.push((embed.to_string(), vec![shape.llm.vocab, h], w));
    let mut permutations = Vec::new();
    for l in 0..shape.llm.layers {
        let p = l.to_string();
        // The residual stream entering the layer, shared by both models.
        let x: Vec<f32> = {
            let mut rng = Rng::new(seed, &format!("probe {l}"));
            (0..n)
                .flat_map(|s| {
                    let shift = if modality[s] == 1 { 0.5 } else { -0.5 };
                    (0..h).map(|_| rng.normal() + shift).collect::<Vec<_>>()
                })
                .collect()
        };
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let w: Vec<f32> = normal(&lm(&p, norm), h, 0.02)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect();
            contributor.push((
                lm(&p, &format!("{norm}.weight")),
                vec![h],
                perturb(&w, norm),
            ));
            for copy in 0..2 {
                let wa = perturb(&w, &format!("{norm}.{copy}"));
                receiver.push((
                    lm(&p, &format!("{norm}.multiway.{copy}.weight")),
                    vec![h],
                    wa,
                ));
            }
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let name = lm(&p, &format!("self_attn.{proj}"));
            let w = normal(&name, h * h, 0.1);
            let wb = perturb(&w, &name);
            record(&mut stats_b, &name, &x, &wb, h);
            contributor.push((format!("{name}.weight"), vec![h, h], wb));
            if proj == "k_proj" || proj == "v_proj" {
                for copy in 0..2 {
                    let a_name = format!("{name}.multiway.{copy}");
                    let wa = perturb(&w, &a_name);
                    record(&mut stats_a, &a_name, &x, &wa, h);
                    receiver.push((format!("{a_name}.weight"), vec![h, h], wa));
                }
            } else {
                record(&mut stats_a, &name, &x, &w, h);
                receiver.push((format!("{name}.weight"), vec![h, h], w));
            }
        }
        // The MLP: B's neurons are A's permuted, plus noise.
        let mut rng = Rng::new(seed, &format!("permutation {l}"));
        let mut perm: Vec<usize> = (0..m).collect();
        for i in (1..m).rev() {
            perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let gate = normal(&lm(&p, "mlp.gate_proj"), m * h, 0.2);
        let up = normal(&lm(&p, "mlp.up_proj"), m * h, 0.2);
        let down = normal(&lm(&p, "mlp.down_proj"), h * m, 0.1);
        // B row perm[i] = A row i (rows of gate/up), B column perm[i] = A column i (down).
        let mut gate_b = vec![0f32; m * h];
        let mut up_b = vec![0f32; m * h];
        let mut down_b = vec![0f32; h * m];
        for i in 0..m {
            gate_b[perm[i] * h..(perm[i] + 1) * h].copy_from_slice(&gate[i * h..(i + 1) * h]);
            up_b[perm[i] * h..(perm[i] + 1) * h].copy_from_slice(&up[i * h..(i + 1) * h]);
            for r in 0..h {
                down_b[r * m + perm[i]] = down[r * m + i];
            }
        }
        let (gate_b, up_b, down_b) = (
            perturb(&gate_b, "gate"),
            perturb(&up_b, "up"),
            perturb(&down_b, "down"),
        );
        for (stats, tensors, (g, u, d)) in [
            (&mut stats_a, &mut receiver, (&gate, &up, &down)),
            (&mut stats_b, &mut contributor, (&gate_b, &up_b, &down_b)),
        ] {
            let yg = record(stats, &lm(&p, "mlp.gate_proj"), &x, g, m);
            let yu = record(stats, &lm(&p, "mlp.up_proj"), &x, u, m);
            let hidden: Vec<f32> = yg.iter().zip(&yu).map(|(g, u)| silu(*g) * u).collect();
            record(stats, &lm(&p, "mlp.down_proj"), &hidden, d, h);
            tensors.push((lm(&p, "mlp.gate_proj.weight"), vec![m, h], g.clone()));
            tensors.push((lm(&p, "mlp.up_proj.weight"), vec![m, h], u.clone()));
            tensors.push((lm(&p, "mlp.down_proj.weight"), vec![h, m], d.clone()));
        }
        permutations.push(perm);
    }
    for (name, s) in [
        ("model.norm.weight", vec![h]),
        ("lm_head.weight", vec![shape.llm.vocab, h]),
    ] {
        let w = normal(name, s.iter().product(), 0.02);
        contributor.push((name.to_string(), s.clone(), perturb(&w, name)));
        receiver.push((name.to_string(), s, w));
    }
    let v = shape.vision;
    for (name, s) in [
        (
            "model.vision_model.embeddings.patch_embed.weight",
            vec![v, 48],
        ),
        (
            "model.vision_model.encoder.layers.0.mlp.fc1.weight",
            vec![4 * v, v],
        ),
        (
            "model.vision_model.encoder.layers.0.mlp.fc2.weight",
            vec![v, 4 * v],
        ),
        ("model.visual_abstractor.visual_fc.weight", vec![h, v]),
    ] {
        receiver.push((
            name.to_string(),
            s.clone(),
            normal(name, s.iter().product(), 0.02),
        ));
    }
    for (name, s) in [
        ("model.mm_projector.0.weight", vec![h, v]),
        ("model.mm_projector.0.bias", vec![h]),
        ("model.mm_projector.2.weight", vec![h, h]),
        ("model.mm_projector.2.bias", vec![h]),
    ] {
        contributor.push((
            name.to_string(),
            s.clone(),
            normal(name, s.iter().product(), 0.02),
        ));
    }
    let write = |model_dir: &Path,
                 tensors: &[(String, Vec<usize>, Vec<f32>)],
                 arch: &str|
     -> Result<()> {
        std::fs::create_dir_all(model_dir).map_err(|e| Error::io(model_dir, e))?;
        let outputs: Vec<OutputTensor> = tensors
            .iter()
            .map(|(n, s, _)| OutputTensor {
                name: n.clone(),
                dtype: Dtype::F32,
                shape: s.clone(),
            })
            .collect();
        let path = model_dir.join("model.safetensors");
        let mut writer = SafetensorsWriter::create(
            &path,
            &outputs,
            &BTreeMap::from([("format".into(), "pt".into())]),
        )?;
        for (name, _, w) in tensors {
            let mut bytes = vec![0u8; w.len() * 4];
            encode_f32(Dtype::F32, w, &mut bytes);
            writer.write_tensor(name, &bytes)?;
        }
        writer.finish()?;
        let config = model_dir.join("config.json");
        let text = format!("{{\n  \"architectures\": [\"{arch}\"],\n  \"hidden_size\": {h},\n  \"num_hidden_layers\": {}\n}}\n", shape.llm.layers);
        std::fs::write(&config, text).map_err(|e| Error::io(&config, e))
    };
    let (a_dir, b_dir) = (dir.join("mplug-owl2"), dir.join("llava-1.5"));
    write(&a_dir, &receiver, "MPLUGOwl2LlamaForCausalLM")?;
    write(&b_dir, &contributor, "LlavaLlamaForCausalLM")?;
    let (sa, sb) = (
        dir.join("mplug-owl2.stats.safetensors"),
        dir.join("llava-1.5.stats.safetensors"),
    );
    stats_a.save(&sa)?;
    stats_b.save(&sb)?;
    let config = dir.join("fam.yaml");
    let text = "merge_method: fam\nname_map: llava-1.5-to-mplug-owl2\nmodels:\n  - model: ./mplug-owl2\n    stats: ./mplug-owl2.stats.safetensors\n  - model: ./llava-1.5\n    stats: ./llava-1.5.stats.safetensors\n";
    std::fs::write(&config, text).map_err(|e| Error::io(&config, e))?;
    Ok(HeterogeneousPair {
        receiver: a_dir,
        contributor: b_dir,
        receiver_stats: sa,
        contributor_stats: sb,
        config,
        permutations,
    })
}
