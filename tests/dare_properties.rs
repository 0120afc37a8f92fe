//! DARE's random drop (SPEC §3) on a large tensor, through the engine: the
//! keep rate is binomial, the L1 rescale is exact, the mask is the SPEC's
//! counter-based hash of (seed, contributor index, tensor name, element
//! index) and nothing else — not the thread count, not the chunking, not the
//! run. Then property tests of the no_std kernels the engine is built from.

use flatmerge::baselines::{
    breadcrumbs_window, dare_drop, dare_keep, dare_rescale, dare_stream, keep_rank_window,
    magnitude_key, ties_vote, trim_count, TopK,
};
use flatmerge::report::MergeReport;
use flatmerge_suite::{f32_tensors, spec_dare_uniform, tempdir, try_merge_yaml, write_f32_model};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Elements of the large tensor: [400, 500], three engine chunks of 65 536
/// and a remainder, so chunk boundaries fall inside it.
const ROWS: usize = 400;
const COLS: usize = 500;
const N: usize = ROWS * COLS;
const NAME: &str = "model.layers.0.mlp.up_proj.weight";
const DENSITY: f64 = 0.3;

/// τ_k: deterministic, varied magnitudes, both signs, no zeros; dyadic
/// (multiples of 1/1024 below 8) so `W − base` is exact in f32.
fn tau(k: usize) -> Vec<f32> {
    (0..N)
        .map(|i| {
            let m = ((i * 7919 + k * 104_729) % 8191 + 1) as f32 / 1024.0;
            if (i * 31 + k) % 5 < 2 {
                -m
            } else {
                m
            }
        })
        .collect()
}

fn base() -> Vec<f32> {
    (0..N).map(|i| ((i % 64) as f32 - 32.0) / 8.0).collect()
}

/// Writes base `C` and contributors `A` (τ 0) and `B` (τ 1), each holding the
/// large tensor under `NAME` and, as a copy, under `copy`.
fn write_models(dir: &Path, copy: &str) {
    let base = base();
    let shape = vec![ROWS, COLS];
    let model = |name: &str, values: Vec<f32>| {
        write_f32_model(
            &dir.join(name),
            &[
                (NAME, shape.clone(), values.clone()),
                (copy, shape.clone(), values),
            ],
        );
    };
    model("C", base.clone());
    for (name, k) in [("A", 0), ("B", 1)] {
        model(name, base.iter().zip(tau(k)).map(|(b, t)| b + t).collect());
    }
}

fn dare_yaml(models: &[&str], rescale: bool) -> String {
    let mut yaml = String::from("merge_method: dare_linear\nbase_model: ./C\nmodels:\n");
    for m in models {
        yaml.push_str(&format!(
            "  - model: ./{m}\n    parameters:\n      weight: 1.0\n      density: {DENSITY}\n"
        ));
    }
    yaml.push_str(&format!(
        "parameters:\n  rescale: {rescale}\ndtype: float32\n"
    ));
    yaml
}

struct Run {
    tensors: BTreeMap<String, Vec<f32>>,
    report: MergeReport,
}

fn run(dir: &Path, yaml: &str, seed: u64, threads: usize, out: &str) -> Run {
    let out = dir.join(out);
    let summary = try_merge_yaml(dir, yaml, seed, Some(threads), &out)
        .unwrap_or_else(|e| panic!("merge failed: {e}"));
    Run {
        tensors: f32_tensors(&out),
        report: summary.report,
    }
}

/// The kept mask of a single-contributor merge: where the output differs
/// from the base (τ has no zeros).
fn mask(out: &[f32]) -> Vec<bool> {
    out.iter().zip(base()).map(|(o, b)| *o != b).collect()
}

fn rescale_of(report: &MergeReport, name: &str, k: usize) -> (u64, Option<f32>) {
    let t = report
        .tensors
        .iter()
        .find(|t| t.plan.name == name)
        .expect("tensor in report");
    let s = t
        .sparsity
        .iter()
        .find(|s| s.contributor == k)
        .expect("sparsity");
    (s.kept, s.rescale)
}

#[test]
fn dare_keep_rate_rescale_and_mask_follow_the_spec() {
    let dir = tempdir();
    let dir = dir.path();
    write_models(dir, "copy.weight");
    let yaml = dare_yaml(&["A"], true);
    let one = run(dir, &yaml, 5, 1, "t1");
    let out = &one.tensors[NAME];
    let kept = mask(out);
    let count = kept.iter().filter(|k| **k).count();

    // Keep rate: binomial(N, density) within 5σ.
    let (mean, sd) = (
        N as f64 * DENSITY,
        (N as f64 * DENSITY * (1.0 - DENSITY)).sqrt(),
    );
    assert!(
        (count as f64 - mean).abs() < 5.0 * sd,
        "kept {count} of {N}; expected {mean} ± 5·{sd:.0}"
    );

    // The mask is the SPEC hash of (seed 5, contributor 0, the name, i).
    let spec: Vec<bool> = (0..N)
        .map(|i| spec_dare_uniform(5, 0, NAME, i as u64) < DENSITY)
        .collect();
    let differing = kept.iter().zip(&spec).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing, 0,
        "mask differs from the SPEC hash at {differing} elements"
    );

    // L1 rescale: Σ|kept·factor| = Σ|τ| up to f32 rounding of the factor and the products.
    let t = tau(0);
    let factor = {
        let all: f64 = t.iter().map(|x| x.abs() as f64).sum();
        let k: f64 = t
            .iter()
            .zip(&spec)
            .filter(|(_, k)| **k)
            .map(|(x, _)| x.abs() as f64)
            .sum();
        (all / k) as f32
    };
    assert_eq!(
        rescale_of(&one.report, NAME, 0),
        (count as u64, Some(factor))
    );
    let l1_tau: f64 = t.iter().map(|x| x.abs() as f64).sum();
    let l1_out: f64 = out
        .iter()
        .zip(base())
        .zip(&t)
        .zip(&spec)
        .map(|(((o, b), x), k)| {
            let scaled = if *k { x * factor } else { 0.0 };
            // Each element is exactly base + τ·factor in f32.
            assert_eq!(*o, b + scaled);
            scaled.abs() as f64
        })
        .sum();
    assert!(
        (l1_out - l1_tau).abs() <= 1e-6 * l1_tau,
        "Σ|kept·factor| = {l1_out}, Σ|τ| = {l1_tau}"
    );

    // Without rescale the survivors are τ itself.
    let plain = run(dir, &dare_yaml(&["A"], false), 5, 2, "plain");
    assert_eq!(mask(&plain.tensors[NAME]), kept);
    assert_eq!(rescale_of(&plain.report, NAME, 0).1, Some(1.0));

    // Thread counts and runs: the same bits.
    let two = run(dir, &yaml, 5, 2, "t2");
    assert_eq!(two.tensors, one.tensors, "threads 1 vs 2");
    let again = run(dir, &yaml, 5, 2, "again");
    assert_eq!(again.tensors, one.tensors, "a second run");

    // Another seed: another mask, same statistics.
    let other = run(dir, &yaml, 6, 2, "seed6");
    let other_mask = mask(&other.tensors[NAME]);
    let overlap = other_mask
        .iter()
        .zip(&kept)
        .filter(|(a, b)| **a && **b)
        .count() as f64;
    assert_ne!(other_mask, kept);
    // Independent masks overlap on about N·d² elements.
    let expected = N as f64 * DENSITY * DENSITY;
    assert!(
        (overlap - expected).abs() < 5.0 * expected.sqrt() * 1.1,
        "overlap {overlap} vs {expected}"
    );

    // The same values under another name: another stream, another mask.
    let copy = mask(&one.tensors["copy.weight"]);
    let spec_copy: Vec<bool> = (0..N)
        .map(|i| spec_dare_uniform(5, 0, "copy.weight", i as u64) < DENSITY)
        .collect();
    assert_eq!(copy, spec_copy);
    assert_ne!(copy, kept, "the name is part of the stream");
}

#[test]
fn the_contributor_index_is_part_of_the_stream() {
    let dir = tempdir();
    let dir = dir.path();
    write_models(dir, "copy.weight");
    // A and B merged: A is contributor 0, B contributor 1; swapped, the
    // other way round. rescale off: output = base + kept τ_A + kept τ_B.
    let spec = |k: usize| -> Vec<bool> {
        (0..N)
            .map(|i| spec_dare_uniform(0, k, NAME, i as u64) < DENSITY)
            .collect()
    };
    let (ta, tb, b) = (tau(0), tau(1), base());
    let expect = |ka: usize, kb: usize| -> Vec<f32> {
        let (ma, mb) = (spec(ka), spec(kb));
        (0..N)
            .map(|i| {
                let a = if ma[i] { ta[i] } else { 0.0 };
                let bb = if mb[i] { tb[i] } else { 0.0 };
                // The sum of two terms does not depend on their order.
                b[i] + (a + bb)
            })
            .collect()
    };
    let ab = run(dir, &dare_yaml(&["A", "B"], false), 0, 2, "ab");
    assert_eq!(ab.tensors[NAME], expect(0, 1), "A first: A draws stream 0");
    let ba = run(dir, &dare_yaml(&["B", "A"], false), 0, 2, "ba");
    assert_eq!(ba.tensors[NAME], expect(1, 0), "B first: A draws stream 1");
    assert_ne!(ab.tensors[NAME], ba.tensors[NAME]);
    // Listing the base among the models does not shift the indices.
    let with_base = dare_yaml(&["A", "B"], false).replace("models:\n", "models:\n  - model: ./C\n");
    let listed = run(dir, &with_base, 0, 1, "listed");
    assert_eq!(listed.tensors[NAME], ab.tensors[NAME]);
}

/// The same engine paths for the deterministic sparsifiers on the chunked
/// tensor: TIES's exact top-k and breadcrumbs' rank window, with thousands
/// of magnitude ties spread over the chunk boundaries, equal a plain sort
/// (magnitude descending, ties by lower index) for 1 and 2 threads.
#[test]
fn trims_across_chunks_equal_a_sort_for_any_thread_count() {
    let dir = tempdir();
    let dir = dir.path();
    write_models(dir, "copy.weight");
    let t = tau(0);
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    let b = base();
    let window = |from: usize, to: usize| -> Vec<f32> {
        let mut out = b.clone();
        for &i in &order[from..to] {
            out[i] += t[i];
        }
        out
    };
    let one = |method: &str, params: &str| {
        format!(
            "merge_method: {method}\nbase_model: ./C\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n{params}dtype: float32\n"
        )
    };
    // ⌊0.3·200 000⌋ = 60 000 kept; the boundary magnitude ties ~24 entries.
    let k = N * 3 / 10;
    assert_eq!(
        t[order[k - 1]].abs(),
        t[order[k]].abs(),
        "the case has a tie at the boundary"
    );
    let ties = one("ties", "      density: 0.3\n");
    // breadcrumbs: drop the top ⌊0.05·N⌋ = 10 000, keep the next 60 000.
    let crumbs = one("breadcrumbs", "      density: 0.3\n      gamma: 0.05\n");
    for threads in [1, 2] {
        let r = run(dir, &ties, 0, threads, &format!("ties{threads}"));
        assert!(r.tensors[NAME] == window(0, k), "ties, {threads} threads");
        assert_eq!(rescale_of(&r.report, NAME, 0), (k as u64, None));
        let r = run(dir, &crumbs, 0, threads, &format!("crumbs{threads}"));
        assert!(
            r.tensors[NAME] == window(N / 20, N / 20 + k),
            "breadcrumbs, {threads} threads"
        );
    }
    // DELLA draws from the same counter-based stream: thread-independent too.
    let della = one("della", "      density: 0.5\n      epsilon: 0.2\n");
    let (d1, d2) = (
        run(dir, &della, 3, 1, "della1"),
        run(dir, &della, 3, 2, "della2"),
    );
    assert_eq!(d1.tensors, d2.tensors, "della, 1 vs 2 threads");
}

// ----------------------------------------------------------- kernel properties

/// Magnitudes from a small alphabet, so ties are common.
fn tie_heavy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        (-4i32..=4, any::<bool>()).prop_map(|(m, s)| {
            let x = m as f32 * 0.5;
            if s {
                x
            } else {
                -x
            }
        }),
        1..300,
    )
}

/// Cut points splitting `n` elements into chunks.
fn split(n: usize, cuts: &[usize]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (n + 1)).collect();
    points.push(0);
    points.push(n);
    points.sort_unstable();
    points.dedup();
    points
}

/// The reference order: descending magnitude, ties by lower index.
fn ranked(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| {
        magnitude_key(values[j])
            .cmp(&magnitude_key(values[i]))
            .then(i.cmp(&j))
    });
    order
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn top_k_keeps_exactly_the_k_largest_ties_by_index(values in tie_heavy(), k_seed in 0usize..1000) {
        let k = k_seed % (values.len() + 1);
        let top = TopK::find(std::iter::once(&values[..]), k);
        let mut kept = values.clone();
        top.apply(&mut kept, 0);
        let order = ranked(&values);
        let mut want = vec![0.0f32; values.len()];
        for &i in &order[..k] {
            want[i] = values[i];
        }
        prop_assert_eq!(&kept, &want);
        // Exactly k positions are in the top-k (zeros included), and they
        // are the first k of the reference order.
        let mut tie_rank = 0u64;
        let inside: Vec<usize> = (0..values.len())
            .filter(|&i| {
                let key = magnitude_key(values[i]);
                if key == top.threshold {
                    tie_rank += 1;
                }
                top.contains(key, tie_rank)
            })
            .collect();
        let mut first: Vec<usize> = order[..k].to_vec();
        first.sort_unstable();
        prop_assert_eq!(inside, first);
    }

    #[test]
    fn keep_rank_window_over_any_split_equals_one_chunk(
        values in tie_heavy(),
        a_seed in 0usize..1000,
        b_seed in 0usize..1000,
        cuts in prop::collection::vec(0usize..400, 0..6),
    ) {
        let n = values.len();
        let (mut a, mut b) = (a_seed % (n + 1), b_seed % (n + 1));
        if a > b {
            std::mem::swap(&mut a, &mut b);
        }
        let points = split(n, &cuts);
        let chunks: Vec<&[f32]> = points.windows(2).map(|w| &values[w[0]..w[1]]).collect();
        let top = TopK::find(chunks.iter().copied(), b);
        let skip = TopK::find(chunks.iter().copied(), a);
        prop_assert_eq!(top, TopK::find(std::iter::once(&values[..]), b));
        let mut whole = values.clone();
        keep_rank_window(&mut whole, &top, Some(&skip), (0, 0));
        let mut pieces = values.clone();
        let mut before = (0u64, 0u64);
        for w in points.windows(2) {
            let (t, s) = keep_rank_window(&mut pieces[w[0]..w[1]], &top, Some(&skip), before);
            before = (before.0 + t, before.1 + s);
        }
        prop_assert_eq!(&pieces, &whole);
        // And it is the rank window [a, b) of the reference order.
        let order = ranked(&values);
        let mut want = vec![0.0f32; n];
        for &i in &order[a..b] {
            want[i] = values[i];
        }
        prop_assert_eq!(&whole, &want);
    }

    #[test]
    fn ties_vote_follows_the_sign_rules(
        pairs in prop::collection::vec((-8i32..=8, 1i32..=4), 1..6),
        normalize in any::<bool>(),
    ) {
        let weighted: Vec<f32> = pairs.iter().map(|(t, _)| *t as f32 * 0.5).collect();
        let weights: Vec<f32> = pairs.iter().map(|(_, w)| *w as f32).collect();
        let got = ties_vote(&weighted, &weights, normalize);
        let sum: f32 = weighted.iter().sum();
        let positive = sum >= 0.0;
        // The result never has the losing sign, and only agreeing entries count.
        if positive {
            prop_assert!(got >= 0.0);
        } else {
            prop_assert!(got <= 0.0);
        }
        let agree: Vec<usize> = (0..weighted.len())
            .filter(|&i| if positive { weighted[i] > 0.0 } else { weighted[i] < 0.0 })
            .collect();
        let merged: f32 = agree.iter().map(|&i| weighted[i]).sum();
        let divisor: f32 = agree.iter().map(|&i| weights[i]).sum();
        let want = if normalize && divisor != 0.0 { merged / divisor } else { merged };
        prop_assert_eq!(got, want);
        // Negating every entry negates the result, except that a zero sum
        // stays with +: then both sides keep their own positive entries.
        let negated: Vec<f32> = weighted.iter().map(|x| -x).collect();
        if sum != 0.0 {
            prop_assert_eq!(ties_vote(&negated, &weights, normalize), -got);
        }
    }

    #[test]
    fn dare_drop_is_the_spec_hash_over_any_split(
        n in 1usize..500,
        seed in any::<u64>(),
        k in 0usize..4,
        density in 0.0f64..1.0,
        cuts in prop::collection::vec(0usize..500, 0..5),
    ) {
        let name = "model.layers.3.self_attn.k_proj.weight";
        let tau: Vec<f32> = (0..n).map(|i| (i as f32 - 250.0) / 16.0).collect();
        let key = dare_stream(seed, k, name);
        let mut out = vec![0f32; n];
        let (mut all, mut kept) = (0f64, 0f64);
        for w in split(n, &cuts).windows(2) {
            let (a, b) = dare_drop(&tau[w[0]..w[1]], key, w[0] as u64, density, &mut out[w[0]..w[1]]);
            all += a;
            kept += b;
        }
        for i in 0..n {
            let keep = spec_dare_uniform(seed, k, name, i as u64) < density;
            prop_assert_eq!(keep, dare_keep(key, i as u64, density));
            prop_assert_eq!(out[i], if keep { tau[i] } else { 0.0 });
        }
        let l1: f64 = tau.iter().map(|x| x.abs() as f64).sum();
        prop_assert!((all - l1).abs() < 1e-9);
        let factor = dare_rescale(all, kept);
        if kept >= 1e-7 {
            prop_assert_eq!(factor, (all / kept) as f32);
        } else {
            prop_assert_eq!(factor, 1.0);
        }
    }

    #[test]
    fn trim_count_and_breadcrumbs_windows_are_in_range(
        n in 0usize..10_000,
        d in 0u32..=100,
        g in 0u32..=100,
    ) {
        let (density, gamma) = (d as f64 / 100.0, g as f64 / 100.0);
        let k = trim_count(density, n);
        prop_assert!(k <= n);
        // Exactly ⌊d·n/100⌋ in integers: no binary rounding loses one.
        prop_assert_eq!(k, (d as usize * n) / 100);
        let (a, b) = breadcrumbs_window(density, gamma, n);
        prop_assert!(a <= b && b <= n);
        if density < 1.0 {
            // The window holds ⌊density·n⌋ ranks, drops ⌊γ·n⌋ at the top unless
            // that would leave fewer than the target.
            prop_assert_eq!(b - a, k);
            prop_assert_eq!(a, ((g as usize * n) / 100).min(n - k));
        }
    }
}
