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
        3,
        "two-model, three-model and heterogeneous cases"
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
        "safe_m, score sas",
        "safe_m, score ratio",
    ];
    expect(0, &homologous);
    expect(1, &homologous);
    expect(
        2,
        &[
            "fine-tuned",
            "reference: linear of the unpermuted pair",
            "naive: linear of the permuted pair",
            "fam (defaults)",
            "fam (preset sketch)",
            "fam (lambda_search)",
        ],
    );
    assert_eq!(report.cases[0].tasks, [0, 1]);
    assert_eq!(report.cases[1].tasks, [0, 1, 2]);
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
            assert!(
                table.contains(&format!("| {} |", row.label)),
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
    assert!(parse(&["--seeds", "0"]).is_err());
    assert!(parse(&["--frobnicate"]).is_err());
}
