//! The device path against the CPU reference on seeded random tensors.
//!
//! Without a usable CUDA device (no `cuda` feature, no driver, no device)
//! each test prints a `SKIP:` line and passes; `FLATMERGE_REQUIRE_CUDA=1`
//! turns the skip into a failure, for runs on a GPU machine.

use flatmerge::safe_m::{
    self, Contributor, ContributorBlock, Election, ElectionParams, MaskCounts, ScoreForm,
};
use flatmerge::{fam, reduce, select};
use flatmerge_cuda::{Accelerator, Backend, CudaOptions, ErrorKind};
use std::io::Write;

/// A line on the process's stderr, not through `eprintln!`, which the test
/// harness captures: a skip must be visible in a passing run.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The device, or `None` after a visible skip line.
fn device(options: CudaOptions) -> Option<Accelerator> {
    let accelerator = Accelerator::new(&options);
    if accelerator.is_gpu() {
        return Some(accelerator);
    }
    if std::env::var_os("FLATMERGE_REQUIRE_CUDA").is_some() {
        panic!(
            "FLATMERGE_REQUIRE_CUDA is set but {}",
            accelerator.backend()
        );
    }
    say(&format!("SKIP: no CUDA device: {}", accelerator.backend()));
    None
}

/// Seeded values with the hazards of real weights: exact zeros, ties,
/// both signs, a wide range of magnitudes.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn value(&mut self) -> f32 {
        let r = self.next();
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

    /// `base` plus a perturbation: a fine-tune of `base`.
    fn near(&mut self, base: &[f32]) -> Vec<f32> {
        base.iter().map(|&b| b + 0.1 * self.value()).collect()
    }
}

const FORMS: [ScoreForm; 3] = [
    ScoreForm::Sas { alpha: 1.0 },
    ScoreForm::Sas { alpha: 0.3 },
    ScoreForm::Ratio { epsilon: 1e-8 },
];

fn same_bits(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            g.to_bits() == c.to_bits(),
            "{what}: element {i}: device {g:e} ({:#x}), CPU {c:e} ({:#x})",
            g.to_bits(),
            c.to_bits()
        );
    }
}

/// Options that force many chunks for tensors of a few thousand elements.
fn tight(bytes: usize) -> CudaOptions {
    CudaOptions {
        device: 0,
        memory_limit: Some(bytes),
    }
}

#[test]
fn without_a_device_the_cpu_runs_and_says_so_once() {
    let first = Accelerator::new(&CudaOptions::default());
    let second = Accelerator::new(&CudaOptions::default());
    assert!(Accelerator::cpu().fallback_notice().is_none());
    if first.is_gpu() {
        assert!(first.fallback_notice().is_none() && second.fallback_notice().is_none());
        say(&format!("running on {}", first.backend()));
        return;
    }
    // Another test may have been the first to fall back; this one's second
    // accelerator is never the first.
    assert!(second.fallback_notice().is_none(), "announced once");
    if let Some(notice) = first.fallback_notice() {
        say(&notice);
    }
    let Backend::Cpu { reason } = first.backend() else {
        unreachable!()
    };
    assert!(!reason.is_empty());
    // The fallback is the reference itself.
    let mut rng = Random(7);
    let (w, u, v) = (rng.vec(12), rng.vec(3), rng.vec(4));
    let mut cpu = vec![0.0; 12];
    let mut fallback = vec![0.0; 12];
    safe_m::score_matrix(&w, &u, &v, ScoreForm::default(), &mut cpu);
    first
        .score_matrix(&w, &u, &v, ScoreForm::default(), &mut fallback)
        .unwrap();
    same_bits(&fallback, &cpu, "fallback scores");
}

#[test]
fn scores_are_bit_identical() {
    let Some(gpu) = device(CudaOptions::default()) else {
        return;
    };
    let chunked = device(tight(4 * 1024)).unwrap();
    let mut rng = Random(1);
    for (rows, cols) in [(1, 1), (7, 5), (64, 129), (300, 301)] {
        let (w, u, v) = (rng.vec(rows * cols), rng.vec(rows), rng.vec(cols));
        for form in FORMS {
            let mut cpu = vec![0.0; rows * cols];
            safe_m::score_matrix(&w, &u, &v, form, &mut cpu);
            for accelerator in [&gpu, &chunked] {
                let mut out = vec![f32::NAN; rows * cols];
                accelerator
                    .score_matrix(&w, &u, &v, form, &mut out)
                    .unwrap();
                same_bits(&out, &cpu, &format!("score_matrix {rows}×{cols} {form:?}"));
            }
            let mut cpu = vec![0.0; rows];
            safe_m::score_vector(&u, &v[..1].repeat(rows), form, &mut cpu);
            let mut out = vec![f32::NAN; rows];
            gpu.score_vector(&u, &v[..1].repeat(rows), form, &mut out)
                .unwrap();
            same_bits(&out, &cpu, &format!("score_vector {rows} {form:?}"));
        }
    }
}

#[test]
fn election_counts_agree() {
    let Some(gpu) = device(CudaOptions::default()) else {
        return;
    };
    let chunked = device(tight(1000)).unwrap();
    let mut rng = Random(2);
    let scores: Vec<f32> = rng.vec(10_007).iter().map(|s| s.abs()).collect();
    for density in [0.01, 0.2, 0.5, 1.0] {
        let t = select::election_threshold(&scores, density);
        let cpu = scores.iter().filter(|&&s| select::is_elected(s, t)).count() as u64;
        assert_eq!(
            gpu.count_elected(&scores, t).unwrap(),
            cpu,
            "density {density}"
        );
        assert_eq!(
            chunked.count_elected(&scores, t).unwrap(),
            cpu,
            "chunked, density {density}"
        );
    }
}

/// A receiver, an ancestor and two contributors with their elections.
struct Case {
    a: Vec<f32>,
    c: Vec<f32>,
    scores: Vec<Vec<f32>>,
    thresholds: Vec<f32>,
    weights: Vec<Vec<f32>>,
    d: Vec<f32>,
}

fn case(rng: &mut Random, rows: usize, cols: usize) -> Case {
    let n = rows * cols;
    let c = rng.vec(n);
    let a = rng.near(&c);
    let weights = vec![rng.near(&c), rng.near(&c)];
    let d = rng.vec(cols);
    let mut scores = Vec::new();
    let mut thresholds = Vec::new();
    for (k, w) in std::iter::once(&a).chain(&weights).enumerate() {
        let u = rng.vec(rows);
        let mut s = vec![0.0; n];
        safe_m::score_matrix(w, &u, &d, FORMS[k % FORMS.len()], &mut s);
        thresholds.push(select::election_threshold(&s, [0.2, 0.5, 0.9][k]));
        scores.push(s);
    }
    Case {
        a,
        c,
        scores,
        thresholds,
        weights,
        d,
    }
}

fn fuse(accelerator: Option<&Accelerator>, case: &Case, bias: bool) -> (Vec<f32>, Vec<MaskCounts>) {
    let blocks: Vec<ContributorBlock<'_>> = case
        .weights
        .iter()
        .enumerate()
        .map(|(k, w)| ContributorBlock {
            weight: w,
            election: Election {
                scores: &case.scores[k + 1],
                threshold: case.thresholds[k + 1],
            },
            lambda_proj: [1.0, 0.7][k],
            lambda_ortho: [0.5, 0.25][k],
        })
        .collect();
    let receiver = Election {
        scores: &case.scores[0],
        threshold: case.thresholds[0],
    };
    let direction = (!bias).then(|| (&case.d[..], reduce::sum_squares(&case.d)));
    let mut out = vec![f32::NAN; case.a.len()];
    let mut counts = vec![MaskCounts::default(); blocks.len()];
    match accelerator {
        Some(acc) => acc
            .fuse_block(
                &case.a,
                &case.c,
                receiver,
                &blocks,
                direction,
                1e-8,
                &mut out,
                &mut counts,
            )
            .unwrap(),
        None => safe_m::fuse_block(
            &case.a,
            &case.c,
            receiver,
            &blocks,
            direction,
            1e-8,
            &mut out,
            &mut Vec::new(),
            &mut counts,
        ),
    }
    (out, counts)
}

#[test]
fn masks_projection_and_fusion_are_bit_identical() {
    let Some(gpu) = device(CudaOptions::default()) else {
        return;
    };
    let mut rng = Random(3);
    for (rows, cols) in [(1, 1), (5, 3), (37, 53), (256, 1031)] {
        let case = case(&mut rng, rows, cols);
        // Room for three rows of the weight per chunk (device.rs's footprint
        // of fuse_block with two contributors), so the bias takes several too.
        let chunked = device(tight(4 * cols + 8 * 7 + 3 * (28 * cols + 4) + 1)).unwrap();
        for bias in [false, true] {
            let (cpu, cpu_counts) = fuse(None, &case, bias);
            for (name, acc) in [("whole", &gpu), ("chunked", &chunked)] {
                let (out, counts) = fuse(Some(acc), &case, bias);
                let what = format!("fuse_block {rows}×{cols} bias={bias} {name}");
                same_bits(&out, &cpu, &what);
                assert_eq!(counts, cpu_counts, "{what}: counts");
            }
        }
    }
}

#[test]
fn a_whole_tensor_merge_is_bit_identical() {
    let Some(gpu) = device(CudaOptions::default()) else {
        return;
    };
    let mut rng = Random(4);
    let (rows, cols) = (96, 200);
    let c = rng.vec(rows * cols);
    let a = rng.near(&c);
    let b = rng.near(&c);
    let x = rng.vec(cols);
    let (ya, yb, yc) = (rng.vec(rows), rng.vec(rows), rng.vec(rows));
    for is_bias in [false, true] {
        let n = if is_bias { rows } else { rows * cols };
        let contributors = [Contributor {
            weight: &b[..n],
            y_mean: &yb,
            election: ElectionParams {
                density: 0.3,
                form: ScoreForm::Ratio { epsilon: 1e-8 },
            },
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }];
        let params = ElectionParams {
            density: 0.2,
            form: ScoreForm::default(),
        };
        let args = (&a[..n], &ya[..], params, &c[..n], &yc[..], &x[..]);
        let cpu = safe_m::merge_tensor(
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            args.5,
            &contributors,
            is_bias,
            1e-8,
        );
        let dev = gpu
            .merge_tensor(
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                &contributors,
                is_bias,
                1e-8,
            )
            .unwrap();
        same_bits(
            &dev.values,
            &cpu.values,
            &format!("merge_tensor bias={is_bias}"),
        );
        assert_eq!(dev.counts, cpu.counts);
    }
}

#[test]
fn correlation_agrees_up_to_summation_order() {
    let Some(gpu) = device(CudaOptions::default()) else {
        return;
    };
    let mut rng = Random(5);
    let (n_a, n_b, rows) = (70, 45, 333);
    let a = fam::standardise_columns(&rng.vec(rows * n_a), n_a, true);
    let b = fam::standardise_columns(&rng.vec(rows * n_b), n_b, true);
    let cpu = fam::correlation(&a, n_a, &b, n_b);
    // B whole, a few rows of A per chunk.
    let fixed = 4 * n_b * rows;
    let chunked = device(tight(fixed + 4 * 4 * (rows + n_b))).unwrap();
    let tolerance = 4.0 * rows as f32 * f32::EPSILON / 2.0;
    for acc in [&gpu, &chunked] {
        let dev = acc.correlation(&a, n_a, &b, n_b).unwrap();
        for (i, (g, c)) in dev.iter().zip(&cpu).enumerate() {
            assert!((g - c).abs() <= tolerance, "entry {i}: device {g}, CPU {c}");
        }
    }
}

#[test]
fn a_limit_below_one_row_is_an_error_not_a_wrong_result() {
    let Some(gpu) = device(tight(16)) else {
        return;
    };
    let mut out = vec![0.0; 100 * 100];
    let e = gpu
        .score_matrix(
            &vec![1.0; 100 * 100],
            &[1.0; 100],
            &[1.0; 100],
            ScoreForm::default(),
            &mut out,
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
}
