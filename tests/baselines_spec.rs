//! Hand-computed cases for the baseline methods (SPEC §3, mergekit 0.1.5
//! semantics): tiny F32 models written to disk, configs given as YAML text,
//! merged through `PreparedMerge` exactly as the CLI does, F32 output read
//! back. Every expected value below is derived by hand in the comments;
//! values compare exactly where the f32 operations are replayed here, and
//! within a stated tolerance where a transcendental function is involved.

use flatmerge::report::MergeReport;
use flatmerge_suite::{f32_tensors, spec_dare_uniform, tempdir, try_merge_yaml, write_f32_model};
use std::collections::BTreeMap;
use std::path::Path;

/// A scratch folder of models and merges.
struct Bench {
    dir: tempfile::TempDir,
    runs: usize,
}

/// A merge's output tensors (decoded to f32) and its report.
struct Merged {
    tensors: BTreeMap<String, Vec<f32>>,
    report: MergeReport,
}

impl Merged {
    fn get(&self, name: &str) -> &[f32] {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the output"))
    }

    fn w(&self) -> &[f32] {
        self.get("w")
    }

    /// `(kept, rescale)` the report gives contributor `k` on tensor `name`.
    fn sparsity(&self, name: &str, k: usize) -> (u64, Option<f32>) {
        let t = self
            .report
            .tensors
            .iter()
            .find(|t| t.plan.name == name)
            .unwrap_or_else(|| panic!("{name} missing from the report"));
        let s = t
            .sparsity
            .iter()
            .find(|s| s.contributor == k)
            .unwrap_or_else(|| {
                panic!(
                    "no sparsity for contributor {k} on {name}: {:?}",
                    t.sparsity
                )
            });
        (s.kept, s.rescale)
    }
}

impl Bench {
    fn new() -> Bench {
        Bench {
            dir: tempdir(),
            runs: 0,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A model `name` with one tensor `w` of shape `[values.len()]`.
    fn vector(&self, name: &str, values: &[f32]) {
        self.model(name, &[("w", vec![values.len()], values.to_vec())]);
    }

    fn model(&self, name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        write_f32_model(&self.path().join(name), tensors);
    }

    fn try_run(&mut self, yaml: &str) -> flatmerge::Result<Merged> {
        self.try_run_seeded(yaml, 0)
    }

    fn try_run_seeded(&mut self, yaml: &str, seed: u64) -> flatmerge::Result<Merged> {
        self.runs += 1;
        let out = self.path().join(format!("out{}", self.runs));
        let summary = try_merge_yaml(self.path(), yaml, seed, Some(2), &out)?;
        Ok(Merged {
            tensors: f32_tensors(&out),
            report: summary.report,
        })
    }

    fn run(&mut self, yaml: &str) -> Merged {
        self.try_run(yaml)
            .unwrap_or_else(|e| panic!("merge failed: {e}\nconfig:\n{yaml}"))
    }

    /// The error of a config that must fail (at parsing, planning or merging).
    fn error(&mut self, yaml: &str) -> String {
        match self.try_run(yaml) {
            Ok(_) => panic!("config accepted but should fail:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i}: got {g}, want {w} (tolerance {tol})\n got  {got:?}\n want {want:?}"
        );
    }
}

fn assert_contains(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "error message lacks `{needle}`: {message}"
        );
    }
}

// ---------------------------------------------------------------- linear

#[test]
fn linear_divides_by_the_weight_sum_unless_normalize_is_false() {
    let mut b = Bench::new();
    b.vector("A", &[1.0, 2.0, 3.0, 4.0]);
    b.vector("B", &[3.0, 6.0, -1.0, 0.0]);
    let yaml = |extra: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n  - model: ./B\n    parameters:\n      weight: 3.0\n{extra}dtype: float32\n"
        )
    };
    // Σ w x = [1 + 9, 2 + 18, 3 − 3, 4 + 0] = [10, 20, 0, 4]; Σ w = 4.
    let default = b.run(&yaml(""));
    assert_eq!(
        default.w(),
        [2.5, 5.0, 0.0, 1.0],
        "normalize defaults to true"
    );
    assert_eq!(default.report.method, "linear");
    let normalized = b.run(&yaml("parameters:\n  normalize: true\n"));
    assert_eq!(normalized.w(), [2.5, 5.0, 0.0, 1.0]);
    let raw = b.run(&yaml("parameters:\n  normalize: false\n"));
    assert_eq!(raw.w(), [10.0, 20.0, 0.0, 4.0]);
}

#[test]
fn linear_with_a_base_model_not_listed_gives_the_base_the_global_weight() {
    let mut b = Bench::new();
    b.vector("C", &[4.0, 0.0]);
    b.vector("A", &[1.0, 3.0]);
    // mergekit adds an unlisted base as one more input, with the global
    // parameters: (2·C + 1·A) / 3 = [(8 + 1)/3, (0 + 3)/3] = [3, 1].
    let m = b.run(
        "merge_method: linear\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\nparameters:\n  weight: 2.0\ndtype: float32\n",
    );
    assert_eq!(m.w(), [3.0, 1.0]);
    // Without a global weight the unlisted base has none: an error naming it.
    let e = b.error(
        "merge_method: linear\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\ndtype: float32\n",
    );
    assert_contains(&e, &["weight"]);
}

#[test]
fn linear_with_the_base_model_listed_uses_its_own_weight() {
    let mut b = Bench::new();
    b.vector("C", &[4.0, 0.0]);
    b.vector("A", &[1.0, 3.0]);
    // mergekit's linear merge takes every listed model, the base included
    // (it is an ordinary input there): (1·C + 3·A) / 4 = [(4 + 3)/4, 9/4].
    let m = b.run(
        "merge_method: linear\nbase_model: ./C\nmodels:\n  - model: ./C\n    parameters:\n      weight: 1.0\n  - model: ./A\n    parameters:\n      weight: 3.0\ndtype: float32\n",
    );
    assert_eq!(m.w(), [1.75, 2.25]);
}

// ------------------------------------------------------- task arithmetic

fn two_task_vectors(b: &Bench) {
    // base C = 1; τ_A = [1, −1, 0, 2], τ_B = [0, 2, −1, 0].
    b.vector("C", &[1.0, 1.0, 1.0, 1.0]);
    b.vector("A", &[2.0, 0.0, 1.0, 3.0]);
    b.vector("B", &[1.0, 3.0, 0.0, 1.0]);
}

const TWO_MODELS: &str = "base_model: ./C\nmodels:\n  - model: ./C\n  - model: ./A\n    parameters:\n      weight: 0.5\n  - model: ./B\n    parameters:\n      weight: 1.0\ndtype: float32\n";

#[test]
fn task_arithmetic_adds_lambda_times_the_weighted_task_vectors() {
    let mut b = Bench::new();
    two_task_vectors(&b);
    // The base is listed too (as mergekit's examples do): it is no contributor.
    // Σ w τ = 0.5·[1, −1, 0, 2] + [0, 2, −1, 0] = [0.5, 1.5, −1, 1].
    let plain = b.run(&format!("merge_method: task_arithmetic\n{TWO_MODELS}"));
    assert_eq!(
        plain.w(),
        [1.5, 2.5, 0.0, 2.0],
        "λ = 1, no normalisation by default"
    );
    // λ = 2: 1 + 2·[0.5, 1.5, −1, 1] = [2, 4, −1, 3].
    let scaled = b.run(&format!(
        "merge_method: task_arithmetic\n{TWO_MODELS}parameters:\n  lambda: 2.0\n"
    ));
    assert_eq!(scaled.w(), [2.0, 4.0, -1.0, 3.0]);
    // normalize: divided by Σ w = 1.5, then λ = 2.
    let normalized = b.run(&format!(
        "merge_method: task_arithmetic\n{TWO_MODELS}parameters:\n  lambda: 2.0\n  normalize: true\n"
    ));
    let want: Vec<f32> = [0.5f32, 1.5, -1.0, 1.0]
        .iter()
        .map(|s| 1.0 + 2.0 * (s / 1.5))
        .collect();
    assert_close(normalized.w(), &want, 1e-6, "normalised task arithmetic");
}

// ------------------------------------------------------------------ TIES

fn ties_models(b: &Bench) {
    // base 1; τ_A = [3, −2, 2, 1] (|−2| at index 1 ties |2| at index 2),
    // τ_B = [−6, 4, −4, 1].
    b.vector("C", &[1.0; 4]);
    b.vector("A", &[4.0, -1.0, 3.0, 2.0]);
    b.vector("B", &[-5.0, 5.0, -3.0, 2.0]);
}

fn ties_yaml(method: &str, extra: &str) -> String {
    format!(
        "merge_method: {method}\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 2.0\n      density: 0.5\n  - model: ./B\n    parameters:\n      weight: 1.0\n      density: 0.75\n{extra}dtype: float32\n"
    )
}

#[test]
fn ties_trims_by_index_on_ties_votes_plus_on_zero_and_divides_by_agreeing_weights() {
    let mut b = Bench::new();
    ties_models(&b);
    // Trim A: ⌊0.5·4⌋ = 2 kept: |3|, then |−2| (index 1) over |2| (index 2)
    //   → [3, −2, 0, 0]; weighted (w 2) [6, −4, 0, 0].
    // Trim B: ⌊0.75·4⌋ = 3 kept: |−6|, |4|, |−4| → [−6, 4, −4, 0]; weighted (w 1) the same.
    // e0: 6 − 6 = 0 → + elected; A agrees: 6 / w_A 2 = 3     → 1 + 3 = 4
    // e1: −4 + 4 = 0 → + elected; B agrees: 4 / w_B 1 = 4    → 5
    // e2: 0 − 4 < 0 → −; B agrees: −4 / 1                    → −3
    //     (were index 2 kept instead of 1: 4 − 4 = 0 → + → 4/2 → 3)
    // e3: nothing kept: 0, divisor 0 → 1                     → 1
    let m = b.run(&ties_yaml("ties", ""));
    assert_eq!(
        m.w(),
        [4.0, 5.0, -3.0, 1.0],
        "normalize defaults to true for ties"
    );
    assert_eq!(m.sparsity("w", 0).0, 2);
    assert_eq!(m.sparsity("w", 1).0, 3);
    // normalize false: the agreeing weighted sums themselves: [1 + 6, 1 + 4, 1 − 4, 1].
    let raw = b.run(&ties_yaml("ties", "parameters:\n  normalize: false\n"));
    assert_eq!(raw.w(), [7.0, 5.0, -3.0, 1.0]);
    // λ = 0.5 scales the normalised merge: 1 + 0.5·[3, 4, −4, 0].
    let half = b.run(&ties_yaml("ties", "parameters:\n  lambda: 0.5\n"));
    assert_eq!(half.w(), [2.5, 3.0, -1.0, 1.0]);
}

#[test]
fn ties_keeps_exactly_floor_density_times_n_entries() {
    let mut b = Bench::new();
    b.vector("C", &[0.0; 10]);
    // τ = [1, −2, 3, …, −10]: 0.3·10 = 2.999… in binary must still keep 3.
    let tau: Vec<f32> = (1..=10)
        .map(|i| if i % 2 == 0 { -(i as f32) } else { i as f32 })
        .collect();
    b.vector("A", &tau);
    let yaml = |density: &str| {
        format!(
            "merge_method: ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: {density}\ndtype: float32\n"
        )
    };
    let m = b.run(&yaml("0.3"));
    let mut want = vec![0.0f32; 10];
    want[7..].copy_from_slice(&tau[7..]); // −8, 9, −10: the three largest
    assert_eq!(m.w(), want);
    assert_eq!(m.sparsity("w", 0), (3, None));
    // ⌊0.05·10⌋ = 0: the tensor keeps nothing of A (mergekit would keep 1),
    // and the report says so.
    let none = b.run(&yaml("0.05"));
    assert_eq!(none.w(), [0.0; 10]);
    assert_eq!(none.sparsity("w", 0).0, 0);
    // Density 1 (the default) keeps everything.
    let all = b.run(&yaml("1.0"));
    assert_eq!(all.w(), tau);
}

#[test]
fn ties_and_breadcrumbs_rescale_the_survivors_when_asked() {
    // mergekit 0.1.5 passes `rescale` to every sparsification of the family
    // (magnitude and magnitude_outliers included): with `rescale: true` the
    // kept entries are scaled by Σ|τ| / Σ|τ_kept| (SPEC §3's L1 rescale).
    let mut b = Bench::new();
    b.vector("C", &[1.0; 4]);
    b.vector("A", &[4.0, -1.0, 3.0, 2.0]); // τ = [3, −2, 2, 1], Σ|τ| = 8
                                           // ties, density 0.5: kept [3, −2, 0, 0], Σ|kept| = 5, factor 8/5;
                                           // one contributor of weight 1, normalised: W = 1 + τ_kept·1.6.
    let factor = (8.0f64 / 5.0) as f32;
    let want = [1.0 + 3.0 * factor, 1.0 - 2.0 * factor, 1.0, 1.0];
    let ties = b.run(
        "merge_method: ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: 0.5\nparameters:\n  rescale: true\ndtype: float32\n",
    );
    // breadcrumbs, density 0.5, gamma 0.25 (N 4: drop 1 at the top, keep 2):
    // kept [0, −2, 2, 0], Σ|kept| = 4, factor 2: W = 1 + [0, −4, 4, 0].
    let crumbs = b.run(
        "merge_method: breadcrumbs\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: 0.5\n      gamma: 0.25\nparameters:\n  rescale: true\ndtype: float32\n",
    );
    assert!(
        ties.w() == want && crumbs.w() == [1.0, -3.0, 5.0, 1.0],
        "rescale: true ignored?\n ties:        got {:?}, want {want:?}\n breadcrumbs: got {:?}, want [1, -3, 5, 1]",
        ties.w(),
        crumbs.w()
    );
}

// ------------------------------------------------------------------ DARE

/// τ = ±(i + 1)/4 around a base of 0.5: dyadic, so `A − C` is exact.
fn dare_tau(n: usize, flip: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i + 1) as f32 * 0.25;
            if (i % 3 == 0) ^ flip {
                -x
            } else {
                x
            }
        })
        .collect()
}

fn plus(base: f32, tau: &[f32]) -> Vec<f32> {
    tau.iter().map(|t| base + t).collect()
}

/// DARE's drop and L1 rescale of contributor `k`, from the SPEC hash.
fn spec_dare(
    tau: &[f32],
    k: usize,
    name: &str,
    seed: u64,
    density: f64,
    rescale: bool,
) -> (Vec<f32>, usize, f32) {
    let keep: Vec<bool> = (0..tau.len())
        .map(|i| spec_dare_uniform(seed, k, name, i as u64) < density)
        .collect();
    let all: f64 = tau.iter().map(|t| t.abs() as f64).sum();
    let kept: f64 = tau
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(t, _)| t.abs() as f64)
        .sum();
    let factor = if rescale && all >= 1e-7 && kept >= 1e-7 {
        (all / kept) as f32
    } else {
        1.0
    };
    let out = tau
        .iter()
        .zip(&keep)
        .map(|(t, k)| if *k { t * factor } else { 0.0 })
        .collect();
    (out, keep.iter().filter(|k| **k).count(), factor)
}

/// The TIES vote on one element, written out from SPEC §3.
fn spec_vote(weighted: &[f32], weights: &[f32], normalize: bool) -> f32 {
    let sum: f32 = weighted.iter().sum();
    let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
    let (mut merged, mut divisor) = (0.0f32, 0.0f32);
    for (t, w) in weighted.iter().zip(weights) {
        if *t != 0.0 && t.signum() == sign {
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

#[test]
fn dare_with_density_one_drops_and_rescales_nothing() {
    let mut b = Bench::new();
    two_task_vectors(&b);
    // No density: 1, no drop, no rescale: dare_linear = task arithmetic.
    let linear = b.run(&format!("merge_method: dare_linear\n{TWO_MODELS}"));
    assert_eq!(linear.w(), [1.5, 2.5, 0.0, 2.0]);
    assert_eq!(linear.sparsity("w", 0), (3, None), "τ_A has 3 non-zeros");
    assert_eq!(linear.sparsity("w", 1), (2, None));
    // dare_ties: weighted A [0.5, −0.5, 0, 1], B [0, 2, −1, 0];
    // votes + (0.5), + (1.5), − (−1), + (1); normalize defaults to false.
    let ties = b.run(&format!("merge_method: dare_ties\n{TWO_MODELS}"));
    assert_eq!(ties.w(), [1.5, 3.0, 0.0, 2.0]);
}

#[test]
fn dare_linear_keeps_the_spec_hash_mask_and_rescales_by_the_l1_ratio() {
    let mut b = Bench::new();
    let n = 16;
    let tau = dare_tau(n, false);
    b.vector("C", &[0.5; 16]);
    b.vector("A", &plus(0.5, &tau));
    let yaml = |extra: &str| {
        format!(
            "merge_method: dare_linear\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: 0.5\n{extra}dtype: float32\n"
        )
    };
    for seed in [0u64, 7] {
        let (kept, count, factor) = spec_dare(&tau, 0, "w", seed, 0.5, true);
        assert!(
            0 < count && count < n,
            "the case must drop some and keep some"
        );
        assert!(factor > 1.0);
        let m = b.try_run_seeded(&yaml(""), seed).unwrap();
        // W = 0.5 + 1·(τ·factor) on kept entries, 0.5 on dropped ones.
        let want: Vec<f32> = kept.iter().map(|t| 0.5 + t).collect();
        assert_eq!(m.w(), want, "seed {seed}");
        assert_eq!(
            m.sparsity("w", 0),
            (count as u64, Some(factor)),
            "seed {seed}"
        );
    }
    // rescale: false keeps the survivors as they are.
    let (kept, _, _) = spec_dare(&tau, 0, "w", 0, 0.5, false);
    let m = b.run(&yaml("parameters:\n  rescale: false\n"));
    let want: Vec<f32> = kept.iter().map(|t| 0.5 + t).collect();
    assert_eq!(m.w(), want);
}

#[test]
fn dare_ties_votes_on_the_rescaled_weighted_survivors() {
    let mut b = Bench::new();
    let n = 16;
    let (tau_a, tau_b) = (dare_tau(n, false), dare_tau(n, true));
    b.vector("C", &[0.5; 16]);
    b.vector("A", &plus(0.5, &tau_a));
    b.vector("B", &plus(0.5, &tau_b));
    let yaml = |extra: &str| {
        format!(
            "merge_method: dare_ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: 0.5\n  - model: ./B\n    parameters:\n      weight: 2.0\n      density: 0.5\n{extra}dtype: float32\n"
        )
    };
    // Contributor index k: A is 0, B is 1 (their streams differ).
    let (a, _, _) = spec_dare(&tau_a, 0, "w", 0, 0.5, true);
    let (bb, _, _) = spec_dare(&tau_b, 1, "w", 0, 0.5, true);
    let weights = [1.0f32, 2.0];
    for normalize in [false, true] {
        let extra = if normalize {
            "parameters:\n  normalize: true\n"
        } else {
            ""
        };
        let m = b.run(&yaml(extra));
        let want: Vec<f32> = (0..n)
            .map(|i| {
                0.5 + spec_vote(
                    &[weights[0] * a[i], weights[1] * bb[i]],
                    &weights,
                    normalize,
                )
            })
            .collect();
        assert_eq!(m.w(), want, "normalize {normalize}");
    }
    // Both signs occur among the votes, so the case exercises the election.
    assert!((0..n).any(|i| a[i] != 0.0 && bb[i] != 0.0 && a[i].signum() != bb[i].signum()));
}

// ------------------------------------------------------------ breadcrumbs

#[test]
fn breadcrumbs_keeps_the_window_below_the_largest_magnitudes() {
    let mut b = Bench::new();
    let tau = [5.0f32, -10.0, 3.0, 8.0, -1.0, 7.0, 2.0, -9.0, 6.0, 4.0];
    b.vector("C", &[0.0; 10]);
    b.vector("A", &tau);
    let yaml = |method: &str, params: &str| {
        format!(
            "merge_method: {method}\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n{params}dtype: float32\n"
        )
    };
    // density 0.5, gamma 0.1, N 10: n_top = 1 (|−10| dropped), target 5
    // (|−9|, 8, 7, 6, 5 kept), n_bot = 4 (4, 3, 2, |−1| dropped).
    let m = b.run(&yaml(
        "breadcrumbs",
        "      density: 0.5\n      gamma: 0.1\n",
    ));
    assert_eq!(m.w(), [5.0, 0.0, 0.0, 8.0, 0.0, 7.0, 0.0, -9.0, 6.0, 0.0]);
    assert_eq!(m.sparsity("w", 0).0, 5);
    // Default gamma 0.01: ⌊0.1⌋ = 0 dropped at the top: the 5 largest kept.
    let m = b.run(&yaml("breadcrumbs", "      density: 0.5\n"));
    assert_eq!(m.w(), [0.0, -10.0, 0.0, 8.0, 0.0, 7.0, 0.0, -9.0, 6.0, 0.0]);
    // density + gamma > 1: n_bot = 10 − 8 − 3 < 0, so n_top shrinks to 2
    // (mergekit: the density wins): the 8 smallest are kept, 10 and 9 dropped.
    let m = b.run(&yaml(
        "breadcrumbs",
        "      density: 0.8\n      gamma: 0.3\n",
    ));
    assert_eq!(m.w(), [5.0, 0.0, 3.0, 8.0, -1.0, 7.0, 2.0, 0.0, 6.0, 4.0]);
    // density 1 leaves the task vector alone, whatever gamma says.
    let m = b.run(&yaml(
        "breadcrumbs",
        "      density: 1.0\n      gamma: 0.3\n",
    ));
    assert_eq!(m.w(), tau);
}

#[test]
fn breadcrumbs_ties_votes_after_the_window() {
    let mut b = Bench::new();
    b.vector("C", &[0.0; 5]);
    // A: window (density 0.4, gamma 0.2, N 5: drop 1 at the top, keep 2):
    // [5, −1, 4, 3, −2] → [0, 0, 4, 3, 0].
    b.vector("A", &[5.0, -1.0, 4.0, 3.0, -2.0]);
    // B: [−1, −5, −4, 2, 3] → drop |−5|, keep |−4| and |3| → [0, 0, −4, 0, 3].
    b.vector("B", &[-1.0, -5.0, -4.0, 2.0, 3.0]);
    let m = b.run(
        "merge_method: breadcrumbs_ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n  - model: ./B\n    parameters:\n      weight: 1.0\nparameters:\n  density: 0.4\n  gamma: 0.2\ndtype: float32\n",
    );
    // e2: 4 − 4 = 0 → + → 4; e3: 3; e4: 3; normalize false by default.
    assert_eq!(m.w(), [0.0, 0.0, 4.0, 3.0, 3.0]);
}

// ------------------------------------------------------------------ DELLA

/// DELLA's keep decision from the SPEC hash: per row, ascending magnitude
/// rank r of n gives p = density − ε + 2ε·r/(n − 1).
fn spec_della_keep(
    tau: &[f32],
    cols: usize,
    seed: u64,
    name: &str,
    density: f64,
    eps: f64,
) -> Vec<bool> {
    let mut keep = vec![false; tau.len()];
    for (r, row) in tau.chunks(cols).enumerate() {
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&i, &j| row[i].abs().total_cmp(&row[j].abs()).then(i.cmp(&j)));
        for (rank, &i) in order.iter().enumerate() {
            let p = density - eps + 2.0 * eps * rank as f64 / (cols - 1) as f64;
            let flat = r * cols + i;
            keep[flat] = spec_dare_uniform(seed, 0, name, flat as u64) < p;
        }
    }
    keep
}

fn della_yaml(method: &str, shape_params: &str, global: &str) -> String {
    format!(
        "merge_method: {method}\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n{shape_params}{global}dtype: float32\n"
    )
}

#[test]
fn della_keeps_by_rank_probability_and_rescales() {
    let mut b = Bench::new();
    let (rows, cols) = (4, 8);
    // Distinct magnitudes, not sorted by column: τ[r, j] = ±((3j + r) mod 8 + 1)/8 … made unique per row.
    let tau: Vec<f32> = (0..rows * cols)
        .map(|f| {
            let (r, j) = (f / cols, f % cols);
            let m = ((3 * j + r) % cols + 1) as f32 * 0.125;
            if (j + r) % 2 == 0 {
                m
            } else {
                -m
            }
        })
        .collect();
    b.model("C", &[("w", vec![rows, cols], vec![0.5; rows * cols])]);
    b.model("A", &[("w", vec![rows, cols], plus(0.5, &tau))]);
    let keep = spec_della_keep(&tau, cols, 0, "w", 0.5, 0.3);
    let all: f64 = tau.iter().map(|t| t.abs() as f64).sum();
    let kept: f64 = tau
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(t, _)| t.abs() as f64)
        .sum();
    let count = keep.iter().filter(|k| **k).count();
    assert!(0 < count && count < tau.len());
    let factor = (all / kept) as f32;
    // della_linear: no vote, normalize false, rescale true by default.
    let m = b.run(&della_yaml(
        "della_linear",
        "      weight: 1.0\n      density: 0.5\n      epsilon: 0.3\n",
        "",
    ));
    let want: Vec<f32> = tau
        .iter()
        .zip(&keep)
        .map(|(t, k)| if *k { 0.5 + t * factor } else { 0.5 })
        .collect();
    assert_eq!(m.w(), want);
    assert_eq!(m.sparsity("w", 0), (count as u64, Some(factor)));
    // della: the vote with normalize true by default; one contributor of
    // weight 0.5 gives back its own rescaled survivors: (0.5·x)/0.5 = x.
    let m = b.run(&della_yaml(
        "della",
        "      weight: 0.5\n      density: 0.5\n      epsilon: 0.3\n",
        "",
    ));
    assert_eq!(m.w(), want);
    // Same seed, same bits; another seed, another mask.
    let again = b.run(&della_yaml(
        "della",
        "      weight: 0.5\n      density: 0.5\n      epsilon: 0.3\n",
        "",
    ));
    assert_eq!(again.w(), m.w());
    let other = b
        .try_run_seeded(
            &della_yaml(
                "della",
                "      weight: 0.5\n      density: 0.5\n      epsilon: 0.3\n",
                "",
            ),
            1,
        )
        .unwrap();
    assert_ne!(other.w(), m.w());
}

#[test]
fn della_probabilities_run_from_density_minus_to_plus_epsilon() {
    let mut b = Bench::new();
    let (rows, cols) = (3000, 5);
    // Each row holds magnitudes 1..=5 in a rotating order, so a rank is not a column.
    let tau: Vec<f32> = (0..rows * cols)
        .map(|f| ((f % cols + f / cols) % cols + 1) as f32)
        .collect();
    b.model("C", &[("w", vec![rows, cols], vec![0.0; rows * cols])]);
    b.model("A", &[("w", vec![rows, cols], tau.clone())]);
    let m = b.run(&della_yaml(
        "della_linear",
        "      weight: 1.0\n      density: 0.5\n      epsilon: 0.4\n",
        "parameters:\n  rescale: false\n",
    ));
    // Rank r (magnitude r + 1) is kept with p = 0.1 + 0.2·r.
    for rank in 0..cols {
        let magnitude = (rank + 1) as f32;
        let kept = m
            .w()
            .iter()
            .zip(&tau)
            .filter(|(out, t)| **t == magnitude && **out != 0.0)
            .count() as f64;
        let p = 0.1 + 0.2 * rank as f64;
        let (mean, sd) = (rows as f64 * p, (rows as f64 * p * (1.0 - p)).sqrt());
        assert!(
            (kept - mean).abs() < 5.0 * sd,
            "rank {rank}: kept {kept} of {rows}, expected {mean} ± 5·{sd:.1}"
        );
    }
    // Survivors are untouched (rescale false), the rest is the base.
    assert!(m.w().iter().zip(&tau).all(|(o, t)| *o == 0.0 || o == t));
}

#[test]
fn della_refuses_a_window_outside_zero_one() {
    let mut b = Bench::new();
    b.vector("C", &[0.0; 4]);
    b.vector("A", &[1.0, 2.0, 3.0, 4.0]);
    // density 0.1 − epsilon 0.15 (default) ≤ 0.
    let e = b.error(&della_yaml(
        "della",
        "      weight: 1.0\n      density: 0.1\n",
        "",
    ));
    assert_contains(&e, &["della", "epsilon"]);
    // density 0.9 + epsilon 0.15 ≥ 1.
    let e = b.error(&della_yaml(
        "della_linear",
        "      weight: 1.0\n      density: 0.9\n",
        "",
    ));
    assert_contains(&e, &["della", "epsilon"]);
}

// --------------------------------------------------------- ties_reference

#[test]
fn ties_reference_thresholds_the_whole_model_and_breaks_zero_votes_by_the_majority() {
    let mut b = Bench::new();
    // Base 2 everywhere; two tensors a, b of 4 entries: K = 8, density 0.25:
    // each contributor keeps |τ| ≥ its (8 − 2)-th smallest = 3rd largest.
    let base = vec![2.0f32; 4];
    let model = |name: &str, a: [f32; 4], bb: [f32; 4]| {
        b.model(
            name,
            &[
                ("a", vec![4], plus(2.0, &a)),
                ("b", vec![4], plus(2.0, &bb)),
            ],
        );
    };
    b.model(
        "C",
        &[("a", vec![4], base.clone()), ("b", vec![4], base.clone())],
    );
    // A: |τ| 5, 4, 3 are the top 3, all in `a`: keeps a = [4, −3, 5, 0], b = 0.
    // (Per tensor, 2 of 4 each, it would keep a = [4, 0, 5, 0], b = [0, 0, −0.375, −0.5].)
    model("A", [4.0, -3.0, 5.0, -0.75], [-0.125, -0.25, -0.375, -0.5]);
    // B: top 3 are 7 (b3), 6 (a2), 4 (a0): keeps a = [−4, 0, −6, 0], b = [0, 0, 0, −7].
    model("B", [-4.0, -1.0, -6.0, -0.0625], [-2.0, -0.25, 0.375, -7.0]);
    // Votes (unweighted sums): a0 4 − 4 = 0; a1 −3; a2 5 − 6 = −1; a3 0;
    // b3 −7. Elected signs over the model: −, −, − → majority −, so the
    // zero votes take −: a0 → mean{−4}; a3 has nothing of either sign → 0.
    // Disjoint means: a = [−4, −3, −6, 0], b = [0, 0, 0, −7].
    let m = b.run(
        "merge_method: ties_reference\nbase_model: ./C\nmodels:\n  - model: ./A\n  - model: ./B\nparameters:\n  density: 0.25\ndtype: float32\n",
    );
    assert_eq!(m.get("a"), [-2.0, -1.0, -4.0, 2.0]);
    assert_eq!(m.get("b"), [2.0, 2.0, 2.0, -5.0]);
    // λ scales the disjoint mean.
    let m = b.run(
        "merge_method: ties_reference\nbase_model: ./C\nmodels:\n  - model: ./A\n  - model: ./B\nparameters:\n  density: 0.25\n  lambda: 0.5\ndtype: float32\n",
    );
    assert_eq!(m.get("a"), [0.0, 0.5, -1.0, 2.0]);
    assert_eq!(m.get("b"), [2.0, 2.0, 2.0, -1.5]);
}

#[test]
fn ties_reference_keeps_every_entry_tied_with_the_threshold() {
    let mut b = Bench::new();
    b.model(
        "C",
        &[("a", vec![4], vec![0.0; 4]), ("b", vec![4], vec![0.0; 4])],
    );
    // All |τ| equal: the threshold ties with all 8 entries, and `≥` keeps them all.
    b.model(
        "A",
        &[
            ("a", vec![4], vec![1.0, -1.0, 1.0, 1.0]),
            ("b", vec![4], vec![-1.0, 1.0, 1.0, -1.0]),
        ],
    );
    let m = b.run(
        "merge_method: ties_reference\nbase_model: ./C\nmodels:\n  - model: ./A\nparameters:\n  density: 0.25\ndtype: float32\n",
    );
    assert_eq!(m.get("a"), [1.0, -1.0, 1.0, 1.0]);
    assert_eq!(m.get("b"), [-1.0, 1.0, 1.0, -1.0]);
}

// ------------------------------------------------------------------ slerp

fn slerp_yaml(t: &str) -> String {
    format!(
        "merge_method: slerp\nbase_model: ./A\nmodels:\n  - model: ./A\n  - model: ./B\nparameters:\n  t: {t}\ndtype: float32\n"
    )
}

#[test]
fn slerp_at_the_ends_gives_the_inputs_and_follows_the_arc_between() {
    let mut b = Bench::new();
    // 90° apart: θ = π/2, sin θ = 1; W(t) = sin((1 − t)·π/2)·A + sin(t·π/2)·B
    // on the unnormalised vectors.
    b.vector("A", &[1.0, 0.0]);
    b.vector("B", &[0.0, 2.0]);
    assert_eq!(
        b.run(&slerp_yaml("0.0")).w(),
        [1.0, 0.0],
        "t = 0 is the base"
    );
    assert_eq!(
        b.run(&slerp_yaml("1.0")).w(),
        [0.0, 2.0],
        "t = 1 is the other model"
    );
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert_close(
        b.run(&slerp_yaml("0.5")).w(),
        &[h, 2.0 * h],
        1e-6,
        "t = 1/2",
    );
    // t = 1/3: sin(π/3) = √3/2, sin(π/6) = 1/2 → [√3/2, 1].
    let third = b.run(&slerp_yaml("0.3333333333333333"));
    assert_close(third.w(), &[0.75f32.sqrt(), 1.0], 1e-6, "t = 1/3");
}

#[test]
fn slerp_of_colinear_tensors_is_a_lerp() {
    let mut b = Bench::new();
    let a = [1.0f32, 2.0, -1.0, 0.5];
    b.vector("A", &a);
    // B = 2A: cos = 1 > 0.9995 → (1 − t)·A + t·B = 1.25·A at t = 0.25.
    b.vector("B", &a.map(|x| 2.0 * x));
    assert_eq!(b.run(&slerp_yaml("0.25")).w(), a.map(|x| 1.25 * x));
    // B = −A: |cos| = 1 → lerp too: 0.75·A − 0.25·A = 0.5·A.
    let mut b = Bench::new();
    b.vector("A", &a);
    b.vector("B", &a.map(|x| -x));
    assert_eq!(b.run(&slerp_yaml("0.25")).w(), a.map(|x| 0.5 * x));
}

#[test]
fn slerp_measures_the_angle_over_the_whole_flattened_tensor() {
    let mut b = Bench::new();
    // Flattened: A = [1, 0, 1, 0], B = [0, 1, 1, 0]: cos = 1/2, θ = π/3;
    // at t = 1/2 both weights are sin(π/6)/sin(π/3) = 1/√3:
    // W = (A + B)/√3 = [1, 1, 2, 0]/√3. (Row by row, row 1 would be a lerp → [1, 0].)
    b.model("A", &[("w", vec![2, 2], vec![1.0, 0.0, 1.0, 0.0])]);
    b.model("B", &[("w", vec![2, 2], vec![0.0, 1.0, 1.0, 0.0])]);
    let s = 1.0 / 3f32.sqrt();
    assert_close(
        b.run(&slerp_yaml("0.5")).w(),
        &[s, s, 2.0 * s, 0.0],
        1e-6,
        "whole-tensor angle",
    );
}

#[test]
fn slerp_treats_a_zero_tensor_as_orthogonal() {
    let mut b = Bench::new();
    // ‖A‖ = 0 ≤ 1e-8: the norm counts as 1, the dot is 0, θ = π/2 → sin(t·π/2)·B.
    b.vector("A", &[0.0, 0.0]);
    b.vector("B", &[3.0, -4.0]);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert_close(
        b.run(&slerp_yaml("0.5")).w(),
        &[3.0 * h, -4.0 * h],
        1e-6,
        "zero base",
    );
}

// --------------------------------------------------------------- nearswap

#[test]
fn nearswap_moves_to_the_other_model_where_the_two_are_close() {
    let mut b = Bench::new();
    // w = clamp(t / max(|a − b|, 1e-6), 0, 1); W = w·b + (1 − w)·a, a = base, t = 0.5.
    // |a − b| = 2 → w 1/4: 0.25·3 + 0.75·1 = 1.5;   0.25 → w 1 → 2.25;
    // 0.5 → w 1 → 2.5;   0 → w 1 → 4;   4 → w 1/8: 0.375 − 0.875 = −0.5.
    b.vector("A", &[1.0, 2.0, 3.0, 4.0, -1.0]);
    b.vector("B", &[3.0, 2.25, 2.5, 4.0, 3.0]);
    let m = b.run(
        "merge_method: nearswap\nbase_model: ./A\nmodels:\n  - model: ./B\nparameters:\n  t: 0.5\ndtype: float32\n",
    );
    assert_eq!(m.w(), [1.5, 2.25, 2.5, 4.0, -0.5]);
}

// ------------------------------------------------------------ model_stock

/// Model Stock by hand: t = N·cos/(1 + (N − 1)·cos) with cos the mean
/// pairwise cosine of the offsets; W = t·mean + (1 − t)·base.
fn stock(base: &[f64], models: &[&[f64]]) -> Vec<f32> {
    let n = models.len();
    let off: Vec<Vec<f64>> = models
        .iter()
        .map(|m| m.iter().zip(base).map(|(x, b)| x - b).collect())
        .collect();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (mut sum, mut pairs) = (0.0, 0.0);
    for i in 0..n {
        for j in i + 1..n {
            let dot: f64 = off[i].iter().zip(&off[j]).map(|(x, y)| x * y).sum();
            sum += dot / (norm(&off[i]) * norm(&off[j]));
            pairs += 1.0;
        }
    }
    let cos = sum / pairs;
    let t = n as f64 * cos / (1.0 + (n as f64 - 1.0) * cos);
    (0..base.len())
        .map(|e| {
            let mean = models.iter().map(|m| m[e]).sum::<f64>() / n as f64;
            (t * mean + (1.0 - t) * base[e]) as f32
        })
        .collect()
}

#[test]
fn model_stock_pulls_the_base_towards_the_mean_by_the_angle() {
    let mut b = Bench::new();
    // Whole tensor: offsets [1, 0, 1, 0] and [1, 1, 0, 1]: cos = 1/√6,
    // t = 2c/(1 + c) ≈ 0.5798.
    let base = [1.0, 2.0, 0.0, -1.0];
    let a = [2.0, 2.0, 1.0, -1.0];
    let bb = [2.0, 3.0, 0.0, 0.0];
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    b.model("C", &[("w", vec![2, 2], f(&base))]);
    b.model("A", &[("w", vec![2, 2], f(&a))]);
    b.model("B", &[("w", vec![2, 2], f(&bb))]);
    let yaml = |extra: &str| {
        format!("merge_method: model_stock\nbase_model: ./C\nmodels:\n  - model: ./A\n  - model: ./B\n{extra}dtype: float32\n")
    };
    let whole = b.run(&yaml(""));
    assert_close(whole.w(), &stock(&base, &[&a, &bb]), 1e-5, "model_stock");
    let t = 2.0 * (1.0 / 6f64.sqrt()) / (1.0 + 1.0 / 6f64.sqrt());
    assert!(
        (whole.w()[0] as f64 - (1.0 + t)).abs() < 1e-5,
        "t ≈ 0.5798: {:?}",
        whole.w()
    );
    // filter_wise: per row. Row 0 offsets [1, 0] and [1, 1]: cos = 1/√2,
    // t = 2(√2 − 1); row 1 offsets [1, 0] and [0, 1]: cos = 0, t = 0 → the base row.
    let rows = b.run(&yaml("parameters:\n  filter_wise: true\n"));
    let mut want = stock(&base[..2], &[&a[..2], &bb[..2]]);
    want.extend(stock(&base[2..], &[&a[2..], &bb[2..]]));
    assert_close(rows.w(), &want, 1e-5, "model_stock filter_wise");
    assert_eq!(&rows.w()[2..], [0.0, -1.0]);
    let t = 2.0 * (2f32.sqrt() - 1.0);
    assert_close(&rows.w()[..2], &[1.0 + t, 2.0 + 0.5 * t], 1e-5, "row 0");
}

#[test]
fn model_stock_averages_the_pairwise_cosines_of_three_models() {
    let mut b = Bench::new();
    // Offsets [1, 0], [0, 1], [1, 1]: cosines 0, 1/√2, 1/√2 → mean √2/3.
    let base = [0.5, 0.5];
    let models = [[1.5, 0.5], [0.5, 1.5], [1.5, 1.5]];
    b.vector("C", &[0.5, 0.5]);
    for (name, m) in ["A", "B", "D"].iter().zip(&models) {
        b.vector(name, &m.map(|x| x as f32));
    }
    let m = b.run(
        "merge_method: model_stock\nbase_model: ./C\nmodels:\n  - model: ./A\n  - model: ./B\n  - model: ./D\ndtype: float32\n",
    );
    assert_close(
        m.w(),
        &stock(&base, &[&models[0], &models[1], &models[2]]),
        1e-5,
        "three models",
    );
}

// ------------------------------------------------------------ passthrough

#[test]
fn passthrough_copies_one_model_optionally_scaled() {
    let mut b = Bench::new();
    b.vector("A", &[1.0, -2.5, 3.0]);
    let m = b.run("merge_method: passthrough\nmodels:\n  - model: ./A\ndtype: float32\n");
    assert_eq!(m.w(), [1.0, -2.5, 3.0]);
    let m = b.run(
        "merge_method: passthrough\nmodels:\n  - model: ./A\n    parameters:\n      scale: 2.0\ndtype: float32\n",
    );
    assert_eq!(m.w(), [2.0, -5.0, 6.0]);
}

// ------------------------------------------------------ parameter forms

const LAYERS: usize = 5;

/// LLaMA-like names: embeddings, 5 decoder layers (attention and MLP), final
/// norm, lm_head; two entries each. The base is 0, A is 1, B is 1000, so
/// task arithmetic gives W = λ·(w_A + 1000·w_B) per tensor.
fn layered(b: &Bench) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..LAYERS {
        names.push(format!("model.layers.{l}.self_attn.q_proj.weight"));
        names.push(format!("model.layers.{l}.mlp.up_proj.weight"));
    }
    names.push("model.norm.weight".to_string());
    names.push("lm_head.weight".to_string());
    for (model, value) in [("C", 0.0f32), ("A", 1.0), ("B", 1000.0)] {
        let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = names
            .iter()
            .map(|n| (n.as_str(), vec![2], vec![value; 2]))
            .collect();
        b.model(model, &tensors);
    }
    names
}

fn layered_yaml(a: &str, b: &str, global: &str) -> String {
    let block = |p: &str| {
        if p.is_empty() {
            String::new()
        } else {
            format!("    parameters:\n{p}")
        }
    };
    let global = if global.is_empty() {
        String::new()
    } else {
        format!("parameters:\n{global}")
    };
    format!(
        "merge_method: task_arithmetic\nbase_model: ./C\nmodels:\n  - model: ./A\n{}  - model: ./B\n{}{global}dtype: float32\n",
        block(a),
        block(b)
    )
}

/// Checks every tensor: `want(name) = (w_A, w_B, λ)`.
fn check_layered(m: &Merged, names: &[String], want: impl Fn(&str) -> (f64, f64, f64)) {
    for name in names {
        let (wa, wb, lambda) = want(name);
        let expected = (lambda * (wa + 1000.0 * wb)) as f32;
        let got = m.get(name);
        assert!(
            got.iter()
                .all(|g| (g - expected).abs() <= 1e-6 * expected.abs().max(1.0)),
            "{name}: got {got:?}, want {expected} (w_A {wa}, w_B {wb}, λ {lambda})"
        );
    }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse().ok())
}

#[test]
fn a_scalar_parameter_applies_to_every_tensor() {
    let mut b = Bench::new();
    let names = layered(&b);
    let m = b.run(&layered_yaml(
        "      weight: 0.75\n",
        "      weight: 0.125\n",
        "",
    ));
    check_layered(&m, &names, |_| (0.75, 0.125, 1.0));
}

#[test]
fn a_gradient_interpolates_over_the_layer_position() {
    let mut b = Bench::new();
    let names = layered(&b);
    // [0.2, 1.0, 0.6] over t = layer/4: layer 0 → 0.2, 1 (t ¼) → 0.6,
    // 2 (t ½, the middle point) → 1.0, 3 (t ¾) → 0.8, 4 (t 1) → 0.6.
    // Tensors outside the decoder layers take t = 0 → 0.2.
    // (Note: mergekit 0.1.x plans post-layer weights — model.norm, lm_head —
    // with t = 1; flatmerge and this test use t = 0 for all of them.)
    let m = b.run(&layered_yaml(
        "      weight: [0.2, 1.0, 0.6]\n",
        "      weight: 0.0\n",
        "",
    ));
    let by_layer = [0.2, 0.6, 1.0, 0.8, 0.6];
    check_layered(&m, &names, |name| match layer_of(name) {
        Some(l) => (by_layer[l], 0.0, 1.0),
        None => (0.2, 0.0, 1.0),
    });
    // A shared parameter may be a gradient too: λ = [1, 3] → 1 + 2t.
    let m = b.run(&layered_yaml(
        "      weight: 1.0\n",
        "      weight: 0.0\n",
        "  lambda: [1.0, 3.0]\n",
    ));
    check_layered(&m, &names, |name| {
        let t = layer_of(name).map_or(0.0, |l| l as f64 / (LAYERS - 1) as f64);
        (1.0, 0.0, 1.0 + 2.0 * t)
    });
}

#[test]
fn a_filter_list_takes_the_first_matching_entry() {
    let mut b = Bench::new();
    let names = layered(&b);
    // self_attn → 0.25; then `layers.1` → 0.5 (only MLP tensors of layer 1
    // reach it: attention matched first); mlp → gradient [0, 1] (t); anything else → 0.125.
    let a = "      weight:\n        - filter: self_attn\n          value: 0.25\n        - filter: layers.1\n          value: 0.5\n        - filter: mlp\n          value: [0.0, 1.0]\n        - value: 0.125\n";
    let m = b.run(&layered_yaml(a, "      weight: 0.0\n", ""));
    check_layered(&m, &names, |name| {
        let wa = if name.contains("self_attn") {
            0.25
        } else if name.contains("layers.1.") {
            0.5
        } else if let Some(l) = layer_of(name).filter(|_| name.contains("mlp")) {
            l as f64 / (LAYERS - 1) as f64
        } else {
            0.125
        };
        (wa, 0.0, 1.0)
    });
}

#[test]
fn a_filter_list_without_a_match_falls_through_to_the_global_value_then_the_default() {
    let mut b = Bench::new();
    let names = layered(&b);
    // A: mlp → 2, else the global 0.5; B: none of its own → the global 0.5 everywhere
    // (per-model beats global, global beats the default).
    // λ: a global filter list only for lm_head → 3; elsewhere the default 1.
    let m = b.run(&layered_yaml(
        "      weight:\n        - filter: mlp\n          value: 2.0\n",
        "",
        "  weight: 0.5\n  lambda:\n    - filter: lm_head\n      value: 3.0\n",
    ));
    check_layered(&m, &names, |name| {
        let wa = if name.contains("mlp") { 2.0 } else { 0.5 };
        let lambda = if name == "lm_head.weight" { 3.0 } else { 1.0 };
        (wa, 0.5, lambda)
    });
}

#[test]
fn a_required_parameter_no_filter_gives_is_an_error_naming_the_tensor() {
    let mut b = Bench::new();
    layered(&b);
    let e = b.error(&layered_yaml(
        "      weight:\n        - filter: mlp\n          value: 2.0\n",
        "      weight: 1.0\n",
        "",
    ));
    assert_contains(&e, &["weight", "model.embed_tokens.weight"]);
    // A required parameter missing altogether is a config error.
    let e = b.error(&layered_yaml("", "      weight: 1.0\n", ""));
    assert_contains(&e, &["weight", "required"]);
}

#[test]
fn task_arithmetic_family_defaults_are_mergekits() {
    use flatmerge::config::params::{Default as D, Scope};
    use flatmerge::config::MergeMethod;
    // method: (normalize, rescale) defaults in mergekit 0.1.5.
    let table = [
        ("task_arithmetic", false, false),
        ("ties", true, false),
        ("dare_ties", false, true),
        ("dare_linear", false, true),
        ("breadcrumbs", false, false),
        ("breadcrumbs_ties", false, false),
        ("della", true, true),
        ("della_linear", false, true),
    ];
    for (name, normalize, rescale) in table {
        let defs = MergeMethod::parse(name).expect(name).params();
        let def = |key: &str| {
            defs.iter()
                .find(|d| d.name == key)
                .unwrap_or_else(|| panic!("{name} lacks `{key}`"))
        };
        assert_eq!(
            def("normalize").default,
            D::Bool(normalize),
            "{name} normalize"
        );
        assert_eq!(def("rescale").default, D::Bool(rescale), "{name} rescale");
        assert_eq!(def("lambda").default, D::Number(1.0), "{name} lambda");
        assert_eq!(def("int8_mask").default, D::Bool(false), "{name} int8_mask");
        assert_eq!(def("weight").default, D::Required, "{name} weight");
        assert_eq!(def("density").default, D::Number(1.0), "{name} density");
        assert_eq!(def("weight").scope, Scope::PerModel);
        assert_eq!(def("density").scope, Scope::PerModel);
        for shared in ["normalize", "rescale", "lambda", "int8_mask"] {
            assert_eq!(def(shared).scope, Scope::Shared, "{name} {shared}");
        }
        if name.starts_with("breadcrumbs") {
            assert_eq!(def("gamma").default, D::Number(0.01));
        }
        if name.starts_with("della") {
            assert_eq!(def("epsilon").default, D::Number(0.15));
        }
    }
    let linear = MergeMethod::parse("linear").expect("linear").params();
    assert!(linear
        .iter()
        .any(|d| d.name == "normalize" && d.default == D::Bool(true)));
}

// ------------------------------------------------------------------ errors

#[test]
fn config_errors_name_what_is_wrong() {
    let mut b = Bench::new();
    two_task_vectors(&b);
    let cases: [(&str, &[&str]); 9] = [
        // A shared parameter given under a model.
        (
            "merge_method: ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      normalize: true\n",
            &["normalize", "top-level `parameters`"],
        ),
        (
            "merge_method: slerp\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      t: 0.5\n",
            &["`t`", "top-level `parameters`"],
        ),
        // Unknown parameters, globally and per model.
        (
            "merge_method: ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      densty: 0.5\n",
            &["densty", "unknown parameter"],
        ),
        (
            "merge_method: linear\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\nparameters:\n  lambda: 2.0\n",
            &["lambda", "unknown parameter"],
        ),
        // Refused and unknown methods.
        (
            "merge_method: core_space\nbase_model: ./C\nmodels:\n  - model: ./A\n",
            &["core_space", "does not run"],
        ),
        (
            "merge_method: frobnicate\nmodels:\n  - model: ./A\n",
            &["frobnicate", "unknown"],
        ),
        // mergekit's slice layout.
        (
            "merge_method: slerp\nbase_model: ./A\nmodels:\n  - model: ./A\nslices:\n  - sources:\n      - model: ./A\n        layer_range: [0, 2]\n      - model: ./B\n        layer_range: [0, 2]\nparameters:\n  t: 0.5\n",
            &["slices", "not both"],
        ),
        // Out-of-range values.
        (
            "merge_method: ties\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n      density: 1.5\n",
            &["density", "[0, 1]"],
        ),
        // Model counts.
        (
            "merge_method: slerp\nbase_model: ./C\nmodels:\n  - model: ./A\n  - model: ./B\nparameters:\n  t: 0.5\n",
            &["exactly one other model"],
        ),
    ];
    for (yaml, needles) in cases {
        let e = b.error(yaml);
        for needle in needles {
            assert!(
                e.contains(needle),
                "error lacks `{needle}`: {e}\nconfig:\n{yaml}"
            );
        }
    }
    let e = b.error("merge_method: task_adapter\nbase_model: ./C\nmodels:\n  - model: ./A\n");
    assert_contains(&e, &["task_adapter", "does not run"]);
    let e = b.error(
        "merge_method: nuslerp\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n",
    );
    assert_contains(&e, &["exactly two models"]);
    let e = b.error("merge_method: arcee_fusion\nmodels:\n  - model: ./A\n  - model: ./B\n");
    assert_contains(&e, &["arcee_fusion needs `base_model`"]);
    let e = b.error("merge_method: model_stock\nbase_model: ./C\nmodels:\n  - model: ./A\n");
    assert_contains(&e, &["at least two"]);
    let e = b.error("merge_method: passthrough\nmodels:\n  - model: ./A\n  - model: ./B\n");
    assert_contains(&e, &["exactly one model"]);
}
