//! `kernels.cu` checked on machines without a GPU: compiled as C++ with the
//! CUDA built-ins it uses emulated on the CPU (`tests/emulator/`), with
//! `-ffp-contract=off` for NVRTC's `--fmad=false`, launched in the order and
//! the chunks `device.rs` uses, and compared with the CPU reference bit for
//! bit. What this cannot check (the driver, NVRTC, device.rs's copies) the
//! tests in `agreement.rs` check on a GPU.
//!
//! Needs g++ with C++20 (`<barrier>`); without it the test prints a skip.

use flatmerge::safe_m::{self, ContributorBlock, Election, MaskCounts, ScoreForm};
use flatmerge::{fam, reduce, select};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROWS: usize = 37;
const COLS: usize = 53;
const N_A: usize = 20;
const N_B: usize = 13;
const PROBE_ROWS: usize = 77;

fn say(line: &str) {
    // Not through `eprintln!`, which the harness captures: a skip must show.
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Seeded values with exact zeros, ties, both signs and magnitudes 1e-3..10.
struct Random(u64);

impl Random {
    fn value(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let r = self.0;
        match r % 16 {
            0 => 0.0,
            1 => 0.5,
            _ => {
                let unit = (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                (unit * 10f64.powi((r % 5) as i32 - 3)) as f32
            }
        }
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    fn near(&mut self, base: &[f32]) -> Vec<f32> {
        base.iter().map(|&b| b + 0.1 * self.value()).collect()
    }
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The emulator built in `dir`, or why it cannot be.
fn build_emulator(dir: &Path) -> Result<PathBuf, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator/emulator.cpp");
    let binary = dir.join("emulator");
    let out = Command::new("g++")
        .args(["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|e| format!("cannot run g++: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "g++ could not build the emulator (C++20 <barrier> needs g++ 11 or later): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    Ok(binary)
}

#[test]
fn the_kernels_compute_what_the_cpu_computes() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = match build_emulator(dir.path()) {
        Ok(binary) => binary,
        Err(problem) => {
            assert!(
                std::env::var_os("FLATMERGE_REQUIRE_EMULATOR").is_none(),
                "{problem}"
            );
            say(&format!("SKIP: CUDA kernel emulation: {problem}"));
            return;
        }
    };
    let n = ROWS * COLS;
    let mut rng = Random(11);
    let c = rng.vec(n);
    let (a, b1, b2) = (rng.near(&c), rng.near(&c), rng.near(&c));
    let d = rng.vec(COLS);
    let us = [rng.vec(ROWS), rng.vec(ROWS), rng.vec(ROWS)];
    let lambdas = [1.0f32, 0.5, 0.7, 0.25];
    let forms = [
        ScoreForm::Sas { alpha: 1.0 },
        ScoreForm::Sas { alpha: 0.3 },
        ScoreForm::Ratio { epsilon: 1e-8 },
    ];
    let mut scores = vec![vec![0f32; n]; 3];
    for (k, w) in [&a, &b1, &b2].into_iter().enumerate() {
        safe_m::score_matrix(w, &us[k], &d, forms[k], &mut scores[k]);
    }
    let thresholds: Vec<f32> = [0.2, 0.5, 0.9]
        .iter()
        .zip(&scores)
        .map(|(&density, s)| select::election_threshold(s, density))
        .collect();
    let dd = reduce::sum_squares(&d);
    let ca = fam::standardise_columns(&rng.vec(PROBE_ROWS * N_A), N_A, true);
    let cb = fam::standardise_columns(&rng.vec(PROBE_ROWS * N_B), N_B, true);

    let mut input = Vec::new();
    for values in [&a, &c, &b1, &b2, &d, &us[0], &us[1], &us[2]] {
        input.extend(bytes(values));
    }
    input.extend(bytes(&lambdas));
    input.extend(bytes(&thresholds));
    input.extend(bytes(&ca));
    input.extend(bytes(&cb));
    input.extend(dd.to_le_bytes());
    let (in_path, out_path) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&in_path, input).unwrap();
    let sizes = [ROWS, COLS, N_A, N_B, PROBE_ROWS].map(|s| s.to_string());
    let run = Command::new(&emulator)
        .args(sizes)
        .arg(&in_path)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(run.status.success(), "emulator: {run:?}");
    let output = std::fs::read(&out_path).unwrap();
    let mut at = 0;
    let mut take = |len: usize| {
        at += len;
        &output[at - len..at]
    };
    let floats = |raw: &[u8]| -> Vec<u32> {
        raw.chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let same = |emulated: Vec<u32>, cpu: &[f32], what: &str| {
        let cpu: Vec<u32> = cpu.iter().map(|v| v.to_bits()).collect();
        let differ = emulated.iter().zip(&cpu).filter(|(e, c)| e != c).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} values differ", cpu.len());
    };

    for (k, s) in scores.iter().enumerate() {
        same(
            floats(take(4 * n)),
            s,
            &format!("score_matrix {:?}", forms[k]),
        );
    }
    for bias in [false, true] {
        let blocks: Vec<ContributorBlock<'_>> = [&b1, &b2]
            .into_iter()
            .enumerate()
            .map(|(k, w)| ContributorBlock {
                weight: w,
                election: Election {
                    scores: &scores[k + 1],
                    threshold: thresholds[k + 1],
                },
                lambda_proj: lambdas[2 * k],
                lambda_ortho: lambdas[2 * k + 1],
            })
            .collect();
        let mut fused = vec![0f32; n];
        let mut counts = vec![MaskCounts::default(); 2];
        safe_m::fuse_block(
            &a,
            &c,
            Election {
                scores: &scores[0],
                threshold: thresholds[0],
            },
            &blocks,
            (!bias).then(|| (&d[..], dd)),
            1e-8,
            &mut fused,
            &mut Vec::new(),
            &mut counts,
        );
        assert!(
            counts.iter().all(|c| c.kept > 0 && c.kept < n as u64),
            "{counts:?}"
        );
        for chunking in ["whole", "in chunks"] {
            let what = format!("fuse_block bias={bias} {chunking}");
            same(floats(take(4 * n)), &fused, &what);
            for count in &counts {
                let got: Vec<u64> = take(32)
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let want = [
                    count.receiver_elected,
                    count.elected,
                    count.conflicts,
                    count.kept,
                ];
                assert_eq!(got, want, "{what}: counts");
            }
        }
    }
    let cpu = fam::correlation(&ca, N_A, &cb, N_B);
    let emulated = floats(take(4 * N_A * N_B));
    let tolerance = 2.0 * PROBE_ROWS as f32 * f32::EPSILON;
    for (i, (e, c)) in emulated.iter().zip(&cpu).enumerate() {
        let e = f32::from_bits(*e);
        assert!((e - c).abs() <= tolerance, "correlation {i}: {e} vs {c}");
    }
    assert_eq!(
        at,
        output.len(),
        "everything the emulator wrote was compared"
    );
}
