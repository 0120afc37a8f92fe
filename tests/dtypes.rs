//! BF16 and F16 round trips: a family in a half dtype merged with the
//! dtype kept gives tensors of that dtype (copies byte for byte, merged
//! values the f32 result rounded once); an output dtype override gives that
//! dtype everywhere and updates `config.json`'s `torch_dtype`.

use flatmerge::dtype::{encode_f32, Dtype};
use flatmerge_suite::{
    config, family, merge, read_tensors, report, rewrite_model, tempdir, tensor_map, Edit, SMALL,
};

fn torch_dtype(dir: &std::path::Path) -> String {
    let text =
        std::fs::read(dir.join("config.json")).expect("config.json copied beside the weights");
    let json: serde_json::Value = serde_json::from_slice(&text).expect("config.json is JSON");
    assert_eq!(
        json["model_type"], "llama",
        "the rest of config.json is kept"
    );
    json["torch_dtype"]
        .as_str()
        .expect("torch_dtype")
        .to_string()
}

#[test]
fn half_dtypes_are_kept_and_overrides_apply() {
    for (dtype, torch) in [
        (Dtype::BF16, "bfloat16"),
        (Dtype::F16, "float16"),
        (Dtype::F32, "float32"),
    ] {
        let tmp = tempdir();
        let fam = family(&tmp.path().join("family"), &SMALL, dtype, 1, 13);
        // lm_head only in the receiver: copied, so it must be A's bytes.
        let b = fam.contributors[0].clone();
        let staged = b.with_extension("new");
        rewrite_model(
            &b,
            &staged,
            None,
            |n, _| {
                if n == "lm_head.weight" {
                    Edit::Drop
                } else {
                    Edit::Keep
                }
            },
            vec![],
        );
        std::fs::remove_dir_all(&b).unwrap();
        std::fs::rename(&staged, &b).unwrap();

        let kept = tmp.path().join("kept");
        merge(config(&fam), &kept, None, None);
        let as_f32 = tmp.path().join("f32");
        let mut c = config(&fam);
        c.out_dtype = Some(Dtype::F32);
        merge(c, &as_f32, None, None);

        let a = tensor_map(&fam.receiver);
        let kept_tensors = read_tensors(&kept);
        let wide = tensor_map(&as_f32);
        assert_eq!(kept_tensors.len(), SMALL.tensors().len(), "{dtype}");
        for (name, t) in &kept_tensors {
            assert_eq!(t.dtype, dtype, "{name}: the input dtype is kept");
            assert_eq!(t.shape, a[name].shape, "{name}");
            let w = &wide[name];
            assert_eq!(w.dtype, Dtype::F32, "{name}: the override gives F32");
            // Computed in f32, rounded once to the output dtype.
            let mut rounded = vec![0u8; t.data.len()];
            encode_f32(dtype, &w.values(), &mut rounded);
            assert!(
                rounded == t.data,
                "{dtype} {name}: kept output ≠ F32 output rounded to {dtype}"
            );
        }
        let head = kept_tensors
            .iter()
            .find(|(n, _)| n == "lm_head.weight")
            .unwrap();
        assert!(
            head.1.data == a["lm_head.weight"].data,
            "{dtype}: a copied tensor keeps A's bytes"
        );
        assert!(
            wide["lm_head.weight"].values() == a["lm_head.weight"].values(),
            "{dtype}: copied and widened exactly"
        );

        assert_eq!(
            torch_dtype(&kept),
            torch,
            "{dtype}: config.json copied as it was"
        );
        assert_eq!(
            torch_dtype(&as_f32),
            "float32",
            "{dtype}: torch_dtype follows the override"
        );
        assert_eq!(report(&kept)["out_dtype"], serde_json::Value::Null);
        assert_eq!(report(&as_f32)["out_dtype"], "F32");
        let json = report(&kept);
        let head = json["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "lm_head.weight")
            .unwrap();
        assert_eq!(head["rule"], "copy");
        assert_eq!(head["reason"], "only_in_receiver");
        assert_eq!(head["in_dtype"], dtype.as_str());
        assert_eq!(head["out_dtype"], dtype.as_str());
    }
}

#[test]
fn f32_inputs_narrow_to_half_dtypes_with_torch_dtype_updated() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::F32, 1, 17);
    let wide = tmp.path().join("f32");
    merge(config(&fam), &wide, None, None);
    let wide = tensor_map(&wide);
    for (dtype, torch) in [(Dtype::BF16, "bfloat16"), (Dtype::F16, "float16")] {
        let out = tmp.path().join(torch);
        let mut c = config(&fam);
        c.out_dtype = Some(dtype);
        merge(c, &out, None, None);
        for (name, t) in read_tensors(&out) {
            assert_eq!(t.dtype, dtype, "{name}");
            let mut rounded = vec![0u8; t.data.len()];
            encode_f32(dtype, &wide[&name].values(), &mut rounded);
            assert!(
                rounded == t.data,
                "{name}: narrowed output ≠ F32 output rounded"
            );
        }
        assert_eq!(torch_dtype(&out), torch);
    }
}
