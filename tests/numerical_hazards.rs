//! Numerical hazards of SAFE-M (SPEC §1.2–1.3) with their defined behaviour:
//!
//! - a zero projection direction (`x̄_A = 0`, so `‖d‖² = 0`): the `+ ε` of
//!   the projection keeps the coefficient at `0 / ε = 0`, never `0 / 0`;
//!   and since `g' = u ⊗ x̄_A = 0`, every score of the weight is 0, nothing
//!   is elected (`M` needs `S > 0`) and the weight stays `W_A` exactly;
//! - all-zero scores (a contributor whose mean output equals the
//!   ancestor's, `u_B = 0`): it gives nothing, `W* = W_A`;
//! - subnormal values: scores that are subnormal but positive are ordered
//!   and elected exactly like any positive number; a direction whose
//!   `‖d‖²` is far below `ε` projects nothing, so the masked task vector
//!   is added with `λ_ortho` — finite, no NaN.
//!
//! Each is checked on the kernel ([`flatmerge::safe_m`]) and, where a file
//! can carry it, through a whole merge.

use flatmerge::engine::PreparedMerge;
use flatmerge::safe_m::{
    add_decoupled, merge_tensor, projection_coefficient, Contributor, ElectionParams, ScoreForm,
    EPSILON,
};
use flatmerge::select::{election_threshold, is_elected};
use flatmerge::stats::ActivationStats;
use flatmerge_suite::{config, f32_tensors, family, options, tempdir, SMALL};
use std::path::Path;

const ROWS: usize = 3;
const COLS: usize = 4;

fn ramp(n: usize, start: f32, step: f32) -> Vec<f32> {
    (0..n).map(|i| start + step * i as f32).collect()
}

fn election(density: f64) -> ElectionParams {
    ElectionParams {
        density,
        form: ScoreForm::Sas { alpha: 1.0 },
    }
}

/// SAFE-M on a `[ROWS, COLS]` weight with one contributor, `λ = (1, 0.5)`.
fn merge(
    receiver: &[f32],
    ancestor: &[f32],
    contributor: &[f32],
    ys: (&[f32], &[f32], &[f32]),
    x_mean: &[f32],
    density: f64,
) -> flatmerge::safe_m::MergedTensor {
    let (y_a, y_b, y_c) = ys;
    merge_tensor(
        receiver,
        y_a,
        election(density),
        ancestor,
        y_c,
        x_mean,
        &[Contributor {
            weight: contributor,
            y_mean: y_b,
            election: election(density),
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        }],
        false,
        EPSILON,
    )
}

#[test]
fn a_zero_direction_projects_nothing_and_divides_by_epsilon_not_zero() {
    let row = [0.5f32, -1.0, 2.0, 0.25];
    let zero = [0.0f32; 4];
    let c = projection_coefficient(&row, &zero, 0.0, EPSILON);
    assert_eq!(c, 0.0);
    // P = 0, O = τ: the whole row is "orthogonal" and gets λ_ortho.
    let mut acc = [1.0f32; 4];
    add_decoupled(&mut acc, &row, Some((&zero, c)), 1.0, 0.5);
    let want: Vec<f32> = row.iter().map(|t| 1.0 + 0.5 * t).collect();
    assert_eq!(acc.to_vec(), want);
}

#[test]
fn a_zero_mean_input_elects_nothing_and_keeps_the_receiver() {
    let ancestor = ramp(ROWS * COLS, -0.3, 0.05);
    let receiver: Vec<f32> = ancestor.iter().map(|w| w + 0.01).collect();
    let contributor: Vec<f32> = ancestor.iter().map(|w| w - 0.02).collect();
    let (y_a, y_b, y_c) = (
        ramp(ROWS, 1.0, 0.5),
        ramp(ROWS, 0.2, -0.4),
        ramp(ROWS, 0.0, 0.1),
    );
    let merged = merge(
        &receiver,
        &ancestor,
        &contributor,
        (&y_a, &y_b, &y_c),
        &[0.0; COLS],
        1.0,
    );
    assert_eq!(merged.values, receiver);
    assert_eq!(merged.counts[0].elected, 0);
    assert_eq!(merged.counts[0].kept, 0);
    assert_eq!(merged.counts[0].receiver_elected, 0);
}

#[test]
fn all_zero_scores_elect_nothing_and_the_contributor_gives_nothing() {
    let ancestor = ramp(ROWS * COLS, -0.3, 0.05);
    let receiver: Vec<f32> = ancestor.iter().map(|w| w + 0.01).collect();
    let contributor: Vec<f32> = ancestor.iter().map(|w| w * 1.5).collect();
    let y_c = ramp(ROWS, 0.0, 0.1);
    let x = ramp(COLS, 0.5, 0.25);
    // u_B = ȳ_B − ȳ_C = 0: all of B's scores are 0, at every density.
    for density in [0.2, 1.0] {
        let scores = vec![0.0f32; ROWS * COLS];
        let t = election_threshold(&scores, density);
        assert!(scores.iter().all(|&s| !is_elected(s, t)));
        let merged = merge(
            &receiver,
            &ancestor,
            &contributor,
            (&ramp(ROWS, 1.0, 0.5), &y_c, &y_c),
            &x,
            density,
        );
        assert_eq!(merged.values, receiver, "density {density}");
        assert_eq!(merged.counts[0].elected, 0, "density {density}");
    }
}

#[test]
fn subnormal_scores_are_ordered_and_elected_exactly() {
    let tiny = |bits: u32| f32::from_bits(bits);
    // Three subnormal scores, one normal, a zero and a NaN (never elected).
    let scores = [tiny(1), tiny(7), 1e-3, tiny(3), 0.0, f32::NAN];
    // m = ⌈0.5·6⌉ = 3: the third largest is tiny(3).
    let t = election_threshold(&scores, 0.5);
    assert_eq!(t.to_bits(), 3);
    let elected: Vec<bool> = scores.iter().map(|&s| is_elected(s, t)).collect();
    assert_eq!(elected, [false, true, true, true, false, false]);
    // At density 1 every positive score is elected, the smallest subnormal too.
    let t = election_threshold(&scores, 1.0);
    assert!(is_elected(tiny(1), t));
}

#[test]
fn a_subnormal_direction_adds_the_task_vector_with_lambda_ortho() {
    let ancestor = ramp(ROWS * COLS, -0.3, 0.05);
    // τ_A = 0: no sign conflicts, so at density 1 B keeps every elected entry.
    let receiver = ancestor.clone();
    let tau_b = ramp(ROWS * COLS, 0.01, 0.003);
    let contributor: Vec<f32> = ancestor.iter().zip(&tau_b).map(|(w, t)| w + t).collect();
    let x: Vec<f32> = (0..COLS).map(|j| 1e-39 * (j + 1) as f32).collect();
    assert!(x.iter().all(|v| v.is_subnormal()));
    let merged = merge(
        &receiver,
        &ancestor,
        &contributor,
        (
            &ramp(ROWS, 1.0, 0.5),
            &ramp(ROWS, 0.9, -0.3),
            &ramp(ROWS, 0.0, 0.1),
        ),
        &x,
        1.0,
    );
    assert!(merged.values.iter().all(|v| v.is_finite()));
    for (i, got) in merged.values.iter().enumerate() {
        // Scores are subnormal products: where one underflowed to 0 the
        // entry is not elected and keeps W_A; elsewhere W_A + 0.5·τ_B.
        let with = receiver[i] + 0.5 * (contributor[i] - ancestor[i]);
        assert!(
            *got == receiver[i] || (got - with).abs() <= 1e-6,
            "entry {i}: {got} is neither {} nor {with}",
            receiver[i]
        );
    }
    assert!(
        merged.counts[0].kept > 0,
        "subnormal scores must be elected"
    );
}

/// The receiver's mean input of `layer` set to `value` everywhere.
fn set_x_mean(stats: &Path, layer: &str, value: f32) {
    let mut s = ActivationStats::load(stats).unwrap();
    let x = s.layers.get_mut(layer).unwrap().x_mean.as_mut().unwrap();
    x.iter_mut().for_each(|v| *v = value);
    s.save(stats).unwrap();
}

#[test]
fn merges_with_a_zero_or_subnormal_direction_or_a_silent_contributor_stay_defined() {
    let up = "model.layers.0.mlp.up_proj";
    let down = "model.layers.1.mlp.down_proj";
    let tmp = tempdir();
    let fam = family(
        &tmp.path().join("family"),
        &SMALL,
        flatmerge::dtype::Dtype::F32,
        1,
        21,
    );
    let a = f32_tensors(&fam.receiver);
    let a_stats = fam.dir.join("A.stats.safetensors");
    set_x_mean(&a_stats, up, 0.0);
    set_x_mean(&a_stats, down, 1e-39);
    // B's mean outputs equal C's on the gate projection: u_B = 0 there.
    let gate = "model.layers.0.mlp.gate_proj";
    let c = ActivationStats::load(&fam.dir.join("C.stats.safetensors")).unwrap();
    let b_path = fam.dir.join("B.stats.safetensors");
    let mut b = ActivationStats::load(&b_path).unwrap();
    b.layers.get_mut(gate).unwrap().y_mean = c.layer(gate).unwrap().y_mean.clone();
    b.save(&b_path).unwrap();

    let out = tmp.path().join("merged");
    PreparedMerge::new(config(&fam))
        .unwrap()
        .run(&options(&out, Some(2), None))
        .unwrap();
    let merged = f32_tensors(&out);
    assert!(merged.values().flatten().all(|v| v.is_finite()));
    for name in [format!("{up}.weight"), format!("{gate}.weight")] {
        assert_eq!(merged[&name], a[&name], "{name} should stay W_A");
    }
    // The subnormal direction still lets B's elected entries through.
    let name = format!("{down}.weight");
    assert_ne!(merged[&name], a[&name], "{name} should take some of B");
}
