//! `sce`, `ram`, `ramplus_tl`, `nuslerp`, `multislerp`, `karcher` and
//! `arcee_fusion` end to end: the engine's bytes against the library's
//! slice functions (`flatmerge::sphere`, `flatmerge::consensus`, whose
//! hand-computed and property tests live beside them) on 1 and 2 threads;
//! and tensors that only some models hold (mergekit's optional weights):
//! merged over the holders, copied from the base, listed in the report,
//! refused under `--strict`.

use flatmerge::config::MergeConfig;
use flatmerge::consensus::{self, RamPlus};
use flatmerge::engine::PreparedMerge;
use flatmerge::sphere::{self, Lanes};
use flatmerge_suite::{f32_tensors, options, report, tempdir, try_merge_yaml, write_f32_model};
use std::collections::BTreeMap;
use std::path::Path;

const W: &str = "model.layers.0.mlp.up_proj.weight";
const NORM: &str = "model.norm.weight";
const HEAD: &str = "score.weight";
const SHAPE: [usize; 2] = [6, 5];

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

/// C (the base) and its fine-tunes A, B, B2: a weight, a norm, and (not in
/// B) a task head. Some task-vector entries are exactly zero, so RAM's
/// unique, shared and inactive entries all occur.
fn family(dir: &Path) -> BTreeMap<&'static str, BTreeMap<&'static str, Vec<f32>>> {
    let n = SHAPE[0] * SHAPE[1];
    let c = values(1, n);
    let mut out = BTreeMap::new();
    for (i, name) in ["C", "A", "B", "B2"].into_iter().enumerate() {
        let w: Vec<f32> = if name == "C" {
            c.clone()
        } else {
            values(10 + i as u64, n)
                .iter()
                .zip(&c)
                .enumerate()
                .map(|(j, (d, b))| if (j + i) % 3 == 0 { *b } else { b + 0.3 * d })
                .collect()
        };
        let norm = values(20 + i as u64, SHAPE[1]);
        let head = values(30 + i as u64, 2 * SHAPE[1]);
        let mut tensors = vec![
            (W, SHAPE.to_vec(), w.clone()),
            (NORM, vec![SHAPE[1]], norm.clone()),
        ];
        if name != "B" {
            tensors.push((HEAD, vec![2, SHAPE[1]], head.clone()));
        }
        write_f32_model(&dir.join(name), &tensors);
        out.insert(name, BTreeMap::from([(W, w), (NORM, norm), (HEAD, head)]));
    }
    out
}

fn models_yaml(models: &[(&str, Option<f64>)]) -> String {
    models
        .iter()
        .map(|(m, w)| match w {
            Some(w) => format!("  - model: ./{m}\n    parameters:\n      weight: {w}\n"),
            None => format!("  - model: ./{m}\n"),
        })
        .collect()
}

/// Merges `yaml` on 1 and 2 threads; the outputs must be the same bytes.
fn merge_twice(dir: &Path, name: &str, yaml: &str) -> BTreeMap<String, Vec<f32>> {
    let one = dir.join(format!("{name}-1"));
    let two = dir.join(format!("{name}-2"));
    try_merge_yaml(dir, yaml, 0, Some(1), &one).unwrap_or_else(|e| panic!("{name}: {e}"));
    try_merge_yaml(dir, yaml, 0, Some(2), &two).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        std::fs::read(one.join("model.safetensors")).unwrap(),
        std::fs::read(two.join("model.safetensors")).unwrap(),
        "{name}: thread counts differ"
    );
    f32_tensors(&one)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[test]
fn engine_matches_the_slice_functions_bit_for_bit_on_any_thread_count() {
    let dir = tempdir();
    let m = family(dir.path());
    let (c, a, b, b2) = (&m["C"][W], &m["A"][W], &m["B"][W], &m["B2"][W]);
    let n = c.len();
    let three = models_yaml(&[("A", None), ("B", None), ("B2", None)]);

    // sce
    let yaml = format!(
        "models:\n{three}merge_method: sce\nbase_model: ./C\nparameters:\n  select_topk: 0.4\n"
    );
    let got = merge_twice(dir.path(), "sce", &yaml);
    let mut taus = [sub(a, c), sub(b, c), sub(b2, c)];
    let mut slices: Vec<&mut [f32]> = taus.iter_mut().map(Vec::as_mut_slice).collect();
    let mut want = vec![0f32; n];
    consensus::sce(c, &mut slices, 0.4, &mut want);
    assert_eq!(bits(&got[W]), bits(&want), "sce");

    // ram and ramplus_tl
    for (method, plus) in [
        ("ram", None),
        ("ramplus_tl", Some(RamPlus { r: 0.5, alpha: 2.0 })),
    ] {
        let params = if plus.is_some() {
            "  r: 0.5\n  alpha: 2.0\n"
        } else {
            ""
        };
        let yaml = format!("models:\n{three}merge_method: {method}\nbase_model: ./C\nparameters:\n{params}  epsilon: 0.001\n");
        let got = merge_twice(dir.path(), method, &yaml);
        let mut want = vec![0f32; n];
        consensus::ram(c, &[a, b, b2], 0.001, plus, &mut want);
        assert_eq!(bits(&got[W]), bits(&want), "{method}");
    }

    // nuslerp over the base, per row, t = 0.7
    let two = models_yaml(&[("A", Some(0.3)), ("B", Some(0.7))]);
    let yaml = format!("models:\n{two}merge_method: nuslerp\nbase_model: ./C\nparameters:\n  nuslerp_flatten: false\n");
    let got = merge_twice(dir.path(), "nuslerp", &yaml);
    let mut want = vec![0f32; n];
    sphere::nuslerp(
        0.7 / (0.3 + 0.7),
        &sub(a, c),
        &sub(b, c),
        Lanes::last_axis(&SHAPE),
        &mut want,
    );
    want.iter_mut().zip(c).for_each(|(w, c)| *w += c);
    assert_eq!(bits(&got[W]), bits(&want), "nuslerp");
    // Without a base, by columns.
    let yaml = format!("models:\n{two}merge_method: nuslerp\nparameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n");
    let got = merge_twice(dir.path(), "nuslerp-columns", &yaml);
    sphere::nuslerp(
        0.7 / (0.3 + 0.7),
        a,
        b,
        Lanes::first_axis(&SHAPE),
        &mut want,
    );
    assert_eq!(bits(&got[W]), bits(&want), "nuslerp by columns");

    // multislerp over the base
    let weighted = models_yaml(&[("A", Some(1.0)), ("B", Some(0.5)), ("B2", Some(0.25))]);
    let yaml = format!("models:\n{weighted}merge_method: multislerp\nbase_model: ./C\n");
    let got = merge_twice(dir.path(), "multislerp", &yaml);
    sphere::multislerp(
        &[a, b, b2],
        Some(c),
        &[1.0, 0.5, 0.25],
        true,
        1e-8,
        &mut want,
    )
    .unwrap();
    assert_eq!(bits(&got[W]), bits(&want), "multislerp");

    // karcher: the base is a fourth point when it is not listed (mergekit appends it).
    let yaml = format!(
        "models:\n{three}merge_method: karcher\nbase_model: ./C\nparameters:\n  max_iter: 20\n"
    );
    let got = merge_twice(dir.path(), "karcher", &yaml);
    sphere::karcher(&[c, a, b, b2], 20, 1e-5, &mut want);
    assert_eq!(bits(&got[W]), bits(&want), "karcher");
    let yaml = format!("models:\n{three}merge_method: karcher\n");
    let got = merge_twice(dir.path(), "karcher-nobase", &yaml);
    sphere::karcher(&[a, b, b2], 10, 1e-5, &mut want);
    assert_eq!(bits(&got[W]), bits(&want), "karcher without a base");

    // arcee_fusion: rows of the last axis.
    let yaml = format!(
        "models:\n{}merge_method: arcee_fusion\nbase_model: ./C\n",
        models_yaml(&[("A", None)])
    );
    let got = merge_twice(dir.path(), "arcee_fusion", &yaml);
    consensus::arcee_fusion(c, a, SHAPE[1], &mut want);
    assert_eq!(bits(&got[W]), bits(&want), "arcee_fusion");
}

#[test]
fn identical_models_give_the_model_back() {
    let dir = tempdir();
    let m = family(dir.path());
    for copy in ["A1", "A2", "A3"] {
        write_f32_model(
            &dir.path().join(copy),
            &[
                (W, SHAPE.to_vec(), m["A"][W].clone()),
                (NORM, vec![SHAPE[1]], m["A"][NORM].clone()),
            ],
        );
    }
    let weighted = models_yaml(&[("A1", Some(1.0)), ("A2", Some(2.0)), ("A3", Some(0.5))]);
    let plain = models_yaml(&[("A1", None), ("A2", None), ("A3", None)]);
    for (method, copies) in [("multislerp", weighted), ("karcher", plain)] {
        let yaml = format!("models:\n{copies}merge_method: {method}\n");
        let got = merge_twice(dir.path(), method, &yaml);
        for (g, w) in got[W].iter().zip(&m["A"][W]) {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{method}: {g} vs {w}"
            );
        }
    }
}

/// The report's entry of tensor `name`.
fn tensor_entry(json: &serde_json::Value, name: &str) -> serde_json::Value {
    json["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in the report"))
}

#[test]
fn a_tensor_some_models_lack_is_merged_over_the_others_and_reported() {
    let dir = tempdir();
    let m = family(dir.path());
    // B lacks the task head: linear averages it over A and B2.
    let yaml = format!(
        "models:\n{}merge_method: linear\n",
        models_yaml(&[("A", Some(1.0)), ("B", Some(1.0)), ("B2", Some(3.0))])
    );
    let out = dir.path().join("linear");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &out).expect("merge");
    let got = f32_tensors(&out);
    for (j, g) in got[HEAD].iter().enumerate() {
        let want = (m["A"][HEAD][j] + 3.0 * m["B2"][HEAD][j]) / 4.0;
        assert!((g - want).abs() <= 1e-6, "entry {j}: {g} vs {want}");
    }
    let entry = tensor_entry(&report(&out), HEAD);
    assert_eq!(entry["contributors"], serde_json::json!([0, 2]));
    assert_eq!(
        entry["excluded"],
        serde_json::json!([{"contributor": 1, "why": "missing"}])
    );

    // sce over the base: the head over A and B2, as the kernel does with those two.
    let yaml = format!(
        "models:\n{}merge_method: sce\nbase_model: ./C\n",
        models_yaml(&[("A", None), ("B", None), ("B2", None)])
    );
    let out = dir.path().join("sce");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &out).expect("merge");
    let c = &m["C"][HEAD];
    let mut taus = [sub(&m["A"][HEAD], c), sub(&m["B2"][HEAD], c)];
    let mut slices: Vec<&mut [f32]> = taus.iter_mut().map(Vec::as_mut_slice).collect();
    let mut want = vec![0f32; c.len()];
    consensus::sce(c, &mut slices, 1.0, &mut want);
    assert_eq!(bits(&f32_tensors(&out)[HEAD]), bits(&want));

    // arcee_fusion with B, which lacks the head: the base's head, reported as copied.
    let yaml = format!(
        "models:\n{}merge_method: arcee_fusion\nbase_model: ./C\n",
        models_yaml(&[("B", None)])
    );
    let out = dir.path().join("arcee");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &out).expect("merge");
    assert_eq!(f32_tensors(&out)[HEAD], m["C"][HEAD]);
    let entry = tensor_entry(&report(&out), HEAD);
    assert_eq!(entry["rule"], "copy");
    assert_eq!(entry["reason"], "only_in_receiver");

    // nuslerp needs both models: with one of them lacking the head, the base's.
    let yaml = format!(
        "models:\n{}merge_method: nuslerp\nbase_model: ./C\n",
        models_yaml(&[("A", Some(1.0)), ("B", Some(1.0))])
    );
    let out = dir.path().join("nuslerp");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &out).expect("merge");
    assert_eq!(f32_tensors(&out)[HEAD], m["C"][HEAD]);
    assert_eq!(
        tensor_entry(&report(&out), HEAD)["reason"],
        "too_few_holders"
    );
}

#[test]
fn dare_masks_follow_the_contributor_not_its_place_among_the_holders() {
    let dir = tempdir();
    family(dir.path());
    // B (contributor 1) lacks the head; B2 (contributor 2) draws stream 2 on it
    // whether or not B is listed before it: compare against a merge where
    // B2's head is the only one and B2 is still contributor 2.
    let yaml = |models: &str| {
        format!("models:\n{models}merge_method: dare_linear\nbase_model: ./C\nparameters:\n  density: 0.5\n")
    };
    let with_b = yaml(&models_yaml(&[
        ("A", Some(0.0)),
        ("B", Some(1.0)),
        ("B2", Some(1.0)),
    ]));
    let out = dir.path().join("with-b");
    try_merge_yaml(dir.path(), &with_b, 7, Some(2), &out).expect("merge");
    let json = report(&out);
    let sparsity = &tensor_entry(&json, HEAD)["sparsity"];
    assert_eq!(sparsity[0]["contributor"], 0);
    assert_eq!(sparsity[1]["contributor"], 2, "B2 keeps its index");
    let kept_b2 = sparsity[1]["kept"].as_u64().unwrap();
    // The same seed and contributor index on B2's head: the same kept count.
    let n = 2 * SHAPE[1];
    let c = f32_tensors(&dir.path().join("C"));
    let b2 = f32_tensors(&dir.path().join("B2"));
    let want = (0..n)
        .filter(|&i| b2[HEAD][i] != c[HEAD][i])
        .filter(|&i| flatmerge_suite::spec_dare_uniform(7, 2, HEAD, i as u64) < 0.5)
        .count() as u64;
    assert_eq!(kept_b2, want);
}

#[test]
fn strict_refuses_tensors_that_only_some_models_hold() {
    let dir = tempdir();
    family(dir.path());
    let yaml = format!(
        "models:\n{}merge_method: ties\nbase_model: ./C\n",
        models_yaml(&[("A", Some(1.0)), ("B", Some(1.0))])
    );
    let mut config = MergeConfig::from_yaml(&yaml, dir.path(), None).expect("config");
    config.strict = true;
    let out = dir.path().join("strict");
    let e = PreparedMerge::new(config)
        .and_then(|p| p.run(&options(&out, Some(2), None)))
        .expect_err("--strict refuses the missing head")
        .to_string();
    assert!(
        e.contains("--strict") && e.contains(HEAD) && e.contains("/B"),
        "{e}"
    );
    assert!(!out.exists(), "no output is left");
    // A tensor the base lacks but a model holds is dropped; --strict refuses it too.
    write_f32_model(
        &dir.path().join("X"),
        &[
            (W, SHAPE.to_vec(), values(5, 30)),
            (NORM, vec![SHAPE[1]], values(6, 5)),
            (HEAD, vec![2, SHAPE[1]], values(7, 10)),
            ("extra.weight", vec![3], values(8, 3)),
        ],
    );
    let yaml = format!(
        "models:\n{}merge_method: ram\nbase_model: ./A\n",
        models_yaml(&[("X", None)])
    );
    let out = dir.path().join("dropped");
    try_merge_yaml(dir.path(), &yaml, 0, Some(2), &out)
        .expect("without --strict: dropped and reported");
    assert_eq!(report(&out)["dropped"][0]["name"], "extra.weight");
    let mut config = MergeConfig::from_yaml(&yaml, dir.path(), None).expect("config");
    config.strict = true;
    let e = PreparedMerge::new(config)
        .and_then(|p| p.run(&options(&dir.path().join("dropped-strict"), Some(2), None)))
        .expect_err("--strict refuses the dropped tensor")
        .to_string();
    assert!(e.contains("--strict") && e.contains("extra.weight"), "{e}");
}
