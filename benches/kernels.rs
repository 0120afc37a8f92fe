//! Kernel throughput, each next to a plain memory scan of the same bytes
//! measured in the same run (the floor a kernel is compared with).
//! Run: `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flatmerge::demo::Rng;
use flatmerge::dtype::{decode_f32, encode_f32, Dtype};
use flatmerge::safe_m::{
    fuse_block, score_matrix, ContributorBlock, Election, MaskCounts, ScoreForm,
};
use flatmerge::select::{election_threshold, kth_largest};
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

criterion_group!(benches, kernels);
criterion_main!(benches);
