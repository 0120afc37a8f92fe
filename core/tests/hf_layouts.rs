//! The native LLaMA/Qwen2 probe on checkpoints in the layouts people
//! download, built by `transformers` itself (`tests/python/hf_models.py`):
//! a llava-hf `LlavaForConditionalGeneration` (nested `text_config`, names
//! `language_model.model.layers.*`), the same model under transformers'
//! in-memory names (`model.language_model.*`), a `Qwen2ForCausalLM` (q/k/v
//! biases, `rope_theta` 1e6), a LLaVA whose language model is Qwen2, a
//! `Qwen2VLForConditionalGeneration` and a
//! `LlavaOnevisionForConditionalGeneration`.
//! Every statistic the probe records (means, per-example rows, Grams) is
//! compared with what transformers' forward hooks see on the same tokens,
//! in float64, under the checkpoint's own tensor names.
//!
//! Needs `python3` with `torch`, `transformers` and `safetensors`. Without
//! them the test says so on stderr and passes, unless
//! `FLATMERGE_REQUIRE_PYTHON` is set (CI sets it), where it fails.
//!
//! Tolerance: every recorded value `a` and its reference `b` satisfy
//! `|a − b| ≤ 1e-5 · (|b| + rms(B))`, `rms(B)` the root mean square of the
//! array `b` belongs to (one layer's `x_mean`, `y_rows`, `x_gram`, …): the
//! `rms` term keeps entries near zero from demanding more than f32 gives.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use flatmerge::probe::llama::Llama;
use flatmerge::probe::set::write_probe_set;
use flatmerge::probe::{probe_files, ProbeExample, ProbeInput, ProbeOptions};
use flatmerge::stats::ActivationStats;
use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/hf_models.py");

const RTOL: f64 = 1e-5;

#[path = "../../tests/support/python_ready.rs"]
mod python_ready;

fn python_ready() -> bool {
    python_ready::python_ready(
        "torch, transformers, safetensors",
        "transformers layout comparison",
    )
}

fn python(args: &[&str]) -> Vec<u8> {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "hf_models.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn build(kind: &str, dir: &Path) {
    python(&["build", kind, dir.to_str().unwrap()]);
}

/// Token sequences of lengths 1, 6, 11 and 4 below `vocab - 1` (the last id
/// is LLaVA's image token).
fn examples(vocab: u32) -> Vec<ProbeExample> {
    [1usize, 6, 11, 4]
        .iter()
        .enumerate()
        .map(|(i, &n)| ProbeExample {
            input: ProbeInput::Tokens(
                (0..n)
                    .map(|t| ((t * 7 + i * 13 + 1) as u32) % (vocab - 1))
                    .collect(),
            ),
            modality: 0,
            source: "text".into(),
            token_modality: None,
            meta: None,
        })
        .collect()
}

fn numbers(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(numbers).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

fn compare(what: &str, got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut worst = 0f64;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let bound = RTOL * (b.abs() + rms);
        let err = (a as f64 - b).abs();
        assert!(
            err <= bound,
            "{what}[{i}]: {a} vs transformers {b} (bound {bound:e})"
        );
        worst = worst.max(err / bound);
    }
    worst
}

/// Builds `kind`, probes it natively (means, rows and Grams), hooks it in
/// transformers, and compares every layer; returns the layer names and the
/// largest error in units of the tolerance.
fn check(kind: &str, prefix: &str) -> (Vec<String>, f64) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(kind);
    build(kind, &model);
    let llama = Llama::load(&model).unwrap();
    assert_eq!(llama.prefix(), prefix, "{kind}");
    let set = examples(64);
    let probe = dir.path().join("probe.jsonl");
    write_probe_set(&probe, &set).unwrap();
    let stats_path = dir.path().join("a.stats.safetensors");
    let options = ProbeOptions {
        gram: true,
        threads: Some(2),
        ..ProbeOptions::default()
    };
    probe_files(&model, &probe, &stats_path, &options).unwrap();
    let stats = ActivationStats::load(&stats_path).unwrap();
    let want: Value = serde_json::from_slice(&python(&[
        "hooks",
        model.to_str().unwrap(),
        probe.to_str().unwrap(),
    ]))
    .unwrap();
    let want = want["layers"].as_object().unwrap();
    let recorded: Vec<String> = stats.layers.keys().cloned().collect();
    let mut hooked: Vec<String> = want.keys().cloned().collect();
    hooked.sort();
    assert_eq!(
        recorded, hooked,
        "{kind}: the same layers, by the same names"
    );
    let mut worst = 0f64;
    for (layer, w) in want {
        let s = stats.layer(layer).unwrap();
        let what = format!("{kind} {layer}");
        assert_eq!(s.count, w["count"].as_u64(), "{what}: tokens");
        for (key, got) in [
            ("x_mean", s.x_mean.clone().unwrap()),
            ("y_mean", s.y_mean.clone().unwrap()),
            ("x_rows", s.x_rows.clone().unwrap().data),
            ("y_rows", s.y_rows.clone().unwrap().data),
            ("x_gram", stats.gram(layer).unwrap().values().to_vec()),
        ] {
            worst = worst.max(compare(&format!("{what} {key}"), &got, &numbers(&w[key])));
        }
    }
    (recorded, worst)
}

#[test]
fn llava_hf_checkpoints_are_probed_under_their_own_names() {
    if !python_ready() {
        return;
    }
    let (layers, worst) = check("llava", "language_model.model.");
    assert_eq!(layers.len(), 14);
    assert!(layers.contains(&"language_model.model.layers.1.mlp.up_proj".to_string()));
    let (memory, worst_memory) = check("llava-memory", "model.language_model.");
    assert!(memory.contains(&"model.language_model.layers.0.self_attn.k_proj".to_string()));
    let _ = writeln!(
        std::io::stderr(),
        "llava-hf against transformers: largest error / tolerance (rtol {RTOL:e}): \
         {worst:.3} (saved names), {worst_memory:.3} (in-memory names)"
    );
}

#[test]
fn qwen2_language_models_match_transformers() {
    if !python_ready() {
        return;
    }
    let (layers, worst) = check("qwen2", "model.");
    assert_eq!(layers.len(), 14);
    let (_, worst_llava) = check("llava-qwen2", "language_model.model.");
    // The two ends of the AdaMMS OneVision → Qwen2-VL pair: Qwen2-VL's
    // multimodal rope on text-only positions, OneVision's nested Qwen2.
    let (vl, worst_vl) = check("qwen2-vl", "model.");
    assert!(vl.iter().all(|l| l.starts_with("model.layers.")), "{vl:?}");
    let (_, worst_ov) = check("llava-onevision", "language_model.model.");
    let _ = writeln!(
        std::io::stderr(),
        "Qwen2 against transformers: largest error / tolerance (rtol {RTOL:e}): \
         {worst:.3} (Qwen2ForCausalLM), {worst_llava:.3} (LLaVA with a Qwen2 text_config), \
         {worst_vl:.3} (Qwen2-VL), {worst_ov:.3} (LLaVA-OneVision)"
    );
}

#[test]
fn qwen2_biases_are_read_and_unannounced_biases_refused() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen2");
    build("qwen2", &model);
    let llama = Llama::load(&model).unwrap();
    let c = llama.config();
    assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(c.rope_theta, 1e6);
    // The same tensors under a LLaMA config: the q/k/v biases are no longer
    // announced, and loading names the first one instead of ignoring it.
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"qwen2\"", "\"llama\"")).unwrap();
    let e = Llama::load(&model).unwrap_err();
    assert_eq!(
        e.tensor(),
        Some("model.layers.0.self_attn.q_proj.bias"),
        "{e}"
    );
    assert!(e.message().contains("does not announce"), "{e}");
    // Sliding-window attention is refused by name.
    std::fs::write(
        &path,
        text.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        ),
    )
    .unwrap();
    let e = Llama::load(&model).unwrap_err();
    assert_eq!(e.tensor(), Some("use_sliding_window"), "{e}");
}

#[test]
fn the_original_llava_config_is_read_flat_and_llava_hf_nested() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    // The original release: model_type `llava`, the language model's keys
    // at the top, no text_config.
    std::fs::write(
        &path,
        r#"{"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 64, "mm_hidden_size": 16}"#,
    )
    .unwrap();
    let c = flatmerge::probe::llama::LlamaConfig::load(dir.path(), None).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers), (32, 2));
    // llava-hf: the nested text_config wins over top-level keys, and a
    // top-level tie_word_embeddings fills in when the nested one lacks it.
    std::fs::write(
        &path,
        r#"{"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "hidden_size": 999, "tie_word_embeddings": true,
            "text_config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
                            "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 64}}"#,
    )
    .unwrap();
    let c = flatmerge::probe::llama::LlamaConfig::load(dir.path(), None).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers), (32, 3));
    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias);
}
