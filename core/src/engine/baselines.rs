//! The baseline methods (SPEC §3) on tensors read from the checkpoints.
//! Task arithmetic, DARE and plain TIES stream their task vectors chunk by
//! chunk (a first pass finds DARE's norms or TIES' thresholds); the other
//! sparsifying methods decode whole task vectors once. Selections are
//! exact and thread-independent, and one output pass combines. Kernels
//! live in [`crate::baselines`].

use super::chunks::{add_histograms, par_encode, parallel_select, read, read_all, rows_per_chunk};
use super::CHUNK_ELEMENTS;
use crate::baselines::{
    breadcrumbs_window, count_above, count_equal, dare_drop_in_place, dare_keep, dare_rescale,
    dare_stream, keep_rank_window, linear_combine, magnitude_key, task_arithmetic_combine,
    trim_count, TopK,
};
use crate::config::params::{layer_position, Params};
use crate::config::MergeMethod;
use crate::dtype::decode_f32;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::plan::TensorPlan;
use crate::report::{Sparsity, TensorOutcome};
use crate::select::{scan_bracket, KeyOf, RadixSelect, SampleBracket, RADIX_BUCKETS, SAMPLE_SIZE};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a baseline tensor is merged from.
pub(super) struct BaselineTensor<'a> {
    /// The method.
    pub method: MergeMethod,
    /// Its parameters.
    pub params: &'a Params,
    /// Seed of random masks.
    pub seed: u64,
    /// Decoder layers (for gradients).
    pub layers: usize,
    /// The plan of the tensor.
    pub plan: &'a TensorPlan,
    /// The base model's tensor, when the method has a base.
    pub base: Option<TensorView<'a>>,
    /// Whether the base is also an input of a linear merge (listed only as `base_model`).
    pub base_is_input: bool,
    /// Each contributor's tensor.
    pub contributors: Vec<TensorView<'a>>,
    /// Each contributor's index in the config's `models` (for per-model parameters).
    pub model_index: Vec<usize>,
    /// Whole-model quantities of `ties_reference`.
    pub ties_reference: Option<&'a TiesReference>,
    /// Called with `k` once contributor `k`'s tensor is no longer read, so
    /// its pages can leave memory while the task vectors are held.
    pub done_with_contributor: &'a (dyn Fn(usize) + Sync),
}

impl BaselineTensor<'_> {
    fn t(&self) -> f64 {
        layer_position(&self.plan.name, self.layers)
    }

    fn number(&self, key: &str, k: Option<usize>) -> Result<f64> {
        self.params.number(
            key,
            k.map(|k| self.model_index[k]),
            &self.plan.name,
            self.t(),
        )
    }

    fn flag(&self, key: &str) -> bool {
        self.params.flag(key, &self.plan.name, self.t())
    }

    fn base(&self) -> Result<&TensorView<'_>> {
        self.base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Plan, "this method needs the base model's tensor"))
    }

    /// Merges the tensor.
    pub fn merge(&self) -> Result<(Vec<u8>, TensorOutcome)> {
        let out = self.plan.out_dtype;
        match self.method {
            MergeMethod::Linear => self.linear(out),
            MergeMethod::Passthrough => {
                let scale = self.number("scale", Some(0))? as f32;
                let view = &self.contributors[0];
                let bytes = par_encode(
                    view.numel(),
                    out,
                    CHUNK_ELEMENTS,
                    |start, values, buf: &mut Vec<f32>| {
                        read(view, start, values.len(), buf);
                        for (v, x) in values.iter_mut().zip(buf.iter()) {
                            *v = scale * x;
                        }
                    },
                );
                Ok((bytes, TensorOutcome::default()))
            }
            MergeMethod::Slerp => self.slerp(out),
            MergeMethod::Nearswap => self.nearswap(out),
            MergeMethod::ModelStock => self.model_stock(out),
            MergeMethod::TiesReference => self.ties_reference(out),
            MergeMethod::SafeM => Err(Error::new(ErrorKind::Plan, "safe_m is not a baseline")),
            _ => self.task_arithmetic(out),
        }
    }

    fn linear(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        let mut views: Vec<&TensorView<'_>> = Vec::new();
        let mut weights = Vec::new();
        if let (true, Some(base)) = (self.base_is_input, &self.base) {
            views.push(base);
            weights.push(self.number("weight", None)? as f32);
        }
        for (k, view) in self.contributors.iter().enumerate() {
            views.push(view);
            weights.push(self.number("weight", Some(k))? as f32);
        }
        let normalize = self.flag("normalize");
        let n = self.plan.numel();
        let bytes = par_encode(
            n,
            out,
            CHUNK_ELEMENTS,
            |start, values, bufs: &mut Vec<Vec<f32>>| {
                bufs.resize_with(views.len(), Vec::new);
                for (buf, view) in bufs.iter_mut().zip(&views) {
                    read(view, start, values.len(), buf);
                }
                let refs: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
                linear_combine(&refs, &weights, normalize, values);
            },
        );
        Ok((bytes, TensorOutcome::default()))
    }

    /// `τ_k = W_k − W_base` for every contributor, decoded in parallel.
    fn task_vectors(&self) -> Result<Vec<Vec<f32>>> {
        let base = self.base()?;
        Ok(self
            .contributors
            .iter()
            .enumerate()
            .map(|(k, view)| {
                let mut tau = read_all(view);
                tau.par_chunks_mut(CHUNK_ELEMENTS)
                    .enumerate()
                    .for_each_init(Vec::new, |b, (chunk, values)| {
                        read(base, chunk * CHUNK_ELEMENTS, values.len(), b);
                        subtract(values, b);
                    });
                (self.done_with_contributor)(k);
                tau
            })
            .collect())
    }

    /// mergekit's generalized task arithmetic: sparsify each `τ_k`, weight,
    /// vote (or sum), normalise, scale by `λ`, add to the base.
    fn task_arithmetic(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        if matches!(
            self.method,
            MergeMethod::TaskArithmetic | MergeMethod::DareLinear | MergeMethod::DareTies
        ) {
            return self.streamed_task_arithmetic(out, None);
        }
        if self.method == MergeMethod::Ties && !self.flag("rescale") {
            let keeps = (0..self.contributors.len())
                .map(|k| {
                    Ok(trim_count(
                        self.number("density", Some(k))?,
                        self.plan.numel(),
                    ))
                })
                .collect::<Result<Vec<usize>>>()?;
            if let Some(tops) = self.streamed_top_k(&keeps) {
                return self.streamed_task_arithmetic(out, Some(&tops));
            }
        }
        let mut taus = self.task_vectors()?;
        let rescale = self.flag("rescale");
        let mut sparsity = Vec::new();
        for (k, tau) in taus.iter_mut().enumerate() {
            let density = self.number("density", Some(k))?;
            let rescaled = match self.method {
                MergeMethod::TaskArithmetic => None,
                MergeMethod::Ties => {
                    let keep = trim_count(density, tau.len());
                    rescaled(tau, rescale, |tau| keep_top(tau, keep, 0))
                }
                MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies if density < 1.0 => {
                    let gamma = self.number("gamma", Some(k))?;
                    let (a, b) = breadcrumbs_window(density, gamma, tau.len());
                    rescaled(tau, rescale, |tau| keep_top(tau, b, a))
                }
                MergeMethod::Della | MergeMethod::DellaLinear if density < 1.0 => {
                    let epsilon = self.number("epsilon", Some(k))?;
                    if !(density - epsilon > 0.0 && density + epsilon < 1.0) {
                        return Err(Error::new(
                            ErrorKind::Config,
                            format!("della needs 0 < density − epsilon and density + epsilon < 1; got density {density}, epsilon {epsilon} for models[{}]", self.model_index[k]),
                        )
                        .with_tensor(&self.plan.name));
                    }
                    let key = dare_stream(self.seed, k, &self.plan.name);
                    Some(della(tau, &self.plan.shape, key, density, epsilon, rescale))
                }
                _ => None,
            };
            sparsity.push(Sparsity {
                contributor: k,
                kept: tau.par_iter().filter(|x| **x != 0.0).count() as u64,
                rescale: rescaled,
            });
        }
        let weights: Vec<f32> = (0..taus.len())
            .map(|k| self.number("weight", Some(k)).map(|w| w as f32))
            .collect::<Result<_>>()?;
        let base = self.base()?;
        let combine = self.combiner(weights)?;
        let bytes = par_encode(
            self.plan.numel(),
            out,
            CHUNK_ELEMENTS,
            |start, values, (b, scratch): &mut (Vec<f32>, Vec<f32>)| {
                read(base, start, values.len(), b);
                let end = start + values.len();
                let slices: Vec<&[f32]> = taus.iter().map(|t| &t[start..end]).collect();
                combine.apply(b, &slices, scratch, values);
            },
        );
        Ok((
            bytes,
            TensorOutcome {
                sparsity,
                ..TensorOutcome::default()
            },
        ))
    }

    /// Task arithmetic and DARE without whole task vectors: each chunk's
    /// task vectors are formed, dropped, rescaled, combined and encoded in
    /// one pass. DARE's L1 rescale needs the tensor's norms first: a pass
    /// before computes them over the same chunks, in the same order, as the
    /// whole-tensor path would.
    fn streamed_task_arithmetic(
        &self,
        out: Dtype,
        tops: Option<&[StreamedTop]>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let weights: Vec<f32> = (0..self.contributors.len())
            .map(|k| self.number("weight", Some(k)).map(|w| w as f32))
            .collect::<Result<_>>()?;
        let base = self.base()?;
        let combine = self.combiner(weights)?;
        let n = self.plan.numel();
        let dare = matches!(self.method, MergeMethod::DareLinear | MergeMethod::DareTies);
        let rescale = self.flag("rescale");
        let mut drops: Vec<Option<DareDrop>> = Vec::new();
        for (k, view) in self.contributors.iter().enumerate() {
            let density = self.number("density", Some(k))?;
            if !dare || density >= 1.0 {
                drops.push(None);
                continue;
            }
            let key = dare_stream(self.seed, k, &self.plan.name);
            let factor = if rescale {
                let norms: Vec<(f64, f64)> = (0..n.div_ceil(CHUNK_ELEMENTS))
                    .into_par_iter()
                    .map_init(
                        || (Vec::new(), Vec::new()),
                        |(b, tau), chunk| {
                            let start = chunk * CHUNK_ELEMENTS;
                            let len = CHUNK_ELEMENTS.min(n - start);
                            read(base, start, len, b);
                            read(view, start, len, tau);
                            subtract(tau, b);
                            dare_drop_in_place(tau, key, start as u64, density)
                        },
                    )
                    .collect();
                let (all, kept) = norms
                    .iter()
                    .fold((0f64, 0f64), |(a, k), (x, y)| (a + x, k + y));
                dare_rescale(all, kept)
            } else {
                1.0
            };
            drops.push(Some(DareDrop {
                key,
                density,
                factor,
            }));
        }
        let nonzero: Vec<AtomicU64> = self
            .contributors
            .iter()
            .map(|_| AtomicU64::new(0))
            .collect();
        type Scratch = (Vec<f32>, Vec<Vec<f32>>, Vec<f32>);
        let bytes = par_encode(
            n,
            out,
            CHUNK_ELEMENTS,
            |start, values, (b, taus, scratch): &mut Scratch| {
                read(base, start, values.len(), b);
                taus.resize_with(self.contributors.len(), Vec::new);
                let inputs = self.contributors.iter().zip(&drops).zip(&nonzero);
                for (k, (tau, ((view, drop), count))) in taus.iter_mut().zip(inputs).enumerate() {
                    read(view, start, values.len(), tau);
                    subtract(tau, b);
                    if let Some(drop) = drop {
                        dare_drop_in_place(tau, drop.key, start as u64, drop.density);
                        scale_chunk(tau, drop.factor);
                    }
                    if let Some(top) = tops.map(|tops| &tops[k]) {
                        let before = top.ties_before[start / CHUNK_ELEMENTS];
                        keep_rank_window(tau, &top.top, None, (before, 0));
                    }
                    let kept = tau.iter().filter(|x| **x != 0.0).count();
                    count.fetch_add(kept as u64, Ordering::Relaxed);
                }
                let slices: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
                combine.apply(b, &slices, scratch, values);
            },
        );
        let sparsity = nonzero
            .iter()
            .zip(&drops)
            .enumerate()
            .map(|(contributor, (kept, drop))| Sparsity {
                contributor,
                kept: kept.load(Ordering::Relaxed),
                rescale: drop.as_ref().map(|d| d.factor),
            })
            .collect();
        Ok((
            bytes,
            TensorOutcome {
                sparsity,
                ..TensorOutcome::default()
            },
        ))
    }

    /// TIES' trim without holding task vectors: the exact top-`keeps[k]`
    /// of each contributor's `|τ_k|`, as [`keep_top`] finds it, from a
    /// sample and one pass that gathers the keys near each threshold per
    /// chunk (which also gives each chunk's ties). `None` when a sample
    /// misleads or too many keys are equal: the caller then holds the task
    /// vectors.
    fn streamed_top_k(&self, keeps: &[usize]) -> Option<Vec<StreamedTop>> {
        let n = self.plan.numel();
        if n < 4 * SAMPLE_SIZE {
            return None;
        }
        let base = self.base().ok()?;
        let chunks = n.div_ceil(CHUNK_ELEMENTS);
        let element = |view: &TensorView<'_>, i: usize| {
            let size = view.dtype.size();
            let mut x = [0f32];
            decode_f32(view.dtype, &view.data[i * size..(i + 1) * size], &mut x);
            x[0]
        };
        let brackets: Vec<SampleBracket> = self
            .contributors
            .iter()
            .zip(keeps)
            .map(|(view, &keep)| {
                SampleBracket::for_rank(n, keep.max(1), |i| {
                    KeyOf::Magnitude.of(element(view, i) - element(base, i))
                })
            })
            .collect();
        // Per chunk and contributor: keys above the bracket, keys inside it.
        let parts: Vec<Vec<(u64, Vec<u32>)>> = (0..chunks)
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(b, tau), chunk| {
                    let start = chunk * CHUNK_ELEMENTS;
                    let len = CHUNK_ELEMENTS.min(n - start);
                    read(base, start, len, b);
                    self.contributors
                        .iter()
                        .zip(&brackets)
                        .map(|(view, &bracket)| {
                            read(view, start, len, tau);
                            subtract(tau, b);
                            let mut inside = Vec::new();
                            let above = scan_bracket(tau, KeyOf::Magnitude, bracket, &mut inside);
                            (above, inside)
                        })
                        .collect()
                },
            )
            .collect();
        let mut tops = Vec::with_capacity(keeps.len());
        for (k, (&keep, bracket)) in keeps.iter().zip(&brackets).enumerate() {
            if keep == 0 {
                tops.push(StreamedTop {
                    top: TopK::NONE,
                    ties_before: vec![0; chunks],
                });
                continue;
            }
            let above_bracket: u64 = parts.iter().map(|p| p[k].0).sum();
            let mut candidates: Vec<u32> =
                parts.iter().flat_map(|p| p[k].1.iter().copied()).collect();
            if candidates.len() > SampleBracket::candidate_cap(n) {
                return None;
            }
            let threshold = bracket.resolve(above_bracket, &mut candidates, keep)?;
            let mut above = 0u64;
            let mut ties_before = Vec::with_capacity(chunks);
            let mut ties = 0u64;
            for part in &parts {
                let (above_chunk, inside) = &part[k];
                ties_before.push(ties);
                above += above_chunk + inside.iter().filter(|&&key| key > threshold).count() as u64;
                ties += inside.iter().filter(|&&key| key == threshold).count() as u64;
            }
            tops.push(StreamedTop {
                top: TopK::from_threshold(threshold, above, keep),
                ties_before,
            });
        }
        Some(tops)
    }

    /// The final combination of the task-arithmetic family.
    fn combiner(&self, weights: Vec<f32>) -> Result<Combiner> {
        Ok(Combiner {
            weights,
            consensus: matches!(
                self.method,
                MergeMethod::Ties
                    | MergeMethod::DareTies
                    | MergeMethod::BreadcrumbsTies
                    | MergeMethod::Della
            ),
            normalize: self.flag("normalize"),
            lambda: self.number("lambda", None)? as f32,
        })
    }

    fn slerp(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = self.number("t", None)?;
        let (a, b) = (self.base()?, &self.contributors[0]);
        let [aa, bb, ab] = chunk_products(a, b);
        let norm = |x: f64| if x.sqrt() <= 1e-8 { 1.0 } else { x.sqrt() };
        let dot = (ab / (norm(aa) * norm(bb))).clamp(-1.0, 1.0);
        let (s0, s1) = if dot.abs() > 0.9995 {
            (1.0 - t, t)
        } else {
            let theta = dot.acos();
            let sin = theta.sin();
            (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
        };
        let (s0, s1) = (s0 as f32, s1 as f32);
        Ok((
            elementwise(a, b, out, |p, q| s0 * p + s1 * q),
            TensorOutcome::default(),
        ))
    }

    fn nearswap(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = self.number("t", None)? as f32;
        let (a, b) = (self.base()?, &self.contributors[0]);
        let bytes = elementwise(a, b, out, |p, q| {
            let w = (t / (p - q).abs().max(1e-6)).clamp(0.0, 1.0);
            w * q + (1.0 - w) * p
        });
        Ok((bytes, TensorOutcome::default()))
    }

    /// Model Stock: `t = N·cos / (1 + (N − 1)·cos)` from the mean pairwise
    /// cosine of the offsets, over the whole tensor or per row (`filter_wise`).
    fn model_stock(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        let base = read_all(self.base()?);
        let models: Vec<Vec<f32>> = self.contributors.iter().map(read_all).collect();
        let n_models = models.len();
        let cols = if self.flag("filter_wise") {
            *self.plan.shape.last().unwrap_or(&1)
        } else {
            base.len()
        };
        let rows = base.len() / cols.max(1);
        let ratio = |row: usize| -> f32 {
            let range = row * cols..(row + 1) * cols;
            let offsets: Vec<Vec<f32>> = models
                .iter()
                .map(|m| {
                    m[range.clone()]
                        .iter()
                        .zip(&base[range.clone()])
                        .map(|(x, b)| x - b)
                        .collect()
                })
                .collect();
            let norms: Vec<f64> = offsets
                .iter()
                .map(|d| crate::reduce::sum_squares(d).sqrt())
                .collect();
            let (mut sum, mut pairs) = (0f64, 0usize);
            for i in 0..n_models {
                for j in i + 1..n_models {
                    let cos = crate::reduce::dot(&offsets[i], &offsets[j])
                        / (norms[i] * norms[j]).max(1e-6);
                    sum += cos.clamp(-1.0, 1.0);
                    pairs += 1;
                }
            }
            let cos = sum / pairs.max(1) as f64;
            let n = n_models as f64;
            let denominator = 1.0 + (n - 1.0) * cos;
            if denominator.abs() < 1e-6 {
                0.0
            } else {
                (n * cos / denominator) as f32
            }
        };
        let ratios: Vec<f32> = (0..rows).into_par_iter().map(ratio).collect();
        let bytes = par_encode(base.len(), out, cols.max(1), |start, values, _: &mut ()| {
            let t = ratios[start / cols.max(1)];
            for (j, v) in values.iter_mut().enumerate() {
                let i = start + j;
                let mean = models.iter().map(|m| m[i]).sum::<f32>() / n_models as f32;
                *v = t * mean + (1.0 - t) * base[i];
            }
        });
        Ok((bytes, TensorOutcome::default()))
    }

    fn ties_reference(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        let globals = self.ties_reference.ok_or_else(|| {
            Error::new(ErrorKind::Plan, "ties_reference needs its whole-model pass")
        })?;
        let lambda = self.number("lambda", None)? as f32;
        let base = self.base()?;
        let taus = self.task_vectors()?;
        let bytes = par_encode(
            base.numel(),
            out,
            CHUNK_ELEMENTS,
            |start, values, (b, trimmed): &mut (Vec<f32>, Vec<f32>)| {
                read(base, start, values.len(), b);
                trimmed.resize(taus.len(), 0.0);
                for (j, v) in values.iter_mut().enumerate() {
                    for ((t, tau), &threshold) in
                        trimmed.iter_mut().zip(&taus).zip(&globals.thresholds)
                    {
                        let x = tau[start + j];
                        *t = if magnitude_key(x) >= threshold {
                            x
                        } else {
                            0.0
                        };
                    }
                    *v = b[j] + lambda * globals.disjoint_mean(trimmed);
                }
            },
        );
        Ok((bytes, TensorOutcome::default()))
    }
}

/// The weights and flags of the task-arithmetic family's final step.
struct Combiner {
    weights: Vec<f32>,
    consensus: bool,
    normalize: bool,
    lambda: f32,
}

impl Combiner {
    fn apply(&self, base: &[f32], taus: &[&[f32]], scratch: &mut Vec<f32>, out: &mut [f32]) {
        task_arithmetic_combine(
            base,
            taus,
            &self.weights,
            self.consensus,
            self.normalize,
            self.lambda,
            scratch,
            out,
        );
    }
}

/// TIES' trim of one contributor in the streamed pass: its top-k and the
/// ties at the threshold in the chunks before each chunk.
struct StreamedTop {
    top: TopK,
    ties_before: Vec<u64>,
}

/// DARE's drop of one contributor in the streamed pass.
struct DareDrop {
    key: u64,
    density: f64,
    /// The L1 rescale factor (1 without `rescale`).
    factor: f32,
}

/// Multiplies every entry of a chunk by `factor` (skipped for 1).
fn scale_chunk(tau: &mut [f32], factor: f32) {
    if factor != 1.0 {
        for x in tau.iter_mut() {
            *x *= factor;
        }
    }
}

/// `tau −= base`, element-wise (a task vector from a decoded weight).
fn subtract(tau: &mut [f32], base: &[f32]) {
    for (t, x) in tau.iter_mut().zip(base) {
        *t -= x;
    }
}

/// `f(a[i], b[i])` over two whole tensors, in parallel chunks.
fn elementwise(
    a: &TensorView<'_>,
    b: &TensorView<'_>,
    out: Dtype,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<u8> {
    par_encode(
        a.numel(),
        out,
        CHUNK_ELEMENTS,
        |start, values, (x, y): &mut (Vec<f32>, Vec<f32>)| {
            read(a, start, values.len(), x);
            read(b, start, values.len(), y);
            for ((v, &p), &q) in values.iter_mut().zip(x.iter()).zip(y.iter()) {
                *v = f(p, q);
            }
        },
    )
}

/// Runs a deterministic sparsification, then (when `rescale`) the L1
/// rescale of SPEC §3, as mergekit does after magnitude trimming too.
/// Returns the factor when rescaling was asked for.
fn rescaled(tau: &mut [f32], rescale: bool, sparsify: impl FnOnce(&mut [f32])) -> Option<f32> {
    if !rescale {
        sparsify(tau);
        return None;
    }
    let l1 = |t: &[f32]| -> f64 {
        let parts: Vec<f64> = t
            .par_chunks(CHUNK_ELEMENTS)
            .map(|c| c.iter().map(|x| x.abs() as f64).sum())
            .collect();
        parts.iter().sum()
    };
    let before = l1(tau);
    sparsify(tau);
    let factor = dare_rescale(before, l1(tau));
    scale(tau, factor);
    Some(factor)
}

/// Multiplies every entry by `factor` (skipped for 1).
fn scale(tau: &mut [f32], factor: f32) {
    tau.par_chunks_mut(CHUNK_ELEMENTS)
        .for_each(|chunk| scale_chunk(chunk, factor));
}

/// Keeps the entries of descending magnitude rank `[skip, keep)` (ties by
/// lower index), in parallel chunks with exact tie accounting.
fn keep_top(tau: &mut [f32], keep: usize, skip: usize) {
    let threshold = |k: usize| (k > 0).then(|| parallel_select(tau, k, KeyOf::Magnitude));
    let (keep_key, skip_key) = (threshold(keep), threshold(skip));
    // One pass counts, per chunk, the entries above and at each threshold;
    // the ties before each chunk are prefix sums in chunk order.
    let counts: Vec<[u64; 4]> = tau
        .par_chunks(CHUNK_ELEMENTS)
        .map(|c| {
            let [a, b] = [keep_key, skip_key].map(|t| t.map_or((0, 0), |t| above_and_equal(c, t)));
            [a.0, a.1, b.0, b.1]
        })
        .collect();
    let above = |i: usize| counts.iter().map(|c| c[i]).sum::<u64>();
    let top = |key: Option<u32>, above: u64, k: usize| {
        key.map_or(TopK::NONE, |t| TopK::from_threshold(t, above, k))
    };
    let top_keep = top(keep_key, above(0), keep);
    let top_skip = skip_key.map(|t| TopK::from_threshold(t, above(2), skip));
    let mut before = Vec::with_capacity(counts.len());
    let mut acc = (0u64, 0u64);
    for c in &counts {
        before.push(acc);
        acc = (acc.0 + c[1], acc.1 + c[3]);
    }
    tau.par_chunks_mut(CHUNK_ELEMENTS)
        .zip(before)
        .for_each(|(chunk, before)| {
            keep_rank_window(chunk, &top_keep, top_skip.as_ref(), before);
        });
}

/// Entries of `chunk` whose magnitude key is above, and equal to, `threshold`.
fn above_and_equal(chunk: &[f32], threshold: u32) -> (u64, u64) {
    (count_above(chunk, threshold), count_equal(chunk, threshold))
}

/// Runs a random drop over chunks of `chunk` elements (`drop(start,
/// values)` zeroes what it drops and returns the chunk's `(‖τ‖₁,
/// ‖τ_kept‖₁)`), then the L1 rescale of SPEC §3 when `rescale`. Returns the
/// factor applied.
fn drop_and_rescale(
    tau: &mut [f32],
    chunk: usize,
    rescale: bool,
    drop: impl Fn(usize, &mut [f32]) -> (f64, f64) + Sync,
) -> f32 {
    let norms: Vec<(f64, f64)> = tau
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(index, values)| drop(index * chunk, values))
        .collect();
    let (all, kept) = norms
        .iter()
        .fold((0f64, 0f64), |(a, k), (x, y)| (a + x, k + y));
    let factor = if rescale {
        dare_rescale(all, kept)
    } else {
        1.0
    };
    scale(tau, factor);
    factor
}

/// DELLA's drop (mergekit 0.1.5 `della_magprune`): per row, ranks by
/// ascending magnitude (ties by index) give keep probabilities from
/// `density − ε` (smallest) to `density + ε` (largest); the draw uses the
/// DARE stream of SPEC §3 at the element's flat index.
fn della(
    tau: &mut [f32],
    shape: &[usize],
    key: u64,
    density: f64,
    epsilon: f64,
    rescale: bool,
) -> f32 {
    let cols = if shape.len() >= 2 {
        *shape.last().unwrap_or(&1)
    } else {
        tau.len()
    }
    .max(1);
    drop_and_rescale(
        tau,
        rows_per_chunk(cols) * cols,
        rescale,
        |start, values| {
            let mut order: Vec<usize> = Vec::with_capacity(cols);
            let mut keep = Vec::with_capacity(cols);
            let (mut all, mut kept) = (0f64, 0f64);
            for (r, row) in values.chunks_mut(cols).enumerate() {
                order.clear();
                order.extend(0..row.len());
                order.sort_by(|&i, &j| row[i].abs().total_cmp(&row[j].abs()).then(i.cmp(&j)));
                // mergekit normalises ranks to [0, 1]; a one-element row gets 0.
                let span = (row.len().max(2) - 1) as f64;
                let row_start = start + r * cols;
                keep.clear();
                keep.resize(row.len(), false);
                for (rank, &i) in order.iter().enumerate() {
                    let p = density - epsilon + 2.0 * epsilon * (rank as f64 / span);
                    keep[i] = dare_keep(key, (row_start + i) as u64, p);
                }
                for (x, &k) in row.iter_mut().zip(&keep) {
                    all += x.abs() as f64;
                    if k {
                        kept += x.abs() as f64;
                    } else {
                        *x = 0.0;
                    }
                }
            }
            (all, kept)
        },
    )
}

/// `[⟨a,a⟩, ⟨b,b⟩, ⟨a,b⟩]` over two whole tensors, in f64, summed per chunk
/// and then in chunk order.
fn chunk_products(a: &TensorView<'_>, b: &TensorView<'_>) -> [f64; 3] {
    let n = a.numel();
    let parts: Vec<[f64; 3]> = (0..n.div_ceil(CHUNK_ELEMENTS))
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(x, y), chunk| {
                let start = chunk * CHUNK_ELEMENTS;
                let len = CHUNK_ELEMENTS.min(n - start);
                read(a, start, len, x);
                read(b, start, len, y);
                [
                    crate::reduce::sum_squares(x),
                    crate::reduce::sum_squares(y),
                    crate::reduce::dot(x, y),
                ]
            },
        )
        .collect();
    parts.iter().fold([0.0; 3], |acc, p| {
        [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]]
    })
}

/// Whole-model quantities of `ties_reference` (SPEC §3): each contributor's
/// magnitude threshold over all its task-vector entries, and the sign of
/// the sum of all elected signs.
#[derive(Debug, Clone, PartialEq)]
pub struct TiesReference {
    /// Magnitude keys: entries with `|τ_k| ≥` the threshold are kept.
    pub thresholds: Vec<u32>,
    /// −1, 0 or +1: the sign a zero vote takes.
    pub majority: i8,
}

impl TiesReference {
    /// The disjoint mean of one element's trimmed task vectors: the vote is
    /// `sign(Σ_k τ_k)` (the majority sign when that is 0); the entries of
    /// the voted sign are averaged.
    pub fn disjoint_mean(&self, trimmed: &[f32]) -> f32 {
        let sum: f32 = trimmed.iter().sum();
        let sign = if sum > 0.0 {
            1
        } else if sum < 0.0 {
            -1
        } else {
            self.majority
        };
        let (mut total, mut count) = (0f32, 0u32);
        for &x in trimmed {
            if (sign > 0 && x > 0.0) || (sign < 0 && x < 0.0) {
                total += x;
                count += 1;
            }
        }
        total / count.max(1) as f32
    }

    /// Runs the whole-model passes over every tensor of the plan: three
    /// radix-select passes for the thresholds, one for the majority sign.
    pub fn compute(
        density: f64,
        tensors: &[(TensorView<'_>, Vec<TensorView<'_>>)],
    ) -> TiesReference {
        let m = tensors.first().map_or(0, |(_, c)| c.len());
        let total: usize = tensors.iter().map(|(b, _)| b.numel()).sum();
        if total == 0 || m == 0 {
            return TiesReference {
                thresholds: vec![0; m],
                majority: 0,
            };
        }
        // Keep ⌊density·K⌋ + 1 entries: the (K − ⌊density·K⌋)-th smallest and above.
        let rank = (trim_count(density, total) + 1).min(total);
        let mut selects = vec![RadixSelect::new(rank); m];
        let chunks: Vec<(usize, usize)> = tensors
            .iter()
            .enumerate()
            .flat_map(|(t, (b, _))| (0..b.numel()).step_by(CHUNK_ELEMENTS).map(move |s| (t, s)))
            .collect();
        let task_chunk =
            |t: usize, start: usize, k: usize, base: &mut Vec<f32>, tau: &mut Vec<f32>| {
                let (b, contributors) = &tensors[t];
                let len = CHUNK_ELEMENTS.min(b.numel() - start);
                read(b, start, len, base);
                read(&contributors[k], start, len, tau);
                for (x, y) in tau.iter_mut().zip(base.iter()) {
                    *x -= y;
                }
            };
        while !selects[0].is_done() {
            let hists: Vec<Box<[u64; RADIX_BUCKETS]>> = (0..m)
                .map(|k| {
                    chunks
                        .par_iter()
                        .map_init(
                            || (Vec::new(), Vec::new()),
                            |(base, tau), &(t, start)| {
                                task_chunk(t, start, k, base, tau);
                                let mut hist = Box::new([0u64; RADIX_BUCKETS]);
                                selects[k]
                                    .count_keys(tau.iter().map(|&x| magnitude_key(x)), &mut hist);
                                hist
                            },
                        )
                        .reduce(|| Box::new([0u64; RADIX_BUCKETS]), add_histograms)
                })
                .collect();
            for (select, hist) in selects.iter_mut().zip(&hists) {
                select.advance(hist);
            }
        }
        let thresholds: Vec<u32> = selects.iter().map(RadixSelect::key).collect();
        let signs: i64 = chunks
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(base, tau, sums): &mut (Vec<f32>, Vec<f32>, Vec<f32>), &(t, start)| {
                    for (k, &threshold) in thresholds.iter().enumerate() {
                        task_chunk(t, start, k, base, tau);
                        if k == 0 {
                            sums.clear();
                            sums.resize(tau.len(), 0.0);
                        }
                        for (s, &x) in sums.iter_mut().zip(tau.iter()) {
                            if magnitude_key(x) >= threshold {
                                *s += x;
                            }
                        }
                    }
                    sums.iter()
                        .map(|&s| (s > 0.0) as i64 - (s < 0.0) as i64)
                        .sum::<i64>()
                },
            )
            .sum();
        TiesReference {
            thresholds,
            majority: signs.signum() as i8,
        }
    }
}
