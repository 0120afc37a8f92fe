//! The numeric pieces of the LLaMA forward pass, as plain functions on
//! row-major f32 slices (`[tokens, width]`).
//!
//! Matrix products use `matrixmultiply::sgemm` (f32 accumulation). A
//! linear layer's weight is never decoded whole: [`linear`] decodes panels
//! of [`PANEL_VALUES`] values into a scratch buffer and multiplies each,
//! panels running in parallel on the current rayon pool. The panel
//! boundaries depend on the weight's shape only, and each output value is
//! one sgemm dot product, so the result does not depend on the thread
//! count.

use rayon::prelude::*;

use super::config::{LlamaConfig, RopeScaling};
use crate::io::TensorView;
use crate::reduce::sum_squares;

/// Weight values decoded at once per task by [`linear`] (1 MiB of f32).
pub const PANEL_VALUES: usize = 1 << 18;

/// `C = alpha · A · B` with explicit strides (a thin wrapper of
/// `matrixmultiply::sgemm`, `beta = 0`).
///
/// `A` is `[m, k]` read as `a[i·rsa + p·csa]`, `B` is `[k, n]` read as
/// `b[p·rsb + j·csb]`, `C` is `[m, n]` written as `c[i·rsc + j]`.
///
/// # Panics
/// If an index the product reads or writes lies outside its slice.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    // The largest index each operand is read or written at.
    let last_a = (m - 1) * rsa + (k - 1) * csa;
    let last_b = (k - 1) * rsb + (n - 1) * csb;
    let last_c = (m - 1) * rsc + (n - 1);
    assert!(
        last_a < a.len() && last_b < b.len() && last_c < c.len(),
        "gemm: operands too short"
    );
    // SAFETY: every index sgemm touches is `i·rs + j·cs` with `i`, `j`
    // within the stated dimensions, hence at most `last_*`, which the
    // assertion keeps inside each slice; `c` is borrowed mutably, so it
    // aliases neither `a` nor `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            0.0,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

/// `y = x Wᵀ` for `x` `[rows, in]` and the weight `w` `[out, in]` read from
/// the checkpoint: `[rows, out]`. Rows of `W` are decoded in panels of about
/// [`PANEL_VALUES`] values, one per rayon task, each multiplied into its own
/// `[rows, panel]` block, and the blocks copied into `y`.
///
/// # Panics
/// If `w` is not a float tensor of `out × in` values or `x` is not
/// `rows × in` (the model checks shapes when it loads).
pub fn linear(w: &TensorView<'_>, x: &[f32], rows: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    assert_eq!(w.numel(), in_f * out_f, "linear `{}`: weight size", w.name);
    assert_eq!(x.len(), rows * in_f, "linear `{}`: input size", w.name);
    if rows == 0 {
        return Vec::new();
    }
    let panel = (PANEL_VALUES / in_f).clamp(1, out_f);
    let blocks: Vec<Vec<f32>> = (0..out_f.div_ceil(panel))
        .into_par_iter()
        .map(|p| {
            let r0 = p * panel;
            let n = panel.min(out_f - r0);
            let mut weights = vec![0f32; n * in_f];
            w.read_f32(r0 * in_f, &mut weights);
            // block [rows, n] = x [rows, in] · W_panelᵀ [in, n].
            let mut block = vec![0f32; rows * n];
            gemm(
                rows,
                in_f,
                n,
                1.0,
                x,
                (in_f, 1),
                &weights,
                (1, in_f),
                &mut block,
                n,
            );
            block
        })
        .collect();
    let mut y = vec![0f32; rows * out_f];
    for (p, block) in blocks.iter().enumerate() {
        let r0 = p * panel;
        let n = block.len() / rows;
        for (dst, src) in y.chunks_exact_mut(out_f).zip(block.chunks_exact(n)) {
            dst[r0..r0 + n].copy_from_slice(src);
        }
    }
    y
}

/// RMSNorm of one row: `out = weight ⊙ x / sqrt(mean(x²) + eps)`, the mean
/// of squares summed in f64 ([`sum_squares`]).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let inv = (1.0 / (sum_squares(x) / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// `v · σ(v) = v / (1 + e^-v)` in f32 (as PyTorch computes it for f32).
#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// The rotary inverse frequencies `1 / θ^(2i/d)`, `i < d/2`, rescaled as the
/// config says, for a sequence of `seq_len` tokens (only dynamic NTK
/// scaling reads the length).
///
/// As in `transformers`, they are f32: the exponent `2i/d` is an f32
/// quotient and each frequency is rounded to f32 (the llama3 bands are
/// computed in f64 from those and rounded again).
pub fn inv_freq(config: &LlamaConfig, seq_len: usize) -> Vec<f32> {
    let d = config.head_dim;
    let base = match config.rope_scaling {
        RopeScaling::Dynamic { factor } if seq_len > config.max_position_embeddings => {
            let max = config.max_position_embeddings as f64;
            let grow = factor * seq_len as f64 / max - (factor - 1.0);
            config.rope_theta * grow.powf(d as f64 / (d as f64 - 2.0))
        }
        _ => config.rope_theta,
    };
    let plain = (0..d / 2).map(|i| {
        let exponent = (2 * i) as f32 / d as f32;
        1.0f32 / (base.powf(exponent as f64) as f32)
    });
    match config.rope_scaling {
        RopeScaling::None | RopeScaling::Dynamic { .. } => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| (f as f64 / factor) as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => plain
            .map(|f| {
                let f = f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                let out = if medium {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
                out as f32
            })
            .collect(),
    }
}

/// Cosine and sine tables `[seq_len, d/2]` for positions `0..seq_len`: the
/// angle is the f32 product `position · inv_freq` (as `transformers`
/// computes it), its cosine and sine evaluated in f64 and rounded.
pub fn rope_tables(config: &LlamaConfig, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
    let freqs = inv_freq(config, seq_len);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for pos in 0..seq_len {
        for &f in &freqs {
            let angle = (pos as f32 * f) as f64;
            cos.push(libm::cos(angle) as f32);
            sin.push(libm::sin(angle) as f32);
        }
    }
    (cos, sin)
}

/// Applies rotary embeddings in place to `x` `[seq_len, heads × d]`, with
/// `transformers`' `rotate_half` convention: each head's vector is split
/// into halves `(a, b)` and becomes `(a cos − b sin, b cos + a sin)`.
pub fn apply_rope(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for (t, row) in x.chunks_exact_mut(heads * d).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(d) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// Causal grouped-query attention for one sequence: `q` `[t, heads × d]`,
/// `k` and `v` `[t, kv_heads × d]` (already rotated); query head `h` reads
/// key/value head `h / (heads / kv_heads)`. Returns `[t, heads × d]`, the
/// heads side by side (the output projection's input).
///
/// Scores are `q·k / √d` (sgemm), masked to positions `≤` the query's,
/// softmaxed in f32 after subtracting the row maximum (the sum in f64),
/// then multiplied by `v`. Heads run in parallel.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Vec<f32> {
    let (qw, kw) = (heads * d, kv_heads * d);
    let group = heads / kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let j = h / group;
            let mut scores = vec![0f32; t * t];
            // scores [t, t] = q_h [t, d] · k_jᵀ [d, t].
            gemm(
                t,
                d,
                t,
                scale,
                &q[h * d..],
                (qw, 1),
                &k[j * d..],
                (1, kw),
                &mut scores,
                t,
            );
            for (i, row) in scores.chunks_exact_mut(t).enumerate() {
                let (live, masked) = row.split_at_mut(i + 1);
                let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for s in live.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let inv = (1.0 / sum) as f32;
                live.iter_mut().for_each(|s| *s *= inv);
                masked.iter_mut().for_each(|s| *s = 0.0);
            }
            // out_h [t, d] = p [t, t] · v_j [t, d].
            let mut out = vec![0f32; t * d];
            gemm(
                t,
                t,
                d,
                1.0,
                &scores,
                (t, 1),
                &v[j * d..],
                (kw, 1),
                &mut out,
                d,
            );
            out
        })
        .collect();
    let mut out = vec![0f32; t * qw];
    for (h, head) in per_head.iter().enumerate() {
        for (row, src) in out.chunks_exact_mut(qw).zip(head.chunks_exact(d)) {
            row[h * d..(h + 1) * d].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_with_strides_multiplies() {
        // A [2, 3] row-major, B = Aᵀ read through strides: C = A Aᵀ.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [0f32; 4];
        gemm(2, 3, 2, 1.0, &a, (3, 1), &a, (1, 3), &mut c, 2);
        assert_eq!(c, [14.0, 32.0, 32.0, 77.0]);
    }

    #[test]
    fn rope_rotates_halves() {
        let mut config = LlamaConfig::new(4, 4, 4, 1, 1, 1);
        config.rope_theta = 1.0; // every frequency 1
        let (cos, sin) = rope_tables(&config, 2);
        let mut x = vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        apply_rope(&mut x, 1, 4, &cos, &sin);
        // Position 0: unchanged; position 1: pairs (x_i, x_{i+2}) rotated by 1 rad.
        assert_eq!(&x[..4], &[1.0, 0.0, 0.0, 1.0]);
        let (c, s) = (1f32.cos(), 1f32.sin());
        for (got, want) in x[4..].iter().zip([c, -s, s, c]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
