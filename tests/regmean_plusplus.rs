//! `merge_method: regmean_plusplus` (SPEC §7, RegMean++) end to end on
//! small MLPs the native probe runs: the first block is RegMean's to the
//! byte; the second layer is checked against an independent computation in
//! this file (each model's own examples run through the merged first layer,
//! the Gram and mean of what reaches the second layer, the SPEC §7 normal
//! equations solved in f64); threads change nothing; the report; the
//! errors for a missing or misplaced `probe_set`.

use flatmerge::probe::mlp::{Activation, Linear, Mlp, MlpSpec};
use flatmerge::probe::set::write_probe_set;
use flatmerge::probe::{probe_files, ProbeExample, ProbeOptions};
use flatmerge_suite::{
    dir_files, f32_tensors, report, solve_right_symmetric, tempdir, try_merge_yaml,
};
use std::collections::BTreeMap;
use std::path::Path;

const WIDTHS: [usize; 3] = [4, 6, 3];
const EXAMPLES: usize = 24;

/// A reproducible pseudo-random stream in [-1, 1) (no RNG crate in tests).
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

/// Example `i` of the probe set: source `a` for even `i`, `b` for odd.
fn example(i: usize) -> Vec<f32> {
    let shift = if i % 2 == 0 { 0.5 } else { -0.5 };
    values(1000 + i as u64, WIDTHS[0])
        .iter()
        .map(|v| v + shift)
        .collect()
}

/// Writes the probe set, models `A` and `B` (4 → 6 tanh → 3, with
/// biases; `B`'s first layer far from `A`'s, so that merging it moves
/// what the second layer reads) and each model's Gram statistics over its
/// own source (`A`: `a`, `B`: `b`), as `flatmerge probe --gram --sources`.
fn fixture(dir: &Path) {
    let set: Vec<ProbeExample> = (0..EXAMPLES)
        .map(|i| ProbeExample {
            source: if i % 2 == 0 { "a" } else { "b" }.to_string(),
            ..ProbeExample::features(example(i))
        })
        .collect();
    write_probe_set(&dir.join("probe.jsonl"), &set).unwrap();
    for (name, seed, source) in [("A", 1, "a"), ("B", 2, "b")] {
        let spec = MlpSpec::chain(&WIDTHS, Activation::Tanh, Activation::None);
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(k, l)| Linear {
                weight: values(seed * 10 + k as u64, l.in_features * l.out_features),
                bias: Some(values(seed * 10 + 5 + k as u64, l.out_features)),
            })
            .collect();
        let model = dir.join(name);
        Mlp::new(spec, layers).unwrap().save(&model).unwrap();
        probe_files(
            &model,
            &dir.join("probe.jsonl"),
            &dir.join(format!("{name}.stats.safetensors")),
            &ProbeOptions {
                max_examples: Some(0),
                gram: true,
                sources: Some(vec![source.to_string()]),
                ..ProbeOptions::default()
            },
        )
        .unwrap();
    }
}

fn config(method: &str, extra: &str) -> String {
    format!(
        "merge_method: {method}\n{extra}models:\n  - model: ./A\n    stats: ./A.stats.safetensors\n  - model: ./B\n    stats: ./B.stats.safetensors\ndtype: float32\n"
    )
}

/// `[W* | b*]` (rows of `input + 1`) of SPEC §7 with weights 1, from each
/// model's `(W, b, Gram, mean)`, in f64.
#[allow(clippy::type_complexity)]
fn solve(models: &[(&[f32], &[f32], Vec<f64>, Vec<f64>)], alpha: f64, out: usize) -> Vec<f64> {
    let input = models[0].3.len();
    let n = input + 1;
    let mut lhs = vec![0f64; n * n];
    let mut rhs = vec![0f64; out * n];
    for (w, b, gram, mean) in models {
        let mut g = vec![0f64; n * n];
        for i in 0..input {
            g[i * n..i * n + input].copy_from_slice(&gram[i * input..(i + 1) * input]);
            g[i * n + input] = mean[i];
            g[input * n + i] = mean[i];
        }
        g[input * n + input] = 1.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    g[i * n + j] *= alpha;
                }
            }
        }
        for (l, v) in lhs.iter_mut().zip(&g) {
            *l += v;
        }
        for r in 0..out {
            let row: Vec<f64> = (0..n)
                .map(|c| {
                    if c < input {
                        w[r * input + c] as f64
                    } else {
                        b[r] as f64
                    }
                })
                .collect();
            for c in 0..n {
                rhs[r * n + c] += (0..n).map(|k| row[k] * g[k * n + c]).sum::<f64>();
            }
        }
    }
    solve_right_symmetric(&lhs, &rhs, n)
}

/// Gram and mean (per token) of what the second layer reads when the
/// examples of `parity` run through the first layer `(w, b)` and tanh.
fn hidden_moments(w: &[f32], b: &[f32], parity: usize) -> (Vec<f64>, Vec<f64>) {
    let (input, hidden) = (WIDTHS[0], WIDTHS[1]);
    let mut gram = vec![0f64; hidden * hidden];
    let mut mean = vec![0f64; hidden];
    let own: Vec<usize> = (0..EXAMPLES).filter(|i| i % 2 == parity).collect();
    for &i in &own {
        let x = example(i);
        let h: Vec<f64> = (0..hidden)
            .map(|r| {
                let v = b[r] as f64
                    + (0..input)
                        .map(|c| w[r * input + c] as f64 * x[c] as f64)
                        .sum::<f64>();
                v.tanh()
            })
            .collect();
        for r in 0..hidden {
            mean[r] += h[r] / own.len() as f64;
            for c in 0..hidden {
                gram[r * hidden + c] += h[r] * h[c] / own.len() as f64;
            }
        }
    }
    (gram, mean)
}

#[test]
fn the_second_layer_is_solved_on_inputs_through_the_merged_first_layer() {
    let dir = tempdir();
    fixture(dir.path());
    let out = dir.path().join("pp");
    let summary = try_merge_yaml(
        dir.path(),
        &config("regmean_plusplus", "probe_set: ./probe.jsonl\n"),
        0,
        Some(2),
        &out,
    )
    .expect("regmean_plusplus merge");
    assert_eq!(summary.report.method, "regmean_plusplus");
    let plain = dir.path().join("plain");
    try_merge_yaml(dir.path(), &config("regmean", ""), 0, Some(2), &plain).expect("regmean");

    let merged = f32_tensors(&out);
    let regmean = f32_tensors(&plain);
    // Block 0 reads the probe's own inputs: RegMean's, to the bit.
    for name in ["fc1.weight", "fc1.bias"] {
        assert_eq!(merged[name], regmean[name], "{name}");
    }

    let a = f32_tensors(&dir.path().join("A"));
    let b = f32_tensors(&dir.path().join("B"));
    let (w0, b0) = (&merged["fc1.weight"], &merged["fc1.bias"]);
    let (ga, ma) = hidden_moments(w0, b0, 0);
    let (gb, mb) = hidden_moments(w0, b0, 1);
    let want = solve(
        &[
            (&a["fc2.weight"], &a["fc2.bias"], ga, ma),
            (&b["fc2.weight"], &b["fc2.bias"], gb, mb),
        ],
        0.9,
        WIDTHS[2],
    );
    let n = WIDTHS[1] + 1;
    let (w1, b1) = (&merged["fc2.weight"], &merged["fc2.bias"]);
    assert!(want.iter().all(|v| v.is_finite()), "{want:?}");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = 0f64;
    let mut moved = 0f64;
    for r in 0..WIDTHS[2] {
        for c in 0..n {
            let (got, plain) = if c < WIDTHS[1] {
                (
                    w1[r * WIDTHS[1] + c],
                    regmean["fc2.weight"][r * WIDTHS[1] + c],
                )
            } else {
                (b1[r], regmean["fc2.bias"][r])
            };
            worst = worst.max((got as f64 - want[r * n + c]).abs() / scale);
            moved = moved.max((plain as f64 - want[r * n + c]).abs() / scale);
        }
    }
    assert!(
        worst < 1e-4,
        "fc2 off the independent solve by {worst:e} (relative)"
    );
    // The check can fail: RegMean's own-input Grams give a different layer.
    assert!(
        moved > 1e-2,
        "RegMean's fc2 is within {moved:e} of RegMean++'s"
    );

    let section = &report(&out)["regmean_plusplus"];
    assert_eq!(section["probe_passes"], 4, "{section}");
    assert_eq!(section["sources"], serde_json::json!([["a"], ["b"]]));
    let stages = section["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{section}");
    assert_eq!(stages[1]["stage"], "block 1");
    assert_eq!(stages[1]["examples"], serde_json::json!([12, 12]));
}

#[test]
fn any_thread_count_gives_the_same_bytes() {
    let dir = tempdir();
    fixture(dir.path());
    let yaml = config("regmean_plusplus", "probe_set: ./probe.jsonl\n");
    let mut outputs: Vec<BTreeMap<String, Vec<u8>>> = Vec::new();
    for threads in [1, 2] {
        let out = dir.path().join(format!("out-{threads}"));
        try_merge_yaml(dir.path(), &yaml, 0, Some(threads), &out).expect("merge");
        let mut files = dir_files(&out);
        files.remove("merge_report.json");
        outputs.push(files);
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn probe_set_is_required_by_regmean_plusplus_and_refused_elsewhere() {
    let dir = tempdir();
    fixture(dir.path());
    let out = dir.path().join("out");
    let missing = try_merge_yaml(dir.path(), &config("regmean_plusplus", ""), 0, None, &out)
        .expect_err("no probe_set")
        .to_string();
    assert!(missing.contains("probe_set"), "{missing}");
    assert!(!missing.contains('\n'), "{missing}");
    let misplaced = try_merge_yaml(
        dir.path(),
        &config("regmean", "probe_set: ./probe.jsonl\n"),
        0,
        None,
        &out,
    )
    .expect_err("probe_set on regmean")
    .to_string();
    assert!(misplaced.contains("line 2"), "{misplaced}");
    assert!(misplaced.contains("regmean_plusplus"), "{misplaced}");
    let absent = try_merge_yaml(
        dir.path(),
        &config("regmean_plusplus", "probe_set: ./nowhere.jsonl\n"),
        0,
        None,
        &out,
    )
    .expect_err("absent probe set")
    .to_string();
    assert!(absent.contains("nowhere.jsonl"), "{absent}");
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
}

#[test]
fn overrides_replace_tensors_of_the_same_shape_and_name_the_file_otherwise() {
    use flatmerge::io::Checkpoint;
    use flatmerge_suite::write_f32_model;
    let dir = tempdir();
    let model = write_f32_model(
        &dir.path().join("M"),
        &[
            ("a.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("b.weight", vec![2], vec![5.0, 6.0]),
        ],
    );
    let file = |name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
        write_f32_model(&dir.path().join(name), tensors).join("model.safetensors")
    };
    let good = file("good", &[("b.weight", vec![2], vec![7.0, 8.0])]);
    let merged = Checkpoint::open(&model)
        .unwrap()
        .with_overrides(std::slice::from_ref(&good))
        .unwrap();
    let names: Vec<&str> = merged.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "b.weight"]);
    let b = merged.view("b.weight").unwrap();
    let values: Vec<f32> = b
        .data
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, [7.0, 8.0]);
    assert_eq!(merged.view("a.weight").unwrap().data.len(), 16);

    let shape = file("shape", &[("b.weight", vec![1, 2], vec![7.0, 8.0])]);
    let err = Checkpoint::open(&model)
        .unwrap()
        .with_overrides(&[shape])
        .expect_err("another shape")
        .to_string();
    assert!(err.contains("shape") && err.contains("b.weight"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    let unknown = file("unknown", &[("c.weight", vec![2], vec![7.0, 8.0])]);
    let err = Checkpoint::open(&model)
        .unwrap()
        .with_overrides(&[unknown])
        .expect_err("unknown tensor")
        .to_string();
    assert!(
        err.contains("c.weight") && err.contains("cannot replace"),
        "{err}"
    );
}
