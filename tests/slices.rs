//! `slices:` (mergekit's frankenmerges and depth upscaling) end to end on
//! generated LLaMA-shaped checkpoints: layers renumbered across slices,
//! embeddings from the first slice and the final norm and head from the
//! last, `config.json`'s layer count and per-layer lists rebuilt, gradients
//! interpolated within each slice, parameter precedence (source → slice →
//! global), SAFE-M with statistics per source layer, and bad ranges
//! refused naming the key with nothing written.

use flatmerge::config::MergeConfig;
use flatmerge::demo::LlamaShape;
use flatmerge::dtype::Dtype;
use flatmerge_suite::{
    assert_refused, f32_tensors, family, merge, report, tempdir, write_f32_model,
};
use std::collections::BTreeMap;
use std::path::Path;

const HIDDEN: usize = 4;
const VOCAB: usize = 6;

/// The per-layer tensors of the test models.
const LAYER_TENSORS: [(&str, [usize; 2]); 3] = [
    ("self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
    ("mlp.up_proj.weight", [2 * HIDDEN, HIDDEN]),
    ("input_layernorm.weight", [HIDDEN, 0]),
];

/// A value that tells model, layer, tensor and element apart.
fn value(model: usize, layer: usize, tensor: usize, i: usize) -> f32 {
    (model * 1000 + layer * 100 + tensor * 10) as f32 + i as f32 / 64.0
}

fn shape_of(dims: [usize; 2]) -> Vec<usize> {
    dims.into_iter().filter(|&d| d > 0).collect()
}

/// Model `m` with `layers` decoder layers, and a `config.json` that has a
/// per-layer list (`layer_types`, as Qwen2 and Gemma configs do).
fn write_llama(dir: &Path, name: &str, m: usize, layers: usize) {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let whole = |t: usize, n: usize| (0..n).map(|i| value(m, 99, t, i)).collect::<Vec<f32>>();
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        whole(1, VOCAB * HIDDEN),
    ));
    for l in 0..layers {
        for (t, (suffix, dims)) in LAYER_TENSORS.iter().enumerate() {
            let shape = shape_of(*dims);
            let n = shape.iter().product();
            tensors.push((
                format!("model.layers.{l}.{suffix}"),
                shape,
                (0..n).map(|i| value(m, l, t, i)).collect(),
            ));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![HIDDEN], whole(2, HIDDEN)));
    tensors.push((
        "lm_head.weight".into(),
        vec![VOCAB, HIDDEN],
        whole(3, VOCAB * HIDDEN),
    ));
    let borrowed: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    let model_dir = dir.join(name);
    write_f32_model(&model_dir, &borrowed);
    let types: Vec<String> = (0..layers).map(|l| format!("\"{name}{l}\"")).collect();
    std::fs::write(
        model_dir.join("config.json"),
        format!(
            "{{\"architectures\": [\"LlamaForCausalLM\"], \"num_hidden_layers\": {layers}, \"layer_types\": [{}], \"hidden_size\": {HIDDEN}}}",
            types.join(", ")
        ),
    )
    .unwrap();
}

fn run(dir: &Path, yaml: &str) -> BTreeMap<String, Vec<f32>> {
    let path = dir.join("merge.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = MergeConfig::from_file(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let out = dir.join("merged");
    let _ = std::fs::remove_dir_all(&out);
    merge(config, &out, Some(2), None);
    f32_tensors(&out)
}

fn layer_tensor(l: usize, t: usize) -> String {
    format!("model.layers.{l}.{}", LAYER_TENSORS[t].0)
}

fn expect_layer(out: &BTreeMap<String, Vec<f32>>, out_layer: usize, model: usize, layer: usize) {
    for t in 0..LAYER_TENSORS.len() {
        let got = &out[&layer_tensor(out_layer, t)];
        let want: Vec<f32> = (0..got.len()).map(|i| value(model, layer, t, i)).collect();
        assert_eq!(
            got, &want,
            "output layer {out_layer} is model {model}'s layer {layer}"
        );
    }
}

#[test]
fn a_two_source_frankenmerge_renumbers_layers_and_rebuilds_the_config() {
    let dir = tempdir();
    write_llama(dir.path(), "A", 1, 4);
    write_llama(dir.path(), "B", 2, 4);
    // mergekit's README example, with local models.
    let out = run(
        dir.path(),
        "slices:\n  - sources:\n      - model: ./A\n        layer_range: [0, 2]\n  - sources:\n      - model: ./B\n        layer_range: [1, 4]\nmerge_method: passthrough\ndtype: float32\n",
    );
    assert_eq!(out.len(), 3 + 5 * LAYER_TENSORS.len());
    expect_layer(&out, 0, 1, 0);
    expect_layer(&out, 1, 1, 1);
    expect_layer(&out, 2, 2, 1);
    expect_layer(&out, 3, 2, 2);
    expect_layer(&out, 4, 2, 3);
    let whole =
        |m: usize, t: usize, n: usize| (0..n).map(|i| value(m, 99, t, i)).collect::<Vec<f32>>();
    assert_eq!(
        out["model.embed_tokens.weight"],
        whole(1, 1, VOCAB * HIDDEN),
        "embeddings from the first slice"
    );
    assert_eq!(
        out["model.norm.weight"],
        whole(2, 2, HIDDEN),
        "final norm from the last slice"
    );
    assert_eq!(
        out["lm_head.weight"],
        whole(2, 3, VOCAB * HIDDEN),
        "head from the last slice"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["num_hidden_layers"], 5);
    assert_eq!(
        config["layer_types"],
        serde_json::json!(["A0", "A1", "B1", "B2", "B3"]),
        "per-layer lists follow the slices"
    );
    let r = report(&dir.path().join("merged"));
    let inputs = r["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 2);
    assert_eq!(inputs[0]["slice"], 0);
    assert_eq!(inputs[0]["layer_range"], serde_json::json!([0, 2]));
    assert_eq!(inputs[1]["slice"], 1);
    assert_eq!(inputs[1]["layer_range"], serde_json::json!([1, 4]));
    assert_eq!(r["tensors"].as_array().unwrap().len(), out.len());
}

#[test]
fn solar_style_depth_upscaling_repeats_the_middle_layers() {
    let dir = tempdir();
    write_llama(dir.path(), "A", 1, 4);
    let out = run(
        dir.path(),
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./A\n        layer_range: [0, 3]\n  - sources:\n      - model: ./A\n        layer_range: [1, 4]\n",
    );
    for (out_layer, layer) in [0, 1, 2, 1, 2, 3].into_iter().enumerate() {
        expect_layer(&out, out_layer, 1, layer);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["num_hidden_layers"], 6);
}

#[test]
fn gradients_are_interpolated_within_each_slice_and_parameters_take_precedence() {
    let dir = tempdir();
    write_llama(dir.path(), "A", 1, 6);
    write_llama(dir.path(), "B", 2, 6);
    // Slice 0: A's weight is the gradient [1, 0] over the slice's three
    // layers (t = 0, 0.5, 1), B's the global 1. Slice 1: the slice sets B's
    // weight 3 over the global 1, and its source sets A's weight 2 over the
    // slice's 5.
    let out = run(
        dir.path(),
        "merge_method: linear\nparameters:\n  weight: 1.0\nslices:\n  - sources:\n      - model: ./A\n        layer_range: [0, 3]\n        parameters:\n          weight: [1.0, 0.0]\n      - model: ./B\n        layer_range: [3, 6]\n  - sources:\n      - model: ./A\n        layer_range: [3, 5]\n        parameters:\n          weight: 2.0\n      - model: ./B\n        layer_range: [0, 2]\n    parameters:\n      weight: 3.0\ndtype: float32\n",
    );
    let check = |out_layer: usize, (la, wa): (usize, f32), (lb, wb): (usize, f32)| {
        for t in 0..LAYER_TENSORS.len() {
            let got = &out[&layer_tensor(out_layer, t)];
            for (i, g) in got.iter().enumerate() {
                let want = (wa * value(1, la, t, i) + wb * value(2, lb, t, i)) / (wa + wb);
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "layer {out_layer} tensor {t} [{i}]: {g} vs {want}"
                );
            }
        }
    };
    check(0, (0, 1.0), (3, 1.0));
    check(1, (1, 0.5), (4, 1.0));
    check(2, (2, 0.0), (5, 1.0));
    check(3, (3, 2.0), (0, 3.0));
    check(4, (4, 2.0), (1, 3.0));
}

#[test]
fn safe_m_in_slices_matches_the_whole_model_merge() {
    let shape = LlamaShape {
        vocab: 32,
        hidden: 16,
        intermediate: 40,
        layers: 4,
    };
    let dir = tempdir();
    let fam = family(dir.path(), &shape, Dtype::F32, 2, 7);
    let whole = dir.path().join("whole");
    merge(
        MergeConfig::from_file(&fam.config).unwrap(),
        &whole,
        Some(2),
        None,
    );
    // The same merge as two slices [0, 1) and [1, 4): SAFE-M is per tensor,
    // so the bytes must be the same, which needs each source's statistics
    // renamed to the output's layers.
    let source = |m: &str, a: usize, b: usize| {
        format!("      - model: ./{m}\n        layer_range: [{a}, {b}]\n        stats: ./{m}.stats.safetensors\n")
    };
    let yaml = format!(
        "merge_method: safe_m\nbase_model: ./C\nbase_model_stats: ./C.stats.safetensors\nparameters:\n  density: 0.2\n  lambda_proj: 1.0\n  lambda_ortho: 0.5\nslices:\n  - sources:\n{}{}{}  - sources:\n{}{}{}",
        source("A", 0, 1),
        source("B", 0, 1),
        source("B2", 0, 1),
        source("A", 1, 4),
        source("B", 1, 4),
        source("B2", 1, 4),
    );
    let sliced_dir = dir.path().join("sliced");
    std::fs::create_dir_all(&sliced_dir).unwrap();
    let path = dir.path().join("sliced.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = MergeConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    merge(config, &sliced_dir.join("out"), Some(1), None);
    let a = f32_tensors(&whole);
    let b = f32_tensors(&sliced_dir.join("out"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, values) in &a {
        assert_eq!(
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b[name].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{name}"
        );
    }
    let r = report(&sliced_dir.join("out"));
    let safe_m = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["rule"] == "safe_m_weight")
        .count();
    assert!(safe_m > 0, "statistics were found for the renamed layers");
}

#[test]
fn bad_slices_are_one_clear_error_and_leave_nothing() {
    let dir = tempdir();
    write_llama(dir.path(), "A", 1, 4);
    write_llama(dir.path(), "B", 2, 4);
    let slice = |sources: &str| {
        format!(
            "merge_method: linear\nparameters:\n  weight: 1.0\nslices:\n  - sources:\n{sources}"
        )
    };
    let src =
        |m: &str, range: &str| format!("      - model: ./{m}\n        layer_range: {range}\n");
    for (yaml, needle) in [
        (slice(&src("A", "[2, 2]")), "slices[0].sources[0].layer_range"),
        (slice(&src("A", "[3, 1]")), "is empty or negative"),
        (slice(&src("A", "[0, 1, 2]")), "expected two layer indices"),
        (slice(&src("A", "[2, 6]")), "has 4 decoder layers"),
        (
            slice(&format!("{}{}", src("A", "[0, 2]"), src("B", "[0, 3]"))),
            "spans 3 layers, but slices[0].sources[0] spans 2",
        ),
        (
            format!("{}models:\n  - model: ./A\n", slice(&src("A", "[0, 2]"))),
            "either `models:` or `slices:`",
        ),
        (
            "merge_method: regmean_plusplus\nprobe_set: ./p.jsonl\nslices:\n  - sources:\n      - model: ./A\n        layer_range: [0, 2]\n".to_string(),
            "needs whole models",
        ),
        (
            slice(&format!("{}    residual_weight: 0.5\n", src("A", "[0, 2]"))),
            "residual_weight",
        ),
    ] {
        assert_refused(dir.path(), &yaml, needle);
    }
}
