//! What the performance work must not change, checked on the real binary:
//! every instruction set (`FLATMERGE_SIMD`) writes the same bytes as the
//! scalar reference, and peak memory is bounded by a few tensors — it does
//! not grow with the number of tensors in the model.

use flatmerge::demo::{write_family, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::simd::Isa;
use std::path::Path;
use std::process::Command;

/// The methods with the most distinct kernels (conversion, combination,
/// selection, random drop, SAFE-M scoring and fusion).
const METHODS: [&str; 5] = ["linear", "task_arithmetic", "ties", "dare_ties", "safe_m"];

fn config(method: &str) -> String {
    let models = "models:\n  - model: ./A\n    parameters: {weight: 0.6, density: 0.3}\n  - model: ./B\n    parameters: {weight: 0.4, density: 0.3}\n";
    match method {
        "safe_m" => "merge_method: safe_m\nbase_model: ./C\nbase_model_stats: ./C.stats.safetensors\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n  - model: ./B\n    stats: ./B.stats.safetensors\n".to_string(),
        "linear" => "merge_method: linear\nmodels:\n  - model: ./A\n    parameters: {weight: 0.6}\n  - model: ./B\n    parameters: {weight: 0.4}\n".to_string(),
        _ => format!("merge_method: {method}\nbase_model: ./C\n{models}"),
    }
}

/// Runs `flatmerge merge` on `dir/<method>.yaml` into `out`; returns stdout.
fn merge(dir: &Path, method: &str, out: &Path, isa: Option<Isa>) -> String {
    let config_path = dir.join(format!("{method}.yaml"));
    std::fs::write(&config_path, config(method)).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_flatmerge"));
    command
        .arg("merge")
        .arg(&config_path)
        .arg(out)
        .arg("--force");
    if let Some(isa) = isa {
        command.env("FLATMERGE_SIMD", isa.as_str());
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{method}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_instruction_set_writes_the_scalar_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    // Rows of 300 columns: vector tails everywhere; tensors above the
    // 65 536 elements where the sampled selection takes over.
    let shape = LlamaShape {
        vocab: 700,
        hidden: 300,
        intermediate: 820,
        layers: 2,
    };
    write_family(tmp.path(), &shape, Dtype::BF16, 1, 5).unwrap();
    let isas: Vec<Isa> = Isa::supported().collect();
    println!("instruction sets on this machine: {isas:?}");
    for method in METHODS {
        let reference = tmp.path().join(format!("{method}-scalar"));
        merge(tmp.path(), method, &reference, Some(Isa::Scalar));
        let expected = std::fs::read(reference.join("model.safetensors")).unwrap();
        for &isa in &isas[1..] {
            let out = tmp.path().join(format!("{method}-{}", isa.as_str()));
            merge(tmp.path(), method, &out, Some(isa));
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            assert!(bytes == expected, "{method}: {isa:?} differs from scalar");
        }
    }
}

/// The peak resident memory the CLI reports, in MB.
fn peak_mb(stdout: &str) -> u64 {
    let tail = stdout
        .split("peak memory ")
        .nth(1)
        .unwrap_or_else(|| panic!("no peak memory in {stdout}"));
    tail.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn peak_memory_does_not_grow_with_the_number_of_tensors() {
    if flatmerge::engine::peak_resident_bytes().is_none() {
        println!("SKIP: this platform does not report peak memory");
        return;
    }
    // The same largest tensor (the embedding, 8192 × 512: 16.8 MB in f32);
    // 2 to 16 layers: the inputs grow from 3 × 31 MB to 3 × 118 MB.
    let shape = |layers| LlamaShape {
        vocab: 8192,
        hidden: 512,
        intermediate: 1376,
        layers,
    };
    let largest_f32_mb = 8192 * 512 * 4 / 1_000_000;
    // peaks[m][s]: method m's peak with the s-th layer count; every method
    // merges the same family.
    let mut peaks = vec![Vec::new(); METHODS.len()];
    for layers in [2, 8, 16] {
        let tmp = tempfile::tempdir().unwrap();
        write_family(tmp.path(), &shape(layers), Dtype::BF16, 1, 9).unwrap();
        for (m, method) in METHODS.iter().enumerate() {
            let stdout = merge(tmp.path(), method, &tmp.path().join("out"), None);
            peaks[m].push(peak_mb(&stdout));
        }
    }
    let linear = &peaks[0];
    for (method, peaks) in METHODS.iter().zip(&peaks) {
        println!("{method}: peak {peaks:?} MB with 2, 8 and 16 layers (linear {linear:?})");
        // Unreleased inputs alone would add ~260 MB from 2 to 16 layers;
        // allow one largest tensor's worth of allocator retention.
        let (low, high) = (peaks.iter().min().unwrap(), peaks.iter().max().unwrap());
        assert!(
            high - low <= largest_f32_mb,
            "{method}: peak memory grew with the model: {peaks:?} MB"
        );
        // The README's bound: TIES, DARE and task arithmetic stream their
        // task vectors (linear's peak plus one f32 tensor); SAFE-M adds one
        // f32 score per element and model (two here) of its largest tensor.
        let extra = if *method == "safe_m" { 3 } else { 1 } * largest_f32_mb;
        for (peak, linear) in peaks.iter().zip(linear) {
            assert!(
                *peak <= linear + extra,
                "{method}: peak {peak} MB is over linear's {linear} MB + {extra} MB"
            );
        }
    }
}
