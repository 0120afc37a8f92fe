//! Smoke test of the merge-quality benchmark (`benches/quality.rs`): its
//! quick mode runs end to end through the library (training, checkpoints,
//! native probe, every merge method) and gives a complete, well-formed and
//! reproducible table. It checks structure only, never merge quality: the
//! quick mode's models are far too small for that.

#[path = "../benches/quality/mod.rs"]
mod quality;

fn quick() -> quality::Report {
    let options = quality::Options {
        quick: true,
        full_grid: false,
        seeds: 1,
        verbose: false,
        ..quality::Options::default()
    };
    quality::run(&options).unwrap_or_else(|e| panic!("the quick benchmark failed: {e}"))
}

#[test]
fn the_quick_benchmark_is_complete_bounded_and_deterministic() {
    let report = quick();
    assert_eq!(
        report.cases.len(),
        4,
        "tasks 1+2, 1+2+3, 2+1 and the heterogeneous pair"
    );
    let expect = |case: usize, labels: &[&str]| {
        let rows: Vec<&str> = report.cases[case]
            .rows
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        for label in labels {
            assert!(
                rows.iter().any(|r| r.starts_with(label)),
                "case `{}` has no row `{label}`: {rows:?}",
                report.cases[case].title
            );
        }
    };
    let homologous = [
        "fine-tuned",
        "linear",
        "task_arithmetic λ = 1",
        "task_arithmetic λ = 0.4",
        "task_arithmetic, λ tuned on validation",
        "ties",
        "dare_ties",
        "dare_linear",
        quality::REGMEAN_OWN,
        quality::REGMEAN_SHARED,
        quality::REGMEAN_PP_OWN,
        quality::SUBSPACE[0].1,
        quality::SUBSPACE[0].2,
        quality::SUBSPACE[1].1,
        quality::SUBSPACE[1].2,
        quality::SUBSPACE[2].1,
        quality::SUBSPACE[2].2,
        quality::SUBSPACE[3].1,
        quality::SUBSPACE[3].2,
        "safe_m, score sas",
        "safe_m, score ratio",
        "safe_m sas, no election",
        "safe_m sas, no conflict removal",
        "safe_m sas, no decoupling",
        "safe_m preset: keep_all",
        "safe_m preset: gram",
    ];
    expect(0, &homologous);
    expect(1, &homologous);
    expect(2, &homologous);
    expect(
        3,
        &[
            "fine-tuned",
            "reference: linear of the unpermuted pair",
            "naive: linear of the permuted pair",
            "fam (defaults)",
            "fam (preset sketch)",
            "fam (lambda_search)",
            quality::FAM_LS_REFERENCE,
            quality::FAM_LS,
        ],
    );
    assert_eq!(report.cases[0].tasks, [0, 1]);
    assert_eq!(report.cases[1].tasks, [0, 1, 2]);
    assert_eq!(report.cases[2].tasks, [1, 0]);
    // Every homologous case has the variant grid, each row with validation
    // accuracies, and a setting was chosen among them on validation alone.
    let grid = quality::variants::grid(false);
    assert!(grid.len() >= 4, "{grid:?}");
    for case in &report.cases[..3] {
        for v in &grid {
            let label = format!("{}{}", quality::VARIANT_PREFIX, v.label);
            let row = case.rows.iter().find(|r| r.label == label);
            let row = row.unwrap_or_else(|| panic!("{}: no row `{label}`", case.title));
            assert_eq!(row.kind, quality::RowKind::Variant);
            assert!(row.val.iter().all(|v| v.len() == case.tasks.len()));
        }
        // SPEC §1 with all three stages removed is task arithmetic with
        // λ = 1 up to rounding: the same accuracies, but for a rare flipped tie.
        let find = |prefix: &str| {
            case.rows
                .iter()
                .find(|r| r.label.starts_with(prefix))
                .unwrap()
        };
        let all_off = find("safe_m sas, none of the three");
        let ta = find("task_arithmetic λ = 1");
        for (a, b) in all_off.acc.concat().iter().zip(ta.acc.concat()) {
            assert!((a - b).abs() <= 0.01, "{}: {a} vs {b}", case.title);
        }
    }
    let chosen = report
        .chosen
        .as_deref()
        .expect("a setting chosen on validation");
    assert!(chosen.starts_with(quality::VARIANT_PREFIX), "{chosen}");
    assert!(report.diagnoses.iter().all(|d| d.len() == 1));
    for case in &report.cases {
        for row in &case.rows {
            assert_eq!(row.acc.len(), 1, "one seed");
            for accs in &row.acc {
                assert_eq!(
                    accs.len(),
                    case.tasks.len(),
                    "{}: {}",
                    case.title,
                    row.label
                );
                for &a in accs {
                    assert!(
                        (0.0..=1.0).contains(&a),
                        "{}: {} has accuracy {a}",
                        case.title,
                        row.label
                    );
                }
            }
        }
        // The fine-tuned row normalises to exactly 1.
        let ft = &case.rows[0];
        for n in report.normalised(case, ft).concat() {
            assert_eq!(n, 1.0);
        }
    }
    let table = report.markdown();
    for case in &report.cases {
        assert!(
            table.contains(&case.title),
            "the table lacks `{}`",
            case.title
        );
        for row in &case.rows {
            // Variant rows are listed in the variants table, without the prefix.
            let label = row.label.trim_start_matches(quality::VARIANT_PREFIX);
            assert!(
                table.contains(&format!("| {label} |")),
                "the table lacks `{}`",
                row.label
            );
        }
    }
    // Same options, same numbers (and the same table, byte for byte).
    let again = quick();
    assert_eq!(report, again, "two runs of the quick benchmark differ");
    assert_eq!(table, again.markdown());
}

#[test]
fn options_parse_from_arguments() {
    let parse = |args: &[&str]| quality::Options::parse(args.iter().map(|s| s.to_string()));
    let o = parse(&["--bench", "--quick", "--seeds", "2", "--threads", "1"]).unwrap();
    assert!(o.quick);
    assert_eq!(o.seeds, 2);
    assert_eq!(o.threads, Some(1));
    assert!(!o.full_grid, "quick mode runs the small variant grid");
    assert!(parse(&["--quick", "--grid", "full"]).unwrap().full_grid);
    assert!(parse(&[]).unwrap().full_grid);
    assert!(parse(&["--grid", "huge"]).is_err());
    assert!(parse(&["--seeds", "0"]).is_err());
    assert!(parse(&["--frobnicate"]).is_err());
}
