//! SAFE-M: sharpness-aware flatness-enhanced merging (SPEC §1), as plain
//! functions on f32 slices. Weights are row-major `[out, in]`.
//!
//! The streaming engine calls these kernels on blocks of rows it decodes
//! from the checkpoints; [`merge_tensor`] chains them on whole in-memory
//! tensors and is the reference the engine is tested against.

use crate::simd::multiversion;

use crate::reduce;
use crate::select::{election_threshold, is_elected};
use alloc::vec;
use alloc::vec::Vec;

/// `ε` of the SPEC preamble.
pub const EPSILON: f32 = 1e-8;

/// The two score forms of SPEC §1.2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreForm {
    /// `S = |W ⊙ g'| / (1 + α·g'²)` — the default, with `α = 1`.
    Sas {
        /// Weight of the sharpness penalty, `α ≥ 0`.
        alpha: f32,
    },
    /// `S = |W ⊙ g'| / (g'² + ε)` — the paper's `S_SAFE`.
    Ratio {
        /// The `ε` that keeps the ratio finite.
        epsilon: f32,
    },
}

impl Default for ScoreForm {
    fn default() -> Self {
        ScoreForm::Sas { alpha: 1.0 }
    }
}

/// One parameter's score (SPEC §1.2): salience `|w·g|` (an approximate SNIP
/// score) rewarded, sharpness `g²` (a diagonal-Hessian proxy) penalised.
#[inline]
pub fn safe_score(w: f32, g: f32, form: ScoreForm) -> f32 {
    let salience = (w * g).abs();
    let sharpness = g * g;
    match form {
        ScoreForm::Sas { alpha } => salience / (1.0 + alpha * sharpness),
        ScoreForm::Ratio { epsilon } => salience / (sharpness + epsilon),
    }
}

/// `u = ȳ_model − ȳ_ancestor` (SPEC §1.2): the output factor of the
/// rank-one pseudo-gradient `g' = u ⊗ x̄_A`.
pub fn output_shift(y_model: &[f32], y_ancestor: &[f32]) -> Vec<f32> {
    assert_eq!(
        y_model.len(),
        y_ancestor.len(),
        "output_shift: widths differ"
    );
    y_model.iter().zip(y_ancestor).map(|(y, c)| y - c).collect()
}

/// Scores of a block of rows of a 2-D weight with `g'[r][j] = u[r]·v[j]`
/// (SPEC §1.2). `g'` is never materialised: each element is formed as it
/// is scored. `weight` holds `u.len()` rows of `v.len()` columns.
pub fn score_matrix(weight: &[f32], u: &[f32], v: &[f32], form: ScoreForm, out: &mut [f32]) {
    score_matrix_isa(crate::simd::selected(), weight, u, v, form, out)
}

multiversion!(fn score_matrix_isa = score_matrix_body(weight: &[f32], u: &[f32], v: &[f32], form: ScoreForm, out: &mut [f32]));

#[inline(always)]
fn score_matrix_body(weight: &[f32], u: &[f32], v: &[f32], form: ScoreForm, out: &mut [f32]) {
    let cols = v.len();
    assert_eq!(weight.len(), u.len() * cols, "score_matrix: weight size");
    assert_eq!(out.len(), weight.len(), "score_matrix: output size");
    if cols == 0 {
        return;
    }
    for ((w_row, s_row), &u_r) in weight
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(cols))
        .zip(u)
    {
        for ((s, &w), &v_j) in s_row.iter_mut().zip(w_row).zip(v) {
            *s = safe_score(w, u_r * v_j, form);
        }
    }
}

/// Scores of a bias, whose pseudo-gradient is `u` itself (SPEC §1.2).
pub fn score_vector(bias: &[f32], u: &[f32], form: ScoreForm, out: &mut [f32]) {
    assert_eq!(bias.len(), u.len(), "score_vector: widths differ");
    assert_eq!(out.len(), bias.len(), "score_vector: output size");
    for ((s, &b), &g) in out.iter_mut().zip(bias).zip(u) {
        *s = safe_score(b, g, form);
    }
}

/// A sign conflict (SPEC §1.2): both parameters elected and their task
/// vectors point in opposite directions (`τ_A·τ_B < 0`, tested by signs so
/// that tiny values cannot underflow to a zero product).
#[inline]
pub fn is_conflict(elected_a: bool, elected_b: bool, tau_a: f32, tau_b: f32) -> bool {
    elected_a && elected_b && ((tau_a > 0.0 && tau_b < 0.0) || (tau_a < 0.0 && tau_b > 0.0))
}

/// The coefficient of a row along `d` (SPEC §1.3): `⟨row, d⟩ / (⟨d, d⟩ + ε)`,
/// with `dd = ⟨d, d⟩` computed once per tensor by [`reduce::sum_squares`].
#[inline]
pub fn projection_coefficient(row: &[f32], d: &[f32], dd: f64, epsilon: f32) -> f32 {
    (reduce::dot(row, d) / (dd + epsilon as f64)) as f32
}

/// Splits a row into its part along `d` and the orthogonal rest (SPEC §1.3):
/// `P = c·d`, `O = row − P`, with `c` from [`projection_coefficient`].
pub fn split_row(row: &[f32], d: &[f32], c: f32, parallel: &mut [f32], orthogonal: &mut [f32]) {
    assert!(row.len() == d.len() && parallel.len() == d.len() && orthogonal.len() == d.len());
    for j in 0..row.len() {
        let p = c * d[j];
        parallel[j] = p;
        orthogonal[j] = row[j] - p;
    }
}

/// `acc += λ_proj·P + λ_ortho·O` for one row, with `P` and `O` formed on the
/// fly as in [`split_row`] (SPEC §1.3). `d = None` is a bias: `acc += λ_proj·row`.
#[inline]
pub fn add_decoupled(
    acc: &mut [f32],
    row: &[f32],
    direction: Option<(&[f32], f32)>,
    lambda_proj: f32,
    lambda_ortho: f32,
) {
    assert_eq!(acc.len(), row.len(), "add_decoupled: widths differ");
    match direction {
        Some((d, c)) => {
            assert_eq!(d.len(), row.len(), "add_decoupled: direction width");
            for j in 0..row.len() {
                let p = c * d[j];
                let o = row[j] - p;
                acc[j] += lambda_proj * p + lambda_ortho * o;
            }
        }
        None => {
            for (a, &t) in acc.iter_mut().zip(row) {
                *a += lambda_proj * t;
            }
        }
    }
}

/// The fallback of SPEC §1.4: `W* = (1 − w)·W_A + w·B̄`, with `B̄` the mean
/// of the contributors' tensors (summed in order, then divided).
pub fn fallback_blend(receiver: &[f32], contributors: &[&[f32]], weight: f32, out: &mut [f32]) {
    assert_eq!(out.len(), receiver.len(), "fallback_blend: output size");
    assert!(
        contributors.iter().all(|c| c.len() == receiver.len()),
        "fallback_blend: sizes"
    );
    if contributors.is_empty() {
        out.copy_from_slice(receiver);
        return;
    }
    let m = contributors.len() as f32;
    for (j, (o, &a)) in out.iter_mut().zip(receiver).enumerate() {
        let mut sum = 0.0f32;
        for c in contributors {
            sum += c[j];
        }
        *o = (1.0 - weight) * a + weight * (sum / m);
    }
}

/// A model's election over a tensor: its scores and its threshold.
#[derive(Debug, Clone, Copy)]
pub struct Election<'a> {
    /// Scores of the elements in the block (same layout as the weights).
    pub scores: &'a [f32],
    /// The tensor's threshold `t` (from [`election_threshold`] over all its scores).
    pub threshold: f32,
}

/// One contributor's inputs for a block of rows.
#[derive(Debug, Clone, Copy)]
pub struct ContributorBlock<'a> {
    /// `W_B` of the block.
    pub weight: &'a [f32],
    /// `B`'s election over the block.
    pub election: Election<'a>,
    /// `λ_proj` of this contributor.
    pub lambda_proj: f32,
    /// `λ_ortho` of this contributor.
    pub lambda_ortho: f32,
}

/// Counts of one contributor's mask over a tensor, for the merge report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskCounts {
    /// `|M_A|`: the receiver's elected parameters.
    pub receiver_elected: u64,
    /// `|M_B|`: the contributor's elected parameters.
    pub elected: u64,
    /// `|K|`: elected by both with opposite task-vector signs.
    pub conflicts: u64,
    /// `|M'_B| = |M_B| − |K|`: what the contributor actually gives.
    pub kept: u64,
}

impl MaskCounts {
    /// Adds the counts of another block.
    pub fn add(&mut self, other: &MaskCounts) {
        self.receiver_elected += other.receiver_elected;
        self.elected += other.elected;
        self.conflicts += other.conflicts;
        self.kept += other.kept;
    }
}

/// Stages 2 and 3 of SPEC §1.2–1.5 on a block of rows: conflict-free mask,
/// masked task vector `τ_u`, decomposition along `d` and fusion.
///
/// `out` receives `W* = W_A + Σ_k (λ_proj·P_k + λ_ortho·O_k)`, the sum taken
/// contributor by contributor in order. `direction` is `(d, ⟨d, d⟩)` for a
/// weight (rows of `d.len()` columns) and `None` for a bias (one row,
/// `b* = b_A + Σ_k λ_proj·τ_u,k`). `tau_scratch` holds one row. `counts`
/// (one per contributor) are incremented.
#[allow(clippy::too_many_arguments)]
pub fn fuse_block(
    receiver: &[f32],
    ancestor: &[f32],
    receiver_election: Election<'_>,
    contributors: &[ContributorBlock<'_>],
    direction: Option<(&[f32], f64)>,
    epsilon: f32,
    out: &mut [f32],
    tau_scratch: &mut Vec<f32>,
    counts: &mut [MaskCounts],
) {
    fuse_block_isa(
        crate::simd::selected(),
        receiver,
        ancestor,
        receiver_election,
        contributors,
        direction,
        epsilon,
        out,
        tau_scratch,
        counts,
    )
}

multiversion!(fn fuse_block_isa = fuse_block_body(
    receiver: &[f32],
    ancestor: &[f32],
    receiver_election: Election<'_>,
    contributors: &[ContributorBlock<'_>],
    direction: Option<(&[f32], f64)>,
    epsilon: f32,
    out: &mut [f32],
    tau_scratch: &mut Vec<f32>,
    counts: &mut [MaskCounts],
));

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fuse_block_body(
    receiver: &[f32],
    ancestor: &[f32],
    receiver_election: Election<'_>,
    contributors: &[ContributorBlock<'_>],
    direction: Option<(&[f32], f64)>,
    epsilon: f32,
    out: &mut [f32],
    tau_scratch: &mut Vec<f32>,
    counts: &mut [MaskCounts],
) {
    let n = receiver.len();
    assert!(ancestor.len() == n && out.len() == n && receiver_election.scores.len() == n);
    assert_eq!(
        counts.len(),
        contributors.len(),
        "fuse_block: one count per contributor"
    );
    let cols = match direction {
        Some((d, _)) => d.len(),
        None => n,
    };
    out.copy_from_slice(receiver);
    if cols == 0 || n == 0 {
        return;
    }
    assert_eq!(n % cols, 0, "fuse_block: block is not whole rows");
    tau_scratch.resize(cols, 0.0);
    let receiver_elected = receiver_election
        .scores
        .iter()
        .filter(|&&s| is_elected(s, receiver_election.threshold))
        .count() as u64;
    for (contributor, count) in contributors.iter().zip(counts.iter_mut()) {
        assert!(contributor.weight.len() == n && contributor.election.scores.len() == n);
        count.receiver_elected += receiver_elected;
        // Counts in locals and zipped slices: the mask loop vectorises.
        let (mut elected, mut conflicts, mut kept) = (0u64, 0u64, 0u64);
        let (threshold_a, threshold_b) =
            (receiver_election.threshold, contributor.election.threshold);
        for row_start in (0..n).step_by(cols) {
            let row = row_start..row_start + cols;
            let tau = &mut tau_scratch[..];
            let scores = receiver_election.scores[row.clone()]
                .iter()
                .zip(&contributor.election.scores[row.clone()]);
            let weights = receiver[row.clone()]
                .iter()
                .zip(&ancestor[row.clone()])
                .zip(&contributor.weight[row.clone()]);
            for ((t, ((&a, &c), &b)), (&score_a, &score_b)) in
                tau.iter_mut().zip(weights).zip(scores)
            {
                let tau_a = a - c;
                let tau_b = b - c;
                let elected_a = is_elected(score_a, threshold_a);
                let elected_b = is_elected(score_b, threshold_b);
                let conflict = is_conflict(elected_a, elected_b, tau_a, tau_b);
                let keep = elected_b && !conflict;
                elected += u64::from(elected_b);
                conflicts += u64::from(conflict);
                kept += u64::from(keep);
                *t = if keep { tau_b } else { 0.0 };
            }
            let row_direction =
                direction.map(|(d, dd)| (d, projection_coefficient(tau, d, dd, epsilon)));
            add_decoupled(
                &mut out[row],
                tau,
                row_direction,
                contributor.lambda_proj,
                contributor.lambda_ortho,
            );
        }
        count.elected += elected;
        count.conflicts += conflicts;
        count.kept += kept;
    }
}

/// Election parameters of one model (SPEC §1.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElectionParams {
    /// Density `k ∈ (0, 1]`.
    pub density: f64,
    /// Score form.
    pub form: ScoreForm,
}

/// A contributor of [`merge_tensor`].
#[derive(Debug, Clone, Copy)]
pub struct Contributor<'a> {
    /// `W_B` (or `b_B`).
    pub weight: &'a [f32],
    /// `ȳ_B` of the layer.
    pub y_mean: &'a [f32],
    /// Its election parameters.
    pub election: ElectionParams,
    /// `λ_proj`.
    pub lambda_proj: f32,
    /// `λ_ortho`.
    pub lambda_ortho: f32,
}

/// Result of [`merge_tensor`]: the merged tensor and one count per contributor.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedTensor {
    /// `W*`.
    pub values: Vec<f32>,
    /// Mask counts, one per contributor.
    pub counts: Vec<MaskCounts>,
}

/// SAFE-M on one whole in-memory tensor (SPEC §1.2–1.5), sequentially: the
/// reference for the streaming engine and the entry point for callers that
/// hold tensors in memory.
///
/// `receiver`, `ancestor` and each contributor's `weight` are `W` of shape
/// `[y.len(), x_mean.len()]` when `is_bias` is false, or `b` of shape
/// `[y.len()]` when it is true. `x_mean` is the receiver's mean input `x̄_A`
/// (the projection direction `d` and the pseudo-gradient's input factor
/// `v`); `y_*` are mean outputs.
#[allow(clippy::too_many_arguments)]
pub fn merge_tensor(
    receiver: &[f32],
    receiver_y: &[f32],
    receiver_election: ElectionParams,
    ancestor: &[f32],
    ancestor_y: &[f32],
    x_mean: &[f32],
    contributors: &[Contributor<'_>],
    is_bias: bool,
    epsilon: f32,
) -> MergedTensor {
    let merged = merge_tensor_on(
        &CpuKernels,
        receiver,
        receiver_y,
        receiver_election,
        ancestor,
        ancestor_y,
        x_mean,
        contributors,
        is_bias,
        epsilon,
    );
    match merged {
        Ok(merged) => merged,
        Err(never) => match never {},
    }
}

/// The element-wise stages of [`merge_tensor`], so that another device
/// (the CUDA crate) can run them while the orchestration — output shifts,
/// exact thresholds, the projection direction — stays here, once.
pub trait Kernels {
    /// What a failed kernel reports.
    type Error;
    /// [`score_matrix`].
    fn score_matrix(
        &self,
        weight: &[f32],
        u: &[f32],
        v: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Self::Error>;
    /// [`score_vector`].
    fn score_vector(
        &self,
        bias: &[f32],
        u: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Self::Error>;
    /// [`fuse_block`] on a whole tensor.
    #[allow(clippy::too_many_arguments)]
    fn fuse_block(
        &self,
        receiver: &[f32],
        ancestor: &[f32],
        receiver_election: Election<'_>,
        contributors: &[ContributorBlock<'_>],
        direction: Option<(&[f32], f64)>,
        epsilon: f32,
        out: &mut [f32],
        counts: &mut [MaskCounts],
    ) -> Result<(), Self::Error>;
}

/// This crate's kernels (the reference).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    type Error = core::convert::Infallible;

    fn score_matrix(
        &self,
        weight: &[f32],
        u: &[f32],
        v: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Self::Error> {
        score_matrix(weight, u, v, form, out);
        Ok(())
    }

    fn score_vector(
        &self,
        bias: &[f32],
        u: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Self::Error> {
        score_vector(bias, u, form, out);
        Ok(())
    }

    fn fuse_block(
        &self,
        receiver: &[f32],
        ancestor: &[f32],
        receiver_election: Election<'_>,
        contributors: &[ContributorBlock<'_>],
        direction: Option<(&[f32], f64)>,
        epsilon: f32,
        out: &mut [f32],
        counts: &mut [MaskCounts],
    ) -> Result<(), Self::Error> {
        let mut scratch = Vec::new();
        fuse_block(
            receiver,
            ancestor,
            receiver_election,
            contributors,
            direction,
            epsilon,
            out,
            &mut scratch,
            counts,
        );
        Ok(())
    }
}

/// [`merge_tensor`] with the element-wise stages run by `kernels`.
#[allow(clippy::too_many_arguments)]
pub fn merge_tensor_on<K: Kernels>(
    kernels: &K,
    receiver: &[f32],
    receiver_y: &[f32],
    receiver_election: ElectionParams,
    ancestor: &[f32],
    ancestor_y: &[f32],
    x_mean: &[f32],
    contributors: &[Contributor<'_>],
    is_bias: bool,
    epsilon: f32,
) -> Result<MergedTensor, K::Error> {
    let scores_of = |weight: &[f32], y: &[f32], params: ElectionParams| {
        let u = output_shift(y, ancestor_y);
        let mut scores = vec![0.0f32; weight.len()];
        if is_bias {
            kernels.score_vector(weight, &u, params.form, &mut scores)?;
        } else {
            kernels.score_matrix(weight, &u, x_mean, params.form, &mut scores)?;
        }
        let threshold = election_threshold(&scores, params.density);
        Ok((scores, threshold))
    };
    let (scores_a, threshold_a) = scores_of(receiver, receiver_y, receiver_election)?;
    let elected: Vec<(Vec<f32>, f32)> = contributors
        .iter()
        .map(|c| scores_of(c.weight, c.y_mean, c.election))
        .collect::<Result<_, K::Error>>()?;
    let blocks: Vec<ContributorBlock<'_>> = contributors
        .iter()
        .zip(&elected)
        .map(|(c, (scores, threshold))| ContributorBlock {
            weight: c.weight,
            election: Election {
                scores,
                threshold: *threshold,
            },
            lambda_proj: c.lambda_proj,
            lambda_ortho: c.lambda_ortho,
        })
        .collect();
    let direction = (!is_bias).then(|| (x_mean, reduce::sum_squares(x_mean)));
    let mut values = vec![0.0f32; receiver.len()];
    let mut counts = vec![MaskCounts::default(); contributors.len()];
    kernels.fuse_block(
        receiver,
        ancestor,
        Election {
            scores: &scores_a,
            threshold: threshold_a,
        },
        &blocks,
        direction,
        epsilon,
        &mut values,
        &mut counts,
    )?;
    Ok(MergedTensor { values, counts })
}

// ---------------------------------------------------------------------------
// Variants (docs/methods.md). The default `Variant` is SPEC §1 exactly, and
// `fuse_block_with` with it performs the same operations in the same order
// as `fuse_block`, so the reference stays bit-identical.
// ---------------------------------------------------------------------------

/// What the salience `|X ⊙ g'|` of the score multiplies (docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Salience {
    /// `X = W` (SPEC §1.2): the weight itself.
    #[default]
    Weight,
    /// `X = τ = W − W_C`: the update, so the election ranks what the
    /// fine-tune changed rather than weights that were large already in `C`.
    TaskVector,
}

/// How an entry elected by several models with opposite task-vector signs
/// is resolved (docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictRule {
    /// SPEC §1.2: the receiver wins; the contributor's entry is dropped.
    #[default]
    Drop,
    /// No conflict removal: every elected entry is kept.
    Keep,
    /// A vote weighted by score: `s = sign(Σ_j S_j·sign(τ_j))` over the
    /// models that elected the entry (a zero sum votes `+`); entries of
    /// the opposite sign are dropped. The receiver's entry is dropped too
    /// in the symmetric form; in the receiver form it is part of `W_A`.
    Score,
}

/// The SAFE-M variant: SPEC §1 when `Variant::default()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    /// Symmetric form: `W* = W_C + Σ_{j ∈ {A, B_1..B_m}} (λ_proj,j·P_j + λ_ortho,j·O_j)`,
    /// the receiver's task vector masked and decomposed like a contributor's.
    pub symmetric: bool,
    /// `λ_proj`, `λ_ortho` of the receiver in the symmetric form.
    pub receiver_lambda: (f32, f32),
    /// Conflict rule.
    pub conflict: ConflictRule,
    /// Salience of the score.
    pub salience: Salience,
    /// Per-row L1 rescale of what the mask keeps (see [`row_rescale`]).
    pub rescale: bool,
    /// Per-layer λ from the probe rows ([`activation_lambda`]), multiplying
    /// the λ of every member that gives its task vector.
    pub activation_lambda: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            symmetric: false,
            receiver_lambda: (1.0, 1.0),
            conflict: ConflictRule::Drop,
            salience: Salience::Weight,
            rescale: false,
            activation_lambda: false,
        }
    }
}

/// The per-layer scale of the task vectors from the stored per-example
/// outputs of a layer (docs/methods.md): with `Δ_k,n = y_k,n − y_C,n` the
/// shift of model `k`'s representation on probe example `n` (everything
/// upstream included), the merged representation is modelled as
/// `y_C,n + λ·S_n`, `S_n = Σ_k Δ_k,n`, and λ minimises
/// `Σ_n Σ_k r_k,n ‖λ·S_n − Δ_k,n‖²` with `r_k,n = ‖Δ_k,n‖² / Σ_j ‖Δ_j,n‖²`
/// (an example counts for the models that moved on it):
///
/// ```text
/// λ = Σ_n ⟨S_n, Σ_k r_k,n Δ_k,n⟩ / Σ_n ‖S_n‖²,   clamped to [0, 1]
/// ```
///
/// Shifts on disjoint examples give 1 (task arithmetic); identical shifts
/// give `1/m` (the average). No shift at all gives 1. `ancestor` and each
/// of `models` are row-major `[rows, width]`; sums in f64, in order.
pub fn activation_lambda(ancestor: &[f32], models: &[&[f32]], width: usize) -> f32 {
    assert!(models.iter().all(|m| m.len() == ancestor.len()));
    if width == 0 || models.is_empty() {
        return 1.0;
    }
    let (mut num, mut den) = (0f64, 0f64);
    let mut weights = vec![0f64; models.len()];
    for (n, c) in ancestor.chunks_exact(width).enumerate() {
        let row = n * width..(n + 1) * width;
        let mut total = 0f64;
        for (w, m) in weights.iter_mut().zip(models) {
            *w = m[row.clone()]
                .iter()
                .zip(c)
                .map(|(&y, &yc)| {
                    let d = (y - yc) as f64;
                    d * d
                })
                .sum();
            total += *w;
        }
        if total <= 0.0 {
            continue;
        }
        for (j, &yc) in c.iter().enumerate() {
            let (mut s, mut r) = (0f64, 0f64);
            for (w, m) in weights.iter().zip(models) {
                let d = (m[row.start + j] - yc) as f64;
                s += d;
                r += w / total * d;
            }
            num += s * r;
            den += s * s;
        }
    }
    if den <= 0.0 {
        return 1.0;
    }
    (num / den).clamp(0.0, 1.0) as f32
}

/// `out = w − c`: the task vector of a block (the salience of
/// [`Salience::TaskVector`]).
pub fn task_vector(weight: &[f32], ancestor: &[f32], out: &mut [f32]) {
    assert!(weight.len() == ancestor.len() && out.len() == weight.len());
    for ((o, &w), &c) in out.iter_mut().zip(weight).zip(ancestor) {
        *o = w - c;
    }
}

/// The per-row rescale of a masked task vector, as DARE restores L1 mass
/// (docs/methods.md): `s = min(‖τ[r]‖₁ / ‖τ_u[r]‖₁, cap)`, and `s = 1`
/// when either norm is below 1e-7 (nothing to restore, or nothing kept).
/// The cap (`1/k` in the engine) keeps a row that kept one small entry
/// from being blown up to the whole row's mass.
pub fn row_rescale(tau: &[f32], kept: &[f32], cap: f32) -> f32 {
    let full: f64 = tau.iter().map(|&t| t.abs() as f64).sum();
    let masked: f64 = kept.iter().map(|&t| t.abs() as f64).sum();
    if full < 1e-7 || masked < 1e-7 {
        return 1.0;
    }
    ((full / masked) as f32).min(cap)
}

/// The sign elected by [`ConflictRule::Score`] at one entry from
/// `(elected, score, τ)` of every model: `Σ_j S_j·sign(τ_j)` over elected
/// models with `τ_j ≠ 0`, summed in model order; `≥ 0` votes `+`.
pub fn score_vote(models: impl IntoIterator<Item = (bool, f32, f32)>) -> bool {
    let mut sum = 0.0f32;
    for (elected, score, tau) in models {
        if elected && tau != 0.0 {
            sum += if tau > 0.0 { score } else { -score };
        }
    }
    sum >= 0.0
}

/// A model that gives its task vector in [`fuse_block_with`].
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// `W` of the block.
    pub weight: &'a [f32],
    /// Its election over the block.
    pub election: Election<'a>,
    /// `λ_proj`.
    pub lambda_proj: f32,
    /// `λ_ortho`.
    pub lambda_ortho: f32,
    /// Cap of the row rescale (`1/k`; unused without rescale).
    pub rescale_cap: f32,
}

/// Whether model `j`'s elected entry `i` survives the conflict rule
/// (`members[0]` is the receiver; in the receiver form `j ≥ 1`). `taus`
/// is scratch for every model's task-vector entry.
fn survives(
    rule: ConflictRule,
    j: usize,
    i: usize,
    ancestor: f32,
    members: &[Member<'_>],
    taus: &mut [f32],
) -> bool {
    let elected = |m: &Member<'_>| is_elected(m.election.scores[i], m.election.threshold);
    let tau_j = members[j].weight[i] - ancestor;
    match rule {
        ConflictRule::Keep => true,
        ConflictRule::Drop => {
            let receiver = &members[0];
            j == 0
                || !is_conflict(
                    elected(receiver),
                    true,
                    receiver.weight[i] - ancestor,
                    tau_j,
                )
        }
        ConflictRule::Score => {
            for (t, model) in taus.iter_mut().zip(members) {
                *t = model.weight[i] - ancestor;
            }
            let plus = score_vote(
                members
                    .iter()
                    .zip(taus.iter())
                    .map(|(m, &t)| (elected(m), m.election.scores[i], t)),
            );
            !(plus && tau_j < 0.0 || !plus && tau_j > 0.0)
        }
    }
}

/// Stages 2 and 3 with a [`Variant`] (docs/methods.md) on a block of rows.
///
/// `members[0]` is the receiver (`W_A` and its election; its λ are used
/// only in the symmetric form, where the engine passes the variant's
/// `receiver_lambda`), `members[1..]` the contributors. `out`
/// receives `W_A + Σ_k (λ_proj·P_k + λ_ortho·O_k)` (receiver form) or
/// `W_C + Σ_j …` over all members (symmetric form), summed member by
/// member in order. `counts` has one entry per member (`counts[0]`: the
/// receiver's own mask, filled in the symmetric form only).
/// `direction` is as in [`fuse_block`]; `scratch` holds a few rows.
#[allow(clippy::too_many_arguments)]
pub fn fuse_block_with(
    ancestor: &[f32],
    members: &[Member<'_>],
    direction: Option<(&[f32], f64)>,
    epsilon: f32,
    variant: &Variant,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    counts: &mut [MaskCounts],
) {
    let n = ancestor.len();
    assert!(!members.is_empty(), "fuse_block_with: no receiver");
    assert!(members
        .iter()
        .all(|m| m.weight.len() == n && m.election.scores.len() == n));
    assert!(out.len() == n && counts.len() == members.len());
    let cols = match direction {
        Some((d, _)) => d.len(),
        None => n,
    };
    let receiver = &members[0];
    out.copy_from_slice(if variant.symmetric {
        ancestor
    } else {
        receiver.weight
    });
    if cols == 0 || n == 0 {
        return;
    }
    assert_eq!(n % cols, 0, "fuse_block_with: block is not whole rows");
    let m = members.len();
    // Row of the masked task vector, row of the full one, and every model's
    // task-vector entry at one index.
    scratch.resize(2 * cols + m, 0.0);
    let (tau_row, rest) = scratch.split_at_mut(cols);
    let (full_row, taus) = rest.split_at_mut(cols);
    let receiver_elected = receiver
        .election
        .scores
        .iter()
        .filter(|&&s| is_elected(s, receiver.election.threshold))
        .count() as u64;
    let first = usize::from(!variant.symmetric);
    for j in first..m {
        let member = &members[j];
        let count = &mut counts[j];
        count.receiver_elected += receiver_elected;
        for row_start in (0..n).step_by(cols) {
            let row = row_start..row_start + cols;
            mask_row(
                ancestor,
                members,
                j,
                row.clone(),
                variant,
                tau_row,
                full_row,
                taus,
                count,
            );
            let row_direction =
                direction.map(|(d, dd)| (d, projection_coefficient(tau_row, d, dd, epsilon)));
            add_decoupled(
                &mut out[row],
                tau_row,
                row_direction,
                member.lambda_proj,
                member.lambda_ortho,
            );
        }
    }
}

/// Member `j`'s masked task vector on the entries `row` of one row, into
/// `tau_row`: its task vector `τ_j = W_j − W_C` where it is elected and
/// survives the conflict rule, else 0, then the row rescale when the
/// variant asks; `full_row` receives the unmasked `τ_j`. Counts go to `count`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn mask_row(
    ancestor: &[f32],
    members: &[Member<'_>],
    j: usize,
    row: core::ops::Range<usize>,
    variant: &Variant,
    tau_row: &mut [f32],
    full_row: &mut [f32],
    taus: &mut [f32],
    count: &mut MaskCounts,
) {
    let member = &members[j];
    for (c, i) in row.enumerate() {
        let tau = member.weight[i] - ancestor[i];
        let elected = is_elected(member.election.scores[i], member.election.threshold);
        let keep = elected && survives(variant.conflict, j, i, ancestor[i], members, taus);
        count.elected += elected as u64;
        count.conflicts += (elected && !keep) as u64;
        count.kept += keep as u64;
        full_row[c] = tau;
        tau_row[c] = if keep { tau } else { 0.0 };
    }
    if variant.rescale {
        let s = row_rescale(full_row, tau_row, member.rescale_cap);
        if s != 1.0 {
            tau_row.iter_mut().for_each(|t| *t *= s);
        }
    }
}

/// Stage 2 alone with a [`Variant`] on whole rows of width `cols`: each
/// member's masked task vector (what [`fuse_block_with`] decomposes and
/// adds), for the Gram re-projection (`reproject: gram`, docs/methods.md).
/// `taus[j]` receives member `j`'s (the receiver's only in the symmetric
/// form; in the receiver form `taus[0]` is left empty, its task vector
/// being part of `W_A`). `counts` as in [`fuse_block_with`].
pub fn masked_task_vectors(
    ancestor: &[f32],
    members: &[Member<'_>],
    cols: usize,
    variant: &Variant,
    taus: &mut [Vec<f32>],
    counts: &mut [MaskCounts],
) {
    let n = ancestor.len();
    let m = members.len();
    assert!(m > 0 && taus.len() == m && counts.len() == m);
    assert!(members
        .iter()
        .all(|mb| mb.weight.len() == n && mb.election.scores.len() == n));
    assert!(
        cols > 0 && n % cols == 0,
        "masked_task_vectors: not whole rows"
    );
    let receiver = &members[0];
    let receiver_elected = receiver
        .election
        .scores
        .iter()
        .filter(|&&s| is_elected(s, receiver.election.threshold))
        .count() as u64;
    let mut full_row = vec![0.0f32; cols];
    let mut entry_taus = vec![0.0f32; m];
    taus[0].clear();
    for j in usize::from(!variant.symmetric)..m {
        counts[j].receiver_elected += receiver_elected;
        let mut out = core::mem::take(&mut taus[j]);
        out.clear();
        out.resize(n, 0.0);
        for (r, tau_row) in out.chunks_mut(cols).enumerate() {
            let row = r * cols..(r + 1) * cols;
            mask_row(
                ancestor,
                members,
                j,
                row,
                variant,
                tau_row,
                &mut full_row,
                &mut entry_taus,
                &mut counts[j],
            );
        }
        taus[j] = out;
    }
}

/// SAFE-M with a [`Variant`] on one whole in-memory tensor: the reference
/// for the engine's variants, as [`merge_tensor`] is for SPEC §1.
/// `receiver_lambda` of the variant is used in the symmetric form; each
/// model's rescale cap is `1/k` of its own density. Counts: one per
/// contributor, then (symmetric form) the receiver's own mask last.
#[allow(clippy::too_many_arguments)]
pub fn merge_tensor_with(
    receiver: &[f32],
    receiver_y: &[f32],
    receiver_election: ElectionParams,
    ancestor: &[f32],
    ancestor_y: &[f32],
    x_mean: &[f32],
    contributors: &[Contributor<'_>],
    is_bias: bool,
    epsilon: f32,
    variant: &Variant,
) -> MergedTensor {
    let scores_of = |weight: &[f32], y: &[f32], params: ElectionParams| {
        let u = output_shift(y, ancestor_y);
        let salient: Vec<f32> = match variant.salience {
            Salience::Weight => weight.to_vec(),
            Salience::TaskVector => {
                let mut t = vec![0.0f32; weight.len()];
                task_vector(weight, ancestor, &mut t);
                t
            }
        };
        let mut scores = vec![0.0f32; weight.len()];
        if is_bias {
            score_vector(&salient, &u, params.form, &mut scores);
        } else {
            score_matrix(&salient, &u, x_mean, params.form, &mut scores);
        }
        let threshold = election_threshold(&scores, params.density);
        (scores, threshold)
    };
    let mut elected = vec![scores_of(receiver, receiver_y, receiver_election)];
    elected.extend(
        contributors
            .iter()
            .map(|c| scores_of(c.weight, c.y_mean, c.election)),
    );
    let weights = core::iter::once(receiver).chain(contributors.iter().map(|c| c.weight));
    let params = core::iter::once((receiver_election.density, variant.receiver_lambda)).chain(
        contributors
            .iter()
            .map(|c| (c.election.density, (c.lambda_proj, c.lambda_ortho))),
    );
    let members: Vec<Member<'_>> = weights
        .zip(params)
        .zip(&elected)
        .map(
            |((weight, (density, (lp, lo))), (scores, threshold))| Member {
                weight,
                election: Election {
                    scores,
                    threshold: *threshold,
                },
                lambda_proj: lp,
                lambda_ortho: lo,
                rescale_cap: (1.0 / density) as f32,
            },
        )
        .collect();
    let direction = (!is_bias).then(|| (x_mean, reduce::sum_squares(x_mean)));
    let mut values = vec![0.0f32; receiver.len()];
    let mut counts = vec![MaskCounts::default(); members.len()];
    let mut scratch = Vec::new();
    fuse_block_with(
        ancestor,
        &members,
        direction,
        epsilon,
        variant,
        &mut values,
        &mut scratch,
        &mut counts,
    );
    let receiver_counts = counts.remove(0);
    if variant.symmetric {
        counts.push(receiver_counts);
    }
    MergedTensor { values, counts }
}
