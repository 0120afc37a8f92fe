//! The configs under `tests/mergekit_configs/` are written exactly as
//! mergekit documents them (its README and merge-method docs), with local
//! relative paths. Each runs unchanged through what `flatmerge merge
//! CONFIG OUT` does — `MergeConfig::from_file`, `PreparedMerge`, `run` — on
//! a generated LLaMA-shaped family (`C` the base, `A`, `B`, `B2` its
//! fine-tunes); the output must load with the config's dtype and every
//! tensor of the base, and the report must name the method. Where a value
//! is easy to derive (linear, task arithmetic, slerp at t = 0 and t = 1),
//! it is checked bit for bit.

use flatmerge::config::MergeConfig;
use flatmerge::demo::{write_family, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::engine::{MergeSummary, PreparedMerge};
use flatmerge_suite::{options, read_tensors, report, tempdir, tensor_map, tensor_of, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SHAPE: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 4,
};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mergekit_configs")
}

/// A fresh family (BF16, like most published checkpoints) with `file`
/// copied beside it, merged as the CLI would; returns the folder, the
/// output directory and the summary.
fn run_example(file: &str) -> (tempfile::TempDir, PathBuf, MergeSummary) {
    let dir = tempdir();
    write_family(dir.path(), &SHAPE, Dtype::BF16, 2, 3)
        .unwrap_or_else(|e| panic!("cannot write the family: {e}"));
    let config_path = dir.path().join(file);
    std::fs::copy(configs_dir().join(file), &config_path).expect("copy the config");
    let config = MergeConfig::from_file(&config_path)
        .unwrap_or_else(|e| panic!("{file} does not load: {e}"));
    let prepared =
        PreparedMerge::new(config).unwrap_or_else(|e| panic!("{file} does not plan: {e}"));
    let out = dir.path().join("merged");
    let summary = prepared
        .run(&options(&out, Some(2), None))
        .unwrap_or_else(|e| panic!("{file} does not merge: {e}"));
    (dir, out, summary)
}

/// `merge_method:` and `dtype:` as written in the file.
fn declared(file: &str) -> (String, Dtype) {
    let text = std::fs::read_to_string(configs_dir().join(file)).expect("read the config");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{file} has no `{key}`"))
    };
    let dtype = Dtype::parse_float(&value("dtype:")).expect("a float dtype");
    (value("merge_method:"), dtype)
}

/// The checks every example passes; returns the output tensors.
fn check_example(file: &str) -> (tempfile::TempDir, BTreeMap<String, Tensor>, MergeSummary) {
    let (method, dtype) = declared(file);
    let (dir, out, summary) = run_example(file);
    let base = read_tensors(&dir.path().join("C"));
    let merged = tensor_map(&out);
    assert_eq!(
        merged.len(),
        base.len(),
        "{file}: every tensor of the base is written"
    );
    for (name, b) in &base {
        let m = merged
            .get(name)
            .unwrap_or_else(|| panic!("{file}: {name} missing"));
        assert_eq!(m.dtype, dtype, "{file}: {name} has the config's dtype");
        assert_eq!(m.shape, b.shape, "{file}: {name} keeps its shape");
        assert!(
            m.values().iter().all(|x| x.is_finite()),
            "{file}: {name} has non-finite values"
        );
    }
    assert_eq!(summary.report.method, method, "{file}: report method");
    let json = report(&out);
    assert_eq!(
        json["method"],
        method.as_str(),
        "{file}: merge_report.json method"
    );
    assert_eq!(json["tensors"].as_array().map(Vec::len), Some(base.len()));
    let config_json = std::fs::read_to_string(out.join("config.json")).expect("config.json copied");
    let torch_dtype = match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    };
    assert!(
        config_json.contains(&format!("\"torch_dtype\": \"{torch_dtype}\"")),
        "{file}: config.json gets the output dtype: {config_json}"
    );
    (dir, merged, summary)
}

fn values(dir: &Path, model: &str) -> BTreeMap<String, Vec<f32>> {
    read_tensors(&dir.join(model))
        .into_iter()
        .map(|(n, t)| (n, t.values()))
        .collect()
}

fn sparsity(summary: &MergeSummary, name: &str, k: usize) -> (u64, Option<f32>) {
    let t = summary
        .report
        .tensors
        .iter()
        .find(|t| t.plan.name == name)
        .unwrap_or_else(|| panic!("{name} not in the report"));
    let s = t
        .sparsity
        .iter()
        .find(|s| s.contributor == k)
        .unwrap_or_else(|| panic!("no sparsity for contributor {k} on {name}"));
    (s.kept, s.rescale)
}

#[test]
fn every_example_config_is_exercised() {
    let mut files: Vec<String> = std::fs::read_dir(configs_dir())
        .expect("list the configs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "arcee_fusion.yaml",
            "breadcrumbs_ties.yaml",
            "dare_ties.yaml",
            "della.yaml",
            "linear.yaml",
            "model_stock.yaml",
            "nuslerp.yaml",
            "passthrough_slices.yaml",
            "slerp.yaml",
            "slerp_modules.yaml",
            "slerp_slices.yaml",
            "task_arithmetic.yaml",
            "ties.yaml",
        ],
        "a new example needs its test below"
    );
}

#[test]
fn linear_example_is_the_normalised_weighted_average() {
    let (dir, merged, _) = check_example("linear.yaml");
    let models: Vec<BTreeMap<String, Vec<f32>>> = ["A", "B", "B2"]
        .iter()
        .map(|m| values(dir.path(), m))
        .collect();
    let weights = [1.0f32, 0.3, 0.5];
    let total: f32 = weights.iter().sum();
    for (name, out) in &merged {
        let want: Vec<f32> = (0..out.numel())
            .map(|i| {
                let mut acc = 0.0f32;
                for (m, w) in models.iter().zip(weights) {
                    acc += w * m[name][i];
                }
                acc / total
            })
            .collect();
        assert_eq!(
            out,
            &tensor_of(Dtype::F16, out.shape.clone(), &want),
            "{name}"
        );
    }
}

#[test]
fn task_arithmetic_example_adds_lambda_times_the_weighted_task_vectors() {
    let (dir, merged, _) = check_example("task_arithmetic.yaml");
    let (c, a, b) = (
        values(dir.path(), "C"),
        values(dir.path(), "A"),
        values(dir.path(), "B"),
    );
    for (name, out) in &merged {
        let want: Vec<f32> = (0..out.numel())
            .map(|i| {
                let base = c[name][i];
                let sum: f32 = [0.7f32 * (a[name][i] - base), 0.3f32 * (b[name][i] - base)]
                    .iter()
                    .sum();
                base + 0.9f32 * sum
            })
            .collect();
        assert_eq!(
            out,
            &tensor_of(Dtype::BF16, out.shape.clone(), &want),
            "{name}"
        );
    }
}

#[test]
fn slerp_example_follows_its_filtered_gradients() {
    let (dir, merged, _) = check_example("slerp.yaml");
    let (a, b) = (values(dir.path(), "A"), values(dir.path(), "B"));
    let f16 = |values: &[f32], like: &Tensor| tensor_of(Dtype::F16, like.shape.clone(), values);
    // Self-attention: t = 0 at layer 0 (the base A), 1 at the last layer (B);
    // the MLPs the other way round.
    for (name, from) in [
        ("model.layers.0.self_attn.q_proj.weight", &a),
        ("model.layers.3.self_attn.v_proj.weight", &b),
        ("model.layers.0.mlp.up_proj.weight", &b),
        ("model.layers.3.mlp.down_proj.weight", &a),
    ] {
        let out = &merged[name];
        assert_eq!(out, &f16(&from[name], out), "{name}");
    }
    // Layer 1 (t = 1/3 on [0, 0.5, 0.3, 0.7, 1]: ⅔·0.5 + ⅓·0.3) and the
    // fallback t = 0.5 of the embeddings and lm_head: neither input.
    for name in [
        "model.layers.1.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ] {
        let out = &merged[name];
        assert_ne!(out, &f16(&a[name], out), "{name} is not A");
        assert_ne!(out, &f16(&b[name], out), "{name} is not B");
    }
}

#[test]
fn slerp_example_in_its_slices_form_equals_the_models_form() {
    let (_dir, models_form, _) = check_example("slerp.yaml");
    let (_dir, slices_form, _) = check_example("slerp_slices.yaml");
    assert!(models_form == slices_form, "same tensors, same bytes");
}

#[test]
fn slerp_example_in_its_modules_form_equals_the_models_form() {
    let (_dir, models_form, _) = check_example("slerp.yaml");
    let (_dir, modules_form, _) = check_example("slerp_modules.yaml");
    assert!(models_form == modules_form, "same tensors, same bytes");
}

#[test]
fn passthrough_slices_example_stacks_the_layers() {
    let (dir, out, _) = run_example("passthrough_slices.yaml");
    let merged = tensor_map(&out);
    let (a, b) = (values(dir.path(), "A"), values(dir.path(), "B"));
    let f16 = |values: &[f32], like: &Tensor| tensor_of(Dtype::F16, like.shape.clone(), values);
    for (name, out) in &merged {
        let (from, source) = match flatmerge::layers::split_layer(name) {
            Some((prefix, l, rest)) if l < 3 => (&a, format!("{prefix}layers.{l}.{rest}")),
            Some((prefix, l, rest)) => (&b, format!("{prefix}layers.{}.{rest}", l - 2)),
            None if name.contains("embed") => (&a, name.clone()),
            None => (&b, name.clone()),
        };
        assert_eq!(out, &f16(&from[&source], out), "{name} is {source}");
    }
    let layers = merged
        .keys()
        .filter_map(|n| flatmerge::layers::layer_index(n))
        .max();
    assert_eq!(layers, Some(5), "six layers");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config.json"))
            .expect("JSON");
    assert_eq!(config["num_hidden_layers"], 6);
}

#[test]
fn ties_example_trims_half_of_each_task_vector() {
    let (_dir, _merged, summary) = check_example("ties.yaml");
    // Matrices only: a norm's BF16 task vector is mostly exact zeros.
    for t in summary
        .report
        .tensors
        .iter()
        .filter(|t| t.plan.shape.len() == 2)
    {
        let n = t.plan.numel() as u64;
        for k in 0..2 {
            let (kept, rescale) = sparsity(&summary, &t.plan.name, k);
            assert!(kept <= n / 2, "{}: kept {kept} of {n}", t.plan.name);
            assert!(
                kept * 10 >= n * 4,
                "{}: kept only {kept} of {n}",
                t.plan.name
            );
            assert_eq!(rescale, None);
        }
    }
}

#[test]
fn dare_ties_example_follows_its_density_gradient() {
    let (dir, _merged, summary) = check_example("dare_ties.yaml");
    let (c, a) = (values(dir.path(), "C"), values(dir.path(), "A"));
    // A's density [1, 0.7, 0.1]: 1 at t = 0 (layer 0 and the embeddings):
    // nothing dropped, no rescale.
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.gate_proj.weight",
    ] {
        let nonzero = a[name].iter().zip(&c[name]).filter(|(x, y)| x != y).count() as u64;
        assert_eq!(sparsity(&summary, name, 0), (nonzero, None), "{name}");
    }
    // 0.1 at the last layer: about a tenth kept, rescaled up.
    let name = "model.layers.3.mlp.gate_proj.weight";
    let n = (SHAPE.intermediate * SHAPE.hidden) as f64;
    let (kept, rescale) = sparsity(&summary, name, 0);
    assert!(
        (kept as f64 - 0.1 * n).abs() < 5.0 * (n * 0.09).sqrt(),
        "{name}: kept {kept} of {n}"
    );
    assert!(
        rescale.is_some_and(|r| r > 5.0),
        "{name}: rescale {rescale:?}"
    );
    // B's density 0.5 everywhere (its weight gradient does not drop anything).
    let (kept, _) = sparsity(&summary, name, 1);
    assert!(
        (kept as f64 - 0.5 * n).abs() < 5.0 * (n * 0.25).sqrt(),
        "B kept {kept} of {n}"
    );
}

#[test]
fn della_example_merges() {
    let (_dir, _merged, summary) = check_example("della.yaml");
    let name = "model.layers.2.mlp.down_proj.weight";
    let (_, rescale) = sparsity(&summary, name, 0);
    assert!(
        rescale.is_some_and(|r| r > 1.0),
        "{name}: rescale {rescale:?}"
    );
}

#[test]
fn breadcrumbs_ties_example_merges() {
    let (_dir, _merged, summary) = check_example("breadcrumbs_ties.yaml");
    let t = &summary.report.tensors[0];
    let n = t.plan.numel() as u64;
    // density 0.9: a window of ⌊0.9·n⌋ ranks (fewer non-zeros if τ has zeros).
    let (kept, _) = sparsity(&summary, &t.plan.name, 0);
    assert!(
        kept <= n * 9 / 10 && kept * 10 >= n * 8,
        "kept {kept} of {n}"
    );
}

#[test]
fn model_stock_example_follows_the_angle_formula() {
    let (dir, merged, _) = check_example("model_stock.yaml");
    let c = values(dir.path(), "C");
    let models: Vec<_> = ["A", "B", "B2"]
        .iter()
        .map(|m| values(dir.path(), m))
        .collect();
    for name in ["model.layers.1.self_attn.o_proj.weight", "lm_head.weight"] {
        // Whole tensor (filter_wise false): cos = mean pairwise cosine of the
        // offsets, t = 3·cos / (1 + 2·cos), W = t·mean + (1 − t)·base.
        let base: Vec<f64> = c[name].iter().map(|&x| x as f64).collect();
        let offsets: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                m[name]
                    .iter()
                    .zip(&base)
                    .map(|(&x, b)| x as f64 - b)
                    .collect()
            })
            .collect();
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        let mut cos = 0.0;
        for (i, j) in [(0, 1), (0, 2), (1, 2)] {
            cos += dot(&offsets[i], &offsets[j])
                / (dot(&offsets[i], &offsets[i]).sqrt() * dot(&offsets[j], &offsets[j]).sqrt());
        }
        cos /= 3.0;
        let t = 3.0 * cos / (1.0 + 2.0 * cos);
        let out = merged[name].values();
        for (i, o) in out.iter().enumerate() {
            let mean = models.iter().map(|m| m[name][i] as f64).sum::<f64>() / 3.0;
            let want = t * mean + (1.0 - t) * base[i];
            assert!(
                (*o as f64 - want).abs() <= 8e-3 * want.abs() + 1e-6,
                "{name}[{i}]: {o}, want {want} (t {t})"
            );
        }
    }
}

/// `f32` values as the BF16 output stores them.
fn as_bf16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&x| flatmerge::dtype::bf16_to_f32(flatmerge::dtype::f32_to_bf16(x)))
        .collect()
}

#[test]
fn arcee_fusion_example_keeps_the_important_changes() {
    let (dir, merged, summary) = check_example("arcee_fusion.yaml");
    let (a, b) = (values(dir.path(), "A"), values(dir.path(), "B"));
    for name in ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"] {
        let cols = *summary
            .report
            .tensors
            .iter()
            .find(|t| t.plan.name == name)
            .expect("in the report")
            .plan
            .shape
            .last()
            .unwrap();
        let mut want = vec![0f32; a[name].len()];
        let (kept, _) = flatmerge::consensus::arcee_fusion(&a[name], &b[name], cols, &mut want);
        assert_eq!(merged[name].values(), as_bf16(&want), "{name}");
        assert!(kept > 0 && kept < want.len(), "{name}: {kept} kept");
        assert_eq!(sparsity(&summary, name, 0).0, kept as u64);
    }
}

#[test]
fn nuslerp_example_slerps_each_row_of_the_task_vectors() {
    let (dir, merged, _) = check_example("nuslerp.yaml");
    let (c, a, b) = (
        values(dir.path(), "C"),
        values(dir.path(), "A"),
        values(dir.path(), "B"),
    );
    let name = "model.layers.1.self_attn.q_proj.weight";
    let rows = 32;
    let tau = |m: &BTreeMap<String, Vec<f32>>| -> Vec<f32> {
        m[name].iter().zip(&c[name]).map(|(x, y)| x - y).collect()
    };
    let mut want = vec![0f32; c[name].len()];
    flatmerge::sphere::nuslerp(
        0.6 / (0.4 + 0.6),
        &tau(&a),
        &tau(&b),
        flatmerge::sphere::Lanes::last_axis(&[rows, c[name].len() / rows]),
        &mut want,
    );
    want.iter_mut().zip(&c[name]).for_each(|(w, x)| *w += x);
    assert_eq!(merged[name].values(), as_bf16(&want));
}
