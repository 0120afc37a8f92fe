//! SAFE-M's variants in the benchmark: the grid whose best setting is
//! chosen on the validation split, the ablations of SPEC §1's stages, and
//! the diagnostics of what each stage keeps of a contributor's task vector
//! (computed here with the library's kernels on the in-memory bodies).

use std::path::Path;

use flatmerge::safe_m::{
    output_shift, projection_coefficient, score_matrix, split_row, task_vector, ScoreForm,
};
use flatmerge::select::{election_threshold, is_elected};
use flatmerge::stats::ActivationStats;

use super::nn::Dense;

/// One SAFE-M setting: a label and the `parameters:` lines it adds to the
/// SPEC defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// As printed.
    pub label: String,
    /// Extra `parameters:` lines (`key: value`).
    pub params: Vec<String>,
}

fn setting(label: impl Into<String>, params: &[String]) -> Setting {
    Setting {
        label: label.into(),
        params: params.to_vec(),
    }
}

/// SPEC §1 with one stage removed at a time, then all three (which is
/// task arithmetic with λ = 1 up to rounding): where the contributor is lost.
pub fn ablations() -> Vec<Setting> {
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        setting("no election (density 1)", &p(&["density: 1.0"])),
        setting(
            "no conflict removal (conflict: keep)",
            &p(&["conflict: keep"]),
        ),
        setting(
            "no decoupling (λ_proj = λ_ortho = 1)",
            &p(&["lambda_ortho: 1.0"]),
        ),
        setting(
            "none of the three (density 1, keep, λ 1/1)",
            &p(&["density: 1.0", "conflict: keep", "lambda_ortho: 1.0"]),
        ),
    ]
}

/// The variant grid (docs/methods.md). `full`: every combination of form
/// (receiver / symmetric), salience, conflict rule, density and rescale at
/// λ = 1/1, then λ pairs on the most promising structures; otherwise a few
/// representative settings (the smoke test).
pub fn grid(full: bool) -> Vec<Setting> {
    let mut out = Vec::new();
    let forms: &[bool] = &[false, true];
    let saliences: &[&str] = if full {
        &["weight", "task_vector"]
    } else {
        &["task_vector"]
    };
    let conflicts: &[&str] = if full {
        &["drop", "keep", "score"]
    } else {
        &["drop", "score"]
    };
    let densities: &[f64] = if full { &[0.2, 0.5, 1.0] } else { &[0.5, 1.0] };
    for &symmetric in forms {
        for &conflict in conflicts {
            for &density in densities {
                // At density 1 every entry with a positive score is elected
                // whatever the salience, and a rescale has nothing to restore.
                let sal: &[&str] = if density >= 1.0 {
                    &saliences[..1]
                } else {
                    saliences
                };
                let rescales: &[bool] = if density >= 1.0 || !full {
                    &[false]
                } else {
                    &[false, true]
                };
                for &salience in sal {
                    for &rescale in rescales {
                        out.push(variant(
                            symmetric, conflict, salience, density, rescale, 1.0, 1.0,
                        ));
                    }
                }
            }
        }
    }
    // The per-layer λ from the probe rows, on the structures that keep most.
    let activation: &[(bool, &str, f64, &str, f64, f64)] = if full {
        &[
            (true, "keep", 1.0, "weight", 1.0, 1.0),
            (true, "keep", 1.0, "weight", 0.75, 1.0),
            (true, "score", 1.0, "weight", 1.0, 1.0),
            (true, "keep", 0.5, "task_vector", 1.0, 1.0),
            (false, "keep", 1.0, "weight", 1.0, 1.0),
        ]
    } else {
        &[(true, "keep", 1.0, "weight", 1.0, 1.0)]
    };
    for &(symmetric, conflict, density, salience, lp, lo) in activation {
        let mut v = variant(symmetric, conflict, salience, density, false, lp, lo);
        v.params.push("layer_lambda: activation".into());
        v.label += ", layer_lambda activation";
        out.push(v);
    }
    if full {
        // λ on the structures that keep most of every task (density 1).
        for symmetric in [false, true] {
            for conflict in ["keep", "score"] {
                for (lp, lo) in [
                    (0.5, 1.0),
                    (0.75, 0.75),
                    (0.75, 1.0),
                    (0.5, 0.75),
                    (0.6, 0.6),
                ] {
                    out.push(variant(symmetric, conflict, "weight", 1.0, false, lp, lo));
                }
            }
        }
    }
    out
}

/// SAFE-M with second moments (`reproject: gram`, docs/methods.md): the
/// election and conflict rule as configured, then the least-squares
/// re-projection from each model's own-task Gram; λ is `lambda_proj`.
/// The symmetric form at density 1 without conflict removal is RegMean.
pub fn gram_grid(full: bool) -> Vec<Setting> {
    let mut out = Vec::new();
    let densities: &[f64] = if full { &[0.2, 0.5, 1.0] } else { &[1.0] };
    let lambdas: &[f64] = if full { &[1.0, 1.5, 2.0] } else { &[1.0] };
    for symmetric in [false, true] {
        for conflict in ["drop", "keep"] {
            for &density in densities {
                let ls: &[f64] = if density >= 1.0 { lambdas } else { &[1.0] };
                for &lambda in ls {
                    let mut params = vec![
                        "reproject: gram".to_string(),
                        format!("conflict: {conflict}"),
                        format!("density: {density}"),
                        format!("lambda_proj: {lambda}"),
                    ];
                    if symmetric {
                        params.push("symmetric: true".into());
                    }
                    out.push(Setting {
                        label: format!(
                            "gram, {}, conflict {conflict}, density {density}, λ {lambda}",
                            if symmetric { "symmetric" } else { "receiver" }
                        ),
                        params,
                    });
                }
            }
        }
    }
    // The label-free per-layer λ from the probe rows times a fixed scale.
    let scales: &[f64] = if full { &[1.5, 2.0] } else { &[] };
    for &lambda in scales {
        out.push(Setting {
            label: format!(
                "gram, symmetric, conflict keep, density 1, λ {lambda}, layer_lambda activation"
            ),
            params: vec![
                "reproject: gram".into(),
                "conflict: keep".into(),
                "density: 1".into(),
                format!("lambda_proj: {lambda}"),
                "symmetric: true".into(),
                "layer_lambda: activation".into(),
            ],
        });
    }
    out
}

fn variant(
    symmetric: bool,
    conflict: &str,
    salience: &str,
    density: f64,
    rescale: bool,
    lambda_proj: f64,
    lambda_ortho: f64,
) -> Setting {
    let mut params = vec![
        format!("conflict: {conflict}"),
        format!("density: {density}"),
        format!("lambda_proj: {lambda_proj}"),
        format!("lambda_ortho: {lambda_ortho}"),
    ];
    let mut label = format!(
        "{}, conflict {conflict}, density {density}",
        if symmetric { "symmetric" } else { "receiver" }
    );
    if symmetric {
        params.push("symmetric: true".into());
    }
    if density < 1.0 {
        params.push(format!("salience: {salience}"));
        label += &format!(", salience {salience}");
    }
    if rescale {
        params.push("rescale: true".into());
        label += ", rescale";
    }
    label += &format!(", λ {lambda_proj}/{lambda_ortho}");
    Setting { label, params }
}

/// What SPEC §1's stages keep of one contributor's task vector, summed
/// over the body's weights (biases have no projection and are left out).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Diagnosis {
    /// `‖τ_B ⊙ M_B‖² / ‖τ_B‖²`: after the election.
    pub elected: f64,
    /// `‖τ_B ⊙ M'_B‖² / ‖τ_B‖²`: after the conflict removal.
    pub kept: f64,
    /// `‖λ_proj·P + λ_ortho·O‖² / ‖τ_B‖²` at the defaults (1, 0.5): what is added.
    pub added: f64,
    /// `‖P‖² / ‖τ_u‖²`: the share of the masked vector along `x̄_A`.
    pub along_mean: f64,
    /// Share of `B`'s elected entries whose `τ` sign opposes `A`'s (any election).
    pub opposite: f64,
    /// `|top_k(S_B) ∩ top_k(|τ_B|)| / k` at `k = 20 %` (random: 0.2).
    pub overlap_tau: f64,
    /// `|top_k(S_B) ∩ top_k(|W_B|)| / k`.
    pub overlap_weight: f64,
    /// `|top_k(S_B) ∩ top_k(|τ_B ⊙ g'_B|)| / k`: the task-vector salience.
    pub overlap_tau_salience: f64,
}

fn top_set(values: &[f32], density: f64) -> Vec<bool> {
    let t = election_threshold(values, density);
    values.iter().map(|&v| is_elected(v, t)).collect()
}

fn overlap(a: &[bool], b: &[bool]) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    both as f64 / a.iter().filter(|x| **x).count().max(1) as f64
}

/// The diagnosis of contributor `b` against receiver `a` over ancestor `c`
/// (bodies with their statistics files), SPEC defaults with score `form`.
pub fn diagnose(
    a: (&[Dense], &Path),
    b: (&[Dense], &Path),
    c: (&[Dense], &Path),
    form: ScoreForm,
) -> Result<Diagnosis, String> {
    let load = |p: &Path| ActivationStats::load(p).map_err(|e| format!("{}: {e}", p.display()));
    let (sa, sb, sc) = (load(a.1)?, load(b.1)?, load(c.1)?);
    let (mut total, mut elected, mut kept, mut added, mut along, mut masked) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    let (mut opposite, mut both) = (0usize, 0usize);
    let (mut ov_tau, mut ov_w, mut ov_ts, mut layers) = (0f64, 0f64, 0f64, 0f64);
    for (k, ((la, lb), lc)) in a.0.iter().zip(b.0).zip(c.0).enumerate() {
        let name = format!("body.{k}");
        let get = |s: &ActivationStats, x: bool| -> Result<Vec<f32>, String> {
            let l = s
                .layer(&name)
                .ok_or_else(|| format!("no statistics for {name}"))?;
            let v = if x { &l.x_mean } else { &l.y_mean };
            v.clone()
                .ok_or_else(|| format!("{name}: a mean is missing"))
        };
        let v = get(&sa, true)?;
        let (ya, yb, yc) = (get(&sa, false)?, get(&sb, false)?, get(&sc, false)?);
        let (ua, ub) = (output_shift(&ya, &yc), output_shift(&yb, &yc));
        let n = la.w.len();
        let mut s_a = vec![0f32; n];
        let mut s_b = vec![0f32; n];
        score_matrix(&la.w, &ua, &v, form, &mut s_a);
        score_matrix(&lb.w, &ub, &v, form, &mut s_b);
        let (ma, mb) = (top_set(&s_a, 0.2), top_set(&s_b, 0.2));
        let mut tau_a = vec![0f32; n];
        let mut tau_b = vec![0f32; n];
        task_vector(&la.w, &lc.w, &mut tau_a);
        task_vector(&lb.w, &lc.w, &mut tau_b);
        let abs_tau: Vec<f32> = tau_b.iter().map(|t| t.abs()).collect();
        let abs_w: Vec<f32> = lb.w.iter().map(|t| t.abs()).collect();
        let mut s_tau = vec![0f32; n];
        score_matrix(&tau_b, &ub, &v, form, &mut s_tau);
        ov_tau += overlap(&mb, &top_set(&abs_tau, 0.2));
        ov_w += overlap(&mb, &top_set(&abs_w, 0.2));
        ov_ts += overlap(&mb, &top_set(&s_tau, 0.2));
        layers += 1.0;
        let mut tau_u = vec![0f32; n];
        for i in 0..n {
            let t = tau_b[i] as f64;
            total += t * t;
            let opp = (tau_a[i] > 0.0 && tau_b[i] < 0.0) || (tau_a[i] < 0.0 && tau_b[i] > 0.0);
            if mb[i] {
                elected += t * t;
                both += 1;
                opposite += opp as usize;
                if !(ma[i] && opp) {
                    kept += t * t;
                    tau_u[i] = tau_b[i];
                }
            }
        }
        let cols = v.len();
        let dd = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut p = vec![0f32; cols];
        let mut o = vec![0f32; cols];
        for row in tau_u.chunks_exact(cols) {
            let coef = projection_coefficient(row, &v, dd, 1e-8);
            split_row(row, &v, coef, &mut p, &mut o);
            for j in 0..cols {
                let add = (p[j] + 0.5 * o[j]) as f64;
                added += add * add;
                along += (p[j] as f64).powi(2);
                masked += (row[j] as f64).powi(2);
            }
        }
    }
    let share = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    Ok(Diagnosis {
        elected: share(elected, total),
        kept: share(kept, total),
        added: share(added, total),
        along_mean: share(along, masked),
        opposite: share(opposite as f64, both as f64),
        overlap_tau: ov_tau / layers,
        overlap_weight: ov_w / layers,
        overlap_tau_salience: ov_ts / layers,
    })
}
