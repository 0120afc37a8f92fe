//! The task-arithmetic family (SPEC §3, mergekit's generalized task
//! arithmetic): `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
//! `breadcrumbs`, `breadcrumbs_ties`, `della` and `della_linear` share one
//! kernel: sparsify each task vector `τ_k = W_k − W_base` (magnitude trim,
//! DARE's random drop, breadcrumbs' window, DELLA's ranked drop, or
//! nothing), weight it, take the TIES sign vote or a plain sum, normalise,
//! scale by `λ` and add to the base.
//!
//! Task arithmetic, DARE and plain TIES stream their task vectors chunk by
//! chunk (a first pass finds DARE's norms or TIES' thresholds); the other
//! members decode whole task vectors once. Selections are exact and
//! thread-independent. Kernels live in [`crate::baselines`].

use super::mergekit::{self, def, flag, subtract, weight, Counts, MergekitTensor};
use super::{BaseModel, Method, Roles, SettingsInput, TensorInput};
use crate::baselines::{
    breadcrumbs_window, count_above, count_equal, dare_drop_in_place, dare_keep, dare_rescale,
    dare_stream, keep_rank_window, task_arithmetic_combine, trim_count, TopK,
};
use crate::config::params::{Default as ParamDefault, Kind, ParamDef, Scope};
use crate::config::{MergeConfig, MethodSettings};
use crate::dtype::Dtype;
use crate::engine::chunks::{par_encode, parallel_select, read, rows_per_chunk};
use crate::engine::{MergePart, CHUNK_ELEMENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorView;
use crate::plan::{Inputs, Plan};
use crate::report::{Sparsity, TensorOutcome};
use crate::select::{InsideKeys, KeyOf, SampleBracket, SAMPLE_SIZE};
use rayon::prelude::*;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
}

/// One member of the family, as registered.
pub struct Sparsifier {
    name: &'static str,
    summary: &'static str,
    family: Family,
}

/// `W_base + λ Σ w_k τ_k`.
pub const TASK_ARITHMETIC: Sparsifier = Sparsifier {
    name: "task_arithmetic",
    summary: "`W_base + λ Σ w_k τ_k`",
    family: Family::TaskArithmetic,
};
/// TIES: magnitude trim, sign vote, disjoint mean.
pub const TIES: Sparsifier = Sparsifier {
    name: "ties",
    summary: "TIES: magnitude trim, sign vote, disjoint mean",
    family: Family::Ties,
};
/// DARE drop and rescale, then a linear sum of task vectors.
pub const DARE_LINEAR: Sparsifier = Sparsifier {
    name: "dare_linear",
    summary: "DARE random drop and rescale, then a weighted sum",
    family: Family::DareLinear,
};
/// DARE drop and rescale, then the TIES vote.
pub const DARE_TIES: Sparsifier = Sparsifier {
    name: "dare_ties",
    summary: "DARE random drop and rescale, then the TIES vote",
    family: Family::DareTies,
};
/// Model breadcrumbs: drop the smallest and the largest magnitudes.
pub const BREADCRUMBS: Sparsifier = Sparsifier {
    name: "breadcrumbs",
    summary: "model breadcrumbs: drop the smallest and the largest magnitudes",
    family: Family::Breadcrumbs,
};
/// Breadcrumbs with the TIES vote.
pub const BREADCRUMBS_TIES: Sparsifier = Sparsifier {
    name: "breadcrumbs_ties",
    summary: "breadcrumbs, then the TIES vote",
    family: Family::BreadcrumbsTies,
};
/// DELLA: magnitude-ranked random drop, rescale, TIES vote.
pub const DELLA: Sparsifier = Sparsifier {
    name: "della",
    summary: "DELLA: magnitude-ranked random drop, rescale, TIES vote",
    family: Family::Della,
};
/// DELLA without the vote.
pub const DELLA_LINEAR: Sparsifier = Sparsifier {
    name: "della_linear",
    summary: "DELLA without the vote",
    family: Family::DellaLinear,
};

impl Method for Sparsifier {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn roles(&self) -> Roles {
        Roles::OverBase
    }

    fn base_model(&self) -> BaseModel {
        BaseModel::Required
    }

    /// mergekit 0.1.5's names and defaults.
    fn params(&self) -> Vec<ParamDef> {
        let gta = |normalize: bool, rescale: bool| {
            vec![
                weight(),
                def(
                    "density",
                    Scope::PerModel,
                    Kind::UNIT,
                    ParamDefault::Number(1.0),
                ),
                flag("normalize", normalize),
                flag("rescale", rescale),
                def(
                    "lambda",
                    Scope::Shared,
                    Kind::ANY,
                    ParamDefault::Number(1.0),
                ),
                flag("int8_mask", false),
            ]
        };
        let with = |mut defs: Vec<ParamDef>, extra: ParamDef| {
            defs.push(extra);
            defs
        };
        let gamma = def(
            "gamma",
            Scope::PerModel,
            Kind::UNIT,
            ParamDefault::Number(0.01),
        );
        let della_eps = def(
            "epsilon",
            Scope::PerModel,
            Kind::UNIT,
            ParamDefault::Number(0.15),
        );
        match self.family {
            Family::TaskArithmetic => gta(false, false),
            Family::Ties => gta(true, false),
            Family::DareLinear | Family::DareTies => gta(false, true),
            Family::Breadcrumbs | Family::BreadcrumbsTies => with(gta(false, false), gamma),
            Family::Della => with(gta(true, true), della_eps),
            Family::DellaLinear => with(gta(false, true), della_eps),
        }
    }

    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }

    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan_optional(config, inputs, Counts::AtLeastOne, &|_, _| None)
    }

    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let tensor = Sparsified {
            t: MergekitTensor::new(merge, input)?,
            kind: self.family,
        };
        tensor.task_arithmetic(input.plan.out_dtype)
    }

    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}

/// One tensor of a family member.
struct Sparsified<'a> {
    t: MergekitTensor<'a>,
    kind: Family,
}

impl<'a> std::ops::Deref for Sparsified<'a> {
    type Target = MergekitTensor<'a>;

    fn deref(&self) -> &Self::Target {
        &self.t
    }
}

impl Sparsified<'_> {
    /// mergekit's generalized task arithmetic: sparsify each `τ_k`, weight,
    /// vote (or sum), normalise, scale by `λ`, add to the base.
    fn task_arithmetic(&self, out: Dtype) -> Result<(Vec<u8>, TensorOutcome)> {
        if matches!(
            self.kind,
            Family::TaskArithmetic | Family::DareLinear | Family::DareTies
        ) {
            return self.streamed_task_arithmetic(out, None);
        }
        if self.kind == Family::Ties && !self.flag("rescale") {
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
            let rescaled = match self.kind {
                Family::TaskArithmetic => None,
                Family::Ties => {
                    let keep = trim_count(density, tau.len());
                    rescaled(tau, rescale, |tau| keep_top(tau, keep, 0))
                }
                Family::Breadcrumbs | Family::BreadcrumbsTies if density < 1.0 => {
                    let gamma = self.number("gamma", Some(k))?;
                    let (a, b) = breadcrumbs_window(density, gamma, tau.len());
                    rescaled(tau, rescale, |tau| keep_top(tau, b, a))
                }
                Family::Della | Family::DellaLinear if density < 1.0 => {
                    let epsilon = self.number("epsilon", Some(k))?;
                    if !(density - epsilon > 0.0 && density + epsilon < 1.0) {
                        return Err(Error::new(
                            ErrorKind::Config,
                            format!("della needs 0 < density − epsilon and density + epsilon < 1; got density {density}, epsilon {epsilon} for models[{}]", self.model_index[k]),
                        )
                        .with_tensor(&self.plan.name));
                    }
                    let key = dare_stream(self.seed, self.plan.contributors[k], &self.plan.name);
                    Some(della(tau, &self.plan.shape, key, density, epsilon, rescale))
                }
                _ => None,
            };
            sparsity.push(Sparsity {
                contributor: self.plan.contributors[k],
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
        let dare = matches!(self.kind, Family::DareLinear | Family::DareTies);
        let rescale = self.flag("rescale");
        let mut drops: Vec<Option<DareDrop>> = Vec::new();
        for (k, view) in self.contributors.iter().enumerate() {
            let density = self.number("density", Some(k))?;
            if !dare || density >= 1.0 {
                drops.push(None);
                continue;
            }
            // The stream of the contributor's index, not of its place among
            // the holders of this tensor: masks do not move when one lacks it.
            let key = dare_stream(self.seed, self.plan.contributors[k], &self.plan.name);
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
            .map(|(k, (kept, drop))| Sparsity {
                contributor: self.plan.contributors[k],
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
    /// chunk, as runs where many are equal (which also gives each chunk's
    /// ties). `None` when a sample misleads or the bracket holds too many
    /// distinct keys: the caller then holds the task vectors.
    fn streamed_top_k(&self, keeps: &[usize]) -> Option<Vec<StreamedTop>> {
        let n = self.plan.numel();
        if n < 4 * SAMPLE_SIZE {
            return None;
        }
        let base = self.base().ok()?;
        let chunks = n.div_ceil(CHUNK_ELEMENTS);
        let element = |view: &TensorView<'_>, i: usize| view.element(i);
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
        let parts: Vec<Vec<(u64, InsideKeys)>> = (0..chunks)
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
                            InsideKeys::scan(tau, KeyOf::Magnitude, bracket)
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
            let entries: usize = parts.iter().map(|p| p[k].1.entries()).sum();
            if entries > SampleBracket::candidate_cap(n) {
                return None;
            }
            let threshold =
                bracket.resolve_chunks(above_bracket, parts.iter().map(|p| &p[k].1), keep)?;
            let mut above = 0u64;
            let mut ties_before = Vec::with_capacity(chunks);
            let mut ties = 0u64;
            for part in &parts {
                let (above_chunk, inside) = &part[k];
                let (above_here, ties_here) = inside.above_and_equal(threshold);
                ties_before.push(ties);
                above += above_chunk + above_here;
                ties += ties_here;
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
                self.kind,
                Family::Ties | Family::DareTies | Family::BreadcrumbsTies | Family::Della
            ),
            normalize: self.flag("normalize"),
            lambda: self.number("lambda", None)? as f32,
        })
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
