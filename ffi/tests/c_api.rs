//! C and C++ programs compiled against `include/flatmerge.h` and linked
//! with `libflatmerge.so` or `libflatmerge.a` give what the Rust API gives:
//! the same merged files, byte for byte, the same statistics file, the
//! same kernel results.

mod common;

use common::{assert_same_files, compile, family, fm_value, lib_dir, run, Link};
use engine::config::MergeConfig;
use engine::dtype::Dtype;
use engine::engine::{MergeOptions, PreparedMerge};
use engine::safe_m::{self, ElectionParams, ScoreForm};
use engine::stats::ActivationStats;
use std::path::Path;

fn rust_merge(config: MergeConfig, out_dir: &Path, shard: Option<u64>, threads: Option<usize>) {
    PreparedMerge::new(config)
        .unwrap()
        .run(&MergeOptions {
            out_dir: out_dir.to_path_buf(),
            max_shard_bytes: shard,
            threads,
            ..Default::default()
        })
        .unwrap();
}

#[test]
fn the_readme_example_merges_like_the_rust_api_linked_shared_and_static() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(&dir.path().join("family"));
    let expected = dir.path().join("rust");
    rust_merge(
        MergeConfig::from_file(&fam.config).unwrap(),
        &expected,
        None,
        None,
    );
    for link in [Link::Shared, Link::Static] {
        let exe = compile(
            &["example.c"],
            &format!("example_{link:?}"),
            link,
            dir.path(),
        );
        let out = dir.path().join(format!("c_{link:?}"));
        let output = run(&exe, &[&fam.config, &out]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(&format!("flatmerge {}", engine::VERSION)),
            "{stdout}"
        );
        assert!(stdout.contains("merged into"), "{stdout}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("tensors: lm_head.weight"), "{stderr}");
        assert_same_files(&expected, &out);
    }
}

#[test]
fn a_c_session_merges_yaml_with_options_and_records_like_rust() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(&dir.path().join("family"));
    let yaml = std::fs::read_to_string(&fam.config).unwrap();
    let expected = dir.path().join("rust");
    let mut config = MergeConfig::from_yaml(&yaml, &fam.dir, None).unwrap();
    config.out_dtype = Some(Dtype::F32);
    config.seed = 7;
    rust_merge(config, &expected, Some(20000), Some(1));
    assert!(
        expected.join("model.safetensors.index.json").is_file(),
        "the options should shard the output"
    );

    let exe = compile(&["session.c"], "session", Link::Shared, dir.path());
    let out = dir.path().join("c");
    // The output exists already: the session sets `force`.
    std::fs::create_dir(&out).unwrap();
    let stats = dir.path().join("c.stats.safetensors");
    let output = run(&exe, &[&fam.config, &fam.dir, &out, &stats]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tensors = engine::demo::LlamaShape {
        vocab: 64,
        hidden: 32,
        intermediate: 88,
        layers: 2,
    }
    .tensors()
    .len();
    assert!(
        stdout.contains(&format!("progress calls: {tensors}")),
        "{stdout}"
    );
    assert_same_files(&expected, &out);

    let rust_stats = dir.path().join("rust.stats.safetensors");
    common::rust_recorder_file(&rust_stats);
    assert!(
        std::fs::read(&stats).unwrap() == std::fs::read(&rust_stats).unwrap(),
        "the C recorder's file differs from the Rust recorder's"
    );
    let loaded = ActivationStats::load(&stats).unwrap();
    assert_eq!(loaded.examples, 4);
    assert_eq!(loaded.modality.as_deref(), Some(&[0u8, 1, 0, 1][..]));
    let down = loaded.layer("model.layers.0.mlp.down_proj").unwrap();
    let rows = down.x_rows.as_ref().unwrap();
    assert!(
        rows.row(2).iter().all(|&v| v == 0.0),
        "example 2 never reached the layer"
    );
}

/// The kernel inputs of `ffi/c/session.cpp`.
struct Tensors {
    ancestor: Vec<f32>,
    receiver: Vec<f32>,
    contributors: Vec<Vec<f32>>,
    x_mean: Vec<f32>,
    y: Vec<Vec<f32>>,
}

const ROWS: usize = 5;
const COLS: usize = 7;

fn tensors(n: usize) -> Tensors {
    let n = n as u64;
    let ancestor: Vec<f32> = (0..n).map(|i| fm_value(0, i, 0, 5)).collect();
    let receiver = (0..n)
        .map(|i| ancestor[i as usize] + fm_value(1, i, 1, 6) / 8.0)
        .collect();
    let contributors = (0..2u64)
        .map(|k| {
            (0..n)
                .map(|i| ancestor[i as usize] + fm_value(2 + k, i, 2, 7) / 8.0)
                .collect()
        })
        .collect();
    Tensors {
        ancestor,
        receiver,
        contributors,
        x_mean: (0..COLS as u64).map(|j| fm_value(9, j, 3, 8)).collect(),
        y: (0..4u64)
            .map(|m| {
                (0..ROWS as u64)
                    .map(|r| fm_value(10 + m, r, 4, 9))
                    .collect()
            })
            .collect(),
    }
}

fn election(model: usize) -> ElectionParams {
    match model {
        0 => ElectionParams {
            density: 0.4,
            form: ScoreForm::Sas { alpha: 1.0 },
        },
        1 => ElectionParams {
            density: 0.5,
            form: ScoreForm::Sas { alpha: 0.5 },
        },
        _ => ElectionParams {
            density: 0.6,
            form: ScoreForm::Ratio { epsilon: 1e-3 },
        },
    }
}

/// `session.cpp`'s kernel file, computed with the Rust API.
fn rust_kernels() -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut counts = Vec::new();
    for (n, is_bias) in [(ROWS * COLS, false), (ROWS, true)] {
        let t = tensors(n);
        let lambdas = [(1.0, 0.5), (0.75, 0.25)];
        let contributors: Vec<safe_m::Contributor<'_>> = (0..2)
            .map(|k| safe_m::Contributor {
                weight: &t.contributors[k],
                y_mean: &t.y[2 + k],
                election: election(1 + k),
                lambda_proj: lambdas[k].0,
                lambda_ortho: lambdas[k].1,
            })
            .collect();
        let x_mean: &[f32] = if is_bias { &[] } else { &t.x_mean };
        let merged = safe_m::merge_tensor(
            &t.receiver,
            &t.y[1],
            election(0),
            &t.ancestor,
            &t.y[0],
            x_mean,
            &contributors,
            is_bias,
            1e-8,
        );
        bytes.extend(merged.values.iter().flat_map(|v| v.to_le_bytes()));
        for c in merged.counts {
            for v in [c.receiver_elected, c.elected, c.conflicts, c.kept] {
                counts.extend(v.to_le_bytes());
            }
        }
    }
    bytes.extend(counts);
    bytes
}

#[test]
fn a_cpp_session_linked_static_matches_the_rust_kernels_and_recorder() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&["session.cpp"], "session_cpp", Link::Static, dir.path());
    let stats = dir.path().join("cpp.stats.safetensors");
    let kernels = dir.path().join("kernels.bin");
    let output = run(&exe, &[&stats, &kernels]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("session ok (C++)"));
    let expected = rust_kernels();
    let actual = std::fs::read(&kernels).unwrap();
    assert_eq!(actual.len(), expected.len());
    assert!(
        actual == expected,
        "the C++ kernel results differ from Rust's"
    );
    let rust_stats = dir.path().join("rust.stats.safetensors");
    common::rust_recorder_file(&rust_stats);
    assert!(
        std::fs::read(&stats).unwrap() == std::fs::read(&rust_stats).unwrap(),
        "four C++ threads pushing gave another file than Rust pushing in order"
    );
    // The static program does not need the shared library at run time.
    let ldd = std::process::Command::new("ldd").arg(&exe).output();
    if let Ok(ldd) = ldd {
        let text = String::from_utf8_lossy(&ldd.stdout);
        assert!(!text.contains("libflatmerge"), "{text}");
    }
    let _ = lib_dir();
}

/// The README's C section quotes `ffi/c/example.c`, which the first test
/// compiles: once README.md names the file, it must hold it verbatim.
#[test]
fn the_readme_quotes_the_compiled_example() {
    let example = std::fs::read_to_string(common::c_dir().join("example.c")).unwrap();
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    if !readme.contains("ffi/c/example.c") {
        eprintln!("README.md has no C API section yet (it should quote ffi/c/example.c)");
        return;
    }
    assert!(
        readme.contains(&example),
        "README.md must quote ffi/c/example.c verbatim"
    );
}
