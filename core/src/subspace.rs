//! Data-free subspace merging (SPEC §8): TSV-M, Iso-C, Iso-CTS and WUDI as
//! plain functions on row-major slices, with the SVD, orthogonalisation and
//! low-rank product they share. The engine side (decoding task matrices,
//! running independent steps in parallel, the report) is
//! `crate::methods::subspace`; it calls exactly these functions, so the
//! in-memory results here and the engine's bytes agree bit for bit.
//!
//! # Conventions
//! A task matrix `τ_k = W_k − W_C` is `[rows, cols] = [out, in]`, row-major,
//! f64: the f32 weights are subtracted in f64 (one rounding, usually none).
//! `r = min(rows, cols)`, `T` the number of tasks. Singular vectors are
//! stored column-major (`u`: `[rows, c]`, `v`: `[cols, c]`), the layout
//! faer factors in.
//!
//! # Rank deficiency (SPEC §8 is silent; this is the choice made here)
//! The singular vectors of a zero singular value are arbitrary: any SVD
//! may return any orthonormal completion, and feeding them to TSV-M's
//! orthogonalisation would rotate the other tasks' directions. So every
//! decomposition keeps only the directions whose singular value exceeds
//! the numerical-rank tolerance `σ₁ · max(rows, cols) · ε_f64` (what
//! `numpy.linalg.matrix_rank` uses); an all-zero matrix has rank 0.
//! - TSV-M: task `k` gives `min(⌊r/T⌋, rank τ_k)` triplets.
//! - Orthogonalisation `U ← P Qᵀ` uses the singular vectors of the nonzero
//!   singular values of `U` only: `P_ρ Q_ρᵀ = U (UᵀU)^{+½}`, the polar
//!   factor, which is unique. For `U` of full column rank (the generic
//!   case) this is SPEC's `P Qᵀ`; for two identical tasks it gives back
//!   their (truncated) task matrix rather than an arbitrary rotation.
//! - Iso-C: `σ̄` is the mean of all `r` singular values of `Σ τ_k`, as
//!   SPEC writes it, and is given to the directions above the tolerance.
//!   Iso-CTS likewise: `σ̄` is the mean of the `r` values that fill its
//!   slots, the directions kept are those above their tolerance.
//! - WUDI: an all-zero `τ_k` has no term in the objective (it is `0/0`);
//!   when every task is zero, `τ* = 0`. A singular sum of Grams takes
//!   §7's ridge.
//!
//! So an all-zero set of task matrices always gives `W* = W_C`.
//!
//! # Numerics and determinism
//! All decompositions are faer's thin SVD in f64, run with `Par::Seq`
//! (the engine runs independent tasks and row blocks in parallel instead),
//! so results do not depend on the thread count. The update
//! `U diag(s) Vᵀ` is formed in row blocks of [`block_rows`] rows, fixed by
//! the shape alone, and `W* = W_C + α·Δ` is rounded to f32 once.
//!
//! # Memory
//! One SVD of an `[m, n]` matrix (`m ≥ n` after transposition) holds the
//! f64 input (`8mn` bytes), its thin factors (`8(m + n)n + 8n`) and faer's
//! workspace ([`svd_scratch_bytes`]; for `m/n > 11/6` a QR copy of the
//! input and an `n × n` SVD, about `8mn + 8·4n²`). For a 4096×11008 task
//! matrix that is about 2.0 GB (see the README for each method's bound).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use faer::diag::DiagMut;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{Accum, MatMut, MatRef, Par};

use crate::least_squares::{LsError, RegMeanSystem};

/// The default scale `α` of the merged update (SPEC §8).
pub const DEFAULT_ALPHA: f64 = 1.0;

/// Iso-CTS's default common-space fraction (SPEC §8).
pub const DEFAULT_COMMON_SPACE_FRACTION: f64 = 0.8;

/// Elements of `U diag(s) Vᵀ` formed per row block.
pub const BLOCK_ELEMENTS: usize = 1 << 16;

/// Rows per block of the update `U diag(s) Vᵀ` for rows of `cols`
/// elements: a function of the shape only, so any thread count forms the
/// same blocks.
pub fn block_rows(cols: usize) -> usize {
    (BLOCK_ELEMENTS / cols.max(1)).max(1)
}

/// Why a subspace merge could not be computed. The messages name the
/// problem; the caller adds the file and tensor.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SubspaceError {
    /// A slice has the wrong length.
    Shape {
        /// Which input.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The length the shape requires.
        expected: usize,
    },
    /// An input holds a NaN or an infinity (an SVD would spread it everywhere).
    NotFinite {
        /// Which input.
        what: &'static str,
        /// The flat index of the first bad value.
        index: usize,
    },
    /// faer's SVD did not converge.
    NoConvergence {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// No task matrix was given.
    NoTasks,
    /// TSV-M keeps `⌊r/T⌋` triplets per task: with `r < T`, none.
    TooManyTasks {
        /// `min(rows, cols)`.
        r: usize,
        /// The number of tasks.
        tasks: usize,
    },
    /// Iso-CTS's common-space fraction is outside `[0, 1]`.
    BadFraction {
        /// The value given.
        fraction: f64,
    },
    /// WUDI's least-squares solve failed (SPEC §7).
    Solve(LsError),
}

impl fmt::Display for SubspaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubspaceError::Shape {
                what,
                len,
                expected,
            } => write!(f, "{what} has {len} values, expected {expected}"),
            SubspaceError::NotFinite { what, index } => write!(
                f,
                "{what} holds a NaN or infinity at flat index {index}; a singular value decomposition needs finite values"
            ),
            SubspaceError::NoConvergence { rows, cols } => {
                write!(f, "the SVD of a {rows}×{cols} matrix did not converge")
            }
            SubspaceError::NoTasks => write!(f, "no task matrix to merge"),
            SubspaceError::TooManyTasks { r, tasks } => write!(
                f,
                "TSV-M keeps ⌊r/T⌋ singular triplets per model, and here r = min(out, in) = {r} < T = {tasks} models: no model would give anything"
            ),
            SubspaceError::BadFraction { fraction } => write!(
                f,
                "common_space_fraction {fraction} must lie in [0, 1]"
            ),
            SubspaceError::Solve(e) => write!(f, "the WUDI least-squares solve failed: {e}"),
        }
    }
}

impl core::error::Error for SubspaceError {}

impl From<LsError> for SubspaceError {
    fn from(e: LsError) -> Self {
        SubspaceError::Solve(e)
    }
}

fn check_len(what: &'static str, len: usize, expected: usize) -> Result<(), SubspaceError> {
    if len == expected {
        Ok(())
    } else {
        Err(SubspaceError::Shape {
            what,
            len,
            expected,
        })
    }
}

fn check_finite(what: &'static str, values: &[f64]) -> Result<(), SubspaceError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(SubspaceError::NotFinite { what, index }),
    }
}

/// A thin SVD `A = U diag(s) Vᵀ` (faer, f64, `Par::Seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Rows of `A`.
    pub rows: usize,
    /// Columns of `A`.
    pub cols: usize,
    /// Left singular vectors, column-major `[rows, r]`.
    pub u: Vec<f64>,
    /// Singular values, non-increasing, `r = min(rows, cols)` of them.
    pub s: Vec<f64>,
    /// Right singular vectors, column-major `[cols, r]`.
    pub v: Vec<f64>,
}

/// Bytes of faer's workspace for the thin SVD of a `[rows, cols]` f64
/// matrix (beyond the input and the factors).
pub fn svd_scratch_bytes(rows: usize, cols: usize) -> usize {
    svd::svd_scratch::<f64>(
        rows,
        cols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    )
    .size_bytes()
}

impl Svd {
    /// The SVD of the row-major `[rows, cols]` matrix `a`.
    ///
    /// Errors: [`SubspaceError::Shape`], [`SubspaceError::NotFinite`],
    /// [`SubspaceError::NoConvergence`].
    pub fn of(a: &[f64], rows: usize, cols: usize) -> Result<Svd, SubspaceError> {
        check_len("matrix", a.len(), rows * cols)?;
        check_finite("matrix", a)?;
        thin_svd(MatRef::from_row_major_slice(a, rows, cols))
    }

    /// `r = min(rows, cols)`.
    pub fn r(&self) -> usize {
        self.s.len()
    }

    /// The numerical-rank tolerance `σ₁ · max(rows, cols) · ε_f64`.
    pub fn tolerance(&self) -> f64 {
        self.s.first().copied().unwrap_or(0.0) * self.rows.max(self.cols) as f64 * f64::EPSILON
    }

    /// The number of singular values above [`Svd::tolerance`].
    pub fn rank(&self) -> usize {
        let tolerance = self.tolerance();
        self.s.iter().take_while(|&&s| s > tolerance).count()
    }

    /// The first `n` triplets (at most `r`).
    pub fn top(&self, n: usize) -> Triplets {
        let n = n.min(self.r());
        Triplets {
            rows: self.rows,
            cols: self.cols,
            u: self.u[..self.rows * n].to_vec(),
            s: self.s[..n].to_vec(),
            v: self.v[..self.cols * n].to_vec(),
        }
    }
}

fn thin_svd(a: MatRef<'_, f64>) -> Result<Svd, SubspaceError> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let r = rows.min(cols);
    let mut s = vec![0.0f64; r];
    let mut u = vec![0.0f64; rows * r];
    let mut v = vec![0.0f64; cols * r];
    if r > 0 {
        let mut buf = MemBuffer::new(svd::svd_scratch::<f64>(
            rows,
            cols,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            Par::Seq,
            Default::default(),
        ));
        svd::svd(
            a,
            DiagMut::from_slice_mut(&mut s),
            Some(MatMut::from_column_major_slice_mut(&mut u, rows, r)),
            Some(MatMut::from_column_major_slice_mut(&mut v, cols, r)),
            Par::Seq,
            MemStack::new(&mut buf),
            Default::default(),
        )
        .map_err(|_| SubspaceError::NoConvergence { rows, cols })?;
    }
    Ok(Svd {
        rows,
        cols,
        u,
        s,
        v,
    })
}

/// Singular triplets `(u_i, s_i, v_i)` of a `[rows, cols]` update: `U`
/// column-major `[rows, c]`, `s` (`c` values), `V` column-major `[cols, c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Triplets {
    /// Rows of the update.
    pub rows: usize,
    /// Columns of the update.
    pub cols: usize,
    /// `U`, column-major `[rows, c]`.
    pub u: Vec<f64>,
    /// The `c` singular values.
    pub s: Vec<f64>,
    /// `V`, column-major `[cols, c]`.
    pub v: Vec<f64>,
}

impl Triplets {
    /// No triplets: the update is zero.
    pub fn empty(rows: usize, cols: usize) -> Triplets {
        Triplets {
            rows,
            cols,
            u: Vec::new(),
            s: Vec::new(),
            v: Vec::new(),
        }
    }

    /// `c`, the number of triplets.
    pub fn count(&self) -> usize {
        self.s.len()
    }

    /// The triplets of `parts`, side by side in order.
    pub fn concat(rows: usize, cols: usize, parts: &[&Triplets]) -> Triplets {
        let mut out = Triplets::empty(rows, cols);
        for p in parts {
            debug_assert!(p.rows == rows && p.cols == cols);
            out.u.extend_from_slice(&p.u);
            out.s.extend_from_slice(&p.s);
            out.v.extend_from_slice(&p.v);
        }
        out
    }

    /// TSV-M's orthogonalisation (SPEC §8): `U ← polar(U)`, `V ← polar(V)`
    /// (see [`polar`]); returns the triplets and the ranks of `U` and `V`.
    pub fn orthogonalised(self) -> Result<(Triplets, [usize; 2]), SubspaceError> {
        let c = self.count();
        let (u, ru) = polar(&self.u, self.rows, c)?;
        let (v, rv) = polar(&self.v, self.cols, c)?;
        Ok((Triplets { u, v, ..self }, [ru, rv]))
    }

    /// Rows `row0 .. row0 + n` of `U diag(s) Vᵀ` into `out` (row-major
    /// `[n, cols]`, `n = out.len() / cols`); `us` is scratch.
    pub fn product_rows(&self, row0: usize, out: &mut [f64], us: &mut Vec<f64>) {
        let (rows, cols, c) = (self.rows, self.cols, self.count());
        let n = out.len() / cols.max(1);
        debug_assert!(row0 + n <= rows);
        if c == 0 || n == 0 || cols == 0 {
            out.fill(0.0);
            return;
        }
        us.clear();
        for (j, &s) in self.s.iter().enumerate() {
            us.extend(self.u[j * rows + row0..][..n].iter().map(|&x| x * s));
        }
        matmul(
            MatMut::from_row_major_slice_mut(out, n, cols),
            Accum::Replace,
            MatRef::from_column_major_slice(us, n, c),
            MatRef::from_column_major_slice(&self.v, cols, c).transpose(),
            1.0,
            Par::Seq,
        );
    }

    /// `W* = W_C + α U diag(s) Vᵀ` on the rows `row0 ..` that `base` and
    /// `out` hold (row-major, whole rows), rounded to f32 once.
    pub fn apply_rows(
        &self,
        base: &[f32],
        row0: usize,
        alpha: f64,
        out: &mut [f32],
        scratch: &mut (Vec<f64>, Vec<f64>),
    ) {
        let (delta, us) = scratch;
        delta.resize(out.len(), 0.0);
        self.product_rows(row0, delta, us);
        for ((o, &b), &d) in out.iter_mut().zip(base).zip(delta.iter()) {
            *o = (f64::from(b) + alpha * d) as f32;
        }
    }

    /// `W* = W_C + α U diag(s) Vᵀ` for the whole row-major `base`, in the
    /// row blocks of [`block_rows`] (the engine forms the same blocks in
    /// parallel).
    pub fn apply(&self, base: &[f32], alpha: f64) -> Vec<f32> {
        let mut out = vec![0.0f32; base.len()];
        let block = block_rows(self.cols) * self.cols;
        let mut scratch = (Vec::new(), Vec::new());
        if block > 0 {
            for (i, (o, b)) in out.chunks_mut(block).zip(base.chunks(block)).enumerate() {
                self.apply_rows(b, i * block_rows(self.cols), alpha, o, &mut scratch);
            }
        }
        out
    }
}

/// The polar factor of the column-major `[rows, c]` matrix `m`: from its
/// SVD `m = P Σ Qᵀ`, `P_ρ Q_ρᵀ` over the `ρ` singular values above the
/// tolerance, i.e. `m (mᵀm)^{+½}` (unique; SPEC §8's `P Qᵀ` when `m` has
/// full column rank). Returns it (column-major `[rows, c]`) and `ρ`.
pub fn polar(m: &[f64], rows: usize, c: usize) -> Result<(Vec<f64>, usize), SubspaceError> {
    check_len("factor", m.len(), rows * c)?;
    check_finite("factor", m)?;
    let svd = thin_svd(MatRef::from_column_major_slice(m, rows, c))?;
    let rho = svd.rank();
    let mut out = vec![0.0f64; rows * c];
    if rho > 0 {
        let r = svd.r();
        matmul(
            MatMut::from_column_major_slice_mut(&mut out, rows, c),
            Accum::Replace,
            MatRef::from_column_major_slice(&svd.u, rows, r).subcols(0, rho),
            MatRef::from_column_major_slice(&svd.v, c, r)
                .subcols(0, rho)
                .transpose(),
            1.0,
            Par::Seq,
        );
    }
    Ok((out, rho))
}

/// One task's part of TSV-M or Iso-CTS.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    /// The triplets it gives (those above its rank tolerance).
    pub triplets: Triplets,
    /// The numerical rank of the matrix decomposed.
    pub rank: usize,
    /// The sum of the singular values of its slots (kept or not): Iso-CTS's
    /// `σ̄` is the mean over every slot.
    pub slot_sum: f64,
}

/// The top `slots` triplets of `svd` that lie above its tolerance.
fn share_of(svd: &Svd, slots: usize) -> Share {
    let rank = svd.rank();
    Share {
        triplets: svd.top(slots.min(rank)),
        rank,
        slot_sum: svd.s.iter().take(slots).sum(),
    }
}

/// TSV-M's triplets per task, `⌊r/T⌋` (SPEC §8).
///
/// Errors: [`SubspaceError::NoTasks`], and [`SubspaceError::TooManyTasks`]
/// when `0 < r < T` (no task would give anything).
pub fn tsv_per_task(r: usize, tasks: usize) -> Result<usize, SubspaceError> {
    if tasks == 0 {
        return Err(SubspaceError::NoTasks);
    }
    if r > 0 && r < tasks {
        return Err(SubspaceError::TooManyTasks { r, tasks });
    }
    Ok(r / tasks)
}

/// TSV-M, one task (SPEC §8): the SVD of `τ_k` (row-major `[rows, cols]`)
/// and its top `per_task` triplets above the rank tolerance.
pub fn tsv_share(
    tau: &[f64],
    rows: usize,
    cols: usize,
    per_task: usize,
) -> Result<Share, SubspaceError> {
    Ok(share_of(&Svd::of(tau, rows, cols)?, per_task))
}

/// What a TSV-M or Iso merge of one matrix kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SubspaceInfo {
    /// Per task: the numerical rank of the matrix decomposed for it
    /// (TSV-M: `τ_k`; Iso-CTS: its residual; Iso-C: none).
    pub ranks: Vec<usize>,
    /// Per task: the triplets it gave.
    pub kept: Vec<usize>,
    /// Iso-C and Iso-CTS: the common directions kept (of `Σ τ_k`).
    pub common_kept: Option<usize>,
    /// The ranks of the orthogonalised `U` and `V` (TSV-M, Iso-CTS).
    pub factor_ranks: Option<[usize; 2]>,
    /// Iso-C and Iso-CTS: the flat singular value `σ̄`.
    pub sigma: Option<f64>,
}

/// TSV-M's update from every task's share (SPEC §8): the triplets
/// concatenated in task order and orthogonalised.
pub fn tsv_factors(
    rows: usize,
    cols: usize,
    shares: &[Share],
) -> Result<(Triplets, SubspaceInfo), SubspaceError> {
    let parts: Vec<&Triplets> = shares.iter().map(|s| &s.triplets).collect();
    let (factors, ranks) = Triplets::concat(rows, cols, &parts).orthogonalised()?;
    Ok((
        factors,
        SubspaceInfo {
            ranks: shares.iter().map(|s| s.rank).collect(),
            kept: shares.iter().map(|s| s.triplets.count()).collect(),
            common_kept: None,
            factor_ranks: Some(ranks),
            sigma: None,
        },
    ))
}

/// TSV-M on whole task matrices (SPEC §8): the update's triplets; `W* =
/// W_C + α U diag(S) Vᵀ` is [`Triplets::apply`].
pub fn tsv(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
) -> Result<(Triplets, SubspaceInfo), SubspaceError> {
    let per_task = tsv_per_task(rows.min(cols), taus.len())?;
    let shares = taus
        .iter()
        .map(|tau| tsv_share(tau, rows, cols, per_task))
        .collect::<Result<Vec<_>, _>>()?;
    tsv_factors(rows, cols, &shares)
}

/// `Σ_k τ_k` in f64, summed in task order.
pub fn task_sum(rows: usize, cols: usize, taus: &[&[f64]]) -> Result<Vec<f64>, SubspaceError> {
    let mut sum = vec![0.0f64; rows * cols];
    for tau in taus {
        check_len("task matrix", tau.len(), rows * cols)?;
        for (s, t) in sum.iter_mut().zip(tau.iter()) {
            *s += t;
        }
    }
    Ok(sum)
}

/// Iso-C (SPEC §8) from the SVD of `Σ τ_k`: every singular value replaced
/// by their mean `σ̄` (over all `r`), on the directions above the tolerance.
pub fn iso_c_factors(sum: &Svd) -> (Triplets, SubspaceInfo) {
    let r = sum.r();
    let sigma = if r == 0 {
        0.0
    } else {
        sum.s.iter().sum::<f64>() / r as f64
    };
    let rank = sum.rank();
    let mut factors = sum.top(rank);
    factors.s.fill(sigma);
    (
        factors,
        SubspaceInfo {
            ranks: Vec::new(),
            kept: Vec::new(),
            common_kept: Some(rank),
            factor_ranks: None,
            sigma: Some(sigma),
        },
    )
}

/// Iso-C on whole task matrices (SPEC §8).
pub fn iso_c(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
) -> Result<(Triplets, SubspaceInfo), SubspaceError> {
    if taus.is_empty() {
        return Err(SubspaceError::NoTasks);
    }
    let sum = task_sum(rows, cols, taus)?;
    Ok(iso_c_factors(&Svd::of(&sum, rows, cols)?))
}

/// Iso-CTS's split of `r` directions among `T` tasks (SPEC §8): `(k, s)`
/// with `k` common directions and `s` per task, `k + T·s = r`. As the
/// paper's code does: `k₀ = ⌊r·fraction⌋` (with SPEC §3's `+10⁻⁶` against
/// products such as `0.58·100 = 57.99…`), then `s` is `(r − k₀)/T` rounded
/// to the nearest integer, halves to even (Python's `round`), at most
/// `⌊r/T⌋`.
pub fn iso_cts_split(
    r: usize,
    tasks: usize,
    fraction: f64,
) -> Result<(usize, usize), SubspaceError> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(SubspaceError::BadFraction { fraction });
    }
    if tasks == 0 {
        return Err(SubspaceError::NoTasks);
    }
    // `as` truncates, which is the floor of a non-negative value (and no_std has no `floor`).
    let k0 = ((r as f64 * fraction + 1e-6) as usize).min(r);
    let rest = r - k0;
    let (q, rem) = (rest / tasks, rest % tasks);
    let s = match (2 * rem).cmp(&tasks) {
        core::cmp::Ordering::Greater => q + 1,
        core::cmp::Ordering::Equal => q + (q % 2),
        core::cmp::Ordering::Less => q,
    }
    .min(r / tasks);
    Ok((r - s * tasks, s))
}

/// Iso-CTS's common space: the top `k` directions of `Σ τ_k` above the
/// tolerance, with the sum of the `k` slot values.
pub fn iso_cts_common(sum: &Svd, k: usize) -> Share {
    share_of(sum, k)
}

/// `τ − U_c U_cᵀ τ` in place (`τ` row-major `[rows, cols]`, `U_c` the
/// common directions): what is left of a task outside the common space.
pub fn remove_common(tau: &mut [f64], common: &Triplets) {
    let (rows, cols, k) = (common.rows, common.cols, common.count());
    if k == 0 || rows == 0 || cols == 0 {
        return;
    }
    let uc = MatRef::from_column_major_slice(&common.u, rows, k);
    let mut projection = vec![0.0f64; k * cols];
    matmul(
        MatMut::from_column_major_slice_mut(&mut projection, k, cols),
        Accum::Replace,
        uc.transpose(),
        MatRef::from_row_major_slice(tau, rows, cols),
        1.0,
        Par::Seq,
    );
    matmul(
        MatMut::from_row_major_slice_mut(tau, rows, cols),
        Accum::Add,
        uc,
        MatRef::from_column_major_slice(&projection, k, cols),
        -1.0,
        Par::Seq,
    );
}

/// Iso-CTS, one task (SPEC §8): the top `per_task` directions of its
/// residual `τ_k − U_c U_cᵀ τ_k` (computed in place of `tau`).
pub fn iso_cts_share(
    mut tau: Vec<f64>,
    rows: usize,
    cols: usize,
    common: &Triplets,
    per_task: usize,
) -> Result<Share, SubspaceError> {
    check_len("task matrix", tau.len(), rows * cols)?;
    check_finite("task matrix", &tau)?;
    if per_task == 0 {
        return Ok(Share {
            triplets: Triplets::empty(rows, cols),
            rank: 0,
            slot_sum: 0.0,
        });
    }
    remove_common(&mut tau, common);
    Ok(share_of(&Svd::of(&tau, rows, cols)?, per_task))
}

/// Iso-CTS's update (SPEC §8): the task shares and the common space side
/// by side, orthogonalised as in TSV-M, every singular value set to the
/// mean `σ̄` of the `r` slot values.
pub fn iso_cts_factors(
    rows: usize,
    cols: usize,
    common: &Share,
    shares: &[Share],
    per_task: usize,
) -> Result<(Triplets, SubspaceInfo), SubspaceError> {
    let r = rows.min(cols);
    let slots: f64 = common.slot_sum + shares.iter().map(|s| s.slot_sum).sum::<f64>();
    let sigma = if r == 0 { 0.0 } else { slots / r as f64 };
    let mut parts: Vec<&Triplets> = shares.iter().map(|s| &s.triplets).collect();
    parts.push(&common.triplets);
    let (mut factors, ranks) = Triplets::concat(rows, cols, &parts).orthogonalised()?;
    factors.s.fill(sigma);
    Ok((
        factors,
        SubspaceInfo {
            // With no task slots the residuals are not decomposed.
            ranks: if per_task == 0 {
                Vec::new()
            } else {
                shares.iter().map(|s| s.rank).collect()
            },
            kept: shares.iter().map(|s| s.triplets.count()).collect(),
            common_kept: Some(common.triplets.count()),
            factor_ranks: Some(ranks),
            sigma: Some(sigma),
        },
    ))
}

/// Iso-CTS on whole task matrices (SPEC §8).
pub fn iso_cts(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
    fraction: f64,
) -> Result<(Triplets, SubspaceInfo), SubspaceError> {
    let (k, per_task) = iso_cts_split(rows.min(cols), taus.len(), fraction)?;
    let sum = Svd::of(&task_sum(rows, cols, taus)?, rows, cols)?;
    let common = iso_cts_common(&sum, k);
    drop(sum);
    let shares = taus
        .iter()
        .map(|tau| iso_cts_share(tau.to_vec(), rows, cols, &common.triplets, per_task))
        .collect::<Result<Vec<_>, _>>()?;
    iso_cts_factors(rows, cols, &common, &shares, per_task)
}

/// WUDI's solution (SPEC §8).
#[derive(Debug, Clone, PartialEq)]
pub struct WudiSolution {
    /// `τ*`, row-major `[rows, cols]`.
    pub tau: Vec<f64>,
    /// The ridge factor `δ` of SPEC §7 the solve needed, if any.
    pub ridge: Option<f64>,
    /// The tasks (in the order added) whose task matrix is all zero.
    pub zero: Vec<usize>,
}

/// WUDI's closed form (SPEC §8), streaming: add the task matrices one at a
/// time, then [`solve`](Wudi::solve). The minimiser of
/// `Σ_k ‖(τ − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F` is §7's solve with the data-free
/// Grams `G_k = τ_kᵀ τ_k / ‖τ_k‖²_F` and no shrinkage:
/// `τ* (Σ_k G_k) = Σ_k τ_k G_k`. The paper runs Adam from `Σ τ_k`
/// instead; the closed form is its exact limit. Memory: §7's system with
/// `n = cols` (`8·(2n² + 2·rows·n + 128·n)` bytes at most).
pub struct Wudi {
    system: RegMeanSystem,
    rows: usize,
    cols: usize,
    tasks: usize,
    zero: Vec<usize>,
}

impl Wudi {
    /// An empty system for `[rows, cols]` task matrices.
    pub fn new(rows: usize, cols: usize) -> Result<Wudi, SubspaceError> {
        Ok(Wudi {
            system: RegMeanSystem::new(rows, cols, false, 1.0)?,
            rows,
            cols,
            tasks: 0,
            zero: Vec::new(),
        })
    }

    /// Adds the next task matrix (row-major `[rows, cols]`).
    pub fn add(&mut self, tau: &[f64]) -> Result<(), SubspaceError> {
        if !self.system.add_task_matrix(tau, 1.0)? {
            self.zero.push(self.tasks);
        }
        self.tasks += 1;
        Ok(())
    }

    /// `τ*` in f64. Every task zero: `τ* = 0`.
    pub fn solve(self) -> Result<WudiSolution, SubspaceError> {
        if self.tasks == 0 {
            return Err(SubspaceError::NoTasks);
        }
        if self.zero.len() == self.tasks {
            return Ok(WudiSolution {
                tau: vec![0.0; self.rows * self.cols],
                ridge: None,
                zero: self.zero,
            });
        }
        let (tau, ridge) = self.system.solve_f64()?;
        Ok(WudiSolution {
            tau,
            ridge,
            zero: self.zero,
        })
    }
}

/// WUDI on whole task matrices (SPEC §8).
pub fn wudi(rows: usize, cols: usize, taus: &[&[f64]]) -> Result<WudiSolution, SubspaceError> {
    let mut system = Wudi::new(rows, cols)?;
    for tau in taus {
        system.add(tau)?;
    }
    system.solve()
}

/// `(objective, gradient)` of WUDI at `point` (both row-major `[rows, cols]`).
fn wudi_objective_and_gradient(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
    point: &[f64],
) -> Result<(f64, Vec<f64>), SubspaceError> {
    check_len("point", point.len(), rows * cols)?;
    let mut value = 0.0;
    let mut gradient = vec![0.0f64; rows * cols];
    let mut e = vec![0.0f64; rows * rows];
    for tau in taus {
        check_len("task matrix", tau.len(), rows * cols)?;
        let norm2: f64 = tau.iter().map(|v| v * v).sum();
        if norm2 == 0.0 {
            continue;
        }
        let d: Vec<f64> = point.iter().zip(tau.iter()).map(|(p, t)| p - t).collect();
        let t = MatRef::from_row_major_slice(tau, rows, cols);
        // E = (τ − τ_k) τ_kᵀ, [rows, rows].
        matmul(
            MatMut::from_row_major_slice_mut(&mut e, rows, rows),
            Accum::Replace,
            MatRef::from_row_major_slice(&d, rows, cols),
            t.transpose(),
            1.0,
            Par::Seq,
        );
        value += e.iter().map(|x| x * x).sum::<f64>() / norm2;
        // ∂/∂τ ‖E‖² / ‖τ_k‖² = 2 E τ_k / ‖τ_k‖².
        matmul(
            MatMut::from_row_major_slice_mut(&mut gradient, rows, cols),
            Accum::Add,
            MatRef::from_row_major_slice(&e, rows, rows),
            t,
            2.0 / norm2,
            Par::Seq,
        );
    }
    Ok((value, gradient))
}

/// WUDI's objective `Σ_k ‖(τ − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F` at `point`,
/// straight from its definition (all-zero `τ_k` have no term): a reference
/// for checks, independent of the solve.
pub fn wudi_objective(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
    point: &[f64],
) -> Result<f64, SubspaceError> {
    wudi_objective_and_gradient(rows, cols, taus, point).map(|(v, _)| v)
}

/// The gradient of [`wudi_objective`], `2 Σ_k (τ − τ_k) τ_kᵀ τ_k / ‖τ_k‖²_F`.
pub fn wudi_gradient(
    rows: usize,
    cols: usize,
    taus: &[&[f64]],
    point: &[f64],
) -> Result<Vec<f64>, SubspaceError> {
    wudi_objective_and_gradient(rows, cols, taus, point).map(|(_, g)| g)
}

/// Tensors that are not 2-D (SPEC §8: "1-D tensors are averaged"):
/// `out = W_C + α · (1/T) Σ_k (W_k − W_C)`, element-wise in f64, rounded
/// once (so one model with `α = 1` comes back exactly).
pub fn mean_update(base: &[f32], models: &[&[f32]], alpha: f64, out: &mut [f32]) {
    let t = models.len().max(1) as f64;
    for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        let b = f64::from(b);
        let sum: f64 = models.iter().map(|m| f64::from(m[i]) - b).sum();
        *o = (b + alpha * (sum / t)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `U diag(s) Vᵀ`, row-major.
    fn dense(t: &Triplets) -> Vec<f64> {
        let mut out = vec![0.0; t.rows * t.cols];
        t.product_rows(0, &mut out, &mut Vec::new());
        out
    }

    fn diag(values: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let mut m = vec![0.0; rows * cols];
        for (i, &v) in values.iter().enumerate() {
            m[i * cols + i] = v;
        }
        m
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "entry {i}: {g} vs {w}\n{got:?}");
        }
    }

    #[test]
    fn tsv_splits_r_among_tasks_by_floor_when_it_does_not_divide() {
        // r = 3, T = 2: ⌊3/2⌋ = 1 triplet each, one slot unused. Task 1's
        // top triplet is (e1, 3, e1), task 2's (e2, 5, e2).
        let t1 = diag(&[3.0, 2.0, 1.0], 3, 3);
        let t2 = diag(&[0.0, 5.0, 4.0], 3, 3);
        assert_eq!(tsv_per_task(3, 2), Ok(1));
        let (factors, info) = tsv(3, 3, &[&t1, &t2]).unwrap();
        assert_close(&dense(&factors), &diag(&[3.0, 5.0, 0.0], 3, 3), 1e-12);
        assert_eq!(info.kept, vec![1, 1]);
        assert_eq!(info.ranks, vec![3, 2]);
        assert_eq!(info.factor_ranks, Some([2, 2]));
        // r = 5, T = 3 on a 5×7 matrix: one each, 2 slots unused.
        assert_eq!(tsv_per_task(5, 3), Ok(1));
        assert_eq!(
            tsv_per_task(2, 3),
            Err(SubspaceError::TooManyTasks { r: 2, tasks: 3 })
        );
        assert_eq!(tsv_per_task(0, 3), Ok(0));
    }

    #[test]
    fn tsv_orthogonalises_overlapping_directions_symmetrically() {
        // τ₁ = e1 e1ᵀ (σ = 1), τ₂ = [[1, 1], [1, 1]] (σ = 2 along
        // w = (1, 1)/√2). U = V = [e1, w]: columns at 0° and 45°. Their polar
        // factor turns them apart symmetrically about 22.5°, to −22.5° and
        // 67.5°: p = (c, −s), q = (s, c) with c = cos 22.5°, s = sin 22.5°,
        // and Δ = 1·p pᵀ + 2·q qᵀ = [[c² + 2s², cs], [cs, s² + 2c²]]
        // with c² = (1 + 1/√2)/2, s² = (1 − 1/√2)/2, cs = 1/(2√2).
        let t1 = [1.0, 0.0, 0.0, 0.0];
        let t2 = [1.0, 1.0, 1.0, 1.0];
        let (factors, info) = tsv(2, 2, &[&t1, &t2]).unwrap();
        let h = core::f64::consts::FRAC_1_SQRT_2;
        let (c2, s2, cs) = ((1.0 + h) / 2.0, (1.0 - h) / 2.0, h / 2.0);
        assert_close(
            &dense(&factors),
            &[c2 + 2.0 * s2, cs, cs, s2 + 2.0 * c2],
            1e-12,
        );
        assert_eq!(info.factor_ranks, Some([2, 2]));
    }

    #[test]
    fn tsv_of_two_identical_tasks_is_their_truncation() {
        // U = [a, a]: the polar factor on the range gives [a, a]/√2, and the
        // update is a σ bᵀ, not a rotation by arbitrary null vectors.
        let t = [2.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let (factors, info) = tsv(2, 3, &[&t, &t]).unwrap();
        assert_close(&dense(&factors), &[2.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1e-12);
        assert_eq!(info.factor_ranks, Some([1, 1]));
    }

    #[test]
    fn iso_c_flattens_the_spectrum_of_the_sum() {
        // Σ τ = [[3, 0, 0], [0, 1, 0]]: σ = (3, 1), σ̄ = 2 on both directions.
        let t1 = diag(&[3.0, 0.0], 2, 3);
        let t2 = diag(&[0.0, 1.0], 2, 3);
        let (factors, info) = iso_c(2, 3, &[&t1, &t2]).unwrap();
        assert_close(&dense(&factors), &diag(&[2.0, 2.0], 2, 3), 1e-12);
        assert_eq!(info.sigma, Some(2.0));
        assert_eq!(info.common_kept, Some(2));
        // Rank-deficient: Σ τ = diag(4, 0). σ̄ = (4 + 0)/2 = 2, given to the
        // one direction that is defined.
        let t1 = diag(&[4.0, 0.0], 2, 2);
        let zero = [0.0; 4];
        let (factors, info) = iso_c(2, 2, &[&t1, &zero]).unwrap();
        assert_close(&dense(&factors), &diag(&[2.0, 0.0], 2, 2), 1e-12);
        assert_eq!((info.sigma, info.common_kept), (Some(2.0), Some(1)));
    }

    #[test]
    fn iso_cts_splits_into_common_and_task_directions() {
        // r = 3, T = 2, fraction ½: k₀ = 1, s = round(2/2) = 1, k = 1.
        assert_eq!(iso_cts_split(3, 2, 0.5), Ok((1, 1)));
        // τ₁ = diag(6, 2, 0), τ₂ = diag(0, 3, 1); Σ τ = diag(6, 5, 1).
        // Common: e1 (σ 6). Residuals: diag(0, 2, 0) → e2 (σ 2) and
        // diag(0, 3, 1) → e2 (σ 3). Slots 6 + 2 + 3: σ̄ = 11/3. U = V =
        // [e2, e2, e1] has rank 2, so Δ = 11/3 (e1 e1ᵀ + e2 e2ᵀ); Iso-C
        // would give (12/3)·I instead.
        let t1 = diag(&[6.0, 2.0, 0.0], 3, 3);
        let t2 = diag(&[0.0, 3.0, 1.0], 3, 3);
        let (factors, info) = iso_cts(3, 3, &[&t1, &t2], 0.5).unwrap();
        let third = 11.0 / 3.0;
        assert_close(&dense(&factors), &diag(&[third, third, 0.0], 3, 3), 1e-12);
        assert_eq!(info.sigma, Some(11.0 / 3.0));
        assert_eq!(info.common_kept, Some(1));
        assert_eq!(info.kept, vec![1, 1]);
        assert_eq!(info.ranks, vec![1, 2]);
        assert_eq!(info.factor_ranks, Some([2, 2]));
        let (iso, _) = iso_c(3, 3, &[&t1, &t2]).unwrap();
        assert_close(&dense(&iso), &diag(&[4.0, 4.0, 4.0], 3, 3), 1e-12);
    }

    #[test]
    fn iso_cts_split_rounds_like_the_reference_code() {
        // (r, T, fraction) → (k, s): k₀ = ⌊r·f⌋, s = round((r − k₀)/T), halves to even.
        let cases = [
            ((10, 3, 0.8), (7, 1)),     // round(2/3) = 1
            ((5, 2, 0.8), (5, 0)),      // round(0.5) = 0
            ((9, 2, 0.5), (5, 2)),      // round(2.5) = 2
            ((13, 2, 0.5), (5, 4)),     // round(3.5) = 4
            ((7, 2, 0.0), (1, 3)),      // round(3.5) = 4, at most ⌊7/2⌋ = 3
            ((8, 3, 1.0), (8, 0)),      // fraction 1: Iso-C
            ((100, 2, 0.58), (58, 21)), // 0.58·100 = 57.99…: k₀ = 58
        ];
        for ((r, t, f), want) in cases {
            assert_eq!(iso_cts_split(r, t, f), Ok(want), "{r} {t} {f}");
        }
        assert_eq!(
            iso_cts_split(3, 2, 1.5),
            Err(SubspaceError::BadFraction { fraction: 1.5 })
        );
    }

    #[test]
    fn wudi_objective_at_its_minimiser() {
        // Scalars: τ₁ = 1, τ₂ = 3, G_k = 1: τ* = (1 + 3)/2 = 2, objective
        // (2 − 1)²·1/1 + (2 − 3)²·9/9 = 2, gradient 2(2 − 1) + 2(2 − 3) = 0.
        let s = wudi(1, 1, &[&[1.0], &[3.0]]).unwrap();
        assert_close(&s.tau, &[2.0], 1e-12);
        assert_eq!(s.ridge, None);
        assert_close(
            &[wudi_objective(1, 1, &[&[1.0], &[3.0]], &s.tau).unwrap()],
            &[2.0],
            1e-12,
        );
        // τ₁ = [[1, 0], [0, 0]], τ₂ = [[0, 0], [2, 0]]: G₁ = G₂ = e1 e1ᵀ,
        // S = diag(2, 0) is singular (ridge 1e-8), R = [[1, 0], [2, 0]], so
        // τ* = R S⁺ = [[½, 0], [1, 0]]. Objective: ‖[[−½, 0], [1, 0]] τ₁ᵀ‖²
        // = 1.25, plus ‖[[½, 0], [−1, 0]] τ₂ᵀ‖² / 4 = (1 + 4)/4 = 1.25.
        let (t1, t2) = ([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]);
        let s = wudi(2, 2, &[&t1, &t2]).unwrap();
        assert_eq!(s.ridge, Some(1e-8));
        assert_close(&s.tau, &[0.5, 0.0, 1.0, 0.0], 1e-7);
        let f = wudi_objective(2, 2, &[&t1, &t2], &[0.5, 0.0, 1.0, 0.0]).unwrap();
        assert_close(&[f], &[2.5], 1e-12);
        let g = wudi_gradient(2, 2, &[&t1, &t2], &[0.5, 0.0, 1.0, 0.0]).unwrap();
        assert_close(&g, &[0.0; 4], 1e-12);
        // A point off the minimiser costs more.
        assert!(wudi_objective(2, 2, &[&t1, &t2], &[0.6, 0.0, 1.0, 0.0]).unwrap() > f);
    }

    #[test]
    fn all_zero_task_matrices_give_the_base() {
        let zero = [0.0; 6];
        let base = [1.0f32, -2.0, 3.0, 0.5, 0.25, 8.0];
        let (t, info) = tsv(2, 3, &[&zero, &zero]).unwrap();
        assert_eq!(
            (t.count(), info.ranks, info.kept),
            (0, vec![0, 0], vec![0, 0])
        );
        assert_eq!(t.apply(&base, 1.0), base.to_vec());
        let (t, info) = iso_c(2, 3, &[&zero, &zero]).unwrap();
        assert_eq!((t.count(), info.sigma), (0, Some(0.0)));
        assert_eq!(t.apply(&base, 1.0), base.to_vec());
        let (t, info) = iso_cts(2, 3, &[&zero, &zero], 0.5).unwrap();
        assert_eq!((t.count(), info.sigma), (0, Some(0.0)));
        assert_eq!(t.apply(&base, 1.0), base.to_vec());
        let s = wudi(2, 3, &[&zero, &zero]).unwrap();
        assert_eq!((s.tau, s.ridge, s.zero), (vec![0.0; 6], None, vec![0, 1]));
        // One zero task among others is left out of WUDI's objective.
        let s = wudi(1, 1, &[&[0.0], &[3.0]]).unwrap();
        assert_eq!((s.tau, s.zero), (vec![3.0], vec![0]));
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = Svd::of(&[1.0, f64::NAN], 1, 2).unwrap_err();
        assert_eq!(
            e,
            SubspaceError::NotFinite {
                what: "matrix",
                index: 1
            }
        );
        assert!(e.to_string().contains("NaN"));
        assert!(matches!(
            tsv(2, 2, &[&[1.0, 2.0, 3.0]]),
            Err(SubspaceError::Shape { .. })
        ));
        assert_eq!(tsv(2, 2, &[]).unwrap_err(), SubspaceError::NoTasks);
        assert!(SubspaceError::TooManyTasks { r: 1, tasks: 2 }
            .to_string()
            .contains("r = min(out, in) = 1 < T = 2"));
    }

    #[test]
    fn mean_update_by_hand() {
        // base 1, models 2 and 5: mean update 2.5, α = ½ → 1 + 1.25.
        let mut out = [0.0f32];
        mean_update(&[1.0], &[&[2.0], &[5.0]], 0.5, &mut out);
        assert_eq!(out, [2.25]);
        mean_update(&[1.0], &[&[2.0], &[5.0]], 1.0, &mut out);
        assert_eq!(out, [3.5]);
    }

    #[test]
    fn the_same_input_gives_the_same_bits() {
        let t: Vec<f64> = (0..35)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0)
            .collect();
        let a = tsv(5, 7, &[&t, &t[..]]).unwrap();
        let b = tsv(5, 7, &[&t, &t[..]]).unwrap();
        assert_eq!(a, b);
    }

    /// A `[rows, cols]` matrix of entries in `[-1, 1]`.
    fn matrix(rows: usize, cols: usize) -> impl Strategy<Value = Vec<f64>> {
        proptest::collection::vec(-1.0f64..1.0, rows * cols)
    }

    fn shape_and_tasks(tasks: usize) -> impl Strategy<Value = (usize, usize, Vec<Vec<f64>>)> {
        (1usize..7, 1usize..7).prop_flat_map(move |(rows, cols)| {
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(matrix(rows, cols), tasks),
            )
        })
    }

    fn max_abs(m: &[f64]) -> f64 {
        m.iter().fold(0.0, |a, &x| a.max(x.abs()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn tsv_of_one_full_rank_model_gives_its_task_vector_back(
            (rows, cols, taus) in shape_and_tasks(1),
        ) {
            let tau = &taus[0];
            let (factors, info) = tsv(rows, cols, &[tau]).unwrap();
            let delta = dense(&factors);
            let tol = 64.0 * f64::EPSILON * (rows.max(cols) as f64) * max_abs(tau).max(1e-300);
            for (d, t) in delta.iter().zip(tau) {
                prop_assert!((d - t).abs() <= tol, "{d} vs {t}");
            }
            prop_assert_eq!(info.kept[0], info.ranks[0]);
            // And through W* = W_C + α·Δ in f32 with α = 1.
            let base: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25).collect();
            let want: Vec<f32> = base.iter().zip(tau).map(|(&b, &t)| (f64::from(b) + t) as f32).collect();
            let got = factors.apply(&base, 1.0);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 2.0 * f32::EPSILON * w.abs().max(1.0));
            }
        }

        #[test]
        fn iso_c_output_has_equal_singular_values(
            (rows, cols, taus) in shape_and_tasks(3),
        ) {
            let refs: Vec<&[f64]> = taus.iter().map(Vec::as_slice).collect();
            let (factors, info) = iso_c(rows, cols, &refs).unwrap();
            let sigma = info.sigma.unwrap();
            let out = Svd::of(&dense(&factors), rows, cols).unwrap();
            let kept = info.common_kept.unwrap();
            let tol = 64.0 * f64::EPSILON * (rows.max(cols) as f64) * sigma.max(1e-300);
            for (i, s) in out.s.iter().enumerate() {
                let want = if i < kept { sigma } else { 0.0 };
                prop_assert!((s - want).abs() <= tol, "σ_{i} = {s}, σ̄ = {sigma}");
            }
            // σ̄ is the mean of the sum's singular values.
            let sum = Svd::of(&task_sum(rows, cols, &refs).unwrap(), rows, cols).unwrap();
            let mean = sum.s.iter().sum::<f64>() / sum.r() as f64;
            prop_assert!((mean - sigma).abs() <= tol);
        }

        #[test]
        fn orthogonalised_factors_are_orthonormal(
            (rows, cols, taus) in shape_and_tasks(2),
        ) {
            let refs: Vec<&[f64]> = taus.iter().map(Vec::as_slice).collect();
            let r = rows.min(cols);
            prop_assume!(r >= 2);
            let shares: Vec<Share> = refs
                .iter()
                .map(|t| tsv_share(t, rows, cols, r / 2).unwrap())
                .collect();
            let (factors, info) = tsv_factors(rows, cols, &shares).unwrap();
            let c = factors.count();
            // Random tasks: the concatenation has full column rank.
            prop_assert_eq!(info.factor_ranks, Some([c, c]));
            for (m, n) in [(&factors.u, rows), (&factors.v, cols)] {
                // ε·n, with a factor for the rounding of the check's own dot products.
                let tol = 4.0 * f64::EPSILON * n as f64;
                for i in 0..c {
                    for j in 0..c {
                        let dot: f64 = (0..n).map(|x| m[i * n + x] * m[j * n + x]).sum();
                        let want = if i == j { 1.0 } else { 0.0 };
                        prop_assert!((dot - want).abs() <= tol, "({i}, {j}): {dot}");
                    }
                }
            }
        }

        #[test]
        fn wudi_gradient_vanishes_at_the_solution(
            (rows, cols, taus) in shape_and_tasks(3),
        ) {
            let refs: Vec<&[f64]> = taus.iter().map(Vec::as_slice).collect();
            let s = wudi(rows, cols, &refs).unwrap();
            let g = wudi_gradient(rows, cols, &refs, &s.tau).unwrap();
            // The ridge (when S is singular) leaves a gradient of order
            // δ·mean(diag S)·|τ*|, δ ≤ 1e-4 for these sizes.
            let scale = max_abs(&s.tau).max(1.0);
            let tol = match s.ridge { None => 1e-9, Some(d) => 1e-9 + 4.0 * d } * scale;
            prop_assert!(max_abs(&g) <= tol, "gradient {g:?}, ridge {:?}", s.ridge);
            let f = wudi_objective(rows, cols, &refs, &s.tau).unwrap();
            let moved: Vec<f64> = s.tau.iter().enumerate().map(|(i, t)| t + if i == 0 { 1e-3 } else { 0.0 }).collect();
            let tol = 1e-9 * f.max(1.0);
            prop_assert!(wudi_objective(rows, cols, &refs, &moved).unwrap() >= f - tol);
        }

        #[test]
        fn iso_cts_split_fills_r(r in 0usize..300, tasks in 1usize..9, fraction in 0.0f64..=1.0) {
            let (k, s) = iso_cts_split(r, tasks, fraction).unwrap();
            prop_assert_eq!(k + s * tasks, r);
            prop_assert!(s <= r / tasks);
            prop_assert!((k as f64 - r as f64 * fraction).abs() <= tasks as f64);
        }

        #[test]
        fn iso_cts_with_the_whole_common_space_is_iso_c(
            (rows, cols, taus) in shape_and_tasks(2),
        ) {
            let refs: Vec<&[f64]> = taus.iter().map(Vec::as_slice).collect();
            let (cts, _) = iso_cts(rows, cols, &refs, 1.0).unwrap();
            let (c, info) = iso_c(rows, cols, &refs).unwrap();
            let tol = 256.0 * f64::EPSILON * (rows.max(cols) as f64) * info.sigma.unwrap().max(1e-300);
            for (a, b) in dense(&cts).iter().zip(&dense(&c)) {
                prop_assert!((a - b).abs() <= tol, "{a} vs {b}");
            }
        }

        #[test]
        fn mean_update_of_one_model_is_that_model(
            values in proptest::collection::vec(-1e3f32..1e3, 1..40),
            base_shift in -10.0f32..10.0,
        ) {
            let base: Vec<f32> = values.iter().map(|v| v * 0.5 + base_shift).collect();
            let mut out = vec![0.0f32; values.len()];
            mean_update(&base, &[&values], 1.0, &mut out);
            prop_assert_eq!(&out, &values);
            mean_update(&base, &[&values, &values], 0.0, &mut out);
            prop_assert_eq!(&out, &base);
        }
    }
}
