//! SAFE-M's variants (docs/methods.md): hand-computed cases of every
//! formula, property tests of their invariants, the default variant being
//! SPEC §1 bit for bit, and the engine against the in-memory reference
//! `merge_tensor_with`, for any thread count.

use approx::assert_relative_eq;
use flatmerge::config::MergeConfig;
use flatmerge::dtype::Dtype;
use flatmerge::engine::PreparedMerge;
use flatmerge::io::Checkpoint;
use flatmerge::plan::TensorRule;
use flatmerge::safe_m::{
    activation_lambda, fuse_block, fuse_block_with, masked_task_vectors, merge_tensor,
    merge_tensor_with, row_rescale, score_vote, task_vector, ConflictRule, Contributor,
    ContributorBlock, Election, ElectionParams, MaskCounts, Member, Salience, ScoreForm, Variant,
    EPSILON,
};
use flatmerge::stats::{ActivationStats, Rows};
use flatmerge_suite::{
    dir_files, edit_config, family, merge, options, tempdir, tensor_map, CHUNKED, SMALL,
};
use proptest::collection::vec;
use proptest::prelude::*;
use std::path::Path;

// ---------------------------------------------------------------------------
// Hand-computed cases

#[test]
fn task_vector_row_rescale_and_the_score_vote_by_hand() {
    let mut t = [0.0f32; 3];
    task_vector(&[1.0, 2.0, -1.0], &[0.5, 2.0, 1.0], &mut t);
    assert_eq!(t, [0.5, 0.0, -2.0]);

    // ‖τ‖₁ = 6, ‖τ_u‖₁ = 5: s = 1.2, or the cap.
    let tau = [1.0f32, -2.0, 3.0, 0.0];
    let kept = [0.0f32, -2.0, 3.0, 0.0];
    assert_relative_eq!(row_rescale(&tau, &kept, 5.0), 1.2, max_relative = 1e-6);
    assert_eq!(row_rescale(&tau, &kept, 1.1), 1.1);
    assert_eq!(row_rescale(&tau, &[0.0; 4], 5.0), 1.0, "nothing kept");
    assert_eq!(
        row_rescale(&[0.0; 4], &[0.0; 4], 5.0),
        1.0,
        "nothing to restore"
    );

    // 2·(+1) + 3·(−1) = −1: minus wins; an unelected model does not vote;
    // a zero sum votes plus; zero task-vector entries do not vote.
    assert!(!score_vote([(true, 2.0, 1.0), (true, 3.0, -1.0)]));
    assert!(score_vote([(true, 2.0, 1.0), (false, 5.0, -1.0)]));
    assert!(score_vote([(true, 2.0, 1.0), (true, 2.0, -1.0)]));
    assert!(!score_vote([(true, 9.0, 0.0), (true, 1.0, -0.5)]));
}

#[test]
fn activation_lambda_by_hand() {
    // Disjoint shifts (model 1 moves on example 0, model 2 on example 1): 1.
    let c = [0.0f32; 4];
    assert_eq!(
        activation_lambda(&c, &[&[1.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 2.0]], 2),
        1.0
    );
    // Identical shifts: S = 2Δ, Σ r Δ = Δ, λ = 2‖Δ‖² / 4‖Δ‖² = 1/2.
    assert_eq!(
        activation_lambda(&c[..2], &[&[1.0, 1.0], &[1.0, 1.0]], 2),
        0.5
    );
    // Δ₁ = (1, 0), Δ₂ = (1, 1): r = (1/3, 2/3), S = (2, 1),
    // Σ r Δ = (1, 2/3), λ = (2 + 2/3) / 5 = 8/15.
    assert_relative_eq!(
        activation_lambda(&c[..2], &[&[1.0, 0.0], &[1.0, 1.0]], 2),
        8.0 / 15.0,
        max_relative = 1e-6
    );
    // Shifted ancestor: only differences count.
    assert_relative_eq!(
        activation_lambda(&[1.0, 1.0], &[&[2.0, 1.0], &[2.0, 2.0]], 2),
        8.0 / 15.0,
        max_relative = 1e-6
    );
    // Nothing moved: 1; opposite shifts cancel and are clamped to [0, 1].
    assert_eq!(
        activation_lambda(&c[..2], &[&[0.0, 0.0], &[0.0, 0.0]], 2),
        1.0
    );
    assert_eq!(
        activation_lambda(&c[..2], &[&[1.0, 0.0], &[-1.0, 0.0]], 2),
        1.0
    );
}

/// A 4-entry bias: `C = 0`, `A = (1, −1, 2, 0)`, `B = (−1, 1, 1, 3)`;
/// A elects entries 0 and 2 (scores 5, 1, 4, 0 at threshold 4), B
/// elects 0, 1 and 3 (scores 6, 2, 1, 7 at threshold 2); `λ_proj(B) = 0.5`.
fn hand_bias(variant: &Variant) -> (Vec<f32>, Vec<MaskCounts>) {
    let c = [0.0f32; 4];
    let a = [1.0f32, -1.0, 2.0, 0.0];
    let b = [-1.0f32, 1.0, 1.0, 3.0];
    let (sa, sb) = ([5.0f32, 1.0, 4.0, 0.0], [6.0f32, 2.0, 1.0, 7.0]);
    let member = |weight: &'static [f32], scores: &'static [f32], threshold, lp| Member {
        weight,
        election: Election { scores, threshold },
        lambda_proj: lp,
        lambda_ortho: 0.25,
        rescale_cap: 10.0,
    };
    let a: &'static [f32] = Box::leak(Box::new(a));
    let b: &'static [f32] = Box::leak(Box::new(b));
    let sa: &'static [f32] = Box::leak(Box::new(sa));
    let sb: &'static [f32] = Box::leak(Box::new(sb));
    // The receiver's λ are the variant's, as the engine passes them.
    let mut receiver = member(a, sa, 4.0, variant.receiver_lambda.0);
    receiver.lambda_ortho = variant.receiver_lambda.1;
    let members = [receiver, member(b, sb, 2.0, 0.5)];
    let mut out = vec![0.0f32; 4];
    let mut counts = vec![MaskCounts::default(); 2];
    fuse_block_with(
        &c,
        &members,
        None,
        EPSILON,
        variant,
        &mut out,
        &mut Vec::new(),
        &mut counts,
    );
    (out, counts)
}

#[test]
fn conflict_rules_and_the_symmetric_form_by_hand() {
    let counts = |receiver_elected, elected, conflicts, kept| MaskCounts {
        receiver_elected,
        elected,
        conflicts,
        kept,
    };
    // SPEC: entry 0 is a conflict (τ_A = 1, τ_B = −1, both elected): dropped.
    // τ_u = (0, 1, 0, 3); b* = A + 0.5·τ_u.
    let (out, c) = hand_bias(&Variant::default());
    assert_eq!(out, [1.0, -0.5, 2.0, 1.5]);
    assert_eq!(c[1], counts(2, 3, 1, 2));
    // keep: τ_u = (−1, 1, 0, 3).
    let keep = Variant {
        conflict: ConflictRule::Keep,
        ..Variant::default()
    };
    let (out, c) = hand_bias(&keep);
    assert_eq!(out, [0.5, -0.5, 2.0, 1.5]);
    assert_eq!(c[1], counts(2, 3, 0, 3));
    // score: entry 0 votes 5·(+1) + 6·(−1) = −1, B's minus wins and is kept.
    let score = Variant {
        conflict: ConflictRule::Score,
        ..Variant::default()
    };
    let (out, c) = hand_bias(&score);
    assert_eq!(out, [0.5, -0.5, 2.0, 1.5]);
    assert_eq!(c[1], counts(2, 3, 0, 3));
    // Symmetric score: A loses entry 0 too, so A gives (0, 0, 2, 0) with its
    // λ_proj = 0.75: b* = C + 0.75·(0, 0, 2, 0) + 0.5·(−1, 1, 0, 3).
    let symmetric = Variant {
        symmetric: true,
        receiver_lambda: (0.75, 0.1),
        ..score
    };
    let (out, c) = hand_bias(&symmetric);
    assert_eq!(out, [-0.5, 0.5, 1.5, 1.5]);
    assert_eq!(c[0], counts(2, 2, 1, 1));
    assert_eq!(c[1], counts(2, 3, 0, 3));
    // Symmetric drop: the receiver never loses a conflict; B's entry 0 does.
    let (out, c) = hand_bias(&Variant {
        conflict: ConflictRule::Drop,
        ..symmetric
    });
    assert_eq!(out, [0.75, 0.5, 1.5, 1.5]);
    assert_eq!(c[0], counts(2, 2, 0, 2));
    // Rescale (cap 10): B keeps (0, 1, 0, 3) of ‖τ_B‖₁ = 6, so ×1.5.
    let (out, _) = hand_bias(&Variant {
        rescale: true,
        ..Variant::default()
    });
    assert_eq!(out, [1.0, -0.25, 2.0, 2.25]);
}

#[test]
fn a_weight_row_is_decomposed_after_masking_with_the_member_lambdas() {
    // One row, d = (1, 0): B's masked τ_u = (2, 3) splits into P = (2, 0),
    // O = (0, 3). Symmetric, keep: A's τ_A = (1, 1) → P = (1, 0), O = (0, 1).
    let c = [0.0f32, 0.0];
    let a = [1.0f32, 1.0];
    let b = [2.0f32, 3.0];
    let s = [1.0f32, 1.0];
    let members = [
        Member {
            weight: &a,
            election: Election {
                scores: &s,
                threshold: 1.0,
            },
            lambda_proj: 1.0,
            lambda_ortho: 2.0,
            rescale_cap: 1.0,
        },
        Member {
            weight: &b,
            election: Election {
                scores: &s,
                threshold: 1.0,
            },
            lambda_proj: 0.5,
            lambda_ortho: 0.25,
            rescale_cap: 1.0,
        },
    ];
    let variant = Variant {
        symmetric: true,
        receiver_lambda: (1.0, 2.0),
        conflict: ConflictRule::Keep,
        ..Variant::default()
    };
    let d = [1.0f32, 0.0];
    let mut out = [0.0f32; 2];
    let mut counts = [MaskCounts::default(); 2];
    fuse_block_with(
        &c,
        &members,
        Some((&d, 1.0)),
        0.0,
        &variant,
        &mut out,
        &mut Vec::new(),
        &mut counts,
    );
    // C + (1·1, 2·1) + (0.5·2, 0.25·3).
    assert_eq!(out, [2.0, 2.75]);
}

#[test]
fn task_vector_salience_ranks_the_update_not_the_weight() {
    // W_B = (10, 1) over C = (10, 0): the weight salience elects entry 0
    // (|W| large, τ = 0), the task-vector salience entry 1.
    let c = [10.0f32, 0.0];
    let b = [10.0f32, 1.0];
    let run = |salience| {
        let variant = Variant {
            salience,
            conflict: ConflictRule::Keep,
            ..Variant::default()
        };
        merge_tensor_with(
            &c,
            &[0.0, 0.0],
            ElectionParams {
                density: 0.5,
                form: ScoreForm::Sas { alpha: 0.0 },
            },
            &c,
            &[0.0, 0.0],
            &[],
            &[Contributor {
                weight: &b,
                y_mean: &[1.0, 1.0],
                election: ElectionParams {
                    density: 0.5,
                    form: ScoreForm::Sas { alpha: 0.0 },
                },
                lambda_proj: 1.0,
                lambda_ortho: 1.0,
            }],
            true,
            EPSILON,
            &variant,
        )
    };
    assert_eq!(run(Salience::Weight).values, [10.0, 0.0]);
    assert_eq!(run(Salience::TaskVector).values, [10.0, 1.0]);
}

// ---------------------------------------------------------------------------
// Properties

/// A random tensor family: `rows × cols`, ancestor, receiver, two
/// contributors, scores and thresholds drawn from the scores.
#[derive(Debug, Clone)]
struct Block {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    c: Vec<f32>,
    w: [Vec<f32>; 3],
    s: [Vec<f32>; 3],
    t: [usize; 3],
    lambda: [(f32, f32); 3],
}

fn entry() -> BoxedStrategy<f32> {
    prop_oneof![3 => -4.0f32..4.0, 2 => (-8i32..=8).prop_map(|i| i as f32 / 4.0)].boxed()
}

fn block() -> impl Strategy<Value = Block> {
    (1usize..8, 1usize..24).prop_flat_map(|(rows, cols)| {
        let n = rows * cols;
        let model = || vec(entry(), n);
        let scores = vec(prop_oneof![3 => 0.0f32..4.0, 1 => Just(0.0f32)], n);
        let lambda = (-1.0f32..2.0, -1.0f32..2.0);
        (
            vec(entry(), cols),
            vec(entry(), n),
            [model(), model(), model()],
            [scores.clone(), scores.clone(), scores],
            [0..n, 0..n, 0..n],
            [lambda.clone(), lambda.clone(), lambda],
        )
            .prop_map(move |(d, c, w, s, t, lambda)| Block {
                rows,
                cols,
                d,
                c,
                w,
                s,
                t,
                lambda,
            })
    })
}

impl Block {
    fn threshold(&self, j: usize) -> f32 {
        self.s[j][self.t[j]]
    }

    fn members(&self) -> Vec<Member<'_>> {
        (0..3)
            .map(|j| Member {
                weight: &self.w[j],
                election: Election {
                    scores: &self.s[j],
                    threshold: self.threshold(j),
                },
                lambda_proj: self.lambda[j].0,
                lambda_ortho: self.lambda[j].1,
                rescale_cap: 3.0,
            })
            .collect()
    }

    fn fuse(
        &self,
        variant: &Variant,
        range: std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<MaskCounts>) {
        let members: Vec<Member<'_>> = self
            .members()
            .into_iter()
            .map(|m| Member {
                weight: &m.weight[range.clone()],
                election: Election {
                    scores: &m.election.scores[range.clone()],
                    threshold: m.election.threshold,
                },
                ..m
            })
            .collect();
        let dd = self.d.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut out = vec![0.0f32; range.len()];
        let mut counts = vec![MaskCounts::default(); 3];
        fuse_block_with(
            &self.c[range],
            &members,
            Some((&self.d, dd)),
            EPSILON,
            variant,
            &mut out,
            &mut Vec::new(),
            &mut counts,
        );
        (out, counts)
    }
}

fn variant() -> impl Strategy<Value = Variant> {
    (
        any::<bool>(),
        prop::sample::select(vec![
            ConflictRule::Drop,
            ConflictRule::Keep,
            ConflictRule::Score,
        ]),
        any::<bool>(),
        (-1.0f32..2.0, -1.0f32..2.0),
    )
        .prop_map(|(symmetric, conflict, rescale, receiver_lambda)| Variant {
            symmetric,
            receiver_lambda,
            conflict,
            rescale,
            ..Variant::default()
        })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The default variant is SPEC §1: `fuse_block_with` gives `fuse_block`'s bits and counts.
    #[test]
    fn the_default_variant_is_fuse_block_bit_for_bit(b in block()) {
        let n = b.rows * b.cols;
        let (got, got_counts) = b.fuse(&Variant::default(), 0..n);
        let blocks: Vec<ContributorBlock<'_>> = (1..3)
            .map(|j| ContributorBlock {
                weight: &b.w[j],
                election: Election { scores: &b.s[j], threshold: b.threshold(j) },
                lambda_proj: b.lambda[j].0,
                lambda_ortho: b.lambda[j].1,
            })
            .collect();
        let dd = b.d.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut want = vec![0.0f32; n];
        let mut want_counts = [MaskCounts::default(); 2];
        fuse_block(
            &b.w[0],
            &b.c,
            Election { scores: &b.s[0], threshold: b.threshold(0) },
            &blocks,
            Some((&b.d, dd)),
            EPSILON,
            &mut want,
            &mut Vec::new(),
            &mut want_counts,
        );
        prop_assert_eq!(bits(&got), bits(&want));
        prop_assert_eq!(&got_counts[1..], &want_counts[..]);
    }

    /// Any variant on two blocks of whole rows gives the bits of the whole.
    #[test]
    fn variants_are_invariant_under_chunking(b in block(), v in variant(), split in 0usize..8) {
        let n = b.rows * b.cols;
        let cut = (split % b.rows) * b.cols;
        let (whole, whole_counts) = b.fuse(&v, 0..n);
        let (head, head_counts) = b.fuse(&v, 0..cut);
        let (tail, tail_counts) = b.fuse(&v, cut..n);
        let pieces: Vec<f32> = head.into_iter().chain(tail).collect();
        prop_assert_eq!(bits(&whole), bits(&pieces));
        for j in 0..3 {
            let mut sum = head_counts[j];
            sum.add(&tail_counts[j]);
            // receiver_elected counts the receiver per block, so it sums too.
            prop_assert_eq!(sum, whole_counts[j]);
        }
    }

    /// `masked_task_vectors` is stage 2 of `fuse_block_with`: adding its
    /// vectors (λ = 1, no direction, as for a bias) to the start point gives
    /// the fused bits and the same counts, in either form.
    #[test]
    fn masked_task_vectors_are_what_the_fusion_adds(b in block(), v in variant()) {
        let n = b.rows * b.cols;
        let members: Vec<Member<'_>> = b
            .members()
            .into_iter()
            .map(|m| Member { lambda_proj: 1.0, lambda_ortho: 1.0, ..m })
            .collect();
        let mut fused = vec![0.0f32; n];
        let mut fused_counts = vec![MaskCounts::default(); 3];
        fuse_block_with(&b.c, &members, None, EPSILON, &v, &mut fused, &mut Vec::new(), &mut fused_counts);
        let mut taus = vec![Vec::new(); 3];
        let mut counts = vec![MaskCounts::default(); 3];
        masked_task_vectors(&b.c, &members, n, &v, &mut taus, &mut counts);
        let mut want = if v.symmetric { b.c.clone() } else { b.w[0].clone() };
        prop_assert_eq!(taus[0].is_empty(), !v.symmetric);
        for tau in &taus {
            for (w, t) in want.iter_mut().zip(tau) {
                *w += *t;
            }
        }
        prop_assert_eq!(bits(&fused), bits(&want));
        prop_assert_eq!(counts, fused_counts);
    }

    /// Counts: kept + conflicts = elected for every member; `keep` removes nothing.
    #[test]
    fn counts_partition_the_election(b in block(), v in variant()) {
        let n = b.rows * b.cols;
        let (_, counts) = b.fuse(&v, 0..n);
        let first = usize::from(!v.symmetric);
        for (j, c) in counts.iter().enumerate().skip(first) {
            let elected = b.s[j].iter().filter(|&&s| s >= b.threshold(j) && s > 0.0).count() as u64;
            prop_assert_eq!(c.elected, elected);
            prop_assert_eq!(c.kept + c.conflicts, c.elected);
            if v.conflict == ConflictRule::Keep {
                prop_assert_eq!(c.conflicts, 0);
            }
        }
    }

    /// Symmetric, everything elected, no conflict removal, `λ_proj = λ_ortho = λ`
    /// per member: `W* = W_C + Σ_j λ_j τ_j` (task arithmetic), up to rounding.
    #[test]
    fn symmetric_keep_with_equal_lambdas_is_task_arithmetic(mut b in block(), l in prop::array::uniform3(0.0f32..1.5)) {
        let n = b.rows * b.cols;
        for (j, &lj) in l.iter().enumerate() {
            b.s[j] = vec![1.0; n];
            b.t[j] = 0;
            b.lambda[j] = (lj, lj);
        }
        let v = Variant {
            symmetric: true,
            receiver_lambda: (l[0], l[0]),
            conflict: ConflictRule::Keep,
            ..Variant::default()
        };
        let (got, _) = b.fuse(&v, 0..n);
        for (i, &g) in got.iter().enumerate() {
            let want: f64 = b.c[i] as f64
                + (0..3).map(|j| l[j] as f64 * (b.w[j][i] - b.c[i]) as f64).sum::<f64>();
            let scale: f64 = 1.0 + b.c[i].abs() as f64
                + (0..3).map(|j| (b.w[j][i] - b.c[i]).abs() as f64 * 2.0).sum::<f64>();
            prop_assert!((g as f64 - want).abs() <= 1e-5 * scale * b.cols as f64,
                "{} vs {}", g, want);
        }
    }

    /// The score rule leaves no conflict among the kept entries of the
    /// symmetric form: every kept entry has the elected sign.
    #[test]
    fn the_score_rule_keeps_one_sign_per_entry(b in block()) {
        let n = b.rows * b.cols;
        let members = b.members();
        let mut signs = vec![0i8; n];
        for (j, m) in members.iter().enumerate() {
            for (i, sign) in signs.iter_mut().enumerate() {
                let tau = m.weight[i] - b.c[i];
                let elected = m.election.scores[i] >= m.election.threshold && m.election.scores[i] > 0.0;
                let plus = score_vote(members.iter().map(|m| (
                    m.election.scores[i] >= m.election.threshold && m.election.scores[i] > 0.0,
                    m.election.scores[i],
                    m.weight[i] - b.c[i],
                )));
                let kept = elected && !(plus && tau < 0.0 || !plus && tau > 0.0);
                if kept && tau != 0.0 {
                    let s = if tau > 0.0 { 1 } else { -1 };
                    prop_assert!(*sign == 0 || *sign == s, "entry {} member {}", i, j);
                    *sign = s;
                }
            }
        }
        // And the kernel's counts agree with this recomputation.
        let v = Variant { symmetric: true, conflict: ConflictRule::Score, ..Variant::default() };
        let (_, counts) = b.fuse(&v, 0..n);
        for (j, m) in members.iter().enumerate() {
            let kept = (0..n).filter(|&i| {
                let tau = m.weight[i] - b.c[i];
                let elected = m.election.scores[i] >= m.election.threshold && m.election.scores[i] > 0.0;
                let plus = score_vote(members.iter().map(|m| (
                    m.election.scores[i] >= m.election.threshold && m.election.scores[i] > 0.0,
                    m.election.scores[i],
                    m.weight[i] - b.c[i],
                )));
                elected && !(plus && tau < 0.0 || !plus && tau > 0.0)
            }).count() as u64;
            prop_assert_eq!(counts[j].kept, kept);
        }
    }

    /// The rescale restores at most the row's L1 mass and never shrinks:
    /// `1 ≤ s ≤ cap` when the cap is at least 1, and `‖s·τ_u‖₁ ≤ ‖τ‖₁`.
    #[test]
    fn the_row_rescale_is_bounded(tau in vec(entry(), 1..30), keep in vec(any::<bool>(), 30), cap in 1.0f32..20.0) {
        let kept: Vec<f32> = tau.iter().zip(&keep).map(|(&t, &k)| if k { t } else { 0.0 }).collect();
        let s = row_rescale(&tau, &kept, cap);
        prop_assert!((1.0..=cap).contains(&s), "s = {}", s);
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        prop_assert!(s as f64 * l1(&kept) <= l1(&tau) * (1.0 + 1e-5) + 1e-9);
    }

    /// `activation_lambda` is in [0, 1], ignores the order of the models and
    /// a common scale of the shifts, and gives `1/m` for identical shifts.
    #[test]
    fn activation_lambda_invariants(
        rows in 1usize..6, width in 1usize..6,
        data in vec(entry(), 4 * 36),
        scale in prop::sample::select(vec![0.25f32, 2.0, 4.0]),
    ) {
        let n = rows * width;
        let c = &data[..n];
        let m1 = &data[n..2 * n];
        let m2 = &data[2 * n..3 * n];
        let m3 = &data[3 * n..4 * n];
        let lambda = activation_lambda(c, &[m1, m2, m3], width);
        prop_assert!((0.0..=1.0).contains(&lambda));
        let permuted = activation_lambda(c, &[m3, m1, m2], width);
        prop_assert!((lambda - permuted).abs() <= 1e-5);
        let scaled: Vec<Vec<f32>> = [m1, m2, m3].iter()
            .map(|m| m.iter().zip(c).map(|(y, yc)| yc + scale * (y - yc)).collect())
            .collect();
        let refs: Vec<&[f32]> = scaled.iter().map(|v| v.as_slice()).collect();
        prop_assert!((activation_lambda(c, &refs, width) - lambda).abs() <= 1e-4);
        let moved = m1.iter().zip(c).any(|(y, yc)| y != yc);
        let same = activation_lambda(c, &[m1, m1, m1], width);
        if moved {
            prop_assert!((same - 1.0 / 3.0).abs() <= 1e-6, "{}", same);
        } else {
            prop_assert_eq!(same, 1.0);
        }
    }

    /// `merge_tensor_with` at the default variant is `merge_tensor`.
    #[test]
    fn merge_tensor_with_the_default_variant_is_merge_tensor(b in block(), is_bias in any::<bool>(), k in 0.05f64..=1.0) {
        let (n, rows) = (b.rows * b.cols, b.rows);
        let (len, x): (usize, &[f32]) = if is_bias { (rows, &[]) } else { (n, &b.d) };
        let y: Vec<f32> = b.s[0][..rows].to_vec();
        let params = ElectionParams { density: k, form: ScoreForm::Sas { alpha: 1.0 } };
        let contributors: Vec<Contributor<'_>> = (1..3).map(|j| Contributor {
            weight: &b.w[j][..len],
            y_mean: &b.s[j][..rows],
            election: params,
            lambda_proj: b.lambda[j].0,
            lambda_ortho: b.lambda[j].1,
        }).collect();
        let c_y = vec![0.5f32; rows];
        let want = merge_tensor(&b.w[0][..len], &y, params, &b.c[..len], &c_y, x, &contributors, is_bias, EPSILON);
        let got = merge_tensor_with(&b.w[0][..len], &y, params, &b.c[..len], &c_y, x, &contributors, is_bias, EPSILON, &Variant::default());
        prop_assert_eq!(bits(&got.values), bits(&want.values));
        prop_assert_eq!(got.counts, want.counts);
    }
}

// ---------------------------------------------------------------------------
// The engine

/// Gives every statistics file of the family per-example output rows
/// (random, the same probe size everywhere), so that `layer_lambda:
/// activation` has something to read.
fn add_rows(dir: &Path, seed: u64) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".stats.safetensors") {
            continue;
        }
        let mut stats = ActivationStats::load(&path).unwrap();
        let mut rng = flatmerge::demo::Rng::new(seed, &path.to_string_lossy());
        let rows = stats.examples as usize;
        for layer in stats.layers.values_mut() {
            if let Some(y) = &layer.y_mean {
                let width = y.len();
                layer.y_rows = Some(Rows {
                    rows,
                    width,
                    data: rng.normals(rows * width, 1.0),
                });
            }
        }
        stats.save(&path).unwrap();
    }
}

/// Merges `config` with F32 output and checks every SAFE-M tensor against
/// `merge_tensor_with` (with the layer's λ scale from the statistics rows).
fn check_variant_against_reference(mut config: MergeConfig, out: &Path) -> usize {
    config.out_dtype = Some(Dtype::F32);
    let s = config.safe_m().unwrap().clone();
    let summary = merge(config.clone(), out, Some(2), None);
    let merged = tensor_map(out);
    let open = |p: &Path| Checkpoint::open(p).unwrap();
    let load = |p: &Path| ActivationStats::load(p).unwrap();
    let values = |c: &Checkpoint, name: &str| c.view(name).unwrap().to_f32_vec();
    let receiver = open(&config.models[0].path);
    let ancestor = open(&config.base.as_ref().unwrap().path);
    let contributors: Vec<Checkpoint> = config.models[1..].iter().map(|m| open(&m.path)).collect();
    let receiver_stats = load(config.models[0].stats.as_ref().unwrap());
    let ancestor_stats = load(config.base.as_ref().unwrap().stats.as_ref().unwrap());
    let contributor_stats: Vec<ActivationStats> = config.models[1..]
        .iter()
        .map(|m| load(m.stats.as_ref().unwrap()))
        .collect();
    let mut checked = 0;
    for tensor in &summary.report.tensors {
        let (TensorRule::SafeMWeight { layer } | TensorRule::SafeMBias { layer }) =
            &tensor.plan.rule
        else {
            continue;
        };
        let name = &tensor.plan.name;
        let is_bias = matches!(tensor.plan.rule, TensorRule::SafeMBias { .. });
        let ks = &tensor.plan.contributors;
        let y = |st: &ActivationStats| st.layer(layer).unwrap().y_mean.clone().unwrap();
        let scale = if s.variant.activation_lambda {
            let rows = |st: &ActivationStats| st.layer(layer).unwrap().y_rows.clone().unwrap().data;
            let mut models = vec![rows(&receiver_stats)];
            models.extend(ks.iter().map(|&k| rows(&contributor_stats[k])));
            let refs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
            let l = activation_lambda(&rows(&ancestor_stats), &refs, tensor.plan.shape[0]);
            assert_eq!(tensor.layer_lambda, Some(l), "{name}: the reported λ");
            l
        } else {
            1.0
        };
        let x_mean = if is_bias {
            Vec::new()
        } else {
            receiver_stats.layer(layer).unwrap().x_mean.clone().unwrap()
        };
        let bs: Vec<Vec<f32>> = ks.iter().map(|&k| values(&contributors[k], name)).collect();
        let ys: Vec<Vec<f32>> = ks.iter().map(|&k| y(&contributor_stats[k])).collect();
        let refs: Vec<Contributor<'_>> = ks
            .iter()
            .zip(bs.iter().zip(&ys))
            .map(|(&k, (weight, y_mean))| Contributor {
                weight,
                y_mean,
                election: s.contributors[k].election,
                lambda_proj: scale * s.contributors[k].lambda_proj,
                lambda_ortho: scale * s.contributors[k].lambda_ortho,
            })
            .collect();
        let variant = Variant {
            receiver_lambda: (
                scale * s.variant.receiver_lambda.0,
                scale * s.variant.receiver_lambda.1,
            ),
            ..s.variant
        };
        let want = merge_tensor_with(
            &values(&receiver, name),
            &y(&receiver_stats),
            s.receiver,
            &values(&ancestor, name),
            &y(&ancestor_stats),
            &x_mean,
            &refs,
            is_bias,
            s.epsilon,
            &variant,
        );
        let got = merged[name].values();
        let mismatches = got
            .iter()
            .zip(&want.values)
            .filter(|(g, e)| g.to_bits() != e.to_bits())
            .count();
        assert_eq!(
            mismatches,
            0,
            "{name}: differs from merge_tensor_with: {:?} vs {:?}",
            &got[..3],
            &want.values[..3]
        );
        for (k, c) in want.counts.iter().take(ks.len()).enumerate() {
            assert_eq!(tensor.masks[k].kept, c.kept, "{name} contributor {k}");
            assert_eq!(
                tensor.masks[k].conflicts, c.conflicts,
                "{name} contributor {k}"
            );
        }
        checked += 1;
    }
    checked
}

/// (density, extra `parameters:` lines) of the variants checked.
const VARIANTS: [(&str, &str); 4] = [
    (
        "0.2",
        "  symmetric: true\n  conflict: score\n  salience: task_vector\n",
    ),
    ("0.5", "  conflict: keep\n  rescale: true\n"),
    (
        "1.0",
        "  symmetric: true\n  conflict: keep\n  layer_lambda: activation\n",
    ),
    (
        "0.2",
        "  conflict: score\n  salience: task_vector\n  layer_lambda: activation\n",
    ),
];

#[test]
fn the_engine_matches_merge_tensor_with_for_every_variant() {
    for (i, (density, extra)) in VARIANTS.iter().enumerate() {
        let tmp = tempdir();
        let fam = family(
            &tmp.path().join("family"),
            &SMALL,
            Dtype::BF16,
            2,
            30 + i as u64,
        );
        add_rows(&tmp.path().join("family"), i as u64);
        let config = edit_config(&fam, |text| {
            text.replace(
                "  fallback_weight: 0.5\n",
                &format!("  fallback_weight: 0.5\n{extra}"),
            )
            .replace("density: 0.2", &format!("density: {density}"))
            .replace("lambda_ortho: 0.5", "lambda_ortho: 0.8")
        });
        assert_ne!(
            config.safe_m().unwrap().variant,
            Variant::default(),
            "{extra}"
        );
        eprintln!("variant {i}: {extra}");
        let checked = check_variant_against_reference(config, &tmp.path().join("out"));
        assert_eq!(checked, 7 * SMALL.layers, "{extra}");
    }
}

#[test]
fn variants_write_identical_bytes_for_any_thread_count() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &CHUNKED, Dtype::BF16, 2, 41);
    add_rows(&tmp.path().join("family"), 3);
    let config = edit_config(&fam, |text| {
        text.replace(
            "  fallback_weight: 0.5\n",
            "  fallback_weight: 0.5\n  symmetric: true\n  conflict: score\n  rescale: true\n  salience: task_vector\n  layer_lambda: activation\n",
        )
    });
    let prepared = PreparedMerge::new(config).unwrap();
    let run = |name: &str, threads: usize| {
        let out = tmp.path().join(name);
        prepared.run(&options(&out, Some(threads), None)).unwrap();
        dir_files(&out)
    };
    let one = run("t1", 1);
    let two = run("t2", 2);
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        two.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &one {
        assert!(
            two[name] == *bytes,
            "{name} differs between 1 and 2 threads"
        );
    }
}

#[test]
fn layer_lambda_without_rows_is_a_clear_error() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 9);
    let config = edit_config(&fam, |text| {
        text.replace(
            "  fallback_weight: 0.5\n",
            "  fallback_weight: 0.5\n  layer_lambda: activation\n",
        )
    });
    let err = PreparedMerge::new(config)
        .and_then(|p| p.run(&options(&tmp.path().join("out"), Some(1), None)))
        .unwrap_err();
    assert!(err.to_string().contains("y_rows"), "{err}");
}

// ---------------------------------------------------------------------------
// Config

const BASE: &str = "\
merge_method: safe_m
base_model: ./C
base_model_stats: ./C.stats.safetensors
models:
  - model: ./A
    stats: ./A.stats.safetensors
  - model: ./B
    stats: ./B.stats.safetensors
parameters:
  density: 0.2
";

fn parse(extra: &str) -> flatmerge::Result<MergeConfig> {
    MergeConfig::from_yaml(&format!("{BASE}{extra}"), Path::new("/m"), None)
}

#[test]
fn variant_keys_parse_and_default_to_spec() {
    let spec = parse("").unwrap();
    let s = spec.safe_m().unwrap();
    assert_eq!(s.variant, Variant::default());
    assert_eq!(s.preset, "spec");
    let c = parse(
        "  symmetric: true\n  conflict: score\n  salience: task_vector\n  rescale: true\n  layer_lambda: activation\n  lambda_proj: 0.75\n",
    )
    .unwrap();
    let v = c.safe_m().unwrap().variant;
    assert!(v.symmetric && v.rescale && v.activation_lambda);
    assert_eq!(v.conflict, ConflictRule::Score);
    assert_eq!(v.salience, Salience::TaskVector);
    assert_eq!(
        v.receiver_lambda,
        (0.75, 0.5),
        "global λ reach the receiver when symmetric"
    );
}

#[test]
fn the_receiver_takes_lambda_only_in_the_symmetric_form() {
    let own = "    parameters:\n      lambda_ortho: 0.9\n";
    let text = BASE.replace(
        "    stats: ./A.stats.safetensors\n",
        &format!("    stats: ./A.stats.safetensors\n{own}"),
    );
    let e = MergeConfig::from_yaml(&text, Path::new("/m"), None).unwrap_err();
    assert!(e.to_string().contains("symmetric: true"), "{e}");
    let c = MergeConfig::from_yaml(&format!("{text}  symmetric: true\n"), Path::new("/m"), None)
        .unwrap();
    assert_eq!(c.safe_m().unwrap().variant.receiver_lambda, (1.0, 0.9));
}

#[test]
fn bad_variant_values_are_errors_naming_the_key_and_choices() {
    for (extra, needle) in [
        ("  conflict: vote\n", "`drop`, `keep`, `score`"),
        ("  salience: gradient\n", "`weight`, `task_vector`"),
        ("  symmetric: 1\n", "`true` or `false`"),
        ("  rescale: yes please\n", "`true` or `false`"),
        ("  layer_lambda: auto\n", "`fixed`, `activation`"),
        ("  preset: best\n", "`spec`, `keep_all`"),
    ] {
        let e = parse(extra).unwrap_err();
        let key = extra.trim().split(':').next().unwrap();
        assert!(
            e.to_string().contains(needle) && e.to_string().contains(key),
            "{extra}: {e}"
        );
    }
}

#[test]
fn the_keep_all_preset_sets_defaults_that_keys_override() {
    let c = parse("  preset: keep_all\n").unwrap();
    let s = c.safe_m().unwrap();
    assert_eq!(s.preset, "keep_all");
    // `density: 0.2` is written in BASE, so it wins over the preset's 1.
    assert_eq!(s.receiver.density, 0.2);
    assert_eq!(s.variant.conflict, ConflictRule::Keep);
    assert!(s.variant.symmetric && s.variant.activation_lambda);
    assert_eq!(s.variant.receiver_lambda, (1.0, 1.0));
    let c = MergeConfig::from_yaml(
        &BASE.replace(
            "  density: 0.2\n",
            "  preset: keep_all\n  lambda_ortho: 0.75\n  layer_lambda: fixed\n",
        ),
        Path::new("/m"),
        None,
    )
    .unwrap();
    let s = c.safe_m().unwrap();
    assert_eq!(s.receiver.density, 1.0);
    assert_eq!(s.variant.receiver_lambda, (1.0, 0.75));
    assert_eq!(s.contributors[0].lambda_ortho, 0.75);
    assert!(!s.variant.activation_lambda);
}
