//! Merges on the hypersphere with mergekit's observable semantics (SPEC §3
//! says the baselines follow mergekit; SPEC defines none of these three, so
//! the choices below are written down here): `nuslerp` (slerp of two
//! tensors, whole or per row or column), `multislerp` (the spherical
//! barycentre of several) and `karcher` (the Riemannian mean by fixed-point
//! iteration). Plain functions on whole tensors: vectors stay f32, every
//! norm, dot product and angle is f64, summed in a fixed order over the
//! whole tensor, so the result depends on the inputs alone.

use alloc::vec::Vec;
use libm::{acos, cos, sin, sqrt};

/// How a tensor splits into the vectors `nuslerp` interpolates: `count`
/// vectors of `len` entries, entry `j` of vector `v` at flat index
/// `v·step + j·stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    /// Number of vectors.
    pub count: usize,
    /// Entries per vector.
    pub len: usize,
    /// Flat distance between the first entries of consecutive vectors.
    pub step: usize,
    /// Flat distance between consecutive entries of one vector.
    pub stride: usize,
}

impl Lanes {
    /// The whole tensor as one vector (`nuslerp_flatten: true`).
    pub fn flat(numel: usize) -> Lanes {
        Lanes {
            count: usize::from(numel > 0),
            len: numel,
            step: numel,
            stride: 1,
        }
    }

    /// One vector per row: along the last axis (mergekit's `dim = -1`).
    pub fn last_axis(shape: &[usize]) -> Lanes {
        let numel: usize = shape.iter().product();
        let len = shape.last().copied().unwrap_or(1);
        Lanes {
            count: numel.checked_div(len).unwrap_or(0),
            len,
            step: len,
            stride: 1,
        }
    }

    /// One vector per column: along the first axis (`nuslerp_row_wise:
    /// true`, mergekit's `dim = 0`; a 1-D tensor is one vector either way).
    pub fn first_axis(shape: &[usize]) -> Lanes {
        let numel: usize = shape.iter().product();
        let len = shape.first().copied().unwrap_or(1);
        let count = numel.checked_div(len).unwrap_or(0);
        Lanes {
            count,
            len,
            step: 1,
            stride: count,
        }
    }

    fn index(&self, v: usize, j: usize) -> usize {
        v * self.step + j * self.stride
    }
}

/// `nuslerp` (mergekit `nuslerp`): per vector of `lanes`, the spherical
/// interpolation `(sin((1 − t)θ)·v₀ + sin(tθ)·v₁) / sin θ`, with `θ` the
/// angle between `v₀` and `v₁` (each normalised by `max(‖v‖, 10⁻⁷)`), and
/// the linear `(1 − t)·v₀ + t·v₁` where `|sin θ| < 10⁻⁸`. The norms are not
/// interpolated: as in mergekit, the result is the unnormalised slerp
/// formula applied to the vectors themselves.
///
/// # Panics
/// If the slices are shorter than `lanes` covers.
pub fn nuslerp(t: f64, v0: &[f32], v1: &[f32], lanes: Lanes, out: &mut [f32]) {
    for v in 0..lanes.count {
        let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
        for j in 0..lanes.len {
            let i = lanes.index(v, j);
            let (a, b) = (v0[i] as f64, v1[i] as f64);
            aa += a * a;
            bb += b * b;
            ab += a * b;
        }
        let (na, nb) = (sqrt(aa).max(1e-7), sqrt(bb).max(1e-7));
        let theta = acos((ab / (na * nb)).clamp(-1.0, 1.0));
        let s = sin(theta);
        let (c0, c1) = if s.abs() < 1e-8 {
            (1.0 - t, t)
        } else {
            (sin((1.0 - t) * theta) / s, sin(t * theta) / s)
        };
        let (c0, c1) = (c0 as f32, c1 as f32);
        for j in 0..lanes.len {
            let i = lanes.index(v, j);
            out[i] = c0 * v0[i] + c1 * v1[i];
        }
    }
}

/// Why a spherical merge has no result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SphereError {
    /// The weighted mean of the unit vectors is (nearly) zero: antipodal
    /// inputs whose weights cancel, with more than two of them.
    ZeroMean,
    /// `normalize_weights` with weights that sum to zero.
    ZeroWeightSum,
}

impl core::fmt::Display for SphereError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SphereError::ZeroMean => "the weighted mean of the inputs' directions is zero (antipodal inputs whose weights cancel); use other weights",
            SphereError::ZeroWeightSum => "the weights sum to zero, so they cannot be normalised; use other weights or `normalize_weights: false`",
        })
    }
}

/// `multislerp` (mergekit `multislerp`): the spherical barycentre of the
/// task vectors `τ_i = W_i − W_base` (the models themselves without a
/// base). With `w` the weights (divided by their sum when `normalize`),
/// `n_i = ‖τ_i‖`, `u_i = τ_i / (n_i + ε)` and `m = Σ w_i u_i`:
///
/// ```text
/// W* = W_base + (Σ w_i n_i) · m / ‖m‖
/// ```
///
/// mergekit projects the `u_i` to the tangent space at `m̂ = m / ‖m‖`,
/// averages there and maps back; the weighted tangent vectors sum to
/// `m − ⟨m, m̂⟩ m̂ = 0` exactly, so its exponential map returns `m̂` up to
/// rounding, and the closed form above is what it computes. `‖m‖ < ε`:
/// two inputs fall back to `Σ w_i τ_i` (as mergekit does), more are an
/// error. One input is returned unchanged.
///
/// # Panics
/// If the slices differ in length or `weights` is not one per model.
pub fn multislerp(
    models: &[&[f32]],
    base: Option<&[f32]>,
    weights: &[f64],
    normalize: bool,
    eps: f64,
    out: &mut [f32],
) -> Result<(), SphereError> {
    assert_eq!(models.len(), weights.len(), "one weight per model");
    if models.len() == 1 {
        out.copy_from_slice(models[0]);
        return Ok(());
    }
    let tau = |i: usize, j: usize| -> f32 { models[i][j] - base.map_or(0.0, |b| b[j]) };
    let n = out.len();
    let sum: f64 = weights.iter().sum();
    if normalize && sum == 0.0 {
        return Err(SphereError::ZeroWeightSum);
    }
    let w: Vec<f64> = weights
        .iter()
        .map(|&x| if normalize { x / sum } else { x })
        .collect();
    let norms: Vec<f64> = (0..models.len())
        .map(|i| {
            sqrt(
                (0..n)
                    .map(|j| {
                        let x = tau(i, j) as f64;
                        x * x
                    })
                    .sum::<f64>(),
            )
        })
        .collect();
    let scale: Vec<f64> = w.iter().zip(&norms).map(|(w, n)| w / (n + eps)).collect();
    let mut mean_norm = 0f64;
    for (j, o) in out.iter_mut().enumerate() {
        let m: f64 = (0..models.len()).map(|i| scale[i] * tau(i, j) as f64).sum();
        *o = m as f32;
        mean_norm += m * m;
    }
    let mean_norm = sqrt(mean_norm);
    if mean_norm < eps {
        if models.len() != 2 {
            return Err(SphereError::ZeroMean);
        }
        for (j, o) in out.iter_mut().enumerate() {
            let lerp = w[0] as f32 * tau(0, j) + w[1] as f32 * tau(1, j);
            *o = base.map_or(0.0, |b| b[j]) + lerp;
        }
        return Ok(());
    }
    let radius = w.iter().zip(&norms).map(|(w, n)| w * n).sum::<f64>();
    let factor = (radius / mean_norm) as f32;
    for (j, o) in out.iter_mut().enumerate() {
        *o = base.map_or(0.0, |b| b[j]) + factor * *o;
    }
    Ok(())
}

/// `karcher` (mergekit `karcher`): the Karcher (Riemannian) mean of the
/// tensors' directions with equal weights, scaled by their mean norm.
/// With `n_i = ‖W_i‖` and `u_i = W_i / n_i` over the inputs with
/// `n_i > tol` (none: zeros), starting from the normalised mean of those
/// `u_i`, each of at most `max_iter` steps moves the estimate `u` by
///
/// ```text
/// T = Σ_i a_i · θ_i / sin θ_i · (u_i − cos θ_i · u)    (θ_i = ∠(u, u_i); terms with θ_i < tol skipped)
/// u ← cos‖T‖ · u + sin‖T‖ · T / ‖T‖,  renormalised    (stop when ‖T‖ < tol)
/// ```
///
/// (`a_i` the equal weights over the valid inputs), and the result is
/// `(Σ_i n_i / N) · u` over all `N` inputs, zero norms included. One input
/// is returned unchanged.
///
/// # Panics
/// If the slices differ in length.
pub fn karcher(models: &[&[f32]], max_iter: usize, tol: f64, out: &mut [f32]) {
    if models.len() == 1 {
        out.copy_from_slice(models[0]);
        return;
    }
    // f64 sums of squares in a fixed order (the result depends on the tensor alone).
    let norm = |x: &[f32]| sqrt(crate::reduce::sum_squares(x));
    let norms: Vec<f64> = models.iter().map(|m| norm(m)).collect();
    let valid: Vec<usize> = (0..models.len()).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        out.fill(0.0);
        return;
    }
    let a = 1.0 / valid.len() as f64;
    // u_i[j] = models[i][j] / n_i, formed on the fly.
    let unit = |i: usize, j: usize| (models[i][j] as f64 / norms[i]) as f32;
    let u = out;
    for (j, x) in u.iter_mut().enumerate() {
        *x = valid.iter().map(|&i| a * unit(i, j) as f64).sum::<f64>() as f32;
    }
    let nu = norm(u);
    if nu < tol {
        for (j, x) in u.iter_mut().enumerate() {
            *x = unit(valid[0], j);
        }
    } else {
        u.iter_mut().for_each(|x| *x = (*x as f64 / nu) as f32);
    }
    let mut tangent = alloc::vec![0f32; u.len()];
    for _ in 0..max_iter {
        let mut terms: Vec<(usize, f64, f32)> = Vec::new();
        for &i in &valid {
            let dot: f64 = (0..u.len()).map(|j| u[j] as f64 * unit(i, j) as f64).sum();
            let dot = dot.clamp(-1.0, 1.0);
            let theta = acos(dot);
            if theta >= tol {
                terms.push((i, a * theta / sin(theta), dot as f32));
            }
        }
        for (j, x) in tangent.iter_mut().enumerate() {
            *x = terms
                .iter()
                .map(|&(i, c, dot)| c * (unit(i, j) - dot * u[j]) as f64)
                .sum::<f64>() as f32;
        }
        let nt = norm(&tangent);
        if nt < tol {
            break;
        }
        let (c, s) = (cos(nt) as f32, (sin(nt) / nt) as f32);
        for (x, t) in u.iter_mut().zip(&tangent) {
            *x = c * *x + s * t;
        }
        let nu = norm(u);
        if nu > tol {
            u.iter_mut().for_each(|x| *x = (*x as f64 / nu) as f32);
        }
    }
    let radius = (norms.iter().sum::<f64>() / models.len() as f64) as f32;
    u.iter_mut().for_each(|x| *x *= radius);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "entry {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn nuslerp_by_hand() {
        let h = core::f64::consts::FRAC_1_SQRT_2;
        let mut out = [0f32; 2];
        nuslerp(0.5, &[1.0, 0.0], &[0.0, 1.0], Lanes::flat(2), &mut out);
        close(&out, &[h, h], 1e-7);
        // θ = π/2, t = 1/4: sin(3π/8)·v₀ + sin(π/8)·v₁, norms not interpolated.
        nuslerp(0.25, &[2.0, 0.0], &[0.0, 2.0], Lanes::flat(2), &mut out);
        close(&out, &[2.0 * 0.923_879_532_5, 2.0 * 0.382_683_432_4], 1e-7);
        // Colinear: the linear interpolation.
        nuslerp(0.25, &[1.0, 2.0], &[2.0, 4.0], Lanes::flat(2), &mut out);
        close(&out, &[1.25, 2.5], 1e-7);
    }

    #[test]
    fn nuslerp_rows_and_columns_by_hand() {
        let h = core::f64::consts::FRAC_1_SQRT_2;
        let v0 = [1.0, 0.0, 1.0, 0.0];
        let v1 = [1.0, 0.0, 0.0, 1.0];
        let mut out = [0f32; 4];
        // Rows: (1,0)·(1,0) colinear; (1,0) ⟂ (0,1).
        nuslerp(0.5, &v0, &v1, Lanes::last_axis(&[2, 2]), &mut out);
        close(&out, &[1.0, 0.0, h, h], 1e-7);
        // Columns: (1,1) vs (1,0) at π/4, sin(π/8)/sin(π/4) each; (0,0) vs (0,1):
        // the zero vector normalised by 10⁻⁷ stays zero, θ = π/2.
        nuslerp(0.5, &v0, &v1, Lanes::first_axis(&[2, 2]), &mut out);
        let c = 0.382_683_432_365_089_8 / h;
        close(&out, &[2.0 * c, 0.0, c, h], 1e-7);
    }

    #[test]
    fn multislerp_by_hand() {
        let r = 3.0 * core::f64::consts::FRAC_1_SQRT_2;
        let mut out = [0f32; 2];
        // Directions (1,0), (0,1) averaged, at the mean norm (2 + 4)/2.
        multislerp(
            &[&[2.0, 0.0], &[0.0, 4.0]],
            None,
            &[1.0, 1.0],
            true,
            1e-8,
            &mut out,
        )
        .unwrap();
        close(&out, &[r, r], 1e-6);
        // The same task vectors over a base.
        multislerp(
            &[&[3.0, 1.0], &[1.0, 5.0]],
            Some(&[1.0, 1.0]),
            &[1.0, 1.0],
            true,
            1e-8,
            &mut out,
        )
        .unwrap();
        close(&out, &[1.0 + r, 1.0 + r], 1e-6);
        // Antipodal pair: mergekit's linear fallback.
        multislerp(
            &[&[1.0, 0.0], &[-1.0, 0.0]],
            None,
            &[1.0, 1.0],
            true,
            1e-8,
            &mut out,
        )
        .unwrap();
        close(&out, &[0.0, 0.0], 1e-7);
        // Three whose directions cancel: an error.
        let three: [&[f32]; 3] = [&[1.0, 0.0], &[-1.0, 0.0], &[1.0, 0.0]];
        assert_eq!(
            multislerp(&three, None, &[1.0, 2.0, 1.0], true, 1e-8, &mut out),
            Err(SphereError::ZeroMean)
        );
        assert_eq!(
            multislerp(&three, None, &[1.0, -1.0, 0.0], true, 1e-8, &mut out),
            Err(SphereError::ZeroWeightSum)
        );
    }

    /// mergekit's multislerp as its code reads (tangent space at the mean,
    /// exponential map), written out in f64: the closed form must agree.
    fn multislerp_tangent(models: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<f64> {
        let n = models[0].len();
        let sum: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|x| x / sum).collect();
        let norms: Vec<f64> = models
            .iter()
            .map(|m| m.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let units: Vec<Vec<f64>> = models
            .iter()
            .zip(&norms)
            .map(|(m, nm)| m.iter().map(|x| x / (nm + eps)).collect())
            .collect();
        let mut mean = vec![0f64; n];
        for (u, wi) in units.iter().zip(&w) {
            for (m, x) in mean.iter_mut().zip(u) {
                *m += wi * x;
            }
        }
        let mn = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        mean.iter_mut().for_each(|x| *x /= mn);
        let mut tangent = vec![0f64; n];
        for (u, wi) in units.iter().zip(&w) {
            let dot: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
            for j in 0..n {
                tangent[j] += wi * (u[j] - dot * mean[j]);
            }
        }
        let tn = tangent.iter().map(|x| x * x).sum::<f64>().sqrt() + eps;
        let radius: f64 = norms.iter().zip(&w).map(|(a, b)| a * b).sum();
        (0..n)
            .map(|j| radius * (mean[j] * tn.cos() + tangent[j] * tn.sin() / tn))
            .collect()
    }

    /// mergekit's karcher as its code reads, in f64.
    fn karcher_reference(models: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let norms: Vec<f64> = models.iter().map(|m| norm(m)).collect();
        let valid: Vec<usize> = (0..models.len()).filter(|&i| norms[i] > tol).collect();
        let units: Vec<Vec<f64>> = valid
            .iter()
            .map(|&i| models[i].iter().map(|x| x / norms[i]).collect())
            .collect();
        let a = 1.0 / valid.len() as f64;
        let n = models[0].len();
        let mut u = vec![0f64; n];
        for ui in &units {
            for j in 0..n {
                u[j] += a * ui[j];
            }
        }
        let nu = norm(&u);
        u.iter_mut().for_each(|x| *x /= nu);
        for _ in 0..max_iter {
            let mut t = vec![0f64; n];
            for ui in &units {
                let dot = u
                    .iter()
                    .zip(ui)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    .clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                for j in 0..n {
                    t[j] += a * theta / theta.sin() * (ui[j] - dot * u[j]);
                }
            }
            let nt = norm(&t);
            if nt < tol {
                break;
            }
            for j in 0..n {
                u[j] = nt.cos() * u[j] + nt.sin() * t[j] / nt;
            }
            let nu = norm(&u);
            u.iter_mut().for_each(|x| *x /= nu);
        }
        let s = norms.iter().sum::<f64>() / models.len() as f64;
        u.iter().map(|x| s * x).collect()
    }

    #[test]
    fn karcher_by_hand() {
        let r = 3.0 * core::f64::consts::FRAC_1_SQRT_2;
        let mut out = [0f32; 2];
        karcher(&[&[2.0, 0.0], &[0.0, 4.0]], 10, 1e-5, &mut out);
        close(&out, &[r, r], 1e-6);
        // e₁, e₁, e₂: the point at angle φ from e₁ minimising 2φ² + (π/2 − φ)², φ = π/6.
        let mut out = [0f32; 3];
        karcher(
            &[&[1.0, 0.0, 0.0], &[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]],
            10,
            1e-5,
            &mut out,
        );
        close(&out, &[0.75f64.sqrt(), 0.5, 0.0], 1e-5);
        // No input with a norm above tol: zeros.
        let mut out = [1f32; 2];
        karcher(&[&[0.0, 0.0], &[0.0, 0.0]], 10, 1e-5, &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }

    fn models(count: usize, len: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
        proptest::collection::vec(proptest::collection::vec(-2.0f32..2.0, len), count)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn nuslerp_ends_and_identical_inputs(v in models(2, 12), t in 0.0f64..1.0) {
            let mut out = vec![0f32; 12];
            for lanes in [Lanes::flat(12), Lanes::last_axis(&[3, 4]), Lanes::first_axis(&[3, 4])] {
                nuslerp(0.0, &v[0], &v[1], lanes, &mut out);
                prop_assert_eq!(&out, &v[0]);
                nuslerp(1.0, &v[0], &v[1], lanes, &mut out);
                prop_assert_eq!(&out, &v[1]);
                nuslerp(t, &v[0], &v[0], lanes, &mut out);
                for (o, x) in out.iter().zip(&v[0]) {
                    prop_assert!((o - x).abs() <= 1e-6 * (1.0 + x.abs()));
                }
            }
        }

        #[test]
        fn multislerp_is_the_tangent_space_barycentre(
            m in models(3, 9),
            w in proptest::collection::vec(0.1f64..2.0, 3),
        ) {
            let mut out = vec![0f32; 9];
            let slices: Vec<&[f32]> = m.iter().map(Vec::as_slice).collect();
            multislerp(&slices, None, &w, true, 1e-8, &mut out).unwrap();
            let wide: Vec<Vec<f64>> = m.iter().map(|v| v.iter().map(|x| *x as f64).collect()).collect();
            close(&out, &multislerp_tangent(&wide, &w, 1e-8), 1e-5);
        }

        #[test]
        fn multislerp_of_identical_models_is_the_model(
            m in models(2, 9),
            w in proptest::collection::vec(0.1f64..2.0, 3),
        ) {
            let mut out = vec![0f32; 9];
            let copies: [&[f32]; 3] = [&m[0], &m[0], &m[0]];
            multislerp(&copies, Some(&m[1]), &w, true, 1e-8, &mut out).unwrap();
            let want: Vec<f64> = m[0].iter().map(|x| *x as f64).collect();
            close(&out, &want, 1e-5);
        }

        #[test]
        fn karcher_follows_the_reference_and_keeps_one_point(m in models(3, 7)) {
            let mut out = vec![0f32; 7];
            let slices: Vec<&[f32]> = m.iter().map(Vec::as_slice).collect();
            karcher(&slices, 10, 1e-5, &mut out);
            let wide: Vec<Vec<f64>> = m.iter().map(|v| v.iter().map(|x| *x as f64).collect()).collect();
            close(&out, &karcher_reference(&wide, 10, 1e-5), 1e-4);
            // One point, and the same point three times, give it back.
            karcher(&slices[..1], 10, 1e-5, &mut out);
            prop_assert_eq!(&out, &m[0]);
            karcher(&[&m[0], &m[0], &m[0]], 10, 1e-5, &mut out);
            close(&out, &wide[0], 1e-5);
        }
    }
}
