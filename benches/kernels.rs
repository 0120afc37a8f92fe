//! Kernel throughput, each next to a plain memory scan of the same bytes
//! measured in the same run (the floor a kernel is compared with).
//! Run: `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flatmerge::baselines::{dare_drop_in_place, linear_combine};
use flatmerge::demo::{bf16_fine_tune, Rng};
use flatmerge::dtype::{decode_f32, decode_f32_with, encode_f32, encode_f32_with, Dtype};
use flatmerge::engine::parallel_select;
use flatmerge::safe_m::{
    fuse_block, score_matrix, ContributorBlock, Election, MaskCounts, ScoreForm,
};
use flatmerge::select::{
    election_threshold, kth_largest, scan_bracket, KeyOf, SampleBracket, SAMPLE_SIZE,
};
use flatmerge::simd::Isa;
use std::hint::black_box;

const ROWS: usize = 1024;
const COLS: usize = 1024;

fn kernels(c: &mut Criterion) {
    let n = ROWS * COLS;
    let mut rng = Rng::new(0, "bench");
    let w_a = rng.normals(n, 0.02);
    let w_b = rng.normals(n, 0.02);
    let w_c = rng.normals(n, 0.02);
    let u = rng.normals(ROWS, 1.0);
    let v = rng.normals(COLS, 1.0);
    let mut bf16 = vec![0u8; n * 2];
    encode_f32(Dtype::BF16, &w_a, &mut bf16);
    let mut group = c.benchmark_group("kernels");
    group.sample_size(20);

    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("memory_scan_f32", |b| {
        b.iter(|| {
            black_box(&w_a)
                .iter()
                .fold(0u32, |acc, x| acc ^ x.to_bits())
        })
    });
    group.bench_function("score_matrix_sas", |b| {
        let mut out = vec![0f32; n];
        b.iter(|| {
            score_matrix(
                black_box(&w_a),
                &u,
                &v,
                ScoreForm::Sas { alpha: 1.0 },
                &mut out,
            )
        })
    });
    let mut scores = vec![0f32; n];
    score_matrix(&w_a, &u, &v, ScoreForm::default(), &mut scores);
    group.bench_function("election_threshold_k0.2", |b| {
        b.iter(|| election_threshold(black_box(&scores), 0.2))
    });
    group.bench_function("fuse_block", |b| {
        let t = kth_largest(&scores, n / 5);
        let d_sq = flatmerge::reduce::sum_squares(&v);
        let mut out = vec![0f32; n];
        let mut scratch = Vec::new();
        b.iter(|| {
            let mut counts = [MaskCounts::default()];
            let block = ContributorBlock {
                weight: &w_b,
                election: Election {
                    scores: &scores,
                    threshold: t,
                },
                lambda_proj: 1.0,
                lambda_ortho: 0.5,
            };
            fuse_block(
                &w_a,
                &w_c,
                Election {
                    scores: &scores,
                    threshold: t,
                },
                &[block],
                Some((&v, d_sq)),
                1e-8,
                &mut out,
                &mut scratch,
                &mut counts,
            );
        })
    });
    group.throughput(Throughput::Bytes((n * 2) as u64));
    group.bench_function("memory_scan_bf16_bytes", |b| {
        b.iter(|| {
            black_box(&bf16).chunks_exact(8).fold(0u64, |acc, x| {
                acc ^ u64::from_le_bytes(x.try_into().unwrap())
            })
        })
    });
    group.bench_with_input(BenchmarkId::new("decode", "bf16"), &bf16, |b, bytes| {
        let mut out = vec![0f32; n];
        b.iter(|| decode_f32(Dtype::BF16, black_box(bytes), &mut out))
    });
    group.finish();
}

/// The conversions, the selection scan and the baseline kernels on every
/// instruction set this CPU has, in f32 bytes per second, beside a memory
/// scan of the same f32 bytes.
fn per_instruction_set(c: &mut Criterion) {
    let n = ROWS * COLS;
    let mut rng = Rng::new(1, "bench isa");
    let values = rng.normals(n, 0.02);
    let other = rng.normals(n, 0.02);
    let mut group = c.benchmark_group("isa");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("memory_scan_f32", |b| {
        b.iter(|| {
            black_box(&values)
                .iter()
                .fold(0u32, |acc, x| acc ^ x.to_bits())
        })
    });
    for isa in Isa::supported() {
        for dtype in [Dtype::BF16, Dtype::F16] {
            let mut bytes = vec![0u8; n * 2];
            encode_f32_with(isa, dtype, &values, &mut bytes);
            let mut out = vec![0f32; n];
            group.bench_function(
                BenchmarkId::new(format!("decode_{dtype}"), isa.as_str()),
                |b| b.iter(|| decode_f32_with(isa, dtype, black_box(&bytes), &mut out)),
            );
            group.bench_function(
                BenchmarkId::new(format!("encode_{dtype}"), isa.as_str()),
                |b| b.iter(|| encode_f32_with(isa, dtype, black_box(&values), &mut bytes)),
            );
        }
    }
    // The kernels below run on the selected instruction set
    // (`FLATMERGE_SIMD=scalar cargo bench --bench kernels` for the reference).
    let mut sample: Vec<u32> = (0..SAMPLE_SIZE)
        .map(|i| KeyOf::Magnitude.of(values[SampleBracket::sample_index(i, n)]))
        .collect();
    let bracket = SampleBracket::from_sample(&mut sample, n, n / 5);
    group.bench_function("scan_bracket_k0.2", |b| {
        let mut inside = Vec::with_capacity(n / 8);
        b.iter(|| {
            inside.clear();
            scan_bracket(black_box(&values), KeyOf::Magnitude, bracket, &mut inside)
        })
    });
    group.bench_function("radix_kth_largest_k0.2", |b| {
        let magnitudes: Vec<f32> = values.iter().map(|x| x.abs()).collect();
        b.iter(|| kth_largest(black_box(&magnitudes), n / 5))
    });
    group.bench_function("linear_combine_2", |b| {
        let mut out = vec![0f32; n];
        b.iter(|| linear_combine(&[black_box(&values), &other], &[0.5, 0.5], false, &mut out))
    });
    group.bench_function("dare_drop_k0.2", |b| {
        let mut tau = values.clone();
        b.iter(|| dare_drop_in_place(black_box(&mut tau), 7, 0, 0.2))
    });
    group.finish();
}

/// The exact parallel selection (TIES' trim at density 0.2, by magnitude)
/// on a q_proj-sized task vector: normal values, and a difference of bf16
/// weights ([`bf16_fine_tune`]), whose many equal magnitudes overflow the
/// sampled bracket. Beside a memory scan of the same f32 bytes.
fn selection(c: &mut Criterion) {
    let n = 2048 * 2048;
    let mut rng = Rng::new(2, "bench select");
    let normal = rng.normals(n, 0.02);
    let (base, tuned) = bf16_fine_tune(&rng.normals(n, 0.02), &mut rng, 5e-5, 2e-3, 0.05);
    let bf16_diff: Vec<f32> = tuned.iter().zip(&base).map(|(t, b)| t - b).collect();
    let m = n / 5;
    for (name, data) in [("normal", &normal), ("bf16_diff", &bf16_diff)] {
        let t = parallel_select(data, m, KeyOf::Magnitude);
        let ties = data
            .iter()
            .filter(|&&x| KeyOf::Magnitude.of(x) == t)
            .count();
        println!(
            "select {name}: {:.2}% of the elements tie at the threshold",
            100.0 * ties as f64 / n as f64
        );
    }
    let mut group = c.benchmark_group("select");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("memory_scan_f32", |b| {
        b.iter(|| {
            black_box(&normal)
                .iter()
                .fold(0u32, |acc, x| acc ^ x.to_bits())
        })
    });
    for (name, data) in [("normal", &normal), ("bf16_diff", &bf16_diff)] {
        group.bench_function(BenchmarkId::new("parallel_select_k0.2", name), |b| {
            b.iter(|| parallel_select(black_box(data), m, KeyOf::Magnitude))
        });
    }
    group.finish();
}

criterion_group!(benches, kernels, per_instruction_set, selection);
criterion_main!(benches);
