//! The built-in name maps on small checkpoints in real layouts
//! (`tests/python/hf_models.py`): llava-hf as transformers saves it and
//! under its in-memory names, an mPLUG-Owl2 imitation and the original
//! LLaVA layout built around a transformers `LlamaForCausalLM`. For each
//! pair: `flatmerge map --name-map auto --strict -a` picks the expected map
//! and accounts for every tensor of both models exactly once; a FAM merge
//! with `name_map: auto` runs end to end under `--strict`, the report names
//! the map, and the output runs (transformers' `LlamaForCausalLM` for the
//! original LLaVA layout; the native probe's forward pass for mPLUG-Owl2,
//! which transformers has no class for). `--strict` fails exactly on the
//! unaccounted tensors; a pair no map fits gets one line and no output.
//!
//! Needs `python3` with `torch`, `transformers` and `safetensors`; without
//! them the test says so on stderr and passes, unless
//! `FLATMERGE_REQUIRE_PYTHON` is set (CI sets it), where it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/hf_models.py");

#[path = "../../tests/support/python_ready.rs"]
mod python_ready;

fn python_ready() -> bool {
    python_ready::python_ready("torch, transformers, safetensors", "name-map layouts")
}

fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "hf_models.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn flatmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmerge"))
        .args(args)
        .output()
        .expect("run flatmerge")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tensor names of a model directory's single safetensors file.
fn names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

struct Models {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Models {
    /// Builds every layout and probes each natively on the same tokens.
    fn build() -> Models {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let probe = root.join("probe.jsonl");
        let lines: String = (0..12u32)
            .map(|i| {
                let tokens: Vec<u32> = (0..7).map(|t| (i * 11 + t * 5 + 1) % 62).collect();
                let modality = if i % 2 == 0 { "text" } else { "vision" };
                format!("{{\"tokens\": {tokens:?}, \"modality\": \"{modality}\"}}\n")
            })
            .collect();
        std::fs::write(&probe, lines).unwrap();
        for kind in ["mplug-owl2", "llava", "llava-memory", "llava-original"] {
            let model = root.join(kind);
            python(&["build", kind, model.to_str().unwrap()]);
            ok(
                flatmerge(&[
                    "probe",
                    model.to_str().unwrap(),
                    "--probe-set",
                    probe.to_str().unwrap(),
                    "-o",
                    root.join(format!("{kind}.stats.safetensors"))
                        .to_str()
                        .unwrap(),
                    "-q",
                ]),
                &format!("probe {kind}"),
            );
        }
        Models { _dir: dir, root }
    }

    fn model(&self, kind: &str) -> String {
        self.root.join(kind).display().to_string()
    }

    fn stats(&self, kind: &str) -> String {
        self.root
            .join(format!("{kind}.stats.safetensors"))
            .display()
            .to_string()
    }

    fn map(&self, a: &str, b: &str, extra: &[&str]) -> Output {
        let (ma, mb, sa, sb) = (self.model(a), self.model(b), self.stats(a), self.stats(b));
        let mut args = vec!["map", &ma, &mb, "--stats-a", &sa, "--stats-b", &sb];
        args.extend_from_slice(extra);
        flatmerge(&args)
    }
}

/// The `map -a` listing: for each B tensor its class, and how many times
/// each A tensor is named as a target or kept.
fn listing(stdout: &str) -> (BTreeMap<String, String>, BTreeMap<String, usize>) {
    let mut b = BTreeMap::new();
    let mut a: BTreeMap<String, usize> = BTreeMap::new();
    for line in stdout.lines() {
        let line = line.trim();
        let mut take = |class: &str, rest: &str| {
            let (src, dst) = rest.split_once(" → ").unwrap();
            assert!(
                b.insert(src.to_string(), class.to_string()).is_none(),
                "{src} twice"
            );
            for t in dst.split(", ") {
                *a.entry(t.to_string()).or_default() += 1;
            }
        };
        if let Some(rest) = line.strip_prefix("mapped ") {
            take("mapped", rest.trim());
        } else if let Some(rest) = line.strip_prefix("one-to-many ") {
            take("one-to-many", rest.trim());
        } else if let Some(rest) = line.strip_prefix("kept from A ") {
            *a.entry(rest.trim().to_string()).or_default() += 1;
        } else if let Some(rest) = line.strip_prefix("dropped ") {
            assert!(b
                .insert(rest.trim().to_string(), "dropped".into())
                .is_none());
        }
    }
    (b, a)
}

#[test]
fn auto_picks_the_map_that_accounts_for_every_tensor_and_the_merge_runs() {
    if !python_ready() {
        return;
    }
    let m = Models::build();
    for (a, b, expected) in [
        ("mplug-owl2", "llava", "llava-hf-to-mplug-owl2"),
        ("mplug-owl2", "llava-memory", "llava-hf-to-mplug-owl2"),
        ("mplug-owl2", "llava-original", "llava-1.5-to-mplug-owl2"),
        ("llava-original", "llava", "llava-hf-to-llava"),
        ("llava-original", "llava-memory", "llava-hf-to-llava"),
    ] {
        let stdout = ok(
            m.map(a, b, &["--name-map", "auto", "--strict", "-a"]),
            &format!("map {a} {b}"),
        );
        assert!(
            stdout.contains(&format!("name map: {expected} (picked by auto)")),
            "{a} ← {b}: {stdout}"
        );
        assert!(stdout.contains("unaccounted: 0 of A, 0 of B"), "{stdout}");
        // Every tensor of B in exactly one class; every tensor of A fed or
        // kept exactly once.
        let (b_classes, a_counts) = listing(&stdout);
        let b_names = names(&m.root.join(b));
        let a_names = names(&m.root.join(a));
        assert_eq!(
            b_classes.keys().cloned().collect::<Vec<_>>(),
            {
                let mut v = b_names.clone();
                v.sort();
                v
            },
            "{a} ← {b}: B's tensors"
        );
        let mut a_sorted = a_names.clone();
        a_sorted.sort();
        assert_eq!(
            a_counts.keys().cloned().collect::<Vec<_>>(),
            a_sorted,
            "{a} ← {b}: A's tensors"
        );
        assert!(a_counts.values().all(|&n| n == 1), "{a_counts:?}");
        if expected.ends_with("mplug-owl2") {
            // k/v and both norms of each of the 2 layers feed two copies.
            let many = b_classes.values().filter(|c| *c == "one-to-many").count();
            assert_eq!(many, 8, "{a} ← {b}");
        }

        // The merge, with the map detected, under --strict.
        let config = m.root.join(format!("{a}-{b}.yaml"));
        std::fs::write(
            &config,
            format!(
                "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
                m.model(a),
                m.stats(a),
                m.model(b),
                m.stats(b)
            ),
        )
        .unwrap();
        let out = m.root.join(format!("merged-{a}-{b}"));
        ok(
            flatmerge(&[
                "merge",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--strict",
                "-q",
            ]),
            &format!("merge {a} {b}"),
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("merge_report.json")).unwrap()).unwrap();
        let used = &report["fam"]["name_map"];
        assert_eq!(used["map"], expected, "{used}");
        assert_eq!(used["detected"], true);
        assert_eq!(used["unaccounted_a"].as_array().unwrap().len(), 0);
        assert_eq!(
            names(&out).len(),
            a_names.len(),
            "the output has A's tensors"
        );
        if a == "llava-original" {
            let forward = python(&["forward", out.to_str().unwrap(), "--language-model"]);
            assert!(
                forward.contains("\"logits_shape\": [1, 4, 64]"),
                "{forward}"
            );
        } else {
            // transformers has no mPLUG-Owl2 class: the native forward pass
            // runs the merged language model, multiway copies included.
            let probe = m.root.join("probe.jsonl");
            ok(
                flatmerge(&[
                    "probe",
                    out.to_str().unwrap(),
                    "--probe-set",
                    probe.to_str().unwrap(),
                    "-o",
                    m.root.join("merged.stats.safetensors").to_str().unwrap(),
                    "-q",
                ]),
                "probe the merged mPLUG-Owl2",
            );
        }
    }
}

#[test]
fn strict_fails_exactly_on_the_unaccounted_tensors_and_no_map_fits_gets_one_line() {
    if !python_ready() {
        return;
    }
    let m = Models::build();
    // The llava-hf map on an original-layout B: its k/v/norms and projector
    // are unaccounted, and so are the mPLUG-Owl2 copies they would feed.
    let args = ["--name-map", "llava-hf-to-mplug-owl2"];
    let stdout = ok(m.map("mplug-owl2", "llava-original", &args), "map");
    assert!(stdout.contains("unaccounted: 16 of A, 12 of B"), "{stdout}");
    let unaccounted: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("unaccounted  "))
        .map(|l| l[2..].to_string())
        .collect();
    assert_eq!(unaccounted.len(), 28);
    let strict = m.map(
        "mplug-owl2",
        "llava-original",
        &["--name-map", "llava-hf-to-mplug-owl2", "--strict"],
    );
    assert!(!strict.status.success());
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(stderr.contains("28 problems"), "{stderr}");
    for line in stderr.lines().filter(|l| l.contains("--strict")) {
        let tensor = line.split('`').nth(1).unwrap();
        assert!(
            unaccounted.iter().any(|u| u == tensor),
            "{tensor} is accounted for"
        );
    }

    // No map fits this way round, one does the other way: one line saying
    // which and how to list the models; the merge writes nothing. (With no
    // fit either way the line names the nearest map and its first
    // unaccounted tensors: the namemap unit tests.)
    let e = m.map("llava-original", "mplug-owl2", &["--name-map", "auto"]);
    assert!(!e.status.success());
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no built-in map accounts for every tensor"),
        "{stderr}"
    );
    assert!(
        stderr.contains("but `llava-1.5-to-mplug-owl2` does with the two the other way round")
            && stderr.contains("(the receiver A)"),
        "{stderr}"
    );
    let config = m.root.join("none.yaml");
    std::fs::write(
        &config,
        format!(
            "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
            m.model("llava-original"),
            m.stats("llava-original"),
            m.model("mplug-owl2"),
            m.stats("mplug-owl2")
        ),
    )
    .unwrap();
    let out = m.root.join("never");
    let e = flatmerge(&[
        "merge",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(!e.status.success());
    assert!(!out.exists(), "nothing written");
}

#[test]
fn vocabularies_of_different_sizes_merge_the_common_rows_and_keep_a_s_extra_rows() {
    if !python_ready() {
        return;
    }
    use flatmerge::io::Checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let probe = root.join("probe.jsonl");
    std::fs::write(
        &probe,
        "{\"tokens\": [1, 2, 3, 4, 5]}\n{\"tokens\": [9, 8, 7]}\n{\"tokens\": [20, 30, 40, 50]}\n",
    )
    .unwrap();
    let build = |kind: &str, vocab: u32, seed: u32| -> String {
        let name = format!("{kind}-{vocab}");
        let model = root.join(&name);
        let (v, s) = (vocab.to_string(), seed.to_string());
        python(&[
            "build",
            kind,
            model.to_str().unwrap(),
            "--vocab",
            &v,
            "--seed",
            &s,
        ]);
        ok(
            flatmerge(&[
                "probe",
                model.to_str().unwrap(),
                "--probe-set",
                probe.to_str().unwrap(),
                "-o",
                root.join(format!("{name}.stats.safetensors"))
                    .to_str()
                    .unwrap(),
                "-q",
            ]),
            "probe",
        );
        name
    };
    // A larger (Qwen2-VL's 152064 against OneVision's 151646, scaled down),
    // then A smaller.
    for (rows_a, rows_b) in [(70usize, 64usize), (64, 70)] {
        let a = build("mplug-owl2", rows_a as u32, 3);
        let b = build("llava", rows_b as u32, 4);
        let stats = |m: &str| {
            root.join(format!("{m}.stats.safetensors"))
                .display()
                .to_string()
        };
        let (ma, mb) = (root.join(&a), root.join(&b));
        let (sa, sb) = (stats(&a), stats(&b));
        let stdout = ok(
            flatmerge(&[
                "map",
                ma.to_str().unwrap(),
                mb.to_str().unwrap(),
                "--stats-a",
                &sa,
                "--stats-b",
                &sb,
                "--name-map",
                "auto",
                "--strict",
            ]),
            "map",
        );
        let common = rows_a.min(rows_b);
        let line = format!(
            "vocabulary model.embed_tokens.weight: A {rows_a} rows, B {rows_b} rows: {common} merged, {} kept from A, {} of B dropped",
            rows_a.saturating_sub(rows_b),
            rows_b.saturating_sub(rows_a)
        );
        assert!(stdout.contains(&line), "{stdout}");
        let config = root.join("vocab.yaml");
        std::fs::write(
            &config,
            format!(
                "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {sa}\n  - model: {}\n    stats: {sb}\n",
                ma.display(),
                mb.display()
            ),
        )
        .unwrap();
        let out = root.join(format!("merged-{rows_a}-{rows_b}"));
        ok(
            flatmerge(&[
                "merge",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--strict",
                "-q",
            ]),
            "merge",
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("merge_report.json")).unwrap()).unwrap();
        let vocab = report["fam"]["vocabulary"].as_array().unwrap();
        assert_eq!(vocab.len(), 2, "embedding and lm_head: {vocab:?}");
        for v in vocab {
            assert_eq!(v["merged_rows"], common);
            assert_eq!(v["kept_from_a"], rows_a.saturating_sub(rows_b));
            assert_eq!(v["dropped_from_b"], rows_b.saturating_sub(rows_a));
        }
        let (ca, cb, cm) = (
            Checkpoint::open(&ma).unwrap(),
            Checkpoint::open(&mb).unwrap(),
            Checkpoint::open(&out).unwrap(),
        );
        for (name_a, name_b) in [
            (
                "model.embed_tokens.weight",
                "language_model.model.embed_tokens.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
        ] {
            let wa = ca.view(name_a).unwrap().to_f32_vec();
            let wb = cb.view(name_b).unwrap().to_f32_vec();
            let wm = cm.view(name_a).unwrap().to_f32_vec();
            assert_eq!(wm.len(), wa.len(), "{name_a}: A's shape");
            let h = 32;
            for r in 0..rows_a {
                for c in 0..h {
                    let (x, m) = (wa[r * h + c], wm[r * h + c]);
                    if r < common {
                        // SPEC §2.4: rows without statistics are averaged.
                        assert_eq!(m, 0.5 * (x + wb[r * h + c]), "{name_a}[{r}, {c}]");
                    } else {
                        assert_eq!(m, x, "{name_a}[{r}, {c}]: A's extra row kept");
                    }
                }
            }
        }
    }
}

#[test]
fn onevision_into_qwen2_vl_merges_across_vocabularies_and_transformers_runs_it() {
    if !python_ready() {
        return;
    }
    // Qwen2-VL's vocabulary is the larger (152064 against OneVision's
    // 151646): here 70 against 64.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let probe = root.join("probe.jsonl");
    std::fs::write(
        &probe,
        "{\"tokens\": [1, 2, 3, 4, 5]}\n{\"tokens\": [9, 8, 7, 30]}\n",
    )
    .unwrap();
    for (kind, vocab) in [("qwen2-vl", "70"), ("llava-onevision", "64")] {
        let model = root.join(kind);
        python(&[
            "build",
            kind,
            model.to_str().unwrap(),
            "--vocab",
            vocab,
            "--seed",
            "5",
        ]);
        ok(
            flatmerge(&[
                "probe",
                model.to_str().unwrap(),
                "--probe-set",
                probe.to_str().unwrap(),
                "-o",
                root.join(format!("{kind}.stats.safetensors"))
                    .to_str()
                    .unwrap(),
                "-q",
            ]),
            "probe",
        );
    }
    let m = Models {
        root: root.to_path_buf(),
        _dir: dir,
    };
    let stdout = ok(
        m.map(
            "qwen2-vl",
            "llava-onevision",
            &["--name-map", "auto", "--strict", "-a"],
        ),
        "map",
    );
    assert!(
        stdout.contains("name map: llava-onevision-to-qwen2-vl (picked by auto)"),
        "{stdout}"
    );
    assert!(stdout.contains("unaccounted: 0 of A, 0 of B"), "{stdout}");
    assert!(
        stdout.contains("vocabulary model.embed_tokens.weight: A 70 rows, B 64 rows: 64 merged, 6 kept from A, 0 of B dropped"),
        "{stdout}"
    );
    let (b_classes, a_counts) = listing(&stdout);
    assert_eq!(
        b_classes.len(),
        names(&m.root.join("llava-onevision")).len()
    );
    assert_eq!(a_counts.len(), names(&m.root.join("qwen2-vl")).len());
    let config = m.root.join("vl.yaml");
    std::fs::write(
        &config,
        format!(
            "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
            m.model("qwen2-vl"),
            m.stats("qwen2-vl"),
            m.model("llava-onevision"),
            m.stats("llava-onevision")
        ),
    )
    .unwrap();
    let out = m.root.join("merged");
    ok(
        flatmerge(&[
            "merge",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--strict",
            "-q",
        ]),
        "merge",
    );
    let forward = python(&["forward", out.to_str().unwrap()]);
    assert!(
        forward.contains("\"logits_shape\": [1, 4, 70]"),
        "{forward}"
    );
}
