//! The `flatmerge` binary end to end: bad inputs fail with one line on
//! stderr naming the file (and the tensor or key, where there is one) and
//! the problem, and leave no output and no temporary directory; `--dry-run`
//! writes nothing; an existing output is replaced only with `--force`;
//! `--dtype`, `--out-shard-size`, `demo` and `inspect` do what they say.

use flatmerge::demo::{write_family, DemoFamily, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::io::{Checkpoint, OutputTensor, SafetensorsWriter, INDEX_FILE, SINGLE_FILE};
use flatmerge::stats::ActivationStats;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SMALL: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 2,
};

/// A generated family under `<tmp>/family`, and `<tmp>/outputs` (empty)
/// where merges write `merged`.
struct Fixture {
    _tmp: tempfile::TempDir,
    fam: DemoFamily,
    outputs: PathBuf,
}

impl Fixture {
    fn new(dtype: Dtype) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let fam = write_family(&tmp.path().join("family"), &SMALL, dtype, 1, 77).unwrap();
        let outputs = tmp.path().join("outputs");
        std::fs::create_dir(&outputs).unwrap();
        Fixture {
            _tmp: tmp,
            fam,
            outputs,
        }
    }

    fn out(&self) -> PathBuf {
        self.outputs.join("merged")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.fam.dir.join(rel)
    }

    /// `flatmerge merge CONFIG OUT extra…`.
    fn merge(&self, extra: &[&str]) -> Output {
        let config = self.fam.config.to_str().unwrap().to_string();
        let out = self.out().to_str().unwrap().to_string();
        let mut args = vec!["merge", config.as_str(), out.as_str()];
        args.extend_from_slice(extra);
        flatmerge(&args)
    }

    fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.fam.config).unwrap();
        std::fs::write(&self.fam.config, edit(text)).unwrap();
    }

    /// Asserts a failed merge: non-zero exit, exactly one line on stderr
    /// holding every needle, no output and nothing left beside it.
    fn assert_clean_failure(&self, out: &Output, needles: &[&str]) -> String {
        let line = one_error_line(out);
        for needle in needles {
            assert!(line.contains(needle), "stderr lacks `{needle}`: {line}");
        }
        assert!(
            !self.out().exists(),
            "a failed merge created the output ({line})"
        );
        let left = entries(&self.outputs);
        assert!(
            left.is_empty(),
            "a failed merge left {left:?} beside the output ({line})"
        );
        line
    }
}

fn flatmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmerge"))
        .args(args)
        .output()
        .expect("run flatmerge")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "flatmerge failed: {}\nstdout: {}",
        stderr(out),
        stdout(out)
    );
}

/// The single line a failed command printed on stderr.
fn one_error_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        stdout(out)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status for an input error: {}",
        stderr(out)
    );
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Rewrites the single-file model in `dir` with `edit` applied to each tensor
/// (`None` drops it; `Some((dtype, shape, bytes))` replaces it).
#[allow(clippy::type_complexity)]
fn edit_model(
    dir: &Path,
    mut edit: impl FnMut(&str) -> Option<Option<(Dtype, Vec<usize>, Vec<u8>)>>,
) {
    let file = dir.join(SINGLE_FILE);
    let mut tensors = Vec::new();
    {
        let checkpoint = Checkpoint::open(&file).unwrap();
        for info in checkpoint.tensors() {
            let view = checkpoint.view(&info.name).unwrap();
            match edit(&info.name) {
                None => tensors.push((
                    info.name.clone(),
                    view.dtype,
                    view.shape.to_vec(),
                    view.data.to_vec(),
                )),
                Some(None) => {}
                Some(Some((dtype, shape, data))) => {
                    tensors.push((info.name.clone(), dtype, shape, data))
                }
            }
        }
    }
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, d, s, _)| OutputTensor::new(n.clone(), *d, s.clone()))
        .collect();
    let staged = dir.join("staged.tmp");
    let mut writer = SafetensorsWriter::create(&staged, &outputs, &BTreeMap::new()).unwrap();
    for (name, _, _, data) in &tensors {
        writer.write_tensor(name, data).unwrap();
    }
    writer.finish().unwrap();
    std::fs::rename(&staged, &file).unwrap();
}

// ---------------------------------------------------------------- bad input

#[test]
fn a_missing_model_is_one_line_naming_it() {
    let f = Fixture::new(Dtype::BF16);
    std::fs::remove_dir_all(f.path("B")).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&f.path("B")), "no such file or directory"]);
}

#[test]
fn a_missing_statistics_file_is_one_line_naming_it() {
    let f = Fixture::new(Dtype::BF16);
    std::fs::remove_file(f.path("A.stats.safetensors")).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&f.path("A.stats.safetensors"))]);
}

#[test]
fn shapes_that_differ_between_a_and_b_are_copied_from_a_not_an_error() {
    // SPEC §1.4: a tensor whose shape differs between A and B keeps A's values.
    let f = Fixture::new(Dtype::BF16);
    let name = "model.layers.0.mlp.up_proj.weight";
    edit_model(&f.path("B"), |n| {
        (n == name).then(|| Some((Dtype::BF16, vec![44, 32], vec![0u8; 44 * 32 * 2])))
    });
    let out = f.merge(&["--quiet"]);
    assert_success(&out);
    let merged = Checkpoint::open(&f.out()).unwrap();
    let a = Checkpoint::open(&f.path("A")).unwrap();
    assert!(
        merged.view(name).unwrap().data == a.view(name).unwrap().data,
        "copied from A"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.out().join("merge_report.json")).unwrap()).unwrap();
    let entry = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap();
    assert_eq!(
        (entry["rule"].as_str(), entry["reason"].as_str()),
        (Some("copy"), Some("shape_mismatch"))
    );
    assert_eq!(report["summary"]["shape_mismatch"], 1);
}

#[test]
fn a_weight_wider_than_its_statistics_is_an_error_naming_the_stats_tensor() {
    let f = Fixture::new(Dtype::BF16);
    let stats_path = f.path("A.stats.safetensors");
    let mut stats = ActivationStats::load(&stats_path).unwrap();
    let layer = stats
        .layers
        .get_mut("model.layers.1.mlp.down_proj")
        .unwrap();
    layer.x_mean.as_mut().unwrap().truncate(80);
    stats.save(&stats_path).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(
        &out,
        &[
            &display(&stats_path),
            "`model.layers.1.mlp.down_proj.x_mean`",
            "width 80",
            "model.layers.1.mlp.down_proj.weight",
        ],
    );
}

#[test]
fn nan_weights_are_an_error_naming_file_tensor_and_index_unless_propagated() {
    let f = Fixture::new(Dtype::F32);
    let name = "model.layers.1.mlp.up_proj.weight";
    edit_model(&f.path("B"), |n| {
        (n == name).then(|| {
            let checkpoint = Checkpoint::open(&f.path("B")).unwrap();
            let view = checkpoint.view(n).unwrap();
            let mut data = view.data.to_vec();
            data[4 * 7..4 * 8].copy_from_slice(&f32::NAN.to_le_bytes());
            data[4 * 9..4 * 10].copy_from_slice(&f32::INFINITY.to_le_bytes());
            Some((view.dtype, view.shape.to_vec(), data))
        })
    });
    let out = f.merge(&[]);
    f.assert_clean_failure(
        &out,
        &[
            &display(&f.path("B")),
            &format!("`{name}`"),
            "2 NaN or infinite",
            "index 7",
        ],
    );
    // `propagate` merges them through: the NaN reaches the output.
    let out = f.merge(&["--nan-policy", "propagate"]);
    assert_success(&out);
    let merged = Checkpoint::open(&f.out())
        .unwrap()
        .view(name)
        .unwrap()
        .to_f32_vec();
    assert!(merged.iter().any(|x| !x.is_finite()));
}

#[test]
fn a_contributor_statistics_width_mismatch_is_an_error_too() {
    let f = Fixture::new(Dtype::BF16);
    let stats_path = f.path("B.stats.safetensors");
    let mut stats = ActivationStats::load(&stats_path).unwrap();
    stats
        .layers
        .get_mut("model.layers.0.self_attn.v_proj")
        .unwrap()
        .y_mean
        .as_mut()
        .unwrap()
        .push(0.0);
    stats.save(&stats_path).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(
        &out,
        &[
            &display(&stats_path),
            "`model.layers.0.self_attn.v_proj.y_mean`",
            "width 33",
        ],
    );
}

#[test]
fn a_truncated_checkpoint_is_one_line_naming_file_and_tensor() {
    let f = Fixture::new(Dtype::BF16);
    let file = f.path("B").join(SINGLE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let out = f.merge(&[]);
    // lm_head's bytes are the last ones of the file.
    f.assert_clean_failure(&out, &[&display(&file), "`lm_head.weight`", "truncated"]);

    std::fs::write(&file, &bytes[..5]).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&file), "truncated"]);
}

#[test]
fn a_malformed_header_is_one_line_naming_the_file() {
    let f = Fixture::new(Dtype::BF16);
    let file = f.path("A").join(SINGLE_FILE);
    let original = std::fs::read(&file).unwrap();

    let mut bytes = original.clone();
    bytes[8..16].copy_from_slice(b"@@@@@@@@");
    std::fs::write(&file, &bytes).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&file), "JSON"]);

    // A header length far beyond the file.
    let mut bytes = original.clone();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&file), "header length"]);

    // An unknown dtype in an otherwise valid header names the tensor.
    let text = String::from_utf8_lossy(&original).into_owned();
    let at = text.find("\"dtype\":\"BF16\"").unwrap();
    let mut bytes = original.clone();
    bytes[at + 9..at + 13].copy_from_slice(b"XF16");
    std::fs::write(&file, &bytes).unwrap();
    let out = f.merge(&[]);
    f.assert_clean_failure(
        &out,
        &[&display(&file), "`model.embed_tokens.weight`", "XF16"],
    );
}

#[test]
fn an_unknown_config_key_is_one_line_naming_key_and_line() {
    let f = Fixture::new(Dtype::BF16);
    f.edit_config(|t| format!("{t}dtyp: float32\n"));
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&f.fam.config), "dtyp", "line"]);

    let f = Fixture::new(Dtype::BF16);
    f.edit_config(|t| t.replace("alpha: 1.0", "alpah: 1.0"));
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&f.fam.config), "`alpah`", "line 11"]);
}

#[test]
fn a_pickle_checkpoint_is_refused_in_one_line() {
    let f = Fixture::new(Dtype::BF16);
    let dir = f.path("P");
    std::fs::create_dir(&dir).unwrap();
    // A pickle's first bytes; flatmerge must never get as far as reading them.
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    f.edit_config(|t| t.replace("model: ./B\n", "model: ./P\n"));
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&dir), "pytorch_model.bin", "pickle"]);

    f.edit_config(|t| t.replace("model: ./P\n", "model: ./P/pytorch_model.bin\n"));
    let out = f.merge(&[]);
    f.assert_clean_failure(&out, &[&display(&dir.join("pytorch_model.bin")), "pickle"]);
}

#[test]
fn the_output_never_replaces_one_of_the_inputs() {
    // Checkpoint::open documents that writing the output over an input is
    // not supported; with --force the receiver (or the ancestor) is
    // silently deleted and replaced by the merge. A careful tool refuses.
    let f = Fixture::new(Dtype::BF16);
    let a = f.path("A").join(SINGLE_FILE);
    let before = std::fs::read(&a).unwrap();
    let out = flatmerge(&[
        "merge",
        f.fam.config.to_str().unwrap(),
        f.path("A").to_str().unwrap(),
        "--force",
    ]);
    assert!(
        std::fs::read(&a).unwrap() == before,
        "the receiver was overwritten by the merge"
    );
    let line = one_error_line(&out);
    assert!(line.contains(&display(&f.path("A"))), "{line}");
}

// ---------------------------------------------------------------- options

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let f = Fixture::new(Dtype::BF16);
    let out = f.merge(&["--dry-run"]);
    assert_success(&out);
    let text = stdout(&out);
    for (name, _, _) in SMALL.tensors() {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in the plan:\n{text}"));
        assert!(line.contains("BF16"), "{line}");
    }
    assert!(
        text.contains("safe_m (weight)") && text.contains("fallback (no_statistics)"),
        "{text}"
    );
    let n = SMALL.tensors().len();
    assert!(text.contains(&format!("{n} tensors, ")), "{text}");
    let totals = text.lines().last().unwrap_or_default();
    assert!(
        totals.contains(&format!("safe_m {}", 7 * SMALL.layers)),
        "{totals}"
    );
    assert!(
        totals.contains(&format!("fallback {}", n - 7 * SMALL.layers)),
        "{totals}"
    );
    assert!(
        !f.out().exists() && entries(&f.outputs).is_empty(),
        "--dry-run wrote something"
    );
    // No output directory needed at all.
    let out = flatmerge(&["merge", f.fam.config.to_str().unwrap(), "--dry-run"]);
    assert_success(&out);
}

#[test]
fn an_existing_output_is_kept_without_force_and_replaced_with_it() {
    let f = Fixture::new(Dtype::BF16);
    assert_success(&f.merge(&["--quiet"]));
    let before: Vec<(String, Vec<u8>)> = entries(&f.out())
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(f.out().join(&n)).unwrap()))
        .collect();

    let out = f.merge(&["--dtype", "float32"]);
    let line = one_error_line(&out);
    assert!(
        line.contains(&display(&f.out())) && line.contains("--force"),
        "{line}"
    );
    let after: Vec<(String, Vec<u8>)> = entries(&f.out())
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(f.out().join(&n)).unwrap()))
        .collect();
    assert!(before == after, "the existing output was changed");

    std::fs::write(f.out().join("stale.txt"), "from an earlier run").unwrap();
    let out = f.merge(&["--dtype", "float32", "--force", "--quiet"]);
    assert_success(&out);
    let merged = Checkpoint::open(&f.out()).unwrap();
    assert!(
        merged.tensors().iter().all(|t| t.dtype == Dtype::F32),
        "replaced by the new merge"
    );
    assert!(
        !f.out().join("stale.txt").exists(),
        "the old directory is gone, not merged into"
    );
    assert_eq!(
        entries(&f.outputs),
        ["merged"],
        "nothing left beside the output"
    );

    // --force never replaces a directory that holds no model.
    let other = f.outputs.join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let out = flatmerge(&[
        "merge",
        f.fam.config.to_str().unwrap(),
        other.to_str().unwrap(),
        "--force",
    ]);
    let line = one_error_line(&out);
    assert!(line.contains(&display(&other)), "{line}");
    assert_eq!(entries(&other), ["notes.txt"]);
    assert_eq!(entries(&f.outputs), ["merged", "notes"]);
}

#[test]
fn dtype_override_gives_f32_and_updates_torch_dtype() {
    let f = Fixture::new(Dtype::BF16);
    let config = f.fam.config.to_str().unwrap();
    let out = flatmerge(&[
        "merge",
        config,
        "-o",
        f.out().to_str().unwrap(),
        "--dtype",
        "float32",
    ]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains("merged ") && text.contains("report: "),
        "{text}"
    );
    let merged = Checkpoint::open(&f.out()).unwrap();
    assert!(merged.tensors().iter().all(|t| t.dtype == Dtype::F32));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.out().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["hidden_size"], 32);

    let bad = flatmerge(&[
        "merge",
        f.fam.config.to_str().unwrap(),
        f.outputs.join("x").to_str().unwrap(),
        "--dtype",
        "int8",
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("int8"), "{}", stderr(&bad));
    assert!(!f.outputs.join("x").exists());
}

#[test]
fn out_shard_size_writes_indexed_shards() {
    let f = Fixture::new(Dtype::BF16);
    assert_success(&f.merge(&["--out-shard-size", "10K", "--threads", "2", "--quiet"]));
    let files: Vec<String> = entries(&f.out())
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(files.len() > 1, "{files:?}");
    assert!(!files.contains(&SINGLE_FILE.to_string()));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.out().join(INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), SMALL.tensors().len());
    let sharded = Checkpoint::open(&f.out()).unwrap();
    for (name, file) in map {
        let shard = Checkpoint::open_file(&f.out().join(file.as_str().unwrap())).unwrap();
        assert!(
            shard.view(name).unwrap().data == sharded.view(name).unwrap().data,
            "{name} in {file}"
        );
    }
    let single = f.outputs.join("single");
    assert_success(&flatmerge(&[
        "merge",
        f.fam.config.to_str().unwrap(),
        single.to_str().unwrap(),
        "--quiet",
    ]));
    let single = Checkpoint::open(&single).unwrap();
    for t in single.tensors() {
        assert!(
            sharded.view(&t.name).unwrap().data == single.view(&t.name).unwrap().data,
            "{}",
            t.name
        );
    }
    let out = flatmerge(&["inspect", f.out().to_str().unwrap()]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{} tensors", SMALL.tensors().len())),
        "{text}"
    );
    assert!(
        text.contains(&format!("in {} file(s)", files.len())),
        "{text}"
    );
    let bad = f.merge(&["--out-shard-size", "lots"]);
    assert!(!bad.status.success() && stderr(&bad).contains("lots"));
}

// ---------------------------------------------------------------- demo, inspect

#[test]
fn demo_builds_merges_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = flatmerge(&["demo", "--dir", dir.to_str().unwrap(), "--threads", "2"]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains("merged ")
            && text.contains("contributor 0:")
            && text.contains("inspect it with"),
        "{text}"
    );
    let merged = dir.join("merged");
    let checkpoint = Checkpoint::open(&merged).unwrap();
    assert_eq!(checkpoint.tensors().len(), LlamaShape::DEMO.tensors().len());
    assert!(merged.join("merge_report.json").is_file() && merged.join("config.json").is_file());
    for m in ["A", "B", "C"] {
        assert!(dir.join(m).join(SINGLE_FILE).is_file(), "{m}");
    }
}

#[test]
fn inspect_shows_checkpoints_and_statistics_coverage() {
    let f = Fixture::new(Dtype::BF16);
    let n = SMALL.tensors().len();
    let params = SMALL.parameters();
    let out = flatmerge(&["inspect", f.path("A").to_str().unwrap()]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{n} tensors, {params} parameters")),
        "{text}"
    );
    assert!(text.contains(&format!("BF16: {n} tensors")), "{text}");

    let out = flatmerge(&["inspect", "--all", f.path("A").to_str().unwrap()]);
    assert_success(&out);
    let text = stdout(&out);
    for (name, _, _) in SMALL.tensors() {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&name) && l.contains("BF16")),
            "{name}:\n{text}"
        );
    }

    let stats = f.path("A.stats.safetensors");
    let out = flatmerge(&[
        "inspect",
        stats.to_str().unwrap(),
        "--weights",
        f.path("A").to_str().unwrap(),
    ]);
    assert_success(&out);
    let text = stdout(&out);
    let linear = 7 * SMALL.layers;
    assert!(text.contains(&format!("{linear} layers")), "{text}");
    // Embeddings and lm_head are 2-D `.weight`s without statistics.
    assert!(
        text.contains(&format!(
            "{linear} of {} linear weights and biases covered",
            linear + 2
        )),
        "{text}"
    );

    // A width mismatch is shown, not hidden.
    let mut s = ActivationStats::load(&stats).unwrap();
    s.layers
        .get_mut("model.layers.0.mlp.gate_proj")
        .unwrap()
        .y_mean
        .as_mut()
        .unwrap()
        .truncate(10);
    s.save(&stats).unwrap();
    let out = flatmerge(&[
        "inspect",
        stats.to_str().unwrap(),
        "--weights",
        f.path("A").to_str().unwrap(),
    ]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.contains(
            "MISMATCH   model.layers.0.mlp.gate_proj.weight: y_mean has width 10, needs 88"
        ),
        "{text}"
    );

    // --weights goes with a statistics file only; a broken file is one line.
    let out = flatmerge(&[
        "inspect",
        f.path("A").to_str().unwrap(),
        "--weights",
        f.path("B").to_str().unwrap(),
    ]);
    one_error_line(&out);
    let file = f.path("B").join(SINGLE_FILE);
    std::fs::write(&file, b"short").unwrap();
    let out = flatmerge(&["inspect", file.to_str().unwrap()]);
    assert!(one_error_line(&out).contains(&display(&file)));
}

#[test]
fn the_fam_demo_recovers_its_planted_permutations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fam");
    let out = flatmerge(&["demo", "--fam", "--dir", dir.to_str().unwrap()]);
    assert_success(&out);
    let text = stdout(&out);
    let groups: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("planted permutation recovered"))
        .collect();
    assert_eq!(groups.len(), 4, "{text}");
    for line in groups {
        assert!(
            line.contains("172 of 172 neurons matched, planted permutation recovered for 172"),
            "{line}"
        );
    }
    assert!(dir.join("merged").join("merge_report.json").is_file());
}

#[test]
fn mergekit_yaml_flags_run_and_the_refused_ones_say_why() {
    let f = Fixture::new(Dtype::BF16);
    // The receiver's tokenizer, which --no-copy-tokenizer leaves out.
    std::fs::write(f.path("A").join("tokenizer.json"), "{}").unwrap();
    std::fs::write(f.path("A").join("tokenizer_config.json"), "{}").unwrap();
    let out = f.merge(&[
        "-j",
        "2",
        "--allow-crimes",
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--no-copy-tokenizer",
        "--write-model-card",
    ]);
    assert_success(&out);
    let notes = stderr(&out);
    for flag in ["--allow-crimes", "--lazy-unpickle", "--low-cpu-memory"] {
        assert!(notes.contains(&format!("note: {flag}")), "{notes}");
    }
    let files = entries(&f.out());
    assert!(files.contains(&"config.json".to_string()), "{files:?}");
    assert!(
        !files.iter().any(|n| n.starts_with("tokenizer")),
        "--no-copy-tokenizer: {files:?}"
    );
    let card = std::fs::read_to_string(f.out().join("README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model:\n"), "{card}");
    assert!(card.contains("`safe_m` method"), "{card}");
    assert!(
        card.contains("(receiver)") && card.contains("(contributor)"),
        "{card}"
    );
    assert!(
        card.contains(
            &std::fs::read_to_string(&f.fam.config)
                .unwrap()
                .trim_end()
                .to_string()
        ),
        "the config as written: {card}"
    );
    // The default (and --copy-tokenizer) copies it; --num-threads is -j.
    let out = f.merge(&["--force", "--copy-tokenizer", "--num-threads", "1", "-q"]);
    assert_success(&out);
    let files = entries(&f.out());
    assert!(files.contains(&"tokenizer.json".to_string()), "{files:?}");
    assert!(!files.contains(&"README.md".to_string()), "{files:?}");
    std::fs::remove_dir_all(f.out()).unwrap();
    for (flag, needle) in [
        ("--cuda", "merges on the CPU"),
        ("--trust-remote-code", "runs no model code"),
    ] {
        let out = f.merge(&[flag]);
        f.assert_clean_failure(&out, &[flag, "mergekit-yaml flag", needle]);
    }
}
