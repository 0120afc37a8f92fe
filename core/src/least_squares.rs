//! Least-squares merging (SPEC §7, RegMean): the merged linear layer that
//! best reproduces every model's outputs on that model's own inputs.
//!
//! For models `k = 1..K` with weights `W_k` (`[out, in]`), optional biases
//! `b_k`, input Grams `M_k = E[x xᵀ]` and input means `μ_k`:
//!
//! ```text
//! G_k  = [[M_k, μ_k], [μ_kᵀ, 1]]          with a bias (augmented input [x; 1]), else M_k
//! G̃_k  = α G_k + (1 − α) diag(G_k)        α = `alpha`, default 0.9
//! [W* | b*] = (Σ_k w_k [W_k | b_k] G̃_k) (Σ_k w_k G̃_k)⁻¹
//! ```
//!
//! which is the minimiser of [`objective`]
//! `Σ_k w_k tr((Ŵ − Ŵ_k) G̃_k (Ŵ − Ŵ_k)ᵀ)` (`Ŵ = [W | b]`); with `α = 1` that is
//! `Σ_k w_k ‖X_k Wᵀ − X_k W_kᵀ‖²_F` per token.
//!
//! # Streaming and memory
//! [`RegMeanSystem`] takes one model at a time ([`RegMeanSystem::add_model`])
//! and holds only the two f64 sums: `S = Σ w_k G̃_k` (`n × n`, `n = in + 1`
//! with a bias, else `in`) and `R = Σ w_k Ŵ_k G̃_k` (`out × n`). Adding a model
//! needs, besides the caller's f32 inputs, an f64 copy of `Ŵ_k` (`out × n`)
//! and one block of `G̃_k` columns (`n × 128`), so the peak is
//! `8·(n² + 2·out·n + 128·n)` bytes; [`RegMeanSystem::solve`] factors `S`
//! in place and overwrites `R` with the solution, keeping a copy of `S` for
//! the ridge retries: `8·(2n² + out·n + 2·n)` bytes plus the f32 result
//! (`4·out·n`). For a
//! LLaMA-7B `down_proj` (`out = 4096`, `in = 11008`, no bias) that is about
//! 1.7 GB while adding a model. Slices rather than a matrix type: the inputs
//! are decoded tensors the engine already holds as `Vec<f32>`.
//!
//! # Numerics
//! Both sums and the solve are f64. The right-hand side `Ŵ_k G̃_k` is one
//! GEMM per block of 128 columns (faer's `matmul`); `S` is factored by
//! Cholesky (faer's `cholesky_in_place`) and the system solved by two
//! triangular solves; the inverse is never formed. Only the symmetric part
//! of each Gram is used (`(M + Mᵀ)/2`; a Gram that is far from symmetric is
//! rejected), and `S` is symmetrised once before the factorisation.
//!
//! **Positive definiteness.** A pivot of the factorisation counts as
//! non-positive when it is at most `n·ε·max(diag S)` (`ε = f64::EPSILON`):
//! an exactly singular positive semidefinite matrix produces pivots of that
//! size from rounding alone, and solving with them would amplify rounding
//! into the result. When that happens, the ridge `δ·mean(diag S)` is added to
//! the diagonal with the smallest `δ` of [`RIDGE_LADDER`] that lets the
//! factorisation through, and [`RegMeanSolution::ridge`] says which `δ`
//! (`None` when none was needed). If even `1e-2` fails (a zero or non-finite
//! sum), [`LsError::NotPositiveDefinite`] is returned.
//!
//! **Determinism.** Every faer call runs with `Par::Seq` (the engine
//! parallelises across tensors), so the result is bit-identical for any
//! thread count and from run to run on one machine. The f64 sums depend on
//! the order in which models are added (floating-point addition is not
//! associative): a permuted order gives a result equal to within a few f32
//! ulps, not necessarily bitwise (the engine adds models in config order).
//!
//! **Data-free Grams.** [`RegMeanSystem::add_task_matrix`] adds WUDI's
//! Gram `τᵀτ / ‖τ‖²_F` of a task matrix (SPEC §8) in place of a recorded
//! one, block by block, through the same sums and solve.
//!
//! faer builds without `std` (`default-features = false`), so this module is
//! part of the `no_std` core.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// The default `alpha` of SPEC §7 (weight of the off-diagonal Gram entries).
pub const DEFAULT_ALPHA: f64 = 0.9;

/// The ridge factors tried, smallest first, when `Σ w_k G̃_k` is not
/// positive definite (SPEC §7); the ridge added is `δ · mean(diag)`.
pub const RIDGE_LADDER: [f64; 4] = [1e-8, 1e-6, 1e-4, 1e-2];

/// Columns of `G̃_k` built (and multiplied) at once.
const BLOCK: usize = 128;
/// Side of the square tiles used to read a Gram transposed cache-friendly.
const TILE: usize = 64;
/// A Gram entry and its mirror may differ by this much relative to
/// `sqrt(M_ii M_jj)` (f32 accumulation noise); more is a wrong layout.
const SYMMETRY_TOLERANCE: f32 = 1e-3;

/// One model's inputs to a least-squares merge (SPEC §7), all row-major f32.
#[derive(Debug, Clone, Copy)]
pub struct RegMeanModel<'a> {
    /// The decoded weight `W_k`, `[out, in]`.
    pub weight: &'a [f32],
    /// The bias `b_k`, `[out]`: required exactly when the system has a bias.
    pub bias: Option<&'a [f32]>,
    /// The input Gram `M_k` (`L.x_gram`), `[in, in]`, full symmetric storage.
    pub gram: &'a [f32],
    /// The input mean `μ_k` (`L.x_mean`), `[in]`: required with a bias,
    /// ignored without one.
    pub mean: Option<&'a [f32]>,
    /// The model's weight `w_k` (finite, ≥ 0; default 1).
    pub w: f64,
}

/// A merged layer (SPEC §7).
#[derive(Debug, Clone, PartialEq)]
pub struct RegMeanSolution {
    /// `W*`, `[out, in]` row-major.
    pub weight: Vec<f32>,
    /// `b*`, `[out]`, when the system has a bias.
    pub bias: Option<Vec<f32>>,
    /// The ridge factor `δ` of [`RIDGE_LADDER`] that was needed, if any.
    pub ridge: Option<f64>,
}

/// Why a least-squares merge could not be computed. The messages name the
/// problem; the caller adds the file and tensor.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LsError {
    /// A slice has the wrong length.
    Shape {
        /// Which input (`"weight"`, `"bias"`, `"gram"`, `"mean"`).
        what: &'static str,
        /// Its length.
        len: usize,
        /// The length the system's shape requires.
        expected: usize,
    },
    /// A model's bias is present where the system has none, or missing where
    /// it has one.
    BiasMismatch {
        /// Whether the system was built with a bias.
        system_has_bias: bool,
    },
    /// A bias is present but the model has no input mean to fold it in.
    MissingMean,
    /// An input holds a NaN or an infinity.
    NotFinite {
        /// Which input.
        what: &'static str,
        /// The flat index of the first bad value.
        index: usize,
    },
    /// A model weight `w_k` is negative or not finite.
    BadModelWeight {
        /// The weight given.
        w: f64,
    },
    /// `alpha` is outside `[0, 1]`.
    BadAlpha {
        /// The value given.
        alpha: f64,
    },
    /// A Gram has a negative diagonal entry (no second moment does).
    NegativeDiagonal {
        /// The index `i` of `M_ii`.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A Gram is not symmetric (beyond accumulation noise): probably not a
    /// Gram, or stored in another layout.
    Asymmetric {
        /// Row of the entry.
        row: usize,
        /// Column of the entry.
        col: usize,
    },
    /// No model with a positive weight was added.
    NoModels,
    /// `Σ w_k G̃_k` stayed singular even with the largest ridge.
    NotPositiveDefinite {
        /// `mean(diag Σ w_k G̃_k)` (zero when every Gram is zero).
        mean_diagonal: f64,
    },
}

impl fmt::Display for LsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LsError::Shape { what, len, expected } => {
                write!(f, "{what} has {len} values, expected {expected}")
            }
            LsError::BiasMismatch { system_has_bias: true } => {
                write!(f, "the layer has a bias but this model gives none")
            }
            LsError::BiasMismatch { system_has_bias: false } => {
                write!(f, "the layer has no bias but this model gives one")
            }
            LsError::MissingMean => write!(
                f,
                "a bias needs the input mean (x_mean) to fold it into the Gram"
            ),
            LsError::NotFinite { what, index } => {
                write!(f, "{what} holds a NaN or infinity at index {index}")
            }
            LsError::BadModelWeight { w } => {
                write!(f, "model weight {w} must be finite and non-negative")
            }
            LsError::BadAlpha { alpha } => write!(f, "alpha {alpha} must lie in [0, 1]"),
            LsError::NegativeDiagonal { index, value } => write!(
                f,
                "gram diagonal entry {index} is {value}; a second moment is never negative"
            ),
            LsError::Asymmetric { row, col } => write!(
                f,
                "gram entries ({row}, {col}) and ({col}, {row}) differ: the gram is not symmetric"
            ),
            LsError::NoModels => write!(f, "no model with a positive weight to merge"),
            LsError::NotPositiveDefinite { mean_diagonal } => write!(
                f,
                "the summed gram is singular even with ridge {:e}·mean(diag) (mean(diag) = {mean_diagonal:e})",
                RIDGE_LADDER[RIDGE_LADDER.len() - 1]
            ),
        }
    }
}

impl core::error::Error for LsError {}

/// Where the columns of a model's `G̃_k` come from.
enum GramSource<'a> {
    /// A recorded f32 Gram (and, with a bias, the input mean).
    Recorded {
        gram: &'a [f32],
        mean: Option<&'a [f32]>,
        alpha: f64,
    },
    /// WUDI's data-free Gram `scale · τᵀτ` of a task matrix `τ`
    /// (`[out, inp]` row-major f64; SPEC §8), built block by block so that
    /// the whole `inp × inp` Gram is never held beside the sums.
    TaskMatrix {
        tau: &'a [f64],
        out: usize,
        scale: f64,
    },
}

impl GramSource<'_> {
    /// Writes columns `c0 .. c0 + width` of `G̃` into `blk`, row-major
    /// `[n, width]` (`n = inp + 1` with `mean`, else `inp`).
    fn fill(&self, inp: usize, n: usize, c0: usize, width: usize, blk: &mut [f64]) {
        match *self {
            GramSource::Recorded { gram, mean, alpha } => {
                fill_recorded(gram, mean, alpha, inp, n, c0, width, blk)
            }
            GramSource::TaskMatrix { tau, out, scale } => {
                let t = MatRef::from_row_major_slice(tau, out, inp);
                matmul(
                    MatMut::from_row_major_slice_mut(blk, n, width),
                    Accum::Replace,
                    t.transpose(),
                    t.subcols(c0, width),
                    scale,
                    Par::Seq,
                );
            }
        }
    }
}

/// Columns `c0 .. c0 + width` of `G̃ = α G + (1 − α) diag(G)` from a recorded
/// Gram, symmetrised: entry `(i, j)` is `½(M_ij + M_ji)` (the same bits as
/// `(j, i)`, since f64 addition commutes).
#[allow(clippy::too_many_arguments)]
fn fill_recorded(
    gram: &[f32],
    mean: Option<&[f32]>,
    alpha: f64,
    inp: usize,
    n: usize,
    c0: usize,
    width: usize,
    blk: &mut [f64],
) {
    // Gram columns inside the block (the bias column, if in it, is last).
    let gram_cols = width.min(inp.saturating_sub(c0));
    for i in 0..inp {
        let row = &gram[i * inp + c0..][..gram_cols];
        let dst = &mut blk[i * width..][..gram_cols];
        for (d, &g) in dst.iter_mut().zip(row) {
            *d = f64::from(g);
        }
    }
    // Add the mirrored entries tile by tile, so that the strided side stays
    // in cache.
    for i0 in (0..inp).step_by(TILE) {
        let i1 = (i0 + TILE).min(inp);
        for jj in 0..gram_cols {
            let mirror = &gram[(c0 + jj) * inp + i0..][..i1 - i0];
            for (t, &g) in mirror.iter().enumerate() {
                let d = &mut blk[(i0 + t) * width + jj];
                *d = 0.5 * (*d + f64::from(g));
            }
        }
    }
    if let Some(mean) = mean {
        for jj in 0..gram_cols {
            blk[inp * width + jj] = f64::from(mean[c0 + jj]);
        }
        if c0 + width == n {
            let jj = width - 1;
            for (i, &m) in mean.iter().enumerate() {
                blk[i * width + jj] = f64::from(m);
            }
            blk[inp * width + jj] = 1.0;
        }
    }
    if alpha != 1.0 {
        for i in 0..n {
            let row = &mut blk[i * width..][..width];
            for (jj, v) in row.iter_mut().enumerate() {
                if c0 + jj != i {
                    *v *= alpha;
                }
            }
        }
    }
}

/// The streaming RegMean system of one layer (SPEC §7): add the models one
/// at a time, then [`solve`](Self::solve). Memory: see the module docs.
#[derive(Debug, Clone)]
pub struct RegMeanSystem {
    out: usize,
    inp: usize,
    /// `inp + 1` with a bias, else `inp`.
    n: usize,
    bias: bool,
    alpha: f64,
    /// `Σ w_k G̃_k`, `n × n`, row-major.
    lhs: Vec<f64>,
    /// `Σ w_k Ŵ_k G̃_k`, `out × n`, row-major.
    rhs: Vec<f64>,
    /// Models added with a positive weight.
    models: usize,
}

impl RegMeanSystem {
    /// An empty system for a layer `[out, inp]`, with or without a bias, and
    /// shrinkage `alpha` (SPEC §7; [`DEFAULT_ALPHA`]). Allocates the two f64
    /// sums (`8·(n² + out·n)` bytes).
    ///
    /// Errors: [`LsError::BadAlpha`] unless `0 ≤ alpha ≤ 1`.
    pub fn new(out: usize, inp: usize, bias: bool, alpha: f64) -> Result<Self, LsError> {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(LsError::BadAlpha { alpha });
        }
        let n = inp + usize::from(bias);
        Ok(RegMeanSystem {
            out,
            inp,
            n,
            bias,
            alpha,
            lhs: vec![0.0; n * n],
            rhs: vec![0.0; out * n],
            models: 0,
        })
    }

    /// Adds model `k`'s `w_k G̃_k` and `w_k Ŵ_k G̃_k` to the sums (SPEC §7).
    /// The inputs are validated first; on error the system is unchanged.
    ///
    /// Errors: [`LsError::Shape`], [`LsError::BiasMismatch`],
    /// [`LsError::MissingMean`], [`LsError::NotFinite`],
    /// [`LsError::BadModelWeight`], [`LsError::NegativeDiagonal`],
    /// [`LsError::Asymmetric`].
    pub fn add_model(&mut self, model: &RegMeanModel<'_>) -> Result<(), LsError> {
        validate_model(self.out, self.inp, self.bias, model)?;
        if model.w == 0.0 {
            return Ok(());
        }
        let weight = augmented_weight(self.out, self.inp, model.weight, model.bias);
        let source = GramSource::Recorded {
            gram: model.gram,
            mean: if self.bias { model.mean } else { None },
            alpha: self.alpha,
        };
        self.accumulate(&weight, model.w, &source);
        Ok(())
    }

    /// Adds a task matrix `τ` (`[out, inp]` row-major, a system without a
    /// bias) with WUDI's data-free Gram `G = τᵀτ / ‖τ‖²_F` (SPEC §8) and
    /// weight `w`: `S += w G`, `R += w τ G`. The solve then minimises
    /// `Σ w ‖(X − τ) τᵀ‖²_F / ‖τ‖²_F` over the task matrices added.
    ///
    /// An all-zero `τ` adds nothing and returns `Ok(false)`: its term is
    /// zero at every point (`G` itself is 0/0 and is read as zero). Memory
    /// beyond the sums: one block of `G` columns (`8·inp·128` bytes); cost
    /// `2·out·inp²` multiply-adds.
    ///
    /// Errors: [`LsError::BiasMismatch`] for a system with a bias,
    /// [`LsError::Shape`], [`LsError::NotFinite`], [`LsError::BadModelWeight`].
    pub fn add_task_matrix(&mut self, tau: &[f64], w: f64) -> Result<bool, LsError> {
        if !(w.is_finite() && w >= 0.0) {
            return Err(LsError::BadModelWeight { w });
        }
        if self.bias {
            return Err(LsError::BiasMismatch {
                system_has_bias: true,
            });
        }
        check_len("task matrix", tau.len(), self.out * self.inp)?;
        if let Some(index) = tau.iter().position(|v| !v.is_finite()) {
            return Err(LsError::NotFinite {
                what: "task matrix",
                index,
            });
        }
        let norm2: f64 = tau.iter().map(|v| v * v).sum();
        if w == 0.0 || norm2 == 0.0 {
            return Ok(false);
        }
        let source = GramSource::TaskMatrix {
            tau,
            out: self.out,
            scale: 1.0 / norm2,
        };
        self.accumulate(tau, w, &source);
        Ok(true)
    }

    fn accumulate(&mut self, weight: &[f64], w: f64, source: &GramSource<'_>) {
        let (out, n) = (self.out, self.n);
        let mut blk = vec![0.0f64; n * BLOCK.min(n)];
        let weight_ref = MatRef::from_row_major_slice(weight, out, n);
        for c0 in (0..n).step_by(BLOCK) {
            let width = BLOCK.min(n - c0);
            let blk = &mut blk[..n * width];
            source.fill(self.inp, n, c0, width, blk);
            for i in 0..n {
                let dst = &mut self.lhs[i * n + c0..][..width];
                for (d, &g) in dst.iter_mut().zip(&blk[i * width..][..width]) {
                    *d += w * g;
                }
            }
            let dst =
                MatMut::from_row_major_slice_mut(&mut self.rhs, out, n).subcols_mut(c0, width);
            matmul(
                dst,
                Accum::Add,
                weight_ref,
                MatRef::from_row_major_slice(blk, n, width),
                w,
                Par::Seq,
            );
        }
        self.models += 1;
    }

    /// Solves `Ŵ* S = R` (SPEC §7) by Cholesky in f64, with the ridge rule of
    /// the module docs, and rounds `[W* | b*]` to f32.
    ///
    /// Errors: [`LsError::NoModels`] when no model had a positive weight,
    /// [`LsError::NotPositiveDefinite`] when even the largest ridge fails.
    pub fn solve(self) -> Result<RegMeanSolution, LsError> {
        let (out, inp, n, has_bias) = (self.out, self.inp, self.n, self.bias);
        let (x, ridge) = self.solve_f64()?;
        let mut weight = Vec::with_capacity(out * inp);
        let mut bias = has_bias.then(|| Vec::with_capacity(out));
        for row in x.chunks_exact(n.max(1)).take(out) {
            weight.extend(row[..inp].iter().map(|&v| v as f32));
            if let Some(bias) = bias.as_mut() {
                bias.push(row[inp] as f32);
            }
        }
        Ok(RegMeanSolution {
            weight,
            bias,
            ridge,
        })
    }

    /// The f64 solution `[out, n]` row-major and the ridge used.
    pub(crate) fn solve_f64(self) -> Result<(Vec<f64>, Option<f64>), LsError> {
        if self.models == 0 {
            return Err(LsError::NoModels);
        }
        let (out, n) = (self.out, self.n);
        let mut lhs = self.lhs;
        let mut rhs = self.rhs;
        if n == 0 {
            return Ok((rhs, None));
        }
        symmetrise(&mut lhs, n);
        let diag: Vec<f64> = (0..n).map(|i| lhs[i * n + i]).collect();
        let mean_diagonal = diag.iter().sum::<f64>() / n as f64;
        let max_diagonal = diag.iter().fold(0.0f64, |m, &d| m.max(d));
        if !mean_diagonal.is_finite() || !max_diagonal.is_finite() {
            return Err(LsError::NotPositiveDefinite { mean_diagonal });
        }
        let threshold = n as f64 * f64::EPSILON * max_diagonal;
        let mut ridge = None;
        let mut buf = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
            n,
            Par::Seq,
            Default::default(),
        ));
        let stack = MemStack::new(&mut buf);
        // A failed factorisation may leave any part of the matrix
        // overwritten, so each retry starts from a copy of S.
        let original = lhs.clone();
        let mut attempt = 0;
        loop {
            if factor(&mut lhs, n, threshold, stack) {
                break;
            }
            let Some(&delta) = RIDGE_LADDER.get(attempt) else {
                return Err(LsError::NotPositiveDefinite { mean_diagonal });
            };
            attempt += 1;
            lhs.copy_from_slice(&original);
            for (i, &d) in diag.iter().enumerate() {
                lhs[i * n + i] = d + delta * mean_diagonal;
            }
            ridge = Some(delta);
        }
        if !rhs.iter().all(|v| v.is_finite()) {
            return Err(LsError::NotPositiveDefinite { mean_diagonal });
        }
        // `X S = R` ⇔ `S Xᵀ = Rᵀ`; `R` row-major `[out, n]` is `Rᵀ`
        // column-major `[n, out]`.
        let lower = MatRef::from_column_major_slice(&lhs, n, n);
        let rhs_t = MatMut::from_column_major_slice_mut(&mut rhs, n, out);
        llt::solve::solve_in_place(lower, rhs_t, Par::Seq, stack);
        Ok((rhs, ridge))
    }
}

/// Cholesky of the symmetric `a` (lower triangle, in place); `false` when a
/// pivot is at most `threshold` (or not a number).
fn factor(a: &mut [f64], n: usize, threshold: f64, stack: &mut MemStack) -> bool {
    let regularization = llt::factor::LltRegularization {
        // A pivot at most `threshold` is replaced (and counted) rather than
        // used; a count above zero means "not positive definite".
        dynamic_regularization_delta: if threshold > 0.0 { 1.0 } else { 0.0 },
        dynamic_regularization_epsilon: threshold,
    };
    let mat = MatMut::from_column_major_slice_mut(a, n, n);
    match llt::factor::cholesky_in_place(mat, regularization, Par::Seq, stack, Default::default()) {
        Ok(info) => info.dynamic_regularization_count == 0,
        Err(_) => false,
    }
}

/// `a[i][j] = a[j][i] = ½(a[i][j] + a[j][i])`, tile by tile.
fn symmetrise(a: &mut [f64], n: usize) {
    for i0 in (0..n).step_by(TILE) {
        for j0 in (i0..n).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                for j in j0.max(i + 1)..(j0 + TILE).min(n) {
                    let v = 0.5 * (a[i * n + j] + a[j * n + i]);
                    a[i * n + j] = v;
                    a[j * n + i] = v;
                }
            }
        }
    }
}

/// `[W | b]` in f64, `[out, inp (+1)]` row-major.
fn augmented_weight(out: usize, inp: usize, weight: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
    let n = inp + usize::from(bias.is_some());
    let mut aug = Vec::with_capacity(out * n);
    for i in 0..out {
        aug.extend(weight[i * inp..][..inp].iter().map(|&v| f64::from(v)));
        if let Some(bias) = bias {
            aug.push(f64::from(bias[i]));
        }
    }
    aug
}

fn check_len(what: &'static str, len: usize, expected: usize) -> Result<(), LsError> {
    if len == expected {
        Ok(())
    } else {
        Err(LsError::Shape {
            what,
            len,
            expected,
        })
    }
}

fn check_finite(what: &'static str, values: &[f32]) -> Result<(), LsError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(LsError::NotFinite { what, index }),
    }
}

/// Every check of [`RegMeanSystem::add_model`], before anything is summed.
fn validate_model(
    out: usize,
    inp: usize,
    bias: bool,
    model: &RegMeanModel<'_>,
) -> Result<(), LsError> {
    if !(model.w.is_finite() && model.w >= 0.0) {
        return Err(LsError::BadModelWeight { w: model.w });
    }
    if model.bias.is_some() != bias {
        return Err(LsError::BiasMismatch {
            system_has_bias: bias,
        });
    }
    check_len("weight", model.weight.len(), out * inp)?;
    check_len("gram", model.gram.len(), inp * inp)?;
    check_finite("weight", model.weight)?;
    check_finite("gram", model.gram)?;
    if let Some(b) = model.bias {
        check_len("bias", b.len(), out)?;
        check_finite("bias", b)?;
        let mean = model.mean.ok_or(LsError::MissingMean)?;
        check_len("mean", mean.len(), inp)?;
        check_finite("mean", mean)?;
    }
    let gram = model.gram;
    for i in 0..inp {
        let value = gram[i * inp + i];
        if value < 0.0 {
            return Err(LsError::NegativeDiagonal { index: i, value });
        }
    }
    for i0 in (0..inp).step_by(TILE) {
        for j0 in (i0..inp).step_by(TILE) {
            for j in j0..(j0 + TILE).min(inp) {
                for i in i0..(i0 + TILE).min(inp).min(j) {
                    let (a, b) = (gram[i * inp + j], gram[j * inp + i]);
                    let scale = libm::sqrtf(gram[i * inp + i] * gram[j * inp + j]);
                    if (a - b).abs() > SYMMETRY_TOLERANCE * scale {
                        return Err(LsError::Asymmetric { row: i, col: j });
                    }
                }
            }
        }
    }
    Ok(())
}

/// `(objective, gradient)` of SPEC §7 at `[weight | bias]`; see [`objective`].
fn objective_and_gradient(
    out: usize,
    inp: usize,
    alpha: f64,
    models: &[RegMeanModel<'_>],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<(f64, Vec<f64>), LsError> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(LsError::BadAlpha { alpha });
    }
    let has_bias = bias.is_some();
    let n = inp + usize::from(has_bias);
    check_len("weight", weight.len(), out * inp)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), out)?;
    }
    let point = augmented_weight(out, inp, weight, bias);
    let mut value = 0.0;
    let mut gradient = vec![0.0; out * n];
    let mut gt = vec![0.0; n * n];
    let mut product = vec![0.0; out * n];
    for model in models {
        validate_model(out, inp, has_bias, model)?;
        let source = GramSource::Recorded {
            gram: model.gram,
            mean: if has_bias { model.mean } else { None },
            alpha,
        };
        source.fill(inp, n, 0, n, &mut gt);
        let own = augmented_weight(out, inp, model.weight, model.bias);
        let diff: Vec<f64> = point.iter().zip(&own).map(|(p, o)| p - o).collect();
        let diff_ref = MatRef::from_row_major_slice(&diff, out, n);
        matmul(
            MatMut::from_row_major_slice_mut(&mut product, out, n),
            Accum::Replace,
            diff_ref,
            MatRef::from_row_major_slice(&gt, n, n),
            1.0,
            Par::Seq,
        );
        value += model.w * diff.iter().zip(&product).map(|(d, p)| d * p).sum::<f64>();
        for (g, p) in gradient.iter_mut().zip(&product) {
            *g += 2.0 * model.w * p;
        }
    }
    Ok((value, gradient))
}

/// The objective of SPEC §7 at the point `Ŵ = [weight | bias]`:
/// `Σ_k w_k tr((Ŵ − Ŵ_k) G̃_k (Ŵ − Ŵ_k)ᵀ)`, in f64 — with `alpha = 1` the
/// per-token `Σ_k w_k ‖X_k Wᵀ − X_k W_kᵀ‖²_F` in Gram form. A reference
/// evaluation for checks and diagnostics: it builds each `G̃_k` whole
/// (`8·n²` bytes) and costs `O(K·out·n²)`.
///
/// Errors: as [`RegMeanSystem::add_model`] for each model and for the point.
pub fn objective(
    out: usize,
    inp: usize,
    alpha: f64,
    models: &[RegMeanModel<'_>],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<f64, LsError> {
    objective_and_gradient(out, inp, alpha, models, weight, bias).map(|(v, _)| v)
}

/// The gradient of [`objective`] with respect to `Ŵ = [W | b]`:
/// `2 Σ_k w_k (Ŵ − Ŵ_k) G̃_k`, `[out, inp (+1)]` row-major f64 (the bias
/// gradient is the last column). Zero at the solution of
/// [`RegMeanSystem::solve`] (without ridge). Same cost as [`objective`].
pub fn gradient(
    out: usize,
    inp: usize,
    alpha: f64,
    models: &[RegMeanModel<'_>],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f64>, LsError> {
    objective_and_gradient(out, inp, alpha, models, weight, bias).map(|(_, g)| g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model<'a>(
        weight: &'a [f32],
        bias: Option<&'a [f32]>,
        gram: &'a [f32],
        mean: Option<&'a [f32]>,
        w: f64,
    ) -> RegMeanModel<'a> {
        RegMeanModel {
            weight,
            bias,
            gram,
            mean,
            w,
        }
    }

    fn merge(
        out: usize,
        inp: usize,
        bias: bool,
        alpha: f64,
        models: &[RegMeanModel<'_>],
    ) -> Result<RegMeanSolution, LsError> {
        let mut system = RegMeanSystem::new(out, inp, bias, alpha)?;
        for m in models {
            system.add_model(m)?;
        }
        system.solve()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn diagonal_grams_weigh_each_input_by_its_energy() {
        // S = diag(3, 3), R = [1,0]·diag(2,1) + [0,1]·diag(1,2) = [2, 2].
        let (g1, g2) = ([2.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0]);
        let models = [
            model(&[1.0, 0.0], None, &g1, None, 1.0),
            model(&[0.0, 1.0], None, &g2, None, 1.0),
        ];
        let s = merge(1, 2, false, 1.0, &models).unwrap();
        assert_eq!(s.weight, vec![2.0f32 / 3.0, 2.0 / 3.0]);
        assert_eq!((s.bias, s.ridge), (None, None));
    }

    #[test]
    fn alpha_shrinks_the_off_diagonal() {
        // α = ½: G̃₁ = [[2, ½], [½, 1]], G̃₂ = [[1, ½], [½, 2]], S = [[3, 1], [1, 3]],
        // R = [2, ½] + [½, 2] = [2.5, 2.5], so W* = [a, a] with 4a = 2.5.
        let (g1, g2) = ([2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0]);
        let models = [
            model(&[1.0, 0.0], None, &g1, None, 1.0),
            model(&[0.0, 1.0], None, &g2, None, 1.0),
        ];
        let s = merge(1, 2, false, 0.5, &models).unwrap();
        assert_eq!(s.weight, vec![0.625, 0.625]);
    }

    #[test]
    fn bias_is_folded_in_as_a_constant_input() {
        // G₁ = [[1, 0], [0, 1]] (μ = 0), G₂ = [[4, 2], [2, 1]] (μ = 2);
        // S = [[5, 2], [2, 2]], R = [2, 1]·G₁ + [0, 3]·G₂ = [8, 4]:
        // 5w + 2b = 8, 2w + 2b = 4 ⇒ w = 4/3, b = 2/3.
        let models = [
            model(&[2.0], Some(&[1.0]), &[1.0], Some(&[0.0]), 1.0),
            model(&[0.0], Some(&[3.0]), &[4.0], Some(&[2.0]), 1.0),
        ];
        let s = merge(1, 1, true, 1.0, &models).unwrap();
        assert!(close(&s.weight, &[4.0 / 3.0], 1e-6), "{:?}", s.weight);
        assert!(
            close(s.bias.as_ref().unwrap(), &[2.0 / 3.0], 1e-6),
            "{:?}",
            s.bias
        );
        // α < 1 leaves the corner (1) and the diagonal alone and scales μ:
        // α = ½: G̃₂ = [[4, 1], [1, 1]], S = [[5, 1], [1, 2]], R = [2, 1] + [3, 3] = [5, 4]:
        // 5w + b = 5, w + 2b = 4 ⇒ w = 2/3, b = 5/3.
        let s = merge(1, 1, true, 0.5, &models).unwrap();
        assert!(close(&s.weight, &[2.0 / 3.0], 1e-6), "{:?}", s.weight);
        assert!(
            close(s.bias.as_ref().unwrap(), &[5.0 / 3.0], 1e-6),
            "{:?}",
            s.bias
        );
    }

    #[test]
    fn model_weights_scale_the_terms() {
        // Scalar input: W* = (Σ w_k W_k g_k) / (Σ w_k g_k) = (3·1·2 + 1·4·1) / (3·2 + 1) = 10/7.
        let models = [
            model(&[1.0], None, &[2.0], None, 3.0),
            model(&[4.0], None, &[1.0], None, 1.0),
        ];
        let s = merge(1, 1, false, 0.9, &models).unwrap();
        assert!(close(&s.weight, &[10.0 / 7.0], 1e-6));
        // A zero weight drops the model.
        let models = [
            model(&[1.0], None, &[2.0], None, 0.0),
            model(&[4.0], None, &[1.0], None, 1.0),
        ];
        assert_eq!(merge(1, 1, false, 0.9, &models).unwrap().weight, vec![4.0]);
    }

    #[test]
    fn one_model_gives_back_its_own_weights() {
        let gram = [4.0, 1.0, 0.5, 1.0, 3.0, 0.25, 0.5, 0.25, 2.0];
        let weight = [1.0, -2.0, 0.5, 3.0, 0.0, -1.0];
        let s = merge(
            2,
            3,
            true,
            0.9,
            &[model(
                &weight,
                Some(&[0.5, -0.5]),
                &gram,
                Some(&[0.1, 0.2, 0.3]),
                1.0,
            )],
        )
        .unwrap();
        assert!(close(&s.weight, &weight, 1e-6), "{:?}", s.weight);
        assert!(close(s.bias.as_ref().unwrap(), &[0.5, -0.5], 1e-6));
    }

    #[test]
    fn equal_grams_give_the_weighted_average() {
        let gram = [4.0, 1.0, 1.0, 3.0];
        let (w1, w2) = ([1.0, 2.0, 3.0, 4.0], [5.0, -2.0, 1.0, 0.0]);
        let models = [
            model(&w1, None, &gram, None, 1.0),
            model(&w2, None, &gram, None, 3.0),
        ];
        let s = merge(2, 2, false, 0.9, &models).unwrap();
        let expected: Vec<f32> = w1
            .iter()
            .zip(&w2)
            .map(|(a, b)| (a + 3.0 * b) / 4.0)
            .collect();
        assert!(close(&s.weight, &expected, 1e-6), "{:?}", s.weight);
    }

    #[test]
    fn a_singular_sum_gets_the_smallest_ridge() {
        // x = (t, t): G = [[1, 1], [1, 1]] is singular with α = 1. With the
        // ridge λ = 1e-8·mean(diag) the solution is 3·vᵀ/(2 + λ) for v = (1, 1):
        // the minimum-norm least-squares solution.
        let s = merge(
            1,
            2,
            false,
            1.0,
            &[model(&[1.0, 2.0], None, &[1.0, 1.0, 1.0, 1.0], None, 1.0)],
        )
        .unwrap();
        assert_eq!(s.ridge, Some(1e-8));
        assert!(close(&s.weight, &[1.5, 1.5], 1e-6), "{:?}", s.weight);
        // An input that is always zero: its row and column vanish, even with α < 1.
        let s = merge(
            1,
            2,
            false,
            0.9,
            &[model(&[1.0, 2.0], None, &[1.0, 0.0, 0.0, 0.0], None, 1.0)],
        )
        .unwrap();
        assert_eq!(s.ridge, Some(1e-8));
        assert!(close(&s.weight, &[1.0, 0.0], 1e-6), "{:?}", s.weight);
        // A positive definite sum needs none.
        let s = merge(
            1,
            2,
            false,
            1.0,
            &[model(&[1.0, 2.0], None, &[2.0, 1.0, 1.0, 1.0], None, 1.0)],
        )
        .unwrap();
        assert_eq!(s.ridge, None);
    }

    #[test]
    fn a_zero_sum_is_an_error() {
        let err = merge(
            1,
            2,
            false,
            0.9,
            &[model(&[1.0, 2.0], None, &[0.0; 4], None, 1.0)],
        )
        .unwrap_err();
        assert_eq!(err, LsError::NotPositiveDefinite { mean_diagonal: 0.0 });
        assert!(err.to_string().contains("singular"));
        assert_eq!(
            RegMeanSystem::new(1, 1, false, 0.9).unwrap().solve(),
            Err(LsError::NoModels)
        );
        let only_zero_weight = [model(&[1.0], None, &[1.0], None, 0.0)];
        assert_eq!(
            merge(1, 1, false, 0.9, &only_zero_weight),
            Err(LsError::NoModels)
        );
    }

    #[test]
    fn bad_inputs_are_rejected_and_leave_the_system_unchanged() {
        let gram = [2.0, 1.0, 1.0, 2.0];
        let good = model(&[1.0, 2.0], None, &gram, None, 1.0);
        let cases: [(RegMeanModel<'_>, LsError); 7] = [
            (
                model(&[1.0], None, &gram, None, 1.0),
                LsError::Shape {
                    what: "weight",
                    len: 1,
                    expected: 2,
                },
            ),
            (
                model(&[1.0, 2.0], None, &gram[..3], None, 1.0),
                LsError::Shape {
                    what: "gram",
                    len: 3,
                    expected: 4,
                },
            ),
            (
                model(&[1.0, f32::NAN], None, &gram, None, 1.0),
                LsError::NotFinite {
                    what: "weight",
                    index: 1,
                },
            ),
            (
                model(&[1.0, 2.0], None, &[2.0, 1.0, 0.5, 2.0], None, 1.0),
                LsError::Asymmetric { row: 0, col: 1 },
            ),
            (
                model(&[1.0, 2.0], None, &[-1.0, 0.0, 0.0, 2.0], None, 1.0),
                LsError::NegativeDiagonal {
                    index: 0,
                    value: -1.0,
                },
            ),
            (
                model(&[1.0, 2.0], Some(&[0.0]), &gram, None, 1.0),
                LsError::BiasMismatch {
                    system_has_bias: false,
                },
            ),
            (
                model(&[1.0, 2.0], None, &gram, None, -1.0),
                LsError::BadModelWeight { w: -1.0 },
            ),
        ];
        let reference = merge(1, 2, false, 0.9, &[good]).unwrap();
        for (bad, expected) in cases {
            let mut system = RegMeanSystem::new(1, 2, false, 0.9).unwrap();
            assert_eq!(system.add_model(&bad), Err(expected.clone()));
            assert!(!expected.to_string().is_empty());
            system.add_model(&good).unwrap();
            assert_eq!(system.solve().unwrap(), reference);
        }
        let mut with_bias = RegMeanSystem::new(1, 2, true, 0.9).unwrap();
        assert_eq!(
            with_bias.add_model(&good),
            Err(LsError::BiasMismatch {
                system_has_bias: true
            })
        );
        let no_mean = model(&[1.0, 2.0], Some(&[0.0]), &gram, None, 1.0);
        assert_eq!(with_bias.add_model(&no_mean), Err(LsError::MissingMean));
        assert_eq!(
            RegMeanSystem::new(1, 2, true, 1.5).unwrap_err(),
            LsError::BadAlpha { alpha: 1.5 }
        );
    }

    #[test]
    fn objective_and_gradient_by_hand() {
        // One model, W₁ = [1, 0], G = [[2, 1], [1, 1]], α = 1, at W = [2, 1]:
        // D = [1, 1], D G = [3, 2], objective = D·(D G) = 5, gradient = 2 D G.
        let gram = [2.0, 1.0, 1.0, 1.0];
        let models = [model(&[1.0, 0.0], None, &gram, None, 2.0)];
        assert_eq!(
            objective(1, 2, 1.0, &models, &[2.0, 1.0], None).unwrap(),
            10.0
        );
        assert_eq!(
            gradient(1, 2, 1.0, &models, &[2.0, 1.0], None).unwrap(),
            vec![12.0, 8.0]
        );
        // At the solution the gradient vanishes.
        let s = merge(1, 2, false, 1.0, &models).unwrap();
        let g = gradient(1, 2, 1.0, &models, &s.weight, None).unwrap();
        assert!(g.iter().all(|v| v.abs() < 1e-6), "{g:?}");
    }

    #[test]
    fn task_matrices_add_their_data_free_grams() {
        // τ₁ = [1, 0]: G₁ = diag(1, 0); τ₂ = [1, 1]: G₂ = ½[[1, 1], [1, 1]].
        // S = [[1.5, .5], [.5, .5]], R = τ₁G₁ + τ₂G₂ = [2, 1] ⇒ X = [1, 1].
        let mut system = RegMeanSystem::new(1, 2, false, 1.0).unwrap();
        assert_eq!(system.add_task_matrix(&[1.0, 0.0], 1.0), Ok(true));
        assert_eq!(system.add_task_matrix(&[1.0, 1.0], 1.0), Ok(true));
        // A zero task matrix adds nothing.
        assert_eq!(system.add_task_matrix(&[0.0, 0.0], 1.0), Ok(false));
        let s = system.solve().unwrap();
        assert!(close(&s.weight, &[1.0, 1.0], 1e-6), "{:?}", s.weight);
        let mut with_bias = RegMeanSystem::new(1, 2, true, 1.0).unwrap();
        assert_eq!(
            with_bias.add_task_matrix(&[1.0, 0.0], 1.0),
            Err(LsError::BiasMismatch {
                system_has_bias: true
            })
        );
        let mut system = RegMeanSystem::new(1, 2, false, 1.0).unwrap();
        assert_eq!(
            system.add_task_matrix(&[1.0, f64::INFINITY], 1.0),
            Err(LsError::NotFinite {
                what: "task matrix",
                index: 1
            })
        );
        assert!(matches!(
            system.add_task_matrix(&[1.0], 1.0),
            Err(LsError::Shape { .. })
        ));
    }

    #[test]
    fn larger_systems_cross_block_boundaries() {
        // in = 130 > BLOCK with a bias: block edges, the bias column alone in
        // the last block; one model must come back unchanged.
        let (out, inp) = (3, BLOCK + 1);
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let rows = inp + 5;
        let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
        let mut gram = vec![0.0f32; inp * inp];
        let mut mean = vec![0.0f32; inp];
        for r in 0..rows {
            for i in 0..inp {
                mean[i] += x[r * inp + i] / rows as f32;
                for j in 0..inp {
                    gram[i * inp + j] += x[r * inp + i] * x[r * inp + j] / rows as f32;
                }
            }
        }
        let weight: Vec<f32> = (0..out * inp).map(|_| next()).collect();
        let bias: Vec<f32> = (0..out).map(|_| next()).collect();
        let m = model(&weight, Some(&bias), &gram, Some(&mean), 1.0);
        let s = merge(out, inp, true, 0.9, &[m]).unwrap();
        assert_eq!(s.ridge, None);
        assert!(close(&s.weight, &weight, 1e-5));
        assert!(close(s.bias.as_ref().unwrap(), &bias, 1e-5));
        // Bit-identical when repeated.
        assert_eq!(merge(out, inp, true, 0.9, &[m]).unwrap(), s);
    }
}
