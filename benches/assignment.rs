//! The assignment solver (SPEC §2.3) on dense square similarity matrices,
//! maximising, as the alignment step calls it:
//! - `uniform`: every entry uniform in [0, 1) — the hard case for shortest
//!   augmenting paths (long searches once most columns are taken);
//! - `planted`: a random permutation with similarity 1 plus N(0, 0.1²)
//!   noise on every entry — what two copies of a layer look like.
//!
//! Also the correlation product before it, serial and parallel.
//!
//! Run: `cargo bench --bench assignment` (n = 256 and 1024);
//! `FLATMERGE_BENCH_LARGE=1 cargo bench --bench assignment` adds n = 2048,
//! 4096 and 11008 with 10 samples (about 5 minutes on 2 cores). The
//! matrices are reproducible: `docs/performance.md` regenerates the same
//! ones in NumPy to time SciPy's `linear_sum_assignment` on them, and each
//! optimum's total is printed once (stderr) to compare with SciPy's.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flatmerge::assignment::{solve_with, Method, Workspace};
use std::hint::black_box;
use std::time::Duration;

/// splitmix64: draw `k` (from 1) is `mix(seed + k·γ)`, which NumPy
/// reproduces without a loop.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Box–Muller, one normal from two uniforms.
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `n × n`, uniform in [0, 1), seed `n`.
fn uniform(n: usize) -> Vec<f64> {
    let mut rng = SplitMix(n as u64);
    (0..n * n).map(|_| rng.uniform()).collect()
}

/// `n × n`: row `i` has `1 + noise` at column `perm[i]`, noise elsewhere;
/// noise N(0, 0.1²); seed `n + 1`, the permutation drawn first
/// (Fisher–Yates from the end).
fn planted(n: usize) -> Vec<f64> {
    let mut rng = SplitMix(n as u64 + 1);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let mut sim: Vec<f64> = (0..n * n).map(|_| 0.1 * rng.normal()).collect();
    for (i, &p) in perm.iter().enumerate() {
        sim[i * n + p] += 1.0;
    }
    sim
}

fn bench_sizes(c: &mut Criterion, sizes: &[usize], large: bool) {
    let mut group = c.benchmark_group("assignment");
    if large {
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
    } else {
        group.sample_size(20);
    }
    let mut ws = Workspace::new();
    for &n in sizes {
        for (kind, make) in [
            ("uniform", uniform as fn(usize) -> Vec<f64>),
            ("planted", planted),
        ] {
            let costs = make(n);
            // The optimum once, to compare with SciPy's total on the same
            // matrix (docs/performance.md).
            let best = solve_with(&costs, n, n, true, Method::Exact, &mut ws)
                .expect("a finite matrix has an assignment");
            eprintln!("assignment/{kind}/{n}: optimum {:.9}", best.total);
            for (name, method) in [("exact", Method::Exact), ("greedy", Method::Greedy)] {
                group.bench_function(BenchmarkId::new(format!("{name}_{kind}"), n), |b| {
                    b.iter(|| {
                        solve_with(black_box(&costs), n, n, true, method, &mut ws)
                            .expect("a finite matrix has an assignment")
                    })
                });
            }
        }
    }
    group.finish();
}

/// The correlation product that feeds the assignment (SPEC §2.3), one
/// group of `n` neurons in each model over 512 probe rows, on one thread
/// (`fam::correlation`) and on all (`engine::fam::par_correlation`).
fn correlation(c: &mut Criterion, n: usize) {
    let rows = 512;
    let mut rng = SplitMix(n as u64 + 2);
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let (a, b) = (draw(n * rows), draw(n * rows));
    let mut group = c.benchmark_group("correlation");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.bench_function(BenchmarkId::new("serial", n), |bench| {
        bench.iter(|| flatmerge::fam::correlation(black_box(&a), n, &b, n))
    });
    group.bench_function(BenchmarkId::new("parallel", n), |bench| {
        bench.iter(|| flatmerge::engine::fam::par_correlation(black_box(&a), n, &b, n))
    });
    group.finish();
}

fn assignment(c: &mut Criterion) {
    bench_sizes(c, &[256, 1024], false);
    correlation(c, 1024);
    if std::env::var_os("FLATMERGE_BENCH_LARGE").is_some_and(|v| v == "1") {
        bench_sizes(c, &[2048, 4096, 11008], true);
        correlation(c, 11008);
    }
}

criterion_group!(benches, assignment);
criterion_main!(benches);
