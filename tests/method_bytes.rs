//! Every registered method's documented example (`tests/method_examples/`)
//! merged on a small generated family, with the SHA-256 of the output
//! tensors, of `config.json` and of the report's per-tensor rules and
//! parameters compared against `tests/method_examples/digests.txt`.
//!
//! The digests were written by the binary before the method registry
//! existed (`FLATMERGE_BLESS=1 cargo test --test method_bytes` rewrites
//! them): the move into `core/src/methods/` changed no output byte. A new
//! method adds its example and its digest line; the test fails for a
//! registered method without both.

use flatmerge::config::MergeConfig;
use flatmerge::demo::{write_family, write_heterogeneous_pair, LlamaShape, PairShape};
use flatmerge::dtype::Dtype;
use flatmerge::engine::PreparedMerge;
use flatmerge::probe::set::write_probe_set;
use flatmerge::probe::ProbeExample;
use flatmerge_suite::{options, report, tempdir};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SHAPE: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 4,
};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/method_examples")
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `example → digest` of one merge: the output tensors, `config.json`, and
/// the report's `tensors` and `parameters` (paths and versions left out).
fn digest(dir: &Path, example: &str) -> String {
    let config_path = dir.join(format!("example-{example}"));
    std::fs::copy(examples_dir().join(example), &config_path).expect("copy the example");
    let config = MergeConfig::from_file(&config_path)
        .unwrap_or_else(|e| panic!("{example} does not load: {e}"));
    let out = dir.join(format!("out-{example}"));
    PreparedMerge::new(config)
        .and_then(|p| p.run(&options(&out, Some(2), None)))
        .unwrap_or_else(|e| panic!("{example} does not merge: {e}"));
    let mut hasher = Sha256::new();
    for file in ["model.safetensors", "config.json"] {
        let bytes =
            std::fs::read(out.join(file)).unwrap_or_else(|e| panic!("{example}: {file}: {e}"));
        hasher.update(hex(&bytes));
    }
    let json = report(&out);
    hasher.update(json["tensors"].to_string());
    hasher.update(json["parameters"].to_string());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `M.gram.stats.safetensors` for least-squares examples: each layer of
/// `M.stats.safetensors` with the synthetic Gram `x̄ x̄ᵀ + 0.1·I` (positive
/// definite, derived from the family's own statistics).
fn write_gram_statistics(dir: &Path, models: &[&str]) {
    for m in models {
        let mut stats =
            flatmerge::stats::ActivationStats::load(&dir.join(format!("{m}.stats.safetensors")))
                .expect("family statistics");
        for layer in stats.layers.values_mut() {
            if let Some(x) = layer.x_mean.clone() {
                let n = x.len();
                let mut gram = vec![0f32; n * n];
                for i in 0..n {
                    for j in 0..n {
                        gram[i * n + j] = x[i] * x[j] + if i == j { 0.1 } else { 0.0 };
                    }
                }
                layer.x_gram = Some(flatmerge::stats::Gram::new(gram));
            }
        }
        stats
            .save(&dir.join(format!("{m}.gram.stats.safetensors")))
            .expect("save");
    }
}

/// A probe set of token sequences for the methods that run the family
/// through the native LLaMA probe themselves (`regmean_plusplus`).
fn write_token_probe_set(path: &Path) {
    let examples: Vec<ProbeExample> = (0..6u32)
        .map(|i| {
            ProbeExample::tokens(
                (0..5)
                    .map(|t| (i * 7 + t * 3) % SHAPE.vocab as u32)
                    .collect(),
            )
        })
        .collect();
    write_probe_set(path, &examples).expect("probe set");
}

#[test]
fn every_method_example_gives_the_recorded_bytes() {
    let dir = tempdir();
    write_family(dir.path(), &SHAPE, Dtype::BF16, 2, 3).expect("write the family");
    write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 7).expect("write the pair");
    write_gram_statistics(dir.path(), &["A", "B", "mplug-owl2", "llava-1.5"]);
    write_token_probe_set(&dir.path().join("probe.jsonl"));
    let mut examples: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    examples.sort();
    let digests: BTreeMap<String, String> = examples
        .iter()
        .map(|e| (e.clone(), digest(dir.path(), e)))
        .collect();
    let recorded_path = examples_dir().join("digests.txt");
    let text: String = digests.iter().map(|(e, d)| format!("{e} {d}\n")).collect();
    if std::env::var_os("FLATMERGE_BLESS").is_some() {
        std::fs::write(&recorded_path, &text).expect("write the digests");
        return;
    }
    let recorded = std::fs::read_to_string(&recorded_path).expect("digests.txt");
    for line in text.lines() {
        assert!(
            recorded.lines().any(|r| r == line),
            "output changed or digest missing: {line}"
        );
    }
    assert_eq!(recorded, text, "digests.txt lists exactly the examples");
}

#[test]
fn every_registered_method_has_a_documented_example() {
    for method in flatmerge::methods::MergeMethod::all() {
        let file = examples_dir().join(format!("{}.yaml", method.as_str()));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|_| panic!("{method} has no example at {}", file.display()));
        assert!(
            text.contains(&format!("merge_method: {method}\n")),
            "{}: names another method",
            file.display()
        );
    }
}
