//! FAM end to end (SPEC §2, §5) on checkpoints that imitate the
//! LLaVA-1.5 → mPLUG-Owl2 pair: the mapping recovers the planted neuron
//! permutation, every tensor is accounted for, and the merge stays close to
//! the receiver's layer outputs.

use flatmerge::config::MergeConfig;
use flatmerge::demo::{write_heterogeneous_pair, PairShape};
use flatmerge::engine::{MergeOptions, PreparedMerge};
use flatmerge::io::Checkpoint;
use flatmerge::plan::TensorRule;

fn tensor(dir: &std::path::Path, name: &str) -> Vec<f32> {
    Checkpoint::open(dir)
        .unwrap()
        .view(name)
        .unwrap()
        .to_f32_vec()
}

/// ‖X Wᵀ − Y‖ / ‖Y‖ over the probe rows: how far a merged layer's outputs
/// are from the receiver's recorded ones.
fn output_error(w: &[f32], x: &flatmerge::stats::Rows, y: &flatmerge::stats::Rows) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for s in 0..x.rows {
        for (m, t) in flatmerge::demo::matvec(w, x.row(s)).iter().zip(y.row(s)) {
            err += ((m - t) as f64).powi(2);
            norm += (*t as f64).powi(2);
        }
    }
    (err / norm).sqrt()
}

#[test]
fn the_mapping_recovers_a_planted_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 7).unwrap();
    let merge = PreparedMerge::new(MergeConfig::from_file(&pair.config).unwrap()).unwrap();
    let alignments = merge.align().unwrap();
    assert_eq!(
        alignments.len(),
        PairShape::SMALL.llm.layers,
        "one LLaMA MLP group per layer"
    );
    for (alignment, perm) in alignments.iter().zip(&pair.permutations) {
        let recovered = alignment
            .matching
            .iter()
            .enumerate()
            .filter(|(i, m)| **m == Some(perm[*i]))
            .count();
        assert!(
            recovered * 100 >= 99 * perm.len(),
            "{}: recovered {recovered} of {}",
            alignment.name,
            perm.len()
        );
    }
}

#[test]
fn the_llava_map_accounts_for_every_tensor_and_updates_both_copies() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 3).unwrap();
    let merge = PreparedMerge::new(MergeConfig::from_file(&pair.config).unwrap()).unwrap();
    let out = dir.path().join("merged");
    let summary = merge
        .run(&MergeOptions {
            out_dir: out.clone(),
            ..Default::default()
        })
        .unwrap();
    let a = Checkpoint::open(&pair.receiver).unwrap();
    let b = Checkpoint::open(&pair.contributor).unwrap();
    let report = &summary.report;
    // Every tensor of A is in the report; every tensor of B is either a source or dropped.
    assert_eq!(report.tensors.len(), a.tensors().len());
    let sources: std::collections::BTreeSet<&str> = report
        .tensors
        .iter()
        .filter_map(|t| t.plan.source.as_deref())
        .collect();
    let dropped: std::collections::BTreeSet<&str> =
        report.dropped.iter().map(|d| d.name.as_str()).collect();
    for t in b.tensors() {
        assert!(
            sources.contains(t.name.as_str()) ^ dropped.contains(t.name.as_str()),
            "{} unaccounted",
            t.name
        );
    }
    assert!(
        dropped.iter().all(|d| d.starts_with("model.mm_projector")),
        "{dropped:?}"
    );
    for t in &report.tensors {
        let vision =
            t.plan.name.contains("vision_model") || t.plan.name.contains("visual_abstractor");
        assert_eq!(t.plan.source.is_none(), vision, "{}", t.plan.name);
    }
    // Both modality copies of k_proj and the norms took LLaVA's single tensor.
    for name in [
        "model.layers.0.self_attn.k_proj.multiway.0.weight",
        "model.layers.0.self_attn.k_proj.multiway.1.weight",
        "model.layers.1.post_attention_layernorm.multiway.0.weight",
        "model.layers.1.post_attention_layernorm.multiway.1.weight",
    ] {
        let plan = &report
            .tensors
            .iter()
            .find(|t| t.plan.name == name)
            .unwrap()
            .plan;
        assert!(
            plan.source
                .as_deref()
                .is_some_and(|s| !s.contains("multiway")),
            "{name}"
        );
        assert!(matches!(plan.rule, TensorRule::Fam { .. }), "{name}");
        assert_ne!(
            tensor(&out, name),
            tensor(&pair.receiver, name),
            "{name} unchanged"
        );
    }
    // Tensors only in A keep A's values.
    let only_a = "model.visual_abstractor.visual_fc.weight";
    assert_eq!(tensor(&out, only_a), tensor(&pair.receiver, only_a));
}

#[test]
fn the_merge_stays_close_to_the_aligned_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 11).unwrap();
    let merge = PreparedMerge::new(MergeConfig::from_file(&pair.config).unwrap()).unwrap();
    let out = dir.path().join("merged");
    merge
        .run(&MergeOptions {
            out_dir: out.clone(),
            ..Default::default()
        })
        .unwrap();
    let stats = flatmerge::stats::ActivationStats::load(&pair.receiver_stats).unwrap();
    for layer in [
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
    ] {
        let l = stats.layer(layer).unwrap();
        let (x, y) = (l.x_rows.as_ref().unwrap(), l.y_rows.as_ref().unwrap());
        let relative = output_error(&tensor(&out, &format!("{layer}.weight")), x, y);
        assert!(
            relative < 0.05,
            "{layer}: merged outputs differ from A's by {relative}"
        );
    }
}

#[test]
fn without_alignment_the_same_merge_drifts_away() {
    // The control for the test above: the same pair averaged without groups
    // (no permutation) moves the MLP outputs far from A's.
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 11).unwrap();
    let text = std::fs::read_to_string(&pair.config).unwrap() + "groups: none\n";
    let merge =
        PreparedMerge::new(MergeConfig::from_yaml(&text, dir.path(), None).unwrap()).unwrap();
    let out = dir.path().join("unaligned");
    merge
        .run(&MergeOptions {
            out_dir: out.clone(),
            ..Default::default()
        })
        .unwrap();
    let stats = flatmerge::stats::ActivationStats::load(&pair.receiver_stats).unwrap();
    let l = stats.layer("model.layers.0.mlp.up_proj").unwrap();
    let (x, y) = (l.x_rows.as_ref().unwrap(), l.y_rows.as_ref().unwrap());
    let relative = output_error(&tensor(&out, "model.layers.0.mlp.up_proj.weight"), x, y);
    assert!(
        relative > 0.3,
        "unaligned merge unexpectedly close: {relative}"
    );
}

#[test]
fn lambda_search_reports_the_whole_grid() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 5).unwrap();
    let text = std::fs::read_to_string(&pair.config).unwrap()
        + "parameters:\n  lambda_search: true\n  lambda_grid: [0, 0.5, 1]\n";
    let merge =
        PreparedMerge::new(MergeConfig::from_yaml(&text, dir.path(), None).unwrap()).unwrap();
    let summary = merge
        .run(&MergeOptions {
            out_dir: dir.path().join("searched"),
            ..Default::default()
        })
        .unwrap();
    let fam = summary.report.results.get("fam").unwrap();
    let grid = fam["lambda_grid"].as_array().unwrap();
    assert_eq!(grid.len(), 9);
    let best = grid
        .iter()
        .map(|g| g["loss"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let chosen = grid
        .iter()
        .find(|g| {
            g["lambda_proj"] == fam["lambda_proj"] && g["lambda_ortho"] == fam["lambda_ortho"]
        })
        .unwrap();
    assert_eq!(chosen["loss"].as_f64().unwrap(), best);
    // λ = 0 reproduces A exactly on A's rows, so the loss there is A-free: only B's error remains.
    assert!(grid.iter().all(|g| g["loss"].as_f64().unwrap() >= 0.0));
}

#[test]
fn strict_turns_unaccounted_tensors_into_errors_and_map_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 9).unwrap();
    // The built-in map accounts for mPLUG-Owl2's vision modules (kept from
    // A) and LLaVA's projector (dropped by a rule): --strict passes.
    let mut config = MergeConfig::from_file(&pair.config).unwrap();
    config.strict = true;
    PreparedMerge::new(config).expect("every tensor is accounted for");
    // A rules file with the same rules but no list of A's own modules:
    // the vision modules are unaccounted, the projector (dropped by a
    // rule) still is not an error.
    let rules_only = dir.path().join("rules-only.yaml");
    std::fs::write(
        &rules_only,
        "- pattern: 'model\\.layers\\.(\\d+)\\.self_attn\\.(k_proj|v_proj)\\.weight'\n  replace: ['model.layers.$1.self_attn.$2.multiway.0.weight', 'model.layers.$1.self_attn.$2.multiway.1.weight']\n\
         - pattern: 'model\\.layers\\.(\\d+)\\.(input_layernorm|post_attention_layernorm)\\.weight'\n  replace: ['model.layers.$1.$2.multiway.0.weight', 'model.layers.$1.$2.multiway.1.weight']\n\
         - pattern: 'model\\.mm_projector\\..*'\n  replace: null\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&pair.config).unwrap().replace(
        "name_map: llava-1.5-to-mplug-owl2",
        "name_map: {file: rules-only.yaml}",
    );
    let mut config = MergeConfig::from_yaml(&text, dir.path(), None).unwrap();
    config.strict = true;
    let e = PreparedMerge::new(config)
        .err()
        .expect("strict must refuse the vision modules");
    let text = e.to_string();
    assert!(
        text.contains("--strict") && text.contains("visual_abstractor"),
        "{text}"
    );
    assert!(!text.contains("mm_projector"), "{text}");
    // The same rules as the built-in map, from a file, give the same plan.
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "- pattern: 'model\\.layers\\.(\\d+)\\.self_attn\\.(k_proj|v_proj)\\.weight'\n  replace: ['model.layers.$1.self_attn.$2.multiway.0.weight', 'model.layers.$1.self_attn.$2.multiway.1.weight']\n\
         - pattern: 'model\\.layers\\.(\\d+)\\.(input_layernorm|post_attention_layernorm)\\.weight'\n  replace: ['model.layers.$1.$2.multiway.0.weight', 'model.layers.$1.$2.multiway.1.weight']\n\
         - pattern: 'model\\.mm_projector\\..*'\n  replace: null\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&pair.config).unwrap().replace(
        "name_map: llava-1.5-to-mplug-owl2",
        "name_map: {file: rules.yaml}",
    );
    let from_file =
        PreparedMerge::new(MergeConfig::from_yaml(&text, dir.path(), None).unwrap()).unwrap();
    let builtin = PreparedMerge::new(MergeConfig::from_file(&pair.config).unwrap()).unwrap();
    let sources = |m: &PreparedMerge| {
        m.plan()
            .tensors
            .iter()
            .map(|t| t.source.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(sources(&from_file), sources(&builtin));
}

#[test]
fn the_searched_loss_is_the_merged_layers_relative_error() {
    // SPEC §2.5 recomputed directly: merge with fixed λ, then sum over the
    // group-producing layers ‖X_k W*ᵀ − Y_k‖² / ‖Y_k‖² for A, and for B with
    // its outputs read through the matching (A's unmatched neurons skipped).
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 21).unwrap();
    let base = std::fs::read_to_string(&pair.config).unwrap();
    let searched = base.clone() + "parameters:\n  lambda_search: true\n  lambda_grid: [0.25, 1]\n";
    let merge =
        PreparedMerge::new(MergeConfig::from_yaml(&searched, dir.path(), None).unwrap()).unwrap();
    let alignments = merge.align().unwrap();
    let summary = merge
        .run(&MergeOptions {
            out_dir: dir.path().join("s"),
            ..Default::default()
        })
        .unwrap();
    let grid = summary.report.results.get("fam").unwrap()["lambda_grid"]
        .as_array()
        .unwrap()
        .clone();
    let stats_a = flatmerge::stats::ActivationStats::load(&pair.receiver_stats).unwrap();
    let stats_b = flatmerge::stats::ActivationStats::load(&pair.contributor_stats).unwrap();
    for (lp, lo) in [(0.25f64, 1.0f64), (1.0, 0.25)] {
        let fixed =
            base.clone() + &format!("parameters:\n  lambda_proj: {lp}\n  lambda_ortho: {lo}\n");
        let out = dir.path().join(format!("fixed-{lp}-{lo}"));
        PreparedMerge::new(MergeConfig::from_yaml(&fixed, dir.path(), None).unwrap())
            .unwrap()
            .run(&MergeOptions {
                out_dir: out.clone(),
                ..Default::default()
            })
            .unwrap();
        let mut loss = 0f64;
        for (g, alignment) in alignments.iter().enumerate() {
            for proj in ["gate_proj", "up_proj"] {
                let layer = format!("model.layers.{g}.mlp.{proj}");
                let w = tensor(&out, &format!("{layer}.weight"));
                for (stats, is_b) in [(&stats_a, false), (&stats_b, true)] {
                    let l = stats.layer(&layer).unwrap();
                    let (x, y) = (l.x_rows.as_ref().unwrap(), l.y_rows.as_ref().unwrap());
                    let (mut err, mut norm) = (0f64, 0f64);
                    for s in 0..x.rows {
                        let merged = flatmerge::demo::matvec(&w, x.row(s));
                        for (i, m) in merged.iter().enumerate() {
                            let target = match (is_b, alignment.matching[i]) {
                                (false, _) => y.row(s)[i],
                                (true, Some(j)) => y.row(s)[j],
                                (true, None) => continue,
                            };
                            err += ((m - target) as f64).powi(2);
                            norm += (target as f64).powi(2);
                        }
                    }
                    loss += err / norm;
                }
            }
        }
        let reported = grid
            .iter()
            .find(|e| {
                (e["lambda_proj"].as_f64().unwrap() - lp).abs() < 1e-9
                    && (e["lambda_ortho"].as_f64().unwrap() - lo).abs() < 1e-9
            })
            .unwrap()["loss"]
            .as_f64()
            .unwrap();
        assert!(
            (reported - loss).abs() <= 1e-3 * loss.max(1e-9),
            "λ = ({lp}, {lo}): grid {reported}, direct {loss}"
        );
    }
}

/// Writes `PATH.grams.safetensors` beside the statistics file `stats`:
/// every layer's Gram `(1/n) Σ_n x_n x_nᵀ` over its stored input rows.
fn grams_from_rows(stats: &std::path::Path) -> std::path::PathBuf {
    let mut s = flatmerge::stats::ActivationStats::load(stats).unwrap();
    for layer in s.layers.values_mut() {
        let x = layer.x_rows.clone().unwrap();
        let w = x.width;
        let mut g = vec![0f64; w * w];
        for r in 0..x.rows {
            let row = x.row(r);
            for i in 0..w {
                for k in 0..w {
                    g[i * w + k] += row[i] as f64 * row[k] as f64 / x.rows as f64;
                }
            }
        }
        layer.x_gram = Some(flatmerge::stats::Gram::new(
            g.iter().map(|&v| v as f32).collect(),
        ));
    }
    let out = stats.with_extension("grams.safetensors");
    s.save(&out).unwrap();
    out
}

#[test]
fn least_squares_fusion_solves_spec_7_in_the_aligned_basis() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_heterogeneous_pair(dir.path(), &PairShape::SMALL, 0.05, 11).unwrap();
    let (ga, gb) = (
        grams_from_rows(&pair.receiver_stats),
        grams_from_rows(&pair.contributor_stats),
    );
    // Means and rows as before, Grams beside them, the least-squares fusion.
    let text = format!(
        "merge_method: fam\nname_map: llava-1.5-to-mplug-owl2\nmodels:\n  - model: {}\n    stats: {}\n    grams: {}\n  - model: {}\n    stats: {}\n    grams: {}\nparameters:\n  fusion: least_squares\n",
        pair.receiver.display(),
        pair.receiver_stats.display(),
        ga.display(),
        pair.contributor.display(),
        pair.contributor_stats.display(),
        gb.display()
    );
    let config = MergeConfig::from_yaml(&text, dir.path(), None).unwrap();
    let merge = PreparedMerge::new(config).unwrap();
    let alignments = merge.align().unwrap();
    let out = dir.path().join("merged");
    let summary = merge
        .run(&MergeOptions {
            out_dir: out.clone(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        summary.report.parameters["fusion"]["form"], "least_squares",
        "{}",
        summary.report.parameters
    );
    // down_proj of layer 0: its columns are the MLP group's neurons.
    let layer = "model.layers.0.mlp.down_proj";
    let matching = &alignments[0].matching;
    let a = tensor(&pair.receiver, &format!("{layer}.weight"));
    let b = tensor(&pair.contributor, &format!("{layer}.weight"));
    let sa = flatmerge::stats::ActivationStats::load(&ga).unwrap();
    let sb = flatmerge::stats::ActivationStats::load(&gb).unwrap();
    let gram_a = sa.gram(layer).unwrap().values().into_owned();
    let gram_b = sb.gram(layer).unwrap().values().into_owned();
    let (rows, cols) = (a.len() / matching.len(), matching.len());
    let shrink = |g: f64, i: usize, k: usize| if i == k { g } else { 0.9 * g };
    let mut lhs = vec![0f64; cols * cols];
    let mut rhs = vec![0f64; rows * cols];
    for i in 0..cols {
        for k in 0..cols {
            let g_a = shrink(gram_a[i * cols + k] as f64, i, k);
            let g_b = match (matching[i], matching[k]) {
                (Some(mi), Some(mk)) => shrink(gram_b[mi * cols + mk] as f64, i, k),
                _ => 0.0,
            };
            lhs[i * cols + k] = g_a + g_b;
            for r in 0..rows {
                let b_ri = match matching[i] {
                    Some(mi) => b[r * cols + mi],
                    None => a[r * cols + i],
                } as f64;
                rhs[r * cols + k] += a[r * cols + i] as f64 * g_a + b_ri * g_b;
            }
        }
    }
    let want = flatmerge_suite::solve_right_symmetric(&lhs, &rhs, cols);
    let got = tensor(&out, &format!("{layer}.weight"));
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs() / scale)
        .fold(0f64, f64::max);
    assert!(worst < 1e-4, "{layer}: {worst:e} off the independent solve");
    // And the fused layer reproduces A's recorded outputs at least as well
    // as the flat fusion keeps them (SPEC §7 reproduces both models' outputs).
    let stats = flatmerge::stats::ActivationStats::load(&pair.receiver_stats).unwrap();
    let l = stats.layer(layer).unwrap();
    let relative = output_error(&got, l.x_rows.as_ref().unwrap(), l.y_rows.as_ref().unwrap());
    assert!(
        relative < 0.05,
        "{layer}: merged outputs differ from A's by {relative}"
    );
}
