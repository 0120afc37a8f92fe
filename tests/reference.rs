//! The streaming engine (memory-mapped inputs, row chunks, parallel
//! thresholds) agrees bit for bit with the in-memory reference
//! `flatmerge::safe_m::merge_tensor` on every SAFE-M tensor, and fallback
//! tensors are `(1 − w)·A + w·mean(B)` (SPEC §1.4), on generated families.

use flatmerge::config::MergeConfig;
use flatmerge::demo::{DemoFamily, LlamaShape, Rng};
use flatmerge::dtype::Dtype;
use flatmerge::io::Checkpoint;
use flatmerge::plan::TensorRule;
use flatmerge::safe_m::{merge_tensor, Contributor, ScoreForm};
use flatmerge::stats::ActivationStats;
use flatmerge_suite::{
    config, edit_config, family, merge, report, rewrite_model, tempdir, tensor_map, tensor_of,
    Edit, Tensor, CHUNKED, SMALL,
};
use std::collections::BTreeMap;
use std::path::Path;

/// Gives every model of the family a bias on each `q_proj` (SAFE-M treats
/// it with the layer's `ȳ`, SPEC §1.3 last line): `C`'s random, the others
/// `C`'s plus their own drift.
fn add_q_biases(fam: &DemoFamily, shape: &LlamaShape, dtype: Dtype) {
    let mut models = vec![fam.ancestor.clone(), fam.receiver.clone()];
    models.extend(fam.contributors.iter().cloned());
    for (m, dir) in models.iter().enumerate() {
        let extra: Vec<(String, Tensor)> = (0..shape.layers)
            .map(|l| {
                let name = format!("model.layers.{l}.self_attn.q_proj.bias");
                let base = Rng::new(11, &name).normals(shape.hidden, 0.05);
                let drift = Rng::new(12 + m as u64, &name).normals(shape.hidden, 0.01);
                let values: Vec<f32> = base
                    .iter()
                    .zip(&drift)
                    .map(|(b, d)| if m == 0 { *b } else { b + d })
                    .collect();
                (name, tensor_of(dtype, vec![shape.hidden], &values))
            })
            .collect();
        let staged = dir.with_extension("new");
        rewrite_model(dir, &staged, None, |_, _| Edit::Keep, extra);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::rename(&staged, dir).unwrap();
    }
}

fn load_stats(path: &Path) -> ActivationStats {
    ActivationStats::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn values(checkpoint: &Checkpoint, name: &str) -> Vec<f32> {
    checkpoint
        .view(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_f32_vec()
}

/// Merges `config` with F32 output and checks every tensor against the
/// reference; returns how many SAFE-M, fallback and copied tensors were checked.
fn check_against_reference(mut config: MergeConfig, out: &Path) -> (usize, usize, usize) {
    config.out_dtype = Some(Dtype::F32);
    let settings = config.safe_m().unwrap().clone();
    let summary = merge(config.clone(), out, Some(2), None);
    let merged = tensor_map(out);
    let report_json = report(out);

    let open = |p: &Path| Checkpoint::open(p).unwrap();
    let receiver = open(&config.models[0].path);
    let ancestor = open(&config.base.as_ref().unwrap().path);
    let contributors: Vec<Checkpoint> = config.models[1..].iter().map(|m| open(&m.path)).collect();
    let receiver_stats = load_stats(config.models[0].stats.as_ref().unwrap());
    let ancestor_stats = load_stats(config.base.as_ref().unwrap().stats.as_ref().unwrap());
    let contributor_stats: Vec<ActivationStats> = config.models[1..]
        .iter()
        .map(|m| load_stats(m.stats.as_ref().unwrap()))
        .collect();

    let (mut safe_m, mut fallback, mut copied) = (0, 0, 0);
    for (index, tensor) in summary.report.tensors.iter().enumerate() {
        let name = &tensor.plan.name;
        let got = &merged[name];
        assert_eq!(got.dtype, Dtype::F32, "{name}");
        assert_eq!(got.shape, tensor.plan.shape, "{name}");
        let got = got.values();
        let a = values(&receiver, name);
        // Only the contributors the plan lets take part (SPEC §1.4: a
        // contributor lacking the tensor, or with another shape, is left out).
        let ks = &tensor.plan.contributors;
        let bs: Vec<Vec<f32>> = ks.iter().map(|&k| values(&contributors[k], name)).collect();
        match &tensor.plan.rule {
            TensorRule::SafeMWeight { layer } | TensorRule::SafeMBias { layer } => {
                safe_m += 1;
                let is_bias = matches!(tensor.plan.rule, TensorRule::SafeMBias { .. });
                let y = |s: &ActivationStats| s.layer(layer).unwrap().y_mean.clone().unwrap();
                let x_mean = if is_bias {
                    Vec::new()
                } else {
                    receiver_stats.layer(layer).unwrap().x_mean.clone().unwrap()
                };
                let ys: Vec<Vec<f32>> = ks.iter().map(|&k| y(&contributor_stats[k])).collect();
                let refs: Vec<Contributor<'_>> = ks
                    .iter()
                    .map(|&k| &settings.contributors[k])
                    .zip(&bs)
                    .zip(&ys)
                    .map(|((c, weight), y_mean)| Contributor {
                        weight,
                        y_mean,
                        election: c.election,
                        lambda_proj: c.lambda_proj,
                        lambda_ortho: c.lambda_ortho,
                    })
                    .collect();
                let expected = merge_tensor(
                    &a,
                    &y(&receiver_stats),
                    settings.receiver,
                    &values(&ancestor, name),
                    &y(&ancestor_stats),
                    &x_mean,
                    &refs,
                    is_bias,
                    settings.epsilon,
                );
                let mismatches = got
                    .iter()
                    .zip(&expected.values)
                    .filter(|(g, e)| g.to_bits() != e.to_bits())
                    .count();
                assert_eq!(
                    mismatches,
                    0,
                    "{name}: {mismatches} of {} elements differ from merge_tensor",
                    got.len()
                );
                // The report's counts are the reference's.
                let json = &report_json["tensors"][index];
                assert_eq!(json["name"], name.as_str());
                for (k, counts) in expected.counts.iter().enumerate() {
                    let mask = &json["masks"][k];
                    assert_eq!(mask["contributor"], ks[k], "{name}");
                    assert_eq!(mask["elected"], counts.elected, "{name} contributor {k}");
                    assert_eq!(
                        mask["conflicts"], counts.conflicts,
                        "{name} contributor {k}"
                    );
                    assert_eq!(mask["kept"], counts.kept, "{name} contributor {k}");
                    assert_eq!(
                        json["receiver"]["elected"], counts.receiver_elected,
                        "{name}"
                    );
                }
                // Something was merged at all (the fixture has real task vectors).
                assert!(
                    expected.counts.iter().all(|c| c.kept > 0),
                    "{name}: nothing kept"
                );
                assert!(
                    got.iter().zip(&a).any(|(g, a)| g != a),
                    "{name}: equal to the receiver"
                );
            }
            TensorRule::Fallback { .. } => {
                fallback += 1;
                let w = settings.fallback_weight;
                let m = bs.len() as f32;
                for (i, (&g, &a)) in got.iter().zip(&a).enumerate() {
                    let mut sum = 0.0f32;
                    for b in &bs {
                        sum += b[i];
                    }
                    let expected = (1.0 - w) * a + w * (sum / m);
                    assert_eq!(
                        g.to_bits(),
                        expected.to_bits(),
                        "{name}[{i}]: {g} ≠ (1−w)·A + w·mean(B) = {expected}"
                    );
                }
            }
            TensorRule::Copy { .. } => {
                copied += 1;
                assert!(got == a, "{name}: copied from A");
            }
            other => panic!("{name}: a SAFE-M merge planned the rule {other:?}"),
        }
    }
    (safe_m, fallback, copied)
}

#[test]
fn engine_matches_merge_tensor_with_two_contributors_and_per_model_settings() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &CHUNKED, Dtype::BF16, 2, 21);
    add_q_biases(&fam, &CHUNKED, Dtype::BF16);
    let config = edit_config(&fam, |text| {
        text.replace(
            "    stats: ./B2.stats.safetensors\n",
            "    stats: ./B2.stats.safetensors\n    parameters:\n      density: 0.5\n      score: ratio\n      lambda_ortho: 0.25\n",
        )
        .replace("density: 0.2", "density: 0.35")
        .replace("alpha: 1.0", "alpha: 0.5")
        .replace("fallback_weight: 0.5", "fallback_weight: 0.3")
    });
    let s = config.safe_m().unwrap();
    assert_eq!(s.receiver.density, 0.35);
    assert_eq!(s.receiver.form, ScoreForm::Sas { alpha: 0.5 });
    assert_eq!(s.contributors[1].election.density, 0.5);
    assert!(matches!(
        s.contributors[1].election.form,
        ScoreForm::Ratio { .. }
    ));
    assert_eq!(
        (
            s.contributors[0].lambda_ortho,
            s.contributors[1].lambda_ortho
        ),
        (0.5, 0.25)
    );
    assert_eq!(s.fallback_weight, 0.3);

    let counts = check_against_reference(config, &tmp.path().join("out"));
    // 7 linear weights and one q_proj bias per layer; embeddings, lm_head and norms fall back.
    assert_eq!(counts, (8 * CHUNKED.layers, 3 + 2 * CHUNKED.layers, 0));
}

#[test]
fn engine_matches_merge_tensor_on_f16_and_f32_inputs() {
    for (seed, dtype) in [(5, Dtype::F16), (6, Dtype::F32)] {
        let tmp = tempdir();
        let fam = family(&tmp.path().join("family"), &SMALL, dtype, 1, seed);
        let counts = check_against_reference(config(&fam), &tmp.path().join("out"));
        assert_eq!(
            counts,
            (7 * SMALL.layers, 3 + 2 * SMALL.layers, 0),
            "{dtype}"
        );
    }
}

/// Re-writes the model directory `dir` in place with `edit`.
fn replace_model(dir: &Path, edit: impl FnMut(&str, &Tensor) -> Edit) {
    let staged = dir.with_extension("new");
    rewrite_model(dir, &staged, None, edit, vec![]);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::rename(&staged, dir).unwrap();
}

/// `t` converted to `dtype`.
fn as_dtype(t: &Tensor, dtype: Dtype) -> Tensor {
    tensor_of(dtype, t.shape.clone(), &t.values())
}

#[test]
fn partial_participation_and_mixed_input_dtypes_match_the_reference() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 2, 61);
    let q = "model.layers.0.self_attn.q_proj.weight";
    let norm = "model.norm.weight";
    let head = "lm_head.weight";
    // B lacks q_proj: B2 alone gives it, with B2's own settings (contributor 1).
    replace_model(&fam.contributors[0], |n, _| {
        if n == q {
            Edit::Drop
        } else {
            Edit::Keep
        }
    });
    // B2 is F16, and its final norm has another shape: B alone blends it.
    replace_model(&fam.contributors[1], |n, t| {
        if n == norm {
            Edit::Replace(tensor_of(Dtype::F16, vec![16], &[1.0; 16]))
        } else {
            Edit::Replace(as_dtype(t, Dtype::F16))
        }
    });
    // C is F32; B and B2 both lack lm_head: A's is copied.
    replace_model(&fam.ancestor, |_, t| Edit::Replace(as_dtype(t, Dtype::F32)));
    replace_model(&fam.contributors[0], |n, _| {
        if n == head {
            Edit::Drop
        } else {
            Edit::Keep
        }
    });
    replace_model(&fam.contributors[1], |n, _| {
        if n == head {
            Edit::Drop
        } else {
            Edit::Keep
        }
    });
    let config = edit_config(&fam, |text| {
        text.replace(
            "    stats: ./B2.stats.safetensors\n",
            "    stats: ./B2.stats.safetensors\n    parameters:\n      density: 0.5\n      lambda_proj: 0.75\n",
        )
        .replace("fallback_weight: 0.5", "fallback_weight: 0.25")
    });
    let out = tmp.path().join("out");
    let counts = check_against_reference(config, &out);
    assert_eq!(counts, (7 * SMALL.layers, 2 + 2 * SMALL.layers, 1));
    let r = report(&out);
    let entry = |name: &str| {
        r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(entry(q)["contributors"], serde_json::json!([1]));
    assert_eq!(entry(q)["masks"][0]["contributor"], 1);
    assert_eq!(
        entry(q)["excluded"],
        serde_json::json!([{"contributor": 0, "why": "missing"}])
    );
    assert_eq!(entry(norm)["contributors"], serde_json::json!([0]));
    assert_eq!(
        entry(norm)["excluded"],
        serde_json::json!([{"contributor": 1, "why": "shape [16]"}])
    );
    assert_eq!(entry(head)["rule"], "copy");
    let other = entry("model.layers.1.self_attn.q_proj.weight");
    assert_eq!(other["contributors"], serde_json::json!([0, 1]));
    assert_eq!(other["masks"].as_array().unwrap().len(), 2);
}

#[test]
fn per_contributor_masks_give_the_sum_of_single_contributor_merges() {
    // SPEC §1.5: W* = W_A + Σ_k (λ_proj P_k + λ_ortho O_k), each P_k, O_k
    // from the contributor's own mask against A. So the two-contributor
    // delta equals the sum of the one-contributor deltas (up to f32
    // rounding of the sum).
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::F32, 2, 9);
    let both = config(&fam);
    let only = |skip: &str| {
        let mut c = both.clone();
        let keep: Vec<usize> = (0..c.models.len())
            .filter(|&i| i == 0 || !c.models[i].path.ends_with(skip))
            .collect();
        c.models = keep.iter().map(|&i| c.models[i].clone()).collect();
        if let flatmerge::config::MethodSettings::SafeM(s) = &mut c.settings {
            s.contributors = keep[1..].iter().map(|&i| s.contributors[i - 1]).collect();
        }
        c
    };
    merge(both.clone(), &tmp.path().join("both"), None, None);
    merge(only("B2"), &tmp.path().join("b"), None, None);
    merge(only("B"), &tmp.path().join("b2"), None, None);
    let a: BTreeMap<String, Tensor> = tensor_map(&fam.receiver);
    let (m_both, m_b, m_b2) = (
        tensor_map(&tmp.path().join("both")),
        tensor_map(&tmp.path().join("b")),
        tensor_map(&tmp.path().join("b2")),
    );
    let mut checked = 0;
    for (name, _, linear) in SMALL.tensors() {
        if !linear {
            continue;
        }
        let base = a[&name].values();
        let (x, y, z) = (
            m_both[&name].values(),
            m_b[&name].values(),
            m_b2[&name].values(),
        );
        for i in 0..base.len() {
            let sum = (y[i] - base[i]) + (z[i] - base[i]);
            let delta = x[i] - base[i];
            assert!(
                (delta - sum).abs() <= 1e-6 * (1.0 + base[i].abs()),
                "{name}[{i}]: {delta} vs {sum}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7 * SMALL.layers);
    // The reports agree on each contributor's own mask.
    let (r_both, r_b, r_b2) = (
        report(&tmp.path().join("both")),
        report(&tmp.path().join("b")),
        report(&tmp.path().join("b2")),
    );
    for (i, t) in r_both["tensors"].as_array().unwrap().iter().enumerate() {
        if t["rule"] != "safe_m_weight" {
            continue;
        }
        assert_eq!(t["masks"][0]["kept"], r_b["tensors"][i]["masks"][0]["kept"]);
        assert_eq!(
            t["masks"][1]["kept"],
            r_b2["tensors"][i]["masks"][0]["kept"]
        );
    }
}
