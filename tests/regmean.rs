//! `merge_method: regmean` (SPEC §7) end to end: the engine's merged layer
//! against an independent f64 solve of the normal equations written out in
//! this file, the bias folded in, `alpha < 1`, a layer without Grams
//! averaged, the ridge rule in the report, thread independence, and the
//! errors for Grams missing in some models.

use flatmerge::stats::{ActivationStats, LayerStats};
use flatmerge_suite::{f32_tensors, report, tempdir, try_merge_yaml, write_f32_model};
use std::path::Path;

const OUT: usize = 3;
const IN: usize = 4;

/// A reproducible pseudo-random stream (no RNG crate in tests).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `(Gram, mean)` of `tokens` rows of width IN drawn from `seed`, in f64 then f32.
fn moments(seed: u64, tokens: usize) -> (Vec<f32>, Vec<f32>) {
    let x = values(seed, tokens * IN);
    let mut gram = [0f64; IN * IN];
    let mut mean = [0f64; IN];
    for row in x.chunks(IN) {
        for i in 0..IN {
            mean[i] += row[i] as f64 / tokens as f64;
            for j in 0..IN {
                gram[i * IN + j] += row[i] as f64 * row[j] as f64 / tokens as f64;
            }
        }
    }
    (
        gram.iter().map(|&g| g as f32).collect(),
        mean.iter().map(|&m| m as f32).collect(),
    )
}

struct Model {
    weight: Vec<f32>,
    bias: Vec<f32>,
    norm: Vec<f32>,
    gram: Vec<f32>,
    mean: Vec<f32>,
}

/// Writes model `name` (an `up_proj` with bias, a `down_proj` without
/// statistics, a norm) and its statistics (Grams only for `up_proj`
/// unless `gram` is false).
fn write(dir: &Path, name: &str, seed: u64, tokens: usize, gram: bool) -> Model {
    let (g, mean) = moments(seed + 100, tokens);
    let m = Model {
        weight: values(seed, OUT * IN),
        bias: values(seed + 1, OUT),
        norm: values(seed + 2, IN),
        gram: g,
        mean,
    };
    write_f32_model(
        &dir.join(name),
        &[
            (
                "model.layers.0.mlp.up_proj.weight",
                vec![OUT, IN],
                m.weight.clone(),
            ),
            ("model.layers.0.mlp.up_proj.bias", vec![OUT], m.bias.clone()),
            (
                "model.layers.0.mlp.down_proj.weight",
                vec![IN, OUT],
                values(seed + 3, IN * OUT),
            ),
            ("model.norm.weight", vec![IN], m.norm.clone()),
        ],
    );
    let mut stats = ActivationStats::new(name, "regmean test");
    stats.examples = 1;
    stats.layers.insert(
        "model.layers.0.mlp.up_proj".into(),
        LayerStats {
            x_mean: Some(m.mean.clone()),
            y_mean: Some(vec![0.0; OUT]),
            count: Some(tokens as u64),
            x_gram: gram.then(|| flatmerge::stats::Gram::new(m.gram.clone())),
            ..LayerStats::default()
        },
    );
    stats
        .save(&dir.join(format!("{name}.stats.safetensors")))
        .expect("save statistics");
    m
}

/// `[W* | b*]` by SPEC §7, solved here by Gauss–Jordan elimination in f64.
fn reference(models: &[(&Model, f64)], alpha: f64) -> Vec<f64> {
    let n = IN + 1;
    let mut lhs = vec![0f64; n * n];
    let mut rhs = vec![0f64; OUT * n];
    for (m, w) in models {
        let mut g = vec![0f64; n * n];
        for i in 0..IN {
            for j in 0..IN {
                g[i * n + j] = m.gram[i * IN + j] as f64;
            }
            g[i * n + IN] = m.mean[i] as f64;
            g[IN * n + i] = m.mean[i] as f64;
        }
        g[IN * n + IN] = 1.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    g[i * n + j] *= alpha;
                }
            }
        }
        for i in 0..n * n {
            lhs[i] += w * g[i];
        }
        for r in 0..OUT {
            let row: Vec<f64> = (0..n)
                .map(|c| {
                    if c < IN {
                        m.weight[r * IN + c] as f64
                    } else {
                        m.bias[r] as f64
                    }
                })
                .collect();
            for c in 0..n {
                rhs[r * n + c] += w * (0..n).map(|k| row[k] * g[k * n + c]).sum::<f64>();
            }
        }
    }
    // X · lhs = rhs  ⇔  lhsᵀ Xᵀ = rhsᵀ; lhs is symmetric.
    let mut a = lhs;
    let mut b: Vec<f64> = (0..n)
        .flat_map(|c| (0..OUT).map(move |r| (r, c)))
        .map(|(r, c)| rhs[r * n + c])
        .collect(); // b[c * OUT + r]
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap();
        for k in 0..n {
            a.swap(col * n + k, pivot * n + k);
        }
        for r in 0..OUT {
            b.swap(col * OUT + r, pivot * OUT + r);
        }
        let p = a[col * n + col];
        for row in 0..n {
            if row != col {
                let f = a[row * n + col] / p;
                for k in 0..n {
                    a[row * n + k] -= f * a[col * n + k];
                }
                for r in 0..OUT {
                    b[row * OUT + r] -= f * b[col * OUT + r];
                }
            }
        }
    }
    let mut x = vec![0f64; OUT * n];
    for c in 0..n {
        for r in 0..OUT {
            x[r * n + c] = b[c * OUT + r] / a[c * n + c];
        }
    }
    x
}

fn config(extra: &str) -> String {
    format!(
        "merge_method: regmean\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n    parameters: {{weight: 2.0}}\n  - model: ./B\n    stats: ./B.stats.safetensors\n{extra}dtype: float32\n"
    )
}

#[test]
fn the_engine_solves_spec_7_with_the_bias_folded_in() {
    let dir = tempdir();
    let a = write(dir.path(), "A", 1, 64, true);
    let b = write(dir.path(), "B", 2, 64, true);
    for (alpha, extra) in [(0.9, ""), (0.5, "parameters:\n  alpha: 0.5\n")] {
        let out = dir.path().join(format!("out-{alpha}"));
        let summary = try_merge_yaml(dir.path(), &config(extra), 0, Some(2), &out).expect("merge");
        assert_eq!(summary.report.method, "regmean");
        let merged = f32_tensors(&out);
        let want = reference(&[(&a, 2.0), (&b, 1.0)], alpha);
        let n = IN + 1;
        let w = &merged["model.layers.0.mlp.up_proj.weight"];
        let bias = &merged["model.layers.0.mlp.up_proj.bias"];
        for r in 0..OUT {
            for c in 0..IN {
                let x = want[r * n + c];
                assert!(
                    (w[r * IN + c] as f64 - x).abs() <= 1e-5 * (1.0 + x.abs()),
                    "W[{r},{c}] α={alpha}: {} vs {x}",
                    w[r * IN + c]
                );
            }
            let x = want[r * n + IN];
            assert!(
                (bias[r] as f64 - x).abs() <= 1e-5 * (1.0 + x.abs()),
                "b[{r}] α={alpha}"
            );
        }
        // No statistics: the weighted average (weights 2 and 1).
        for (i, v) in merged["model.norm.weight"].iter().enumerate() {
            let want = (2.0 * a.norm[i] + b.norm[i]) / 3.0;
            assert!((v - want).abs() <= 1e-6, "norm[{i}]");
        }
        let json = report(&out);
        let rules: Vec<(String, String)> = json["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["rule"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let pos = |name: &str| rules.iter().position(|(n, _)| n == name).unwrap();
        assert!(
            pos("model.layers.0.mlp.up_proj.weight") + 1 == pos("model.layers.0.mlp.up_proj.bias")
        );
        assert_eq!(
            rules[pos("model.layers.0.mlp.up_proj.bias")].1,
            "least_squares"
        );
        assert_eq!(
            rules[pos("model.layers.0.mlp.down_proj.weight")].1,
            "average"
        );
    }
}

#[test]
fn one_model_gives_back_its_own_layer_and_threads_do_not_matter() {
    let dir = tempdir();
    let a = write(dir.path(), "A", 3, 64, true);
    write(dir.path(), "B", 4, 64, true);
    let yaml = "merge_method: regmean\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n  - model: ./B\n    stats: ./B.stats.safetensors\n    parameters: {weight: 0}\ndtype: float32\n";
    let one = dir.path().join("one");
    try_merge_yaml(dir.path(), yaml, 0, Some(1), &one).expect("merge");
    let merged = f32_tensors(&one);
    for (v, w) in merged["model.layers.0.mlp.up_proj.weight"]
        .iter()
        .zip(&a.weight)
    {
        assert!((v - w).abs() <= 1e-5, "{v} vs {w}");
    }
    let two = dir.path().join("two");
    let yaml = config("");
    try_merge_yaml(dir.path(), &yaml, 0, Some(1), &dir.path().join("t1")).expect("merge");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &two).expect("merge");
    assert_eq!(
        std::fs::read(dir.path().join("t1/model.safetensors")).unwrap(),
        std::fs::read(two.join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_singular_system_gets_the_smallest_ridge_and_the_report_says_so() {
    let dir = tempdir();
    // One token each: rank-one Grams, and α = 1 keeps them singular.
    write(dir.path(), "A", 5, 1, true);
    write(dir.path(), "B", 6, 1, true);
    let out = dir.path().join("out");
    try_merge_yaml(
        dir.path(),
        &config("parameters:\n  alpha: 1.0\n"),
        0,
        None,
        &out,
    )
    .expect("merge");
    let json = report(&out);
    let up = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    let ridge = up["ridge"].as_f64().expect("a ridge was needed");
    assert!([1e-8, 1e-6, 1e-4, 1e-2].contains(&ridge), "{ridge}");
    assert!(f32_tensors(&out).values().flatten().all(|v| v.is_finite()));
}

#[test]
fn grams_in_some_models_but_not_others_are_refused_naming_file_and_tensor() {
    let dir = tempdir();
    write(dir.path(), "A", 7, 16, true);
    write(dir.path(), "B", 8, 16, false);
    let out = dir.path().join("out");
    let e = try_merge_yaml(dir.path(), &config(""), 0, None, &out).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("B.stats.safetensors"), "{text}");
    assert!(text.contains("model.layers.0.mlp.up_proj.x_gram"), "{text}");
    assert!(text.contains("no Gram"), "{text}");
    assert!(!out.exists());
    // Statistics are required for every model.
    let yaml = "merge_method: regmean\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n  - model: ./B\n";
    let e = try_merge_yaml(dir.path(), yaml, 0, None, &out).unwrap_err();
    assert!(
        e.to_string()
            .contains("regmean needs activation statistics"),
        "{e}"
    );
}
