//! LoRA references (`model: path+adapter`, mergekit's syntax) applied
//! tensor by tensor while merging: the output equals merging the
//! explicitly materialised model `W + s·B·A` bit for bit (task arithmetic, TIES with
//! its sampled selection, passthrough, 1 and 2 threads), the scale follows
//! `lora_alpha / r`, rsLoRA's `lora_alpha / √r` and `alpha_pattern`, and
//! adapters that do not fit the model are one clear error naming the file.

use flatmerge::dtype::Dtype;
use flatmerge::io::Checkpoint;
use flatmerge_suite::{
    f32_tensors, leftovers, tempdir, tensor_of, try_merge_yaml, write_f32_model, write_model,
};
use std::collections::BTreeMap;
use std::path::Path;

/// A weight big enough for the sampled TIES selection (≥ 4·2¹⁴ elements).
const BIG: (&str, [usize; 2]) = ("model.layers.0.mlp.up_proj.weight", [256, 320]);
const SMALL: (&str, [usize; 2]) = ("model.layers.0.self_attn.q_proj.weight", [12, 10]);
const NORM: &str = "model.layers.0.input_layernorm.weight";

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

fn model(dir: &Path, name: &str, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut tensors = BTreeMap::new();
    for (i, (t, shape)) in [BIG, SMALL].into_iter().enumerate() {
        let n = shape[0] * shape[1];
        tensors.insert(
            t.to_string(),
            (shape.to_vec(), values(seed * 10 + i as u64, n)),
        );
    }
    tensors.insert(NORM.to_string(), (vec![10], values(seed * 10 + 7, 10)));
    write(dir, name, &tensors);
    tensors
}

fn write(dir: &Path, name: &str, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, (s, v))| (n.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32_model(&dir.join(name), &list);
}

/// A PEFT adapter for `BIG` (rank 4) and `SMALL` (rank 2 through
/// `rank_pattern`), factors in bf16 as PEFT usually saves them; returns
/// each weight's factors (A, B, as bf16-rounded f32) and its scale.
fn adapter(
    dir: &Path,
    name: &str,
    config_extra: &str,
) -> BTreeMap<String, (Vec<f32>, Vec<f32>, usize)> {
    let mut factors = BTreeMap::new();
    let mut tensors = Vec::new();
    for (i, ((t, [out, cols]), r)) in [(BIG, 4usize), (SMALL, 2)].into_iter().enumerate() {
        let round = |v: Vec<f32>| -> Vec<f32> {
            let mut bytes = vec![0u8; 2 * v.len()];
            flatmerge::dtype::encode_f32(Dtype::BF16, &v, &mut bytes);
            let mut out = vec![0f32; v.len()];
            flatmerge::dtype::decode_f32(Dtype::BF16, &bytes, &mut out);
            out
        };
        let a = round(values(100 + i as u64, r * cols));
        let b = round(values(200 + i as u64, out * r));
        let module = t.strip_suffix(".weight").unwrap();
        tensors.push((
            format!("base_model.model.{module}.lora_A.weight"),
            tensor_of(Dtype::BF16, vec![r, cols], &a),
        ));
        tensors.push((
            format!("base_model.model.{module}.lora_B.weight"),
            tensor_of(Dtype::BF16, vec![out, r], &b),
        ));
        factors.insert(t.to_string(), (a, b, r));
    }
    let path = dir.join(name);
    write_model(&path, &tensors, None);
    std::fs::rename(
        path.join("model.safetensors"),
        path.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        path.join("adapter_config.json"),
        format!(
            "{{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"up_proj\", \"q_proj\"], \"rank_pattern\": {{\"q_proj\": 2}}, \"bias\": \"none\"{config_extra}}}"
        ),
    )
    .unwrap();
    factors
}

/// `W + s·B·A` with the sum over the rank taken in order from zero.
fn materialise(
    weights: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    factors: &BTreeMap<String, (Vec<f32>, Vec<f32>, usize)>,
    scale: impl Fn(&str, usize) -> f32,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = weights.clone();
    for (name, (a, b, r)) in factors {
        let (shape, w) = out.get_mut(name).unwrap();
        let cols = shape[1];
        let s = scale(name, *r);
        for (idx, value) in w.iter_mut().enumerate() {
            let (i, j) = (idx / cols, idx % cols);
            let mut acc = 0.0f32;
            for k in 0..*r {
                acc += b[i * r + k] * a[k * cols + j];
            }
            *value += s * acc;
        }
    }
    out
}

fn bits(m: &BTreeMap<String, Vec<f32>>) -> BTreeMap<String, Vec<u32>> {
    m.iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[test]
fn a_lora_reference_merges_like_the_materialised_model() {
    let dir = tempdir();
    model(dir.path(), "C", 1);
    model(dir.path(), "B", 2);
    let a = model(dir.path(), "A", 3);
    let factors = adapter(dir.path(), "lora", "");
    // alpha / r: 8 / 4 for up_proj, 8 / 2 for q_proj (its rank_pattern).
    write(
        dir.path(),
        "A_merged",
        &materialise(&a, &factors, |_, r| 8.0 / r as f32),
    );
    for (method, params) in [
        ("task_arithmetic", "    parameters:\n      weight: 0.7\n"),
        (
            "ties",
            "    parameters:\n      weight: 1.0\n      density: 0.3\n",
        ),
    ] {
        let yaml = |a: &str| {
            format!(
                "merge_method: {method}\nbase_model: ./C\nmodels:\n  - model: {a}\n{params}  - model: ./B\n{params}dtype: float32\n"
            )
        };
        try_merge_yaml(
            dir.path(),
            &yaml("./A_merged"),
            0,
            Some(2),
            &dir.path().join("want"),
        )
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        for threads in [1, 2] {
            let out = dir.path().join(format!("got{threads}"));
            try_merge_yaml(dir.path(), &yaml("./A+./lora"), 0, Some(threads), &out)
                .unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(
                bits(&f32_tensors(&out)),
                bits(&f32_tensors(&dir.path().join("want"))),
                "{method} on {threads} thread(s)"
            );
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("merge_report.json")).unwrap())
                    .unwrap();
            let lora = report["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|i| i["lora"].as_str())
                .collect::<Vec<_>>();
            assert_eq!(lora.len(), 1, "the report names the adapter");
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_dir_all(dir.path().join("want")).unwrap();
    }
    // passthrough of the adapted model alone is the materialised model.
    let out = dir.path().join("alone");
    try_merge_yaml(
        dir.path(),
        "merge_method: passthrough\nmodels:\n  - model: ./A+./lora\ndtype: float32\n",
        0,
        Some(2),
        &out,
    )
    .unwrap();
    assert_eq!(
        bits(&f32_tensors(&out)),
        bits(&f32_tensors(&dir.path().join("A_merged")))
    );
}

#[test]
fn rslora_and_alpha_pattern_set_the_scale() {
    let dir = tempdir();
    model(dir.path(), "A", 3);
    adapter(
        dir.path(),
        "lora",
        ", \"use_rslora\": true, \"alpha_pattern\": {\"layers\\\\.0\\\\.self_attn\\\\.q_proj\": 3}",
    );
    let a = Checkpoint::open(&dir.path().join("A"))
        .unwrap()
        .with_adapter(&dir.path().join("lora"))
        .unwrap();
    let scale = |name: &str| a.view(name).unwrap().lora.unwrap().scale();
    assert_eq!(scale(BIG.0), 8.0 / 2.0, "alpha / √4");
    assert_eq!(
        scale(SMALL.0),
        (3.0 / 2f64.sqrt()) as f32,
        "alpha_pattern 3 / √2"
    );
    assert!(a.view(NORM).unwrap().lora.is_none());
    assert_eq!(a.adapter().unwrap().len(), 2);
}

#[test]
fn adapters_that_do_not_fit_the_model_are_one_clear_error() {
    let dir = tempdir();
    model(dir.path(), "C", 1);
    model(dir.path(), "A", 3);
    adapter(dir.path(), "good", "");
    let config = |lora: &str| {
        format!("merge_method: linear\nmodels:\n  - model: ./A+./{lora}\n    parameters:\n      weight: 1.0\n  - model: ./C\n    parameters:\n      weight: 1.0\n")
    };
    let edit_config = |name: &str, from: &str, to: &str| {
        let src = dir.path().join("good");
        let dst = dir.path().join(name);
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dst.join("adapter_model.safetensors"),
        )
        .unwrap();
        let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
        assert!(text.contains(from));
        std::fs::write(dst.join("adapter_config.json"), text.replace(from, to)).unwrap();
    };
    edit_config("dora", "\"bias\"", "\"use_dora\": true, \"bias\"");
    edit_config("target", "\"q_proj\"]", "\"q_proj\", \"o_proj\"]");
    edit_config("rank", "\"q_proj\": 2", "\"q_proj\": 3");
    // An adapter of another model: its up_proj is wider.
    let other = tempdir();
    let mut wide = BTreeMap::new();
    wide.insert(BIG.0.to_string(), (vec![256, 321], values(5, 256 * 321)));
    wide.insert(SMALL.0.to_string(), (SMALL.1.to_vec(), values(6, 120)));
    write(other.path(), "W", &wide);
    let mut tensors = Vec::new();
    for (module, shape) in [
        ("model.layers.0.mlp.up_proj", [4, 321]),
        ("model.layers.0.mlp.up_proj", [256, 4]),
    ] {
        let which = if shape[0] == 4 { "A" } else { "B" };
        tensors.push((
            format!("base_model.model.{module}.lora_{which}.weight"),
            tensor_of(Dtype::F32, shape.to_vec(), &values(9, shape[0] * shape[1])),
        ));
    }
    write_model(&dir.path().join("wide"), &tensors, None);
    std::fs::write(
        dir.path().join("wide/adapter_config.json"),
        "{\"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"up_proj\"]}",
    )
    .unwrap();
    for (lora, needle) in [
        ("dora", "use_dora"),
        ("target", "`o_proj` matches no linear layer"),
        ("rank", "has rank 2, but adapter_config.json says 3"),
        ("wide", "do not fit `model.layers.0.mlp.up_proj.weight`"),
        ("missing", "no adapter_config.json"),
    ] {
        let out = dir.path().join("never");
        let e = try_merge_yaml(dir.path(), &config(lora), 0, Some(1), &out)
            .err()
            .unwrap_or_else(|| panic!("{lora} accepted"));
        let text = e.to_string();
        assert!(text.contains(needle), "{lora}: {text}");
        assert!(
            text.contains(lora),
            "{lora}: names the adapter's file: {text}"
        );
        assert!(!out.exists() && leftovers(dir.path()).is_empty());
    }
    // A method that runs whole models on a probe set cannot take one.
    let e = flatmerge::config::MergeConfig::from_yaml(
        "merge_method: regmean_plusplus\nprobe_set: ./p.jsonl\nmodels:\n  - model: ./A+./good\n  - model: ./C\n",
        dir.path(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("LoRA reference"), "{e}");
}
