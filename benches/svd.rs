//! The thin SVD behind `tsv`, `iso_c` and `iso_cts` (SPEC §8) against
//! NumPy's LAPACK on the same matrix, in one run: a LLaMA-7B `down_proj`
//! task matrix, 4096 out × 11008 in, f64.
//!
//! flatmerge decomposes each task matrix single-threaded (`faer`,
//! `Par::Seq`: the bytes do not depend on the thread count, and the engine
//! runs the tasks of a tensor in parallel instead); NumPy uses its BLAS's
//! threads, so the figure is flatmerge on one core against NumPy on every
//! core. The matrix is `N(0, 0.02²)` plus a rank-64 part ten times larger,
//! a task-matrix-like spectrum. The table gives the largest relative
//! difference of the singular values.
//!
//! Run: `cargo bench --bench svd` (a few minutes on 2 cores;
//! `SVD_BENCH=small` for 1024 × 2816). Needs python3 with numpy
//! (`benches/python/requirements.txt`) for the comparison, skipped with a
//! note otherwise.

use std::process::Command;
use std::time::Instant;

use flatmerge::demo::Rng;
use flatmerge::subspace::Svd;

const RANK: usize = 64;

fn main() {
    let (rows, cols) = if std::env::var("SVD_BENCH").as_deref() == Ok("small") {
        (1024, 2816)
    } else {
        (4096, 11008)
    };
    let mut rng = Rng::new(8, "svd bench");
    let mut a = rng.normals(rows * cols, 0.02);
    let u = rng.normals(rows * RANK, 0.2);
    let v = rng.normals(cols * RANK, 1.0 / (RANK as f32).sqrt());
    for i in 0..rows {
        for j in 0..cols {
            let dot: f32 = (0..RANK).map(|k| u[i * RANK + k] * v[j * RANK + k]).sum();
            a[i * cols + j] += dot;
        }
    }
    let a64: Vec<f64> = a.iter().map(|&x| f64::from(x)).collect();
    println!(
        "thin SVD of a {rows} × {cols} f64 matrix (SPEC §8); flatmerge (faer, Par::Seq) on 1 \
         thread, NumPy on its BLAS's threads ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let start = Instant::now();
    let svd = Svd::of(&a64, rows, cols).expect("svd");
    let ours = start.elapsed().as_secs_f64();
    drop(a64);
    let factors = 8 * (svd.u.len() + svd.v.len() + svd.s.len());
    let scratch = flatmerge::subspace::svd_scratch_bytes(rows, cols);

    let dir = tempfile::tempdir().expect("temporary directory");
    let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("a.f32"), bytes).expect("write matrix");
    drop(a);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/svd.py");
    let peer = Command::new("python3")
        .arg(script)
        .arg(dir.path())
        .args([rows, cols].map(|v| v.to_string()))
        .output();
    let (theirs, solver, diff) = match peer {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value =
                serde_json::from_slice(&o.stdout).expect("the peer prints JSON");
            let raw = std::fs::read(dir.path().join("numpy_s.f64")).expect("peer output");
            let s: Vec<f64> = raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let diff = svd
                .s
                .iter()
                .zip(&s)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs() / svd.s[0]));
            let mut solver = v["solver"].as_str().unwrap_or("?").to_string();
            if v["pinned"] != serde_json::Value::Bool(true) {
                solver.push_str(" (not the version pinned in benches/python/requirements.txt)");
            }
            (
                format!("{:.2}", v["seconds"].as_f64().unwrap_or(f64::NAN)),
                solver,
                format!("{diff:.1e}"),
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
    println!("\n| matrix | flatmerge s | NumPy s | NumPy ÷ flatmerge | max |Δσ| / σ₁ | factors + workspace | NumPy |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    println!(
        "| {rows} × {cols} | {ours:.2} | {theirs} | {ratio} | {diff} | {:.2} GB | {solver} |",
        (factors + scratch) as f64 / 1e9
    );
}
