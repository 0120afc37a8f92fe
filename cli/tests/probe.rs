//! `flatmerge probe` and `flatmerge probe-set sample` end to end on a tiny
//! generated MLP: the file equals the library's, does not depend on the
//! thread count, and bad inputs fail with one line naming the file.

use flatmerge::demo::Rng;
use flatmerge::probe::mlp::{Activation, Linear, Mlp, MlpSpec};
use flatmerge::probe::set::{read_probe_set, write_probe_set};
use flatmerge::probe::{probe_files, ProbeExample, ProbeOptions};
use flatmerge::stats::ActivationStats;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flatmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmerge"))
        .args(args)
        .output()
        .expect("run flatmerge")
}

fn assert_success(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flatmerge failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The one `error: …` line of a failed run (exit status 1).
fn error_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected an input error");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 6 → 12 → 12 → 3 MLP (GELU) and a 10-example probe set under `dir`.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let mut rng = Rng::new(11, "cli mlp");
    let spec = MlpSpec::chain(&[6, 12, 12, 3], Activation::Gelu, Activation::None);
    let layers = spec
        .layers
        .iter()
        .map(|l| Linear {
            weight: rng.normals(l.in_features * l.out_features, 0.4),
            bias: Some(rng.normals(l.out_features, 0.1)),
        })
        .collect();
    let model = dir.join("mlp");
    Mlp::new(spec, layers).unwrap().save(&model).unwrap();
    let set: Vec<ProbeExample> = (0..10)
        .map(|i| ProbeExample {
            modality: (i % 2) as u8,
            ..ProbeExample::features(rng.normals(6, 1.0))
        })
        .collect();
    let probe_set = dir.join("probe.jsonl");
    write_probe_set(&probe_set, &set).unwrap();
    (model, probe_set)
}

#[test]
fn probe_writes_the_statistics_the_library_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set) = fixture(tmp.path());
    let out = tmp.path().join("cli.stats.safetensors");
    let stdout = assert_success(&flatmerge(&[
        "probe",
        s(&model),
        "--probe-set",
        s(&set),
        "-o",
        s(&out),
        "--max-examples",
        "4",
    ]));
    assert!(stdout.contains("ran 10 examples"), "{stdout}");
    assert!(stdout.contains("3 layers"), "{stdout}");
    let stats = ActivationStats::load(&out).unwrap();
    assert_eq!(stats.examples, 4);
    assert_eq!(stats.layers.len(), 3);
    assert_eq!(stats.layer("fc3").unwrap().count, Some(10));

    let lib = tmp.path().join("lib.stats.safetensors");
    let options = ProbeOptions {
        max_examples: Some(4),
        ..ProbeOptions::default()
    };
    probe_files(&model, &set, &lib, &options).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes, std::fs::read(&lib).unwrap());

    // One thread or several: the same file.
    let one = tmp.path().join("one.stats.safetensors");
    assert_success(&flatmerge(&[
        "probe",
        s(&model),
        "--probe-set",
        s(&set),
        "-o",
        s(&one),
        "--max-examples",
        "4",
        "--threads",
        "1",
        "--quiet",
    ]));
    assert_eq!(bytes, std::fs::read(&one).unwrap());
}

#[test]
fn probe_errors_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set) = fixture(tmp.path());
    let out = tmp.path().join("x.stats.safetensors");
    let text = std::fs::read_to_string(&set).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = r#"{"input": [1, 2, 3, 4, 5, 6], "modality": "smell"}"#;
    std::fs::write(&set, lines.join("\n")).unwrap();
    let probe =
        |model: &Path| flatmerge(&["probe", s(model), "--probe-set", s(&set), "-o", s(&out)]);
    let line = error_line(&probe(&model));
    assert!(line.contains(s(&set)), "{line}");
    assert!(line.contains("line 2: unknown modality `smell`"), "{line}");

    lines[1] = r#"{"input": [1, 2, 3]}"#;
    std::fs::write(&set, lines.join("\n")).unwrap();
    let line = error_line(&probe(&model));
    assert!(
        line.contains("example 1 has 3 input features; the MLP takes 6"),
        "{line}"
    );

    let line = error_line(&probe(tmp.path()));
    assert!(line.contains("flatmerge_mlp.json"), "{line}");
    assert!(!out.exists(), "a failed probe wrote its output");
}

#[test]
fn probe_set_sample_draws_quotas_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, n) in [("vqa", 12), ("sqa", 6)] {
        let set: Vec<ProbeExample> = (0..n)
            .map(|i| ProbeExample::features(vec![i as f32, 1.0]))
            .collect();
        let path = tmp.path().join(format!("{name}.jsonl"));
        write_probe_set(&path, &set).unwrap();
        files.push(path);
    }
    let sample = |seed: &str, out: &Path| {
        flatmerge(&[
            "probe-set",
            "sample",
            s(&files[0]),
            s(&files[1]),
            "--per-source",
            "5",
            "--quota",
            "sqa=2",
            "--seed",
            seed,
            "-o",
            s(out),
        ])
    };
    let (a, b, c) = (
        tmp.path().join("a.jsonl"),
        tmp.path().join("b.jsonl"),
        tmp.path().join("c.jsonl"),
    );
    let stdout = assert_success(&sample("7", &a));
    assert!(
        stdout.contains("wrote 7 examples (sqa 2, vqa 5)"),
        "{stdout}"
    );
    assert_success(&sample("7", &b));
    assert_success(&sample("8", &c));
    let mixture = read_probe_set(&a).unwrap();
    assert_eq!(mixture.len(), 7);
    assert_eq!(mixture.iter().filter(|e| e.source == "sqa").count(), 2);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());

    let bad = flatmerge(&[
        "probe-set",
        "sample",
        s(&files[1]),
        "--per-source",
        "9",
        "-o",
        s(&c),
    ]);
    let line = error_line(&bad);
    assert!(
        line.contains("`sqa` has 6 examples, fewer than its quota 9"),
        "{line}"
    );
}

/// The fixture's probe set with sources `a` (even examples) and `b` (odd).
fn with_sources(set: &Path) {
    let mut examples = read_probe_set(set).unwrap();
    for (n, e) in examples.iter_mut().enumerate() {
        e.source = if n % 2 == 0 { "a" } else { "b" }.to_string();
    }
    write_probe_set(set, &examples).unwrap();
}

#[test]
fn gram_probes_by_source_combine_into_the_union_and_inspect_shows_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set) = fixture(tmp.path());
    with_sources(&set);
    let probe = |extra: &[&str], out: &Path| {
        let mut args = vec!["probe", s(&model), "--probe-set", s(&set), "-o", s(out)];
        args.extend_from_slice(extra);
        flatmerge(&args)
    };

    // The CLI writes what the library writes.
    let a = tmp.path().join("a.stats.safetensors");
    assert_success(&probe(&["--gram", "--sources", "a", "--quiet"], &a));
    let lib = tmp.path().join("lib.stats.safetensors");
    let options = ProbeOptions {
        gram: true,
        sources: Some(vec!["a".into()]),
        ..ProbeOptions::default()
    };
    probe_files(&model, &set, &lib, &options).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&lib).unwrap());
    let stats = ActivationStats::load(&a).unwrap();
    assert_eq!(stats.sources, Some(vec!["a".to_string()]));
    assert_eq!(stats.layer("fc1").unwrap().count, Some(5));
    assert_eq!(stats.layer("fc1").unwrap().gram_width(), Some(6));

    // Two ranks' parts combine into the file of the union, byte for byte.
    let (pa, pb) = (tmp.path().join("a.part"), tmp.path().join("b.part"));
    assert_success(&probe(&["--gram", "--sources", "a", "--part", "-q"], &pa));
    assert_success(&probe(&["--gram", "--sources", "b", "--part", "-q"], &pb));
    let combined = tmp.path().join("ab.stats.safetensors");
    let stdout = assert_success(&flatmerge(&[
        "stats",
        "combine",
        s(&pb),
        s(&pa),
        "-o",
        s(&combined),
    ]));
    assert!(stdout.contains("combined 2 recordings"), "{stdout}");
    let whole = tmp.path().join("whole.stats.safetensors");
    assert_success(&probe(&["--gram", "--sources", "a,b", "-q"], &whole));
    assert_eq!(
        std::fs::read(&combined).unwrap(),
        std::fs::read(&whole).unwrap()
    );

    // inspect names the second moments and the sources.
    let stdout = assert_success(&flatmerge(&["inspect", "--all", s(&combined)]));
    assert!(
        stdout.contains("second moments (x_gram) for 3 layers (3 stored, 0 shared)"),
        "{stdout}"
    );
    assert!(stdout.contains("sources a, b"), "{stdout}");
    assert!(stdout.contains("gram 12×12"), "{stdout}");
    let means = tmp.path().join("means.stats.safetensors");
    assert_success(&probe(&["-q"], &means));
    let stdout = assert_success(&flatmerge(&["inspect", s(&means)]));
    assert!(
        stdout.contains("no second moments (means only); recorded on every probe example"),
        "{stdout}"
    );
}

#[test]
fn gram_probe_and_combine_errors_are_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set) = fixture(tmp.path());
    with_sources(&set);
    let out = tmp.path().join("x.stats.safetensors");
    let line = error_line(&flatmerge(&[
        "probe",
        s(&model),
        "--probe-set",
        s(&set),
        "-o",
        s(&out),
        "--gram",
        "--sources",
        "a,zzz",
    ]));
    assert!(line.contains(s(&set)), "{line}");
    assert!(
        line.contains("source `zzz` not in the probe set (its sources: a, b)"),
        "{line}"
    );
    assert!(!out.exists());

    let part = tmp.path().join("a.part");
    assert_success(&flatmerge(&[
        "probe",
        s(&model),
        "--probe-set",
        s(&set),
        "-o",
        s(&part),
        "--gram",
        "--sources",
        "a",
        "--part",
        "-q",
    ]));
    let combine = |parts: &[&Path]| {
        let mut args = vec!["stats", "combine"];
        args.extend(parts.iter().map(|p| s(p)));
        args.extend(["-o", s(&out)]);
        flatmerge(&args)
    };
    let line = error_line(&combine(&[&part, &part]));
    assert!(
        line.contains("parts must cover disjoint examples"),
        "{line}"
    );
    assert!(!out.exists());

    // A finished statistics file is not a part.
    let finished = tmp.path().join("a.stats.safetensors");
    assert_success(&flatmerge(&[
        "probe",
        s(&model),
        "--probe-set",
        s(&set),
        "-o",
        s(&finished),
        "--gram",
        "--sources",
        "b",
        "-q",
    ]));
    let line = error_line(&combine(&[&part, &finished]));
    assert!(line.contains(s(&finished)), "{line}");
    assert!(!out.exists());
}
