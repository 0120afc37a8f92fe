//! Baseline methods (SPEC §3) with mergekit's observable semantics, as
//! plain functions on slices: linear combination, magnitude trimming to an
//! exact count, DARE's counter-based random masks and L1 rescale, the TIES
//! sign vote.
//!
//! All sparsification is per tensor; the streaming engine splits tensors
//! into chunks and these kernels are written so that any split gives the
//! same bits (counts and prefix counts are integers; norms are summed per
//! chunk in f64 and the chunk sums added in chunk order).

use crate::simd::multiversion;

use crate::select::{RadixSelect, RADIX_BUCKETS};

/// `Σ w_k x_k`, then divided by `Σ w_k` when `normalize` (a zero sum is
/// left undivided), element by element; the sum runs over `k` in order.
pub fn linear_combine(inputs: &[&[f32]], weights: &[f32], normalize: bool, out: &mut [f32]) {
    assert_eq!(
        inputs.len(),
        weights.len(),
        "linear_combine: one weight per input"
    );
    assert!(
        inputs.iter().all(|x| x.len() == out.len()),
        "linear_combine: sizes"
    );
    let total: f32 = weights.iter().sum();
    let divisor = if normalize && total != 0.0 {
        total
    } else {
        1.0
    };
    linear_combine_isa(crate::simd::selected(), inputs, weights, divisor, out)
}

multiversion!(fn linear_combine_isa = linear_combine_body(inputs: &[&[f32]], weights: &[f32], divisor: f32, out: &mut [f32]));

/// Inputs in the outer loop so the inner one vectorises; each element still
/// sums `0 + w₀x₀ + w₁x₁ + …` in input order.
#[inline(always)]
fn linear_combine_body(inputs: &[&[f32]], weights: &[f32], divisor: f32, out: &mut [f32]) {
    out.fill(0.0);
    for (x, &w) in inputs.iter().zip(weights) {
        for (o, &v) in out.iter_mut().zip(x.iter()) {
            *o += w * v;
        }
    }
    for o in out.iter_mut() {
        *o /= divisor;
    }
}

/// How many entries TIES trimming keeps (SPEC §3): `⌊density·n + 10⁻⁶⌋`,
/// at most `n`.
pub fn trim_count(density: f64, n: usize) -> usize {
    let k = libm::floor(density * n as f64 + 1e-6);
    if k.is_nan() || k <= 0.0 {
        0
    } else if k >= n as f64 {
        n
    } else {
        k as usize
    }
}

/// The ordering key of a magnitude: the bits of `|x|` (NaN counts as 0).
#[inline]
pub fn magnitude_key(x: f32) -> u32 {
    let a = x.abs();
    if a > 0.0 {
        a.to_bits()
    } else {
        0
    }
}

/// The exact top-`k` of a tensor by magnitude, ties at the boundary broken
/// by lower index first: keep entry `i` when its key is above `threshold`,
/// or equal to it and fewer than `ties_kept` equal entries precede it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopK {
    /// The `k`-th largest magnitude key.
    pub threshold: u32,
    /// How many entries equal to the threshold are kept (the first ones by index).
    pub ties_kept: u64,
    /// `k == 0`: nothing is kept.
    pub empty: bool,
}

impl TopK {
    /// Keeps nothing.
    pub const NONE: TopK = TopK {
        threshold: u32::MAX,
        ties_kept: 0,
        empty: true,
    };

    /// Finds the top-`k` over `chunks` (the whole tensor, split any way, in
    /// index order); each chunk is visited four times.
    pub fn find<'a, I>(chunks: I, k: usize) -> TopK
    where
        I: Iterator<Item = &'a [f32]> + Clone,
    {
        if k == 0 {
            return TopK::NONE;
        }
        let mut select = RadixSelect::new(k);
        while !select.is_done() {
            let mut hist = [0u64; RADIX_BUCKETS];
            for c in chunks.clone() {
                select.count_keys(c.iter().map(|&x| magnitude_key(x)), &mut hist);
            }
            select.advance(&hist);
        }
        TopK::from_threshold(
            select.key(),
            chunks.map(|c| count_above(c, select.key())).sum(),
            k,
        )
    }

    /// The top-`k` given its threshold key and the number of entries strictly
    /// above it (for callers that count in parallel).
    pub fn from_threshold(threshold: u32, above: u64, k: usize) -> TopK {
        TopK {
            threshold,
            ties_kept: (k as u64).saturating_sub(above),
            empty: k == 0,
        }
    }

    /// Whether an entry with magnitude key `key` is in the top-`k`, where
    /// `tie_rank` (1-based) counts the entries equal to the threshold up to
    /// and including this one, in index order.
    #[inline]
    pub fn contains(&self, key: u32, tie_rank: u64) -> bool {
        !self.empty
            && (key > self.threshold || (key == self.threshold && tie_rank <= self.ties_kept))
    }

    /// Zeroes the entries of a chunk that are not in the top-`k` and returns
    /// the number of threshold ties in the chunk; `ties_before` counts the
    /// ties in earlier chunks.
    pub fn apply(&self, values: &mut [f32], ties_before: u64) -> u64 {
        keep_rank_window(values, self, None, (ties_before, 0)).0
    }
}

/// Keeps the entries of a chunk whose descending rank (magnitude, ties by
/// lower index) is in `top` but not in `skip` — the top-`k` when `skip` is
/// `None`, a window of ranks `[a, b)` with `top` = top-`b` and `skip` =
/// top-`a` — and zeroes the rest. `ties_before` counts, for `top` and
/// `skip`, the threshold ties in earlier chunks; the counts for this chunk
/// are returned.
pub fn keep_rank_window(
    values: &mut [f32],
    top: &TopK,
    skip: Option<&TopK>,
    ties_before: (u64, u64),
) -> (u64, u64) {
    let ties_top = if top.empty {
        0
    } else {
        count_equal(values, top.threshold)
    };
    let ties_skip = skip.map_or(0, |s| count_equal(values, s.threshold));
    // When every tie of this chunk falls on the same side of each cut, the
    // decision is per element and the loop vectorises; otherwise ties are
    // ranked one by one.
    let uniform = |t: &TopK, before: u64, here: u64| -> Option<bool> {
        if before + here <= t.ties_kept {
            Some(true)
        } else if before >= t.ties_kept {
            Some(false)
        } else {
            None
        }
    };
    let top_ties = uniform(top, ties_before.0, ties_top);
    let skip_ties = skip.map(|s| uniform(s, ties_before.1, ties_skip));
    match (top_ties, skip_ties) {
        (Some(top_tie), None) if !top.empty => keep_above(
            crate::simd::selected(),
            values,
            top.threshold,
            top_tie,
            u32::MAX,
            false,
        ),
        (Some(top_tie), Some(Some(skip_tie))) if !top.empty => {
            let skip = skip.map_or(u32::MAX, |s| s.threshold);
            keep_above(
                crate::simd::selected(),
                values,
                top.threshold,
                top_tie,
                skip,
                !skip_tie,
            )
        }
        _ => rank_ties_one_by_one(values, top, skip, ties_before),
    }
    (ties_top, ties_skip)
}

multiversion!(fn keep_above = keep_above_body(values: &mut [f32], top: u32, top_tie: bool, skip: u32, skip_tie: bool));

/// Keeps entries whose key is above `top` (or equal, when `top_tie`) and
/// below `skip` (or equal, when `skip_tie`); zeroes the rest.
#[inline(always)]
fn keep_above_body(values: &mut [f32], top: u32, top_tie: bool, skip: u32, skip_tie: bool) {
    for x in values.iter_mut() {
        let key = magnitude_key(*x);
        let in_top = key > top || (top_tie && key == top);
        let below_skip = key < skip || (skip_tie && key == skip);
        if !(in_top && below_skip) {
            *x = 0.0;
        }
    }
}

fn rank_ties_one_by_one(
    values: &mut [f32],
    top: &TopK,
    skip: Option<&TopK>,
    ties_before: (u64, u64),
) {
    let (mut ties_top, mut ties_skip) = (0u64, 0u64);
    for x in values.iter_mut() {
        let key = magnitude_key(*x);
        if key == top.threshold {
            ties_top += 1;
        }
        let mut keep = top.contains(key, ties_before.0 + ties_top);
        if let Some(skip) = skip {
            if key == skip.threshold {
                ties_skip += 1;
            }
            keep &= !skip.contains(key, ties_before.1 + ties_skip);
        }
        if !keep {
            *x = 0.0;
        }
    }
}

/// The ranks breadcrumbs keeps (mergekit 0.1.5): of `n` entries sorted by
/// magnitude, drop the `⌊γ·n⌋` largest and as many of the smallest as leave
/// `⌊density·n⌋`; returns `(a, b)`: keep descending ranks `[a, b)`.
pub fn breadcrumbs_window(density: f64, gamma: f64, n: usize) -> (usize, usize) {
    let target = libm::floor(density * n as f64 + 1e-6).clamp(0.0, n as f64) as usize;
    let top = libm::floor(gamma * n as f64 + 1e-6).clamp(0.0, n as f64) as usize;
    let bottom = n.saturating_sub(target + top);
    let skip = n - bottom - target.min(n - bottom);
    (skip, skip + target.min(n - bottom))
}

/// Entries of `chunk` whose magnitude key is above `threshold`.
pub fn count_above(chunk: &[f32], threshold: u32) -> u64 {
    count_above_isa(crate::simd::selected(), chunk, threshold)
}

/// Entries of `chunk` whose magnitude key equals `threshold`.
pub fn count_equal(chunk: &[f32], threshold: u32) -> u64 {
    count_equal_isa(crate::simd::selected(), chunk, threshold)
}

multiversion!(fn count_above_isa = count_above_body(chunk: &[f32], threshold: u32) -> u64);
multiversion!(fn count_equal_isa = count_equal_body(chunk: &[f32], threshold: u32) -> u64);

#[inline(always)]
fn count_above_body(chunk: &[f32], threshold: u32) -> u64 {
    chunk
        .iter()
        .map(|&x| u64::from(magnitude_key(x) > threshold))
        .sum()
}

#[inline(always)]
fn count_equal_body(chunk: &[f32], threshold: u32) -> u64 {
    chunk
        .iter()
        .map(|&x| u64::from(magnitude_key(x) == threshold))
        .sum()
}

/// FNV-1a, 64-bit (offset basis 0xCBF29CE484222325, prime 0x100000001B3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The key of DARE's random stream for contributor `k` (0-based among the
/// contributors) on tensor `name` under `seed` (SPEC §3): FNV-1a-64 of
/// `"{seed}:{k}:{name}"`.
pub fn dare_stream(seed: u64, k: usize, name: &str) -> u64 {
    fnv1a64(alloc::format!("{seed}:{k}:{name}").as_bytes())
}

/// Whether DARE keeps flat element `i` of a tensor whose stream key is
/// `key` (SPEC §3): a splitmix64 finaliser of `key + (i + 1)·φ`, its top 53
/// bits as a uniform number compared with `density` in f64. The result
/// depends on nothing but `(key, i, density)`.
#[inline]
pub fn dare_keep(key: u64, i: u64, density: f64) -> bool {
    let mut z = key.wrapping_add((i.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < density
}

/// DARE's drop on a chunk starting at flat index `start`: kept entries are
/// copied into `out`, dropped ones zeroed. Returns `(‖τ‖₁, ‖τ_kept‖₁)` of
/// the chunk in f64, for the rescale (see [`dare_drop_in_place`]).
pub fn dare_drop(tau: &[f32], key: u64, start: u64, density: f64, out: &mut [f32]) -> (f64, f64) {
    assert_eq!(tau.len(), out.len(), "dare_drop: sizes");
    out.copy_from_slice(tau);
    dare_drop_in_place(out, key, start, density)
}

/// [`dare_drop`] in place. The norms are summed in eight interleaved f64
/// lanes (element `i` of the chunk in lane `i mod 8`), then the lanes in
/// order: a fixed order, so the result depends on the chunk alone, and
/// one that vectorises.
pub fn dare_drop_in_place(tau: &mut [f32], key: u64, start: u64, density: f64) -> (f64, f64) {
    dare_drop_isa(crate::simd::selected(), tau, key, start, density)
}

multiversion!(fn dare_drop_isa = dare_drop_body(tau: &mut [f32], key: u64, start: u64, density: f64) -> (f64, f64));

#[inline(always)]
fn dare_drop_body(tau: &mut [f32], key: u64, start: u64, density: f64) -> (f64, f64) {
    const LANES: usize = 8;
    let (mut all, mut kept) = ([0f64; LANES], [0f64; LANES]);
    let mut visit = |lane: usize, i: u64, t: &mut f32| {
        let a = t.abs() as f64;
        let keep = dare_keep(key, i, density);
        all[lane] += a;
        kept[lane] += if keep { a } else { 0.0 };
        *t = if keep { *t } else { 0.0 };
    };
    let mut blocks = tau.chunks_exact_mut(LANES);
    let mut index = start;
    for block in &mut blocks {
        for (lane, t) in block.iter_mut().enumerate() {
            visit(lane, index + lane as u64, t);
        }
        index += LANES as u64;
    }
    for (lane, t) in blocks.into_remainder().iter_mut().enumerate() {
        visit(lane, index + lane as u64, t);
    }
    let total = |lanes: [f64; LANES]| lanes.iter().fold(0.0, |acc, x| acc + x);
    (total(all), total(kept))
}

/// DARE's rescale factor `‖τ‖₁ / ‖τ_kept‖₁`, or 1 when either norm is
/// below 1e-7 (SPEC §3).
pub fn dare_rescale(l1_all: f64, l1_kept: f64) -> f32 {
    if l1_all < 1e-7 || l1_kept < 1e-7 {
        1.0
    } else {
        (l1_all / l1_kept) as f32
    }
}

/// The TIES sign vote on one element (SPEC §3). `weighted[k] = w_k·τ_k^trim`:
/// the elected sign is `+1` when `Σ_k weighted[k] ≥ 0`, else `−1`; entries
/// of that sign agree (zeros never do). Returns `Σ agreeing weighted`,
/// divided by `Σ agreeing w_k` (a zero replaced by 1) when `normalize`.
#[inline]
pub fn ties_vote(weighted: &[f32], weights: &[f32], normalize: bool) -> f32 {
    let sum: f32 = weighted.iter().sum();
    let positive = sum >= 0.0;
    let (mut merged, mut divisor) = (0.0f32, 0.0f32);
    for (&t, &w) in weighted.iter().zip(weights) {
        let agrees = if positive { t > 0.0 } else { t < 0.0 };
        if agrees {
            merged += t;
            divisor += w;
        }
    }
    if normalize {
        merged / if divisor == 0.0 { 1.0 } else { divisor }
    } else {
        merged
    }
}

/// mergekit's generalized task arithmetic on a run of elements:
/// `out = base + λ·mix`, where `mix` is the TIES vote of
/// `weighted_k = w_k·τ_k` (`consensus`, [`ties_vote`]) or their sum,
/// divided by `Σ w_k` (a sum below 10⁻⁸ in magnitude replaced by 1) when
/// `normalize`. `scratch` is reused between calls.
#[allow(clippy::too_many_arguments)]
pub fn task_arithmetic_combine(
    base: &[f32],
    taus: &[&[f32]],
    weights: &[f32],
    consensus: bool,
    normalize: bool,
    lambda: f32,
    scratch: &mut alloc::vec::Vec<f32>,
    out: &mut [f32],
) {
    assert_eq!(taus.len(), weights.len(), "one weight per task vector");
    assert!(
        base.len() == out.len() && taus.iter().all(|t| t.len() == out.len()),
        "task_arithmetic_combine: sizes"
    );
    scratch.resize(2 * out.len(), 0.0);
    let (merged, divisor) = scratch.split_at_mut(out.len());
    combine_isa(
        crate::simd::selected(),
        base,
        taus,
        weights,
        consensus,
        normalize,
        lambda,
        merged,
        divisor,
        out,
    )
}

multiversion!(fn combine_isa = combine_body(base: &[f32], taus: &[&[f32]], weights: &[f32], consensus: bool, normalize: bool, lambda: f32, merged: &mut [f32], divisor: &mut [f32], out: &mut [f32]));

/// [`ties_vote`] and the weighted sum with the task vectors in the outer
/// loop, so the inner loops vectorise. Per element the arithmetic is
/// [`ties_vote`]'s, in the same order: adding `+0` for an entry that does
/// not agree leaves every partial sum's bits as they were, since those
/// sums start at `+0` and are never `−0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_body(
    base: &[f32],
    taus: &[&[f32]],
    weights: &[f32],
    consensus: bool,
    normalize: bool,
    lambda: f32,
    merged: &mut [f32],
    divisor: &mut [f32],
    out: &mut [f32],
) {
    // `out` holds Σ_k w_k·τ_k first, from −0 as `Iterator::sum` starts.
    out.fill(-0.0);
    for (tau, &w) in taus.iter().zip(weights) {
        for (o, &t) in out.iter_mut().zip(tau.iter()) {
            *o += w * t;
        }
    }
    if consensus {
        merged.fill(0.0);
        divisor.fill(0.0);
        for (tau, &w) in taus.iter().zip(weights) {
            for (((m, d), &sum), &t) in merged
                .iter_mut()
                .zip(divisor.iter_mut())
                .zip(out.iter())
                .zip(tau.iter())
            {
                let weighted = w * t;
                let agrees = if sum >= 0.0 {
                    weighted > 0.0
                } else {
                    weighted < 0.0
                };
                *m += if agrees { weighted } else { 0.0 };
                *d += if agrees { w } else { 0.0 };
            }
        }
        for (((o, &b), &m), &d) in out
            .iter_mut()
            .zip(base)
            .zip(merged.iter())
            .zip(divisor.iter())
        {
            let mix = if normalize {
                m / if d == 0.0 { 1.0 } else { d }
            } else {
                m
            };
            *o = b + lambda * mix;
        }
    } else {
        let total: f32 = weights.iter().sum();
        let scale = if normalize && total.abs() >= 1e-8 {
            total
        } else {
            1.0
        };
        for (o, &b) in out.iter_mut().zip(base) {
            let mix = if normalize { *o / scale } else { *o };
            *o = b + lambda * mix;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_count_floors() {
        assert_eq!(trim_count(0.5, 5), 2);
        assert_eq!(trim_count(0.3, 10), 3, "0.3·10 = 2.999… must give 3");
        assert_eq!(trim_count(0.1, 5), 0);
        assert_eq!(trim_count(1.0, 5), 5);
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        let x = [1.0f32, -3.0, 2.0, -2.0, 2.0, 0.0];
        let top = TopK::find(core::iter::once(&x[..]), 3);
        let mut out = x;
        top.apply(&mut out, 0);
        assert_eq!(
            out,
            [0.0, -3.0, 2.0, -2.0, 0.0, 0.0],
            "|−2| at index 3 wins over 2 at index 4"
        );
        // The same with the tensor split in two chunks.
        let top2 = TopK::find([&x[..2], &x[2..]].into_iter(), 3);
        assert_eq!(top, top2);
        let mut split = x;
        let (a, b) = split.split_at_mut(2);
        let ties = top.apply(a, 0);
        top.apply(b, ties);
        assert_eq!(split, out);
        let none = TopK::find(core::iter::once(&x[..]), 0);
        let mut all = x;
        none.apply(&mut all, 0);
        assert_eq!(all, [0.0; 6]);
    }

    #[test]
    fn breadcrumbs_keeps_a_window_of_ranks() {
        // n = 10, density 0.5, gamma 0.1: drop the largest 1, keep 5, drop the smallest 4.
        assert_eq!(breadcrumbs_window(0.5, 0.1, 10), (1, 6));
        // gamma 0: keep the top 5 (mergekit ≤ 0.1.4 returned zeros here).
        assert_eq!(breadcrumbs_window(0.5, 0.0, 10), (0, 5));
        // density + gamma > 1: nothing dropped at the bottom.
        assert_eq!(breadcrumbs_window(0.8, 0.5, 10), (2, 10));
        let x = [5.0f32, -1.0, 4.0, 3.0, -2.0];
        let (a, b) = breadcrumbs_window(0.4, 0.2, 5);
        assert_eq!((a, b), (1, 3));
        let top = TopK::find(core::iter::once(&x[..]), b);
        let skip = TopK::find(core::iter::once(&x[..]), a);
        let mut kept = x;
        keep_rank_window(&mut kept, &top, Some(&skip), (0, 0));
        assert_eq!(kept, [0.0, 0.0, 4.0, 3.0, 0.0]);
    }

    #[test]
    fn ties_vote_hand_cases() {
        // Signs +, +, −: sum 1 + 2 − 4 = −1 < 0 → elected −; only −4 agrees.
        assert_eq!(ties_vote(&[1.0, 2.0, -4.0], &[1.0, 1.0, 2.0], false), -4.0);
        assert_eq!(ties_vote(&[1.0, 2.0, -4.0], &[1.0, 1.0, 2.0], true), -2.0);
        // A zero sum votes +1; zeros never agree; a zero divisor becomes 1.
        assert_eq!(ties_vote(&[1.0, -1.0, 0.0], &[1.0, 1.0, 1.0], true), 1.0);
        assert_eq!(ties_vote(&[0.0, 0.0], &[1.0, 1.0], true), 0.0);
    }

    #[test]
    fn dare_is_the_spec_hash() {
        // FNV-1a-64 of the empty string is the offset basis; of "a" a known value.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(dare_stream(0, 1, "x"), fnv1a64(b"0:1:x"));
        // Uniforms computed independently (Python, arbitrary-precision integers)
        // for this stream: 0.232401, 0.745682, 0.117398, 0.978563, 0.136176, 0.718002.
        let key = dare_stream(0, 0, "model.layers.0.mlp.up_proj.weight");
        assert_eq!(key, 0x6962_6ae7_9edf_6118);
        let kept: alloc::vec::Vec<bool> = (0..6).map(|i| dare_keep(key, i, 0.5)).collect();
        assert_eq!(kept, [true, false, true, false, true, false]);
        assert!(dare_keep(key, 3, 0.9786) && !dare_keep(key, 3, 0.9785));
        assert!(!dare_keep(12345, 0, 0.0));
        assert!(dare_keep(12345, 0, 1.0));
        assert_eq!(dare_rescale(2.0, 1.0), 2.0);
        assert_eq!(dare_rescale(2.0, 1e-9), 1.0);
    }
}
