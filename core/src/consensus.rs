//! Element-selecting merges over a base with mergekit's observable
//! semantics (SPEC §3: the baselines follow mergekit; SPEC defines none of
//! these, so the choices are written down here): `sce` (select by variance,
//! weigh by energy, erase sign conflicts), `ram` / `ramplus_tl`
//! (Reinforced Agent Merging: an entry changed by one model keeps that
//! change, one changed by several takes their mean) and `arcee_fusion`
//! (keep the other model's change where it is important by KL divergence).
//! Plain functions on whole tensors, f64 reductions in a fixed order and
//! exact selections, so the result depends on the inputs alone.

use crate::select::kth_largest;
use alloc::vec::Vec;
use libm::log;

/// `sce` (mergekit `sce`) on task vectors `τ_k = W_k − W_base`:
///
/// 1. select (when `select_topk < 1`): per element the population variance
///    of the `τ_k` across models; the `⌊select_topk · nonzero⌋` elements of
///    largest variance (`nonzero`: elements whose variance is not 0; ties
///    by lower index) are kept in every `τ_k`, the others zeroed;
///    `select_topk ≤ 0` keeps nothing;
/// 2. weigh: `w_k = mean(τ_k²) / Σ_j mean(τ_j²)` (all `1/N` when that sum
///    is below 10⁻⁶);
/// 3. erase: the TIES sign of `Σ_k τ_k` (a zero sum votes +); entries of
///    the other sign, and zeros, do not count;
///
/// `W* = W_base + Σ_k w_k m_k τ_k / max(Σ_k w_k m_k, 10⁻⁶)`. `taus` are
/// modified (the selection). Returns the number of elements selected.
///
/// # Panics
/// If the slices differ in length.
pub fn sce(base: &[f32], taus: &mut [&mut [f32]], select_topk: f64, out: &mut [f32]) -> usize {
    let n = base.len();
    let mut selected = n;
    if select_topk < 1.0 {
        let var: Vec<f32> = (0..n)
            .map(|j| {
                let count = taus.len() as f64;
                let mean = taus.iter().map(|t| t[j] as f64).sum::<f64>() / count;
                (taus
                    .iter()
                    .map(|t| {
                        let d = t[j] as f64 - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / count) as f32
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let k = if select_topk <= 0.0 {
            0
        } else {
            libm::floor(nonzero as f64 * select_topk) as usize
        };
        let keep = top_k_mask(&var, k);
        for t in taus.iter_mut() {
            for (x, &kept) in t.iter_mut().zip(&keep) {
                if !kept {
                    *x = 0.0;
                }
            }
        }
        selected = k;
    }
    let energy: Vec<f64> = taus
        .iter()
        .map(|t| crate::reduce::sum_squares(t) / n.max(1) as f64)
        .collect();
    let total: f64 = energy.iter().sum();
    let weights: Vec<f32> = if total.abs() < 1e-6 {
        alloc::vec![1.0 / taus.len() as f32; taus.len()]
    } else {
        energy.iter().map(|e| (e / total) as f32).collect()
    };
    for (j, o) in out.iter_mut().enumerate() {
        let vote: f32 = taus.iter().map(|t| t[j]).sum();
        let sign = if vote >= 0.0 { 1.0 } else { -1.0 };
        let (mut num, mut den) = (0f32, 0f32);
        for (t, &w) in taus.iter().zip(&weights) {
            let x = t[j];
            if x != 0.0 && x.signum() == sign {
                num += w * x;
                den += w;
            }
        }
        *o = base[j] + num / den.max(1e-6);
    }
    selected
}

/// The mask of the `k` largest values of `values` (all non-negative),
/// ties at the threshold by lower index.
fn top_k_mask(values: &[f32], k: usize) -> Vec<bool> {
    if k == 0 {
        return alloc::vec![false; values.len()];
    }
    let threshold = kth_largest(values, k);
    let above = values.iter().filter(|v| **v > threshold).count();
    let mut ties = k.saturating_sub(above);
    values
        .iter()
        .map(|&v| {
            if v > threshold {
                true
            } else if v == threshold && ties > 0 {
                ties -= 1;
                true
            } else {
                false
            }
        })
        .collect()
}

/// `ramplus_tl`'s rescale of the entries only one model changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RamPlus {
    /// `r`: the strength of the rescale.
    pub r: f64,
    /// `alpha`: the cap on the overlap ratio.
    pub alpha: f64,
}

/// `ram` and `ramplus_tl` (mergekit's Reinforced Agent Merging, tensor
/// local). An entry of `τ_k = W_k − W_base` counts when `|τ_k| > ε`;
/// per element, with `c` the number of models whose entry counts:
///
/// ```text
/// c = 0: W_base;  c = 1: W_base + λ_k τ_k (the one model k);  c > 1: W_base + Σ_{counting k} τ_k / c
/// ```
///
/// `λ_k = 1` for `ram`; for `ramplus_tl`, `λ_k = 1 + r · clamp(ρ_k, 0, α)`
/// with `ρ_k = shared_k / max(unique_k, ε)`, the counts of model `k`'s
/// counting entries that other models share (`c > 1`) and that are its
/// alone (`c = 1`). Returns the `λ_k`.
///
/// # Panics
/// If the slices differ in length.
pub fn ram(
    base: &[f32],
    models: &[&[f32]],
    epsilon: f32,
    plus: Option<RamPlus>,
    out: &mut [f32],
) -> Vec<f64> {
    let counts = |j: usize| {
        models
            .iter()
            .filter(|m| (m[j] - base[j]).abs() > epsilon)
            .count()
    };
    let lambdas: Vec<f64> = match plus {
        None => alloc::vec![1.0; models.len()],
        Some(RamPlus { r, alpha }) => {
            let (mut shared, mut unique) = (
                alloc::vec![0u64; models.len()],
                alloc::vec![0u64; models.len()],
            );
            for j in 0..base.len() {
                let c = counts(j);
                for (k, m) in models.iter().enumerate() {
                    if (m[j] - base[j]).abs() > epsilon {
                        if c > 1 {
                            shared[k] += 1;
                        } else {
                            unique[k] += 1;
                        }
                    }
                }
            }
            shared
                .iter()
                .zip(&unique)
                .map(|(&s, &u)| {
                    let rho = s as f64 / (u as f64).max(epsilon as f64);
                    1.0 + r * rho.clamp(0.0, alpha)
                })
                .collect()
        }
    };
    let factors: Vec<f32> = lambdas.iter().map(|l| *l as f32).collect();
    for (j, o) in out.iter_mut().enumerate() {
        let c = counts(j);
        let mut merged = 0f32;
        for (m, &lambda) in models.iter().zip(&factors) {
            let tau = m[j] - base[j];
            if tau.abs() > epsilon {
                merged += if c == 1 { tau * lambda } else { tau / c as f32 };
            }
        }
        *o = base[j] + merged;
    }
    lambdas
}

/// The row length `arcee_fusion`'s softmax runs over: the last axis (the
/// whole tensor when it has fewer than two axes).
pub fn last_axis_len(shape: &[usize]) -> usize {
    match shape {
        [] => 1,
        [n] => *n,
        [.., last] => *last,
    }
}

/// `arcee_fusion` (mergekit `arcee_fusion`): the other model's change
/// `δ = W − W_base` kept where it is important. Per row (`cols` entries),
/// `p = softmax(W_row) + 10⁻⁸`, `q = softmax(W_base,row) + 10⁻⁸`, and
/// each entry's importance is `|δ| · Σ_row p log(p / q)`; the threshold is
/// `median + 1.5 · (Q₃ − Q₁)` of all importances (quantile `q` = the
/// sorted value at index `⌊q · (n − 1)⌋`, over every element: mergekit
/// samples 10⁶ of them at random above that size), and
/// `W* = W_base + δ · [importance ≥ threshold]`. Returns the number of
/// entries kept and the threshold.
///
/// # Panics
/// If the slices differ in length or `cols` does not divide it.
pub fn arcee_fusion(base: &[f32], other: &[f32], cols: usize, out: &mut [f32]) -> (usize, f32) {
    let n = base.len();
    if n == 0 {
        return (0, 0.0);
    }
    let cols = cols.max(1);
    assert_eq!(n % cols, 0, "rows of `cols` entries");
    let mut importance = alloc::vec![0f32; n];
    let softmax = |row: &[f32], p: &mut Vec<f64>| {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(*x as f64));
        p.clear();
        p.extend(row.iter().map(|x| libm::exp(*x as f64 - max)));
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x = *x / sum + 1e-8);
    };
    let (mut p, mut q) = (Vec::new(), Vec::new());
    for ((w, b), imp) in other
        .chunks(cols)
        .zip(base.chunks(cols))
        .zip(importance.chunks_mut(cols))
    {
        softmax(w, &mut p);
        softmax(b, &mut q);
        let kl: f64 = p.iter().zip(&q).map(|(p, q)| p * log(p / q)).sum();
        for ((i, x), y) in imp.iter_mut().zip(w).zip(b) {
            *i = ((x - y).abs() as f64 * kl) as f32;
        }
    }
    let mut sorted = importance.clone();
    let mut quantile = |q: f64| {
        let index = libm::floor(q * (n - 1) as f64) as usize;
        *sorted
            .select_nth_unstable_by(index, |a, b| a.total_cmp(b))
            .1
    };
    let (q1, median, q3) = (quantile(0.25), quantile(0.5), quantile(0.75));
    let threshold = median + 1.5 * (q3 - q1);
    let mut kept = 0;
    for (((o, &b), &w), &imp) in out.iter_mut().zip(base).zip(other).zip(&importance) {
        let delta = w - b;
        *o = if imp >= threshold {
            kept += 1;
            b + delta
        } else {
            b + delta * 0.0
        };
    }
    (kept, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn sce_of(base: &[f32], taus: &[Vec<f32>], k: f64) -> Vec<f32> {
        let mut taus = taus.to_vec();
        let mut slices: Vec<&mut [f32]> = taus.iter_mut().map(Vec::as_mut_slice).collect();
        let mut out = vec![0f32; base.len()];
        sce(base, &mut slices, k, &mut out);
        out
    }

    #[test]
    fn sce_by_hand() {
        let base = [0.5f32; 4];
        let taus = vec![vec![1.0, -2.0, 3.0, 0.0], vec![1.0, 2.0, -1.0, 0.0]];
        // Energies 14/4 and 6/4: w = 0.7, 0.3. Votes: +, + (a zero sum), +, +.
        // 0: (0.7 + 0.3)/1; 1: only B agrees, 0.3·2/0.3; 2: only A, 0.7·3/0.7; 3: nothing.
        let out = sce_of(&base, &taus, 1.0);
        assert_eq!(out, [1.5, 2.5, 3.5, 0.5]);
        // select_topk 0.5: variances 0, 4, 4, 0; two non-zero, ⌊2·0.5⌋ = 1 kept,
        // the tie at 4 by the lower index: element 1 only. Energies 1, 1.
        let out = sce_of(&base, &taus, 0.5);
        assert_eq!(out, [0.5, 2.5, 0.5, 0.5]);
        // select_topk 0 keeps nothing.
        assert_eq!(sce_of(&base, &taus, 0.0), base);
    }

    #[test]
    fn ram_by_hand() {
        let base = [0.0f32; 4];
        let a = [1.0f32, 2.0, 0.0, 1e-6];
        let b = [3.0f32, 0.0, 0.0, 1e-6];
        let mut out = [0f32; 4];
        // 0: both change it, (1 + 3)/2; 1: A alone; 2: neither; 3: below ε.
        let lambdas = ram(&base, &[&a, &b], 1e-5, None, &mut out);
        assert_eq!(out, [2.0, 2.0, 0.0, 0.0]);
        assert_eq!(lambdas, [1.0, 1.0]);
        // RAM+: A shares 1 and owns 1 (ρ = 1), B shares 1 and owns none (ρ = 1/ε):
        // λ_A = 1 + 1·min(1, 5) = 2, λ_B = 1 + 1·5 = 6.
        let lambdas = ram(
            &base,
            &[&a, &b],
            1e-5,
            Some(RamPlus { r: 1.0, alpha: 5.0 }),
            &mut out,
        );
        assert_eq!(lambdas, [2.0, 6.0]);
        assert_eq!(out, [2.0, 4.0, 0.0, 0.0]);
        // mergekit's defaults r = 0.1, α = 0.2: both capped, λ = 1.02.
        let lambdas = ram(
            &base,
            &[&a, &b],
            1e-5,
            Some(RamPlus { r: 0.1, alpha: 0.2 }),
            &mut out,
        );
        assert!(lambdas.iter().all(|l| (l - 1.02).abs() < 1e-12));
    }

    #[test]
    fn arcee_fusion_by_hand() {
        let base = [0f32; 8];
        let w = [1.0f32, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.1];
        // Row KLs against the uniform q: ln 2 − H(σ(x)): x = 1: 0.11094, x = 2:
        // 0.32782, x = 0: 0, x = 0.1: 0.0012479. Importances, sorted:
        // 0 ×5, 1.25e-4, 0.11094, 0.65564; Q₁ = s[1] = 0, median = s[3] = 0,
        // Q₃ = s[5] = 1.25e-4: threshold 1.87e-4 keeps the first two changes.
        let mut out = [0f32; 8];
        let (kept, threshold) = arcee_fusion(&base, &w, 2, &mut out);
        assert_eq!(out, [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            kept, 2,
            "the two entries whose importance passes the threshold"
        );
        let sigma = 1.0 / (1.0 + (-0.1f64).exp());
        let kl = (2.0f64).ln() + sigma * sigma.ln() + (1.0 - sigma) * (1.0 - sigma).ln();
        assert!(
            (threshold as f64 - 1.5 * 0.1 * kl).abs() < 1e-8,
            "{threshold}"
        );
    }

    fn vectors(count: usize, len: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
        proptest::collection::vec(proptest::collection::vec(-2.0f32..2.0, len), count)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn sce_stays_within_the_task_vectors(m in vectors(4, 16), k in 0.0f64..1.0) {
            let base = &m[0];
            let taus: Vec<Vec<f32>> = m[1..].iter().map(|w| w.iter().zip(base).map(|(x, b)| x - b).collect()).collect();
            let out = sce_of(base, &taus, k);
            for j in 0..16 {
                let largest = taus.iter().map(|t| t[j].abs()).fold(0f32, f32::max);
                prop_assert!((out[j] - base[j]).abs() <= largest * (1.0 + 1e-5) + 1e-6);
            }
            // One model over the base, nothing deselected: the model.
            let one = sce_of(base, &taus[..1], 1.0);
            for (o, w) in one.iter().zip(&m[1]) {
                prop_assert!((o - w).abs() <= 1e-6 * (1.0 + w.abs()));
            }
        }

        #[test]
        fn ramplus_with_r_zero_is_ram(m in vectors(4, 16)) {
            let slices: Vec<&[f32]> = m[1..].iter().map(Vec::as_slice).collect();
            let (mut a, mut b) = (vec![0f32; 16], vec![0f32; 16]);
            ram(&m[0], &slices, 1e-5, None, &mut a);
            ram(&m[0], &slices, 1e-5, Some(RamPlus { r: 0.0, alpha: 0.2 }), &mut b);
            prop_assert_eq!(&a, &b);
            // Identical models: each entry the mean of equal changes, the model.
            ram(&m[0], &[&m[1], &m[1], &m[1]], 1e-5, None, &mut a);
            for ((o, w), base) in a.iter().zip(&m[1]).zip(&m[0]) {
                let want = if (w - base).abs() > 1e-5 { *w } else { *base };
                prop_assert!((o - want).abs() <= 1e-6 * (1.0 + want.abs()));
            }
        }

        #[test]
        fn arcee_fusion_takes_each_entry_from_one_side(m in vectors(2, 24)) {
            let mut out = vec![0f32; 24];
            arcee_fusion(&m[0], &m[1], 6, &mut out);
            for j in 0..24 {
                prop_assert!(out[j] == m[0][j] || out[j] == m[0][j] + (m[1][j] - m[0][j]));
            }
            // A model fused with itself is itself.
            arcee_fusion(&m[1], &m[1], 6, &mut out);
            prop_assert_eq!(&out, &m[1]);
        }
    }
}
