//! SAFE-M (SPEC §1) on small hand-computed cases.
//!
//! Every expected value below is derived in the comments from the SPEC's
//! formulas, not taken from the code's output. Numbers are dyadic (0.5, 0.25,
//! …) so that most intermediates are exact in f32; where the SPEC's
//! `ε = 1e-8` makes a value inexact (the projection coefficients) or a
//! division does not terminate in binary (2/5), the comparison uses a
//! relative tolerance of `REL = 1e-6`.
//!
//! The layer of the main case has `out = 2` rows and `in = 5` columns, so a
//! weight holds `n = 10` elements, row-major: element `(r, j)` is `5r + j`.
//!
//! ```text
//! ȳ_C = [1, -1]   ȳ_A = [2, -2]   ȳ_B = [0, 1]   x̄_A = v = d = [1, -1, 1, 0, 1]
//!
//! W_C = [ 1  -2    0.5  4   0   ]   W_A = [ 2  -1    0.5  4   1   ]   W_B = [ 2    -3  -1   5   0.5 ]
//!       [-2   0    1    0   0   ]         [-3   0.25 1.5  1  -0.5 ]         [ 2.5  -1   5  -2   1   ]
//!
//! τ_A = W_A − W_C = [ 1  1     0    0   1   ]    τ_B = W_B − W_C = [ 1    -1  -1.5  1   0.5 ]
//!                   [-1  0.25  0.5  1  -0.5 ]                      [ 4.5  -1   4   -2   1   ]
//! ```

use approx::assert_relative_eq;
use flatmerge::reduce::dot;
use flatmerge::safe_m::{
    add_decoupled, fallback_blend, fuse_block, is_conflict, merge_tensor, output_shift,
    projection_coefficient, score_matrix, score_vector, split_row, Contributor, ContributorBlock,
    Election, ElectionParams, MaskCounts, ScoreForm, EPSILON,
};
use flatmerge::select::{elect_count, election_threshold, is_elected, kth_largest};

/// Relative tolerance for values that are not exact in f32.
const REL: f32 = 1e-6;

const ROWS: usize = 2;
const COLS: usize = 5;
const N: usize = ROWS * COLS;

const Y_C: [f32; ROWS] = [1.0, -1.0];
const Y_A: [f32; ROWS] = [2.0, -2.0];
const Y_B: [f32; ROWS] = [0.0, 1.0];
const X_A: [f32; COLS] = [1.0, -1.0, 1.0, 0.0, 1.0];

#[rustfmt::skip]
const W_C: [f32; N] = [
     1.0, -2.0, 0.5, 4.0, 0.0,
    -2.0,  0.0, 1.0, 0.0, 0.0,
];
#[rustfmt::skip]
const W_A: [f32; N] = [
     2.0, -1.0,  0.5, 4.0,  1.0,
    -3.0,  0.25, 1.5, 1.0, -0.5,
];
#[rustfmt::skip]
const W_B: [f32; N] = [
    2.0, -3.0, -1.0,  5.0, 0.5,
    2.5, -1.0,  5.0, -2.0, 1.0,
];

const SAS: ScoreForm = ScoreForm::Sas { alpha: 1.0 };
const RATIO: ScoreForm = ScoreForm::Ratio { epsilon: 1e-8 };

/// `k = 0.1·3`, which in f64 is 0.30000000000000004: `k·n` is then
/// 3.0000000000000004, whose plain ceiling is 4. SPEC: `m = ⌈k·n − 10⁻⁶⌉ = 3`.
fn density() -> f64 {
    0.1 * 3.0
}

fn params(form: ScoreForm) -> ElectionParams {
    ElectionParams {
        density: density(),
        form,
    }
}

fn scores(weight: &[f32], u: &[f32], form: ScoreForm) -> Vec<f32> {
    let mut out = vec![f32::NAN; weight.len()];
    score_matrix(weight, u, &X_A, form, &mut out);
    out
}

fn mask(scores: &[f32], threshold: f32) -> Vec<bool> {
    scores.iter().map(|&s| is_elected(s, threshold)).collect()
}

fn bools(bits: &[u8]) -> Vec<bool> {
    bits.iter().map(|&b| b == 1).collect()
}

fn task_vector(w: &[f32]) -> Vec<f32> {
    w.iter().zip(&W_C).map(|(w, c)| w - c).collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_relative_eq!(g, w, max_relative = REL, epsilon = 1e-7);
        assert!(g.is_finite(), "element {i} is {g}");
    }
}

#[test]
fn output_shifts_and_direction() {
    // u_A = ȳ_A − ȳ_C = [2 − 1, −2 + 1] = [1, −1]
    assert_eq!(output_shift(&Y_A, &Y_C), [1.0, -1.0]);
    // u_B = ȳ_B − ȳ_C = [0 − 1, 1 + 1] = [−1, 2]
    assert_eq!(output_shift(&Y_B, &Y_C), [-1.0, 2.0]);
    // v = d = x̄_A; ⟨d, d⟩ = 1 + 1 + 1 + 0 + 1 = 4
    assert_eq!(dot(&X_A, &X_A), 4.0);
    assert_eq!(EPSILON, 1e-8);
    assert_eq!(ScoreForm::default(), SAS, "sas with α = 1 is the default");
}

#[test]
fn sas_scores_by_hand() {
    // g'_A[r][j] = u_A[r]·v[j]: row 0 = [1, −1, 1, 0, 1], row 1 = [−1, 1, −1, 0, −1].
    // |g'| = 1 except column 3 (0), so S_A = |W_A|·1/(1 + 1) = |W_A|/2, and 0 in column 3
    // (even though W_A[0][3] = 4 is the largest weight: salience, not magnitude).
    let s_a = scores(&W_A, &[1.0, -1.0], SAS);
    #[rustfmt::skip]
    assert_eq!(s_a, [
        1.0, 0.5,   0.25, 0.0, 0.5,
        1.5, 0.125, 0.75, 0.0, 0.25,
    ]);
    // g'_B row 0 = −v (|g'| = 1): S = |W_B|/2 = [1, 1.5, 0.5, 0, 0.25].
    // g'_B row 1 = 2v (|g'| = 2): S = 2|W_B|/(1 + 4) = [5/5, 2/5, 10/5, 0, 2/5] = [1, 0.4, 2, 0, 0.4].
    let s_b = scores(&W_B, &[-1.0, 2.0], SAS);
    #[rustfmt::skip]
    assert_close(&s_b, &[
        1.0, 1.5, 0.5, 0.0, 0.25,
        1.0, 0.4, 2.0, 0.0, 0.4,
    ]);
    // The tie of the election below must be exact: 1·1/2 and 2.5·2/5 are both exactly 1.
    assert_eq!(s_b[0], 1.0);
    assert_eq!(s_b[5], 1.0);
    // α scales the sharpness: α = 0 leaves the salience |W·g'| alone.
    let s_b0 = scores(&W_B, &[-1.0, 2.0], ScoreForm::Sas { alpha: 0.0 });
    assert_eq!(s_b0, [2.0, 3.0, 1.0, 0.0, 0.5, 5.0, 2.0, 10.0, 0.0, 2.0]);
}

#[test]
fn ratio_scores_by_hand() {
    // S = |W ⊙ g'| / (g'² + ε). Where |g'| = 1, f32(1 + 1e-8) = 1, so S = |W|;
    // where |g'| = 2, f32(4 + 1e-8) = 4, so S = 2|W|/4 = |W|/2; where g' = 0, S = 0/ε = 0.
    let s_a = scores(&W_A, &[1.0, -1.0], RATIO);
    #[rustfmt::skip]
    assert_close(&s_a, &[
        2.0, 1.0,  0.5, 0.0, 1.0,
        3.0, 0.25, 1.5, 0.0, 0.5,
    ]);
    let s_b = scores(&W_B, &[-1.0, 2.0], RATIO);
    #[rustfmt::skip]
    assert_close(&s_b, &[
        2.0,  3.0, 1.0, 0.0, 0.5,
        1.25, 0.5, 2.5, 0.0, 0.5,
    ]);
    assert_eq!(s_a[3], 0.0);
    assert_eq!(s_b[8], 0.0);
}

#[test]
fn election_count_threshold_and_tie() {
    let k = density();
    // The 10⁻⁶ of the SPEC matters here: the plain ceiling would elect 4.
    assert_eq!((k * N as f64).ceil(), 4.0);
    assert_eq!(elect_count(k, N), 3);
    // Other counts of the same rule: ⌈0.2·10 − 10⁻⁶⌉ = 2, ⌈0.25·10 − 10⁻⁶⌉ = 3,
    // ⌈1·10 − 10⁻⁶⌉ = 10, and a tiny density still elects one.
    assert_eq!(elect_count(0.2, N), 2);
    assert_eq!(elect_count(0.25, N), 3);
    assert_eq!(elect_count(1.0, N), N);
    assert_eq!(elect_count(1e-9, N), 1);

    // S_A sorted: 1.5, 1, 0.75, 0.5, 0.5, 0.25, 0.25, 0.125, 0, 0 → t_A = 0.75 (3rd).
    let s_a = scores(&W_A, &[1.0, -1.0], SAS);
    assert_eq!(kth_largest(&s_a, 3), 0.75);
    assert_eq!(election_threshold(&s_a, k), 0.75);
    // M_A = S_A ≥ 0.75: elements (0,0), (1,0), (1,2).
    let m_a = mask(&s_a, 0.75);
    assert_eq!(m_a, bools(&[1, 0, 0, 0, 0, 1, 0, 1, 0, 0]));

    // S_B sorted: 2, 1.5, 1, 1, 0.5, 0.4, 0.4, 0.25, 0, 0 → t_B = 1 (3rd), tied with the 4th.
    let s_b = scores(&W_B, &[-1.0, 2.0], SAS);
    assert_eq!(kth_largest(&s_b, 1), 2.0);
    assert_eq!(kth_largest(&s_b, 2), 1.5);
    assert_eq!(kth_largest(&s_b, 3), 1.0);
    assert_eq!(kth_largest(&s_b, 4), 1.0);
    assert_eq!(kth_largest(&s_b, 5), 0.5);
    assert_eq!(kth_largest(&s_b, 10), 0.0);
    assert_eq!(election_threshold(&s_b, k), 1.0);
    // Ties at t are all kept: M_B has 4 elements although m = 3:
    // (0,0) = 1, (0,1) = 1.5, (1,0) = 1, (1,2) = 2.
    let m_b = mask(&s_b, 1.0);
    assert_eq!(m_b, bools(&[1, 1, 0, 0, 0, 1, 0, 1, 0, 0]));
    assert_eq!(m_b.iter().filter(|&&b| b).count(), 4);

    // At density 1 the threshold is the smallest score, 0, and S > 0 excludes
    // the zero scores of column 3: 8 of 10 elected.
    assert_eq!(election_threshold(&s_b, 1.0), 0.0);
    let all = mask(&s_b, 0.0);
    assert_eq!(all, bools(&[1, 1, 1, 0, 1, 1, 1, 1, 0, 1]));

    // Ratio form: S_A sorted 3, 2, 1.5, … → t = 1.5, same mask as sas;
    // S_B sorted 3, 2.5, 2, 1.25, … → t = 2: (0,0), (0,1), (1,2). Element (1,0)
    // (|g'| = 2) drops out: the ratio penalises sharpness harder.
    let r_a = scores(&W_A, &[1.0, -1.0], RATIO);
    let r_b = scores(&W_B, &[-1.0, 2.0], RATIO);
    let t_ra = election_threshold(&r_a, k);
    let t_rb = election_threshold(&r_b, k);
    assert_relative_eq!(t_ra, 1.5, max_relative = REL);
    assert_relative_eq!(t_rb, 2.0, max_relative = REL);
    assert_eq!(mask(&r_a, t_ra), m_a);
    assert_eq!(mask(&r_b, t_rb), bools(&[1, 1, 0, 0, 0, 0, 0, 1, 0, 0]));
}

#[test]
fn conflicts_final_mask_and_masked_task_vector() {
    let tau_a = task_vector(&W_A);
    let tau_b = task_vector(&W_B);
    #[rustfmt::skip]
    assert_eq!(tau_a, [1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.25, 0.5, 1.0, -0.5]);
    #[rustfmt::skip]
    assert_eq!(tau_b, [1.0, -1.0, -1.5, 1.0, 0.5, 4.5, -1.0, 4.0, -2.0, 1.0]);

    let m_a = bools(&[1, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
    let m_b = bools(&[1, 1, 0, 0, 0, 1, 0, 1, 0, 0]);
    // K = M_A ∧ M_B ∧ (τ_A·τ_B < 0). Both elected: (0,0): 1·1 > 0; (1,0): −1·4.5 < 0 → conflict;
    // (1,2): 0.5·4 > 0. (0,1) has opposite signs (1 vs −1) but A does not elect it.
    let k: Vec<bool> = (0..N)
        .map(|i| is_conflict(m_a[i], m_b[i], tau_a[i], tau_b[i]))
        .collect();
    assert_eq!(k, bools(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0]));
    // The sign test on its own: opposite signs conflict only when both are elected;
    // a zero never conflicts; tiny values whose f32 product underflows still do.
    assert!(is_conflict(true, true, -1.0, 2.0));
    assert!(!is_conflict(true, false, -1.0, 2.0));
    assert!(!is_conflict(false, true, -1.0, 2.0));
    assert!(!is_conflict(true, true, 0.0, -2.0));
    assert!(!is_conflict(true, true, 3.0, 2.0));
    assert!(is_conflict(true, true, 1e-30, -1e-30));

    // M'_B = M_B ∧ ¬K = (0,0), (0,1), (1,2).
    let m_final: Vec<bool> = (0..N).map(|i| m_b[i] && !k[i]).collect();
    assert_eq!(m_final, bools(&[1, 1, 0, 0, 0, 0, 0, 1, 0, 0]));
    // τ_u = τ_B ⊙ M'_B.
    let tau_u: Vec<f32> = (0..N)
        .map(|i| if m_final[i] { tau_b[i] } else { 0.0 })
        .collect();
    assert_eq!(tau_u, [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0]);
}

/// `τ_u` of the main case (derived in `conflicts_final_mask_and_masked_task_vector`).
#[rustfmt::skip]
const TAU_U: [f32; N] = [
    1.0, -1.0, 0.0, 0.0, 0.0,
    0.0,  0.0, 4.0, 0.0, 0.0,
];

/// `W* = W_A + 1·P + 0.5·O`:
/// row 0: P + O/2 = [0.5+0.25, −0.5−0.25, 0.5−0.25, 0, 0.5−0.25] = [0.75, −0.75, 0.25, 0, 0.25];
/// row 1: P + O/2 = [1−0.5, −1+0.5, 1+1.5, 0, 1−0.5] = [0.5, −0.5, 2.5, 0, 0.5].
#[rustfmt::skip]
const W_STAR: [f32; N] = [
     2.75, -1.75, 0.75, 4.0, 1.25,
    -2.5,  -0.25, 4.0,  1.0, 0.0,
];

#[test]
fn projection_and_fusion_per_row() {
    let dd = dot(&X_A, &X_A);
    // Row 0: ⟨τ_u[0], d⟩ = 1·1 + (−1)(−1) = 2, c = 2/(4 + ε) ≈ 0.5.
    // P = 0.5·d = [0.5, −0.5, 0.5, 0, 0.5]; O = τ_u − P = [0.5, −0.5, −0.5, 0, −0.5];
    // check: ⟨O, d⟩ = 0.5 + 0.5 − 0.5 − 0.5 = 0.
    // Row 1: ⟨τ_u[1], d⟩ = 4·1 = 4, c ≈ 1. P = d = [1, −1, 1, 0, 1];
    // O = [−1, 1, 3, 0, −1]; ⟨O, d⟩ = −1 − 1 + 3 − 1 = 0.
    let expected = [
        (
            0.5f32,
            [0.5f32, -0.5, 0.5, 0.0, 0.5],
            [0.5f32, -0.5, -0.5, 0.0, -0.5],
        ),
        (1.0, [1.0, -1.0, 1.0, 0.0, 1.0], [-1.0, 1.0, 3.0, 0.0, -1.0]),
    ];
    for (r, (c_want, p_want, o_want)) in expected.iter().enumerate() {
        let row = &TAU_U[r * COLS..(r + 1) * COLS];
        let c = projection_coefficient(row, &X_A, dd, EPSILON);
        assert_relative_eq!(c, *c_want, max_relative = REL);
        let mut p = [f32::NAN; COLS];
        let mut o = [f32::NAN; COLS];
        split_row(row, &X_A, c, &mut p, &mut o);
        assert_close(&p, p_want);
        assert_close(&o, o_want);
        // W*[r] = W_A[r] + λ_proj·P + λ_ortho·O, defaults 1 and 0.5.
        let mut acc = W_A[r * COLS..(r + 1) * COLS].to_vec();
        add_decoupled(&mut acc, row, Some((&X_A, c)), 1.0, 0.5);
        assert_close(&acc, &W_STAR[r * COLS..(r + 1) * COLS]);
        // λ_proj = 0, λ_ortho = 1 adds exactly O; λ_proj = 1, λ_ortho = 0 adds exactly P.
        let mut only_o = vec![0.0f32; COLS];
        add_decoupled(&mut only_o, row, Some((&X_A, c)), 0.0, 1.0);
        assert_close(&only_o, o_want);
        let mut only_p = vec![0.0f32; COLS];
        add_decoupled(&mut only_p, row, Some((&X_A, c)), 1.0, 0.0);
        assert_close(&only_p, p_want);
    }
}

#[test]
fn fuse_block_and_merge_tensor_give_the_hand_result() {
    // Scores and thresholds derived in `election_count_threshold_and_tie`.
    let s_a = scores(&W_A, &[1.0, -1.0], SAS);
    let s_b = scores(&W_B, &[-1.0, 2.0], SAS);
    // |M_A| = 3, |M_B| = 4 (tie kept), |K| = 1, |M'_B| = 3.
    let want_counts = MaskCounts {
        receiver_elected: 3,
        elected: 4,
        conflicts: 1,
        kept: 3,
    };

    let mut out = vec![f32::NAN; N];
    let mut scratch = Vec::new();
    let mut counts = [MaskCounts::default()];
    fuse_block(
        &W_A,
        &W_C,
        Election {
            scores: &s_a,
            threshold: 0.75,
        },
        &[ContributorBlock {
            weight: &W_B,
            election: Election {
                scores: &s_b,
                threshold: 1.0,
            },
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }],
        Some((&X_A, 4.0)),
        EPSILON,
        &mut out,
        &mut scratch,
        &mut counts,
    );
    assert_close(&out, &W_STAR);
    assert_eq!(counts, [want_counts]);

    let merged = merge_tensor(
        &W_A,
        &Y_A,
        params(SAS),
        &W_C,
        &Y_C,
        &X_A,
        &[Contributor {
            weight: &W_B,
            y_mean: &Y_B,
            election: params(SAS),
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }],
        false,
        EPSILON,
    );
    assert_close(&merged.values, &W_STAR);
    assert_eq!(merged.counts, [want_counts]);
}

#[test]
fn ratio_form_changes_the_counts_not_the_result() {
    // Ratio masks (see `election_count_threshold_and_tie`): M_A = (0,0), (1,0), (1,2);
    // M_B = (0,0), (0,1), (1,2). Both elected: (0,0) (1·1 > 0) and (1,2) (0.5·4 > 0):
    // no conflict, so M'_B = M_B and τ_u is the same as with sas; so is W*.
    let merged = merge_tensor(
        &W_A,
        &Y_A,
        params(RATIO),
        &W_C,
        &Y_C,
        &X_A,
        &[Contributor {
            weight: &W_B,
            y_mean: &Y_B,
            election: params(RATIO),
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }],
        false,
        EPSILON,
    );
    assert_close(&merged.values, &W_STAR);
    assert_eq!(
        merged.counts,
        [MaskCounts {
            receiver_elected: 3,
            elected: 3,
            conflicts: 0,
            kept: 3,
        }]
    );
}

#[test]
fn each_model_elects_with_its_own_score_form() {
    // A with sas, B with ratio: M_A = (0,0), (1,0), (1,2) (sas); M_B = (0,0), (0,1), (1,2)
    // (ratio). Same masks as the all-ratio merge: no conflict, 3 elected by B, τ_u and W*
    // unchanged. Had B been scored with A's form (sas), it would elect 4 with 1 conflict.
    let merged = merge_tensor(
        &W_A,
        &Y_A,
        params(SAS),
        &W_C,
        &Y_C,
        &X_A,
        &[Contributor {
            weight: &W_B,
            y_mean: &Y_B,
            election: params(RATIO),
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }],
        false,
        EPSILON,
    );
    assert_close(&merged.values, &W_STAR);
    assert_eq!(
        merged.counts,
        [MaskCounts {
            receiver_elected: 3,
            elected: 3,
            conflicts: 0,
            kept: 3,
        }]
    );
}

#[test]
fn bias_takes_the_masked_task_vector_scaled_by_lambda_proj() {
    // Same layer statistics: u_A = [1, −1], u_B = [−1, 2]; g' = u for a bias.
    let b_c = [0.0f32, 1.0];
    let b_a = [1.0f32, 0.5];
    let b_b = [2.0f32, 3.0];
    // τ_A = [1, −0.5], τ_B = [2, 2].
    // S_A = |b_A·u_A|/(1 + u_A²) = [1/2, 0.5/2] = [0.5, 0.25];
    // S_B = [|2·(−1)|/2, |3·2|/5] = [1, 1.2].
    let mut s_a = [f32::NAN; 2];
    let mut s_b = [f32::NAN; 2];
    score_vector(&b_a, &[1.0, -1.0], SAS, &mut s_a);
    score_vector(&b_b, &[-1.0, 2.0], SAS, &mut s_b);
    assert_eq!(s_a, [0.5, 0.25]);
    assert_close(&s_b, &[1.0, 1.2]);

    let merge = |density: f64, lambda_proj: f32, lambda_ortho: f32| {
        let p = ElectionParams { density, form: SAS };
        merge_tensor(
            &b_a,
            &Y_A,
            p,
            &b_c,
            &Y_C,
            &X_A,
            &[Contributor {
                weight: &b_b,
                y_mean: &Y_B,
                election: p,
                lambda_proj,
                lambda_ortho,
            }],
            true,
            EPSILON,
        )
    };

    // Density 1: m = 2, both models elect both entries. Entry 1 conflicts
    // (−0.5 vs 2): M'_B = [1, 0], τ_u = [2, 0], b* = b_A + 1·τ_u = [3, 0.5].
    let merged = merge(1.0, 1.0, 0.5);
    assert_eq!(merged.values, [3.0, 0.5]);
    let counts = MaskCounts {
        receiver_elected: 2,
        elected: 2,
        conflicts: 1,
        kept: 1,
    };
    assert_eq!(merged.counts, [counts]);
    // λ_ortho plays no part for a bias; λ_proj = 0.5 halves τ_u: [1 + 1, 0.5].
    assert_eq!(merge(1.0, 1.0, 7.0).values, [3.0, 0.5]);
    assert_eq!(merge(1.0, 0.5, 0.5).values, [2.0, 0.5]);

    // Density 0.5: m = ⌈1 − 10⁻⁶⌉ = 1. t_A = 0.5 → M_A = [1, 0]; t_B = 1.2 → M_B = [0, 1].
    // No element is elected by both, so no conflict: τ_u = [0, 2], b* = [1, 2.5].
    let merged = merge(0.5, 1.0, 0.5);
    assert_eq!(merged.values, [1.0, 2.5]);
    assert_eq!(
        merged.counts,
        [MaskCounts {
            receiver_elected: 1,
            elected: 1,
            conflicts: 0,
            kept: 1,
        }]
    );
}

#[test]
fn fallback_blend_by_hand() {
    let w_a = [1.0f32, 2.0, -1.0, 0.5];
    let b1 = [3.0f32, 0.0, 1.0, 0.5];
    let b2 = [1.0f32, 2.0, -3.0, 1.5];
    let mut out = [f32::NAN; 4];
    // w = 0.5, one contributor: 0.5·W_A + 0.5·B = [2, 1, 0, 0.5].
    fallback_blend(&w_a, &[&b1], 0.5, &mut out);
    assert_eq!(out, [2.0, 1.0, 0.0, 0.5]);
    // w = 0.5, two contributors: B̄ = [2, 1, −1, 1]; 0.5·W_A + 0.5·B̄ = [1.5, 1.5, −1, 0.75].
    fallback_blend(&w_a, &[&b1, &b2], 0.5, &mut out);
    assert_eq!(out, [1.5, 1.5, -1.0, 0.75]);
    // w = 0.25: 0.75·W_A + 0.25·B = [0.75 + 0.75, 1.5 + 0, −0.75 + 0.25, 0.375 + 0.125].
    fallback_blend(&w_a, &[&b1], 0.25, &mut out);
    assert_eq!(out, [1.5, 1.5, -0.5, 0.5]);
    // w = 0 keeps A, w = 1 takes the contributors' mean.
    fallback_blend(&w_a, &[&b1, &b2], 0.0, &mut out);
    assert_eq!(out, w_a);
    fallback_blend(&w_a, &[&b1, &b2], 1.0, &mut out);
    assert_eq!(out, [2.0, 1.0, -1.0, 1.0]);
}

#[test]
fn two_contributors_each_with_their_own_mask() {
    // B₂: ȳ_B₂ = [2, 0] → u_B₂ = [1, 1]; g' rows are both v, |g'| ∈ {1, 0}: S = |W_B₂|/2.
    let y_b2 = [2.0f32, 0.0];
    #[rustfmt::skip]
    let w_b2: [f32; N] = [
         0.0, 1.0, 1.0, 1.0, 3.0,
        -4.0, 0.0, 1.0, 0.0, 1.0,
    ];
    let s_b2 = scores(&w_b2, &output_shift(&y_b2, &Y_C), SAS);
    #[rustfmt::skip]
    assert_eq!(s_b2, [
        0.0, 0.5, 0.5, 0.0, 1.5,
        2.0, 0.0, 0.5, 0.0, 0.5,
    ]);
    // Density 0.2: m = 2; sorted 2, 1.5, 0.5, … → t = 1.5; M_B₂ = (0,4), (1,0).
    let p2 = ElectionParams {
        density: 0.2,
        form: SAS,
    };
    assert_eq!(election_threshold(&s_b2, p2.density), 1.5);
    assert_eq!(mask(&s_b2, 1.5), bools(&[0, 0, 0, 0, 1, 1, 0, 0, 0, 0]));
    // τ_B₂ = W_B₂ − W_C = [−1, 3, 0.5, −3, 3 | −2, 0, 0, 0, 1]. Against M_A = (0,0), (1,0), (1,2):
    // (1,0) is elected by both, τ_A = −1 and τ_B₂ = −2 agree: no conflict. τ_u₂ = [0,0,0,0,3 | −2,0,0,0,0].
    assert_eq!(
        task_vector(&w_b2),
        [-1.0, 3.0, 0.5, -3.0, 3.0, -2.0, 0.0, 0.0, 0.0, 1.0]
    );
    // Row 0: ⟨τ_u₂, d⟩ = 3, c = 0.75: P = [0.75, −0.75, 0.75, 0, 0.75], O = [−0.75, 0.75, −0.75, 0, 2.25].
    // Row 1: ⟨τ_u₂, d⟩ = −2, c = −0.5: P = [−0.5, 0.5, −0.5, 0, −0.5], O = [−1.5, −0.5, 0.5, 0, 0.5].
    // With λ_proj = 0.5, λ_ortho = 0.25 for B₂, 0.5·P + 0.25·O is
    // row 0: [0.375 − 0.1875, −0.375 + 0.1875, 0.375 − 0.1875, 0, 0.375 + 0.5625]
    //      = [0.1875, −0.1875, 0.1875, 0, 0.9375];
    // row 1: [−0.25 − 0.375, 0.25 − 0.125, −0.25 + 0.125, 0, −0.25 + 0.125]
    //      = [−0.625, 0.125, −0.125, 0, −0.125].
    // B₁ = B of the main case with defaults adds W_STAR − W_A:
    // row 0: [0.75, −0.75, 0.25, 0, 0.25]; row 1: [0.5, −0.5, 2.5, 0, 0.5].
    // W* = W_A + both:
    #[rustfmt::skip]
    let want = [
         2.9375, -1.9375, 0.9375, 4.0, 2.1875,
        -3.125,  -0.125,  3.875,  1.0, -0.125,
    ];
    let b1 = Contributor {
        weight: &W_B,
        y_mean: &Y_B,
        election: params(SAS),
        lambda_proj: 1.0,
        lambda_ortho: 0.5,
    };
    let b2 = Contributor {
        weight: &w_b2,
        y_mean: &y_b2,
        election: p2,
        lambda_proj: 0.5,
        lambda_ortho: 0.25,
    };
    let merged = merge_tensor(
        &W_A,
        &Y_A,
        params(SAS),
        &W_C,
        &Y_C,
        &X_A,
        &[b1, b2],
        false,
        EPSILON,
    );
    assert_close(&merged.values, &want);
    let c1 = MaskCounts {
        receiver_elected: 3,
        elected: 4,
        conflicts: 1,
        kept: 3,
    };
    let c2 = MaskCounts {
        receiver_elected: 3,
        elected: 2,
        conflicts: 0,
        kept: 2,
    };
    assert_eq!(merged.counts, [c1, c2]);

    // The order of the contributors changes neither the values nor the per-contributor counts.
    let swapped = merge_tensor(
        &W_A,
        &Y_A,
        params(SAS),
        &W_C,
        &Y_C,
        &X_A,
        &[b2, b1],
        false,
        EPSILON,
    );
    assert_close(&swapped.values, &want);
    assert_eq!(swapped.counts, [c2, c1]);
}
