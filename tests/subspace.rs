//! `merge_method: tsv | iso_c | iso_cts | wudi` (SPEC §8) end to end: the
//! engine's bytes against the in-memory kernels of `flatmerge::subspace`,
//! thread independence, TSV-M of one model giving its task vector back,
//! Iso-C's flat spectrum checked without an SVD, the tensors that are not
//! 2-D weights, all-zero and rank-deficient task matrices in the report,
//! and the plan-time error for a shape TSV-M cannot merge.

use flatmerge::config::MergeConfig;
use flatmerge::engine::PreparedMerge;
use flatmerge::subspace::{self, Triplets};
use flatmerge_suite::{f32_tensors, report, tempdir, try_merge_yaml, write_f32_model};
use std::path::Path;

const OUT: usize = 6;
const IN: usize = 5;
const W: &str = "model.layers.0.mlp.up_proj.weight";
const NORM: &str = "model.norm.weight";
const POS: &str = "model.pos_embed";

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

/// A model: a 2-D weight, a 1-D norm, and a 2-D tensor that is not a
/// `*.weight` (task arithmetic).
fn write(dir: &Path, name: &str, weight: Vec<f32>, seed: u64) {
    write_f32_model(
        &dir.join(name),
        &[
            (W, vec![OUT, IN], weight),
            (NORM, vec![IN], values(seed + 1, IN)),
            (POS, vec![2, IN], values(seed + 2, 2 * IN)),
        ],
    );
}

fn yaml(method: &str, models: &[&str], parameters: &str) -> String {
    let list: String = models
        .iter()
        .map(|m| format!("  - model: ./{m}\n"))
        .collect();
    format!("models:\n{list}merge_method: {method}\nbase_model: ./C\n{parameters}")
}

/// Tensor `name`'s entry of a report.
fn tensor(json: &serde_json::Value, name: &str) -> serde_json::Value {
    json["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in the report"))
}

fn task(w: &[f32], base: &[f32]) -> Vec<f64> {
    w.iter()
        .zip(base)
        .map(|(&a, &b)| f64::from(a) - f64::from(b))
        .collect()
}

/// The family C (base), A, B, Z (= C: an all-zero task), R (a rank-1 task).
fn family(dir: &Path) -> Vec<Vec<f32>> {
    // Sixteenths, and a rank-1 update in 1/32s: `C + u vᵀ` is exact in f32,
    // so R's task matrix has rank 1 exactly (not up to rounding).
    let c: Vec<f32> = values(1, OUT * IN)
        .iter()
        .map(|x| (x * 16.0).round() / 16.0)
        .collect();
    let a = values(2, OUT * IN);
    let b = values(3, OUT * IN);
    let u: Vec<f32> = (0..OUT).map(|i| (i as f32 + 1.0) / 4.0).collect();
    let v: Vec<f32> = (0..IN).map(|j| (j as f32 - 2.0) / 8.0).collect();
    let r: Vec<f32> = (0..OUT * IN)
        .map(|i| c[i] + u[i / IN] * v[i % IN])
        .collect();
    write(dir, "C", c.clone(), 10);
    write(dir, "A", a.clone(), 20);
    write(dir, "B", b.clone(), 30);
    write(dir, "R", r.clone(), 40);
    // Z equals C everywhere: every task vector of it is zero.
    write(dir, "Z", c.clone(), 10);
    vec![c, a, b, r]
}

/// The in-memory result of `method` on the task matrices: the library's
/// slice functions, which the engine must reproduce bit for bit.
fn in_memory(method: &str, base: &[f32], taus: &[Vec<f64>], alpha: f64) -> Vec<f32> {
    let refs: Vec<&[f64]> = taus.iter().map(Vec::as_slice).collect();
    let factors: Triplets = match method {
        "tsv" => subspace::tsv(OUT, IN, &refs).unwrap().0,
        "iso_c" => subspace::iso_c(OUT, IN, &refs).unwrap().0,
        "iso_cts" => subspace::iso_cts(OUT, IN, &refs, 0.5).unwrap().0,
        "wudi" => {
            let tau = subspace::wudi(OUT, IN, &refs).unwrap().tau;
            return base
                .iter()
                .zip(&tau)
                .map(|(&b, &d)| (f64::from(b) + alpha * d) as f32)
                .collect();
        }
        _ => unreachable!(),
    };
    factors.apply(base, alpha)
}

#[test]
fn engine_matches_the_slice_kernels_bit_for_bit_on_any_thread_count() {
    let dir = tempdir();
    let m = family(dir.path());
    let taus = vec![task(&m[1], &m[0]), task(&m[2], &m[0]), task(&m[3], &m[0])];
    for method in ["tsv", "iso_c", "iso_cts", "wudi"] {
        let params = "parameters:\n  alpha: 0.7\n  common_space_fraction: 0.5\n";
        let params = if method == "iso_cts" {
            params
        } else {
            "parameters:\n  alpha: 0.7\n"
        };
        let text = yaml(method, &["A", "B", "R"], params);
        let one = dir.path().join(format!("{method}-1"));
        let two = dir.path().join(format!("{method}-2"));
        try_merge_yaml(dir.path(), &text, 0, Some(1), &one).expect("merge");
        try_merge_yaml(dir.path(), &text, 0, Some(2), &two).expect("merge");
        assert_eq!(
            std::fs::read(one.join("model.safetensors")).unwrap(),
            std::fs::read(two.join("model.safetensors")).unwrap(),
            "{method}: thread counts differ"
        );
        let merged = f32_tensors(&one);
        let want = in_memory(method, &m[0], &taus, 0.7);
        let got = &merged[W];
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{method}: engine and slice kernels differ"
        );
    }
}

#[test]
fn tsv_of_one_model_with_alpha_one_gives_it_back() {
    let dir = tempdir();
    let m = family(dir.path());
    let out = dir.path().join("out");
    try_merge_yaml(dir.path(), &yaml("tsv", &["A"], ""), 0, Some(2), &out).expect("merge");
    let merged = f32_tensors(&out);
    let a = f32_tensors(&dir.path().join("A"));
    // Full rank (⌊r/1⌋ = r triplets): W_C + τ_A up to the SVD's rounding.
    for (i, (&x, &y)) in merged[W].iter().zip(&m[1]).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "entry {i}: {x} vs {y}"
        );
    }
    // The 1-D mean and task arithmetic of one model are exact.
    assert_eq!(merged[NORM], a[NORM]);
    assert_eq!(merged[POS], a[POS]);
    let json = report(&out);
    let s = &tensor(&json, W)["subspace"];
    assert_eq!(s["r"], IN);
    assert_eq!(s["per_task"], IN);
    assert_eq!(s["kept"], serde_json::json!([IN]));
}

/// `G = Δ Δᵀ` for `Δ = W* − W_C` with every nonzero singular value `σ̄`
/// satisfies `G² = σ̄² G` (`G = σ̄² P`, `P` a projector): Iso-C's flat
/// spectrum, checked without an SVD.
#[test]
fn iso_c_output_has_equal_singular_values() {
    let dir = tempdir();
    let m = family(dir.path());
    let out = dir.path().join("out");
    try_merge_yaml(
        dir.path(),
        &yaml("iso_c", &["A", "B"], ""),
        0,
        Some(2),
        &out,
    )
    .expect("merge");
    let merged = f32_tensors(&out);
    let delta = task(&merged[W], &m[0]);
    let sigma = tensor(&report(&out), W)["subspace"]["sigma"]
        .as_f64()
        .expect("σ̄ in the report");
    assert!(sigma > 0.0);
    let mut g = vec![0.0f64; OUT * OUT];
    for i in 0..OUT {
        for j in 0..OUT {
            g[i * OUT + j] = (0..IN).map(|c| delta[i * IN + c] * delta[j * IN + c]).sum();
        }
    }
    let scale = sigma * sigma;
    for i in 0..OUT {
        for j in 0..OUT {
            let g2: f64 = (0..OUT).map(|k| g[i * OUT + k] * g[k * OUT + j]).sum();
            let want = scale * g[i * OUT + j];
            assert!(
                (g2 - want).abs() <= 1e-4 * scale * scale,
                "G²[{i},{j}] = {g2}, σ̄²·G = {want}"
            );
        }
    }
}

#[test]
fn all_zero_and_rank_deficient_tasks_are_defined_and_reported() {
    let dir = tempdir();
    let m = family(dir.path());
    // Every task zero: W* = W_C for every method.
    for method in ["tsv", "iso_c", "iso_cts", "wudi"] {
        let out = dir.path().join(format!("zero-{method}"));
        try_merge_yaml(dir.path(), &yaml(method, &["Z"], ""), 0, Some(2), &out)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(f32_tensors(&out)[W], m[0], "{method}");
        let s = &tensor(&report(&out), W)["subspace"];
        assert_eq!(s["zero"], serde_json::json!([0]), "{method}: {s}");
    }
    // A zero task and a rank-1 task: TSV-M keeps the one triplet there is.
    let out = dir.path().join("tsv-rank");
    try_merge_yaml(dir.path(), &yaml("tsv", &["Z", "R"], ""), 0, Some(2), &out).expect("merge");
    let s = &tensor(&report(&out), W)["subspace"];
    assert_eq!(s["per_task"], IN / 2);
    assert_eq!(s["ranks"], serde_json::json!([0, 1]));
    assert_eq!(s["kept"], serde_json::json!([0, 1]));
    assert_eq!(s["factor_ranks"], serde_json::json!([1, 1]));
    assert_eq!(s["zero"], serde_json::json!([0]));
    // The rank-1 task comes back (orthogonalising one triplet changes nothing).
    for (&x, &y) in f32_tensors(&out)[W].iter().zip(&m[3]) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
    // WUDI with a rank-1 sum of Grams needs §7's ridge and says so.
    let out = dir.path().join("wudi-rank");
    try_merge_yaml(dir.path(), &yaml("wudi", &["R"], ""), 0, Some(2), &out).expect("merge");
    let t = &tensor(&report(&out), W);
    assert!(t["ridge"].as_f64().is_some_and(|d| d > 0.0), "{t}");
}

#[test]
fn tsv_refuses_more_models_than_directions_before_reading_data() {
    let dir = tempdir();
    let narrow = |name: &str, seed: u64| {
        write_f32_model(
            &dir.path().join(name),
            &[(W, vec![1, IN], values(seed, IN))],
        );
    };
    narrow("C", 1);
    narrow("A", 2);
    narrow("B", 3);
    let config = MergeConfig::from_yaml(&yaml("tsv", &["A", "B"], ""), dir.path(), None)
        .expect("the config itself is fine");
    let e = PreparedMerge::new(config)
        .err()
        .expect("planning refuses the shape");
    let text = e.to_string();
    assert!(text.contains(W), "{text}");
    assert!(text.contains("r = min(out, in) = 1 < T = 2"), "{text}");
    assert!(text.contains("C"), "names the file: {text}");
    // The other members merge it.
    for method in ["iso_c", "iso_cts", "wudi"] {
        let out = dir.path().join(method);
        try_merge_yaml(dir.path(), &yaml(method, &["A", "B"], ""), 0, Some(1), &out)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
    }
}

#[test]
fn tensors_other_than_weights_follow_the_mean_and_task_arithmetic() {
    let dir = tempdir();
    family(dir.path());
    let out = dir.path().join("out");
    let params = "parameters:\n  alpha: 0.5\n  lambda: 0.25\n";
    let text = yaml("iso_c", &["A", "B"], params).replace(
        "  - model: ./B\n",
        "  - model: ./B\n    parameters:\n      weight: 2.0\n",
    );
    try_merge_yaml(dir.path(), &text, 0, Some(2), &out).expect("merge");
    let merged = f32_tensors(&out);
    let [c, a, b] = ["C", "A", "B"].map(|m| f32_tensors(&dir.path().join(m)));
    for i in 0..IN {
        let (cb, ta, tb) = (
            f64::from(c[NORM][i]),
            f64::from(a[NORM][i]),
            f64::from(b[NORM][i]),
        );
        let want = (cb + 0.5 * ((ta - cb) + (tb - cb)) / 2.0) as f32;
        assert_eq!(merged[NORM][i], want, "norm {i}");
    }
    for i in 0..2 * IN {
        let want = c[POS][i] + 0.25 * ((a[POS][i] - c[POS][i]) + 2.0 * (b[POS][i] - c[POS][i]));
        assert!((merged[POS][i] - want).abs() <= 1e-6, "pos {i}");
    }
    let rule = tensor(&report(&out), NORM)["rule"].to_string();
    assert!(rule.contains("average"), "{rule}");
}
