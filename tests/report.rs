//! `merge_report.json` (SPEC §6) on a family with every rule of SPEC §1.4:
//! SAFE-M, fallbacks for each reason, copies (only in A, shape differs
//! between A and B), and a tensor only in B (dropped). The report must name
//! the method and parameters, fingerprint the inputs, give each tensor its
//! rule and mask counts (kept = elected − conflicts), and count rules in a
//! summary that adds up to the tensors written.

use flatmerge::demo::DemoFamily;
use flatmerge::dtype::Dtype;
use flatmerge::select::elect_count;
use flatmerge::stats::{ActivationStats, LayerStats};
use flatmerge_suite::{
    config, family, merge, report, rewrite_model, tempdir, tensor_map, tensor_of, Edit, Tensor,
    SMALL,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const CONV: &str = "model.conv.weight";

fn replace_model(
    dir: &Path,
    edit: impl FnMut(&str, &Tensor) -> Edit,
    extra: Vec<(String, Tensor)>,
) {
    let staged = dir.with_extension("new");
    rewrite_model(dir, &staged, None, edit, extra);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::rename(&staged, dir).unwrap();
}

/// A SMALL family edited so that every rule of SPEC §1.4 occurs once.
fn edge_family(root: &Path) -> DemoFamily {
    let fam = family(root, &SMALL, Dtype::BF16, 1, 51);
    let conv = |seed: f32| {
        vec![(
            CONV.to_string(),
            tensor_of(Dtype::BF16, vec![4, 2, 2], &[seed; 16]),
        )]
    };
    // B: no lm_head (A's is copied), a norm of another shape (copied:
    // shape mismatch), and a tensor A lacks (dropped).
    replace_model(
        &fam.contributors[0],
        |name, t| match name {
            "lm_head.weight" => Edit::Drop,
            "model.layers.0.input_layernorm.weight" => {
                Edit::Replace(tensor_of(t.dtype, vec![16], &[1.0; 16]))
            }
            _ => Edit::Keep,
        },
        [
            conv(0.5),
            vec![(
                "extra.only_in_b.weight".to_string(),
                tensor_of(Dtype::BF16, vec![2], &[1.0, 2.0]),
            )],
        ]
        .concat(),
    );
    // C: one linear weight missing, one of another shape (both fall back).
    replace_model(
        &fam.ancestor,
        |name, t| match name {
            "model.layers.1.mlp.up_proj.weight" => Edit::Drop,
            "model.layers.1.mlp.gate_proj.weight" => Edit::Replace(tensor_of(
                t.dtype,
                vec![SMALL.hidden, SMALL.hidden],
                &vec![0.0; SMALL.hidden * SMALL.hidden],
            )),
            _ => Edit::Keep,
        },
        conv(0.25),
    );
    replace_model(&fam.receiver, |_, _| Edit::Keep, conv(1.0));
    // The conv kernel has statistics, but is not a linear layer: fallback.
    let stats_path = fam.dir.join("A.stats.safetensors");
    let mut stats = ActivationStats::load(&stats_path).unwrap();
    stats.layers.insert(
        "model.conv".into(),
        LayerStats {
            x_mean: Some(vec![1.0; 2]),
            y_mean: Some(vec![1.0; 4]),
            count: Some(1),
            ..LayerStats::default()
        },
    );
    stats.save(&stats_path).unwrap();
    fam
}

/// The rule and reason each tensor must get.
fn expected_rule(name: &str) -> (&'static str, Option<&'static str>) {
    match name {
        "lm_head.weight" => ("copy", Some("only_in_receiver")),
        "model.layers.0.input_layernorm.weight" => ("copy", Some("shape_mismatch")),
        "model.layers.1.mlp.up_proj.weight" => ("fallback", Some("missing_from_ancestor")),
        "model.layers.1.mlp.gate_proj.weight" => ("fallback", Some("ancestor_shape_differs")),
        CONV => ("fallback", Some("not_linear")),
        n if SMALL
            .tensors()
            .iter()
            .any(|(t, _, linear)| t == n && *linear) =>
        {
            ("safe_m_weight", None)
        }
        _ => ("fallback", Some("no_statistics")),
    }
}

#[test]
fn the_report_records_method_inputs_rules_and_counts() {
    let tmp = tempdir();
    let fam = edge_family(&tmp.path().join("family"));
    let out = tmp.path().join("out");
    let summary = merge(config(&fam), &out, None, None);
    let r = report(&out);
    assert_eq!(
        std::fs::read(out.join("merge_report.json")).unwrap(),
        summary.report.to_json_bytes()
    );

    assert_eq!(
        r["tool"],
        json!({"name": "flatmerge", "version": flatmerge::VERSION})
    );
    assert_eq!(r["method"], "safe_m");
    assert_eq!(
        r["parameters"],
        json!({
            "receiver": {"density": 0.2, "form": {"score": "sas", "alpha": 1.0}},
            "contributors": [{"density": 0.2, "form": {"score": "sas", "alpha": 1.0}, "lambda_proj": 1.0, "lambda_ortho": 0.5}],
            "fallback_weight": 0.5,
            "epsilon": 1e-8,
        })
    );
    assert_eq!(r["config_file"], fam.config.to_str().unwrap());
    assert_eq!(r["out_dtype"], Value::Null);

    // Inputs: role, path, statistics, one fingerprint per file.
    let inputs = r["inputs"].as_array().unwrap();
    let roles: Vec<&str> = inputs.iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["base", "receiver", "contributor"]);
    let mut hashes = Vec::new();
    for (input, (model, stats)) in inputs.iter().zip([("C", "C"), ("A", "A"), ("B", "B")]) {
        assert_eq!(input["path"], fam.dir.join(model).to_str().unwrap());
        assert_eq!(
            input["stats"],
            fam.dir
                .join(format!("{stats}.stats.safetensors"))
                .to_str()
                .unwrap()
        );
        let files = input["files"].as_array().unwrap();
        assert_eq!(files.len(), 1);
        let file = Path::new(files[0]["path"].as_str().unwrap());
        assert_eq!(file, fam.dir.join(model).join("model.safetensors"));
        assert_eq!(files[0]["size"], std::fs::metadata(file).unwrap().len());
        let hash = files[0]["header_sha256"].as_str().unwrap();
        assert!(
            hash.len() == 64
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{hash}"
        );
        hashes.push(hash.to_string());
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 3, "the three inputs have different headers");

    // Per tensor, in the receiver's order.
    let written = tensor_map(&out);
    let a = tensor_map(&fam.receiver);
    let b = tensor_map(&fam.contributors[0]);
    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), written.len());
    assert_eq!(tensors.len(), SMALL.tensors().len() + 1);
    let mut counted: BTreeMap<&str, u64> = BTreeMap::new();
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let (rule, reason) = expected_rule(name);
        assert_eq!(t["rule"], rule, "{name}");
        assert_eq!(t["reason"].as_str(), reason, "{name}");
        assert_eq!(t["shape"], json!(a[name].shape), "{name}");
        assert_eq!(
            (t["in_dtype"].as_str(), t["out_dtype"].as_str()),
            (Some("BF16"), Some("BF16")),
            "{name}"
        );
        let label = match (rule, reason) {
            ("safe_m_weight", _) => "safe_m",
            ("copy", Some("shape_mismatch")) => "shape_mismatch",
            ("copy", _) => "copied",
            _ => "fallback",
        };
        *counted.entry(label).or_default() += 1;
        match rule {
            "copy" => {
                assert_eq!(t["contributors"], json!([]), "{name}");
                let why = if reason == Some("shape_mismatch") {
                    "shape [16]"
                } else {
                    "missing"
                };
                assert_eq!(
                    t["excluded"],
                    json!([{"contributor": 0, "why": why}]),
                    "{name}"
                );
                assert!(written[name].data == a[name].data, "{name}: copied from A");
            }
            "fallback" => {
                assert_eq!(t["contributors"], json!([0]), "{name}");
                assert!(
                    t.get("masks").is_none() && t.get("receiver").is_none(),
                    "{name}: no masks"
                );
                let expected: Vec<f32> = a[name]
                    .values()
                    .iter()
                    .zip(b[name].values())
                    .map(|(x, y)| 0.5 * x + 0.5 * y)
                    .collect();
                assert_eq!(
                    written[name],
                    tensor_of(Dtype::BF16, a[name].shape.clone(), &expected),
                    "{name}"
                );
            }
            _ => {
                assert_eq!(t["layer"], name.trim_end_matches(".weight"), "{name}");
                let n = a[name].numel() as u64;
                let m = elect_count(0.2, n as usize) as u64;
                let receiver = &t["receiver"];
                assert!(receiver["threshold"].as_f64().unwrap() > 0.0, "{name}");
                let receiver_elected = receiver["elected"].as_u64().unwrap();
                assert!(
                    (m..=n).contains(&receiver_elected),
                    "{name}: receiver elected {receiver_elected} of {n}"
                );
                let masks = t["masks"].as_array().unwrap();
                assert_eq!(masks.len(), 1, "{name}");
                let mask = &masks[0];
                assert_eq!(mask["contributor"], 0);
                assert!(mask["threshold"].as_f64().unwrap() > 0.0, "{name}");
                let (elected, conflicts, kept) = (
                    mask["elected"].as_u64().unwrap(),
                    mask["conflicts"].as_u64().unwrap(),
                    mask["kept"].as_u64().unwrap(),
                );
                assert!(
                    (m..=n).contains(&elected),
                    "{name}: elected {elected} of {n} (m = {m})"
                );
                assert!(conflicts <= elected.min(receiver_elected), "{name}");
                assert_eq!(
                    kept,
                    elected - conflicts,
                    "{name}: kept = elected − conflicts"
                );
            }
        }
    }
    assert!(
        !written.contains_key("extra.only_in_b.weight"),
        "a tensor only in B is dropped"
    );
    assert_eq!(
        r["dropped"],
        json!([{"contributor": 0, "name": "extra.only_in_b.weight"}])
    );

    // The summary counts every rule and adds up to the tensors written.
    let summary_json = r["summary"].as_object().unwrap();
    for label in ["safe_m", "fallback", "copied", "shape_mismatch"] {
        assert_eq!(
            summary_json[label],
            counted.get(label).copied().unwrap_or(0),
            "summary {label}"
        );
    }
    assert_eq!(summary_json["dropped"], 1);
    // Every label but `dropped` counts written tensors (other methods' labels are 0 here).
    let total: u64 = summary_json
        .iter()
        .filter(|(label, _)| *label != "dropped")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, written.len());
    assert_eq!(summary_json["safe_m"], 7 * SMALL.layers - 2);
    assert_eq!(summary_json["copied"], 1);
    assert_eq!(summary_json["shape_mismatch"], 1);

    assert_eq!(r["copied_files"], json!(["config.json"]));
    let data_bytes: usize = written.values().map(|t| t.data.len()).sum();
    assert_eq!(
        r["shards"],
        json!([{"file": "model.safetensors", "tensors": written.len(), "bytes": data_bytes}])
    );

    // The CLI's totals come from the same numbers.
    let (elements, totals) = summary.report.mask_totals();
    let safe_m_elements: u64 = tensors
        .iter()
        .filter(|t| t["rule"] == "safe_m_weight")
        .map(|t| a[t["name"].as_str().unwrap()].numel() as u64)
        .sum();
    assert_eq!(elements, safe_m_elements);
    let kept: u64 = tensors
        .iter()
        .filter_map(|t| t["masks"][0]["kept"].as_u64())
        .sum();
    assert_eq!(totals[0].kept, kept);
}

/// Hugging Face's hub cache lays a model out as symlinks into a blob store
/// (`snapshots/<rev>/config.json -> ../../blobs/<sha>`), and users point
/// tools at the snapshot. The weights open through the links; the side
/// files a loader needs (`config.json`, tokenizer files) must be copied
/// through them too, or the output cannot be loaded.
#[cfg(unix)]
#[test]
fn side_files_behind_symlinks_are_copied_like_hf_cache_snapshots() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 57);
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    for (name, blob) in [
        ("config.json", "c0ffee"),
        ("model.safetensors", "5afe"),
        ("tokenizer.json", "70ce"),
    ] {
        let link = fam.receiver.join(name);
        if !link.exists() {
            std::fs::write(&link, "{\"version\": \"1.0\"}\n").unwrap();
        }
        std::fs::rename(&link, blobs.join(blob)).unwrap();
        std::os::unix::fs::symlink(blobs.join(blob), &link).unwrap();
    }
    let out = tmp.path().join("out");
    merge(config(&fam), &out, None, None);
    let r = report(&out);
    assert!(
        out.join("config.json").is_file(),
        "config.json behind a symlink was not copied"
    );
    assert!(
        out.join("tokenizer.json").is_file(),
        "tokenizer.json behind a symlink was not copied"
    );
    assert_eq!(r["copied_files"], json!(["config.json", "tokenizer.json"]));
    assert!(
        !out.join("config.json").is_symlink(),
        "copied as a file, not as a link into the cache"
    );
}
