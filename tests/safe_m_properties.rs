//! Property tests of SAFE-M (SPEC §1.2–1.5) on random layers.
//!
//! Expectations are recomputed in the test from the SPEC: election counts and
//! thresholds by sorting, masks and conflicts element by element, `τ_u` from
//! those masks, and the projection in f64. The code's `score_matrix` /
//! `score_vector` supply the scores the masks are built from (they are
//! checked against the formula in f64 by the first property), so that a
//! score lying exactly on a threshold is the same number on both sides.
//!
//! Shapes are `rows ∈ 1..12`, `cols ∈ 1..40`. Values mix continuous floats
//! with quarter-integers (which make equal scores, zero task-vector entries
//! and exact ties likely); `x̄_A` is sometimes scaled to 1e-3, 1e-5 or 0, so
//! that `⟨d, d⟩` ranges from far above `ε = 1e-8` to below it.

use flatmerge::reduce::dot;
use flatmerge::safe_m::{
    fuse_block, merge_tensor, projection_coefficient, score_matrix, score_vector, split_row,
    Contributor, ContributorBlock, Election, ElectionParams, MaskCounts, ScoreForm, EPSILON,
};
use flatmerge::select::{elect_count, election_threshold, kth_largest};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::HashSet;

/// f32 machine epsilon (2⁻²³), in f64 for tolerance arithmetic.
const EPS32: f64 = f32::EPSILON as f64;

// ---------------------------------------------------------------------------
// Strategies

/// An entry of a weight, task vector, mean or direction. A `coarse` case draws
/// every entry from five values, so that equal scores (ties at the threshold)
/// are common; otherwise continuous floats are mixed with quarter-integers.
fn value(coarse: bool) -> BoxedStrategy<f32> {
    if coarse {
        prop::sample::select(vec![-1.0f32, -0.5, 0.5, 1.0, 2.0]).boxed()
    } else {
        prop_oneof![
            3 => -4.0f32..4.0,
            2 => (-16i32..=16).prop_map(|i| i as f32 / 4.0),
        ]
        .boxed()
    }
}

/// A task-vector entry: a value, or exactly 0 now and then.
fn tau_entry(coarse: bool) -> impl Strategy<Value = f32> {
    prop_oneof![4 => value(coarse), 1 => Just(0.0f32)]
}

fn density() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => 0.001f64..=1.0,
        1 => Just(1.0),
        1 => Just(0.2),
        1 => Just(0.5),
    ]
}

fn lambda() -> impl Strategy<Value = f32> {
    prop_oneof![1 => Just(1.0f32), 1 => Just(0.5), 2 => -0.5f32..2.0]
}

fn form() -> impl Strategy<Value = ScoreForm> {
    prop_oneof![
        2 => Just(ScoreForm::Sas { alpha: 1.0 }),
        1 => (0.0f32..3.0).prop_map(|alpha| ScoreForm::Sas { alpha }),
        2 => Just(ScoreForm::Ratio { epsilon: 1e-8 }),
    ]
}

fn x_scale() -> impl Strategy<Value = f32> {
    prop_oneof![6 => Just(1.0f32), 1 => Just(1e-3), 1 => Just(1e-5), 1 => Just(0.0)]
}

/// One model of a case: its weight (`W_C + τ`), `ȳ`, density and λs.
#[derive(Debug, Clone)]
struct Model {
    weight: Vec<f32>,
    y: Vec<f32>,
    density: f64,
    lambda_proj: f32,
    lambda_ortho: f32,
    form: ScoreForm,
}

/// A layer `[rows, cols]` with ancestor C, receiver A and two contributors.
#[derive(Debug, Clone)]
struct Case {
    rows: usize,
    cols: usize,
    x: Vec<f32>,
    ancestor: Vec<f32>,
    y_c: Vec<f32>,
    a: Model,
    b: Vec<Model>,
}

type ModelParts = (Vec<f32>, Vec<f32>, f64, f32, f32, ScoreForm);

fn model_parts(rows: usize, n: usize, coarse: bool) -> impl Strategy<Value = ModelParts> {
    (
        vec(tau_entry(coarse), n),
        vec(value(coarse), rows),
        density(),
        lambda(),
        lambda(),
        form(),
    )
}

fn build(w_c: &[f32], (tau, y, density, lambda_proj, lambda_ortho, form): ModelParts) -> Model {
    Model {
        weight: w_c.iter().zip(&tau).map(|(c, t)| c + t).collect(),
        y,
        density,
        lambda_proj,
        lambda_ortho,
        form,
    }
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..12, 1usize..40, prop::bool::weighted(0.3))
        .prop_flat_map(|(rows, cols, coarse)| {
            let n = rows * cols;
            (
                Just((rows, cols)),
                (vec(value(coarse), cols), x_scale()),
                vec(value(coarse), n),
                vec(value(coarse), rows),
                model_parts(rows, n, coarse),
                model_parts(rows, n, coarse),
                model_parts(rows, n, coarse),
            )
        })
        .prop_map(|((rows, cols), (x, scale), w_c, y_c, a, b1, b2)| Case {
            rows,
            cols,
            x: x.iter().map(|v| v * scale).collect(),
            a: build(&w_c, a),
            b: vec![build(&w_c, b1), build(&w_c, b2)],
            ancestor: w_c,
            y_c,
        })
}

// ---------------------------------------------------------------------------
// Independent reference

/// SPEC §1.2: `m = ⌈k·n − 10⁻⁶⌉` clamped to `[1, n]`.
fn spec_count(density: f64, n: usize) -> usize {
    ((density * n as f64 - 1e-6).ceil()).clamp(1.0, n as f64) as usize
}

/// The m-th largest score by a full sort (scores that are not positive count as 0).
fn sorted_threshold(scores: &[f32], density: f64) -> f32 {
    let m = spec_count(density, scores.len());
    let mut keys: Vec<f32> = scores
        .iter()
        .map(|&s| if s > 0.0 { s } else { 0.0 })
        .collect();
    keys.sort_by(|a, b| b.total_cmp(a));
    keys[m - 1]
}

/// `M = (S ≥ t) ∧ (S > 0)` with the sorted threshold.
fn spec_mask(scores: &[f32], density: f64) -> Vec<bool> {
    let t = sorted_threshold(scores, density);
    scores.iter().map(|&s| s >= t && s > 0.0).collect()
}

fn count(mask: &[bool]) -> u64 {
    mask.iter().filter(|&&b| b).count() as u64
}

/// One contributor's masks, `τ_u` and counts, from the SPEC.
#[derive(Debug)]
struct ContributorRef {
    scores: Vec<f32>,
    elected: Vec<bool>,
    conflict: Vec<bool>,
    kept: Vec<bool>,
    tau_b: Vec<f32>,
    tau_u: Vec<f32>,
    counts: MaskCounts,
}

#[derive(Debug)]
struct Reference {
    scores_a: Vec<f32>,
    elected_a: Vec<bool>,
    tau_a: Vec<f32>,
    contributors: Vec<ContributorRef>,
}

impl Case {
    /// Elements of a weight (`rows·cols`) or of a bias (`rows`, the first entries).
    fn n(&self, is_bias: bool) -> usize {
        if is_bias {
            self.rows
        } else {
            self.rows * self.cols
        }
    }

    fn part<'a>(&self, w: &'a [f32], is_bias: bool) -> &'a [f32] {
        &w[..self.n(is_bias)]
    }

    fn u(&self, y: &[f32]) -> Vec<f32> {
        y.iter().zip(&self.y_c).map(|(y, c)| y - c).collect()
    }

    fn scores(&self, model: &Model, is_bias: bool) -> Vec<f32> {
        let (w, y) = (self.part(&model.weight, is_bias), &model.y);
        let mut s = vec![f32::NAN; w.len()];
        if is_bias {
            score_vector(w, &self.u(y), model.form, &mut s);
        } else {
            score_matrix(w, &self.u(y), &self.x, model.form, &mut s);
        }
        s
    }

    fn reference(&self, is_bias: bool) -> Reference {
        let n = self.n(is_bias);
        let anc = self.part(&self.ancestor, is_bias);
        let tau_of = |w: &[f32]| -> Vec<f32> { (0..n).map(|i| w[i] - anc[i]).collect() };
        let scores_a = self.scores(&self.a, is_bias);
        let elected_a = spec_mask(&scores_a, self.a.density);
        let tau_a = tau_of(&self.a.weight);
        let contributors = self
            .b
            .iter()
            .map(|b| {
                let scores = self.scores(b, is_bias);
                let elected = spec_mask(&scores, b.density);
                let tau_b = tau_of(&b.weight);
                // K = M_A ∧ M_B ∧ (τ_A·τ_B < 0); the product in f64 cannot underflow.
                let conflict: Vec<bool> = (0..n)
                    .map(|i| {
                        elected_a[i] && elected[i] && (tau_a[i] as f64) * (tau_b[i] as f64) < 0.0
                    })
                    .collect();
                let kept: Vec<bool> = (0..n).map(|i| elected[i] && !conflict[i]).collect();
                let tau_u = (0..n)
                    .map(|i| if kept[i] { tau_b[i] } else { 0.0 })
                    .collect();
                let counts = MaskCounts {
                    receiver_elected: count(&elected_a),
                    elected: count(&elected),
                    conflicts: count(&conflict),
                    kept: count(&kept),
                };
                ContributorRef {
                    scores,
                    elected,
                    conflict,
                    kept,
                    tau_b,
                    tau_u,
                    counts,
                }
            })
            .collect();
        Reference {
            scores_a,
            elected_a,
            tau_a,
            contributors,
        }
    }

    fn merge(&self, contributors: &[Model], is_bias: bool) -> flatmerge::safe_m::MergedTensor {
        let params = |m: &Model| ElectionParams {
            density: m.density,
            form: m.form,
        };
        let cs: Vec<Contributor<'_>> = contributors
            .iter()
            .map(|b| Contributor {
                weight: self.part(&b.weight, is_bias),
                y_mean: &b.y,
                election: params(b),
                lambda_proj: b.lambda_proj,
                lambda_ortho: b.lambda_ortho,
            })
            .collect();
        merge_tensor(
            self.part(&self.a.weight, is_bias),
            &self.a.y,
            params(&self.a),
            self.part(&self.ancestor, is_bias),
            &self.y_c,
            &self.x,
            &cs,
            is_bias,
            EPSILON,
        )
    }
}

/// `⟨τ, d⟩ / (⟨d, d⟩ + ε)` in f64.
fn reference_coefficient(row: &[f32], d: &[f32]) -> f64 {
    let td: f64 = row.iter().zip(d).map(|(&t, &x)| t as f64 * x as f64).sum();
    let dd: f64 = d.iter().map(|&x| x as f64 * x as f64).sum();
    td / (dd + EPSILON as f64)
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm64(a: &[f32]) -> f64 {
    dot64(a, a).sqrt()
}

/// What `fuse_block` decides for each element alone: (elected by B, conflict, kept),
/// read from its counts on one-element blocks (bias layout, `λ_proj = 1`).
fn per_element_decisions(
    receiver: &[f32],
    ancestor: &[f32],
    a: (&[f32], f32),
    weight_b: &[f32],
    b: (&[f32], f32),
) -> Vec<(bool, bool, bool)> {
    let mut scratch = Vec::new();
    (0..receiver.len())
        .map(|i| {
            let one = i..i + 1;
            let mut out = [f32::NAN];
            let mut counts = [MaskCounts::default()];
            fuse_block(
                &receiver[one.clone()],
                &ancestor[one.clone()],
                Election {
                    scores: &a.0[one.clone()],
                    threshold: a.1,
                },
                &[ContributorBlock {
                    weight: &weight_b[one.clone()],
                    election: Election {
                        scores: &b.0[one],
                        threshold: b.1,
                    },
                    lambda_proj: 1.0,
                    lambda_ortho: 0.5,
                }],
                None,
                EPSILON,
                &mut out,
                &mut scratch,
                &mut counts,
            );
            let c = counts[0];
            assert!(c.elected <= 1 && c.conflicts <= 1 && c.kept <= 1, "{c:?}");
            assert_eq!(c.elected, c.conflicts + c.kept, "|M_B| = |K| + |M'_B|");
            // b* = b_A + τ_u: τ_B where kept, nothing otherwise.
            let tau_b = weight_b[i] - ancestor[i];
            let add = if c.kept == 1 { tau_b } else { 0.0 };
            let want = receiver[i] as f64 + add as f64;
            let tol = EPS32 * (receiver[i].abs() as f64 + add.abs() as f64);
            assert!(
                (out[0] as f64 - want).abs() <= tol,
                "element {i}: out {} vs {want}",
                out[0]
            );
            (c.elected == 1, c.conflicts == 1, c.kept == 1)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `score_matrix` / `score_vector` follow SPEC §1.2's formula (computed in f64).
    #[test]
    fn scores_follow_the_formula(c in case()) {
        let u = c.u(&c.b[0].y);
        let (alpha, eps, sas) = match c.b[0].form {
            ScoreForm::Sas { alpha } => (alpha as f64, 0.0, true),
            ScoreForm::Ratio { epsilon } => (0.0, epsilon as f64, false),
        };
        let formula = |w: f32, g: f64| {
            let w = w as f64;
            if sas { (w * g).abs() / (1.0 + alpha * g * g) } else { (w * g).abs() / (g * g + eps) }
        };
        let s = c.scores(&c.b[0], false);
        for (r, &u_r) in u.iter().enumerate() {
            for j in 0..c.cols {
                let i = r * c.cols + j;
                let want = formula(c.b[0].weight[i], u_r as f64 * c.x[j] as f64);
                prop_assert!(s[i] >= 0.0, "score {} at {i}", s[i]);
                prop_assert!((s[i] as f64 - want).abs() <= 1e-5 * want + 1e-30,
                    "({r},{j}): {} vs {want}", s[i]);
            }
        }
        let s = c.scores(&c.b[0], true);
        for (r, &u_r) in u.iter().enumerate() {
            let want = formula(c.b[0].weight[r], u_r as f64);
            prop_assert!((s[r] as f64 - want).abs() <= 1e-5 * want + 1e-30,
                "bias {r}: {} vs {want}", s[r]);
        }
    }

    /// SPEC §1.3 invariants per row of `τ_u`: `P = c·d` with `c = ⟨τ_u,d⟩/(⟨d,d⟩+ε)`,
    /// `P + O = τ_u`, `⟨O, d⟩ ≈ 0`, `⟨P, O⟩ ≈ 0`.
    #[test]
    fn projection_splits_rows_into_orthogonal_parts(c in case()) {
        let reference = c.reference(false);
        let d = &c.x;
        let dd = dot(d, d);
        let d_norm = norm64(d);
        for k in &reference.contributors {
            for row in k.tau_u.chunks_exact(c.cols) {
                let coefficient = projection_coefficient(row, d, dd, EPSILON);
                let mut p = vec![f32::NAN; c.cols];
                let mut o = vec![f32::NAN; c.cols];
                split_row(row, d, coefficient, &mut p, &mut o);
                let c_ref = reference_coefficient(row, d);
                for j in 0..c.cols {
                    // P is the projection onto d, computed independently in f64.
                    let p_ref = c_ref * d[j] as f64;
                    prop_assert!((p[j] as f64 - p_ref).abs() <= 4.0 * EPS32 * p_ref.abs() + 1e-30,
                        "P[{j}] = {} vs {p_ref}", p[j]);
                    // P + O = τ_u up to the rounding of O = τ_u − P.
                    let sum = p[j] as f64 + o[j] as f64;
                    let tol = 2.0 * EPS32 * (row[j].abs() as f64 + p[j].abs() as f64);
                    prop_assert!((sum - row[j] as f64).abs() <= tol,
                        "P + O = {sum} vs τ_u = {}", row[j]);
                }
                // Orthogonality. ‖τ_u‖ (not ‖O‖) scales the rounding: when τ_u is nearly
                // parallel to d, O is a small difference of large terms. The exact
                // residual ⟨τ,d⟩·ε/(⟨d,d⟩+ε) is what ε leaves when d ≈ 0.
                let tau_norm = norm64(row);
                let residual = dot64(row, d).abs() * EPSILON as f64 / (dd + EPSILON as f64);
                let od = dot64(&o, d);
                prop_assert!(od.abs() <= 1e-4 * tau_norm * d_norm + residual * 1.001,
                    "⟨O,d⟩ = {od}, ‖τ‖ = {tau_norm}, ‖d‖ = {d_norm}");
                let po = dot64(&p, &o);
                let p_norm = norm64(&p);
                prop_assert!(po.abs() <= 1e-4 * p_norm * tau_norm + c_ref.abs() * residual * 1.001,
                    "⟨P,O⟩ = {po}, ‖P‖ = {p_norm}, ‖τ‖ = {tau_norm}");
            }
        }
    }

    /// With `λ_proj = λ_ortho = λ_k` per contributor, `W* = W_A + Σ_k λ_k τ_u,k`
    /// (SPEC §1.3, §1.5); for a bias, `b* = b_A + Σ_k λ_proj,k τ_u,k` whatever `λ_ortho`.
    #[test]
    fn equal_lambdas_add_lambda_times_tau_u(mut c in case(), is_bias in any::<bool>()) {
        if !is_bias {
            for b in &mut c.b {
                b.lambda_ortho = b.lambda_proj;
            }
        }
        let reference = c.reference(is_bias);
        let merged = c.merge(&c.b, is_bias);
        let w_a = c.part(&c.a.weight, is_bias);
        let cols = if is_bias { c.rows } else { c.cols };
        for (i, &got) in merged.values.iter().enumerate() {
            let mut want = w_a[i] as f64;
            let mut magnitude = w_a[i].abs() as f64;
            for (b, k) in c.b.iter().zip(&reference.contributors) {
                let lambda = b.lambda_proj as f64;
                want += lambda * k.tau_u[i] as f64;
                // P and O can each be as large as ‖τ_u[r]‖ when they cancel.
                let row = &k.tau_u[i / cols * cols..][..cols];
                magnitude += lambda.abs() * (k.tau_u[i].abs() as f64 + 2.0 * norm64(row));
            }
            let tol = 8.0 * EPS32 * magnitude + 1e-30;
            prop_assert!((got as f64 - want).abs() <= tol,
                "element {i}: got {got}, want {want} (tol {tol})");
        }
    }

    /// General λs: `W* = W_A + Σ_k (λ_proj P_k + λ_ortho O_k)` with `P_k`, `O_k` from
    /// the f64 projection of `τ_u,k`; and `MaskCounts` match counts recomputed here.
    #[test]
    fn merge_tensor_follows_the_decomposition_and_counts(c in case(), is_bias in any::<bool>(),
                                                         two in any::<bool>()) {
        let contributors = if two { &c.b[..] } else { &c.b[..1] };
        let reference = c.reference(is_bias);
        let merged = c.merge(contributors, is_bias);
        prop_assert_eq!(merged.counts.len(), contributors.len());
        for (got, k) in merged.counts.iter().zip(&reference.contributors) {
            prop_assert_eq!(*got, k.counts);
        }
        let w_a = c.part(&c.a.weight, is_bias);
        let n = w_a.len();
        let mut want: Vec<f64> = w_a.iter().map(|&w| w as f64).collect();
        let mut magnitude: Vec<f64> = w_a.iter().map(|&w| w.abs() as f64).collect();
        for (b, k) in contributors.iter().zip(&reference.contributors) {
            let (lp, lo) = (b.lambda_proj as f64, b.lambda_ortho as f64);
            if is_bias {
                for i in 0..n {
                    want[i] += lp * k.tau_u[i] as f64;
                    magnitude[i] += lp.abs() * k.tau_u[i].abs() as f64;
                }
                continue;
            }
            for (r, row) in k.tau_u.chunks_exact(c.cols).enumerate() {
                let coefficient = reference_coefficient(row, &c.x);
                for (j, &t) in row.iter().enumerate() {
                    let p = coefficient * c.x[j] as f64;
                    let o = t as f64 - p;
                    want[r * c.cols + j] += lp * p + lo * o;
                    magnitude[r * c.cols + j] += (lp.abs() + lo.abs()) * (t.abs() as f64 + p.abs());
                }
            }
        }
        for i in 0..n {
            let tol = 8.0 * EPS32 * magnitude[i] + 1e-30;
            prop_assert!((merged.values[i] as f64 - want[i]).abs() <= tol,
                "element {i}: got {}, want {} (tol {tol})", merged.values[i], want[i]);
        }
    }

    /// No conflict survives: every element `fuse_block` keeps from B is elected by B
    /// and is not (elected by A with the opposite task-vector sign); and its whole
    /// decision matches the SPEC's `M_B`, `K`, `M'_B`.
    #[test]
    fn no_conflict_survives_in_the_final_mask(c in case()) {
        let reference = c.reference(false);
        let t_a = sorted_threshold(&reference.scores_a, c.a.density);
        for (b, k) in c.b.iter().zip(&reference.contributors) {
            let t_b = sorted_threshold(&k.scores, b.density);
            let decisions = per_element_decisions(
                &c.a.weight, &c.ancestor, (&reference.scores_a, t_a), &b.weight, (&k.scores, t_b));
            for (i, &(elected, conflict, kept)) in decisions.iter().enumerate() {
                if kept {
                    let (ta, tb) = (reference.tau_a[i], k.tau_b[i]);
                    let opposite = (ta > 0.0 && tb < 0.0) || (ta < 0.0 && tb > 0.0);
                    prop_assert!(k.elected[i], "element {i} kept but not elected by B");
                    prop_assert!(!(reference.elected_a[i] && opposite),
                        "element {i}: conflict kept (τ_A = {ta}, τ_B = {tb})");
                }
                prop_assert_eq!(elected, k.elected[i], "M_B at {}", i);
                prop_assert_eq!(conflict, k.conflict[i], "K at {}", i);
                prop_assert_eq!(kept, k.kept[i], "M'_B at {}", i);
            }
        }
    }

    /// With distinct positive scores exactly `m = ⌈k·n − 10⁻⁶⌉` are elected.
    #[test]
    fn elected_count_is_m_for_distinct_positive_scores(
        raw in vec(prop_oneof![1e-6f32..1e3, (1u32..4000).prop_map(|i| i as f32 / 64.0)], 1..500),
        density in prop_oneof![0.001f64..=1.0, (1u32..=20).prop_map(|i| i as f64 / 20.0)],
    ) {
        let mut seen = HashSet::new();
        let scores: Vec<f32> = raw.into_iter().filter(|s| seen.insert(s.to_bits())).collect();
        let n = scores.len();
        let m = spec_count(density, n);
        prop_assert_eq!(elect_count(density, n), m);
        let t = election_threshold(&scores, density);
        let elected = scores.iter().filter(|&&s| s >= t && s > 0.0).count();
        prop_assert_eq!(elected, m, "threshold {}", t);
    }

    /// With `k = 1` and no conflicts (τ_A and τ_B never of opposite signs) the kept
    /// mask is exactly `{S_B > 0}`: every element with `W_B·g' ≠ 0`.
    #[test]
    fn density_one_without_conflicts_keeps_every_positive_score(mut c in case()) {
        c.a.density = 1.0;
        let anc = c.ancestor.clone();
        let tau_a: Vec<f32> = c.a.weight.iter().zip(&anc).map(|(w, a)| w - a).collect();
        for b in &mut c.b {
            b.density = 1.0;
            // τ_B := |τ_B| with τ_A's sign (kept as is where τ_A = 0).
            for i in 0..anc.len() {
                let tb = b.weight[i] - anc[i];
                let tb = if tau_a[i] != 0.0 { tb.abs().copysign(tau_a[i]) } else { tb };
                b.weight[i] = anc[i] + tb;
            }
        }
        let reference = c.reference(false);
        let merged = c.merge(&c.b, false);
        for ((b, k), counts) in c.b.iter().zip(&reference.contributors).zip(&merged.counts) {
            let u = c.u(&b.y);
            // S_B > 0 exactly when the salience |w·g'| is not zero (the denominator is finite).
            let positive: Vec<bool> = (0..c.rows * c.cols)
                .map(|i| b.weight[i] * (u[i / c.cols] * c.x[i % c.cols]) != 0.0)
                .collect();
            let t_b = election_threshold(&k.scores, 1.0);
            let t_a = election_threshold(&reference.scores_a, 1.0);
            let decisions = per_element_decisions(
                &c.a.weight, &c.ancestor, (&reference.scores_a, t_a), &b.weight, (&k.scores, t_b));
            let kept: Vec<bool> = decisions.iter().map(|d| d.2).collect();
            prop_assert_eq!(&kept, &positive);
            prop_assert_eq!(counts.conflicts, 0);
            prop_assert_eq!(counts.kept, count(&positive));
        }
    }

    /// `kth_largest(s, m)` is the m-th element of `s` sorted in descending order
    /// (non-positive and NaN scores count as 0), for every m, ties included.
    #[test]
    fn kth_largest_matches_a_descending_sort(
        scores in vec(prop_oneof![
            4 => 0.0f32..10.0,
            3 => (0u32..8).prop_map(|i| i as f32 * 0.5),
            1 => Just(1e-40f32),
            1 => Just(f32::MIN_POSITIVE),
            1 => Just(-1.0f32),
            1 => Just(f32::NAN),
            1 => Just(f32::MAX),
        ], 1..300),
    ) {
        let mut sorted: Vec<f32> = scores.iter().map(|&s| if s > 0.0 { s } else { 0.0 }).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for m in 1..=scores.len() {
            let got = kth_largest(&scores, m);
            prop_assert_eq!(got.to_bits(), sorted[m - 1].to_bits(), "m = {}: {} vs {}",
                m, got, sorted[m - 1]);
        }
    }

    /// `fuse_block` on two blocks of rows (split anywhere) gives bit-identical values
    /// and the same total counts as on one block; likewise a bias split anywhere.
    #[test]
    fn fuse_block_is_invariant_under_chunking(c in case(), split in any::<Index>(),
                                              is_bias in any::<bool>()) {
        let n = c.n(is_bias);
        let (unit, units) = if is_bias { (1, c.rows) } else { (c.cols, c.rows) };
        let cut = split.index(units + 1) * unit;
        let scores_a = c.scores(&c.a, is_bias);
        let t_a = election_threshold(&scores_a, c.a.density);
        let scores_b: Vec<Vec<f32>> = c.b.iter().map(|b| c.scores(b, is_bias)).collect();
        let t_b: Vec<f32> = c.b.iter().zip(&scores_b).map(|(b, s)| election_threshold(s, b.density)).collect();
        let dd = dot(&c.x, &c.x);
        let direction = (!is_bias).then_some((&c.x[..], dd));
        let run = |range: std::ops::Range<usize>, out: &mut [f32], counts: &mut [MaskCounts]| {
            let blocks: Vec<ContributorBlock<'_>> = c.b.iter().enumerate().map(|(k, b)| ContributorBlock {
                weight: &b.weight[range.clone()],
                election: Election { scores: &scores_b[k][range.clone()], threshold: t_b[k] },
                lambda_proj: b.lambda_proj,
                lambda_ortho: b.lambda_ortho,
            }).collect();
            let mut scratch = Vec::new();
            fuse_block(
                &c.a.weight[range.clone()],
                &c.ancestor[range.clone()],
                Election { scores: &scores_a[range], threshold: t_a },
                &blocks,
                direction,
                EPSILON,
                out,
                &mut scratch,
                counts,
            );
        };
        let mut whole = vec![f32::NAN; n];
        let mut whole_counts = [MaskCounts::default(); 2];
        run(0..n, &mut whole, &mut whole_counts);
        let mut pieces = vec![f32::NAN; n];
        let mut piece_counts = [MaskCounts::default(); 2];
        let (first, second) = pieces.split_at_mut(cut);
        run(0..cut, first, &mut piece_counts);
        run(cut..n, second, &mut piece_counts);
        for i in 0..n {
            prop_assert_eq!(whole[i].to_bits(), pieces[i].to_bits(),
                "element {} (cut at {}): {} vs {}", i, cut, whole[i], pieces[i]);
        }
        prop_assert_eq!(whole_counts, piece_counts);
        // And the one-block result is SAFE-M's (counts recomputed from the SPEC).
        let reference = c.reference(is_bias);
        for (got, k) in whole_counts.iter().zip(&reference.contributors) {
            prop_assert_eq!(*got, k.counts);
        }
    }
}
