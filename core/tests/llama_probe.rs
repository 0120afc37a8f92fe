//! The native LLaMA probe: its forward pass against an independent NumPy
//! implementation (`tests/python/llama_reference.py`) on tiny random models
//! — grouped-query attention, llama3 / linear / dynamic rope scaling, tied
//! embeddings, BF16 weights, mPLUG-Owl2's modality-adaptive copies — the
//! recorded statistics against the hooked activations, and the errors.
//!
//! The comparison needs `python3` with `numpy`. Without it the test says so
//! on stderr and passes, unless `FLATMERGE_REQUIRE_PYTHON` is set (CI sets
//! it), where it fails.
//!
//! Tolerance: every value `a` computed here (f32, sgemm) and its reference
//! `b` (float64) satisfy `|a − b| ≤ 1e-4 · (|b| + rms(B))`, where `rms(B)` is
//! the root mean square of the whole array `b` belongs to (a logits matrix,
//! a layer's `x` or `y` for one example); the `rms` term keeps values near
//! zero from demanding more than f32 can give.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use flatmerge::demo::Rng;
use flatmerge::dtype::Dtype;
use flatmerge::probe::llama::{
    token_modalities, write_random_model, Llama, LlamaConfig, RandomModel, RopeScaling,
};
use flatmerge::probe::set::write_probe_set;
use flatmerge::probe::{
    open_model, probe_files, run_probe, ProbeExample, ProbeInput, ProbeOptions,
};
use flatmerge::recorder::{Recorder, RecorderOptions};
use flatmerge::stats::ActivationStats;
use flatmerge::ErrorKind;
use serde_json::{json, Value};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/python/llama_reference.py"
);

/// Relative tolerance against the float64 reference (see the module docs).
const RTOL: f64 = 1e-4;

#[path = "../../tests/support/python_ready.rs"]
mod python_ready;

fn python_ready() -> bool {
    python_ready::python_ready("numpy", "llama reference comparison")
}

/// The tiny model: hidden 32, 4 heads over 2 key/value heads,
/// MLP 48, 2 layers, vocabulary 64.
fn tiny() -> LlamaConfig {
    let mut c = LlamaConfig::new(64, 32, 48, 2, 4, 2);
    c.rms_norm_eps = 1e-5;
    c
}

fn model(config: LlamaConfig, dtype: Dtype, multiway: usize) -> RandomModel {
    RandomModel {
        config,
        dtype,
        multiway,
        seed: 7,
    }
}

/// Examples of lengths 1, 5, 12, 9 (`long` adds one of 20 tokens), of
/// mixed modalities; the third has a per-token modality list.
fn examples(vocab: usize, long: bool) -> Vec<ProbeExample> {
    let mut rng = Rng::new(3, "tokens");
    let mut lengths = vec![1, 5, 12, 9];
    if long {
        lengths.push(20);
    }
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let tokens: Vec<u32> = (0..n)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            let meta = (i == 2).then(|| {
                let m: Vec<Value> = (0..n)
                    .map(|t| {
                        if (3..8).contains(&t) {
                            json!("vision")
                        } else {
                            json!(0)
                        }
                    })
                    .collect();
                json!({ "token_modality": m, "id": i })
            });
            ProbeExample {
                input: ProbeInput::Tokens(tokens),
                modality: if i == 1 || i == 2 { 1 } else { 0 },
                source: format!("task{}", i % 2),
                token_modality: None,
                meta,
            }
        })
        .collect()
}

fn tokens(e: &ProbeExample) -> &[u32] {
    match &e.input {
        ProbeInput::Tokens(t) => t,
        _ => unreachable!(),
    }
}

/// Every hooked layer's `(layer, rows, x, y)` for one example, in visit order.
type Hooks = Vec<(String, usize, Vec<f32>, Vec<f32>)>;

/// One layer's pushes: `(example, rows, x, y)`.
type Pushes = Vec<(usize, usize, Vec<f32>, Vec<f32>)>;

fn run(llama: &Llama, e: &ProbeExample) -> (Vec<f32>, Hooks) {
    let modalities = token_modalities(e).unwrap();
    let mut hooks = Vec::new();
    let logits = llama
        .forward_visit(tokens(e), &modalities, true, &mut |h| {
            hooks.push((h.layer.to_string(), h.rows, h.x.to_vec(), h.y.to_vec()));
            Ok(())
        })
        .unwrap()
        .unwrap();
    (logits, hooks)
}

fn reference(dir: &Path, probe: &Path) -> Value {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg(dir)
        .arg(probe)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

fn flat(rows: &Value) -> Vec<f64> {
    rows.as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().unwrap())
        })
        .collect()
}

/// Checks `got` against `want` within the tolerance; returns the largest
/// error in units of the tolerance.
fn compare(what: &str, got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut worst = 0f64;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let bound = RTOL * (b.abs() + rms);
        let err = (a as f64 - b).abs();
        assert!(
            err <= bound,
            "{what}[{i}]: {a} vs reference {b} (bound {bound:e})"
        );
        worst = worst.max(err / bound);
    }
    worst
}

/// Writes the model and the probe set, runs both implementations, compares
/// logits and every hooked activation; returns the largest error in units
/// of the tolerance.
fn check_against_reference(name: &str, m: &RandomModel, set: &[ProbeExample]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join(name);
    write_random_model(&model_dir, m).unwrap();
    let probe = dir.path().join("probe.jsonl");
    write_probe_set(&probe, set).unwrap();
    let llama = Llama::load(&model_dir).unwrap();
    let reference = reference(&model_dir, &probe);
    let examples = reference["examples"].as_array().unwrap();
    assert_eq!(examples.len(), set.len());
    let mut worst = 0f64;
    for (n, (e, r)) in set.iter().zip(examples).enumerate() {
        let (logits, hooks) = run(&llama, e);
        worst = worst.max(compare(
            &format!("{name} example {n} logits"),
            &logits,
            &flat(&r["logits"]),
        ));
        let layers = r["layers"].as_object().unwrap();
        assert_eq!(
            hooks.len(),
            layers.len(),
            "{name} example {n}: hooked layers {:?} vs {:?}",
            hooks.iter().map(|h| &h.0).collect::<Vec<_>>(),
            layers.keys().collect::<Vec<_>>()
        );
        for (layer, rows, x, y) in &hooks {
            let want = &layers[layer.as_str()];
            assert_eq!(want["x"].as_array().unwrap().len(), *rows, "{layer}");
            let what = format!("{name} example {n} {layer}");
            worst = worst.max(compare(&format!("{what} x"), x, &flat(&want["x"])));
            worst = worst.max(compare(&format!("{what} y"), y, &flat(&want["y"])));
        }
    }
    worst
}

#[test]
fn forward_matches_the_numpy_reference() {
    if !python_ready() {
        return;
    }
    let mut report = Vec::new();
    let set = examples(64, false);

    // Grouped-query attention, F32.
    let base = model(tiny(), Dtype::F32, 0);
    report.push(("gqa f32", check_against_reference("gqa", &base, &set)));

    // llama3 scaling with bands inside the tiny model's frequencies
    // (head_dim 8: wavelengths 6.3, 63, 628, 6283 against 16 and 64).
    let mut c = tiny();
    c.rope_theta = 10.0f64.powi(4);
    c.rope_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    report.push((
        "llama3",
        check_against_reference("llama3", &model(c, Dtype::F32, 0), &set),
    ));

    // Linear scaling, an explicit head_dim wider than hidden / heads, tied
    // embeddings, BF16 weights (the reference decodes BF16 itself).
    let mut c = tiny();
    c.head_dim = 16;
    c.rope_scaling = RopeScaling::Linear { factor: 2.0 };
    c.tie_word_embeddings = true;
    report.push((
        "linear bf16 tied",
        check_against_reference("linear", &model(c, Dtype::BF16, 0), &set),
    ));

    // Dynamic NTK: sequences longer than max_position_embeddings rescale.
    let mut c = tiny();
    c.max_position_embeddings = 8;
    c.rope_scaling = RopeScaling::Dynamic { factor: 2.0 };
    report.push((
        "dynamic",
        check_against_reference("dynamic", &model(c, Dtype::F32, 0), &examples(64, true)),
    ));

    // mPLUG-Owl2's modality-adaptive copies, F16: text, vision and mixed examples.
    report.push((
        "multiway f16",
        check_against_reference("multiway", &model(tiny(), Dtype::F16, 2), &set),
    ));

    let _ = writeln!(
        std::io::stderr(),
        "llama reference: largest error / tolerance (rtol {RTOL:e}): {report:?}"
    );
}

#[test]
fn the_probe_records_exactly_the_hooked_activations() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("mplug");
    write_random_model(&model_dir, &model(tiny(), Dtype::BF16, 2)).unwrap();
    let set = examples(64, false);
    let probe = dir.path().join("probe.jsonl");
    write_probe_set(&probe, &set).unwrap();

    // Through the framework: config.json's architecture picks the probe.
    let out1 = dir.path().join("one.stats.safetensors");
    let out2 = dir.path().join("two.stats.safetensors");
    let options = |threads| ProbeOptions {
        threads: Some(threads),
        ..ProbeOptions::default()
    };
    let summary = probe_files(&model_dir, &probe, &out1, &options(1)).unwrap();
    probe_files(&model_dir, &probe, &out2, &options(2)).unwrap();
    assert!(summary.model.contains("LLaMA decoder"), "{}", summary.model);
    assert!(
        summary.model.contains("modality-adaptive"),
        "{}",
        summary.model
    );
    // 7 linear layers + 2 extra copies (k, v) per decoder layer.
    assert_eq!((summary.examples, summary.rows, summary.layers), (4, 4, 18));
    let tokens: usize = set
        .iter()
        .map(|e| match &e.input {
            ProbeInput::Tokens(t) => t.len(),
            _ => unreachable!(),
        })
        .sum();
    assert_eq!(summary.tokens, tokens as u64);
    assert_eq!(
        std::fs::read(&out1).unwrap(),
        std::fs::read(&out2).unwrap(),
        "the file does not depend on the thread count"
    );
    let stats = ActivationStats::load(&out1).unwrap();
    assert_eq!(stats.modality.as_deref(), Some(&[0u8, 1, 1, 0][..]));

    // The probe-set key `token_modality` routes as `meta.token_modality`
    // does, and wins over it.
    let mut keyed = set.clone();
    let meta = keyed[2].meta.take().unwrap();
    keyed[2].token_modality = Some(
        meta["token_modality"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| if v == "vision" { 1 } else { 0 })
            .collect(),
    );
    keyed[2].meta = Some(json!({"token_modality": [2], "id": meta["id"]}));
    let keyed_probe = dir.path().join("keyed.jsonl");
    write_probe_set(&keyed_probe, &keyed).unwrap();
    let out3 = dir.path().join("keyed.stats.safetensors");
    probe_files(&model_dir, &keyed_probe, &out3, &options(2)).unwrap();
    assert_eq!(ActivationStats::load(&out3).unwrap().layers, stats.layers);

    // The same activations, hooked directly.
    let llama = Llama::load(&model_dir).unwrap();
    // Per layer: (example, rows, x, y) of each push.
    let mut per_layer: BTreeMap<String, Pushes> = BTreeMap::new();
    for (n, e) in set.iter().enumerate() {
        let (_, hooks) = run(&llama, e);
        for (layer, rows, x, y) in hooks {
            per_layer.entry(layer).or_default().push((n, rows, x, y));
        }
    }
    assert_eq!(per_layer.len(), stats.layers.len());
    let shapes = llama_layers(&model_dir);
    let close = |what: &str, got: &[f32], want: &[f64]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-6 * (b.abs() + 1e-6),
                "{what}[{i}]: recorded {a}, hooked mean {b}"
            );
        }
    };
    for (layer, pushes) in &per_layer {
        let s = stats
            .layer(layer)
            .unwrap_or_else(|| panic!("{layer} not recorded"));
        let (inn, out) = shapes[layer];
        let count: usize = pushes.iter().map(|p| p.1).sum();
        assert_eq!(s.count, Some(count as u64), "{layer}");
        // Column sums over tokens, per example and overall, in f64.
        let mean = |rows: usize, data: &[f32], width: usize| -> Vec<f64> {
            (0..width)
                .map(|j| (0..rows).map(|r| data[r * width + j] as f64).sum::<f64>())
                .map(|s| s / rows as f64)
                .collect()
        };
        let mut total_x = vec![0f64; inn];
        let mut total_y = vec![0f64; out];
        for (_, rows, x, y) in pushes {
            for (t, v) in total_x.iter_mut().zip(mean(*rows, x, inn)) {
                *t += v * *rows as f64;
            }
            for (t, v) in total_y.iter_mut().zip(mean(*rows, y, out)) {
                *t += v * *rows as f64;
            }
        }
        total_x.iter_mut().for_each(|v| *v /= count as f64);
        total_y.iter_mut().for_each(|v| *v /= count as f64);
        close(
            &format!("{layer} x_mean"),
            s.x_mean.as_ref().unwrap(),
            &total_x,
        );
        close(
            &format!("{layer} y_mean"),
            s.y_mean.as_ref().unwrap(),
            &total_y,
        );
        let (xr, yr) = (s.x_rows.as_ref().unwrap(), s.y_rows.as_ref().unwrap());
        for n in 0..set.len() {
            match pushes.iter().find(|p| p.0 == n) {
                Some((_, rows, x, y)) => {
                    close(
                        &format!("{layer} x_rows[{n}]"),
                        xr.row(n),
                        &mean(*rows, x, inn),
                    );
                    close(
                        &format!("{layer} y_rows[{n}]"),
                        yr.row(n),
                        &mean(*rows, y, out),
                    );
                }
                None => {
                    // The example sent no token through this copy: zeros.
                    assert!(xr.row(n).iter().all(|&v| v == 0.0), "{layer} row {n}");
                    assert!(yr.row(n).iter().all(|&v| v == 0.0), "{layer} row {n}");
                }
            }
        }
    }
    // Routing: text-only example 0 never reaches copy 1; vision-only
    // example 1 never reaches copy 0; mixed example 2 reaches both, with 5
    // of its 12 tokens through copy 1.
    let k0 = &per_layer["model.layers.0.self_attn.k_proj.multiway.0"];
    let k1 = &per_layer["model.layers.0.self_attn.k_proj.multiway.1"];
    assert_eq!(
        k0.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
        [(0, 1), (2, 7), (3, 9)]
    );
    assert_eq!(
        k1.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
        [(1, 5), (2, 5)]
    );
    let q = &per_layer["model.layers.0.self_attn.q_proj"];
    assert_eq!(q.iter().map(|p| p.1).sum::<usize>(), 1 + 5 + 12 + 9);

    // Throughput counters.
    let t = llama.throughput();
    assert_eq!((t.examples, t.tokens), (4, 27));
    assert!(t.tokens_per_second() > 0.0);
}

/// `(in, out)` of every recorded layer, from the framework's trait.
fn llama_layers(dir: &Path) -> BTreeMap<String, (usize, usize)> {
    open_model(dir)
        .unwrap()
        .layers()
        .into_iter()
        .map(|l| (l.name, (l.in_features, l.out_features)))
        .collect()
}

#[test]
fn later_tokens_never_change_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    write_random_model(&d, &model(tiny(), Dtype::F32, 0)).unwrap();
    let llama = Llama::load(&d).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 7 % 64) as u32).collect();
    let full = llama.logits(&tokens, &[0; 10]).unwrap();
    let prefix = llama.logits(&tokens[..4], &[0; 4]).unwrap();
    // Causal: the first four tokens' logits are those of the prefix alone
    // (up to sgemm's blocking, which may differ with the sequence length).
    for (a, b) in prefix.iter().zip(&full[..prefix.len()]) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // A plain LLaMA ignores modalities.
    assert_eq!(llama.logits(&tokens, &[1; 10]).unwrap(), full);
    assert_eq!(llama.multiway_copies(), 1);
}

#[test]
fn configs_the_probe_cannot_run_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    write_random_model(&d, &model(tiny(), Dtype::F32, 0)).unwrap();
    let config_path = d.join("config.json");
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |patch: Value| {
        let mut c = original.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(&config_path, c.to_string()).unwrap();
        open_model(&d).err().expect("refused")
    };
    let e = with(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("`yarn` is not supported"), "{e}");
    assert_eq!(e.file(), Some(config_path.as_path()));
    let e = with(json!({"rope_scaling": {"type": "llama3", "factor": 8.0}}));
    assert!(e.message().contains("low_freq_factor"), "{e}");
    let e = with(json!({"hidden_act": "gelu"}));
    assert_eq!(e.tensor(), Some("hidden_act"), "{e}");
    // Biases are supported now; a config announcing them names the first
    // one the checkpoint lacks.
    let e = with(json!({"attention_bias": true}));
    assert_eq!(
        e.tensor(),
        Some("model.layers.0.self_attn.q_proj.bias"),
        "{e}"
    );
    assert!(e.message().contains("missing"), "{e}");
    let e = with(json!({"num_key_value_heads": 3}));
    assert!(e.message().contains("do not divide"), "{e}");
    let e = with(json!({"hidden_size": null}));
    assert!(e.message().contains("no `hidden_size`"), "{e}");
    let e = with(json!({"intermediate_size": 50}));
    assert_eq!(e.kind(), ErrorKind::Format);
    assert_eq!(
        e.tensor(),
        Some("model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );
    assert!(e.message().contains("[48, 32]"), "{e}");
    let e = with(json!({"tie_word_embeddings": false, "num_hidden_layers": 3}));
    assert!(e.message().contains("missing"), "{e}");
    assert_eq!(
        e.tensor(),
        Some("model.layers.2.input_layernorm.weight"),
        "{e}"
    );

    // transformers 5's `rope_parameters` replaces rope_theta / rope_scaling.
    let mut c = original.clone();
    c["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0});
    std::fs::write(&config_path, c.to_string()).unwrap();
    let llama = Llama::load(&d).unwrap();
    assert_eq!(
        llama.config().rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    assert_eq!(llama.config().rope_theta, 500.0);

    // Round trip of the config writer.
    let mut c = tiny();
    c.rope_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    assert_eq!(
        LlamaConfig::from_json(&c.to_json(), Path::new("config.json"), None).unwrap(),
        c
    );
}

#[test]
fn examples_that_do_not_fit_are_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    write_random_model(&d, &model(tiny(), Dtype::F32, 2)).unwrap();
    let llama = open_model(&d).unwrap();
    let r = Recorder::new(RecorderOptions::default());
    let mut set = examples(64, false);
    set[3].input = ProbeInput::Tokens(vec![1, 64]);
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("example 3: token 1 is id 64"), "{e}");
    set[3] = ProbeExample::features(vec![1.0]);
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(
        e.message().contains("example 3 has `input` features"),
        "{e}"
    );
    set[3] = examples(64, false)[3].clone();
    set[3].modality = 2;
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("modality 2 (audio)"), "{e}");
    set[3].meta = Some(json!({"token_modality": [0, 1]}));
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("2 entries for 9 tokens"), "{e}");
    set[3].meta = None;
    set[3].token_modality = Some(vec![0, 1, 0]);
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("3 entries for 9 tokens"), "{e}");
    set[3].token_modality = Some(vec![0, 0, 0, 0, 2, 0, 0, 0, 0]);
    set[3].modality = 0;
    let e = run_probe(llama.as_ref(), &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("modality 2 (audio)"), "{e}");
    assert!(r.stats().unwrap().layers.is_empty(), "nothing ran");
}

#[test]
fn a_checkpoint_without_lm_head_is_probed_but_has_no_logits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    let mut c = tiny();
    c.tie_word_embeddings = true;
    write_random_model(&d, &model(c, Dtype::F32, 0)).unwrap();
    let tied = Llama::load(&d).unwrap();
    assert!(tied.logits(&[1, 2], &[0, 0]).is_ok());
    let config_path = d.join("config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        text.replace(
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
        ),
    )
    .unwrap();
    let untied = Llama::load(&d).unwrap();
    let e = untied.logits(&[1, 2], &[0, 0]).unwrap_err();
    assert!(e.message().contains("no lm_head.weight"), "{e}");
    let r = Recorder::new(RecorderOptions::default());
    run_probe(&untied, &examples(64, false), &r, Some(1)).unwrap();
    assert_eq!(r.stats().unwrap().layers.len(), 14);
}

/// Runs the NumPy reference in `--gram` mode over the examples of `sources`.
fn reference_grams(dir: &Path, probe: &Path, sources: &str) -> Value {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg(dir)
        .arg(probe)
        .args(["--gram", sources])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

#[test]
fn probe_grams_match_the_numpy_reference() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The multiway model: q/k/v and gate/up share Grams, and each copy's
    // Gram holds only the tokens routed to it.
    let model_dir = dir.path().join("multiway");
    write_random_model(&model_dir, &model(tiny(), Dtype::F16, 2)).unwrap();
    let probe = dir.path().join("probe.jsonl");
    write_probe_set(&probe, &examples(64, false)).unwrap();
    let stats_path = dir.path().join("task1.stats.safetensors");
    let options = ProbeOptions {
        gram: true,
        sources: Some(vec!["task1".into()]),
        threads: Some(2),
        ..ProbeOptions::default()
    };
    probe_files(&model_dir, &probe, &stats_path, &options).unwrap();
    let stats = ActivationStats::load(&stats_path).unwrap();
    assert_eq!(stats.sources.as_deref(), Some(&["task1".to_string()][..]));
    assert!(
        !stats.gram_shared.is_empty(),
        "shared Grams are stored once"
    );

    let want = reference_grams(&model_dir, &probe, "task1");
    let grams = want["grams"].as_object().unwrap();
    let layers_with_grams: Vec<&String> = stats
        .layers
        .keys()
        .filter(|l| stats.gram(l).is_some())
        .collect();
    let mut hooked: Vec<&String> = grams.keys().collect();
    hooked.sort();
    assert_eq!(
        layers_with_grams, hooked,
        "every hooked layer, and only those, has a Gram"
    );
    let mut worst = 0f64;
    for (layer, gram) in grams {
        let got = stats.gram(layer).unwrap();
        worst = worst.max(compare(
            &format!("{layer} x_gram"),
            &got.values(),
            &flat(gram),
        ));
        assert_eq!(
            stats.layer(layer).unwrap().count,
            want["counts"][layer].as_u64(),
            "{layer}: tokens counted"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "llama reference Grams: largest error / tolerance (rtol {RTOL:e}): {worst}"
    );
}
