//! The output directory is what Python users load: `tests/python/readback.py`
//! reads it with the `safetensors` package and numpy (BF16 decoded from raw
//! bytes, numpy having no bfloat16), checks the index against the shards,
//! and prints a digest that must match what this crate reads.
//!
//! Needs `python3` with `numpy` and `safetensors` (`python3 -m pip install
//! numpy safetensors`). Without them the test says so on stderr and passes,
//! unless `FLATMERGE_REQUIRE_PYTHON` is set (CI sets it), where it fails.

use flatmerge::dtype::Dtype;
use flatmerge::io::INDEX_FILE;
use flatmerge_suite::{config, family, merge, read_tensors, tempdir, SMALL};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/readback.py");

#[path = "support/python_ready.rs"]
mod python_ready;

fn python_ready() -> bool {
    python_ready::python_ready("numpy, safetensors", "python read-back")
}

/// Runs the script on `dir`: `Ok(digest)` or `Err(stderr)`.
fn readback(dir: &Path) -> Result<Value, String> {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg(dir)
        .output()
        .expect("run python3");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the script prints JSON"))
}

/// Compares the digest with this crate's own reading of `dir`.
fn compare(dir: &Path, digest: &Value, dtype: Dtype) {
    let tensors = read_tensors(dir);
    let python = digest["tensors"].as_object().expect("tensors");
    assert_eq!(
        python.len(),
        tensors.len(),
        "{}: tensor count",
        dir.display()
    );
    for (name, t) in &tensors {
        let p = python
            .get(name)
            .unwrap_or_else(|| panic!("{name} not read by Python"));
        assert_eq!(t.dtype, dtype, "{name}");
        assert_eq!(p["dtype"], t.dtype.as_str(), "{name}");
        assert_eq!(p["shape"], serde_json::json!(t.shape), "{name}");
        let values = t.values();
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let abs_sum: f64 = values.iter().map(|&v| (v as f64).abs()).sum();
        let tolerance = 1e-9 * (abs_sum + 1.0);
        assert!(
            (p["sum"].as_f64().unwrap() - sum).abs() <= tolerance,
            "{name}: sum {} vs {sum}",
            p["sum"]
        );
        assert!(
            (p["abs_sum"].as_f64().unwrap() - abs_sum).abs() <= tolerance,
            "{name}: abs_sum"
        );
        let samples = p["samples"].as_array().unwrap();
        assert!(samples.len() >= 2, "{name}: samples");
        let size = t.dtype.size();
        for s in samples {
            let i = s[0].as_u64().unwrap() as usize;
            let raw = &t.data[i * size..(i + 1) * size];
            let bits = raw.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64);
            assert_eq!(s[2].as_u64().unwrap(), bits, "{name}[{i}]: raw bits");
            // The value is an exact f32, so its f64 rendering comes back to the same f32.
            assert_eq!(
                (s[1].as_f64().unwrap() as f32).to_bits(),
                values[i].to_bits(),
                "{name}[{i}]: value"
            );
        }
    }
    for (file, meta) in digest["metadata"].as_object().unwrap() {
        assert_eq!(meta["format"], "pt", "{file}: transformers needs format=pt");
        assert_eq!(meta["merge_method"], "safe_m", "{file}");
    }
}

#[test]
fn python_safetensors_reads_the_output_back() {
    if !python_ready() {
        return;
    }
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 41);
    let cases = [
        ("bf16-sharded", None, Some(8_000)),
        ("bf16-single", None, None),
        ("f16-single", Some(Dtype::F16), None),
        ("f32-sharded", Some(Dtype::F32), Some(20_000)),
    ];
    for (name, out_dtype, shard) in cases {
        let out = tmp.path().join(name);
        let mut c = config(&fam);
        c.out_dtype = out_dtype;
        merge(c, &out, None, shard);
        let digest =
            readback(&out).unwrap_or_else(|e| panic!("{name}: the Python readback failed: {e}"));
        assert_eq!(digest["index"], shard.is_some(), "{name}");
        if shard.is_some() {
            assert!(
                digest["files"].as_array().unwrap().len() > 1,
                "{name}: several shards"
            );
        }
        compare(&out, &digest, out_dtype.unwrap_or(Dtype::BF16));
    }

    // The script is not lenient: an index that puts a tensor in the wrong shard is refused.
    let broken = tmp.path().join("bf16-sharded");
    let index_path = broken.join(INDEX_FILE);
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    // lm_head is written last, so it is in the last shard, not the first.
    let files = shard_files(&broken);
    assert_eq!(
        index["weight_map"]["lm_head.weight"],
        files[files.len() - 1].as_str()
    );
    index["weight_map"]["lm_head.weight"] = files[0].clone().into();
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    let err = readback(&broken).expect_err("a wrong weight_map must fail the readback");
    assert!(
        err.starts_with("readback: ")
            && err.contains(INDEX_FILE)
            && err.trim().lines().count() == 1,
        "{err}"
    );
}

fn shard_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    files
}
