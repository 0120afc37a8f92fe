//! SAFE-M with second moments (`reproject: gram`, docs/methods.md) end to
//! end on a one-layer family: the receiver and symmetric forms against the
//! formulas solved here in f64, the conflict mask feeding the solve, λ = 0
//! giving the receiver back, the bias on SPEC §1.3's rule, thread
//! independence, and the errors for missing Grams and misplaced keys.

use flatmerge::stats::{ActivationStats, Gram, LayerStats};
use flatmerge_suite::{
    f32_tensors, report, solve_right_symmetric, tempdir, try_merge_yaml, write_f32_model,
};
use std::path::Path;

const OUT: usize = 2;
const IN: usize = 3;
const LAYER: &str = "model.layers.0.mlp.up_proj";
const ALPHA: f64 = 0.9;

/// A model: its weight and bias, its meta-probe means and own-task Gram.
struct Model {
    weight: Vec<f32>,
    bias: Vec<f32>,
    gram: Vec<f32>,
}

/// Writes model `name` and its statistics: `name.stats.safetensors`
/// (means, as on the shared meta-probe) and, unless `gram` is `None`,
/// `name.grams.safetensors` (its own-task Gram).
fn write(dir: &Path, name: &str, weight: &[f32], bias: &[f32], y: &[f32], gram: Option<&[f32]>) {
    write_f32_model(
        &dir.join(name),
        &[
            (&format!("{LAYER}.weight"), vec![OUT, IN], weight.to_vec()),
            (&format!("{LAYER}.bias"), vec![OUT], bias.to_vec()),
            ("model.norm.weight", vec![IN], vec![1.0; IN]),
        ],
    );
    let layer = |g: Option<&[f32]>| LayerStats {
        x_mean: Some(vec![0.5, -1.0, 0.25]),
        y_mean: Some(y.to_vec()),
        count: Some(8),
        x_gram: g.map(|g| Gram::new(g.to_vec())),
        ..LayerStats::default()
    };
    let save = |file: String, g: Option<&[f32]>| {
        let mut stats = ActivationStats::new(name, "safe_m gram test");
        stats.examples = 1;
        stats.layers.insert(LAYER.into(), layer(g));
        stats.save(&dir.join(file)).expect("save statistics");
    };
    save(format!("{name}.stats.safetensors"), None);
    if let Some(g) = gram {
        save(format!("{name}.grams.safetensors"), Some(g));
    }
}

/// C, A and B with task vectors of mixed signs (two entries conflict) and
/// Grams that weigh different input directions.
fn family(dir: &Path) -> (Vec<f32>, Model, Model) {
    let c = vec![0.1, -0.2, 0.3, 0.4, 0.0, -0.5];
    let a = Model {
        weight: vec![0.5, -0.1, 0.2, 0.6, 0.3, -0.4],
        bias: vec![0.1, -0.1],
        gram: vec![2.0, 0.3, 0.1, 0.3, 0.5, 0.0, 0.1, 0.0, 0.2],
    };
    let b = Model {
        weight: vec![0.3, -0.6, 0.9, 0.2, 0.4, -0.1],
        bias: vec![-0.2, 0.3],
        gram: vec![0.3, 0.1, 0.0, 0.1, 1.5, 0.4, 0.0, 0.4, 1.0],
    };
    write(dir, "C", &c, &[0.0, 0.0], &[0.0, 0.0], None);
    write(dir, "A", &a.weight, &a.bias, &[0.4, -0.3], Some(&a.gram));
    write(dir, "B", &b.weight, &b.bias, &[-0.2, 0.5], Some(&b.gram));
    (c, a, b)
}

fn config(params: &str, grams: bool) -> String {
    let g = |m: &str| {
        if grams {
            format!("    grams: ./{m}.grams.safetensors\n")
        } else {
            String::new()
        }
    };
    format!(
        "merge_method: safe_m\nbase_model: ./C\nbase_model_stats: ./C.stats.safetensors\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n{}  - model: ./B\n    stats: ./B.stats.safetensors\n{}parameters:\n  reproject: gram\n{params}dtype: float32\n",
        g("A"),
        g("B")
    )
}

/// `G̃ = α G + (1 − α) diag G` in f64.
fn shrunk(g: &[f32]) -> Vec<f64> {
    (0..IN * IN)
        .map(|i| {
            let v = g[i] as f64;
            if i % (IN + 1) == 0 {
                v
            } else {
                ALPHA * v
            }
        })
        .collect()
}

/// `(Σ_k T_k G̃_k)(Σ_k G̃_k)⁻¹` over `(target, Gram)` pairs.
fn least_squares(models: &[(Vec<f64>, &[f32])]) -> Vec<f64> {
    let mut lhs = vec![0f64; IN * IN];
    let mut rhs = vec![0f64; OUT * IN];
    for (target, gram) in models {
        let g = shrunk(gram);
        for (l, v) in lhs.iter_mut().zip(&g) {
            *l += v;
        }
        for r in 0..OUT {
            for c in 0..IN {
                rhs[r * IN + c] += (0..IN)
                    .map(|k| target[r * IN + k] * g[k * IN + c])
                    .sum::<f64>();
            }
        }
    }
    solve_right_symmetric(&lhs, &rhs, IN)
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w} (all: {got:?} vs {want:?})"
        );
    }
}

fn tau(w: &[f32], c: &[f32]) -> Vec<f64> {
    w.iter()
        .zip(c)
        .map(|(a, b)| *a as f64 - *b as f64)
        .collect()
}

#[test]
fn the_receiver_form_adds_each_update_where_its_model_reads() {
    let dir = tempdir();
    let (c, a, b) = family(dir.path());
    let out = dir.path().join("out");
    let summary = try_merge_yaml(
        dir.path(),
        &config("  density: 1.0\n  conflict: keep\n", true),
        0,
        Some(2),
        &out,
    )
    .expect("merge");
    let merged = f32_tensors(&out);
    // Targets W_A (A's Gram) and W_A + τ_B (B's Gram).
    let w_a: Vec<f64> = a.weight.iter().map(|&v| v as f64).collect();
    let tb = tau(&b.weight, &c);
    let shifted: Vec<f64> = w_a.iter().zip(&tb).map(|(x, t)| x + t).collect();
    let want = least_squares(&[(w_a, &a.gram), (shifted, &b.gram)]);
    assert_close(&merged[&format!("{LAYER}.weight")], &want, "weight");
    // The bias keeps SPEC §1.3: b_A + λ_proj τ_B.
    let bias: Vec<f64> = (0..OUT)
        .map(|r| a.bias[r] as f64 + b.bias[r] as f64)
        .collect();
    assert_close(&merged[&format!("{LAYER}.bias")], &bias, "bias");
    let json = report(&out);
    assert_eq!(
        json["parameters"]["reproject"]["form"], "gram",
        "{}",
        json["parameters"]
    );
    let weight = summary
        .report
        .tensors
        .iter()
        .find(|t| t.plan.name == format!("{LAYER}.weight"))
        .expect("weight in the report");
    assert_eq!(weight.masks[0].kept, (OUT * IN) as u64);
}

#[test]
fn the_symmetric_form_solves_every_models_masked_update_over_the_ancestor() {
    let dir = tempdir();
    let (c, a, b) = family(dir.path());
    let out = dir.path().join("out");
    try_merge_yaml(
        dir.path(),
        &config(
            "  density: 1.0\n  conflict: drop\n  symmetric: true\n",
            true,
        ),
        0,
        None,
        &out,
    )
    .expect("merge");
    let merged = f32_tensors(&out);
    let ta = tau(&a.weight, &c);
    let tb = tau(&b.weight, &c);
    // Conflict rule drop: B's entries of the opposite sign to A's vanish.
    let conflicts = ta.iter().zip(&tb).filter(|(x, y)| *x * *y < 0.0).count();
    assert!(conflicts >= 2, "the family must have conflicts");
    let c64: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    let target_a: Vec<f64> = c64.iter().zip(&ta).map(|(x, t)| x + t).collect();
    let target_b: Vec<f64> = c64
        .iter()
        .zip(ta.iter().zip(&tb))
        .map(|(x, (t_a, t_b))| if t_a * t_b < 0.0 { *x } else { x + t_b })
        .collect();
    let want = least_squares(&[(target_a, &a.gram), (target_b, &b.gram)]);
    assert_close(&merged[&format!("{LAYER}.weight")], &want, "weight");
}

#[test]
fn lambda_zero_gives_the_receiver_back_and_threads_do_not_matter() {
    let dir = tempdir();
    let (_, a, _) = family(dir.path());
    let out = dir.path().join("zero");
    try_merge_yaml(
        dir.path(),
        &config("  density: 1.0\n  lambda_proj: 0.0\n", true),
        0,
        None,
        &out,
    )
    .expect("merge");
    let w_a: Vec<f64> = a.weight.iter().map(|&v| v as f64).collect();
    assert_close(
        &f32_tensors(&out)[&format!("{LAYER}.weight")],
        &w_a,
        "weight",
    );
    let yaml = config("  density: 0.5\n", true);
    let bytes: Vec<Vec<u8>> = [1, 2]
        .iter()
        .map(|&threads| {
            let out = dir.path().join(format!("t{threads}"));
            try_merge_yaml(dir.path(), &yaml, 0, Some(threads), &out).expect("merge");
            std::fs::read(out.join("model.safetensors")).unwrap()
        })
        .collect();
    assert_eq!(bytes[0], bytes[1]);
}

#[test]
fn missing_grams_and_misplaced_keys_are_one_line_errors() {
    let dir = tempdir();
    family(dir.path());
    let out = dir.path().join("out");
    let refused = |yaml: &str| {
        let e = try_merge_yaml(dir.path(), yaml, 0, None, &out)
            .expect_err("refused")
            .to_string();
        assert!(!out.exists(), "a refused merge wrote {}", out.display());
        e
    };
    let err = |yaml: &str| {
        let e = refused(yaml);
        assert!(!e.contains('\n'), "{e}");
        e
    };
    // Without `grams:` the means files have no Gram: the plan lists both
    // models, one line each, naming file and tensor.
    let e = refused(&config("", false));
    assert!(e.starts_with("2 problems"), "{e}");
    for (line, model) in e.lines().skip(1).zip(["A", "B"]) {
        assert!(line.contains(&format!("{model}.stats.safetensors")), "{e}");
        assert!(line.contains(&format!("{LAYER}.x_gram")), "{e}");
    }
    let e = err(&config("  lambda_ortho: 0.5\n", true));
    assert!(e.contains("lambda_ortho"), "{e}");
    let e = err(&config("", true).replace("  reproject: gram\n", "  score: sas\n"));
    assert!(e.contains("grams") && e.contains("reproject: gram"), "{e}");
    let e = err(&config("  gram_alpha: 0.5\n", false).replace("  reproject: gram\n", ""));
    assert!(e.contains("gram_alpha"), "{e}");
    let linear = "merge_method: linear\nmodels:\n  - model: ./A\n    grams: ./A.grams.safetensors\n  - model: ./B\n";
    let e = err(linear);
    assert!(e.contains("grams") && e.contains("linear"), "{e}");
}
