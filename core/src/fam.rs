//! FAM: flat-align merging of heterogeneous models (SPEC §2), as plain
//! functions on slices. Probe rows are row-major `[N, width]`: row `n` is
//! probe example `n`'s mean activation (SPEC §4).
//!
//! The pieces, in the order a merge uses them: neuron importance
//! ([`salience`], [`sharpness`], [`normalise_mean`],
//! [`cross_modal_information`], [`flatness_activation_importance`]),
//! candidates ([`candidates`]), the similarity of all neuron pairs
//! ([`correlation`], one matrix product), the matched pairs' selection
//! ([`flat_oriented_score`], [`is_fused`]) and the flat projection fusion
//! ([`fuse_row`]).

use crate::reduce;
use crate::safe_m::{add_decoupled, projection_coefficient};
use crate::select::{election_threshold, is_elected};
use alloc::vec;
use alloc::vec::Vec;

/// `a_i = (1/N) Σ_n |y_{n,i}|` (SPEC §2.2), summed in f64.
pub fn salience(y_rows: &[f32], width: usize) -> Vec<f32> {
    column_means(y_rows, width, |y, _| libm::fabs(y as f64))
}

/// `h_i = (1/N) Σ_n y_{n,i}² · ‖x_n‖² / in` (SPEC §2.2): an empirical-Fisher
/// proxy of the loss curvature along neuron `i`.
pub fn sharpness(y_rows: &[f32], out_width: usize, x_rows: &[f32], in_width: usize) -> Vec<f32> {
    let rows = y_rows.len().checked_div(out_width).unwrap_or(0);
    assert_eq!(
        x_rows.len(),
        rows * in_width,
        "sharpness: x and y rows differ in count"
    );
    let x_scale: Vec<f64> = x_rows
        .chunks_exact(in_width.max(1))
        .map(|x| reduce::sum_squares(x) / in_width.max(1) as f64)
        .collect();
    column_means(y_rows, out_width, |y, n| {
        (y as f64) * (y as f64) * x_scale.get(n).copied().unwrap_or(0.0)
    })
}

/// The mean over rows of `f(y_{n,i}, n)` per column, in f64, as f32.
fn column_means(rows: &[f32], width: usize, f: impl Fn(f32, usize) -> f64) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let n = rows.len() / width;
    let mut sums = vec![0f64; width];
    for (r, row) in rows.chunks_exact(width).enumerate() {
        for (s, &y) in sums.iter_mut().zip(row) {
            *s += f(y, r);
        }
    }
    sums.into_iter()
        .map(|s| (s / n.max(1) as f64) as f32)
        .collect()
}

/// `ĥ_i = h_i / mean_j h_j` (SPEC §2.2); all ones when the mean is 0.
pub fn normalise_mean(h: &[f32]) -> Vec<f32> {
    let mean = reduce::sum(h) / h.len().max(1) as f64;
    if mean == 0.0 || !mean.is_finite() {
        return vec![1.0; h.len()];
    }
    h.iter().map(|&x| (x as f64 / mean) as f32).collect()
}

/// Cross-modal information per neuron (SPEC §2.2):
/// `I_i = max(0, ½ ln σ²_i − Σ_m p_m · ½ ln σ²_{m,i})` with population
/// variances plus `ε`, `p_m` the share of rows of modality `m`. With one
/// modality every `I_i = 0`. `modality[n]` is row `n`'s modality.
pub fn cross_modal_information(
    y_rows: &[f32],
    width: usize,
    modality: &[u8],
    epsilon: f32,
) -> Vec<f32> {
    let n = y_rows.len().checked_div(width).unwrap_or(0);
    assert_eq!(
        modality.len(),
        n,
        "cross_modal_information: one modality per row"
    );
    let mut kinds: Vec<u8> = modality.to_vec();
    kinds.sort_unstable();
    kinds.dedup();
    if kinds.len() <= 1 {
        return vec![0.0; width];
    }
    let all: Vec<usize> = (0..n).collect();
    let total = variance(y_rows, width, &all, epsilon);
    let mut conditional = vec![0f64; width];
    for kind in &kinds {
        let rows: Vec<usize> = (0..n).filter(|&r| modality[r] == *kind).collect();
        let share = rows.len() as f64 / n as f64;
        for (c, v) in conditional
            .iter_mut()
            .zip(variance(y_rows, width, &rows, epsilon))
        {
            *c += share * 0.5 * libm::log(v);
        }
    }
    total
        .iter()
        .zip(&conditional)
        .map(|(&v, &c)| (0.5 * libm::log(v) - c).max(0.0) as f32)
        .collect()
}

/// Population variance per column over `rows`, plus `ε`, in f64.
fn variance(y_rows: &[f32], width: usize, rows: &[usize], epsilon: f32) -> Vec<f64> {
    let count = rows.len().max(1) as f64;
    let mut mean = vec![0f64; width];
    for &r in rows {
        for (m, &y) in mean.iter_mut().zip(&y_rows[r * width..(r + 1) * width]) {
            *m += y as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= count);
    let mut var = vec![0f64; width];
    for &r in rows {
        for ((v, &y), m) in var
            .iter_mut()
            .zip(&y_rows[r * width..(r + 1) * width])
            .zip(&mean)
        {
            let d = y as f64 - m;
            *v += d * d;
        }
    }
    var.into_iter()
        .map(|v| v / count + epsilon as f64)
        .collect()
}

/// `FAI_i = a_i · (1 + I_i) / (ĥ_i + ε)` (SPEC §2.2).
pub fn flatness_activation_importance(
    salience: &[f32],
    information: &[f32],
    sharpness_normalised: &[f32],
    epsilon: f32,
) -> Vec<f32> {
    salience
        .iter()
        .zip(information)
        .zip(sharpness_normalised)
        .map(|((&a, &i), &h)| a * (1.0 + i) / (h + epsilon))
        .collect()
}

/// Candidate neurons (SPEC §2.2): the `⌈k_n·n − 10⁻⁶⌉` of highest FAI,
/// ties at the boundary kept and zero importance never a candidate (the
/// §1.2 election rule).
pub fn candidates(fai: &[f32], density: f64) -> Vec<bool> {
    let t = election_threshold(fai, density);
    fai.iter().map(|&s| is_elected(s, t)).collect()
}

/// Centres each column of `rows` (`[N, width]`) and scales it to unit norm
/// (only centring is skipped when `centre` is false); constant columns
/// become zero. Returned column-major, `[width, N]`, ready for [`correlation`].
pub fn standardise_columns(rows: &[f32], width: usize, centre: bool) -> Vec<f32> {
    let n = rows.len().checked_div(width).unwrap_or(0);
    let mut out = vec![0f32; width * n];
    for i in 0..width {
        let column = || (0..n).map(|r| rows[r * width + i] as f64);
        let mean = if centre {
            column().sum::<f64>() / n.max(1) as f64
        } else {
            0.0
        };
        let norm = libm::sqrt(column().map(|y| (y - mean) * (y - mean)).sum::<f64>());
        let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        for (r, y) in column().enumerate() {
            out[i * n + r] = ((y - mean) * scale) as f32;
        }
    }
    out
}

/// `corr[i][j]` = cosine of column `i` of A and column `j` of B, from
/// [`standardise_columns`] outputs (`[n_a, N]` and `[n_b, N]`): one matrix
/// product `Â Bᵀ`, `[n_a, n_b]` row-major (SPEC §2.3: Pearson when centred).
pub fn correlation(a: &[f32], n_a: usize, b: &[f32], n_b: usize) -> Vec<f32> {
    let mut out = vec![0f32; n_a * n_b];
    correlation_into(a, n_a, b, n_b, &mut out);
    out
}

/// [`correlation`] into `out` (`[n_a, n_b]`, overwritten): callers that
/// split A's rows into blocks write each block's rows in place.
pub fn correlation_into(a: &[f32], n_a: usize, b: &[f32], n_b: usize, out: &mut [f32]) {
    let rows = a.len().checked_div(n_a).unwrap_or(0);
    assert_eq!(
        b.len(),
        n_b * rows,
        "correlation: A and B differ in probe rows"
    );
    assert_eq!(
        out.len(),
        n_a * n_b,
        "correlation: output of the wrong size"
    );
    if n_a == 0 || n_b == 0 || rows == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the pointers and strides describe the three buffers exactly:
    // a is [n_a × rows] row-major (row stride rows, column stride 1), b is
    // read as its transpose [rows × n_b] (row stride 1, column stride rows),
    // out is [n_a × n_b] row-major; none of them alias.
    unsafe {
        matrixmultiply::sgemm(
            n_a,
            rows,
            n_b,
            1.0,
            a.as_ptr(),
            rows as isize,
            1,
            b.as_ptr(),
            1,
            rows as isize,
            0.0,
            out.as_mut_ptr(),
            n_b as isize,
            1,
        );
    }
}

/// `FOS_i = corr_{i,π(i)} · exp(−|ĥ_{A,i} − ĥ_{B,π(i)}| / σ)` (SPEC §2.3).
#[inline]
pub fn flat_oriented_score(
    correlation: f32,
    sharpness_a: f32,
    sharpness_b: f32,
    sigma: f32,
) -> f32 {
    correlation * libm::expf(-libm::fabsf(sharpness_a - sharpness_b) / sigma)
}

/// Whether a matched pair is fused (SPEC §2.3):
/// `FOS ≥ fos_min ∧ (i ∈ cand_A ∨ π(i) ∈ cand_B)`.
#[inline]
pub fn is_fused(fos: f32, fos_min: f32, candidate_a: bool, candidate_b: bool) -> bool {
    fos >= fos_min && (candidate_a || candidate_b)
}

/// The flatness factor of a fused row (SPEC §2.4): `clamp(1 − β·ĥ_B, 0, 1)`.
#[inline]
pub fn flatness_factor(beta: f32, sharpness_b: f32) -> f32 {
    (1.0 - beta * sharpness_b).clamp(0.0, 1.0)
}

/// Flat projection fusion of one row (SPEC §2.4), in place on `row_a`:
/// `τ = W_B[r] − W_A[r]`, `W*[r] = W_A[r] + λ_proj·f·P + λ_ortho·O` where
/// `P` is `τ`'s part along `d` and `O = τ − P` (the flatness factor scales
/// the projected part only, so the split stays exactly orthogonal).
/// `direction = None` (a bias entry or a row without statistics):
/// `W_A + λ_proj·f·τ`. `tau` is scratch of the row's width.
#[allow(clippy::too_many_arguments)]
pub fn fuse_row(
    row_a: &mut [f32],
    row_b: &[f32],
    direction: Option<(&[f32], f64)>,
    factor: f32,
    lambda_proj: f32,
    lambda_ortho: f32,
    epsilon: f32,
    tau: &mut Vec<f32>,
) {
    assert_eq!(row_a.len(), row_b.len(), "fuse_row: widths differ");
    tau.clear();
    tau.extend(row_b.iter().zip(row_a.iter()).map(|(b, a)| b - a));
    let direction = direction.map(|(d, dd)| (d, projection_coefficient(tau, d, dd, epsilon)));
    add_decoupled(row_a, tau, direction, lambda_proj * factor, lambda_ortho);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn importance_by_hand() {
        // Two examples, two neurons; x rows of width 2.
        let y = [1.0f32, -2.0, 3.0, 0.0];
        let x = [1.0f32, 1.0, 2.0, 0.0];
        assert_eq!(salience(&y, 2), [2.0, 1.0]);
        // ‖x_0‖²/2 = 1, ‖x_1‖²/2 = 2: h_0 = (1·1 + 9·2)/2 = 9.5, h_1 = (4·1 + 0)/2 = 2.
        assert_eq!(sharpness(&y, 2, &x, 2), [9.5, 2.0]);
        assert_eq!(normalise_mean(&[9.5, 2.0, 0.5]), [2.375, 0.5, 0.125]);
        let fai = flatness_activation_importance(&[2.0, 1.0], &[0.0, 1.0], &[1.0, 0.5], 0.0);
        assert_eq!(fai, [2.0, 4.0]);
        assert_eq!(
            candidates(&[2.0, 4.0, 0.0, 4.0], 0.25),
            [false, true, false, true],
            "ties kept"
        );
    }

    #[test]
    fn information_is_zero_with_one_modality_and_positive_when_modalities_separate() {
        let y = [0.0f32, 1.0, 0.0, 1.0, 10.0, 1.0, 10.0, 1.0];
        assert_eq!(
            cross_modal_information(&y, 2, &[0, 0, 0, 0], 1e-8),
            [0.0, 0.0]
        );
        let i = cross_modal_information(&y, 2, &[0, 0, 1, 1], 1e-8);
        // Neuron 0: total variance 25, within each modality 0 (+ε): large information.
        assert!(i[0] > 5.0, "{i:?}");
        // Neuron 1 is constant: ½ ln ε − ½ ln ε = 0.
        assert_eq!(i[1], 0.0);
    }

    #[test]
    fn correlation_is_pearson() {
        // Column 0 of A rises, column 1 falls; B's single column rises.
        let a = standardise_columns(&[1.0, 3.0, 2.0, 2.0, 3.0, 1.0], 2, true);
        let b = standardise_columns(&[10.0, 20.0, 30.0], 1, true);
        let c = correlation(&a, 2, &b, 1);
        assert!(
            (c[0] - 1.0).abs() < 1e-6 && (c[1] + 1.0).abs() < 1e-6,
            "{c:?}"
        );
    }

    #[test]
    fn fusion_scales_only_the_projected_part() {
        let d = [1.0f32, 0.0];
        let dd = 1.0;
        let mut a = [1.0f32, 1.0];
        let mut tau = Vec::new();
        // τ = [2, 4]: P = [2, 0], O = [0, 4]; λ_p·f = 0.5·0.5, λ_o = 0.5.
        fuse_row(
            &mut a,
            &[3.0, 5.0],
            Some((&d, dd)),
            0.5,
            0.5,
            0.5,
            0.0,
            &mut tau,
        );
        assert_eq!(a, [1.5, 3.0]);
        assert_eq!(flatness_factor(0.5, 3.0), 0.0);
        assert_eq!(flatness_factor(0.5, 1.0), 0.5);
        assert!((flat_oriented_score(0.8, 1.0, 1.1, 0.1) - 0.8 * (-1.0f32).exp()).abs() < 1e-6);
        assert!(
            is_fused(0.5, 0.5, false, true)
                && !is_fused(0.49, 0.5, true, true)
                && !is_fused(0.9, 0.5, false, false)
        );
    }
}
