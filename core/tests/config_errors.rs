//! Every bad value in a merge config is a `Config` error naming the key and
//! the line it is on: unknown keys, wrong types, out-of-range numbers (for
//! every numeric parameter of SAFE-M, FAM and the baselines), bad words,
//! and YAML that does not parse. A config read from a file also names the
//! file.

use flatmerge::config::MergeConfig;
use flatmerge::ErrorKind;
use std::path::Path;

const SAFE_M: &str = "\
merge_method: safe_m
base_model: ./C
base_model_stats: ./C.stats.safetensors
models:
  - model: ./A
    stats: ./A.stats.safetensors
  - model: ./B
    stats: ./B.stats.safetensors
    parameters:
      density: 0.3
parameters:
  density: 0.2
  alpha: 1.0
  score: sas
  lambda_proj: 1.0
  lambda_ortho: 0.5
  fallback_weight: 0.5
  epsilon: 1.0e-8
dtype: float32
nan_policy: error
";

const TIES: &str = "\
merge_method: ties
base_model: ./C
models:
  - model: ./A
    parameters:
      weight: 1.0
      density: 0.5
  - model: ./B
    parameters:
      weight: [0.2, 0.8]
      density:
        - filter: mlp
          value: 0.4
        - value: 0.6
parameters:
  lambda: 1.0
  normalize: true
";

const FAM: &str = "\
merge_method: fam
models:
  - model: ./A
    stats: ./A.stats.safetensors
  - model: ./B
    stats: ./B.stats.safetensors
name_map: identity
groups: auto
parameters:
  density: 1.0
  fos_min: -1.0
  sigma: 0.1
  beta: 0.0
  lambda_proj: 0.5
  lambda_ortho: 0.5
  epsilon: 1.0e-8
  preset: default
  matching: exact
  similarity: pearson
  lambda_search: false
  lambda_grid: [0.0, 0.5, 1.0]
";

/// The 1-based number of the line of `text` that is exactly `line`.
fn line_of(text: &str, line: &str) -> usize {
    text.lines()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no line `{line}` in the config"))
        + 1
}

/// Replaces the one occurrence of `from` in `base` by `to`, parses, and
/// checks the error: kind `Config`, `key` named, the line number of `to`'s
/// last line (where the offending key is), and `needle` in the message.
fn check(base: &str, from: &str, to: &str, key: &str, needle: &str) {
    check_at(base, from, to, to.lines().last().unwrap_or(to), key, needle);
}

/// As [`check`], the line expected being the one that is exactly `at`.
fn check_at(base: &str, from: &str, to: &str, at: &str, key: &str, needle: &str) {
    assert_eq!(base.matches(from).count(), 1, "`{from}` must occur once");
    let text = base.replacen(from, to, 1);
    let e = MergeConfig::from_yaml(&text, Path::new("/m"), None)
        .expect_err(&format!("`{from}` → `{to}` should be refused"));
    let shown = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Config, "{shown}");
    let line = line_of(&text, at);
    assert!(
        shown.contains(&format!("line {line} ")),
        "`{from}` → `{to}`: no `line {line}` in: {shown}"
    );
    assert!(
        shown.contains(key),
        "`{from}` → `{to}`: `{key}` not in: {shown}"
    );
    assert!(
        shown.contains(needle),
        "`{from}` → `{to}`: `{needle}` not in: {shown}"
    );
}

#[test]
fn the_base_configs_are_valid() {
    for text in [SAFE_M, TIES, FAM] {
        MergeConfig::from_yaml(text, Path::new("/m"), None).unwrap();
    }
}

#[test]
fn safe_m_numbers_out_of_range_name_key_and_line() {
    let density = "in (0, 1]";
    for (from, to, key, needle) in [
        ("  density: 0.2", "  density: 0", "density", density),
        ("  density: 0.2", "  density: -0.1", "density", density),
        ("  density: 0.2", "  density: 1.5", "density", density),
        ("  density: 0.2", "  density: .nan", "density", density),
        ("  density: 0.2", "  density: .inf", "density", density),
        (
            "      density: 0.3",
            "      density: 1.01",
            "density",
            density,
        ),
        ("  alpha: 1.0", "  alpha: -1", "alpha", "≥ 0"),
        ("  alpha: 1.0", "  alpha: .inf", "alpha", "≥ 0"),
        ("  epsilon: 1.0e-8", "  epsilon: 0", "epsilon", "> 0"),
        ("  epsilon: 1.0e-8", "  epsilon: -1.0e-8", "epsilon", "> 0"),
        (
            "  lambda_proj: 1.0",
            "  lambda_proj: .nan",
            "lambda_proj",
            "finite",
        ),
        (
            "  lambda_ortho: 0.5",
            "  lambda_ortho: -.inf",
            "lambda_ortho",
            "finite",
        ),
        (
            "  fallback_weight: 0.5",
            "  fallback_weight: .nan",
            "fallback_weight",
            "finite",
        ),
    ] {
        check(SAFE_M, from, to, key, needle);
    }
}

#[test]
fn wrong_types_and_bad_words_name_key_and_line() {
    for (from, to, key, needle) in [
        (
            "  density: 0.2",
            "  density: dense",
            "density",
            "expected a number",
        ),
        (
            "  density: 0.2",
            "  density: true",
            "density",
            "expected a number",
        ),
        (
            "  density: 0.2",
            "  density: [0.2, 0.3]",
            "density",
            "expected a number",
        ),
        ("  score: sas", "  score: snip", "score", "`sas` or `ratio`"),
        ("  score: sas", "  score: 3", "score", "`sas` or `ratio`"),
        (
            "dtype: float32",
            "dtype: int8",
            "dtype",
            "unsupported dtype",
        ),
        (
            "nan_policy: error",
            "nan_policy: ignore",
            "nan_policy",
            "`error` or `propagate`",
        ),
        (
            "merge_method: safe_m",
            "merge_method: frobnicate",
            "merge_method",
            "is unknown",
        ),
        (
            "merge_method: safe_m",
            "merge_method: core_space",
            "merge_method",
            "does not run",
        ),
    ] {
        check(SAFE_M, from, to, key, needle);
    }
}

#[test]
fn unknown_keys_name_key_and_line() {
    for (from, to, key, needle) in [
        ("dtype: float32", "dtyp: float32", "dtyp", "unknown field"),
        (
            "    stats: ./A.stats.safetensors",
            "    stat: ./A.stats.safetensors",
            "stat",
            "unknown field",
        ),
        ("  alpha: 1.0", "  alpah: 1.0", "alpah", "unknown parameter"),
        (
            "      density: 0.3",
            "      densty: 0.3",
            "densty",
            "unknown parameter",
        ),
    ] {
        check(SAFE_M, from, to, key, needle);
    }
}

#[test]
fn yaml_structure_errors_name_the_line() {
    for (from, to, key, needle) in [
        // A scalar where a list of models is expected.
        (
            "models:\n  - model: ./A",
            "models: 5\n  # - model: ./A",
            "",
            "sequence",
        ),
        // Broken YAML: an unclosed flow sequence.
        ("dtype: float32", "dtype: [float32", "", ""),
        // A key given twice.
        (
            "nan_policy: error",
            "nan_policy: error\nnan_policy: propagate",
            "duplicate mapping key: nan_policy",
            "",
        ),
    ] {
        let text = SAFE_M.replacen(from, to, 1);
        let e = MergeConfig::from_yaml(&text, Path::new("/m"), None)
            .expect_err(&format!("`{to}` should be refused"));
        let shown = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Config, "{shown}");
        assert!(shown.contains("line "), "`{to}`: no line in: {shown}");
        assert!(shown.contains(key) && shown.contains(needle), "{shown}");
        assert!(
            !shown.contains("Options"),
            "advice for programmers: {shown}"
        );
    }
}

#[test]
fn baseline_numbers_out_of_range_name_key_and_line() {
    for (from, to, key, needle) in [
        (
            "      density: 0.5",
            "      density: 1.5",
            "density",
            "[0, 1]",
        ),
        (
            "      density: 0.5",
            "      density: -0.1",
            "density",
            "[0, 1]",
        ),
        (
            "      weight: 1.0",
            "      weight: .nan",
            "weight",
            "finite",
        ),
        (
            "      weight: [0.2, 0.8]",
            "      weight: [0.2, .inf]",
            "weight",
            "gradient point",
        ),
        ("  lambda: 1.0", "  lambda: .inf", "lambda", "finite"),
        (
            "  normalize: true",
            "  normalize: 1",
            "normalize",
            "true or false",
        ),
        (
            "  lambda: 1.0",
            "  lamda: 1.0",
            "lamda",
            "unknown parameter",
        ),
    ] {
        check(TIES, from, to, key, needle);
    }
    // A value inside a list of filter entries: the line where the list starts.
    check_at(
        TIES,
        "          value: 0.4",
        "          value: 2",
        "        - filter: mlp",
        "density",
        "[0, 1]",
    );
    let della = TIES.replace("merge_method: ties", "merge_method: della");
    check(
        &della,
        "  normalize: true",
        "  normalize: true\n  epsilon: 1.5",
        "epsilon",
        "[0, 1]",
    );
}

#[test]
fn fam_numbers_and_words_out_of_range_name_key_and_line() {
    for (from, to, key, needle) in [
        ("  density: 1.0", "  density: 0", "density", "in (0, 1]"),
        ("  density: 1.0", "  density: 1.2", "density", "in (0, 1]"),
        ("  sigma: 0.1", "  sigma: 0", "sigma", "> 0"),
        ("  beta: 0.0", "  beta: -0.5", "beta", "≥ 0"),
        ("  epsilon: 1.0e-8", "  epsilon: 0", "epsilon", "> 0"),
        ("  fos_min: -1.0", "  fos_min: .nan", "fos_min", "finite"),
        (
            "  lambda_proj: 0.5",
            "  lambda_proj: .inf",
            "lambda_proj",
            "finite",
        ),
        (
            "  lambda_grid: [0.0, 0.5, 1.0]",
            "  lambda_grid: [0.0, .nan]",
            "lambda_grid",
            "numbers",
        ),
        (
            "  lambda_grid: [0.0, 0.5, 1.0]",
            "  lambda_grid: []",
            "lambda_grid",
            "list of numbers",
        ),
        (
            "  preset: default",
            "  preset: fancy",
            "preset",
            "default, sketch",
        ),
        (
            "  matching: exact",
            "  matching: hungarian",
            "matching",
            "exact, greedy",
        ),
        (
            "  lambda_search: false",
            "  lambda_search: 3",
            "lambda_search",
            "true or false",
        ),
        (
            "groups: auto",
            "groups: mlp_only",
            "groups",
            "unknown group template",
        ),
        (
            "name_map: identity",
            "name_map: llava-to-llama",
            "name_map",
            "unknown built-in name map",
        ),
    ] {
        check(FAM, from, to, key, needle);
    }
}

#[test]
fn fam_only_keys_in_another_method_name_their_line() {
    check(
        SAFE_M,
        "dtype: float32",
        "dtype: float32\ngroups: auto",
        "groups",
        "for fam",
    );
    check(
        SAFE_M,
        "dtype: float32",
        "dtype: float32\nname_map: identity",
        "name_map",
        "for fam",
    );
}

#[test]
fn a_config_file_error_names_the_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("merge.yaml");
    std::fs::write(&path, SAFE_M.replace("  density: 0.2", "  density: 2")).unwrap();
    let e = MergeConfig::from_file(&path).unwrap_err();
    assert_eq!(e.file(), Some(path.as_path()), "{e}");
    assert_eq!(e.tensor(), Some("density"), "{e}");
    assert!(e.to_string().contains("line 12 "), "{e}");
    // Not UTF-8: an error naming the file, not a panic.
    std::fs::write(&path, b"merge_method: \xff\xfe\n").unwrap();
    let e = MergeConfig::from_file(&path).unwrap_err();
    assert_eq!(e.file(), Some(path.as_path()), "{e}");
}
