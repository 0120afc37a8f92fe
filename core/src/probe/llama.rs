//! LLaMA-family decoders (LLaMA 1–3, Vicuna, Qwen2, LLaVA-1.5's and
//! mPLUG-Owl2's language models): a pure-Rust CPU forward pass that records
//! every linear layer for the probe (SPEC §1.1).
//!
//! # Model directory
//!
//! A Hugging Face directory: `config.json` ([`LlamaConfig`]: sizes, RMSNorm
//! epsilon, `rope_theta`, `rope_scaling` linear, dynamic or llama3,
//! grouped-query attention, tied embeddings, biases) beside
//! `model.safetensors` or shards with their index. [`ARCHITECTURE`] claims a
//! directory whose `config.json` has `model_type` `llama`, `mplug_owl2` or
//! `qwen2`, an `architectures` entry containing `Llama` or `MPLUGOwl2`, or
//! is a vision-language checkpoint (`model_type` `llava`, `llava_next`,
//! `llava_onevision`) whose nested `text_config` is one of those: only its
//! language model runs.
//!
//! Tensors (`[out, in]`, F32, F16 or BF16; others are ignored — vision
//! towers, projectors, `rotary_emb.inv_freq`), under a prefix `P`:
//! `P embed_tokens.weight`, per layer `P layers.N.` + `input_layernorm`,
//! `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
//! `mlp.{gate,up,down}_proj`, then `P norm.weight` and the output
//! projection (absent when tied; a checkpoint without it runs the probe but
//! has no logits). `P` is the first of `model.` (a plain decoder, the
//! original LLaVA and mPLUG-Owl2 layouts; head `lm_head.weight`),
//! `language_model.model.` (llava-hf as saved; head
//! `language_model.lm_head.weight`) and `model.language_model.` (newer
//! transformers' in-memory names; head `lm_head.weight`) whose embedding is
//! present. Recorded layers keep the checkpoint's names, so statistics line
//! up with the merge. Biases (`.bias`, `[out]`) are read where the config
//! implies them — q/k/v for a Qwen2 `model_type`, q/k/v/o for LLaMA's
//! `attention_bias`, the MLP for `mlp_bias` — and a bias it does not imply is
//! refused rather than ignored. Every name, dtype and shape is checked when
//! the model is opened, before any weight is read.
//!
//! # Modality-adaptive layers (mPLUG-Owl2)
//!
//! Any of `input_layernorm`, `self_attn.k_proj`, `self_attn.v_proj` and
//! `post_attention_layernorm` may instead have copies
//! `<module>.multiway.{0,1,…}.weight`: token `t` goes through copy
//! `m_t`, its modality (0 text, 1 vision; `heterogeneous-pairs.md`). Every
//! multiway module has the same number of copies; `q_proj`, `o_proj` and
//! the MLP are shared. Each copy is its own recorded layer
//! (`model.layers.N.self_attn.k_proj.multiway.1`) and records only the
//! tokens routed to it; an example none of whose tokens reach a copy has no
//! row there (a row of zeros by the recorder's default).
//!
//! A token's modality comes from the example's `token_modality` (the
//! probe-set key) or, failing that, its `meta.token_modality` — an array of
//! codes (0–255) or names (`text`, `vision`, `audio`) as long as `tokens`
//! ([`token_modalities`]) — and otherwise is the example's
//! `modality`. The statistics file's `probe.modality` stays the example's.
//! Only the language model runs: token ids are embedded with
//! `embed_tokens`, vision features are not computed (an image token is the
//! embedding of its id).
//!
//! # The forward pass
//!
//! Hugging Face's `LlamaForCausalLM`, in f32: embedding; per layer
//! `h += o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))` with
//! `n = input_layernorm(h)`, then `h += down(silu(gate(n')) ⊙ up(n'))`
//! with `n' = post_attention_layernorm(h)`; final norm and `lm_head` (only
//! for [`Llama::logits`]: the probe skips them). RMSNorm sums squares in
//! f64; rotary embeddings use `rotate_half` (halves, not interleaved
//! pairs) with f32 frequencies and angles as `transformers` computes them;
//! attention is causal and grouped (query head `h` reads key/value head
//! `h / (heads / kv_heads)`), softmax in f32; matrix products are
//! `matrixmultiply`'s sgemm.
//!
//! Each sequence runs on its own, positions `0..len`: no padding, no
//! batching across examples, so a sequence's activations do not depend on
//! the rest of the probe set. Examples run in parallel (the probe
//! framework), and inside one, linear layers split their weight into
//! panels and attention its heads across the same rayon pool. Weights are
//! read from the memory-mapped checkpoint when used, one panel of one
//! layer at a time ([`kernels::PANEL_VALUES`] values per task): the model
//! is never decoded whole, and memory is the activations of one sequence
//! per worker plus one panel per task. The price is that every example
//! decodes the weights again (for BF16 about one conversion per weight
//! against `2 × tokens` flops: small from a few dozen tokens on).
//!
//! # Hooks
//!
//! For every linear layer (q, k, v, o, gate, up, down, each multiway copy;
//! not `lm_head`, which SPEC §1.4 merges without statistics) the probe
//! pushes one batch per example: `x` the layer's input rows, `y` its output
//! (bias included) before any nonlinearity (q and k before the rotary embedding, gate
//! before the SiLU), one row per token that went through the layer.

mod config;
pub mod kernels;
mod synthetic;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use config::{is_llama_config, LlamaConfig, RopeScaling, CONFIG_FILE};
pub use synthetic::{write_random_model, RandomModel};

use super::set::{modality_name, modality_value};
use super::{Architecture, LayerShape, ProbeExample, ProbeInput, ProbeModel};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Checkpoint, TensorView};
use crate::recorder::Recorder;
use kernels::{apply_rope, attention, linear, rms_norm, rope_tables, silu};

/// The probe registry's entry for this family.
pub const ARCHITECTURE: Architecture = Architecture {
    name: "llama",
    detect,
    open: |dir| Ok(Box::new(Llama::load(dir)?)),
    open_with: |dir, checkpoint| Ok(Box::new(Llama::load_with(dir, checkpoint)?)),
};

/// The tokenizer of `text` examples, in the model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The key of an example's `meta` object that gives each token's modality
/// (the fallback of the probe-set key of the same name).
pub const TOKEN_MODALITY_KEY: &str = "token_modality";

/// Whether `dir/config.json` describes a model this module runs
/// ([`is_llama_config`]).
pub fn detect(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| is_llama_config(&v))
}

/// One recorded linear layer's activations for one sequence.
#[derive(Debug, Clone, Copy)]
pub struct Hook<'a> {
    /// The layer (its weight's name without `.weight`).
    pub layer: &'a str,
    /// Tokens that went through the layer.
    pub rows: usize,
    /// Inputs, `[rows, in]`.
    pub x: &'a [f32],
    /// Outputs before any nonlinearity, `[rows, out]`.
    pub y: &'a [f32],
}

/// A module with one weight, or one copy per modality.
#[derive(Debug, Clone)]
struct Routed {
    /// Layer names (tensor names without `.weight`), one per copy.
    layers: Vec<String>,
    /// Whether each copy has a `.bias` (checked against the config).
    bias: bool,
}

impl Routed {
    fn tensor(&self, copy: usize) -> String {
        format!("{}.weight", self.layers[copy])
    }

    fn bias(&self, copy: usize) -> Option<String> {
        self.bias.then(|| format!("{}.bias", self.layers[copy]))
    }
}

/// Where the language model's tensors live in a checkpoint: the prefix of
/// `embed_tokens`, `layers.N.*` and `norm` (`model.` for a plain decoder,
/// `language_model.model.` as llava-hf checkpoints store it,
/// `model.language_model.` as newer `transformers` names it in memory), and
/// the output projection's name.
const LAYOUTS: [(&str, &str); 3] = [
    ("model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
];

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: Routed,
    q: Routed,
    k: Routed,
    v: Routed,
    o: Routed,
    post_norm: Routed,
    gate: Routed,
    up: Routed,
    down: Routed,
}

impl DecoderLayer {
    /// The linear modules with their `(in, out)` widths, in forward order.
    fn linears<'a>(&'a self, c: &LlamaConfig) -> [(&'a Routed, usize, usize); 7] {
        let (h, m) = (c.hidden_size, c.intermediate_size);
        [
            (&self.q, h, c.q_width()),
            (&self.k, h, c.kv_width()),
            (&self.v, h, c.kv_width()),
            (&self.o, c.q_width(), h),
            (&self.gate, h, m),
            (&self.up, h, m),
            (&self.down, m, h),
        ]
    }
}

/// How much the model has run: examples, tokens and the wall time from the
/// start of the first forward pass to the end of the last.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Throughput {
    /// Sequences run.
    pub examples: u64,
    /// Tokens run.
    pub tokens: u64,
    /// Wall time from the first start to the last end.
    pub elapsed: Duration,
}

impl Throughput {
    /// Tokens per second of wall time (0 before anything ran).
    pub fn tokens_per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.tokens as f64 / s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    examples: AtomicU64,
    tokens: AtomicU64,
    span: Mutex<Option<(Instant, Instant)>>,
}

/// A LLaMA-family decoder read from a model directory; see the module
/// documentation.
#[derive(Debug)]
pub struct Llama {
    dir: PathBuf,
    config: LlamaConfig,
    checkpoint: Checkpoint,
    layers: Vec<DecoderLayer>,
    /// Copies per multiway module (1 without any).
    copies: usize,
    /// The language model's tensor prefix ([`LAYOUTS`]), e.g. `model.`.
    prefix: String,
    embed: String,
    norm: String,
    /// The output projection (the embedding when tied); `None` when the
    /// checkpoint has none.
    lm_head: Option<String>,
    counters: Counters,
}

impl Llama {
    /// Opens the model directory `dir`: its checkpoint, `config.json`, and
    /// checks every tensor the forward pass reads (present, a float dtype,
    /// the shape the config implies; a module with both a plain weight and
    /// multiway copies, or multiway modules with different copy counts, are
    /// refused). Errors name the file and tensor: [`ErrorKind::InvalidInput`]
    /// for `config.json`, [`ErrorKind::Format`] for the tensors, the
    /// checkpoint's own errors.
    pub fn load(dir: &Path) -> Result<Llama> {
        Llama::load_with(dir, Checkpoint::open(dir)?)
    }

    /// [`Llama::load`] with the `config.json` (and tokenizer) of `dir` and
    /// the tensors of `checkpoint` (e.g. [`Checkpoint::with_overrides`]).
    pub fn load_with(dir: &Path, checkpoint: Checkpoint) -> Result<Llama> {
        // The first layout whose embedding is present; a checkpoint with none
        // is reported against the plain layout's name.
        let (prefix, lm_head_name) = LAYOUTS
            .iter()
            .copied()
            .find(|(p, _)| {
                checkpoint
                    .info(&format!("{p}embed_tokens.weight"))
                    .is_some()
            })
            .unwrap_or(LAYOUTS[0]);
        let embed = format!("{prefix}embed_tokens.weight");
        let final_norm = format!("{prefix}norm.weight");
        let rows = checkpoint
            .info(&embed)
            .and_then(|t| t.shape.first().copied());
        let config = LlamaConfig::load(dir, rows)?;
        let err = |tensor: &str, msg: String| {
            Error::new(ErrorKind::Format, msg)
                .with_file(checkpoint.root())
                .with_tensor(tensor)
        };
        let check = |name: &str, shape: &[usize]| -> Result<()> {
            let info = checkpoint.info(name).ok_or_else(|| {
                err(
                    name,
                    "missing: the LLaMA forward pass needs this tensor".into(),
                )
            })?;
            if !info.dtype.is_float() {
                return Err(err(
                    name,
                    format!("dtype {}, not F32, F16 or BF16", info.dtype),
                ));
            }
            if info.shape != shape {
                return Err(err(
                    name,
                    format!("shape {:?}, but config.json implies {shape:?}", info.shape),
                ));
            }
            Ok(())
        };
        let routed = |base: String, bias: bool| -> Result<Routed> {
            let plain = checkpoint.info(&format!("{base}.weight")).is_some();
            let mut copies = Vec::new();
            while checkpoint
                .info(&format!("{base}.multiway.{}.weight", copies.len()))
                .is_some()
            {
                copies.push(format!("{base}.multiway.{}", copies.len()));
            }
            match (plain, copies.is_empty()) {
                (true, false) => Err(err(
                    &format!("{base}.weight"),
                    format!(
                        "both a plain weight and multiway copies (`{base}.multiway.0.weight`): \
                         which one the model uses is ambiguous"
                    ),
                )),
                (_, true) => Ok(Routed {
                    layers: vec![base],
                    bias,
                }),
                (false, false) => Ok(Routed {
                    layers: copies,
                    bias,
                }),
            }
        };
        let h = config.hidden_size;
        check(&embed, &[config.vocab_size, h])?;
        let (qkv, o, mlp) = (config.qkv_bias, config.o_bias, config.mlp_bias);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("{prefix}layers.{l}");
            let layer = DecoderLayer {
                input_norm: routed(format!("{p}.input_layernorm"), false)?,
                q: routed(format!("{p}.self_attn.q_proj"), qkv)?,
                k: routed(format!("{p}.self_attn.k_proj"), qkv)?,
                v: routed(format!("{p}.self_attn.v_proj"), qkv)?,
                o: routed(format!("{p}.self_attn.o_proj"), o)?,
                post_norm: routed(format!("{p}.post_attention_layernorm"), false)?,
                gate: routed(format!("{p}.mlp.gate_proj"), mlp)?,
                up: routed(format!("{p}.mlp.up_proj"), mlp)?,
                down: routed(format!("{p}.mlp.down_proj"), mlp)?,
            };
            for norm in [&layer.input_norm, &layer.post_norm] {
                for c in 0..norm.layers.len() {
                    check(&norm.tensor(c), &[h])?;
                }
            }
            for (module, inn, out) in layer.linears(&config) {
                for c in 0..module.layers.len() {
                    check(&module.tensor(c), &[out, inn])?;
                    match module.bias(c) {
                        Some(bias) => check(&bias, &[out])?,
                        // A bias the config does not announce would be
                        // silently ignored: refuse it instead.
                        None => {
                            let bias = format!("{}.bias", module.layers[c]);
                            if checkpoint.info(&bias).is_some() {
                                return Err(err(
                                    &bias,
                                    "a bias config.json does not announce (`attention_bias`, \
                                     `mlp_bias`, or a Qwen2 model_type for q/k/v)"
                                        .into(),
                                ));
                            }
                        }
                    }
                }
            }
            for shared in [&layer.q, &layer.o, &layer.gate, &layer.up, &layer.down] {
                if shared.layers.len() > 1 {
                    return Err(err(
                        &shared.tensor(0),
                        "multiway copies of a module the model shares across modalities \
                         (only k_proj, v_proj and the two layer norms have copies)"
                            .into(),
                    ));
                }
            }
            layers.push(layer);
        }
        check(&final_norm, &[h])?;
        // The probe never needs `lm_head`: a checkpoint without it (a
        // classifier's backbone) still runs; only `logits` refuses.
        let lm_head = if config.tie_word_embeddings {
            Some(embed.clone())
        } else if checkpoint.info(lm_head_name).is_some() {
            check(lm_head_name, &[config.vocab_size, h])?;
            Some(lm_head_name.to_string())
        } else {
            None
        };
        let mut copies = 1;
        let mut first: Option<&Routed> = None;
        for layer in &layers {
            for module in [&layer.input_norm, &layer.k, &layer.v, &layer.post_norm] {
                let n = module.layers.len();
                if n == 1 && !module.layers[0].contains(".multiway.") {
                    continue;
                }
                match first {
                    None => {
                        copies = n;
                        first = Some(module);
                    }
                    Some(f) if n != copies => {
                        return Err(err(
                            &module.tensor(0),
                            format!("{n} multiway copies, but `{}` has {copies}", f.tensor(0)),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(Llama {
            dir: dir.to_path_buf(),
            config,
            checkpoint,
            layers,
            copies,
            prefix: prefix.to_string(),
            embed,
            norm: final_norm,
            lm_head,
            counters: Counters::default(),
        })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies of each modality-adaptive module (1 for a plain LLaMA).
    pub fn multiway_copies(&self) -> usize {
        self.copies
    }

    /// Examples and tokens run so far, and the wall time they took
    /// (from the first forward pass's start to the last one's end).
    pub fn throughput(&self) -> Throughput {
        let span = self.counters.span.lock().map(|s| *s).unwrap_or(None);
        Throughput {
            examples: self.counters.examples.load(Ordering::Relaxed),
            tokens: self.counters.tokens.load(Ordering::Relaxed),
            elapsed: span.map_or(Duration::ZERO, |(a, b)| b.duration_since(a)),
        }
    }

    fn view(&self, name: &str) -> TensorView<'_> {
        self.checkpoint
            .view(name)
            .unwrap_or_else(|| panic!("`{name}` was checked when the model was opened"))
    }

    /// Checks a sequence: token ids below the vocabulary, one modality per
    /// token, each with a copy when the model is modality-adaptive. The
    /// message has no example number (callers add it).
    fn check_sequence(&self, tokens: &[u32], modalities: &[u8]) -> std::result::Result<(), String> {
        if modalities.len() != tokens.len() {
            return Err(format!(
                "{} token modalities for {} tokens",
                modalities.len(),
                tokens.len()
            ));
        }
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.config.vocab_size)
        {
            return Err(format!(
                "token {i} is id {t}, beyond the vocabulary of {} ids",
                self.config.vocab_size
            ));
        }
        if self.copies > 1 {
            if let Some((i, m)) = modalities
                .iter()
                .enumerate()
                .find(|(_, &m)| m as usize >= self.copies)
            {
                let name = modality_name(*m).map_or(String::new(), |n| format!(" ({n})"));
                return Err(format!(
                    "token {i} has modality {m}{name}, but the model's modality-adaptive \
                     layers have {} copies (modalities 0–{})",
                    self.copies,
                    self.copies - 1
                ));
            }
        }
        Ok(())
    }

    /// The logits `[tokens, vocab]` of one sequence, token `t` having
    /// modality `modalities[t]` (ignored by a plain LLaMA).
    ///
    /// Errors ([`ErrorKind::InvalidInput`]): an id beyond the vocabulary,
    /// a modality count that is not the token count, a modality without a
    /// multiway copy, a checkpoint without `lm_head.weight` (and untied).
    pub fn logits(&self, tokens: &[u32], modalities: &[u8]) -> Result<Vec<f32>> {
        let logits = self.forward_visit(tokens, modalities, true, &mut |_| Ok(()))?;
        Ok(logits.unwrap_or_default())
    }

    /// Runs one sequence, calling `visit` for every recorded linear layer
    /// in forward order (per decoder layer: q, k (copies), v (copies), o,
    /// gate, up, down), and returns the logits `[tokens, vocab]` when
    /// `want_logits` (the final norm and `lm_head` run only then). The first
    /// error of `visit` stops the pass. Errors as [`logits`](Self::logits).
    pub fn forward_visit(
        &self,
        tokens: &[u32],
        modalities: &[u8],
        want_logits: bool,
        visit: &mut dyn FnMut(Hook<'_>) -> Result<()>,
    ) -> Result<Option<Vec<f32>>> {
        self.check_sequence(tokens, modalities)
            .map_err(|msg| Error::new(ErrorKind::InvalidInput, msg).with_file(&self.dir))?;
        let lm_head = match (&self.lm_head, want_logits) {
            (None, true) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "no logits: the checkpoint has no lm_head.weight and config.json does not \
                     tie it to the embedding (`tie_word_embeddings`)",
                )
                .with_file(&self.dir))
            }
            (head, _) => head.as_deref(),
        };
        if tokens.is_empty() {
            return Ok(want_logits.then(Vec::new));
        }
        let start = Instant::now();
        let c = &self.config;
        let (t, h) = (tokens.len(), c.hidden_size);
        let routes: Vec<usize> = modalities.iter().map(|&m| m as usize).collect();
        let mut hidden = vec![0f32; t * h];
        let embed = self.view(&self.embed);
        for (row, &id) in hidden.chunks_exact_mut(h).zip(tokens) {
            embed.read_f32(id as usize * h, row);
        }
        let (cos, sin) = rope_tables(c, t);
        for layer in &self.layers {
            let normed = self.norm(&layer.input_norm, &hidden, &routes);
            let mut q = self.project(&layer.q, &normed, &routes, h, c.q_width(), visit)?;
            let mut k = self.project(&layer.k, &normed, &routes, h, c.kv_width(), visit)?;
            let v = self.project(&layer.v, &normed, &routes, h, c.kv_width(), visit)?;
            apply_rope(&mut q, c.num_attention_heads, c.head_dim, &cos, &sin);
            apply_rope(&mut k, c.num_key_value_heads, c.head_dim, &cos, &sin);
            let attn = attention(
                &q,
                &k,
                &v,
                t,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            );
            let o = self.project(&layer.o, &attn, &routes, c.q_width(), h, visit)?;
            hidden.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let normed = self.norm(&layer.post_norm, &hidden, &routes);
            let m = c.intermediate_size;
            let gate = self.project(&layer.gate, &normed, &routes, h, m, visit)?;
            let up = self.project(&layer.up, &normed, &routes, h, m, visit)?;
            let act: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
            let down = self.project(&layer.down, &act, &routes, m, h, visit)?;
            hidden.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let logits = lm_head.filter(|_| want_logits).map(|lm_head| {
            let weight = self.view(&self.norm).to_f32_vec();
            let mut normed = vec![0f32; t * h];
            for (o, x) in normed.chunks_exact_mut(h).zip(hidden.chunks_exact(h)) {
                rms_norm(x, &weight, c.rms_norm_eps, o);
            }
            linear(&self.view(lm_head), &normed, t, h, c.vocab_size)
        });
        self.count(t, start);
        Ok(logits)
    }

    fn count(&self, tokens: usize, start: Instant) {
        self.counters.examples.fetch_add(1, Ordering::Relaxed);
        self.counters
            .tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let end = Instant::now();
        if let Ok(mut span) = self.counters.span.lock() {
            *span = Some(match *span {
                None => (start, end),
                Some((a, b)) => (a.min(start), b.max(end)),
            });
        }
    }

    /// RMSNorm of every row of `x`, row `t` with copy `routes[t]` of a
    /// multiway norm.
    fn norm(&self, norm: &Routed, x: &[f32], routes: &[usize]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let weights: Vec<Vec<f32>> = (0..norm.layers.len())
            .map(|c| self.view(&norm.tensor(c)).to_f32_vec())
            .collect();
        let mut out = vec![0f32; x.len()];
        for ((o, row), &r) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(routes) {
            let w = if weights.len() == 1 {
                &weights[0]
            } else {
                &weights[r]
            };
            rms_norm(row, w, self.config.rms_norm_eps, o);
        }
        out
    }

    /// `x Wᵀ` for every row of `x` (`[tokens, in]`), row `t` through copy
    /// `routes[t]` of a multiway module; visits each copy with its rows.
    fn project(
        &self,
        module: &Routed,
        x: &[f32],
        routes: &[usize],
        in_f: usize,
        out_f: usize,
        visit: &mut dyn FnMut(Hook<'_>) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let t = routes.len();
        if module.layers.len() == 1 {
            let mut y = linear(&self.view(&module.tensor(0)), x, t, in_f, out_f);
            self.add_bias(module, 0, &mut y, out_f);
            visit(Hook {
                layer: &module.layers[0],
                rows: t,
                x,
                y: &y,
            })?;
            return Ok(y);
        }
        let mut y = vec![0f32; t * out_f];
        for (copy, layer) in module.layers.iter().enumerate() {
            let picked: Vec<usize> = (0..t).filter(|&i| routes[i] == copy).collect();
            if picked.is_empty() {
                continue;
            }
            let xs: Vec<f32> = picked
                .iter()
                .flat_map(|&i| x[i * in_f..(i + 1) * in_f].iter().copied())
                .collect();
            let mut ys = linear(
                &self.view(&module.tensor(copy)),
                &xs,
                picked.len(),
                in_f,
                out_f,
            );
            self.add_bias(module, copy, &mut ys, out_f);
            visit(Hook {
                layer,
                rows: picked.len(),
                x: &xs,
                y: &ys,
            })?;
            for (&i, row) in picked.iter().zip(ys.chunks_exact(out_f)) {
                y[i * out_f..(i + 1) * out_f].copy_from_slice(row);
            }
        }
        Ok(y)
    }

    /// Adds copy `copy`'s bias, if the module has one, to every row of `y`
    /// (the hooked output includes it, as a `torch.nn.Linear` hook sees it).
    fn add_bias(&self, module: &Routed, copy: usize, y: &mut [f32], out_f: usize) {
        if let Some(bias) = module.bias(copy) {
            let b = self.view(&bias).to_f32_vec();
            for row in y.chunks_exact_mut(out_f) {
                row.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
            }
        }
    }

    /// The language model's tensor prefix: `model.` for a plain decoder,
    /// `language_model.model.` or `model.language_model.` for a
    /// vision-language checkpoint. Recorded layers are named
    /// `{prefix}layers.N.…`, the checkpoint's own names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tokens of example `id`, or why it does not fit.
    fn tokens<'a>(&self, id: u64, example: &'a ProbeExample) -> Result<&'a [u32]> {
        match &example.input {
            ProbeInput::Tokens(t) => Ok(t),
            ProbeInput::Features(_) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("example {id} has `input` features; a LLaMA model takes `tokens`"),
            )),
            ProbeInput::Text(_) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "example {id} has untokenized `text` (run it through `run_probe`, which \
                     tokenizes it)"
                ),
            )),
        }
    }
}

/// Each token's modality for `example`: its `token_modality`
/// ([`ProbeExample::token_modality`]) when present, else its
/// `meta.token_modality` (an array as long as `tokens`, of codes 0–255 or
/// the names `text`, `vision`, `audio`), else the example's `modality` for
/// every token. The error says what is wrong with the array.
pub fn token_modalities(example: &ProbeExample) -> std::result::Result<Vec<u8>, String> {
    let n = match &example.input {
        ProbeInput::Tokens(t) => t.len(),
        ProbeInput::Features(_) => return Err("an example of `input` features".into()),
        ProbeInput::Text(_) => return Err("an example of untokenized `text`".into()),
    };
    if let Some(codes) = &example.token_modality {
        if codes.len() != n {
            return Err(format!(
                "`{TOKEN_MODALITY_KEY}` has {} entries for {n} tokens",
                codes.len()
            ));
        }
        return Ok(codes.clone());
    }
    let Some(list) = example
        .meta
        .as_ref()
        .and_then(|m| m.get(TOKEN_MODALITY_KEY))
    else {
        return Ok(vec![example.modality; n]);
    };
    let Value::Array(items) = list else {
        return Err(format!(
            "`meta.{TOKEN_MODALITY_KEY}` is not an array of modalities"
        ));
    };
    if items.len() != n {
        return Err(format!(
            "`meta.{TOKEN_MODALITY_KEY}` has {} entries for {n} tokens",
            items.len()
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            modality_value(v).ok_or_else(|| {
                format!(
                    "`meta.{TOKEN_MODALITY_KEY}[{i}]` is {v}; expected text, vision, audio or a \
                     code 0–255"
                )
            })
        })
        .collect()
}

impl ProbeModel for Llama {
    fn describe(&self) -> String {
        let c = &self.config;
        let mut text = format!(
            "LLaMA decoder: {} layers, hidden {}, {} heads",
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads
        );
        if c.num_key_value_heads != c.num_attention_heads {
            text.push_str(&format!(" ({} key/value)", c.num_key_value_heads));
        }
        text.push_str(&format!(
            ", MLP {}, vocabulary {}",
            c.intermediate_size, c.vocab_size
        ));
        if c.qkv_bias || c.o_bias || c.mlp_bias {
            let which: Vec<&str> = [(c.qkv_bias, "q/k/v"), (c.o_bias, "o"), (c.mlp_bias, "MLP")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, w)| *w)
                .collect();
            text.push_str(&format!(", biases on {}", which.join(", ")));
        }
        if c.rope_theta != 10000.0 {
            text.push_str(&format!(", rope θ {}", c.rope_theta));
        }
        if self.prefix != "model." {
            text.push_str(&format!(", language model under `{}`", self.prefix));
        }
        match c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => text.push_str(&format!(", rope linear ×{factor}")),
            RopeScaling::Dynamic { factor } => text.push_str(&format!(", rope dynamic ×{factor}")),
            RopeScaling::Llama3 { factor, .. } => {
                text.push_str(&format!(", rope llama3 ×{factor}"))
            }
        }
        if self.copies > 1 {
            text.push_str(&format!(
                ", modality-adaptive ({} copies of k/v and norms)",
                self.copies
            ));
        }
        text
    }

    /// q/k/v read the same normed input, and so do gate/up; a multiway
    /// k/v copy sees only its routed tokens, so copy `m` of v shares copy
    /// `m` of k instead of q.
    fn gram_shared(&self) -> BTreeMap<String, String> {
        let names: BTreeSet<String> = self.layers().into_iter().map(|l| l.name).collect();
        let mut out = BTreeMap::new();
        for n in 0..self.layers.len() {
            let p = format!("{}layers.{n}.", self.prefix);
            let q = format!("{p}self_attn.q_proj");
            for alias in ["k_proj", "v_proj"] {
                let alias = format!("{p}self_attn.{alias}");
                if names.contains(&alias) {
                    out.insert(alias, q.clone());
                }
            }
            for m in 0.. {
                let k = format!("{p}self_attn.k_proj.multiway.{m}");
                let v = format!("{p}self_attn.v_proj.multiway.{m}");
                if !names.contains(&k) || !names.contains(&v) {
                    break;
                }
                out.insert(v, k);
            }
            out.insert(format!("{p}mlp.up_proj"), format!("{p}mlp.gate_proj"));
        }
        out
    }

    fn block_of(&self, layer: &str) -> Option<usize> {
        let rest = layer.strip_prefix(&self.prefix)?.strip_prefix("layers.")?;
        rest.split('.').next()?.parse().ok()
    }

    fn layers(&self) -> Vec<LayerShape> {
        let mut out = Vec::new();
        for layer in &self.layers {
            for (module, inn, out_f) in layer.linears(&self.config) {
                for name in &module.layers {
                    out.push(LayerShape {
                        name: name.clone(),
                        in_features: inn,
                        out_features: out_f,
                    });
                }
            }
        }
        out
    }

    /// Tokenizes with the model directory's `tokenizer.json`, special
    /// tokens included (the BOS of LLaMA tokenizers).
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let path = self.dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "`text` examples need the model's tokenizer, and the model directory has \
                     no {TOKENIZER_FILE} (add it, or pre-tokenize to `tokens`)"
                ),
            )
            .with_file(path));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("cannot load the tokenizer: {e}"),
            )
            .with_file(&path)
        })?;
        texts
            .iter()
            .map(|text| {
                tokenizer
                    .encode(*text, true)
                    .map(|encoding| encoding.get_ids().to_vec())
                    .map_err(|e| {
                        Error::new(ErrorKind::InvalidInput, format!("cannot tokenize: {e}"))
                            .with_file(&path)
                    })
            })
            .collect()
    }

    fn check(&self, id: u64, example: &ProbeExample) -> Result<()> {
        let tokens = self.tokens(id, example)?;
        let invalid =
            |msg: String| Error::new(ErrorKind::InvalidInput, format!("example {id}: {msg}"));
        let modalities = token_modalities(example).map_err(invalid)?;
        self.check_sequence(tokens, &modalities).map_err(invalid)
    }

    fn forward(&self, id: u64, example: &ProbeExample, recorder: &Recorder) -> Result<()> {
        let tokens = self.tokens(id, example)?;
        let modalities = token_modalities(example)
            .map_err(|msg| Error::new(ErrorKind::InvalidInput, format!("example {id}: {msg}")))?;
        self.forward_visit(tokens, &modalities, false, &mut |hook| {
            recorder.push_f32(hook.layer, hook.rows, hook.x, hook.y, id, example.modality)
        })?;
        Ok(())
    }
}
