//! The slice-level SAFE-M kernels (SPEC §1.2–1.5) on the caller's f32
//! buffers. Each wraps one function of `flatmerge::safe_m` or
//! `flatmerge::select`; none allocates more than the library function it
//! calls, and all are thread-safe (they touch only their arguments).

use crate::args::{density, disjoint, finite, positive, product, threshold, Buffer, Region};
use crate::status::{call, flatmerge_status, Failure, Outcome};
use engine::reduce;
use engine::safe_m::{
    self, ContributorBlock, Election, ElectionParams, MaskCounts, MergedTensor, ScoreForm,
};
use engine::select::{self, is_elected};

/// Score forms, for the `kind` field of `flatmerge_score_form` (SPEC §1.2).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum flatmerge_score_kind {
    /// `S = |W ⊙ g'| / (1 + α·g'²)`; `param` is `α ≥ 0` (default 1).
    Sas = 0,
    /// `S = |W ⊙ g'| / (g'² + ε)`; `param` is `ε > 0` (default 1e-8).
    Ratio = 1,
}

/// A score form: a `flatmerge_score_kind` and its parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct flatmerge_score_form {
    /// A `flatmerge_score_kind`.
    pub kind: u32,
    /// `α` for `SAS`, `ε` for `RATIO`.
    pub param: f32,
}

/// Election parameters of one model (SPEC §1.2).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct flatmerge_election {
    /// Density `k ∈ (0, 1]` (default 0.2).
    pub density: f64,
    /// Score form.
    pub form: flatmerge_score_form,
}

/// Counts of one contributor's mask (for a merge report).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct flatmerge_mask_counts {
    /// `|M_A|`: the receiver's elected parameters.
    pub receiver_elected: u64,
    /// `|M_B|`: the contributor's elected parameters.
    pub elected: u64,
    /// `|K|`: elected by both with opposite task-vector signs.
    pub conflicts: u64,
    /// `|M'_B| = |M_B| − |K|`: what the contributor gives.
    pub kept: u64,
}

impl From<MaskCounts> for flatmerge_mask_counts {
    fn from(c: MaskCounts) -> Self {
        flatmerge_mask_counts {
            receiver_elected: c.receiver_elected,
            elected: c.elected,
            conflicts: c.conflicts,
            kept: c.kept,
        }
    }
}

/// One contributor's block for `flatmerge_fuse_block`: borrowed buffers of
/// the block's length.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct flatmerge_block_contributor {
    /// `W_B` of the block.
    pub weight: *const f32,
    /// Elements of `weight`.
    pub weight_len: usize,
    /// `B`'s scores over the block.
    pub scores: *const f32,
    /// Elements of `scores`.
    pub scores_len: usize,
    /// `B`'s threshold over its whole tensor (`flatmerge_election_threshold`).
    pub threshold: f32,
    /// `λ_proj` (default 1).
    pub lambda_proj: f32,
    /// `λ_ortho` (default 0.5).
    pub lambda_ortho: f32,
}

/// One contributor for `flatmerge_merge_tensor`: borrowed buffers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct flatmerge_tensor_contributor {
    /// `W_B` (or `b_B`), the receiver's shape.
    pub weight: *const f32,
    /// Elements of `weight`.
    pub weight_len: usize,
    /// `ȳ_B` of the layer, one value per row.
    pub y_mean: *const f32,
    /// Elements of `y_mean`.
    pub y_mean_len: usize,
    /// `B`'s election.
    pub election: flatmerge_election,
    /// `λ_proj` (default 1).
    pub lambda_proj: f32,
    /// `λ_ortho` (default 0.5).
    pub lambda_ortho: f32,
}

fn score_form(form: flatmerge_score_form, name: &str) -> Outcome<ScoreForm> {
    match form.kind {
        k if k == flatmerge_score_kind::Sas as u32 => {
            if !(form.param.is_finite() && form.param >= 0.0) {
                return Err(Failure::invalid(format!(
                    "`{name}.param` (α) is {}; expected a finite number ≥ 0",
                    form.param
                )));
            }
            Ok(ScoreForm::Sas { alpha: form.param })
        }
        k if k == flatmerge_score_kind::Ratio as u32 => Ok(ScoreForm::Ratio {
            epsilon: positive(form.param, &format!("{name}.param"))?,
        }),
        other => Err(Failure::invalid(format!(
            "`{name}.kind` is {other}, not a flatmerge_score_kind (0 or 1)"
        ))),
    }
}

fn election(e: flatmerge_election, name: &str) -> Outcome<ElectionParams> {
    Ok(ElectionParams {
        density: density(e.density, &format!("{name}.density"))?,
        form: score_form(e.form, &format!("{name}.form"))?,
    })
}

/// Writes `counts` into the optional `out` (one per contributor).
///
/// # Safety
/// `out` must have passed [`disjoint`] and be valid for writes.
unsafe fn write_counts(out: Option<Buffer<flatmerge_mask_counts>>, counts: &[MaskCounts]) {
    if let Some(out) = out {
        // SAFETY: forwarded.
        let out = unsafe { out.slice_mut() };
        for (o, c) in out.iter_mut().zip(counts) {
            *o = (*c).into();
        }
    }
}

/// SAFE scores of a 2-D weight block (SPEC §1.2) with the rank-one
/// pseudo-gradient `g'[r][j] = u[r]·v[j]`, never materialised:
/// `out[r·v_len + j] = S(weight[r·v_len + j], u[r]·v[j])`.
///
/// `weight` (`u_len × v_len` elements, row-major), `u` (`ȳ_model − ȳ_C`,
/// one per row) and `v` (`x̄_A`, one per column) are borrowed; `out`
/// (`weight_len` elements) is written only on success and must not overlap
/// the inputs. Thread-safe.
///
/// # Safety
/// Each pointer must be valid for its length (reads; writes for `out`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_score_matrix(
    weight: *const f32,
    weight_len: usize,
    u: *const f32,
    u_len: usize,
    v: *const f32,
    v_len: usize,
    form: flatmerge_score_form,
    out: *mut f32,
    out_len: usize,
) -> flatmerge_status {
    call(|| {
        let weight = Buffer::input(weight, weight_len, "weight")?;
        let u = Buffer::input(u, u_len, "u")?;
        let v = Buffer::input(v, v_len, "v")?;
        let out = Buffer::output(out, out_len, "out")?;
        weight.expect_len(product(u_len, v_len, "u_len × v_len")?, "u_len × v_len")?;
        out.expect_len(weight_len, "weight_len")?;
        let form = score_form(form, "form")?;
        disjoint(
            &[(&out).into()],
            &[(&weight).into(), (&u).into(), (&v).into()],
        )?;
        // SAFETY: checked above; validity by the caller's contract.
        unsafe {
            safe_m::score_matrix(weight.slice(), u.slice(), v.slice(), form, out.slice_mut());
        }
        Ok(())
    })
}

/// SAFE scores of a bias (SPEC §1.2), whose pseudo-gradient is `u` itself:
/// `out[i] = S(bias[i], u[i])`.
///
/// `bias` and `u` are borrowed, of equal lengths; `out` (`bias_len`
/// elements) is written only on success and must not overlap the inputs.
/// Thread-safe.
///
/// # Safety
/// Each pointer must be valid for its length (reads; writes for `out`).
#[no_mangle]
pub unsafe extern "C" fn flatmerge_score_vector(
    bias: *const f32,
    bias_len: usize,
    u: *const f32,
    u_len: usize,
    form: flatmerge_score_form,
    out: *mut f32,
    out_len: usize,
) -> flatmerge_status {
    call(|| {
        let bias = Buffer::input(bias, bias_len, "bias")?;
        let u = Buffer::input(u, u_len, "u")?;
        let out = Buffer::output(out, out_len, "out")?;
        u.expect_len(bias_len, "bias_len")?;
        out.expect_len(bias_len, "bias_len")?;
        let form = score_form(form, "form")?;
        disjoint(&[(&out).into()], &[(&bias).into(), (&u).into()])?;
        // SAFETY: checked above; validity by the caller's contract.
        unsafe { safe_m::score_vector(bias.slice(), u.slice(), form, out.slice_mut()) };
        Ok(())
    })
}

/// The election threshold of a whole tensor's scores at density `k`
/// (SPEC §1.2): the exact `⌈k·n − 10⁻⁶⌉`-th largest score (scores that are
/// NaN or not positive count as 0). A parameter is elected when
/// `S ≥ t ∧ S > 0`.
///
/// `scores` is borrowed; `*threshold_out` is written only on success.
/// Thread-safe.
///
/// # Safety
/// `scores` must be valid for `scores_len` reads, `threshold_out` for a write.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_election_threshold(
    scores: *const f32,
    scores_len: usize,
    density: f64,
    threshold_out: *mut f32,
) -> flatmerge_status {
    call(|| {
        let scores = Buffer::input(scores, scores_len, "scores")?;
        let out = Buffer::output(threshold_out, 1, "threshold_out")?;
        let density = crate::args::density(density, "density")?;
        disjoint(&[(&out).into()], &[(&scores).into()])?;
        // SAFETY: checked above; validity by the caller's contract.
        unsafe {
            let t = select::election_threshold(scores.slice(), density);
            out.slice_mut()[0] = t;
        }
        Ok(())
    })
}

/// The conflict-free mask of a contributor (SPEC §1.2), as bytes 0/1:
/// `mask[i] = M_B[i] ∧ ¬K[i]` with `M = (S ≥ t) ∧ (S > 0)` and
/// `K = M_A ∧ M_B ∧ (τ_A·τ_B < 0)`, where `τ_A = W_A − W_C` and
/// `τ_B = W_B − W_C` are the task vectors.
///
/// All inputs are borrowed and of equal length; `mask` (same length) is
/// written only on success and must not overlap the inputs. The counts
/// for the block go to `*counts` when it is not NULL. Thread-safe.
///
/// # Safety
/// Each pointer must be valid for its length (reads; writes for `mask`
/// and a non-NULL `counts`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_conflict_free_mask(
    receiver_scores: *const f32,
    receiver_scores_len: usize,
    receiver_threshold: f32,
    contributor_scores: *const f32,
    contributor_scores_len: usize,
    contributor_threshold: f32,
    receiver_tau: *const f32,
    receiver_tau_len: usize,
    contributor_tau: *const f32,
    contributor_tau_len: usize,
    mask: *mut u8,
    mask_len: usize,
    counts: *mut flatmerge_mask_counts,
) -> flatmerge_status {
    call(|| {
        let scores_a = Buffer::input(receiver_scores, receiver_scores_len, "receiver_scores")?;
        let scores_b = Buffer::input(
            contributor_scores,
            contributor_scores_len,
            "contributor_scores",
        )?;
        let tau_a = Buffer::input(receiver_tau, receiver_tau_len, "receiver_tau")?;
        let tau_b = Buffer::input(contributor_tau, contributor_tau_len, "contributor_tau")?;
        let mask = Buffer::output(mask, mask_len, "mask")?;
        let counts = Buffer::optional_output(counts, usize::from(!counts.is_null()), "counts")?;
        let n = scores_a.len();
        for b in [&scores_b, &tau_a, &tau_b] {
            b.expect_len(n, "receiver_scores_len")?;
        }
        mask.expect_len(n, "receiver_scores_len")?;
        let t_a = threshold(receiver_threshold, "receiver_threshold")?;
        let t_b = threshold(contributor_threshold, "contributor_threshold")?;
        let mut outputs: Vec<Region> = vec![(&mask).into()];
        outputs.extend(counts.as_ref().map(Region::from));
        disjoint(
            &outputs,
            &[
                (&scores_a).into(),
                (&scores_b).into(),
                (&tau_a).into(),
                (&tau_b).into(),
            ],
        )?;
        // SAFETY: checked above; validity by the caller's contract.
        let (s_a, s_b, tau_a, tau_b, mask) = unsafe {
            (
                scores_a.slice(),
                scores_b.slice(),
                tau_a.slice(),
                tau_b.slice(),
                mask.slice_mut(),
            )
        };
        let mut c = MaskCounts::default();
        for i in 0..n {
            let elected_a = is_elected(s_a[i], t_a);
            let elected_b = is_elected(s_b[i], t_b);
            let conflict = safe_m::is_conflict(elected_a, elected_b, tau_a[i], tau_b[i]);
            let keep = elected_b && !conflict;
            mask[i] = u8::from(keep);
            c.receiver_elected += u64::from(elected_a);
            c.elected += u64::from(elected_b);
            c.conflicts += u64::from(conflict);
            c.kept += u64::from(keep);
        }
        // SAFETY: checked above.
        unsafe { write_counts(counts, &[c]) };
        Ok(())
    })
}

/// The decoupled projection of rows along `d` (SPEC §1.3): for each row
/// `r` of `tau` (rows of `direction_len` elements),
/// `P[r] = (⟨τ[r], d⟩ / (⟨d, d⟩ + ε))·d` and `O[r] = τ[r] − P[r]`.
///
/// `tau` (a whole number of rows) and `direction` are borrowed;
/// `parallel` and `orthogonal` (`tau_len` elements each) are written only
/// on success and must not overlap each other or the inputs. `epsilon > 0`
/// (SPEC default 1e-8). Thread-safe.
///
/// # Safety
/// Each pointer must be valid for its length (reads; writes for outputs).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_project_rows(
    tau: *const f32,
    tau_len: usize,
    direction: *const f32,
    direction_len: usize,
    epsilon: f32,
    parallel: *mut f32,
    parallel_len: usize,
    orthogonal: *mut f32,
    orthogonal_len: usize,
) -> flatmerge_status {
    call(|| {
        let tau = Buffer::input(tau, tau_len, "tau")?;
        let d = Buffer::input(direction, direction_len, "direction")?;
        let parallel = Buffer::output(parallel, parallel_len, "parallel")?;
        let orthogonal = Buffer::output(orthogonal, orthogonal_len, "orthogonal")?;
        if tau_len % direction_len != 0 {
            return Err(Failure::invalid(format!(
                "`tau_len` ({tau_len}) is not a whole number of rows of `direction_len` ({direction_len})"
            )));
        }
        parallel.expect_len(tau_len, "tau_len")?;
        orthogonal.expect_len(tau_len, "tau_len")?;
        let epsilon = positive(epsilon, "epsilon")?;
        disjoint(
            &[(&parallel).into(), (&orthogonal).into()],
            &[(&tau).into(), (&d).into()],
        )?;
        // SAFETY: checked above; validity by the caller's contract.
        let (tau, d, p, o) = unsafe {
            (
                tau.slice(),
                d.slice(),
                parallel.slice_mut(),
                orthogonal.slice_mut(),
            )
        };
        let dd = reduce::sum_squares(d);
        for ((row, p), o) in tau
            .chunks_exact(d.len())
            .zip(p.chunks_exact_mut(d.len()))
            .zip(o.chunks_exact_mut(d.len()))
        {
            let c = safe_m::projection_coefficient(row, d, dd, epsilon);
            safe_m::split_row(row, d, c, p, o);
        }
        Ok(())
    })
}

/// Stages 2 and 3 of SPEC §1.2–1.5 on a block of whole rows: the
/// conflict-free masks, the masked task vectors, their decomposition along
/// `direction` and the fusion
/// `W* = W_A + Σ_k (λ_proj,k·P_k + λ_ortho,k·O_k)`, summed contributor by
/// contributor in order.
///
/// `receiver` (`W_A`), `ancestor` (`W_C`), `receiver_scores` and each
/// contributor's `weight` and `scores` are borrowed, all of the block's
/// length. Thresholds are those of the whole tensors
/// (`flatmerge_election_threshold`). `direction` is `x̄_A` (rows of
/// `direction_len` elements) for a weight, or NULL with length 0 for a
/// bias (one row: `b* = b_A + Σ_k λ_proj,k·τ_u,k`). `epsilon > 0`. `out`
/// (the block's length) and `counts` (NULL with length 0, or one per
/// contributor; the block's counts, not added to what was there) are
/// written only on success and must not overlap the inputs. Thread-safe.
///
/// # Safety
/// Each pointer, in the arguments and in the contributor structs, must be
/// valid for its length (reads; writes for `out` and `counts`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_fuse_block(
    receiver: *const f32,
    receiver_len: usize,
    ancestor: *const f32,
    ancestor_len: usize,
    receiver_scores: *const f32,
    receiver_scores_len: usize,
    receiver_threshold: f32,
    contributors: *const flatmerge_block_contributor,
    contributors_len: usize,
    direction: *const f32,
    direction_len: usize,
    epsilon: f32,
    out: *mut f32,
    out_len: usize,
    counts: *mut flatmerge_mask_counts,
    counts_len: usize,
) -> flatmerge_status {
    call(|| {
        let receiver = Buffer::input(receiver, receiver_len, "receiver")?;
        let ancestor = Buffer::input(ancestor, ancestor_len, "ancestor")?;
        let scores = Buffer::input(receiver_scores, receiver_scores_len, "receiver_scores")?;
        let list = Buffer::input(contributors, contributors_len, "contributors")?;
        let direction = Buffer::optional_input(direction, direction_len, "direction")?;
        let out = Buffer::output(out, out_len, "out")?;
        let counts = Buffer::optional_output(counts, counts_len, "counts")?;
        let n = receiver_len;
        ancestor.expect_len(n, "receiver_len")?;
        scores.expect_len(n, "receiver_len")?;
        out.expect_len(n, "receiver_len")?;
        if let Some(c) = &counts {
            c.expect_len(contributors_len, "contributors_len")?;
        }
        if let Some(d) = &direction {
            if n % d.len() != 0 {
                return Err(Failure::invalid(format!(
                    "`receiver_len` ({n}) is not a whole number of rows of `direction_len` ({})",
                    d.len()
                )));
            }
        }
        let t_a = threshold(receiver_threshold, "receiver_threshold")?;
        let epsilon = positive(epsilon, "epsilon")?;
        let mut inputs: Vec<Region> = vec![
            (&receiver).into(),
            (&ancestor).into(),
            (&scores).into(),
            (&list).into(),
        ];
        inputs.extend(direction.as_ref().map(Region::from));
        // SAFETY: checked above; validity by the caller's contract.
        let list = unsafe { list.slice() };
        let mut blocks = Vec::with_capacity(list.len());
        for c in list {
            let weight = Buffer::input(c.weight, c.weight_len, "contributors[].weight")?;
            let b_scores = Buffer::input(c.scores, c.scores_len, "contributors[].scores")?;
            weight.expect_len(n, "receiver_len")?;
            b_scores.expect_len(n, "receiver_len")?;
            inputs.push((&weight).into());
            inputs.push((&b_scores).into());
            blocks.push(ContributorBlock {
                // SAFETY: checked above; validity by the caller's contract.
                weight: unsafe { weight.slice() },
                election: Election {
                    // SAFETY: as above.
                    scores: unsafe { b_scores.slice() },
                    threshold: threshold(c.threshold, "contributors[].threshold")?,
                },
                lambda_proj: finite(c.lambda_proj, "contributors[].lambda_proj")?,
                lambda_ortho: finite(c.lambda_ortho, "contributors[].lambda_ortho")?,
            });
        }
        let mut outputs: Vec<Region> = vec![(&out).into()];
        outputs.extend(counts.as_ref().map(Region::from));
        disjoint(&outputs, &inputs)?;
        // SAFETY: checked above; validity by the caller's contract.
        let (receiver, ancestor, scores, direction) = unsafe {
            (
                receiver.slice(),
                ancestor.slice(),
                scores.slice(),
                direction.map(|d| d.slice()),
            )
        };
        let direction = direction.map(|d| (d, reduce::sum_squares(d)));
        let mut mask_counts = vec![MaskCounts::default(); blocks.len()];
        let mut scratch = Vec::new();
        safe_m::fuse_block(
            receiver,
            ancestor,
            Election {
                scores,
                threshold: t_a,
            },
            &blocks,
            direction,
            epsilon,
            // SAFETY: checked above.
            unsafe { out.slice_mut() },
            &mut scratch,
            &mut mask_counts,
        );
        // SAFETY: checked above.
        unsafe { write_counts(counts, &mask_counts) };
        Ok(())
    })
}

/// SAFE-M on one whole in-memory tensor (SPEC §1.2–1.5): scores,
/// elections, conflict-free masks, projection and fusion, as
/// `flatmerge::safe_m::merge_tensor` — the reference the streaming engine
/// is tested against.
///
/// For a weight (`is_bias` false), `receiver`, `ancestor` and each
/// contributor's `weight` have `receiver_y_len × x_mean_len` elements
/// (row-major `[out, in]`); for a bias (`is_bias` true) `receiver_y_len`
/// elements, and `x_mean` may be NULL with length 0. `receiver_y`,
/// `ancestor_y` and each contributor's `y_mean` are mean outputs
/// (`receiver_y_len` elements); `x_mean` is the receiver's mean input
/// `x̄_A`. All inputs are borrowed. `out` (the receiver's length) and
/// `counts` (NULL with length 0, or one per contributor) are written only
/// on success and must not overlap the inputs. Thread-safe.
///
/// # Safety
/// Each pointer, in the arguments and in the contributor structs, must be
/// valid for its length (reads; writes for `out` and `counts`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_merge_tensor(
    receiver: *const f32,
    receiver_len: usize,
    receiver_y: *const f32,
    receiver_y_len: usize,
    receiver_election: flatmerge_election,
    ancestor: *const f32,
    ancestor_len: usize,
    ancestor_y: *const f32,
    ancestor_y_len: usize,
    x_mean: *const f32,
    x_mean_len: usize,
    contributors: *const flatmerge_tensor_contributor,
    contributors_len: usize,
    is_bias: bool,
    epsilon: f32,
    out: *mut f32,
    out_len: usize,
    counts: *mut flatmerge_mask_counts,
    counts_len: usize,
) -> flatmerge_status {
    call(|| {
        // SAFETY: forwarded; the caller's contract.
        unsafe {
            checked_merge_tensor(
                receiver,
                receiver_len,
                receiver_y,
                receiver_y_len,
                receiver_election,
                ancestor,
                ancestor_len,
                ancestor_y,
                ancestor_y_len,
                x_mean,
                x_mean_len,
                contributors,
                contributors_len,
                is_bias,
                epsilon,
                out,
                out_len,
                counts,
                counts_len,
                |t| {
                    Ok(safe_m::merge_tensor(
                        t.receiver,
                        t.receiver_y,
                        t.receiver_election,
                        t.ancestor,
                        t.ancestor_y,
                        t.x_mean,
                        t.contributors,
                        t.is_bias,
                        t.epsilon,
                    ))
                },
            )
        }
    })
}

/// The checked arguments of `merge_tensor`, as `flatmerge::safe_m::merge_tensor` takes them.
pub(crate) struct TensorMerge<'a> {
    pub receiver: &'a [f32],
    pub receiver_y: &'a [f32],
    pub receiver_election: ElectionParams,
    pub ancestor: &'a [f32],
    pub ancestor_y: &'a [f32],
    pub x_mean: &'a [f32],
    pub contributors: &'a [safe_m::Contributor<'a>],
    pub is_bias: bool,
    pub epsilon: f32,
}

/// Checks the arguments of `flatmerge_merge_tensor` (and of its CUDA
/// variant), runs `merge` on them and writes its result: the one place
/// their validation lives.
///
/// # Safety
/// As `flatmerge_merge_tensor`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn checked_merge_tensor(
    receiver: *const f32,
    receiver_len: usize,
    receiver_y: *const f32,
    receiver_y_len: usize,
    receiver_election: flatmerge_election,
    ancestor: *const f32,
    ancestor_len: usize,
    ancestor_y: *const f32,
    ancestor_y_len: usize,
    x_mean: *const f32,
    x_mean_len: usize,
    contributors: *const flatmerge_tensor_contributor,
    contributors_len: usize,
    is_bias: bool,
    epsilon: f32,
    out: *mut f32,
    out_len: usize,
    counts: *mut flatmerge_mask_counts,
    counts_len: usize,
    merge: impl FnOnce(&TensorMerge<'_>) -> Outcome<MergedTensor>,
) -> Outcome {
    let receiver = Buffer::input(receiver, receiver_len, "receiver")?;
    let receiver_y = Buffer::input(receiver_y, receiver_y_len, "receiver_y")?;
    let ancestor = Buffer::input(ancestor, ancestor_len, "ancestor")?;
    let ancestor_y = Buffer::input(ancestor_y, ancestor_y_len, "ancestor_y")?;
    let x_mean = match is_bias {
        true => Buffer::optional_input(x_mean, x_mean_len, "x_mean")?,
        false => Some(Buffer::input(x_mean, x_mean_len, "x_mean")?),
    };
    let list = Buffer::input(contributors, contributors_len, "contributors")?;
    let out = Buffer::output(out, out_len, "out")?;
    let counts = Buffer::optional_output(counts, counts_len, "counts")?;
    let rows = receiver_y_len;
    let n = match (&x_mean, is_bias) {
        (Some(x), false) => product(rows, x.len(), "receiver_y_len × x_mean_len")?,
        _ => rows,
    };
    let shape = if is_bias {
        "receiver_y_len, a bias"
    } else {
        "receiver_y_len × x_mean_len"
    };
    receiver.expect_len(n, shape)?;
    ancestor.expect_len(n, shape)?;
    ancestor_y.expect_len(rows, "receiver_y_len")?;
    out.expect_len(n, shape)?;
    if let Some(c) = &counts {
        c.expect_len(contributors_len, "contributors_len")?;
    }
    let receiver_election = election(receiver_election, "receiver_election")?;
    let epsilon = positive(epsilon, "epsilon")?;
    let mut inputs: Vec<Region> = vec![
        (&receiver).into(),
        (&receiver_y).into(),
        (&ancestor).into(),
        (&ancestor_y).into(),
        (&list).into(),
    ];
    inputs.extend(x_mean.as_ref().map(Region::from));
    // SAFETY: checked above; validity by the caller's contract.
    let list = unsafe { list.slice() };
    let mut models = Vec::with_capacity(list.len());
    for c in list {
        let weight = Buffer::input(c.weight, c.weight_len, "contributors[].weight")?;
        let y = Buffer::input(c.y_mean, c.y_mean_len, "contributors[].y_mean")?;
        weight.expect_len(n, shape)?;
        y.expect_len(rows, "receiver_y_len")?;
        inputs.push((&weight).into());
        inputs.push((&y).into());
        models.push(safe_m::Contributor {
            // SAFETY: checked above; validity by the caller's contract.
            weight: unsafe { weight.slice() },
            // SAFETY: as above.
            y_mean: unsafe { y.slice() },
            election: election(c.election, "contributors[].election")?,
            lambda_proj: finite(c.lambda_proj, "contributors[].lambda_proj")?,
            lambda_ortho: finite(c.lambda_ortho, "contributors[].lambda_ortho")?,
        });
    }
    let mut outputs: Vec<Region> = vec![(&out).into()];
    outputs.extend(counts.as_ref().map(Region::from));
    disjoint(&outputs, &inputs)?;
    // SAFETY: checked above; validity by the caller's contract.
    let merged = merge(unsafe {
        &TensorMerge {
            receiver: receiver.slice(),
            receiver_y: receiver_y.slice(),
            receiver_election,
            ancestor: ancestor.slice(),
            ancestor_y: ancestor_y.slice(),
            x_mean: x_mean.map(|x| x.slice()).unwrap_or(&[]),
            contributors: &models,
            is_bias,
            epsilon,
        }
    })?;
    // SAFETY: checked above.
    unsafe {
        out.slice_mut().copy_from_slice(&merged.values);
        write_counts(counts, &merged.counts);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_matrix_matches_the_library() {
        let w = [0.5f32, -1.0, 2.0, 0.25, 0.0, -3.0];
        let (u, v) = ([1.0f32, -2.0], [0.5f32, 1.0, -1.5]);
        let form = flatmerge_score_form {
            kind: 0,
            param: 1.0,
        };
        let mut out = [9.0f32; 6];
        let status = unsafe {
            flatmerge_score_matrix(
                w.as_ptr(),
                6,
                u.as_ptr(),
                2,
                v.as_ptr(),
                3,
                form,
                out.as_mut_ptr(),
                6,
            )
        };
        assert_eq!(status, flatmerge_status::Ok);
        let mut expected = [0.0f32; 6];
        safe_m::score_matrix(&w, &u, &v, ScoreForm::Sas { alpha: 1.0 }, &mut expected);
        assert_eq!(out, expected);
        // A mismatched length is refused and the output is left alone.
        let mut untouched = [9.0f32; 6];
        let status = unsafe {
            flatmerge_score_matrix(
                w.as_ptr(),
                6,
                u.as_ptr(),
                2,
                v.as_ptr(),
                2,
                form,
                untouched.as_mut_ptr(),
                6,
            )
        };
        assert_eq!(status, flatmerge_status::InvalidArgument);
        assert_eq!(untouched, [9.0; 6]);
    }
}
