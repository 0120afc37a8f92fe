//! The least-squares layer solve of `merge_method: regmean` (SPEC §7)
//! against NumPy on the same matrices, in one run: the LLaMA-7B shapes
//! `o_proj` (4096 × 4096) and `down_proj` (4096 out × 11008 in), two
//! models, no bias, α = 0.9.
//!
//! flatmerge solves each layer single-threaded (`faer`, f64 Cholesky; the
//! engine parallelises across tensors, and one thread keeps the bytes
//! independent of the thread count); NumPy uses its BLAS's threads, so the
//! figure is flatmerge on one core against NumPy on every core. The
//! matrices are random: `W_k ~ N(0, 0.02²)` and `G_k = D_k + U_k U_kᵀ / 64`
//! (`D_k` a positive diagonal, `U_k` 64 random columns), a Gram-like
//! positive definite matrix that costs O(n²·64) to make.
//!
//! Run: `cargo bench --bench least_squares` (a few minutes on 2 cores;
//! `LS_BENCH=small` for 1024 × 1024 and 1024 × 2816). Needs python3 with
//! numpy for the comparison (skipped with a note otherwise).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use flatmerge::demo::Rng;
use flatmerge::least_squares::{RegMeanModel, RegMeanSystem, DEFAULT_ALPHA};

const MODELS: usize = 2;
const RANK: usize = 64;

fn gram(rng: &mut Rng, n: usize) -> Vec<f32> {
    let u = rng.normals(n * RANK, 1.0);
    let mut g = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            let ui = &u[i * RANK..][..RANK];
            let uj = &u[j * RANK..][..RANK];
            let dot: f32 = ui.iter().zip(uj).map(|(a, b)| a * b).sum::<f32>() / RANK as f32;
            g[i * n + j] = dot;
            g[j * n + i] = dot;
        }
        g[i * n + i] += 0.1 + (i % 7) as f32 * 0.05;
    }
    g
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write matrix");
}

fn main() {
    let shapes: &[(&str, usize, usize)] = if std::env::var("LS_BENCH").as_deref() == Ok("small") {
        &[("1024 × 1024", 1024, 1024), ("1024 × 2816", 1024, 2816)]
    } else {
        &[
            ("o_proj 4096 × 4096", 4096, 4096),
            ("down_proj 4096 × 11008", 4096, 11008),
        ]
    };
    println!(
        "least-squares layer solve (SPEC §7), {MODELS} models, α = {DEFAULT_ALPHA}; flatmerge on \
         1 thread, NumPy on its BLAS's threads ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("\n| layer (out × in) | flatmerge s | NumPy s | NumPy ÷ flatmerge | max |Δ| / max |W*| | NumPy solver |");
    println!("|---|---:|---:|---:|---:|---|");
    for &(label, out, inp) in shapes {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut rng = Rng::new(5, "least squares bench");
        let weights: Vec<Vec<f32>> = (0..MODELS).map(|_| rng.normals(out * inp, 0.02)).collect();
        let grams: Vec<Vec<f32>> = (0..MODELS).map(|_| gram(&mut rng, inp)).collect();
        let start = Instant::now();
        let mut system = RegMeanSystem::new(out, inp, false, DEFAULT_ALPHA).expect("system");
        for (w, g) in weights.iter().zip(&grams) {
            system
                .add_model(&RegMeanModel {
                    weight: w,
                    bias: None,
                    gram: g,
                    mean: None,
                    w: 1.0,
                })
                .expect("add");
        }
        let solution = system.solve().expect("solve");
        let ours = start.elapsed().as_secs_f64();

        for (k, (w, g)) in weights.iter().zip(&grams).enumerate() {
            write_f32(&dir.path().join(format!("w{k}.f32")), w);
            write_f32(&dir.path().join(format!("g{k}.f32")), g);
        }
        drop(grams);
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/python/regmean_solve.py"
        );
        let peer = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .args([out, inp, MODELS].map(|v| v.to_string()))
            .arg(DEFAULT_ALPHA.to_string())
            .output();
        let (theirs, solver, diff) = match peer {
            Ok(o) if o.status.success() => {
                let v: serde_json::Value =
                    serde_json::from_slice(&o.stdout).expect("the peer prints JSON");
                let bytes = std::fs::read(dir.path().join("numpy.f32")).expect("peer output");
                let x: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let scale = solution.weight.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = solution
                    .weight
                    .iter()
                    .zip(&x)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                (
                    format!("{:.2}", v["seconds"].as_f64().unwrap_or(f64::NAN)),
                    v["solver"].as_str().unwrap_or("?").to_string(),
                    format!("{:.1e}", diff / scale),
                )
            }
            Ok(o) => (
                "–".into(),
                format!(
                    "skipped: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .trim()
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
                "–".into(),
            ),
            Err(e) => ("–".into(), format!("skipped: no python3 ({e})"), "–".into()),
        };
        let ratio = theirs
            .parse::<f64>()
            .map_or("–".to_string(), |t| format!("{:.2}", t / ours));
        println!("| {label} | {ours:.2} | {theirs} | {ratio} | {diff} | {solver} |");
    }
}
