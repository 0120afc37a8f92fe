//! The tasks, generated in code from a seed: a pre-training task and three
//! fine-tuning tasks that differ in input distribution, label function,
//! number of classes and size of the update they need.
//!
//! - pre-training: `x ~ N(0, I)`, ten classes, labels the arg-max of a
//!   random two-layer tanh teacher `T₀`;
//! - `rotated` (task 1, a large update): inputs around their own mean,
//!   labels from `T₀`'s hidden features of a randomly *rotated* input read
//!   out by a new layer (eight classes) — the ancestor's features in the
//!   wrong basis, so the body has to move far;
//! - `blobs` (task 2, a small update): six Gaussian clusters around another
//!   mean — nearly linearly separable, so a new head on lightly adjusted
//!   features suffices;
//! - `teacher` (task 3, a medium update): a fresh narrow teacher on
//!   anisotropic inputs around a third mean, four classes.
//!
//! Every task has disjoint train / validation / test splits drawn from the
//! same distribution.

use super::nn::{Data, TrainConfig};
use flatmerge::demo::Rng;

/// Input width of every task.
pub const DIM: usize = 32;

/// Example counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Pre-training examples.
    pub pretrain: usize,
    /// Training examples per fine-tuning task.
    pub train: usize,
    /// Validation examples per task.
    pub val: usize,
    /// Test examples per task.
    pub test: usize,
    /// Probe examples drawn per task for the meta-probe.
    pub probe: usize,
    /// Epoch multiplier in percent (100 = the configured epochs).
    pub epoch_percent: usize,
}

impl Sizes {
    /// The full benchmark.
    pub const FULL: Sizes = Sizes {
        pretrain: 30_000,
        train: 6_000,
        val: 1_000,
        test: 3_000,
        probe: 256,
        epoch_percent: 100,
    };

    /// The quick mode (smoke test): everything smaller.
    pub const QUICK: Sizes = Sizes {
        pretrain: 4_000,
        train: 1_000,
        val: 300,
        test: 600,
        probe: 64,
        epoch_percent: 50,
    };

    /// `epochs` scaled by the multiplier (at least 1).
    pub fn epochs(&self, epochs: usize) -> usize {
        (epochs * self.epoch_percent / 100).max(1)
    }
}

/// A fine-tuning task and its data.
#[derive(Debug, Clone)]
pub struct Task {
    /// Short name (the probe set's `source`).
    pub name: &'static str,
    /// What it is, for the report.
    pub description: &'static str,
    /// Number of classes.
    pub classes: usize,
    /// How it is fine-tuned (epochs already scaled).
    pub train_config: TrainConfig,
    /// Training split.
    pub train: Data,
    /// Validation split.
    pub val: Data,
    /// Test split.
    pub test: Data,
}

/// The pre-training task and the three fine-tuning tasks of one seed.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Pre-training classes.
    pub pretrain_classes: usize,
    /// Pre-training data.
    pub pretrain: Data,
    /// Pre-training test split.
    pub pretrain_test: Data,
    /// How the ancestor is trained.
    pub pretrain_config: TrainConfig,
    /// The fine-tuning tasks, in order (task 1 is the receiver's).
    pub tasks: Vec<Task>,
}

/// A random two-layer tanh teacher: `logits = V tanh(g · W x / √dim)`.
struct Teacher {
    w: Vec<f32>,
    v: Vec<f32>,
    hidden: usize,
    classes: usize,
    gain: f32,
}

impl Teacher {
    fn new(hidden: usize, classes: usize, gain: f32, rng: &mut Rng) -> Teacher {
        Teacher {
            w: rng.normals(hidden * DIM, 1.0),
            v: rng.normals(classes * hidden, 1.0),
            hidden,
            classes,
            gain,
        }
    }

    /// The hidden features of `x`.
    fn features(&self, x: &[f32]) -> Vec<f32> {
        let s = self.gain / (DIM as f32).sqrt();
        self.w
            .chunks_exact(DIM)
            .map(|w| (s * super::nn::dot(w, x)).tanh())
            .collect()
    }

    /// The label of features `h` read out by `v` (`[classes, hidden]`).
    fn readout(v: &[f32], h: &[f32], classes: usize) -> usize {
        let logits: Vec<f32> = v
            .chunks_exact(h.len())
            .take(classes)
            .map(|row| super::nn::dot(row, h))
            .collect();
        super::nn::argmax(&logits)
    }

    fn label(&self, x: &[f32]) -> usize {
        debug_assert_eq!(self.v.len(), self.classes * self.hidden);
        Teacher::readout(&self.v, &self.features(x), self.classes)
    }
}

/// A random orthogonal `[DIM, DIM]` matrix (Gram–Schmidt in f64).
fn rotation(rng: &mut Rng) -> Vec<f32> {
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(DIM);
    while rows.len() < DIM {
        let mut r: Vec<f64> = (0..DIM).map(|_| rng.normal() as f64).collect();
        for q in &rows {
            let d: f64 = r.iter().zip(q).map(|(a, b)| a * b).sum();
            for (a, b) in r.iter_mut().zip(q) {
                *a -= d * b;
            }
        }
        let n = r.iter().map(|a| a * a).sum::<f64>().sqrt();
        if n > 1e-6 {
            rows.push(r.iter().map(|a| a / n).collect());
        }
    }
    rows.into_iter().flatten().map(|v| v as f32).collect()
}

/// A random unit vector times `norm`.
fn direction(rng: &mut Rng, norm: f32) -> Vec<f32> {
    let v = rng.normals(DIM, 1.0);
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter().map(|a| a * norm / n).collect()
}

/// `n` examples of `draw`, labelled, in one [`Data`].
fn sample(n: usize, rng: &mut Rng, mut draw: impl FnMut(&mut Rng) -> (Vec<f32>, usize)) -> Data {
    let mut data = Data {
        dim: DIM,
        ..Data::default()
    };
    for _ in 0..n {
        let (x, y) = draw(rng);
        data.x.extend_from_slice(&x);
        data.y.push(y);
    }
    data
}

/// Train / validation / test splits of one distribution (separate streams).
fn splits(
    sizes: &Sizes,
    seed: u64,
    name: &str,
    mut draw: impl FnMut(&mut Rng) -> (Vec<f32>, usize),
) -> (Data, Data, Data) {
    let mut split = |which: &str, n: usize| {
        let mut rng = Rng::new(seed, &format!("quality data {name} {which}"));
        sample(n, &mut rng, &mut draw)
    };
    (
        split("train", sizes.train),
        split("val", sizes.val),
        split("test", sizes.test),
    )
}

/// Generates the suite of seed `seed`.
pub fn suite(seed: u64, sizes: &Sizes) -> Suite {
    let mut rng = Rng::new(seed, "quality tasks");
    // Pre-training: a 10-class teacher on standard normal inputs.
    let t0 = Teacher::new(64, 10, 2.0, &mut rng);
    let pretrain_split = |which: &str, n: usize| {
        let mut r = Rng::new(seed, &format!("quality data pretrain {which}"));
        sample(n, &mut r, |r| {
            let x = r.normals(DIM, 1.0);
            let y = t0.label(&x);
            (x, y)
        })
    };
    let pretrain = pretrain_split("train", sizes.pretrain);
    let pretrain_test = pretrain_split("test", sizes.test);

    // Task 1, rotated: T₀'s features of R(x − μ), a new 8-way readout.
    let mu1 = direction(&mut rng, 1.0);
    let rot = rotation(&mut rng);
    let v1 = rng.normals(8 * t0.hidden, 1.0);
    let (train1, val1, test1) = splits(sizes, seed, "rotated", |r| {
        let z = r.normals(DIM, 1.0);
        let x: Vec<f32> = z.iter().zip(&mu1).map(|(a, m)| a + m).collect();
        let rz: Vec<f32> = rot
            .chunks_exact(DIM)
            .map(|row| super::nn::dot(row, &z))
            .collect();
        let y = Teacher::readout(&v1, &t0.features(&rz), 8);
        (x, y)
    });

    // Task 2, blobs: six clusters of radius 3.5 around μ₂, unit noise.
    let mu2 = direction(&mut rng, 1.0);
    let centres: Vec<Vec<f32>> = (0..6)
        .map(|_| {
            direction(&mut rng, 3.5)
                .iter()
                .zip(&mu2)
                .map(|(c, m)| c + m)
                .collect()
        })
        .collect();
    let (train2, val2, test2) = splits(sizes, seed, "blobs", |r| {
        let k = ((r.next_u64() as u128 * 6) >> 64) as usize;
        let x: Vec<f32> = r
            .normals(DIM, 1.0)
            .iter()
            .zip(&centres[k])
            .map(|(z, c)| z + c)
            .collect();
        (x, k)
    });

    // Task 3, teacher: a fresh 16-unit teacher, anisotropic inputs around μ₃.
    let mu3 = direction(&mut rng, 1.0);
    let scales: Vec<f32> = (0..DIM).map(|_| 0.5 + rng.uniform() as f32).collect();
    let t3 = Teacher::new(16, 4, 1.5, &mut rng);
    let (train3, val3, test3) = splits(sizes, seed, "teacher", |r| {
        let z = r.normals(DIM, 1.0);
        let centred: Vec<f32> = z.iter().zip(&scales).map(|(a, s)| a * s).collect();
        let x: Vec<f32> = centred.iter().zip(&mu3).map(|(a, m)| a + m).collect();
        let y = t3.label(&centred);
        (x, y)
    });

    let ft = |lr: f32, epochs: usize| TrainConfig {
        lr,
        epochs: sizes.epochs(epochs),
        batch: 32,
    };
    Suite {
        pretrain_classes: 10,
        pretrain,
        pretrain_test,
        pretrain_config: TrainConfig {
            lr: 2e-3,
            epochs: sizes.epochs(15),
            batch: 64,
        },
        tasks: vec![
            Task {
                name: "rotated",
                description: "T₀'s features of a rotated input, new 8-way readout (large update)",
                classes: 8,
                train_config: ft(2e-3, 15),
                train: train1,
                val: val1,
                test: test1,
            },
            Task {
                name: "blobs",
                description: "six Gaussian clusters (small update)",
                classes: 6,
                train_config: ft(3e-4, 5),
                train: train2,
                val: val2,
                test: test2,
            },
            Task {
                name: "teacher",
                description:
                    "a fresh 16-unit teacher, 4 classes, anisotropic inputs (medium update)",
                classes: 4,
                train_config: ft(1e-3, 10),
                train: train3,
                val: val3,
                test: test3,
            },
        ],
    }
}
