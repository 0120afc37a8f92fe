//! The Hugging Face `config.json` of a LLaMA-family decoder: the fields the
//! native probe needs, read with Hugging Face's defaults, and everything
//! it cannot run refused with a message that names the key.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, ErrorKind, Result};

/// The name of the model description read beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// How rotary frequencies are rescaled for long contexts
/// (`rope_scaling` / `rope_parameters` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// No rescaling (`null`, absent, or `"default"`).
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Dynamic NTK: when a sequence is longer than
    /// `max_position_embeddings`, the base grows with its length. The
    /// length is the sequence's own (Hugging Face's cached variant keeps the
    /// longest length seen so far, so its result depends on call order).
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// LLaMA 3.1's band-wise rescaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// The sizes and constants of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size` (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// `hidden_size`, the residual stream's width.
    pub hidden_size: usize,
    /// `intermediate_size`, the MLP's width.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (query heads).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`, no
    /// grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// `head_dim` (default `hidden_size / num_attention_heads`); even.
    pub head_dim: usize,
    /// `rms_norm_eps` (default 1e-6, as in `transformers`).
    pub rms_norm_eps: f64,
    /// `rope_theta` (default 10000).
    pub rope_theta: f64,
    /// `rope_scaling`.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings` (default 2048); only dynamic NTK scaling
    /// reads it, longer sequences are not refused.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings` (default false): logits use the embedding.
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections (Qwen2 always;
    /// LLaMA with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (LLaMA with `attention_bias`; never
    /// Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP's three projections (LLaMA's `mlp_bias`).
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// A config with `transformers`' defaults for everything but the sizes
    /// (`head_dim = hidden / heads`, no rope scaling, untied).
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        }
    }

    /// Width of the query projection's output (`heads × head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs (`kv_heads × head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Checks what the forward pass relies on: positive sizes, an even
    /// `head_dim`, key/value heads dividing the query heads, positive
    /// finite constants. Errors are [`ErrorKind::InvalidInput`] naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |key: &str, msg: String| Err(Error::new(ErrorKind::InvalidInput, msg).with_tensor(key));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(key, format!("`{key}` must be positive"));
            }
        }
        if self.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!(
                    "head_dim {} is odd: rotary embeddings rotate halves",
                    self.head_dim
                ),
            );
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad("rms_norm_eps", "`rms_norm_eps` must be ≥ 0".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", "`rope_theta` must be positive".into());
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                if !positive(factor) {
                    return bad("rope_scaling", "`factor` must be positive".into());
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if ![
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ]
                .into_iter()
                .all(positive)
                    || high_freq_factor <= low_freq_factor
                {
                    return bad(
                        "rope_scaling",
                        "llama3 scaling needs positive `factor`, `low_freq_factor`, \
                         `original_max_position_embeddings` and `high_freq_factor` > \
                         `low_freq_factor`"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    ///
    /// Read: `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    /// `num_attention_heads` (required); `vocab_size` (default: the
    /// `embedding_rows` given, the embedding's row count), and the optional
    /// keys of [`LlamaConfig`]'s fields; `attention_bias` and `mlp_bias`
    /// (LLaMA), biases on q/k/v for a Qwen2 `model_type`. A vision-language
    /// config (`model_type` `llava`, `llava_next`, `llava_onevision`) is read
    /// from its nested `text_config`. `rope_theta` and `rope_scaling`
    /// may also come from `rope_parameters` (transformers 5). Refused
    /// ([`ErrorKind::InvalidInput`], naming the key): a missing or
    /// non-integer size, `hidden_act` other than `silu`, Qwen2's
    /// sliding-window attention, a `rope_scaling` type other than linear, dynamic and
    /// llama3 (yarn, longrope, …), and whatever [`validate`](Self::validate)
    /// refuses.
    pub fn from_json(
        text: &str,
        file: &Path,
        embedding_rows: Option<usize>,
    ) -> Result<LlamaConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            Error::new(ErrorKind::InvalidInput, format!("not valid JSON: {e}")).with_file(file)
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::new(ErrorKind::InvalidInput, "not a JSON object").with_file(file));
        };
        let obj = language_model_config(&obj);
        LlamaConfig::from_object(&obj, embedding_rows).map_err(|e| e.with_file(file))
    }

    fn from_object(obj: &Map<String, Value>, embedding_rows: Option<usize>) -> Result<LlamaConfig> {
        // What the model calls itself, for messages.
        let identity = match obj.get("model_type").and_then(Value::as_str) {
            Some(t) => format!("model_type `{t}`"),
            None => match obj
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
            {
                Some(a) => format!("architecture `{a}`"),
                None => "no model_type".to_string(),
            },
        };
        let err = |key: &str, msg: String| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{msg} ({identity}, native LLaMA probe)"),
            )
            .with_tensor(key)
        };
        let size = |key: &str| -> Result<Option<usize>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| err(key, format!("`{key}` is {v}, not a size"))),
            }
        };
        let required = |key: &str| -> Result<usize> {
            size(key)?.ok_or_else(|| err(key, format!("config.json has no `{key}`")))
        };
        let float = |o: &Map<String, Value>, key: &str, default: f64| -> Result<f64> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| err(key, format!("`{key}` is {v}, not a number"))),
            }
        };
        let flag = |key: &str| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(err(key, format!("`{key}` is {v}, not true or false"))),
            }
        };
        if let Some(act) = obj.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(err(
                    "hidden_act",
                    format!("`hidden_act` is {act}; the LLaMA MLP needs \"silu\""),
                ));
            }
        }
        // Qwen2 hard-codes biases on q/k/v (and none on o); its config.json
        // has no `attention_bias` key. LLaMA's `attention_bias` covers all four.
        let qwen2 = obj
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(is_qwen2_type);
        let attention_bias = flag("attention_bias")?;
        let mlp_bias = flag("mlp_bias")?;
        if qwen2 {
            if flag("use_sliding_window")? {
                return Err(err(
                    "use_sliding_window",
                    "`use_sliding_window` is true: sliding-window attention is not supported"
                        .into(),
                ));
            }
            if let Some(Value::Array(types)) = obj.get("layer_types") {
                if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                    return Err(err(
                        "layer_types",
                        format!("layer type {t}: only full_attention is supported"),
                    ));
                }
            }
        }
        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let vocab_size = match (size("vocab_size")?, embedding_rows) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => {
                return Err(err("vocab_size", "config.json has no `vocab_size`".into()))
            }
        };
        let mut config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: size("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim: size("head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1)),
            rms_norm_eps: float(obj, "rms_norm_eps", 1e-6)?,
            rope_theta: float(obj, "rope_theta", 10000.0)?,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: size("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: flag("tie_word_embeddings")?,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias,
        };
        let scaling = match obj.get("rope_parameters") {
            Some(Value::Object(p)) => {
                config.rope_theta = float(p, "rope_theta", config.rope_theta)?;
                Some(("rope_parameters", p))
            }
            Some(Value::Null) | None => match obj.get("rope_scaling") {
                Some(Value::Object(p)) => Some(("rope_scaling", p)),
                Some(Value::Null) | None => None,
                Some(v) => {
                    return Err(err(
                        "rope_scaling",
                        format!("`rope_scaling` is {v}, not an object"),
                    ))
                }
            },
            Some(v) => {
                return Err(err(
                    "rope_parameters",
                    format!("`rope_parameters` is {v}, not an object"),
                ))
            }
        };
        if let Some((key, p)) = scaling {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let need = |name: &str| -> Result<f64> {
                match p.get(name) {
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| err(key, format!("`{key}.{name}` is {v}, not a number"))),
                    None => Err(err(key, format!("{kind} scaling needs `{key}.{name}`"))),
                }
            };
            config.rope_scaling = match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: need("factor")?,
                },
                "dynamic" => RopeScaling::Dynamic {
                    factor: need("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                },
                other => {
                    return Err(err(
                        key,
                        format!(
                            "rope scaling type `{other}` is not supported (supported: linear, \
                             dynamic, llama3)"
                        ),
                    ))
                }
            };
        }
        config
            .validate()
            .map_err(|e| err(e.tensor().unwrap_or_default(), e.message().to_string()))?;
        Ok(config)
    }

    /// Reads `dir/config.json` ([`from_json`](Self::from_json)).
    pub fn load(dir: &Path, embedding_rows: Option<usize>) -> Result<LlamaConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, "no config.json").with_file(&path)
            } else {
                Error::io(&path, e)
            }
        })?;
        LlamaConfig::from_json(&text, &path, embedding_rows)
    }

    /// A `config.json` for this config (`LlamaForCausalLM`, `model_type`
    /// `llama`, or `Qwen2ForCausalLM` for biases on q/k/v only; F32
    /// weights), which [`from_json`](Self::from_json) reads
    /// back to an equal config.
    pub fn to_json(&self) -> String {
        let scaling = match self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        // Biases on q/k/v only are Qwen2's layout, which its config implies
        // by its type; LLaMA states them with `attention_bias`.
        let qwen2 = self.qkv_bias && !self.o_bias;
        let (architecture, model_type) = if qwen2 {
            ("Qwen2ForCausalLM", "qwen2")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let value = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// `model_type`s of Qwen2 language models (biases on q/k/v): Qwen2 itself
/// and the text part of Qwen2-VL.
fn is_qwen2_type(t: &str) -> bool {
    matches!(t, "qwen2" | "qwen2_vl_text")
}

/// `model_type`s of vision-language checkpoints whose language model is
/// described by a nested `text_config` (llava-hf's LLaVA-1.5, LLaVA-NeXT,
/// LLaVA-OneVision; Qwen2-VL). Qwen2-VL's multimodal rope (`mrope_section`)
/// gives every token of a text-only sequence the same position on its
/// three axes, where it is the plain rope: the probe runs token ids only.
const NESTED: [&str; 4] = ["llava", "llava_next", "llava_onevision", "qwen2_vl"];

/// The object describing the language model: the nested `text_config` of a
/// vision-language checkpoint ([`NESTED`]), with the top level's
/// `tie_word_embeddings` where the nested object lacks it (older llava-hf
/// configs keep it at the top); the object itself otherwise — the original
/// LLaVA release (`LlavaLlamaForCausalLM`) has `model_type` `llava` with
/// the language model's keys at the top.
fn language_model_config(obj: &Map<String, Value>) -> Map<String, Value> {
    let model_type = obj.get("model_type").and_then(Value::as_str);
    match obj.get("text_config") {
        Some(Value::Object(text)) if model_type.is_some_and(|t| NESTED.contains(&t)) => {
            let mut text = text.clone();
            if !text.contains_key("tie_word_embeddings") {
                if let Some(tie) = obj.get("tie_word_embeddings") {
                    text.insert("tie_word_embeddings".into(), tie.clone());
                }
            }
            text
        }
        _ => obj.clone(),
    }
}

/// Whether a parsed `config.json` describes a model the LLaMA probe runs:
/// `model_type` `llama`, `mplug_owl2` or `qwen2`, or an `architectures`
/// entry containing `Llama`, `MPLUGOwl2` or `Qwen2ForCausalLM`
/// (`LlamaForCausalLM`, `LlavaLlamaForCausalLM`, `MPLUGOwl2LlamaForCausalLM`),
/// or a vision-language checkpoint ([`NESTED`]) whose `text_config` is one.
pub fn is_llama_config(value: &Value) -> bool {
    let model_type = value.get("model_type").and_then(Value::as_str);
    if matches!(model_type, Some("llama" | "mplug_owl2")) || model_type.is_some_and(is_qwen2_type) {
        return true;
    }
    if let Some(text) = value.get("text_config") {
        if model_type.is_some_and(|t| NESTED.contains(&t)) {
            return is_llama_config(text);
        }
    }
    value
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|s| s.contains("Llama") || s.contains("MPLUGOwl2") || s == "Qwen2ForCausalLM")
        })
}
